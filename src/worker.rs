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
//! its final snapshot, and the process exits 0 — all within `amqp.shutdown_deadline_ms`, which
//! bounds the whole path (past it the worker exits non-zero; the broker redelivers what was not
//! acked). A broker error no reconnect can fix and a storage failure take the same path.

use crate::admission::Admission;
use crate::amqp::{self, AmqpError, Link};
use crate::config::{AmqpConfig, Config};
use crate::engine::{Engine, EngineOptions};
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

/// After a lost session, how long the worker keeps trying to take its request-queue lock back
/// before it stops: the broker frees the old connection's lock only once it notices that
/// connection is gone (at once on a clean close, after missed heartbeats on a network failure).
const LOCK_REGAIN_MAX: Duration = Duration::from_secs(180);

pub fn run(config: Config) -> anyhow::Result<ExitCode> {
    // One thread runs every task (ingest, settle, the listener): wake-ups between ingest,
    // settle and lapin's I/O thread land on a thread that is usually awake already, with no
    // work stealing or parking between runtime threads (README, "Broker path cost").
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run_async(config));
    // After a passed shutdown deadline a blocking task (the engine join) may still run: do not
    // wait for it, the process is exiting.
    runtime.shutdown_timeout(Duration::from_millis(100));
    result
}

/// Connects, declares and starts consuming: one session, or the error that prevented it.
async fn open_session(
    cfg: &Arc<AmqpConfig>,
    epoch: u64,
    pool_ids: &[String],
    released: &[String],
    metrics: &Arc<Metrics>,
) -> Result<(Link, Arc<Session>, Consumers), AmqpError> {
    let link = amqp::connect(cfg, &format!("rewardpool worker {}", std::process::id())).await?;
    match start_session(&link, cfg, epoch, pool_ids, released, metrics).await {
        Ok((session, consumers)) => Ok((link, session, consumers)),
        Err(e) => {
            // Close explicitly: the locks taken so far (request queue, earlier pools) must
            // not outlive a session that never consumed.
            close_link(&link, cfg).await;
            Err(e)
        }
    }
}

/// The session's two consumers: requests, then admin commands (same channel).
struct Consumers {
    requests: Consumer,
    admin: Consumer,
}

/// Declares, takes the locks (request queue, then each served pool with its binding), removes
/// the bindings of pools it no longer serves (`released`), and consumes the request and admin
/// queues, on a fresh connection.
async fn start_session(
    link: &Link,
    cfg: &Arc<AmqpConfig>,
    epoch: u64,
    pool_ids: &[String],
    released: &[String],
    metrics: &Arc<Metrics>,
) -> Result<(Arc<Session>, Consumers), AmqpError> {
    // Listened to from the start: a connection.blocked can come at any time.
    let events = link.connection.events_listener();
    amqp::declare(link, cfg).await?;
    // The broker lock on the request queue, before consuming, on every session.
    amqp::take_lock(
        &link.lock,
        "request queue",
        &cfg.request_queue,
        cfg.operation_timeout_ms,
    )
    .await?;
    // With amqp.exchange: the routing topology, then each served pool's lock and binding, on
    // every session, before consuming (the broker freed the locks with the old connection).
    amqp::declare_routing(&link.consume, cfg).await?;
    for pool in pool_ids {
        amqp::own_pool(&link.lock, &link.consume, cfg, pool).await?;
    }
    for pool in released {
        amqp::release_pool(&link.consume, cfg, pool).await?;
    }
    let session = Arc::new(Session::new(
        epoch,
        link.consume.clone(),
        link.publish.clone(),
        link.lock.clone(),
        cfg.clone(),
    ));
    tokio::spawn(watch_events(
        Arc::downgrade(&session),
        events,
        metrics.clone(),
    ));
    let requests = ingest::start_consumer(&session, &cfg.request_queue).await?;
    let admin = ingest::start_admin_consumer(&session).await?;
    Ok((session, Consumers { requests, admin }))
}

/// Drains the connection's events (lapin queues them unbounded): connection.blocked and
/// unblocked (a broker memory or disk alarm) are logged and recorded on the session, whose
/// publishes and confirms then wait instead of timing out as a lost connection, and
/// `/readyz` answers 503 `blocked` meanwhile. Ends with the session.
async fn watch_events(
    session: std::sync::Weak<Session>,
    mut events: impl futures::Stream<Item = lapin::Event> + Unpin,
    metrics: Arc<Metrics>,
) {
    use futures::StreamExt;
    let Some(epoch) = session.upgrade().map(|s| s.epoch) else {
        return;
    };
    loop {
        let Some(s) = session.upgrade() else { break };
        let next = tokio::select! {
            e = events.next() => e,
            _ = s.broken() => break,
        };
        match next {
            None => break,
            Some(lapin::Event::ConnectionBlocked(reason)) => {
                // Recorded before it is logged: whoever reads the log sees /readyz agree.
                metrics.set_broker_blocked(epoch, true);
                tracing::warn!(epoch, %reason, "the broker blocks publishing (resource alarm: memory or disk); results wait until it unblocks");
                s.set_blocked(Some(reason));
            }
            Some(lapin::Event::ConnectionUnblocked) => {
                s.set_blocked(None);
                metrics.set_broker_blocked(epoch, false);
                tracing::info!(epoch, "the broker unblocked publishing");
            }
            Some(_) => {}
        }
    }
    // The session is over: its alarm with it (a new session learns of a standing alarm anew).
    metrics.set_broker_blocked(epoch, false);
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
///
/// `amqp.shutdown_deadline_ms` bounds the whole shutdown, from the signal (or from the moment
/// the worker decides to stop on its own: storage failure, broker error no reconnect can fix)
/// to the end: settling, returning unaccepted deliveries, closing the connection, joining the
/// engine. When it passes, the rest is dropped and the worker fails; deliveries not acked go
/// back to the queue when the connection ends, and the broker redelivers them.
pub async fn run_until(config: Config, stop: watch::Receiver<bool>) -> anyhow::Result<ExitCode> {
    let deadline_ms = config.amqp.shutdown_deadline_ms;
    let (stopping_tx, mut stopping) = watch::channel(false);
    let mut signalled = stop.clone();
    let limit = async move {
        tokio::select! {
            Ok(_) = signalled.wait_for(|s| *s) => {}
            Ok(_) = stopping.wait_for(|s| *s) => {}
            else => std::future::pending::<()>().await,
        }
        tokio::time::sleep(Duration::from_millis(deadline_ms)).await;
    };
    tokio::select! {
        result = run_inner(config, stop, stopping_tx) => result,
        () = limit => {
            tracing::error!(deadline_ms, "shutdown deadline passed before the shutdown finished; deliveries not acked go back to the queue and are redelivered");
            anyhow::bail!(
                "shutdown deadline passed ({deadline_ms} ms, amqp.shutdown_deadline_ms): requests not acked yet are redelivered by the broker"
            )
        }
    }
}

async fn run_inner(
    config: Config,
    mut stop: watch::Receiver<bool>,
    stopping: watch::Sender<bool>,
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
    // The pools served: every pool of the recovered durable state (the config's, seeded, and
    // those added by `add_pool`, which live only in the state), except those this worker
    // released (`amqp.released_pools`: moved to another worker). With `amqp.exchange` each
    // served pool is locked and bound on every session before consuming (`Pools::ids`).
    let released = released_pools(&config.amqp.released_pools, &state)?;
    let served: std::collections::HashMap<String, u32> = state
        .pools
        .iter()
        .enumerate()
        .filter(|(_, slot)| !released.open.iter().any(|r| **r == *slot.id))
        .map(|(index, slot)| {
            let index = u32::try_from(index).expect("pool index fits u32");
            (slot.id.to_string(), index)
        })
        .collect();
    let pools = Arc::new(
        Pools::new(
            config.pools[0].id.clone(),
            served,
            u32::try_from(state.pools.len()).expect("pool count fits u32"),
            amqp::own_queues(&config.amqp),
            config.admin.allowed_users.clone(),
        )
        .with_released(released.all.clone()),
    );
    // Released pools: not locked, and their old bindings removed on every session.
    let released = released.all;
    if !released.is_empty() {
        tracing::info!(pools = ?released, "released pools (amqp.released_pools): kept in the state, not locked or bound, no admin command applies");
    }
    let window = Admission::<Ticket>::window_of(&state);
    let (mut engine, committed) = Engine::<Ticket>::start(
        state,
        recovered.segment,
        EngineOptions::from_config(&config, false),
    );
    metrics.register_engine(&engine.stats());
    let mut admission = Admission::new(window, engine.ids(), engine.sender());
    let (current_tx, current_rx) = watch::channel::<Option<Arc<Session>>>(None);
    // The committed stream ends only when the engine's writer stops: before shutdown that is a
    // fatal storage error, and the worker must stop too, idle or not.
    let (engine_stopped_tx, mut engine_stopped) = watch::channel(false);
    let settle_metrics = metrics.clone();
    let settle_pools = pools.clone();
    let settler = tokio::spawn(async move {
        let stats = settle::run(committed, current_rx, settle_metrics.clone(), settle_pools).await;
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
    let mut fatal: Option<AmqpError> = None;
    let mut last_session: Option<(Link, Arc<Session>)> = None;
    // Set when a session was lost: the lock must be taken back (bounded by LOCK_REGAIN_MAX).
    let mut lost_at: Option<std::time::Instant> = None;
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
        let (link, session, consumers) = match open_session(
            &cfg,
            epoch,
            &pools.ids(),
            &released,
            &metrics,
        )
        .await
        {
            Ok(v) => v,
            Err(AmqpError::LockHeld(held))
                if lost_at.is_some_and(|t| t.elapsed() < LOCK_REGAIN_MAX) =>
            {
                tracing::warn!(error = %held, retry_in_ms = backoff.as_millis() as u64,
                    "broker lock not free yet after a lost session (the broker may not have noticed the old connection is gone); not consuming, retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => {}
                    _ = engine_stopped.wait_for(|s| *s) => {}
                }
                backoff = (backoff * 2).min(backoff_max);
                continue;
            }
            Err(e) if e.is_permanent() => {
                // A lock held by another worker is permanent too, also after a reconnect: that
                // worker consumes now, and this one stops rather than wait to take over with
                // its own copy of the pools (its accepted requests were settled or return).
                tracing::error!(error = %e, "cannot use the broker's queues or exchange");
                fatal = Some(e);
                break;
            }
            Err(e) => {
                // Refused credentials and certificate problems need an operator: ERROR, with
                // the same backoff (a broker-side fix is picked up without a restart).
                if matches!(e, AmqpError::AuthRefused(_) | AmqpError::Certificate(_)) {
                    tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot log in to the broker; retrying");
                } else {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "broker unavailable; reconnecting");
                }
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
            consumers.requests,
            consumers.admin,
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
                lost_at = Some(std::time::Instant::now());
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

    // The one shutdown path, bounded as a whole by run_until.
    metrics.set_readiness(Readiness::ShuttingDown);
    let _ = stopping.send(true);
    drop(admission);
    engine.close();
    let mut clean = true;
    match settler.await {
        Ok(stats) => tracing::info!(
            acked = stats.acked,
            ack_frames = stats.ack_frames,
            requeued = stats.requeued,
            dropped_stale = stats.dropped_stale,
            "results settled"
        ),
        Err(e) => {
            clean = false;
            tracing::error!(error = %e, "settler failed");
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
    if let Some(e) = fatal {
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

/// `amqp.released_pools` checked against the recovered state.
struct Released {
    all: Vec<String>,
    /// Released but open in the state (never closed before the move, e.g. an `add_pool` of a
    /// pool another worker owned): not in the ingest index at all, so nothing is drawn from
    /// this worker's copy; requests naming them are rejected as an unknown pool.
    open: Vec<String>,
}

/// Every released pool must be in the durable state (a typo would leave the pool served and
/// its lock held, blocking its new owner). One released while open is served by nobody here;
/// the worker warns (README, "Moving a pool": close it first).
fn released_pools(list: &[String], state: &crate::state::State) -> anyhow::Result<Released> {
    let mut open = Vec::new();
    for id in list {
        let Some(index) = state.pool_index(id) else {
            anyhow::bail!(
                "amqp.released_pools names pool {id:?}, which is not in this worker's durable state (pools: {:?}); release only a pool this data directory has",
                state.pools.iter().map(|p| &*p.id).collect::<Vec<_>>()
            );
        };
        if !state.pools[index as usize].closed {
            tracing::warn!(pool = %id, "released pool is open in this worker's state: requests for it reaching this worker are rejected (unknown pool), not drawn; close a pool before releasing it (README, \"Moving a pool\")");
            open.push(id.clone());
        }
    }
    Ok(Released {
        all: list.to_vec(),
        open,
    })
}

/// Aborts a spawned task when dropped (the metrics listener ends with the worker).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
