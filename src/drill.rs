//! `rewardpool drill`: drives the engine alone (no broker) with a synthetic stream of draws.
//!
//! For crash tests and benchmarks of the storage path. Request k has `message_id` `m-<k>`,
//! pool k mod #pools, user `u<k>`, count 1 + k mod 3. It prints, one line each, flushed:
//!
//! ```text
//! assigned <request_id> <message_id> <new|repeat>     before the request goes to the engine
//! done <request_id> <message_id> <new|repeat> <items> after its record is on disk
//! ```
//!
//! A test kills it (SIGKILL, or a failpoint) at any moment and checks, after a restart, that
//! every `done` line is in the durable state and no ID or `message_id` was used twice.

use crate::admission::{Admission, Assigned, DrawSpec};
use crate::config::Config;
use crate::engine::{Engine, EngineOptions};
use crate::recovery;
use std::io::Write;

pub struct DrillOptions {
    pub first: u64,
    pub requests: u64,
    pub keep_all_wal: bool,
    pub quiet: bool,
}

pub fn engine_options(config: &Config, keep_all_wal: bool) -> EngineOptions {
    let s = &config.storage;
    EngineOptions {
        data_dir: s.data_dir.clone(),
        batch_records_max: s.batch_records_max,
        channel_capacity: s.channel_capacity,
        snapshot_every_records: s.snapshot_every_records,
        segment_bytes_max: s.segment_bytes_max,
        id_block_size: s.id_block_size,
        rng_seed: s.rng_seed,
        keep_all_wal,
    }
}

pub fn run(config: &Config, options: &DrillOptions) -> anyhow::Result<()> {
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
        engine_options(config, options.keep_all_wal),
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
                    let _ = writeln!(
                        out,
                        "done {} {} {} {}",
                        c.outcome.request_id,
                        c.ticket,
                        if c.repeat { "repeat" } else { "new" },
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
