//! The single shutdown signal: SIGINT, SIGTERM or SIGHUP flips a watch channel every task
//! listens to; a second one of any of them exits the process at once.
//!
//! The second signal is the operator's "stop now": `std::process::exit` with
//! `SECOND_SIGNAL_EXIT_CODE`, nothing more acked. That is as safe as a crash: every ack sent so
//! far followed a durable WAL record and confirmed results, the broker returns every delivery
//! not acked, and recovery handles a half-written batch (torn tail).

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

/// Exit code after a second signal.
pub const SECOND_SIGNAL_EXIT_CODE: i32 = 2;

struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// Spawns the signal listener; the receiver turns `true` on the first SIGINT, SIGTERM or
/// SIGHUP. A second signal exits the process at once with `SECOND_SIGNAL_EXIT_CODE`.
pub fn listen() -> std::io::Result<watch::Receiver<bool>> {
    let (tx, rx) = watch::channel(false);
    let mut signals = Signals {
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
        hup: signal(SignalKind::hangup())?,
    };
    tokio::spawn(async move {
        let first = signals.next().await;
        tracing::info!(
            signal = first,
            "shutting down: finishing accepted requests (a second signal exits at once)"
        );
        let _ = tx.send(true);
        let second = signals.next().await;
        tracing::error!(
            signal = second,
            exit_code = SECOND_SIGNAL_EXIT_CODE,
            "second signal: exiting at once; deliveries not acked yet go back to the queue"
        );
        std::process::exit(SECOND_SIGNAL_EXIT_CODE);
    });
    Ok(rx)
}
