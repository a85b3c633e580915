//! Random operations on a [`MemoryStore`], checked against a model of what
//! the store contract allows.
//!
//! The model holds what each key must hold: a claim with its token,
//! fingerprint and lease deadline, or a completed record with its response
//! and deadline. A read of a live claim or record must give back exactly
//! that; a claim of anything else must acquire with a token never issued
//! before; a token other than the holder's must be refused. Where the
//! contract leaves the store a choice (a lapsed claim may be dropped, an
//! expired record purged, a live record evicted once records due no
//! earlier than it fill the budget), the model asks the table what it did
//! and follows, after checking that the table holds nothing else: a record
//! is either the one the model expects or gone.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;
use proptest::sample::Index;

use super::{ENTRY_OVERHEAD_BYTES, MIN_SWEEP_AT, MemoryStore, SHARE_LIMIT, State, slot_id};
use crate::clock::{Clock, ManualClock, millis};
use crate::fingerprint::Fingerprint;
use crate::key::IdempotencyKey;
use crate::record::{Claim, Completed, InFlight, LeaseToken, Record, RecordKey, StoredResponse};
use crate::scope::ScopeDigest;
use crate::store::EXPIRY_GRACE;
use crate::store::{Store, StoreError};

/// Keys most operations pick from, so that they meet.
const HOT_KEYS: usize = 6;
const START_MILLIS: u64 = 1_700_000_000_000;

/// Which token an operation presents.
#[derive(Clone, Debug)]
enum Token {
    /// The one the key's latest claim was given.
    Latest,
    /// Any the key was ever given.
    Issued(Index),
    /// One never issued.
    Unknown,
}

#[derive(Clone, Debug)]
enum Op {
    Claim {
        key: usize,
        fingerprint: u8,
        lease: Duration,
    },
    Renew {
        key: usize,
        token: Token,
        lease: Duration,
    },
    Complete {
        key: usize,
        token: Token,
        ttl: Duration,
        body: Option<usize>,
    },
    Release {
        key: usize,
        token: Token,
    },
    Get {
        key: usize,
    },
    /// Claims this many new keys that nobody completes or releases.
    Abandon {
        count: usize,
        lease: Duration,
    },
    /// What [`Tiered`](crate::store::Tiered) does when its durable tier
    /// gives this process a claim: hold the key for a lease, whatever the
    /// table held.
    Hold {
        key: usize,
        lease: Duration,
    },
    /// What [`Tiered`](crate::store::Tiered) does with a record its durable
    /// tier holds: keep it until its own deadline, this far from now
    /// (before it when `past`), whatever the table held.
    Remember {
        key: usize,
        deadline: Duration,
        past: bool,
        body: Option<usize>,
    },
    Advance(u64),
    /// Sets the clock back by this many milliseconds.
    Rewind(u64),
}

fn any_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        4 => prop::sample::select(&[1u64, 999, 1_000, 1_500, 10_000, 60_000][..])
            .prop_map(Duration::from_millis),
        1 => Just(Duration::ZERO),
        1 => Just(Duration::from_secs(86_400 * 365 * 100)),
        1 => Just(Duration::MAX),
    ]
}

fn any_token() -> impl Strategy<Value = Token> {
    prop_oneof![
        6 => Just(Token::Latest),
        2 => any::<Index>().prop_map(Token::Issued),
        1 => Just(Token::Unknown),
    ]
}

/// Body sizes around the arena's limits: a quarter block (1 KiB at the
/// smallest), a block (4 to 64 KiB).
fn any_body() -> impl Strategy<Value = Option<usize>> {
    prop::option::weighted(
        0.9,
        prop::sample::select(&[0usize, 10, 300, 1_000, 1_100, 5_000, 70_000][..]),
    )
}

fn any_op() -> impl Strategy<Value = Op> {
    let key = 0..HOT_KEYS;
    prop_oneof![
        6 => (key.clone(), 0u8..2, any_duration()).prop_map(|(key, fingerprint, lease)| {
            Op::Claim { key, fingerprint, lease }
        }),
        2 => (key.clone(), any_token(), any_duration())
            .prop_map(|(key, token, lease)| Op::Renew { key, token, lease }),
        5 => (key.clone(), any_token(), any_duration(), any_body())
            .prop_map(|(key, token, ttl, body)| Op::Complete { key, token, ttl, body }),
        2 => (key.clone(), any_token()).prop_map(|(key, token)| Op::Release { key, token }),
        3 => key.clone().prop_map(|key| Op::Get { key }),
        1 => (1..MIN_SWEEP_AT + 8, any_duration())
            .prop_map(|(count, lease)| Op::Abandon { count, lease }),
        1 => (key.clone(), any_duration()).prop_map(|(key, lease)| Op::Hold { key, lease }),
        1 => (key, any_duration(), any::<bool>(), any_body()).prop_map(
            |(key, deadline, past, body)| Op::Remember { key, deadline, past, body }
        ),
        3 => prop::sample::select(&[1u64, 500, 1_000, 10_000, 60_000, 86_400_000][..])
            .prop_map(Op::Advance),
        1 => prop::sample::select(&[1u64, 1_000, 60_000][..]).prop_map(Op::Rewind),
    ]
}

/// What a key must hold, by the model.
#[derive(Clone, Debug, PartialEq)]
enum Held {
    InFlight(InFlight),
    Completed(Completed),
}

impl Held {
    fn deadline(&self) -> u64 {
        match self {
            Self::InFlight(held) => held.lease_expires_at,
            Self::Completed(record) => record.expires_at,
        }
    }
}

/// What a record costs against the budget, as the store weighs it.
fn weight(record: &Completed) -> usize {
    record.encoded_len() + ENTRY_OVERHEAD_BYTES
}

struct Model {
    store: MemoryStore,
    clock: ManualClock,
    max_bytes: u64,
    held: BTreeMap<usize, Held>,
    /// Every token each key was given, in order.
    issued: BTreeMap<usize, Vec<LeaseToken>>,
    /// Every token the store gave, to tell a reissued one.
    tokens: HashSet<LeaseToken>,
    /// The next abandoned key.
    next_cold_key: usize,
    /// Records replayed so far, to read again at the end: their bytes
    /// were carved from blocks that later records were carved from too.
    replayed: Vec<(Arc<Completed>, Completed)>,
    /// Completions so far: each response carries its number, so that one
    /// key's record is never taken for another's.
    completions: u64,
    /// Live records the store dropped for space, as the model saw them go.
    evicted: u64,
}

/// The memory store's futures are ready at once.
fn ready<T>(future: impl Future<Output = T>) -> T {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(future).poll(&mut context) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("the memory store answers at once"),
    }
}

fn record_key(key: usize) -> RecordKey {
    let name = format!("key-{key}");
    RecordKey::new(
        ScopeDigest::global(),
        IdempotencyKey::parse(name.as_bytes()).expect("a valid key"),
    )
}

fn fingerprint(seed: u8) -> Fingerprint {
    Fingerprint::from_bytes([seed; 32])
}

impl Model {
    /// A model of a store of `max_bytes` in `shards` shards, or as many as
    /// the store picks for that budget.
    fn new(max_bytes: u64, shards: Option<u64>) -> Self {
        let clock = ManualClock::new(START_MILLIS);
        let builder = MemoryStore::builder()
            .clock(clock.clone())
            .max_bytes(max_bytes);
        let store = match shards {
            Some(shards) => builder.build_sharded(shards),
            None => builder.build(),
        };
        Self {
            store,
            clock,
            max_bytes,
            held: BTreeMap::new(),
            issued: BTreeMap::new(),
            tokens: HashSet::new(),
            next_cold_key: 1_000,
            replayed: Vec::new(),
            completions: 0,
            evicted: 0,
        }
    }

    fn now(&self) -> u64 {
        self.clock.now_millis()
    }

    /// A shard's share of the budget.
    fn shard_budget(&self) -> usize {
        self.store.inner.shard_budget
    }

    /// Whether a shard holding `bytes`, while the other shards hold
    /// `others`, may keep them all: within its share, or within
    /// [`SHARE_LIMIT`] times its share while the store keeps to its budget.
    fn may_hold(&self, bytes: usize, others: usize) -> bool {
        let share = self.shard_budget();
        let budget = usize::try_from(self.max_bytes).unwrap_or(usize::MAX);
        bytes <= share
            || (bytes <= share.saturating_mul(SHARE_LIMIT)
                && others.saturating_add(bytes) <= budget)
    }

    /// Bytes of the completed records the model holds outside `shard`,
    /// expired ones not yet purged included, as the store counts them.
    fn bytes_outside(&self, shard: usize) -> usize {
        let held = self
            .held
            .iter()
            .filter(|(key, _)| self.shard(**key) != shard);
        held.filter_map(|(_, held)| match held {
            Held::Completed(record) => Some(weight(record)),
            Held::InFlight(_) => None,
        })
        .sum()
    }

    /// The shard that holds `key`'s record: each makes room on its own.
    fn shard(&self, key: usize) -> usize {
        let inner = &self.store.inner;
        inner.shard_of(slot_id(inner.id_keys, &record_key(key)))
    }

    /// What the key holds that a read must show: nothing past its deadline.
    fn live(&self, key: usize) -> Option<&Held> {
        let now = self.now();
        self.held.get(&key).filter(|held| held.deadline() > now)
    }

    /// The token `token` names for `key`.
    fn token(&self, key: usize, token: &Token) -> LeaseToken {
        let issued = self.issued.get(&key).map_or(&[][..], Vec::as_slice);
        match token {
            Token::Latest => issued.last().copied(),
            Token::Issued(index) if !issued.is_empty() => Some(*index.get(issued)),
            Token::Issued(_) | Token::Unknown => None,
        }
        .unwrap_or_else(LeaseToken::random)
    }

    /// Whether `token` holds `key`'s claim, by the model.
    fn holds(&self, key: usize, token: LeaseToken) -> bool {
        matches!(self.held.get(&key), Some(Held::InFlight(held)) if held.lease_token == token)
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Claim {
                key,
                fingerprint: seed,
                lease,
            } => self.claim(*key, fingerprint(*seed), *lease),
            Op::Renew { key, token, lease } => self.renew(*key, token, *lease),
            Op::Complete {
                key,
                token,
                ttl,
                body,
            } => self.complete(*key, token, *ttl, *body),
            Op::Release { key, token } => self.release(*key, token),
            Op::Get { key } => self.get(*key),
            Op::Abandon { count, lease } => {
                for _ in 0..*count {
                    let key = self.next_cold_key;
                    self.next_cold_key += 1;
                    self.claim(key, fingerprint(7), *lease);
                }
            }
            Op::Hold { key, lease } => self.hold(*key, *lease),
            Op::Remember {
                key,
                deadline,
                past,
                body,
            } => self.remember(*key, *deadline, *past, *body),
            Op::Advance(by) => self.clock.advance(Duration::from_millis(*by)),
            Op::Rewind(by) => self.clock.set(self.now().saturating_sub(*by)),
        }
        let evicting = matches!(op, Op::Complete { .. } | Op::Remember { .. });
        self.follow_the_store(evicting);
        self.check_accounts();
    }

    fn claim(&mut self, key: usize, fingerprint: Fingerprint, lease: Duration) {
        let now = self.now();
        let claim = ready(self.store.claim(&record_key(key), fingerprint, lease));
        let claim = claim.expect("a claim never fails");
        match (self.live(key).cloned(), claim) {
            (Some(Held::InFlight(held)), claim) => assert_eq!(
                claim,
                Claim::InFlight {
                    fingerprint: held.fingerprint,
                    lease_expires_at: held.lease_expires_at,
                },
                "a live claim of key {key} blocks another"
            ),
            (Some(Held::Completed(expected)), Claim::Completed(record)) => {
                assert_eq!(*record, expected, "key {key} replays its own record");
                self.replayed.push((record, expected));
            }
            (Some(Held::Completed(_)), claim) => {
                panic!("key {key}'s live record must replay, got {claim:?}")
            }
            (None, Claim::Acquired(token)) => {
                assert!(self.tokens.insert(token), "a token was issued twice");
                self.issued.entry(key).or_default().push(token);
                let held = InFlight {
                    fingerprint,
                    lease_token: token,
                    lease_expires_at: now.saturating_add(millis(lease)),
                };
                self.held.insert(key, Held::InFlight(held));
            }
            (None, claim) => panic!("key {key} holds nothing live, yet a claim got {claim:?}"),
        }
    }

    fn renew(&mut self, key: usize, token: &Token, lease: Duration) {
        let token = self.token(key, token);
        let now = self.now();
        let renewed = ready(self.store.renew(&record_key(key), token, lease));
        if !self.holds(key, token) {
            assert!(
                matches!(renewed, Err(StoreError::LeaseLost)),
                "a renewal of key {key} without its lease got {renewed:?}"
            );
            return;
        }
        renewed.expect("the holder renews");
        if let Some(Held::InFlight(held)) = self.held.get_mut(&key) {
            let renewed_until = now.saturating_add(millis(lease));
            held.lease_expires_at = held.lease_expires_at.max(renewed_until);
        }
    }

    fn response(&mut self, body: Option<usize>) -> StoredResponse {
        self.completions += 1;
        let stamp = self.completions.to_be_bytes();
        let body = body.map(|len| stamp.iter().copied().cycle().take(len).collect::<Bytes>());
        let value = HeaderValue::from_str(&self.completions.to_string()).expect("digits");
        StoredResponse {
            status: StatusCode::CREATED,
            headers: vec![(HeaderName::from_static("x-completion"), value)],
            body,
        }
    }

    fn complete(&mut self, key: usize, token: &Token, ttl: Duration, body: Option<usize>) {
        let token = self.token(key, token);
        let response = self.response(body);
        let now = self.now();
        let record_key = record_key(key);
        let completed = ready(
            self.store
                .complete(&record_key, token, response.clone(), ttl),
        );
        let Some(Held::InFlight(held)) = self.held.get(&key).filter(|_| self.holds(key, token))
        else {
            assert!(
                matches!(completed, Err(StoreError::LeaseLost)),
                "a completion of key {key} without its lease got {completed:?}"
            );
            return;
        };
        completed.expect("the holder completes");
        let record = Completed {
            fingerprint: held.fingerprint,
            response,
            expires_at: now.saturating_add(millis(ttl)),
        };
        self.held.insert(key, Held::Completed(record));
        self.check_eviction(key, now);
    }

    /// After `newest` completed at `now`: every live record its shard
    /// [may hold](Self::may_hold) is still there, and that shard holds no
    /// more than it may. Other shards were not touched, so the model's
    /// records of them are what the store holds.
    fn check_eviction(&self, newest: usize, now: u64) {
        let shard = self.shard(newest);
        let others = self.bytes_outside(shard);
        let live: Vec<(usize, &Completed)> = self
            .held
            .iter()
            .filter(|(key, _)| self.shard(**key) == shard)
            .filter_map(|(key, held)| match held {
                Held::Completed(record) if record.expires_at > now => Some((*key, record)),
                _ => None,
            })
            .collect();
        let newest_record = live.iter().find(|(key, _)| *key == newest).map(|(_, r)| *r);
        for (key, record) in &live {
            // Evicted soonest deadline first, the newest set aside: what
            // is left when this one comes up is at most the records due no
            // earlier, and the newest.
            let due_no_earlier: usize = live
                .iter()
                .filter(|(other, r)| r.expires_at >= record.expires_at || *other == newest)
                .map(|(_, r)| weight(r))
                .sum();
            let kept = *key == newest || self.may_hold(due_no_earlier, others);
            if kept {
                let found = self.peek(*key);
                assert_eq!(
                    found.as_ref(),
                    Some(&Held::Completed((*record).clone())),
                    "key {key}'s live record was dropped with room for it (newest {newest})"
                );
            }
        }
        let (bytes, held) = {
            let shard = self.store.inner.shards[shard].lock();
            let completed = shard.table.iter();
            let completed = completed.filter(|slot| matches!(slot.state, State::Completed(_)));
            (shard.bytes, completed.count())
        };
        let within = self.may_hold(bytes, others)
            || (held == 1 && newest_record.is_some_and(|r| bytes == weight(r)));
        assert!(
            within,
            "{bytes} B of completed records in shard {shard}, over its share of {} B, \
             with {others} B in the other shards (budget {} B)",
            self.shard_budget(),
            self.max_bytes
        );
    }

    fn hold(&mut self, key: usize, lease: Duration) {
        let token = LeaseToken::random();
        self.store
            .inner
            .hold(&record_key(key), token, fingerprint(3), lease);
        self.issued.entry(key).or_default().push(token);
        let held = InFlight {
            fingerprint: fingerprint(3),
            lease_token: token,
            lease_expires_at: self.now().saturating_add(millis(lease)),
        };
        self.held.insert(key, Held::InFlight(held));
    }

    fn remember(&mut self, key: usize, deadline: Duration, past: bool, body: Option<usize>) {
        let now = self.now();
        let expires_at = if past {
            now.saturating_sub(millis(deadline))
        } else {
            now.saturating_add(millis(deadline))
        };
        let record = Completed {
            fingerprint: fingerprint(4),
            response: self.response(body),
            expires_at,
        };
        self.store.inner.remember(&record_key(key), &record);
        self.held.insert(key, Held::Completed(record));
        self.check_eviction(key, now);
    }

    fn release(&mut self, key: usize, token: &Token) {
        let token = self.token(key, token);
        let released = ready(self.store.release(&record_key(key), token));
        if !self.holds(key, token) {
            assert!(
                matches!(released, Err(StoreError::LeaseLost)),
                "a release of key {key} without its lease got {released:?}"
            );
            return;
        }
        released.expect("the holder releases");
        self.held.remove(&key);
    }

    fn get(&mut self, key: usize) {
        let read = ready(self.store.get(&record_key(key))).expect("a read never fails");
        let expected = self.live(key).cloned();
        match (read, expected) {
            (None, None) => {}
            (Some(Record::InFlight(read)), Some(Held::InFlight(held))) => {
                assert_eq!(read, held, "key {key}'s claim");
            }
            (Some(Record::Completed(read)), Some(Held::Completed(record))) => {
                assert_eq!(*read, record, "key {key}'s record");
                self.replayed.push((read, record));
            }
            (read, expected) => panic!("key {key}: read {read:?}, expected {expected:?}"),
        }
    }

    /// What the table holds for `key`, deadline or not.
    fn peek(&self, key: usize) -> Option<Held> {
        let (id, shard) = self.store.inner.locate(&record_key(key));
        let slot = shard.table.find(id[0], |slot| slot.id == id)?;
        Some(match &slot.state {
            State::InFlight(held) => Held::InFlight(held.claim.clone()),
            State::Completed(encoded) => {
                Held::Completed(Completed::decode(encoded.clone()).expect("a decodable record"))
            }
        })
    }

    /// Checks the table against the model, and follows it where the
    /// contract lets the store choose: a claim past its lease and the
    /// grace ([`EXPIRY_GRACE`](crate::store::EXPIRY_GRACE)), a record
    /// past its deadline, or, after a completion, one the budget had no
    /// room for (see [`check_eviction`](Self::check_eviction)), may be gone.
    fn follow_the_store(&mut self, after_completion: bool) {
        let now = self.now();
        let keys: Vec<usize> = self.held.keys().copied().collect();
        for key in keys {
            let expected = &self.held[&key];
            let may_be_gone = match expected {
                Held::InFlight(held) => {
                    held.lease_expires_at.saturating_add(millis(EXPIRY_GRACE)) <= now
                }
                Held::Completed(record) => record.expires_at <= now || after_completion,
            };
            match self.peek(key) {
                Some(found) => assert_eq!(&found, expected, "the table's record of key {key}"),
                None if may_be_gone => {
                    let live = matches!(expected, Held::Completed(r) if r.expires_at > now);
                    self.evicted += u64::from(live);
                    self.held.remove(&key);
                }
                None => panic!("key {key}'s live claim is gone: {expected:?}"),
            }
        }
        for key in (0..HOT_KEYS).chain(1_000..self.next_cold_key) {
            if !self.held.contains_key(&key) {
                assert_eq!(self.peek(key), None, "key {key} holds nothing");
            }
        }
    }

    /// The store's own counts agree with its table.
    fn check_accounts(&self) {
        let in_flight = self
            .held
            .values()
            .filter(|held| matches!(held, Held::InFlight(_)))
            .count();
        assert_eq!(self.store.in_flight_len(), in_flight, "claims in the table");
        let counted: usize = self
            .store
            .inner
            .shards
            .iter()
            .map(|s| s.lock().in_flight)
            .sum();
        assert_eq!(counted, in_flight, "claims the shards count");
        for (index, cell) in self.store.inner.shards.iter().enumerate() {
            let bytes = cell.lock().bytes;
            let published = cell.bytes.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(published, bytes, "shard {index}'s published bytes");
        }
        let bytes: usize = self
            .held
            .values()
            .filter_map(|held| match held {
                Held::Completed(record) => Some(weight(record)),
                Held::InFlight(_) => None,
            })
            .sum();
        assert_eq!(
            self.store.completed_bytes(),
            bytes as u64,
            "completed bytes"
        );
        assert_eq!(
            self.store.evicted_total(),
            self.evicted,
            "live records dropped for space"
        );
    }

    /// Records replayed earlier still read as they did.
    fn check_replays(&self) {
        for (replayed, expected) in &self.replayed {
            assert_eq!(**replayed, *expected, "a replayed record changed");
        }
    }
}

fn run(max_bytes: u64, shards: Option<u64>, ops: &[Op]) {
    let mut model = Model::new(max_bytes, shards);
    for op in ops {
        model.apply(op);
    }
    model.check_replays();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A budget of a few records, one shard: eviction, purging and the
    /// arena are all exercised.
    #[test]
    fn the_store_does_what_the_model_allows_within_a_small_budget(
        max_bytes in prop::sample::select(&[0u64, 1, 600, 4_096, 20_000, 200_000][..]),
        ops in prop::collection::vec(any_op(), 1..150),
    ) {
        run(max_bytes, None, &ops);
    }

    /// Small budgets split among a few shards: a record may be larger than
    /// its shard's share yet fit the budget, a shard over its share keeps
    /// its records while the store has room, and no shard may drop a live
    /// record that the budget and twice its share have room for.
    #[test]
    fn the_store_does_what_the_model_allows_within_a_budget_split_among_shards(
        max_bytes in prop::sample::select(&[4_096u64, 20_000, 200_000][..]),
        shards in 2u64..5,
        ops in prop::collection::vec(any_op(), 1..150),
    ) {
        run(max_bytes, Some(shards), &ops);
    }

    /// Many shards, a budget nothing fills: no live record is ever lost.
    #[test]
    fn the_store_does_what_the_model_allows_across_shards(
        ops in prop::collection::vec(any_op(), 1..150),
    ) {
        run(1 << 30, None, &ops);
    }
}
