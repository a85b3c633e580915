//! The handler as the attribute sees it: each argument with its role
//! (fingerprinted, not fingerprinted, or the custom scope's principal),
//! and whether exact repeats apply. Analysis runs every check of
//! [`crate::checks`] and collects their errors, so that all are reported
//! at once; expansion then reads only what analysis decided.

use syn::punctuated::Punctuated;
use syn::token::Comma;
use syn::{FnArg, Ident, ItemFn, Pat, Type};

use crate::args::{Args, Errors};
use crate::checks::{
    check_applied_once, check_async, check_axum_arity, check_body_extractor_is_last,
    check_key_is_optional, check_no_abi, check_no_cfg, check_no_impl_trait, check_no_self_type,
    check_not_a_method, check_not_unsafe, check_openapi_path_above, check_principal_spelling,
    check_skipped_names,
};
use crate::exact_repeats::exact_repeats;
use crate::principal::takes_principal;
use crate::types::{is_named, optional_inner};

/// The most arguments a function takes before `clippy::too_many_arguments`
/// fires, unless `clippy.toml` says otherwise.
pub(crate) const CLIPPY_MAX_ARGUMENTS: usize = 7;

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
    /// The extractors it holds: itself, or each element of a tuple.
    pub(crate) extractors: Vec<Extractor<'a>>,
}

/// One extractor within an argument: the argument itself, or an element
/// of a tuple argument (`(Method, Uri)`, as a handler past axum's limit
/// of arguments groups them), which axum extracts element by element and
/// the fingerprint reads the same way: each element is fingerprinted or
/// not as it would be as an argument of its own, and in that order, so
/// grouping arguments into a tuple keeps the fingerprints already stored.
pub(crate) struct Extractor<'a> {
    /// Where it is within the argument: the tuple indices that lead to it,
    /// none for the argument itself.
    pub(crate) index: Vec<usize>,
    pub(crate) ty: &'a Type,
    pub(crate) fingerprinted: bool,
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
        check_async(sig, errors);
        check_not_unsafe(sig, errors);
        check_no_abi(sig, errors);
        let arguments = arguments(&sig.inputs, args, errors);
        check_body_extractor_is_last(&arguments, errors);
        check_skipped_names(&arguments, &args.skip, errors);
        check_no_self_type(func, errors);
        check_applied_once(&func.attrs, errors);
        check_openapi_path_above(func, errors);
        if args.optional {
            check_key_is_optional(&arguments, errors);
        }
        let exact_repeats = exact_repeats(&arguments, &sig.generics, args, errors);
        let handler = Self {
            arguments,
            exact_repeats,
            custom_scope: args.principal().is_some(),
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

    /// Whether the routed function extracts its first arguments in one
    /// tuple: the arguments the attribute adds, then the handler's first
    /// [`Self::grouped_arguments`], so that the routed function takes no
    /// more than clippy's default limit of arguments where it would
    /// otherwise take more (nor more than axum's). A crate may forbid
    /// `clippy::too_many_arguments`, and raise its limit in `clippy.toml`
    /// for handlers that take many extractors: it refuses any `allow` of
    /// the lint, and the routed function must not trip it where the
    /// handler does not. axum extracts a tuple element by element, in
    /// order, as it would the arguments; the tuple never holds the
    /// handler's last argument, the only one that may read the body, as
    /// no element of a tuple but the last may.
    pub(crate) fn groups_arguments(&self) -> bool {
        let written = self.arguments.len();
        written >= 2 && written + self.added_arguments() > CLIPPY_MAX_ARGUMENTS
    }

    /// How many of the handler's first arguments go in the routed
    /// function's tuple: as many as leave it clippy's default limit of
    /// arguments, the tuple one of them.
    pub(crate) fn grouped_arguments(&self) -> usize {
        if self.groups_arguments() {
            self.arguments.len() + 1 - CLIPPY_MAX_ARGUMENTS
        } else {
            0
        }
    }

    /// How many arguments the handler takes as axum counts them, the
    /// attribute's own included unless they go in the routed function's
    /// tuple: over axum's limit, the handler must group some itself.
    pub(crate) fn routed_arguments(&self) -> usize {
        if self.groups_arguments() {
            self.arguments.len()
        } else {
            self.arguments.len() + self.added_arguments()
        }
    }

    pub(crate) fn principal(&self) -> Option<usize> {
        self.arguments
            .iter()
            .position(|argument| matches!(argument.role, Role::Principal))
    }
}

/// Each argument of the handler with its role, checking each in turn. The
/// first argument that takes the principal is the principal.
fn arguments<'a>(
    inputs: &'a Punctuated<FnArg, Comma>,
    args: &Args,
    errors: &mut Errors,
) -> Vec<Argument<'a>> {
    let principal = args.principal();
    let mut arguments = Vec::new();
    for input in inputs {
        let typed = match input {
            FnArg::Receiver(receiver) => {
                check_not_a_method(receiver, errors);
                continue;
            }
            FnArg::Typed(typed) => typed,
        };
        check_no_cfg(&typed.attrs, errors);
        check_no_impl_trait(&typed.ty, errors);
        let taken = arguments
            .iter()
            .any(|a: &Argument<'_>| matches!(a.role, Role::Principal));
        let skipped = is_skipped(&typed.pat, &args.skip);
        let mut is_principal = false;
        if let Some(principal) = principal.filter(|_| !taken) {
            is_principal = takes_principal(&typed.ty, principal);
            if !skipped {
                check_principal_spelling(&typed.ty, principal, errors);
            }
        }
        arguments.push(Argument::new(&typed.pat, &typed.ty, is_principal, skipped));
    }
    arguments
}

impl<'a> Argument<'a> {
    fn new(pat: &'a Pat, ty: &'a Type, is_principal: bool, skipped: bool) -> Self {
        let name = binding(pat);
        let mut extractors = Vec::new();
        let left_out = is_principal || skipped;
        collect_extractors(Some(pat), ty, left_out, &mut Vec::new(), &mut extractors);
        let role = if is_principal {
            Role::Principal
        } else if extractors.iter().any(|extractor| extractor.fingerprinted) {
            Role::Fingerprinted
        } else {
            Role::NotFingerprinted
        };
        Self {
            pat,
            ty,
            name,
            role,
            extractors,
        }
    }
}

/// Pushes the extractors of an argument of type `ty`, bound by `pat`
/// where the pattern is known, to `extractors`: a tuple's elements in
/// order (an element bound to `_`, or passed over by `..`, is left out, as
/// an argument bound to `_` is), any other type as one. `left_out` leaves
/// every one out of the fingerprint.
fn collect_extractors<'a>(
    pat: Option<&Pat>,
    ty: &'a Type,
    left_out: bool,
    index: &mut Vec<usize>,
    extractors: &mut Vec<Extractor<'a>>,
) {
    let left_out = left_out || matches!(pat, Some(Pat::Wild(_)));
    let Type::Tuple(tuple) = without_parens(ty) else {
        extractors.push(Extractor {
            index: index.clone(),
            ty,
            fingerprinted: !left_out && is_fingerprinted_by_default(ty),
        });
        return;
    };
    let patterns = pat.and_then(|pat| element_patterns(pat, tuple.elems.len()));
    for (position, element) in tuple.elems.iter().enumerate() {
        let (pat, passed_over) = match &patterns {
            Some(patterns) => (patterns[position], patterns[position].is_none()),
            None => (None, false),
        };
        index.push(position);
        collect_extractors(pat, element, left_out || passed_over, index, extractors);
        index.pop();
    }
}

/// `ty` read out of parentheses and of the invisible delimiters around a
/// fragment that a `macro_rules!` passed in (`$meta: ty`), which syn keeps
/// as a `Type::Group`: a tuple type in either is still a tuple.
fn without_parens(ty: &Type) -> &Type {
    match ty {
        Type::Paren(paren) => without_parens(&paren.elem),
        Type::Group(group) => without_parens(&group.elem),
        _ => ty,
    }
}

/// The pattern of each of a tuple's `len` elements in `pat`, when `pat`
/// destructures it (`None` for one that `..` passes over, which nothing
/// binds); `None` when a name binds the tuple whole, `_` elements of a
/// `whole @ (_, _)` included, since the handler reads them through it.
fn element_patterns(pat: &Pat, len: usize) -> Option<Vec<Option<&Pat>>> {
    match pat {
        Pat::Paren(paren) => element_patterns(&paren.pat, len),
        Pat::Tuple(tuple) => {
            let elems: Vec<&Pat> = tuple.elems.iter().collect();
            let rest = elems.iter().position(|elem| matches!(elem, Pat::Rest(_)));
            let Some(rest) = rest else {
                return (elems.len() == len).then(|| elems.into_iter().map(Some).collect());
            };
            let (before, after) = (&elems[..rest], &elems[rest + 1..]);
            let passed_over = len.checked_sub(before.len() + after.len())?;
            let passed_over = std::iter::repeat_n(None, passed_over);
            let before = before.iter().copied().map(Some);
            let after = after.iter().copied().map(Some);
            Some(before.chain(passed_over).chain(after).collect())
        }
        _ => None,
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
    // `Option<IdempotencyKey>` is the key too, and an optional or fallible
    // extractor of no payload (`Option<Extension<User>>`, where only
    // signed-in callers have one) carries none either.
    optional_inner(ty).map_or_else(
        || !is_named(ty, NOT_FINGERPRINTED),
        is_fingerprinted_by_default,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where each extractor of the argument `argument` (as written in a
    /// signature) is, and whether it is fingerprinted.
    fn extractors_of(argument: &str) -> Vec<(Vec<usize>, bool)> {
        let Ok(FnArg::Typed(argument)) = syn::parse_str::<FnArg>(argument) else {
            panic!("not an argument: {argument}");
        };
        let argument = Argument::new(&argument.pat, &argument.ty, false, false);
        let extractors = argument.extractors.iter();
        extractors
            .map(|extractor| (extractor.index.clone(), extractor.fingerprinted))
            .collect()
    }

    #[test]
    fn a_nested_tuple_is_read_element_by_element() {
        assert_eq!(
            extractors_of("((Path(id), _), page): ((Path<u32>, Query<Page>), Query<Trace>)"),
            [(vec![0, 0], true), (vec![0, 1], false), (vec![1], true)]
        );
    }

    #[test]
    fn elements_a_rest_pattern_passes_over_are_left_out() {
        assert_eq!(
            extractors_of(
                "(Path(id), .., Json(body)): (Path<u32>, Query<Page>, Query<Trace>, Json<Body>)"
            ),
            [
                (vec![0], true),
                (vec![1], false),
                (vec![2], false),
                (vec![3], true)
            ]
        );
    }

    /// The handler reads every element through `whole`, `_`s included.
    #[test]
    fn a_tuple_bound_whole_is_fingerprinted_whole() {
        assert_eq!(
            extractors_of("whole @ (_, _): (Method, Query<Page>)"),
            [(vec![0], false), (vec![1], true)]
        );
        assert_eq!(
            extractors_of("meta: (Method, Query<Page>)"),
            [(vec![0], false), (vec![1], true)]
        );
    }
}
