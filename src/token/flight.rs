//! Single flight: at most one token request per provider at a time, run in its
//! own task (a waiter giving up never cancels it: a rotated refresh token must
//! never be lost mid-flight), every waiter sharing its outcome.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::cell::Token;
use super::oauth::{Retry, TokenError};
use super::{policy, Provider, State, Trigger};

pub(super) type Outcome = Result<Arc<Token>, TokenError>;

/// The refresh in flight: where its outcome will be published, and the generation
/// held when it was asked for (its result is above that generation, or an error).
#[derive(Debug)]
pub(super) struct Flight {
    pub(super) outcome: watch::Receiver<Option<Outcome>>,
    pub(super) above: Option<u64>,
}

/// Ends a refresh flight whose task unwound (a panic) instead of finishing: a flight
/// left set would make every later request wait on a refresh that never comes and
/// stop the background refresher for good.
pub(super) struct FlightGuard(pub(super) Option<Arc<Provider>>);

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            {
                let mut st = p.state();
                st.flight = None;
                st.failures = st.failures.saturating_add(1);
                let delay = policy::retry_delay(
                    Retry::Transient(None),
                    st.failures,
                    policy::backoff_fraction(),
                );
                st.retry_at = delay.map(|d| Instant::now() + d);
            }
            // A runtime shutting down drops the task too: nothing to report then.
            if !p.shutdown.is_cancelled() {
                tracing::error!(provider = %p.name, "token refresh task ended abnormally");
            }
            p.wake.notify_one();
        }
    }
}

pub(super) async fn wait_outcome(
    mut rx: watch::Receiver<Option<Outcome>>,
    wait: Duration,
) -> Outcome {
    match tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await {
        Ok(Ok(v)) => v.clone().unwrap_or(Err(TokenError::Abandoned)),
        _ => Err(TokenError::Abandoned),
    }
}

impl Provider {
    /// Starts a refresh task. Called with the state lock held, so two callers can
    /// never both start one.
    pub(super) fn launch(
        self: &Arc<Self>,
        st: &mut State,
        trigger: Trigger,
    ) -> watch::Receiver<Option<Outcome>> {
        let (tx, rx) = watch::channel(None);
        let held = self.current();
        st.flight = Some(Flight {
            outcome: rx.clone(),
            above: held.as_ref().map(|t| t.generation),
        });
        st.last_start = Some(Instant::now());
        let this = self.clone();
        tokio::spawn(async move {
            let mut guard = FlightGuard(Some(this.clone()));
            let started = Instant::now();
            let outcome = this.obtain(trigger, held).await;
            this.finish(trigger, started, &outcome);
            // Clear the flight before publishing the outcome: a waiter that wakes
            // and immediately needs another refresh must be able to start one.
            this.state().flight = None;
            guard.0 = None;
            let _ = tx.send(Some(outcome));
        });
        rx
    }

    /// Asks for a refresh now (admin or CLI); returns its outcome.
    pub async fn refresh_now(
        self: &Arc<Self>,
        trigger: Trigger,
        wait: Duration,
    ) -> Result<Arc<Token>, TokenError> {
        if self.is_static() {
            return self.current().ok_or(TokenError::Abandoned);
        }
        let rx = {
            let mut st = self.state();
            match &st.flight {
                Some(f) => f.outcome.clone(),
                None => self.launch(&mut st, trigger),
            }
        };
        wait_outcome(rx, wait).await
    }
}
