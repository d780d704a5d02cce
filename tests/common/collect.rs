//! Consumers that record what the worker published (results, replies) and the checks over
//! them: every result against the contract, one outcome per `message_id`, one request per ID.
//! Also the "stream" of the broker tests: numbered requests and what each must get.

use crate::broker::{
    OP_TIMEOUT, Producer, nanos, op, request_props, require_broker, try_connect, wait_until,
};
use crate::config::{PoolSpec, Setup};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A message as a consumer saw it.
#[derive(Clone, Debug)]
pub struct Msg {
    pub props: BasicProperties,
    pub body: Vec<u8>,
    pub redelivered: bool,
}

impl Msg {
    pub fn kind(&self) -> Option<&str> {
        self.props.kind().as_ref().map(|s| s.as_str())
    }
    pub fn correlation_id(&self) -> Option<&str> {
        self.props.correlation_id().as_ref().map(|s| s.as_str())
    }
    pub fn message_id(&self) -> Option<&str> {
        self.props.message_id().as_ref().map(|s| s.as_str())
    }
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name))
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "message body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn is_barrier(&self) -> bool {
        self.kind() == Some(BARRIER)
    }
}

/// An AMQP integer header value as i64.
pub fn amqp_int(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(x) => *x as i64,
        AMQPValue::ShortShortUInt(x) => *x as i64,
        AMQPValue::ShortInt(x) => *x as i64,
        AMQPValue::ShortUInt(x) => *x as i64,
        AMQPValue::LongInt(x) => *x as i64,
        AMQPValue::LongUInt(x) => *x as i64,
        AMQPValue::LongLongInt(x) => *x,
        _ => return None,
    })
}

const BARRIER: &str = "rpt-barrier";

/// Records every message of a queue, in arrival order, acking each after recording it.
pub struct Collector {
    pub queue: String,
    msgs: Arc<Mutex<Vec<Msg>>>,
    task: tokio::task::JoinHandle<()>,
}

async fn open_consumer(
    conn: &Connection,
    queue: &str,
    declare_exclusive: bool,
) -> lapin::Result<(Channel, lapin::Consumer)> {
    let ch = conn.create_channel().await?;
    if declare_exclusive {
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    }
    ch.basic_qos(1000, BasicQosOptions::default()).await?;
    let consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((ch, consumer))
}

async fn drain(consumer: &mut lapin::Consumer, msgs: &Mutex<Vec<Msg>>) {
    while let Some(Ok(d)) = consumer.next().await {
        msgs.lock().unwrap().push(Msg {
            props: d.properties.clone(),
            body: d.data.clone(),
            redelivered: d.redelivered,
        });
        if !matches!(d.acker.ack(BasicAckOptions::default()).await, Ok(true)) {
            break;
        }
    }
}

impl Collector {
    /// Consumes an existing durable queue on its own connection; reconnects after a lost
    /// connection (redelivered messages are then recorded again).
    pub async fn start(queue: &str) -> Collector {
        let conn = require_broker().await;
        let (ch, mut consumer) = op("collector consume", open_consumer(&conn, queue, false)).await;
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let msgs = msgs.clone();
            let queue = queue.to_string();
            tokio::spawn(async move {
                let mut _keep = (conn, ch);
                loop {
                    drain(&mut consumer, &msgs).await;
                    // Lost: reconnect until it works (the test's own waits bound the time).
                    loop {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let Ok(conn) = try_connect("rewardpool test collector").await else {
                            continue;
                        };
                        let opened =
                            tokio::time::timeout(OP_TIMEOUT, open_consumer(&conn, &queue, false))
                                .await;
                        if let Ok(Ok((ch, c))) = opened {
                            consumer = c;
                            _keep = (conn, ch);
                            break;
                        }
                    }
                }
            })
        };
        Collector {
            queue: queue.to_string(),
            msgs,
            task,
        }
    }

    /// Declares an exclusive, auto-delete reply queue named `queue` on its own connection and
    /// consumes it. No reconnect: the queue dies with its connection.
    pub async fn reply_queue(queue: &str) -> Collector {
        let conn = require_broker().await;
        let (ch, mut consumer) = op("reply queue consume", open_consumer(&conn, queue, true)).await;
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let msgs = msgs.clone();
            tokio::spawn(async move {
                let _keep = (conn, ch);
                drain(&mut consumer, &msgs).await;
                std::future::pending::<()>().await;
            })
        };
        Collector {
            queue: queue.to_string(),
            msgs,
            task,
        }
    }

    /// A copy of every message seen so far, barrier markers left out.
    pub fn messages(&self) -> Vec<Msg> {
        self.msgs
            .lock()
            .unwrap()
            .iter()
            .filter(|m| !m.is_barrier())
            .cloned()
            .collect()
    }

    /// Evaluates `f` over every message seen so far (barrier markers included).
    pub fn with<R>(&self, f: impl FnOnce(&[Msg]) -> R) -> R {
        f(&self.msgs.lock().unwrap())
    }

    pub fn count_kind(&self, kind: &str) -> usize {
        self.with(|m| m.iter().filter(|m| m.kind() == Some(kind)).count())
    }

    /// Polls until `pred` holds over the messages seen so far.
    pub async fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&[Msg]) -> bool) {
        wait_until(
            &format!("{what} (on {})", self.queue),
            timeout,
            async || self.with(&pred),
        )
        .await;
    }

    /// Publishes a marker to the queue and waits until it comes back: every message that was
    /// in the queue before it has then been recorded (one consumer, FIFO).
    pub async fn barrier(&self, conn: &Connection) {
        let marker = format!("barrier-{}", nanos());
        let mut p = Producer::new(conn).await;
        p.publish(
            &self.queue,
            b"{}",
            BasicProperties::default()
                .with_type(BARRIER.into())
                .with_message_id(marker.as_str().into()),
        )
        .await;
        p.flush().await;
        self.wait_for("the barrier marker", Duration::from_secs(60), |m| {
            m.iter()
                .rev()
                .any(|m| m.is_barrier() && m.message_id() == Some(marker.as_str()))
        })
        .await;
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A draw outcome as a result message carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub request_id: u64,
    pub status: String,
    pub pool: String,
    pub user: String,
    pub count: u64,
    pub items: Vec<String>,
}

/// Checks one result message against the contract; returns its body's `message_id` (if any)
/// and outcome.
pub fn parse_result(m: &Msg) -> (Option<String>, Outcome) {
    assert_eq!(m.kind(), Some("result"), "result type property: {m:?}");
    let v = m.json();
    let request_id = v["request_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("result without request_id: {v}"));
    assert!(request_id > 0, "request IDs are positive: {v}");
    assert_eq!(
        m.message_id(),
        Some(request_id.to_string().as_str()),
        "a result's message_id property is its request ID in decimal: {v}"
    );
    let header = m
        .header("request_id")
        .and_then(amqp_int)
        .unwrap_or_else(|| panic!("result without integer header request_id: {m:?}"));
    assert_eq!(header, request_id as i64, "header request_id: {v}");
    let items: Vec<String> = v["items"]
        .as_array()
        .unwrap_or_else(|| panic!("result items must be an array: {v}"))
        .iter()
        .map(|i| i.as_str().expect("items are strings").to_string())
        .collect();
    let status = v["status"].as_str().expect("status").to_string();
    match status.as_str() {
        "won" => assert!(!items.is_empty(), "won with no items: {v}"),
        "empty" => assert!(items.is_empty(), "empty with items: {v}"),
        "closed" => assert!(items.is_empty(), "closed with items: {v}"),
        other => panic!("unknown result status {other}: {v}"),
    }
    let count = v["count"].as_u64().expect("count");
    assert!(items.len() as u64 <= count, "more items than count: {v}");
    let outcome = Outcome {
        request_id,
        status,
        pool: v["pool"].as_str().expect("pool").to_string(),
        user: v["user"].as_str().expect("user").to_string(),
        count,
        items,
    };
    (v["message_id"].as_str().map(str::to_string), outcome)
}

/// Checks every result message and returns, per `message_id`, the one outcome all of that
/// message's results agree on. Fails if two results of one `message_id` differ (drawn twice),
/// or two `message_id`s share a request ID (an ID given to two requests).
pub fn distinct_results(msgs: &[Msg]) -> BTreeMap<String, Outcome> {
    let mut by_message: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut by_id: HashMap<u64, String> = HashMap::new();
    for m in msgs.iter().filter(|m| !m.is_barrier()) {
        let (message_id, outcome) = parse_result(m);
        let message_id = message_id.expect("these tests always set message_id");
        if let Some(prev) = by_id.insert(outcome.request_id, message_id.clone()) {
            assert_eq!(
                prev, message_id,
                "request ID {} given to two requests",
                outcome.request_id
            );
        }
        match by_message.get(&message_id) {
            Some(first) => assert_eq!(
                first, &outcome,
                "message_id {message_id} has two different results (drawn twice?)"
            ),
            None => {
                by_message.insert(message_id, outcome);
            }
        }
    }
    by_message
}

/// Request IDs from `accepted` replies, checking each ID went to one `correlation_id` only.
/// Returns correlation_id → IDs in arrival order.
pub fn accepted_ids(msgs: &[Msg]) -> HashMap<String, Vec<u64>> {
    let mut by_corr: HashMap<String, Vec<u64>> = HashMap::new();
    let mut by_id: HashMap<u64, String> = HashMap::new();
    for m in msgs.iter().filter(|m| m.kind() == Some("accepted")) {
        let v = m.json();
        assert_eq!(v["status"], "accepted", "accepted body: {v}");
        let id = v["request_id"].as_u64().expect("accepted request_id");
        assert!(id > 0);
        let corr = m
            .correlation_id()
            .expect("correlation_id echoed")
            .to_string();
        if let Some(prev) = by_id.insert(id, corr.clone()) {
            assert_eq!(prev, corr, "request ID {id} handed to two requests");
        }
        by_corr.entry(corr).or_default().push(id);
    }
    by_corr
}

/// The pools of the stream tests: a big one that never runs short and a small one that runs
/// out (so `empty` results appear).
pub fn stream_pools() -> Vec<PoolSpec> {
    vec![
        PoolSpec::new(
            "default",
            &[("gold", 100), ("silver", 1000), ("bronze", 1_000_000)],
        ),
        PoolSpec::new("tiny", &[("gem", 30), ("pearl", 20)]),
    ]
}

/// Body of request `i` of a stream: `message_id` `m-<i>`, `correlation_id` `c-<i>`.
pub fn stream_body(i: usize) -> String {
    let pool = if i.is_multiple_of(10) {
        "tiny"
    } else {
        "default"
    };
    format!(r#"{{"pool":"{pool}","user":"u{i}","count":{}}}"#, 1 + i % 3)
}

/// Publishes requests `range` of a stream (persistent, with confirms).
pub async fn publish_stream(
    producer: &mut Producer,
    queue: &str,
    reply_to: Option<&str>,
    range: std::ops::Range<usize>,
) {
    for i in range {
        producer
            .publish(
                queue,
                stream_body(i).as_bytes(),
                request_props(Some(&format!("m-{i}")), reply_to, Some(&format!("c-{i}"))),
            )
            .await;
    }
    producer.flush().await;
}

/// How many distinct requests (body `message_id`) have a result among `msgs`.
pub fn distinct_count(msgs: &[Msg]) -> usize {
    let mut seen = std::collections::HashSet::new();
    for m in msgs.iter().filter(|m| m.kind() == Some("result")) {
        if let Ok(v) = serde_json::from_slice::<Value>(&m.body)
            && let Some(id) = v["message_id"].as_str()
        {
            seen.insert(id.to_string());
        }
    }
    seen.len()
}

/// Checks the stream's outcomes against what each request `0..n` asked for, and that a
/// result exists for each.
pub fn check_stream_outcomes(outcomes: &BTreeMap<String, Outcome>, n: usize) {
    assert_eq!(outcomes.len(), n, "one distinct result per request");
    for i in 0..n {
        let o = outcomes
            .get(&format!("m-{i}"))
            .unwrap_or_else(|| panic!("request m-{i} has no result"));
        let pool = if i.is_multiple_of(10) {
            "tiny"
        } else {
            "default"
        };
        assert_eq!(
            (o.pool.as_str(), o.user.as_str(), o.count),
            (pool, format!("u{i}").as_str(), 1 + (i % 3) as u64),
            "m-{i}"
        );
        if pool == "default" {
            assert_eq!(o.items.len() as u64, o.count, "m-{i}: {o:?}");
        }
    }
}

impl Setup {
    /// Checks the pools are conserved: for every configured item, the initial quantity equals
    /// what `inspect` shows as remaining plus the units issued in `outcomes` (one outcome per
    /// drawn request). Returns the `inspect` output.
    pub fn check_conservation<'a>(&self, outcomes: impl IntoIterator<Item = &'a Outcome>) -> Value {
        let inspect = self.inspect();
        let mut issued: HashMap<(String, String), u64> = HashMap::new();
        for o in outcomes {
            for item in &o.items {
                *issued.entry((o.pool.clone(), item.clone())).or_default() += 1;
            }
        }
        let pools = inspect["pools"].as_array().expect("inspect: pools array");
        for spec in &self.config.pools {
            let pool = pools
                .iter()
                .find(|p| p["id"] == spec.id.as_str())
                .unwrap_or_else(|| panic!("inspect shows no pool {}: {inspect}", spec.id));
            let items = pool["items"].as_array().expect("inspect: items array");
            let ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
            let want: Vec<&str> = spec.items.iter().map(|(i, _)| i.as_str()).collect();
            assert_eq!(ids, want, "inspect keeps the config's item order");
            for (id, initial) in &spec.items {
                let remaining = items
                    .iter()
                    .find(|i| i["id"] == id.as_str())
                    .and_then(|i| i["quantity"].as_u64())
                    .unwrap_or_else(|| panic!("inspect: no quantity for {}/{id}", spec.id));
                let given = issued
                    .remove(&(spec.id.clone(), id.clone()))
                    .unwrap_or_default();
                assert_eq!(
                    initial - remaining.min(*initial),
                    given,
                    "pool {}, item {id}: initial {initial}, remaining {remaining}, but the results issued {given}",
                    spec.id
                );
                assert!(remaining <= *initial, "pool {}/{id} grew", spec.id);
            }
        }
        assert!(
            issued.is_empty(),
            "results issued items no pool has: {issued:?}"
        );
        inspect
    }
}
