//! Request header fields: those that must come at most once, and the
//! padding around a value.

use http::header::AsHeaderName;
use http::{HeaderMap, HeaderValue};

/// The field came more than once.
pub(crate) struct Repeated;

/// The one value of `name` in `headers`, `None` when there is none. Two
/// fields are refused rather than one of them picked: for the key and the
/// scope alike, which one counted would be the client's choice.
pub(crate) fn at_most_once<N: AsHeaderName>(
    headers: &HeaderMap,
    name: N,
) -> Result<Option<&HeaderValue>, Repeated> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(Repeated);
    }
    Ok(first)
}

/// Cuts the optional whitespace around a field value (RFC 9110 `OWS`:
/// spaces and tabs only, so a stray CR, LF or form feed is an invalid
/// character, not padding), and says how many bytes went from the start.
pub(crate) fn trim_ows(field: &[u8]) -> (usize, &[u8]) {
    let is_ows = |byte: &&u8| matches!(byte, b' ' | b'\t');
    let start = field.iter().take_while(is_ows).count();
    let end = field.len() - field[start..].iter().rev().take_while(is_ows).count();
    (start, &field[start..end])
}
