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
                    match handle(&session, admission, pools, delivery, &mut confirms).await {
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
    delivery: lapin::message::Delivery,
    confirms: &mut FuturesUnordered<PublisherConfirm>,
) -> Result<(), HandleError> {
    let tag = delivery.delivery_tag;
    let props = delivery.properties;
    let message_id = props.message_id().clone();
    let reply_to = props.reply_to().clone().filter(|r| !r.as_str().is_empty());
    let correlation_id = props.correlation_id().clone();

    // A repeat is known by its message_id before anything else; its body is not looked at.
    let mid = message_id.as_ref().map(|m| m.as_str());
    let key = mid.map(message_key);
    let checked = message::check_message_id(mid).and_then(|()| match admission.repeat_of(key) {
        Some(repeat) => Ok(Admit::Repeat(repeat)),
        None => message::parse_request(&delivery.data, &pools.default_pool, |p| {
            pools.index.contains_key(p)
        })
        .map(Admit::New),
    });
    let admit = match checked {
        Ok(admit) => admit,
        Err(reason) => {
            tracing::info!(delivery_tag = tag, %reason, "request rejected to the dead-letter queue");
            if let Some(reply_to) = &reply_to {
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
        Admit::Repeat(repeat) => Submission::Repeat(repeat),
        Admit::New(request) => Submission::New(
            admission.assign_new(key).await?,
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
    };
    admission.submit(submission, ticket).await?;
    Ok(())
}

/// What ingest decided for a valid delivery.
enum Admit {
    Repeat(RepeatOf),
    New(message::ParsedRequest),
}
