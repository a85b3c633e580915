//! Benchmarks for idempotent: see BENCHMARKS.md.
//!
//! The library holds what the benchmark servers share, so every server runs
//! exactly the same handler and routes.

pub mod app;
pub mod fixtures;
pub mod handler;
