//! xDS resources as a control plane's directory holds them (proto3 YAML with `@type`), shared
//! by the end-to-end xDS tests.

use std::net::SocketAddr;

pub fn eds_cluster(name: &str) -> String {
    format!(
        "'@type': type.googleapis.com/envoy.config.cluster.v3.Cluster
name: {name}
type: EDS
connect_timeout: 1s
eds_cluster_config: {{eds_config: {{ads: {{}}, resource_api_version: V3}}}}
"
    )
}

pub fn endpoints(cluster: &str, addrs: &[SocketAddr]) -> String {
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
        "'@type': type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
cluster_name: {cluster}
endpoints: [{{lb_endpoints: [{}]}}]
",
        eps.join(", ")
    )
}

/// A listener on 127.0.0.1:0 whose connection manager takes `route` over ADS.
pub fn listener(name: &str, route: &str) -> String {
    format!(
        "'@type': type.googleapis.com/envoy.config.listener.v3.Listener
name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
filter_chains:
- filters:
  - name: envoy.filters.network.http_connection_manager
    typed_config:
      '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      stat_prefix: {name}
      rds: {{route_config_name: {route}, config_source: {{ads: {{}}, resource_api_version: V3}}}}
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"
    )
}
