//! `PostgresStore` cut off from its server by a network partition that
//! begins the moment the server committed a statement, before its answer
//! reached the store (`IDEMPOTENT_TEST_POSTGRES_URL`). Each test works in
//! its own table.

use crate::store_support;

use std::time::Duration;

use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, RecordKey};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{PostgresStore, Store};
use store_support::tables::migrated_postgres;
use store_support::{backend_url, relay_to_the_database, unique_name};

const URL: &str = "IDEMPOTENT_TEST_POSTGRES_URL";

fn record_key(name: &str) -> RecordKey {
    RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(name.as_bytes()).expect("valid key"),
    )
}

/// A claim whose insert the server committed, and whose answer was lost
/// with the network, fails, or is cut short by `timeout` (503 either
/// way: the client is told nothing ran, and retries). Its row must not
/// hold the key for a lease that nobody has: once the network is back,
/// the retry runs, rather than meeting 409 until the lease lapses.
async fn a_claim_failed_after_its_commit_leaves_the_key_free(hold: u32, timeout: Option<Duration>) {
    let Some(url) = backend_url(URL) else { return };
    let direct = migrated_postgres(&url, &unique_name("idem_partition")).await;
    let (options, relay) = relay_to_the_database(&url).await;
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

    // The network goes down once the server answers the claim's insert.
    relay.partition_after_next_answer();
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
    relay.heal();
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
