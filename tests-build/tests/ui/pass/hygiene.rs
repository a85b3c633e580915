//! The expansion names everything by absolute path and keeps its own
//! bindings apart: a crate that shadows the prelude, has modules named
//! like the crates the attribute uses, a lowercase constant where a
//! binding could be, a trait in scope with methods named like the
//! expansion's, or no implicit prelude at all still compiles.
#![allow(dead_code, non_camel_case_types, non_upper_case_globals, unused_macros)]

use ::axum::routing::post;
use ::axum::{Json, Router};

mod core {}
mod std {}
mod idempotent_core {}
mod axum {}

struct Result;
struct Option;
struct Ok;
struct Err;
struct Some;
struct None;
struct Box;
struct String;
trait Send {}
trait Future {}
trait Into {}
trait From {}
macro_rules! concat {
    ($($t:tt)*) => {
        0
    };
}
macro_rules! module_path {
    ($($t:tt)*) => {
        0
    };
}

/// A lowercase constant is a pattern wherever a `let` binding of its name
/// stands.
const error: u8 = 0;

/// A trait for every type, in scope, whose methods take `self`: a method
/// call on a value of the expansion's would find these before its own
/// methods that take `&self`.
trait Everything: Sized {
    fn name(self) {}
    fn check(self, _: &str) {}
    fn into_parts(self) {}
}

impl<T> Everything for T {}

#[::idempotent_core::idempotent(ttl = "24h", scope = "api_key")]
async fn create(Json(n): Json<u32>) -> Json<u32> {
    Json(n)
}

#[::idempotent_core::idempotent(scope = "header:x-tenant", final_statuses = "2xx", skip(page))]
async fn create_for_tenant(page: ::axum::extract::Query<u32>, Json(n): Json<u32>) -> Json<u32> {
    Json(n + page.0)
}

#[no_implicit_prelude]
mod bare {
    use ::axum::Json;
    use ::idempotent_core::idempotent;

    #[idempotent(scope = "global", final_statuses = "2xx")]
    pub(crate) async fn create(Json(n): Json<u32>) -> Json<u32> {
        Json(n)
    }

    #[idempotent(scope = "header:x-tenant")]
    pub(crate) async fn echo(body: ::std::string::String) -> ::std::string::String {
        body
    }
}

fn main() {
    let _app: Router = Router::new()
        .route("/a", post(create))
        .route("/b", post(create_for_tenant))
        .route("/c", post(bare::create))
        .route("/d", post(bare::echo))
        .layer(::idempotent_core::Idempotency::new(
            ::idempotent_core::store::MemoryStore::new(),
        ));
}
