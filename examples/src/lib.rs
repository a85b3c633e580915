//! Runnable examples live in `examples/`; this crate holds what they share.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Prints the library's events to stderr: `info` and above, or what
/// `RUST_LOG` asks for (`RUST_LOG=idempotent_core=debug` shows every
/// outcome). Without a subscriber a 503 `store-unavailable` would reach
/// the client while its cause (a refused connection, a missing table) is
/// logged nowhere. Colours only on a terminal, so a log file stays plain.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Resolves when the process is asked to stop: Ctrl-C (`SIGINT`), or
/// `SIGTERM`, which is how systemd, Docker and Kubernetes stop a service.
/// Waiting for Ctrl-C alone, a deploy would kill the server outright,
/// without the graceful shutdown and `Idempotency::drain` that let
/// handlers whose clients went away finish and store their outcome.
/// A signal that cannot be listened for is never taken as a request to stop.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
