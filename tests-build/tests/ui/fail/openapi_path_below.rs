use idempotent_core::idempotent;

// Below `#[idempotent]`, utoipa's `__path_create` item would be nested in
// the routed function. (utoipa need not be a dependency: the attribute
// refuses it before it expands.)
#[idempotent]
#[utoipa::path(post, path = "/orders")]
async fn create(body: String) -> String {
    body
}

// The same, added by a `cfg_attr` whose predicate holds (as an OpenAPI
// feature would).
#[idempotent]
#[cfg_attr(all(), utoipa::path(post, path = "/refunds"))]
async fn refund(body: String) -> String {
    body
}

fn main() {}
