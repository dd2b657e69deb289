//! The console's memory of recent token events: the last `EVENTS_KEPT` of what the
//! audit log records as `token_refresh`, fed where each event is produced. Events
//! are rare (one per token request), so a small mutex is fine here; the request
//! path never touches it.

use crate::audit::TokenEvent;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// How many token events the console keeps.
pub const EVENTS_KEPT: usize = 50;

/// A bounded ring of the newest token events, shared by every provider across
/// reloads.
#[derive(Debug, Default)]
pub struct TokenEvents {
    ring: Mutex<VecDeque<TokenEvent>>,
}

impl TokenEvents {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn push(&self, ev: TokenEvent) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == EVENTS_KEPT {
            ring.pop_front();
        }
        ring.push_back(ev);
    }

    /// The events kept, newest first.
    pub fn newest_first(&self) -> Vec<TokenEvent> {
        let mut v = self.oldest_first();
        v.reverse();
        v
    }

    /// The events kept, in the order they happened (as in the audit log).
    pub fn oldest_first(&self) -> Vec<TokenEvent> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().cloned().collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn ev(n: u64) -> TokenEvent {
        TokenEvent {
            ts: SystemTime::now(),
            event: "token_refresh",
            provider: Arc::from("p"),
            trigger: "manual",
            outcome: "ok",
            generation: Some(n),
            expires_in_s: None,
            duration_ms: 0,
            error: None,
        }
    }

    #[test]
    fn keeps_the_newest_fifty() {
        let ring = TokenEvents::default();
        for n in 1..=60 {
            ring.push(ev(n));
        }
        let kept = ring.newest_first();
        assert_eq!(kept.len(), EVENTS_KEPT);
        assert_eq!(kept.first().unwrap().generation, Some(60));
        assert_eq!(kept.last().unwrap().generation, Some(11));
    }
}
