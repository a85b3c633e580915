//! Micro-benchmarks: fingerprinting, the memory store's claim / complete /
//! replay, what the tiered store's cache adds to them, contention on one key, and one request through the router
//! in-process (no sockets). Run: `cargo bench -p idempotent-bench --bench engine`
//! (the durable stores: `--bench stores`).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use criterion::measurement::WallTime;
use criterion::{BatchSize, BenchmarkGroup, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::Request;
use idempotent_bench::app::{self, API_KEY, BODY, CREATE_PAYMENT};
use idempotent_bench::fixtures::{fingerprint, payment, record_key, stored_response};
use idempotent_core::record::{Claim, RecordKey};
use idempotent_core::store::{MemoryStore, Store, Tiered};
use idempotent_core::{Fingerprint, Idempotency};
use serde::Serialize;
use tower::ServiceExt;

const LEASE: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Serialize)]
struct LineItem {
    sku: String,
    quantity: u32,
    unit_price: i64,
    tags: Vec<&'static str>,
}

/// A ~64 KiB order: 500 line items.
#[derive(Serialize)]
struct LargeOrder {
    customer: String,
    items: Vec<LineItem>,
}

fn large_order() -> LargeOrder {
    LargeOrder {
        customer: "cus_0123456789".to_owned(),
        items: (0..500)
            .map(|i| LineItem {
                sku: format!("sku-{i:08}-abcdefghijklmnop"),
                quantity: i % 7 + 1,
                unit_price: 1999 + i64::from(i),
                tags: vec!["gift", "express", "fragile"],
            })
            .collect(),
    }
}

fn fingerprinting(c: &mut Criterion) {
    let small = payment();
    let large = large_order();
    let large_json = serde_json::to_vec(&large).expect("serializes");
    let mut group = c.benchmark_group("fingerprint");
    group.bench_function(format!("small {} B json", BODY.len()), |b| {
        b.iter(|| CREATE_PAYMENT.fingerprint(black_box(&small)));
    });
    group.bench_function(format!("large {} B json", large_json.len()), |b| {
        b.iter(|| CREATE_PAYMENT.fingerprint(black_box(&large)));
    });
    // For scale: what serde_json alone takes to write the same value.
    group.bench_function("large, serde_json::to_vec only", |b| {
        b.iter(|| serde_json::to_vec(black_box(&large)));
    });
    group.finish();
}

/// Store futures of the memory store (alone or as a tiered store's durable
/// tier) are ready at once; no runtime needed.
fn ready<T>(future: impl Future<Output = T>) -> T {
    future
        .now_or_never()
        .expect("memory store futures are ready")
}

fn claim_and_complete(store: &impl Store, key: &RecordKey, fingerprint: Fingerprint) {
    let Claim::Acquired(token) = ready(store.claim(key, fingerprint, LEASE)).expect("claim") else {
        panic!("a new key is acquired");
    };
    ready(store.complete(key, token, stored_response(), TTL)).expect("complete");
}

/// A store's claim + complete of new keys and its claim of a completed key,
/// each on a fresh store from `fresh`.
fn claim_benchmarks<S: Store>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    fresh: impl Fn() -> S,
    replay_name: &str,
) {
    let fingerprint = fingerprint();
    let store = fresh();
    let next = AtomicU64::new(0);
    group.bench_function("claim+complete, new key", |b| {
        b.iter_batched(
            || record_key(0, next.fetch_add(1, Ordering::Relaxed)),
            |key| claim_and_complete(&store, &key, fingerprint),
            BatchSize::SmallInput,
        );
    });
    let store = fresh();
    let replayed = record_key(0, u64::MAX);
    claim_and_complete(&store, &replayed, fingerprint);
    group.bench_function(replay_name, |b| {
        b.iter(|| {
            let claim = ready(store.claim(black_box(&replayed), fingerprint, LEASE));
            assert!(matches!(claim, Ok(Claim::Completed(_))));
        });
    });
}

fn memory_store(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory_store");
    claim_benchmarks(
        &mut group,
        MemoryStore::new,
        "claim, replay of a completed key",
    );
    group.bench_function("record key: parse 36-char key + api-key scope", |b| {
        b.iter(|| record_key(0, black_box(7)));
    });
    group.finish();
}

/// What the tiered store's memory tier adds to its durable tier's own work:
/// the durable tier here is a `MemoryStore`, which is cheap and answers at
/// once, so the difference from `memory_store` is the cache's bookkeeping.
fn tiered_store(c: &mut Criterion) {
    let mut group = c.benchmark_group("tiered_store over a memory store");
    let fresh = || Tiered::new(MemoryStore::new());
    claim_benchmarks(&mut group, fresh, "claim, replay from the cache");
    group.finish();
}

/// Two threads (the machine's two cores) claiming at once: on one key, on
/// a completed key, and on distinct keys for comparison.
fn contention(c: &mut Criterion) {
    let fingerprint = fingerprint();
    let mut group = c.benchmark_group("contention, 2 threads");
    let store = MemoryStore::new();
    let completed = record_key(0, u64::MAX);
    claim_and_complete(&store, &completed, fingerprint);
    group.bench_function("replay claims on one completed key", |b| {
        b.iter_custom(|iters| {
            on_two_threads(iters, |_| {
                black_box(ready(store.claim(&completed, fingerprint, LEASE)).expect("claim"));
            })
        });
    });
    let in_flight = record_key(0, u64::MAX - 1);
    drop(ready(store.claim(&in_flight, fingerprint, LEASE)));
    group.bench_function("claims on one in-flight key (409 path)", |b| {
        b.iter_custom(|iters| {
            on_two_threads(iters, |_| {
                black_box(ready(store.claim(&in_flight, fingerprint, LEASE)).expect("claim"));
            })
        });
    });
    let next = AtomicU64::new(0);
    group.bench_function("claim+complete on distinct keys", |b| {
        b.iter_custom(|iters| {
            on_two_threads(iters, |_| {
                let key = record_key(0, next.fetch_add(1, Ordering::Relaxed));
                claim_and_complete(&store, &key, fingerprint);
            })
        });
    });
    group.finish();
}

/// Runs `iters` operations split over two threads; the time per operation
/// is the wall time over `iters`.
fn on_two_threads(iters: u64, op: impl Fn(u64) + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..2 {
            let op = &op;
            scope.spawn(move || {
                for i in (thread..iters).step_by(2) {
                    op(i);
                }
            });
        }
    });
    start.elapsed()
}

/// A request as an HTTP/1.1 client sends it, with its `Content-Length`.
fn request(path: &str, key: Option<String>) -> Request<Body> {
    let mut builder = Request::post(path)
        .header("content-type", "application/json")
        .header("content-length", BODY.len())
        .header("x-api-key", API_KEY);
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(BODY)).expect("request")
}

/// One request through the whole router, in-process: the CPU the engine
/// adds per request, without sockets or HTTP parsing. Each benchmark gets a
/// fresh router and store, so records left by one do not weigh on the next.
fn router(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let fresh = || -> Router { app::router(Idempotency::new(MemoryStore::new())) };
    let call = |router: &Router, request: Request<Body>| {
        let response = runtime
            .block_on(router.clone().oneshot(request))
            .expect("infallible");
        assert!(response.status().is_success());
        response
    };
    let mut group = c.benchmark_group("router, in-process");
    let router = fresh();
    group.bench_function("bare", |b| {
        b.iter_batched(
            || request("/bare", None),
            |r| call(&router, r),
            BatchSize::SmallInput,
        );
    });
    let router = fresh();
    group.bench_function("plain route under the layer, no key", |b| {
        b.iter_batched(
            || request("/plain", None),
            |r| call(&router, r),
            BatchSize::SmallInput,
        );
    });
    let router = fresh();
    let next = AtomicU64::new(0);
    group.bench_function("idempotent, new key", |b| {
        b.iter_batched(
            || {
                let n = next.fetch_add(1, Ordering::Relaxed);
                request("/idem", Some(format!("{n:036}")))
            },
            |r| call(&router, r),
            BatchSize::SmallInput,
        );
    });
    drop(router);
    let router = fresh();
    call(&router, request("/idem", Some("replayed".to_owned())));
    group.bench_function("idempotent, replay (an exact repeat)", |b| {
        b.iter_batched(
            || request("/idem", Some("replayed".to_owned())),
            |r| call(&router, r),
            BatchSize::SmallInput,
        );
    });
    // Without a declared length the body is not compared: the full path.
    let chunked = || {
        let mut request = request("/idem", Some("replayed".to_owned()));
        request.headers_mut().remove("content-length");
        request
    };
    let router = fresh();
    call(&router, chunked());
    group.bench_function("idempotent, replay through the full path", |b| {
        b.iter_batched(chunked, |r| call(&router, r), BatchSize::SmallInput);
    });
    group.finish();
}

criterion_group!(
    benches,
    fingerprinting,
    memory_store,
    tiered_store,
    contention,
    router
);
criterion_main!(benches);
