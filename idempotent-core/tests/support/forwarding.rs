//! Test doubles of the `Store` trait that change one or two calls of a
//! real store: a double implements [`Hooks`] for the calls it changes, and
//! [`Forwarding`] passes every other call on to the store inside it, so
//! that what the double does differently is all its code says.
#![allow(dead_code, unreachable_pub)] // each test file uses a different part

use std::time::Duration;

use idempotent_core::Fingerprint;
use idempotent_core::clock::SharedClock;
use idempotent_core::record::{Claim, LeaseToken, Record, RecordKey, StoredResponse};
use idempotent_core::store::{Store, StoreError};

/// What a test double changes about the store it wraps. Each hook stands
/// for the [`Store`] call of its name and, unless the double overrides
/// it, passes the call on to [`inner`](Self::inner) unchanged.
pub trait Hooks: Send + Sync + 'static {
    /// The store that answers the calls the double leaves alone.
    type Inner: Store;

    fn inner(&self) -> &Self::Inner;

    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        self.inner().claim(key, fingerprint, lease)
    }

    fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner().renew(key, token, lease)
    }

    fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner().complete(key, token, response, ttl)
    }

    fn release(
        &self,
        key: &RecordKey,
        token: LeaseToken,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.inner().release(key, token)
    }

    fn get(
        &self,
        key: &RecordKey,
    ) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send {
        self.inner().get(key)
    }
}

/// The [`Store`] whose calls go through the hooks of `H`; the rest of the
/// trait (settling, the deadline clock) is the inner store's.
#[derive(Clone, Default)]
pub struct Forwarding<H>(pub H);

impl<H> std::ops::Deref for Forwarding<H> {
    type Target = H;

    fn deref(&self) -> &H {
        &self.0
    }
}

impl<H: Hooks> Store for Forwarding<H> {
    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        self.0.claim(key, fingerprint, lease)
    }

    fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.0.renew(key, token, lease)
    }

    fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.0.complete(key, token, response, ttl)
    }

    fn release(
        &self,
        key: &RecordKey,
        token: LeaseToken,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.0.release(key, token)
    }

    fn get(
        &self,
        key: &RecordKey,
    ) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send {
        self.0.get(key)
    }

    fn settle(&self) -> impl Future<Output = ()> + Send {
        self.0.inner().settle()
    }

    fn deadline_clock(&self) -> Option<SharedClock> {
        self.0.inner().deadline_clock()
    }
}
