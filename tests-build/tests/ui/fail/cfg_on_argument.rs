use idempotent_core::idempotent;

#[idempotent]
async fn handler(#[cfg(any())] headers: axum::http::HeaderMap, body: String) -> String {
    body
}


#[idempotent]
async fn through_cfg_attr(#[cfg_attr(all(), cfg(any()))] headers: axum::http::HeaderMap, body: String) -> String {
    body
}

fn main() {}
