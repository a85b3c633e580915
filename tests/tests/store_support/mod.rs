//! What the `store_*` tests share: finding the test servers, unique names,
//! the SQL stores' tables written by hand,
//! a small payments app to run two instances of, a `redis-server` of a
//! test's own, a relay to PostgreSQL that a test can cut, stall or have
//! lose an answer, and test doubles that change a store's calls.
#![allow(dead_code, unreachable_pub)] // each test file uses a different part

#[path = "../../../idempotent-core/tests/support/events.rs"]
pub mod logs;

#[path = "../../../idempotent-core/tests/support/forwarding.rs"]
pub mod forwarding;

pub mod tables;

use std::io::Write;
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Json, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::BodyExt;
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, LeaseToken, Record, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{Store, StoreError};
use idempotent_core::{Endpoint, Idempotency, IdempotentRequest, Scope};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tower::ServiceExt;

/// The URL of a test server from `var`, or `None` after saying the test is
/// skipped. With `IDEMPOTENT_REQUIRE_BACKENDS=1` a missing URL fails.
pub fn backend_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("IDEMPOTENT_REQUIRE_BACKENDS").as_deref() != Ok("1"),
                "{var} is not set, but IDEMPOTENT_REQUIRE_BACKENDS=1 requires the backend tests to run"
            );
            // Straight to stderr, past the test harness's output capture,
            // so the skip shows in a normal `cargo test` run.
            let _ = writeln!(
                std::io::stderr(),
                "skipped: set {var} to run this test against a real server"
            );
            None
        }
    }
}

/// The SQL or command an error's text suggests between "(`" and "`)", if
/// any.
pub fn suggested_sql(error: &str) -> &str {
    error
        .split_once("(`")
        .and_then(|(_, rest)| rest.split_once("`)"))
        .map_or("", |(sql, _)| sql)
}

/// A connection to the Redis at `url`.
pub async fn redis_connection(url: &str) -> redis::aio::ConnectionManager {
    let client = redis::Client::open(url).expect("valid URL");
    redis::aio::ConnectionManager::new(client)
        .await
        .expect("connect to the test Redis")
}

/// Puts a hash at `redis_key`, where a store keeps a record as a string:
/// a value of another type, as another application sharing the store's
/// prefix would leave there.
pub async fn hash_at(connection: &mut redis::aio::ConnectionManager, redis_key: &str) {
    let _: () = redis::cmd("HSET")
        .arg(redis_key)
        .arg("field")
        .arg("value")
        .query_async(connection)
        .await
        .expect("HSET");
}

/// Deletes `redis_key`.
pub async fn delete(connection: &mut redis::aio::ConnectionManager, redis_key: &str) {
    let _: () = redis::cmd("DEL")
        .arg(redis_key)
        .query_async(connection)
        .await
        .expect("DEL");
}

/// A name no other test run uses: `prefix_<random hex>`.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// Waits up to `within` for `pool` to have `idle` idle connections.
pub async fn pool_reaches_idle<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
    idle: usize,
    within: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while pool.num_idle() != idle {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// A database file in the system temporary directory, deleted with its
/// WAL files when dropped.
pub struct TempDb(pub std::path::PathBuf);

impl TempDb {
    pub fn new() -> Self {
        Self(std::env::temp_dir().join(unique_name("idempotent-test") + ".db"))
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Executions of the payment side effect, shared by every app instance
/// (it stands for the bank both instances charge).
#[derive(Clone, Default)]
pub struct Ledger(Arc<AtomicUsize>);

impl Ledger {
    /// Books one execution, for tests with handlers of their own.
    pub fn count(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    pub fn executions(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Duplicates wait for the first request instead of getting 409, so every
/// duplicate ends with the same answer.
const CREATE_PAYMENT: Endpoint = Endpoint::new("create_payment")
    .scope(Scope::Global)
    .lease(Duration::from_secs(10))
    .wait(Duration::from_secs(20));

async fn create_payment(
    State(ledger): State<Ledger>,
    idempotency: IdempotentRequest,
    Json(request): Json<Value>,
) -> Response {
    let fingerprint = CREATE_PAYMENT.fingerprint(&request);
    idempotency
        .run(&CREATE_PAYMENT, fingerprint, async move {
            ledger.0.fetch_add(1, Ordering::SeqCst);
            // Long enough that concurrent duplicates overlap the first run.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let payment = json!({ "id": rand::random::<u64>(), "amount": request["amount"] });
            (StatusCode::CREATED, Json(payment)).into_response()
        })
        .await
}

/// One app instance on its own store client.
pub fn payments_app(store: impl Store, ledger: &Ledger, store_timeout: Duration) -> Router {
    payments_app_on(
        Idempotency::builder(store)
            .store_timeout(store_timeout)
            .build(),
        ledger,
    )
}

/// The payments app behind an `Idempotency` layer configured by the test.
pub fn payments_app_on(idempotency: Idempotency, ledger: &Ledger) -> Router {
    Router::new()
        .route("/payments", post(create_payment))
        .with_state(ledger.clone())
        .layer(idempotency)
}

/// What a client saw.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|value| value == "true")
    }

    pub fn content_type(&self) -> Option<&str> {
        self.headers
            .get("content-type")
            .and_then(|value| value.to_str().ok())
    }
}

/// POSTs a payment of `amount` with `key` to `app`.
pub async fn pay(app: &Router, key: &str, amount: u64) -> Reply {
    let request = Request::post("/payments")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Body::from(json!({ "amount": amount }).to_string()))
        .expect("valid request");
    let response = app.clone().oneshot(request).await.expect("infallible");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Retries [`pay`] every 100 ms, for up to 10 s, until the store answers
/// with something other than 503; `None` if it never does.
pub async fn pay_until_available(app: &Router, key: &str, amount: u64) -> Option<Reply> {
    for _ in 0..100 {
        let reply = pay(app, key, amount).await;
        if reply.status != StatusCode::SERVICE_UNAVAILABLE {
            return Some(reply);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Sends `count` concurrent duplicates of one payment, alternating between
/// `apps`, and checks that exactly one ran and all got the same answer.
pub async fn duplicates_across_instances(apps: &[Router], ledger: &Ledger, count: usize) {
    let key = unique_name("dup");
    let mut clients = tokio::task::JoinSet::new();
    for index in 0..count {
        let (app, key) = (apps[index % apps.len()].clone(), key.clone());
        clients.spawn(async move { pay(&app, &key, 4200).await });
    }
    let mut replies = Vec::new();
    while let Some(reply) = clients.join_next().await {
        replies.push(reply.expect("client task"));
    }
    assert_eq!(ledger.executions(), 1, "exactly one duplicate executes");
    let first = &replies[0];
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::CREATED, "body: {:?}", reply.body);
        assert_eq!(
            reply.body, first.body,
            "every duplicate gets the same answer"
        );
    }
    let replayed = replies.iter().filter(|reply| reply.replayed()).count();
    assert_eq!(replayed, count - 1, "all but the first are replays");
    for app in apps {
        let again = pay(app, &key, 4200).await;
        assert!(again.replayed(), "each instance replays afterwards");
        assert_eq!(
            again.body, first.body,
            "each instance replays the same answer"
        );
    }
    assert_eq!(ledger.executions(), 1, "replays do not execute");
}

/// What [`complete_with_a_body_of`] saw: the completion, then a read back.
pub type Completion = (Result<(), StoreError>, Result<Option<Record>, StoreError>);

/// `during`, run while four tasks read `store` back to back (an
/// application's steady traffic), once they have read long enough for the
/// store to keep every connection it may keep; the readers stop after.
pub async fn under_steady_reads<S, T>(store: &S, during: impl Future<Output = T>) -> T
where
    S: Store + Clone + 'static,
{
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut traffic = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let (store, busy) = (store.clone(), Arc::clone(&busy));
        traffic.spawn(async move {
            let mut reads = 0;
            while busy.load(Ordering::Relaxed) {
                let key = RecordKey::new(ScopeDigest::global(), steady_key(worker, reads));
                store.get(&key).await.expect("get");
                reads += 1;
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcome = during.await;
    busy.store(false, Ordering::Relaxed);
    while let Some(done) = traffic.join_next().await {
        done.expect("traffic");
    }
    outcome
}

/// What a purge and the application's own query got, each given two
/// seconds.
pub type PurgeAndQuery = (
    Result<Result<u64, StoreError>, tokio::time::error::Elapsed>,
    Result<Result<(), sqlx::Error>, tokio::time::error::Elapsed>,
);

/// `purge` (the store's `purge_expired`), then a connection taken from
/// `pool` (the store's, as the application's own query takes one), each
/// given two seconds while `store` is read steadily ([`under_steady_reads`]).
pub async fn a_purge_and_a_query_under_steady_reads<S, DB>(
    store: &S,
    pool: &sqlx::Pool<DB>,
    purge: impl Future<Output = Result<u64, StoreError>>,
) -> PurgeAndQuery
where
    S: Store + Clone + 'static,
    DB: sqlx::Database,
{
    let within = Duration::from_secs(2);
    under_steady_reads(store, async {
        let purged = tokio::time::timeout(within, purge).await;
        let own_query = tokio::time::timeout(within, pool.acquire()).await;
        (purged, own_query.map(|acquired| acquired.map(drop)))
    })
    .await
}

/// Both of [`a_purge_and_a_query_under_steady_reads`] went through, for a
/// store keeping `hold` connections of a pool of four.
pub fn assert_purge_and_query_passed(hold: u32, (purged, own_query): PurgeAndQuery) {
    assert!(
        matches!(purged, Ok(Ok(_))),
        "holding {hold} of 4: a purge under traffic: {purged:?}"
    );
    assert!(
        matches!(own_query, Ok(Ok(()))),
        "holding {hold} of 4: the application's query under traffic: {own_query:?}"
    );
}

fn steady_key(worker: usize, reads: usize) -> IdempotencyKey {
    IdempotencyKey::parse(format!("steady-{worker}-{reads}").as_bytes()).expect("a valid key")
}

/// Claims `key`, which must be free, on `store`: the claim's token.
pub async fn acquire(
    store: &impl Store,
    key: &RecordKey,
    fingerprint: Fingerprint,
    lease: Duration,
) -> LeaseToken {
    match store.claim(key, fingerprint, lease).await {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("a new key is acquired: {other:?}"),
    }
}

/// Claims a fresh key, completes it with a response whose body has `len`
/// bytes, and reads the record back: past a store's own limit on one value
/// the record must still be kept (without its body), or the lease lapses
/// with nothing stored and a retry runs the handler again.
pub async fn complete_with_a_body_of(store: &impl Store, len: usize) -> Completion {
    let key = RecordKey::new(
        ScopeDigest::from_bytes(rand::random()),
        IdempotencyKey::parse(b"huge").unwrap(),
    );
    let lease = Duration::from_secs(60);
    let token = acquire(store, &key, Fingerprint::from_bytes([1; 32]), lease).await;
    let response = StoredResponse::new(
        StatusCode::OK,
        Vec::new(),
        Some(Bytes::from(vec![b'x'; len])),
    );
    let completed = store.complete(&key, token, response, lease).await;
    (completed, store.get(&key).await)
}

/// Asserts that a [`Completion`] kept the record.
pub fn assert_kept((completed, record): &Completion) {
    assert!(
        completed.is_ok(),
        "the handler ran; its record must be kept (without its body if need be): {completed:?}"
    );
    assert!(
        matches!(record, Ok(Some(Record::Completed(_)))),
        "{record:?}"
    );
}

/// A connection that sends every command twice and answers with the
/// second reply: what the Redis Cluster client does when the connection
/// drops, or the reply times out, after Redis applied the command.
#[derive(Clone)]
pub struct SentTwice(pub redis::aio::ConnectionManager);

impl redis::aio::ConnectionLike for SentTwice {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        Box::pin(async move {
            let _first = self.0.req_packed_command(cmd).await;
            self.0.req_packed_command(cmd).await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        self.0.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

/// A `redis-server` this test owns, on a port of its own.
pub struct OwnRedis {
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    pub fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    pub async fn start(port: u16) -> Self {
        Self::start_with(port, &[]).await
    }

    /// Starts a server with `settings` added to its command line.
    pub async fn start_with(port: u16, settings: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(settings)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server (is it installed?)");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Self {
                    port,
                    child: Some(child),
                };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not start on port {port}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's process id, to signal it (`kill -STOP`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("stop redis-server");
        }
    }
}

/// A relay to Redis that, when told, drops the connection carrying the
/// next reply instead of passing the reply on: the command was applied,
/// and its client never hears so.
pub struct ReplyDropper {
    pub port: u16,
    pub drop_next: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ReplyDropper {
    pub async fn start(upstream: String) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let drop_next = std::sync::Arc::new(AtomicBool::new(false));
        let dropping = drop_next.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let dropping = dropping.clone();
                tokio::spawn(async move {
                    let mut buffer = vec![0; 64 * 1024];
                    while let Ok(read) = server_read.read(&mut buffer).await {
                        if read == 0 || dropping.swap(false, Ordering::SeqCst) {
                            return;
                        }
                        if client_write.write_all(&buffer[..read]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { port, drop_next }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// A TCP relay to the database on a port of its own: stopping it cuts
/// every connection and refuses new ones, as a database restart or a
/// network failure would. Told to by its [`reply_loser`](Self::reply_loser),
/// it cuts the connection that carries the server's next answer to a
/// statement instead of passing the answer on: the server applied the
/// statement, and its client never hears so. Told to by
/// [`partition_after_next_answer`](Self::partition_after_next_answer), it
/// also cuts every other connection then, and refuses new ones until
/// [healed](Self::heal). While [stalled](Self::stall), what the server
/// sends waits in the relay, as over a network that stalled after a
/// request went out.
pub struct Relay {
    pub port: u16,
    pub upstream: (String, u16),
    faults: Arc<Faults>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// What a [`Relay`] is told to do, shared with its connections.
struct Faults {
    lose_next: std::sync::atomic::AtomicBool,
    /// Whether losing the next answer also partitions the network.
    partition_next: std::sync::atomic::AtomicBool,
    lost: AtomicUsize,
    stalled: tokio::sync::watch::Sender<bool>,
    /// Whether the network is partitioned: no connection gets through.
    down: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    pub async fn start(port: u16, upstream: (String, u16)) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the relay port");
        let faults = Arc::new(Faults {
            lose_next: false.into(),
            partition_next: false.into(),
            lost: AtomicUsize::new(0),
            stalled: tokio::sync::watch::Sender::new(false),
            down: tokio::sync::watch::Sender::new(false),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(relay_all(
            listener,
            upstream.clone(),
            Arc::clone(&faults),
            stopped,
        ));
        Self {
            port,
            upstream,
            faults,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// What cuts the connection that carries the server's next answer to
    /// a statement, on any connection, instead of passing the answer on.
    /// PostgreSQL answers a statement outside a transaction once it is
    /// committed: the statement took effect, and its reply is lost.
    pub fn reply_loser(&self) -> impl Fn() + Clone + Send + Sync + 'static {
        let faults = Arc::clone(&self.faults);
        move || faults.lose_next.store(true, Ordering::SeqCst)
    }

    /// How many answers the relay has lost.
    pub fn replies_lost(&self) -> usize {
        self.faults.lost.load(Ordering::SeqCst)
    }

    /// Loses the server's next answer to a statement, as
    /// [`reply_loser`](Self::reply_loser) does, and with it cuts every
    /// other connection and refuses new ones until [`heal`](Self::heal):
    /// the network between the store and its server went down just after
    /// the server committed.
    pub fn partition_after_next_answer(&self) {
        // Before `lose_next`: whoever loses the answer sees both.
        self.faults.partition_next.store(true, Ordering::SeqCst);
        self.faults.lose_next.store(true, Ordering::SeqCst);
    }

    /// Ends the partition: the relay accepts connections again.
    pub fn heal(&self) {
        self.faults.down.send_replace(false);
    }

    /// Holds the server's answers, on every connection, from now until
    /// called again with `false`.
    pub fn stall(&self, stalled: bool) {
        self.faults.stalled.send_replace(stalled);
    }

    /// Returns once the listener and every relayed connection are closed:
    /// aborting the relay's task alone lets a connection forward a little
    /// longer on another worker thread.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Relays every connection `listener` accepts to `upstream` until
/// `stopped`, and closes them all before returning. It listens only while
/// the network is up: partitioned, connecting is refused.
async fn relay_all(
    listener: tokio::net::TcpListener,
    upstream: (String, u16),
    faults: Arc<Faults>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let port = listener.local_addr().expect("the relay's address").port();
    let mut listener = Some(listener);
    let mut down = faults.down.subscribe();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let listening = listener.is_some();
        tokio::select! {
            _ = &mut stopped => break,
            () = turns(&mut down, listening) => {
                listener = match listener {
                    Some(_) => None,
                    None => Some(
                        tokio::net::TcpListener::bind(("127.0.0.1", port))
                            .await
                            .expect("bind the relay port again"),
                    ),
                };
            }
            accepted = accept(listener.as_ref()) => {
                let Ok((inbound, _)) = accepted else { break };
                let (upstream, faults) = (upstream.clone(), Arc::clone(&faults));
                connections.spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await {
                        relay_one(inbound, outbound, &faults).await;
                    }
                });
            }
        }
    }
    // Every relayed connection is closed before `stop` returns.
    connections.shutdown().await;
}

/// Returns once the network goes down if `up`, or back up if not.
async fn turns(down: &mut tokio::sync::watch::Receiver<bool>, up: bool) {
    // The value's guard is not `Send`: it stays here, not across the
    // relay's awaits.
    let _ = down.wait_for(|down| *down == up).await;
}

/// The next connection `listener` accepts; none while there is no
/// listener.
async fn accept(
    listener: Option<&tokio::net::TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Copies one connection both ways until either side closes it, or until
/// `lose_next` is set when the server answers: that answer is dropped
/// with the connection, and counted in `lost`, and with `partition_next`
/// the network goes down. The server's answers wait while `stalled` says
/// so. Once the network is down, the connection is cut.
async fn relay_one(
    inbound: tokio::net::TcpStream,
    outbound: tokio::net::TcpStream,
    faults: &Faults,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (mut client_reads, mut client_writes) = inbound.into_split();
    let (mut server_reads, mut server_writes) = outbound.into_split();
    let (mut stalled, mut down) = (faults.stalled.subscribe(), faults.down.subscribe());
    let requests = async move {
        let _ = tokio::io::copy(&mut client_reads, &mut server_writes).await;
    };
    let answers = async move {
        let mut buffer = vec![0; 64 * 1024];
        loop {
            let read = match server_reads.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            if stalled.wait_for(|stalled| !stalled).await.is_err() {
                return;
            }
            // `2`, BindComplete, starts the answer to a statement executed
            // on a prepared one, as every statement of the store is; not
            // the answer to a preparation, nor to the ping sqlx sends when
            // a connection goes back to its pool.
            if buffer[0] == b'2' && faults.lose_next.swap(false, Ordering::SeqCst) {
                faults.lost.fetch_add(1, Ordering::SeqCst);
                if faults.partition_next.swap(false, Ordering::SeqCst) {
                    faults.down.send_replace(true);
                }
                return;
            }
            if client_writes.write_all(&buffer[..read]).await.is_err() {
                return;
            }
        }
    };
    // Either side ending ends both, as does the network going down: the
    // connection is cut.
    tokio::select! {
        () = requests => {}
        () = answers => {}
        _ = down.wait_for(|down| *down) => {}
    }
}

/// A relay to the database at `url` on a free port, and the options that
/// connect through it.
pub async fn relay_to_the_database(url: &str) -> (sqlx::postgres::PgConnectOptions, Relay) {
    use std::str::FromStr;

    let direct = sqlx::postgres::PgConnectOptions::from_str(url).expect("valid URL");
    let upstream = (direct.get_host().to_owned(), direct.get_port());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let relay = Relay::start(port, upstream).await;
    (direct.host("127.0.0.1").port(port), relay)
}

/// A store whose connections go through a relay (see [`Relay`]) that the
/// test can cut.
pub async fn store_behind_a_relay(
    url: &str,
    hold: u32,
) -> (idempotent_core::store::PostgresStore, Relay) {
    let (options, relay) = relay_to_the_database(url).await;
    use idempotent_core::store::PostgresStore;

    let pool = PostgresStore::pool_options()
        .max_connections(16)
        .connect_with(options)
        .await
        .expect("connect through the relay");
    (postgres_store_on(pool, hold).await, relay)
}

/// A store with a table of its own on `pool`, migrated, keeping up to
/// `hold` of the pool's connections.
pub async fn postgres_store_on(
    pool: sqlx::PgPool,
    hold: u32,
) -> idempotent_core::store::PostgresStore {
    let store = idempotent_core::store::PostgresStore::builder(pool)
        .table(unique_name("idem_test"))
        .hold_connections(hold)
        .build()
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    store
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// How long a durable store keeps a claim past its lease (Redis its keys,
/// the SQL stores' purges their claims): the store's own grace, which
/// tests move a clock past.
pub const EXPIRY_GRACE: Duration = Duration::from_secs(60);

/// A claim whose lease lapsed, and which nobody took over, is still its
/// holder's (renewals held up for a moment): a purge (`purge`, the
/// store's `purge_expired`) within the grace leaves it, so that the
/// holder's completion is stored and replayed, rather than refused
/// (`LeaseLost`) with the next retry running the request again. Once the
/// lease lapsed the grace ago, a purge deletes it. `store` runs on `clock`.
pub async fn a_lapsed_claim_is_kept_for_the_grace<S: Store>(
    store: &S,
    clock: &idempotent_core::clock::ManualClock,
    purge: impl AsyncFn(&S) -> u64,
) {
    let (fingerprint, lease) = (Fingerprint::from_bytes([1; 32]), Duration::from_secs(10));
    let key = RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(b"lapsed").unwrap(),
    );
    let Ok(Claim::Acquired(token)) = store.claim(&key, fingerprint, lease).await else {
        panic!("acquire");
    };
    clock.advance(lease + EXPIRY_GRACE / 2);
    let purged = purge(store).await;
    let response = StoredResponse::new(StatusCode::CREATED, Vec::new(), None);
    let ttl = Duration::from_secs(3600);
    let completed = store.complete(&key, token, response, ttl).await;
    assert!(completed.is_ok(), "the holder completes: {completed:?}");
    assert_eq!(purged, 0, "the claim lapsed within the grace");
    let read = store.get(&key).await.unwrap();
    assert!(matches!(read, Some(Record::Completed(_))), "{read:?}");
    let abandoned = RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(b"abandoned").unwrap(),
    );
    store.claim(&abandoned, fingerprint, lease).await.unwrap();
    clock.advance(lease + EXPIRY_GRACE);
    assert_eq!(purge(store).await, 1, "past the grace");
    assert!(store.get(&key).await.unwrap().is_some(), "the record stays");
}
