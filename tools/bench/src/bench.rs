//! `rewardpool-bench`: a load generator over the real client path, and the broker's own ceiling
//! on that same path, so that a run can say what fraction of the broker's ceiling the worker
//! reaches.
//!
//! What it measures. A client publishes `N` requests to the request queue the way a producer
//! would (default exchange, persistent, `message_id`, `reply_to`, `correlation_id`, publisher
//! confirms kept in flight), at most `--concurrency` requests published without a result yet,
//! or at a fixed `--rate`. It consumes its exclusive reply queue and records, per request, the
//! time from publishing to the `accepted` reply (accept latency) and to the `result` copy on
//! `reply_to` (result latency) in HDR histograms (µs). It reports throughput (results per second
//! from the first publish to the last result), p50/p99/p99.9 of both latencies, missing and
//! duplicate replies, and the peak RSS of this process (`VmHWM`, reset per target through
//! `/proc/self/clear_refs` where the kernel allows it). To say where time goes it also prints
//! the CPU time of this process (by thread name) and of the local broker (`beam.smp`) over the
//! run, and for `embedded` the fsync latency of the data directory measured in the same run.
//!
//! Targets:
//! - `ceiling`: an in-process trivial server on its own queues that does what the worker does on
//!   the broker and nothing else: the same topology (`amqp::declare`), the same prefetch, an
//!   ingest task that publishes the `accepted` reply and a settle task that publishes the
//!   persistent result and its copy to `reply_to` on the same confirm channel, keeps batches of
//!   confirms in flight and acks every batch whose confirms are in with one `multiple` ack — no
//!   draw, no WAL, no fsync. It stands for what this broker, machine and client can do on the
//!   contract's message path. It is a reference, not a proof of an upper bound: on a small,
//!   shared machine run-to-run noise is tens of percent, so compare several runs.
//! - `embedded`: the real worker (`worker::run_until`) in this process, on fresh queues and a
//!   fresh data directory with one `by_weight` pool of unlimited items, so it never runs out.
//! - `external`: drives a worker already running on the config's queues (nothing is declared or
//!   deleted; the body names no pool, so the worker's first pool is drawn).
//! - `compare` (default): `ceiling`, then `embedded`, in one process, and the ratio of their
//!   throughputs.
//!
//! Why it is built this way. Both in-process servers are polled by the thread that runs the
//! benchmark (as `rewardpool run` polls its worker on the main thread) while the client runs as
//! tasks on the two runtime threads, so ceiling and embedded pay the same client, thread and
//! connection costs, and their ratio isolates what the draw path (admission, engine, WAL, fsync,
//! batching of results and acks) costs on top of the broker. Every target gets queue names never
//! used before (`rpbench.<pid>.<millis>.<target>.*`): deleting a quorum queue and declaring one
//! of the same name again can crash RabbitMQ 3.10's quorum log writer. The queues are deleted
//! after the run, but only once the server has stopped (a worker that still runs would declare
//! them again). Memory is bounded by the concurrency: only requests in flight are kept in a map,
//! finished ones in a bitset (one bit per request). Every broker call has a timeout, and broker errors end the run
//! with a report and a non-zero exit, never a panic.
//!
//! With `--rate`, requests are scheduled at fixed times and latencies are measured from the
//! scheduled time, so a stalled server cannot hide its stall (no coordinated omission).

use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions,
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Consumer};
use rewardpool::amqp::{self, AmqpError, Link, timed};
use rewardpool::config::{AmqpConfig, Config, Mode, PoolSeed, QueueType};
use rewardpool::message::{accepted_body, parse_request, result_body};
use rewardpool::session::{reply_properties, result_properties};
use rewardpool::state::Outcome;
use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{Semaphore, mpsc, watch};

/// The pool the in-process targets draw from.
const BENCH_POOL: &str = "bench";
/// Reply confirms outstanding before the ceiling's ingest waits for some (as in `ingest`).
const CEILING_REPLY_CONFIRMS_MAX: usize = 4096;
/// Largest batch the ceiling's settle task takes at once (as `storage.batch_records_max`).
const CEILING_BATCH_MAX: usize = 4096;
/// Batches whose confirms may be outstanding at once (as in `settle`).
const CEILING_BATCHES_IN_FLIGHT_MAX: usize = 256;
/// How long an in-process server may take to start consuming.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);
/// Runs at least this long show a progress bar (on a terminal).
const PROGRESS_MIN_REQUESTS: u64 = 10_000;
/// Connection attempts (2 s apart) to delete the queues when the control connection is gone.
const CLEANUP_CONNECT_ATTEMPTS: u32 = 15;
/// Largest accepted `--concurrency`.
const CONCURRENCY_MAX: u64 = 1_000_000;

/// What the benchmark drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The real worker in this process, on fresh queues and a fresh data directory.
    Embedded,
    /// A worker already running on the config's queues.
    External,
    /// A trivial in-process server on the same message path: no draw, no WAL.
    Ceiling,
    /// `ceiling`, then `embedded`, and their ratio.
    Compare,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Embedded => "embedded",
            Target::External => "external",
            Target::Ceiling => "ceiling",
            Target::Compare => "compare",
        }
    }
}

/// `--queue-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueTypeArg {
    Classic,
    Quorum,
}

impl From<QueueTypeArg> for QueueType {
    fn from(q: QueueTypeArg) -> QueueType {
        match q {
            QueueTypeArg::Classic => QueueType::Classic,
            QueueTypeArg::Quorum => QueueType::Quorum,
        }
    }
}

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub requests: u64,
    /// Requests published but without a result yet, at most.
    pub concurrency: u64,
    /// Requests per second; `None`: closed loop at `concurrency`.
    pub rate: Option<f64>,
    pub target: Target,
    /// Overrides `amqp.queue_type` for the queues the benchmark declares.
    pub queue_type: Option<QueueType>,
    /// Parent of the embedded worker's temporary data directory (default: the system temp dir).
    pub data_dir: Option<PathBuf>,
    /// Give up when no reply arrived for this long.
    pub idle_timeout: Duration,
}

/// Runs the benchmark; the report goes to stdout. Non-zero exit when a request has no result,
/// a server failed, or the queues could not be cleaned up.
pub fn run(config: Config, options: BenchOptions) -> anyhow::Result<ExitCode> {
    if options.requests == 0 {
        anyhow::bail!("--requests must be at least 1");
    }
    if options.concurrency == 0 || options.concurrency > CONCURRENCY_MAX {
        anyhow::bail!("--concurrency must be from 1 to {CONCURRENCY_MAX}");
    }
    if let Some(rate) = options.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        anyhow::bail!("--rate must be a positive number of requests per second");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("rp-bench")
        .build()?;
    runtime.block_on(run_async(config, options))
}

async fn run_async(config: Config, options: BenchOptions) -> anyhow::Result<ExitCode> {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let run_id = format!("{}.{}", std::process::id(), millis);
    let queue_type = options.queue_type.unwrap_or(config.amqp.queue_type);
    println!("rewardpool-bench");
    println!("machine      {}", machine());
    println!(
        "setup        {} requests, {}, {} queues, prefetch {}, broker {}",
        options.requests,
        match options.rate {
            Some(r) => format!("rate {r} req/s (at most {} in flight)", options.concurrency),
            None => format!("concurrency {} (closed loop)", options.concurrency),
        },
        queue_type.as_str(),
        config.amqp.prefetch,
        config.amqp.url_redacted()
    );
    let _ = std::io::stdout().flush();
    let targets: &[Target] = match options.target {
        Target::Compare => &[Target::Ceiling, Target::Embedded],
        Target::Embedded => &[Target::Embedded],
        Target::External => &[Target::External],
        Target::Ceiling => &[Target::Ceiling],
    };
    let mut reports = Vec::new();
    let mut ok = true;
    for &target in targets {
        let report = run_target(target, &config, &options, &run_id).await?;
        report.print();
        ok &= report.ok();
        reports.push(report);
    }
    if let [ceiling, embedded] = &reports[..] {
        print_compare(ceiling, embedded);
    }
    let _ = std::io::stdout().flush();
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

// ---------------------------------------------------------------------------------------------
// One target: declare, start the server, drive it, stop it, clean up.

type ServerFuture<'a> = Pin<Box<dyn Future<Output = Result<String, String>> + 'a>>;

async fn run_target(
    target: Target,
    base: &Config,
    options: &BenchOptions,
    run_id: &str,
) -> anyhow::Result<Report> {
    let mut config = base.clone();
    if let Some(q) = options.queue_type {
        config.amqp.queue_type = q;
    }
    let owned = target != Target::External;
    if owned {
        let prefix = format!("rpbench.{run_id}.{}", target.name());
        config.amqp.request_queue = format!("{prefix}.requests");
        config.amqp.result_queue = format!("{prefix}.results");
        config.amqp.dead_letter_queue = format!("{prefix}.dead");
        config.amqp.dead_letter_exchange = String::new();
    }
    let cfg = config.amqp.clone();
    tracing::info!(target = target.name(), queue = %cfg.request_queue, queue_type = cfg.queue_type.as_str(), "bench: starting");

    let rss_reset = reset_peak_rss();
    let rss_start_kib = proc_status_kib("VmRSS");

    let control = amqp::connect(&cfg, "rewardpool bench control").await?;
    if owned {
        if let Err(e) = amqp::declare(&control, &cfg).await {
            // Some of them may exist now: delete what can be.
            cleanup_queues(&control, &cfg).await;
            close(&control, &cfg).await;
            return Err(e.into());
        }
    } else {
        check_external(&control, &cfg).await?;
    }

    // The embedded worker's data directory, and the fsync latency measured on it.
    let mut data_dir: Option<PathBuf> = None;
    let mut fsync = None;
    if target == Target::Embedded {
        let parent = options.data_dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = parent.join(format!("rpbench-{run_id}"));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            cleanup_queues(&control, &cfg).await;
            close(&control, &cfg).await;
            anyhow::bail!("cannot create the data directory {}: {e}", dir.display());
        }
        data_dir = Some(dir.clone());
        let probe_dir = dir.clone();
        fsync = tokio::task::spawn_blocking(move || fsync_probe(&probe_dir))
            .await
            .ok()
            .and_then(|r| r.ok());
        config.storage.data_dir = dir;
        config.pools = vec![PoolSeed::from_parts(
            BENCH_POOL,
            Mode::ByWeight,
            &[
                ("win".into(), None, Some(1)),
                ("try_again".into(), None, Some(9)),
            ],
        )];
        if let Err(e) = rewardpool::config::RawConfig::from(&config).validate() {
            cleanup_queues(&control, &cfg).await;
            close(&control, &cfg).await;
            remove_dir(&data_dir);
            anyhow::bail!("bench configuration: {e}");
        }
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let (gone_tx, gone_rx) = watch::channel(false);
    let server: ServerFuture<'_> = match target {
        Target::Ceiling => Box::pin(ceiling_server(Arc::new(cfg.clone()), stop_rx.clone())),
        Target::Embedded => {
            let worker_config = config.clone();
            let stop = stop_rx.clone();
            Box::pin(async move {
                match rewardpool::worker::run_until(worker_config, stop).await {
                    Ok(code) if code == ExitCode::SUCCESS => Ok("worker stopped cleanly".into()),
                    Ok(_) => Err("the worker stopped with a failure exit code".into()),
                    Err(e) => Err(format!("the worker failed: {e:#}")),
                }
            })
        }
        _ => {
            let mut stop = stop_rx.clone();
            Box::pin(async move {
                let _ = stop.wait_for(|s| *s).await;
                Ok(String::new())
            })
        }
    };
    let server = async move {
        let r = server.await;
        let _ = gone_tx.send(true);
        r
    };

    let plan = Plan {
        requests: options.requests,
        concurrency: options.concurrency,
        rate: options.rate,
        pool: owned.then(|| BENCH_POOL.to_string()),
        tag: format!("rpbench-{run_id}-{}", target.name()),
        idle_timeout: options.idle_timeout,
        label: target.name(),
    };
    let client = tokio::spawn(client_side(
        cfg.clone(),
        owned.then(|| control.consume.clone()),
        plan,
        stop_tx,
        gone_rx,
    ));

    // The server is polled here, the client runs on the runtime's threads. Once the client has
    // asked the server to stop, the server gets the worker's shutdown deadline and some slack.
    let stop_grace = Duration::from_millis(cfg.shutdown_deadline_ms) + Duration::from_secs(10);
    let mut stop_seen = stop_rx.clone();
    let mut server = std::pin::pin!(server);
    let server_end: Option<Result<String, String>> = tokio::select! {
        r = &mut server => Some(r),
        _ = async {
            let _ = stop_seen.wait_for(|s| *s).await;
            tokio::time::sleep(stop_grace).await;
        } => None,
    };
    let client_result = match tokio::time::timeout(stop_grace, client).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(anyhow::anyhow!("the bench client task failed: {e}")),
        Err(_) => Err(anyhow::anyhow!("the bench client did not finish")),
    };
    let peak_rss_kib = proc_status_kib("VmHWM");

    let mut notes = Vec::new();
    let mut server_ok = true;
    let stopped = match &server_end {
        Some(Ok(note)) => {
            if !note.is_empty() {
                notes.push(note.clone());
            }
            true
        }
        Some(Err(e)) => {
            server_ok = false;
            notes.push(format!("server: {e}"));
            true
        }
        None => {
            server_ok = false;
            notes.push("server: did not stop in time".into());
            false
        }
    };
    let mut cleaned = true;
    if owned {
        if stopped {
            cleaned = cleanup_queues(&control, &cfg).await;
            if !cleaned {
                notes.push(format!(
                    "could not delete every bench queue ({}.*); delete them by hand",
                    cfg.request_queue.trim_end_matches(".requests")
                ));
            }
        } else {
            cleaned = false;
            notes.push(format!(
                "bench queues left in place because the server may still use them: {}, {}, {}",
                cfg.request_queue, cfg.result_queue, cfg.dead_letter_queue
            ));
        }
    }
    close(&control, &cfg).await;
    if stopped {
        remove_dir(&data_dir);
    } else if let Some(d) = &data_dir {
        notes.push(format!("data directory left in place: {}", d.display()));
    }

    let client = match client_result {
        Ok(c) => c,
        Err(e) => {
            for note in &notes {
                tracing::warn!("bench {}: {note}", target.name());
            }
            return Err(e);
        }
    };
    Ok(Report {
        target,
        queue_type: cfg.queue_type,
        client,
        rss_start_kib,
        peak_rss_kib,
        rss_reset,
        fsync,
        server_ok,
        cleaned,
        notes,
    })
}

async fn close(link: &Link, cfg: &AmqpConfig) {
    let _ = timed(
        "connection.close",
        cfg.operation_timeout_ms.min(2000),
        link.connection.close(200, "rewardpool bench done".into()),
    )
    .await;
}

/// Deletes the three queues and the dead-letter exchange on a fresh channel (on a new
/// connection if the control connection is gone). True when all went.
async fn cleanup_queues(control: &Link, cfg: &AmqpConfig) -> bool {
    match timed(
        "channel.open",
        cfg.operation_timeout_ms,
        control.connection.create_channel(),
    )
    .await
    {
        Ok(channel) => delete_topology(&channel, cfg).await,
        Err(_) => {
            // The control connection is gone (a broker restart?): reconnect, for a while.
            for attempt in 1..=CLEANUP_CONNECT_ATTEMPTS {
                match amqp::connect(cfg, "rewardpool bench cleanup").await {
                    Ok(link) => {
                        let ok = delete_topology(&link.consume, cfg).await;
                        close(&link, cfg).await;
                        return ok;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, attempt, "bench: cannot reach the broker to delete the queues");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
            false
        }
    }
}

async fn delete_topology(channel: &Channel, cfg: &AmqpConfig) -> bool {
    let op = cfg.operation_timeout_ms;
    let mut ok = true;
    for queue in [
        &cfg.request_queue,
        &cfg.result_queue,
        &cfg.dead_letter_queue,
    ] {
        if let Err(e) = timed(
            "queue.delete",
            op,
            channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
        )
        .await
        {
            tracing::warn!(%queue, error = %e, "bench: could not delete a queue");
            ok = false;
        }
    }
    let dlx = cfg.dead_letter_exchange_name();
    if let Err(e) = timed(
        "exchange.delete",
        op,
        channel.exchange_delete(dlx.as_str().into(), ExchangeDeleteOptions::default()),
    )
    .await
    {
        tracing::warn!(exchange = %dlx, error = %e, "bench: could not delete an exchange");
        ok = false;
    }
    let _ = timed("channel.close", op, channel.close(200, "done".into())).await;
    ok
}

async fn check_external(control: &Link, cfg: &AmqpConfig) -> anyhow::Result<()> {
    let op = cfg.operation_timeout_ms;
    // A passive declare of a missing queue closes the channel: use a throwaway one.
    let channel = timed("channel.open", op, control.connection.create_channel()).await?;
    let queue = match timed(
        "queue.declare",
        op,
        channel.queue_declare(
            cfg.request_queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    {
        Ok(q) => q,
        Err(e) => {
            close(control, cfg).await;
            anyhow::bail!(
                "request queue {:?} is not usable ({e}); is a worker running on this configuration?",
                cfg.request_queue
            );
        }
    };
    if queue.consumer_count() == 0 {
        tracing::warn!(queue = %cfg.request_queue, "bench: no consumer on the request queue; requests will wait for one");
    }
    let _ = timed("channel.close", op, channel.close(200, "done".into())).await;
    Ok(())
}

fn remove_dir(dir: &Option<PathBuf>) {
    if let Some(d) = dir
        && let Err(e) = std::fs::remove_dir_all(d)
    {
        tracing::warn!(dir = %d.display(), error = %e, "bench: could not remove the data directory");
    }
}

// ---------------------------------------------------------------------------------------------
// The ceiling server: the worker's broker path without the engine.

/// What the ceiling's ingest hands to its settle task.
struct CeilingItem {
    tag: u64,
    received: Instant,
    request_id: u64,
    message_id: Option<ShortString>,
    reply_to: Option<ShortString>,
    correlation_id: Option<ShortString>,
    user: String,
    count: u32,
}

async fn ceiling_server(
    cfg: Arc<AmqpConfig>,
    mut stop: watch::Receiver<bool>,
) -> Result<String, String> {
    let link = amqp::connect(&cfg, "rewardpool bench ceiling")
        .await
        .map_err(|e| e.to_string())?;
    let result = ceiling_session(&link, cfg.clone(), &mut stop).await;
    close(&link, &cfg).await;
    result
}

async fn ceiling_session(
    link: &Link,
    cfg: Arc<AmqpConfig>,
    stop: &mut watch::Receiver<bool>,
) -> Result<String, String> {
    let op = cfg.operation_timeout_ms;
    // Same queues, same arguments, same qos as the worker.
    amqp::declare(link, &cfg).await.map_err(|e| e.to_string())?;
    let mut consumer = timed(
        "basic.consume",
        op,
        link.consume.basic_consume(
            cfg.request_queue.as_str().into(),
            format!("rpbench-ceiling-{}", std::process::id()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel::<CeilingItem>(cfg.prefetch.max(1) as usize);
    let settler = tokio::spawn(ceiling_settle(
        link.consume.clone(),
        link.publish.clone(),
        cfg.clone(),
        rx,
    ));
    let mut confirms: FuturesUnordered<lapin::PublisherConfirm> = FuturesUnordered::new();
    let mut next_id = 0u64;
    let mut failure: Option<String> = None;
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            Some(r) = confirms.next(), if !confirms.is_empty() => {
                if let Err(e) = r {
                    failure = Some(format!("reply confirm failed: {e}"));
                    break;
                }
            }
            delivery = consumer.next(), if confirms.len() < CEILING_REPLY_CONFIRMS_MAX => {
                let delivery = match delivery {
                    None => { failure = Some("the broker cancelled the consumer".into()); break; }
                    Some(Err(e)) => { failure = Some(format!("consumer: {e}")); break; }
                    Some(Ok(d)) => d,
                };
                let received = Instant::now();
                let props = &delivery.properties;
                let reply_to = props.reply_to().clone().filter(|r| !r.as_str().is_empty());
                let correlation_id = props.correlation_id().clone();
                // The same parsing as the worker; a body it would reject is drawn anyway here.
                let (user, count) = match parse_request(&delivery.data, BENCH_POOL, |_| true) {
                    Ok(p) => (p.user, p.count),
                    Err(_) => (String::new(), 1),
                };
                next_id += 1;
                if let Some(r) = &reply_to {
                    match publish(&link.publish, op, r.as_str(), &accepted_body(next_id), reply_properties("accepted", &correlation_id)).await {
                        Ok(c) => confirms.push(c),
                        Err(e) => { failure = Some(format!("accepted reply: {e}")); break; }
                    }
                }
                let item = CeilingItem {
                    tag: delivery.delivery_tag,
                    received,
                    request_id: next_id,
                    message_id: props.message_id().clone(),
                    reply_to,
                    correlation_id,
                    user,
                    count,
                };
                if tx.send(item).await.is_err() {
                    failure = Some("the ceiling settle task stopped".into());
                    break;
                }
            }
        }
    }
    if failure.is_none() {
        let _ = timed(
            "basic.cancel",
            op,
            link.consume
                .basic_cancel(consumer.tag(), BasicCancelOptions::default()),
        )
        .await;
    }
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_millis(op), async {
        while confirms.next().await.is_some() {}
    })
    .await;
    let settled = match tokio::time::timeout(Duration::from_millis(op) * 2, settler).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(format!("ceiling settle task: {e}")),
        Err(_) => Err("ceiling settle task did not finish".into()),
    };
    match (failure, settled) {
        (Some(f), _) => Err(f),
        (None, Err(e)) => Err(e),
        (None, Ok(stats)) => Ok(format!(
            "ceiling: {} deliveries in {} batches (mean {:.1}, max {}), {} acks; delivery to ack {}; batch published to confirmed {}",
            stats.deliveries,
            stats.batches,
            stats.deliveries as f64 / stats.batches.max(1) as f64,
            stats.batch_max,
            stats.acks,
            short_percentiles(&stats.hold),
            short_percentiles(&stats.confirm),
        )),
    }
}

struct CeilingStats {
    deliveries: u64,
    batches: u64,
    batch_max: usize,
    acks: u64,
    /// Delivery received → its ack sent (µs): what holds a prefetch slot.
    hold: Histogram<u64>,
    /// Batch published → all its confirms in (µs).
    confirm: Histogram<u64>,
}

/// Publishes results and copies for whatever the ingest task has queued (one batch), keeps
/// batches' confirms in flight, and acks each batch, in order, with one `multiple` ack.
async fn ceiling_settle(
    consume: Channel,
    publish_channel: Channel,
    cfg: Arc<AmqpConfig>,
    mut rx: mpsc::Receiver<CeilingItem>,
) -> Result<CeilingStats, String> {
    let op = cfg.operation_timeout_ms;
    let pool: Arc<str> = BENCH_POOL.into();
    let item_name: Arc<str> = "win".into();
    let mut stats = CeilingStats {
        deliveries: 0,
        batches: 0,
        batch_max: 0,
        acks: 0,
        hold: histogram(),
        confirm: histogram(),
    };
    let mut in_flight = FuturesOrdered::new();
    let mut buffer = Vec::with_capacity(CEILING_BATCH_MAX);
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            n = rx.recv_many(&mut buffer, CEILING_BATCH_MAX), if open && in_flight.len() < CEILING_BATCHES_IN_FLIGHT_MAX => {
                if n == 0 {
                    open = false;
                    continue;
                }
                stats.batches += 1;
                stats.deliveries += n as u64;
                stats.batch_max = stats.batch_max.max(n);
                let mut confirms = Vec::with_capacity(2 * n);
                let mut last_tag = 0;
                let mut received = Vec::with_capacity(n);
                for item in buffer.drain(..) {
                    received.push(item.received);
                    let outcome = Outcome {
                        request_id: item.request_id,
                        pool: pool.clone(),
                        user: item.user.into(),
                        count: item.count,
                        items: vec![item_name.clone()],
                        closed: false,
                        admin: None,
                    };
                    let body = result_body(&outcome, item.message_id.as_ref().map(|m| m.as_str()));
                    let props = result_properties(item.request_id, &item.correlation_id);
                    confirms.push(publish(&publish_channel, op, &cfg.result_queue, &body, props.clone()).await.map_err(|e| format!("result publish: {e}"))?);
                    if let Some(r) = &item.reply_to {
                        confirms.push(publish(&publish_channel, op, r.as_str(), &body, props).await.map_err(|e| format!("result copy publish: {e}"))?);
                    }
                    last_tag = item.tag;
                }
                let published = Instant::now();
                in_flight.push_back(async move {
                    for confirm in confirms {
                        match tokio::time::timeout(Duration::from_millis(op), confirm).await {
                            Err(_) => return Err("publisher confirm timed out".to_string()),
                            Ok(Err(e)) => return Err(format!("publisher confirm: {e}")),
                            Ok(Ok(c)) if c.is_nack() => return Err("the broker refused a result (nack)".to_string()),
                            Ok(Ok(_)) => {}
                        }
                    }
                    Ok((last_tag, received, micros(published.elapsed())))
                });
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                // Every batch whose confirms are in by now is settled by the same ack.
                let mut settled = vec![done?];
                while let Some(Some(more)) = in_flight.next().now_or_never() {
                    settled.push(more?);
                }
                let Some(&(tag, _, _)) = settled.last() else { continue };
                timed("basic.ack", op, consume.basic_ack(tag, BasicAckOptions { multiple: true }))
                    .await
                    .map_err(|e| e.to_string())?;
                stats.acks += 1;
                let now = Instant::now();
                for (_, received, confirm_us) in settled {
                    stats.confirm.saturating_record(confirm_us);
                    for r in received {
                        stats.hold.saturating_record(micros(now - r));
                    }
                }
            }
        }
    }
    Ok(stats)
}

async fn publish(
    channel: &Channel,
    op: u64,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<lapin::PublisherConfirm, AmqpError> {
    timed(
        "basic.publish",
        op,
        channel.basic_publish(
            "".into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        ),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// The client: publisher task and reply collector.

struct Plan {
    requests: u64,
    concurrency: u64,
    rate: Option<f64>,
    /// Pool named in the body; `None`: the worker's first pool.
    pool: Option<String>,
    /// Prefix of every `message_id`, unique per run and target.
    tag: String,
    idle_timeout: Duration,
    label: &'static str,
}

/// What the client measured.
struct ClientReport {
    requests: u64,
    published: u64,
    nacked: u64,
    results: u64,
    rejected: u64,
    duplicate_results: u64,
    duplicate_accepts: u64,
    /// A result that came before its accepted reply (the contract forbids it).
    order_violations: u64,
    /// Replies whose correlation_id names no request of this run.
    unknown: u64,
    /// First publish → last result.
    elapsed: Duration,
    /// First publish → last publish.
    publish_elapsed: Duration,
    accept: Histogram<u64>,
    result: Histogram<u64>,
    timed_out: bool,
    error: Option<String>,
    rate: Option<f64>,
    concurrency: u64,
    cpu: Cpu,
}

/// CPU time spent while the client ran (first publish to the end of collection).
struct Cpu {
    window: Duration,
    this_process: Option<f64>,
    /// The local broker (`beam.smp`), when there is exactly one.
    broker: Option<f64>,
    /// This process's CPU seconds by thread name (threads that ended during the run are
    /// missing), largest first.
    threads: Vec<(String, f64)>,
}

struct Pending {
    sent: Instant,
    accepted: bool,
}

/// What the publisher and the collector share: the requests in flight (at most `concurrency`).
#[derive(Default)]
struct Shared {
    pending: HashMap<u64, Pending>,
    published: u64,
    last_publish: Option<Instant>,
    nacked: u64,
    publisher_error: Option<String>,
}

type SharedState = Arc<Mutex<Shared>>;

fn lock(shared: &SharedState) -> std::sync::MutexGuard<'_, Shared> {
    // A panic while holding the lock cannot leave the map inconsistent in a way that matters.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

async fn client_side(
    cfg: AmqpConfig,
    probe: Option<Channel>,
    plan: Plan,
    stop_tx: watch::Sender<bool>,
    server_gone: watch::Receiver<bool>,
) -> anyhow::Result<ClientReport> {
    let result = async {
        if let Some(channel) = &probe {
            wait_for_consumer(channel, &cfg, server_gone.clone()).await?;
        }
        drive(&cfg, &plan, server_gone).await
    }
    .await;
    let _ = stop_tx.send(true);
    result
}

/// Waits until the server consumes from the request queue (the worker after recovery).
async fn wait_for_consumer(
    channel: &Channel,
    cfg: &AmqpConfig,
    server_gone: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if *server_gone.borrow() {
            anyhow::bail!("the server stopped before it consumed");
        }
        let queue = timed(
            "queue.declare",
            cfg.operation_timeout_ms,
            channel.queue_declare(
                cfg.request_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        if queue.consumer_count() > 0 {
            return Ok(());
        }
        if start.elapsed() > SERVER_START_TIMEOUT {
            anyhow::bail!(
                "no consumer on {} after {} s",
                cfg.request_queue,
                SERVER_START_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 hour, 3 significant digits: valid bounds, so this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

async fn drive(
    cfg: &AmqpConfig,
    plan: &Plan,
    server_gone: watch::Receiver<bool>,
) -> anyhow::Result<ClientReport> {
    let publisher_link = amqp::connect(cfg, "rewardpool bench publisher").await?;
    let reply_link = match amqp::connect(cfg, "rewardpool bench replies").await {
        Ok(l) => l,
        Err(e) => {
            close(&publisher_link, cfg).await;
            return Err(e.into());
        }
    };
    let result = drive_on(&publisher_link, &reply_link, cfg, plan, server_gone).await;
    close(&publisher_link, cfg).await;
    close(&reply_link, cfg).await;
    result
}

async fn drive_on(
    publisher_link: &Link,
    reply_link: &Link,
    cfg: &AmqpConfig,
    plan: &Plan,
    server_gone: watch::Receiver<bool>,
) -> anyhow::Result<ClientReport> {
    let op = cfg.operation_timeout_ms;
    let reply_queue = timed(
        "queue.declare",
        op,
        reply_link.consume.queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await?
    .name()
    .clone();
    // Auto-ack: the replies in flight are bounded by the requests in flight (two per request).
    let consumer = timed(
        "basic.consume",
        op,
        reply_link.consume.basic_consume(
            reply_queue.clone(),
            "rpbench-replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;

    let shared: SharedState = Arc::new(Mutex::new(Shared::default()));
    let permits = usize::try_from(plan.concurrency.min(plan.requests)).unwrap_or(usize::MAX);
    let semaphore = Arc::new(Semaphore::new(permits));
    let broker_pid = find_broker_pid();
    let threads_start = thread_cpu();
    let cpu_start = (
        cpu_seconds("self"),
        broker_pid.and_then(|p| cpu_seconds(&p.to_string())),
    );
    let t0 = Instant::now();
    let publisher = {
        let shared = shared.clone();
        let semaphore = semaphore.clone();
        let channel = publisher_link.publish.clone();
        let job = PublishJob {
            queue: cfg.request_queue.as_str().into(),
            reply_to: reply_queue.clone(),
            requests: plan.requests,
            rate: plan.rate,
            pool: plan.pool.clone(),
            tag: plan.tag.clone(),
            op,
            t0,
        };
        tokio::spawn(async move {
            let r = publish_loop(channel, job, shared.clone(), semaphore).await;
            if let Err(e) = &r {
                lock(&shared).publisher_error = Some(e.clone());
            }
            r
        })
    };

    let progress = (plan.requests >= PROGRESS_MIN_REQUESTS).then(|| {
        let bar = ProgressBar::with_draw_target(Some(plan.requests), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix:>9} [{elapsed_precise}] {wide_bar} {pos}/{len} results {msg}",
        ) {
            bar.set_style(style);
        }
        bar.set_prefix(plan.label);
        bar
    });
    let collected = collect(
        consumer,
        &shared,
        &semaphore,
        plan,
        t0,
        server_gone,
        progress.as_ref(),
    )
    .await;
    let window = t0.elapsed();
    let cpu_end = (
        cpu_seconds("self"),
        broker_pid.and_then(|p| cpu_seconds(&p.to_string())),
    );
    let cpu = Cpu {
        threads: thread_cpu_delta(&threads_start, &thread_cpu()),
        window,
        this_process: cpu_start.0.zip(cpu_end.0).map(|(a, b)| b - a),
        broker: cpu_start.1.zip(cpu_end.1).map(|(a, b)| b - a),
    };
    if let Some(bar) = &progress {
        bar.finish_and_clear();
    }
    // A publisher still waiting for a slot gives up.
    semaphore.close();
    let publish_error = match tokio::time::timeout(Duration::from_millis(op) * 2, publisher).await {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(e))) => Some(e),
        Ok(Err(e)) => Some(format!("publisher task: {e}")),
        Err(_) => Some("the publisher did not finish".to_string()),
    };
    let (published, last_publish, nacked) = {
        let s = lock(&shared);
        (s.published, s.last_publish, s.nacked)
    };
    let error = collected.error.clone().or(publish_error);
    Ok(ClientReport {
        requests: plan.requests,
        published,
        nacked,
        results: collected.results,
        rejected: collected.rejected,
        duplicate_results: collected.duplicate_results,
        duplicate_accepts: collected.duplicate_accepts,
        order_violations: collected.order_violations,
        unknown: collected.unknown,
        elapsed: collected.last_result.map(|t| t - t0).unwrap_or_default(),
        publish_elapsed: last_publish.map(|t| t - t0).unwrap_or_default(),
        accept: collected.accept,
        result: collected.result,
        timed_out: collected.timed_out,
        error,
        rate: plan.rate,
        concurrency: plan.concurrency,
        cpu,
    })
}

struct PublishJob {
    queue: ShortString,
    reply_to: ShortString,
    requests: u64,
    rate: Option<f64>,
    pool: Option<String>,
    tag: String,
    op: u64,
    t0: Instant,
}

/// Publishes request 0..N, each after taking a slot (given back by the collector when the
/// result arrives), keeping the confirms in flight.
async fn publish_loop(
    channel: Channel,
    job: PublishJob,
    shared: SharedState,
    semaphore: Arc<Semaphore>,
) -> Result<(), String> {
    let timeout = Duration::from_millis(job.op);
    let mut confirms = FuturesUnordered::new();
    let mut k = 0u64;
    let mut closed = false;
    loop {
        tokio::select! {
            biased;
            Some((id, confirm)) = confirms.next(), if !confirms.is_empty() => {
                match confirm {
                    Err(_) => return Err("publisher confirm timed out".into()),
                    Ok(Err(e)) => return Err(format!("publisher confirm: {e}")),
                    Ok(Ok(c)) => {
                        let c: lapin::Confirmation = c;
                        if c.is_nack() {
                            let mut s = lock(&shared);
                            if s.pending.remove(&id).is_some() {
                                s.nacked += 1;
                                semaphore.add_permits(1);
                            }
                        }
                    }
                }
            }
            permit = semaphore.acquire(), if k < job.requests && !closed => {
                let Ok(permit) = permit else {
                    closed = true;
                    continue;
                };
                permit.forget();
                let scheduled = job.rate.map(|r| job.t0 + Duration::from_secs_f64(k as f64 / r));
                if let Some(at) = scheduled {
                    tokio::time::sleep_until(at.into()).await;
                }
                let body = match &job.pool {
                    Some(pool) => format!(r#"{{"pool":"{pool}","user":"u{k}","count":1}}"#),
                    None => format!(r#"{{"user":"u{k}","count":1}}"#),
                };
                let props = BasicProperties::default()
                    .with_message_id(format!("{}-{k}", job.tag).into())
                    .with_reply_to(job.reply_to.clone())
                    .with_correlation_id(k.to_string().into())
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2);
                lock(&shared).pending.insert(k, Pending { sent: scheduled.unwrap_or_else(Instant::now), accepted: false });
                let confirm = timed(
                    "basic.publish",
                    job.op,
                    channel.basic_publish("".into(), job.queue.clone(), BasicPublishOptions::default(), body.as_bytes(), props),
                )
                .await
                .map_err(|e| e.to_string())?;
                confirms.push(async move { (k, tokio::time::timeout(timeout, confirm).await) });
                k += 1;
                let mut s = lock(&shared);
                s.published = k;
                s.last_publish = Some(Instant::now());
            }
            else => break,
        }
    }
    Ok(())
}

struct Collected {
    accept: Histogram<u64>,
    result: Histogram<u64>,
    results: u64,
    rejected: u64,
    duplicate_results: u64,
    duplicate_accepts: u64,
    order_violations: u64,
    unknown: u64,
    last_result: Option<Instant>,
    timed_out: bool,
    error: Option<String>,
}

/// Bitset of the requests that have their result.
struct Done(Vec<u64>);

impl Done {
    fn new(n: u64) -> Done {
        Done(vec![0; n.div_ceil(64) as usize])
    }
    fn get(&self, k: u64) -> bool {
        self.0
            .get((k / 64) as usize)
            .is_some_and(|w| w & (1 << (k % 64)) != 0)
    }
    fn set(&mut self, k: u64) {
        if let Some(w) = self.0.get_mut((k / 64) as usize) {
            *w |= 1 << (k % 64);
        }
    }
}

async fn collect(
    mut consumer: Consumer,
    shared: &SharedState,
    semaphore: &Semaphore,
    plan: &Plan,
    t0: Instant,
    server_gone: watch::Receiver<bool>,
    progress: Option<&ProgressBar>,
) -> Collected {
    let mut c = Collected {
        accept: histogram(),
        result: histogram(),
        results: 0,
        rejected: 0,
        duplicate_results: 0,
        duplicate_accepts: 0,
        order_violations: 0,
        unknown: 0,
        last_result: None,
        timed_out: false,
        error: None,
    };
    let mut done = Done::new(plan.requests);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_progress = Instant::now();
    loop {
        tokio::select! {
            biased;
            delivery = consumer.next() => {
                let delivery = match delivery {
                    None => { c.error = Some("the broker cancelled the reply consumer".into()); break; }
                    Some(Err(e)) => { c.error = Some(format!("reply consumer: {e}")); break; }
                    Some(Ok(d)) => d,
                };
                let now = Instant::now();
                last_progress = now;
                let props = &delivery.properties;
                let kind = props.kind().as_ref().map(|k| k.as_str()).unwrap_or("");
                let Some(k) = props
                    .correlation_id()
                    .as_ref()
                    .and_then(|id| id.as_str().parse::<u64>().ok())
                    .filter(|k| *k < plan.requests)
                else {
                    c.unknown += 1;
                    continue;
                };
                let mut s = lock(shared);
                match kind {
                    "accepted" => match s.pending.get_mut(&k) {
                        Some(p) if p.accepted => c.duplicate_accepts += 1,
                        Some(p) => {
                            p.accepted = true;
                            c.accept.saturating_record(micros(now - p.sent));
                        }
                        // After its result: a repeat's reply, or out of order.
                        None if done.get(k) => c.duplicate_accepts += 1,
                        None => c.unknown += 1,
                    },
                    "result" | "rejected" => match s.pending.remove(&k) {
                        Some(p) => {
                            semaphore.add_permits(1);
                            done.set(k);
                            if kind == "rejected" {
                                c.rejected += 1;
                            } else {
                                if !p.accepted {
                                    c.order_violations += 1;
                                }
                                c.result.saturating_record(micros(now - p.sent));
                                c.results += 1;
                                c.last_result = Some(now);
                            }
                        }
                        None if done.get(k) => c.duplicate_results += 1,
                        None => c.unknown += 1,
                    },
                    _ => c.unknown += 1,
                }
                if c.results + c.rejected + s.nacked >= plan.requests {
                    break;
                }
            }
            _ = tick.tick() => {
                if let Some(bar) = progress {
                    bar.set_position(c.results);
                    let secs = t0.elapsed().as_secs_f64();
                    if secs > 0.0 {
                        bar.set_message(format!("{:.0}/s", c.results as f64 / secs));
                    }
                }
                let s = lock(shared);
                if let Some(e) = &s.publisher_error {
                    c.error = Some(format!("publisher: {e}"));
                    break;
                }
                if c.results + c.rejected + s.nacked >= plan.requests {
                    break;
                }
                drop(s);
                if *server_gone.borrow() {
                    c.error = Some("the server stopped during the run".into());
                    break;
                }
                if last_progress.elapsed() > plan.idle_timeout {
                    c.timed_out = true;
                    break;
                }
            }
        }
    }
    c
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

// ---------------------------------------------------------------------------------------------
// Machine, memory, disk.

/// `nproc`, CPU model and memory, so that figures are reported with the machine.
fn machine() -> String {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| field_kib(&s, "MemTotal"))
        .map(|k| format!(", {} MiB RAM", k / 1024))
        .unwrap_or_default();
    format!("nproc {nproc}, {model}{mem}")
}

fn field_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A field of `/proc/self/status` in KiB (`VmHWM`, `VmRSS`).
fn proc_status_kib(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| field_kib(&s, field))
}

/// Resets `VmHWM` to the current RSS (Linux 4.0+), so each target reports its own peak.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// User + system CPU seconds of `/proc/<pid>/stat` (`pid` may be `self`).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_cpu_seconds(&stat)
}

/// CPU seconds of each thread of this process, by thread id, with the thread's name.
fn thread_cpu() -> HashMap<u64, (String, f64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let name = stat
            .find('(')
            .zip(stat.rfind(')'))
            .map(|(a, b)| stat[a + 1..b].to_string())
            .unwrap_or_default();
        if let Some(secs) = stat_cpu_seconds(&stat) {
            out.insert(tid, (name, secs));
        }
    }
    out
}

/// CPU seconds per thread name between two `thread_cpu` samples, largest first.
fn thread_cpu_delta(
    start: &HashMap<u64, (String, f64)>,
    end: &HashMap<u64, (String, f64)>,
) -> Vec<(String, f64)> {
    let mut by_name: HashMap<String, f64> = HashMap::new();
    for (tid, (name, secs)) in end {
        let before = start.get(tid).map(|(_, s)| *s).unwrap_or(0.0);
        *by_name.entry(name.clone()).or_default() += secs - before;
    }
    let mut v: Vec<(String, f64)> = by_name.into_iter().filter(|(_, s)| *s >= 0.05).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some((utime + stime) as f64 / 100.0)
}

/// The local RabbitMQ (`beam.smp`) process, when there is exactly one, for its CPU time.
fn find_broker_pid() -> Option<u32> {
    let mut found = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "beam.smp" {
            if found.is_some() {
                return None;
            }
            found = Some(pid);
        }
    }
    found
}

struct FsyncProbe {
    samples: usize,
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
}

/// 200 appends of 4 KiB, each followed by `fdatasync`, in the data directory.
fn fsync_probe(dir: &Path) -> std::io::Result<FsyncProbe> {
    let path = dir.join("fsync-probe.tmp");
    let mut file = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let mut samples = Vec::with_capacity(200);
    for _ in 0..200 {
        file.write_all(&block)?;
        let start = Instant::now();
        file.sync_data()?;
        samples.push(micros(start.elapsed()));
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Ok(FsyncProbe {
        samples: samples.len(),
        p50_us: at(0.5),
        p99_us: at(0.99),
        max_us: samples[samples.len() - 1],
    })
}

// ---------------------------------------------------------------------------------------------
// The report.

struct Report {
    target: Target,
    queue_type: QueueType,
    client: ClientReport,
    rss_start_kib: Option<u64>,
    peak_rss_kib: Option<u64>,
    rss_reset: bool,
    fsync: Option<FsyncProbe>,
    server_ok: bool,
    cleaned: bool,
    notes: Vec<String>,
}

impl Report {
    fn missing(&self) -> u64 {
        self.client.requests.saturating_sub(self.client.results)
    }

    /// Every request has its result and nothing failed: the figures mean what they say.
    fn complete(&self) -> bool {
        self.missing() == 0 && self.client.error.is_none() && self.server_ok
    }

    fn ok(&self) -> bool {
        self.complete() && self.cleaned
    }

    fn throughput(&self) -> f64 {
        let secs = self.client.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.client.results as f64 / secs
        } else {
            0.0
        }
    }

    fn print(&self) {
        let c = &self.client;
        println!();
        println!(
            "== target {} ({} queues) ==",
            self.target.name(),
            self.queue_type.as_str()
        );
        println!(
            "requests     {} published, {} results, {} rejected, {} nacked by the broker",
            c.published, c.results, c.rejected, c.nacked
        );
        println!(
            "load         {}",
            match c.rate {
                Some(r) => format!(
                    "rate {r} req/s scheduled, {:.0} req/s published (latency from the scheduled time)",
                    rate(c.published, c.publish_elapsed)
                ),
                None => format!(
                    "closed loop, at most {} without a result; published at {:.0} req/s",
                    c.concurrency,
                    rate(c.published, c.publish_elapsed)
                ),
            }
        );
        println!(
            "elapsed      {:.2} s (first publish to last result)",
            c.elapsed.as_secs_f64()
        );
        println!("throughput   {:.0} results/s", self.throughput());
        println!("accept       {}", percentiles(&c.accept));
        println!("result       {}", percentiles(&c.result));
        let rss = |k: Option<u64>| {
            k.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| "n/a".into())
        };
        println!(
            "peak RSS     {} (VmHWM of this process{}{}; {} at start)",
            rss(self.peak_rss_kib),
            if self.target == Target::Embedded {
                ", includes the worker"
            } else {
                ""
            },
            if self.rss_reset {
                ", reset before this target"
            } else {
                ", not resettable here: peak of the whole process"
            },
            rss(self.rss_start_kib)
        );
        let cpu = &c.cpu;
        let wall = cpu.window.as_secs_f64();
        let share = |secs: Option<f64>| match secs {
            Some(s) if wall > 0.0 => format!(
                "{s:.1} s ({:.0}% of one core, {:.0} µs/request)",
                100.0 * s / wall,
                1e6 * s / c.results.max(1) as f64
            ),
            _ => "n/a".into(),
        };
        println!(
            "cpu          this process {}; broker {} (over {wall:.1} s)",
            share(cpu.this_process),
            share(cpu.broker)
        );
        if !cpu.threads.is_empty() {
            let parts: Vec<String> = cpu
                .threads
                .iter()
                .map(|(name, secs)| format!("{name} {secs:.1} s"))
                .collect();
            println!("cpu threads  {}", parts.join(", "));
        }
        if let Some(f) = &self.fsync {
            println!(
                "fsync        p50 {} p99 {} max {} ({} x 4 KiB fdatasync in the data directory, this run)",
                ms(f.p50_us),
                ms(f.p99_us),
                ms(f.max_us),
                f.samples
            );
        }
        println!(
            "missing      {} results missing, {} duplicate results, {} duplicate accepted replies, {} results before their accepted reply, {} unknown replies",
            self.missing(),
            c.duplicate_results,
            c.duplicate_accepts,
            c.order_violations,
            c.unknown
        );
        if c.timed_out {
            println!(
                "timeout      no reply for the idle timeout; the run was cut short ({} of {} results)",
                c.results, c.requests
            );
        }
        if let Some(e) = &c.error {
            println!("error        {e}");
        }
        for note in &self.notes {
            println!("note         {note}");
        }
        let _ = std::io::stdout().flush();
    }
}

fn rate(n: u64, d: Duration) -> f64 {
    let secs = d.as_secs_f64();
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn percentiles(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {}  p99 {}  p99.9 {}  max {}  (n = {})",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.len()
    )
}

fn short_percentiles(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "n/a".into();
    }
    format!(
        "p50 {} p99 {}",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99))
    )
}

fn print_compare(ceiling: &Report, embedded: &Report) {
    let (tc, te) = (ceiling.throughput(), embedded.throughput());
    let p99 = |r: &Report| {
        if r.client.result.is_empty() {
            "n/a".to_string()
        } else {
            ms(r.client.result.value_at_quantile(0.99))
        }
    };
    println!();
    println!("== compare ({} queues) ==", embedded.queue_type.as_str());
    println!("                   ceiling      embedded");
    println!("throughput         {tc:>7.0}/s    {te:>7.0}/s");
    println!(
        "result p99         {:>10}   {:>10}",
        p99(ceiling),
        p99(embedded)
    );
    if !(ceiling.complete() && embedded.complete()) {
        println!("ratio embedded/ceiling = n/a (a run did not complete; see above)");
    } else if tc > 0.0 {
        println!("ratio embedded/ceiling = {:.2}", te / tc);
    } else {
        println!("ratio embedded/ceiling = n/a (the ceiling run has no results)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_bitset_marks_and_ignores_out_of_range() {
        let mut d = Done::new(130);
        assert!(!d.get(0) && !d.get(129));
        d.set(0);
        d.set(64);
        d.set(129);
        d.set(100_000); // out of range: ignored
        assert!(d.get(0) && d.get(64) && d.get(129));
        assert!(!d.get(1) && !d.get(128) && !d.get(100_000));
    }

    #[test]
    fn proc_fields_parse() {
        let status = "Name:\tx\nVmHWM:\t  12345 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(field_kib(status, "VmHWM"), Some(12345));
        assert_eq!(field_kib(status, "VmRSS"), Some(100));
        assert_eq!(field_kib(status, "VmSwap"), None);
        // A command name with spaces and parentheses; utime 250 and stime 50 ticks.
        let stat = "42 (rp (x) y) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100";
        assert_eq!(stat_cpu_seconds(stat), Some(3.0));
    }

    #[test]
    fn thread_cpu_delta_groups_by_name() {
        let start = HashMap::from([(1, ("a".to_string(), 1.0)), (2, ("b".to_string(), 0.5))]);
        let end = HashMap::from([
            (1, ("a".to_string(), 3.0)),
            (2, ("b".to_string(), 0.5)),
            (3, ("a".to_string(), 1.0)),
        ]);
        assert_eq!(thread_cpu_delta(&start, &end), vec![("a".to_string(), 3.0)]);
    }
}
