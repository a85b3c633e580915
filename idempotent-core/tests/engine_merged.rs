//! The engine where a claim answered late is confirmed with a renewal
//! before its handler runs, and where the renewals of a running handler
//! overlap: a request dropped while the claim is confirmed, and renewals
//! that answer out of order.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http_body_util::BodyExt;
use idempotent_core::record::{Claim, LeaseToken, Record, RecordKey, StoredResponse};
use idempotent_core::store::{MemoryStore, Store, StoreError};
use idempotent_core::{Endpoint, Fingerprint, Idempotency, IdempotentRequest};
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};
use tower::ServiceExt;

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

/// The events at info level or above: their level and message.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<(tracing::Level, String)>>>);

impl Events {
    /// Records the events logged on this thread (the whole runtime of a
    /// current-thread test) until the guard is dropped.
    fn record(&self) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(self.clone())
    }

    /// The messages logged at `level` or above (more severe).
    fn at_least(&self, level: tracing::Level) -> Vec<String> {
        let events = self.0.lock().unwrap();
        let severe = events.iter().filter(|(logged, _)| *logged <= level);
        severe.map(|(_, message)| message.clone()).collect()
    }
}

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl tracing::Subscriber for Events {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::INFO
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut message = Message(String::new());
        event.record(&mut message);
        let level = *event.metadata().level();
        self.0.lock().unwrap().push((level, message.0));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The handler: counts its runs, waits at `gate`, answers 201.
#[derive(Clone)]
struct Handler {
    runs: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    started: Arc<Notify>,
}

impl Handler {
    fn gated() -> Self {
        Self {
            runs: Arc::default(),
            gate: Arc::new(Semaphore::new(0)),
            started: Arc::default(),
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
        (StatusCode::CREATED, Json(json!({ "run": run }))).into_response()
    })
    .await
}

/// An app whose one endpoint has a one-second lease, the shortest there
/// is, renewed every third of a second; the store timeout is 2 s.
fn app(store: impl Store, handler: &Handler) -> Router {
    let idempotency = Idempotency::builder(store)
        .store_timeout(Duration::from_secs(2))
        .build();
    let endpoint = Endpoint::new("pay").lease(Duration::from_secs(1));
    Router::new()
        .route("/pay", post(pay))
        .with_state((handler.clone(), endpoint))
        .layer(idempotency)
}

/// Status, whether replayed, and the run the body names.
async fn send(app: &Router) -> (StatusCode, bool, Value) {
    let request = Request::post("/pay")
        .header("content-type", "application/json")
        .header("x-api-key", "caller-1")
        .header("idempotency-key", "k")
        .body(Body::from(json!({"amount": 10}).to_string()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let replayed = parts.headers.contains_key("idempotent-replayed");
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status, replayed, json["run"].clone())
}

// ===== a request dropped while its late claim is confirmed =====

/// A memory store whose first claim is applied at once but answered only
/// after `late_claim`, and whose renewals are applied only after
/// `slow_renewal`, as over a network that stalls.
struct LateClaimSlowRenewals {
    inner: MemoryStore,
    late_claim: Duration,
    slow_renewal: Duration,
    claims: AtomicUsize,
}

impl Store for LateClaimSlowRenewals {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let claimed = self.inner.claim(key, fingerprint, lease).await;
        if self.claims.fetch_add(1, Ordering::SeqCst) == 0 {
            tokio::time::sleep(self.late_claim).await;
        }
        claimed
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        tokio::time::sleep(self.slow_renewal).await;
        self.inner.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(key, token, response, ttl).await
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }
}

/// The claim is answered at 0.5 s, after its first renewal fell due, so
/// the engine renews it before running the handler; the client goes away
/// at 0.6 s, while that renewal is on its way. Nothing ran, so the key is
/// let go at once: a retry runs the handler instead of getting 409 until
/// the lease lapses.
#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_its_late_claim_is_confirmed_lets_the_key_go() {
    let store = LateClaimSlowRenewals {
        inner: memory_on_tokio_time(),
        late_claim: Duration::from_millis(500),
        slow_renewal: Duration::from_millis(200),
        claims: AtomicUsize::new(0),
    };
    let handler = Handler::gated();
    handler.gate.add_permits(10);
    let app = app(store, &handler);

    let dropped = tokio::spawn({
        let app = app.clone();
        async move { send(&app).await }
    });
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
/// due; that renewal hangs, and is given up at a third of the lease. The
/// request is refused with 503, nothing ran, and the operator reads one
/// event that says so, not two.
#[tokio::test(start_paused = true)]
async fn a_late_claim_whose_renewal_hangs_is_refused_with_one_event() {
    let events = Events::default();
    let _recording = events.record();
    let store = LateClaimSlowRenewals {
        inner: memory_on_tokio_time(),
        late_claim: Duration::from_millis(500),
        slow_renewal: Duration::from_secs(60),
        claims: AtomicUsize::new(0),
    };
    let handler = Handler::gated();
    let app = app(store, &handler);

    let (status, _, _) = send(&app).await;

    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(handler.runs(), 0);
    let warned = events.at_least(tracing::Level::WARN);
    assert_eq!(warned.len(), 1, "one refusal, logged as: {warned:?}");
}

// ===== a renewal that fails after a later one was applied =====

/// A memory store one of whose renewals (counting from 0) hangs until
/// the engine gives it up, while the ones after it are applied at once.
struct OneRenewalHangs {
    inner: MemoryStore,
    hangs: usize,
    renewals: AtomicUsize,
}

impl Store for OneRenewalHangs {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.inner.claim(key, fingerprint, lease).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        if self.renewals.fetch_add(1, Ordering::SeqCst) == self.hangs {
            std::future::pending::<()>().await;
        }
        self.inner.renew(key, token, lease).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(key, token, response, ttl).await
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }
}

/// The renewal sent at a third of a second hangs until the store timeout,
/// 2 s later; the ones sent after it are applied at once and keep the
/// lease. Its failure, at 2.3 s, comes after later renewals held the
/// lease: no outage, nothing for the operator to look at.
#[tokio::test(start_paused = true)]
async fn a_renewal_outrun_by_a_later_one_warns_of_no_outage() {
    let events = Events::default();
    let _recording = events.record();
    let store = OneRenewalHangs {
        inner: memory_on_tokio_time(),
        hangs: 0,
        renewals: AtomicUsize::new(0),
    };
    let handler = Handler::gated();
    let app = app(store, &handler);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app).await }
    });
    handler.started.notified().await;

    tokio::time::sleep(Duration::from_secs(3)).await;
    handler.gate.add_permits(1);

    assert_eq!(first.await.unwrap(), (StatusCode::CREATED, false, json!(1)));
    let logged = events.at_least(tracing::Level::INFO);
    assert!(
        logged.is_empty(),
        "a renewal outrun by a later one was logged: {logged:?}"
    );
}

// ===== a store whose renewals all hang =====

/// A memory store whose renewals never answer, counting how many are
/// under way at once.
#[derive(Default)]
struct RenewalsHang {
    inner: MemoryStore,
    under_way: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    sent: Arc<AtomicUsize>,
}

/// Counts a renewal under way until it is given up.
struct UnderWay(Arc<AtomicUsize>);

impl Drop for UnderWay {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Store for RenewalsHang {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.inner.claim(key, fingerprint, lease).await
    }

    async fn renew(&self, _: &RecordKey, _: LeaseToken, _: Duration) -> Result<(), StoreError> {
        self.sent.fetch_add(1, Ordering::SeqCst);
        let now = self.under_way.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        let _under_way = UnderWay(Arc::clone(&self.under_way));
        std::future::pending().await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.inner.complete(key, token, response, ttl).await
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.inner.release(key, token).await
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        self.inner.get(key).await
    }
}

/// Renewals overlap, and each failure brings the next one forward: against
/// a store that answers none, a one-second lease renewed every third of a
/// second with a store timeout of 2 s has at most one renewal per third of
/// a second of the timeout under way (seven), and a few more for those
/// brought forward, however long the handler runs.
#[tokio::test(start_paused = true)]
async fn renewals_against_a_store_that_never_answers_stay_bounded() {
    let store = RenewalsHang::default();
    let (most, sent) = (Arc::clone(&store.most), Arc::clone(&store.sent));
    let handler = Handler::gated();
    let app = app(store, &handler);
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app).await }
    });
    handler.started.notified().await;

    tokio::time::sleep(Duration::from_secs(60)).await;
    handler.gate.add_permits(1);

    assert_eq!(first.await.unwrap().0, StatusCode::CREATED);
    let (most, sent) = (most.load(Ordering::SeqCst), sent.load(Ordering::SeqCst));
    assert!(most <= 8, "{most} renewals under way at once");
    // Three a second, and a few brought forward by failures.
    assert!(sent <= 60 * 4, "{sent} renewals sent in a minute");
}
