//! Shared helpers of the broker integration tests (`tests/amqp_*.rs`).
//!
//! The worker is always driven as a real process (`rewardpool run --config <file>`); the tests
//! talk to it only through RabbitMQ (lapin) and the command line, as producers, result
//! consumers and operators would. Every test gets fresh queue names (a quorum queue name is
//! never reused: deleting one and declaring the same name again crashed this broker's quorum
//! log writer) and its own temporary data directory. Every wait is bounded and polls a
//! condition; no sleep stands in for a correctness assumption. A `Worker` guard SIGKILLs its
//! process when dropped, so a failing test leaves no stray worker behind, and prints the tail
//! of the worker's log when the test panicked.
#![allow(dead_code)]

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use serde_json::Value;
pub mod metrics;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How to start the broker, for the error a test gives when it is down.
pub const START_BROKER: &str = "rabbitmq-server -detached && rabbitmqctl await_startup";

/// The worker binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_rewardpool");

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
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(&amqp_url(), props),
    )
    .await
    {
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

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

fn nanos() -> u128 {
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
}

impl Names {
    pub fn new(test: &str) -> Names {
        let base = format!("rpt.{test}.{}.{}", std::process::id(), nanos());
        Names {
            request: format!("{base}.requests"),
            result: format!("{base}.results"),
            dead: format!("{base}.dead"),
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
        for q in [&self.request, &self.result, &self.dead] {
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

/// One `by_quantity` pool of the test config.
#[derive(Clone, Debug)]
pub struct PoolSpec {
    pub id: String,
    pub items: Vec<(String, u64)>,
}

impl PoolSpec {
    pub fn new(id: &str, items: &[(&str, u64)]) -> PoolSpec {
        PoolSpec {
            id: id.to_string(),
            items: items.iter().map(|(i, q)| (i.to_string(), *q)).collect(),
        }
    }

    pub fn total(&self) -> u64 {
        self.items.iter().map(|(_, q)| q).sum()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueType {
    Classic,
    Quorum,
}

/// What a test's config file says.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub queue_type: QueueType,
    /// `amqp.delivery_limit`; `None` keeps the built-in default (20).
    pub delivery_limit: Option<u32>,
    pub pools: Vec<PoolSpec>,
    /// Extra `key = value` lines for `[amqp]` and `[storage]`.
    pub amqp_extra: Vec<String>,
    pub storage_extra: Vec<String>,
}

impl WorkerConfig {
    pub fn new(queue_type: QueueType, pools: Vec<PoolSpec>) -> WorkerConfig {
        WorkerConfig {
            queue_type,
            delivery_limit: None,
            pools,
            amqp_extra: Vec::new(),
            storage_extra: Vec::new(),
        }
    }
}

/// One test's world: names, a temp dir holding the config file, the data dir and worker logs.
pub struct Setup {
    pub names: Names,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    pub config: WorkerConfig,
    logs: AtomicUsize,
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("string serialises")
}

impl Setup {
    pub fn new(test: &str, config: WorkerConfig) -> Setup {
        let names = Names::new(test);
        let dir = tempfile::Builder::new()
            .prefix(&format!("rpt-{test}-"))
            .tempdir()
            .expect("temp dir");
        let data_dir = dir.path().join("data");
        let config_path = dir.path().join("rewardpool.toml");
        let setup = Setup {
            names,
            config_path,
            data_dir,
            config,
            dir,
            logs: AtomicUsize::new(0),
        };
        std::fs::write(&setup.config_path, setup.render()).expect("write config");
        setup
    }

    pub fn render(&self) -> String {
        let c = &self.config;
        let n = &self.names;
        let mut t = String::new();
        t.push_str("[amqp]\n");
        t.push_str(&format!("url = {}\n", toml_str(&amqp_url())));
        t.push_str(&format!("request_queue = {}\n", toml_str(&n.request)));
        t.push_str(&format!("result_queue = {}\n", toml_str(&n.result)));
        t.push_str(&format!("dead_letter_queue = {}\n", toml_str(&n.dead)));
        t.push_str(&format!(
            "queue_type = {}\n",
            toml_str(match c.queue_type {
                QueueType::Classic => "classic",
                QueueType::Quorum => "quorum",
            })
        ));
        if let Some(limit) = c.delivery_limit {
            t.push_str(&format!("delivery_limit = {limit}\n"));
        }
        // Reconnect quickly: the disruption tests wait for the worker to come back.
        t.push_str("reconnect_backoff_min_ms = 50\nreconnect_backoff_max_ms = 1000\n");
        for line in &c.amqp_extra {
            t.push_str(line);
            t.push('\n');
        }
        t.push_str("\n[storage]\n");
        t.push_str(&format!(
            "data_dir = {}\n",
            toml_str(self.data_dir.to_str().expect("utf-8 temp path"))
        ));
        // Snapshots (and WAL pruning) happen during the tests, not only at shutdown.
        if !c
            .storage_extra
            .iter()
            .any(|l| l.starts_with("snapshot_every_records"))
        {
            t.push_str("snapshot_every_records = 2000\n");
        }
        for line in &c.storage_extra {
            t.push_str(line);
            t.push('\n');
        }
        // Two workers run at once: no metrics listener unless a test asks for one
        // (REWARDPOOL__METRICS__LISTEN overrides this).
        t.push_str("\n[metrics]\nlisten = \"\"\n");
        for p in &c.pools {
            t.push_str(&format!(
                "\n[[pools]]\nid = {}\nmode = \"by_quantity\"\nitems = [\n",
                toml_str(&p.id)
            ));
            for (id, q) in &p.items {
                t.push_str(&format!("  {{ id = {}, quantity = {q} }},\n", toml_str(id)));
            }
            t.push_str("]\n");
        }
        t
    }

    fn next_log(&self) -> PathBuf {
        let k = self.logs.fetch_add(1, Ordering::SeqCst);
        self.dir.path().join(format!("worker-{k}.log"))
    }

    /// Starts `rewardpool run --config <file>` with extra environment variables.
    pub fn start_worker(&self, env: &[(&str, &str)]) -> Worker {
        let args: Vec<OsString> = vec![
            "run".into(),
            "--config".into(),
            self.config_path.clone().into(),
        ];
        Worker::spawn(&args, None, env, self.next_log())
    }

    /// Starts the worker and waits until it consumes (fails if it exits first).
    pub async fn start_ready(&self, conn: &Connection, env: &[(&str, &str)]) -> Worker {
        let mut worker = self.start_worker(env);
        worker
            .wait_ready(conn, &self.names.request, Duration::from_secs(60))
            .await;
        worker
    }

    /// `rewardpool inspect --config <file>` as JSON.
    pub fn inspect(&self) -> Value {
        let out = cli(
            &["inspect", "--config", self.config_path.to_str().unwrap()],
            None,
            &[],
        );
        assert!(
            out.status.success(),
            "inspect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "inspect printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

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

    /// Every `draw` record `rewardpool wal dump` prints: (request_id, message_id).
    pub fn wal_draws(&self) -> Vec<(u64, String)> {
        let out = cli(
            &[
                "wal",
                "dump",
                "--config",
                self.config_path.to_str().unwrap(),
            ],
            None,
            &[],
        );
        assert!(
            out.status.success(),
            "wal dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut draws = Vec::new();
        for line in text.lines().filter(|l| l.contains(" draw ")) {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|w| w.strip_prefix(name))
                    .unwrap_or_else(|| panic!("wal dump line without {name}: {line}"))
            };
            let id: u64 = field("request_id=").parse().expect("request_id");
            let message_id = field("message_id=").trim_matches('"').to_string();
            draws.push((id, message_id));
        }
        draws
    }
}

/// The pools of the stream tests: a big one that never runs short and a small one that runs
/// out (so `empty` results appear).
pub fn stream_pools() -> Vec<PoolSpec> {
    vec![
        PoolSpec::new(
            "default",
            &[("gold", 100), ("silver", 1000), ("bronze", 100_000)],
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

/// Runs the binary to completion (bounded: 60 s), returning its output.
pub fn cli(args: &[&str], cwd: Option<&Path>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    scrub_env(&mut cmd, env);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let child = cmd.spawn().expect("spawn rewardpool");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.expect("wait for rewardpool"),
        Err(_) => {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("rewardpool {args:?} did not finish within 60 s");
        }
    }
}

/// The environment of every process the tests start: no inherited `REWARDPOOL__*` overrides
/// nor failpoint, plain-text logs at info level, then the test's own variables.
fn scrub_env(cmd: &mut Command, env: &[(&str, &str)]) {
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && (k.starts_with("REWARDPOOL__") || k == "REWARDPOOL_FAILPOINT")
        {
            cmd.env_remove(k);
        }
    }
    cmd.env("NO_COLOR", "1").env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
}

/// A worker process. Dropping it SIGKILLs the process if it still runs.
pub struct Worker {
    child: Child,
    pub log_path: PathBuf,
    status: Option<ExitStatus>,
}

impl Worker {
    pub fn spawn(
        args: &[OsString],
        cwd: Option<&Path>,
        env: &[(&str, &str)],
        log_path: PathBuf,
    ) -> Worker {
        let log = std::fs::File::create(&log_path).expect("create worker log");
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        scrub_env(&mut cmd, env);
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        let child = cmd.spawn().expect("spawn the rewardpool worker");
        Worker {
            child,
            log_path,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "worker {} did not exit within {timeout:?}; log tail:\n{}",
                    self.pid(),
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(30)).await
    }

    /// SIGTERM (or SIGINT) and wait for a clean exit (code 0) within `timeout`.
    pub async fn stop(&mut self, sig: i32, timeout: Duration) {
        self.signal(sig);
        let status = self.wait_exit(timeout).await;
        assert_eq!(
            status.code(),
            Some(0),
            "worker stopped with {status} after signal {sig}; log tail:\n{}",
            self.log_tail(40)
        );
    }

    /// Waits until the request queue exists and has a consumer (the worker recovered,
    /// declared its queues and consumes). Fails at once if the worker exits.
    pub async fn wait_ready(&mut self, conn: &Connection, queue: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                panic!(
                    "worker exited with {s} before it was ready; log:\n{}",
                    self.log_tail(40)
                );
            }
            if let Some(q) = queue_state(conn, queue).await
                && q.consumers >= 1
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "worker not consuming {queue} within {timeout:?}; log tail:\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn assert_running(&mut self) {
        if let Some(s) = self.exited() {
            panic!("worker exited with {s}; log tail:\n{}", self.log_tail(40));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.exited().is_none() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(self.pid(), libc::SIGKILL) };
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- worker log {} (tail) ----\n{}\n----",
                self.log_path.display(),
                self.log_tail(60)
            );
        }
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

/// Logs progress of a long test to stderr (shown by nextest on failure).
pub fn note(msg: impl AsRef<str>) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed();
    eprintln!("[+{:.3}s] {}", t.as_secs_f64(), msg.as_ref());
}

/// Publishes one message over a hand-rolled AMQP 0-9-1 connection (guest/guest on
/// 127.0.0.1:5672, confirms on), with a raw `message_id` property: lapin only sends valid
/// UTF-8 short strings, and the tests need a producer that does not.
pub fn raw_publish(queue: &str, body: &[u8], message_id: &[u8]) {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        f
    }
    fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
        let mut m = class.to_be_bytes().to_vec();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(args);
        m
    }
    fn shortstr(s: &[u8]) -> Vec<u8> {
        let mut v = vec![s.len() as u8];
        v.extend_from_slice(s);
        v
    }
    /// Reads frames until a method frame of (class, id); returns its arguments.
    fn expect(s: &mut TcpStream, class: u16, id: u16) -> Vec<u8> {
        loop {
            let mut header = [0u8; 7];
            s.read_exact(&mut header).expect("AMQP frame header");
            let size = u32::from_be_bytes(header[3..7].try_into().unwrap()) as usize;
            let mut payload = vec![0u8; size + 1];
            s.read_exact(&mut payload).expect("AMQP frame payload");
            if header[0] != 1 {
                continue;
            }
            let got = (
                u16::from_be_bytes([payload[0], payload[1]]),
                u16::from_be_bytes([payload[2], payload[3]]),
            );
            assert!(
                got != (10, 50) && got != (20, 40),
                "the broker closed the raw connection: {}",
                String::from_utf8_lossy(&payload)
            );
            if got == (class, id) {
                return payload[4..size].to_vec();
            }
        }
    }

    let mut s = TcpStream::connect("127.0.0.1:5672").expect("connect to RabbitMQ");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    expect(&mut s, 10, 10); // connection.start
    let mut start_ok = 0u32.to_be_bytes().to_vec(); // client properties: empty table
    start_ok.extend(shortstr(b"PLAIN"));
    let response = b"\x00guest\x00guest";
    start_ok.extend_from_slice(&(response.len() as u32).to_be_bytes());
    start_ok.extend_from_slice(response);
    start_ok.extend(shortstr(b"en_US"));
    s.write_all(&frame(1, 0, &method(10, 11, &start_ok)))
        .unwrap();
    let tune = expect(&mut s, 10, 30);
    let mut tune_ok = tune[0..2].to_vec(); // channel-max as offered
    tune_ok.extend_from_slice(&131_072u32.to_be_bytes());
    tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
    s.write_all(&frame(1, 0, &method(10, 31, &tune_ok)))
        .unwrap();
    let mut open = shortstr(b"/");
    open.extend(shortstr(b""));
    open.push(0);
    s.write_all(&frame(1, 0, &method(10, 40, &open))).unwrap();
    expect(&mut s, 10, 41);
    s.write_all(&frame(1, 1, &method(20, 10, &shortstr(b""))))
        .unwrap();
    expect(&mut s, 20, 11);
    s.write_all(&frame(1, 1, &method(85, 10, &[0]))).unwrap(); // confirm.select
    expect(&mut s, 85, 11);

    let mut publish = 0u16.to_be_bytes().to_vec();
    publish.extend(shortstr(b""));
    publish.extend(shortstr(queue.as_bytes()));
    publish.push(0);
    s.write_all(&frame(1, 1, &method(60, 40, &publish)))
        .unwrap();
    let mut header = 60u16.to_be_bytes().to_vec();
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&((1u16 << 12) | (1u16 << 7)).to_be_bytes()); // delivery-mode, message-id
    header.push(2);
    header.extend(shortstr(message_id));
    s.write_all(&frame(2, 1, &header)).unwrap();
    for chunk in body.chunks(131_072 - 8) {
        s.write_all(&frame(3, 1, chunk)).unwrap();
    }
    expect(&mut s, 60, 80); // basic.ack
    let mut close = 200u16.to_be_bytes().to_vec();
    close.extend(shortstr(b"bye"));
    close.extend_from_slice(&[0, 0, 0, 0]);
    s.write_all(&frame(1, 0, &method(10, 50, &close))).unwrap();
    let _ = s.flush();
}
