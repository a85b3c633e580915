//! A store operation that takes effect on the server while its reply is
//! lost (the connection drops after the server committed the statement or
//! ran the script): what the client sees, and what the log says. Nothing
//! runs twice, a stored response reaches the client and is replayed, a
//! released key is free, and none of it is logged as a lost lease or a
//! key left held. A process of its own: the subscriber that records the
//! events is global, since the stores log from whichever worker runs
//! them. Needs `IDEMPOTENT_TEST_POSTGRES_URL` and
//! `IDEMPOTENT_TEST_REDIS_URL`.

mod store_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Json, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::RecordKey;
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{PostgresStore, RedisStore, Store};
use idempotent_core::testing::{MockStore, OpKind};
use idempotent_core::{Endpoint, Idempotency, IdempotentRequest, Scope};
use redis::aio::ConnectionManager;
use serde_json::{Value, json};
use store_support::logs::{Events, Logged, events};
use store_support::{
    Ledger, ReplyDropper, SentTwice, backend_url, pay, store_behind_a_relay, unique_name,
};
use tokio::sync::Notify;
use tracing::Level;

/// A lease of a second: renewed every third of a second, so that a
/// handler of 700 ms sees a renewal.
const PAY: Endpoint = Endpoint::new("pay")
    .scope(Scope::Global)
    .lease(Duration::from_secs(1));

/// What the handler does, set by the test before each request.
#[derive(Clone, Default)]
struct Script {
    /// Answer 503, which is not final: the key is released.
    unavailable: Arc<AtomicBool>,
    /// Take 700 ms, long enough for a renewal.
    slow: Arc<AtomicBool>,
    /// Has the relay lose the answer to the store's next statement.
    lose_next_reply: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Lose it once the next run's handler starts: the answer to its
    /// renewal, completion or release.
    lose_in_handler: Arc<AtomicBool>,
}

impl Script {
    fn set(&self, unavailable: bool, slow: bool, lose_in_handler: bool) {
        self.unavailable.store(unavailable, Ordering::SeqCst);
        self.slow.store(slow, Ordering::SeqCst);
        self.lose_in_handler
            .store(lose_in_handler, Ordering::SeqCst);
    }
}

async fn pay_handler(
    State((ledger, script)): State<(Ledger, Script)>,
    idempotency: IdempotentRequest,
    Json(request): Json<Value>,
) -> Response {
    let fingerprint = PAY.fingerprint(&request);
    idempotency
        .run(&PAY, fingerprint, async move {
            ledger.count();
            if script.lose_in_handler.swap(false, Ordering::SeqCst)
                && let Some(lose) = &script.lose_next_reply
            {
                lose();
            }
            if script.slow.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
            if script.unavailable.load(Ordering::SeqCst) {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            }
            let payment = json!({ "id": rand::random::<u64>(), "amount": request["amount"] });
            (StatusCode::CREATED, Json(payment)).into_response()
        })
        .await
}

fn app(store: impl Store, ledger: &Ledger, script: &Script) -> Router {
    Router::new()
        .route("/payments", axum::routing::post(pay_handler))
        .with_state((ledger.clone(), script.clone()))
        .layer(
            Idempotency::builder(store)
                .store_timeout(Duration::from_secs(5))
                .build(),
        )
}

/// The app on `store`, whose handler has `lose` called to lose the answer
/// to the store's next statement when its script says so.
fn app_losing_replies(
    store: impl Store,
    lose: impl Fn() + Send + Sync + 'static,
) -> (Router, Ledger, Script) {
    let script = Script {
        lose_next_reply: Some(Arc::new(lose)),
        ..Script::default()
    };
    let ledger = Ledger::default();
    (app(store, &ledger, &script), ledger, script)
}

/// Loses the answer to the store's renewal of `keys[1]`, its completion
/// of `keys[2]` and its release of `keys[3]`, each made while the
/// handler runs: the first two are paid once and replayed, the last
/// released all the same. `assert_lost(what, nth)` checks after each that
/// the answer to the `nth` statement so far, `what`, was lost.
async fn renewal_completion_and_release_lost(
    app: &Router,
    ledger: &Ledger,
    script: &Script,
    keys: &[String; 4],
    assert_lost: impl Fn(&str, usize),
) {
    script.set(false, true, true);
    paid_once(app, ledger, &keys[1]).await;
    assert_lost("renewal", 2);
    script.set(false, false, true);
    paid_once(app, ledger, &keys[2]).await;
    assert_lost("completion", 3);
    script.set(true, false, true);
    released(app, ledger, script, &keys[3]).await;
    assert_lost("release", 4);
}

/// The errors logged about `key`, of a global-scope endpoint.
fn errors_about(events: &Events, key: &str) -> Vec<Logged> {
    let key = RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(key.as_bytes()).unwrap(),
    );
    let log_id = key.log_id().to_string();
    let errors = events.at(Level::ERROR, "idempotent_core").into_iter();
    errors
        .filter(|event| event.fields.contains(&log_id))
        .collect()
}

/// Fails unless no error was logged about any of `keys`.
#[track_caller]
fn assert_no_errors_about(events: &Events, keys: &[String]) {
    for key in keys {
        let logged = errors_about(events, key);
        assert!(logged.is_empty(), "{key}: {logged:#?}");
    }
}

/// Pays with `key` and pays again: the first answers `status` after one
/// execution, and the second replays it.
async fn paid_once(app: &Router, ledger: &Ledger, key: &str) {
    let before = ledger.executions();
    let first = pay(app, key, 7).await;
    assert_eq!(first.status, StatusCode::CREATED, "{key}: {:?}", first.body);
    let again = pay(app, key, 7).await;
    assert!(again.replayed(), "{key}: {again:?}");
    assert_eq!(again.body, first.body, "{key}");
    assert_eq!(ledger.executions(), before + 1, "{key}: ran twice");
}

/// Runs into 503 twice with `key`: the key was released after the first.
async fn released(app: &Router, ledger: &Ledger, script: &Script, key: &str) {
    let before = ledger.executions();
    for _ in 0..2 {
        let reply = pay(app, key, 7).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{key}");
        script.set(true, false, false);
    }
    assert_eq!(ledger.executions(), before + 2, "{key}: not released");
}

/// The connection to PostgreSQL drops after the server committed each of
/// a claim, a renewal, a completion and a release, before the store read
/// its answer. The store runs each statement again on another
/// connection, fenced by the claim's token: the claim finds its own lease,
/// the renewal renews it again, the completion and the release find the
/// lease gone and say that the connection broke, and the engine then
/// finds its record stored, or the key free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_statements_applied_before_their_answer_was_lost() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
        return;
    };
    let events = events();
    let (store, relay) = store_behind_a_relay(&url, 1).await;
    let lose = relay.reply_loser();
    let (app, ledger, script) = app_losing_replies(store.clone(), lose.clone());
    let keys = ["claim", "renew", "complete", "release"].map(unique_name);
    let assert_lost = |what: &str, nth| {
        assert_eq!(relay.replies_lost(), nth, "the {what}'s answer was lost");
    };

    lose();
    paid_once(&app, &ledger, &keys[0]).await;
    assert_lost("claim", 1);
    renewal_completion_and_release_lost(&app, &ledger, &script, &keys, assert_lost).await;

    drop(relay);
    let cleanup = PostgresStore::connect(&url).await.expect("connect");
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", store.table()))
        .execute(cleanup.pool())
        .await
        .expect("drop the test table");
    assert_no_errors_about(&events, &keys);
}

/// The connection to Redis drops after Redis ran each of a claim, a
/// renewal, a completion and a release, before the store read its reply
/// (`ConnectionManager` reconnects, and sends nothing again). The claim
/// fails (503, logged as a refusal: nothing ran) and is released by the
/// store, so the retry runs; the renewal fails once and is tried again; the completion and
/// the release are tried again by the engine, find the lease gone, and
/// the engine finds its record stored, or the key free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_commands_applied_before_their_connection_dropped() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let events = events();
    let upstream = url.trim_start_matches("redis://").trim_end_matches('/');
    let relay = ReplyDropper::start(upstream.to_owned()).await;
    let store = RedisStore::connect(&relay.url()).await.expect("connect");
    let drop_next = Arc::clone(&relay.drop_next);
    let lose = move || drop_next.store(true, Ordering::SeqCst);
    let (app, ledger, script) = app_losing_replies(store.clone(), lose.clone());
    let lost = || !relay.drop_next.load(Ordering::SeqCst);
    // Redis keeps the scripts once loaded: a reply lost below is one to
    // the script itself, never one asking for it to be loaded.
    paid_once(&app, &ledger, &unique_name("warm")).await;
    script.set(true, false, false);
    released(&app, &ledger, &script, &unique_name("warm")).await;
    let keys = ["claim", "renew", "complete", "release"].map(unique_name);

    lose();
    let refused = pay(&app, &keys[0], 7).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(lost(), "the claim's reply was lost");
    let executions = ledger.executions();
    script.set(false, false, false);
    store.settle().await;
    paid_once(&app, &ledger, &keys[0]).await;
    assert_eq!(ledger.executions(), executions + 1);
    let assert_lost = |what: &str, _| assert!(lost(), "the {what}'s reply was lost");
    renewal_completion_and_release_lost(&app, &ledger, &script, &keys, assert_lost).await;

    let refusal = errors_about(&events, &keys[0]);
    assert!(
        refusal.len() == 1 && refusal[0].fields.contains("nothing executed"),
        "the claim's 503 is told once: {refusal:#?}"
    );
    assert_no_errors_about(&events, &keys[1..]);
}

/// A store whose client sends each command twice and answers with the
/// second reply: the Redis Cluster client sends a command again after
/// the connection dropped, or its reply timed out, though Redis may have
/// applied it.
async fn sent_twice(url: &str) -> RedisStore<SentTwice> {
    let client = redis::Client::open(url).expect("valid URL");
    let manager = ConnectionManager::new(client).await.expect("connect");
    RedisStore::builder(SentTwice(manager))
        .prefix(unique_name("idem_test") + ":")
        .build()
}

/// The app on a [`sent_twice`] store, with its ledger and script.
async fn app_sending_twice(url: &str) -> (Router, Ledger, Script) {
    let (script, ledger) = (Script::default(), Ledger::default());
    (app(sent_twice(url).await, &ledger, &script), ledger, script)
}

/// Claims, renewals and completions that Redis applies twice: the second
/// claim finds its own lease, the second renewal renews it again, and the
/// second completion finds the lease gone, because the first went
/// through. The response is stored and replayed, and not logged as a
/// lost lease, which says the request may have run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_completions_applied_before_their_answer_was_lost() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let events = events();
    let (app, ledger, script) = app_sending_twice(&url).await;
    let keys = ["completed", "renewed"].map(unique_name);

    paid_once(&app, &ledger, &keys[0]).await;
    script.set(false, true, false);
    paid_once(&app, &ledger, &keys[1]).await;

    assert_no_errors_about(&events, &keys);
}

/// A release that Redis applies twice: the second finds the lease gone,
/// because the first went through. The key is free for the retry, and
/// not logged as a key left held until its lease lapses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_releases_applied_before_their_answer_was_lost() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let events = events();
    let (app, ledger, script) = app_sending_twice(&url).await;
    let key = unique_name("released");

    script.set(true, false, false);
    released(&app, &ledger, &script, &key).await;

    assert_no_errors_about(&events, &[key]);
}

/// A payment endpoint whose first run waits for the test to open a gate,
/// with the default lease of a minute: nothing renews it while the test
/// moves the store's clock past it.
const GATED: Endpoint = Endpoint::new("gated").scope(Scope::Global);

#[derive(Clone, Default)]
struct Gate {
    entered: Arc<Notify>,
    open: Arc<Notify>,
    passed: Arc<AtomicBool>,
    /// The first run answers 503, which is not final: it releases the key.
    first_unavailable: Arc<AtomicBool>,
}

async fn gated_pay(
    State((ledger, gate)): State<(Ledger, Gate)>,
    idempotency: IdempotentRequest,
    Json(request): Json<Value>,
) -> Response {
    let fingerprint = GATED.fingerprint(&request);
    idempotency
        .run(&GATED, fingerprint, async move {
            ledger.count();
            if !gate.passed.swap(true, Ordering::SeqCst) {
                gate.entered.notify_one();
                gate.open.notified().await;
                if gate.first_unavailable.load(Ordering::SeqCst) {
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
            }
            let payment = json!({ "id": rand::random::<u64>(), "amount": request["amount"] });
            (StatusCode::CREATED, Json(payment)).into_response()
        })
        .await
}

/// The contrast: a lease truly lost. The first run outlives its lease, a
/// retry takes the key over and stores a response of its own, and the
/// first run's completion then finds the lease gone, at once or after a
/// first attempt that failed; or its release does, for a status that is
/// not final. A record with the same fingerprint is stored, but not this
/// run's response: the request ran twice, and the log must say so. A
/// release cannot tell this from an attempt whose answer was lost after
/// it freed the key, which another request then claimed: its message
/// names both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_over_is_still_logged_as_lost() {
    let events = events();
    for (fail_first_completion, unavailable) in [(false, false), (true, false), (false, true)] {
        let store = MockStore::new();
        let (ledger, gate) = (Ledger::default(), Gate::default());
        gate.first_unavailable.store(unavailable, Ordering::SeqCst);
        let app = Router::new()
            .route("/payments", axum::routing::post(gated_pay))
            .with_state((ledger.clone(), gate.clone()))
            .layer(Idempotency::new(store.clone()));
        let key = unique_name("taken-over");

        let first = tokio::spawn({
            let (app, key) = (app.clone(), key.clone());
            async move { pay(&app, &key, 7).await }
        });
        gate.entered.notified().await;
        store.advance(GATED.lease_duration() + Duration::from_secs(1));
        let retry = pay(&app, &key, 7).await;
        if fail_first_completion {
            store.fail_next(OpKind::Complete);
        }
        gate.open.notify_one();
        let first = first.await.expect("the first request");

        let case = format!("first completion failing: {fail_first_completion}, 503: {unavailable}");
        assert_eq!(retry.status, StatusCode::CREATED, "{case}");
        let answered = if unavailable {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::CREATED
        };
        assert_eq!(first.status, answered, "{case}");
        assert_eq!(ledger.executions(), 2, "{case}");
        let logged = errors_about(&events, &key);
        let lost = logged
            .iter()
            .find(|event| event.field("outcome") == Some("lease_lost"));
        let lost = lost.unwrap_or_else(|| panic!("{case}: {logged:#?}"));
        if unavailable {
            assert_names_both_readings(lost.message());
        }
    }
}

/// Fails unless a release's `lease_lost` message tells an operator both
/// what is harmless and what is not.
#[track_caller]
fn assert_names_both_readings(message: &str) {
    for reading in [
        "if an attempt to release it timed out or lost its connection",
        "which is harmless",
        "the request may have run twice",
    ] {
        assert!(message.contains(reading), "{reading:?} in {message:?}");
    }
}
