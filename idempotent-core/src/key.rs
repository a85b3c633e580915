//! The `Idempotency-Key` request header.
//!
//! The header carries one key, either as an RFC 8941 string (`"abc"`) or as a
//! bare token (`abc`); both forms name the same key. A key is 1 to 255
//! printable ASCII characters. The bare form may not contain whitespace, `"`
//! or `,` (a comma would make one field look like a list of two); the quoted
//! form may carry anything printable, with `\"` and `\\` as its only escapes.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use http::request::Parts;
use http::{HeaderMap, HeaderName};

use crate::field::{Repeated, at_most_once, trim_ows};
use crate::problem::{Problem, ProblemKind};

/// The request header that carries the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The longest key accepted, in characters.
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key.
///
/// It is also an extractor, so a handler can take the key as an argument (the
/// `#[idempotent]` attribute never fingerprints it), for example to derive
/// keys for calls it makes to other idempotent services.
///
/// ```
/// use idempotent_core::IdempotencyKey;
/// use idempotent_core::key::KeyError;
///
/// // The quoted and the bare form name the same key.
/// let key = IdempotencyKey::parse(b"\"order-7\"").unwrap();
/// assert_eq!(key, IdempotencyKey::parse(b"order-7").unwrap());
/// assert_eq!(key.as_str(), "order-7");
///
/// assert_eq!(IdempotencyKey::parse(b""), Err(KeyError::Empty));
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    /// Parses one header field value.
    ///
    /// # Errors
    /// [`KeyError`] says exactly what is wrong with the value.
    pub fn parse(field: &[u8]) -> Result<Self, KeyError> {
        let (leading, field) = trim_ows(field);
        let key: Cow<'_, str> = match field.first() {
            Some(b'"') => parse_sf_string(field).map(Cow::Owned),
            Some(_) => parse_bare(field).map(Cow::Borrowed),
            None => Err(KeyError::Empty),
        }
        .map_err(|error| error.shifted(leading))?;
        if key.is_empty() {
            return Err(KeyError::Empty);
        }
        if key.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong { len: key.len() });
        }
        // One allocation: the `Arc` is built straight from the header bytes.
        Ok(Self(Arc::from(&*key)))
    }

    /// Reads the key from request headers: `Ok(None)` when there is none.
    ///
    /// # Errors
    /// More than one `Idempotency-Key` field, or an invalid value.
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<Self>, KeyError> {
        let field =
            at_most_once(headers, IDEMPOTENCY_KEY).map_err(|Repeated| KeyError::MultipleFields)?;
        field.map(|value| Self::parse(value.as_bytes())).transpose()
    }

    /// The key itself.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A key for a downstream call made on behalf of this request: 64 hex
    /// digits of a SHA-256 over this key and `purpose`, each framed by its
    /// length. Retries of this request derive the same key, so the
    /// downstream service deduplicates them too; another key or another
    /// purpose never derives it (`"a:b"` with `"c"` and `"a"` with `"b:c"`
    /// differ), and it is always a valid key.
    ///
    /// Keys are unique per caller, not across callers, and the downstream
    /// service usually knows only this service as its caller: where two of
    /// your callers may send the same key, put what tells them apart into
    /// the purpose.
    ///
    /// ```
    /// # use idempotent_core::IdempotencyKey;
    /// let key = IdempotencyKey::parse(b"order-7").unwrap();
    /// let ledger = key.derive("ledger");
    /// assert_eq!(ledger.len(), 64);
    /// assert_ne!(ledger, key.derive("email"));
    /// assert!(IdempotencyKey::parse(ledger.as_bytes()).is_ok());
    /// # let tenant = 42;
    /// let per_tenant = key.derive(&format!("tenant {tenant}: ledger"));
    /// # assert_ne!(per_tenant, ledger);
    /// ```
    #[must_use]
    pub fn derive(&self, purpose: &str) -> String {
        crate::digest::hex(&crate::digest::sha256_framed(&[
            b"idempotent derived key",
            self.0.as_bytes(),
            purpose.as_bytes(),
        ]))
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for IdempotencyKey {
    // Keys can be guessable identifiers of a customer's operation; debug
    // output (and so logs) shows only a digest.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IdempotencyKey({})",
            crate::digest::short_hex(self.0.as_bytes())
        )
    }
}

/// Why an `Idempotency-Key` header was rejected. Each maps to a 400 response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The request has no `Idempotency-Key` header.
    #[error(
        "the request has no Idempotency-Key header; send one unique key per operation, e.g. a UUID: `Idempotency-Key: \"8e03978e-40d5-43e8-bc93-6894a57f9324\"`"
    )]
    Missing,
    /// The header appears more than once, or holds a list (a comma outside
    /// quotes), which is what a proxy makes of two fields.
    #[error(
        "the Idempotency-Key header appears more than once, or holds a comma-separated list (which is what a proxy makes of two fields); send exactly one key, quoted if it contains a comma: `Idempotency-Key: \"a,b\"`"
    )]
    MultipleFields,
    /// The key is empty.
    #[error("the Idempotency-Key header is empty; a key has 1 to 255 characters")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`].
    #[error("the idempotency key has {len} characters; at most 255 are allowed")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// A character outside printable ASCII, or one the bare form does not allow.
    #[error(
        "the Idempotency-Key header has a byte that is not allowed, 0x{byte:02x}, at offset {position} of its value (counting from 0); {}",
        character_advice(*.byte)
    )]
    InvalidCharacter {
        /// Zero-based byte offset in the header value.
        position: usize,
        /// The offending byte.
        byte: u8,
    },
    /// A quoted key without its closing quote, or with text after it.
    #[error(
        "the quoted idempotency key is malformed: {0}; a quoted key is a structured-field string, printable ASCII between two '\"' with nothing after the second, and '\"' and '\\' escaped by a '\\': `Idempotency-Key: \"a b\"`"
    )]
    MalformedString(&'static str),
}

/// What to do about `byte` in a key. A space or `"` is printable ASCII
/// and only the bare form refuses it: saying that keys are printable
/// ASCII would leave the client looking for a character that is not
/// there, instead of quoting the key.
fn character_advice(byte: u8) -> &'static str {
    match byte {
        b' ' | b'"' => {
            "a bare key may not contain spaces or '\"'; send such a key quoted, as a structured-field string with '\"' and '\\' escaped by a '\\': `Idempotency-Key: \"a b\"`"
        }
        _ => {
            "keys are printable ASCII (0x20 to 0x7e) only; send other text encoded, as hex or base64"
        }
    }
}

impl KeyError {
    /// Positions are found in the trimmed value; this moves them back to
    /// the value as given, by the `by` bytes trimmed from its start.
    fn shifted(self, by: usize) -> Self {
        match self {
            Self::InvalidCharacter { position, byte } => Self::InvalidCharacter {
                position: position + by,
                byte,
            },
            other => other,
        }
    }
}

/// The 400 for a request without a key. A header whose name shows that
/// the client meant to send one (`X-Idempotency-Key`, `idempotency_key`,
/// names other APIs use) is named, since its author otherwise sees a key
/// sent and refused as missing.
pub(crate) fn missing(headers: &HeaderMap) -> Problem {
    let detail = match near_miss(headers) {
        Some(name) => format!(
            "the request has no Idempotency-Key header, but has `{name}`: send the key in a header named exactly `Idempotency-Key`"
        ),
        None => KeyError::Missing.to_string(),
    };
    Problem::new(ProblemKind::MissingKey, detail)
}

/// A header named like the key, other than the key's own name (absent
/// when this is asked). `http` keeps names in lower case.
fn near_miss(headers: &HeaderMap) -> Option<&str> {
    headers
        .keys()
        .map(HeaderName::as_str)
        .find(|name| name.contains("idempoten") && name.ends_with("key"))
}

fn parse_bare(field: &[u8]) -> Result<&str, KeyError> {
    let allowed = |byte: u8| byte.is_ascii_graphic() && byte != b'"' && byte != b',';
    // Every request checks its key: one pass without early exit, which
    // the compiler vectorizes; the position is looked for only on error.
    let valid = field
        .iter()
        .fold(true, |valid, &byte| valid & allowed(byte));
    if !valid {
        let position = field.iter().position(|&byte| !allowed(byte)).unwrap_or(0);
        let byte = field.get(position).copied().unwrap_or(0);
        if byte == b',' {
            return Err(KeyError::MultipleFields);
        }
        return Err(KeyError::InvalidCharacter { position, byte });
    }
    // Every byte is ASCII, so this cannot fail; map rather than unwrap.
    std::str::from_utf8(field).map_err(|_| KeyError::MalformedString("not ASCII"))
}

/// RFC 8941 section 4.2.5: `"` chars `"`, with `\"` and `\\` escapes.
fn parse_sf_string(field: &[u8]) -> Result<String, KeyError> {
    let mut key = String::with_capacity(field.len());
    let mut bytes = field.iter().copied().enumerate().skip(1);
    while let Some((position, byte)) = bytes.next() {
        match byte {
            b'\\' => match bytes.next() {
                Some((_, escaped @ (b'"' | b'\\'))) => key.push(char::from(escaped)),
                Some(_) => {
                    return Err(KeyError::MalformedString(
                        "only \\\" and \\\\ may be escaped",
                    ));
                }
                None => return Err(KeyError::MalformedString("it ends inside an escape")),
            },
            b'"' if position + 1 == field.len() => return Ok(key),
            b'"' if field[position + 1..].trim_ascii_start().starts_with(b",") => {
                return Err(KeyError::MultipleFields);
            }
            b'"' => {
                return Err(KeyError::MalformedString(
                    "there is text after the closing quote",
                ));
            }
            b' '..=b'~' => key.push(char::from(byte)),
            _ => return Err(KeyError::InvalidCharacter { position, byte }),
        }
    }
    Err(KeyError::MalformedString("the closing quote is missing"))
}

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match Self::from_headers(&parts.headers) {
            Ok(Some(key)) => Ok(key),
            Ok(None) => Err(missing(&parts.headers)),
            Err(error) => Err(Problem::from(error)),
        }
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for IdempotencyKey {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Self::from_headers(&parts.headers).map_err(Problem::from)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn derived_keys_are_valid_and_never_shared_by_another_key_or_purpose() {
        let key = |text: &[u8]| IdempotencyKey::parse(text).unwrap();
        assert_ne!(key(b"a:b").derive("c"), key(b"a").derive("b:c"));
        assert_eq!(key(b"k").derive("ledger"), key(b"k").derive("ledger"));
        let long = format!("\"{}\"", "x ".repeat(127));
        for source in [key(b"\"order 7\""), key(long.as_bytes())] {
            let derived = source.derive("ledger, then email");
            assert!(
                IdempotencyKey::parse(derived.as_bytes()).is_ok(),
                "{derived}"
            );
        }
    }

    fn key(s: &str) -> Result<String, KeyError> {
        IdempotencyKey::parse(s.as_bytes()).map(|k| k.as_str().to_owned())
    }

    #[test]
    fn bare_and_quoted_forms_name_the_same_key() {
        assert_eq!(key("abc-123").unwrap(), "abc-123");
        assert_eq!(key("\"abc-123\"").unwrap(), "abc-123");
        assert_eq!(key("  abc  ").unwrap(), "abc");
    }

    #[test]
    fn uuid_is_a_valid_bare_key() {
        assert_eq!(
            key("550e8400-e29b-41d4-a716-446655440000").unwrap(),
            "550e8400-e29b-41d4-a716-446655440000"
        );
    }

    #[test]
    fn quoted_form_allows_spaces_and_escapes() {
        assert_eq!(key(r#""a b \"c\" \\ d""#).unwrap(), r#"a b "c" \ d"#);
    }

    #[test]
    fn empty_keys_are_rejected() {
        assert_eq!(key(""), Err(KeyError::Empty));
        assert_eq!(key("   "), Err(KeyError::Empty));
        assert_eq!(key("\"\""), Err(KeyError::Empty));
    }

    #[test]
    fn length_limit_is_255() {
        assert!(key(&"a".repeat(255)).is_ok());
        assert_eq!(key(&"a".repeat(256)), Err(KeyError::TooLong { len: 256 }));
        let quoted = format!("\"{}\"", "b".repeat(256));
        assert_eq!(key(&quoted), Err(KeyError::TooLong { len: 256 }));
    }

    #[test]
    fn control_and_non_ascii_characters_are_rejected() {
        assert_eq!(
            IdempotencyKey::parse(b"ab\x01c"),
            Err(KeyError::InvalidCharacter {
                position: 2,
                byte: 1
            })
        );
        assert_eq!(
            IdempotencyKey::parse("caf\u{e9}".as_bytes()),
            Err(KeyError::InvalidCharacter {
                position: 3,
                byte: 0xc3
            })
        );
        assert!(matches!(
            IdempotencyKey::parse(b"\"ab\x7f\""),
            Err(KeyError::InvalidCharacter {
                position: 3,
                byte: 0x7f
            })
        ));
    }

    /// The draft's 400 for a missing key points the client at what to
    /// send; so do these, with the header itself.
    #[test]
    fn a_missing_or_broken_quoted_key_is_shown_the_header_to_send() {
        let missing = KeyError::Missing.to_string();
        assert!(
            missing.contains("`Idempotency-Key: \"8e03978e-"),
            "{missing}"
        );
        for broken in ["\"abc", "\"abc\"def", r#""a\nb""#, "\"abc\\", "\"abc\";v=1"] {
            let message = key(broken).unwrap_err().to_string();
            assert!(
                message.contains("`Idempotency-Key: \"a b\"`"),
                "{broken}: {message}"
            );
        }
    }

    #[test]
    fn an_invalid_character_is_named_by_its_offset_from_zero() {
        let message = key("bad key").unwrap_err().to_string();
        assert!(
            message.contains("0x20, at offset 3 of its value (counting from 0)"),
            "{message}"
        );
    }

    #[test]
    fn bare_keys_reject_separators() {
        assert!(matches!(
            key("a b"),
            Err(KeyError::InvalidCharacter { position: 1, .. })
        ));
        assert_eq!(key("a,b"), Err(KeyError::MultipleFields));
    }

    #[test]
    fn malformed_quoted_strings_are_rejected() {
        assert!(matches!(key("\"abc"), Err(KeyError::MalformedString(_))));
        assert!(matches!(
            key("\"abc\"def"),
            Err(KeyError::MalformedString(_))
        ));
        assert!(matches!(
            key(r#""a\nb""#),
            Err(KeyError::MalformedString(_))
        ));
        assert!(matches!(key("\"abc\\"), Err(KeyError::MalformedString(_))));
    }

    #[test]
    fn more_than_one_field_is_rejected() {
        let mut headers = HeaderMap::new();
        headers.append(IDEMPOTENCY_KEY, "a".parse().unwrap());
        headers.append(IDEMPOTENCY_KEY, "b".parse().unwrap());
        assert_eq!(
            IdempotencyKey::from_headers(&headers),
            Err(KeyError::MultipleFields)
        );
    }

    #[test]
    fn only_headers_named_like_the_key_are_near_misses() {
        let mut headers = HeaderMap::new();
        for name in ["x-idempotent-replayed", "idempotency-key-id", "x-api-key"] {
            headers.insert(HeaderName::from_static(name), "v".parse().unwrap());
        }
        assert_eq!(near_miss(&headers), None);
        headers.insert(
            HeaderName::from_static("x-idempotency-key"),
            "k".parse().unwrap(),
        );
        assert_eq!(near_miss(&headers), Some("x-idempotency-key"));
    }

    #[test]
    fn two_fields_joined_by_a_proxy_are_named_as_such() {
        for joined in ["a, b", "a,b", "\"a\", \"b\"", "\"a\",b"] {
            assert_eq!(key(joined), Err(KeyError::MultipleFields), "{joined}");
        }
        assert!(
            key("\"a,b\"").as_deref() == Ok("a,b"),
            "a comma inside quotes is the key's"
        );
    }

    #[test]
    fn no_header_is_none() {
        assert_eq!(IdempotencyKey::from_headers(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn debug_output_hides_the_key() {
        let k = IdempotencyKey::parse(b"secret-order-42").unwrap();
        assert!(!format!("{k:?}").contains("secret"));
    }

    #[test]
    fn error_positions_point_into_the_value_as_given() {
        assert_eq!(
            IdempotencyKey::parse(b"  a b"),
            Err(KeyError::InvalidCharacter {
                position: 3,
                byte: b' '
            })
        );
        assert_eq!(
            IdempotencyKey::parse(b"\t\"a\x01\""),
            Err(KeyError::InvalidCharacter {
                position: 3,
                byte: 1
            })
        );
    }

    #[test]
    fn only_spaces_and_tabs_are_trimmed() {
        assert_eq!(key(" \tabc\t ").unwrap(), "abc");
        assert_eq!(key(" \t\"a b\" \t").unwrap(), "a b");
        assert_eq!(
            IdempotencyKey::parse(b"\x0cabc"),
            Err(KeyError::InvalidCharacter {
                position: 0,
                byte: 0x0c
            })
        );
        assert_eq!(
            IdempotencyKey::parse(b"abc\r\n"),
            Err(KeyError::InvalidCharacter {
                position: 3,
                byte: b'\r'
            })
        );
    }

    #[test]
    fn the_limit_counts_the_key_not_its_escapes() {
        let escaped = |len| format!("\"{}\"", "\\\"".repeat(len));
        assert_eq!(key(&escaped(255)).unwrap(), "\"".repeat(255));
        assert_eq!(key(&escaped(256)), Err(KeyError::TooLong { len: 256 }));
    }

    /// The sf-string form of `key`.
    fn quoted(key: &str) -> String {
        let mut out = String::from("\"");
        for c in key.chars() {
            if matches!(c, '"' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }

    /// Bytes that steer the parser into its every branch.
    fn tricky_field() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            4 => prop::sample::select(b" \t\"\\,;=a-\x7f\x80\xff\r\x0c".to_vec()),
            1 => any::<u8>(),
        ];
        prop::collection::vec(byte, 0..12)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_field_gives_a_valid_key_or_an_error_that_points_at_its_byte(
            field in prop_oneof![tricky_field(), prop::collection::vec(any::<u8>(), 0..300)],
        ) {
            match IdempotencyKey::parse(&field) {
                Ok(key) => {
                    let key = key.as_str();
                    prop_assert!((1..=MAX_KEY_LEN).contains(&key.len()));
                    prop_assert!(key.bytes().all(|byte| matches!(byte, b' '..=b'~')));
                }
                Err(KeyError::InvalidCharacter { position, byte }) => {
                    prop_assert_eq!(field.get(position), Some(&byte));
                }
                Err(_) => {}
            }
        }

        #[test]
        fn a_quoted_key_reads_back_as_written(
            text in "[ -~]{1,255}",
            before in "[ \t]{0,2}",
            after in "[ \t]{0,2}",
        ) {
            let field = format!("{before}{}{after}", quoted(&text));
            prop_assert_eq!(key(&field), Ok(text));
        }

        #[test]
        fn a_bare_key_names_the_same_key_as_its_quoted_form(text in "[!#-+\\--~]{1,255}") {
            prop_assert_eq!(key(&text), Ok(text.clone()));
            prop_assert_eq!(key(&quoted(&text)), Ok(text));
        }

        #[test]
        fn keys_past_255_characters_are_too_long(text in "[ -~]{256,300}") {
            let len = text.len();
            prop_assert_eq!(key(&quoted(&text)), Err(KeyError::TooLong { len }));
        }
    }
}
