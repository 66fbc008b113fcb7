//! Strait's HTTP filter extension point: the filter trait, the registry keyed by Envoy type URL,
//! and the built-in filters. The router is the terminal filter and lives in the data plane.
#![forbid(unsafe_code)]

/// Type URL of `envoy.extensions.filters.http.router.v3.Router`, the terminal filter.
pub const ROUTER_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

/// Well-known name of the router filter.
pub const ROUTER_NAME: &str = "envoy.filters.http.router";
