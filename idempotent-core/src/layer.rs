//! A tower middleware that runs the same engine as `#[idempotent]`, for
//! routes whose handlers you cannot or do not want to annotate.
//!
//! Without typed inputs to hash, it fingerprints the raw request: method,
//! path, path parameters (a nested router's prefix is no longer in the
//! path, but its parameters are), query, body bytes and the headers that
//! say how to read them, `Content-Type` and `Content-Encoding`
//! ([`IdempotentLayer`] says exactly how). Two JSON bodies that differ
//! only in field order or whitespace therefore count as different payloads
//! here (422), unlike with the attribute. The body is buffered, up to a
//! limit.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, GetAll};
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Serialize;
use serde::ser::{SerializeTuple, Serializer};
use tower_layer::Layer;
use tower_service::Service;

use crate::endpoint::Endpoint;
use crate::engine::resolve_scope;
use crate::fingerprint::{Fingerprint, FingerprintError, RawBytes};
use crate::problem::{Problem, ProblemKind};
use crate::record::RecordKey;
use crate::replay::unstored_if_bodiless;
use crate::request::{
    IdempotentRequest, ScopeSource, fingerprinted_method, route_params, without_replay_marker,
};
use crate::whole_body::{self, CutShort};

/// Default limit on a buffered request body: 1 MiB.
const DEFAULT_MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Marks a request whose key an [`IdempotentLayer`] claims, with the
/// layer's endpoint name. An idempotent handler beneath the layer would
/// claim the same key again under its own fingerprint, find the layer's
/// claim in flight and answer 422, which the layer would store: the engine
/// refuses such a handler with a 500 that names both endpoints instead.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claimed(pub(crate) &'static str);

/// Applies an [`Endpoint`] policy to a route, fingerprinting raw requests.
///
/// Use it or `#[idempotent]` (or [`IdempotentRequest`]) on a route, not
/// both: a handler made idempotent beneath this layer is answered 500
/// (`not-configured`).
///
/// The router still needs the [`Idempotency`](crate::Idempotency) layer,
/// which must wrap this one (add it to the router after the route). Add it
/// with `route_layer`, on the method router or on the `Router` after its
/// routes. Only on the method router does it wrap the handlers alone: axum
/// applies `Router::route_layer`, and `layer` on a method router, to each
/// route's whole method router, its answer to other methods included, so
/// there a `DELETE` without a key to a route without a `DELETE` handler gets 400
/// `missing-key` instead of 405 (the layer cannot know, without running
/// it, that the request reaches no handler; with a key it gets the 405,
/// which is not stored). `layer` on the `Router`, like wrapping the whole
/// router, also wraps its fallback, so a request to a path without a route
/// would store its 404 under its key and the retry sent to the right path
/// would be refused as a reused key (422). Requests with a safe method (`GET`,
/// `HEAD`, `OPTIONS`, `TRACE`) and no key pass through as they came, so
/// the layer can cover a router's reads and CORS preflights too. So does a
/// `CONNECT`, keyed or not: it opens a tunnel (a WebSocket over HTTP/2
/// opens with one, where HTTP/1.1 sends a `GET`), which flows only once
/// it is answered, and which no stored answer could open again.
///
/// The layer claims the key before the handler's extractors run, so it
/// cannot tell their rejections from the handler's answers: a body that
/// `Json` refuses with 400 (malformed) or 422 (wrong shape) is stored under
/// its key like any 4xx, and a retry with the body fixed gets 422
/// `key-reused`. (415 and 413 are not stored.) With `#[idempotent]`, a
/// rejected request claims nothing.
///
/// Layers that make the response depend on request headers the fingerprint
/// does not cover, such as compression (`Accept-Encoding`) or CORS
/// (`Origin`), go outside this one (added after it): inside, the response
/// as the first request got it, gzip bytes or one origin's
/// `Access-Control-Allow-Origin`, would be stored and replayed to every
/// retry, whatever the retry accepts. Timeouts go outside too: one inside
/// answers 408, which releases the key while the handler it cancelled may
/// already have acted. So does authentication: inside, a replay is
/// answered before it runs, and on an endpoint not scoped by the
/// credential ([`Scope::Header`](crate::Scope::Header),
/// [`Scope::Global`](crate::Scope::Global)) a caller without a token gets
/// the stored response. A concurrency limit is the exception: inside, its
/// permit goes with a run that outlives its request; outside, a dropped
/// request frees its permit while its handler runs on.
///
/// A nested router's static prefix is not in the path this layer sees:
/// one router nested at two prefixes (`/sandbox`, `/live`) shares its keys
/// between them, and a retry at one would be answered with the other's
/// response. Give each nesting an endpoint name of its own.
///
/// # What the fingerprint covers
///
/// A retry is replayed only if all of these match the first request's;
/// any difference is another request, answered 422 (`key-reused`):
///
/// - the endpoint's name;
/// - the method, with `HEAD` counted as `GET`, as the attribute counts
///   it: axum serves a `HEAD` by the `GET` handler, so a `HEAD` after a
///   `GET` with one key is the `GET`'s replay (axum drops its body), and
///   a `GET` after a `HEAD` the replay of the `GET` handler's whole
///   response that the `HEAD` ran. A `HEAD`'s response without a body is
///   not stored, so the `GET` after it runs: it may be an explicit `head`
///   handler's, or one axum already took the body off (a layer around a
///   whole `Router`), which replayed to a `GET` would be an empty body
///   (so a `GET` handler's own empty answer to a `HEAD` is not stored
///   either);
/// - the URI's path as this layer sees it (without a nested router's
///   prefix), byte for byte: `%7E` is not `~`;
/// - the matched route's path parameters, names and decoded values, a
///   nested router's prefix's included;
/// - the query string byte for byte, parameter order included (`?` with
///   nothing after it is not the same as no `?`);
/// - the body's bytes, exactly as they arrived (still compressed if they
///   came compressed);
/// - every `Content-Type` and `Content-Encoding` line, in order, byte for
///   byte: the same bytes as JSON and as a form, in two charsets, or
///   gzipped and not, are different requests to the handler. A retry
///   resends the headers its first attempt sent; a client that spells
///   them differently between attempts (`application/json` then
///   `Application/JSON`) gets 422, as it does for a body with its fields
///   reordered.
///
/// Nothing else is: not `Accept`, `Accept-Language`, `Host` or any other
/// header (the scope's header, if any, keys the record, and the key
/// itself names it), the HTTP version, or the trailers (which the handler
/// beneath this layer does not get). A handler whose answer depends on a
/// header beyond those two should be made idempotent with `#[idempotent]`
/// and an extractor of that header that implements
/// [`FingerprintInput`](crate::FingerprintInput). A decompression layer
/// outside this one hands it the decompressed bytes and no
/// `Content-Encoding`: two compressions of one payload then match.
///
/// Upgrading: earlier versions fingerprinted a `HEAD` as `HEAD`, so a
/// `HEAD` retried across the upgrade after a keyed `HEAD` they stored
/// gets 422 (a `HEAD` after a `GET` they stored is replayed). They also
/// did not fingerprint `Content-Type` or `Content-Encoding`. A request
/// with neither keeps the fingerprint they stored, but one with either
/// does not: a retry of such a request whose first attempt was stored by
/// an earlier version is answered 422 (`key-reused`), until that record
/// expires ([`Endpoint::ttl`]), instead of being replayed; its handler
/// does not run again. Upgrade when no
/// such retry can be pending, or tell clients that in that window a 422
/// `key-reused` for a retry sent unchanged means the first attempt's
/// answer was stored, not that the payload differed.
///
/// ```
/// use axum::{Router, routing::post};
/// use idempotent_core::{Endpoint, Idempotency, IdempotentLayer, store::MemoryStore};
///
/// # async fn create_order() {}
/// let app: Router = Router::new()
///     .route("/orders", post(create_order).route_layer(IdempotentLayer::new(Endpoint::new("create_order"))))
///     .layer(Idempotency::new(MemoryStore::new()));
/// ```
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct IdempotentLayer {
    endpoint: Endpoint,
    max_request_bytes: usize,
}

impl IdempotentLayer {
    /// A layer applying `endpoint`'s policy. Its scope is resolved from the
    /// request's headers, so `Scope::Custom`, whose principal comes from the
    /// handler's own extractor, is not available here: such a layer answers
    /// every keyed request 500 (`not-configured`).
    pub const fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }

    /// Requests with larger bodies are refused with 413 (default 1 MiB).
    pub const fn max_request_bytes(mut self, limit: usize) -> Self {
        self.max_request_bytes = limit;
        self
    }
}

impl<S> Layer<S> for IdempotentLayer {
    type Service = IdempotentService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotentService {
            inner,
            config: *self,
        }
    }
}

/// The service [`IdempotentLayer`] produces.
#[derive(Debug, Clone)]
pub struct IdempotentService<S> {
    inner: S,
    config: IdempotentLayer,
}

impl<S> IdempotentService<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> Service<Request> for IdempotentService<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = IdempotentFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The clone that was driven to readiness serves this request.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        let config = self.config;
        let head = request.method() == Method::HEAD;
        IdempotentFuture {
            inner: Box::pin(async move {
                let response = handle(inner, config, request).await;
                Ok(if head { bodiless(response) } else { response })
            }),
        }
    }
}

/// A `HEAD`'s answer as axum's router sends one: the length its body
/// would have had, and no body. Inside a router, which does the same
/// after this layer, this changes nothing. Around a whole `Router` (as a
/// service), the router took the body off the handler's answer, but the
/// answers this layer makes itself (a replay of the `GET`, a problem)
/// would keep theirs, which hyper sends over HTTP/2 as DATA frames on a
/// `HEAD` stream: a protocol error to the client (RFC 9110 9.3.2).
///
/// Only a body of known length and some content is taken off, as all of
/// the layer's own answers have: an empty one is left alone (around a
/// `Router`, axum took the body off and said what length it knew), and
/// so is a handler's stream of unknown length, which axum takes off
/// after this layer inside a router; emptied here, either would be
/// announced as `Content-Length: 0`, a length the `GET`'s
/// representation does not have.
fn bodiless(mut response: Response) -> Response {
    let length = http_body::Body::size_hint(response.body()).exact();
    let Some(length) = length.filter(|length| *length > 0) else {
        return response;
    };
    if !response.headers().contains_key(CONTENT_LENGTH) {
        let length = HeaderValue::from(length);
        response.headers_mut().insert(CONTENT_LENGTH, length);
    }
    *response.body_mut() = Body::empty();
    response
}

/// The future of an [`IdempotentService`]. It is named, rather than a
/// boxed future, so that how it runs can change (without the allocation
/// it has now, say) without changing this type.
#[must_use = "futures do nothing unless polled"]
pub struct IdempotentFuture {
    inner: BoxFuture<'static, Result<Response, Infallible>>,
}

impl Future for IdempotentFuture {
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for IdempotentFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotentFuture").finish_non_exhaustive()
    }
}

async fn handle<S>(inner: S, config: IdempotentLayer, request: Request) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    // A `CONNECT` opens a tunnel (a WebSocket over HTTP/2 opens with one):
    // what it carries flows once it is answered, on the connection hyper
    // hands the handler, so there is nothing to fingerprint, and a stored
    // answer replayed to it would open no tunnel. It passes through as it
    // came, keyed or not, as a WebSocket's `GET` over HTTP/1.1 passes
    // without a key.
    if request.method() == Method::CONNECT {
        return without_replay_marker(call(inner, request).await);
    }
    let (mut parts, body) = request.into_parts();
    // The endpoint, and so the scope, is known here: it is resolved below,
    // from the request's own headers, rather than from a copy at `run`.
    let path = parts.uri.path();
    let extracted = IdempotentRequest::extract(&parts.headers, &parts.extensions, path, |_, _| {
        ScopeSource::Principal
    });
    let mut idempotent = match extracted {
        Ok(idempotent) => idempotent,
        Err(problem) => return problem.into_response(),
    };
    idempotent.route = match route_params(&mut parts, idempotent.key.is_some()) {
        Ok(route) => route,
        Err(problem) => return problem.into_response(),
    };
    // Without a key there is nothing to fingerprint: the request is refused
    // before its body is read, or runs as it came. A safe method (`GET`,
    // `HEAD`, `OPTIONS`, `TRACE`) has no side effect to guard, so it never
    // needs a key: a layer over a whole router must not refuse its reads,
    // CORS preflights or axum's 405 for them.
    if idempotent.key.is_none() {
        if !config.endpoint.is_optional() && !parts.method.is_safe() {
            return crate::key::missing(&parts.headers).into_response();
        }
        let response = call(inner, Request::from_parts(parts, body)).await;
        return without_replay_marker(response);
    }
    // A missing credential (or a custom scope, which the layer cannot
    // resolve) is refused before the body is read. Beneath another layer,
    // the engine refuses the request whatever its scope.
    if !matches!(idempotent.scope, ScopeSource::InsideLayer(_)) {
        let settings = &idempotent.idempotency.inner;
        match resolve_scope(settings, &config.endpoint, &parts.headers) {
            Ok(scope) => idempotent.scope = ScopeSource::Resolved(Ok(scope)),
            Err(problem) => return problem.into_response(),
        }
    }
    // A body that announces more than the limit is refused unread: with
    // `Expect: 100-continue`, reading it is what asks the client to send it.
    let limit = u64::try_from(config.max_request_bytes).unwrap_or(u64::MAX);
    if http_body::Body::size_hint(&body).lower() > limit {
        return too_large(config.max_request_bytes).into_response();
    }
    let expected = whole_body::expected_length(parts.version, &parts.headers, &body);
    let read = Limited::new(body, config.max_request_bytes).collect().await;
    let body = match read.map(|collected| collected.to_bytes()) {
        Ok(body) => match CutShort::of(expected, &body) {
            None => body,
            Some(cut_short) => {
                log_unread_body(&idempotent, &config.endpoint, &cut_short);
                return cut_short.problem().into_response();
            }
        },
        Err(error) => {
            let problem = unread(&*error, config.max_request_bytes);
            if problem.kind() == ProblemKind::UnreadableBody {
                log_unread_body(&idempotent, &config.endpoint, &*error);
            }
            return problem.into_response();
        }
    };
    // The route's path parameters, which a nested router's prefix keeps
    // although its URI lost it, are bound to the fingerprint at `run`.
    let fingerprint = raw_fingerprint(&config.endpoint, &parts, &body);
    let head = parts.method == Method::HEAD;
    parts.extensions.insert(Claimed(config.endpoint.name()));
    let request = Request::from_parts(parts, Body::from(body));
    let handler = async move {
        let response = call(inner, request).await;
        if head {
            unstored_if_bodiless(response).await
        } else {
            response
        }
    };
    idempotent.run(&config.endpoint, fingerprint, handler).await
}

/// Marks a response the engine releases the key after instead of storing
/// it, whatever its status, with the reason it logs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Unstored(pub(crate) &'static str);

async fn call<S>(mut inner: S, request: Request) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    match inner.call(request).await {
        Ok(response) => response,
        Err(infallible) => match infallible {},
    }
}

fn raw_fingerprint(
    endpoint: &Endpoint,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Result<Fingerprint, FingerprintError> {
    let mut fingerprinter = endpoint.fingerprinter();
    fingerprinter
        .input(fingerprinted_method(&parts.method).as_str())?
        .input(parts.uri.path())?
        .input(&parts.uri.query())?
        .input(body)?;
    // Only after the body, and only when there is one: a request without
    // these headers keeps the fingerprint earlier versions stored for it.
    if let Some(representation) = Representation::of(&parts.headers) {
        fingerprinter.input(&representation)?;
    }
    Ok(fingerprinter.finish())
}

/// The headers that say how to read the body: every `Content-Type` and
/// `Content-Encoding` line, in order, byte for byte. The same bytes as
/// JSON and as a form, or gzipped and not, are different requests to the
/// handler; a retry resends the headers its first attempt sent.
struct Representation<'a> {
    media_types: GetAll<'a, HeaderValue>,
    codings: GetAll<'a, HeaderValue>,
}

impl<'a> Representation<'a> {
    /// `None` for a request with neither header.
    fn of(headers: &'a HeaderMap) -> Option<Self> {
        let media_types = headers.get_all(CONTENT_TYPE);
        let codings = headers.get_all(CONTENT_ENCODING);
        if media_types.iter().next().is_none() && codings.iter().next().is_none() {
            return None;
        }
        Some(Self {
            media_types,
            codings,
        })
    }
}

impl Serialize for Representation<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut representation = serializer.serialize_tuple(2)?;
        representation.serialize_element(&Lines(&self.media_types))?;
        representation.serialize_element(&Lines(&self.codings))?;
        representation.end()
    }
}

/// A header's lines as a sequence of their bytes.
struct Lines<'a, 'h>(&'a GetAll<'h, HeaderValue>);

impl Serialize for Lines<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|value| RawBytes(value.as_bytes())))
    }
}

/// Why a body could not be buffered: over this layer's limit, over a limit
/// a layer in front of it put on the body (`RequestBodyLimitLayer` on a
/// body without a `Content-Length`), or cut short. `Limited` reports its
/// own limit as the error itself, and the body's errors wrapped.
fn unread(error: &(dyn std::error::Error + 'static), limit: usize) -> Problem {
    if error.is::<LengthLimitError>() {
        return too_large(limit);
    }
    if is_over_limit(error) {
        return Problem::new(
            ProblemKind::RequestTooLarge,
            "the request body is larger than a body size limit in front of this route allows; nothing was executed",
        );
    }
    Problem::new(
        ProblemKind::UnreadableBody,
        format!("the request body could not be read to its end ({error}); nothing was executed"),
    )
}

/// Tells a body cut short before its end at info, as the engine tells
/// one the attribute's extractor could not read: not the client's choice
/// (a dropped connection, a proxy's timeout), and a run of them is the
/// trace of a network problem in front of the service.
fn log_unread_body(
    idempotent: &IdempotentRequest,
    endpoint: &Endpoint,
    error: &(dyn std::error::Error + 'static),
) {
    let (Some(key), ScopeSource::Resolved(Ok(scope))) = (&idempotent.key, &idempotent.scope) else {
        return;
    };
    let key = RecordKey::new(*scope, key.clone());
    crate::engine::log_unreadable(&error, endpoint, &key);
}

/// Says what to send instead, and that the key is still unused: a client
/// told only that the body is too large cannot know whether a retry with
/// a smaller one needs a new key.
fn too_large(limit: usize) -> Problem {
    Problem::new(
        ProblemKind::RequestTooLarge,
        format!(
            "the request body is larger than the {limit} bytes this idempotent route buffers to fingerprint it; nothing was executed and the key was not used: send a body of at most {limit} bytes"
        ),
    )
}

/// Whether `error`, or an error it wraps, is a body size limit's.
pub(crate) fn is_over_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(error) = source {
        if error.is::<LengthLimitError>() {
            return true;
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&'static str, &'static str)]) -> http::request::Parts {
        let mut request = http::Request::post("/orders?sku=a");
        for &(name, value) in headers {
            request = request.header(name, value);
        }
        request.body(()).unwrap().into_parts().0
    }

    /// What earlier versions fingerprinted: method, path, query and body.
    fn earlier_fingerprint(
        endpoint: &Endpoint,
        parts: &http::request::Parts,
        body: &Bytes,
    ) -> Fingerprint {
        let mut fingerprinter = endpoint.fingerprinter();
        fingerprinter
            .input(parts.method.as_str())
            .and_then(|next| next.input(parts.uri.path()))
            .and_then(|next| next.input(&parts.uri.query()))
            .and_then(|next| next.input(body))
            .unwrap();
        fingerprinter.finish()
    }

    #[test]
    fn only_requests_with_a_media_type_or_coding_change_their_fingerprint() {
        let endpoint = Endpoint::new("create_order");
        let body = Bytes::from_static(br#"{"sku":"a"}"#);
        let unchanged = [parts(&[("x-api-key", "c")])];
        for parts in &unchanged {
            let now = raw_fingerprint(&endpoint, parts, &body).unwrap();
            assert_eq!(
                now,
                earlier_fingerprint(&endpoint, parts, &body),
                "{:?}",
                parts.headers
            );
        }
        let changed = [
            parts(&[("content-type", "application/json")]),
            parts(&[("content-encoding", "gzip")]),
        ];
        for parts in &changed {
            let now = raw_fingerprint(&endpoint, parts, &body).unwrap();
            assert_ne!(
                now,
                earlier_fingerprint(&endpoint, parts, &body),
                "{:?}",
                parts.headers
            );
        }
    }
}
