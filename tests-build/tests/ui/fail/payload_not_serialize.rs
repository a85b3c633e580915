use axum::extract::{Path, Query};
use axum::Json;
use idempotent_core::idempotent;
use serde::Deserialize;

#[derive(Deserialize)]
struct Page {
    number: u32,
}

#[derive(Deserialize)]
struct OrderId(u64);

#[idempotent]
async fn paged(Query(page): Query<Page>, body: String) -> String {
    format!("{}{body}", page.number)
}

#[idempotent]
async fn by_id(Path(id): Path<OrderId>, body: String) -> String {
    format!("{}{body}", id.0)
}

#[idempotent]
async fn maybe(body: Option<Json<Page>>) -> String {
    body.map(|Json(page)| page.number.to_string()).unwrap_or_default()
}

fn main() {}
