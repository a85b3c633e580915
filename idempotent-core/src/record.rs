//! What a store keeps for each `(scope, key)`.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};

use crate::digest::{hex, sha256_framed};
use crate::fingerprint::Fingerprint;
use crate::key::IdempotencyKey;
use crate::scope::ScopeDigest;

/// The address of a record: whose key, and the key.
///
/// Its fields are read by stores; it is built with [`RecordKey::new`], so
/// that a later field (marked `#[non_exhaustive]`) is not a breaking change.
#[derive(Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct RecordKey {
    /// Digest of the caller's scope.
    pub scope: ScopeDigest,
    /// The client's idempotency key.
    pub key: IdempotencyKey,
}

impl RecordKey {
    /// Pairs a scope with a key.
    #[must_use]
    pub fn new(scope: ScopeDigest, key: IdempotencyKey) -> Self {
        Self { scope, key }
    }

    /// SHA-256 over scope and key: a fixed-size storage key that reveals
    /// neither (used by stores that address records by one opaque string).
    #[must_use]
    pub fn digest(&self) -> [u8; 32] {
        sha256_framed(&[self.scope.as_bytes(), self.key.as_str().as_bytes()])
    }

    /// A short digest for logs and spans; never the raw key. It is
    /// computed only when formatted, so a span that nobody records (or that
    /// the `log` compatibility layer builds eagerly) costs no hashing.
    #[must_use]
    pub fn log_id(&self) -> LogId<'_> {
        LogId(self)
    }
}

/// [`RecordKey::log_id`]: the first 8 bytes of the record key's digest, in hex.
#[derive(Clone, Copy)]
pub struct LogId<'a>(&'a RecordKey);

impl fmt::Display for LogId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0.digest()[..8]))
    }
}

impl fmt::Debug for LogId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordKey({})", self.log_id())
    }
}

/// Proof of holding a claim. Only the current holder's token may renew,
/// complete or release a record (fencing), so a holder whose lease expired
/// and was taken over cannot overwrite the new holder's result.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseToken(u128);

impl LeaseToken {
    /// A fresh random token.
    #[must_use]
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Rebuilds a token read back from a store.
    #[must_use]
    pub const fn from_u128(value: u128) -> Self {
        Self(value)
    }

    /// The token as an integer, for storage.
    #[must_use]
    pub const fn as_u128(self) -> u128 {
        self.0
    }

    /// The token as 16 big-endian bytes, for storage.
    #[must_use]
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// Rebuilds a token from [`LeaseToken::to_bytes`].
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_be_bytes(bytes))
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseToken({:08x}…)", self.0 >> 96)
    }
}

/// A response as stored for replay.
///
/// A store reads its fields to keep it and builds it back with
/// [`StoredResponse::new`] (or keeps the whole record as
/// [`Completed::encode`] and reads it with [`Completed::decode`], which
/// carries any field a later version adds).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredResponse {
    /// The original status.
    pub status: StatusCode,
    /// Headers kept for replay, in order, repeated names included.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The body; `None` when it was larger than the endpoint's limit and so
    /// was not kept (retries then get a `response-not-stored` problem).
    pub body: Option<Bytes>,
}

impl StoredResponse {
    /// A response read back from a store.
    ///
    /// ```
    /// use idempotent_core::record::StoredResponse;
    /// use http::{HeaderName, HeaderValue, StatusCode};
    ///
    /// let response = StoredResponse::new(
    ///     StatusCode::CREATED,
    ///     vec![(HeaderName::from_static("location"), HeaderValue::from_static("/payments/1"))],
    ///     Some(bytes::Bytes::from_static(b"{}")),
    /// );
    /// assert_eq!(response.size_bytes(), "location".len() + "/payments/1".len() + 2);
    /// ```
    #[must_use]
    pub fn new(
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Option<Bytes>,
    ) -> Self {
        Self {
            status,
            headers,
            body,
        }
    }

    /// Bytes this response occupies in memory, roughly: body plus headers.
    #[must_use]
    pub fn size_bytes(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        headers + self.body.as_ref().map_or(0, Bytes::len)
    }
}

/// A claim that is being worked on. Built with [`InFlight::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct InFlight {
    /// Fingerprint of the request that claimed the key.
    pub fingerprint: Fingerprint,
    /// The holder's token.
    pub lease_token: LeaseToken,
    /// When the lease lapses unless renewed (Unix ms). After that, a new
    /// claim takes the record over.
    pub lease_expires_at: u64,
}

/// A finished request whose response is replayed to retries. Built with
/// [`Completed::new`], or read back with [`Completed::decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Completed {
    /// Fingerprint of the request that produced the response.
    pub fingerprint: Fingerprint,
    /// The response.
    pub response: StoredResponse,
    /// When the record expires (Unix ms); after that the key is new again.
    pub expires_at: u64,
}

impl InFlight {
    /// The claim of the request with `fingerprint`, held by `lease_token`
    /// until `lease_expires_at` (Unix ms).
    #[must_use]
    pub const fn new(
        fingerprint: Fingerprint,
        lease_token: LeaseToken,
        lease_expires_at: u64,
    ) -> Self {
        Self {
            fingerprint,
            lease_token,
            lease_expires_at,
        }
    }
}

impl Completed {
    /// The `response` to the request with `fingerprint`, replayed until
    /// `expires_at` (Unix ms).
    #[must_use]
    pub fn new(fingerprint: Fingerprint, response: StoredResponse, expires_at: u64) -> Self {
        Self {
            fingerprint,
            response,
            expires_at,
        }
    }
}

/// A stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Claimed; the handler is running.
    InFlight(InFlight),
    /// Done; replayed to retries.
    Completed(Arc<Completed>),
}

impl Record {
    /// When the record stops counting (Unix ms): its lease's end while in
    /// flight, its TTL's once completed.
    #[must_use]
    pub fn deadline(&self) -> u64 {
        match self {
            Self::InFlight(held) => held.lease_expires_at,
            Self::Completed(completed) => completed.expires_at,
        }
    }
}

/// What a claim answers when it finds this record live.
impl From<Record> for Claim {
    fn from(record: Record) -> Self {
        match record {
            Record::InFlight(held) => Self::InFlight {
                fingerprint: held.fingerprint,
                lease_expires_at: held.lease_expires_at,
            },
            Record::Completed(completed) => Self::Completed(completed),
        }
    }
}

/// What [`Store::claim`](crate::store::Store::claim) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller now holds the key and must run the request, then
    /// complete or release.
    Acquired(LeaseToken),
    /// Another request holds a live lease on the key. Built with
    /// [`Claim::in_flight`], or from the [`Record`] found.
    #[non_exhaustive]
    InFlight {
        /// Fingerprint of the request holding it.
        fingerprint: Fingerprint,
        /// When its lease lapses (Unix ms).
        lease_expires_at: u64,
    },
    /// The key has a stored response.
    Completed(Arc<Completed>),
}

impl Claim {
    /// Another request, with `fingerprint`, holds the key until
    /// `lease_expires_at` (Unix ms).
    #[must_use]
    pub const fn in_flight(fingerprint: Fingerprint, lease_expires_at: u64) -> Self {
        Self::InFlight {
            fingerprint,
            lease_expires_at,
        }
    }
}

/// The record types are built through their constructors from outside this
/// crate, so that a field added later breaks no store. Struct expressions
/// are refused:
///
/// ```compile_fail,E0639
/// # use idempotent_core::record::StoredResponse;
/// let _ = StoredResponse { status: http::StatusCode::OK, headers: Vec::new(), body: None };
/// ```
///
/// ```compile_fail,E0639
/// # use idempotent_core::{Fingerprint, record::{Completed, StoredResponse}};
/// let response = StoredResponse::new(http::StatusCode::OK, Vec::new(), None);
/// let _ = Completed { fingerprint: Fingerprint::from_bytes([0; 32]), response, expires_at: 0 };
/// ```
///
/// ```compile_fail,E0639
/// # use idempotent_core::{Fingerprint, record::{InFlight, LeaseToken}};
/// let _ = InFlight { fingerprint: Fingerprint::from_bytes([0; 32]), lease_token: LeaseToken::random(), lease_expires_at: 0 };
/// ```
///
/// ```compile_fail,E0639
/// # use idempotent_core::{Fingerprint, record::Claim};
/// let _ = Claim::InFlight { fingerprint: Fingerprint::from_bytes([0; 32]), lease_expires_at: 0 };
/// ```
///
/// ```compile_fail,E0639
/// # use idempotent_core::{IdempotencyKey, record::RecordKey, scope::ScopeDigest};
/// let _ = RecordKey { scope: ScopeDigest::global(), key: IdempotencyKey::parse(b"k").unwrap() };
/// ```
#[cfg(doctest)]
pub struct RecordTypesAreNonExhaustive;

mod codec;
#[cfg(test)]
pub(crate) mod strategies;
pub use codec::CodecError;
pub(crate) use codec::{MAX_HEADERS as MAX_STORED_HEADERS, MAX_U32_PREFIXED as MAX_STORED_BODY};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_id_is_a_short_digest_that_hides_the_key() {
        let key = IdempotencyKey::parse(b"order-secret-42").unwrap();
        let record = RecordKey::new(ScopeDigest::global(), key);
        let id = record.log_id().to_string();
        assert_eq!(id.len(), 16);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!format!("{record:?}").contains("secret"));
        assert_eq!(id, hex(&record.digest()[..8]));
    }
}
