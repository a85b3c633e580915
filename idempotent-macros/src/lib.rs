//! The `#[idempotent]` attribute. Depend on `idempotent-core`, which
//! re-exports it as `idempotent_core::idempotent`.
#![forbid(unsafe_code)]

mod args;
mod expand;

use proc_macro::TokenStream;

#[doc = include_str!("../doc/idempotent.md")]
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::idempotent(args.into(), item.into()).into()
}
