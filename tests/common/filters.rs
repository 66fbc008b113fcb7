//! Filter configs shared by the filter end-to-end tests and the differential run against Envoy
//! (`tests/filters_e2e.rs`, `tests/filters_envoy_diff.rs`), so both check the very same config.

use std::net::SocketAddr;

use serde_json::{json, Value};

use super::Config;

pub const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

/// `http_filters`: these, then the router.
pub fn chain(filters: Vec<Value>) -> Value {
    let mut v = filters;
    v.push(json!({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}));
    Value::Array(v)
}

pub fn filter(name: &str, type_name: &str, config: Value) -> Value {
    let mut typed = json!({"@type": format!("type.googleapis.com/{type_name}")});
    if let (Some(t), Value::Object(c)) = (typed.as_object_mut(), config) {
        t.extend(c);
    }
    json!({"name": name, "typed_config": typed})
}

/// `typed_per_filter_config` for the header_mutation filter `hm` at one level: append `level` to
/// `x-order` on the request and the response, and overwrite `x-last` on the request.
pub fn hm_level(level: &str) -> Value {
    let add = |key: &str, action: &str| json!({"append": {"header": {"key": key, "value": level}, "append_action": action}});
    json!({"hm": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute",
        "mutations": {
            "request_mutations": [add("x-order", "APPEND_IF_EXISTS_OR_ADD"),
                                  add("x-last", "OVERWRITE_IF_EXISTS_OR_ADD")],
            "response_mutations": [add("x-order", "APPEND_IF_EXISTS_OR_ADD")]
        }
    }})
}

/// header_mutation with per-route configs at the route configuration, virtual host and route
/// levels, the filter's own level appending `filter`; the route carries metadata too (accepted).
pub fn header_mutation_levels(up: SocketAddr, most_specific_wins: bool) -> Config {
    let add = json!({"append": {"header": {"key": "x-order", "value": "filter"},
                                "append_action": "APPEND_IF_EXISTS_OR_ADD"}});
    Config::new()
        .cluster("backend", &[up])
        .route_config(json!({
            "name": "local",
            "typed_per_filter_config": hm_level("rc"),
            "virtual_hosts": [{
                "name": "default",
                "domains": ["*"],
                "typed_per_filter_config": hm_level("vhost"),
                "routes": [{
                    "name": "r",
                    "match": {"prefix": "/"},
                    "route": {"cluster": "backend"},
                    "metadata": {"filter_metadata": {"acme.team": {"owner": "payments"}}},
                    "typed_per_filter_config": hm_level("route")
                }]
            }]
        }))
        .hcm(
            "http_filters",
            chain(vec![filter(
                "hm",
                "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                json!({"most_specific_header_mutations_wins": most_specific_wins,
                       "mutations": {"request_mutations": [add.clone()],
                                     "response_mutations": [add]}}),
            )]),
        )
}
