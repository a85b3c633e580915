//! What the `macro_*` tests share: a count of handler runs, and a request
//! sent through a `Router` read back whole.
#![allow(dead_code, unreachable_pub)] // each test file uses a different part

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use idempotent_core::IDEMPOTENT_REPLAYED;
use tower::ServiceExt;

/// How many times the handlers ran, shared as their state.
#[derive(Clone, Default)]
pub struct Runs(Arc<AtomicUsize>);

impl Runs {
    /// Counts a run; the count with it.
    pub fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A response, its body read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    /// Whether it carries `Idempotent-Replayed`.
    pub replayed: bool,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    /// The value of the header `name`, if it has one.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|value| value.to_str().unwrap())
    }

    /// The problem type's name (`key-reused` for
    /// `urn:idempotent:key-reused`), for a problem+json answer.
    pub fn problem_type(&self) -> Option<String> {
        let problem: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        let kind = problem["type"].as_str()?;
        Some(kind.trim_start_matches("urn:idempotent:").to_owned())
    }
}

pub async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let replayed = response.headers().contains_key(IDEMPOTENT_REPLAYED);
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        replayed,
        headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}
