//! The `rewardpool` binary: command line, logging, exit codes.

use clap::{Args, Parser, Subcommand};
use rewardpool::config::{Config, LogFormat};
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
        #[arg(long)]
        keep_wal: bool,
        #[arg(long)]
        quiet: bool,
    },
    /// A live terminal view of a running worker, read from its /metrics.
    Top(TopArgs),
}

#[derive(Args)]
struct TopArgs {
    /// TOML configuration file (for the default URL, from metrics.listen).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The worker's metrics URL, e.g. http://127.0.0.1:9464/metrics.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
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

/// Level when `RUST_LOG` is unset.
const DEFAULT_LOG_LEVEL: &str = "info";
/// lapin's own lines at every lost connection (three ERRORs, and "Exponential backoff attempts
/// exhausted" about a recovery the worker does not use) are off: the supervisor logs one WARN
/// with the reason. A `RUST_LOG` that names one of these targets decides for itself.
const QUIET_TARGETS: [&str; 2] = ["lapin", "amq_protocol"];

fn log_filter() -> tracing_subscriber::EnvFilter {
    let env = std::env::var("RUST_LOG").unwrap_or_default();
    let mut filter = if env.trim().is_empty() {
        tracing_subscriber::EnvFilter::new(DEFAULT_LOG_LEVEL)
    } else {
        tracing_subscriber::EnvFilter::try_new(&env)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_LEVEL))
    };
    for target in QUIET_TARGETS {
        if !env.contains(target)
            && let Ok(directive) = format!("{target}=off").parse()
        {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// Logs to stderr: text (colour only on a terminal) or one JSON object a line.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = log_filter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// `log.format` of the config the command will read; text when the config cannot be read
/// (the command itself then reports the error).
fn log_format(cli: &Cli) -> LogFormat {
    let common = match &cli.command {
        Command::Run(c) | Command::Inspect(c) => Some(c),
        Command::Wal {
            command: WalCommand::Dump(c),
        } => Some(c),
        Command::Drill { common, .. } => Some(common),
        Command::Bench(b) => {
            return Config::load(b.config.as_deref())
                .map(|c| c.log.format)
                .unwrap_or_default();
        }
        Command::Top(t) => {
            return Config::load(t.config.as_deref())
                .map(|c| c.log.format)
                .unwrap_or_default();
        }
    };
    common
        .and_then(|c| Config::load(c.config.as_deref()).ok())
        .map(|c| c.log.format)
        .unwrap_or_default()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(log_format(&cli));
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
        Command::Top(args) => {
            let url = match args.url {
                Some(url) => url,
                None => {
                    let config = Config::load(args.config.as_deref())?;
                    if config.metrics.listen.is_empty() {
                        anyhow::bail!(
                            "metrics.listen is \"\" (off): give the worker's metrics URL with --url"
                        );
                    }
                    format!("http://{}/metrics", config.metrics.listen)
                }
            };
            rewardpool::top::run(&url)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Drill {
            common,
            first,
            requests,
            keep_wal,
            quiet,
        } => {
            let config = load_config(&common)?;
            rewardpool::drill::run(
                &config,
                &rewardpool::drill::DrillOptions {
                    first,
                    requests,
                    keep_all_wal: keep_wal,
                    quiet,
                },
            )?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
