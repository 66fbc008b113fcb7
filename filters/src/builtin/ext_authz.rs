//! `envoy.filters.http.ext_authz` over gRPC: asks an `envoy.service.auth.v3.Authorization`
//! server whether to let each request through. The channel to the authz cluster comes from the
//! data path's [`ClusterConnector`]; the call runs in the hook's `Wait` future, bounded by the
//! configured timeout (default 200ms).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    address::Address as AddressKind, grpc_service::EnvoyGrpc, grpc_service::TargetSpecifier,
    header_value_option::HeaderAppendAction, socket_address::PortSpecifier, Address, ApiVersion,
    GrpcService, HeaderValueOption, Metadata as PbMetadata, SocketAddress,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3::{
    ext_authz::Services, ext_authz_per_route::Override, CheckSettings, ExtAuthz, ExtAuthzPerRoute,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context::{HttpRequest, Peer, Request as AttrRequest},
    authorization_client::AuthorizationClient,
    check_response::HttpResponse,
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use http::{HeaderName, HeaderValue, StatusCode};

use crate::api::{Action, FilterContext, HeaderEdits, Hooks, HttpFilter, LocalReply, PerRoute};
use crate::convert::{duration, header_value_pair, invalid, reject_set, unsupported, Result};
use crate::registry::{
    decode, per_route, BuildContext, ClusterConnector, FilterConfigError, FilterFactory,
};
use crate::route::{Metadata, RouteEntry};
use crate::stats::Counter;

pub const TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz";
pub const PER_ROUTE_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute";

const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);
const FAILURE_MODE_HEADER: &str = "x-envoy-auth-failure-mode-allowed";

#[derive(Debug)]
struct Stats {
    ok: Arc<Counter>,
    denied: Arc<Counter>,
    error: Arc<Counter>,
    failure_mode_allowed: Arc<Counter>,
}

/// Counters Envoy 1.40 creates with the filter (so /stats lists them at 0) for features
/// Strait rejects or never triggers (`filter_enabled`, `shadow_mode`, header limits, ...).
const IDLE_COUNTERS: [&str; 9] = [
    "disabled",
    "filter_state_name_collision",
    "ignored_dynamic_metadata",
    "invalid",
    "omitted_response_headers",
    "request_header_limits_reached",
    "response_header_limits_reached",
    "shadow_denied",
    "shadow_error",
];

#[derive(Debug)]
struct Config {
    channel: tonic::transport::Channel,
    /// `ext_authz.` or `ext_authz.<stat_prefix>.`: the names under the route's target cluster
    /// (`cluster.<name>.ext_authz.ok`) where Envoy also counts.
    cluster_stat_prefix: String,
    /// `route_metadata_context_namespaces` / `route_typed_metadata_context_namespaces`.
    route_metadata_namespaces: Vec<String>,
    route_typed_metadata_namespaces: Vec<String>,
    timeout: Duration,
    failure_mode_allow: bool,
    failure_mode_allow_header_add: bool,
    status_on_error: StatusCode,
    /// `charge_cluster_response_stats` (default true): a denial also counts as a response of
    /// the request's cluster (`upstream_rq_<code>`, `_<class>xx`, `_completed` and their
    /// `internal.` twins, Envoy's `CodeStats::chargeResponseStat` for an internal request).
    charge_cluster_response_stats: bool,
    stats: Stats,
}

/// Per-route `check_settings`.
#[derive(Debug, Default)]
struct RouteSettings {
    context_extensions: HashMap<String, String>,
}

#[derive(Debug)]
pub struct ExtAuthzFilter {
    config: Arc<Config>,
}

fn grpc_target(
    g: &GrpcService,
    path: &str,
    clusters: &dyn ClusterConnector,
) -> Result<(tonic::transport::Channel, Duration)> {
    let GrpcService {
        timeout,
        initial_metadata,
        retry_policy,
        target_specifier,
    } = g;
    reject_set(!initial_metadata.is_empty(), path, "initial_metadata")?;
    reject_set(retry_policy.is_some(), path, "retry_policy")?;
    let timeout = match timeout {
        Some(t) => duration(t, &format!("{path}.timeout"))?,
        None => DEFAULT_TIMEOUT,
    };
    let channel = match target_specifier {
        Some(TargetSpecifier::EnvoyGrpc(EnvoyGrpc {
            cluster_name,
            authority,
            retry_policy,
            max_receive_message_length,
            skip_envoy_headers: _,
        })) => {
            let p = format!("{path}.envoy_grpc");
            reject_set(!authority.is_empty(), &p, "authority")?;
            reject_set(retry_policy.is_some(), &p, "retry_policy")?;
            reject_set(
                max_receive_message_length.is_some(),
                &p,
                "max_receive_message_length",
            )?;
            if cluster_name.is_empty() {
                return Err(invalid(&p, "cluster_name", "required"));
            }
            clusters
                .grpc_channel(cluster_name)
                .map_err(|e| invalid(&p, "cluster_name", e))?
        }
        Some(TargetSpecifier::GoogleGrpc(_)) => return Err(unsupported(path, "google_grpc")),
        None => return Err(invalid(path, "target_specifier", "envoy_grpc is required")),
    };
    Ok((channel, timeout))
}

fn parse(cfg: &ExtAuthz, path: &str, cx: &BuildContext<'_>) -> Result<Config> {
    let ExtAuthz {
        transport_api_version,
        failure_mode_allow,
        failure_mode_allow_header_add,
        with_request_body,
        clear_route_cache,
        status_on_error,
        // Only restricts mutations the authz server returns; Strait validates them anyway.
        validate_mutations: _,
        metadata_context_namespaces,
        typed_metadata_context_namespaces,
        route_metadata_context_namespaces,
        route_typed_metadata_context_namespaces,
        filter_enabled,
        filter_enabled_metadata,
        deny_at_disable,
        include_peer_certificate,
        stat_prefix,
        bootstrap_metadata_labels_key,
        allowed_headers,
        disallowed_headers,
        include_tls_session,
        charge_cluster_response_stats,
        encode_raw_headers,
        decoder_header_mutation_rules,
        enable_dynamic_metadata_ingestion,
        filter_metadata,
        emit_filter_state_stats,
        max_denied_response_body_bytes,
        enforce_response_header_limits,
        shadow_mode,
        emit_client_span,
        services,
    } = cfg;
    match ApiVersion::try_from(*transport_api_version) {
        Ok(ApiVersion::Auto | ApiVersion::V3) => {}
        _ => {
            return Err(invalid(
                path,
                "transport_api_version",
                "only V3 is supported",
            ))
        }
    }
    reject_set(with_request_body.is_some(), path, "with_request_body")?;
    reject_set(*clear_route_cache, path, "clear_route_cache")?;
    reject_set(
        !metadata_context_namespaces.is_empty(),
        path,
        "metadata_context_namespaces",
    )?;
    reject_set(
        !typed_metadata_context_namespaces.is_empty(),
        path,
        "typed_metadata_context_namespaces",
    )?;
    reject_set(filter_enabled.is_some(), path, "filter_enabled")?;
    reject_set(
        filter_enabled_metadata.is_some(),
        path,
        "filter_enabled_metadata",
    )?;
    reject_set(deny_at_disable.is_some(), path, "deny_at_disable")?;
    reject_set(*include_peer_certificate, path, "include_peer_certificate")?;
    reject_set(
        !bootstrap_metadata_labels_key.is_empty(),
        path,
        "bootstrap_metadata_labels_key",
    )?;
    reject_set(allowed_headers.is_some(), path, "allowed_headers")?;
    reject_set(disallowed_headers.is_some(), path, "disallowed_headers")?;
    reject_set(*include_tls_session, path, "include_tls_session")?;
    reject_set(*encode_raw_headers, path, "encode_raw_headers")?;
    reject_set(
        decoder_header_mutation_rules.is_some(),
        path,
        "decoder_header_mutation_rules",
    )?;
    reject_set(
        enable_dynamic_metadata_ingestion.is_some(),
        path,
        "enable_dynamic_metadata_ingestion",
    )?;
    reject_set(filter_metadata.is_some(), path, "filter_metadata")?;
    reject_set(*emit_filter_state_stats, path, "emit_filter_state_stats")?;
    reject_set(
        *max_denied_response_body_bytes != 0,
        path,
        "max_denied_response_body_bytes",
    )?;
    reject_set(
        *enforce_response_header_limits,
        path,
        "enforce_response_header_limits",
    )?;
    reject_set(*shadow_mode, path, "shadow_mode")?;
    reject_set(emit_client_span.is_some(), path, "emit_client_span")?;
    let (channel, timeout) = match services {
        Some(Services::GrpcService(g)) => {
            grpc_target(g, &format!("{path}.grpc_service"), cx.clusters)?
        }
        Some(Services::HttpService(_)) => return Err(unsupported(path, "http_service")),
        None => return Err(invalid(path, "services", "grpc_service is required")),
    };
    // Envoy's default for errors is 403.
    let status_on_error = match status_on_error {
        Some(HttpStatus { code }) => u16::try_from(*code)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| {
                invalid(
                    path,
                    "status_on_error.code",
                    format!("invalid status {code}"),
                )
            })?,
        None => StatusCode::FORBIDDEN,
    };
    let p = if stat_prefix.is_empty() {
        format!("http.{}.ext_authz.", cx.stat_prefix)
    } else {
        format!("http.{}.ext_authz.{stat_prefix}.", cx.stat_prefix)
    };
    for name in IDLE_COUNTERS {
        cx.stats.counter(&format!("{p}{name}"));
    }
    Ok(Config {
        channel,
        cluster_stat_prefix: if stat_prefix.is_empty() {
            "ext_authz.".to_string()
        } else {
            format!("ext_authz.{stat_prefix}.")
        },
        route_metadata_namespaces: route_metadata_context_namespaces.clone(),
        route_typed_metadata_namespaces: route_typed_metadata_context_namespaces.clone(),
        timeout,
        failure_mode_allow: *failure_mode_allow,
        failure_mode_allow_header_add: *failure_mode_allow_header_add,
        status_on_error,
        charge_cluster_response_stats: charge_cluster_response_stats.is_none_or(|b| b.value),
        stats: Stats {
            ok: cx.stats.counter(&format!("{p}ok")),
            denied: cx.stats.counter(&format!("{p}denied")),
            error: cx.stats.counter(&format!("{p}error")),
            failure_mode_allowed: cx.stats.counter(&format!("{p}failure_mode_allowed")),
        },
    })
}

fn peer(addr: SocketAddr) -> Peer {
    Peer {
        address: Some(Address {
            address: Some(AddressKind::SocketAddress(SocketAddress {
                address: addr.ip().to_string(),
                port_specifier: Some(PortSpecifier::PortValue(u32::from(addr.port()))),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

/// The route metadata namespaces the authz server asked for (Envoy's
/// `route_metadata_context`); `None` when none are configured or the route has none.
fn route_metadata_context(config: &Config, route: Option<&RouteEntry>) -> Option<PbMetadata> {
    if config.route_metadata_namespaces.is_empty()
        && config.route_typed_metadata_namespaces.is_empty()
    {
        return None;
    }
    let md = &route?.metadata;
    let mut out = Metadata::default();
    for ns in &config.route_metadata_namespaces {
        if let Some(v) = md.filter_metadata.get(ns) {
            out.filter_metadata.insert(ns.clone(), v.clone());
        }
    }
    for ns in &config.route_typed_metadata_namespaces {
        if let Some(v) = md.typed_filter_metadata.get(ns) {
            out.typed_filter_metadata.insert(ns.clone(), v.clone());
        }
    }
    Some(out.to_proto())
}

fn check_request(
    ctx: &FilterContext,
    req: &http::request::Parts,
    context_extensions: HashMap<String, String>,
    route_metadata_context: Option<PbMetadata>,
) -> CheckRequest {
    let mut headers: HashMap<String, String> = HashMap::with_capacity(req.headers.keys_len() + 4);
    for (name, value) in &req.headers {
        let v = String::from_utf8_lossy(value.as_bytes());
        headers
            .entry(name.as_str().to_string())
            .and_modify(|e| {
                e.push(',');
                e.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }
    let host = req
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let path = req
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let scheme = req.uri.scheme_str().unwrap_or("http").to_string();
    headers.insert(":authority".into(), host.clone());
    headers.insert(":method".into(), req.method.to_string());
    headers.insert(":path".into(), path.clone());
    headers.insert(":scheme".into(), scheme.clone());
    let size = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(-1);
    let protocol = match req.version {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    };
    let query = path
        .split_once('?')
        .map(|(_, q)| q.to_string())
        .unwrap_or_default();
    #[allow(deprecated)]
    let http = HttpRequest {
        id: ctx.request_id.clone().unwrap_or_default(),
        method: req.method.to_string(),
        headers,
        path,
        host,
        scheme,
        query,
        size,
        protocol: protocol.to_string(),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(ctx.remote_address)),
            destination: Some(peer(ctx.local_address)),
            request: Some(AttrRequest {
                time: None,
                http: Some(http),
            }),
            context_extensions,
            route_metadata_context,
            ..Default::default()
        }),
    }
}

/// Sorts one server-supplied header into `edits` by its append semantics. Envoy: an explicit
/// `append` wins (true appends, false replaces); otherwise `append_action` decides. Invalid
/// names or values from the server are dropped.
fn edit_header(edits: &mut HeaderEdits, h: &HeaderValueOption) {
    #[allow(deprecated)]
    let HeaderValueOption {
        header,
        append,
        append_action,
        keep_empty_value: _,
    } = h;
    let Some(Ok((name, value))) = header.as_ref().map(|hv| header_value_pair(hv, "")) else {
        return;
    };
    match (append, HeaderAppendAction::try_from(*append_action)) {
        (Some(a), _) if a.value => edits.append.push((name, value)),
        (Some(_), _) => edits.set.push((name, value)),
        (None, Ok(HeaderAppendAction::AddIfAbsent)) => edits.add_if_absent.push((name, value)),
        (None, Ok(HeaderAppendAction::OverwriteIfExistsOrAdd)) => edits.set.push((name, value)),
        (None, Ok(HeaderAppendAction::OverwriteIfExists)) => {
            edits.overwrite_if_exists.push((name, value))
        }
        (None, _) => edits.append.push((name, value)),
    }
}

fn denied_reply(d: Option<&DeniedHttpResponse>, default_status: StatusCode) -> LocalReply {
    let mut reply = LocalReply::new(default_status, "", "ext_authz_denied").with_flag("UAEX");
    if let Some(DeniedHttpResponse {
        status,
        headers,
        body,
    }) = d
    {
        if let Some(s) = status
            .as_ref()
            .and_then(|s| u16::try_from(s.code).ok())
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            // Envoy: an unset (0) or invalid code keeps the default.
            reply.status = s;
        }
        let mut edits = HeaderEdits::default();
        for h in headers {
            edit_header(&mut edits, h);
        }
        edits.apply(&mut reply.headers);
        reply.body = body.clone().into();
    }
    reply
}

fn ok_edits(ok: Option<&OkHttpResponse>) -> HeaderEdits {
    let mut edits = HeaderEdits::default();
    let Some(ok) = ok else { return edits };
    for h in &ok.headers {
        edit_header(&mut edits, h);
    }
    for name in &ok.headers_to_remove {
        // Envoy refuses to remove pseudo-headers and Host.
        if let Ok(n) = crate::convert::header_name(name, "") {
            edits.remove.push(n);
        }
    }
    for h in &ok.response_headers_to_add {
        if let Some(Ok(pair)) = h.header.as_ref().map(|hv| header_value_pair(hv, "")) {
            edits.response_headers.push(pair);
        }
    }
    edits
}

/// Counts `name` under the request's upstream cluster too (`cluster.<c>.ext_authz.<name>`), as
/// Envoy does. The lookup takes the stats sink's lock once per check, next to a gRPC round trip.
fn count_cluster(config: &Config, route: Option<&RouteEntry>, cluster: Option<&str>, name: &str) {
    if let (Some(scope), Some(cluster)) = (route.and_then(|r| r.upstream_stats.as_ref()), cluster) {
        scope
            .counter(&format!("{cluster}.{}{name}", config.cluster_stat_prefix))
            .inc();
    }
}

/// Counts a denial as `cluster` answering `status`, as Envoy's `chargeResponseStat` does for an
/// internal request.
fn charge_response(route: Option<&RouteEntry>, cluster: Option<&str>, status: StatusCode) {
    let (Some(scope), Some(cluster)) = (route.and_then(|r| r.upstream_stats.as_ref()), cluster)
    else {
        return;
    };
    let code = status.as_u16();
    for prefix in ["", "internal."] {
        for name in [
            format!("upstream_rq_{code}"),
            format!("upstream_rq_{}xx", code / 100),
            "upstream_rq_completed".to_string(),
        ] {
            scope.counter(&format!("{cluster}.{prefix}{name}")).inc();
        }
    }
}

async fn call(
    config: Arc<Config>,
    route: Option<Arc<RouteEntry>>,
    cluster: Option<String>,
    request: CheckRequest,
) -> Action {
    let route = route.as_deref();
    let cluster = cluster.as_deref();
    let mut client = AuthorizationClient::new(config.channel.clone());
    let mut req = tonic::Request::new(request);
    req.set_timeout(config.timeout);
    let result = tokio::time::timeout(config.timeout, client.check(req)).await;
    let response: Option<CheckResponse> = match result {
        Ok(Ok(resp)) => Some(resp.into_inner()),
        Ok(Err(status)) => {
            tracing::debug!(%status, "ext_authz check failed");
            None
        }
        Err(_) => {
            tracing::debug!("ext_authz check timed out");
            None
        }
    };
    let on_error = |config: &Config| {
        config.stats.error.inc();
        count_cluster(config, route, cluster, "error");
        if config.failure_mode_allow {
            config.stats.failure_mode_allowed.inc();
            count_cluster(config, route, cluster, "failure_mode_allowed");
            let mut edits = HeaderEdits::default();
            if config.failure_mode_allow_header_add {
                edits.set.push((
                    HeaderName::from_static(FAILURE_MODE_HEADER),
                    HeaderValue::from_static("true"),
                ));
            }
            return Action::ContinueWith(Box::new(edits));
        }
        Action::reply(
            LocalReply::new(config.status_on_error, "", "ext_authz_error").with_flag("UAEX"),
        )
    };
    let Some(CheckResponse {
        status,
        http_response,
        ..
    }) = response
    else {
        return on_error(&config);
    };
    let code = status.as_ref().map_or(0, |s| s.code);
    match http_response {
        Some(HttpResponse::ErrorResponse(_)) => on_error(&config),
        _ if code == 0 => {
            config.stats.ok.inc();
            count_cluster(&config, route, cluster, "ok");
            let ok = match &http_response {
                Some(HttpResponse::OkResponse(ok)) => Some(ok),
                _ => None,
            };
            Action::ContinueWith(Box::new(ok_edits(ok)))
        }
        _ => {
            config.stats.denied.inc();
            count_cluster(&config, route, cluster, "denied");
            let denied = match &http_response {
                Some(HttpResponse::DeniedResponse(d)) => Some(d),
                _ => None,
            };
            let reply = denied_reply(denied, StatusCode::FORBIDDEN);
            if config.charge_cluster_response_stats {
                charge_response(route, cluster, reply.status);
            }
            Action::reply(reply)
        }
    }
}

impl HttpFilter for ExtAuthzFilter {
    fn hooks(&self) -> Hooks {
        Hooks::REQUEST_HEADERS
    }

    fn on_request_headers(
        &self,
        ctx: &mut FilterContext,
        req: &mut http::request::Parts,
    ) -> Action {
        // Envoy merges `context_extensions` over every level, the most specific winning per key.
        let mut extensions = HashMap::new();
        for level in ctx.route_configs::<RouteSettings>() {
            extensions.extend(
                level
                    .context_extensions
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
        let route = ctx.route().cloned();
        let md = route_metadata_context(&self.config, route.as_deref());
        let request = check_request(ctx, req, extensions, md);
        let cluster = ctx.cluster_name.clone();
        Action::Wait(Box::pin(call(self.config.clone(), route, cluster, request)))
    }
}

pub struct Factory;

impl FilterFactory for Factory {
    fn type_url(&self) -> &'static str {
        TYPE_URL
    }

    fn per_route_type_urls(&self) -> &'static [&'static str] {
        &[PER_ROUTE_TYPE_URL]
    }

    fn build(
        &self,
        value: &[u8],
        path: &str,
        cx: &BuildContext<'_>,
    ) -> std::result::Result<Arc<dyn HttpFilter>, FilterConfigError> {
        let cfg: ExtAuthz = decode(value, path)?;
        Ok(Arc::new(ExtAuthzFilter {
            config: Arc::new(parse(&cfg, path, cx)?),
        }))
    }

    fn build_per_route(
        &self,
        _type_url: &str,
        value: &[u8],
        path: &str,
        _cx: &BuildContext<'_>,
    ) -> std::result::Result<PerRoute, FilterConfigError> {
        let ExtAuthzPerRoute { r#override } = decode(value, path)?;
        match r#override {
            Some(Override::Disabled(true)) => Ok(PerRoute {
                config: None,
                disabled: Some(true),
            }),
            Some(Override::Disabled(false)) => {
                Err(invalid(path, "disabled", "must be true when set"))
            }
            Some(Override::CheckSettings(cs)) => {
                let p = format!("{path}.check_settings");
                let CheckSettings {
                    context_extensions,
                    disable_request_body_buffering,
                    with_request_body,
                    emit_client_span,
                    service_override,
                } = cs;
                // Strait never buffers the body for ext_authz, so disabling it is a no-op.
                let _ = disable_request_body_buffering;
                reject_set(with_request_body.is_some(), &p, "with_request_body")?;
                reject_set(emit_client_span.is_some(), &p, "emit_client_span")?;
                reject_set(service_override.is_some(), &p, "service_override")?;
                Ok(per_route(RouteSettings { context_extensions }))
            }
            None => Err(invalid(
                path,
                "override",
                "one of disabled, check_settings is required",
            )),
        }
    }
}
