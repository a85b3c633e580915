//! `#[idempotent]` handlers through a `Router`: each option, the arguments,
//! the scopes, the fingerprint, exact repeats and what goes on the wire.
//!
//! One test binary of several files (each a module below): every binary
//! links the whole dependency tree, so files that need no process of their
//! own share one.

#[path = "../macro_support/mod.rs"]
mod macro_support;
#[path = "../store_support/mod.rs"]
mod store_support;

mod macro_arguments;
mod macro_exact_replays;
mod macro_fingerprint;
mod macro_handlers;
mod macro_mock_faults;
mod macro_mock_users;
mod macro_options;
mod macro_scopes;
mod macro_signatures;
mod macro_wait_open_optional;
mod macro_wire;
