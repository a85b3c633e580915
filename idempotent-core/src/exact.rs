//! Exact replays: a retry that repeats, byte for byte, a request already
//! replayed is answered before its body is parsed and fingerprinted.
//!
//! An `#[idempotent]` handler's fingerprint hashes its typed arguments, so
//! every request pays the body extractor's parse and the canonical
//! encoding before the engine can tell a replay from a first execution.
//! When every fingerprinted argument is a function of the request's URI,
//! path parameters and body (`Json`, `Form`, `Bytes`, `String`, `Path`,
//! `Query`), equal bytes mean an equal fingerprint (the fingerprint writes
//! a hash set's elements sorted, so that two parses of one body encode
//! alike), so an exact repeat of a replayed request needs neither. The
//! attribute then extracts the body through
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

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use axum::RequestExt;
use axum::body::Body;
use axum::extract::{FromRequestParts, RawPathParams, Request};
use axum::response::Response;
use bytes::Bytes;
use hashbrown::DefaultHashBuilder;
use http::header::CONTENT_TYPE;
use http::request::Parts;
use http::uri::PathAndQuery;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use siphasher::sip128::{Hasher128, SipHasher13};

use crate::fingerprint::Fingerprint;
use crate::idempotency::Settings;
use crate::key::IdempotencyKey;
use crate::record::{Record, RecordKey};
use crate::replay::replay;
use crate::request::{IdempotentRequest, ScopeSource};
use crate::scope::ScopeDigest;
use crate::store::StoreError;
use crate::whole_body;

/// Table size: sets of two slots, a power of two of them. Each slot holds
/// one key in 80 bytes, so a table takes 96 KiB. Two ways per set keep
/// hot keys that hash alike from evicting one another.
const SETS: usize = 512;
/// Only bodies of a declared length up to this are buffered to be
/// compared; larger or chunked ones take the full path.
const MAX_BODY: u64 = 64 * 1024;

/// Marks a request that came through an eligible handler's
/// [`ExactBody`](crate::__private::ExactBody), with its digest if it was
/// taken: the engine records its replay.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ExactRequest(pub(crate) Option<RequestDigest>);

/// A key the table remembers, for a request that may exactly repeat its
/// replay.
pub(crate) struct Hit {
    key: RecordKey,
    recalled: Recalled,
}

/// Marks `idempotent` for the engine, and returns what the table
/// remembers of its key if `request` may be an exact repeat worth
/// checking with [`answer_exact_repeat`]. Synchronous: a first execution
/// pays only this lookup.
pub(crate) fn recall(idempotent: &mut IdempotentRequest, request: &Request) -> Option<Hit> {
    idempotent.exact = Some(ExactRequest(None));
    let (Some(key), ScopeSource::Resolved(Ok(scope))) = (&idempotent.key, &idempotent.scope) else {
        return None;
    };
    let recalled = idempotent.idempotency.inner.exact.recall(scope, key)?;
    let length = whole_body::declared_length(request.headers())?;
    (length <= MAX_BODY).then(|| Hit {
        key: RecordKey::new(*scope, key.clone()),
        recalled,
    })
}

/// Answers `request` from the store when it exactly repeats the recalled
/// replay (`Err` holds the replay). Otherwise hands the request back for
/// the handler's extractor, its body buffered, and gives the engine its
/// digest.
///
/// Not an `async fn`: the request is split before the future starts, so
/// the future holds its parts once rather than beside the whole request
/// (it lives inside every eligible handler's future).
pub(crate) fn answer_exact_repeat(
    idempotent: &mut IdempotentRequest,
    hit: Hit,
    endpoint: u64,
    request: Request,
) -> impl Future<Output = Result<Request, Response>> + Send + '_ {
    let Hit { key, recalled } = hit;
    // Read under the route's `DefaultBodyLimit`, as the extractor would.
    let (mut parts, body) = request.with_limited_body().into_parts();
    async move {
        let settings = &idempotent.idempotency.inner;
        let bytes = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            // The handler's extractor reports the failure as it would have.
            Err(error) => return Ok(Request::from_parts(parts, failed_body(error.into_inner()))),
        };
        let digest = RequestDigest::of(settings.exact.keys, endpoint, &mut parts, &bytes).await;
        if let Some(digest) = digest
            && recalled.request == Some(digest)
            && let Some(replay) = replay_from_store(settings, &key, recalled.fingerprint).await
        {
            return Err(replay);
        }
        // Rebuilt only for the handler's extractor: an answered repeat
        // drops the request without boxing its body again.
        idempotent.exact = Some(ExactRequest(digest));
        Ok(Request::from_parts(parts, Body::from(bytes)))
    }
}

/// A body that fails as the original did. axum's extractors look through
/// two layers of axum's error type for the cause (a body over the limit is
/// 413, any other failure 400): `Body::new` adds one and the extractor's
/// own limit the other, so the cause goes in unwrapped, and through
/// `http_body_util`'s stream body, which adds none.
fn failed_body(error: axum::BoxError) -> Body {
    let failed = futures_util::stream::once(std::future::ready(Err::<Frame<Bytes>, _>(error)));
    Body::new(StreamBody::new(failed))
}

/// A keyed 128-bit hash of everything an eligible handler's fingerprint
/// can depend on: the endpoint, the method, the path and query, the path
/// parameters (a nested router's prefix's included), the content type and
/// the body.
/// The key is the table's own random one, so no client can aim two
/// different requests at one digest. The record key is left out: a hit
/// only serves the record stored under the request's own key, and only
/// if that record's fingerprint is the one recalled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct RequestDigest(u128);

impl RequestDigest {
    /// The digest of a request to `endpoint` (the attribute's id of it),
    /// or `None` outside a router, where the path parameters are not known
    /// (the full path then decides).
    ///
    /// Inside a nested router the URI has lost the router's prefix, but a
    /// prefix's parameters are among the path parameters, and a static
    /// prefix changes nothing a fingerprint sees: the endpoint's identity
    /// already tells handlers apart, and the body is read under the
    /// route's own limit.
    async fn of(keys: (u64, u64), endpoint: u64, parts: &mut Parts, body: &[u8]) -> Option<Self> {
        let params = RawPathParams::from_request_parts(parts, &()).await.ok()?;
        let path_and_query = parts.uri.path_and_query().map_or("", PathAndQuery::as_str);
        let mut hasher = Framed(SipHasher13::new_with_keys(keys.0, keys.1));
        hasher.0.write_u64(endpoint);
        hasher.part(parts.method.as_str().as_bytes());
        hasher.part(path_and_query.as_bytes());
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

/// Two slots; a new key replaces the one written longer ago.
#[derive(Default)]
struct Set {
    slots: [Option<Entry>; 2],
    /// The slot written last.
    newest: usize,
}

impl Set {
    fn find(&self, tag: u64) -> Option<usize> {
        self.slots
            .iter()
            .position(|slot| slot.is_some_and(|entry| entry.tag == tag))
    }

    fn get(&self, tag: u64) -> Option<Recalled> {
        self.slots[self.find(tag)?].map(|entry| entry.recalled)
    }

    /// Writes `entry`, and returns the slot it went to.
    fn put(&mut self, entry: Entry) -> usize {
        let slot = self
            .find(entry.tag)
            .or_else(|| self.slots.iter().position(Option::is_none))
            .unwrap_or(1 - self.newest);
        self.slots[slot] = Some(entry);
        self.newest = slot;
        slot
    }
}

/// The table of replayed requests, one per [`Idempotency`](crate::Idempotency).
pub(crate) struct ExactReplays {
    /// Finds a key's slot. Every request looks its key up, so a fast hash;
    /// two keys that share a slot and tag at most compare digests, and a
    /// hit still serves only the request's own record.
    slot_hasher: DefaultHashBuilder,
    /// The digests' key.
    keys: (u64, u64),
    sets: Box<[Mutex<Set>]>,
    /// Each set's tags, also readable without its lock: a key that is in
    /// neither (every first execution) is turned away with two loads
    /// from an 8 KiB array, without locking or reading its set.
    tags: Box<[[AtomicU64; 2]]>,
}

impl ExactReplays {
    pub(crate) fn new() -> Self {
        Self {
            slot_hasher: DefaultHashBuilder::default(),
            keys: rand::random(),
            sets: (0..SETS).map(|_| Mutex::default()).collect(),
            tags: (0..SETS).map(|_| Default::default()).collect(),
        }
    }

    fn tag(&self, scope: &ScopeDigest, key: &IdempotencyKey) -> u64 {
        // The scope is a SHA-256 already: eight of its bytes tell scopes apart.
        let (scope, _) = scope
            .as_bytes()
            .split_first_chunk::<8>()
            .unwrap_or((&[0; 8], &[]));
        self.slot_hasher.hash_one(key.as_str()) ^ u64::from_le_bytes(*scope)
    }

    fn index(tag: u64) -> usize {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "masked to the table's size"
        )]
        let index = tag as usize & (SETS - 1);
        index
    }

    fn set(&self, tag: u64) -> MutexGuard<'_, Set> {
        let set = &self.sets[Self::index(tag)];
        set.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What is remembered of `key` (with `scope`), if anything.
    pub(crate) fn recall(&self, scope: &ScopeDigest, key: &IdempotencyKey) -> Option<Recalled> {
        let tag = self.tag(scope, key);
        // A stale read only sends a request down the full path, or to
        // the set's lock to look again.
        let tags = &self.tags[Self::index(tag)];
        if tags
            .iter()
            .all(|known| known.load(Ordering::Relaxed) != tag)
        {
            return None;
        }
        self.set(tag).get(tag)
    }

    /// Records that `key` was replayed under `fingerprint`, for the exact
    /// `request` if its digest is known.
    pub(crate) fn remember(
        &self,
        key: &RecordKey,
        request: Option<RequestDigest>,
        fingerprint: Fingerprint,
    ) {
        let tag = self.tag(&key.scope, &key.key);
        let mut set = self.set(tag);
        // A replay whose digest was not taken (say, a chunked body) keeps
        // the digest already known for the same record.
        let known = set
            .get(tag)
            .filter(|known| known.fingerprint == fingerprint)
            .and_then(|known| known.request);
        let slot = set.put(Entry {
            tag,
            recalled: Recalled {
                request: request.or(known),
                fingerprint,
            },
        });
        self.tags[Self::index(tag)][slot].store(tag, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for ExactReplays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExactReplays")
            .field("sets", &self.sets.len())
            .finish_non_exhaustive()
    }
}

/// The stored response for `key`, if the store still holds it completed
/// under `fingerprint`; `None` sends the request down the full path.
/// A read that timed out is answered 503 at once, as the full path's
/// claim would most likely be after a second wait, unless the endpoints
/// fail open; any other failure (a connection that died with a restart,
/// a record the read cannot decode) leaves the decision to the claim.
async fn replay_from_store(
    settings: &Settings,
    key: &RecordKey,
    fingerprint: Fingerprint,
) -> Option<Response> {
    let found = crate::engine::within(settings.store_timeout, settings.store.get(key)).await;
    match found {
        Ok(Some(Record::Completed(record))) if record.fingerprint == fingerprint => {
            let response = match replay(&record.response) {
                Ok(response) => response,
                Err(problem) => return Some(crate::engine::unreplayable(problem, None, key)),
            };
            // Outside the engine's `idempotent` span, so the key goes here.
            tracing::debug!(
                outcome = "replayed",
                exact = true,
                key = %key.log_id(),
                status = record.response.status.as_u16()
            );
            Some(response)
        }
        Err(error @ StoreError::Timeout(_)) if !settings.fail_open => {
            let _key =
                tracing::debug_span!("idempotent", key = %key.log_id(), exact = true).entered();
            Some(crate::engine::refused_for(&error, None, key))
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

    fn entry(tag: u64) -> Entry {
        Entry {
            tag,
            recalled: Recalled {
                request: None,
                fingerprint: Fingerprint::from_bytes([0; 32]),
            },
        }
    }

    #[test]
    fn a_set_keeps_two_keys_and_replaces_the_one_written_longer_ago() {
        let mut set = Set::default();
        set.put(entry(1));
        set.put(entry(2));
        assert!(set.find(1).is_some() && set.find(2).is_some());

        set.put(entry(1)); // rewritten: now the newer of the two
        set.put(entry(3));

        assert!(set.find(1).is_some());
        assert!(set.find(2).is_none());
        assert!(set.find(3).is_some());
    }

    #[test]
    fn a_replay_without_a_digest_keeps_the_one_known_for_that_record() {
        let table = ExactReplays::new();
        let fingerprint = Fingerprint::from_bytes([1; 32]);
        table.remember(&key("k1"), Some(RequestDigest(42)), fingerprint);

        table.remember(&key("k1"), None, fingerprint);
        assert_eq!(
            recall(&table, &key("k1")).map(|recalled| recalled.request),
            Some(Some(RequestDigest(42)))
        );

        // A record with another fingerprint is another request.
        table.remember(&key("k1"), None, Fingerprint::from_bytes([2; 32]));
        assert_eq!(
            recall(&table, &key("k1")).map(|recalled| recalled.request),
            Some(None)
        );
    }

    #[test]
    fn the_lock_free_tags_never_hide_a_remembered_key() {
        let table = ExactReplays::new();
        let fingerprint = Fingerprint::from_bytes([1; 32]);
        // Four keys a set on average: most sets replace a way.
        let keys: Vec<_> = (0..4 * SETS).map(|i| key(&format!("k{i}"))).collect();
        for key in &keys {
            table.remember(key, None, fingerprint);
        }
        let mut kept = 0;
        for key in &keys {
            let tag = table.tag(&key.scope, &key.key);
            let in_set = table.set(tag).get(tag).is_some();
            assert_eq!(recall(&table, key).is_some(), in_set);
            kept += usize::from(in_set);
        }
        assert!(kept > SETS, "{kept} keys kept of {}", keys.len());
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
