//! Benchmarks for idempotent: see BENCHMARKS.md.
