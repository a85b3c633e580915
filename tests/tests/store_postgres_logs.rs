//! What `PostgresStore` tells the operator when PostgreSQL stops taking
//! connections. sqlx's pool tries a refused connection again, saying
//! nothing, until its acquire timeout: every request waited out the store
//! timeout, and the log said only that the store did not answer. A
//! process of its own: the subscriber that records the events is global,
//! since the statements run on whichever worker. Needs
//! `IDEMPOTENT_TEST_POSTGRES_URL`; the test cuts a relay to that server.

mod store_support;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use idempotent_core::store::PostgresStore;
use store_support::logs::{Logged, events};
use store_support::{
    Ledger, Relay, backend_url, pay, pay_until_available, payments_app, store_behind_a_relay,
};
use tracing::Level;

const STORE_TIMEOUT: Duration = Duration::from_secs(2);

/// The database stops taking connections (the relay to it is gone):
/// requests get 503 well before the store timeout, the cause (refused, at
/// which address) is logged once however many requests meet it, each
/// refused request's own line names it too, and its end is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_refuses_connections_is_logged_once_and_claims_fail_at_once() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
        return;
    };
    let events = events();
    // Keeping what `connect` keeps: 15 of its 16 connections.
    let (store, mut relay) = store_behind_a_relay(&url, 15).await;
    let address = format!("127.0.0.1:{}", relay.port);
    let ledger = Ledger::default();
    let app = payments_app(store.clone(), &ledger, STORE_TIMEOUT);
    assert_eq!(pay(&app, "before", 1).await.status, StatusCode::CREATED);

    relay.stop().await;
    // Two seconds of requests: the store checks the server again every
    // second, and finds the same cause.
    for attempt in 0..20 {
        let started = Instant::now();
        let reply = pay(&app, &format!("during-{attempt}"), 1).await;
        let took = started.elapsed();
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{attempt}");
        // Waiting for the store timeout is the failure; half of it
        // leaves room for a loaded machine.
        assert!(
            took < STORE_TIMEOUT / 2,
            "request {attempt} took {took:?} for a store timeout of {STORE_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ledger.executions(), 1, "nothing ran during the outage");

    let outage = events.at(Level::ERROR, "idempotent_core::store");
    assert_eq!(outage.len(), 1, "logged once: {outage:#?}");
    let cause = outage[0].fields.to_lowercase();
    assert!(
        cause.contains("connection refused") && cause.contains(&address),
        "{outage:#?}"
    );
    let refused = events.at(Level::ERROR, "idempotent_core::engine");
    assert_eq!(refused.len(), 20, "{refused:#?}");
    assert!(
        refused
            .iter()
            .all(|event| event.fields.to_lowercase().contains("connection refused")),
        "{refused:#?}"
    );

    let back = Relay::start(relay.port, relay.upstream.clone()).await;
    let reply = pay_until_available(&app, "after", 1)
        .await
        .expect("the store takes connections again once the database is back");
    assert_eq!(reply.status, StatusCode::CREATED);
    // The check that found it back runs on a task of its own.
    let recovery =
        |event: &Logged| event.fields.contains("again") && event.fields.contains(&address);
    for _ in 0..50 {
        if events
            .at(Level::INFO, "idempotent_core::store")
            .iter()
            .any(recovery)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recovered = events.at(Level::INFO, "idempotent_core::store");
    assert!(recovered.iter().any(recovery), "{recovered:#?}");
    drop(back);
    let cleanup = PostgresStore::connect(&url).await.expect("connect");
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", store.table()))
        .execute(cleanup.pool())
        .await
        .expect("drop the test table");
}
