//! Differential filter checks: the same config and requests through Strait and, when Envoy is
//! installed (`ENVOY_BIN`, else `envoy` on `PATH`), through Envoy. Compared: the order in which
//! header_mutation applies its per-route levels (request and response headers), and where
//! ext_authz counts its outcomes (`http.<prefix>.ext_authz.*` and
//! `cluster.<route target>.ext_authz.*`, and the `upstream_rq_4xx` it charges the cluster on a
//! denial), how CORS policies of several levels combine, and
//! RBAC permissions over route metadata (`sourced_metadata`), and which per-route configs
//! enable a filter the connection manager disables.
//! Each result must also equal the literal expectation
//! (recorded from Envoy 1.40), so the test means something without Envoy too.
//!
//! One test in this binary: it switches the launcher to Envoy through `STRAIT_TEST_BIN`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::filters::{chain, header_mutation_levels};
use common::{bind, local_addr, Client, Config, Upstream};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::auth::v3::{
    authorization_server::{Authorization, AuthorizationServer},
    check_response::HttpResponse,
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use http::StatusCode;
use serde_json::{json, Value};

// === header_mutation levels ===

/// `x-order` as the upstream saw it, `x-last` there, and `x-order` on the response.
type HmResult = (Vec<String>, Option<String>, Vec<String>);

async fn header_mutation_case(up: &Upstream, yaml: &str) -> HmResult {
    let p = common::Strait::start(yaml).await;
    let r = Client::http1()
        .get_with(&p.url("/m"), &[("x-order", "client")])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let text = |v: &http::HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
    let seen = up.last_seen();
    (
        seen.headers.get_all("x-order").iter().map(text).collect(),
        seen.headers.get("x-last").map(text),
        r.headers.get_all("x-order").iter().map(text).collect(),
    )
}

// === CORS policies over levels ===

fn cors_levels(up: SocketAddr) -> String {
    let policy = |p: Value| {
        let mut v = json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"});
        if let (Some(o), Value::Object(m)) = (v.as_object_mut(), p) {
            o.extend(m);
        }
        json!({"envoy.filters.http.cors": v})
    };
    Config::new()
        .cluster("backend", &[up])
        .vhosts(json!([{
            "name": "default",
            "domains": ["*"],
            "typed_per_filter_config": policy(json!({
                "allow_origin_string_match": [{"exact": "https://a.test"}],
                "allow_methods": "*",
                "max_age": "60",
                "allow_credentials": true,
                "forward_not_matching_preflights": false
            })),
            "routes": [{
                "match": {"prefix": "/"},
                "route": {"cluster": "backend"},
                "typed_per_filter_config": policy(json!({
                    "allow_headers": "x-route",
                    "expose_headers": "x-exposed",
                    "allow_credentials": false
                }))
            }]
        }]))
        .hcm(
            "http_filters",
            chain(vec![
                json!({"name": "envoy.filters.http.cors", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
                }}),
            ]),
        )
        .access_logs(vec![])
        .yaml()
}

/// Status and `access-control-*` headers of: an allowed preflight, an unmatched preflight, an
/// allowed actual request.
type CorsResult = Vec<(u16, Vec<(String, String)>)>;

async fn cors_case(yaml: &str) -> CorsResult {
    let p = common::Strait::start(yaml).await;
    let c = Client::http1();
    let mut out = Vec::new();
    for (method, origin) in [
        (http::Method::OPTIONS, "https://a.test"),
        (http::Method::OPTIONS, "https://evil.test"),
        (http::Method::GET, "https://a.test"),
    ] {
        let r = c
            .send(common::req(
                method,
                &p.url("/c"),
                &[
                    ("origin", origin),
                    ("access-control-request-method", "PATCH"),
                    ("access-control-request-headers", "x-asked"),
                ],
                common::empty(),
            ))
            .await;
        let mut h: Vec<(String, String)> = r
            .headers
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("access-control-"))
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        h.sort();
        out.push((r.status.as_u16(), h));
    }
    out
}

// === RBAC over route metadata ===

/// ALLOW when the route's metadata `acme.authz.public` is true (`sourced_metadata`, ROUTE);
/// routes: `/open` (true), `/closed` (false), `/bare` (no metadata).
fn rbac_route_metadata(up: SocketAddr) -> String {
    let md = |public: bool| json!({"filter_metadata": {"acme.authz": {"public": public}}});
    Config::new()
        .cluster("backend", &[up])
        .routes(json!([
            {"match": {"prefix": "/open"}, "route": {"cluster": "backend"}, "metadata": md(true)},
            {"match": {"prefix": "/closed"}, "route": {"cluster": "backend"}, "metadata": md(false)},
            {"match": {"prefix": "/"}, "route": {"cluster": "backend"}}
        ]))
        .hcm(
            "http_filters",
            chain(vec![json!({"name": "envoy.filters.http.rbac", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                "rules": {"action": "ALLOW", "policies": {"public-routes": {
                    "permissions": [{"sourced_metadata": {
                        "metadata_source": "ROUTE",
                        "metadata_matcher": {"filter": "acme.authz", "path": [{"key": "public"}],
                                             "value": {"bool_match": true}}
                    }}],
                    "principals": [{"any": true}]
                }}}
            }})]),
        )
        .access_logs(vec![])
        .yaml()
}

async fn rbac_case(yaml: &str) -> Vec<u16> {
    let p = common::Strait::start(yaml).await;
    let c = Client::http1();
    let mut out = Vec::new();
    for path in ["/open", "/closed", "/bare"] {
        out.push(c.get(&p.url(path)).await.status.as_u16());
    }
    out
}

// === enabling and disabling per route ===

/// header_mutation `hm` is `disabled: true` in the connection manager and disabled again at the
/// route-configuration level (`FilterConfig`); routes: `/plain` names it with a plain per-route
/// config, `/wrapped` with a `FilterConfig` wrapping one, `/none` says nothing.
fn enable_per_route(up: SocketAddr) -> String {
    let plain = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute"
    });
    let wrapped = json!({
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
        "config": plain.clone()
    });
    let hm = json!({"name": "hm", "disabled": true, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {"response_mutations": [{"append": {
            "header": {"key": "x-hm", "value": "on"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}]}
    }});
    Config::new()
        .cluster("backend", &[up])
        .route_config(json!({
            "name": "local",
            "typed_per_filter_config": {"hm": {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true}},
            "virtual_hosts": [{
                "name": "default", "domains": ["*"],
                "routes": [
                    {"match": {"prefix": "/plain"}, "route": {"cluster": "backend"},
                     "typed_per_filter_config": {"hm": plain}},
                    {"match": {"prefix": "/wrapped"}, "route": {"cluster": "backend"},
                     "typed_per_filter_config": {"hm": wrapped}},
                    {"match": {"prefix": "/"}, "route": {"cluster": "backend"}}
                ]
            }]
        }))
        .hcm("http_filters", chain(vec![hm]))
        .access_logs(vec![])
        .yaml()
}

/// Whether `x-hm` is on the response of `/plain`, `/wrapped`, `/none`.
async fn enable_case(yaml: &str) -> Vec<bool> {
    let p = common::Strait::start(yaml).await;
    let c = Client::http1();
    let mut out = Vec::new();
    for path in ["/plain", "/wrapped", "/none"] {
        out.push(c.get(&p.url(path)).await.header("x-hm").is_some());
    }
    out
}

// === ext_authz stats ===

/// Allows requests carrying `x-authz: allow`, denies the others with 403.
struct Authz;

#[tonic::async_trait]
impl Authorization for Authz {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let allow = request
            .into_inner()
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .is_some_and(|h| h.headers.get("x-authz").is_some_and(|v| v == "allow"));
        let resp = if allow {
            CheckResponse {
                status: Some(RpcStatus::default()),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
                ..Default::default()
            }
        } else {
            CheckResponse {
                status: Some(RpcStatus {
                    code: 7,
                    ..Default::default()
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus { code: 403 }),
                    ..Default::default()
                })),
                ..Default::default()
            }
        };
        Ok(tonic::Response::new(resp))
    }
}

async fn start_authz() -> SocketAddr {
    let listener = bind().await;
    let addr = local_addr(&listener);
    let server = tonic::transport::Server::builder()
        .add_service(AuthorizationServer::from_arc(Arc::new(Authz)))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    addr
}

/// ext_authz with `stat_prefix: waf` in front of a route to `backend`; `authz` is either the
/// answering server or a closed port.
fn ext_authz_config(up: SocketAddr, authz: SocketAddr, failure_mode_allow: bool) -> String {
    Config::new()
        .cluster("backend", &[up])
        .cluster_h2("authz", &[authz])
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]))
        .hcm(
            "http_filters",
            chain(vec![json!({"name": "envoy.filters.http.ext_authz", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                "transport_api_version": "V3",
                "stat_prefix": "waf",
                "failure_mode_allow": failure_mode_allow,
                "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "2s"}
            }})]),
        )
        .access_logs(vec![])
        .yaml()
}

/// Non-zero `ext_authz` counters after one allowed and one denied request (answering server),
/// or one request (closed port, failure_mode_allow).
async fn ext_authz_case(yaml: &str, requests: &[(&str, StatusCode)]) -> Vec<(String, i64)> {
    let p = common::Strait::start(yaml).await;
    let c = Client::http1();
    for (authz, want) in requests {
        let r = c.get_with(&p.url("/x"), &[("x-authz", authz)]).await;
        assert_eq!(r.status, *want, "x-authz: {authz}");
    }
    let mut got: Vec<(String, i64)> = p
        .stats()
        .await
        .into_iter()
        // A denial is also charged to the route's cluster (`charge_cluster_response_stats`);
        // the proxied 200s' own `upstream_rq_*` and Envoy's `external.*` twins are left out.
        .filter(|(k, v)| {
            let charged = k.starts_with("cluster.backend.internal.upstream_rq_")
                || k.starts_with("cluster.backend.upstream_rq_4");
            (k.contains("ext_authz") || charged) && *v != 0
        })
        .collect();
    got.sort();
    got
}

struct Outcome {
    hm: Vec<HmResult>,
    cors: CorsResult,
    rbac: Vec<u16>,
    enable: Vec<bool>,
    authz: Vec<Vec<(String, i64)>>,
}

async fn run_all(up: &Upstream, authz: SocketAddr, down: SocketAddr) -> Outcome {
    let mut hm = Vec::new();
    for wins in [false, true] {
        hm.push(
            header_mutation_case(
                up,
                &header_mutation_levels(up.addr, wins)
                    .access_logs(vec![])
                    .yaml(),
            )
            .await,
        );
    }
    let cors = cors_case(&cors_levels(up.addr)).await;
    let rbac = rbac_case(&rbac_route_metadata(up.addr)).await;
    let enable = enable_case(&enable_per_route(up.addr)).await;
    let answered = ext_authz_case(
        &ext_authz_config(up.addr, authz, false),
        &[("allow", StatusCode::OK), ("deny", StatusCode::FORBIDDEN)],
    )
    .await;
    let failed = ext_authz_case(
        &ext_authz_config(up.addr, down, true),
        &[("allow", StatusCode::OK)],
    )
    .await;
    Outcome {
        hm,
        cors,
        rbac,
        enable,
        authz: vec![answered, failed],
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn counts(v: &[(&str, i64)]) -> Vec<(String, i64)> {
    v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_match_envoy() {
    let up = Upstream::start("up").await;
    let authz = start_authz().await;
    let down = common::closed_port().await;

    let strait = run_all(&up, authz, down).await;
    let expected_hm: Vec<HmResult> = vec![
        (
            strings(&["client", "filter", "route", "vhost", "rc"]),
            Some("rc".into()),
            strings(&["filter", "route", "vhost", "rc"]),
        ),
        (
            strings(&["client", "filter", "rc", "vhost", "route"]),
            Some("route".into()),
            strings(&["filter", "rc", "vhost", "route"]),
        ),
    ];
    assert_eq!(strait.hm, expected_hm, "Strait: header_mutation levels");
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let expected_cors: CorsResult = vec![
        (
            200,
            pairs(&[
                ("access-control-allow-headers", "x-route"),
                ("access-control-allow-methods", "PATCH"),
                ("access-control-allow-origin", "https://a.test"),
                ("access-control-expose-headers", "x-exposed"),
                ("access-control-max-age", "60"),
            ]),
        ),
        (
            200,
            pairs(&[
                ("access-control-allow-headers", "x-route"),
                ("access-control-allow-methods", "PATCH"),
                ("access-control-max-age", "60"),
            ]),
        ),
        (
            200,
            pairs(&[
                ("access-control-allow-origin", "https://a.test"),
                ("access-control-expose-headers", "x-exposed"),
            ]),
        ),
    ];
    assert_eq!(strait.cors, expected_cors, "Strait: CORS levels");
    assert_eq!(
        strait.rbac,
        [200, 403, 403],
        "Strait: RBAC over route metadata"
    );
    assert_eq!(
        strait.enable,
        [true, true, false],
        "Strait: enabling per route"
    );
    let expected_authz = vec![
        counts(&[
            ("cluster.backend.ext_authz.waf.denied", 1),
            ("cluster.backend.ext_authz.waf.ok", 1),
            ("cluster.backend.internal.upstream_rq_403", 1),
            ("cluster.backend.internal.upstream_rq_4xx", 1),
            ("cluster.backend.internal.upstream_rq_completed", 1),
            ("cluster.backend.upstream_rq_403", 1),
            ("cluster.backend.upstream_rq_4xx", 1),
            ("http.ingress.ext_authz.waf.denied", 1),
            ("http.ingress.ext_authz.waf.ok", 1),
        ]),
        counts(&[
            ("cluster.backend.ext_authz.waf.error", 1),
            ("cluster.backend.ext_authz.waf.failure_mode_allowed", 1),
            ("http.ingress.ext_authz.waf.error", 1),
            ("http.ingress.ext_authz.waf.failure_mode_allowed", 1),
        ]),
    ];
    assert_eq!(strait.authz, expected_authz, "Strait: ext_authz stats");

    let Some(bin) = common::envoy_bin() else {
        eprintln!("envoy not found (ENVOY_BIN): checked Strait against the expectations only");
        return;
    };
    // This test binary holds this one test, so switching the launcher's binary through its
    // environment variable affects nothing else.
    std::env::set_var("STRAIT_TEST_BIN", &bin);
    let envoy = run_all(&up, authz, down).await;
    std::env::remove_var("STRAIT_TEST_BIN");
    eprintln!("envoy: {:?}", envoy.hm);
    eprintln!("envoy: {:?}", envoy.cors);
    eprintln!("envoy: {:?}", envoy.authz);
    assert_eq!(
        envoy.hm, strait.hm,
        "header_mutation levels: Envoy vs Strait"
    );
    assert_eq!(envoy.cors, strait.cors, "CORS levels: Envoy vs Strait");
    assert_eq!(
        envoy.rbac, strait.rbac,
        "RBAC over route metadata: Envoy vs Strait"
    );
    assert_eq!(
        envoy.enable, strait.enable,
        "enabling per route: Envoy vs Strait"
    );
    assert_eq!(
        envoy.authz, strait.authz,
        "ext_authz stats: Envoy vs Strait"
    );
}
