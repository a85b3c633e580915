// A handler the attribute refuses still has its body type-checked: its own
// mistakes are reported beside the attribute's, and the router that names
// it reports nothing.
use axum::Router;
use axum::http::HeaderMap;
use axum::routing::post;
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};

#[idempotent]
async fn handler(body: String, headers: HeaderMap) -> String {
    let count: u32 = headers.len();
    format!("{body}{count}")
}

struct Orders;

impl Orders {
    #[idempotent(tll = "1h")]
    async fn create<T: Send + 'static>(body: String) -> String {
        let _: T = body;
        String::new()
    }
}

fn main() {
    let _app: Router = Router::new()
        .route("/", post(handler))
        .route("/orders", post(Orders::create::<String>))
        .layer(Idempotency::new(MemoryStore::new()));
}
