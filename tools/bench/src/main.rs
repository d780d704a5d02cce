//! The `rewardpool-bench` binary: command line and logging around [`bench`].
//!
//! `cargo run --release -p rewardpool-bench -- [--requests N] [--concurrency C | --rate R]
//! [--target compare|embedded|external|ceiling] [--queue-type classic|quorum]`, or
//! `-- --shards A.toml,B.toml [--requests N] [--concurrency C]` for running shards (see
//! [`shards`]).

mod bench;
mod shards;

use clap::Parser;
use rewardpool::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

/// Load generator: worker throughput and latency over the real client path, next to the
/// broker's own ceiling on that path.
#[derive(Parser)]
#[command(name = "rewardpool-bench", version)]
struct BenchArgs {
    /// TOML configuration file; without it the built-in defaults apply.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Requests to publish.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    requests: u64,
    /// Requests published but without a result yet, at most.
    #[arg(long, value_name = "C", default_value_t = 2000)]
    concurrency: u64,
    /// Requests per second on a fixed schedule (latency from the scheduled time), instead of
    /// the closed loop at --concurrency.
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// What to drive: the worker in this process, a running worker, the broker's ceiling on
    /// the same path, or ceiling then embedded with their ratio.
    #[arg(long, value_enum, default_value_t = bench::Target::Compare)]
    target: bench::Target,
    /// Type of the queues the benchmark declares (default: amqp.queue_type).
    #[arg(long, value_enum)]
    queue_type: Option<bench::QueueTypeArg>,
    /// Where the embedded worker's temporary data directory is created (default: the system
    /// temp dir); it is removed after the run.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Give up when no reply arrived for this many seconds (`--timeout` still accepted).
    #[arg(long, alias = "timeout", value_name = "SECS", default_value_t = 120)]
    timeout_s: u64,
    /// Drive these RUNNING workers (their config files, comma-separated, one routing exchange)
    /// through the exchange: first the first worker alone, then all of them; per-worker and
    /// total throughput and the broker's CPU per request. --requests is per phase.
    #[arg(long, value_name = "FILES", value_delimiter = ',')]
    shards: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if !args.shards.is_empty() {
        let options = shards::ShardsOptions {
            configs: args.shards,
            requests: args.requests,
            concurrency: args.concurrency,
            idle_timeout: std::time::Duration::from_secs(args.timeout_s),
        };
        return match shards::run(options) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let result = Config::load(args.config.as_deref())
        .map_err(anyhow::Error::from)
        .and_then(|config| {
            bench::run(
                config,
                bench::BenchOptions {
                    requests: args.requests,
                    concurrency: args.concurrency,
                    rate: args.rate,
                    target: args.target,
                    queue_type: args.queue_type.map(Into::into),
                    data_dir: args.data_dir,
                    idle_timeout: std::time::Duration::from_secs(args.timeout_s),
                },
            )
        });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
