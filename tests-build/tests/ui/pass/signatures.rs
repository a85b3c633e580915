//! Signatures the attribute keeps intact: docs, attributes, visibility,
//! generics, `impl IntoResponse`, `?`, raw identifiers, patterns.

use axum::extract::{Path, Request};
use axum::http::{Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub mod handlers {
    use super::*;

    /// Documented, public, returning `impl IntoResponse`.
    #[idempotent]
    #[allow(clippy::unused_async)]
    pub async fn public(Json(n): Json<i32>) -> impl IntoResponse {
        (StatusCode::CREATED, Json(n))
    }
}

#[idempotent]
async fn generic<T>(Json(value): Json<T>) -> Json<T>
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    Json(value)
}

#[idempotent]
async fn r#type(Json(n): Json<u8>) -> Result<String, StatusCode> {
    let n = n.checked_add(1).ok_or(StatusCode::BAD_REQUEST)?;
    Ok(n.to_string())
}

#[idempotent]
async fn mutable(mut body: String) -> String {
    body.push('!');
    body
}

// The whole request cannot be fingerprinted: skipping it is explicit.
#[idempotent(skip(request))]
async fn whole_request(request: Request) -> String {
    request.uri().to_string()
}

#[idempotent]
async fn early_return(Json(n): Json<i32>) -> StatusCode {
    if n < 0 {
        return StatusCode::BAD_REQUEST;
    }
    StatusCode::NO_CONTENT
}

// Extractors grouped into a tuple, as past axum's limit of arguments: each
// is fingerprinted, or left out, as it would be as an argument.
#[idempotent]
async fn grouped((method, Path(id)): (Method, Path<u32>), body: String) -> String {
    format!("{method} {id} {body}")
}

// The handler's name may be one of its own bindings.
#[idempotent]
async fn body(body: String) -> String {
    body
}

// A type declared in the body has a `Self` of its own.
#[idempotent]
async fn local_types(Json(n): Json<u32>) -> String {
    struct Node {
        next: Option<Box<Self>>,
    }
    struct Pair(u32, Option<Box<Self>>);
    enum Tree {
        Leaf(u32),
        Branch(Box<Self>, Box<Self>),
    }
    let node = Node { next: None };
    let pair = Pair(n, None);
    let tree = Tree::Branch(Box::new(Tree::Leaf(n)), Box::new(Tree::Leaf(pair.0)));
    let leaves = match tree {
        Tree::Branch(..) => 2,
        Tree::Leaf(_) => 1,
    };
    format!("{} {} {leaves}", node.next.is_none(), pair.1.is_none())
}

// A type declared in the body may name its `Self` in its header too.
#[idempotent]
async fn local_impl_header(Json(n): Json<u32>) -> String {
    struct Amount(u32);
    impl PartialEq<Self> for Amount {
        fn eq(&self, other: &Self) -> bool {
            self.0 == other.0
        }
    }
    struct Limited<T>(T)
    where
        Self: Sized;
    let limited = Limited(n);
    format!("{} {}", Amount(limited.0) == Amount(n), limited.0)
}

/// An application's own parts extractor that happens to share a body
/// extractor's name may come before the body.
mod meta {
    use axum::extract::FromRequestParts;
    use axum::http::request::Parts;
    use std::convert::Infallible;

    pub struct Form {
        pub trace: String,
    }

    impl<S: Send + Sync> FromRequestParts<S> for Form {
        type Rejection = Infallible;

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
            Ok(Self { trace: parts.uri.to_string() })
        }
    }
}

#[idempotent(skip(form))]
async fn own_extractor_named_like_a_body(form: meta::Form, Json(n): Json<u8>) -> String {
    format!("{} {n}", form.trace)
}

// ... or come last, where exact repeats, which wrap axum's body extractors
// alone, leave it be.
#[idempotent(skip(form))]
async fn own_extractor_named_like_a_body_last(
    axum::extract::Path(n): axum::extract::Path<u8>,
    form: meta::Form,
) -> String {
    format!("{} {n}", form.trace)
}

fn main() {
    let _app: Router = Router::new()
        .route("/public", post(handlers::public))
        .route("/generic", post(generic::<Vec<u8>>))
        .route("/type", post(r#type))
        .route("/mutable", post(mutable))
        .route("/request", post(whole_request))
        .route("/early", post(early_return))
        .route("/body", post(body))
        .route("/grouped/{id}", post(grouped))
        .route("/own", post(own_extractor_named_like_a_body))
        .route("/own-last/{n}", post(own_extractor_named_like_a_body_last))
        .route("/local", post(local_types))
        .route("/local-impl", post(local_impl_header))
        .layer(Idempotency::new(MemoryStore::new()));
}
