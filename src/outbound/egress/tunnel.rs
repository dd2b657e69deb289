//! The CONNECT handshake with the egress proxy, answering its `407`s on the same
//! connection for as many rounds as the scheme needs (NTLM: three). The proxy may
//! close the connection after a `407`; the handshake then goes on over a new one
//! (a connection-bound scheme starts over there, once). Every path is bounded:
//! a round limit, a head size limit, a body size limit.

use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_service::Service;

use super::auth::{parse_challenges, ProxyAuth, Session};
use super::scheme::{ProxyAuthError, Scheme};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// CONNECTs per tunnel: NTLM takes three, one more after a proxy that closed
/// the connection with its first `407`, one more to start over once.
const MAX_ROUNDS: usize = 6;
/// A `407` head carries a challenge of a few KiB at most (Kerberos included).
const MAX_HEAD: usize = 64 * 1024;
/// The body of a `407` (an HTML page) is read and dropped to reuse the connection.
const MAX_BODY: usize = 256 * 1024;

/// Why the proxy gave no tunnel, other than authentication.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("egress proxy answered CONNECT with HTTP {0}")]
    Refused(u16),
    #[error("egress proxy closed the connection during CONNECT")]
    Closed,
    #[error("egress proxy sent a malformed answer to CONNECT")]
    Malformed,
    #[error("egress proxy connection: {0}")]
    Io(#[from] std::io::Error),
}

/// A tunnel through the proxy at `proxy` to `target` (`host:port`).
pub(super) async fn open(
    http: &mut HttpConnector,
    proxy: &Uri,
    target: &str,
    auth: &ProxyAuth,
    url_basic: Option<&HeaderValue>,
) -> Result<TcpStream, BoxError> {
    let proxy_host = proxy.host().unwrap_or_default().trim_matches(['[', ']']);
    let mut stream = dial(http, proxy).await?;
    let mut authorization = auth.preemptive(url_basic);
    let mut session: Option<Session> = None;
    let mut started_over = false;
    for _ in 0..MAX_ROUNDS {
        write_connect(&mut stream, target, authorization.as_ref()).await?;
        let head = read_head(&mut stream).await?;
        match head.status {
            200..=299 if head.rest.is_empty() => return Ok(stream),
            200..=299 => return Err(TunnelError::Malformed.into()),
            407 => {}
            other => return Err(TunnelError::Refused(other).into()),
        }
        let reusable = head.keep_alive && drain_body(&mut stream, &head).await;
        let challenges = parse_challenges(head.authenticate.iter().map(String::as_str));
        let (next, answered_challenge) = match session.as_mut() {
            None if authorization.is_some() => {
                // A Basic sent up front, refused.
                return Err(ProxyAuthError::Rejected(Scheme::Basic).into());
            }
            None => {
                let scheme = auth.choose(&challenges)?;
                tracing::debug!(scheme = %scheme, "egress proxy asks for authentication");
                let s = session.insert(auth.start(scheme, proxy_host)?);
                (s.first().await?, false)
            }
            Some(s) => {
                let scheme = s.scheme();
                let token = challenges
                    .iter()
                    .find(|c| c.scheme == Some(scheme))
                    .and_then(|c| c.token.as_deref());
                let answer = match token {
                    Some(t) => s.answer(t).await?,
                    None => None,
                };
                (answer.ok_or(ProxyAuthError::Rejected(scheme))?, true)
            }
        };
        if !reusable {
            stream = dial(http, proxy).await?;
            let bound = session.as_ref().is_some_and(Session::connection_bound);
            if bound && answered_challenge {
                // The answer belongs to the connection that was closed.
                if started_over {
                    return Err(ProxyAuthError::Protocol(
                        "the proxy closes the connection in the middle of the handshake".into(),
                    )
                    .into());
                }
                started_over = true;
                let scheme = session.as_ref().map_or(Scheme::Ntlm, Session::scheme);
                let s = session.insert(auth.start(scheme, proxy_host)?);
                authorization = Some(s.first().await?);
                continue;
            }
        }
        authorization = Some(next);
    }
    Err(ProxyAuthError::TooManyRounds(MAX_ROUNDS).into())
}

async fn dial(http: &mut HttpConnector, proxy: &Uri) -> Result<TcpStream, BoxError> {
    let io = http.call(proxy.clone()).await.map_err(BoxError::from)?;
    Ok(io.into_inner())
}

async fn write_connect(
    stream: &mut TcpStream,
    target: &str,
    authorization: Option<&HeaderValue>,
) -> Result<(), TunnelError> {
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
    if let Some(a) = authorization {
        req.extend_from_slice(b"Proxy-Authorization: ");
        req.extend_from_slice(a.as_bytes());
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"Proxy-Connection: Keep-Alive\r\n\r\n");
    let written = stream.write_all(&req).await;
    zeroize::Zeroize::zeroize(&mut req);
    Ok(written?)
}

/// The parts of the proxy's answer the handshake looks at.
#[derive(Debug)]
struct Head {
    status: u16,
    keep_alive: bool,
    content_length: Option<usize>,
    chunked: bool,
    authenticate: Vec<String>,
    /// Bytes read past the head (the start of a body).
    rest: Vec<u8>,
}

async fn read_head(stream: &mut TcpStream) -> Result<Head, TunnelError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(TunnelError::Malformed);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(TunnelError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| TunnelError::Malformed)?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| version.starts_with("HTTP/1."))
        .ok_or(TunnelError::Malformed)?;
    let mut head = Head {
        status,
        keep_alive: version == "HTTP/1.1",
        content_length: None,
        chunked: false,
        authenticate: Vec::new(),
        rest: buf[end + 4..].to_vec(),
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(TunnelError::Malformed);
        };
        let (name, value) = (name.trim(), value.trim());
        if name.eq_ignore_ascii_case("proxy-authenticate") {
            head.authenticate.push(value.to_owned());
        } else if name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(value.parse().map_err(|_| TunnelError::Malformed)?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = true;
        } else if name.eq_ignore_ascii_case("connection")
            || name.eq_ignore_ascii_case("proxy-connection")
        {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    head.keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    head.keep_alive = true;
                }
            }
        }
    }
    Ok(head)
}

/// Reads the body of a `407` so the connection can carry the next CONNECT.
/// False when it cannot be reused: no length to go by, too long, or cut short.
async fn drain_body(stream: &mut TcpStream, head: &Head) -> bool {
    let Some(len) = head.content_length.filter(|_| !head.chunked) else {
        return false;
    };
    if len > MAX_BODY || head.rest.len() > len {
        return false;
    }
    let mut left = len - head.rest.len();
    let mut chunk = [0u8; 4096];
    while left > 0 {
        match stream.read(&mut chunk[..left.min(4096)]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => left -= n,
        }
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::ProxyAuthMode;
    use crate::secret::Secret;

    /// A proxy answering each connection's CONNECTs from its own script, then
    /// closing; returns its URI and the request heads it read.
    async fn scripted(
        script: Vec<Vec<&'static str>>,
    ) -> (Uri, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            for answers in script {
                let (mut s, _) = listener.accept().await.unwrap();
                for answer in answers {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    log.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    s.write_all(answer.as_bytes()).await.unwrap();
                }
            }
        });
        (uri, seen)
    }

    fn basic() -> ProxyAuth {
        ProxyAuth::new(ProxyAuthMode::Auto, Some("u"), Some(Secret::new("p"))).unwrap()
    }

    #[tokio::test]
    async fn an_http_1_0_407_is_answered_on_a_new_connection_and_a_second_refusal_ends_it() {
        let (proxy, seen) = scripted(vec![
            vec!["HTTP/1.0 407 Auth\r\nProxy-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n"],
            vec!["HTTP/1.1 407 Auth\r\nProxy-Authenticate: Basic realm=\"x\"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
            vec!["HTTP/1.1 200 OK\r\n\r\n"],
        ])
        .await;
        let mut http = HttpConnector::new();
        // The first refusal is for the bare CONNECT, the second for Basic: refused.
        let err = open(&mut http, &proxy, "up:443", &basic(), None)
            .await
            .unwrap_err();
        assert_eq!(
            err.downcast_ref::<ProxyAuthError>(),
            Some(&ProxyAuthError::Rejected(super::Scheme::Basic))
        );
        let heads = seen.lock().unwrap().clone();
        assert_eq!(heads.len(), 2, "{heads:?}");
        assert!(heads[1].contains("Proxy-Authorization: Basic "));
    }

    #[tokio::test]
    async fn basic_after_a_closing_407_opens_the_tunnel() {
        let (proxy, seen) = scripted(vec![
            vec!["HTTP/1.1 407 Auth\r\nProxy-Authenticate: Basic realm=\"x\"\r\nConnection: close\r\nContent-Length: 3\r\n\r\nno!"],
            vec!["HTTP/1.1 200 Connection established\r\n\r\n"],
        ])
        .await;
        let mut http = HttpConnector::new();
        open(&mut http, &proxy, "up:443", &basic(), None)
            .await
            .unwrap();
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_is_not_an_authentication_failure() {
        let (proxy, _) = scripted(vec![vec![
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
        ]])
        .await;
        let mut http = HttpConnector::new();
        let err = open(&mut http, &proxy, "up:443", &basic(), None)
            .await
            .unwrap_err();
        assert!(matches!(
            err.downcast_ref::<TunnelError>(),
            Some(TunnelError::Refused(403))
        ));
        assert!(crate::cause::find_in_chain::<ProxyAuthError>(err.as_ref()).is_none());
    }
}
