//! The HTTP contract under concurrency and store faults, on every durable
//! store: two instances (each a `Router` with its own `Idempotency` and
//! its own connections) share one database, many clients send requests
//! over a small key space with the same or a different payload, handlers
//! sleep, answer 5xx or 429, refuse with a stored 400, or panic, some
//! clients hang up early, and meanwhile the store's connections are killed
//! and the server is stalled at random moments (for longer than the store
//! timeout, less than the lease); clients told 409 often try again until
//! the first run is over. Every handler execution
//! and every answer is recorded, and afterwards checked against the
//! contract:
//!
//! - per key, executions never overlap, and only the last one may have
//!   produced a final (stored) response: after a stored response nothing
//!   runs again;
//! - every replay is, byte for byte, the response of the execution that
//!   stored it, for the same payload;
//! - every other handler response went to the request that ran it;
//! - the library's own answers are 409, 422 or 503 problems, nothing else;
//! - once the faults stop and the runs finish, no key answers 409 for
//!   longer than its lease, and each key then replays its stored response;
//! - nothing panics but the handlers that panic on purpose.
//!
//! Each store runs for `IDEMPOTENT_CHAOS_SECS` seconds (3 by default) with
//! `IDEMPOTENT_CHAOS_CLIENTS` clients (12); `IDEMPOTENT_CHAOS_SEED` replays
//! a seed's plan (the interleaving still varies). The PostgreSQL and Redis
//! variants need the test servers (`IDEMPOTENT_TEST_POSTGRES_URL`,
//! `IDEMPOTENT_TEST_REDIS_URL`) and say that they skipped without them.
//! The tests of this file run one at a time: each loads the machine.

mod store_support;

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Once, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Json, Query, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::BodyExt;
use idempotent_core::store::{PostgresStore, RedisStore, SqliteStore, Store, Tiered};
use idempotent_core::{Idempotency, idempotent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPool};
use store_support::logs::events;
use store_support::{backend_url, unique_name};
use tower::ServiceExt;

const POSTGRES: &str = "IDEMPOTENT_TEST_POSTGRES_URL";
const REDIS: &str = "IDEMPOTENT_TEST_REDIS_URL";

/// The handlers' lease (`lease = "2s"` below).
const LEASE: Duration = Duration::from_secs(2);
/// Short, so that stalls cut store calls off: claims abandoned mid-way,
/// completions tried again, renewals retried.
const STORE_TIMEOUT: Duration = Duration::from_millis(500);
/// The longest a fault keeps the store from answering: longer than the
/// store timeout, so that calls are cut short (claims abandoned,
/// completions and renewals tried again), but shorter than the lease less
/// a renewal period, so that a running handler's lease is always renewed
/// in time (a renewal sent during a stall is applied after it) and a
/// second run of a key is always a bug.
const MAX_STALL_MS: u64 = 1200;
/// The panic message of a handler that panics on purpose.
const MARKER: &str = "chaos handler panics on purpose";
/// A new set of keys comes into use this often.
const EPOCH: Duration = Duration::from_millis(600);
const KEYS_PER_EPOCH: u64 = 6;

// ===== the handlers =====

/// What the handler does; not part of the fingerprint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Act {
    /// 201 at once.
    Created,
    /// 201 after `ms`.
    Slow,
    /// 500 after `ms`: not final, the key is released.
    Fail,
    /// 429: not final.
    Busy,
    /// 400: final, stored and replayed like a success.
    Refuse,
    /// Panics after `ms`: the key is released.
    Panic,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Mode {
    act: Act,
    ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Payload {
    key: String,
    variant: u8,
}

#[derive(Clone)]
struct World {
    instance: u8,
    log: Arc<Log>,
}

#[idempotent(
    name = "chaos.charge",
    scope = "global",
    ttl = "1h",
    lease = "2s",
    skip(mode)
)]
async fn charge(
    State(world): State<World>,
    headers: HeaderMap,
    Query(mode): Query<Mode>,
    Json(payload): Json<Payload>,
) -> Response {
    act(&world, &headers, mode, &payload, Route::Charge).await
}

/// The same with `wait`: duplicates in flight wait for the first run.
#[idempotent(
    name = "chaos.charge_waiting",
    scope = "global",
    ttl = "1h",
    lease = "2s",
    wait = "3s",
    skip(mode)
)]
async fn charge_waiting(
    State(world): State<World>,
    headers: HeaderMap,
    Query(mode): Query<Mode>,
    Json(payload): Json<Payload>,
) -> Response {
    act(&world, &headers, mode, &payload, Route::Waiting).await
}

async fn act(
    world: &World,
    headers: &HeaderMap,
    mode: Mode,
    payload: &Payload,
    route: Route,
) -> Response {
    let request = headers
        .get("x-chaos-request")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .unwrap_or(u64::MAX);
    let id = world.log.begin(route, payload, request, world.instance);
    if mode.ms > 0 {
        tokio::time::sleep(Duration::from_millis(mode.ms)).await;
    }
    let status = match mode.act {
        Act::Created | Act::Slow => StatusCode::CREATED,
        Act::Fail => StatusCode::INTERNAL_SERVER_ERROR,
        Act::Busy => StatusCode::TOO_MANY_REQUESTS,
        Act::Refuse => StatusCode::BAD_REQUEST,
        Act::Panic => {
            world.log.end(id, None);
            panic!("{MARKER}");
        }
    };
    let nonce = rand::random::<u64>();
    let body = serde_json::json!({
        "exec": id,
        "key": payload.key,
        "variant": payload.variant,
        "instance": world.instance,
        "nonce": nonce,
    })
    .to_string();
    let answer = Answer {
        status,
        exec: Some(id),
        nonce: Some(nonce),
        content_type: Some("application/json".to_owned()),
        body: Bytes::from(body.clone()),
        replayed: false,
        problem: None,
    };
    world.log.end(id, Some(answer));
    (
        status,
        [
            ("content-type", "application/json".to_owned()),
            ("x-chaos-exec", id.to_string()),
            ("x-chaos-nonce", nonce.to_string()),
        ],
        body,
    )
        .into_response()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Route {
    Charge,
    Waiting,
}

impl Route {
    fn path(self) -> &'static str {
        match self {
            Self::Charge => "/charge",
            Self::Waiting => "/charge-waiting",
        }
    }
}

/// One instance of the service.
fn instance(store: impl Store, instance: u8, log: &Arc<Log>) -> (Router, Idempotency) {
    let idempotency = Idempotency::builder(store)
        .store_timeout(STORE_TIMEOUT)
        .build();
    let world = World {
        instance,
        log: Arc::clone(log),
    };
    let router = Router::new()
        .route(Route::Charge.path(), post(charge))
        .route(Route::Waiting.path(), post(charge_waiting))
        .with_state(world)
        .layer(idempotency.clone());
    (router, idempotency)
}

// ===== the record =====

/// A response, as the handler made it or as a client received it.
#[derive(Clone, Debug)]
struct Answer {
    status: StatusCode,
    /// `x-chaos-exec`: the execution that made it.
    exec: Option<u64>,
    nonce: Option<u64>,
    content_type: Option<String>,
    body: Bytes,
    replayed: bool,
    /// The problem `type` of one the library made.
    problem: Option<String>,
}

#[derive(Clone, Debug)]
struct Exec {
    id: u64,
    route: Route,
    key: String,
    variant: u8,
    request: u64,
    instance: u8,
    started: Duration,
    ended: Option<Duration>,
    /// `None` for a panic, or a run that never ended.
    answer: Option<Answer>,
}

impl Exec {
    /// Whether the library must have stored its response.
    fn is_final(&self) -> bool {
        self.answer.as_ref().is_some_and(|answer| {
            matches!(answer.status, StatusCode::CREATED | StatusCode::BAD_REQUEST)
        })
    }
}

#[derive(Clone, Debug)]
enum Outcome {
    Answered(Answer),
    /// The client hung up before the answer.
    Dropped,
    /// The request's task panicked with this message.
    Panicked(String),
}

#[derive(Clone, Debug)]
struct Sent {
    id: u64,
    route: Route,
    key: String,
    variant: u8,
    instance: u8,
    act: Act,
    sent: Duration,
    received: Duration,
    outcome: Outcome,
    /// Sent after the faults stopped and the runs finished.
    settling: bool,
}

struct Log {
    origin: Instant,
    next: AtomicU64,
    execs: Mutex<Vec<Exec>>,
    sent: Mutex<Vec<Sent>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Log {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            next: AtomicU64::new(1),
            execs: Mutex::new(Vec::new()),
            sent: Mutex::new(Vec::new()),
        })
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn begin(&self, route: Route, payload: &Payload, request: u64, instance: u8) -> u64 {
        let id = self.next_id();
        lock(&self.execs).push(Exec {
            id,
            route,
            key: payload.key.clone(),
            variant: payload.variant,
            request,
            instance,
            started: self.now(),
            ended: None,
            answer: None,
        });
        id
    }

    fn end(&self, id: u64, answer: Option<Answer>) {
        let now = self.now();
        let mut execs = lock(&self.execs);
        let exec = execs
            .iter_mut()
            .rev()
            .find(|exec| exec.id == id)
            .expect("a started execution");
        exec.ended = Some(now);
        exec.answer = answer;
    }
}

// ===== what the library logs, and panics =====

/// Panics other than the handlers' own.
static PANICS: LazyLock<Mutex<Vec<String>>> = LazyLock::new(Mutex::default);

/// The warnings and errors the library logged since the last call, counted
/// by level, outcome and message.
fn library_warnings() -> BTreeMap<String, usize> {
    let mut counted = BTreeMap::new();
    let logged = events().take_at_least(tracing::Level::WARN);
    for event in logged
        .iter()
        .filter(|event| event.target.starts_with("idempotent_core"))
    {
        let outcome = event.field("outcome").unwrap_or("-");
        let name = format!("{} {outcome}: {}", event.level, event.message());
        *counted.entry(name).or_default() += 1;
    }
    counted
}

fn watch_events_and_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        events();
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = panic_message(info.payload());
            if message.contains(MARKER) {
                return;
            }
            let at = info
                .location()
                .map(|location| location.to_string())
                .unwrap_or_default();
            lock(&PANICS).push(format!("{message} at {at}"));
            default(info);
        }));
    });
    library_warnings(); // forgets what an earlier case logged
    lock(&PANICS).clear();
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

// ===== the clients =====

#[derive(Clone, Copy)]
struct Settings {
    duration: Duration,
    clients: usize,
    seed: u64,
}

impl Settings {
    fn from_env() -> Self {
        let number = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|value| value.parse().ok())
                .unwrap_or(default)
        };
        Self {
            duration: Duration::from_secs(number("IDEMPOTENT_CHAOS_SECS", 3)),
            clients: usize::try_from(number("IDEMPOTENT_CHAOS_CLIENTS", 12)).unwrap_or(12),
            seed: number("IDEMPOTENT_CHAOS_SEED", rand::random()),
        }
    }
}

struct Plan {
    route: Route,
    key: String,
    variant: u8,
    mode: Mode,
    instance: u8,
    hang_up_after: Option<Duration>,
}

fn plan(rng: &mut StdRng, elapsed: Duration) -> Plan {
    let route = if rng.random_bool(0.75) {
        Route::Charge
    } else {
        Route::Waiting
    };
    let epoch = elapsed.as_millis() / EPOCH.as_millis();
    // Mostly this epoch's keys, sometimes those of the last three, so
    // that a key still gets retries after a slow run's lease would have
    // lapsed without renewals.
    let back = match rng.random_range(0..100) {
        0..65 => 0,
        65..80 => 1,
        80..90 => 2,
        _ => 3,
    };
    let epoch = epoch.saturating_sub(back);
    let tag = match route {
        Route::Charge => "c",
        Route::Waiting => "w",
    };
    let key = format!("{tag}{epoch}-{}", rng.random_range(0..KEYS_PER_EPOCH));
    let variant = u8::from(rng.random_bool(0.15));
    let (act, ms) = match rng.random_range(0..100) {
        0..55 => (Act::Created, 0),
        55..70 => (Act::Slow, rng.random_range(50..1500)),
        70..73 => (Act::Slow, rng.random_range(2500..3000)),
        73..83 => (Act::Fail, rng.random_range(0..300)),
        83..87 => (Act::Busy, 0),
        87..93 => (Act::Refuse, 0),
        _ => (Act::Panic, rng.random_range(0..300)),
    };
    let hang_up_after = rng
        .random_bool(0.08)
        .then(|| Duration::from_millis(rng.random_range(5..400)));
    Plan {
        route,
        key,
        variant,
        mode: Mode { act, ms },
        instance: rng.random_range(0..2),
        hang_up_after,
    }
}

async fn send(apps: &[Router], log: &Arc<Log>, plan: Plan, settling: bool) -> Sent {
    let id = log.next_id();
    let payload = Payload {
        key: plan.key.clone(),
        variant: plan.variant,
    };
    let act = serde_json::to_value(plan.mode.act).expect("an act serializes");
    let uri = format!(
        "{}?act={}&ms={}",
        plan.route.path(),
        act.as_str().expect("a string"),
        plan.mode.ms
    );
    let request = Request::post(uri)
        .header("idempotency-key", &plan.key)
        .header("content-type", "application/json")
        .header("x-chaos-request", id.to_string())
        .body(Body::from(
            serde_json::to_vec(&payload).expect("serializes"),
        ))
        .expect("a valid request");
    let app = apps[usize::from(plan.instance)].clone();
    let sent = log.now();
    let call = tokio::spawn(async move {
        let response = app.oneshot(request).await.expect("infallible");
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("the body").to_bytes();
        (parts, body)
    });
    let abort = call.abort_handle();
    let joined = match plan.hang_up_after {
        None => Some(call.await),
        Some(after) => tokio::time::timeout(after, call).await.ok(),
    };
    let outcome = match joined {
        None => {
            abort.abort();
            Outcome::Dropped
        }
        Some(Ok((parts, body))) => Outcome::Answered(answer_of(&parts, body)),
        Some(Err(error)) if error.is_panic() => {
            Outcome::Panicked(panic_message(&*error.into_panic()))
        }
        Some(Err(error)) => Outcome::Panicked(error.to_string()),
    };
    let sent = Sent {
        id,
        route: plan.route,
        key: plan.key,
        variant: plan.variant,
        instance: plan.instance,
        act: plan.mode.act,
        sent,
        received: log.now(),
        outcome,
        settling,
    };
    lock(&log.sent).push(sent.clone());
    sent
}

fn answer_of(parts: &axum::http::response::Parts, body: Bytes) -> Answer {
    fn header<T: FromStr>(headers: &HeaderMap, name: &str) -> Option<T> {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse().ok())
    }
    let problem = parts
        .headers
        .get("content-type")
        .is_some_and(|value| value == "application/problem+json")
        .then(|| {
            serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|value| value["type"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "unreadable problem".to_owned())
        });
    Answer {
        status: parts.status,
        exec: header(&parts.headers, "x-chaos-exec"),
        nonce: header(&parts.headers, "x-chaos-nonce"),
        content_type: header(&parts.headers, "content-type"),
        replayed: parts
            .headers
            .get("idempotent-replayed")
            .is_some_and(|value| value == "true"),
        body,
        problem,
    }
}

async fn client(apps: Arc<Vec<Router>>, log: Arc<Log>, seed: u64, until: Instant) {
    let mut rng = StdRng::seed_from_u64(seed);
    while Instant::now() < until {
        let plan = plan(&mut rng, log.now());
        let (route, key, variant, instance) =
            (plan.route, plan.key.clone(), plan.variant, plan.instance);
        let mut answer = send(&apps, &log, plan, false).await;
        // A client told 409 often tries again after a while, as
        // `Retry-After` asks, until the first run is over.
        let mut retries = if rng.random_bool(0.5) { 12 } else { 0 };
        while retries > 0 && is_conflict(&answer) && Instant::now() < until {
            retries -= 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
            let retry = Plan {
                route,
                key: key.clone(),
                variant,
                mode: Mode {
                    act: Act::Created,
                    ms: 0,
                },
                instance: instance ^ u8::from(rng.random_bool(0.5)),
                hang_up_after: None,
            };
            answer = send(&apps, &log, retry, false).await;
        }
        let think = rng.random_range(0..40);
        tokio::time::sleep(Duration::from_millis(think)).await;
    }
}

fn is_conflict(sent: &Sent) -> bool {
    matches!(&sent.outcome, Outcome::Answered(answer) if answer.status == StatusCode::CONFLICT)
}

// ===== faults =====

/// Injected faults, by kind.
type Faults = BTreeMap<&'static str, usize>;

trait Chaos: Send + 'static {
    /// Injects one fault, picked with `rng`, and says which; returns once
    /// it is over.
    fn strike(&mut self, rng: &mut StdRng) -> impl Future<Output = &'static str> + Send;
}

async fn chaos_until(mut chaos: impl Chaos, seed: u64, until: Instant) -> Faults {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults = Faults::new();
    loop {
        let gap = Duration::from_millis(rng.random_range(150..600));
        tokio::time::sleep(gap).await;
        if Instant::now() >= until {
            return faults;
        }
        let fault = chaos.strike(&mut rng).await;
        *faults.entry(fault).or_default() += 1;
    }
}

fn stall(rng: &mut StdRng) -> Duration {
    Duration::from_millis(rng.random_range(20..MAX_STALL_MS))
}

struct PostgresChaos {
    admin: PgPool,
    table: String,
    applications: [String; 2],
}

impl Chaos for PostgresChaos {
    async fn strike(&mut self, rng: &mut StdRng) -> &'static str {
        // One instance's sessions, or both.
        let names: Vec<String> = match rng.random_range(0..3) {
            0 => vec![self.applications[0].clone()],
            1 => vec![self.applications[1].clone()],
            _ => self.applications.to_vec(),
        };
        match rng.random_range(0..4) {
            0 => {
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ANY($1)",
                )
                .bind(&names)
                .execute(&self.admin)
                .await
                .expect("terminate the sessions");
                "pg_terminate_backend"
            }
            1 => {
                // A few times: only a statement under way is cancelled.
                for _ in 0..5 {
                    sqlx::query(
                        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = ANY($1) AND state = 'active'",
                    )
                    .bind(&names)
                    .execute(&self.admin)
                    .await
                    .expect("cancel the statements");
                    tokio::time::sleep(Duration::from_millis(rng.random_range(1..20))).await;
                }
                "pg_cancel_backend (5x)"
            }
            2 => {
                // Statements queue up behind the lock, and their sessions
                // end before any of them ran.
                let pause = stall(rng);
                let mut transaction = self.admin.begin().await.expect("begin");
                sqlx::query(&format!(
                    "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
                    self.table
                ))
                .execute(&mut *transaction)
                .await
                .expect("lock the table");
                tokio::time::sleep(pause).await;
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ANY($1)",
                )
                .bind(&names)
                .execute(&self.admin)
                .await
                .expect("terminate the sessions");
                tokio::time::sleep(Duration::from_millis(20)).await;
                transaction.commit().await.expect("commit");
                "table locked, then sessions terminated"
            }
            _ => {
                // Every statement on the table waits for the lock.
                let pause = stall(rng);
                let mut transaction = self.admin.begin().await.expect("begin");
                sqlx::query(&format!(
                    "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
                    self.table
                ))
                .execute(&mut *transaction)
                .await
                .expect("lock the table");
                tokio::time::sleep(pause).await;
                transaction.commit().await.expect("commit");
                "table locked"
            }
        }
    }
}

struct RedisChaos {
    admin: ConnectionManager,
    users: [String; 2],
}

impl Chaos for RedisChaos {
    async fn strike(&mut self, rng: &mut StdRng) -> &'static str {
        match rng.random_range(0..5) {
            0 | 1 => {
                let users: Vec<&String> = match rng.random_range(0..3) {
                    0 => vec![&self.users[0]],
                    1 => vec![&self.users[1]],
                    _ => self.users.iter().collect(),
                };
                for user in users {
                    let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("USER")
                        .arg(user)
                        .query_async(&mut self.admin)
                        .await;
                }
                "CLIENT KILL USER"
            }
            2 => {
                let pause = stall(rng);
                self.pause(pause, "WRITE").await;
                "CLIENT PAUSE WRITE"
            }
            3 => {
                // Commands queue up during the pause, and their
                // connections end before any of them ran.
                let pause = stall(rng);
                let _: () = redis::cmd("CLIENT")
                    .arg("PAUSE")
                    .arg(u64::try_from(pause.as_millis()).unwrap_or(u64::MAX) + 200)
                    .arg("WRITE")
                    .query_async(&mut self.admin)
                    .await
                    .expect("pause the clients");
                tokio::time::sleep(pause).await;
                for user in &self.users {
                    let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                        .arg("KILL")
                        .arg("USER")
                        .arg(user)
                        .query_async(&mut self.admin)
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                "CLIENT PAUSE WRITE, then CLIENT KILL USER"
            }
            _ => {
                let pause = stall(rng);
                self.pause(pause, "ALL").await;
                "CLIENT PAUSE ALL"
            }
        }
    }
}

impl RedisChaos {
    async fn pause(&mut self, pause: Duration, mode: &str) {
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(u64::try_from(pause.as_millis()).unwrap_or(u64::MAX))
            .arg(mode)
            .query_async(&mut self.admin)
            .await
            .expect("pause the clients");
        tokio::time::sleep(pause).await;
    }
}

struct SqliteChaos {
    admin: SqliteStore,
}

impl Chaos for SqliteChaos {
    async fn strike(&mut self, rng: &mut StdRng) -> &'static str {
        // Holds the write lock: writers wait, readers go on (WAL).
        let pause = stall(rng);
        let mut connection = self.admin.pool().acquire().await.expect("a connection");
        let begun = sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *connection)
            .await;
        if begun.is_err() {
            return "write lock not taken (busy)";
        }
        tokio::time::sleep(pause).await;
        sqlx::query("COMMIT")
            .execute(&mut *connection)
            .await
            .expect("commit");
        "write lock held"
    }
}

// ===== a run =====

/// What a run did, for the report.
struct Report {
    store: &'static str,
    seed: u64,
    duration: Duration,
    requests: usize,
    executions: usize,
    statuses: BTreeMap<String, usize>,
    faults: Faults,
    events: BTreeMap<String, usize>,
    slowest_settle: Duration,
    violations: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{}: seed {}, {:?}, {} requests, {} executions, slowest settle {:?}",
            self.store,
            self.seed,
            self.duration,
            self.requests,
            self.executions,
            self.slowest_settle
        )?;
        writeln!(f, "  answers: {:?}", self.statuses)?;
        writeln!(f, "  faults: {:?}", self.faults)?;
        for (event, count) in &self.events {
            writeln!(f, "  logged {count}x {event}")?;
        }
        for violation in self.violations.iter().take(30) {
            writeln!(f, "  VIOLATION {violation}")?;
        }
        if self.violations.len() > 30 {
            writeln!(f, "  ... {} violations in all", self.violations.len())?;
        }
        Ok(())
    }
}

/// Runs the clients and `chaos` against two instances, then lets every
/// key settle and checks the record.
async fn run(
    store: &'static str,
    stores: [impl Store; 2],
    chaos: impl Chaos,
    settings: Settings,
) -> Report {
    watch_events_and_panics();
    let log = Log::new();
    let [first, second] = stores;
    let (app_a, idempotency_a) = instance(first, 0, &log);
    let (app_b, idempotency_b) = instance(second, 1, &log);
    let apps = Arc::new(vec![app_a, app_b]);
    let until = Instant::now() + settings.duration;

    let chaos = tokio::spawn(chaos_until(chaos, settings.seed, until));
    let mut clients = tokio::task::JoinSet::new();
    for index in 0..settings.clients {
        let seed = settings.seed.wrapping_add(1 + index as u64);
        clients.spawn(client(Arc::clone(&apps), Arc::clone(&log), seed, until));
    }
    while let Some(done) = clients.join_next().await {
        done.expect("a client");
    }
    let faults = chaos.await.expect("the chaos task");
    // Runs whose clients hung up, and the stores' own background work.
    idempotency_a.drain().await;
    idempotency_b.drain().await;

    let slowest_settle = settle(&apps, &log).await;
    let sent = lock(&log.sent).clone();
    let execs = lock(&log.execs).clone();
    let mut violations = check(&execs, &sent);
    for panic in lock(&PANICS).iter() {
        violations.push(format!("panic: {panic}"));
    }
    let limit = LEASE + STORE_TIMEOUT * 2 + Duration::from_secs(1);
    if slowest_settle > limit {
        violations.push(format!(
            "a key kept answering 409 or 503 for {slowest_settle:?} after the faults stopped and every run finished (lease {LEASE:?})"
        ));
    }
    let mut statuses = BTreeMap::new();
    for sent in &sent {
        let name = match &sent.outcome {
            Outcome::Answered(answer) if answer.replayed => {
                format!("{} replayed", answer.status.as_u16())
            }
            Outcome::Answered(answer) => answer.status.as_u16().to_string(),
            Outcome::Dropped => "hung up".to_owned(),
            Outcome::Panicked(_) => "panicked".to_owned(),
        };
        *statuses.entry(name).or_default() += 1;
    }
    Report {
        store,
        seed: settings.seed,
        duration: settings.duration,
        requests: sent.len(),
        executions: execs.len(),
        statuses,
        faults,
        events: library_warnings(),
        slowest_settle,
        violations,
    }
}

/// Sends each key once more, with the payload of its stored response if it
/// has one, until it answers other than 409 or 503; returns the longest
/// any key took.
async fn settle(apps: &[Router], log: &Arc<Log>) -> Duration {
    let execs = lock(&log.execs).clone();
    let sent = lock(&log.sent).clone();
    let mut keys: BTreeMap<(Route, String), u8> = BTreeMap::new();
    for sent in &sent {
        keys.entry((sent.route, sent.key.clone())).or_insert(0);
    }
    for exec in execs.iter().filter(|exec| exec.is_final()) {
        keys.insert((exec.route, exec.key.clone()), exec.variant);
    }
    let mut slowest = Duration::ZERO;
    for (index, ((route, key), variant)) in keys.into_iter().enumerate() {
        let started = Instant::now();
        loop {
            let plan = Plan {
                route,
                key: key.clone(),
                variant,
                mode: Mode {
                    act: Act::Created,
                    ms: 0,
                },
                instance: u8::from(index % 2 == 1),
                hang_up_after: None,
            };
            let sent = send(apps, log, plan, true).await;
            let busy = matches!(
                &sent.outcome,
                Outcome::Answered(answer)
                    if answer.status == StatusCode::CONFLICT
                        || answer.status == StatusCode::SERVICE_UNAVAILABLE
            );
            if !busy || started.elapsed() > LEASE * 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        slowest = slowest.max(started.elapsed());
    }
    slowest
}

// ===== the invariants =====

fn check(execs: &[Exec], sent: &[Sent]) -> Vec<String> {
    let mut violations = Vec::new();
    let by_id: HashMap<u64, &Exec> = execs.iter().map(|exec| (exec.id, exec)).collect();
    let mut by_key: BTreeMap<(Route, &str), Vec<&Exec>> = BTreeMap::new();
    for exec in execs {
        by_key
            .entry((exec.route, exec.key.as_str()))
            .or_default()
            .push(exec);
    }

    // Executions of one key: one at a time, and none after a stored one.
    for ((route, key), runs) in &mut by_key {
        runs.sort_by_key(|exec| exec.started);
        for pair in runs.windows(2) {
            let (earlier, later) = (pair[0], pair[1]);
            let overlapped = earlier.ended.is_none_or(|ended| ended > later.started);
            if overlapped {
                violations.push(format!(
                    "{route:?} {key}: execution {} started at {:?} while execution {} (started {:?}) still ran",
                    later.id, later.started, earlier.id, earlier.started
                ));
            } else if earlier.is_final() {
                violations.push(format!(
                    "{route:?} {key}: execution {} (variant {}, request {}, instance {}) ran at {:?} after execution {} (variant {}, instance {}) had stored {} at {:?}",
                    later.id,
                    later.variant,
                    later.request,
                    later.instance,
                    later.started,
                    earlier.id,
                    earlier.variant,
                    earlier.instance,
                    earlier.answer.as_ref().map_or(0, |a| a.status.as_u16()),
                    earlier.ended
                ));
            }
        }
    }

    for request in sent {
        let name = format!(
            "request {} ({:?} {} variant {} on instance {}, {:?}, sent {:?}, answered {:?})",
            request.id,
            request.route,
            request.key,
            request.variant,
            request.instance,
            request.act,
            request.sent,
            request.received
        );
        let answer = match &request.outcome {
            Outcome::Answered(answer) => answer,
            Outcome::Dropped => continue,
            Outcome::Panicked(message) => {
                if !message.contains(MARKER) {
                    violations.push(format!("{name}: panicked: {message}"));
                }
                continue;
            }
        };
        if let Some(problem) = &answer.problem {
            let expected = match answer.status {
                StatusCode::CONFLICT => "urn:idempotent:request-in-progress",
                StatusCode::UNPROCESSABLE_ENTITY => "urn:idempotent:key-reused",
                StatusCode::SERVICE_UNAVAILABLE => "urn:idempotent:store-unavailable",
                _ => "",
            };
            if problem != expected {
                violations.push(format!("{name}: answered {} {problem}", answer.status));
            }
            if answer.status == StatusCode::UNPROCESSABLE_ENTITY {
                let other = sent.iter().any(|other| {
                    other.route == request.route
                        && other.key == request.key
                        && other.variant != request.variant
                        && other.sent < request.received
                });
                if !other {
                    violations.push(format!(
                        "{name}: 422 though no other payload was ever sent with the key"
                    ));
                }
            }
            continue;
        }
        let Some(exec) = answer.exec.and_then(|id| by_id.get(&id)) else {
            violations.push(format!(
                "{name}: answered {} from no execution: {:?}",
                answer.status, answer.body
            ));
            continue;
        };
        let Some(made) = &exec.answer else {
            violations.push(format!(
                "{name}: answered {} from execution {}, which panicked",
                answer.status, exec.id
            ));
            continue;
        };
        let same = made.status == answer.status
            && made.body == answer.body
            && made.nonce == answer.nonce
            && made.content_type == answer.content_type
            && made.exec == answer.exec;
        if !same {
            violations.push(format!(
                "{name}: answered {} {:?}, not what execution {} made: {} {:?}",
                answer.status, answer.body, exec.id, made.status, made.body
            ));
        }
        if exec.route != request.route || exec.key != request.key {
            violations.push(format!(
                "{name}: answered with execution {} of {:?} {}",
                exec.id, exec.route, exec.key
            ));
        }
        if answer.replayed {
            if exec.variant != request.variant {
                violations.push(format!(
                    "{name}: replayed {} of execution {}, which ran variant {}",
                    answer.status, exec.id, exec.variant
                ));
            }
            if !exec.is_final() {
                violations.push(format!(
                    "{name}: replayed {} of execution {}, which is not final",
                    answer.status, exec.id
                ));
            }
        } else if exec.request != request.id {
            violations.push(format!(
                "{name}: got execution {}'s {} (request {}) without the replay header",
                exec.id, answer.status, exec.request
            ));
        }
    }

    // After the faults, each key replays the execution that stored its
    // response, or runs once if none did.
    let mut settled: BTreeMap<(Route, &str), &Sent> = BTreeMap::new();
    for request in sent.iter().filter(|request| request.settling) {
        settled.insert((request.route, request.key.as_str()), request);
    }
    for ((route, key), request) in settled {
        let stored = by_key
            .get(&(route, key))
            .and_then(|runs| runs.iter().rev().find(|exec| exec.is_final()));
        let Outcome::Answered(answer) = &request.outcome else {
            violations.push(format!("{route:?} {key}: settling: {:?}", request.outcome));
            continue;
        };
        match stored {
            Some(stored) => {
                let replays_it = answer.replayed && answer.exec == Some(stored.id);
                // Unless it ran again, which is reported above.
                let ran_again = !answer.replayed && answer.exec.is_some();
                if !replays_it && !ran_again {
                    violations.push(format!(
                        "{route:?} {key}: settling answered {} (replayed {}, execution {:?}), not the replay of execution {}",
                        answer.status, answer.replayed, answer.exec, stored.id
                    ));
                }
            }
            None if answer.replayed => violations.push(format!(
                "{route:?} {key}: settling replayed execution {:?} though none was final",
                answer.exec
            )),
            None => {}
        }
        if answer.status == StatusCode::CONFLICT || answer.status == StatusCode::SERVICE_UNAVAILABLE
        {
            violations.push(format!(
                "{route:?} {key}: still answers {} after the faults stopped",
                answer.status
            ));
        }
    }
    violations
}

// ===== the stores =====

/// The chaos tests load the machine: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn run_alone(test: impl Future<Output = Option<Report>>) {
    let _alone = lock(&ONE_AT_A_TIME);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a runtime");
    let Some(report) = runtime.block_on(test) else {
        return;
    };
    drop(runtime);
    eprintln!("{report}");
    assert!(report.violations.is_empty(), "{report}");
}

/// Two stores on one table, each with its own pool whose sessions carry
/// an application name of their own; the admin pool; the names.
async fn postgres_stores(url: &str, table: &str) -> ([PostgresStore; 2], PgPool, [String; 2]) {
    let admin = PgPool::connect(url)
        .await
        .expect("connect to the test database");
    let names = [unique_name("idem_chaos_a"), unique_name("idem_chaos_b")];
    let mut stores = Vec::new();
    for name in &names {
        let options = PgConnectOptions::from_str(url)
            .expect("a valid URL")
            .application_name(name);
        let connected = PostgresStore::connect_with(options).await.expect("connect");
        let store = PostgresStore::builder(connected.pool().clone())
            .table(table)
            .hold_connections(15)
            .build()
            .expect("a valid table name");
        store.migrate().await.expect("migrate");
        stores.push(store);
    }
    let stores: [PostgresStore; 2] = stores.try_into().expect("two stores");
    (stores, admin, names)
}

async fn postgres_run<S: Store>(
    store_name: &'static str,
    wrap: impl Fn(PostgresStore) -> S,
) -> Option<Report> {
    let url = backend_url(POSTGRES)?;
    let settings = Settings::from_env();
    let table = unique_name("idem_chaos");
    let (stores, admin, applications) = postgres_stores(&url, &table).await;
    let [a, b] = stores;
    let chaos = PostgresChaos {
        admin: admin.clone(),
        table: table.clone(),
        applications,
    };
    let report = run(store_name, [wrap(a), wrap(b)], chaos, settings).await;
    sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(&admin)
        .await
        .expect("drop the test table");
    Some(report)
}

/// The test Redis URL with `user`'s credentials in it.
fn redis_url_as(url: &str, user: &str) -> String {
    let rest = url.strip_prefix("redis://").expect("a redis:// URL");
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("redis://{user}:{user}@{rest}")
}

async fn manager(url: &str) -> ConnectionManager {
    // As `RedisStore::connect` configures it.
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_millis(500));
    let client = redis::Client::open(url).expect("a valid URL");
    ConnectionManager::new_with_config(client, config)
        .await
        .expect("connect to the test Redis")
}

async fn redis_run<S: Store>(
    store_name: &'static str,
    wrap: impl Fn(RedisStore) -> S,
) -> Option<Report> {
    let url = backend_url(REDIS)?;
    let settings = Settings::from_env();
    let mut admin = manager(&url).await;
    let prefix = unique_name("idem_chaos") + ":";
    // Each instance connects as a user of its own, so that the faults
    // end only these connections.
    let users = [unique_name("idem_chaos_a"), unique_name("idem_chaos_b")];
    let mut stores = Vec::new();
    for user in &users {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(user)
            .arg("on")
            .arg(format!(">{user}"))
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .query_async(&mut admin)
            .await
            .expect("create a user");
        let connection = manager(&redis_url_as(&url, user)).await;
        stores.push(wrap(
            RedisStore::builder(connection)
                .prefix(prefix.clone())
                .build(),
        ));
    }
    let stores: [S; 2] = stores.try_into().ok().expect("two stores");
    let chaos = RedisChaos {
        admin: admin.clone(),
        users: users.clone(),
    };
    let report = run(store_name, stores, chaos, settings).await;
    for user in &users {
        let _: redis::RedisResult<i64> = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(user)
            .query_async(&mut admin)
            .await;
    }
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut admin)
        .await
        .expect("list the test keys");
    if !keys.is_empty() {
        let _: i64 = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut admin)
            .await
            .expect("delete the test keys");
    }
    Some(report)
}

#[test]
fn postgres_store_keeps_the_contract_under_faults() {
    run_alone(postgres_run("PostgresStore", |store| store));
}

#[test]
fn tiered_postgres_store_keeps_the_contract_under_faults() {
    run_alone(postgres_run("Tiered<PostgresStore>", Tiered::new));
}

#[test]
fn redis_store_keeps_the_contract_under_faults() {
    run_alone(redis_run("RedisStore", |store| store));
}

#[test]
fn tiered_redis_store_keeps_the_contract_under_faults() {
    run_alone(redis_run("Tiered<RedisStore>", Tiered::new));
}

#[test]
fn sqlite_store_keeps_the_contract_under_faults() {
    run_alone(async {
        let settings = Settings::from_env();
        let path = std::env::temp_dir().join(unique_name("idem_chaos") + ".db");
        let mut stores = Vec::new();
        // Two processes' worth: each opens the file with its own pool.
        for _ in 0..3 {
            let store = SqliteStore::open(&path).await.expect("open the file");
            store.migrate().await.expect("migrate");
            stores.push(store);
        }
        let admin = stores.pop().expect("three stores");
        let stores: [SqliteStore; 2] = stores.try_into().expect("two stores");
        let report = run("SqliteStore", stores, SqliteChaos { admin }, settings).await;
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            let _ = std::fs::remove_file(file);
        }
        Some(report)
    });
}
