//! The `#[idempotent]` attribute. Depend on `idempotent-core`, which
//! re-exports it as `idempotent_core::idempotent`.
#![forbid(unsafe_code)]

// Parse, then analyze and check, then expand, each step in modules of
// its own so that expansion only writes what analysis decided: `args`
// parses the options; `handler` analyzes the function, running `checks`
// and asking `principal`, `exact_repeats` and `types`; `expand` writes
// the routed function. `entry` ties the steps together, and
// `not_a_handler` explains an attribute put on anything else.
mod args;
mod checks;
mod entry;
mod exact_repeats;
mod expand;
mod handler;
mod not_a_handler;
mod principal;
mod types;

use proc_macro::TokenStream;

#[doc = include_str!("../doc/idempotent.md")]
#[proc_macro_attribute]
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    entry::idempotent(args.into(), item.into()).into()
}
