//! Failpoints: named places where a crash test can have the process killed with SIGKILL.
//!
//! `REWARDPOOL_FAILPOINT=name` (or `name:N`, the N-th time that point is reached, 1-based)
//! makes `failpoint(name)` send SIGKILL to this process — a real kill at a chosen point, not a
//! simulated error. Unset, a failpoint costs one load of a `OnceLock`. The variable is for
//! tests; it is documented in the README as such.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Armed {
    name: String,
    nth: u64,
    hits: AtomicU64,
}

fn armed() -> &'static Option<Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let spec = std::env::var("REWARDPOOL_FAILPOINT").ok()?;
        let (name, nth) = match spec.split_once(':') {
            Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
            None => (spec, 1),
        };
        Some(Armed {
            name,
            nth: nth.max(1),
            hits: AtomicU64::new(0),
        })
    })
}

/// Kills the process with SIGKILL if this failpoint is armed and due.
pub fn failpoint(name: &str) {
    if let Some(armed) = armed()
        && armed.name == name
        && armed.hits.fetch_add(1, Ordering::SeqCst) + 1 == armed.nth
    {
        eprintln!("failpoint {name}: SIGKILL");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        // SIGKILL cannot be caught; never continue past an armed failpoint.
        std::process::abort();
    }
}
