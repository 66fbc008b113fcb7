//! Filesystem xDS (`path_config_source`) end to end: LDS, CDS and RDS from DiscoveryResponse
//! files; replacing the RDS file by atomic rename switches routes with no failed request; a
//! file Strait refuses leaves the previous routes serving.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Client, Strait, Upstream};

const LIMIT: Duration = Duration::from_secs(15);

fn static_cluster(name: &str, addr: SocketAddr) -> String {
    format!(
        "- '@type': type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: {name}
  type: STATIC
  connect_timeout: 1s
  load_assignment:
    cluster_name: {name}
    endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: '{}', port_value: {}}}}}}}}}]}}]
",
        addr.ip(),
        addr.port()
    )
}

fn rds_file(version: &str, cluster: &str) -> String {
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

fn lds_file(dir: &Path) -> String {
    format!(
        "version_info: '1'
resources:
- '@type': type.googleapis.com/envoy.config.listener.v3.Listener
  name: ingress
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: ingress
        rds:
          route_config_name: rc
          config_source:
            path_config_source: {{path: '{d}/rds.yaml', watched_directory: {{path: '{d}'}}}}
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
",
        d = dir.display()
    )
}

/// Replaces `name` in `dir` atomically, as Envoy's documentation asks.
fn replace(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

async fn ingress(s: &Strait) -> SocketAddr {
    let deadline = Instant::now() + LIMIT;
    loop {
        let v = s.admin_get("/listeners?format=json").await.json();
        let found = v["listener_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["name"] == "ingress")
            .map(|l| {
                let sa = &l["local_address"]["socket_address"];
                format!(
                    "{}:{}",
                    sa["address"].as_str().unwrap_or(""),
                    sa["port_value"]
                )
            });
        if let Some(a) = found.and_then(|a| a.parse().ok()) {
            return a;
        }
        assert!(Instant::now() < deadline, "no ingress listener: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_drive_listeners_clusters_and_routes() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    replace(
        d,
        "cds.yaml",
        &format!(
            "version_info: '1'\nresources:\n{}{}",
            static_cluster("ca", a.addr),
            static_cluster("cb", b.addr)
        ),
    );
    replace(d, "rds.yaml", &rds_file("1", "ca"));
    replace(d, "lds.yaml", &lds_file(d));
    let yaml = format!(
        "admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
dynamic_resources:
  cds_config: {{path_config_source: {{path: '{d}/cds.yaml', watched_directory: {{path: '{d}'}}}}}}
  lds_config: {{path_config_source: {{path: '{d}/lds.yaml', watched_directory: {{path: '{d}'}}}}}}
",
        d = d.display()
    );
    let s = Strait::start(&yaml).await;
    let url = format!("http://{}/p", ingress(&s).await);
    let client = Client::http1();
    let r = client.get(&url).await;
    assert_eq!(
        (r.status.as_u16(), r.upstream()),
        (200, Some("a")),
        "{}",
        r.text()
    );

    // New routes by rename; every request on the way succeeds.
    replace(d, "rds.yaml", &rds_file("2", "cb"));
    let deadline = Instant::now() + LIMIT;
    loop {
        let r = client.get(&url).await;
        assert_eq!(r.status, 200, "{}", r.text());
        if r.upstream() == Some("b") {
            break;
        }
        assert!(Instant::now() < deadline, "routes never switched");
    }

    // A file that does not validate is refused; the routes stay.
    replace(d, "rds.yaml", "version_info: '3'\nresources:\n- name: rc\n");
    let deadline = Instant::now() + LIMIT;
    while !s.stderr().contains("xDS file rejected") {
        assert!(
            Instant::now() < deadline,
            "no rejection logged: {}",
            s.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client.get(&url).await;
    assert_eq!((r.status.as_u16(), r.upstream()), (200, Some("b")));
    let d = s.admin_get("/config_dump").await.json();
    let routes = d["configs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["@type"]
                .as_str()
                .unwrap_or("")
                .ends_with("RoutesConfigDump")
        })
        .cloned()
        .unwrap();
    let rc = &routes["dynamic_route_configs"][0];
    assert_eq!(
        (rc["version_info"].as_str(), rc["strait_source"].as_str()),
        (Some("2"), Some("file"))
    );
}
