//! The handler as the attribute sees it: each argument with its role
//! (fingerprinted, not fingerprinted, or the custom scope's principal),
//! and whether exact repeats apply. Analysis runs every check of
//! [`crate::checks`] and collects their errors, so that all are reported
//! at once; expansion then reads only what analysis decided.

use quote::{ToTokens, quote};
use syn::{FnArg, Ident, ItemFn, Pat, Type};

use crate::args::{Args, Errors, Scope};
use crate::checks::{
    check_applied_once, check_axum_arity, check_body_extractor_is_last, check_key_is_optional,
    check_no_cfg, check_no_impl_trait, check_no_self_type, check_openapi_path_above,
    check_skipped_names,
};
use crate::exact_repeats::exact_repeats_blocker;
use crate::principal::{misspells_principal, takes_principal};
use crate::types::{first_type_argument, future_returned, is_named};

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

/// What the routed function does with an argument's value.
pub(crate) enum Role {
    Fingerprinted,
    NotFingerprinted,
    /// The custom scope's principal, taken from the handler's own argument.
    Principal,
}

/// One argument of the handler as written, by its pattern and type.
pub(crate) struct Argument<'a> {
    pub(crate) pat: &'a Pat,
    pub(crate) ty: &'a Type,
    pub(crate) name: Option<Ident>,
    pub(crate) role: Role,
}

/// What analysis found in a handler, for expansion to write out.
pub(crate) struct Handler<'a> {
    pub(crate) arguments: Vec<Argument<'a>>,
    /// Whether the body is extracted through `ExactBody`.
    pub(crate) exact_repeats: bool,
    /// Whether `scope` names a principal type.
    custom_scope: bool,
}

impl<'a> Handler<'a> {
    /// Reads the handler against its options, pushing every problem to
    /// `errors`: expansion runs only when there is none.
    pub(crate) fn analyze(func: &'a ItemFn, args: &Args, errors: &mut Errors) -> Self {
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
    pub(crate) fn added_arguments(&self) -> usize {
        usize::from(!self.exact_repeats)
            + usize::from(self.custom_scope && self.principal().is_none())
    }

    pub(crate) fn principal(&self) -> Option<usize> {
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

/// Whether the argument bound by `pat` is left out of the fingerprint:
/// named in `skip`, or bound to `_` (a guard such as `_: RequireAdmin`,
/// never read by the handler, so no response depends on it; it has no
/// name for `skip` either).
fn is_skipped(pat: &Pat, skip: &[Ident]) -> bool {
    matches!(pat, Pat::Wild(_)) || binding(pat).is_some_and(|name| skip.contains(&name))
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
