//! The operator console (DESIGN.md, "Operator console"): one self-contained HTML
//! page, readable without JavaScript, that reloads itself every 5 s. Everything
//! on it is read at page time from what the gateway already keeps (token cells,
//! refresh bookkeeping, the metrics' atomics, the event ring); every text is
//! escaped, and none of it is a secret.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Response, StatusCode};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use super::state::Console;
use crate::body::GatewayBody;
use crate::gateway::Gateway;
use crate::metrics::Quantile;
use crate::outbound::egress::{self, display_url};
use crate::token::{ProviderState, ProviderView};

/// HTML-escapes text for element content and quoted attributes.
pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A provider name as one URL path segment.
fn segment(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

/// "45s", "3m 20s", "2h 05m", "3d 04h".
pub(super) fn duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn when(t: SystemTime, now: SystemTime) -> String {
    let ago = now.duration_since(t).unwrap_or_default();
    format!(
        "<time datetime=\"{ts}\" title=\"{ts}\">{} ago</time>",
        duration(ago),
        ts = humantime::format_rfc3339_seconds(t)
    )
}

fn state_class(s: ProviderState) -> &'static str {
    match s {
        ProviderState::Ready => "ok",
        ProviderState::Refreshing => "info",
        ProviderState::Expired => "muted",
        ProviderState::Failing => "warn",
        ProviderState::ReauthorizationRequired => "bad",
    }
}

fn badge(class: &str, text: &str) -> String {
    format!("<span class=\"badge {class}\">{}</span>", esc(text))
}

fn refresh_form(name: &str) -> String {
    format!(
        "<form method=\"post\" action=\"/providers/{}/refresh\"><button type=\"submit\">Refresh now</button></form>",
        esc(&segment(name))
    )
}

fn authorize_link(name: &str, primary: bool) -> String {
    format!(
        "<a class=\"button{}\" href=\"/providers/{}/authorize\">Reauthorize</a>",
        if primary { " primary" } else { "" },
        esc(&segment(name))
    )
}

const STYLE: &str = r#"
:root{--bg:#f5f6f8;--card:#fff;--ink:#1d2433;--muted:#667085;--line:#e4e7ec;--ok:#067647;--okbg:#ecfdf3;--info:#175cd3;--infobg:#eff8ff;--warn:#b54708;--warnbg:#fffaeb;--bad:#b42318;--badbg:#fef3f2;--mutedbg:#f2f4f7}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
header{background:#101828;color:#fff;padding:14px 28px;display:flex;flex-wrap:wrap;align-items:baseline;gap:8px 28px}
header h1{margin:0;font-size:18px;font-weight:650;letter-spacing:.2px}
header h1 span{color:#98a2b3;font-weight:400}
header dl{display:flex;flex-wrap:wrap;gap:4px 22px;margin:0;font-size:12.5px;color:#d0d5dd}
header dt{display:inline;color:#98a2b3}header dd{display:inline;margin:0 0 0 5px;color:#fff}
header code{background:rgba(255,255,255,.12);color:#fff}
main{padding:20px 28px 8px;max-width:1480px}
h2{font-size:13px;text-transform:uppercase;letter-spacing:.06em;color:var(--muted);margin:26px 0 8px;font-weight:600}
.attention{border:1px solid #fda29b;background:var(--badbg);border-radius:10px;padding:12px 16px;margin-bottom:6px}
.attention h2{margin:0 0 6px;color:var(--bad)}
.attention ul{margin:0;padding:0;list-style:none}
.attention li{display:flex;align-items:center;gap:12px;padding:6px 0;border-top:1px solid #fecdca}
.attention li:first-child{border-top:0}
.allclear{border:1px solid #abefc6;background:var(--okbg);color:var(--ok);border-radius:10px;padding:10px 16px;font-weight:550}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:12px;margin-top:14px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 16px}
.card .label{font-size:12px;color:var(--muted);text-transform:uppercase;letter-spacing:.05em}
.card .value{font-size:20px;font-weight:620;margin-top:2px;overflow-wrap:anywhere}
.card .sub{font-size:12px;color:var(--muted)}
table{width:100%;border-collapse:separate;border-spacing:0;background:var(--card);border:1px solid var(--line);border-radius:10px;overflow:hidden}
th,td{text-align:left;padding:8px 10px;border-bottom:1px solid var(--line);vertical-align:middle;white-space:nowrap}
tr:last-child td{border-bottom:0}
th{background:#f9fafb;font-size:12px;color:var(--muted);font-weight:600}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
td.wrap{white-space:normal;overflow-wrap:anywhere;min-width:180px}
tr.needs td{background:#fffbfa}
.name{font-weight:620}.small{font-size:12px;color:var(--muted)}
code{font:12.5px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:var(--mutedbg);padding:1px 5px;border-radius:4px}
.badge{display:inline-block;padding:2px 9px;border-radius:999px;font-size:12px;font-weight:600;white-space:nowrap}
.badge.ok{color:var(--ok);background:var(--okbg)}.badge.info{color:var(--info);background:var(--infobg)}
.badge.warn{color:var(--warn);background:var(--warnbg)}.badge.bad{color:var(--bad);background:var(--badbg)}
.badge.muted{color:var(--muted);background:var(--mutedbg)}
.good{color:var(--ok)}.bad{color:var(--bad)}.warntext{color:var(--warn)}
.actions{display:flex;gap:6px;align-items:center;flex-wrap:wrap}
.scroll{overflow-x:auto;border-radius:10px}
form{margin:0}
button,.button{font:inherit;font-size:12.5px;padding:4px 11px;border-radius:6px;border:1px solid #d0d5dd;background:#fff;color:var(--ink);cursor:pointer;text-decoration:none;display:inline-block}
button:hover,.button:hover{background:#f9fafb}
.button.primary{background:var(--bad);border-color:var(--bad);color:#fff}
footer{padding:14px 28px 24px;color:var(--muted);font-size:12px}
footer a{color:var(--info)}
.empty{color:var(--muted);padding:14px 12px}
"#;

/// A whole page with the console's look (also the callback's answers).
pub(super) fn html_page(status: StatusCode, title: &str, body: &str) -> Response<GatewayBody> {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} · authgate</title><style>{STYLE}</style></head><body>\
         <header><h1>authgate <span>{t}</span></h1></header><main>{body}\
         <p><a class=\"button\" href=\"/\">Back to the console</a></p></main></body></html>",
        t = esc(title)
    );
    respond(status, html)
}

fn respond(status: StatusCode, html: String) -> Response<GatewayBody> {
    let mut resp = Response::new(GatewayBody::full(bytes::Bytes::from(html)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Nothing is loaded from anywhere; the page may not be framed (its buttons
    // act), and the callback's URL (it carries the code) is never sent on.
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// `GET /`.
pub(super) fn page(gw: &Gateway, console: &Console) -> Response<GatewayBody> {
    respond(StatusCode::OK, render(gw, console))
}

fn render(gw: &Gateway, console: &Console) -> String {
    let snap = gw.snapshot();
    let now = SystemTime::now();
    let views: Vec<(&String, ProviderView)> = snap
        .providers
        .iter()
        .map(|(name, p)| (name, p.view()))
        .collect();
    let store_kind = gw.store.store.kind();
    let store_failing = gw.store.is_failing();
    let (proxy, mut proxy_from) = egress::describe(&snap.config.outbound);
    if proxy != "direct" {
        let _ = write!(
            proxy_from,
            " · auth {}",
            snap.config.outbound.proxy_auth.as_str()
        );
        let failures = gw.metrics.proxy_auth_failures().get();
        if failures > 0 {
            let _ = write!(proxy_from, " · {failures} authentication failures");
        }
    }
    let mut h = String::with_capacity(16 * 1024);

    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>authgate console</title><style>{STYLE}</style></head><body>\
         <header><h1>authgate <span>operator console</span></h1><dl>\
         <div><dt>version</dt><dd>{version}</dd></div>\
         <div><dt>up</dt><dd title=\"since {since}\">{uptime}</dd></div>\
         <div><dt>config</dt><dd><code>{config}</code></dd></div>\
         <div><dt>loaded</dt><dd>{loaded}</dd></div>\
         </dl></header><main>",
        version = esc(env!("CARGO_PKG_VERSION")),
        uptime = duration(console.started_mono.elapsed()),
        since = humantime::format_rfc3339_seconds(console.started),
        config = esc(&snap.config.path.display().to_string()),
        loaded = when(snap.loaded_at, now),
    );

    // What needs a person, first.
    let mut attention = Vec::new();
    for (name, v) in &views {
        match v.state {
            ProviderState::ReauthorizationRequired => {
                let fix = if v.authorizable {
                    authorize_link(name, true)
                } else {
                    "<span class=\"small\">provide a new refresh token and reload</span>".into()
                };
                let why = v
                    .last
                    .as_ref()
                    .and_then(|l| l.error.as_deref())
                    .map(|e| format!(" (<code>{}</code>)", esc(e)))
                    .unwrap_or_default();
                attention.push(format!(
                    "<li>{} <span><b>{}</b> needs reauthorization{why}: its routes answer 503 until then.</span> {fix}</li>",
                    badge("bad", "reauthorization required"),
                    esc(name)
                ));
            }
            ProviderState::Failing => {
                let code = v
                    .last
                    .as_ref()
                    .and_then(|l| l.error.as_deref())
                    .unwrap_or("error");
                let retry = v
                    .next_refresh_in
                    .map(|d| format!("; next try in {}", duration(d)))
                    .unwrap_or_default();
                attention.push(format!(
                    "<li>{} <span><b>{}</b>: token requests fail (<code>{}</code>){retry}.</span> {}</li>",
                    badge("warn", "failing"),
                    esc(name),
                    esc(code),
                    refresh_form(name)
                ));
            }
            _ => {}
        }
    }
    if store_failing {
        attention.push(format!(
            "<li>{} <span>The <b>{}</b> token store is failing: tokens are served from memory; new refresh tokens are not durable until it recovers.</span></li>",
            badge("bad", "store failing"),
            esc(store_kind)
        ));
    }
    if attention.is_empty() {
        h.push_str("<div class=\"allclear\">&#10003; Nothing needs attention: every provider and the token store are healthy.</div>");
    } else {
        let _ = write!(
            h,
            "<section class=\"attention\"><h2>Needs attention</h2><ul>{}</ul></section>",
            attention.concat()
        );
    }

    let ready = views
        .iter()
        .filter(|(_, v)| v.state == ProviderState::Ready)
        .count();
    let total_requests: u64 = snap
        .routes
        .iter()
        .map(|r| r.metrics.summary().requests)
        .sum();
    let _ = write!(
        h,
        "<div class=\"cards\">\
         <div class=\"card\"><div class=\"label\">Providers ready</div><div class=\"value\">{ready} / {}</div></div>\
         <div class=\"card\"><div class=\"label\">Token store</div><div class=\"value\">{} {}</div><div class=\"sub\">{}</div></div>\
         <div class=\"card\"><div class=\"label\">Egress proxy</div><div class=\"value\">{}</div><div class=\"sub\">{}</div></div>\
         <div class=\"card\"><div class=\"label\">Requests</div><div class=\"value\">{total_requests}</div><div class=\"sub\">{} routes</div></div>\
         </div>",
        views.len(),
        esc(store_kind),
        if store_failing { badge("bad", "failing") } else { badge("ok", "ok") },
        if store_failing { "serving from memory" } else { "tokens persisted" },
        esc(&proxy),
        esc(&proxy_from),
        snap.routes.len(),
    );

    h.push_str("<h2>Providers</h2>");
    if views.is_empty() {
        h.push_str("<div class=\"scroll\"><table><tr><td class=\"empty\">No providers configured.</td></tr></table></div>");
    } else {
        h.push_str(
            "<div class=\"scroll\"><table><tr><th>Provider</th><th>State</th><th class=\"num\">Generation</th>\
             <th>Expires in</th><th>Next refresh</th><th>Last refresh</th>\
             <th class=\"num\">Refreshes<br>ok / failed</th><th class=\"num\">Waiters</th><th>Actions</th></tr>",
        );
        for (name, v) in &views {
            let expires = match (v.generation, v.expires_in) {
                (None, _) => "<span class=\"small\">no token</span>".to_owned(),
                (Some(_), Some(d)) if d.is_zero() => {
                    "<span class=\"bad\">expired</span>".to_owned()
                }
                (Some(_), Some(d)) => duration(d),
                (Some(_), None) => "<span class=\"small\">no expiry</span>".to_owned(),
            };
            let next = match (v.state, v.next_refresh_in) {
                (ProviderState::ReauthorizationRequired, _) => {
                    "<span class=\"small\">&mdash;</span>".to_owned()
                }
                (ProviderState::Refreshing, _) => "<span class=\"small\">now</span>".to_owned(),
                (_, Some(d)) => format!("in {}", duration(d)),
                (_, None) => "<span class=\"small\">&mdash;</span>".to_owned(),
            };
            let last = match &v.last {
                None => "<span class=\"small\">none yet</span>".to_owned(),
                Some(l) => {
                    let outcome = if l.outcome == "ok" {
                        badge("ok", "ok")
                    } else {
                        badge("bad", l.outcome)
                    };
                    let error = l
                        .error
                        .as_deref()
                        .map(|e| format!(" <code>{}</code>", esc(e)))
                        .unwrap_or_default();
                    format!(
                        "{} {outcome}{error}<br><span class=\"small\">{}</span>",
                        esc(l.trigger.as_str()),
                        when(l.at, now)
                    )
                }
            };
            let mut actions = String::new();
            // Without a working refresh token a refresh cannot help: only the
            // reauthorization is offered then.
            let reauth_only = v.authorizable && v.state == ProviderState::ReauthorizationRequired;
            if v.grant != "static" && !reauth_only {
                actions.push_str(&refresh_form(name));
            }
            if v.authorizable {
                actions.push_str(&authorize_link(name, false));
            }
            let _ = write!(
                h,
                "<tr{row}><td><span class=\"name\">{n}</span><br><span class=\"small\">{grant}</span></td>\
                 <td data-state=\"{state}\">{badge}</td><td class=\"num\">{generation}</td>\
                 <td>{expires}</td><td>{next}</td><td class=\"wrap\">{last}</td>\
                 <td class=\"num\">{ok} / {failed}</td><td class=\"num\">{waiters}</td>\
                 <td><div class=\"actions\">{actions}</div></td></tr>",
                row = if v.state.needs_attention() { " class=\"needs\"" } else { "" },
                n = esc(name),
                grant = esc(v.grant),
                state = esc(v.state.as_str()),
                badge = badge(state_class(v.state), v.state.as_str()),
                generation = v.generation.map_or("&mdash;".to_owned(), |g| g.to_string()),
                ok = v.refreshes_ok,
                failed = v.refreshes_failed,
                waiters = v.waiters,
            );
        }
        h.push_str("</table></div>");
    }

    h.push_str("<h2>Routes</h2>");
    if snap.routes.is_empty() {
        h.push_str("<table><tr><td class=\"empty\">No routes configured.</td></tr></table>");
    } else {
        h.push_str(
            "<div class=\"scroll\"><table><tr><th>Route</th><th>Prefix</th><th>Upstream</th><th>Provider</th>\
             <th class=\"num\">Requests</th><th class=\"num\">4xx</th><th class=\"num\">5xx</th>\
             <th class=\"num\">Replays</th><th class=\"num\">p99</th></tr>",
        );
        for r in &snap.routes {
            let s = r.metrics.summary();
            let p99 = match s.p99 {
                None => "&mdash;".to_owned(),
                Some(Quantile::Within(d)) => millis(d),
                Some(Quantile::Above(d)) => format!("&gt; {}", millis(d)),
            };
            let _ = write!(
                h,
                "<tr><td class=\"name\">{}</td><td><code>{}</code></td><td class=\"wrap\">{}</td><td>{}</td>\
                 <td class=\"num\">{}</td><td class=\"num{}\">{}</td><td class=\"num{}\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{p99}</td></tr>",
                esc(&r.name),
                esc(&r.cfg.prefix),
                esc(&display_url(&r.cfg.upstream.to_string())),
                r.cfg.provider.as_deref().map_or("<span class=\"small\">none</span>".to_owned(), esc),
                s.requests,
                if s.client_errors > 0 { " warntext" } else { "" },
                s.client_errors,
                if s.server_errors > 0 { " bad" } else { "" },
                s.server_errors,
                s.replays,
            );
        }
        h.push_str("</table></div>");
    }

    let events = gw.events.newest_first();
    let _ = write!(h, "<h2>Last {} token events</h2>", events.len());
    if events.is_empty() {
        h.push_str("<table><tr><td class=\"empty\">No token events yet.</td></tr></table>");
    } else {
        h.push_str(
            "<div class=\"scroll\"><table><tr><th>Time (UTC)</th><th>Provider</th><th>Trigger</th><th>Outcome</th>\
             <th class=\"num\">Generation</th><th class=\"num\">Expires in</th>\
             <th class=\"num\">Duration</th><th>Error</th></tr>",
        );
        for e in &events {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"name\">{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{} ms</td><td>{}</td></tr>",
                humantime::format_rfc3339_seconds(e.ts),
                esc(&e.provider),
                esc(e.trigger),
                if e.outcome == "ok" { badge("ok", "ok") } else { badge("bad", e.outcome) },
                e.generation.map_or("&mdash;".to_owned(), |g| g.to_string()),
                e.expires_in_s.map_or("&mdash;".to_owned(), |s| duration(Duration::from_secs(s))),
                e.duration_ms,
                e.error.as_deref().map_or(String::new(), |c| format!("<code>{}</code>", esc(c))),
            );
        }
        h.push_str("</table></div>");
    }

    let _ = write!(
        h,
        "</main><footer>This page reloads itself every 5 seconds. Actions need {}. \
         Machine-readable: <a href=\"/status\">/status</a> · <a href=\"/events\">/events</a> · \
         <a href=\"/metrics\">/metrics</a> · <a href=\"/readyz\">/readyz</a></footer></body></html>",
        if console.key.is_some() {
            "the admin key (HTTP Basic, user admin)"
        } else {
            "a loopback client"
        }
    );
    h
}

fn millis(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x")</script> & 'y'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;"
        );
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        assert_eq!(
            display_url("http://user:pa55@proxy.corp:3128/"),
            "http://proxy.corp:3128/"
        );
        assert_eq!(
            display_url("https://api.example/v2?key=abc"),
            "https://api.example/v2"
        );
        assert_eq!(display_url("proxy.corp:3128"), "proxy.corp:3128");
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration(Duration::from_secs(45)), "45s");
        assert_eq!(duration(Duration::from_secs(200)), "3m 20s");
        assert_eq!(duration(Duration::from_secs(7500)), "2h 05m");
        assert_eq!(
            duration(Duration::from_secs(3 * 86_400 + 4 * 3600)),
            "3d 04h"
        );
    }
}
