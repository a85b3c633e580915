//! Make axum handlers safe to retry.
//!
//! A handler marked `#[idempotent]` runs its side effect at most once per
//! (caller, `Idempotency-Key`), replays the stored response to every retry,
//! answers 409 while the first attempt runs and 422 when the same key comes
//! back with a different payload. See the README for the HTTP contract.
//!
//! The pieces, one module per concept:
//! - [`key`]: parsing the `Idempotency-Key` header;
//! - [`scope`]: whose key it is;
//! - [`fingerprint`]: what the request was, canonically hashed;
//! - [`record`]: what a store keeps;
//! - [`store`]: the [`Store`](store::Store) trait and its backends;
//! - [`Endpoint`]: per-endpoint policy;
//! - [`Idempotency`]: the router-wide handle and layer;
//! - [`IdempotentRequest`]: the extractor that runs a handler through the
//!   engine, without the attribute;
//! - [`layer`]: the same engine as a tower middleware over raw requests;
//! - [`problem`]: the RFC 9457 errors the engine answers with.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod clock;
mod digest;
mod endpoint;
mod engine;
mod exact;
mod field;
pub mod fingerprint;
mod idempotency;
pub mod key;
pub mod layer;
mod names;
pub mod problem;
pub mod record;
mod renewal;
mod replay;
mod request;
pub mod scope;
pub mod store;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use endpoint::{Endpoint, FinalStatuses, StatusRange};
pub use fingerprint::{Fingerprint, FingerprintError, FingerprintInput, Fingerprinter};
pub use idempotency::{Idempotency, IdempotencyBuilder, IdempotencyService};
pub use key::IdempotencyKey;
pub use layer::IdempotentLayer;
pub use problem::{Problem, ProblemKind};
pub use replay::IDEMPOTENT_REPLAYED;
pub use request::IdempotentRequest;
pub use scope::{IdempotencyScope, Scope};

#[cfg(feature = "macros")]
#[doc(inline)]
pub use idempotent_macros::idempotent;

#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;
