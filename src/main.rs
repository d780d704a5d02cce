//! The `rewardpool` binary: command line, logging, exit codes.

use clap::{Args, Parser, Subcommand};
use rewardpool::config::{Config, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;

// mimalloc instead of glibc's malloc: a request costs about 120 small allocations across the
// ingest, settle and lapin threads, many freed on another thread than the one that made them,
// where glibc's arenas spend their time in consolidation (README, "Broker path cost").
// Built with `no_thp`: with transparent huge pages mimalloc backs the dedupe windows' large
// tables with 2 MiB pages, and the first requests after a start each paid for zeroing one
// (a 25-50 ms p99 over the first 50 requests at 2,500/s, against 10-20 ms without; RSS at
// start 42 MiB against 18 MiB). A build-time choice: `MIMALLOC_ALLOW_THP=1` does not undo it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// A live terminal view of a running worker, read from its /metrics.
    Top(TopArgs),
    /// Re-derive every retained draw and check the log's story; changes no file.
    Audit(AuditArgs),
    /// Send one admin command to the running worker and print its reply (exit 0 applied,
    /// 1 rejected, 2 no reply in time, 3 not sent).
    Admin(rewardpool::admin_client::AdminArgs),
}

#[derive(Args)]
struct AuditArgs {
    #[command(flatten)]
    common: Common,
    /// Write an audit bundle (JSON lines, docs/audit.md) a third party can check.
    #[arg(long, value_name = "FILE")]
    export: Option<PathBuf>,
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
        Command::Audit(a) => Some(&a.common),
        Command::Wal {
            command: WalCommand::Dump(c),
        } => Some(c),
        Command::Admin(a) => {
            return Config::load(a.op.send_options().config.as_deref())
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
            for difference in &out.drift {
                eprintln!("config differs from the durable state (the state wins): {difference}");
            }
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
        Command::Audit(args) => {
            let config = load_config(&args.common)?;
            let summary = rewardpool::audit::audit(
                &config.storage.data_dir,
                config.storage.dedupe_window,
                args.export.as_deref(),
                true,
            )?;
            println!("{}", serde_json::to_string(&summary)?);
            match &summary.first_mismatch {
                None => Ok(ExitCode::SUCCESS),
                Some(mismatch) => {
                    eprintln!("error: audit failed: {mismatch}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        // Its own exit codes (the contract's 0/1/2, and 3 for "not sent"), its own errors.
        Command::Admin(args) => Ok(rewardpool::admin_client::main(args)),
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
    }
}
