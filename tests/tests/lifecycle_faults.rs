//! A claim's first attempt when something goes wrong while it runs, seen
//! from a payments service that must never charge twice: what becomes of
//! the record (stored, released, or left to lapse), what the next retry
//! gets, and what the log says. A lease taken over while the handler runs
//! is one `lease_lost`, with the handler's status and what holds the key;
//! a client that goes away, a handler that panics, a renewal or a
//! completion that fails once, and a runtime that ends with a run in
//! flight each leave the key as the README says.

#[path = "../../idempotent-core/tests/support/events.rs"]
mod events;
mod macro_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use events::{Events, Logged};
use idempotent_core::idempotent;
use idempotent_core::testing::{MockStore, OpKind};
use macro_support::{Turnstile, serve};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

/// How long a test waits for something that must happen before it calls
/// it a failure: never a synchronisation, only a bound on a hang.
const HANG: Duration = Duration::from_secs(10);
/// Past the endpoint's lease of three seconds, on the store's clock.
const PAST_THE_LEASE: Duration = Duration::from_secs(4);
/// What the first run answers with when it is to panic instead.
const PANICS: u16 = 0;

#[derive(Serialize, Deserialize)]
struct Charge {
    amount: u64,
    /// The status the first run answers, or [`PANICS`].
    first: u16,
}

/// Counts runs; each then passes a turnstile.
#[derive(Clone, Default)]
struct Runs {
    count: Arc<AtomicUsize>,
    turnstile: Turnstile,
}

impl Runs {
    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Counts the run, passes the turnstile, then answers: the first run as
    /// `charge.first` says, the others 201.
    async fn run(&self, charge: Charge) -> Response {
        let run = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        self.turnstile.pass().await;
        let status = match (run, charge.first) {
            (1, PANICS) => panic!("the first run failed after it charged"),
            (1, first) => StatusCode::from_u16(first).unwrap(),
            _ => StatusCode::CREATED,
        };
        (status, format!("run {run} amount {}", charge.amount)).into_response()
    }
}

#[idempotent(scope = "global", lease = "3s")]
async fn charge(State(runs): State<Runs>, Json(charge): Json<Charge>) -> Response {
    runs.run(charge).await
}

/// Answers every run with the status asked for, and nothing else, as a
/// capture that returns 204 does; only the first run passes the turnstile.
#[idempotent(scope = "global", lease = "3s")]
async fn first_waits(State(runs): State<Runs>, Json(status): Json<u16>) -> StatusCode {
    let run = runs.count.fetch_add(1, Ordering::SeqCst) + 1;
    if run == 1 {
        runs.turnstile.pass().await;
    }
    StatusCode::from_u16(status).unwrap()
}

fn app(store: &MockStore, runs: &Runs) -> Router {
    Router::new()
        .route("/charges", post(charge))
        .route("/first-waits", post(first_waits))
        .with_state(runs.clone())
        .layer(store.layer())
}

fn charging(first: u16) -> Request<Body> {
    let body = serde_json::json!({"amount": 7, "first": first}).to_string();
    Request::post("/charges")
        .header("content-type", "application/json")
        .header("idempotency-key", "order-7")
        .body(Body::from(body))
        .unwrap()
}

/// The status, whether it is a replay, and the body.
async fn send(app: Router, request: Request<Body>) -> (StatusCode, bool, String) {
    let reply = macro_support::send(&app, request).await;
    (reply.status, reply.replayed, reply.body)
}

/// Moves the store's clock and tokio's together by `total`, in steps
/// shorter than a renewal period, as time passes for a real store: a
/// lease then holds only while it is renewed.
async fn pass(store: &MockStore, total: Duration) {
    let step = Duration::from_millis(250);
    let mut passed = Duration::ZERO;
    while passed < total {
        store.advance(step);
        tokio::time::sleep(step).await;
        passed += step;
    }
}

fn run_answer(status: StatusCode, replayed: bool, run: usize) -> (StatusCode, bool, String) {
    (status, replayed, format!("run {run} amount 7"))
}

/// The events with `outcome`.
fn with_outcome<'a>(events: &'a [Logged], outcome: &str) -> Vec<&'a Logged> {
    let matching = events
        .iter()
        .filter(|e| e.field("outcome") == Some(outcome));
    matching.collect()
}

// ===== a lease taken over while the handler runs =====

/// The first request's handler is held while the store's clock passes its
/// lease and a retry takes the key over and starts its own run; the first
/// run's renewals then find the lease lost, and the first handler answers
/// as `first` says (a status, or a panic) while the retry still runs. Then
/// the retry finishes. Returns every event logged, and the app.
async fn taken_over_while_running(first: u16) -> (Vec<Logged>, Router, MockStore) {
    let (events, _guard) = Events::on_this_thread();
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    let first_request = tokio::spawn(send(app.clone(), charging(first)));
    runs.turnstile.until_started().await;
    store.advance(PAST_THE_LEASE);
    let retry = tokio::spawn(send(app.clone(), charging(first)));
    runs.turnstile.until_started().await;
    // Renewals come every third of the lease: the next ones meet the
    // takeover.
    tokio::time::sleep(Duration::from_secs(2)).await;
    runs.turnstile.let_through(1);
    let first_answer = tokio::time::timeout(HANG, first_request).await.unwrap();
    match first {
        PANICS => assert!(first_answer.unwrap_err().is_panic()),
        first => {
            let status = StatusCode::from_u16(first).unwrap();
            assert_eq!(first_answer.unwrap(), run_answer(status, false, 1));
        }
    }
    runs.turnstile.let_through(1);
    let retry = tokio::time::timeout(HANG, retry).await.unwrap().unwrap();
    assert_eq!(retry, run_answer(StatusCode::CREATED, false, 2));
    store.assert_executed(2);
    (events.take_at_least(tracing::Level::TRACE), app, store)
}

/// The one `lease_lost` of `events`, which must say that the lease was
/// lost while the handler ran and that another request holds the key,
/// without the harmless reading a release after a lost answer needs.
#[track_caller]
fn the_one_lease_lost(events: &[Logged]) -> &Logged {
    let lost = with_outcome(events, "lease_lost");
    assert_eq!(lost.len(), 1, "one takeover, one lease_lost: {lost:#?}");
    let lost = lost[0];
    assert_eq!(lost.level, tracing::Level::ERROR, "{lost:#?}");
    assert_eq!(lost.field("record"), Some("in_flight"), "{lost:#?}");
    let message = lost.message();
    assert!(
        message.contains("taken over while the handler ran"),
        "{lost:#?}"
    );
    assert!(!message.contains("harmless"), "{lost:#?}");
    let warned = events.iter().filter(|e| e.level == tracing::Level::WARN);
    let warned: Vec<_> = warned
        .filter(|e| e.message().contains("taken over while the handler runs"))
        .collect();
    assert_eq!(warned.len(), 1, "the renewal warns at once: {events:#?}");
    assert_eq!(warned[0].field("outcome"), None, "{events:#?}");
    lost
}

#[tokio::test(start_paused = true)]
async fn a_takeover_of_a_run_that_answers_201_is_one_lease_lost_with_its_status() {
    let (events, app, store) = taken_over_while_running(201).await;
    let lost = the_one_lease_lost(&events);
    assert_eq!(lost.field("status"), Some("201"), "{lost:#?}");
    // The retry's run is the one stored: the next retry replays it.
    let replay = send(app, charging(201)).await;
    assert_eq!(replay, run_answer(StatusCode::CREATED, true, 2));
    store.assert_executed(2);
}

#[tokio::test(start_paused = true)]
async fn a_takeover_of_a_run_that_answers_503_is_one_lease_lost_with_its_status() {
    let (events, _, _) = taken_over_while_running(503).await;
    let lost = the_one_lease_lost(&events);
    assert_eq!(lost.field("status"), Some("503"), "{lost:#?}");
    assert_eq!(lost.field("reason"), Some("status is not final"));
}

#[tokio::test(start_paused = true)]
async fn a_takeover_of_a_run_that_panics_is_one_lease_lost() {
    let (events, _, _) = taken_over_while_running(PANICS).await;
    let lost = the_one_lease_lost(&events);
    assert_eq!(lost.field("status"), None, "{lost:#?}");
    assert_eq!(lost.field("reason"), Some("handler panicked"));
}

fn first_waits_answering(status: u16) -> Request<Body> {
    Request::post("/first-waits")
        .header("content-type", "application/json")
        .header("idempotency-key", "capture-7")
        .body(Body::from(status.to_string()))
        .unwrap()
}

/// The first request's handler is held while a retry takes the lapsed key
/// over and answers `status` at once; the first run's renewals then find
/// the lease lost, and it answers `status` too (its completions failing
/// as in an outage when `completions_fail`). Returns every event logged,
/// once whatever the first run left to go on storing has ended.
async fn taken_over_and_answered_first(status: u16, completions_fail: bool) -> Vec<Logged> {
    let (events, _guard) = Events::on_this_thread();
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    let first = tokio::spawn(send(app.clone(), first_waits_answering(status)));
    runs.turnstile.until_started().await;
    store.advance(PAST_THE_LEASE);
    let answer = (StatusCode::from_u16(status).unwrap(), false, String::new());
    let retry = send(app.clone(), first_waits_answering(status)).await;
    assert_eq!(retry, answer);
    // The first run's renewals find the lease lost before it settles.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if completions_fail {
        store.fail_every(OpKind::Complete);
    }
    runs.turnstile.let_through(1);
    let first = tokio::time::timeout(HANG, first).await.unwrap().unwrap();
    assert_eq!(first, answer);
    // Past the lease that a response stored later is tried for.
    tokio::time::sleep(PAST_THE_LEASE).await;
    store.assert_executed(2);
    if completions_fail {
        // The retry's completion, and the first run's one attempt: under
        // a lease known lost, no attempt after it could store anything.
        let operations = store.operations();
        let completions = operations.iter().filter(|op| op.kind() == OpKind::Complete);
        assert_eq!(completions.count(), 2, "{operations:#?}");
    }
    events.take_at_least(tracing::Level::TRACE)
}

/// The retry that took the key over answers, and stores, exactly what the
/// first run then answers (a 204): the first run's completion, refused,
/// finds a record of its own response, which it must not take for its own
/// (the lease was lost before it stored anything). The log says the
/// request ran twice, once, rather than that the first run's response was
/// stored.
#[tokio::test(start_paused = true)]
async fn a_takeover_that_stored_the_same_response_is_a_lease_lost_not_a_stored_run() {
    let events = taken_over_and_answered_first(204, false).await;
    assert_one_lease_lost_beside_the_retrys_204(&events);
}

/// As above, but the first run's completions fail as in an outage, so its
/// response would be stored later: the lease is known lost before it
/// stores, so the retry's record of the same response found then is not
/// this run's, and no later attempt could store under that lease. The
/// log says the request ran twice, once, not that the response was
/// stored once the store answered again.
#[tokio::test(start_paused = true)]
async fn a_takeover_answered_alike_during_an_outage_is_a_lease_lost_not_stored_later() {
    let events = taken_over_and_answered_first(204, true).await;
    assert_one_lease_lost_beside_the_retrys_204(&events);
}

/// Two runs answered 204, and only the retry's was stored: `events` hold
/// one `lease_lost` of the first run, which names the retry's record, and
/// one `executed`, the retry's.
fn assert_one_lease_lost_beside_the_retrys_204(events: &[Logged]) {
    let lost = with_outcome(events, "lease_lost");
    assert_eq!(lost.len(), 1, "two runs, one lease_lost: {events:#?}");
    assert_eq!(lost[0].field("status"), Some("204"), "{lost:#?}");
    assert_eq!(lost[0].field("record"), Some("completed"), "{lost:#?}");
    let executed = with_outcome(events, "executed");
    assert_eq!(
        executed.len(),
        1,
        "only the retry's run was stored: {executed:#?}"
    );
}

/// The retry that took the lapsed key over answers and stores exactly what
/// the first run will (a 204): the first run's renewals, which find the
/// lease lost while its handler still runs, must warn at once, as the
/// README says, and not take the retry's record for one their own run
/// stored (it has stored nothing: its handler has not answered).
#[tokio::test(start_paused = true)]
async fn a_takeover_stored_alike_while_the_handler_runs_is_warned_of_at_once() {
    let (events, _guard) = Events::on_this_thread();
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    let first = tokio::spawn(send(app.clone(), first_waits_answering(204)));
    runs.turnstile.until_started().await;
    store.advance(PAST_THE_LEASE);
    let retry = send(app.clone(), first_waits_answering(204)).await;
    assert_eq!(retry.0, StatusCode::NO_CONTENT);
    // Renewals come every third of the lease: the next ones meet the
    // takeover, while the first handler is still held.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let warned = events.take_at_least(tracing::Level::WARN);
    let warned: Vec<_> = warned
        .iter()
        .filter(|e| e.message().contains("taken over while the handler runs"))
        .collect();
    assert_eq!(warned.len(), 1, "the renewal warns at once: {warned:#?}");
    runs.turnstile.let_through(1);
    tokio::time::timeout(HANG, first).await.unwrap().unwrap();
    store.assert_executed(2);
    // The warning is no outcome: the run still tells its one `lease_lost`.
    let settled = events.take_at_least(tracing::Level::TRACE);
    let lost = with_outcome(&settled, "lease_lost");
    assert_eq!(lost.len(), 1, "one takeover, one lease_lost: {settled:#?}");
    assert_eq!(lost[0].field("record"), Some("completed"), "{lost:#?}");
}

/// The retry that took the key over answers 503 and releases it; the first
/// run, whose renewals found the record gone, answers 503 too, and its
/// release finds nothing to free. That is no release of its own whose
/// answer was lost: the log says the lease was lost while the handler ran,
/// once, and that nothing holds the key.
#[tokio::test(start_paused = true)]
async fn a_takeover_that_released_the_key_is_a_lease_lost_not_a_release() {
    let events = taken_over_and_answered_first(503, false).await;
    let lost = with_outcome(&events, "lease_lost");
    assert_eq!(lost.len(), 1, "two runs, one lease_lost: {events:#?}");
    assert_eq!(lost[0].field("status"), Some("503"), "{lost:#?}");
    assert_eq!(lost[0].field("record"), Some("gone"), "{lost:#?}");
    assert!(
        lost[0].message().contains("while the handler ran"),
        "{lost:#?}"
    );
    let released = with_outcome(&events, "released");
    assert_eq!(
        released.len(),
        1,
        "only the retry released the key: {released:#?}"
    );
}

// ===== the other things that go wrong during a first attempt =====

/// The request's future is dropped mid-handler (the client hung up): the
/// handler runs on, its final answer is stored, and the retry replays it;
/// a retry while it runs gets 409.
#[tokio::test(start_paused = true)]
async fn a_run_whose_client_went_away_is_stored_and_replayed() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    let first = tokio::spawn(send(app.clone(), charging(201)));
    runs.turnstile.until_started().await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    let during = send(app.clone(), charging(201)).await;
    assert_eq!(during.0, StatusCode::CONFLICT, "{}", during.2);
    runs.turnstile.let_through(1);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let retry = send(app, charging(201)).await;
    assert_eq!(retry, run_answer(StatusCode::CREATED, true, 1));
    store.assert_executed_once();
}

/// The same, when the handler then answers a status that is not final:
/// the key is released, and the retry runs.
#[tokio::test(start_paused = true)]
async fn a_run_whose_client_went_away_and_that_answers_503_releases_the_key() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    let first = tokio::spawn(send(app.clone(), charging(503)));
    runs.turnstile.until_started().await;
    first.abort();
    runs.turnstile.let_through(2);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(store.count(OpKind::Release), 1, "{:?}", store.operations());
    let retry = send(app, charging(503)).await;
    assert_eq!(retry, run_answer(StatusCode::CREATED, false, 2));
}

/// The retry after a run that panicked freed the key: the handler runs a
/// second time, at once.
async fn the_retry_runs_again(app: Router, store: &MockStore) {
    let retry = send(app, charging(PANICS)).await;
    assert_eq!(retry, run_answer(StatusCode::CREATED, false, 2));
    store.assert_executed(2);
}

/// A handler that panics (here after it charged) releases the key, as the
/// README says: the panic reaches the server, and the retry runs the
/// handler again at once.
#[tokio::test(start_paused = true)]
async fn a_handler_that_panics_releases_the_key_and_the_retry_runs_again() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    runs.turnstile.let_through(2);
    let first = tokio::spawn(send(app.clone(), charging(PANICS)));
    assert!(first.await.unwrap_err().is_panic());
    assert_eq!(store.count(OpKind::Release), 1, "{:?}", store.operations());
    the_retry_runs_again(app, &store).await;
}

/// A renewal that fails once is tried again soon, and succeeds: the lease
/// holds, a retry meanwhile gets 409, the run is stored once and
/// replayed; the log warns once and says at info that it renewed again,
/// with no error.
#[tokio::test(start_paused = true)]
async fn a_renewal_that_fails_once_keeps_the_lease_and_the_run_is_stored_once() {
    let (events, _guard) = Events::on_this_thread();
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    store.fail_next(OpKind::Renew);
    let first = tokio::spawn(send(app.clone(), charging(201)));
    runs.turnstile.until_started().await;
    // Past the first lease: only the renewals hold it.
    pass(&store, PAST_THE_LEASE).await;
    assert_eq!(store.failures(), 1, "{:?}", store.operations());
    assert!(store.count(OpKind::Renew) >= 3, "{:?}", store.operations());
    let during = send(app.clone(), charging(201)).await;
    assert_eq!(during.0, StatusCode::CONFLICT, "{}", during.2);
    runs.turnstile.let_through(1);
    let first = tokio::time::timeout(HANG, first).await.unwrap().unwrap();
    assert_eq!(first, run_answer(StatusCode::CREATED, false, 1));
    let retry = send(app, charging(201)).await;
    assert_eq!(retry, run_answer(StatusCode::CREATED, true, 1));
    store.assert_executed_once();

    let events = events.take_at_least(tracing::Level::INFO);
    let levels: Vec<_> = events.iter().map(|e| (e.level, e.message())).collect();
    let errors = events.iter().filter(|e| e.level == tracing::Level::ERROR);
    assert_eq!(errors.count(), 0, "{levels:#?}");
    let renewed = events
        .iter()
        .any(|e| e.message() == "renewed the lease again");
    assert!(renewed, "{levels:#?}");
}

/// A completion that fails, and fails again on every quick attempt, is
/// stored later while the lease is renewed: the caller gets its response,
/// a retry meanwhile gets 409 (not a second run), and once the store
/// takes the completion the retry replays it.
#[tokio::test(start_paused = true)]
async fn a_completion_that_fails_then_a_retry_gets_409_then_the_replay() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    runs.turnstile.let_through(2);
    store.fail_every(OpKind::Complete);
    let first = send(app.clone(), charging(201)).await;
    assert_eq!(first, run_answer(StatusCode::CREATED, false, 1));
    assert_eq!(store.count(OpKind::Complete), 0);
    let during = send(app.clone(), charging(201)).await;
    assert_eq!(during.0, StatusCode::CONFLICT, "{}", during.2);
    // Storing goes on for a lease (three seconds), renewing it.
    pass(&store, Duration::from_millis(1_500)).await;
    let during = send(app.clone(), charging(201)).await;
    assert_eq!(during.0, StatusCode::CONFLICT, "{}", during.2);
    assert_eq!(store.count(OpKind::Complete), 0);
    store.fail_all(false);
    pass(&store, Duration::from_secs(3)).await;
    assert_eq!(store.count(OpKind::Complete), 1, "{:?}", store.operations());
    let retry = send(app, charging(201)).await;
    assert_eq!(retry, run_answer(StatusCode::CREATED, true, 1));
    store.assert_executed_once();
}

/// The client hangs up mid-handler, and the handler then panics: the
/// rest of the run, on a task of its own, still releases the key (the
/// panic goes nowhere), so the retry runs at once rather than getting 409
/// until the lease lapses, and no 500 is stored.
#[tokio::test(start_paused = true)]
async fn a_run_whose_client_went_away_and_that_panics_releases_the_key() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    let first = tokio::spawn(send(app.clone(), charging(PANICS)));
    runs.turnstile.until_started().await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    runs.turnstile.let_through(2);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(store.count(OpKind::Release), 1, "{:?}", store.operations());
    assert_eq!(store.count(OpKind::Complete), 0, "{:?}", store.operations());
    the_retry_runs_again(app, &store).await;
}

/// A handler that panics while the store fails the release once: the
/// release is tried again and frees the key, and the panic still reaches
/// the server; the retry runs at once.
#[tokio::test(start_paused = true)]
async fn a_panic_whose_release_fails_once_still_frees_the_key() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    runs.turnstile.let_through(2);
    store.fail_next(OpKind::Release);
    let first = tokio::spawn(send(app.clone(), charging(PANICS)));
    let first = tokio::time::timeout(HANG, first).await.unwrap();
    assert!(first.unwrap_err().is_panic());
    assert_eq!(store.failures(), 1, "{:?}", store.operations());
    assert_eq!(store.count(OpKind::Release), 1, "{:?}", store.operations());
    the_retry_runs_again(app, &store).await;
}

/// Every renewal fails while the handler runs past its lease, and a
/// retry takes the lapsed key over and runs beside it: no renewal found
/// the lease lost, so only fencing stands between the first run's answer
/// and the retry's record. The first run's completion is refused, the
/// retry's answer is the one stored and replayed, and the log says once
/// that the lease was lost.
#[tokio::test(start_paused = true)]
async fn renewals_that_fail_until_a_takeover_leave_the_first_answer_unstored() {
    let (events, _guard) = Events::on_this_thread();
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    store.fail_every(OpKind::Renew);
    let first = tokio::spawn(send(app.clone(), charging(201)));
    runs.turnstile.until_started().await;
    pass(&store, PAST_THE_LEASE).await;
    let retry = tokio::spawn(send(app.clone(), charging(201)));
    runs.turnstile.until_started().await;
    runs.turnstile.let_through(1);
    let first = tokio::time::timeout(HANG, first).await.unwrap().unwrap();
    assert_eq!(first, run_answer(StatusCode::CREATED, false, 1));
    store.fail_all(false);
    runs.turnstile.let_through(1);
    let retry = tokio::time::timeout(HANG, retry).await.unwrap().unwrap();
    assert_eq!(retry, run_answer(StatusCode::CREATED, false, 2));
    tokio::time::sleep(PAST_THE_LEASE).await;
    let replay = send(app, charging(201)).await;
    assert_eq!(replay, run_answer(StatusCode::CREATED, true, 2));
    store.assert_executed(2);
    let events = events.take_at_least(tracing::Level::TRACE);
    let lost = with_outcome(&events, "lease_lost");
    assert_eq!(lost.len(), 1, "{events:#?}");
    assert_eq!(lost[0].field("record"), Some("in_flight"), "{lost:#?}");
}

/// The store turns slower than the store timeout just as the handler
/// answers: every completion, and the read after them, times out on the
/// engine's own timer. The caller gets its answer, a retry meanwhile gets
/// 409 (never a second run: this process holds the key, whatever the store
/// cannot answer), and once the store is fast again the response is
/// stored later and replayed.
#[tokio::test(start_paused = true)]
async fn completions_slower_than_the_store_timeout_are_stored_later() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = Router::new()
        .route("/charges", post(charge))
        .with_state(runs.clone())
        .layer(
            idempotent_core::Idempotency::builder(store.clone())
                .store_timeout(Duration::from_millis(200))
                .build(),
        );
    let first = tokio::spawn(send(app.clone(), charging(201)));
    runs.turnstile.until_started().await;
    store.set_delay(Duration::from_secs(1));
    runs.turnstile.let_through(1);
    pass(&store, Duration::from_millis(2_500)).await;
    let first = tokio::time::timeout(HANG, first).await.unwrap().unwrap();
    assert_eq!(first, run_answer(StatusCode::CREATED, false, 1));
    assert_eq!(store.count(OpKind::Complete), 0, "{:?}", store.operations());
    let during = send(app.clone(), charging(201)).await;
    assert_eq!(during.0, StatusCode::CONFLICT, "{}", during.2);
    store.set_delay(Duration::ZERO);
    pass(&store, PAST_THE_LEASE).await;
    assert_eq!(store.count(OpKind::Complete), 1, "{:?}", store.operations());
    runs.turnstile.let_through(1);
    let retry = send(app, charging(201)).await;
    assert_eq!(retry, run_answer(StatusCode::CREATED, true, 1));
    assert_eq!(runs.count(), 1);
}

// ===== a runtime that ends with a run in flight =====

/// A multi-thread runtime for one phase of a test.
fn runtime() -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all().build().unwrap()
}

/// Serves `app` (see [`serve`]) with a charge sent over a connection of
/// its own, once its handler has started.
async fn serve_a_running_charge(
    app: Router,
    runs: &Runs,
) -> (
    tokio::net::TcpStream,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let body = r#"{"amount":7,"first":201}"#;
    let charge = format!(
        "POST /charges HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\nidempotency-key: order-7\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (mut client, stop, server) = serve(app).await;
    client.write_all(charge.as_bytes()).await.unwrap();
    runs.turnstile.until_started().await;
    (client, stop, server)
}

/// A client still connected when the graceful shutdown starts: axum lets
/// its request finish, so the run is stored and the retry (on the next
/// process) replays it.
#[test]
fn a_graceful_shutdown_lets_a_connected_request_finish_and_store_its_run() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    runtime().block_on(async {
        let (mut client, stop, server) = serve_a_running_charge(app.clone(), &runs).await;
        stop.send(()).unwrap();
        runs.turnstile.let_through(1);
        let mut answer = Vec::new();
        let read = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut answer);
        drop(tokio::time::timeout(HANG, read).await.unwrap());
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
        tokio::time::timeout(HANG, server).await.unwrap().unwrap();
    });
    runtime().block_on(async {
        let retry = send(app, charging(201)).await;
        assert_eq!(retry, run_answer(StatusCode::CREATED, true, 1));
    });
    store.assert_executed_once();
}

/// A client that hung up, a graceful shutdown, and a runtime dropped
/// without `drain`: the run is cut mid-handler, nothing stores or releases
/// its claim, and the key stays claimed until its lease lapses (409 until
/// then); the retry after that runs the handler a second time, as the
/// README's "Shutting down" says.
#[test]
fn a_runtime_dropped_without_drain_leaves_the_key_claimed_until_the_lease_lapses() {
    let (store, runs) = (MockStore::new(), Runs::default());
    let app = app(&store, &runs);
    runtime().block_on(async {
        let (client, stop, server) = serve_a_running_charge(app.clone(), &runs).await;
        drop(client);
        stop.send(()).unwrap();
        tokio::time::timeout(HANG, server).await.unwrap().unwrap();
    });
    assert_eq!(runs.count(), 1);
    runtime().block_on(async {
        let during = send(app.clone(), charging(201)).await;
        assert_eq!(during.0, StatusCode::CONFLICT, "{}", during.2);
        store.advance(PAST_THE_LEASE);
        runs.turnstile.let_through(1);
        let retry = send(app, charging(201)).await;
        assert_eq!(retry, run_answer(StatusCode::CREATED, false, 2));
    });
    store.assert_executed(2);
    assert_eq!(store.count(OpKind::Complete), 1);
    assert_eq!(store.count(OpKind::Release), 0);
}
