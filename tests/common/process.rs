//! Processes under test: the `rewardpool` binary run to completion (`cli`) or as a worker
//! (`Worker`), with a scrubbed environment, a log file, signals and bounded waits.
//!
//! A `Worker` guard SIGKILLs its process when dropped, so a failing test leaves no stray worker
//! behind, and prints the tail of the worker's log when the test panicked.

use crate::broker::queue_state;
use crate::config::Setup;
use lapin::Connection;
use serde_json::Value;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A binary of the `rewardpool` package (`rewardpool`, `rewardpool-drill`). Cargo builds them
/// beside the test binaries (`target/<profile>/`, the tests in `target/<profile>/deps/`);
/// `CARGO_BIN_EXE_<name>` in the environment wins when set.
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("path of the test binary");
    let mut dir = exe
        .parent()
        .expect("test binary has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --bin {name}` (cargo test and cargo nextest build it for the rewardpool package's tests)",
        path.display()
    );
    path
}

/// The worker binary under test.
pub fn bin() -> PathBuf {
    bin_path("rewardpool")
}

/// The engine drill (`src/bin/rewardpool-drill.rs`).
pub fn drill_bin() -> PathBuf {
    bin_path("rewardpool-drill")
}

/// Runs the binary to completion (bounded: 60 s), returning its output.
pub fn cli(args: &[&str], cwd: Option<&Path>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    scrub_env(&mut cmd, env);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let child = cmd.spawn().expect("spawn rewardpool");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.expect("wait for rewardpool"),
        Err(_) => {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("rewardpool {args:?} did not finish within 60 s");
        }
    }
}

/// The environment of every process the tests start: no inherited `REWARDPOOL__*` overrides
/// nor failpoint, plain-text logs at info level, then the test's own variables.
fn scrub_env(cmd: &mut Command, env: &[(&str, &str)]) {
    for (k, _) in std::env::vars_os() {
        if let Some(k) = k.to_str()
            && (k.starts_with("REWARDPOOL__") || k == "REWARDPOOL_FAILPOINT")
        {
            cmd.env_remove(k);
        }
    }
    cmd.env("NO_COLOR", "1").env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
}

/// A worker process. Dropping it SIGKILLs the process if it still runs.
pub struct Worker {
    child: Child,
    pub log_path: PathBuf,
    status: Option<ExitStatus>,
}

impl Worker {
    pub fn spawn(
        args: &[OsString],
        cwd: Option<&Path>,
        env: &[(&str, &str)],
        log_path: PathBuf,
    ) -> Worker {
        let log = std::fs::File::create(&log_path).expect("create worker log");
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        scrub_env(&mut cmd, env);
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        let child = cmd.spawn().expect("spawn the rewardpool worker");
        Worker {
            child,
            log_path,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn signal(&self, sig: i32) {
        if self.status.is_none() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "worker {} did not exit within {timeout:?}; log tail:\n{}",
                    self.pid(),
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) -> ExitStatus {
        self.signal(libc::SIGKILL);
        self.wait_exit(Duration::from_secs(30)).await
    }

    /// SIGTERM (or SIGINT) and wait for a clean exit (code 0) within `timeout`.
    pub async fn stop(&mut self, sig: i32, timeout: Duration) {
        self.signal(sig);
        let status = self.wait_exit(timeout).await;
        assert_eq!(
            status.code(),
            Some(0),
            "worker stopped with {status} after signal {sig}; log tail:\n{}",
            self.log_tail(40)
        );
    }

    /// Waits until the request queue exists and has a consumer (the worker recovered,
    /// declared its queues and consumes). Fails at once if the worker exits.
    pub async fn wait_ready(&mut self, conn: &Connection, queue: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                panic!(
                    "worker exited with {s} before it was ready; log:\n{}",
                    self.log_tail(40)
                );
            }
            if let Some(q) = queue_state(conn, queue).await
                && q.consumers >= 1
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "worker not consuming {queue} within {timeout:?}; log tail:\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn assert_running(&mut self) {
        if let Some(s) = self.exited() {
            panic!("worker exited with {s}; log tail:\n{}", self.log_tail(40));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.exited().is_none() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(self.pid(), libc::SIGKILL) };
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- worker log {} (tail) ----\n{}\n----",
                self.log_path.display(),
                self.log_tail(60)
            );
        }
    }
}

impl Setup {
    fn next_log(&self) -> PathBuf {
        let k = self.logs.fetch_add(1, Ordering::SeqCst);
        self.dir.path().join(format!("worker-{k}.log"))
    }

    /// Starts `rewardpool run --config <file>` with extra environment variables.
    pub fn start_worker(&self, env: &[(&str, &str)]) -> Worker {
        let args: Vec<OsString> = vec![
            "run".into(),
            "--config".into(),
            self.config_path.clone().into(),
        ];
        Worker::spawn(&args, None, env, self.next_log())
    }

    /// Starts the worker and waits until it consumes (fails if it exits first).
    pub async fn start_ready(&self, conn: &Connection, env: &[(&str, &str)]) -> Worker {
        let mut worker = self.start_worker(env);
        worker
            .wait_ready(conn, &self.names.request, Duration::from_secs(60))
            .await;
        worker
    }

    /// `rewardpool inspect --config <file>` as JSON.
    pub fn inspect(&self) -> Value {
        let out = cli(
            &["inspect", "--config", self.config_path.to_str().unwrap()],
            None,
            &[],
        );
        assert!(
            out.status.success(),
            "inspect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "inspect printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

/// Severity of a log event, ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// One event the worker logged, parsed from its stderr: level and target as the subscriber
/// wrote them, and the rest of the line (message and fields).
#[derive(Clone, Debug)]
pub struct LogEvent {
    pub level: Level,
    pub target: String,
    pub text: String,
}

impl LogEvent {
    /// Parses one line of the text format (`<timestamp> <LEVEL> <target>: <message> k=v...`)
    /// or of the JSON format (`{"level": ..., "target": ..., "fields": {"message": ...}}`).
    /// Lines that are not events (the binary's final `error: ...`) give `None`.
    pub fn parse(line: &str) -> Option<LogEvent> {
        let level_of = |s: &str| match s.to_ascii_uppercase().as_str() {
            "TRACE" => Some(Level::Trace),
            "DEBUG" => Some(Level::Debug),
            "INFO" => Some(Level::Info),
            "WARN" => Some(Level::Warn),
            "ERROR" => Some(Level::Error),
            _ => None,
        };
        if line.starts_with('{') {
            let v: Value = serde_json::from_str(line).ok()?;
            return Some(LogEvent {
                level: level_of(v["level"].as_str()?)?,
                target: v["target"].as_str()?.to_string(),
                text: v["fields"].to_string(),
            });
        }
        let mut words = line.split_whitespace();
        let timestamp = words.next()?;
        if !timestamp.ends_with('Z') || !timestamp.contains('T') {
            return None;
        }
        let level = level_of(words.next()?)?;
        let target = words.next()?.strip_suffix(':')?.to_string();
        let text = words.collect::<Vec<_>>().join(" ");
        Some(LogEvent {
            level,
            target,
            text,
        })
    }
}

impl Worker {
    /// Every log event of this worker so far. Fails the test when the log has lines but none
    /// parses as an event: a changed log format must break the tests that read events, not
    /// make their "no such event" checks pass.
    pub fn events(&self) -> Vec<LogEvent> {
        let log = self.log();
        let events: Vec<LogEvent> = log.lines().filter_map(LogEvent::parse).collect();
        assert!(
            log.trim().is_empty() || !events.is_empty(),
            "no line of the worker log parses as a log event (format changed?):\n{}",
            self.log_tail(20)
        );
        events
    }

    /// Asserts the worker logged events (at least one at info, so the log was read and parsed)
    /// and none at `level` or above; names the offending events.
    pub fn assert_no_events_at_or_above(&self, level: Level) {
        let events = self.events();
        assert!(
            events.iter().any(|e| e.level == Level::Info),
            "the worker logged no info event; log tail:\n{}",
            self.log_tail(20)
        );
        let bad: Vec<&LogEvent> = events.iter().filter(|e| e.level >= level).collect();
        assert!(
            bad.is_empty(),
            "the worker logged {} event(s) at {level:?} or above: {bad:#?}",
            bad.len()
        );
    }
}
