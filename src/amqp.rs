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
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
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
        "exchange {exchange:?} already exists with other arguments ({detail}); delete it or change the configuration (amqp.dead_letter_exchange, amqp.exchange)"
    )]
    InequivalentExchange { exchange: String, detail: String },
    #[error("{0}")]
    Session(String),
    #[error(transparent)]
    LockHeld(#[from] LockHeld),
    #[error("TLS configuration: {0}")]
    TlsFile(String),
    #[error(
        "TLS certificate problem talking to the broker: {0} (is amqp.tls_ca_file the CA that signed the broker's certificate, and does the URL's host match it? does the broker require a client certificate: amqp.tls_cert_file, amqp.tls_key_file?)"
    )]
    Certificate(String),
    #[error(
        "the broker refused the credentials of amqp.url (ACCESS_REFUSED: wrong user or password, or no access to the vhost): {0}"
    )]
    AuthRefused(String),
}

/// Names the two connect failures an operator must fix: credentials and certificates.
fn classify_connect_error(e: AmqpError) -> AmqpError {
    let AmqpError::Broker { error, .. } = &e else {
        return e;
    };
    let text = error.to_string();
    let lower = text.to_ascii_lowercase();
    if text.contains("ACCESS_REFUSED") || lower.contains("authentication") {
        AmqpError::AuthRefused(text)
    } else if lower.contains("certificate")
        || lower.contains("unknownissuer")
        || lower.contains("handshake")
        || lower.contains("tls")
        || lower.contains("alert")
    {
        AmqpError::Certificate(text)
    } else {
        e
    }
}

/// Another connection holds a broker lock (see `take_lock`).
#[derive(Debug, thiserror::Error)]
#[error(
    "another worker holds the broker lock on {what} {name:?} (exclusive queue {queue:?}): two workers must not serve the same {what} (each would use its own data directory); stop the other worker or configure this one with another {what}{hint}",
    hint = lock_hint(.what)
)]
pub struct LockHeld {
    /// What the lock guards ("request queue", later "pool").
    pub what: &'static str,
    pub name: String,
    /// The exclusive queue that is the lock.
    pub queue: String,
}

/// The way out of a pool lock held elsewhere that is not a misconfiguration: a pool of this
/// worker's durable state (a config pool, or one added by `add_pool`) that was moved away.
fn lock_hint(what: &str) -> &'static str {
    if what == "pool" {
        " (a pool moved to another worker stays in this one's durable state: list it in amqp.released_pools, README \"Moving a pool\")"
    } else {
        ""
    }
}

impl AmqpError {
    /// Errors that no reconnect can fix.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            AmqpError::Inequivalent { .. }
                | AmqpError::InequivalentExchange { .. }
                | AmqpError::LockHeld(_)
                | AmqpError::TlsFile(_)
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
    /// Declares the broker locks only: a refused lock closes this channel, nothing else.
    pub lock: Channel,
}

/// The TLS settings of `amqp.tls_*`: the CA file's certificates are trusted for the broker,
/// the client certificate and key are presented when the broker asks for one. Read at every
/// connect, so renewed files are picked up on reconnect.
pub fn tls_config(cfg: &AmqpConfig) -> Result<OwnedTLSConfig, AmqpError> {
    let read = |key: &str, path: &str| {
        std::fs::read(path).map_err(|e| AmqpError::TlsFile(format!("amqp.{key} = {path:?}: {e}")))
    };
    let mut tls = OwnedTLSConfig::default();
    if !cfg.tls_ca_file.is_empty() {
        let pem = read("tls_ca_file", &cfg.tls_ca_file)?;
        let pem = String::from_utf8(pem).map_err(|_| {
            AmqpError::TlsFile(format!(
                "amqp.tls_ca_file = {:?}: not a PEM text file",
                cfg.tls_ca_file
            ))
        })?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(AmqpError::TlsFile(format!(
                "amqp.tls_ca_file = {:?}: no PEM certificate in it",
                cfg.tls_ca_file
            )));
        }
        tls.cert_chain = Some(pem);
    }
    match (cfg.tls_cert_file.is_empty(), cfg.tls_key_file.is_empty()) {
        (true, true) => {}
        (false, false) => {
            tls.identity = Some(OwnedIdentity::PKCS8 {
                pem: read("tls_cert_file", &cfg.tls_cert_file)?,
                key: read("tls_key_file", &cfg.tls_key_file)?,
            });
        }
        _ => {
            return Err(AmqpError::TlsFile(
                "amqp.tls_cert_file and amqp.tls_key_file go together: set both or neither".into(),
            ));
        }
    }
    Ok(tls)
}

/// Connects and opens the channels (publish with confirms).
pub async fn connect(cfg: &AmqpConfig, name: &str) -> Result<Link, AmqpError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let tls = tls_config(cfg)?;
    let runtime = lapin::runtime::default_runtime().map_err(|error| AmqpError::Broker {
        what: "connect",
        error,
    })?;
    let connection = timed(
        "connect",
        cfg.connect_timeout_ms,
        Connection::connect_with_config(&cfg.url, props, tls, runtime),
    )
    .await
    .map_err(classify_connect_error)?;
    let op = cfg.operation_timeout_ms;
    let consume = timed("channel.open", op, connection.create_channel()).await?;
    let publish = timed("channel.open", op, connection.create_channel()).await?;
    let lock = timed("channel.open", op, connection.create_channel()).await?;
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
        lock,
    })
}

/// The exclusive queue that is the broker lock on `name`.
pub fn lock_queue_name(name: &str) -> String {
    format!("{name}.lock")
}

/// Takes a broker lock: declares the exclusive queue `<name>.lock` on `channel`'s connection.
///
/// RabbitMQ enforces an exclusive queue for every client (a declare from another connection is
/// refused with 405 RESOURCE_LOCKED, which also closes `channel`) and deletes it when the owning
/// connection ends, so the lock lives exactly as long as the broker session: it is taken again
/// on every reconnect, before consuming. Exclusive consumers are not used because quorum queues
/// on RabbitMQ 3.x do not enforce them (shared/NOTES.md). The lock queue keeps no message
/// (`x-max-length` 0): publishing to it by name costs nothing. `what` names the thing locked
/// in the error ("request queue"; a pool lock uses the same function).
pub async fn take_lock(
    channel: &Channel,
    what: &'static str,
    name: &str,
    op_ms: u64,
) -> Result<(), AmqpError> {
    let queue = lock_queue_name(name);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    match timed(
        "queue.declare (lock)",
        op_ms,
        channel.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            args,
        ),
    )
    .await
    {
        Ok(_) => Ok(()),
        Err(AmqpError::Broker { error, .. }) if resource_locked(&error) => Err(LockHeld {
            what,
            name: name.to_string(),
            queue,
        }
        .into()),
        Err(e) => Err(e),
    }
}

/// The broker refused an exclusive queue another connection owns.
fn resource_locked(error: &lapin::Error) -> bool {
    let text = error.to_string();
    text.contains("RESOURCE_LOCKED") || text.contains("exclusive access")
}

/// Declares the dead-letter exchange, the four queues (dead-letter, result, request, admin) and
/// the binding, idempotently.
pub async fn declare(link: &Link, cfg: &AmqpConfig) -> Result<(), AmqpError> {
    let op = cfg.operation_timeout_ms;
    let ch = &link.consume;
    let dlx = cfg.dead_letter_exchange_name();
    let admin_dlx = cfg.admin_dead_letter_exchange_name();
    for exchange in [&dlx, &admin_dlx] {
        timed(
            "exchange.declare",
            op,
            ch.exchange_declare(
                exchange.as_str().into(),
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
                    exchange: exchange.clone(),
                    detail: error.to_string(),
                }
            }
            e => e,
        })?;
    }
    let base = |dead_letter: Option<(&str, &str)>| {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(cfg.queue_type.as_str().into()),
        );
        if let Some((exchange, routing_key)) = dead_letter {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(exchange.into()),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(routing_key.into()),
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
    // The admin queue dead-letters like the request queue: a rejected command lands in the
    // dead-letter queue untouched, and (quorum) a command redelivered `delivery_limit` times
    // is dead-lettered too. A command `rewardpool admin` sent expires there after its
    // `--timeout` (per-message TTL), so one nobody consumed in time is never applied later.
    // It goes through its own exchange, `<admin_queue>.dlx` (routing key: the admin queue),
    // bound to this worker's dead-letter queue: the admin queue's arguments then name nothing
    // of the request queue, and a worker with other request queues (a benchmark's next run)
    // declares the same default admin queue without a conflict.
    let admin_dead_letter = (admin_dlx.as_str(), cfg.admin_queue.as_str());
    for (queue, args) in [
        (&cfg.dead_letter_queue, base(None)),
        (&cfg.result_queue, base(None)),
        (
            &cfg.request_queue,
            base(Some((&dlx, &cfg.dead_letter_queue))),
        ),
        (&cfg.admin_queue, base(Some(admin_dead_letter))),
    ] {
        declare_queue(ch, queue, args, op).await?;
    }
    for (exchange, routing_key) in [
        (&dlx, &cfg.dead_letter_queue),
        (&admin_dlx, &cfg.admin_queue),
    ] {
        timed(
            "queue.bind",
            op,
            ch.queue_bind(
                cfg.dead_letter_queue.as_str().into(),
                exchange.as_str().into(),
                routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
    }
    timed(
        "basic.qos",
        op,
        link.consume
            .basic_qos(cfg.prefetch, BasicQosOptions::default()),
    )
    .await?;
    Ok(())
}

/// The alternate exchange of the routing exchange (fanout): takes what no binding routes.
pub fn alternate_exchange_name(exchange: &str) -> String {
    format!("{exchange}.ae")
}

/// The queue where requests for a pool no worker owns wait, untouched.
pub fn unrouted_queue_name(exchange: &str) -> String {
    format!("{exchange}.unrouted")
}

/// The queues the worker itself consumes, declares or owns: request, result, dead-letter and
/// admin queues, the request queue's lock and, with a routing exchange, its unrouted queue. No
/// reply ever goes to one of them (it would be consumed again, or pollute results or dead
/// letters). Computed once per worker, not per delivery.
pub fn own_queues(cfg: &AmqpConfig) -> Vec<String> {
    let mut own = vec![
        cfg.request_queue.clone(),
        cfg.result_queue.clone(),
        cfg.dead_letter_queue.clone(),
        cfg.admin_queue.clone(),
        lock_queue_name(&cfg.request_queue),
    ];
    if !cfg.exchange.is_empty() {
        own.push(unrouted_queue_name(&cfg.exchange));
    }
    own
}

/// The name of the per-pool broker lock (its exclusive queue is this plus `.lock`). It carries
/// the exchange's name: one routing exchange is one set of shards.
pub fn pool_lock_name(exchange: &str, pool: &str) -> String {
    format!("{exchange}.pool.{pool}")
}

/// With `amqp.exchange` set, declares the routing topology idempotently: the alternate
/// exchange (fanout, durable) bound to `<exchange>.unrouted` (durable, `amqp.queue_type`, no
/// dead-lettering: nothing consumes it, an operator reads it), and the routing exchange
/// (direct, durable, `alternate-exchange` = the alternate). Pools are bound by [`own_pool`].
/// Without the key it does nothing.
pub async fn declare_routing(ch: &Channel, cfg: &AmqpConfig) -> Result<(), AmqpError> {
    if cfg.exchange.is_empty() {
        return Ok(());
    }
    let op = cfg.operation_timeout_ms;
    let ae = alternate_exchange_name(&cfg.exchange);
    let unrouted = unrouted_queue_name(&cfg.exchange);
    declare_exchange(ch, &ae, ExchangeKind::Fanout, FieldTable::default(), op).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(cfg.queue_type.as_str().into()),
    );
    declare_queue(ch, &unrouted, args, op).await?;
    timed(
        "queue.bind",
        op,
        ch.queue_bind(
            unrouted.as_str().into(),
            ae.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    let mut args = FieldTable::default();
    args.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(ae.as_str().into()),
    );
    declare_exchange(ch, &cfg.exchange, ExchangeKind::Direct, args, op).await
}

/// Takes ownership of `pool` on the routing exchange: first the per-pool broker lock
/// (`take_lock` with what = "pool", on `lock`, the channel a refusal may close), then the
/// binding of the request queue with routing key = the pool id (on `bind`). In this order, so
/// that a pool is never bound by a worker that does not hold it. Called for every pool a worker
/// serves on every session before consuming, and by the admin path when `add_pool` adds one
/// (before its reply). Without `amqp.exchange` it does nothing. A pool another worker owns is
/// `AmqpError::LockHeld` naming the pool; the binding is then not made.
pub async fn own_pool(
    lock: &Channel,
    bind: &Channel,
    cfg: &AmqpConfig,
    pool: &str,
) -> Result<(), AmqpError> {
    if cfg.exchange.is_empty() {
        return Ok(());
    }
    let op = cfg.operation_timeout_ms;
    take_lock(lock, "pool", &pool_lock_name(&cfg.exchange, pool), op)
        .await
        .map_err(|e| match e {
            // Name the pool itself, not the lock's internal name.
            AmqpError::LockHeld(held) => LockHeld {
                name: pool.to_string(),
                ..held
            }
            .into(),
            e => e,
        })?;
    timed(
        "queue.bind (pool)",
        op,
        bind.queue_bind(
            cfg.request_queue.as_str().into(),
            cfg.exchange.as_str().into(),
            pool.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
}

/// Removes the binding of `pool` from this worker's request queue on the routing exchange: for
/// a pool in the worker's durable state that it no longer serves (removed from its config, so
/// moved away). Bindings of a durable queue outlive the worker; without this, requests for a
/// moved pool would still be copied into the old owner's queue. Unbinding a binding that does
/// not exist is not an error. Without `amqp.exchange` it does nothing.
pub async fn release_pool(bind: &Channel, cfg: &AmqpConfig, pool: &str) -> Result<(), AmqpError> {
    if cfg.exchange.is_empty() {
        return Ok(());
    }
    timed(
        "queue.unbind (pool)",
        cfg.operation_timeout_ms,
        bind.queue_unbind(
            cfg.request_queue.as_str().into(),
            cfg.exchange.as_str().into(),
            pool.into(),
            FieldTable::default(),
        ),
    )
    .await
}

async fn declare_exchange(
    ch: &Channel,
    exchange: &str,
    kind: ExchangeKind,
    args: FieldTable,
    op: u64,
) -> Result<(), AmqpError> {
    timed(
        "exchange.declare",
        op,
        ch.exchange_declare(
            exchange.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        ),
    )
    .await
    .map_err(|e| match e {
        AmqpError::Broker { error, .. } if precondition_failed(&error) => {
            AmqpError::InequivalentExchange {
                exchange: exchange.to_string(),
                detail: error.to_string(),
            }
        }
        e => e,
    })
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

    #[test]
    fn own_queues_name_every_queue_of_the_worker() {
        let mut cfg = crate::config::Config::builtin().amqp;
        let own = super::own_queues(&cfg);
        for q in [
            "rewardpool.requests",
            "rewardpool.results",
            "rewardpool.dead",
        ] {
            assert!(own.iter().any(|o| o == q), "{q} missing from {own:?}");
        }
        assert!(own.contains(&"rewardpool.admin".to_string()), "{own:?}");
        assert!(
            own.contains(&"rewardpool.requests.lock".to_string()),
            "{own:?}"
        );
        assert!(!own.iter().any(|o| o.ends_with(".unrouted")), "{own:?}");
        cfg.exchange = "rp".into();
        assert!(super::own_queues(&cfg).contains(&"rp.unrouted".to_string()));
    }

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
