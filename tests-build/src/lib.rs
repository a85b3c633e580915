//! Compile-time tests of `#[idempotent]` live in `tests/ui`.
