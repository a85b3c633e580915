//! The options whose paths most requests never take, through a `Router`:
//! `wait`, `fail_open(true)` and `optional`.

use crate::macro_support;
use crate::store_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::{MemoryStore, PostgresStore, RedisStore, SqliteStore, Store};
use idempotent_core::testing::{ClaimOutcome, MockStore, OpKind};
use idempotent_core::{Idempotency, idempotent};
use macro_support::{Reply, Runs, send};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// What the handlers below share: how often they ran, how many ran at
/// once, and a gate that holds the first run until the test lets it go.
#[derive(Clone, Default)]
struct Probe {
    runs: Runs,
    running: Arc<AtomicUsize>,
    most_at_once: Arc<AtomicUsize>,
    first_started: Arc<Notify>,
    release_first: Arc<Notify>,
}

impl Probe {
    /// Counts a run that starts; its number with it.
    fn start(&self) -> usize {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        self.runs.bump()
    }

    fn end(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
    }

    /// The first run says it started and waits to be let go.
    async fn hold_the_first(&self, run: usize) {
        if run == 1 {
            self.first_started.notify_one();
            self.release_first.notified().await;
        }
    }
}

/// Its first run, held at the gate, answers 503 (the key is released);
/// later runs answer 201 after a moment, long enough for a second run
/// beside them to show.
#[idempotent(scope = "global", wait = "5s")]
async fn released_first(State(probe): State<Probe>, Json(n): Json<u32>) -> (StatusCode, String) {
    let run = probe.start();
    probe.hold_the_first(run).await;
    if run > 1 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    probe.end();
    let status = if run == 1 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::CREATED
    };
    (status, format!("run {run} of {n}"))
}

/// Every run answers 201, the first once the gate lets it go.
#[idempotent(scope = "global", wait = "5s")]
async fn gated(State(probe): State<Probe>, Json(n): Json<u32>) -> (StatusCode, String) {
    let run = probe.start();
    probe.hold_the_first(run).await;
    probe.end();
    (StatusCode::CREATED, format!("run {run} of {n}"))
}

/// Runs for as many milliseconds as its payload says.
#[idempotent(scope = "global", wait = "1s")]
async fn lasting(State(probe): State<Probe>, Json(millis): Json<u64>) -> (StatusCode, String) {
    let run = probe.start();
    probe.first_started.notify_one();
    tokio::time::sleep(Duration::from_millis(millis)).await;
    probe.end();
    (StatusCode::CREATED, format!("run {run}"))
}

#[idempotent(scope = "global", optional)]
async fn optional_json(State(probe): State<Probe>, Json(n): Json<u32>) -> String {
    format!("run {} of {n}", probe.runs.bump())
}

#[idempotent(scope = "global", optional, exact_repeats = false)]
async fn optional_parsed(State(probe): State<Probe>, Json(n): Json<u32>) -> String {
    format!("run {} of {n}", probe.runs.bump())
}

#[idempotent(scope = "global")]
async fn plain(State(probe): State<Probe>, Json(n): Json<u32>) -> (StatusCode, String) {
    let run = probe.start();
    probe.hold_the_first(run).await;
    probe.end();
    (StatusCode::CREATED, format!("run {run} of {n}"))
}

fn app(probe: &Probe, idempotency: Idempotency) -> Router {
    Router::new()
        .route("/released", post(released_first))
        .route("/gated", post(gated))
        .route("/lasting", post(lasting))
        .route("/optional", post(optional_json))
        .route("/optional-parsed", post(optional_parsed))
        .route("/plain", post(plain))
        .with_state(probe.clone())
        .layer(idempotency)
}

fn request(uri: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut builder = Request::post(uri).header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Body::from(body.to_owned())).unwrap()
}

fn spawn_send(
    app: &Router,
    uri: &'static str,
    key: &'static str,
    body: &'static str,
) -> JoinHandle<Reply> {
    let app = app.clone();
    tokio::spawn(async move { send(&app, request(uri, Some(key), body)).await })
}

/// Lets the waiters spawned so far see the key in flight and start waiting.
async fn until_waiting(store: &MockStore, waiters: usize) {
    while store.claims(ClaimOutcome::InFlight) < waiters {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// ===== wait =====

#[tokio::test]
async fn many_waiters_on_a_released_key_run_it_once_and_replay_that_run() {
    let (probe, store) = (Probe::default(), MockStore::new());
    let app = app(&probe, store.layer());
    let first = spawn_send(&app, "/released", "k", "1");
    probe.first_started.notified().await;
    let waiters: Vec<_> = (0..8)
        .map(|_| spawn_send(&app, "/released", "k", "1"))
        .collect();
    until_waiting(&store, 8).await;
    probe.release_first.notify_one();

    assert_eq!(first.await.unwrap().status, StatusCode::SERVICE_UNAVAILABLE);
    let mut fresh = 0;
    for waiter in waiters {
        let reply = waiter.await.unwrap();
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (StatusCode::CREATED, "run 2 of 1")
        );
        fresh += usize::from(!reply.replayed);
    }
    assert_eq!(
        (fresh, probe.runs.get()),
        (1, 2),
        "one waiter runs, the others replay it"
    );
    assert_eq!(
        probe.most_at_once.load(Ordering::SeqCst),
        1,
        "two runs at once"
    );
}

/// Eight waiters on a key whose first run releases it, on `store`: one
/// waiter runs, alone, and the others replay its response. `key` is new
/// to the store.
async fn many_waiters_on_a_released_key(store: impl Store, key: &'static str) {
    let probe = Probe::default();
    let app = app(&probe, Idempotency::new(store));
    let first = spawn_send(&app, "/released", key, "1");
    probe.first_started.notified().await;
    let waiters: Vec<_> = (0..8)
        .map(|_| spawn_send(&app, "/released", key, "1"))
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    probe.release_first.notify_one();

    assert_eq!(first.await.unwrap().status, StatusCode::SERVICE_UNAVAILABLE);
    let replies: Vec<Reply> = futures_util::future::join_all(waiters)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let fresh = replies.iter().filter(|reply| !reply.replayed).count();
    assert!(
        replies
            .iter()
            .all(|reply| reply.status == StatusCode::CREATED && reply.body == "run 2 of 1"),
        "{replies:?}"
    );
    assert_eq!((fresh, probe.runs.get()), (1, 2));
    assert_eq!(
        probe.most_at_once.load(Ordering::SeqCst),
        1,
        "two runs at once"
    );
}

/// A key no earlier run of these tests used in a shared database.
fn fresh_key() -> &'static str {
    Box::leak(store_support::unique_name("wait").into_boxed_str())
}

#[tokio::test]
async fn many_waiters_on_a_released_key_in_a_sqlite_file_run_it_once() {
    let path = std::env::temp_dir().join(store_support::unique_name("idempotent-wait") + ".db");
    let store = SqliteStore::open(&path).await.expect("open the database");
    store.migrate().await.expect("migrate");
    many_waiters_on_a_released_key(store, "k").await;
    for suffix in ["", "-wal", "-shm"] {
        drop(std::fs::remove_file(format!("{}{suffix}", path.display())));
    }
}

#[tokio::test]
async fn many_waiters_on_a_released_key_in_postgres_run_it_once() {
    let Some(url) = store_support::backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
        return;
    };
    let store = PostgresStore::connect(&url).await.expect("connect");
    store.migrate().await.expect("migrate");
    many_waiters_on_a_released_key(store, fresh_key()).await;
}

#[tokio::test]
async fn many_waiters_on_a_released_key_in_redis_run_it_once() {
    let Some(url) = store_support::backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let store = RedisStore::connect(&url).await.expect("connect");
    many_waiters_on_a_released_key(store, fresh_key()).await;
}

/// The waiter arrives when the first starts, so its wait ends when a
/// first that runs `millis` would be one millisecond from finishing, or
/// one past.
async fn waiter_of_a_first_lasting(millis: &'static str) -> (Reply, usize) {
    let probe = Probe::default();
    let app = app(&probe, Idempotency::new(MemoryStore::new()));
    let first = spawn_send(&app, "/lasting", "k", millis);
    probe.first_started.notified().await;
    let waiter = send(&app, request("/lasting", Some("k"), millis)).await;
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    (waiter, probe.runs.get())
}

#[tokio::test(start_paused = true)]
async fn a_first_that_finishes_just_before_the_wait_ends_is_replayed() {
    let (waiter, runs) = waiter_of_a_first_lasting("999").await;
    assert_eq!(
        (waiter.status, waiter.replayed, runs),
        (StatusCode::CREATED, true, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_first_that_finishes_as_the_wait_ends_is_replayed_or_409_never_run_again() {
    let (waiter, runs) = waiter_of_a_first_lasting("1000").await;
    let replayed = waiter.status == StatusCode::CREATED && waiter.replayed;
    assert!(
        replayed || waiter.status == StatusCode::CONFLICT,
        "{waiter:?}"
    );
    assert_eq!(runs, 1);
}

#[tokio::test(start_paused = true)]
async fn a_first_that_finishes_just_after_the_wait_ends_is_409() {
    let (waiter, runs) = waiter_of_a_first_lasting("1001").await;
    assert_eq!(
        (waiter.status, waiter.header("retry-after"), runs),
        (StatusCode::CONFLICT, Some("1"), 1)
    );
}

#[tokio::test]
async fn a_waiter_whose_client_went_away_leaves_the_key_free_when_the_first_releases_it() {
    let (probe, store) = (Probe::default(), MockStore::new());
    let app = app(&probe, store.layer());
    let first = spawn_send(&app, "/released", "k", "1");
    probe.first_started.notified().await;
    let waiter = spawn_send(&app, "/released", "k", "1");
    until_waiting(&store, 1).await;
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    probe.release_first.notify_one();
    assert_eq!(first.await.unwrap().status, StatusCode::SERVICE_UNAVAILABLE);

    let retry = send(&app, request("/released", Some("k"), "1")).await;
    assert_eq!((retry.status, retry.replayed), (StatusCode::CREATED, false));
    assert_eq!((probe.runs.get(), store.executions()), (2, 2));
}

#[tokio::test]
async fn a_waiter_with_another_payload_gets_422_without_waiting() {
    let probe = Probe::default();
    let app = app(&probe, Idempotency::new(MemoryStore::new()));
    let first = spawn_send(&app, "/gated", "k", "1");
    probe.first_started.notified().await;
    let other = tokio::time::timeout(
        Duration::from_secs(1),
        send(&app, request("/gated", Some("k"), "2")),
    )
    .await
    .expect("answered while the first still runs");
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    probe.release_first.notify_one();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(probe.runs.get(), 1);
}

#[tokio::test]
async fn a_waiter_takes_over_a_first_whose_lease_lapsed_and_its_response_is_kept() {
    let (probe, store) = (Probe::default(), MockStore::new());
    let app = app(&probe, store.layer());
    // The first stands for a process that died: it never finishes by
    // itself and its lease is let lapse.
    let first = spawn_send(&app, "/gated", "k", "1");
    probe.first_started.notified().await;
    let waiter = spawn_send(&app, "/gated", "k", "1");
    until_waiting(&store, 1).await;
    store.advance(Duration::from_secs(61));
    let waiter = waiter.await.unwrap();
    assert_eq!(
        (waiter.status, waiter.replayed, waiter.body.as_str()),
        (StatusCode::CREATED, false, "run 2 of 1")
    );

    // The first comes back to life: its lease is lost, so it stores nothing
    // over the waiter's record.
    probe.release_first.notify_one();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    let retry = send(&app, request("/gated", Some("k"), "1")).await;
    assert_eq!((retry.replayed, retry.body.as_str()), (true, "run 2 of 1"));
}

#[tokio::test(start_paused = true)]
async fn a_waiter_asks_the_store_about_six_times_a_second() {
    let (probe, store) = (Probe::default(), MockStore::new());
    let app = app(&probe, store.layer());
    let first = spawn_send(&app, "/gated", "k", "1");
    probe.first_started.notified().await;
    store.clear_operations();
    let waiter = send(&app, request("/gated", Some("k"), "1")).await;
    assert_eq!(waiter.status, StatusCode::CONFLICT);
    // 5 ms, doubling to 200 ms: 7 claims in the first 355 ms, then one
    // each 200 ms until the wait's end, and one at it.
    let claims = store.count(OpKind::Claim);
    assert_eq!(
        claims, 31,
        "claims in a 5 s wait (README's `wait` row says 31)"
    );
    probe.release_first.notify_one();
    first.await.unwrap();
}

// ===== fail_open =====

fn failing_open(store: &MockStore) -> Idempotency {
    Idempotency::builder(store.clone()).fail_open(true).build()
}

#[tokio::test]
async fn fail_open_a_completion_that_fails_once_is_stored_on_the_next_attempt() {
    let (probe, store) = (Probe::default(), MockStore::new());
    let app = app(&probe, failing_open(&store));
    probe.release_first.notify_one(); // the first run is not held
    store.fail_next(OpKind::Complete);
    let first = send(&app, request("/plain", Some("k"), "1")).await;
    let retry = send(&app, request("/plain", Some("k"), "1")).await;
    assert_eq!(
        (first.status, retry.replayed, retry.body.as_str()),
        (StatusCode::CREATED, true, "run 1 of 1")
    );
    assert_eq!(probe.runs.get(), 1);
}

#[tokio::test]
async fn fail_open_a_run_under_a_claim_whose_completion_fails_is_not_run_again_until_the_lease_lapses()
 {
    let (probe, store) = (Probe::default(), MockStore::new());
    let app = app(&probe, failing_open(&store));
    let first = spawn_send(&app, "/plain", "k", "1");
    probe.first_started.notified().await;
    store.fail_all(true); // the outage begins while the claimed handler runs
    probe.release_first.notify_one();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    store.fail_all(false);
    // The claim is still held: failing open does not apply to a key the
    // store says is in flight.
    let retry = send(&app, request("/plain", Some("k"), "1")).await;
    assert_eq!((retry.status, probe.runs.get()), (StatusCode::CONFLICT, 1));
    store.advance(Duration::from_secs(61));
    let late = send(&app, request("/plain", Some("k"), "1")).await;
    assert_eq!(
        (late.status, late.replayed, probe.runs.get()),
        (StatusCode::CREATED, false, 2)
    );
}

/// An outage that begins while a claimed handler runs: the retry, whose
/// claim the store fails, is not failed open into a second run beside
/// the first, which this process still runs and stores once the store is
/// back; it gets 409, as while the store answers, and then the replay.
/// Another payload under the key gets 422, as the store would answer it.
#[tokio::test]
async fn fail_open_a_retry_during_an_outage_does_not_run_beside_the_run_under_way() {
    let (probe, store) = (Probe::default(), MockStore::new());
    let app = app(&probe, failing_open(&store));
    let first = spawn_send(&app, "/plain", "k", "1");
    probe.first_started.notified().await;
    store.fail_all(true);
    let retry = send(&app, request("/plain", Some("k"), "1")).await;
    assert_eq!(
        (retry.status, probe.runs.get()),
        (StatusCode::CONFLICT, 1),
        "{}",
        retry.body
    );
    let other = send(&app, request("/plain", Some("k"), "2")).await;
    assert_eq!(
        (other.status, probe.runs.get()),
        (StatusCode::UNPROCESSABLE_ENTITY, 1),
        "{}",
        other.body
    );
    store.fail_all(false);
    probe.release_first.notify_one();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    let retry = send(&app, request("/plain", Some("k"), "1")).await;
    assert_eq!(
        (retry.status, retry.replayed, retry.body.as_str()),
        (StatusCode::CREATED, true, "run 1 of 1")
    );
    assert_eq!(probe.runs.get(), 1);
}

#[tokio::test]
async fn fail_open_an_outage_that_ends_mid_request_stores_nothing_for_the_open_run() {
    let (probe, store) = (Probe::default(), MockStore::new());
    let app = app(&probe, failing_open(&store));
    store.fail_all(true);
    let first = spawn_send(&app, "/plain", "k", "1");
    probe.first_started.notified().await;
    store.fail_all(false);
    probe.release_first.notify_one();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    let retry = send(&app, request("/plain", Some("k"), "1")).await;
    assert_eq!(
        (retry.status, retry.replayed, probe.runs.get()),
        (StatusCode::CREATED, false, 2)
    );
    store.assert_executed_once(); // the open run is not the store's
}

#[tokio::test]
async fn fail_open_an_exact_repeat_during_an_outage_runs_as_a_plain_handler() {
    let (probe, store) = (Probe::default(), MockStore::new());
    let app = app(&probe, failing_open(&store));
    probe.release_first.notify_one(); // the first run is not held
    assert_eq!(
        send(&app, request("/plain", Some("k"), "1")).await.status,
        StatusCode::CREATED
    );
    assert!(send(&app, request("/plain", Some("k"), "1")).await.replayed);
    store.fail_all(true);
    let during = send(&app, request("/plain", Some("k"), "1")).await;
    assert_eq!(
        (during.status, during.replayed, probe.runs.get()),
        (StatusCode::CREATED, false, 2)
    );
    store.fail_all(false);
    let after = send(&app, request("/plain", Some("k"), "1")).await;
    assert_eq!((after.replayed, after.body.as_str()), (true, "run 1 of 1"));
}

// ===== optional =====

#[tokio::test]
async fn optional_a_malformed_key_is_400_invalid_key_and_runs_nothing() {
    let probe = Probe::default();
    let app = app(&probe, Idempotency::new(MemoryStore::new()));
    let long = "k".repeat(256);
    let malformed: [Vec<&[u8]>; 4] = [
        vec![b"".as_slice()],
        vec![long.as_bytes()],
        vec!["café".as_bytes()],
        vec![b"a".as_slice(), b"b".as_slice()],
    ];
    for uri in ["/optional", "/optional-parsed"] {
        for values in &malformed {
            let mut request = request(uri, None, "1");
            for value in values {
                let value = HeaderValue::from_bytes(value).unwrap();
                request.headers_mut().append("idempotency-key", value);
            }
            let reply = send(&app, request).await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{uri} {values:?}: {reply:?}"
            );
            assert!(
                reply.body.contains("urn:idempotent:invalid-key"),
                "{reply:?}"
            );
        }
    }
    assert_eq!(probe.runs.get(), 0);
}

#[tokio::test]
async fn optional_keyless_requests_run_each_time_and_keyed_ones_once() {
    let probe = Probe::default();
    let app = app(&probe, Idempotency::new(MemoryStore::new()));
    for uri in ["/optional", "/optional-parsed"] {
        let before = probe.runs.get();
        let keyless = [
            send(&app, request(uri, None, "1")).await,
            send(&app, request(uri, None, "1")).await,
        ];
        assert!(keyless.iter().all(|reply| !reply.replayed));
        let key = format!("k{uri}");
        let first = send(&app, request(uri, Some(&key), "1")).await;
        let retry = send(&app, request(uri, Some(&key), "1")).await;
        let other = send(&app, request(uri, Some(&key), "2")).await;
        assert_eq!((retry.replayed, retry.body), (true, first.body));
        assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(probe.runs.get() - before, 3);
    }
}
