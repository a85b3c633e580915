//! Per-endpoint policy: how long results live, whose key it is, which
//! responses are final.

use std::time::Duration;

use http::StatusCode;

use crate::fingerprint::{FingerprintError, Fingerprinter};
use crate::scope::Scope;

/// A range of statuses, inclusive at both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusRange {
    first: u16,
    last: u16,
}

impl StatusRange {
    /// One status.
    #[must_use]
    pub const fn one(status: u16) -> Self {
        Self {
            first: status,
            last: status,
        }
    }

    /// `first..=last`.
    #[must_use]
    pub const fn new(first: u16, last: u16) -> Self {
        Self { first, last }
    }

    const fn contains(self, status: u16) -> bool {
        self.first <= status && status <= self.last
    }
}

/// Which responses are final (stored and replayed) rather than released so a
/// retry runs the handler again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum FinalStatuses {
    /// 2xx to 4xx except 408, 409, 423, 425 and 429, which say "try again
    /// later" and so must let a retry run, and 401, 405, 407, 413 and 415,
    /// which refuse the request's credentials, method, size or format
    /// before anything runs (an authentication middleware or proxy,
    /// `axum`'s router and extractors answer them), so that a retry that
    /// fixes the request (a refreshed token, the right method) is not
    /// answered with them. An
    /// informational 1xx (a protocol switch) is not an outcome to replay,
    /// under this policy or any other.
    #[default]
    Default,
    /// Exactly the listed statuses, but for a 1xx, which is never stored
    /// (see [`is_final`](Self::is_final)): the attribute's
    /// `final_statuses = "2xx, 404"` is
    ///
    /// ```
    /// use idempotent_core::{Endpoint, FinalStatuses, StatusRange};
    /// # use http::StatusCode;
    ///
    /// const IMPORT: Endpoint = Endpoint::new("imports.create")
    ///     .final_statuses(FinalStatuses::Only(&[StatusRange::new(200, 299), StatusRange::one(404)]));
    /// # assert!(IMPORT.final_status_policy().is_final(StatusCode::NOT_FOUND));
    /// # assert!(!IMPORT.final_status_policy().is_final(StatusCode::BAD_REQUEST));
    /// ```
    Only(&'static [StatusRange]),
    /// The [`Default`](Self::Default) statuses and the listed ones too:
    /// for a handler whose own 409 (an order out of stock, a payment
    /// already captured) is its outcome, to be replayed rather than run
    /// again. The attribute's `final_statuses = "default, 409"` is
    ///
    /// ```
    /// use idempotent_core::{Endpoint, FinalStatuses, StatusRange};
    /// # use http::StatusCode;
    ///
    /// const ORDER: Endpoint = Endpoint::new("orders.create")
    ///     .final_statuses(FinalStatuses::DefaultAnd(&[StatusRange::one(409)]));
    /// # assert!(ORDER.final_status_policy().is_final(StatusCode::CONFLICT));
    /// # assert!(ORDER.final_status_policy().is_final(StatusCode::NOT_FOUND));
    /// # assert!(!ORDER.final_status_policy().is_final(StatusCode::TOO_MANY_REQUESTS));
    /// ```
    ///
    /// A listed status the default already stores changes nothing, except
    /// that a 400 or 422 listed here is stored even when it answers an
    /// input the extractor rejected, as with [`Only`](Self::Only).
    DefaultAnd(&'static [StatusRange]),
}

/// Statuses under 500 that ask the client to retry, or refuse the
/// request's credentials, method, size or format before anything runs.
/// Stored, a 401 from an authentication middleware behind an
/// `IdempotentLayer`, or from a handler refusing an expired token, would
/// answer the retry with the refreshed token 401 for the whole TTL; a
/// 407 likewise, and its replay would lack the `Proxy-Authenticate`
/// challenge, which is never stored. An
/// `IdempotentLayer` that wraps a whole method router (`Router::route_layer`)
/// sees axum's 405 for the other methods: stored, it would use up the key
/// of a request sent with the wrong method.
const NOT_FINAL: [u16; 10] = [401, 405, 407, 408, 409, 413, 415, 423, 425, 429];

impl FinalStatuses {
    /// Whether a response with `status` is stored. Never a 1xx, even
    /// one the list names (`"1xx"`, `"100-599"`): it is no final answer,
    /// a stored one cannot be replayed, and every retry with its key would
    /// be answered 500 `record-corrupt` until the record expired.
    #[must_use]
    pub fn is_final(self, status: StatusCode) -> bool {
        if status.is_informational() {
            return false;
        }
        let status = status.as_u16();
        match self {
            Self::Default => is_final_by_default(status),
            Self::Only(ranges) => lists(ranges, status),
            Self::DefaultAnd(ranges) => is_final_by_default(status) || lists(ranges, status),
        }
    }

    /// Whether the endpoint names `status` itself, rather than having it
    /// stored by the default alone: the engine releases a 400 or 422 that
    /// answers a rejected input only when the default is what stores it.
    pub(crate) fn lists(self, status: StatusCode) -> bool {
        match self {
            Self::Default => false,
            Self::Only(ranges) | Self::DefaultAnd(ranges) => lists(ranges, status.as_u16()),
        }
    }
}

fn is_final_by_default(status: u16) -> bool {
    (200..500).contains(&status) && !NOT_FINAL.contains(&status)
}

fn lists(ranges: &[StatusRange], status: u16) -> bool {
    ranges.iter().any(|range| range.contains(status))
}

/// The idempotency policy of one endpoint. Built in a `const`, which is
/// what `#[idempotent]` expands to.
///
/// ```
/// use std::time::Duration;
/// use idempotent_core::{Endpoint, Scope};
///
/// const CREATE_PAYMENT: Endpoint = Endpoint::new("create_payment")
///     .ttl(Duration::from_secs(24 * 3600))
///     .scope(Scope::ApiKey);
///
/// assert_eq!(CREATE_PAYMENT.result_ttl(), Duration::from_secs(24 * 3600));
/// ```
///
/// The setters take the attribute's option names, and a getter cannot
/// have its setter's name, so each value is read back under a name of its
/// own (searching the docs for the setter's name finds both):
///
/// | set with | read with |
/// |---|---|
/// | [`ttl`](Self::ttl) | [`result_ttl`](Self::result_ttl) |
/// | [`lease`](Self::lease) | [`lease_duration`](Self::lease_duration) |
/// | [`scope`](Self::scope) | [`scope_kind`](Self::scope_kind) |
/// | [`optional`](Self::optional) | [`is_optional`](Self::is_optional) |
/// | [`wait`](Self::wait) | [`wait_duration`](Self::wait_duration) |
/// | [`final_statuses`](Self::final_statuses) | [`final_status_policy`](Self::final_status_policy) |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct Endpoint {
    name: &'static str,
    ttl: Duration,
    lease: Duration,
    scope: Scope,
    optional: bool,
    wait: Option<Duration>,
    final_statuses: FinalStatuses,
}

/// The longest TTL, lease or wait: a century. Longer ones would overflow
/// the clocks deadlines are computed on.
const LONGEST: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// The shortest TTL or lease.
const SHORTEST: Duration = Duration::from_secs(1);

const fn at_least_a_second(duration: Duration) -> Duration {
    if duration.as_secs() < SHORTEST.as_secs() {
        SHORTEST
    } else {
        duration
    }
}

const fn at_most_a_century(duration: Duration) -> Duration {
    if duration.as_secs() >= LONGEST.as_secs() {
        LONGEST
    } else {
        duration
    }
}

impl Endpoint {
    /// Result TTL unless set: 24 hours.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
    /// In-flight lease unless set: 60 seconds, renewed while the handler runs.
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

    /// An endpoint named `name`. The name is part of every fingerprint, so
    /// keep it stable across renames of the Rust function.
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            ttl: Self::DEFAULT_TTL,
            lease: Self::DEFAULT_LEASE,
            scope: Scope::ApiKey,
            optional: false,
            wait: None,
            final_statuses: FinalStatuses::Default,
        }
    }

    /// How long a finished response is replayed, at least a second (a
    /// zero TTL would replay nothing, and every retry would run the handler
    /// again). Durations are kept to a century, which is what
    /// `Duration::MAX` ("for good") comes to, here and in
    /// [`lease`](Self::lease) and [`wait`](Self::wait).
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = at_least_a_second(at_most_a_century(ttl));
        self
    }

    /// How long a claim holds without renewal, at least a second (the
    /// attribute refuses less at compile time): the engine renews it every
    /// third of this while the handler runs, and a shorter lease lapses
    /// between renewals, or within a durable store's round trip, so a
    /// duplicate would take the key over and run the handler a second
    /// time. A crashed process's claim is taken over after it lapses.
    pub const fn lease(mut self, lease: Duration) -> Self {
        self.lease = at_least_a_second(at_most_a_century(lease));
        self
    }

    /// Whose key it is (default [`Scope::ApiKey`], as the attribute's: a
    /// keyed request without an API key is answered 401). The attribute's
    /// `scope = "global"` is [`Scope::Global`], `scope = "header:x-tenant-id"`
    /// is `Scope::Header("x-tenant-id")`, and `scope = User` is
    /// [`Scope::Custom`] with [`IdempotentRequest::scoped_by`](crate::IdempotentRequest::scoped_by).
    pub const fn scope(mut self, scope: Scope) -> Self {
        self.scope = scope;
        self
    }

    /// When `true`, a request without a key runs the handler without
    /// idempotency instead of getting 400 (the attribute's `optional`). A
    /// malformed key is still answered 400.
    pub const fn optional(mut self, optional: bool) -> Self {
        self.optional = optional;
        self
    }

    /// A duplicate that arrives while the first request runs waits up to
    /// `wait` for it and replays its response, instead of getting 409.
    pub const fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(at_most_a_century(wait));
        self
    }

    /// Which statuses are stored (default [`FinalStatuses::Default`]).
    pub const fn final_statuses(mut self, final_statuses: FinalStatuses) -> Self {
        self.final_statuses = final_statuses;
        self
    }

    /// The endpoint's name.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        self.name
    }

    /// The result TTL. Set with [`ttl`](Self::ttl).
    #[doc(alias = "ttl")]
    #[must_use]
    pub const fn result_ttl(&self) -> Duration {
        self.ttl
    }

    /// The lease. Set with [`lease`](Self::lease).
    #[doc(alias = "lease")]
    #[must_use]
    pub const fn lease_duration(&self) -> Duration {
        self.lease
    }

    /// The scope. Set with [`scope`](Self::scope).
    #[doc(alias = "scope")]
    #[must_use]
    pub const fn scope_kind(&self) -> Scope {
        self.scope
    }

    /// Whether the key is optional. Set with [`optional`](Self::optional).
    #[doc(alias = "optional")]
    #[must_use]
    pub const fn is_optional(&self) -> bool {
        self.optional
    }

    /// How long duplicates wait, if they do. Set with [`wait`](Self::wait).
    #[doc(alias = "wait")]
    #[must_use]
    pub const fn wait_duration(&self) -> Option<Duration> {
        self.wait
    }

    /// The final-status policy. Set with [`final_statuses`](Self::final_statuses).
    #[doc(alias = "final_statuses")]
    #[must_use]
    pub const fn final_status_policy(&self) -> FinalStatuses {
        self.final_statuses
    }

    /// A fingerprinter seeded with this endpoint's identity.
    #[must_use]
    pub fn fingerprinter(&self) -> Fingerprinter {
        Fingerprinter::new(self.name)
    }

    /// The fingerprint of `inputs` at this endpoint.
    ///
    /// # Errors
    /// The inputs' `Serialize` impl failed.
    pub fn fingerprint<T: serde::Serialize + ?Sized>(
        &self,
        inputs: &T,
    ) -> Result<crate::fingerprint::Fingerprint, FingerprintError> {
        crate::fingerprint::fingerprint(self.name, inputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_stores_success_and_client_errors() {
        let policy = FinalStatuses::Default;
        for status in [200, 201, 204, 303, 400, 404, 422] {
            assert!(
                policy.is_final(StatusCode::from_u16(status).unwrap()),
                "{status}"
            );
        }
    }

    #[test]
    fn default_policy_releases_server_errors_retryable_client_errors_and_1xx() {
        let policy = FinalStatuses::Default;
        for status in [
            101, 401, 405, 407, 408, 409, 413, 415, 423, 425, 429, 500, 502, 503, 504,
        ] {
            assert!(
                !policy.is_final(StatusCode::from_u16(status).unwrap()),
                "{status}"
            );
        }
    }

    #[test]
    fn a_lease_or_ttl_under_a_second_is_raised_to_one() {
        let endpoint = Endpoint::new("e")
            .lease(Duration::ZERO)
            .ttl(Duration::from_millis(999));
        assert_eq!(endpoint.lease_duration(), Duration::from_secs(1));
        assert_eq!(endpoint.result_ttl(), Duration::from_secs(1));
        let endpoint = Endpoint::new("e").lease(Duration::from_millis(1_500));
        assert_eq!(endpoint.lease_duration(), Duration::from_millis(1_500));
    }

    /// A 1xx is no final answer: stored, it could not be replayed, and
    /// every retry with its key would get 500 `record-corrupt` for the
    /// whole TTL. A list that takes in every status keeps it out too.
    #[test]
    fn a_listed_informational_status_is_not_final() {
        const EVERY_STATUS: &[StatusRange] = &[StatusRange::new(100, 599)];
        for policy in [
            FinalStatuses::Only(EVERY_STATUS),
            FinalStatuses::DefaultAnd(EVERY_STATUS),
        ] {
            assert!(
                !policy.is_final(StatusCode::SWITCHING_PROTOCOLS),
                "{policy:?} stores a 101"
            );
            assert!(
                policy.is_final(StatusCode::SERVICE_UNAVAILABLE),
                "{policy:?}"
            );
        }
    }

    #[test]
    fn custom_policy_stores_exactly_what_it_lists() {
        const RANGES: &[StatusRange] = &[StatusRange::new(200, 299), StatusRange::one(503)];
        let policy = FinalStatuses::Only(RANGES);
        assert!(policy.is_final(StatusCode::CREATED));
        assert!(policy.is_final(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!policy.is_final(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn default_and_policy_adds_its_list_to_the_default() {
        const CONFLICT: &[StatusRange] = &[StatusRange::one(409)];
        let policy = FinalStatuses::DefaultAnd(CONFLICT);
        for status in [200, 201, 404, 409, 422] {
            assert!(
                policy.is_final(StatusCode::from_u16(status).unwrap()),
                "{status}"
            );
        }
        for status in [101, 401, 408, 429, 500, 503] {
            assert!(
                !policy.is_final(StatusCode::from_u16(status).unwrap()),
                "{status}"
            );
        }
        assert!(policy.lists(StatusCode::CONFLICT));
        assert!(!policy.lists(StatusCode::BAD_REQUEST));
        assert!(!FinalStatuses::Default.lists(StatusCode::BAD_REQUEST));
    }
}
