//! Several tiered stores (as several processes would have) over one durable
//! store that answers late, sometimes fails before or after applying a
//! call, and whose calls are sometimes cut short by the caller: no tier may
//! replay a response the durable store did not accept, nor one the durable
//! store no longer holds while the tier still treats it as live.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use idempotent_core::clock::{Clock, ManualClock};
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, Completed, LeaseToken, Record, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{MemoryStore, Store, StoreError, Tiered};

const TIERS: usize = 3;
const WORKERS: usize = 16;
const ROUNDS: usize = 1000;
const KEYS: u64 = 4;

/// A durable store that is slow and unreliable, and that remembers every
/// body it accepted.
#[derive(Clone)]
struct Unreliable {
    inner: MemoryStore,
    accepted: Arc<Mutex<HashMap<RecordKey, HashSet<Bytes>>>>,
}

fn percent(p: u64) -> bool {
    rand::random::<u64>() % 100 < p
}

fn random_below(n: u64) -> u64 {
    rand::random::<u64>() % n
}

async fn late() {
    tokio::time::sleep(Duration::from_micros(random_below(800))).await;
}

impl Unreliable {
    /// `op`, answered late, failing now and then before it is applied and
    /// now and then after.
    async fn unreliably<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        late().await;
        if percent(3) {
            return Err(StoreError::Timeout(Duration::from_millis(1)));
        }
        let answer = op.await;
        late().await;
        if percent(3) {
            return Err(StoreError::Timeout(Duration::from_millis(1)));
        }
        answer
    }
}

impl Store for Unreliable {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.unreliably(self.inner.claim(key, fingerprint, lease))
            .await
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.unreliably(self.inner.renew(key, token, lease)).await
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        // A record kept without its body is remembered as an empty one.
        let body = response.body.clone().unwrap_or_default();
        let mut response = response;
        response.body = Some(body.clone());
        self.unreliably(async {
            let completed = self.inner.complete(key, token, response, ttl).await;
            if completed.is_ok() {
                let mut accepted = self.accepted.lock().unwrap();
                accepted.entry(key.clone()).or_default().insert(body);
            }
            completed
        })
        .await
    }
    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.unreliably(self.inner.release(key, token)).await
    }
    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        self.unreliably(self.inner.get(key)).await
    }
}

fn key(index: u64) -> RecordKey {
    RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(format!("k{index}").as_bytes()).unwrap(),
    )
}

/// The durable store's record of `key` now: the memory store answers
/// without waiting.
fn durable_now(store: &MemoryStore, key: &RecordKey) -> Option<Record> {
    let read = store.get(key);
    let mut read = std::pin::pin!(read);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match read.as_mut().poll(&mut cx) {
        Poll::Ready(record) => record.unwrap(),
        Poll::Pending => panic!("the memory store waited"),
    }
}

/// `operation`, or a timeout if it takes longer than a random cut, as the
/// engine's store timeout would cut it.
async fn cut_short<T>(
    operation: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let cut = Duration::from_micros(200 + random_below(3000));
    tokio::time::timeout(cut, operation)
        .await
        .unwrap_or(Err(StoreError::Timeout(cut)))
}

struct Checker {
    durable: Unreliable,
    clock: ManualClock,
    violations: Mutex<Vec<String>>,
    replays: AtomicU64,
    acquired: AtomicU64,
    completed: AtomicU64,
}

impl Checker {
    /// A replay of `record` for `key` (by claim or get) must be of a body
    /// the durable store accepted and, while the tier treats it as live,
    /// the durable store must hold that same record.
    fn replayed(&self, key: &RecordKey, record: &Completed, how: &str) {
        self.replays.fetch_add(1, Ordering::Relaxed);
        let body = record.response.body.clone().unwrap();
        let accepted = self.durable.accepted.lock().unwrap();
        let known = accepted
            .get(key)
            .is_some_and(|bodies| bodies.contains(&body));
        drop(accepted);
        if !known {
            self.violation(format!("{how}: replayed {body:?}, never accepted"));
        }
        // Read the durable copy first, the time after: a record still live
        // by then was live when the durable store was read.
        let durable = durable_now(&self.durable.inner, key);
        let now = self.clock.now_millis();
        if record.expires_at > now {
            match durable {
                Some(Record::Completed(held)) if held.response.body == record.response.body => {}
                other => self.violation(format!(
                    "{how}: replayed {body:?} live until {} (now {now}), durable holds {other:?}",
                    record.expires_at
                )),
            }
        }
    }

    fn violation(&self, violation: String) {
        self.violations.lock().unwrap().push(violation);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiers_never_replay_what_the_durable_store_does_not_hold() {
    let clock = ManualClock::starting_now();
    let durable = Unreliable {
        inner: MemoryStore::builder().clock(clock.clone()).build(),
        accepted: Arc::default(),
    };
    let tiers: Arc<Vec<Tiered<Unreliable>>> = Arc::new(
        (0..TIERS)
            .map(|_| {
                Tiered::builder(durable.clone())
                    .clock(clock.clone())
                    .max_bytes(64 * 1024)
                    .build()
            })
            .collect(),
    );
    let checker = Arc::new(Checker {
        durable,
        clock: clock.clone(),
        violations: Mutex::default(),
        replays: AtomicU64::new(0),
        acquired: AtomicU64::new(0),
        completed: AtomicU64::new(0),
    });
    let executions = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..WORKERS {
        let (tiers, checker, clock) = (tiers.clone(), checker.clone(), clock.clone());
        let executions = executions.clone();
        workers.spawn(async move {
            for _ in 0..ROUNDS {
                // Leases and TTLs of tens of milliseconds lapse and expire
                // as the workers move the clock.
                clock.advance(Duration::from_millis(random_below(3)));
                tokio::task::yield_now().await;
                let tier = &tiers[random_below(TIERS as u64) as usize];
                let key = key(random_below(KEYS));
                if percent(20) {
                    if let Ok(Some(Record::Completed(record))) = tier.get(&key).await {
                        checker.replayed(&key, &record, "get");
                    }
                    continue;
                }
                let fingerprint = Fingerprint::from_bytes([1; 32]);
                let lease = Duration::from_millis(20 + random_below(40));
                let ttl = Duration::from_millis(10 + random_below(200));
                let token = match cut_short(tier.claim(&key, fingerprint, lease)).await {
                    Ok(Claim::Acquired(token)) => token,
                    Ok(Claim::Completed(record)) => {
                        checker.replayed(&key, &record, "claim");
                        continue;
                    }
                    _ => continue,
                };
                checker.acquired.fetch_add(1, Ordering::Relaxed);
                let run = executions.fetch_add(1, Ordering::SeqCst);
                late().await;
                if percent(20) {
                    let _ = tier.release(&key, token).await;
                    continue;
                }
                let response = StoredResponse::new(
                    StatusCode::OK,
                    Vec::new(),
                    Some(Bytes::from(format!("worker {worker} run {run}"))),
                );
                // As the engine does: tried again after an error, not
                // after a lost lease.
                for _ in 0..3 {
                    let completing = tier.complete(&key, token, response.clone(), ttl);
                    match cut_short(completing).await {
                        Ok(()) => {
                            checker.completed.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(StoreError::LeaseLost) => break,
                        Err(_) => {}
                    }
                }
            }
        });
    }
    while let Some(joined) = workers.join_next().await {
        joined.expect("a worker panicked");
    }
    let violations = checker.violations.lock().unwrap();
    assert!(
        violations.is_empty(),
        "{} violations, the first: {:#?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    let replays = checker.replays.load(Ordering::Relaxed);
    let acquired = checker.acquired.load(Ordering::Relaxed);
    let completed = checker.completed.load(Ordering::Relaxed);
    assert!(
        replays > 1000 && acquired > 100 && completed > 50,
        "too little happened to tell: {replays} replays, {acquired} claims acquired, {completed} completed"
    );
}

/// Instances with a memory tier each, over one durable store, answer many
/// concurrent requests of a few keys: each key's handler runs once (no
/// lease lapses here), and every success carries that run's response.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_with_their_own_tiers_run_each_key_once() {
    use axum::Router;
    use axum::body::Body;
    use axum::extract::State;
    use axum::response::Response;
    use axum::routing::post;
    use http_body_util::BodyExt;
    use idempotent_core::{Endpoint, Idempotency, IdempotentRequest};
    use tower::ServiceExt;

    type Runs = Arc<Mutex<HashMap<String, u64>>>;

    async fn pay(
        State(runs): State<Runs>,
        idem: IdempotentRequest,
        axum::Json(input): axum::Json<serde_json::Value>,
    ) -> Response {
        let endpoint = Endpoint::new("pay");
        let fingerprint = endpoint.fingerprint(&input);
        idem.run(&endpoint, fingerprint, async move {
            let key = input["key"].as_str().unwrap().to_owned();
            let run = {
                let mut runs = runs.lock().unwrap();
                let count = runs.entry(key.clone()).or_default();
                *count += 1;
                *count
            };
            late().await;
            (
                StatusCode::CREATED,
                format!("{key} run {run} {}", rand::random::<u64>()),
            )
        })
        .await
    }

    let clock = ManualClock::starting_now();
    let durable = Unreliable {
        inner: MemoryStore::builder().clock(clock.clone()).build(),
        accepted: Arc::default(),
    };
    let runs: Runs = Arc::default();
    let apps: Vec<Router> = (0..TIERS)
        .map(|_| {
            let tier = Tiered::builder(durable.clone())
                .clock(clock.clone())
                .build();
            Router::new()
                .route("/pay", post(pay))
                .with_state(runs.clone())
                .layer(Idempotency::new(tier))
        })
        .collect();
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..600 {
        let app = apps[random_below(TIERS as u64) as usize].clone();
        let key = format!("key-{}", random_below(KEYS * 4));
        requests.spawn(async move {
            let request = http::Request::post("/pay")
                .header("content-type", "application/json")
                .header("x-api-key", "caller-1")
                .header("idempotency-key", key.as_str())
                .body(Body::from(serde_json::json!({ "key": key }).to_string()))
                .unwrap();
            let response = app.oneshot(request).await.unwrap();
            let status = response.status();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            (key, status, body)
        });
        tokio::task::yield_now().await;
    }
    let mut bodies: HashMap<String, HashSet<Bytes>> = HashMap::new();
    while let Some(joined) = requests.join_next().await {
        let (key, status, body) = joined.unwrap();
        assert!(
            [
                StatusCode::CREATED,
                StatusCode::CONFLICT,
                StatusCode::SERVICE_UNAVAILABLE
            ]
            .contains(&status),
            "{key}: {status} {body:?}"
        );
        if status == StatusCode::CREATED {
            bodies.entry(key).or_default().insert(body);
        }
    }
    for (key, count) in runs.lock().unwrap().iter() {
        assert_eq!(*count, 1, "{key} ran {count} times");
    }
    for (key, seen) in &bodies {
        assert_eq!(
            seen.len(),
            1,
            "{key} answered with different responses: {seen:?}"
        );
    }
    assert!(bodies.len() > 1, "too few keys succeeded: {bodies:?}");
}
