//! The one code path every idempotent request takes:
//! claim -> run -> settle -> reply.

use std::any::Any;
use std::borrow::Borrow;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Either;
use http::response::Parts;
use http::{HeaderMap, Method, StatusCode};
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument;

use crate::endpoint::Endpoint;
use crate::exact::ExactRequest;
use crate::fingerprint::{Fingerprint, FingerprintError};
use crate::idempotency::Settings;
use crate::key::KeyError;
use crate::layer::Unstored;
use crate::problem::{Problem, ProblemKind};
use crate::record::{
    Claim, Completed, LeaseToken, MAX_STORED_HEADERS, Record, RecordKey, StoredResponse,
};
use crate::renewal::Renewals;
use crate::replay::{
    Collected, HEAD_BODY_NOT_KEPT, HeadAnswer, NotKept, collect_response, replay,
    replayable_headers, unstored_if_bodiless,
};
use crate::request::{IdempotentRequest, ScopeSource, fingerprinted_method};
use crate::scope::{self, MissingCredential, Scope, ScopeDigest};
use crate::store::StoreError;

/// The user's handler, already turned into a response.
pub(crate) type Handler = Pin<Box<dyn Future<Output = Response> + Send>>;
type Panic = Box<dyn Any + Send>;
type Pipeline = Pin<Box<dyn Future<Output = Result<Response, Panic>> + Send>>;

/// What a claimed request's handler produced.
enum Produced {
    /// A response to store: its head, and its body as read for storing.
    Final(Parts, Collected),
    /// A response whose status lets the key be used again, and why.
    NotFinal(Response, &'static str),
}

/// First and longest pause between claims while waiting for a duplicate.
const WAIT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(200));
/// `Retry-After` on 409 and 503: the first attempt usually finishes, or the
/// store recovers, within a second or so.
const RETRY_AFTER_SECS: u64 = 1;
const NOT_STORED: &str =
    "the response could not be stored; a retry after the lease lapses runs again";
/// What a run cut short before it settled its claim logs (see [`Unfinished`]).
const CUT_SHORT: &str = "the run was cut short before it stored its response or released its key: its task was dropped (a runtime that ended before `Idempotency::drain` was awaited: await it once the server stops; or a request dropped outside a tokio runtime, where the rest of its run could not go on), or it panicked outside the handler; the key stays claimed until its lease lapses, and a retry after that runs the request again. `handler` says how far it got: `running` (it may have acted, in part or in full), `answered` (it finished, answering `status`: whatever it did is done, but its response was not stored nor its key released), `panicked`";
/// Pauses before storing a response again after a store error: a
/// connection that broke is usually back within them, and the first
/// caller's response waits for them.
const STORE_RETRY_PAUSES: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(200),
    Duration::from_millis(800),
];
const LOST: &str = "the lease was taken over while the handler ran, so its response was not stored; the request may have run twice";
const GONE_UNSTORED: &str = "the response was not stored: the claim's record is gone from the store, which dropped it (a restart without persistence, an eviction, a flush, a record deleted by hand), or a request that took the lapsed lease over released it; a retry runs the request again: if the store drops records, make it keep them (for Redis, `appendonly yes` and `maxmemory-policy noeviction`)";
/// What a release logs whose lease a renewal found lost while the handler
/// ran: no lost answer of its own can explain it.
const TAKEN_OVER_WHILE_RUNNING: &str = "the lease was taken over while the handler ran: it lapsed, and another request claimed the key and holds it; the request may have run twice";
const GONE_WHILE_RUNNING: &str = "the claim's record went from the store while the handler ran: the store dropped it (a restart without persistence, an eviction, a flush, a record deleted by hand), or a request that took the lapsed lease over released it; the request may have run twice, and a retry runs it again: if the store drops records, make it keep them (for Redis, `appendonly yes` and `maxmemory-policy noeviction`)";
const NOT_RELEASED: &str = "could not release the key; it frees when the lease lapses";
const NOT_STORED_UNTIL_FIXED: &str = "the response could not be stored, and was not tried again: the store fails this way until what the error names is fixed; a retry after the lease lapses runs again";
const NOT_RELEASED_UNTIL_FIXED: &str = "could not release the key, and did not try again: the store fails this way until what the error names is fixed; the key frees when the lease lapses";
const NOT_HELD: &str = "the key was released already, by an attempt whose answer was lost";
/// First and longest pause between the attempts that go on storing a
/// response after the caller got it.
const LATER_PAUSES: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(8));
const STORING_LATER: &str = "the response could not be stored yet; the caller got it, and storing it goes on for as long as its lease can last";
const STORED_LATER: &str = "the response was stored once the store answered again";
const LOST_LATER: &str = "the lease was lost before the response could be stored: it lapsed, and another request took the key over; the request may have run twice";
const LOST_LATER_OR_STORED: &str = "another request holds the key, with this response stored: if an earlier attempt to store it timed out or lost its connection, that attempt stored it, which is harmless; otherwise the lease lapsed before the response could be stored, another request took the key over and ran it again, and the request ran twice";
/// The most the responses waiting to be stored later may hold in all.
const STORING_LATER_MAX_BYTES: usize = 64 * 1024 * 1024;
/// What a release that found the lease gone and the key held logs: the
/// engine cannot tell a takeover from a release applied while its answer
/// was lost, after which another request claimed the freed key.
const TAKEN_OVER: &str = "another request holds the key: if an attempt to release it timed out or lost its connection, that attempt freed the key and the other request claimed it, which is harmless; otherwise the lease lapsed while the handler ran and was taken over, and the request may have run twice";

/// Everything up to the store is decided here, synchronously, so the
/// returned future holds only what the rest needs: the handler alone, a
/// ready answer, or the engine (async wrappers would keep a second copy
/// of every argument in the future for their whole life).
pub(crate) fn run(
    request: IdempotentRequest,
    endpoint: &Endpoint,
    fingerprint: Result<Fingerprint, FingerprintError>,
    handler: Handler,
) -> impl Future<Output = Response> + Send + use<> {
    let exact = request.exact;
    let head = request.method.as_deref() == Some(&Method::HEAD);
    match prepare(request, endpoint, fingerprint) {
        // No key on an endpoint where keys are optional: the handler runs as is.
        Ok(None) => Either::Left(Either::Left(handler)),
        Err(problem) => Either::Left(Either::Right(std::future::ready(problem.into_response()))),
        Ok(Some(engine)) => {
            let span = tracing::debug_span!(
                "idempotent",
                endpoint = engine.endpoint.name(),
                key = %engine.key.log_id()
            );
            let handler = if head { head_handler(handler) } else { handler };
            Either::Right(engine.claim_and_run(handler, exact).instrument(span))
        }
    }
}

/// A keyed `HEAD`'s handler, whose answer is not stored without a body:
/// the `GET` after it, fingerprinted alike, would be replayed an empty one.
fn head_handler(handler: Handler) -> Handler {
    Box::pin(async move { unstored_if_bodiless(handler.await).await })
}

/// The engine for a keyed request, `None` for an unkeyed one the endpoint
/// allows, or the problem that refuses the request.
fn prepare(
    request: IdempotentRequest,
    endpoint: &Endpoint,
    fingerprint: Result<Fingerprint, FingerprintError>,
) -> Result<Option<Engine>, Problem> {
    let settings = request.idempotency.inner;
    let input_rejected = request.input_rejected;
    let Some(key) = request.key else {
        if endpoint.is_optional() {
            return Ok(None);
        }
        // With the headers at hand, a key sent under another name is named.
        return Err(match &request.scope {
            ScopeSource::Headers(headers) => crate::key::missing(headers),
            _ => Problem::from(KeyError::Missing),
        });
    };
    let (scope, request_headers) = match request.scope {
        ScopeSource::Resolved(scope) => (scope.map_err(missing_credentials)?, None),
        ScopeSource::Headers(headers) => {
            (resolve_scope(&settings, endpoint, &headers)?, Some(headers))
        }
        // Only a custom-scope endpoint waits for a principal; without one,
        // resolving answers that the handler must call `scoped_by`.
        ScopeSource::Principal => (resolve_scope(&settings, endpoint, &HeaderMap::new())?, None),
        ScopeSource::InsideLayer(layer) => return Err(inside_layer(layer, endpoint)),
    };
    let key = RecordKey::new(scope, key);
    let mut fingerprint =
        fingerprint.map_err(|error| fingerprint_failed(&error, endpoint, &key))?;
    if let Some(params) = request.route {
        fingerprint = fingerprint.on_route(&*params);
    }
    if let Some(method) = request.method {
        fingerprint = fingerprint.on_method(fingerprinted_method(&method));
    }
    Ok(Some(Engine {
        settings,
        endpoint: *endpoint,
        key,
        fingerprint,
        input_rejected,
        _request_headers: request_headers,
    }))
}

pub(crate) fn resolve_scope(
    settings: &Settings,
    endpoint: &Endpoint,
    headers: &HeaderMap,
) -> Result<ScopeDigest, Problem> {
    match scope::resolve(endpoint.scope_kind(), headers, &settings.api_key_header) {
        Ok(Some(scope)) => Ok(scope),
        Ok(None) => Err(no_principal(endpoint.name())),
        Err(missing) => Err(match endpoint.scope_kind() {
            // Asked only once the header was not found, so that requests
            // that have it pay nothing for the check.
            Scope::Header(name) if http::HeaderName::from_bytes(name.as_bytes()).is_err() => {
                invalid_scope_header(endpoint.name(), name)
            }
            _ => missing_credentials(missing),
        }),
    }
}

/// An endpoint scoped by a header no request can carry, a name written by
/// hand (the attribute checks its own at compile time): the server's
/// setup, not the client's request. Logged too, as [`no_principal`] is.
fn invalid_scope_header(endpoint: &'static str, name: &str) -> Problem {
    tracing::error!(
        endpoint,
        header = name,
        "an endpoint is scoped by a header name no request can carry; request refused, nothing executed"
    );
    Problem::new(
        ProblemKind::NotConfigured,
        format!(
            "endpoint `{endpoint}` scopes idempotency keys by the header `{name}`, which is not a valid header name (letters, digits and `-`, such as `x-tenant-id`): fix the name given to `Scope::Header`"
        ),
    )
}

/// A custom-scope endpoint that got no principal. Logged too: every keyed
/// request to it answers 500, and the operator reads the log, not the
/// response.
fn no_principal(endpoint: &'static str) -> Problem {
    tracing::error!(
        endpoint,
        "an endpoint with a custom scope got no principal; request refused, nothing executed"
    );
    Problem::new(
        ProblemKind::NotConfigured,
        format!(
            "endpoint `{endpoint}` uses a custom scope but no principal was given: with `IdempotentRequest`, call `scoped_by` before `run`; `IdempotentLayer` cannot resolve a custom scope (it sees no extractor), so give it `Scope::ApiKey`, `Scope::Header` or `Scope::Global`, or use the attribute with `scope = YourPrincipal`"
        ),
    )
}

/// A handler made idempotent beneath an `IdempotentLayer`, which claimed
/// the key with its raw-request fingerprint: claiming it again would find
/// that claim in flight and answer 422, which the layer would store,
/// burning the key. A 500 is not stored, so the key stays usable once the
/// route is fixed.
fn inside_layer(layer: &'static str, endpoint: &Endpoint) -> Problem {
    let endpoint = endpoint.name();
    tracing::error!(
        layer,
        endpoint,
        "an idempotent handler runs inside an IdempotentLayer; request refused, nothing executed"
    );
    Problem::new(
        ProblemKind::NotConfigured,
        format!(
            "endpoint `{endpoint}` is made idempotent twice: the `IdempotentLayer` of endpoint `{layer}` wraps its handler and already claimed this key; use either the layer or `#[idempotent]` (or `IdempotentRequest`) on this route, not both"
        ),
    )
}

/// A missing API key is a 401 that challenges for a bearer token; a scope
/// header that is missing or repeated has no scheme to challenge for (a
/// 401 must name one), so it is the request's own error, 400.
pub(crate) fn missing_credentials(missing: MissingCredential) -> Problem {
    if missing.bearer {
        Problem::new(ProblemKind::MissingCredentials, missing.detail)
    } else {
        Problem::new(ProblemKind::InvalidScope, missing.detail)
    }
}

/// Tells, at info, that a keyed request's body could not be read to its
/// end (`error` says why): the client's side failed, and nothing ran.
pub(crate) fn log_unreadable(error: &dyn std::fmt::Display, endpoint: &Endpoint, key: &RecordKey) {
    tracing::info!(
        %error,
        endpoint = endpoint.name(),
        key = %key.log_id(),
        "request body unreadable; request refused, nothing executed"
    );
}

fn fingerprint_failed(error: &FingerprintError, endpoint: &Endpoint, key: &RecordKey) -> Problem {
    // The client's side of the request failed, not the server's: nothing
    // was claimed, and the retry that sends the whole body runs.
    if matches!(error, FingerprintError::UnreadBody) {
        log_unreadable(error, endpoint, key);
        return Problem::new(
            ProblemKind::UnreadableBody,
            "the request body could not be read to its end; nothing was executed, and a retry with the whole body runs",
        );
    }
    tracing::error!(
        %error,
        endpoint = endpoint.name(),
        key = %key.log_id(),
        "could not fingerprint the request inputs"
    );
    // The places in the source stay in the log.
    let detail = match error {
        FingerprintError::SharedEndpointName { .. } => {
            "this endpoint shares its name with another handler's, so its fingerprints could not tell the two apart; the server's configuration must be fixed"
        }
        _ => "the request inputs could not be serialized to compute the idempotency fingerprint",
    };
    Problem::new(ProblemKind::FingerprintFailed, detail)
}

/// Everything a claimed request needs, owned, so the run can outlive the
/// client's connection.
struct Engine {
    settings: Arc<Settings>,
    endpoint: Endpoint,
    key: RecordKey,
    fingerprint: Fingerprint,
    /// An extractor the handler takes as a `Result` was rejected: a 400
    /// or 422 answer to it is not stored, as axum's own rejection is not,
    /// so that the retry with the request fixed runs (unless the endpoint
    /// lists its final statuses itself).
    input_rejected: bool,
    /// The request's headers when the scope was resolved from a copy of
    /// them: no longer read, but freed only with the engine, after the
    /// record is stored. Freeing them before the handler runs made first
    /// executions about 1 µs slower under glibc malloc (13.8 against 15.0 µs
    /// of server CPU per request in alternating `bench/` runs, when the map
    /// was held inline), presumably because the stored record, which
    /// outlives the request, was then carved from their freed blocks.
    _request_headers: Option<Box<HeaderMap>>,
}

impl Engine {
    // The async methods that own the engine or a response are `fn`s
    // returning `async move` blocks: an `async fn` keeps a second copy of
    // its arguments in its future, and these futures are on every request.
    #[expect(clippy::manual_async_fn, reason = "halves the future's size")]
    fn claim_and_run(
        self,
        handler: Handler,
        exact: Option<ExactRequest>,
    ) -> impl Future<Output = Response> + Send {
        async move {
            let deadline = self
                .endpoint
                .wait_duration()
                .map(|wait| Instant::now() + wait);
            let mut backoff = WAIT_BACKOFF.0;
            let mut waited = false;
            loop {
                let lease = self.endpoint.lease_duration();
                // The store starts the lease when it applies the claim,
                // which can be most of a store timeout before its answer
                // comes: renewals count from here.
                let sent = Instant::now();
                let claim = self.timed(self.settings.store.claim(
                    &self.key,
                    self.fingerprint,
                    lease,
                ));
                let (claimed, suspended) = noting_suspension(claim).await;
                match claimed {
                    Err(error) => return self.claim_failed(&error, handler, waited).await,
                    Ok(Claim::Acquired(token)) if !self.answered_late(sent) => {
                        return self.execute(token, handler, sent, suspended).await;
                    }
                    // Boxed: only a claim answered late pays for it.
                    Ok(Claim::Acquired(token)) => match Box::pin(self.still_held(token)).await {
                        Ok(renewed) => return self.execute(token, handler, renewed, true).await,
                        // Taken over while the answer was on its way: the
                        // key is in flight with another request.
                        Err(StoreError::LeaseLost) => {}
                        // The store failed while the key was being claimed,
                        // and nothing ran: as after a claim that failed.
                        Err(error) => return self.claim_failed(&error, handler, waited).await,
                    },
                    Ok(Claim::Completed(record)) => return self.replay(&record, exact),
                    Ok(Claim::InFlight { fingerprint, .. }) if fingerprint != self.fingerprint => {
                        return self.mismatch();
                    }
                    Ok(Claim::InFlight { .. }) => {}
                }
                match deadline {
                    Some(deadline) if Instant::now() < deadline => {
                        // Boxed: only endpoints that wait ever sleep here.
                        waited = true;
                        let pause = deadline.min(Instant::now() + backoff);
                        Box::pin(tokio::time::sleep_until(pause)).await;
                        backoff = (backoff * 2).min(WAIT_BACKOFF.1);
                    }
                    _ => return self.in_progress(),
                }
            }
        }
    }

    /// Whether a claim sent at `sent` was answered after its first
    /// renewal fell due, a third of its lease later.
    fn answered_late(&self, sent: Instant) -> bool {
        Instant::now() >= sent + self.endpoint.lease_duration() / 3
    }

    /// Makes sure a claim answered late still holds its lease, and says
    /// when renewals count from. The store started the lease when it
    /// applied the claim: an answer that came after the first renewal fell
    /// due may come after the lease lapsed (a lease can be shorter than
    /// the store timeout), and a duplicate may have taken the key over and
    /// be running the handler. The lease is renewed before the handler
    /// runs, so that it is known held; a renewal that is late too (past a
    /// third of the lease) is given up. Not held, the claim is let go (a
    /// store's own hold on it too, such as
    /// [`Tiered`](crate::store::Tiered)'s), and nothing runs; nor does it
    /// when the request is dropped before this knows, and the claim is
    /// let go on a task of its own: held, it would answer every retry 409
    /// until its lease lapsed. A renewal that fails otherwise is a store
    /// failure while claiming: the request is refused, or, with
    /// `fail_open`, its handler runs without idempotency.
    async fn still_held(&self, token: LeaseToken) -> Result<Instant, StoreError> {
        let unsettled = Unsettled {
            engine: self,
            token: Some(token),
            tracked: self.settings.detached.token(),
        };
        let lease = self.endpoint.lease_duration();
        let renewing = Instant::now();
        let renewal = self.settings.store.renew(&self.key, token, lease);
        let timeout = self.settings.store_timeout.min(lease / 3);
        let renewed = within(timeout, renewal).await;
        if let Err(error) = renewed {
            self.late_claim_not_renewed(&error);
            drop(self.release_once(token).await);
            unsettled.settled();
            return Err(error);
        }
        unsettled.settled();
        Ok(renewing)
    }

    /// Logs a late claim's renewal that failed. A lost lease is told here:
    /// a duplicate took the key over. Any other error is the refusal's,
    /// which [`refused_for`] logs with the endpoint and key.
    fn late_claim_not_renewed(&self, error: &StoreError) {
        const NOT_RENEWED: &str = "a claim answered after its first renewal fell due could not be renewed; nothing executed";
        if matches!(error, StoreError::LeaseLost) {
            let (endpoint, key) = (self.endpoint.name(), self.key.log_id());
            tracing::warn!(%error, endpoint, %key, "{NOT_RENEWED}");
        } else {
            tracing::debug!(%error, "{NOT_RENEWED}");
        }
    }

    fn timed<T>(
        &self,
        operation: impl Future<Output = Result<T, StoreError>>,
    ) -> impl Future<Output = Result<T, StoreError>> {
        within(self.settings.store_timeout, operation)
    }

    /// Answers a claim that failed in the store: in flight (409) if a run
    /// of this process holds the key, else refused, or with `fail_open` the
    /// handler run without idempotency, unless the key was
    /// `seen_in_flight` by an earlier try of this request (failing open
    /// would run the handler beside the first request).
    async fn claim_failed(
        &self,
        error: &StoreError,
        handler: Handler,
        seen_in_flight: bool,
    ) -> Response {
        let open = self.settings.fail_open && !matches!(error, StoreError::Codec(_));
        // A key a run of this process holds is in flight, whatever the
        // store could not answer: failing open would run the handler a
        // second time beside that run (which stores its response once the
        // store is back), and a 503 would tell the client less than the
        // 409 a store that answers gives.
        if (open || !fails_until_fixed(error))
            && let Some(fingerprint) = self.settings.renewer.held_here(&self.key)
        {
            tracing::debug!(%error, "the store failed a claim of a key this process holds");
            return if fingerprint == self.fingerprint {
                self.in_progress()
            } else {
                self.mismatch()
            };
        }
        // A corrupt record is there: its request ran, and failing open
        // would run it again.
        if open && !seen_in_flight {
            let (endpoint, key) = (self.endpoint.name(), self.key.log_id());
            // Set up wrongly, the store does not come back by itself: every
            // request runs without idempotency until someone fixes it.
            if fails_until_fixed(error) {
                tracing::error!(%error, outcome = "store_error", endpoint, %key, "the store is set up wrongly; running without idempotency (fail_open) until what the error names is fixed");
            } else {
                tracing::warn!(%error, outcome = "store_error", endpoint, %key, "store failed; running without idempotency (fail_open)");
            }
            return handler.await;
        }
        self.refused(error)
    }

    /// [`refused_for`] this engine's endpoint and key.
    fn refused(&self, error: &StoreError) -> Response {
        refused_for(error, Some(self.endpoint.name()), &self.key)
    }

    fn replay(&self, record: &Completed, exact: Option<ExactRequest>) -> Response {
        if record.fingerprint != self.fingerprint {
            return self.mismatch();
        }
        if let Some(ExactRequest(request)) = exact {
            // Its next exact repeat is answered before the body is parsed.
            self.settings
                .exact
                .remember(&self.key, request, self.fingerprint);
        }
        match replay(&record.response) {
            Ok(response) => {
                tracing::debug!(
                    outcome = "replayed",
                    status = record.response.status.as_u16()
                );
                response
            }
            Err(problem) => unreplayable(problem, Some(self.endpoint.name()), &self.key),
        }
    }

    fn mismatch(&self) -> Response {
        // The endpoint goes to the log only: the record does not say where
        // the key was first used, and the name (by default the handler's
        // module path) is no business of the client's. On the event itself
        // because the request's span is at debug level, as on every event
        // at info level or above.
        tracing::info!(
            outcome = "mismatch",
            endpoint = self.endpoint.name(),
            key = %self.key.log_id(),
            "idempotency key reused with a different request"
        );
        Problem::new(
            ProblemKind::KeyReused,
            "this idempotency key was already used with a different request (body, parameters or method, at this endpoint or another one); send a new key for a new request",
        )
        .into_response()
    }

    fn in_progress(&self) -> Response {
        tracing::info!(
            outcome = "conflict",
            endpoint = self.endpoint.name(),
            key = %self.key.log_id(),
            "a request with this key is still in flight"
        );
        Problem::new(
            ProblemKind::RequestInProgress,
            "the first request with this idempotency key is still being processed; send it again with the same key after the Retry-After delay to get its response",
        )
        .retry_after(RETRY_AFTER_SECS)
        .into_response()
    }

    /// Runs the claimed request so that dropping this future (the client
    /// went away) does not cancel it: the rest moves onto a task. Not an
    /// `async fn`, which would keep a second copy of the engine in the
    /// request's future beside the one the pipeline owns.
    ///
    /// The boxed pipeline is kept under 1,032 bytes, the largest block
    /// glibc's per-thread cache hands out: at 1,072 bytes each first
    /// execution took malloc's slower large-block path, about 1,200
    /// instructions more per request (`bench/src/bin/request-cost.rs`).
    /// A test checks the budget in release builds (CI runs it).
    fn execute(
        self,
        token: LeaseToken,
        handler: Handler,
        sent: Instant,
        suspended: bool,
    ) -> impl Future<Output = Response> + Send {
        let tracked = self.settings.detached.token();
        let pipeline: Pipeline = Box::pin(self.run_claimed(token, handler, sent, suspended));
        let detachable = Detachable {
            pipeline: Some(pipeline),
            tracked,
            span: tracing::Span::current(),
            polling: false,
        };
        detachable.map(|outcome| match outcome {
            Ok(response) => response,
            // The claim is already released; let the panic reach the server
            // as it would have without idempotency.
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }

    /// `suspended`: the claim's answer did not come at once (see
    /// [`Renewals::let_woken_tasks_run`]).
    #[expect(clippy::manual_async_fn, reason = "halves the future's size")]
    fn run_claimed(
        self,
        token: LeaseToken,
        handler: Handler,
        sent: Instant,
        suspended: bool,
    ) -> impl Future<Output = Result<Response, Panic>> + Send {
        async move {
            // Renewed from before the handler starts until the record is
            // stored or released: a streamed body can take longer than the
            // handler that returned it, and a slow store must not let the
            // lease lapse while the record is on its way.
            let lease = self.endpoint.lease_duration();
            let held = (token, self.fingerprint);
            let endpoint = self.endpoint.name();
            let renewals = Renewals::start(&self.settings, endpoint, &self.key, lease, held, sent);
            let mut unfinished = Unfinished::new(&self, Ran::Running);
            renewals.let_woken_tasks_run(suspended).await;
            let produced = AssertUnwindSafe(self.produce(handler)).catch_unwind().await;
            let outcome = match produced {
                Ok(Produced::Final(parts, body)) => {
                    unfinished.ran = Ran::Answered(parts.status);
                    // Asked before anything is stored: see `store_again`.
                    let lost = renewals.begin_storing();
                    let response = self.keep(token, parts, body, lost).await;
                    drop(renewals);
                    Ok(response)
                }
                Ok(Produced::NotFinal(response, reason)) => {
                    unfinished.ran = Ran::Answered(response.status());
                    let lost = renewals.stop();
                    let status = Some(response.status().as_u16());
                    self.release(token, (reason, status), lost).await;
                    Ok(response)
                }
                Err(panic) => {
                    unfinished.ran = Ran::Panicked;
                    let lost = renewals.stop();
                    self.release(token, ("handler panicked", None), lost).await;
                    Err(panic)
                }
            };
            unfinished.settled();
            outcome
        }
    }

    /// Runs the handler and, for a final status, reads the body to store.
    async fn produce(&self, handler: Handler) -> Produced {
        let response = handler.await;
        let status = response.status();
        if !self.endpoint.final_status_policy().is_final(status) {
            return Produced::NotFinal(response, "status is not final");
        }
        if let Some(Unstored(reason)) = response.extensions().get::<Unstored>().copied() {
            return Produced::NotFinal(response, reason);
        }
        if self.input_rejected
            && !self.endpoint.final_status_policy().lists(status)
            && answers_malformed_input(status)
        {
            return Produced::NotFinal(response, "the handler answered a rejected input");
        }
        let (parts, body) = response.into_parts();
        match collect_response(&parts, body, self.settings.max_body_bytes).await {
            // Stored without its body, it would answer the `GET` after the
            // `HEAD` 410, though no caller had the body (see `HeadAnswer`).
            Collected::Partial(body, _) if parts.extensions.get::<HeadAnswer>().is_some() => {
                Produced::NotFinal(Response::from_parts(parts, body), HEAD_BODY_NOT_KEPT)
            }
            collected => Produced::Final(parts, collected),
        }
    }

    /// Stores a final response and hands it on. `lost_before_storing`: a
    /// renewal found the lease lost before the run began to store it.
    #[expect(clippy::manual_async_fn, reason = "halves the future's size")]
    fn keep(
        &self,
        token: LeaseToken,
        parts: Parts,
        body: Collected,
        lost_before_storing: bool,
    ) -> impl Future<Output = Response> + Send + '_ {
        async move {
            let (stored_body, body) = match body {
                Collected::Complete(bytes) if parts.headers.len() > MAX_STORED_HEADERS => {
                    self.not_stored(NotKept::TooManyHeaders);
                    (None, Body::from(bytes))
                }
                Collected::Complete(bytes) => (Some(bytes.clone()), Body::from(bytes)),
                Collected::Partial(body, not_kept) => {
                    self.not_stored(not_kept);
                    (None, body)
                }
            };
            self.store(token, &parts, stored_body, lost_before_storing)
                .await;
            Response::from_parts(parts, body)
        }
    }

    /// Completes the record with the response, trying again after a store
    /// error that may pass: until the record is stored, a retry that comes
    /// after the lease lapses runs the handler again. The first attempts
    /// hold the caller's response back; the rest go on without it
    /// ([`store_later`](Self::store_later)).
    async fn store(
        &self,
        token: LeaseToken,
        parts: &Parts,
        body: Option<Bytes>,
        lost_before_storing: bool,
    ) {
        let stored = match self.complete(token, parts, body.clone()).await {
            Ok(()) => Ok(()),
            // Tried again, it would fail alike; and the store answered,
            // so there is no applied attempt to look for either.
            Err(error) if fails_until_fixed(&error) => Err(error),
            // Boxed: only a failed attempt pays for the retries.
            Err(error) => {
                let response = stored_response(parts, body);
                let again = self.store_again(token, response, error, lost_before_storing);
                return Box::pin(again).await;
            }
        };
        self.log_stored(stored, parts.status);
    }

    /// The attempts after a first one failed with `error`. A record of
    /// this response found after they failed is this run's, stored by an
    /// attempt whose answer was lost, unless the lease was lost before the
    /// run began to store (`lost_before_storing`): then it is the response
    /// of another run, which took the key over and answered alike (a 204,
    /// a body without an id of its own), and the request ran twice; nor is
    /// the response stored later, under a lease already lost.
    async fn store_again(
        &self,
        token: LeaseToken,
        response: StoredResponse,
        error: StoreError,
        lost_before_storing: bool,
    ) {
        // Under a lease a renewal found lost, no attempt could store the
        // response: the client is not kept waiting through the pauses.
        let stored = if lost_before_storing {
            Err(error)
        } else {
            self.after_pauses(error, "could not store the response; trying again", || {
                self.complete_with(token, response.clone())
            })
            .await
        };
        // After the warnings of the failed attempts, the log at info says
        // how it ended.
        let Err(error) = stored else {
            return self.stored_after_warnings(response.status);
        };
        let record = self.read_record().await;
        if !lost_before_storing && self.holds(&record, &response) {
            tracing::debug!("an attempt whose answer was lost had stored the response");
            return self.stored_after_warnings(response.status);
        }
        match error {
            StoreError::LeaseLost => self.lost_unstored(&record, response.status),
            // Later attempts would be refused under a lease already lost,
            // and would take a record of this response found meanwhile,
            // another run's, for their own: the run is a `lease_lost` now.
            error if may_pass(&error) && lost_before_storing => {
                self.lost_unstored(&record, response.status);
            }
            error if may_pass(&error) => self.store_later(token, response, &error),
            error => self.log_stored(Err(error), response.status),
        }
    }

    /// Logs the one `lease_lost` of a run whose completion found another
    /// request holding the key, or none, or failed after a renewal had
    /// found the lease lost: `record` is the key's record as read after it
    /// (see [`holder`]). The run's renewals, which may have found the loss
    /// first, only warned of it.
    fn lost_unstored(&self, record: &Result<Option<Record>, StoreError>, status: StatusCode) {
        let (endpoint, key, status) = (self.endpoint.name(), self.key.log_id(), status.as_u16());
        let message = match record {
            Ok(None) => GONE_UNSTORED,
            _ => LOST,
        };
        let record = holder(record);
        tracing::error!(outcome = "lease_lost", endpoint, %key, status, record, message);
    }

    /// Goes on storing the response on a task of its own once the first
    /// attempts failed, for as long as a lease: a store that fails over or
    /// restarts takes longer than those attempts, and until the record is
    /// stored a retry that comes after the lease lapses runs the handler
    /// again. The lease fences every attempt, so a late one cannot
    /// overwrite another request's record. Tracked, so that
    /// [`Idempotency::drain`](crate::Idempotency::drain) waits for it (and
    /// has it make a last attempt at once). Given up at once when the
    /// responses already waiting hold [`STORING_LATER_MAX_BYTES`]: a store
    /// that takes claims but refuses completions would otherwise have every
    /// request's response held for a lease.
    fn store_later(&self, token: LeaseToken, response: StoredResponse, error: &StoreError) {
        let (endpoint, key) = (self.endpoint.name(), self.key.log_id());
        let runtime = tokio::runtime::Handle::try_current();
        let reserved = Reserved::take(&self.settings, response.size_bytes());
        let (Ok(runtime), Some(reserved)) = (runtime, reserved) else {
            tracing::error!(%error, outcome = "store_error", endpoint, %key, message = NOT_STORED);
            return;
        };
        tracing::warn!(%error, endpoint, %key, "{STORING_LATER}");
        let later = Engine {
            settings: Arc::clone(&self.settings),
            endpoint: self.endpoint,
            key: self.key.clone(),
            fingerprint: self.fingerprint,
            input_rejected: self.input_rejected,
            _request_headers: None,
        };
        // Made before the task is spawned: a runtime that ends before the
        // task first runs drops it unpolled, and that is cut short too.
        let unfinished = Unfinished::new(later, Ran::Answered(response.status));
        let task = async move {
            let later = unfinished.engine();
            later.keep_storing(token, response, reserved).await;
            unfinished.settled();
        };
        let task = task.instrument(tracing::Span::current());
        drop(self.settings.detached.spawn_on(task, &runtime));
    }

    /// [`store_later`](Self::store_later)'s attempts, pausing longer each
    /// time, until one stores the response, the lease is lost, the store
    /// fails in a way that only fixing it ends, a lease has passed, or a
    /// drain asked for a last attempt. The lease is renewed meanwhile, as
    /// while the handler ran: held, it lets no retry run the handler
    /// again, and a record of this response found after a lost answer is
    /// this run's (another request could only have taken the key over
    /// once the lease lapsed, which the renewals log as `lease_lapsed`).
    async fn keep_storing(&self, token: LeaseToken, response: StoredResponse, _: Reserved) {
        let lease = self.endpoint.lease_duration();
        let held = (token, self.fingerprint);
        let endpoint = self.endpoint.name();
        // Due at once, as if claimed a third of a lease ago: the run's
        // renewals stopped when it handed the response over, and those
        // that failed in the outage that failed its completions may have
        // left less of the lease than a claim made now holds. Due a third
        // of a lease from now, the first renewal could come after the
        // lease lapsed, once the store was back, and a retry would run
        // the handler again.
        let due_now = Instant::now().checked_sub(lease / 3);
        let renewals = Renewals::start(
            &self.settings,
            endpoint,
            &self.key,
            lease,
            held,
            due_now.unwrap_or_else(Instant::now),
        );
        // Its record, stored by an attempt whose answer was lost, is no
        // takeover to warn of when a renewal meets it.
        renewals.begin_storing();
        let until = Instant::now() + lease;
        let draining = &self.settings.draining;
        let (mut pause, longest) = LATER_PAUSES;
        let stored = loop {
            let pause_until = until.min(Instant::now() + pause);
            // Until the pause ends, or a drain asks for a last attempt.
            drop(tokio::time::timeout_at(pause_until, draining.cancelled()).await);
            pause = (pause * 2).min(longest);
            let last = draining.is_cancelled() || Instant::now() >= until;
            match self.complete_with(token, response.clone()).await {
                Err(error) if may_pass(&error) && !last => {
                    tracing::debug!(%error, "could not store the response; trying again");
                }
                // Another request holds the key. The same response stored
                // may be this run's, by an attempt whose answer was lost,
                // or another run's after a takeover: only a lease token in
                // the record would tell, so the log names both.
                Err(StoreError::LeaseLost) => {
                    let record = self.read_record().await;
                    let same = self.holds(&record, &response);
                    let message = if same {
                        LOST_LATER_OR_STORED
                    } else {
                        LOST_LATER
                    };
                    break Err((message, holder(&record)));
                }
                Err(_) if self.stored_already(&response).await => break Ok(()),
                Err(error) => {
                    self.log_stored(Err(error), response.status);
                    return;
                }
                Ok(()) => break Ok(()),
            }
        };
        drop(renewals);
        let key = self.key.log_id();
        match stored {
            Ok(()) => {
                let status = response.status.as_u16();
                tracing::info!(outcome = "executed", endpoint, %key, status, "{STORED_LATER}");
            }
            Err((message, record)) => {
                let status = response.status.as_u16();
                tracing::error!(outcome = "lease_lost", endpoint, %key, status, record, message);
            }
        }
    }

    /// Logs a response stored by an attempt after the first failed, which
    /// warned: at info, as [`STORED_LATER`] is.
    fn stored_after_warnings(&self, status: StatusCode) {
        let (endpoint, key, status) = (self.endpoint.name(), self.key.log_id(), status.as_u16());
        tracing::info!(outcome = "executed", endpoint, %key, status, "the response was stored after the store failed at first");
    }

    /// Logs how storing a response ended.
    fn log_stored(&self, stored: Result<(), StoreError>, status: StatusCode) {
        let (endpoint, key) = (self.endpoint.name(), self.key.log_id());
        match stored {
            Ok(()) => tracing::debug!(outcome = "executed", status = status.as_u16()),
            Err(error) if fails_until_fixed(&error) => {
                tracing::error!(%error, outcome = "store_error", endpoint, %key, message = NOT_STORED_UNTIL_FIXED);
            }
            Err(error) => {
                tracing::error!(%error, outcome = "store_error", endpoint, %key, message = NOT_STORED);
            }
        }
    }

    /// One attempt at completing the record, the stored response rebuilt
    /// from what the caller gets so that the first attempt costs no copy.
    fn complete(
        &self,
        token: LeaseToken,
        parts: &Parts,
        body: Option<Bytes>,
    ) -> impl Future<Output = Result<(), StoreError>> {
        self.complete_with(token, stored_response(parts, body))
    }

    /// One attempt at completing the record with `response`, cut at the
    /// store timeout.
    fn complete_with(
        &self,
        token: LeaseToken,
        response: StoredResponse,
    ) -> impl Future<Output = Result<(), StoreError>> {
        let ttl = self.endpoint.result_ttl();
        self.timed(
            self.settings
                .store
                .complete(&self.key, token, response, ttl),
        )
    }

    /// Whether the store holds this request's completed record: its
    /// fingerprint, and the response this run produced (a duplicate that
    /// took the key over after the lease lapsed stores a response of its
    /// own). A store may have kept it without its body, past its limit
    /// on one value. An attempt whose answer was lost (a timeout, a
    /// dropped connection) may have been applied, and then the lease is
    /// gone because the record is stored: found by the next attempt, or
    /// by the same one if the client sent its command again (the Redis
    /// Cluster client does, after a dropped connection).
    async fn stored_already(&self, response: &StoredResponse) -> bool {
        self.holds(&self.read_record().await, response)
    }

    /// Whether `record`, as read, is this request's completed record (see
    /// [`stored_already`](Self::stored_already)).
    fn holds(
        &self,
        record: &Result<Option<Record>, StoreError>,
        response: &StoredResponse,
    ) -> bool {
        let Ok(Some(Record::Completed(record))) = record else {
            return false;
        };
        let stored = &record.response;
        record.fingerprint == self.fingerprint
            && stored.status == response.status
            && stored.headers == response.headers
            && (stored.body.is_none() || stored.body == response.body)
    }

    /// Releases the key, trying again after a store error that may pass,
    /// as a completion is: until it is released, retries get 409 for as
    /// long as the lease has left to run. `why`: the reason, and the
    /// handler's status, which the log names, so that a 503 from a payment
    /// provider is told apart from a 429 (none for a panic).
    /// `lost_while_running`: a renewal found the lease lost before the
    /// release was sent (see [`Renewals::stop`]).
    async fn release(
        &self,
        token: LeaseToken,
        why: (&'static str, Option<u16>),
        lost_while_running: bool,
    ) {
        let (reason, status) = why;
        let released = match self.release_once(token).await {
            // A lost lease is final: the key is not this request's to free;
            // and so is an error that would fail every attempt alike.
            Err(error) if may_pass(&error) => {
                // Boxed: only a failed attempt pays for the retries.
                Box::pin(self.release_again(token, error)).await
            }
            released => released,
        };
        let (endpoint, key) = (self.endpoint.name(), self.key.log_id());
        match released {
            Ok(()) => tracing::info!(outcome = "released", endpoint, %key, reason, status),
            // Boxed: only a lost lease pays for the read.
            Err(StoreError::LeaseLost) => {
                Box::pin(self.release_refused(why, lost_while_running)).await;
            }
            Err(error) if fails_until_fixed(&error) => {
                tracing::error!(%error, outcome = "store_error", endpoint, %key, reason, status, message = NOT_RELEASED_UNTIL_FIXED);
            }
            Err(error) => {
                tracing::error!(%error, outcome = "store_error", endpoint, %key, reason, status, message = NOT_RELEASED);
            }
        }
    }

    /// Logs a release that found the lease gone, by what holds the key
    /// now. Lost while the handler ran (`lost_while_running`), the lease
    /// was taken over, or the record dropped: one `lease_lost`, whatever
    /// holds the key. Otherwise a record there is another request's, which
    /// took the key over after the lease lapsed and ran beside this one,
    /// or claimed the key that an attempt whose answer was lost had freed
    /// (one waiting on a `wait` endpoint polls at least every 200 ms, well
    /// within a retry's pause): only a takeover is harmful, and nothing
    /// here tells them apart, so the message names both. No record: an
    /// attempt whose answer was lost (a timeout, a dropped connection; or
    /// the same attempt, which the Redis Cluster client sends again after
    /// a dropped connection) released it, and nothing is left to free.
    async fn release_refused(&self, why: (&'static str, Option<u16>), lost_while_running: bool) {
        let ((reason, status), record) = (why, self.read_record().await);
        let (endpoint, key) = (self.endpoint.name(), self.key.log_id());
        let message = match (&record, lost_while_running) {
            (Ok(Some(_)), false) => TAKEN_OVER,
            (_, false) => {
                tracing::info!(outcome = "released", endpoint, %key, reason, status, "{NOT_HELD}");
                return;
            }
            (Ok(None), true) => GONE_WHILE_RUNNING,
            (_, true) => TAKEN_OVER_WHILE_RUNNING,
        };
        let record = holder(&record);
        tracing::error!(outcome = "lease_lost", endpoint, %key, reason, status, record, message);
    }

    /// The key's record as the store holds it now.
    async fn read_record(&self) -> Result<Option<Record>, StoreError> {
        self.timed(self.settings.store.get(&self.key)).await
    }

    /// The attempts after a first release failed with `error`, other than
    /// a lost lease. One that finds the lease lost is told apart by
    /// [`release`](Self::release): an earlier attempt whose answer was
    /// lost may have been applied, or another request took the key over.
    async fn release_again(&self, token: LeaseToken, error: StoreError) -> Result<(), StoreError> {
        self.after_pauses(error, "could not release the key; trying again", || {
            self.release_once(token)
        })
        .await
    }

    fn release_once(&self, token: LeaseToken) -> impl Future<Output = Result<(), StoreError>> {
        self.timed(self.settings.store.release(&self.key, token))
    }

    /// Runs `attempt` again after each of [`STORE_RETRY_PAUSES`] while it
    /// fails (`error` is the first attempt's), until it succeeds or fails
    /// for good: the lease is lost (another request holds the key), or the
    /// store fails in a way that only fixing it ends
    /// ([`fails_until_fixed`]), which each pause would only hold the
    /// caller's response back for, under a warning each.
    async fn after_pauses<F>(
        &self,
        mut error: StoreError,
        warning: &'static str,
        attempt: impl Fn() -> F,
    ) -> Result<(), StoreError>
    where
        F: Future<Output = Result<(), StoreError>>,
    {
        for pause in STORE_RETRY_PAUSES {
            if !may_pass(&error) {
                break;
            }
            let (endpoint, key) = (self.endpoint.name(), self.key.log_id());
            tracing::warn!(%error, endpoint, %key, "{warning}");
            tokio::time::sleep(pause).await;
            match attempt().await {
                Ok(()) => return Ok(()),
                Err(again) => error = again,
            }
        }
        Err(error)
    }

    fn not_stored(&self, not_kept: NotKept) {
        let (endpoint, key, reason) = (self.endpoint.name(), self.key.log_id(), not_kept.reason());
        // An event stream is never stored, by design: every such request
        // would warn of what its endpoint always does.
        if not_kept == NotKept::EventStream {
            tracing::info!(endpoint, %key, reason, "{NOT_KEPT}");
        } else {
            tracing::warn!(endpoint, %key, reason, "{NOT_KEPT}");
        }
    }
}

const NOT_KEPT: &str =
    "response body not stored; retries with this key get 410 response-not-stored";

/// The answer to a retry whose completed record cannot be replayed: its
/// body was not stored (410, which the first request's warning
/// explained), or it cannot be rebuilt (500, which needs a look).
pub(crate) fn unreplayable(
    problem: Problem,
    endpoint: Option<&'static str>,
    key: &RecordKey,
) -> Response {
    let key = key.log_id();
    if problem.kind() == ProblemKind::ResponseNotStored {
        tracing::info!(
            outcome = "not_stored",
            endpoint,
            %key,
            "the response to this key was not stored; answered 410"
        );
    } else {
        let detail = problem.detail();
        tracing::error!(outcome = "store_error", endpoint, %key, detail, "stored record cannot be replayed; request refused, nothing executed");
    }
    problem.into_response()
}

/// The answer to a request refused because the store failed: nothing ran.
/// Only a store that may come back by itself is a 503 with `Retry-After`;
/// a record that does not decode, or a store set up wrongly, fails a retry
/// soon after the same way, so those are 500s without it (see
/// `Problem::from(&StoreError)`). The log names the class by the
/// problem's title: that conversion alone sorts the errors.
pub(crate) fn refused_for(
    error: &StoreError,
    endpoint: Option<&'static str>,
    key: &RecordKey,
) -> Response {
    let key = key.log_id();
    let problem = Problem::from(error);
    let class = problem.kind().title();
    tracing::error!(%error, outcome = "store_error", endpoint, %key, "{class}; request refused, nothing executed");
    problem.into_response()
}

/// Whether `error` fails every attempt alike until someone fixes the
/// store's setup or the key's record: the classes that
/// `Problem::from(&StoreError)` answers without `Retry-After`, as against
/// a store that may come back by itself. Trying such a call again, after
/// the handler ran, only holds its response back and buries the error
/// that names the fix under warnings.
pub(crate) fn fails_until_fixed(error: &StoreError) -> bool {
    Problem::from(error).kind() != ProblemKind::StoreUnavailable
}

/// Whether `status` is one that answers a malformed request, as axum's
/// extractors answer their rejections (400, 422; their 413 and 415 are
/// not final anyway). Another 4xx beside a rejected input (402 for a
/// declined charge, 404, 403) is the outcome of a run that may have
/// acted, whatever became of the input: it is stored, or the retry would
/// act again.
pub(crate) fn answers_malformed_input(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY
    )
}

/// The response as stored for replay: its status, the headers a replay
/// carries, and `body`.
fn stored_response(parts: &Parts, body: Option<Bytes>) -> StoredResponse {
    StoredResponse {
        status: parts.status,
        headers: replayable_headers(parts),
        body,
    }
}

/// What holds a key whose lease a run lost, as its `lease_lost` names it
/// (`record`), from the key's record as read after the loss: what a retry
/// gets. `in_flight`: another request runs it (409 until it ends);
/// `completed`: another request's response is stored (a retry replays
/// it); `gone`: nothing (a retry runs the request again); `unread`: the
/// read failed.
fn holder(record: &Result<Option<Record>, StoreError>) -> &'static str {
    match record {
        Ok(Some(Record::InFlight(_))) => "in_flight",
        Ok(Some(Record::Completed(_))) => "completed",
        Ok(None) => "gone",
        Err(_) => "unread",
    }
}

/// Whether trying again may succeed: neither another request holds the
/// key now, nor does the store fail this way until it is fixed.
fn may_pass(error: &StoreError) -> bool {
    !matches!(error, StoreError::LeaseLost) && !fails_until_fixed(error)
}

/// `operation`, cut after `timeout`.
pub(crate) async fn within<T>(
    timeout: Duration,
    operation: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let mut operation = pin!(operation);
    // A store that answers at once (the in-memory one) needs no timer.
    if let Poll::Ready(result) = poll_once(&mut operation).await {
        return result;
    }
    // Boxed: only a store that did not answer at once needs the timer,
    // and inline it would add its size to every request's future and
    // pipeline (see `Engine::execute`).
    match Box::pin(tokio::time::timeout(timeout, operation)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(StoreError::Timeout(timeout)),
    }
}

/// `operation`'s output, and whether it suspended the task on its way
/// (was not ready at its first poll).
async fn noting_suspension<T>(operation: impl Future<Output = T>) -> (T, bool) {
    let mut operation = pin!(operation);
    match poll_once(&mut operation).await {
        Poll::Ready(output) => (output, false),
        Poll::Pending => (operation.await, true),
    }
}

/// Polls `future` once, without waiting.
pub(crate) async fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *future).poll(cx))).await
}

/// A claim acquired but not yet handed to its run, while the engine makes
/// sure it is still held. Dropped before [`settled`](Self::settled) (the
/// client went away), it is released on a task of its own, tracked for
/// [`Idempotency::drain`](crate::Idempotency::drain): the handler never
/// ran, and the release is fenced by the token, so it frees the key only
/// if this claim still holds it (and a store's own hold on it, such as
/// [`Tiered`](crate::store::Tiered)'s cache, which would otherwise stay
/// until its lease lapsed).
struct Unsettled<'a> {
    engine: &'a Engine,
    token: Option<LeaseToken>,
    /// Counts the claim for `drain` while it is unsettled, as
    /// [`Detachable::tracked`] counts a run.
    tracked: TaskTrackerToken,
}

impl Unsettled<'_> {
    fn settled(mut self) {
        self.token = None;
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        let (Some(token), Ok(runtime)) = (self.token, tokio::runtime::Handle::try_current()) else {
            return;
        };
        let settings = Arc::clone(&self.engine.settings);
        let (endpoint, key) = (self.engine.endpoint.name(), self.engine.key.clone());
        let release = async move {
            let released = settings.store.release(&key, token);
            match within(settings.store_timeout, released).await {
                Ok(()) | Err(StoreError::LeaseLost) => {}
                Err(error) => {
                    tracing::warn!(%error, endpoint, key = %key.log_id(), message = NOT_RELEASED);
                }
            }
        };
        drop(self.tracked.task_tracker().spawn_on(release, &runtime));
    }
}

/// How far a claimed run's handler got.
#[derive(Clone, Copy)]
enum Ran {
    /// It runs, or its response body is being read: it may have acted,
    /// in part or in full.
    Running,
    /// It finished, answering this status: whatever it did is done.
    Answered(StatusCode),
    /// It panicked, after doing whatever it did before.
    Panicked,
}

/// A claimed run that has not stored its response or released its key
/// yet. Dropped before [`settled`](Self::settled), the run was cut short:
/// its task was dropped (a runtime that shut down without
/// [`Idempotency::drain`](crate::Idempotency::drain), or a request dropped
/// outside a tokio runtime, where [`Detachable`] cannot spawn the rest),
/// or it panicked
/// outside the handler. Nothing else then tells the operator, who must
/// reconcile the key: it stays claimed until its lease lapses, a retry
/// after that runs the request again, and whether the side effect
/// happened depends on how far the handler got (`ran`).
///
/// `E` is the run's engine, borrowed by a run, owned by the task that
/// goes on storing a response after its caller got it.
struct Unfinished<E: Borrow<Engine>> {
    engine: E,
    ran: Ran,
    settled: bool,
}

impl<E: Borrow<Engine>> Unfinished<E> {
    fn new(engine: E, ran: Ran) -> Self {
        let settled = false;
        Self {
            engine,
            ran,
            settled,
        }
    }

    fn engine(&self) -> &Engine {
        self.engine.borrow()
    }

    fn settled(mut self) {
        self.settled = true;
    }
}

impl<E: Borrow<Engine>> Drop for Unfinished<E> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let engine = self.engine();
        let (endpoint, key) = (engine.endpoint.name(), engine.key.log_id());
        let (handler, status) = match self.ran {
            Ran::Running => ("running", None),
            Ran::Answered(status) => ("answered", Some(status.as_u16())),
            Ran::Panicked => ("panicked", None),
        };
        tracing::error!(outcome = "cut_short", endpoint, %key, handler, status, message = CUT_SHORT);
    }
}

/// Bytes of a response waiting to be stored later, counted against
/// [`STORING_LATER_MAX_BYTES`] until dropped.
struct Reserved {
    settings: Arc<Settings>,
    bytes: usize,
}

impl Reserved {
    /// `None` when `bytes` more would go over the limit.
    fn take(settings: &Arc<Settings>, bytes: usize) -> Option<Self> {
        let waiting = &settings.storing_later_bytes;
        let before = waiting.fetch_add(bytes, Ordering::Relaxed);
        let reserved = Self {
            settings: Arc::clone(settings),
            bytes,
        };
        (before + bytes <= STORING_LATER_MAX_BYTES).then_some(reserved)
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let waiting = &self.settings.storing_later_bytes;
        waiting.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Polls a pipeline in place and, if dropped before it finishes, spawns the
/// rest so the handler's outcome is still recorded. Spawning only on drop
/// keeps the common path free of a task hop.
struct Detachable {
    pipeline: Option<Pipeline>,
    /// The span current when the run began: the request's, or, where that
    /// one is off (a subscriber at `info`), the caller's (a request id, a
    /// trace). A spawned rest runs in it. Taken then, not when the
    /// request is dropped: the request's future enters its own span around
    /// its drop, but nothing enters the caller's, which `tower_http::trace`
    /// and the like enter only around a poll.
    span: tracing::Span,
    /// Counts this run for [`Idempotency::drain`](crate::Idempotency::drain)
    /// from the start, not only once its rest is spawned: a server's
    /// graceful shutdown may end before the connection's task drops the
    /// request (axum's lets the shutdown finish first), and a drain
    /// between the two must still wait for it. A spawned rest is tracked
    /// by the same tracker before this token goes.
    tracked: TaskTrackerToken,
    /// Set while the pipeline is polled: still set when it is dropped, the
    /// pipeline itself panicked.
    polling: bool,
}

impl Future for Detachable {
    type Output = Result<Response, Panic>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let Some(pipeline) = this.pipeline.as_mut() else {
            return Poll::Pending;
        };
        this.polling = true;
        let polled = pipeline.as_mut().poll(cx);
        this.polling = false;
        let output = std::task::ready!(polled);
        this.pipeline = None;
        Poll::Ready(output)
    }
}

impl Drop for Detachable {
    fn drop(&mut self) {
        // The pipeline itself panicked: it must not be polled again. A
        // request dropped during some other unwind still finishes.
        if self.polling {
            return;
        }
        let Some(pipeline) = self.pipeline.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let span = std::mem::replace(&mut self.span, tracing::Span::none());
                let rest = pipeline.instrument(span);
                let rest = async move { drop(rest.await) };
                drop(self.tracked.task_tracker().spawn_on(rest, &runtime));
            }
            // Nothing to run the rest on: dropped here, its `Unfinished`
            // logs it as `cut_short`, with its endpoint and key.
            Err(_) => drop(pipeline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Idempotency;
    use crate::key::IdempotencyKey;
    use crate::store::MemoryStore;

    #[test]
    fn responses_waiting_to_be_stored_later_hold_at_most_the_limit_in_all() {
        let settings = Idempotency::new(MemoryStore::new()).inner;
        let half = STORING_LATER_MAX_BYTES / 2;
        let first = Reserved::take(&settings, half).expect("under the limit");
        let second = Reserved::take(&settings, half).expect("at the limit");
        assert!(Reserved::take(&settings, 1).is_none(), "over the limit");
        drop(first);
        let third = Reserved::take(&settings, half).expect("freed by the first");
        drop((second, third));
        assert_eq!(settings.storing_later_bytes.load(Ordering::Relaxed), 0);
    }

    /// Lines a `fmt` subscriber writes, kept for the test to read.
    #[derive(Clone, Default)]
    struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let mut lines = self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            lines.extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What a subscriber at `level` writes while `logging` runs.
    fn log_of(level: tracing::Level, logging: impl FnOnce()) -> String {
        let lines = Lines::default();
        let written = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || written.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, logging);
        let lines = lines
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        String::from_utf8_lossy(&lines).into_owned()
    }

    fn current_thread_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// A keyed request to the endpoint `pay` on `idempotency`.
    fn keyed_request(idempotency: &Idempotency) -> IdempotentRequest {
        IdempotentRequest {
            idempotency: idempotency.clone(),
            key: Some(IdempotencyKey::parse(b"k").expect("a valid key")),
            scope: ScopeSource::Resolved(Ok(ScopeDigest::global())),
            exact: None,
            route: None,
            method: None,
            input_rejected: false,
        }
    }

    /// What a subscriber at `level` writes of a request whose handler
    /// answers `status` and whose future is dropped while the handler
    /// runs (the client went away), so that the rest of its run is
    /// spawned. Polled inside the caller's span, `request{id=7}`, entered
    /// only around the poll, as `tower_http::trace` enters its span.
    fn log_of_a_request_dropped_mid_handler(level: tracing::Level, status: StatusCode) -> String {
        log_of(level, || request_dropped_mid_handler(status))
    }

    fn request_dropped_mid_handler(status: StatusCode) {
        let runtime = current_thread_runtime();
        let idempotency = Idempotency::new(MemoryStore::new());
        runtime.block_on(async {
            let (release, released) = tokio::sync::oneshot::channel::<()>();
            let handler: Handler = Box::pin(async move {
                drop(released.await);
                status.into_response()
            });
            let request = keyed_request(&idempotency);
            let caller = tracing::info_span!("request", id = 7);
            let fingerprint = Ok(Fingerprint::from_bytes([0; 32]));
            let mut response = {
                let _polled = caller.enter();
                Box::pin(run(request, &Endpoint::new("pay"), fingerprint, handler))
            };
            let polled = poll_once(&mut response).instrument(caller).await;
            assert!(polled.is_pending());
            drop(response);
            release.send(()).expect("the run waits for its handler");
            idempotency.drain().await;
        });
    }

    /// A run dropped outside a runtime, where the rest of it cannot be
    /// spawned, is one event, not two: its `cut_short`, which names the
    /// endpoint, the key and how far the handler got.
    #[test]
    fn a_run_dropped_outside_a_runtime_is_logged_once() {
        let lines = log_of(tracing::Level::INFO, || {
            let runtime = current_thread_runtime();
            let idempotency = Idempotency::new(MemoryStore::new());
            let (_release, released) = tokio::sync::oneshot::channel::<()>();
            let handler: Handler = Box::pin(async move {
                drop(released.await);
                StatusCode::CREATED.into_response()
            });
            let request = keyed_request(&idempotency);
            let fingerprint = Ok(Fingerprint::from_bytes([0; 32]));
            let endpoint = Endpoint::new("pay");
            let mut response = Box::pin(run(request, &endpoint, fingerprint, handler));
            let polled = runtime.block_on(poll_once(&mut response));
            assert!(polled.is_pending());
            // Outside `block_on`: no runtime is current.
            drop(response);
        });
        let errors: Vec<&str> = lines
            .lines()
            .filter(|line| line.contains("ERROR"))
            .collect();
        assert_eq!(errors.len(), 1, "{lines}");
        assert!(errors[0].contains("outcome=\"cut_short\""), "{lines}");
        assert!(errors[0].contains("handler=\"running\""), "{lines}");
    }

    /// The line of `lines` with `outcome`.
    fn outcome_line<'a>(lines: &'a str, outcome: &str) -> &'a str {
        let field = format!("outcome=\"{outcome}\"");
        let line = lines.lines().find(|line| line.contains(&field));
        line.unwrap_or_else(|| panic!("no {outcome} in: {lines}"))
    }

    /// A request dropped while its handler runs has the rest of its run
    /// spawned, which still logs in the request's span: the endpoint and
    /// key that tell whose outcome it is.
    #[test]
    fn the_rest_of_a_dropped_request_logs_in_its_span() {
        let lines =
            log_of_a_request_dropped_mid_handler(tracing::Level::DEBUG, StatusCode::CREATED);
        let executed = outcome_line(&lines, "executed");
        assert!(
            executed.contains("idempotent{endpoint=\"pay\""),
            "logged outside the request's span: {executed}"
        );
    }

    /// Where the engine's own span is off (a subscriber at `info`, as in
    /// production), the spawned rest still logs in the caller's span (a
    /// request id, a trace), which its `released` and `store_error` need
    /// to be told apart from other requests' on the same endpoint.
    #[test]
    fn the_rest_of_a_dropped_request_logs_in_the_callers_span_at_info() {
        let status = StatusCode::SERVICE_UNAVAILABLE;
        let lines = log_of_a_request_dropped_mid_handler(tracing::Level::INFO, status);
        let released = outcome_line(&lines, "released");
        assert!(
            released.contains("request{id=7}"),
            "logged outside the caller's span: {released}"
        );
    }

    /// The budget `Engine::execute` keeps the boxed pipeline under, as
    /// release builds lay it out: release is what servers run, and debug
    /// builds compile code under `cfg(debug_assertions)` that can change a
    /// future's layout. CI runs it under the `size-check` profile (`cargo
    /// test --profile size-check -p idempotent-core --lib pipeline`):
    /// release without its optimizations, which rustc applies only after
    /// laying a future out, so the size is release's, for under half of
    /// release's CPU time to build. `--release` runs it too.
    #[test]
    #[cfg_attr(
        debug_assertions,
        ignore = "debug builds can lay futures out larger; run with --profile size-check or --release"
    )]
    fn the_boxed_pipeline_fits_a_block_of_glibcs_per_thread_cache() {
        let engine = Engine {
            settings: Idempotency::new(MemoryStore::new()).inner,
            endpoint: Endpoint::new("pay"),
            key: RecordKey::new(
                ScopeDigest::global(),
                IdempotencyKey::parse(b"k").expect("a valid key"),
            ),
            fingerprint: Fingerprint::from_bytes([0; 32]),
            input_rejected: false,
            _request_headers: None,
        };
        let handler: Handler = Box::pin(async { Response::new(Body::empty()) });
        let pipeline = engine.run_claimed(LeaseToken::random(), handler, Instant::now(), true);
        let size = std::mem::size_of_val(&pipeline);
        assert!(size < 1_032, "the pipeline takes {size} bytes");
    }
}
