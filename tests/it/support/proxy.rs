//! A corporate egress proxy for tests: CONNECT (and, without authentication,
//! absolute-form requests), requiring nothing, Basic, or NTLM (offered as `NTLM`, `Negotiate` or both). Its NTLM side is a
//! verifying implementation of its own: it issues a challenge per connection,
//! and accepts an AUTHENTICATE only on the connection that got the challenge and
//! only if its NTLMv2 proof matches the configured password. Everything it sees
//! is recorded for the test to check.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use hmac::{KeyInit, Mac};
use md4::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, Clone)]
pub enum Required {
    Nothing,
    Basic {
        user: String,
        password: String,
    },
    Ntlm {
        user: String,
        domain: String,
        password: String,
    },
}

/// One CONNECT the proxy read: which connection (numbered from 0), the request
/// line, its `Proxy-Authorization`, and the status answered.
#[derive(Debug, Clone)]
pub struct Seen {
    pub conn: usize,
    pub line: String,
    pub auth: Option<String>,
    pub status: u16,
}

#[derive(Debug)]
struct Settings {
    required: Required,
    /// The schemes a 407 offers, in order.
    offer: Vec<&'static str>,
    /// Close the connection after a 407 that only offers schemes (no NTLM
    /// challenge in it), as some proxies do.
    close_after_offer: bool,
    /// Close the connection after every 407, the NTLM challenge included.
    close_after_every_407: bool,
}

#[derive(Debug, Default)]
pub struct ProxyState {
    connections: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
}

#[derive(Debug, Clone)]
pub struct TestProxy {
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
}

#[derive(Debug)]
pub struct TestProxyBuilder(Settings);

impl TestProxy {
    pub fn open() -> TestProxyBuilder {
        TestProxyBuilder(Settings {
            required: Required::Nothing,
            offer: Vec::new(),
            close_after_offer: false,
            close_after_every_407: false,
        })
    }

    pub fn basic(user: &str, password: &str) -> TestProxyBuilder {
        let mut b = Self::open();
        b.0.required = Required::Basic {
            user: user.into(),
            password: password.into(),
        };
        b.0.offer = vec!["Basic realm=\"corp\""];
        b
    }

    pub fn ntlm(domain: &str, user: &str, password: &str) -> TestProxyBuilder {
        let mut b = Self::open();
        b.0.required = Required::Ntlm {
            user: user.into(),
            domain: domain.into(),
            password: password.into(),
        };
        b.0.offer = vec!["Negotiate", "NTLM"];
        b
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// CONNECTs answered 200.
    pub fn tunnels(&self) -> usize {
        self.seen().iter().filter(|s| s.status == 200).count()
    }
}

impl TestProxyBuilder {
    /// The schemes the 407 offers (`"Negotiate"`, `"NTLM"`, `"Basic realm=…"`).
    pub fn offering(mut self, schemes: &[&'static str]) -> Self {
        self.0.offer = schemes.to_vec();
        self
    }

    pub fn close_after_offer(mut self) -> Self {
        self.0.close_after_offer = true;
        self
    }

    pub fn close_after_every_407(mut self) -> Self {
        self.0.close_after_every_407 = true;
        self
    }

    pub async fn start(self) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ProxyState::default());
        let settings = Arc::new(self.0);
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let conn = st.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, conn, st.clone(), settings.clone()));
            }
        });
        TestProxy { addr, state }
    }
}

enum Verdict {
    Accept,
    /// 407 with these `Proxy-Authenticate` values; `true` for the bare offer
    /// of schemes, `false` for a challenge carrying a token.
    Challenge(Vec<String>, bool),
}

async fn serve(mut client: TcpStream, conn: usize, state: Arc<ProxyState>, s: Arc<Settings>) {
    // The NTLM challenge issued on this connection, if any.
    let mut issued: Option<[u8; 8]> = None;
    loop {
        let Some(head) = read_head(&mut client).await else {
            return;
        };
        let line = head.lines().next().unwrap_or_default().to_owned();
        let auth = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("proxy-authorization")
                .then(|| v.trim().to_owned())
        });
        let mut parts = line.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if method != "CONNECT" {
            // A request in absolute form: relayed when nothing is required,
            // else refused with the offer (the proxy cannot know who sent it).
            if !matches!(s.required, Required::Nothing) {
                record(&state, conn, line, auth, 407);
                let mut resp = String::from("HTTP/1.1 407 Proxy Authentication Required\r\n");
                for v in &s.offer {
                    resp.push_str(&format!("Proxy-Authenticate: {v}\r\n"));
                }
                resp.push_str("Content-Length: 0\r\n\r\n");
                if client.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
                continue;
            }
            let uri: hyper::Uri = target.parse().unwrap();
            let host = format!("{}:{}", uri.host().unwrap(), uri.port_u16().unwrap_or(80));
            let Ok(mut up) = TcpStream::connect(host).await else {
                return;
            };
            record(&state, conn, line, auth, 200);
            if up.write_all(head.as_bytes()).await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            }
            return;
        }
        let verdict = match &s.required {
            Required::Nothing => Verdict::Accept,
            Required::Basic { user, password } => {
                let expected = format!("Basic {}", B64.encode(format!("{user}:{password}")));
                if auth.as_deref() == Some(expected.as_str()) {
                    Verdict::Accept
                } else {
                    Verdict::Challenge(s.offer.iter().map(|o| o.to_string()).collect(), true)
                }
            }
            Required::Ntlm {
                user,
                domain,
                password,
            } => ntlm_step(
                auth.as_deref(),
                &mut issued,
                &s.offer,
                user,
                domain,
                password,
            ),
        };
        match verdict {
            Verdict::Accept => {
                let Ok(mut up) = TcpStream::connect(target).await else {
                    record(&state, conn, line, auth, 502);
                    let _ = client
                        .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                };
                record(&state, conn, line, auth, 200);
                if client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                return;
            }
            Verdict::Challenge(values, offer) => {
                record(&state, conn, line, auth, 407);
                let close = s.close_after_every_407 || (s.close_after_offer && offer);
                let body = "<html><body>Proxy authentication required</body></html>";
                let mut resp = String::from("HTTP/1.1 407 Proxy Authentication Required\r\n");
                for v in values {
                    resp.push_str(&format!("Proxy-Authenticate: {v}\r\n"));
                }
                resp.push_str(&format!(
                    "Content-Type: text/html\r\nContent-Length: {}\r\n",
                    body.len()
                ));
                if close {
                    resp.push_str("Connection: close\r\n");
                }
                resp.push_str("\r\n");
                resp.push_str(body);
                if client.write_all(resp.as_bytes()).await.is_err() || close {
                    return;
                }
            }
        }
    }
}

fn record(state: &ProxyState, conn: usize, line: String, auth: Option<String>, status: u16) {
    state.seen.lock().unwrap().push(Seen {
        conn,
        line,
        auth,
        status,
    });
}

async fn read_head(client: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: nothing past the head may be consumed (the tunnel's data).
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
        if head.len() > 64 * 1024 {
            return None;
        }
    }
    String::from_utf8(head).ok()
}

/// One NTLM round: NEGOTIATE gets a challenge, AUTHENTICATE is verified against
/// the challenge issued on this connection; anything else gets the offer.
fn ntlm_step(
    auth: Option<&str>,
    issued: &mut Option<[u8; 8]>,
    offer: &[&str],
    user: &str,
    domain: &str,
    password: &str,
) -> Verdict {
    let offer_all = || Verdict::Challenge(offer.iter().map(|o| o.to_string()).collect(), true);
    let Some((scheme, token)) = auth.and_then(|a| a.split_once(' ')) else {
        return offer_all();
    };
    let negotiate = scheme.eq_ignore_ascii_case("Negotiate");
    if !negotiate && !scheme.eq_ignore_ascii_case("NTLM") || !offer.contains(&scheme) {
        return offer_all();
    }
    let Ok(bytes) = B64.decode(token) else {
        return offer_all();
    };
    // In SPNEGO the NTLM message is the last element: from its signature on.
    let Some(at) = bytes.windows(8).position(|w| w == b"NTLMSSP\0") else {
        return offer_all();
    };
    let msg = &bytes[at..];
    match u32::from_le_bytes(msg[8..12].try_into().unwrap()) {
        1 => {
            let challenge: [u8; 8] = rand::random();
            *issued = Some(challenge);
            let type2 = challenge_message(&challenge);
            let token = if negotiate {
                spnego_resp(&type2)
            } else {
                type2
            };
            Verdict::Challenge(vec![format!("{scheme} {}", B64.encode(token))], false)
        }
        3 => match issued.take() {
            Some(challenge) if verify(msg, &challenge, user, domain, password) => Verdict::Accept,
            // A bare scheme after an AUTHENTICATE: refused.
            _ => Verdict::Challenge(vec![scheme.to_owned()], true),
        },
        _ => offer_all(),
    }
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn challenge_message(challenge: &[u8; 8]) -> Vec<u8> {
    // Target info: NetBIOS domain "CORP", computer "PROXY", a timestamp, EOL.
    let mut info = Vec::new();
    for (id, value) in [(2u16, utf16le("CORP")), (1, utf16le("PROXY"))] {
        info.extend(id.to_le_bytes());
        info.extend((value.len() as u16).to_le_bytes());
        info.extend(value);
    }
    info.extend(7u16.to_le_bytes());
    info.extend(8u16.to_le_bytes());
    info.extend(133_000_000_000_000_000u64.to_le_bytes());
    info.extend([0, 0, 0, 0]);
    let target = utf16le("CORP");
    let mut m = b"NTLMSSP\0".to_vec();
    m.extend(2u32.to_le_bytes());
    m.extend((target.len() as u16).to_le_bytes());
    m.extend((target.len() as u16).to_le_bytes());
    m.extend(48u32.to_le_bytes());
    // Unicode, request target, NTLM, target info, extended session security.
    m.extend(0x0089_8205u32.to_le_bytes());
    m.extend(challenge);
    m.extend([0; 8]);
    m.extend((info.len() as u16).to_le_bytes());
    m.extend((info.len() as u16).to_le_bytes());
    m.extend((48 + target.len() as u32).to_le_bytes());
    m.extend(&target);
    m.extend(&info);
    m
}

fn spnego_resp(inner: &[u8]) -> Vec<u8> {
    fn tlv(tag: u8, v: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if v.len() < 128 {
            out.push(v.len() as u8);
        } else {
            out.extend([0x82, (v.len() >> 8) as u8, v.len() as u8]);
        }
        out.extend(v);
        out
    }
    let mut fields = tlv(0xa0, &[0x0a, 0x01, 0x01]); // accept-incomplete
    fields.extend(tlv(0xa2, &tlv(0x04, inner)));
    tlv(0xa1, &tlv(0x30, &fields))
}

fn field(msg: &[u8], at: usize) -> Option<&[u8]> {
    let len = usize::from(u16::from_le_bytes(msg.get(at..at + 2)?.try_into().ok()?));
    let off = u32::from_le_bytes(msg.get(at + 4..at + 8)?.try_into().ok()?) as usize;
    msg.get(off..off + len)
}

fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = <hmac::Hmac<md5::Md5> as KeyInit>::new_from_slice(key).unwrap();
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

/// The NTLMv2 check a domain controller makes: the proof over the challenge
/// and the client's blob, keyed by the account's NTOWFv2.
fn verify(msg: &[u8], challenge: &[u8; 8], user: &str, domain: &str, password: &str) -> bool {
    let (Some(nt), Some(dom), Some(name)) = (field(msg, 20), field(msg, 28), field(msg, 36)) else {
        return false;
    };
    if nt.len() < 16 + 28 {
        return false;
    }
    let sent_user = String::from_utf16_lossy(
        &name
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect::<Vec<_>>(),
    );
    let sent_domain = String::from_utf16_lossy(
        &dom.chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect::<Vec<_>>(),
    );
    // DOMAIN\user, or the UPN user@domain with an empty domain field.
    let upn = format!("{user}@{domain}");
    let who_ok = (sent_user.eq_ignore_ascii_case(user) && sent_domain.eq_ignore_ascii_case(domain))
        || (sent_user.eq_ignore_ascii_case(&upn) && sent_domain.is_empty());
    if !who_ok {
        return false;
    }
    let nt_hash = md4::Md4::digest(utf16le(password));
    let key = hmac_md5(
        &nt_hash,
        &[&utf16le(&sent_user.to_uppercase()), &utf16le(&sent_domain)],
    );
    let proof = hmac_md5(&key, &[challenge, &nt[16..]]);
    proof == nt[..16]
}
