//! The peer crates behind the benchmark handler, on the same routes as
//! `bench-server`:
//!
//! ```text
//! peer-server --peer idempotent|axum-idempotent [--addr 127.0.0.1:3000] [--max-seconds 120]
//! ```
//!
//! - `/bare`: the handler alone;
//! - `/idem`: the handler behind the peer's layer;
//! - `/plain`: the handler on the layered router, sent without a key;
//! - `GET /login` (axum-idempotent only): starts the ruts session the
//!   layer needs; the load generator sends its cookie on every request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};

#[path = "../../src/handler.rs"]
mod handler;

fn idempotent_v2() -> Router {
    use idempotent::memory::MemoryStore;
    use idempotent::middleware::IdempotencyLayer;
    let store = MemoryStore::builder().try_build().expect("memory store");
    // Scoped by the API key, as our endpoint is.
    let layer = IdempotencyLayer::new(store).scope(|parts| {
        parts
            .headers
            .get("x-api-key")
            .and_then(|key| key.to_str().ok())
            .map(String::from)
    });
    Router::new()
        .route("/idem", post(handler::bare))
        .route("/plain", post(handler::bare))
        .layer(layer)
}

fn axum_idempotent() -> Router {
    use axum_idempotent::{IdempotentLayer, IdempotentOptions};
    use ruts::store::Ttl;
    use ruts::store::moka::MokaStore;
    use ruts::{CookieOptions, Session, SessionLayer};
    use tower_cookies::CookieManagerLayer;

    async fn login(session: Session<MokaStore>) -> &'static str {
        let day = Ttl::new(24 * 3600).expect("ttl");
        session
            .set("user", &"bench", day, None)
            .await
            .expect("session insert");
        "ok"
    }

    let store = Arc::new(MokaStore::builder().build());
    let options = IdempotentOptions::default()
        // Not required: requests without a key pass through, as on our
        // layered router.
        .use_idempotency_key_header(Some("Idempotency-Key"), false)
        .expire_after(24 * 3600);
    let idempotent = Router::new()
        .route("/idem", post(handler::bare))
        .route("/plain", post(handler::bare))
        .layer(IdempotentLayer::<MokaStore>::new(options));
    Router::new()
        .route("/login", get(login))
        .merge(idempotent)
        .layer(
            SessionLayer::new(store)
                .with_cookie_options(CookieOptions::build().name("session").max_age(24 * 3600).path("/")),
        )
        .layer(CookieManagerLayer::new())
}

#[tokio::main]
async fn main() {
    let mut peer = String::new();
    let mut addr = SocketAddr::from(([127, 0, 0, 1], 3000));
    let mut max_seconds = 120;
    let mut words = std::env::args().skip(1);
    while let (Some(flag), Some(value)) = (words.next(), words.next()) {
        match flag.as_str() {
            "--peer" => peer = value,
            "--addr" => addr = value.parse().expect("--addr"),
            "--max-seconds" => max_seconds = value.parse().expect("--max-seconds"),
            other => panic!("unknown flag {other}"),
        }
    }
    let layered = match peer.as_str() {
        "idempotent" => idempotent_v2(),
        "axum-idempotent" => axum_idempotent(),
        other => panic!("unknown peer `{other}` (idempotent | axum-idempotent)"),
    };
    let app = Router::new().route("/bare", post(handler::bare)).merge(layered);
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    eprintln!("peer-server: {peer} on http://{addr}");
    let serve = axum::serve(listener, app);
    let _ = tokio::time::timeout(Duration::from_secs(max_seconds), serve).await;
}
