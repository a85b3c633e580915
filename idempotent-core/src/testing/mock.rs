//! A store for unit tests of idempotent handlers: time that moves only when
//! told to, a log of what the engine asked, and failures on demand.

use std::collections::VecDeque;
use std::fmt;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::StatusCode;

use crate::clock::{Clock, ManualClock, SharedClock, millis};
use crate::fingerprint::Fingerprint;
use crate::key::IdempotencyKey;
use crate::record::{Claim, CodecError, InFlight, LeaseToken, Record, RecordKey, StoredResponse};
use crate::scope::ScopeDigest;
use crate::store::{MemoryStore, Store, StoreError};
use crate::{Idempotency, IdempotencyBuilder};

/// Where the mock's clock starts: 2025-01-01T00:00:00Z, so records carry
/// realistic timestamps.
const EPOCH_2025_MILLIS: u64 = 1_735_689_600_000;

/// An in-memory [`Store`] for handler tests (feature `test-util`).
///
/// - Time comes from a [`ManualClock`]: [`advance`](Self::advance) it past a
///   TTL or a lease instead of sleeping. It is not tokio's clock: under
///   `tokio::time::pause` (`#[tokio::test(start_paused = true)]`),
///   `tokio::time::advance` and sleeps move the engine's own timers (lease
///   renewals, the store timeout, a `wait` endpoint's pauses,
///   [`set_delay`](Self::set_delay)) at no cost in real time, but a record
///   expires, and a lease lapses, only when [`advance`](Self::advance)
///   moves the store's clock.
/// - Every call the engine makes is logged as an [`Operation`]; assert on
///   them with [`operations`](Self::operations), [`count`](Self::count) or
///   [`assert_executed_once`](Self::assert_executed_once).
/// - Faults are injected with [`fail_next`](Self::fail_next),
///   [`fail_next_call`](Self::fail_next_call), [`fail_every`](Self::fail_every)
///   (every call of one kind), [`fail_all`](Self::fail_all)
///   and slowed down with [`set_delay`](Self::set_delay); their `_with`
///   forms choose the class of failure, a [`Fault`] (a store down, timed
///   out, set up wrongly, or a corrupt record);
///   [`in_flight_next`](Self::in_flight_next) makes a claim find its key
///   held by a duplicate, for the `409` path.
/// - All of it is the store's, for every key: a test that shares the store
///   with tests running at once aims its faults at its own keys, and
///   counts its own runs, with [`for_key`](Self::for_key).
///
/// Clones share everything, so a test keeps one handle while the router
/// owns another.
///
// The example needs the attribute (feature `macros`).
#[cfg_attr(feature = "macros", doc = "```")]
#[cfg_attr(not(feature = "macros"), doc = "```ignore")]
/// use std::time::Duration;
///
/// use axum::{Json, Router, body::Body, http::{Request, StatusCode}, routing::post};
/// use idempotent_core::idempotent;
/// use idempotent_core::testing::{MockStore, OpKind};
/// use tower::ServiceExt;
///
/// #[idempotent(ttl = "1h", scope = "global")]
/// async fn charge(Json(amount): Json<u64>) -> (StatusCode, Json<u64>) {
///     (StatusCode::CREATED, Json(amount))
/// }
///
/// async fn send(app: &Router, key: &str, body: &str) -> StatusCode {
///     let request = Request::post("/charges")
///         .header("idempotency-key", key)
///         .header("content-type", "application/json")
///         .body(Body::from(body.to_owned()))
///         .unwrap();
///     app.clone().oneshot(request).await.unwrap().status()
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = MockStore::new();
/// let app = Router::new().route("/charges", post(charge)).layer(store.layer());
///
/// assert_eq!(send(&app, "k1", "100").await, StatusCode::CREATED); // executes
/// assert_eq!(send(&app, "k1", "100").await, StatusCode::CREATED); // replays
/// assert_eq!(send(&app, "k1", "250").await, StatusCode::UNPROCESSABLE_ENTITY);
/// store.assert_executed_once();
///
/// store.advance(Duration::from_secs(3601)); // past the TTL: the key is new
/// assert_eq!(send(&app, "k1", "250").await, StatusCode::CREATED);
/// assert_eq!(store.executions(), 2);
///
/// store.in_flight_next(); // a duplicate holds the key: 409, nothing runs
/// assert_eq!(send(&app, "k2", "100").await, StatusCode::CONFLICT);
///
/// store.fail_next(OpKind::Claim); // the store is down: 503, nothing runs
/// assert_eq!(send(&app, "k2", "100").await, StatusCode::SERVICE_UNAVAILABLE);
/// assert_eq!(store.executions(), 2);
/// # }
/// ```
#[derive(Clone)]
pub struct MockStore {
    inner: Arc<Inner>,
}

struct Inner {
    store: MemoryStore,
    clock: ManualClock,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Every call, with the record it was for.
    operations: Vec<(RecordKey, Operation)>,
    /// The calls that injected faults failed, and how.
    faults: Vec<(OpKind, Fault)>,
    /// One-shot faults in order.
    fail_next: VecDeque<Queued>,
    /// The outage under way, if any: every call fails this way.
    fail_all: Option<Fault>,
    /// Outages of one kind of call each: every call of the kind fails.
    fail_every: Vec<(OpKind, Fault)>,
    delay: Option<Duration>,
    /// Claims still to be answered as held by a duplicate, in order: of
    /// whichever key comes (`None`), or of one key.
    in_flight_next: VecDeque<Option<RecordKey>>,
}

/// The kinds of store call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OpKind {
    /// [`Store::claim`].
    Claim,
    /// [`Store::renew`].
    Renew,
    /// [`Store::complete`].
    Complete,
    /// [`Store::release`].
    Release,
    /// [`Store::get`].
    Get,
}

/// A class of store failure, for an injected fault to answer with
/// ([`MockStore::fail_next_with`], [`MockStore::fail_next_call_with`],
/// [`MockStore::fail_every_with`], [`MockStore::fail_all_with`]). Each is the [`StoreError`] a real store
/// answers in that case, so the engine treats it as it would theirs: a
/// request whose claim fails runs nothing and gets the
/// [problem](crate::problem) of its class.
///
// The example needs the attribute (feature `macros`).
#[cfg_attr(feature = "macros", doc = "```")]
#[cfg_attr(not(feature = "macros"), doc = "```ignore")]
/// use axum::{Router, body::Body, http::{Request, StatusCode}, routing::post};
/// use idempotent_core::idempotent;
/// use idempotent_core::testing::{Fault, MockStore, OpKind};
/// use tower::ServiceExt;
///
/// #[idempotent(scope = "global")]
/// async fn charge() -> StatusCode {
///     StatusCode::CREATED
/// }
///
/// /// The status, and whether the response says when to retry.
/// async fn send(app: &Router) -> (StatusCode, bool) {
///     let request = Request::post("/charges")
///         .header("idempotency-key", "k1")
///         .body(Body::empty())
///         .unwrap();
///     let response = app.clone().oneshot(request).await.unwrap();
///     (response.status(), response.headers().contains_key("retry-after"))
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let store = MockStore::new();
/// let app = Router::new().route("/charges", post(charge)).layer(store.layer());
///
/// // Set up wrongly: a retry soon after would fail the same way.
/// store.fail_next_with(OpKind::Claim, Fault::Misconfigured);
/// assert_eq!(send(&app).await, (StatusCode::INTERNAL_SERVER_ERROR, false));
/// // Timed out: may pass by itself, so the client is told to retry.
/// store.fail_next_with(OpKind::Claim, Fault::Timeout);
/// assert_eq!(send(&app).await, (StatusCode::SERVICE_UNAVAILABLE, true));
/// // The faults are spent: the retry runs, once.
/// assert_eq!(send(&app).await, (StatusCode::CREATED, false));
/// store.assert_executed_once();
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Fault {
    /// The backend failed in a way that may pass by itself (a server down,
    /// a connection dropped): [`StoreError::Backend`], answered `503
    /// store-unavailable` with `Retry-After`. What
    /// [`fail_next`](MockStore::fail_next),
    /// [`fail_next_call`](MockStore::fail_next_call),
    /// [`fail_every`](MockStore::fail_every) and
    /// [`fail_all`](MockStore::fail_all) inject.
    Unavailable,
    /// The store did not answer in time: [`StoreError::Timeout`],
    /// answered `503 store-unavailable` with `Retry-After`. It is answered
    /// at once, and the call is not applied.
    ///
    /// The duration the error carries, which the log's "did not answer
    /// within ..." shows, is always
    /// [`IdempotencyBuilder::DEFAULT_STORE_TIMEOUT`] (2 s): a store is not
    /// told the layer's settings, so the mock cannot know a
    /// [`store_timeout`](crate::IdempotencyBuilder::store_timeout) given
    /// to the layer (nor the shorter one the engine gives a renewal, a
    /// third of the lease at most). What the client gets, and what the
    /// engine does next, do not depend on it. To test the layer's own
    /// timeout, make the call slow instead with
    /// [`set_delay`](MockStore::set_delay) (under
    /// `#[tokio::test(start_paused = true)]`, at no cost in real time):
    /// the engine cuts it at that timeout, and reports that one.
    Timeout,
    /// The store is set up wrongly (a missing table or privilege, a
    /// read-only database): [`StoreError::Misconfigured`], answered `500
    /// store-misconfigured` without `Retry-After`.
    Misconfigured,
    /// The key's stored record does not decode: [`StoreError::Codec`],
    /// answered `500 record-corrupt` without `Retry-After`, even with
    /// [`fail_open`](crate::IdempotencyBuilder::fail_open): the record
    /// says the request ran.
    Corrupt,
}

impl Fault {
    /// The error a store answers a call of `kind` with, failing this way.
    fn error(self, kind: OpKind) -> StoreError {
        match self {
            Self::Unavailable => StoreError::backend(format!(
                "injected fault: the mock store failed this {kind:?} call"
            )),
            Self::Timeout => StoreError::Timeout(IdempotencyBuilder::DEFAULT_STORE_TIMEOUT),
            Self::Misconfigured => StoreError::misconfigured(format!(
                "injected fault: the mock store is set up wrongly for this {kind:?} call"
            )),
            Self::Corrupt => StoreError::Codec(CodecError::new(
                "injected fault: the mock store's record does not decode",
            )),
        }
    }
}

/// A one-shot fault: the call it fails (`None`: whichever comes next),
/// the record it fails a call for (`None`: any), and how.
#[derive(Clone)]
struct Queued {
    kind: Option<OpKind>,
    key: Option<RecordKey>,
    fault: Fault,
}

impl Queued {
    /// Whether this fault fails a call of `kind` for `key`.
    fn fails(&self, kind: OpKind, key: &RecordKey) -> bool {
        self.kind.is_none_or(|aimed| aimed == kind) && aims_at(self.key.as_ref(), key)
    }
}

/// Whether something aimed at `aimed` (`None`: any record) applies to `key`.
fn aims_at(aimed: Option<&RecordKey>, key: &RecordKey) -> bool {
    aimed.is_none_or(|aimed| aimed == key)
}

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClaimOutcome {
    /// The key was free: the handler runs.
    Acquired,
    /// Another request holds the key.
    InFlight,
    /// A response was stored (replayed, or 422 for another payload).
    Completed,
}

/// One store call the engine made, as the mock answered it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operation {
    /// A claim, and what it found.
    Claim {
        /// What the claim found.
        outcome: ClaimOutcome,
    },
    /// A lease renewal.
    Renew,
    /// A response stored for replay.
    Complete {
        /// The stored response's status.
        status: StatusCode,
    },
    /// A claim given back, so a retry runs again.
    Release,
    /// A read.
    Get {
        /// Whether a live record was there.
        found: bool,
    },
    /// A call that failed: an injected fault, or a lost lease.
    /// [`MockStore::faults`] says which [`Fault`] failed it.
    Failed {
        /// Which call.
        op: OpKind,
    },
}

impl Operation {
    /// The kind of call.
    #[must_use]
    pub fn kind(&self) -> OpKind {
        match self {
            Self::Claim { .. } => OpKind::Claim,
            Self::Renew => OpKind::Renew,
            Self::Complete { .. } => OpKind::Complete,
            Self::Release => OpKind::Release,
            Self::Get { .. } => OpKind::Get,
            Self::Failed { op } => *op,
        }
    }
}

impl Default for MockStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MockStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockStore")
            .field("clock", &self.inner.clock)
            .field("operations", &self.operations())
            .finish_non_exhaustive()
    }
}

// ===== setup and time =====

impl MockStore {
    /// An empty store whose clock reads 2025-01-01T00:00:00Z.
    #[must_use]
    pub fn new() -> Self {
        let clock = ManualClock::new(EPOCH_2025_MILLIS);
        let store = MemoryStore::builder().clock(clock.clone()).build();
        Self {
            inner: Arc::new(Inner {
                store,
                clock,
                state: Mutex::default(),
            }),
        }
    }

    /// An [`Idempotency`] layer on this store (a shared handle), for
    /// `Router::layer`, with the default settings. To test the settings
    /// your server's layer has (an `api_key_header`, a `store_timeout`),
    /// build it the same way on a clone instead:
    /// `Idempotency::builder(store.clone()).api_key_header(..).build()`
    /// (clones share the records, the clock and the log).
    #[must_use]
    pub fn layer(&self) -> Idempotency {
        Idempotency::new(self.clone())
    }

    /// The store's clock; clones share its time.
    #[must_use]
    pub fn clock(&self) -> ManualClock {
        self.inner.clock.clone()
    }

    /// Moves the store's time forward, e.g. past a TTL or a lease: a
    /// request that still runs then holds a lapsed lease, and a retry
    /// takes the key over and runs, as after a crash. It does not move
    /// tokio's clock, nor does `tokio::time::advance` move this one.
    pub fn advance(&self, by: Duration) {
        self.inner.clock.advance(by);
    }

    /// The memory store underneath, to inspect what is held.
    #[must_use]
    pub fn memory(&self) -> &MemoryStore {
        &self.inner.store
    }

    /// The response stored for `key` in `scope`, as retries are replayed
    /// it: its status, the headers kept and the body (`None` if it was
    /// over the endpoint's limit). `None` while nothing is stored: the key
    /// was never sent, its request is still running or its completion
    /// failed, its claim was released (a `5xx`), or the record is past its
    /// TTL on the mock's clock.
    ///
    /// `scope` is the caller the endpoint keeps keys apart for:
    /// `ScopeDigest::api_key(b"sk_test_1")` for a request with
    /// `X-Api-Key: sk_test_1` (or `Authorization: Bearer sk_test_1`) under
    /// `scope = "api_key"`, [`ScopeDigest::global()`] under `"global"`,
    /// `ScopeDigest::header("x-tenant-id", b"t1")` under
    /// `"header:x-tenant-id"`, [`ScopeDigest::custom`] of the principal
    /// for a scope type.
    ///
    /// It reads what the store holds without being a call of the engine's:
    /// it is not logged in [`operations`](Self::operations), no injected
    /// fault fails it, and it takes nothing from
    /// [`in_flight_next`](Self::in_flight_next).
    ///
    /// # Panics
    ///
    /// If `key` is not a valid idempotency key (so no request could have
    /// stored anything under it).
    ///
    // The example needs the attribute (feature `macros`).
    #[cfg_attr(feature = "macros", doc = "```")]
    #[cfg_attr(not(feature = "macros"), doc = "```ignore")]
    /// use std::time::Duration;
    ///
    /// use axum::{Json, Router, http::StatusCode, routing::post};
    /// use idempotent_core::idempotent;
    /// use idempotent_core::scope::ScopeDigest;
    /// use idempotent_core::testing::{MockStore, TestRequest};
    /// use serde_json::{Value, json};
    /// use tower::ServiceExt;
    ///
    /// #[idempotent(ttl = "24h", scope = "api_key")]
    /// async fn create_payment(Json(payment): Json<Value>) -> (StatusCode, Json<Value>) {
    ///     (StatusCode::CREATED, Json(json!({"id": "pay_1", "amount": payment["amount"]})))
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let store = MockStore::new();
    /// let app = Router::new().route("/payments", post(create_payment)).layer(store.layer());
    /// let payment = TestRequest::post("/payments").key("k1").api_key("sk_test_1");
    /// app.oneshot(payment.json(&json!({"amount": 100})).build()).await.unwrap();
    ///
    /// let caller = ScopeDigest::api_key(b"sk_test_1");
    /// let stored = store.stored_response(caller, "k1").expect("a stored response");
    /// assert_eq!(stored.status, StatusCode::CREATED);
    /// let body: Value = serde_json::from_slice(&stored.body.unwrap()).unwrap();
    /// assert_eq!(body, json!({"id": "pay_1", "amount": 100}));
    /// // Another caller's `k1` is another record.
    /// assert!(store.stored_response(ScopeDigest::api_key(b"sk_test_2"), "k1").is_none());
    ///
    /// store.advance(Duration::from_secs(24 * 3600 + 1));
    /// assert!(store.stored_response(caller, "k1").is_none()); // past its TTL
    /// # }
    /// ```
    #[must_use]
    #[track_caller]
    pub fn stored_response(&self, scope: ScopeDigest, key: &str) -> Option<StoredResponse> {
        let key = record_key("MockStore::stored_response", scope, key);
        self.stored_at(&key)
    }

    /// [`stored_response`](Self::stored_response) of the record `key`.
    fn stored_at(&self, key: &RecordKey) -> Option<StoredResponse> {
        match answered_at_once(Store::get(&self.inner.store, key)) {
            Ok(Some(Record::Completed(completed))) => Some(completed.response.clone()),
            Ok(_) => None,
            // Only the mock's own encoding is ever read back.
            Err(error) => panic!("MockStore::stored_response: the memory store failed: {error}"),
        }
    }
}

/// The record of `key` from the caller `scope` names; `caller` is the
/// function that was given them, for the panic.
#[track_caller]
fn record_key(caller: &str, scope: ScopeDigest, key: &str) -> RecordKey {
    let parsed = IdempotencyKey::parse(key.as_bytes())
        .unwrap_or_else(|error| panic!("{caller}: {key:?} is not an idempotency key: {error}"));
    RecordKey::new(scope, parsed)
}

/// The output of a [`MemoryStore`] call: its futures are ready at once,
/// so a test's plain (not `async`) check can read the store.
fn answered_at_once<T>(call: impl Future<Output = T>) -> T {
    let mut context = Context::from_waker(Waker::noop());
    match pin!(call).poll(&mut context) {
        Poll::Ready(output) => output,
        Poll::Pending => unreachable!("the memory store answers at once"),
    }
}

// ===== faults =====

impl MockStore {
    /// Fails the next call of `kind` (and only that one) with a backend
    /// error. Calls queue up: `fail_next` twice fails two calls.
    ///
    /// A request's first call is a claim, or, for an exact repeat of a
    /// replayed request (which clients that send `Content-Length` make), a
    /// [`get`](Store::get) before it: a queued `Claim` fault fails that
    /// `get` too, and stays queued for the claim the request then falls
    /// back to, so that "the store is down for the next request" holds for
    /// both.
    pub fn fail_next(&self, kind: OpKind) {
        self.fail_next_with(kind, Fault::Unavailable);
    }

    /// Fails the next call of `kind` (and only that one) with `fault`, as
    /// [`fail_next`](Self::fail_next) does with a backend error, in the
    /// same queue. A queued `Claim` fault fails an exact repeat's
    /// [`get`](Store::get) with a backend error whatever its class, so
    /// that the request goes on to the claim, which answers `fault`: the
    /// client gets what the claim's failure gets it.
    pub fn fail_next_with(&self, kind: OpKind, fault: Fault) {
        let queued = Queued {
            kind: Some(kind),
            key: None,
            fault,
        };
        self.state().fail_next.push_back(queued);
    }

    /// Fails the next call, whatever it is. For an exact repeat of a
    /// replayed request that is the [`get`](Store::get) before its claim,
    /// and the claim after it replays, as after a real store's one failed
    /// call; [`fail_next(OpKind::Claim)`](Self::fail_next) fails the
    /// request whichever path it takes.
    pub fn fail_next_call(&self) {
        self.fail_next_call_with(Fault::Unavailable);
    }

    /// Fails the next call, whatever it is, with `fault`.
    pub fn fail_next_call_with(&self, fault: Fault) {
        let queued = Queued {
            kind: None,
            key: None,
            fault,
        };
        self.state().fail_next.push_back(queued);
    }

    /// Fails every call while `fail` is `true` (a store outage), with a
    /// backend error. `false` ends any outage, whatever its class, and
    /// those of one kind of call ([`fail_every`](Self::fail_every)).
    pub fn fail_all(&self, fail: bool) {
        let mut state = self.state();
        state.fail_all = fail.then_some(Fault::Unavailable);
        if !fail {
            state.fail_every.clear();
        }
    }

    /// Fails every call of `kind` with a backend error, until
    /// [`fail_all(false)`](Self::fail_all) ends it: e.g. a store that
    /// takes claims but never stores a response, however often the engine
    /// tries again (it tries several times, then goes on in the
    /// background while the lease lasts: more calls than a test should
    /// count out with [`fail_next`](Self::fail_next)).
    ///
    /// While claims fail, so does an exact repeat's [`get`](Store::get),
    /// as with [`fail_next`](Self::fail_next), so that no request gets
    /// past the outage.
    ///
    // The example needs the attribute (feature `macros`).
    #[cfg_attr(feature = "macros", doc = "```")]
    #[cfg_attr(not(feature = "macros"), doc = "```ignore")]
    /// use axum::{Router, body::Body, http::{Request, StatusCode}, routing::post};
    /// use idempotent_core::idempotent;
    /// use idempotent_core::testing::{MockStore, OpKind};
    /// use tower::ServiceExt;
    ///
    /// #[idempotent(scope = "global")]
    /// async fn charge() -> StatusCode {
    ///     StatusCode::CREATED
    /// }
    ///
    /// async fn send(app: &Router) -> StatusCode {
    ///     let request = Request::post("/charges")
    ///         .header("idempotency-key", "k1")
    ///         .body(Body::empty())
    ///         .unwrap();
    ///     app.clone().oneshot(request).await.unwrap().status()
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let store = MockStore::new();
    /// let app = Router::new().route("/charges", post(charge)).layer(store.layer());
    /// store.fail_every(OpKind::Complete);
    /// // The handler ran: the caller gets its response, though it was not stored...
    /// assert_eq!(send(&app).await, StatusCode::CREATED);
    /// assert_eq!(store.count(OpKind::Complete), 0);
    /// // ...and the key stays held while the engine tries to store it.
    /// assert_eq!(send(&app).await, StatusCode::CONFLICT);
    /// store.assert_executed_once();
    /// # }
    /// ```
    pub fn fail_every(&self, kind: OpKind) {
        self.fail_every_with(kind, Fault::Unavailable);
    }

    /// Fails every call of `kind` with `fault`, as
    /// [`fail_every`](Self::fail_every) does with a backend error.
    pub fn fail_every_with(&self, kind: OpKind, fault: Fault) {
        let mut state = self.state();
        state.fail_every.retain(|(failing, _)| *failing != kind);
        state.fail_every.push((kind, fault));
    }

    /// Fails every call with `fault` (a store down, or set up wrongly)
    /// until [`fail_all(false)`](Self::fail_all) ends it.
    pub fn fail_all_with(&self, fault: Fault) {
        self.state().fail_all = Some(fault);
    }

    /// Answers the next claim as if a duplicate with the same payload held
    /// the key: the engine then answers `409` with `Retry-After`, or, on a
    /// `wait` endpoint, asks again, and the store answers that claim as
    /// usual (as when the first request releases the key). The claim is
    /// logged as `Claim { outcome: InFlight }` and nothing runs. Calls
    /// queue up: `in_flight_next` twice holds two claims.
    ///
    /// An exact repeat of a replayed request reads the record with
    /// [`get`](Store::get) before it claims: while an answer is queued,
    /// that read finds the key held too, and the answer stays queued for
    /// the claim the request falls back to, so that "a duplicate holds the
    /// key" holds for both (as a queued `Claim` fault does, see
    /// [`fail_next`](Self::fail_next)).
    ///
    /// This is the state a handler test cannot otherwise reach without
    /// keeping a first request running while it sends the second.
    pub fn in_flight_next(&self) {
        self.state().in_flight_next.push_back(None);
    }

    /// Makes every call take `delay` (on tokio's clock) before it answers,
    /// e.g. to exceed the store timeout. `Duration::ZERO` removes it. A call
    /// the engine abandons at its timeout never reaches the store, so it is
    /// not logged.
    ///
    // The example needs the attribute (feature `macros`).
    #[cfg_attr(feature = "macros", doc = "```")]
    #[cfg_attr(not(feature = "macros"), doc = "```ignore")]
    /// use std::time::Duration;
    ///
    /// use axum::{Router, http::StatusCode, routing::post};
    /// use idempotent_core::{Idempotency, idempotent};
    /// use idempotent_core::testing::{MockStore, TestRequest};
    /// use tower::ServiceExt;
    ///
    /// #[idempotent(scope = "global")]
    /// async fn charge() -> StatusCode {
    ///     StatusCode::CREATED
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let store = MockStore::new();
    /// let layer = Idempotency::builder(store.clone())
    ///     .store_timeout(Duration::from_millis(500))
    ///     .build();
    /// let app = Router::new().route("/charges", post(charge)).layer(layer);
    ///
    /// store.set_delay(Duration::from_secs(1)); // slower than the layer waits
    /// let started = tokio::time::Instant::now();
    /// let request = TestRequest::post("/charges").key("k1").build();
    /// let response = app.oneshot(request).await.unwrap();
    /// assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    /// assert_eq!(started.elapsed(), Duration::from_millis(500)); // the layer's timeout
    /// assert_eq!(store.executions(), 0);
    /// # }
    /// ```
    pub fn set_delay(&self, delay: Duration) {
        self.state().delay = (!delay.is_zero()).then_some(delay);
    }
}

// ===== one key =====

impl MockStore {
    /// The record of `key` from the caller `scope` names (as for
    /// [`stored_response`](Self::stored_response)), for faults and
    /// duplicates aimed at its calls alone, and its own log.
    ///
    /// The store's own [`fail_next`](Self::fail_next) and
    /// [`in_flight_next`](Self::in_flight_next) fail, or hold, whichever
    /// call comes next, and its counts are of every call: a test that
    /// shares the store with others running at once (one store in a
    /// `static`, or in an application state built once), or that has
    /// requests with other keys in flight, would have its fault taken by
    /// another's request, and count their runs. Through its key, it
    /// neither takes nor leaves anything for theirs.
    ///
    /// # Panics
    ///
    /// If `key` is not a valid idempotency key (so no request could send
    /// it).
    ///
    // The example needs the attribute (feature `macros`).
    #[cfg_attr(feature = "macros", doc = "```")]
    #[cfg_attr(not(feature = "macros"), doc = "```ignore")]
    /// use std::sync::LazyLock;
    ///
    /// use axum::{Router, body::Body, http::{Request, StatusCode}, routing::post};
    /// use idempotent_core::idempotent;
    /// use idempotent_core::scope::ScopeDigest;
    /// use idempotent_core::testing::{MockStore, OpKind};
    /// use tower::ServiceExt;
    ///
    /// #[idempotent(scope = "global")]
    /// async fn charge() -> StatusCode {
    ///     StatusCode::CREATED
    /// }
    ///
    /// // One store for every test of the binary, which run at once.
    /// static STORE: LazyLock<MockStore> = LazyLock::new(MockStore::new);
    ///
    /// async fn send(app: &Router, key: &str) -> StatusCode {
    ///     let request = Request::post("/charges")
    ///         .header("idempotency-key", key)
    ///         .body(Body::empty())
    ///         .unwrap();
    ///     app.clone().oneshot(request).await.unwrap().status()
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let app = Router::new().route("/charges", post(charge)).layer(STORE.layer());
    /// let mine = STORE.for_key(ScopeDigest::global(), "outage-k1");
    /// mine.fail_next(OpKind::Claim);
    /// // Another test's request, sent meanwhile, does not take the fault...
    /// assert_eq!(send(&app, "replay-k1").await, StatusCode::CREATED);
    /// // ...this test's does.
    /// assert_eq!(send(&app, "outage-k1").await, StatusCode::SERVICE_UNAVAILABLE);
    /// assert_eq!(send(&app, "outage-k1").await, StatusCode::CREATED);
    /// mine.assert_executed_once();
    /// # }
    /// ```
    #[must_use]
    #[track_caller]
    pub fn for_key(&self, scope: ScopeDigest, key: &str) -> MockKey {
        MockKey {
            store: self.clone(),
            key: record_key("MockStore::for_key", scope, key),
        }
    }
}

/// One record of a [`MockStore`]: faults and duplicates aimed at its calls
/// alone, and the calls made for it. Made by [`MockStore::for_key`];
/// clones share the store.
#[derive(Debug, Clone)]
pub struct MockKey {
    store: MockStore,
    key: RecordKey,
}

impl MockKey {
    /// Fails the next call of `kind` for this key with a backend error, as
    /// [`MockStore::fail_next`] fails the next call of `kind` for any key
    /// (in the same queue, so an exact repeat of this key fails too).
    pub fn fail_next(&self, kind: OpKind) {
        self.fail_next_with(kind, Fault::Unavailable);
    }

    /// Fails the next call of `kind` for this key with `fault`.
    pub fn fail_next_with(&self, kind: OpKind, fault: Fault) {
        let queued = Queued {
            kind: Some(kind),
            key: Some(self.key.clone()),
            fault,
        };
        self.store.state().fail_next.push_back(queued);
    }

    /// Answers the next claim of this key as held by a duplicate, as
    /// [`MockStore::in_flight_next`] answers the next claim of any key.
    pub fn in_flight_next(&self) {
        let aimed = Some(self.key.clone());
        self.store.state().in_flight_next.push_back(aimed);
    }

    /// Every call for this key so far, in order.
    #[must_use]
    pub fn operations(&self) -> Vec<Operation> {
        let state = self.store.state();
        let calls = state.operations.iter();
        let mine = calls.filter(|(key, _)| *key == self.key);
        mine.map(|(_, op)| op.clone()).collect()
    }

    /// How many times a handler was let run with this key: its claims that
    /// acquired it.
    #[must_use]
    pub fn executions(&self) -> usize {
        let acquired = Operation::Claim {
            outcome: ClaimOutcome::Acquired,
        };
        let operations = self.operations();
        operations.iter().filter(|op| **op == acquired).count()
    }

    /// Asserts that exactly one handler run was let through with this key.
    ///
    /// # Panics
    /// When the store let it run no time or more than once, listing the
    /// key's operations.
    #[track_caller]
    pub fn assert_executed_once(&self) {
        self.assert_executed(1);
    }

    /// Asserts that exactly `times` handler runs were let through with
    /// this key.
    ///
    /// # Panics
    /// When the store let it run another number of times, listing the
    /// key's operations.
    #[track_caller]
    pub fn assert_executed(&self, times: usize) {
        assert_runs(
            self.executions(),
            times,
            " with this key",
            &self.operations(),
        );
    }

    /// The response stored for this key, as
    /// [`MockStore::stored_response`] reads it.
    #[must_use]
    pub fn stored_response(&self) -> Option<StoredResponse> {
        self.store.stored_at(&self.key)
    }
}

// ===== the log =====

impl MockStore {
    /// Every call so far, in order.
    #[must_use]
    pub fn operations(&self) -> Vec<Operation> {
        let state = self.state();
        state.operations.iter().map(|(_, op)| op.clone()).collect()
    }

    /// Forgets the calls so far, and the [`faults`](Self::faults) that
    /// failed them (records, and faults still queued, stay).
    pub fn clear_operations(&self) {
        let mut state = self.state();
        state.operations.clear();
        state.faults.clear();
    }

    /// The calls that injected faults failed so far, in order, each with
    /// the [`Fault`] that failed it: [`Operation::Failed`] says which call
    /// failed, this says how, e.g. that a timeout came at a completion.
    /// A lost lease, which the store answers itself, is not one.
    ///
    // The example needs the attribute (feature `macros`).
    #[cfg_attr(feature = "macros", doc = "```")]
    #[cfg_attr(not(feature = "macros"), doc = "```ignore")]
    /// use axum::{Router, body::Body, http::{Request, StatusCode}, routing::post};
    /// use idempotent_core::idempotent;
    /// use idempotent_core::testing::{Fault, MockStore, OpKind, Operation};
    /// use tower::ServiceExt;
    ///
    /// #[idempotent(scope = "global")]
    /// async fn charge() -> StatusCode {
    ///     StatusCode::CREATED
    /// }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let store = MockStore::new();
    /// let app = Router::new().route("/charges", post(charge)).layer(store.layer());
    /// store.fail_next_with(OpKind::Complete, Fault::Timeout);
    /// let request = Request::post("/charges")
    ///     .header("idempotency-key", "k1")
    ///     .body(Body::empty())
    ///     .unwrap();
    /// assert_eq!(app.oneshot(request).await.unwrap().status(), StatusCode::CREATED);
    /// // The completion timed out, and its second attempt stored the response.
    /// assert_eq!(store.faults(), [(OpKind::Complete, Fault::Timeout)]);
    /// let failed = Operation::Failed { op: OpKind::Complete };
    /// assert!(store.operations().contains(&failed));
    /// assert_eq!(store.count(OpKind::Complete), 1);
    /// # }
    /// ```
    #[must_use]
    pub fn faults(&self) -> Vec<(OpKind, Fault)> {
        self.state().faults.clone()
    }

    /// How many calls of `kind` succeeded.
    #[must_use]
    pub fn count(&self, kind: OpKind) -> usize {
        self.count_where(|op| op.kind() == kind && !matches!(op, Operation::Failed { .. }))
    }

    /// How many claims found `outcome`.
    #[must_use]
    pub fn claims(&self, outcome: ClaimOutcome) -> usize {
        self.count_where(|op| *op == Operation::Claim { outcome })
    }

    /// How many times a handler was let run: claims that acquired the key.
    /// A claim answered after a third of its lease (a store slowed with
    /// [`set_delay`](Self::set_delay) past that, within the store timeout)
    /// is renewed before its handler runs; when that renewal fails too,
    /// the engine releases the key and runs nothing, yet the claim
    /// acquired it and counts here.
    #[must_use]
    pub fn executions(&self) -> usize {
        self.claims(ClaimOutcome::Acquired)
    }

    /// How many calls failed (injected faults and lost leases).
    #[must_use]
    pub fn failures(&self) -> usize {
        self.count_where(|op| matches!(op, Operation::Failed { .. }))
    }

    /// Asserts that exactly one handler run was let through.
    ///
    /// # Panics
    /// When the store let the handler run no time or more than once,
    /// listing the operations it saw.
    #[track_caller]
    pub fn assert_executed_once(&self) {
        self.assert_executed(1);
    }

    /// Asserts that exactly `times` handler runs were let through.
    ///
    /// # Panics
    /// When the store let the handler run another number of times,
    /// listing the operations it saw.
    #[track_caller]
    pub fn assert_executed(&self, times: usize) {
        assert_runs(self.executions(), times, "", &self.operations());
    }

    fn count_where(&self, predicate: impl Fn(&Operation) -> bool) -> usize {
        self.state()
            .operations
            .iter()
            .filter(|(_, op)| predicate(op))
            .count()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section is a single push or read: a panic while
        // holding the lock cannot leave the state half-updated.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, key: &RecordKey, operation: Operation) {
        self.state().operations.push((key.clone(), operation));
    }

    /// Waits the configured delay, then answers with an injected fault if
    /// one applies to a call of `kind` for `key`.
    async fn before(&self, kind: OpKind, key: &RecordKey) -> Result<(), StoreError> {
        let delay = self.state().delay;
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let mut state = self.state();
        let fault = match state.fail_all {
            Some(fault) => Some(fault),
            None => failing_kind(&state.fail_every, kind)
                .or_else(|| take_fault(&mut state.fail_next, kind, key))
                .or_else(|| claim_fault_ahead(&state, kind, key)),
        };
        if let Some(fault) = fault {
            let failed = Operation::Failed { op: kind };
            state.operations.push((key.clone(), failed));
            state.faults.push((kind, fault));
            return Err(fault.error(kind));
        }
        Ok(())
    }

    /// A claim held by a duplicate of this request, if
    /// [`in_flight_next`](Self::in_flight_next) queued one: its own
    /// fingerprint, so that the engine answers `409`, not `422`.
    fn take_in_flight(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Option<Claim> {
        let mut state = self.state();
        let mut queued = state.in_flight_next.iter();
        let position = queued.position(|aimed| aims_at(aimed.as_ref(), key))?;
        state.in_flight_next.remove(position);
        let lease_expires_at = self.inner.clock.now_millis().saturating_add(millis(lease));
        Some(Claim::InFlight {
            fingerprint,
            lease_expires_at,
        })
    }

    /// `record` as a read finds it while [`in_flight_next`](Self::in_flight_next)
    /// has a claim to answer: a completed record is then held by a
    /// duplicate with its payload, and nothing is taken from the queue.
    fn as_held(&self, key: &RecordKey, record: Record) -> Record {
        match record {
            Record::Completed(completed) if self.holds_in_flight_next(key) => {
                Record::InFlight(InFlight {
                    fingerprint: completed.fingerprint,
                    lease_token: LeaseToken::random(),
                    // Nothing holds a lease: the record's deadline stands in.
                    lease_expires_at: completed.expires_at,
                })
            }
            record => record,
        }
    }

    /// Whether [`in_flight_next`](Self::in_flight_next) has a claim of
    /// `key` to answer.
    fn holds_in_flight_next(&self, key: &RecordKey) -> bool {
        let state = self.state();
        let mut queued = state.in_flight_next.iter();
        queued.any(|aimed| aims_at(aimed.as_ref(), key))
    }

    /// Logs a call for `key`'s result: `success` for what it answered, or
    /// a failure.
    fn logged<T>(
        &self,
        (kind, key): (OpKind, &RecordKey),
        result: Result<T, StoreError>,
        success: impl FnOnce(&T) -> Operation,
    ) -> Result<T, StoreError> {
        let operation = match &result {
            Ok(value) => success(value),
            Err(_) => Operation::Failed { op: kind },
        };
        self.record(key, operation);
        result
    }
}

/// Panics, listing `operations`, unless the store let `executions` runs
/// through where the test expected `times`; `whose` says of which calls.
#[track_caller]
fn assert_runs(executions: usize, times: usize, whose: &str, operations: &[Operation]) {
    assert!(
        executions == times,
        "expected the handler to run {times} time(s){whose} but the store let it run {executions} time(s); operations: {operations:?}"
    );
}

/// The first queued fault for a call of `kind` for `key`, taken off the
/// queue.
fn take_fault(queue: &mut VecDeque<Queued>, kind: OpKind, key: &RecordKey) -> Option<Fault> {
    let position = queue.iter().position(|queued| queued.fails(kind, key));
    position
        .and_then(|index| queue.remove(index))
        .map(|queued| queued.fault)
}

/// How a read fails while a claim's fault is queued (see
/// [`MockStore::fail_next`]), leaving it queued: with a backend error,
/// whatever the claim's class, since a read that timed out answers the
/// request by itself, and the claim that a backend error sends it on to
/// answers it as the fault's class has it.
fn claim_fault_ahead(state: &State, kind: OpKind, key: &RecordKey) -> Option<Fault> {
    let claim_queued = state
        .fail_next
        .iter()
        .any(|queued| queued.kind == Some(OpKind::Claim) && aims_at(queued.key.as_ref(), key));
    let claims_fail = failing_kind(&state.fail_every, OpKind::Claim).is_some();
    (kind == OpKind::Get && (claim_queued || claims_fail)).then_some(Fault::Unavailable)
}

/// How calls of `kind` fail while an outage of that kind is under way.
fn failing_kind(outages: &[(OpKind, Fault)], kind: OpKind) -> Option<Fault> {
    outages
        .iter()
        .find(|(failing, _)| *failing == kind)
        .map(|(_, fault)| *fault)
}

fn claim_outcome(claim: &Claim) -> Operation {
    let outcome = match claim {
        Claim::Acquired(_) => ClaimOutcome::Acquired,
        Claim::InFlight { .. } => ClaimOutcome::InFlight,
        Claim::Completed(_) => ClaimOutcome::Completed,
    };
    Operation::Claim { outcome }
}

impl Store for MockStore {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.before(OpKind::Claim, key).await?;
        if let Some(held) = self.take_in_flight(key, fingerprint, lease) {
            return self.logged((OpKind::Claim, key), Ok(held), claim_outcome);
        }
        let result = Store::claim(&self.inner.store, key, fingerprint, lease).await;
        self.logged((OpKind::Claim, key), result, claim_outcome)
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.before(OpKind::Renew, key).await?;
        let result = Store::renew(&self.inner.store, key, token, lease).await;
        self.logged((OpKind::Renew, key), result, |()| Operation::Renew)
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.before(OpKind::Complete, key).await?;
        let status = response.status;
        let result = Store::complete(&self.inner.store, key, token, response, ttl).await;
        self.logged((OpKind::Complete, key), result, |()| Operation::Complete {
            status,
        })
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.before(OpKind::Release, key).await?;
        let result = Store::release(&self.inner.store, key, token).await;
        self.logged((OpKind::Release, key), result, |()| Operation::Release)
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        self.before(OpKind::Get, key).await?;
        let result = Store::get(&self.inner.store, key).await;
        let result = result.map(|found| found.map(|record| self.as_held(key, record)));
        self.logged((OpKind::Get, key), result, |record| Operation::Get {
            found: record.is_some(),
        })
    }

    fn deadline_clock(&self) -> Option<SharedClock> {
        Some(Arc::new(self.inner.clock.clone()))
    }
}
