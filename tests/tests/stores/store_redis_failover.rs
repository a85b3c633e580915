//! A Redis failover behind an address that follows the primary (a DNS
//! name, a virtual IP, a proxy), against `redis-server`s this test starts:
//! connections opened before it stay with the old primary, which Redis
//! demotes to a replica without closing them, and which refuses every
//! write (`READONLY`).

use crate::store_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use idempotent_core::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, Record, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{RedisStore, Store};
use store_support::{OwnRedis, backend_url, redis_connection, unique_name};

const LEASE: Duration = Duration::from_secs(60);

fn key(name: &[u8]) -> RecordKey {
    RecordKey::new(
        ScopeDigest::from_bytes(rand::random()),
        IdempotencyKey::parse(name).unwrap(),
    )
}

/// A TCP relay to the Redis on the port it is pointed at when a
/// connection is made: connections made before it is pointed elsewhere
/// stay with the server they reached, as through a DNS name or a virtual
/// IP that a failover moved. It can hold Redis's replies back
/// ([`hold_replies`](Self::hold_replies)), to hand many over at once.
struct FollowsThePrimary {
    port: u16,
    upstream: Arc<Mutex<u16>>,
    replies_held: tokio::sync::watch::Sender<bool>,
}

impl FollowsThePrimary {
    async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = Arc::new(Mutex::new(upstream));
        let target = Arc::clone(&upstream);
        let (replies_held, held) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let port = *target.lock().unwrap();
                let held = held.clone();
                tokio::spawn(async move {
                    let server = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
                    if let Ok(server) = server {
                        let (mut from_client, to_client) = client.into_split();
                        let (from_server, mut to_server) = server.into_split();
                        let requests = tokio::io::copy(&mut from_client, &mut to_server);
                        let replies = relay_replies(from_server, to_client, held);
                        // Each half dropped shuts its side down, as Redis
                        // closing a connection (`QUIT`) does to the client.
                        let _ = tokio::join!(requests, replies);
                    }
                });
            }
        });
        Self {
            port,
            upstream,
            replies_held,
        }
    }

    /// Holds Redis's replies back (`true`) or hands them over (`false`).
    fn hold_replies(&self, held: bool) {
        self.replies_held.send_replace(held);
    }

    fn point_at(&self, upstream: u16) {
        *self.upstream.lock().unwrap() = upstream;
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// Copies Redis's replies from `from` to `to` while they are not `held`.
async fn relay_replies(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0; 64 * 1024];
    while let Ok(read @ 1..) = from.read(&mut buffer).await {
        if held.wait_for(|held| !held).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// Waits until the Redis at `url` has refused `count` writes as a
/// replica (`READONLY`) since it started.
async fn refused_as_a_replica(url: &str, count: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = admin(url, "INFO", &["errorstats"]).await;
        let stats: String = redis::from_redis_value(stats).unwrap();
        let refused = stats
            .lines()
            .find_map(|line| line.strip_prefix("errorstat_READONLY:count="))
            .and_then(|count| count.trim().parse::<u64>().ok());
        if refused >= Some(count) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{stats}");
        tokio::task::yield_now().await;
    }
}

/// A store on a `ConnectionManager` of its own through `address`.
async fn store_through(address: &FollowsThePrimary, prefix: &str) -> RedisStore {
    RedisStore::builder(redis_connection(&address.url()).await)
        .prefix(prefix)
        .build()
}

/// A connection to the Redis at `url` that waits for answers as long as
/// Redis takes (`WAIT` for a replica).
async fn waiting_connection(url: &str) -> redis::aio::ConnectionManager {
    let client = redis::Client::open(url).expect("valid URL");
    let config = redis::aio::ConnectionManagerConfig::new().set_response_timeout(None);
    redis::aio::ConnectionManager::new_with_config(client, config)
        .await
        .expect("connect to the test Redis")
}

/// Sends `command` with `args` to the Redis at `url`.
async fn admin(url: &str, command: &str, args: &[&str]) -> redis::Value {
    let mut connection = redis_connection(url).await;
    redis::cmd(command)
        .arg(args)
        .query_async(&mut connection)
        .await
        .unwrap_or_else(|error| panic!("{command} {args:?}: {error}"))
}

/// A failover moved the store's address to the new primary, and Redis
/// kept the store's connection to the old one, now a replica: every
/// claim, completion, renewal and release was refused (503) until the
/// process restarted, since the `ConnectionManager` reconnects only when
/// a connection breaks; the error said it would pass. The request whose
/// write a replica refuses has the store reconnect, through the address,
/// and runs on the new primary: a completion of a claim taken before the
/// failover (a fenced script) and a new claim (`SET NX GET`), each on a
/// store of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_left_on_a_demoted_primary_reconnects_to_the_new_one() {
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let (old_port, new_port) = (OwnRedis::free_port(), OwnRedis::free_port());
    // Each syncs its replica at once, not after the default 5 s, and a
    // replica loads what it is sent without a file (`dump.rdb`) on disk.
    let sync = ["--repl-diskless-sync-delay", "0"];
    let sync = [&sync[..], &["--repl-diskless-load", "swapdb"]].concat();
    let mut old = OwnRedis::start_with(old_port, &sync).await;
    let mut new = OwnRedis::start_with(new_port, &sync).await;
    let old_port_arg = old_port.to_string();
    admin(&new.url(), "REPLICAOF", &["127.0.0.1", &old_port_arg]).await;
    let address = FollowsThePrimary::start(old_port).await;
    let prefix = unique_name("idem_failover") + ":";
    let completing = store_through(&address, &prefix).await;
    let claiming = store_through(&address, &prefix).await;
    let (held, fresh) = (key(b"held-across-the-failover"), key(b"claimed-after-it"));
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    let token = store_support::acquire(&completing, &held, fingerprint, LEASE).await;
    // The replica has the claim before it is promoted: `WAIT` waits for
    // it to acknowledge this connection's write, which came after.
    let mut on_old = waiting_connection(&old.url()).await;
    let marker = format!("{prefix}marker");
    let _: () = redis::cmd("SET")
        .arg(&[marker.as_str(), "1"])
        .query_async(&mut on_old)
        .await
        .unwrap();
    let acknowledged: i64 = redis::cmd("WAIT")
        .arg(&["1", "10000"])
        .query_async(&mut on_old)
        .await
        .unwrap();

    admin(&new.url(), "REPLICAOF", &["NO", "ONE"]).await;
    let new_port_arg = new_port.to_string();
    admin(&old.url(), "REPLICAOF", &["127.0.0.1", &new_port_arg]).await;
    address.point_at(new_port);

    let paid = StoredResponse::new(StatusCode::CREATED, Vec::new(), Some(Bytes::from("paid")));
    let completed = completing.complete(&held, token, paid.clone(), LEASE).await;
    let replayed = completing.get(&held).await;
    let claimed = claiming.claim(&fresh, fingerprint, LEASE).await;
    old.stop().await;
    new.stop().await;

    assert_eq!(acknowledged, 1, "the replica synced");
    assert!(completed.is_ok(), "{completed:?}");
    assert!(
        matches!(&replayed, Ok(Some(Record::Completed(record))) if record.response == paid),
        "{replayed:?}"
    );
    assert!(matches!(claimed, Ok(Claim::Acquired(_))), "{claimed:?}");
}

/// How many requests a demoted primary refuses at once.
const REFUSED_TOGETHER: usize = 32;

/// Many requests whose writes the demoted primary refused at once: the
/// first to see its refusal reconnected the store, and each of the others
/// sent its write again at once, without waiting for that, on the old
/// connection (refused again: 503) or after its `QUIT` (cut off: an
/// outage). Each waits for the reconnect now, and runs on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_together_by_a_demoted_primary_all_reach_the_new_one() {
    if backend_url("IDEMPOTENT_TEST_REDIS_URL").is_none() {
        return;
    }
    let (old_port, new_port) = (OwnRedis::free_port(), OwnRedis::free_port());
    let sync = [
        "--repl-diskless-sync-delay",
        "0",
        "--repl-diskless-load",
        "swapdb",
    ];
    let mut old = OwnRedis::start_with(old_port, &sync).await;
    let mut new = OwnRedis::start_with(new_port, &sync).await;
    let address = FollowsThePrimary::start(old_port).await;
    let store = store_through(&address, &(unique_name("idem_failover_many") + ":")).await;
    let fingerprint = Fingerprint::from_bytes([7; 32]);
    let before = store
        .claim(&key(b"before-the-failover"), fingerprint, LEASE)
        .await;

    let new_port_arg = new_port.to_string();
    admin(&old.url(), "REPLICAOF", &["127.0.0.1", &new_port_arg]).await;
    address.point_at(new_port);
    // The refusals are handed over together, once Redis has sent each:
    // a claim sent after the reconnect's `QUIT` would be cut off rather
    // than refused, and is not sent again (a closed connection may have
    // run it).
    address.hold_replies(true);
    // Each on a task of its own, as requests are.
    let claims = (0..REFUSED_TOGETHER).map(|n| {
        let store = store.clone();
        let key = key(format!("refused-together-{n}").as_bytes());
        tokio::spawn(async move { store.claim(&key, fingerprint, LEASE).await })
    });
    let claimed = futures_util::future::join_all(claims);
    let handed_over = async {
        refused_as_a_replica(&old.url(), REFUSED_TOGETHER as u64).await;
        address.hold_replies(false);
    };
    let (claimed, ()) = tokio::join!(claimed, handed_over);
    old.stop().await;
    new.stop().await;

    assert!(matches!(before, Ok(Claim::Acquired(_))), "{before:?}");
    for claim in claimed {
        let claim = claim.expect("the claim's task ran");
        assert!(matches!(claim, Ok(Claim::Acquired(_))), "{claim:?}");
    }
}
