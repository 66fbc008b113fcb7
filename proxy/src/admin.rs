//! The admin server on `admin.address`: `/ready`, `/server_info`, `/config_dump`, `/clusters`,
//! `/stats`, `/stats/prometheus`, `POST /quitquitquit`, with Envoy's paths and output shapes.
//! It reads the data plane through [`AdminSource`] and never blocks a worker.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use regex::Regex;
use serde_json::{json, Map, Value};
use strait_xds::model;
use tokio::net::TcpListener;

use crate::stats::{HostStats, StatValue, Store};

/// Lifecycle state, as `/ready` and `/server_info` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Config not loaded yet: `/ready` answers 503 `PRE_INITIALIZING`/`INITIALIZING`.
    Initializing,
    /// `/ready` answers 200 `LIVE`.
    Live,
    /// Shutting down: `/ready` answers 503 `DRAINING`.
    Draining,
}

/// What the admin server needs from the running proxy.
pub trait AdminSource: Send + Sync + 'static {
    fn state(&self) -> ServerState;
    fn stats(&self) -> &Store;
    /// The active configuration.
    fn config(&self) -> Arc<model::Bootstrap>;
    /// Every active listener's name and bound address (`/listeners`).
    fn listeners(&self) -> Vec<(String, SocketAddr)>;
    /// Every cluster with its current hosts.
    fn clusters(&self) -> Vec<ClusterView>;
    /// When the process started (for `/server_info` uptime).
    fn start_time(&self) -> SystemTime;
    /// Command-line options as `/server_info` shows them (`command_line_options`).
    fn command_line_options(&self) -> serde_json::Value;
    /// Starts a graceful shutdown (`POST /quitquitquit`). Returns at once.
    fn begin_shutdown(&self);
}

/// A cluster as `/clusters` prints it.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub config: Arc<model::Cluster>,
    pub hosts: Vec<HostView>,
    /// With outlier detection: success-rate average and ejection threshold, external then
    /// local origin (`-1` when not computed), as Envoy's `NAME::outlier::*` lines.
    pub outlier: Option<[f64; 4]>,
}

/// A host as `/clusters` prints it.
#[derive(Debug, Clone)]
pub struct HostView {
    pub address: SocketAddr,
    pub hostname: String,
    pub locality: model::Locality,
    pub priority: u32,
    pub weight: u32,
    /// Envoy's `health_flags` value: `healthy`, or flags such as `/failed_eds_health`.
    pub health_flags: String,
    pub stats: Arc<HostStats>,
    /// The outlier detector's last success rates (percent), `-1` when not computed.
    pub success_rate: f64,
    pub local_origin_success_rate: f64,
}

// === Server ===

type Body = Full<Bytes>;

/// Serves the admin API on `listener` until the task is aborted. One task per connection;
/// every handler only reads snapshots and atomics, so none of them blocks.
pub async fn serve(listener: TcpListener, source: Arc<dyn AdminSource>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning on the error.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let source = source.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let res = handle(source.as_ref(), &req);
                async move { Ok::<_, Infallible>(res) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

const ENDPOINTS: &[(&str, &str)] = &[
    ("/", "this list"),
    ("/clusters", "upstream cluster status (?format=json)"),
    ("/config_dump", "the active configuration"),
    ("/listeners", "listener names and addresses (?format=json)"),
    ("/quitquitquit", "POST: drain and exit"),
    ("/ready", "LIVE when serving"),
    ("/server_info", "version, state, uptime, node, command line"),
    (
        "/stats",
        "stats (?filter=REGEX, ?usedonly, ?format=json|prometheus)",
    ),
    ("/stats/prometheus", "stats in Prometheus text format"),
];

fn handle<B>(source: &dyn AdminSource, req: &Request<B>) -> Response<Body> {
    let query = Query::parse(req.uri().query().unwrap_or(""));
    match req.uri().path() {
        "/quitquitquit" => {
            if req.method() != Method::POST {
                // Envoy refuses state-changing endpoints on anything but POST.
                return text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("Method {} not allowed, POST required.", req.method()),
                );
            }
            source.begin_shutdown();
            text(StatusCode::OK, "OK\n".into())
        }
        "/ready" => match source.state() {
            ServerState::Live => text(StatusCode::OK, "LIVE\n".into()),
            s => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{}\n", state_name(s)),
            ),
        },
        "/server_info" => json(&server_info(source)),
        "/config_dump" => json(&config_dump(source, req.uri().query().unwrap_or(""))),
        "/clusters" if query.format() == Some("json") => json(&clusters_json(source)),
        "/clusters" => text(StatusCode::OK, clusters_text(source)),
        "/listeners" if query.format() == Some("json") => json(&listeners_json(source)),
        "/listeners" => {
            let mut out = String::new();
            for (name, addr) in source.listeners() {
                let _ = writeln!(out, "{name}::{addr}");
            }
            text(StatusCode::OK, out)
        }
        "/stats" | "/stats/prometheus" => {
            let filter = match query.get("filter").filter(|f| !f.is_empty()) {
                Some(f) => match Regex::new(&f) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        return text(StatusCode::BAD_REQUEST, format!("Invalid regex: {e}\n"))
                    }
                },
                None => None,
            };
            let used_only = query.has("usedonly");
            let stats: Vec<(String, StatValue)> = source
                .stats()
                .all()
                .into_iter()
                .filter(|(name, v)| {
                    (!used_only || is_used(*v)) && filter.as_ref().is_none_or(|r| r.is_match(name))
                })
                .collect();
            let prometheus =
                req.uri().path() == "/stats/prometheus" || query.format() == Some("prometheus");
            if prometheus {
                let mut res = text(StatusCode::OK, prometheus_text(&stats));
                res.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=UTF-8"),
                );
                res
            } else if query.format() == Some("json") {
                let list: Vec<Value> = stats
                    .iter()
                    .map(|(name, v)| json!({"name": name, "value": stat_json(*v)}))
                    .collect();
                json(&json!({ "stats": list }))
            } else {
                let mut out = String::with_capacity(stats.len() * 48);
                for (name, v) in &stats {
                    let _ = writeln!(out, "{name}: {}", stat_json(*v));
                }
                text(StatusCode::OK, out)
            }
        }
        "/" => {
            let mut out = String::from("admin commands are:\n");
            for (path, help) in ENDPOINTS {
                let _ = writeln!(out, "  {path}: {help}");
            }
            text(StatusCode::OK, out)
        }
        _ => {
            let mut out = String::from("invalid path. admin commands are:\n");
            for (path, help) in ENDPOINTS {
                let _ = writeln!(out, "  {path}: {help}");
            }
            text(StatusCode::NOT_FOUND, out)
        }
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Envoy's admin headers: never cache, never sniff.
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("no-cache, max-age=0"),
    );
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    res
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    respond(status, "text/plain; charset=UTF-8", body)
}

fn json(v: &Value) -> Response<Body> {
    let mut body = serde_json::to_string_pretty(v).unwrap_or_else(|_| "{}".into());
    body.push('\n');
    respond(StatusCode::OK, "application/json", body)
}

// === Query strings ===

/// Admin query parameters, percent-decoded (`?filter=` carries a regex).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: &str) -> Query {
        Query(
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }

    fn format(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == "format")
            .map(|(_, v)| v.as_str())
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// === Handlers ===

fn state_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Initializing => "PRE_INITIALIZING",
        ServerState::Live => "LIVE",
        ServerState::Draining => "DRAINING",
    }
}

fn is_used(v: StatValue) -> bool {
    match v {
        StatValue::Counter(c) => c > 0,
        StatValue::Gauge(g) => g != 0,
    }
}

fn stat_json(v: StatValue) -> Value {
    match v {
        StatValue::Counter(c) => json!(c),
        StatValue::Gauge(g) => json!(g),
    }
}

fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn node_json(node: &model::Node) -> Value {
    // proto3 JSON leaves out empty fields, as Envoy's output does.
    let mut m = Map::new();
    if !node.id.is_empty() {
        m.insert("id".into(), json!(node.id));
    }
    if !node.cluster.is_empty() {
        m.insert("cluster".into(), json!(node.cluster));
    }
    let l = &node.locality;
    let mut loc = Map::new();
    for (k, v) in [
        ("region", &l.region),
        ("zone", &l.zone),
        ("sub_zone", &l.sub_zone),
    ] {
        if !v.is_empty() {
            loc.insert(k.into(), json!(v));
        }
    }
    if !loc.is_empty() {
        m.insert("locality".into(), Value::Object(loc));
    }
    Value::Object(m)
}

fn server_info(source: &dyn AdminSource) -> Value {
    let uptime = SystemTime::now()
        .duration_since(source.start_time())
        .unwrap_or_default()
        .as_secs();
    json!({
        "version": concat!("strait/", env!("CARGO_PKG_VERSION")),
        "state": state_name(source.state()),
        "hot_restart_version": "disabled",
        "command_line_options": source.command_line_options(),
        "node": node_json(&source.config().node),
        "uptime_current_epoch": format!("{uptime}s"),
        "uptime_all_epochs": format!("{uptime}s"),
    })
}

/// A resource as an `Any` in the dump: Envoy prints its `@type`.
fn with_type(v: &Value, type_url: &str) -> Value {
    let mut v = v.clone();
    if let Value::Object(m) = &mut v {
        m.entry("@type").or_insert_with(|| json!(type_url));
    }
    v
}

/// One dynamic resource as Envoy dumps it (`version_info`, the resource under `key`,
/// `last_updated`), plus Strait's `strait_source`: `control_plane`, `store` or `file`.
fn dynamic_entry(e: &model::DynamicEntry, key: &str) -> Value {
    json!({
        "version_info": e.version_info,
        key: e.body.render(),
        "last_updated": timestamp(e.last_updated),
        "strait_source": e.source.as_str(),
    })
}

fn config_dump(source: &dyn AdminSource, query: &str) -> Value {
    const T: &str = "type.googleapis.com/";
    // Dynamic resources render through the descriptor pool: build it once for the whole dump.
    let _descriptors = strait_xds::Descriptors::hold();
    let config = source.config();
    let dump = &config.dump;
    let dynamic = &config.dynamic_dump;
    let updated = timestamp(source.start_time());
    let entries = |list: &[(String, model::Doc)], key: &str, type_name: &str| -> Vec<Value> {
        list.iter()
            .map(|(_, v)| {
                json!({ key: with_type(&v.render(), &format!("{T}{type_name}")), "last_updated": updated })
            })
            .collect()
    };
    let clusters = |warming: bool| -> Vec<Value> {
        dynamic
            .clusters
            .iter()
            .filter(|e| e.warming == warming)
            .map(|e| dynamic_entry(e, "cluster"))
            .collect()
    };
    let listeners: Vec<Value> = dynamic
        .listeners
        .iter()
        .map(|e| {
            let state = if e.warming {
                "warming_state"
            } else {
                "active_state"
            };
            json!({ "name": e.name, state: dynamic_entry(e, "listener") })
        })
        .collect();
    let routes: Vec<Value> = dynamic
        .route_configs
        .iter()
        .map(|e| dynamic_entry(e, "route_config"))
        .collect();
    let mut configs = vec![
        json!({
            "@type": format!("{T}envoy.admin.v3.BootstrapConfigDump"),
            "bootstrap": dump.bootstrap.as_ref().map(|d| d.render()),
            "last_updated": updated,
        }),
        json!({
            "@type": format!("{T}envoy.admin.v3.ClustersConfigDump"),
            "version_info": dynamic.cds_version,
            "static_clusters": entries(&dump.static_clusters, "cluster", "envoy.config.cluster.v3.Cluster"),
            "dynamic_active_clusters": clusters(false),
            "dynamic_warming_clusters": clusters(true),
        }),
        json!({
            "@type": format!("{T}envoy.admin.v3.ListenersConfigDump"),
            "version_info": dynamic.lds_version,
            "static_listeners": entries(&dump.static_listeners, "listener", "envoy.config.listener.v3.Listener"),
            "dynamic_listeners": listeners,
        }),
        json!({
            "@type": format!("{T}envoy.admin.v3.RoutesConfigDump"),
            "static_route_configs": entries(&dump.static_route_configs, "route_config", "envoy.config.route.v3.RouteConfiguration"),
            "dynamic_route_configs": routes,
        }),
    ];
    // Envoy adds the (large) endpoint dump only when asked.
    if query
        .split('&')
        .any(|p| p == "include_eds" || p.starts_with("include_eds="))
    {
        let eds: Vec<Value> = dynamic
            .endpoint_configs
            .iter()
            .map(|e| dynamic_entry(e, "endpoint_config"))
            .collect();
        configs.push(json!({
            "@type": format!("{T}envoy.admin.v3.EndpointsConfigDump"),
            "dynamic_endpoint_configs": eds,
        }));
    }
    json!({ "configs": configs })
}

fn sorted_clusters(source: &dyn AdminSource) -> Vec<ClusterView> {
    let mut clusters = source.clusters();
    clusters.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    clusters
}

fn host_stats(h: &HostView) -> Vec<(&'static str, StatValue)> {
    let mut stats = Vec::new();
    h.stats.visit(&mut |k, v| stats.push((k, v)));
    // Envoy prints a host's counters and gauges merged, by name.
    stats.sort_by_key(|(k, _)| *k);
    stats
}

fn clusters_text(source: &dyn AdminSource) -> String {
    let mut out = String::new();
    for c in sorted_clusters(source) {
        let n = &c.config.name;
        let _ = writeln!(out, "{n}::observability_name::{n}");
        for (prio, t) in [
            ("default", c.config.circuit_breakers),
            ("high", c.config.circuit_breakers_high),
        ] {
            let _ = writeln!(
                out,
                "{n}::{prio}_priority::max_connections::{}",
                t.max_connections
            );
            let _ = writeln!(
                out,
                "{n}::{prio}_priority::max_pending_requests::{}",
                t.max_pending_requests
            );
            let _ = writeln!(
                out,
                "{n}::{prio}_priority::max_requests::{}",
                t.max_requests
            );
            let _ = writeln!(out, "{n}::{prio}_priority::max_retries::{}", t.max_retries);
        }
        if let Some(o) = c.outlier {
            for (name, v) in [
                "success_rate_average",
                "success_rate_ejection_threshold",
                "local_origin_success_rate_average",
                "local_origin_success_rate_ejection_threshold",
            ]
            .iter()
            .zip(o)
            {
                let _ = writeln!(out, "{n}::outlier::{name}::{v}");
            }
        }
        let _ = writeln!(out, "{n}::added_via_api::false");
        for h in &c.hosts {
            let a = h.address;
            for (k, v) in host_stats(h) {
                let _ = writeln!(out, "{n}::{a}::{k}::{}", stat_json(v));
            }
            let _ = writeln!(out, "{n}::{a}::hostname::{}", h.hostname);
            let _ = writeln!(out, "{n}::{a}::health_flags::{}", h.health_flags);
            let _ = writeln!(out, "{n}::{a}::weight::{}", h.weight);
            let _ = writeln!(out, "{n}::{a}::region::{}", h.locality.region);
            let _ = writeln!(out, "{n}::{a}::zone::{}", h.locality.zone);
            let _ = writeln!(out, "{n}::{a}::sub_zone::{}", h.locality.sub_zone);
            let _ = writeln!(out, "{n}::{a}::canary::false");
            let _ = writeln!(out, "{n}::{a}::priority::{}", h.priority);
            let _ = writeln!(out, "{n}::{a}::success_rate::{}", h.success_rate);
            let _ = writeln!(
                out,
                "{n}::{a}::local_origin_success_rate::{}",
                h.local_origin_success_rate
            );
        }
    }
    out
}

fn socket_address(a: SocketAddr) -> Value {
    json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}})
}

fn thresholds_json(t: model::Thresholds, priority: Option<&str>) -> Value {
    let mut v = json!({
        "max_connections": t.max_connections,
        "max_pending_requests": t.max_pending_requests,
        "max_requests": t.max_requests,
        "max_retries": t.max_retries,
    });
    if let (Some(p), Value::Object(m)) = (priority, &mut v) {
        m.insert("priority".into(), json!(p));
    }
    v
}

/// `envoy.admin.v3.Clusters` as proto3 JSON (64-bit stat values are strings there).
fn clusters_json(source: &dyn AdminSource) -> Value {
    let statuses: Vec<Value> = sorted_clusters(source)
        .iter()
        .map(|c| {
            let hosts: Vec<Value> = c
                .hosts
                .iter()
                .map(|h| {
                    let stats: Vec<Value> = host_stats(h)
                        .into_iter()
                        .map(|(k, v)| match v {
                            StatValue::Counter(n) => json!({"name": k, "value": n.to_string()}),
                            StatValue::Gauge(n) => {
                                json!({"name": k, "value": n.to_string(), "type": "GAUGE"})
                            }
                        })
                        .collect();
                    let eds = if h.health_flags.contains("/failed_eds_health") {
                        "UNHEALTHY"
                    } else if h.health_flags.contains("/degraded_eds_health") {
                        "DEGRADED"
                    } else {
                        "HEALTHY"
                    };
                    let mut health = json!({"eds_health_status": eds});
                    // Envoy's HostHealthStatus booleans, present only when true.
                    for (flag, key) in [
                        ("/failed_active_hc", "failed_active_health_check"),
                        ("/failed_outlier_check", "failed_outlier_check"),
                        ("/degraded_active_hc", "failed_active_degraded_check"),
                        ("/pending_active_hc", "pending_active_hc"),
                        (
                            "/excluded_via_immediate_hc_fail",
                            "excluded_via_immediate_hc_fail",
                        ),
                        ("/active_hc_timeout", "active_hc_timeout"),
                    ] {
                        if h.health_flags.contains(flag) {
                            health[key] = json!(true);
                        }
                    }
                    let mut host = json!({
                        "address": socket_address(h.address),
                        "stats": stats,
                        "health_status": health,
                        "weight": h.weight,
                        "hostname": h.hostname,
                        "locality": {
                            "region": h.locality.region,
                            "zone": h.locality.zone,
                            "sub_zone": h.locality.sub_zone,
                        },
                        "priority": h.priority,
                    });
                    // Envoy's outlier success rates, present once the detector computed them.
                    for (key, v) in [
                        ("success_rate", h.success_rate),
                        ("local_origin_success_rate", h.local_origin_success_rate),
                    ] {
                        if v >= 0.0 {
                            host[key] = json!({"value": v});
                        }
                    }
                    host
                })
                .collect();
            json!({
                "name": c.config.name,
                "observability_name": c.config.name,
                "circuit_breakers": {"thresholds": [
                    thresholds_json(c.config.circuit_breakers, None),
                    thresholds_json(c.config.circuit_breakers_high, Some("HIGH")),
                ]},
                "host_statuses": hosts,
            })
        })
        .collect();
    json!({ "cluster_statuses": statuses })
}

fn listeners_json(source: &dyn AdminSource) -> Value {
    let list: Vec<Value> = source
        .listeners()
        .into_iter()
        .map(|(name, addr)| json!({"name": name, "local_address": socket_address(addr)}))
        .collect();
    json!({ "listener_statuses": list })
}

// === Prometheus ===

/// Envoy's default tag extractors (`well_known_names.cc`) for the stats Strait has, in Envoy's
/// order: the ones without a name prefix first, as its tag producer applies them. Group 1 is
/// removed from the name; group 2 (else group 1) is the tag value.
fn extractors() -> &'static [(&'static str, Regex)] {
    static EXTRACTORS: OnceLock<Vec<(&'static str, Regex)>> = OnceLock::new();
    EXTRACTORS.get_or_init(|| {
        [
            ("envoy.response_code", r"_rq(_(\d{3}))$"),
            ("envoy.response_code_class", r"_rq_(\d)xx$"),
            ("envoy.cluster_name", r"^cluster\.(([^\.]+)\.)"),
            // Envoy lists this tag before the connection manager's on RDS stats.
            (
                "envoy.rds_route_config",
                r"^http\.[^\.]+\.rds\.((.*?)\.)\w+?$",
            ),
            ("envoy.http_conn_manager_prefix", r"^http\.((.*?)\.)"),
            (
                "envoy.listener_address",
                r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
            ),
            ("envoy.worker_id", r"^listener_manager\.((worker_\d+)\.)"),
        ]
        .into_iter()
        // These patterns are constants; one that failed to compile would only lose its tag.
        .filter_map(|(tag, re)| Regex::new(re).ok().map(|r| (tag, r)))
        .collect()
    })
}

/// Splits a stat name into Envoy's tag-extracted name and its tags.
fn extract_tags(name: &str) -> (String, Vec<(&'static str, String)>) {
    let mut tags = Vec::new();
    let mut remove: Vec<(usize, usize)> = Vec::new();
    for (tag, re) in extractors() {
        let Some(caps) = re.captures(name) else {
            continue;
        };
        let Some(removed) = caps.get(1) else {
            continue;
        };
        let value = caps.get(2).unwrap_or(removed);
        tags.push((*tag, value.as_str().to_string()));
        remove.push((removed.start(), removed.end()));
    }
    remove.sort_unstable();
    let mut out = String::with_capacity(name.len());
    let mut at = 0;
    for (start, end) in remove {
        if start >= at {
            out.push_str(&name[at..start]);
            at = end;
        }
    }
    out.push_str(&name[at..]);
    (out, tags)
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Prometheus text exposition as Envoy's `/stats/prometheus` writes it: counters then gauges,
/// one `# TYPE` per tag-extracted name (sorted), series sorted by their labels.
fn prometheus_text(stats: &[(String, StatValue)]) -> String {
    let mut counters: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut gauges: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (name, v) in stats {
        let (base, tags) = extract_tags(name);
        let metric = format!("envoy_{}", sanitize(&base));
        let labels = tags
            .iter()
            .map(|(k, v)| format!("{}=\"{}\"", sanitize(k), escape_label(v)))
            .collect::<Vec<_>>()
            .join(",");
        let (group, value) = match v {
            StatValue::Counter(c) => (&mut counters, c.to_string()),
            StatValue::Gauge(g) => (&mut gauges, g.to_string()),
        };
        group.entry(metric).or_default().push((labels, value));
    }
    let mut out = String::new();
    for (kind, groups) in [("counter", counters), ("gauge", gauges)] {
        for (metric, mut series) in groups {
            series.sort();
            let _ = writeln!(out, "# TYPE {metric} {kind}");
            for (labels, value) in series {
                let _ = writeln!(out, "{metric}{{{labels}}} {value}");
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use http_body_util::{BodyExt, Empty};
    use tokio::net::TcpStream;

    struct Fake {
        state: Mutex<ServerState>,
        store: Store,
        config: Arc<model::Bootstrap>,
        host: Arc<HostStats>,
        cluster: Arc<model::Cluster>,
        shutdown: AtomicBool,
    }

    impl AdminSource for Fake {
        fn state(&self) -> ServerState {
            *self.state.lock().unwrap()
        }
        fn stats(&self) -> &Store {
            &self.store
        }
        fn config(&self) -> Arc<model::Bootstrap> {
            self.config.clone()
        }
        fn listeners(&self) -> Vec<(String, SocketAddr)> {
            vec![("ingress".into(), "127.0.0.1:10000".parse().unwrap())]
        }
        fn clusters(&self) -> Vec<ClusterView> {
            vec![ClusterView {
                config: self.cluster.clone(),
                hosts: vec![HostView {
                    address: "127.0.0.1:8080".parse().unwrap(),
                    hostname: String::new(),
                    locality: model::Locality {
                        zone: "z1".into(),
                        ..Default::default()
                    },
                    priority: 0,
                    weight: 1,
                    health_flags: "healthy".into(),
                    stats: self.host.clone(),
                    success_rate: -1.0,
                    local_origin_success_rate: -1.0,
                }],
                outlier: None,
            }]
        }
        fn start_time(&self) -> SystemTime {
            SystemTime::now() - Duration::from_secs(12)
        }
        fn command_line_options(&self) -> Value {
            json!({"concurrency": 2})
        }
        fn begin_shutdown(&self) {
            self.shutdown.store(true, Ordering::SeqCst);
        }
    }

    fn fake() -> Arc<Fake> {
        let store = Store::default();
        let c = store.cluster("backend");
        c.upstream_rq_total.add(3);
        c.upstream_rq_2xx.add(2);
        c.upstream_rq_5xx.inc();
        c.upstream_cx_active.set(1);
        store.http("ingress").downstream_rq_total.add(3);
        store.listener("127.0.0.1_10000").downstream_cx_total.inc();
        let host = Arc::new(HostStats::default());
        host.rq_total.add(3);
        let cluster = Arc::new(model::Cluster {
            name: "backend".into(),
            discovery: model::DiscoveryType::Static,
            connect_timeout: Duration::from_secs(5),
            lb_policy: model::LbPolicy::RoundRobin,
            lb: Default::default(),
            load_assignment: Default::default(),
            protocol: model::UpstreamProtocol::Http1,
            circuit_breakers: model::Thresholds {
                max_connections: 7,
                ..Default::default()
            },
            idle_timeout: None,
            dns_refresh_rate: Duration::from_secs(5),
            dns_lookup_family: Default::default(),
            health_checks: Vec::new(),
            outlier_detection: None,
            circuit_breakers_high: Default::default(),
        });
        let config = model::Bootstrap {
            node: model::Node {
                id: "n1".into(),
                cluster: "c1".into(),
                ..Default::default()
            },
            dump: model::ConfigDump {
                bootstrap: Some(Arc::new(json!({"node": {"id": "n1"}}))),
                static_clusters: vec![("backend".into(), Arc::new(json!({"name": "backend"})))],
                static_listeners: vec![("ingress".into(), Arc::new(json!({"name": "ingress"})))],
                static_route_configs: vec![("ingress".into(), Arc::new(json!({"name": "local"})))],
            },
            ..Default::default()
        };
        Arc::new(Fake {
            state: Mutex::new(ServerState::Live),
            store,
            config: Arc::new(config),
            host,
            cluster,
            shutdown: AtomicBool::new(false),
        })
    }

    struct Admin {
        addr: SocketAddr,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Admin {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn start(src: Arc<Fake>) -> Admin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(serve(listener, src));
        Admin { addr, task }
    }

    async fn call(a: &Admin, method: Method, path: &str) -> (StatusCode, String, String) {
        let stream = TcpStream::connect(a.addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "admin")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = tx.send_request(req).await.unwrap();
        let status = res.status();
        let ct = res
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, ct, String::from_utf8(body.to_vec()).unwrap())
    }

    async fn get(a: &Admin, path: &str) -> (StatusCode, String) {
        let (s, _, b) = call(a, Method::GET, path).await;
        (s, b)
    }

    #[tokio::test]
    async fn ready_and_quitquitquit() {
        let src = fake();
        let a = start(src.clone()).await;
        assert_eq!(get(&a, "/ready").await, (StatusCode::OK, "LIVE\n".into()));
        *src.state.lock().unwrap() = ServerState::Initializing;
        assert_eq!(
            get(&a, "/ready").await,
            (StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n".into())
        );

        let (s, b) = get(&a, "/quitquitquit").await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(b, "Method GET not allowed, POST required.");
        assert!(!src.shutdown.load(Ordering::SeqCst));
        let (s, _, b) = call(&a, Method::POST, "/quitquitquit").await;
        assert_eq!((s, b.as_str()), (StatusCode::OK, "OK\n"));
        assert!(src.shutdown.load(Ordering::SeqCst));

        *src.state.lock().unwrap() = ServerState::Draining;
        assert_eq!(
            get(&a, "/ready").await,
            (StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n".into())
        );
        assert_eq!(get(&a, "/nope").await.0, StatusCode::NOT_FOUND);
        assert!(get(&a, "/").await.1.contains("/stats/prometheus"));
    }

    #[tokio::test]
    async fn stats_text_json_and_filters() {
        let a = start(fake()).await;
        let (s, body) = get(&a, "/stats").await;
        assert_eq!(s, StatusCode::OK);
        let lines: Vec<&str> = body.lines().collect();
        assert!(
            lines.contains(&"cluster.backend.upstream_rq_total: 3"),
            "{body}"
        );
        assert!(lines.contains(&"cluster.backend.upstream_rq_4xx: 0"));
        let mut sorted = lines.clone();
        sorted.sort();
        assert_eq!(lines, sorted);

        let (_, body) = get(&a, "/stats?usedonly&filter=%5Ecluster%5C.").await;
        assert_eq!(
            body,
            "cluster.backend.upstream_cx_active: 1\n\
             cluster.backend.upstream_rq_2xx: 2\n\
             cluster.backend.upstream_rq_5xx: 1\n\
             cluster.backend.upstream_rq_total: 3\n"
        );
        assert_eq!(get(&a, "/stats?filter=(").await.0, StatusCode::BAD_REQUEST);

        let (_, ct, body) = call(&a, Method::GET, "/stats?format=json&filter=_rq_total%24").await;
        assert_eq!(ct, "application/json");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            json!({"stats": [
                {"name": "cluster.backend.upstream_rq_total", "value": 3},
                {"name": "http.ingress.downstream_rq_total", "value": 3},
            ]})
        );
    }

    #[tokio::test]
    async fn prometheus_like_envoy() {
        let a = start(fake()).await;
        let (s, body) = get(&a, "/stats/prometheus").await;
        assert_eq!(s, StatusCode::OK);
        for want in [
            "# TYPE envoy_cluster_upstream_rq_total counter\n\
             envoy_cluster_upstream_rq_total{envoy_cluster_name=\"backend\"} 3\n",
            "# TYPE envoy_cluster_upstream_rq_xx counter\n\
             envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"1\",envoy_cluster_name=\"backend\"} 0\n\
             envoy_cluster_upstream_rq_xx{envoy_response_code_class=\"2\",envoy_cluster_name=\"backend\"} 2\n",
            "envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix=\"ingress\"} 3\n",
            "envoy_listener_downstream_cx_total{envoy_listener_address=\"127.0.0.1_10000\"} 1\n",
            "# TYPE envoy_cluster_upstream_cx_active gauge\n",
            "envoy_server_live{} 0\n",
        ] {
            assert!(body.contains(want), "missing {want:?} in\n{body}");
        }
        // Every counter family comes before the first gauge family.
        let last_counter = body.rfind(" counter\n").unwrap();
        let first_gauge = body.find(" gauge\n").unwrap();
        assert!(last_counter < first_gauge);
    }

    #[tokio::test]
    async fn clusters_listeners_server_info_config_dump() {
        let a = start(fake()).await;
        let (_, body) = get(&a, "/clusters").await;
        let want = "backend::observability_name::backend
backend::default_priority::max_connections::7
backend::default_priority::max_pending_requests::1024
backend::default_priority::max_requests::1024
backend::default_priority::max_retries::3
backend::high_priority::max_connections::1024
backend::high_priority::max_pending_requests::1024
backend::high_priority::max_requests::1024
backend::high_priority::max_retries::3
backend::added_via_api::false
backend::127.0.0.1:8080::cx_active::0
backend::127.0.0.1:8080::cx_connect_fail::0
backend::127.0.0.1:8080::cx_total::0
backend::127.0.0.1:8080::rq_active::0
backend::127.0.0.1:8080::rq_error::0
backend::127.0.0.1:8080::rq_pending_active::0
backend::127.0.0.1:8080::rq_success::0
backend::127.0.0.1:8080::rq_timeout::0
backend::127.0.0.1:8080::rq_total::3
backend::127.0.0.1:8080::hostname::
backend::127.0.0.1:8080::health_flags::healthy
backend::127.0.0.1:8080::weight::1
backend::127.0.0.1:8080::region::
backend::127.0.0.1:8080::zone::z1
backend::127.0.0.1:8080::sub_zone::
backend::127.0.0.1:8080::canary::false
backend::127.0.0.1:8080::priority::0
backend::127.0.0.1:8080::success_rate::-1
backend::127.0.0.1:8080::local_origin_success_rate::-1
";
        assert_eq!(body, want);
        let (_, body) = get(&a, "/clusters?format=json").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        let host = &v["cluster_statuses"][0]["host_statuses"][0];
        assert_eq!(host["address"]["socket_address"]["port_value"], 8080);
        assert_eq!(host["health_status"]["eds_health_status"], "HEALTHY");

        assert_eq!(get(&a, "/listeners").await.1, "ingress::127.0.0.1:10000\n");
        let (_, body) = get(&a, "/listeners?format=json").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            json!({"listener_statuses": [{"name": "ingress", "local_address":
                {"socket_address": {"address": "127.0.0.1", "port_value": 10000}}}]})
        );

        let (_, body) = get(&a, "/server_info").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["state"], "LIVE");
        assert_eq!(v["version"], concat!("strait/", env!("CARGO_PKG_VERSION")));
        assert_eq!(v["node"], json!({"id": "n1", "cluster": "c1"}));
        assert_eq!(v["command_line_options"]["concurrency"], 2);
        // The fake started 12 s ago by the wall clock; allow for a slewing clock.
        let up = v["uptime_current_epoch"].as_str().unwrap();
        let secs: u64 = up.strip_suffix('s').unwrap().parse().unwrap();
        assert!((11..=14).contains(&secs), "{up}");

        let (_, body) = get(&a, "/config_dump?include_eds").await;
        let v: Value = serde_json::from_str(&body).unwrap();
        let configs = v["configs"].as_array().unwrap();
        let types: Vec<&str> = configs
            .iter()
            .map(|c| c["@type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            [
                "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump",
                "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
                "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
                "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
                "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
            ]
        );
        assert_eq!(configs[0]["bootstrap"]["node"]["id"], "n1");
        let cluster = &configs[1]["static_clusters"][0]["cluster"];
        assert_eq!(cluster["name"], "backend");
        assert_eq!(
            cluster["@type"],
            "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        );
        assert_eq!(
            configs[3]["static_route_configs"][0]["route_config"]["name"],
            "local"
        );
        assert!(configs[2]["static_listeners"][0]["last_updated"]
            .as_str()
            .unwrap()
            .ends_with('Z'));
    }

    #[test]
    fn tag_extraction() {
        let (n, t) = extract_tags("cluster.backend.upstream_rq_503");
        assert_eq!(n, "cluster.upstream_rq");
        assert_eq!(
            t,
            [
                ("envoy.response_code", "503".to_string()),
                ("envoy.cluster_name", "backend".to_string())
            ]
        );
        let (n, t) = extract_tags("http.ingress.downstream_rq_2xx");
        assert_eq!(n, "http.downstream_rq_xx");
        assert_eq!(t.len(), 2);
        let (n, t) = extract_tags("listener.[__1]_80.downstream_cx_total");
        assert_eq!(n, "listener.downstream_cx_total");
        assert_eq!(t, [("envoy.listener_address", "[__1]_80".to_string())]);
        assert_eq!(
            extract_tags("server.live"),
            ("server.live".to_string(), vec![])
        );
        assert_eq!(percent_decode("a%5Eb+c%zz%"), "a^b c%zz%");
    }
}
