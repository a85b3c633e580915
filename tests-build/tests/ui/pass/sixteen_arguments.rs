//! axum's limit of 16 arguments holds for the handler as written: the
//! attribute's own arguments go in one tuple with the first.
use axum::http::{HeaderMap, Method, Uri, Version};
use axum::routing::post;
use axum::{Extension, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};

#[path = "../shared/auth.rs"]
mod auth;

#[idempotent(scope = "header:x-tenant")]
async fn sixteen(
    _a: HeaderMap, _b: Method, _c: Uri, _d: Version, _e: Extension<bool>,
    _f: Extension<u8>, _g: Extension<u16>, _h: Extension<u32>, _i: Extension<u64>,
    _j: Extension<i8>, _k: Extension<i16>, _l: Extension<i32>, _m: Extension<i64>,
    _n: Extension<u128>, _o: Extension<i128>, body: String,
) -> String {
    body
}

// The principal the attribute extracts goes in the tuple too.
#[idempotent(scope = auth::User)]
async fn sixteen_scoped(
    _a: HeaderMap, _b: Method, _c: Uri, _d: Version, _e: Extension<bool>,
    _f: Extension<u8>, _g: Extension<u16>, _h: Extension<u32>, _i: Extension<u64>,
    _j: Extension<i8>, _k: Extension<i16>, _l: Extension<i32>, _m: Extension<i64>,
    _n: Extension<u128>, _o: Extension<i128>, body: String,
) -> String {
    body
}

fn main() {
    let _app: Router = Router::new()
        .route("/sixteen", post(sixteen))
        .route("/sixteen-scoped", post(sixteen_scoped))
        .layer(Idempotency::new(MemoryStore::new()));
}
