//! Bad configuration through the real binary: what only the command line shows — the non-zero
//! exit, the message on stderr naming the file, key and line, environment variable names, a
//! missing file, no password in the output. One case per *shape* of error (a whole-file rule,
//! a rule on one key with its line, an unknown key, a syntax error, a bad enum value); every
//! validation rule itself is a unit test in `src/config.rs`.

use std::process::Command;

fn run_with(config: &str, env: &[(&str, &str)]) -> (bool, String) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rewardpool"));
    cmd.args(["inspect", "--config"])
        .arg(&path)
        .args(["--data-dir"])
        .arg(tmp.path().join("data"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (
        out.status.success(),
        stderr.replace(&path.display().to_string(), "FILE"),
    )
}

const OK_POOL: &str = r#"
[[pools]]
id = "default"
mode = "by_quantity"
items = [ { id = "gold", quantity = 10 } ]
"#;

#[test]
fn each_error_shape_is_a_clear_error_with_a_non_zero_exit() {
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "no pools",
            "[storage]\ndedupe_window = 10\n".into(),
            vec!["no pools", "FILE"],
        ),
        (
            "duplicate pool id",
            format!("{OK_POOL}{OK_POOL}"),
            vec!["duplicate pool id", "\"default\"", "pools[1]", "line"],
        ),
        (
            "unknown key",
            format!("[amqp]\nprefetchh = 5\n{OK_POOL}"),
            vec!["unknown", "amqp.prefetchh", "FILE"],
        ),
        (
            "TOML syntax",
            format!("[amqp\n{OK_POOL}"),
            vec!["line 1", "FILE"],
        ),
        (
            "bad queue type",
            format!("[amqp]\nqueue_type = \"stream\"\n{OK_POOL}"),
            vec!["queue_type", "quorum", "classic"],
        ),
    ];
    for (what, text, wants) in cases {
        let (ok, stderr) = run_with(&text, &[]);
        assert!(!ok, "{what}: must fail");
        for want in wants {
            assert!(
                stderr.contains(want),
                "{what}: stderr lacks {want:?}:\n{stderr}"
            );
        }
    }
}

#[test]
fn quantity_zero_is_allowed() {
    let (ok, stderr) = run_with(
        "[[pools]]\nid = \"p\"\nmode = \"by_quantity\"\nitems = [ { id = \"a\", quantity = 0 } ]\n",
        &[],
    );
    assert!(ok, "{stderr}");
}

#[test]
fn unknown_environment_key_is_an_error_naming_the_variable() {
    let (ok, stderr) = run_with(OK_POOL, &[("REWARDPOOL__AMQP__BOGUS", "1")]);
    assert!(!ok);
    assert!(stderr.contains("REWARDPOOL__AMQP__BOGUS"), "{stderr}");
}

#[test]
fn a_missing_config_file_is_an_error_naming_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_rewardpool"))
        .args(["inspect", "--config", "/nonexistent/rewardpool.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/rewardpool.toml"));
}

#[test]
fn the_password_never_reaches_stderr() {
    let (ok, stderr) = run_with(
        &format!("[amqp]\nurl = \"http://user:s3cret@host/\"\n{OK_POOL}"),
        &[],
    );
    assert!(!ok);
    assert!(!stderr.contains("s3cret"), "{stderr}");
}
