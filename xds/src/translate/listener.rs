//! Listener translation: one socket address, one filter chain, one HTTP connection manager.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::listener::v3 as lst;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;

use super::{
    access_log, at, bool_value, ip_socket_address, ix, reject_set, route, timeout_or, u32_value,
    unpack, Ctx,
};
use crate::model;

pub(crate) const HCM_NAME: &str = "envoy.filters.network.http_connection_manager";
pub(crate) const HCM_TYPE: &str =
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER_TYPE: &str = "envoy.extensions.filters.http.router.v3.Router";

/// Translates one static listener at `path` (index `i`, used to name an unnamed listener).
pub(crate) fn translate(
    cx: &mut Ctx,
    path: &str,
    i: usize,
    l: lst::Listener,
) -> Option<model::Listener> {
    let lst::Listener {
        name,
        address,
        additional_addresses,
        stat_prefix,
        stats_matcher,
        filter_chains,
        fcds_config,
        filter_chain_matcher,
        use_original_dst,
        default_filter_chain,
        per_connection_buffer_limit_bytes,
        per_connection_buffer_high_watermark_timeout,
        // Only read by filters, none of which Strait has yet.
        metadata: _,
        deprecated_v1,
        drain_type,
        listener_filters,
        listener_filters_timeout,
        continue_on_listener_filters_timeout,
        transparent,
        freebind,
        socket_options,
        tcp_fast_open_queue_length,
        // Only read by tracing, which Strait does not have.
        traffic_direction: _,
        udp_listener_config,
        api_listener,
        connection_balance_config,
        reuse_port,
        enable_reuse_port,
        access_log,
        tcp_backlog_size,
        max_connections_to_accept_per_socket_event,
        bind_to_port,
        enable_mptcp,
        ignore_global_conn_limit,
        bypass_overload_manager,
        tcp_keepalive,
        listener_specifier,
    } = l;
    let start = cx.errors.len();
    let address = ip_socket_address(cx, &at(path, "address"), address);
    reject_set!(cx, path;
        additional_addresses, stat_prefix, stats_matcher, fcds_config, filter_chain_matcher,
        use_original_dst, default_filter_chain, per_connection_buffer_limit_bytes,
        per_connection_buffer_high_watermark_timeout, deprecated_v1, drain_type,
        listener_filters, listener_filters_timeout, continue_on_listener_filters_timeout,
        transparent, freebind, socket_options, tcp_fast_open_queue_length, udp_listener_config,
        api_listener, connection_balance_config, reuse_port, enable_reuse_port, access_log,
        tcp_backlog_size, max_connections_to_accept_per_socket_event, bind_to_port, enable_mptcp,
        ignore_global_conn_limit, bypass_overload_manager, tcp_keepalive, listener_specifier);

    let hcm = match filter_chains.len() {
        1 => filter_chains
            .into_iter()
            .next()
            .and_then(|fc| filter_chain(cx, &ix(path, "filter_chains", 0), fc)),
        0 => {
            cx.err(
                at(path, "filter_chains"),
                "exactly one filter chain required",
            );
            None
        }
        _ => {
            cx.err(
                ix(path, "filter_chains", 1),
                "not supported yet (only one filter chain)",
            );
            None
        }
    };
    if cx.errors.len() > start {
        return None;
    }
    // Envoy names an unnamed static listener itself; a stable name keeps stats readable.
    let name = if name.is_empty() {
        format!("listener_{i}")
    } else {
        name
    };
    Some(model::Listener {
        name,
        address: address?,
        hcm: Arc::new(hcm?),
    })
}

fn filter_chain(
    cx: &mut Ctx,
    path: &str,
    fc: lst::FilterChain,
) -> Option<model::HttpConnectionManager> {
    let lst::FilterChain {
        filter_chain_match,
        filters,
        use_proxy_proto,
        metadata: _,
        transport_socket,
        transport_socket_connect_timeout,
        name: _,
    } = fc;
    reject_set!(cx, path;
        filter_chain_match, use_proxy_proto, transport_socket, transport_socket_connect_timeout);
    if filters.len() != 1 {
        cx.err(
            at(path, "filters"),
            format!("exactly one network filter ({HCM_NAME}) required"),
        );
        return None;
    }
    let path = ix(path, "filters", 0);
    let lst::Filter { name, config_type } = filters.into_iter().next()?;
    let any = match config_type {
        Some(lst::filter::ConfigType::TypedConfig(any)) => any,
        Some(lst::filter::ConfigType::ConfigDiscovery(_)) => {
            cx.unsupported(at(&path, "config_discovery"));
            return None;
        }
        None => {
            cx.err(at(&path, "typed_config"), "required");
            return None;
        }
    };
    if any.type_url != format!("type.googleapis.com/{HCM_TYPE}") {
        cx.err(
            at(&path, "typed_config"),
            format!("unknown network filter '{name}' ({})", any.type_url),
        );
        return None;
    }
    let path = at(&path, "typed_config");
    let hcm: hcm::HttpConnectionManager = unpack(cx, &path, &any, HCM_TYPE)?;
    http_connection_manager(cx, &path, hcm)
}

fn http_connection_manager(
    cx: &mut Ctx,
    path: &str,
    h: hcm::HttpConnectionManager,
) -> Option<model::HttpConnectionManager> {
    let hcm::HttpConnectionManager {
        codec_type,
        stat_prefix,
        http_filters,
        add_user_agent,
        tracing,
        common_http_protocol_options,
        http1_safe_max_connection_duration,
        http_protocol_options,
        http2_protocol_options,
        http3_protocol_options,
        server_name,
        server_header_transformation,
        scheme_header_transformation,
        max_request_headers_kb,
        stream_idle_timeout,
        stream_flush_timeout,
        request_timeout,
        request_headers_timeout,
        drain_timeout,
        drain_timeout_jitter,
        delayed_close_timeout,
        access_log,
        access_log_flush_interval,
        flush_access_log_on_new_request,
        access_log_options,
        use_remote_address,
        xff_num_trusted_hops,
        original_ip_detection_extensions,
        early_header_mutation_extensions,
        internal_address_config,
        skip_xff_append,
        via,
        generate_request_id,
        preserve_external_request_id,
        always_set_request_id_in_response,
        forward_client_cert_details,
        set_current_client_cert_details,
        forward_client_cert_matcher,
        proxy_100_continue,
        represent_ipv4_remote_address_as_ipv4_mapped_ipv6,
        upgrade_configs,
        normalize_path,
        merge_slashes,
        path_with_escaped_slashes_action,
        request_id_extension,
        local_reply_config,
        strip_matching_host_port,
        stream_error_on_invalid_http_message,
        path_normalization_options,
        strip_trailing_host_dot,
        proxy_status_config,
        typed_header_validation_config,
        append_x_forwarded_port,
        append_local_overload,
        add_proxy_protocol_connection_state,
        forward_proto_config,
        route_specifier,
        strip_port_mode,
    } = h;
    let start = cx.errors.len();
    let codec = match hcm::http_connection_manager::CodecType::try_from(codec_type) {
        Ok(hcm::http_connection_manager::CodecType::Auto) => model::CodecType::Auto,
        Ok(hcm::http_connection_manager::CodecType::Http1) => model::CodecType::Http1,
        Ok(hcm::http_connection_manager::CodecType::Http2) => model::CodecType::Http2,
        Ok(hcm::http_connection_manager::CodecType::Http3) => {
            cx.unsupported(at(path, "codec_type"));
            model::CodecType::Auto
        }
        Err(_) => {
            cx.err(
                at(path, "codec_type"),
                format!("unknown value {codec_type}"),
            );
            model::CodecType::Auto
        }
    };
    if stat_prefix.is_empty() {
        cx.err(at(path, "stat_prefix"), "required");
    }
    cx.stat_prefix = stat_prefix.clone();
    let filters = http_filter_chain(cx, &at(path, "http_filters"), http_filters);
    reject_set!(cx, path;
        add_user_agent, tracing, common_http_protocol_options, http1_safe_max_connection_duration,
        http_protocol_options, http2_protocol_options, http3_protocol_options,
        scheme_header_transformation);
    let server_header = server_header(cx, path, server_name, server_header_transformation);
    let max_kb = u32_value(max_request_headers_kb).unwrap_or(60);
    if !(1..=8192).contains(&max_kb) {
        cx.err(
            at(path, "max_request_headers_kb"),
            format!("must be in 1..=8192, got {max_kb}"),
        );
    }
    let stream_idle_timeout = timeout_or(
        cx,
        &at(path, "stream_idle_timeout"),
        stream_idle_timeout,
        Some(Duration::from_secs(300)),
    );
    reject_set!(cx, path; stream_flush_timeout);
    let request_timeout = timeout_or(cx, &at(path, "request_timeout"), request_timeout, None);
    let request_headers_timeout = timeout_or(
        cx,
        &at(path, "request_headers_timeout"),
        request_headers_timeout,
        None,
    );
    reject_set!(cx, path; drain_timeout, drain_timeout_jitter, delayed_close_timeout);
    let mut access_logs = Vec::new();
    for (i, a) in access_log.into_iter().enumerate() {
        if let Some(a) = access_log::translate(cx, &ix(path, "access_log", i), a) {
            access_logs.push(a);
        }
    }
    reject_set!(cx, path;
        access_log_flush_interval, flush_access_log_on_new_request, access_log_options,
        original_ip_detection_extensions, early_header_mutation_extensions,
        internal_address_config, skip_xff_append, via, preserve_external_request_id,
        always_set_request_id_in_response, forward_client_cert_details,
        set_current_client_cert_details, forward_client_cert_matcher, proxy_100_continue,
        represent_ipv4_remote_address_as_ipv4_mapped_ipv6);
    let upgrade_types = hcm_upgrades(cx, &at(path, "upgrade_configs"), upgrade_configs);
    reject_set!(cx, path;
        normalize_path, merge_slashes, path_with_escaped_slashes_action, request_id_extension,
        local_reply_config, strip_matching_host_port, stream_error_on_invalid_http_message,
        path_normalization_options, strip_trailing_host_dot, proxy_status_config,
        typed_header_validation_config, append_x_forwarded_port, append_local_overload,
        add_proxy_protocol_connection_state, forward_proto_config, strip_port_mode);
    use hcm::http_connection_manager::RouteSpecifier;
    let route_config = match route_specifier {
        Some(RouteSpecifier::RouteConfig(rc)) => {
            route::translate(cx, &at(path, "route_config"), rc).map(Arc::new)
        }
        Some(RouteSpecifier::Rds(r)) => super::config_source::rds(cx, &at(path, "rds"), r),
        Some(RouteSpecifier::ScopedRoutes(_)) => {
            cx.unsupported(at(path, "scoped_routes"));
            None
        }
        None => {
            cx.err(at(path, "route_config"), "required (or rds)");
            None
        }
    };
    if cx.errors.len() > start {
        return None;
    }
    let (http_filters, filter_chain, suppress_envoy_headers) = filters?;
    Some(model::HttpConnectionManager {
        stat_prefix,
        codec_type: codec,
        route_config: route_config?,
        http_filters,
        filter_chain,
        stream_idle_timeout,
        request_timeout,
        request_headers_timeout,
        max_request_headers_kb: max_kb,
        use_remote_address: bool_value(use_remote_address).unwrap_or(false),
        xff_num_trusted_hops,
        generate_request_id: bool_value(generate_request_id).unwrap_or(true),
        access_logs,
        upgrade_types,
        server_header,
        suppress_envoy_headers,
    })
}

/// `server_name` (default `envoy`) and `server_header_transformation` (default `OVERWRITE`).
fn server_header(
    cx: &mut Ctx,
    path: &str,
    server_name: String,
    transformation: i32,
) -> model::ServerHeader {
    use hcm::http_connection_manager::ServerHeaderTransformation as T;
    let name = if server_name.is_empty() {
        model::ServerHeader::default_name()
    } else {
        // Envoy refuses only NUL, CR and LF here; other control bytes cannot be sent either.
        match http::HeaderValue::from_bytes(server_name.as_bytes()) {
            Ok(v) => v,
            Err(_) => {
                cx.err(at(path, "server_name"), "not a valid header value");
                model::ServerHeader::default_name()
            }
        }
    };
    match T::try_from(transformation) {
        Ok(T::Overwrite) => model::ServerHeader::Overwrite(name),
        Ok(T::AppendIfAbsent) => model::ServerHeader::AppendIfAbsent(name),
        Ok(T::PassThrough) => model::ServerHeader::PassThrough,
        Err(_) => {
            cx.err(
                at(path, "server_header_transformation"),
                format!("unknown value {transformation}"),
            );
            model::ServerHeader::default()
        }
    }
}

/// The HTTP filters: everything before the router, which must come last. Each is built by the
/// filter registry from its `typed_config` (validated here, so a config that translates never
/// fails on the request path); unknown filters are errors unless `is_optional`.
fn http_filter_chain(
    cx: &mut Ctx,
    path: &str,
    filters: Vec<hcm::HttpFilter>,
) -> Option<(
    Vec<model::HttpFilter>,
    Arc<strait_filters::FilterChain>,
    bool,
)> {
    let start = cx.errors.len();
    let n = filters.len();
    let env = cx.filter_env.0.clone();
    let stat_prefix = cx.stat_prefix.clone();
    // Owned, so that building filters does not hold a borrow of the context.
    let names = cx.cluster_names.clone();
    let clusters = NamedClusters {
        names: &names,
        inner: env.clusters.as_ref(),
    };
    let bcx = strait_filters::BuildContext {
        stat_prefix: &stat_prefix,
        stats: env.stats.as_ref(),
        clusters: &clusters,
    };
    let mut out = Vec::new();
    let mut entries = Vec::new();
    let mut saw_router = false;
    let mut suppress_envoy_headers = false;
    for (i, f) in filters.into_iter().enumerate() {
        let fpath = format!("{path}[{i}]");
        let hcm::HttpFilter {
            name,
            is_optional,
            disabled,
            config_type,
        } = f;
        let any = match config_type {
            Some(hcm::http_filter::ConfigType::TypedConfig(any)) => Some(any),
            Some(hcm::http_filter::ConfigType::ConfigDiscovery(_)) => {
                cx.unsupported(at(&fpath, "config_discovery"));
                continue;
            }
            None => None,
        };
        let is_router = match &any {
            Some(any) => any.type_url == format!("type.googleapis.com/{ROUTER_TYPE}"),
            None => name == strait_filters::ROUTER_NAME,
        };
        if is_router {
            if i + 1 != n {
                cx.err(
                    &fpath,
                    format!("terminal filter '{name}' must be the last filter in the chain"),
                );
            }
            if disabled {
                cx.unsupported(at(&fpath, "disabled"));
            }
            if let Some(any) = any {
                let tpath = at(&fpath, "typed_config");
                if let Some(r) = unpack::<Router>(cx, &tpath, &any, ROUTER_TYPE) {
                    suppress_envoy_headers = router(cx, &tpath, r);
                }
            }
            saw_router = true;
            continue;
        }
        let Some(any) = any else {
            if is_optional {
                continue;
            }
            cx.err(&fpath, format!("filter '{name}': typed_config is required"));
            continue;
        };
        let tpath = at(&fpath, "typed_config");
        if !env.registry.knows(&any.type_url) {
            // Envoy skips optional filters it does not know.
            if !is_optional {
                cx.err(tpath, format!("unknown filter '{name}' ({})", any.type_url));
            }
            continue;
        }
        match env
            .registry
            .build(&name, &any.type_url, &any.value, &tpath, &bcx)
        {
            Ok(filter) => {
                out.push(model::HttpFilter {
                    name: name.clone(),
                    type_url: any.type_url.clone(),
                });
                entries.push(strait_filters::ChainEntry {
                    name: name.as_str().into(),
                    filter,
                    disabled_by_default: disabled,
                });
            }
            Err(e) => cx.err(e.path, e.message),
        }
    }
    if !saw_router && cx.errors.len() == start {
        cx.err(
            path,
            format!("the last filter must be {}", strait_filters::ROUTER_NAME),
        );
    }
    if cx.errors.len() > start {
        return None;
    }
    Some((
        out,
        Arc::new(strait_filters::FilterChain::new(entries)),
        suppress_envoy_headers,
    ))
}

/// Checks a filter's cluster against the clusters this configuration knows before asking the
/// data plane for a channel, so an unknown cluster is a config error at the filter's field.
struct NamedClusters<'a> {
    names: &'a HashSet<String>,
    inner: &'a dyn strait_filters::ClusterConnector,
}

impl strait_filters::ClusterConnector for NamedClusters<'_> {
    fn grpc_channel(&self, cluster: &str) -> Result<tonic::transport::Channel, String> {
        if !self.names.contains(cluster) {
            return Err(format!("unknown cluster '{cluster}'"));
        }
        self.inner.grpc_channel(cluster)
    }
}

/// Router options are accepted only at values that keep Envoy's default behaviour, but for
/// `suppress_envoy_headers`, which is returned.
fn router(cx: &mut Ctx, path: &str, r: Router) -> bool {
    let Router {
        dynamic_stats,
        start_child_span,
        upstream_log,
        upstream_log_options,
        suppress_envoy_headers,
        strict_check_headers,
        respect_expected_rq_timeout,
        suppress_grpc_request_failure_code_stats,
        upstream_http_filters,
        reject_connect_request_early_data,
    } = r;
    if bool_value(dynamic_stats) == Some(false) {
        cx.unsupported(at(path, "dynamic_stats"));
    }
    reject_set!(cx, path;
        start_child_span, upstream_log, upstream_log_options,
        strict_check_headers, respect_expected_rq_timeout, suppress_grpc_request_failure_code_stats,
        upstream_http_filters, reject_connect_request_early_data);
    suppress_envoy_headers
}

fn hcm_upgrades(
    cx: &mut Ctx,
    path: &str,
    upgrades: Vec<hcm::http_connection_manager::UpgradeConfig>,
) -> Vec<model::UpgradeConfig> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, u) in upgrades.into_iter().enumerate() {
        let upath = format!("{path}[{i}]");
        let hcm::http_connection_manager::UpgradeConfig {
            upgrade_type,
            filters,
            enabled,
        } = u;
        reject_set!(cx, &upath; filters);
        if upgrade_type.is_empty() {
            cx.err(at(&upath, "upgrade_type"), "required");
            continue;
        }
        let t = upgrade_type.to_ascii_lowercase();
        if !seen.insert(t.clone()) {
            cx.err(
                at(&upath, "upgrade_type"),
                format!("multiple upgrade configs with the same name: '{upgrade_type}'"),
            );
            continue;
        }
        out.push(model::UpgradeConfig {
            upgrade_type: t,
            enabled: bool_value(enabled).unwrap_or(true),
        });
    }
    out
}
