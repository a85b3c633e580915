//! Request header fields that must come at most once.

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
