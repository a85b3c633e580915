//! Keeping a claim's lease alive while its request runs.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::engine::within;
use crate::fingerprint::Fingerprint;
use crate::idempotency::Settings;
use crate::record::{LeaseToken, Record, RecordKey};
use crate::store::StoreError;

/// Renews a claim's lease every third of it, on a task of its own, until
/// dropped. The handler's own task cannot do it: a handler that holds
/// its thread without yielding (`block_in_place` around a synchronous
/// payment SDK, a long computation) would hold the renewals back, the
/// lease would lapse under it, and a duplicate would run it again.
#[must_use = "renewals stop when dropped"]
pub(crate) struct Renewals(Option<JoinHandle<()>>);

impl Renewals {
    /// Starts renewing `token`'s lease on `key`, the first time a third of
    /// `lease` from now. Outside a tokio runtime nothing can renew (nor
    /// run the handler's timers), and nothing is started.
    pub(crate) fn start(
        settings: &Arc<Settings>,
        key: &RecordKey,
        lease: Duration,
        held: (LeaseToken, Fingerprint),
    ) -> Self {
        let period = lease / 3;
        let runtime = tokio::runtime::Handle::try_current();
        let (false, Ok(runtime)) = (period.is_zero(), runtime) else {
            return Self(None);
        };
        let renewals = renew_until_lost(Arc::clone(settings), key.clone(), lease, held, period);
        Self(Some(runtime.spawn(renewals.in_current_span())))
    }
}

impl Drop for Renewals {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Says that the lease was lost, unless the renewal only met the record
/// its own run had just stored: an abort does not stop a renewal that is
/// already under way when the record is stored.
async fn lease_lost(settings: &Settings, key: &RecordKey, fingerprint: Fingerprint) {
    let stored = within(settings.store_timeout, settings.store.get(key)).await;
    if let Ok(Some(Record::Completed(record))) = stored
        && record.fingerprint == fingerprint
    {
        tracing::debug!("a renewal met the record its run had stored");
        return;
    }
    tracing::error!(
        outcome = "lease_lost",
        "lease taken over while the handler runs; its result will not be stored"
    );
}

async fn renew_until_lost(
    settings: Arc<Settings>,
    key: RecordKey,
    lease: Duration,
    (token, fingerprint): (LeaseToken, Fingerprint),
    period: Duration,
) {
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    loop {
        ticker.tick().await;
        let renewed = settings.store.renew(&key, token, lease);
        match within(settings.store_timeout, renewed).await {
            Ok(()) => {}
            Err(StoreError::LeaseLost) => return lease_lost(&settings, &key, fingerprint).await,
            Err(error) => {
                tracing::warn!(%error, "could not renew the lease; retrying");
                // Soon, not a whole period later: two failures a period
                // apart would let the lease lapse under a running handler.
                ticker.reset_after(period / 8);
            }
        }
    }
}
