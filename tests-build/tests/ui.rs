//! Compile-time behaviour of `#[idempotent]`: what compiles, and the exact
//! errors for what does not. The expected compiler output lives next to each
//! failing case in `ui/fail/*.stderr`; after an intended change to a message
//! (or a new toolchain), regenerate it with
//! `TRYBUILD=overwrite cargo test -p idempotent-tests-build --test ui` and review
//! the diff.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
