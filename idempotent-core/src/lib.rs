//! tmp
pub mod fingerprint;
