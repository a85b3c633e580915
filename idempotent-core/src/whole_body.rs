//! Request bodies that end short of their `Content-Length`, refused
//! rather than read as whole ones.
//!
//! hyper's HTTP/2 server ends a request body without an error when the
//! client resets the stream with `NO_ERROR` (the reset RFC 9113 8.1 has a
//! server send after an early answer), so the bytes that came read as a
//! whole body: `amount=12345` arrives as `amount=123`. HTTP/1.1 framing
//! refuses a body shorter than its `Content-Length` with an error, so
//! only requests of HTTP/2 and later are watched here; a body without
//! the header that is cut short cannot be told from a whole one.
//!
//! A body the handler reads itself once the key is claimed is watched
//! whatever its version, for failing too (the client cancelled the
//! upload, or its connection broke): the handler's answer to a body it
//! could not read to its end is not stored, as a body extractor's
//! rejection of one is not.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderValue, Version};
use http_body::{Frame, SizeHint};

use crate::endpoint::FinalStatuses;
use crate::engine::answers_malformed_input;
use crate::layer::{Unstored, is_over_limit};
use crate::problem::{Problem, ProblemKind};
use crate::record::RecordKey;
use crate::request::{IdempotentRequest, ScopeSource};

/// A body that ended, without an error, before the length its
/// `Content-Length` announced. Run, the handler would act on part of the
/// request and its answer be stored for the key. HTTP/1.1 framing, and
/// h2's check at the end of a stream, refuse any other mismatch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CutShort {
    received: u64,
    declared: u64,
}

impl CutShort {
    /// Whether `body`, read whole, is shorter than the length it had to
    /// reach ([`expected_length`], taken before it was read).
    pub(crate) fn of(expected: Option<u64>, body: &Bytes) -> Option<Self> {
        let declared = expected?;
        let received = u64::try_from(body.len()).ok()?;
        (received < declared).then_some(Self { received, declared })
    }

    /// The 400 `unreadable-body` the request is answered with.
    pub(crate) fn problem(&self) -> Problem {
        Problem::new(
            ProblemKind::UnreadableBody,
            format!("the request body could not be read to its end ({self}); nothing was executed"),
        )
    }
}

impl std::fmt::Display for CutShort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "it ended after {} of the {} bytes its Content-Length announced",
            self.received, self.declared
        )
    }
}

impl std::error::Error for CutShort {}

/// The length a request's body must reach before it ends, when it could
/// end short of it unnoticed: a request of HTTP/2 or later whose body
/// reports the length its `Content-Length` announced as its exact size,
/// as hyper's own body does. HTTP/1.1 framing fails a short body itself;
/// a body that a layer in front replaced, leaving the header, reports its
/// own size and is taken as it comes.
pub(crate) fn expected_length(
    version: Version,
    headers: &HeaderMap,
    body: &impl http_body::Body,
) -> Option<u64> {
    if version < Version::HTTP_2 {
        return None;
    }
    let declared = declared_length(headers)?;
    (body.size_hint().exact() == Some(declared)).then_some(declared)
}

/// `Content-Length` as hyper reads it: ASCII digits alone.
pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH).and_then(content_length)
}

/// A `Content-Length` value as hyper frames a message by it: ASCII digits
/// alone (hyper refuses a sign, spaces or an empty value).
pub(crate) fn content_length(value: &HeaderValue) -> Option<u64> {
    let digits = value.to_str().ok()?;
    if !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// How a watched body failed to be read to its end.
#[derive(Debug, Clone, Copy)]
enum Unread {
    /// It ended, without an error, short of its `Content-Length`.
    CutShort(CutShort),
    /// It failed while it was read (a reset stream, a broken connection,
    /// a body timeout), over no size limit: a body over one is answered
    /// as its limit has it, and not stored anyway (413).
    Failed,
}

/// Learns whether a watched body ended short of its `Content-Length`, or
/// failed while it was read.
#[derive(Debug)]
pub(crate) struct Watch(Arc<OnceLock<Unread>>);

impl Watch {
    /// What the body fell short by, once its reader reached its end.
    pub(crate) fn cut_short(&self) -> Option<CutShort> {
        match self.0.get() {
            Some(Unread::CutShort(cut_short)) => Some(*cut_short),
            _ => None,
        }
    }

    /// Whether the body's reader met its end short of its
    /// `Content-Length`, or a failure other than a size limit's.
    pub(crate) fn unread(&self) -> bool {
        self.0.get().is_some()
    }

    /// Whether the watched body is still held, so that it may yet be read
    /// (by a handler that takes it, or `Multipart`): a body dropped, read
    /// whole or not at all, can no longer end short.
    pub(crate) fn is_held(&self) -> bool {
        Arc::strong_count(&self.0) > 1
    }
}

/// `request` with its body watched, if it can end short of its
/// `Content-Length` unnoticed ([`expected_length`]). Its reader then gets an error where the body ends short, so a body
/// extractor rejects the request instead of taking the part that came,
/// and the watch tells why. Any other request comes back as it was, for
/// the cost of a comparison.
pub(crate) fn watch(request: Request) -> (Request, Option<Watch>) {
    let declared = expected_length(request.version(), request.headers(), request.body());
    match declared {
        Some(declared) => watched(request, Some(declared)),
        None => (request, None),
    }
}

/// `request` with its body watched as [`watch`] does, and, whatever its
/// version or length, for failing while it is read: for a last argument
/// that may leave the body to the handler, which reads it once the key is
/// claimed (see [`unstored_if_unread`]). A request known to have no body
/// comes back as it was.
pub(crate) fn watch_all(request: Request) -> (Request, Option<Watch>) {
    let declared = expected_length(request.version(), request.headers(), request.body());
    if declared.is_none() && http_body::Body::is_end_stream(request.body()) {
        return (request, None);
    }
    watched(request, declared)
}

fn watched(request: Request, declared: Option<u64>) -> (Request, Option<Watch>) {
    let unread = Arc::new(OnceLock::new());
    let watch = Watch(unread.clone());
    let request = request.map(|inner| {
        Body::new(LengthChecked {
            inner,
            received: 0,
            declared,
            unread,
        })
    });
    (request, Some(watch))
}

/// The refusal of a request whose watched body ended short: the 400
/// `unreadable-body` that `IdempotentLayer` answers, logged as the engine
/// logs a body it could not read (with the key, when `idempotent` has
/// it). Asked after the body extractor, whatever it returned: one taken
/// as a `Result` or an `Option` holds the failure rather than returning
/// it, and the request is a part of one either way.
pub(crate) fn refusal(
    watch: Option<&Watch>,
    idempotent: Option<&IdempotentRequest>,
) -> Option<Response> {
    let cut_short = watch.and_then(Watch::cut_short)?;
    let key = idempotent.and_then(|request| match (&request.key, &request.scope) {
        (Some(key), ScopeSource::Resolved(Ok(scope))) => Some(RecordKey::new(*scope, key.clone())),
        _ => None,
    });
    tracing::info!(
        error = %cut_short,
        key = key.as_ref().map(|key| tracing::field::display(key.log_id())),
        "request body unreadable; request refused, nothing executed"
    );
    Some(cut_short.problem().into_response())
}

/// `response`, marked [`Unstored`] if it answers malformed input (400 or
/// 422, unless `statuses` lists the status itself) after the watched body
/// ended short of its `Content-Length` or failed while it was read: the
/// handler read the body itself and met its failure. The engine then
/// releases the key, as after an answer to a rejected input, so that the
/// retry with the whole body runs rather than being answered with the
/// stored refusal of the part that came. Any other answer is stored as
/// it is: the handler may have acted on that part.
pub(crate) fn unstored_if_unread(
    mut response: Response,
    watch: &Watch,
    statuses: FinalStatuses,
) -> Response {
    let status = response.status();
    if watch.unread() && answers_malformed_input(status) && !statuses.lists(status) {
        let reason = "the handler answered a request body that could not be read to its end";
        response.extensions_mut().insert(Unstored(reason));
    }
    response
}

/// A body that fails, rather than ends, short of its declared length (if
/// it is held to one), and notes how it was not read to its end.
struct LengthChecked {
    inner: Body,
    received: u64,
    declared: Option<u64>,
    unread: Arc<OnceLock<Unread>>,
}

impl http_body::Body for LengthChecked {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        Poll::Ready(match polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let length = u64::try_from(data.len()).unwrap_or(u64::MAX);
                    this.received = this.received.saturating_add(length);
                }
                Some(Ok(frame))
            }
            // Unwrapped: axum's extractors look for a limit's error at a
            // set depth of its error type (413 rather than 400), which
            // `Body::new` adds one to again.
            Some(Err(error)) => {
                let error = error.into_inner();
                if !is_over_limit(&*error) {
                    let _ = this.unread.set(Unread::Failed);
                }
                Some(Err(error))
            }
            None => match this.declared {
                Some(declared) if this.received < declared && this.unread.get().is_none() => {
                    let cut_short = CutShort {
                        received: this.received,
                        declared,
                    };
                    let _ = this.unread.set(Unread::CutShort(cut_short));
                    Some(Err(Box::new(cut_short)))
                }
                _ => None,
            },
        })
    }

    fn is_end_stream(&self) -> bool {
        // A reader that stops at the end of the stream would miss the error.
        self.inner.is_end_stream()
            && self
                .declared
                .is_none_or(|declared| self.received >= declared)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use http::StatusCode;
    use http_body_util::BodyExt;

    /// A body as hyper's HTTP/2 server hands one on: it reports `announced`
    /// bytes as its exact size, and ends, without an error, after `data`.
    struct Announcing {
        data: Option<Bytes>,
        announced: u64,
    }

    impl http_body::Body for Announcing {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.data.take().map(|data| Ok(Frame::data(data))))
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.announced)
        }
    }

    /// A request of `version` with `length` as its `Content-Length`, whose
    /// body reports `announced` bytes and holds `data`.
    fn request(
        version: Version,
        length: Option<&str>,
        announced: u64,
        data: &'static str,
    ) -> Request {
        let body = Body::new(Announcing {
            data: Some(Bytes::from_static(data.as_bytes())),
            announced,
        });
        let mut request = Request::new(body);
        *request.version_mut() = version;
        if let Some(length) = length {
            let value = http::HeaderValue::from_str(length).unwrap();
            request.headers_mut().insert(CONTENT_LENGTH, value);
        }
        request
    }

    async fn read(request: Request) -> Result<Bytes, axum::Error> {
        request
            .into_body()
            .collect()
            .await
            .map(|body| body.to_bytes())
    }

    #[tokio::test]
    async fn an_http2_body_short_of_its_length_fails_and_the_watch_says_by_how_much() {
        let (request, watch) = watch(request(Version::HTTP_2, Some("12"), 12, "12345"));
        let watch = watch.expect("watched");
        assert!(watch.cut_short().is_none(), "not read yet");

        let error = read(request).await.unwrap_err();

        let expected = "it ended after 5 of the 12 bytes its Content-Length announced";
        assert_eq!(error.to_string(), expected);
        assert_eq!(watch.cut_short().unwrap().to_string(), expected);
    }

    #[tokio::test]
    async fn a_whole_http2_body_reads_as_it_came() {
        let (request, watch) = watch(request(Version::HTTP_2, Some("5"), 5, "12345"));
        assert_eq!(read(request).await.unwrap(), "12345");
        assert!(watch.unwrap().cut_short().is_none());
    }

    /// HTTP/1.1 framing already fails a short body; a body without a
    /// length, or whose length is not plain digits, cannot be checked; and
    /// one that reports another size than its header was replaced by a
    /// layer in front, which left the header: none is watched.
    #[test]
    fn only_http2_bodies_reporting_their_declared_length_are_watched() {
        for (version, length, announced, watched) in [
            (Version::HTTP_11, Some("12"), 12, false),
            (Version::HTTP_10, Some("12"), 12, false),
            (Version::HTTP_2, None, 12, false),
            (Version::HTTP_2, Some("x"), 12, false),
            (Version::HTTP_2, Some("+12"), 12, false),
            (Version::HTTP_2, Some("12"), 5, false),
            (Version::HTTP_2, Some("012"), 12, true),
            (Version::HTTP_2, Some("12"), 12, true),
            (Version::HTTP_3, Some("12"), 12, true),
        ] {
            let (_, watch) = watch(request(version, length, announced, "12345"));
            assert_eq!(
                watch.is_some(),
                watched,
                "{version:?} {length:?} {announced}"
            );
        }
    }

    /// A handler that read a watched body itself and met its end short has
    /// its answer to malformed input (400, 422) released rather than
    /// stored, unless the endpoint lists the status itself; any other
    /// answer, or any answer to a whole body, is stored as it is.
    #[tokio::test]
    async fn an_answer_to_malformed_input_after_a_body_cut_short_is_not_stored() {
        use crate::endpoint::StatusRange;

        const LISTS_400: &[StatusRange] = &[StatusRange::new(400, 400)];
        let unstored = |status: u16, statuses: FinalStatuses, data: &'static str| async move {
            let (request, watch) = watch(request(Version::HTTP_2, Some("5"), 5, data));
            drop(read(request).await);
            let status = StatusCode::from_u16(status).unwrap();
            let response = unstored_if_unread(status.into_response(), &watch.unwrap(), statuses);
            response.extensions().get::<Unstored>().is_some()
        };
        let (default, listing_400) = (FinalStatuses::Default, FinalStatuses::DefaultAnd(LISTS_400));
        for (status, statuses, data, expected) in [
            (400, default, "123", true),
            (422, default, "123", true),
            (400, listing_400, "123", false),
            (201, default, "123", false),
            (402, default, "123", false),
            (400, default, "12345", false),
        ] {
            assert_eq!(
                unstored(status, statuses, data).await,
                expected,
                "{status} {statuses:?} {data}"
            );
        }
    }

    /// A body that fails while it is read once.
    struct Failing(Option<axum::BoxError>);

    impl http_body::Body for Failing {
        type Data = Bytes;
        type Error = axum::BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.take().map(Err))
        }
    }

    /// A body the handler may read itself is watched whatever the
    /// request's version or length, unless it is known to be empty.
    #[test]
    fn every_body_that_may_hold_data_is_watched_for_the_handler() {
        for (version, length, announced, data, watched) in [
            (Version::HTTP_11, Some("12"), 12, "12345", true),
            (Version::HTTP_11, None, 12, "12345", true),
            (Version::HTTP_2, None, 12, "12345", true),
            (Version::HTTP_2, Some("12"), 12, "12345", true),
        ] {
            let (_, watch) = watch_all(request(version, length, announced, data));
            assert_eq!(watch.is_some(), watched, "{version:?} {length:?}");
        }
        let (_, watch) = watch_all(Request::new(Body::empty()));
        assert!(watch.is_none(), "an empty body");
    }

    /// A body that fails while it is read is noted as unread, whatever
    /// its version, and not as cut short; a body over a size limit is
    /// not: its 413 is the limit's answer, not stored anyway.
    #[tokio::test]
    async fn a_body_that_fails_while_it_is_read_is_noted_unless_over_a_limit() {
        let broken: axum::BoxError = "connection reset".into();
        let body = Body::new(Failing(Some(broken)));
        let (request, watch) = watch_all(Request::new(body));
        let watch = watch.expect("watched");
        assert!(!watch.unread(), "not read yet");
        let error = read(request).await.unwrap_err();
        assert_eq!(error.to_string(), "connection reset");
        assert!(watch.unread());
        assert!(watch.cut_short().is_none());

        let limited = http_body_util::Limited::new(Body::from("12345"), 2);
        let (request, watch) = watch_all(Request::new(Body::new(limited)));
        assert!(read(request).await.is_err());
        assert!(!watch.expect("watched").unread(), "over a limit");
    }

    /// A handler's answer to malformed input after the body it read
    /// failed is not stored either; any other answer is.
    #[tokio::test]
    async fn an_answer_to_malformed_input_after_a_body_failed_is_not_stored() {
        for (status, expected) in [(400, true), (422, true), (201, false), (402, false)] {
            let broken: axum::BoxError = "connection reset".into();
            let (request, watch) = watch_all(Request::new(Body::new(Failing(Some(broken)))));
            drop(read(request).await);
            let status = StatusCode::from_u16(status).unwrap();
            let response = unstored_if_unread(
                status.into_response(),
                &watch.unwrap(),
                FinalStatuses::Default,
            );
            let unstored = response.extensions().get::<Unstored>().is_some();
            assert_eq!(unstored, expected, "{status}");
        }
    }

    /// Only a body shorter than the length it had to reach is cut short:
    /// one that reached it, or that a layer in front made longer, is taken
    /// as it came.
    #[test]
    fn only_a_body_shorter_than_its_expected_length_is_cut_short() {
        let body = Bytes::from_static(b"12345");
        for (expected, cut_short) in [
            (None, false),
            (Some(5), false),
            (Some(4), false),
            (Some(12), true),
        ] {
            assert_eq!(
                CutShort::of(expected, &body).is_some(),
                cut_short,
                "{expected:?}"
            );
        }
        assert_eq!(
            CutShort::of(Some(12), &body).unwrap().to_string(),
            "it ended after 5 of the 12 bytes its Content-Length announced"
        );
    }
}
