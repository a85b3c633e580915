//! Whose key it is.
//!
//! Two callers who happen to pick the same `Idempotency-Key` must not see each
//! other's responses, so every record is addressed by a scope as well as the
//! key. Only a SHA-256 digest of the credential that names the scope is ever
//! stored or logged.

use std::fmt;
use std::sync::LazyLock;

use http::HeaderMap;
use http::header::AUTHORIZATION;

use crate::digest::{hex, sha256_framed};
use crate::field::{Repeated, at_most_once, trim_ows};

/// How an endpoint tells callers apart.
///
/// Two `Scope`s are equal when they name the same key space: header
/// names are compared, and hashed, in any case.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Scope {
    /// The caller's API key: the configured API-key header (`X-Api-Key` by
    /// default), or else the `Authorization` header's `Bearer` token or
    /// `Basic` credentials (Stripe-style clients send the key as the Basic
    /// user name: `curl -u sk_live_...:`). A request with none is answered
    /// 401, as is one whose `Basic` credentials have neither a user name
    /// nor a password (`curl -u :`), which would name one caller for all
    /// who send them.
    ApiKey,
    /// One key space for every caller. Only for endpoints whose callers are
    /// trusted to pick unique keys.
    Global,
    /// The value of the named header, e.g. a tenant id set by a gateway:
    /// the attribute's `scope = "header:x-tenant-id"` is
    /// `Scope::Header("x-tenant-id")`. A request without it, with it blank,
    /// or with it more than once, is answered 400 (`invalid-scope`).
    ///
    /// The name is taken in any case, as the header is found in any case:
    /// `Scope::Header("X-Tenant-Id")` and the attribute's
    /// `scope = "header:X-Tenant-Id"` name the same scope, so a handler
    /// moved off the attribute replays what the attribute stored.
    Header(&'static str),
    /// A value the handler supplies: an extracted principal implementing
    /// [`IdempotencyScope`].
    Custom,
}

impl PartialEq for Scope {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Header(a), Self::Header(b)) => a.eq_ignore_ascii_case(b),
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }
}

impl Eq for Scope {}

impl std::hash::Hash for Scope {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        if let Self::Header(name) = self {
            // As `eq` compares them: in any case.
            for byte in name.bytes() {
                state.write_u8(byte.to_ascii_lowercase());
            }
            // Ends the name, as `str`'s own hash does.
            state.write_u8(0xff);
        }
    }
}

/// A caller identity the handler extracts itself, typically the
/// authenticated principal.
///
/// ```
/// use idempotent_core::IdempotencyScope;
///
/// struct Tenant { id: u64 }
///
/// impl IdempotencyScope for Tenant {
///     fn scope_id(&self) -> impl AsRef<[u8]> {
///         self.id.to_be_bytes()
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot scope idempotency keys",
    label = "this type is used as the scope of idempotency keys",
    note = "implement `idempotent_core::IdempotencyScope` for it, returning the caller's stable id from `scope_id`; or give `#[idempotent]` a named scope instead: `scope = \"api_key\"`, `\"global\"` or `\"header:<name>\"`"
)]
pub trait IdempotencyScope {
    /// Bytes that identify the caller. Equal bytes share one key space.
    /// Empty bytes name no caller: a keyed request whose principal has
    /// them is refused (400 `invalid-scope`), nothing executed.
    fn scope_id(&self) -> impl AsRef<[u8]>;
}

/// A principal an auth middleware left in the request's extensions:
/// `scope = User` takes an `Extension<User>` argument as the principal,
/// and `scope = Extension<User>` extracts one.
impl<P: IdempotencyScope> IdempotencyScope for axum::Extension<P> {
    fn scope_id(&self) -> impl AsRef<[u8]> {
        self.0.scope_id()
    }
}

/// The SHA-256 of a scope's credential: what stores keep instead of it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeDigest([u8; 32]);

impl ScopeDigest {
    /// Wraps a digest read back from a store.
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The scope shared by every caller.
    #[must_use]
    pub fn global() -> Self {
        // Hashed once: a global-scope endpoint asks for it on every request.
        static GLOBAL: LazyLock<ScopeDigest> =
            LazyLock::new(|| ScopeDigest(sha256_framed(&[b"global"])));
        *GLOBAL
    }

    /// The scope of an API key or bearer token.
    #[must_use]
    pub fn api_key(credential: &[u8]) -> Self {
        Self(sha256_framed(&[b"api_key", credential]))
    }

    /// The scope of `Authorization: Basic` credentials, base64-encoded
    /// with padding (or as sent, when they are not base64). Apart from
    /// API keys, so that a bearer token equal to another caller's encoded
    /// credentials names a caller of its own.
    fn basic(credentials: &[u8]) -> Self {
        Self(sha256_framed(&[b"basic", credentials]))
    }

    /// The scope named by a header's value. Header names are not case
    /// sensitive, so `name` is taken in lowercase: `X-Tenant-Id` and
    /// `x-tenant-id` name one scope, as they name one header.
    #[must_use]
    pub fn header(name: &str, value: &[u8]) -> Self {
        let name = if name.bytes().any(|byte| byte.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(name.to_ascii_lowercase())
        } else {
            std::borrow::Cow::Borrowed(name)
        };
        Self(sha256_framed(&[b"header", name.as_bytes(), value]))
    }

    /// The scope of a user-supplied principal.
    #[must_use]
    pub fn custom(principal: &impl IdempotencyScope) -> Self {
        Self::custom_id(principal.scope_id().as_ref())
    }

    fn custom_id(id: &[u8]) -> Self {
        Self(sha256_framed(&[b"custom", id]))
    }
}

impl fmt::Debug for ScopeDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScopeDigest({})", hex(&self.0[..8]))
    }
}

/// The request does not name one scope for its endpoint: the credential
/// is missing (401, with a `Bearer` challenge, for the API-key scope), the
/// scope's header is missing or sent more than once, or the principal's
/// id is empty (400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct MissingCredential {
    pub(crate) detail: String,
    /// Whether an `Authorization: Bearer` token would have done: the 401
    /// then challenges for one. Otherwise the header that names the scope
    /// is missing or repeated, or the principal's id is empty (400).
    pub(crate) bearer: bool,
}

/// The one value of `name` in `headers`, without the spaces and tabs
/// around it: `Ok(None)` when there is none or it is blank, an error when
/// there are several, since two values would let a client that adds its
/// own beside a gateway's choose the scope.
///
/// The padding is not part of a field's value (RFC 9110 section 5.5), and
/// hyper's HTTP/1 parser drops it while HTTP/2 keeps it: kept, `k1 ` would be
/// a caller apart from `k1`, and a blank API-key header one caller shared
/// by everyone who sends it, ahead of their own `Authorization`.
fn single<N>(headers: &HeaderMap, name: N) -> Result<Option<&[u8]>, MissingCredential>
where
    N: http::header::AsHeaderName + Copy + fmt::Display,
{
    let value = at_most_once(headers, name).map_err(|Repeated| MissingCredential {
        detail: format!(
            "the `{name}` header, which scopes idempotency keys, was sent more than once: send it once"
        ),
        bearer: false,
    })?;
    Ok(value
        .map(|value| trim_ows(value.as_bytes()).1)
        .filter(|value| !value.is_empty()))
}

/// The scope of the principal a handler supplied. An empty id is refused
/// rather than hashed: it names no caller, and every principal without one
/// (a guest, a `Default` value) would share one key space, each replayed
/// the others' responses.
pub(crate) fn principal(
    principal: &impl IdempotencyScope,
) -> Result<ScopeDigest, MissingCredential> {
    let id = principal.scope_id();
    if id.as_ref().is_empty() {
        return Err(MissingCredential {
            detail: "this endpoint scopes idempotency keys by the authenticated principal, and the request's principal has an empty id: it names no caller".to_owned(),
            bearer: false,
        });
    }
    Ok(ScopeDigest::custom_id(id.as_ref()))
}

/// Resolves a built-in scope from request headers. `Ok(None)` for
/// [`Scope::Custom`], which the handler resolves.
pub(crate) fn resolve(
    scope: Scope,
    headers: &HeaderMap,
    api_key_header: &http::HeaderName,
) -> Result<Option<ScopeDigest>, MissingCredential> {
    match scope {
        Scope::Global => Ok(Some(ScopeDigest::global())),
        Scope::ApiKey => api_key(headers, api_key_header).map(Some),
        Scope::Header(name) => single(headers, name)?
            .map(|value| Some(ScopeDigest::header(name, value)))
            .ok_or_else(|| MissingCredential {
                detail: format!(
                    "this endpoint scopes idempotency keys by the `{name}` header, and the request has none (or a blank one)"
                ),
                bearer: false,
            }),
        Scope::Custom => Ok(None),
    }
}

/// [`resolve`], for the targets in the repository's `fuzz/` directory
/// alone: built only under `--cfg fuzzing`, which `cargo fuzz` and
/// `cargo afl` pass, so no other build (nor its documentation) has it.
#[cfg(fuzzing)]
#[doc(hidden)]
pub fn fuzz_resolve(
    scope: Scope,
    headers: &HeaderMap,
    api_key_header: &http::HeaderName,
) -> Result<Option<ScopeDigest>, MissingCredential> {
    resolve(scope, headers, api_key_header)
}

/// The scope of the request's API key or bearer token.
pub(crate) fn api_key(
    headers: &HeaderMap,
    api_key_header: &http::HeaderName,
) -> Result<ScopeDigest, MissingCredential> {
    if let Some(value) = single(headers, api_key_header)? {
        if *api_key_header == AUTHORIZATION {
            holds_a_credential(value, api_key_header)?;
        }
        return Ok(ScopeDigest::api_key(value));
    }
    single(headers, &AUTHORIZATION)?
        .and_then(authorization)
        .unwrap_or_else(|| Err(no_api_key(api_key_header)))
}

/// Refuses the value of `Authorization`, configured as the API-key header
/// and so taken whole as the key, when it is a scheme with nothing after
/// it, or `Basic` credentials that name no one: clients that send it (a
/// `Bearer ${KEY}` template whose key was never set) would be one caller.
fn holds_a_credential(
    value: &[u8],
    api_key_header: &http::HeaderName,
) -> Result<(), MissingCredential> {
    let bare_scheme = [b"bearer".as_slice(), b"basic"]
        .iter()
        .any(|scheme| value.eq_ignore_ascii_case(scheme));
    if bare_scheme {
        return Err(no_api_key(api_key_header));
    }
    match authorization(value) {
        Some(Err(refused)) => Err(refused),
        _ => Ok(()),
    }
}

/// The request has no API key where `api_key_header` is configured.
fn no_api_key(api_key_header: &http::HeaderName) -> MissingCredential {
    MissingCredential {
        detail: format!(
            "this endpoint scopes idempotency keys by API key: send it in the `{api_key_header}` header, as `Authorization: Bearer <token>`, or as the user name of `Authorization: Basic` credentials"
        ),
        bearer: true,
    }
}

/// The scope of an `Authorization` value with a `Bearer` token or `Basic`
/// credentials; `None` for an empty one or another scheme, an error for
/// `Basic` credentials that name no one.
fn authorization(value: &[u8]) -> Option<Result<ScopeDigest, MissingCredential>> {
    if let Some(token) = credentials(value, b"bearer ") {
        return Some(Ok(ScopeDigest::api_key(token)));
    }
    let basic = credentials(value, b"basic ")?;
    let decoded = base64_decoded(basic);
    if decoded.as_deref().is_some_and(names_no_one) {
        return Some(Err(MissingCredential {
            detail: "this endpoint scopes idempotency keys by API key, and the request's `Authorization: Basic` credentials have an empty user name and an empty password: they name no caller; send the API key as the user name (`curl -u <key>:`), or as `Authorization: Bearer <key>`".to_owned(),
            bearer: true,
        }));
    }
    Some(Ok(match decoded {
        // One encoding for one set of credentials, padded as RFC 7617
        // sends them: a retry padded otherwise is the same caller, and
        // padded credentials keep the scope they always had.
        Some(decoded) => ScopeDigest::basic(base64_padded(&decoded).as_bytes()),
        // Not base64: taken as sent, they name whoever sends them.
        None => ScopeDigest::basic(basic),
    }))
}

/// Whether decoded `Basic` credentials (`user:password`) have neither
/// a user name nor a password, blanks aside. Taken as sent, they would be
/// one caller for every client that sends them (`curl -u :`, a client
/// whose key was never set), each replayed the others' responses.
fn names_no_one(decoded: &[u8]) -> bool {
    let (user, password) = match decoded.iter().position(|&byte| byte == b':') {
        Some(colon) => (&decoded[..colon], &decoded[colon + 1..]),
        None => (decoded, &[][..]),
    };
    user.trim_ascii().is_empty() && password.trim_ascii().is_empty()
}

/// `text` decoded from base64 (RFC 4648's alphabet, padded or not), or
/// `None` if it is not base64.
fn base64_decoded(text: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let digits = text.strip_suffix(b"==").or_else(|| text.strip_suffix(b"="));
    let decoded = base64::engine::general_purpose::STANDARD_NO_PAD.decode(digits.unwrap_or(text));
    decoded.ok()
}

/// `bytes` in base64 with its padding, the one form RFC 7617 sends.
fn base64_padded(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// What follows `scheme` (lowercase, with its space), if `value` uses it
/// and holds something after it. Schemes are matched in any case.
fn credentials<'a>(value: &'a [u8], scheme: &[u8]) -> Option<&'a [u8]> {
    let (name, rest) = value.split_at_checked(scheme.len())?;
    let rest = rest.trim_ascii();
    (name.eq_ignore_ascii_case(scheme) && !rest.is_empty()).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};
    use proptest::prelude::*;

    /// The docs promise that a header scope's name is taken in any case:
    /// its value equality and hash say the same as its digest.
    #[test]
    fn header_scopes_are_equal_and_hash_alike_in_any_case() {
        use std::collections::HashSet;
        let scopes: HashSet<Scope> = [
            Scope::Header("X-Tenant-Id"),
            Scope::Header("x-tenant-id"),
            Scope::Header("x-tenant"),
            Scope::ApiKey,
            Scope::Global,
        ]
        .into_iter()
        .collect();
        assert_eq!(scopes.len(), 4, "{scopes:?}");
        assert!(scopes.contains(&Scope::Header("X-TENANT-ID")));
        assert_ne!(Scope::Header("x-tenant-id"), Scope::Global);
    }

    const API: HeaderName = HeaderName::from_static("x-api-key");

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn api_key_header_and_bearer_token_name_the_same_caller() {
        let by_header = resolve(Scope::ApiKey, &headers(&[("x-api-key", "k1")]), &API);
        let by_bearer = resolve(
            Scope::ApiKey,
            &headers(&[("authorization", "Bearer k1")]),
            &API,
        );
        assert_eq!(by_header, by_bearer);
        assert!(by_header.unwrap().is_some());
    }

    #[test]
    fn basic_credentials_name_their_caller_apart_from_bearer_tokens() {
        let basic = |value: &'static str| {
            resolve(Scope::ApiKey, &headers(&[("authorization", value)]), &API)
        };
        // `curl -u sk_test_1:` and `curl -u sk_test_2:`
        let first = basic("Basic c2tfdGVzdF8xOg==").unwrap().unwrap();
        assert_eq!(basic("basic  c2tfdGVzdF8xOg== ").unwrap(), Some(first));
        assert_ne!(basic("Basic c2tfdGVzdF8yOg==").unwrap(), Some(first));
        assert_ne!(basic("Bearer c2tfdGVzdF8xOg==").unwrap(), Some(first));
        for refused in ["Basic ", "Basic", "Digest c2tfdGVzdF8xOg=="] {
            let missing = basic(refused).unwrap_err();
            assert!(missing.bearer, "{refused}");
            assert!(missing.detail.contains("Basic"), "{}", missing.detail);
        }
    }

    #[test]
    fn basic_credentials_without_user_or_password_name_no_one() {
        let basic = |value: &'static str| {
            resolve(Scope::ApiKey, &headers(&[("authorization", value)]), &API)
        };
        // `:`, ` : `, `  :`, ``, padded or not.
        for empty in [
            "Basic Og==",
            "Basic Og",
            "Basic IDog",
            "Basic ICA6",
            "Basic =",
        ] {
            let refused = basic(empty).unwrap_err();
            assert!(refused.bearer, "{empty}");
            assert!(refused.detail.contains("empty user name"), "{empty}");
        }
        // `:sk_1`, `sk_1`, and what is not base64: each names its sender.
        for named in ["Basic OnNrXzE=", "Basic c2tfMQ==", "Basic Og=!", "Basic O"] {
            assert!(basic(named).unwrap().is_some(), "{named}");
        }
    }

    /// Base64 padding is part of the encoding, not of the credentials:
    /// a client that pads its retry, or stops padding it, is still the
    /// caller it was, and padded credentials keep the scope they always
    /// had, so records stored before stay theirs.
    #[test]
    fn basic_credentials_padded_or_not_name_one_caller() {
        let basic = |value: &'static str| {
            resolve(Scope::ApiKey, &headers(&[("authorization", value)]), &API)
                .unwrap()
                .unwrap()
        };
        let padded = basic("Basic c2tfdGVzdF8xOg==");
        assert_eq!(padded, ScopeDigest::basic(b"c2tfdGVzdF8xOg=="));
        assert_eq!(basic("Basic c2tfdGVzdF8xOg"), padded, "unpadded");
        assert_eq!(basic("Basic c2tfdGVzdF8xOg="), padded, "half padded");
        assert_ne!(basic("Basic c2tfdGVzdF8yOg"), padded, "another key");
        assert_eq!(basic("Basic O"), ScopeDigest::basic(b"O"), "not base64");
    }

    /// With `Authorization` itself configured as the API-key header, its
    /// value is the key, whole, as before; but a scheme with nothing
    /// after it, or `Basic` credentials that name no one, are no key: a
    /// client whose key was never set would be one caller with every
    /// other such client.
    #[test]
    fn an_authorization_api_key_header_holds_a_credential() {
        let header = AUTHORIZATION;
        let sent =
            |value: &'static str| api_key(&one_header(AUTHORIZATION, value.as_bytes()), &header);
        for empty in ["Bearer", "Bearer  ", "basic", "Basic Og=="] {
            let refused = sent(empty).expect_err(empty);
            assert!(refused.bearer, "{empty}");
        }
        assert_eq!(sent("sk_1"), Ok(ScopeDigest::api_key(b"sk_1")));
        assert_eq!(
            sent("Bearer sk_1"),
            Ok(ScopeDigest::api_key(b"Bearer sk_1"))
        );
    }

    #[test]
    fn base64_decodes_padded_or_not() {
        assert_eq!(base64_decoded(b"c2tfMTo=").as_deref(), Some(&b"sk_1:"[..]));
        assert_eq!(base64_decoded(b"c2tfMTo").as_deref(), Some(&b"sk_1:"[..]));
        assert_eq!(base64_decoded(b"+/8=").as_deref(), Some(&[0xfb, 0xff][..]));
        assert_eq!(base64_decoded(b""), Some(Vec::new()));
        for invalid in [&b"c2tfM"[..], b"c2-f", b"Og==="] {
            assert_eq!(base64_decoded(invalid), None, "{invalid:?}");
        }
    }

    #[test]
    fn different_api_keys_are_different_scopes() {
        let a = resolve(Scope::ApiKey, &headers(&[("x-api-key", "k1")]), &API);
        let b = resolve(Scope::ApiKey, &headers(&[("x-api-key", "k2")]), &API);
        assert_ne!(a, b);
    }

    #[test]
    fn missing_empty_or_other_schemes_credentials_are_refused() {
        assert!(resolve(Scope::ApiKey, &HeaderMap::new(), &API).is_err());
        let digest = headers(&[("authorization", "Digest username=\"u\"")]);
        assert!(resolve(Scope::ApiKey, &digest, &API).is_err());
        let empty_bearer = headers(&[("authorization", "Bearer ")]);
        assert!(resolve(Scope::ApiKey, &empty_bearer, &API).is_err());
    }

    #[test]
    fn header_scope_needs_its_header() {
        let tenant = Scope::Header("x-tenant");
        assert!(resolve(tenant, &HeaderMap::new(), &API).is_err());
        let a = resolve(tenant, &headers(&[("x-tenant", "a")]), &API).unwrap();
        assert!(a.is_some());
    }

    /// Header names are not case sensitive: the attribute lowercases the
    /// name it is given, and a `Scope::Header` written by hand in another
    /// case must name the same scope, or a handler moved off the attribute
    /// would run a stored request again.
    #[test]
    fn a_header_scope_is_one_scope_whatever_the_case_of_its_name() {
        let sent = headers(&[("x-tenant-id", "acme")]);
        let lower = resolve(Scope::Header("x-tenant-id"), &sent, &API).unwrap();
        let mixed = resolve(Scope::Header("X-Tenant-Id"), &sent, &API).unwrap();
        assert_eq!(lower, mixed);
        assert!(lower.is_some());
        assert_eq!(
            ScopeDigest::header("X-TENANT-ID", b"acme"),
            ScopeDigest::header("x-tenant-id", b"acme")
        );
        assert_ne!(
            ScopeDigest::header("x-tenant-id", b"acme"),
            ScopeDigest::header("x-tenant-id", b"ACME"),
            "the value keeps its case"
        );
    }

    #[test]
    fn a_scope_header_sent_twice_is_refused() {
        let tenant = Scope::Header("x-tenant");
        let twice = headers(&[("x-tenant", "gateway's"), ("x-tenant", "client's")]);
        let refused = resolve(tenant, &twice, &API).unwrap_err();
        assert!(!refused.bearer && refused.detail.contains("more than once"));
        let keys = headers(&[("x-api-key", "a"), ("x-api-key", "b")]);
        assert!(resolve(Scope::ApiKey, &keys, &API).is_err());
        let tokens = headers(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]);
        assert!(resolve(Scope::ApiKey, &tokens, &API).is_err());
    }

    #[test]
    fn scope_kinds_do_not_collide() {
        let key = ScopeDigest::api_key(b"x");
        assert_ne!(key, ScopeDigest::header("x-api-key", b"x"));
        assert_ne!(ScopeDigest::global(), ScopeDigest::api_key(b""));
    }

    #[test]
    fn digest_debug_does_not_print_the_credential() {
        let digest = ScopeDigest::api_key(b"sk_live_secret");
        assert!(!format!("{digest:?}").contains("secret"));
    }

    fn one_header(name: HeaderName, value: &[u8]) -> HeaderMap {
        let value = HeaderValue::from_bytes(value).expect("a valid value");
        HeaderMap::from_iter([(name, value)])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The token, as an API key header or after any casing of `Bearer`
        /// and any run of spaces, names one caller; another token another.
        #[test]
        fn a_bearer_token_names_the_caller_its_api_key_header_does(
            token in "[!-~]([ -~]{0,30}[!-~])?",
            other in "[!-~]{1,8}",
            scheme in prop::sample::select(vec!["Bearer", "bearer", "BEARER", "bEaReR"]),
            spaces in " {1,3}",
        ) {
            let by_header = api_key(&one_header(API, token.as_bytes()), &API);
            let bearer = format!("{scheme}{spaces}{token}");
            let by_bearer = api_key(&one_header(AUTHORIZATION, bearer.as_bytes()), &API);
            prop_assert_eq!(&by_header, &by_bearer);
            prop_assert!(by_header.is_ok());
            let by_other = api_key(&one_header(API, other.as_bytes()), &API);
            prop_assert_eq!(by_other == by_header, other == token);
        }

        /// Any authorization value, non-UTF-8 bytes included, resolves or
        /// is refused as missing: never a panic, never an empty token.
        #[test]
        fn any_authorization_value_resolves_or_is_refused(
            value in prop::collection::vec(prop_oneof![Just(b' '), 0x21u8..=0x7e, 0x80u8..=0xff], 0..16),
        ) {
            let bearer = [b"Bearer ".as_slice(), &value].concat();
            let resolved = api_key(&one_header(AUTHORIZATION, &bearer), &API);
            let token = value.trim_ascii();
            match resolved {
                Ok(scope) => prop_assert_eq!(scope, ScopeDigest::api_key(token)),
                Err(refused) => prop_assert!(token.is_empty() && refused.bearer),
            }
        }
    }
}
