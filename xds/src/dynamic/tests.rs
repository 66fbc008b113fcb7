//! The dynamic configuration on its own: validation and NACK details, SotW removal rules,
//! warming (make-before-break), the initial-fetch gate, and the last-known-good store.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use strait_filters::MemoryStats;

use super::*;
use crate::decode::{json_to_proto, parse_document, Syntax};

fn any(yaml: &str) -> Any {
    let v = parse_document(yaml, Syntax::Yaml).unwrap();
    Any::decode(json_to_proto(&v, "google.protobuf.Any").unwrap().as_slice()).unwrap()
}

fn res(type_url: &str, yaml: &str, version: &str) -> Resource {
    let body = any(yaml);
    Resource {
        name: ads::resource_name(type_url, &body).unwrap(),
        version: version.into(),
        body,
    }
}

fn cluster(name: &str) -> Resource {
    res(
        CLUSTER_TYPE,
        &format!(
            "'@type': type.googleapis.com/envoy.config.cluster.v3.Cluster
name: {name}
type: EDS
eds_cluster_config: {{eds_config: {{ads: {{}}}}}}"
        ),
        "1",
    )
}

fn cla(name: &str, port: u16) -> Resource {
    res(
        ENDPOINT_TYPE,
        &format!(
            "'@type': type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
cluster_name: {name}
endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]"
        ),
        "1",
    )
}

fn route(name: &str, cluster: &str) -> Resource {
    res(
        ROUTE_TYPE,
        &format!(
            "'@type': type.googleapis.com/envoy.config.route.v3.RouteConfiguration
name: {name}
virtual_hosts: [{{name: all, domains: ['*'], routes: [{{match: {{prefix: /}}, route: {{cluster: {cluster}}}}}]}}]"
        ),
        "1",
    )
}

fn listener(name: &str, route: &str, port: u16) -> Resource {
    res(
        LISTENER_TYPE,
        &format!(
            "'@type': type.googleapis.com/envoy.config.listener.v3.Listener
name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
filter_chains:
- filters:
  - name: hcm
    typed_config:
      '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: x
      rds: {{route_config_name: {route}, config_source: {{ads: {{}}}}}}
      http_filters: [{{name: envoy.filters.http.router}}]"
        ),
        "1",
    )
}

fn ads_bootstrap() -> Loaded {
    let model = model::Bootstrap {
        dynamic: Some(model::DynamicResources {
            ads: Some(model::AdsSource {
                delta: false,
                clusters: vec![],
            }),
            lds: Some(model::ConfigSource {
                kind: ConfigSourceKind::Ads,
                initial_fetch_timeout: Some(Duration::from_secs(60)),
            }),
            cds: Some(model::ConfigSource {
                kind: ConfigSourceKind::Ads,
                initial_fetch_timeout: Some(Duration::from_secs(60)),
            }),
        }),
        ..Default::default()
    };
    Loaded {
        model,
        statics: Statics::default(),
    }
}

fn dynamic(store: Option<PathBuf>) -> Dynamic {
    Dynamic::new(ads_bootstrap(), store, Arc::new(MemoryStats::default())).unwrap()
}

fn state(rs: Vec<Resource>) -> Update {
    Update::State(rs)
}

fn published(d: &Dynamic) -> Option<Arc<model::Bootstrap>> {
    d.config().borrow().clone()
}

fn route_cluster(l: &model::Listener) -> String {
    let rc = &l.hcm.route_config;
    resources::route_clusters(rc)
        .first()
        .map(|s| s.to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn warms_before_publishing_and_keeps_old_routes_until_new_clusters_are_warm() {
    let d = dynamic(None);
    d.apply(CLUSTER_TYPE, "1", state(vec![cluster("a")]))
        .unwrap();
    // EDS names follow the clusters.
    assert!(d.subscriptions().borrow()[ENDPOINT_TYPE].contains("a"));
    d.apply(LISTENER_TYPE, "1", state(vec![listener("l", "r", 0)]))
        .unwrap();
    assert!(d.subscriptions().borrow()[ROUTE_TYPE].contains("r"));
    // Nothing is warm yet: the published config has neither the cluster nor the listener.
    let p = published(&d).unwrap();
    assert!(p.clusters.is_empty() && p.listeners.is_empty());
    assert!(!*d.ready().borrow());
    d.apply(ENDPOINT_TYPE, "1", state(vec![cla("a", 1)]))
        .unwrap();
    d.apply(ROUTE_TYPE, "1", state(vec![route("r", "a")]))
        .unwrap();
    let p = published(&d).unwrap();
    assert_eq!(p.clusters.len(), 1);
    assert_eq!(p.eds["a"].endpoints[0].lb_endpoints.len(), 1);
    assert_eq!(route_cluster(&p.listeners[0]), "a");
    assert!(*d.ready().borrow());

    // A route to a cluster that is still warming: the listener keeps its old routes.
    d.apply(CLUSTER_TYPE, "2", state(vec![cluster("a"), cluster("b")]))
        .unwrap();
    d.apply(ROUTE_TYPE, "2", state(vec![route("r", "b")]))
        .unwrap();
    let p = published(&d).unwrap();
    assert_eq!(route_cluster(&p.listeners[0]), "a");
    assert_eq!(p.clusters.len(), 1, "b is warming");
    d.apply(ENDPOINT_TYPE, "2", state(vec![cla("b", 2)]))
        .unwrap();
    let p = published(&d).unwrap();
    assert_eq!(route_cluster(&p.listeners[0]), "b");
    // Unchanged clusters keep their `Arc` (the data plane keeps their state).
    let before = p.clusters.iter().find(|c| c.name == "a").unwrap().clone();
    d.apply(ENDPOINT_TYPE, "3", state(vec![cla("a", 3)]))
        .unwrap();
    let p = published(&d).unwrap();
    assert!(Arc::ptr_eq(
        &before,
        p.clusters.iter().find(|c| c.name == "a").unwrap()
    ));
    let dump = &p.dynamic_dump;
    assert_eq!(dump.cds_version, "2");
    assert!(dump
        .clusters
        .iter()
        .all(|c| c.source == ResourceSource::ControlPlane));
}

#[tokio::test]
async fn sotw_removal_rules_and_nacks_keep_the_previous_state() {
    let d = dynamic(None);
    d.apply(CLUSTER_TYPE, "1", state(vec![cluster("a"), cluster("b")]))
        .unwrap();
    d.apply(ENDPOINT_TYPE, "1", state(vec![cla("a", 1), cla("b", 2)]))
        .unwrap();
    // CDS: missing means removed.
    d.apply(CLUSTER_TYPE, "2", state(vec![cluster("a")]))
        .unwrap();
    assert_eq!(d.versions(CLUSTER_TYPE).len(), 1);
    // EDS: omission is not removal.
    d.apply(ENDPOINT_TYPE, "2", state(vec![cla("a", 3)]))
        .unwrap();
    assert_eq!(d.versions(ENDPOINT_TYPE).len(), 2);
    // Delta removal.
    d.apply(
        ENDPOINT_TYPE,
        "3",
        Update::Delta {
            added: vec![],
            removed: vec!["b".into()],
        },
    )
    .unwrap();
    assert_eq!(d.versions(ENDPOINT_TYPE).len(), 1);

    // An invalid cluster: NACK naming it and the field; nothing of the update is applied.
    let bad = res(
        CLUSTER_TYPE,
        "'@type': type.googleapis.com/envoy.config.cluster.v3.Cluster
name: bad
connect_timeout: -1s",
        "3",
    );
    let e = d
        .apply(CLUSTER_TYPE, "3", state(vec![cluster("c"), bad]))
        .unwrap_err();
    assert!(e.starts_with("cluster 'bad': connect_timeout"), "{e}");
    assert_eq!(d.versions(CLUSTER_TYPE).keys().collect::<Vec<_>>(), ["a"]);
    // Two listeners on one port.
    let e = d
        .apply(
            LISTENER_TYPE,
            "1",
            state(vec![listener("x", "r", 7001), listener("y", "r", 7001)]),
        )
        .unwrap_err();
    assert!(e.contains("already used by listener"), "{e}");
}

#[tokio::test]
async fn store_round_trip_and_corrupt_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let d = dynamic(Some(dir.path().into()));
        d.apply(CLUSTER_TYPE, "7", state(vec![cluster("a")]))
            .unwrap();
        d.apply(ENDPOINT_TYPE, "7", state(vec![cla("a", 1)]))
            .unwrap();
        // Saved off the apply path; wait (bounded) for both files.
        let mut n = 0;
        while Store::open(dir.path()).unwrap().load_all().unwrap().len() < 2 {
            n += 1;
            assert!(n < 500, "store not written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let d = dynamic(Some(dir.path().into()));
    // Loaded, reported for Delta's initial_resource_versions, but not published before the
    // initial fetch times out or a control plane answers.
    assert_eq!(d.versions(CLUSTER_TYPE)["a"], "1");
    assert!(published(&d).is_none());
    d.apply(LISTENER_TYPE, "1", state(vec![])).unwrap();
    d.apply(CLUSTER_TYPE, "8", state(vec![cluster("a")]))
        .unwrap();
    let p = published(&d).unwrap();
    assert_eq!(p.clusters.len(), 1);
    let src: Vec<_> = p.dynamic_dump.clusters.iter().map(|c| c.source).collect();
    assert_eq!(src, [ResourceSource::ControlPlane]);
    let eds: Vec<_> = p
        .dynamic_dump
        .endpoint_configs
        .iter()
        .map(|c| c.source)
        .collect();
    assert_eq!(eds, [ResourceSource::Store]);

    // A damaged file: the whole store is ignored, never half-loaded.
    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .contains("ClusterLoadAssignment")
        })
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let d = dynamic(Some(dir.path().into()));
    assert!(d.versions(CLUSTER_TYPE).is_empty());
    assert!(d.versions(ENDPOINT_TYPE).is_empty());
}

#[tokio::test(start_paused = true)]
async fn initial_fetch_timeout_opens_the_gate_and_warms_what_never_came() {
    let d = dynamic(None);
    d.apply(CLUSTER_TYPE, "1", state(vec![cluster("a")]))
        .unwrap();
    assert!(published(&d).is_none());
    let mut rx = d.config();
    tokio::time::sleep(Duration::from_secs(61)).await;
    let p = rx.wait_for(|c| c.is_some()).await.unwrap().clone().unwrap();
    // The cluster's endpoints never came: it goes active with none, as in Envoy.
    assert_eq!(p.clusters.len(), 1);
    assert!(p.eds["a"].endpoints.is_empty());
    assert!(*d.ready().borrow());
}

#[tokio::test]
async fn a_changed_listener_keeps_serving_its_previous_version_while_it_warms() {
    let d = dynamic(None);
    d.apply(CLUSTER_TYPE, "1", state(vec![cluster("a")]))
        .unwrap();
    d.apply(ENDPOINT_TYPE, "1", state(vec![cla("a", 1)]))
        .unwrap();
    d.apply(LISTENER_TYPE, "1", state(vec![listener("l", "r", 0)]))
        .unwrap();
    d.apply(ROUTE_TYPE, "1", state(vec![route("r", "a")]))
        .unwrap();
    let before = published(&d).unwrap().listeners[0].clone();
    // The new version routes through `r2`, which has not arrived.
    d.apply(LISTENER_TYPE, "2", state(vec![listener("l", "r2", 0)]))
        .unwrap();
    let p = published(&d).unwrap();
    assert_eq!(p.listeners.len(), 1);
    assert!(Arc::ptr_eq(&p.listeners[0], &before));
    assert!(p.dynamic_dump.listeners[0].warming);
    d.apply(ROUTE_TYPE, "2", state(vec![route("r2", "a")]))
        .unwrap();
    let p = published(&d).unwrap();
    assert!(!Arc::ptr_eq(&p.listeners[0], &before));
    assert_eq!(p.listeners[0].hcm.route_config.name, "r2");
}

#[tokio::test]
async fn clusters_from_cds_get_the_bootstraps_local_cluster_for_zone_aware_routing() {
    let yaml = "
node: {id: n, locality: {region: a, zone: z1}}
cluster_manager: {local_cluster_name: local}
dynamic_resources:
  ads_config: {api_type: GRPC, transport_api_version: V3, grpc_services: [{envoy_grpc: {cluster_name: xds}}]}
  cds_config: {ads: {}, resource_api_version: V3}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        '@type': type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment: {cluster_name: xds, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}}]}]}
  - name: local
    type: STATIC
    load_assignment: {cluster_name: local, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 2}}}}]}]}
";
    let loaded = crate::bootstrap::load_full(
        &crate::bootstrap::Source::Yaml(yaml.into()),
        &crate::bootstrap::Overrides::default(),
    )
    .unwrap();
    let d = Dynamic::new(loaded, None, Arc::new(MemoryStats::default())).unwrap();
    d.apply(CLUSTER_TYPE, "1", state(vec![cluster("remote")]))
        .unwrap();
    d.apply(ENDPOINT_TYPE, "1", state(vec![cla("remote", 9)]))
        .unwrap();
    let p = published(&d).unwrap();
    let remote = p
        .clusters
        .iter()
        .find(|c| c.name == "remote")
        .expect("the CDS cluster is published once warm");
    assert_eq!(remote.lb.local_cluster_name.as_deref(), Some("local"));
}

fn cluster_with_timeout(name: &str, timeout: &str) -> Resource {
    res(
        CLUSTER_TYPE,
        &format!(
            "'@type': type.googleapis.com/envoy.config.cluster.v3.Cluster
name: {name}
type: EDS
eds_cluster_config: {{eds_config: {{ads: {{}}, initial_fetch_timeout: {timeout}}}}}"
        ),
        "1",
    )
}

fn listener_with_timeout(name: &str, route: &str, timeout: &str) -> Resource {
    res(
        LISTENER_TYPE,
        &format!(
            "'@type': type.googleapis.com/envoy.config.listener.v3.Listener
name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
filter_chains:
- filters:
  - name: hcm
    typed_config:
      '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: x
      rds: {{route_config_name: {route}, config_source: {{ads: {{}}, initial_fetch_timeout: {timeout}}}}}
      http_filters: [{{name: envoy.filters.http.router}}]"
        ),
        "1",
    )
}

#[tokio::test(start_paused = true)]
async fn rds_and_eds_warm_with_their_own_initial_fetch_timeout() {
    let stats = Arc::new(MemoryStats::default());
    // LDS and CDS wait 60 s; the RDS and EDS sources say otherwise.
    let d = Dynamic::new(ads_bootstrap(), None, stats.clone()).unwrap();
    d.apply(
        CLUSTER_TYPE,
        "1",
        state(vec![
            cluster_with_timeout("fast", "2s"),
            // 0 disables the timeout: warm only when the endpoints come.
            cluster_with_timeout("never", "0s"),
        ]),
    )
    .unwrap();
    d.apply(
        LISTENER_TYPE,
        "1",
        state(vec![listener_with_timeout("l", "r", "5s")]),
    )
    .unwrap();
    let p = published(&d).unwrap();
    assert!(p.clusters.is_empty() && p.listeners.is_empty());

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let p = published(&d).unwrap();
    let names: Vec<_> = p.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["fast"],
        "EDS timed out after its own 2 s, not CDS's 60 s"
    );
    assert!(p.eds["fast"].endpoints.is_empty());
    assert!(p.listeners.is_empty(), "RDS waits 5 s");
    assert_eq!(stats.counter_value("cluster.fast.init_fetch_timeout"), 1);

    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = published(&d).unwrap();
    assert_eq!(p.listeners.len(), 1, "the listener starts with no routes");
    assert!(p.listeners[0].hcm.route_config.virtual_hosts.is_empty());
    assert_eq!(stats.counter_value("http.x.rds.r.init_fetch_timeout"), 1);

    tokio::time::sleep(Duration::from_secs(600)).await;
    let p = published(&d).unwrap();
    assert_eq!(p.clusters.len(), 1, "`never` still warms");
    assert_eq!(stats.counter_value("cluster.never.init_fetch_timeout"), 0);
    assert!(!*d.ready().borrow());
    d.apply(ENDPOINT_TYPE, "1", state(vec![cla("never", 1)]))
        .unwrap();
    assert_eq!(published(&d).unwrap().clusters.len(), 2);
    assert!(*d.ready().borrow());
    // Counted once, however often the configuration is composed again.
    assert_eq!(stats.counter_value("cluster.fast.init_fetch_timeout"), 1);
    assert_eq!(
        stats.counter_value("cluster_manager.cds.init_fetch_timeout"),
        0
    );
}

#[tokio::test]
async fn subscription_stats_use_envoys_names_and_counting() {
    let stats = Arc::new(MemoryStats::default());
    let d = Dynamic::new(ads_bootstrap(), None, stats.clone()).unwrap();
    let c = |n: &str| stats.counter_value(n);
    let g = |n: &str| stats.gauge_value(n);
    // Subscribing counts one attempt, as Envoy shows `update_attempt: 2` after one response.
    assert_eq!(c("cluster_manager.cds.update_attempt"), 1);
    d.apply(CLUSTER_TYPE, "v1", state(vec![cluster("a"), cluster("b")]))
        .unwrap();
    assert_eq!(c("cluster_manager.cds.update_attempt"), 2);
    assert_eq!(c("cluster_manager.cds.update_success"), 1);
    assert_eq!(c("cluster_manager.cds.config_reload"), 1);
    assert_eq!(g("cluster_manager.cds.version"), stats::version_hash("v1"));
    assert!(g("cluster_manager.cds.update_time") > 0);
    // The same set again: a success, but no reload.
    d.apply(CLUSTER_TYPE, "v2", state(vec![cluster("a"), cluster("b")]))
        .unwrap();
    assert_eq!(c("cluster_manager.cds.config_reload"), 1);
    assert_eq!(g("cluster_manager.cds.version"), stats::version_hash("v2"));

    // EDS: per cluster, only for the resources a response carries.
    d.apply(ENDPOINT_TYPE, "e1", state(vec![cla("a", 1), cla("b", 1)]))
        .unwrap();
    d.apply(ENDPOINT_TYPE, "e2", state(vec![cla("a", 1), cla("b", 2)]))
        .unwrap();
    d.apply(ENDPOINT_TYPE, "e3", state(vec![cla("b", 3)]))
        .unwrap();
    assert_eq!(c("cluster.a.update_attempt"), 3);
    assert_eq!(c("cluster.a.update_success"), 2);
    assert_eq!(c("cluster.a.update_no_rebuild"), 1);
    assert_eq!(c("cluster.b.update_success"), 3);
    assert_eq!(c("cluster.b.update_no_rebuild"), 0);
    assert_eq!(g("cluster.a.version"), stats::version_hash("e2"));
    assert_eq!(g("cluster.b.version"), stats::version_hash("e3"));
    d.apply(
        ENDPOINT_TYPE,
        "e4",
        Update::Delta {
            added: vec![],
            removed: vec!["b".into()],
        },
    )
    .unwrap();
    assert_eq!(c("cluster.b.update_empty"), 1);

    // RDS: `http.<stat_prefix>.rds.<name>.*`; config_reload only when the routes change.
    d.apply(LISTENER_TYPE, "l1", state(vec![listener("l", "r", 0)]))
        .unwrap();
    assert_eq!(c("listener_manager.lds.update_success"), 1);
    assert_eq!(c("http.x.rds.r.update_attempt"), 1);
    d.apply(ROUTE_TYPE, "r1", state(vec![route("r", "a")]))
        .unwrap();
    d.apply(ROUTE_TYPE, "r2", state(vec![route("r", "a")]))
        .unwrap();
    assert_eq!(c("http.x.rds.r.update_success"), 2);
    assert_eq!(c("http.x.rds.r.config_reload"), 1);
    assert!(g("http.x.rds.r.config_reload_time_ms") > 0);
    assert_eq!(g("http.x.rds.r.version"), stats::version_hash("r2"));
    // A rejected response fails every subscription of its type.
    let bad = res(
        ROUTE_TYPE,
        "'@type': type.googleapis.com/envoy.config.route.v3.RouteConfiguration
name: r
virtual_hosts: [{name: v, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: a, timeout: -1s}}]}]",
        "r3",
    );
    d.apply(ROUTE_TYPE, "r3", state(vec![bad])).unwrap_err();
    assert_eq!(c("http.x.rds.r.update_rejected"), 1);
    assert_eq!(c("http.x.rds.r.update_attempt"), 4);
    assert_eq!(g("http.x.rds.r.version"), stats::version_hash("r2"));
    d.apply(CLUSTER_TYPE, "v3", state(vec![cluster("a"), bad_cluster()]))
        .unwrap_err();
    assert_eq!(c("cluster_manager.cds.update_rejected"), 1);

    // A broken ADS stream: update_failure on every ADS subscription.
    d.connection_failed();
    assert_eq!(c("cluster_manager.cds.update_failure"), 1);
    assert_eq!(c("listener_manager.lds.update_failure"), 1);
    assert_eq!(c("http.x.rds.r.update_failure"), 1);
    assert_eq!(c("cluster.a.update_failure"), 1);
}

fn bad_cluster() -> Resource {
    res(
        CLUSTER_TYPE,
        "'@type': type.googleapis.com/envoy.config.cluster.v3.Cluster
name: bad
connect_timeout: -1s",
        "1",
    )
}
