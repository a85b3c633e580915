//! The HTTP contract on the wire: what clients, proxies, HTTP/2 and the
//! tower layers of real services meet, and an application's own unit tests.
//!
//! One test binary of several files (each a module below): every binary
//! links the whole dependency tree, so files that need no process of their
//! own share one.

#[path = "../macro_support/mod.rs"]
mod macro_support;

mod contract_catches;
mod http2_wire;
mod http_clients;
mod http_contract;
mod http_logs;
mod http_wire;
mod interop_layers;
mod request_inputs;
mod user_service;
mod user_unit_tests;
