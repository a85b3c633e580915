//! The HTTP contract as a client meets it: what each malformed key's
//! problem tells the client to do, and that doing it works.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower::ServiceExt;

mod macro_support;
use macro_support::Runs;

#[derive(Serialize, Deserialize)]
struct Charge {
    amount: u64,
}

#[idempotent(scope = "global")]
async fn charge(State(runs): State<Runs>, Json(c): Json<Charge>) -> (StatusCode, Json<Value>) {
    let run = runs.bump();
    (
        StatusCode::CREATED,
        Json(json!({"run": run, "amount": c.amount})),
    )
}

fn charges(runs: &Runs) -> Router {
    Router::new()
        .route("/charges", post(charge))
        .with_state(runs.clone())
        .layer(Idempotency::new(MemoryStore::new()))
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    /// The detail of the library's `invalid-key` problem.
    fn invalid_key_detail(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        assert_eq!(self.status, StatusCode::BAD_REQUEST, "{text}");
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "{text}"
        );
        let problem: Value = serde_json::from_slice(&self.body).expect("a JSON problem");
        assert_eq!(problem["type"], "urn:idempotent:invalid-key", "{problem}");
        problem["detail"].as_str().expect("a detail").to_owned()
    }
}

async fn send(app: &Router, key: &str) -> Reply {
    let request = Request::post("/charges")
        .header("content-type", "application/json")
        .header(
            "idempotency-key",
            HeaderValue::from_bytes(key.as_bytes()).unwrap(),
        )
        .body(Body::from(r#"{"amount":1}"#))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// `key` as an RFC 8941 string: quoted, `"` and `\\` escaped.
fn quoted(key: &str) -> String {
    format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A key with a space, a `"` or a comma is valid, only not in the bare
/// form. The 400 says so and shows the quoted form, instead of calling
/// the key's characters wrong (a space and `"` are printable ASCII, and a
/// single field with a comma is not two keys); the key quoted as it says
/// is accepted, runs once and is replayed.
#[tokio::test]
async fn a_key_only_the_quoted_form_carries_is_refused_with_the_form_to_send_instead() {
    for (bare, byte) in [
        ("order 42", "0x20"),
        (r#"say"hi""#, "0x22"),
        (r"a\b c", "0x20"),
        ("order,42", "comma"),
    ] {
        let runs = Runs::default();
        let app = charges(&runs);
        let detail = send(&app, bare).await.invalid_key_detail();
        assert!(detail.contains(byte), "{bare:?}: {detail}");
        assert!(
            detail.contains("quoted") && detail.contains("`Idempotency-Key: \""),
            "{bare:?}: {detail}"
        );
        assert!(!detail.contains("keys are printable ASCII"), "{detail}");
        let first = send(&app, &quoted(bare)).await;
        assert_eq!(first.status, StatusCode::CREATED, "{bare:?}");
        let retry = send(&app, &quoted(bare)).await;
        assert!(
            retry.headers.contains_key("idempotent-replayed"),
            "{bare:?}"
        );
        assert_eq!(runs.get(), 1, "{bare:?}");
    }
}

/// A byte no form of the key carries is named as such.
#[tokio::test]
async fn a_key_outside_printable_ascii_is_refused_as_such() {
    let runs = Runs::default();
    let app = charges(&runs);
    for key in ["cl\u{e9}", "\"cl\u{e9}\""] {
        let detail = send(&app, key).await.invalid_key_detail();
        assert!(
            detail.contains("0xc3") && detail.contains("printable ASCII"),
            "{key:?}: {detail}"
        );
        assert!(!detail.contains("quoted"), "{key:?}: {detail}");
    }
    assert_eq!(runs.get(), 0);
}
