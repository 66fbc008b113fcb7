//! `envoy.filters.http.ext_authz` against a real tonic `Authorization` server on 127.0.0.1:0:
//! allowed (header edits up and down), denied, errors with and without failure_mode_allow,
//! timeout, per-route context extensions and disabling.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::core::v3::{
    grpc_service, GrpcService, HeaderValue as PbHeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::extensions::filters::http::ext_authz::v3::{
    ext_authz::Services, ext_authz_per_route::Override, CheckSettings, ExtAuthz, ExtAuthzPerRoute,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::auth::v3::{
    authorization_server::{Authorization, AuthorizationServer},
    check_response::HttpResponse,
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{BoolValue, Duration as PbDuration};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use http::StatusCode;
use strait_filters::builtin::ext_authz::{PER_ROUTE_TYPE_URL, TYPE_URL};
use strait_filters::ClusterConnector;

#[derive(Default)]
struct Authz {
    last: Mutex<Option<CheckRequest>>,
}

fn hvo(key: &str, value: &str, append: Option<bool>) -> HeaderValueOption {
    #[allow(deprecated)]
    HeaderValueOption {
        header: Some(PbHeaderValue {
            key: key.into(),
            value: value.into(),
            raw_value: vec![],
        }),
        append: append.map(|value| BoolValue { value }),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Authorization for Authz {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let req = request.into_inner();
        *self.last.lock().unwrap() = Some(req.clone());
        let headers = req
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .map(|h| h.headers)
            .unwrap_or_default();
        let verdict = headers.get("x-authz").cloned().unwrap_or_default();
        let resp = match verdict.as_str() {
            "allow" => CheckResponse {
                status: Some(RpcStatus {
                    code: 0,
                    ..Default::default()
                }),
                http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                    headers: vec![hvo("x-user", "alice", Some(false)), hvo("x-tag", "a", None)],
                    headers_to_remove: vec!["x-token".into()],
                    response_headers_to_add: vec![hvo("x-authz-resp", "1", None)],
                    ..Default::default()
                })),
                ..Default::default()
            },
            "deny" => CheckResponse {
                status: Some(RpcStatus {
                    code: 7,
                    ..Default::default()
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus { code: 401 }),
                    headers: vec![hvo("www-authenticate", "Bearer", None)],
                    body: "nope".into(),
                })),
                ..Default::default()
            },
            "slow" => {
                // Longer than any timeout used here; the filter must give up first.
                tokio::time::sleep(Duration::from_secs(30)).await;
                CheckResponse::default()
            }
            "grpc-error" => return Err(tonic::Status::unavailable("down")),
            _ => CheckResponse {
                status: Some(RpcStatus {
                    code: 7,
                    ..Default::default()
                }),
                ..Default::default()
            },
        };
        Ok(tonic::Response::new(resp))
    }
}

async fn start_authz() -> (SocketAddr, Arc<Authz>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = Arc::new(Authz::default());
    let server = tonic::transport::Server::builder()
        .add_service(AuthorizationServer::from_arc(svc.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(async move {
        if let Err(e) = server.await {
            panic!("authz server failed: {e}");
        }
    });
    (addr, svc)
}

/// Knows one cluster, `authz`, at `addr`.
struct OneCluster(SocketAddr);

impl ClusterConnector for OneCluster {
    fn grpc_channel(&self, cluster: &str) -> Result<tonic::transport::Channel, String> {
        if cluster != "authz" {
            return Err(format!("unknown cluster '{cluster}'"));
        }
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{}", self.0))
            .map_err(|e| e.to_string())?;
        Ok(ep.connect_lazy())
    }
}

fn config(timeout_ms: Option<i32>) -> ExtAuthz {
    ExtAuthz {
        transport_api_version: 2,
        services: Some(Services::GrpcService(GrpcService {
            timeout: timeout_ms.map(|ms| PbDuration {
                seconds: i64::from(ms / 1000),
                nanos: (ms % 1000) * 1_000_000,
            }),
            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(
                grpc_service::EnvoyGrpc {
                    cluster_name: "authz".into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[tokio::test]
async fn allowed_requests_get_header_edits() {
    let (addr, svc) = start_authz().await;
    let env = Env::with_clusters(Arc::new(OneCluster(addr)));
    let chain = env.chain("authz", TYPE_URL, &config(Some(5000)));
    let mut c = ctx();
    let mut r = req(
        "POST",
        "http://api.local/v1/items?x=1",
        &[
            ("x-authz", "allow"),
            ("x-token", "t"),
            ("x-user", "mallory"),
            ("x-tag", "z"),
        ],
    );
    run(&chain, &mut c, &mut r).await.unwrap();
    assert_eq!(header(&r.headers, "x-user"), Some("alice"));
    assert!(r.headers.get("x-token").is_none());
    let tags: Vec<_> = r
        .headers
        .get_all("x-tag")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(tags, ["z", "a"]);
    let mut p = resp(200);
    chain.run_response_headers(&mut c, &mut p).await.unwrap();
    assert_eq!(header(&p.headers, "x-authz-resp"), Some("1"));
    assert_eq!(env.counter("http.ingress.ext_authz.ok"), 1);

    let sent = svc.last.lock().unwrap().take().unwrap();
    let attrs = sent.attributes.unwrap();
    let http = attrs.request.unwrap().http.unwrap();
    assert_eq!(
        (
            http.method.as_str(),
            http.path.as_str(),
            http.host.as_str(),
            http.query.as_str()
        ),
        ("POST", "/v1/items?x=1", "api.local", "x=1")
    );
    assert_eq!(
        http.headers.get(":method").map(String::as_str),
        Some("POST")
    );
    let src = attrs.source.unwrap().address.unwrap().address.unwrap();
    assert!(format!("{src:?}").contains("10.0.0.1"), "{src:?}");
}

#[tokio::test]
async fn denied_requests_get_the_servers_reply() {
    let (addr, _svc) = start_authz().await;
    let env = Env::with_clusters(Arc::new(OneCluster(addr)));
    let chain = env.chain("authz", TYPE_URL, &config(Some(5000)));
    let reply = run(
        &chain,
        &mut ctx(),
        &mut req("GET", "/", &[("x-authz", "deny")]),
    )
    .await
    .unwrap_err();
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(&reply.body[..], b"nope");
    assert_eq!(header(&reply.headers, "www-authenticate"), Some("Bearer"));
    assert_eq!(reply.response_flag, Some("UAEX"));
    // Denied without a denied_response: 403.
    let reply = run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap_err();
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(env.counter("http.ingress.ext_authz.denied"), 2);
}

#[tokio::test]
async fn errors_deny_unless_failure_mode_allow() {
    let (addr, _svc) = start_authz().await;
    let env = Env::with_clusters(Arc::new(OneCluster(addr)));
    let chain = env.chain("authz", TYPE_URL, &config(None));
    let reply = run(
        &chain,
        &mut ctx(),
        &mut req("GET", "/", &[("x-authz", "grpc-error")]),
    )
    .await
    .unwrap_err();
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.response_flag, Some("UAEX"));

    let mut cfg = config(None);
    cfg.failure_mode_allow = true;
    cfg.failure_mode_allow_header_add = true;
    cfg.status_on_error = Some(HttpStatus { code: 503 });
    let chain = env.chain("authz", TYPE_URL, &cfg);
    let mut r = req("GET", "/", &[("x-authz", "grpc-error")]);
    run(&chain, &mut ctx(), &mut r).await.unwrap();
    assert_eq!(
        header(&r.headers, "x-envoy-auth-failure-mode-allowed"),
        Some("true")
    );
    assert_eq!(env.counter("http.ingress.ext_authz.error"), 2);
    assert_eq!(
        env.counter("http.ingress.ext_authz.failure_mode_allowed"),
        1
    );
}

#[tokio::test]
async fn a_slow_server_times_out_and_a_dead_one_errors() {
    let (addr, _svc) = start_authz().await;
    let env = Env::with_clusters(Arc::new(OneCluster(addr)));
    let mut cfg = config(Some(100));
    cfg.status_on_error = Some(HttpStatus { code: 504 });
    let chain = env.chain("authz", TYPE_URL, &cfg);
    let start = std::time::Instant::now();
    let reply = run(
        &chain,
        &mut ctx(),
        &mut req("GET", "/", &[("x-authz", "slow")]),
    )
    .await
    .unwrap_err();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );

    // Nothing listens on this port any more.
    let dead = {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let env = Env::with_clusters(Arc::new(OneCluster(dead)));
    let chain = env.chain("authz", TYPE_URL, &config(Some(2000)));
    let reply = run(
        &chain,
        &mut ctx(),
        &mut req("GET", "/", &[("x-authz", "allow")]),
    )
    .await
    .unwrap_err();
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn per_route_settings_and_disabling() {
    let (addr, svc) = start_authz().await;
    let env = Env::with_clusters(Arc::new(OneCluster(addr)));
    let chain = env.chain("authz", TYPE_URL, &config(Some(5000)));
    let settings = ExtAuthzPerRoute {
        r#override: Some(Override::CheckSettings(CheckSettings {
            context_extensions: HashMap::from([("tenant".to_string(), "blue".to_string())]),
            ..Default::default()
        })),
    };
    let route = env.per_route(PER_ROUTE_TYPE_URL, &settings);
    run(
        &chain,
        &mut ctx_with_route("authz", route),
        &mut req("GET", "/", &[("x-authz", "allow")]),
    )
    .await
    .unwrap();
    let sent = svc.last.lock().unwrap().take().unwrap();
    assert_eq!(
        sent.attributes
            .unwrap()
            .context_extensions
            .get("tenant")
            .map(String::as_str),
        Some("blue")
    );

    let off = env.per_route(
        PER_ROUTE_TYPE_URL,
        &ExtAuthzPerRoute {
            r#override: Some(Override::Disabled(true)),
        },
    );
    run(
        &chain,
        &mut ctx_with_route("authz", off),
        &mut req("GET", "/", &[("x-authz", "deny")]),
    )
    .await
    .unwrap();
    assert!(
        svc.last.lock().unwrap().is_none(),
        "a disabled filter must not call the server"
    );
}

/// `context_extensions` merge over every level (most specific wins per key), the route's
/// metadata namespaces asked for reach the server, and the outcome is also counted under the
/// route's target cluster (`cluster.<c>.ext_authz.[<stat_prefix>.]ok`), as Envoy does.
#[tokio::test]
async fn levels_merge_route_metadata_is_sent_and_cluster_stats_count() {
    use envoy_types::pb::envoy::config::core::v3::Metadata as PbMetadata;
    use envoy_types::pb::google::protobuf::{value::Kind, Struct, Value};
    use strait_filters::{Metadata, PerFilterConfigs, RouteEntry, StatsScope};

    let (addr, svc) = start_authz().await;
    let env = Env::with_clusters(Arc::new(OneCluster(addr)));
    let mut cfg = config(Some(5000));
    cfg.stat_prefix = "waf".into();
    cfg.route_metadata_context_namespaces = vec!["acme.team".into()];
    let chain = env.chain("authz", TYPE_URL, &cfg);
    let settings = |pairs: &[(&str, &str)]| {
        env.per_route(
            PER_ROUTE_TYPE_URL,
            &ExtAuthzPerRoute {
                r#override: Some(Override::CheckSettings(CheckSettings {
                    context_extensions: pairs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                })),
            },
        )
    };
    let vh = [(
        "authz".to_string(),
        settings(&[("tenant", "blue"), ("zone", "a")]),
    )];
    let rt = [("authz".to_string(), settings(&[("tenant", "red")]))];
    let ns = |owner: &str| Struct {
        fields: [(
            "owner".to_string(),
            Value {
                kind: Some(Kind::StringValue(owner.into())),
            },
        )]
        .into(),
    };
    let metadata = Metadata::from_proto(&PbMetadata {
        filter_metadata: [
            ("acme.team".to_string(), ns("payments")),
            ("acme.secret".to_string(), ns("nobody")),
        ]
        .into(),
        typed_filter_metadata: HashMap::new(),
    });
    let route = Arc::new(RouteEntry {
        name: "r".into(),
        cluster: Some("backend".into()),
        upstream_stats: Some(StatsScope::new("cluster.", env.stats.clone())),
        metadata,
        per_filter_configs: PerFilterConfigs::resolve([&vh[..], &rt[..]]),
    });
    let mut c = ctx();
    c.set_route_entry(route.clone());
    c.cluster_name = Some("backend".into());
    run(
        &chain,
        &mut c,
        &mut req("GET", "/", &[("x-authz", "allow")]),
    )
    .await
    .unwrap();
    let attrs = svc.last.lock().unwrap().take().unwrap().attributes.unwrap();
    let ext: std::collections::BTreeMap<_, _> = attrs.context_extensions.into_iter().collect();
    assert_eq!(
        ext,
        [
            ("tenant".to_string(), "red".to_string()),
            ("zone".to_string(), "a".to_string())
        ]
        .into()
    );
    let md = attrs.route_metadata_context.unwrap_or_default();
    assert_eq!(md.filter_metadata.keys().collect::<Vec<_>>(), ["acme.team"]);
    assert_eq!(env.counter("cluster.backend.ext_authz.waf.ok"), 1);
    assert_eq!(env.counter("http.ingress.ext_authz.waf.ok"), 1);

    let mut c = ctx();
    c.set_route_entry(route);
    c.cluster_name = Some("backend".into());
    run(&chain, &mut c, &mut req("GET", "/", &[("x-authz", "deny")]))
        .await
        .unwrap_err();
    assert_eq!(env.counter("cluster.backend.ext_authz.waf.denied"), 1);
    // Envoy creates the filter's own counters with the filter, the cluster's when counted.
    let names = env.stats.names();
    assert!(names.contains(&"http.ingress.ext_authz.waf.disabled".to_string()));
    assert!(!names.contains(&"cluster.backend.ext_authz.waf.error".to_string()));
}

#[test]
fn config_errors_name_their_field() {
    let env = Env::new();
    let err = env.try_build(TYPE_URL, &config(None)).err().unwrap();
    assert_eq!(
        err.path,
        format!("{PATH}.grpc_service.envoy_grpc.cluster_name")
    );
    let mut cfg = config(None);
    cfg.services = Some(Services::HttpService(Default::default()));
    assert_eq!(
        env.try_build(TYPE_URL, &cfg).err().unwrap().path,
        format!("{PATH}.http_service")
    );
    let mut cfg = config(None);
    cfg.with_request_body = Some(Default::default());
    assert_eq!(
        env.try_build(TYPE_URL, &cfg).err().unwrap().path,
        format!("{PATH}.with_request_body")
    );
}

/// A denial is charged to the request's cluster unless `charge_cluster_response_stats` is false.
#[tokio::test]
async fn denials_charge_the_cluster_unless_disabled() {
    use envoy_types::pb::google::protobuf::BoolValue;
    use strait_filters::{RouteEntry, StatsScope};

    let (addr, _svc) = start_authz().await;
    for charge in [None, Some(false)] {
        let env = Env::with_clusters(Arc::new(OneCluster(addr)));
        let mut cfg = config(Some(5000));
        cfg.charge_cluster_response_stats = charge.map(|value| BoolValue { value });
        let chain = env.chain("authz", TYPE_URL, &cfg);
        let route = Arc::new(RouteEntry {
            upstream_stats: Some(StatsScope::new("cluster.", env.stats.clone())),
            ..RouteEntry::default()
        });
        let mut c = ctx();
        c.set_route_entry(route);
        c.cluster_name = Some("backend".into());
        let reply = run(&chain, &mut c, &mut req("GET", "/", &[("x-authz", "deny")]))
            .await
            .unwrap_err();
        // The test server denies with its own status (401), which is what gets charged.
        assert_eq!(reply.status, http::StatusCode::UNAUTHORIZED);
        let want = u64::from(charge.is_none());
        for name in [
            "upstream_rq_401",
            "upstream_rq_4xx",
            "upstream_rq_completed",
            "internal.upstream_rq_401",
            "internal.upstream_rq_4xx",
            "internal.upstream_rq_completed",
        ] {
            assert_eq!(
                env.counter(&format!("cluster.backend.{name}")),
                want,
                "{name} with charge_cluster_response_stats {charge:?}"
            );
        }
    }
}
