//! Fingerprints of JSON bodies, as `Json<T>` parses them (serde_json,
//! with its recursion limit) into a `serde_json::Value` and into a typed
//! payload with integers, big integers, floats, strings, chars, hash maps,
//! hash sets, enums, `Option<Option<_>>` and nesting.
//!
//! The input is two bodies split at the first `0xFF` byte (never part of
//! valid JSON). Properties:
//! - the fingerprint is what the handler sees: two bodies fingerprint
//!   alike exactly when they parse to the same value, compared strictly
//!   (`-0.0` apart from `0.0`, `1.0` apart from `1`);
//! - a body parsed twice (each hash map and set with its own random
//!   order) fingerprints alike; written back compact or pretty, or with
//!   its keys reordered and every non-ASCII character written as a `\u`
//!   escape, it fingerprints alike exactly when it parses to the same
//!   value again.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use idempotent_core::fingerprint::fingerprint;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

const ENDPOINT: &str = "POST /payments";

/// Compared by the JSON text serde writes for it: strict about the
/// sign of a zero and a float apart from an integer, as a handler that
/// prints or divides by the value is.
#[derive(Serialize, Deserialize, Debug)]
#[serde(transparent)]
struct Strict<T>(T);

impl<T: Serialize> PartialEq for Strict<T> {
    fn eq(&self, other: &Self) -> bool {
        serde_json::to_string(&self.0).ok() == serde_json::to_string(&other.0).ok()
    }
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Card,
    Transfer { iban: String },
    Split(u32, u32),
    Wallet(String),
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(untagged)]
enum Amount {
    Cents(i64),
    Exact(u128),
    Ratio(Strict<f64>),
    Text(String),
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Default)]
#[serde(default)]
struct Payment {
    amount: Option<i64>,
    big: Option<u128>,
    ratio: Option<Strict<f64>>,
    small: Option<Strict<f32>>,
    currency: Option<String>,
    letter: Option<char>,
    tags: Option<HashSet<String>>,
    meta: Option<HashMap<String, Strict<Value>>>,
    kind: Option<Kind>,
    any_amount: Option<Amount>,
    flag: Option<Option<bool>>,
    items: Vec<Payment>,
    nested: Option<Box<Payment>>,
}

fuzz_target!(|data: &[u8]| {
    let (first, second) = match data.iter().position(|&byte| byte == 0xFF) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    check_value(first, second);
    check_typed::<Payment>(first, second);
    check_typed::<HashMap<String, Strict<Value>>>(first, second);
    check_typed::<Vec<Strict<f64>>>(first, second);
    check_typed::<HashSet<u128>>(first, second);
});

fn fp<T: Serialize>(value: &T) -> idempotent_core::Fingerprint {
    fingerprint(ENDPOINT, value).expect("a parsed body always fingerprints")
}

fn check_value(first: &[u8], second: Option<&[u8]>) {
    let Ok(value) = serde_json::from_slice::<Value>(first) else {
        return;
    };
    let print = fp(&value);
    for text in [
        serde_json::to_string(&value).unwrap(),
        serde_json::to_string_pretty(&value).unwrap(),
        escaped(&value),
    ] {
        // serde_json parses floats to the nearest value only with its
        // `float_roundtrip` feature: without it, a float written back may
        // parse to a neighbour, which the handler then sees too.
        let again: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let same_value = Strict(&again) == Strict(&value);
        assert_eq!(fp(&again) == print, same_value, "{text}");
    }
    if let Some(Ok(other)) = second.map(serde_json::from_slice::<Value>) {
        let same_value = Strict(&value) == Strict(&other);
        assert_eq!(fp(&other) == print, same_value, "{value} vs {other}");
    }
}

fn check_typed<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    first: &[u8],
    second: Option<&[u8]>,
) {
    let Ok(value) = serde_json::from_slice::<T>(first) else {
        return;
    };
    let print = fp(&value);
    // Parsed again: hash maps and sets draw new random keys.
    let again: T = serde_json::from_slice(first).unwrap();
    assert_eq!(fp(&again), print);
    // Written back and parsed: the handler sees the same value.
    let text = serde_json::to_string(&value).unwrap();
    if let Ok(back) = serde_json::from_str::<T>(&text) {
        assert_eq!(fp(&back) == print, back == value, "{text}");
    }
    if let Some(Ok(other)) = second.map(serde_json::from_slice::<T>) {
        assert_eq!(
            fp(&other) == print,
            other == value,
            "{value:?} vs {other:?}"
        );
    }
}

/// `value` as JSON text with every object's keys in reverse order and
/// every non-ASCII character (and every other one in a string) written
/// as a `\u` escape.
fn escaped(value: &Value) -> String {
    let mut out = String::new();
    write_escaped(value, &mut out);
    out
}

fn write_escaped(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            out.push('{');
            for (index, (key, item)) in map.iter().rev().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_escaped(item, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_escaped(item, out);
            }
            out.push(']');
        }
        Value::String(text) => write_string(text, out),
        other => out.push_str(&other.to_string()),
    }
}

fn write_string(text: &str, out: &mut String) {
    out.push('"');
    for (index, character) in text.chars().enumerate() {
        let must = matches!(character, '"' | '\\') || character < ' ';
        if must || !character.is_ascii() || index % 2 == 1 {
            let mut units = [0u16; 2];
            for unit in character.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{unit:04X}");
            }
        } else {
            out.push(character);
        }
    }
    out.push('"');
}
