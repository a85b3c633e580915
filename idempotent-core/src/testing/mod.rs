//! Test utilities (feature `test-util`): a mock store for handler unit
//! tests and the contract suite every store passes.

pub mod contract;
mod mock;

pub use mock::{ClaimOutcome, Fault, MockStore, OpKind, Operation};
