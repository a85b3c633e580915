use axum::http::{HeaderMap, Method, Uri, Version};
use axum::Extension;
use idempotent_core::idempotent;

// axum's limit is 16, whatever the attribute adds (its own arguments then
// go in a tuple with the first).
#[idempotent(scope = "header:x-tenant")]
async fn seventeen(
    _a: HeaderMap, _b: Method, _c: Uri, _d: Version, _e: Extension<bool>,
    _f: Extension<u8>, _g: Extension<u16>, _h: Extension<u32>, _i: Extension<u64>,
    _j: Extension<i8>, _k: Extension<i16>, _l: Extension<i32>, _m: Extension<i64>,
    _n: Extension<u128>, _o: Extension<i128>, _p: Extension<char>, body: String,
) -> String {
    body
}

fn main() {}
