//! Generic handlers bounded only as axum needs them: an instance that
//! axum can route is `Send + 'static` already, and the attribute says so
//! on the routed function itself.
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Widget {
    n: u32,
}

#[idempotent]
async fn create<T: Serialize + DeserializeOwned>(Json(value): Json<T>) -> Json<T> {
    Json(value)
}

#[idempotent]
async fn create_where<T>(Json(value): Json<T>) -> Json<T>
where
    T: Serialize + DeserializeOwned,
{
    Json(value)
}

/// A marker type parameter without bounds of its own.
trait Kind {
    const NAME: &'static str;
}

struct Gadgets;

impl Kind for Gadgets {
    const NAME: &'static str = "gadget";
}

#[idempotent(scope = "global")]
async fn create_kind<K: Kind>(State(count): State<u32>, body: String) -> String {
    format!("{} {count} {body}", K::NAME)
}

fn main() {
    let _app: Router = Router::new()
        .route("/widgets", post(create::<Widget>))
        .route("/widgets-where", post(create_where::<Widget>))
        .route("/gadgets", post(create_kind::<Gadgets>))
        .with_state(1)
        .layer(Idempotency::new(MemoryStore::new()));
}
