//! Bad configuration through the real binary: every validation rule of the contract gives a
//! non-zero exit and an error on stderr that says what is wrong and where (file, key, line).

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
fn every_validation_rule_is_a_clear_error_with_a_non_zero_exit() {
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
            "duplicate item id",
            r#"[[pools]]
id = "p"
mode = "by_quantity"
items = [ { id = "a", quantity = 1 }, { id = "a", quantity = 2 } ]
"#
            .into(),
            vec!["duplicate item id", "pools[0].items[1]", "FILE"],
        ),
        (
            "zero weight",
            r#"[[pools]]
id = "spin"
mode = "by_weight"
items = [ { id = "a", weight = 0 } ]
"#
            .into(),
            vec![
                "weight",
                "greater than 0",
                "pools[0].items[0].weight",
                "line 4",
            ],
        ),
        (
            "negative weight",
            r#"[[pools]]
id = "spin"
mode = "by_weight"
items = [ { id = "a", weight = -3 } ]
"#
            .into(),
            vec!["weight", "-3"],
        ),
        (
            "by_weight item without weight",
            r#"[[pools]]
id = "spin"
mode = "by_weight"
items = [ { id = "a", quantity = 3 } ]
"#
            .into(),
            vec!["missing weight", "pools[0].items[0]"],
        ),
        (
            "weight on a by_quantity item",
            r#"[[pools]]
id = "p"
mode = "by_quantity"
items = [ { id = "a", quantity = 3, weight = 2 } ]
"#
            .into(),
            vec!["weight is not allowed", "by_quantity"],
        ),
        (
            "unlimited item in a by_quantity pool",
            r#"[[pools]]
id = "p"
mode = "by_quantity"
items = [ { id = "a" } ]
"#
            .into(),
            vec!["unlimited", "by_weight", "pools[0].items[0].quantity"],
        ),
        (
            "negative quantity",
            r#"[[pools]]
id = "p"
mode = "by_quantity"
items = [ { id = "a", quantity = -1 } ]
"#
            .into(),
            vec!["negative", "-1", "pools[0].items[0].quantity"],
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
