//! A run cut short in a process whose store is a `Tiered` cache in front
//! of a durable store: its task is dropped (a runtime that ended without
//! `Idempotency::drain`) before it stored its response or released its
//! key, and the cache's hold on the key is never let go by the run. A
//! retry in the same process must still be answered as the durable store
//! decides: 409 while the durable lease holds, a new run once it lapsed,
//! and replays of that run after it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::clock::ManualClock;
use idempotent_core::store::{MemoryStore, Tiered};
use idempotent_core::{IDEMPOTENT_REPLAYED, Idempotency, idempotent};
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// How long a test waits for something that must happen before it calls
/// it a failure: never a synchronisation, only a bound on a hang.
const HANG: Duration = Duration::from_secs(10);

/// Each run signals that it started, then waits at a gate, closed at
/// first.
#[derive(Clone)]
struct Gate {
    started: Arc<Semaphore>,
    open: Arc<Semaphore>,
}

#[idempotent(scope = "global", lease = "60s")]
async fn charge(State(gate): State<Gate>, Json(amount): Json<u64>) -> (StatusCode, String) {
    gate.started.add_permits(1);
    gate.open.acquire().await.unwrap().forget();
    (StatusCode::CREATED, format!("charged {amount}"))
}

/// What a client saw: the status and whether it was a replay.
async fn send(app: Router) -> (StatusCode, bool) {
    let request = Request::post("/charges")
        .header("content-type", "application/json")
        .header("idempotency-key", "order-7")
        .body(Body::from("7"))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    (response.status(), replayed)
}

fn runtime() -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all().build().unwrap()
}

#[test]
fn a_retry_takes_over_the_key_of_a_run_cut_short_once_its_lease_lapsed() {
    let clock = ManualClock::starting_now();
    let durable = MemoryStore::builder().clock(clock.clone()).build();
    let gate = Gate {
        started: Arc::new(Semaphore::new(0)),
        open: Arc::new(Semaphore::new(0)),
    };
    let app = Router::new()
        .route("/charges", post(charge))
        .with_state(gate.clone())
        .layer(Idempotency::new(Tiered::new(durable.clone())));

    // The client goes away while the handler runs, and the runtime ends
    // before the handler does.
    let cut_short = runtime();
    cut_short.block_on(async {
        let first = tokio::spawn(send(app.clone()));
        let started = tokio::time::timeout(HANG, gate.started.acquire()).await;
        started.expect("the handler starts").unwrap().forget();
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
    });
    drop(cut_short);
    assert_eq!(durable.in_flight_len(), 1, "the durable claim stays");

    runtime().block_on(async {
        assert_eq!(
            send(app.clone()).await,
            (StatusCode::CONFLICT, false),
            "the durable lease still holds"
        );
        clock.advance(Duration::from_secs(61));
        gate.open.add_permits(1);
        assert_eq!(
            send(app.clone()).await,
            (StatusCode::CREATED, false),
            "the retry after the lease lapsed did not run"
        );
        assert_eq!(send(app.clone()).await, (StatusCode::CREATED, true));
    });
}
