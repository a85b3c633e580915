//! The contract every [`Store`] passes.
//!
//! Run it against your own store from a test, in a multi-threaded runtime
//! (`#[tokio::test(flavor = "multi_thread")]`) so that the claim race
//! really races; each check builds a fresh store from `make`, driven by a
//! [`ManualClock`] the check moves:
//!
//! ```
//! use idempotent_core::store::MemoryStore;
//! use idempotent_core::testing::contract;
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 4)]
//! # async fn main() {
//! contract::run_all(|clock| async move { MemoryStore::builder().clock(clock).build() }).await;
//! # }
//! ```
//!
//! Every check uses keys under a fresh random scope, so stores built by
//! `make` may share one database, table or key prefix, and the suite may
//! run against a store that holds other data. A failed check panics with
//! the check's name and what it saw. The checks can also be called one by
//! one; each takes the store and the clock it was built with.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::clock::{Clock, ManualClock};
use crate::fingerprint::Fingerprint;
use crate::key::IdempotencyKey;
use crate::record::{Claim, Completed, LeaseToken, Record, RecordKey, StoredResponse};
use crate::scope::ScopeDigest;
use crate::store::{Store, StoreError};

// Not whole seconds, so a store that keeps durations in seconds fails.
const LEASE: Duration = Duration::from_millis(10_250);
const TTL: Duration = Duration::from_millis(60_500);
/// A TTL shorter than [`LEASE`], and no shorter than the engine's
/// shortest (a second).
const SHORT_TTL: Duration = Duration::from_millis(1_250);
const RACERS: usize = 32;
const MANY: usize = 1000;
/// Printable ASCII that a bare-token key may contain.
const KEY_CHARS: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~!#$%&'*+^`|:/";

/// Runs every check, each on a fresh store from `make`.
///
/// The stores must take their time from the clock they are given.
/// Call it from a multi-threaded runtime so the claim race really races.
///
/// # Panics
/// When the store breaks the contract, naming the check.
pub async fn run_all<S, F, Fut>(mut make: F)
where
    S: Store,
    F: FnMut(ManualClock) -> Fut,
    Fut: Future<Output = S>,
{
    run_all_with_own_clock(|| {
        let clock = ManualClock::starting_now();
        let store = make(clock.clone());
        async move { (store.await, clock) }
    })
    .await;
}

/// Runs every check on stores that come with their own clock, such as
/// [`MockStore`](super::MockStore): `make` returns a fresh store and the
/// clock it reads.
///
/// # Panics
/// When the store breaks the contract, naming the check.
pub async fn run_all_with_own_clock<S, F, Fut>(mut make: F)
where
    S: Store,
    F: FnMut() -> Fut,
    Fut: Future<Output = (S, ManualClock)>,
{
    macro_rules! check {
        ($($name:ident),* $(,)?) => {$({
            let (store, clock) = make().await;
            $name(Arc::new(store), clock).await;
        })*};
    }
    check!(
        claim_race,
        takeover_race,
        stale_completion_race,
        stale_release_race,
        fencing,
        fencing_outlasts_the_new_holder,
        lapsed_lease_is_still_held,
        completion_ends_the_hold,
        ttl_shorter_than_the_lease,
        lease_takeover,
        late_renewal,
        ttl_expiry,
        expired_record_race,
        mismatch_visibility,
        binary_bodies,
        repeated_headers,
        long_keys,
        keys_are_case_sensitive,
        keys_with_any_printable_character,
        many_records,
        get_reflects_state,
        release_frees_the_key,
        unknown_records_are_not_held,
        scopes_are_separate,
    );
}

/// Many tasks claim one new key at once: exactly one acquires, and every
/// other sees the winner's claim in flight with the winner's fingerprint.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn claim_race<S: Store>(store: Arc<S>, _clock: ManualClock) {
    let key = new_key("race");
    let (winners, seen) = race_claims(&store, &key, 0, "claim_race").await;
    assert_eq!(
        winners.len(),
        1,
        "claim_race: exactly one of {RACERS} concurrent claims must acquire"
    );
    let (winner, token) = winners[0];
    assert!(
        seen.iter().all(|fingerprint| *fingerprint == winner),
        "claim_race: losers must see the winner's fingerprint"
    );
    let held = in_flight(&*store, &key, "claim_race").await;
    assert_eq!(
        (held.0, held.1),
        (winner, token),
        "claim_race: get() must show the winner"
    );
}

/// Many tasks claim a key whose lease has lapsed at once, as after a crash
/// several retries arrive together: exactly one takes it over, round after
/// round.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn takeover_race<S: Store>(store: Arc<S>, clock: ManualClock) {
    const ROUNDS: usize = 20;
    for round in 0..ROUNDS {
        let key = new_key("takeover-race");
        acquire(&*store, &key, fingerprint(0), "takeover_race").await;
        clock.advance(LEASE);
        let (winners, _) = race_claims(&store, &key, 1, "takeover_race").await;
        let check = format!("takeover_race: round {round}");
        assert_one_after(winners.len(), &check, "a lapsed lease", "lease");
    }
}

/// Many tasks claim a key whose completed record has expired at once, as
/// retries sent after the TTL arrive together: exactly one acquires,
/// round after round. A store that replaces an expired record in two
/// steps (a read that finds it expired, then a write that no longer
/// checks) lets several run the request.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn expired_record_race<S: Store>(store: Arc<S>, clock: ManualClock) {
    const ROUNDS: usize = 20;
    for round in 0..ROUNDS {
        let key = new_key("expired-race");
        let token = acquire(&*store, &key, fingerprint(0), "expired_record_race").await;
        let response = response(StatusCode::OK, b"expired");
        complete(&*store, &key, token, response, "expired_record_race").await;
        clock.advance(TTL);
        let (winners, _) = race_claims(&store, &key, 1, "expired_record_race").await;
        let check = format!("expired_record_race: round {round}");
        assert_one_after(winners.len(), &check, "an expired record", "TTL");
    }
}

/// A holder whose lease lapsed completes at the moment another request
/// takes the key over: both must not succeed, or the handler ran twice and
/// the stale result may overwrite the new one.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn stale_completion_race<S: Store>(store: Arc<S>, clock: ManualClock) {
    const ROUNDS: usize = 20;
    for round in 0..ROUNDS {
        let key = new_key("stale-race");
        let stale = acquire(&*store, &key, fingerprint(1), "stale_completion_race").await;
        clock.advance(LEASE);
        let barrier = Arc::new(Barrier::new(2));
        let completing = {
            let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let response = response(StatusCode::OK, b"stale");
                store.complete(&key, stale, response, TTL).await
            })
        };
        let claiming = claim_after(&store, &key, barrier, round % 2 == 1);
        let completed = completing.await.expect("the completing task panicked");
        let claimed = claiming.await.expect("the claiming task panicked");
        let both = matches!((&completed, &claimed), (Ok(()), Ok(Claim::Acquired(_))));
        assert!(
            !both,
            "stale_completion_race: round {round}: the stale holder completed and a new claim acquired"
        );
    }
}

/// A task that claims `key` once `barrier` lets it through: at once, or
/// `late`, a few milliseconds after the other task the barrier let go, so
/// that a claim landing between that task's two steps (a check and a
/// write) is tried even where the task the barrier lets through last
/// always runs first (one busy core).
fn claim_after<S: Store>(
    store: &Arc<S>,
    key: &RecordKey,
    barrier: Arc<Barrier>,
    late: bool,
) -> tokio::task::JoinHandle<Result<Claim, StoreError>> {
    let (store, key) = (Arc::clone(store), key.clone());
    tokio::spawn(async move {
        barrier.wait().await;
        if late {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        store.claim(&key, fingerprint(2), LEASE).await
    })
}

/// A holder whose lease lapsed releases the key (its handler failed) at
/// the moment another request takes it over: whichever comes first, the
/// new holder's claim must survive. A store that checks the token, then
/// deletes in a second step, deletes the new holder's claim, and a third
/// request runs beside it.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn stale_release_race<S: Store>(store: Arc<S>, clock: ManualClock) {
    const ROUNDS: usize = 20;
    for round in 0..ROUNDS {
        let key = new_key("stale-release");
        let stale = acquire(&*store, &key, fingerprint(1), "stale_release_race").await;
        clock.advance(LEASE);
        let barrier = Arc::new(Barrier::new(2));
        let releasing = {
            let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.release(&key, stale).await
            })
        };
        let claiming = claim_after(&store, &key, barrier, round % 2 == 1);
        let released = releasing.await.expect("the releasing task panicked");
        let claimed = claiming.await.expect("the claiming task panicked");
        assert!(
            matches!(released, Ok(()) | Err(StoreError::LeaseLost)),
            "stale_release_race: round {round}: release must succeed or fail with LeaseLost, got {released:?}"
        );
        let Ok(Claim::Acquired(fresh)) = claimed else {
            panic!(
                "stale_release_race: round {round}: a claim of a lapsed or released lease must acquire, got {claimed:?}"
            );
        };
        let held = get(&*store, &key).await;
        assert!(
            matches!(&held, Some(Record::InFlight(held)) if held.lease_token == fresh),
            "stale_release_race: round {round}: the stale holder's release removed the new holder's claim; get() shows {held:?}"
        );
    }
}

/// After a lease lapses and another request takes the key over, the old
/// token can neither renew, complete nor release; the new holder can.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn fencing<S: Store>(store: Arc<S>, clock: ManualClock) {
    let key = new_key("fencing");
    let stale = acquire(&*store, &key, fingerprint(1), "fencing").await;
    clock.advance(LEASE);
    let fresh = acquire(&*store, &key, fingerprint(2), "fencing").await;
    let fresh_deadline = clock.now_millis() + millis(LEASE);
    assert_ne!(stale, fresh, "fencing: a takeover must issue a new token");
    // Later, so a stale renewal would move the deadline.
    clock.advance(Duration::from_secs(1));
    expect_lease_lost(&*store, &key, stale, "fencing: stale token after takeover").await;
    let held = in_flight(&*store, &key, "fencing").await;
    assert_eq!(
        held,
        (fingerprint(2), fresh, fresh_deadline),
        "fencing: the stale token must not have changed the record or its deadline"
    );
    let response = response(StatusCode::CREATED, b"fresh");
    complete(&*store, &key, fresh, response.clone(), "fencing").await;
    expect_lease_lost(&*store, &key, fresh, "fencing: token after completion").await;
    let record = completed(&*store, &key, fingerprint(3), "fencing").await;
    assert_eq!(
        record.fingerprint,
        fingerprint(2),
        "fencing: holder's fingerprint"
    );
    assert_eq!(record.response, response, "fencing: holder's response");
}

/// A stale token stays refused once the request that took the key over
/// has settled it: after that request completed, it neither renews,
/// replaces nor deletes the stored response; after it released the key,
/// it does not store a response under the free key (a completion written
/// as an insert when the row is gone would), so the next claim runs.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn fencing_outlasts_the_new_holder<S: Store>(store: Arc<S>, clock: ManualClock) {
    let check = "fencing_outlasts_the_new_holder";
    let taken_over = || async {
        let key = new_key("fencing-settled");
        let stale = acquire(&*store, &key, fingerprint(1), check).await;
        clock.advance(LEASE);
        let fresh = acquire(&*store, &key, fingerprint(2), check).await;
        (key, stale, fresh)
    };
    let (key, stale, fresh) = taken_over().await;
    let done_at = clock.now_millis();
    let response = response(StatusCode::CREATED, b"fresh");
    complete(&*store, &key, fresh, response.clone(), check).await;
    clock.advance(Duration::from_secs(1));
    expect_lease_lost(&*store, &key, stale, &format!("{check}: after completion")).await;
    let record = completed(&*store, &key, fingerprint(3), check).await;
    assert_eq!(
        (record.fingerprint, &record.response, record.expires_at),
        (fingerprint(2), &response, done_at + millis(TTL)),
        "{check}: the stale token changed the new holder's stored response"
    );
    let (key, stale, fresh) = taken_over().await;
    store
        .release(&key, fresh)
        .await
        .unwrap_or_else(|error| panic!("{check}: the new holder could not release: {error}"));
    expect_lease_lost(&*store, &key, stale, &format!("{check}: after release")).await;
    assert_eq!(
        get(&*store, &key).await,
        None,
        "{check}: the stale token left a record under the released key"
    );
    acquire(&*store, &key, fingerprint(3), check).await;
}

/// A holder whose lease lapsed still holds the key for as long as no other
/// request has claimed it: it can renew (and the renewed lease blocks
/// claims again), complete (and its response is replayed) or release.
/// The engine does each after a lapse it could not help (its renewals held
/// back by a stalled runtime or a store outage, a claim answered late, a
/// response stored after the store came back): nothing else ran the
/// request meanwhile, and a store that refused the completion would leave
/// the response unstored, so that the next retry ran the side effect a
/// second time. Only a takeover (see [`fencing`]) or the record's removal
/// ends the hold.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn lapsed_lease_is_still_held<S: Store>(store: Arc<S>, clock: ManualClock) {
    let check = "lapsed_lease_is_still_held";
    let lapsed = || async {
        let key = new_key("lapsed");
        let token = acquire(&*store, &key, fingerprint(1), check).await;
        clock.advance(LEASE * 2);
        (key, token)
    };
    let (key, token) = lapsed().await;
    store
        .renew(&key, token, LEASE)
        .await
        .unwrap_or_else(|error| panic!("{check}: renew after the lapse: {error}"));
    let renewed_until = clock.now_millis() + millis(LEASE);
    clock.set(renewed_until - 1);
    let claim = claim_again(&*store, &key, check).await;
    assert_eq!(
        claim,
        Claim::InFlight {
            fingerprint: fingerprint(1),
            lease_expires_at: renewed_until,
        },
        "{check}: a lease renewed after its lapse must block claims until its new deadline"
    );
    let (key, token) = lapsed().await;
    let done_at = clock.now_millis();
    let response = response(StatusCode::CREATED, b"completed after the lapse");
    store
        .complete(&key, token, response.clone(), TTL)
        .await
        .unwrap_or_else(|error| panic!("{check}: complete after the lapse: {error}"));
    let record = completed(&*store, &key, fingerprint(1), check).await;
    assert_eq!(
        (record.fingerprint, &record.response, record.expires_at),
        (fingerprint(1), &response, done_at + millis(TTL)),
        "{check}: the response completed after the lapse must be replayed"
    );
    let (key, token) = lapsed().await;
    store
        .release(&key, token)
        .await
        .unwrap_or_else(|error| panic!("{check}: release after the lapse: {error}"));
    assert_eq!(
        get(&*store, &key).await,
        None,
        "{check}: get() after the release"
    );
    let next = acquire(&*store, &key, fingerprint(2), check).await;
    assert_ne!(next, token, "{check}: a new claim gets a new token");
}

/// A completed record is nobody's lease: its token can neither renew it
/// (moving its deadline), complete it again (replacing the stored
/// response, as a second attempt whose first was applied but not answered
/// would) nor release it (deleting a response that retries must replay).
/// Each fails with `LeaseLost`, which the engine answers by reading the
/// record back and finding its own response.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn completion_ends_the_hold<S: Store>(store: Arc<S>, clock: ManualClock) {
    let check = "completion_ends_the_hold";
    let key = new_key("completed-hold");
    let token = acquire(&*store, &key, fingerprint(1), check).await;
    let done_at = clock.now_millis();
    let response = response(StatusCode::OK, b"first");
    // Shorter than the lease, so that a renewal of the completed record
    // would move its deadline.
    if let Err(error) = store
        .complete(&key, token, response.clone(), SHORT_TTL)
        .await
    {
        panic!("{check}: the holder could not complete: {error}");
    }
    clock.advance(Duration::from_millis(1));
    expect_lease_lost(&*store, &key, token, check).await;
    let record = completed(&*store, &key, fingerprint(1), check).await;
    assert_eq!(
        (&record.response, record.expires_at),
        (&response, done_at + millis(SHORT_TTL)),
        "{check}: the completed record's token changed its response or deadline"
    );
}

/// A completed record whose TTL is shorter than the lease it was claimed
/// under expires at its own deadline: the lease ended with the completion,
/// and does not keep the record, nor the key, beyond it.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn ttl_shorter_than_the_lease<S: Store>(store: Arc<S>, clock: ManualClock) {
    let check = "ttl_shorter_than_the_lease";
    let key = new_key("short-ttl");
    let token = acquire(&*store, &key, fingerprint(1), check).await;
    let done_at = clock.now_millis();
    let response = response(StatusCode::OK, b"short");
    if let Err(error) = store.complete(&key, token, response, SHORT_TTL).await {
        panic!("{check}: the holder could not complete: {error}");
    }
    clock.set(done_at + millis(SHORT_TTL) - 1);
    let record = completed(&*store, &key, fingerprint(1), check).await;
    assert_eq!(
        record.expires_at,
        done_at + millis(SHORT_TTL),
        "{check}: expires_at is completion time plus TTL"
    );
    clock.set(done_at + millis(SHORT_TTL));
    assert_eq!(
        get(&*store, &key).await,
        None,
        "{check}: get() must not show the record past its TTL"
    );
    let claim = claim(&*store, &key, fingerprint(2), check).await;
    assert!(
        matches!(claim, Claim::Acquired(_)),
        "{check}: a claim past the TTL, within the old lease, must acquire, got {claim:?}"
    );
}

/// A renewal that reaches the store after a later one (sent first, it
/// was held up on the way: another connection, a lock) leaves the later
/// deadline: moved back, the lease could lapse under a running handler
/// that renewed it in time. A renewal takes its deadline from the clock
/// when it is made, so an earlier reading stands for the earlier renewal.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn late_renewal<S: Store>(store: Arc<S>, clock: ManualClock) {
    let key = new_key("late-renewal");
    let token = acquire(&*store, &key, fingerprint(1), "late_renewal").await;
    let sent_first = clock.now_millis() + 1_000;
    clock.set(sent_first + 2_000);
    store
        .renew(&key, token, LEASE)
        .await
        .expect("late_renewal: the later renewal");
    let later_deadline = clock.now_millis() + millis(LEASE);
    clock.set(sent_first);
    store
        .renew(&key, token, LEASE)
        .await
        .expect("late_renewal: the earlier renewal, arriving late, is still the holder's");
    let held = in_flight(&*store, &key, "late_renewal").await;
    assert_eq!(
        held,
        (fingerprint(1), token, later_deadline),
        "late_renewal: a renewal applied late moved the deadline back"
    );
}

/// A live lease blocks claims; renewing extends it; once it lapses the
/// next claim takes the key over.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn lease_takeover<S: Store>(store: Arc<S>, clock: ManualClock) {
    let key = new_key("takeover");
    let start = clock.now_millis();
    let token = acquire(&*store, &key, fingerprint(1), "lease_takeover").await;
    clock.advance(LEASE - Duration::from_millis(1));
    let claim = claim(&*store, &key, fingerprint(1), "lease_takeover").await;
    assert_eq!(
        claim,
        Claim::InFlight {
            fingerprint: fingerprint(1),
            lease_expires_at: start + millis(LEASE),
        },
        "lease_takeover: a live lease must block a claim and report its deadline"
    );
    store
        .renew(&key, token, LEASE)
        .await
        .expect("lease_takeover: the holder must be able to renew");
    let renewed_until = clock.now_millis() + millis(LEASE);
    clock.set(renewed_until - 1);
    let claim = claim_again(&*store, &key, "lease_takeover").await;
    assert!(
        matches!(claim, Claim::InFlight { lease_expires_at, .. } if lease_expires_at == renewed_until),
        "lease_takeover: a renewed lease must block claims until its new deadline, got {claim:?}"
    );
    clock.set(renewed_until);
    assert_eq!(
        get(&*store, &key).await,
        None,
        "lease_takeover: get() must not show a lapsed lease"
    );
    let taken = acquire(&*store, &key, fingerprint(2), "lease_takeover").await;
    assert_ne!(
        taken, token,
        "lease_takeover: a takeover issues a new token"
    );
}

/// A completed record replays until its TTL ends, then the key is new.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn ttl_expiry<S: Store>(store: Arc<S>, clock: ManualClock) {
    let key = new_key("ttl");
    let token = acquire(&*store, &key, fingerprint(1), "ttl_expiry").await;
    let done_at = clock.now_millis();
    let response = response(StatusCode::OK, b"done");
    complete(&*store, &key, token, response, "ttl_expiry").await;
    clock.set(done_at + millis(TTL) - 1);
    let record = completed(&*store, &key, fingerprint(1), "ttl_expiry").await;
    assert_eq!(
        record.expires_at,
        done_at + millis(TTL),
        "ttl_expiry: expires_at is completion time plus TTL"
    );
    assert!(
        matches!(get(&*store, &key).await, Some(Record::Completed(_))),
        "ttl_expiry: get() must show the record before it expires"
    );
    clock.set(done_at + millis(TTL));
    assert_eq!(
        get(&*store, &key).await,
        None,
        "ttl_expiry: get() must not show an expired record"
    );
    acquire(&*store, &key, fingerprint(2), "ttl_expiry: after expiry").await;
    let held = in_flight(&*store, &key, "ttl_expiry").await;
    assert_eq!(
        held.0,
        fingerprint(2),
        "ttl_expiry: the new claim's fingerprint"
    );
}

/// A claim with another fingerprint sees the holder's fingerprint, both
/// while in flight and once completed, so the engine can answer 422.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn mismatch_visibility<S: Store>(store: Arc<S>, _clock: ManualClock) {
    let key = new_key("mismatch");
    let token = acquire(&*store, &key, fingerprint(1), "mismatch_visibility").await;
    let claim = claim(&*store, &key, fingerprint(2), "mismatch_visibility").await;
    assert!(
        matches!(claim, Claim::InFlight { fingerprint: seen, .. } if seen == fingerprint(1)),
        "mismatch_visibility: in flight must show the holder's fingerprint, got {claim:?}"
    );
    let response = response(StatusCode::OK, b"first");
    complete(&*store, &key, token, response, "mismatch_visibility").await;
    let record = completed(&*store, &key, fingerprint(2), "mismatch_visibility").await;
    assert_eq!(
        record.fingerprint,
        fingerprint(1),
        "mismatch_visibility: completed must show the holder's fingerprint"
    );
}

/// Bodies come back byte for byte: every byte value, 1 MiB, empty, and
/// absent.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn binary_bodies<S: Store>(store: Arc<S>, _clock: ManualClock) {
    let every_byte: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    // The engine's default `max_body_bytes`: the largest body it stores.
    let largest: Vec<u8> = (0..=255u8).rev().cycle().take(1024 * 1024).collect();
    let bodies = [
        Some(Bytes::from(every_byte)),
        Some(Bytes::from(largest)),
        Some(Bytes::new()),
        None,
    ];
    for (index, body) in bodies.into_iter().enumerate() {
        let key = new_key("binary");
        let response = StoredResponse {
            status: StatusCode::OK,
            headers: Vec::new(),
            body,
        };
        round_trip(&*store, &key, index, response, "binary_bodies").await;
    }
}

/// Headers come back in order with repeated names and opaque bytes kept.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn repeated_headers<S: Store>(store: Arc<S>, _clock: ManualClock) {
    let header = |name: &'static str, value: &[u8]| {
        (
            HeaderName::from_static(name),
            HeaderValue::from_bytes(value).expect("valid header value"),
        )
    };
    let response = StoredResponse {
        status: StatusCode::CREATED,
        headers: vec![
            header("x-a", b"1"),
            header("location", b"/payments/1"),
            header("x-a", b"2"),
            header("x-opaque", &[b'a', 0x80, 0xff, b'\t', b'z']),
            header("x-empty", b""),
        ],
        body: Some(Bytes::from_static(b"{}")),
    };
    let key = new_key("headers");
    round_trip(&*store, &key, 1, response, "repeated_headers").await;
}

/// The longest keys work, and keys that differ only in their last
/// character are separate records.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn long_keys<S: Store>(store: Arc<S>, _clock: ManualClock) {
    let scope = ScopeDigest::from_bytes(rand::random());
    let stem: String = (0..254)
        .map(|i| {
            char::from(KEY_CHARS[(i * 7 + usize::from(rand::random::<u8>())) % KEY_CHARS.len()])
        })
        .collect();
    for (index, last) in ["a", "b"].into_iter().enumerate() {
        let key = RecordKey::new(scope, parse_key(&format!("{stem}{last}")));
        assert_eq!(
            key.key.as_str().len(),
            255,
            "long_keys: the key is 255 characters"
        );
        let body = format!("record {last}");
        let response = response(StatusCode::OK, body.as_bytes());
        round_trip(&*store, &key, index, response, "long_keys").await;
    }
}

/// Keys that differ only in case are separate records, as the key is an
/// opaque string (a case-insensitive column or collation would merge them).
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn keys_are_case_sensitive<S: Store>(store: Arc<S>, _clock: ManualClock) {
    let keys = ["order-1", "Order-1", "ORDER-1"].map(parse_key);
    each_its_own_record(&*store, keys, "keys_are_case_sensitive").await;
}

/// A key may hold any printable ASCII (the header's quoted form carries
/// spaces, quotes and backslashes): each of these is its own record, so a
/// store that escapes, trims or pattern-matches keys (SQL `LIKE`, Redis
/// globs, a separator in a composite key) must still keep them apart.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn keys_with_any_printable_character<S: Store>(store: Arc<S>, _clock: ManualClock) {
    let keys = [
        "a b", "a_b", "a%b", "a%20b", "a\"b", "a\\b", "a'b", "a;b", "a,b", "{a}", "a*", "a?",
        "[a]", "a:b", " a", "a ",
    ]
    .map(|key| {
        parse_key(&format!(
            "\"{}\"",
            key.replace('\\', "\\\\").replace('"', "\\\"")
        ))
    });
    each_its_own_record(&*store, keys, "keys_with_any_printable_character").await;
}

/// Each of `keys`, in one scope, stores and replays a response of its own.
async fn each_its_own_record<S: Store>(
    store: &S,
    keys: impl IntoIterator<Item = IdempotencyKey>,
    check: &str,
) {
    let scope = ScopeDigest::from_bytes(rand::random());
    for (index, key) in keys.into_iter().enumerate() {
        let key = RecordKey::new(scope, key);
        let body = format!("record {index}");
        let response = response(StatusCode::OK, body.as_bytes());
        round_trip(store, &key, index, response, check).await;
    }
}

/// A thousand records, each replaying its own response.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn many_records<S: Store>(store: Arc<S>, _clock: ManualClock) {
    const TASKS: usize = 10;
    let scope = ScopeDigest::from_bytes(rand::random());
    let key = move |index: usize| RecordKey::new(scope, parse_key(&format!("many-{index}")));
    let mut tasks = JoinSet::new();
    for task in 0..TASKS {
        let store = store.clone();
        tasks.spawn(async move {
            for index in (task..MANY).step_by(TASKS) {
                let key = key(index);
                let token = acquire(&*store, &key, fingerprint(index), "many_records").await;
                let body = index.to_string();
                let response = response(StatusCode::OK, body.as_bytes());
                complete(&*store, &key, token, response, "many_records").await;
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("many_records: a writer panicked");
    }
    for index in 0..MANY {
        let record = completed(&*store, &key(index), fingerprint(index), "many_records").await;
        assert_eq!(
            record.fingerprint,
            fingerprint(index),
            "many_records: record {index} has its own fingerprint"
        );
        assert_eq!(
            record.response.body,
            Some(Bytes::from(index.to_string())),
            "many_records: record {index} has its own body"
        );
    }
}

/// `get` shows nothing, then the lease (token, deadline, renewals), then
/// the completed record.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn get_reflects_state<S: Store>(store: Arc<S>, clock: ManualClock) {
    let key = new_key("get");
    assert_eq!(
        get(&*store, &key).await,
        None,
        "get_reflects_state: new key"
    );
    let start = clock.now_millis();
    let token = acquire(&*store, &key, fingerprint(1), "get_reflects_state").await;
    let held = in_flight(&*store, &key, "get_reflects_state").await;
    assert_eq!(
        held,
        (fingerprint(1), token, start + millis(LEASE)),
        "get_reflects_state: in flight"
    );
    clock.advance(Duration::from_secs(1));
    store
        .renew(&key, token, LEASE)
        .await
        .expect("get_reflects_state: renew");
    let held = in_flight(&*store, &key, "get_reflects_state").await;
    assert_eq!(
        held.2,
        start + 1000 + millis(LEASE),
        "get_reflects_state: renewed deadline"
    );
    let response = response(StatusCode::ACCEPTED, b"accepted");
    complete(&*store, &key, token, response.clone(), "get_reflects_state").await;
    let expected = Completed {
        fingerprint: fingerprint(1),
        response,
        expires_at: start + 1000 + millis(TTL),
    };
    assert_eq!(
        get(&*store, &key).await,
        Some(Record::Completed(Arc::new(expected))),
        "get_reflects_state: completed"
    );
}

/// Releasing frees the key for the next claim; the released token is dead.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn release_frees_the_key<S: Store>(store: Arc<S>, _clock: ManualClock) {
    let key = new_key("release");
    let first = acquire(&*store, &key, fingerprint(1), "release_frees_the_key").await;
    store
        .release(&key, first)
        .await
        .expect("release_frees_the_key: the holder must be able to release");
    assert_eq!(
        get(&*store, &key).await,
        None,
        "release_frees_the_key: get() after release"
    );
    let second = acquire(&*store, &key, fingerprint(2), "release_frees_the_key").await;
    assert_ne!(first, second, "release_frees_the_key: a new token");
    expect_lease_lost(
        &*store,
        &key,
        first,
        "release_frees_the_key: released token",
    )
    .await;
    let response = response(StatusCode::OK, b"second");
    complete(&*store, &key, second, response, "release_frees_the_key").await;
}

/// Nobody holds a key that was never claimed.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn unknown_records_are_not_held<S: Store>(store: Arc<S>, _clock: ManualClock) {
    let key = new_key("unknown");
    expect_lease_lost(
        &*store,
        &key,
        LeaseToken::random(),
        "unknown_records_are_not_held",
    )
    .await;
    assert_eq!(
        get(&*store, &key).await,
        None,
        "unknown_records_are_not_held: nothing was created"
    );
}

/// One key in two scopes is two records, each claimed, completed, replayed
/// and read (`get`, which answers exact repeats) on its own.
///
/// # Panics
/// When the store breaks this part of the contract, naming the check.
pub async fn scopes_are_separate<S: Store>(store: Arc<S>, _clock: ManualClock) {
    let key = parse_key("shared-key");
    let first = RecordKey::new(ScopeDigest::from_bytes(rand::random()), key.clone());
    let second = RecordKey::new(ScopeDigest::from_bytes(rand::random()), key);
    let check = "scopes_are_separate";
    let first_token = acquire(&*store, &first, fingerprint(1), check).await;
    let second_token = acquire(&*store, &second, fingerprint(1), check).await;
    let first_response = response(StatusCode::OK, b"first caller");
    let second_response = response(StatusCode::OK, b"second caller");
    complete(&*store, &first, first_token, first_response.clone(), check).await;
    complete(
        &*store,
        &second,
        second_token,
        second_response.clone(),
        check,
    )
    .await;
    for (key, response) in [(&first, first_response), (&second, second_response)] {
        let replayed = completed(&*store, key, fingerprint(1), check).await;
        assert_eq!(
            replayed.response, response,
            "{check}: claim replays its own scope's response"
        );
        let Some(Record::Completed(read)) = get(&*store, key).await else {
            panic!("{check}: get() must show the completed record");
        };
        assert_eq!(
            read.response, response,
            "{check}: get() reads its own scope's record"
        );
    }
}

// ===== helpers =====

fn new_key(tag: &str) -> RecordKey {
    let scope = ScopeDigest::from_bytes(rand::random());
    RecordKey::new(
        scope,
        parse_key(&format!("{tag}-{:016x}", rand::random::<u64>())),
    )
}

fn parse_key(key: &str) -> IdempotencyKey {
    IdempotencyKey::parse(key.as_bytes()).expect("test keys are valid")
}

fn fingerprint(seed: usize) -> Fingerprint {
    let mut bytes = [0xA5; 32];
    bytes[..8].copy_from_slice(&(seed as u64).to_be_bytes());
    Fingerprint::from_bytes(bytes)
}

fn response(status: StatusCode, body: &[u8]) -> StoredResponse {
    StoredResponse {
        status,
        headers: vec![(
            HeaderName::from_static("content-type"),
            HeaderValue::from_static("text/plain"),
        )],
        body: Some(Bytes::copy_from_slice(body)),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).expect("test durations are short")
}

async fn claim<S: Store>(
    store: &S,
    key: &RecordKey,
    fingerprint: Fingerprint,
    check: &str,
) -> Claim {
    match store.claim(key, fingerprint, LEASE).await {
        Ok(claim) => claim,
        Err(error) => panic!("{check}: claim failed: {error}"),
    }
}

async fn claim_again<S: Store>(store: &S, key: &RecordKey, check: &str) -> Claim {
    claim(store, key, fingerprint(usize::MAX), check).await
}

async fn acquire<S: Store>(
    store: &S,
    key: &RecordKey,
    fingerprint: Fingerprint,
    check: &str,
) -> LeaseToken {
    match claim(store, key, fingerprint, check).await {
        Claim::Acquired(token) => token,
        other => panic!("{check}: expected to acquire the key, got {other:?}"),
    }
}

async fn completed<S: Store>(
    store: &S,
    key: &RecordKey,
    fingerprint: Fingerprint,
    check: &str,
) -> Arc<Completed> {
    match claim(store, key, fingerprint, check).await {
        Claim::Completed(record) => record,
        other => panic!("{check}: expected a completed record, got {other:?}"),
    }
}

async fn complete<S: Store>(
    store: &S,
    key: &RecordKey,
    token: LeaseToken,
    response: StoredResponse,
    check: &str,
) {
    if let Err(error) = store.complete(key, token, response, TTL).await {
        panic!("{check}: the holder could not complete: {error}");
    }
}

async fn get<S: Store>(store: &S, key: &RecordKey) -> Option<Record> {
    match store.get(key).await {
        Ok(record) => record,
        Err(error) => panic!("get failed: {error}"),
    }
}

/// `RACERS` tasks claim `key` at once, with the fingerprints of seeds
/// from `first_seed` on: the winners with their tokens, and the
/// fingerprints the others saw in flight.
async fn race_claims<S: Store>(
    store: &Arc<S>,
    key: &RecordKey,
    first_seed: usize,
    check: &str,
) -> (Vec<(Fingerprint, LeaseToken)>, Vec<Fingerprint>) {
    let barrier = Arc::new(Barrier::new(RACERS));
    let mut racers = JoinSet::new();
    for racer in first_seed..first_seed + RACERS {
        let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
        racers.spawn(async move {
            let fingerprint = fingerprint(racer);
            barrier.wait().await;
            (fingerprint, store.claim(&key, fingerprint, LEASE).await)
        });
    }
    let mut winners = Vec::new();
    let mut seen = Vec::new();
    while let Some(joined) = racers.join_next().await {
        let (fingerprint, claim) = joined.expect("a claim task panicked");
        match claim {
            Ok(Claim::Acquired(token)) => winners.push((fingerprint, token)),
            Ok(Claim::InFlight { fingerprint, .. }) => seen.push(fingerprint),
            other => panic!("{check}: unexpected claim result {other:?}"),
        }
    }
    (winners, seen)
}

/// Exactly one of the claims racing on `what`, which the check's clock
/// moved past its `deadline`, acquired. None at all is most often a store
/// that reads another clock than the one given to `make` (the system's),
/// for which the check's time never moved: the message says so, rather
/// than leave a correct store's author looking for a race.
fn assert_one_after(winners: usize, check: &str, what: &str, deadline: &str) {
    assert!(
        winners != 0,
        "{check}: none of {RACERS} concurrent claims of {what} acquired: the check moved the \
         ManualClock given to `make` past the {deadline}; does the store read its time from \
         that clock (and take over a key past its {deadline})?"
    );
    assert_eq!(
        winners, 1,
        "{check}: exactly one of {RACERS} concurrent claims of {what} must acquire"
    );
}

/// The live in-flight record: fingerprint, token, deadline.
async fn in_flight<S: Store>(
    store: &S,
    key: &RecordKey,
    check: &str,
) -> (Fingerprint, LeaseToken, u64) {
    match get(store, key).await {
        Some(Record::InFlight(held)) => (held.fingerprint, held.lease_token, held.lease_expires_at),
        other => panic!("{check}: expected get() to show a claim in flight, got {other:?}"),
    }
}

/// Claims, completes with `response`, then expects claim and get to give
/// back exactly that response.
async fn round_trip<S: Store>(
    store: &S,
    key: &RecordKey,
    seed: usize,
    response: StoredResponse,
    check: &str,
) {
    let token = acquire(store, key, fingerprint(seed), check).await;
    complete(store, key, token, response.clone(), check).await;
    let record = completed(store, key, fingerprint(seed), check).await;
    assert_eq!(
        record.response, response,
        "{check}: claim replays the response"
    );
    let Some(Record::Completed(read)) = get(store, key).await else {
        panic!("{check}: get() must show the completed record");
    };
    assert_eq!(
        read.response, response,
        "{check}: get() returns the response"
    );
}

async fn expect_lease_lost<S: Store>(store: &S, key: &RecordKey, token: LeaseToken, check: &str) {
    let renewed = store.renew(key, token, LEASE).await;
    assert!(
        matches!(renewed, Err(StoreError::LeaseLost)),
        "{check}: renew must fail with LeaseLost, got {renewed:?}"
    );
    let response = response(StatusCode::OK, b"stale");
    let completed = store.complete(key, token, response, TTL).await;
    assert!(
        matches!(completed, Err(StoreError::LeaseLost)),
        "{check}: complete must fail with LeaseLost, got {completed:?}"
    );
    let released = store.release(key, token).await;
    assert!(
        matches!(released, Err(StoreError::LeaseLost)),
        "{check}: release must fail with LeaseLost, got {released:?}"
    );
}
