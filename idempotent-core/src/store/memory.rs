//! The embedded default store: sharded hash tables in process memory.
//!
//! Each shard is a hash table behind its own mutex, holding both in-flight
//! claims and completed records, so `claim` and `complete` are each one
//! short critical section and never hold a lock across an `.await`.
//! Completed records are kept in their compact binary encoding (one
//! allocation for status, headers and body) and bounded by bytes: when a
//! shard is over its share of the budget and the store as a whole is over
//! budget (or the shard over twice its share), the completed records
//! closest to their deadline go first (with one TTL, the oldest). In-flight
//! claims are never dropped for space, since evicting one would let a
//! duplicate run the side effect a second time.
//!
//! Expiry is checked against the store's [`Clock`](crate::clock::Clock) on
//! every read (by default a [`MonotonicClock`], which a step of the wall
//! clock does not move); expired records are also purged, soonest deadline first, as
//! new records complete, and claims whose lease lapsed a minute ago (their
//! holder never completed nor released them) once they pile up. A shard's
//! table gives back its room once it is mostly empty, as after a burst of
//! keys.

mod expiries;
#[cfg(test)]
mod model;

use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use siphasher::sip128::{Hasher128, SipHasher13};

use self::expiries::{Expiries, Expiry};
use super::{EXPIRY_GRACE, Store, StoreError};
use crate::clock::{Clock, MonotonicClock, SharedClock, SystemClock, millis};
use crate::fingerprint::Fingerprint;
use crate::record::{Claim, Completed, InFlight, LeaseToken, Record, RecordKey, StoredResponse};

const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// The most shards, and the budget below which a shard is added: each
/// shard holds at least sixteen records of the default 1 MiB body limit,
/// since a full shard makes room by dropping its own records.
const MAX_SHARDS: u64 = 64;
const MIN_SHARD_BYTES: u64 = 16 * 1024 * 1024;
/// How many times its share a shard may hold while the store as a whole
/// has room. Keys land in shards at random, so some fill before others:
/// with records of a sixteenth of a share, shards that made room as soon
/// as they were over their share dropped live records while the store was
/// a third full. Bounded, so that the store stays near its budget (see
/// [`Inner::over_budget`]).
const SHARE_LIMIT: usize = 2;
/// Bounds of a shard's arena blocks: a sixty-fourth of its budget.
const MIN_BLOCK_BYTES: usize = 4 * 1024;
const MAX_BLOCK_BYTES: usize = 64 * 1024;
/// What a completed record costs beyond its encoding: its table slot and
/// its entry in the shard's expiries, rounded up.
const ENTRY_OVERHEAD_BYTES: usize = 128;
/// How many in-flight claims a shard holds before it first looks for
/// lapsed ones; after each look, twice as many as it kept.
const MIN_SWEEP_AT: usize = 64;
/// A shard's table gives back its room once that is over four times what
/// its slots take, as after a burst of keys has expired or been released:
/// hashbrown's tables never shrink by themselves.
const SPARSE_FACTOR: usize = 4;
/// Tables no larger than this keep their room: it matters little, and a
/// shard that empties and fills again would otherwise reallocate each time.
const MIN_SHRUNK_TABLE_BYTES: usize = 64 * 1024;

/// An in-memory [`Store`]: one process, lost on restart.
///
/// ```
/// use idempotent_core::store::MemoryStore;
///
/// let store = MemoryStore::builder().max_bytes(64 * 1024 * 1024).build();
/// # let _ = store;
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

pub(super) struct Inner {
    shards: Box<[ShardCell]>,
    /// The SipHash keys of slot ids, drawn at start-up.
    id_keys: (u64, u64),
    shard_budget: usize,
    /// `max_bytes`, as a count of bytes in memory.
    total_budget: usize,
    /// Size of a shard's arena blocks.
    block_bytes: usize,
    clock: SharedClock,
    /// The budget, as configured, for the warning on the first eviction.
    max_bytes: u64,
    /// Whether evicting a live record deserves a warning: not in a cache
    /// in front of a durable store, whose evicted records are read again
    /// from it.
    warn_on_eviction: bool,
    /// Whether that warning was logged: once per store, since a store too
    /// small for its traffic evicts on every completion.
    warned: AtomicBool,
    /// How long past its lease a sweep keeps a claim (ms): the stores'
    /// [`EXPIRY_GRACE`] (nobody took such a claim over, so its holder,
    /// whose renewals were held up by a stalled runtime or a suspended
    /// process, still holds it and may complete it), or nothing in a cache
    /// in front of a durable store. The cache's
    /// holds decide nothing, the durable store keeping its own claims for
    /// the grace: a completion that store takes after the hold went is
    /// only not cached.
    lapsed_grace: u64,
    /// The monotonic clock that a cache's holds lapse by, besides the
    /// store's clock (see [`Claimed::lapses_at`]); `None` in a store of its
    /// own, whose claims lapse by its clock alone.
    lapse_clock: Option<SharedClock>,
}

/// A shard behind its lock, with the bytes of its completed records
/// published beside it: a shard over its share reads the others' counts
/// to tell whether the store as a whole is over budget, without taking
/// their locks. A cache line of its own, so that a shard's writes never
/// contend with its neighbours'.
#[derive(Default)]
#[repr(align(64))]
struct ShardCell {
    /// [`Shard::bytes`] as of the shard's last change, written under its
    /// lock.
    bytes: AtomicUsize,
    shard: Mutex<Shard>,
}

impl ShardCell {
    fn lock(&self) -> MutexGuard<'_, Shard> {
        // Every critical section leaves the shard consistent before
        // anything that could panic, so a poisoned lock is still safe to
        // use.
        self.shard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes `shard`'s bytes, for the other shards to read.
    fn publish(&self, shard: &Shard) {
        self.bytes.store(shard.bytes, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Shard {
    table: HashTable<Slot>,
    /// Completed records by deadline, for eviction and purging.
    expiries: Expiries,
    /// Bytes of completed records, by [`weight`].
    bytes: usize,
    /// In-flight claims in the table. A claim nobody completes or releases
    /// (its request's task was cut short, or a caller of the store gave up
    /// on it) would stay until its key came back, outside the byte budget;
    /// the shard drops those lapsed the store's grace ago
    /// ([`Inner::lapsed_grace`]) when this reaches `sweep_at`. Counting
    /// costs a claim nothing that a list of leases would: no second probe
    /// of the table, no queue entry.
    in_flight: usize,
    /// When the next claim looks for lapsed claims; 0 until the first.
    sweep_at: usize,
    /// Completed records dropped for space before their deadline.
    evicted: u64,
    /// Spare room that new records are encoded into.
    arena: Arena,
}

/// The block that new records are carved from. A record outlives the
/// request that stores it; carving records from a few large blocks, rather
/// than one heap allocation each among the request's short-lived ones, made
/// first executions faster under glibc malloc (see BENCHMARKS.md).
///
/// A block is freed with its last record, and records leave a shard
/// soonest deadline first (or earlier, when their key is taken over), so
/// only a record due no earlier than every record carved before it is
/// carved: the records of a block then go together, and only the block
/// being emptied holds room of records already gone. A record due earlier
/// (a shorter TTL after a longer one, or a cached record of a durable
/// store) gets an allocation of its own: carved beside a longer-lived
/// record, its room and that of every record carved around it would stay
/// taken for as long as the longer-lived one lives, uncounted by the
/// budget.
#[derive(Default)]
struct Arena {
    block: BytesMut,
    /// The latest deadline of the records carved so far (Unix ms).
    latest_deadline: u64,
}

/// A slot names its record by a 128-bit keyed hash of (scope, key) rather
/// than the key itself: SipHash with a 128-bit key drawn at start-up makes
/// a collision as unlikely as guessing the key, and the slot stays small.
/// 48 bytes: a first execution writes a slot at a random place in a table
/// that grows with every record kept, so each line it spans is a likely
/// cache miss (see BENCHMARKS.md).
struct Slot {
    /// The id's two halves; `u128` would align the slot to 16 bytes.
    id: [u64; 2],
    state: State,
}

impl Slot {
    /// The hash the table files a slot under: the high half of its id.
    fn table_hash(&self) -> u64 {
        self.id[0]
    }
}

/// A record's state. An in-flight claim is boxed: it lives only while its
/// handler runs, and inline it would double every slot. A completed
/// record's deadline is read from its encoding.
enum State {
    InFlight(Box<Claimed>),
    Completed(Bytes),
}

/// An in-flight claim, as the table keeps it.
struct Claimed {
    claim: InFlight,
    /// When a cache's hold lapses on its monotonic clock
    /// ([`Inner::lapse_clock`]), besides `claim`'s deadline on the store's
    /// clock: `u64::MAX` for a store's own claims. A hold stays in this
    /// process, so it need follow no other clock; judged by the wall
    /// clock alone, a hold whose lease lapsed came back to life when that
    /// clock was set back (an NTP step), and answered in flight (409),
    /// with its lost claim's fingerprint, though another instance had
    /// taken its key over and the durable store replayed the response.
    lapses_at: u64,
}

impl Claimed {
    /// Whether the claim lapsed `grace` (ms) ago by the store's clock,
    /// which reads `now`, or lapsed by the monotonic one, which
    /// `lapse_now` reads (only if needed).
    fn lapsed(&self, now: u64, grace: u64, lapse_now: impl FnOnce() -> u64) -> bool {
        self.claim.lease_expires_at.saturating_add(grace) <= now
            || (self.lapses_at != u64::MAX && self.lapses_at <= lapse_now())
    }
}

impl State {
    /// A live record's state, `None` once `now` is past its deadline (or
    /// a hold lapsed on the monotonic clock, read by `lapse_now`).
    fn live(&self, now: u64, lapse_now: impl FnOnce() -> u64) -> Option<&Self> {
        let live = match self {
            Self::InFlight(held) => !held.lapsed(now, 0, lapse_now),
            Self::Completed(encoded) => Completed::encoded_expires_at(encoded) > now,
        };
        live.then_some(self)
    }

    /// The in-flight claim `token` holds, if this is it.
    fn held_by(&mut self, token: LeaseToken) -> Option<&mut Claimed> {
        match self {
            Self::InFlight(held) if held.claim.lease_token == token => Some(held),
            _ => None,
        }
    }
}

/// The id of `key` under `keys`, as [`Slot::id`].
fn slot_id(keys: (u64, u64), key: &RecordKey) -> [u64; 2] {
    // One pass of 128-bit SipHash-1-3, half the work of two 64-bit
    // hashes with independent keys.
    let mut hasher = SipHasher13::new_with_keys(keys.0, keys.1);
    key.hash(&mut hasher);
    let id = hasher.finish128();
    [id.h2, id.h1]
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.shards.len())
            .field("shard_budget", &self.inner.shard_budget)
            .finish_non_exhaustive()
    }
}

/// Builds a [`MemoryStore`].
#[derive(Debug)]
#[must_use]
pub struct MemoryStoreBuilder {
    max_bytes: u64,
    clock: SharedClock,
    warn_on_eviction: bool,
    lapsed_grace: Duration,
    lapse_clock: Option<SharedClock>,
}

impl MemoryStoreBuilder {
    /// Caps the memory completed records may take (default 256 MiB). When
    /// full, expired records go first, then the records closest to their
    /// deadline (with one TTL, the oldest; a retry of one of those runs
    /// again, as after its TTL); in-flight claims are never dropped.
    ///
    /// The budget is split evenly among shards (one per 16 MiB of it, up
    /// to 64). Keys are spread at random, so some shards fill before
    /// others: a shard over its share makes room only while the store as a
    /// whole is over budget, or once it holds twice its share. A shard
    /// under its share does not look at the others, so the store can go
    /// over budget by the records completed in such shards until a shard
    /// over its share next makes room: by a few records with keys spread
    /// at random, by half the budget at the very worst. Expired records
    /// count against the budget until their own shard next completes a
    /// record, so a shard left idle with expired records can make others
    /// drop live ones early. A record larger than twice its shard's share
    /// empties its shard of other records, and stays only until the
    /// shard's next record completes: keep each shard's share above half
    /// the largest response.
    ///
    /// The first time a record is dropped before its deadline, the store
    /// logs a warning; [`MemoryStore::evicted_total`] counts them all. A
    /// budget of 0 keeps only each shard's newest record.
    pub fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The clock that decides leases and expiry (default: a
    /// [`MonotonicClock`], anchored at the system time when the store is
    /// built, so that a step of the wall clock moves no lease or TTL).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Shares a clock already wrapped for sharing.
    pub(super) fn shared_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Builds a cache in front of a durable store: its evictions are not
    /// warned of, since an evicted record is read again from that store,
    /// and its holds go once their lease lapsed (see [`Inner::lapsed_grace`]).
    pub(super) fn cache(mut self) -> Self {
        self.warn_on_eviction = false;
        self.lapsed_grace = Duration::ZERO;
        self
    }

    /// Lets the holds lapse once `clock`, a monotonic one, has counted
    /// their lease, as well as by the store's clock (see [`Claimed::lapses_at`]).
    pub(super) fn lapse_clock(mut self, clock: SharedClock) -> Self {
        self.lapse_clock = Some(clock);
        self
    }

    /// Builds the store.
    #[must_use]
    pub fn build(self) -> MemoryStore {
        // Small budgets get few shards, so a shard's share stays large
        // against one record (a larger one is kept, see `evict`).
        let shards = (self.max_bytes / MIN_SHARD_BYTES).clamp(1, MAX_SHARDS);
        self.build_sharded(shards)
    }

    /// Builds the store with `shards` shards (at least one).
    fn build_sharded(self, shards: u64) -> MemoryStore {
        let shards = shards.max(1);
        let shard_budget = usize::try_from(self.max_bytes / shards).unwrap_or(usize::MAX);
        let inner = Inner {
            shards: (0..shards).map(|_| ShardCell::default()).collect(),
            id_keys: rand::random(),
            shard_budget,
            total_budget: usize::try_from(self.max_bytes).unwrap_or(usize::MAX),
            block_bytes: (shard_budget / 64).clamp(MIN_BLOCK_BYTES, MAX_BLOCK_BYTES),
            clock: self.clock,
            max_bytes: self.max_bytes,
            warn_on_eviction: self.warn_on_eviction,
            warned: AtomicBool::new(false),
            lapsed_grace: millis(self.lapsed_grace),
            lapse_clock: self.lapse_clock,
        };
        MemoryStore {
            inner: Arc::new(inner),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with default settings.
    #[must_use]
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// Starts building a store.
    pub fn builder() -> MemoryStoreBuilder {
        Self::builder_anchored_to(&SystemClock)
    }

    /// Starts building a store whose default clock starts at `wall`'s
    /// time and then keeps to the monotonic clock: the deadlines of a
    /// store in one process need agree with no other clock, and on the
    /// wall clock a step forward would make running handlers' claims look
    /// lapsed, so that their retries ran them again.
    fn builder_anchored_to(wall: &dyn Clock) -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_bytes: DEFAULT_MAX_BYTES,
            clock: Arc::new(MonotonicClock::anchored_at(wall.now_millis())),
            warn_on_eviction: true,
            lapsed_grace: EXPIRY_GRACE,
            lapse_clock: None,
        }
    }

    /// Completed records currently held (expired ones not yet purged
    /// included).
    #[must_use]
    pub fn completed_len(&self) -> u64 {
        self.count(|state| matches!(state, State::Completed(_))) as u64
    }

    /// Claims currently held (lapsed ones not yet dropped included, as
    /// [`completed_len`](Self::completed_len) counts expired records).
    #[must_use]
    pub fn in_flight_len(&self) -> usize {
        self.count(|state| matches!(state, State::InFlight(_)))
    }

    /// Bytes of completed records currently held, by the store's own
    /// weighing (encoding plus a fixed per-record overhead).
    #[must_use]
    pub fn completed_bytes(&self) -> u64 {
        self.inner
            .shards
            .iter()
            .map(|shard| shard.lock().bytes as u64)
            .sum()
    }

    /// Completed records dropped for space before their deadline since the
    /// store was built: a retry with one of their keys runs its handler
    /// again. Anything but 0 means [`max_bytes`](MemoryStoreBuilder::max_bytes)
    /// is too small for the traffic and its TTLs.
    #[must_use]
    pub fn evicted_total(&self) -> u64 {
        let shards = self.inner.shards.iter();
        shards.map(|shard| shard.lock().evicted).sum()
    }

    /// The tables themselves, for [`Tiered`](super::Tiered)'s cache.
    pub(super) fn inner(&self) -> &Inner {
        &self.inner
    }

    fn count(&self, matching: impl Fn(&State) -> bool) -> usize {
        let shards = self.inner.shards.iter();
        shards
            .map(|shard| {
                shard
                    .lock()
                    .table
                    .iter()
                    .filter(|slot| matching(&slot.state))
                    .count()
            })
            .sum()
    }
}

impl Inner {
    /// The record's id and its shard, locked.
    fn locate(&self, key: &RecordKey) -> ([u64; 2], MutexGuard<'_, Shard>) {
        let (id, cell) = self.cell_of(key);
        (id, cell.lock())
    }

    /// The record's id and the cell of its shard.
    fn cell_of(&self, key: &RecordKey) -> ([u64; 2], &ShardCell) {
        let id = slot_id(self.id_keys, key);
        (id, &self.shards[self.shard_of(id)])
    }

    /// The index of the shard that holds the record `id`.
    fn shard_of(&self, id: [u64; 2]) -> usize {
        // The table uses the low bits of the hash; pick shards by the high ones.
        (id[0] >> 40) as usize % self.shards.len()
    }

    fn now(&self) -> u64 {
        self.clock.now_millis()
    }

    /// The monotonic clock's reading, or 0 in a store without one.
    fn lapse_now(&self) -> u64 {
        self.lapse_clock
            .as_ref()
            .map_or(0, |clock| clock.now_millis())
    }

    /// When a hold taken or renewed now for `lease` lapses on the
    /// monotonic clock: never, in a store without one.
    pub(super) fn lapse_deadline(&self, lease: Duration) -> u64 {
        let clock = self.lapse_clock.as_ref();
        clock.map_or(u64::MAX, |clock| {
            clock.now_millis().saturating_add(millis(lease))
        })
    }

    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let now = self.now();
        let (id, cell) = self.cell_of(key);
        let mut shard = cell.lock();
        if shard.in_flight >= shard.sweep_at.max(MIN_SWEEP_AT) {
            drop_lapsed(&mut shard, now, self.lapsed_grace, self.lapse_now());
        }
        let acquire = || {
            let lease_token = LeaseToken::random();
            let held = Claimed {
                claim: InFlight {
                    fingerprint,
                    lease_token,
                    lease_expires_at: now.saturating_add(millis(lease)),
                },
                lapses_at: u64::MAX,
            };
            (State::InFlight(Box::new(held)), lease_token)
        };
        // One probe finds the slot or where a new one goes.
        let slot = match shard
            .table
            .entry(id[0], |slot| slot.id == id, Slot::table_hash)
        {
            Entry::Occupied(occupied) => occupied.into_mut(),
            Entry::Vacant(vacant) => {
                let (state, lease_token) = acquire();
                vacant.insert(Slot { id, state });
                shard.in_flight += 1;
                return Ok(Claim::Acquired(lease_token));
            }
        };
        let encoded = match slot.state.live(now, || self.lapse_now()) {
            Some(State::InFlight(held)) => {
                return Ok(Claim::InFlight {
                    fingerprint: held.claim.fingerprint,
                    lease_expires_at: held.claim.lease_expires_at,
                });
            }
            Some(State::Completed(encoded)) => encoded.clone(),
            // A lapsed lease or an expired record: take the key over.
            None => {
                let (state, lease_token) = acquire();
                let previous = std::mem::replace(&mut slot.state, state);
                if let State::Completed(encoded) = previous {
                    shard.bytes -= weight(&encoded);
                    shard.in_flight += 1;
                    cell.publish(&shard);
                }
                return Ok(Claim::Acquired(lease_token));
            }
        };
        // Decoding needs no lock: the encoding is immutable and shared.
        drop(shard);
        Ok(Claim::Completed(Arc::new(Completed::decode(encoded)?)))
    }

    /// Completes the in-flight record held by `token`, to expire at
    /// `expires_at`; `now` is the time the caller read that deadline from
    /// (both Unix ms), against which older records are evicted.
    pub(super) fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        now: u64,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        let (id, cell) = self.cell_of(key);
        let mut shard = cell.lock();
        let shard = &mut *shard;
        let slot = shard.table.find_mut(id[0], |slot| slot.id == id);
        let slot = slot.ok_or(StoreError::LeaseLost)?;
        let held = slot.state.held_by(token).ok_or(StoreError::LeaseLost)?;
        let record = Completed {
            fingerprint: held.claim.fingerprint,
            response,
            expires_at,
        };
        let encoded = encode_in(&mut shard.arena, &record, self.block_bytes);
        let weight = weight(&encoded);
        slot.state = State::Completed(encoded);
        shard.in_flight -= 1;
        let newest = Expiry {
            expires_at,
            hash: id[0],
        };
        shard.expiries.push(newest);
        self.account_completed(cell, shard, newest, weight, now);
        Ok(())
    }

    /// Books a record that just became completed in `shard`, its deadline
    /// (`newest`) already queued: its weight, and the evictions it makes
    /// due at `now`.
    fn account_completed(
        &self,
        cell: &ShardCell,
        shard: &mut Shard,
        newest: Expiry,
        weight: usize,
        now: u64,
    ) {
        shard.bytes += weight;
        self.evict(cell, shard, now, newest);
    }

    /// Sets the record of `key` to `state`, whatever it held before.
    fn put(&self, key: &RecordKey, state: impl FnOnce(&mut Shard) -> State) {
        let (id, cell) = self.cell_of(key);
        let mut shard = cell.lock();
        let state = state(&mut shard);
        // Holds pile up as claims do (see `Shard::in_flight`), and a cache
        // never claims: it looks for lapsed ones as it takes new ones.
        if matches!(state, State::InFlight(_))
            && shard.in_flight >= shard.sweep_at.max(MIN_SWEEP_AT)
        {
            drop_lapsed(&mut shard, self.now(), self.lapsed_grace, self.lapse_now());
        }
        let completed = match &state {
            State::Completed(encoded) => {
                Some((Completed::encoded_expires_at(encoded), weight(encoded)))
            }
            State::InFlight(_) => None,
        };
        let slot = Slot { id, state };
        // One probe finds the slot or where a new one goes, as in a claim.
        let previous = match shard
            .table
            .entry(id[0], |slot| slot.id == id, Slot::table_hash)
        {
            Entry::Occupied(mut existing) => Some(std::mem::replace(existing.get_mut(), slot)),
            Entry::Vacant(vacant) => {
                vacant.insert(slot);
                None
            }
        };
        // Whether the slot held a claim, and the deadline of the completed
        // record it held, if it did.
        let (was_in_flight, replaced_due) = match previous.map(|slot| slot.state) {
            Some(State::Completed(encoded)) => {
                shard.bytes -= weight(&encoded);
                (false, Some(Completed::encoded_expires_at(&encoded)))
            }
            Some(State::InFlight(_)) => (true, None),
            None => (false, None),
        };
        // Plus one for a claim put in, minus one for a claim replaced.
        shard.in_flight =
            shard.in_flight + usize::from(completed.is_none()) - usize::from(was_in_flight);
        match completed {
            Some((expires_at, weight)) => {
                let newest = Expiry {
                    expires_at,
                    hash: id[0],
                };
                // Entries name a record by hash and deadline, and every
                // completed record has its entry queued, so the entry of a
                // record replaced by one due at the same moment names the
                // new one too. A cache in front of a durable store
                // remembers a key's record again on every claim it cannot
                // answer (each retry with another payload): an entry each
                // time grew the queue by one per request, outside the
                // budget, until the record's deadline.
                if replaced_due != Some(expires_at) {
                    shard.expiries.push(newest);
                }
                self.account_completed(cell, &mut shard, newest, weight, self.now());
            }
            // The record it replaced, if any, gave back its bytes.
            None => cell.publish(&shard),
        }
    }

    /// Records that this process holds `key` under `token` for `lease`, as
    /// decided elsewhere, so that [`complete`](Self::complete) can keep its
    /// result. The durable store decides who holds the key; the hold's own
    /// lease (renewed with the durable one, see [`renew`](Self::renew))
    /// only lets it go as the store's claims go once it lapsed: a run cut
    /// short (its task dropped) neither completes nor releases it, and held
    /// for good, each took memory outside the budget until its key came
    /// back.
    pub(super) fn hold(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        fingerprint: Fingerprint,
        lease: Duration,
    ) {
        let held = Claimed {
            claim: InFlight {
                fingerprint,
                lease_token: token,
                lease_expires_at: self.now().saturating_add(millis(lease)),
            },
            lapses_at: self.lapse_deadline(lease),
        };
        self.put(key, |_| State::InFlight(Box::new(held)));
    }

    /// Moves the lease of the in-flight record held by `token` to
    /// `expires_at`, and its lapse on the monotonic clock to `lapses_at`
    /// (see [`lapse_deadline`](Self::lapse_deadline)), unless a renewal
    /// already moved them later.
    pub(super) fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        expires_at: u64,
        lapses_at: u64,
    ) -> Result<(), StoreError> {
        let (id, mut shard) = self.locate(key);
        let slot = shard.table.find_mut(id[0], |slot| slot.id == id);
        let slot = slot.ok_or(StoreError::LeaseLost)?;
        let held = slot.state.held_by(token).ok_or(StoreError::LeaseLost)?;
        // A renewal made before one already applied never moves it back.
        held.claim.lease_expires_at = held.claim.lease_expires_at.max(expires_at);
        held.lapses_at = held.lapses_at.max(lapses_at);
        Ok(())
    }

    /// Keeps a completed record decided elsewhere, until its own deadline.
    pub(super) fn remember(&self, key: &RecordKey, record: &Completed) {
        self.put(key, |shard| {
            State::Completed(encode_in(&mut shard.arena, record, self.block_bytes))
        });
    }

    /// Drops completed records, soonest deadline first, while the shard is
    /// over budget (see [`over_budget`](Self::over_budget)) or the soonest
    /// has expired, and publishes the bytes left. The `newest` record, just
    /// completed, is never dropped for space, even when its deadline is the
    /// soonest: its retries are the likeliest to come, and one larger than
    /// the whole budget is kept until the next record completes, rather
    /// than lost as soon as it is stored.
    fn evict(&self, cell: &ShardCell, shard: &mut Shard, now: u64, newest: Expiry) {
        let mut set_aside = None;
        let mut removed = false;
        let mut others = None;
        while let Some(first) = shard.expiries.first() {
            let expired = first.expires_at <= now;
            if !expired && !self.over_budget(cell, shard.bytes, &mut others) {
                break;
            }
            shard.expiries.pop_first();
            if first == newest && first.expires_at > now {
                set_aside = Some(first);
                continue;
            }
            removed = true;
            let Expiry { expires_at, hash } = first;
            // The table calls this for every slot whose hash shares a few
            // bits with `hash`, so the slot's own hash must be compared too:
            // a neighbour completed in the same millisecond would otherwise
            // go in this record's place, and this one stay for good.
            let listed = |slot: &Slot| {
                slot.table_hash() == hash
                    && matches!(&slot.state, State::Completed(encoded)
                        if Completed::encoded_expires_at(encoded) == expires_at)
            };
            if let Ok(entry) = shard.table.find_entry(hash, listed) {
                let (slot, _) = entry.remove();
                if let State::Completed(encoded) = slot.state {
                    shard.bytes -= weight(&encoded);
                }
                if expires_at > now {
                    self.evicted_live(shard);
                }
            }
        }
        if let Some(newest) = set_aside {
            shard.expiries.push(newest);
        }
        cell.publish(shard);
        if removed {
            give_back_room(shard);
        }
    }

    /// Whether the shard in `cell`, holding `bytes`, must make room: once
    /// it is over its share, if it is over [`SHARE_LIMIT`] times its share
    /// or the store as a whole is over budget. Only a shard over its share
    /// sums the others' published counts, once per eviction (`others`
    /// keeps the sum), so that completions in a store with room pay
    /// nothing for it.
    ///
    /// A shard under its share takes records without looking at the
    /// total, so the store can go over budget until a shard over its share
    /// next makes room. It holds at most half again its budget (give or
    /// take the records completing at that moment): when the last shard
    /// to grow past its share did, the shards over their share held at
    /// most the budget, so at twice their share at most half the shards
    /// were, and each of the others held at most its share.
    fn over_budget(&self, cell: &ShardCell, bytes: usize, others: &mut Option<usize>) -> bool {
        if bytes <= self.shard_budget {
            return false;
        }
        if bytes > self.shard_budget.saturating_mul(SHARE_LIMIT) {
            return true;
        }
        let others = *others.get_or_insert_with(|| self.bytes_outside(cell));
        others.saturating_add(bytes) > self.total_budget
    }

    /// The bytes the shards other than `cell`'s last published.
    fn bytes_outside(&self, cell: &ShardCell) -> usize {
        let others = self
            .shards
            .iter()
            .filter(|other| !std::ptr::eq(*other, cell));
        others
            .map(|other| other.bytes.load(Ordering::Relaxed))
            .fold(0, usize::saturating_add)
    }

    /// Counts a live record dropped for space, and warns of the first: a
    /// retry with its key runs the handler again, which is what the store
    /// is there to prevent.
    fn evicted_live(&self, shard: &mut Shard) {
        shard.evicted += 1;
        // A load first: a full store evicts on every completion, and a
        // swap would write the shared flag each time.
        if self.warn_on_eviction
            && !self.warned.load(Ordering::Relaxed)
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                max_bytes = self.max_bytes,
                shard_budget = self.shard_budget,
                "the in-memory idempotency store is full and dropped a completed record before \
                 its TTL: a retry with its key will run the handler again; raise \
                 MemoryStore::builder().max_bytes (MemoryStore::evicted_total counts these)"
            );
        }
    }

    /// Frees the in-flight record held by `token`.
    pub(super) fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        let (id, mut shard) = self.locate(key);
        let entry = shard.table.find_entry(id[0], |slot| slot.id == id);
        let mut entry = entry.map_err(|_| StoreError::LeaseLost)?;
        entry
            .get_mut()
            .state
            .held_by(token)
            .ok_or(StoreError::LeaseLost)?;
        entry.remove();
        shard.in_flight -= 1;
        give_back_room(&mut shard);
        Ok(())
    }

    pub(super) fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        let now = self.now();
        let (id, shard) = self.locate(key);
        let Some(slot) = shard.table.find(id[0], |slot| slot.id == id) else {
            return Ok(None);
        };
        match slot.state.live(now, || self.lapse_now()) {
            Some(State::InFlight(held)) => Ok(Some(Record::InFlight(held.claim.clone()))),
            Some(State::Completed(encoded)) => {
                let encoded = encoded.clone();
                drop(shard);
                Ok(Some(Record::Completed(Arc::new(Completed::decode(
                    encoded,
                )?))))
            }
            None => Ok(None),
        }
    }
}

impl Store for MemoryStore {
    async fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.inner.claim(key, fingerprint, lease)
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let expires = self.inner.now().saturating_add(millis(lease));
        self.inner.renew(key, token, expires, u64::MAX)
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let now = self.inner.now();
        let expires_at = now.saturating_add(millis(ttl));
        self.inner.complete(key, token, response, now, expires_at)
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.inner.release(key, token)
    }

    async fn get(&self, key: &RecordKey) -> Result<Option<Record>, StoreError> {
        self.inner.get(key)
    }

    fn deadline_clock(&self) -> Option<SharedClock> {
        Some(self.inner.clock.clone())
    }
}

/// Drops the shard's in-flight claims whose lease lapsed `grace` (ms) or
/// more before `now`; a renewed lease carries its new deadline, so a live
/// claim is never dropped, nor one lapsed more recently, whose holder may
/// still complete it. It walks the whole table, so it runs only once
/// claims have doubled since the last walk (64 at first): with claims
/// that complete, only when a shard holds 64 in flight at once, and then
/// twice as many as it kept at its last walk. A shard so holds at most
/// 64 claims, or twice those it kept at its last walk: the claims running
/// then, and those abandoned within a lease and the grace before. Claims
/// that complete do not lower that mark, so after a burst of running
/// claims, abandoned ones pile up to twice the burst, however slowly they
/// come: lowering it as claims complete would walk the table again and
/// again under a steady load of running claims.
fn drop_lapsed(shard: &mut Shard, now: u64, grace: u64, lapse_now: u64) {
    let mut dropped = 0;
    shard.table.retain(|slot| {
        let lapsed = matches!(&slot.state,
            State::InFlight(held) if held.lapsed(now, grace, || lapse_now));
        dropped += usize::from(lapsed);
        !lapsed
    });
    shard.in_flight -= dropped;
    shard.sweep_at = shard.in_flight * 2;
    give_back_room(shard);
}

/// Shrinks the shard's table and deadline queue to fit once they are
/// mostly empty room. Without it, a burst of keys left its tables at their
/// peak size for good, uncounted by the budget, after every key had
/// expired. Shrinking moves only the entries left, and only after most
/// entries went, so the removals before it pay for it.
fn give_back_room(shard: &mut Shard) {
    let table = &mut shard.table;
    let needed = table.len() * std::mem::size_of::<Slot>() * SPARSE_FACTOR;
    if table.allocation_size() > needed.max(MIN_SHRUNK_TABLE_BYTES) {
        table.shrink_to_fit(Slot::table_hash);
    }
    shard.expiries.give_back_room(SPARSE_FACTOR);
}

/// `record`'s encoding, carved from the shard's arena; a record larger
/// than a quarter block, or due before a record already carved, gets an
/// allocation of its own (see [`Arena`]).
fn encode_in(arena: &mut Arena, record: &Completed, block_bytes: usize) -> Bytes {
    let len = record.encoded_len();
    if len > block_bytes / 4 || record.expires_at < arena.latest_deadline {
        return record.encode();
    }
    arena.latest_deadline = record.expires_at;
    if arena.block.capacity() < len {
        arena.block = BytesMut::with_capacity(block_bytes);
    }
    record.encode_into(&mut arena.block);
    arena.block.split().freeze()
}

fn weight(encoded: &Bytes) -> usize {
    encoded.len() + ENTRY_OVERHEAD_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::key::IdempotencyKey;
    use crate::scope::ScopeDigest;
    use http::StatusCode;

    const LEASE: Duration = Duration::from_secs(60);
    const FINGERPRINT: Fingerprint = Fingerprint::from_bytes([9; 32]);

    fn key(name: &str) -> RecordKey {
        RecordKey::new(
            ScopeDigest::global(),
            IdempotencyKey::parse(name.as_bytes()).unwrap(),
        )
    }

    fn response(body_len: usize) -> StoredResponse {
        StoredResponse {
            status: StatusCode::OK,
            headers: Vec::new(),
            body: Some(vec![1; body_len].into()),
        }
    }

    fn complete(store: &MemoryStore, name: &str, body_len: usize, ttl: Duration) {
        let key = key(name);
        let Ok(Claim::Acquired(token)) = store.inner.claim(&key, FINGERPRINT, LEASE) else {
            panic!("{name} is new");
        };
        let now = store.inner.now();
        store
            .inner
            .complete(&key, token, response(body_len), now, now + millis(ttl))
            .unwrap();
    }

    /// A store of `max_bytes` on a manual clock at zero (one shard below
    /// 16 MiB, so purging and eviction, which are per shard, see every
    /// record).
    fn clocked(max_bytes: u64) -> (ManualClock, MemoryStore) {
        let clock = ManualClock::new(0);
        let store = MemoryStore::builder()
            .clock(clock.clone())
            .max_bytes(max_bytes)
            .build();
        (clock, store)
    }

    fn is_completed(store: &MemoryStore, name: &str) -> bool {
        matches!(store.inner.get(&key(name)), Ok(Some(Record::Completed(_))))
    }

    #[test]
    fn a_slot_takes_48_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 48);
    }

    #[test]
    fn a_completed_records_deadline_is_read_from_its_encoding() {
        let clock = ManualClock::new(1_000);
        let store = MemoryStore::builder().clock(clock.clone()).build();
        complete(&store, "k", 10, Duration::from_secs(5));
        clock.advance(Duration::from_millis(4_999));
        assert!(is_completed(&store, "k"));
        clock.advance(Duration::from_millis(1));
        assert!(!is_completed(&store, "k"));
    }

    #[test]
    fn with_one_ttl_the_oldest_completed_records_are_evicted_first() {
        let store = MemoryStore::builder().max_bytes(4 * 1024).build();
        for i in 0..10 {
            complete(&store, &format!("k{i}"), 600, Duration::from_secs(600));
        }
        assert!(store.completed_bytes() <= 4 * 1024);
        assert!(!is_completed(&store, "k0"));
        assert!(is_completed(&store, "k9"));
    }

    #[test]
    fn a_record_larger_than_the_budget_is_kept_until_the_next_one_completes() {
        let store = MemoryStore::builder().max_bytes(64 * 1024).build();
        complete(&store, "large", 100 * 1024, Duration::from_secs(600));
        assert!(is_completed(&store, "large"));
        complete(&store, "next", 10, Duration::from_secs(600));
        assert!(is_completed(&store, "next"));
        assert!(!is_completed(&store, "large"));
        assert!(store.completed_bytes() <= 64 * 1024);
    }

    #[test]
    fn the_record_just_completed_stays_even_when_its_deadline_is_the_soonest() {
        let store = MemoryStore::builder().max_bytes(4 * 1024).build();
        complete(&store, "day", 2_000, Duration::from_secs(86_400));
        complete(&store, "hour", 2_000, Duration::from_secs(3_600));
        assert!(
            is_completed(&store, "hour"),
            "the newest record was evicted"
        );
        assert!(!is_completed(&store, "day"));
        assert!(store.completed_bytes() <= 4 * 1024);
    }

    #[test]
    fn a_store_keeps_records_at_the_default_body_limit_while_it_has_room() {
        let store = MemoryStore::builder().max_bytes(16 * 1024 * 1024).build();
        for i in 0..8 {
            complete(
                &store,
                &format!("k{i}"),
                1024 * 1024,
                Duration::from_secs(600),
            );
        }
        for i in 0..8 {
            assert!(is_completed(&store, &format!("k{i}")), "k{i} was evicted");
        }
    }

    /// Names of keys that land in `shard`, the `next` of them on: keys
    /// are spread at random, so a test that must fill one shard before
    /// the others picks its keys.
    fn keys_in(store: &MemoryStore, shard: usize, next: &mut usize) -> String {
        loop {
            let name = format!("k{next}");
            *next += 1;
            let id = slot_id(store.inner.id_keys, &key(&name));
            if store.inner.shard_of(id) == shard {
                return name;
            }
        }
    }

    #[test]
    fn a_store_keeps_large_records_until_it_is_full_whichever_shards_they_land_in() {
        const MIB: usize = 1024 * 1024;
        let max_bytes = 64 * MIB;
        let store = MemoryStore::builder().max_bytes(max_bytes as u64).build();
        // Four shards of 16 MiB. Keys favour one: it takes 24 records of
        // the 63 that fit, then the others take theirs in turn.
        assert_eq!(store.inner.shards.len(), 4);
        let shards = std::iter::repeat_n(0, 24).chain((0..39).map(|i| 1 + i % 3));
        let mut next = 0;
        for (stored, shard) in shards.enumerate() {
            let name = keys_in(&store, shard, &mut next);
            complete(&store, &name, MIB, Duration::from_secs(600));
            let held = store.completed_bytes();
            assert_eq!(
                store.evicted_total(),
                0,
                "a record was evicted as record {stored} completed, {held} B held of {max_bytes} B"
            );
        }
        let held = store.completed_bytes() as usize;
        assert!(held + MIB > max_bytes, "the store is full: {held} B held");
        // Past the budget, a shard over its share makes room for each
        // record it takes, and one under its share until it is full.
        for shard in (0..24).map(|i| i % 4) {
            let name = keys_in(&store, shard, &mut next);
            complete(&store, &name, MIB, Duration::from_secs(600));
            let held = store.completed_bytes() as usize;
            assert!(
                held <= max_bytes + 3 * MIB,
                "{held} B held of {max_bytes} B"
            );
        }
        assert!(store.evicted_total() > 0);
    }

    #[test]
    fn eviction_takes_the_queued_record_not_a_neighbour_with_its_deadline() {
        let store = MemoryStore::new();
        let inner = &store.inner;
        let cell = &inner.shards[0];
        let mut shard = cell.lock();
        shard.table.reserve(1024, Slot::table_hash);
        // `queued` hashes to the place `blocker` holds, so it is filed
        // after `neighbour`, whose hash shares the top seven bits the
        // table compares before asking whether a slot is the one sought.
        let tag = 0x5a << 57;
        let neighbour = [tag | 5, 1];
        let blocker = [1 << 57 | 4, 2];
        let queued = [tag | 4, 3];
        for id in [neighbour, blocker, queued] {
            let record = Completed {
                fingerprint: FINGERPRINT,
                response: response(10),
                expires_at: 1_000,
            };
            let encoded = encode_in(&mut shard.arena, &record, inner.block_bytes);
            shard.bytes += weight(&encoded);
            let state = State::Completed(encoded);
            shard
                .table
                .insert_unique(id[0], Slot { id, state }, Slot::table_hash);
        }
        shard.expiries.push(Expiry {
            expires_at: 1_000,
            hash: queued[0],
        });
        let no_newest = Expiry {
            expires_at: u64::MAX,
            hash: 0,
        };
        inner.evict(cell, &mut shard, 2_000, no_newest);
        let present = |id: [u64; 2]| shard.table.find(id[0], |slot| slot.id == id).is_some();
        assert!(!present(queued), "the queued record stays");
        assert!(present(neighbour), "its neighbour went in its place");
    }

    #[test]
    fn expired_records_are_purged_as_new_ones_complete() {
        let (clock, store) = clocked(512 * 1024);
        complete(&store, "short", 10, Duration::from_secs(1));
        clock.advance(Duration::from_secs(2));
        complete(&store, "later", 10, Duration::from_secs(600));
        assert_eq!(store.completed_len(), 1);
    }

    #[test]
    fn expired_records_go_before_a_live_one_that_completed_earlier() {
        // Room for five of these records.
        let (clock, store) = clocked(4 * 1024);
        complete(&store, "long", 600, Duration::from_secs(600));
        for i in 0..3 {
            complete(&store, &format!("short{i}"), 600, Duration::from_secs(1));
        }
        clock.advance(Duration::from_secs(2));
        for i in 0..3 {
            complete(&store, &format!("new{i}"), 600, Duration::from_secs(600));
        }
        assert!(is_completed(&store, "long"), "the live record was evicted");
        assert_eq!(store.completed_len(), 4, "the expired records stay");
    }

    #[test]
    fn space_is_taken_from_the_records_closest_to_their_deadline() {
        let (clock, store) = clocked(4 * 1024);
        complete(&store, "day", 600, Duration::from_secs(86_400));
        complete(&store, "hour", 600, Duration::from_secs(3_600));
        for i in 0..4 {
            // Deadlines a second apart: records of one millisecond go in
            // no particular order.
            clock.advance(Duration::from_secs(1));
            complete(&store, &format!("minute{i}"), 600, Duration::from_secs(60));
        }
        assert!(is_completed(&store, "day"));
        assert!(is_completed(&store, "hour"));
        assert!(!is_completed(&store, "minute0"));
        assert!(store.completed_bytes() <= 4 * 1024);
    }

    #[test]
    fn a_stale_expiry_does_not_evict_the_keys_new_record() {
        let (clock, store) = clocked(512 * 1024);
        complete(&store, "reused", 10, Duration::from_secs(1));
        clock.advance(Duration::from_secs(2));
        complete(&store, "reused", 10, Duration::from_secs(600));
        complete(&store, "other", 10, Duration::from_secs(600));
        assert!(
            is_completed(&store, "reused"),
            "the record completed after expiry stays"
        );
        assert_eq!(store.completed_len(), 2);
    }

    #[test]
    fn in_flight_claims_stay_while_completed_records_are_evicted() {
        let (_clock, store) = clocked(4 * 1024);
        let held: Vec<_> = (0..100)
            .map(|i| {
                let key = key(&format!("held{i}"));
                let Ok(Claim::Acquired(token)) = store.inner.claim(&key, FINGERPRINT, LEASE) else {
                    panic!("held{i} is new");
                };
                (key, token)
            })
            .collect();
        for i in 0..100 {
            complete(&store, &format!("done{i}"), 600, Duration::from_secs(600));
        }
        assert!(store.completed_bytes() <= 4 * 1024);
        assert_eq!(store.in_flight_len(), 100);
        for (key, token) in held {
            assert!(matches!(
                store.inner.claim(&key, FINGERPRINT, LEASE),
                Ok(Claim::InFlight { .. })
            ));
            store
                .inner
                .complete(&key, token, response(10), 0, 1_000)
                .expect("the claim is still held");
        }
    }

    /// Whether `name`'s completed record shares its allocation (an arena
    /// block) with other records or the arena.
    fn shares_a_block(store: &MemoryStore, name: &str) -> bool {
        let (id, shard) = store.inner.locate(&key(name));
        let slot = shard.table.find(id[0], |slot| slot.id == id);
        match slot.map(|slot| &slot.state) {
            Some(State::Completed(encoded)) => !encoded.is_unique(),
            _ => panic!("{name} is not completed"),
        }
    }

    #[test]
    fn a_record_due_before_one_already_in_a_block_is_not_carved_from_it() {
        let (_clock, store) = clocked(512 * 1024);
        complete(&store, "day", 10, Duration::from_secs(86_400));
        // Carved from the block that holds `day`, `minute` would keep its
        // share of that block, and the records carved after it theirs,
        // for as long as `day` lives.
        complete(&store, "minute", 10, Duration::from_secs(60));
        assert!(
            !shares_a_block(&store, "minute"),
            "the shorter-lived record was carved from the longer-lived one's block"
        );
        complete(&store, "day2", 10, Duration::from_secs(86_400));
        assert!(
            shares_a_block(&store, "day2"),
            "records due in completion order are carved from blocks"
        );
    }

    fn claimed(store: &MemoryStore, name: &str, lease: Duration) -> LeaseToken {
        match store.inner.claim(&key(name), FINGERPRINT, lease) {
            Ok(Claim::Acquired(token)) => token,
            other => panic!("{name} is free: {other:?}"),
        }
    }

    /// The shards' own counts of their in-flight claims.
    fn counted_in_flight(store: &MemoryStore) -> usize {
        store.inner.shards.iter().map(|s| s.lock().in_flight).sum()
    }

    #[test]
    fn claims_whose_lease_lapsed_are_dropped_once_they_pile_up() {
        let (clock, store) = clocked(512 * 1024);
        for i in 0..100 {
            claimed(&store, &format!("abandoned{i}"), LEASE);
        }
        clock.advance(LEASE + EXPIRY_GRACE);
        let live: Vec<_> = (0..200)
            .map(|i| (i, claimed(&store, &format!("live{i}"), LEASE * 2)))
            .collect();
        assert_eq!(store.in_flight_len(), 200, "lapsed claims linger");
        for (i, token) in live {
            let completed =
                store
                    .inner
                    .complete(&key(&format!("live{i}")), token, response(1), 0, 1);
            completed.expect("a live claim is never dropped");
        }
    }

    /// A holder whose renewals were held up past its lease, with nobody
    /// claiming its key meanwhile, still holds its claim (the store
    /// contract) when claims of other keys pile up and its shard sweeps:
    /// dropped, its completion was refused, and a retry ran it again.
    #[tokio::test]
    async fn a_claim_lapsed_within_the_grace_outlives_a_sweep() {
        let (clock, store) = clocked(512 * 1024);
        let held_up = claimed(&store, "held-up", LEASE);
        clock.advance(LEASE + Duration::from_secs(1));
        for i in 0..MIN_SWEEP_AT {
            claimed(&store, &format!("k{i}"), LEASE);
        }
        let ttl = Duration::from_secs(600);
        let completed = Store::complete(&store, &key("held-up"), held_up, response(1), ttl).await;
        assert!(completed.is_ok(), "the holder completes: {completed:?}");
        assert!(is_completed(&store, "held-up"));
    }

    #[tokio::test]
    async fn a_renewed_claim_is_not_dropped_at_its_first_deadline() {
        let (clock, store) = clocked(512 * 1024);
        let renewed = claimed(&store, "renewed", LEASE);
        claimed(&store, "lapsing", LEASE);
        clock.advance(LEASE / 2);
        Store::renew(&store, &key("renewed"), renewed, LEASE + EXPIRY_GRACE)
            .await
            .expect("the claim is held");
        // Its first deadline the grace ago.
        clock.advance(LEASE / 2 + EXPIRY_GRACE);
        for i in 0..MIN_SWEEP_AT {
            claimed(&store, &format!("k{i}"), LEASE);
        }
        assert!(matches!(
            store.inner.get(&key("renewed")),
            Ok(Some(Record::InFlight(held))) if held.lease_token == renewed
        ));
        assert_eq!(store.inner.get(&key("lapsing")).unwrap(), None);
        assert_eq!(store.in_flight_len(), MIN_SWEEP_AT + 1);
    }

    #[test]
    fn the_in_flight_count_follows_every_change() {
        let (clock, store) = clocked(512 * 1024);
        let inner = &store.inner;
        let completed = claimed(&store, "completed", LEASE);
        inner
            .complete(&key("completed"), completed, response(1), 0, 10)
            .unwrap();
        let released = claimed(&store, "released", LEASE);
        inner.release(&key("released"), released).unwrap();
        claimed(&store, "lapsed", LEASE);
        inner.hold(&key("held"), LeaseToken::random(), FINGERPRINT, LEASE);
        inner.hold(&key("held-twice"), LeaseToken::random(), FINGERPRINT, LEASE);
        inner.hold(&key("held-twice"), LeaseToken::random(), FINGERPRINT, LEASE);
        let cached = Completed {
            fingerprint: FINGERPRINT,
            response: response(1),
            expires_at: 1_000_000,
        };
        inner.hold(&key("remembered"), LeaseToken::random(), FINGERPRINT, LEASE);
        inner.remember(&key("remembered"), &cached);
        clock.advance(LEASE);
        // Taking over a lapsed claim and an expired record.
        claimed(&store, "lapsed", LEASE);
        claimed(&store, "completed", LEASE);
        assert_eq!(counted_in_flight(&store), store.in_flight_len());
        assert_eq!(store.in_flight_len(), 4);
    }

    /// Heap the shard's table and deadline queue hold, in bytes.
    fn table_bytes(store: &MemoryStore) -> usize {
        let shard = store.inner.shards[0].lock();
        let queued = shard.expiries.allocation_size();
        shard.table.allocation_size() + queued
    }

    #[test]
    fn a_shard_gives_back_the_room_of_a_burst_once_its_keys_are_gone() {
        // 16 MiB: one shard, with room for the whole burst.
        let (clock, store) = clocked(16 * 1024 * 1024);
        let empty = table_bytes(&store);
        for i in 0..20_000 {
            complete(&store, &format!("burst{i}"), 10, Duration::from_secs(1));
        }
        let peak = table_bytes(&store);
        clock.advance(Duration::from_secs(2));
        // The next completion purges the burst.
        complete(&store, "after", 10, Duration::from_secs(600));
        let purged = table_bytes(&store);
        assert!(
            purged < peak / 8,
            "{purged} B held for one record, {peak} B at the peak"
        );
        let held: Vec<_> = (0..20_000)
            .map(|i| {
                (
                    key(&format!("claim{i}")),
                    claimed(&store, &format!("claim{i}"), LEASE),
                )
            })
            .collect();
        for (key, token) in held {
            store.inner.release(&key, token).expect("the claim is held");
        }
        let released = table_bytes(&store);
        assert!(
            released < peak / 8,
            "{released} B held for one record after a burst of released claims (empty: {empty} B)"
        );
    }

    #[test]
    fn records_dropped_for_space_before_their_deadline_are_counted() {
        // Room for five of these records.
        let (clock, store) = clocked(4 * 1024);
        for i in 0..5 {
            complete(&store, &format!("short{i}"), 600, Duration::from_secs(1));
        }
        clock.advance(Duration::from_secs(2));
        for i in 0..5 {
            complete(&store, &format!("long{i}"), 600, Duration::from_secs(600));
        }
        assert_eq!(store.evicted_total(), 0, "expired records were counted");
        for i in 0..3 {
            complete(&store, &format!("more{i}"), 600, Duration::from_secs(600));
        }
        assert_eq!(store.evicted_total(), 3);
        assert!(!is_completed(&store, "long0"));
    }

    #[test]
    fn a_step_of_the_wall_clock_does_not_lapse_a_running_claim() {
        // The store's default clock, anchored at `wall`, stands in for the
        // system clock that an NTP correction steps.
        let wall = ManualClock::new(1_700_000_000_000);
        let store = MemoryStore::builder_anchored_to(&wall).build();
        claimed(&store, "running", LEASE);
        wall.advance(Duration::from_secs(3_600));
        let retry = store.inner.claim(&key("running"), FINGERPRINT, LEASE);
        assert!(
            matches!(retry, Ok(Claim::InFlight { .. })),
            "a step of the wall clock let a retry take the running claim over: {retry:?}"
        );
        let deadlines = store.deadline_clock().expect("the store's clock");
        assert!(
            deadlines.now_millis() < wall.now_millis(),
            "the store's deadlines followed the step"
        );
    }

    #[test]
    fn a_record_remembered_again_is_queued_once() {
        // A cache in front of a durable store remembers a key's record on
        // each claim the cache cannot answer: every retry with another
        // payload, each answered 422, brings the same record again.
        let (_clock, store) = clocked(512 * 1024);
        let record = Completed {
            fingerprint: FINGERPRINT,
            response: response(10),
            expires_at: 600_000,
        };
        for _ in 0..1_000 {
            store.inner.remember(&key("k"), &record);
        }
        let (_, shard) = store.inner.locate(&key("k"));
        assert_eq!(
            shard.expiries.len(),
            1,
            "one record, due once, took as many deadline entries as it was remembered"
        );
        assert_eq!(shard.bytes, weight(&record.encode()));
    }

    #[test]
    fn a_record_remembered_with_a_new_deadline_goes_at_that_deadline() {
        let (clock, store) = clocked(512 * 1024);
        let due_at = |expires_at| Completed {
            fingerprint: FINGERPRINT,
            response: response(10),
            expires_at,
        };
        store.inner.remember(&key("k"), &due_at(1_000));
        store.inner.remember(&key("k"), &due_at(5_000));
        clock.set(2_000);
        complete(&store, "other", 10, Duration::from_secs(600));
        assert!(
            is_completed(&store, "k"),
            "the record went at its old deadline"
        );
        clock.set(6_000);
        complete(&store, "another", 10, Duration::from_secs(600));
        assert_eq!(store.completed_len(), 2, "the record outlived its deadline");
    }

    #[test]
    fn takeover_of_an_expired_record_returns_its_bytes() {
        let clock = ManualClock::new(0);
        let store = MemoryStore::builder().clock(clock.clone()).build();
        complete(&store, "k", 100, Duration::from_secs(1));
        assert!(store.completed_bytes() > 100);
        clock.advance(Duration::from_secs(2));
        assert!(matches!(
            store.inner.claim(&key("k"), FINGERPRINT, LEASE),
            Ok(Claim::Acquired(_))
        ));
        assert_eq!(store.completed_bytes(), 0);
    }
}
