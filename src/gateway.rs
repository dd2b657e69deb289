//! The running gateway: one `ArcSwap<Snapshot>` holding everything that changes
//! together on reload (config, routes, clients, callers, providers), plus what
//! lives across reloads (metrics, audit, store).

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::uri::{Authority, Scheme};
use http::HeaderValue;
use indexmap::IndexMap;
use tokio_util::sync::CancellationToken;

use crate::audit::AuditSink;
use crate::caller::Callers;
use crate::config::{Config, RouteConfig, UpstreamTls};
use crate::metrics::{Metrics, RouteMetrics};
use crate::outbound::client::{self, Connector};
use crate::outbound::egress::EgressProxy;
use crate::outbound::pool::Upstream;
use crate::route::RouteTable;
use crate::token::{Provider, ProviderDeps, StoreHandle, TokenEvents};

/// Why a config could not become a running snapshot (start-up or reload): each
/// names the config file and the key, like a config error.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{file}: {source}")]
    Outbound {
        file: String,
        #[source]
        source: crate::outbound::egress::EgressConfigError,
    },
    #[error("{file}: providers.{name}: {source}")]
    Provider {
        file: String,
        name: String,
        #[source]
        source: crate::token::ProviderError,
    },
    #[error("{file}: routes[{index}].upstream: {reason}")]
    Upstream {
        file: String,
        index: usize,
        reason: &'static str,
    },
    #[error("{file}: routes[{index}]: {source}")]
    UpstreamTls {
        file: String,
        index: usize,
        #[source]
        source: crate::tls::TlsError,
    },
    #[error("{file}: {source}")]
    Callers {
        file: String,
        #[source]
        source: crate::caller::CallerError,
    },
}
/// A route ready for the request path: everything precomputed.
#[derive(Debug)]
pub struct Route {
    pub cfg: RouteConfig,
    pub name: Arc<str>,
    pub provider: Option<Arc<Provider>>,
    pub allow: Option<Vec<Arc<str>>>,
    /// The upstream's base path without trailing '/'.
    pub base_path: String,
    pub host_header: HeaderValue,
    /// Connections to the route's origin, shared with other routes to it.
    pub upstream: Upstream,
    pub metrics: RouteMetrics,
}

/// Everything one config version needs. Swapped whole on reload; requests in
/// flight keep the snapshot they started with.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub table: RouteTable,
    pub routes: Vec<Route>,
    pub providers: IndexMap<String, Arc<Provider>>,
    pub callers: Callers,
    /// Metrics of requests that matched no route (label `route=""`).
    pub unrouted: RouteMetrics,
    /// When this config version was swapped in.
    pub loaded_at: std::time::SystemTime,
}

#[derive(Debug)]
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    pub audit: Option<AuditSink>,
    pub store: Arc<StoreHandle>,
    pub shutdown: CancellationToken,
    /// The last token events, for the admin console.
    pub events: Arc<TokenEvents>,
}

impl Gateway {
    /// Builds the first snapshot and starts the providers' refreshers. The store
    /// and audit sink are opened by the caller (they outlive reloads).
    pub fn new(
        config: Config,
        store: Arc<StoreHandle>,
        audit: Option<AuditSink>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, BuildError> {
        let events = TokenEvents::new();
        let snapshot = build_snapshot(
            Arc::new(config),
            None,
            &store,
            audit.as_ref(),
            &metrics,
            &shutdown,
            &events,
        )?;
        for p in snapshot.providers.values() {
            p.start();
        }
        let gw = Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            audit,
            store,
            shutdown,
            events,
        });
        gw.watch_store();
        Ok(gw)
    }

    /// The current snapshot; a request holds it until it finishes.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Swaps in a new config. Providers whose settings did not change are kept
    /// (with their tokens and generations); new or changed ones start fresh.
    pub fn reload(&self, config: Config) -> Result<(), BuildError> {
        let prev = self.snapshot();
        let new = build_snapshot(
            Arc::new(config),
            Some(&prev),
            &self.store,
            self.audit.as_ref(),
            &self.metrics,
            &self.shutdown,
            &self.events,
        )?;
        for (name, p) in &new.providers {
            let kept = prev.providers.get(name).is_some_and(|o| Arc::ptr_eq(o, p));
            if !kept {
                p.start();
            }
        }
        let old = self.snapshot.swap(Arc::new(new));
        let current = self.snapshot();
        for (name, p) in &old.providers {
            if !current
                .providers
                .get(name)
                .is_some_and(|n| Arc::ptr_eq(n, p))
            {
                p.retire();
            }
        }
        Ok(())
    }

    /// Fleet mode: adopt tokens other replicas stored.
    fn watch_store(self: &Arc<Self>) {
        let Some(mut rx) = self.store.store.subscribe() else {
            return;
        };
        let gw = Arc::downgrade(self);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    r = rx.recv() => r,
                    _ = shutdown.cancelled() => return,
                };
                let Some(gw) = gw.upgrade() else { return };
                match name {
                    Ok(name) => {
                        if let Some(p) = gw.snapshot().providers.get(&name) {
                            p.on_store_change().await;
                        }
                    }
                    // Missed notifications: re-check every provider.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        for p in gw.snapshot().providers.values() {
                            p.on_store_change().await;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
}

fn build_snapshot(
    config: Arc<Config>,
    old: Option<&Snapshot>,
    store: &Arc<StoreHandle>,
    audit: Option<&AuditSink>,
    metrics: &Arc<Metrics>,
    shutdown: &CancellationToken,
    events: &Arc<TokenEvents>,
) -> Result<Snapshot, BuildError> {
    let file = || config.path.display().to_string();
    let proxy = EgressProxy::from_config(&config.outbound)
        .map_err(|source| BuildError::Outbound {
            file: file(),
            source,
        })?
        .counting_failures(metrics.proxy_auth_failures());
    // A provider is kept only if neither its settings nor the egress proxy its
    // token endpoint is reached through changed.
    let outbound_same = old.is_some_and(|o| o.config.outbound == config.outbound);
    let mut providers = IndexMap::new();
    for (name, pcfg) in &config.providers {
        let reused = old
            .filter(|_| outbound_same)
            .and_then(|o| o.providers.get(name))
            .filter(|p| p.cfg == *pcfg)
            .cloned();
        let provider = match reused {
            Some(p) => p,
            None => Provider::new(
                pcfg.clone(),
                ProviderDeps {
                    store: store.clone(),
                    metrics: metrics.provider(name),
                    audit: audit.cloned(),
                    shutdown: shutdown.child_token(),
                    proxy: proxy.clone(),
                    events: events.clone(),
                },
            )
            .map_err(|source| BuildError::Provider {
                file: file(),
                name: name.clone(),
                source,
            })?,
        };
        providers.insert(name.clone(), provider);
    }

    // One connector per TLS setting, one pool per origin: routes to the same
    // origin share their connections.
    let mut connectors: HashMap<(UpstreamTls, bool), Connector> = HashMap::new();
    let mut upstreams: HashMap<(UpstreamTls, Scheme, Authority), Upstream> = HashMap::new();
    let mut routes = Vec::with_capacity(config.routes.len());
    for (i, rc) in config.routes.iter().enumerate() {
        let scheme = rc.upstream.scheme().cloned().unwrap_or(Scheme::HTTPS);
        let authority = rc
            .upstream
            .authority()
            .cloned()
            .ok_or_else(|| BuildError::Upstream {
                file: file(),
                index: i,
                reason: "no host",
            })?;
        let host_header =
            HeaderValue::from_str(authority.as_str()).map_err(|_| BuildError::Upstream {
                file: file(),
                index: i,
                reason: "bad host",
            })?;
        let https = scheme == Scheme::HTTPS;
        let connector = match connectors.get(&(rc.tls.clone(), https)) {
            Some(c) => c.clone(),
            None => {
                let cert = match (&rc.tls.client_cert, &rc.tls.client_key) {
                    (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                    _ => None,
                };
                let c = client::connector(rc.tls.ca.as_deref(), cert, https, &proxy).map_err(
                    |source| BuildError::UpstreamTls {
                        file: file(),
                        index: i,
                        source,
                    },
                )?;
                connectors.insert((rc.tls.clone(), https), c.clone());
                c
            }
        };
        let upstream = upstreams
            .entry((rc.tls.clone(), scheme.clone(), authority.clone()))
            .or_insert_with(|| {
                Upstream::new(connector, scheme, authority)
                    .counting_proxy_auth_failures(metrics.proxy_auth_failures())
            })
            .clone();
        routes.push(Route {
            name: Arc::from(rc.name.as_str()),
            provider: rc.provider.as_ref().and_then(|p| providers.get(p).cloned()),
            allow: rc
                .allow
                .as_ref()
                .map(|a| a.iter().map(|s| Arc::from(s.as_str())).collect()),
            base_path: rc.upstream.path().trim_end_matches('/').to_owned(),
            host_header,
            upstream,
            metrics: metrics.route(&rc.name),
            cfg: rc.clone(),
        });
    }
    let table = RouteTable::new(config.routes.iter().map(|r| r.prefix.as_str()));
    let callers =
        Callers::new(config.callers.as_deref()).map_err(|source| BuildError::Callers {
            file: file(),
            source,
        })?;
    Ok(Snapshot {
        unrouted: metrics.unrouted(),
        config,
        table,
        routes,
        providers,
        callers,
        loaded_at: std::time::SystemTime::now(),
    })
}
