//! Which argument, if any, is the custom scope's principal. A macro sees
//! types only as spelled, so the principal is matched by spelling: a type
//! that merely shares its name never stands in for the caller.

use quote::ToTokens;
use syn::{Path, PathArguments, Type};

use crate::types::{first_type_argument, last_ident, type_path};

/// Whether an argument of type `ty` is the custom scope's principal: the
/// type the scope names, spelled as the scope spells it, or an `Extension`
/// of it, as an auth middleware leaves it. A spelling that differs
/// (`User` for `auth::User`) is not taken: the attribute then extracts the
/// principal itself, so another type of the same name can never stand in
/// for the caller.
pub(crate) fn takes_principal(ty: &Type, principal: &Path) -> bool {
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
pub(crate) fn misspells_principal(ty: &Type, principal: &Path) -> bool {
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
