//! Request fingerprints.
//!
//! A [`Fingerprint`] is a SHA-256 digest over the endpoint identity and the
//! canonical encoding of the handler's typed, extracted inputs. It tells a
//! retry of the same request apart from a different request that reuses an
//! `Idempotency-Key`, which must be rejected with `422 Unprocessable Content`.
//!
//! # Canonical encoding
//!
//! Inputs are fed to a custom [`serde::Serializer`] that writes a compact,
//! self-delimiting byte encoding which is hashed once; no JSON text is
//! built. Every value starts with a one-byte type tag, so values of different
//! types never share an encoding, and every variable-sized part is either
//! length-prefixed or terminated, so nested shapes cannot run into each other.
//! Lengths are `u64` big-endian.
//!
//! | tag    | value                         | followed by                                                       |
//! |--------|-------------------------------|-------------------------------------------------------------------|
//! | `0x00` | unit, unit struct             | nothing                                                           |
//! | `0x01` | `None`                        | nothing                                                           |
//! | `0x02` | `Some`                        | the inner value                                                   |
//! | `0x03` | `bool`                        | `0x00` or `0x01`                                                  |
//! | `0x04` | any integer, `i8` to `u128`   | sign byte (`0x01` if negative), then the 16-byte big-endian magnitude |
//! | `0x05` | `f32`, `f64`                  | the 8 big-endian bytes of the value as `f64`                      |
//! | `0x06` | `str`, `String`, `char`       | length, UTF-8 bytes                                               |
//! | `0x07` | bytes (`serialize_bytes`)     | length, raw bytes                                                 |
//! | `0x08` | sequence, tuple, tuple struct | each element (a hash set's, or its iterator's, sorted), then the end marker `0xFF` |
//! | `0x09` | map, struct                   | entry count, then the entries sorted (see below)                  |
//! | `0x0A` | enum variant                  | the variant name as a string (`0x06`), then its content           |
//!
//! Choices worth knowing:
//!
//! - **Integers** of every width encode alike for equal values, so `1u8` and
//!   `1i64` match, as they do in JSON. **Floats** have their own tag, so `1.0`
//!   is not `1`. `-0.0` differs from `0.0`: they compare equal, but a
//!   handler sees the sign (it prints `-0`, and `1.0 / x` is `-inf`), so a
//!   request with one must not be answered with the other's response.
//!   Every NaN is folded into one NaN: Rust leaves the sign and payload of
//!   a computed NaN (and of an `f32` NaN widened to `f64`) to the platform,
//!   so the same request could otherwise fingerprint differently on another
//!   machine.
//! - **Maps and structs** share one encoding: a struct is the map from its
//!   field names to its field values. Each entry is the key's canonical
//!   encoding followed by the value's; entries are sorted by key encoding
//!   (then value encoding) so iteration order does not matter. Entries are
//!   buffered for the sort, which costs a copy per nesting level but keeps
//!   the whole fingerprint to one SHA-256 pass (a digest per field made
//!   small inputs several times slower).
//!   A struct's `Option` field that is `None` is left out, as one that
//!   `skip_serializing_if` skips: the handler reads an optional field the
//!   body leaves out as `None` too, so a release that adds an optional
//!   field to a payload type keeps the fingerprints of requests that do not
//!   send it (their retries across that deploy are replayed, not refused).
//!   A map's entry whose value is `None` stays, as the handler sees it, and
//!   so does a field that a `serialize_with` of its own writes as none
//!   (a double option's `null`, which a `PATCH` handler tells from a field
//!   left out).
//!   Keys are not stringified: an integer key `1` differs from a string
//!   key `"1"`.
//! - **`Some(x)`** is tagged rather than transparent, so `None` and
//!   `Some(None)` of an `Option<Option<T>>` stay distinct. Unlike JSON, a
//!   struct field `Some(1)` therefore differs from a bare `1`.
//! - **Sequences** are terminated instead of length-prefixed so that they
//!   stream even when serde does not know the length up front; the end marker
//!   is never a value tag, so the encoding stays unambiguous. They keep their
//!   order, but for a **hash set**: serde writes one as a sequence in hash
//!   order, which differs between two parses of one body (each set draws
//!   its own random keys), so its elements are written sorted by their
//!   encoding instead. Sorting is sound for a set alone: two requests whose
//!   lists hold the same elements in another order, or twice, give the
//!   handler equal sets. serde does not tell the serializer a set from a
//!   list, but it passes every value with its type, so a set is known by
//!   its type's name: `std`'s and `hashbrown`'s `HashSet`, behind references,
//!   `Box`, `Rc`, `Arc` or `Cow` too. Where serde passes a set on without
//!   its type (the content of an untagged enum's variant, a
//!   `#[serde(transparent)]` wrapper, a `Mutex`), the set's own
//!   `Serialize` still hands it whole, with its type, to `collect_seq`.
//!   So is a set, or a map's entries, keys or values, handed to
//!   `collect_seq` as an iterator (mapped, copied or cloned item by item
//!   at most), whose type names the set's: as `serde_with` writes a set
//!   `#[serde_as(as = "HashSet<DisplayFromStr>")]` and a map
//!   `as = "Vec<(_, _)>"`. A set whose elements a `Serialize` of your own
//!   writes one by one (`serialize_seq`, then an element at a time), or
//!   another crate's unordered set, is written in its iteration order,
//!   and a retry of it would get 422: hold such sets as `BTreeSet`.
//! - **Enum variants** encode their name, not their index, so reordering
//!   variants keeps fingerprints stable. The content is unit for a unit
//!   variant, the inner value for a newtype variant, a sequence for a tuple
//!   variant and a map for a struct variant. The enum's type name is not
//!   included, in line with externally tagged JSON.
//! - **Newtype structs** are transparent, like in `serde_json`. **Tuples** and
//!   tuple structs encode as sequences, **`char`** as a one-character string.
//! - **Bytes** passed to `serialize_bytes` (such as [`bytes::Bytes`] bodies)
//!   get their own tag and differ from a sequence of integers.
//!
//! The fingerprint itself is `SHA-256(VERSION ‖ len(endpoint) ‖ endpoint ‖
//! enc(input₁) ‖ enc(input₂) ‖ …)`, where `VERSION` names this
//! encoding so a future change cannot collide with stored fingerprints.

use std::cell::Cell;
use std::fmt;

use serde::Serialize;
use serde::ser::{self, Serializer};
use sha2::{Digest, Sha256};

/// Names the encoding; bump it whenever a change could give a request the
/// encoding an earlier version gave another one (a change that only tells
/// apart what was encoded alike needs no bump: see `canonical_f64_bits`).
const VERSION: &[u8] = b"idempotent-core/fingerprint/v2";

const UNIT: u8 = 0x00;
const NONE: u8 = 0x01;
const SOME: u8 = 0x02;
const BOOL: u8 = 0x03;
const INT: u8 = 0x04;
const FLOAT: u8 = 0x05;
const STRING: u8 = 0x06;
const BYTES: u8 = 0x07;
const SEQ: u8 = 0x08;
const MAP: u8 = 0x09;
const VARIANT: u8 = 0x0A;
/// Closes a sequence; distinct from every value tag.
const SEQ_END: u8 = 0xFF;

/// A 32-byte SHA-256 request fingerprint.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Wraps raw digest bytes, e.g. as read back from a store.
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as 64 lowercase hexadecimal characters.
    #[must_use]
    pub fn to_hex(&self) -> String {
        self.to_string()
    }

    /// This fingerprint bound to the path parameters of the route that
    /// matched, names and values in order: the same inputs on another
    /// resource (`/orgs/2/...` for `/orgs/1/...`) are another request,
    /// even when the handler learns the resource from somewhere other than
    /// its own arguments (a middleware's `Extension`, a nested router's
    /// prefix).
    pub(crate) fn on_route<'a>(self, params: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut parts: Vec<&[u8]> = vec![b"idempotent route", &self.0];
        for (name, value) in params {
            parts.push(name.as_bytes());
            parts.push(value.as_bytes());
        }
        Self(crate::digest::sha256_framed(&parts))
    }

    /// This fingerprint bound to the request's method: one handler routed
    /// for several methods (`any(handler)`, a handler reading `Method`)
    /// answers a `DELETE` other than a `POST` of the same inputs, so the
    /// two are different requests. See [`request::method_binding`] for
    /// which methods are bound.
    ///
    /// [`request::method_binding`]: crate::request::method_binding
    pub(crate) fn on_method(self, method: &http::Method) -> Self {
        let parts: [&[u8]; 3] = [b"idempotent method", &self.0, method.as_str().as_bytes()];
        Self(crate::digest::sha256_framed(&parts))
    }
}

impl fmt::Debug for Fingerprint {
    /// Shows a short prefix: enough to tell fingerprints apart in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fingerprint(")?;
        write_hex(f, &self.0[..4])?;
        f.write_str("…)")
    }
}

impl fmt::Display for Fingerprint {
    /// Writes the full digest in lowercase hexadecimal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
}

/// Why a fingerprint could not be computed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FingerprintError {
    /// An input's `Serialize` implementation failed; holds its message.
    #[error("failed to serialize a fingerprint input: {0}")]
    Serialize(String),
    /// Two handlers, whose attributes stand at `places`, share the default
    /// endpoint name `name`, so their fingerprints could not tell them
    /// apart.
    #[error(
        "the handlers of the `#[idempotent]` attributes at {} and {} share the endpoint name `{name}`, so a key reused at one could replay the other's response; give one of them its own `#[idempotent(name = \"...\")]` (two handlers that one `macro_rules!` invocation writes stand at one place: pass the name through the macro)",
        places[0], places[1]
    )]
    SharedEndpointName {
        /// The shared name.
        name: &'static str,
        /// Where the two attributes stand, as `file:line:column #hash`, the
        /// hash that of the handler as written (two handlers written by one
        /// `macro_rules!` invocation stand at its line and column).
        places: [&'static str; 2],
    },
    /// A body extractor taken as `Result<_, _>` failed to read the request
    /// body to its end (the connection broke, a body timeout in front of
    /// the route gave up): the client never finished sending a payload, so
    /// there is nothing to fingerprint, and the handler's answer to the
    /// rejection must not be stored under the key, or the retry that
    /// sends the whole body would be refused as a reused key.
    #[error("the request body could not be read to its end")]
    UnreadBody,
}

impl ser::Error for FingerprintError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self::Serialize(msg.to_string())
    }
}

/// Incremental fingerprint builder, domain-separated by endpoint identity.
///
/// Each [`input`](Self::input) is appended in its canonical encoding, which
/// is self-delimiting, so the boundaries between inputs are part of the
/// fingerprint: inputs `("a", "b")` differ from `("ab")`, and order matters.
#[derive(Clone)]
pub struct Fingerprinter {
    hasher: Sha256,
    /// Whether an input was an extractor's rejection, taken as a `Result`.
    rejected: bool,
}

impl Fingerprinter {
    /// Starts a fingerprint for `endpoint`, e.g. `"POST /orders"` or the
    /// handler's path; requests to different endpoints never match.
    #[must_use]
    pub fn new(endpoint: &str) -> Self {
        // The version and the name's length in one write, as
        // `Encoder::tag_and_len` writes a tag and a length.
        let mut head = [0; VERSION.len() + 8];
        head[..VERSION.len()].copy_from_slice(VERSION);
        head[VERSION.len()..].copy_from_slice(&len_bytes(endpoint.len()));
        let mut hasher = Sha256::new();
        hasher.update(head);
        hasher.update(endpoint.as_bytes());
        Self {
            hasher,
            rejected: false,
        }
    }

    /// Adds one input in its canonical encoding.
    ///
    /// # Errors
    ///
    /// Returns [`FingerprintError::Serialize`] if the value's `Serialize`
    /// implementation fails. The builder is then left as it was before the
    /// call: the encoding streams into the hash, which is restored from a
    /// checkpoint if the value fails half-way.
    pub fn input<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
    ) -> Result<&mut Self, FingerprintError> {
        let checkpoint = self.hasher.clone();
        if let Err(error) = Encoder::new(&mut self.hasher).value(value) {
            self.hasher = checkpoint;
            return Err(error);
        }
        Ok(self)
    }

    /// Completes the fingerprint.
    #[must_use]
    pub fn finish(self) -> Fingerprint {
        Fingerprint(self.hasher.finalize().into())
    }

    /// Whether one of the inputs was an extractor's rejection that the
    /// handler takes as a `Result` (see [`FingerprintInput`] for `Result`).
    pub(crate) fn input_rejected(&self) -> bool {
        self.rejected
    }

    /// Notes that an input was an extractor's rejection, taken as a
    /// `Result`, without adding anything to the fingerprint.
    pub(crate) fn note_rejection(&mut self) {
        self.rejected = true;
    }
}

impl fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fingerprinter").finish_non_exhaustive()
    }
}

/// Fingerprints a single input for `endpoint`.
///
/// # Errors
///
/// Returns [`FingerprintError::Serialize`] if the value's `Serialize`
/// implementation fails.
pub fn fingerprint<T: Serialize + ?Sized>(
    endpoint: &str,
    value: &T,
) -> Result<Fingerprint, FingerprintError> {
    let mut fingerprinter = Fingerprinter::new(endpoint);
    fingerprinter.input(value)?;
    Ok(fingerprinter.finish())
}

/// What a handler argument contributes to the request fingerprint.
///
/// Implemented for axum's body and URL extractors, so `Json<T>` contributes
/// its `T`. Implement it for your own extractors, usually by forwarding a
/// `Serialize` view of them to [`Fingerprinter::input`]:
///
/// ```
/// use idempotent_core::{FingerprintError, FingerprintInput, Fingerprinter};
/// use serde::Serialize;
///
/// /// An extractor of your own that parses and validates a JSON body.
/// struct Validated<T>(T);
///
/// impl<T: Serialize> FingerprintInput for Validated<T> {
///     fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError> {
///         fingerprinter.input(&self.0).map(drop)
///     }
/// }
/// ```
///
/// A handler's arguments are fed one after the other with nothing between
/// them, so what one contributes must say where it ends: forward a single
/// value (a `Vec`, not its items one input each), or first an input that
/// says what follows, as the `Option` and `Result` implementations do.
/// Two arguments that each fed their items one by one could trade items
/// (`[a, b]` then `[c]` would match `[a]` then `[b, c]`).
///
/// # Another crate's extractor
///
/// With the `axum-extra` feature, axum-extra's `Query`, `Form`,
/// `OptionalQuery`, `WithRejection` and `Cached` implement this trait.
/// For any other crate's extractor, such as a validating wrapper, Rust's
/// orphan rule forbids implementing it yourself. Wrap that extractor in one
/// of your own that extracts through it, and implement the trait for yours:
///
/// ```
/// # mod axum_valid {
/// #     use axum::extract::{FromRequest, Request};
/// #     pub struct Valid<E>(pub E);
/// #     impl<S: Send + Sync, E: FromRequest<S>> FromRequest<S> for Valid<E> {
/// #         type Rejection = E::Rejection;
/// #         async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
/// #             E::from_request(request, state).await.map(Valid)
/// #         }
/// #     }
/// # }
/// use axum::Json;
/// use axum::extract::{FromRequest, Request};
/// use axum_valid::Valid;
/// use idempotent_core::{FingerprintError, FingerprintInput, Fingerprinter};
/// use serde::Serialize;
///
/// /// A validated JSON body, fingerprinted by its `T`.
/// struct ValidJson<T>(T);
///
/// impl<S: Send + Sync, T> FromRequest<S> for ValidJson<T>
/// where
///     Valid<Json<T>>: FromRequest<S>,
/// {
///     type Rejection = <Valid<Json<T>> as FromRequest<S>>::Rejection;
///
///     async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
///         let Valid(Json(value)) = Valid::<Json<T>>::from_request(request, state).await?;
///         Ok(Self(value))
///     }
/// }
///
/// impl<T: Serialize> FingerprintInput for ValidJson<T> {
///     fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError> {
///         fingerprinter.input(&self.0).map(drop)
///     }
/// }
/// ```
///
/// Fingerprint the same value the handler reads (here the `T`, as `Json<T>`
/// does): a retry whose payload differs is then answered 422, not with the
/// stored response. `#[idempotent(skip(<argument>))]` compiles too, but
/// leaves the payload out, so such a retry would be replayed. As the
/// handler's last argument, such an extractor is held to the body's
/// `Content-Length` over HTTP/2 as axum's own are.
// A payload type taken bare (`order: NewOrder`, its `Json` forgotten) is
// reported here before axum's "`Handler<_, _>` is not implemented" at the
// route, so the first note names that fix rather than an impl that would
// leave the argument no extractor.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be part of the request fingerprint",
    label = "this argument is fingerprinted",
    note = "if `{Self}` is the body's data rather than an extractor, take it through one: `Json(value): Json<{Self}>`, or `Form`, `Query` or `Path`, each fingerprinted by its payload",
    note = "if `{Self}` is an extractor defined in your crate, implement `idempotent_core::FingerprintInput` for it: forward a `Serialize` value to `Fingerprinter::input`",
    note = "if it is another crate's, the orphan rule forbids that: wrap it in an extractor of your own whose `FromRequest` calls it, and implement `FingerprintInput` for yours (the trait's documentation shows how); for axum-extra's extractors, enable the `axum-extra` feature of idempotent-core",
    note = "to leave the argument out of the fingerprint, use `#[idempotent(skip(<argument>))]`; a retry with another payload in it is then replayed, not answered 422"
)]
pub trait FingerprintInput {
    /// Feeds this argument into `fingerprinter`.
    ///
    /// # Errors
    ///
    /// Returns [`FingerprintError`] if the argument cannot be encoded.
    fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError>;
}

/// Forwards the extractor's inner value, which is the typed input.
macro_rules! forward_inner {
    ($($extractor:path),+ $(,)?) => {$(
        impl<T: Serialize> FingerprintInput for $extractor {
            fn fingerprint_into(
                &self,
                fingerprinter: &mut Fingerprinter,
            ) -> Result<(), FingerprintError> {
                fingerprinter.input(&self.0).map(drop)
            }
        }
    )+};
}

forward_inner!(
    axum::Json<T>,
    axum::Form<T>,
    axum::extract::Query<T>,
    axum::extract::Path<T>,
);

// axum-extra's `Query` and `Form` contribute their `T` exactly as axum's
// do, so moving a handler from one to the other keeps the fingerprints
// already stored: a retry sent across that deploy is still a retry.
#[cfg(feature = "axum-extra")]
forward_inner!(axum_extra::extract::Query<T>, axum_extra::extract::Form<T>);

/// The query string as sent, `None` when the URI has none: unlike an empty
/// one, which is `Some("")`.
impl FingerprintInput for axum::extract::RawQuery {
    fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError> {
        fingerprinter.input(&self.0).map(drop)
    }
}

/// The form's bytes as sent, as a `Bytes` body contributes them.
impl FingerprintInput for axum::extract::RawForm {
    fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError> {
        self.0.fingerprint_into(fingerprinter)
    }
}

/// As `Option<axum::extract::Query<T>>`: a presence flag, then the `T`.
#[cfg(feature = "axum-extra")]
impl<T: Serialize> FingerprintInput for axum_extra::extract::OptionalQuery<T> {
    fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError> {
        fingerprinter.input(&self.0.is_some())?;
        match &self.0 {
            Some(query) => fingerprinter.input(query).map(drop),
            None => Ok(()),
        }
    }
}

/// The wrapped extractor's input: `WithRejection` only changes what a
/// rejection answers, not what was extracted.
#[cfg(feature = "axum-extra")]
impl<E: FingerprintInput, R> FingerprintInput for axum_extra::extract::WithRejection<E, R> {
    fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError> {
        self.0.fingerprint_into(fingerprinter)
    }
}

/// The cached extractor's input: `Cached` only saves extracting it twice.
#[cfg(feature = "axum-extra")]
impl<T: FingerprintInput> FingerprintInput for axum_extra::extract::Cached<T> {
    fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError> {
        self.0.fingerprint_into(fingerprinter)
    }
}

impl FingerprintInput for String {
    fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError> {
        fingerprinter.input(self.as_str()).map(drop)
    }
}

impl FingerprintInput for bytes::Bytes {
    fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError> {
        fingerprinter.input(&RawBytes(self)).map(drop)
    }
}

impl<T: FingerprintInput> FingerprintInput for Option<T> {
    fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError> {
        // A presence flag first: otherwise `None` could match a `Some` whose
        // inner input happens to encode as none.
        fingerprinter.input(&self.is_some())?;
        match self {
            Some(inner) => inner.fingerprint_into(fingerprinter),
            None => Ok(()),
        }
    }
}

/// A fallible extractor, as axum's `Result<Json<T>, JsonRejection>`: the
/// extracted value when there is one, and only the fact of the rejection
/// otherwise (rejections are errors, not payloads). A rejection of a body
/// that could not be read to its end is no payload at all
/// ([`FingerprintError::UnreadBody`]): nothing is claimed, as when a plain
/// `Json<T>` rejects it. Under `#[idempotent]`, a handler that answers
/// any other rejection with 400 or 422 (as axum's extractors answer
/// theirs) has its answer not stored, as axum's own rejection of a plain
/// `Json<T>` is not: the retry with the request fixed runs, and another
/// malformed request gets its own answer. Any other status is stored as
/// usual (a 402 for a charge declined after a malformed optional input
/// was left out is the outcome of a run that acted), so a handler that
/// acts beside a rejected input should not answer 400 or 422.
impl<T: FingerprintInput, E: 'static> FingerprintInput for Result<T, E> {
    fn fingerprint_into(&self, fingerprinter: &mut Fingerprinter) -> Result<(), FingerprintError> {
        if let Err(rejection) = self {
            if body_unread(rejection) {
                return Err(FingerprintError::UnreadBody);
            }
            fingerprinter.note_rejection();
        }
        fingerprinter.input(&self.is_ok())?;
        match self {
            Ok(inner) => inner.fingerprint_into(fingerprinter),
            Err(_) => Ok(()),
        }
    }
}

/// Whether `rejection` is an axum (or axum-extra) body extractor's for a
/// body that failed while it was read. A body over a size limit is not:
/// its 413 is not stored anyway, and the handler answers it as it chooses.
fn body_unread(rejection: &dyn std::any::Any) -> bool {
    use axum::extract::rejection::{
        BytesRejection, FailedToBufferBody, FormRejection, JsonRejection, RawFormRejection,
        StringRejection,
    };
    let unread =
        |failed: &FailedToBufferBody| matches!(failed, FailedToBufferBody::UnknownBodyError(_));
    let bytes = |rejection: &BytesRejection| match rejection {
        BytesRejection::FailedToBufferBody(failed) => unread(failed),
        _ => false,
    };
    let raw_form = |rejection: &RawFormRejection| match rejection {
        RawFormRejection::BytesRejection(inner) => bytes(inner),
        _ => false,
    };
    if let Some(rejection) = rejection.downcast_ref::<JsonRejection>() {
        return matches!(rejection, JsonRejection::BytesRejection(inner) if bytes(inner));
    }
    if let Some(rejection) = rejection.downcast_ref::<FormRejection>() {
        return matches!(rejection, FormRejection::BytesRejection(inner) if bytes(inner));
    }
    if let Some(rejection) = rejection.downcast_ref::<StringRejection>() {
        return matches!(rejection, StringRejection::FailedToBufferBody(failed) if unread(failed));
    }
    if let Some(rejection) = rejection.downcast_ref::<RawFormRejection>() {
        return raw_form(rejection);
    }
    #[cfg(feature = "axum-extra")]
    if let Some(rejection) = rejection.downcast_ref::<axum_extra::extract::FormRejection>() {
        use axum_extra::extract::FormRejection as ExtraFormRejection;
        return matches!(rejection, ExtraFormRejection::RawFormRejection(inner) if raw_form(inner));
    }
    rejection
        .downcast_ref::<BytesRejection>()
        .is_some_and(bytes)
}

/// Serializes as bytes, not as a sequence of integers as `[u8]` would.
pub(crate) struct RawBytes<'a>(pub(crate) &'a [u8]);

impl Serialize for RawBytes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

fn len_bytes(len: usize) -> [u8; 8] {
    // `usize` is at most 64 bits on every supported target.
    (len as u64).to_be_bytes()
}

/// The `f64` bits of `value`, with every NaN mapped to one: a NaN's sign
/// and payload may differ between platforms for the same request, while
/// every other value, the sign of a zero included, is what the handler
/// sees.
///
/// Earlier versions wrote `-0.0` as `0.0` and never wrote the bits of
/// `-0.0`: a fingerprint that holds them matches no stored one, and one
/// without them matches what it matched before, so `VERSION` stays (a
/// bump would answer every retry across the upgrade with 422).
fn canonical_f64_bits(value: f64) -> u64 {
    const CANONICAL_NAN: u64 = 0x7ff8_0000_0000_0000;
    if value.is_nan() {
        CANONICAL_NAN
    } else {
        value.to_bits()
    }
}

/// Where the canonical encoding goes.
trait Sink {
    fn put(&mut self, bytes: &[u8]);

    fn put_byte(&mut self, byte: u8) {
        self.put(&[byte]);
    }
}

impl Sink for Vec<u8> {
    // Inlined, a write of a fixed-size head needs no call to `memcpy`.
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }

    // A push, not a copy of a one-byte slice through `memcpy`.
    fn put_byte(&mut self, byte: u8) {
        self.push(byte);
    }
}

impl Sink for &mut Sha256 {
    fn put(&mut self, bytes: &[u8]) {
        self.update(bytes);
    }
}

/// The canonical-encoding serializer.
struct Encoder<W> {
    out: W,
    /// Whether the value being encoded is an unordered set, whose
    /// sequence is then written sorted: set by [`Encoder::value`], which
    /// knows the value's type, or by `collect_seq`, which knows the set's
    /// where serde passed on none, and taken by the sequence it writes.
    unordered: bool,
}

impl<W: Sink> Encoder<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            unordered: false,
        }
    }

    /// Encodes `value`. Every value with a type of its own (an input, a
    /// field, an element, an entry, the content of a `Some`) goes through
    /// here, so that an unordered set is known as one.
    fn value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), FingerprintError> {
        self.unordered = is_unordered_set::<T>();
        let encoded = value.serialize(&mut *self);
        self.unordered = false;
        encoded
    }

    fn tag(&mut self, tag: u8) {
        self.out.put_byte(tag);
    }

    /// `tag`, then `len` in eight bytes. One write, not two: a map's
    /// buffer and the hash each pay a call per write, and an input writes
    /// a tag and a length for every string, map and struct in it.
    fn tag_and_len(&mut self, tag: u8, len: usize) {
        let mut head = [tag; 9];
        head[1..].copy_from_slice(&len_bytes(len));
        self.out.put(&head);
    }

    fn length_prefixed(&mut self, tag: u8, bytes: &[u8]) {
        self.tag_and_len(tag, bytes.len());
        self.out.put(bytes);
    }

    fn integer(&mut self, negative: bool, magnitude: u128) {
        // One write, as in `tag_and_len`.
        let mut encoded = [INT; 18];
        encoded[1] = u8::from(negative);
        encoded[2..].copy_from_slice(&magnitude.to_be_bytes());
        self.out.put(&encoded);
    }

    fn variant(&mut self, name: &str) {
        self.tag(VARIANT);
        self.length_prefixed(STRING, name.as_bytes());
    }
}

impl<'a, W: Sink> Serializer for &'a mut Encoder<W> {
    type Ok = ();
    type Error = FingerprintError;
    type SerializeSeq = Sequence<'a, W>;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = MapEncoder<'a, W>;
    type SerializeStruct = MapEncoder<'a, W>;
    type SerializeStructVariant = MapEncoder<'a, W>;

    fn serialize_bool(self, v: bool) -> Result<(), FingerprintError> {
        self.out.put(&[BOOL, u8::from(v)]);
        Ok(())
    }

    fn serialize_i8(self, v: i8) -> Result<(), FingerprintError> {
        self.serialize_i128(v.into())
    }

    fn serialize_i16(self, v: i16) -> Result<(), FingerprintError> {
        self.serialize_i128(v.into())
    }

    fn serialize_i32(self, v: i32) -> Result<(), FingerprintError> {
        self.serialize_i128(v.into())
    }

    fn serialize_i64(self, v: i64) -> Result<(), FingerprintError> {
        self.serialize_i128(v.into())
    }

    fn serialize_i128(self, v: i128) -> Result<(), FingerprintError> {
        self.integer(v < 0, v.unsigned_abs());
        Ok(())
    }

    fn serialize_u8(self, v: u8) -> Result<(), FingerprintError> {
        self.serialize_u128(v.into())
    }

    fn serialize_u16(self, v: u16) -> Result<(), FingerprintError> {
        self.serialize_u128(v.into())
    }

    fn serialize_u32(self, v: u32) -> Result<(), FingerprintError> {
        self.serialize_u128(v.into())
    }

    fn serialize_u64(self, v: u64) -> Result<(), FingerprintError> {
        self.serialize_u128(v.into())
    }

    fn serialize_u128(self, v: u128) -> Result<(), FingerprintError> {
        self.integer(false, v);
        Ok(())
    }

    fn serialize_f32(self, v: f32) -> Result<(), FingerprintError> {
        // Widening is exact, so an `f32` matches the `f64` of the same value.
        self.serialize_f64(v.into())
    }

    fn serialize_f64(self, v: f64) -> Result<(), FingerprintError> {
        self.tag(FLOAT);
        self.out.put(&canonical_f64_bits(v).to_be_bytes());
        Ok(())
    }

    fn serialize_char(self, v: char) -> Result<(), FingerprintError> {
        self.serialize_str(v.encode_utf8(&mut [0; 4]))
    }

    fn serialize_str(self, v: &str) -> Result<(), FingerprintError> {
        self.length_prefixed(STRING, v.as_bytes());
        Ok(())
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<(), FingerprintError> {
        self.length_prefixed(BYTES, v);
        Ok(())
    }

    fn serialize_none(self) -> Result<(), FingerprintError> {
        self.tag(NONE);
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), FingerprintError> {
        self.tag(SOME);
        self.value(value)
    }

    fn serialize_unit(self) -> Result<(), FingerprintError> {
        self.tag(UNIT);
        Ok(())
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), FingerprintError> {
        self.serialize_unit()
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
    ) -> Result<(), FingerprintError> {
        self.variant(variant);
        self.serialize_unit()
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), FingerprintError> {
        self.value(value)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), FingerprintError> {
        self.variant(variant);
        self.value(value)
    }

    fn serialize_seq(self, _len: Option<usize>) -> Result<Sequence<'a, W>, FingerprintError> {
        if std::mem::take(&mut self.unordered) {
            return Ok(Sequence::Sorted(MapEncoder::new(self, Compound::Set)));
        }
        self.tag(SEQ);
        Ok(Sequence::InOrder(self))
    }

    /// A set's own `Serialize` (`std`'s and `hashbrown`'s alike) hands
    /// the set to this, with its type: so a set is known as one even where
    /// serde passed it on without its type, as the content of an untagged
    /// enum's variant, in a `#[serde(transparent)]` wrapper or behind a
    /// `Mutex`. So does a `Serialize` that hands over an iterator over a
    /// hash set or map, as `serde_with` does for `HashSet<DisplayFromStr>`,
    /// or a hash map whole ([`iterates_in_hash_order`]).
    fn collect_seq<I>(self, items: I) -> Result<(), FingerprintError>
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        self.unordered |= iterates_in_hash_order::<I>();
        let mut sequence = self.serialize_seq(None)?;
        for item in items {
            ser::SerializeSeq::serialize_element(&mut sequence, &item)?;
        }
        ser::SerializeSeq::end(sequence)
    }

    fn serialize_tuple(self, _len: usize) -> Result<Self, FingerprintError> {
        self.tag(SEQ);
        Ok(self)
    }

    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Self, FingerprintError> {
        self.serialize_tuple(0)
    }

    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self, FingerprintError> {
        self.variant(variant);
        self.serialize_tuple(0)
    }

    fn serialize_map(self, _len: Option<usize>) -> Result<MapEncoder<'a, W>, FingerprintError> {
        Ok(MapEncoder::new(self, Compound::Map))
    }

    fn serialize_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<MapEncoder<'a, W>, FingerprintError> {
        Ok(MapEncoder::new(self, Compound::Map))
    }

    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _variant_index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<MapEncoder<'a, W>, FingerprintError> {
        self.variant(variant);
        Ok(MapEncoder::new(self, Compound::Map))
    }
}

/// Tuple-like compounds: elements stream inline, then the end marker.
macro_rules! tuple_like {
    ($($trait:ident :: $method:ident),+ $(,)?) => {$(
        impl<W: Sink> ser::$trait for &mut Encoder<W> {
            type Ok = ();
            type Error = FingerprintError;

            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), FingerprintError> {
                self.value(value)
            }

            fn end(self) -> Result<(), FingerprintError> {
                self.tag(SEQ_END);
                Ok(())
            }
        }
    )+};
}

tuple_like!(
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
);

/// A sequence: its elements in their order, or, for an unordered set,
/// sorted by their encoding.
enum Sequence<'a, W> {
    InOrder(&'a mut Encoder<W>),
    Sorted(MapEncoder<'a, W>),
}

impl<W: Sink> ser::SerializeSeq for Sequence<'_, W> {
    type Ok = ();
    type Error = FingerprintError;

    fn serialize_element<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
    ) -> Result<(), FingerprintError> {
        match self {
            Self::InOrder(encoder) => encoder.value(value),
            Self::Sorted(set) => set.element(value),
        }
    }

    fn end(self) -> Result<(), FingerprintError> {
        match self {
            Self::InOrder(encoder) => {
                encoder.tag(SEQ_END);
                Ok(())
            }
            Self::Sorted(set) => set.finish(),
        }
    }
}

/// Whether values of type `T` are unordered sets: the standard library's
/// and `hashbrown`'s `HashSet`, or a reference, `Box`, `Rc`, `Arc` or
/// `Cow` of one (which serialize as the set itself; four of them deep at
/// most). `serde` writes a set as a sequence in its iteration order, which
/// depends on the hasher's random keys, so two parses of one body would
/// encode differently; yet two sets of the same elements are equal
/// whatever the order they were sent in, and a handler cannot tell them
/// apart, so writing them sorted merges only requests the handler sees
/// alike.
///
/// Only the type says so: serde passes most values to the serializer
/// with their type, and a set's own `Serialize` hands the set to
/// `collect_seq` with its type where serde does not; a sequence itself
/// does not say what it came from. The names are the compiler's (`tests`
/// checks them against it). The loops have fixed bounds and the names are
/// constants, so an optimized build answers at compile time.
fn is_unordered_set<T: ?Sized>() -> bool {
    names_unordered_set(std::any::type_name::<T>())
}

/// Whether `T` is an `Option`, by its name (the compiler's, which `tests`
/// checks against it).
fn is_option<T: ?Sized>() -> bool {
    std::any::type_name::<T>().starts_with(OPTION)
}

/// The start of the name of every `Option` type.
const OPTION: &str = "core::option::Option<";

/// Whether the type named `name` is an unordered set (see
/// [`is_unordered_set`]). Inlined, so that the compiler sees the constant
/// name it is given.
#[inline(always)]
fn names_unordered_set(mut name: &str) -> bool {
    const POINTER_DEPTH: usize = 4;
    const SETS: [&str; 2] = [
        "std::collections::hash::set::HashSet<",
        "hashbrown::set::HashSet<",
    ];
    for _ in 0..POINTER_DEPTH {
        name = pointee(name);
    }
    SETS.iter().any(|set| name.starts_with(set))
}

/// Whether `I`, handed to `collect_seq`, yields a hash set's or a hash
/// map's items (`std`'s or `hashbrown`'s) in the order the hasher laid
/// them out: the set or map itself, behind pointers as in
/// [`is_unordered_set`], or an iterator over its items, keys or values,
/// by reference or by value, taken item by item through `map`, `cloned`
/// or `copied` (four pointers and adapters deep at most). A set's own
/// `Serialize` hands over the set; `serde_with` hands over
/// `set.iter().map(..)` for `#[serde_as(as = "HashSet<DisplayFromStr>")]`
/// and `map.iter().map(..)` for a map `as = "Vec<(_, _)>"`, as a
/// `serialize_with` of one's own most simply does. That order differs
/// between two parses of one body, while the handler holds the set or
/// map, of which it is no part: the sequence is written sorted, as the
/// set itself is. The names are the compiler's (`tests` checks them).
fn iterates_in_hash_order<I: ?Sized>() -> bool {
    names_hash_order_iterator(std::any::type_name::<I>())
}

/// Whether the type named `name` yields items in hash order (see
/// [`iterates_in_hash_order`]). Inlined, so that the compiler sees the
/// constant name it is given.
#[inline(always)]
fn names_hash_order_iterator(mut name: &str) -> bool {
    const DEPTH: usize = 4;
    // Adapters that yield one item for each of theirs, in their order.
    const ADAPTERS: [&str; 3] = [
        "core::iter::adapters::map::Map<",
        "core::iter::adapters::cloned::Cloned<",
        "core::iter::adapters::copied::Copied<",
    ];
    const MODULES: [&str; 4] = [
        "std::collections::hash::set::",
        "std::collections::hash::map::",
        "hashbrown::set::",
        "hashbrown::map::",
    ];
    const TYPES: [&str; 8] = [
        "HashSet<",
        "HashMap<",
        "Iter<",
        "IntoIter<",
        "Keys<",
        "Values<",
        "IntoKeys<",
        "IntoValues<",
    ];
    for _ in 0..DEPTH {
        name = pointee(name);
        name = ADAPTERS
            .iter()
            .find_map(|adapter| name.strip_prefix(adapter))
            .unwrap_or(name);
    }
    MODULES.iter().any(|module| {
        name.strip_prefix(module)
            .is_some_and(|rest| TYPES.iter().any(|ty| rest.starts_with(ty)))
    })
}

/// The type that `name` points to, if it names a pointer that serializes
/// as its pointee; otherwise `name` itself. Inlined, so that the compiler
/// sees the constant name it is given.
#[inline(always)]
fn pointee(name: &str) -> &str {
    const POINTERS: [&str; 4] = [
        "alloc::boxed::Box<",
        "alloc::rc::Rc<",
        "alloc::sync::Arc<",
        "alloc::borrow::Cow<",
    ];
    if let Some(referent) = name.strip_prefix('&') {
        return referent.strip_prefix("mut ").unwrap_or(referent);
    }
    let pointee = POINTERS
        .iter()
        .find_map(|pointer| name.strip_prefix(pointer))
        .unwrap_or(name);
    // `Cow`'s erased lifetime, which not every compiler writes out.
    pointee.strip_prefix("'_, ").unwrap_or(pointee)
}

/// One map entry: where its key's and value's encodings sit in the map's
/// buffer (`key..value` and `value..end`). A set's element is a key
/// without a value.
#[derive(Clone, Copy)]
struct Entry {
    key: usize,
    value: usize,
    end: usize,
}

/// What a [`MapEncoder`] writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Compound {
    /// A map or a struct: its entry count, then its entries.
    Map,
    /// An unordered set: a sequence of its elements.
    Set,
}

/// Collects map or struct entries (or an unordered set's elements) in one
/// buffer, then writes them sorted by key encoding (then value encoding).
struct MapEncoder<'a, W> {
    parent: &'a mut Encoder<W>,
    compound: Compound,
    buffer: Encoder<Vec<u8>>,
    entries: Vec<Entry>,
    pending_key: Option<usize>,
}

/// A map's buffers, kept per thread for the next map: nearly every request
/// fingerprints a struct, and reusing the buffers saves two allocations
/// each time.
struct Scratch {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

thread_local! {
    static SCRATCH: Cell<Vec<Scratch>> = const { Cell::new(Vec::new()) };
}

/// Buffers kept per thread: one per nesting level in use at once.
const SCRATCH_KEPT: usize = 4;
/// Buffers that grew past this are freed rather than kept, so one large
/// input does not pin its memory to the thread.
const SCRATCH_MAX_BYTES: usize = 16 * 1024;

impl Scratch {
    fn take() -> Self {
        let reused = SCRATCH
            .try_with(|pool| {
                let mut kept = pool.take();
                let scratch = kept.pop();
                pool.set(kept);
                scratch
            })
            .ok()
            .flatten();
        reused.unwrap_or_else(|| Self {
            bytes: Vec::with_capacity(128),
            entries: Vec::new(),
        })
    }

    fn give_back(mut self) {
        if self.bytes.capacity() > SCRATCH_MAX_BYTES {
            return;
        }
        self.bytes.clear();
        self.entries.clear();
        // Fails only while the thread is shutting down; then it is dropped.
        let _ = SCRATCH.try_with(|pool| {
            let mut kept = pool.take();
            if kept.len() < SCRATCH_KEPT {
                kept.push(self);
            }
            pool.set(kept);
        });
    }
}

impl<'a, W: Sink> MapEncoder<'a, W> {
    fn new(parent: &'a mut Encoder<W>, compound: Compound) -> Self {
        let Scratch { bytes, entries } = Scratch::take();
        Self {
            parent,
            compound,
            buffer: Encoder::new(bytes),
            entries,
            pending_key: None,
        }
    }

    fn key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), FingerprintError> {
        if self.pending_key.is_some() {
            return Err(misuse("map key serialized twice without a value"));
        }
        let start = self.buffer.out.len();
        self.buffer.value(key)?;
        self.pending_key = Some(start);
        Ok(())
    }

    fn value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), FingerprintError> {
        let key = self
            .pending_key
            .take()
            .ok_or_else(|| misuse("map value serialized without a key"))?;
        let start = self.buffer.out.len();
        self.buffer.value(value)?;
        let end = self.buffer.out.len();
        self.entries.push(Entry {
            key,
            value: start,
            end,
        });
        Ok(())
    }

    /// A struct's field, left out when it is an `Option` that is `None`,
    /// as a field that `skip_serializing_if` skips is: the handler reads an
    /// optional field that the body leaves out as `None` too. So a release
    /// that adds an optional field to a payload type keeps the fingerprints
    /// of the requests that do not send it, and their retries sent across
    /// that deploy are replayed rather than refused as a reused key.
    ///
    /// Only an `Option` field, known by its type: a field written by a
    /// `serialize_with` of its own may write none for a value the handler
    /// tells from a missing one (a double option, as `serde_with` writes
    /// one for a `PATCH`: `null` to clear, left out to keep).
    fn field<T: Serialize + ?Sized>(
        &mut self,
        name: &'static str,
        value: &T,
    ) -> Result<(), FingerprintError> {
        let start = self.buffer.out.len();
        self.key(name)?;
        self.value(value)?;
        let bytes = &self.buffer.out;
        let is_none = |entry: &Entry| bytes[entry.value..entry.end] == [NONE];
        if self.entries.last().is_some_and(is_none) && is_option::<T>() {
            self.entries.pop();
            self.buffer.out.truncate(start);
        }
        Ok(())
    }

    /// A set's element: a key without a value.
    fn element<T: Serialize + ?Sized>(&mut self, element: &T) -> Result<(), FingerprintError> {
        let start = self.buffer.out.len();
        self.buffer.value(element)?;
        let end = self.buffer.out.len();
        self.entries.push(Entry {
            key: start,
            value: end,
            end,
        });
        Ok(())
    }

    fn finish(mut self) -> Result<(), FingerprintError> {
        if self.pending_key.is_some() {
            return Err(misuse("map key serialized without a value"));
        }
        let bytes = &self.buffer.out;
        let sort_key = |e: &Entry| (&bytes[e.key..e.value], &bytes[e.value..e.end]);
        self.entries
            .sort_unstable_by(|a, b| sort_key(a).cmp(&sort_key(b)));
        // A set is written as the sequence of its elements in this order,
        // as a list of them in this order would be: the set's handler sees
        // that list in any order as the same set.
        match self.compound {
            Compound::Map => {
                self.parent.tag_and_len(MAP, self.entries.len());
            }
            Compound::Set => self.parent.tag(SEQ),
        }
        for run in contiguous_runs(&self.entries) {
            self.parent.out.put(&bytes[run]);
        }
        if self.compound == Compound::Set {
            self.parent.tag(SEQ_END);
        }
        Ok(())
    }
}

/// The buffer ranges that hold `entries`, in their order, each run of
/// entries that sit next to one another in the buffer joined into one
/// range: a struct whose fields are declared in their sorted order (as
/// most short ones are) is written to the hash in one call, not one per
/// field. The bytes written are the same.
fn contiguous_runs(entries: &[Entry]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut rest = entries;
    std::iter::from_fn(move || {
        let (first, after) = rest.split_first()?;
        let mut run = first.key..first.end;
        let joined = after.iter().take_while(|next| {
            let adjacent = next.key == run.end;
            if adjacent {
                run.end = next.end;
            }
            adjacent
        });
        let count = joined.count();
        rest = &after[count..];
        Some(run)
    })
}

impl<W> Drop for MapEncoder<'_, W> {
    fn drop(&mut self) {
        Scratch {
            bytes: std::mem::take(&mut self.buffer.out),
            entries: std::mem::take(&mut self.entries),
        }
        .give_back();
    }
}

/// A `Serialize` implementation broke the serde call protocol.
fn misuse(what: &str) -> FingerprintError {
    FingerprintError::Serialize(what.to_owned())
}

impl<W: Sink> ser::SerializeMap for MapEncoder<'_, W> {
    type Ok = ();
    type Error = FingerprintError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), FingerprintError> {
        self.key(key)
    }

    fn serialize_value<T: Serialize + ?Sized>(
        &mut self,
        value: &T,
    ) -> Result<(), FingerprintError> {
        self.value(value)
    }

    fn end(self) -> Result<(), FingerprintError> {
        self.finish()
    }
}

/// Structs encode as maps keyed by field name.
macro_rules! struct_like {
    ($($trait:ident),+ $(,)?) => {$(
        impl<W: Sink> ser::$trait for MapEncoder<'_, W> {
            type Ok = ();
            type Error = FingerprintError;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                value: &T,
            ) -> Result<(), FingerprintError> {
                self.field(key, value)
            }

            fn end(self) -> Result<(), FingerprintError> {
                self.finish()
            }
        }
    )+};
}

struct_like!(SerializeStruct, SerializeStructVariant);

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap, HashSet};
    use std::hash::{BuildHasherDefault, DefaultHasher};

    use proptest::prelude::*;
    use serde::ser::{Error as _, SerializeMap as _};
    use serde_json::{Map, Value, json};

    use super::*;

    fn fp<T: Serialize + ?Sized>(value: &T) -> Fingerprint {
        fingerprint("POST /test", value).expect("value serializes")
    }

    fn from_json(text: &str) -> Fingerprint {
        fp(&serde_json::from_str::<Value>(text).expect("valid JSON"))
    }

    /// Asserts that no two of `fingerprints` are equal.
    fn assert_all_distinct(fingerprints: &[Fingerprint]) {
        for (i, a) in fingerprints.iter().enumerate() {
            for (j, b) in fingerprints.iter().enumerate().skip(i + 1) {
                assert_ne!(a, b, "inputs {i} and {j} collide");
            }
        }
    }

    // ----- Fingerprint type -----

    #[test]
    fn hex_display_and_debug() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0xAB;
        bytes[1] = 0x01;
        bytes[31] = 0xFF;
        let fingerprint = Fingerprint::from_bytes(bytes);
        let hex = fingerprint.to_hex();
        assert_eq!(hex.len(), 64);
        assert!(hex.starts_with("ab01"));
        assert!(hex.ends_with("ff"));
        assert_eq!(hex, hex.to_lowercase());
        assert_eq!(fingerprint.to_string(), hex);
        assert_eq!(format!("{fingerprint:?}"), "Fingerprint(ab010000…)");
        assert_eq!(fingerprint.as_bytes(), &bytes);
    }

    #[test]
    fn encoding_is_pinned() {
        // Fingerprints are persisted, so the encoding must not drift silently;
        // if this fails on purpose, bump `VERSION`. The expected value was
        // derived independently from the encoding documented above.
        let fingerprint = fingerprint("POST /orders", &json!({"sku": "A-1", "qty": 2})).unwrap();
        assert_eq!(
            fingerprint.to_hex(),
            "8e1fefb4f4c0287dd34126e50e5de2c43ac99802fded528f2fba6ec95520cf15"
        );
    }

    // ----- equality -----

    #[test]
    fn json_field_order_and_whitespace_do_not_matter() {
        let compact = from_json(r#"{"b":2,"a":1,"c":{"y":[1,2],"x":null}}"#);
        let spaced =
            from_json("{\n  \"a\" : 1,\n\t\"c\": { \"x\": null, \"y\": [ 1, 2 ] },  \"b\":2 }");
        assert_eq!(compact, spaced);
    }

    #[derive(Serialize)]
    struct Ab {
        a: i32,
        b: u64,
    }

    #[derive(Serialize)]
    struct Ba {
        b: i8,
        a: i128,
    }

    #[test]
    fn struct_map_and_json_object_agree() {
        let expected = fp(&Ab { a: 1, b: 2 });
        assert_eq!(fp(&Ba { b: 2, a: 1 }), expected);
        assert_eq!(fp(&BTreeMap::from([("a", 1), ("b", 2)])), expected);
        assert_eq!(fp(&HashMap::from([("b", 2u8), ("a", 1u8)])), expected);
        assert_eq!(from_json(r#"{"b":2,"a":1}"#), expected);
    }

    #[test]
    fn hash_map_iteration_order_does_not_matter() {
        let keys: Vec<String> = (0..500).map(|i| format!("key-{i}")).collect();
        let forward: HashMap<&str, usize> = keys.iter().map(|k| (k.as_str(), k.len())).collect();
        let mut backward = HashMap::with_capacity(4096);
        for key in keys.iter().rev() {
            backward.insert(key.as_str(), key.len());
        }
        let mut interleaved = HashMap::new();
        for key in keys.iter().step_by(2).chain(keys.iter().skip(1).step_by(2)) {
            interleaved.insert(key.as_str(), key.len());
        }
        let sorted: BTreeMap<&str, usize> = forward.iter().map(|(k, v)| (*k, *v)).collect();
        let expected = fp(&sorted);
        assert_eq!(fp(&forward), expected);
        assert_eq!(fp(&backward), expected);
        assert_eq!(fp(&interleaved), expected);
    }

    /// `HashSet`s of the same elements laid out differently: the capacity
    /// moves each element's bucket, and with it the iteration order, as
    /// two random hasher keys do (two parses of one body, two processes).
    fn same_words_two_layouts() -> (Fixed<&'static str>, Fixed<&'static str>) {
        const WORDS: [&str; 8] = ["ash", "birch", "cedar", "elm", "fir", "oak", "pine", "yew"];
        let small: Fixed<&str> = WORDS.into_iter().collect();
        let mut large = Fixed::with_capacity_and_hasher(1024, BuildHasherDefault::default());
        large.extend(WORDS.into_iter().rev());
        let (a, b): (Vec<_>, Vec<_>) = (small.iter().collect(), large.iter().collect());
        assert_ne!(a, b, "the layouts iterate alike; the test shows nothing");
        (small, large)
    }

    /// A `HashSet` with a hasher of fixed keys, so that its layout depends
    /// on its capacity alone.
    type Fixed<T> = HashSet<T, FixedState>;

    #[test]
    fn a_hash_set_fingerprints_alike_whatever_its_iteration_order() {
        let (small, large) = same_words_two_layouts();
        assert_eq!(fp(&small), fp(&large));

        // As a handler's body is parsed: a set with random keys each time.
        #[derive(Serialize, serde::Deserialize)]
        struct Tags {
            tags: HashSet<String>,
        }
        let body = r#"{"tags":["t0","t1","t2","t3","t4","t5","t6","t7","t8","t9"]}"#;
        let parse = || serde_json::from_str::<Tags>(body).expect("valid body");
        let first = fp(&parse());
        for _ in 0..8 {
            assert_eq!(fp(&parse()), first);
        }
        // The same set sent in another order, or with a repeat, is the
        // same set to the handler.
        let reordered = r#"{"tags":["t9","t8","t7","t6","t5","t4","t3","t2","t1","t0","t0"]}"#;
        let reordered: Tags = serde_json::from_str(reordered).expect("valid body");
        assert_eq!(fp(&reordered), first);
    }

    /// A struct whose fields are not declared in their sorted order is
    /// written in runs of neighbouring entries, one declared in that order
    /// in a single run: the bytes hashed are the same.
    #[test]
    fn fields_in_any_declared_order_fingerprint_alike() {
        #[derive(Serialize)]
        struct Sorted {
            a: u8,
            bb: &'static str,
            ccc: bool,
        }
        #[derive(Serialize)]
        struct Shuffled {
            ccc: bool,
            a: u8,
            bb: &'static str,
        }
        let sorted = Sorted {
            a: 1,
            bb: "x",
            ccc: true,
        };
        let shuffled = Shuffled {
            ccc: true,
            a: 1,
            bb: "x",
        };
        assert_eq!(
            fingerprint("POST /f", &sorted).unwrap(),
            fingerprint("POST /f", &shuffled).unwrap()
        );
    }

    #[test]
    fn entries_next_to_one_another_are_written_as_one_range() {
        let entry = |key, value, end| Entry { key, value, end };
        let (a, b, c) = (entry(0, 3, 5), entry(5, 7, 9), entry(12, 14, 15));
        let runs = |entries: &[Entry]| contiguous_runs(entries).collect::<Vec<_>>();
        assert_eq!(runs(&[a, b, c]), [0..9, 12..15]);
        assert_eq!(runs(&[c, a, b]), [12..15, 0..9]);
        assert_eq!(runs(&[b, a]), [5..9, 0..5]);
        assert!(runs(&[]).is_empty());
    }

    /// Whatever keys a process draws, a set fingerprints as its elements
    /// sorted by their encoding: the value was derived from the encoding
    /// documented above.
    #[test]
    fn a_hash_sets_encoding_is_pinned() {
        let set: HashSet<&str> = ["zz", "b", "a"].into_iter().collect();
        assert_eq!(
            fingerprint("POST /tags", &set).unwrap().to_hex(),
            "35e23a32eff216fb9ca73a4da5cd546b2f60d5ee883f6100d8ab51a780327131"
        );
    }

    #[test]
    fn hash_sets_in_fields_elements_entries_and_pointers_are_sorted_too() {
        #[derive(Serialize)]
        struct Holder<'a> {
            field: Fixed<&'a str>,
            optional: Option<Fixed<&'a str>>,
            boxed: Box<Fixed<&'a str>>,
            borrowed: &'a Fixed<&'a str>,
            cow: std::borrow::Cow<'a, Fixed<&'a str>>,
            listed: Vec<Fixed<&'a str>>,
            tupled: (u8, Fixed<&'a str>),
            mapped: BTreeMap<u8, Fixed<&'a str>>,
        }
        fn holder<'a>(set: &'a Fixed<&'a str>) -> Holder<'a> {
            Holder {
                field: set.clone(),
                optional: Some(set.clone()),
                boxed: Box::new(set.clone()),
                borrowed: set,
                cow: std::borrow::Cow::Borrowed(set),
                listed: vec![set.clone()],
                tupled: (1, set.clone()),
                mapped: BTreeMap::from([(1, set.clone())]),
            }
        }
        let (small, large) = same_words_two_layouts();
        assert_eq!(fp(&holder(&small)), fp(&holder(&large)));
    }

    /// A set that serde hands over without its type, as the content of an
    /// untagged enum's variant, inside a `#[serde(transparent)]` wrapper or
    /// behind a lock, still writes itself: it is sorted all the same.
    #[test]
    fn hash_sets_serialized_without_their_type_are_sorted_too() {
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Recipients<'a> {
            Everyone(bool),
            Listed(Fixed<&'a str>),
        }
        #[derive(Serialize)]
        #[serde(transparent)]
        struct Tags<'a>(Fixed<&'a str>);
        let (small, large) = same_words_two_layouts();
        assert_eq!(
            fp(&Recipients::Listed(small.clone())),
            fp(&Recipients::Listed(large.clone()))
        );
        assert_eq!(fp(&Tags(small.clone())), fp(&Tags(large.clone())));
        assert_eq!(
            fp(&std::sync::Mutex::new(small.clone())),
            fp(&std::sync::Mutex::new(large.clone()))
        );
        assert_eq!(fp(&Recipients::Listed(small.clone())), fp(&small));
        assert_ne!(fp(&Recipients::Everyone(true)), fp(&small));
    }

    /// How a `Serialize` of one's own hands a set to `collect_seq`: as
    /// its iterator, or mapped item by item, as `serde_with` writes a set
    /// `#[serde_as(as = "HashSet<DisplayFromStr>")]`.
    #[derive(Clone, Copy, Debug)]
    enum Handing {
        Iterated,
        Copied,
        Mapped,
    }

    struct HandedOver<'a>(&'a Fixed<&'static str>, Handing);

    impl Serialize for HandedOver<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let set = self.0;
            match self.1 {
                Handing::Iterated => serializer.collect_seq(set.iter()),
                Handing::Copied => serializer.collect_seq(set.iter().copied()),
                Handing::Mapped => serializer.collect_seq(set.iter().map(|&word| Displayed(word))),
            }
        }
    }

    /// A map written as a list: of its entries, as `serde_with` writes one
    /// `#[serde_as(as = "Vec<(_, _)>")]` (`true`), or of its keys.
    struct Listed<'a>(&'a Lengths, bool);

    /// Each word's length, in a map of fixed hasher keys.
    type Lengths = HashMap<&'static str, usize, FixedState>;

    type FixedState = BuildHasherDefault<DefaultHasher>;

    impl Serialize for Listed<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let Self(map, entries) = *self;
            if entries {
                serializer.collect_seq(map.iter().map(|(word, len)| (*word, *len)))
            } else {
                serializer.collect_seq(map.keys())
            }
        }
    }

    /// A set handed to `collect_seq` through an iterator comes in the
    /// order of the hasher's keys, as the set itself does: it is sorted
    /// too, and so is a map written as a list of its entries.
    #[test]
    fn hash_sets_and_maps_handed_over_as_iterators_are_sorted_too() {
        let (small, large) = same_words_two_layouts();
        for handing in [Handing::Iterated, Handing::Copied, Handing::Mapped] {
            let (a, b) = (HandedOver(&small, handing), HandedOver(&large, handing));
            assert_eq!(fp(&a), fp(&b), "{handing:?}");
        }
        // Laid out as the sets are, by their capacities.
        let lengths = |set: &Fixed<&'static str>| {
            let mut map = Lengths::with_capacity_and_hasher(set.capacity(), FixedState::default());
            map.extend(set.iter().map(|word| (*word, word.len())));
            map
        };
        let (a, b) = (lengths(&small), lengths(&large));
        let in_order = |map: &Lengths| map.keys().copied().collect::<Vec<_>>();
        assert_ne!(in_order(&a), in_order(&b), "the maps iterate alike");
        assert_eq!(fp(&Listed(&a, true)), fp(&Listed(&b, true)));
        assert_eq!(fp(&Listed(&a, false)), fp(&Listed(&b, false)));
        // Sorted as the set itself is, and still told apart by its words.
        assert_eq!(fp(&HandedOver(&small, Handing::Iterated)), fp(&small));
        let mut fewer = small.clone();
        fewer.remove("oak");
        assert_ne!(
            fp(&HandedOver(&fewer, Handing::Mapped)),
            fp(&HandedOver(&small, Handing::Mapped))
        );
    }

    #[test]
    fn sorted_sets_still_tell_their_elements_apart_and_lists_keep_their_order() {
        let set = |items: &[u32]| items.iter().copied().collect::<HashSet<u32>>();
        assert_all_distinct(&[
            fp(&set(&[])),
            fp(&set(&[1])),
            fp(&set(&[1, 2])),
            fp(&set(&[1, 3])),
            fp(&vec![set(&[1]), set(&[2])]),
            fp(&vec![set(&[2]), set(&[1])]),
            fp(&vec![set(&[1, 2])]),
        ]);
        assert_ne!(fp(&[1, 2]), fp(&[2, 1]));
        assert_ne!(fp(&vec!["b", "a"]), fp(&vec!["a", "b"]));
    }

    mod lookalike {
        /// A type of the same name as `std`'s set, in another path.
        #[derive(serde::Serialize)]
        pub(super) struct HashSet<T>(pub(super) Vec<T>);
    }

    /// The names the encoder goes by are the compiler's: a compiler that
    /// spelled them otherwise would fail here, not leave sets unsorted
    /// unnoticed.
    #[test]
    fn unordered_sets_are_known_by_their_types_names_alone() {
        assert!(is_unordered_set::<HashSet<u8>>());
        assert!(is_unordered_set::<Fixed<String>>());
        assert!(is_unordered_set::<hashbrown::HashSet<u8>>());
        assert!(is_unordered_set::<&HashSet<u8>>());
        assert!(is_unordered_set::<&mut &HashSet<u8>>());
        assert!(is_unordered_set::<Box<std::sync::Arc<HashSet<u8>>>>());
        assert!(is_unordered_set::<std::rc::Rc<HashSet<u8>>>());
        assert!(is_unordered_set::<std::borrow::Cow<'static, HashSet<u8>>>());

        assert!(!is_unordered_set::<Vec<HashSet<u8>>>());
        assert!(!is_unordered_set::<Option<HashSet<u8>>>());
        assert!(!is_unordered_set::<std::collections::BTreeSet<u8>>());
        assert!(!is_unordered_set::<HashMap<u8, u8>>());
        assert!(!is_unordered_set::<lookalike::HashSet<u8>>());
        assert!(!is_unordered_set::<Box<[u8]>>());
        assert!(!is_unordered_set::<str>());
        // A `Cow` as a compiler that leaves its erased lifetime out names it.
        let set = "std::collections::hash::set::HashSet<u8>";
        assert!(names_unordered_set(&format!("alloc::borrow::Cow<{set}>")));
        assert!(names_unordered_set(&format!(
            "alloc::borrow::Cow<'_, {set}>"
        )));
        // The lookalike keeps its order.
        assert_ne!(
            fp(&lookalike::HashSet(vec![2, 1])),
            fp(&lookalike::HashSet(vec![1, 2]))
        );
    }

    /// The iterators over a hash set or map, and the adapters that keep
    /// their order, by the names the compiler gives them.
    #[test]
    fn hash_order_iterators_are_known_by_their_types_names_alone() {
        use std::collections::{btree_set, hash_map, hash_set};
        use std::iter::{Cloned, Copied, Map, Skip};
        type Shown = fn(&u8) -> String;
        type Bytes<'a> = std::slice::Iter<'a, u8>;
        assert!(iterates_in_hash_order::<&HashSet<u8>>());
        assert!(iterates_in_hash_order::<&HashMap<u8, u8>>());
        assert!(iterates_in_hash_order::<&hashbrown::HashMap<u8, u8>>());
        assert!(iterates_in_hash_order::<hash_set::Iter<'_, u8>>());
        assert!(iterates_in_hash_order::<hash_set::IntoIter<u8>>());
        assert!(iterates_in_hash_order::<hash_map::Iter<'_, u8, u8>>());
        assert!(iterates_in_hash_order::<hash_map::Keys<'_, u8, u8>>());
        assert!(iterates_in_hash_order::<hash_map::Values<'_, u8, u8>>());
        assert!(iterates_in_hash_order::<hashbrown::hash_set::Iter<'_, u8>>());
        assert!(iterates_in_hash_order::<
            hashbrown::hash_map::Keys<'_, u8, u8>,
        >());
        assert!(iterates_in_hash_order::<Map<hash_set::Iter<'_, u8>, Shown>>());
        assert!(iterates_in_hash_order::<Copied<hash_set::Iter<'_, u8>>>());
        assert!(iterates_in_hash_order::<Cloned<hash_map::Keys<'_, u8, u8>>>());

        assert!(!iterates_in_hash_order::<&Vec<u8>>());
        assert!(!iterates_in_hash_order::<&BTreeMap<u8, u8>>());
        assert!(!iterates_in_hash_order::<Bytes<'_>>());
        assert!(!iterates_in_hash_order::<std::vec::IntoIter<u8>>());
        assert!(!iterates_in_hash_order::<btree_set::Iter<'_, u8>>());
        assert!(!iterates_in_hash_order::<Map<Bytes<'_>, Shown>>());
        // Only adapters that keep every item in its place are looked through.
        assert!(!iterates_in_hash_order::<Skip<hash_set::Iter<'_, u8>>>());
        // A list mapped item by item keeps its order.
        assert_ne!(fp(&MappedList(["b", "a"])), fp(&MappedList(["a", "b"])));
    }

    /// A list handed to `collect_seq` mapped item by item.
    struct MappedList([&'static str; 2]);

    impl Serialize for MappedList {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(self.0.iter().map(|&word| Displayed(word)))
        }
    }

    #[test]
    fn integer_widths_agree() {
        let one = fp(&1u8);
        for other in [
            fp(&1i8),
            fp(&1u16),
            fp(&1i16),
            fp(&1u32),
            fp(&1i32),
            fp(&1u64),
            fp(&1i64),
            fp(&1u128),
            fp(&1i128),
            from_json("1"),
        ] {
            assert_eq!(other, one);
        }
        assert_eq!(fp(&-7i8), fp(&-7i128));
        assert_eq!(fp(&-7i16), from_json("-7"));
        assert_eq!(fp(&u64::MAX), fp(&u128::from(u64::MAX)));
        assert_eq!(fp(&i64::MIN), fp(&i128::from(i64::MIN)));
    }

    #[test]
    fn integer_extremes_are_distinct() {
        assert_all_distinct(&[
            fp(&0u8),
            fp(&1u8),
            fp(&-1i8),
            fp(&i128::MIN),
            fp(&i128::MAX),
            fp(&u128::MAX),
            fp(&(i128::MAX as u128 + 1)),
        ]);
    }

    /// A handler that renders or divides by an amount sees a zero's sign,
    /// and `serde_json` keeps it (`-0` and `-0.0` parse to `-0.0`).
    #[test]
    fn a_zero_keeps_its_sign() {
        assert_ne!(fp(&-0.0f64), fp(&0.0f64));
        assert_ne!(fp(&-0.0f32), fp(&0.0f32));
        assert_eq!(fp(&-0.0f32), fp(&-0.0f64));
        assert_ne!(from_json("-0.0"), from_json("0.0"));
        assert_eq!(from_json("-0"), from_json("-0.0"));
        assert_eq!(from_json("-0e5"), fp(&-0.0f64));
        // Positive zeros encode as they always did, so stored fingerprints
        // of them still match; the values were derived from the encoding
        // documented above.
        let zero = fingerprint("POST /charges", &json!({"amount": 0.0})).unwrap();
        assert_eq!(
            zero.to_hex(),
            "91c6c4add2db054a0f690a7879a89ff347f38e9fb9a3c14977fc9b8619cc1e52"
        );
        let negative = fingerprint("POST /charges", &json!({"amount": -0.0})).unwrap();
        assert_eq!(
            negative.to_hex(),
            "6741d5bcf9f5a796c0803d291517247d59058925658188ca8881798650814f76"
        );
    }

    /// JSON numbers spelled differently match exactly when the handler's
    /// `Value` holds the same number, as its text shows.
    #[test]
    fn json_numbers_match_when_the_parsed_number_is_the_same() {
        let spellings = [
            "0",
            "-0",
            "0.0",
            "-0.0",
            "0e0",
            "1",
            "1.0",
            "1e0",
            "10e-1",
            "-1",
            "18446744073709551615",
            "18446744073709551616",
            "18446744073709551617",
            "-9223372036854775808",
            "-9223372036854775809",
            "1e308",
            "5e-324",
        ];
        // `Value`'s `==` takes `-0.0` for `0.0`; its text does not.
        let as_parsed = |text: &str| serde_json::from_str::<Value>(text).unwrap().to_string();
        for a in spellings {
            for b in spellings {
                let same = as_parsed(a) == as_parsed(b);
                assert_eq!(from_json(a) == from_json(b), same, "{a} and {b}");
            }
        }
    }

    #[test]
    fn floats_are_normalised() {
        assert_eq!(fp(&f64::NAN), fp(&-f64::NAN));
        assert_eq!(fp(&f64::NAN), fp(&f64::from_bits(0x7ff0_0000_0000_0001)));
        assert_eq!(fp(&f32::NAN), fp(&f64::NAN));
        assert_eq!(fp(&1.5f32), fp(&1.5f64));
        assert_eq!(fp(&2.5f64), from_json("2.5"));
        assert_all_distinct(&[
            fp(&0.0f64),
            fp(&-0.0f64),
            fp(&f64::NAN),
            fp(&f64::INFINITY),
            fp(&f64::NEG_INFINITY),
            fp(&1.0f64),
            fp(&f64::MIN_POSITIVE),
        ]);
    }

    #[derive(Serialize)]
    struct Meters(u32);

    #[derive(Serialize)]
    struct Marker;

    #[derive(Serialize)]
    struct Pair(i32, String);

    #[test]
    fn newtype_unit_and_tuple_structs_follow_serde_json() {
        assert_eq!(fp(&Meters(5)), fp(&5u32));
        assert_eq!(fp(&Marker), fp(&()));
        assert_eq!(fp(&Pair(1, "a".into())), from_json(r#"[1,"a"]"#));
        assert_eq!(fp(&(1, "a")), from_json(r#"[1,"a"]"#));
        assert_eq!(fp(&[1, 2, 3]), fp(&vec![1u64, 2, 3]));
        assert_eq!(fp(&'é'), fp("é"));
        assert_eq!(fp(&String::from("x")), fp("x"));
    }

    // ----- non-collision -----

    #[test]
    fn string_is_not_number() {
        assert_ne!(fp("1"), fp(&1));
        assert_ne!(from_json(r#""1""#), from_json("1"));
    }

    #[test]
    fn nesting_is_not_flattened() {
        assert_ne!(from_json("[1,2]"), from_json("[[1],2]"));
        assert_ne!(from_json("[[1,2]]"), from_json("[[1],[2]]"));
        assert_ne!(from_json("[[],[]]"), from_json("[[[]]]"));
        assert_ne!(from_json(r#"{"a":{"b":1}}"#), from_json(r#"{"a":1,"b":1}"#));
    }

    #[test]
    fn strings_are_length_prefixed() {
        assert_ne!(fp(&["ab"]), fp(&["a", "b"]));
        assert_ne!(fp(&["a", ""]), fp(&["", "a"]));
        assert_ne!(fp(&("ab", "c")), fp(&("a", "bc")));
        assert_ne!(from_json(r#"{"ab":"c"}"#), from_json(r#"{"a":"bc"}"#));
    }

    #[derive(Serialize)]
    struct WithOptional {
        id: u32,
        note: Option<String>,
    }

    #[derive(Serialize)]
    struct Skipping {
        id: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    }

    /// The payload type of a later release, with an optional field more.
    #[derive(Serialize)]
    struct WithTwoOptional {
        id: u32,
        note: Option<String>,
        memo: Option<String>,
    }

    #[test]
    fn a_none_field_counts_as_absent() {
        let present_none = fp(&WithOptional { id: 1, note: None });
        let absent = fp(&Skipping { id: 1, note: None });
        assert_eq!(present_none, absent);
        assert_eq!(absent, from_json(r#"{"id":1}"#));
        let later = WithTwoOptional {
            id: 1,
            note: Some("a".into()),
            memo: None,
        };
        let earlier = WithOptional {
            id: 1,
            note: Some("a".into()),
        };
        assert_eq!(fp(&later), fp(&earlier));
        let sent = WithTwoOptional {
            memo: Some(String::new()),
            ..later
        };
        assert_ne!(fp(&sent), fp(&earlier));
    }

    #[test]
    fn option_types_are_named_as_expected() {
        assert!(std::any::type_name::<Option<String>>().starts_with(OPTION));
        assert!(is_option::<Option<Option<u8>>>());
        assert!(!is_option::<Vec<Option<u8>>>());
    }

    /// A field that is left out to keep a value and `null` to clear it:
    /// `serde_with`'s double option, written out.
    #[derive(Serialize)]
    struct Patch {
        #[serde(
            skip_serializing_if = "Option::is_none",
            serialize_with = "double_option"
        )]
        nickname: Option<Option<String>>,
    }

    fn double_option<S: Serializer>(
        value: &Option<Option<String>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            None => serializer.serialize_unit(),
            Some(None) => serializer.serialize_none(),
            Some(Some(name)) => serializer.serialize_some(name),
        }
    }

    #[test]
    fn a_field_written_as_none_by_its_own_serializer_stays() {
        let keep = fp(&Patch { nickname: None });
        let clear = fp(&Patch {
            nickname: Some(None),
        });
        assert_ne!(keep, clear);
    }

    #[test]
    fn a_map_entry_of_none_stays() {
        let with_none = BTreeMap::from([("id", None), ("note", Some(1))]);
        assert_ne!(fp(&with_none), fp(&BTreeMap::from([("note", Some(1))])));
    }

    #[test]
    fn empty_shapes_are_distinct() {
        assert_all_distinct(&[
            from_json("[]"),
            from_json("{}"),
            from_json("null"),
            from_json(r#""""#),
            fp(&None::<()>),
            fp(&Some(())),
            fp(&RawBytes(&[])),
            from_json("0"),
            from_json("false"),
        ]);
    }

    #[test]
    fn unit_none_and_some_are_distinct() {
        assert_ne!(fp(&()), fp(&None::<()>));
        assert_ne!(fp(&None::<Option<u8>>), fp(&Some(None::<u8>)));
        // `Some` is tagged; see the module docs.
        assert_ne!(fp(&Some(1)), fp(&1));
    }

    #[test]
    fn bool_is_not_integer() {
        assert_ne!(fp(&true), fp(&1));
        assert_ne!(fp(&false), fp(&0));
        assert_ne!(fp(&true), fp(&false));
    }

    #[test]
    fn float_is_not_integer() {
        assert_ne!(fp(&1.0f64), fp(&1));
        assert_ne!(fp(&0.0f64), fp(&0));
        assert_ne!(from_json("1.0"), from_json("1"));
    }

    #[test]
    fn bytes_differ_from_integer_sequence_and_string() {
        assert_ne!(fp(&RawBytes(&[1, 2])), fp(&[1u8, 2]));
        assert_ne!(fp(&RawBytes(b"ab")), fp("ab"));
    }

    /// A body extractor's rejection of a body that failed while it was read
    /// is no input at all; a malformed body, or one over a size limit, is
    /// fingerprinted by the fact of its rejection.
    #[tokio::test]
    async fn only_a_body_that_failed_while_read_is_no_input() {
        use axum::body::Body;
        use axum::extract::{FromRequest, Request};

        let failing = |content_type: &str| {
            let reset = std::io::Error::other("the connection broke");
            let stream = futures_util::stream::iter([Err::<bytes::Bytes, _>(reset)]);
            let mut request = Request::new(Body::from_stream(stream));
            // A `GET` form is read from the query, not the body.
            *request.method_mut() = http::Method::POST;
            let value = http::HeaderValue::from_str(content_type).unwrap();
            request
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, value);
            request
        };
        let json = "application/json";
        let form = "application/x-www-form-urlencoded";
        let outcome = |input: &dyn FingerprintInput| {
            input
                .fingerprint_into(&mut Fingerprinter::new("e"))
                .map_err(|error| matches!(error, FingerprintError::UnreadBody))
        };
        let unread = [
            outcome(&String::from_request(failing(json), &()).await),
            outcome(&bytes::Bytes::from_request(failing(json), &()).await),
            outcome(&axum::Json::<u32>::from_request(failing(json), &()).await),
            outcome(
                &axum::Form::<BTreeMap<String, String>>::from_request(failing(form), &()).await,
            ),
            outcome(&axum::extract::RawForm::from_request(failing(form), &()).await),
        ];
        assert_eq!(unread, [Err(true); 5]);
        #[cfg(feature = "axum-extra")]
        {
            use axum_extra::extract::Form;
            let extra = Form::<BTreeMap<String, String>>::from_request(failing(form), &()).await;
            assert_eq!(outcome(&extra), Err(true));
        }

        let mut malformed = Request::new(Body::from("not json"));
        let value = http::HeaderValue::from_static("application/json");
        malformed
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
        let limited = http_body_util::Limited::new(Body::from("12345"), 2);
        let over_limit = Request::new(Body::new(limited));
        let rejected = [
            outcome(&axum::Json::<u32>::from_request(malformed, &()).await),
            outcome(&String::from_request(over_limit, &()).await),
        ];
        assert_eq!(rejected, [Ok(()), Ok(())]);
    }

    fn input_fp(input: &dyn FingerprintInput) -> Fingerprint {
        let mut fingerprinter = Fingerprinter::new("e");
        input.fingerprint_into(&mut fingerprinter).unwrap();
        fingerprinter.finish()
    }

    #[test]
    fn a_raw_query_tells_no_query_from_an_empty_one() {
        use axum::extract::RawQuery;
        assert_ne!(
            input_fp(&RawQuery(None)),
            input_fp(&RawQuery(Some(String::new())))
        );
    }

    /// Moving a handler between axum's extractor and axum-extra's keeps
    /// the fingerprints already stored, and the wrappers add nothing.
    #[cfg(feature = "axum-extra")]
    #[test]
    fn axum_extra_extractors_fingerprint_as_their_axum_counterparts() {
        use axum_extra::extract::{Cached, OptionalQuery, WithRejection};
        let map = || BTreeMap::from([("a", vec![1, 2])]);
        let query = input_fp(&axum::extract::Query(map()));
        assert_eq!(input_fp(&axum_extra::extract::Query(map())), query);
        assert_eq!(
            input_fp(&axum_extra::extract::Form(map())),
            input_fp(&axum::Form(map()))
        );
        assert_eq!(
            input_fp(&OptionalQuery(Some(map()))),
            input_fp(&Some(axum::extract::Query(map())))
        );
        assert_eq!(
            input_fp(&OptionalQuery::<u8>(None)),
            input_fp(&None::<axum::extract::Query<u8>>)
        );
        let with_rejection = WithRejection::<_, ()>(axum::Json(map()), std::marker::PhantomData);
        assert_eq!(input_fp(&with_rejection), input_fp(&axum::Json(map())));
        assert_eq!(input_fp(&Cached(axum::extract::Query(map()))), query);
    }

    #[test]
    fn integer_keys_are_not_stringified() {
        assert_ne!(
            fp(&BTreeMap::from([(1, true)])),
            fp(&BTreeMap::from([("1", true)]))
        );
    }

    #[derive(Serialize)]
    enum Shape {
        Dot,
        Circle(u32),
        Rect(u32, u32),
        Sized { w: u32, h: u32 },
    }

    #[derive(Serialize)]
    enum Other {
        Dot,
    }

    #[test]
    fn enum_variants_are_distinct_from_each_other_and_from_plain_values() {
        assert_all_distinct(&[
            fp(&Shape::Dot),
            fp(&Shape::Circle(1)),
            fp(&Shape::Circle(2)),
            fp(&Shape::Rect(1, 2)),
            fp(&Shape::Sized { w: 1, h: 2 }),
            fp("Dot"),
            fp(&1u32),
            fp(&[1u32, 2]),
            from_json(r#"{"w":1,"h":2}"#),
            from_json(r#"{"Sized":{"w":1,"h":2}}"#),
        ]);
    }

    #[test]
    fn enum_encoding_uses_variant_name_only() {
        // The variant name, not the index or the enum's name, identifies it.
        assert_eq!(fp(&Shape::Dot), fp(&Other::Dot));
    }

    #[test]
    fn a_negative_integer_is_not_its_twos_complement() {
        assert_all_distinct(&[fp(&-1i64), fp(&u64::MAX), fp(&u128::MAX)]);
        assert_ne!(fp(&i64::MIN), fp(&(1u64 << 63)));
        assert_ne!(fp(&i128::MIN), fp(&(1u128 << 127)));
        assert_ne!(fp(&-1i8), fp(&u8::MAX));
    }

    #[derive(Serialize)]
    enum First {
        Zero,
        One(u8),
    }

    #[derive(Serialize)]
    enum Second {
        Nought,
        One,
    }

    #[test]
    fn variants_of_one_index_in_two_enums_are_told_apart_by_name() {
        assert_ne!(fp(&First::Zero), fp(&Second::Nought));
        assert_ne!(fp(&First::One(0)), fp(&Second::One));
        assert_ne!(fp(&Second::One), fp("One"));
    }

    /// Content that holds the encoding's own tags, lengths and end marker
    /// stays inside its length prefix.
    #[test]
    fn tag_and_length_bytes_inside_content_do_not_escape() {
        let end_and_string_tag = [SEQ_END, STRING];
        let length_of_one = len_bytes(1);
        assert_all_distinct(&[
            fp(&[RawBytes(&end_and_string_tag), RawBytes(&[])]),
            fp(&[RawBytes(&[SEQ_END])]),
            fp(&[RawBytes(&[SEQ_END, STRING, SEQ_END])]),
            fp(&(RawBytes(&length_of_one), RawBytes(b"a"))),
            fp(&(
                RawBytes(&[]),
                RawBytes(&[length_of_one.as_slice(), b"a"].concat()),
            )),
            fp(&("\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{1}a", "")),
            fp(&("", "\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{0}\u{1}a")),
        ]);
    }

    /// A sequence whose length serde does not know up front.
    struct Unsized(u8);

    impl Serialize for Unsized {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_seq((0..self.0).filter(|_| true))
        }
    }

    /// A value written through `collect_str`, as `Display` types are.
    struct Displayed(&'static str);

    impl Serialize for Displayed {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_str(self.0)
        }
    }

    #[test]
    fn unsized_sequences_and_collected_strings_match_their_plain_forms() {
        assert_eq!(fp(&Unsized(3)), fp(&[0u8, 1, 2]));
        assert_ne!(fp(&Unsized(3)), fp(&[0u8, 1]));
        assert_eq!(fp(&[Unsized(0), Unsized(1)]), from_json("[[],[0]]"));
        assert_eq!(fp(&Displayed("12")), fp("12"));
        assert_ne!(fp(&Displayed("12")), fp(&12));
    }

    /// A map that writes the given entries as they are, repeats included.
    struct Entries(Vec<(Value, u8)>);

    impl Serialize for Entries {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_map(self.0.iter().map(|(key, value)| (key, value)))
        }
    }

    #[test]
    fn map_entries_sort_by_their_encoding_whatever_the_key_type() {
        let entries = |pairs: &[(Value, u8)]| fp(&Entries(pairs.to_vec()));
        // Repeated keys: sorted by value too, so the writing order is lost
        // but no entry is.
        assert_eq!(
            entries(&[(json!("k"), 1), (json!("k"), 2)]),
            entries(&[(json!("k"), 2), (json!("k"), 1)])
        );
        assert_ne!(
            entries(&[(json!("k"), 1), (json!("k"), 1)]),
            entries(&[(json!("k"), 1)])
        );
        // Keys of any type, in any order.
        let keys = [
            json!(null),
            json!(-1),
            json!(1),
            json!(1.0),
            json!("1"),
            json!([1]),
            json!({"1": 1}),
        ];
        let forward: Vec<(Value, u8)> = keys.iter().cloned().zip(0..).collect();
        let mut backward = forward.clone();
        backward.reverse();
        assert_eq!(entries(&forward), entries(&backward));
        let tuple_keys: HashMap<(u8, String), u8> =
            (0..50).map(|i| ((i % 7, i.to_string()), i)).collect();
        let sorted: BTreeMap<_, _> = tuple_keys.clone().into_iter().collect();
        assert_eq!(fp(&tuple_keys), fp(&sorted));
    }

    #[derive(Serialize, serde::Deserialize)]
    struct Flattened {
        id: u32,
        #[serde(flatten)]
        extra: BTreeMap<String, Value>,
    }

    #[derive(Serialize, serde::Deserialize)]
    #[serde(tag = "type")]
    enum Internally {
        Card { last4: String },
        Bank { last4: String },
        Cash,
    }

    #[derive(Serialize, serde::Deserialize)]
    #[serde(tag = "t", content = "c")]
    enum Adjacently {
        Card(String),
        Bank(String),
    }

    #[derive(Serialize, serde::Deserialize)]
    #[serde(untagged)]
    enum Untagged {
        Number(u64),
        Text(String),
        Pair(u64, u64),
    }

    /// Flattened, internally tagged and untagged values write what their
    /// JSON reads. (An adjacent tag is written as a unit variant, which
    /// differs from its JSON string but is the same for every request.)
    #[test]
    fn serde_representations_fingerprint_as_their_json() {
        let same = |value: &dyn erased::Fingerprinted, text: &str| {
            assert_eq!(value.fingerprint(), from_json(text), "{text}");
        };
        same(
            &Flattened {
                id: 1,
                extra: BTreeMap::from([("note".into(), json!("x"))]),
            },
            r#"{"note":"x","id":1}"#,
        );
        same(
            &Internally::Card {
                last4: "4242".into(),
            },
            r#"{"type":"Card","last4":"4242"}"#,
        );
        same(&Internally::Cash, r#"{"type":"Cash"}"#);
        same(&Untagged::Number(1), "1");
        same(&Untagged::Text("1".into()), r#""1""#);
        same(&Untagged::Pair(1, 2), "[1,2]");
        assert_all_distinct(&[
            fp(&Internally::Card {
                last4: "4242".into(),
            }),
            fp(&Internally::Bank {
                last4: "4242".into(),
            }),
            fp(&Internally::Cash),
            fp(&Adjacently::Card("4242".into())),
            fp(&Adjacently::Bank("4242".into())),
            fp(&Flattened {
                id: 1,
                extra: BTreeMap::new(),
            }),
            fp(&Flattened {
                id: 1,
                extra: BTreeMap::from([("id2".into(), json!(null))]),
            }),
        ]);
    }

    /// `dyn`-compatible fingerprinting, for tables of values of mixed types.
    mod erased {
        pub(super) trait Fingerprinted {
            fn fingerprint(&self) -> super::Fingerprint;
        }

        impl<T: serde::Serialize> Fingerprinted for T {
            fn fingerprint(&self) -> super::Fingerprint {
                super::fp(self)
            }
        }
    }

    // ----- errors -----

    struct Failing;

    impl Serialize for Failing {
        fn serialize<S: Serializer>(&self, _serializer: S) -> Result<S::Ok, S::Error> {
            Err(S::Error::custom("card number is not serializable"))
        }
    }

    #[derive(Serialize)]
    struct Holder {
        ok: u8,
        bad: Vec<Failing>,
    }

    fn assert_fails_with_message<T: Serialize + ?Sized>(value: &T) {
        match fingerprint("POST /pay", value) {
            Err(FingerprintError::Serialize(msg)) => {
                assert_eq!(msg, "card number is not serializable");
            }
            other => panic!("expected a serialization error, got {other:?}"),
        }
    }

    #[test]
    fn serialize_errors_surface_with_their_message() {
        assert_fails_with_message(&Failing);
        assert_fails_with_message(&Holder {
            ok: 1,
            bad: vec![Failing],
        });
        assert_fails_with_message(&[Some(Failing)]);
    }

    /// Map buffers are kept per thread and reused: a map that failed
    /// half-way, on this thread, must leave nothing in them for the next.
    #[test]
    fn reused_map_buffers_start_empty() {
        let value = json!({"outer": {"b": [1, 2], "a": {"c": null}}, "z": "last"});
        let fresh = std::thread::spawn({
            let value = value.clone();
            move || fp(&value)
        })
        .join()
        .expect("the fingerprinting thread");
        assert_fails_with_message(&Holder {
            ok: 1,
            bad: vec![Failing],
        });
        assert_fails_with_message(&FailingKey);
        assert_eq!(fp(&value), fresh);
        assert_eq!(fp(&value), fresh);
    }

    struct FailingKey;

    impl Serialize for FailingKey {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(Some(1))?;
            map.serialize_entry(&Failing, &1)?;
            map.end()
        }
    }

    #[test]
    fn failing_map_key_surfaces_its_message() {
        assert_fails_with_message(&FailingKey);
    }

    struct ValueWithoutKey;

    impl Serialize for ValueWithoutKey {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(None)?;
            map.serialize_value(&1)?;
            map.end()
        }
    }

    struct KeyWithoutValue;

    impl Serialize for KeyWithoutValue {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(None)?;
            map.serialize_key("k")?;
            map.end()
        }
    }

    #[test]
    fn map_protocol_misuse_is_an_error_not_a_panic() {
        assert!(matches!(
            fingerprint("e", &ValueWithoutKey),
            Err(FingerprintError::Serialize(_))
        ));
        assert!(matches!(
            fingerprint("e", &KeyWithoutValue),
            Err(FingerprintError::Serialize(_))
        ));
    }

    #[test]
    fn failed_input_leaves_the_builder_unchanged() {
        let mut builder = Fingerprinter::new("e");
        builder.input(&1).unwrap();
        assert!(builder.input(&Failing).is_err());
        builder.input(&2).unwrap();
        let mut clean = Fingerprinter::new("e");
        clean.input(&1).unwrap().input(&2).unwrap();
        assert_eq!(builder.finish(), clean.finish());
    }

    // ----- builder framing -----

    fn inputs(endpoint: &str, values: &[&str]) -> Fingerprint {
        let mut builder = Fingerprinter::new(endpoint);
        for value in values {
            builder.input(*value).unwrap();
        }
        builder.finish()
    }

    #[test]
    fn inputs_are_framed_and_ordered() {
        assert_all_distinct(&[
            inputs("e", &["a", "b"]),
            inputs("e", &["ab"]),
            inputs("e", &["b", "a"]),
            inputs("e", &["a", "b", ""]),
            inputs("e", &[]),
            inputs("ea", &[]),
        ]);
    }

    #[test]
    fn one_shot_matches_builder() {
        let mut builder = Fingerprinter::new("e");
        builder.input(&json!({"a": 1})).unwrap();
        assert_eq!(
            builder.finish(),
            fingerprint("e", &json!({"a": 1})).unwrap()
        );
    }

    #[test]
    fn endpoint_name_separates_domains() {
        assert_ne!(
            fingerprint("POST /a", &1).unwrap(),
            fingerprint("POST /b", &1).unwrap()
        );
        assert_ne!(inputs("a", &["b"]), inputs("ab", &[]));
    }

    // ----- FingerprintInput -----

    fn contribution<T: FingerprintInput>(argument: &T) -> Fingerprint {
        let mut builder = Fingerprinter::new("e");
        argument.fingerprint_into(&mut builder).unwrap();
        builder.finish()
    }

    #[test]
    fn extractors_contribute_their_inner_value() {
        let body = json!({"qty": 2});
        let expected = fingerprint("e", &body).unwrap();
        assert_eq!(contribution(&axum::Json(body.clone())), expected);
        assert_eq!(contribution(&axum::Form(body.clone())), expected);
        assert_eq!(contribution(&axum::extract::Query(body.clone())), expected);
        assert_eq!(contribution(&axum::extract::Path(body)), expected);
    }

    #[test]
    fn string_and_bytes_inputs() {
        let text = contribution(&String::from("hello"));
        assert_eq!(text, fingerprint("e", "hello").unwrap());
        let raw = contribution(&bytes::Bytes::from_static(b"hello"));
        assert_eq!(raw, fingerprint("e", &RawBytes(b"hello")).unwrap());
        assert_ne!(text, raw);
    }

    #[test]
    fn optional_inputs_keep_none_and_some_apart() {
        assert_all_distinct(&[
            contribution(&None::<axum::Json<Option<u8>>>),
            contribution(&Some(axum::Json(None::<u8>))),
            contribution(&Some(axum::Json(Some(0u8)))),
            contribution(&axum::Json(None::<u8>)),
        ]);
    }

    // ----- depth -----

    /// JSON nested `depth` deep, objects and arrays in turn.
    fn nested(depth: usize) -> String {
        let level = |i: usize| {
            if i.is_multiple_of(2) {
                ("{\"a\":", "}")
            } else {
                ("[", "]")
            }
        };
        let open: String = (0..depth).map(|i| level(i).0).collect();
        let close: String = (0..depth).rev().map(|i| level(i).1).collect();
        format!("{open}1{close}")
    }

    /// serde_json refuses input nested deeper than 128, so that is as deep
    /// as a request body gets. The encoder recurses once per level: the
    /// deepest body must fingerprint well within a quarter of the 2 MiB
    /// stack a Tokio worker has, unoptimized builds included.
    #[test]
    fn the_deepest_json_body_fingerprints_on_a_small_stack() {
        let deepest = (1..=200)
            .take_while(|&depth| serde_json::from_str::<Value>(&nested(depth)).is_ok())
            .last()
            .expect("shallow JSON parses");
        assert!(deepest < 200, "serde_json limits nesting");
        let value: Value = serde_json::from_str(&nested(deepest)).expect("within the limit");
        let expected = fp(&value);
        let on_small_stack = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || fp(&value))
            .expect("a thread")
            .join()
            .expect("no overflow");
        assert_eq!(on_small_stack, expected);
    }

    #[derive(Serialize, serde::Deserialize)]
    #[serde(tag = "kind")]
    enum Tree {
        Leaf,
        Node { child: Box<Tree> },
    }

    #[derive(Serialize, serde::Deserialize)]
    struct Layer {
        id: u32,
        #[serde(flatten)]
        rest: LayerRest,
    }

    #[derive(Serialize, serde::Deserialize)]
    struct LayerRest {
        #[serde(default)]
        below: Option<Box<Layer>>,
        #[serde(flatten)]
        other: BTreeMap<String, Value>,
    }

    /// The deepest body of `T` (`open` repeated, `leaf`, `close` repeated)
    /// that `serde_json` parses, fingerprinted on `stack` bytes of stack.
    fn fingerprint_deepest<T>(open: &str, leaf: &str, close: &str, stack: usize) -> usize
    where
        T: Serialize + serde::de::DeserializeOwned + Send + 'static,
    {
        let body = |depth: usize| format!("{}{leaf}{}", open.repeat(depth), close.repeat(depth));
        let deepest = (1..=200)
            .take_while(|&depth| serde_json::from_str::<T>(&body(depth)).is_ok())
            .last()
            .expect("shallow bodies parse");
        let value: T = serde_json::from_str(&body(deepest)).expect("within the limit");
        std::thread::Builder::new()
            .stack_size(stack)
            .spawn(move || fp(&value))
            .expect("a thread")
            .join()
            .expect("no overflow");
        deepest
    }

    /// Internal tags and `flatten` buffer and re-enter serde at every
    /// level, on both sides: their deepest bodies also fingerprint well
    /// within a Tokio worker's stack.
    #[test]
    fn the_deepest_tagged_and_flattened_bodies_fingerprint_on_a_small_stack() {
        let stack = 512 * 1024;
        let tagged = fingerprint_deepest::<Tree>(
            r#"{"kind":"Node","child":"#,
            r#"{"kind":"Leaf"}"#,
            "}",
            stack,
        );
        let flattened =
            fingerprint_deepest::<Layer>(r#"{"id":1,"below":"#, r#"{"id":2}"#, "}", stack);
        assert!(tagged > 100 && flattened > 100, "{tagged} {flattened}");
    }

    // ----- properties -----

    /// JSON trees with the given leaves, bounded in depth and size.
    fn json_tree(leaf: BoxedStrategy<Value>, key: &'static str) -> impl Strategy<Value = Value> {
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key, inner, 0..6)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            ".{0,8}".prop_map(Value::String),
        ];
        json_tree(leaf.boxed(), ".{0,6}")
    }

    /// Few distinct leaves and keys, so equal and near-equal pairs are common.
    fn small_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-2i64..=2).prop_map(Value::from),
            "[ab]{0,2}".prop_map(Value::String),
        ];
        json_tree(leaf.boxed(), "[ab]{0,2}")
    }

    /// Floats, the ones that compare oddly (signed zeros, NaNs with any
    /// sign and payload, infinities, subnormals) often.
    fn any_f64() -> impl Strategy<Value = f64> {
        let special = prop::sample::select(vec![
            0.0,
            -0.0,
            f64::NAN,
            -f64::NAN,
            f64::from_bits(0x7ff0_0000_0000_0001),
            f64::from_bits(0xfff8_dead_beef_0001),
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
            f64::from_bits(1),
            1.0,
        ]);
        prop_oneof![special, any::<u64>().prop_map(f64::from_bits)]
    }

    /// A copy whose objects were filled in reverse key order.
    fn reinserted_in_reverse(value: &Value) -> Value {
        match value {
            Value::Array(items) => Value::Array(items.iter().map(reinserted_in_reverse).collect()),
            Value::Object(entries) => {
                let mut copy = Map::new();
                for (key, item) in entries.iter().rev() {
                    copy.insert(key.clone(), reinserted_in_reverse(item));
                }
                Value::Object(copy)
            }
            other => other.clone(),
        }
    }

    /// Serializes objects in reverse key order, whatever order `Map` keeps.
    struct Reversed<'a>(&'a Value);

    impl Serialize for Reversed<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            match self.0 {
                Value::Array(items) => serializer.collect_seq(items.iter().map(Reversed)),
                Value::Object(entries) => {
                    serializer.collect_map(entries.iter().rev().map(|(k, v)| (k, Reversed(v))))
                }
                other => other.serialize(serializer),
            }
        }
    }

    proptest! {
        #[test]
        fn equal_json_gives_equal_fingerprints(value in any_json()) {
            let expected = fp(&value);
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            let reparsed: Value = serde_json::from_str(&pretty).unwrap();
            prop_assert_eq!(fp(&reparsed), expected);
            prop_assert_eq!(fp(&reinserted_in_reverse(&value)), expected);
            prop_assert_eq!(fp(&Reversed(&value)), expected);
        }

        #[test]
        fn floats_match_exactly_when_the_handler_sees_the_same(a in any_f64(), b in any_f64()) {
            let same = a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
            prop_assert_eq!(fp(&a) == fp(&b), same);
            prop_assert_eq!(fp(&BTreeMap::from([("x", a)])) == fp(&HashMap::from([("x", b)])), same);
        }

        #[test]
        fn fingerprints_are_equal_exactly_when_values_are(a in small_json(), b in small_json()) {
            prop_assert_eq!(a == b, fp(&a) == fp(&b));
        }

        #[test]
        fn distinct_endpoints_give_distinct_fingerprints(
            value in any_json(),
            first in ".{0,12}",
            second in ".{0,12}",
        ) {
            prop_assume!(first != second);
            prop_assert_ne!(fingerprint(&first, &value).unwrap(), fingerprint(&second, &value).unwrap());
        }
    }
}
