//! What a type is, from its syntax alone: a macro sees types only as
//! written, so extractors and futures are known by name (and axum's
//! extractors by the crates they come from, when the path is written out).

use syn::{GenericArgument, Ident, Path, PathArguments, ReturnType, Type};

/// The return type of a `fn` that returns a future: `impl Future<...>`, a
/// boxed `dyn Future<...>` (`Pin<Box<...>>`), or a named future type such as
/// `BoxFuture<...>`. Types are known by name only, as extractors are.
pub(crate) fn future_returned(output: &ReturnType) -> Option<&Type> {
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

/// What one of axum's extractors reads of the request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reads {
    /// The URI and its path parameters alone.
    Uri,
    /// The body and its content type alone: the same bytes extract the
    /// same value, so `ExactBody` can answer a repeat from them.
    Body,
    /// The body, consumed as a stream whose value `ExactBody` cannot
    /// rebuild from the bytes it buffered.
    BodyStream,
}

/// One of axum's extractors, known by name.
struct KnownExtractor {
    name: &'static str,
    reads: Reads,
    /// Whether it is fingerprinted by the value it wraps, which must then
    /// be `Serialize`.
    serialized: bool,
}

/// Every extractor of axum's that the checks and the expansion tell
/// apart, in the order messages list them: adding one here is all it
/// takes for each of them.
const KNOWN_EXTRACTORS: &[KnownExtractor] = &[
    KnownExtractor::new("Json", Reads::Body, true),
    KnownExtractor::new("Form", Reads::Body, true),
    KnownExtractor::new("Bytes", Reads::Body, false),
    KnownExtractor::new("String", Reads::Body, false),
    KnownExtractor::new("Multipart", Reads::BodyStream, false),
    KnownExtractor::new("Path", Reads::Uri, true),
    KnownExtractor::new("Query", Reads::Uri, true),
];

impl KnownExtractor {
    const fn new(name: &'static str, reads: Reads, serialized: bool) -> Self {
        Self {
            name,
            reads,
            serialized,
        }
    }
}

/// The names of the known extractors that read `reads`, in order.
pub(crate) fn extractors_reading(reads: Reads) -> Vec<&'static str> {
    known_extractors(|extractor| extractor.reads == reads)
}

/// The names of the known extractors fingerprinted by the value they wrap.
pub(crate) fn serialized_extractors() -> Vec<&'static str> {
    known_extractors(|extractor| extractor.serialized)
}

/// Whether `ty` is a known extractor that consumes the request's body,
/// which axum accepts only as a handler's last argument. `Request` is left
/// out: an application's own parts extractor may be called that.
pub(crate) fn consumes_body(ty: &Type) -> bool {
    let body = known_extractors(|extractor| extractor.reads != Reads::Uri);
    is_extractor(ty, &body)
}

fn known_extractors(wanted: impl Fn(&KnownExtractor) -> bool) -> Vec<&'static str> {
    KNOWN_EXTRACTORS
        .iter()
        .filter(|extractor| wanted(extractor))
        .map(|extractor| extractor.name)
        .collect()
}

/// Where axum's extractors come from, when the path is written out.
const EXTRACTOR_CRATES: &[&str] = &["axum", "axum_extra", "bytes", "std", "alloc"];

/// Whether `ty` is one of axum's extractors `names`, by a bare name or a
/// path from one of [`EXTRACTOR_CRATES`]: `crate::Form` is an
/// application's own type.
pub(crate) fn is_extractor(ty: &Type, names: &[&str]) -> bool {
    let Some(path) = type_path(ty) else {
        return false;
    };
    let from_known_crate = path.segments.len() == 1
        || EXTRACTOR_CRATES
            .iter()
            .any(|krate| path.segments[0].ident == krate);
    from_known_crate && is_named(ty, names)
}

pub(crate) fn last_ident(path: &Path) -> Option<&Ident> {
    path.segments.last().map(|segment| &segment.ident)
}

pub(crate) fn type_path(ty: &Type) -> Option<&Path> {
    match ty {
        Type::Path(path) if path.qself.is_none() => Some(&path.path),
        Type::Paren(paren) => type_path(&paren.elem),
        Type::Group(group) => type_path(&group.elem),
        _ => None,
    }
}

pub(crate) fn type_ident(ty: &Type) -> Option<&Ident> {
    type_path(ty).and_then(last_ident)
}

/// Whether `ty`'s name (the last segment of its path) is one of `names`.
pub(crate) fn is_named(ty: &Type, names: &[&str]) -> bool {
    type_ident(ty).is_some_and(|ident| names.iter().any(|name| ident == name))
}

/// Whether `ty` reads as `Result<T, E>`: an extractor taken with its
/// rejection. A one-argument `Result<T>` is an alias of some crate's own,
/// not an extractor's.
pub(crate) fn is_two_argument_result(ty: &Type) -> bool {
    is_named(ty, &["Result"]) && type_arguments(ty).count() == 2
}

/// `T` in `Wrapper<T, ..>`.
pub(crate) fn first_type_argument(ty: &Type) -> Option<&Type> {
    type_arguments(ty).next()
}

/// The type arguments of `ty`'s last path segment, in order, up to its
/// first argument of another kind (a lifetime, a const, a binding).
fn type_arguments(ty: &Type) -> impl Iterator<Item = &Type> {
    let segment = type_path(ty).and_then(|path| path.segments.last());
    let arguments = match segment.map(|segment| &segment.arguments) {
        Some(PathArguments::AngleBracketed(generic)) => Some(generic.args.iter()),
        _ => None,
    };
    arguments
        .into_iter()
        .flatten()
        .map_while(|argument| match argument {
            GenericArgument::Type(inner) => Some(inner),
            _ => None,
        })
}

/// `T` in `Option<T>` or `Result<T, E>`: the extractor within an optional
/// or fallible one, which reads what `T` reads.
pub(crate) fn optional_inner(ty: &Type) -> Option<&Type> {
    first_type_argument(ty).filter(|_| is_named(ty, &["Option", "Result"]))
}
