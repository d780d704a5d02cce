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
    }
}
