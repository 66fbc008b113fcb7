//! Strait's HTTP filter extension point: the filter trait, the registry keyed by Envoy type URL,
//! and the built-in filters. The router is the terminal filter and lives in the data plane.
//! Filters are built off the request path, once per config snapshot; hooks never block.
#![forbid(unsafe_code)]

pub mod api;
pub mod builtin;
pub mod chain;
mod convert;
pub mod metadata_match;
pub mod registry;
pub mod route;
pub mod stats;

pub use api::{
    Action, FilterContext, FilterState, HeaderEdits, Hooks, HttpFilter, LocalReply,
    PerFilterConfigs, PerRoute, WaitFuture,
};
pub use chain::{BodyFlow, ChainEntry, FilterChain};
pub use registry::{
    BuildContext, ClusterConnector, FilterConfigError, FilterFactory, NoClusters, Registry,
    FILTER_CONFIG_TYPE_URL,
};
pub use route::{Metadata, MetadataValue, RouteEntry, StatsScope, TypedMetadata};
pub use stats::{Counter, Gauge, MemoryStats, StatsSink};

/// Type URL of `envoy.extensions.filters.http.router.v3.Router`, the terminal filter.
pub const ROUTER_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

/// Well-known name of the router filter.
pub const ROUTER_NAME: &str = "envoy.filters.http.router";
