//! Multi-worker mode (`--shards A.toml,B.toml`): drives several RUNNING workers through their
//! routing exchange (`amqp.exchange`, the same in every config) and reports per-worker and
//! total throughput, with the broker's CPU per request.
//!
//! Two phases in one run: first only the first worker's pools (one worker behind the
//! exchange), then every worker's pools (all workers). Requests are spread round-robin over
//! the phase's pools and published to the exchange with routing key = pool id; a closed loop
//! keeps at most `--concurrency` requests without a result. Each worker's results are read
//! from its own result queue (the bench acks them: run it against bench queues, not against a
//! result queue something else consumes). The broker's CPU is read from the `beam.smp`
//! process's `/proc/<pid>/stat` before and after each phase (utime + stime), so it is only
//! known when the broker runs on this machine.

use anyhow::{Context, bail};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rewardpool::config::Config;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Publisher confirms kept in flight at most.
const CONFIRMS_IN_FLIGHT_MAX: usize = 4096;

pub struct ShardsOptions {
    pub configs: Vec<PathBuf>,
    /// Requests per phase.
    pub requests: u64,
    pub concurrency: u64,
    pub idle_timeout: Duration,
}

struct Shard {
    config: Config,
    path: PathBuf,
    /// Results of the current phase seen on this worker's result queue.
    results: Arc<AtomicU64>,
}

pub fn run(options: ShardsOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run_async(options))
}

async fn run_async(options: ShardsOptions) -> anyhow::Result<()> {
    if options.configs.is_empty() {
        bail!("--shards needs at least one config file");
    }
    let mut shards = Vec::new();
    for path in &options.configs {
        let config = Config::load(Some(path))
            .with_context(|| format!("loading the shard config {}", path.display()))?;
        if config.amqp.exchange.is_empty() {
            bail!("{}: amqp.exchange is not set", path.display());
        }
        shards.push(Shard {
            config,
            path: path.clone(),
            results: Arc::new(AtomicU64::new(0)),
        });
    }
    let exchange = shards[0].config.amqp.exchange.clone();
    if let Some(other) = shards.iter().find(|s| s.config.amqp.exchange != exchange) {
        bail!(
            "{}: amqp.exchange {:?} differs from {:?}: the shards must share one exchange",
            other.path.display(),
            other.config.amqp.exchange,
            exchange
        );
    }
    let url = shards[0].config.amqp.url.clone();
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .context("connecting to the broker")?;
    let run_tag = format!("bench-{}-{}", std::process::id(), now_nanos());
    let window = Arc::new(Semaphore::new(0));
    // One consumer per worker's result queue: counts this run's results, frees window slots.
    for shard in &shards {
        let ch = conn.create_channel().await?;
        ch.basic_qos(2000, Default::default()).await?;
        let mut consumer = ch
            .basic_consume(
                shard.config.amqp.result_queue.as_str().into(),
                format!("{run_tag}-{}", shard.config.amqp.result_queue).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| {
                format!(
                    "consuming the result queue {:?} (is the worker running?)",
                    shard.config.amqp.result_queue
                )
            })?;
        let results = shard.results.clone();
        let window = window.clone();
        let prefix = format!("{run_tag}-");
        tokio::spawn(async move {
            let _keep = ch;
            while let Some(Ok(delivery)) = consumer.next().await {
                let ours = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .is_some_and(|c| c.as_str().starts_with(&prefix));
                if ours {
                    results.fetch_add(1, Ordering::Relaxed);
                    window.add_permits(1);
                }
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            }
        });
    }
    let publish = conn.create_channel().await?;
    publish.confirm_select(Default::default()).await?;

    let broker_pid = find_broker_pid();
    println!(
        "shards bench: exchange {exchange:?}, {} workers, {} requests per phase, concurrency {}, broker pid {}",
        shards.len(),
        options.requests,
        options.concurrency,
        broker_pid.map_or("not found (CPU not measured)".into(), |p| p.to_string())
    );
    let phases: Vec<usize> = if shards.len() > 1 {
        vec![1, shards.len()]
    } else {
        vec![1]
    };
    let mut seq = 0u64;
    for workers in phases {
        let active = &shards[..workers];
        let pools: Vec<String> = active
            .iter()
            .flat_map(|s| s.config.pools.iter().map(|p| p.id.clone()))
            .collect();
        for s in &shards {
            s.results.store(0, Ordering::Relaxed);
        }
        // The window starts with `concurrency` slots; any leftover permits are taken back.
        let _ = window.forget_permits(usize::MAX);
        window.add_permits(options.concurrency as usize);
        let cpu_before = broker_pid.and_then(cpu_seconds);
        let started = Instant::now();
        let mut confirms = FuturesUnordered::new();
        for n in 0..options.requests {
            let permit = tokio::time::timeout(options.idle_timeout, window.acquire())
                .await
                .context("no result within --timeout-s: are the workers running?")??;
            permit.forget();
            let pool = &pools[(n as usize) % pools.len()];
            seq += 1;
            let body = format!(r#"{{"pool":"{pool}","user":"bench"}}"#);
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(format!("{run_tag}-{seq}").into())
                .with_correlation_id(format!("{run_tag}-{seq}").into());
            let confirm = publish
                .basic_publish(
                    exchange.as_str().into(),
                    pool.as_str().into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await?;
            confirms.push(confirm);
            while confirms.len() >= CONFIRMS_IN_FLIGHT_MAX {
                confirms.next().await.expect("non-empty")?;
            }
        }
        while let Some(c) = confirms.next().await {
            c?;
        }
        let total = || {
            active
                .iter()
                .map(|s| s.results.load(Ordering::Relaxed))
                .sum::<u64>()
        };
        let mut last = (total(), Instant::now());
        while total() < options.requests {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = total();
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > options.idle_timeout {
                bail!(
                    "{} of {} results after {:?} without progress",
                    now,
                    options.requests,
                    options.idle_timeout
                );
            }
        }
        let elapsed = started.elapsed();
        let cpu = match (cpu_before, broker_pid.and_then(cpu_seconds)) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        let secs = elapsed.as_secs_f64();
        println!(
            "phase: {workers} worker(s), pools {pools:?}: {} requests in {:.2} s = {:.0} req/s total",
            options.requests,
            secs,
            options.requests as f64 / secs
        );
        for s in active {
            let n = s.results.load(Ordering::Relaxed);
            println!(
                "  worker {} (queue {:?}): {} results, {:.0} req/s",
                s.path.display(),
                s.config.amqp.request_queue,
                n,
                n as f64 / secs
            );
        }
        if let Some(cpu) = cpu {
            println!(
                "  broker (beam.smp) CPU: {:.2} s = {:.0} us per request, {:.0}% of one core",
                cpu,
                cpu * 1e6 / options.requests as f64,
                cpu * 100.0 / secs
            );
        }
    }
    let _ = conn.close(200, "bench done".into()).await;
    Ok(())
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The one `beam.smp` process on this machine (none or several: unknown).
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

/// utime + stime of a process in seconds, from `/proc/<pid>/stat` (clock ticks of 1/100 s,
/// the Linux USER_HZ on every mainstream architecture).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}
