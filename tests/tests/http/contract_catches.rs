//! The store contract fails stores that break it: each fault below is one
//! a real backend could have, and the check named beside it catches it.

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
use idempotent_core::store::{Store, StoreError};
use idempotent_core::testing::contract;

/// What a [`Faulty`] store gets wrong.
#[derive(Clone, Copy, Default)]
struct Faults {
    /// Takes over a lapsed lease in two steps, read then write, as an
    /// `UPDATE` without its `WHERE expires_at <= now` guard would.
    racy_takeover: bool,
    /// Completes in two steps: checks the token, then writes.
    racy_complete: bool,
    /// Compares keys ignoring case, as a case-insensitive column would.
    fold_case: bool,
    /// Makes keys safe for a path or a pattern by replacing what is not
    /// alphanumeric with `_`, as a hand-rolled escaping might.
    replace_specials: bool,
    /// Cuts bodies at this many bytes, as a 64 KiB `BLOB` would.
    truncate_body: Option<usize>,
    /// Keeps durations in whole seconds.
    whole_seconds: bool,
    /// Moves the deadline before comparing the renewing token, a
    /// completed record's too.
    stale_renew_extends: bool,
    /// Sets the deadline a renewal brings, even one earlier than a later
    /// renewal's, as `SET expires_at = $new` would.
    late_renew_moves_back: bool,
    /// `get` shows a lapsed lease as if it were live.
    get_ignores_lease: bool,
    /// `get` finds a key's record in whichever scope sorts first, as a
    /// query that forgot `scope = $1` would.
    get_ignores_scope: bool,
    /// Takes a lease for lost as soon as it lapsed, taken over or not, as
    /// a fenced write that also asks `expires_at > now` would.
    lapsed_lease_lost: bool,
    /// Keeps a completed record until the lease's deadline when that is
    /// later than the TTL's, as `expires_at = GREATEST(expires_at, $ttl)`
    /// would.
    completion_keeps_the_lease: bool,
    /// Completes by an upsert: a token that holds nothing stores its
    /// response under a key nobody holds.
    complete_inserts: bool,
}

/// A map of records with one fault or another.
struct Faulty {
    records: Mutex<HashMap<(ScopeDigest, String), Record>>,
    clock: ManualClock,
    faults: Faults,
}

impl Faulty {
    fn new(clock: ManualClock, faults: Faults) -> Self {
        Self {
            records: Mutex::default(),
            clock,
            faults,
        }
    }

    fn records(&self) -> MutexGuard<'_, HashMap<(ScopeDigest, String), Record>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn id(&self, key: &RecordKey) -> (ScopeDigest, String) {
        let key_text = key.key.as_str();
        let key_text = if self.faults.fold_case {
            key_text.to_ascii_lowercase()
        } else if self.faults.replace_specials {
            key_text
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect()
        } else {
            key_text.to_owned()
        };
        (key.scope, key_text)
    }

    fn deadline(&self, after: Duration) -> u64 {
        let millis = if self.faults.whole_seconds {
            after.as_secs() * 1000
        } else {
            u64::try_from(after.as_millis()).unwrap_or(u64::MAX)
        };
        self.clock.now_millis().saturating_add(millis)
    }

    fn held(&self, fingerprint: Fingerprint, lease: Duration) -> (Record, LeaseToken) {
        let token = LeaseToken::random();
        let held = InFlight::new(fingerprint, token, self.deadline(lease));
        (Record::InFlight(held), token)
    }

    fn holds(&self, id: &(ScopeDigest, String), token: LeaseToken) -> Option<Fingerprint> {
        self.held_by(&self.records(), id, token)
    }

    /// The fingerprint of the claim `token` holds on `id` in `records`.
    fn held_by(
        &self,
        records: &HashMap<(ScopeDigest, String), Record>,
        id: &(ScopeDigest, String),
        token: LeaseToken,
    ) -> Option<Fingerprint> {
        match records.get(id) {
            Some(Record::InFlight(held)) if held.lease_token == token => {
                let lapsed = held.lease_expires_at <= self.clock.now_millis();
                let lost = lapsed && self.faults.lapsed_lease_lost;
                (!lost).then_some(held.fingerprint)
            }
            _ => None,
        }
    }
}

impl Store for Faulty {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let id = self.id(key);
        {
            let mut records = self.records();
            match records.get(&id) {
                Some(live) if live.deadline() > self.clock.now_millis() => {
                    return Ok(live.clone().into());
                }
                Some(_) if self.faults.racy_takeover => {}
                _ => {
                    let (held, token) = self.held(fingerprint, lease);
                    records.insert(id, held);
                    return Ok(Claim::Acquired(token));
                }
            }
        }
        // The second statement, which no longer checks the deadline.
        tokio::task::yield_now().await;
        let (held, token) = self.held(fingerprint, lease);
        self.records().insert(id, held);
        Ok(Claim::Acquired(token))
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let until = self.deadline(lease);
        let id = self.id(key);
        let mut records = self.records();
        let holds = self.held_by(&records, &id, token).is_some();
        match records.get_mut(&id) {
            Some(Record::InFlight(held)) if holds => {
                held.lease_expires_at = if self.faults.late_renew_moves_back {
                    until
                } else {
                    held.lease_expires_at.max(until)
                };
                Ok(())
            }
            Some(Record::InFlight(held)) if self.faults.stale_renew_extends => {
                held.lease_expires_at = until;
                Err(StoreError::LeaseLost)
            }
            Some(Record::Completed(record)) if self.faults.stale_renew_extends => {
                Arc::make_mut(record).expires_at = until;
                Err(StoreError::LeaseLost)
            }
            _ => Err(StoreError::LeaseLost),
        }
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        mut response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let id = self.id(key);
        if let (Some(limit), Some(body)) = (self.faults.truncate_body, response.body.as_mut()) {
            *body = body.slice(..body.len().min(limit));
        }
        let free = !self.records().contains_key(&id);
        let mut fingerprint = match self.holds(&id, token) {
            Some(fingerprint) => fingerprint,
            // Whose request it was, an upsert cannot tell.
            None if free && self.faults.complete_inserts => Fingerprint::from_bytes([0; 32]),
            None => return Err(StoreError::LeaseLost),
        };
        if self.faults.racy_complete {
            // Checked, then written in a second step.
            tokio::task::yield_now().await;
        }
        let mut expires_at = self.deadline(ttl);
        let mut records = self.records();
        if !self.faults.racy_complete && !free {
            // Checked again under the lock the write takes: one step.
            fingerprint = self
                .held_by(&records, &id, token)
                .ok_or(StoreError::LeaseLost)?;
        }
        if let Some(Record::InFlight(held)) = records.get(&id)
            && self.faults.completion_keeps_the_lease
        {
            expires_at = expires_at.max(held.lease_expires_at);
        }
        let completed = Completed::new(fingerprint, response, expires_at);
        records.insert(id, Record::Completed(Arc::new(completed)));
        Ok(())
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        let id = self.id(key);
        let mut records = self.records();
        self.held_by(&records, &id, token)
            .ok_or(StoreError::LeaseLost)?;
        records.remove(&id);
        Ok(())
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let now = self.clock.now_millis();
        let shown = |record: &&Record| {
            record.deadline() > now
                || (self.faults.get_ignores_lease && matches!(record, Record::InFlight(_)))
        };
        let records = self.records();
        if self.faults.get_ignores_scope {
            let (_, key_text) = self.id(key);
            let found = records
                .iter()
                .filter(|((_, text), record)| *text == key_text && shown(record))
                .min_by_key(|((scope, _), _)| *scope)
                .map(|(_, record)| record.clone());
            return Ok(found);
        }
        Ok(records.get(&self.id(key)).filter(shown).cloned())
    }
}

/// Runs `check` on a fresh faulty store; whether it panicked.
async fn fails<C, Fut>(faults: Faults, check: C) -> bool
where
    C: FnOnce(Arc<Faulty>, ManualClock) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let clock = ManualClock::starting_now();
    let store = Arc::new(Faulty::new(clock.clone(), faults));
    tokio::spawn(check(store, clock))
        .await
        .is_err_and(|error| error.is_panic())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_without_any_fault_passes() {
    contract::run_all(|clock| async move { Faulty::new(clock, Faults::default()) }).await;
}

/// One test per fault: a store with it must fail each check named.
macro_rules! caught {
    ($($test:ident: $fault:ident = $value:expr => $($check:ident),+;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $test() {
            let faults = Faults {
                $fault: $value,
                ..Faults::default()
            };
            $(assert!(
                fails(faults, contract::$check).await,
                concat!("contract::", stringify!($check), " let the fault pass")
            );)+
        }
    )*};
}

caught! {
    a_racy_takeover_fails_takeover_race: racy_takeover = true => takeover_race;
    a_racy_completion_fails_stale_completion_race: racy_complete = true => stale_completion_race;
    case_folded_keys_fail_keys_are_case_sensitive: fold_case = true => keys_are_case_sensitive;
    keys_escaped_into_one_fail_keys_with_any_printable_character:
        replace_specials = true => keys_with_any_printable_character;
    a_truncated_body_fails_binary_bodies: truncate_body = Some(64 * 1024) => binary_bodies;
    durations_in_whole_seconds_fail_ttl_expiry_and_lease_takeover:
        whole_seconds = true => ttl_expiry, lease_takeover;
    a_stale_renewal_that_moves_the_deadline_fails_fencing_and_completion_ends_the_hold:
        stale_renew_extends = true => fencing, completion_ends_the_hold;
    a_late_renewal_that_moves_the_deadline_back_fails_late_renewal:
        late_renew_moves_back = true => late_renewal;
    a_lapsed_lease_shown_by_get_fails_lease_takeover: get_ignores_lease = true => lease_takeover;
    a_get_that_ignores_the_scope_fails_scopes_are_separate:
        get_ignores_scope = true => scopes_are_separate;
    a_lapsed_lease_taken_for_lost_fails_lapsed_lease_is_still_held:
        lapsed_lease_lost = true => lapsed_lease_is_still_held;
    a_completion_kept_for_the_lease_fails_ttl_shorter_than_the_lease:
        completion_keeps_the_lease = true => ttl_shorter_than_the_lease;
    a_completion_that_inserts_fails_fencing_outlasts_the_new_holder:
        complete_inserts = true => fencing_outlasts_the_new_holder, unknown_records_are_not_held;
}
