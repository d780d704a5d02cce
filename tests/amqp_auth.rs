//! Wrong credentials: the broker refuses the login (ACCESS_REFUSED); the worker logs an ERROR
//! that says the credentials were refused (never the password), backs off and keeps trying.

use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_an_error_naming_the_credentials() {
    let _conn = require_broker().await;
    let setup = Setup::new(
        "auth",
        WorkerConfig::new(QueueType::Classic, stream_pools()),
    );
    let url = "amqp://guest:not-the-password-7f3a@127.0.0.1:5672/%2f";
    let mut worker = setup.start_worker(&[("REWARDPOOL__AMQP__URL", url)]);
    wait_until("two refused logins", Duration::from_secs(60), async || {
        worker.log().matches("refused the credentials").count() >= 2
    })
    .await;
    worker.assert_running();
    let log = worker.log();
    let line = log
        .lines()
        .find(|l| l.contains("refused the credentials"))
        .unwrap();
    assert!(
        line.contains("ERROR") && line.contains("ACCESS_REFUSED"),
        "{line}"
    );
    assert!(
        !log.contains("not-the-password-7f3a"),
        "the password leaked:\n{log}"
    );
    note(format!("wrong password: {line}"));
    worker.kill().await;
}
