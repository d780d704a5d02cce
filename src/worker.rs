//! The worker (`rewardpool run`): recovery, the engine, and the broker sessions around it.
//!
//! ```text
//! recover ─▶ engine threads ─────────────────────────────┐
//!              ▲ Command (bounded)                        │ Committed (durable)
//! broker ─▶ ingest (per session) ── accepted reply ─▶     ▼
//!                                              settle: results, confirms, acks ─▶ broker
//! ```
//!
//! The supervisor loop owns the sessions: connect, declare, consume; on any error it drops the
//! session whole, backs off (capped exponential) and builds a new one. The engine, the admission
//! window and the settler live across sessions. There is one shutdown path: the signal stops
//! ingest (consumer cancelled), the engine is closed and drains, the settler publishes and acks
//! everything accepted, unaccepted deliveries are nacked back to the queue, the engine writes
//! its final snapshot, and the process exits 0 — all within `amqp.shutdown_deadline_ms`.

use crate::admission::Admission;
use crate::amqp::{self, AmqpError, Link};
use crate::config::{AmqpConfig, Config};
use crate::drill::engine_options;
use crate::engine::Engine;
use crate::ingest::{self, IngestEnd, Pools};
use crate::metrics::{Metrics, Readiness};
use crate::observe;
use crate::recovery;
use crate::session::{Session, Ticket};
use crate::settle;
use crate::shutdown;
use lapin::Consumer;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A session that lasted this long counts as healthy: its failure restarts the backoff.
const SESSION_HEALTHY: Duration = Duration::from_secs(30);

pub fn run(config: Config) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("rp-async")
        .build()?;
    runtime.block_on(run_async(config))
}

/// Connects, declares and starts consuming: one session, or the error that prevented it.
async fn open_session(
    cfg: &Arc<AmqpConfig>,
    epoch: u64,
) -> Result<(Link, Arc<Session>, Consumer), AmqpError> {
    let link = amqp::connect(cfg, &format!("rewardpool worker {}", std::process::id())).await?;
    amqp::declare(&link, cfg).await?;
    let session = Arc::new(Session::new(
        epoch,
        link.consume.clone(),
        link.publish.clone(),
        cfg.clone(),
    ));
    let consumer = ingest::start_consumer(&session, &cfg.request_queue).await?;
    Ok((link, session, consumer))
}

async fn close_link(link: &Link, cfg: &AmqpConfig) {
    let _ = amqp::timed(
        "connection.close",
        cfg.operation_timeout_ms.min(2000),
        link.connection.close(200, "rewardpool closing".into()),
    )
    .await;
}

pub async fn run_async(config: Config) -> anyhow::Result<ExitCode> {
    let stop = shutdown::listen()?;
    run_until(config, stop).await
}

/// Runs the worker until `stop` turns true (used by `run_async` with the signal listener, and
/// by benchmarks and tests that embed the worker).
pub async fn run_until(
    config: Config,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<ExitCode> {
    let cfg = Arc::new(config.amqp.clone());
    let metrics = Arc::new(Metrics::new());
    // The listener comes first: a taken address is an error at start, and /readyz answers
    // "recovering" while recovery runs. It is aborted when this function returns.
    let _http = match config.metrics.listen.as_str() {
        "" => None,
        listen => {
            let listener = observe::bind(listen).await?;
            tracing::info!(listen = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
            Some(AbortOnDrop(observe::serve(listener, metrics.clone())))
        }
    };
    tracing::info!(data_dir = %config.storage.data_dir.display(), "recovering");
    let recovery_config = config.clone();
    let recovered =
        tokio::task::spawn_blocking(move || recovery::recover(&recovery_config, false)).await??;
    let state = recovered.state;
    metrics.set_stock(&state);
    metrics.set_readiness(Readiness::Connecting);
    let pools = Pools {
        default_pool: config.pools[0].id.clone(),
        index: config
            .pools
            .iter()
            .map(|p| {
                let index = state
                    .pool_index(&p.id)
                    .expect("recovery seeds every config pool");
                (p.id.clone(), index)
            })
            .collect(),
    };
    let window = Admission::<Ticket>::window_of(&state);
    let (mut engine, committed) =
        Engine::<Ticket>::start(state, recovered.segment, engine_options(&config, false));
    metrics.register_engine(&engine.stats());
    let mut admission = Admission::new(window, engine.ids(), engine.sender());
    let (current_tx, current_rx) = watch::channel::<Option<Arc<Session>>>(None);
    // The committed stream ends only when the engine's writer stops: before shutdown that is a
    // fatal storage error, and the worker must stop too, idle or not.
    let (engine_stopped_tx, mut engine_stopped) = watch::channel(false);
    let settle_metrics = metrics.clone();
    let settler = tokio::spawn(async move {
        let stats = settle::run(committed, current_rx, settle_metrics.clone()).await;
        // The committed stream ends before shutdown only when the engine's writer stopped on
        // a storage error: /healthz says so from here until the process exits.
        if settle_metrics.readiness() != Readiness::ShuttingDown {
            settle_metrics.set_storage_failed();
        }
        let _ = engine_stopped_tx.send(true);
        stats
    });

    let backoff_min = Duration::from_millis(cfg.reconnect_backoff_min_ms);
    let backoff_max = Duration::from_millis(cfg.reconnect_backoff_max_ms);
    let mut backoff = backoff_min;
    let mut epoch = 0u64;
    let mut engine_failed = false;
    let mut last_session: Option<(Link, Arc<Session>)> = None;
    tracing::info!(url = %cfg.url_redacted(), queue = %cfg.request_queue, "connecting to the broker");
    loop {
        if *stop.borrow() {
            break;
        }
        if *engine_stopped.borrow() {
            engine_failed = true;
            metrics.set_storage_failed();
            break;
        }
        epoch += 1;
        let (link, session, consumer) = match open_session(&cfg, epoch).await {
            Ok(v) => v,
            Err(e) if e.is_permanent() => {
                tracing::error!(error = %e, "cannot use the broker's queues or exchange");
                drop(admission);
                engine.close();
                let _ = settler.await;
                let _ = tokio::task::spawn_blocking(move || engine.join()).await;
                return Err(e.into());
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "broker unavailable; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => {}
                    _ = engine_stopped.wait_for(|s| *s) => {}
                }
                backoff = (backoff * 2).min(backoff_max);
                continue;
            }
        };
        let session_started = std::time::Instant::now();
        let _ = current_tx.send(Some(session.clone()));
        metrics.set_readiness(Readiness::Ready);
        tracing::info!(epoch, "connected; consuming");
        match ingest::run(
            session.clone(),
            consumer,
            &mut admission,
            &pools,
            &metrics,
            stop.clone(),
            engine_stopped.clone(),
        )
        .await
        {
            IngestEnd::Shutdown => {
                last_session = Some((link, session));
                break;
            }
            IngestEnd::EngineGone => {
                engine_failed = true;
                metrics.set_storage_failed();
                metrics.set_readiness(Readiness::ShuttingDown);
                session.fail("engine stopped".into());
                let _ = current_tx.send(None);
                close_link(&link, &cfg).await;
                break;
            }
            IngestEnd::Failed(reason) => {
                // A session that dies young keeps the backoff growing (no tight reconnect loop
                // when something fails right after connecting); one that lived resets it.
                if session_started.elapsed() >= SESSION_HEALTHY {
                    backoff = backoff_min;
                }
                metrics.set_readiness(Readiness::Reconnecting);
                metrics.broker_reconnects.inc();
                tracing::warn!(%reason, epoch, retry_in_ms = backoff.as_millis() as u64, "broker session lost; reconnecting");
                session.fail(reason);
                let _ = current_tx.send(None);
                close_link(&link, &cfg).await;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => {}
                    _ = engine_stopped.wait_for(|s| *s) => {}
                }
                backoff = (backoff * 2).min(backoff_max);
            }
        }
    }

    // The one shutdown path.
    metrics.set_readiness(Readiness::ShuttingDown);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(cfg.shutdown_deadline_ms);
    drop(admission);
    engine.close();
    let settled = tokio::time::timeout_at(deadline, settler).await;
    let mut clean = true;
    match settled {
        Ok(Ok(stats)) => tracing::info!(
            acked = stats.acked,
            requeued = stats.requeued,
            dropped_stale = stats.dropped_stale,
            "results settled"
        ),
        Ok(Err(e)) => {
            clean = false;
            tracing::error!(error = %e, "settler failed");
        }
        Err(_) => {
            clean = false;
            tracing::error!(
                "shutdown deadline passed before every accepted request was acked; they will be redelivered"
            );
        }
    }
    if let Some((link, session)) = last_session {
        if let Err(e) = session.requeue_unsettled().await {
            tracing::warn!(error = %e, "could not return unaccepted deliveries; closing the connection returns them");
        }
        close_link(&link, &cfg).await;
    }
    let joined = tokio::task::spawn_blocking(move || engine.join()).await?;
    if let Err(e) = joined {
        tracing::error!(error = %e, "engine stopped with an error");
        return Err(e.into());
    }
    if engine_failed {
        anyhow::bail!("the engine stopped");
    }
    drop(recovered.lock);
    tracing::info!("stopped");
    Ok(if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Aborts a spawned task when dropped (the metrics listener ends with the worker).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
