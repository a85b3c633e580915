//! Whatever the last argument is (a body read by the handler, an
//! extractor of the application's own that reads the body or only the
//! request's parts, one taken as an `Option` or a `Result`, a tuple, a
//! generic one, the custom scope's principal), the handler is routed as
//! written: the attribute wraps it to check the body, and axum infers
//! which kind of extractor it is as for the argument itself.
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::routing::post;
use axum::{Extension, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{FingerprintError, FingerprintInput, Fingerprinter, Idempotency, idempotent};

/// A body extractor of the application's own, fingerprinted by its value.
struct Amount(u64);

impl<S: Send + Sync> FromRequest<S> for Amount {
    type Rejection = StatusCode;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let text = String::from_request(request, state).await;
        let text = text.map_err(|_| StatusCode::BAD_REQUEST)?;
        text.parse().map(Self).map_err(|_| StatusCode::BAD_REQUEST)
    }
}

impl FingerprintInput for Amount {
    fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError> {
        fingerprinter.input(&self.0).map(drop)
    }
}

// A parts extractor of the application's own, which is also the scope.
#[path = "../shared/auth.rs"]
mod auth;

use auth::User;

#[derive(Clone)]
struct AppState;

#[idempotent]
async fn own_body(State(_): State<AppState>, Amount(amount): Amount) -> String {
    amount.to_string()
}

#[idempotent(skip(body))]
async fn body(body: Body) -> StatusCode {
    drop(body);
    StatusCode::CREATED
}

#[idempotent(skip(request))]
async fn request(request: Request) -> String {
    request.uri().to_string()
}

#[idempotent(scope = "header:x-tenant")]
async fn path_last(Path(id): Path<u32>) -> String {
    id.to_string()
}

#[idempotent]
async fn path_or_rejection(id: Result<Path<u32>, PathRejection>) -> String {
    id.map(|Path(id)| id.to_string()).unwrap_or_default()
}

#[idempotent]
async fn optional_extension(tenant: Option<Extension<u32>>) -> String {
    tenant.map(|Extension(id)| id.to_string()).unwrap_or_default()
}

#[idempotent]
async fn state_last(Query(n): Query<u32>, State(_): State<AppState>) -> String {
    n.to_string()
}

#[idempotent]
async fn headers_last(headers: HeaderMap) -> String {
    headers.len().to_string()
}

#[idempotent]
async fn tuple_last((method, Path(id)): (Method, Path<u32>)) -> String {
    format!("{method} {id}")
}

#[idempotent(scope = User)]
async fn principal_last(user: User) -> String {
    user.id.to_string()
}

#[idempotent(skip(input))]
async fn generic_last<E: FromRequest<AppState> + Send + 'static>(input: E) -> StatusCode {
    drop(input);
    StatusCode::CREATED
}

fn main() {
    let _app: Router = Router::new()
        .route("/own", post(own_body))
        .route("/body", post(body))
        .route("/request", post(request))
        .route("/path/{id}", post(path_last))
        .route("/path-or-rejection/{id}", post(path_or_rejection))
        .route("/extension", post(optional_extension))
        .route("/state", post(state_last))
        .route("/headers", post(headers_last))
        .route("/tuple/{id}", post(tuple_last))
        .route("/principal", post(principal_last))
        .route("/generic", post(generic_last::<String>))
        .with_state(AppState)
        .layer(Idempotency::new(MemoryStore::new()));
}
