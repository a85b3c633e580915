use std::rc::Rc;

use axum::Router;
use axum::routing::post;
use idempotent_core::idempotent;

trait Kind {
    const NAME: &'static str;
}

struct Local(#[allow(dead_code)] Rc<u8>);

impl Kind for Local {
    const NAME: &'static str = "local";
}

#[idempotent]
async fn create<K: Kind>(body: String) -> String {
    format!("{} {body}", K::NAME)
}

fn main() {
    let _app: Router = Router::new().route("/local", post(create::<Local>));
}
