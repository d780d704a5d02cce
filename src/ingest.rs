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
//! Deliveries lapin has already buffered are handled as one burst (at most
//! `INGEST_BURST_DELIVERIES_MAX`), and the burst's requests go to the engine together: one
//! wake-up of the engine thread per burst. Replies are queued on the publish channel without
//! waiting for lapin's I/O thread to write them ([`Session::start_publish`]); their confirms
//! are awaited here in a bounded set (lapin keeps dropped confirms until `wait_for_confirms`,
//! so they must not be dropped).
//!
//! Admin commands come from a second consumer on the same channel (so one ack tracker covers
//! both), with its own small prefetch (`limits::ADMIN_PREFETCH`). For each, in this order:
//! the properties (as for requests), `admin.allowed_users` against the `user_id` property (the
//! broker checked it is the publisher's own user), the body (`admin::parse_command`, strict).
//! A command that fails gets a `rejected` reply and is dead-lettered; nothing changes. One
//! that passes takes an ID and goes to the engine, which decides between two draws (applied,
//! a repeat of an earlier `message_id`, or refused by the state's rules); settle replies.
//! An admin command gets no `accepted` reply: its one reply is the outcome.

use crate::admin::{self, AdminCommand};
use crate::admission::{AdminSpec, Admission, DrawSpec, EngineGone, RepeatOf, Submission};
use crate::amqp::{AmqpError, timed};
use crate::dedupe::message_key;
use crate::message::{self, accepted_body, rejected_body};
use crate::metrics::Metrics;
use crate::session::{Publishing, Session, Ticket, reply_properties};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::Consumer;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

use crate::limits::INGEST_BURST_DELIVERIES_MAX as BURST_DELIVERIES_MAX;
use crate::limits::INGEST_REPLY_CONFIRMS_MAX as REPLY_CONFIRMS_MAX;

/// Replies in flight: each resolves once its publish is written and confirmed.
type Confirms = FuturesUnordered<Publishing>;

/// A request with its ID and its accepted reply queued, waiting for the end of its burst.
type Staged = (Submission, Ticket);

/// How a session's ingest ended.
pub enum IngestEnd {
    /// Shutdown was asked for; the consumer is cancelled.
    Shutdown,
    /// The engine stopped (fatal storage error).
    EngineGone,
    /// The session failed; reconnect.
    Failed(String),
}

/// The pools this worker serves, resolved to the engine's pool indexes; shared by ingest
/// (which reads it per request) and settle (which adds a pool once its `add_pool` is durable,
/// before the command's reply, so every draw accepted after the reply can name it).
pub struct Pools {
    pub default_pool: String,
    served: RwLock<Served>,
    /// `amqp::own_queues`: where no reply may go.
    pub own_queues: Vec<String>,
    /// `admin.allowed_users`: empty = any user the broker lets publish to the admin queue.
    pub allowed_users: Vec<String>,
    /// Shards: `amqp.released_pools` (see [`Pools::with_released`]).
    released: Vec<String>,
}

struct Served {
    index: HashMap<String, u32>,
    /// Pools in the engine's state, served or not: the index the next `add_pool` gets (pool
    /// indexes only grow, in the engine's order, which is the order settle sees).
    state_pools: u32,
}

impl Pools {
    /// `served`: pool id → the engine's index; `state_pools`: how many pools the recovered
    /// state has.
    pub fn new(
        default_pool: String,
        served: HashMap<String, u32>,
        state_pools: u32,
        own_queues: Vec<String>,
        allowed_users: Vec<String>,
    ) -> Pools {
        assert!(
            served.values().all(|i| *i < state_pools),
            "a served pool is not in the state"
        );
        Pools {
            default_pool,
            served: RwLock::new(Served {
                index: served,
                state_pools,
            }),
            own_queues,
            allowed_users,
            released: Vec::new(),
        }
    }

    /// Shards (issue 12): pools of the state this worker released (`amqp.released_pools`,
    /// moved to another worker). They are never owned here ([`Pools::ids`] leaves them out),
    /// and admin commands naming them are rejected ([`Pools::check_not_released`]). A released
    /// pool that is closed may stay in the index: requests still reaching this worker for it
    /// (left in its queue, or published by name) are answered `closed`, as after the
    /// `close_pool` of the move.
    pub fn with_released(mut self, released: Vec<String>) -> Pools {
        self.released = released;
        self
    }

    /// An admin command for a released pool is for its new owner: rejected here, with why.
    pub fn check_not_released(
        &self,
        command: AdminCommand,
    ) -> Result<AdminCommand, (&'static str, String)> {
        if self.released.iter().any(|p| p == command.pool()) {
            return Err((
                command.op(),
                format!(
                    "pool {:?} is released by this worker (amqp.released_pools: moved to another worker); send the command to its owner",
                    message::truncate(command.pool(), 128)
                ),
            ));
        }
        Ok(command)
    }

    /// The engine's index of a pool this worker serves.
    pub fn index_of(&self, pool: &str) -> Option<u32> {
        self.served
            .read()
            .expect("pools lock")
            .index
            .get(pool)
            .copied()
    }

    /// The pools this worker serves, in a stable order: with `amqp.exchange` it owns (locks
    /// and binds) each of them on every session. Released pools are not among them.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .served
            .read()
            .expect("pools lock")
            .index
            .keys()
            .filter(|id| !self.released.contains(id))
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    /// An `add_pool` of `id` is durable: the engine appended it at the next index, and this
    /// worker serves it from now on. Returns that index.
    pub fn added(&self, id: &str) -> u32 {
        let mut served = self.served.write().expect("pools lock");
        let index = served.state_pools;
        served.state_pools += 1;
        let previous = served.index.insert(id.to_string(), index);
        assert!(
            previous.is_none(),
            "add_pool of {id:?} applied, but the pool was already served"
        );
        index
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

/// Consumes the admin queue on the same channel as the requests, after the request consumer:
/// a per-consumer `basic.qos` of `limits::ADMIN_PREFETCH` set in between applies to this
/// consumer only (RabbitMQ: a non-global qos is the limit of each consumer started after it).
pub async fn start_admin_consumer(session: &Session) -> Result<Consumer, AmqpError> {
    let op = session.cfg.operation_timeout_ms;
    timed(
        "basic.qos (admin)",
        op,
        session.consume.basic_qos(
            crate::limits::ADMIN_PREFETCH,
            lapin::options::BasicQosOptions::default(),
        ),
    )
    .await?;
    timed(
        "basic.consume (admin)",
        op,
        session.consume.basic_consume(
            session.cfg.admin_queue.as_str().into(),
            format!("rewardpool-admin-{}-{}", std::process::id(), session.epoch).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    session: Arc<Session>,
    mut consumer: Consumer,
    mut admin_consumer: Consumer,
    admission: &mut Admission<Ticket>,
    pools: &Pools,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
    mut engine_stopped: watch::Receiver<bool>,
) -> IngestEnd {
    let mut confirms: Confirms = FuturesUnordered::new();
    let mut staged: Vec<Staged> = Vec::with_capacity(BURST_DELIVERIES_MAX);
    let end = loop {
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break IngestEnd::Shutdown,
            _ = engine_stopped.wait_for(|stopped| *stopped) => break IngestEnd::EngineGone,
            reason = session.broken() => break IngestEnd::Failed(reason),
            Some(result) = confirms.next(), if !confirms.is_empty() => {
                // Every confirm already in, in one turn of the loop rather than one each.
                let mut result = result.map(drop);
                while result.is_ok()
                    && let Some(Some(more)) = confirms.next().now_or_never()
                {
                    result = more.map(drop);
                }
                if let Err(e) = result {
                    break IngestEnd::Failed(format!("reply confirm failed: {e}"));
                }
            }
            delivery = consumer.next(), if confirms.len() < REPLY_CONFIRMS_MAX => match delivery {
                None => break IngestEnd::Failed("the broker cancelled the consumer".into()),
                Some(Err(e)) => break IngestEnd::Failed(format!("consumer: {e}")),
                Some(Ok(delivery)) => {
                    // A burst: this delivery and those lapin already buffered behind it
                    // (bounded) are handled in order, then their requests reach the engine
                    // together: one wake-up of the engine thread per burst, not per request.
                    let mut next = Some(delivery);
                    let mut burst = 0;
                    let mut ended = None;
                    while let Some(delivery) = next.take() {
                        burst += 1;
                        match handle(&session, admission, pools, metrics, delivery, &mut confirms, &mut staged).await {
                            Ok(()) => {}
                            Err(HandleError::EngineGone) => { ended = Some(IngestEnd::EngineGone); break; }
                            Err(HandleError::Broker(e)) => { ended = Some(IngestEnd::Failed(e.to_string())); break; }
                        }
                        if burst < BURST_DELIVERIES_MAX && confirms.len() < REPLY_CONFIRMS_MAX {
                            match consumer.next().now_or_never() {
                                None => {}
                                Some(Some(Ok(d))) => next = Some(d),
                                Some(Some(Err(e))) => ended = Some(IngestEnd::Failed(format!("consumer: {e}"))),
                                Some(None) => ended = Some(IngestEnd::Failed("the broker cancelled the consumer".into())),
                            }
                        }
                    }
                    // Every request handed an ID is submitted, whatever ended the burst, so
                    // the ingest and engine windows stay in step.
                    if submit_staged(admission, metrics, &mut staged).await.is_err() {
                        break IngestEnd::EngineGone;
                    }
                    if let Some(end) = ended {
                        break end;
                    }
                    // Ingest and settle share the runtime's one thread (worker::run), and a
                    // buffered delivery is always ready: yield after each burst, so a backlog
                    // of deliveries does not hold up results, acks and reply confirms.
                    tokio::task::yield_now().await;
                }
            },
            delivery = admin_consumer.next(), if confirms.len() < REPLY_CONFIRMS_MAX => match delivery {
                None => break IngestEnd::Failed("the broker cancelled the admin consumer".into()),
                Some(Err(e)) => break IngestEnd::Failed(format!("admin consumer: {e}")),
                Some(Ok(delivery)) => {
                    match handle_admin(&session, admission, pools, metrics, delivery, &mut confirms).await {
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
        for tag in [consumer.tag(), admin_consumer.tag()] {
            let _ = timed(
                "basic.cancel",
                session.cfg.operation_timeout_ms,
                session
                    .consume
                    .basic_cancel(tag, BasicCancelOptions::default()),
            )
            .await;
        }
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
    confirms: &mut Confirms,
    staged: &mut Vec<Staged>,
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
                confirms.push(session.start_publish(
                    reply_to.as_str(),
                    rejected_body(&reason),
                    reply_properties("rejected", &correlation_id),
                ));
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
                pool_index: pools
                    .index_of(&request.pool)
                    .expect("admit checked the pool, and pools are never removed"),
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
        // Queued on the publish channel now, before the request reaches the engine, so on
        // reply_to it precedes the result; written and confirmed without holding up the next
        // delivery. A reply that fails fails the session (the confirm arm of `run`); the ID is
        // handed out, so the request is submitted anyway and the windows stay in step.
        confirms.push(session.start_publish(
            reply_to.as_str(),
            accepted_body(request_id),
            reply_properties("accepted", &correlation_id),
        ));
    }
    let ticket = Ticket {
        epoch: session.epoch,
        delivery_tag: tag,
        message_id,
        reply_to,
        correlation_id,
        received,
        admin_op: None,
    };
    // Submitted with the rest of its burst (`submit_staged`), in the order IDs were handed out.
    staged.push((submission, ticket));
    Ok(())
}

/// Hands a burst's requests to the engine, in order.
async fn submit_staged(
    admission: &mut Admission<Ticket>,
    metrics: &Metrics,
    staged: &mut Vec<Staged>,
) -> Result<(), EngineGone> {
    for (submission, ticket) in staged.drain(..) {
        let received = ticket.received;
        admission.submit(submission, ticket).await?;
        metrics.inflight.inc();
        metrics
            .stage_accepted
            .observe(received.elapsed().as_secs_f64());
    }
    Ok(())
}

/// One delivery of the admin queue: rejected here (dead-lettered, `rejected` reply), or given
/// an ID and sent to the engine, which decides.
async fn handle_admin(
    session: &Session,
    admission: &mut Admission<Ticket>,
    pools: &Pools,
    metrics: &Metrics,
    delivery: lapin::message::Delivery,
    confirms: &mut Confirms,
) -> Result<(), HandleError> {
    let received = std::time::Instant::now();
    let tag = delivery.delivery_tag;
    let props = delivery.properties;
    let message_id = props.message_id().clone();
    let reply_to = props.reply_to().clone().filter(|r| !r.as_str().is_empty());
    let correlation_id = props.correlation_id().clone();
    let mid = message_id.as_ref().map(|m| m.as_str());
    let user_id = props.user_id().as_ref().map(|u| u.as_str());
    let request_props = message::RequestProps {
        message_id: mid,
        correlation_id: correlation_id.as_ref().map(|c| c.as_str()),
        reply_to: reply_to.as_ref().map(|r| r.as_str()),
        kind: props.kind().as_ref().map(|k| k.as_str()),
        content_type: props.content_type().as_ref().map(|t| t.as_str()),
        content_encoding: props.content_encoding().as_ref().map(|e| e.as_str()),
    };
    let command = match admit_admin(
        &request_props,
        user_id,
        &pools.allowed_users,
        &pools.own_queues,
        &delivery.data,
    )
    .and_then(|command| pools.check_not_released(command))
    {
        Ok(command) => command,
        Err((op, reason)) => {
            metrics.admin_command(op, "rejected");
            tracing::warn!(
                message_id = mid.unwrap_or(""),
                correlation_id = correlation_id.as_ref().map_or("", |c| c.as_str()),
                user_id = user_id.unwrap_or(""),
                op,
                %reason,
                "admin command rejected to the dead-letter queue"
            );
            if let Some(reply_to) = &reply_to
                && message::reply_allowed(reply_to.as_str(), &pools.own_queues)
            {
                confirms.push(session.start_publish(
                    reply_to.as_str(),
                    admin::rejected_reply(&reason).into_bytes(),
                    reply_properties("rejected", &correlation_id),
                ));
            }
            session.reject(tag).await?;
            return Ok(());
        }
    };
    let op = command.op();
    let new = admission.assign_admin().await?;
    metrics.last_request_id.set(new.request_id as i64);
    tracing::info!(
        message_id = mid.unwrap_or(""),
        correlation_id = correlation_id.as_ref().map_or("", |c| c.as_str()),
        user_id = user_id.unwrap_or(""),
        op,
        pool = message::truncate(command.pool(), 128),
        request_id = new.request_id,
        "admin command to the engine"
    );
    let spec = AdminSpec {
        message_id: mid.map(str::to_string),
        command,
    };
    let ticket = Ticket {
        epoch: session.epoch,
        delivery_tag: tag,
        message_id,
        reply_to,
        correlation_id,
        received,
        admin_op: Some(op),
    };
    admission
        .submit(Submission::Admin(new, spec), ticket)
        .await?;
    metrics.inflight.inc();
    Ok(())
}

/// The contract's op name of a command body that did not parse, for the metric's `op` label
/// (a bounded set: an op the worker does not know is `unknown`).
fn op_label(body: &[u8]) -> &'static str {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return "unknown";
    };
    match map.get("op").and_then(|o| o.as_str()) {
        Some(op) => crate::metrics::ADMIN_OPS
            .iter()
            .find(|known| **known == op)
            .copied()
            .unwrap_or("unknown"),
        None => "unknown",
    }
}

/// Decides what an admin delivery is, before it takes an ID: a command for the engine, or a
/// rejection with its op label and reason. Properties are checked as for requests; then
/// `admin.allowed_users` (when set, the `user_id` property must be present and listed; the
/// broker refuses a `user_id` that is not the publishing connection's user); then the body.
fn admit_admin(
    props: &message::RequestProps,
    user_id: Option<&str>,
    allowed_users: &[String],
    own_queues: &[String],
    body: &[u8],
) -> Result<AdminCommand, (&'static str, String)> {
    message::check_properties(props, own_queues).map_err(|e| (op_label(body), e))?;
    if !allowed_users.is_empty() {
        match user_id {
            None => {
                return Err((
                    op_label(body),
                    "no user_id property: admin.allowed_users is set, so a command must carry \
                     user_id = one of those users (rewardpool admin sets it to the user of amqp.url)"
                        .into(),
                ));
            }
            Some(user) if !allowed_users.iter().any(|a| a == user) => {
                return Err((
                    op_label(body),
                    format!(
                        "user {:?} is not in admin.allowed_users",
                        message::truncate(user, 128)
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    admin::parse_command(body).map_err(|e| (op_label(body), e))
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
        pools.index_of(p).is_some() || routed_pool.is_some_and(|key| key != p)
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
        Pools::new(
            "default".into(),
            HashMap::from([("default".into(), 0), ("spin".into(), 1)]),
            2,
            Vec::new(),
            Vec::new(),
        )
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
    fn an_added_pool_is_served_at_the_next_index() {
        let p = pools();
        assert_eq!(p.index_of("xmas"), None);
        assert_eq!(p.added("xmas"), 2);
        assert_eq!(p.index_of("xmas"), Some(2));
        assert_eq!(p.ids(), ["default", "spin", "xmas"]);
        let (a, _rx) = admission();
        match admit(&a, &p, &props(None), &[], None, br#"{"pool":"xmas"}"#) {
            Ok(Admit::New(r)) => assert_eq!(r.pool, "xmas"),
            other => panic!("a draw from the added pool: {other:?}"),
        }
    }

    #[test]
    fn a_released_pool_is_not_owned_and_takes_no_admin_command() {
        let p = pools().with_released(vec!["spin".into()]);
        assert_eq!(p.ids(), ["default"]);
        // Still in the index: a request reaching this worker for it goes to the engine, which
        // answers `closed` (the worker releases only closed pools).
        assert_eq!(p.index_of("spin"), Some(1));
        let command = |body: &[u8]| admin::parse_command(body).expect("a valid command");
        let (op, reason) = p
            .check_not_released(command(br#"{"op":"open_pool","pool":"spin"}"#))
            .unwrap_err();
        assert_eq!(op, "open_pool");
        assert!(
            reason.contains("\"spin\"") && reason.contains("amqp.released_pools"),
            "{reason}"
        );
        assert!(
            p.check_not_released(command(br#"{"op":"close_pool","pool":"default"}"#))
                .is_ok()
        );
    }

    #[test]
    fn admin_commands_pass_the_allow_list_and_the_strict_parser() {
        let body = br#"{"op":"restock","pool":"default","item":"gold","add":1}"#;
        let none: Vec<String> = Vec::new();
        let ops = vec!["ops".to_string()];
        let p = props(Some("a-1"));
        // No list: anyone, with or without user_id.
        assert!(admit_admin(&p, None, &none, &[], body).is_ok());
        assert!(admit_admin(&p, Some("bob"), &none, &[], body).is_ok());
        // A list: the user_id must be present and listed; the reason names the rule.
        assert!(admit_admin(&p, Some("ops"), &ops, &[], body).is_ok());
        let (op, reason) = admit_admin(&p, Some("bob"), &ops, &[], body).unwrap_err();
        assert_eq!(op, "restock");
        assert!(
            reason.contains("\"bob\"") && reason.contains("admin.allowed_users"),
            "{reason}"
        );
        let (_, reason) = admit_admin(&p, None, &ops, &[], body).unwrap_err();
        assert!(
            reason.contains("user_id") && reason.contains("admin.allowed_users"),
            "{reason}"
        );
        // The body: strict, and an op the worker does not know is labelled `unknown`.
        let (op, reason) =
            admit_admin(&p, None, &none, &[], br#"{"op":"explode","pool":"p"}"#).unwrap_err();
        assert_eq!(op, "unknown");
        assert!(reason.contains("unknown op"), "{reason}");
        let (op, _) = admit_admin(&p, None, &none, &[], b"\xff").unwrap_err();
        assert_eq!(op, "unknown");
        let (op, _) = admit_admin(
            &p,
            None,
            &none,
            &[],
            br#"{"op":"set_weight","pool":"p","item":"i"}"#,
        )
        .unwrap_err();
        assert_eq!(op, "set_weight");
        // Properties as for requests: the worker's own type, a reply_to of its own.
        let own = message::RequestProps {
            kind: Some("admin_result"),
            ..Default::default()
        };
        assert!(admit_admin(&own, None, &none, &[], body).is_err());
        let queues = vec!["rp.admin".to_string()];
        let loop_back = message::RequestProps {
            reply_to: Some("rp.admin"),
            ..Default::default()
        };
        assert!(admit_admin(&loop_back, None, &none, &queues, body).is_err());
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
