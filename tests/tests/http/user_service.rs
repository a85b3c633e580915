//! The service the README promises, built from the README alone: a
//! payment endpoint scoped by API key, a transfer endpoint scoped by the
//! caller an auth middleware leaves in the extensions, a form endpoint, a
//! read, and the answers a client gets on each error path.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Form, Json, Router};
use idempotent_core::testing::{MockStore, TestRequest};
use idempotent_core::{IdempotencyScope, idempotent};
use serde::{Deserialize, Serialize};

use crate::macro_support::{Reply, send};

#[derive(Clone, Default)]
struct Charges(Arc<AtomicU64>);

impl Charges {
    fn charge(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn count(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Serialize, Deserialize)]
struct NewPayment {
    amount: i64,
    currency: String,
}

#[derive(Serialize)]
struct Payment {
    id: u64,
    amount: i64,
}

#[idempotent(ttl = "24h", scope = "api_key")]
async fn create_payment(
    State(charges): State<Charges>,
    Json(req): Json<NewPayment>,
) -> (StatusCode, Json<Payment>) {
    let id = charges.charge();
    let payment = Payment {
        id,
        amount: req.amount,
    };
    (StatusCode::CREATED, Json(payment))
}

#[derive(Serialize, Deserialize)]
struct Subscribe {
    email: String,
    plan: String,
}

#[idempotent(ttl = "1h", scope = "api_key")]
async fn subscribe(State(charges): State<Charges>, Form(form): Form<Subscribe>) -> String {
    format!("{} on {} (#{})", form.email, form.plan, charges.charge())
}

#[derive(Serialize, Deserialize)]
struct Page {
    from: u64,
    to: u64,
}

#[idempotent(ttl = "1h", scope = "api_key")]
async fn export(State(charges): State<Charges>, Query(page): Query<Page>) -> String {
    format!("{}..{} (#{})", page.from, page.to, charges.charge())
}

/// The caller an auth middleware found.
#[derive(Clone)]
struct User {
    id: u64,
}

impl IdempotencyScope for User {
    fn scope_id(&self) -> impl AsRef<[u8]> {
        self.id.to_be_bytes()
    }
}

#[derive(Serialize, Deserialize)]
struct Transfer {
    cents: u64,
}

#[idempotent(scope = User)]
async fn transfer(
    State(charges): State<Charges>,
    Extension(user): Extension<User>,
    Json(t): Json<Transfer>,
) -> String {
    format!("user {} sent {} (#{})", user.id, t.cents, charges.charge())
}

/// Takes the caller's id from `X-User`, as a real middleware would from
/// a verified token.
async fn authenticate(mut request: Request, next: Next) -> Response {
    let id = request.headers().get("x-user").map(HeaderValue::to_str);
    if let Some(Ok(id)) = id
        && let Ok(id) = id.parse()
    {
        request.extensions_mut().insert(User { id });
    }
    next.run(request).await
}

fn app(charges: &Charges, store: &MockStore) -> Router {
    Router::new()
        .route("/payments", post(create_payment))
        .route("/subscriptions", post(subscribe))
        .route("/exports", get(export))
        .route("/transfers", post(transfer))
        .with_state(charges.clone())
        .layer(store.layer())
        .layer(axum::middleware::from_fn(authenticate))
}

fn payment(key: &str, body: &str) -> TestRequest {
    TestRequest::post("/payments")
        .key(key)
        .api_key("sk_test_1")
        .header("content-type", "application/json")
        .body(body.to_owned())
}

async fn sent(app: &Router, request: &TestRequest) -> Reply {
    send(app, request.build()).await
}

#[tokio::test]
async fn a_payment_runs_once_and_its_retries_replay_it() {
    let (charges, store) = (Charges::default(), MockStore::new());
    let app = app(&charges, &store);
    let first = sent(&app, &payment("k1", r#"{"amount":1999,"currency":"EUR"}"#)).await;
    assert_eq!((first.status, first.replayed), (StatusCode::CREATED, false));
    let reordered = payment("k1", r#"{ "currency": "EUR", "amount": 1999 }"#);
    let retry = sent(&app, &reordered).await;
    assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, true));
    assert_eq!(retry.body, first.body);
    let changed = sent(&app, &payment("k1", r#"{"amount":2500,"currency":"EUR"}"#)).await;
    assert_eq!(changed.problem(422).0, "key-reused");
    assert_eq!(charges.count(), 1);
}

#[tokio::test]
async fn error_paths_answer_problems_that_name_the_fix() {
    let (charges, store) = (Charges::default(), MockStore::new());
    let app = app(&charges, &store);
    let body = r#"{"amount":1,"currency":"EUR"}"#;
    let no_key = TestRequest::post("/payments")
        .api_key("sk_test_1")
        .json(&serde_json::json!({"amount": 1, "currency": "EUR"}));
    let (kind, detail) = sent(&app, &no_key).await.problem(400);
    assert_eq!(kind, "missing-key");
    assert!(detail.contains("Idempotency-Key"), "{detail}");
    let near = no_key.clone().header("x-idempotency-key", "k");
    let (_, detail) = sent(&app, &near).await.problem(400);
    assert!(detail.contains("x-idempotency-key"), "{detail}");
    let (kind, detail) = sent(&app, &payment(&"k".repeat(256), body))
        .await
        .problem(400);
    assert_eq!(kind, "invalid-key");
    assert!(detail.contains("256") && detail.contains("255"), "{detail}");
    let (_, detail) = sent(&app, &payment("a b", body)).await.problem(400);
    assert!(detail.contains("quoted"), "{detail}");
    assert_eq!(
        sent(&app, &payment("\"a b\"", body)).await.status,
        StatusCode::CREATED
    );
    let anonymous = TestRequest::post("/payments")
        .key("k2")
        .json(&serde_json::json!({}));
    let refused = sent(&app, &anonymous).await;
    assert_eq!(refused.problem(401).0, "missing-credentials");
    assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
    let malformed = sent(&app, &payment("k3", "{")).await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    let fixed = sent(&app, &payment("k3", body)).await;
    assert_eq!(fixed.status, StatusCode::CREATED, "{}", fixed.body);
    store.in_flight_next();
    let in_flight = sent(&app, &payment("k4", body)).await;
    assert_eq!(in_flight.problem(409).0, "request-in-progress");
    assert_eq!(in_flight.header("retry-after"), Some("1"));
}

#[tokio::test]
async fn a_form_is_fingerprinted_by_its_fields() {
    let (charges, store) = (Charges::default(), MockStore::new());
    let app = app(&charges, &store);
    let form = |body: &str| {
        TestRequest::post("/subscriptions")
            .key("s1")
            .api_key("sk_test_1")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_owned())
    };
    let first = sent(&app, &form("email=a%40b.c&plan=pro")).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let retry = sent(&app, &form("plan=pro&email=a%40b.c")).await;
    assert!(retry.replayed, "{retry:?}");
    assert_eq!(
        sent(&app, &form("email=a%40b.c&plan=free")).await.status,
        422
    );
    let untyped = TestRequest::post("/subscriptions")
        .key("s2")
        .api_key("sk_test_1")
        .body("email=x&plan=y");
    assert_eq!(
        sent(&app, &untyped).await.status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    assert_eq!(charges.count(), 1);
}

#[tokio::test]
async fn a_keyed_read_replays_and_a_head_counts_as_a_get() {
    let (charges, store) = (Charges::default(), MockStore::new());
    let app = app(&charges, &store);
    let read =
        |uri: &str, method: Method| TestRequest::new(method, uri).key("e1").api_key("sk_test_1");
    let first = sent(&app, &read("/exports?from=1&to=9", Method::GET)).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let again = sent(&app, &read("/exports?to=9&from=1", Method::GET)).await;
    assert!(again.replayed, "{again:?}");
    let head = sent(&app, &read("/exports?from=1&to=9", Method::HEAD)).await;
    assert!(head.replayed && head.body.is_empty(), "{head:?}");
    assert_eq!(charges.count(), 1);
}

#[tokio::test]
async fn callers_from_the_auth_middleware_keep_their_keys_apart() {
    let (charges, store) = (Charges::default(), MockStore::new());
    let app = app(&charges, &store);
    let transfer = |user: &str, cents: u64| {
        TestRequest::post("/transfers")
            .key("t1")
            .header("x-user", user)
            .json(&serde_json::json!({ "cents": cents }))
    };
    assert_eq!(
        sent(&app, &transfer("1", 5)).await.body,
        "user 1 sent 5 (#1)"
    );
    assert!(sent(&app, &transfer("1", 5)).await.replayed);
    assert_eq!(
        sent(&app, &transfer("2", 5)).await.body,
        "user 2 sent 5 (#2)"
    );
    let in_test = TestRequest::post("/transfers")
        .key("t1")
        .extension(User { id: 1 })
        .json(&serde_json::json!({ "cents": 5 }));
    assert!(sent(&app, &in_test).await.replayed);
}
