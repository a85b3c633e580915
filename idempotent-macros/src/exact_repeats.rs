//! Whether a handler can take `exact_repeats`, answered by `ExactBody`
//! from the request's bytes before it is extracted: only when a retry with
//! the same bytes is sure to fingerprint the same.

use quote::quote;
use syn::Type;

use crate::args::{Args, Errors, Scope, listed};
use crate::checks::tokens_text;
use crate::handler::Argument;
use crate::types::{Reads, extractors_reading, is_extractor};

/// Whether the handler's body is extracted through `ExactBody`: when
/// `exact_repeats` asks for it, or by default where nothing blocks it. An
/// `exact_repeats` that something blocks is an error saying what.
pub(crate) fn exact_repeats(
    arguments: &[Argument<'_>],
    generics: &syn::Generics,
    args: &Args,
    errors: &mut Errors,
) -> bool {
    let blocker = exact_repeats_blocker(arguments, generics, args);
    match (&args.exact_repeats, blocker) {
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
    let is = |ty: &Type, names: &[&str]| is_extractor(ty, names);
    let body = extractors_reading(Reads::Body);
    let uri = extractors_reading(Reads::Uri);
    if !generics.params.is_empty() {
        // Instances of one generic handler share its name and path.
        return Some("it is generic".to_owned());
    }
    if !matches!(args.scope, None | Some(Scope::ApiKey | Scope::Global)) {
        return Some("its scope is not `\"api_key\"` or `\"global\"`".to_owned());
    }
    if !arguments.last().is_some_and(|last| is(last.ty, &body)) {
        return Some(format!(
            "its last argument is not one of axum's {}",
            listed(&body)
        ));
    }
    // Element by element within a tuple, as the fingerprint reads it: a
    // tuple of URI extractors reads only the URI, as they do one by one.
    let mut extractors = arguments.iter().flat_map(|argument| &argument.extractors);
    let other = extractors.find(|extractor| {
        extractor.fingerprinted && !is(extractor.ty, &body) && !is(extractor.ty, &uri)
    })?;
    let ty = other.ty;
    Some(format!(
        "the fingerprinted argument `{}` is not one of axum's {}, {} (leave it out with `skip`)",
        tokens_text(&quote!(#ty)),
        listed(&body),
        listed(&uri)
    ))
}
