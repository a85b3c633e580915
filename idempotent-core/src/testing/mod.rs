//! Test utilities (feature `test-util`): a mock store for handler unit
//! tests, a request builder to send them, and the contract suite every
//! store passes.
//!
//! A test sends each [`TestRequest`] through its `Router` with
//! `tower::ServiceExt::oneshot`, which axum does not re-export: add
//! `tower = { version = "0.5", features = ["util"] }` to the
//! `[dev-dependencies]`, beside this crate with `test-util`.

pub mod contract;
mod mock;

use axum::body::Body;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use serde::Serialize;

use crate::key::IDEMPOTENCY_KEY;
use crate::scope::ScopeDigest;

pub use mock::{ClaimOutcome, Fault, MockKey, MockStore, OpKind, Operation};

/// The header [`TestRequest::api_key`] sets: the one the `api_key` scope
/// reads unless the layer is given another
/// ([`IdempotencyBuilder::api_key_header`](crate::IdempotencyBuilder::api_key_header)).
const DEFAULT_API_KEY_HEADER: HeaderName = HeaderName::from_static("x-api-key");

/// A request to an idempotent endpoint, for a test to send through a
/// `Router` with `tower::ServiceExt::oneshot`: the `Idempotency-Key`, the
/// caller's API key and a JSON body, in one line each.
///
/// [`build`](Self::build) makes a new `Request` each time it is called,
/// so one `TestRequest` sends a first request and then its retries. Each
/// carries the `Content-Length` of its body, as an HTTP client sends it
/// (a request sent with `oneshot` has none unless it is set), so that a
/// test takes the path a client's requests take, exact repeats of a
/// replayed request (the README's "Exact repeats") included.
///
/// Anything the builder is given that HTTP cannot carry (a URI that does
/// not parse, a header name with a space, a value with a newline) is a
/// mistake in the test: it panics, at the caller's line, saying which.
///
// The example needs the attribute (feature `macros`).
#[cfg_attr(feature = "macros", doc = "```")]
#[cfg_attr(not(feature = "macros"), doc = "```ignore")]
/// use axum::{Json, Router, http::StatusCode, routing::post};
/// use idempotent_core::{IDEMPOTENT_REPLAYED, idempotent};
/// use idempotent_core::testing::{MockStore, TestRequest};
/// use serde_json::{Value, json};
/// use tower::ServiceExt; // oneshot
///
/// #[idempotent(ttl = "24h", scope = "api_key")]
/// async fn create_payment(Json(payment): Json<Value>) -> (StatusCode, Json<Value>) {
///     (StatusCode::CREATED, Json(payment))
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = MockStore::new();
/// let app = Router::new().route("/payments", post(create_payment)).layer(store.layer());
///
/// let payment = TestRequest::post("/payments")
///     .key("k1")
///     .api_key("sk_test_1")
///     .json(&json!({"amount": 100, "currency": "EUR"}));
/// let first = app.clone().oneshot(payment.build()).await.unwrap();
/// assert_eq!(first.status(), StatusCode::CREATED);
/// let retry = app.clone().oneshot(payment.build()).await.unwrap();
/// assert_eq!(retry.status(), StatusCode::CREATED);
/// assert_eq!(retry.headers()[IDEMPOTENT_REPLAYED], "true");
/// store.assert_executed_once();
///
/// // Without an API key, an `api_key`-scoped endpoint answers 401.
/// let anonymous = TestRequest::post("/payments").key("k2").json(&json!({"amount": 1}));
/// let refused = app.oneshot(anonymous.build()).await.unwrap();
/// assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a TestRequest sends nothing: `build` makes the request to send"]
pub struct TestRequest {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    extensions: Extensions,
    body: Bytes,
}

impl TestRequest {
    /// A `POST` to `uri`, with no header and an empty body.
    ///
    /// # Panics
    ///
    /// If `uri` is not a URI with a path (`/payments`, or
    /// `http://localhost/payments`).
    #[track_caller]
    pub fn post(uri: &str) -> Self {
        Self::new(Method::POST, uri)
    }

    /// A request of `method` (`PUT`, `PATCH`, `DELETE`...) to `uri`, with
    /// no header and an empty body.
    ///
    /// # Panics
    ///
    /// If `uri` is not a URI with a path (`/payments`, or
    /// `http://localhost/payments`).
    #[track_caller]
    pub fn new(method: Method, uri: &str) -> Self {
        let parsed: Uri = uri
            .parse()
            .unwrap_or_else(|error| panic!("TestRequest: `{uri}` is not a URI: {error}"));
        // A word without a slash parses too, as a host (`CONNECT`'s
        // authority form): its path is empty, and a router answers it 404,
        // which sends the test's author looking for a routing mistake.
        assert!(
            parsed.path().starts_with('/'),
            "TestRequest: `{uri}` has no path: a route's path starts with `/`, as `/{uri}` does"
        );
        Self {
            method,
            uri: parsed,
            headers: HeaderMap::new(),
            extensions: Extensions::new(),
            body: Bytes::new(),
        }
    }

    /// Sends `Idempotency-Key: key`, in place of any key given before.
    /// The value is sent as given, so a test of a malformed key (one too
    /// long, or empty) sends it here; two keys in one request are two
    /// [`header`](Self::header) calls.
    ///
    /// # Panics
    ///
    /// If `key` cannot be a header value (it holds a control character).
    #[track_caller]
    pub fn key(mut self, key: &str) -> Self {
        self.headers.insert(IDEMPOTENCY_KEY, header_value(key));
        self
    }

    /// Sends `X-Api-Key: api_key`, in place of any given before: the
    /// caller that an endpoint of the default `scope = "api_key"` keeps
    /// keys apart for (a request without one is answered 401). A layer
    /// given another header with
    /// [`api_key_header`](crate::IdempotencyBuilder::api_key_header)
    /// needs that one, with [`header`](Self::header); a
    /// `Authorization: Bearer` token names the same caller as its
    /// `X-Api-Key`.
    ///
    /// # Panics
    ///
    /// If `api_key` cannot be a header value (it holds a control
    /// character).
    #[track_caller]
    pub fn api_key(mut self, api_key: &str) -> Self {
        let value = header_value(api_key);
        self.headers.insert(DEFAULT_API_KEY_HEADER, value);
        self
    }

    /// Adds the header `name: value`, after any of that name given before:
    /// a scope's header (`x-tenant-id`), credentials, or a second field of
    /// one name.
    ///
    /// # Panics
    ///
    /// If `name` is not a header name or `value` cannot be a header value.
    #[track_caller]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        let name = HeaderName::try_from(name)
            .unwrap_or_else(|error| panic!("TestRequest: `{name}` is not a header name: {error}"));
        self.headers.append(name, header_value(value));
        self
    }

    /// Puts `value` in the request's extensions, in place of any of its
    /// type given before: what a middleware in front of the handler leaves
    /// there, which a test of the route alone does not run, such as the
    /// caller an endpoint with `scope = User` takes as `Extension<User>`
    /// (its records are found with `ScopeDigest::custom(&user)`).
    pub fn extension<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.extensions.insert(value);
        self
    }

    /// Sends `body` as JSON, with `Content-Type: application/json`.
    ///
    /// # Panics
    ///
    /// If `body` does not serialize to JSON (a map with keys that are
    /// not strings).
    #[track_caller]
    pub fn json(mut self, body: &impl Serialize) -> Self {
        let json = serde_json::to_vec(body)
            .unwrap_or_else(|error| panic!("TestRequest: the body is not JSON: {error}"));
        let json_type = HeaderValue::from_static("application/json");
        self.headers.insert(CONTENT_TYPE, json_type);
        self.body = Bytes::from(json);
        self
    }

    /// Sends `body` as it is, with whatever `Content-Type` was given (with
    /// [`header`](Self::header)), or none: e.g. JSON that does not parse.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// The caller this request names to an endpoint of the default
    /// `scope = "api_key"`, as a layer with the default `api_key_header`
    /// finds it: its `X-Api-Key`, or else its `Authorization: Bearer`
    /// token or `Basic` credentials. It is the scope to give
    /// [`MockStore::stored_response`] for what its retries are replayed,
    /// and the only way to name a caller that sends `Basic` credentials
    /// (Stripe-style clients, `curl -u sk_test_1:`), a caller apart from
    /// the same key sent as `X-Api-Key`.
    ///
    /// # Panics
    ///
    /// If the request names no caller (the endpoint would answer it 401),
    /// or sends one of those headers twice (400).
    #[track_caller]
    #[must_use]
    pub fn api_key_scope(&self) -> ScopeDigest {
        crate::scope::api_key(&self.headers, &DEFAULT_API_KEY_HEADER).unwrap_or_else(|refused| {
            panic!(
                "TestRequest: the request names no caller of the `api_key` scope: {}",
                refused.detail
            )
        })
    }

    /// The request, with the extensions given and the `Content-Length` of
    /// its body unless one was given: a new one each call, so that a test
    /// sends the same request again as a client's retry does.
    #[must_use]
    pub fn build(&self) -> Request<Body> {
        let mut request = Request::new(Body::from(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        *request.extensions_mut() = self.extensions.clone();
        request
            .headers_mut()
            .entry(CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(self.body.len()));
        request
    }
}

#[track_caller]
fn header_value(value: &str) -> HeaderValue {
    HeaderValue::try_from(value)
        .unwrap_or_else(|error| panic!("TestRequest: {value:?} cannot be a header value: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(request: &'a Request<Body>, name: &str) -> Vec<&'a str> {
        let values = request.headers().get_all(name).iter();
        values.map(|value| value.to_str().unwrap()).collect()
    }

    #[test]
    fn a_json_request_carries_its_key_caller_type_and_length() {
        let request = TestRequest::post("/payments")
            .key("k1")
            .api_key("sk_test_1")
            .json(&serde_json::json!({"amount": 100}))
            .build();
        assert_eq!(request.method(), Method::POST);
        assert_eq!(request.uri(), "/payments");
        assert_eq!(header(&request, "idempotency-key"), ["k1"]);
        assert_eq!(header(&request, "x-api-key"), ["sk_test_1"]);
        assert_eq!(header(&request, "content-type"), ["application/json"]);
        assert_eq!(header(&request, "content-length"), ["14"]);
    }

    #[test]
    fn a_second_key_replaces_the_first_and_a_second_header_is_added() {
        let request = TestRequest::new(Method::PUT, "/payments/7")
            .key("first")
            .key("second")
            .header("x-tag", "a")
            .header("x-tag", "b")
            .build();
        assert_eq!(request.method(), Method::PUT);
        assert_eq!(header(&request, "idempotency-key"), ["second"]);
        assert_eq!(header(&request, "x-tag"), ["a", "b"]);
        assert_eq!(header(&request, "content-length"), ["0"]);
    }

    #[test]
    fn every_request_carries_the_extensions_given() {
        #[derive(Clone, Debug, PartialEq)]
        struct User(u64);
        let retried = TestRequest::post("/p")
            .extension(User(1))
            .extension(User(7));
        for request in [retried.build(), retried.build()] {
            assert_eq!(request.extensions().get::<User>(), Some(&User(7)));
        }
    }

    #[test]
    fn a_content_length_given_is_kept() {
        let request = TestRequest::post("/p")
            .header("content-length", "99")
            .body("{}")
            .build();
        assert_eq!(header(&request, "content-length"), ["99"]);
        assert!(header(&request, "content-type").is_empty());
    }

    #[test]
    #[should_panic(expected = "cannot be a header value")]
    fn a_key_http_cannot_carry_is_refused_at_the_call() {
        let _ = TestRequest::post("/p").key("k\n1");
    }

    #[test]
    #[should_panic(expected = "is not a URI")]
    fn a_uri_that_does_not_parse_is_refused_at_the_call() {
        let _ = TestRequest::post("/p q");
    }

    /// `payments` parses as a host, with no path: sent, a router answers
    /// it 404, and nothing says the slash is missing.
    #[test]
    #[should_panic(expected = "`payments` has no path: a route's path starts with `/`")]
    fn a_path_without_its_slash_is_refused_at_the_call() {
        let _ = TestRequest::post("payments");
    }

    #[test]
    fn an_absolute_uri_is_taken() {
        let request = TestRequest::post("http://localhost/payments?x=1").build();
        assert_eq!(request.uri().path(), "/payments");
        assert_eq!(request.uri().query(), Some("x=1"));
    }
}
