//! RFC 9457 `application/problem+json` responses for every error the
//! engine itself produces.
//!
//! Each case has a stable `type` URI, so clients can branch on it rather
//! than on prose:
//!
//! | `type` | status | when |
//! |---|---|---|
//! | `urn:idempotent:missing-key` | 400 | no `Idempotency-Key` on an endpoint that requires one |
//! | `urn:idempotent:invalid-key` | 400 | the key is empty, too long, repeated or has bad characters |
//! | `urn:idempotent:missing-credentials` | 401 | the endpoint is scoped by API key and the request has none (`WWW-Authenticate: Bearer`) |
//! | `urn:idempotent:invalid-scope` | 400 | the header that scopes the endpoint's keys is missing or blank, one of the scope's headers was sent more than once, or the principal that scopes them has an empty id |
//! | `urn:idempotent:request-in-progress` | 409 | the first request with this key is still running (`Retry-After` set) |
//! | `urn:idempotent:response-not-stored` | 410 | the key's request completed but its response body was not kept (too large, an event stream, failed, of another length than its `Content-Length`, with trailers, or with more headers than a record holds) |
//! | `urn:idempotent:invalid-path-parameter` | 400 | a keyed request's path parameter is not UTF-8 once percent-decoded, as axum's `Path` refuses it: the fingerprint could not tell it from another such parameter |
//! | `urn:idempotent:unreadable-body` | 400 | [`IdempotentLayer`](crate::IdempotentLayer), or an attribute's handler taking its body extractor as a `Result`, could not read the request body to its end ([`FingerprintError::UnreadBody`](crate::fingerprint::FingerprintError::UnreadBody)); or an HTTP/2 body ended short of its `Content-Length` while `IdempotentLayer` buffered it or an attribute's handler's last argument read it, whatever extractor it is; nothing was claimed |
//! | `urn:idempotent:request-too-large` | 413 | [`IdempotentLayer`](crate::IdempotentLayer) would have to buffer a body over its limit, or over one a layer in front of it set |
//! | `urn:idempotent:key-reused` | 422 | the key was used before with a different request |
//! | `urn:idempotent:fingerprint-failed` | 500 | serializing the handler's inputs failed |
//! | `urn:idempotent:record-corrupt` | 500 | the key's stored record cannot be read or replayed; the handler is not run again |
//! | `urn:idempotent:not-configured` | 500 | no [`Idempotency`](crate::Idempotency) layer served the request, a custom scope got no principal, a hand-written `Scope::Header` names no valid header, or an [`IdempotentLayer`](crate::IdempotentLayer) wraps a handler that is idempotent itself |
//! | `urn:idempotent:store-misconfigured` | 500 | the store is set up wrongly ([`StoreError::Misconfigured`]: a missing table or privilege, a read-only, damaged or moved SQLite file, another application's value at the key); nothing was executed, and a retry succeeds once the setup is fixed |
//! | `urn:idempotent:store-unavailable` | 503 | the store failed or timed out; nothing was executed (`Retry-After` set) |

use axum::response::{IntoResponse, Response};
use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, StatusCode};
use serde::Serialize;

use crate::store::StoreError;

/// The `Retry-After` of a 503 `store-unavailable`, in seconds.
const STORE_RETRY_AFTER_SECS: u64 = 1;

/// The challenge of a 401 that names none: the `Authorization: Bearer`
/// the API-key scope accepts.
const DEFAULT_CHALLENGE: &str = "Bearer";

/// The kinds of problem the engine reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// 400: no key on an endpoint that requires one.
    MissingKey,
    /// 400: a malformed key.
    InvalidKey,
    /// 401: no API key for an endpoint scoped by API key.
    MissingCredentials,
    /// 400: the header that scopes the endpoint's keys is missing or
    /// blank, a scope header was sent more than once, or the principal
    /// that scopes them has an empty id.
    InvalidScope,
    /// 400: a keyed request's path parameter is not UTF-8 once
    /// percent-decoded (axum's `Path` refuses it the same way), so the
    /// fingerprint could not tell it from another such parameter.
    InvalidPathParameter,
    /// 409: the first request with this key is still running.
    RequestInProgress,
    /// 410: the response's body was not stored (too large, an event
    /// stream, failed while read, of another length than its
    /// `Content-Length`, ended with trailers, or came with more headers
    /// than a record holds), so it cannot be replayed.
    ResponseNotStored,
    /// 413: a body too large for [`IdempotentLayer`](crate::IdempotentLayer)
    /// to buffer, or for a body limit a layer in front of it set.
    RequestTooLarge,
    /// 400: a body [`IdempotentLayer`](crate::IdempotentLayer), or a body
    /// extractor an attribute's handler takes as a `Result`, could not read
    /// to the end (the client sent less than it announced, or the
    /// connection broke).
    UnreadableBody,
    /// 422: the key was used with a different request.
    KeyReused,
    /// 500: the handler's inputs could not be serialized.
    FingerprintFailed,
    /// 500: no `Idempotency` layer served the request, a custom scope got
    /// no principal, a hand-written `Scope::Header` names no valid header,
    /// or an `IdempotentLayer` wraps a handler that is idempotent itself.
    NotConfigured,
    /// 500: the key's stored record cannot be read or replayed (written by
    /// something else, or damaged), so its request is neither replayed
    /// nor run again.
    RecordCorrupt,
    /// 500: the store is set up wrongly, and fails the same way until
    /// its setup is changed ([`StoreError::Misconfigured`]).
    StoreMisconfigured,
    /// 503: the store failed or timed out.
    StoreUnavailable,
}

impl ProblemKind {
    /// The stable `type` URI.
    #[must_use]
    pub const fn type_uri(self) -> &'static str {
        match self {
            Self::MissingKey => "urn:idempotent:missing-key",
            Self::InvalidKey => "urn:idempotent:invalid-key",
            Self::MissingCredentials => "urn:idempotent:missing-credentials",
            Self::InvalidScope => "urn:idempotent:invalid-scope",
            Self::InvalidPathParameter => "urn:idempotent:invalid-path-parameter",
            Self::RequestInProgress => "urn:idempotent:request-in-progress",
            Self::ResponseNotStored => "urn:idempotent:response-not-stored",
            Self::RequestTooLarge => "urn:idempotent:request-too-large",
            Self::UnreadableBody => "urn:idempotent:unreadable-body",
            Self::KeyReused => "urn:idempotent:key-reused",
            Self::FingerprintFailed => "urn:idempotent:fingerprint-failed",
            Self::NotConfigured => "urn:idempotent:not-configured",
            Self::RecordCorrupt => "urn:idempotent:record-corrupt",
            Self::StoreMisconfigured => "urn:idempotent:store-misconfigured",
            Self::StoreUnavailable => "urn:idempotent:store-unavailable",
        }
    }

    /// The HTTP status.
    #[must_use]
    pub const fn status(self) -> StatusCode {
        match self {
            Self::MissingKey
            | Self::InvalidKey
            | Self::InvalidScope
            | Self::InvalidPathParameter => StatusCode::BAD_REQUEST,
            Self::MissingCredentials => StatusCode::UNAUTHORIZED,
            Self::RequestInProgress => StatusCode::CONFLICT,
            Self::ResponseNotStored => StatusCode::GONE,
            Self::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnreadableBody => StatusCode::BAD_REQUEST,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            Self::FingerprintFailed
            | Self::NotConfigured
            | Self::RecordCorrupt
            | Self::StoreMisconfigured => StatusCode::INTERNAL_SERVER_ERROR,
            Self::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A short, fixed summary.
    #[must_use]
    pub const fn title(self) -> &'static str {
        match self {
            Self::MissingKey => "Idempotency-Key header required",
            Self::InvalidKey => "Invalid Idempotency-Key header",
            Self::MissingCredentials => "Credentials required to scope the idempotency key",
            Self::InvalidScope => "The request names no single caller to scope the idempotency key",
            Self::InvalidPathParameter => "A path parameter is not valid UTF-8",
            Self::RequestInProgress => "A request with this idempotency key is in progress",
            Self::ResponseNotStored => "The response to this idempotency key was not stored",
            Self::RequestTooLarge => "Request body too large to fingerprint",
            Self::UnreadableBody => "Request body could not be read",
            Self::KeyReused => "Idempotency key reused with a different request",
            Self::FingerprintFailed => "Request inputs could not be fingerprinted",
            Self::NotConfigured => "Idempotency is not configured on this router",
            Self::RecordCorrupt => "The stored record of this idempotency key is corrupt",
            Self::StoreMisconfigured => "Idempotency store misconfigured",
            Self::StoreUnavailable => "Idempotency store unavailable",
        }
    }
}

/// An RFC 9457 problem produced by the engine. Renders as
/// `application/problem+json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    kind: ProblemKind,
    detail: String,
    retry_after_secs: Option<u64>,
    challenge: Option<HeaderValue>,
}

impl Problem {
    /// A problem of `kind` with a human-readable `detail`. A
    /// [`MissingCredentials`](ProblemKind::MissingCredentials) problem is a
    /// 401, which must carry a `WWW-Authenticate` challenge: it carries
    /// `Bearer` until [`www_authenticate`](Self::www_authenticate) says
    /// otherwise.
    ///
    /// ```
    /// use axum::response::IntoResponse;
    /// use idempotent_core::{Problem, ProblemKind};
    ///
    /// let response = Problem::new(ProblemKind::MissingCredentials, "send an API key").into_response();
    /// assert_eq!(response.status(), 401);
    /// assert_eq!(response.headers()["www-authenticate"], "Bearer");
    /// ```
    #[must_use]
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        let challenge = (kind == ProblemKind::MissingCredentials)
            .then(|| HeaderValue::from_static(DEFAULT_CHALLENGE));
        Self {
            kind,
            detail: detail.into(),
            retry_after_secs: None,
            challenge,
        }
    }

    /// Sets the `WWW-Authenticate` challenge a 401 carries (the default,
    /// for [`MissingCredentials`](ProblemKind::MissingCredentials), is
    /// `Bearer`): the scheme the API takes, with its parameters.
    ///
    /// ```
    /// use axum::{http::HeaderValue, response::IntoResponse};
    /// use idempotent_core::{Problem, ProblemKind};
    ///
    /// let problem = Problem::new(ProblemKind::MissingCredentials, "send an API key")
    ///     .www_authenticate(HeaderValue::from_static(r#"Bearer realm="payments""#));
    /// let response = problem.into_response();
    /// assert_eq!(response.headers()["www-authenticate"], r#"Bearer realm="payments""#);
    /// ```
    #[must_use]
    pub fn www_authenticate(mut self, challenge: HeaderValue) -> Self {
        self.challenge = Some(challenge);
        self
    }

    /// Adds a `Retry-After` header.
    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// Its kind.
    #[must_use]
    pub fn kind(&self) -> ProblemKind {
        self.kind
    }

    /// The detail text.
    #[must_use]
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.title(), self.detail)
    }
}

impl std::error::Error for Problem {}

#[derive(Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    type_uri: &'static str,
    title: &'static str,
    status: u16,
    detail: &'a str,
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.kind.status();
        let body = Body {
            type_uri: self.kind.type_uri(),
            title: self.kind.title(),
            status: status.as_u16(),
            detail: &self.detail,
        };
        // Serializing four plain fields cannot fail; fall back to an empty
        // object rather than panic if it somehow does.
        let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = (status, json).into_response();
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after_secs {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(challenge) = self.challenge {
            headers.insert(WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

/// The answer to a request refused because the store failed with
/// `error`, before anything ran. Only a store that may come back by itself
/// is a 503 with `Retry-After`: a record that does not decode, or a store
/// set up wrongly, fails a retry soon after the same way, so those are
/// 500s without it. The detail says nothing of the cause, which is the
/// operator's business and goes to the log.
impl From<&StoreError> for Problem {
    fn from(error: &StoreError) -> Self {
        match error {
            StoreError::Codec(_) => Self::new(
                ProblemKind::RecordCorrupt,
                "the stored record of this idempotency key cannot be read, so the request was neither replayed nor executed again",
            ),
            StoreError::Misconfigured(_) => Self::new(
                ProblemKind::StoreMisconfigured,
                "the idempotency store is set up wrongly, so the request was not executed; retry with the same key once the service's operator has fixed it",
            ),
            _ => Self::new(
                ProblemKind::StoreUnavailable,
                "the idempotency store is unavailable, so the request was not executed; retry with the same key",
            )
            .retry_after(STORE_RETRY_AFTER_SECS),
        }
    }
}

impl From<crate::key::KeyError> for Problem {
    fn from(error: crate::key::KeyError) -> Self {
        let kind = match error {
            crate::key::KeyError::Missing => ProblemKind::MissingKey,
            _ => ProblemKind::InvalidKey,
        };
        Self::new(kind, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;
    use proptest::prelude::*;

    use super::*;

    fn body_json(problem: Problem) -> serde_json::Value {
        let response = problem.into_response();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .now_or_never()
            .expect("an in-memory body is ready")
            .expect("an in-memory body reads");
        serde_json::from_slice(&body).expect("valid JSON")
    }

    /// A store that may come back by itself is a 503 that asks for a
    /// retry soon; one set up wrongly, or a record that does not decode,
    /// fails a retry soon after the same way: a 500 that does not.
    #[test]
    fn only_a_store_that_may_come_back_asks_for_a_retry_soon() {
        let cases = [
            (
                StoreError::Timeout(std::time::Duration::from_secs(2)),
                503,
                Some("1"),
                "urn:idempotent:store-unavailable",
            ),
            (
                StoreError::backend("Connection refused"),
                503,
                Some("1"),
                "urn:idempotent:store-unavailable",
            ),
            (
                StoreError::misconfigured("WRONGTYPE"),
                500,
                None,
                "urn:idempotent:store-misconfigured",
            ),
            (
                StoreError::Codec(crate::record::CodecError::new("truncated")),
                500,
                None,
                "urn:idempotent:record-corrupt",
            ),
        ];
        for (error, status, retry_after, type_uri) in cases {
            let response = Problem::from(&error).into_response();
            assert_eq!(response.status().as_u16(), status, "{error}");
            let retry = response.headers().get(RETRY_AFTER);
            let retry = retry.map(|value| value.to_str().expect("ASCII"));
            assert_eq!(retry, retry_after, "{error}");
            let json = body_json(Problem::from(&error));
            assert_eq!(json["type"], type_uri, "{error}");
            assert_eq!(json["status"], status, "{error}");
        }
    }

    /// The detail of a store's failure tells the client what to do, not
    /// the cause, which may name tables, roles and keys: that is for the
    /// log.
    #[test]
    fn a_store_failure_keeps_its_cause_out_of_the_detail() {
        let cause = "permission denied for table idempotency_records";
        for error in [StoreError::backend(cause), StoreError::misconfigured(cause)] {
            let problem = Problem::from(&error);
            assert!(!problem.detail().contains("permission"), "{problem}");
            assert!(problem.detail().contains("same key"), "{problem}");
        }
    }

    /// A 401 must carry a challenge (RFC 9110, 15.5.2), whoever builds it;
    /// other problems carry none unless given one.
    #[test]
    fn every_401_carries_a_challenge() {
        let missing = Problem::new(ProblemKind::MissingCredentials, "no key").into_response();
        assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(missing.headers().get(WWW_AUTHENTICATE).unwrap(), "Bearer");
        let basic = Problem::new(ProblemKind::MissingCredentials, "no key")
            .www_authenticate(HeaderValue::from_static("Basic realm=\"api\""))
            .into_response();
        let challenges: Vec<_> = basic.headers().get_all(WWW_AUTHENTICATE).iter().collect();
        assert_eq!(challenges, ["Basic realm=\"api\""]);
        let reused = Problem::new(ProblemKind::KeyReused, "reused").into_response();
        assert!(reused.headers().get(WWW_AUTHENTICATE).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// A detail is free text, and `Problem::new` is public: any text,
        /// quotes, backslashes and control characters included, must
        /// render as valid JSON that reads back as given.
        #[test]
        fn any_detail_renders_as_json_that_reads_back(
            detail in prop_oneof![any::<String>(), "[\"\\\\\u{0}-\u{1f}\u{7f}\u{2028}\u{fffd}a]{0,16}"],
        ) {
            let json = body_json(Problem::new(ProblemKind::RecordCorrupt, detail.clone()));
            prop_assert_eq!(&json["detail"], &serde_json::Value::String(detail));
            prop_assert_eq!(&json["status"], 500);
            prop_assert_eq!(&json["type"], "urn:idempotent:record-corrupt");
        }
    }
}
