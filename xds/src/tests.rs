//! Unit tests for loading: decoding (YAML, JSON, camelCase, `Any`), merging, overrides,
//! config dump, and each translation rule with its error path.

use std::time::Duration;

use serde_json::{json, Value};

use crate::model::{self, *};
use crate::{load, ConfigErrors, Overrides, Source};

const HCM: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";
const RC: &str =
    "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config";
const P_HCM: &str = "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config";

/// A minimal valid bootstrap, as JSON, to be edited by each test.
fn base() -> Value {
    json!({
        "static_resources": {
            "listeners": [{
                "name": "l0",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                        }],
                        "route_config": {
                            "name": "rc",
                            "virtual_hosts": [{
                                "name": "vh",
                                "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "c0"}}]
                            }]
                        }
                    }
                }]}]
            }],
            "clusters": [{
                "name": "c0",
                "load_assignment": {"cluster_name": "c0", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}}}
                ]}]}
            }]
        }
    })
}

/// Sets `ptr` (a JSON pointer; missing objects are created) to `val`.
fn set(v: &mut Value, ptr: &str, val: Value) {
    let mut cur = v;
    for part in ptr.trim_start_matches('/').split('/') {
        cur = match cur {
            Value::Array(a) => &mut a[part.parse::<usize>().unwrap()],
            Value::Object(o) => o.entry(part.to_string()).or_insert(json!({})),
            other => panic!("cannot index {other} with {part}"),
        };
    }
    *cur = val;
}

fn with(edits: &[(&str, Value)]) -> Value {
    let mut v = base();
    for (p, val) in edits {
        set(&mut v, p, val.clone());
    }
    v
}

fn try_load(v: &Value) -> Result<model::Bootstrap, ConfigErrors> {
    load(&Source::Yaml(v.to_string()), &Overrides::default())
}

fn ok(v: &Value) -> model::Bootstrap {
    match try_load(v) {
        Ok(b) => b,
        Err(e) => panic!("unexpected errors:\n{e}"),
    }
}

fn errors(v: &Value) -> Vec<String> {
    match try_load(v) {
        Ok(_) => panic!("expected errors, config was accepted"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

fn route0(b: &model::Bootstrap) -> &model::Route {
    &b.listeners[0].hcm.route_config.virtual_hosts[0].routes[0]
}

fn forward0(b: &model::Bootstrap) -> &ForwardAction {
    match &route0(b).action {
        RouteAction::Forward(f) => f,
        other => panic!("not a forward action: {other:?}"),
    }
}

// === Decoding ===

/// The repository's example configs. Cargo's run-time `CARGO_MANIFEST_DIR` first: a test binary
/// reused from a build in another checkout (a shared target directory) carries that checkout's
/// compile-time path.
fn example_configs() -> std::path::PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    manifest.join("../examples/configs")
}

#[test]
fn yaml_example_configs_load() {
    let dir = example_configs();
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            n += 1;
            if let Err(e) = load(&Source::Path(path.clone()), &Overrides::default()) {
                panic!("{}:\n{e}", path.display());
            }
        }
    }
    assert!(n >= 2);
}

#[test]
fn front_proxy_example_translates() {
    let path = example_configs().join("front-proxy.yaml");
    let b = load(&Source::Path(path), &Overrides::default()).unwrap();
    assert_eq!(b.node.id, "front-proxy-1");
    assert_eq!(
        b.admin.as_ref().unwrap().address,
        "127.0.0.1:9901".parse().unwrap()
    );
    let l = &b.listeners[0];
    assert_eq!(l.address, "127.0.0.1:10000".parse().unwrap());
    let vh = &l.hcm.route_config.virtual_hosts[0];
    let f = match &vh.routes[0].action {
        RouteAction::Forward(f) => f,
        _ => panic!(),
    };
    let ClusterSpecifier::Weighted(w) = &f.cluster else {
        panic!()
    };
    assert_eq!(w.total_weight, 100);
    assert_eq!(w.clusters[1].name, "service-b");
    assert_eq!(
        w.clusters[1].headers.response_headers_to_add[0].name,
        "x-canary"
    );
    // The virtual host's retry policy is copied into routes without their own.
    let r = f.retry_policy.as_ref().unwrap();
    assert_eq!(r.num_retries, 2);
    assert!(r.retry_on.has(RetryOn::GATEWAY_ERROR) && r.retry_on.has(RetryOn::CONNECT_FAILURE));
    assert_eq!(r.per_try_timeout, Some(Duration::from_secs(2)));
    assert_eq!(f.timeout, Some(Duration::from_secs(10)));
    assert_eq!(l.hcm.access_logs[0].sink, AccessLogSink::Stdout);
    assert_eq!(b.clusters[1].discovery, DiscoveryType::StrictDns);
    assert_eq!(
        b.clusters[1].lb_policy,
        LbPolicy::LeastRequest { choice_count: 2 }
    );
    assert_eq!(
        b.clusters[1].load_assignment.endpoints[0].lb_endpoints[0].address,
        EndpointAddress::Dns {
            host: "localhost".into(),
            port: 8083
        }
    );
    assert_eq!(b.clusters[1].dns_lookup_family, DnsLookupFamily::V4Only);
}

#[test]
fn json_file_and_camel_case_names() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = base();
    // camelCase everywhere JSON allows it, including inside an Any.
    let s = v
        .to_string()
        .replace("static_resources", "staticResources")
        .replace("filter_chains", "filterChains")
        .replace("socket_address", "socketAddress")
        .replace("port_value", "portValue")
        .replace("typed_config", "typedConfig")
        .replace("stat_prefix", "statPrefix")
        .replace("route_config", "routeConfig")
        .replace("virtual_hosts", "virtualHosts");
    v = serde_json::from_str(&s).unwrap();
    let path = dir.path().join("b.json");
    std::fs::write(&path, v.to_string()).unwrap();
    let b = load(&Source::Path(path), &Overrides::default()).unwrap();
    assert_eq!(b.listeners[0].hcm.stat_prefix, "ingress");
    assert_eq!(b.listeners[0].address.port(), 10000);
}

#[test]
fn json_extension_uses_the_json_parser() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.json");
    std::fs::write(&path, "node:\n  id: x\n").unwrap();
    let e = load(&Source::Path(path), &Overrides::default()).unwrap_err();
    assert!(e.0[0].message.starts_with("invalid JSON"), "{e}");
}

#[test]
fn unknown_fields_enums_and_types_are_errors_with_paths() {
    let v = with(&[("/static_resources/clusters/0/bogus", json!(1))]);
    assert_eq!(
        errors(&v),
        ["static_resources.clusters[0].bogus: unknown field"]
    );
    let v = with(&[(&format!("{P_HCM}/codec_type"), json!("HTTP9"))]);
    assert_eq!(
        errors(&v),
        [format!("{HCM}.codec_type: unrecognized enum value 'HTTP9'")]
    );
    let v = with(&[(
        &format!("{P_HCM}/@type"),
        json!("type.googleapis.com/foo.Bar"),
    )]);
    assert_eq!(
        errors(&v),
        ["static_resources.listeners[0].filter_chains[0].filters[0].typed_config: message 'foo.Bar' not found"]
    );
    let v = with(&[(
        "/static_resources/clusters/0/connect_timeout",
        json!("5 seconds"),
    )]);
    assert_eq!(
        errors(&v),
        ["static_resources.clusters[0].connect_timeout: failed to parse duration"]
    );
}

#[test]
fn yaml_syntax_errors_and_empty_documents() {
    let e = load(&Source::Yaml("a: [".into()), &Overrides::default()).unwrap_err();
    assert!(e.0[0].message.starts_with("invalid YAML"), "{e}");
    // An empty bootstrap is valid (Envoy starts with nothing configured).
    let b = load(&Source::Yaml(String::new()), &Overrides::default()).unwrap();
    assert!(b.listeners.is_empty() && b.admin.is_none());
}

#[test]
fn config_yaml_merges_over_the_file() {
    let extra = r#"
node: {id: merged}
static_resources:
  clusters:
  - name: c1
    load_assignment:
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 10.0.0.1, port_value: 80}}}}]}]
"#;
    let o = Overrides {
        config_yaml: Some(extra.into()),
        ..Default::default()
    };
    let mut v = base();
    set(&mut v, "/node", json!({"id": "file", "cluster": "kept"}));
    let b = load(&Source::Yaml(v.to_string()), &o).unwrap();
    assert_eq!(b.node.id, "merged");
    assert_eq!(b.node.cluster, "kept");
    let names: Vec<_> = b.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["c0", "c1"]);
    let o = Overrides {
        config_yaml: Some("bogus: 1".into()),
        ..Default::default()
    };
    let e = load(&Source::Yaml(v.to_string()), &o).unwrap_err();
    assert_eq!(e.to_string(), "--config-yaml: bogus: unknown field");
}

#[test]
fn service_overrides_set_the_node() {
    let o = Overrides {
        service_node: Some("n1".into()),
        service_cluster: Some("cl".into()),
        service_zone: Some("z1".into()),
        config_yaml: None,
    };
    let b = load(&Source::Yaml(base().to_string()), &o).unwrap();
    assert_eq!(b.node.id, "n1");
    assert_eq!(b.node.cluster, "cl");
    assert_eq!(b.node.locality.zone, "z1");
    let dump = b.dump.bootstrap.as_ref().unwrap().render();
    assert_eq!(dump["node"]["locality"]["zone"], "z1");
}

#[test]
fn config_dump_is_canonical_json() {
    let b = ok(&base());
    let d = &b.dump;
    let bootstrap = d.bootstrap.as_ref().unwrap().render();
    let l = &bootstrap["staticResources"]["listeners"][0];
    assert_eq!(l["name"], "l0");
    assert_eq!(
        l["filterChains"][0]["filters"][0]["typedConfig"]["@type"],
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    );
    assert_eq!(d.static_listeners[0].0, "l0");
    assert_eq!(
        d.static_listeners[0].1.render()["address"]["socketAddress"]["portValue"],
        10000
    );
    assert_eq!(d.static_clusters[0].0, "c0");
    assert_eq!(d.static_route_configs[0].0, "l0");
    assert_eq!(
        d.static_route_configs[0].1.render()["virtualHosts"][0]["name"],
        "vh"
    );
}

// === Defaults ===

#[test]
fn envoy_defaults_are_applied() {
    let b = ok(&base());
    let h = &b.listeners[0].hcm;
    assert_eq!(h.codec_type, CodecType::Auto);
    assert_eq!(h.stream_idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(h.request_timeout, None);
    assert_eq!(h.request_headers_timeout, None);
    assert_eq!(h.max_request_headers_kb, 60);
    assert!(!h.use_remote_address);
    assert!(h.generate_request_id);
    assert!(h.http_filters.is_empty());
    let f = forward0(&b);
    assert_eq!(f.timeout, Some(Duration::from_secs(15)));
    assert_eq!(f.idle_timeout, None);
    assert!(f.retry_policy.is_none());
    assert!(route0(&b).matcher.case_sensitive);
    let c = &b.clusters[0];
    assert_eq!(c.discovery, DiscoveryType::Static);
    assert_eq!(c.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.lb_policy, LbPolicy::RoundRobin);
    assert_eq!(c.protocol, UpstreamProtocol::Http1);
    assert_eq!(c.circuit_breakers, Thresholds::default());
    assert_eq!(c.idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(c.dns_refresh_rate, Duration::from_secs(5));
    let e = &c.load_assignment.endpoints[0].lb_endpoints[0];
    assert_eq!(e.load_balancing_weight, 1);
    assert_eq!(e.health_status, HealthStatus::Unknown);
    assert_eq!(
        e.address,
        EndpointAddress::Ip("127.0.0.1:8080".parse().unwrap())
    );
}

#[test]
fn zero_timeouts_disable() {
    let v = with(&[
        (&format!("{P_HCM}/stream_idle_timeout"), json!("0s")),
        (&format!("{P_HCM}/request_timeout"), json!("0s")),
        (
            &format!("{P_HCM}/route_config/virtual_hosts/0/routes/0/route/timeout"),
            json!("0s"),
        ),
    ]);
    let b = ok(&v);
    assert_eq!(b.listeners[0].hcm.stream_idle_timeout, None);
    assert_eq!(b.listeners[0].hcm.request_timeout, None);
    assert_eq!(forward0(&b).timeout, None);
}

// === Bootstrap and listener rules ===

#[test]
fn unsupported_bootstrap_fields_are_all_listed() {
    let v = with(&[
        (
            "/dynamic_resources",
            json!({"lds_config": {"path": "/tmp/x"}}),
        ),
        (
            "/layered_runtime",
            json!({"layers": [{"name": "x", "static_layer": {}}]}),
        ),
        ("/stats_flush_interval", json!("1s")),
        (
            "/static_resources/clusters/0/outlier_detection",
            json!({"always_eject_one_host": true}),
        ),
    ]);
    assert_eq!(
        errors(&v),
        [
            "dynamic_resources.lds_config.path: deprecated: use path_config_source (not supported)",
            "stats_flush_interval: not supported yet",
            "layered_runtime: not supported yet",
            "static_resources.clusters[0].outlier_detection.always_eject_one_host: not supported yet",
        ]
    );
    // An empty cluster_manager changes nothing and is accepted.
    ok(&with(&[("/cluster_manager", json!({}))]));
}

#[test]
fn listener_address_rules() {
    let p = "/static_resources/listeners/0/address/socket_address";
    let l = "static_resources.listeners[0].address.socket_address";
    let v = with(&[(&format!("{p}/address"), json!("localhost"))]);
    assert_eq!(
        errors(&v),
        [format!("{l}.address: malformed IP address: localhost")]
    );
    let v = with(&[(&format!("{p}/port_value"), json!(70000))]);
    assert_eq!(
        errors(&v),
        [format!("{l}.port_value: port 70000 out of range")]
    );
    let v = with(&[(p, json!({"address": "::1", "named_port": "http"}))]);
    assert_eq!(errors(&v), [format!("{l}.named_port: not supported yet")]);
    let v = with(&[(
        p,
        json!({"address": "::1", "port_value": 1, "resolver_name": "r"}),
    )]);
    assert_eq!(
        errors(&v),
        [format!("{l}.resolver_name: not supported yet")]
    );
    let v = with(&[(
        "/static_resources/listeners/0/address",
        json!({"pipe": {"path": "/tmp/s"}}),
    )]);
    assert_eq!(
        errors(&v),
        ["static_resources.listeners[0].address.pipe: not supported yet"]
    );
    let b = ok(&with(&[(p, json!({"address": "::1", "port_value": 0}))]));
    assert_eq!(b.listeners[0].address, "[::1]:0".parse().unwrap());
}

#[test]
fn listener_shape_rules() {
    let fc = "/static_resources/listeners/0/filter_chains";
    let mut v = base();
    let chain = v.pointer(&format!("{fc}/0")).unwrap().clone();
    set(&mut v, fc, json!([chain.clone(), chain]));
    assert_eq!(
        errors(&v),
        ["static_resources.listeners[0].filter_chains[1]: not supported yet (only one filter chain)"]
    );
    let v = with(&[(
        &format!("{fc}/0/filter_chain_match"),
        json!({"destination_port": 80}),
    )]);
    assert_eq!(
        errors(&v),
        ["static_resources.listeners[0].filter_chains[0].filter_chain_match: not supported yet"]
    );
    let v = with(&[(
        &format!("{fc}/0/filters/0/typed_config"),
        json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "t", "cluster": "c0"
        }),
    )]);
    assert_eq!(
        errors(&v),
        ["static_resources.listeners[0].filter_chains[0].filters[0].typed_config: unknown network filter 'envoy.filters.network.http_connection_manager' (type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy)"]
    );
    let mut v = base();
    let l = v.pointer("/static_resources/listeners/0").unwrap().clone();
    set(&mut v, "/static_resources/listeners", json!([l.clone(), l]));
    set(
        &mut v,
        "/static_resources/listeners/1/address/socket_address/port_value",
        json!(10001),
    );
    assert_eq!(
        errors(&v),
        ["static_resources.listeners[1].name: duplicate listener name 'l0'"]
    );
}

#[test]
fn hcm_rules() {
    let v = with(&[
        (&format!("{P_HCM}/stat_prefix"), json!("")),
        (&format!("{P_HCM}/codec_type"), json!("HTTP3")),
        (&format!("{P_HCM}/max_request_headers_kb"), json!(9000)),
        (&format!("{P_HCM}/server_name"), json!("bad\u{1}")),
        (&format!("{P_HCM}/server_header_transformation"), json!(7)),
    ]);
    assert_eq!(
        errors(&v),
        [
            format!("{HCM}.codec_type: not supported yet"),
            format!("{HCM}.stat_prefix: required"),
            format!("{HCM}.server_name: not a valid header value"),
            format!("{HCM}.server_header_transformation: unknown value 7"),
            format!("{HCM}.max_request_headers_kb: must be in 1..=8192, got 9000"),
        ]
    );
    let mut v = base();
    set(&mut v, &format!("{P_HCM}/route_config"), json!(null));
    set(
        &mut v,
        &format!("{P_HCM}/rds"),
        json!({"route_config_name": "x", "config_source": {"ads": {}}}),
    );
    // RDS over ADS needs an ADS stream.
    assert_eq!(
        errors(&v),
        [format!(
            "{HCM}.rds.config_source.ads: requires dynamic_resources.ads_config in the bootstrap"
        )]
    );
    let b = ok(&with(&[
        (&format!("{P_HCM}/codec_type"), json!("HTTP2")),
        (&format!("{P_HCM}/use_remote_address"), json!(true)),
        (&format!("{P_HCM}/xff_num_trusted_hops"), json!(2)),
        (&format!("{P_HCM}/generate_request_id"), json!(false)),
        (&format!("{P_HCM}/request_headers_timeout"), json!("2s")),
        (
            &format!("{P_HCM}/upgrade_configs"),
            json!([{"upgrade_type": "WebSocket"}, {"upgrade_type": "h2c", "enabled": false}]),
        ),
    ]));
    let h = &b.listeners[0].hcm;
    assert_eq!(h.codec_type, CodecType::Http2);
    assert!(h.use_remote_address && !h.generate_request_id);
    assert_eq!(h.xff_num_trusted_hops, 2);
    assert_eq!(h.request_headers_timeout, Some(Duration::from_secs(2)));
    assert_eq!(
        h.upgrade_types,
        [
            UpgradeConfig {
                upgrade_type: "websocket".into(),
                enabled: true
            },
            UpgradeConfig {
                upgrade_type: "h2c".into(),
                enabled: false
            },
        ]
    );
    let v = with(&[(
        &format!("{P_HCM}/upgrade_configs"),
        json!([
            {"upgrade_type": "websocket"}, {"upgrade_type": "websocket"},
            {"upgrade_type": "x", "filters": [{"name": "f"}]}
        ]),
    )]);
    assert_eq!(
        errors(&v),
        [
            format!("{HCM}.upgrade_configs[1].upgrade_type: multiple upgrade configs with the same name: 'websocket'"),
            format!("{HCM}.upgrade_configs[2].filters: not supported yet"),
        ]
    );
}

#[test]
fn http_filter_rules() {
    let router = json!({"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}});
    let lua_type = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua";
    let lua = json!({"name": "envoy.filters.http.lua", "typed_config": {"@type": lua_type}});
    let mut optional = lua.clone();
    optional["is_optional"] = json!(true);
    let fp = format!("{P_HCM}/http_filters");
    assert_eq!(
        errors(&with(&[(&fp, json!([lua.clone(), router.clone()]))])),
        [format!(
            "{HCM}.http_filters[0].typed_config: unknown filter 'envoy.filters.http.lua' ({lua_type})"
        )]
    );
    ok(&with(&[(&fp, json!([optional, router.clone()]))]));
    assert_eq!(
        errors(&with(&[(&fp, json!([router.clone(), lua]))])),
        [
            format!("{HCM}.http_filters[0]: terminal filter 'envoy.filters.http.router' must be the last filter in the chain"),
            format!("{HCM}.http_filters[1].typed_config: unknown filter 'envoy.filters.http.lua' ({lua_type})"),
        ]
    );
    // A built-in filter is built into the chain, in order, before the router.
    let cors = json!({"name": "envoy.filters.http.cors", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}});
    let b = ok(&with(&[(&fp, json!([cors, router.clone()]))]));
    let chain = &b.listeners[0].hcm.filter_chain;
    assert_eq!(chain.entries().len(), 1);
    assert_eq!(&*chain.entries()[0].name, "envoy.filters.http.cors");
    // Per-route configs are parsed by the registry at each level, errors at their path, and
    // resolved per route (most specific level wins).
    let rc = format!("{P_HCM}/route_config");
    let lrl_type =
        "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
    assert_eq!(
        errors(&with(&[(
            &format!("{rc}/virtual_hosts/0/routes/0/typed_per_filter_config"),
            json!({"envoy.filters.http.lua": {"@type": lua_type}})
        )])),
        [format!(
            "{RC}.virtual_hosts[0].routes[0].typed_per_filter_config[\"envoy.filters.http.lua\"]: unsupported per-route filter config type {lua_type}"
        )]
    );
    let b = ok(&with(&[
        (
            &format!("{rc}/typed_per_filter_config"),
            json!({"envoy.filters.http.buffer": {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true}}),
        ),
        (
            &format!("{rc}/virtual_hosts/0/routes/0/typed_per_filter_config"),
            json!({"envoy.filters.http.local_ratelimit": {"@type": lrl_type, "stat_prefix": "r"},
                   "envoy.filters.http.lua": {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                "is_optional": true, "config": {"@type": lua_type}}}),
        ),
    ]));
    let fc = &route0(&b).filter_route.per_filter_configs;
    assert!(!fc.is_empty(), "per-route configs expected");
    assert_eq!(
        fc.get("envoy.filters.http.buffer").and_then(|p| p.disabled),
        Some(true)
    );
    assert!(fc.get("envoy.filters.http.local_ratelimit").is_some());
    assert!(
        fc.get("envoy.filters.http.lua").is_none(),
        "optional unknown: ignored"
    );
    // Its config is validated, with the field path.
    let fault = json!({"name": "envoy.filters.http.fault", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
        "abort": {"grpc_status": 14, "percentage": {"numerator": 100}}}});
    assert_eq!(
        errors(&with(&[(&fp, json!([fault, router.clone()]))])),
        [format!(
            "{HCM}.http_filters[0].typed_config.abort.grpc_status: not supported yet"
        )]
    );
    assert_eq!(
        errors(&with(&[(&fp, json!([]))])),
        [format!(
            "{HCM}.http_filters: the last filter must be envoy.filters.http.router"
        )]
    );
    // The router without typed_config, by its well-known name.
    ok(&with(&[(
        &fp,
        json!([{"name": "envoy.filters.http.router"}]),
    )]));
    assert_eq!(
        errors(&with(&[(
            &format!("{fp}/0/typed_config/start_child_span"),
            json!(true)
        )])),
        [format!(
            "{HCM}.http_filters[0].typed_config.start_child_span: not supported yet"
        )]
    );
    // The router's `suppress_envoy_headers` reaches the connection manager's model.
    let b = ok(&with(&[(
        &format!("{fp}/0/typed_config/suppress_envoy_headers"),
        json!(true),
    )]));
    assert!(b.listeners[0].hcm.suppress_envoy_headers);
    assert!(!ok(&with(&[])).listeners[0].hcm.suppress_envoy_headers);
}

// === Access logs ===

fn access_log(typed_config: Value) -> Value {
    with(&[(
        &format!("{P_HCM}/access_log"),
        json!([{"name": "log", "typed_config": typed_config}]),
    )])
}

#[test]
fn access_log_sinks_and_formats() {
    let file = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";
    let b = ok(&access_log(json!({"@type": file, "path": "/dev/stderr"})));
    let a = &b.listeners[0].hcm.access_logs[0];
    assert_eq!(a.sink, AccessLogSink::Stderr);
    let LogFormat::Text(t) = &a.format else {
        panic!()
    };
    assert_eq!(t[1], FormatToken::StartTime);

    let b = ok(&access_log(json!({"@type": file, "path": "/var/log/a.log",
        "log_format": {"text_format_source": {"inline_string": "%RESPONSE_CODE% %REQ(:PATH)%\n"}}})));
    let a = &b.listeners[0].hcm.access_logs[0];
    assert_eq!(a.sink, AccessLogSink::File("/var/log/a.log".into()));
    let LogFormat::Text(t) = &a.format else {
        panic!()
    };
    assert_eq!(t[0], FormatToken::ResponseCode);
    assert_eq!(t.last(), Some(&FormatToken::Literal("\n".into())));

    let b = ok(&access_log(
        json!({"@type": file, "path": "/dev/stdout", "format": "%PROTOCOL%\n"}),
    ));
    assert_eq!(
        b.listeners[0].hcm.access_logs[0].sink,
        AccessLogSink::Stdout
    );

    let b = ok(&access_log(json!({
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
        "log_format": {"json_format": {"status": "%RESPONSE_CODE%", "a": "code=%RESPONSE_CODE%"}}})));
    let LogFormat::Json(j) = &b.listeners[0].hcm.access_logs[0].format else {
        panic!()
    };
    assert_eq!(j[0].0, "a");
    assert!(matches!(&j[0].1, JsonValueFormat::Text(t) if t.len() == 2));
    assert!(matches!(
        &j[1].1,
        JsonValueFormat::Typed(FormatToken::ResponseCode)
    ));

    // The legacy json_format renders every value as a string.
    let b = ok(&access_log(
        json!({"@type": file, "path": "/dev/stdout", "json_format": {"s": "%RESPONSE_CODE%"}}),
    ));
    let LogFormat::Json(j) = &b.listeners[0].hcm.access_logs[0].format else {
        panic!()
    };
    assert!(matches!(&j[0].1, JsonValueFormat::Text(_)));
}

#[test]
fn access_log_errors() {
    let file = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";
    let a = format!("{HCM}.access_log[0]");
    assert_eq!(
        errors(&access_log(json!({"@type": file, "path": "/dev/stdout",
            "log_format": {"text_format_source": {"inline_string": "%BOGUS%"}}}))),
        [format!("{a}.typed_config.log_format.text_format_source.inline_string: unsupported command operator '%BOGUS%'")]
    );
    assert_eq!(
        errors(&access_log(json!({"@type": file}))),
        [format!("{a}.typed_config.path: required")]
    );
    assert_eq!(
        errors(&access_log(json!({"@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"}))),
        [format!("{a}.typed_config: unsupported access logger 'envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig'")]
    );
    let mut v = access_log(json!({"@type": file, "path": "/dev/stdout"}));
    set(
        &mut v,
        &format!("{P_HCM}/access_log/0/filter"),
        json!({"status_code_filter": {"comparison": {"value": {"default_value": 500, "runtime_key": "k"}}}}),
    );
    assert_eq!(errors(&v), [format!("{a}.filter: not supported yet")]);
}

// === Routes ===

fn route_with(route: Value) -> Value {
    with(&[(
        &format!("{P_HCM}/route_config/virtual_hosts/0/routes/0"),
        route,
    )])
}

#[test]
fn route_matching_rules() {
    let b = ok(&route_with(json!({
        "match": {
            "safe_regex": {"regex": "/api/v[0-9]+"},
            "case_sensitive": false,
            "headers": [
                {"name": ":Method", "exact_match": "GET"},
                {"name": "x-a", "present_match": true, "invert_match": true},
                {"name": "x-b", "string_match": {"contains": "FoO", "ignore_case": true}},
                {"name": "x-c"}
            ],
            "query_parameters": [{"name": "q", "string_match": {"exact": "1"}}, {"name": "p"}]
        },
        "route": {"cluster": "c0"}
    })));
    let m = &route0(&b).matcher;
    let PathMatch::Regex(re) = &m.path else {
        panic!()
    };
    assert!(
        re.is_match("/api/v12") && !re.is_match("/api/v12/x"),
        "full match"
    );
    assert!(!m.case_sensitive);
    assert_eq!(m.headers[0].name, ":method");
    assert!(
        matches!(&m.headers[0].spec, HeaderMatchSpec::StringMatch(s) if s.matches("GET") && !s.matches("get"))
    );
    assert!(m.headers[1].invert);
    assert!(matches!(&m.headers[2].spec, HeaderMatchSpec::StringMatch(s) if s.matches("xxfooxx")));
    assert!(matches!(m.headers[3].spec, HeaderMatchSpec::Present(true)));
    assert!(
        matches!(&m.query_parameters[0].spec, QueryParameterSpec::StringMatch(s) if s.matches("1"))
    );
    assert!(matches!(
        m.query_parameters[1].spec,
        QueryParameterSpec::Present
    ));

    let b = ok(&route_with(
        json!({"match": {"path_separated_prefix": "/api"}, "route": {"cluster": "c0"}}),
    ));
    assert!(matches!(&route0(&b).matcher.path, PathMatch::PathSeparatedPrefix(p) if p == "/api"));

    let r = format!("{RC}.virtual_hosts[0].routes[0]");
    assert_eq!(
        errors(&route_with(
            json!({"match": {"safe_regex": {"regex": "(unclosed"}}, "route": {"cluster": "c0"}})
        )),
        [format!(
            "{r}.match.safe_regex.regex: invalid regex '(unclosed': unclosed group"
        )]
    );
    assert_eq!(
        errors(&route_with(json!({"match": {"path_separated_prefix": "/api/"}, "route": {"cluster": "c0"}}))),
        [format!("{r}.match.path_separated_prefix: must not be empty, contain '?' or '#', or end with '/'")]
    );
    assert_eq!(
        errors(&route_with(
            json!({"match": {"prefix": "/", "grpc": {}, "runtime_fraction": {"default_value": {"numerator": 1}}}, "route": {"cluster": "c0"}})
        )),
        [
            format!("{r}.match.runtime_fraction: not supported yet"),
            format!("{r}.match.grpc: not supported yet")
        ]
    );
    assert_eq!(
        errors(&route_with(
            json!({"match": {"prefix": "/", "headers": [{"name": "x", "range_match": {"start": 1, "end": 2}}]}, "route": {"cluster": "c0"}})
        )),
        [format!(
            "{r}.match.headers[0].range_match: not supported yet"
        )]
    );
}

#[test]
fn route_action_rules() {
    let r = format!("{RC}.virtual_hosts[0].routes[0]");
    assert_eq!(
        errors(&route_with(
            json!({"match": {"prefix": "/"}, "route": {"cluster": "nope"}})
        )),
        [format!("{r}.route.cluster: unknown cluster 'nope'")]
    );
    assert_eq!(
        errors(&route_with(json!({"match": {"prefix": "/"}, "route": {"weighted_clusters": {
            "clusters": [{"name": "c0", "weight": 1}, {"name": "zz", "weight": 1}], "total_weight": 3}}}))),
        [
            format!("{r}.route.weighted_clusters.clusters[1].name: unknown cluster 'zz'"),
            format!("{r}.route.weighted_clusters.total_weight: Sum of weights in the weighted_cluster must add up to total_weight: 2 != 3"),
        ]
    );
    let b = ok(&route_with(
        json!({"match": {"prefix": "/"}, "route": {"weighted_clusters": {
        "clusters": [{"name": "c0", "weight": 3}, {"name": "c0", "weight": 0}], "total_weight": 3}}}),
    ));
    let ClusterSpecifier::Weighted(w) = &forward0(&b).cluster else {
        panic!()
    };
    assert_eq!((w.clusters.len(), w.total_weight), (1, 3));

    let b = ok(&route_with(json!({"match": {"prefix": "/"}, "route": {
        "cluster_header": "X-Cluster", "prefix_rewrite": "/v2/", "host_rewrite_literal": "up.example",
        "idle_timeout": "30s", "upgrade_configs": [{"upgrade_type": "websocket", "enabled": false}]}})));
    let f = forward0(&b);
    assert!(matches!(&f.cluster, ClusterSpecifier::Header(h) if h == "x-cluster"));
    assert_eq!(f.prefix_rewrite.as_deref(), Some("/v2/"));
    assert_eq!(f.host_rewrite, HostRewrite::Literal("up.example".into()));
    assert_eq!(f.idle_timeout, Some(Duration::from_secs(30)));
    assert_eq!(
        f.upgrade_overrides,
        [UpgradeConfig {
            upgrade_type: "websocket".into(),
            enabled: false
        }]
    );

    let b = ok(&route_with(
        json!({"match": {"prefix": "/"}, "route": {"cluster": "c0", "auto_host_rewrite": true,
        "regex_rewrite": {"pattern": {"regex": "^/a/(.*)$"}, "substitution": "/b/\\1"}}}),
    ));
    let f = forward0(&b);
    assert_eq!(f.host_rewrite, HostRewrite::Auto);
    assert_eq!(f.regex_rewrite.as_ref().unwrap().1, "/b/\\1");

    assert_eq!(
        errors(&route_with(
            json!({"match": {"prefix": "/"}, "route": {"cluster": "c0", "prefix_rewrite": "/x",
            "regex_rewrite": {"pattern": {"regex": "a"}, "substitution": "b"}, "hash_policy": [{"filter_state": {"key": "x"}}]}})
        )),
        [
            format!("{r}.route: Cannot specify both prefix_rewrite and regex_rewrite"),
            format!("{r}.route.hash_policy[0].filter_state: not supported yet"),
        ]
    );
}

#[test]
fn retry_policy_rules() {
    let r = format!("{RC}.virtual_hosts[0].routes[0].route.retry_policy");
    let retry = |p: Value| {
        route_with(json!({"match": {"prefix": "/"}, "route": {"cluster": "c0", "retry_policy": p}}))
    };
    let b = ok(&retry(
        json!({"retry_on": "5xx,retriable-status-codes", "retriable_status_codes": [503],
        "retry_back_off": {"base_interval": "0.1s"}}),
    ));
    let p = forward0(&b).retry_policy.clone().unwrap();
    assert_eq!(p.num_retries, 1);
    assert_eq!(p.retriable_status_codes, [503]);
    assert_eq!(p.back_off_base, Duration::from_millis(100));
    assert_eq!(p.back_off_max, Duration::from_secs(1));
    let b = ok(&retry(json!({"retry_on": "reset"})));
    let p = forward0(&b).retry_policy.clone().unwrap();
    assert_eq!(
        (p.back_off_base, p.back_off_max),
        (Duration::from_millis(25), Duration::from_millis(250))
    );
    assert_eq!(
        errors(&retry(json!({"retry_on": "5xx,bogus", "retry_back_off": {"base_interval": "1s", "max_interval": "0.5s"}}))),
        [
            format!("{r}.retry_on: unsupported retry_on condition 'bogus'"),
            format!("{r}.retry_back_off.max_interval: max_interval must be greater than or equal to the base_interval"),
        ]
    );
    // Retry extensions: previous_hosts, previous_priorities, retriable headers, gRPC codes.
    let b = ok(&retry(json!({
        "retry_on": "retriable-headers,unavailable,cancelled",
        "retriable_headers": [{"name": "x-retry", "present_match": true}],
        "host_selection_retry_max_attempts": 3,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "retry_priority": {"name": "envoy.retry_priorities.previous_priorities",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig", "update_frequency": 2}},
    })));
    let p = forward0(&b).retry_policy.clone().unwrap();
    assert!(
        p.retry_on.has(RetryOn::RETRIABLE_HEADERS) && p.retry_on.has(RetryOn::GRPC_UNAVAILABLE)
    );
    assert!(p.previous_hosts);
    assert_eq!(p.host_selection_retry_max_attempts, 3);
    assert_eq!(p.previous_priorities, Some(2));
    assert_eq!(p.retriable_headers.len(), 1);
    assert_eq!(
        errors(&retry(json!({"retry_priority": {"name": "p",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig", "update_frequency": 0}}}))),
        [format!(
            "{r}.retry_priority.typed_config.update_frequency: must be greater than 0"
        )]
    );
    // A route's own policy wins over the virtual host's.
    let mut v = retry(json!({"retry_on": "reset", "num_retries": 5}));
    set(
        &mut v,
        &format!("{P_HCM}/route_config/virtual_hosts/0/retry_policy"),
        json!({"retry_on": "5xx"}),
    );
    assert_eq!(
        forward0(&ok(&v)).retry_policy.as_ref().unwrap().num_retries,
        5
    );
}

#[test]
fn redirect_and_direct_response() {
    let b = ok(&route_with(
        json!({"match": {"prefix": "/"}, "redirect": {"https_redirect": true, "port_redirect": 8443,
        "prefix_rewrite": "/new/", "response_code": "PERMANENT_REDIRECT", "strip_query": true}}),
    ));
    let RouteAction::Redirect(r) = &route0(&b).action else {
        panic!()
    };
    assert_eq!(r.scheme.as_deref(), Some("https"));
    assert_eq!(r.port, Some(8443));
    assert!(matches!(&r.path, RedirectPath::Prefix(p) if p == "/new/"));
    assert_eq!(r.status, http::StatusCode::PERMANENT_REDIRECT);
    assert!(r.strip_query);
    let b = ok(&route_with(
        json!({"match": {"prefix": "/"}, "redirect": {"host_redirect": "x.example"}}),
    ));
    let RouteAction::Redirect(r) = &route0(&b).action else {
        panic!()
    };
    assert_eq!(r.status, http::StatusCode::MOVED_PERMANENTLY);
    assert!(matches!(r.path, RedirectPath::Keep));

    let b = ok(&route_with(
        json!({"match": {"prefix": "/"}, "direct_response": {"status": 503, "body": {"inline_bytes": "aGk="}}}),
    ));
    let RouteAction::DirectResponse { status, body } = &route0(&b).action else {
        panic!()
    };
    assert_eq!(status.as_u16(), 503);
    assert_eq!(body.as_deref(), Some(&b"hi"[..]));
    let r = format!("{RC}.virtual_hosts[0].routes[0]");
    assert_eq!(
        errors(&route_with(
            json!({"match": {"prefix": "/"}, "direct_response": {"status": 600}})
        )),
        [format!(
            "{r}.direct_response.status: must be in 200..=599, got 600"
        )]
    );
    assert_eq!(
        errors(&route_with(json!({"match": {"prefix": "/"}}))),
        [format!(
            "{r}: an action (route, redirect or direct_response) is required"
        )]
    );
}

#[test]
fn domain_rules() {
    let vh = |name: &str, domains: Value| json!({"name": name, "domains": domains, "routes": []});
    let v = with(&[(
        &format!("{P_HCM}/route_config/virtual_hosts"),
        json!([
            vh("a", json!(["Example.com", "*.example.com", "api.*", "*"])),
            vh("b", json!(["example.COM", "*"])),
        ]),
    )]);
    assert_eq!(
        errors(&v),
        [
            format!("{RC}.virtual_hosts[1].domains[0]: Only unique values for domains are permitted. Duplicate entry of domain example.com in route rc"),
            format!("{RC}.virtual_hosts[1].domains[1]: Only a single wildcard domain is permitted in route rc"),
        ]
    );
    let v = with(&[(
        &format!("{P_HCM}/route_config/virtual_hosts"),
        json!([vh(
            "a",
            json!(["Example.com", "*.example.com", "api.*", "*"])
        )]),
    )]);
    let b = ok(&v);
    assert_eq!(
        b.listeners[0].hcm.route_config.virtual_hosts[0].domains,
        [
            DomainMatcher::Exact("example.com".into()),
            DomainMatcher::Suffix(".example.com".into()),
            DomainMatcher::Prefix("api.".into()),
            DomainMatcher::Any,
        ]
    );
}

#[test]
fn header_mutation_rules() {
    let b = ok(&with(&[
        (
            &format!("{P_HCM}/route_config/request_headers_to_add"),
            json!([
                {"header": {"key": "X-A", "value": "100%% sure"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
                {"header": {"key": "x-b", "value": "v"}, "append": false, "keep_empty_value": true}
            ]),
        ),
        (
            &format!("{P_HCM}/route_config/response_headers_to_remove"),
            json!(["X-Powered-By"]),
        ),
    ]));
    let h = &b.listeners[0].hcm.route_config.headers;
    assert_eq!(h.request_headers_to_add[0].name, "x-a");
    assert_eq!(h.request_headers_to_add[0].value, "100% sure");
    assert_eq!(
        h.request_headers_to_add[0].append_action,
        AppendAction::OverwriteIfExistsOrAdd
    );
    assert_eq!(
        h.request_headers_to_add[1].append_action,
        AppendAction::OverwriteIfExistsOrAdd
    );
    assert!(h.request_headers_to_add[1].keep_empty_value);
    assert_eq!(h.response_headers_to_remove[0], "x-powered-by");

    let vh = format!("{P_HCM}/route_config/virtual_hosts/0");
    let v = with(&[
        (
            &format!("{vh}/request_headers_to_add"),
            json!([
                {"header": {"key": ":path", "value": "/"}},
                {"header": {"key": "x-ip", "value": "%DOWNSTREAM_REMOTE_ADDRESS%"}},
                {"header": {"key": "x", "value": "y"}, "append": true, "append_action": "ADD_IF_ABSENT"}
            ]),
        ),
        (&format!("{vh}/request_headers_to_remove"), json!(["Host"])),
    ]);
    let p = format!("{RC}.virtual_hosts[0]");
    assert_eq!(
        errors(&v),
        [
            format!("{p}.request_headers_to_add[0].header.key: :-prefixed or host headers may not be modified"),
            format!("{p}.request_headers_to_add[1].header.value: not supported yet (header value formatters)"),
            format!("{p}.request_headers_to_add[2]: Both append and append_action are set and it's not allowed"),
            format!("{p}.request_headers_to_remove[0]: :-prefixed or host headers may not be removed"),
        ]
    );
}

// === Clusters ===

fn cluster_with(edits: &[(&str, Value)]) -> Value {
    let mut v = base();
    for (p, val) in edits {
        set(
            &mut v,
            &format!("/static_resources/clusters/0/{p}"),
            val.clone(),
        );
    }
    v
}

#[test]
fn cluster_rules() {
    let c = "static_resources.clusters[0]";
    assert_eq!(
        errors(&cluster_with(&[
            ("type", json!("ORIGINAL_DST")),
            ("lb_policy", json!("CLUSTER_PROVIDED")),
            (
                "health_checks",
                json!([{"timeout": "1s", "interval": "1s", "unhealthy_threshold": 1,
                        "healthy_threshold": 1, "custom_health_check": {"name": "x"}}])
            )
        ])),
        [
            format!("{c}.type: not supported yet"),
            format!("{c}.lb_policy: not supported yet"),
            format!("{c}.health_checks[0].custom_health_check: not supported yet"),
        ]
    );
    assert_eq!(
        errors(&cluster_with(&[("load_assignment/endpoints/0/lb_endpoints/0/endpoint/address/socket_address/address", json!("backend.local"))])),
        [format!("{c}.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address: malformed IP address: backend.local")]
    );
    let b = ok(&cluster_with(&[
        ("type", json!("STRICT_DNS")),
        (
            "load_assignment/endpoints/0/lb_endpoints/0/endpoint/address/socket_address/address",
            json!("backend.local"),
        ),
        (
            "load_assignment/endpoints/0/lb_endpoints/0/endpoint/hostname",
            json!("h"),
        ),
        (
            "load_assignment/endpoints/0/lb_endpoints/0/load_balancing_weight",
            json!(7),
        ),
        (
            "load_assignment/endpoints/0/lb_endpoints/0/health_status",
            json!("DRAINING"),
        ),
        (
            "load_assignment/endpoints/0/locality",
            json!({"region": "r", "zone": "z"}),
        ),
        (
            "load_assignment/endpoints/0/load_balancing_weight",
            json!(3),
        ),
        ("lb_policy", json!("LEAST_REQUEST")),
        ("least_request_lb_config", json!({"choice_count": 3})),
        ("dns_refresh_rate", json!("10s")),
        ("connect_timeout", json!("0.25s")),
    ]));
    let cl = &b.clusters[0];
    assert_eq!(cl.lb_policy, LbPolicy::LeastRequest { choice_count: 3 });
    assert_eq!(cl.dns_refresh_rate, Duration::from_secs(10));
    assert_eq!(cl.connect_timeout, Duration::from_millis(250));
    let l = &cl.load_assignment.endpoints[0];
    assert_eq!(l.locality.zone, "z");
    assert_eq!(l.load_balancing_weight, Some(3));
    let e = &l.lb_endpoints[0];
    assert_eq!(e.hostname.as_deref(), Some("h"));
    assert_eq!(e.load_balancing_weight, 7);
    assert_eq!(e.health_status, HealthStatus::Draining);
    assert_eq!(
        errors(&cluster_with(&[
            ("lb_policy", json!("LEAST_REQUEST")),
            (
                "least_request_lb_config",
                json!({"choice_count": 1, "active_request_bias": {"default_value": -1.0, "runtime_key": "k"}})
            )
        ])),
        [
            format!("{c}.least_request_lb_config.choice_count: must be at least 2"),
            format!(
                "{c}.least_request_lb_config.active_request_bias: must be a finite number >= 0"
            ),
        ]
    );
    assert_eq!(
        errors(&cluster_with(&[("load_assignment/endpoints/0/priority", json!(1)), ("load_assignment/endpoints/0/lb_endpoints/0/load_balancing_weight", json!(0))])),
        [
            format!("{c}.load_assignment.endpoints[0].lb_endpoints[0].load_balancing_weight: must be at least 1"),
            format!("{c}.load_assignment.endpoints: priorities must be contiguous from 0: priority 0 is missing"),
        ]
    );
    let mut v = base();
    let c0 = v.pointer("/static_resources/clusters/0").unwrap().clone();
    set(
        &mut v,
        "/static_resources/clusters",
        json!([c0.clone(), c0]),
    );
    assert_eq!(
        errors(&v),
        ["static_resources.clusters[1].name: duplicate cluster name 'c0'"]
    );
}

#[test]
fn cluster_protocol_and_breakers() {
    let opts = |o: Value| {
        cluster_with(&[(
            "typed_extension_protocol_options",
            json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": o}),
        )])
    };
    let t = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
    let b = ok(&opts(
        json!({"@type": t, "explicit_http_config": {"http2_protocol_options": {}},
        "common_http_protocol_options": {"idle_timeout": "0s"}}),
    ));
    assert_eq!(
        b.clusters[0].protocol,
        UpstreamProtocol::Http2 {
            max_concurrent_streams: 2147483647
        }
    );
    assert_eq!(b.clusters[0].idle_timeout, None);
    let b = ok(&opts(
        json!({"@type": t, "explicit_http_config": {"http_protocol_options": {}}}),
    ));
    assert_eq!(b.clusters[0].protocol, UpstreamProtocol::Http1);
    let b = ok(&cluster_with(&[(
        "http2_protocol_options",
        json!({"max_concurrent_streams": 10}),
    )]));
    assert_eq!(
        b.clusters[0].protocol,
        UpstreamProtocol::Http2 {
            max_concurrent_streams: 10
        }
    );
    let k = "static_resources.clusters[0].typed_extension_protocol_options[envoy.extensions.upstreams.http.v3.HttpProtocolOptions]";
    assert_eq!(
        errors(&opts(
            json!({"@type": t, "use_downstream_protocol_config": {}})
        )),
        [format!(
            "{k}.use_downstream_protocol_config: not supported yet"
        )]
    );
    assert_eq!(
        errors(&opts(
            json!({"@type": t, "explicit_http_config": {"http2_protocol_options": {"allow_connect": true}}})
        )),
        [format!(
            "{k}.explicit_http_config.http2_protocol_options.allow_connect: not supported yet"
        )]
    );

    let b = ok(&cluster_with(&[(
        "circuit_breakers",
        json!({"thresholds": [{"max_connections": 10, "max_retries": 0}]}),
    )]));
    assert_eq!(
        b.clusters[0].circuit_breakers,
        Thresholds {
            max_connections: 10,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 0,
            retry_budget: None,
        }
    );
    // HIGH-priority thresholds and retry budgets (Envoy's defaults 20 % / 3).
    let b = ok(&cluster_with(&[(
        "circuit_breakers",
        json!({"thresholds": [{"priority": "HIGH", "max_requests": 5}, {"retry_budget": {}}]}),
    )]));
    assert_eq!(b.clusters[0].circuit_breakers_high.max_requests, 5);
    assert_eq!(
        b.clusters[0].circuit_breakers.retry_budget,
        Some(model::RetryBudget {
            budget_percent: 20.0,
            min_retry_concurrency: 3
        })
    );
    assert_eq!(
        errors(&cluster_with(&[(
            "circuit_breakers",
            json!({"thresholds": [{"retry_budget": {"budget_interval": "1s"}}]})
        )])),
        ["static_resources.clusters[0].circuit_breakers.thresholds[0].retry_budget.budget_interval: not supported yet"]
    );
}

#[test]
fn health_checks_outlier_detection_and_retry_extensions() {
    let c = "static_resources.clusters[0]";
    let b = ok(&cluster_with(&[
        (
            "health_checks",
            json!([{"timeout": "1s", "interval": "2s", "unhealthy_threshold": 3,
                    "healthy_threshold": 2, "interval_jitter_percent": 10,
                    "http_health_check": {"path": "/healthz",
                        "expected_statuses": [{"start": 200, "end": 300}],
                        "retriable_statuses": [{"start": 429, "end": 430}]}},
                   {"timeout": "1s", "interval": "2s", "unhealthy_threshold": 1,
                    "healthy_threshold": 1, "no_traffic_interval": "5s", "reuse_connection": false,
                    "tcp_health_check": {"send": {"text": "50494E47"}, "receive": [{"text": "504F4E47"}]}},
                   {"timeout": "1s", "interval": "2s", "unhealthy_threshold": 1,
                    "healthy_threshold": 1, "grpc_health_check": {"service_name": "svc"}}]),
        ),
        (
            "outlier_detection",
            json!({"consecutive_5xx": 3, "max_ejection_percent": 100}),
        ),
    ]));
    let hc = &b.clusters[0].health_checks;
    assert_eq!(hc.len(), 3);
    // Envoy's interval defaults: unhealthy / edges from interval, no traffic 60 s.
    assert_eq!(hc[0].unhealthy_interval, Duration::from_secs(2));
    assert_eq!(hc[0].unhealthy_edge_interval, Duration::from_secs(2));
    assert_eq!(hc[0].healthy_edge_interval, Duration::from_secs(2));
    assert_eq!(hc[0].no_traffic_interval, Duration::from_secs(60));
    assert!(hc[0].reuse_connection && !hc[1].reuse_connection);
    assert_eq!(hc[1].no_traffic_healthy_interval, Duration::from_secs(5));
    match (&hc[0].kind, &hc[1].kind, &hc[2].kind) {
        (HealthCheckKind::Http(h), HealthCheckKind::Tcp(t), HealthCheckKind::Grpc(g)) => {
            assert_eq!(h.expected_statuses, [(200, 300)]);
            assert_eq!(h.retriable_statuses, [(429, 430)]);
            assert_eq!(t.send.as_deref(), Some(&b"PING"[..]));
            assert_eq!(t.receive[0].as_ref(), b"PONG");
            assert_eq!(g.service_name, "svc");
        }
        other => panic!("{other:?}"),
    }
    let od = b.clusters[0].outlier_detection.as_ref().unwrap();
    assert_eq!(od.consecutive_5xx, 3);
    assert_eq!(od.max_ejection_percent, 100);
    assert_eq!(od.base_ejection_time, Duration::from_secs(30));
    assert_eq!(od.enforcing_consecutive_gateway_failure, 0);
    assert_eq!(
        errors(&cluster_with(&[(
            "health_checks",
            json!([{"interval": "1s", "http_health_check": {"path": "/",
                "expected_statuses": [{"start": 99, "end": 200}]}}])
        )])),
        [
            format!("{c}.health_checks[0].timeout: required"),
            format!("{c}.health_checks[0].unhealthy_threshold: required"),
            format!("{c}.health_checks[0].healthy_threshold: required"),
            format!("{c}.health_checks[0].http_health_check.expected_statuses[0]: invalid status range [99, 200): must lie within [100, 600) and not be empty"),
        ]
    );
    assert_eq!(
        errors(&cluster_with(&[(
            "outlier_detection",
            json!({"base_ejection_time": "60s", "max_ejection_time": "10s", "enforcing_success_rate": 101})
        )])),
        [
            format!("{c}.outlier_detection.max_ejection_time: must be greater than or equal to base_ejection_time"),
            format!("{c}.outlier_detection.enforcing_success_rate: must be at most 100"),
        ]
    );
}
