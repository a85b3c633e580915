//! A payments service on PostgreSQL rolling out a new version: `SIGTERM`,
//! axum's graceful shutdown, `Idempotency::drain`, the reaper's stop, and
//! a new process on the same table. A charge under way when the signal
//! comes is answered, stored and replayed by the new process; one whose
//! client went away is stored too once `drain` is awaited. A process that
//! stops without `drain` leaves the charge's lease, as its last renewal
//! set it, to lapse: the retry gets 409 until then and charges again
//! after. The reaper's `shutdown` lets a purge under way finish, then
//! stops it.
// `SIGTERM` is a Unix signal.
#![cfg(unix)]

use crate::macro_support;
use crate::store_support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::clock::ManualClock;
use idempotent_core::record::{Claim, RecordKey};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{PostgresStore, Store};
use idempotent_core::{Fingerprint, Idempotency, IdempotencyKey, idempotent};
use macro_support::{Runs, Turnstile, listen, post_json, send};
use store_support::tables::migrated_postgres;
use store_support::unique_name;
use store_support::{EXPIRY_GRACE, backend_url};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const URL: &str = "IDEMPOTENT_TEST_POSTGRES_URL";
/// How long a test waits for something that must happen before it calls
/// it a failure: never a synchronisation, only a bound on a hang.
const HANG: Duration = Duration::from_secs(10);

/// The side effects done, and the gate each charge waits at after doing
/// its own, before it answers.
#[derive(Clone, Default)]
struct Charges {
    runs: Runs,
    gate: Turnstile,
}

/// Charges, then waits at the gate: a charge whose run is cut short after
/// this has acted, and only its response is lost. Its lease is short, so
/// that a test can wait for it to lapse, and renewed every second while
/// the charge runs.
#[idempotent(scope = "global", lease = "3s")]
async fn charge(State(charges): State<Charges>, Json(amount): Json<u64>) -> (StatusCode, String) {
    let run = charges.runs.bump();
    charges.gate.pass().await;
    (StatusCode::CREATED, format!("charge {run} of {amount}"))
}

fn app(idempotency: &Idempotency, charges: &Charges) -> Router {
    Router::new()
        .route("/charges", post(charge))
        .with_state(charges.clone())
        .layer(idempotency.clone())
}

/// One process's runtime, dropped at the end of its phase as the process
/// ends: every task still on it, and every connection it holds, go with it.
fn process() -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all().build().unwrap()
}

/// A charge of `amount` under `key`, written on a connection of its own,
/// once its handler has started (and charged).
async fn charge_under_way(
    addr: std::net::SocketAddr,
    charges: &Charges,
    key: &str,
    amount: u64,
) -> TcpStream {
    let body = amount.to_string();
    let request = format!(
        "POST /charges HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\nidempotency-key: {key}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(request.as_bytes()).await.unwrap();
    charges.gate.until_started().await;
    client
}

/// Everything the server sends `client` until it closes the connection.
async fn answer_to(mut client: TcpStream) -> String {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(HANG, client.read_to_end(&mut answer)).await;
    read.expect("the server answers").unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Resolves on the next `SIGTERM`, listened for from now on: the signal
/// systemd, Docker and Kubernetes stop a service with.
fn sigterm() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("listen for SIGTERM");
    async move {
        terminate.recv().await;
    }
}

/// Sends this process `SIGTERM`, as a deploy does.
fn send_sigterm() {
    let pid = std::process::id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid}: {status}");
}

/// Waits until the server refuses new connections: it got the signal,
/// and its graceful shutdown has begun.
async fn until_refused(addr: std::net::SocketAddr) {
    let refused = async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(HANG, refused)
        .await
        .expect("the server stops accepting");
}

async fn drop_table(store: &PostgresStore) {
    let sql = format!("DROP TABLE IF EXISTS {}", store.table());
    sqlx::query(&sql).execute(store.pool()).await.unwrap();
}

/// A deploy as the README's "Shutting down" runs it: `SIGTERM` while two
/// charges run, one whose client waits for it and one whose client went
/// away; the graceful shutdown answers the first, and the server stops
/// with the second still at its gate: only `drain` keeps the process
/// alive until that one is stored (without it, the process ends with the
/// charge cut short and its key held, and the next process answers its
/// retry 409). The next process, on the same table, replays each without
/// charging again.
#[test]
fn at_sigterm_charges_under_way_are_stored_and_replayed_by_the_next_process() {
    let Some(url) = backend_url(URL) else { return };
    let table = unique_name("shutdown");
    let charges = Charges::default();
    process().block_on(async {
        let idempotency = Idempotency::new(migrated_postgres(&url, &table).await);
        let (addr, server) = listen(app(&idempotency, &charges), sigterm()).await;
        let waiting = charge_under_way(addr, &charges, "order-1", 100).await;
        drop(charge_under_way(addr, &charges, "order-2", 200).await);
        send_sigterm();
        until_refused(addr).await;
        // The gate lets its waiters through in the order they came: the
        // charge whose client waits goes first.
        charges.gate.let_through(1);
        let answer = answer_to(waiting).await;
        assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
        assert!(answer.ends_with("charge 1 of 100"), "{answer}");
        tokio::time::timeout(HANG, server).await.unwrap().unwrap();
        // The server is done, and the second charge has yet to answer: it
        // goes on only on a task of this process, which ends when this
        // block returns, the task with it, unless `drain` waits for it.
        assert_eq!(charges.runs.get(), 2, "both charges started");
        let gate = charges.gate.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            gate.let_through(1);
        });
        tokio::time::timeout(HANG, idempotency.drain())
            .await
            .unwrap();
    });
    process().block_on(async {
        let store = migrated_postgres(&url, &table).await;
        let next = app(&Idempotency::new(store.clone()), &charges);
        let first = send(&next, post_json("/charges", "order-1", "100")).await;
        assert_eq!((first.status, first.replayed), (StatusCode::CREATED, true));
        assert_eq!(first.body, "charge 1 of 100");
        let second = send(&next, post_json("/charges", "order-2", "200")).await;
        assert_eq!(
            (second.status, second.replayed),
            (StatusCode::CREATED, true),
            "{}",
            second.body
        );
        assert_eq!(second.body, "charge 2 of 200");
        drop_table(&store).await;
    });
    assert_eq!(charges.runs.get(), 2, "each charge ran once");
}

/// The deadline of the one row of `store`'s table, and whether it is a
/// claim still in flight (no response stored).
async fn the_row(store: &PostgresStore) -> (i64, bool) {
    let sql = format!("SELECT expires_at, status IS NULL FROM {}", store.table());
    sqlx::query_as(&sql).fetch_one(store.pool()).await.unwrap()
}

/// Waits until the row's deadline moves past `claimed`: a renewal.
async fn until_renewed(store: &PostgresStore, claimed: i64) -> i64 {
    let renewed = async {
        loop {
            let (deadline, _) = the_row(store).await;
            if deadline > claimed {
                return deadline;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(HANG, renewed)
        .await
        .expect("a renewal")
}

fn unix_millis() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(now.as_millis()).unwrap()
}

/// A process that stops without `drain` while a charge whose client went
/// away runs, after its lease was renewed: the runtime's end releases
/// nothing, so the row keeps the deadline the last renewal gave it. The
/// retry gets 409 until then, and after it charges a second time.
#[test]
fn a_process_that_stops_without_drain_leaves_the_renewed_lease_to_lapse() {
    let Some(url) = backend_url(URL) else { return };
    let table = unique_name("shutdown");
    let charges = Charges::default();
    let renewed = process().block_on(async {
        let store = migrated_postgres(&url, &table).await;
        let idempotency = Idempotency::new(store.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move { drop(stopped.await) };
        let (addr, server) = listen(app(&idempotency, &charges), shutdown).await;
        drop(charge_under_way(addr, &charges, "order-3", 300).await);
        let (claimed, _) = the_row(&store).await;
        let renewed = until_renewed(&store, claimed).await;
        stop.send(()).unwrap();
        tokio::time::timeout(HANG, server).await.unwrap().unwrap();
        renewed // no `drain`: the runtime ends with the charge at the gate
    });
    process().block_on(async {
        let store = migrated_postgres(&url, &table).await;
        let (deadline, in_flight) = the_row(&store).await;
        assert!(in_flight, "nothing was stored");
        assert!(deadline >= renewed, "the lease was not released");
        let next = app(&Idempotency::new(store.clone()), &charges);
        let during = send(&next, post_json("/charges", "order-3", "300")).await;
        assert_eq!(during.status, StatusCode::CONFLICT, "{}", during.body);
        // Past the lease's deadline, as the store reads its clock.
        let left = u64::try_from(deadline - unix_millis()).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(left + 50)).await;
        charges.gate.let_through(1);
        let after = send(&next, post_json("/charges", "order-3", "300")).await;
        assert_eq!((after.status, after.replayed), (StatusCode::CREATED, false));
        assert_eq!(after.body, "charge 2 of 300");
        drop_table(&store).await;
    });
}

/// An expired claim in `store`, whose clock is `clock`, past the grace a
/// purge keeps a lapsed claim for.
async fn an_expired_claim(store: &PostgresStore, clock: &ManualClock, key: &str) {
    let key = RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(key.as_bytes()).unwrap(),
    );
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    let claim = store.claim(&key, fingerprint, Duration::from_secs(1)).await;
    assert!(matches!(claim, Ok(Claim::Acquired(_))), "{claim:?}");
    clock.advance(Duration::from_secs(2) + EXPIRY_GRACE);
}

async fn rows_in(store: &PostgresStore) -> i64 {
    let sql = format!("SELECT count(*) FROM {}", store.table());
    sqlx::query_scalar(&sql)
        .fetch_one(store.pool())
        .await
        .unwrap()
}

/// Waits until a statement waits for a lock on `store`'s table: the
/// reaper's `DELETE`, held back by the test's lock.
async fn until_purge_waits(store: &PostgresStore) {
    let sql = format!(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = '{}'::regclass",
        store.table()
    );
    let waiting = async {
        while sqlx::query_scalar::<_, i64>(&sql)
            .fetch_one(store.pool())
            .await
            .unwrap()
            == 0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(HANG, waiting)
        .await
        .expect("the purge starts");
}

/// `Reaper::shutdown` called while a purge waits on a lock returns only
/// once that purge has deleted its rows, not before: the service that
/// closes its pool next finds the reaper's connection free and its work
/// done. Dropping the reaper, or a `shutdown` that did no more, would
/// return at once, the `DELETE` still waiting in the database. Once it
/// returned, no purge runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaper_shutdown_lets_the_purge_under_way_finish_then_stops() {
    let Some(url) = backend_url(URL) else { return };
    let migrated = migrated_postgres(&url, &unique_name("shutdown")).await;
    let clock = ManualClock::starting_now();
    let store = PostgresStore::builder(migrated.pool().clone())
        .table(migrated.table())
        .clock(clock.clone())
        .build()
        .unwrap();
    an_expired_claim(&store, &clock, "expired").await;
    let mut lock = migrated.pool().begin().await.unwrap();
    let sql = format!("LOCK TABLE {} IN SHARE MODE", store.table());
    sqlx::query(&sql).execute(&mut *lock).await.unwrap();
    let reaper = store.spawn_reaper(Duration::from_millis(1));
    until_purge_waits(&store).await;
    let mut shutdown = tokio::spawn(reaper.shutdown());
    // Time for a shutdown that cuts the purge short to return; one that
    // waits for it cannot, whatever the wait.
    let early = tokio::time::timeout(Duration::from_millis(200), &mut shutdown).await;
    assert!(early.is_err(), "shutdown returned while the purge waited");
    lock.commit().await.unwrap();
    tokio::time::timeout(HANG, shutdown).await.unwrap().unwrap();
    assert_eq!(rows_in(&store).await, 0, "the purge under way finished");
    // Then it stopped: a claim that expires now stays, where a reaper
    // still running would purge it within a few of its 1 ms periods.
    an_expired_claim(&store, &clock, "expired-after").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rows_in(&store).await, 1, "no purge ran after shutdown");
    drop_table(&store).await;
}
