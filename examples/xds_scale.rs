//! xDS apply benchmark: push-to-serving latency and memory for a large ADS configuration.
//!
//! `cargo build --release --bin strait --example xds_scale &&
//!  target/release/examples/xds_scale [--clusters N] [--endpoints E] [--routes R] [--delta] [--updates U]
//!  [--strait PATH | --envoy PATH] [--load RPS]`
//!
//! Runs Strait's reference control plane in this process and the real `strait` binary (default:
//! `../strait` next to this example's directory), or Envoy with the same bootstrap (`--envoy`),
//! as a child, over loopback. Measures:
//! - initial push: from the control plane serving N EDS clusters (E endpoints in total, spread
//!   evenly), one route configuration with R routes and one listener, to the first request
//!   answered by the new listener;
//! - update push: every cluster's endpoints change and the probe route's answer changes, to the
//!   first request answered with the new answer;
//! - the `strait` process's RSS before (empty config) and after the initial apply, and the
//!   bytes per endpoint that growth gives (clusters and routes included in it);
//! - with `--load RPS`: request latency through the proxy (`/steady`, a direct response, over
//!   4 keep-alive connections at a fixed open-loop rate) while idle and while each update is
//!   applied, to show whether applying a large update stalls the data-plane threads.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::path::PathBuf;

use strait_xds::control_plane::{load_dir, ControlPlane};

struct Args {
    clusters: usize,
    endpoints: usize,
    routes: usize,
    delta: bool,
    strait: PathBuf,
    /// Run this Envoy binary instead of strait.
    envoy: Option<PathBuf>,
    updates: u32,
    load: u32,
}

fn args() -> Args {
    let mut a = Args {
        clusters: 1_000,
        endpoints: 10_000,
        routes: 1_000,
        delta: false,
        updates: 3,
        envoy: None,
        load: 0,
        strait: std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.parent()?.join("strait")))
            .unwrap_or_else(|| PathBuf::from("strait")),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut num = || it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match k.as_str() {
            "--clusters" => a.clusters = num(),
            "--endpoints" => a.endpoints = num(),
            "--routes" => a.routes = num(),
            "--delta" => a.delta = true,
            "--updates" => a.updates = num() as u32,
            "--strait" => a.strait = it.next().map(PathBuf::from).unwrap_or(a.strait),
            "--envoy" => a.envoy = it.next().map(PathBuf::from),
            "--load" => a.load = num() as u32,
            other => eprintln!("ignored argument {other}"),
        }
    }
    a.clusters = a.clusters.max(1);
    a
}

/// Proto3 JSON documents (one file each) for the control plane's directory.
fn resources(a: &Args, generation: u32, probe: &str) -> Vec<serde_json::Value> {
    use serde_json::json;
    let mut docs = Vec::new();
    let per = a.endpoints / a.clusters;
    let mut clusters = Vec::new();
    let mut clas = Vec::new();
    for i in 0..a.clusters {
        let name = format!("c{i}");
        clusters.push(json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": name, "type": "EDS", "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": {"ads": {}}}
        }));
        // Addresses nothing listens on: they are never connected to. The generation moves
        // every endpoint, so an update replaces every host.
        let eps: Vec<_> = (0..per)
            .map(|j| {
                let n = i * per + j;
                json!({"endpoint": {"address": {"socket_address": {
                    "address": format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255),
                    "port_value": 1000 + generation}}}})
            })
            .collect();
        clas.push(json!({
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": name, "endpoints": [{"lb_endpoints": eps}]
        }));
    }
    let mut routes: Vec<_> = (0..a.routes)
        .map(|i| {
            json!({"match": {"prefix": format!("/r{i}/")},
                        "route": {"cluster": format!("c{}", i % a.clusters)}})
        })
        .collect();
    routes.insert(
        0,
        json!({"match": {"path": "/probe"},
               "direct_response": {"status": 200, "body": {"inline_string": probe}}}),
    );
    routes.insert(
        0,
        json!({"match": {"path": "/steady"},
               "direct_response": {"status": 200, "body": {"inline_string": "steady"}}}),
    );
    docs.push(json!({"resources": clusters}));
    docs.push(json!({"resources": clas}));
    docs.push(json!({
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": "rc",
        "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]
    }));
    docs.push(json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "ingress",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "ingress",
                "rds": {"route_config_name": "rc", "config_source": {"ads": {}}},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
            }}]}]
    }));
    docs
}

fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// A `kB` field of `/proc/PID/status` (`VmRSS:`, `VmHWM:`), 0 when unreadable.
fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One HTTP/1.1 GET on a new connection; the status code and the body ("" on any failure).
/// Reads exactly the response (content-length or chunked) instead of waiting for the close:
/// Envoy delays closing a `connection: close` connection (`delayed_close_timeout`, 1 s), which
/// would otherwise count as push-to-serving time.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let Ok(s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let mut s = tokio::io::BufStream::new(s);
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() || s.flush().await.is_err() {
        return (0, String::new());
    }
    let mut line = String::new();
    if s.read_line(&mut line).await.unwrap_or(0) == 0 {
        return (0, String::new());
    }
    let code = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (mut length, mut chunked) = (None, false);
    loop {
        line.clear();
        if s.read_line(&mut line).await.unwrap_or(0) == 0 {
            return (0, String::new());
        }
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            } else if k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                break;
            }
            let n = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0u8; n + 2];
            if n == 0 || s.read_exact(&mut chunk).await.is_err() {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        if s.read_exact(&mut body).await.is_err() {
            return (0, String::new());
        }
    } else {
        let _ = s.read_to_end(&mut body).await;
    }
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// The `ingress` listener's address, from the admin `/listeners`.
async fn ingress(admin: SocketAddr) -> Option<SocketAddr> {
    let (_, body) = get(admin, "/listeners?format=json").await;
    // Envoy's admin answers chunked: the JSON is between the first `{` and the last `}`.
    let json = body.get(body.find('{')?..=body.rfind('}')?)?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let l = v["listener_statuses"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == "ingress")?;
    let sa = &l["local_address"]["socket_address"];
    format!("{}:{}", sa["address"].as_str()?, sa["port_value"])
        .parse()
        .ok()
}

async fn until_serving(admin: SocketAddr, want: &str, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(addr) = ingress(admin).await {
            let (code, body) = get(addr, "/probe").await;
            if code == 200 && body == want {
                return Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

fn staged(docs: &[serde_json::Value]) -> strait_xds::control_plane::Resources {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, d) in docs.iter().enumerate() {
        let text = serde_json::to_string(d).expect("json");
        std::fs::write(dir.path().join(format!("r{i}.json")), text).expect("write");
    }
    load_dir(dir.path()).expect("resources")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    println!(
        "clusters={} endpoints={} routes={} protocol={}",
        a.clusters,
        a.endpoints,
        a.routes,
        if a.delta { "delta" } else { "sotw" }
    );
    let cp = ControlPlane::new();
    cp.push();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let cp_addr = listener.local_addr().expect("addr");
    let _cp = cp.spawn(listener);
    let bootstrap = format!(
        "node: {{id: scale, cluster: scale}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config: {{api_type: {}, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]}}
  cds_config: {{ads: {{}}, initial_fetch_timeout: 1s}}
  lds_config: {{ads: {{}}, initial_fetch_timeout: 1s}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment: {{cluster_name: xds, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}}}]}}]}}
",
        if a.delta { "DELTA_GRPC" } else { "GRPC" },
        cp_addr.port()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bootstrap.yaml");
    let admin_path = dir.path().join("admin");
    std::fs::write(&cfg, bootstrap).expect("write bootstrap");
    let bin = a.envoy.clone().unwrap_or_else(|| a.strait.clone());
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("-c")
        .arg(&cfg)
        .arg("--admin-address-path")
        .arg(&admin_path)
        .args(["-l", "warning", "--concurrency", "2"])
        .kill_on_drop(true);
    if a.envoy.is_some() {
        cmd.arg("--disable-hot-restart");
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let who = if a.envoy.is_some() { "envoy" } else { "strait" };
    let pid = child.id().unwrap_or(0);
    let start = Instant::now();
    let admin = loop {
        if let Some(addr) = std::fs::read_to_string(&admin_path)
            .ok()
            .and_then(|s| s.trim().parse::<SocketAddr>().ok())
        {
            if get(addr, "/ready").await.0 == 200 {
                break addr;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{who} not ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // (An empty Delta server sends nothing: the 1 s initial_fetch_timeout ends the wait.)
    let base = rss_kb(pid);
    let limit = Duration::from_secs(300);

    let docs = staged(&resources(&a, 1, "v1"));
    let t = Instant::now();
    cp.replace_all(docs);
    cp.push();
    match until_serving(admin, "v1", limit).await {
        Some(_) => println!("initial push -> serving: {:?}", t.elapsed()),
        None => println!("initial push: not serving after {limit:?}"),
    }
    let after = rss_kb(pid);
    let grown = after.saturating_sub(base);
    println!(
        "{who} RSS: {base} kB empty, {after} kB loaded (+{grown} kB = {} bytes per endpoint)",
        grown * 1024 / a.endpoints.max(1) as u64
    );
    let mut load = match (a.load, ingress(admin).await) {
        (0, _) | (_, None) => None,
        (rps, Some(addr)) => Some(Load::start(addr, rps).await),
    };
    if let Some(l) = &load {
        // An idle window first, as the baseline.
        let from = l.now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        l.report("idle 3 s", from, l.now());
    }
    for generation in 2..=a.updates + 1 {
        let docs = staged(&resources(&a, generation, &format!("v{generation}")));
        let from = load.as_ref().map(|l| l.now());
        cp.replace_all(docs);
        cp.push();
        let pushed = epoch_ms();
        match until_serving(admin, &format!("v{generation}"), limit).await {
            Some(d) => println!(
                "update {generation} (every endpoint moved, route changed) -> serving: {d:?}"
            ),
            None => println!("update {generation}: not serving after {limit:?}"),
        }
        // When the proxy applied each type, from its own `update_time` gauges.
        let (_, stats) = get(
            admin,
            "/stats?filter=(rds.rc.update_time|c0.update_time|cds.update_time)",
        )
        .await;
        for l in stats.lines() {
            if let Some((k, v)) = l.split_once(": ") {
                if let Ok(t) = v.trim().parse::<i64>() {
                    println!("  {k}: +{} ms after the push", t - pushed);
                }
            }
        }
        if let (Some(l), Some(from)) = (&load, from) {
            // Requests sent up to 500 ms after serving still overlap the apply's tail (old
            // clusters dropped, stats and pools released).
            tokio::time::sleep(Duration::from_millis(500)).await;
            l.report(&format!("during update {generation}"), from, l.now());
        }
        println!("  {who} RSS: {} kB", rss_kb(pid));
    }
    if let Some(l) = load.take() {
        let from = l.now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        l.report("idle 3 s after", from, l.now());
        l.stop();
    }
    println!("{who} RSS at end: {} kB", rss_kb(pid));
    // The peak includes every apply, when old and new configurations coexist.
    println!("{who} peak RSS (VmHWM): {} kB", status_kb(pid, "VmHWM:"));
    let _ = child.start_kill();
}

/// An open-loop request load: each of 4 keep-alive connections sends `GET /steady` on a fixed
/// schedule; a request's latency counts from its scheduled time (no coordinated omission).
struct Load {
    started: Instant,
    /// `(scheduled, latency)` of each answered request; failures as `Duration::MAX`.
    samples: std::sync::Arc<std::sync::Mutex<Vec<(Duration, Duration)>>>,
    /// `(scheduled, lateness)` of a 1 ms timer on the load's own thread: how much of a
    /// latency is the generator's own scheduling, not the proxy.
    lag: std::sync::Arc<std::sync::Mutex<Vec<(Duration, Duration)>>>,
    /// Its own runtime and thread, apart from the control plane's encoding work.
    rt: tokio::runtime::Runtime,
}

impl Load {
    const CONNECTIONS: u32 = 4;

    async fn start(addr: SocketAddr, rps: u32) -> Load {
        let started = Instant::now();
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let lag = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let interval = Duration::from_secs(1) * Self::CONNECTIONS / rps.max(1);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("load runtime");
        {
            let lag = lag.clone();
            rt.spawn(async move {
                let mut next = Instant::now();
                loop {
                    next += Duration::from_millis(1);
                    tokio::time::sleep_until(next.into()).await;
                    let late = next.elapsed();
                    if let Ok(mut v) = lag.lock() {
                        v.push((next.saturating_duration_since(started), late));
                    }
                }
            });
        }
        for c in 0..Self::CONNECTIONS {
            let samples = samples.clone();
            let offset = interval * c / Self::CONNECTIONS;
            rt.spawn(async move {
                let mut conn: Option<tokio::io::BufStream<tokio::net::TcpStream>> = None;
                let mut next = Instant::now() + offset;
                loop {
                    tokio::time::sleep_until(next.into()).await;
                    let scheduled = next;
                    next += interval;
                    if conn.is_none() {
                        conn = tokio::net::TcpStream::connect(addr)
                            .await
                            .ok()
                            .map(tokio::io::BufStream::new);
                    }
                    let ok = match conn.as_mut() {
                        Some(s) => keep_alive_get(s, "/steady").await,
                        None => false,
                    };
                    let latency = if ok {
                        scheduled.elapsed()
                    } else {
                        conn = None;
                        Duration::MAX
                    };
                    let at = scheduled.saturating_duration_since(started);
                    if let Ok(mut v) = samples.lock() {
                        v.push((at, latency));
                    }
                }
            });
        }
        Load {
            started,
            samples,
            lag,
            rt,
        }
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Prints the count, failures, p50 / p99 / max latency of requests scheduled in
    /// `[from, to)`.
    fn report(&self, what: &str, from: Duration, to: Duration) {
        let mut lat: Vec<Duration> = match self.samples.lock() {
            Ok(v) => v
                .iter()
                .filter(|(at, _)| *at >= from && *at < to)
                .map(|(_, l)| *l)
                .collect(),
            Err(_) => return,
        };
        lat.sort_unstable();
        let failed = lat.iter().filter(|l| **l == Duration::MAX).count();
        lat.retain(|l| *l != Duration::MAX);
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        let lag = match self.lag.lock() {
            Ok(v) => v
                .iter()
                .filter(|(at, _)| *at >= from && *at < to)
                .map(|(_, l)| *l)
                .max()
                .unwrap_or_default(),
            Err(_) => Duration::ZERO,
        };
        println!(
            "  load {what}: {} requests, {failed} failed, p50 {:?}, p99 {:?}, max {:?} (window {:?}; generator's own max timer lag {lag:?})",
            lat.len(),
            pct(0.50),
            pct(0.99),
            lat.last().copied().unwrap_or_default(),
            to.saturating_sub(from),
        );
    }

    fn stop(self) {
        self.rt.shutdown_background();
    }
}

/// One HTTP/1.1 GET on a kept-alive connection; reads the whole response (content-length).
async fn keep_alive_get(s: &mut tokio::io::BufStream<tokio::net::TcpStream>, path: &str) -> bool {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() || s.flush().await.is_err() {
        return false;
    }
    let mut line = String::new();
    let mut status_ok = false;
    let mut length = 0usize;
    let mut first = true;
    loop {
        line.clear();
        match s.read_line(&mut line).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        if first {
            status_ok = line.split(' ').nth(1) == Some("200");
            first = false;
            continue;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length];
    status_ok && s.read_exact(&mut body).await.is_ok()
}
