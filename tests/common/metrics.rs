//! Helpers for the observability tests: a free port, scraping and reading `/metrics`.

use std::time::Duration;

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// GET `http://addr/path`: status and body (real HTTP, the worker's own listener).
pub async fn http(addr: &str, path: &str) -> Result<(u16, String), String> {
    rewardpool::observe::http_get(&format!("http://{addr}{path}"), Duration::from_secs(5))
        .await
        .map_err(|e| format!("{e:#}"))
}

/// Scrapes `/metrics` and parses it with a Prometheus text-format parser.
pub async fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let (status, body) = http(addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("parse /metrics")
}

/// The value of the sample `name` whose labels include `labels`, if exported.
pub fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            other => panic!("{name} is not a plain value: {other:?}"),
        })
}

/// Sum of every sample named `name` whose labels include `labels`.
pub fn sum(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            _ => 0.0,
        })
        .sum()
}

/// Waits until `/readyz` answers `status` (fails after `timeout`); returns its body.
pub async fn wait_readyz(addr: &str, status: u16, timeout: Duration) -> String {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: String;
    loop {
        match http(addr, "/readyz").await {
            Ok((s, body)) if s == status => return body,
            Ok((s, body)) => last = format!("{s} {body}"),
            Err(e) => last = e,
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never answered {status} within {timeout:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
