//! Ingest: deliveries in, requests with IDs out to the engine, one delivery at a time in order.
//!
//! For each delivery, in this order:
//! 1. `message_id` too long → reject (dead-letter) with a `rejected` reply.
//! 2. `message_id` known (drawn or in flight) → a repeat: the first request's ID, no look at
//!    the body, an accepted reply, then a `Repeat` to the engine behind its first.
//! 3. Body invalid (size, JSON object, field types, pool, count, user) → reject, `rejected`
//!    reply. Nothing a producer sends can panic this loop; every error is a reason string.
//! 4. Otherwise a new ID, the accepted reply (published before the request reaches the engine,
//!    so on `reply_to` it always precedes the result), then the draw to the engine.
//!
//! Reply confirms are awaited here in a bounded set (lapin keeps dropped confirms until
//! `wait_for_confirms`, so they must not be dropped).

use crate::admission::{Admission, DrawSpec, EngineGone, RepeatOf, Submission};
use crate::amqp::{AmqpError, timed};
use crate::dedupe::message_key;
use crate::message::{self, accepted_body, rejected_body};
use crate::metrics::Metrics;
use crate::session::{Session, Ticket, reply_properties};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use lapin::{Consumer, PublisherConfirm};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;

use crate::limits::INGEST_REPLY_CONFIRMS_MAX as REPLY_CONFIRMS_MAX;

/// How a session's ingest ended.
pub enum IngestEnd {
    /// Shutdown was asked for; the consumer is cancelled.
    Shutdown,
    /// The engine stopped (fatal storage error).
    EngineGone,
    /// The session failed; reconnect.
    Failed(String),
}

/// Pool names of the config, resolved to the engine's pool indexes.
pub struct Pools {
    pub default_pool: String,
    pub index: HashMap<String, u32>,
    /// `amqp::own_queues`: where no reply may go.
    pub own_queues: Vec<String>,
}

impl Pools {
    /// The pools this worker serves, in a stable order: with `amqp.exchange` it owns (locks
    /// and binds) each of them on every session.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.index.keys().cloned().collect();
        ids.sort();
        ids
    }
}

pub async fn start_consumer(session: &Session, queue: &str) -> Result<Consumer, AmqpError> {
    timed(
        "basic.consume",
        session.cfg.operation_timeout_ms,
        session.consume.basic_consume(
            queue.into(),
            format!("rewardpool-{}-{}", std::process::id(), session.epoch).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
}

pub async fn run(
    session: Arc<Session>,
    mut consumer: Consumer,
    admission: &mut Admission<Ticket>,
    pools: &Pools,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
    mut engine_stopped: watch::Receiver<bool>,
) -> IngestEnd {
    let mut confirms: FuturesUnordered<PublisherConfirm> = FuturesUnordered::new();
    let end = loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break IngestEnd::Shutdown,
            _ = engine_stopped.wait_for(|stopped| *stopped) => break IngestEnd::EngineGone,
            reason = session.broken() => break IngestEnd::Failed(reason),
            Some(result) = confirms.next(), if !confirms.is_empty() => {
                if let Err(e) = result {
                    break IngestEnd::Failed(format!("reply confirm failed: {e}"));
                }
            }
            delivery = consumer.next(), if confirms.len() < REPLY_CONFIRMS_MAX => match delivery {
                None => break IngestEnd::Failed("the broker cancelled the consumer".into()),
                Some(Err(e)) => break IngestEnd::Failed(format!("consumer: {e}")),
                Some(Ok(delivery)) => {
                    match handle(&session, admission, pools, metrics, delivery, &mut confirms).await {
                        Ok(()) => {}
                        Err(HandleError::EngineGone) => break IngestEnd::EngineGone,
                        Err(HandleError::Broker(e)) => break IngestEnd::Failed(e.to_string()),
                    }
                }
            },
        }
    };
    if matches!(end, IngestEnd::Shutdown) {
        // Stop deliveries; those already buffered but not accepted are requeued at the end.
        let _ = timed(
            "basic.cancel",
            session.cfg.operation_timeout_ms,
            session
                .consume
                .basic_cancel(consumer.tag(), BasicCancelOptions::default()),
        )
        .await;
    }
    // Reply confirms are best effort; wait briefly so none is dropped unresolved.
    let _ = tokio::time::timeout(
        std::time::Duration::from_millis(session.cfg.operation_timeout_ms),
        async { while confirms.next().await.is_some() {} },
    )
    .await;
    end
}

enum HandleError {
    EngineGone,
    Broker(AmqpError),
}

impl From<AmqpError> for HandleError {
    fn from(e: AmqpError) -> Self {
        HandleError::Broker(e)
    }
}

impl From<EngineGone> for HandleError {
    fn from(_: EngineGone) -> Self {
        HandleError::EngineGone
    }
}

async fn handle(
    session: &Session,
    admission: &mut Admission<Ticket>,
    pools: &Pools,
    metrics: &Metrics,
    delivery: lapin::message::Delivery,
    confirms: &mut FuturesUnordered<PublisherConfirm>,
) -> Result<(), HandleError> {
    let received = std::time::Instant::now();
    let tag = delivery.delivery_tag;
    let props = delivery.properties;
    let message_id = props.message_id().clone();
    let reply_to = props.reply_to().clone().filter(|r| !r.as_str().is_empty());
    let correlation_id = props.correlation_id().clone();

    // Every property a producer controls is checked first (message::check_properties); then a
    // repeat is known by its message_id; its body is not looked at.
    let mid = message_id.as_ref().map(|m| m.as_str());
    let key = mid.map(message_key);
    let cfg = &session.cfg;
    let own_queues = &pools.own_queues;
    // Through the routing exchange the routing key is the pool the producer named (and the
    // one the broker picked this worker for); published to the queue by name there is none.
    let routed_pool = (!cfg.exchange.is_empty() && delivery.exchange.as_str() == cfg.exchange)
        .then_some(delivery.routing_key.as_str());
    let request_props = message::RequestProps {
        message_id: mid,
        correlation_id: correlation_id.as_ref().map(|c| c.as_str()),
        reply_to: reply_to.as_ref().map(|r| r.as_str()),
        kind: props.kind().as_ref().map(|k| k.as_str()),
        content_type: props.content_type().as_ref().map(|t| t.as_str()),
        content_encoding: props.content_encoding().as_ref().map(|e| e.as_str()),
    };
    let admit = match admit(
        admission,
        pools,
        &request_props,
        own_queues,
        routed_pool,
        &delivery.data,
    ) {
        Ok(admit) => admit,
        Err(reason) => {
            metrics.requests_rejected.inc();
            tracing::info!(
                message_id = mid.unwrap_or(""),
                correlation_id = correlation_id.as_ref().map_or("", |c| c.as_str()),
                delivery_tag = tag,
                %reason,
                "request rejected to the dead-letter queue"
            );
            if let Some(reply_to) = &reply_to
                && message::reply_allowed(reply_to.as_str(), own_queues)
            {
                let confirm = session
                    .publish(
                        reply_to.as_str(),
                        &rejected_body(&reason),
                        reply_properties("rejected", &correlation_id),
                    )
                    .await?;
                confirms.push(confirm);
            }
            session.reject(tag).await?;
            return Ok(());
        }
    };

    let submission = match admit {
        Admit::Repeat(repeat) => {
            metrics.requests_repeat.inc();
            Submission::Repeat(repeat)
        }
        Admit::New(request) => Submission::New(
            admission.assign_new(key).await.inspect(|new| {
                metrics.requests_accepted.inc();
                metrics.last_request_id.set(new.request_id as i64);
            })?,
            DrawSpec {
                message_id: mid.map(str::to_string),
                pool_index: pools.index[&request.pool],
                user: request.user,
                count: request.count,
            },
        ),
    };
    let request_id = match &submission {
        Submission::New(new, _) => new.request_id,
        Submission::Repeat(repeat) => repeat.request_id,
        Submission::Admin(new, _) => new.request_id,
    };
    if let Some(reply_to) = &reply_to {
        let confirm = session
            .publish(
                reply_to.as_str(),
                &accepted_body(request_id),
                reply_properties("accepted", &correlation_id),
            )
            .await;
        match confirm {
            Ok(c) => confirms.push(c),
            Err(e) => {
                // The ID is handed out: submit anyway so ingest and engine windows stay in step.
                tracing::warn!(
                    message_id = mid.unwrap_or(""),
                    correlation_id = correlation_id.as_ref().map_or("", |c| c.as_str()),
                    request_id,
                    error = %e,
                    "accepted reply not sent; the session fails"
                );
                session.fail(format!("accepted reply: {e}"));
            }
        }
    }
    let ticket = Ticket {
        epoch: session.epoch,
        delivery_tag: tag,
        message_id,
        reply_to,
        correlation_id,
        received,
    };
    admission.submit(submission, ticket).await?;
    metrics.inflight.inc();
    metrics
        .stage_accepted
        .observe(received.elapsed().as_secs_f64());
    Ok(())
}

/// Decides what a delivery is, before any reply and without handing out an ID: a repeat (known
/// by its `message_id` alone; its body is not looked at), a new request, or a rejection with
/// its reason.
///
/// `routed_pool` is the routing key of a delivery that came through `amqp.exchange`. Its body
/// must name that pool or none: a body without `pool` draws from the routing key's pool (the
/// one pool the producer named; the config's first pool differs from shard to shard), and a
/// body naming another pool is rejected — drawing from either would be a guess.
fn admit<T>(
    admission: &Admission<T>,
    pools: &Pools,
    props: &message::RequestProps,
    own_queues: &[String],
    routed_pool: Option<&str>,
    body: &[u8],
) -> Result<Admit, String> {
    message::check_properties(props, own_queues)?;
    if let Some(repeat) = admission.repeat_of(props.message_id.map(message_key)) {
        return Ok(Admit::Repeat(repeat));
    }
    let default_pool = routed_pool.unwrap_or(&pools.default_pool);
    // Through the exchange a body naming another pool is a mismatch, whether or not this
    // worker serves that pool: it passes the existence check here and is rejected below.
    let request = message::parse_request(body, default_pool, |p| {
        pools.index.contains_key(p) || routed_pool.is_some_and(|key| key != p)
    })?;
    if let Some(key) = routed_pool
        && request.pool != key
    {
        return Err(format!(
            "body pool {:?} differs from the routing key {:?} the request was published with",
            message::truncate(&request.pool, 128),
            message::truncate(key, 128)
        ));
    }
    Ok(Admit::New(request))
}

/// What ingest decided for a valid delivery.
#[derive(Debug)]
enum Admit {
    Repeat(RepeatOf),
    New(message::ParsedRequest),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Command;
    use crate::ids::IdAllocator;
    use tokio::sync::mpsc;

    fn props(message_id: Option<&str>) -> message::RequestProps<'_> {
        message::RequestProps {
            message_id,
            ..Default::default()
        }
    }

    fn pools() -> Pools {
        Pools {
            default_pool: "default".into(),
            index: HashMap::from([("default".into(), 0), ("spin".into(), 1)]),
            own_queues: Vec::new(),
        }
    }

    fn admission() -> (Admission<u32>, mpsc::Receiver<Command<u32>>) {
        let ids = Arc::new(IdAllocator::new(0, 16));
        ids.set_durable(100);
        let (tx, rx) = mpsc::channel(16);
        (Admission::new(crate::dedupe::Window::new(8), ids, tx), rx)
    }

    #[test]
    fn a_new_request_is_parsed_with_the_default_pool() {
        let (a, _rx) = admission();
        match admit(
            &a,
            &pools(),
            &props(Some("m-1")),
            &[],
            None,
            br#"{"user":"alice","count":2}"#,
        ) {
            Ok(Admit::New(r)) => {
                assert_eq!(
                    (r.pool.as_str(), r.user.as_str(), r.count),
                    ("default", "alice", 2)
                );
            }
            other => panic!("expected a new request: {other:?}"),
        }
    }

    #[test]
    fn a_repeat_is_known_by_its_message_id_and_its_body_is_not_read() {
        let (mut a, _rx) = admission();
        let first = a.assign_blocking(Some("m-1")).unwrap();
        // The repeat's body is garbage and names an unknown pool: it is never parsed.
        match admit(&a, &pools(), &props(Some("m-1")), &[], None, b"not json {") {
            Ok(Admit::Repeat(r)) => assert_eq!(r.request_id, first.request_id()),
            other => panic!("expected a repeat: {other:?}"),
        }
    }

    #[test]
    fn invalid_requests_are_rejected_with_a_reason() {
        let (a, _rx) = admission();
        let p = pools();
        let long_id = "x".repeat(256);
        let cases: [(Option<&str>, &[u8], &str); 4] = [
            (Some(long_id.as_str()), b"{}", "message_id"),
            (None, b"[1]", "object"),
            (None, br#"{"pool":"nope"}"#, "nope"),
            (None, br#"{"count":101}"#, "count"),
        ];
        for (message_id, body, want) in cases {
            match admit(&a, &p, &props(message_id), &[], None, body) {
                Err(reason) => assert!(
                    reason.contains(want),
                    "{}: reason {reason:?} lacks {want:?}",
                    String::from_utf8_lossy(body)
                ),
                Ok(other) => panic!("{}: accepted as {other:?}", String::from_utf8_lossy(body)),
            }
        }
    }

    #[test]
    fn an_over_long_message_id_is_rejected_even_when_it_was_seen() {
        // check_message_id comes first: a key is never computed for an invalid message_id.
        let (mut a, _rx) = admission();
        let long_id = "y".repeat(300);
        let _ = a.assign_blocking(Some(&long_id)).unwrap();
        assert!(admit(&a, &pools(), &props(Some(&long_id)), &[], None, b"{}").is_err());
    }

    #[test]
    fn through_the_exchange_the_body_pool_must_match_the_routing_key() {
        let (a, _rx) = admission();
        let p = pools();
        let routed = |body: &[u8]| admit(&a, &p, &props(None), &[], Some("spin"), body);
        // No pool in the body: the routing key's pool, not the config's first pool.
        match routed(br#"{"user":"bob"}"#) {
            Ok(Admit::New(r)) => assert_eq!(r.pool, "spin"),
            other => panic!("expected a draw from spin: {other:?}"),
        }
        match routed(br#"{"pool":"spin"}"#) {
            Ok(Admit::New(r)) => assert_eq!(r.pool, "spin"),
            other => panic!("expected a draw from spin: {other:?}"),
        }
        match routed(br#"{"pool":"default"}"#) {
            Err(reason) => assert!(
                reason.contains("\"default\"") && reason.contains("routing key \"spin\""),
                "{reason}"
            ),
            Ok(other) => panic!("a pool other than the routing key was accepted: {other:?}"),
        }
        // A pool this worker does not serve in the body: still the mismatch.
        match routed(br#"{"pool":"elsewhere"}"#) {
            Err(reason) => assert!(reason.contains("routing key"), "{reason}"),
            Ok(other) => panic!("accepted: {other:?}"),
        }
        // A routing key this worker does not serve (a stale binding): unknown pool.
        match admit(&a, &p, &props(None), &[], Some("gone"), b"{}") {
            Err(reason) => assert!(reason.contains("unknown pool \"gone\""), "{reason}"),
            Ok(other) => panic!("accepted: {other:?}"),
        }
    }
}
