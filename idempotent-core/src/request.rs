//! The extractor that carries a request into the engine: the way to use
//! idempotency without the attribute, and what `#[idempotent]` expands to.

use std::fmt;
use std::future::Future;

use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{FromRequestParts, RawPathParams};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use http::request::Parts;
use http::{Extensions, HeaderMap, HeaderName, Method};

use crate::endpoint::Endpoint;
use crate::exact::ExactRequest;
use crate::fingerprint::{Fingerprint, FingerprintError};
use crate::idempotency::Idempotency;
use crate::key::IdempotencyKey;
use crate::layer::Claimed;
use crate::problem::{Problem, ProblemKind};
use crate::replay::IDEMPOTENT_REPLAYED;
use crate::scope::{IdempotencyScope, MissingCredential, ScopeDigest};

/// A request's idempotency context: its key, the headers its scope is
/// read from, and the router's [`Idempotency`].
///
/// Extracting it fails with a 400 problem when the `Idempotency-Key`
/// header is malformed, and with a 500 problem when the router has no
/// [`Idempotency`] layer. A missing key is decided by [`run`](Self::run),
/// since it depends on whether the endpoint makes keys optional.
///
/// ```
/// use axum::{Json, response::Response};
/// use idempotent_core::{Endpoint, IdempotentRequest};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct NewPayment { amount: i64 }
///
/// const CREATE_PAYMENT: Endpoint = Endpoint::new("create_payment");
///
/// async fn create_payment(idem: IdempotentRequest, Json(req): Json<NewPayment>) -> Response {
///     let fingerprint = CREATE_PAYMENT.fingerprint(&req);
///     idem.run(&CREATE_PAYMENT, fingerprint, async move {
///         // charge the card once
///         Json(req.amount)
///     })
///     .await
/// }
/// ```
#[derive(Debug)]
pub struct IdempotentRequest {
    pub(crate) idempotency: Idempotency,
    pub(crate) key: Option<IdempotencyKey>,
    pub(crate) scope: ScopeSource,
    /// Set when the request came through an eligible handler's exact-replay
    /// check ([`crate::exact`]).
    pub(crate) exact: Option<ExactRequest>,
    /// The matched route's path parameters, when it has any: `run` binds
    /// the fingerprint to them ([`route_params`]). Boxed: most routes have
    /// none, and every request's future holds this.
    pub(crate) route: Option<Box<RawPathParams>>,
    /// The request's method, when `run` binds the fingerprint to it
    /// ([`method_binding`]). Boxed: most idempotent requests are `POST`s,
    /// which carry none, and every request's future holds this.
    pub(crate) method: Option<Box<Method>>,
    /// Set by the attribute when the handler takes an extractor as a
    /// `Result` and it was rejected: a 400 or 422 answer to it is not
    /// stored.
    pub(crate) input_rejected: bool,
}

/// Where the request's scope comes from.
pub(crate) enum ScopeSource {
    /// The request's headers, resolved once the endpoint's scope is known.
    /// Boxed: inline, a map would add its size to every request's futures;
    /// the box is one small allocation more for a header-scoped request.
    Headers(Box<HeaderMap>),
    /// The handler's principal, which it has not given yet
    /// ([`IdempotentRequest::scoped_by`]).
    Principal,
    /// Resolved already: by a principal the handler supplied, or at
    /// extraction for an endpoint whose scope the attribute knows.
    Resolved(Result<ScopeDigest, MissingCredential>),
    /// None: an [`IdempotentLayer`](crate::IdempotentLayer) for the
    /// endpoint named here claimed the key around this handler, so `run`
    /// refuses the request. Kept here rather than in a field of its own,
    /// which would grow every request's future.
    InsideLayer(&'static str),
}

/// Shows the headers' names only: their values carry the caller's
/// credentials (`Authorization`, the API key, cookies), and a request's
/// context is logged whole wherever it is a traced handler's argument
/// (`#[tracing::instrument]` records arguments with `Debug`).
impl fmt::Debug for ScopeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Headers(headers) => {
                let names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
                f.debug_tuple("Headers").field(&names).finish()
            }
            Self::Principal => f.write_str("Principal"),
            Self::Resolved(scope) => f.debug_tuple("Resolved").field(scope).finish(),
            Self::InsideLayer(layer) => f.debug_tuple("InsideLayer").field(layer).finish(),
        }
    }
}

impl IdempotentRequest {
    /// The request's key, if it sent one.
    #[must_use]
    pub fn key(&self) -> Option<&IdempotencyKey> {
        self.key.as_ref()
    }

    /// Scopes the key by a principal the handler extracted, for endpoints
    /// with [`Scope::Custom`](crate::Scope::Custom). A principal with an
    /// empty [`scope_id`](IdempotencyScope::scope_id) names no caller:
    /// [`run`](Self::run) then refuses a keyed request with 400.
    #[must_use]
    pub fn scoped_by(mut self, principal: &impl IdempotencyScope) -> Self {
        // A request without a key needs no scope, and keeps its headers:
        // refused for the missing key, it is told of a header named like
        // the key (`X-Idempotency-Key`), which they alone show. A request
        // refused for running inside a layer stays refused.
        if self.key.is_some() && !matches!(self.scope, ScopeSource::InsideLayer(_)) {
            self.scope = ScopeSource::Resolved(crate::scope::principal(principal));
        }
        self
    }

    /// Runs `handler` at most once per (scope, key) at `endpoint`, and
    /// answers every retry with the stored response.
    ///
    /// A keyed request's `handler` is only polled after the key was
    /// claimed, and then runs on until it finishes even if the client
    /// disconnects, so that its outcome is recorded (unless the store
    /// fails or the lease lapses, which the log says): a final response is
    /// stored for replay, any other status frees the key. Two requests run
    /// it without a claim, as a plain future that a disconnect drops and
    /// whose outcome nothing records: an unkeyed request on an
    /// [`optional`](Endpoint::optional) endpoint, and, with
    /// [`fail_open`](crate::IdempotencyBuilder::fail_open), a request whose
    /// claim failed in the store.
    ///
    /// Every final status the future answers is stored, a 400 or 422 to
    /// an extractor's rejection the handler takes as a `Result` included
    /// (the attribute leaves those unstored, so that the retry with the
    /// request fixed runs): answer such a rejection before calling `run`,
    /// which then claims nothing.
    ///
    /// An [`Idempotent-Replayed`](crate::IDEMPOTENT_REPLAYED) header the
    /// future's response sets itself is removed, keyed or not: only a
    /// replay carries it, set by the engine.
    ///
    /// Beneath an [`IdempotentLayer`](crate::IdempotentLayer), which claimed
    /// the key already, a keyed request is answered 500 (`not-configured`):
    /// a route takes one or the other.
    pub fn run<F>(
        self,
        endpoint: &Endpoint,
        fingerprint: Result<Fingerprint, FingerprintError>,
        handler: F,
    ) -> impl Future<Output = Response> + Send + use<F>
    where
        F: Future + Send + 'static,
        F::Output: IntoResponse,
    {
        let handler = Box::pin(async move { without_replay_marker(handler.await.into_response()) });
        crate::engine::run(self, endpoint, fingerprint, handler)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotentRequest {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // The endpoint, and so its scope, is only known at `run`.
        let path = parts.uri.path();
        let mut request = Self::extract(&parts.headers, &parts.extensions, path, |_, headers| {
            ScopeSource::Headers(Box::new(headers.clone()))
        })?;
        request.route = route_params(parts, request.key.is_some())?;
        request.method = method_binding(&parts.method, request.key.is_some());
        Ok(request)
    }
}

impl IdempotentRequest {
    /// The layer's handle and the request's key, with the scope `scope`
    /// takes from the headers. `path`, the request's, only names the
    /// route in the log when no layer served it.
    pub(crate) fn extract(
        headers: &HeaderMap,
        extensions: &Extensions,
        path: &str,
        scope: impl FnOnce(&Idempotency, &HeaderMap) -> ScopeSource,
    ) -> Result<Self, Problem> {
        let idempotency = Idempotency::current()
            .or_else(|| extensions.get::<Idempotency>().cloned())
            .ok_or_else(|| not_configured(path))?;
        let key = IdempotencyKey::from_headers(headers)?;
        let scope = match claiming_layer(key.as_ref(), extensions) {
            Some(layer) => ScopeSource::InsideLayer(layer),
            None => scope(&idempotency, headers),
        };
        Ok(Self {
            idempotency,
            key,
            scope,
            exact: None,
            route: None,
            method: None,
            input_rejected: false,
        })
    }
}

/// The path parameters of the route that matched `parts`, if it has any
/// (none outside a router). A nested router's prefix is gone from the
/// URI by the time its routes see the request, but its parameters are
/// among these. axum's extractor is ready at once: polled in place, it
/// adds no await point, and so no state, to the extracting futures.
///
/// A `keyed` request with a parameter that is not UTF-8 once decoded
/// (`/orgs/%FF/pay`) is refused with 400, as axum's `Path` refuses it:
/// left out of the fingerprint, it would make the request one with any
/// other such parameter (`/orgs/%FE/pay`), and replay that one's
/// response. A request without a key has no fingerprint, and passes.
pub(crate) fn route_params(
    parts: &mut Parts,
    keyed: bool,
) -> Result<Option<Box<RawPathParams>>, Problem> {
    let Some(params) = RawPathParams::from_request_parts(parts, &()).now_or_never() else {
        return Ok(None);
    };
    match params {
        Ok(params) => Ok(params.iter().next().is_some().then(|| Box::new(params))),
        Err(RawPathParamsRejection::InvalidUtf8InPathParam(invalid)) if keyed => Err(Problem::new(
            ProblemKind::InvalidPathParameter,
            invalid.body_text(),
        )),
        // Outside a router there are none to bind.
        Err(_) => Ok(None),
    }
}

/// The method a `keyed` request's fingerprint is bound to, if any: none
/// for `POST`, the method of nearly every idempotent request, so that its
/// fingerprint is the handler's inputs alone (and records stored before
/// methods were bound still match); otherwise the method itself, which
/// `run` binds as [`fingerprinted_method`] names it (a `HEAD` as a `GET`)
/// and reads to leave a `HEAD`'s bodiless answer unstored. Without it, a
/// handler routed for several methods would answer a `DELETE` with the
/// stored response of a `POST` under the same key and inputs, as its
/// replay. `IdempotentLayer`
/// fingerprints the method itself, by the same name.
pub(crate) fn method_binding(method: &Method, keyed: bool) -> Option<Box<Method>> {
    if !keyed || *method == Method::POST {
        return None;
    }
    Some(Box::new(method.clone()))
}

/// The method as a fingerprint names it: `HEAD` as `GET`, which axum
/// serves by the same handler, taking the body off the response at the
/// router's edge, outside the handler and a `route_layer`. So a `HEAD`
/// after a `GET` with one key is the `GET`'s replay (without its body),
/// and a `GET` after a `HEAD` the replay of the whole response the
/// `HEAD`'s run produced, under the attribute and `IdempotentLayer`
/// alike (neither stores a `HEAD`'s response without a body: see
/// `replay::unstored_if_bodiless`).
pub(crate) fn fingerprinted_method(method: &Method) -> &Method {
    static GET: Method = Method::GET;
    if *method == Method::HEAD {
        &GET
    } else {
        method
    }
}

/// `response` without an `Idempotent-Replayed` header of its own. The
/// header is this library's mark of a replay: a handler (or a service
/// beneath `IdempotentLayer`) that sets it, forwarding an upstream's
/// answer say, would make its first response claim to be a replay, and
/// the mark would be stored with it. A replay is marked afresh.
/// Looked for by walking the few headers a response has, which costs
/// less than hashing the name for a lookup that nearly always misses.
pub(crate) fn without_replay_marker(mut response: Response) -> Response {
    let marker = IDEMPOTENT_REPLAYED;
    if response.headers().keys().any(|name| *name == marker) {
        response.headers_mut().remove(marker);
    }
    response
}

/// The endpoint of the [`IdempotentLayer`](crate::IdempotentLayer) that
/// claimed this request's key, if one did. Only a keyed request is looked
/// up: a layer claims nothing without a key, and an unkeyed request pays
/// for no lookup.
fn claiming_layer(key: Option<&IdempotencyKey>, extensions: &Extensions) -> Option<&'static str> {
    key?;
    extensions.get::<Claimed>().map(|claimed| claimed.0)
}

/// The handle travels in a task-local (see `Idempotency::current`), so
/// besides a missing layer the detail covers the ways a present one is
/// missed: added before the route, added inside an `IdempotentLayer` (with
/// `route_layer` after it, which the `IdempotentLayer` then wraps; the
/// detail cannot tell that route from one without the layer, since the
/// request carries no trace of it), or left behind by a spawned task.
/// Logged too, with the common fix: a route added after the layer
/// answers 500 in production, where the operator reads the log, not the
/// response; with the request's path (not its query, which may carry what
/// the log must not), since the endpoint's name is not known here.
fn not_configured(path: &str) -> Problem {
    tracing::error!(
        path,
        "an idempotent endpoint was served without an `Idempotency` layer; request refused, nothing executed: add `.layer(Idempotency::new(store))` to the Router after the `.route(...)` calls it must cover (the response's detail names the other causes)"
    );
    Problem::new(
        ProblemKind::NotConfigured,
        "this endpoint is idempotent but no `Idempotency` layer served the request: add `.layer(idempotent_core::Idempotency::new(store))` to the Router (for example with `idempotent_core::store::MemoryStore::new()`) after the `.route(...)` calls it must cover, since `Router::layer` wraps only the routes added before it; a route with an `IdempotentLayer` needs the `Idempotency` layer outside the `IdempotentLayer`: added to the Router after the route, not with `route_layer` inside it; if a middleware inside the `Idempotency` layer runs the handler on a spawned task, which does not carry the layer's handle, insert the handle into the request's extensions before spawning (`request.extensions_mut().insert(idempotency.clone())`) or move that middleware outside the layer",
    )
}
