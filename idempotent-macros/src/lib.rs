//! The `#[idempotent]` attribute. Depend on `idempotent-core`, which re-exports it.
use proc_macro::TokenStream;

/// Makes an axum handler idempotent. See `idempotent_core::idempotent`.
#[proc_macro_attribute]
pub fn idempotent(_args: TokenStream, item: TokenStream) -> TokenStream {
    item
}
