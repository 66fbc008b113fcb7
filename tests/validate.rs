//! `strait --mode validate -c FILE`: every error of an invalid bootstrap is printed as
//! `{path}: {message}` on stderr with exit code 1; valid files print `configuration 'F' OK`.

use std::path::Path;
use std::process::Command;

/// A valid bootstrap; each case below edits it with plain text replacements.
const BASE: &str = r#"
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 9901}}
static_resources:
  listeners:
  - name: ingress
    address: {socket_address: {address: 127.0.0.1, port_value: 10000}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: AUTO
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
          route_config:
            name: rc
            virtual_hosts:
            - name: vh
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: backend, timeout: 5s}
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 1s
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: backend
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8080}}}
"#;

const HCM: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config";
const ROUTE: &str = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0]";
const CLUSTER: &str = "static_resources.clusters[0]";

struct Case {
    name: &'static str,
    edits: &'static [(&'static str, &'static str)],
    errors: Vec<String>,
}

fn cases() -> Vec<Case> {
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        Case {
            name: "unknown field",
            edits: &[("    lb_policy: ROUND_ROBIN", "    lb_policy: ROUND_ROBIN\n    bogus_field: 1")],
            errors: s(&["static_resources.clusters[0].bogus_field: unknown field"]),
        },
        Case {
            name: "unknown enum value",
            edits: &[("codec_type: AUTO", "codec_type: HTTP9")],
            errors: vec![format!("{HCM}.codec_type: unrecognized enum value 'HTTP9'")],
        },
        Case {
            name: "bad duration",
            edits: &[("connect_timeout: 1s", "connect_timeout: soon")],
            errors: s(&["static_resources.clusters[0].connect_timeout: failed to parse duration"]),
        },
        Case {
            name: "unknown cluster in route",
            edits: &[("route: {cluster: backend,", "route: {cluster: nowhere,")],
            errors: vec![format!("{ROUTE}.route.cluster: unknown cluster 'nowhere'")],
        },
        Case {
            name: "listener hostname",
            edits: &[("address: {socket_address: {address: 127.0.0.1, port_value: 10000}}", "address: {socket_address: {address: localhost, port_value: 10000}}")],
            errors: s(&["static_resources.listeners[0].address.socket_address.address: malformed IP address: localhost"]),
        },
        Case {
            name: "static cluster hostname",
            edits: &[("address: 127.0.0.1, port_value: 8080", "address: backend.internal, port_value: 8080")],
            errors: vec![format!("{CLUSTER}.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address: malformed IP address: backend.internal")],
        },
        Case {
            name: "unsupported cluster type and lb policy, all listed",
            edits: &[("type: STATIC", "type: ORIGINAL_DST"), ("lb_policy: ROUND_ROBIN", "lb_policy: CLUSTER_PROVIDED")],
            errors: vec![format!("{CLUSTER}.type: not supported yet"), format!("{CLUSTER}.lb_policy: not supported yet")],
        },
        Case {
            name: "outlier detection option not implemented",
            edits: &[("    lb_policy: ROUND_ROBIN", "    lb_policy: ROUND_ROBIN\n    outlier_detection: {consecutive_5xx: 3, always_eject_one_host: true}")],
            errors: vec![format!("{CLUSTER}.outlier_detection.always_eject_one_host: not supported yet")],
        },
        Case {
            name: "rds instead of an inline route config",
            edits: &[(
                "          route_config:\n            name: rc\n            virtual_hosts:\n            - name: vh\n              domains: [\"*\"]\n              routes:\n              - match: {prefix: /}\n                route: {cluster: backend, timeout: 5s}\n",
                "          rds: {route_config_name: rc, config_source: {ads: {}}}\n",
            )],
            // RDS over ADS needs `dynamic_resources.ads_config`.
            errors: vec![format!("{HCM}.rds.config_source.ads: requires dynamic_resources.ads_config in the bootstrap")],
        },
        Case {
            name: "http3 codec",
            edits: &[("codec_type: AUTO", "codec_type: HTTP3")],
            errors: vec![format!("{HCM}.codec_type: not supported yet")],
        },
        Case {
            name: "missing stat_prefix",
            edits: &[("          stat_prefix: ingress\n", "")],
            errors: vec![format!("{HCM}.stat_prefix: required")],
        },
        Case {
            name: "unknown http filter",
            edits: &[("          http_filters:\n", "          http_filters:\n          - name: envoy.filters.http.lua\n            typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua}\n")],
            errors: vec![format!("{HCM}.http_filters[0].typed_config: unknown filter 'envoy.filters.http.lua' (type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua)")],
        },
        Case {
            name: "router not last",
            edits: &[("          route_config:\n", "          - name: envoy.filters.http.cors\n            typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}\n            is_optional: true\n          route_config:\n")],
            errors: vec![format!("{HCM}.http_filters[0]: terminal filter 'envoy.filters.http.router' must be the last filter in the chain")],
        },
        Case {
            name: "invalid regex",
            edits: &[("match: {prefix: /}", "match: {safe_regex: {regex: \"/api/(v1\"}}")],
            errors: vec![format!("{ROUTE}.match.safe_regex.regex: invalid regex '/api/(v1': unclosed group")],
        },
        Case {
            name: "unknown retry_on token",
            edits: &[("timeout: 5s}", "timeout: 5s, retry_policy: {retry_on: \"5xx,sometimes\"}}")],
            errors: vec![format!("{ROUTE}.route.retry_policy.retry_on: unsupported retry_on condition 'sometimes'")],
        },
        Case {
            name: "weighted clusters total_weight mismatch and unknown cluster",
            edits: &[("route: {cluster: backend, timeout: 5s}", "route: {weighted_clusters: {total_weight: 100, clusters: [{name: backend, weight: 50}, {name: canary, weight: 40}]}}")],
            errors: vec![
                format!("{ROUTE}.route.weighted_clusters.clusters[1].name: unknown cluster 'canary'"),
                format!("{ROUTE}.route.weighted_clusters.total_weight: Sum of weights in the weighted_cluster must add up to total_weight: 90 != 100"),
            ],
        },
        Case {
            name: "duplicate domains and two wildcards",
            edits: &[("            - name: vh\n", "            - name: other\n              domains: [\"*\", Example.com]\n              routes: []\n            - name: vh2\n              domains: [example.com]\n              routes: []\n            - name: vh\n")],
            errors: s(&[
                "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[1].domains[0]: Only unique values for domains are permitted. Duplicate entry of domain example.com in route rc",
                "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[2].domains[0]: Only a single wildcard domain is permitted in route rc",
            ]),
        },
        Case {
            name: "direct response status out of range",
            edits: &[("route: {cluster: backend, timeout: 5s}", "direct_response: {status: 99}")],
            errors: vec![format!("{ROUTE}.direct_response.status: must be in 200..=599, got 99")],
        },
        Case {
            name: "pseudo-header mutation",
            edits: &[("            name: rc\n", "            name: rc\n            request_headers_to_add: [{header: {key: \":authority\", value: x}}]\n            response_headers_to_remove: [host]\n")],
            errors: s(&[
                "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.request_headers_to_add[0].header.key: :-prefixed or host headers may not be modified",
                "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.response_headers_to_remove[0]: :-prefixed or host headers may not be removed",
            ]),
        },
        Case {
            name: "access log with unknown operator and a filter",
            edits: &[("          http_filters:\n", "          access_log:\n          - name: envoy.access_loggers.stdout\n            filter: {not_health_check_filter: {}}\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog\n              log_format: {text_format_source: {inline_string: \"%NOPE%\"}}\n          http_filters:\n")],
            errors: vec![
                format!("{HCM}.access_log[0].filter: not supported yet"),
                format!("{HCM}.access_log[0].typed_config.log_format.text_format_source.inline_string: unsupported command operator '%NOPE%'"),
            ],
        },
        Case {
            name: "non-contiguous priorities and zero weight",
            edits: &[("      - lb_endpoints:\n        - endpoint:", "      - priority: 1\n        lb_endpoints:\n        - load_balancing_weight: 0\n          endpoint:")],
            errors: vec![
                format!("{CLUSTER}.load_assignment.endpoints[0].lb_endpoints[0].load_balancing_weight: must be at least 1"),
                format!("{CLUSTER}.load_assignment.endpoints: priorities must be contiguous from 0: priority 0 is missing"),
            ],
        },
        Case {
            name: "upstream TLS and subsets, all listed",
            edits: &[("    lb_policy: ROUND_ROBIN", "    lb_policy: ROUND_ROBIN\n    transport_socket: {name: envoy.transport_sockets.tls, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext}}\n    lb_subset_config: {fallback_policy: ANY_ENDPOINT}")],
            errors: vec![
                format!("{CLUSTER}.lb_subset_config: not supported yet"),
                format!("{CLUSTER}.transport_socket: not supported yet"),
            ],
        },
        Case {
            name: "dynamic resources and runtime",
            edits: &[("admin:\n", "dynamic_resources: {lds_resources_locator: xdstp://x/l}\nlayered_runtime: {layers: [{name: static, static_layer: {}}]}\nadmin:\n")],
            errors: s(&["dynamic_resources.lds_resources_locator: not supported yet", "layered_runtime: not supported yet"]),
        },
        Case {
            name: "duplicate cluster",
            edits: &[("  clusters:\n", "  clusters:\n  - name: backend\n")],
            errors: s(&["static_resources.clusters[1].name: duplicate cluster name 'backend'"]),
        },
        Case {
            name: "use_downstream_protocol_config",
            edits: &[("    lb_policy: ROUND_ROBIN", "    lb_policy: ROUND_ROBIN\n    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        use_downstream_protocol_config: {}")],
            errors: vec![format!("{CLUSTER}.typed_extension_protocol_options[envoy.extensions.upstreams.http.v3.HttpProtocolOptions].use_downstream_protocol_config: not supported yet")],
        },
    ]
}

fn validate(path: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_strait"))
        .args(["--mode", "validate", "-c"])
        .arg(path)
        .output()
        .expect("run strait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn base_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.yaml");
    std::fs::write(&path, BASE).unwrap();
    let (code, stdout, stderr) = validate(&path);
    assert_eq!(code, 0, "stderr: {stderr}");
    assert_eq!(
        stdout.trim_end(),
        format!("configuration '{}' OK", path.display())
    );
}

#[test]
fn invalid_configs_list_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases();
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut text = BASE.to_string();
        for (from, to) in case.edits {
            assert!(
                text.contains(from),
                "case '{}': edit target not found: {from}",
                case.name
            );
            text = text.replacen(from, to, 1);
        }
        let path = dir.path().join(format!("case{i}.yaml"));
        std::fs::write(&path, &text).unwrap();
        let (code, _stdout, stderr) = validate(&path);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        if code != 1 || lines != case.errors {
            failures.push(format!(
                "case '{}': exit {code}\n  expected: {:#?}\n  stderr: {stderr}",
                case.name, case.errors
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The same table through the library, so it is checked even where the binary is not built.
#[test]
fn library_reports_the_same_errors() {
    let mut failures = Vec::new();
    for case in cases() {
        let mut text = BASE.to_string();
        for (from, to) in case.edits {
            text = text.replacen(from, to, 1);
        }
        let got: Vec<String> = match strait_xds::load(
            &strait_xds::Source::Yaml(text),
            &strait_xds::Overrides::default(),
        ) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        };
        if got != case.errors {
            failures.push(format!(
                "case '{}':\n  expected: {:#?}\n  got: {got:#?}",
                case.name, case.errors
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn example_configs_validate() {
    let dir = manifest_dir().join("examples/configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            n += 1;
            let (code, stdout, stderr) = validate(&path);
            assert_eq!(code, 0, "{}: {stderr}", path.display());
            assert!(stdout.contains("OK"), "{}: {stdout}", path.display());
        }
    }
    assert!(n >= 2, "expected at least two example configs");
}

/// The repository root. Cargo's run-time `CARGO_MANIFEST_DIR` first: a test binary reused from a
/// build in another checkout (a shared target directory) carries that checkout's compile-time
/// path.
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
}
