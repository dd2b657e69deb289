//! The reauthorizations under way, by their single-use `state`: kept in memory for
//! ten minutes, at most 64 at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

// The runtime's clock, so a test can move it.
use tokio::time::Instant;

use crate::secret::Secret;

/// How long an authorization may take in the browser.
pub(super) const STATE_LIFETIME: Duration = Duration::from_secs(600);
/// Authorizations under way at once; the oldest goes first beyond this.
const MAX_PENDING: usize = 64;
/// One authorization under way, found by its `state`.
#[derive(Debug)]
pub(super) struct Started {
    pub(super) provider: String,
    pub(super) verifier: Secret,
    pub(super) redirect_uri: String,
    pub(super) at: Instant,
}

/// The authorizations under way, by `state`. Touched twice per authorization.
#[derive(Debug, Default)]
pub(super) struct Pending(Mutex<HashMap<String, Started>>);

impl Pending {
    pub(super) fn insert(&self, state: String, started: Started) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.at.elapsed() < STATE_LIFETIME);
        while map.len() >= MAX_PENDING {
            let oldest = map.iter().min_by_key(|(_, s)| s.at).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        map.insert(state, started);
    }

    /// Takes the authorization out (a state is good once), if still valid.
    pub(super) fn take(&self, state: &str) -> Option<Started> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(state)
            .filter(|s| s.at.elapsed() < STATE_LIFETIME)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_state_is_good_once_and_for_ten_minutes() {
        let pending = Pending::default();
        let started = |at| Started {
            provider: "p".into(),
            verifier: Secret::new("v"),
            redirect_uri: "http://127.0.0.1/oauth/callback".into(),
            at,
        };
        pending.insert("s1".into(), started(Instant::now()));
        assert!(pending.take("s1").is_some());
        assert!(pending.take("s1").is_none());
        assert!(pending.take("unknown").is_none());
        pending.insert("old".into(), started(Instant::now()));
        pending.insert("young".into(), started(Instant::now()));
        tokio::time::advance(STATE_LIFETIME - Duration::from_millis(1)).await;
        assert!(pending.take("young").is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(pending.take("old").is_none());
    }
}
