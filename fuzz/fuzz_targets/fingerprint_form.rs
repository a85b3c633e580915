//! Fingerprints of form bodies and query strings, as `Form<T>` and
//! `Query<T>` parse them (serde_urlencoded): as a list of pairs, a hash
//! map and a typed payload with integers, floats (`NaN`, `inf` and `-0`
//! parse too), booleans, strings and an enum.
//!
//! The input is two bodies split at the first `0xFF` byte. Properties as
//! for JSON: two bodies fingerprint alike exactly when they parse to the
//! same value (a float compared by its bits, every NaN one NaN, as the
//! fingerprint documents); a body parsed twice, or written back and
//! parsed to the same value, fingerprints alike.
#![no_main]

use std::collections::HashMap;

use idempotent_core::fingerprint::fingerprint;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const ENDPOINT: &str = "POST /orders";

/// A float compared by its bits, every NaN equal: what the fingerprint
/// promises to tell apart.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
#[serde(transparent)]
struct Bits(f64);

impl PartialEq for Bits {
    fn eq(&self, other: &Self) -> bool {
        (self.0.is_nan() && other.0.is_nan()) || self.0.to_bits() == other.0.to_bits()
    }
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Card,
    Transfer,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Default)]
#[serde(default)]
struct Order {
    amount: Option<i64>,
    quantity: Option<u8>,
    ratio: Option<Bits>,
    gift: Option<bool>,
    note: Option<String>,
    letter: Option<char>,
    kind: Option<Kind>,
}

fuzz_target!(|data: &[u8]| {
    let (first, second) = match data.iter().position(|&byte| byte == 0xFF) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    check::<Vec<(String, String)>>(first, second);
    check::<HashMap<String, String>>(first, second);
    check::<Order>(first, second);
    check::<HashMap<String, Bits>>(first, second);
});

fn fp<T: Serialize>(value: &T) -> idempotent_core::Fingerprint {
    fingerprint(ENDPOINT, value).expect("a parsed body always fingerprints")
}

fn check<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    first: &[u8],
    second: Option<&[u8]>,
) {
    let Ok(value) = serde_urlencoded::from_bytes::<T>(first) else {
        return;
    };
    let print = fp(&value);
    let again: T = serde_urlencoded::from_bytes(first).unwrap();
    assert_eq!(fp(&again), print);
    if let Ok(text) = serde_urlencoded::to_string(&value)
        && let Ok(back) = serde_urlencoded::from_str::<T>(&text)
    {
        assert_eq!(fp(&back) == print, back == value, "{text}");
    }
    if let Some(Ok(other)) = second.map(serde_urlencoded::from_bytes::<T>) {
        assert_eq!(
            fp(&other) == print,
            other == value,
            "{value:?} vs {other:?}"
        );
    }
}
