//! The request path: routing, header hygiene, streaming, errors.

use hyper::{Method, StatusCode};

use crate::support::{Client, MockUpstream, TestGateway};

fn static_config(upstream: &MockUpstream) -> String {
    std::env::set_var("FWD_STATIC_TOKEN", "static-secret-1");
    format!(
        r#"
[providers.api]
grant = "static"
token_env = "FWD_STATIC_TOKEN"

[providers.key]
grant = "static"
token_env = "FWD_STATIC_TOKEN"
header = "x-api-key"
scheme = ""

[[routes]]
prefix = "/crm"
upstream = "{u}/v2"
provider = "api"

[[routes]]
prefix = "/crm/special"
upstream = "{u}/special-base/"
provider = "key"

[[routes]]
prefix = "/open"
upstream = "{u}"
"#,
        u = upstream.url()
    )
}

#[tokio::test]
async fn routes_by_longest_whole_segment_prefix_and_joins_paths() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&static_config(&up)).await;
    let c = Client::new();

    let r = c.get(&gw.url("/crm/invoices?page=2")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(up.last().uri, "/v2/invoices?page=2");
    assert_eq!(up.last().headers["authorization"], "Bearer static-secret-1");

    c.get(&gw.url("/crm")).await;
    assert_eq!(up.last().uri, "/v2");

    c.get(&gw.url("/crm/special/x")).await;
    assert_eq!(up.last().uri, "/special-base/x");
    assert_eq!(up.last().headers["x-api-key"], "static-secret-1");
    assert!(up.last().headers.get("authorization").is_none());

    c.get(&gw.url("/open/thing")).await;
    assert_eq!(up.last().uri, "/thing");
    assert!(
        up.last().headers.get("authorization").is_none(),
        "route without provider forwards uninjected"
    );

    let before = up.count();
    let r = c.get(&gw.url("/crmx/invoices")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"], "no_route");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(r.json()["request_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert_eq!(up.count(), before);
}

#[tokio::test]
async fn header_hygiene_toward_the_upstream() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&static_config(&up)).await;
    let r = Client::new()
        .send(
            Method::GET,
            &gw.url("/crm/h"),
            &[
                ("authorization", "Bearer caller-own"),
                ("x-authgate-key", "caller-key"),
                ("connection", "x-drop-me"),
                ("x-drop-me", "1"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic abc"),
                ("x-forwarded-for", "1.2.3.4"),
                ("x-keep", "yes"),
                ("x-request-id", "req-abc-123"),
            ],
            "",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = up.last();
    assert_eq!(seen.headers["authorization"], "Bearer static-secret-1");
    assert_eq!(seen.headers["host"], up.addr.to_string());
    assert_eq!(seen.headers["x-keep"], "yes");
    assert_eq!(seen.headers["x-request-id"], "req-abc-123");
    for gone in [
        "x-authgate-key",
        "x-drop-me",
        "te",
        "proxy-authorization",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
    ] {
        assert!(
            seen.headers.get(gone).is_none(),
            "{gone} reached the upstream"
        );
    }
    // The response: request id returned, hop-by-hop from the upstream removed.
    assert_eq!(r.header("x-request-id"), Some("req-abc-123"));
    assert!(r.header("x-hop").is_none());
    assert!(r.header("connection").is_none_or(|v| !v.contains("x-hop")));
}

#[tokio::test]
async fn a_request_id_is_generated_and_sent_both_ways() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&static_config(&up)).await;
    let r = Client::new().get(&gw.url("/open/x")).await;
    let id = r.header("x-request-id").unwrap().to_owned();
    assert_eq!(id.len(), 32);
    assert_eq!(up.last().headers["x-request-id"], id.as_str());
}

#[tokio::test]
async fn dot_segments_are_refused_in_every_encoding() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&static_config(&up)).await;
    let c = Client::new();
    for p in [
        "/crm/../admin",
        "/crm/%2e%2e/admin",
        "/crm/.%2E/x",
        "/crm/./x",
        "/crm/a/%2E%2E",
    ] {
        let r = c.get(&gw.url(p)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{p}");
        assert_eq!(r.json()["error"], "bad_request");
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn redirects_are_passed_back_not_followed() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&static_config(&up)).await;
    let r = Client::new().get(&gw.url("/crm/redirect")).await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(r.header("location"), Some("http://elsewhere.example/x"));
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn upstream_errors_map_to_502_and_504() {
    let up = MockUpstream::start().await;
    // A port with nothing listening.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = TestGateway::start(&format!(
        r#"
[[routes]]
prefix = "/dead"
upstream = "http://{dead}"

[[routes]]
prefix = "/slow"
upstream = "{u}"
timeout = "200ms"
"#,
        u = up.url()
    ))
    .await;
    let c = Client::new();
    let r = c.get(&gw.url("/dead/x")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"], "upstream_unreachable");
    assert_eq!(r.json()["route"], "/dead");
    assert!(
        !r.text().contains(&dead.port().to_string()),
        "internal address leaked: {}",
        r.text()
    );
    let r = c.get(&gw.url("/slow/slow/5000")).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.json()["error"], "upstream_timeout");
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&static_config(&up)).await;
    // 64 MiB down; the gateway never holds it whole (it would show as RSS in the
    // bench; here we check the bytes arrive intact and in order).
    let r = Client::new().get(&gw.url("/open/big/67108864")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), 64 << 20);
    // 8 MiB up, past the replay buffer: streamed through.
    let body = vec![b'y'; 8 << 20];
    let r = Client::new()
        .send(Method::POST, &gw.url("/crm/upload"), &[], body)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(up.last().body.len(), 8 << 20);
}

#[tokio::test]
async fn connect_and_absolute_form_to_other_hosts_are_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sentinel = MockUpstream::start().await;
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&static_config(&up)).await;
    for raw in [
        format!(
            "CONNECT {} HTTP/1.1\r\nhost: {}\r\n\r\n",
            sentinel.addr, sentinel.addr
        ),
        format!(
            "GET http://{}/crm/x HTTP/1.1\r\nhost: {}\r\n\r\n",
            sentinel.addr, sentinel.addr
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(raw.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 400"), "{raw:?} got {text}");
    }
    assert_eq!(sentinel.count(), 0, "the sentinel must receive nothing");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn h2c_callers_are_served() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&static_config(&up)).await;
    let r = Client::h2c().get(&gw.url("/crm/h2")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(up.last().uri, "/v2/h2");
}

#[tokio::test]
async fn graceful_shutdown_drains_a_slow_request() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&static_config(&up)).await;
    let url = gw.url("/open/slow/500");
    let inflight = tokio::spawn(async move { Client::new().get(&url).await });
    // Wait until the upstream has the request, then shut down.
    while up.count() == 0 {
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let addr = gw.addr;
    gw.stop().await;
    let r = inflight.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "slow done");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener must be closed"
    );
}

#[tokio::test]
async fn an_upstream_error_without_a_body_passes_through_as_it_is() {
    let up = MockUpstream::start().await;
    let gw = TestGateway::start(&static_config(&up)).await;
    let c = Client::new();
    // The codes hyper uses for its own answers to heads it cannot parse: the
    // gateway turns those into its JSON error, never the upstream's.
    for code in [400u16, 414, 431] {
        let r = c
            .send(
                Method::GET,
                &gw.url(&format!("/open/bare/{code}")),
                &[("x-request-id", "caller-id-7")],
                bytes::Bytes::new(),
            )
            .await;
        assert_eq!(r.status.as_u16(), code);
        assert!(r.body.is_empty(), "{code}: {:?}", r.text());
        assert_eq!(r.header("x-request-id"), Some("caller-id-7"), "{code}");
        assert_ne!(r.header("connection"), Some("close"), "{code}");
    }
}
