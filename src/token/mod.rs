//! Token lifecycle (DESIGN.md, "Token lifecycle"). Each provider holds its current
//! token in a lock-free cell with a generation number; requests read the cell and
//! nothing else. The files, leaves first:
//! - `cell`: the token, the cell and its generation fence;
//! - `flight`: single flight, one token request at a time, every waiter sharing it;
//! - `policy`: margin, jitter, 401 spacing and backoff, as pure functions;
//! - `oauth`, `source`: the token endpoint, behind the `TokenSource` trait (a test
//!   fake stands in for it in the unit tests);
//! - `events`: the console's ring of recent token events;
//! - `store_handle`: the store as the providers share it, and what a stored
//!   token must be to be adopted;
//! - `provider`: the `Provider`, its public face (what requests, the admin listener
//!   and the background refresher call) and its bookkeeping;
//! - `refresh`, `persist`, `authorize`, `view`: the rest of `Provider`'s methods,
//!   by concern: a refresh from launch to its record; the store and the fleet;
//!   reauthorization; the console's view. They build on `provider`, never the
//!   other way round.

mod authorize;
mod cell;
mod events;
mod flight;
pub mod oauth;
mod persist;
pub mod policy;
mod provider;
mod refresh;
pub mod source;
mod store_handle;
#[cfg(test)]
mod tests;
mod view;

pub use cell::{Credential, NotAHeaderValue, Token, TokenCell};
pub use events::{TokenEvents, EVENTS_KEPT};
pub use provider::{
    LastRefresh, Provider, ProviderDeps, ProviderError, ProviderStatus, Trigger, Unavailable,
};
pub use source::{OAuthSource, TokenSource};
pub use store_handle::{StoreFailure, StoreHandle};
pub use view::{ProviderState, ProviderView};
