//! One broker session: a connection, its two channels and the ack state of its deliveries.
//!
//! Everything tied to delivery tags lives here, so that a reconnect replaces it whole. The
//! `Ticket` each request carries through the engine names its session (`epoch`); the settler
//! acks a delivery only on the session that delivered it, and drops outcomes of dead sessions
//! (their deliveries come back, and the Repeats rule republishes their results).

use crate::acks::AckTracker;
use crate::amqp::{AmqpError, timed};
use crate::config::AmqpConfig;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, PublisherConfirm};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::watch;

/// What travels with a request through the engine.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub epoch: u64,
    pub delivery_tag: u64,
    pub message_id: Option<ShortString>,
    pub reply_to: Option<ShortString>,
    pub correlation_id: Option<ShortString>,
    /// When the delivery reached ingest: the request stage latencies are measured from it.
    pub received: std::time::Instant,
    /// An admin command's op (the contract's name); `None` for a draw request. Settle answers
    /// a command with its reply (`admin_result` or `rejected`) instead of a result.
    pub admin_op: Option<&'static str>,
}

pub struct Session {
    pub epoch: u64,
    pub consume: Channel,
    pub publish: Channel,
    /// The channel broker locks are declared on (a refused lock closes it, nothing else).
    pub lock: Channel,
    pub cfg: Arc<AmqpConfig>,
    acks: Mutex<AckTracker>,
    /// Held while a publish is queued: lapin numbers a publish for its confirm
    /// (`register_pending`) and queues its frames under two different locks, so two threads
    /// publishing on one channel at once (ingest and settle on different threads of a
    /// multi-threaded runtime: the worker's has one thread, an embedding one may not) could
    /// queue frames in another order than they were numbered, and a confirm would be
    /// taken for another message's. Taken only around the synchronous first poll.
    publish_order: Mutex<()>,
    broken: watch::Sender<Option<String>>,
    /// `Some(reason)` while the broker blocks this connection (connection.blocked: a memory or
    /// disk alarm). Read it with [`Session::blocked`] (readiness shows "blocked").
    blocked: watch::Sender<Option<String>>,
}

impl Session {
    pub fn new(
        epoch: u64,
        consume: Channel,
        publish: Channel,
        lock: Channel,
        cfg: Arc<AmqpConfig>,
    ) -> Session {
        Session {
            epoch,
            consume,
            publish,
            lock,
            cfg,
            acks: Mutex::new(AckTracker::new()),
            publish_order: Mutex::new(()),
            broken: watch::channel(None).0,
            blocked: watch::channel(None).0,
        }
    }

    /// Takes the per-pool broker lock and binds the pool on the routing exchange
    /// ([`crate::amqp::own_pool`]); nothing without `amqp.exchange`. The admin path calls it
    /// when `add_pool` adds a pool, before the command's reply; the worker calls it for every
    /// pool it serves when a session opens. After a refusal (`AmqpError::LockHeld`) the lock
    /// channel is closed: a later call fails with a broker error until the next session.
    pub async fn own_pool(&self, pool: &str) -> Result<(), AmqpError> {
        crate::amqp::own_pool(&self.lock, &self.consume, &self.cfg, pool).await
    }

    /// The broker's reason while it blocks this connection's publishes (resource alarm).
    pub fn blocked(&self) -> Option<String> {
        self.blocked.borrow().clone()
    }

    /// Records connection.blocked / connection.unblocked (from the connection's events).
    pub fn set_blocked(&self, reason: Option<String>) {
        self.blocked.send_replace(reason);
    }

    /// Awaits `fut` under the operation timeout, which does not count while the broker blocks
    /// the connection: a blocked broker (memory or disk alarm) is waiting, not lost. The wait
    /// stays bounded by the shutdown deadline (worker::run_until) once the worker stops.
    /// `None` when the timeout passed with the broker not blocking.
    pub async fn unless_blocked<T>(&self, fut: impl std::future::Future<Output = T>) -> Option<T> {
        let op = std::time::Duration::from_millis(self.op_ms());
        let mut rx = self.blocked.subscribe();
        tokio::pin!(fut);
        loop {
            rx.mark_unchanged();
            tokio::select! {
                v = &mut fut => return Some(v),
                _ = tokio::time::sleep(op) => {}
            }
            // Blocked now, or blocked and unblocked meanwhile: the timeout starts again.
            if rx.borrow().is_none() && !rx.has_changed().unwrap_or(false) {
                return None;
            }
            if rx.borrow().is_some() {
                tokio::select! {
                    v = &mut fut => return Some(v),
                    _ = rx.wait_for(|b| b.is_none()) => {}
                }
            }
        }
    }

    /// Marks the session dead; the ingest loop sees it and the supervisor reconnects.
    pub fn fail(&self, reason: String) {
        self.broken.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// Resolves with the reason once the session failed.
    pub async fn broken(&self) -> String {
        let mut rx = self.broken.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return "session dropped".into();
            }
        }
    }

    pub fn is_broken(&self) -> bool {
        self.broken.borrow().is_some()
    }

    fn op_ms(&self) -> u64 {
        self.cfg.operation_timeout_ms
    }

    /// Publishes to the default exchange; resolves when the frame is queued, returning the
    /// confirm to await.
    pub async fn publish(
        &self,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<PublisherConfirm, AmqpError> {
        let mut publish = std::pin::pin!(self.publish.basic_publish(
            "".into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        ));
        // Numbered and queued under `publish_order` (the first poll does both).
        let first = {
            let _order = self.publish_order.lock().expect("publish order lock");
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            publish.as_mut().poll(&mut cx)
        };
        let result = match first {
            Poll::Ready(result) => Some(result),
            Poll::Pending => self.unless_blocked(publish).await,
        };
        match result {
            None => Err(AmqpError::Timeout {
                what: "basic.publish",
                ms: self.op_ms(),
            }),
            Some(Err(error)) => Err(AmqpError::Broker {
                what: "basic.publish",
                error,
            }),
            Some(Ok(confirm)) => Ok(confirm),
        }
    }

    /// Starts a publish to the default exchange without waiting for it: its frames are queued
    /// on the publish channel now, so publishes reach the broker in the order they were
    /// started (an accepted reply started before its request is submitted always precedes the
    /// result on `reply_to`), and the caller's task is not woken per publish by lapin's I/O thread
    /// to learn that frames were written. Await the returned [`Publishing`] for the confirm.
    pub fn start_publish(
        &self,
        routing_key: &str,
        body: impl AsRef<[u8]> + Send + 'static,
        props: BasicProperties,
    ) -> Publishing {
        let channel = self.publish.clone();
        let routing_key = ShortString::from(routing_key);
        let mut fut: Pin<Box<PublishFuture>> = Box::pin(async move {
            channel
                .basic_publish(
                    "".into(),
                    routing_key,
                    BasicPublishOptions::default(),
                    body.as_ref(),
                    props,
                )
                .await
        });
        // lapin queues the frames on the first poll (before its first await point); the
        // waker of this poll is never used, the caller's is registered when it awaits.
        let _order = self.publish_order.lock().expect("publish order lock");
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        Publishing(match fut.as_mut().poll(&mut cx) {
            Poll::Pending => Stage::Queued(fut),
            Poll::Ready(Ok(confirm)) => Stage::Confirming(confirm),
            Poll::Ready(Err(e)) => Stage::Failed(Some(e)),
        })
    }

    /// Rejects without requeue (dead-letters) and records the tag as settled.
    pub async fn reject(&self, tag: u64) -> Result<(), AmqpError> {
        timed(
            "basic.reject",
            self.op_ms(),
            self.consume
                .basic_reject(tag, lapin::options::BasicRejectOptions { requeue: false }),
        )
        .await?;
        self.acks.lock().expect("acks lock").settled(tag);
        Ok(())
    }

    /// Nacks with requeue (a result publish was refused) and records the tag as settled.
    pub async fn requeue(&self, tag: u64) -> Result<(), AmqpError> {
        timed(
            "basic.nack",
            self.op_ms(),
            self.consume.basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            ),
        )
        .await?;
        self.acks.lock().expect("acks lock").settled(tag);
        Ok(())
    }

    /// Marks tags ready and sends the acks the tracker plans; returns how many `basic.ack`
    /// frames that took.
    pub async fn ack(&self, tags: &[u64]) -> Result<u64, AmqpError> {
        let plan = {
            let mut acks = self.acks.lock().expect("acks lock");
            for tag in tags {
                acks.ready(*tag);
            }
            acks.plan()
        };
        let frames = plan.multiple_up_to.is_some() as u64 + plan.single.len() as u64;
        if let Some(tag) = plan.multiple_up_to {
            timed(
                "basic.ack",
                self.op_ms(),
                self.consume
                    .basic_ack(tag, BasicAckOptions { multiple: true }),
            )
            .await?;
        }
        for tag in plan.single {
            timed(
                "basic.ack",
                self.op_ms(),
                self.consume.basic_ack(tag, BasicAckOptions::default()),
            )
            .await?;
        }
        Ok(frames)
    }

    /// Returns every delivery not settled yet to the queue (shutdown).
    pub async fn requeue_unsettled(&self) -> Result<(), AmqpError> {
        timed(
            "basic.nack",
            self.op_ms(),
            self.consume.basic_nack(
                0,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            ),
        )
        .await
    }
}

/// Properties of a reply (`accepted`, `rejected`) or result.
pub fn reply_properties(kind: &str, correlation_id: &Option<ShortString>) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_type(kind.into())
        .with_content_type("application/json".into());
    if let Some(c) = correlation_id {
        props = props.with_correlation_id(c.clone());
    }
    props
}

pub fn result_properties(request_id: u64, correlation_id: &Option<ShortString>) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        "request_id".into(),
        AMQPValue::LongLongInt(request_id as i64),
    );
    reply_properties("result", correlation_id)
        .with_delivery_mode(2)
        .with_message_id(request_id.to_string().into())
        .with_headers(headers)
}

type PublishFuture = dyn Future<Output = lapin::Result<PublisherConfirm>> + Send;

/// A publish started by [`Session::start_publish`]: its frames are queued on the channel.
/// Awaited, it resolves with the broker's confirmation once the frames are written and the
/// broker confirmed them (or with the error that stopped either), with no timer of its own:
/// whoever awaits it puts it under a deadline ([`Session::unless_blocked`], once per batch).
pub struct Publishing(Stage);

enum Stage {
    /// Frames queued; waiting for lapin's I/O thread to write them.
    Queued(Pin<Box<PublishFuture>>),
    /// Written; waiting for the broker's confirm.
    Confirming(PublisherConfirm),
    /// Failed before anything was written (the error is taken once).
    Failed(Option<lapin::Error>),
}

impl Future for Publishing {
    type Output = lapin::Result<lapin::Confirmation>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.0 {
                Stage::Queued(fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(confirm)) => this.0 = Stage::Confirming(confirm),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                },
                Stage::Confirming(confirm) => return Pin::new(confirm).poll(cx),
                Stage::Failed(e) => {
                    return Poll::Ready(Err(e
                        .take()
                        .expect("a Publishing polled after it completed")));
                }
            }
        }
    }
}
