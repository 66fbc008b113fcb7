//! Strait's data plane. Modules follow a request:
//! `listener` → `conn` (HTTP/1.1, HTTP/2) → `router` → `forward` (retries, timeouts) →
//! `cluster` (hosts, load balancing) → `pool` (upstream connections); `admin` and `stats` watch.
//! The request path takes no locks, reads one config snapshot per request, and never blocks.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod response_flags;
pub mod stats;
