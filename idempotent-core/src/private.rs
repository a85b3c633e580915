//! What `#[idempotent]` expands to call.
//!
//! /!\ Not a stable API: only the attribute's expansion may use this
//! module, and it changes with the attribute, whose version is pinned to
//! this crate's.
//!
//! The expansion's compile-time checks are these calls themselves, spanned
//! at the user's tokens (an argument's type, the return type, the scope
//! type, the function's name), so each mistake is reported once, there.

pub use axum;

pub use crate::endpoint::{Endpoint, FinalStatuses, StatusRange};
pub use crate::names::DefaultName;
pub use crate::request::IdempotentRequest;
pub use crate::scope::Scope;

use std::future::Future;
use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::{Extensions, HeaderMap};

use crate::engine::Handler;
use crate::exact;
use crate::fingerprint::{Fingerprint, FingerprintError, FingerprintInput, Fingerprinter};
use crate::problem::Problem;
use crate::request::{ScopeSource, method_binding, route_params, without_replay_marker};
use crate::scope::{self, IdempotencyScope, ScopeDigest};
use crate::whole_body;

/// [`ScopedRequest`] for an endpoint scoped by API key.
pub const API_KEY: u8 = 0;
/// [`ScopedRequest`] for an endpoint with one global key space.
pub const GLOBAL: u8 = 1;
/// [`ScopedRequest`] for an endpoint scoped by the handler's principal.
pub const CUSTOM: u8 = 2;
/// [`ScopedRequest`] for an endpoint scoped by a named header: the kind
/// does not say which header, so the request's headers are copied and the
/// scope resolved when the request runs, as [`IdempotentRequest`] does;
/// with [`KEY_REQUIRED`], a missing key is still refused while extracting.
pub const HEADERS: u8 = 3;
/// Added to one of the scope kinds above for an endpoint that is not
/// `optional`: a request without a key is then refused while its context
/// is extracted, before the handler's body extractor reads and parses the
/// body (as [`IdempotentLayer`](crate::IdempotentLayer) refuses it), so
/// the client learns that the key is missing rather than what is wrong
/// with its body, and is not asked to upload it (`Expect: 100-continue`).
pub const KEY_REQUIRED: u8 = 0x80;

/// The request's idempotency context for an endpoint whose scope kind the
/// attribute knows (`SCOPE`, one of the constants above): the scope is
/// resolved during extraction, so the request's headers are not copied
/// (but for [`HEADERS`]).
#[derive(Debug)]
pub struct ScopedRequest<const SCOPE: u8>(IdempotentRequest);

impl<S: Send + Sync, const SCOPE: u8> FromRequestParts<S> for ScopedRequest<SCOPE> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Self(mut request) = Self::extract(&parts.headers, &parts.extensions, parts.uri.path())?;
        request.route = route_params(parts, request.key.is_some())?;
        request.method = method_binding(&parts.method, request.key.is_some());
        Ok(Self(request))
    }
}

impl<const SCOPE: u8> ScopedRequest<SCOPE> {
    fn extract(headers: &HeaderMap, extensions: &Extensions, path: &str) -> Result<Self, Problem> {
        let request = IdempotentRequest::extract(
            headers,
            extensions,
            path,
            |idempotency, headers| match SCOPE & !KEY_REQUIRED {
                API_KEY => {
                    let header = &idempotency.inner.api_key_header;
                    ScopeSource::Resolved(scope::api_key(headers, header))
                }
                GLOBAL => ScopeSource::Resolved(Ok(ScopeDigest::global())),
                HEADERS => ScopeSource::Headers(Box::new(headers.clone())),
                _ => ScopeSource::Principal,
            },
        )?;
        // The engine would refuse these the same way, only after the body
        // was read and parsed.
        if request.key.is_none() {
            if SCOPE & KEY_REQUIRED != 0 {
                return Err(crate::key::missing(headers));
            }
        } else if let ScopeSource::Resolved(Err(missing)) = &request.scope {
            return Err(crate::engine::missing_credentials(missing.clone()));
        }
        Ok(Self(request))
    }
}

impl<const SCOPE: u8> From<ScopedRequest<SCOPE>> for IdempotentRequest {
    fn from(request: ScopedRequest<SCOPE>) -> Self {
        request.0
    }
}

/// The last argument of a handler whose fingerprinted arguments all come
/// from the request's URI, path parameters and body: extracts the
/// request's idempotency context (`SCOPE` as for [`ScopedRequest`]), then
/// the handler's body extractor `T`. It runs after every other extractor,
/// and answers an exact repeat of a replayed request from the store before
/// `T` parses anything (see the `exact` module). `ENDPOINT` is
/// [`endpoint_id`] of the handler's endpoint name and the attribute's place.
#[derive(Debug)]
pub struct ExactBody<const SCOPE: u8, const ENDPOINT: u64, T>(IdempotentRequest, T);

impl<const SCOPE: u8, const ENDPOINT: u64, T> ExactBody<SCOPE, ENDPOINT, T> {
    /// The idempotency context and the handler's argument.
    pub fn into_parts(self) -> (IdempotentRequest, T) {
        (self.0, self.1)
    }
}

impl<S, T, const SCOPE: u8, const ENDPOINT: u64> FromRequest<S> for ExactBody<SCOPE, ENDPOINT, T>
where
    S: Send + Sync,
    T: FromRequest<S>,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (idempotent, request, watch) = exact_context::<SCOPE>(request, ENDPOINT).await?;
        let inner = T::from_request(request, state).await;
        if let Some(refusal) = whole_body::refusal(watch.as_ref(), Some(&idempotent)) {
            return Err(refusal);
        }
        Ok(Self(
            idempotent,
            inner.map_err(IntoResponse::into_response)?,
        ))
    }
}

/// The last argument of a handler where [`ExactBody`] does not wrap it,
/// whatever extractor it is. One that reads the body ([`FromRequest`]) is
/// given it watched: a body that ended short of its `Content-Length`
/// while `T` read it is refused with 400 `unreadable-body`, where `T`
/// would take the part that came as a whole body (see the `whole_body`
/// module); one that `T` leaves to the handler (`Request`, `Body`,
/// `Multipart`) stays watched, whatever the request's version, for [`run`]
/// to learn whether the handler met its end short, or a failure (the
/// client cancelled the upload, its connection broke). A parts extractor ([`FromRequestParts`]) reads no
/// body and is extracted as it is. Implementing both, as axum has a
/// wrapping extractor do, lets axum infer which one a handler's last
/// argument is, as for the argument itself.
#[derive(Debug)]
pub struct WholeBody<T>(T, BodyWatch);

impl<T> WholeBody<T> {
    /// The watch on the body the handler reads itself, for [`run`], and
    /// the handler's argument.
    pub fn into_parts(self) -> (BodyWatch, T) {
        (self.1, self.0)
    }
}

impl<S, T> FromRequestParts<S> for WholeBody<T>
where
    S: Send + Sync,
    T: FromRequestParts<S>,
{
    type Rejection = T::Rejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let inner = T::from_request_parts(parts, state).await?;
        Ok(Self(inner, BodyWatch::UNWATCHED))
    }
}

impl<S, T> FromRequest<S> for WholeBody<T>
where
    S: Send + Sync,
    T: FromRequest<S>,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (request, watch) = whole_body::watch_all(request);
        let inner = T::from_request(request, state).await;
        if let Some(refusal) = whole_body::refusal(watch.as_ref(), None) {
            return Err(refusal);
        }
        let inner = inner.map_err(IntoResponse::into_response)?;
        // A body `T` dropped (read whole, or left unread) has nothing more
        // to tell, unless it failed while `T` read it and `T` holds the
        // failure for the handler to answer.
        let watch = watch.filter(|watch| watch.is_held() || watch.unread());
        Ok(Self(inner, BodyWatch(watch)))
    }
}

/// Whether the body that a handler reads itself (through `Request`,
/// `Body`, `Multipart`, or an extractor of its own that leaves the body
/// to it) ended short of its `Content-Length` or failed while it was
/// read, which is known only once the handler has read it: see [`run`].
#[derive(Debug)]
pub struct BodyWatch(Option<whole_body::Watch>);

impl BodyWatch {
    /// No body left to watch: the handler's last argument read it whole
    /// while it was extracted (as [`ExactBody`]'s do, refusing a body
    /// that ended short), or it takes none.
    pub const UNWATCHED: Self = Self(None);

    /// `handler`, its answer marked not to be stored if it is one to
    /// malformed input (400 or 422, unless the endpoint lists the status
    /// itself) given after the body it read ended short or failed: the
    /// engine treats it as an answer to a rejected input, so that the
    /// retry with the whole body runs, rather than being answered with the
    /// stored refusal of the part that came. Any other answer is stored as it
    /// is: the handler may have acted on that part.
    fn around(self, handler: Handler, statuses: FinalStatuses) -> Handler {
        let Some(watch) = self.0 else {
            return handler;
        };
        Box::pin(async move { whole_body::unstored_if_unread(handler.await, &watch, statuses) })
    }
}

/// Everything [`ExactBody`] does before its body extractor runs: the
/// request's idempotency context, the answer to an exact repeat, and the
/// body watched for ending short of its `Content-Length`.
/// Generic over the scope kind alone, with the endpoint's id a value: one
/// copy serves every handler of a kind, where code in `from_request`,
/// whose `ENDPOINT` is each handler's own, would be compiled once per
/// handler.
async fn exact_context<const SCOPE: u8>(
    mut request: Request,
    endpoint: u64,
) -> Result<(IdempotentRequest, Request, Option<whole_body::Watch>), Response> {
    let ScopedRequest(mut idempotent) = ScopedRequest::<SCOPE>::extract(
        request.headers(),
        request.extensions(),
        request.uri().path(),
    )
    .map_err(IntoResponse::into_response)?;
    note_route_params(&mut idempotent, &mut request).map_err(IntoResponse::into_response)?;
    // Before an exact repeat's digest reads the body too.
    let (request, watch) = whole_body::watch(request);
    // A handler that shares its default name answers 500 on the full
    // path, which an exact repeat must not skip.
    let hit = exact::recall(&mut idempotent, &request)
        .filter(|_| !crate::names::shares_default_name(endpoint));
    let request = match hit {
        None => request,
        Some(hit) => exact::answer_exact_repeat(&mut idempotent, hit, endpoint, request).await?,
    };
    Ok((idempotent, request, watch))
}

/// Notes `request`'s route path parameters in `idempotent`. axum reads
/// them from the extensions alone, which are lent to empty parts for it:
/// taking the request apart and back would move it twice, and give it a
/// second place in the extracting future.
fn note_route_params(
    idempotent: &mut IdempotentRequest,
    request: &mut Request,
) -> Result<(), Problem> {
    let (mut parts, ()) = Request::new(()).into_parts();
    std::mem::swap(&mut parts.extensions, request.extensions_mut());
    let route = route_params(&mut parts, idempotent.key.is_some());
    std::mem::swap(&mut parts.extensions, request.extensions_mut());
    idempotent.route = route?;
    idempotent.method = method_binding(request.method(), idempotent.key.is_some());
    Ok(())
}

/// A 64-bit FNV-1a hash of an endpoint's identity, its name and the
/// place (`file:line:column #hash`) of its attribute joined by a space, for
/// [`ExactBody`]'s `ENDPOINT`; also how the name registry finds a
/// handler whose default name is shared.
#[must_use]
pub const fn endpoint_id(name: &str, place: &str) -> u64 {
    let hash = fnv1a(0xcbf2_9ce4_8422_2325, name.as_bytes());
    fnv1a(fnv1a(hash, b" "), place.as_bytes())
}

const fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    let mut index = 0;
    while index < bytes.len() {
        hash = (hash ^ bytes[index] as u64).wrapping_mul(0x0100_0000_01b3);
        index += 1;
    }
    hash
}

/// A duration from whole milliseconds, for `const` endpoint definitions.
#[must_use]
pub const fn millis(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// A request's fingerprint, and whether one of its inputs was a rejection
/// the handler takes as a `Result`.
#[derive(Debug)]
pub struct Fingerprinted {
    fingerprint: Fingerprint,
    input_rejected: bool,
}

/// The fingerprint of one request: the endpoint's identity, then each
/// fingerprinted argument in order.
///
/// # Errors
/// An argument's `Serialize` impl failed.
pub fn fingerprint<F>(endpoint: &Endpoint, inputs: F) -> Result<Fingerprinted, FingerprintError>
where
    F: FnOnce(&mut Fingerprinter) -> Result<(), FingerprintError>,
{
    let mut fingerprinter = endpoint.fingerprinter();
    inputs(&mut fingerprinter)?;
    let input_rejected = fingerprinter.input_rejected();
    let fingerprint = fingerprinter.finish();
    Ok(Fingerprinted {
        fingerprint,
        input_rejected,
    })
}

/// Notes a rejection in an argument taken as a `Result` that the
/// fingerprint leaves out (skipped, or never fingerprinted, such as
/// `Result<Extension<User>, _>`): the handler's 400 or 422 answer to it is
/// not stored, as for a fingerprinted one. The fingerprint is unchanged.
pub fn note_rejection<T, E>(fingerprinter: &mut Fingerprinter, input: &Result<T, E>) {
    if input.is_err() {
        fingerprinter.note_rejection();
    }
}

/// Adds one handler argument to the fingerprint. Spanned at the argument's
/// type, so a type that cannot be fingerprinted is reported there.
///
/// # Errors
/// The argument's `Serialize` impl failed.
pub fn fingerprint_input<T: FingerprintInput + ?Sized>(
    fingerprinter: &mut Fingerprinter,
    input: &T,
) -> Result<(), FingerprintError> {
    input.fingerprint_into(fingerprinter)
}

/// The payload of a fingerprinted `Json<T>`, `Form<T>`, `Query<T>` or
/// `Path<T>`, which must be `Serialize`. Every `Serialize` type implements
/// it, so it asks for nothing more; it exists for its message: when the
/// bound that failed is on the same type as the one asked for, rustc
/// reports the trait asked for, so a payload that is not `Serialize` gets
/// this message rather than serde's bare one, which says nothing of why.
#[diagnostic::on_unimplemented(
    message = "`{Self}` must implement `serde::Serialize`, because the payload check hashes it",
    label = "the payload check hashes this type",
    note = "derive it (`#[derive(serde::Serialize, serde::Deserialize)]`), or leave the argument out of the payload check with `#[idempotent(skip(<argument>))]`"
)]
pub trait SerializedPayload {}

impl<T: serde::Serialize + ?Sized> SerializedPayload for T {}

/// Checks that a fingerprinted extractor's payload is `Serialize`. Spanned
/// at the payload's type, before the argument is fingerprinted: rustc
/// reports the missing `Serialize` once, there, with
/// [`SerializedPayload`]'s message.
pub const fn serialized_payload<T: SerializedPayload + ?Sized>() {}

/// Adds a generic handler's type argument to the fingerprint, by its name:
/// the one identity a type has that outlives the process. The name can
/// change with the compiler, so a retry across such an upgrade finds a
/// different fingerprint (422), never another instance's response.
///
/// # Errors
/// None in practice: a string always encodes.
pub fn fingerprint_type<T: ?Sized>(
    fingerprinter: &mut Fingerprinter,
) -> Result<(), FingerprintError> {
    fingerprinter.input(std::any::type_name::<T>()).map(drop)
}

/// Adds a generic handler's const argument to the fingerprint.
///
/// # Errors
/// None in practice: const arguments are integers, `bool` or `char`.
pub fn fingerprint_const<T: serde::Serialize>(
    fingerprinter: &mut Fingerprinter,
    value: &T,
) -> Result<(), FingerprintError> {
    fingerprinter.input(value).map(drop)
}

/// Scopes the request by the principal of an endpoint with a custom scope.
/// Spanned at the scope type, so a type that does not implement
/// [`IdempotencyScope`] is reported there.
#[must_use]
pub fn scoped_by<P: IdempotencyScope>(
    request: impl Into<IdempotentRequest>,
    principal: &P,
) -> IdempotentRequest {
    request.into().scoped_by(principal)
}

/// The handler's output as a response, without an
/// [`Idempotent-Replayed`](crate::IDEMPOTENT_REPLAYED) header of its own
/// (only a replay carries one, set by the engine). Spanned at the return
/// type, so a return type that is not `IntoResponse` is reported there.
pub fn into_response<R: IntoResponse>(output: R) -> Response {
    without_replay_marker(output.into_response())
}

/// What stands in for a handler the attribute refused: a handler axum
/// accepts, so that the router naming it adds no error to the attribute's.
/// Never called, since the attribute's error stops the crate compiling.
#[must_use]
pub fn not_compiled() -> Response {
    http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

/// The single runtime entry of the expansion. Spanned at the handler's
/// name, so a future that is not `Send` is reported there.
///
/// The handler's future answers with [`into_response`], which already
/// removed a replay marker of its own, so it is boxed as it is: all that
/// is compiled for each handler is this call and the box, and the engine
/// behind `run_boxed` is one copy for all of them. `body` is the watch
/// on a body the handler reads itself ([`BodyWatch`]).
pub fn run<R, F>(
    request: R,
    endpoint: &Endpoint,
    fingerprinted: Result<Fingerprinted, FingerprintError>,
    body: BodyWatch,
    handler: F,
) -> impl Future<Output = Response> + Send + use<R, F>
where
    R: Into<IdempotentRequest>,
    F: Future<Output = Response> + Send + 'static,
{
    run_boxed(
        request.into(),
        endpoint,
        fingerprinted,
        body,
        Box::pin(handler),
    )
}

/// [`run`] past the handler's types.
fn run_boxed(
    mut request: IdempotentRequest,
    endpoint: &Endpoint,
    fingerprinted: Result<Fingerprinted, FingerprintError>,
    body: BodyWatch,
    handler: Handler,
) -> impl Future<Output = Response> + Send + use<> {
    request.input_rejected = matches!(&fingerprinted, Ok(inputs) if inputs.input_rejected);
    let handler = body.around(handler, endpoint.final_status_policy());
    let fingerprint = fingerprinted.map(|inputs| inputs.fingerprint);
    crate::engine::run(request, endpoint, fingerprint, handler)
}
