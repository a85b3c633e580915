//! The store contract on the in-process stores, and what the tiered cache
//! adds: replays without a durable round trip, never past the durable
//! record's expiry. A lapsed claim nobody took over stays its holder's
//! while the memory store sweeps lapsed claims.

use crate::store_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::routing::post;
use idempotent_core::clock::{Clock, ManualClock};
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, LeaseToken, Record, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{MemoryStore, Store, StoreError, Tiered};
use idempotent_core::testing::{MockStore, contract};
use idempotent_core::{Endpoint, idempotent};
use store_support::forwarding::{Forwarding, Hooks};
use tokio::sync::Semaphore;
use tower::ServiceExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_store_passes_the_contract() {
    contract::run_all(|clock| async move { MemoryStore::builder().clock(clock).build() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiered_store_passes_the_contract() {
    contract::run_all(|clock| async move {
        let durable = MemoryStore::builder().clock(clock.clone()).build();
        Tiered::builder(durable).clock(clock).build()
    })
    .await;
}

/// Counts the claims that reach the durable tier.
#[derive(Clone)]
struct CountingStore {
    inner: MemoryStore,
    claims: Arc<AtomicUsize>,
}

impl Hooks for CountingStore {
    type Inner = MemoryStore;

    fn inner(&self) -> &MemoryStore {
        &self.inner
    }

    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        self.inner.claim(key, fingerprint, lease).await
    }
}

fn record_key(key: &str) -> RecordKey {
    RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(key.as_bytes()).unwrap(),
    )
}

fn ok_response() -> StoredResponse {
    StoredResponse::new(
        StatusCode::OK,
        vec![("x-a".parse().unwrap(), HeaderValue::from_static("1"))],
        Some("paid".into()),
    )
}

/// The lease and TTL of the records these tests make.
const LEASE: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(60);

/// Claims `key`, which must be new to `store`, and completes it with
/// [`ok_response`].
async fn complete_new(store: &impl Store, key: &RecordKey, fingerprint: Fingerprint) {
    let Claim::Acquired(token) = store.claim(key, fingerprint, LEASE).await.unwrap() else {
        panic!("a new key is acquired");
    };
    store
        .complete(key, token, ok_response(), TTL)
        .await
        .unwrap();
}

fn tiered(clock: &ManualClock) -> (Tiered<Forwarding<CountingStore>>, Arc<AtomicUsize>) {
    let claims = Arc::new(AtomicUsize::new(0));
    let durable = Forwarding(CountingStore {
        inner: MemoryStore::builder().clock(clock.clone()).build(),
        claims: claims.clone(),
    });
    (
        Tiered::builder(durable).clock(clock.clone()).build(),
        claims,
    )
}

#[tokio::test]
async fn completed_records_replay_from_memory() {
    let clock = ManualClock::starting_now();
    let (store, durable_claims) = tiered(&clock);
    let key = record_key("cached");
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    complete_new(&store, &key, fingerprint).await;
    assert_eq!(durable_claims.load(Ordering::SeqCst), 1);
    for _ in 0..5 {
        let claim = store.claim(&key, fingerprint, LEASE).await.unwrap();
        assert!(matches!(claim, Claim::Completed(record) if record.response == ok_response()));
    }
    assert_eq!(
        durable_claims.load(Ordering::SeqCst),
        1,
        "replays never reached the durable tier"
    );
    assert_eq!(store.cached_len(), 1);
}

#[tokio::test]
async fn records_completed_elsewhere_are_cached_on_first_sight() {
    let clock = ManualClock::starting_now();
    let (store, durable_claims) = tiered(&clock);
    let key = record_key("elsewhere");
    let fingerprint = Fingerprint::from_bytes([2; 32]);
    // Another instance completes through the durable tier directly.
    complete_new(store.durable(), &key, fingerprint).await;
    let before = durable_claims.load(Ordering::SeqCst);
    assert!(matches!(
        store.claim(&key, fingerprint, LEASE).await.unwrap(),
        Claim::Completed(_)
    ));
    assert!(matches!(
        store.claim(&key, fingerprint, LEASE).await.unwrap(),
        Claim::Completed(_)
    ));
    assert_eq!(
        durable_claims.load(Ordering::SeqCst),
        before + 1,
        "only the first replay reads the durable tier"
    );
}

#[tokio::test]
async fn a_cached_record_expires_with_the_durable_one() {
    let clock = ManualClock::starting_now();
    let (store, durable_claims) = tiered(&clock);
    let key = record_key("expiring");
    let fingerprint = Fingerprint::from_bytes([3; 32]);
    complete_new(&store, &key, fingerprint).await;
    let Some(Record::Completed(durable)) = store.durable().get(&key).await.unwrap() else {
        panic!("the durable tier holds the record");
    };
    let Claim::Completed(cached) = store.claim(&key, fingerprint, LEASE).await.unwrap() else {
        panic!("replayed");
    };
    assert!(
        cached.expires_at <= durable.expires_at,
        "the cache never outlives the durable record"
    );
    clock.advance(TTL);
    let claims_before = durable_claims.load(Ordering::SeqCst);
    let claim = store.claim(&key, fingerprint, LEASE).await.unwrap();
    assert!(
        matches!(claim, Claim::Acquired(_)),
        "after expiry the key is new, got {claim:?}"
    );
    assert_eq!(
        durable_claims.load(Ordering::SeqCst),
        claims_before + 1,
        "the claim went to the durable tier"
    );
}

/// A key this instance holds is in flight from memory: asked of a durable
/// tier that hangs, the claim is cut short by the store timeout before
/// memory could answer, and a retry runs beside the run under way under
/// `fail_open`.
#[tokio::test]
async fn a_key_held_here_is_in_flight_without_asking_the_durable_tier() {
    let clock = ManualClock::starting_now();
    let (store, durable_claims) = tiered(&clock);
    let key = record_key("in-flight");
    let fingerprint = Fingerprint::from_bytes([4; 32]);
    assert!(matches!(
        store.claim(&key, fingerprint, LEASE).await.unwrap(),
        Claim::Acquired(_)
    ));
    for _ in 0..3 {
        assert!(matches!(
            store.claim(&key, fingerprint, LEASE).await.unwrap(),
            Claim::InFlight { .. }
        ));
    }
    assert_eq!(durable_claims.load(Ordering::SeqCst), 1);
    assert_eq!(store.cached_len(), 0, "nothing in flight is cached");
}

#[tokio::test]
async fn a_completion_the_durable_tier_refuses_is_not_cached() {
    let clock = ManualClock::starting_now();
    let (store, _) = tiered(&clock);
    let key = record_key("lost-lease");
    let fingerprint = Fingerprint::from_bytes([5; 32]);
    let Claim::Acquired(stale) = store.claim(&key, fingerprint, LEASE).await.unwrap() else {
        panic!("a new key is acquired");
    };
    // The lease lapses and another instance takes the key over.
    clock.advance(LEASE);
    let Claim::Acquired(_) = store
        .durable()
        .claim(&key, fingerprint, LEASE)
        .await
        .unwrap()
    else {
        panic!("a lapsed lease is taken over");
    };
    let refused = store.complete(&key, stale, ok_response(), TTL).await;
    assert!(
        matches!(refused, Err(StoreError::LeaseLost)),
        "got {refused:?}"
    );
    assert_eq!(store.cached_len(), 0, "the refused response is not cached");
    assert!(matches!(
        store.claim(&key, fingerprint, LEASE).await.unwrap(),
        Claim::InFlight { .. }
    ));
}

#[tokio::test]
async fn the_cache_keeps_to_its_byte_budget() {
    let clock = ManualClock::starting_now();
    let durable = MemoryStore::builder().clock(clock.clone()).build();
    let store = Tiered::builder(durable)
        .clock(clock.clone())
        .max_bytes(4 * 1024)
        .build();
    for i in 0..100 {
        let key = record_key(&format!("budget-{i}"));
        complete_new(&store, &key, Fingerprint::from_bytes([6; 32])).await;
    }
    let cached = store.cached_len();
    assert!(
        (1..100).contains(&cached),
        "the oldest records left the cache, the newest stayed: {cached} cached"
    );
    let newest = record_key("budget-99");
    assert!(matches!(
        store
            .claim(&newest, Fingerprint::from_bytes([6; 32]), LEASE)
            .await
            .unwrap(),
        Claim::Completed(_)
    ));
}

// ===== a lapsed claim nobody took over =====

/// Counts its runs, each held at a gate until the test opens it.
#[derive(Clone)]
struct Gated {
    runs: Arc<AtomicUsize>,
    started: Arc<Semaphore>,
    gate: Arc<Semaphore>,
}

impl Default for Gated {
    fn default() -> Self {
        Self {
            runs: Arc::default(),
            started: Arc::new(Semaphore::new(0)),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
}

#[idempotent(scope = "global")]
async fn gated_charge(State(gated): State<Gated>) -> StatusCode {
    gated.runs.fetch_add(1, Ordering::SeqCst);
    gated.started.add_permits(1);
    gated.gate.acquire().await.expect("never closed").forget();
    StatusCode::CREATED
}

async fn send_charge(app: Router) -> StatusCode {
    let request = Request::post("/charges")
        .header("idempotency-key", "held-up")
        .body(Body::empty())
        .unwrap();
    app.oneshot(request).await.unwrap().status()
}

/// A run whose renewals were held up past its lease (a stalled runtime),
/// with nobody claiming its key meanwhile, still holds the key: claims of
/// other keys that pile up meanwhile, and make every shard sweep its
/// lapsed claims, leave it be, so the run's response is stored and the
/// retry replays it rather than running the handler again.
#[tokio::test]
async fn a_run_whose_renewals_were_held_up_is_stored_though_claims_piled_up() {
    let store = MockStore::new();
    let gated = Gated::default();
    let app = Router::new()
        .route("/charges", post(gated_charge))
        .with_state(gated.clone())
        .layer(store.layer());
    let first = tokio::spawn(send_charge(app.clone()));
    let started = tokio::time::timeout(Duration::from_secs(10), gated.started.acquire());
    started.await.unwrap().unwrap().forget();
    store.advance(Endpoint::DEFAULT_LEASE + Duration::from_secs(1));
    // Sixteen shards, each of which sweeps once it holds 64 claims.
    for i in 0..4_096 {
        let other = record_key(&format!("other-{i}"));
        let fingerprint = Fingerprint::from_bytes([9; 32]);
        let claim = Store::claim(store.memory(), &other, fingerprint, LEASE).await;
        assert!(matches!(claim, Ok(Claim::Acquired(_))), "{claim:?}");
    }
    gated.gate.add_permits(2);
    assert_eq!(first.await.unwrap(), StatusCode::CREATED);
    assert_eq!(send_charge(app).await, StatusCode::CREATED);
    assert_eq!(
        gated.runs.load(Ordering::SeqCst),
        1,
        "the retry ran the handler again"
    );
}

// ===== the contract catches broken stores =====

/// Lets anyone release a record, token or not.
struct UnfencedRelease(MemoryStore);

impl Hooks for UnfencedRelease {
    type Inner = MemoryStore;

    fn inner(&self) -> &MemoryStore {
        &self.0
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        match self.0.release(key, token).await {
            Err(StoreError::LeaseLost) => Ok(()),
            other => other,
        }
    }
}

async fn panics(check: impl std::future::Future<Output = ()> + Send + 'static) -> bool {
    tokio::spawn(check)
        .await
        .is_err_and(|error| error.is_panic())
}

#[tokio::test]
async fn the_contract_catches_a_store_without_fencing() {
    let clock = ManualClock::starting_now();
    let store = Arc::new(Forwarding(UnfencedRelease(
        MemoryStore::builder().clock(clock.clone()).build(),
    )));
    assert!(panics(contract::fencing(store, clock)).await);
}

#[tokio::test]
async fn the_contract_catches_a_store_that_ignores_its_clock() {
    // Built on its own clock, so the check's clock moves nothing.
    let store = Arc::new(MemoryStore::new());
    assert!(panics(contract::ttl_expiry(store, ManualClock::starting_now())).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mock_store_passes_the_contract() {
    contract::run_all_with_own_clock(|| async {
        let store = MockStore::new();
        let clock = store.clock();
        (store, clock)
    })
    .await;
}

/// Two instances, each a cache over one durable store. The first claims a
/// key; its lease lapses and the second takes the key over and stores its
/// response. The wall clock is then set back (an NTP step): the
/// first instance's lapsed hold must not come back to life and answer a
/// retry in flight (409), with the lost claim's payload, while the durable
/// store and the other instance replay the stored response.
#[tokio::test]
async fn a_clock_set_back_does_not_bring_a_lapsed_hold_back() {
    const LEASE: Duration = Duration::from_millis(300);
    let clock = ManualClock::new(1_700_000_000_000);
    let durable = MemoryStore::builder().clock(clock.clone()).build();
    let first = Tiered::builder(durable.clone())
        .clock(clock.clone())
        .build();
    let second = Tiered::builder(durable).clock(clock.clone()).build();
    let key = record_key("stepped");
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lost = first.claim(&key, fingerprint, LEASE).await;
    assert!(matches!(lost, Ok(Claim::Acquired(_))), "{lost:?}");
    // The lease lapses on the wall clock and in real time, as it does
    // outside tests.
    tokio::time::sleep(LEASE).await;
    clock.advance(LEASE);
    let Ok(Claim::Acquired(token)) = second.claim(&key, fingerprint, LEASE).await else {
        panic!("a lapsed lease is taken over");
    };
    let response = StoredResponse::new(StatusCode::CREATED, Vec::new(), None);
    let ttl = Duration::from_secs(3600);
    second.complete(&key, token, response, ttl).await.unwrap();
    clock.set(clock.now_millis() - 200);
    for (name, instance) in [("second", &second), ("first", &first)] {
        let retried = instance.claim(&key, fingerprint, LEASE).await;
        assert!(
            matches!(retried, Ok(Claim::Completed(_))),
            "the {name} instance does not replay the stored response: {retried:?}"
        );
    }
}
