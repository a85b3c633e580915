//! SHA-256 helpers shared by scopes, keys and logs.

use sha2::{Digest, Sha256};

/// SHA-256 of `parts`, each framed by its length so `("ab", "c")` and
/// `("a", "bc")` differ.
pub(crate) fn sha256_framed(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// The first 8 bytes of a SHA-256 as hex: enough to correlate log lines,
/// useless for recovering the input.
pub(crate) fn short_hex(input: &[u8]) -> String {
    hex(&Sha256::digest(input)[..8])
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

/// Appends the lowercase hex of `bytes` to `out`. Encoded through a
/// buffer: `hex::encode` builds its string a `char` at a time, which
/// showed in profiles of the stores that address records by hex keys.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    let mut buffer = [0; 64];
    for chunk in bytes.chunks(buffer.len() / 2) {
        let digits = &mut buffer[..chunk.len() * 2];
        // Neither can fail: the buffer holds exactly the chunk's digits,
        // which are ASCII.
        if hex::encode_to_slice(chunk, digits).is_ok() {
            out.push_str(std::str::from_utf8(digits).unwrap_or_default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_two_digits_a_byte_at_any_length() {
        assert_eq!(hex(&[0x00, 0x0f, 0xab, 0xff]), "000fabff");
        let long: Vec<u8> = (0..=80).collect();
        let mut out = String::from("prefix:");
        push_hex(&mut out, &long);
        assert_eq!(out.len(), 7 + 2 * long.len());
        assert!(out.ends_with("4f50"), "{out}");
        assert_eq!(&out[7..9], "00");
    }
}
