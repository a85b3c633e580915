//! `PostgresStore` cut off from its server by a network partition that
//! begins the moment the server committed a statement, before its answer
//! reached the store (`IDEMPOTENT_TEST_POSTGRES_URL`). Each test works in
//! its own table.

mod store_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, RecordKey};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{PostgresStore, Store};
use store_support::tables::migrated_postgres;
use store_support::{backend_url, unique_name};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const URL: &str = "IDEMPOTENT_TEST_POSTGRES_URL";

/// A relay to the database that, once told to, cuts the connection that
/// carries the server's next answer to a statement and, from then until
/// healed, every other connection, and refuses new ones: the network
/// between the store and its server went down just after the server
/// committed.
struct Partition {
    lose_next: Arc<AtomicBool>,
    down: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Partition {
    /// The relay, and the connect options that go through it.
    async fn start(url: &str) -> (sqlx::postgres::PgConnectOptions, Self) {
        use std::str::FromStr;

        let direct = sqlx::postgres::PgConnectOptions::from_str(url).expect("valid URL");
        let upstream = (direct.get_host().to_owned(), direct.get_port());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let lose_next = Arc::new(AtomicBool::new(false));
        let (down, mut watching) = watch::channel(false);
        let (losing, cutting) = (Arc::clone(&lose_next), down.clone());
        let task = tokio::spawn(async move {
            // Listening only while up: while down, connecting is refused.
            loop {
                let Ok(_) = watching.wait_for(|down| !down).await else {
                    return;
                };
                let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
                loop {
                    let inbound = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((inbound, _)) => inbound,
                            Err(_) => return,
                        },
                        _ = watching.wait_for(|down| *down) => break,
                    };
                    let Ok(outbound) = TcpStream::connect(upstream.clone()).await else {
                        continue;
                    };
                    let (losing, cutting) = (Arc::clone(&losing), cutting.clone());
                    tokio::spawn(relay(inbound, outbound, losing, cutting));
                }
            }
        });
        let partition = Self {
            lose_next,
            down,
            task,
        };
        (direct.host("127.0.0.1").port(port), partition)
    }

    /// Cuts everything once the server answers the next statement.
    fn after_next_commit(&self) {
        self.lose_next.store(true, Ordering::SeqCst);
    }

    fn heal(&self) {
        self.down.send_replace(false);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one connection both ways until either side closes it or the
/// partition begins.
async fn relay(
    inbound: TcpStream,
    outbound: TcpStream,
    lose_next: Arc<AtomicBool>,
    down: watch::Sender<bool>,
) {
    let mut watching = down.subscribe();
    let (mut client_reads, mut client_writes) = inbound.into_split();
    let (mut server_reads, mut server_writes) = outbound.into_split();
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
            // `2`, BindComplete, starts the answer to a statement run on
            // a prepared one, as every statement of the store is.
            if buffer[0] == b'2' && lose_next.swap(false, Ordering::SeqCst) {
                down.send_replace(true);
                return;
            }
            if client_writes.write_all(&buffer[..read]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = requests => {}
        () = answers => {}
        _ = watching.wait_for(|down| *down) => {}
    }
}

fn record_key(name: &str) -> RecordKey {
    RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(name.as_bytes()).expect("valid key"),
    )
}

/// A claim whose insert the server committed, and whose answer was lost
/// with the network, fails, or is cut short by `timeout` (503 either
/// way: the client is told nothing ran, and retries). Its row must not hold the key for a lease that nobody has:
/// once the network is back, the retry runs, rather than meeting 409
/// until the lease lapses.
async fn a_claim_failed_after_its_commit_leaves_the_key_free(hold: u32, timeout: Option<Duration>) {
    let Some(url) = backend_url(URL) else { return };
    let direct = migrated_postgres(&url, &unique_name("idem_partition")).await;
    let (options, partition) = Partition::start(&url).await;
    let pool = PostgresStore::pool_options()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("connect through the relay");
    let store = PostgresStore::builder(pool)
        .table(direct.table())
        .hold_connections(hold)
        .build()
        .expect("valid table name");
    let key = record_key("cut-after-commit");
    let fingerprint = Fingerprint::from_bytes([1; 32]);
    let lease = Duration::from_secs(60);

    partition.after_next_commit();
    let claiming = store.claim(&key, fingerprint, lease);
    let failed = match timeout {
        // The engine's store timeout, which drops the claim while it
        // waits for a new connection.
        Some(timeout) => match tokio::time::timeout(timeout, claiming).await {
            Ok(claimed) => panic!("the server is out of reach: {claimed:?}"),
            Err(elapsed) => elapsed.to_string(),
        },
        None => (claiming.await)
            .expect_err("the server is out of reach")
            .to_string(),
    };
    partition.heal();
    tokio::time::timeout(Duration::from_secs(10), store.settle())
        .await
        .expect("settles");

    let retried = direct.claim(&key, fingerprint, lease).await.expect("claim");
    assert!(
        matches!(retried, Claim::Acquired(_)),
        "a claim that failed ({failed}) left the key held by nobody: {retried:?}"
    );
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", direct.table()))
        .execute(direct.pool())
        .await
        .expect("drop the test table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_failed_after_its_commit_leaves_the_key_free_on_pooled_connections() {
    a_claim_failed_after_its_commit_leaves_the_key_free(0, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_failed_after_its_commit_leaves_the_key_free_on_kept_connections() {
    a_claim_failed_after_its_commit_leaves_the_key_free(2, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_timed_out_after_its_commit_leaves_the_key_free() {
    let store_timeout = Some(Duration::from_millis(50));
    a_claim_failed_after_its_commit_leaves_the_key_free(2, store_timeout).await;
}
