//! A compact binary encoding of [`Completed`] for stores that keep a record
//! as one value (Redis, SQLite, caches).
//!
//! Layout, all integers big-endian:
//! `version u8 | fingerprint [32] | expires_at u64 | status u16 |
//!  header_count u16 | (name_len u16, name, value_len u32, value)* |
//!  body_flag u8 | [body_len u32, body]`

use std::borrow::Cow;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};

use super::{Completed, StoredResponse};
use crate::fingerprint::Fingerprint;

const VERSION: u8 = 1;
/// Offset of `expires_at`: after the version and the fingerprint.
const EXPIRES_AT: usize = 1 + 32;

/// A stored record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored idempotency record is corrupt: {0}")]
pub struct CodecError(Cow<'static, str>);

impl CodecError {
    /// A record, or a store's row, that is corrupt for `reason`.
    pub(crate) const fn new(reason: &'static str) -> Self {
        Self(Cow::Borrowed(reason))
    }

    /// A store's row that cannot be read for `reason`, which names what
    /// only the store knows: its table, the column and what to change.
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    pub(crate) fn described(reason: String) -> Self {
        Self(Cow::Owned(reason))
    }
}

impl Completed {
    /// Encodes the record in the binary layout described in this module.
    #[must_use]
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out.freeze()
    }

    /// Appends [`encode`](Self::encode)'s output to `out`, which grows if
    /// it has less than [`encoded_len`](Self::encoded_len) bytes to spare.
    pub(crate) fn encode_into(&self, out: &mut BytesMut) {
        let response = &self.response;
        out.put_u8(VERSION);
        out.put_slice(self.fingerprint.as_bytes());
        out.put_u64(self.expires_at);
        out.put_u16(response.status.as_u16());
        out.put_u16(header_count(response));
        for (name, value) in stored_headers(response) {
            put_slice_u16(out, name.as_str().as_bytes());
            put_slice_u32(out, value.as_bytes());
        }
        match stored_body(response) {
            Some(body) => {
                out.put_u8(1);
                put_slice_u32(out, body);
            }
            None => out.put_u8(0),
        }
    }

    /// The deadline of an encoded record, read in place; 0 (long past) if
    /// the encoding is too short to hold one, so a corrupt record is never
    /// served.
    pub(crate) fn encoded_expires_at(encoded: &[u8]) -> u64 {
        encoded
            .get(EXPIRES_AT..EXPIRES_AT + 8)
            .and_then(|bytes| bytes.try_into().ok())
            .map_or(0, u64::from_be_bytes)
    }

    /// The exact length of [`encode`](Self::encode)'s output.
    pub(crate) fn encoded_len(&self) -> usize {
        Self::encoded_len_of(&self.response)
    }

    /// The exact length of the encoding of a record of `response`, whatever
    /// its fingerprint and deadline (fixed-size fields).
    pub(crate) fn encoded_len_of(response: &StoredResponse) -> usize {
        let headers: usize = stored_headers(response)
            .map(|(name, value)| 2 + clamp_u16(name.as_str().len()) + 4 + clamp_u32(value.len()))
            .sum();
        let body = stored_body(response).map_or(0, |body| 4 + clamp_u32(body.len()));
        1 + 32 + 8 + 2 + 2 + headers + 1 + body
    }

    /// Drops the body if the encoded record would take more than
    /// `max_bytes`, the most a store keeps in one value: the record is then
    /// kept without it, as the engine keeps one past `max_body_bytes`, so
    /// retries get 410 rather than run the handler again once the lease
    /// lapses.
    #[cfg(any(feature = "redis", feature = "sqlite"))]
    pub(crate) fn fit(&mut self, max_bytes: usize) {
        if self.encoded_len() > max_bytes {
            self.response.body = None;
        }
    }

    /// Decodes [`Completed::encode`] output.
    ///
    /// # Errors
    /// Truncated, unknown-version or otherwise invalid input.
    pub fn decode(mut input: Bytes) -> Result<Self, CodecError> {
        if take_u8(&mut input)? != VERSION {
            return Err(CodecError::new("unknown record version"));
        }
        let fingerprint = Fingerprint::from_bytes(take_array(&mut input)?);
        let expires_at = take_u64(&mut input)?;
        let status = StatusCode::from_u16(take_u16(&mut input)?)
            .map_err(|_| CodecError::new("invalid status"))?;
        let headers = (0..take_u16(&mut input)?)
            .map(|_| take_header(&mut input))
            .collect::<Result<_, _>>()?;
        let body = match take_u8(&mut input)? {
            0 => None,
            1 => Some(take_len_u32(&mut input)?),
            _ => return Err(CodecError::new("invalid body flag")),
        };
        // A well-formed record ends with its body: bytes after it mean the
        // value was written by something else, or cut and spliced.
        if input.has_remaining() {
            return Err(CodecError::new("trailing bytes after the body"));
        }
        let response = StoredResponse {
            status,
            headers,
            body,
        };
        Ok(Self {
            fingerprint,
            response,
            expires_at,
        })
    }
}

/// The most headers a record holds: the count field has 16 bits. A
/// response with more is stored without its body (see [`stored_body`]).
pub(crate) const MAX_HEADERS: usize = u16::MAX as usize;

/// How many headers are stored.
fn header_count(response: &StoredResponse) -> u16 {
    u16::try_from(response.headers.len()).unwrap_or(u16::MAX)
}

/// The body, unless headers past [`MAX_HEADERS`] are cut or the body
/// itself is longer than its 32-bit length field: a record is never
/// replayed with headers or bytes missing, but answered as one whose body
/// was not kept. The engine already keeps such a response without its
/// body; this holds for any caller of a store that uses this encoding.
fn stored_body(response: &StoredResponse) -> Option<&Bytes> {
    let body = response.body.as_ref()?;
    let fits = response.headers.len() <= MAX_HEADERS && body.len() <= MAX_U32_PREFIXED;
    fits.then_some(body)
}

fn stored_headers(response: &StoredResponse) -> impl Iterator<Item = &(HeaderName, HeaderValue)> {
    let count = usize::from(header_count(response));
    response.headers.iter().take(count)
}

/// How much of a slice its 16-bit length prefix can cover; longer ones are
/// cut there, by `encode` and `encoded_len` alike.
fn clamp_u16(len: usize) -> usize {
    len.min(usize::from(u16::MAX))
}

/// The longest slice a 32-bit length prefix covers, a body's among them.
pub(crate) const MAX_U32_PREFIXED: usize = u32::MAX as usize;

/// As [`clamp_u16`], for a 32-bit length prefix.
fn clamp_u32(len: usize) -> usize {
    len.min(MAX_U32_PREFIXED)
}

fn put_slice_u16(out: &mut BytesMut, bytes: &[u8]) {
    let bytes = &bytes[..clamp_u16(bytes.len())];
    out.put_u16(u16::try_from(bytes.len()).unwrap_or(u16::MAX));
    out.put_slice(bytes);
}

fn put_slice_u32(out: &mut BytesMut, bytes: &[u8]) {
    let bytes = &bytes[..clamp_u32(bytes.len())];
    out.put_u32(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
    out.put_slice(bytes);
}

fn take_header(input: &mut Bytes) -> Result<(HeaderName, HeaderValue), CodecError> {
    let len = usize::from(take_u16(input)?);
    ensure_remaining(input, len)?;
    // Parsed in place; `advance` after, so the name never takes a reference.
    let name = HeaderName::from_bytes(&input[..len])
        .map_err(|_| CodecError::new("invalid header name"))?;
    input.advance(len);
    let value = take_len_u32(input)?;
    let value = HeaderValue::from_maybe_shared(value)
        .map_err(|_| CodecError::new("invalid header value"))?;
    Ok((name, value))
}

fn take_len_u32(input: &mut Bytes) -> Result<Bytes, CodecError> {
    let len = take_u32(input)? as usize;
    take_bytes(input, len)
}

fn take_bytes(input: &mut Bytes, len: usize) -> Result<Bytes, CodecError> {
    ensure_remaining(input, len)?;
    Ok(input.split_to(len))
}

/// Fixed-size fields are copied out rather than split off: a split takes
/// and drops a reference to the shared buffer, each one an atomic update.
fn take_array<const N: usize>(input: &mut Bytes) -> Result<[u8; N], CodecError> {
    ensure_remaining(input, N)?;
    let mut array = [0; N];
    input.copy_to_slice(&mut array);
    Ok(array)
}

/// `Bytes` panics when read past its end; every read checks first.
fn ensure_remaining(input: &Bytes, len: usize) -> Result<(), CodecError> {
    if input.remaining() < len {
        return Err(CodecError::new("truncated"));
    }
    Ok(())
}

fn take_u8(input: &mut Bytes) -> Result<u8, CodecError> {
    take_array::<1>(input).map(u8::from_be_bytes)
}

fn take_u16(input: &mut Bytes) -> Result<u16, CodecError> {
    take_array(input).map(u16::from_be_bytes)
}

fn take_u32(input: &mut Bytes) -> Result<u32, CodecError> {
    take_array(input).map(u32::from_be_bytes)
}

fn take_u64(input: &mut Bytes) -> Result<u64, CodecError> {
    take_array(input).map(u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;
    use crate::record::strategies::any_completed;

    fn sample(body: Option<&'static [u8]>) -> Completed {
        Completed {
            fingerprint: Fingerprint::from_bytes([7; 32]),
            expires_at: 1_700_000_000_000,
            response: StoredResponse {
                status: StatusCode::CREATED,
                headers: vec![
                    (
                        HeaderName::from_static("location"),
                        HeaderValue::from_static("/p/1"),
                    ),
                    (
                        HeaderName::from_static("x-a"),
                        HeaderValue::from_static("1"),
                    ),
                    (
                        HeaderName::from_static("x-a"),
                        HeaderValue::from_static("2"),
                    ),
                ],
                body: body.map(Bytes::from_static),
            },
        }
    }

    #[test]
    fn round_trips_binary_bodies_and_repeated_headers() {
        let record = sample(Some(&[0, 159, 146, 150, 255]));
        assert_eq!(Completed::decode(record.encode()), Ok(record));
    }

    #[test]
    fn encoded_len_is_exact() {
        for record in [sample(Some(b"hello")), sample(None)] {
            assert_eq!(record.encoded_len(), record.encode().len());
        }
    }

    #[test]
    fn the_deadline_is_read_in_place() {
        let record = sample(Some(b"{}"));
        assert_eq!(
            Completed::encoded_expires_at(&record.encode()),
            record.expires_at
        );
        assert_eq!(Completed::encoded_expires_at(&[1; 40]), 0);
    }

    #[test]
    fn round_trips_an_omitted_body() {
        let record = sample(None);
        assert_eq!(Completed::decode(record.encode()), Ok(record));
    }

    #[test]
    fn bytes_after_the_body_are_an_error() {
        for record in [sample(Some(b"hello")), sample(None)] {
            let mut extended = BytesMut::from(&record.encode()[..]);
            extended.put_u8(0);
            assert_eq!(
                Completed::decode(extended.freeze()),
                Err(CodecError::new("trailing bytes after the body"))
            );
        }
    }

    #[test]
    fn a_body_flag_other_than_0_or_1_is_an_error() {
        let encoded = sample(None).encode();
        let mut flagged = BytesMut::from(&encoded[..]);
        let flag = flagged.len() - 1;
        flagged[flag] = 2;
        assert_eq!(
            Completed::decode(flagged.freeze()),
            Err(CodecError::new("invalid body flag"))
        );
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let encoded = sample(Some(b"hello")).encode();
        for len in 0..encoded.len() {
            assert!(
                Completed::decode(encoded.slice(..len)).is_err(),
                "prefix {len}"
            );
        }
    }

    #[test]
    fn round_trips_a_large_body_and_as_many_headers_as_a_record_holds() {
        let mut record = sample(None);
        let header = (
            HeaderName::from_static("x-h"),
            HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        );
        record.response.headers = vec![header; MAX_HEADERS];
        record.response.body = Some(Bytes::from(vec![0xAB; 1 << 20]));
        let encoded = record.encode();
        assert_eq!(encoded.len(), record.encoded_len());
        assert_eq!(Completed::decode(encoded), Ok(record));
    }

    /// More headers than the count field holds, as a store's caller may
    /// pass: the record keeps what fits and drops its body, so that it is
    /// answered as not stored rather than replayed with headers missing.
    /// The length stays exact: stores carve the encoding into a buffer of
    /// that size.
    #[test]
    fn a_record_with_headers_past_the_count_field_keeps_no_body() {
        let mut record = sample(Some(b"{}"));
        let header = record.response.headers[0].clone();
        record.response.headers = vec![header; MAX_HEADERS + 1];
        let encoded = record.encode();
        assert_eq!(encoded.len(), record.encoded_len());
        let decoded = Completed::decode(encoded).unwrap();
        assert_eq!(decoded.response.headers.len(), MAX_HEADERS);
        assert_eq!(decoded.response.body, None);
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_body_past_its_length_field_is_not_kept_cut_short() {
        let mut record = sample(None);
        // Zeroed, so the allocator maps the 4 GiB without touching them;
        // the encoding never copies a body it does not keep.
        record.response.body = Some(Bytes::from(vec![0; MAX_U32_PREFIXED + 1]));
        let encoded = record.encode();
        assert_eq!(encoded.len(), record.encoded_len());
        let decoded = Completed::decode(encoded).unwrap();
        let kept = decoded.response.body.as_ref().map(Bytes::len);
        assert_eq!(
            kept, None,
            "a body of 4 GiB and one byte was kept cut short"
        );
        assert_eq!(decoded.response.headers, record.response.headers);
    }

    /// A valid encoding with up to three bytes overwritten, then maybe cut
    /// short or extended: closer to real damage than random bytes, which
    /// nearly all stop at the version byte.
    fn damaged() -> impl Strategy<Value = Vec<u8>> {
        let edits = prop::collection::vec((any::<Index>(), any::<u8>()), 0..4);
        let cut = prop::option::of(any::<Index>());
        (any_completed(), edits, cut, any::<bool>()).prop_map(|(record, edits, cut, extend)| {
            let mut bytes = record.encode().to_vec();
            for (at, byte) in edits {
                *at.get_mut(&mut bytes) = byte;
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len()));
            }
            if extend {
                bytes.push(0);
            }
            bytes
        })
    }

    /// Random bytes, most of them behind a valid version byte.
    fn random() -> impl Strategy<Value = Vec<u8>> {
        (any::<bool>(), prop::collection::vec(any::<u8>(), 0..96)).prop_map(|(versioned, rest)| {
            let mut bytes = Vec::with_capacity(rest.len() + 1);
            if versioned {
                bytes.push(VERSION);
            }
            bytes.extend(rest);
            bytes
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn every_record_round_trips(record in any_completed()) {
            let encoded = record.encode();
            prop_assert_eq!(encoded.len(), record.encoded_len());
            prop_assert_eq!(Completed::encoded_expires_at(&encoded), record.expires_at);
            prop_assert_eq!(Completed::decode(encoded), Ok(record));
        }

        #[test]
        fn any_bytes_decode_to_an_error_or_a_record_that_round_trips(
            bytes in prop_oneof![damaged(), random()],
        ) {
            if let Ok(record) = Completed::decode(Bytes::from(bytes)) {
                prop_assert_eq!(Completed::decode(record.encode()), Ok(record));
            }
        }
    }
}
