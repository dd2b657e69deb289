//! Integration tests: the real gateway, in-process, against mock IdPs and upstreams.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod support;

mod audit;
mod browser;
mod config_errors;
mod console;
mod fleet;
mod forward;
mod ops;
mod persist;
mod pool;
mod proxy_auth;
mod sec;
mod tokens;
mod upstream_tls;
