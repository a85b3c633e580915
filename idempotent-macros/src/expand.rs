//! Rewrites the handler: the user's function is kept verbatim as an inner
//! `async fn`, and an outer function with the same name, attributes and
//! visibility extracts the request's idempotency context and hands the inner
//! future to `__private::run`. Nothing here decides anything at run time.

use std::hash::{DefaultHasher, Hash, Hasher};

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{
    Attribute, FnArg, GenericArgument, GenericParam, Ident, ItemFn, LitStr, Pat, Path,
    PathArguments, ReturnType, Type,
};

use crate::args::{Args, Errors, Scope, closest};

/// Extractors that are never fingerprinted: they carry server state,
/// connection details, the key itself or request metadata, not the
/// request's payload.
const NOT_FINGERPRINTED: &[&str] = &[
    "State",
    "Extension",
    "HeaderMap",
    "ConnectInfo",
    "IdempotencyKey",
    "Parts",
    "Method",
    "Uri",
    "OriginalUri",
    "MatchedPath",
    "Version",
    "TypedHeader",
];

/// Body extractors whose value depends on the body and its content type
/// alone.
const BODY_EXTRACTORS: &[&str] = &["Json", "Form", "Bytes", "String"];
/// Extractors whose value depends on the URI and its path parameters alone.
const URI_EXTRACTORS: &[&str] = &["Path", "Query"];

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
    let handler = Handler::analyze(&func, &args, &mut errors);
    if errors.is_empty() {
        expand(&func, &args, &handler)
    } else {
        stand_in(&func, &args, errors)
    }
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
    let krate = args
        .krate
        .clone()
        .unwrap_or_else(|| syn::parse_quote!(::idempotent_core));
    let private = quote!(#krate::__private);
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

/// Whether `item` is a function, its body aside.
fn is_function(item: &TokenStream) -> bool {
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
fn not_a_handler(item: &TokenStream) -> syn::Error {
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

/// The original item plus every error: the function still exists, so the
/// rest of the crate and IDE completion keep working.
fn fallback(mut item: TokenStream, errors: Errors) -> TokenStream {
    item.extend(errors.into_error().map(|error| error.to_compile_error()));
    item
}

// ===== analysis =====

enum Role {
    Fingerprinted,
    NotFingerprinted,
    /// The custom scope's principal, taken from the handler's own argument.
    Principal,
}

struct Argument<'a> {
    pat: &'a Pat,
    ty: &'a Type,
    name: Option<Ident>,
    role: Role,
}

struct Handler<'a> {
    arguments: Vec<Argument<'a>>,
    /// Whether the body is extracted through `ExactBody`.
    exact_repeats: bool,
    /// Whether `scope` names a principal type.
    custom_scope: bool,
}

impl<'a> Handler<'a> {
    fn analyze(func: &'a ItemFn, args: &Args, errors: &mut Errors) -> Self {
        let sig = &func.sig;
        if sig.asyncness.is_none() {
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
        if let Some(unsafety) = sig.unsafety {
            errors.spanned(
                unsafety,
                "`#[idempotent]` handlers cannot be `unsafe fn`: axum routes only safe functions; keep the `unsafe` block inside a safe handler",
            );
        }
        if let Some(abi) = &sig.abi {
            errors.spanned(
                abi,
                "`#[idempotent]` handlers cannot declare an ABI (`extern`): the routed function is a Rust async fn; remove the `extern`",
            );
        }
        let principal = match &args.scope {
            Some(Scope::Custom(path)) => Some(path),
            _ => None,
        };
        let mut arguments = Vec::new();
        for input in &sig.inputs {
            match input {
                FnArg::Receiver(receiver) => errors.spanned(
                    receiver,
                    "`#[idempotent]` handlers cannot take `self`: axum routes functions, not methods; drop `self` and take what the handler needs from it as an extractor, such as `State<T>`",
                ),
                FnArg::Typed(typed) => {
                    check_no_cfg(&typed.attrs, errors);
                    check_no_impl_trait(&typed.ty, errors);
                    let taken = arguments
                        .iter()
                        .any(|a: &Argument<'_>| matches!(a.role, Role::Principal));
                    let is_principal =
                        !taken && principal.is_some_and(|p| takes_principal(&typed.ty, p));
                    let skipped = is_skipped(&typed.pat, &args.skip);
                    // A skipped argument is never fingerprinted, and once
                    // the principal is taken another type may share its name.
                    if let Some(path) = principal
                        && !skipped
                        && !taken
                        && misspells_principal(&typed.ty, path)
                    {
                        errors.spanned(
                            &typed.ty,
                            format!(
                                "this argument is not taken as the scope's principal, which `scope` spells `{}`: write its type as `scope` does (the attribute compares spellings), or `skip` it",
                                path.to_token_stream().to_string().replace(' ', "")
                            ),
                        );
                    }
                    arguments.push(Argument::new(&typed.pat, &typed.ty, is_principal, skipped));
                }
            }
        }
        check_body_extractor_is_last(&arguments, errors);
        check_skipped_names(&arguments, &args.skip, errors);
        check_no_self_type(func, errors);
        check_applied_once(&func.attrs, errors);
        check_openapi_path_above(func, errors);
        if args.optional {
            check_key_is_optional(&sig.inputs, errors);
        }
        let blocker = exact_repeats_blocker(&arguments, &sig.generics, args);
        let exact_repeats = match (&args.exact_repeats, blocker) {
            (Some((false, _)), _) => false,
            (Some((true, option)), Some(blocker)) => {
                errors.spanned(
                    option,
                    format!(
                        "`exact_repeats` needs a handler whose fingerprint reads only the URI and the body: {blocker}"
                    ),
                );
                false
            }
            (_, blocker) => blocker.is_none(),
        };
        let handler = Self {
            arguments,
            exact_repeats,
            custom_scope: principal.is_some(),
        };
        check_axum_arity(&handler, &sig.inputs, errors);
        handler
    }

    /// How many arguments the routed function takes beyond the user's:
    /// the request's idempotency context (unless `ExactBody` carries it)
    /// and a custom scope's principal that the attribute extracts itself.
    fn added_arguments(&self) -> usize {
        usize::from(!self.exact_repeats)
            + usize::from(self.custom_scope && self.principal().is_none())
    }

    fn principal(&self) -> Option<usize> {
        self.arguments
            .iter()
            .position(|argument| matches!(argument.role, Role::Principal))
    }
}

impl<'a> Argument<'a> {
    fn new(pat: &'a Pat, ty: &'a Type, is_principal: bool, skipped: bool) -> Self {
        let name = binding(pat);
        let role = if is_principal {
            Role::Principal
        } else if skipped || !is_fingerprinted_by_default(ty) {
            Role::NotFingerprinted
        } else {
            Role::Fingerprinted
        };
        Self {
            pat,
            ty,
            name,
            role,
        }
    }
}

/// Why a retry with the same bytes might not fingerprint the same, if it
/// might: exact repeats need the last argument to be a body extractor,
/// every fingerprinted argument to read only the URI or the body, and the
/// scope to be resolved from the request's headers while extracting.
fn exact_repeats_blocker(
    arguments: &[Argument<'_>],
    generics: &syn::Generics,
    args: &Args,
) -> Option<String> {
    // An extractor of the application's own, written with its path
    // (`meta::Form`), may read more than these do, or be a parts extractor
    // that `ExactBody` cannot wrap.
    let is = |argument: &Argument<'_>, names: &[&str]| is_extractor(argument.ty, names);
    let list = |names: &[&str]| {
        let names: Vec<String> = names.iter().map(|name| format!("`{name}`")).collect();
        names.join(", ")
    };
    if !generics.params.is_empty() {
        // Instances of one generic handler share its name and path.
        return Some("it is generic".to_owned());
    }
    if !matches!(args.scope, None | Some(Scope::ApiKey | Scope::Global)) {
        return Some("its scope is not `\"api_key\"` or `\"global\"`".to_owned());
    }
    if !arguments
        .last()
        .is_some_and(|last| is(last, BODY_EXTRACTORS))
    {
        return Some(format!(
            "its last argument is not one of axum's {}",
            list(BODY_EXTRACTORS)
        ));
    }
    let other = arguments.iter().find(|argument| {
        matches!(argument.role, Role::Fingerprinted)
            && !is(argument, BODY_EXTRACTORS)
            && !is(argument, URI_EXTRACTORS)
    })?;
    let ty = other.ty;
    Some(format!(
        "the fingerprinted argument `{}` is not one of axum's {}, {} (leave it out with `skip`)",
        quote!(#ty).to_string().replace(' ', ""),
        list(BODY_EXTRACTORS),
        list(URI_EXTRACTORS)
    ))
}

/// Whether the argument bound by `pat` is left out of the fingerprint:
/// named in `skip`, or bound to `_` (a guard such as `_: RequireAdmin`,
/// never read by the handler, so no response depends on it; it has no
/// name for `skip` either).
fn is_skipped(pat: &Pat, skip: &[Ident]) -> bool {
    matches!(pat, Pat::Wild(_)) || binding(pat).is_some_and(|name| skip.contains(&name))
}

/// A `#[cfg]` on an argument would leave the routed function, which the
/// attribute writes before `cfg` is evaluated, taking it regardless, and
/// rustc's error counts arguments the user never wrote.
fn check_no_cfg(attrs: &[Attribute], errors: &mut Errors) {
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
fn check_no_impl_trait(ty: &Type, errors: &mut Errors) {
    if mentions_impl(ty.to_token_stream()) {
        errors.spanned(
            ty,
            "axum cannot route a handler that takes `impl Trait`: write the argument's type, or make the handler generic (`<T: Trait>`, routed as `handler::<MyType>`)",
        );
    }
}

/// The return type of a `fn` that returns a future: `impl Future<...>`, a
/// boxed `dyn Future<...>` (`Pin<Box<...>>`), or a named future type such as
/// `BoxFuture<...>`. Types are known by name only, as extractors are.
fn future_returned(output: &ReturnType) -> Option<&Type> {
    let ReturnType::Type(_, ty) = output else {
        return None;
    };
    is_future(ty).then_some(&**ty)
}

fn is_future(ty: &Type) -> bool {
    let names_future = |path: &Path| {
        path.segments
            .last()
            .is_some_and(|segment| segment.ident.to_string().ends_with("Future"))
    };
    let bounds_future = |bounds: &syn::punctuated::Punctuated<syn::TypeParamBound, _>| {
        bounds.iter().any(|bound| match bound {
            syn::TypeParamBound::Trait(bound) => names_future(&bound.path),
            _ => false,
        })
    };
    match ty {
        Type::ImplTrait(impl_trait) => bounds_future(&impl_trait.bounds),
        Type::TraitObject(object) => bounds_future(&object.bounds),
        Type::Paren(inner) => is_future(&inner.elem),
        Type::Group(inner) => is_future(&inner.elem),
        Type::Path(path) => {
            if names_future(&path.path) {
                return true;
            }
            // `Pin<Box<dyn Future<...>>>` and `Box<dyn Future<...>>`.
            let Some(last) = path.path.segments.last() else {
                return false;
            };
            let PathArguments::AngleBracketed(arguments) = &last.arguments else {
                return false;
            };
            (last.ident == "Pin" || last.ident == "Box")
                && arguments.args.iter().any(
                    |argument| matches!(argument, GenericArgument::Type(inner) if is_future(inner)),
                )
        }
        _ => false,
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
/// The most arguments a function takes before `clippy::too_many_arguments`
/// fires, unless `clippy.toml` says otherwise.
const CLIPPY_MAX_ARGUMENTS: usize = 7;

/// axum's own error for a handler over its limit names the whole handler
/// type; this one says what the attribute added and what to do.
fn check_axum_arity(
    handler: &Handler<'_>,
    inputs: &syn::punctuated::Punctuated<FnArg, syn::token::Comma>,
    errors: &mut Errors,
) {
    let added = handler.added_arguments();
    let written = handler.arguments.len();
    if written + added > AXUM_MAX_ARGUMENTS {
        errors.spanned(
            inputs,
            format!(
                "axum handlers take at most {AXUM_MAX_ARGUMENTS} arguments, and `#[idempotent]` adds {added} to the {written} here: group some extractors into one tuple argument (`meta: (Method, Uri)`, with `skip(meta)` if it carries no payload)"
            ),
        );
    }
}

/// Extractors that consume the request's body, which axum accepts only as
/// a handler's last argument. `Request` is left out: an application's own
/// parts extractor may be called that.
const CONSUMES_BODY: &[&str] = &["Json", "Form", "Bytes", "String", "Multipart"];
/// Where axum's extractors come from, when the path is written out.
const EXTRACTOR_CRATES: &[&str] = &["axum", "axum_extra", "bytes", "std", "alloc"];

/// axum's own error for a body extractor before the last argument names
/// the whole handler type, with the attribute's hidden arguments in it;
/// this one names the argument.
fn check_body_extractor_is_last(arguments: &[Argument<'_>], errors: &mut Errors) {
    let Some((_, before_last)) = arguments.split_last() else {
        return;
    };
    for argument in before_last {
        let ty = match first_type_argument(argument.ty) {
            Some(inner) if is_named(argument.ty, &["Option", "Result"]) => inner,
            _ => argument.ty,
        };
        if let Some(name) = type_ident(ty).filter(|_| is_body_extractor(ty)) {
            errors.spanned(
                argument.ty,
                format!(
                    "`{name}` reads the request body, so it must be the handler's last argument"
                ),
            );
        }
    }
}

/// Whether `ty` is one of axum's [`CONSUMES_BODY`].
fn is_body_extractor(ty: &Type) -> bool {
    is_extractor(ty, CONSUMES_BODY)
}

/// Whether `ty` is one of axum's extractors `names`, by a bare name or a
/// path from one of [`EXTRACTOR_CRATES`]: `crate::Form` is an
/// application's own type.
fn is_extractor(ty: &Type, names: &[&str]) -> bool {
    let Some(path) = type_path(ty) else {
        return false;
    };
    let from_known_crate = path.segments.len() == 1
        || EXTRACTOR_CRATES
            .iter()
            .any(|krate| path.segments[0].ident == krate);
    from_known_crate && is_named(ty, names)
}

/// An `optional` endpoint runs requests that carry no key, which a
/// required `IdempotencyKey` argument would refuse with 400.
fn check_key_is_optional(
    inputs: &syn::punctuated::Punctuated<FnArg, syn::token::Comma>,
    errors: &mut Errors,
) {
    for input in inputs {
        if let FnArg::Typed(typed) = input
            && is_named(&typed.ty, &["IdempotencyKey"])
        {
            errors.spanned(
                &typed.ty,
                "an `optional` endpoint also runs requests without a key, which a required `IdempotencyKey` refuses with 400: take `Option<IdempotencyKey>`",
            );
        }
    }
}

/// The handler's body moves into a function nested in the routed one,
/// where `Self` does not reach (rustc's E0401 "can't use `Self` from outer
/// item" would name an item the user never wrote).
fn check_no_self_type(func: &ItemFn, errors: &mut Errors) {
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

/// Where `tokens` first name `Self`, outside the body of a nested `impl`,
/// `trait`, `struct` or `enum`, whose `Self` is their own.
fn first_self_type(tokens: &TokenStream) -> Option<Span> {
    use proc_macro2::{Delimiter, TokenTree};
    // The delimiters of the body of the item being declared, if any: a
    // tuple struct's fields are in parentheses.
    let mut own_body: Option<&[Delimiter]> = None;
    for token in tokens.clone() {
        match token {
            TokenTree::Ident(ident) if ident == "Self" => return Some(ident.span()),
            TokenTree::Ident(ident) if ident == "impl" || ident == "trait" => {
                own_body = Some(&[Delimiter::Brace]);
            }
            TokenTree::Ident(ident) if ident == "struct" || ident == "enum" => {
                own_body = Some(&[Delimiter::Brace, Delimiter::Parenthesis]);
            }
            TokenTree::Group(group) => {
                if own_body.is_some_and(|body| body.contains(&group.delimiter())) {
                    own_body = None;
                } else if let Some(span) = first_self_type(&group.stream()) {
                    return Some(span);
                }
            }
            TokenTree::Punct(punct) if punct.as_char() == ';' => own_body = None,
            _ => {}
        }
    }
    None
}

/// A second `#[idempotent]` below the first would wrap the handler as
/// written in a routed function of its own, and rustc's error would then
/// be about arguments the user never wrote.
fn check_applied_once(attrs: &[Attribute], errors: &mut Errors) {
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
fn check_openapi_path_above(func: &ItemFn, errors: &mut Errors) {
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
fn is_openapi_path(attr: &Attribute) -> bool {
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

fn check_skipped_names(arguments: &[Argument<'_>], skip: &[Ident], errors: &mut Errors) {
    let names: Vec<String> = arguments
        .iter()
        .filter_map(|argument| argument.name.as_ref().map(ToString::to_string))
        .collect();
    let listed: Vec<String> = names.iter().map(|name| format!("`{name}`")).collect();
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
            format!("the arguments are {}", listed.join(", "))
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
fn tokens_text(tokens: &TokenStream) -> String {
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

/// The name an argument is known by: `payment` in `payment: Json<T>` and in
/// `Json(payment): Json<T>`.
fn binding(pat: &Pat) -> Option<Ident> {
    match pat {
        Pat::Ident(ident) => Some(ident.ident.clone()),
        Pat::TupleStruct(tuple) if tuple.elems.len() == 1 => binding(&tuple.elems[0]),
        Pat::Reference(reference) => binding(&reference.pat),
        Pat::Paren(paren) => binding(&paren.pat),
        _ => None,
    }
}

/// Whether an argument of type `ty` is the custom scope's principal: the
/// type the scope names, spelled as the scope spells it, or an `Extension`
/// of it, as an auth middleware leaves it. A spelling that differs
/// (`User` for `auth::User`) is not taken: the attribute then extracts the
/// principal itself, so another type of the same name can never stand in
/// for the caller.
fn takes_principal(ty: &Type, principal: &Path) -> bool {
    let Some(path) = type_path(ty) else {
        return false;
    };
    let in_extension = || {
        last_ident(path).is_some_and(|ident| ident == "Extension")
            && last_ident(principal).is_some_and(|ident| ident != "Extension")
            && first_type_argument(ty)
                .and_then(type_path)
                .is_some_and(|inner| names_principal(inner, principal))
    };
    names_principal(path, principal) || in_extension()
}

/// Whether `ty` has the principal's name but another spelling (`User` for
/// `scope = auth::User`): almost surely the principal, which the attribute
/// then does not take as one but fingerprints. (An `Extension` of another
/// type of that name is not fingerprinted and may well be another type.)
fn misspells_principal(ty: &Type, principal: &Path) -> bool {
    type_path(ty).is_some_and(|path| {
        last_ident(path) == last_ident(principal) && !names_principal(path, principal)
    })
}

/// Whether `path` names the same type as the scope's `principal`: the
/// same segments, and the same generic arguments where the scope gives
/// any (`scope = Claims` takes a `Claims<Admin>` argument; a turbofish is
/// the same as angle brackets).
fn names_principal(path: &Path, principal: &Path) -> bool {
    let arguments = |arguments: &PathArguments| match arguments {
        PathArguments::AngleBracketed(generic) => Some(generic.args.to_token_stream().to_string()),
        _ => None,
    };
    path.leading_colon.is_some() == principal.leading_colon.is_some()
        && path.segments.len() == principal.segments.len()
        && path
            .segments
            .iter()
            .zip(&principal.segments)
            .all(|(ours, theirs)| {
                ours.ident == theirs.ident
                    && (theirs.arguments.is_none()
                        || arguments(&ours.arguments) == arguments(&theirs.arguments))
            })
}

fn last_ident(path: &Path) -> Option<&Ident> {
    path.segments.last().map(|segment| &segment.ident)
}

fn type_path(ty: &Type) -> Option<&Path> {
    match ty {
        Type::Path(path) if path.qself.is_none() => Some(&path.path),
        Type::Paren(paren) => type_path(&paren.elem),
        Type::Group(group) => type_path(&group.elem),
        _ => None,
    }
}

fn type_ident(ty: &Type) -> Option<&Ident> {
    type_path(ty).and_then(last_ident)
}

/// Whether `ty`'s name (the last segment of its path) is one of `names`.
fn is_named(ty: &Type, names: &[&str]) -> bool {
    type_ident(ty).is_some_and(|ident| names.iter().any(|name| ident == name))
}

fn is_fingerprinted_by_default(ty: &Type) -> bool {
    if is_named(ty, NOT_FINGERPRINTED) {
        return false;
    }
    // `Option<IdempotencyKey>` is the key too, and an optional or fallible
    // extractor of no payload (`Option<Extension<User>>`, where only
    // signed-in callers have one) carries none either.
    !is_named(ty, &["Option", "Result"])
        || first_type_argument(ty).is_none_or(is_fingerprinted_by_default)
}

/// `T` in `Wrapper<T, ..>`.
fn first_type_argument(ty: &Type) -> Option<&Type> {
    let segment = type_path(ty)?.segments.last()?;
    let PathArguments::AngleBracketed(generic) = &segment.arguments else {
        return None;
    };
    match generic.args.first()? {
        GenericArgument::Type(inner) => Some(inner),
        _ => None,
    }
}

// ===== expansion =====

/// `ident` as if written at `span`: a compiler error about the expression
/// it names is then reported at the user's token.
fn respan(ident: &Ident, span: Span) -> Ident {
    let mut ident = ident.clone();
    ident.set_span(span);
    ident
}

/// `tokens` with every token spanned at `span`.
fn respan_tokens(tokens: &TokenStream, span: Span) -> TokenStream {
    let respan = |mut token: proc_macro2::TokenTree| {
        token.set_span(span);
        token
    };
    tokens.clone().into_iter().map(respan).collect()
}

/// A generated binding. The `__idempotent_` prefix keeps it apart from user
/// names; it is resolved at the call site so that code spanned at the user's
/// tokens (the type checks) can refer to it.
fn local(name: &str) -> Ident {
    Ident::new(name, Span::call_site())
}

fn expand(func: &ItemFn, args: &Args, handler: &Handler<'_>) -> TokenStream {
    let krate = args
        .krate
        .clone()
        .unwrap_or_else(|| syn::parse_quote!(::idempotent_core));
    let private = quote!(#krate::__private);
    let params = params(handler);
    let (outer_attrs, inner_attrs) = split_attributes(&func.attrs);
    let (principal_param, principal) = principal(args, handler, &params, &private);
    // The routed function may take more arguments than the one written.
    // The handler as written keeps its signature, so clippy's argument
    // count (whose limit is configurable) applies there, where an
    // `#[expect]` meets it; the routed function's count is the attribute's.
    // The `allow` is written only past clippy's default limit: a crate
    // that forbids the lint (or its group) refuses any `allow` of it (a
    // crate whose `clippy.toml` lowers the limit allows it on the handler,
    // which puts the `allow` on both functions).
    let routed_arity = handler.arguments.len() + handler.added_arguments();
    let too_many =
        (routed_arity > CLIPPY_MAX_ARGUMENTS).then(|| quote!(#[allow(clippy::too_many_arguments)]));
    let exact_body = handler.exact_repeats;
    let place = place(func);
    let signature = outer_signature(
        func,
        handler,
        &params,
        principal_param.as_ref(),
        &request_type(args, &private),
        exact_body.then(|| {
            (
                scope_kind(args, &private),
                endpoint_id(args, &func.sig.ident, &place, &private),
            )
        }),
        &private,
    );
    let unpack = exact_body.then(|| unpack_exact_body(&params));
    let endpoint = endpoint_const(args, &func.sig.ident, &private);
    let fingerprint = fingerprint(handler, &func.sig.generics, &params, &private);
    let fingerprint = checked_name(args, fingerprint, &place, &private);
    let future = future(func, &params, &private);
    let run = run(&func.sig.ident, &private);
    let ItemFn { sig, block, .. } = func;
    // An `#[expect]` comes after the attribute's own `allow`, which would
    // otherwise override it on the routed function and the inner one
    // within it, leaving the expectation unfulfilled.
    let (expects, outer_attrs): (Vec<_>, Vec<_>) = outer_attrs
        .into_iter()
        .partition(|attr| attr.path().is_ident("expect"));
    quote! {
        #(#outer_attrs)*
        #too_many
        #(#expects)*
        #signature {
            #(#inner_attrs)*
            #sig #block

            #unpack
            #endpoint
            let __idempotent_fingerprint = #fingerprint;
            #principal
            let __idempotent_future = #future;
            #run
        }
    }
}

/// One binding per argument, resolved as the attribute's own but located at
/// the argument's type: an error about the value it holds (a type that is
/// not `Send`, captured by the handler's future) is then reported at the
/// argument rather than at the attribute.
fn params(handler: &Handler<'_>) -> Vec<Ident> {
    handler
        .arguments
        .iter()
        .enumerate()
        .map(|(index, argument)| {
            let span = Span::call_site().located_at(argument.ty.span());
            format_ident!("__idempotent_arg{}", index, span = span)
        })
        .collect()
}

/// The routed function's signature: the user's name, visibility and
/// generics; the request's idempotency context, then the principal of a
/// custom scope if the macro extracts it, then one plain argument per
/// user argument (patterns move to the inner function). It is a plain `fn`
/// returning the engine's future: the fingerprint and the scope are
/// computed when it is called, and the future holds the arguments once,
/// inside the handler's own future.
///
/// With `exact_body` (the scope kind and the endpoint's id), the context
/// comes with the last argument instead, which `ExactBody` wraps.
fn outer_signature(
    func: &ItemFn,
    handler: &Handler<'_>,
    params: &[Ident],
    principal_param: Option<&TokenStream>,
    request_type: &TokenStream,
    exact_body: Option<(TokenStream, TokenStream)>,
    private: &TokenStream,
) -> TokenStream {
    let vis = &func.vis;
    let name = &func.sig.ident;
    let generics = &func.sig.generics;
    let where_clause = instance_bounds(generics);
    let request = local("__idempotent_request");
    let mut types: Vec<TokenStream> = handler
        .arguments
        .iter()
        .map(|argument| argument.ty.to_token_stream())
        .collect();
    let request_param = match (exact_body, types.last_mut()) {
        (Some((scope, id)), Some(last)) => {
            *last = quote!(#private::ExactBody<#scope, #id, #last>);
            None
        }
        _ => Some(quote!(#request: #request_type,)),
    };
    quote! {
        #vis fn #name #generics (
            #request_param
            #principal_param
            #(#params: #types),*
        ) -> impl ::core::future::Future<Output = #private::axum::response::Response> #where_clause
    }
}

/// The handler's where clause, plus `Send + 'static` for each type
/// parameter: the engine runs the handler's future on a task of its own,
/// so it must be both, which rustc checks on the generic routed function,
/// not on each instance as axum does. An instance axum can route is
/// `'static` already (a function item is only when its type arguments
/// are), and a type its future holds is `Send`; saying so here spares each
/// generic handler bounds that axum alone would not ask for.
fn instance_bounds(generics: &syn::Generics) -> Option<syn::WhereClause> {
    let (first, last) = bounds_location(generics);
    let mut generics = generics.clone();
    let params: Vec<Ident> = generics
        .type_params()
        .map(|param| respan(&param.ident, first))
        .collect();
    let clause = generics.make_where_clause();
    let lifetime = syn::Lifetime::new("'static", last);
    for param in params {
        clause.predicates.push(syn::parse_quote_spanned! {first=>
            #param: ::core::marker::Send + #lifetime
        });
    }
    generics
        .where_clause
        .filter(|clause| !clause.predicates.is_empty())
}

/// Where the bounds [`instance_bounds`] adds are reported: over the
/// handler's generic parameter list, from its `<` to its `>`, so that
/// rustc's "required by this bound" under an instance that is not `Send`
/// points there rather than at the whole attribute. Resolved as the
/// attribute's, and not at the parameter itself: a bound located at its
/// name reads as written by the user to lints such as
/// `clippy::multiple_bound_locations`.
fn bounds_location(generics: &syn::Generics) -> (Span, Span) {
    let at = |span: Option<Span>| {
        span.map_or_else(Span::call_site, |span| Span::call_site().located_at(span))
    };
    (
        at(generics.lt_token.map(|token| token.span)),
        at(generics.gt_token.map(|token| token.span)),
    )
}

/// Splits the `ExactBody` last argument into the request's context and the
/// handler's own argument.
fn unpack_exact_body(params: &[Ident]) -> TokenStream {
    let request = local("__idempotent_request");
    let last = params.last();
    quote!(let (#request, #last) = #last.into_parts();)
}

/// The endpoint's name: the one given, or the function's path, so that
/// handlers of one name in two modules are two endpoints.
fn endpoint_name(args: &Args, name: &Ident) -> TokenStream {
    match &args.name {
        Some(given) => given.to_token_stream(),
        None => {
            let function = LitStr::new(&name.unraw().to_string(), name.span());
            quote!(::core::concat!(::core::module_path!(), "::", #function))
        }
    }
}

/// The const parameter `ExactBody` carries, so that an exact repeat is only
/// answered by its own endpoint: a hash of the endpoint's name and where
/// the attribute stands, computed at compile time. The place tells apart
/// handlers that share a name and a module (associated functions of two
/// types, functions local to two others); the table lives only as long as
/// the process, so its ids need not survive a change of the source.
fn endpoint_id(
    args: &Args,
    name: &Ident,
    place: &TokenStream,
    private: &TokenStream,
) -> TokenStream {
    let endpoint = endpoint_name(args, name);
    quote! {
        { #private::endpoint_id(#endpoint, #place) }
    }
}

/// Where the attribute stands, `file:line:column`, and a hash of the
/// handler as written (`#` and 8 hex digits), as a string literal. Inside a
/// `macro_rules!` expansion, `line!()` and `column!()` are those of the
/// invocation, so every handler one invocation writes would stand at one
/// place; what the invocation wrote into each still tells them apart.
fn place(func: &ItemFn) -> TokenStream {
    let mut hasher = DefaultHasher::new();
    func.to_token_stream().to_string().hash(&mut hasher);
    let written = format!(" #{:08x}", hasher.finish() >> 32);
    quote!(::core::concat!(
        ::core::file!(),
        ":",
        ::core::line!(),
        ":",
        ::core::column!(),
        #written
    ))
}

/// The extractor of the request's idempotency context. Where the scope
/// kind alone says which headers it reads, the scope is resolved while
/// extracting, so the request's headers are not copied; for an endpoint
/// scoped by a named header they are, and its scope is resolved when the
/// request runs.
fn request_type(args: &Args, private: &TokenStream) -> TokenStream {
    let kind = scope_kind(args, private);
    quote!(#private::ScopedRequest<#kind>)
}

/// The scope kind `ScopedRequest` and `ExactBody` take.
fn scope_kind(args: &Args, private: &TokenStream) -> TokenStream {
    let kind = match &args.scope {
        Some(Scope::Global) => quote!(GLOBAL),
        Some(Scope::Custom(_)) => quote!(CUSTOM),
        Some(Scope::Header(_)) => quote!(HEADERS),
        _ => quote!(API_KEY),
    };
    // A keyless request to an endpoint that requires a key is refused
    // before the body is read.
    if args.optional {
        quote!({ #private::#kind })
    } else {
        quote!({ #private::#kind | #private::KEY_REQUIRED })
    }
}

/// The call into the engine, spanned at the handler's name so that a future
/// that is not `Send` is reported there.
fn run(name: &Ident, private: &TokenStream) -> TokenStream {
    let request = local("__idempotent_request");
    let run = respan_tokens(&quote!(#private::run), name.span());
    // Bindings resolved where they are defined, not at the name: a name
    // that a `macro_rules!` passed in does not see the attribute's locals.
    let fingerprint = local("__idempotent_fingerprint");
    let future = local("__idempotent_future");
    quote_spanned! {name.span()=>
        #run(#request, &__IDEMPOTENT_ENDPOINT, #fingerprint, #future)
    }
}

/// Doc comments, `cfg` and lint levels describe the handler as routed, so
/// they go on the outer function; everything else (`#[tracing::instrument]`,
/// ...) applies to the user's code, so it stays on the inner one.
/// Lint levels go on both, but `#[expect]` only on the outer one: the inner
/// function is nested in it, so the expectation covers a lint that fires in
/// either (`dead_code` and `missing_docs` fire at the outer one, lints of the
/// body at the inner one), and on both it would be unfulfilled on one.
fn split_attributes(attrs: &[Attribute]) -> (Vec<&Attribute>, Vec<&Attribute>) {
    let is = |attr: &Attribute, names: &[&str]| names.iter().any(|name| attr.path().is_ident(name));
    let outer = attrs
        .iter()
        .filter(|attr| {
            is(
                attr,
                &[
                    "doc",
                    "cfg",
                    "deprecated",
                    "allow",
                    "warn",
                    "deny",
                    "forbid",
                    "expect",
                ],
            )
        })
        .collect();
    let inner = attrs
        .iter()
        .filter(|attr| !is(attr, &["doc", "cfg", "deprecated", "expect"]))
        .collect();
    (outer, inner)
}

fn endpoint_const(args: &Args, name: &Ident, private: &TokenStream) -> TokenStream {
    let endpoint_name = endpoint_name(args, name);
    let ttl = args.ttl.map(|ms| quote!(.ttl(#private::millis(#ms))));
    let lease = args.lease.map(|ms| quote!(.lease(#private::millis(#ms))));
    let wait = args.wait.map(|ms| quote!(.wait(#private::millis(#ms))));
    let optional = args.optional.then(|| quote!(.optional(true)));
    let scope = args.scope.as_ref().map(|scope| {
        let scope = match scope {
            Scope::ApiKey => quote!(ApiKey),
            Scope::Global => quote!(Global),
            Scope::Header(header) => quote!(Header(#header)),
            Scope::Custom(_) => quote!(Custom),
        };
        quote!(.scope(#private::Scope::#scope))
    });
    let (statuses, final_statuses) = match &args.final_statuses {
        Some(ranges) => {
            let ranges = ranges
                .iter()
                .map(|(first, last)| quote!(#private::StatusRange::new(#first, #last)));
            (
                Some(quote! {
                    const __IDEMPOTENT_FINAL_STATUSES: &[#private::StatusRange] = &[#(#ranges),*];
                }),
                Some(
                    quote!(.final_statuses(#private::FinalStatuses::Only(__IDEMPOTENT_FINAL_STATUSES))),
                ),
            )
        }
        None => (None, None),
    };
    quote! {
        #statuses
        const __IDEMPOTENT_ENDPOINT: #private::Endpoint = #private::Endpoint::new(#endpoint_name)
            #ttl #lease #scope #optional #wait #final_statuses;
    }
}

/// `fingerprint`, after checking that no handler at another place shares
/// the endpoint's default name (an explicit `name` may be shared on
/// purpose).
fn checked_name(
    args: &Args,
    fingerprint: TokenStream,
    place: &TokenStream,
    private: &TokenStream,
) -> TokenStream {
    if args.name.is_some() {
        return fingerprint;
    }
    let error = local("__idempotent_error");
    // Called by path, not as methods: a method of the same name taking
    // `self`, from a trait of the user's in scope that every type
    // implements, would be chosen over these, which take `&self`.
    quote! {{
        static __IDEMPOTENT_DEFAULT_NAME: #private::DefaultName =
            #private::DefaultName::new(#place);
        match #private::DefaultName::check(
            &__IDEMPOTENT_DEFAULT_NAME,
            #private::Endpoint::name(&__IDEMPOTENT_ENDPOINT),
        ) {
            ::core::result::Result::Ok(()) => #fingerprint,
            ::core::result::Result::Err(#error) => ::core::result::Result::Err(#error),
        }
    }}
}

/// `Result<Fingerprint, FingerprintError>` over the generic handler's
/// instance and the fingerprinted arguments, each argument's call spanned
/// at its type so a type that cannot be fingerprinted is reported there.
fn fingerprint(
    handler: &Handler<'_>,
    generics: &syn::Generics,
    params: &[Ident],
    private: &TokenStream,
) -> TokenStream {
    let fingerprinter = local("__idempotent_fingerprinter");
    let instance = instance_inputs(generics, &fingerprinter, private);
    let inputs = handler
        .arguments
        .iter()
        .zip(params)
        .filter(|(argument, _)| matches!(argument.role, Role::Fingerprinted))
        .map(|(argument, param)| {
            // The type is named in the call, so a type that cannot be
            // fingerprinted is reported at it; the argument itself keeps
            // the attribute's hygiene, which a `macro_rules!` that passes
            // the type in does not share.
            let payload = payload_type(argument.ty);
            let ty = located_at(argument.ty, payload);
            let span = payload.span();
            let call = respan_tokens(&quote!(#private::fingerprint_input), span);
            let call = quote_spanned! {span=>
                #call::<#ty>(#fingerprinter, &#param)
            };
            let check = serialized_payload_check(argument.ty, payload, private);
            // The `?` is the attribute's: a lint on it (such as
            // `clippy::question_mark_used`) is not the argument's.
            quote!(#check #call?;)
        });
    quote! {
        #private::fingerprint(&__IDEMPOTENT_ENDPOINT, |#fingerprinter| {
            #(#instance)*
            #(#inputs)*
            ::core::result::Result::Ok(())
        })
    }
}

/// Extractors fingerprinted by the value they wrap, which must be
/// `Serialize` (as `idempotent_core` implements `FingerprintInput`).
const SERIALIZED_PAYLOAD: &[&str] = &["Json", "Form", "Query", "Path"];

/// The type a fingerprint check on `ty` is reported at: the payload `T`
/// of `Json<T>`, `Form<T>`, `Query<T>` or `Path<T>` (within an `Option` or
/// a `Result` too), the type whose `Serialize` impl is missing when the
/// check fails; else `ty` itself.
fn payload_type(ty: &Type) -> &Type {
    let inner = match first_type_argument(ty) {
        Some(inner) if is_named(ty, &["Option", "Result"]) => inner,
        _ => ty,
    };
    match first_type_argument(inner) {
        Some(payload) if is_named(inner, SERIALIZED_PAYLOAD) => payload,
        _ => ty,
    }
}

/// For an extractor fingerprinted by its payload (`payload` is not `ty`
/// itself), a check that the payload is `Serialize`, spanned at it: its
/// message says why the bound is there, where serde's would not, and
/// rustc then reports the same missing bound at the same place once.
fn serialized_payload_check(
    ty: &Type,
    payload: &Type,
    private: &TokenStream,
) -> Option<TokenStream> {
    if std::ptr::eq(ty, payload) {
        return None;
    }
    let span = payload.span();
    let check = respan_tokens(&quote!(#private::serialized_payload), span);
    Some(quote_spanned! {span=> #check::<#payload>();})
}

/// `ty` as written, its tokens before and after `inner` (a type within
/// it) located at `inner`'s first and last token: rustc reports an unmet
/// bound on a type argument at the whole argument, which then covers
/// `inner` alone. Resolution is unchanged.
fn located_at(ty: &Type, inner: &Type) -> TokenStream {
    use proc_macro2::TokenTree;
    let tokens: Vec<TokenTree> = ty.to_token_stream().into_iter().collect();
    let within: Vec<TokenTree> = inner.to_token_stream().into_iter().collect();
    let text =
        |tokens: &[TokenTree]| -> Vec<String> { tokens.iter().map(ToString::to_string).collect() };
    let (Some(first), Some(last)) = (within.first(), within.last()) else {
        return ty.to_token_stream();
    };
    let (all, wanted) = (text(&tokens), text(&within));
    let Some(start) = all
        .windows(wanted.len())
        .position(|window| window == wanted)
    else {
        return ty.to_token_stream();
    };
    let end = start + within.len();
    let (first, last) = (first.span(), last.span());
    tokens
        .into_iter()
        .enumerate()
        .map(|(index, mut token)| {
            let at = if index < start {
                first
            } else if index >= end {
                last
            } else {
                return token;
            };
            token.set_span(token.span().located_at(at));
            token
        })
        .collect()
}

/// The type and const arguments of a generic handler's instance: each
/// instance routed on its own path shares the endpoint's name and place,
/// and would otherwise replay another instance's response to the same key.
fn instance_inputs<'a>(
    generics: &'a syn::Generics,
    fingerprinter: &'a Ident,
    private: &'a TokenStream,
) -> impl Iterator<Item = TokenStream> + 'a {
    instance_arguments(generics).map(move |(argument, is_const)| {
        if is_const {
            quote!(#private::fingerprint_const(#fingerprinter, &#argument)?;)
        } else {
            quote!(#private::fingerprint_type::<#argument>(#fingerprinter)?;)
        }
    })
}

/// The handler's type and const parameters, in order, each with whether
/// it is a const: what names one instance of a generic handler (lifetimes
/// are erased).
fn instance_arguments(generics: &syn::Generics) -> impl Iterator<Item = (&Ident, bool)> {
    generics.params.iter().filter_map(|param| match param {
        GenericParam::Type(ty) => Some((&ty.ident, false)),
        GenericParam::Const(constant) => Some((&constant.ident, true)),
        GenericParam::Lifetime(_) => None,
    })
}

/// For a custom scope: the extra extractor argument (unless the handler
/// already takes the principal) and the statement that scopes the request.
fn principal(
    args: &Args,
    handler: &Handler<'_>,
    params: &[Ident],
    private: &TokenStream,
) -> (Option<TokenStream>, Option<TokenStream>) {
    let Some(Scope::Custom(path)) = &args.scope else {
        return (None, None);
    };
    let request = local("__idempotent_request");
    let (extra, value) = match handler.principal() {
        Some(index) => (None, params[index].clone()),
        None => {
            let value = local("__idempotent_scope");
            (Some(quote!(#value: #path,)), value)
        }
    };
    let value = respan(&value, path.span());
    let call = respan_tokens(&quote!(#private::scoped_by), path.span());
    let scoped = quote_spanned! {path.span()=>
        let #request = #call(#request, &#value);
    };
    (extra, Some(scoped))
}

/// The inner handler's future, turned into a `Response` by a call spanned at
/// the return type, so a return type that is not `IntoResponse` is
/// reported there.
fn future(func: &ItemFn, params: &[Ident], private: &TokenStream) -> TokenStream {
    let sig = &func.sig;
    let name = &sig.ident;
    let generic_args: Vec<&Ident> = instance_arguments(&sig.generics)
        .map(|(argument, _)| argument)
        .collect();
    let turbofish = (!generic_args.is_empty()).then(|| quote!(::<#(#generic_args),*>));
    let output_span = match &sig.output {
        ReturnType::Type(_, ty) => ty.span(),
        ReturnType::Default => name.span(),
    };
    let call = respan_tokens(&quote!(#private::into_response), output_span);
    let inner = respan(name, output_span);
    let handler = respan(&local("__idempotent_handler"), output_span);
    let into_response = quote_spanned! {output_span=>
        #call(#handler(#(#params),*).await)
    };
    // Spanned at the name, as the `run` call: a future that is not `Send`
    // is reported there. The handler is called through a value, as axum
    // would: clippy's `unused_async` leaves alone an `async fn` used as a
    // value (the attribute requires `async fn`, so "remove `async`" is not
    // advice the handler can take), and no `allow` is needed, which a
    // crate that forbids the lint would refuse.
    quote_spanned! {name.span()=> async move {
        let #handler = #inner #turbofish;
        #into_response
    }}
}
