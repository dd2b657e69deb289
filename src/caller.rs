//! Who is calling (DESIGN.md, "Callers"): the first `[callers.NAME]` whose every
//! set condition matches names the request. Conditions are checked without locks
//! or allocation; shared keys are compared in constant time.

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderValue;
use subtle::ConstantTimeEq;

use crate::config::CallerConfig;
use crate::secret::Secret;

#[derive(Debug)]
struct Caller {
    name: Arc<str>,
    addrs: Vec<ipnet::IpNet>,
    cert_names: Vec<String>,
    key: Option<Secret>,
}

/// A caller's shared key could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("callers.{name}: {source}")]
pub struct CallerError {
    pub name: String,
    #[source]
    pub source: crate::secret::SecretError,
}
/// The caller table of one config snapshot.
#[derive(Debug, Default)]
pub struct Callers {
    /// `None`: no `[callers]` section, every caller is anonymous and allowed.
    list: Option<Vec<Caller>>,
}

/// The result of identification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No `[callers]` section: everyone is allowed, nobody is named.
    Anonymous,
    Named(Arc<str>),
    /// Callers are configured and none matched.
    Unknown,
}

impl Identity {
    pub fn name(&self) -> Option<&str> {
        match self {
            Identity::Named(n) => Some(n),
            _ => None,
        }
    }
}

impl Callers {
    /// Loads the callers' keys. A missing key source is an error for the whole
    /// config (a caller that can never match is a mistake worth stopping for).
    pub fn new(cfg: Option<&[CallerConfig]>) -> Result<Self, CallerError> {
        let Some(cfg) = cfg else {
            return Ok(Self { list: None });
        };
        let mut list = Vec::with_capacity(cfg.len());
        for c in cfg {
            let key = match &c.key {
                Some(src) => Some(src.load().map_err(|source| CallerError {
                    name: c.name.clone(),
                    source,
                })?),
                None => None,
            };
            list.push(Caller {
                name: Arc::from(c.name.as_str()),
                addrs: c.addrs.clone(),
                cert_names: c.cert_names.clone(),
                key,
            });
        }
        Ok(Self { list: Some(list) })
    }

    pub fn configured(&self) -> bool {
        self.list.is_some()
    }

    pub fn identify(
        &self,
        addr: IpAddr,
        key: Option<&HeaderValue>,
        cert_names: &[String],
    ) -> Identity {
        let Some(list) = &self.list else {
            return Identity::Anonymous;
        };
        // An IPv4 caller on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let addr = match addr {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
            v4 => v4,
        };
        for c in list {
            if !c.addrs.is_empty() && !c.addrs.iter().any(|n| n.contains(&addr)) {
                continue;
            }
            if !c.cert_names.is_empty()
                && !c
                    .cert_names
                    .iter()
                    .any(|n| cert_names.iter().any(|m| m == n))
            {
                continue;
            }
            if let Some(expected) = &c.key {
                let Some(given) = key else { continue };
                if !bool::from(given.as_bytes().ct_eq(expected.expose().as_bytes())) {
                    continue;
                }
            }
            return Identity::Named(c.name.clone());
        }
        Identity::Unknown
    }
}

/// Whether `who` may use something restricted to `allow` (`None` = every
/// identified caller).
pub fn allowed(who: &Identity, allow: Option<&[Arc<str>]>) -> bool {
    match (who, allow) {
        (Identity::Unknown, _) => false,
        (_, None) => true,
        (Identity::Named(n), Some(list)) => list.iter().any(|a| a == n),
        // No [callers] section but an allow list: nobody can be named, so nobody
        // matches it; `check` rejects this combination anyway.
        (Identity::Anonymous, Some(_)) => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::secret::SecretSource;

    fn callers() -> Callers {
        std::env::set_var("CALLER_TEST_KEY", "k-123");
        Callers::new(Some(&[
            CallerConfig {
                name: "billing".into(),
                addrs: vec!["10.1.0.0/16".parse().unwrap()],
                cert_names: vec![],
                key: None,
            },
            CallerConfig {
                name: "keyed".into(),
                addrs: vec![],
                cert_names: vec![],
                key: Some(SecretSource::Env("CALLER_TEST_KEY".into())),
            },
            CallerConfig {
                name: "both".into(),
                addrs: vec!["127.0.0.1/32".parse().unwrap()],
                cert_names: vec!["svc.a".into()],
                key: None,
            },
        ]))
        .unwrap()
    }

    #[test]
    fn first_match_wins_and_conditions_combine_with_and() {
        let c = callers();
        let key: HeaderValue = "k-123".parse().unwrap();
        let wrong: HeaderValue = "k-12".parse().unwrap();
        assert_eq!(
            c.identify("10.1.2.3".parse().unwrap(), None, &[]),
            Identity::Named("billing".into())
        );
        assert_eq!(
            c.identify("10.1.2.3".parse().unwrap(), Some(&key), &[]),
            Identity::Named("billing".into())
        );
        assert_eq!(
            c.identify("192.168.1.1".parse().unwrap(), Some(&key), &[]),
            Identity::Named("keyed".into())
        );
        assert_eq!(
            c.identify("192.168.1.1".parse().unwrap(), Some(&wrong), &[]),
            Identity::Unknown
        );
        assert_eq!(
            c.identify("127.0.0.1".parse().unwrap(), None, &[]),
            Identity::Unknown
        );
        assert_eq!(
            c.identify("127.0.0.1".parse().unwrap(), None, &["svc.a".into()]),
            Identity::Named("both".into())
        );
        assert_eq!(
            c.identify("::ffff:10.1.0.9".parse().unwrap(), None, &[]),
            Identity::Named("billing".into())
        );
    }

    #[test]
    fn no_callers_section_means_anonymous() {
        let c = Callers::new(None).unwrap();
        assert_eq!(
            c.identify("8.8.8.8".parse().unwrap(), None, &[]),
            Identity::Anonymous
        );
        assert!(allowed(&Identity::Anonymous, None));
    }
}
