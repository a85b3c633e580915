//! The store contract fails a store that is atomic where the older checks
//! look, but takes two steps where they did not: replacing an expired
//! record, or releasing a key. Either lets a payment run twice.
#![cfg(feature = "test-util")]

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use idempotent_core::clock::{Clock, ManualClock};
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::record::{
    Claim, Completed, InFlight, LeaseToken, Record, RecordKey, StoredResponse,
};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{MemoryStore, Store, StoreError};
use idempotent_core::testing::contract;

/// Where a [`TwoStep`] store takes two steps instead of one.
#[derive(Clone, Copy, Default)]
struct TwoSteps {
    /// Reads an expired completed record, then writes the new claim
    /// without checking again, as a `SELECT` then `UPDATE` would.
    replace_expired: bool,
    /// Checks the token, then deletes the record without checking again,
    /// as a `GET` then `DEL` would.
    release: bool,
}

type Records = HashMap<(ScopeDigest, String), Record>;

/// A map of records, atomic except where [`TwoSteps`] says.
struct TwoStep {
    records: Mutex<Records>,
    clock: ManualClock,
    two_steps: TwoSteps,
}

impl TwoStep {
    fn new(clock: ManualClock, two_steps: TwoSteps) -> Self {
        Self {
            records: Mutex::default(),
            clock,
            two_steps,
        }
    }

    fn records(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn id(key: &RecordKey) -> (ScopeDigest, String) {
        (key.scope, key.key.as_str().to_owned())
    }

    fn deadline(&self, after: Duration) -> u64 {
        let after = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        self.clock.now_millis().saturating_add(after)
    }

    fn live(&self, record: &Record) -> bool {
        record.deadline() > self.clock.now_millis()
    }

    fn holds(&self, key: &RecordKey, token: LeaseToken) -> bool {
        let records = self.records();
        matches!(records.get(&Self::id(key)), Some(Record::InFlight(held)) if held.lease_token == token)
    }

    /// Whether `token` still holds `key` on a lease that has lapsed: one
    /// that another claim may take over.
    fn holds_lapsed(&self, key: &RecordKey, token: LeaseToken) -> bool {
        let records = self.records();
        matches!(
            records.get(&Self::id(key)),
            Some(record @ Record::InFlight(held)) if held.lease_token == token && !self.live(record)
        )
    }

    /// Inserts a claim for `fingerprint` unless a live record is there.
    fn claim_now(&self, key: &RecordKey, fingerprint: Fingerprint, lease: Duration) -> Claim {
        let mut records = self.records();
        if let Some(live) = records.get(&Self::id(key)).filter(|r| self.live(r)) {
            return live.clone().into();
        }
        self.insert_claim(&mut records, key, fingerprint, lease)
    }

    fn insert_claim(
        &self,
        records: &mut Records,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Claim {
        let token = LeaseToken::random();
        let held = InFlight::new(fingerprint, token, self.deadline(lease));
        records.insert(Self::id(key), Record::InFlight(held));
        Claim::Acquired(token)
    }
}

impl Store for TwoStep {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let expired = matches!(
            self.records().get(&Self::id(key)),
            Some(record @ Record::Completed(_)) if !self.live(record)
        );
        if !(expired && self.two_steps.replace_expired) {
            return Ok(self.claim_now(key, fingerprint, lease));
        }
        // The second statement, which no longer checks the deadline.
        tokio::task::yield_now().await;
        Ok(self.insert_claim(&mut self.records(), key, fingerprint, lease))
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let until = self.deadline(lease);
        match self.records().get_mut(&Self::id(key)) {
            Some(Record::InFlight(held)) if held.lease_token == token => {
                held.lease_expires_at = held.lease_expires_at.max(until);
                Ok(())
            }
            _ => Err(StoreError::LeaseLost),
        }
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut records = self.records();
        let id = Self::id(key);
        let fingerprint = match records.get(&id) {
            Some(Record::InFlight(held)) if held.lease_token == token => held.fingerprint,
            _ => return Err(StoreError::LeaseLost),
        };
        let completed = Completed::new(fingerprint, response, self.deadline(ttl));
        records.insert(id, Record::Completed(Arc::new(completed)));
        Ok(())
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        if self.two_steps.release {
            if !self.holds(key, token) {
                return Err(StoreError::LeaseLost);
            }
            // The second statement, which deletes whoever holds the key
            // now. It comes once a racing claim has taken the key over (or
            // a while later): the interleaving the contract must catch, at
            // every round the check comes first, however busy the cores.
            // (After a mere yield, the delete won every round on one.)
            for _ in 0..200 {
                if !self.holds_lapsed(key, token) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            self.records().remove(&Self::id(key));
            return Ok(());
        }
        let mut records = self.records();
        match records.get(&Self::id(key)) {
            Some(Record::InFlight(held)) if held.lease_token == token => {
                records.remove(&Self::id(key));
                Ok(())
            }
            _ => Err(StoreError::LeaseLost),
        }
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let records = self.records();
        Ok(records
            .get(&Self::id(key))
            .filter(|r| self.live(r))
            .cloned())
    }
}

/// The message `run` panicked with, if it did.
async fn panic_message(run: impl Future<Output = ()> + Send + 'static) -> Option<String> {
    let error = tokio::spawn(run).await.err()?;
    let payload = error.try_into_panic().ok()?;
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .or_else(|| Some(String::from("a panic without a message")))
}

/// What the whole contract says of a [`TwoStep`] store, if it fails it.
async fn contract_failure(two_steps: TwoSteps) -> Option<String> {
    panic_message(contract::run_all(move |clock| async move {
        TwoStep::new(clock, two_steps)
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_takes_one_step_everywhere_passes() {
    assert_eq!(contract_failure(TwoSteps::default()).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replacing_an_expired_record_in_two_steps_fails_the_contract() {
    let two_steps = TwoSteps {
        replace_expired: true,
        ..TwoSteps::default()
    };
    let failure = contract_failure(two_steps).await;
    let failure = failure.expect("a store that lets every retry after the TTL run passed");
    assert!(
        failure.contains("expired_record_race"),
        "failed another check: {failure}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn releasing_in_two_steps_fails_the_contract() {
    let two_steps = TwoSteps {
        release: true,
        ..TwoSteps::default()
    };
    let failure = contract_failure(two_steps).await;
    let failure =
        failure.expect("a store whose stale release deletes the next holder's claim passed");
    assert!(
        failure.contains("stale_release_race"),
        "failed another check: {failure}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_that_reads_the_system_clock_is_told_which_clock_to_read() {
    let on_the_system_clock = contract::run_all(|_clock| async { MemoryStore::new() });
    let failure = panic_message(on_the_system_clock).await;
    let failure = failure.expect("a store that ignores the clock it was given passed");
    assert!(
        failure.contains("does the store read its time from that clock"),
        "the failure does not name the clock: {failure}"
    );
}

/// On one thread, the task a barrier lets through last runs on at once:
/// there the racing claim always came first, and a store that releases in
/// two steps passed the stale release race round after round. The check
/// lets the release start first in every other round.
#[tokio::test(flavor = "current_thread")]
async fn releasing_in_two_steps_fails_the_stale_release_race_on_one_thread() {
    let clock = ManualClock::starting_now();
    let two_steps = TwoSteps {
        release: true,
        ..TwoSteps::default()
    };
    let store = Arc::new(TwoStep::new(clock.clone(), two_steps));
    let failure = panic_message(contract::stale_release_race(store, clock)).await;
    let failure =
        failure.expect("a store whose stale release deletes the next holder's claim passed");
    assert!(
        failure.contains("stale_release_race"),
        "failed another check: {failure}"
    );
}
