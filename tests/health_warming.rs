//! Cluster warming with active health checks, as a client sees it: a cluster serves only once
//! every host has had its first check, so a host failing its check never gets a request — not
//! even the first one after Strait starts, nor the first one after the cluster appears over xDS.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Client, Config, Reply, Strait, Upstream};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(15);

/// Every request `up` received was a health check.
fn only_checks(up: &Upstream) {
    let paths: Vec<String> = up.seen().into_iter().map(|s| s.path).collect();
    assert!(
        paths.iter().all(|p| p == "/healthz"),
        "{}: got traffic: {paths:?}",
        up.name()
    );
    assert!(!paths.is_empty(), "{} was never checked", up.name());
}

/// Upstreams whose first answer (the first health check) takes 300 ms: long enough for
/// requests to arrive while a cluster that did not wait for its checks would be in panic
/// (every host starts `/failed_active_hc`) and spread traffic over all hosts.
async fn upstreams() -> (Upstream, Upstream, Upstream) {
    let bad = Upstream::start_with("bad", Reply::Status(503)).await;
    let g1 = Upstream::start("g1").await;
    let g2 = Upstream::start("g2").await;
    let slow = |r: Reply| Reply::Delay(Duration::from_millis(300), Box::new(r));
    bad.script([slow(Reply::Status(503))]);
    g1.script([slow(Reply::Echo)]);
    g2.script([slow(Reply::Echo)]);
    (bad, g1, g2)
}

fn http_check() -> serde_json::Value {
    // A long interval: the first round is the one that matters here.
    json!({"timeout": "1s", "interval": "10s", "unhealthy_threshold": 1,
           "healthy_threshold": 1, "http_health_check": {"path": "/healthz"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_requests_after_start_avoid_a_failing_host() {
    let (bad, g1, g2) = upstreams().await;
    let mut cluster = common::cluster("c", &[bad.addr, g1.addr, g2.addr]);
    cluster["health_checks"] = json!([http_check()]);
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "c"}}]))
        .cluster_json(cluster)
        .start()
        .await;
    let client = Client::http1();
    for i in 0..30 {
        let r = client.get(&strait.url(&format!("/r{i}"))).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    only_checks(&bad);
    assert_eq!(
        g1.requests() + g2.requests(),
        30 + 2,
        "30 requests and 2 checks"
    );
}

fn replace(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, dir.join(name)).expect("rename");
}

fn rds(version: &str, cluster: &str) -> String {
    format!(
        "version_info: '{version}'
resources:
- '@type': type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: rc
  virtual_hosts:
  - name: all
    domains: ['*']
    routes: [{{match: {{prefix: /}}, route: {{cluster: {cluster}}}}}]
"
    )
}

fn eds(addrs: &[SocketAddr]) -> String {
    let eps: Vec<String> = addrs
        .iter()
        .map(|a| {
            format!(
                "{{endpoint: {{address: {{socket_address: {{address: '{}', port_value: {}}}}}}}}}",
                a.ip(),
                a.port()
            )
        })
        .collect();
    format!(
        "version_info: '1'
resources:
- '@type': type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: c
  endpoints: [{{lb_endpoints: [{}]}}]
",
        eps.join(", ")
    )
}

fn cds_with_c(dir: &Path) -> String {
    format!(
        "version_info: '2'
resources:
- '@type': type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: c
  type: EDS
  connect_timeout: 1s
  eds_cluster_config:
    eds_config: {{path_config_source: {{path: '{d}/eds.yaml', watched_directory: {{path: '{d}'}}}}}}
  health_checks:
  - {{timeout: 1s, interval: 10s, unhealthy_threshold: 1, healthy_threshold: 1,
      http_health_check: {{path: /healthz}}}}
",
        d = dir.display()
    )
}

/// A cluster that arrives over CDS + EDS while traffic flows: the routes switch to it only
/// once it is warm, and its first requests already avoid the host failing its check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_arriving_over_xds_serves_only_checked_hosts() {
    let a = Upstream::start("a").await;
    let (bad, g1, g2) = upstreams().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    replace(d, "cds.yaml", "version_info: '1'\nresources: []\n");
    replace(d, "rds.yaml", &rds("1", "a"));
    let mut config = Config::new().cluster("a", &[a.addr]).json();
    config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        .as_object_mut()
        .map(|hcm| {
            hcm.remove("route_config");
            hcm.insert(
                "rds".into(),
                json!({"route_config_name": "rc", "config_source": {"path_config_source": {
                    "path": format!("{}/rds.yaml", d.display()),
                    "watched_directory": {"path": d.display().to_string()}}}}),
            )
        });
    config["dynamic_resources"] = json!({"cds_config": {"path_config_source": {
        "path": format!("{}/cds.yaml", d.display()),
        "watched_directory": {"path": d.display().to_string()}}}});
    let strait = Strait::start(&serde_yaml_ng::to_string(&config).expect("yaml")).await;
    let client = Client::http1();
    let url = strait.url("/x");
    let r = client.get(&url).await;
    assert_eq!((r.status.as_u16(), r.upstream()), (200, Some("a")));

    replace(d, "eds.yaml", &eds(&[bad.addr, g1.addr, g2.addr]));
    replace(d, "cds.yaml", &cds_with_c(d));
    replace(d, "rds.yaml", &rds("2", "c"));
    // Every request on the way is answered by `a`, or by a checked host of `c` — or, as in
    // Envoy, with 503 NC while the new routes name `c` before it is warm (the route and
    // cluster files are separate subscriptions).
    let deadline = Instant::now() + LIMIT;
    let mut on_c = 0;
    while on_c < 20 {
        let r = client.get(&url).await;
        match (r.status.as_u16(), r.upstream()) {
            (200, Some("a")) | (503, None) => assert_eq!(on_c, 0, "c stopped serving"),
            (200, Some("g1" | "g2")) => on_c += 1,
            other => panic!("answered {other:?}: {}", r.text()),
        }
        assert!(Instant::now() < deadline, "routes never switched to c");
    }
    only_checks(&bad);
}
