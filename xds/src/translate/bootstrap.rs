//! Bootstrap-level translation: node, admin, static resources; every other bootstrap field
//! changes behaviour Strait does not have yet and is rejected.

use std::collections::HashSet;
use std::sync::Arc;

use envoy_types::pb::envoy::config::bootstrap::v3 as bs;
use envoy_types::pb::envoy::config::core::v3 as core;

use super::{cluster, ip_socket_address, listener, locality, reject_set, Ctx};
use crate::model;

/// Translates a whole bootstrap; `dump` is left empty for the caller.
pub(crate) fn translate(cx: &mut Ctx, b: bs::Bootstrap) -> model::Bootstrap {
    let bs::Bootstrap {
        node,
        node_context_params,
        static_resources,
        dynamic_resources,
        cluster_manager,
        hds_config,
        flags_path,
        stats_sinks,
        deferred_stat_options,
        stats_config,
        stats_flush_interval,
        watchdog,
        watchdogs,
        tracing,
        layered_runtime,
        admin,
        overload_manager,
        enable_dispatcher_stats,
        header_prefix,
        stats_server_version_override,
        use_tcp_for_dns_lookups,
        dns_resolution_config,
        typed_dns_resolver_config,
        bootstrap_extensions,
        fatal_actions,
        config_sources,
        default_config_source,
        default_socket_interface,
        certificate_provider_instances,
        inline_headers,
        perf_tracing_file_path,
        default_regex_engine,
        xds_delegate_extension,
        xds_config_tracker_extension,
        listener_manager,
        application_log_config,
        grpc_async_client_manager_config,
        memory_allocator_manager,
        enable_worker_cpu_affinity,
        stats_flush,
        stats_eviction,
    } = b;
    let node = translate_node(cx, node);
    // An empty `cluster_manager: {}` changes nothing.
    let bs::ClusterManager {
        local_cluster_name,
        outlier_detection,
        upstream_bind_config,
        load_stats_config,
        enable_deferred_cluster_creation,
    } = cluster_manager.unwrap_or_default();
    reject_set!(cx, "cluster_manager"; outlier_detection, upstream_bind_config,
        load_stats_config, enable_deferred_cluster_creation);
    // Zone-aware routing: every cluster's LB config learns where Strait runs.
    cx.local_cluster_name = (!local_cluster_name.is_empty()).then(|| local_cluster_name.clone());
    cx.local_locality = node.locality.clone();
    reject_set!(cx, ""; node_context_params);
    // Before the static resources, which may use `ads: {}` sources; ads_config names static
    // clusters wherever they appear in the file.
    if let Some(sr) = &static_resources {
        cx.cluster_names = sr.clusters.iter().map(|c| c.name.clone()).collect();
    }
    let dynamic = dynamic_resources
        .and_then(|d| super::config_source::dynamic_resources(cx, "dynamic_resources", d));
    reject_set!(cx, "";
        hds_config, flags_path,
        stats_sinks, deferred_stat_options, stats_config, stats_flush_interval, watchdog,
        watchdogs, tracing, layered_runtime);
    let admin = admin.and_then(|a| translate_admin(cx, a));
    reject_set!(cx, "";
        overload_manager, enable_dispatcher_stats, header_prefix, stats_server_version_override,
        use_tcp_for_dns_lookups, dns_resolution_config, typed_dns_resolver_config,
        bootstrap_extensions, fatal_actions, config_sources, default_config_source,
        default_socket_interface, certificate_provider_instances, inline_headers,
        perf_tracing_file_path, default_regex_engine, xds_delegate_extension,
        xds_config_tracker_extension, listener_manager, application_log_config,
        grpc_async_client_manager_config, memory_allocator_manager, enable_worker_cpu_affinity,
        stats_flush, stats_eviction);

    let bs::bootstrap::StaticResources {
        listeners,
        clusters,
        secrets,
    } = static_resources.unwrap_or_default();
    let base = "static_resources";
    reject_set!(cx, base; secrets);
    // Routes are checked against every static cluster, wherever it appears in the file.
    cx.cluster_names = clusters.iter().map(|c| c.name.clone()).collect();
    if let Some(local) = &cx.local_cluster_name {
        if !cx.cluster_names.contains(local) {
            let msg = format!("local cluster '{local}' must be defined as a static cluster");
            cx.err("cluster_manager.local_cluster_name", msg);
        }
    }

    let mut out_listeners = Vec::new();
    let mut listener_names = HashSet::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let path = super::ix(base, "listeners", i);
        if let Some(l) = listener::translate(cx, &path, i, l) {
            if !listener_names.insert(l.name.clone()) {
                cx.err(
                    super::at(&path, "name"),
                    format!("duplicate listener name '{}'", l.name),
                );
            } else {
                out_listeners.push(Arc::new(l));
            }
        }
    }
    let mut out_clusters = Vec::new();
    let mut cluster_names = HashSet::new();
    for (i, c) in clusters.into_iter().enumerate() {
        let path = super::ix(base, "clusters", i);
        let name = c.name.clone();
        if !name.is_empty() && !cluster_names.insert(name.clone()) {
            cx.err(
                super::at(&path, "name"),
                format!("duplicate cluster name '{name}'"),
            );
            continue;
        }
        if let Some(c) = cluster::translate(cx, &path, c) {
            out_clusters.push(Arc::new(c));
        }
    }
    model::Bootstrap {
        node,
        admin,
        listeners: out_listeners,
        clusters: out_clusters,
        dump: model::ConfigDump::default(),
        dynamic,
        ..Default::default()
    }
}

fn translate_node(cx: &mut Ctx, node: Option<core::Node>) -> model::Node {
    let core::Node {
        id,
        cluster,
        // Only sent to a management server, which Strait does not talk to yet.
        metadata: _,
        dynamic_parameters,
        locality: loc,
        user_agent_name: _,
        extensions,
        client_features,
        listening_addresses,
        user_agent_version_type: _,
    } = node.unwrap_or_default();
    reject_set!(cx, "node"; dynamic_parameters, extensions, client_features, listening_addresses);
    model::Node {
        id,
        cluster,
        locality: locality(loc),
    }
}

fn translate_admin(cx: &mut Ctx, admin: bs::Admin) -> Option<model::Admin> {
    let bs::Admin {
        // The admin access log only records admin requests; accepted and not written.
        access_log: _,
        access_log_path: _,
        profile_path,
        address,
        socket_options,
        ignore_global_conn_limit,
        allow_paths,
    } = admin;
    reject_set!(cx, "admin"; profile_path, socket_options, ignore_global_conn_limit, allow_paths);
    // Envoy runs no admin server when the address is absent.
    address.as_ref()?;
    let address = ip_socket_address(cx, "admin.address", address)?;
    Some(model::Admin { address })
}
