//! Everything that leaves the gateway: the connector (TLS, the egress proxy and its
//! authentication), the upstream connection pool and the bodies it sends. Used by
//! the request path (`forward`) and by the token lifecycle (`token`) alike.

pub mod body;
pub mod client;
pub mod egress;
pub mod pool;
