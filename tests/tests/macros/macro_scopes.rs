//! Whose key it is, observed through a `Router`: two callers that send the
//! same `Idempotency-Key` never share a scope, and one caller's retry of
//! one request never gets a second one.

use crate::macro_support;

use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Request, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{
    Endpoint, Idempotency, IdempotencyScope, IdempotentLayer, IdempotentRequest, Scope, idempotent,
};
use macro_support::{Runs, send};

/// A keyed POST with `headers`, whose values may be any bytes a header
/// value can hold (obs-text included).
fn request(uri: &str, key: &str, headers: &[(&str, &[u8])]) -> Request<Body> {
    let mut request = Request::post(uri)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Body::from("1"))
        .unwrap();
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
        let value = HeaderValue::from_bytes(value).unwrap();
        request.headers_mut().append(name, value);
    }
    request
}

/// The body of the run that answered `headers` at `uri` with key `k`.
async fn answer(app: &Router, uri: &str, headers: &[(&str, &[u8])]) -> String {
    let reply = send(app, request(uri, "k", headers)).await;
    assert_eq!(reply.status, StatusCode::OK, "{headers:?}: {}", reply.body);
    reply.body
}

fn app_with(routes: Router<Runs>, runs: &Runs, idempotency: Idempotency) -> Router {
    routes.with_state(runs.clone()).layer(idempotency)
}

fn app(routes: Router<Runs>, runs: &Runs) -> Router {
    app_with(routes, runs, Idempotency::new(MemoryStore::new()))
}

// ===== api_key =====

#[idempotent(scope = "api_key")]
async fn by_api_key(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
    format!("{}:{n}", runs.bump())
}

fn api_key_app(runs: &Runs) -> Router {
    app(Router::new().route("/a", post(by_api_key)), runs)
}

#[tokio::test]
async fn one_api_key_is_one_caller_however_it_is_sent() {
    let runs = Runs::default();
    let app = api_key_app(&runs);
    assert_eq!(answer(&app, "/a", &[("x-api-key", b"sk_1")]).await, "1:1");
    for sent in [
        ("authorization", b"Bearer sk_1".as_slice()),
        ("authorization", b"bearer sk_1"),
        ("authorization", b"BEARER sk_1"),
        ("authorization", b"Bearer   sk_1"),
        ("authorization", b"Bearer sk_1 \t"),
        // The padding around a field value is not part of it.
        ("x-api-key", b"sk_1 "),
        ("x-api-key", b"\t sk_1\t"),
    ] {
        let reply = send(&app, request("/a", "k", &[sent])).await;
        assert!(reply.replayed, "{sent:?}: {reply:?}");
        assert_eq!(reply.body, "1:1", "{sent:?}");
    }
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn different_credentials_are_different_callers() {
    let runs = Runs::default();
    let app = api_key_app(&runs);
    let callers: [(&str, &[u8]); 9] = [
        ("x-api-key", b"sk_1"),
        // Keys are compared as sent: case tells them apart.
        ("x-api-key", b"SK_1"),
        ("authorization", b"Bearer sk_2"),
        // `curl -u sk_1:`: Basic credentials are a caller apart from any
        // bearer token, the same key's included.
        ("authorization", b"Basic c2tfMTo="),
        ("authorization", b"Basic c2tfMjo="),
        // Two `Authorization` fields a proxy joined into one: neither's.
        ("authorization", b"Bearer sk_1, Bearer sk_2"),
        ("x-api-key", b"sk_1, sk_2"),
        // obs-text, in two encodings of one text: bytes, not text, count.
        ("authorization", b"Bearer caf\xe9"),
        ("authorization", b"Bearer caf\xc3\xa9"),
    ];
    for (run, caller) in callers.iter().enumerate() {
        let body = answer(&app, "/a", &[*caller]).await;
        assert_eq!(body, format!("{}:1", run + 1), "{caller:?}");
    }
    // Each is still its own caller: a retry replays its own run.
    for (run, caller) in callers.iter().enumerate() {
        let reply = send(&app, request("/a", "k", &[*caller])).await;
        assert!(reply.replayed, "{caller:?}");
        assert_eq!(reply.body, format!("{}:1", run + 1), "{caller:?}");
    }
    assert_eq!(runs.get(), callers.len());
}

#[tokio::test]
async fn credentials_that_name_no_caller_are_refused_before_anything_runs() {
    let runs = Runs::default();
    let app = api_key_app(&runs);
    let unauthorized: [&[(&str, &[u8])]; 11] = [
        &[],
        &[("authorization", b"Bearer")],
        &[("authorization", b"Bearer ")],
        &[("authorization", b"Bearer \t ")],
        // RFC 9110 puts one space after the scheme, not a tab.
        &[("authorization", b"Bearer\tsk_1")],
        &[("authorization", b"Digest sk_1")],
        &[("authorization", b"Token sk_1")],
        &[("authorization", b"")],
        &[("x-api-key", b"")],
        &[("x-api-key", b"  ")],
        &[("x-api-key", b" \t"), ("authorization", b"Bearer ")],
    ];
    for headers in unauthorized {
        let reply = send(&app, request("/a", "k", headers)).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Bearer"),
            "{headers:?}"
        );
    }
    let repeated: [&[(&str, &[u8])]; 2] = [
        &[("x-api-key", b"sk_1"), ("x-api-key", b"sk_2")],
        &[
            ("authorization", b"Bearer sk_1"),
            ("authorization", b"Bearer sk_2"),
        ],
    ];
    for headers in repeated {
        let reply = send(&app, request("/a", "k", headers)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{headers:?}");
        assert!(reply.body.contains("invalid-scope"), "{}", reply.body);
    }
    assert_eq!(runs.get(), 0);
}

/// `Authorization: Basic` credentials with neither a user name nor a
/// password (`curl -u :`, base64 of `:`, however it is padded) name no
/// one: taken as sent, every client that sends them would be one caller,
/// replayed the others' responses. They are refused as no credential at
/// all, by the attribute and by a hand-written `Scope::ApiKey` alike.
#[tokio::test]
async fn basic_credentials_without_user_or_password_are_refused() {
    let runs = Runs::default();
    let layered = Endpoint::new("layered").scope(Scope::ApiKey);
    let routes = Router::new().route("/a", post(by_api_key)).route(
        "/l",
        post(by_hand).route_layer(IdempotentLayer::new(layered)),
    );
    let app = app(routes, &runs);
    for empty in [
        b"Basic Og==".as_slice(),
        b"Basic Og",
        b"basic  Og= ",
        b"Basic ICA6",
    ] {
        for uri in ["/a", "/l"] {
            let reply = send(&app, request(uri, "k", &[("authorization", empty)])).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{uri} {empty:?}");
            assert!(
                reply.body.contains("urn:idempotent:missing-credentials"),
                "{}",
                reply.body
            );
            assert!(reply.body.contains("empty"), "{}", reply.body);
            assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        }
    }
    assert_eq!(runs.get(), 0);
    // A key sent as the password, with no user name (`curl -u :sk_1`),
    // names its caller, another key another.
    let first = [("authorization", b"Basic OnNrXzE=".as_slice())];
    let second = [("authorization", b"Basic OnNrXzI=".as_slice())];
    assert_eq!(answer(&app, "/a", &first).await, "1:1");
    assert_eq!(answer(&app, "/a", &second).await, "2:1");
    assert!(send(&app, request("/a", "k", &first)).await.replayed);
}

async fn by_hand(State(runs): State<Runs>) -> String {
    format!("{}:1", runs.bump())
}

#[tokio::test]
async fn a_blank_api_key_header_does_not_make_its_senders_one_caller() {
    let runs = Runs::default();
    let app = api_key_app(&runs);
    let ann: [(&str, &[u8]); 2] = [("x-api-key", b" "), ("authorization", b"Bearer ann")];
    let ben: [(&str, &[u8]); 2] = [("x-api-key", b" "), ("authorization", b"Bearer ben")];
    assert_eq!(answer(&app, "/a", &ann).await, "1:1");
    let reply = send(&app, request("/a", "k", &ben)).await;
    assert!(
        !reply.replayed,
        "ben was replayed ann's response: {reply:?}"
    );
    assert_eq!(reply.body, "2:1");
    // Each one's bearer token names it, as it would alone or beside
    // another blank.
    let alone = [("authorization", b"Bearer ann".as_slice())];
    assert_eq!(answer(&app, "/a", &alone).await, "1:1");
    let tab: [(&str, &[u8]); 2] = [("x-api-key", b"\t"), ("authorization", b"Bearer ben")];
    assert_eq!(answer(&app, "/a", &tab).await, "2:1");
    assert_eq!(runs.get(), 2);
}

/// The documented precedence, and why README warns about it: the API-key
/// header names the caller whatever `Authorization` says.
#[tokio::test]
async fn the_api_key_header_wins_over_authorization() {
    let runs = Runs::default();
    let app = api_key_app(&runs);
    let ann: [(&str, &[u8]); 2] = [("x-api-key", b"app"), ("authorization", b"Bearer ann")];
    let ben: [(&str, &[u8]); 2] = [("x-api-key", b"app"), ("authorization", b"Bearer ben")];
    assert_eq!(answer(&app, "/a", &ann).await, "1:1");
    assert!(send(&app, request("/a", "k", &ben)).await.replayed);
    assert_eq!(runs.get(), 1);
}

#[tokio::test]
async fn a_configured_api_key_header_replaces_x_api_key() {
    let runs = Runs::default();
    let idempotency = Idempotency::builder(MemoryStore::new())
        .api_key_header(HeaderName::from_static("x-client-key"))
        .build();
    let app = app_with(
        Router::new().route("/a", post(by_api_key)),
        &runs,
        idempotency,
    );
    assert_eq!(answer(&app, "/a", &[("x-client-key", b"k1")]).await, "1:1");
    let bearer = [("authorization", b"Bearer k1".as_slice())];
    assert!(send(&app, request("/a", "k", &bearer)).await.replayed);
    // `X-Api-Key` is not read any more: neither alone nor beside it.
    let old = send(&app, request("/a", "k", &[("x-api-key", b"k1")])).await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    let both: [(&str, &[u8]); 2] = [("x-api-key", b"k2"), ("x-client-key", b"k1")];
    assert!(send(&app, request("/a", "k", &both)).await.replayed);
    let twice: [(&str, &[u8]); 2] = [("x-client-key", b"k1"), ("x-client-key", b"k2")];
    let refused = send(&app, request("/a", "k", &twice)).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(runs.get(), 1);
}

/// `Authorization` itself as the API-key header: its value is the key,
/// whole, but a scheme with nothing after it (a `Bearer ${KEY}` template
/// whose key was never set) or `Basic` credentials that name no one are
/// no key, and do not make their senders one caller.
#[tokio::test]
async fn an_authorization_api_key_header_without_a_credential_is_refused() {
    let runs = Runs::default();
    let idempotency = Idempotency::builder(MemoryStore::new())
        .api_key_header(HeaderName::from_static("authorization"))
        .build();
    let app = app_with(
        Router::new().route("/a", post(by_api_key)),
        &runs,
        idempotency,
    );
    for empty in [b"Bearer ".as_slice(), b"Bearer", b"Basic Og=="] {
        let reply = send(&app, request("/a", "k", &[("authorization", empty)])).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{empty:?}");
        assert!(
            reply.body.contains("urn:idempotent:missing-credentials"),
            "{}",
            reply.body
        );
    }
    assert_eq!(runs.get(), 0);
    let raw = [("authorization", b"sk_1".as_slice())];
    assert_eq!(answer(&app, "/a", &raw).await, "1:1");
    assert!(send(&app, request("/a", "k", &raw)).await.replayed);
}

// ===== header:<name> =====

#[idempotent(scope = "header:x-tenant-id")]
async fn by_tenant(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
    format!("{}:{n}", runs.bump())
}

#[tokio::test]
async fn a_scope_header_names_one_tenant_by_its_value() {
    let runs = Runs::default();
    let app = app(Router::new().route("/t", post(by_tenant)), &runs);
    assert_eq!(answer(&app, "/t", &[("x-tenant-id", b"acme")]).await, "1:1");
    for padded in [b"acme ".as_slice(), b"\tacme", b" acme \t"] {
        let reply = send(&app, request("/t", "k", &[("x-tenant-id", padded)])).await;
        assert!(reply.replayed, "{padded:?}: {reply:?}");
    }
    // Values are compared as sent: case tells tenants apart, and a proxy's
    // join of two fields is neither's.
    assert_eq!(answer(&app, "/t", &[("X-Tenant-Id", b"ACME")]).await, "2:1");
    let joined = [("x-tenant-id", b"acme, evil".as_slice())];
    assert_eq!(answer(&app, "/t", &joined).await, "3:1");
    assert_eq!(runs.get(), 3);
}

#[tokio::test]
async fn a_missing_blank_or_repeated_scope_header_is_refused() {
    let runs = Runs::default();
    let app = app(Router::new().route("/t", post(by_tenant)), &runs);
    let refused: [&[(&str, &[u8])]; 5] = [
        &[],
        &[("x-tenant-id", b"")],
        &[("x-tenant-id", b"  ")],
        &[("x-tenant-id", b"\t")],
        &[("x-tenant-id", b"evil"), ("x-tenant-id", b"acme")],
    ];
    for headers in refused {
        let reply = send(&app, request("/t", "k", headers)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{headers:?}");
        assert!(reply.body.contains("invalid-scope"), "{}", reply.body);
    }
    assert_eq!(runs.get(), 0);
}

// ===== a principal =====

/// The authenticated caller from `X-User`; a request without one is a
/// guest, whose id is empty.
struct Visitor(String);

impl<S: Send + Sync> FromRequestParts<S> for Visitor {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let user = parts.headers.get("x-user").map(HeaderValue::to_str);
        let user = user.transpose().map_err(|_| StatusCode::FORBIDDEN)?;
        Ok(Self(user.unwrap_or_default().to_owned()))
    }
}

impl IdempotencyScope for Visitor {
    fn scope_id(&self) -> impl AsRef<[u8]> {
        self.0.clone()
    }
}

#[idempotent(scope = Visitor)]
async fn by_visitor(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
    format!("{}:{n}", runs.bump())
}

#[tokio::test]
async fn a_principal_with_an_empty_id_names_no_caller() {
    let runs = Runs::default();
    let app = app(Router::new().route("/v", post(by_visitor)), &runs);
    for guest in [&[][..], &[("x-user", b"".as_slice())]] {
        let reply = send(&app, request("/v", "k", guest)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
        assert!(reply.body.contains("invalid-scope"), "{}", reply.body);
        assert!(reply.body.contains("empty id"), "{}", reply.body);
    }
    assert_eq!(runs.get(), 0);
    // A principal with an id is served as before.
    assert_eq!(answer(&app, "/v", &[("x-user", b"ann")]).await, "1:1");
    assert_eq!(answer(&app, "/v", &[("x-user", b"ben")]).await, "2:1");
}

#[tokio::test]
async fn a_principal_rejected_claims_nothing() {
    let runs = Runs::default();
    let app = app(Router::new().route("/v", post(by_visitor)), &runs);
    let rejected = send(&app, request("/v", "k", &[("x-user", b"caf\xe9")])).await;
    assert_eq!(rejected.status, StatusCode::FORBIDDEN);
    assert_eq!(runs.get(), 0);
    // The key was not claimed: the caller's next attempt runs.
    let reply = send(&app, request("/v", "k", &[("x-user", b"cafe")])).await;
    assert_eq!((reply.status, reply.replayed), (StatusCode::OK, false));
    assert_eq!(runs.get(), 1);
}

/// `Visitor` scoping by hand, as the attribute's `scope = Visitor` does.
const BY_VISITOR: Endpoint = Endpoint::new("by_visitor_by_hand").scope(Scope::Custom);

async fn by_visitor_by_hand(
    visitor: Visitor,
    idempotency: IdempotentRequest,
    State(runs): State<Runs>,
) -> Response {
    let fingerprint = BY_VISITOR.fingerprint(&());
    idempotency
        .scoped_by(&visitor)
        .run(&BY_VISITOR, fingerprint, async move {
            format!("{}:1", runs.bump())
        })
        .await
}

/// A key sent under another header's name (`X-Idempotency-Key`) is named
/// in the 400 whichever way the principal scopes it: by the attribute, or
/// by hand with `scoped_by`, which must not lose the request's headers
/// before the missing key is told.
#[tokio::test]
async fn a_key_sent_under_another_name_is_named_when_a_principal_scopes_it() {
    let runs = Runs::default();
    let routes = Router::new()
        .route("/v", post(by_visitor))
        .route("/h", post(by_visitor_by_hand));
    let app = app(routes, &runs);
    for uri in ["/v", "/h"] {
        let request = Request::post(uri)
            .header("content-type", "application/json")
            .header("x-idempotency-key", "k")
            .header("x-user", "ann")
            .body(Body::from("1"))
            .unwrap();
        let reply = send(&app, request).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{uri}: {reply:?}");
        assert!(reply.body.contains("missing-key"), "{uri}: {}", reply.body);
        assert!(
            reply.body.contains("but has `x-idempotency-key`"),
            "{uri}: {}",
            reply.body
        );
    }
    assert_eq!(runs.get(), 0);
}

// ===== global =====

#[idempotent(scope = "global")]
async fn shared(State(runs): State<Runs>, Json(n): Json<u32>) -> String {
    format!("{}:{n}", runs.bump())
}

#[tokio::test]
async fn the_global_scope_is_one_key_space_whatever_the_credentials() {
    let runs = Runs::default();
    let app = app(Router::new().route("/g", post(shared)), &runs);
    assert_eq!(answer(&app, "/g", &[("x-api-key", b"sk_1")]).await, "1:1");
    for other in [&[("x-api-key", b"sk_2".as_slice())][..], &[]] {
        assert!(send(&app, request("/g", "k", other)).await.replayed);
    }
    assert_eq!(runs.get(), 1);
}

// ===== the key =====

#[tokio::test]
async fn keys_are_equal_only_as_one_field_value() {
    let runs = Runs::default();
    let app = app(Router::new().route("/g", post(shared)), &runs);
    let first = send(&app, request("/g", "k", &[])).await;
    assert_eq!(first.body, "1:1");
    // The padding around the field, and the RFC 8941 string form of the
    // same key, are the same key.
    for same in [" k\t", "\"k\"", " \"k\" "] {
        let reply = send(&app, request("/g", same, &[])).await;
        assert!(reply.replayed, "{same:?}: {reply:?}");
    }
    // Case and the spaces inside quotes make another key.
    for (run, other) in ["K", "\"k \"", "\" k\""].into_iter().enumerate() {
        let reply = send(&app, request("/g", other, &[])).await;
        assert_eq!(reply.body, format!("{}:1", run + 2), "{other:?}");
    }
    // Two keys joined by a proxy, or sent as two fields, are refused.
    for joined in ["k, K", "k,K", "\"k\", \"K\""] {
        let reply = send(&app, request("/g", joined, &[])).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{joined:?}");
        assert!(reply.body.contains("invalid-key"), "{}", reply.body);
    }
    let mut twice = request("/g", "k", &[]);
    twice
        .headers_mut()
        .append("idempotency-key", HeaderValue::from_static("K"));
    assert_eq!(send(&app, twice).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(runs.get(), 4);
}
