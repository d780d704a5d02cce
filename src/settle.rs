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
//!
//! Admin commands settle in the same order and under the same rule, with their own answer
//! ([`answer`]): an applied command (or a repeat of one) gets its `admin_result` reply on
//! `reply_to` only (its record is on disk: the batch is durable) and is acked once that reply
//! is confirmed; a command the state refused gets a `rejected` reply and is dead-lettered once
//! the reply is confirmed. Before an applied `add_pool`'s reply the new pool becomes one this
//! worker serves (ingest accepts draws for it; with `amqp.exchange` it is locked and bound),
//! so every draw accepted after the reply can use it.

use crate::engine::{Committed, Completion};
use crate::ingest::Pools;
use crate::limits::ADMIN_REPLY_BYTES_MAX;
use crate::message::result_body;
use crate::metrics::{DrawCounters, Metrics};
use crate::session::{Session, Ticket, reply_properties, result_properties};
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use std::borrow::Cow;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

use crate::limits::{
    SETTLE_BATCHES_IN_FLIGHT_MAX as BATCHES_IN_FLIGHT_MAX,
    SETTLE_GROUP_COMPLETIONS_MAX as GROUP_COMPLETIONS_MAX,
};

#[derive(Debug, Default, Clone, Copy)]
pub struct SettleStats {
    pub acked: u64,
    /// `basic.ack` frames sent for them (one `multiple` ack settles a run of deliveries).
    pub ack_frames: u64,
    pub requeued: u64,
    pub dropped_stale: u64,
}

/// A delivery's ticket, whether it is dead-lettered (a rejected admin command) rather than
/// acked, and what its publishes' confirms said.
type Confirmed = (Ticket, bool, Result<bool, String>);
type Settled = (Arc<Session>, Vec<Confirmed>);

/// What a durable completion is answered with.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer<'a> {
    /// A draw: its result to the result queue and `reply_to`; then ack.
    Result,
    /// An admin reply (or a refusal) to `reply_to` only: `type` and body; then ack, or
    /// dead-letter (`dead_letter`) when nothing was applied.
    Reply {
        kind: &'static str,
        body: Cow<'a, str>,
        dead_letter: bool,
    },
}

/// How a completion is answered. A draw gets its result. An admin command gets its reply: the
/// applied reply (also for a repeat: the first one), or `rejected` with the reason the state
/// refused it. A `message_id` shared by a draw and an admin command (the engine's window holds
/// both) is refused on the side that came second: it names the other one's request ID.
pub fn answer(c: &Completion<Ticket>) -> Answer<'_> {
    let rejected = |reason: String| Answer::Reply {
        kind: "rejected",
        body: Cow::Owned(crate::admin::rejected_reply(&reason)),
        dead_letter: true,
    };
    match (c.ticket.admin_op, &c.outcome.admin, &c.rejected) {
        (None, None, _) => Answer::Result,
        (None, Some(_), _) => rejected(format!(
            "message_id was already used by admin command {}; a draw needs its own",
            c.outcome.request_id
        )),
        (Some(_), _, Some(reason)) => rejected(reason.clone()),
        (Some(_), Some(applied), None) => Answer::Reply {
            kind: "admin_result",
            body: bounded_reply(&applied.reply),
            dead_letter: false,
        },
        (Some(_), None, None) => rejected(format!(
            "message_id was already used by draw request {}; a command needs its own",
            c.outcome.request_id
        )),
    }
}

/// An applied reply as sent: as the engine made it, unless it is over
/// `limits::ADMIN_REPLY_BYTES_MAX` (a `pool_state` of millions of items), which would exceed
/// the broker's message size and fail the session on every redelivery: then `pool_state`
/// keeps its fields but `items` is `[]` and `items_omitted` says how many there are.
pub fn bounded_reply(reply: &str) -> Cow<'_, str> {
    if reply.len() <= ADMIN_REPLY_BYTES_MAX {
        return Cow::Borrowed(reply);
    }
    let mut value: serde_json::Value =
        serde_json::from_str(reply).expect("the engine's reply is JSON");
    if let Some(state) = value.get_mut("pool_state")
        && let Some(items) = state.get_mut("items")
    {
        let n = items.as_array().map_or(0, |a| a.len());
        *items = serde_json::Value::Array(Vec::new());
        state["items_omitted"] = n.into();
    }
    let text = value.to_string();
    assert!(
        text.len() <= ADMIN_REPLY_BYTES_MAX,
        "an admin reply without items is still {} bytes",
        text.len()
    );
    Cow::Owned(text)
}

/// Bookkeeping of a durable admin completion, in engine order (before any reply): the metric,
/// the stock gauges, and a new pool served from now on.
fn admin_durable(c: &Completion<Ticket>, op: &'static str, pools: &Pools, metrics: &Metrics) {
    match answer(c) {
        Answer::Reply {
            dead_letter: true, ..
        } => metrics.admin_command(op, "rejected"),
        _ if c.repeat => {}
        _ => {
            metrics.admin_command(op, "applied");
            if let Some(applied) = &c.outcome.admin {
                if op == "add_pool" {
                    let index = pools.added(&c.outcome.pool);
                    tracing::info!(pool = %c.outcome.pool, index, "pool added: served from now on");
                }
                metrics.admin_stock(&applied.reply);
            }
        }
    }
}

pub async fn run(
    mut committed: mpsc::Receiver<Committed<Ticket>>,
    current: watch::Receiver<Option<Arc<Session>>>,
    metrics: Arc<Metrics>,
    pools: Arc<Pools>,
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
                        // Durable: count the draws (whatever happens to their results), and
                        // take in admin commands in engine order.
                        for c in &batch.completions {
                            match c.ticket.admin_op {
                                Some(op) => admin_durable(c, op, &pools, &metrics),
                                None => {
                                    if !c.repeat && c.outcome.admin.is_none() {
                                        counters.drawn(&c.outcome);
                                    }
                                    metrics
                                        .stage_durable
                                        .observe(c.ticket.received.elapsed().as_secs_f64());
                                }
                            }
                        }
                        let session = current.borrow().clone();
                        match session {
                            Some(session) if !session.is_broken() => {
                                in_flight.push_back(
                                    publish_batch(session, batch, &mut stats, &mut counters, &metrics).await,
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
/// written and confirmed under one deadline for the batch. Async only for an applied
/// `add_pool`, whose pool is locked and bound (with `amqp.exchange`) before its reply.
async fn publish_batch(
    session: Arc<Session>,
    batch: Committed<Ticket>,
    stats: &mut SettleStats,
    counters: &mut DrawCounters,
    metrics: &Arc<Metrics>,
) -> impl std::future::Future<Output = Settled> + use<> {
    let total = batch.completions.len();
    // Every publish of the batch in one flat list (result, then its copy to reply_to), and per
    // delivery its ticket, whether it is dead-lettered once answered, and how many publishes
    // are its own.
    let mut publishes = Vec::with_capacity(2 * total);
    let mut pending = Vec::with_capacity(total);
    for c in batch.completions {
        if c.ticket.epoch != session.epoch {
            stats.dropped_stale += 1;
            continue;
        }
        if let Answer::Reply {
            kind,
            body,
            dead_letter,
        } = answer(&c)
        {
            // An applied add_pool: lock and bind it (with amqp.exchange) before its reply.
            if kind == "admin_result"
                && c.ticket.admin_op == Some("add_pool")
                && let Err(e) = session.own_pool(&c.outcome.pool).await
            {
                tracing::error!(pool = %c.outcome.pool, error = %e, "the pool added by add_pool cannot be owned on the routing exchange");
                session.fail(format!("add_pool {:?}: {e}", &*c.outcome.pool));
                break;
            }
            // Crash tests: the command is durable, its reply not sent (it comes back as a
            // repeat and gets the first reply).
            crate::failpoint::failpoint("settle.before_admin_reply");
            let mut own = 0;
            if let Some(reply_to) = &c.ticket.reply_to {
                publishes.push(session.start_publish(
                    reply_to.as_str(),
                    body.into_owned().into_bytes(),
                    reply_properties(kind, &c.ticket.correlation_id),
                ));
                own = 1;
            }
            tracing::info!(
                message_id = c.ticket.message_id.as_ref().map_or("", |m| m.as_str()),
                correlation_id = c.ticket.correlation_id.as_ref().map_or("", |m| m.as_str()),
                request_id = c.outcome.request_id,
                op = c.ticket.admin_op.unwrap_or("draw"),
                repeat = c.repeat,
                kind,
                "admin command answered"
            );
            pending.push((c.ticket, dead_letter, own));
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
            pending.push((c.ticket, false, 2));
        } else {
            publishes.push(session.start_publish(&session.cfg.result_queue, body, props));
            pending.push((c.ticket, false, 1));
        }
    }
    // Whatever was not published (stale, or the session failed) is no longer in flight; the
    // published ones leave when their confirms resolve.
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
                .map(|(ticket, dead_letter, n)| {
                    let settlement = delivery_settlement(confirmations.by_ref().take(n));
                    (ticket, dead_letter, settlement)
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
    for (ticket, dead_letter, result) in tags {
        let tag = ticket.delivery_tag;
        match result {
            Ok(true) if dead_letter => {
                // A rejected admin command: its reply is confirmed; to the dead-letter queue.
                if let Err(e) = session.reject(tag).await {
                    session.fail(format!("reject: {e}"));
                    return;
                }
            }
            Ok(true) => {
                ready.push(tag);
                if ticket.admin_op.is_none() {
                    received.push(ticket.received);
                }
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
    // Crash tests: results and replies confirmed, deliveries not acked yet.
    crate::failpoint::failpoint("settle.before_ack");
    match session.ack(&ready).await {
        Ok(frames) => {
            stats.acked += ready.len() as u64;
            stats.ack_frames += frames;
            for at in received {
                metrics.stage_acked.observe(at.elapsed().as_secs_f64());
            }
        }
        Err(e) => session.fail(format!("ack: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::{Answer, answer, bounded_reply, delivery_settlement};
    use crate::admin::AdminApplied;
    use crate::engine::Completion;
    use crate::session::Ticket;
    use crate::state::Outcome;
    use lapin::Confirmation;
    use std::sync::Arc;

    fn completion(
        admin_op: Option<&'static str>,
        reply: Option<&str>,
        rejected: Option<&str>,
        repeat: bool,
    ) -> Completion<Ticket> {
        Completion {
            outcome: Arc::new(Outcome {
                request_id: 7,
                pool: Arc::from("default"),
                user: Arc::from(""),
                count: 0,
                items: Vec::new(),
                closed: false,
                admin: reply.map(|r| {
                    Arc::new(AdminApplied {
                        op: "restock".into(),
                        reply: r.into(),
                    })
                }),
            }),
            repeat,
            ticket: Ticket {
                epoch: 1,
                delivery_tag: 1,
                message_id: None,
                reply_to: None,
                correlation_id: None,
                received: std::time::Instant::now(),
                admin_op,
            },
            rejected: rejected.map(str::to_string),
        }
    }

    #[test]
    fn each_completion_gets_its_answer() {
        assert_eq!(answer(&completion(None, None, None, false)), Answer::Result);
        let first = completion(Some("restock"), Some("{\"a\":1}"), None, false);
        let applied = answer(&first);
        assert_eq!(
            applied,
            Answer::Reply {
                kind: "admin_result",
                body: "{\"a\":1}".into(),
                dead_letter: false
            }
        );
        // A repeat of an applied command: the first reply, acked.
        assert_eq!(
            answer(&completion(Some("restock"), Some("{\"a\":1}"), None, true)),
            applied
        );
        // Refused by the state: rejected and dead-lettered, with the reason.
        match answer(&completion(
            Some("restock"),
            None,
            Some("pool \"x\" has no item"),
            false,
        )) {
            Answer::Reply {
                kind: "rejected",
                body,
                dead_letter: true,
            } => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                assert_eq!(v["status"], "rejected");
                assert_eq!(v["error"], "pool \"x\" has no item");
            }
            other => panic!("{other:?}"),
        }
        // A message_id shared between a draw and a command: the later one is refused.
        for c in [
            completion(Some("restock"), None, None, true),
            completion(None, Some("{}"), None, true),
        ] {
            match answer(&c) {
                Answer::Reply {
                    kind: "rejected",
                    body,
                    dead_letter: true,
                } => assert!(
                    body.contains("already used") && body.contains('7'),
                    "{body}"
                ),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_huge_reply_is_sent_without_its_items() {
        let small = r#"{"status":"applied","pool_state":{"id":"p","items":[1]}}"#;
        assert!(matches!(
            bounded_reply(small),
            std::borrow::Cow::Borrowed(_)
        ));
        // About 9 MiB of items (ids padded to 100 bytes).
        let items: Vec<serde_json::Value> = (0..90_000)
            .map(|i| serde_json::json!({"id": format!("{i:0>100}"), "quantity": 1, "issued": 0, "stocked": 1, "weight": null}))
            .collect();
        let huge =
            serde_json::json!({"status":"applied","request_id":3,"op":"close_pool","pool":"p",
            "pool_state":{"id":"p","mode":"by_quantity","closed":true,"items":items}})
            .to_string();
        assert!(huge.len() > crate::limits::ADMIN_REPLY_BYTES_MAX);
        let sent: serde_json::Value = serde_json::from_str(&bounded_reply(&huge)).unwrap();
        assert_eq!(sent["pool_state"]["items"], serde_json::json!([]));
        assert_eq!(sent["pool_state"]["items_omitted"], 90_000);
        assert_eq!(sent["pool_state"]["closed"], true);
        assert_eq!(sent["request_id"], 3);
    }

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
