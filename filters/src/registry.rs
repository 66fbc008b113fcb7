//! Builds filters from their Envoy `typed_config` by type URL, once per config snapshot, and
//! parses per-route overrides (`typed_per_filter_config`). Building never touches the request
//! path; every error names the config field it is about.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::route::v3::FilterConfig;
use prost::{Message, Name};

use crate::api::{HttpFilter, PerRoute};
use crate::stats::StatsSink;

/// A rejected filter configuration: `path` is the field (e.g.
/// `static_resources.listeners[0]...http_filters[1].typed_config.abort.grpc_status`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FilterConfigError {
    pub path: String,
    pub message: String,
}

impl FilterConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        FilterConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// Gives filters that call other services (ext_authz) a gRPC channel to a cluster. The data
/// path owns clusters; it implements this.
pub trait ClusterConnector: Send + Sync {
    /// A channel to `cluster`, or why there is none (unknown cluster, ...). Called at build time;
    /// the channel should connect lazily.
    fn grpc_channel(&self, cluster: &str) -> Result<tonic::transport::Channel, String>;
}

/// A connector that knows no cluster.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoClusters;

impl ClusterConnector for NoClusters {
    fn grpc_channel(&self, cluster: &str) -> Result<tonic::transport::Channel, String> {
        Err(format!("unknown cluster '{cluster}'"))
    }
}

/// What a factory may use while building.
#[derive(Clone, Copy)]
pub struct BuildContext<'a> {
    /// The HTTP connection manager's `stat_prefix` (filter stats live under `http.<prefix>.`).
    pub stat_prefix: &'a str,
    pub stats: &'a dyn StatsSink,
    pub clusters: &'a dyn ClusterConnector,
}

impl std::fmt::Debug for BuildContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildContext")
            .field("stat_prefix", &self.stat_prefix)
            .finish()
    }
}

/// Builds one kind of filter.
pub trait FilterFactory: Send + Sync {
    /// Type URL of the filter's `typed_config`.
    fn type_url(&self) -> &'static str;

    /// Type URLs this filter accepts in `typed_per_filter_config` (may include `type_url`).
    fn per_route_type_urls(&self) -> &'static [&'static str] {
        &[]
    }

    /// Decodes and validates `value` (the `Any`'s bytes). `path` names the `typed_config`.
    fn build(
        &self,
        value: &[u8],
        path: &str,
        cx: &BuildContext<'_>,
    ) -> Result<Arc<dyn HttpFilter>, FilterConfigError>;

    /// Parses a per-route config of one of `per_route_type_urls`.
    fn build_per_route(
        &self,
        type_url: &str,
        value: &[u8],
        path: &str,
        cx: &BuildContext<'_>,
    ) -> Result<PerRoute, FilterConfigError> {
        let _ = (value, cx);
        Err(FilterConfigError::new(
            path,
            format!("per-route config {type_url} is not supported by this filter"),
        ))
    }
}

/// Filter factories by type URL.
#[derive(Clone, Default)]
pub struct Registry {
    by_type: HashMap<&'static str, Arc<dyn FilterFactory>>,
    by_per_route_type: HashMap<&'static str, Arc<dyn FilterFactory>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.by_type.keys().collect();
        names.sort();
        f.debug_struct("Registry").field("types", &names).finish()
    }
}

/// Type URL of `envoy.config.route.v3.FilterConfig`, the per-route wrapper.
pub const FILTER_CONFIG_TYPE_URL: &str = "type.googleapis.com/envoy.config.route.v3.FilterConfig";

impl Registry {
    pub fn empty() -> Self {
        Registry::default()
    }

    /// A registry with all built-in filters.
    pub fn builtin() -> Self {
        let mut r = Registry::empty();
        crate::builtin::register_all(&mut r);
        r
    }

    /// Adds (or replaces) a factory.
    pub fn register(&mut self, factory: Arc<dyn FilterFactory>) {
        for url in factory.per_route_type_urls() {
            self.by_per_route_type.insert(url, factory.clone());
        }
        self.by_type.insert(factory.type_url(), factory);
    }

    pub fn knows(&self, type_url: &str) -> bool {
        self.by_type.contains_key(type_url)
    }

    /// Builds the filter `name` from its `typed_config`. An unknown type URL is an error; the
    /// caller skips the filter instead when `is_optional` is set.
    pub fn build(
        &self,
        name: &str,
        type_url: &str,
        value: &[u8],
        path: &str,
        cx: &BuildContext<'_>,
    ) -> Result<Arc<dyn HttpFilter>, FilterConfigError> {
        let Some(factory) = self.by_type.get(type_url) else {
            return Err(FilterConfigError::new(
                path,
                format!("filter '{name}': unsupported filter type {type_url}"),
            ));
        };
        factory.build(value, path, cx)
    }

    /// Parses one `typed_per_filter_config` value (`path` names it). Accepts the filter's own
    /// per-route type or an `envoy.config.route.v3.FilterConfig` wrapping it. As Envoy's
    /// `PerFilterConfigs`: a level that names a filter explicitly enables it
    /// (`disabled: Some(false)`) unless it disables it; `FilterConfig { disabled: true }` ignores
    /// its `config`; a `FilterConfig` with neither is an error; an empty `config` (no type) only
    /// enables. `Ok(None)`: an unknown optional (`is_optional: true`) config, ignored.
    pub fn build_per_route(
        &self,
        type_url: &str,
        value: &[u8],
        path: &str,
        cx: &BuildContext<'_>,
    ) -> Result<Option<PerRoute>, FilterConfigError> {
        let enabled = |mut p: PerRoute| {
            p.disabled = Some(p.disabled == Some(true));
            p
        };
        if type_url == FILTER_CONFIG_TYPE_URL || type_url == FilterConfig::type_url() {
            let FilterConfig {
                config,
                is_optional,
                disabled,
            } = FilterConfig::decode(value)
                .map_err(|e| FilterConfigError::new(path, e.to_string()))?;
            if disabled {
                return Ok(Some(PerRoute {
                    config: None,
                    disabled: Some(true),
                }));
            }
            let Some(any) = config else {
                return Err(FilterConfigError::new(
                    path,
                    "empty per-filter configuration: set config or disabled",
                ));
            };
            if any.type_url.is_empty() {
                return Ok(Some(PerRoute {
                    config: None,
                    disabled: Some(false),
                }));
            }
            let inner_path = format!("{path}.config");
            let Some(factory) = self.by_per_route_type.get(any.type_url.as_str()) else {
                if is_optional {
                    return Ok(None);
                }
                return Err(FilterConfigError::new(
                    inner_path,
                    format!("unsupported per-route filter config type {}", any.type_url),
                ));
            };
            return factory
                .build_per_route(&any.type_url, &any.value, &inner_path, cx)
                .map(|p| Some(enabled(p)));
        }
        let Some(factory) = self.by_per_route_type.get(type_url) else {
            return Err(FilterConfigError::new(
                path,
                format!("unsupported per-route filter config type {type_url}"),
            ));
        };
        factory
            .build_per_route(type_url, value, path, cx)
            .map(|p| Some(enabled(p)))
    }
}

/// Decodes a protobuf message, mapping the error to the config path.
pub(crate) fn decode<M: Message + Default>(
    value: &[u8],
    path: &str,
) -> Result<M, FilterConfigError> {
    M::decode(value).map_err(|e| {
        FilterConfigError::new(path, format!("invalid {}: {e}", std::any::type_name::<M>()))
    })
}

/// Wraps a per-route config value.
pub(crate) fn per_route<T: Any + Send + Sync>(value: T) -> PerRoute {
    PerRoute {
        config: Some(Arc::new(value)),
        disabled: None,
    }
}
