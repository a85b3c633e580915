//! Scope resolution from request headers (`X-Api-Key`, `Authorization:
//! Bearer`/`Basic`, a named header): any headers resolve to a scope or a
//! refusal, never a panic; the padding around a value and the case of an
//! `Authorization` scheme never change the scope; a value seen once names
//! the scope its model says, and nothing resolves to the empty credential.
#![no_main]

use arbitrary::Arbitrary;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue};
use idempotent_core::Scope;
use idempotent_core::scope::{ScopeDigest, fuzz_resolve};
use libfuzzer_sys::fuzz_target;

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const X_TENANT: HeaderName = HeaderName::from_static("x-tenant");
const X_OTHER: HeaderName = HeaderName::from_static("x-idempotency-other");

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Name {
    ApiKey,
    Authorization,
    Tenant,
    Other,
}

impl Name {
    fn header(self) -> HeaderName {
        match self {
            Self::ApiKey => X_API_KEY,
            Self::Authorization => AUTHORIZATION,
            Self::Tenant => X_TENANT,
            Self::Other => X_OTHER,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Whether `Authorization` itself is the configured API-key header.
    authorization_is_api_key_header: bool,
    fields: Vec<(Name, Vec<u8>)>,
    /// Which OWS pads the values in the second resolution.
    padding: (bool, bool),
}

fuzz_target!(|input: Input| {
    let api_key_header = if input.authorization_is_api_key_header {
        AUTHORIZATION
    } else {
        X_API_KEY
    };
    let Some(headers) = header_map(&input.fields, |_, value| value.to_vec()) else {
        return;
    };
    let (lead, trail): (&[u8], &[u8]) = match input.padding {
        (true, true) => (b" \t", b"\t "),
        (true, false) => (b" ", b""),
        (false, true) => (b"", b"\t"),
        (false, false) => (b"\t", b" "),
    };
    let padded = header_map(&input.fields, |_, value| [lead, value, trail].concat());
    let rescheme = header_map(&input.fields, |name, value| match name {
        Name::Authorization => flip_scheme_case(value),
        _ => value.to_vec(),
    });

    for scope in [
        Scope::ApiKey,
        Scope::Global,
        Scope::Custom,
        Scope::Header("x-tenant"),
    ] {
        let resolved = fuzz_resolve(scope, &headers, &api_key_header);
        if let Err(refused) = &resolved {
            assert!(!refused.to_string().is_empty());
        }
        if let Some(padded) = &padded {
            let again = fuzz_resolve(scope, padded, &api_key_header);
            assert_eq!(resolved, again, "padding changed the scope of {scope:?}");
        }
        if let (Some(rescheme), false) = (&rescheme, input.authorization_is_api_key_header) {
            let again = fuzz_resolve(scope, rescheme, &api_key_header);
            assert_eq!(resolved, again, "a scheme's case changed {scope:?}");
        }
        if let Ok(Some(digest)) = resolved {
            assert_ne!(digest, ScopeDigest::api_key(b""), "an empty credential");
        }
        check_model(scope, &headers, &api_key_header, &resolved);
    }
    // The same scope: its refusal names the header as the endpoint wrote it.
    let upper = fuzz_resolve(Scope::Header("X-Tenant"), &headers, &api_key_header);
    let lower = fuzz_resolve(Scope::Header("x-tenant"), &headers, &api_key_header);
    assert_eq!(upper.ok(), lower.ok());
});

type Resolved = Result<Option<ScopeDigest>, idempotent_core::scope::MissingCredential>;

/// What each scope must resolve to, where that is simple to say.
fn check_model(scope: Scope, headers: &HeaderMap, api_key_header: &HeaderName, got: &Resolved) {
    let one = |name: &HeaderName| -> Result<Option<Vec<u8>>, ()> {
        let mut values = headers.get_all(name).iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(());
        }
        Ok(first
            .map(|value| trim_ows(value.as_bytes()).to_vec())
            .filter(|value| !value.is_empty()))
    };
    match scope {
        Scope::Global => assert_eq!(got, &Ok(Some(ScopeDigest::global()))),
        Scope::Custom => assert_eq!(got, &Ok(None)),
        Scope::Header(name) => match one(&X_TENANT) {
            Ok(Some(value)) => assert_eq!(got, &Ok(Some(ScopeDigest::header(name, &value)))),
            _ => assert!(got.is_err()),
        },
        Scope::ApiKey => match (one(api_key_header), one(&AUTHORIZATION)) {
            (Err(()), _) => assert!(got.is_err()),
            (Ok(Some(key)), _) if *api_key_header != AUTHORIZATION => {
                assert_eq!(got, &Ok(Some(ScopeDigest::api_key(&key))));
            }
            (Ok(None), Err(())) => assert!(got.is_err()),
            (Ok(None), Ok(None)) => assert!(got.is_err()),
            (Ok(None), Ok(Some(value))) => {
                if let Some(token) = bearer(&value) {
                    assert_eq!(got, &Ok(Some(ScopeDigest::api_key(token))));
                } else if !starts_with_scheme(&value, b"basic ") {
                    assert!(got.is_err(), "{:?}", String::from_utf8_lossy(&value));
                }
            }
            _ => {}
        },
        _ => {}
    }
}

fn bearer(value: &[u8]) -> Option<&[u8]> {
    if !starts_with_scheme(value, b"bearer ") {
        return None;
    }
    Some(value[7..].trim_ascii()).filter(|token| !token.is_empty())
}

fn starts_with_scheme(value: &[u8], scheme: &[u8]) -> bool {
    value.len() >= scheme.len() && value[..scheme.len()].eq_ignore_ascii_case(scheme)
}

fn trim_ows(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |at| at + 1);
    &value[start..end.max(start)]
}

/// The value with the case of its first word (an `Authorization`
/// scheme) flipped.
fn flip_scheme_case(value: &[u8]) -> Vec<u8> {
    let mut flipped = value.to_vec();
    for byte in flipped.iter_mut().take_while(|byte| **byte != b' ') {
        if byte.is_ascii_alphabetic() {
            *byte ^= 0x20;
        }
    }
    flipped
}

fn header_map(
    fields: &[(Name, Vec<u8>)],
    value_of: impl Fn(Name, &[u8]) -> Vec<u8>,
) -> Option<HeaderMap> {
    let mut headers = HeaderMap::new();
    for (name, value) in fields {
        let value = HeaderValue::from_bytes(&value_of(*name, value)).ok()?;
        headers.append(name.header(), value);
    }
    Some(headers)
}
