//! The benchmark server: one bare route, one idempotent route and one route
//! without idempotency on the same router as the idempotent one.
//!
//! ```text
//! bench-server [--addr 127.0.0.1:3000] [--store memory] [--layer routes] [--max-seconds 120]
//!              [--pg-connections 15] [--memory-max-bytes 268435456]
//! stores: memory, redis, tiered-redis, postgres, tiered-postgres, sqlite
//! layer: routes (`Router::layer`, on each route), router (around the whole router)
//! pg-connections: the connections the PostgreSQL store keeps for its
//! statements, in a pool of one more (the default is what
//! `PostgresStore::connect` sets up)
//! memory-max-bytes: the memory store's budget (the default's), e.g. small
//! enough that a run reaches the steady state where old records go as new
//! ones come
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

use axum::ServiceExt;
use axum::extract::Request;
use idempotent_bench::{app, fixtures};
use idempotent_core::Idempotency;
use idempotent_core::store::{
    MemoryStore, PostgresStore, RedisStore, SqliteStore, StoreError, Tiered,
};

struct Args {
    addr: SocketAddr,
    store: String,
    /// Where the idempotency layer goes: `routes` or `router`.
    layer: String,
    max_seconds: u64,
    pg_connections: u32,
    memory_max_bytes: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addr: SocketAddr::from(([127, 0, 0, 1], 3000)),
        store: "memory".to_owned(),
        layer: "routes".to_owned(),
        max_seconds: 120,
        pg_connections: 15,
        memory_max_bytes: None,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let value = words
            .next()
            .ok_or_else(|| format!("`{flag}` needs a value"))?;
        match flag.as_str() {
            "--addr" => args.addr = value.parse().map_err(|e| format!("--addr: {e}"))?,
            "--store" => args.store = value,
            "--layer" => args.layer = value,
            "--max-seconds" => {
                args.max_seconds = value.parse().map_err(|e| format!("--max-seconds: {e}"))?;
            }
            "--memory-max-bytes" => {
                let bytes = value
                    .parse()
                    .map_err(|e| format!("--memory-max-bytes: {e}"))?;
                args.memory_max_bytes = Some(bytes);
            }
            "--pg-connections" => {
                args.pg_connections = value
                    .parse()
                    .map_err(|e| format!("--pg-connections: {e}"))?;
            }
            other => return Err(format!("unknown flag `{other}`")),
        }
    }
    Ok(args)
}

/// Where durable stores keep the benchmark's records, apart from anything
/// else on the same servers: Redis database 15
/// ([`fixtures::REDIS_URL`]), PostgreSQL table `idempotent_bench` in
/// database `test` ([`fixtures::POSTGRES_URL`]), SQLite file under /tmp.
/// `bench/run.sh` empties them after each run.
const POSTGRES_TABLE: &str = "idempotent_bench";
const SQLITE_PATH: &str = "/tmp/idempotent-bench.sqlite";

async fn idempotency(args: &Args) -> Result<Idempotency, String> {
    let (store, pg_connections) = (args.store.as_str(), args.pg_connections);
    let failed = |error: StoreError| format!("store `{store}`: {error}");
    Ok(match store {
        "memory" => {
            let mut memory = MemoryStore::builder();
            if let Some(bytes) = args.memory_max_bytes {
                memory = memory.max_bytes(bytes);
            }
            Idempotency::new(memory.build())
        }
        "redis" => Idempotency::new(
            RedisStore::connect(fixtures::REDIS_URL)
                .await
                .map_err(failed)?,
        ),
        "tiered-redis" => Idempotency::new(Tiered::new(
            RedisStore::connect(fixtures::REDIS_URL)
                .await
                .map_err(failed)?,
        )),
        "postgres" => Idempotency::new(postgres(pg_connections).await.map_err(failed)?),
        "tiered-postgres" => {
            Idempotency::new(Tiered::new(postgres(pg_connections).await.map_err(failed)?))
        }
        "sqlite" => {
            let sqlite = SqliteStore::open(SQLITE_PATH).await.map_err(failed)?;
            sqlite.migrate().await.map_err(failed)?;
            Idempotency::new(sqlite)
        }
        other => {
            return Err(format!(
                "unknown store `{other}` (memory, redis, tiered-redis, postgres, tiered-postgres, sqlite)"
            ));
        }
    })
}

/// The benchmark's PostgreSQL store, keeping `connections`.
async fn postgres(connections: u32) -> Result<PostgresStore, StoreError> {
    fixtures::postgres_store(fixtures::POSTGRES_URL, POSTGRES_TABLE, connections).await
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = parse_args()?;
    let idempotency = idempotency(&args).await?;
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .map_err(|e| format!("bind {}: {e}", args.addr))?;
    eprintln!(
        "bench-server: store {}, layer on {}, on http://{}",
        args.store, args.layer, args.addr
    );
    let limit = Duration::from_secs(args.max_seconds);
    let served = match args.layer.as_str() {
        "routes" => {
            let serve = axum::serve(listener, app::router(idempotency));
            tokio::time::timeout(limit, serve.into_future()).await
        }
        "router" => {
            let app = app::wrapped_router(&idempotency);
            let app = ServiceExt::<Request>::into_make_service(app);
            tokio::time::timeout(limit, axum::serve(listener, app).into_future()).await
        }
        other => return Err(format!("unknown layer `{other}` (routes, router)")),
    };
    match served {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_elapsed) => Ok(()),
    }
}
