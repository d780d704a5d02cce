//! The broker edge: connecting, declaring the contract's topology, timeouts on every call.
//!
//! One connection per session with two channels: `consume` (qos, consume, ack/nack/reject —
//! delivery tags belong to it) and `publish` (publisher confirms; accepted replies, rejected
//! replies and results all go here, so on `reply_to` a request's accepted reply always precedes
//! its result). A session is thrown away whole on any error; the supervisor builds a new one.
//!
//! lapin's automatic recovery is not used: an explicit reconnect loop is easier to reason about
//! (old delivery tags are never acked on a new channel), see shared/NOTES.md.

use crate::config::{AmqpConfig, QueueType};
use lapin::options::{
    BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use std::future::Future;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("broker call {what} timed out after {ms} ms")]
    Timeout { what: &'static str, ms: u64 },
    #[error("broker call {what} failed: {error}")]
    Broker {
        what: &'static str,
        error: lapin::Error,
    },
    #[error(
        "queue {queue:?} already exists with other arguments ({detail}); delete it or change the configuration (amqp.queue_type, amqp.delivery_limit)"
    )]
    Inequivalent { queue: String, detail: String },
    #[error(
        "exchange {exchange:?} already exists with other arguments ({detail}); delete it or change the configuration (amqp.dead_letter_exchange)"
    )]
    InequivalentExchange { exchange: String, detail: String },
    #[error("{0}")]
    Session(String),
}

impl AmqpError {
    /// Errors that no reconnect can fix.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            AmqpError::Inequivalent { .. } | AmqpError::InequivalentExchange { .. }
        )
    }
}

/// Runs a broker call with the configured timeout.
pub async fn timed<T>(
    what: &'static str,
    ms: u64,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T, AmqpError> {
    match tokio::time::timeout(Duration::from_millis(ms), fut).await {
        Err(_) => Err(AmqpError::Timeout { what, ms }),
        Ok(Err(error)) => Err(AmqpError::Broker { what, error }),
        Ok(Ok(v)) => Ok(v),
    }
}

pub struct Link {
    pub connection: Connection,
    pub consume: Channel,
    pub publish: Channel,
}

/// Connects and opens the two channels (publish with confirms).
pub async fn connect(cfg: &AmqpConfig, name: &str) -> Result<Link, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let connection = timed(
        "connect",
        cfg.connect_timeout_ms,
        Connection::connect(&cfg.url, props),
    )
    .await?;
    let op = cfg.operation_timeout_ms;
    let consume = timed("channel.open", op, connection.create_channel()).await?;
    let publish = timed("channel.open", op, connection.create_channel()).await?;
    timed(
        "confirm.select",
        op,
        publish.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    Ok(Link {
        connection,
        consume,
        publish,
    })
}

/// Declares the dead-letter exchange, the three queues and the binding, idempotently.
pub async fn declare(link: &Link, cfg: &AmqpConfig) -> Result<(), AmqpError> {
    let op = cfg.operation_timeout_ms;
    let ch = &link.consume;
    let dlx = cfg.dead_letter_exchange_name();
    timed(
        "exchange.declare",
        op,
        ch.exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .map_err(|e| match e {
        AmqpError::Broker { error, .. } if precondition_failed(&error) => {
            AmqpError::InequivalentExchange {
                exchange: dlx.clone(),
                detail: error.to_string(),
            }
        }
        e => e,
    })?;
    let base = |extra: bool| {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(cfg.queue_type.as_str().into()),
        );
        if extra {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(dlx.as_str().into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(cfg.dead_letter_queue.as_str().into()),
            );
            if cfg.queue_type == QueueType::Quorum {
                args.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongLongInt(cfg.delivery_limit as i64),
                );
            }
        }
        args
    };
    for (queue, args) in [
        (&cfg.dead_letter_queue, base(false)),
        (&cfg.result_queue, base(false)),
        (&cfg.request_queue, base(true)),
    ] {
        declare_queue(ch, queue, args, op).await?;
    }
    timed(
        "queue.bind",
        op,
        ch.queue_bind(
            cfg.dead_letter_queue.as_str().into(),
            dlx.as_str().into(),
            cfg.dead_letter_queue.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    timed(
        "basic.qos",
        op,
        link.consume
            .basic_qos(cfg.prefetch, BasicQosOptions::default()),
    )
    .await?;
    Ok(())
}

/// The broker refused a declaration because the object exists with other arguments.
fn precondition_failed(error: &lapin::Error) -> bool {
    let text = error.to_string();
    text.contains("PRECONDITION_FAILED") || text.contains("inequivalent")
}

async fn declare_queue(
    ch: &Channel,
    queue: &str,
    args: FieldTable,
    op: u64,
) -> Result<(), AmqpError> {
    let name: ShortString = queue.into();
    match timed(
        "queue.declare",
        op,
        ch.queue_declare(name, QueueDeclareOptions::durable(), args),
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(AmqpError::Broker { error, .. }) if precondition_failed(&error) => {
            Err(AmqpError::Inequivalent {
                queue: queue.to_string(),
                detail: error.to_string(),
            })
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    /// The build must use the patched amq-protocol-types in `vendor/` (see README,
    /// "Dependencies"). Cargo only warns when a `[patch]` stops applying (e.g. lapin moves to a
    /// newer amq-protocol-types): the registry crate then fails the connection on a non-UTF-8
    /// short string again. This check makes that a test failure.
    #[test]
    fn the_vendored_amq_protocol_types_is_the_one_in_the_build() {
        const VENDORED_VERSION: &str = "10.6.3";
        let lock_path = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock");
        let lock = std::fs::read_to_string(lock_path).expect("read Cargo.lock");
        let blocks: Vec<&str> = lock
            .split("[[package]]")
            .filter(|b| {
                b.lines()
                    .any(|l| l.trim() == "name = \"amq-protocol-types\"")
            })
            .collect();
        let fix = "see README.md, \"Moving the vendored crate forward when lapin updates\": copy \
                   the new upstream version into vendor/amq-protocol-types, re-apply the lossy \
                   short-string patch, and update this test's version";
        assert_eq!(
            blocks.len(),
            1,
            "Cargo.lock has {} amq-protocol-types packages: the [patch] in Cargo.toml no longer \
             replaces the one lapin wants; {fix}",
            blocks.len()
        );
        let block = blocks[0];
        assert!(
            !block
                .lines()
                .any(|l| l.trim_start().starts_with("source =")),
            "amq-protocol-types comes from a registry, not from vendor/ (the [patch] is unused); {fix}:\n{block}"
        );
        assert!(
            block
                .lines()
                .any(|l| l.trim() == format!("version = \"{VENDORED_VERSION}\"")),
            "amq-protocol-types in Cargo.lock is not the vendored {VENDORED_VERSION}; {fix}:\n{block}"
        );
    }
}
