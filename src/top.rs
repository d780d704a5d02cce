//! `rewardpool top`: a live terminal view of a running worker, read only from its `/metrics`.
//!
//! Every second: scrape, parse with `prometheus-parse`, and compare with the previous scrape.
//! Rates and latency quantiles are over that last interval (counter and histogram bucket
//! deltas, linear interpolation inside a bucket as Prometheus' `histogram_quantile` does).
//! Stock ever added is `rewardpool_stock_stocked` (inspect's `stocked`, exact across
//! restarts); when a worker does not export it, remaining + drawn. `q` (or Esc, Ctrl-C) quits;
//! an unreachable endpoint is shown as such and retried every second.

use crate::observe::http_get;
use prometheus_parse::{Scrape, Value};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Time between scrapes.
pub const REFRESH: Duration = Duration::from_secs(1);
/// Longest wait for one scrape.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_millis(900);

/// One item's stock as scraped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ItemRow {
    pub remaining: Option<f64>,
    pub stocked: Option<f64>,
    pub drawn: f64,
}

/// The numbers of one scrape.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub items: BTreeMap<(String, String), ItemRow>,
    pub drawn_total: f64,
    /// Cumulative bucket counts (upper bound, count) per stage.
    pub stages: BTreeMap<String, Vec<(f64, f64)>>,
    pub fsync_sum: f64,
    pub fsync_count: f64,
    pub inflight: f64,
    pub connected: f64,
    pub ready: f64,
    pub last_request_id: f64,
    pub reconnects: f64,
}

/// Parses a `/metrics` body.
pub fn parse(body: &str) -> anyhow::Result<Sample> {
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))?;
    let mut s = Sample::default();
    for sample in &scrape.samples {
        let v = match &sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => {
                if sample.metric == "rewardpool_request_duration_seconds"
                    && let Some(stage) = sample.labels.get("stage")
                {
                    s.stages.insert(
                        stage.to_owned(),
                        buckets.iter().map(|b| (b.less_than, b.count)).collect(),
                    );
                }
                continue;
            }
            Value::Summary(_) => continue,
        };
        let item_key = || {
            (
                sample.labels.get("pool").unwrap_or("").to_owned(),
                sample.labels.get("item").unwrap_or("").to_owned(),
            )
        };
        match sample.metric.as_str() {
            "rewardpool_stock_remaining" => {
                s.items.entry(item_key()).or_default().remaining = Some(v)
            }
            "rewardpool_stock_stocked" => s.items.entry(item_key()).or_default().stocked = Some(v),
            "rewardpool_items_drawn_total" => {
                s.items.entry(item_key()).or_default().drawn = v;
                s.drawn_total += v;
            }
            "rewardpool_wal_fsync_duration_seconds_sum" => s.fsync_sum = v,
            "rewardpool_wal_fsync_duration_seconds_count" => s.fsync_count = v,
            "rewardpool_inflight_requests" => s.inflight = v,
            "rewardpool_broker_connected" => s.connected = v,
            "rewardpool_ready" => s.ready = v,
            "rewardpool_last_request_id" => s.last_request_id = v,
            "rewardpool_broker_reconnects_total" => s.reconnects = v,
            _ => {}
        }
    }
    Ok(s)
}

/// The `q` quantile of the observations between two cumulative bucket lists, in seconds;
/// `None` when nothing was observed.
pub fn quantile_delta(before: Option<&[(f64, f64)]>, after: &[(f64, f64)], q: f64) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            let old = before
                .and_then(|b| b.iter().find(|(l, _)| *l == le).map(|(_, n)| *n))
                .unwrap_or(0.0);
            (le, (n - old).max(0.0))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, n) in &buckets {
        if n >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = n - lower.1;
            let fraction = if within > 0.0 {
                (rank - lower.1) / within
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * fraction);
        }
        lower = (le, n);
    }
    Some(lower.0)
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| format!("{:.1}ms", s * 1000.0))
}

/// The screen as lines of text (the terminal shows exactly these).
pub fn render(url: &str, prev: Option<(&Sample, Instant)>, now: (&Sample, Instant)) -> Vec<String> {
    let (cur, at) = now;
    let mut lines = vec![format!("rewardpool top — {url}  (q quits)")];
    let (rate, dt) = match prev {
        Some((p, t)) => {
            let dt = at.duration_since(t).as_secs_f64().max(1e-3);
            (
                Some((cur.drawn_total - p.drawn_total).max(0.0) / dt),
                Some(p),
            )
        }
        None => (None, None),
    };
    let stage = |name: &str, q: f64| {
        cur.stages.get(name).and_then(|after| {
            quantile_delta(
                dt.and_then(|p| p.stages.get(name)).map(|v| v.as_slice()),
                after,
                q,
            )
        })
    };
    let fsync = dt.and_then(|p| {
        let n = cur.fsync_count - p.fsync_count;
        (n > 0.0).then(|| (cur.fsync_sum - p.fsync_sum) / n)
    });
    lines.push(format!(
        "broker {}  ready {}  in-flight {}  last request id {}  reconnects {}",
        if cur.connected >= 1.0 {
            "connected"
        } else {
            "DISCONNECTED"
        },
        if cur.ready >= 1.0 { "yes" } else { "no" },
        cur.inflight,
        cur.last_request_id,
        cur.reconnects
    ));
    lines.push(format!(
        "draws/s {}  accept p50 {} p99 {}  result p50 {} p99 {}  fsync {}",
        rate.map_or("-".into(), |r| format!("{r:.0}")),
        ms(stage("accepted", 0.5)),
        ms(stage("accepted", 0.99)),
        ms(stage("acked", 0.5)),
        ms(stage("acked", 0.99)),
        ms(fsync)
    ));
    lines.push(String::new());
    lines.push(format!(
        "{:<12} {:<16} {:<22} {:>10} {:>10} {:>10}",
        "pool", "item", "stock", "left", "added", "drawn"
    ));
    for ((pool, item), row) in &cur.items {
        let added = row.stocked.or(row.remaining.map(|r| r + row.drawn));
        let (bar, left, added_text) = match (row.remaining, added) {
            (Some(left), Some(added)) => {
                let width = 20usize;
                let filled = if added > 0.0 {
                    ((left / added) * width as f64).round() as usize
                } else {
                    0
                };
                let filled = filled.min(width);
                (
                    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled)),
                    format!("{left}"),
                    format!("{added}"),
                )
            }
            _ => ("unlimited".to_owned(), "-".to_owned(), "-".to_owned()),
        };
        lines.push(format!(
            "{pool:<12} {item:<16} {bar:<22} {left:>10} {added_text:>10} {:>10}",
            row.drawn
        ));
    }
    lines
}

/// Runs the view until `q`.
pub fn run(url: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut terminal = ratatui::init();
    let result = (|| -> anyhow::Result<()> {
        let mut prev: Option<(Sample, Instant)> = None;
        loop {
            let at = Instant::now();
            let lines = match runtime.block_on(http_get(url, SCRAPE_TIMEOUT)) {
                Ok((200, body)) => match parse(&body) {
                    Ok(sample) => {
                        let lines = render(url, prev.as_ref().map(|(s, t)| (s, *t)), (&sample, at));
                        prev = Some((sample, at));
                        lines
                    }
                    Err(e) => vec![format!("{url}: not a metrics page ({e}); retrying")],
                },
                Ok((status, _)) => vec![format!("{url}: HTTP {status}; retrying every second")],
                Err(e) => vec![format!(
                    "cannot reach the worker: {e:#}; retrying every second"
                )],
            };
            terminal.draw(|frame| {
                let text: Vec<ratatui::text::Line> = lines
                    .iter()
                    .map(|l| ratatui::text::Line::raw(l.as_str()))
                    .collect();
                frame.render_widget(
                    ratatui::widgets::Paragraph::new(text)
                        .wrap(ratatui::widgets::Wrap { trim: false }),
                    frame.area(),
                );
            })?;
            let deadline = at + REFRESH;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if event::poll(left)?
                    && let Event::Key(key) = event::read()?
                {
                    let ctrl_c = key.code == KeyCode::Char('c')
                        && key.modifiers.contains(KeyModifiers::CONTROL);
                    if key.code == KeyCode::Char('q') || key.code == KeyCode::Esc || ctrl_c {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_bucket_deltas() {
        let before = vec![(0.001, 10.0), (0.01, 10.0), (f64::INFINITY, 10.0)];
        let after = vec![(0.001, 10.0), (0.01, 110.0), (f64::INFINITY, 110.0)];
        // The 100 new observations all fall in (1 ms, 10 ms].
        let p50 = quantile_delta(Some(&before), &after, 0.5).unwrap();
        assert!((p50 - 0.0055).abs() < 1e-9, "{p50}");
        assert_eq!(quantile_delta(Some(&after), &after, 0.5), None);
    }

    #[test]
    fn a_metrics_page_renders_stock_bars() {
        let m = std::sync::Arc::new(crate::metrics::Metrics::new());
        m.inflight.set(3);
        let body = m.encode() + ""; // a page with no pool yet still parses
        let s = parse(&body).unwrap();
        assert_eq!(s.inflight, 3.0);
        let mut s2 = s.clone();
        s2.items.insert(
            ("default".into(), "gold".into()),
            ItemRow {
                remaining: Some(5.0),
                stocked: Some(10.0),
                drawn: 5.0,
            },
        );
        let lines = render("u", None, (&s2, Instant::now()));
        let row = lines.iter().find(|l| l.starts_with("default")).unwrap();
        assert!(row.contains("[##########..........]"), "{row}");
        assert!(row.contains("5") && row.contains("10"), "{row}");
    }
}
