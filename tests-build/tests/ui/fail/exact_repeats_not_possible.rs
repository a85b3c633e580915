use axum::extract::Query;
use idempotent_core::idempotent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Page {
    size: u32,
}

#[idempotent(scope = "header:x-tenant-id", exact_repeats)]
async fn by_tenant(body: String) -> String {
    body
}

#[idempotent(exact_repeats = true)]
async fn no_body(Query(page): Query<Page>) -> String {
    page.size.to_string()
}

#[idempotent(exact_repeats)]
async fn maybe_paged(page: Option<Query<Page>>, body: String) -> String {
    format!("{} {body}", page.map_or(0, |Query(page)| page.size))
}

#[idempotent(exact_repeats)]
async fn generic<T: Serialize + 'static>(axum::Json(body): axum::Json<T>) -> String {
    let _ = body;
    String::new()
}

/// An extractor of the application's own, named like one of axum's.
mod meta {
    pub struct Form;

    impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Form {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(
            _: &mut axum::http::request::Parts,
            _: &S,
        ) -> Result<Self, Self::Rejection> {
            Ok(Self)
        }
    }
}

#[idempotent(exact_repeats, skip(form))]
async fn own_form(Query(page): Query<Page>, form: meta::Form) -> String {
    let meta::Form = form;
    page.size.to_string()
}

fn main() {}
