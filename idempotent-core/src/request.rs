//! The extractor that carries a request into the engine: the way to use
//! idempotency without the attribute, and what `#[idempotent]` expands to.

use std::future::Future;

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{Extensions, HeaderMap};

use crate::endpoint::Endpoint;
use crate::exact::ExactRequest;
use crate::fingerprint::{Fingerprint, FingerprintError};
use crate::idempotency::Idempotency;
use crate::key::IdempotencyKey;
use crate::problem::{Problem, ProblemKind};
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
}

/// Where the request's scope comes from.
#[derive(Debug)]
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
}

impl IdempotentRequest {
    /// The request's key, if it sent one.
    #[must_use]
    pub fn key(&self) -> Option<&IdempotencyKey> {
        self.key.as_ref()
    }

    /// Scopes the key by a principal the handler extracted, for endpoints
    /// with [`Scope::Custom`](crate::Scope::Custom).
    #[must_use]
    pub fn scoped_by(mut self, principal: &impl IdempotencyScope) -> Self {
        self.scope = ScopeSource::Resolved(Ok(ScopeDigest::custom(principal)));
        self
    }

    /// Runs `handler` at most once per (scope, key) at `endpoint`, and
    /// answers every retry with the stored response.
    ///
    /// `handler` runs on until it finishes even if the client disconnects,
    /// so its outcome is always recorded. It is only polled after the key
    /// was claimed.
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
        let handler = Box::pin(async move { handler.await.into_response() });
        crate::engine::run(self, endpoint, fingerprint, handler)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotentRequest {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // The endpoint, and so its scope, is only known at `run`.
        Self::extract(&parts.headers, &parts.extensions, |_, headers| {
            ScopeSource::Headers(Box::new(headers.clone()))
        })
    }
}

impl IdempotentRequest {
    /// The layer's handle and the request's key, with the scope `scope`
    /// takes from the headers.
    pub(crate) fn extract(
        headers: &HeaderMap,
        extensions: &Extensions,
        scope: impl FnOnce(&Idempotency, &HeaderMap) -> ScopeSource,
    ) -> Result<Self, Problem> {
        let idempotency = Idempotency::current()
            .or_else(|| extensions.get::<Idempotency>().cloned())
            .ok_or_else(not_configured)?;
        let key = IdempotencyKey::from_headers(headers)?;
        let scope = scope(&idempotency, headers);
        Ok(Self {
            idempotency,
            key,
            scope,
            exact: None,
        })
    }
}

fn not_configured() -> Problem {
    Problem::new(
        ProblemKind::NotConfigured,
        "this endpoint is idempotent but the router has no store: add `.layer(idempotent_core::Idempotency::new(store))` to the Router (for example with `idempotent_core::store::MemoryStore::new()`)",
    )
}
