//! authgate: an outbound authenticating gateway. Internal services send plain
//! requests; authgate routes them by path prefix to the configured upstream with a
//! valid credential injected, and owns each token's lifecycle.
//!
//! The binary (`main.rs`) is a thin shell over this library so that tests can drive
//! every piece in-process.

#![cfg_attr(not(windows), forbid(unsafe_code))]

pub mod admin;
pub mod app;
pub mod audit;
pub mod body;
pub mod caller;
pub mod cause;
pub mod config;
pub mod demo;
pub mod error;
pub mod forward;
pub mod gateway;
pub mod headers;
pub mod logging;
pub mod metrics;
pub mod outbound;
pub mod route;
pub mod secret;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod token;
#[cfg(windows)]
mod win32;

pub use app::App;
pub use config::Config;
