//! The SQL stores' statements meeting another connection's write to the
//! same row, made deterministic: a transaction of the test's own holds the
//! row (an uncommitted claim, take-over or renewal, as another instance
//! would send it), the store's statement waits for it (PostgreSQL says so
//! in `pg_stat_activity`), and the transaction then ends. Each PostgreSQL
//! case runs under every `default_transaction_isolation` a database or
//! role may set. Each test works in its own table (or file).

use crate::store_support;

use std::str::FromStr;
use std::time::Duration;

use axum::http::StatusCode;
use idempotent_core::clock::ManualClock;
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, LeaseToken, Record, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{PostgresStore, SqliteStore, Store, StoreError};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, PgPool};
use store_support::{EXPIRY_GRACE, TempDb, backend_url, unique_name};

const URL: &str = "IDEMPOTENT_TEST_POSTGRES_URL";
const ISOLATIONS: [&str; 3] = ["read committed", "repeatable read", "serializable"];
const LEASE: Duration = Duration::from_secs(10);
/// Later than any lease of these tests: a deadline the test's own
/// transaction writes, live for the rest of the test.
const FAR_MS: i64 = 3_600_000;

fn record_key(name: &str) -> RecordKey {
    RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(name.as_bytes()).expect("valid key"),
    )
}

fn fingerprint(byte: u8) -> Fingerprint {
    Fingerprint::from_bytes([byte; 32])
}

fn ok() -> StoredResponse {
    StoredResponse::new(StatusCode::OK, Vec::new(), None)
}

async fn acquired(store: &impl Store, key: &RecordKey, byte: u8) -> LeaseToken {
    match store.claim(key, fingerprint(byte), LEASE).await {
        Ok(Claim::Acquired(token)) => token,
        other => panic!("expected to acquire {key:?}, got {other:?}"),
    }
}

/// The connection options of `url` with `isolation` as the default
/// transaction isolation, as a database or role can set it.
fn options_under(url: &str, isolation: &str) -> PgConnectOptions {
    // A space in a startup option is escaped with a backslash.
    PgConnectOptions::from_str(url)
        .expect("valid URL")
        .options([(
            "default_transaction_isolation",
            isolation.replace(' ', "\\ "),
        )])
}

/// A migrated store on a fresh table, reading `clock`, whose statements
/// run under `isolation`.
async fn postgres_under(url: &str, isolation: &str, clock: &ManualClock) -> PostgresStore {
    let connected = PostgresStore::connect_with(options_under(url, isolation))
        .await
        .expect("connect");
    let store = PostgresStore::builder(connected.pool().clone())
        .table(unique_name("idem_races"))
        .clock(clock.clone())
        .build()
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    store
}

async fn drop_table(store: &PostgresStore) {
    sqlx::query(&format!("DROP TABLE IF EXISTS {}", store.table()))
        .execute(store.pool())
        .await
        .expect("drop the test table");
}

/// A transaction on a connection of its own (another instance's), whose
/// writes hold their rows until it ends.
struct Writer(PgConnection);

impl Writer {
    async fn begin(url: &str, isolation: &str) -> Self {
        let mut connection = PgConnection::connect_with(&options_under(url, isolation))
            .await
            .expect("connect the writer");
        sqlx::raw_sql("BEGIN")
            .execute(&mut connection)
            .await
            .expect("begin");
        Self(connection)
    }

    /// Runs `sql` (the store's table in place of each `{table}`) with the
    /// store's clock reading `now_ms` as `$1` and a token as `$2`.
    async fn write(&mut self, store: &PostgresStore, sql: &str, now_ms: i64, token: LeaseToken) {
        let sql = sql.replace("{table}", store.table());
        let written = sqlx::query(&sql)
            .bind(now_ms)
            .bind(token.to_bytes().as_slice())
            .bind(ScopeDigest::global().as_bytes().as_slice())
            .execute(&mut self.0)
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
        assert_eq!(written.rows_affected(), 1, "{sql}");
    }

    async fn end(mut self, how: &str) {
        sqlx::raw_sql(how).execute(&mut self.0).await.expect(how);
    }
}

/// Waits until a statement on `table` waits for a lock another
/// transaction holds: the store's statement met the writer's row.
async fn until_blocked_on(pool: &PgPool, table: &str) {
    loop {
        let blocked: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                            WHERE wait_event_type = 'Lock' AND strpos(query, $1) > 0
                              AND pid <> pg_backend_pid())",
        )
        .bind(table)
        .fetch_one(pool)
        .await
        .expect("read pg_stat_activity");
        if blocked {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn now_ms(clock: &ManualClock) -> i64 {
    use idempotent_core::clock::Clock;
    i64::try_from(clock.now_millis()).expect("a current time")
}

/// The token holding `key` in flight.
async fn holder(store: &impl Store, key: &RecordKey) -> Option<LeaseToken> {
    match store.get(key).await.expect("get") {
        Some(Record::InFlight(held)) => Some(held.lease_token),
        _ => None,
    }
}

/// A claim that finds an expired lease, and whose take-over then waits
/// for the holder's renewal of it (the lease lapsed, nobody had taken the
/// key yet), finds the lease renewed once the renewal commits: it answers
/// `InFlight`, and the holder still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_take_over_waiting_on_a_renewal_finds_the_lease_renewed() {
    let Some(url) = backend_url(URL) else { return };
    for isolation in ISOLATIONS {
        let clock = ManualClock::starting_now();
        let store = postgres_under(&url, isolation, &clock).await;
        let key = record_key("renewed");
        let token = acquired(&store, &key, 1).await;
        clock.advance(LEASE * 2);
        let mut renewal = Writer::begin(&url, isolation).await;
        let renew =
            "UPDATE {table} SET expires_at = $1 + 3600000 WHERE lease_token = $2 AND scope = $3";
        renewal.write(&store, renew, now_ms(&clock), token).await;
        let claim = tokio::spawn({
            let (store, key) = (store.clone(), key.clone());
            async move { store.claim(&key, fingerprint(2), LEASE).await }
        });
        until_blocked_on(store.pool(), store.table()).await;
        renewal.end("COMMIT").await;
        let claimed = claim.await.expect("the claim ran").expect("claim");
        assert!(
            matches!(claimed, Claim::InFlight { fingerprint: held, .. } if held == fingerprint(1)),
            "{isolation}: {claimed:?}"
        );
        store
            .complete(&key, token, ok(), LEASE)
            .await
            .unwrap_or_else(|error| panic!("{isolation}: {error}"));
        drop_table(&store).await;
    }
}

/// A claim of a new key that meets another instance's uncommitted claim
/// of it answers `InFlight` once that commits, and acquires once that
/// rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_waiting_on_an_uncommitted_claim_follows_its_outcome() {
    let Some(url) = backend_url(URL) else { return };
    for isolation in ISOLATIONS {
        for (end, acquires) in [("COMMIT", false), ("ROLLBACK", true)] {
            let clock = ManualClock::starting_now();
            let store = postgres_under(&url, isolation, &clock).await;
            let key = record_key("new");
            let mut other = Writer::begin(&url, isolation).await;
            let insert = "INSERT INTO {table} (scope, key, fingerprint, lease_token, expires_at)
                          VALUES ($3, 'new', $2 || $2, $2, $1 + 3600000)";
            other
                .write(&store, insert, now_ms(&clock), LeaseToken::from_u128(7))
                .await;
            let claim = tokio::spawn({
                let (store, key) = (store.clone(), key.clone());
                async move { store.claim(&key, fingerprint(2), LEASE).await }
            });
            until_blocked_on(store.pool(), store.table()).await;
            other.end(end).await;
            let claimed = claim.await.expect("the claim ran").expect("claim");
            assert_eq!(
                matches!(claimed, Claim::Acquired(_)),
                acquires,
                "{isolation}, {end}: {claimed:?}"
            );
            drop_table(&store).await;
        }
    }
}

/// A purge that meets a take-over of an expired row in progress keeps
/// the row once the take-over commits: the new holder's claim is live.
/// (Under a stricter isolation the purge may fail instead; the reaper
/// tries again on its next tick.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_waiting_on_a_take_over_keeps_the_new_claim() {
    let Some(url) = backend_url(URL) else { return };
    for isolation in ISOLATIONS {
        let clock = ManualClock::starting_now();
        let store = postgres_under(&url, isolation, &clock).await;
        let key = record_key("taken");
        acquired(&store, &key, 1).await;
        // Past the grace too, so that the purge picks the row.
        clock.advance(LEASE * 2 + EXPIRY_GRACE);
        let mut take_over = Writer::begin(&url, isolation).await;
        let new_holder = LeaseToken::from_u128(9);
        let take =
            "UPDATE {table} SET lease_token = $2, expires_at = $1 + 3600000 WHERE scope = $3";
        take_over
            .write(&store, take, now_ms(&clock), new_holder)
            .await;
        let purge = tokio::spawn({
            let store = store.clone();
            async move { store.purge_expired().await }
        });
        until_blocked_on(store.pool(), store.table()).await;
        take_over.end("COMMIT").await;
        let purged = purge.await.expect("the purge ran");
        assert!(
            !matches!(purged, Ok(deleted) if deleted > 0),
            "{isolation}: {purged:?}"
        );
        assert_eq!(holder(&store, &key).await, Some(new_holder), "{isolation}");
        drop_table(&store).await;
    }
}

/// A holder whose lease lapsed completes while another instance's
/// take-over of its key is uncommitted: once that commits, the completion
/// is refused (`LeaseLost`), and the new holder's claim stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_completion_waiting_on_a_take_over_is_refused() {
    let Some(url) = backend_url(URL) else { return };
    for isolation in ISOLATIONS {
        let clock = ManualClock::starting_now();
        let store = postgres_under(&url, isolation, &clock).await;
        let key = record_key("stale");
        let stale = acquired(&store, &key, 1).await;
        clock.advance(LEASE * 2);
        let mut take_over = Writer::begin(&url, isolation).await;
        let new_holder = LeaseToken::from_u128(11);
        let take = "UPDATE {table} SET lease_token = $2, expires_at = $1 + 3600000
                    WHERE scope = $3 AND expires_at <= $1";
        take_over
            .write(&store, take, now_ms(&clock), new_holder)
            .await;
        let complete = tokio::spawn({
            let (store, key) = (store.clone(), key.clone());
            async move { store.complete(&key, stale, ok(), LEASE).await }
        });
        until_blocked_on(store.pool(), store.table()).await;
        take_over.end("COMMIT").await;
        let completed = complete.await.expect("the completion ran");
        assert!(
            matches!(completed, Err(StoreError::LeaseLost)),
            "{isolation}: {completed:?}"
        );
        assert_eq!(holder(&store, &key).await, Some(new_holder), "{isolation}");
        drop_table(&store).await;
    }
}

/// The key's row deleted by the reaper once its lease lapsed and the
/// grace passed, then claimed afresh by another request (a new row, not a
/// take-over of the old one): the old holder can neither renew, complete
/// nor release, and the new holder's response is the one replayed.
async fn old_holder_is_fenced_after_a_purge(
    store: &(impl Store + Purges),
    clock: &ManualClock,
) -> u64 {
    let key = record_key("purged");
    let old = acquired(store, &key, 1).await;
    clock.advance(LEASE * 2 + EXPIRY_GRACE);
    let purged = store.purge().await;
    let new = acquired(store, &key, 2).await;
    assert!(matches!(
        store.renew(&key, old, LEASE).await,
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(
        store.complete(&key, old, ok(), LEASE).await,
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(
        store.release(&key, old).await,
        Err(StoreError::LeaseLost)
    ));
    let created = StoredResponse::new(StatusCode::CREATED, Vec::new(), None);
    store.complete(&key, new, created, LEASE).await.unwrap();
    match store.claim(&key, fingerprint(2), LEASE).await.unwrap() {
        Claim::Completed(done) => {
            assert_eq!(done.fingerprint, fingerprint(2));
            assert_eq!(done.response.status, StatusCode::CREATED);
        }
        other => panic!("expected the new holder's response, got {other:?}"),
    }
    purged
}

/// What a test store purges with.
trait Purges {
    fn purge(&self) -> impl Future<Output = u64>;
}

impl Purges for PostgresStore {
    async fn purge(&self) -> u64 {
        self.purge_expired().await.expect("purge")
    }
}

impl Purges for SqliteStore {
    async fn purge(&self) -> u64 {
        self.purge_expired().await.expect("purge")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_old_holder_is_fenced_after_a_purge() {
    let Some(url) = backend_url(URL) else { return };
    let clock = ManualClock::starting_now();
    let store = postgres_under(&url, "read committed", &clock).await;
    assert_eq!(old_holder_is_fenced_after_a_purge(&store, &clock).await, 1);
    drop_table(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_old_holder_is_fenced_after_a_purge() {
    let db = TempDb::new();
    let clock = ManualClock::starting_now();
    let store = sqlite_with_clock(&db, &clock).await;
    assert_eq!(old_holder_is_fenced_after_a_purge(&store, &clock).await, 1);
}

async fn sqlite_with_clock(db: &TempDb, clock: &ManualClock) -> SqliteStore {
    let opened = SqliteStore::open(&db.0).await.expect("open");
    let store = SqliteStore::builder(opened.pool().clone())
        .clock(clock.clone())
        .build()
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    store
}

/// A claim on a SQLite file whose write lock another process holds, with
/// an uncommitted claim of the same key, waits for it (busy timeout) and
/// then answers `InFlight`: the insert that met the committed row took
/// nothing over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_claim_behind_another_process_claim_of_the_key_answers_in_flight() {
    let db = TempDb::new();
    let clock = ManualClock::starting_now();
    let store = sqlite_with_clock(&db, &clock).await;
    let other = SqliteStore::open(&db.0).await.expect("open");
    let mut writer = other.pool().acquire().await.expect("a connection");
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut *writer)
        .await
        .expect("take the write lock");
    sqlx::query(
        "INSERT INTO idempotency_records (scope, key, fingerprint, lease_token, expires_at)
         VALUES (?1, 'locked', ?2, ?3, ?4)",
    )
    .bind(ScopeDigest::global().as_bytes().as_slice())
    .bind(fingerprint(1).as_bytes().as_slice())
    .bind(LeaseToken::from_u128(5).to_bytes().as_slice())
    .bind(now_ms(&clock) + FAR_MS)
    .execute(&mut *writer)
    .await
    .expect("insert another process's claim");
    let key = record_key("locked");
    let claim = tokio::spawn({
        let (store, key) = (store.clone(), key.clone());
        async move { store.claim(&key, fingerprint(2), LEASE).await }
    });
    // Let the claim start; it finds the key free before the commit, or
    // claimed after it.
    tokio::task::yield_now().await;
    sqlx::raw_sql("COMMIT")
        .execute(&mut *writer)
        .await
        .expect("commit");
    let claimed = claim.await.expect("the claim ran").expect("claim");
    assert!(
        matches!(claimed, Claim::InFlight { fingerprint: held, .. } if held == fingerprint(1)),
        "{claimed:?}"
    );
}

/// Deadlines beyond what SQL's `bigint` holds (a lease or TTL of
/// `Duration::MAX`, a TTL of a century) neither wrap nor fail: the claim
/// holds, the response is replayed a century later.
async fn far_deadlines_hold(store: &impl Store, clock: &ManualClock) {
    let century = Duration::from_secs(100 * 365 * 24 * 3600);
    for (name, lease, ttl) in [
        ("max", Duration::MAX, Duration::MAX),
        ("century", century, century),
    ] {
        let key = record_key(name);
        let Claim::Acquired(token) = store.claim(&key, fingerprint(1), lease).await.unwrap() else {
            panic!("{name}: acquire");
        };
        assert!(matches!(
            store.claim(&key, fingerprint(1), LEASE).await.unwrap(),
            Claim::InFlight { .. }
        ));
        store.complete(&key, token, ok(), ttl).await.unwrap();
        clock.advance(century - Duration::from_secs(1));
        assert!(
            matches!(
                store.claim(&key, fingerprint(1), LEASE).await.unwrap(),
                Claim::Completed(_)
            ),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_far_deadlines_hold() {
    let Some(url) = backend_url(URL) else { return };
    let clock = ManualClock::starting_now();
    let store = postgres_under(&url, "read committed", &clock).await;
    far_deadlines_hold(&store, &clock).await;
    drop_table(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_far_deadlines_hold() {
    let db = TempDb::new();
    let clock = ManualClock::starting_now();
    let store = sqlite_with_clock(&db, &clock).await;
    far_deadlines_hold(&store, &clock).await;
}

/// Behind a pooler in transaction mode (PgBouncer before 1.21, or
/// without `max_prepared_statements`), a statement the store prepared
/// under a name on one server connection is run, under that name, on
/// another, where the name may stand for another of the store's
/// statements. A take-over run there as the claim's read must not
/// acquire the key: the expired lease is still in the row, and the next
/// claim takes it over too. Here the server connection has the claim
/// under the take-over's name, as another client of the pooler would
/// have left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_run_as_another_statement_does_not_acquire() {
    let Some(url) = backend_url(URL) else { return };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect");
    let clock = ManualClock::starting_now();
    let store = PostgresStore::builder(pool.clone())
        .table(unique_name("idem_races"))
        .clock(clock.clone())
        .hold_connections(0)
        .build()
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    // The claim and the take-over, prepared on the one connection.
    let prime = record_key("prime");
    acquired(&store, &prime, 1).await;
    clock.advance(LEASE * 2);
    acquired(&store, &prime, 1).await;
    prepare_the_claim_as_the_take_over(&pool).await;

    let key = record_key("swapped");
    acquired(&store, &key, 1).await;
    clock.advance(LEASE * 2);
    let mut acquisitions = 0;
    for retry in [2, 3] {
        if let Ok(Claim::Acquired(token)) = store.claim(&key, fingerprint(retry), LEASE).await {
            acquisitions += 1;
            assert_eq!(
                holder(&store, &key).await,
                Some(token),
                "acquired without holding the key"
            );
        }
    }
    assert!(acquisitions <= 1, "{acquisitions} retries acquired the key");
    drop_table(&store).await;
}

/// On the one connection of `pool`, replaces the store's prepared
/// take-over by its claim, under the take-over's name.
async fn prepare_the_claim_as_the_take_over(pool: &PgPool) {
    let mut connection = pool.acquire().await.expect("the store's connection");
    let prepared: Vec<(String, String, Vec<String>)> = sqlx::query_as(
        "SELECT name, statement, parameter_types::text[] FROM pg_prepared_statements",
    )
    .fetch_all(&mut *connection)
    .await
    .expect("read the prepared statements");
    let find = |looks_like: &dyn Fn(&str) -> bool| {
        (prepared.iter())
            .find(|(_, statement, _)| looks_like(statement.trim_start()))
            .cloned()
            .expect("the store's statement is prepared")
    };
    let (take_over, _, _) =
        find(&|statement| statement.starts_with("UPDATE") && statement.contains("SET fingerprint"));
    let (_, claim, types) = find(&|statement| statement.starts_with("WITH found"));
    let swap = format!(
        "DEALLOCATE {take_over}; PREPARE {take_over} ({}) AS {claim}",
        types.join(", ")
    );
    sqlx::raw_sql(&swap)
        .execute(&mut *connection)
        .await
        .expect("swap the statements");
}
