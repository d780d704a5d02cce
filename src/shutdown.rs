//! The single shutdown signal: SIGINT or SIGTERM flips a watch channel every task listens to.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// Spawns the signal listener; the receiver turns `true` on the first SIGINT or SIGTERM.
pub fn listen() -> std::io::Result<watch::Receiver<bool>> {
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutting down: finishing accepted requests");
        let _ = tx.send(true);
        // Keep the sender alive so receivers never see a closed channel.
        std::future::pending::<()>().await;
    });
    Ok(rx)
}
