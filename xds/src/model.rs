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
}

/// Source documents kept for `/config_dump` (canonical proto3 JSON, `@type` on `Any`s).
#[derive(Debug, Clone, Default)]
pub struct ConfigDump {
    /// The whole bootstrap.
    pub bootstrap: serde_json::Value,
    /// Each static listener by name.
    pub static_listeners: Vec<(String, serde_json::Value)>,
    /// Each static cluster by name.
    pub static_clusters: Vec<(String, serde_json::Value)>,
    /// Each inline route configuration, by listener name.
    pub static_route_configs: Vec<(String, serde_json::Value)>,
}

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

#[derive(Debug, Clone)]
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

#[derive(Debug, Clone)]
pub enum LogFormat {
    /// A text line; Envoy's default format when the config names none.
    Text(Vec<FormatToken>),
    /// One JSON object per line, keys in configured order.
    Json(Vec<(String, JsonValueFormat)>),
}

#[derive(Debug, Clone)]
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
    /// `:` is the pseudo-header, any other is a regular request header. (Added by helper A: the
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

#[derive(Debug)]
pub struct HeaderMatcher {
    /// Lower-cased; may be a pseudo-header such as `:method` or `:authority`.
    pub name: String,
    pub spec: HeaderMatchSpec,
    pub invert: bool,
}

#[derive(Debug)]
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
#[derive(Debug)]
pub struct StringMatcher {
    pub pattern: StringPattern,
    pub ignore_case: bool,
}

#[derive(Debug)]
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscoveryType {
    Static,
    StrictDns,
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
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadAssignment {
    pub endpoints: Vec<LocalityLbEndpoints>,
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
