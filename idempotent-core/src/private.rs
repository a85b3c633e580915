//! What `#[idempotent]` expands to call.
//!
//! /!\ Not a stable API: only the attribute's expansion may use this
//! module, and it changes with the attribute, whose version is pinned to
//! this crate's.

pub use axum;

pub use crate::endpoint::{Endpoint, FinalStatuses, StatusRange};
pub use crate::fingerprint::{FingerprintInput, Fingerprinter};
pub use crate::request::IdempotentRequest;
pub use crate::scope::Scope;

use std::future::Future;
use std::time::Duration;

use axum::response::{IntoResponse, Response};

use crate::fingerprint::{Fingerprint, FingerprintError};
use crate::scope::IdempotencyScope;

/// A duration from whole milliseconds, for `const` endpoint definitions.
#[must_use]
pub const fn millis(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// Adds one handler argument to the fingerprint.
///
/// # Errors
/// The argument's `Serialize` impl failed.
pub fn fingerprint_input<T: FingerprintInput + ?Sized>(
    fingerprinter: &mut Fingerprinter,
    input: &T,
) -> Result<(), FingerprintError> {
    input.fingerprint_into(fingerprinter)
}

/// The fingerprint of one request: the endpoint's identity, then each
/// fingerprinted argument in order.
///
/// # Errors
/// An argument's `Serialize` impl failed.
pub fn fingerprint<F>(endpoint: &Endpoint, inputs: F) -> Result<Fingerprint, FingerprintError>
where
    F: FnOnce(&mut Fingerprinter) -> Result<(), FingerprintError>,
{
    let mut fingerprinter = endpoint.fingerprinter();
    inputs(&mut fingerprinter)?;
    Ok(fingerprinter.finish())
}

/// Scopes the request by the principal of an endpoint with a custom scope.
/// Spanned at the scope type, so a type that does not implement
/// [`IdempotencyScope`] is reported there.
#[must_use]
pub fn scoped_by<P: IdempotencyScope>(
    request: IdempotentRequest,
    principal: &P,
) -> IdempotentRequest {
    request.scoped_by(principal)
}

/// The handler's output as a response. Spanned at the return type, so a
/// return type that is not `IntoResponse` is reported there.
pub fn into_response<R: IntoResponse>(output: R) -> Response {
    output.into_response()
}

/// The single runtime entry of the expansion.
pub async fn run<F>(
    request: IdempotentRequest,
    endpoint: &Endpoint,
    fingerprint: Result<Fingerprint, FingerprintError>,
    handler: F,
) -> Response
where
    F: Future + Send + 'static,
    F::Output: IntoResponse,
{
    request.run(endpoint, fingerprint, handler).await
}

/// [`run`] for endpoints scoped by a principal the handler extracts.
pub async fn run_scoped<P, F>(
    request: IdempotentRequest,
    principal: &P,
    endpoint: &Endpoint,
    fingerprint: Result<Fingerprint, FingerprintError>,
    handler: F,
) -> Response
where
    P: IdempotencyScope,
    F: Future + Send + 'static,
    F::Output: IntoResponse,
{
    request
        .scoped_by(principal)
        .run(endpoint, fingerprint, handler)
        .await
}

/// Compile-time check, spanned at the handler: its future is `Send`.
pub fn assert_send<F: Future + Send>(_future: &F) {}

/// Compile-time check, spanned at the return type: it is `IntoResponse`.
pub fn assert_into_response<R: IntoResponse>() {}

/// Compile-time check, spanned at an argument's type: it can be fingerprinted.
pub fn assert_fingerprint_input<T: FingerprintInput + ?Sized>() {}

/// Compile-time check, spanned at the scope type: it names a caller.
pub fn assert_scope<T: IdempotencyScope>() {}
