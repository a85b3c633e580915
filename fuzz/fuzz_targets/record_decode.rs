//! Stored records: any bytes read back from a store (a corrupt value, or
//! one another program wrote) decode to a record or an error, never a
//! panic, and never allocate from a length prefix more than the input
//! holds (run with `-malloc_limit_mb`); a record decoded re-encodes to an
//! encoding as long as the input that decodes to it again; and any record
//! built from the input's bytes round-trips through the encoding.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use idempotent_core::Fingerprint;
use idempotent_core::record::{Completed, StoredResponse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    decode_any(data);
    round_trip_built(data);
});

fn decode_any(data: &[u8]) {
    let Ok(record) = Completed::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let encoded = record.encode();
    // Header names are read in any case and kept in lowercase, so the
    // bytes may differ, but never the layout.
    assert_eq!(encoded.len(), data.len());
    assert_eq!(Completed::decode(encoded), Ok(record));
}

/// A record made of the input's bytes: its headers those that `http`
/// accepts.
fn round_trip_built(data: &[u8]) {
    let mut input = Unstructured::new(data);
    let Ok(record) = built(&mut input) else {
        return;
    };
    let encoded = record.encode();
    assert_eq!(Completed::decode(encoded), Ok(record));
}

fn built(input: &mut Unstructured<'_>) -> arbitrary::Result<Completed> {
    let fingerprint = Fingerprint::from_bytes(<[u8; 32]>::arbitrary(input)?);
    let status = StatusCode::from_u16(input.int_in_range(100..=999)?)
        .map_err(|_| arbitrary::Error::IncorrectFormat)?;
    let mut headers = Vec::new();
    for _ in 0..input.int_in_range(0..=8u8)? {
        let name = <&[u8]>::arbitrary(input)?;
        let value = <&[u8]>::arbitrary(input)?;
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.push((name, value));
        }
    }
    let body = Option::<&[u8]>::arbitrary(input)?.map(Bytes::copy_from_slice);
    let expires_at = u64::arbitrary(input)?;
    Ok(Completed::new(
        fingerprint,
        StoredResponse::new(status, headers, body),
        expires_at,
    ))
}
