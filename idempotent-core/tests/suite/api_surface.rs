//! The public API as an application and a store of its own use it: the
//! layers on routers with state, nested and merged, and a store's way to
//! report a record it cannot read.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use idempotent_core::record::{Claim, Record, RecordKey};
use idempotent_core::store::{MemoryStore, SharedStore, StoreError, Tiered};
use idempotent_core::{
    Endpoint, Fingerprint, IDEMPOTENT_REPLAYED, Idempotency, IdempotentLayer, IdempotentRequest,
    Scope,
};
use serde_json::Value;
use tower::{Layer as _, ServiceExt as _};

use crate::forwarding;
use forwarding::{Forwarding, Hooks};

const CREATE: Endpoint = Endpoint::new("create").scope(Scope::Global);

/// The application's state: how many times the side effect ran.
#[derive(Clone, Default)]
struct Runs(Arc<AtomicUsize>);

impl Runs {
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

async fn create(State(runs): State<Runs>, idempotent: IdempotentRequest, body: String) -> Response {
    let fingerprint = CREATE.fingerprint(&body);
    idempotent
        .run(&CREATE, fingerprint, async move {
            let run = runs.0.fetch_add(1, Ordering::SeqCst) + 1;
            (StatusCode::CREATED, format!("run {run}"))
        })
        .await
}

async fn create_by_layer(State(runs): State<Runs>) -> StatusCode {
    runs.0.fetch_add(1, Ordering::SeqCst);
    StatusCode::CREATED
}

fn keyed(uri: &str, key: &str) -> Request {
    Request::post(uri)
        .header("idempotency-key", key)
        .body(Body::from("{}"))
        .unwrap()
}

/// Sends `request` twice; the second answer must be the first one replayed.
async fn sent_twice<S>(app: &S, uri: &str, key: &str)
where
    S: tower::Service<Request, Response = Response, Error = std::convert::Infallible> + Clone,
{
    let first = app.clone().oneshot(keyed(uri, key)).await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED, "{uri}");
    let again = app.clone().oneshot(keyed(uri, key)).await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED, "{uri}");
    assert_eq!(
        again.headers().get(IDEMPOTENT_REPLAYED).unwrap(),
        "true",
        "{uri}"
    );
}

/// Routers with state, nested under a prefix and merged with one another,
/// take the layer as axum's own middleware do; so does a whole router
/// wrapped once, and a `Tiered` store handed over already shared.
#[tokio::test]
async fn the_layer_covers_routers_with_state_nested_and_merged() {
    let runs = Runs::default();
    let by_extractor: Router<Runs> = Router::new().route("/a", post(create));
    let by_layer: Router<Runs> = Router::new().route(
        "/b",
        post(create_by_layer).route_layer(IdempotentLayer::new(CREATE)),
    );
    let shared: SharedStore = Arc::new(Tiered::new(MemoryStore::new()));
    let idempotency = Idempotency::from_shared(shared).build();
    let app: Router = Router::new()
        .nest("/v1", by_extractor.merge(by_layer))
        .with_state(runs.clone())
        .layer(idempotency.clone());
    sent_twice(&app, "/v1/a", "k1").await;
    sent_twice(&app, "/v1/b", "k2").await;
    assert_eq!(runs.count(), 2);

    let routes: Router = Router::new()
        .route("/a", post(create))
        .with_state(runs.clone());
    let wrapped = idempotency.layer(routes);
    let service = axum::ServiceExt::<Request>::into_make_service(wrapped.clone());
    drop(service);
    sent_twice(&wrapped, "/a", "k3").await;
    assert_eq!(runs.count(), 3);
}

/// A store of its own that finds the record at a key damaged: what it
/// answers every claim and read with.
struct Damaged(MemoryStore);

impl Hooks for Damaged {
    type Inner = MemoryStore;

    fn inner(&self) -> &MemoryStore {
        &self.0
    }

    async fn claim(
        &self,
        _key: &RecordKey,
        _fingerprint: Fingerprint,
        _lease: Duration,
    ) -> Result<Claim, StoreError> {
        Err(StoreError::corrupt("the response column is not a status"))
    }

    async fn get(&self, _key: &RecordKey) -> Result<Option<Record>, StoreError> {
        Err(StoreError::corrupt("the response column is not a status"))
    }
}

/// A store outside this crate can say that a record is there but
/// unreadable: its request ran, so it is neither run again, not even
/// failing open, nor answered as an outage the client should retry.
#[tokio::test]
async fn a_store_of_your_own_reports_a_corrupt_record_and_nothing_runs_again() {
    let runs = Runs::default();
    let idempotency = Idempotency::builder(Forwarding(Damaged(MemoryStore::new())))
        .fail_open(true)
        .build();
    let app: Router = Router::new()
        .route("/a", post(create))
        .with_state(runs.clone())
        .layer(idempotency);
    let response = app.oneshot(keyed("/a", "k")).await.unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(response.headers().get("retry-after").is_none());
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let problem: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["type"], "urn:idempotent:record-corrupt");
    assert_eq!(runs.count(), 0, "the handler ran again");
}

/// The value types an application keys its own tables by (counts per
/// problem kind, settings per scope, per status policy) are `Hash`.
#[test]
fn value_types_key_hash_maps() {
    use idempotent_core::{FinalStatuses, ProblemKind, StatusRange};
    use std::collections::HashMap;

    let mut problems = HashMap::new();
    *problems.entry(ProblemKind::KeyReused).or_insert(0) += 1;
    *problems.entry(ProblemKind::KeyReused).or_insert(0) += 1;
    assert_eq!(problems[&ProblemKind::KeyReused], 2);

    let scopes: HashMap<Scope, &str> =
        [(Scope::Global, "global"), (Scope::ApiKey, "api key")].into();
    assert_eq!(scopes[&Scope::ApiKey], "api key");

    const NOT_FOUND: &[StatusRange] = &[StatusRange::one(404)];
    let policies: HashMap<FinalStatuses, &str> = [
        (FinalStatuses::Default, "default"),
        (FinalStatuses::Only(NOT_FOUND), "404 only"),
    ]
    .into();
    assert_eq!(policies[&FinalStatuses::Only(NOT_FOUND)], "404 only");
}
