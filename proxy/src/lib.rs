//! Strait's data plane. Modules follow a request:
//! `listener` → `conn` (HTTP/1.1 through `h1server` and hyper's server, HTTP/2 through `h2server`
//! and `hpack`) → `router` →
//! `forward` (retries, timeouts) → `cluster` (hosts, load balancing) → `pool` (upstream
//! connections, spoken by `h1client` and `h2client`); `admin` and `stats` watch.
//! The request path takes no locks, reads one config snapshot per request, and never blocks.
// One exception, `h1client::parsed_value`, skips `HeaderValue`'s check of a value httparse has
// already checked.
#![deny(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod body;
pub mod cluster;
pub mod conn;
pub mod forward;
pub mod grpc_clusters;
pub mod h1client;
pub mod h1server;
pub mod h2client;
pub mod h2frame;
pub mod h2server;
pub mod headers;
pub mod health;
pub mod hpack;
mod hpack_huffman;
pub mod lb;
pub mod listener;
pub mod local_reply;
pub mod outlier;
pub mod pool;
pub mod response_flags;
pub mod retry;
pub mod router;
pub mod server;
pub mod stats;
pub mod stream_timer;
pub mod xds;

/// `Box::new(make())`, built where it goes. `Box::new` takes its value as an argument, so a large
/// one (a request's future, its record) is built on the stack and then copied whole into the
/// allocation; allocating first lets the compiler build it in place (BENCHMARKS.md, "Changes
/// and their effect", 28).
#[inline(always)]
pub(crate) fn boxed<T>(make: impl FnOnce() -> T) -> Box<T> {
    Box::write(Box::new_uninit(), make())
}
