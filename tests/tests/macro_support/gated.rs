//! A handler held at a gate until the test opens it, made idempotent each
//! way: for the tests of what becomes of a run while it is under way.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Json, Router};
use idempotent_core::{Endpoint, Idempotency, idempotent};
use serde::{Deserialize, Serialize};

use super::{Turnstile, both_ways};

/// What a charge is sent.
#[derive(Serialize, Deserialize)]
pub struct Charge {
    pub amount: u64,
}

/// Counts the handlers that started and the side effects they did; each
/// handler waits at a turnstile, closed at first, that the test opens.
#[derive(Clone, Default)]
pub struct Gate {
    started: Arc<AtomicUsize>,
    runs: Arc<AtomicUsize>,
    turnstile: Turnstile,
}

impl Gate {
    /// Side effects done.
    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// Handlers that started.
    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// Lets `runs` more handlers through.
    pub fn let_through(&self, runs: usize) {
        self.turnstile.let_through(runs);
    }

    /// Counts a handler that started.
    pub fn start(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
    }

    /// Waits at the turnstile until let through.
    pub async fn wait(&self) {
        self.turnstile.pass().await;
    }

    /// Does the side effect: counts it. Its number.
    pub fn charge(&self) -> usize {
        self.runs.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Waits at the gate, then does the side effect.
    pub async fn pass(&self, amount: u64) -> (StatusCode, String) {
        self.start();
        self.wait().await;
        let run = self.charge();
        (StatusCode::CREATED, format!("run {run} amount {amount}"))
    }

    /// Does the side effect at once, then waits at the gate before it
    /// answers: a handler whose cancellation comes too late to undo it.
    pub async fn charge_then_wait(&self, amount: u64) -> (StatusCode, String) {
        self.start();
        let run = self.charge();
        self.wait().await;
        (StatusCode::CREATED, format!("run {run} amount {amount}"))
    }

    /// Waits until `count` handlers started; ten seconds at most, a bound
    /// on a hang.
    pub async fn until_started(&self, count: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.started() < count {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the handler starts");
    }
}

#[idempotent(scope = "global")]
pub async fn gated_by_attribute(
    State(gate): State<Gate>,
    Json(c): Json<Charge>,
) -> (StatusCode, String) {
    gate.pass(c.amount).await
}

pub async fn gated_plain(State(gate): State<Gate>, Json(c): Json<Charge>) -> (StatusCode, String) {
    gate.pass(c.amount).await
}

/// `/attribute` and `/layer`, the gated handler made idempotent each way
/// (the layer's under `endpoint`), on `idempotency`; tests add their
/// layers around it.
pub fn gated_app(gate: &Gate, idempotency: &Idempotency, endpoint: Endpoint) -> Router {
    both_ways(
        gated_by_attribute,
        gated_plain,
        endpoint,
        gate.clone(),
        idempotency.clone(),
    )
}
