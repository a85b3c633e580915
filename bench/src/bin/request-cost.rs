//! Drives the benchmark router in process, without sockets, so that
//! `valgrind --tool=callgrind` can count the instructions one request
//! costs on each route (see BENCHMARKS.md).
//!
//! ```text
//! request-cost <route> <workload> <requests>
//! routes: bare, idem, plain; workloads: new, replay, nokey
//! LAYER=router: the idempotency layer around the whole router instead of
//! on each route
//! ```
//!
//! Instructions per request: run twice with different request counts and
//! divide the difference of the totals by the difference of the counts,
//! which cancels start-up and warm-up. The program itself prints the heap
//! allocations per request, counted after a warm-up of 1000 requests.

use std::alloc::System;
use std::convert::Infallible;

use axum::body::Body;
use axum::response::Response;
use http::Request;
use http_body_util::BodyExt;
use idempotent_bench::app;
use idempotent_core::Idempotency;
use idempotent_core::store::MemoryStore;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, Stats, StatsAlloc};
use tokio::runtime::Runtime;
use tower::{Service, ServiceExt};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const WARM_UP: u64 = 1000;

fn request(route: &str, key: Option<String>) -> Request<Body> {
    let mut builder = Request::post(format!("/{route}"))
        .header("content-type", "application/json")
        .header("content-length", app::BODY.len())
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

async fn drive<S>(
    router: &S,
    route: &str,
    workload: &str,
    requests: std::ops::Range<u64>,
) -> Result<(), String>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone,
{
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

/// One measurement: a warm-up, then the allocations of `requests` requests.
struct Run<'a> {
    runtime: &'a Runtime,
    route: &'a str,
    workload: &'a str,
    requests: u64,
}

impl Run<'_> {
    fn measure<S>(&self, router: &S) -> Result<Stats, String>
    where
        S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone,
    {
        let (route, workload) = (self.route, self.workload);
        self.runtime
            .block_on(drive(router, route, workload, 0..WARM_UP))?;
        let region = Region::new(GLOBAL);
        let measured = WARM_UP..WARM_UP + self.requests;
        self.runtime
            .block_on(drive(router, route, workload, measured))?;
        Ok(region.change())
    }
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
    let idempotency = Idempotency::new(MemoryStore::new());
    let run = Run {
        runtime: &runtime,
        route,
        workload,
        requests,
    };
    let change = match std::env::var("LAYER").as_deref() {
        Ok("router") => run.measure(&app::wrapped_router(&idempotency))?,
        _ => run.measure(&app::router(idempotency))?,
    };
    #[allow(clippy::cast_precision_loss)]
    let per_request = |count: usize| count as f64 / requests.max(1) as f64;
    println!(
        "{route} {workload}: {:.1} allocations, {:.0} bytes allocated per request",
        per_request(change.allocations + change.reallocations),
        per_request(change.bytes_allocated),
    );
    Ok(())
}
