//! What the client (and the reference control plane) must know about a resource's body: its
//! name, and the RDS/EDS names it refers to. Everything else is the handler's business.

use std::collections::HashSet;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{filter, Listener};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, HttpConnectionManager,
};
use envoy_types::pb::envoy::service::discovery::v3 as discovery;
use prost::Message;

use super::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};

/// `envoy.service.discovery.v3.Resource`, which a SotW server may wrap each resource in.
pub(crate) const RESOURCE_WRAPPER_TYPE: &str =
    "type.googleapis.com/envoy.service.discovery.v3.Resource";

const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

/// `Cluster.type` EDS.
const DISCOVERY_TYPE_EDS: i32 = 3;

/// The name of a resource of `type_url` (for EDS, the `cluster_name`).
pub fn resource_name(
    type_url: &str,
    body: &envoy_types::pb::google::protobuf::Any,
) -> Result<String, String> {
    if body.type_url != type_url {
        return Err(format!(
            "resource has type {} in a response for {type_url}",
            body.type_url
        ));
    }
    let bytes = body.value.as_slice();
    let bad = |e: prost::DecodeError| format!("cannot decode {type_url}: {e}");
    let name = match type_url {
        LISTENER_TYPE => Listener::decode(bytes).map_err(bad)?.name,
        CLUSTER_TYPE => Cluster::decode(bytes).map_err(bad)?.name,
        ROUTE_TYPE => RouteConfiguration::decode(bytes).map_err(bad)?.name,
        ENDPOINT_TYPE => {
            ClusterLoadAssignment::decode(bytes)
                .map_err(bad)?
                .cluster_name
        }
        other => return Err(format!("unsupported type URL {other}")),
    };
    if name.is_empty() {
        return Err(format!("{type_url} resource has an empty name"));
    }
    Ok(name)
}

/// Unwraps a SotW resource that may come inside `envoy.service.discovery.v3.Resource`.
pub(crate) fn unwrap_sotw(
    body: envoy_types::pb::google::protobuf::Any,
) -> Result<envoy_types::pb::google::protobuf::Any, String> {
    if body.type_url != RESOURCE_WRAPPER_TYPE {
        return Ok(body);
    }
    let wrapped = discovery::Resource::decode(body.value.as_slice())
        .map_err(|e| format!("cannot decode envoy.service.discovery.v3.Resource: {e}"))?;
    wrapped
        .resource
        .ok_or_else(|| format!("wrapped resource {:?} has no body", wrapped.name))
}

/// Checks bodies and names of a response's resources: every body is of `type_url`, names are
/// non-empty and unique.
pub(crate) fn check_resources(
    type_url: &str,
    items: Vec<(
        Option<String>,
        String,
        envoy_types::pb::google::protobuf::Any,
    )>,
) -> Result<Vec<super::Resource>, String> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (i, (declared, version, body)) in items.into_iter().enumerate() {
        let name = resource_name(type_url, &body).map_err(|e| format!("resources[{i}]: {e}"))?;
        if let Some(declared) = declared {
            if declared != name {
                return Err(format!(
                    "resources[{i}]: name {declared:?} does not match the body's name {name:?}"
                ));
            }
        }
        if !seen.insert(name.clone()) {
            return Err(format!("resources[{i}]: duplicate resource name {name:?}"));
        }
        out.push(super::Resource {
            name,
            version,
            body,
        });
    }
    Ok(out)
}

/// The RDS and EDS resources a listener or cluster refers to, as `(type_url, name)`: a
/// listener's HTTP connection managers with `rds.route_config_name`, and an EDS cluster's
/// `eds_cluster_config.service_name` (or its own name when that is empty). Bodies that do not
/// decode refer to nothing (the handler reports them).
pub fn references(
    type_url: &str,
    body: &envoy_types::pb::google::protobuf::Any,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    match type_url {
        LISTENER_TYPE => {
            let Ok(l) = Listener::decode(body.value.as_slice()) else {
                return out;
            };
            for chain in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
                for f in &chain.filters {
                    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                        continue;
                    };
                    if any.type_url != HCM_TYPE {
                        continue;
                    }
                    let Ok(hcm) = HttpConnectionManager::decode(any.value.as_slice()) else {
                        continue;
                    };
                    if let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier {
                        if !rds.route_config_name.is_empty() {
                            out.push((ROUTE_TYPE, rds.route_config_name));
                        }
                    }
                }
            }
        }
        CLUSTER_TYPE => {
            let Ok(c) = Cluster::decode(body.value.as_slice()) else {
                return out;
            };
            if c.cluster_discovery_type
                == Some(cluster::ClusterDiscoveryType::Type(DISCOVERY_TYPE_EDS))
            {
                let service = c
                    .eds_cluster_config
                    .map(|e| e.service_name)
                    .filter(|s| !s.is_empty())
                    .unwrap_or(c.name);
                out.push((ENDPOINT_TYPE, service));
            }
        }
        _ => {}
    }
    out
}

/// `google.rpc.Status` for a NACK: INVALID_ARGUMENT with the detail.
pub(crate) fn nack_status(detail: String) -> envoy_types::pb::google::rpc::Status {
    envoy_types::pb::google::rpc::Status {
        code: 3,
        message: detail,
        details: Vec::new(),
    }
}

/// The node as sent on the first request of a stream.
pub(crate) fn node(n: &crate::model::Node) -> envoy_types::pb::envoy::config::core::v3::Node {
    use envoy_types::pb::envoy::config::core::v3 as core;
    core::Node {
        id: n.id.clone(),
        cluster: n.cluster.clone(),
        locality: Some(core::Locality {
            region: n.locality.region.clone(),
            zone: n.locality.zone.clone(),
            sub_zone: n.locality.sub_zone.clone(),
        }),
        user_agent_name: "strait".to_string(),
        user_agent_version_type: Some(core::node::UserAgentVersionType::UserAgentVersion(
            env!("CARGO_PKG_VERSION").to_string(),
        )),
        ..Default::default()
    }
}
