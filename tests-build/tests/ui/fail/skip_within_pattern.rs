use axum::{
    Json,
    extract::{Path, Query},
};
use idempotent_core::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Trace {
    verbose: bool,
}

// `b` is bound inside `Path((a, b))`, which `skip` cannot name; the body's
// `j`, one letter away, is not suggested in its place.
#[idempotent(skip(b))]
async fn by_tuple(Path((a, b)): Path<(u32, u32)>, Json(j): Json<u64>) -> String {
    format!("{a} {b} {j}")
}

#[idempotent(skip(verbose))]
async fn by_struct(Query(Trace { verbose }): Query<Trace>, body: String) -> String {
    format!("{verbose} {body}")
}

fn main() {}
