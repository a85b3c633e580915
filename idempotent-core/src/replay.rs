//! Turning a handler's response into a stored one and back.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::response::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::layer::Unstored;
use crate::problem::{Problem, ProblemKind};
use crate::record::StoredResponse;
use crate::whole_body::content_length;

/// The header that marks a replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Whether a response header is stored. Never: credentials, cookies and
/// authentication parameters (RFC 9110 11.6.3, 11.7.3) belong to the
/// first caller's session, `Date` must be fresh, hop-by-hop
/// headers describe one connection, and `Content-Length` is recomputed
/// from the stored body (a 304's is the exception: see
/// [`is_not_modified_length`]). Matched by name: an array of `HeaderName`
/// constants would be built and dropped at every call.
fn is_replayable(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "set-cookie"
            | "authorization"
            | "authentication-info"
            | "proxy-authentication-info"
            | "date"
            | "connection"
            | "proxy-connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
    )
}

/// Whether `name` is a 304's `Content-Length`, which is kept: it frames
/// nothing there (a 304 has no content) but tells the length of the
/// representation the client holds (RFC 9110 8.6). Left out, the replay
/// would not just lack it: axum gives a response without one its body's
/// length, and the replayed 304 would announce 0, which that section
/// forbids unless the 200 was empty (hyper sends it over HTTP/2; over
/// HTTP/1.1 it drops the `Content-Length` of any response without a body).
fn is_not_modified_length(status: StatusCode, name: &HeaderName) -> bool {
    status == StatusCode::NOT_MODIFIED && *name == CONTENT_LENGTH
}

/// Whether a replay of `stored` carries its header `name`: one that is
/// stored ([`is_replayable`]), or the `Content-Length` of a 304 without
/// a body. A 304 that holds a body (a record written by something else)
/// keeps none: hyper would frame that body by it.
fn is_replayed(stored: &StoredResponse, name: &HeaderName) -> bool {
    is_replayable(name)
        || (is_not_modified_length(stored.status, name)
            && stored.body.as_ref().is_some_and(Bytes::is_empty))
}

/// The headers of `parts` that a replay may carry: not those above (but a
/// 304's `Content-Length`), nor those the response's `Connection` header
/// marks as describing this connection alone (RFC 9110, 7.6.1).
pub(crate) fn replayable_headers(parts: &Parts) -> Vec<(HeaderName, HeaderValue)> {
    // Empty, and so never allocated, unless the response names some.
    let per_connection: Vec<&str> = named(&parts.headers, &CONNECTION)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    let kept = |name: &HeaderName| {
        (is_replayable(name) || is_not_modified_length(parts.status, name))
            && !per_connection
                .iter()
                .any(|listed| name.as_str().eq_ignore_ascii_case(listed))
    };
    let replayable = || parts.headers.iter().filter(|(name, _)| kept(name));
    // Counted first: a filtered iterator would reserve room for four.
    let mut headers = Vec::with_capacity(replayable().count());
    headers.extend(replayable().map(|(name, value)| (name.clone(), value.clone())));
    headers
}

/// Rebuilds a stored response, marked as a replay; the problem to answer
/// instead when it cannot be (its body was not stored, its status is an
/// informational 1xx, or it has more header names than a response can
/// carry).
///
/// Headers that are never stored are left out here too: a record written
/// before a name joined that list (`Authentication-Info`), or by something
/// else, may hold them, and a stored `Content-Length` or
/// `Transfer-Encoding` would frame the replayed body other than it is
/// sent (hyper trusts a `Content-Length` the response carries); a
/// bodiless 304's `Content-Length` frames nothing, and is replayed.
pub(crate) fn replay(stored: &StoredResponse) -> Result<Response, Problem> {
    // No final answer: hyper sends a 500 for a 1xx a service returns, and
    // a 101 would tell the client that the connection switched protocols.
    if stored.status.is_informational() {
        return Err(informational(stored));
    }
    let Some(body) = stored.body.clone() else {
        return Err(not_stored(stored));
    };
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = stored.status;
    let headers = response.headers_mut();
    let replayable = stored
        .headers
        .iter()
        .filter(|(name, _)| is_replayed(stored, name));
    // A `HeaderMap` holds at most 24,576 distinct names, and panics past
    // them; a record read back from a store may hold more.
    for (name, value) in replayable {
        if headers.try_append(name.clone(), value.clone()).is_err() {
            return Err(too_many_header_names(stored));
        }
    }
    if headers
        .try_insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"))
        .is_err()
    {
        return Err(too_many_header_names(stored));
    }
    Ok(response)
}

fn too_many_header_names(stored: &StoredResponse) -> Problem {
    Problem::new(
        ProblemKind::RecordCorrupt,
        format!(
            "the request with this idempotency key already completed with status {}, but its stored response has more distinct header names than an HTTP response can carry, so it cannot be replayed; it will not be executed again",
            stored.status.as_u16()
        ),
    )
}

fn informational(stored: &StoredResponse) -> Problem {
    Problem::new(
        ProblemKind::RecordCorrupt,
        format!(
            "the request with this idempotency key already completed, but its stored status {} is informational, not a final response, so it cannot be replayed; it will not be executed again",
            stored.status.as_u16()
        ),
    )
}

fn not_stored(stored: &StoredResponse) -> Problem {
    Problem::new(
        ProblemKind::ResponseNotStored,
        format!(
            "the request with this idempotency key already completed with status {}, but its response body was not kept (it was larger than the configured limit, an event stream, failed while being sent, did not match its Content-Length, ended with trailers, or had more than 65,535 headers); it will not be executed again",
            stored.status.as_u16()
        ),
    )
}

/// The values of the header `name` in `headers`, in order, found by
/// walking the map rather than hashing the name: a handler's response
/// holds a few headers, and comparing each name to a standard one costs
/// less than hashing it (the two lookups of a first execution, this and
/// the `Content-Type` one, cost about 150 instructions less this way;
/// `bench/src/bin/request-cost.rs`).
fn named<'a>(
    headers: &'a HeaderMap,
    name: &'a HeaderName,
) -> impl Iterator<Item = &'a HeaderValue> + 'a {
    headers
        .iter()
        .filter(move |(each, _)| *each == name)
        .map(|(_, value)| value)
}

/// A response body read for storing.
pub(crate) enum Collected {
    /// The whole body, within the limit.
    Complete(Bytes),
    /// The body was not kept, for the reason given. The response still
    /// carries every byte it would have without us, so nothing is lost for
    /// this caller; the record is stored without a body.
    Partial(Body, NotKept),
}

/// Why a response body was not kept for replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotKept {
    TooLarge,
    EventStream,
    Failed,
    /// The body's length is not the one its `Content-Length` announced.
    OtherLength,
    Trailers,
    TooManyHeaders,
}

impl NotKept {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::TooLarge => "larger than max_body_bytes",
            Self::EventStream => "an event stream is sent as it is produced, not stored",
            Self::Failed => "the body failed while being read",
            Self::OtherLength => {
                "the body's length is not the one its Content-Length header announced"
            }
            Self::Trailers => "the body ended with trailers, which a replay cannot carry",
            Self::TooManyHeaders => "the response has more headers than a record holds (65,535)",
        }
    }
}

/// Reads the body of a final response for storing, up to `limit` bytes;
/// an event stream (`text/event-stream`) is not read but passed on as it
/// comes: read to its end, it would reach its caller only when it ends,
/// if ever, and hold the key claimed for as long as it runs, even after
/// the caller went away.
///
/// A body read whole whose length is not the one the response's
/// `Content-Length` announced is not kept either: one that ended short of
/// it (a file that shrank while it was streamed, an upstream's answer
/// that a body of the handler's own ended cleanly where it was cut off)
/// would be replayed as a whole, truncated response, framed by its own
/// length. Its caller gets its bytes and then an error, as a failing body
/// would give them: read whole, the body announces its exact size, and
/// hyper would frame the response by that size under a header that says
/// another (or assert in a debug build), where the handler's own stream
/// had it frame the response by the header and fail where it fell short.
pub(crate) async fn collect_response(parts: &Parts, body: Body, limit: usize) -> Collected {
    if is_event_stream(parts) {
        return Collected::Partial(body, NotKept::EventStream);
    }
    match collect(body, limit).await {
        Collected::Complete(bytes) => match OtherLength::of(parts, &bytes) {
            None => Collected::Complete(bytes),
            Some(other) => {
                let failing = prefixed(bytes, Err(Some(axum::Error::new(other))));
                Collected::Partial(failing, NotKept::OtherLength)
            }
        },
        partial @ Collected::Partial(..) => partial,
    }
}

/// A response body, read whole, whose length is not the one a
/// `Content-Length` of its response announced.
#[derive(Debug, Clone, Copy)]
struct OtherLength {
    received: u64,
    declared: u64,
}

impl OtherLength {
    /// Whether `body`'s length differs from a `Content-Length` of `parts`
    /// that hyper would frame the response by (ASCII digits alone; hyper
    /// refuses any other). A 204 or 304 carries no content, and a 304's
    /// length is that of the representation it stands for (RFC 9110 8.6).
    fn of(parts: &Parts, body: &Bytes) -> Option<Self> {
        if matches!(
            parts.status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        ) {
            return None;
        }
        let received = u64::try_from(body.len()).ok()?;
        named(&parts.headers, &CONTENT_LENGTH)
            .filter_map(content_length)
            .find(|&declared| declared != received)
            .map(|declared| Self { received, declared })
    }
}

impl std::fmt::Display for OtherLength {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the response body has {} bytes, but its Content-Length announced {}",
            self.received, self.declared
        )
    }
}

impl std::error::Error for OtherLength {}

/// Whether the response's media type is `text/event-stream`, parameters
/// aside (RFC 9110 8.3.1: case-insensitive). Read as bytes: a parameter
/// that is not ASCII (which a header value may carry) does not make the
/// stream one to read to its end.
pub(crate) fn is_event_stream(parts: &Parts) -> bool {
    let Some(content_type) = named(&parts.headers, &CONTENT_TYPE).next() else {
        return false;
    };
    // The value up to its first `;`, trimmed, is the media type. Checked
    // from the front instead of split first: most responses are not event
    // streams, and `application/json` is told apart by its length alone.
    const EVENT_STREAM: &[u8] = b"text/event-stream";
    let value = content_type.as_bytes().trim_ascii_start();
    let Some((media_type, rest)) = value.split_at_checked(EVENT_STREAM.len()) else {
        return false;
    };
    media_type.eq_ignore_ascii_case(EVENT_STREAM)
        && matches!(rest.trim_ascii_start().first(), None | Some(b';'))
}

/// Reads `body` up to `limit` bytes.
pub(crate) async fn collect(mut body: Body, limit: usize) -> Collected {
    let mut buffer = BytesMut::new();
    loop {
        match body.frame().await {
            None => return Collected::Complete(buffer.freeze()),
            Some(Ok(frame)) => match frame.into_data() {
                // The whole body in one frame, as `Json`, `String` and
                // `Bytes` responses come: kept as it is, without a copy.
                Ok(data) if buffer.is_empty() && data.len() <= limit && body.is_end_stream() => {
                    return Collected::Complete(data);
                }
                Ok(data) if buffer.len() + data.len() <= limit => buffer.extend_from_slice(&data),
                // The frame that goes over is passed on as it came, after
                // what was read, not copied behind it: a large body sent in
                // one frame (a `Vec<u8>` or `Bytes` response) would peak at
                // twice its size in memory, and wait for the copy, before a
                // byte of it was sent.
                Ok(data) => {
                    let rest = prefixed(data, Ok(body));
                    let body = prefixed(buffer.freeze(), Ok(rest));
                    return Collected::Partial(body, NotKept::TooLarge);
                }
                Err(trailers) => {
                    // The first caller still gets the trailers.
                    let body = Body::new(Prefixed {
                        prefix: Some(buffer.freeze()),
                        trailers: trailers.into_trailers().ok(),
                        rest: Ok(body),
                    });
                    return Collected::Partial(body, NotKept::Trailers);
                }
            },
            Some(Err(error)) => {
                let body = prefixed(buffer.freeze(), Err(Some(error)));
                return Collected::Partial(body, NotKept::Failed);
            }
        }
    }
}

/// A `HEAD`'s response, marked [`Unstored`] if it has no body. A `HEAD`
/// is fingerprinted as a `GET` ([`fingerprinted_method`]), and the
/// attribute, or `IdempotentLayer` beneath `route_layer`, sees the `GET`
/// handler's whole response (axum takes the body off at the router's
/// edge), which may be stored for a `GET` as it is. A response without a
/// body may instead be what the handler made for a `HEAD` (axum's own
/// `handle-head-request` example answers one with its headers alone),
/// an explicit `head` handler's, or what is left of it once axum took
/// the body off (a layer around a whole `Router`): replayed to a `GET`,
/// it would be an empty body. It is not stored, so a `GET` after it runs;
/// a `HEAD` guards no side effect. A `GET` handler's own empty answer (a
/// 204) is left unstored too, which only costs that run.
///
/// A body that does not announce its length (a stream) is read up to its
/// first byte to tell: judged by its announced length alone, an empty
/// stream from a `head` handler would be stored, and replayed to the
/// `GET` after it as an empty body. The rest is left to the engine, which
/// reads it all to store it anyway. An event stream is not waited on (it
/// may send nothing for as long as it runs) and not stored: the engine
/// keeps none, and a record without it would answer the `GET` after the
/// `HEAD` 410 for the whole TTL, though no caller ever had the stream.
/// A response with a body is marked [`HeadAnswer`], for the same reason:
/// the engine stores it only if it keeps its body.
///
/// [`fingerprinted_method`]: crate::request::fingerprinted_method
pub(crate) async fn unstored_if_bodiless(response: Response) -> Response {
    let hint = http_body::Body::size_hint(response.body());
    if hint.exact() == Some(0) {
        return unstored(response, BODILESS_HEAD);
    }
    let (parts, mut body) = response.into_parts();
    if is_event_stream(&parts) {
        let reason = "a HEAD's event stream is not kept, and the GET after it must get one";
        return unstored(Response::from_parts(parts, body), reason);
    }
    if hint.lower() > 0 {
        return head_answer(Response::from_parts(parts, body));
    }
    loop {
        match body.frame().await {
            None => return unstored(Response::from_parts(parts, Body::empty()), BODILESS_HEAD),
            // An empty data frame says nothing of what follows.
            Some(Ok(frame)) if frame.data_ref().is_some_and(Bytes::is_empty) => {}
            Some(first) => {
                return head_answer(Response::from_parts(parts, after_first(first, body)));
            }
        }
    }
}

/// Marks a `HEAD`'s response that has a body, which is stored only with
/// its body: a record without one (the body was larger than
/// `max_body_bytes`, failed, ended with trailers or short of its
/// `Content-Length`) would answer the `GET` after the `HEAD` 410 for the
/// whole TTL, though no caller ever had the body (a `HEAD`'s gets none).
/// The engine releases the key instead, so that the `GET` runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadAnswer;

/// Why a `HEAD`'s response whose body was not kept is not stored.
pub(crate) const HEAD_BODY_NOT_KEPT: &str =
    "a HEAD's response body was not kept, and the GET after it must get one";

fn head_answer(mut response: Response) -> Response {
    response.extensions_mut().insert(HeadAnswer);
    response
}

/// Why a `HEAD`'s response without a body is not stored.
const BODILESS_HEAD: &str = "a HEAD's response without a body may not be the GET's";

fn unstored(mut response: Response, reason: &'static str) -> Response {
    response.extensions_mut().insert(Unstored(reason));
    response
}

/// `rest` after the frame `first` already read from it, as it came: data,
/// trailers, or the error that ended it (a frame of another kind has no
/// meaning to a client, and is left out).
pub(crate) fn after_first(first: Result<Frame<Bytes>, axum::Error>, rest: Body) -> Body {
    match first {
        Ok(frame) => match frame.into_data() {
            Ok(data) => prefixed(data, Ok(rest)),
            Err(frame) => Body::new(Prefixed {
                prefix: None,
                trailers: frame.into_trailers().ok(),
                rest: Ok(rest),
            }),
        },
        Err(error) => prefixed(Bytes::new(), Err(Some(error))),
    }
}

fn prefixed(prefix: Bytes, rest: Result<Body, Option<axum::Error>>) -> Body {
    Body::new(Prefixed {
        prefix: Some(prefix),
        trailers: None,
        rest,
    })
}

/// Bytes already read, the trailers read after them if any, then the rest
/// of the body (or the error that cut it short).
struct Prefixed {
    prefix: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
    rest: Result<Body, Option<axum::Error>>,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Some(prefix) = self.prefix.take().filter(|p| !p.is_empty()) {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if let Some(trailers) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        match &mut self.rest {
            Ok(body) => Pin::new(body).poll_frame(cx),
            Err(error) => Poll::Ready(error.take().map(Err)),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, Bytes::len) as u64;
        let rest = match &self.rest {
            Ok(body) => http_body::Body::size_hint(body),
            // An error still to come: announcing the prefix's length would
            // let a server frame the response by it and end it cleanly
            // before the error, a truncated body the client takes as whole.
            Err(Some(_)) => SizeHint::new(),
            Err(None) => SizeHint::with_exact(0),
        };
        // Raise the upper bound first: `set_lower` asserts lower <= upper.
        let mut hint = SizeHint::new();
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + prefix);
        }
        hint.set_lower(rest.lower() + prefix);
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::strategies::any_response;
    use axum::response::IntoResponse;
    use futures_util::FutureExt as _;
    use http::StatusCode;
    use proptest::prelude::*;

    #[tokio::test]
    async fn a_body_with_trailers_is_not_kept_but_still_carries_them() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames: Vec<Result<Frame<Bytes>, axum::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = Body::new(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )));
        let Collected::Partial(body, NotKept::Trailers) = collect(body, 100).await else {
            panic!("a body with trailers is not kept");
        };
        let collected = body.collect().await.unwrap();
        assert_eq!(
            collected.trailers().map(|t| t["grpc-status"].clone()),
            Some(HeaderValue::from_static("0"))
        );
        assert_eq!(collected.to_bytes(), "hello");
    }

    #[test]
    fn a_record_with_more_header_names_than_http_carries_is_a_problem_not_a_panic() {
        // 24,576 distinct names is what a `HeaderMap` holds; the replay
        // adds one more of its own.
        for count in [24_576, 30_000] {
            let stored = StoredResponse {
                status: StatusCode::CREATED,
                headers: (0..count)
                    .map(|i| {
                        let name = HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap();
                        (name, HeaderValue::from_static("v"))
                    })
                    .collect(),
                body: Some(Bytes::from_static(b"{}")),
            };
            let response = replay(&stored).unwrap_or_else(IntoResponse::into_response);
            assert_eq!(
                response.status(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "{count}"
            );
            assert_eq!(
                response.headers()[http::header::CONTENT_TYPE],
                "application/problem+json"
            );
        }
    }

    /// A 1xx is never stored by the engine, whatever the policy lists: a
    /// record holds one only if it is damaged or written by something else.
    #[test]
    fn a_record_with_an_informational_status_is_a_problem_not_a_1xx() {
        for code in [100, 101, 103, 199] {
            let stored = StoredResponse {
                status: StatusCode::from_u16(code).unwrap(),
                headers: vec![(
                    HeaderName::from_static("upgrade"),
                    HeaderValue::from_static("websocket"),
                )],
                body: Some(Bytes::new()),
            };
            let response = replay(&stored).unwrap_or_else(IntoResponse::into_response);
            assert_eq!(
                response.status(),
                StatusCode::INTERNAL_SERVER_ERROR,
                "{code}"
            );
            assert_eq!(
                response.headers()[http::header::CONTENT_TYPE],
                "application/problem+json"
            );
        }
    }

    #[tokio::test]
    async fn collects_a_small_body_whole() {
        match collect(Body::from("hello"), 10).await {
            Collected::Complete(bytes) => assert_eq!(bytes, "hello"),
            Collected::Partial(..) => panic!("a 5-byte body fits in 10"),
        }
    }

    #[tokio::test]
    async fn an_event_stream_is_passed_on_unread_whatever_its_parameters() {
        let response = |content_type: Option<&[u8]>| {
            let mut response = Response::new(Body::from("data: 1\n\n"));
            if let Some(content_type) = content_type {
                let value = HeaderValue::from_bytes(content_type).expect("a valid header value");
                response.headers_mut().insert(CONTENT_TYPE, value);
            }
            response.into_parts()
        };
        let streams: [&[u8]; 7] = [
            b"text/event-stream",
            b"Text/Event-Stream ; charset=utf-8",
            b"\ttext/event-stream\t;charset=utf-8",
            // A parameter that is not ASCII, which a header value may hold.
            b"text/event-stream; title=caf\xe9",
            b"text/event-stream;",
            b"text/event-stream \t ",
            b" text/event-stream;;",
        ];
        for content_type in streams {
            let (parts, body) = response(Some(content_type));
            let Collected::Partial(body, NotKept::EventStream) =
                collect_response(&parts, body, 100).await
            else {
                panic!("{} is an event stream", content_type.escape_ascii());
            };
            let bytes = body.collect().await.unwrap().to_bytes();
            assert_eq!(bytes, "data: 1\n\n");
        }
        let kept: [Option<&[u8]>; 10] = [
            None,
            Some(b""),
            Some(b"text/plain"),
            Some(b"text/event-streams"),
            Some(b"text/plain; for=text/event-stream"),
            Some(b"text/event-strea"),
            Some(b"text/event-stream x"),
            Some(b"text/event-stream x; charset=utf-8"),
            Some(b"; text/event-stream"),
            Some(b"text/event-stre\xe9m"),
        ];
        for content_type in kept {
            let (parts, body) = response(content_type);
            let collected = collect_response(&parts, body, 100).await;
            assert!(
                matches!(collected, Collected::Complete(_)),
                "{:?} is kept",
                content_type.map(<[u8]>::escape_ascii)
            );
        }
    }

    /// A body read whole is kept only if its length is the one its
    /// response's `Content-Length` announced (a 204's and a 304's aside,
    /// which frame no content); one that ended short of it, or went past
    /// it, reaches its caller whole and then fails, and is not kept.
    #[tokio::test]
    async fn a_body_of_another_length_than_its_content_length_is_not_kept() {
        let response = |status: u16, length: Option<&'static str>| {
            let mut response = Response::new(streamed_body());
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            if let Some(length) = length {
                let value = HeaderValue::from_static(length);
                response.headers_mut().insert(CONTENT_LENGTH, value);
            }
            response.into_parts()
        };
        for (status, length) in [(200, "40"), (201, "5"), (200, "0")] {
            let (parts, body) = response(status, Some(length));
            let Collected::Partial(mut body, NotKept::OtherLength) =
                collect_response(&parts, body, 100).await
            else {
                panic!("11 bytes under Content-Length {length} are not kept");
            };
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(first, "hello world");
            let error = body.frame().await.unwrap().unwrap_err();
            let expected = format!(
                "the response body has 11 bytes, but its Content-Length announced {length}"
            );
            assert_eq!(error.to_string(), expected);
        }
        let kept = [
            (200, Some("11")),
            (200, None),
            (200, Some("+11")),
            (204, Some("40")),
            (304, Some("40")),
        ];
        for (status, length) in kept {
            let (parts, body) = response(status, length);
            let collected = collect_response(&parts, body, 100).await;
            assert!(
                matches!(collected, Collected::Complete(_)),
                "{status} {length:?} is kept"
            );
        }
    }

    /// "hello world" in three frames.
    fn streamed_body() -> Body {
        let chunks = ["hel", "lo ", "world"].map(Ok::<_, std::io::Error>);
        Body::from_stream(futures_util::stream::iter(chunks))
    }

    #[tokio::test]
    async fn collects_a_streamed_body_whole() {
        match collect(streamed_body(), 11).await {
            Collected::Complete(bytes) => assert_eq!(bytes, "hello world"),
            Collected::Partial(..) => panic!("an 11-byte body fits in 11"),
        }
    }

    #[tokio::test]
    async fn an_oversized_streamed_body_is_passed_through_intact() {
        let Collected::Partial(body, NotKept::TooLarge) = collect(streamed_body(), 5).await else {
            panic!("an 11-byte body does not fit in 5");
        };
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "hello world");
    }

    /// The frames of `body`, in order.
    async fn frames(mut body: Body) -> Vec<Bytes> {
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.unwrap().into_data().unwrap());
        }
        frames
    }

    #[tokio::test]
    async fn the_frame_that_goes_over_the_limit_is_sent_as_it_came_not_copied() {
        let large = Bytes::from(vec![7; 4096]);
        let chunks = [Bytes::from_static(b"hi"), large.clone()].map(Ok::<_, std::io::Error>);
        let streamed = Body::from_stream(futures_util::stream::iter(chunks));
        let bodies = [
            (Body::from(large.clone()), large.to_vec()),
            (streamed, [&b"hi"[..], &large[..]].concat()),
        ];
        for (body, whole) in bodies {
            let Collected::Partial(body, NotKept::TooLarge) = collect(body, 100).await else {
                panic!("4 KiB does not fit in 100 bytes");
            };
            let frames = frames(body).await;
            assert_eq!(frames.concat(), whole);
            assert!(
                frames.iter().any(|frame| frame.as_ptr() == large.as_ptr()),
                "the large frame was copied"
            );
        }
    }

    #[tokio::test]
    async fn an_oversized_body_is_passed_through_intact() {
        let Collected::Partial(body, NotKept::TooLarge) =
            collect(Body::from("hello world"), 4).await
        else {
            panic!("an 11-byte body does not fit in 4");
        };
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "hello world");
    }

    #[test]
    fn replay_drops_nothing_it_stored_and_marks_itself() {
        let stored = StoredResponse {
            status: StatusCode::CREATED,
            headers: vec![
                (
                    HeaderName::from_static("x-a"),
                    HeaderValue::from_static("1"),
                ),
                (
                    HeaderName::from_static("x-a"),
                    HeaderValue::from_static("2"),
                ),
            ],
            body: Some(Bytes::from_static(b"{}")),
        };
        let response = replay(&stored).unwrap_or_else(IntoResponse::into_response);
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(response.headers().get_all("x-a").iter().count(), 2);
        assert_eq!(response.headers()[IDEMPOTENT_REPLAYED], "true");
    }

    #[test]
    fn session_and_connection_headers_are_not_stored() {
        let (mut parts, ()) = Response::new(()).into_parts();
        for name in [
            "set-cookie",
            "authorization",
            "authentication-info",
            "proxy-authentication-info",
            "date",
            "connection",
            "proxy-connection",
            "keep-alive",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "content-length",
        ] {
            parts
                .headers
                .insert(HeaderName::from_static(name), HeaderValue::from_static("x"));
        }
        parts
            .headers
            .insert("location", HeaderValue::from_static("/p/1"));
        let kept = replayable_headers(&parts);
        assert_eq!(
            kept,
            vec![(
                HeaderName::from_static("location"),
                HeaderValue::from_static("/p/1")
            )]
        );
    }

    /// A record written before `Authentication-Info` was left out, or by
    /// something else: what is never stored is not replayed either. A
    /// `Content-Length` that is not the body's would have hyper frame the
    /// response by it (and panic in a debug build).
    #[test]
    fn headers_never_stored_are_not_replayed_from_a_record_that_holds_them() {
        let header = |name: &'static str, value: &'static str| {
            (
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            )
        };
        let stored = StoredResponse {
            status: StatusCode::CREATED,
            headers: vec![
                header("content-length", "99"),
                header("transfer-encoding", "gzip"),
                header("authentication-info", "nextnonce=\"first-callers\""),
                header("set-cookie", "sid=first-callers"),
                header("location", "/p/1"),
            ],
            body: Some(Bytes::from_static(b"{}")),
        };
        let response = replay(&stored).unwrap_or_else(IntoResponse::into_response);
        let names: Vec<&str> = response.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["location", "idempotent-replayed"]);
    }

    #[test]
    fn headers_the_response_names_in_connection_are_not_stored() {
        let (mut parts, ()) = Response::new(()).into_parts();
        let headers = &mut parts.headers;
        headers.insert("connection", HeaderValue::from_static("X-Hop, close"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("x-kept", HeaderValue::from_static("2"));
        let kept = replayable_headers(&parts);
        assert_eq!(
            kept,
            vec![(
                HeaderName::from_static("x-kept"),
                HeaderValue::from_static("2")
            )]
        );
    }

    /// A 304's `Content-Length` is the length of the representation it
    /// stands for (RFC 9110 8.6), not of a body: it is stored and replayed,
    /// unless a record holds a body it would frame. Any other status's is
    /// recomputed from the body.
    #[test]
    fn a_304_keeps_its_content_length_as_no_other_status_does() {
        let length = || HeaderValue::from_static("1234");
        let parts = |status| {
            let (mut parts, ()) = Response::new(()).into_parts();
            parts.status = status;
            parts.headers.insert(CONTENT_LENGTH, length());
            parts
        };
        let stored = StoredResponse {
            status: StatusCode::NOT_MODIFIED,
            headers: replayable_headers(&parts(StatusCode::NOT_MODIFIED)),
            body: Some(Bytes::new()),
        };
        let replayed = replay(&stored).unwrap_or_else(IntoResponse::into_response);
        let lengths = |response: &Response| {
            let all = response.headers().get_all(CONTENT_LENGTH);
            all.iter().cloned().collect::<Vec<_>>()
        };
        assert_eq!(lengths(&replayed), [length()]);
        let with_a_body = StoredResponse {
            body: Some(Bytes::from_static(b"{}")),
            ..stored
        };
        let replayed = replay(&with_a_body).unwrap_or_else(IntoResponse::into_response);
        assert!(lengths(&replayed).is_empty());
        for status in [
            StatusCode::OK,
            StatusCode::NO_CONTENT,
            StatusCode::RESET_CONTENT,
        ] {
            assert!(replayable_headers(&parts(status)).is_empty(), "{status}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever a store hands back, a replay carries it all: status,
        /// every header value in order per name (but those never stored),
        /// and the body.
        #[test]
        fn a_replay_carries_every_stored_part(stored in any_response()) {
            let response = replay(&stored).unwrap_or_else(IntoResponse::into_response);
            if stored.status.is_informational() {
                prop_assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
                return Ok(());
            }
            let Some(body) = stored.body.clone() else {
                prop_assert_eq!(response.status(), StatusCode::GONE);
                return Ok(());
            };
            prop_assert_eq!(response.status(), stored.status);
            prop_assert_eq!(&response.headers()[IDEMPOTENT_REPLAYED], "true");
            for (name, _) in &stored.headers {
                let sent: Vec<_> = response.headers().get_all(name).iter().collect();
                let kept: Vec<_> = stored
                    .headers
                    .iter()
                    .filter(|(stored_name, _)| stored_name == name && is_replayed(&stored, name))
                    .map(|(_, value)| value)
                    .collect();
                prop_assert_eq!(sent, kept);
            }
            let sent = response
                .into_body()
                .collect()
                .now_or_never()
                .expect("an in-memory body is ready")
                .expect("an in-memory body reads")
                .to_bytes();
            prop_assert_eq!(sent, body);
        }

        /// The check from the front agrees with what it checks: the value
        /// up to its first `;`, trimmed, is `text/event-stream` in any case.
        #[test]
        fn the_event_stream_check_agrees_with_its_definition(
            pieces in prop::collection::vec(prop::sample::select(CONTENT_TYPE_PIECES), 0..6)
        ) {
            let value = pieces.concat();
            let (mut parts, ()) = Response::new(()).into_parts();
            let header = HeaderValue::from_bytes(&value).expect("a valid header value");
            parts.headers.insert(CONTENT_TYPE, header);
            let media_type = value.split(|&byte| byte == b';').next().unwrap_or_default();
            let expected = media_type.trim_ascii().eq_ignore_ascii_case(b"text/event-stream");
            prop_assert_eq!(is_event_stream(&parts), expected, "{}", value.escape_ascii());
        }
    }

    /// What `Content-Type` values are made of in the property above: the
    /// media type whole and cut short, in other cases, and what may
    /// surround it.
    const CONTENT_TYPE_PIECES: &[&[u8]] = &[
        b"text/event-stream",
        b"TEXT/Event-Stream",
        b"text/event-strea",
        b"text/",
        b"event-stream",
        b" ",
        b"\t",
        b";",
        b"x",
        b"\xe9",
    ];
}
