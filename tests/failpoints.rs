//! The binary the integration tests run carries the test-only failpoints (cargo feature
//! `failpoints`, turned on by the package's dev-dependency on itself); a release build does not
//! (src/failpoint.rs; checked by hand with `cargo build --release`, see README "Security").

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

#[test]
fn the_test_binary_has_failpoints_and_they_kill_with_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    // Recovery seeds a fresh data directory before any broker is contacted: the failpoint
    // right after the seed is reached without RabbitMQ.
    let out = Command::new(env!("CARGO_BIN_EXE_rewardpool"))
        .args(["run", "--data-dir"])
        .arg(tmp.path().join("data"))
        .env("REWARDPOOL_FAILPOINT", "recovery.after_seed")
        .env(
            "REWARDPOOL__AMQP__URL",
            "amqp://guest:guest@127.0.0.1:1/%2f",
        )
        // Not about metrics: the built-in 127.0.0.1:9464 belongs to the one test that runs on
        // the whole built-in config (amqp_startup), which may run beside this one.
        .env("REWARDPOOL__METRICS__LISTEN", "")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "the failpoint should have killed the worker: {:?}\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("failpoint recovery.after_seed: SIGKILL"),
        "{stderr}"
    );
}
