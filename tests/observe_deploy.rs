//! The compose stack's files are valid and name only series the worker exports:
//! `docker-compose config`, `promtool check config` / `check rules`, and every `rewardpool_*`
//! name in the dashboard and the alert rules found in a live worker's `/metrics`
//! (`rabbitmq_*` names against the list the rabbitmq_prometheus plugin exports that we use).

use common::metrics::*;
use common::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The rabbitmq_prometheus series the dashboard and alerts rely on (per-object endpoint).
const RABBITMQ_SERIES: &[&str] = &["rabbitmq_queue_messages_ready"];

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .to_str()
        .unwrap()
        .to_owned()
}

fn tool(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} not found ({e}): `bash .ci/run` installs it (apt-get)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compose_and_prometheus_files_are_valid() {
    tool(
        "docker-compose",
        &["-f", &repo("docker-compose.yml"), "config", "-q"],
    );
    tool(
        "promtool",
        &["check", "config", &repo("deploy/prometheus/prometheus.yml")],
    );
    tool(
        "promtool",
        &["check", "rules", &repo("deploy/prometheus/alerts.yml")],
    );
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/dashboards/rewardpool.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().unwrap().len() >= 8);
}

/// Identifiers starting with `prefix` in a PromQL-bearing text.
fn names(text: &str, prefix: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_series_the_worker_exports() {
    let setup = Setup::new(
        "deploynames",
        WorkerConfig::new(QueueType::Classic, stream_pools()),
    );
    let addr = format!("127.0.0.1:{}", free_port());
    // No broker needed: every series exists once recovery is done.
    let closed = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let mut worker = setup.start_worker(&[
        ("REWARDPOOL__METRICS__LISTEN", addr.as_str()),
        ("REWARDPOOL__AMQP__URL", closed.as_str()),
    ]);
    wait_until(
        "/readyz to say connecting",
        Duration::from_secs(30),
        async || http(&addr, "/readyz").await == Ok((503, "connecting\n".to_owned())),
    )
    .await;
    let scrape = scrape(&addr).await;
    let mut exported: BTreeSet<String> = BTreeSet::new();
    for s in &scrape.samples {
        exported.insert(s.metric.clone());
        if let prometheus_parse::Value::Histogram(_) = s.value {
            exported.insert(format!("{}_bucket", s.metric));
        }
    }
    worker.stop(libc::SIGTERM, Duration::from_secs(30)).await;
    let mut used = String::new();
    used.push_str(&std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap());
    used.push_str(
        &std::fs::read_to_string(repo("deploy/grafana/dashboards/rewardpool.json")).unwrap(),
    );
    let ours = names(&used, "rewardpool_");
    assert!(ours.len() >= 8, "{ours:?}");
    for name in &ours {
        // Alert and dashboard titles name no series; only names that look like series count.
        assert!(
            exported.contains(name),
            "{name} is not exported by the worker: {exported:?}"
        );
    }
    for name in names(&used, "rabbitmq_") {
        assert!(
            RABBITMQ_SERIES.contains(&name.as_str()),
            "{name} is not a known RabbitMQ series"
        );
    }
}
