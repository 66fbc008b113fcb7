//! xDS apply benchmark: push-to-serving latency and memory for a large ADS configuration.
//!
//! `cargo build --release --bin strait --example xds_scale &&
//!  target/release/examples/xds_scale [--clusters N] [--endpoints E] [--routes R] [--delta] [--updates U]
//!  [--strait PATH]`
//!
//! Runs Strait's reference control plane in this process and the real `strait` binary (default:
//! `../strait` next to this example's directory) as a child, over loopback. Measures:
//! - initial push: from the control plane serving N EDS clusters (E endpoints in total, spread
//!   evenly), one route configuration with R routes and one listener, to the first request
//!   answered by the new listener;
//! - update push: every cluster's endpoints change and the probe route's answer changes, to the
//!   first request answered with the new answer;
//! - the `strait` process's RSS before (empty config) and after the initial apply, and the
//!   bytes per endpoint that growth gives (clusters and routes included in it).

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
    updates: u32,
}

fn args() -> Args {
    let mut a = Args {
        clusters: 1_000,
        endpoints: 10_000,
        routes: 1_000,
        delta: false,
        updates: 3,
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
                "http_filters": [{"name": "envoy.filters.http.router"}]
            }}]}]
    }));
    docs
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One HTTP/1.1 GET; the status line's code and the body ("" on any failure).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// The `ingress` listener's address, from the admin `/listeners`.
async fn ingress(admin: SocketAddr) -> Option<SocketAddr> {
    let (_, body) = get(admin, "/listeners?format=json").await;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
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
        "admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config: {{api_type: {}, transport_api_version: V3, grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]}}
  cds_config: {{ads: {{}}, initial_fetch_timeout: 1s}}
  lds_config: {{ads: {{}}, initial_fetch_timeout: 1s}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    load_assignment: {{cluster_name: xds, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}}}]}}]}}
",
        if a.delta { "DELTA_GRPC" } else { "GRPC" },
        cp_addr.port()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bootstrap.yaml");
    let admin_path = dir.path().join("admin");
    std::fs::write(&cfg, bootstrap).expect("write bootstrap");
    let mut child = tokio::process::Command::new(&a.strait)
        .arg("-c")
        .arg(&cfg)
        .arg("--admin-address-path")
        .arg(&admin_path)
        .args(["-l", "warning", "--concurrency", "2"])
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", a.strait.display()));
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
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "strait not ready"
        );
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
        "strait RSS: {base} kB empty, {after} kB loaded (+{grown} kB = {} bytes per endpoint)",
        grown * 1024 / a.endpoints.max(1) as u64
    );
    for generation in 2..=a.updates + 1 {
        let docs = staged(&resources(&a, generation, &format!("v{generation}")));
        cp.replace_all(docs);
        cp.push();
        match until_serving(admin, &format!("v{generation}"), limit).await {
            Some(d) => println!(
                "update {generation} (every endpoint moved, route changed) -> serving: {d:?}"
            ),
            None => println!("update {generation}: not serving after {limit:?}"),
        }
        println!("  strait RSS: {} kB", rss_kb(pid));
    }
    println!("strait RSS at end: {} kB", rss_kb(pid));
    let _ = child.start_kill();
}
