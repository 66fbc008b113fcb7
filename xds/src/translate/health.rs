//! Translation of a cluster's `health_checks` and `outlier_detection`, with Envoy's defaults and
//! its validation (required interval / timeout / thresholds, status ranges within 100..600).

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3 as cl;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::r#type::v3 as ty;
use http::{HeaderName, HeaderValue};

use super::{at, bool_value, duration, ix, reject_set, u32_value, Ctx};
use crate::model;

pub(crate) fn health_checks(
    cx: &mut Ctx,
    path: &str,
    checks: Vec<core::HealthCheck>,
) -> Vec<model::HealthCheck> {
    let mut out = Vec::new();
    for (i, hc) in checks.into_iter().enumerate() {
        if let Some(h) = health_check(cx, &ix(path, "health_checks", i), hc) {
            out.push(h);
        }
    }
    out
}

fn required_duration(
    cx: &mut Ctx,
    path: &str,
    d: Option<envoy_types::pb::google::protobuf::Duration>,
) -> Duration {
    match duration(cx, path, d) {
        Some(d) if !d.is_zero() => d,
        Some(_) => {
            cx.err(path, "must be greater than 0");
            Duration::ZERO
        }
        None => {
            cx.err(path, "required");
            Duration::ZERO
        }
    }
}

fn positive_duration(
    cx: &mut Ctx,
    path: &str,
    d: Option<envoy_types::pb::google::protobuf::Duration>,
) -> Option<Duration> {
    let d = duration(cx, path, d)?;
    if d.is_zero() {
        cx.err(path, "must be greater than 0");
    }
    Some(d)
}

fn health_check(cx: &mut Ctx, path: &str, hc: core::HealthCheck) -> Option<model::HealthCheck> {
    let core::HealthCheck {
        timeout,
        interval,
        initial_jitter,
        interval_jitter,
        interval_jitter_percent,
        unhealthy_threshold,
        healthy_threshold,
        alt_port,
        reuse_connection,
        no_traffic_interval,
        no_traffic_healthy_interval,
        unhealthy_interval,
        unhealthy_edge_interval,
        healthy_edge_interval,
        event_log_path,
        event_logger,
        event_service,
        always_log_health_check_failures: _,
        always_log_health_check_success: _,
        tls_options,
        transport_socket_match_criteria,
        health_checker,
    } = hc;
    let start = cx.errors.len();
    let timeout = required_duration(cx, &at(path, "timeout"), timeout);
    let interval = required_duration(cx, &at(path, "interval"), interval);
    let initial_jitter =
        duration(cx, &at(path, "initial_jitter"), initial_jitter).unwrap_or_default();
    let interval_jitter =
        duration(cx, &at(path, "interval_jitter"), interval_jitter).unwrap_or_default();
    let unhealthy_threshold = u32_value(unhealthy_threshold);
    let healthy_threshold = u32_value(healthy_threshold);
    if unhealthy_threshold.is_none() {
        cx.err(at(path, "unhealthy_threshold"), "required");
    }
    if healthy_threshold.is_none() {
        cx.err(at(path, "healthy_threshold"), "required");
    }
    reject_set!(cx, path; alt_port);
    let no_traffic_interval =
        positive_duration(cx, &at(path, "no_traffic_interval"), no_traffic_interval)
            .unwrap_or(Duration::from_secs(60));
    let no_traffic_healthy_interval = positive_duration(
        cx,
        &at(path, "no_traffic_healthy_interval"),
        no_traffic_healthy_interval,
    )
    .unwrap_or(no_traffic_interval);
    let unhealthy_interval =
        positive_duration(cx, &at(path, "unhealthy_interval"), unhealthy_interval)
            .unwrap_or(interval);
    let unhealthy_edge_interval = positive_duration(
        cx,
        &at(path, "unhealthy_edge_interval"),
        unhealthy_edge_interval,
    )
    .unwrap_or(unhealthy_interval);
    let healthy_edge_interval = positive_duration(
        cx,
        &at(path, "healthy_edge_interval"),
        healthy_edge_interval,
    )
    .unwrap_or(interval);
    reject_set!(cx, path;
        event_log_path, event_logger, event_service, tls_options, transport_socket_match_criteria);
    use core::health_check::HealthChecker as K;
    let kind = match health_checker {
        Some(K::HttpHealthCheck(h)) => http(cx, &at(path, "http_health_check"), h),
        Some(K::TcpHealthCheck(t)) => tcp(cx, &at(path, "tcp_health_check"), t),
        Some(K::GrpcHealthCheck(g)) => grpc(cx, &at(path, "grpc_health_check"), g),
        Some(K::CustomHealthCheck(_)) => {
            cx.unsupported(at(path, "custom_health_check"));
            None
        }
        None => {
            cx.err(path, "a health checker (http, tcp or grpc) is required");
            None
        }
    };
    if cx.errors.len() > start {
        return None;
    }
    Some(model::HealthCheck {
        timeout,
        interval,
        initial_jitter,
        interval_jitter,
        interval_jitter_percent,
        unhealthy_threshold: unhealthy_threshold?,
        healthy_threshold: healthy_threshold?,
        no_traffic_interval,
        no_traffic_healthy_interval,
        unhealthy_interval,
        unhealthy_edge_interval,
        healthy_edge_interval,
        reuse_connection: bool_value(reuse_connection).unwrap_or(true),
        kind: kind?,
    })
}

fn ranges(cx: &mut Ctx, path: &str, rs: Vec<ty::Int64Range>) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    for (i, r) in rs.into_iter().enumerate() {
        let ty::Int64Range { start, end } = r;
        // Envoy: start >= 100, end <= 600, start < end.
        if start < 100 || end > 600 || start >= end {
            cx.err(
                format!("{path}[{i}]"),
                format!("invalid status range [{start}, {end}): must lie within [100, 600) and not be empty"),
            );
            continue;
        }
        out.push((start as u16, end as u16));
    }
    out
}

fn payload(cx: &mut Ctx, path: &str, p: core::health_check::Payload) -> Option<bytes::Bytes> {
    use core::health_check::payload::Payload as P;
    match p.payload {
        Some(P::Binary(b)) => Some(b.into()),
        Some(P::Text(hex)) => match decode_hex(&hex) {
            Some(b) => Some(b.into()),
            None => {
                cx.err(at(path, "text"), "invalid hex payload");
                None
            }
        },
        None => {
            cx.err(path, "a payload (text or binary) is required");
            None
        }
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn http(
    cx: &mut Ctx,
    path: &str,
    h: core::health_check::HttpHealthCheck,
) -> Option<model::HealthCheckKind> {
    let core::health_check::HttpHealthCheck {
        host,
        path: hc_path,
        send,
        receive,
        response_buffer_size,
        request_headers_to_add,
        request_headers_to_remove,
        expected_statuses,
        retriable_statuses,
        codec_client_type,
        service_name_matcher,
        method,
    } = h;
    let start = cx.errors.len();
    if hc_path.is_empty() {
        cx.err(at(path, "path"), "required");
    }
    reject_set!(cx, path; send, receive, response_buffer_size, method);
    let service_name_matcher = service_name_matcher
        .and_then(|m| super::route::string_matcher(cx, &at(path, "service_name_matcher"), m));
    let mut add = Vec::new();
    for (i, o) in request_headers_to_add.into_iter().enumerate() {
        let opath = ix(path, "request_headers_to_add", i);
        let Some(hv) = o.header else {
            cx.err(at(&opath, "header"), "required");
            continue;
        };
        let value = if hv.raw_value.is_empty() {
            hv.value.into_bytes()
        } else {
            hv.raw_value
        };
        match (
            HeaderName::from_bytes(hv.key.to_ascii_lowercase().as_bytes()),
            HeaderValue::from_bytes(&value),
        ) {
            (Ok(n), Ok(v)) => add.push((n, v)),
            _ => cx.err(at(&opath, "header"), "invalid header name or value"),
        }
    }
    let mut remove = Vec::new();
    for (i, n) in request_headers_to_remove.into_iter().enumerate() {
        match HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()) {
            Ok(n) => remove.push(n),
            Err(_) => cx.err(
                ix(path, "request_headers_to_remove", i),
                "invalid header name",
            ),
        }
    }
    let mut expected = ranges(cx, &at(path, "expected_statuses"), expected_statuses);
    if expected.is_empty() {
        expected.push((200, 201));
    }
    let retriable = ranges(cx, &at(path, "retriable_statuses"), retriable_statuses);
    let http2 = match ty::CodecClientType::try_from(codec_client_type) {
        Ok(ty::CodecClientType::Http1) => false,
        Ok(ty::CodecClientType::Http2) => true,
        _ => {
            cx.unsupported(at(path, "codec_client_type"));
            false
        }
    };
    if cx.errors.len() > start {
        return None;
    }
    Some(model::HealthCheckKind::Http(model::HttpHealthCheck {
        host: (!host.is_empty()).then_some(host),
        path: hc_path,
        expected_statuses: expected,
        retriable_statuses: retriable,
        http2,
        request_headers_to_add: add,
        request_headers_to_remove: remove,
        service_name_matcher,
    }))
}

fn tcp(
    cx: &mut Ctx,
    path: &str,
    t: core::health_check::TcpHealthCheck,
) -> Option<model::HealthCheckKind> {
    let core::health_check::TcpHealthCheck {
        send,
        receive,
        proxy_protocol_config,
    } = t;
    let start = cx.errors.len();
    reject_set!(cx, path; proxy_protocol_config);
    let send = send.and_then(|p| payload(cx, &at(path, "send"), p));
    let receive = receive
        .into_iter()
        .enumerate()
        .filter_map(|(i, p)| payload(cx, &ix(path, "receive", i), p))
        .collect();
    if cx.errors.len() > start {
        return None;
    }
    Some(model::HealthCheckKind::Tcp(model::TcpHealthCheck {
        send,
        receive,
    }))
}

fn grpc(
    cx: &mut Ctx,
    path: &str,
    g: core::health_check::GrpcHealthCheck,
) -> Option<model::HealthCheckKind> {
    let core::health_check::GrpcHealthCheck {
        service_name,
        authority,
        initial_metadata,
    } = g;
    let start = cx.errors.len();
    reject_set!(cx, path; initial_metadata);
    if cx.errors.len() > start {
        return None;
    }
    Some(model::HealthCheckKind::Grpc(model::GrpcHealthCheck {
        service_name,
        authority: (!authority.is_empty()).then_some(authority),
    }))
}

/// A percentage field (`enforcing_*`, `max_ejection_percent`, thresholds): 0..=100.
fn percent(
    cx: &mut Ctx,
    path: &str,
    v: Option<envoy_types::pb::google::protobuf::UInt32Value>,
    default: u32,
) -> u32 {
    let v = u32_value(v).unwrap_or(default);
    if v > 100 {
        cx.err(path, "must be at most 100");
    }
    v
}

pub(crate) fn outlier(
    cx: &mut Ctx,
    path: &str,
    o: cl::OutlierDetection,
) -> Option<model::OutlierDetection> {
    let cl::OutlierDetection {
        consecutive_5xx,
        interval,
        base_ejection_time,
        max_ejection_percent,
        enforcing_consecutive_5xx,
        enforcing_success_rate,
        success_rate_minimum_hosts,
        success_rate_request_volume,
        success_rate_stdev_factor,
        consecutive_gateway_failure,
        enforcing_consecutive_gateway_failure,
        split_external_local_origin_errors,
        consecutive_local_origin_failure,
        enforcing_consecutive_local_origin_failure,
        enforcing_local_origin_success_rate,
        failure_percentage_threshold,
        enforcing_failure_percentage,
        enforcing_failure_percentage_local_origin,
        failure_percentage_minimum_hosts,
        failure_percentage_request_volume,
        max_ejection_time,
        max_ejection_time_jitter,
        successful_active_health_check_uneject_host,
        monitors,
        always_eject_one_host,
        detect_degraded_hosts,
    } = o;
    let start = cx.errors.len();
    let d = model::OutlierDetection::default();
    let interval = positive_duration(cx, &at(path, "interval"), interval).unwrap_or(d.interval);
    let base_ejection_time =
        positive_duration(cx, &at(path, "base_ejection_time"), base_ejection_time)
            .unwrap_or(d.base_ejection_time);
    let max_ejection_time =
        positive_duration(cx, &at(path, "max_ejection_time"), max_ejection_time)
            .unwrap_or(d.max_ejection_time);
    // Envoy: "max_ejection_time must be greater than or equal to base_ejection_time".
    if max_ejection_time < base_ejection_time {
        cx.err(
            at(path, "max_ejection_time"),
            "must be greater than or equal to base_ejection_time",
        );
    }
    reject_set!(cx, path; monitors, always_eject_one_host, detect_degraded_hosts);
    let out = model::OutlierDetection {
        consecutive_5xx: u32_value(consecutive_5xx).unwrap_or(d.consecutive_5xx),
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_time_jitter: duration(
            cx,
            &at(path, "max_ejection_time_jitter"),
            max_ejection_time_jitter,
        )
        .unwrap_or_default(),
        max_ejection_percent: percent(
            cx,
            &at(path, "max_ejection_percent"),
            max_ejection_percent,
            d.max_ejection_percent,
        ),
        enforcing_consecutive_5xx: percent(
            cx,
            &at(path, "enforcing_consecutive_5xx"),
            enforcing_consecutive_5xx,
            d.enforcing_consecutive_5xx,
        ),
        enforcing_success_rate: percent(
            cx,
            &at(path, "enforcing_success_rate"),
            enforcing_success_rate,
            d.enforcing_success_rate,
        ),
        success_rate_minimum_hosts: u32_value(success_rate_minimum_hosts)
            .unwrap_or(d.success_rate_minimum_hosts),
        success_rate_request_volume: u32_value(success_rate_request_volume)
            .unwrap_or(d.success_rate_request_volume),
        success_rate_stdev_factor: u32_value(success_rate_stdev_factor)
            .unwrap_or(d.success_rate_stdev_factor),
        consecutive_gateway_failure: u32_value(consecutive_gateway_failure)
            .unwrap_or(d.consecutive_gateway_failure),
        enforcing_consecutive_gateway_failure: percent(
            cx,
            &at(path, "enforcing_consecutive_gateway_failure"),
            enforcing_consecutive_gateway_failure,
            d.enforcing_consecutive_gateway_failure,
        ),
        split_external_local_origin_errors,
        consecutive_local_origin_failure: u32_value(consecutive_local_origin_failure)
            .unwrap_or(d.consecutive_local_origin_failure),
        enforcing_consecutive_local_origin_failure: percent(
            cx,
            &at(path, "enforcing_consecutive_local_origin_failure"),
            enforcing_consecutive_local_origin_failure,
            d.enforcing_consecutive_local_origin_failure,
        ),
        enforcing_local_origin_success_rate: percent(
            cx,
            &at(path, "enforcing_local_origin_success_rate"),
            enforcing_local_origin_success_rate,
            d.enforcing_local_origin_success_rate,
        ),
        failure_percentage_threshold: percent(
            cx,
            &at(path, "failure_percentage_threshold"),
            failure_percentage_threshold,
            d.failure_percentage_threshold,
        ),
        enforcing_failure_percentage: percent(
            cx,
            &at(path, "enforcing_failure_percentage"),
            enforcing_failure_percentage,
            d.enforcing_failure_percentage,
        ),
        enforcing_failure_percentage_local_origin: percent(
            cx,
            &at(path, "enforcing_failure_percentage_local_origin"),
            enforcing_failure_percentage_local_origin,
            d.enforcing_failure_percentage_local_origin,
        ),
        failure_percentage_minimum_hosts: u32_value(failure_percentage_minimum_hosts)
            .unwrap_or(d.failure_percentage_minimum_hosts),
        failure_percentage_request_volume: u32_value(failure_percentage_request_volume)
            .unwrap_or(d.failure_percentage_request_volume),
        successful_active_health_check_uneject_host: bool_value(
            successful_active_health_check_uneject_host,
        )
        .unwrap_or(d.successful_active_health_check_uneject_host),
    };
    if cx.errors.len() > start {
        return None;
    }
    Some(out)
}
