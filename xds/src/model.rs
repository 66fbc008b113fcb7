//! Strait's own immutable configuration model.
//!
//! Everything the data plane reads comes from here; nothing in this module knows protobuf.
//! Values are validated when built (see `translate`), so the data plane can trust them: a regex
//! here compiled, a weight here is non-zero, a header name here is a valid `http::HeaderName`.
//! Defaults are Envoy's and are applied during translation, never in the data plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode};
use regex::Regex;

// === Bootstrap ===

/// A whole validated configuration: what one `strait -c FILE` (or one xDS snapshot) produces.
#[derive(Debug, Clone, Default)]
pub struct Bootstrap {
    pub node: Node,
    pub admin: Option<Admin>,
    pub listeners: Vec<Arc<Listener>>,
    pub clusters: Vec<Arc<Cluster>>,
    /// The source configuration as canonical proto3 JSON, for `/config_dump`.
    pub dump: ConfigDump,
    /// `dynamic_resources`: where listeners and clusters come from over xDS.
    pub dynamic: Option<DynamicResources>,
    /// EDS clusters' endpoints by cluster name: the data plane applies them with
    /// `ClusterState::update_endpoints`, keeping hosts that stay.
    pub eds: std::collections::HashMap<String, Arc<LoadAssignment>>,
    /// xDS-delivered resources for `/config_dump`.
    pub dynamic_dump: Arc<DynamicDump>,
}

/// Source documents kept for `/config_dump`, rendered as canonical proto3 JSON (`@type` on
/// `Any`s) when asked for.
#[derive(Debug, Clone, Default)]
pub struct ConfigDump {
    /// The whole bootstrap.
    pub bootstrap: Option<Doc>,
    /// Each static listener by name.
    pub static_listeners: Vec<(String, Doc)>,
    /// Each static cluster by name.
    pub static_clusters: Vec<(String, Doc)>,
    /// Each inline route configuration, by listener name.
    pub static_route_configs: Vec<(String, Doc)>,
}

/// A document for `/config_dump`. Sources are kept encoded and rendered on demand: rendering
/// needs the descriptor pool, which a sidecar should not carry for a page it may never serve.
pub type Doc = Arc<dyn Render>;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    pub cluster: String,
    pub locality: Locality,
}

/// region / zone / sub_zone, as in `envoy.config.core.v3.Locality`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub address: SocketAddr,
}

// === Listeners ===

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// The single filter chain's HTTP connection manager.
    pub hcm: Arc<HttpConnectionManager>,
}

/// Which HTTP versions a listener speaks (`codec_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CodecType {
    /// HTTP/1.1, or HTTP/2 with prior knowledge (h2c), detected per connection.
    #[default]
    Auto,
    Http1,
    Http2,
}

/// `envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager`.
#[derive(Debug)]
pub struct HttpConnectionManager {
    pub stat_prefix: String,
    pub codec_type: CodecType,
    pub route_config: Arc<RouteConfig>,
    /// The HTTP filters before the router (the router is implicit and always last).
    pub http_filters: Vec<HttpFilter>,
    /// The same filters, built. A request clones the `Arc` when it starts and keeps it to its
    /// end, which pins it to this chain across reloads.
    pub filter_chain: Arc<strait_filters::FilterChain>,
    /// Default 5 minutes; `None` when configured as 0 (disabled).
    pub stream_idle_timeout: Option<Duration>,
    /// Default disabled.
    pub request_timeout: Option<Duration>,
    /// Default disabled.
    pub request_headers_timeout: Option<Duration>,
    /// Default 60.
    pub max_request_headers_kb: u32,
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    /// Default true.
    pub generate_request_id: bool,
    pub access_logs: Vec<AccessLog>,
    /// Upgrade types (lower-cased, e.g. "websocket") enabled on this connection manager.
    pub upgrade_types: Vec<UpgradeConfig>,
    /// The `server` response header (`server_name`, `server_header_transformation`).
    pub server_header: ServerHeader,
    /// The router's `suppress_envoy_headers` (default false): it then adds none of its
    /// `x-envoy-*` headers (`x-envoy-expected-rq-timeout-ms`, `x-envoy-original-path`,
    /// `x-envoy-upstream-service-time`).
    pub suppress_envoy_headers: bool,
}

/// What the connection manager does with the `server` header of every response, proxied or
/// local, after the filters (Envoy's `ActiveStream::encodeHeaders`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerHeader {
    /// `OVERWRITE`, Envoy's default, with `server_name` (default `envoy`).
    Overwrite(HeaderValue),
    /// `APPEND_IF_ABSENT`: set only when the response has none.
    AppendIfAbsent(HeaderValue),
    /// `PASS_THROUGH`: left as it is, absent or not.
    PassThrough,
}

impl ServerHeader {
    /// Envoy's default `server_name`.
    pub fn default_name() -> HeaderValue {
        HeaderValue::from_static("envoy")
    }
}

impl Default for ServerHeader {
    fn default() -> Self {
        ServerHeader::Overwrite(Self::default_name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeConfig {
    /// Lower-cased upgrade token, e.g. `websocket`.
    pub upgrade_type: String,
    /// Default true.
    pub enabled: bool,
}

/// One configured HTTP filter other than the router. Built by the filter registry.
#[derive(Debug, Clone)]
pub struct HttpFilter {
    pub name: String,
    pub type_url: String,
}

// === Access log ===

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    pub sink: AccessLogSink,
    pub format: LogFormat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogSink {
    Stdout,
    Stderr,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogFormat {
    /// A text line; Envoy's default format when the config names none.
    Text(Vec<FormatToken>),
    /// One JSON object per line, keys in configured order.
    Json(Vec<(String, JsonValueFormat)>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonValueFormat {
    /// A single operator alone in the string: rendered typed (numbers as numbers, `-` as null).
    Typed(FormatToken),
    /// Anything else: rendered as a string.
    Text(Vec<FormatToken>),
}

/// A parsed access-log command operator (`%…%`) or literal text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatToken {
    Literal(String),
    /// `%START_TIME%` (only the default format, `2016-04-15T20:17:00.310Z`).
    StartTime,
    /// `%REQ(A?B):N%`: request header A, else B, truncated to N chars.
    ReqHeader {
        primary: HeaderName,
        fallback: Option<HeaderName>,
        max_len: Option<usize>,
    },
    /// `%RESP(A?B):N%`.
    RespHeader {
        primary: HeaderName,
        fallback: Option<HeaderName>,
        max_len: Option<usize>,
    },
    /// `%TRAILER(A?B):N%` (response trailers).
    RespTrailer {
        primary: HeaderName,
        fallback: Option<HeaderName>,
        max_len: Option<usize>,
    },
    /// `%REQ(A?B):N%` when A or B is a pseudo-header (`:method`, `:path`, `:authority`,
    /// `:scheme`), which `HeaderName` cannot hold. Names are lower-cased; a name starting with
    /// `:` is the pseudo-header, any other is a regular request header. (The
    /// default format needs `%REQ(:METHOD)%` and `%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%`.)
    ReqHeaderOrPseudo {
        primary: String,
        fallback: Option<String>,
        max_len: Option<usize>,
    },
    /// `%REQ(:METHOD)%` etc. are ReqHeaderOrPseudo (see above).
    Protocol,
    ResponseCode,
    ResponseCodeDetails,
    ResponseFlags,
    BytesReceived,
    BytesSent,
    Duration,
    RequestDuration,
    ResponseDuration,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    UpstreamTransportFailureReason,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamDirectRemoteAddress,
    DownstreamDirectRemoteAddressWithoutPort,
    DownstreamLocalAddress,
    DownstreamLocalAddressWithoutPort,
    RouteName,
    Hostname,
}

// === Routes ===

#[derive(Debug, Default)]
pub struct RouteConfig {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    pub headers: HeaderMutations,
    /// Derived on first use: see [`RouteConfig::matches_on_headers`].
    pub header_matchers: std::sync::OnceLock<bool>,
}

impl RouteConfig {
    /// Whether some route matches on request headers (then every header the connection
    /// manager adds must be in the request before a route is picked).
    pub fn matches_on_headers(&self) -> bool {
        *self.header_matchers.get_or_init(|| {
            self.virtual_hosts
                .iter()
                .flat_map(|vh| &vh.routes)
                .any(|r| !r.matcher.headers.is_empty())
        })
    }
}

/// Request/response header additions and removals at one level (route config, vhost, route,
/// weighted cluster).
#[derive(Debug, Default, Clone)]
pub struct HeaderMutations {
    pub request_headers_to_add: Vec<HeaderValueOption>,
    pub request_headers_to_remove: Vec<HeaderName>,
    pub response_headers_to_add: Vec<HeaderValueOption>,
    pub response_headers_to_remove: Vec<HeaderName>,
}

impl HeaderMutations {
    pub fn is_empty(&self) -> bool {
        self.request_headers_to_add.is_empty()
            && self.request_headers_to_remove.is_empty()
            && self.response_headers_to_add.is_empty()
            && self.response_headers_to_remove.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct HeaderValueOption {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub append_action: AppendAction,
    /// Default false: an empty value means "do not add".
    pub keep_empty_value: bool,
}

/// `envoy.config.core.v3.HeaderValueOption.HeaderAppendAction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AppendAction {
    #[default]
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub domains: Vec<DomainMatcher>,
    pub routes: Vec<Route>,
    pub headers: HeaderMutations,
    /// Used by routes that have no retry policy of their own.
    pub retry_policy: Option<RetryPolicy>,
}

/// One entry of `virtual_hosts[].domains`. Envoy's search order: exact, then the longest
/// suffix wildcard, then the longest prefix wildcard, then `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainMatcher {
    /// Lower-cased exact host (a port, if given, is part of it).
    Exact(String),
    /// `*.example.com` / `*-bar.example.com`: stores the lower-cased part after `*`.
    Suffix(String),
    /// `example.*`: stores the lower-cased part before `*`.
    Prefix(String),
    /// `*`.
    Any,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    pub action: RouteAction,
    pub headers: HeaderMutations,
    /// What HTTP filters see of this route: name, target cluster, `metadata`, and the
    /// per-filter configs of every level. Handed to each request's filter context.
    pub filter_route: Arc<strait_filters::RouteEntry>,
}

#[derive(Debug)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// Default true; applies to prefix / path / path_separated_prefix.
    pub case_sensitive: bool,
    pub headers: Vec<HeaderMatcher>,
    pub query_parameters: Vec<QueryParameterMatcher>,
}

#[derive(Debug)]
pub enum PathMatch {
    Prefix(String),
    Path(String),
    /// Matches the whole path (without the query string), like RE2 FullMatch.
    Regex(Regex),
    /// `path_separated_prefix`: the prefix followed by end, `/`, `?` or `#`.
    PathSeparatedPrefix(String),
}

#[derive(Debug, Clone)]
pub struct HeaderMatcher {
    /// Lower-cased; may be a pseudo-header such as `:method` or `:authority`.
    pub name: String,
    pub spec: HeaderMatchSpec,
    pub invert: bool,
}

#[derive(Debug, Clone)]
pub enum HeaderMatchSpec {
    /// `present_match`: true matches when present, false when absent.
    Present(bool),
    StringMatch(StringMatcher),
}

#[derive(Debug)]
pub struct QueryParameterMatcher {
    pub name: String,
    pub spec: QueryParameterSpec,
}

#[derive(Debug)]
pub enum QueryParameterSpec {
    Present,
    StringMatch(StringMatcher),
}

/// `envoy.type.matcher.v3.StringMatcher`.
#[derive(Debug, Clone)]
pub struct StringMatcher {
    pub pattern: StringPattern,
    pub ignore_case: bool,
}

#[derive(Debug, Clone)]
pub enum StringPattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    /// Full match, like RE2 FullMatch.
    Regex(Regex),
}

impl StringMatcher {
    pub fn matches(&self, value: &str) -> bool {
        match &self.pattern {
            StringPattern::Exact(p) => {
                if self.ignore_case {
                    value.eq_ignore_ascii_case(p)
                } else {
                    value == p
                }
            }
            StringPattern::Prefix(p) => {
                if self.ignore_case {
                    value.len() >= p.len()
                        && value.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
                } else {
                    value.starts_with(p.as_str())
                }
            }
            StringPattern::Suffix(p) => {
                if self.ignore_case {
                    value.len() >= p.len()
                        && value.as_bytes()[value.len() - p.len()..]
                            .eq_ignore_ascii_case(p.as_bytes())
                } else {
                    value.ends_with(p.as_str())
                }
            }
            StringPattern::Contains(p) => {
                if self.ignore_case {
                    // Translation stores `p` lower-cased when ignore_case is set.
                    value.to_ascii_lowercase().contains(p.as_str())
                } else {
                    value.contains(p.as_str())
                }
            }
            StringPattern::Regex(r) => r.is_match(value),
        }
    }
}

// Route actions are built once per config and read per request: keeping the forward action
// inline saves a pointer chase on the request path; the size only costs config memory.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum RouteAction {
    Forward(ForwardAction),
    DirectResponse {
        status: StatusCode,
        body: Option<bytes::Bytes>,
    },
    Redirect(Redirect),
}

#[derive(Debug)]
pub struct ForwardAction {
    pub cluster: ClusterSpecifier,
    pub prefix_rewrite: Option<String>,
    /// (pattern, substitution) — substitution uses `\1`-style groups as in Envoy (RE2).
    pub regex_rewrite: Option<(Regex, String)>,
    pub host_rewrite: HostRewrite,
    /// Default 15 s; `None` when configured as 0 (disabled).
    pub timeout: Option<Duration>,
    /// Default: none.
    pub idle_timeout: Option<Duration>,
    /// Route's own policy, else the virtual host's (resolved during translation).
    pub retry_policy: Option<RetryPolicy>,
    /// Route-level `upgrade_configs` overrides (lower-cased type, enabled).
    pub upgrade_overrides: Vec<UpgradeConfig>,
    /// `priority`: which circuit-breaker set the route's requests count against.
    pub priority: RoutingPriority,
    /// `hash_policy`: how RING_HASH / MAGLEV clusters hash the request.
    pub hash_policy: Vec<HashPolicy>,
}

/// One `RouteAction.hash_policy` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashPolicy {
    pub source: HashSource,
    /// Stop at this policy when it produced a hash.
    pub terminal: bool,
}

/// What a hash policy hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashSource {
    /// A request header (lower-cased; `:authority`, `:path`, `:method`, `:scheme` allowed).
    Header(String),
    /// A cookie's value (no cookie generation: `ttl` is rejected).
    Cookie(String),
    /// `connection_properties.source_ip`: the downstream peer's IP.
    SourceIp,
    /// The first value of a query parameter.
    QueryParameter(String),
}

/// `envoy.config.core.v3.RoutingPriority`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RoutingPriority {
    #[default]
    Default,
    High,
}

#[derive(Debug)]
pub enum ClusterSpecifier {
    Cluster(String),
    Weighted(WeightedClusters),
    /// `cluster_header`: the cluster is named by this request header.
    Header(HeaderName),
}

#[derive(Debug)]
pub struct WeightedClusters {
    pub clusters: Vec<WeightedCluster>,
    /// Sum of the weights (> 0).
    pub total_weight: u32,
}

#[derive(Debug)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
    pub headers: HeaderMutations,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostRewrite {
    None,
    Literal(String),
    /// `auto_host_rewrite`: the upstream host's hostname (STRICT_DNS) or address.
    Auto,
}

#[derive(Debug)]
pub struct Redirect {
    /// Default: the request's scheme.
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: RedirectPath,
    /// Default 301.
    pub status: StatusCode,
    pub strip_query: bool,
}

#[derive(Debug)]
pub enum RedirectPath {
    Keep,
    Path(String),
    Prefix(String),
    Regex(Regex, String),
}

/// `envoy.config.route.v3.RetryPolicy`.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    /// Default 1.
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    /// Default base 25 ms, max 10 × base.
    pub back_off_base: Duration,
    pub back_off_max: Duration,
    /// `retriable_headers`: a response matching any of these is retried (`retriable-headers`).
    pub retriable_headers: Vec<HeaderMatcher>,
    /// `retry_host_predicate` `envoy.retry_host_predicates.previous_hosts`.
    pub previous_hosts: bool,
    /// Default 1: how many times host selection may be redone to satisfy the predicate.
    pub host_selection_retry_max_attempts: u32,
    /// `retry_priority` `envoy.retry_priorities.previous_priorities`: its `update_frequency`.
    pub previous_priorities: Option<u32>,
}

/// Retry conditions as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryOn(pub u32);

impl RetryOn {
    pub const FIVE_XX: u32 = 1 << 0;
    pub const GATEWAY_ERROR: u32 = 1 << 1;
    pub const RESET: u32 = 1 << 2;
    pub const CONNECT_FAILURE: u32 = 1 << 3;
    pub const RETRIABLE_STATUS_CODES: u32 = 1 << 4;
    pub const REFUSED_STREAM: u32 = 1 << 5;
    pub const RETRIABLE_4XX: u32 = 1 << 6;
    pub const RETRIABLE_HEADERS: u32 = 1 << 7;
    /// gRPC conditions, matched on `grpc-status` in response headers (trailers-only replies).
    pub const GRPC_CANCELLED: u32 = 1 << 8;
    pub const GRPC_DEADLINE_EXCEEDED: u32 = 1 << 9;
    pub const GRPC_INTERNAL: u32 = 1 << 10;
    pub const GRPC_RESOURCE_EXHAUSTED: u32 = 1 << 11;
    pub const GRPC_UNAVAILABLE: u32 = 1 << 12;

    pub fn has(self, flag: u32) -> bool {
        self.0 & flag != 0
    }

    /// Parses one comma-separated `retry_on` value; `None` names the unknown token.
    pub fn parse(s: &str) -> Result<RetryOn, String> {
        let mut bits = 0;
        for tok in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            bits |= match tok {
                "5xx" => Self::FIVE_XX,
                "gateway-error" => Self::GATEWAY_ERROR,
                "reset" => Self::RESET,
                "connect-failure" => Self::CONNECT_FAILURE,
                "retriable-status-codes" => Self::RETRIABLE_STATUS_CODES,
                "refused-stream" => Self::REFUSED_STREAM,
                "retriable-4xx" => Self::RETRIABLE_4XX,
                "retriable-headers" => Self::RETRIABLE_HEADERS,
                "cancelled" => Self::GRPC_CANCELLED,
                "deadline-exceeded" => Self::GRPC_DEADLINE_EXCEEDED,
                "internal" => Self::GRPC_INTERNAL,
                "resource-exhausted" => Self::GRPC_RESOURCE_EXHAUSTED,
                "unavailable" => Self::GRPC_UNAVAILABLE,
                other => return Err(other.to_string()),
            };
        }
        Ok(RetryOn(bits))
    }
}

// === Clusters ===

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub discovery: DiscoveryType,
    /// Default 5 s.
    pub connect_timeout: Duration,
    pub lb_policy: LbPolicy,
    pub load_assignment: LoadAssignment,
    pub protocol: UpstreamProtocol,
    pub circuit_breakers: Thresholds,
    /// `common_http_protocol_options.idle_timeout`; default 1 h.
    pub idle_timeout: Option<Duration>,
    /// STRICT_DNS refresh; default 5 s.
    pub dns_refresh_rate: Duration,
    pub dns_lookup_family: DnsLookupFamily,
    /// Load-balancer settings beyond the policy.
    pub lb: LbConfig,
    /// Active health checks (`health_checks`); empty when none.
    pub health_checks: Vec<HealthCheck>,
    /// `outlier_detection`; `None` when not configured (no passive ejection).
    pub outlier_detection: Option<OutlierDetection>,
    /// Circuit-breaker thresholds for the HIGH routing priority.
    pub circuit_breakers_high: Thresholds,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryType {
    Static,
    StrictDns,
    /// Endpoints come from EDS (`Bootstrap::eds`), not from `load_assignment`.
    Eds,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DnsLookupFamily {
    #[default]
    Auto,
    V4Only,
    V6Only,
    V4Preferred,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LbPolicy {
    RoundRobin,
    /// P2C by default (`choice_count` 2).
    LeastRequest {
        choice_count: u32,
    },
    Random,
    /// `RING_HASH`: ring of `minimum_ring_size` (default 1024) to `maximum_ring_size` (default
    /// 8M) entries, xxHash64.
    RingHash {
        min_ring_size: u64,
        max_ring_size: u64,
    },
    /// `MAGLEV`: a lookup table of `table_size` slots (prime; default 65537).
    Maglev {
        table_size: u64,
    },
}

impl LbPolicy {
    /// Whether the policy picks by the request's hash (route `hash_policy`).
    pub fn is_hashing(&self) -> bool {
        matches!(self, LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. })
    }
}

/// `common_lb_config` and policy-specific settings, Envoy's defaults applied, plus what
/// zone-aware routing needs from the bootstrap.
#[derive(Debug, Clone, PartialEq)]
pub struct LbConfig {
    /// `healthy_panic_threshold`, rounded to an integer percent; default 50, 0 disables panic.
    pub healthy_panic_threshold: u32,
    /// `locality_weighted_lb_config` is set.
    pub locality_weighted: bool,
    /// `zone_aware_lb_config` (only used when the bootstrap names a local cluster).
    pub zone_aware: ZoneAware,
    /// In panic, send no traffic instead of spreading it over all hosts. Envoy's
    /// `zone_aware_lb_config.fail_traffic_on_panic`; for locality-weighted clusters (where Envoy
    /// cannot express it, envoyproxy/envoy#33926) Strait reads it from cluster metadata
    /// `filter_metadata["strait.lb"].fail_traffic_on_panic`.
    pub fail_traffic_on_panic: bool,
    /// `least_request_lb_config.active_request_bias`; default 1.0.
    pub active_request_bias: f64,
    /// `consistent_hashing_lb_config.hash_balance_factor` (>= 100) for bounded loads.
    pub hash_balance_factor: Option<u32>,
    /// `cluster_manager.local_cluster_name` of the bootstrap, for zone-aware routing.
    pub local_cluster_name: Option<String>,
    /// `node.locality` of the bootstrap: the locality Strait runs in.
    pub local_locality: Locality,
    /// `common_lb_config.ignore_new_hosts_until_first_hc`: hosts an EDS / DNS update adds to
    /// an actively checked cluster are excluded (`/pending_active_hc`) until their first check.
    pub ignore_new_hosts_until_first_hc: bool,
}

impl Default for LbConfig {
    fn default() -> Self {
        LbConfig {
            healthy_panic_threshold: 50,
            locality_weighted: false,
            zone_aware: ZoneAware::default(),
            fail_traffic_on_panic: false,
            active_request_bias: 1.0,
            hash_balance_factor: None,
            local_cluster_name: None,
            local_locality: Locality::default(),
            ignore_new_hosts_until_first_hc: false,
        }
    }
}

/// `common_lb_config.zone_aware_lb_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZoneAware {
    /// `routing_enabled` percent; default 100.
    pub routing_enabled: u32,
    /// `min_cluster_size`; default 6.
    pub min_cluster_size: u64,
    /// `force_locality_direct_routing`; default false.
    pub force_locality_direct_routing: bool,
}

impl Default for ZoneAware {
    fn default() -> Self {
        ZoneAware {
            routing_enabled: 100,
            min_cluster_size: 6,
            force_locality_direct_routing: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    /// `explicit_http_config.http2_protocol_options`.
    Http2 {
        max_concurrent_streams: u32,
    },
}

/// Circuit-breaker thresholds for the DEFAULT routing priority (Envoy's defaults 1024/1024/1024/3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
    /// `retry_budget`: when set, it replaces `max_retries`.
    pub retry_budget: Option<RetryBudget>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            retry_budget: None,
        }
    }
}

/// `circuit_breakers.thresholds[].retry_budget`: active retries may be at most `budget_percent`
/// of active requests plus pending requests, but always at least `min_retry_concurrency`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    /// Default 20.0 (percent).
    pub budget_percent: f64,
    /// Default 3.
    pub min_retry_concurrency: u32,
}

// Translation rejects NaN, so equality is total here.
impl Eq for RetryBudget {}

// === Health checking and outlier detection ===

/// `envoy.config.core.v3.HealthCheck` (one entry of `cluster.health_checks`).
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub timeout: Duration,
    pub interval: Duration,
    /// Default 0: a random wait before the first check of a host, up to this.
    pub initial_jitter: Duration,
    /// Added to each interval: uniform in [0, interval_jitter).
    pub interval_jitter: Duration,
    /// Added to each interval: uniform in [0, interval × percent / 100).
    pub interval_jitter_percent: u32,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    /// Default 60 s: the interval while the cluster has seen no traffic.
    pub no_traffic_interval: Duration,
    /// Default `no_traffic_interval`: the no-traffic interval for a healthy host.
    pub no_traffic_healthy_interval: Duration,
    /// Default `interval`: the interval while a host is unhealthy.
    pub unhealthy_interval: Duration,
    /// Default `unhealthy_interval`: the wait after a host turns unhealthy.
    pub unhealthy_edge_interval: Duration,
    /// Default `interval`: the wait after a host turns healthy.
    pub healthy_edge_interval: Duration,
    /// Default true: keep the checking connection between checks.
    pub reuse_connection: bool,
    pub kind: HealthCheckKind,
}

#[derive(Debug, Clone)]
pub enum HealthCheckKind {
    Http(HttpHealthCheck),
    Tcp(TcpHealthCheck),
    Grpc(GrpcHealthCheck),
}

/// `HealthCheck.HttpHealthCheck`.
#[derive(Debug, Clone)]
pub struct HttpHealthCheck {
    /// Default: the cluster name.
    pub host: Option<String>,
    pub path: String,
    /// Half-open ranges [start, end); default [200, 201).
    pub expected_statuses: Vec<(u16, u16)>,
    /// Statuses that count as failures without immediately marking the host unhealthy.
    pub retriable_statuses: Vec<(u16, u16)>,
    /// `codec_client_type: HTTP2`.
    pub http2: bool,
    pub request_headers_to_add: Vec<(HeaderName, HeaderValue)>,
    pub request_headers_to_remove: Vec<HeaderName>,
    /// `service_name_matcher`: when set, a passing answer must also carry an
    /// `x-envoy-upstream-healthchecked-cluster` header it matches (`health_check.verify_cluster`).
    pub service_name_matcher: Option<StringMatcher>,
}

/// `HealthCheck.TcpHealthCheck`: connect, optionally send a payload and expect every `receive`
/// block in the reply (in any order, as Envoy's fuzzy matching does).
#[derive(Debug, Clone, Default)]
pub struct TcpHealthCheck {
    pub send: Option<bytes::Bytes>,
    pub receive: Vec<bytes::Bytes>,
}

/// `HealthCheck.GrpcHealthCheck`: `grpc.health.v1.Health/Check`.
#[derive(Debug, Clone, Default)]
pub struct GrpcHealthCheck {
    pub service_name: String,
    /// Default: the cluster name.
    pub authority: Option<String>,
}

/// `envoy.config.cluster.v3.OutlierDetection`, Envoy's defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierDetection {
    /// Default 5.
    pub consecutive_5xx: u32,
    /// Default 10 s.
    pub interval: Duration,
    /// Default 30 s.
    pub base_ejection_time: Duration,
    /// Default 300 s.
    pub max_ejection_time: Duration,
    /// Default 0.
    pub max_ejection_time_jitter: Duration,
    /// Default 10.
    pub max_ejection_percent: u32,
    /// Default 100.
    pub enforcing_consecutive_5xx: u32,
    /// Default 100.
    pub enforcing_success_rate: u32,
    /// Default 5.
    pub success_rate_minimum_hosts: u32,
    /// Default 100.
    pub success_rate_request_volume: u32,
    /// Default 1900 (1.9 standard deviations).
    pub success_rate_stdev_factor: u32,
    /// Default 5.
    pub consecutive_gateway_failure: u32,
    /// Default 0.
    pub enforcing_consecutive_gateway_failure: u32,
    /// Default false.
    pub split_external_local_origin_errors: bool,
    /// Default 5.
    pub consecutive_local_origin_failure: u32,
    /// Default 100.
    pub enforcing_consecutive_local_origin_failure: u32,
    /// Default 100.
    pub enforcing_local_origin_success_rate: u32,
    /// Default 85.
    pub failure_percentage_threshold: u32,
    /// Default 0.
    pub enforcing_failure_percentage: u32,
    /// Default 0.
    pub enforcing_failure_percentage_local_origin: u32,
    /// Default 5.
    pub failure_percentage_minimum_hosts: u32,
    /// Default 50.
    pub failure_percentage_request_volume: u32,
    /// Default true.
    pub successful_active_health_check_uneject_host: bool,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_time_jitter: Duration::ZERO,
            max_ejection_percent: 10,
            enforcing_consecutive_5xx: 100,
            enforcing_success_rate: 100,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1900,
            consecutive_gateway_failure: 5,
            enforcing_consecutive_gateway_failure: 0,
            split_external_local_origin_errors: false,
            consecutive_local_origin_failure: 5,
            enforcing_consecutive_local_origin_failure: 100,
            enforcing_local_origin_success_rate: 100,
            failure_percentage_threshold: 85,
            enforcing_failure_percentage: 0,
            enforcing_failure_percentage_local_origin: 0,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
            successful_active_health_check_uneject_host: true,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadAssignment {
    pub endpoints: Vec<LocalityLbEndpoints>,
    /// `policy` of the ClusterLoadAssignment.
    pub policy: AssignmentPolicy,
}

/// `ClusterLoadAssignment.Policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignmentPolicy {
    /// `overprovisioning_factor` in percent; default 140.
    pub overprovisioning_factor: u32,
    /// `weighted_priority_health`: priority health counts host weights, not hosts.
    pub weighted_priority_health: bool,
}

impl Default for AssignmentPolicy {
    fn default() -> Self {
        AssignmentPolicy {
            overprovisioning_factor: 140,
            weighted_priority_health: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LocalityLbEndpoints {
    pub locality: Locality,
    /// Default 0.
    pub priority: u32,
    /// Locality weight; `None` when unset.
    pub load_balancing_weight: Option<u32>,
    pub lb_endpoints: Vec<LbEndpoint>,
}

#[derive(Debug, Clone)]
pub struct LbEndpoint {
    pub address: EndpointAddress,
    /// Default 1.
    pub load_balancing_weight: u32,
    pub health_status: HealthStatus,
    /// `endpoint.hostname`, used by auto_host_rewrite when set.
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddress {
    /// STATIC: an IP address.
    Ip(SocketAddr),
    /// STRICT_DNS: resolved by the cluster.
    Dns { host: String, port: u16 },
}

/// `envoy.config.core.v3.HealthStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HealthStatus {
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
    Draining,
    Timeout,
    Degraded,
}

// === Dynamic resources (xDS) ===

/// `dynamic_resources` of the bootstrap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicResources {
    /// `ads_config`, when any source says `ads: {}`.
    pub ads: Option<AdsSource>,
    pub lds: Option<ConfigSource>,
    pub cds: Option<ConfigSource>,
}

/// `ads_config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdsSource {
    /// `api_type: DELTA_GRPC` (else GRPC, state of the world).
    pub delta: bool,
    /// `grpc_services[].envoy_grpc.cluster_name`, in failover order; each a static cluster.
    pub clusters: Vec<String>,
}

/// An `envoy.config.core.v3.ConfigSource`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSource {
    pub kind: ConfigSourceKind,
    /// Default 15 s; `None` when configured as 0 (wait forever).
    pub initial_fetch_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConfigSourceKind {
    /// `ads: {}`.
    Ads,
    /// `path_config_source`: a file holding a DiscoveryResponse, replaced by atomic rename.
    Path {
        path: PathBuf,
        watched_directory: Option<PathBuf>,
    },
}

/// Renders a resource as canonical proto3 JSON on demand, so `/config_dump` costs nothing
/// until asked for (the model does not know protobuf; `strait-xds` implements this).
pub trait Render: std::fmt::Debug + Send + Sync {
    fn render(&self) -> serde_json::Value;
}

/// An already-rendered document.
impl Render for serde_json::Value {
    fn render(&self) -> serde_json::Value {
        self.clone()
    }
}

/// Where a dynamic resource came from (Strait-specific `strait_source` in `/config_dump`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceSource {
    ControlPlane,
    /// The last-known-good store (`--xds-state-dir`), not yet confirmed by a control plane.
    Store,
    /// A `path_config_source` file.
    File,
}

impl ResourceSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceSource::ControlPlane => "control_plane",
            ResourceSource::Store => "store",
            ResourceSource::File => "file",
        }
    }
}

/// One dynamic resource as `/config_dump` shows it.
#[derive(Debug, Clone)]
pub struct DynamicEntry {
    pub name: String,
    pub version_info: String,
    pub last_updated: std::time::SystemTime,
    pub source: ResourceSource,
    /// Accepted but waiting for its routes / endpoints (make-before-break).
    pub warming: bool,
    pub body: Arc<dyn Render>,
}

/// The dynamic part of `/config_dump`.
#[derive(Debug, Clone, Default)]
pub struct DynamicDump {
    pub listeners: Vec<DynamicEntry>,
    pub clusters: Vec<DynamicEntry>,
    pub route_configs: Vec<DynamicEntry>,
    pub endpoint_configs: Vec<DynamicEntry>,
    /// Last accepted `version_info` of LDS and CDS.
    pub lds_version: String,
    pub cds_version: String,
}
