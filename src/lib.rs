//! authgate: an outbound authenticating gateway. Internal services send plain
//! requests; authgate routes them by path prefix to the configured upstream with a
//! valid credential injected, and owns each token's lifecycle.
//!
//! The binary (`main.rs`) is a thin shell over this library so that tests can drive
//! every piece in-process.

pub mod config;
pub mod route;
pub mod secret;
pub mod store;
