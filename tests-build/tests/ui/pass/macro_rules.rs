//! Handlers written by an application's own `macro_rules!`: names and
//! types passed in carry that macro's hygiene, not the attribute's, and
//! option values passed in read as if written in place.
use axum::routing::post;
use axum::{Json, Router};
use idempotent_core::store::MemoryStore;
use idempotent_core::{Idempotency, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Widget {
    n: u32,
}

#[path = "../shared/auth.rs"]
mod auth;

use auth::User;

macro_rules! create {
    ($name:ident, $ty:ty) => {
        #[idempotent]
        async fn $name(Json(body): Json<$ty>) -> Json<$ty> {
            Json(body)
        }
    };
}

macro_rules! echo {
    ($name:ident, $ty:ident) => {
        #[idempotent(scope = "header:x-tenant")]
        async fn $name(body: $ty) -> $ty {
            body
        }
    };
}

macro_rules! per_user {
    ($name:ident, $user:ident) => {
        #[idempotent(scope = User)]
        async fn $name(user: $user, body: String) -> String {
            format!("{} {body}", user.id)
        }
    };
}

// Options passed in as fragments, which reach the attribute wrapped in
// invisible delimiters, read as if written in place.
macro_rules! configured {
    ($name:ident, $ttl:literal, $optional:literal, $user:ty, $endpoint:expr) => {
        #[idempotent(ttl = $ttl, optional = $optional, scope = $user, name = $endpoint)]
        async fn $name(user: $user, body: String) -> String {
            format!("{} {body}", user.id)
        }
    };
}

// A scope type passed in by name, of which the attribute extracts the
// principal itself.
macro_rules! scoped_by {
    ($name:ident, $user:ident) => {
        #[idempotent(scope = $user)]
        async fn $name(body: String) -> String {
            body
        }
    };
}

create!(create_widget, Widget);
echo!(echo_text, String);
per_user!(for_user, User);
configured!(configured_for_user, "2h", true, User, "users.configured");
scoped_by!(scoped_by_user, User);

fn main() {
    let _app: Router = Router::new()
        .route("/widgets", post(create_widget))
        .route("/echo", post(echo_text))
        .route("/user", post(for_user))
        .route("/configured", post(configured_for_user))
        .route("/scoped", post(scoped_by_user))
        .layer(Idempotency::new(MemoryStore::new()));
}
