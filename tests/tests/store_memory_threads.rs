//! The in-memory store under threads: many workers claiming, renewing,
//! completing, releasing and reading a few hot keys or many cold ones,
//! while the clock moves and the byte budget evicts.
//!
//! Each worker keeps a ledger the store must agree with: a key is held by
//! at most one worker while its lease holds (leases here outlive the run),
//! a replay carries the body and fingerprint of the completion it names
//! and is never older than a completion known finished before the claim
//! began, a claim held through the whole run survives every eviction, and
//! the budget bounds the bytes the store counts at every sample.
//!
//! One key that every worker claims on a lease their clock moves let
//! lapse stays fenced: a holder taken over can neither complete nor
//! release it, and no late completion replaces a later holder's record.
//!
//! The heap, as the allocator counts it, stays where it was under churn of
//! new keys and under retries of one key with another payload.

use std::alloc::System;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use idempotent_core::clock::ManualClock;
use idempotent_core::record::{Claim, Completed, LeaseToken, Record, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{MemoryStore, Store, StoreError, Tiered};
use idempotent_core::{Fingerprint, IdempotencyKey};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The tests of this file run one at a time: the heap test counts every
/// thread's allocations, and the others contend for the cores.
fn alone() -> MutexGuard<'static, ()> {
    static ALONE: Mutex<()> = Mutex::new(());
    ALONE.lock().unwrap_or_else(PoisonError::into_inner)
}

#[path = "../../idempotent-core/tests/support/memory.rs"]
mod memory;
use memory::now as ready;

/// Longer than any run's clock moves: no claim in the ledger tests lapses.
const LONG_LEASE: Duration = Duration::from_secs(86_400);
const WORKERS: usize = 8;
const STAMP: HeaderName = HeaderName::from_static("x-completion");
/// What a record costs the store beyond its body: its encoding's status,
/// header and deadline, and the per-record overhead, rounded up.
const RECORD_OVERHEAD: usize = 512;

fn record_key(prefix: &str, index: usize) -> RecordKey {
    let name = format!("{prefix}-{index}");
    RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(name.as_bytes()).unwrap(),
    )
}

/// A small deterministic generator per worker, so a failing run can be
/// read back from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }

    fn pick<T: Copy>(&mut self, choices: &[T]) -> T {
        choices[self.below(choices.len())]
    }
}

/// What a completion stored, by its number.
struct Completion {
    key: usize,
    fingerprint: Fingerprint,
    body: Bytes,
}

/// What a holder last did with a key.
#[derive(Clone, Copy, Debug)]
enum Change {
    Released,
    /// Completed it, with the completion of this number.
    Completed(u64),
}

/// The shared ledger of a run.
struct Ledger {
    store: MemoryStore,
    clock: ManualClock,
    keys: Vec<RecordKey>,
    /// The worker (plus one) holding each key's claim; 0 when none does.
    holders: Vec<AtomicUsize>,
    /// The newest completion of each key known to have finished.
    finished: Vec<AtomicU64>,
    /// Each key's last change, if any.
    last_change: Vec<Mutex<Option<Change>>>,
    completions: Mutex<HashMap<u64, Completion>>,
    next_completion: AtomicU64,
    body_sizes: &'static [usize],
    /// TTLs in ms.
    ttls: &'static [u64],
    acquired: AtomicU64,
    replayed: AtomicU64,
}

impl Ledger {
    fn new(
        store: MemoryStore,
        clock: ManualClock,
        keys: usize,
        body_sizes: &'static [usize],
        ttls: &'static [u64],
    ) -> Self {
        Self {
            store,
            clock,
            keys: (0..keys).map(|i| record_key("hot", i)).collect(),
            holders: (0..keys).map(|_| AtomicUsize::new(0)).collect(),
            finished: (0..keys).map(|_| AtomicU64::new(0)).collect(),
            last_change: (0..keys).map(|_| Mutex::new(None)).collect(),
            completions: Mutex::new(HashMap::new()),
            next_completion: AtomicU64::new(0),
            body_sizes,
            ttls,
            acquired: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
        }
    }

    /// Checks a replay of `key`: the completion it names was of this key,
    /// with this fingerprint and body, and is no older than `known`, a
    /// completion that finished before the read began.
    fn check_replay(&self, key: usize, record: &Completed, known: u64) -> u64 {
        let stamp = record
            .response
            .headers
            .iter()
            .find(|(name, _)| *name == STAMP);
        let number: u64 = stamp
            .and_then(|(_, value)| value.to_str().ok()?.parse().ok())
            .expect("a replay carries its completion's number");
        let completions = self.completions.lock().unwrap();
        let completion = &completions[&number];
        assert_eq!(
            completion.key, key,
            "key {key} replayed completion {number} of another key"
        );
        assert_eq!(
            record.fingerprint, completion.fingerprint,
            "key {key}, completion {number}: fingerprint"
        );
        assert_eq!(
            record.response.body.as_ref(),
            Some(&completion.body),
            "key {key}, completion {number}: body"
        );
        assert_eq!(record.response.status, StatusCode::CREATED);
        assert!(
            number >= known,
            "key {key} replayed completion {number} after completion {known} had finished"
        );
        self.replayed.fetch_add(1, Ordering::Relaxed);
        number
    }

    fn response(
        &self,
        key: usize,
        fingerprint: Fingerprint,
        rng: &mut Rng,
    ) -> (u64, StoredResponse) {
        let number = self.next_completion.fetch_add(1, Ordering::SeqCst) + 1;
        let len = rng.pick(self.body_sizes);
        let body: Bytes = number
            .to_be_bytes()
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect();
        self.completions.lock().unwrap().insert(
            number,
            Completion {
                key,
                fingerprint,
                body: body.clone(),
            },
        );
        let response = StoredResponse::new(
            StatusCode::CREATED,
            vec![(STAMP, HeaderValue::from(number))],
            Some(body),
        );
        (number, response)
    }

    /// Takes `key` for worker `me`: no other worker may hold it.
    fn take(&self, key: usize, me: usize) {
        let taken =
            self.holders[key].compare_exchange(0, me + 1, Ordering::SeqCst, Ordering::SeqCst);
        if let Err(holder) = taken {
            panic!(
                "key {key} was acquired by worker {me} while worker {} held its lease",
                holder - 1
            );
        }
        self.acquired.fetch_add(1, Ordering::Relaxed);
    }

    /// One random operation of worker `me`.
    fn step(&self, me: usize, rng: &mut Rng) {
        let key = rng.below(self.keys.len());
        let record_key = &self.keys[key];
        let known = self.finished[key].load(Ordering::SeqCst);
        if rng.below(4) == 0 {
            match ready(self.store.get(record_key)).unwrap() {
                Some(Record::Completed(record)) => {
                    self.check_replay(key, &record, known);
                }
                Some(Record::InFlight(_)) | None => {}
            }
            return;
        }
        let fingerprint = Fingerprint::from_bytes([(rng.next() & 0xff) as u8; 32]);
        let claim = ready(self.store.claim(record_key, fingerprint, LONG_LEASE)).unwrap();
        let token = match claim {
            Claim::Acquired(token) => token,
            Claim::Completed(record) => {
                self.check_replay(key, &record, known);
                return;
            }
            Claim::InFlight { .. } => return,
        };
        self.take(key, me);
        if rng.below(4) == 0 {
            ready(self.store.renew(record_key, token, LONG_LEASE)).expect("the holder renews");
        }
        self.finish(key, token, fingerprint, rng);
    }

    /// Completes or releases `key`'s claim, held by `token`.
    fn finish(&self, key: usize, token: LeaseToken, fingerprint: Fingerprint, rng: &mut Rng) {
        let record_key = &self.keys[key];
        // The ledger lets go first: once the store does, another worker
        // may take the key at once.
        let mut last_change = self.last_change[key].lock().unwrap();
        if rng.below(4) == 0 {
            self.holders[key].store(0, Ordering::SeqCst);
            ready(self.store.release(record_key, token)).expect("the holder releases");
            *last_change = Some(Change::Released);
            return;
        }
        let (number, response) = self.response(key, fingerprint, rng);
        let ttl = Duration::from_millis(rng.pick(self.ttls));
        self.holders[key].store(0, Ordering::SeqCst);
        ready(self.store.complete(record_key, token, response, ttl)).expect("the holder completes");
        *last_change = Some(Change::Completed(number));
        self.finished[key].fetch_max(number, Ordering::SeqCst);
    }
}

/// Runs `steps` operations on each of [`WORKERS`] threads, each moving
/// the clock by `tick` every eighth step, while another thread checks
/// `within_budget` against the bytes the store counts; returns the largest
/// count it saw.
fn run(
    ledger: &Ledger,
    steps: usize,
    tick: Duration,
    within_budget: impl Fn(u64) -> bool + Sync,
) -> u64 {
    let done = AtomicBool::new(false);
    let peak = AtomicU64::new(0);
    thread::scope(|scope| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|me| {
                scope.spawn(move || {
                    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (me as u64 + 1));
                    for step in 0..steps {
                        ledger.step(me, &mut rng);
                        if step % 8 == 0 {
                            ledger.clock.advance(tick);
                        }
                    }
                })
            })
            .collect();
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                let bytes = ledger.store.completed_bytes();
                peak.fetch_max(bytes, Ordering::Relaxed);
                assert!(within_budget(bytes), "{bytes} B of completed records held");
                thread::yield_now();
            }
        });
        for worker in workers {
            if let Err(panic) = worker.join() {
                done.store(true, Ordering::SeqCst);
                std::panic::resume_unwind(panic);
            }
        }
        done.store(true, Ordering::SeqCst);
    });
    peak.load(Ordering::Relaxed)
}

/// Once the workers stop: each key holds its last completion (or nothing,
/// once expired or evicted), nothing after a release; and once every
/// record has expired, every key (`others` too) is claimable and the
/// store counts no records and no bytes.
fn check_at_rest(ledger: &Ledger, others: &[RecordKey]) {
    let store = &ledger.store;
    for (index, key) in ledger.keys.iter().enumerate() {
        let last = *ledger.last_change[index].lock().unwrap();
        match (ready(store.get(key)).unwrap(), last) {
            (Some(Record::Completed(record)), Some(Change::Completed(number))) => {
                let replayed = ledger.check_replay(index, &record, number);
                assert_eq!(replayed, number, "key {index} holds its last completion");
            }
            (None, _) => {}
            (read, last) => panic!("key {index}: read {read:?} after {last:?}"),
        }
    }
    ledger.clock.advance(Duration::from_secs(3_600));
    for key in ledger.keys.iter().chain(others) {
        let claim = ready(store.claim(key, Fingerprint::from_bytes([0; 32]), LONG_LEASE)).unwrap();
        let Claim::Acquired(token) = claim else {
            panic!("a key with nothing live is claimable, got {claim:?}");
        };
        ready(store.release(key, token)).expect("the holder releases");
    }
    assert_eq!(
        store.completed_len(),
        0,
        "records left after every key was taken over"
    );
    assert_eq!(
        store.completed_bytes(),
        0,
        "bytes counted with no record held"
    );
    assert_eq!(
        store.in_flight_len(),
        0,
        "claims left after every key was released"
    );
}

/// Claims `count` keys that stay in flight through a run.
fn pin(store: &MemoryStore, count: usize) -> Vec<(RecordKey, LeaseToken)> {
    (0..count)
        .map(|i| {
            let key = record_key("pinned", i);
            let claim = ready(store.claim(&key, Fingerprint::from_bytes([2; 32]), LONG_LEASE));
            let Ok(Claim::Acquired(token)) = claim else {
                panic!("pinned-{i} is new");
            };
            (key, token)
        })
        .collect()
}

/// The pinned claims outlived every eviction: still held, still
/// completable by their holders. Returns their keys.
fn check_pinned(store: &MemoryStore, pinned: Vec<(RecordKey, LeaseToken)>) -> Vec<RecordKey> {
    let mut keys = Vec::new();
    for (key, token) in pinned {
        match ready(store.get(&key)).unwrap() {
            Some(Record::InFlight(held)) => assert_eq!(held.lease_token, token),
            other => panic!("a claim in flight was dropped: {other:?}"),
        }
        let response = StoredResponse::new(StatusCode::OK, Vec::new(), None);
        ready(store.complete(&key, token, response, Duration::from_secs(1)))
            .expect("an in-flight claim is never evicted");
        keys.push(key);
    }
    keys
}

/// A few hot keys, one shard with room for a few records: workers contend
/// for each key, and nearly every completion evicts.
#[test]
fn few_hot_keys_in_a_small_budget_keep_the_ledger() {
    let _alone = alone();
    const MAX_BYTES: u64 = 32 * 1024;
    let clock = ManualClock::new(1_700_000_000_000);
    let store = MemoryStore::builder()
        .clock(clock.clone())
        .max_bytes(MAX_BYTES)
        .build();
    let pinned = pin(&store, 32);
    // TTLs of a few clock ticks, so that keys are taken over as their
    // records expire as well as after releases and evictions.
    let sizes = &[0, 100, 1_000, 4_000, 12_000];
    let ledger = Ledger::new(store.clone(), clock, 16, sizes, &[1, 5, 20, 100]);
    // One shard: the count after each completion's evictions is within the
    // budget, unless one record alone is larger, which none here is.
    let peak = run(&ledger, 20_000, Duration::from_millis(5), |bytes| {
        bytes <= MAX_BYTES
    });
    assert_eq!(store.in_flight_len(), 32, "the pinned claims, and no other");
    assert!(store.evicted_total() > 0, "the budget was never reached");
    let pinned = check_pinned(&store, pinned);
    check_at_rest(&ledger, &pinned);
    eprintln!(
        "acquired {}, replayed {}, evicted {}, peak {peak} B",
        ledger.acquired.load(Ordering::Relaxed),
        ledger.replayed.load(Ordering::Relaxed),
        store.evicted_total()
    );
}

/// Many keys across several shards, with records large enough that the
/// budget evicts: the store stays within the slack its documentation
/// gives (half again the budget, and the records completing at that
/// moment), and each key keeps its ledger.
#[test]
fn many_keys_across_shards_keep_the_ledger_and_the_budget() {
    let _alone = alone();
    const MAX_BYTES: u64 = 48 * 1024 * 1024;
    const LARGEST: usize = 64 * 1024;
    let clock = ManualClock::new(1_700_000_000_000);
    let store = MemoryStore::builder()
        .clock(clock.clone())
        .max_bytes(MAX_BYTES)
        .build();
    let pinned = pin(&store, 256);
    let sizes = &[10, 1_000, 16_000, LARGEST];
    let ledger = Ledger::new(
        store.clone(),
        clock,
        4_096,
        sizes,
        &[500, 2_000, 10_000, 60_000],
    );
    let slack = (WORKERS + 1) * (LARGEST + RECORD_OVERHEAD);
    let bound = MAX_BYTES as usize * 3 / 2 + slack;
    let peak = run(&ledger, 4_000, Duration::from_millis(5), |bytes| {
        bytes as usize <= bound
    });
    assert_eq!(store.in_flight_len(), 256);
    let pinned = check_pinned(&store, pinned);
    check_at_rest(&ledger, &pinned);
    eprintln!(
        "acquired {}, replayed {}, evicted {}, peak {peak} B of {MAX_BYTES} B",
        ledger.acquired.load(Ordering::Relaxed),
        ledger.replayed.load(Ordering::Relaxed),
        store.evicted_total()
    );
}

/// How far each churned key moves the clock.
const CHURN_TICK: Duration = Duration::from_millis(16);
/// The TTL of the churned records, and the lease of abandoned claims:
/// about a thousand operations of all workers.
const CHURN_TTL: Duration = Duration::from_millis(16_000);
/// How long past its lease the store keeps a claim nobody took over: its
/// holder, whose renewals were held up, may still complete it.
const LAPSED_GRACE: Duration = Duration::from_secs(60);

/// Operations of all workers while the clock moves by `span`.
fn operations_in(span: Duration) -> usize {
    (span.as_millis() / CHURN_TICK.as_millis()) as usize
}

/// Runs `steps` claims of keys never seen before on each of [`WORKERS`]
/// threads, numbered from `next_key` on: two in three complete with a
/// record of [`CHURN_TTL`], one in three is abandoned, as by a cancelled
/// request, and lapses after as long. Each moves the clock by
/// [`CHURN_TICK`], so a TTL is about a thousand operations of all
/// workers, and a lease and the grace about five thousand.
/// Returns the most completed records and claims the store held.
fn churn(
    store: &MemoryStore,
    clock: &ManualClock,
    next_key: &AtomicUsize,
    steps: usize,
) -> (u64, usize) {
    let peaks = Mutex::new((0u64, 0usize));
    thread::scope(|scope| {
        for me in 0..WORKERS {
            let peaks = &peaks;
            scope.spawn(move || {
                let mut rng = Rng(me as u64 + 17);
                for step in 0..steps {
                    let key = record_key("churn", next_key.fetch_add(1, Ordering::Relaxed));
                    let fingerprint = Fingerprint::from_bytes([3; 32]);
                    // Claims that complete hold a long lease: a worker
                    // descheduled for a while sees a TTL go by.
                    let abandoned = rng.below(3) == 0;
                    let lease = if abandoned { CHURN_TTL } else { LONG_LEASE };
                    let Claim::Acquired(token) =
                        ready(store.claim(&key, fingerprint, lease)).unwrap()
                    else {
                        panic!("a new key is acquired");
                    };
                    if !abandoned {
                        let body = Bytes::from(vec![7; rng.pick(&[10, 500, 2_000])]);
                        let response = StoredResponse::new(StatusCode::OK, Vec::new(), Some(body));
                        ready(store.complete(&key, token, response, CHURN_TTL)).unwrap();
                    }
                    clock.advance(CHURN_TICK);
                    if step % 64 == 0 {
                        let mut peaks = peaks.lock().unwrap();
                        peaks.0 = peaks.0.max(store.completed_len());
                        peaks.1 = peaks.1.max(store.in_flight_len());
                    }
                }
            });
        }
    });
    peaks.into_inner().unwrap()
}

/// Churn of keys never seen again, on threads: what the store holds stays
/// near what one TTL (or one lease and the grace) of traffic makes,
/// however long the churn runs (here a dozen times the grace), and all of
/// it goes once the clock passes it.
#[test]
fn churn_of_new_keys_holds_what_one_ttl_of_traffic_makes() {
    const STEPS: usize = 6_000;
    let _alone = alone();
    let clock = ManualClock::new(1_700_000_000_000);
    // 16 shards, each of which sweeps its lapsed claims once it holds 64.
    let store = MemoryStore::builder().clock(clock.clone()).build();
    let (completed, in_flight) = churn(&store, &clock, &AtomicUsize::new(0), STEPS);
    let total = (WORKERS * STEPS) as u64;
    // A TTL of traffic is ~1,000 records; a shard purges at its next
    // completion.
    assert!(
        completed <= 3_000,
        "{completed} completed records held of {total} made"
    );
    // A claim is kept for its lease and the grace past it: a third of the
    // ~4,750 operations of that span are abandoned. A shard sweeps at 64
    // claims, or at twice those it kept at its last sweep, so the shards
    // hold twice that at the very most, all at once; a third more covers
    // keys spread unevenly.
    let kept = operations_in(CHURN_TTL + LAPSED_GRACE) / 3;
    assert!(
        in_flight <= 16 * 64 + 2 * kept + kept / 3,
        "{in_flight} claims held of ~{} abandoned",
        total / 3
    );
    eprintln!("peak: {completed} completed, {in_flight} in flight, of {total} keys");
    clock.advance(CHURN_TTL + LAPSED_GRACE);
    // Every shard's next completion purges.
    for i in 0..4_096 {
        let key = record_key("after", i);
        let Claim::Acquired(token) =
            ready(store.claim(&key, Fingerprint::from_bytes([4; 32]), CHURN_TTL)).unwrap()
        else {
            panic!("a new key is acquired");
        };
        let response = StoredResponse::new(StatusCode::OK, Vec::new(), None);
        ready(store.complete(&key, token, response, CHURN_TTL)).unwrap();
    }
    assert_eq!(
        store.completed_len(),
        4_096,
        "expired records left after every shard purged"
    );
    // Abandoned claims of new keys, over 500 a shard, more than any shard
    // kept, double every shard's claims: each sweeps those of the churn,
    // now past the grace, and holds only the new ones.
    let abandoned = 8_192;
    for i in 0..abandoned {
        let key = record_key("abandoned", i);
        let claim = ready(store.claim(&key, Fingerprint::from_bytes([5; 32]), CHURN_TTL));
        assert!(matches!(claim, Ok(Claim::Acquired(_))), "{claim:?}");
    }
    assert_eq!(
        store.in_flight_len(),
        abandoned,
        "lapsed claims held past the grace"
    );
}

fn heap_held(region: &Region<'_, System>) -> i64 {
    let change = region.change();
    change.bytes_allocated as i64 - change.bytes_deallocated as i64
}

/// The heap under churn, as the allocator counts it: once the store holds
/// a TTL of traffic, three times as much churn again leaves it about where
/// it was. Arena blocks, table slots, deadlines and boxed claims are all
/// given back as their records expire and their claims lapse.
#[test]
fn churn_of_new_keys_does_not_grow_the_heap() {
    const WARM_UP: usize = 3_000;
    let _alone = alone();
    let clock = ManualClock::new(1_700_000_000_000);
    let store = MemoryStore::builder().clock(clock.clone()).build();
    let next_key = AtomicUsize::new(0);
    let region = Region::new(GLOBAL);
    churn(&store, &clock, &next_key, WARM_UP);
    let warm = heap_held(&region);
    churn(&store, &clock, &next_key, 3 * WARM_UP);
    let after = heap_held(&region);
    let counted = store.completed_bytes();
    eprintln!(
        "heap: {warm} B after {} keys, {after} B after {} ({counted} B of records counted)",
        WORKERS * WARM_UP,
        WORKERS * WARM_UP * 4
    );
    // Unbounded, it would have grown with the churn: by about four times.
    assert!(
        after <= warm + warm / 2 + (1 << 20),
        "the heap grew from {warm} B to {after} B under churn"
    );
}

/// Retries of a completed key with another payload, through a cache in
/// front of a durable store: each misses the cache (its record is of
/// another payload), and the durable store's answer, the same record, is
/// remembered again. That costs the heap nothing it keeps: before, each
/// retry left a deadline entry behind, 16 bytes outside the budget until
/// the record's TTL ran out.
#[test]
fn retries_with_another_payload_do_not_grow_a_cache() {
    const RETRIES: usize = 50_000;
    let _alone = alone();
    let clock = ManualClock::new(1_700_000_000_000);
    let durable = MemoryStore::builder().clock(clock.clone()).build();
    let store = Tiered::builder(durable).clock(clock).build();
    let key = record_key("paid", 0);
    let paid = Fingerprint::from_bytes([1; 32]);
    let Claim::Acquired(token) = ready(store.claim(&key, paid, LONG_LEASE)).unwrap() else {
        panic!("a new key is acquired");
    };
    let response = StoredResponse::new(
        StatusCode::CREATED,
        Vec::new(),
        Some(Bytes::from_static(b"paid")),
    );
    let ttl = Duration::from_secs(86_400);
    ready(store.complete(&key, token, response, ttl)).unwrap();
    let other_payload = Fingerprint::from_bytes([2; 32]);
    let retry = || match ready(store.claim(&key, other_payload, LONG_LEASE)).unwrap() {
        Claim::Completed(record) => assert_eq!(record.fingerprint, paid),
        other => panic!("a retry replays the record, got {other:?}"),
    };
    retry();
    let region = Region::new(GLOBAL);
    for _ in 0..RETRIES {
        retry();
    }
    let grown = heap_held(&region);
    assert!(
        grown < 64 * 1024,
        "the heap grew by {grown} B over {RETRIES} retries of one key"
    );
}

/// The stamp of a record: when its holder's claim returned.
fn stamp_of(record: &Completed) -> u64 {
    let stamp = record
        .response
        .headers
        .iter()
        .find(|(name, _)| *name == STAMP);
    stamp
        .and_then(|(_, value)| value.to_str().ok()?.parse().ok())
        .expect("a record carries its holder's stamp")
}

/// A lease and a TTL of two clock ticks, which the workers' own ticks let
/// lapse.
const TWO_TICKS: Duration = Duration::from_millis(2);

/// One key that every worker claims, on [`TWO_TICKS`].
struct Contended {
    store: MemoryStore,
    clock: ManualClock,
    key: RecordKey,
    /// Numbers the moments a claim begins and an acquiring claim returns,
    /// in one order across the workers.
    moments: AtomicU64,
    /// The latest moment at which a claim that acquired the key began: a
    /// claim that began after another returned acquired it after that one.
    latest_acquisition: AtomicU64,
    acquired: AtomicU64,
    completed: AtomicU64,
}

impl Contended {
    /// Claims the key as worker `me`; if acquired, moves the clock a
    /// little, or past the lease (see [`stall`](Self::stall)), then
    /// completes or releases. A holder that knows, before its call, of a
    /// claim that acquired the key after its own must be refused.
    fn step(&self, me: usize, rng: &mut Rng) {
        let fingerprint = Fingerprint::from_bytes([me as u8; 32]);
        let began = self.moments.fetch_add(1, Ordering::SeqCst);
        let claim = ready(self.store.claim(&self.key, fingerprint, TWO_TICKS)).unwrap();
        let Claim::Acquired(token) = claim else {
            self.clock.advance(Duration::from_millis(rng.pick(&[0, 1])));
            return;
        };
        let returned = self.moments.fetch_add(1, Ordering::SeqCst);
        self.latest_acquisition.fetch_max(began, Ordering::SeqCst);
        self.acquired.fetch_add(1, Ordering::Relaxed);
        let taken_over = if rng.below(2) == 0 {
            self.stall(returned)
        } else {
            self.clock.advance(Duration::from_millis(rng.pick(&[0, 1])));
            self.taken_over(returned)
        };
        let finished = if rng.below(4) == 0 {
            ready(self.store.release(&self.key, token))
        } else {
            self.complete(token, began, returned)
        };
        assert!(
            !(taken_over && finished.is_ok()),
            "the claim returned at {returned} finished after a later claim took the key over"
        );
    }

    /// Whether a claim that began after `returned` acquired the key.
    fn taken_over(&self, returned: u64) -> bool {
        self.latest_acquisition.load(Ordering::SeqCst) > returned
    }

    /// Lets the lease of the claim that returned at `returned` lapse, then
    /// waits a while for another worker to take the key over; returns
    /// whether one did.
    fn stall(&self, returned: u64) -> bool {
        self.clock.advance(TWO_TICKS + Duration::from_millis(1));
        for _ in 0..1_000 {
            if self.taken_over(returned) {
                return true;
            }
            thread::yield_now();
        }
        false
    }

    /// Completes the claim that began at `began` and returned at
    /// `returned`; once it did, the record read is that one or a later
    /// holder's (whose claim returned after this one began), never an
    /// earlier holder's written over it.
    fn complete(&self, token: LeaseToken, began: u64, returned: u64) -> Result<(), StoreError> {
        let stamp = vec![(STAMP, HeaderValue::from(returned))];
        let response = StoredResponse::new(StatusCode::CREATED, stamp, None);
        ready(self.store.complete(&self.key, token, response, TWO_TICKS))?;
        self.completed.fetch_add(1, Ordering::Relaxed);
        if let Some(Record::Completed(record)) = ready(self.store.get(&self.key)).unwrap() {
            let read = stamp_of(&record);
            assert!(
                read > began,
                "the claim returned at {returned} completed, then read the record of one returned at {read}"
            );
        }
        Ok(())
    }
}

/// One key, claimed by every worker on a lease that lapses under them: a
/// holder whose claim was taken over can neither complete nor release it,
/// and no late completion replaces a later holder's record.
#[test]
fn one_key_with_lapsing_leases_stays_fenced_across_threads() {
    const STEPS: usize = 20_000;
    let _alone = alone();
    let clock = ManualClock::new(1_700_000_000_000);
    let contended = Contended {
        store: MemoryStore::builder().clock(clock.clone()).build(),
        clock,
        key: record_key("contended", 0),
        moments: AtomicU64::new(0),
        latest_acquisition: AtomicU64::new(0),
        acquired: AtomicU64::new(0),
        completed: AtomicU64::new(0),
    };
    thread::scope(|scope| {
        for me in 0..WORKERS {
            let contended = &contended;
            scope.spawn(move || {
                let mut rng = Rng(me as u64 + 101);
                for _ in 0..STEPS {
                    contended.step(me, &mut rng);
                }
            });
        }
    });
    let acquired = contended.acquired.load(Ordering::SeqCst);
    let completed = contended.completed.load(Ordering::SeqCst);
    eprintln!("acquired {acquired}, completed {completed}");
    assert!(
        0 < completed && completed < acquired,
        "some holders completed, others were taken over or released"
    );
}
