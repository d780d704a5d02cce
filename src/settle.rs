//! Settling: results out, confirms in, then acks. The last stage of the pipeline.
//!
//! One task for the life of the worker, fed by the engine's `Committed` batches (their records
//! are on disk). For each completion of the current session it publishes the result to the
//! result queue (persistent) and a copy to `reply_to`, on the publish channel. The batch's
//! confirms are awaited as one future, many batches in flight at once (bounded), and settled in
//! order: every confirm an ack → the delivery is acked; a nack → the delivery is requeued, so
//! the Repeats rule publishes its result again; an error → the session is failed.
//!
//! Completions of an older session are dropped: their deliveries were returned to the queue
//! when that connection died, and come back as repeats. So the WAL is the outbox.

use crate::engine::Committed;
use crate::message::result_body;
use crate::metrics::{DrawCounters, Metrics};
use crate::session::{Session, Ticket, result_properties};
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

use crate::limits::{
    SETTLE_BATCHES_IN_FLIGHT_MAX as BATCHES_IN_FLIGHT_MAX,
    SETTLE_GROUP_COMPLETIONS_MAX as GROUP_COMPLETIONS_MAX,
};

#[derive(Debug, Default, Clone, Copy)]
pub struct SettleStats {
    pub acked: u64,
    pub requeued: u64,
    pub dropped_stale: u64,
}

/// A delivery's ticket and what its result confirms said.
type Confirmed = (Ticket, Result<bool, String>);
type Settled = (Arc<Session>, Vec<Confirmed>);

pub async fn run(
    mut committed: mpsc::Receiver<Committed<Ticket>>,
    current: watch::Receiver<Option<Arc<Session>>>,
    metrics: Arc<Metrics>,
) -> SettleStats {
    let mut stats = SettleStats::default();
    let mut counters = metrics.draw_counters();
    let mut in_flight = FuturesOrdered::new();
    let mut open = true;
    // Batches arrive in order, each durable (asserted, release builds too: nothing is
    // published or acked before its records are on disk).
    let mut last_seq = 0;
    let mut check = |batch: &Committed<Ticket>| {
        batch.assert_durable();
        assert!(
            batch.seq >= last_seq,
            "batch {} settles after batch {last_seq}",
            batch.seq
        );
        last_seq = batch.seq;
    };
    while open || !in_flight.is_empty() {
        tokio::select! {
            batch = committed.recv(), if open && in_flight.len() < BATCHES_IN_FLIGHT_MAX => {
                match batch {
                    None => open = false,
                    Some(mut batch) => {
                        check(&batch);
                        // Take every batch already waiting, up to a bound: one publish group,
                        // one confirm future, fewer and larger acks.
                        while batch.completions.len() < GROUP_COMPLETIONS_MAX {
                            match committed.try_recv() {
                                Ok(more) => {
                                    check(&more);
                                    batch.completions.extend(more.completions);
                                }
                                Err(_) => break,
                            }
                        }
                        // Durable: count the draws (whatever happens to their results).
                        for c in &batch.completions {
                            if !c.repeat {
                                counters.drawn(&c.outcome);
                            }
                            metrics
                                .stage_durable
                                .observe(c.ticket.received.elapsed().as_secs_f64());
                        }
                        let session = current.borrow().clone();
                        match session {
                            Some(session) if !session.is_broken() => {
                                in_flight.push_back(
                                    publish_batch(session, batch, &mut stats, &mut counters, &metrics),
                                );
                            }
                            _ => {
                                stats.dropped_stale += batch.completions.len() as u64;
                                metrics.inflight.dec_by(batch.completions.len() as i64);
                            }
                        }
                    }
                }
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let (session, mut tags): Settled = done;
                // Settle every group whose confirms are already in with one ack.
                while let Some(Some((next_session, more))) = in_flight.next().now_or_never() {
                    if Arc::ptr_eq(&next_session, &session) {
                        tags.extend(more);
                    } else {
                        settle(&session, std::mem::take(&mut tags), &mut stats, &metrics).await;
                        settle(&next_session, more, &mut stats, &metrics).await;
                    }
                }
                settle(&session, tags, &mut stats, &metrics).await;
            }
        }
    }
    stats
}

/// What the confirms of one delivery's result publishes add up to: `Ok(true)` (ack it) when
/// every one is an ack, `Ok(false)` (requeue it) when the broker nacked one, `Err` (the session
/// failed) when a confirm failed — a failure outranks a nack.
fn delivery_settlement<E: std::fmt::Display>(
    confirmations: impl IntoIterator<Item = Result<lapin::Confirmation, E>>,
) -> Result<bool, String> {
    let mut result = Ok(true);
    for confirmation in confirmations {
        match confirmation {
            Err(e) => result = Err(format!("publisher confirm: {e}")),
            Ok(c) if c.is_nack() => {
                if result.is_ok() {
                    result = Ok(false);
                }
            }
            Ok(_) => {}
        }
    }
    result
}

/// Publishes a batch's results; returns the future of their confirms.
///
/// Every publish of the batch is queued on the channel here, in order, without waiting for
/// any (no thread round trip per publish); the returned future waits for all of them to be
/// written and confirmed under one deadline for the batch.
fn publish_batch(
    session: Arc<Session>,
    batch: Committed<Ticket>,
    stats: &mut SettleStats,
    counters: &mut DrawCounters,
    metrics: &Arc<Metrics>,
) -> impl std::future::Future<Output = Settled> + use<> {
    let total = batch.completions.len();
    // Every publish of the batch in one flat list (result, then its copy to reply_to), and per
    // delivery its ticket and how many of them are its own.
    let mut publishes = Vec::with_capacity(2 * total);
    let mut pending = Vec::with_capacity(total);
    for c in batch.completions {
        if c.ticket.epoch != session.epoch {
            stats.dropped_stale += 1;
            continue;
        }
        counters.result(&c.outcome);
        let body = result_body(&c.outcome, c.ticket.message_id.as_ref().map(|m| m.as_str()));
        let props = result_properties(c.outcome.request_id, &c.ticket.correlation_id);
        if let Some(reply_to) = &c.ticket.reply_to {
            publishes.push(session.start_publish(
                &session.cfg.result_queue,
                body.clone(),
                props.clone(),
            ));
            publishes.push(session.start_publish(reply_to.as_str(), body, props));
            pending.push((c.ticket, 2));
        } else {
            publishes.push(session.start_publish(&session.cfg.result_queue, body, props));
            pending.push((c.ticket, 1));
        }
    }
    // Whatever was not published (stale) is no longer in flight; the published ones leave
    // when their confirms resolve.
    metrics.inflight.dec_by((total - pending.len()) as i64);
    let metrics = metrics.clone();
    let pending_len = pending.len();
    async move {
        // All of the batch's publishes and confirms under one deadline, abandoned at once if
        // the session fails: batches settle in order, so a dead session's batch must never
        // hold up the batches of the next one. A publish that failed counts as a failed
        // confirm: the session fails and nothing of it is acked.
        let all = async move {
            let mut confirmations = futures::future::join_all(publishes).await.into_iter();
            pending
                .into_iter()
                .map(|(ticket, n)| {
                    let settlement = delivery_settlement(confirmations.by_ref().take(n));
                    (ticket, settlement)
                })
                .collect::<Vec<Confirmed>>()
        };
        let published = pending_len;
        let out = tokio::select! {
            // The timeout does not run while the broker blocks the connection (alarm).
            out = session.unless_blocked(all) => match out {
                Some(out) => out,
                None => {
                    session.fail("publisher confirms timed out".into());
                    Vec::new()
                }
            },
            _ = session.broken() => Vec::new(),
        };
        metrics.inflight.dec_by(published as i64);
        (session, out)
    }
}

async fn settle(
    session: &Session,
    tags: Vec<Confirmed>,
    stats: &mut SettleStats,
    metrics: &Metrics,
) {
    if session.is_broken() {
        return;
    }
    let mut ready = Vec::with_capacity(tags.len());
    let mut received = Vec::with_capacity(tags.len());
    for (ticket, result) in tags {
        let tag = ticket.delivery_tag;
        match result {
            Ok(true) => {
                ready.push(tag);
                received.push(ticket.received);
            }
            Ok(false) => {
                tracing::warn!(
                    message_id = ticket.message_id.as_ref().map_or("", |m| m.as_str()),
                    correlation_id = ticket.correlation_id.as_ref().map_or("", |c| c.as_str()),
                    delivery_tag = tag,
                    "broker refused a result (nack): request requeued"
                );
                if let Err(e) = session.requeue(tag).await {
                    session.fail(format!("requeue: {e}"));
                    return;
                }
                stats.requeued += 1;
            }
            Err(e) => {
                session.fail(e);
                return;
            }
        }
    }
    match session.ack(&ready).await {
        Ok(()) => {
            stats.acked += ready.len() as u64;
            for at in received {
                metrics.stage_acked.observe(at.elapsed().as_secs_f64());
            }
        }
        Err(e) => session.fail(format!("ack: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::delivery_settlement;
    use lapin::Confirmation;

    fn ack() -> Result<Confirmation, String> {
        Ok(Confirmation::Ack(None))
    }
    fn nack() -> Result<Confirmation, String> {
        Ok(Confirmation::Nack(None))
    }
    fn failed() -> Result<Confirmation, String> {
        Err("channel closed".into())
    }

    #[test]
    fn every_ack_acks_the_delivery() {
        assert_eq!(delivery_settlement([ack()]), Ok(true));
        assert_eq!(delivery_settlement([ack(), ack()]), Ok(true));
        // A delivery whose results were all dropped as stale has nothing to wait for.
        assert_eq!(
            delivery_settlement(Vec::<Result<Confirmation, String>>::new()),
            Ok(true)
        );
    }

    #[test]
    fn a_nack_of_the_result_or_its_copy_requeues_the_delivery() {
        assert_eq!(delivery_settlement([nack(), ack()]), Ok(false));
        assert_eq!(delivery_settlement([ack(), nack()]), Ok(false));
    }

    #[test]
    fn a_failed_confirm_fails_the_session_whatever_its_order_with_a_nack() {
        for confirms in [[failed(), nack()], [nack(), failed()], [ack(), failed()]] {
            let r = delivery_settlement(confirms);
            assert!(
                matches!(&r, Err(e) if e.contains("channel closed")),
                "{r:?}"
            );
        }
    }
}
