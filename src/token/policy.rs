//! The refresh policy, as pure functions of durations and counts: when to refresh
//! before expiry, how far apart 401-driven refreshes must be, how long to back off
//! after a failure. Randomness comes in as a number so tests can pin it.

use std::time::Duration;

use tokio::time::Instant;

use super::oauth::Retry;
use crate::config::DEFAULT_MIN_REFRESH_INTERVAL;

/// Proactive margin when `refresh_before` is not set (halved for short lifetimes).
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(60);
/// The most 401-driven refreshes are spaced after refreshes the upstream rejected
/// too (unless `min_refresh_interval` is larger).
pub const MAX_SPACING: Duration = Duration::from_secs(600);
/// Proactive refreshes start up to this fraction of the margin earlier, so a fleet
/// does not refresh in lockstep.
pub const JITTER: f64 = 0.1;

/// A provider's refresh settings.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub refresh_before: Option<Duration>,
    pub min_refresh_interval: Duration,
}

impl Policy {
    /// How long before expiry a token of `lifetime` is refreshed: `refresh_before`
    /// (60 s by default), but never more than half the lifetime.
    pub fn margin(&self, lifetime: Duration) -> Duration {
        self.refresh_before
            .unwrap_or(DEFAULT_REFRESH_BEFORE)
            .min(lifetime / 2)
    }

    /// When the proactive refresh of a token expiring at `expires_at` is due.
    /// `jitter` in `[0, 1)` moves it earlier by up to `JITTER` of the margin.
    pub fn refresh_at(&self, expires_at: Instant, lifetime: Duration, jitter: f64) -> Instant {
        let margin = self.margin(lifetime);
        let early = margin + margin.mul_f64(jitter.clamp(0.0, 1.0) * JITTER);
        expires_at.checked_sub(early).unwrap_or(expires_at)
    }

    /// How long after the last refresh a 401 may ask for another:
    /// `min_refresh_interval`, doubled for each refresh in a row that the upstream
    /// rejected too, capped at `MAX_SPACING` (or the interval, if larger). Even with
    /// `min_refresh_interval = "0s"`, useless refreshes back off.
    pub fn spacing(&self, useless_streak: u64) -> Duration {
        let base = self.min_refresh_interval;
        if useless_streak == 0 {
            return base;
        }
        let floor = base.max(DEFAULT_MIN_REFRESH_INTERVAL);
        floor
            .saturating_mul(1 << useless_streak.min(16))
            .min(base.max(MAX_SPACING))
    }
}

/// Exponential backoff: `base`, doubling per attempt up to `cap`, scaled by
/// `fraction` (full jitter between half and all of the step: pass a number in
/// `[0.5, 1]`).
pub fn backoff(attempt: u32, base: Duration, cap: Duration, fraction: f64) -> Duration {
    let step = base
        .saturating_mul(1 << attempt.saturating_sub(1).min(20))
        .min(cap);
    step.mul_f64(fraction.clamp(0.5, 1.0))
}

/// How long to wait before the next attempt after failure number `failures` (from
/// 1) of kind `retry`; `None` when nothing needs retrying.
pub fn retry_delay(retry: Retry, failures: u32, fraction: f64) -> Option<Duration> {
    let secs = Duration::from_secs;
    match retry {
        // `retry-after` as told (429, 503); else 1 s doubling to a minute.
        Retry::Transient(Some(after)) => Some(after),
        Retry::Transient(None) => Some(backoff(failures, secs(1), secs(60), fraction)),
        // The IdP refuses our client: a person must act; ask rarely.
        Retry::Slow => Some(backoff(failures, secs(30), secs(600), fraction)),
        // Only reauthorization helps: the refresher does not retry at all; this
        // only paces requests asking in the meantime.
        Retry::Never => Some(secs(3600)),
        Retry::Unneeded => None,
    }
}

/// A random jitter fraction for `backoff` (`[0.5, 1]`).
pub fn backoff_fraction() -> f64 {
    rand::random_range(0.5..=1.0)
}

/// A random jitter for `Policy::refresh_at` (`[0, 1)`).
pub fn refresh_jitter() -> f64 {
    rand::random_range(0.0..1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(refresh_before: Option<u64>, min_interval_ms: u64) -> Policy {
        Policy {
            refresh_before: refresh_before.map(Duration::from_secs),
            min_refresh_interval: Duration::from_millis(min_interval_ms),
        }
    }

    #[test]
    fn margin_is_refresh_before_but_at_most_half_the_lifetime() {
        let p = policy(None, 100);
        assert_eq!(p.margin(Duration::from_secs(3600)), Duration::from_secs(60));
        assert_eq!(p.margin(Duration::from_secs(30)), Duration::from_secs(15));
        let p = policy(Some(300), 100);
        assert_eq!(
            p.margin(Duration::from_secs(3600)),
            Duration::from_secs(300)
        );
        assert_eq!(p.margin(Duration::from_secs(120)), Duration::from_secs(60));
    }

    #[test]
    fn proactive_refresh_falls_within_the_jittered_margin() {
        let p = policy(Some(60), 100);
        let exp = Instant::now() + Duration::from_secs(600);
        let life = Duration::from_secs(600);
        assert_eq!(p.refresh_at(exp, life, 0.0), exp - Duration::from_secs(60));
        let earliest = exp - Duration::from_secs(66);
        for jitter in [0.0, 0.25, 0.5, 0.999, 1.0, 7.0, -1.0] {
            let at = p.refresh_at(exp, life, jitter);
            assert!(
                at >= earliest && at <= exp - Duration::from_secs(60),
                "{jitter}"
            );
        }
    }

    #[test]
    fn spacing_doubles_per_useless_refresh_and_is_capped() {
        let p = policy(None, 5000);
        assert_eq!(p.spacing(0), Duration::from_secs(5));
        assert_eq!(p.spacing(1), Duration::from_secs(10));
        assert_eq!(p.spacing(2), Duration::from_secs(20));
        assert_eq!(p.spacing(30), MAX_SPACING);
        // "0s" spaces nothing, until refreshes prove useless.
        let p = policy(None, 0);
        assert_eq!(p.spacing(0), Duration::ZERO);
        assert_eq!(p.spacing(1), DEFAULT_MIN_REFRESH_INTERVAL * 2);
        // An interval above the cap is kept.
        let p = policy(None, 1_200_000);
        assert_eq!(p.spacing(5), Duration::from_secs(1200));
    }

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_between_half_and_all() {
        let (one, min) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(backoff(1, one, min, 1.0), one);
        assert_eq!(backoff(3, one, min, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(30, one, min, 1.0), min);
        assert_eq!(backoff(3, one, min, 0.5), Duration::from_secs(2));
        assert_eq!(
            backoff(3, one, min, 0.0),
            Duration::from_secs(2),
            "clamped to half"
        );
    }

    #[test]
    fn retry_after_is_honoured_as_told() {
        let after = Duration::from_secs(7);
        assert_eq!(
            retry_delay(Retry::Transient(Some(after)), 5, 1.0),
            Some(after)
        );
        assert_eq!(
            retry_delay(Retry::Transient(None), 2, 1.0),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_delay(Retry::Slow, 1, 1.0),
            Some(Duration::from_secs(30))
        );
        assert_eq!(retry_delay(Retry::Unneeded, 1, 1.0), None);
    }
}
