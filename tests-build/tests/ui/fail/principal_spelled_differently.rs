use idempotent_core::idempotent;

#[path = "../shared/auth.rs"]
mod auth;

use auth::User;

#[idempotent(scope = auth::User)]
async fn transfer(user: User, body: String) -> String {
    format!("{} {body}", user.id)
}

fn main() {}
