//! Whether a handler can take `exact_repeats`, answered by `ExactBody`
//! from the request's bytes before it is extracted: only when a retry with
//! the same bytes is sure to fingerprint the same.

use quote::quote;

use crate::args::{Args, Scope};
use crate::handler::{Argument, Role};
use crate::types::is_extractor;

/// Body extractors whose value depends on the body and its content type
/// alone.
const BODY_EXTRACTORS: &[&str] = &["Json", "Form", "Bytes", "String"];
/// Extractors whose value depends on the URI and its path parameters alone.
const URI_EXTRACTORS: &[&str] = &["Path", "Query"];

/// Why a retry with the same bytes might not fingerprint the same, if it
/// might: exact repeats need the last argument to be a body extractor,
/// every fingerprinted argument to read only the URI or the body, and the
/// scope to be resolved from the request's headers while extracting.
pub(crate) fn exact_repeats_blocker(
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
