//! The engine where store calls arrive late: a renewal that reaches the
//! store after its run has settled, a claim applied by a store whose
//! answer came too late and is confirmed before its handler runs (and a
//! request dropped meanwhile), and the overlapping renewals of a running
//! handler that answer late, out of order or never.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use idempotent_core::record::{Claim, LeaseToken, RecordKey, StoredResponse};
use idempotent_core::store::{MemoryStore, Store, StoreError, Tiered};
use idempotent_core::{Endpoint, Fingerprint, Idempotency, IdempotentRequest};
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};
use tower::ServiceExt;

use crate::events;
use crate::forwarding;
use events::Events;
use forwarding::{Forwarding, Hooks};

/// A clock that follows tokio's paused clock, so leases lapse as the test
/// sleeps.
#[derive(Debug, Clone)]
struct TokioClock(tokio::time::Instant);

impl idempotent_core::clock::Clock for TokioClock {
    fn now_millis(&self) -> u64 {
        1_000_000 + u64::try_from(self.0.elapsed().as_millis()).unwrap()
    }
}

fn memory_on_tokio_time() -> MemoryStore {
    MemoryStore::builder()
        .clock(TokioClock(tokio::time::Instant::now()))
        .build()
}

/// The handler: counts its runs, waits at `gate` if it has one, answers
/// `status`.
#[derive(Clone)]
struct Handler {
    runs: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    started: Arc<Notify>,
    status: StatusCode,
}

impl Handler {
    fn gated(status: StatusCode) -> Self {
        Self {
            runs: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            started: Arc::default(),
            status,
        }
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

async fn pay(
    State((handler, endpoint)): State<(Handler, Endpoint)>,
    idem: IdempotentRequest,
    Json(input): Json<Value>,
) -> Response {
    let fingerprint = endpoint.fingerprint(&input);
    idem.run(&endpoint, fingerprint, async move {
        let run = handler.runs.fetch_add(1, Ordering::SeqCst) + 1;
        handler.started.notify_one();
        let _permit = handler.gate.acquire().await.expect("gate open");
        (handler.status, Json(json!({ "run": run }))).into_response()
    })
    .await
}

fn app(store: impl Store, handler: &Handler, endpoint: Endpoint) -> Router {
    let idempotency = Idempotency::builder(store)
        .store_timeout(Duration::from_secs(2))
        .build();
    Router::new()
        .route("/pay", post(pay))
        .with_state((handler.clone(), endpoint))
        .layer(idempotency)
}

/// Status, whether replayed, and the run the body names.
async fn send(app: &Router) -> (StatusCode, bool, Value) {
    send_with_key(app, "k").await
}

/// [`send`] under `key`.
async fn send_with_key(app: &Router, key: &str) -> (StatusCode, bool, Value) {
    let request = Request::post("/pay")
        .header("content-type", "application/json")
        .header("x-api-key", "caller-1")
        .header("idempotency-key", key)
        .body(Body::from(json!({"amount": 10}).to_string()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let replayed = parts.headers.contains_key("idempotent-replayed");
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status, replayed, json["run"].clone())
}

// ===== a memory store whose calls are answered late =====

/// When a [`LateStore`] applies and answers the calls of one operation.
#[derive(Default)]
enum Timing {
    /// Each call applied and answered at once.
    #[default]
    AtOnce,
    /// Call `nth` (counting from 0) applied at once but answered only
    /// `after` later, as over a network that stalled after the request
    /// went out; nothing undoes it. The others at once.
    AnsweredLate { nth: usize, after: Duration },
    /// Call `nth` never answered and never applied, as by a store stalled
    /// for a moment. The others at once.
    Hangs { nth: usize },
    /// No call ever answered or applied, as by a store that stalled for
    /// good.
    NeverAnswered,
    /// Each call applied and answered only `after` later, as by a store
    /// whose statements wait their turn for a connection: one given up
    /// before its turn is never applied.
    AppliedLate(Duration),
    /// Each call reaching the store only once the test adds a permit: it
    /// is sent on a task of its own, as a request already on the wire is,
    /// so giving up the call does not stop it.
    ArrivesWhenOpened(Arc<Semaphore>),
}

/// The calls of one operation: their [`Timing`], how many were sent and
/// how many the store applied.
#[derive(Default)]
struct Calls {
    timing: Timing,
    sent: AtomicUsize,
    applied: AtomicUsize,
    /// Sent and neither answered nor given up yet, and the most at once.
    under_way: AtomicUsize,
    most_under_way: AtomicUsize,
}

/// Counts a call under way until it is answered or given up.
struct UnderWay<'a>(&'a Calls);

impl<'a> UnderWay<'a> {
    fn count(calls: &'a Calls) -> Self {
        let now = calls.under_way.fetch_add(1, Ordering::SeqCst) + 1;
        calls.most_under_way.fetch_max(now, Ordering::SeqCst);
        Self(calls)
    }
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.0.under_way.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Calls {
    /// Shared, so that every clone of the store counts the same calls.
    fn timed(timing: Timing) -> Arc<Self> {
        Arc::new(Self {
            timing,
            ..Self::default()
        })
    }

    fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    fn applied(&self) -> usize {
        self.applied.load(Ordering::SeqCst)
    }

    fn most_under_way(&self) -> usize {
        self.most_under_way.load(Ordering::SeqCst)
    }

    /// Counts `call` as sent, then applies and answers it as the timing
    /// says. `call` owns what it needs, so that it can go on a task of its
    /// own.
    async fn answer<T: Send + 'static>(
        self: &Arc<Self>,
        call: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let nth = self.sent.fetch_add(1, Ordering::SeqCst);
        let _under_way = UnderWay::count(self);
        match &self.timing {
            Timing::AtOnce => self.apply(call).await,
            Timing::AnsweredLate { nth: late, after } => {
                let answer = self.apply(call).await;
                if nth == *late {
                    tokio::time::sleep(*after).await;
                }
                answer
            }
            Timing::Hangs { nth: hangs } => {
                if nth == *hangs {
                    std::future::pending::<()>().await;
                }
                self.apply(call).await
            }
            Timing::NeverAnswered => std::future::pending().await,
            Timing::AppliedLate(after) => {
                tokio::time::sleep(*after).await;
                self.apply(call).await
            }
            Timing::ArrivesWhenOpened(arrive) => {
                let (calls, arrive) = (Arc::clone(self), Arc::clone(arrive));
                let on_the_wire = tokio::spawn(async move {
                    let _permit = arrive.acquire().await.expect("open");
                    calls.apply(call).await
                });
                on_the_wire.await.expect("the call's task")
            }
        }
    }

    async fn apply<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let answer = call.await;
        if answer.is_ok() {
            self.applied.fetch_add(1, Ordering::SeqCst);
        }
        answer
    }
}

/// The calls of a [`LateStore`]: its claims, renewals and completions are
/// each applied and answered as their [`Timing`] says; releases and
/// reads are answered at once.
#[derive(Clone)]
struct LateCalls {
    inner: MemoryStore,
    claims: Arc<Calls>,
    renewals: Arc<Calls>,
    completions: Arc<Calls>,
}

/// A memory store whose calls are answered as [`LateCalls`] says.
type LateStore = Forwarding<LateCalls>;

impl LateStore {
    /// A fresh memory store on tokio's time, every call answered at once.
    fn new() -> Self {
        Self::over(memory_on_tokio_time())
    }

    /// `inner`, every call answered at once.
    fn over(inner: MemoryStore) -> Self {
        Forwarding(LateCalls {
            inner,
            claims: Arc::default(),
            renewals: Arc::default(),
            completions: Arc::default(),
        })
    }

    fn with_claims(self, timing: Timing) -> Self {
        Forwarding(LateCalls {
            claims: Calls::timed(timing),
            ..self.0
        })
    }

    fn with_renewals(self, timing: Timing) -> Self {
        Forwarding(LateCalls {
            renewals: Calls::timed(timing),
            ..self.0
        })
    }

    fn with_completions(self, timing: Timing) -> Self {
        Forwarding(LateCalls {
            completions: Calls::timed(timing),
            ..self.0
        })
    }
}

impl Hooks for LateCalls {
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
        let (store, key) = (self.inner.clone(), key.clone());
        let call = async move { store.claim(&key, fingerprint, lease).await };
        self.claims.answer(call).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let (store, key) = (self.inner.clone(), key.clone());
        let call = async move { store.renew(&key, token, lease).await };
        self.renewals.answer(call).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let (store, key) = (self.inner.clone(), key.clone());
        let call = async move { store.complete(&key, token, response, ttl).await };
        self.completions.answer(call).await
    }
}

// ===== a renewal that arrives after its run settled =====

/// Runs the first request with a 3 s lease until a renewal is on the
/// wire, then lets the handler answer `status`. Once the request has its
/// answer, its renewals reach the store, which must apply none of them.
async fn renewals_arrive_after_the_answer(status: StatusCode) -> (Router, Handler) {
    let arrive = Arc::new(Semaphore::new(0));
    let store = LateStore::new().with_renewals(Timing::ArrivesWhenOpened(Arc::clone(&arrive)));
    let handler = Handler::gated(status);
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(3));
    let app = app(store.clone(), &handler, endpoint);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app).await }
    });
    handler.started.notified().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(store.renewals.sent() > 0, "a renewal was sent");
    handler.gate.add_permits(1);
    let (answered, _, _) = first.await.unwrap();
    assert_eq!(answered, status);

    arrive.add_permits(10);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(store.renewals.applied(), 0);
    (app, handler)
}

#[tokio::test(start_paused = true)]
async fn a_renewal_that_arrives_after_the_record_is_stored_changes_nothing() {
    let (app, handler) = renewals_arrive_after_the_answer(StatusCode::CREATED).await;
    assert_eq!(send(&app).await, (StatusCode::CREATED, true, json!(1)));
    assert_eq!(handler.runs(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_renewal_that_arrives_after_the_key_is_released_does_not_hold_it_again() {
    let (app, handler) = renewals_arrive_after_the_answer(StatusCode::SERVICE_UNAVAILABLE).await;
    // The retry runs at once: no lease was revived under the released key.
    handler.gate.add_permits(1);
    let retry = tokio::time::timeout(Duration::from_millis(100), send(&app)).await;
    assert_eq!(
        retry.expect("answered at once"),
        (StatusCode::SERVICE_UNAVAILABLE, false, json!(2))
    );
}

// ===== a claim applied, its answer lost =====

/// The first claim is applied but answered too late: 503, nothing ran.
/// Its lease has no holder, so retries get 409 until it lapses; then one
/// retry runs the handler, once.
async fn a_claim_answered_too_late_holds_the_key_for_one_lease(store: impl Store) {
    let handler = Handler::gated(StatusCode::CREATED);
    handler.gate.add_permits(10);
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(10));
    let app = app(store, &handler, endpoint);

    let (first, _, _) = send(&app).await;
    let (held, _, _) = send(&app).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let retried = send(&app).await;
    let replayed = send(&app).await;

    assert_eq!(first, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(held, StatusCode::CONFLICT);
    assert_eq!(retried, (StatusCode::CREATED, false, json!(1)));
    assert_eq!(replayed, (StatusCode::CREATED, true, json!(1)));
    assert_eq!(handler.runs(), 1);
}

/// The first claim answered after 5 s, past the store timeout of 2 s.
const FIRST_CLAIM_TOO_LATE: Timing = Timing::AnsweredLate {
    nth: 0,
    after: Duration::from_secs(5),
};

#[tokio::test(start_paused = true)]
async fn a_claim_answered_too_late_holds_the_key_for_one_lease_and_then_runs_once() {
    let store = LateStore::new().with_claims(FIRST_CLAIM_TOO_LATE);
    a_claim_answered_too_late_holds_the_key_for_one_lease(store).await;
}

#[tokio::test(start_paused = true)]
async fn a_claim_answered_too_late_behind_a_tiered_cache_holds_the_key_for_one_lease() {
    let clock = TokioClock(tokio::time::Instant::now());
    let durable = LateStore::over(MemoryStore::builder().clock(clock.clone()).build())
        .with_claims(FIRST_CLAIM_TOO_LATE);
    let tiered = Tiered::builder(durable).clock(clock).build();
    a_claim_answered_too_late_holds_the_key_for_one_lease(tiered).await;
}

// ===== a claim answered late, within the store timeout =====

/// Sends the request under `key` on a task of its own.
fn spawn_send(
    app: &Router,
    key: &'static str,
) -> tokio::task::JoinHandle<(StatusCode, bool, Value)> {
    let app = app.clone();
    tokio::spawn(async move { send_with_key(&app, key).await })
}

/// Asserts that a duplicate under `key` is answered 409 within a second:
/// one that took the key over waits at the handler's gate instead.
async fn assert_still_held(app: &Router, key: &str) {
    let duplicate = tokio::time::timeout(Duration::from_secs(1), send_with_key(app, key)).await;
    assert_eq!(
        duplicate.map(|(status, _, _)| status).ok(),
        Some(StatusCode::CONFLICT),
        "the lease lapsed under the running handler and the duplicate took the key over"
    );
}

/// Sends a request to `endpoint` on `store`; once the handler runs,
/// sleeps `running` and asserts that the key is still held, then lets the
/// handler answer: it ran once.
async fn assert_held_while_running(store: impl Store, endpoint: Endpoint, running: Duration) {
    let handler = Handler::gated(StatusCode::CREATED);
    let app = app(store, &handler, endpoint);
    let first = spawn_send(&app, "k");
    handler.started.notified().await;
    tokio::time::sleep(running).await;
    assert_still_held(&app, "k").await;

    handler.gate.add_permits(2);
    assert_eq!(first.await.unwrap(), (StatusCode::CREATED, false, json!(1)));
    assert_eq!(handler.runs(), 1);
}

/// The store starts a claim's lease when it applies the claim; its answer
/// can come most of a store timeout later. A lease of 2 s whose claim was
/// answered after 1.8 s must still be renewed before the 2 s are up.
#[tokio::test(start_paused = true)]
async fn a_lease_whose_claim_was_answered_late_is_renewed_before_it_lapses() {
    let store = LateStore::new().with_claims(Timing::AnsweredLate {
        nth: 0,
        after: Duration::from_millis(1_800),
    });
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(2));
    // Past the 2 s the store gave the lease when it applied the claim.
    assert_held_while_running(store, endpoint, Duration::from_millis(300)).await;
}

/// The same while another claim of that lease keeps the runtime's watcher
/// looking every third of a second: the late claim falls due before its
/// next look, which must not wait for it.
#[tokio::test(start_paused = true)]
async fn a_late_claim_is_renewed_in_time_beside_claims_already_watched() {
    let store = LateStore::new().with_claims(Timing::AnsweredLate {
        nth: 1,
        after: Duration::from_millis(1_900),
    });
    let handler = Handler::gated(StatusCode::CREATED);
    let app = app(
        store,
        &handler,
        Endpoint::new("pay").lease(Duration::from_secs(2)),
    );
    let watched = spawn_send(&app, "a");
    handler.started.notified().await;
    // Sent at 0.15 s, answered at 2.05 s, just after the watcher looked
    // at 2 s; its lease ends at 2.15 s, before the look at 2.33 s.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let late = spawn_send(&app, "b");
    handler.started.notified().await;

    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_still_held(&app, "b").await;

    handler.gate.add_permits(3);
    assert_eq!(watched.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(late.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(handler.runs(), 2);
}

/// A claim answered just under a third of its lease late is not renewed
/// before the handler runs, so its first renewal must fall due a third of
/// the lease after the claim was sent: counted from the answer, a renewal
/// that takes 0.6 s (well within the store timeout) lands after the lease
/// lapsed at 1 s, and a duplicate at 1.025 s takes the key over.
#[tokio::test(start_paused = true)]
async fn a_claim_answered_just_under_a_third_of_its_lease_late_is_renewed_in_time() {
    let store = LateStore::new()
        .with_claims(Timing::AnsweredLate {
            nth: 0,
            after: Duration::from_millis(300),
        })
        .with_renewals(Timing::AppliedLate(Duration::from_millis(600)));
    // From the answer at 0.3 s to 1.025 s.
    assert_held_while_running(store, one_second_lease(), Duration::from_millis(725)).await;
}

// ===== a claim answered after its lease lapsed =====

/// The endpoint with the smallest lease there is, a second, which the
/// default store timeout of 2 s outlasts: a claim may be answered after
/// the lease it took has lapsed.
fn one_second_lease() -> Endpoint {
    Endpoint::new("pay").lease(Duration::from_secs(1))
}

/// The app of [`app`] with [`one_second_lease`].
fn app_with_a_one_second_lease(store: impl Store, handler: &Handler, wait: bool) -> Router {
    let endpoint = if wait {
        one_second_lease().wait(Duration::from_secs(10))
    } else {
        one_second_lease()
    };
    app(store, handler, endpoint)
}

/// The first claim answered at 1.5 s, its one-second lease having lapsed.
const FIRST_CLAIM_AFTER_ITS_LEASE: Timing = Timing::AnsweredLate {
    nth: 0,
    after: Duration::from_millis(1_500),
};

/// The first claim is answered at 1.5 s, its lease having lapsed at 1 s;
/// a duplicate sent at 1.2 s took the key over and runs the handler.
/// Returns both requests once both are answered, and the handler.
async fn a_duplicate_takes_over_before_a_late_answer(
    wait: bool,
) -> (
    (StatusCode, bool, Value),
    (StatusCode, bool, Value),
    Handler,
) {
    let store = LateStore::new().with_claims(FIRST_CLAIM_AFTER_ITS_LEASE);
    let handler = Handler::gated(StatusCode::CREATED);
    let app = app_with_a_one_second_lease(store, &handler, wait);
    let late = spawn_send(&app, "k");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let duplicate = spawn_send(&app, "k");
    handler.started.notified().await;
    // Past the late answer, at 1.5 s.
    tokio::time::sleep(Duration::from_millis(500)).await;
    handler.gate.add_permits(2);
    let duplicate = duplicate.await.unwrap();
    (late.await.unwrap(), duplicate, handler)
}

/// The late answer says the key was acquired, but another request holds
/// it now: running the handler on that answer would run it twice.
#[tokio::test(start_paused = true)]
async fn a_claim_answered_after_a_takeover_does_not_run_the_handler_again() {
    let (late, duplicate, handler) = a_duplicate_takes_over_before_a_late_answer(false).await;
    assert_eq!(
        handler.runs(),
        1,
        "the handler ran on a lease that had lapsed and been taken over"
    );
    assert_eq!(duplicate, (StatusCode::CREATED, false, json!(1)));
    assert_eq!(late.0, StatusCode::CONFLICT);
}

/// On a `wait` endpoint the late request waits for the request that took
/// the key over, and replays its response.
#[tokio::test(start_paused = true)]
async fn a_claim_answered_after_a_takeover_waits_for_it_on_a_wait_endpoint() {
    let (late, duplicate, handler) = a_duplicate_takes_over_before_a_late_answer(true).await;
    assert_eq!(handler.runs(), 1);
    assert_eq!(duplicate, (StatusCode::CREATED, false, json!(1)));
    assert_eq!(late, (StatusCode::CREATED, true, json!(1)));
}

/// Nobody took the key over: the late answer's lease is renewed before
/// the handler runs, once, and stays held while it runs.
#[tokio::test(start_paused = true)]
async fn a_claim_answered_after_its_lease_lapsed_runs_once_and_holds_the_key() {
    let store = LateStore::new().with_claims(FIRST_CLAIM_AFTER_ITS_LEASE);
    assert_held_while_running(store, one_second_lease(), Duration::from_millis(1_100)).await;
}

// ===== a request dropped while its late claim is confirmed =====

/// The claim is answered at 0.5 s, after its first renewal fell due, so
/// the engine renews it before running the handler; the client goes away
/// at 0.6 s, while that renewal is on its way. Nothing ran, so the key is
/// let go at once: a retry runs the handler instead of getting 409 until
/// the lease lapses.
#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_its_late_claim_is_confirmed_lets_the_key_go() {
    let store = LateStore::new()
        .with_claims(Timing::AnsweredLate {
            nth: 0,
            after: Duration::from_millis(500),
        })
        .with_renewals(Timing::AppliedLate(Duration::from_millis(200)));
    let handler = Handler::gated(StatusCode::CREATED);
    handler.gate.add_permits(10);
    let app = app_with_a_one_second_lease(store, &handler, false);

    let dropped = spawn_send(&app, "k");
    tokio::time::sleep(Duration::from_millis(600)).await;
    dropped.abort();
    assert!(dropped.await.unwrap_err().is_cancelled());
    assert_eq!(handler.runs(), 0);

    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        send(&app).await,
        (StatusCode::CREATED, false, json!(1)),
        "the dropped request's claim held the key until its lease lapsed"
    );
    assert_eq!(handler.runs(), 1);
}

/// The first claim is answered at 0.5 s, after its first renewal fell
/// due; that renewal takes a minute, and is given up at a third of the
/// lease. The request is refused with 503, nothing ran, and the operator
/// reads one event that says so, not two.
#[tokio::test(start_paused = true)]
async fn a_late_claim_whose_renewal_hangs_is_refused_with_one_event() {
    let (events, _recording) = Events::on_this_thread();
    let store = LateStore::new()
        .with_claims(Timing::AnsweredLate {
            nth: 0,
            after: Duration::from_millis(500),
        })
        .with_renewals(Timing::AppliedLate(Duration::from_secs(60)));
    let handler = Handler::gated(StatusCode::CREATED);
    let app = app_with_a_one_second_lease(store, &handler, false);

    let (status, _, _) = send(&app).await;

    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(handler.runs(), 0);
    let warned = events.messages_at_least(tracing::Level::WARN);
    assert_eq!(warned.len(), 1, "one refusal, logged as: {warned:?}");
}

/// A claim answered late is confirmed by a renewal before its handler
/// runs; a request dropped meanwhile lets the claim go on a task of its
/// own. A `drain` called while that request is still held (a server's
/// graceful shutdown can return just before its connection drops the
/// request) waits for it, and for the claim's release.
#[tokio::test(start_paused = true)]
async fn drain_waits_for_a_late_claim_still_being_confirmed() {
    let store = LateStore::new()
        .with_claims(Timing::AnsweredLate {
            nth: 0,
            after: Duration::from_millis(500),
        })
        .with_renewals(Timing::Hangs { nth: 0 });
    let handler = Handler::gated(StatusCode::CREATED);
    handler.gate.add_permits(1);
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(1));
    let idempotency = Idempotency::builder(store)
        .store_timeout(Duration::from_secs(2))
        .build();
    let app = Router::new()
        .route("/pay", post(pay))
        .with_state((handler.clone(), endpoint))
        .layer(idempotency.clone());
    let first = spawn_send(&app, "k");
    // The claim is answered at 0.5 s; its renewal, due by a third of the
    // lease, is under way until 0.83 s.
    tokio::time::sleep(Duration::from_millis(600)).await;

    let drain = tokio::spawn(async move { idempotency.drain().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !drain.is_finished(),
        "drain returned while a claimed request was still held"
    );
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .expect("drain returns once the claim is let go")
        .unwrap();

    assert_eq!(send(&app).await, (StatusCode::CREATED, false, json!(1)));
    assert_eq!(handler.runs(), 1);
}

// ===== renewals that answer out of order, or never =====

/// The renewal sent at a third of a second hangs until the store timeout,
/// 2 s later; the ones sent after it are applied at once and keep the
/// lease. Its failure, at 2.3 s, comes after later renewals held the
/// lease: no outage, nothing for the operator to look at.
#[tokio::test(start_paused = true)]
async fn a_renewal_outrun_by_a_later_one_warns_of_no_outage() {
    let (events, _recording) = Events::on_this_thread();
    let store = LateStore::new().with_renewals(Timing::Hangs { nth: 0 });
    let handler = Handler::gated(StatusCode::CREATED);
    let app = app_with_a_one_second_lease(store, &handler, false);
    let first = spawn_send(&app, "k");
    handler.started.notified().await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    handler.gate.add_permits(1);

    assert_eq!(first.await.unwrap(), (StatusCode::CREATED, false, json!(1)));
    let logged = events.messages_at_least(tracing::Level::INFO);
    assert!(
        logged.is_empty(),
        "a renewal outrun by a later one was logged: {logged:?}"
    );
}

/// Renewals overlap, and each failure brings the next one forward: against
/// a store that answers none, a one-second lease renewed every third of a
/// second with a store timeout of 2 s has at most one renewal per third of
/// a second of the timeout under way (seven), and a few more for those
/// brought forward, however long the handler runs.
#[tokio::test(start_paused = true)]
async fn renewals_against_a_store_that_never_answers_stay_bounded() {
    let store = LateStore::new().with_renewals(Timing::NeverAnswered);
    let renewals = Arc::clone(&store.renewals);
    let handler = Handler::gated(StatusCode::CREATED);
    let app = app_with_a_one_second_lease(store, &handler, false);
    let first = spawn_send(&app, "k");
    handler.started.notified().await;

    tokio::time::sleep(Duration::from_secs(60)).await;
    handler.gate.add_permits(1);

    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    let (most, sent) = (renewals.most_under_way(), renewals.sent());
    assert!(most <= 8, "{most} renewals under way at once");
    // Three a second, and a few brought forward by failures.
    assert!(sent <= 60 * 4, "{sent} renewals sent in a minute");
}

/// The runtime stalls for ten seconds (a handler that held the thread,
/// a paused VM) under a one-second lease renewed every third of a second:
/// once it runs again, one renewal goes out, not one for each of the
/// thirty renewals missed meanwhile, all at once, per claim held.
#[tokio::test(start_paused = true)]
async fn renewals_missed_while_the_runtime_stalled_are_not_all_sent_at_once() {
    // On the system clock: the lease does not lapse in the store while
    // tokio's clock jumps.
    let store = LateStore::over(MemoryStore::new());
    let renewals = Arc::clone(&store.renewals);
    let handler = Handler::gated(StatusCode::CREATED);
    let app = app_with_a_one_second_lease(store, &handler, false);
    let first = spawn_send(&app, "k");
    handler.started.notified().await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let before = renewals.sent();
    tokio::time::advance(Duration::from_secs(10)).await;
    // Every renewal due at the instant the runtime runs again is sent.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let after_the_stall = renewals.sent() - before;
    handler.gate.add_permits(1);

    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    assert_eq!(after_the_stall, 1, "renewals sent at once after the stall");
}

/// The runtime stalls for ten seconds under a one-second lease, its
/// renewals held back with it, though the store answers every one: once
/// it runs again, the operator is told that the lease lapsed before it
/// could be renewed, and why, once.
#[tokio::test(start_paused = true)]
async fn a_lease_that_lapsed_while_the_runtime_stalled_is_told_once() {
    let (events, _recording) = Events::on_this_thread();
    let store = LateStore::over(MemoryStore::new());
    let handler = Handler::gated(StatusCode::CREATED);
    let app = app_with_a_one_second_lease(store, &handler, false);
    let first = spawn_send(&app, "k");
    handler.started.notified().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(events.messages_at_least(tracing::Level::WARN).is_empty());

    tokio::time::advance(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    handler.gate.add_permits(1);

    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    let told = a_lapse_told_once(&events);
    assert!(told.contains("holding the runtime's threads"), "{told:?}");
}

/// The one warning logged, which must say that a lease lapsed before it
/// could be renewed.
#[track_caller]
fn a_lapse_told_once(events: &Events) -> String {
    let told = events.messages_at_least(tracing::Level::WARN);
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(
        told[0].contains("lapsed before it could be renewed"),
        "{told:?}"
    );
    told.into_iter().next().unwrap()
}

/// Holds the thread of its `current_thread` runtime for 1.2 s, past its
/// one-second lease, as a synchronous SDK called without
/// `block_in_place` does, before answering 201: given the lease's
/// `renewals`, once the first of them was applied, and so past the lease
/// that renewal extended; otherwise from before the first fell due.
async fn holds_the_thread(
    State(renewals): State<Option<Arc<Calls>>>,
    idem: IdempotentRequest,
    Json(input): Json<Value>,
) -> Response {
    let endpoint = one_second_lease();
    let fingerprint = endpoint.fingerprint(&input);
    let handler = async move {
        while renewals
            .as_ref()
            .is_some_and(|renewals| renewals.applied() == 0)
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        std::thread::sleep(Duration::from_millis(1_200));
        StatusCode::CREATED
    };
    idem.run(&endpoint, fingerprint, handler).await
}

/// Answers one request on `store` with [`holds_the_thread`] (given
/// `renewals`, after the first renewal) and checks that the operator was
/// told once that its lease lapsed.
async fn a_thread_held_past_the_lease_is_told_once(
    store: impl Store,
    renewals: Option<Arc<Calls>>,
) {
    let (events, _recording) = Events::on_this_thread();
    let app = Router::new()
        .route("/pay", post(holds_the_thread))
        .with_state(renewals)
        .layer(Idempotency::new(store));

    assert_eq!(send(&app).await.0, StatusCode::CREATED);

    a_lapse_told_once(&events);
}

/// The handler holds the runtime's one thread past its lease, from before
/// its first renewal fell due, and its record is stored before the
/// watcher gets to start renewing it: the lease lapsed with no renewal
/// ever sent, and the operator is told so, and why, once.
#[tokio::test]
async fn a_lease_that_lapsed_before_its_renewals_started_is_told_once() {
    a_thread_held_past_the_lease_is_told_once(MemoryStore::new(), None).await;
}

/// The handler holds the runtime's one thread past its lease once its
/// renewals have started, and its record is stored before their task
/// runs again, which then never does: the lease lapsed with no renewal
/// sent in time, and the operator is told so, and why, once.
#[tokio::test]
async fn a_lease_that_lapsed_after_its_renewals_started_is_told_once() {
    let store = LateStore::over(MemoryStore::new());
    let renewals = Arc::clone(&store.renewals);
    a_thread_held_past_the_lease_is_told_once(store, Some(renewals)).await;
}

// ===== a renewal that hangs =====

/// A 3 s lease is renewed every second, and the store timeout is 2 s: a
/// renewal that hangs must be given up and tried again before the lease
/// it extends runs out, not a whole store timeout later.
#[tokio::test(start_paused = true)]
async fn a_renewal_that_hangs_is_tried_again_before_the_lease_lapses() {
    let store = LateStore::new().with_renewals(Timing::Hangs { nth: 1 });
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(3));
    // The first renewal, at 0.5 s, holds the lease until 3.5 s; the
    // second, at 1.5 s, hangs.
    assert_held_while_running(store, endpoint, Duration::from_millis(3_600)).await;
}

// ===== renewals slower than a sixth of the lease =====

/// A one-second lease is renewed every third of a second, and each
/// renewal takes a quarter of a second, well within the store timeout:
/// a renewal given up after a sixth of the lease would never be applied,
/// and the lease would lapse under the running handler.
#[tokio::test(start_paused = true)]
async fn renewals_slower_than_a_sixth_of_the_lease_still_keep_it() {
    let store = LateStore::new().with_renewals(Timing::AppliedLate(Duration::from_millis(250)));
    assert_held_while_running(store, one_second_lease(), Duration::from_secs(2)).await;
}

// ===== a completion applied, its answer late =====

/// The completion is stored but its answer outlasts the store timeout and
/// the one-second lease; the attempt after it finds the lease gone (the
/// record replaced it). The response is stored all the same: the request
/// gets it, and a retry replays it rather than running the handler again.
#[tokio::test(start_paused = true)]
async fn a_completion_answered_after_the_store_timeout_is_kept_and_replayed() {
    let store = LateStore::new().with_completions(Timing::AnsweredLate {
        nth: 0,
        after: Duration::from_secs(5),
    });
    let handler = Handler::gated(StatusCode::CREATED);
    handler.gate.add_permits(10);
    let app = app_with_a_one_second_lease(store, &handler, false);

    assert_eq!(send(&app).await, (StatusCode::CREATED, false, json!(1)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(send(&app).await, (StatusCode::CREATED, true, json!(1)));
    assert_eq!(handler.runs(), 1);
}
