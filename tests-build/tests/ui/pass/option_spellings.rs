//! Spellings of the options' values that mean one thing without doubt.
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};

// OpenAPI writes status classes in capitals; a range may end at a class.
#[idempotent(final_statuses = "2XX, 404, 3xx-4XX")]
async fn classes(body: String) -> String {
    body
}

// Terms may be joined or spaced, a number spaced from its unit; a century
// is the longest duration.
#[idempotent(ttl = "36500d", lease = "1m30s", wait = " 2 s ")]
async fn durations(body: String) -> String {
    body
}

// The options are independent: a lease longer than the ttl times a
// running claim, the ttl a finished response.
#[idempotent(ttl = "10s", lease = "5m")]
async fn lease_beyond_ttl(body: String) -> String {
    body
}

// An empty `skip` skips nothing, so a `macro_rules!` may pass one through.
#[idempotent(skip())]
async fn skips_nothing(Json(body): Json<u32>) -> Json<u32> {
    Json(body)
}

fn main() {
    let _app: Router = Router::new()
        .route("/classes", post(classes))
        .route("/durations", post(durations))
        .route("/lease-beyond-ttl", post(lease_beyond_ttl))
        .route("/skips-nothing", post(skips_nothing))
        .layer(Idempotency::new(MemoryStore::new()));
}
