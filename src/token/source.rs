//! Where tokens come from. A provider asks its `TokenSource`: in production the
//! IdP's token endpoint (`OAuthSource`), in unit tests a fake that answers on a
//! paused clock, so single flight, fencing and the refresh policy are tested
//! without HTTP.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http_body_util::Full;

use super::oauth::{self, ClientCredential, GrantRequest, TokenError, TokenResponse};
use crate::config::{ClientAuth, OAuthClient};
use crate::outbound::client::HttpClient;
use crate::outbound::egress::EgressProxy;

pub type SourceFuture<'a> =
    Pin<Box<dyn Future<Output = Result<TokenResponse, TokenError>> + Send + 'a>>;

/// One token request per call; the provider decides when to make one.
pub trait TokenSource: Send + Sync + fmt::Debug {
    fn request<'a>(&'a self, grant: GrantRequest<'a>) -> SourceFuture<'a>;
}

/// The IdP's token endpoint (RFC 6749 §3.2), reached through the egress proxy like
/// every upstream, with the client's credential loaded once.
#[derive(Debug)]
pub struct OAuthSource {
    http: HttpClient<Full<Bytes>>,
    client: OAuthClient,
    credential: ClientCredential,
}

/// Why a provider's token endpoint cannot be used; a start-up or reload error.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("client credential: {0}")]
    Credential(#[from] super::oauth::CredentialError),
    #[error("token endpoint TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

impl OAuthSource {
    pub fn new(client: &OAuthClient, proxy: &EgressProxy) -> Result<Self, SourceError> {
        let credential = ClientCredential::load(&client.auth)?;
        let client_cert = match &client.auth {
            ClientAuth::TlsClientAuth { cert, key } => Some((cert.as_path(), key.as_path())),
            _ => None,
        };
        let http = crate::outbound::client::build(client.ca.as_deref(), client_cert, false, proxy)?;
        Ok(OAuthSource {
            http,
            client: client.clone(),
            credential,
        })
    }
}

impl TokenSource for OAuthSource {
    fn request<'a>(&'a self, grant: GrantRequest<'a>) -> SourceFuture<'a> {
        Box::pin(oauth::request_token(
            &self.http,
            &self.client,
            &self.credential,
            grant,
        ))
    }
}
