//! The checks of a handler the attribute cannot route as written. Each
//! pushes an error spanned at the user's token and lets analysis go on, so
//! that every problem is reported at once; each exists because rustc's or
//! axum's own error would be about code the attribute wrote, or would not
//! come at all.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, quote};
use syn::ext::IdentExt;
use syn::{Attribute, FnArg, Ident, ItemFn, Pat, Path, Receiver, Signature, Type};

use crate::args::{Errors, closest, listed};
use crate::handler::{Argument, Extractor, Handler};
use crate::principal::misspells_principal;
use crate::types::{
    consumes_body, future_returned, is_named, last_ident, optional_inner, type_ident,
};

/// axum routes `async fn`s; the message says what to write instead of
/// what was written: `const fn`, or a `fn` that returns a future.
pub(crate) fn check_async(sig: &Signature, errors: &mut Errors) {
    if sig.asyncness.is_some() {
        return;
    }
    // A function cannot be both `const` and `async`.
    let fn_token = sig.fn_token;
    match &sig.constness {
        Some(constness) => errors.spanned(
            quote!(#constness #fn_token),
            "`#[idempotent]` handlers must be `async fn`: write `async fn` in place of `const fn`",
        ),
        None => match future_returned(&sig.output) {
            // `async` before `fn` would return a future of a future.
            Some(ty) => errors.spanned(
                ty,
                "`#[idempotent]` handlers must be `async fn`, and this `fn` returns a future (`async` before it would return a future of a future): write `async fn` returning the future's output type, and `.await` the future in its body",
            ),
            None => errors.spanned(
                sig.fn_token,
                "`#[idempotent]` handlers must be `async fn`: write `async` before `fn`",
            ),
        },
    }
}

/// axum routes only safe functions.
pub(crate) fn check_not_unsafe(sig: &Signature, errors: &mut Errors) {
    if let Some(unsafety) = sig.unsafety {
        errors.spanned(
            unsafety,
            "`#[idempotent]` handlers cannot be `unsafe fn`: axum routes only safe functions; keep the `unsafe` block inside a safe handler",
        );
    }
}

/// The routed function is a Rust `async fn`, which no ABI changes.
pub(crate) fn check_no_abi(sig: &Signature, errors: &mut Errors) {
    if let Some(abi) = &sig.abi {
        errors.spanned(
            abi,
            "`#[idempotent]` handlers cannot declare an ABI (`extern`): the routed function is a Rust async fn; remove the `extern`",
        );
    }
}

/// axum routes functions, not methods.
pub(crate) fn check_not_a_method(receiver: &Receiver, errors: &mut Errors) {
    errors.spanned(
        receiver,
        "`#[idempotent]` handlers cannot take `self`: axum routes functions, not methods; drop `self` and take what the handler needs from it as an extractor, such as `State<T>`",
    );
}

/// An argument of the principal's name but another spelling (`User` for
/// `scope = auth::User`) is almost surely the principal, which the
/// attribute would fingerprint instead of scoping by it, with nothing
/// said. Only for an argument that could be the principal: neither
/// skipped nor after the principal, which another type may share the
/// name of.
pub(crate) fn check_principal_spelling(ty: &Type, principal: &Path, errors: &mut Errors) {
    if misspells_principal(ty, principal) {
        errors.spanned(
            ty,
            format!(
                "this argument is not taken as the scope's principal, which `scope` spells `{}`: write its type as `scope` does (the attribute compares spellings), or `skip` it",
                tokens_text(&principal.to_token_stream())
            ),
        );
    }
}

/// A `#[cfg]` on an argument would leave the routed function, which the
/// attribute writes before `cfg` is evaluated, taking it regardless, and
/// rustc's error counts arguments the user never wrote.
pub(crate) fn check_no_cfg(attrs: &[Attribute], errors: &mut Errors) {
    for attr in attrs {
        if attr.path().is_ident("cfg") || cfg_attr_adds_cfg(attr) {
            errors.spanned(
                attr,
                "`#[idempotent]` does not support `#[cfg]` on a handler argument: put the `#[cfg]` on two versions of the handler instead",
            );
        }
    }
}

/// axum routes a handler by its type, which a function taking `impl
/// Trait` has only once its caller names the argument's type, and no
/// caller can (such an argument takes no turbofish); rustc's own error
/// would be about a path the attribute wrote.
pub(crate) fn check_no_impl_trait(ty: &Type, errors: &mut Errors) {
    if mentions_impl(ty.to_token_stream()) {
        errors.spanned(
            ty,
            "axum cannot route a handler that takes `impl Trait`: write the argument's type, or make the handler generic (`<T: Trait>`, routed as `handler::<MyType>`)",
        );
    }
}

/// Whether `tokens` hold `impl`, which a type holds only as `impl Trait`.
fn mentions_impl(tokens: TokenStream) -> bool {
    tokens.into_iter().any(|token| match token {
        proc_macro2::TokenTree::Ident(ident) => ident == "impl",
        proc_macro2::TokenTree::Group(group) => mentions_impl(group.stream()),
        _ => false,
    })
}

/// Whether `attr` is a `#[cfg_attr(predicate, ...)]` that may add a `cfg`;
/// one that adds only lint levels or other attributes is fine.
fn cfg_attr_adds_cfg(attr: &Attribute) -> bool {
    if !attr.path().is_ident("cfg_attr") {
        return false;
    }
    let parsed = attr.parse_args_with(
        syn::punctuated::Punctuated::<syn::Meta, syn::Token![,]>::parse_terminated,
    );
    parsed.is_ok_and(|metas| metas.iter().skip(1).any(|meta| meta.path().is_ident("cfg")))
}

/// The most arguments an axum handler takes.
const AXUM_MAX_ARGUMENTS: usize = 16;

/// axum's own error for a handler over its limit names the whole handler
/// type; this one says what to do. The attribute's own arguments go in a
/// tuple past clippy's limit, so only the handler's count.
pub(crate) fn check_axum_arity(
    handler: &Handler<'_>,
    inputs: &syn::punctuated::Punctuated<FnArg, syn::token::Comma>,
    errors: &mut Errors,
) {
    let routed = handler.routed_arguments();
    if routed > AXUM_MAX_ARGUMENTS {
        errors.spanned(
            inputs,
            format!(
                "axum handlers take at most {AXUM_MAX_ARGUMENTS} arguments, and this one takes {routed}: group some extractors into one tuple argument (`(method, uri): (Method, Uri)`), whose elements are fingerprinted as they would be as arguments"
            ),
        );
    }
}

/// axum's own error for a body extractor before the last argument names
/// the whole handler type, with the attribute's hidden arguments in it;
/// this one names the argument.
pub(crate) fn check_body_extractor_is_last(arguments: &[Argument<'_>], errors: &mut Errors) {
    let Some((last, before_last)) = arguments.split_last() else {
        return;
    };
    // Within a tuple too: axum extracts a tuple before the last argument
    // from the request's parts alone, and a tuple as the last argument
    // from them but for its last element.
    let extractors = before_last.iter().flat_map(|argument| &argument.extractors);
    for extractor in extractors {
        refuse_a_body_extractor(extractor, "the handler's last argument", errors);
    }
    if let Some((_, before_last)) = last.extractors.split_last() {
        for extractor in before_last {
            refuse_a_body_extractor(extractor, "the last element of its tuple", errors);
        }
    }
}

/// Refuses `extractor`, which is not where a body extractor must be, if
/// it reads the request body; `last` names that place in the error.
fn refuse_a_body_extractor(extractor: &Extractor<'_>, last: &str, errors: &mut Errors) {
    let ty = optional_inner(extractor.ty).unwrap_or(extractor.ty);
    if let Some(name) = type_ident(ty).filter(|_| consumes_body(ty)) {
        errors.spanned(
            extractor.ty,
            format!("`{name}` reads the request body, so it must be {last}"),
        );
    }
}

/// An `optional` endpoint runs requests that carry no key, which a
/// required `IdempotencyKey` extractor would refuse with 400: as an
/// argument, or as an element of a tuple argument, which axum extracts
/// element by element.
pub(crate) fn check_key_is_optional(arguments: &[Argument<'_>], errors: &mut Errors) {
    let extractors = arguments.iter().flat_map(|argument| &argument.extractors);
    for extractor in extractors {
        if is_named(extractor.ty, &["IdempotencyKey"]) {
            errors.spanned(
                extractor.ty,
                "an `optional` endpoint also runs requests without a key, which a required `IdempotencyKey` refuses with 400: take `Option<IdempotencyKey>`",
            );
        }
    }
}

/// The handler's body moves into a function nested in the routed one,
/// where `Self` does not reach (rustc's E0401 "can't use `Self` from outer
/// item" would name an item the user never wrote).
pub(crate) fn check_no_self_type(func: &ItemFn, errors: &mut Errors) {
    let sig = &func.sig;
    let signature = [
        sig.generics.to_token_stream(),
        sig.inputs.to_token_stream(),
        sig.output.to_token_stream(),
        sig.generics.where_clause.to_token_stream(),
    ];
    let body = func.block.to_token_stream();
    let found = signature.iter().chain([&body]).find_map(first_self_type);
    if let Some(span) = found {
        errors.push(syn::Error::new(
            span,
            "`Self` is not in scope in an `#[idempotent]` handler: the attribute moves the handler into a function of its own; name the type instead",
        ));
    }
}

/// Where `tokens` first name `Self`, outside a nested `impl`, `trait`,
/// `struct` or `enum`, whose `Self` is their own from its keyword to the
/// end of the item: its header included (`impl PartialEq<Self> for
/// Amount`, a `where Self: Sized` clause, a tuple struct's fields).
fn first_self_type(tokens: &TokenStream) -> Option<Span> {
    self_type_in(tokens, false)
}

/// [`first_self_type`] in `tokens`, which hold statements (a block's, or
/// a macro call's) where `in_block`: only there may an item start them.
fn self_type_in(tokens: &TokenStream, in_block: bool) -> Option<Span> {
    use proc_macro2::{Delimiter, TokenTree};
    // Whether the tokens are those of a nested item, up to its braced body
    // or, for a tuple or unit struct, its `;`.
    let mut in_own_item = false;
    let mut previous: Option<TokenTree> = None;
    for token in tokens.clone() {
        match &token {
            TokenTree::Ident(ident) if ident == "Self" && !in_own_item => {
                return Some(ident.span());
            }
            TokenTree::Ident(ident) if starts_an_item(ident, previous.as_ref(), in_block) => {
                in_own_item = true;
            }
            TokenTree::Group(group) if in_own_item => {
                in_own_item = group.delimiter() != Delimiter::Brace;
            }
            TokenTree::Group(group) => {
                let statements = group.delimiter() == Delimiter::Brace
                    || matches!(&previous, Some(TokenTree::Punct(bang)) if bang.as_char() == '!');
                if let Some(span) = self_type_in(&group.stream(), statements) {
                    return Some(span);
                }
            }
            TokenTree::Punct(punct) if punct.as_char() == ';' => in_own_item = false,
            _ => {}
        }
        previous = Some(token);
    }
    None
}

/// Whether `ident` is the keyword of an item that has a `Self` of its
/// own. An `impl` is one only where a statement starts (first in a block,
/// after a `;`, an attribute or a braced item) or after `unsafe` or
/// `default`; elsewhere it is a type: `Result<impl IntoResponse,
/// Self::Error>`, `(impl IntoResponseParts, Self)`, `&'static impl Trait`.
fn starts_an_item(
    ident: &proc_macro2::Ident,
    previous: Option<&proc_macro2::TokenTree>,
    in_block: bool,
) -> bool {
    use proc_macro2::TokenTree;
    if ["trait", "struct", "enum"]
        .iter()
        .any(|keyword| ident == keyword)
    {
        return true;
    }
    let starts_a_statement = match previous {
        None => in_block,
        Some(TokenTree::Punct(punct)) => punct.as_char() == ';',
        Some(TokenTree::Group(_)) => true,
        Some(TokenTree::Ident(before)) => before == "unsafe" || before == "default",
        Some(TokenTree::Literal(_)) => false,
    };
    ident == "impl" && starts_a_statement
}

/// A second `#[idempotent]` below the first would wrap the handler as
/// written in a routed function of its own, and rustc's error would then
/// be about arguments the user never wrote.
pub(crate) fn check_applied_once(attrs: &[Attribute], errors: &mut Errors) {
    let second = attrs.iter().find(|attr| {
        let path = attr.path();
        last_ident(path).is_some_and(|ident| ident == "idempotent")
    });
    if let Some(attr) = second {
        errors.spanned(
            attr,
            "`#[idempotent]` is applied to this handler twice: keep one, with every option in it",
        );
    }
}

/// `#[utoipa::path]` below `#[idempotent]` would write its `__path_<name>`
/// item inside the routed function, where `#[derive(OpenApi)]` cannot
/// find it: rustc's error would then be at the derive, about an item the
/// user never wrote.
pub(crate) fn check_openapi_path_above(func: &ItemFn, errors: &mut Errors) {
    if let Some(attr) = func.attrs.iter().find(|attr| is_openapi_path(attr)) {
        let name = func.sig.ident.unraw();
        errors.spanned(
            attr,
            format!(
                "put `#[utoipa::path]` above `#[idempotent]`: below it, its `__path_{name}` item would be nested in the routed function, out of the `OpenApi` derive's reach"
            ),
        );
    }
}

/// Whether `attr` is utoipa's `#[utoipa::path(...)]`, or `#[path(...)]`
/// with it imported (the built-in `#[path = "..."]` goes on modules). A
/// `#[cfg_attr(predicate, utoipa::path(...))]` reaches the attribute
/// already resolved: as this, or gone.
pub(crate) fn is_openapi_path(attr: &Attribute) -> bool {
    let segments: Vec<String> = attr
        .path()
        .segments
        .iter()
        .map(|segment| segment.ident.to_string())
        .collect();
    match segments.as_slice() {
        [utoipa, path] => utoipa == "utoipa" && path == "path",
        [path] => path == "path" && matches!(attr.meta, syn::Meta::List(_)),
        _ => false,
    }
}

/// A name in `skip` that names no argument would leave the argument it
/// was meant for fingerprinted, with nothing said.
pub(crate) fn check_skipped_names(arguments: &[Argument<'_>], skip: &[Ident], errors: &mut Errors) {
    let names: Vec<String> = arguments
        .iter()
        .filter_map(|argument| argument.name.as_ref().map(ToString::to_string))
        .collect();
    for skipped in skip {
        if arguments.iter().any(|a| a.name.as_ref() == Some(skipped)) {
            continue;
        }
        if let Some(argument) = arguments
            .iter()
            .find(|argument| binds_within(argument.pat, skipped))
        {
            errors.spanned(skipped, bound_within_pattern(skipped, argument));
            continue;
        }
        let known = if names.is_empty() {
            "the handler has no named arguments".to_owned()
        } else {
            format!("the arguments are {}", listed(&names))
        };
        let hint = closest(&skipped.to_string(), names.iter().map(String::as_str))
            .map(|name| format!("did you mean `{name}`? "))
            .unwrap_or_default();
        errors.spanned(
            skipped,
            format!("`skip` names no argument `{skipped}`; {hint}{known}"),
        );
    }
}

/// Why `skip` cannot name `skipped`, a name bound inside the pattern of
/// `argument`, which has no name of its own. Naming the argument's other
/// bindings, as the nearest spelling would, could leave the body out.
fn bound_within_pattern(skipped: &Ident, argument: &Argument<'_>) -> String {
    let pat = argument.pat;
    let ty = argument.ty;
    let name = type_ident(ty).map_or_else(
        || "input".to_owned(),
        |ident| snake_case(&ident.to_string()),
    );
    format!(
        "`skip` names whole arguments, and `{skipped}` is bound inside the destructured argument `{}`, which has no name: bind that argument to a name, as in `{name}: {}`, and write `skip({name})`",
        tokens_text(&quote!(#pat)),
        tokens_text(&quote!(#ty)),
    )
}

/// Whether `pat` binds `name` anywhere within it.
fn binds_within(pat: &Pat, name: &Ident) -> bool {
    match pat {
        Pat::Ident(ident) => {
            &ident.ident == name
                || ident
                    .subpat
                    .as_ref()
                    .is_some_and(|(_, sub)| binds_within(sub, name))
        }
        Pat::TupleStruct(tuple) => tuple.elems.iter().any(|elem| binds_within(elem, name)),
        Pat::Tuple(tuple) => tuple.elems.iter().any(|elem| binds_within(elem, name)),
        Pat::Struct(item) => item
            .fields
            .iter()
            .any(|field| binds_within(&field.pat, name)),
        Pat::Slice(slice) => slice.elems.iter().any(|elem| binds_within(elem, name)),
        Pat::Or(or) => or.cases.iter().any(|case| binds_within(case, name)),
        Pat::Reference(reference) => binds_within(&reference.pat, name),
        Pat::Paren(paren) => binds_within(&paren.pat, name),
        Pat::Type(typed) => binds_within(&typed.pat, name),
        _ => false,
    }
}

/// `Query` as `query`, `RawForm` as `raw_form`.
fn snake_case(name: &str) -> String {
    let mut snake = String::new();
    for (index, c) in name.chars().enumerate() {
        if c.is_uppercase() && index > 0 {
            snake.push('_');
        }
        snake.extend(c.to_lowercase());
    }
    snake
}

/// Tokens as written: `to_string` puts a space between any two tokens;
/// only those between two words (`ref mut x`), after a comma and around
/// braces (`Trace { verbose }`) are kept.
pub(crate) fn tokens_text(tokens: &TokenStream) -> String {
    let text = tokens.to_string();
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::new();
    for (index, &c) in chars.iter().enumerate() {
        if c == ' ' {
            let before = out.chars().last().unwrap_or(' ');
            let after = chars.get(index + 1).copied().unwrap_or(' ');
            let kept = is_word(before) && is_word(after)
                || before == ','
                || matches!(before, '{' | '}')
                || matches!(after, '{' | '}');
            if !kept {
                continue;
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_named_in(tokens: &str) -> bool {
        let tokens: TokenStream = tokens.parse().expect("tokens");
        first_self_type(&tokens).is_some()
    }

    #[test]
    fn a_nested_items_header_names_its_own_self() {
        assert!(!self_named_in(
            "{ struct A(u8); impl PartialEq<Self> for A { fn eq(&self, o: &Self) -> bool { true } } }"
        ));
        assert!(!self_named_in(
            "{ struct L<T>(T) where Self: Sized; let x = 1; }"
        ));
        assert!(!self_named_in(
            "{ #[derive(Clone)] unsafe impl Send for A where Self: Sized {} }"
        ));
    }

    #[test]
    fn self_outside_nested_items_is_found() {
        assert!(self_named_in("-> Result<impl IntoResponse, Self::Error>"));
        assert!(self_named_in("{ struct A; impl A {} Self::validate() }"));
        assert!(self_named_in("{ fn f(x: &mut impl Read) {} Self::g() }"));
    }

    /// `impl Trait` opening a tuple, or after a reference's lifetime, is a
    /// type: a `Self` after it in the same tuple or list is the handler's.
    #[test]
    fn self_after_an_impl_type_in_a_tuple_or_after_a_lifetime_is_found() {
        assert!(self_named_in("-> (impl IntoResponseParts, Self)"));
        assert!(self_named_in(
            "-> Result<(impl IntoResponseParts, Json<Self>), AppError>"
        ));
        assert!(self_named_in(
            "-> Result<&'static impl IntoResponse, Self::Error>"
        ));
    }
}
