//! Differential load-balancing check: each case in `tests/lb_cases/*.yaml` is one cluster
//! (priorities, localities, weights, EDS `health_status` per endpoint) over real upstream servers
//! on loopback that name their bucket in `x-upstream`. N requests go through Strait and, when
//! Envoy is installed (`ENVOY_BIN`, else `envoy` on `PATH`), through Envoy; every
//! bucket's share must agree within 5 standard deviations of the difference of two binomials,
//! and with the case's `expect` table (percent, from Envoy's docs) within 5 sigma.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{Client, Config, Upstream};
use serde_json::{json, Value};

const N: usize = 1000;
const SENDERS: usize = 8;

fn envoy_bin() -> Option<String> {
    common::envoy_bin()
}

fn cases() -> Vec<(PathBuf, Value)> {
    let dir = manifest_dir().join("tests/lb_cases");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            let v: Value = serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            (p, v)
        })
        .collect()
}

/// Starts one upstream per endpoint and returns the cluster JSON.
async fn build_cluster(case: &Value, ups: &mut Vec<Upstream>) -> Value {
    let mut groups = Vec::new();
    for g in case["groups"].as_array().cloned().unwrap_or_default() {
        let mut eps = Vec::new();
        for e in g["endpoints"].as_array().cloned().unwrap_or_default() {
            let bucket = e["bucket"].as_str().unwrap_or("?").to_string();
            for _ in 0..e["count"].as_u64().unwrap_or(1) {
                let u = Upstream::start(&bucket).await;
                let mut ep = json!({
                    "endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": u.addr.port()}}},
                    "health_status": e["health"].as_str().unwrap_or("HEALTHY"),
                });
                if let Some(w) = e.get("weight") {
                    ep["load_balancing_weight"] = w.clone();
                }
                eps.push(ep);
                ups.push(u);
            }
        }
        let mut lle = json!({"priority": g["priority"].as_u64().unwrap_or(0), "lb_endpoints": eps});
        if let Some(l) = g.get("locality") {
            lle["locality"] = l.clone();
        }
        if let Some(w) = g.get("weight") {
            lle["load_balancing_weight"] = w.clone();
        }
        groups.push(lle);
    }
    let mut la = json!({"cluster_name": "c", "endpoints": groups});
    if let Some(p) = case.get("policy") {
        la["policy"] = p.clone();
    }
    let mut c = json!({"name": "c", "type": "STATIC", "connect_timeout": "1s",
                       "load_assignment": la});
    if let Some(extra) = case["cluster"].as_object() {
        for (k, v) in extra {
            c[k] = v.clone();
        }
    }
    c
}

/// Zone-aware cases: `node_zone` is where the proxy runs; `local_zones` lists one local-cluster
/// member per entry (the proxies of the mesh; they never receive traffic here).
fn zone_aware(case: &Value, boot: &mut Value) {
    let Some(zone) = case["node_zone"].as_str() else {
        return;
    };
    boot["node"]["locality"] = json!({"region": "r", "zone": zone});
    boot["cluster_manager"] = json!({"local_cluster_name": "local"});
    let members: Vec<Value> = case["local_zones"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, z)| {
            json!({"locality": {"region": "r", "zone": z},
                   "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                       "address": "127.0.0.1", "port_value": 1 + i}}}}]})
        })
        .collect();
    let local = json!({"name": "local", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "local", "endpoints": members}});
    if let Some(clusters) = boot["static_resources"]["clusters"].as_array_mut() {
        clusters.push(local);
    }
}

/// Sends N requests and counts answers per bucket (`no_host` for 503s without an upstream).
async fn run(yaml: &str) -> BTreeMap<String, usize> {
    let proxy = common::Strait::start(yaml).await;
    let client = Client::http1();
    let url = proxy.url("/lb");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..SENDERS {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            let mut got = Vec::with_capacity(N / SENDERS);
            for _ in 0..N / SENDERS {
                let r = client.get(&url).await;
                got.push(match r.upstream() {
                    Some(u) => u.to_string(),
                    None => format!("status_{}", r.status.as_u16()),
                });
            }
            got
        });
    }
    let mut counts = BTreeMap::new();
    while let Some(res) = common::within("senders", tasks.join_next()).await {
        for b in res.unwrap_or_else(|e| panic!("sender: {e}")) {
            *counts.entry(b).or_insert(0) += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_splits_match_envoy() {
    let envoy = envoy_bin();
    if envoy.is_none() {
        eprintln!("envoy not found (ENVOY_BIN): checking Strait against the expectations only");
    }
    let mut failures = Vec::new();
    for (path, case) in cases() {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut ups = Vec::new();
        let cluster = build_cluster(&case, &mut ups).await;
        let mut boot = Config::new()
            .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]))
            .cluster_json(cluster)
            .access_logs(vec![])
            .json();
        zone_aware(&case, &mut boot);
        let yaml = serde_json::to_string_pretty(&boot).unwrap_or_default();
        let strait = run(&yaml).await;
        let envoy_counts = match &envoy {
            Some(bin) => {
                // This test binary holds this one test, so switching the proxy binary for the
                // shared launcher through its environment variable affects nothing else.
                std::env::set_var("STRAIT_TEST_BIN", bin);
                let c = run(&yaml).await;
                std::env::remove_var("STRAIT_TEST_BIN");
                Some(c)
            }
            None => None,
        };
        let mut buckets: Vec<String> = strait.keys().cloned().collect();
        if let Some(e) = &envoy_counts {
            buckets.extend(e.keys().cloned());
        }
        if let Some(exp) = case["expect"].as_object() {
            buckets.extend(exp.keys().cloned());
        }
        buckets.sort();
        buckets.dedup();
        let mut line = format!("{name:28}");
        for b in &buckets {
            let s = strait.get(b).copied().unwrap_or(0);
            line += &format!(" {b}: strait {s:4}");
            if let Some(e) = &envoy_counts {
                let e = e.get(b).copied().unwrap_or(0);
                line += &format!(" envoy {e:4}");
                // Difference of two binomials with the pooled share p: sigma = sqrt(2 N p (1-p)).
                let p = (s + e) as f64 / (2 * N) as f64;
                let tol = 5.0 * (2.0 * N as f64 * p * (1.0 - p)).sqrt() + 1.0;
                if (s as f64 - e as f64).abs() > tol {
                    failures.push(format!(
                        "{name}: {b}: strait {s} vs envoy {e} (tolerance {tol:.0})"
                    ));
                }
            }
            if let Some(want) = case["expect"].get(b).and_then(Value::as_f64) {
                let p = want / 100.0;
                let tol = 5.0 * (N as f64 * p * (1.0 - p)).sqrt() + 1.0;
                let mean = N as f64 * p;
                if (s as f64 - mean).abs() > tol {
                    failures.push(format!(
                        "{name}: {b}: strait {s}, expected {mean:.0} +- {tol:.0}"
                    ));
                }
            }
        }
        eprintln!("{line}");
        drop(ups);
    }
    assert!(
        failures.is_empty(),
        "LB splits differ:\n{}",
        failures.join("\n")
    );
}

/// The repository root. Cargo's run-time `CARGO_MANIFEST_DIR` first: a test binary reused from a
/// build in another checkout (a shared target directory) carries that checkout's compile-time
/// path.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}
