//! Keeping a claim's lease alive while its request runs.
//!
//! Almost every request finishes long before a third of its lease, and a
//! task of its own per claim (spawned, then aborted) would cost every
//! first execution a task's allocation and two trips through the
//! scheduler for renewals that never happen. So a claim is only noted in
//! a table, and one watcher task per runtime looks at the table every half
//! renewal period: a claim that has lived for most of a third of its lease
//! gets a renewal task then, which renews it at once and every third of
//! the lease after, until the claim is settled. A claim lives from when
//! it was sent: the store starts the lease when it applies the claim, and
//! its answer can come most of a store timeout later.
//!
//! The watcher keeps looking on its timer even when it finds nothing to
//! renew, rather than waiting for the next claim to wake it: a wake sent
//! from a request's task queues the watcher on that task's own worker,
//! in the slot no other worker may take from, so a handler that then held
//! its thread would hold back every claim's renewals on the runtime. Only
//! a claim with a shorter lease than any before it, or one answered so
//! late that it falls due before the watcher's next look, wakes it early,
//! and that claim, like the one that starts the watcher, yields once
//! before its handler runs so that the watcher gets to run first. So does
//! a claim whose store call suspended its task: finishing, that call
//! wakes from this task whatever waited for what it held (a renewal
//! waiting for the pooled connection the claim freed), into the same slot.
//!
//! The renewals cannot run on the handler's own task: a handler that holds
//! its thread without yielding (`block_in_place` around a synchronous
//! payment SDK, a long computation) would hold them back, the lease would
//! lapse under it, and a duplicate would run it again.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError, Weak};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use slab::Slab;
use tokio::runtime::{self, Handle};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::Instrument;

use crate::engine::{fails_until_fixed, within};
use crate::fingerprint::Fingerprint;
use crate::idempotency::Settings;
use crate::record::{LeaseToken, Record, RecordKey};
use crate::store::StoreError;

/// The claims held by one [`Idempotency`](crate::Idempotency)'s requests,
/// and the tasks that watch them, one per runtime.
#[derive(Default)]
pub(crate) struct Renewer {
    table: Mutex<Table>,
    /// Renewal tasks started so far, counted under the table's lock: a
    /// claim that finds the count where it was when the claim was held has
    /// had no renewal, so nothing can have found its lease lost, and
    /// [`Renewals::begin_storing`] answers without waiting for the lock.
    renewals_started: AtomicU64,
    /// Runs that began storing without being able to mark their claim (the
    /// table was locked): a renewal started for a claim held before one of
    /// them cannot know that its run is not storing already.
    unmarked: AtomicU64,
}

#[derive(Default)]
struct Table {
    claims: Slab<HeldClaim>,
    watchers: Vec<Watcher>,
}

/// A claim whose request is still running.
struct HeldClaim {
    runtime: runtime::Id,
    /// When the first renewal is due: a third of the lease after the claim
    /// was sent.
    due: Instant,
    lease: Duration,
    /// The endpoint's name and the key, for what the renewals log at info
    /// level or above, where the request's span (at debug) is not.
    endpoint: &'static str,
    key: RecordKey,
    held: (LeaseToken, Fingerprint),
    /// The request's span, for what the renewals log.
    span: tracing::Span,
    renewing: Option<Renewing>,
    /// The run began storing its response (see [`Renewals::begin_storing`]).
    storing: bool,
    /// [`Renewer::unmarked`] when the claim was held.
    unmarked: u64,
}

/// How far a claim's run got, as its renewal task reads it: while the
/// handler runs, a completed record of the same request is not the run's
/// own, but another request's that took the lapsed key over.
const RUNNING: u8 = 0;
/// The run may have stored its response: a completed record of the same
/// request may be its own.
const STORING: u8 = 1;
/// The run stored its record or released its key.
const SETTLED: u8 = 2;

/// The task renewing a claim, and how far its run got ([`RUNNING`],
/// [`STORING`], [`SETTLED`]): an abort does not stop a renewal that is
/// already under way, which then meets the settled claim.
struct Renewing {
    task: JoinHandle<()>,
    progress: Arc<AtomicU8>,
    /// The lease as the task knows it, for the claim's settling to tell a
    /// lapse that the task's next renewal, cut short, would have told.
    outage: SharedOutage,
}

/// An [`Outage`] that a renewal task and its claim's settling both read.
type SharedOutage = Arc<Mutex<Outage>>;

/// Locks a [`SharedOutage`].
fn lock_outage(outage: &Mutex<Outage>) -> MutexGuard<'_, Outage> {
    // Nothing panics while it is locked; it is consistent at every step.
    outage.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The task that watches one runtime's claims.
struct Watcher {
    runtime: runtime::Id,
    /// How often it looks: half the shortest renewal period it has seen.
    every: Duration,
    wake: Arc<Notify>,
}

/// A claim noted in the table: its slot, and the renewal tasks started
/// before it (see [`Renewer::renewals_started`]).
#[derive(Clone, Copy)]
struct Held {
    id: usize,
    renewals_started: u64,
}

/// What a newly held claim asks of its runtime's watcher.
enum Nudge {
    None,
    Wake(Arc<Notify>),
    Start(Arc<Notify>),
}

impl HeldClaim {
    /// When its lease ends unless renewed: a lease after the claim was
    /// sent, which was a third of the lease before `due`.
    fn held_until(&self) -> Instant {
        self.due - self.lease / 3 + self.lease
    }

    /// Tells, in the request's span, that `lease` ran out before `now`
    /// (see [`Outage::lapsed_unsent`]).
    fn tell_lapse(&self, lease: &mut Outage, now: Instant) {
        if now >= lease.held_until {
            let _entered = self.span.enter();
            lease.lapsed_unsent(now, self.endpoint, &self.key);
        }
    }
}

impl Renewer {
    fn table(&self) -> MutexGuard<'_, Table> {
        // Nothing panics while the table is locked but an allocation; the
        // table is consistent between any two statements.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes `claim` and says what its runtime's watcher must be told:
    /// nothing while it looks often enough anyway, and again before the
    /// claim falls due.
    fn hold(&self, claim: HeldClaim, every: Duration) -> (Held, Nudge) {
        let (runtime, due) = (claim.runtime, claim.due);
        let mut table = self.table();
        let claim = HeldClaim {
            unmarked: self.unmarked.load(Ordering::SeqCst),
            ..claim
        };
        let held = Held {
            id: table.claims.insert(claim),
            renewals_started: self.renewals_started.load(Ordering::Relaxed),
        };
        let position = table.watchers.iter().position(|w| w.runtime == runtime);
        let Some(watcher) = position.map(|at| &mut table.watchers[at]) else {
            let wake = Arc::new(Notify::new());
            let watcher = Watcher {
                runtime,
                every,
                wake: Arc::clone(&wake),
            };
            table.watchers.push(watcher);
            return (held, Nudge::Start(wake));
        };
        // A claim whose answer came late can fall due before that look.
        let due_sooner = due <= Instant::now() + watcher.every;
        if every >= watcher.every && !due_sooner {
            return (held, Nudge::None);
        }
        watcher.every = watcher.every.min(every);
        (held, Nudge::Wake(Arc::clone(&watcher.wake)))
    }

    /// Starts renewing this runtime's claims whose first renewal falls due
    /// before the watcher looks again, and says when to look again: `None`
    /// if the watcher is no longer in the table.
    fn start_due(&self, settings: &Arc<Settings>, runtime: runtime::Id) -> Option<Duration> {
        let mut table = self.table();
        let Table { claims, watchers } = &mut *table;
        let watcher = watchers.iter_mut().find(|w| w.runtime == runtime)?;
        let horizon = Instant::now() + watcher.every;
        for (_, claim) in claims.iter_mut() {
            if claim.runtime != runtime || claim.renewing.is_some() || claim.due > horizon {
                continue;
            }
            // Before the task can run: whatever it finds comes after the
            // count that tells its claim to look. Before `unmarked` is
            // read: a run that could not mark its claim reads this count
            // after it counted itself there.
            self.renewals_started.fetch_add(1, Ordering::SeqCst);
            let unmarked = self.unmarked.load(Ordering::SeqCst) != claim.unmarked;
            let progress = if claim.storing || unmarked {
                STORING
            } else {
                RUNNING
            };
            let progress = Arc::new(AtomicU8::new(progress));
            let outage = Arc::new(Mutex::new(Outage::new(claim.held_until())));
            let renewals = {
                // For what it tells before its task runs.
                let _entered = claim.span.enter();
                let watched = (Arc::clone(&progress), Arc::clone(&outage));
                renew_until_lost(Arc::clone(settings), claim, watched)
            };
            let task = tokio::spawn(renewals.instrument(claim.span.clone()));
            claim.renewing = Some(Renewing {
                task,
                progress,
                outage,
            });
        }
        Some(watcher.every)
    }

    /// The fingerprint of a claim of `key` that a run of this process
    /// holds, as long as its lease has not lapsed by what its renewals
    /// know: its handler runs here, or its response waits to be stored.
    pub(crate) fn held_here(&self, key: &RecordKey) -> Option<Fingerprint> {
        let now = Instant::now();
        let table = self.table();
        table.claims.iter().find_map(|(_, claim)| {
            if claim.key != *key {
                return None;
            }
            let held_until = match &claim.renewing {
                Some(renewing) => lock_outage(&renewing.outage).held_until,
                None => claim.held_until(),
            };
            (now < held_until).then_some(claim.held.1)
        })
    }

    fn forget_watcher(&self, runtime: runtime::Id) {
        self.table().watchers.retain(|w| w.runtime != runtime);
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        // Watchers would otherwise wait out their interval first: a sixth
        // of the shortest lease their runtime has seen.
        for watcher in &self.table().watchers {
            watcher.wake.notify_one();
        }
    }
}

/// Keeps a claim's lease alive until dropped.
#[must_use = "renewals stop when dropped"]
pub(crate) struct Renewals<'a> {
    renewer: &'a Renewer,
    claim: Option<Held>,
    /// This claim started its runtime's watcher, or woke it.
    nudged: bool,
}

impl<'a> Renewals<'a> {
    /// Keeps `token`'s lease on `key` alive, renewing it every third of
    /// `lease` once a third of it has passed since the claim was `sent`:
    /// the store started the lease when it applied the claim, which an
    /// answer that came late leaves well before now. Outside a tokio
    /// runtime nothing can renew (nor run the handler's timers), and
    /// nothing is started.
    pub(crate) fn start(
        settings: &'a Arc<Settings>,
        endpoint: &'static str,
        key: &RecordKey,
        lease: Duration,
        held: (LeaseToken, Fingerprint),
        sent: Instant,
    ) -> Self {
        let renewer = &settings.renewer;
        let period = lease / 3;
        let runtime = Handle::try_current();
        let (false, Ok(runtime)) = (period.is_zero(), runtime) else {
            return Self {
                renewer,
                claim: None,
                nudged: false,
            };
        };
        let claim = HeldClaim {
            runtime: runtime.id(),
            due: sent + period,
            lease,
            endpoint,
            key: key.clone(),
            held,
            span: tracing::Span::current(),
            renewing: None,
            storing: false,
            unmarked: 0,
        };
        let (held, nudge) = renewer.hold(claim, period / 2);
        let nudged = match nudge {
            Nudge::None => false,
            Nudge::Wake(wake) => {
                wake.notify_one();
                true
            }
            Nudge::Start(wake) => {
                let watch = watch(Arc::downgrade(settings), runtime.id(), wake);
                drop(runtime.spawn(watch));
                true
            }
        };
        Self {
            renewer,
            claim: Some(held),
            nudged,
        }
    }

    /// Lets the tasks that this request woke run before its handler does:
    /// the watcher that this claim started or woke, and, when the claim's
    /// answer suspended the task (`suspended`), whatever its store call
    /// woke as it finished, such as another claim's renewal waiting for
    /// the connection it freed. Queued from this task, they wait in the
    /// slot of this worker that no other worker takes from, where a
    /// handler holding its thread would keep them: the watcher, and with
    /// it every claim's renewals, or that renewal, whose lease would lapse
    /// under a request that never blocked. A claim answered at once (the
    /// in-memory store) woke nothing, and does not pay for the yield.
    pub(crate) async fn let_woken_tasks_run(&self, suspended: bool) {
        if self.nudged || suspended {
            tokio::task::yield_now().await;
        }
    }
}

impl Renewals<'_> {
    /// Stops the renewals, and says whether one of them found the lease
    /// lost (another request holds the key, or its record is gone). Asked
    /// before the run stores a record or releases the key, a lost lease is
    /// no doing of the run's own: the run's `lease_lost` then says that the
    /// key was lost while the handler ran, not that it may have been.
    pub(crate) fn stop(mut self) -> bool {
        self.stop_renewing()
    }

    /// Notes that the run begins storing its response, and says whether
    /// a renewal has found the lease lost so far. Asked before the run
    /// stores anything, a completed record of the key found later is not
    /// the run's own, whatever response it holds. Until then, a renewal
    /// that finds the lease lost knows that the handler still runs, and
    /// warns at once, whatever holds the key. The table's lock is not
    /// waited for unless a renewal has started meanwhile: a run that
    /// finds it taken counts itself unmarked instead.
    pub(crate) fn begin_storing(&self) -> bool {
        let Some(held) = self.claim else {
            return false;
        };
        let renewer = self.renewer;
        let started = renewer.renewals_started.load(Ordering::SeqCst);
        if started == held.renewals_started {
            let mut table = match renewer.table.try_lock() {
                Ok(table) => table,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    // Renewals started for claims held before this count
                    // take their runs for storing; one started before it
                    // was counted is seen below, and marked under the lock.
                    renewer.unmarked.fetch_add(1, Ordering::SeqCst);
                    let started = renewer.renewals_started.load(Ordering::SeqCst);
                    if started == held.renewals_started {
                        return false;
                    }
                    renewer.table()
                }
            };
            return mark_storing(&mut table, held);
        }
        mark_storing(&mut renewer.table(), held)
    }

    fn stop_renewing(&mut self) -> bool {
        let Some(held) = self.claim.take() else {
            return false;
        };
        let settled = self.renewer.table().claims.remove(held.id);
        let now = Instant::now();
        let Some(renewing) = &settled.renewing else {
            // The watcher never got to start renewing it: if the lease ran
            // out meanwhile, no renewal will ever say so.
            settled.tell_lapse(&mut Outage::new(settled.held_until()), now);
            return false;
        };
        renewing.progress.store(SETTLED, Ordering::Release);
        renewing.task.abort();
        // Its task, held back with the handler, may not have run since the
        // lease ran out, and is now cut short before its next renewal would
        // tell it so.
        let mut outage = lock_outage(&renewing.outage);
        if outage.under_way == 0 {
            settled.tell_lapse(&mut outage, now);
        }
        outage.lost
    }
}

impl Drop for Renewals<'_> {
    fn drop(&mut self) {
        self.stop_renewing();
    }
}

/// Marks `held`'s claim as storing, and says whether a renewal found its
/// lease lost (see [`Renewals::begin_storing`]).
fn mark_storing(table: &mut Table, held: Held) -> bool {
    let Some(claim) = table.claims.get_mut(held.id) else {
        return false;
    };
    claim.storing = true;
    let Some(renewing) = &claim.renewing else {
        return false;
    };
    renewing.progress.store(STORING, Ordering::Release);
    lock_outage(&renewing.outage).lost
}

/// Watches one runtime's claims for as long as the runtime and the
/// [`Idempotency`](crate::Idempotency) both live.
fn watch(
    settings: Weak<Settings>,
    runtime: runtime::Id,
    wake: Arc<Notify>,
) -> impl Future<Output = ()> + Send + 'static {
    // Made before the first poll, so that a watcher dropped before it ever
    // ran (its runtime ended first) is forgotten too.
    let forget = ForgetWatcher {
        settings: settings.clone(),
        runtime,
    };
    async move {
        let _forget = forget;
        loop {
            let Some(live) = settings.upgrade() else {
                return;
            };
            let again = live.renewer.start_due(&live, runtime);
            drop(live);
            let Some(after) = again else {
                return;
            };
            // Woken early by a claim with a shorter lease than any before,
            // or by the end of the service.
            drop(tokio::time::timeout(after, wake.notified()).await);
        }
    }
}

/// Lets the next claim on the runtime start a new watcher once this one
/// is gone (its runtime shut down, or it was dropped before it ran).
struct ForgetWatcher {
    settings: Weak<Settings>,
    runtime: runtime::Id,
}

impl Drop for ForgetWatcher {
    fn drop(&mut self) {
        if let Some(settings) = self.settings.upgrade() {
            settings.renewer.forget_watcher(self.runtime);
        }
    }
}

/// Warns, at once, that the lease was lost while the handler runs, unless
/// the renewal only met the claim its own run had just settled: an abort
/// does not stop a renewal that is already under way when the record is
/// stored or the key released. A warning, not the `lease_lost` outcome:
/// the run logs that once, when it settles, with what it knows only then
/// (the handler's status, and what holds the key), so that one takeover
/// is one `lease_lost`.
async fn lease_lost(
    settings: &Settings,
    endpoint: &'static str,
    key: &RecordKey,
    fingerprint: Fingerprint,
    progress: &AtomicU8,
) {
    // Settled by its own run: it stops the renewals before it releases the
    // key, and right after it stored the record.
    if progress.load(Ordering::Acquire) == SETTLED {
        tracing::debug!("a renewal met the claim its run had settled");
        return;
    }
    let stored = within(settings.store_timeout, settings.store.get(key)).await;
    // Read after the record: a run that began storing before it may have
    // stored it. While the handler runs, a record of the same request is
    // another's, which took the key over after the lease lapsed.
    let storing = progress.load(Ordering::Acquire) != RUNNING;
    let message = match stored {
        // Stored by its own run, which has not stopped the renewals yet.
        Ok(Some(Record::Completed(record))) if storing && record.fingerprint == fingerprint => {
            tracing::debug!("a renewal met the record its run had stored");
            return;
        }
        // No record at all: the store lost it, which the operator fixes
        // in the store, not by looking for a second run.
        Ok(None) => GONE,
        _ => TAKEN_OVER,
    };
    tracing::warn!(endpoint, key = %key.log_id(), "{message}");
}

/// What a renewal that found another request holding the key logs.
const TAKEN_OVER: &str = "the lease was taken over while the handler runs: it lapsed (renewals that failed or ran late, which this key's earlier events tell, a suspended process, or instances whose clocks disagree), and another request claimed the key; this run's response will not be stored, and the request may run twice: its `lease_lost` follows when the handler ends";
/// What a renewal that found no record of the key logs.
const GONE: &str = "the claim's record is gone from the store while the handler runs: the store dropped it (a restart without persistence, an eviction, a flush, a record deleted by hand) or another request took it over and released it; this run's response will not be stored, and a retry runs the request again: if the store drops records, make it keep them (for Redis, `appendonly yes` and `maxmemory-policy noeviction`); its `lease_lost` follows when the handler ends";

/// Renews `claim`'s lease now and every third of it after, until the lease
/// is lost, the store fails in a way that only fixing it ends
/// ([`fails_until_fixed`]: renewing again every eighth of a period would
/// only load the store and fail alike), or the task is aborted. A renewal
/// that has not answered yet does not hold back the next one: one that
/// hangs is outrun by the next third of the lease, and one that is only
/// slow is still applied. Giving up on a renewal before the store timeout
/// would not do: a store whose statements wait their turn (for a
/// connection, for a lock) never sends a renewal given up before its turn,
/// and the lease would lapse under the running handler though every
/// renewal would have been applied.
///
/// `watched`: how far the claim's run got, and the lease as of the
/// claim's sending (see [`Renewing`]).
fn renew_until_lost(
    settings: Arc<Settings>,
    claim: &HeldClaim,
    (progress, outage): (Arc<AtomicU8>, SharedOutage),
) -> impl Future<Output = ()> + Send + 'static {
    let (key, lease, (token, fingerprint)) = (claim.key.clone(), claim.lease, claim.held);
    let endpoint = claim.endpoint;
    let period = lease / 3;
    // Told now, by the watcher: a stalled runtime may settle the claim,
    // and abort this task, before the task ever runs.
    lock_outage(&outage).lapsed_unsent(Instant::now(), endpoint, &key);
    async move {
        let mut ticker = tokio::time::interval(period);
        // After a stall (a handler that held the thread, a paused VM), one
        // renewal, not one for every third of the lease missed, all at
        // once, per claim held: each extends the lease from now alike.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut renewing = FuturesUnordered::new();
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let sent = Instant::now();
                    lock_outage(&outage).sending(sent, endpoint, &key);
                    let renewed = settings.store.renew(&key, token, lease);
                    let renewed = within(settings.store_timeout, renewed);
                    renewing.push(renewed.map(move |renewed| (sent, renewed)));
                }
                Some((sent, renewed)) = renewing.next() => {
                    let lost = matches!(renewed, Err(StoreError::LeaseLost));
                    let mut given_up = false;
                    {
                        let mut outage = lock_outage(&outage);
                        outage.under_way -= 1;
                        match renewed {
                            Ok(()) => outage.renewed(sent + lease, endpoint, &key),
                            // `lease_lost` warns of it; the run logs the
                            // outcome when it settles.
                            Err(StoreError::LeaseLost) => {
                                outage.lapse_told = true;
                                outage.lost = true;
                            }
                            // A renewal sent later was applied already: the
                            // lease holds, and nothing needs trying again.
                            Err(error) if outage.outrun(sent + lease) => {
                                tracing::debug!(%error, "a renewal outrun by a later one failed");
                            }
                            Err(error) if fails_until_fixed(&error) => {
                                outage.given_up(&error, endpoint, &key);
                                given_up = true;
                            }
                            Err(error) => {
                                outage.failed(&error, endpoint, &key);
                                // Soon, not a whole period later: two
                                // failures a period apart would let the
                                // lease lapse under a running handler.
                                ticker.reset_after(period / 8);
                            }
                        }
                    }
                    if lost {
                        return lease_lost(&settings, endpoint, &key, fingerprint, &progress).await;
                    }
                    if given_up {
                        return;
                    }
                }
            }
        }
    }
}

/// Tells that a lease ran out `late` before its renewal could be sent:
/// nothing ran the renewals in time. A handler that held every worker
/// thread (or the one of a `current_thread` runtime) without yielding, or
/// a process that was suspended, is the usual cause, and nothing else
/// names it: a takeover's `lease_lost` says only what followed.
fn lapsed_unrenewed(endpoint: &'static str, key: &RecordKey, late: Duration) {
    tracing::error!(
        outcome = "lease_lapsed",
        endpoint,
        key = %key.log_id(),
        ?late,
        "the lease lapsed before it could be renewed: nothing ran its renewals in time (a handler holding the runtime's threads without yielding, or a suspended process); a retry may run the request again beside this one"
    );
}

/// Renewals that fail in a row, told once each way: a store that is down
/// for minutes fails them every eighth of a renewal period (every 42 ms
/// under a one-second lease, for each running request), and a warning for
/// each would bury the one thing that needs a look, the lease lapsing.
struct Outage {
    /// When the lease ends unless renewed: as of the latest renewal sent
    /// that the store applied.
    held_until: Instant,
    failures: u32,
    lapse_told: bool,
    /// A renewal found the lease lost (see [`Renewals::stop`]).
    lost: bool,
    /// Renewals sent that have not answered yet.
    under_way: usize,
}

impl Outage {
    fn new(held_until: Instant) -> Self {
        Self {
            held_until,
            failures: 0,
            lapse_told: false,
            lost: false,
            under_way: 0,
        }
    }

    /// Notes a renewal sent `now`, first telling a lapse that came with
    /// none under way (see [`lapsed_unsent`](Self::lapsed_unsent)).
    fn sending(&mut self, now: Instant, endpoint: &'static str, key: &RecordKey) {
        if self.under_way == 0 {
            self.lapsed_unsent(now, endpoint, key);
        }
        self.under_way += 1;
    }

    fn renewed(&mut self, held_until: Instant, endpoint: &'static str, key: &RecordKey) {
        if self.failures > 0 {
            let failures = self.failures;
            let key = key.log_id();
            tracing::info!(endpoint, %key, failures, "renewed the lease again");
        }
        // Renewals overlap: one sent earlier may answer after a later one.
        *self = Self {
            under_way: self.under_way,
            ..Self::new(held_until.max(self.held_until))
        };
    }

    /// Whether a renewal that would have held the lease until
    /// `held_until` was outrun by a later one the store applied.
    fn outrun(&self, held_until: Instant) -> bool {
        held_until < self.held_until
    }

    /// Tells, once, that the lease ran out before `now`, when a renewal
    /// is sent or the claim settled, with no renewal under way (the caller
    /// checks) and none failed: the store is not why (see
    /// [`lapsed_unrenewed`]).
    fn lapsed_unsent(&mut self, now: Instant, endpoint: &'static str, key: &RecordKey) {
        if self.lapse_told || self.failures > 0 || now < self.held_until {
            return;
        }
        self.lapse_told = true;
        lapsed_unrenewed(endpoint, key, now - self.held_until);
    }

    /// Tells, once and as an error, that renewals stop after `error`,
    /// which would fail them all alike (see [`fails_until_fixed`]): the
    /// error names what to fix, and the lease lapses when it runs out
    /// unless the request settles first.
    fn given_up(&mut self, error: &StoreError, endpoint: &'static str, key: &RecordKey) {
        let lapses_in = self.held_until.saturating_duration_since(Instant::now());
        tracing::error!(
            %error,
            outcome = "store_error",
            endpoint,
            key = %key.log_id(),
            ?lapses_in,
            "could not renew the lease, and will not try again: the store fails this way until what the error names is fixed; unless the request settles first, the lease lapses, and a retry may run the request again beside this one"
        );
        // This tells the lapse to come, which the claim's settling would
        // otherwise blame on a runtime that did not run the renewals.
        self.lapse_told = true;
    }

    fn failed(&mut self, error: &StoreError, endpoint: &'static str, key: &RecordKey) {
        self.failures += 1;
        let key = key.log_id();
        if self.failures == 1 {
            tracing::warn!(%error, endpoint, %key, "could not renew the lease; retrying");
        } else {
            tracing::debug!(%error, failures = self.failures, "could not renew the lease; retrying");
        }
        if !self.lapse_told && Instant::now() >= self.held_until {
            self.lapse_told = true;
            tracing::error!(
                %error,
                outcome = "lease_lapsed",
                endpoint,
                %key,
                "the lease lapsed while the store could not renew it; a retry may run the request again beside this one"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Idempotency;
    use crate::key::IdempotencyKey;
    use crate::scope::ScopeDigest;
    use crate::store::MemoryStore;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// A claim's token and fingerprint, as a claim hands them on.
    fn held() -> (LeaseToken, Fingerprint) {
        (LeaseToken::random(), Fingerprint::from_bytes([0; 32]))
    }

    fn record_key() -> RecordKey {
        RecordKey::new(
            ScopeDigest::global(),
            IdempotencyKey::parse(b"k").expect("a valid key"),
        )
    }

    /// Every stored response asks whether its lease was lost: while no
    /// renewal has started, that answer must not wait for the table,
    /// which every claim, settling and watcher's look locks.
    #[test]
    fn a_claim_never_renewed_is_not_lost_without_waiting_for_the_table() {
        let settings = Idempotency::new(MemoryStore::new()).inner;
        let runtime = runtime();
        let _entered = runtime.enter();
        let held = held();
        let lease = Duration::from_secs(60);
        let key = record_key();
        let renewals = Renewals::start(&settings, "pay", &key, lease, held, Instant::now());
        let (answered, answer) = std::sync::mpsc::channel();
        std::thread::scope(|threads| {
            let table = settings.renewer.table();
            threads.spawn(|| {
                let lost = renewals.begin_storing();
                answered.send(lost).expect("the test waits");
            });
            let lost = answer.recv_timeout(Duration::from_secs(5));
            drop(table);
            assert_eq!(lost, Ok(false), "waited for the table's lock");
        });
    }

    /// A renewal that found the lease lost is still told to the run that
    /// asks before it stores its response.
    #[test]
    fn a_lease_a_renewal_found_lost_is_told_to_the_run() {
        let settings = Idempotency::new(MemoryStore::new()).inner;
        let runtime = runtime();
        runtime.block_on(async {
            // Never claimed in the store: its first renewal finds it lost.
            let held = held();
            let lease = Duration::from_secs(60);
            let key = record_key();
            let sent = Instant::now() - lease;
            let renewals = Renewals::start(&settings, "pay", &key, lease, held, sent);
            assert!(!renewals.begin_storing(), "lost before any renewal ran");
            settings
                .renewer
                .start_due(&settings, Handle::current().id())
                .expect("the claim's watcher is in the table");
            for _ in 0..100 {
                if renewals.begin_storing() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(
                renewals.begin_storing(),
                "the renewal's lost lease is not told"
            );
            assert!(renewals.stop());
        });
    }

    /// How far the run of the claim `renewals` holds got, as the renewal
    /// task that the watcher starts now is told.
    fn progress_told(settings: &Arc<Settings>, renewals: &Renewals<'_>) -> u8 {
        let runtime = Handle::current().id();
        settings
            .renewer
            .start_due(settings, runtime)
            .expect("a watcher");
        let id = renewals.claim.expect("a claim").id;
        let table = settings.renewer.table();
        let renewing = table.claims[id].renewing.as_ref().expect("renewing");
        renewing.progress.load(Ordering::Acquire)
    }

    /// A renewal started once the run began storing may meet the record
    /// the run stored: it must not warn of a takeover then. One started
    /// while the handler runs must, whatever the record holds. The run
    /// marks its claim whether or not a renewal had started, and when the
    /// table is locked as it begins storing, renewals started later take
    /// it for storing rather than wait for the lock.
    #[test]
    fn a_renewal_knows_whether_its_run_began_storing() {
        let settings = Idempotency::new(MemoryStore::new()).inner;
        let runtime = runtime();
        runtime.block_on(async {
            let (lease, key) = (Duration::from_secs(60), record_key());
            let due = Instant::now() - lease;
            let start = || Renewals::start(&settings, "pay", &key, lease, held(), due);
            let running = start();
            assert_eq!(progress_told(&settings, &running), RUNNING);
            let storing = start();
            assert!(!storing.begin_storing());
            assert_eq!(progress_told(&settings, &storing), STORING);
            let unmarked = start();
            std::thread::scope(|threads| {
                let _table = settings.renewer.table();
                let storing = threads.spawn(|| unmarked.begin_storing());
                assert!(!storing.join().expect("no panic"));
            });
            assert_eq!(progress_told(&settings, &unmarked), STORING);
            let renewed_first = start();
            assert_eq!(progress_told(&settings, &renewed_first), RUNNING);
            assert!(!renewed_first.begin_storing());
            let table = settings.renewer.table();
            let id = renewed_first.claim.expect("a claim").id;
            let renewing = table.claims[id].renewing.as_ref().expect("renewing");
            assert_eq!(renewing.progress.load(Ordering::Acquire), STORING);
        });
    }

    /// A runtime whose first claim settles before its watcher ever runs,
    /// and which then ends, leaves nothing behind in the table: otherwise
    /// every such runtime adds a watcher that every later claim walks past,
    /// and a later runtime given the same id (tokio allows it once the
    /// first has ended) would find a watcher that is not there.
    #[test]
    fn a_watcher_that_never_ran_is_forgotten_when_its_runtime_ends() {
        let settings = Idempotency::new(MemoryStore::new()).inner;
        let key = record_key();
        for _ in 0..3 {
            let runtime = runtime();
            runtime.block_on(async {
                let held = held();
                let lease = Duration::from_secs(60);
                let start = Instant::now();
                let renewals = Renewals::start(&settings, "pay", &key, lease, held, start);
                drop(renewals);
            });
            drop(runtime);
        }
        let table = settings.renewer.table();
        assert_eq!(table.claims.len(), 0);
        assert_eq!(
            table.watchers.len(),
            0,
            "watchers of ended runtimes are kept"
        );
    }
}
