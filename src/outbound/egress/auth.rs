//! Answering the egress proxy's `407`: which scheme (`[outbound] proxy_auth`),
//! as whom, and the tokens of each round. Negotiate and NTLM authenticate the
//! connection, so a session lives exactly as long as one CONNECT handshake.

use base64::Engine;
use http::HeaderValue;

use super::ntlm::{self, NtlmAccount};
use super::scheme::{ProxyAuthError, Scheme};
use super::spnego;
use crate::config::ProxyAuthMode;
use crate::secret::Secret;

/// Negotiate and NTLM as the process's own logon, through Windows SSPI.
const SSPI: bool = cfg!(windows);

/// The resolved `[outbound]` authentication settings.
#[derive(Clone)]
pub(super) struct ProxyAuth {
    mode: ProxyAuthMode,
    /// `proxy_username` + `proxy_password_*`: NTLM (raw or in SPNEGO) and Basic.
    account: Option<NtlmAccount>,
    basic: Option<HeaderValue>,
}

impl std::fmt::Debug for ProxyAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyAuth")
            .field("mode", &self.mode)
            .field("account", &self.account)
            .field("basic", &self.basic.as_ref().map(|_| "***"))
            .finish()
    }
}

impl Default for ProxyAuth {
    fn default() -> Self {
        Self {
            mode: ProxyAuthMode::Auto,
            account: None,
            basic: None,
        }
    }
}

/// Why `[outbound]`'s proxy credentials cannot be used (start-up or reload).
#[derive(Debug, thiserror::Error)]
pub enum EgressConfigError {
    #[error("outbound.proxy_password: {0}")]
    Password(#[source] crate::secret::SecretError),
    #[error("outbound.proxy_username: not a valid header value")]
    Username,
}

impl ProxyAuth {
    pub(super) fn new(
        mode: ProxyAuthMode,
        username: Option<&str>,
        password: Option<Secret>,
    ) -> Result<Self, EgressConfigError> {
        let Some(user) = username else {
            return Ok(Self {
                mode,
                account: None,
                basic: None,
            });
        };
        let password = password.unwrap_or_else(|| Secret::new(""));
        Ok(Self {
            mode,
            basic: Some(basic_header(user, &password)?),
            account: Some(NtlmAccount::new(user, password)),
        })
    }

    /// Whether this can answer a 407 at all: then plain-http destinations are
    /// tunnelled too, so that authentication stays with the connection.
    pub(super) fn can_authenticate(&self) -> bool {
        [Scheme::Negotiate, Scheme::Ntlm, Scheme::Basic]
            .into_iter()
            .any(|s| self.usable(s))
    }

    /// What goes on the first CONNECT, before any 407: only Basic chosen
    /// explicitly, or credentials written into the proxy URL (the only scheme
    /// they can be for). `auto` never sends a password the proxy did not ask for.
    pub(super) fn preemptive(&self, url_basic: Option<&HeaderValue>) -> Option<HeaderValue> {
        match self.mode {
            ProxyAuthMode::Basic => self.basic.clone().or_else(|| url_basic.cloned()),
            ProxyAuthMode::Auto if self.account.is_none() => url_basic.cloned(),
            _ => None,
        }
    }

    fn usable(&self, scheme: Scheme) -> bool {
        let allowed = match self.mode {
            ProxyAuthMode::Auto => true,
            ProxyAuthMode::Negotiate => scheme == Scheme::Negotiate,
            ProxyAuthMode::Ntlm => scheme == Scheme::Ntlm,
            ProxyAuthMode::Basic => scheme == Scheme::Basic,
            ProxyAuthMode::None => false,
        };
        allowed
            && match scheme {
                Scheme::Basic => self.basic.is_some(),
                Scheme::Negotiate | Scheme::Ntlm => self.account.is_some() || SSPI,
            }
    }

    /// The strongest offered scheme that can be used. Without SSPI, Negotiate is
    /// NTLM in an envelope, and a Kerberos-only Negotiate would refuse it: when
    /// the proxy offers NTLM as well, NTLM is the better bet.
    pub(super) fn choose(&self, offered: &[Challenge]) -> Result<Scheme, ProxyAuthError> {
        let has = |s: Scheme| offered.iter().any(|c| c.scheme == Some(s)) && self.usable(s);
        let order: &[Scheme] = if self.account.is_none() && SSPI {
            &[Scheme::Negotiate, Scheme::Ntlm, Scheme::Basic]
        } else {
            &[Scheme::Ntlm, Scheme::Negotiate, Scheme::Basic]
        };
        order
            .iter()
            .copied()
            .find(|s| has(*s))
            .ok_or_else(|| ProxyAuthError::NoUsableScheme {
                offered: describe(offered),
                mode: self.mode.as_str(),
                hint: if self.account.is_none() && !SSPI && self.mode != ProxyAuthMode::None {
                    " (set proxy_username and proxy_password_env or proxy_password_file)"
                } else {
                    ""
                },
            })
    }

    /// A session for `scheme` with the proxy at `proxy_host`.
    pub(super) fn start(
        &self,
        scheme: Scheme,
        proxy_host: &str,
    ) -> Result<Session, ProxyAuthError> {
        let _ = proxy_host;
        match (scheme, &self.account, &self.basic) {
            (Scheme::Basic, _, Some(h)) => Ok(Session::Basic(h.clone())),
            (Scheme::Negotiate | Scheme::Ntlm, Some(account), _) => Ok(Session::Ntlm {
                account: account.clone(),
                spnego: scheme == Scheme::Negotiate,
                answered: false,
            }),
            #[cfg(windows)]
            (Scheme::Negotiate | Scheme::Ntlm, None, _) => {
                super::sspi::Context::new(scheme, proxy_host).map(Session::Sspi)
            }
            _ => Err(ProxyAuthError::Protocol(format!(
                "{scheme} is not configured"
            ))),
        }
    }
}

fn basic_header(user: &str, password: &Secret) -> Result<HeaderValue, EgressConfigError> {
    let raw = zeroize::Zeroizing::new(format!("{user}:{}", password.expose()));
    let encoded = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*raw));
    let mut v = HeaderValue::from_str(&format!("Basic {}", &*encoded))
        .map_err(|_| EgressConfigError::Username)?;
    v.set_sensitive(true);
    Ok(v)
}

/// One challenge of a `Proxy-Authenticate` field: its scheme (when authgate
/// knows it) and its token, if it carries one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Challenge {
    pub scheme: Option<Scheme>,
    /// The scheme as the proxy wrote it, for messages (token characters only).
    pub name: String,
    pub token: Option<String>,
}

/// The challenges of all `Proxy-Authenticate` fields. Parameters (`realm=…`)
/// are skipped; commas inside quoted strings do not split.
pub(super) fn parse_challenges<'a>(fields: impl IntoIterator<Item = &'a str>) -> Vec<Challenge> {
    let mut out = Vec::new();
    for field in fields {
        for piece in split_unquoted(field) {
            let piece = piece.trim();
            let (first, rest) = piece.split_once(' ').unwrap_or((piece, ""));
            if first.is_empty() || first.contains('=') || first.starts_with('"') {
                continue; // a parameter of the previous challenge
            }
            let rest = rest.trim();
            // A token68 (NTLM/Negotiate tokens) rather than a parameter list.
            let token = (!rest.is_empty() && !rest.trim_end_matches('=').contains('='))
                .then(|| rest.to_owned());
            out.push(Challenge {
                scheme: Scheme::parse(first),
                name: first
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                    .take(32)
                    .collect(),
                token,
            });
            if out.len() >= 16 {
                return out;
            }
        }
    }
    out
}

fn split_unquoted(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A `407` answered to a request sent in absolute form: authgate sends plain
/// http that way only when it has no way to authenticate.
pub fn unanswered(headers: &http::HeaderMap) -> ProxyAuthError {
    let fields = headers
        .get_all(http::header::PROXY_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    ProxyAuthError::Unanswered {
        offered: describe(&parse_challenges(fields)),
    }
}

fn describe(offered: &[Challenge]) -> String {
    if offered.is_empty() {
        return "no scheme at all".to_owned();
    }
    let names: Vec<&str> = offered.iter().map(|c| c.name.as_str()).collect();
    names.join(", ")
}

/// One handshake's state.
pub(super) enum Session {
    Basic(HeaderValue),
    Ntlm {
        account: NtlmAccount,
        /// Inside SPNEGO, for a proxy that asked for `Negotiate`.
        spnego: bool,
        answered: bool,
    },
    #[cfg(windows)]
    Sspi(super::sspi::Context),
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({})", self.scheme())
    }
}

impl Session {
    pub(super) fn scheme(&self) -> Scheme {
        match self {
            Session::Basic(_) => Scheme::Basic,
            Session::Ntlm { spnego: true, .. } => Scheme::Negotiate,
            Session::Ntlm { .. } => Scheme::Ntlm,
            #[cfg(windows)]
            Session::Sspi(c) => c.scheme(),
        }
    }

    /// Whether the proxy ties the handshake to its connection.
    pub(super) fn connection_bound(&self) -> bool {
        !matches!(self, Session::Basic(_))
    }

    /// The first `Proxy-Authorization` of the session.
    pub(super) async fn first(&mut self) -> Result<HeaderValue, ProxyAuthError> {
        match self {
            Session::Basic(h) => Ok(h.clone()),
            Session::Ntlm { spnego, .. } => {
                let msg = ntlm::negotiate_message();
                let token = if *spnego { spnego::init(&msg) } else { msg };
                header(self.scheme(), &token)
            }
            #[cfg(windows)]
            Session::Sspi(c) => {
                let token = c.step(None).await?;
                header(c.scheme(), &token.unwrap_or_default())
            }
        }
    }

    /// The answer to the proxy's next challenge; `None` when the session has
    /// nothing more to say (the proxy refused what it had).
    pub(super) async fn answer(
        &mut self,
        token: &str,
    ) -> Result<Option<HeaderValue>, ProxyAuthError> {
        let scheme = self.scheme();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(token.trim())
            .map_err(|_| {
                ProxyAuthError::Protocol(format!("the {scheme} challenge is not base64"))
            })?;
        match self {
            Session::Basic(_) => Ok(None),
            Session::Ntlm {
                account,
                spnego,
                answered,
            } => {
                if *answered {
                    return Ok(None);
                }
                // A Negotiate proxy may answer in SPNEGO or with the bare message.
                let wrapped = *spnego && !ntlm::is_ntlm(&bytes);
                if wrapped && spnego::rejected(&bytes) {
                    return Ok(None);
                }
                let inner = if wrapped {
                    spnego::response_token(&bytes).ok_or_else(|| {
                        ProxyAuthError::Protocol(
                            "the Negotiate challenge carries no NTLM token".into(),
                        )
                    })?
                } else {
                    &bytes[..]
                };
                let challenge = ntlm::parse_challenge(inner)
                    .map_err(|e| ProxyAuthError::Protocol(e.to_string()))?;
                let msg = ntlm::authenticate_message(account, &challenge, "");
                *answered = true;
                let token = if wrapped { spnego::response(&msg) } else { msg };
                header(scheme, &token).map(Some)
            }
            #[cfg(windows)]
            Session::Sspi(c) => match c.step(Some(bytes)).await? {
                Some(t) => header(scheme, &t).map(Some),
                None => Ok(None),
            },
        }
    }
}

fn header(scheme: Scheme, token: &[u8]) -> Result<HeaderValue, ProxyAuthError> {
    let value = format!(
        "{} {}",
        scheme.name(),
        base64::engine::general_purpose::STANDARD.encode(token)
    );
    let mut h = HeaderValue::from_str(&value)
        .map_err(|_| ProxyAuthError::Protocol("token is not a valid header value".into()))?;
    h.set_sensitive(true);
    Ok(h)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn offered(fields: &[&str]) -> Vec<Challenge> {
        parse_challenges(fields.iter().copied())
    }

    #[test]
    fn challenges_are_split_on_unquoted_commas_and_keep_their_tokens() {
        let c = offered(&[
            "Basic realm=\"a, b\", NTLM",
            "Negotiate abc+/==",
            "Digest x=1",
        ]);
        let schemes: Vec<_> = c.iter().map(|c| c.scheme).collect();
        assert_eq!(
            schemes,
            [
                Some(Scheme::Basic),
                Some(Scheme::Ntlm),
                Some(Scheme::Negotiate),
                None
            ]
        );
        assert_eq!(c[0].token, None);
        assert_eq!(c[2].token.as_deref(), Some("abc+/=="));
        assert_eq!(c[3].name, "Digest");
    }

    #[test]
    fn auto_picks_the_strongest_usable_scheme() {
        let with =
            ProxyAuth::new(ProxyAuthMode::Auto, Some("D\\u"), Some(Secret::new("p"))).unwrap();
        assert_eq!(
            with.choose(&offered(&["Basic realm=x", "NTLM"])).unwrap(),
            Scheme::Ntlm
        );
        assert_eq!(
            with.choose(&offered(&["Negotiate"])).unwrap(),
            Scheme::Negotiate
        );
        assert_eq!(
            with.choose(&offered(&["Basic realm=x"])).unwrap(),
            Scheme::Basic
        );
        assert!(with.preemptive(None).is_none());

        let basic =
            ProxyAuth::new(ProxyAuthMode::Basic, Some("u"), Some(Secret::new("p"))).unwrap();
        assert!(basic.choose(&offered(&["NTLM"])).is_err());
        assert!(basic.preemptive(None).is_some());

        let none = ProxyAuth::new(ProxyAuthMode::None, Some("u"), Some(Secret::new("p"))).unwrap();
        let err = none.choose(&offered(&["NTLM", "Basic"])).unwrap_err();
        assert!(err.to_string().contains("proxy authentication"), "{err}");
        assert!(err.to_string().contains("NTLM, Basic"), "{err}");
    }

    #[test]
    fn nothing_secret_in_debug_or_errors() {
        let a = ProxyAuth::new(
            ProxyAuthMode::Auto,
            Some("D\\u"),
            Some(Secret::new("hunter22")),
        )
        .unwrap();
        let dbg = format!("{a:?}");
        assert!(!dbg.contains("hunter22"), "{dbg}");
        assert!(!dbg.contains(&base64::engine::general_purpose::STANDARD.encode("D\\u:hunter22")));
    }

    #[tokio::test]
    async fn ntlm_session_answers_once_then_gives_up() {
        let a = ProxyAuth::new(ProxyAuthMode::Ntlm, Some("D\\u"), Some(Secret::new("p"))).unwrap();
        let mut s = a.start(Scheme::Ntlm, "proxy").unwrap();
        let first = s.first().await.unwrap();
        assert!(first.to_str().unwrap().starts_with("NTLM TlRMTVNTUAAB"));
        assert!(first.is_sensitive());
        let b64 = &base64::engine::general_purpose::STANDARD;
        let challenge = b64.encode(super::ntlm::tests::challenge_message(
            &super::ntlm::tests::spec_challenge(),
        ));
        let second = s.answer(&challenge).await.unwrap().unwrap();
        assert!(second.to_str().unwrap().starts_with("NTLM TlRMTVNTUAAD"));
        // A second challenge in the same handshake is a refusal: nothing more
        // to say, never a loop.
        assert!(s.answer(&challenge).await.unwrap().is_none());
        // Nor is a challenge that is not base64 an answer.
        assert!(s.answer("%%%").await.is_err());
    }
}
