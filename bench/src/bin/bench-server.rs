//! The benchmark server: one bare route, one idempotent route and one route
//! without idempotency on the same router as the idempotent one.
//!
//! ```text
//! bench-server [--addr 127.0.0.1:3000] [--store memory] [--max-seconds 120]
//! ```
//!
//! Routes (all `POST`, body `{"amount":..,"currency":..,"reference":..}`):
//! - `/bare`: the handler alone, on a router without the idempotency layer;
//! - `/idem`: the same handler through the idempotency engine;
//! - `/plain`: the bare handler on the router that carries the layer.
//!
//! The server exits by itself after `--max-seconds`, so a run that lost
//! track of it leaves nothing behind.

use std::net::SocketAddr;
use std::time::Duration;

use idempotent_bench::app;
use idempotent_core::Idempotency;
use idempotent_core::store::MemoryStore;

struct Args {
    addr: SocketAddr,
    store: String,
    max_seconds: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
        store: "memory".to_owned(),
        max_seconds: 120,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let value = words
            .next()
            .ok_or_else(|| format!("`{flag}` needs a value"))?;
        match flag.as_str() {
            "--addr" => args.addr = value.parse().map_err(|e| format!("--addr: {e}"))?,
            "--store" => args.store = value,
            "--max-seconds" => {
                args.max_seconds = value.parse().map_err(|e| format!("--max-seconds: {e}"))?;
            }
            other => return Err(format!("unknown flag `{other}`")),
        }
    }
    Ok(args)
}

async fn idempotency(store: &str) -> Result<Idempotency, String> {
    match store {
        "memory" => Ok(Idempotency::new(MemoryStore::new())),
        other => Err(format!(
            "unknown store `{other}` (this build knows: memory)"
        )),
    }
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = parse_args()?;
    let app = app::router(idempotency(&args.store).await?);
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| format!("bind {}: {e}", args.addr))?;
    eprintln!("bench-server: store {} on http://{}", args.store, args.addr);
    let serve = axum::serve(listener, app);
    match tokio::time::timeout(Duration::from_secs(args.max_seconds), serve).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_elapsed) => Ok(()),
    }
}
