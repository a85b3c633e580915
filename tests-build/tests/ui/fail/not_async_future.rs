use std::future::Future;
use std::pin::Pin;

use idempotent_core::idempotent;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[idempotent]
fn returns_impl_future(body: String) -> impl Future<Output = String> {
    async move { body }
}

#[idempotent]
fn returns_boxed_future(body: String) -> Pin<Box<dyn Future<Output = String> + Send>> {
    Box::pin(async move { body })
}

#[idempotent]
fn returns_named_future(body: String) -> BoxFuture<'static, String> {
    Box::pin(async move { body })
}

fn main() {}
