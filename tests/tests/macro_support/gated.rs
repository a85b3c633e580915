//! A handler held at a gate until the test opens it, made idempotent each
//! way: for the tests of what becomes of a run while it is under way.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Json, Router};
use idempotent_core::{Endpoint, Idempotency, idempotent};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Runs, Turnstile, both_ways};

/// What a charge is sent.
#[derive(Serialize, Deserialize)]
pub struct Charge {
    pub amount: u64,
}

/// A gate handlers wait at, closed at first, that the test opens a run at
/// a time; it counts the handlers that started and the side effects done.
#[derive(Clone)]
pub struct Gate {
    /// How many handlers started, watched so a test can wait for a count.
    started: Arc<watch::Sender<usize>>,
    runs: Runs,
    turnstile: Turnstile,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            started: Arc::new(watch::channel(0).0),
            runs: Runs::default(),
            turnstile: Turnstile::default(),
        }
    }
}

impl Gate {
    /// Side effects done.
    pub fn runs(&self) -> usize {
        self.runs.get()
    }

    /// Handlers that started.
    pub fn started(&self) -> usize {
        *self.started.borrow()
    }

    /// Lets `runs` more handlers through.
    pub fn let_through(&self, runs: usize) {
        self.turnstile.let_through(runs);
    }

    /// Counts a handler that started.
    pub fn start(&self) {
        self.started.send_modify(|started| *started += 1);
    }

    /// Waits at the gate until let through.
    pub async fn wait(&self) {
        self.turnstile.pass().await;
    }

    /// Does the side effect, which is to count it; the count with it.
    pub fn charge(&self) -> usize {
        self.runs.bump()
    }

    /// Starts, waits at the gate, then does the side effect.
    pub async fn pass(&self, amount: u64) -> (StatusCode, String) {
        self.start();
        self.wait().await;
        let run = self.charge();
        (StatusCode::CREATED, format!("run {run} amount {amount}"))
    }

    /// Starts and does the side effect at once, then waits at the gate
    /// before it answers: a handler whose cancellation comes too late to
    /// undo it.
    pub async fn charge_then_wait(&self, amount: u64) -> (StatusCode, String) {
        self.start();
        let run = self.charge();
        self.wait().await;
        (StatusCode::CREATED, format!("run {run} amount {amount}"))
    }

    /// Waits until `count` handlers in all have started; ten seconds at
    /// most, a bound on a hang, never a synchronisation.
    pub async fn until_started(&self, count: usize) {
        let mut started = self.started.subscribe();
        let reached = started.wait_for(|&started| started >= count);
        let reached = tokio::time::timeout(Duration::from_secs(10), reached).await;
        reached.expect("the handler starts").expect("never closed");
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
