//! Cluster translation: STATIC / STRICT_DNS clusters, load balancing, endpoints, upstream HTTP
//! protocol and circuit breakers.

use std::collections::BTreeSet;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cl;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as ep;
use envoy_types::pb::envoy::extensions::upstreams::http::v3 as up;

use super::{
    at, duration, ip_socket_address, ix, locality, reject_set, socket_address, timeout_or,
    u32_value, unpack, Ctx, HostKind,
};
use crate::model;

const HTTP_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

pub(crate) fn translate(cx: &mut Ctx, path: &str, c: cl::Cluster) -> Option<model::Cluster> {
    let cl::Cluster {
        transport_socket_matches,
        transport_socket_matcher,
        name,
        alt_stat_name,
        stats_matcher,
        eds_cluster_config,
        connect_timeout,
        per_connection_buffer_limit_bytes,
        per_connection_buffer_high_watermark_timeout,
        lb_policy,
        load_assignment,
        health_checks,
        max_requests_per_connection,
        circuit_breakers,
        upstream_http_protocol_options,
        common_http_protocol_options,
        http_protocol_options,
        http2_protocol_options,
        typed_extension_protocol_options,
        dns_refresh_rate,
        dns_jitter,
        dns_failure_refresh_rate,
        respect_dns_ttl,
        dns_lookup_family,
        dns_resolvers,
        use_tcp_for_dns_lookups,
        dns_resolution_config,
        typed_dns_resolver_config,
        wait_for_warm_on_init,
        outlier_detection,
        cleanup_interval,
        upstream_bind_config,
        lb_subset_config,
        common_lb_config,
        transport_socket,
        metadata,
        protocol_selection,
        upstream_connection_options,
        close_connections_on_host_health_failure,
        ignore_health_on_host_removal,
        filters,
        load_balancing_policy,
        lrs_server,
        lrs_report_endpoint_metrics,
        track_timeout_budgets,
        upstream_config,
        track_cluster_stats,
        preconnect_policy,
        connection_pool_per_downstream_connection,
        queuing_policies,
        cluster_discovery_type,
        lb_config,
    } = c;
    let start = cx.errors.len();
    if name.is_empty() {
        cx.err(at(path, "name"), "required");
    }
    let discovery = match cluster_discovery_type {
        None => Some(model::DiscoveryType::Static),
        Some(cl::cluster::ClusterDiscoveryType::Type(t)) => {
            match cl::cluster::DiscoveryType::try_from(t) {
                Ok(cl::cluster::DiscoveryType::Static) => Some(model::DiscoveryType::Static),
                Ok(cl::cluster::DiscoveryType::StrictDns) => Some(model::DiscoveryType::StrictDns),
                Ok(cl::cluster::DiscoveryType::Eds) => Some(model::DiscoveryType::Eds),
                _ => {
                    cx.unsupported(at(path, "type"));
                    None
                }
            }
        }
        Some(cl::cluster::ClusterDiscoveryType::ClusterType(_)) => {
            cx.unsupported(at(path, "cluster_type"));
            None
        }
    };
    reject_set!(cx, path;
            transport_socket_matches, transport_socket_matcher, alt_stat_name, stats_matcher,
    );
    // EDS: where the endpoints come from, and under which service name.
    super::config_source::eds_cluster(cx, path, &name, discovery, eds_cluster_config);
    let connect_timeout = match duration(cx, &at(path, "connect_timeout"), connect_timeout) {
        None => Duration::from_secs(5),
        Some(d) if d.is_zero() => {
            cx.err(at(path, "connect_timeout"), "must be greater than 0");
            d
        }
        Some(d) => d,
    };
    reject_set!(cx, path;
        per_connection_buffer_limit_bytes, per_connection_buffer_high_watermark_timeout);
    let (lb_policy, lb) =
        super::lb::translate(cx, path, lb_policy, lb_config, common_lb_config, metadata);
    let load_assignment = match load_assignment {
        Some(_) if discovery == Some(model::DiscoveryType::Eds) => {
            cx.err(
                at(path, "load_assignment"),
                "not supported with type EDS (endpoints come from EDS)",
            );
            None
        }
        Some(la) => assignment(cx, &at(path, "load_assignment"), la, discovery),
        None => Some(model::LoadAssignment::default()),
    };
    let health_checks = super::health::health_checks(cx, path, health_checks);
    reject_set!(cx, path; max_requests_per_connection);
    let (circuit_breakers, circuit_breakers_high) = match circuit_breakers {
        Some(cb) => breakers(cx, &at(path, "circuit_breakers"), cb),
        None => Default::default(),
    };
    reject_set!(cx, path; upstream_http_protocol_options, common_http_protocol_options,
        http_protocol_options);
    let (protocol, idle_timeout) = protocol(
        cx,
        path,
        http2_protocol_options,
        typed_extension_protocol_options,
    );
    let dns_refresh_rate = match duration(cx, &at(path, "dns_refresh_rate"), dns_refresh_rate) {
        None => Duration::from_secs(5),
        Some(d) if d < Duration::from_millis(1) => {
            cx.err(at(path, "dns_refresh_rate"), "must be at least 1ms");
            d
        }
        Some(d) => d,
    };
    reject_set!(cx, path; dns_jitter, dns_failure_refresh_rate, respect_dns_ttl);
    use cl::cluster::DnsLookupFamily as F;
    let dns_lookup_family = match F::try_from(dns_lookup_family) {
        Ok(F::Auto) => model::DnsLookupFamily::Auto,
        Ok(F::V4Only) => model::DnsLookupFamily::V4Only,
        Ok(F::V6Only) => model::DnsLookupFamily::V6Only,
        Ok(F::V4Preferred) => model::DnsLookupFamily::V4Preferred,
        Ok(F::All) => model::DnsLookupFamily::All,
        Err(_) => {
            cx.err(
                at(path, "dns_lookup_family"),
                format!("unknown value {dns_lookup_family}"),
            );
            model::DnsLookupFamily::Auto
        }
    };
    reject_set!(cx, path;
        dns_resolvers, use_tcp_for_dns_lookups, dns_resolution_config, typed_dns_resolver_config,
        wait_for_warm_on_init, cleanup_interval, upstream_bind_config,
        lb_subset_config, transport_socket, protocol_selection,
        upstream_connection_options, close_connections_on_host_health_failure,
        ignore_health_on_host_removal, filters, load_balancing_policy, lrs_server,
        lrs_report_endpoint_metrics, track_timeout_budgets, upstream_config, track_cluster_stats,
        preconnect_policy, connection_pool_per_downstream_connection, queuing_policies);
    let outlier_detection = outlier_detection
        .and_then(|o| super::health::outlier(cx, &at(path, "outlier_detection"), o));
    if cx.errors.len() > start {
        return None;
    }
    Some(model::Cluster {
        name,
        discovery: discovery?,
        connect_timeout,
        lb_policy: lb_policy?,
        load_assignment: load_assignment?,
        protocol,
        circuit_breakers,
        idle_timeout,
        dns_refresh_rate,
        dns_lookup_family,
        health_checks,
        outlier_detection,
        circuit_breakers_high,
        lb,
    })
}

pub(crate) fn assignment(
    cx: &mut Ctx,
    path: &str,
    la: ep::ClusterLoadAssignment,
    discovery: Option<model::DiscoveryType>,
) -> Option<model::LoadAssignment> {
    let ep::ClusterLoadAssignment {
        cluster_name: _,
        endpoints,
        named_endpoints,
        policy,
    } = la;
    let start = cx.errors.len();
    reject_set!(cx, path; named_endpoints);
    let policy = policy
        .map(|p| super::lb::assignment_policy(cx, &at(path, "policy"), p))
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut priorities = BTreeSet::new();
    for (i, lle) in endpoints.into_iter().enumerate() {
        let lpath = ix(path, "endpoints", i);
        let ep::LocalityLbEndpoints {
            locality: loc,
            metadata: _,
            lb_endpoints,
            load_balancing_weight,
            priority,
            proximity,
            lb_config,
        } = lle;
        reject_set!(cx, &lpath; proximity, lb_config);
        let weight = u32_value(load_balancing_weight);
        if weight == Some(0) {
            cx.err(at(&lpath, "load_balancing_weight"), "must be at least 1");
        }
        priorities.insert(priority);
        let mut hosts = Vec::new();
        for (j, lbe) in lb_endpoints.into_iter().enumerate() {
            if let Some(h) = lb_endpoint(cx, &ix(&lpath, "lb_endpoints", j), lbe, discovery) {
                hosts.push(h);
            }
        }
        out.push(model::LocalityLbEndpoints {
            locality: locality(loc),
            priority,
            load_balancing_weight: weight,
            lb_endpoints: hosts,
        });
    }
    // Envoy requires priorities 0..=N with none missing.
    if let Some(missing) = (0u32..)
        .zip(priorities.iter())
        .find(|(want, got)| want != *got)
    {
        cx.err(
            at(path, "endpoints"),
            format!(
                "priorities must be contiguous from 0: priority {} is missing",
                missing.0
            ),
        );
    }
    if cx.errors.len() > start {
        return None;
    }
    Some(model::LoadAssignment {
        endpoints: out,
        policy,
    })
}

fn lb_endpoint(
    cx: &mut Ctx,
    path: &str,
    lbe: ep::LbEndpoint,
    discovery: Option<model::DiscoveryType>,
) -> Option<model::LbEndpoint> {
    let ep::LbEndpoint {
        health_status,
        metadata: _,
        load_balancing_weight,
        host_identifier,
    } = lbe;
    let start = cx.errors.len();
    use core::HealthStatus as H;
    let health_status = match H::try_from(health_status) {
        Ok(H::Unknown) => model::HealthStatus::Unknown,
        Ok(H::Healthy) => model::HealthStatus::Healthy,
        Ok(H::Unhealthy) => model::HealthStatus::Unhealthy,
        Ok(H::Draining) => model::HealthStatus::Draining,
        Ok(H::Timeout) => model::HealthStatus::Timeout,
        Ok(H::Degraded) => model::HealthStatus::Degraded,
        Err(_) => {
            cx.err(
                at(path, "health_status"),
                format!("unknown value {health_status}"),
            );
            model::HealthStatus::Unknown
        }
    };
    let weight = u32_value(load_balancing_weight).unwrap_or(1);
    if weight == 0 {
        cx.err(at(path, "load_balancing_weight"), "must be at least 1");
    }
    let endpoint = match host_identifier {
        Some(ep::lb_endpoint::HostIdentifier::Endpoint(e)) => e,
        Some(ep::lb_endpoint::HostIdentifier::EndpointName(_)) => {
            cx.unsupported(at(path, "endpoint_name"));
            return None;
        }
        None => {
            cx.err(at(path, "endpoint"), "required");
            return None;
        }
    };
    let epath = at(path, "endpoint");
    let ep::Endpoint {
        address,
        health_check_config,
        hostname,
        additional_addresses,
        observability_name,
    } = endpoint;
    let apath = at(&epath, "address");
    let address = match discovery {
        Some(model::DiscoveryType::StrictDns) => {
            socket_address(cx, &apath, address, HostKind::Hostname)
                .map(|(host, port)| model::EndpointAddress::Dns { host, port })
        }
        _ => ip_socket_address(cx, &apath, address).map(model::EndpointAddress::Ip),
    };
    reject_set!(cx, &epath; health_check_config, additional_addresses, observability_name);
    if cx.errors.len() > start {
        return None;
    }
    Some(model::LbEndpoint {
        address: address?,
        load_balancing_weight: weight,
        health_status,
        hostname: (!hostname.is_empty()).then_some(hostname),
    })
}

/// The DEFAULT and HIGH routing-priority thresholds.
fn breakers(
    cx: &mut Ctx,
    path: &str,
    cb: cl::CircuitBreakers,
) -> (model::Thresholds, model::Thresholds) {
    let cl::CircuitBreakers {
        thresholds,
        per_host_thresholds,
    } = cb;
    reject_set!(cx, path; per_host_thresholds);
    let mut out = model::Thresholds::default();
    let mut high = model::Thresholds::default();
    for (i, t) in thresholds.into_iter().enumerate() {
        let tpath = ix(path, "thresholds", i);
        let cl::circuit_breakers::Thresholds {
            priority,
            max_connections,
            max_pending_requests,
            max_requests,
            max_retries,
            retry_budget,
            track_remaining,
            max_connection_pools,
        } = t;
        let target = match core::RoutingPriority::try_from(priority) {
            Ok(core::RoutingPriority::Default) => &mut out,
            Ok(core::RoutingPriority::High) => &mut high,
            Err(_) => {
                cx.err(at(&tpath, "priority"), format!("unknown value {priority}"));
                continue;
            }
        };
        reject_set!(cx, &tpath; track_remaining, max_connection_pools);
        let retry_budget = retry_budget.and_then(|b| {
            let bpath = at(&tpath, "retry_budget");
            let cl::circuit_breakers::thresholds::RetryBudget {
                budget_percent,
                budget_interval,
                min_retry_concurrency,
            } = b;
            reject_set!(cx, &bpath; budget_interval);
            let pct = budget_percent.map_or(20.0, |p| p.value);
            if !(0.0..=100.0).contains(&pct) {
                cx.err(at(&bpath, "budget_percent"), "must be within 0..=100");
                return None;
            }
            Some(model::RetryBudget {
                budget_percent: pct,
                min_retry_concurrency: u32_value(min_retry_concurrency).unwrap_or(3),
            })
        });
        let d = model::Thresholds::default();
        *target = model::Thresholds {
            max_connections: u32_value(max_connections).unwrap_or(d.max_connections),
            max_pending_requests: u32_value(max_pending_requests).unwrap_or(d.max_pending_requests),
            max_requests: u32_value(max_requests).unwrap_or(d.max_requests),
            max_retries: u32_value(max_retries).unwrap_or(d.max_retries),
            retry_budget,
        };
    }
    (out, high)
}

/// The upstream HTTP protocol and connection idle timeout, from the typed
/// `HttpProtocolOptions` or the legacy cluster-level `http2_protocol_options`.
fn protocol(
    cx: &mut Ctx,
    path: &str,
    legacy_h2: Option<core::Http2ProtocolOptions>,
    typed: std::collections::HashMap<String, envoy_types::pb::google::protobuf::Any>,
) -> (model::UpstreamProtocol, Option<Duration>) {
    let default_idle = Some(Duration::from_secs(3600));
    let mut protocol = model::UpstreamProtocol::Http1;
    let mut idle = default_idle;
    let has_legacy = legacy_h2.is_some();
    if let Some(h2) = legacy_h2 {
        protocol = http2(cx, &at(path, "http2_protocol_options"), h2);
    }
    let mut keys: Vec<_> = typed.into_iter().collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, any) in keys {
        let kpath = format!("{}[{key}]", at(path, "typed_extension_protocol_options"));
        if key != HTTP_OPTIONS_KEY {
            cx.unsupported(kpath);
            continue;
        }
        if has_legacy {
            cx.err(
                &kpath,
                "cannot be combined with the legacy http2_protocol_options",
            );
            continue;
        }
        let Some(opts) = unpack::<up::HttpProtocolOptions>(cx, &kpath, &any, HTTP_OPTIONS_KEY)
        else {
            continue;
        };
        let up::HttpProtocolOptions {
            common_http_protocol_options,
            upstream_http_protocol_options,
            http_filters,
            header_validation_config,
            outlier_detection,
            request_mirror_policies,
            hash_policy,
            retry_policy,
            upstream_protocol_options,
        } = opts;
        if let Some(common) = common_http_protocol_options {
            let cpath = at(&kpath, "common_http_protocol_options");
            let core::HttpProtocolOptions {
                idle_timeout,
                max_connection_duration,
                max_connection_duration_jitter,
                max_headers_count,
                max_response_headers_kb,
                max_stream_duration,
                headers_with_underscores_action,
                max_requests_per_connection,
            } = common;
            idle = timeout_or(cx, &at(&cpath, "idle_timeout"), idle_timeout, default_idle);
            reject_set!(cx, &cpath;
                max_connection_duration, max_connection_duration_jitter, max_headers_count,
                max_response_headers_kb, max_stream_duration, headers_with_underscores_action,
                max_requests_per_connection);
        }
        reject_set!(cx, &kpath;
            upstream_http_protocol_options, http_filters, header_validation_config,
            outlier_detection, request_mirror_policies, hash_policy, retry_policy);
        use up::http_protocol_options::explicit_http_config::ProtocolConfig as PC;
        use up::http_protocol_options::UpstreamProtocolOptions as U;
        match upstream_protocol_options {
            Some(U::ExplicitHttpConfig(e)) => {
                let epath = at(&kpath, "explicit_http_config");
                match e.protocol_config {
                    Some(PC::HttpProtocolOptions(h1)) => {
                        http1(cx, &at(&epath, "http_protocol_options"), h1);
                        protocol = model::UpstreamProtocol::Http1;
                    }
                    Some(PC::Http2ProtocolOptions(h2)) => {
                        protocol = http2(cx, &at(&epath, "http2_protocol_options"), h2);
                    }
                    Some(PC::Http3ProtocolOptions(_)) => {
                        cx.unsupported(at(&epath, "http3_protocol_options"))
                    }
                    None => cx.err(&epath, "a protocol config is required"),
                }
            }
            Some(U::UseDownstreamProtocolConfig(_)) => {
                cx.unsupported(at(&kpath, "use_downstream_protocol_config"))
            }
            Some(U::AutoConfig(_)) => cx.unsupported(at(&kpath, "auto_config")),
            None => cx.err(&kpath, "upstream_protocol_options is required"),
        }
    }
    (protocol, idle)
}

fn http1(cx: &mut Ctx, path: &str, h1: core::Http1ProtocolOptions) {
    let core::Http1ProtocolOptions {
        allow_absolute_url,
        accept_http_10,
        default_host_for_http_10,
        header_key_format,
        enable_trailers,
        allow_chunked_length,
        override_stream_error_on_invalid_http_message,
        send_fully_qualified_url,
        use_balsa_parser,
        allow_custom_methods,
        ignore_http_11_upgrade,
    } = h1;
    reject_set!(cx, path;
        allow_absolute_url, accept_http_10, default_host_for_http_10, header_key_format,
        enable_trailers, allow_chunked_length, override_stream_error_on_invalid_http_message,
        send_fully_qualified_url, use_balsa_parser, allow_custom_methods, ignore_http_11_upgrade);
}

fn http2(cx: &mut Ctx, path: &str, h2: core::Http2ProtocolOptions) -> model::UpstreamProtocol {
    let core::Http2ProtocolOptions {
        hpack_table_size,
        max_concurrent_streams,
        initial_stream_window_size,
        initial_connection_window_size,
        allow_connect,
        allow_metadata,
        max_outbound_frames,
        max_outbound_control_frames,
        max_consecutive_inbound_frames_with_empty_payload,
        max_inbound_priority_frames_per_stream,
        max_inbound_window_update_frames_per_data_frame_sent,
        stream_error_on_invalid_http_messaging,
        override_stream_error_on_invalid_http_message,
        custom_settings_parameters,
        connection_keepalive,
        use_oghttp2_codec,
        max_metadata_size,
        enable_huffman_encoding,
        max_header_field_size_kb,
        disallow_obs_text,
        stream_reset_burst,
        stream_reset_rate,
    } = h2;
    let streams = u32_value(max_concurrent_streams).unwrap_or(2_147_483_647);
    if !(1..=2_147_483_647).contains(&streams) {
        cx.err(
            at(path, "max_concurrent_streams"),
            "must be in 1..=2147483647",
        );
    }
    reject_set!(cx, path;
        hpack_table_size, initial_stream_window_size, initial_connection_window_size,
        allow_connect, allow_metadata, max_outbound_frames, max_outbound_control_frames,
        max_consecutive_inbound_frames_with_empty_payload, max_inbound_priority_frames_per_stream,
        max_inbound_window_update_frames_per_data_frame_sent,
        stream_error_on_invalid_http_messaging, override_stream_error_on_invalid_http_message,
        custom_settings_parameters, connection_keepalive, use_oghttp2_codec, max_metadata_size,
        enable_huffman_encoding, max_header_field_size_kb, disallow_obs_text, stream_reset_burst,
        stream_reset_rate);
    model::UpstreamProtocol::Http2 {
        max_concurrent_streams: streams,
    }
}
