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
