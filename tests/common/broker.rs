//! The broker side of the tests: its URL, connecting (or failing with how to start it), fresh
//! queue names, queue state, publishing with confirms, `rabbitmqctl`, bounded waits.
//!
//! Every test gets fresh queue names (a quorum queue name is never reused: deleting one and
//! declaring the same name again crashed this broker's quorum log writer). Every wait is
//! bounded and polls a condition; no sleep stands in for a correctness assumption.

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How to start the broker, for the error a test gives when it is down.
pub const START_BROKER: &str = "rabbitmq-server -detached && rabbitmqctl await_startup";

/// Bound on any single broker call made by a test.
pub const OP_TIMEOUT: Duration = Duration::from_secs(15);

pub fn amqp_url() -> String {
    std::env::var("REWARDPOOL_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// Runs a broker call with [`OP_TIMEOUT`]; panics (naming `what`) on timeout or error.
pub async fn op<T>(what: &str, fut: impl Future<Output = lapin::Result<T>>) -> T {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Err(_) => panic!("broker call {what} timed out after {OP_TIMEOUT:?}"),
        Ok(Err(e)) => panic!("broker call {what} failed: {e}"),
        Ok(Ok(v)) => v,
    }
}

pub async fn try_connect(name: &str) -> Result<Connection, String> {
    try_connect_url(&amqp_url(), name).await
}

/// Connects to `url` (e.g. as another broker user) with a bounded wait.
pub async fn try_connect_url(url: &str, name: &str) -> Result<Connection, String> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(Duration::from_secs(5), Connection::connect(url, props)).await {
        Err(_) => Err("connect timed out after 5 s".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(c)) => Ok(c),
    }
}

/// Connects to the broker, or fails the test with how to start it.
pub async fn require_broker() -> Connection {
    match try_connect("rewardpool test").await {
        Ok(c) => c,
        Err(e) => panic!(
            "RabbitMQ is not reachable at {} ({e}). These tests need a running broker; start it with: {START_BROKER}",
            redact(&amqp_url())
        ),
    }
}

/// Connects, retrying (the broker may be restarting) until `timeout`.
pub async fn connect_retrying(name: &str, timeout: Duration) -> Connection {
    let deadline = Instant::now() + timeout;
    loop {
        match try_connect(name).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => {
                panic!("cannot reconnect to the broker within {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

pub(crate) fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
}

/// Fresh, never reused broker object names for one test.
#[derive(Clone, Debug)]
pub struct Names {
    pub base: String,
    pub request: String,
    pub result: String,
    pub dead: String,
    /// The admin queue (`amqp.admin_queue`): fresh per test like the others, since every
    /// worker declares and consumes it.
    pub admin: String,
}

impl Names {
    pub fn new(test: &str) -> Names {
        let base = format!("rpt.{test}.{}.{}", std::process::id(), nanos());
        Names {
            request: format!("{base}.requests"),
            result: format!("{base}.results"),
            dead: format!("{base}.dead"),
            admin: format!("{base}.admin"),
            base,
        }
    }

    /// The dead-letter exchange the worker derives from the request queue's name.
    pub fn dlx(&self) -> String {
        format!("{}.dlx", self.request)
    }

    /// A name for a test's own (reply) queue.
    pub fn extra(&self, tag: &str) -> String {
        format!("{}.{tag}", self.base)
    }

    /// Deletes the test's queues and exchange (best effort, at the end of a passing test).
    /// Safe for quorum queues: these names are never declared again.
    pub async fn delete(&self, conn: &Connection) {
        let Ok(Ok(ch)) = tokio::time::timeout(OP_TIMEOUT, conn.create_channel()).await else {
            return;
        };
        for q in [&self.request, &self.result, &self.dead, &self.admin] {
            let _ = tokio::time::timeout(
                OP_TIMEOUT,
                ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
            )
            .await;
        }
        let _ = tokio::time::timeout(
            OP_TIMEOUT,
            ch.exchange_delete(self.dlx().as_str().into(), ExchangeDeleteOptions::default()),
        )
        .await;
        let _ = tokio::time::timeout(OP_TIMEOUT, ch.close(200, "done".into())).await;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueState {
    pub messages: u32,
    pub consumers: u32,
}

/// Passive declare on a fresh channel: `None` when the queue does not exist (or the broker
/// is unreachable).
pub async fn queue_state(conn: &Connection, queue: &str) -> Option<QueueState> {
    let ch = tokio::time::timeout(OP_TIMEOUT, conn.create_channel())
        .await
        .ok()?
        .ok()?;
    let declared = tokio::time::timeout(
        OP_TIMEOUT,
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .ok()?;
    match declared {
        Ok(q) => {
            let _ = tokio::time::timeout(OP_TIMEOUT, ch.close(200, "ok".into())).await;
            Some(QueueState {
                messages: q.message_count(),
                consumers: q.consumer_count(),
            })
        }
        Err(_) => None,
    }
}

/// Like [`queue_state`], for queues that must exist.
pub async fn must_queue_state(conn: &Connection, queue: &str) -> QueueState {
    queue_state(conn, queue)
        .await
        .unwrap_or_else(|| panic!("queue {queue} does not exist"))
}

/// Polls `check` every 50 ms until it holds; fails the test naming `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After the worker stopped: the queue holds nothing, and a fresh consumer gets nothing.
pub async fn assert_queue_drained(conn: &Connection, queue: &str) {
    let q = must_queue_state(conn, queue).await;
    assert_eq!(q.messages, 0, "{queue} still holds {} messages", q.messages);
    let ch = op("channel.open", conn.create_channel()).await;
    let got = op(
        "basic.get",
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }),
    )
    .await;
    assert!(
        got.is_none(),
        "{queue}: a fresh consumer still got a message: {:?}",
        got.map(|m| String::from_utf8_lossy(&m.delivery.data).into_owned())
    );
    let _ = tokio::time::timeout(OP_TIMEOUT, ch.close(200, "ok".into())).await;
}

/// Publishes with confirms, many in flight.
pub struct Producer {
    pub ch: Channel,
    confirms: FuturesUnordered<PublisherConfirm>,
}

impl Producer {
    pub async fn new(conn: &Connection) -> Producer {
        let ch = op("channel.open", conn.create_channel()).await;
        op(
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await;
        Producer {
            ch,
            confirms: FuturesUnordered::new(),
        }
    }

    /// Publishes to the default exchange with routing key `queue`.
    pub async fn publish(&mut self, queue: &str, body: &[u8], props: BasicProperties) {
        while self.confirms.len() >= 2000 {
            self.next_confirm().await;
        }
        let confirm = op(
            "basic.publish",
            self.ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                body,
                props,
            ),
        )
        .await;
        self.confirms.push(confirm);
    }

    async fn next_confirm(&mut self) {
        match tokio::time::timeout(OP_TIMEOUT, self.confirms.next()).await {
            Err(_) => panic!("publisher confirm timed out"),
            Ok(None) => {}
            Ok(Some(Err(e))) => panic!("publisher confirm failed: {e}"),
            Ok(Some(Ok(c))) => assert!(c.is_ack(), "the broker nacked a test publish"),
        }
    }

    /// Waits for every outstanding confirm.
    pub async fn flush(&mut self) {
        while !self.confirms.is_empty() {
            self.next_confirm().await;
        }
    }
}

/// Properties of a request: persistent, JSON, with the given `message_id`, `reply_to` and
/// `correlation_id`.
pub fn request_props(
    message_id: Option<&str>,
    reply_to: Option<&str>,
    correlation_id: Option<&str>,
) -> BasicProperties {
    let mut p = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    if let Some(m) = message_id {
        p = p.with_message_id(ShortString::from(m));
    }
    if let Some(r) = reply_to {
        p = p.with_reply_to(ShortString::from(r));
    }
    if let Some(c) = correlation_id {
        p = p.with_correlation_id(ShortString::from(c));
    }
    p
}

/// `rabbitmqctl` (bounded: 120 s), failing the test on a non-zero exit.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let child = Command::new("rabbitmqctl")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rabbitmqctl");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.expect("rabbitmqctl output"),
        Err(_) => {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("rabbitmqctl {args:?} did not finish within 120 s");
        }
    };
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Closes the one broker connection whose client-provided name is `name` (a test's own worker:
/// `rewardpool worker <pid>`), through `rabbitmqctl`: a lost session for that worker only.
pub fn close_connection_named(name: &str, reason: &str) {
    let text = rabbitmqctl(&["-q", "list_connections", "pid", "client_properties"]);
    let pid = text
        .lines()
        .find_map(|l| {
            let end = l.find('>')?;
            l.contains(&format!("{{\"connection_name\",\"{name}\"}}"))
                .then(|| l[..=end].trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no connection named {name:?} in {text}"));
    rabbitmqctl(&["-q", "close_connection", &pid, reason]);
}

/// Logs progress of a long test to stderr (shown by nextest on failure).
pub fn note(msg: impl AsRef<str>) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed();
    eprintln!("[+{:.3}s] {}", t.as_secs_f64(), msg.as_ref());
}
