//! The engine, the layer, the public API and the testing module, through
//! real routers and the mock and in-memory stores.
//!
//! One test binary of several files (each a module below): every binary
//! links the whole dependency tree, so files that need no process of their
//! own share one.

#[path = "../support/events.rs"]
mod events;
#[path = "../support/forwarding.rs"]
mod forwarding;

mod api_surface;
mod engine;
mod engine_races;
mod layer;
mod store_fails_until_fixed;
mod testing_contract_races;
mod testing_mock_outages;
mod tiered_chaos;
