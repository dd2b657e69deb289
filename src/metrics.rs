//! Prometheus metrics (DESIGN.md, "Admin listener"). Everything the request path
//! touches is a pre-resolved handle over atomics: label lookups (which take the
//! family's lock) happen when a route or provider is built, or once per new status
//! code, never per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabel {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Refresh {
    provider: String,
    trigger: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Replay {
    route: String,
    outcome: String,
}

/// Upper bounds (seconds) of the request-duration buckets: 1 ms to 30 s.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A histogram over atomics (prometheus-client's own takes a mutex per observation).
#[derive(Clone, Debug, Default)]
pub struct AtomicHistogram(Arc<HistInner>);

#[derive(Debug, Default)]
struct HistInner {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds, so it fits an integer atomic.
    sum_micros: AtomicU64,
}

impl AtomicHistogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.0.count.fetch_add(1, Ordering::Relaxed);
        self.0
            .sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

impl AtomicHistogram {
    /// The `q` quantile, interpolated within its bucket the way Prometheus'
    /// `histogram_quantile` does; `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<Quantile> {
        let count = self.0.count.load(Ordering::Relaxed);
        if count == 0 {
            return None;
        }
        let rank = q * count as f64;
        let mut below = 0u64;
        let mut lower = 0.0;
        for (i, upper) in BUCKETS.iter().enumerate() {
            let n = self.0.buckets[i].load(Ordering::Relaxed);
            if n > 0 && (below + n) as f64 >= rank {
                let into = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                let secs = lower + (upper - lower) * into;
                return Some(Quantile::Within(Duration::from_secs_f64(secs)));
            }
            below += n;
            lower = *upper;
        }
        Some(Quantile::Above(Duration::from_secs_f64(lower)))
    }
}

/// A quantile read from histogram buckets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quantile {
    Within(Duration),
    /// Above the last bucket's bound (this one).
    Above(Duration),
}

/// One route's traffic, as the console shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RouteSummary {
    pub requests: u64,
    pub client_errors: u64,
    pub server_errors: u64,
    /// Requests replayed after a 401 (whatever the replay's answer).
    pub replays: u64,
    pub p99: Option<Quantile>,
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // The encoder accumulates, so it takes per-bucket counts; the +Inf bucket
        // holds what fell above the last bound. Count is read first and the
        // overflow saturates, so a racing observation never makes it negative.
        let count = self.0.count.load(Ordering::Relaxed);
        let mut within = 0;
        let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
        for (i, upper) in BUCKETS.iter().enumerate() {
            let n = self.0.buckets[i].load(Ordering::Relaxed);
            within += n;
            buckets.push((*upper, n));
        }
        buckets.push((f64::INFINITY, count.saturating_sub(within)));
        let sum = self.0.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Clone, Debug, Default)]
struct NewHistogram;

impl MetricConstructor<AtomicHistogram> for NewHistogram {
    fn new_metric(&self) -> AtomicHistogram {
        AtomicHistogram::default()
    }
}

/// The gateway's metrics registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    durations: Family<RouteLabel, AtomicHistogram, NewHistogram>,
    refreshes: Family<Refresh, Counter>,
    waiters: Family<ProviderLabel, Counter>,
    replays: Family<Replay, Counter>,
    expiry: Family<ProviderLabel, Gauge<f64, AtomicU64>>,
    store_errors: Counter,
    audit_dropped: Counter,
    reloads: Family<OutcomeLabel, Counter>,
    proxy_auth_failures: Counter,
    /// Each route's resolved status counters, kept across reloads so the
    /// console's sums count every status the route ever answered.
    route_statuses: std::sync::Mutex<std::collections::HashMap<String, Arc<StatusCounters>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let requests = Family::<RouteStatus, Counter>::default();
        let durations = Family::new_with_constructor(NewHistogram);
        let refreshes = Family::<Refresh, Counter>::default();
        let waiters = Family::<ProviderLabel, Counter>::default();
        let replays = Family::<Replay, Counter>::default();
        let expiry = Family::<ProviderLabel, Gauge<f64, AtomicU64>>::default();
        let store_errors = Counter::default();
        let audit_dropped = Counter::default();
        let reloads = Family::<OutcomeLabel, Counter>::default();
        let proxy_auth_failures = Counter::default();
        for outcome in ["ok", "error"] {
            let _ = reloads.get_or_create_owned(&OutcomeLabel {
                outcome: outcome.to_owned(),
            });
        }
        // Names without the `_total` suffix: the encoder appends it to counters.
        registry.register(
            "authgate_requests",
            "Requests answered, by route and status",
            requests.clone(),
        );
        registry.register(
            "authgate_request_duration_seconds",
            "Time to the response head, by route",
            durations.clone(),
        );
        registry.register(
            "authgate_token_refreshes",
            "Token requests to the IdP, by provider, trigger and outcome",
            refreshes.clone(),
        );
        registry.register(
            "authgate_refresh_waiters",
            "Requests that waited on a refresh already in flight",
            waiters.clone(),
        );
        registry.register(
            "authgate_replays",
            "Requests replayed after a 401, by outcome",
            replays.clone(),
        );
        registry.register(
            "authgate_token_expiry_seconds",
            "Seconds until the current token expires (-1: no expiry known)",
            expiry.clone(),
        );
        registry.register(
            "authgate_store_errors",
            "Failed store reads and writes",
            store_errors.clone(),
        );
        registry.register(
            "authgate_audit_dropped",
            "Audit lines lost: the writer's queue was full, or the file could not be written",
            audit_dropped.clone(),
        );
        registry.register(
            "authgate_config_reloads",
            "Config reloads, by outcome",
            reloads.clone(),
        );
        registry.register(
            "authgate_proxy_auth_failures",
            "Connections the egress proxy refused for want of authentication",
            proxy_auth_failures.clone(),
        );
        Arc::new(Self {
            registry,
            requests,
            durations,
            refreshes,
            waiters,
            replays,
            expiry,
            store_errors,
            audit_dropped,
            reloads,
            proxy_auth_failures,
            route_statuses: Default::default(),
        })
    }

    /// The egress proxy's authentication failures, shared by every connector.
    pub fn proxy_auth_failures(&self) -> Counter {
        self.proxy_auth_failures.clone()
    }

    /// Handles for one route; the series exist (at 0) from now on.
    pub fn route(self: &Arc<Self>, name: &str) -> RouteMetrics {
        self.route_handles(name, true)
    }

    /// Handles for requests that matched no route (`route=""`): they are never
    /// replayed, so no replay series is exported for them.
    pub fn unrouted(self: &Arc<Self>) -> RouteMetrics {
        self.route_handles("", false)
    }

    fn route_handles(self: &Arc<Self>, name: &str, replays: bool) -> RouteMetrics {
        let duration = self.durations.get_or_create_owned(&RouteLabel {
            route: name.to_owned(),
        });
        let replay = |outcome: &str| {
            if !replays {
                // Unregistered: counts nothing anyone can see, costs nothing.
                return Counter::default();
            }
            self.replays.get_or_create_owned(&Replay {
                route: name.to_owned(),
                outcome: outcome.to_owned(),
            })
        };
        // DESIGN.md: counters exist (at 0) from start-up, so a route shows its
        // `status="200"` series before its first request.
        let by_status = self
            .route_statuses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(std::array::from_fn(|_| OnceLock::new())))
            .clone();
        let _ = by_status[200 - 100].set(self.requests.get_or_create_owned(&RouteStatus {
            route: name.to_owned(),
            status: "200".to_owned(),
        }));
        RouteMetrics(Arc::new(RouteInner {
            name: name.to_owned(),
            metrics: self.clone(),
            by_status,
            duration,
            replay_ok: replay("ok"),
            replay_unauthorized: replay("unauthorized"),
            replay_skipped: replay("skipped"),
        }))
    }

    /// Handles for one provider; the series exist (at 0) from now on.
    pub fn provider(self: &Arc<Self>, name: &str) -> ProviderMetrics {
        for trigger in [
            "startup",
            "expiry",
            "unauthorized",
            "manual",
            "authorization",
        ] {
            for outcome in ["ok", "error"] {
                self.refreshes.get_or_create_owned(&Refresh {
                    provider: name.to_owned(),
                    trigger: trigger.to_owned(),
                    outcome: outcome.to_owned(),
                });
            }
        }
        let label = ProviderLabel {
            provider: name.to_owned(),
        };
        ProviderMetrics {
            name: name.to_owned(),
            metrics: self.clone(),
            waiters: self.waiters.get_or_create_owned(&label),
            expiry: self.expiry.get_or_create_owned(&label),
        }
    }

    pub fn store_error(&self) {
        self.store_errors.inc();
    }

    pub fn audit_dropped(&self, n: u64) {
        self.audit_dropped.inc_by(n);
    }

    pub fn reload(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.reloads
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// A route's request counters by status 100..=599, each resolved on first use.
type StatusCounters = [OnceLock<Counter>; 500];

/// Per-route handles, cheap to clone.
#[derive(Clone, Debug)]
pub struct RouteMetrics(Arc<RouteInner>);

#[derive(Debug)]
struct RouteInner {
    name: String,
    metrics: Arc<Metrics>,
    /// Status 100..=599, each resolved once.
    by_status: Arc<StatusCounters>,
    duration: AtomicHistogram,
    replay_ok: Counter,
    replay_unauthorized: Counter,
    replay_skipped: Counter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// Replayed and the upstream accepted the new token.
    Ok,
    /// Replayed and got 401 again.
    Unauthorized,
    /// A 401 that could not be replayed (body too large, replay = false, no new token).
    Skipped,
}

impl RouteMetrics {
    pub fn observe(&self, status: u16, elapsed: Duration) {
        let inner = &self.0;
        let idx = usize::from(status.clamp(100, 599) - 100);
        inner.by_status[idx]
            .get_or_init(|| {
                inner.metrics.requests.get_or_create_owned(&RouteStatus {
                    route: inner.name.clone(),
                    status: status.to_string(),
                })
            })
            .inc();
        inner.duration.observe(elapsed);
    }

    /// What the console shows of the route: read from the same atomics `/metrics`
    /// exports, at page time.
    pub fn summary(&self) -> RouteSummary {
        let inner = &self.0;
        let mut sum = RouteSummary::default();
        for (i, c) in inner.by_status.iter().enumerate() {
            let Some(n) = c.get().map(Counter::get) else {
                continue;
            };
            sum.requests += n;
            match i + 100 {
                400..=499 => sum.client_errors += n,
                500..=599 => sum.server_errors += n,
                _ => {}
            }
        }
        sum.replays = inner.replay_ok.get() + inner.replay_unauthorized.get();
        sum.p99 = inner.duration.quantile(0.99);
        sum
    }

    pub fn replay(&self, outcome: ReplayOutcome) {
        match outcome {
            ReplayOutcome::Ok => self.0.replay_ok.inc(),
            ReplayOutcome::Unauthorized => self.0.replay_unauthorized.inc(),
            ReplayOutcome::Skipped => self.0.replay_skipped.inc(),
        };
    }
}

/// Per-provider handles.
#[derive(Clone, Debug)]
pub struct ProviderMetrics {
    name: String,
    metrics: Arc<Metrics>,
    waiters: Counter,
    expiry: Gauge<f64, AtomicU64>,
}

impl ProviderMetrics {
    pub fn refresh(&self, trigger: &str, outcome: &str) {
        self.metrics
            .refreshes
            .get_or_create(&Refresh {
                provider: self.name.clone(),
                trigger: trigger.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn waiter(&self) {
        self.waiters.inc();
    }

    /// `authgate_refresh_waiters_total` of this provider, for the console.
    pub fn waiters_total(&self) -> u64 {
        self.waiters.get()
    }

    pub fn set_expiry(&self, secs: Option<f64>) {
        self.expiry.set(secs.unwrap_or(-1.0));
    }

    pub fn proxy_auth_failure(&self) {
        self.metrics.proxy_auth_failures.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_summary_counts_statuses_replays_and_p99() {
        let metrics = Metrics::new();
        let route = metrics.route("r");
        for _ in 0..98 {
            route.observe(200, Duration::from_micros(500));
        }
        route.observe(404, Duration::from_millis(3));
        route.observe(503, Duration::from_secs(60));
        route.replay(ReplayOutcome::Ok);
        route.replay(ReplayOutcome::Skipped);
        let s = route.summary();
        assert_eq!(
            (s.requests, s.client_errors, s.server_errors, s.replays),
            (100, 1, 1, 1)
        );
        // The 99th of 100 falls in the (2.5 ms, 5 ms] bucket.
        match s.p99 {
            Some(Quantile::Within(d)) => {
                assert!(
                    d > Duration::from_micros(2500) && d <= Duration::from_millis(5),
                    "{d:?}"
                )
            }
            other => panic!("{other:?}"),
        }
        // A reload builds new handles; the counts carry over.
        assert_eq!(metrics.route("r").summary().requests, 100);
        assert_eq!(Metrics::new().route("r").summary().p99, None);
    }
}
