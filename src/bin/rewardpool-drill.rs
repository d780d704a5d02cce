//! `rewardpool-drill`: drives the engine alone (no broker) with a synthetic stream of draws.
//!
//! A test tool, not part of the worker: the crash and recovery tests run it as a child process
//! (`env!("CARGO_BIN_EXE_rewardpool-drill")`). Request k has `message_id` `m-<k>`, pool k mod
//! #pools, user `u<k>`, count 1 + k mod 3. It prints, one line each, flushed:
//!
//! ```text
//! assigned <request_id> <message_id> <new|repeat>     before the request goes to the engine
//! done <request_id> <message_id> <new|repeat> <items> after its record is on disk
//! ```
//!
//! With `--admin-every N`, request k with k mod N = N - 1 is an admin command instead of a
//! draw, `message_id` `a-<k>`, cycling through: restock default/gold +3, set_quantity
//! default/silver to k mod 50, close_pool spin, open_pool spin, add_item default `extra-<k>`
//! (quantity 2), restock spin/try_again (unlimited: rejected). Its lines:
//!
//! ```text
//! assigned <request_id> a-<k> admin
//! done <request_id> a-<k> <applied|repeat|rejected> -   (a repeat names the first's ID)
//! ```
//!
//! A test kills it (SIGKILL, or a failpoint) at any moment and checks, after a restart, that
//! every `done` line is in the durable state and no ID or `message_id` was used twice.
//!
//! Failpoints: this binary is the failpoints' user. The crash tests arm one with
//! `REWARDPOOL_FAILPOINT=name[:n]`; the points themselves sit in the library's storage code
//! (`rewardpool::failpoint`) and this tool calls none of its own.

use clap::Parser;
use rewardpool::admin::AdminCommand;
use rewardpool::admission::{AdminSpec, Admission, Assigned, DrawSpec, Submission};
use rewardpool::config::Config;
use rewardpool::engine::{Engine, EngineOptions};
use rewardpool::recovery;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

/// Drive the engine alone with synthetic draws (crash tests, storage benchmarks).
#[derive(Parser)]
#[command(name = "rewardpool-drill", version)]
struct DrillArgs {
    /// TOML configuration file; without it the built-in defaults apply.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory; overrides storage.data_dir.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Number of the first request (its message_id is `m-<first>`).
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Requests to draw.
    #[arg(long, default_value_t = 1000)]
    requests: u64,
    /// Keep every WAL segment (no pruning), so tests can audit the full history.
    #[arg(long, alias = "keep-wal")]
    keep_all_wal: bool,
    /// Print only the final count.
    #[arg(long)]
    quiet: bool,
    /// Every N-th request is an admin command (0: none); see the module comment.
    #[arg(long, default_value_t = 0)]
    admin_every: u64,
}

fn main() -> ExitCode {
    let args = DrillArgs::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = Config::load(args.config.as_deref())
        .map_err(anyhow::Error::from)
        .and_then(|mut config| {
            if let Some(dir) = &args.data_dir {
                config.storage.data_dir = dir.clone();
            }
            run(
                &config,
                &DrillOptions {
                    first: args.first,
                    requests: args.requests,
                    keep_all_wal: args.keep_all_wal,
                    quiet: args.quiet,
                    admin_every: args.admin_every,
                },
            )
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct DrillOptions {
    first: u64,
    requests: u64,
    keep_all_wal: bool,
    quiet: bool,
    admin_every: u64,
}

/// The admin command of request `k` (see the module comment).
fn admin_command(k: u64, every: u64) -> AdminCommand {
    let (pool, item) = ("default".to_string(), "gold".to_string());
    match (k / every) % 6 {
        0 => AdminCommand::Restock { pool, item, add: 3 },
        1 => AdminCommand::SetQuantity {
            pool,
            item: "silver".into(),
            quantity: k % 50,
        },
        2 => AdminCommand::ClosePool {
            pool: "spin".into(),
        },
        3 => AdminCommand::OpenPool {
            pool: "spin".into(),
        },
        4 => AdminCommand::AddItem {
            pool,
            item: format!("extra-{k}"),
            quantity: Some(2),
            weight: None,
        },
        _ => AdminCommand::Restock {
            pool: "spin".into(),
            item: "try_again".into(),
            add: 1,
        },
    }
}

fn run(config: &Config, options: &DrillOptions) -> anyhow::Result<()> {
    let recovered = recovery::recover(config, options.keep_all_wal)?;
    let pool_indexes: Vec<u32> = config
        .pools
        .iter()
        .map(|p| {
            recovered
                .state
                .pool_index(&p.id)
                .expect("recovery seeds every config pool")
        })
        .collect();
    // The ticket each request carries through the engine is its message_id.
    let window = Admission::<String>::window_of(&recovered.state);
    let (mut engine, mut committed) = Engine::<String>::start(
        recovered.state,
        recovered.segment,
        EngineOptions::from_config(config, options.keep_all_wal),
    );
    let mut admission = Admission::new(window, engine.ids(), engine.sender());
    let quiet = options.quiet;
    let printer = std::thread::spawn(move || {
        let mut done = 0u64;
        while let Some(batch) = committed.blocking_recv() {
            let mut out = std::io::stdout().lock();
            for c in batch.completions {
                done += 1;
                if !quiet {
                    let items: Vec<&str> = c.outcome.items.iter().map(|s| &**s).collect();
                    let kind = match (c.ticket.starts_with("a-"), &c.rejected, c.repeat) {
                        (_, _, true) => "repeat",
                        (true, Some(_), _) => "rejected",
                        (true, None, _) => "applied",
                        (false, _, false) => "new",
                    };
                    let _ = writeln!(
                        out,
                        "done {} {} {kind} {}",
                        c.outcome.request_id,
                        c.ticket,
                        if items.is_empty() {
                            "-".to_string()
                        } else {
                            items.join(",")
                        }
                    );
                }
            }
            let _ = out.flush();
        }
        done
    });
    for k in options.first..options.first + options.requests {
        if options.admin_every > 0 && k % options.admin_every == options.admin_every - 1 {
            let message_id = format!("a-{k}");
            let Ok(new) = admission.assign_admin_blocking() else {
                break;
            };
            if !quiet {
                println!("assigned {} {message_id} admin", new.request_id);
            }
            let spec = AdminSpec {
                message_id: Some(message_id.clone()),
                command: admin_command(k, options.admin_every),
            };
            if admission
                .submit_blocking(Submission::Admin(new, spec), message_id)
                .is_err()
            {
                break;
            }
            continue;
        }
        let message_id = format!("m-{k}");
        let Ok(assigned) = admission.assign_blocking(Some(&message_id)) else {
            break;
        };
        if !quiet {
            println!(
                "assigned {} {} {}",
                assigned.request_id(),
                message_id,
                if matches!(assigned, Assigned::Repeat(_)) {
                    "repeat"
                } else {
                    "new"
                }
            );
        }
        let draw = DrawSpec {
            message_id: Some(message_id.clone()),
            pool_index: pool_indexes[(k % pool_indexes.len() as u64) as usize],
            user: format!("u{k}"),
            count: 1 + (k % 3) as u32,
        };
        if admission
            .submit_blocking(assigned.with_draw(draw), message_id)
            .is_err()
        {
            break;
        }
    }
    drop(admission);
    engine.close();
    let fatal = engine.fatal();
    let result = engine.join();
    let done = printer.join().unwrap_or(0);
    eprintln!("drill: {done} completed");
    if let Some(e) = fatal {
        anyhow::bail!("engine stopped: {e}");
    }
    result?;
    Ok(())
}
