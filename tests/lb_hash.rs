//! Route `hash_policy` with RING_HASH and MAGLEV end to end: a key always reaches the same
//! upstream, keys spread over all upstreams, and — because Strait builds the ring and the Maglev
//! table with xxHash64 over `ip:port` exactly as Envoy does — each key reaches the same upstream
//! through Strait as through Envoy (when Envoy is installed: `ENVOY_BIN`, else
//! `envoy` on `PATH`).

mod common;

use std::collections::{BTreeMap, HashSet};

use common::{Client, Config, Upstream};
use serde_json::json;

const KEYS: usize = 60;

fn envoy_bin() -> Option<String> {
    common::envoy_bin()
}

/// Key -> upstream name, asking each key three times (it must not move).
async fn placements(yaml: &str) -> BTreeMap<String, String> {
    let proxy = common::Strait::start(yaml).await;
    let client = Client::http1();
    let url = proxy.url("/h");
    let mut out = BTreeMap::new();
    for k in 0..KEYS {
        let key = format!("user-{k}");
        let mut seen = HashSet::new();
        for _ in 0..3 {
            let r = client.get_with(&url, &[("x-user", &key)]).await;
            assert_eq!(r.status, 200, "{}", r.text());
            seen.insert(r.upstream().unwrap_or_default().to_string());
        }
        assert_eq!(seen.len(), 1, "{key} moved between {seen:?}");
        out.insert(key, seen.into_iter().next().unwrap_or_default());
    }
    out
}

/// `zones`: the upstreams go into this many localities (zones z0, z1, ...) and Strait runs in
/// the last one, so that its own locality is not the first in the assignment: placement must
/// still follow the assignment's host order, as Envoy's flat host list does.
async fn check(policy: serde_json::Value, zones: usize) {
    let mut ups = Vec::new();
    for i in 0..4 {
        ups.push(Upstream::start(&format!("u{i}")).await);
    }
    let zones = zones.max(1);
    let groups: Vec<_> = (0..zones)
        .map(|z| {
            let eps: Vec<_> = ups
                .iter()
                .enumerate()
                .filter(|(i, _)| i % zones == z)
                .map(|(_, u)| {
                    json!({"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": u.addr.port()}}}})
                })
                .collect();
            json!({"locality": {"region": "r", "zone": format!("z{z}")}, "lb_endpoints": eps})
        })
        .collect();
    let mut cluster = json!({"name": "c", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "c", "endpoints": groups}});
    for (k, v) in policy.as_object().cloned().unwrap_or_default() {
        cluster[k] = v;
    }
    let mut boot = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "c",
            "hash_policy": [{"header": {"header_name": "x-user"}}]}}]))
        .cluster_json(cluster)
        .access_logs(vec![])
        .json();
    boot["node"]["locality"] = json!({"region": "r", "zone": format!("z{}", zones - 1)});
    let yaml = serde_json::to_string_pretty(&boot).unwrap_or_default();
    let strait = placements(&yaml).await;
    let used: HashSet<&String> = strait.values().collect();
    assert_eq!(
        used.len(),
        4,
        "60 keys should reach all 4 upstreams: {strait:?}"
    );
    if let Some(bin) = envoy_bin() {
        // This test binary holds this one test, so switching
        // the launcher's binary through its environment variable affects nothing else.
        std::env::set_var("STRAIT_TEST_BIN", bin);
        let envoy = placements(&yaml).await;
        std::env::remove_var("STRAIT_TEST_BIN");
        let differ: Vec<_> = strait
            .iter()
            .filter(|(k, v)| envoy.get(*k) != Some(*v))
            .collect();
        assert!(
            differ.is_empty(),
            "placement differs from Envoy's: {differ:?}"
        );
    } else {
        eprintln!("envoy not found (ENVOY_BIN): skipping the placement comparison");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_and_maglev_place_keys_as_envoy() {
    check(json!({"lb_policy": "RING_HASH"}), 1).await;
    check(json!({"lb_policy": "MAGLEV"}), 1).await;
    check(json!({"lb_policy": "MAGLEV"}), 2).await;
    check(json!({"lb_policy": "RING_HASH"}), 2).await;
}
