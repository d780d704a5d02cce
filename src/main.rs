//! The `rewardpool` binary: command line, logging, exit codes.

use clap::{Args, Parser, Subcommand};
use rewardpool::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "rewardpool",
    version,
    about = "Durable reward-pool draw worker over RabbitMQ"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    /// TOML configuration file; without it the built-in defaults apply.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory; overrides storage.data_dir.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker.
    Run(Common),
    /// Print the recovered pool state as JSON without changing any file.
    Inspect(Common),
    /// WAL tools.
    Wal {
        #[command(subcommand)]
        command: WalCommand,
    },
    /// Load generator: worker throughput and latency over the real client path, next to the
    /// broker's own ceiling on that path.
    Bench(BenchArgs),
    /// Drive the engine alone with synthetic draws (crash tests, storage benchmarks).
    #[command(hide = true)]
    Drill {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 0)]
        first: u64,
        #[arg(long, default_value_t = 1000)]
        requests: u64,
        /// Keep every WAL segment (no pruning), so tests can audit the full history.
        #[arg(long, alias = "keep-wal")]
        keep_all_wal: bool,
        #[arg(long)]
        quiet: bool,
    },
}

#[derive(Args)]
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
    #[arg(long, value_enum, default_value_t = rewardpool::bench::Target::Compare)]
    target: rewardpool::bench::Target,
    /// Type of the queues the benchmark declares (default: amqp.queue_type).
    #[arg(long, value_enum)]
    queue_type: Option<rewardpool::bench::QueueTypeArg>,
    /// Where the embedded worker's temporary data directory is created (default: the system
    /// temp dir); it is removed after the run.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Give up when no reply arrived for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    timeout: u64,
}

#[derive(Subcommand)]
enum WalCommand {
    /// Print every WAL record, one per line, oldest first.
    Dump(Common),
}

fn load_config(common: &Common) -> anyhow::Result<Config> {
    let mut config = Config::load(common.config.as_deref())?;
    if let Some(dir) = &common.data_dir {
        config.storage.data_dir = dir.clone();
    }
    Ok(config)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(common) => {
            let config = load_config(&common)?;
            rewardpool::worker::run(config)
        }
        Command::Inspect(common) => {
            let config = load_config(&common)?;
            let out = rewardpool::inspect::inspect(&config, &config.storage.data_dir)?;
            println!("{}", serde_json::to_string(&out)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Wal {
            command: WalCommand::Dump(common),
        } => {
            let config = load_config(&common)?;
            let stdout = std::io::stdout();
            let stderr = std::io::stderr();
            rewardpool::inspect::wal_dump(
                &config.storage.data_dir,
                config.storage.dedupe_window,
                &mut stdout.lock(),
                &mut stderr.lock(),
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => {
            let config = Config::load(args.config.as_deref())?;
            rewardpool::bench::run(
                config,
                rewardpool::bench::BenchOptions {
                    requests: args.requests,
                    concurrency: args.concurrency,
                    rate: args.rate,
                    target: args.target,
                    queue_type: args.queue_type.map(Into::into),
                    data_dir: args.data_dir,
                    idle_timeout: std::time::Duration::from_secs(args.timeout),
                },
            )
        }
        Command::Drill {
            common,
            first,
            requests,
            keep_all_wal,
            quiet,
        } => {
            let config = load_config(&common)?;
            rewardpool::drill::run(
                &config,
                &rewardpool::drill::DrillOptions {
                    first,
                    requests,
                    keep_all_wal,
                    quiet,
                },
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
