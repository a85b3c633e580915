use axum::Json;
use axum::extract::Query;
use idempotent_core::idempotent;

#[idempotent(skip(trace, trace))]
async fn twice(trace: Query<u8>, Json(body): Json<u32>) -> Json<u32> {
    let _ = trace;
    Json(body)
}

#[idempotent(skip("trace"))]
async fn quoted(trace: Query<u8>, Json(body): Json<u32>) -> Json<u32> {
    let _ = trace;
    Json(body)
}

#[idempotent(skip(Query(trace)))]
async fn pattern(Query(trace): Query<u8>, Json(body): Json<u32>) -> Json<u32> {
    let _ = trace;
    Json(body)
}

#[idempotent(skip(trace), skip(body))]
async fn two_lists(trace: Query<u8>, Json(body): Json<u32>) -> Json<u32> {
    let _ = trace;
    Json(body)
}

fn main() {}
