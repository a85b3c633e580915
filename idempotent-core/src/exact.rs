//! Exact replays: a retry that repeats, byte for byte, a request already
//! replayed is answered before its body is parsed and fingerprinted.
//!
//! An `#[idempotent]` handler's fingerprint hashes its typed arguments, so
//! every request pays the body extractor's parse and the canonical
//! encoding before the engine can tell a replay from a first execution.
//! When every fingerprinted argument is a function of the request's URI,
//! path parameters and body (`Json`, `Form`, `Bytes`, `String`, `Path`,
//! `Query`, `RawQuery`), equal bytes mean an equal fingerprint, so an
//! exact repeat of a replayed request needs neither. The attribute then
//! extracts the body through
//! [`ExactBody`](crate::__private::ExactBody), which runs after every
//! other extractor (authentication included) and asks this module first.
//!
//! What is remembered, per record key, in a small table of fixed size:
//! the fingerprint a replay was served under and the digest of the exact
//! request that asked for it. Nothing is learned on first executions, so
//! they pay only a lookup: the first replay of a key marks it, the next
//! one records its digest, and the repeats after that are answered from
//! the store without touching the body extractor. A hit is still checked
//! against the store's record (it must be completed, unexpired and carry
//! the same fingerprint), so the table can only make a replay cheaper,
//! never change an answer.

use std::hash::Hasher;
use std::sync::Mutex;

use axum::body::Body;
use axum::extract::{FromRequestParts, RawPathParams};
use axum::response::Response;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http_body_util::{BodyExt, Limited};
use siphasher::sip128::{Hasher128, SipHasher13};

use crate::fingerprint::Fingerprint;
use crate::idempotency::Settings;
use crate::key::IdempotencyKey;
use crate::record::{Record, RecordKey};
use crate::replay::replay;
use crate::request::{IdempotentRequest, ScopeSource};
use crate::scope::ScopeDigest;

/// Table size: a power of two. Each slot holds one key, about 80 bytes.
const SLOTS: usize = 1024;
/// Only bodies of a declared length up to this are buffered to be
/// compared; larger or chunked ones take the full path.
const MAX_BODY: u64 = 64 * 1024;

/// Marks a request that came through an eligible handler's
/// [`ExactBody`](crate::__private::ExactBody), with its digest if it was
/// taken: the engine records its replay.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ExactRequest(pub(crate) Option<RequestDigest>);

/// Answers `request` from the store when it exactly repeats a recorded
/// replay (`Err` holds the replay). Otherwise hands back the body for the
/// handler's extractor, buffered if its digest was taken, and marks the
/// request for the engine.
pub(crate) async fn answer_exact_repeat(
    request: &mut IdempotentRequest,
    endpoint: u64,
    parts: &mut Parts,
    body: Body,
) -> Result<Body, Response> {
    request.exact = Some(ExactRequest(None));
    let (Some(key), ScopeSource::Resolved(Ok(scope))) = (&request.key, &request.scope) else {
        return Ok(body);
    };
    let settings = &request.idempotency.inner;
    let Some(recalled) = settings.exact.recall(scope, key) else {
        return Ok(body);
    };
    if declared_length(parts).is_none_or(|length| length > MAX_BODY) {
        return Ok(body);
    }
    let bytes = match Limited::new(body, usize::try_from(MAX_BODY).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        // The handler's extractor reports the failure as it would have.
        Err(error) => return Ok(failed_body(error)),
    };
    let Some(digest) = RequestDigest::of(settings.exact.keys, endpoint, parts, &bytes).await else {
        return Ok(Body::from(bytes));
    };
    if recalled.request == Some(digest) {
        let record_key = RecordKey::new(*scope, key.clone());
        if let Some(replay) = replay_from_store(settings, &record_key, recalled.fingerprint).await {
            return Err(replay);
        }
    }
    request.exact = Some(ExactRequest(Some(digest)));
    Ok(Body::from(bytes))
}

fn declared_length(parts: &Parts) -> Option<u64> {
    parts
        .headers
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A body that fails as the original did.
fn failed_body(error: axum::BoxError) -> Body {
    let failed = futures_util::stream::once(std::future::ready(Err::<Bytes, _>(error)));
    Body::from_stream(failed)
}

/// A keyed 128-bit hash of everything an eligible handler's fingerprint
/// can depend on: the endpoint, the method, the URI, the path parameters
/// (a nested router's prefix included), the content type and the body.
/// The key is the table's own random one, so no client can aim two
/// different requests at one digest. The record key is left out: a hit
/// only serves the record stored under the request's own key, and only
/// if that record's fingerprint is the one recalled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct RequestDigest(u128);

impl RequestDigest {
    /// The digest of a request to `endpoint` (the attribute's id of it),
    /// or `None` when its path parameters cannot be read (the full path
    /// then decides).
    async fn of(keys: (u64, u64), endpoint: u64, parts: &mut Parts, body: &[u8]) -> Option<Self> {
        let params = RawPathParams::from_request_parts(parts, &()).await.ok()?;
        let mut hasher = Framed(SipHasher13::new_with_keys(keys.0, keys.1));
        hasher.0.write_u64(endpoint);
        hasher.part(parts.method.as_str().as_bytes());
        hasher.part(parts.uri.path().as_bytes());
        hasher.part(parts.uri.query().unwrap_or_default().as_bytes());
        for (name, value) in &params {
            hasher.part(name.as_bytes());
            hasher.part(value.as_bytes());
        }
        let content_type = parts.headers.get(CONTENT_TYPE);
        hasher.part(content_type.map_or(&[], |value| value.as_bytes()));
        hasher.part(body);
        Some(Self(hasher.0.finish128().as_u128()))
    }
}

/// Each part prefixed by its length, so `("ab", "c")` and `("a", "bc")`
/// differ.
struct Framed(SipHasher13);

impl Framed {
    fn part(&mut self, bytes: &[u8]) {
        self.0.write_usize(bytes.len());
        self.0.write(bytes);
    }
}

/// What the table knows of a key.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Recalled {
    /// The exact request whose replay was recorded, once known.
    pub(crate) request: Option<RequestDigest>,
    /// The fingerprint that replay was served under.
    pub(crate) fingerprint: Fingerprint,
}

#[derive(Clone, Copy)]
struct Entry {
    tag: u64,
    recalled: Recalled,
}

/// The table of replayed requests, one per [`Idempotency`](crate::Idempotency).
pub(crate) struct ExactReplays {
    keys: (u64, u64),
    slots: Box<[Mutex<Option<Entry>>]>,
}

impl ExactReplays {
    pub(crate) fn new() -> Self {
        Self {
            // Keyed, so callers cannot aim their keys at one another's slots.
            keys: rand::random(),
            slots: (0..SLOTS).map(|_| Mutex::new(None)).collect(),
        }
    }

    fn tag(&self, scope: &ScopeDigest, key: &IdempotencyKey) -> u64 {
        let mut hasher = SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        hasher.write(scope.as_bytes());
        hasher.write(key.as_str().as_bytes());
        hasher.finish128().h1
    }

    fn slot(&self, tag: u64) -> &Mutex<Option<Entry>> {
        // The low bits of a keyed hash are as good as any.
        #[expect(
            clippy::cast_possible_truncation,
            reason = "masked to the table's size"
        )]
        &self.slots[tag as usize & (SLOTS - 1)]
    }

    /// What is remembered of `key` (with `scope`), if anything.
    pub(crate) fn recall(&self, scope: &ScopeDigest, key: &IdempotencyKey) -> Option<Recalled> {
        let tag = self.tag(scope, key);
        let slot = self
            .slot(tag)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        slot.filter(|entry| entry.tag == tag)
            .map(|entry| entry.recalled)
    }

    /// Records that `key` was replayed under `fingerprint`, for the exact
    /// `request` if its digest is known. The newest key takes the slot.
    pub(crate) fn remember(
        &self,
        key: &RecordKey,
        request: Option<RequestDigest>,
        fingerprint: Fingerprint,
    ) {
        let tag = self.tag(&key.scope, &key.key);
        let entry = Entry {
            tag,
            recalled: Recalled {
                request,
                fingerprint,
            },
        };
        *self
            .slot(tag)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(entry);
    }
}

impl std::fmt::Debug for ExactReplays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExactReplays")
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

/// The stored response for `key`, if the store still holds it completed
/// under `fingerprint`; `None` sends the request down the full path, which
/// also reports any store failure.
async fn replay_from_store(
    settings: &Settings,
    key: &RecordKey,
    fingerprint: Fingerprint,
) -> Option<Response> {
    let found = crate::engine::within(settings.store_timeout, settings.store.get(key)).await;
    match found {
        Ok(Some(Record::Completed(record))) if record.fingerprint == fingerprint => {
            tracing::debug!(
                outcome = "replayed",
                exact = true,
                status = record.response.status.as_u16()
            );
            Some(replay(&record.response))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> RecordKey {
        RecordKey::new(
            ScopeDigest::global(),
            IdempotencyKey::parse(name.as_bytes()).unwrap(),
        )
    }

    fn recall(table: &ExactReplays, key: &RecordKey) -> Option<Recalled> {
        table.recall(&key.scope, &key.key)
    }

    #[test]
    fn a_key_is_unknown_until_a_replay_is_remembered() {
        let table = ExactReplays::new();
        assert!(recall(&table, &key("k1")).is_none());

        let fingerprint = Fingerprint::from_bytes([7; 32]);
        table.remember(&key("k1"), None, fingerprint);

        let recalled = recall(&table, &key("k1")).expect("remembered");
        assert_eq!(recalled.request, None);
        assert_eq!(recalled.fingerprint, fingerprint);
        assert!(recall(&table, &key("k2")).is_none());
    }

    #[test]
    fn the_latest_replay_of_a_key_is_the_one_recalled() {
        let table = ExactReplays::new();
        table.remember(&key("k1"), None, Fingerprint::from_bytes([1; 32]));
        let request = RequestDigest(42);
        table.remember(&key("k1"), Some(request), Fingerprint::from_bytes([2; 32]));

        let recalled = recall(&table, &key("k1")).expect("remembered");
        assert_eq!(recalled.request, Some(request));
        assert_eq!(recalled.fingerprint, Fingerprint::from_bytes([2; 32]));
    }

    #[test]
    fn scopes_keep_equal_keys_apart() {
        let table = ExactReplays::new();
        let global = key("k1");
        let other = RecordKey::new(ScopeDigest::api_key(b"caller-2"), global.key.clone());
        table.remember(&global, None, Fingerprint::from_bytes([1; 32]));

        assert!(recall(&table, &other).is_none());
    }
}
