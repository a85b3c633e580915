//! The service-wide handle: which store, and how to treat it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderName;
use tokio::task::futures::TaskLocalFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_layer::Layer;
use tower_service::Service;

use crate::exact::ExactReplays;
use crate::record::MAX_STORED_BODY;
use crate::renewal::Renewer;
use crate::store::{DynStore, SharedStore, Store};

/// How long [`Idempotency::drain`] waits for the store's background work.
const SETTLE_LIMIT: Duration = Duration::from_secs(5);

/// Idempotency for a router: the store plus service-wide settings.
///
/// This is the layer every router with idempotent routes needs, whichever
/// way they are made idempotent: add it to the router as a layer, after the
/// routes it covers; `#[idempotent]` handlers, [`IdempotentRequest`](crate::IdempotentRequest)
/// and [`IdempotentLayer`](crate::IdempotentLayer) find it there. (Not to be
/// confused with `IdempotentLayer`, which makes one route idempotent without
/// the attribute and needs this layer around it too.) Without it, every
/// request to such a route, with a key or without, gets 500
/// `not-configured`.
///
/// ```
/// use axum::{Router, routing::post};
/// use idempotent_core::{Idempotency, store::MemoryStore};
///
/// # async fn create_payment() {}
/// let app: Router = Router::new()
///     .route("/payments", post(create_payment))
///     .layer(Idempotency::new(MemoryStore::new()));
/// ```
///
/// Settings other than the store go through [`Idempotency::builder`],
/// finished with [`build`](IdempotencyBuilder::build) (the builder itself
/// is not a layer):
///
/// ```
/// use std::time::Duration;
/// use axum::{Router, http::HeaderName, routing::post};
/// use idempotent_core::{Idempotency, store::MemoryStore};
///
/// # async fn create_payment() {}
/// let idempotency = Idempotency::builder(MemoryStore::new())
///     .store_timeout(Duration::from_millis(500))
///     .api_key_header(HeaderName::from_static("x-client-key"))
///     .build();
/// let app: Router = Router::new()
///     .route("/payments", post(create_payment))
///     .layer(idempotency.clone()); // keep `idempotency` for `drain`
/// ```
///
/// `Router::layer` wraps each route in the layer, and axum then clones and
/// boxes that route's service for every request it serves: about 1,200
/// instructions and four allocations per request on every route, whether
/// its handler is idempotent or not (`bench/`). Wrapping the whole router
/// once instead costs a route without the attribute almost nothing. That
/// calls [`Layer::layer`] itself, whose trait axum does not re-export:
/// import it from `tower` (`tower = "0.5"` in `[dependencies]`) or
/// `tower-layer`, the same trait.
///
/// ```no_run
/// use axum::{Router, ServiceExt, extract::Request, routing::post};
/// use idempotent_core::{Idempotency, store::MemoryStore};
/// use tower::Layer; // the `tower` crate: axum does not re-export the trait
///
/// # async fn create_payment() {}
/// # async fn run() -> std::io::Result<()> {
/// let routes: Router = Router::new().route("/payments", post(create_payment));
/// let app = Idempotency::new(MemoryStore::new()).layer(routes);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// axum::serve(listener, ServiceExt::<Request>::into_make_service(app)).await
/// # }
/// ```
#[doc(alias = "IdempotencyLayer", alias = "middleware")]
#[derive(Clone)]
pub struct Idempotency {
    pub(crate) inner: Arc<Settings>,
}

pub(crate) struct Settings {
    pub(crate) store: SharedStore,
    pub(crate) store_timeout: Duration,
    pub(crate) fail_open: bool,
    pub(crate) max_body_bytes: usize,
    pub(crate) api_key_header: HeaderName,
    pub(crate) exact: ExactReplays,
    /// The runs that outlived their request, for [`Idempotency::drain`].
    pub(crate) detached: TaskTracker,
    /// Cancelled by [`Idempotency::drain`]: responses still being stored
    /// later get a last attempt at once.
    pub(crate) draining: CancellationToken,
    /// Bytes of the responses waiting to be stored later.
    pub(crate) storing_later_bytes: AtomicUsize,
    /// The claims whose requests are running, kept alive past a third of
    /// their lease.
    pub(crate) renewer: Renewer,
}

impl Settings {
    /// Writes the settings a user gave, under `name`: the handle and its
    /// builder print alike.
    fn debug_as(&self, name: &str, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(name)
            .field("store_timeout", &self.store_timeout)
            .field("fail_open", &self.fail_open)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("api_key_header", &self.api_key_header)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.debug_as("Idempotency", f)
    }
}

impl Idempotency {
    /// Idempotency on `store` with default settings.
    ///
    /// `store` is a concrete store (`SqliteStore`, `MemoryStore`, a
    /// `MockStore`...). One already shared as a [`SharedStore`]
    /// (`Arc<dyn DynStore>`, as an application state that holds the store
    /// keeps it, so that its tests can put a `MockStore` there) is not a
    /// [`Store`] itself, and rustc refuses it here with "`Arc<dyn
    /// DynStore>` is not an idempotency store": give it to
    /// [`from_shared`](Self::from_shared) instead.
    #[must_use]
    pub fn new(store: impl Store) -> Self {
        Self::builder(store).build()
    }

    /// Starts building, with `store`.
    pub fn builder(store: impl Store) -> IdempotencyBuilder {
        IdempotencyBuilder::new(Arc::new(store))
    }

    /// Starts building, like [`builder`](Self::builder), on a store
    /// already shared as a [`SharedStore`] (a backend chosen at run time,
    /// say: [`Store`] itself cannot be a trait object, `Arc<dyn Store>`,
    /// so a [`DynStore`] stands in for it). Finish with
    /// [`build`](IdempotencyBuilder::build): the builder is not a layer.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use idempotent_core::Idempotency;
    /// use idempotent_core::store::{MemoryStore, SharedStore, Tiered};
    ///
    /// let store: SharedStore = Arc::new(Tiered::new(MemoryStore::new()));
    /// let idempotency = Idempotency::from_shared(store).build();
    /// # let _ = idempotency;
    /// ```
    pub fn from_shared(store: SharedStore) -> IdempotencyBuilder {
        IdempotencyBuilder::new(store)
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &dyn DynStore {
        self.inner.store.as_ref()
    }

    /// Waits for the runs that outlived their request to finish and store
    /// their outcome. A handler whose client went away runs on, on a task
    /// of its own, which a server's graceful shutdown does not wait for:
    /// await this after it, before the runtime stops, or a deploy cuts
    /// such a handler short like a crash (its key then stays claimed
    /// until the lease lapses, and a retry after that runs it again).
    /// It also waits for runs whose request has not been dropped yet:
    /// axum's graceful shutdown can return just before a connection's task
    /// drops the request it served, whose run then moves onto a task of
    /// its own; and for responses still being stored after a store error,
    /// which it has tried once more at once, giving up on those that fail.
    ///
    /// A deploy's whole shutdown, on `SIGTERM` (or Ctrl-C): the graceful
    /// shutdown lets the requests under way finish and store their
    /// responses, then this, then the SQL stores' reaper, whose
    // `Reaper` exists only with a SQL store's feature.
    #[cfg_attr(
        any(feature = "postgres", feature = "sqlite"),
        doc = "[`shutdown`](crate::store::Reaper::shutdown)"
    )]
    #[cfg_attr(
        not(any(feature = "postgres", feature = "sqlite")),
        doc = "`Reaper::shutdown`"
    )]
    /// lets a purge under way finish:
    ///
    // The example needs `PostgresStore`, which only the `postgres` feature brings.
    #[cfg_attr(feature = "postgres", doc = "```no_run")]
    #[cfg_attr(not(feature = "postgres"), doc = "```ignore")]
    /// use std::time::Duration;
    /// use idempotent_core::{Idempotency, store::PostgresStore};
    /// # async fn run(listener: tokio::net::TcpListener, routes: axum::Router) -> Result<(), Box<dyn std::error::Error>> {
    ///
    /// let store = PostgresStore::connect("postgres://app@db/app").await?;
    /// store.migrate().await?;
    /// let reaper = store.spawn_reaper(Duration::from_secs(60));
    /// let idempotency = Idempotency::new(store);
    /// let app = routes.layer(idempotency.clone()); // keep a handle for `drain`
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(shutdown_signal()) // requests under way finish
    ///     .await?;
    /// idempotency.drain().await; // runs whose clients went away finish
    /// reaper.shutdown().await;   // a purge under way finishes
    /// # Ok(())
    /// # }
    ///
    /// /// Ctrl-C (`SIGINT`), or `SIGTERM`: how systemd, Docker and Kubernetes
    /// /// stop a service. Waiting for Ctrl-C alone, a deploy would end the
    /// /// process at once, before the graceful shutdown and `drain`.
    /// async fn shutdown_signal() {
    ///     #[cfg(unix)]
    ///     let terminate = async {
    ///         use tokio::signal::unix::{SignalKind, signal};
    ///         match signal(SignalKind::terminate()) {
    ///             Ok(mut terminate) => drop(terminate.recv().await),
    ///             Err(_) => std::future::pending().await,
    ///         }
    ///     };
    ///     #[cfg(not(unix))]
    ///     let terminate = std::future::pending::<()>();
    ///     tokio::select! {
    ///         // A failure to listen disables this branch rather than ending it.
    ///         Ok(()) = tokio::signal::ctrl_c() => {}
    ///         () = terminate => {}
    ///     }
    /// }
    /// ```
    ///
    /// Runs that outlive their request after this was called are still
    /// waited for, until none is left. Then it waits, for at most five
    /// seconds, for the store's own background work
    /// ([`Store::settle`]): releases of claims that were cut short by the
    /// store timeout, which would otherwise keep their keys until their
    /// leases lapsed.
    ///
    /// It is for shutdown, and the handle stays draining after it: a
    /// response whose storing fails later, on a handle that goes on
    /// serving, gets its one last attempt at once instead of attempts for
    /// as long as a lease, and is given up if that fails (so a retry
    /// after the lease runs its handler again). A server that goes on
    /// after waiting for the runs in flight (a test between phases) goes
    /// on with a new `Idempotency`.
    pub async fn drain(&self) {
        let detached = &self.inner.detached;
        self.inner.draining.cancel();
        detached.close();
        detached.wait().await;
        // Last: the runs waited for above can leave such work behind. A
        // store that cannot finish it in time is as slow as it was when
        // it cut the claims short; their leases then lapse as before.
        let settled = tokio::time::timeout(SETTLE_LIMIT, self.inner.store.settle()).await;
        if settled.is_err() {
            tracing::warn!(
                "the store's background releases did not finish; their keys free when their leases lapse"
            );
        }
    }
}

/// Builds an [`Idempotency`]: finish with [`build`](Self::build), since the
/// builder is not a layer itself (`Router::layer` would refuse it as not
/// implementing `Layer<Route>`).
///
/// ```
/// use std::time::Duration;
/// use axum::http::HeaderName;
/// use idempotent_core::{Idempotency, store::MemoryStore};
///
/// let idempotency = Idempotency::builder(MemoryStore::new())
///     .store_timeout(Duration::from_millis(500))
///     .max_body_bytes(256 * 1024)
///     .api_key_header(HeaderName::from_static("x-client-key"))
///     .build();
/// # let _ = idempotency;
/// ```
#[must_use = "finish with `.build()` to get the `Idempotency` layer"]
pub struct IdempotencyBuilder {
    settings: Settings,
}

impl std::fmt::Debug for IdempotencyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.settings.debug_as("IdempotencyBuilder", f)
    }
}

impl IdempotencyBuilder {
    /// Default store timeout: 2 seconds.
    pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default limit on a stored response body: 1 MiB.
    pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

    fn new(store: SharedStore) -> Self {
        Self {
            settings: Settings {
                store,
                store_timeout: Self::DEFAULT_STORE_TIMEOUT,
                fail_open: false,
                max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
                api_key_header: HeaderName::from_static("x-api-key"),
                exact: ExactReplays::new(),
                detached: TaskTracker::new(),
                draining: CancellationToken::new(),
                storing_later_bytes: AtomicUsize::new(0),
                renewer: Renewer::default(),
            },
        }
    }

    /// How long any one store call may take before the request is answered
    /// 503 (default 2 s). A lease renewal that has not answered does not
    /// hold back the next, which goes out a third of the lease later; a
    /// claim answered after a third of its lease is renewed before its
    /// handler runs, since the lease may have lapsed on the way.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.settings.store_timeout = timeout;
        self
    }

    /// When a claim fails in the store, run the handler without
    /// idempotency instead of refusing the request: instead of a 503
    /// (the store failed or timed out) or a 500 `store-misconfigured`.
    /// So does a claim answered after a third of its lease whose renewal,
    /// which confirms it before the handler runs, fails or is late too.
    /// Off by default: with it on, a store outage can let a retry run a
    /// side effect twice. Each such request logs a warning. A record the
    /// store holds but cannot read ([`StoreError::Codec`](crate::store::StoreError::Codec))
    /// is still answered 500 `record-corrupt`: its request ran already.
    /// Nor is a key that a request of this process holds failed open (its
    /// handler runs here, or its response waits to be stored): it is in
    /// flight, 409, or 422 to another payload, until its lease lapses.
    pub fn fail_open(mut self, fail_open: bool) -> Self {
        self.settings.fail_open = fail_open;
        self
    }

    /// Responses with larger bodies are sent in full but stored without
    /// their body; retries then get a `response-not-stored` problem (410)
    /// and never run the handler again (default 1 MiB; at most 4 GiB less
    /// a byte, the most a stored record can hold). Stores hold less: a
    /// record over 1 GB (SQLite, PostgreSQL) or 512 MiB (Redis) is kept
    /// without its body too.
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        // Over the record format's limit a body would be cut short in the
        // store and replayed that way.
        self.settings.max_body_bytes = limit.min(MAX_STORED_BODY);
        self
    }

    /// The header that carries the API key for [`Scope::ApiKey`](crate::Scope::ApiKey)
    /// (default `x-api-key`; `Authorization: Bearer` and `Basic` are always accepted too).
    ///
    /// Its value wins over `Authorization`, and names the caller that a
    /// bearer token of the same value does, so it must carry a secret: a
    /// header that carries an identity others may know (a gateway's
    /// consumer id) scopes by [`Scope::Header`](crate::Scope::Header)
    /// instead, which no client-set `Authorization` can stand in for.
    ///
    /// The name is an `http::HeaderName` (also `axum::http::HeaderName`):
    /// `HeaderName::from_static("x-client-key")`, in lowercase.
    pub fn api_key_header(mut self, name: HeaderName) -> Self {
        self.settings.api_key_header = name;
        self
    }

    /// Builds the handle.
    #[must_use]
    pub fn build(self) -> Idempotency {
        Idempotency {
            inner: Arc::new(self.settings),
        }
    }
}

tokio::task_local! {
    /// The handle of the [`Idempotency`] layer the request being served
    /// passed through.
    static CURRENT: Idempotency;
}

impl Idempotency {
    /// The handle of the layer serving the current request: set while the
    /// layer's inner service runs, so extractors find it without a lookup
    /// in (or an allocation for) the request's extensions.
    pub(crate) fn current() -> Option<Self> {
        CURRENT.try_with(Self::clone).ok()
    }
}

impl<S> Layer<S> for Idempotency {
    type Service = IdempotencyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdempotencyService {
            inner,
            idempotency: self.clone(),
        }
    }
}

/// The service an [`Idempotency`] layer wraps routes in. It makes the
/// handle reachable from the handlers it runs, and adds nothing to the
/// request or the response: the handle is set in a task-local while the
/// inner service's future runs, not inserted into the request's
/// extensions, which would cost an allocation on every request.
///
/// A middleware inside the layer that runs the rest of the request on a
/// task it spawns leaves that task-local behind. Handlers also look for
/// the handle in the request's extensions, so such a middleware can carry
/// it there itself (`request.extensions_mut().insert(idempotency.clone())`,
/// before spawning), as can tests that call handlers without the layer.
#[derive(Clone, Debug)]
pub struct IdempotencyService<S> {
    inner: S,
    idempotency: Idempotency,
}

impl<S, R> Service<R> for IdempotencyService<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = IdempotencyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        IdempotencyFuture {
            inner: CURRENT.scope(self.idempotency.clone(), self.inner.call(request)),
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of an [`IdempotencyService`]: the inner service's
    /// future, run with the [`Idempotency`] handle reachable from the
    /// handlers it runs. It is named, rather than the runtime's own type,
    /// so that how the handle is carried can change without changing this
    /// type; it holds the inner future in place, with no allocation.
    #[must_use = "futures do nothing unless polled"]
    pub struct IdempotencyFuture<F> {
        #[pin]
        inner: TaskLocalFuture<Idempotency, F>,
    }
}

impl<F: Future> Future for IdempotencyFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

impl<F> std::fmt::Debug for IdempotencyFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    /// The inner service's future, run as the layer's named future, finds
    /// the handle that served it, and a future run outside it finds none.
    #[tokio::test]
    async fn the_layers_future_carries_the_handle_to_the_inner_service() {
        let inner = tower::service_fn(|()| async {
            Ok::<_, std::convert::Infallible>(Idempotency::current().is_some())
        });
        let mut service = Idempotency::new(MemoryStore::new()).layer(inner);
        let future: IdempotencyFuture<_> = service.call(());
        assert_eq!(future.await, Ok(true));
        assert!(Idempotency::current().is_none());
    }

    #[test]
    fn a_body_limit_past_what_a_record_holds_is_capped() {
        let idempotency = Idempotency::builder(MemoryStore::new())
            .max_body_bytes(usize::MAX)
            .build();
        assert_eq!(idempotency.inner.max_body_bytes, MAX_STORED_BODY);
    }

    /// A builder printed while the application sets it up shows the
    /// settings given so far, as the handle it builds does.
    #[test]
    fn the_builders_debug_output_shows_its_settings() {
        let builder = Idempotency::builder(MemoryStore::new())
            .store_timeout(Duration::from_millis(750))
            .fail_open(true);
        let debug = format!("{builder:?}");
        assert!(debug.contains("store_timeout: 750ms"), "{debug}");
        assert!(debug.contains("fail_open: true"), "{debug}");
        assert!(debug.contains("api_key_header: \"x-api-key\""), "{debug}");
    }
}
