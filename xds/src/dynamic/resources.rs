//! Per-resource translation for xDS: one Listener, RouteConfiguration, Cluster or
//! ClusterLoadAssignment from its `Any`, through the same strict translators as the static
//! bootstrap. Errors name the resource and the field path, ready for a NACK's `error_detail`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3 as cl;
use envoy_types::pb::envoy::config::endpoint::v3 as ep;
use envoy_types::pb::envoy::config::listener::v3 as lst;
use envoy_types::pb::envoy::config::route::v3 as rt;
use envoy_types::pb::google::protobuf::{Any, BoolValue};
use prost::Message;

use crate::model;
use crate::translate::config_source::SourceRef;
use crate::translate::{self, Ctx};

/// A listener with the RDS resource (name, source, stat prefix) it routes through, if any.
#[derive(Debug)]
pub struct TranslatedListener {
    pub listener: model::Listener,
    pub rds: Option<SourceRef>,
}

/// A cluster with the EDS resource (service name, source) it takes endpoints from, if any.
#[derive(Debug)]
pub struct TranslatedCluster {
    pub cluster: model::Cluster,
    pub eds: Option<SourceRef>,
}

/// What translating one resource may depend on.
#[derive(Debug, Default, Clone)]
pub struct Env {
    /// `dynamic_resources.ads_config` is configured.
    pub ads_configured: bool,
    /// Every cluster name known, for route configurations that set `validate_clusters`.
    pub cluster_names: HashSet<String>,
    /// The bootstrap's `cluster_manager.local_cluster_name` and `node.locality`, so clusters
    /// from CDS get zone-aware routing like static ones.
    pub local_cluster_name: Option<String>,
    pub local_locality: crate::model::Locality,
}

fn fail(kind: &str, name: &str, cx: Ctx) -> String {
    let details: Vec<String> = cx.errors.iter().map(|e| e.to_string()).collect();
    format!("{kind} '{name}': {}", details.join("; "))
}

fn ctx(env: &Env) -> Ctx {
    Ctx {
        ads_configured: env.ads_configured,
        cluster_names: env.cluster_names.clone(),
        local_cluster_name: env.local_cluster_name.clone(),
        local_locality: env.local_locality.clone(),
        ..Default::default()
    }
}

fn decode<M: Message + Default>(kind: &str, name: &str, any: &Any) -> Result<M, String> {
    M::decode(any.value.as_slice()).map_err(|e| format!("{kind} '{name}': cannot decode: {e}"))
}

/// Decodes a Listener.
pub fn decode_listener(name: &str, any: &Any) -> Result<lst::Listener, String> {
    decode("listener", name, any)
}

/// Translates a listener; `routes` supplies RDS route configurations (a missing one becomes
/// an empty placeholder). `path` prefixes field paths (empty for xDS resources).
pub fn listener(
    env: &Env,
    path: &str,
    index: usize,
    l: lst::Listener,
    routes: &HashMap<String, Arc<model::RouteConfig>>,
) -> Result<TranslatedListener, String> {
    let name = l.name.clone();
    let mut cx = ctx(env);
    cx.rds_routes = routes.clone();
    let out = translate::listener::translate(&mut cx, path, index, l);
    match out {
        Some(listener) if cx.errors.is_empty() => Ok(TranslatedListener {
            listener,
            rds: cx.rds_refs.pop(),
        }),
        _ => Err(fail("listener", &name, cx)),
    }
}

/// Translates a RouteConfiguration delivered by RDS. Envoy's default for RDS is
/// `validate_clusters: false` (true only for inline route configurations).
pub fn route_configuration(env: &Env, name: &str, any: &Any) -> Result<model::RouteConfig, String> {
    let mut rc: rt::RouteConfiguration = decode("route configuration", name, any)?;
    if rc.validate_clusters.is_none() {
        rc.validate_clusters = Some(BoolValue { value: false });
    }
    let mut cx = ctx(env);
    match translate::route::translate(&mut cx, "", rc) {
        Some(r) if cx.errors.is_empty() => Ok(r),
        _ => Err(fail("route configuration", name, cx)),
    }
}

/// Translates a Cluster (`path` prefixes field paths).
pub fn cluster(env: &Env, path: &str, c: cl::Cluster) -> Result<TranslatedCluster, String> {
    let name = c.name.clone();
    let mut cx = ctx(env);
    match translate::cluster::translate(&mut cx, path, c) {
        Some(cluster) if cx.errors.is_empty() => Ok(TranslatedCluster {
            cluster,
            eds: cx.eds_refs.pop(),
        }),
        _ => Err(fail("cluster", &name, cx)),
    }
}

/// Decodes a Cluster.
pub fn decode_cluster(name: &str, any: &Any) -> Result<cl::Cluster, String> {
    decode("cluster", name, any)
}

/// Translates a ClusterLoadAssignment (IP endpoints only, as for STATIC clusters).
pub fn cluster_load_assignment(name: &str, any: &Any) -> Result<model::LoadAssignment, String> {
    let la: ep::ClusterLoadAssignment = decode("cluster load assignment", name, any)?;
    let mut cx = Ctx::default();
    match translate::cluster::assignment(&mut cx, "", la, Some(model::DiscoveryType::Static)) {
        Some(a) if cx.errors.is_empty() => Ok(a),
        _ => Err(fail("cluster load assignment", name, cx)),
    }
}

/// Cluster names a route configuration forwards to (for make-before-break).
pub fn route_clusters(rc: &model::RouteConfig) -> Vec<&str> {
    let mut out = Vec::new();
    for vh in &rc.virtual_hosts {
        for r in &vh.routes {
            if let model::RouteAction::Forward(f) = &r.action {
                match &f.cluster {
                    model::ClusterSpecifier::Cluster(n) => out.push(n.as_str()),
                    model::ClusterSpecifier::Weighted(w) => {
                        out.extend(w.clusters.iter().map(|c| c.name.as_str()))
                    }
                    model::ClusterSpecifier::Header(_) => {}
                }
            }
        }
    }
    out
}

/// Renders an `Any` for `/config_dump` on demand.
#[derive(Debug)]
pub struct AnyBody(pub Arc<Any>);

impl model::Render for AnyBody {
    fn render(&self) -> serde_json::Value {
        crate::decode::to_json(self.0.as_ref(), "google.protobuf.Any")
    }
}
