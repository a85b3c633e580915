use idempotent_core::idempotent;

// Options of other attributes, and settings of the whole router.
#[idempotent(state = AppState)]
async fn state(body: String) -> String {
    body
}

#[idempotent(key_header = "x-request-id")]
async fn key_header(body: String) -> String {
    body
}

#[idempotent(store_timeout = "1s")]
async fn router_setting(body: String) -> String {
    body
}

fn main() {}
