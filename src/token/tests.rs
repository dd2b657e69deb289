//! The token core driven alone: a provider whose tokens come from a fake source,
//! on a paused Tokio clock (time moves only when every task waits, or when a test
//! advances it), so single flight, the generation fence, spacing, backoff and the
//! proactive schedule are checked to the millisecond without HTTP or wall-clock
//! margins.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::oauth::{GrantRequest, TokenError, TokenResponse};
use super::source::{SourceFuture, TokenSource};
use super::{Provider, ProviderDeps, StoreHandle, TokenEvents, Trigger};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::store::memory::MemoryStore;

/// Answers token requests after `delay` with `tok-<n>` of `lifetime`, or with the
/// next queued error.
#[derive(Debug)]
pub(super) struct FakeSource {
    requests: AtomicU64,
    delay: Duration,
    lifetime: Option<Duration>,
    errors: Mutex<VecDeque<TokenError>>,
}

impl FakeSource {
    pub(super) fn new(delay: Duration, lifetime: Option<Duration>) -> Arc<Self> {
        Arc::new(FakeSource {
            requests: AtomicU64::new(0),
            delay,
            lifetime,
            errors: Mutex::new(VecDeque::new()),
        })
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    fn fail_next(&self, e: TokenError) {
        self.errors.lock().unwrap().push_back(e);
    }
}

impl TokenSource for FakeSource {
    fn request<'a>(&'a self, _grant: GrantRequest<'a>) -> SourceFuture<'a> {
        Box::pin(async move {
            let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(self.delay).await;
            if let Some(e) = self.errors.lock().unwrap().pop_front() {
                return Err(e);
            }
            Ok(TokenResponse {
                access_token: Secret::new(format!("tok-{n}")),
                refresh_token: None,
                token_type: "Bearer".into(),
                expires_in: self.lifetime,
                scope: None,
            })
        })
    }
}

/// A started client-credentials provider over `source`; `extra` adds provider keys.
fn provider(source: &Arc<FakeSource>, extra: &str) -> Arc<Provider> {
    let p = unstarted_provider(source, extra);
    p.start();
    p
}

/// The same provider before its refresher starts: no token until a test puts one.
pub(super) fn unstarted_provider(source: &Arc<FakeSource>, extra: &str) -> Arc<Provider> {
    let text = format!(
        "[listen]\naddr = \"127.0.0.1:0\"\n[providers.p]\ngrant = \"client_credentials\"\n\
         token_url = \"http://127.0.0.1:1/token\"\nclient_id = \"c\"\nclient_auth = \"none\"\n{extra}\n"
    );
    let config = Config::parse(std::path::Path::new("proxy.toml"), &text).unwrap();
    let metrics = Metrics::new();
    Provider::with_source(
        config.providers["p"].clone(),
        ProviderDeps {
            store: StoreHandle::new(Arc::new(MemoryStore::new()), metrics.clone()),
            metrics: metrics.provider("p"),
            audit: None,
            shutdown: tokio_util::sync::CancellationToken::new(),
            proxy: crate::outbound::egress::EgressProxy::direct(),
            events: TokenEvents::new(),
        },
        Some(source.clone() as Arc<dyn TokenSource>),
    )
    .unwrap()
}

const WAIT: Duration = Duration::from_secs(30);

/// Lets every task run until all wait on timers (the paused clock does not move).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

async fn generation(p: &Arc<Provider>) -> u64 {
    p.credential(Instant::now(), WAIT).await.unwrap().generation
}

#[tokio::test(start_paused = true)]
async fn concurrent_waiters_share_one_fetch() {
    let source = FakeSource::new(Duration::from_millis(500), Some(Duration::from_secs(3600)));
    let p = provider(&source, "");
    let waiters: Vec<_> = (0..100)
        .map(|_| {
            let p = p.clone();
            tokio::spawn(async move {
                p.credential(Instant::now(), WAIT)
                    .await
                    .map(|c| c.generation)
            })
        })
        .collect();
    for w in waiters {
        assert_eq!(w.await.unwrap().unwrap(), 1);
    }
    assert_eq!(source.requests(), 1);

    // After a 401 on the current generation, concurrent waiters share one refresh.
    let waiters: Vec<_> = (0..100)
        .map(|_| {
            let p = p.clone();
            tokio::spawn(async move { p.after_unauthorized(1, WAIT).await.map(|c| c.generation) })
        })
        .collect();
    for w in waiters {
        assert_eq!(w.await.unwrap(), Some(2));
    }
    assert_eq!(source.requests(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_401_on_an_older_generation_replays_without_a_fetch() {
    let source = FakeSource::new(Duration::ZERO, Some(Duration::from_secs(3600)));
    let p = provider(&source, "");
    assert_eq!(generation(&p).await, 1);
    p.refresh_now(Trigger::Manual, WAIT).await.unwrap();
    assert_eq!(source.requests(), 2);
    let fresh = p.after_unauthorized(1, WAIT).await.unwrap();
    assert_eq!(fresh.generation, 2);
    assert_eq!(source.requests(), 2, "the newer token, no fetch");
}

#[tokio::test(start_paused = true)]
async fn spacing_holds_401_refreshes_and_doubles_after_useless_ones() {
    let source = FakeSource::new(Duration::ZERO, Some(Duration::from_secs(3600)));
    let p = provider(&source, "min_refresh_interval = \"5s\"");
    assert_eq!(generation(&p).await, 1);
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(p.after_unauthorized(1, WAIT).await.unwrap().generation, 2);
    // Within 5 s of that refresh: no refresh, no replay.
    tokio::time::advance(Duration::from_millis(4999)).await;
    assert!(p.after_unauthorized(2, WAIT).await.is_none());
    assert_eq!(source.requests(), 2);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(p.after_unauthorized(2, WAIT).await.unwrap().generation, 3);

    // The replay with generation 3 was rejected too: the next refresh waits 10 s.
    p.replay_rejected(3);
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(p.after_unauthorized(3, WAIT).await.is_none());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(p.after_unauthorized(3, WAIT).await.unwrap().generation, 4);
    // An accepted token brings the spacing back to 5 s.
    p.token_accepted();
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(p.after_unauthorized(4, WAIT).await.unwrap().generation, 5);
    assert_eq!(source.requests(), 5);
}

#[tokio::test(start_paused = true)]
async fn backoff_honours_retry_after_and_fails_fast_meanwhile() {
    let source = FakeSource::new(Duration::ZERO, Some(Duration::from_secs(3600)));
    source.fail_next(TokenError::Http {
        status: 503,
        retry_after: Some(Duration::from_secs(7)),
    });
    let p = provider(&source, "");
    let started = Instant::now();
    // The first fetch fails: its waiter gets the error, later requests fail fast.
    assert!(p.credential(started, WAIT).await.is_err());
    let refused = p.credential(Instant::now(), WAIT).await.unwrap_err();
    assert_eq!(refused.retry_after, Duration::from_secs(7));
    assert_eq!(source.requests(), 1);
    assert_eq!(p.status().retry_in_s, Some(7));
    // The refresher asks again when told, not before.
    tokio::time::advance(Duration::from_millis(6999)).await;
    settle().await;
    assert_eq!(source.requests(), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(source.requests(), 2);
    assert_eq!(generation(&p).await, 1);
    assert_eq!(started.elapsed(), Duration::from_secs(7));
}

#[tokio::test(start_paused = true)]
async fn proactive_refresh_comes_within_the_jittered_margin() {
    let source = FakeSource::new(Duration::ZERO, Some(Duration::from_secs(600)));
    let p = provider(&source, "refresh_before = \"60s\"");
    assert_eq!(generation(&p).await, 1);
    // Due between 66 s (60 s plus up to 10 % jitter) and 60 s before expiry.
    tokio::time::advance(Duration::from_secs(600 - 66) - Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(source.requests(), 1, "refreshed before the jittered margin");
    tokio::time::advance(Duration::from_secs(6) + Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(source.requests(), 2, "not refreshed by the margin");
    // Requests never waited for it: the old token served until the new one landed.
    assert_eq!(generation(&p).await, 2);
}

#[tokio::test(start_paused = true)]
async fn an_expired_token_fails_fast_while_the_idp_fails() {
    let source = FakeSource::new(Duration::ZERO, Some(Duration::from_secs(10)));
    let p = provider(&source, "refresh_before = \"1s\"");
    assert_eq!(generation(&p).await, 1);
    for _ in 0..10 {
        source.fail_next(TokenError::Transport("connection refused".into()));
    }
    // The proactive refresh at 9 s fails; the token serves until it expires at 10 s.
    tokio::time::advance(Duration::from_millis(9500)).await;
    settle().await;
    assert_eq!(source.requests(), 2);
    assert_eq!(generation(&p).await, 1);
    tokio::time::advance(Duration::from_millis(500)).await;
    // Expired, the IdP failing: 1,000 requests fail at once, and ask nobody.
    let before = source.requests();
    for _ in 0..1000 {
        assert!(p.credential(Instant::now(), WAIT).await.is_err());
    }
    assert!(
        source.requests() <= before + 1,
        "at most one token request in flight"
    );
    assert!(!p.is_ready());
}
