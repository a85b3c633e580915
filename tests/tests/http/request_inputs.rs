//! How a request's headers become the caller its key belongs to, seen
//! from the outside: one caller's retry is replayed whatever form its
//! credentials take on the way.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::testing::{MockStore, TestRequest};
use idempotent_core::{IDEMPOTENT_REPLAYED, idempotent};
use serde_json::{Value, json};
use tower::ServiceExt;

/// The charges made: the side effect that must happen once per key.
#[derive(Clone, Default)]
struct Charges(Arc<AtomicUsize>);

#[idempotent(scope = "api_key")]
async fn charge(
    State(charges): State<Charges>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let number = charges.0.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        Json(json!({"charge": number, "body": body})),
    )
}

/// `curl -u sk_test_1:` sends `c2tfdGVzdF8xOg==`; a client whose base64
/// encoder leaves the padding off sends the same credentials without it.
#[tokio::test]
async fn a_retry_with_its_basic_credentials_unpadded_is_replayed() {
    let charges = Charges::default();
    let app = Router::new()
        .route("/charges", post(charge))
        .with_state(charges.clone())
        .layer(MockStore::new().layer());
    let request = |credentials: &str| {
        TestRequest::post("/charges")
            .key("k1")
            .header("authorization", &format!("Basic {credentials}"))
            .json(&json!({"amount": 100}))
            .build()
    };

    let first = app
        .clone()
        .oneshot(request("c2tfdGVzdF8xOg=="))
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let retry = app.oneshot(request("c2tfdGVzdF8xOg")).await.unwrap();

    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(
        charges.0.load(Ordering::SeqCst),
        1,
        "the retry charged again: its credentials were taken for another caller's"
    );
    assert_eq!(retry.headers()[IDEMPOTENT_REPLAYED], "true");
}
