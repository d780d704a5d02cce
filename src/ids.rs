//! Request IDs: an atomic counter backed by reservations logged in the WAL.
//!
//! IDs must be unique across restarts, including IDs handed out just before a crash that never
//! reached the WAL. So IDs are handed out only below `durable_limit`, the end of a `Reserve`
//! record that is already on disk; after a restart the counter starts above the highest
//! reservation, and gaps are allowed. The engine writes the next reservation when half of the
//! current block is used, so handing out an ID never waits for an fsync unless ingest outruns
//! the disk by half a block.

use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Notify;

pub struct IdAllocator {
    next: AtomicU64,
    durable_limit: AtomicU64,
    block_ids: u64,
    notify: Notify,
}

impl IdAllocator {
    /// `reserved` is the highest reservation recovered: every ID up to it may have been used.
    pub fn new(reserved: u64, block_ids: u64) -> IdAllocator {
        assert!(block_ids >= 2);
        IdAllocator {
            next: AtomicU64::new(reserved + 1),
            durable_limit: AtomicU64::new(reserved),
            block_ids,
            notify: Notify::new(),
        }
    }

    /// The next ID, if one is covered by a durable reservation.
    pub fn try_next(&self) -> Option<u64> {
        let limit = self.durable_limit.load(Ordering::Acquire);
        let mut next = self.next.load(Ordering::Relaxed);
        loop {
            if next > limit {
                return None;
            }
            match self.next.compare_exchange_weak(
                next,
                next + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(next),
                Err(seen) => next = seen,
            }
        }
    }

    /// Waits (async) for the next ID; `wake` asks the engine to reserve and returns false
    /// when the engine is gone (then no ID will ever come: `None`).
    pub async fn next(&self, wake: impl Fn() -> bool) -> Option<u64> {
        loop {
            if let Some(id) = self.try_next() {
                return Some(id);
            }
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(id) = self.try_next() {
                return Some(id);
            }
            if !wake() {
                return None;
            }
            // Bounded wait: a wake lost to a full channel is retried.
            let _ = tokio::time::timeout(std::time::Duration::from_millis(100), notified).await;
        }
    }

    /// Blocking variant for threads outside the async runtime.
    pub fn next_blocking(&self, wake: impl Fn() -> bool) -> Option<u64> {
        loop {
            if let Some(id) = self.try_next() {
                return Some(id);
            }
            if !wake() {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// Engine: the reservation to write now, if one is due (`reserved` = highest written).
    pub fn reservation_due(&self, reserved: u64) -> Option<u64> {
        let next = self.next.load(Ordering::Acquire);
        if next + self.block_ids / 2 > reserved {
            Some(reserved.max(next - 1) + self.block_ids)
        } else {
            None
        }
    }

    /// Writer: a reservation up to `up_to` is on disk.
    pub fn set_durable(&self, up_to: u64) {
        self.durable_limit.fetch_max(up_to, Ordering::AcqRel);
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_only_below_durable_reservation() {
        let ids = IdAllocator::new(10, 8);
        assert_eq!(ids.try_next(), None);
        assert_eq!(ids.reservation_due(10), Some(18));
        ids.set_durable(18);
        let got: Vec<u64> = std::iter::from_fn(|| ids.try_next()).collect();
        assert_eq!(got, (11..=18).collect::<Vec<_>>());
        assert_eq!(ids.reservation_due(18), Some(26));
    }

    #[test]
    fn reservation_ahead_of_need() {
        let ids = IdAllocator::new(0, 100);
        ids.set_durable(100);
        for _ in 0..40 {
            ids.try_next().unwrap();
        }
        assert_eq!(ids.reservation_due(100), None);
        for _ in 0..20 {
            ids.try_next().unwrap();
        }
        assert_eq!(ids.reservation_due(100), Some(200));
    }
}
