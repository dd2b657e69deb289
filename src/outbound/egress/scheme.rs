//! What an egress proxy can ask for (`Scheme`) and why its `407` could not be
//! answered (`ProxyAuthError`); shared by the scheme implementations.

/// A scheme authgate can answer with, strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Negotiate,
    Ntlm,
    Basic,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Negotiate => "Negotiate",
            Scheme::Ntlm => "NTLM",
            Scheme::Basic => "Basic",
        }
    }

    pub(super) fn parse(s: &str) -> Option<Self> {
        [Scheme::Negotiate, Scheme::Ntlm, Scheme::Basic]
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the proxy's `407` could not be answered. The message names proxy
/// authentication and the schemes involved, never an account or a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyAuthError {
    #[error("egress proxy authentication failed: the proxy asks for {offered} and proxy_auth = \"{mode}\" can answer none of them{hint}")]
    NoUsableScheme {
        offered: String,
        mode: &'static str,
        hint: &'static str,
    },
    #[error("egress proxy authentication failed: the proxy asks for {offered} and authgate has nothing to answer with (proxy_auth = \"none\", or no proxy_username and proxy_password_env or proxy_password_file)")]
    Unanswered { offered: String },
    #[error("egress proxy authentication failed: the proxy rejected the {0} credentials")]
    Rejected(Scheme),
    #[error("egress proxy authentication failed: still asked to authenticate after {0} rounds")]
    TooManyRounds(usize),
    #[error("egress proxy authentication failed: {0}")]
    Protocol(String),
}
