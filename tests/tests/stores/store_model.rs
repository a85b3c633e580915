//! Random sequences of claims, renewals, completions, releases and reads,
//! from several instances at once and with the clock moved between them,
//! against every store, each answer checked against a model of what the
//! store contract promises:
//!
//! - a key is free, held by one lease token, or completed;
//! - a claim of a free key, or of one whose lease lapsed or whose record
//!   expired (its deadline at or before now), acquires with a new token;
//!   a live lease answers in flight with its holder's fingerprint and
//!   deadline, a live record replays itself;
//! - a token holds its key (lapsed or not) until the key is completed,
//!   released or taken over: only then may it renew (never moving the
//!   deadline back), complete or release, and every other token is
//!   refused with `LeaseLost`;
//! - a read gives back the live record, nothing past its deadline.
//!
//! The clock is also set back, as an NTP step would; the instances'
//! monotonic clock moves forward with it and never back. A `Tiered`
//! instance may then replay a record it cached that the clock had shown
//! expired, as its documentation allows of a clock running behind.
//!
//! Calls sent at once must be explained by some order of them; a burst of
//! claims of one key acquires it at most once. A failure names the seed,
//! which `IDEMPOTENT_MODEL_SEED` replays.

use crate::store_support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use idempotent_core::clock::{Clock, ManualClock};
use idempotent_core::fingerprint::Fingerprint;
use idempotent_core::key::IdempotencyKey;
use idempotent_core::record::{Claim, Completed, LeaseToken, Record, RecordKey, StoredResponse};
use idempotent_core::scope::ScopeDigest;
use idempotent_core::store::{
    MemoryStore, PostgresStore, RedisStore, SharedStore, SqliteStore, StoreError, Tiered,
};
use store_support::{EXPIRY_GRACE, TempDb, backend_url, redis_connection, unique_name};

/// Keys the operations pick from, few so that they meet.
const KEYS: usize = 3;
/// Store instances sharing the records, as processes would.
const INSTANCES: usize = 2;
const STEPS: usize = 250;
const SEEDS: u64 = 6;
const CENTURY_MS: u64 = 100 * 365 * 24 * 60 * 60 * 1000;
const DURATIONS_MS: &[u64] = &[1, 999, 1_000, 1_500, 10_250, 60_500];

/// SplitMix64: a seeded sequence, the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("small")
    }

    fn percent(&mut self, chance: u64) -> bool {
        self.next() % 100 < chance
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
}

/// What the model says a key holds.
#[derive(Clone, Debug, PartialEq)]
enum Held {
    InFlight {
        fingerprint: Fingerprint,
        token: LeaseToken,
        deadline: u64,
    },
    Completed(Completed),
}

impl Held {
    fn deadline(&self) -> u64 {
        match self {
            Self::InFlight { deadline, .. } => *deadline,
            Self::Completed(record) => record.expires_at,
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Claim {
        key: usize,
        fingerprint: Fingerprint,
        lease: Duration,
    },
    Renew {
        key: usize,
        token: LeaseToken,
        lease: Duration,
    },
    Complete {
        key: usize,
        token: LeaseToken,
        ttl: Duration,
        response: StoredResponse,
    },
    Release {
        key: usize,
        token: LeaseToken,
    },
    Get {
        key: usize,
    },
}

impl Op {
    fn key(&self) -> usize {
        match self {
            Self::Claim { key, .. }
            | Self::Renew { key, .. }
            | Self::Complete { key, .. }
            | Self::Release { key, .. }
            | Self::Get { key } => *key,
        }
    }
}

#[derive(Debug)]
enum Answer {
    Claim(Result<Claim, StoreError>),
    Done(Result<(), StoreError>),
    Read(Result<Option<Record>, StoreError>),
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn lease_lost(answer: &Answer) -> bool {
    matches!(answer, Answer::Done(Err(StoreError::LeaseLost)))
}

/// What each key must hold, by the contract.
#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    held: HashMap<usize, Held>,
}

impl Model {
    fn live(&self, key: usize, now: u64) -> Option<&Held> {
        self.held.get(&key).filter(|held| held.deadline() > now)
    }

    fn holder(&self, key: usize, token: LeaseToken) -> Option<(Fingerprint, u64)> {
        match self.held.get(&key) {
            Some(Held::InFlight {
                fingerprint,
                token: holder,
                deadline,
            }) if *holder == token => Some((*fingerprint, *deadline)),
            _ => None,
        }
    }

    /// Whether the store may have let go of `key`'s record by the latest
    /// time the clock showed, `seen`: a record once past its deadline, or
    /// a claim once a grace past its lease, may be purged, and a clock set
    /// back later does not bring it back.
    fn may_be_purged(&self, key: usize, seen: u64) -> bool {
        match self.held.get(&key) {
            Some(Held::InFlight { deadline, .. }) => {
                deadline.saturating_add(millis(EXPIRY_GRACE)) <= seen
            }
            Some(Held::Completed(record)) => record.expires_at <= seen,
            None => false,
        }
    }

    /// Forgets `key`'s record when the store shows it gone and it may be.
    fn follow_a_purge(&mut self, key: usize, seen: u64, gone: bool) {
        if gone && self.may_be_purged(key, seen) {
            self.held.remove(&key);
        }
    }

    /// Applies `op`, answered `answer` at `now`, or says why the contract
    /// forbids that answer.
    fn step(
        &mut self,
        (now, seen): (u64, u64),
        op: &Op,
        answer: &Answer,
        issued: &HashSet<LeaseToken>,
        cached: &[Vec<Completed>],
    ) -> Result<(), String> {
        let key = op.key();
        if stale_replay(cached, (now, seen), op, answer) {
            return Ok(());
        }
        // What shows the record gone: a live one not answered, or a
        // holder refused.
        let gone = match (op, answer) {
            (_, Answer::Claim(Ok(Claim::Acquired(_))) | Answer::Read(Ok(None))) => {
                self.live(key, now).is_some()
            }
            (
                Op::Renew { token, .. } | Op::Complete { token, .. } | Op::Release { token, .. },
                answer,
            ) => lease_lost(answer) && self.holder(key, *token).is_some(),
            _ => false,
        };
        self.follow_a_purge(key, seen, gone);
        match (op, answer) {
            (op @ Op::Claim { .. }, Answer::Claim(claim)) => self.claim(now, op, claim, issued),
            (Op::Renew { key, token, lease }, answer) => {
                let Some((fingerprint, deadline)) = self.holder(*key, *token) else {
                    return refused(answer, "renewal without the lease");
                };
                expect_done(answer, "the holder's renewal")?;
                let deadline = deadline.max(now.saturating_add(millis(*lease)));
                let held = Held::InFlight {
                    fingerprint,
                    token: *token,
                    deadline,
                };
                self.held.insert(*key, held);
                Ok(())
            }
            (
                Op::Complete {
                    key,
                    token,
                    ttl,
                    response,
                },
                answer,
            ) => {
                let Some((fingerprint, _)) = self.holder(*key, *token) else {
                    return refused(answer, "completion without the lease");
                };
                expect_done(answer, "the holder's completion")?;
                let expires_at = now.saturating_add(millis(*ttl));
                let record = Completed::new(fingerprint, response.clone(), expires_at);
                self.held.insert(*key, Held::Completed(record));
                Ok(())
            }
            (Op::Release { key, token }, answer) => {
                if self.holder(*key, *token).is_none() {
                    return refused(answer, "release without the lease");
                }
                expect_done(answer, "the holder's release")?;
                self.held.remove(key);
                Ok(())
            }
            (Op::Get { key }, Answer::Read(Ok(read))) => {
                let expected = self.live(*key, now);
                match (read, expected) {
                    (None, None) => Ok(()),
                    (
                        Some(Record::InFlight(read)),
                        Some(Held::InFlight {
                            fingerprint,
                            token,
                            deadline,
                        }),
                    ) if read.fingerprint == *fingerprint
                        && read.lease_token == *token
                        && read.lease_expires_at == *deadline =>
                    {
                        Ok(())
                    }
                    (Some(Record::Completed(read)), Some(Held::Completed(record)))
                        if **read == *record =>
                    {
                        Ok(())
                    }
                    (read, expected) => Err(format!("read {read:?}, the model holds {expected:?}")),
                }
            }
            (op, answer) => Err(format!("{op:?} answered {answer:?}")),
        }
    }

    fn claim(
        &mut self,
        now: u64,
        op: &Op,
        claim: &Result<Claim, StoreError>,
        issued: &HashSet<LeaseToken>,
    ) -> Result<(), String> {
        let Op::Claim {
            key,
            fingerprint,
            lease,
        } = op
        else {
            unreachable!("a claim")
        };
        let Ok(claim) = claim else {
            return Err(format!("a claim failed: {claim:?}"));
        };
        match (self.live(*key, now), claim) {
            (
                Some(Held::InFlight {
                    fingerprint: holder,
                    deadline,
                    ..
                }),
                Claim::InFlight {
                    fingerprint: found,
                    lease_expires_at,
                    ..
                },
            ) if holder == found && deadline == lease_expires_at => Ok(()),
            (Some(Held::Completed(record)), Claim::Completed(found)) if **found == *record => {
                Ok(())
            }
            (None, Claim::Acquired(token)) if !issued.contains(token) => {
                let held = Held::InFlight {
                    fingerprint: *fingerprint,
                    token: *token,
                    deadline: now.saturating_add(millis(*lease)),
                };
                self.held.insert(*key, held);
                Ok(())
            }
            (live, claim) => Err(format!(
                "claim answered {claim:?}, the model holds live {live:?}"
            )),
        }
    }
}

/// Whether `answer` replays a record that `key` held before and an
/// instance's cache may keep: one the clock once showed expired, live
/// again by a clock set back since (its key may have been run again
/// meanwhile). A `Tiered` cache replays such a record, as it does when
/// its clock runs behind another instance's, by up to the step.
fn stale_replay(
    cached: &[Vec<Completed>],
    (now, seen): (u64, u64),
    op: &Op,
    answer: &Answer,
) -> bool {
    let found = match (op, answer) {
        (Op::Claim { .. }, Answer::Claim(Ok(Claim::Completed(found))))
        | (Op::Get { .. }, Answer::Read(Ok(Some(Record::Completed(found))))) => found,
        _ => return false,
    };
    let revived = now < found.expires_at && found.expires_at <= seen;
    let records = cached.get(op.key()).map_or(&[][..], Vec::as_slice);
    revived && records.iter().any(|record| **found == *record)
}

fn refused(answer: &Answer, what: &str) -> Result<(), String> {
    if lease_lost(answer) {
        Ok(())
    } else {
        Err(format!(
            "a {what} must be refused with LeaseLost, got {answer:?}"
        ))
    }
}

fn expect_done(answer: &Answer, what: &str) -> Result<(), String> {
    match answer {
        Answer::Done(Ok(())) => Ok(()),
        answer => Err(format!("{what} must succeed, got {answer:?}")),
    }
}

/// Every permutation of `0..n`.
fn orders(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut all = Vec::new();
    for rest in orders(n - 1) {
        for at in 0..=rest.len() {
            let mut order = rest.clone();
            order.insert(at, n - 1);
            all.push(order);
        }
    }
    all
}

/// A run against `instances`, stores sharing their records and `clock`.
struct Run {
    instances: Vec<SharedStore>,
    clock: ManualClock,
    keys: Vec<RecordKey>,
    rng: Rng,
    /// The states the answers so far are explained by.
    models: Vec<Model>,
    /// Every token a claim was given, by key.
    tokens: Vec<Vec<LeaseToken>>,
    issued: HashSet<LeaseToken>,
    /// The instance each token was acquired on, which alone uses it, as
    /// a request's token stays in the process that claimed for it.
    home: HashMap<LeaseToken, usize>,
    responses: u64,
    /// The latest time the clock showed.
    seen: u64,
    /// A monotonic clock, as a process's: it moves forward with the clock,
    /// and not back when the clock is set back.
    steady: ManualClock,
    history: Vec<String>,
    /// For `Tiered` instances, the completed records each key held, which
    /// their caches may replay after a clock set back; empty otherwise.
    cached: Vec<Vec<Completed>>,
}

impl Run {
    fn new(instances: Vec<SharedStore>, clocks: Clocks, seed: u64, tiered: bool) -> Self {
        let Clocks { clock, steady } = clocks;
        let scope = ScopeDigest::from_bytes(rand::random());
        let keys = (0..KEYS)
            .map(|key| {
                let name = format!("model-{key}");
                RecordKey::new(
                    scope,
                    IdempotencyKey::parse(name.as_bytes()).expect("a valid key"),
                )
            })
            .collect();
        Self {
            instances,
            clock,
            keys,
            rng: Rng(seed),
            models: vec![Model::default()],
            tokens: vec![Vec::new(); KEYS],
            issued: HashSet::new(),
            home: HashMap::new(),
            responses: 0,
            seen: 0,
            steady,
            history: Vec::new(),
            cached: if tiered {
                vec![Vec::new(); KEYS]
            } else {
                Vec::new()
            },
        }
    }

    fn duration(&mut self) -> Duration {
        let millis = match self.rng.below(20) {
            0 => 0,
            1 => CENTURY_MS,
            _ => self.rng.pick(DURATIONS_MS),
        };
        Duration::from_millis(millis)
    }

    fn token(&mut self, key: usize) -> LeaseToken {
        let tokens = &self.tokens[key];
        match self.rng.below(10) {
            _ if tokens.is_empty() => LeaseToken::random(),
            0 => LeaseToken::random(),
            1 | 2 => tokens[self.rng.below(tokens.len())],
            _ => *tokens.last().expect("not empty"),
        }
    }

    fn response(&mut self) -> StoredResponse {
        self.responses += 1;
        let stamp = self.responses.to_string();
        let body = match self.rng.below(4) {
            0 => None,
            1 => Some(Bytes::new()),
            _ => Some(Bytes::from(format!("response {stamp}"))),
        };
        let headers = if self.rng.percent(50) {
            vec![(
                HeaderName::from_static("x-response"),
                HeaderValue::from_str(&stamp).expect("digits"),
            )]
        } else {
            Vec::new()
        };
        let status = self
            .rng
            .pick(&[StatusCode::OK, StatusCode::CREATED, StatusCode::NOT_FOUND]);
        StoredResponse::new(status, headers, body)
    }

    fn op(&mut self) -> Op {
        let key = self.rng.below(KEYS);
        match self.rng.below(12) {
            0..=3 => Op::Claim {
                key,
                fingerprint: Fingerprint::from_bytes([self.rng.pick(&[1, 2]); 32]),
                lease: self.duration(),
            },
            4 | 5 => Op::Renew {
                key,
                token: self.token(key),
                lease: self.duration(),
            },
            6..=8 => Op::Complete {
                key,
                token: self.token(key),
                ttl: self.duration(),
                response: self.response(),
            },
            9 => Op::Release {
                key,
                token: self.token(key),
            },
            _ => Op::Get { key },
        }
    }

    /// Sends `op` from `instance` on a task of its own, so that calls
    /// sent at once run on several threads.
    fn send(&self, instance: usize, op: &Op) -> tokio::task::JoinHandle<Answer> {
        let store = self.instances[instance].clone();
        let (op, key) = (op.clone(), self.keys[op.key()].clone());
        tokio::spawn(async move {
            match op {
                Op::Claim {
                    fingerprint, lease, ..
                } => Answer::Claim(store.claim(&key, fingerprint, lease).await),
                Op::Renew { token, lease, .. } => {
                    Answer::Done(store.renew(&key, token, lease).await)
                }
                Op::Complete {
                    token,
                    ttl,
                    response,
                    ..
                } => Answer::Done(store.complete(&key, token, response, ttl).await),
                Op::Release { token, .. } => Answer::Done(store.release(&key, token).await),
                Op::Get { .. } => Answer::Read(store.get(&key).await),
            }
        })
    }

    /// The answers of calls sent at once.
    async fn answers(sent: Vec<tokio::task::JoinHandle<Answer>>) -> Vec<Answer> {
        let answers = futures_util::future::join_all(sent).await;
        answers
            .into_iter()
            .map(|answer| answer.expect("a call panicked"))
            .collect()
    }

    /// Sends `ops` at once, each from a random instance, and checks that
    /// some order of them explains the answers.
    async fn batch(&mut self, ops: Vec<Op>) {
        let now = self.clock.now_millis();
        let from: Vec<usize> = ops.iter().map(|op| self.instance_for(op)).collect();
        let sent = ops
            .iter()
            .zip(&from)
            .map(|(op, instance)| self.send(*instance, op))
            .collect();
        let answers = Self::answers(sent).await;
        for (op, (answer, instance)) in ops.iter().zip(answers.iter().zip(&from)) {
            self.history.push(format!(
                "at {now} on instance {instance}: {op:?} -> {answer:?}"
            ));
        }
        let mut explained: Vec<Model> = Vec::new();
        let mut why = String::new();
        for model in &self.models {
            for order in orders(ops.len()) {
                let mut next = model.clone();
                let fits = order.iter().try_for_each(|&i| {
                    next.step(
                        (now, self.seen),
                        &ops[i],
                        &answers[i],
                        &self.issued,
                        &self.cached,
                    )
                });
                match fits {
                    Ok(()) if !explained.contains(&next) => explained.push(next),
                    Ok(()) => {}
                    Err(reason) => why = reason,
                }
            }
        }
        assert!(
            !explained.is_empty(),
            "no order of the calls fits the contract: {why}\n{}",
            self.told()
        );
        explained.truncate(8);
        self.models = explained;
        self.note_tokens(&ops, &answers, &from);
        self.note_records();
    }

    /// The instance `op` goes to: its token's own, or any.
    fn instance_for(&mut self, op: &Op) -> usize {
        let token = match op {
            Op::Renew { token, .. } | Op::Complete { token, .. } | Op::Release { token, .. } => {
                Some(token)
            }
            Op::Claim { .. } | Op::Get { .. } => None,
        };
        match token.and_then(|token| self.home.get(token)) {
            Some(home) => *home,
            None => self.rng.below(INSTANCES),
        }
    }

    /// Keeps the completed records the models hold, which a `Tiered`
    /// instance may have cached (see [`stale_replay`]).
    fn note_records(&mut self) {
        if self.cached.is_empty() {
            return;
        }
        for model in &self.models {
            for (key, held) in &model.held {
                let records = &mut self.cached[*key];
                match held {
                    Held::Completed(record) if !records.contains(record) => {
                        records.push(record.clone());
                    }
                    _ => {}
                }
            }
        }
    }

    fn note_tokens(&mut self, ops: &[Op], answers: &[Answer], from: &[usize]) {
        for ((op, answer), instance) in ops.iter().zip(answers).zip(from) {
            if let (Op::Claim { key, .. }, Answer::Claim(Ok(Claim::Acquired(token)))) = (op, answer)
            {
                self.tokens[*key].push(*token);
                self.issued.insert(*token);
                self.home.insert(*token, *instance);
            }
        }
    }

    /// Many claims of one key from every instance at once: exactly one
    /// acquires a key nothing live holds, and every other claim sees that
    /// one's lease, or all see the live record.
    async fn burst(&mut self) {
        let key = self.rng.below(KEYS);
        let lease = Duration::from_millis(self.rng.pick(DURATIONS_MS));
        let now = self.clock.now_millis();
        let ops: Vec<Op> = (0..16)
            .map(|i| Op::Claim {
                key,
                fingerprint: Fingerprint::from_bytes([1 + (i % 2) as u8; 32]),
                lease,
            })
            .collect();
        let from: Vec<usize> = (0..ops.len()).map(|i| i % INSTANCES).collect();
        let sent = ops
            .iter()
            .zip(&from)
            .map(|(op, instance)| self.send(*instance, op))
            .collect();
        let answers = Self::answers(sent).await;
        self.history.push(format!(
            "at {now}: a burst of claims of key {key}, lease {lease:?}: {answers:?}"
        ));
        let winners: Vec<usize> = (0..ops.len())
            .filter(|&i| matches!(answers[i], Answer::Claim(Ok(Claim::Acquired(_)))))
            .collect();
        assert!(
            winners.len() <= 1,
            "{} claims of one key acquired it at once\n{}",
            winners.len(),
            self.told()
        );
        // The winner first, then the rest in any order: one check each.
        let order: Vec<usize> = winners
            .iter()
            .copied()
            .chain((0..ops.len()).filter(|i| !winners.contains(i)))
            .collect();
        let mut explained = Vec::new();
        let mut why = String::new();
        for model in &self.models {
            let mut next = model.clone();
            match order.iter().try_for_each(|&i| {
                next.step(
                    (now, self.seen),
                    &ops[i],
                    &answers[i],
                    &self.issued,
                    &self.cached,
                )
            }) {
                Ok(()) => explained.push(next),
                Err(reason) => why = reason,
            }
        }
        assert!(
            !explained.is_empty(),
            "the burst does not fit the contract: {why}\n{}",
            self.told()
        );
        self.models = explained;
        self.note_tokens(&ops, &answers, &from);
        self.note_records();
    }

    fn move_clock(&mut self) {
        let now = self.clock.now_millis();
        let deadlines: Vec<u64> = self.models[0]
            .held
            .values()
            .map(Held::deadline)
            .filter(|d| *d > now)
            .collect();
        let to = match self.rng.below(10) {
            // Exactly at a deadline, or a millisecond before it.
            0..=2 if !deadlines.is_empty() => {
                let deadline = self
                    .rng
                    .pick(&deadlines)
                    .min(now + 2 * millis(EXPIRY_GRACE));
                deadline - u64::from(self.rng.percent(40))
            }
            3 => now - self.rng.pick(&[1, 1_000, 10_000]),
            4 => now + millis(EXPIRY_GRACE) + 1_000,
            _ => now + self.rng.pick(DURATIONS_MS),
        };
        self.history.push(format!("clock {now} -> {to}"));
        self.steady
            .advance(Duration::from_millis(to.saturating_sub(now)));
        self.clock.set(to);
        self.seen = self.seen.max(to);
    }

    async fn run(mut self, steps: usize) {
        self.seen = self.clock.now_millis();
        for _ in 0..steps {
            match self.rng.below(20) {
                0..=2 => self.move_clock(),
                3 => self.burst().await,
                4..=6 => {
                    let ops = (0..2 + self.rng.below(3)).map(|_| self.op()).collect();
                    self.batch(ops).await;
                }
                _ => {
                    let op = self.op();
                    self.batch(vec![op]).await;
                }
            }
        }
    }

    /// The last steps, to read a failure by.
    fn told(&self) -> String {
        let from = self.history.len().saturating_sub(40);
        self.history[from..].join("\n")
    }
}

/// The seeds to run: `IDEMPOTENT_MODEL_SEED` alone if set, else the
/// first `IDEMPOTENT_MODEL_SEEDS` (default [`SEEDS`]).
fn seeds() -> Vec<u64> {
    match std::env::var("IDEMPOTENT_MODEL_SEED") {
        Ok(seed) => vec![seed.parse().expect("a number")],
        Err(_) => {
            let count = std::env::var("IDEMPOTENT_MODEL_SEEDS")
                .map_or(SEEDS, |count| count.parse().expect("a number"));
            (0..count).collect()
        }
    }
}

/// The clocks of a run: the wall clock that the stores read, which a run
/// may set back, and the monotonic clock of the instances' processes.
#[derive(Clone)]
struct Clocks {
    clock: ManualClock,
    steady: ManualClock,
}

/// Runs every seed on instances from `make`, given the clocks they read.
async fn check_model(make: impl AsyncFn(Clocks) -> Vec<SharedStore>, tiered: bool) {
    for seed in seeds() {
        let clocks = Clocks {
            clock: ManualClock::starting_now(),
            steady: ManualClock::new(0),
        };
        let instances = make(clocks.clone()).await;
        let run = Run::new(instances, clocks, seed, tiered);
        let outcome = tokio::spawn(run.run(STEPS)).await;
        if let Err(panic) = outcome {
            panic!("seed {seed} (IDEMPOTENT_MODEL_SEED={seed}): {panic}");
        }
    }
}

fn shared<S: idempotent_core::store::Store>(store: S) -> SharedStore {
    Arc::new(store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_memory_store_answers_as_the_contract_says() {
    check_model(
        async |Clocks { clock, .. }| {
            let store = MemoryStore::builder().clock(clock).build();
            vec![shared(store.clone()), shared(store)]
        },
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiered_instances_over_one_memory_store_answer_as_the_contract_says() {
    check_model(
        async |clocks| {
            let durable = MemoryStore::builder().clock(clocks.clock.clone()).build();
            (0..INSTANCES)
                .map(|_| shared(tiered_cache(durable.clone(), &clocks)))
                .collect()
        },
        true,
    )
    .await;
}

/// A `Tiered` cache over `durable`, in a process whose clocks are `clocks`.
fn tiered_cache<S: idempotent_core::store::Store>(durable: S, clocks: &Clocks) -> Tiered<S> {
    Tiered::builder(durable)
        .clock(clocks.clock.clone())
        .lapse_clock(clocks.steady.clone())
        .build()
}

/// Runs every seed on `INSTANCES` stores from `connect`, each on
/// connections of its own over the same records, as processes would have,
/// or on a `Tiered` cache over each (`tiered`).
async fn check_durable<S>(tiered: bool, connect: impl AsyncFn(ManualClock) -> S)
where
    S: idempotent_core::store::Store,
{
    check_model(
        async |clocks| {
            let mut instances = Vec::new();
            for _ in 0..INSTANCES {
                let durable = connect(clocks.clock.clone()).await;
                instances.push(if tiered {
                    shared(tiered_cache(durable, &clocks))
                } else {
                    shared(durable)
                });
            }
            instances
        },
        tiered,
    )
    .await;
}

async fn sqlite_instance(db: &TempDb, clock: ManualClock) -> SqliteStore {
    let opened = SqliteStore::open(&db.0).await.expect("open the database");
    opened.migrate().await.expect("migrate");
    SqliteStore::builder(opened.pool().clone())
        .clock(clock)
        .build()
        .expect("valid table name")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_stores_on_one_file_answer_as_the_contract_says() {
    let db = TempDb::new();
    check_durable(false, async |clock| sqlite_instance(&db, clock).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiered_instances_over_sqlite_answer_as_the_contract_says() {
    let db = TempDb::new();
    check_durable(true, async |clock| sqlite_instance(&db, clock).await).await;
}

async fn postgres_instance(url: &str, table: &str, clock: ManualClock) -> PostgresStore {
    let connected = PostgresStore::connect(url).await.expect("connect");
    let store = PostgresStore::builder(connected.pool().clone())
        .table(table)
        .clock(clock)
        .build()
        .expect("valid table name");
    store.migrate().await.expect("migrate");
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stores_answer_as_the_contract_says() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
        return;
    };
    let table = unique_name("idem_model");
    check_durable(false, async |clock| {
        postgres_instance(&url, &table, clock).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiered_instances_over_postgres_answer_as_the_contract_says() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_POSTGRES_URL") else {
        return;
    };
    let table = unique_name("idem_model");
    check_durable(true, async |clock| {
        postgres_instance(&url, &table, clock).await
    })
    .await;
}

async fn redis_instance(url: &str, prefix: &str, clock: ManualClock) -> RedisStore {
    RedisStore::builder(redis_connection(url).await)
        .prefix(prefix)
        .clock(clock)
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stores_answer_as_the_contract_says() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let prefix = unique_name("idem_model") + ":";
    check_durable(false, async |clock| {
        redis_instance(&url, &prefix, clock).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiered_instances_over_redis_answer_as_the_contract_says() {
    let Some(url) = backend_url("IDEMPOTENT_TEST_REDIS_URL") else {
        return;
    };
    let prefix = unique_name("idem_model") + ":";
    check_durable(true, async |clock| {
        redis_instance(&url, &prefix, clock).await
    })
    .await;
}
