// A body extractor of the application's own, last, whose value is not
// `Send`: the handler's future holds it, which is reported at the
// argument; and axum, which holds it too, refuses it at `.route(...)`.
use std::rc::Rc;

use axum::Router;
use axum::extract::{FromRequest, Request};
use axum::routing::post;
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};

struct LocalBody(Rc<String>);

impl<S: Send + Sync> FromRequest<S> for LocalBody {
    type Rejection = axum::response::Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = String::from_request(request, state).await;
        body.map(|body| Self(Rc::new(body)))
            .map_err(axum::response::IntoResponse::into_response)
    }
}

#[idempotent(skip(body))]
async fn handler(body: LocalBody) -> String {
    body.0.to_string()
}

fn main() {
    let _app: Router = Router::new()
        .route("/", post(handler))
        .layer(Idempotency::new(MemoryStore::new()));
}
