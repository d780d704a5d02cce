//! Failpoints: named places where a crash test can have the process killed with SIGKILL.
//!
//! Built only with the cargo feature `failpoints`, which only the tests turn on (the package
//! is its own dev-dependency with that feature, see Cargo.toml): a release build has no
//! failpoint at all, and `REWARDPOOL_FAILPOINT` means nothing to it. With the feature,
//! `REWARDPOOL_FAILPOINT=name` (or `name:N`, the N-th time that point is reached, 1-based)
//! makes `failpoint(name)` send SIGKILL to this process — a real kill at a chosen point, not a
//! simulated error. Unset, a failpoint costs one load of a `OnceLock`.

/// Whether this build carries failpoints (tests check that the binary they run does).
pub const ENABLED: bool = cfg!(feature = "failpoints");

#[cfg(feature = "failpoints")]
mod armed {
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
}

/// Kills the process with SIGKILL if this failpoint is armed and due (feature `failpoints`).
#[cfg(feature = "failpoints")]
#[inline]
pub fn failpoint(name: &str) {
    armed::failpoint(name);
}

/// Without the feature a failpoint is nothing at all.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn failpoint(_name: &str) {}

#[cfg(test)]
mod tests {
    /// The test build must carry failpoints (the crash tests depend on it), and `ENABLED` must
    /// follow the feature: that coupling is what keeps them out of release builds.
    #[test]
    #[allow(clippy::assertions_on_constants)] // constant per build: that is what is checked
    fn failpoints_follow_the_feature_and_tests_have_them() {
        assert_eq!(super::ENABLED, cfg!(feature = "failpoints"));
        assert!(
            super::ENABLED,
            "tests must build with the `failpoints` feature (Cargo.toml dev-dependency)"
        );
    }
}
