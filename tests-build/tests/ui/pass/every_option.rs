use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Extension, Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, IdempotencyKey, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Clone)]
struct Db;

#[derive(Serialize, Deserialize)]
struct Transfer {
    cents: u64,
}

#[derive(Serialize, Deserialize)]
struct Page {
    dry_run: bool,
}

#[idempotent(
    ttl = "7d",
    lease = "90s",
    wait = "500ms",
    scope = "header:X-Tenant-Id",
    optional,
    skip(query),
    name = "transfers.create",
    final_statuses = "2xx, 404, 410-419",
)]
async fn transfer(
    State(_db): State<Db>,
    Extension(_config): Extension<u8>,
    _headers: HeaderMap,
    _key: Option<IdempotencyKey>,
    Path(account): Path<u64>,
    query: Query<Page>,
    Json(body): Json<Transfer>,
) -> Json<u64> {
    let _ = query.dry_run;
    Json(account + body.cents)
}

#[idempotent(ttl = "1h 30m", lease = "15m", scope = "global", optional = false)]
async fn global() {}

#[idempotent(optional = true, name = "text")]
async fn text(body: String) -> String {
    body
}

#[idempotent(exact_repeats = false)]
async fn plain_replays(Json(body): Json<Transfer>) -> Json<u64> {
    Json(body.cents)
}

#[idempotent(exact_repeats, scope = "global")]
async fn exact(Path(account): Path<u64>, Json(body): Json<Transfer>) -> Json<u64> {
    Json(account + body.cents)
}

fn main() {
    let _app: Router = Router::new()
        .route("/accounts/{account}/transfers", post(transfer))
        .route("/global", post(global))
        .route("/text", post(text))
        .route("/plain", post(plain_replays))
        .route("/exact/{account}", post(exact))
        .layer(Extension(7_u8))
        .with_state(Db)
        .layer(Idempotency::new(MemoryStore::new()));
}
