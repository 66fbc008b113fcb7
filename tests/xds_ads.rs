//! xDS end to end: the real `strait` binary driven by Strait's reference control plane
//! (in-process, over real sockets), SotW and Delta: bring-up from a bootstrap with only
//! `dynamic_resources`, endpoint / cluster / route changes under a client loop with zero
//! failures, listeners added and removed, a NACKed push that leaves the old config serving,
//! the last-known-good store across a restart while the control plane is down, and failover.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::xds::{eds_cluster, endpoints, listener};
use common::{Client, Strait, Upstream};
use serde_json::Value;
use strait_xds::control_plane::{load_dir, ControlPlane, Resources, ServerHandle};

const LIMIT: Duration = Duration::from_secs(15);

// === resources (proto3 YAML, as a control plane's directory holds them) ===

fn route(name: &str, cluster: &str) -> String {
    format!(
        "'@type': type.googleapis.com/envoy.config.route.v3.RouteConfiguration
name: {name}
virtual_hosts:
- name: all
  domains: ['*']
  routes: [{{match: {{prefix: /}}, route: {{cluster: {cluster}}}}}]
"
    )
}

/// Loads resource documents the way the control plane reads its directory.
fn resources(docs: &[String]) -> Resources {
    let dir = tempfile::tempdir().unwrap();
    for (i, d) in docs.iter().enumerate() {
        std::fs::write(dir.path().join(format!("r{i}.yaml")), d).unwrap();
    }
    load_dir(dir.path()).unwrap()
}

fn publish(cp: &ControlPlane, docs: &[String]) -> u64 {
    cp.replace_all(resources(docs));
    cp.push()
}

/// A bootstrap with only `dynamic_resources` (plus the static cluster naming the control
/// planes) and an admin.
fn bootstrap(cps: &[SocketAddr], delta: bool, fetch_timeout: &str) -> String {
    let api = if delta { "DELTA_GRPC" } else { "GRPC" };
    let mut clusters = String::new();
    let mut services = String::new();
    for (i, a) in cps.iter().enumerate() {
        clusters.push_str(&format!(
            "  - name: xds{i}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: xds{i}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: '{}', port_value: {}}}}}}}}}]}}]
",
            a.ip(),
            a.port()
        ));
        services.push_str(&format!("    - envoy_grpc: {{cluster_name: xds{i}}}\n"));
    }
    format!(
        "node: {{id: test-node, cluster: test}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
dynamic_resources:
  ads_config:
    api_type: {api}
    transport_api_version: V3
    grpc_services:
{services}  cds_config: {{ads: {{}}, resource_api_version: V3, initial_fetch_timeout: {fetch_timeout}}}
  lds_config: {{ads: {{}}, resource_api_version: V3, initial_fetch_timeout: {fetch_timeout}}}
static_resources:
  clusters:
{clusters}"
    )
}

async fn serve_cp(cp: &ControlPlane, addr: Option<SocketAddr>) -> (ServerHandle, SocketAddr) {
    let bind = addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
    let l = tokio::net::TcpListener::bind(bind).await.unwrap();
    let a = l.local_addr().unwrap();
    (cp.spawn(l), a)
}

/// The bound address of each listener, from `/listeners`.
async fn listeners(s: &Strait) -> HashMap<String, SocketAddr> {
    let v = s.admin_get("/listeners?format=json").await.json();
    let mut out = HashMap::new();
    for st in v["listener_statuses"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let sa = &st["local_address"]["socket_address"];
        let a = format!(
            "{}:{}",
            sa["address"].as_str().unwrap_or_default(),
            sa["port_value"].as_u64().unwrap_or(0)
        );
        if let (Some(n), Ok(a)) = (st["name"].as_str(), a.parse()) {
            out.insert(n.to_string(), a);
        }
    }
    out
}

async fn wait_listener(s: &Strait, name: &str, present: bool) -> Option<SocketAddr> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let l = listeners(s).await;
        if l.contains_key(name) == present {
            return l.get(name).copied();
        }
        assert!(
            Instant::now() < deadline,
            "listener {name} present={present}: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends requests until one is answered by `want`; every response on the way must be a 200.
async fn until_upstream(client: &Client, url: &str, want: &str) -> usize {
    let deadline = Instant::now() + LIMIT;
    let mut n = 0;
    loop {
        let r = client.get(url).await;
        n += 1;
        assert_eq!(
            r.status,
            200,
            "request {n} failed during the update: {}",
            r.text()
        );
        if r.upstream() == Some(want) {
            return n;
        }
        assert!(Instant::now() < deadline, "{want} never answered");
    }
}

async fn config_dump(s: &Strait) -> Value {
    s.admin_get("/config_dump").await.json()
}

fn dumped<'a>(dump: &'a Value, type_suffix: &str) -> &'a Value {
    dump["configs"]
        .as_array()
        .and_then(|c| {
            c.iter().find(|c| {
                c["@type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with(type_suffix))
            })
        })
        .unwrap_or(&Value::Null)
}

fn base_resources(a: &Upstream, b: &Upstream) -> Vec<String> {
    vec![
        eds_cluster("svc"),
        eds_cluster("other"),
        endpoints("svc", &[a.addr]),
        endpoints("other", &[b.addr]),
        route("rc", "svc"),
        listener("ingress", "rc"),
    ]
}

async fn bring_up_and_change(delta: bool) {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let c = Upstream::start("c").await;
    let cp = ControlPlane::new();
    let mut docs = base_resources(&a, &b);
    publish(&cp, &docs);
    let (_srv, cp_addr) = serve_cp(&cp, None).await;
    let s = Strait::start(&bootstrap(&[cp_addr], delta, "10s")).await;
    let ingress = wait_listener(&s, "ingress", true).await.unwrap();
    let url = format!("http://{ingress}/x");
    let client = Client::http1();
    let r = client.get(&url).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.upstream(), Some("a"));
    assert_eq!(s.stat("control_plane.connected_state").await, Some(1));
    assert!(s.stat("cluster_manager.cds.update_success").await >= Some(1));

    // Endpoint change (EDS): svc moves from a to c.
    docs[2] = endpoints("svc", &[c.addr]);
    publish(&cp, &docs);
    until_upstream(&client, &url, "c").await;

    // Route change (RDS) to another cluster, on the same keep-alive connection.
    docs[4] = route("rc", "other");
    publish(&cp, &docs);
    until_upstream(&client, &url, "b").await;

    // A new cluster and a route to it in one push: the route waits for the cluster's
    // endpoints (make-before-break), so no request sees 503.
    docs.push(eds_cluster("fresh"));
    docs.push(endpoints("fresh", &[a.addr]));
    docs[4] = route("rc", "fresh");
    publish(&cp, &docs);
    until_upstream(&client, &url, "a").await;

    // Listener added, then removed.
    docs.push(route("rc2", "svc"));
    docs.push(listener("second", "rc2"));
    publish(&cp, &docs);
    let second = wait_listener(&s, "second", true).await.unwrap();
    let r = client.get(&format!("http://{second}/y")).await;
    assert_eq!(r.upstream(), Some("c"));
    docs.pop();
    publish(&cp, &docs);
    wait_listener(&s, "second", false).await;
    assert!(
        tokio::net::TcpStream::connect(second).await.is_err(),
        "a removed listener must stop accepting"
    );

    // A bad push is NACKed with the resource named, and the old config keeps serving.
    let mut bad = docs.clone();
    bad.push(
        "'@type': type.googleapis.com/envoy.config.cluster.v3.Cluster
name: broken
connect_timeout: 1s
lb_policy: CLUSTER_PROVIDED
"
        .to_string(),
    );
    publish(&cp, &bad);
    let seen = cp
        .wait_seen(LIMIT, |v| {
            v.iter().any(|s| {
                s.error
                    .as_deref()
                    .is_some_and(|e| e.contains("cluster 'broken'") && e.contains("lb_policy"))
            })
        })
        .await;
    assert!(seen.is_ok(), "no NACK naming the cluster: {:?}", seen.err());
    let r = client.get(&url).await;
    assert_eq!((r.status.as_u16(), r.upstream()), (200, Some("a")));
    assert!(s.stat("cluster_manager.cds.update_rejected").await >= Some(1));

    // config_dump shows the dynamic resources, their versions and where they came from.
    let d = config_dump(&s).await;
    let clusters = dumped(&d, "ClustersConfigDump");
    let active = clusters["dynamic_active_clusters"].as_array().unwrap();
    assert!(active.iter().any(|c| c["cluster"]["name"] == "svc"
        && c["strait_source"] == "control_plane"
        && !c["version_info"].as_str().unwrap_or_default().is_empty()));
    let l = dumped(&d, "ListenersConfigDump");
    assert!(l["dynamic_listeners"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["name"] == "ingress" && l["active_state"]["listener"]["name"] == "ingress"));
    let routes = dumped(&d, "RoutesConfigDump");
    assert!(routes["dynamic_route_configs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["route_config"]["name"] == "rc"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_bring_up_updates_and_nack() {
    bring_up_and_change(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_bring_up_updates_and_nack() {
    bring_up_and_change(true).await;
}

/// Control plane gone: Strait keeps serving; restarted while it is still down, Strait serves
/// from its store; the control plane comes back with a change, which is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_known_good_store_across_restart() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_string();
    let cp = ControlPlane::new();
    let mut docs = base_resources(&a, &b);
    publish(&cp, &docs);
    let (srv, cp_addr) = serve_cp(&cp, None).await;
    let yaml = bootstrap(&[cp_addr], true, "1s");
    let args = ["--xds-state-dir", state_dir.as_str()];
    let s = Strait::start_with(&yaml, &args).await;
    let ingress = wait_listener(&s, "ingress", true).await.unwrap();
    let client = Client::http1();
    assert_eq!(
        client.get(&format!("http://{ingress}/")).await.upstream(),
        Some("a")
    );
    // The store is written off the request path, after each ACK: wait until all four types
    // are on disk before the restart.
    let deadline = Instant::now() + LIMIT;
    while std::fs::read_dir(state.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".lkg"))
        .count()
        < 4
    {
        assert!(Instant::now() < deadline, "store never written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    srv.stop().await;
    assert_eq!(
        s.wait_stat("control_plane.connected_state", 0).await,
        Some(0)
    );
    let r = client.get(&format!("http://{ingress}/")).await;
    assert_eq!((r.status.as_u16(), r.upstream()), (200, Some("a")));
    drop(s);
    let saved: Vec<String> = std::fs::read_dir(state.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert!(
        saved.iter().any(|f| f.contains("RouteConfiguration")),
        "{saved:?}"
    );

    // Restart with the control plane down: after initial_fetch_timeout, the store serves.
    let s = Strait::start_with(&yaml, &args).await;
    assert!(s.stderr().contains("xDS store loaded"), "{}", s.stderr());
    let ingress = wait_listener(&s, "ingress", true).await.unwrap();
    let url = format!("http://{ingress}/");
    let r = client.get(&url).await;
    assert_eq!((r.status.as_u16(), r.upstream()), (200, Some("a")));
    let d = config_dump(&s).await;
    let active = &dumped(&d, "ClustersConfigDump")["dynamic_active_clusters"];
    assert!(active
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["strait_source"] == "store"));

    // Meanwhile the route changed; the control plane comes back on the same address.
    docs[4] = route("rc", "other");
    publish(&cp, &docs);
    let (_srv, _) = serve_cp(&cp, Some(cp_addr)).await;
    until_upstream(&client, &url, "b").await;
    // Delta resumed from what the store held: the new stream announced its versions.
    let seen = cp.seen();
    assert!(
        seen.iter()
            .any(|s| s.delta && !s.initial_versions.is_empty()),
        "no initial_resource_versions on reconnect"
    );
}

/// Two control planes: the first is down, so Strait fails over to the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_to_the_second_control_plane() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    // A port with nothing listening.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let cp = ControlPlane::new();
    publish(&cp, &base_resources(&a, &b));
    let (_srv, cp_addr) = serve_cp(&cp, None).await;
    let s = Strait::start(&bootstrap(&[dead, cp_addr], false, "10s")).await;
    let ingress = wait_listener(&s, "ingress", true).await.unwrap();
    let r = Client::http1().get(&format!("http://{ingress}/")).await;
    assert_eq!((r.status.as_u16(), r.upstream()), (200, Some("a")));
}

/// Envoy's subscription stats through the real binary: `cluster_manager.cds.*`,
/// `listener_manager.lds.*`, `http.<stat_prefix>.rds.<name>.*` and EDS's `cluster.<name>.*`,
/// in `/stats` and `/stats/prometheus`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_stats_use_envoy_names() {
    use strait_xds::dynamic::version_hash;
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let cp = ControlPlane::new();
    let mut docs = base_resources(&a, &b);
    let v1 = publish(&cp, &docs).to_string();
    let (_srv, cp_addr) = serve_cp(&cp, None).await;
    let s = Strait::start(&bootstrap(&[cp_addr], false, "10s")).await;
    wait_listener(&s, "ingress", true).await.unwrap();
    assert_eq!(
        s.wait_stat("http.ingress.rds.rc.update_success", 1).await,
        Some(1)
    );
    let st = s.stats().await;
    let h1 = version_hash(&v1);
    for name in [
        "cluster_manager.cds.version",
        "listener_manager.lds.version",
        "cluster.svc.version",
        "http.ingress.rds.rc.version",
    ] {
        assert_eq!(st.get(name), Some(&h1), "{name}");
    }
    // One response each; subscribing counted one attempt, as Envoy shows.
    for name in [
        "cluster_manager.cds.update_attempt",
        "listener_manager.lds.update_attempt",
        "cluster.svc.update_attempt",
        "http.ingress.rds.rc.update_attempt",
    ] {
        assert_eq!(st.get(name), Some(&2), "{name}");
    }
    assert_eq!(st.get("cluster.svc.update_success"), Some(&1));
    assert_eq!(st.get("http.ingress.rds.rc.config_reload"), Some(&1));
    assert_eq!(st.get("cluster_manager.cds.config_reload"), Some(&1));
    assert_eq!(st.get("http.ingress.rds.rc.init_fetch_timeout"), Some(&0));
    assert!(st.get("http.ingress.rds.rc.update_time") > Some(&0));

    // A route change reloads RDS and moves every version.
    docs[4] = route("rc", "other");
    let v2 = publish(&cp, &docs).to_string();
    until_upstream(
        &Client::http1(),
        &format!("http://{}/", s.listener("ingress")),
        "b",
    )
    .await;
    assert_eq!(
        s.wait_stat("http.ingress.rds.rc.config_reload", 2).await,
        Some(2)
    );
    assert_eq!(
        s.stat("http.ingress.rds.rc.version").await,
        Some(version_hash(&v2))
    );

    // A rejected route configuration counts on its subscription; the version stays.
    let mut bad = docs.clone();
    bad[4] = route("rc", "other").replace(
        "route: {cluster: other}",
        "route: {cluster: other, timeout: -1s}",
    );
    publish(&cp, &bad);
    assert_eq!(
        s.wait_stat("http.ingress.rds.rc.update_rejected", 1).await,
        Some(1)
    );
    assert_eq!(
        s.stat("http.ingress.rds.rc.version").await,
        Some(version_hash(&v2))
    );

    let prom = s.admin_get("/stats/prometheus").await.text();
    assert!(
        prom.contains(
            "envoy_http_rds_config_reload{envoy_rds_route_config=\"rc\",envoy_http_conn_manager_prefix=\"ingress\"} 2"
        ),
        "{prom}"
    );
    // The reference control plane pushes only the types that changed: CDS is still at v1.
    assert!(
        prom.contains(&format!("envoy_cluster_manager_cds_version{{}} {h1}\n")),
        "{prom}"
    );
    // One series per name: the cluster block and the EDS subscription share it.
    let series = prom
        .lines()
        .filter(|l| l.starts_with("envoy_cluster_update_success{envoy_cluster_name=\"svc\"}"))
        .count();
    assert_eq!(series, 1, "{prom}");
}
