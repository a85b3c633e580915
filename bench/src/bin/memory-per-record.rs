//! Measures the memory each completed record takes in the `MemoryStore`,
//! beyond its body and headers.
//!
//! ```text
//! memory-per-record [--store-only] [records=200000]
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

/// The store alone: `records` claims completed with a 101-byte body and
/// one header, built exactly (no spare capacity).
fn store_only(records: usize) {
    use http::{HeaderName, HeaderValue, StatusCode};
    use idempotent_core::record::{Claim, RecordKey, StoredResponse};
    use idempotent_core::scope::ScopeDigest;
    use idempotent_core::store::Store;
    use idempotent_core::{Fingerprint, IdempotencyKey};
    use std::time::Duration;

    let store = MemoryStore::builder().max_bytes(u64::MAX >> 1).build();
    let scope = ScopeDigest::api_key(API_KEY.as_bytes());
    let body = [b'x'; 101];
    let complete = |n: usize| {
        let key = RecordKey::new(
            scope,
            IdempotencyKey::parse(key(n).as_bytes()).expect("key"),
        );
        let claim = store.claim(
            &key,
            Fingerprint::from_bytes([7; 32]),
            Duration::from_secs(60),
        );
        let Ok(Claim::Acquired(token)) = futures_now(claim) else {
            panic!("a new key is acquired");
        };
        let response = StoredResponse::new(
            StatusCode::CREATED,
            vec![(
                HeaderName::from_static("content-type"),
                HeaderValue::from_static("application/json"),
            )],
            Some(bytes::Bytes::copy_from_slice(&body)),
        );
        let done = store.complete(&key, token, response, Duration::from_secs(86_400));
        futures_now(done).expect("complete");
    };
    for n in 0..1_000 {
        complete(usize::MAX - n);
    }
    let region = Region::new(GLOBAL);
    for n in 0..records {
        complete(n);
    }
    let change = region.change();
    // `bytes_allocated` and `bytes_deallocated` already include the growth
    // and shrinkage of reallocations.
    let heap = change.bytes_allocated as i64 - change.bytes_deallocated as i64;
    let per_record = heap as f64 / records as f64;
    println!(
        "sizes: Completed {} B, header pair {} B, StoredResponse {} B",
        std::mem::size_of::<idempotent_core::record::Completed>(),
        std::mem::size_of::<(HeaderName, HeaderValue)>(),
        std::mem::size_of::<StoredResponse>()
    );
    println!(
        "store only: {per_record:.0} B per record requested, {:.0} B beyond the 101-byte body and 28 header bytes; {:.2} live allocations per record",
        per_record - 129.0,
        (change.allocations as f64 - change.deallocations as f64) / records as f64
    );
}

/// Memory store futures are ready at once.
fn futures_now<T>(future: impl std::future::Future<Output = T>) -> T {
    let waker = std::task::Waker::noop();
    let mut context = std::task::Context::from_waker(waker);
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(value) => value,
        std::task::Poll::Pending => panic!("memory store futures are ready at once"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1).peekable();
    let store_mode = args.peek().is_some_and(|a| a == "--store-only");
    if store_mode {
        args.next();
    }
    let records: usize = args
        .next()
        .map(|n| n.parse().expect("records: a number"))
        .unwrap_or(200_000);
    if store_mode {
        store_only(records);
        return;
    }
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

    // `bytes_allocated` and `bytes_deallocated` already include the growth
    // and shrinkage of reallocations.
    let heap = change.bytes_allocated as i64 - change.bytes_deallocated as i64;
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
