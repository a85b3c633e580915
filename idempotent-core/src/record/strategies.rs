//! Proptest strategies for stored records, shared by the codec's, the
//! replay's and the stores' tests.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;

use super::{Completed, StoredResponse};
use crate::fingerprint::Fingerprint;

/// Any status `StatusCode` holds: 100 to 999.
pub(crate) fn any_status() -> impl Strategy<Value = StatusCode> {
    (100u16..=999).prop_map(|code| StatusCode::from_u16(code).expect("in range"))
}

/// Lowercase token characters: what `HeaderName` keeps; now and then a
/// name that is repeated in responses, or one that is never stored.
pub(crate) fn any_header_name() -> impl Strategy<Value = HeaderName> {
    let known = prop::sample::select(
        &[
            "vary",
            "link",
            "content-type",
            "content-length",
            "transfer-encoding",
            "set-cookie",
            "authentication-info",
            "connection",
        ][..],
    );
    let token = "[a-z0-9!#$%&'*+.^_`|~-]{1,24}";
    prop_oneof![3 => token.prop_map(String::from), 1 => known.prop_map(String::from)]
        .prop_map(|name| HeaderName::from_bytes(name.as_bytes()).expect("a token"))
}

/// Every byte a header value may hold, non-UTF-8 (obs-text) included.
pub(crate) fn any_header_value() -> impl Strategy<Value = HeaderValue> {
    let byte = prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff];
    prop::collection::vec(byte, 0..32)
        .prop_map(|bytes| HeaderValue::from_bytes(&bytes).expect("visible bytes"))
}

/// Responses with repeated names, empty values and absent or empty bodies.
pub(crate) fn any_response() -> impl Strategy<Value = StoredResponse> {
    let header = (any_header_name(), any_header_value());
    let body = prop::option::of(prop::collection::vec(any::<u8>(), 0..64));
    (any_status(), prop::collection::vec(header, 0..8), body).prop_map(|(status, headers, body)| {
        StoredResponse {
            status,
            headers,
            body: body.map(Bytes::from),
        }
    })
}

pub(crate) fn any_completed() -> impl Strategy<Value = Completed> {
    (any::<[u8; 32]>(), any_response(), any::<u64>()).prop_map(
        |(fingerprint, response, expires_at)| Completed {
            fingerprint: Fingerprint::from_bytes(fingerprint),
            response,
            expires_at,
        },
    )
}
