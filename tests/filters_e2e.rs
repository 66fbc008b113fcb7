//! Each built-in HTTP filter end to end through the real binary: fault (abort and delay under
//! header control), local_ratelimit (per route, 429 + RL), rbac (403 + RBAC, shadow stats), cors
//! preflight, header_mutation, buffer (413) and ext_authz against a tonic Authorization server.
//! Every config is one Envoy accepts: with `ENVOY_BIN` set, each is first checked with
//! `$ENVOY_BIN --mode validate` (skipped when unset).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::filters::*;
use common::*;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue as PbHeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::auth::v3::{
    authorization_server::{Authorization, AuthorizationServer},
    check_response::HttpResponse,
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use http::{Method, StatusCode};
use serde_json::{json, Value};

fn route(prefix: &str, cluster: &str) -> Value {
    json!({"match": {"prefix": prefix}, "route": {"cluster": cluster}})
}

/// Checks the config with Envoy when `ENVOY_BIN` is set (CI sets it), then starts Strait on it.
async fn start_checked(cfg: &Config) -> Strait {
    envoy_validates(&cfg.yaml()).await;
    cfg.start().await
}

async fn envoy_validates(yaml: &str) {
    let Ok(envoy) = std::env::var("ENVOY_BIN") else {
        eprintln!("ENVOY_BIN unset: config not checked against Envoy");
        return;
    };
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let path = dir.path().join("envoy.yaml");
    if let Err(e) = std::fs::write(&path, yaml) {
        panic!("write {path:?}: {e}");
    }
    let args = vec![
        "--mode".to_string(),
        "validate".to_string(),
        "-c".to_string(),
        path.display().to_string(),
        "--disable-hot-restart".to_string(),
        "-l".to_string(),
        "error".to_string(),
    ];
    let (status, out, err) = run(Duration::from_secs(60), &envoy, &args).await;
    assert!(
        status.success(),
        "Envoy rejects the config:\n{out}\n{err}\n{yaml}"
    );
}

// === fault ===

#[tokio::test]
async fn fault_abort_and_delay_under_header_control() {
    let up = Upstream::start("up").await;
    let cfg = Config::new()
        .cluster("backend", &[up.addr])
        .routes(json!([route("/", "backend")]))
        .hcm(
            "http_filters",
            chain(vec![filter(
                "envoy.filters.http.fault",
                "envoy.extensions.filters.http.fault.v3.HTTPFault",
                json!({
                    "abort": {"header_abort": {}, "percentage": {"numerator": 100}},
                    "delay": {"header_delay": {}, "percentage": {"numerator": 100}},
                }),
            )]),
        );
    let s = start_checked(&cfg).await;
    let c = Client::http1();

    // No fault headers: nothing injected.
    let r = c.get(&s.url("/plain")).await;
    assert_eq!(r.status, StatusCode::OK);

    let r = c
        .get_with(&s.url("/abort"), &[("x-envoy-fault-abort-request", "429")])
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.text(), "fault filter abort");
    s.access_log("\"GET /abort HTTP/1.1\" 429 FI ", 1).await;
    assert_eq!(
        up.requests(),
        1,
        "an aborted request never reaches the upstream"
    );

    let t = Instant::now();
    let r = c
        .get_with(&s.url("/delay"), &[("x-envoy-fault-delay-request", "300")])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    s.access_log("\"GET /delay HTTP/1.1\" 200 DI ", 1).await;

    assert_eq!(s.stat("http.ingress.fault.aborts_injected").await, Some(1));
    assert_eq!(s.stat("http.ingress.fault.delays_injected").await, Some(1));
    // The delayed request ended: its fault is no longer active.
    assert_eq!(
        s.wait_stat("http.ingress.fault.active_faults", 0).await,
        Some(0)
    );
}

// === local_ratelimit ===

#[tokio::test]
async fn local_ratelimit_per_route_429_with_rl_flag() {
    let up = Upstream::start("up").await;
    let pct = |n: u32| json!({"default_value": {"numerator": n, "denominator": "HUNDRED"}, "runtime_key": "lrl"});
    let per_route = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": "lrl",
        "token_bucket": {"max_tokens": 2, "tokens_per_fill": 2, "fill_interval": "3600s"},
        "filter_enabled": pct(100),
        "filter_enforced": pct(100),
        "response_headers_to_add": [{
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            "header": {"key": "x-local-rate-limit", "value": "true"}
        }]
    });
    let cfg = Config::new()
        .cluster("backend", &[up.addr])
        .routes(json!([
            {"match": {"prefix": "/limited"}, "route": {"cluster": "backend"},
             "typed_per_filter_config": {"envoy.filters.http.local_ratelimit": per_route}},
            route("/", "backend"),
        ]))
        .hcm(
            "http_filters",
            // No bucket at the connection manager: only routes that configure one are limited.
            chain(vec![filter(
                "envoy.filters.http.local_ratelimit",
                "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                json!({"stat_prefix": "lrl"}),
            )]),
        );
    let s = start_checked(&cfg).await;
    let c = Client::h2c();
    for _ in 0..2 {
        assert_eq!(c.get(&s.url("/limited")).await.status, StatusCode::OK);
    }
    let r = c.get(&s.url("/limited")).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("x-local-rate-limit"), Some("true"));
    s.access_log("\"GET /limited HTTP/2\" 429 RL ", 1).await;
    // Other routes are not limited.
    for _ in 0..5 {
        assert_eq!(c.get(&s.url("/free")).await.status, StatusCode::OK);
    }
    assert_eq!(
        s.stat("lrl.http_local_rate_limit.rate_limited").await,
        Some(1)
    );
    assert_eq!(up.requests(), 7);
}

// === rbac ===

#[tokio::test]
async fn rbac_denies_with_403_and_counts_shadow_rules() {
    let up = Upstream::start("up").await;
    let cfg = Config::new()
        .cluster("backend", &[up.addr])
        .routes(json!([route("/", "backend")]))
        .hcm(
            "http_filters",
            chain(vec![filter(
                "envoy.filters.http.rbac",
                "envoy.extensions.filters.http.rbac.v3.RBAC",
                json!({
                    "rules": {"action": "ALLOW", "policies": {"allowed-header": {
                        "permissions": [{"any": true}],
                        "principals": [{"header": {"name": "x-allowed", "string_match": {"exact": "yes"}}}]
                    }}},
                    "shadow_rules": {"action": "DENY", "policies": {"no-admin": {
                        "permissions": [{"url_path": {"path": {"prefix": "/admin"}}}],
                        "principals": [{"any": true}]
                    }}}
                }),
            )]),
        );
    let s = start_checked(&cfg).await;
    let c = Client::http1();
    let r = c.get(&s.url("/app")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.text(), "RBAC: access denied");
    s.access_log("\"GET /app HTTP/1.1\" 403 RBAC ", 1).await;
    assert_eq!(up.requests(), 0);

    let ok = c.get_with(&s.url("/app"), &[("x-allowed", "yes")]).await;
    assert_eq!(ok.status, StatusCode::OK);
    let ok = c
        .get_with(&s.url("/admin/x"), &[("x-allowed", "yes")])
        .await;
    assert_eq!(ok.status, StatusCode::OK, "shadow rules never enforce");

    assert_eq!(s.stat("http.ingress.rbac.allowed").await, Some(2));
    assert_eq!(s.stat("http.ingress.rbac.denied").await, Some(1));
    assert_eq!(s.stat("http.ingress.rbac.shadow_denied").await, Some(1));
    assert_eq!(s.stat("http.ingress.rbac.shadow_allowed").await, Some(2));
}

// === cors ===

#[tokio::test]
async fn cors_preflight_is_answered_by_the_proxy() {
    let up = Upstream::start("up").await;
    let policy = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": [{"exact": "https://app.example"}],
        "allow_methods": "GET,POST",
        "allow_headers": "x-custom",
        "max_age": "600"
    });
    let cfg = Config::new()
        .cluster("backend", &[up.addr])
        .vhosts(json!([{
            "name": "default", "domains": ["*"], "routes": [route("/", "backend")],
            "typed_per_filter_config": {"envoy.filters.http.cors": policy}
        }]))
        .hcm(
            "http_filters",
            chain(vec![filter(
                "envoy.filters.http.cors",
                "envoy.extensions.filters.http.cors.v3.Cors",
                json!({}),
            )]),
        );
    let s = start_checked(&cfg).await;
    let c = Client::http1();
    let pre = c
        .send(req(
            Method::OPTIONS,
            &s.url("/api"),
            &[
                ("origin", "https://app.example"),
                ("access-control-request-method", "POST"),
            ],
            empty(),
        ))
        .await;
    assert_eq!(pre.status, StatusCode::OK);
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(pre.header("access-control-allow-methods"), Some("GET,POST"));
    assert_eq!(pre.header("access-control-allow-headers"), Some("x-custom"));
    assert_eq!(pre.header("access-control-max-age"), Some("600"));
    assert_eq!(up.requests(), 0, "the preflight is answered by the proxy");

    // A simple cross-origin request goes upstream and gets the allow-origin header back.
    let r = c
        .get_with(&s.url("/api"), &[("origin", "https://app.example")])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert_eq!(s.stat("http.ingress.cors.origin_valid").await, Some(2));
}

// === header_mutation ===

#[tokio::test]
async fn header_mutation_edits_both_directions() {
    let up = Upstream::start("up").await;
    let cfg = Config::new()
        .cluster("backend", &[up.addr])
        .routes(json!([route("/", "backend")]))
        .hcm(
            "http_filters",
            chain(vec![filter(
                "envoy.filters.http.header_mutation",
                "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                json!({"mutations": {
                    "request_mutations": [
                        {"append": {"header": {"key": "x-req-added", "value": "1"},
                                    "append_action": "APPEND_IF_EXISTS_OR_ADD"}},
                        {"remove": "x-remove-me"}
                    ],
                    "response_mutations": [
                        {"append": {"header": {"key": "x-resp-added", "value": "2"},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}
                    ]
                }}),
            )]),
        );
    let s = start_checked(&cfg).await;
    let r = Client::h2c()
        .get_with(&s.url("/m"), &[("x-remove-me", "secret")])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-resp-added"), Some("2"));
    let seen = up.last_seen();
    assert_eq!(
        seen.headers.get("x-req-added").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert!(seen.headers.get("x-remove-me").is_none());
}

/// Every per-route level applies, in the order Envoy 1.40 applies them (observed on the real
/// binary, see tests/filters_envoy_diff.rs): the filter's own level, then the most specific
/// level first; `most_specific_header_mutations_wins` reverses the per-route levels.
#[tokio::test]
async fn header_mutation_applies_every_per_route_level_in_envoys_order() {
    let up = Upstream::start("up").await;
    for (wins, order) in [
        (false, ["client", "filter", "route", "vhost", "rc"]),
        (true, ["client", "filter", "rc", "vhost", "route"]),
    ] {
        let s = start_checked(&header_mutation_levels(up.addr, wins)).await;
        let r = Client::http1()
            .get_with(&s.url("/m"), &[("x-order", "client")])
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let seen = up.last_seen();
        let got: Vec<_> = seen
            .headers
            .get_all("x-order")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        assert_eq!(got, order, "request, most_specific_wins={wins}");
        assert_eq!(
            seen.headers.get("x-last").map(|v| v.as_bytes()),
            Some(order[4].as_bytes())
        );
        let got: Vec<_> = r
            .headers
            .get_all("x-order")
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        assert_eq!(got, order[1..], "response, most_specific_wins={wins}");
    }
}

// === buffer ===

#[tokio::test]
async fn buffer_rejects_large_bodies_before_the_upstream_sees_them() {
    let up = Upstream::start_with("up", Reply::CountBody).await;
    let cfg = Config::new()
        .cluster("backend", &[up.addr])
        .routes(json!([route("/", "backend")]))
        .hcm(
            "http_filters",
            chain(vec![filter(
                "envoy.filters.http.buffer",
                "envoy.extensions.filters.http.buffer.v3.Buffer",
                json!({"max_request_bytes": 1024}),
            )]),
        );
    let s = start_checked(&cfg).await;
    for c in [Client::http1(), Client::h2c()] {
        // Streamed without a length: the body hook, not the Content-Length check, rejects it.
        let r = c
            .send(req(Method::POST, &s.url("/big"), &[], generated(4000)))
            .await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(r.text(), "Payload Too Large");
        let r = c
            .send(req(Method::POST, &s.url("/small"), &[], generated(700)))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["bytes"], 700);
    }
    // A declared length over the limit is refused from the headers.
    let r = Client::http1()
        .post(&s.url("/declared"), vec![b'x'; 2000])
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(up.requests(), 2, "only the small bodies went upstream");
    s.access_log("\"POST /big HTTP/1.1\" 413 ", 1).await;
}

// === ext_authz ===

#[derive(Default)]
struct Authz {
    checks: AtomicUsize,
    /// `route_metadata_context` of the last check, as JSON-ish text per namespace.
    route_metadata: std::sync::Mutex<Vec<(String, Vec<String>)>>,
}

fn hvo(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(PbHeaderValue {
            key: key.into(),
            value: value.into(),
            raw_value: vec![],
        }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Authorization for Authz {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        let attrs = request.into_inner().attributes;
        let mut md: Vec<(String, Vec<String>)> = attrs
            .as_ref()
            .and_then(|a| a.route_metadata_context.as_ref())
            .map(|m| {
                m.filter_metadata
                    .iter()
                    .map(|(ns, st)| {
                        let mut keys: Vec<String> = st.fields.keys().cloned().collect();
                        keys.sort();
                        (ns.clone(), keys)
                    })
                    .collect()
            })
            .unwrap_or_default();
        md.sort();
        *self
            .route_metadata
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = md;
        let headers = attrs
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .map(|h| h.headers)
            .unwrap_or_default();
        let allow = headers.get("x-authz").is_some_and(|v| v == "allow");
        let resp = if allow {
            CheckResponse {
                status: Some(RpcStatus::default()),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers: vec![hvo("x-user", "alice")],
                    ..Default::default()
                })),
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
                    headers: vec![hvo("x-denied-by", "test-authz")],
                    body: "denied by test".into(),
                })),
                ..Default::default()
            }
        };
        Ok(tonic::Response::new(resp))
    }
}

async fn start_authz() -> (SocketAddr, Arc<Authz>) {
    let listener = bind().await;
    let addr = local_addr(&listener);
    let svc = Arc::new(Authz::default());
    let server = tonic::transport::Server::builder()
        .add_service(AuthorizationServer::from_arc(svc.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    (addr, svc)
}

fn ext_authz_config(up: SocketAddr, authz: SocketAddr, failure_mode_allow: bool) -> Config {
    Config::new()
        .cluster("backend", &[up])
        .cluster_h2("authz", &[authz])
        .routes(json!([route("/", "backend")]))
        .hcm(
            "http_filters",
            chain(vec![filter(
                "envoy.filters.http.ext_authz",
                "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                json!({
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "2s"},
                    "failure_mode_allow": failure_mode_allow,
                }),
            )]),
        )
}

#[tokio::test]
async fn ext_authz_allows_and_denies_through_a_grpc_cluster() {
    let up = Upstream::start("up").await;
    let (authz_addr, authz) = start_authz().await;
    let s = start_checked(&ext_authz_config(up.addr, authz_addr, false)).await;
    let c = Client::http1();

    let r = c.get_with(&s.url("/ok"), &[("x-authz", "allow")]).await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = up.last_seen();
    assert_eq!(
        seen.headers.get("x-user").map(|v| v.as_bytes()),
        Some(&b"alice"[..])
    );

    let r = c.get(&s.url("/no")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.text(), "denied by test");
    assert_eq!(r.header("x-denied-by"), Some("test-authz"));
    s.access_log("\"GET /no HTTP/1.1\" 403 UAEX ", 1).await;
    assert_eq!(up.requests(), 1);
    assert_eq!(authz.checks.load(Ordering::SeqCst), 2);
    assert_eq!(s.stat("http.ingress.ext_authz.ok").await, Some(1));
    assert_eq!(s.stat("http.ingress.ext_authz.denied").await, Some(1));
    // Envoy also counts under the route's target cluster.
    assert_eq!(s.stat("cluster.backend.ext_authz.ok").await, Some(1));
    assert_eq!(s.stat("cluster.backend.ext_authz.denied").await, Some(1));
}

/// The filter's `stat_prefix` names both stat families; the route's metadata namespaces listed
/// in `route_metadata_context_namespaces` reach the authorization server, others do not.
#[tokio::test]
async fn ext_authz_stat_prefix_cluster_stats_and_route_metadata() {
    let up = Upstream::start("up").await;
    let (authz_addr, authz) = start_authz().await;
    let cfg = Config::new()
        .cluster("backend", &[up.addr])
        .cluster_h2("authz", &[authz_addr])
        .routes(json!([{
            "match": {"prefix": "/"},
            "route": {"cluster": "backend"},
            "metadata": {"filter_metadata": {
                "acme.team": {"owner": "payments", "tier": 2},
                "acme.private": {"key": "not for the authz server"}
            }}
        }]))
        .hcm(
            "http_filters",
            chain(vec![filter(
                "envoy.filters.http.ext_authz",
                "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                json!({
                    "transport_api_version": "V3",
                    "stat_prefix": "waf",
                    "route_metadata_context_namespaces": ["acme.team"],
                    "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "2s"},
                }),
            )]),
        );
    let s = start_checked(&cfg).await;
    let c = Client::http1();
    let r = c.get_with(&s.url("/ok"), &[("x-authz", "allow")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        *authz
            .route_metadata
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
        [(
            "acme.team".to_string(),
            vec!["owner".to_string(), "tier".to_string()]
        )]
    );
    let r = c.get(&s.url("/no")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let stats = s.stats().await;
    let mut got: Vec<(String, i64)> = stats
        .into_iter()
        .filter(|(k, v)| k.contains("ext_authz") && *v != 0)
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("cluster.backend.ext_authz.waf.denied".to_string(), 1),
            ("cluster.backend.ext_authz.waf.ok".to_string(), 1),
            ("http.ingress.ext_authz.waf.denied".to_string(), 1),
            ("http.ingress.ext_authz.waf.ok".to_string(), 1),
        ]
    );
    assert_eq!(s.stat("http.ingress.ext_authz.waf.disabled").await, Some(0));
}

/// A weighted route's cluster is picked with the route, before the filters run (as Envoy
/// resolves it), so ext_authz counts under the cluster each request actually goes to.
#[tokio::test]
async fn ext_authz_counts_under_the_picked_weighted_cluster() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let (authz_addr, _authz) = start_authz().await;
    let cfg = Config::new()
        .cluster("blue", &[blue.addr])
        .cluster("green", &[green.addr])
        .cluster_h2("authz", &[authz_addr])
        .routes(json!([{
            "match": {"prefix": "/"},
            "route": {"weighted_clusters": {"clusters": [
                {"name": "blue", "weight": 1},
                {"name": "green", "weight": 1}
            ]}}
        }]))
        .hcm(
            "http_filters",
            chain(vec![filter(
                "envoy.filters.http.ext_authz",
                "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                json!({
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "authz"}, "timeout": "2s"},
                }),
            )]),
        );
    let s = start_checked(&cfg).await;
    let c = Client::http1();
    let (mut to_blue, mut to_green) = (0, 0);
    for _ in 0..40 {
        let r = c.get_with(&s.url("/w"), &[("x-authz", "allow")]).await;
        assert_eq!(r.status, StatusCode::OK);
        match r.upstream() {
            Some("blue") => to_blue += 1,
            Some("green") => to_green += 1,
            other => panic!("unexpected upstream {other:?}"),
        }
    }
    // 40 requests at 1:1: both clusters are picked (a miss has odds of 2^-39).
    assert!(to_blue > 0 && to_green > 0, "{to_blue}/{to_green}");
    assert_eq!(s.stat("cluster.blue.ext_authz.ok").await, Some(to_blue));
    assert_eq!(s.stat("cluster.green.ext_authz.ok").await, Some(to_green));
    assert_eq!(s.stat("http.ingress.ext_authz.ok").await, Some(40));
}

#[tokio::test]
async fn ext_authz_failure_mode_allow_lets_requests_through_when_authz_is_down() {
    let up = Upstream::start("up").await;
    let down = closed_port().await;
    for (allow, want) in [(true, StatusCode::OK), (false, StatusCode::FORBIDDEN)] {
        let s = start_checked(&ext_authz_config(up.addr, down, allow)).await;
        let r = Client::http1().get(&s.url("/x")).await;
        assert_eq!(r.status, want, "failure_mode_allow: {allow}");
        assert_eq!(s.stat("http.ingress.ext_authz.error").await, Some(1));
        assert_eq!(s.stat("cluster.backend.ext_authz.error").await, Some(1));
        if allow {
            assert_eq!(
                s.stat("http.ingress.ext_authz.failure_mode_allowed").await,
                Some(1)
            );
            assert_eq!(
                s.stat("cluster.backend.ext_authz.failure_mode_allowed")
                    .await,
                Some(1)
            );
        } else {
            s.access_log("\"GET /x HTTP/1.1\" 403 UAEX ", 1).await;
        }
    }
}

// === config errors ===

#[tokio::test]
async fn invalid_filter_configs_are_rejected_with_their_path() {
    let up = Upstream::start("up").await;
    let cfg = Config::new()
        .cluster("backend", &[up.addr])
        .routes(json!([route("/", "backend")]))
        .hcm(
            "http_filters",
            chain(vec![filter(
                "envoy.filters.http.ext_authz",
                "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
                json!({
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "nowhere"}}
                }),
            )]),
        );
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let path = dir.path().join("bad.yaml");
    if let Err(e) = std::fs::write(&path, cfg.yaml()) {
        panic!("write: {e}");
    }
    let args = vec![
        "--mode".to_string(),
        "validate".to_string(),
        "-c".to_string(),
        path.display().to_string(),
    ];
    let (status, _, err) = run(TIMEOUT, env!("CARGO_BIN_EXE_strait"), &args).await;
    assert!(!status.success());
    assert!(
        err.contains("http_filters[0].typed_config.grpc_service.envoy_grpc.cluster_name")
            && err.contains("unknown cluster 'nowhere'"),
        "{err}"
    );
}

// === per-route configs ===

#[tokio::test]
async fn per_route_configs_follow_envoy_precedence_and_disabled() {
    let up = Upstream::start("up").await;
    let deny_all = json!({"rules": {"action": "ALLOW", "policies": {}}});
    let deny_admin = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
        "rbac": {"rules": {"action": "DENY", "policies": {"admin": {
            "permissions": [{"url_path": {"path": {"prefix": "/secure/admin"}}}],
            "principals": [{"any": true}]
        }}}}
    });
    let marked = json!({
        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
        "config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute",
            "mutations": {"response_mutations": [{"append": {
                "header": {"key": "x-route-marked", "value": "route"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}]}
        }
    });
    let cfg = Config::new()
        .cluster("backend", &[up.addr])
        .route_config(json!({
            "name": "local",
            // Route-configuration level: the connection manager's deny-all RBAC is off...
            "typed_per_filter_config": {"envoy.filters.http.rbac": {
                "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": true}},
            "virtual_hosts": [{
                "name": "default", "domains": ["*"],
                "routes": [
                    // ...but a route's own config wins over it.
                    {"match": {"prefix": "/secure"}, "route": {"cluster": "backend"},
                     "typed_per_filter_config": {"envoy.filters.http.rbac": deny_admin}},
                    // A filter disabled in the connection manager runs where a route enables it.
                    {"match": {"prefix": "/marked"}, "route": {"cluster": "backend"},
                     "typed_per_filter_config": {"envoy.filters.http.header_mutation": marked}},
                    route("/", "backend"),
                ]
            }]
        }))
        .hcm(
            "http_filters",
            chain(vec![
                filter(
                    "envoy.filters.http.rbac",
                    "envoy.extensions.filters.http.rbac.v3.RBAC",
                    deny_all,
                ),
                {
                    let mut f = filter(
                        "envoy.filters.http.header_mutation",
                        "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                        json!({"mutations": {"response_mutations": [{"append": {
                            "header": {"key": "x-marked", "value": "hcm"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}]}}),
                    );
                    f["disabled"] = json!(true);
                    f
                },
            ]),
        );
    let s = start_checked(&cfg).await;
    let c = Client::http1();
    let r = c.get(&s.url("/open")).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "RBAC disabled for the route configuration"
    );
    assert_eq!(
        r.header("x-marked"),
        None,
        "header_mutation is disabled by default"
    );
    assert_eq!(c.get(&s.url("/secure/page")).await.status, StatusCode::OK);
    assert_eq!(
        c.get(&s.url("/secure/admin")).await.status,
        StatusCode::FORBIDDEN,
        "the route's RBAC applies"
    );
    let r = c.get(&s.url("/marked")).await;
    assert_eq!(r.status, StatusCode::OK);
    // Both levels apply; the route's first (Envoy's default order).
    assert_eq!(r.header("x-marked"), Some("hcm"));
    assert_eq!(r.header("x-route-marked"), Some("route"));
}
