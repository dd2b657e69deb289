//! Integration tests: the real gateway, in-process, against mock IdPs and upstreams.
#![allow(unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

mod support;

mod audit;
mod browser;
mod callers;
mod config_errors;
mod connections;
mod console;
mod fleet;
mod forward;
mod house;
mod limits;
mod listener_tls;
mod ops;
mod persist;
mod pool;
mod proxy_auth;
mod secrecy;
mod tokens;
mod upstream_tls;
// The Windows binary under Wine, which runs on Linux.
#[cfg(unix)]
mod windows;
