//! `Idempotency-Key` parsing: any header value is a key or a specific
//! error, never a panic; a key is 1 to 255 printable ASCII characters,
//! its quoted form names the same key, and an error's position points at
//! the byte it names.
#![no_main]

use http::{HeaderMap, HeaderValue};
use idempotent_core::IdempotencyKey;
use idempotent_core::key::{IDEMPOTENCY_KEY, KeyError, MAX_KEY_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|field: &[u8]| {
    let parsed = IdempotencyKey::parse(field);
    match &parsed {
        Ok(key) => check_key(key),
        Err(error) => check_error(field, error),
    }
    // The header path parses the same bytes alike, when they are a value.
    if let Ok(value) = HeaderValue::from_bytes(field) {
        let headers = HeaderMap::from_iter([(IDEMPOTENCY_KEY, value.clone())]);
        assert_eq!(
            IdempotencyKey::from_headers(&headers),
            parsed.clone().map(Some)
        );
        let mut twice = headers;
        twice.append(IDEMPOTENCY_KEY, value);
        assert_eq!(
            IdempotencyKey::from_headers(&twice),
            Err(KeyError::MultipleFields)
        );
    }
});

fn check_key(key: &IdempotencyKey) {
    let text = key.as_str();
    assert!((1..=MAX_KEY_LEN).contains(&text.len()), "{text:?}");
    assert!(text.bytes().all(|byte| (b' '..=b'~').contains(&byte)));
    // Quoted, with `"` and `\` escaped, it names the same key.
    let quoted = quote(text);
    assert_eq!(IdempotencyKey::parse(quoted.as_bytes()).as_ref(), Ok(key));
    // Bare, when the bare form allows every character.
    let bare_allowed = text
        .bytes()
        .all(|byte| byte.is_ascii_graphic() && byte != b'"' && byte != b',');
    if bare_allowed {
        assert_eq!(IdempotencyKey::parse(text.as_bytes()).as_ref(), Ok(key));
    }
    let derived = key.derive("fuzz");
    assert!(IdempotencyKey::parse(derived.as_bytes()).is_ok());
    let _ = format!("{key:?} {key}");
}

fn check_error(field: &[u8], error: &KeyError) {
    match *error {
        KeyError::InvalidCharacter { position, byte } => {
            assert_eq!(field.get(position), Some(&byte), "{error:?} in {field:?}");
        }
        KeyError::TooLong { len } => assert!(len > MAX_KEY_LEN),
        _ => {}
    }
    assert!(!error.to_string().is_empty());
    let _ = idempotent_core::Problem::from(error.clone());
}

fn quote(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for character in text.chars() {
        if matches!(character, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(character);
    }
    quoted.push('"');
    quoted
}
