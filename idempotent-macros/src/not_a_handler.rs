//! What to say when the attribute is on something other than a function
//! with a body: the error names the item by its keyword and name, and says
//! where the attribute goes instead, rather than pointing at the attribute.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote};
use syn::Attribute;

/// Whether `item` is a function, its body aside.
pub(crate) fn is_function(item: &TokenStream) -> bool {
    let function = |input: syn::parse::ParseStream<'_>| {
        input.call(Attribute::parse_outer)?;
        input.parse::<syn::Visibility>()?;
        input.parse::<syn::Signature>()?;
        let body = input.parse::<proc_macro2::Group>()?;
        Ok(body.delimiter() == proc_macro2::Delimiter::Brace)
    };
    syn::parse::Parser::parse2(function, item.clone()).unwrap_or(false)
}

/// What to say about an item that is not a function with a body, spanned
/// at its keyword and name rather than at the attribute.
pub(crate) fn not_a_handler(item: &TokenStream) -> syn::Error {
    const USAGE: &str = "`#[idempotent]` goes on an `async fn` axum handler";
    if let Some(sig) = declaration_without_body(item) {
        let fn_token = sig.fn_token;
        let name = &sig.ident;
        return syn::Error::new_spanned(
            quote!(#fn_token #name),
            format!(
                "{USAGE} with a body: `{name}` is only declared here (as in a trait), so there is nothing for the attribute to run"
            ),
        );
    }
    let Ok(parsed) = syn::parse2::<syn::Item>(item.clone()) else {
        let span = item
            .clone()
            .into_iter()
            .next()
            .map_or_else(Span::call_site, |token| token.span());
        return syn::Error::new(span, USAGE);
    };
    match item_head(&parsed) {
        Some((head, what, hint)) => {
            syn::Error::new_spanned(head, format!("{USAGE}, not {what}{hint}"))
        }
        None => syn::Error::new_spanned(parsed, USAGE),
    }
}

/// The signature of `fn name(..);`, a function declared without a body.
fn declaration_without_body(item: &TokenStream) -> Option<syn::Signature> {
    let declaration = |input: syn::parse::ParseStream<'_>| {
        input.call(Attribute::parse_outer)?;
        input.parse::<syn::Visibility>()?;
        let sig = input.parse::<syn::Signature>()?;
        input.parse::<syn::Token![;]>()?;
        Ok(sig)
    };
    syn::parse::Parser::parse2(declaration, item.clone()).ok()
}

/// The tokens that name `item` (its keyword and name), what it is, and
/// where the attribute goes instead if the item holds handlers.
fn item_head(item: &syn::Item) -> Option<(TokenStream, &'static str, &'static str)> {
    const INSIDE: &str = ": put it on each handler inside";
    let head = |keyword: &dyn ToTokens, name: &dyn ToTokens| {
        let mut tokens = keyword.to_token_stream();
        name.to_tokens(&mut tokens);
        tokens
    };
    Some(match item {
        syn::Item::Struct(item) => (head(&item.struct_token, &item.ident), "a struct", ""),
        syn::Item::Enum(item) => (head(&item.enum_token, &item.ident), "an enum", ""),
        syn::Item::Union(item) => (head(&item.union_token, &item.ident), "a union", ""),
        syn::Item::Type(item) => (head(&item.type_token, &item.ident), "a type alias", ""),
        syn::Item::Const(item) => (head(&item.const_token, &item.ident), "a constant", ""),
        syn::Item::Static(item) => (head(&item.static_token, &item.ident), "a static", ""),
        syn::Item::Trait(item) => (head(&item.trait_token, &item.ident), "a trait", ""),
        syn::Item::Mod(item) => (head(&item.mod_token, &item.ident), "a module", INSIDE),
        syn::Item::Impl(item) => (
            head(&item.impl_token, &item.self_ty),
            "an `impl` block",
            INSIDE,
        ),
        syn::Item::Use(item) => (item.use_token.to_token_stream(), "a `use` declaration", ""),
        syn::Item::ExternCrate(item) => (
            head(&item.extern_token, &item.ident),
            "an `extern crate` declaration",
            "",
        ),
        syn::Item::ForeignMod(item) => (item.abi.to_token_stream(), "an `extern` block", ""),
        syn::Item::Macro(item) => (item.mac.path.to_token_stream(), "a macro invocation", ""),
        _ => return None,
    })
}
