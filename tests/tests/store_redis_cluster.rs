//! `RedisStore` on a Redis Cluster this test starts itself: three primaries
//! on free ports. Every script touches one key, so the store runs on a
//! cluster connection unchanged; given one node's address instead, it says
//! to use one; and a claim it finds gone on nodes that evict is warned
//! of. Runs where the Redis test environment is
//! set up (`IDEMPOTENT_TEST_REDIS_URL`), since it needs `redis-server` and
//! `redis-cli`.

mod store_support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use axum::http::StatusCode;
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{RedisStore, Store, StoreError, Tiered};
use idempotent_core::testing::contract;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use store_support::{
    Ledger, backend_url, duplicates_across_instances, payments_app, redis_connection, unique_name,
};
use tokio::process::{Child, Command};
use tracing::Level;

const NODES: usize = 3;

/// Three cluster-mode `redis-server`s, stopped and cleaned up on drop.
struct Cluster {
    ports: Vec<u16>,
    dir: PathBuf,
    _nodes: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(unique_name("idempotent-cluster"));
        std::fs::create_dir_all(&dir).unwrap();
        // Cluster nodes also listen on port + 10000 for their bus.
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < NODES {
            let port = free_port();
            if port < 55_000 && !ports.contains(&port) {
                ports.push(port);
            }
        }
        let nodes = ports.iter().map(|port| start_node(*port, &dir)).collect();
        for port in &ports {
            wait_for_port(*port).await;
        }
        let addresses: Vec<String> = ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .await
            .expect("run redis-cli --cluster create");
        assert!(created.success(), "redis-cli could not create the cluster");
        let cluster = Self {
            ports,
            dir,
            _nodes: nodes,
        };
        cluster.wait_until_ready().await;
        cluster
    }

    async fn wait_until_ready(&self) {
        for _ in 0..100 {
            let info = Command::new("redis-cli")
                .args(["-p", &self.ports[0].to_string(), "cluster", "info"])
                .output()
                .await
                .expect("run redis-cli");
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the cluster never became ready");
    }

    async fn connection(&self) -> ClusterConnection {
        let urls: Vec<String> = self
            .ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect();
        ClusterClient::new(urls)
            .expect("valid cluster URLs")
            .get_async_connection()
            .await
            .expect("connect to the cluster")
    }
}

fn start_node(port: u16, dir: &std::path::Path) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes"])
        .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
        .args(["--dir", dir.to_str().expect("UTF-8 temp dir")])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start redis-server")
}

async fn wait_for_port(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("redis-server did not start on port {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_store_works_unchanged_on_a_cluster() {
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let cluster = Cluster::start().await;
    let connection = cluster.connection().await;
    contract::run_all(|clock| {
        let store = RedisStore::builder(connection.clone()).clock(clock).build();
        async move { store }
    })
    .await;
    contract::run_all(|clock| {
        let durable = RedisStore::builder(connection.clone())
            .clock(clock.clone())
            .build();
        async move { Tiered::builder(durable).clock(clock).build() }
    })
    .await;

    // Two instances, each with its own cluster connection.
    let ledger = Ledger::default();
    let apps = [
        payments_app(
            RedisStore::builder(cluster.connection().await).build(),
            &ledger,
            Duration::from_secs(5),
        ),
        payments_app(
            RedisStore::builder(cluster.connection().await).build(),
            &ledger,
            Duration::from_secs(5),
        ),
    ];
    duplicates_across_instances(&apps, &ledger, 100).await;
}

/// `connect` given one node of a cluster: its connection reaches only
/// that node, which answers `MOVED` for every key another node serves, so
/// two claims in three failed with a bare "Moved" and 503. It is refused
/// at connect, saying to build the store on a cluster connection; and a
/// store built on a plain connection of the application's own to the node
/// is told the same at the first claim of a key the node does not serve,
/// as a setup to change (500), not an outage (503).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_node_of_a_cluster_is_told_to_use_a_cluster_connection() {
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let cluster = Cluster::start().await;
    let node = format!("redis://127.0.0.1:{}", cluster.ports[0]);

    let error = RedisStore::connect(&node)
        .await
        .expect_err("a cluster node is refused");
    assert_told_to_use_a_cluster_connection(&error);

    let store = RedisStore::builder(redis_connection(&node).await)
        .prefix(unique_name("idem_test") + ":")
        .build();
    let mut refusal = None;
    for name in 0..64 {
        let key = IdempotencyKey::parse(format!("key-{name}").as_bytes()).expect("a valid key");
        let key = RecordKey::new(ScopeDigest::global(), key);
        let claimed = store
            .claim(
                &key,
                Fingerprint::from_bytes([1; 32]),
                Duration::from_secs(30),
            )
            .await;
        if let Err(error) = claimed {
            refusal = Some(error);
            break;
        }
    }
    let error = refusal.expect("another node serves one of 64 keys");
    assert_told_to_use_a_cluster_connection(&error);
}

fn assert_told_to_use_a_cluster_connection(error: &StoreError) {
    assert!(
        matches!(error, StoreError::Misconfigured(_)),
        "not a setup to change: {error:?}"
    );
    let told = error.to_string();
    for words in ["cluster connection", "RedisStore::builder", "cluster-async"] {
        assert!(told.contains(words), "`{words}` missing from: {told}");
    }
}

/// A store on a cluster connection is built on the application's own
/// connection, so nothing checks the nodes' eviction policy at connect:
/// a completion that finds its claim gone is the one check, and warns
/// with the key if the nodes evict (a retry of a request still running
/// then runs it again). A cluster connection asks every primary for
/// `INFO` and answers node by node, which the check read as no answer:
/// on a cluster of evicting nodes the warning never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_found_gone_on_an_evicting_cluster_is_warned_of() {
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let events = store_support::logs::events();
    let cluster = Cluster::start().await;
    let mut connection = cluster.connection().await;
    for (setting, value) in [("maxmemory", "1gb"), ("maxmemory-policy", "allkeys-lru")] {
        let mut set = redis::cmd("CONFIG");
        set.arg("SET").arg(setting).arg(value);
        let () = set.query_async(&mut connection).await.expect("every node");
    }
    let store = RedisStore::builder(connection.clone()).build();
    let key = RecordKey::new(
        ScopeDigest::from_bytes(rand::random()),
        IdempotencyKey::parse(b"evicted").expect("a valid key"),
    );
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lease = Duration::from_secs(30);
    let token = store_support::acquire(&store, &key, fingerprint, lease).await;
    // Dropped as an evicting node drops it.
    let _: i64 = redis::cmd("DEL")
        .arg(store.redis_key(&key))
        .query_async(&mut connection)
        .await
        .expect("deleted");
    let response = StoredResponse::new(StatusCode::CREATED, Vec::new(), None);
    let completed = store.complete(&key, token, response, lease).await;
    store.settle().await;
    assert!(
        matches!(completed, Err(StoreError::LeaseLost)),
        "{completed:?}"
    );
    let log_id = key.log_id().to_string();
    let logged = events.at(Level::WARN, "idempotent_core");
    assert!(
        logged.iter().any(|event| {
            event.fields.contains("evicts keys") && event.fields.contains(&log_id)
        }),
        "{logged:?}"
    );
}
