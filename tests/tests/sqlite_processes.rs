//! Two processes of a service (or the two colours of a blue/green deploy)
//! on one SQLite file: this test binary runs itself again as each of them,
//! with `IDEMPOTENT_SQLITE_CHILD` naming what the child does.

mod store_support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, RecordKey};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{SqliteStore, Store};
use idempotent_core::{Endpoint, Idempotency, IdempotentRequest, Scope};
use store_support::{pay, unique_name};

/// Duplicates get 409 while the first runs, so nothing waits.
const NO_WAIT: Endpoint = Endpoint::new("no_wait")
    .scope(Scope::Global)
    .lease(Duration::from_secs(10));

/// How long the storm's engine waits for a store call.
const STORM_STORE_TIMEOUT: Duration = Duration::from_secs(60);

/// The lease of the claim a killed child leaves behind.
const SHORT_LEASE: Duration = Duration::from_secs(3);

/// A file each run of the handler appends its key to: the side effect
/// both processes share.
#[derive(Clone)]
struct Runs(PathBuf);

async fn handler(
    State(runs): State<Runs>,
    idempotency: IdempotentRequest,
    headers: HeaderMap,
    axum::Json(request): axum::Json<serde_json::Value>,
) -> Response {
    let fingerprint = NO_WAIT.fingerprint(&request);
    let key = headers["idempotency-key"]
        .to_str()
        .unwrap_or("?")
        .to_owned();
    idempotency
        .run(&NO_WAIT, fingerprint, async move {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&runs.0)
                .expect("open the runs file");
            // One write of one line: appends from two processes do not mix.
            file.write_all(format!("{key}\n").as_bytes())
                .expect("append a run");
            StatusCode::CREATED.into_response()
        })
        .await
}

/// Sends `copies` duplicates of each of `keys` at once; counts what came
/// back, replays apart.
async fn storm(app: &Router, keys: usize, copies: usize) -> BTreeMap<String, usize> {
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..copies {
        for key in 0..keys {
            let app = app.clone();
            clients.spawn(async move {
                let reply = pay(&app, &format!("key-{key}"), 1).await;
                match reply.status {
                    _ if reply.replayed() => "replay".to_owned(),
                    // The problem's type says which failure it was.
                    status if status.is_server_error() => {
                        format!(
                            "{} {}",
                            status.as_u16(),
                            String::from_utf8_lossy(&reply.body)
                        )
                    }
                    status => status.as_u16().to_string(),
                }
            });
        }
    }
    let mut counts = BTreeMap::new();
    for outcome in clients.join_all().await {
        *counts.entry(outcome).or_default() += 1;
    }
    counts
}

fn hung_key() -> RecordKey {
    RecordKey::new(
        ScopeDigest::from_bytes([9; 32]),
        IdempotencyKey::parse(b"hung").expect("valid key"),
    )
}

/// Not a test of its own: what a child process runs, and nothing when
/// the binary runs as the test suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn child() {
    let Ok(mode) = std::env::var("IDEMPOTENT_SQLITE_CHILD") else {
        return;
    };
    let db = PathBuf::from(std::env::var_os("IDEMPOTENT_SQLITE_DB").expect("db path"));
    let runs = PathBuf::from(std::env::var_os("IDEMPOTENT_SQLITE_RUNS").expect("runs path"));
    // Both children open and migrate a new file at the same moment.
    let store = SqliteStore::open(&db).await.expect("open");
    store.migrate().await.expect("migrate");
    match mode.as_str() {
        "storm" => {
            let app = axum::Router::new()
                .route("/payments", axum::routing::post(handler))
                .with_state(Runs(runs))
                .layer(
                    // Past the store's own bounds (a 5 s busy timeout, a
                    // 30 s wait for a connection), so a 5xx is then the
                    // store's failure under contention, never 400 requests
                    // on a loaded machine outlasting the default 2 s.
                    Idempotency::builder(store)
                        .store_timeout(STORM_STORE_TIMEOUT)
                        .build(),
                );
            println!("\nCOUNTS {:?}", storm(&app, 50, 4).await);
        }
        "claim-and-hang" => {
            let fingerprint = Fingerprint::from_bytes([1; 32]);
            let claim = store.claim(&hung_key(), fingerprint, SHORT_LEASE).await;
            println!("\nCLAIMED {claim:?}");
            std::io::stdout().flush().expect("flush");
            std::future::pending::<()>().await;
        }
        other => panic!("unknown child mode {other}"),
    }
}

fn spawn_child(mode: &str, db: &Path, runs: &Path) -> Child {
    let exe = std::env::current_exe().expect("the test binary");
    Command::new(exe)
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env("IDEMPOTENT_SQLITE_CHILD", mode)
        .env("IDEMPOTENT_SQLITE_DB", db)
        .env("IDEMPOTENT_SQLITE_RUNS", runs)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the child")
}

/// Files named after one test; removed (the database with its WAL files)
/// when dropped.
struct Files {
    db: PathBuf,
    runs: PathBuf,
}

impl Files {
    fn new() -> Self {
        let base = std::env::temp_dir().join(unique_name("idempotent-procs"));
        Self {
            db: base.with_extension("db"),
            runs: base.with_extension("runs"),
        }
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.db.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
        let _ = std::fs::remove_file(&self.runs);
    }
}

/// Two processes open a new file together, then take 200 duplicates each
/// of the same 50 keys: each key runs once, in one of them, and no client
/// gets a 5xx.
#[test]
fn two_processes_run_each_key_once() {
    let files = Files::new();
    let children = [
        spawn_child("storm", &files.db, &files.runs),
        spawn_child("storm", &files.db, &files.runs),
    ];
    let mut seen = Vec::new();
    for child in children {
        let output = child.wait_with_output().expect("the child ends");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{text}");
        seen.extend(
            text.lines()
                .filter(|line| line.starts_with("COUNTS"))
                .map(str::to_owned),
        );
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(
        seen.iter().all(|counts| !counts.contains("\"5")),
        "{seen:?}"
    );
    let runs = std::fs::read_to_string(&files.runs).expect("runs");
    let mut per_key = BTreeMap::<&str, usize>::new();
    for key in runs.lines() {
        *per_key.entry(key).or_default() += 1;
    }
    assert_eq!(per_key.len(), 50, "every key ran");
    assert!(per_key.values().all(|&runs| runs == 1), "{per_key:?}");
}

/// A process killed while it holds a claim: the other instance sees the
/// key in flight until the lease lapses, then takes it over.
#[test]
fn a_killed_process_claim_is_taken_over_after_its_lease() {
    let files = Files::new();
    let mut child = spawn_child("claim-and-hang", &files.db, &files.runs);
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    while !line.starts_with("CLAIMED") {
        line.clear();
        let read = stdout.read_line(&mut line).expect("read the child");
        assert!(read > 0, "the child ended before claiming");
    }
    assert!(line.contains("Acquired"), "{line}");
    child.kill().expect("kill the child");
    child.wait().expect("reap the child");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let store = SqliteStore::open(&files.db).await.expect("open");
        let fingerprint = Fingerprint::from_bytes([1; 32]);
        let first = store.claim(&hung_key(), fingerprint, SHORT_LEASE).await;
        assert!(matches!(first, Ok(Claim::InFlight { .. })), "{first:?}");
        // Polled: the lease runs on the wall clock, shared with the child.
        for _ in 0..200 {
            let claim = store.claim(&hung_key(), fingerprint, SHORT_LEASE).await;
            match claim.expect("claim") {
                Claim::Acquired(_) => return,
                Claim::InFlight { .. } => tokio::time::sleep(Duration::from_millis(50)).await,
                other => panic!("{other:?}"),
            }
        }
        panic!("the lapsed lease was never taken over");
    });
}
