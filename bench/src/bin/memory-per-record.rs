//! Measures the memory each completed record takes in the `MemoryStore`,
//! beyond its body and headers.
//!
//! ```text
//! memory-per-record [records=200000]
//! ```
//!
//! Sends `records` requests with new keys through the benchmark router
//! in-process (so the record is exactly what the engine stores), drops every
//! response, and compares the heap before and after: bytes requested from
//! the allocator (counted by a wrapping global allocator), the number of
//! live allocations, and the process's resident set.

use std::alloc::System;

use axum::body::Body;
use http::Request;
use http_body_util::BodyExt;
use idempotent_bench::app::{self, API_KEY, BODY};
use idempotent_core::Idempotency;
use idempotent_core::store::MemoryStore;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower::ServiceExt;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Keys are 36 characters, the length of a UUID.
fn key(n: usize) -> String {
    format!("{n:036}")
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

struct Sizes {
    body: usize,
    headers: usize,
}

async fn send(router: &axum::Router, n: usize) -> Sizes {
    let request = Request::post("/idem")
        .header("content-type", "application/json")
        .header("x-api-key", API_KEY)
        .header("idempotency-key", key(n))
        .body(Body::from(BODY))
        .expect("request");
    let response = router.clone().oneshot(request).await.expect("infallible");
    assert!(response.status().is_success(), "{}", response.status());
    let headers = response
        .headers()
        .iter()
        .filter(|(name, _)| *name != "content-length")
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    Sizes {
        body: body.len(),
        headers,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let records: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("records: a number"))
        .unwrap_or(200_000);
    let store = MemoryStore::builder().max_bytes(u64::MAX >> 1).build();
    let router = app::router(Idempotency::new(store.clone()));
    // Warm up: lazily built runtime, router and cache structures.
    for n in 0..1_000 {
        send(&router, usize::MAX - n).await;
    }
    let _ = store.completed_len();
    let rss_before = resident_bytes();
    let region = Region::new(GLOBAL);
    let mut sizes = Sizes {
        body: 0,
        headers: 0,
    };
    for n in 0..records {
        sizes = send(&router, n).await;
    }
    let held = store.completed_len();
    let change = region.change();
    let rss_after = resident_bytes();
    assert_eq!(held, records as u64 + 1_000, "every record is kept");

    let heap = change.bytes_allocated as i64 - change.bytes_deallocated as i64
        + change.bytes_reallocated as i64;
    let live_allocations = change.allocations as i64 - change.deallocations as i64;
    let per_record = heap as f64 / records as f64;
    let payload = sizes.body + sizes.headers;
    let rss_per_record = rss_after.saturating_sub(rss_before) as f64 / records as f64;
    println!("records                     {records}");
    println!(
        "stored body + headers       {payload} B ({} body, {} headers)",
        sizes.body, sizes.headers
    );
    println!("key                         36 B");
    println!("heap per record             {per_record:.0} B requested from the allocator");
    println!(
        "  overhead beyond body+hdrs {:.0} B (key included)",
        per_record - payload as f64
    );
    println!(
        "live allocations per record {:.2}",
        live_allocations as f64 / records as f64
    );
    println!(
        "resident set per record     {rss_per_record:.0} B (overhead {:.0} B)",
        rss_per_record - payload as f64
    );
}
