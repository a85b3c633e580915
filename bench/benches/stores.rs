//! Micro-benchmarks of the durable stores against real servers on
//! loopback: each store's claim + complete of a new key (a first
//! execution), its claim of a completed key (a replay), its read of one
//! (what an exact repeat asks), 32 first executions at a time, and 32
//! claims of one new key at once (concurrent duplicates: exactly one may
//! acquire it, which every iteration checks). The memory store's own
//! numbers are in `engine.rs`.
//!
//! ```text
//! cargo bench -p idempotent-bench --bench stores
//! ```
//!
//! Servers: Redis at `IDEMPOTENT_BENCH_REDIS_URL` (default
//! `redis://127.0.0.1:6379/15`), PostgreSQL at
//! `IDEMPOTENT_BENCH_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`, table
//! `idempotent_bench_criterion`), SQLite in a file under the system's
//! temporary directory. A store whose server cannot be reached is skipped
//! with a message. Records live for a minute: every run claims keys of its
//! own, and the SQL stores purge what earlier runs left before starting.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, criterion_group, criterion_main};
use idempotent_bench::fixtures::{
    POSTGRES_URL, REDIS_URL, fingerprint, postgres_store, record_key, stored_response,
};
use idempotent_core::Fingerprint;
use idempotent_core::record::{Claim, Record, RecordKey};
use idempotent_core::store::{PostgresStore, RedisStore, SqliteStore, Store, StoreError, Tiered};
use tokio::runtime::Runtime;

const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(60);
/// Clients at once in the concurrent benchmarks: as many as `bench/run.sh`
/// keeps connections.
const CONCURRENCY: usize = 32;
const POSTGRES_TABLE: &str = "idempotent_bench_criterion";

fn redis_url() -> String {
    std::env::var("IDEMPOTENT_BENCH_REDIS_URL").unwrap_or_else(|_| REDIS_URL.to_owned())
}

fn postgres_url() -> String {
    std::env::var("IDEMPOTENT_BENCH_POSTGRES_URL").unwrap_or_else(|_| POSTGRES_URL.to_owned())
}

/// The benchmarks' runtime: a worker per core, as a server has.
fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The store, or why it is skipped.
fn connect<S>(
    runtime: &Runtime,
    name: &str,
    store: impl Future<Output = Result<S, StoreError>>,
) -> Option<Arc<S>> {
    match runtime.block_on(store) {
        Ok(store) => Some(Arc::new(store)),
        Err(error) => {
            eprintln!("skipping `{name}`: {error}");
            None
        }
    }
}

async fn redis() -> Result<RedisStore, StoreError> {
    RedisStore::connect(&redis_url()).await
}

/// A store keeping a connection for each concurrent client, in a pool of
/// one more, like `bench-server --pg-connections 32`.
async fn postgres() -> Result<PostgresStore, StoreError> {
    let connections = u32::try_from(CONCURRENCY).unwrap_or(u32::MAX);
    let store = postgres_store(&postgres_url(), POSTGRES_TABLE, connections).await?;
    store.purge_expired().await?;
    Ok(store)
}

async fn sqlite() -> Result<SqliteStore, StoreError> {
    let path = std::env::temp_dir().join("idempotent-bench-criterion.sqlite");
    let store = SqliteStore::open(path).await?;
    store.migrate().await?;
    store.purge_expired().await?;
    Ok(store)
}

/// Tells the keys of one group of benchmarks apart from those of other
/// groups and earlier runs, which may still be stored on the same server.
fn run_id() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH);
    // The nanoseconds' low 64 bits: unique per run for centuries.
    now.map_or(0, |since| since.as_nanos() as u64)
}

/// The next `count` keys of `run`.
fn new_keys(run: u64, next: &AtomicU64, count: u64) -> Vec<RecordKey> {
    let first = next.fetch_add(count, Ordering::Relaxed);
    (first..first + count).map(|n| record_key(run, n)).collect()
}

async fn first_execution(store: &impl Store, key: &RecordKey, fingerprint: Fingerprint) {
    let claim = store.claim(key, fingerprint, LEASE).await.expect("claim");
    let Claim::Acquired(token) = claim else {
        panic!("a new key is acquired, not {claim:?}");
    };
    let response = stored_response();
    store
        .complete(key, token, response, TTL)
        .await
        .expect("complete");
}

/// `CONCURRENCY` tasks claim `key` at once; the one that acquires it
/// completes it.
async fn concurrent_claims<S: Store>(store: &Arc<S>, key: &RecordKey, fingerprint: Fingerprint) {
    let claims: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (store, key) = (Arc::clone(store), key.clone());
            tokio::spawn(async move { store.claim(&key, fingerprint, LEASE).await })
        })
        .collect();
    let mut tokens = Vec::new();
    for claim in claims {
        match claim.await.expect("a claiming task").expect("claim") {
            Claim::Acquired(token) => tokens.push(token),
            Claim::InFlight { .. } => {}
            Claim::Completed(_) => panic!("a new key is not completed before its first claim ends"),
        }
    }
    let [token] = tokens[..] else {
        panic!(
            "{} of {CONCURRENCY} concurrent claims acquired one key",
            tokens.len()
        );
    };
    let response = stored_response();
    store
        .complete(key, token, response, TTL)
        .await
        .expect("complete");
}

/// Splits `keys` over `CONCURRENCY` tasks, each running first executions.
async fn first_executions_at_once<S: Store>(
    store: &Arc<S>,
    keys: Vec<RecordKey>,
    fingerprint: Fingerprint,
) {
    let per_task = keys.len().div_ceil(CONCURRENCY).max(1);
    let tasks: Vec<_> = keys
        .chunks(per_task)
        .map(|chunk| {
            let (store, chunk) = (Arc::clone(store), chunk.to_vec());
            tokio::spawn(async move {
                for key in &chunk {
                    first_execution(&*store, key, fingerprint).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a first-execution task");
    }
}

/// Times `operation` run `iters` times in a row, inside the runtime.
fn timed<F: Future<Output = ()>>(
    runtime: &Runtime,
    iters: u64,
    mut operation: impl FnMut(u64) -> F,
) -> Duration {
    runtime.block_on(async {
        let start = Instant::now();
        for i in 0..iters {
            operation(i).await;
        }
        start.elapsed()
    })
}

fn store_benchmarks<S: Store>(c: &mut Criterion, runtime: &Runtime, name: &str, store: &Arc<S>) {
    let fingerprint = fingerprint();
    let run = run_id();
    let next = AtomicU64::new(0);
    let mut group = c.benchmark_group(name);
    group.bench_function("claim+complete, new key", |b| {
        b.iter_custom(|iters| {
            let keys = new_keys(run, &next, iters);
            timed(runtime, iters, |i| {
                first_execution(&**store, &keys[i as usize], fingerprint)
            })
        });
    });
    let replayed = record_key(run, u64::MAX);
    runtime.block_on(first_execution(&**store, &replayed, fingerprint));
    group.bench_function("claim, replay of a completed key", |b| {
        b.iter_custom(|iters| {
            timed(runtime, iters, |_| async {
                let claim = store.claim(&replayed, fingerprint, LEASE).await;
                assert!(matches!(claim, Ok(Claim::Completed(_))), "{claim:?}");
            })
        });
    });
    group.bench_function("get of a completed key (an exact repeat's read)", |b| {
        b.iter_custom(|iters| {
            timed(runtime, iters, |_| async {
                let record = store.get(&replayed).await;
                assert!(
                    matches!(record, Ok(Some(Record::Completed(_)))),
                    "{record:?}"
                );
            })
        });
    });
    group.bench_function("claim+complete, new keys, 32 at a time (per key)", |b| {
        b.iter_custom(|iters| {
            let keys = new_keys(run, &next, iters);
            let start = Instant::now();
            runtime.block_on(first_executions_at_once(store, keys, fingerprint));
            start.elapsed()
        });
    });
    group.bench_function("32 claims of one new key at once (per key)", |b| {
        b.iter_custom(|iters| {
            let keys = new_keys(run, &next, iters);
            timed(runtime, iters, |i| {
                concurrent_claims(store, &keys[i as usize], fingerprint)
            })
        });
    });
    group.finish();
}

fn durable_stores(c: &mut Criterion) {
    let runtime = runtime();
    if let Some(store) = connect(&runtime, "redis", redis()) {
        store_benchmarks(c, &runtime, "redis", &store);
    }
    // Claims and completions go to Redis; replays and reads are answered
    // from the memory tier.
    if let Some(store) = connect(&runtime, "tiered over redis", async {
        Ok(Tiered::new(redis().await?))
    }) {
        store_benchmarks(c, &runtime, "tiered over redis", &store);
    }
    if let Some(store) = connect(&runtime, "postgres", postgres()) {
        store_benchmarks(c, &runtime, "postgres", &store);
    }
    if let Some(store) = connect(&runtime, "sqlite", sqlite()) {
        store_benchmarks(c, &runtime, "sqlite", &store);
    }
}

criterion_group!(benches, durable_stores);
criterion_main!(benches);
