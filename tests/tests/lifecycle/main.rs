//! A keyed request's life cycle through both ways of declaring it: races,
//! shutdowns and responses stored later.
//!
//! One test binary of several files (each a module below): every binary
//! links the whole dependency tree, so files that need no process of their
//! own share one.

#[path = "../macro_support/mod.rs"]
mod macro_support;
#[path = "../store_support/mod.rs"]
mod store_support;

mod lifecycle;
mod lifecycle_races;
mod lifecycle_shutdown;
mod lifecycle_storing_later;
