//! What a request's idempotency context shows when it is logged, as a
//! handler's traced argument is (`#[tracing::instrument]` records its
//! arguments with `Debug`): never a credential the request carried, nor
//! its key.

mod macro_support;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Endpoint, Idempotency, IdempotentRequest};
use macro_support::send;

const CHARGE: Endpoint = Endpoint::new("http_logs::charge");

/// What the handler logged of its request's context.
#[derive(Clone, Default)]
struct Logged(Arc<Mutex<String>>);

async fn charge(
    State(logged): State<Logged>,
    idempotency: IdempotentRequest,
    Json(cents): Json<u64>,
) -> Response {
    *logged.0.lock().unwrap() = format!("{idempotency:?}");
    let fingerprint = CHARGE.fingerprint(&cents);
    idempotency
        .run(&CHARGE, fingerprint, async move { cents.to_string() })
        .await
}

#[tokio::test]
async fn a_logged_request_context_shows_header_names_but_no_credential() {
    let logged = Logged::default();
    let app = Router::new()
        .route("/charges", post(charge))
        .with_state(logged.clone())
        .layer(Idempotency::new(MemoryStore::new()));
    // The key too, which `IdempotencyKey` shows only as a digest.
    let secrets = [
        "sk_live_bearer",
        "sk_live_api_key",
        "session_cookie",
        "order-7",
    ];
    let request = Request::post("/charges")
        .header("content-type", "application/json")
        .header("idempotency-key", secrets[3])
        .header("authorization", format!("Bearer {}", secrets[0]))
        .header("x-api-key", secrets[1])
        .header("cookie", format!("session={}", secrets[2]))
        .body(Body::from("100"))
        .unwrap();

    let reply = send(&app, request).await;

    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let logged = logged.0.lock().unwrap().clone();
    for secret in secrets {
        assert!(!logged.contains(secret), "{secret} logged: {logged}");
    }
    assert!(logged.contains("authorization"), "{logged}");
}
