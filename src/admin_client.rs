//! `rewardpool admin`: sends one admin command to the running worker through the broker and
//! prints its reply.
//!
//! Why it works this way:
//!
//! * The worker alone owns the state, so a command travels the way a draw does: published to
//!   `amqp.admin_queue` (persistent, publisher confirms, `mandatory` so a queue that does not
//!   exist is an error here instead of a silent drop), answered on a private reply queue
//!   (server-named, exclusive, auto-delete: it dies with this process's connection).
//! * `user_id` is the user of `amqp.url`: RabbitMQ refuses a `user_id` that is not the
//!   connection's own user, so the worker can check `admin.allowed_users` against a name the
//!   broker authenticated. (With `auth_mechanism=external` the user is the certificate's, which
//!   the URL does not name: then no `user_id` is set and the worker applies the allow list to
//!   a command without one, i.e. rejects it when the list is set.)
//! * A fresh `message_id` unless `--message-id` is given: the same id sent again is not applied
//!   twice (the worker answers with the first reply), so a retry after exit 2 is safe with it.
//! * The command carries a per-message TTL of `--timeout`: one that no worker picked up in
//!   that time expires in the queue (dead-lettered, never applied) instead of being applied
//!   long after this command reported "no reply".
//! * Everything is bounded: the connect and each broker call by `amqp.connect_timeout_ms` and
//!   `amqp.operation_timeout_ms` (the worker's TLS settings and timeouts, through
//!   `amqp::connect`), the wait for the reply by `--timeout`, the body by the request limit,
//!   the reply read by [`ADMIN_CLIENT_REPLY_BYTES_MAX`].
//!
//! Exit codes: 0 applied, 1 rejected (the reply's `error` says why), 2 no reply within
//! `--timeout` (the command may or may not have been applied: retry with the same
//! `--message-id`), 3 not sent (bad arguments, configuration, broker unreachable or refusing
//! the publish: certainly not applied).

use crate::amqp::{self, AmqpError, timed};
use crate::config::Config;
use crate::limits::{ADMIN_CLIENT_REPLY_BYTES_MAX, ADMIN_TIMEOUT_SECS_MAX, BODY_BYTES_MAX};
use clap::{Args, Subcommand};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Exit code: the command was applied (or had been: a repeat gets the first reply).
pub const EXIT_APPLIED: u8 = 0;
/// Exit code: the worker rejected the command; nothing changed.
pub const EXIT_REJECTED: u8 = 1;
/// Exit code: no reply within `--timeout`.
pub const EXIT_NO_REPLY: u8 = 2;
/// Exit code: the command was not sent.
pub const EXIT_NOT_SENT: u8 = 3;

const AFTER_HELP: &str = "\
Examples:
  rewardpool admin restock      --pool default --item gold --add 10
  rewardpool admin set-quantity --pool default --item gold --quantity 0
  rewardpool admin set-weight   --pool spin --item car --weight 5
  rewardpool admin add-item     --pool default --item platinum --quantity 2
  rewardpool admin add-item     --pool spin --item sticker --weight 50      (unlimited)
  rewardpool admin add-pool     --pool xmas --mode by_weight \\
      --items-json '[{\"id\":\"sled\",\"quantity\":3,\"weight\":1},{\"id\":\"coal\",\"weight\":99}]'
  rewardpool admin close-pool   --pool xmas
  rewardpool admin open-pool    --pool xmas

Every op takes --config FILE, --message-id ID (retry safely: the same id is applied at most
once) and --timeout SECS (default 10). Prints the worker's reply as JSON.
Exit: 0 applied, 1 rejected, 2 no reply in time (retry with the same --message-id),
3 not sent (configuration, broker, arguments).";

/// `rewardpool admin OP ...`.
#[derive(Args, Debug)]
#[command(after_help = AFTER_HELP)]
pub struct AdminArgs {
    #[command(subcommand)]
    pub op: Op,
}

/// What every op takes besides its fields.
#[derive(Args, Debug, Clone)]
pub struct SendOptions {
    /// TOML configuration file (amqp.url, amqp.admin_queue, TLS); without it the defaults.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Idempotency key (at most 255 bytes); default: a fresh one. Give the same one to retry.
    #[arg(long, value_name = "ID")]
    pub message_id: Option<String>,
    /// Seconds to wait for the reply (1..=3600); the command expires unread after that.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=ADMIN_TIMEOUT_SECS_MAX))]
    pub timeout: u64,
}

#[derive(Subcommand, Debug)]
pub enum Op {
    /// A limited item gets more units (e.g. --pool default --item gold --add 10).
    Restock {
        #[arg(long)]
        pool: String,
        #[arg(long)]
        item: String,
        /// Units to add (1..=2^40).
        #[arg(long)]
        add: u64,
        #[command(flatten)]
        send: SendOptions,
    },
    /// A limited item has exactly this many left (e.g. --pool default --item gold --quantity 0).
    SetQuantity {
        #[arg(long)]
        pool: String,
        #[arg(long)]
        item: String,
        /// Units left (0..=2^40).
        #[arg(long)]
        quantity: u64,
        #[command(flatten)]
        send: SendOptions,
    },
    /// A by_weight item's weight (e.g. --pool spin --item car --weight 5).
    SetWeight {
        #[arg(long)]
        pool: String,
        #[arg(long)]
        item: String,
        /// The weight (1..=2^32).
        #[arg(long)]
        weight: u64,
        #[command(flatten)]
        send: SendOptions,
    },
    /// A new item, last in the pool (e.g. --pool default --item platinum --quantity 2).
    AddItem {
        #[arg(long)]
        pool: String,
        #[arg(long)]
        item: String,
        /// Units (leave out in a by_weight pool for an unlimited item).
        #[arg(long)]
        quantity: Option<u64>,
        /// Weight (by_weight pools only).
        #[arg(long)]
        weight: Option<u64>,
        #[command(flatten)]
        send: SendOptions,
    },
    /// A new pool (e.g. --pool xmas --mode by_quantity --items-json '[{"id":"a","quantity":5}]').
    AddPool {
        #[arg(long)]
        pool: String,
        /// by_quantity or by_weight.
        #[arg(long)]
        mode: String,
        /// The items as in the config: a JSON array of {"id", "quantity", "weight"}.
        #[arg(long, value_name = "JSON")]
        items_json: String,
        #[command(flatten)]
        send: SendOptions,
    },
    /// Close a pool: its draws get `closed` results (e.g. --pool xmas).
    ClosePool {
        #[arg(long)]
        pool: String,
        #[command(flatten)]
        send: SendOptions,
    },
    /// Open a closed pool again (e.g. --pool xmas).
    OpenPool {
        #[arg(long)]
        pool: String,
        #[command(flatten)]
        send: SendOptions,
    },
}

impl Op {
    pub fn send_options(&self) -> &SendOptions {
        match self {
            Op::Restock { send, .. }
            | Op::SetQuantity { send, .. }
            | Op::SetWeight { send, .. }
            | Op::AddItem { send, .. }
            | Op::AddPool { send, .. }
            | Op::ClosePool { send, .. }
            | Op::OpenPool { send, .. } => send,
        }
    }

    /// The command body the contract defines (`op` in snake case, the fields as given). The
    /// worker checks every rule; here only what cannot be sent at all is refused (items that
    /// are not a JSON array).
    pub fn body(&self) -> Result<Value, String> {
        Ok(match self {
            Op::Restock {
                pool, item, add, ..
            } => json!({"op": "restock", "pool": pool, "item": item, "add": add}),
            Op::SetQuantity {
                pool,
                item,
                quantity,
                ..
            } => json!({"op": "set_quantity", "pool": pool, "item": item, "quantity": quantity}),
            Op::SetWeight {
                pool, item, weight, ..
            } => json!({"op": "set_weight", "pool": pool, "item": item, "weight": weight}),
            Op::AddItem {
                pool,
                item,
                quantity,
                weight,
                ..
            } => {
                let mut body = json!({"op": "add_item", "pool": pool, "item": item});
                if let Some(q) = quantity {
                    body["quantity"] = json!(q);
                }
                if let Some(w) = weight {
                    body["weight"] = json!(w);
                }
                body
            }
            Op::AddPool {
                pool,
                mode,
                items_json,
                ..
            } => {
                let items: Value = serde_json::from_str(items_json)
                    .map_err(|e| format!("--items-json is not JSON: {e}"))?;
                if !items.is_array() {
                    return Err(
                        "--items-json must be a JSON array of items, e.g. '[{\"id\":\"gold\",\"quantity\":5}]'"
                            .into(),
                    );
                }
                json!({"op": "add_pool", "pool": pool, "mode": mode, "items": items})
            }
            Op::ClosePool { pool, .. } => json!({"op": "close_pool", "pool": pool}),
            Op::OpenPool { pool, .. } => json!({"op": "open_pool", "pool": pool}),
        })
    }
}

/// The broker user `amqp.url` logs in as (percent-decoded; `guest` when the URL names none),
/// or `None` with `auth_mechanism=external` (the certificate names the user).
pub fn url_user(url: &str) -> Result<Option<String>, String> {
    let uri: lapin::uri::AMQPUri = url
        .parse()
        .map_err(|e| format!("amqp.url is not an AMQP URL: {e}"))?;
    if uri.query.auth_mechanism == Some(lapin::uri::SASLMechanism::External) {
        return Ok(None);
    }
    Ok(Some(uri.authority.userinfo.username))
}

/// A fresh idempotency key: 128 random bits from the OS.
fn fresh_id(prefix: &str) -> String {
    use rand::TryRng;
    let mut bytes = [0u8; 16];
    rand::rngs::SysRng
        .try_fill_bytes(&mut bytes)
        .expect("the operating system's random generator failed");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

/// What came back.
#[derive(Debug)]
pub enum Outcome {
    /// `admin_result`: the reply body.
    Applied(Vec<u8>),
    /// `rejected`: the reply body.
    Rejected(Vec<u8>),
    /// Nothing within the timeout; the text says what was seen (no consumer on the queue...).
    NoReply(String),
}

/// Runs `rewardpool admin`: prints the reply (stdout) or what went wrong (stderr) and returns
/// the contract's exit code. Never fails otherwise: every error is exit 3 with its message.
pub fn main(args: AdminArgs) -> ExitCode {
    match run(&args.op) {
        Ok(Outcome::Applied(body)) => {
            println!("{}", String::from_utf8_lossy(&body));
            ExitCode::from(EXIT_APPLIED)
        }
        Ok(Outcome::Rejected(body)) => {
            println!("{}", String::from_utf8_lossy(&body));
            ExitCode::from(EXIT_REJECTED)
        }
        Ok(Outcome::NoReply(why)) => {
            eprintln!("error: {why}");
            ExitCode::from(EXIT_NO_REPLY)
        }
        Err(e) => {
            eprintln!("error: the command was not sent: {e:#}");
            ExitCode::from(EXIT_NOT_SENT)
        }
    }
}

fn run(op: &Op) -> anyhow::Result<Outcome> {
    let send = op.send_options();
    let config = Config::load(send.config.as_deref())?;
    let body = op.body().map_err(anyhow::Error::msg)?;
    let body = serde_json::to_vec(&body)?;
    if body.len() > BODY_BYTES_MAX {
        anyhow::bail!(
            "the command is {} bytes, the worker reads at most {BODY_BYTES_MAX}",
            body.len()
        );
    }
    let message_id = match &send.message_id {
        Some(m) => {
            crate::message::check_message_id(Some(m)).map_err(anyhow::Error::msg)?;
            m.clone()
        }
        None => fresh_id("admin"),
    };
    let user = url_user(&config.amqp.url).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let request = Request {
        body,
        message_id,
        correlation_id: fresh_id("c"),
        user,
        timeout: Duration::from_secs(send.timeout),
    };
    Ok(runtime.block_on(send_command(&config, &request))?)
}

/// One command as it is published.
#[derive(Debug, Clone)]
pub struct Request {
    pub body: Vec<u8>,
    pub message_id: String,
    pub correlation_id: String,
    /// `user_id` property (`None`: not set).
    pub user: Option<String>,
    /// How long to wait for the reply; also the command's TTL in the queue.
    pub timeout: Duration,
}

/// Publishes `request` to `amqp.admin_queue` and waits for its reply (bounded). Errors are
/// failures to send; a missing reply is `Outcome::NoReply`.
pub async fn send_command(config: &Config, request: &Request) -> Result<Outcome, AmqpError> {
    let cfg = &config.amqp;
    let op_ms = cfg.operation_timeout_ms;
    let link = amqp::connect(cfg, &format!("rewardpool admin {}", std::process::id())).await?;
    let result = exchange(&link, config, request).await;
    let _ = timed(
        "connection.close",
        op_ms.min(2000),
        link.connection.close(200, "rewardpool admin done".into()),
    )
    .await;
    result
}

/// `queue.declare` of `queue` on `channel` with `options` and no arguments, within `op_ms`.
async fn declare(
    what: &'static str,
    op_ms: u64,
    channel: &lapin::Channel,
    queue: &str,
    options: QueueDeclareOptions,
) -> Result<lapin::Queue, AmqpError> {
    let declare = channel.queue_declare(queue.into(), options, FieldTable::default());
    timed(what, op_ms, declare).await
}

async fn exchange(
    link: &amqp::Link,
    config: &Config,
    request: &Request,
) -> Result<Outcome, AmqpError> {
    let cfg = &config.amqp;
    let op_ms = cfg.operation_timeout_ms;
    let queue = cfg.admin_queue.as_str();
    // The admin queue must exist (the worker declares it at start): a passive declare on the
    // lock channel, which a refusal closes without harm. NOT_FOUND stops here; any other
    // refusal (a user without rights to declare it) only loses the consumer-count hint.
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let what = "queue.declare (passive, admin queue)";
    let consumers = match declare(what, op_ms, &link.lock, queue, passive).await {
        Ok(q) => Some(q.consumer_count()),
        Err(AmqpError::Broker { error, .. }) if error.to_string().contains("NOT_FOUND") => {
            return Err(AmqpError::Session(format!(
                "the admin queue {queue:?} does not exist on the broker: no worker with this configuration (amqp.admin_queue) has run yet"
            )));
        }
        Err(AmqpError::Broker { .. }) => None,
        Err(e) => return Err(e),
    };
    // The private reply queue, consumed before publishing so the reply cannot be missed.
    let private = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let what = "queue.declare (reply)";
    let reply_queue = declare(what, op_ms, &link.consume, "", private).await?;
    let reply_name: ShortString = reply_queue.name().clone();
    let mut replies = timed(
        "basic.consume (reply)",
        op_ms,
        link.consume.basic_consume(
            reply_name.clone(),
            "rewardpool-admin".into(),
            BasicConsumeOptions {
                no_ack: true,
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(request.message_id.as_str().into())
        .with_correlation_id(request.correlation_id.as_str().into())
        .with_reply_to(reply_name)
        .with_expiration(request.timeout.as_millis().to_string().into());
    if let Some(user) = &request.user {
        props = props.with_user_id(user.as_str().into());
    }
    let confirm = timed(
        "basic.publish (admin command)",
        op_ms,
        link.publish.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &request.body,
            props,
        ),
    )
    .await?;
    match timed("publisher confirm (admin command)", op_ms, confirm).await {
        Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => {}
        Ok(Confirmation::Ack(Some(_))) => {
            return Err(AmqpError::Session(format!(
                "the broker returned the command unrouted: no queue {queue:?}"
            )));
        }
        Ok(Confirmation::Nack(_)) => {
            return Err(AmqpError::Session(format!(
                "the broker refused the command (nack) on {queue:?}"
            )));
        }
        Err(AmqpError::Broker { error, .. }) if error.to_string().contains("user_id") => {
            return Err(AmqpError::Session(format!(
                "the broker refused the user_id {:?}: it must be the user of amqp.url ({error})",
                request.user.as_deref().unwrap_or("")
            )));
        }
        Err(e) => return Err(e),
    }
    let no_consumer = if consumers == Some(0) {
        format!(
            " (no worker consumed {queue:?} when it was sent: is the worker running with this configuration?)"
        )
    } else {
        String::new()
    };
    let waited = tokio::time::timeout(request.timeout, async {
        while let Some(delivery) = replies.next().await {
            let Ok(delivery) = delivery else { break };
            let correlation = delivery.properties.correlation_id().as_ref();
            if correlation.map(|c| c.as_str()) != Some(request.correlation_id.as_str()) {
                continue;
            }
            if delivery.data.len() > ADMIN_CLIENT_REPLY_BYTES_MAX {
                return Some(Err(format!(
                    "the reply is {} bytes, more than this command reads ({ADMIN_CLIENT_REPLY_BYTES_MAX}); see `rewardpool inspect`",
                    delivery.data.len()
                )));
            }
            let kind = delivery.properties.kind().as_ref().map(|k| k.to_string());
            return Some(Ok((kind, delivery.data)));
        }
        None
    })
    .await;
    let retry = format!(
        "retry with --message-id {:?}: a command already applied is not applied again",
        request.message_id
    );
    match waited {
        Err(_) => Ok(Outcome::NoReply(format!(
            "no reply within {} s{no_consumer}. The command (message_id {:?}) expires unread in the queue after that, but may have been taken just before; {retry}",
            request.timeout.as_secs(),
            request.message_id
        ))),
        Ok(None) => Ok(Outcome::NoReply(format!(
            "the reply queue was closed by the broker before a reply came; {retry}"
        ))),
        Ok(Some(Err(e))) => Err(AmqpError::Session(e)),
        Ok(Some(Ok((kind, data)))) => match kind.as_deref() {
            Some("admin_result") => Ok(Outcome::Applied(data)),
            Some("rejected") => Ok(Outcome::Rejected(data)),
            other => Err(AmqpError::Session(format!(
                "unexpected reply type {other:?}: {}",
                String::from_utf8_lossy(&data)
            ))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        op: Op,
    }

    fn body_of(args: &[&str]) -> Result<Value, String> {
        let mut argv = vec!["admin"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .op
            .body()
    }

    #[test]
    fn every_op_builds_the_contracts_body() {
        let cases: [(&[&str], Value); 8] = [
            (
                &[
                    "restock", "--pool", "default", "--item", "gold", "--add", "10",
                ],
                json!({"op":"restock","pool":"default","item":"gold","add":10}),
            ),
            (
                &[
                    "set-quantity",
                    "--pool",
                    "p",
                    "--item",
                    "i",
                    "--quantity",
                    "0",
                ],
                json!({"op":"set_quantity","pool":"p","item":"i","quantity":0}),
            ),
            (
                &["set-weight", "--pool", "p", "--item", "i", "--weight", "7"],
                json!({"op":"set_weight","pool":"p","item":"i","weight":7}),
            ),
            (
                &["add-item", "--pool", "p", "--item", "i", "--quantity", "2"],
                json!({"op":"add_item","pool":"p","item":"i","quantity":2}),
            ),
            (
                &["add-item", "--pool", "p", "--item", "i", "--weight", "3"],
                json!({"op":"add_item","pool":"p","item":"i","weight":3}),
            ),
            (
                &[
                    "add-pool",
                    "--pool",
                    "xmas",
                    "--mode",
                    "by_weight",
                    "--items-json",
                    r#"[{"id":"a","weight":1}]"#,
                ],
                json!({"op":"add_pool","pool":"xmas","mode":"by_weight","items":[{"id":"a","weight":1}]}),
            ),
            (
                &["close-pool", "--pool", "xmas"],
                json!({"op":"close_pool","pool":"xmas"}),
            ),
            (
                &["open-pool", "--pool", "xmas", "--timeout", "3"],
                json!({"op":"open_pool","pool":"xmas"}),
            ),
        ];
        for (args, want) in cases {
            assert_eq!(body_of(args), Ok(want), "{args:?}");
        }
    }

    #[test]
    fn what_cannot_be_sent_is_refused_before_sending() {
        let err = body_of(&[
            "add-pool",
            "--pool",
            "x",
            "--mode",
            "by_quantity",
            "--items-json",
            "{}",
        ])
        .unwrap_err();
        assert!(err.contains("JSON array"), "{err}");
        let err = body_of(&[
            "add-pool",
            "--pool",
            "x",
            "--mode",
            "by_quantity",
            "--items-json",
            "[",
        ])
        .unwrap_err();
        assert!(err.contains("not JSON"), "{err}");
        // A negative number or a timeout out of range is a usage error.
        assert!(body_of(&["restock", "--pool", "p", "--item", "i", "--add", "-1"]).is_err());
        assert!(body_of(&["close-pool", "--pool", "p", "--timeout", "0"]).is_err());
        assert!(body_of(&["close-pool", "--pool", "p", "--timeout", "3601"]).is_err());
        assert!(body_of(&["explode", "--pool", "p"]).is_err());
    }

    #[test]
    fn the_user_id_is_the_urls_user() {
        assert_eq!(
            url_user("amqp://guest:guest@127.0.0.1:5672/%2f"),
            Ok(Some("guest".into()))
        );
        assert_eq!(
            url_user("amqps://ops%40acme:pw@broker/prod"),
            Ok(Some("ops@acme".into()))
        );
        assert_eq!(url_user("amqp://broker"), Ok(Some("guest".into())));
        assert_eq!(
            url_user("amqps://broker/vh?auth_mechanism=external"),
            Ok(None)
        );
        assert!(url_user("http://x").is_err());
    }

    #[test]
    fn fresh_ids_differ() {
        assert_ne!(fresh_id("a"), fresh_id("a"));
        assert!(fresh_id("admin").len() <= 255);
    }
}
