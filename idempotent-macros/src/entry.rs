//! The attribute's entry point: parse the options, analyze the handler,
//! then expand it; or, when anything is wrong, emit the handler as written
//! with every error, so that the attribute's errors are the only ones.

use proc_macro2::TokenStream;
use quote::{format_ident, quote};
use syn::ItemFn;
use syn::ext::IdentExt;

use crate::args::{Args, Errors};
use crate::checks::is_openapi_path;
use crate::expand::{expand, split_attributes};
use crate::handler::Handler;
use crate::not_a_handler::{is_function, not_a_handler};

/// What `#[idempotent(args)]` on `item` expands to: the routed handler, or
/// the handler as written with every error the attribute found.
pub(crate) fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let args = Args::parse(args, &mut errors);
    let Ok(func) = syn::parse2::<ItemFn>(item.clone()) else {
        // A function whose body does not parse (as while it is being
        // typed) gets rustc's error in the body, and no second one here.
        if !is_function(&item) {
            errors.push(not_a_handler(&item));
        }
        return fallback(item, errors);
    };
    let func = with_outer_attributes(func);
    let handler = Handler::analyze(&func, &args, &mut errors);
    if errors.is_empty() {
        expand(&func, &args, &handler)
    } else {
        stand_in(&func, &args, errors)
    }
}

/// `func` with the attributes written at the top of its body
/// (`#![allow(..)]`, a `//!` comment) written above it instead, where they
/// mean the same: the expansion sorts the handler's attributes between the
/// routed function and the one as written, each above its function, where
/// an inner attribute is refused.
fn with_outer_attributes(mut func: ItemFn) -> ItemFn {
    for attr in &mut func.attrs {
        attr.style = syn::AttrStyle::Outer;
    }
    func
}

/// A handler the attribute refused, emitted so that its error is the only
/// one: the function as written under a hidden name, so that its body is
/// still type-checked and its own errors reported, and under its name a
/// handler of no arguments that axum accepts, so that the router naming it
/// reports nothing more (the function as written may be no axum handler,
/// as with a body extractor before another argument, and axum's error
/// would then point at the wrong fix). The stand-in keeps the handler's
/// generics, so `handler::<T>` still names it, and never runs: the crate
/// does not compile.
fn stand_in(func: &ItemFn, args: &Args, errors: Errors) -> TokenStream {
    let private = args.private();
    let name = &func.sig.ident;
    let mut as_written = func.clone();
    as_written.sig.ident = format_ident!("__idempotent_{}", name.unraw(), span = name.span());
    // Its items would be about the hidden name, and their errors noise.
    as_written.attrs.retain(|attr| !is_openapi_path(attr));
    let (outer_attrs, _) = split_attributes(&func.attrs);
    let vis = &func.vis;
    let generics = &func.sig.generics;
    let where_clause = &generics.where_clause;
    // Nothing calls the function as written, and the crate fails anyway:
    // a warning that it is unused would only add noise to the error.
    let stand_in = quote! {
        #[allow(dead_code)]
        #as_written

        #(#outer_attrs)*
        #vis async fn #name #generics () -> #private::axum::response::Response #where_clause {
            #private::not_compiled()
        }
    };
    fallback(stand_in, errors)
}

/// The original item plus every error: the function still exists, so the
/// rest of the crate and IDE completion keep working.
fn fallback(mut item: TokenStream, errors: Errors) -> TokenStream {
    item.extend(errors.into_error().map(|error| error.to_compile_error()));
    item
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The routed function of a handler taking `count` header maps and a
    /// body, as written out by the attribute.
    fn routed_with_arguments(count: usize, options: TokenStream) -> String {
        let headers = (0..count - 1).map(|index| format_ident!("h{index}"));
        let item = quote! {
            async fn handler(#(#headers: HeaderMap,)* body: String) -> String { body }
        };
        idempotent(options, item).to_string()
    }

    /// A crate may forbid `clippy::too_many_arguments` and raise its limit
    /// in `clippy.toml` past a handler's count: any `allow` of the lint is
    /// then an error (E0453), so the routed function needs none.
    #[test]
    fn a_handler_past_clippys_default_limit_writes_no_allow_of_the_lint() {
        for count in [7, 8, 12, 16] {
            for options in [
                quote!(),
                quote!(scope = "global"),
                quote!(scope = "header:x-tenant"),
            ] {
                let routed = routed_with_arguments(count, options.clone());
                assert!(
                    !routed.contains("too_many_arguments"),
                    "{count} arguments, options `{options}`: {routed}"
                );
            }
        }
    }
}
