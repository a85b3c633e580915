//! Handlers as an application writes them.
#![deny(warnings, missing_docs)]
#![forbid(unsafe_code)]

use axum::extract::{Form, FromRef, Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Clone)]
struct AppState {
    db: u32,
    name: &'static str,
}

impl FromRef<AppState> for u32 {
    fn from_ref(state: &AppState) -> Self {
        state.db
    }
}

#[derive(Serialize, Deserialize)]
struct NewOrder {
    id: u32,
    note: String,
}

struct AppError;

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    }
}

/// Generic over the router's state.
#[idempotent]
pub(crate) async fn generic_state<S: Clone + Send + Sync + 'static>(
    State(_state): State<S>,
    Json(order): Json<NewOrder>,
) -> Json<u32> {
    Json(order.id)
}

/// Generic with a where clause naming the state.
#[idempotent(scope = "global")]
async fn from_ref<S>(State(state): State<S>, body: String) -> String
where
    S: Clone + Send + Sync + 'static,
    u32: FromRef<S>,
{
    format!("{} {body}", u32::from_ref(&state))
}

/// Nested destructuring, `mut` bindings.
#[idempotent]
#[allow(clippy::needless_pass_by_value)]
#[deny(unused_mut)]
async fn destructured(
    State(AppState { db, .. }): State<AppState>,
    Path(mut id): Path<u32>,
    Json(NewOrder { id: order, mut note }): Json<NewOrder>,
) -> Result<impl IntoResponse, AppError> {
    id += db + order;
    note.push('!');
    Ok((StatusCode::CREATED, Json(format!("{id} {note}"))))
}

/// Returns a `Response`.
#[idempotent]
async fn response(Form(order): Form<NewOrder>) -> Response {
    (StatusCode::CREATED, order.note).into_response()
}

/// Returns a redirect.
#[idempotent]
async fn redirect(body: String) -> Redirect {
    Redirect::to(&body)
}

/// A tuple last argument whose last element reads the body.
#[idempotent]
async fn tuple_with_body((method, body): (Method, String)) -> String {
    format!("{method} {body}")
}

/// A `cfg_attr` on the function.
#[idempotent]
#[cfg_attr(all(), allow(unused_variables))]
pub(crate) async fn cfg_attr_on_fn(body: String) -> String {
    let unused = 1;
    body
}

/// Handlers as associated functions.
pub(crate) struct Orders;

impl Orders {
    /// Creates one.
    #[idempotent]
    pub(crate) async fn create(State(state): State<AppState>, Json(order): Json<NewOrder>) -> String {
        format!("{} {}", state.name, order.id)
    }
}

macro_rules! handler {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($ty:ty)) => {
        $(#[$attr])*
        #[idempotent]
        $vis async fn $name(Json(value): Json<$ty>) -> Json<$ty> {
            Json(value)
        }
    };
}

handler! {
    /// Written by a macro.
    pub(crate) fn from_macro(u32)
}

fn main() {
    let _app: Router = Router::new()
        .route("/a", post(generic_state::<AppState>))
        .route("/b", post(from_ref::<AppState>))
        .route("/c/{id}", post(destructured))
        .route("/d", post(response))
        .route("/e", post(redirect))
        .route("/f", post(tuple_with_body))
        .route("/g", post(cfg_attr_on_fn))
        .route("/h", post(Orders::create))
        .route("/i", post(from_macro))
        .with_state(AppState { db: 1, name: "x" })
        .layer(Idempotency::new(MemoryStore::new()));
}
