//! `rewardpool top` in a real terminal (tmux): against a live worker its screen shows the
//! numbers `inspect` shows; against a closed port it says the worker cannot be reached; `q`
//! quits.

use common::metrics::*;
use common::*;
use std::process::Command;
use std::time::Duration;

const N: usize = 300;

struct Tmux(String);

impl Tmux {
    fn start(name: &str, command: &str) -> Tmux {
        let status = Command::new("tmux")
            .args([
                "new-session",
                "-d",
                "-s",
                name,
                "-x",
                "160",
                "-y",
                "40",
                command,
            ])
            .status()
            .expect("tmux not found: `bash .ci/run` installs it (apt-get install tmux)");
        assert!(status.success(), "tmux new-session failed");
        Tmux(name.to_owned())
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.0])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn alive(&self) -> bool {
        Command::new("tmux")
            .args(["has-session", "-t", &self.0])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    async fn wait_screen(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen();
            if pred(&screen) {
                return screen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the screen never showed {what}:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

/// The row of `pool`/`item` on the screen: (left, added, drawn).
fn row(screen: &str, pool: &str, item: &str) -> Option<(u64, u64, u64)> {
    screen.lines().find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        if cols.len() == 6 && cols[0] == pool && cols[1] == item {
            Some((
                cols[3].parse().ok()?,
                cols[4].parse().ok()?,
                cols[5].parse().ok()?,
            ))
        } else {
            None
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_what_inspect_shows_and_quits_on_q() {
    let conn = require_broker().await;
    let setup = Setup::new("top", WorkerConfig::new(QueueType::Classic, stream_pools()));
    let addr = format!("127.0.0.1:{}", free_port());
    let before = setup.inspect();
    let mut worker = setup
        .start_ready(&conn, &[("REWARDPOOL__METRICS__LISTEN", addr.as_str())])
        .await;
    let results = Collector::start(&setup.names.result).await;
    let mut p = Producer::new(&conn).await;
    publish_stream(&mut p, &setup.names.request, None, 0..N).await;
    results
        .wait_for("every result", Duration::from_secs(60), |m| {
            distinct_count(m) >= N
        })
        .await;
    let inspected = setup.inspect();

    let tmux = Tmux::start(
        &format!("rpt-top-{}", std::process::id()),
        &format!("{} top --url http://{addr}/metrics", bin().display()),
    );
    let pools = inspected["pools"].as_array().unwrap().clone();
    let screen = tmux
        .wait_screen("every item as inspect has it", |screen| {
            pools.iter().enumerate().all(|(pi, pool)| {
                let pid = pool["id"].as_str().unwrap();
                pool["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .enumerate()
                    .all(|(ii, item)| {
                        let iid = item["id"].as_str().unwrap();
                        let left = item["quantity"].as_u64().unwrap();
                        let stocked = before["pools"][pi]["items"][ii]["quantity"]
                            .as_u64()
                            .unwrap();
                        row(screen, pid, iid) == Some((left, stocked, stocked - left))
                    })
            })
        })
        .await;
    assert!(screen.contains("broker connected"), "{screen}");
    assert!(screen.contains("draws/s"), "{screen}");
    Command::new("tmux")
        .args(["send-keys", "-t", &tmux.0, "q"])
        .status()
        .unwrap();
    wait_until("top to quit on q", Duration::from_secs(10), async || {
        !tmux.alive()
    })
    .await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    setup.names.delete(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_says_when_the_worker_cannot_be_reached() {
    let port = free_port();
    let tmux = Tmux::start(
        &format!("rpt-topdown-{}", std::process::id()),
        &format!(
            "{} top --url http://127.0.0.1:{port}/metrics",
            bin().display()
        ),
    );
    tmux.wait_screen("the unreachable message", |s| {
        s.contains("cannot reach the worker") && s.contains("retrying")
    })
    .await;
    // Still running (retrying), and quits on q.
    assert!(tmux.alive());
    Command::new("tmux")
        .args(["send-keys", "-t", &tmux.0, "q"])
        .status()
        .unwrap();
    wait_until("top to quit on q", Duration::from_secs(10), async || {
        !tmux.alive()
    })
    .await;
}
