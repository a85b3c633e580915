//! A run cut short before it settled its claim: the runtime shuts down
//! without `Idempotency::drain` while a handler whose client went away
//! still runs, or while a response the store refused is still being
//! stored. The key stays claimed until its lease lapses and a retry after
//! that runs the request again; the operator, who must reconcile it, is
//! told once, with the endpoint, the key, and how far the handler got.
//! A run that settles its claim, however it ends, is not cut short.

#[path = "../../idempotent-core/tests/support/events.rs"]
mod events;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use events::{Events, Logged};
use idempotent_core::record::RecordKey;
use idempotent_core::scope::ScopeDigest;
use idempotent_core::testing::{MockStore, OpKind};
use idempotent_core::{Idempotency, IdempotencyKey, idempotent};
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// How long a test waits for something that must happen before it calls
/// it a failure: never a synchronisation, only a bound on a hang.
const HANG: Duration = Duration::from_secs(10);
const KEY: &str = "order-7";

/// Each run signals that it started, then waits at a gate, closed at
/// first.
#[derive(Clone)]
struct Gate {
    started: Arc<Semaphore>,
    open: Arc<Semaphore>,
}

impl Gate {
    fn closed() -> Self {
        Self {
            started: Arc::new(Semaphore::new(0)),
            open: Arc::new(Semaphore::new(0)),
        }
    }

    async fn until_started(&self) {
        let started = tokio::time::timeout(HANG, self.started.acquire()).await;
        started.expect("the handler starts").unwrap().forget();
    }
}

#[idempotent(scope = "global")]
async fn charge(State(gate): State<Gate>, Json(amount): Json<u64>) -> (StatusCode, String) {
    gate.started.add_permits(1);
    gate.open.acquire().await.unwrap().forget();
    (StatusCode::CREATED, format!("charged {amount}"))
}

/// Panics, after which the engine releases the key and logs `released`.
#[idempotent(scope = "global")]
async fn refuse(Json(amount): Json<u64>) -> StatusCode {
    panic!("the charge of {amount} was refused");
}

fn app(idempotency: &Idempotency, gate: &Gate) -> Router {
    Router::new()
        .route("/charges", post(charge))
        .route("/refusals", post(refuse))
        .with_state(gate.clone())
        .layer(idempotency.clone())
}

async fn send(app: Router) -> StatusCode {
    send_to(app, "/charges").await
}

async fn send_to(app: Router, uri: &str) -> StatusCode {
    let request = Request::post(uri)
        .header("content-type", "application/json")
        .header("idempotency-key", KEY)
        .body(Body::from("7"))
        .unwrap();
    app.oneshot(request).await.unwrap().status()
}

/// A runtime for one phase of a test, dropped at its end as a process
/// that stops without `drain` drops its own: on this thread, so that
/// [`Events::on_this_thread`] sees what the runs it drops log.
fn runtime() -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all().start_paused(true).build().unwrap()
}

/// The one `cut_short` of `events`, which names the endpoint and the key
/// as every other outcome does.
#[track_caller]
fn the_one_cut_short(events: &[Logged]) -> &Logged {
    let cut = events
        .iter()
        .filter(|e| e.field("outcome") == Some("cut_short"));
    let cut: Vec<_> = cut.collect();
    assert_eq!(cut.len(), 1, "one run cut short: {events:#?}");
    let cut = cut[0];
    assert_eq!(cut.level, tracing::Level::ERROR, "{cut:#?}");
    let endpoint = cut.field("endpoint").unwrap_or_default();
    assert!(endpoint.ends_with("charge"), "{cut:#?}");
    let key = RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(KEY.as_bytes()).unwrap(),
    );
    assert_eq!(cut.field("key"), Some(&*key.log_id().to_string()));
    assert!(cut.message().contains("lease lapses"), "{cut:#?}");
    cut
}

/// The client went away while the handler runs, and the runtime is
/// dropped before the handler ends: the handler may have acted.
#[test]
fn a_run_cut_short_while_its_handler_runs_is_logged_as_running() {
    let (events, _guard) = Events::on_this_thread();
    let (store, gate) = (MockStore::new(), Gate::closed());
    let app = app(&store.layer(), &gate);
    let runtime = runtime();
    runtime.block_on(async {
        let first = tokio::spawn(send(app));
        gate.until_started().await;
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
    });
    drop(runtime);
    assert_eq!(store.count(OpKind::Release), 0);
    let events = events.take_at_least(tracing::Level::INFO);
    let cut = the_one_cut_short(&events);
    assert_eq!(cut.field("handler"), Some("running"), "{cut:#?}");
    assert_eq!(cut.field("status"), None, "{cut:#?}");
}

/// The handler answered 201 and its caller got it, but the store refused
/// the response, which is still being stored when the runtime is dropped:
/// the handler acted, and its response is not stored.
#[test]
fn a_response_still_being_stored_when_cut_short_is_logged_with_its_status() {
    let (events, _guard) = Events::on_this_thread();
    let (store, gate) = (MockStore::new(), Gate::closed());
    let app = app(&store.layer(), &gate);
    let runtime = runtime();
    runtime.block_on(async {
        store.fail_every(OpKind::Complete);
        gate.open.add_permits(1);
        assert_eq!(send(app).await, StatusCode::CREATED);
    });
    drop(runtime);
    assert_eq!(store.count(OpKind::Complete), 0);
    let events = events.take_at_least(tracing::Level::INFO);
    let cut = the_one_cut_short(&events);
    assert_eq!(cut.field("handler"), Some("answered"), "{cut:#?}");
    assert_eq!(cut.field("status"), Some("201"), "{cut:#?}");
}

/// Runs that store their response or release their key log no
/// `cut_short`, however they end: one whose handler panicked (the engine
/// releases the key and logs `released`), and one whose client went away
/// while its handler ran, which `drain` waited for before the runtime
/// was dropped.
#[test]
fn runs_that_settle_their_claim_are_not_logged_as_cut_short() {
    let (events, _guard) = Events::on_this_thread();
    let (store, gate) = (MockStore::new(), Gate::closed());
    let idempotency = store.layer();
    let app = app(&idempotency, &gate);
    let runtime = runtime();
    runtime.block_on(async {
        let refused = tokio::spawn(send_to(app.clone(), "/refusals")).await;
        assert!(refused.unwrap_err().is_panic());
        let first = tokio::spawn(send(app));
        gate.until_started().await;
        first.abort();
        assert!(first.await.unwrap_err().is_cancelled());
        gate.open.add_permits(1);
        idempotency.drain().await;
    });
    drop(runtime);
    let settled = (store.count(OpKind::Release), store.count(OpKind::Complete));
    assert_eq!(settled, (1, 1), "{:?}", store.operations());
    let events = events.take_at_least(tracing::Level::INFO);
    let released = events
        .iter()
        .filter(|e| e.field("outcome") == Some("released"));
    assert_eq!(released.count(), 1, "{events:#?}");
    let cut = events
        .iter()
        .filter(|e| e.field("outcome") == Some("cut_short"));
    assert_eq!(cut.count(), 0, "{events:#?}");
}
