//! xDS config sources: `dynamic_resources` (ADS, LDS, CDS), and the `ConfigSource` messages
//! that listeners (RDS) and EDS clusters carry. Only ADS over gRPC and `path_config_source` are
//! implemented; every other way Envoy can fetch config is rejected with its path.

use std::path::PathBuf;
use std::time::Duration;

use envoy_types::pb::envoy::config::bootstrap::v3 as bs;
use envoy_types::pb::envoy::config::cluster::v3 as cl;
use envoy_types::pb::envoy::config::core::v3 as core;

use super::{at, duration, ix, reject_set, Ctx};
use crate::model;

/// Envoy's default `initial_fetch_timeout`.
const INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// An RDS or EDS resource that a listener or cluster uses: its name, the source it comes from
/// (with that source's own `initial_fetch_timeout`) and, for RDS, the connection manager's
/// `stat_prefix` (Envoy counts RDS under `http.<stat_prefix>.rds.<name>.`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRef {
    pub name: String,
    pub source: model::ConfigSource,
    pub stat_prefix: String,
}

/// `dynamic_resources` at `path`.
pub(crate) fn dynamic_resources(
    cx: &mut Ctx,
    path: &str,
    d: bs::bootstrap::DynamicResources,
) -> Option<model::DynamicResources> {
    let bs::bootstrap::DynamicResources {
        lds_config,
        lds_resources_locator,
        cds_config,
        cds_resources_locator,
        ads_config,
    } = d;
    let start = cx.errors.len();
    reject_set!(cx, path; lds_resources_locator, cds_resources_locator);
    let ads = ads_config.and_then(|a| ads(cx, &at(path, "ads_config"), a));
    cx.ads_configured = ads.is_some();
    let lds = lds_config.and_then(|c| config_source(cx, &at(path, "lds_config"), c));
    let cds = cds_config.and_then(|c| config_source(cx, &at(path, "cds_config"), c));
    if cx.errors.len() > start {
        return None;
    }
    Some(model::DynamicResources { ads, lds, cds })
}

fn ads(cx: &mut Ctx, path: &str, a: core::ApiConfigSource) -> Option<model::AdsSource> {
    use core::api_config_source::ApiType;
    let core::ApiConfigSource {
        api_type,
        transport_api_version,
        cluster_names,
        grpc_services,
        refresh_delay,
        request_timeout,
        rate_limit_settings,
        set_node_on_first_message_only,
        config_validators,
    } = a;
    let start = cx.errors.len();
    let delta = match ApiType::try_from(api_type) {
        Ok(ApiType::Grpc) => false,
        Ok(ApiType::DeltaGrpc) => true,
        _ => {
            cx.err(
                at(path, "api_type"),
                format!("only GRPC and DELTA_GRPC are supported, got {api_type}"),
            );
            false
        }
    };
    if transport_api_version != core::ApiVersion::V3 as i32 {
        cx.err(at(path, "transport_api_version"), "must be V3");
    }
    // The node goes on the first request of each stream, which is what this asks for.
    let _ = set_node_on_first_message_only;
    reject_set!(cx, path;
        cluster_names, refresh_delay, request_timeout, rate_limit_settings, config_validators);
    if grpc_services.is_empty() {
        cx.err(at(path, "grpc_services"), "at least one is required");
    }
    let mut clusters = Vec::new();
    for (i, g) in grpc_services.into_iter().enumerate() {
        let gpath = ix(path, "grpc_services", i);
        let core::GrpcService {
            timeout,
            initial_metadata,
            retry_policy,
            target_specifier,
        } = g;
        reject_set!(cx, &gpath; timeout, initial_metadata, retry_policy);
        match target_specifier {
            Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(e)) => {
                let epath = at(&gpath, "envoy_grpc");
                let core::grpc_service::EnvoyGrpc {
                    cluster_name,
                    authority,
                    retry_policy,
                    max_receive_message_length,
                    skip_envoy_headers,
                } = e;
                reject_set!(cx, &epath;
                    authority, retry_policy, max_receive_message_length, skip_envoy_headers);
                if cluster_name.is_empty() {
                    cx.err(at(&epath, "cluster_name"), "required");
                } else if !cx.cluster_names.contains(&cluster_name) {
                    cx.err(
                        at(&epath, "cluster_name"),
                        format!("unknown static cluster '{cluster_name}'"),
                    );
                } else {
                    clusters.push(cluster_name);
                }
            }
            Some(core::grpc_service::TargetSpecifier::GoogleGrpc(_)) => {
                cx.unsupported(at(&gpath, "google_grpc"))
            }
            None => cx.err(at(&gpath, "envoy_grpc"), "required"),
        }
    }
    if cx.errors.len() > start {
        return None;
    }
    Some(model::AdsSource { delta, clusters })
}

/// A `ConfigSource` at `path`: `ads: {}` (needs `ads_config`) or `path_config_source`.
pub(crate) fn config_source(
    cx: &mut Ctx,
    path: &str,
    c: core::ConfigSource,
) -> Option<model::ConfigSource> {
    use core::config_source::ConfigSourceSpecifier as S;
    let core::ConfigSource {
        authorities,
        initial_fetch_timeout,
        resource_api_version,
        config_source_specifier,
    } = c;
    let start = cx.errors.len();
    reject_set!(cx, path; authorities);
    // AUTO is V3 today; V2 is gone from Envoy.
    if resource_api_version == core::ApiVersion::V2 as i32 {
        cx.err(at(path, "resource_api_version"), "must be V3");
    }
    let timeout_path = at(path, "initial_fetch_timeout");
    let initial_fetch_timeout = match initial_fetch_timeout {
        None => Some(INITIAL_FETCH_TIMEOUT),
        Some(d) => duration(cx, &timeout_path, Some(d)).filter(|d| !d.is_zero()),
    };
    let kind = match config_source_specifier {
        Some(S::Ads(core::AggregatedConfigSource {})) => {
            if !cx.ads_configured {
                cx.err(
                    at(path, "ads"),
                    "requires dynamic_resources.ads_config in the bootstrap",
                );
            }
            Some(model::ConfigSourceKind::Ads)
        }
        Some(S::PathConfigSource(p)) => path_source(cx, &at(path, "path_config_source"), p),
        Some(S::Path(_)) => {
            cx.err(
                at(path, "path"),
                "deprecated: use path_config_source (not supported)",
            );
            None
        }
        Some(S::ApiConfigSource(_)) => {
            cx.unsupported(at(path, "api_config_source"));
            None
        }
        Some(S::Self_(_)) => {
            cx.unsupported(at(path, "self"));
            None
        }
        None => {
            cx.err(path, "one of ads or path_config_source is required");
            None
        }
    };
    if cx.errors.len() > start {
        return None;
    }
    Some(model::ConfigSource {
        kind: kind?,
        initial_fetch_timeout,
    })
}

fn path_source(
    cx: &mut Ctx,
    path: &str,
    p: core::PathConfigSource,
) -> Option<model::ConfigSourceKind> {
    let core::PathConfigSource {
        path: file,
        watched_directory,
        poll_interval,
    } = p;
    reject_set!(cx, path; poll_interval);
    if file.is_empty() {
        cx.err(at(path, "path"), "required");
        return None;
    }
    let watched_directory = match watched_directory {
        Some(core::WatchedDirectory {
            path: dir,
            watch_modify: _,
        }) => {
            if dir.is_empty() {
                cx.err(at(path, "watched_directory.path"), "required");
                return None;
            }
            Some(PathBuf::from(dir))
        }
        None => None,
    };
    Some(model::ConfigSourceKind::Path {
        path: PathBuf::from(file),
        watched_directory,
    })
}

/// The EDS settings of a cluster named `name`: records the service name it subscribes to in
/// `cx.eds_refs`. `eds_cluster_config` is only valid with `type: EDS`.
pub(crate) fn eds_cluster(
    cx: &mut Ctx,
    path: &str,
    name: &str,
    discovery: Option<model::DiscoveryType>,
    eds: Option<cl::cluster::EdsClusterConfig>,
) {
    let epath = at(path, "eds_cluster_config");
    match (discovery, eds) {
        (Some(model::DiscoveryType::Eds), Some(e)) => {
            let cl::cluster::EdsClusterConfig {
                eds_config,
                service_name,
            } = e;
            let Some(source) = eds_config else {
                cx.err(at(&epath, "eds_config"), "required");
                return;
            };
            if let Some(s) = config_source(cx, &at(&epath, "eds_config"), source) {
                let service = if service_name.is_empty() {
                    name.to_string()
                } else {
                    service_name
                };
                cx.eds_refs.push(SourceRef {
                    name: service,
                    source: s,
                    stat_prefix: String::new(),
                });
            }
        }
        (Some(model::DiscoveryType::Eds), None) => {
            cx.err(epath, "required with type EDS");
        }
        (_, Some(_)) => cx.err(epath, "only valid with type EDS"),
        (_, None) => {}
    }
}

/// `rds` of an HTTP connection manager: the route configuration comes from `cx.rds_routes`,
/// or is an empty placeholder (the listener warms until it arrives).
pub(crate) fn rds(
    cx: &mut Ctx,
    path: &str,
    r: envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::Rds,
) -> Option<std::sync::Arc<model::RouteConfig>> {
    let envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::Rds {
        config_source: source,
        route_config_name,
    } = r;
    let start = cx.errors.len();
    if route_config_name.is_empty() {
        cx.err(at(path, "route_config_name"), "required");
    }
    let source = match source {
        Some(s) => config_source(cx, &at(path, "config_source"), s),
        None => {
            cx.err(at(path, "config_source"), "required");
            None
        }
    };
    if cx.errors.len() > start {
        return None;
    }
    let source = source?;
    cx.rds_refs.push(SourceRef {
        name: route_config_name.clone(),
        source,
        stat_prefix: cx.stat_prefix.clone(),
    });
    Some(match cx.rds_routes.get(&route_config_name) {
        Some(rc) => rc.clone(),
        None => std::sync::Arc::new(model::RouteConfig {
            name: route_config_name,
            ..Default::default()
        }),
    })
}
