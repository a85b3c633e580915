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
    hex::encode(bytes)
}
