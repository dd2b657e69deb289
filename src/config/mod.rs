//! Configuration: `load` reads the TOML file (`raw`), `validate` checks it into the
//! `model` the gateway runs on. Every error names file, line, column and key path
//! (`locate`), the way `authgate check` prints it.

mod load;
mod locate;
mod model;
pub(crate) mod raw;
mod validate;

pub use load::resolve_path;
pub use locate::KeyPath;
pub use model::*;
pub(crate) use validate::is_loopback_host;
