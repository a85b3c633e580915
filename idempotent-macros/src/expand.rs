//! Rewrites the handler: the user's function is kept verbatim as an inner
//! `async fn`, and an outer function with the same name, attributes and
//! visibility extracts the request's idempotency context and hands the inner
//! future to `__private::run`. Nothing here decides anything at run time.

use std::hash::{DefaultHasher, Hash, Hasher};

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Attribute, GenericParam, Ident, ItemFn, LitStr, ReturnType, Type};

use crate::args::{Args, Scope};
use crate::handler::{Extractor, Handler, Role};
use crate::types::{
    first_type_argument, is_named, is_two_argument_result, optional_inner, serialized_extractors,
};

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

/// The routed function with the handler as written nested in it; only for
/// a handler in which analysis found no error.
pub(crate) fn expand(func: &ItemFn, args: &Args, handler: &Handler<'_>) -> TokenStream {
    let private = args.private();
    let params = params(handler);
    let (outer_attrs, inner_attrs) = split_attributes(&func.attrs);
    let (principal_param, principal) = principal(args, handler, &params, &private);
    // The routed function takes no more arguments than clippy's default
    // limit, or than the handler (see `Handler::groups_arguments`), so it
    // writes no `allow` of `clippy::too_many_arguments`: a crate that
    // forbids the lint (or its group) refuses any, even where its
    // `clippy.toml` raises the limit past the handler's count.
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
    let unpack = if exact_body {
        Some(unpack_exact_body(&params))
    } else {
        whole_body(handler).then(|| unpack_whole_body(&params))
    };
    let endpoint = endpoint_const(args, &func.sig.ident, &private);
    let fingerprint = fingerprint(handler, &func.sig.generics, &params, &private);
    let fingerprint = checked_name(args, fingerprint, &place, &private);
    let future = future(func, &params, &private);
    let run = run(&func.sig.ident, whole_body(handler), &private);
    let ItemFn { sig, block, .. } = func;
    // An `#[expect]` comes after the attribute's own `allow`, which would
    // otherwise override it on the routed function and the inner one
    // within it, leaving the expectation unfulfilled.
    let (expects, outer_attrs): (Vec<_>, Vec<_>) = outer_attrs
        .into_iter()
        .partition(|attr| attr.path().is_ident("expect"));
    let body = quote! {
        #(#inner_attrs)*
        #sig #block

        #unpack
        #endpoint
        let __idempotent_fingerprint = #fingerprint;
        #principal
        let __idempotent_future = #future;
        #run
    };
    let body = user_braces(body, block);
    quote! {
        #(#outer_attrs)*
        #(#expects)*
        #signature #body
    }
}

/// `body` in braces located at the handler's own. With the user's `fn`
/// token, they make the routed function's span the handler's, from its
/// first token to its last: rustc reports no `dead_code` for an item whose
/// span comes from another crate's macro, so a handler that no router
/// names would otherwise go unreported, and an `#[expect(dead_code)]` on
/// it would be unfulfilled.
fn user_braces(body: TokenStream, block: &syn::Block) -> TokenStream {
    let mut braces = proc_macro2::Group::new(proc_macro2::Delimiter::Brace, body);
    braces.set_span(block.brace_token.span.join());
    braces.into_token_stream()
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
/// user argument (patterns move to the inner function); the attribute's
/// arguments in one tuple with the first user arguments where the handler
/// groups them. It is a plain `fn`
/// returning the engine's future: the fingerprint and the scope are
/// computed when it is called, and the future holds the arguments once,
/// inside the handler's own future.
///
/// With `exact_body` (the scope kind and the endpoint's id), the context
/// comes with the last argument instead, which `ExactBody` wraps; without
/// it, the last argument, whatever it is, is wrapped in `WholeBody`.
fn outer_signature(
    func: &ItemFn,
    handler: &Handler<'_>,
    params: &[Ident],
    principal_param: Option<&(Ident, TokenStream)>,
    request_type: &TokenStream,
    exact_body: Option<(TokenStream, TokenStream)>,
    private: &TokenStream,
) -> TokenStream {
    let vis = &func.vis;
    // The user's own `fn`, for the routed function's span: see `user_braces`.
    let fn_token = &func.sig.fn_token;
    let name = &func.sig.ident;
    let generics = &func.sig.generics;
    let where_clause = instance_bounds(generics);
    let request = local("__idempotent_request");
    let mut types: Vec<TokenStream> = handler
        .arguments
        .iter()
        .map(|argument| argument.ty.to_token_stream())
        .collect();
    let whole_body = whole_body(handler);
    let request_param = match (exact_body, types.last_mut()) {
        (Some((scope, id)), Some(last)) => {
            *last = quote!(#private::ExactBody<#scope, #id, #last>);
            None
        }
        (None, Some(last)) if whole_body => {
            // Located at the argument's type, so that a message about the
            // argument points there rather than at the attribute.
            let at = Span::call_site().located_at(last.span());
            let open = respan_tokens(&quote!(#private::WholeBody<), at);
            let close = respan_tokens(&quote!(>), at);
            *last = quote!(#open #last #close);
            Some(request_type.clone())
        }
        _ => Some(request_type.clone()),
    };
    // Each argument as a binding and its type: the attribute's own, then
    // the handler's.
    let added = request_param
        .map(|ty| (request.to_token_stream(), ty))
        .into_iter()
        .chain(principal_param.map(|(binding, ty)| (binding.to_token_stream(), ty.clone())));
    let mut arguments: Vec<(TokenStream, TokenStream)> = params
        .iter()
        .map(ToTokens::to_token_stream)
        .zip(types)
        .collect();
    let arguments: Vec<(TokenStream, TokenStream)> = if handler.groups_arguments() {
        let first = arguments.drain(..handler.grouped_arguments());
        let (bindings, types): (Vec<_>, Vec<_>) = added.chain(first).unzip();
        let grouped = (quote!((#(#bindings),*)), quote!((#(#types),*)));
        std::iter::once(grouped).chain(arguments).collect()
    } else {
        added.chain(arguments).collect()
    };
    let arguments = arguments.iter().map(|(binding, ty)| quote!(#binding: #ty));
    quote! {
        #vis #fn_token #name #generics (
            #(#arguments),*
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

/// Whether the last argument, without `ExactBody`, is wrapped in
/// `WholeBody`, which refuses a body that ended short of its
/// `Content-Length` and watches one the handler reads itself. Every last
/// argument is, whatever its type says: the attribute cannot tell from it
/// whether an extractor (an application's own, or one of another crate)
/// reads the body, and `WholeBody` extracts a parts extractor as it is.
fn whole_body(handler: &Handler<'_>) -> bool {
    !handler.exact_repeats && !handler.arguments.is_empty()
}

/// Unwraps the `WholeBody` last argument into the handler's own and the
/// watch on the body, which `run` takes.
fn unpack_whole_body(params: &[Ident]) -> TokenStream {
    let body = local("__idempotent_body");
    let last = params.last();
    quote!(let (#body, #last) = #last.into_parts();)
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
/// that is not `Send` is reported there. `whole_body`: the last argument
/// came in `WholeBody`, whose watch on the body goes with it.
fn run(name: &Ident, whole_body: bool, private: &TokenStream) -> TokenStream {
    let request = local("__idempotent_request");
    let run = respan_tokens(&quote!(#private::run), name.span());
    // Bindings resolved where they are defined, not at the name: a name
    // that a `macro_rules!` passed in does not see the attribute's locals.
    let fingerprint = local("__idempotent_fingerprint");
    let future = local("__idempotent_future");
    let body = if whole_body {
        local("__idempotent_body").to_token_stream()
    } else {
        quote!(#private::BodyWatch::UNWATCHED)
    };
    quote_spanned! {name.span()=>
        #run(#request, &__IDEMPOTENT_ENDPOINT, #fingerprint, #body, #future)
    }
}

/// Doc comments, `cfg` and lint levels describe the handler as routed, so
/// they go on the outer function; everything else (`#[tracing::instrument]`,
/// ...) applies to the user's code, so it stays on the inner one.
/// Lint levels go on both, but `#[expect]` only on the outer one: the inner
/// function is nested in it, so the expectation covers a lint that fires in
/// either (`dead_code` and `missing_docs` fire at the outer one, lints of the
/// body at the inner one), and on both it would be unfulfilled on one.
pub(crate) fn split_attributes(attrs: &[Attribute]) -> (Vec<&Attribute>, Vec<&Attribute>) {
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
        // `"default"` alone is the policy an endpoint has anyway.
        Some(list) if list.with_default && list.ranges.is_empty() => (None, None),
        Some(list) => {
            let ranges = list
                .ranges
                .iter()
                .map(|(first, last)| quote!(#private::StatusRange::new(#first, #last)));
            let policy = if list.with_default {
                quote!(DefaultAnd)
            } else {
                quote!(Only)
            };
            (
                Some(quote! {
                    const __IDEMPOTENT_FINAL_STATUSES: &[#private::StatusRange] = &[#(#ranges),*];
                }),
                Some(
                    quote!(.final_statuses(#private::FinalStatuses::#policy(__IDEMPOTENT_FINAL_STATUSES))),
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
/// instance and the fingerprinted extractors, each extractor's call
/// spanned at its type so a type that cannot be fingerprinted is reported
/// there.
fn fingerprint(
    handler: &Handler<'_>,
    generics: &syn::Generics,
    params: &[Ident],
    private: &TokenStream,
) -> TokenStream {
    let fingerprinter = local("__idempotent_fingerprinter");
    let instance = instance_inputs(generics, &fingerprinter, private);
    let extractors: Vec<(&Extractor<'_>, TokenStream)> = handler
        .arguments
        .iter()
        .zip(params)
        .filter(|(argument, _)| !matches!(argument.role, Role::Principal))
        .flat_map(|(argument, param)| {
            argument.extractors.iter().map(move |extractor| {
                let index = extractor.index.iter().map(|&index| syn::Index::from(index));
                (extractor, quote!(#param #(.#index)*))
            })
        })
        .collect();
    let inputs = extractors
        .iter()
        .filter(|(extractor, _)| extractor.fingerprinted)
        .map(|(extractor, value)| {
            // The type is named in the call, so a type that cannot be
            // fingerprinted is reported at it; the argument itself keeps
            // the attribute's hygiene, which a `macro_rules!` that passes
            // the type in does not share.
            let payload = payload_type(extractor.ty);
            let ty = located_at(extractor.ty, payload);
            let span = payload.span();
            let call = respan_tokens(&quote!(#private::fingerprint_input), span);
            let call = quote_spanned! {span=>
                #call::<#ty>(#fingerprinter, &#value)
            };
            let check = serialized_payload_check(extractor.ty, payload, private);
            // The `?` is the attribute's: a lint on it (such as
            // `clippy::question_mark_used`) is not the argument's.
            quote!(#check #call?;)
        });
    // A rejection the fingerprint leaves out is noted all the same: the
    // handler's answer to it is no more an outcome than a fingerprinted
    // one's.
    let rejections = extractors
        .iter()
        .filter(|(extractor, _)| !extractor.fingerprinted && is_two_argument_result(extractor.ty))
        .map(|(_, value)| quote!(#private::note_rejection(#fingerprinter, &#value);));
    quote! {
        #private::fingerprint(&__IDEMPOTENT_ENDPOINT, |#fingerprinter| {
            #(#instance)*
            #(#inputs)*
            #(#rejections)*
            ::core::result::Result::Ok(())
        })
    }
}

/// The type a fingerprint check on `ty` is reported at: the payload `T`
/// of `Json<T>`, `Form<T>`, `Query<T>` or `Path<T>` (within an `Option` or
/// a `Result` too), the type whose `Serialize` impl is missing when the
/// check fails; else `ty` itself. Extractors fingerprinted by the value
/// they wrap need it `Serialize`, as `idempotent_core` implements
/// `FingerprintInput` for them.
fn payload_type(ty: &Type) -> &Type {
    let inner = optional_inner(ty).unwrap_or(ty);
    match first_type_argument(inner) {
        Some(payload) if is_named(inner, &serialized_extractors()) => payload,
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

/// For a custom scope: the extra extractor argument, its binding and type
/// (unless the handler already takes the principal), and the statement
/// that scopes the request.
fn principal(
    args: &Args,
    handler: &Handler<'_>,
    params: &[Ident],
    private: &TokenStream,
) -> (Option<(Ident, TokenStream)>, Option<TokenStream>) {
    let Some(path) = args.principal() else {
        return (None, None);
    };
    let request = local("__idempotent_request");
    let (extra, value) = match handler.principal() {
        Some(index) => (None, params[index].clone()),
        None => {
            let value = local("__idempotent_scope");
            (Some((value.clone(), path.to_token_stream())), value)
        }
    };
    // The call is spanned at the scope's path, so that a principal that is
    // not an `IdempotencyScope` is reported there. Its argument is bound
    // anew at the path too: the attribute's own binding, resolved where it
    // is defined, is not visible to a token of a path that a
    // `macro_rules!` passed in.
    let span = path.span();
    let principal = Ident::new("__idempotent_principal", span);
    let call = respan_tokens(&quote!(#private::scoped_by), span);
    let scoped = quote_spanned! {span=>
        let #principal = &#value;
        let #request = #call(#request, #principal);
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
    // The handler's future is awaited here, where without the attribute
    // axum awaits it: the await is the attribute's code, located at the
    // return type, so that lints about awaiting a future
    // (`clippy::large_futures`, whose `Box::pin` advice the handler cannot
    // take) leave it be, as they leave axum's. Its output is bound to a
    // name resolved as the user's tokens are, so that a return type that
    // is not `IntoResponse` is still reported at the return type.
    let at_output = Span::call_site().located_at(output_span);
    let handler = Ident::new("__idempotent_handler", at_output);
    let output = respan(&local("__idempotent_output"), output_span);
    let awaited = quote_spanned! {at_output=>
        let #output = #handler(#(#params),*).await;
    };
    let into_response = quote_spanned! {output_span=> #awaited #call(#output)};
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
