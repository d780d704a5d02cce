//! Admin commands in the tests: `rewardpool admin` as an operator runs it, a raw client that
//! publishes command bodies with chosen properties (as a script or another tool would), and
//! throw-away broker users for the `admin.allowed_users` tests.

use crate::broker::{Producer, amqp_url, nanos, rabbitmqctl, try_connect_url};
use crate::collect::{Collector, Msg};
use crate::config::Setup;
use crate::process::cli;
use lapin::types::ShortString;
use lapin::{BasicProperties, Connection};
use serde_json::Value;
use std::time::Duration;

/// One `rewardpool admin ...` run: exit code, stdout as JSON (when it is), stderr.
#[derive(Debug)]
pub struct AdminRun {
    pub code: Option<i32>,
    pub json: Option<Value>,
    pub stdout: String,
    pub stderr: String,
}

impl AdminRun {
    /// The reply of an applied command (exit 0), or the test fails showing the run.
    pub fn applied(&self) -> &Value {
        assert_eq!(
            self.code,
            Some(0),
            "rewardpool admin was not applied: {self:#?}"
        );
        let v = self.json.as_ref().expect("reply JSON on stdout");
        assert_eq!(v["status"], "applied", "{v}");
        v
    }

    /// The reply of a rejected command (exit 1): its `error`.
    pub fn rejected(&self) -> String {
        assert_eq!(
            self.code,
            Some(1),
            "rewardpool admin was not rejected: {self:#?}"
        );
        let v = self.json.as_ref().expect("reply JSON on stdout");
        assert_eq!(v["status"], "rejected", "{v}");
        v["error"].as_str().expect("error string").to_string()
    }
}

impl Setup {
    /// `rewardpool admin <args> --config <file>` with extra environment variables.
    pub fn admin_cli(&self, args: &[&str], env: &[(&str, &str)]) -> AdminRun {
        let mut all: Vec<&str> = vec!["admin"];
        all.extend_from_slice(args);
        all.push("--config");
        all.push(self.config_path.to_str().expect("utf-8 path"));
        let out = cli(&all, None, env);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        AdminRun {
            code: out.status.code(),
            json: serde_json::from_str(stdout.trim()).ok(),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A raw admin client: publishes bodies to the admin queue (persistent, confirms) with chosen
/// properties, and reads the replies from its own exclusive reply queue.
pub struct AdminClient {
    pub replies: Collector,
    producer: Producer,
    queue: String,
    _conn: Connection,
}

/// The properties of one raw admin command.
#[derive(Clone, Debug, Default)]
pub struct AdminProps<'a> {
    pub message_id: Option<&'a str>,
    /// `user_id`; RabbitMQ refuses one that is not the connection's user.
    pub user_id: Option<&'a str>,
    /// `type` (the worker refuses its own message types).
    pub kind: Option<&'a str>,
    /// `reply_to` instead of the client's reply queue (`Some("")`: none).
    pub reply_to: Option<&'a str>,
}

impl AdminClient {
    /// A client connected as the test's broker user (guest).
    pub async fn new(setup: &Setup, tag: &str) -> AdminClient {
        AdminClient::with_url(setup, tag, &amqp_url()).await
    }

    /// A client that publishes as the user of `url`.
    pub async fn with_url(setup: &Setup, tag: &str, url: &str) -> AdminClient {
        let conn = try_connect_url(url, "rewardpool test admin client")
            .await
            .unwrap_or_else(|e| panic!("connect as the admin client: {e}"));
        let producer = Producer::new(&conn).await;
        AdminClient {
            replies: Collector::reply_queue(&setup.names.extra(tag)).await,
            producer,
            queue: setup.names.admin.clone(),
            _conn: conn,
        }
    }

    /// Publishes `body` (confirmed); returns its correlation_id.
    pub async fn publish(&mut self, body: &str, p: AdminProps<'_>) -> String {
        let correlation = self.publish_nowait(body, p).await;
        self.producer.flush().await;
        correlation
    }

    /// Waits for the confirms of everything published so far.
    pub async fn flush(&mut self) {
        self.producer.flush().await;
    }

    /// Publishes `body` without waiting for its confirm (many in flight, see `flush`);
    /// returns its correlation_id.
    pub async fn publish_nowait(&mut self, body: &str, p: AdminProps<'_>) -> String {
        let correlation = format!("ac-{}", nanos());
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_correlation_id(ShortString::from(correlation.as_str()));
        match p.reply_to {
            None => props = props.with_reply_to(self.replies.queue.as_str().into()),
            Some("") => {}
            Some(r) => props = props.with_reply_to(r.into()),
        }
        if let Some(m) = p.message_id {
            props = props.with_message_id(m.into());
        }
        if let Some(u) = p.user_id {
            props = props.with_user_id(u.into());
        }
        if let Some(k) = p.kind {
            props = props.with_type(k.into());
        }
        let queue = self.queue.clone();
        self.producer.publish(&queue, body.as_bytes(), props).await;
        correlation
    }

    /// The reply with `correlation` (waits up to 60 s).
    pub async fn reply(&self, correlation: &str) -> Msg {
        self.replies
            .wait_for(
                &format!("the admin reply {correlation}"),
                Duration::from_secs(60),
                |m| m.iter().any(|m| m.correlation_id() == Some(correlation)),
            )
            .await;
        self.replies
            .messages()
            .into_iter()
            .find(|m| m.correlation_id() == Some(correlation))
            .expect("just seen")
    }

    /// Publishes and waits for the reply.
    pub async fn send(&mut self, body: &str, p: AdminProps<'_>) -> Msg {
        let c = self.publish(body, p).await;
        self.reply(&c).await
    }

    /// Sends with a message_id and expects `admin_result`: the reply body.
    pub async fn applied(&mut self, body: &str, message_id: &str) -> Value {
        let m = self
            .send(
                body,
                AdminProps {
                    message_id: Some(message_id),
                    ..Default::default()
                },
            )
            .await;
        assert_eq!(m.kind(), Some("admin_result"), "{body}: {}", m.json());
        let v = m.json();
        assert_eq!(v["status"], "applied", "{body}: {v}");
        v
    }

    /// Sends and expects `rejected`: the reason.
    pub async fn rejected(&mut self, body: &str, p: AdminProps<'_>) -> String {
        let m = self.send(body, p).await;
        assert_eq!(m.kind(), Some("rejected"), "{body}: {}", m.json());
        let v = m.json();
        assert_eq!(v["status"], "rejected", "{body}: {v}");
        v["error"].as_str().expect("error").to_string()
    }
}

/// A broker user made for one test (all permissions on the default vhost), deleted on drop.
pub struct BrokerUser {
    pub name: String,
    pub password: String,
}

impl BrokerUser {
    pub fn create(tag: &str) -> BrokerUser {
        let name = format!(
            "rpt_{tag}_{}_{}",
            std::process::id(),
            nanos() % 1_000_000_000
        );
        let password = format!("pw{}", nanos());
        rabbitmqctl(&["-q", "add_user", &name, &password]);
        rabbitmqctl(&["-q", "set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        BrokerUser { name, password }
    }

    /// The test broker URL with this user's credentials.
    pub fn url(&self) -> String {
        let url = amqp_url();
        let rest = url
            .split_once('@')
            .map(|(_, rest)| rest)
            .expect("the test broker URL has credentials");
        format!("amqp://{}:{}@{rest}", self.name, self.password)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        // Best effort, bounded, and never a panic (this may run while a test unwinds).
        let Ok(mut child) = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.name])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        else {
            return;
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
