//! Which deliveries to ack, and how: `multiple=true` up to the lowest unsettled tag.
//!
//! Delivery tags on one channel are dense and start at 1. The tracker knows the `floor`: every
//! tag at or below it is settled. When results are confirmed, their tags become ready; the floor
//! then moves over every ready or already-settled tag, and one `basic.ack(multiple=true)` for
//! the highest ready tag passed settles them all. Ready tags above a gap (a tag still in
//! flight) are acked one by one and remembered as settled, so no tag is ever acked twice — a
//! double ack makes the broker close the channel. A tracker belongs to one channel: after a
//! reconnect the session and its tracker are new, and old tags are never acked.

use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Settle {
    /// Results confirmed: ack it.
    Ready,
    /// Already settled on the broker (rejected, nacked, or acked one by one).
    Done,
}

#[derive(Debug, Default)]
pub struct AckTracker {
    floor: u64,
    pending: BTreeMap<u64, Settle>,
}

/// What to send to the broker.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AckPlan {
    /// `basic.ack(tag, multiple=true)`.
    pub multiple_up_to: Option<u64>,
    /// `basic.ack(tag, multiple=false)` each.
    pub single: Vec<u64>,
}

impl AckTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The tag was settled individually (reject or nack already sent).
    pub fn settled(&mut self, tag: u64) {
        assert!(tag > self.floor, "tag {tag} settled twice");
        let previous = self.pending.insert(tag, Settle::Done);
        assert!(previous.is_none(), "tag {tag} settled twice");
    }

    /// The tag's results are confirmed: it may be acked.
    pub fn ready(&mut self, tag: u64) {
        assert!(tag > self.floor, "tag {tag} acked twice");
        let previous = self.pending.insert(tag, Settle::Ready);
        assert!(previous.is_none(), "tag {tag} acked twice");
    }

    /// The acks to send now. The caller must send them (or lose the session).
    pub fn plan(&mut self) -> AckPlan {
        let mut plan = AckPlan::default();
        while let Some(settle) = self.pending.remove(&(self.floor + 1)) {
            self.floor += 1;
            if settle == Settle::Ready {
                plan.multiple_up_to = Some(self.floor);
            }
        }
        for (tag, settle) in self.pending.iter_mut() {
            if *settle == Settle::Ready {
                plan.single.push(*tag);
                *settle = Settle::Done;
            }
        }
        plan
    }

    /// Every tag at or below this is settled.
    pub fn floor(&self) -> u64 {
        self.floor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_ready_tags_become_one_multiple_ack() {
        let mut t = AckTracker::new();
        for tag in 1..=5 {
            t.ready(tag);
        }
        assert_eq!(
            t.plan(),
            AckPlan {
                multiple_up_to: Some(5),
                single: vec![]
            }
        );
        assert_eq!(t.floor(), 5);
    }

    #[test]
    fn a_gap_stops_the_multiple_ack_and_later_tags_go_one_by_one() {
        let mut t = AckTracker::new();
        t.ready(1);
        t.settled(2); // rejected
        t.ready(3);
        t.ready(5); // 4 still in flight
        t.ready(6);
        assert_eq!(
            t.plan(),
            AckPlan {
                multiple_up_to: Some(3),
                single: vec![5, 6]
            }
        );
        t.ready(4);
        // 5 and 6 were acked one by one: the multiple ack stops at 4 and nothing repeats.
        assert_eq!(
            t.plan(),
            AckPlan {
                multiple_up_to: Some(4),
                single: vec![]
            }
        );
        assert_eq!(t.floor(), 6);
    }

    #[test]
    fn only_settled_tags_send_nothing() {
        let mut t = AckTracker::new();
        t.settled(1);
        t.settled(2);
        assert_eq!(t.plan(), AckPlan::default());
        assert_eq!(t.floor(), 2);
    }

    #[test]
    #[should_panic(expected = "twice")]
    fn double_ack_is_a_bug() {
        let mut t = AckTracker::new();
        t.ready(1);
        let _ = t.plan();
        t.ready(1);
    }
}
