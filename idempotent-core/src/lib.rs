//! Make axum handlers safe to retry.
//!
//! A handler marked [`#[idempotent]`][attribute] runs its side
//! effect at most once per (caller, `Idempotency-Key`), replays the stored
//! response to every retry (marked [`Idempotent-Replayed: true`](IDEMPOTENT_REPLAYED)),
//! answers 409 while the first attempt runs and 422 when the same key comes
//! back with a different payload. The full HTTP contract, status by status,
//! is in the [README](https://github.com/idempotent-rs/idempotent#the-http-contract).
//!
//! The one case it cannot cover: a process that dies mid-handler (or stalls
//! past the endpoint's `lease`, 60 s by default) leaves no trace of how far
//! it got, so a retry after the lease runs the handler again. Keep the
//! handler's own writes in one database transaction (a crash mid-handler
//! then leaves none of them, and the rerun starts clean; the store's record
//! is written apart from it), or give the downstream service (a payment
//! provider) a key from [`IdempotencyKey::derive`] as its own idempotency
//! key.
//!
//! # Quick start
//!
//! Depend on the `idempotent-core` package (the `idempotent` package on
//! crates.io is another project). Mark the handler, then give the router
//! an [`Idempotency`] layer, which names the store. The layer is required:
//! without it, every request to the handler, with a key or without, gets
//! a `500` problem that says to add it.
//!
// The example needs the attribute, which only the `macros` feature brings.
#![cfg_attr(feature = "macros", doc = "```")]
#![cfg_attr(not(feature = "macros"), doc = "```ignore")]
//! use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
//! use idempotent_core::{Idempotency, idempotent, store::MemoryStore};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Clone)]
//! struct Db;
//!
//! #[derive(Serialize, Deserialize)]
//! struct NewPayment { amount: i64, currency: String }
//!
//! #[derive(Serialize)]
//! struct Payment { id: String, amount: i64 }
//!
//! // Runs at most once per (API key, Idempotency-Key); keeps the response
//! // for 24 hours.
//! #[idempotent(ttl = "24h", scope = "api_key")]
//! async fn create_payment(
//!     State(db): State<Db>,
//!     Json(req): Json<NewPayment>,
//! ) -> Result<(StatusCode, Json<Payment>), StatusCode> {
//!     let _ = db;
//!     Ok((StatusCode::CREATED, Json(Payment { id: "pay_1".into(), amount: req.amount })))
//! }
//!
//! let app: Router = Router::new()
//!     .route("/payments", post(create_payment))
//!     .with_state(Db)
//!     .layer(Idempotency::new(MemoryStore::new()));
//! ```
//!
//! The types the handler takes through `Json`, `Form`, `Query` or `Path`
//! implement `Serialize` as well as `Deserialize` (`NewPayment` above): the
//! payload check hashes them through serde. The error type may be your
//! own, as long as it implements `IntoResponse`; what is stored is the
//! response, so an error that answers 400, 402, 404 or 422 is stored and
//! replayed, and one that answers 5xx (or 408, 409, 429...) releases the
//! key for a retry. That includes a 409 of your own (an order out of
//! stock): to have it stored and replayed, add it to the default with the
//! attribute's `final_statuses = "default, 409"`. A list without `default`
//! replaces the default: `final_statuses = "2xx, 404"` stores those alone.
//!
//! [`store::MemoryStore`] keeps records in the process. A service that runs
//! on several machines, or must keep its records across restarts, uses a
//! durable store instead, such as `store::PostgresStore` (feature
//! `postgres`): `PostgresStore::connect(url)`, then `migrate()` (without
//! it, every keyed request gets `500 store-misconfigured`) and
//! `spawn_reaper(period)`, whose `Reaper` is kept while the server runs
//! (without one, expired rows are never deleted), then
//! `Idempotency::new(store)`. The [`store`] module lists the stores.
//!
//! On `SIGTERM` (a deploy), stop in this order: the server's graceful
//! shutdown (`axum::serve(..).with_graceful_shutdown(..)`), which lets the
//! requests under way finish and store their responses; then
//! [`Idempotency::drain`], which waits for the handlers whose clients went
//! away; then the reaper's `shutdown`. A process that ends before `drain`
//! returns leaves such a handler's key claimed until its lease lapses, and
//! a retry after that runs it again. [`Idempotency::drain`] shows the
//! sequence in full.
//!
//! The attribute's page lists its options (`ttl`, `lease`, `wait`,
//! `scope`, `optional`, `skip`, `name`, `final_statuses`, ...) and the
//! code it amounts to. Where no attribute fits, [`IdempotentRequest`]
//! (in a handler) and [`IdempotentLayer`] (around any route) run the same
//! engine; both still need the [`Idempotency`] layer on the router.
//!
//! Handlers are tested through a `Router`, not called directly (the
//! attribute changes the routed function's arguments): with the `test-util`
//! feature, `testing::MockStore::layer` gives the router an [`Idempotency`]
//! layer on a store with a manual clock, an operation log and injected
//! faults, and `testing::TestRequest` builds the requests (a key, an API
//! key, a JSON body) to send it with `tower::ServiceExt::oneshot` (the
//! `tower` crate, feature `util`, as a dev-dependency).
//!
//! Outcomes and failures are `tracing` events: a span `idempotent` per
//! keyed request, and an `outcome` field on each event. Nothing is printed
//! without a subscriber, so install one (`tracing_subscriber::fmt::init()`,
//! say): otherwise a `503 store-unavailable` or a `500 store-misconfigured`
//! reaches the client while its cause (a refused connection, a table never
//! created) is logged nowhere.
//!
//! # Features
//!
//! | feature | default | adds |
//! |---|---|---|
//! | `macros` | yes | the [`#[idempotent]`][attribute] attribute |
//! | `postgres` | no | `store::PostgresStore` (sqlx) |
//! | `redis` | no | `store::RedisStore` (standalone or Cluster) |
//! | `sqlite` | no | `store::SqliteStore` (sqlx) |
//! | `axum-extra` | no | [`FingerprintInput`] for axum-extra's `Query`, `Form`, `OptionalQuery`, `WithRejection` and `Cached` |
//! | `test-util` | no | `testing::MockStore` for handler tests (manual clock, operation log, injected faults, a claim held by a duplicate) and the store contract suite |
//!
//! [`store::MemoryStore`] and [`store::Tiered`] are always there.
//!
//! # Modules
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
//! - [`problem`]: the RFC 9457 errors the engine answers with;
//! - [`clock`]: the time stores read (the system's, or for the memory
//!   store a monotonic one), and a manual clock for tests;
//! - `testing` (feature `test-util`): `MockStore` and the store contract.
//!
// Without the `macros` feature the attribute is not in scope, so the links
// to it go to its page on docs.rs, which is built with every feature.
#![cfg_attr(feature = "macros", doc = "[attribute]: macro@idempotent")]
#![cfg_attr(
    not(feature = "macros"),
    doc = "[attribute]: https://docs.rs/idempotent-core/latest/idempotent_core/attr.idempotent.html"
)]
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
mod whole_body;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use endpoint::{Endpoint, FinalStatuses, StatusRange};
pub use fingerprint::{Fingerprint, FingerprintError, FingerprintInput, Fingerprinter};
pub use idempotency::{Idempotency, IdempotencyBuilder, IdempotencyFuture, IdempotencyService};
pub use key::IdempotencyKey;
pub use layer::IdempotentLayer;
pub use problem::{Problem, ProblemKind};
pub use replay::IDEMPOTENT_REPLAYED;
pub use request::IdempotentRequest;
pub use scope::{IdempotencyScope, Scope};

#[cfg(feature = "macros")]
#[cfg_attr(docsrs, doc(cfg(feature = "macros")))]
#[doc(inline)]
pub use idempotent_macros::idempotent;

/// The `sqlx` this crate's SQL stores are built on (0.8), so that a pool for
/// `PostgresStore::builder` or `SqliteStore::builder`, and its options, can
/// be named without a `sqlx` dependency of your own, which would otherwise
/// have to be the same version with the same features
/// (`idempotent_core::sqlx::PgPool`, `idempotent_core::sqlx::sqlite::SqlitePoolOptions`).
#[cfg(any(feature = "postgres", feature = "sqlite"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "postgres", feature = "sqlite"))))]
pub use sqlx;

/// The `redis` crate `RedisStore` is built on (1.x), so that a connection
/// for `RedisStore::builder` can be made without a `redis` dependency of
/// your own (add one, of the same version, for features such as
/// `cluster-async`: Cargo then builds a single `redis` with both).
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis;

#[cfg(feature = "test-util")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod testing;

/// The public types are shared across a multi-threaded runtime's tasks, and
/// errors are boxed as `Send + Sync`: losing either for one of them (a field
/// of a new type, an `Rc` or a `Cell`) would break users' code, so it fails
/// this crate's build instead.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    const fn send<T: Send>() {}
    shared::<Idempotency>();
    shared::<IdempotencyBuilder>();
    shared::<IdempotencyService<()>>();
    shared::<IdempotencyFuture<std::future::Ready<()>>>();
    shared::<IdempotentLayer>();
    shared::<layer::IdempotentService<()>>();
    send::<layer::IdempotentFuture>();
    shared::<IdempotentRequest>();
    shared::<Endpoint>();
    shared::<FinalStatuses>();
    shared::<Scope>();
    shared::<scope::ScopeDigest>();
    shared::<IdempotencyKey>();
    shared::<key::KeyError>();
    shared::<Fingerprint>();
    shared::<Fingerprinter>();
    shared::<FingerprintError>();
    shared::<Problem>();
    shared::<ProblemKind>();
    shared::<record::RecordKey>();
    shared::<record::LeaseToken>();
    shared::<record::StoredResponse>();
    shared::<record::InFlight>();
    shared::<record::Completed>();
    shared::<record::Record>();
    shared::<record::Claim>();
    shared::<record::CodecError>();
    shared::<store::StoreError>();
    shared::<store::SharedStore>();
    shared::<scope::MissingCredential>();
    shared::<store::MemoryStore>();
    shared::<store::MemoryStoreBuilder>();
    shared::<store::Tiered<store::MemoryStore>>();
    shared::<store::TieredBuilder<store::MemoryStore>>();
    shared::<clock::SystemClock>();
    shared::<clock::MonotonicClock>();
    shared::<clock::ManualClock>();
    shared::<clock::SharedClock>();
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    shared::<store::Reaper>();
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
    shared::<store::InvalidTableName>();
    #[cfg(feature = "postgres")]
    shared::<store::PostgresStore>();
    #[cfg(feature = "postgres")]
    shared::<store::PostgresStoreBuilder>();
    #[cfg(feature = "sqlite")]
    shared::<store::SqliteStore>();
    #[cfg(feature = "sqlite")]
    shared::<store::SqliteStoreBuilder>();
    #[cfg(feature = "redis")]
    shared::<store::RedisStore>();
    #[cfg(feature = "redis")]
    shared::<store::RedisStoreBuilder<redis::aio::ConnectionManager>>();
    #[cfg(feature = "test-util")]
    shared::<testing::MockStore>();
    #[cfg(feature = "test-util")]
    shared::<testing::TestRequest>();
    #[cfg(feature = "test-util")]
    shared::<testing::Operation>();
};

/// Functions whose whole point is their result are `#[must_use]`, so that
/// a result dropped by mistake (a fingerprint computed and thrown away, a
/// store built and never given to the layer) is a warning:
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// idempotent_core::Fingerprinter::new("orders.create").finish();
/// ```
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// idempotent_core::Fingerprint::from_bytes([0; 32]).to_hex();
/// ```
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// idempotent_core::store::MemoryStore::builder().build();
/// ```
///
/// The same lines, their results kept, compile:
///
/// ```
/// #![deny(unused_must_use)]
/// let _ = idempotent_core::Fingerprinter::new("orders.create").finish();
/// let _ = idempotent_core::Fingerprint::from_bytes([0; 32]).to_hex();
/// let _ = idempotent_core::store::MemoryStore::builder().build();
/// ```
#[cfg(doctest)]
pub struct ResultsAreMustUse;

/// The README's Rust examples, compiled by `cargo test --doc` so that they
/// keep to the API. They use every store, so they are compiled only with
/// every feature on, as the README's own test command runs.
#[cfg(all(
    doctest,
    feature = "macros",
    feature = "postgres",
    feature = "redis",
    feature = "sqlite",
    feature = "test-util"
))]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
