//! Test utilities (feature `test-util`): a mock store for handler unit
//! tests and the contract suite every store passes.

mod mock;

pub use mock::{ClaimOutcome, MockStore, OpKind, Operation};
