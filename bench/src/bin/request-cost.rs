//! Drives the benchmark router in process, without sockets, so that
//! `valgrind --tool=callgrind` can count the instructions one request
//! costs on each route (see BENCHMARKS.md).
//!
//! ```text
//! request-cost <route> <workload> <requests>
//! routes: bare, idem, plain; workloads: new, replay, nokey
//! ```
//!
//! Instructions per request: run twice with different request counts and
//! divide the difference of the totals by the difference of the counts,
//! which cancels start-up and warm-up. The program itself prints the heap
//! allocations per request, counted after a warm-up of 1000 requests.

use std::alloc::System;

use axum::Router;
use axum::body::Body;
use http::Request;
use http_body_util::BodyExt;
use idempotent_bench::app;
use idempotent_core::Idempotency;
use idempotent_core::store::MemoryStore;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower::ServiceExt;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const WARM_UP: u64 = 1000;

fn request(route: &str, key: Option<String>) -> Request<Body> {
    let mut builder = Request::post(format!("/{route}"))
        .header("content-type", "application/json")
        .header("x-api-key", app::API_KEY);
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder
        .body(Body::from(app::BODY))
        .expect("a valid request")
}

fn key(workload: &str, n: u64) -> Result<Option<String>, String> {
    match workload {
        "new" => Ok(Some(format!("00000000-0000-{n:022}"))),
        "replay" => Ok(Some(format!("replay-{:029}", n % 64))),
        "nokey" => Ok(None),
        other => Err(format!("unknown workload `{other}` (new, replay, nokey)")),
    }
}

async fn drive(
    router: &Router,
    route: &str,
    workload: &str,
    requests: std::ops::Range<u64>,
) -> Result<(), String> {
    for n in requests {
        let response = router
            .clone()
            .oneshot(request(route, key(workload, n)?))
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("request {n}: status {}", response.status()));
        }
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn main() -> Result<(), String> {
    let words: Vec<String> = std::env::args().skip(1).collect();
    let [route, workload, requests] = words.as_slice() else {
        return Err("usage: request-cost <bare|idem|plain> <new|replay|nokey> <requests>".into());
    };
    let requests: u64 = requests.parse().map_err(|e| format!("requests: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let router = app::router(Idempotency::new(MemoryStore::new()));
    runtime.block_on(drive(&router, route, workload, 0..WARM_UP))?;
    let region = Region::new(GLOBAL);
    let measured = WARM_UP..WARM_UP + requests;
    runtime.block_on(drive(&router, route, workload, measured))?;
    let change = region.change();
    #[allow(clippy::cast_precision_loss)]
    let per_request = |count: usize| count as f64 / requests.max(1) as f64;
    println!(
        "{route} {workload}: {:.1} allocations, {:.0} bytes allocated per request",
        per_request(change.allocations + change.reallocations),
        per_request(change.bytes_allocated),
    );
    Ok(())
}
