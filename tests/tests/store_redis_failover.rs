//! A Redis failover behind an address that follows the primary (a DNS
//! name, a virtual IP, a proxy), against `redis-server`s this test starts:
//! connections opened before it stay with the old primary, which Redis
//! demotes to a replica without closing them, and which refuses every
//! write (`READONLY`).

mod store_support;

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
/// IP that a failover moved.
struct FollowsThePrimary {
    port: u16,
    upstream: Arc<Mutex<u16>>,
}

impl FollowsThePrimary {
    async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = Arc::new(Mutex::new(upstream));
        let target = Arc::clone(&upstream);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let port = *target.lock().unwrap();
                tokio::spawn(async move {
                    let server = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
                    if let Ok(mut server) = server {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { port, upstream }
    }

    fn point_at(&self, upstream: u16) {
        *self.upstream.lock().unwrap() = upstream;
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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
