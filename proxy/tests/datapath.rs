//! Data-path tests through a real `Server` on loopback: real upstream servers, real clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_proxy::server::{Options, Server};
use strait_xds::model::{self, *};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// === Config builders ===

fn route(prefix: &str, action: RouteAction) -> Route {
    Route {
        name: format!("r{prefix}"),
        matcher: RouteMatch {
            path: PathMatch::Prefix(prefix.into()),
            case_sensitive: true,
            headers: vec![],
            query_parameters: vec![],
        },
        action,
        headers: HeaderMutations::default(),
        filter_route: Default::default(),
    }
}

fn forward(cluster: &str) -> ForwardAction {
    ForwardAction {
        cluster: ClusterSpecifier::Cluster(cluster.into()),
        prefix_rewrite: None,
        regex_rewrite: None,
        host_rewrite: HostRewrite::None,
        timeout: Some(Duration::from_secs(15)),
        idle_timeout: None,
        retry_policy: None,
        upgrade_overrides: vec![],
        priority: Default::default(),
        hash_policy: Vec::new(),
    }
}

fn retry(on: &str, n: u32, per_try: Option<Duration>) -> RetryPolicy {
    RetryPolicy {
        retry_on: RetryOn::parse(on).unwrap(),
        num_retries: n,
        per_try_timeout: per_try,
        retriable_status_codes: vec![],
        back_off_base: Duration::from_millis(5),
        back_off_max: Duration::from_millis(50),
        retriable_headers: vec![],
        previous_hosts: false,
        host_selection_retry_max_attempts: 1,
        previous_priorities: None,
    }
}

fn cluster(name: &str, addrs: &[SocketAddr], protocol: UpstreamProtocol) -> Arc<Cluster> {
    Arc::new(Cluster {
        name: name.into(),
        discovery: DiscoveryType::Static,
        connect_timeout: Duration::from_secs(2),
        lb_policy: LbPolicy::RoundRobin,
        lb: Default::default(),
        load_assignment: LoadAssignment {
            policy: Default::default(),
            endpoints: vec![LocalityLbEndpoints {
                locality: Locality::default(),
                priority: 0,
                load_balancing_weight: None,
                lb_endpoints: addrs
                    .iter()
                    .map(|a| LbEndpoint {
                        address: EndpointAddress::Ip(*a),
                        load_balancing_weight: 1,
                        health_status: HealthStatus::Unknown,
                        hostname: None,
                    })
                    .collect(),
            }],
        },
        protocol,
        circuit_breakers: Thresholds::default(),
        idle_timeout: Some(Duration::from_secs(3600)),
        dns_refresh_rate: Duration::from_secs(5),
        dns_lookup_family: DnsLookupFamily::Auto,
        health_checks: Vec::new(),
        outlier_detection: None,
        circuit_breakers_high: Thresholds::default(),
    })
}

fn bootstrap(routes: Vec<Route>, clusters: Vec<Arc<Cluster>>, codec: CodecType) -> Bootstrap {
    bootstrap_with(routes, clusters, codec, vec![])
}

fn bootstrap_with(
    routes: Vec<Route>,
    clusters: Vec<Arc<Cluster>>,
    codec: CodecType,
    upgrade_types: Vec<UpgradeConfig>,
) -> Bootstrap {
    let rc = RouteConfig {
        name: "local".into(),
        virtual_hosts: vec![VirtualHost {
            name: "all".into(),
            domains: vec![DomainMatcher::Any],
            routes,
            headers: HeaderMutations::default(),
            retry_policy: None,
        }],
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: "ingress".into(),
        codec_type: codec,
        route_config: Arc::new(rc),
        http_filters: vec![],
        filter_chain: Default::default(),
        stream_idle_timeout: Some(Duration::from_secs(300)),
        request_timeout: None,
        request_headers_timeout: None,
        max_request_headers_kb: 60,
        use_remote_address: true,
        xff_num_trusted_hops: 0,
        generate_request_id: true,
        access_logs: vec![],
        upgrade_types,
        server_header: Default::default(),
        suppress_envoy_headers: false,
    };
    Bootstrap {
        listeners: vec![Arc::new(model::Listener {
            name: "main".into(),
            address: "127.0.0.1:0".parse().unwrap(),
            hcm: Arc::new(hcm),
        })],
        clusters,
        ..Default::default()
    }
}

async fn start(cfg: Bootstrap) -> (Server, SocketAddr) {
    let server = Server::start(
        cfg,
        Options {
            concurrency: 1,
            drain_time: Duration::from_secs(2),
            command_line_options: serde_json::Value::Null,
        },
    )
    .await
    .expect("server starts");
    let addr = server.listener_addresses()[0].1;
    (server, addr)
}

fn stat(server: &Server, name: &str) -> i64 {
    use strait_proxy::admin::AdminSource;
    server
        .shared()
        .stats()
        .all()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| match v {
            strait_proxy::stats::StatValue::Counter(c) => c as i64,
            strait_proxy::stats::StatValue::Gauge(g) => g,
        })
        .unwrap_or_else(|| panic!("no stat {name}"))
}

// === Upstreams ===

type Handler = Arc<dyn Fn(Request<Incoming>, usize) -> HandlerFut + Send + Sync>;
type HandlerFut = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>,
            > + Send,
    >,
>;

struct Upstream {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

fn full(b: impl Into<Bytes>) -> http_body_util::combinators::BoxBody<Bytes, Infallible> {
    Full::new(b.into()).boxed()
}

/// A hyper upstream (HTTP/1.1 or h2c) whose handler gets the request and its 0-based index.
async fn upstream(h2: bool, handler: Handler) -> Upstream {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let accepts = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (a, r) = (accepts.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = tcp.accept().await else {
                return;
            };
            a.fetch_add(1, Ordering::SeqCst);
            let (handler, r) = (handler.clone(), r.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let n = r.fetch_add(1, Ordering::SeqCst);
                    let f = handler(req, n);
                    async move { Ok::<_, Infallible>(f.await) }
                });
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .with_upgrades()
                        .await;
                }
            });
        }
    });
    Upstream {
        addr,
        accepts,
        requests,
    }
}

fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Incoming>, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<
            Output = Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>,
        > + Send
        + 'static,
{
    Arc::new(move |req, n| Box::pin(f(req, n)))
}

/// Echoes the request headers back as `x-echo-<name>` response headers.
fn echo_headers() -> Handler {
    handler(|req: Request<Incoming>, _| async move {
        let mut resp = Response::new(full("ok"));
        for (k, v) in req.headers() {
            let name = HeaderName::from_bytes(format!("x-echo-{k}").as_bytes()).unwrap();
            resp.headers_mut().append(name, v.clone());
        }
        resp.headers_mut().insert(
            "x-echo-path",
            HeaderValue::from_str(req.uri().path()).unwrap(),
        );
        resp
    })
}

/// An address nothing listens on: connecting is refused. The port stays bound, without a
/// listen, for the rest of the process: another test's listener on port 0 cannot be given it
/// (a released port could, and `/dead` then reached that test's proxy).
async fn closed_port() -> SocketAddr {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let addr = s.local_addr().unwrap();
    std::mem::forget(s);
    addr
}

// === Clients ===

async fn h1_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    tx
}

async fn get(addr: SocketAddr, path: &str) -> (StatusCode, HeaderMap, Bytes) {
    let mut tx = h1_client(addr).await;
    let req = Request::get(path)
        .header("host", "example.com")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

// === Tests ===

#[tokio::test]
async fn forwards_with_header_hygiene() {
    let up = upstream(false, echo_headers()).await;
    let cfg = bootstrap(
        vec![route("/", RouteAction::Forward(forward("backend")))],
        vec![cluster("backend", &[up.addr], UpstreamProtocol::Http1)],
        CodecType::Auto,
    );
    let (server, addr) = start(cfg).await;
    let mut tx = h1_client(addr).await;
    let req = Request::get("/hello?x=1")
        .header("host", "example.com")
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("x-keep", "yes")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["x-echo-host"], "example.com");
    assert_eq!(h["x-echo-x-keep"], "yes");
    assert_eq!(h["x-echo-te"], "trailers");
    assert_eq!(h["x-echo-path"], "/hello");
    for gone in [
        "x-echo-connection",
        "x-echo-x-drop-me",
        "x-echo-keep-alive",
        "x-echo-proxy-connection",
    ] {
        assert!(!h.contains_key(gone), "{gone} forwarded");
    }
    assert_eq!(h["x-echo-x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-echo-x-forwarded-proto"], "http");
    assert_eq!(h["x-echo-x-request-id"].len(), 36);
    assert_eq!(h["x-echo-x-envoy-expected-rq-timeout-ms"], "15000");
    assert!(h.contains_key("x-envoy-upstream-service-time"));
    resp.into_body().collect().await.unwrap();
    assert_eq!(stat(&server, "http.ingress.downstream_rq_2xx"), 1);
    assert_eq!(stat(&server, "cluster.backend.upstream_rq_2xx"), 1);
    assert_eq!(stat(&server, "cluster.backend.upstream_cx_total"), 1);
    server.shutdown();
    server.wait().await;
}

#[tokio::test]
async fn http1_pool_reuses_connection() {
    let up = upstream(false, echo_headers()).await;
    let cfg = bootstrap(
        vec![route("/", RouteAction::Forward(forward("backend")))],
        vec![cluster("backend", &[up.addr], UpstreamProtocol::Http1)],
        CodecType::Auto,
    );
    let (_server, addr) = start(cfg).await;
    let mut tx = h1_client(addr).await;
    for _ in 0..20 {
        let req = Request::get("/")
            .header("host", "a")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 20);
    assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn http2_upstream_multiplexes() {
    let up = upstream(
        true,
        handler(|_, _| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Response::new(full("h2"))
        }),
    )
    .await;
    let cfg = bootstrap(
        vec![route("/", RouteAction::Forward(forward("backend")))],
        vec![cluster(
            "backend",
            &[up.addr],
            UpstreamProtocol::Http2 {
                max_concurrent_streams: 100,
            },
        )],
        CodecType::Auto,
    );
    let (_server, addr) = start(cfg).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(tokio::spawn(async move { get(addr, "/").await }));
    }
    for t in tasks {
        let (status, _, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, "h2");
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 10);
    assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn retries_on_503() {
    let up = upstream(
        false,
        handler(|_, n| async move {
            let mut r = Response::new(full(if n == 0 { "busy" } else { "fine" }));
            if n == 0 {
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            r
        }),
    )
    .await;
    let mut fwd = forward("backend");
    fwd.retry_policy = Some(retry("5xx", 2, None));
    let cfg = bootstrap(
        vec![route("/", RouteAction::Forward(fwd))],
        vec![cluster("backend", &[up.addr], UpstreamProtocol::Http1)],
        CodecType::Auto,
    );
    let (server, addr) = start(cfg).await;
    // A body that must be replayed on the retry.
    let mut tx = h1_client(addr).await;
    let req = Request::post("/")
        .header("host", "a")
        .body(Full::new(Bytes::from("payload")))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "fine");
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
    assert_eq!(stat(&server, "cluster.backend.upstream_rq_retry"), 1);
    assert_eq!(
        stat(&server, "cluster.backend.upstream_rq_retry_success"),
        1
    );
}

#[tokio::test]
async fn retry_limit_passes_last_response_through() {
    let up = upstream(
        false,
        handler(|_, _| async move {
            let mut r = Response::new(full("busy"));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        }),
    )
    .await;
    let mut fwd = forward("backend");
    fwd.retry_policy = Some(retry("gateway-error", 2, None));
    let cfg = bootstrap(
        vec![route("/", RouteAction::Forward(fwd))],
        vec![cluster("backend", &[up.addr], UpstreamProtocol::Http1)],
        CodecType::Auto,
    );
    let (_server, addr) = start(cfg).await;
    let (status, _, body) = get(addr, "/").await;
    assert_eq!(status, 503);
    assert_eq!(body, "busy");
    assert_eq!(up.requests.load(Ordering::SeqCst), 3);
}

/// An upstream speaking raw HTTP/1.1: the first connection is reset after the request
/// arrives, later ones get a 200.
async fn reset_once_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = tcp.accept().await else {
                return;
            };
            let i = n2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                if i == 0 {
                    // Closed before any response: the proxy sees a connection termination.
                    drop(s);
                } else {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                    let _ = s.read(&mut buf).await;
                }
            });
        }
    });
    (addr, n)
}

#[tokio::test]
async fn retries_on_reset_and_reports_failures() {
    let (up, accepts) = reset_once_upstream().await;
    let mut fwd = forward("backend");
    fwd.retry_policy = Some(retry("reset", 1, None));
    let cfg = bootstrap(
        vec![route("/", RouteAction::Forward(fwd))],
        vec![cluster("backend", &[up], UpstreamProtocol::Http1)],
        CodecType::Auto,
    );
    let (server, addr) = start(cfg).await;
    let (status, _, body) = get(addr, "/").await;
    assert_eq!(status, 200);
    assert_eq!(body, "ok");
    assert_eq!(accepts.load(Ordering::SeqCst), 2);
    assert_eq!(stat(&server, "cluster.backend.upstream_rq_retry"), 1);

    // Without a retry policy a reset becomes Envoy's 503.
    let (up, _) = reset_once_upstream().await;
    let cfg = bootstrap(
        vec![route("/", RouteAction::Forward(forward("backend")))],
        vec![cluster("backend", &[up], UpstreamProtocol::Http1)],
        CodecType::Auto,
    );
    let (_server, addr) = start(cfg).await;
    let (status, _, body) = get(addr, "/").await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
    );
}

#[tokio::test]
async fn per_try_timeout_then_504() {
    // Accepts and never answers.
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let black = tcp.local_addr().unwrap();
    let held = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let h2 = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = tcp.accept().await {
            h2.lock().await.push(s);
        }
    });
    let mut fwd = forward("backend");
    fwd.retry_policy = Some(retry("5xx", 1, Some(Duration::from_millis(100))));
    let cfg = bootstrap(
        vec![route("/", RouteAction::Forward(fwd))],
        vec![cluster("backend", &[black], UpstreamProtocol::Http1)],
        CodecType::Auto,
    );
    let (server, addr) = start(cfg).await;
    let (status, _, body) = get(addr, "/").await;
    assert_eq!(status, 504);
    assert_eq!(body, "upstream request timeout");
    assert_eq!(
        stat(&server, "cluster.backend.upstream_rq_per_try_timeout"),
        2
    );
    assert_eq!(stat(&server, "cluster.backend.upstream_rq_retry"), 1);

    // The route timeout alone.
    let mut fwd = forward("backend");
    fwd.timeout = Some(Duration::from_millis(100));
    let cfg = bootstrap(
        vec![route("/", RouteAction::Forward(fwd))],
        vec![cluster("backend", &[black], UpstreamProtocol::Http1)],
        CodecType::Auto,
    );
    let (server, addr) = start(cfg).await;
    let (status, _, body) = get(addr, "/").await;
    assert_eq!(status, 504);
    assert_eq!(body, "upstream request timeout");
    assert_eq!(stat(&server, "cluster.backend.upstream_rq_timeout"), 1);
}

#[tokio::test]
async fn local_replies() {
    let dead = closed_port().await;
    let mut by_header = forward("x");
    by_header.cluster = ClusterSpecifier::Header(HeaderName::from_static("x-cluster"));
    let cfg = bootstrap(
        vec![
            route("/dead", RouteAction::Forward(forward("dead"))),
            route("/empty", RouteAction::Forward(forward("empty"))),
            route("/byheader", RouteAction::Forward(by_header)),
            route(
                "/direct",
                RouteAction::DirectResponse {
                    status: StatusCode::IM_A_TEAPOT,
                    body: Some(Bytes::from("short and stout")),
                },
            ),
        ],
        vec![
            cluster("dead", &[dead], UpstreamProtocol::Http1),
            cluster("empty", &[], UpstreamProtocol::Http1),
        ],
        CodecType::Auto,
    );
    let (server, addr) = start(cfg).await;
    let (s, h, b) = get(addr, "/nowhere").await;
    assert_eq!((s, b.as_ref()), (StatusCode::NOT_FOUND, &b""[..]));
    assert_eq!(h["content-length"], "0");
    let (s, h, b) = get(addr, "/dead").await;
    assert_eq!(s, 503);
    assert_eq!(
        b,
        "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
    );
    assert_eq!(h["content-type"], "text/plain");
    let (s, _, b) = get(addr, "/empty").await;
    assert_eq!(
        (s, b.as_ref()),
        (StatusCode::SERVICE_UNAVAILABLE, &b"no healthy upstream"[..])
    );
    let (s, _, _) = get(addr, "/byheader").await;
    assert_eq!(s, 503);
    let (s, _, b) = get(addr, "/direct").await;
    assert_eq!(
        (s, b.as_ref()),
        (StatusCode::IM_A_TEAPOT, &b"short and stout"[..])
    );
    assert_eq!(stat(&server, "http.ingress.no_route"), 1);
    assert_eq!(stat(&server, "http.ingress.no_cluster"), 1);
    assert_eq!(stat(&server, "cluster.dead.upstream_cx_connect_fail"), 1);
    assert_eq!(stat(&server, "http.ingress.downstream_rq_5xx"), 3);
}

#[tokio::test]
async fn streams_bodies_and_trailers_over_h2() {
    // Upstream: counts the uploaded bytes, answers with a streamed body and trailers.
    let up = upstream(
        true,
        handler(|req: Request<Incoming>, _| async move {
            let mut body = req.into_body();
            let mut n = 0usize;
            while let Some(f) = body.frame().await {
                if let Ok(d) = f.unwrap().into_data() {
                    n += d.len();
                }
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                Ok(Frame::data(Bytes::from(format!("got {n}")))),
                Ok(Frame::data(Bytes::from(" bytes"))),
                Ok(Frame::trailers(trailers)),
            ];
            Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        }),
    )
    .await;
    let cfg = bootstrap(
        vec![route("/", RouteAction::Forward(forward("backend")))],
        vec![cluster(
            "backend",
            &[up.addr],
            UpstreamProtocol::Http2 {
                max_concurrent_streams: 100,
            },
        )],
        CodecType::Auto,
    );
    let (_server, addr) = start(cfg).await;
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    // 8 MiB in 64 KiB chunks, generated as the client sends.
    let chunks = (0..128).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from(vec![7u8; 65536]))));
    let req = Request::post("http://example.com/up")
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(collected.to_bytes(), "got 8388608 bytes");
}

#[tokio::test]
async fn websocket_upgrade_tunnels_only_when_enabled() {
    // Upstream: accepts the upgrade and echoes bytes on the upgraded connection.
    let up = upstream(
        false,
        handler(|mut req: Request<Incoming>, _| async move {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(u) = on.await {
                    let mut io = TokioIo::new(u);
                    let mut buf = [0u8; 64];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(full(""))
                .unwrap()
        }),
    )
    .await;
    let ws = UpgradeConfig {
        upgrade_type: "websocket".into(),
        enabled: true,
    };
    for enabled in [true, false] {
        let mut fwd = forward("backend");
        // The stream idle timeout also ends an idle tunnel.
        fwd.idle_timeout = Some(Duration::from_millis(300));
        let cfg = bootstrap_with(
            vec![route("/", RouteAction::Forward(fwd))],
            vec![cluster("backend", &[up.addr], UpstreamProtocol::Http1)],
            CodecType::Auto,
            if enabled { vec![ws.clone()] } else { vec![] },
        );
        let (server, addr) = start(cfg).await;
        let mut tx = h1_client(addr).await;
        let req = Request::get("/ws")
            .header("host", "a")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        if !enabled {
            assert_eq!(resp.status(), StatusCode::FORBIDDEN);
            continue;
        }
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
        for msg in [&b"hello"[..], b"again"] {
            io.write_all(msg).await.unwrap();
            let mut buf = vec![0u8; msg.len()];
            io.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, msg);
        }
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "idle tunnel was not closed");
        assert!(rest.is_empty());
        assert_eq!(stat(&server, "http.ingress.downstream_rq_idle_timeout"), 1);
    }
}

#[tokio::test]
async fn drain_lets_in_flight_requests_finish() {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let arrived = Arc::new(tokio::sync::Notify::new());
    let arrived2 = arrived.clone();
    let up = upstream(
        false,
        handler(move |_, _| {
            let mut rx = release_rx.clone();
            arrived2.notify_one();
            async move {
                let _ = rx.wait_for(|v| *v).await.map(|_| ());
                Response::new(full("late"))
            }
        }),
    )
    .await;
    let cfg = bootstrap(
        vec![route("/", RouteAction::Forward(forward("backend")))],
        vec![cluster("backend", &[up.addr], UpstreamProtocol::Http1)],
        CodecType::Auto,
    );
    let (server, addr) = start(cfg).await;
    let mut tx = h1_client(addr).await;
    let req = Request::get("/")
        .header("host", "a")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let in_flight = tokio::spawn(tx.send_request(req));
    arrived.notified().await;
    server.shutdown();
    let waiter = tokio::spawn(server.wait());
    // New connections are refused once draining (the accept loop closes its socket).
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(TcpStream::connect(addr).await.is_err());
    release_tx.send_replace(true);
    let resp = in_flight.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["connection"], "close");
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "late");
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn circuit_breakers_overflow_as_503_uo() {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let arrived = Arc::new(tokio::sync::Notify::new());
    let arrived2 = arrived.clone();
    let up = upstream(
        false,
        handler(move |_, _| {
            let mut rx = release_rx.clone();
            arrived2.notify_one();
            async move {
                let _ = rx.wait_for(|v| *v).await.map(|_| ());
                Response::new(full("done"))
            }
        }),
    )
    .await;
    let mut c = cluster("backend", &[up.addr], UpstreamProtocol::Http1);
    Arc::get_mut(&mut c).unwrap().circuit_breakers = Thresholds {
        max_connections: 1,
        max_pending_requests: 1,
        max_requests: 1024,
        max_retries: 3,
        retry_budget: None,
    };
    let cfg = bootstrap(
        vec![route("/", RouteAction::Forward(forward("backend")))],
        vec![c],
        CodecType::Auto,
    );
    let (server, addr) = start(cfg).await;
    // The first request holds the only connection; the second waits as the one pending
    // request; the third finds the pending queue full.
    let first = tokio::spawn(get(addr, "/1"));
    arrived.notified().await;
    let second = tokio::spawn(get(addr, "/2"));
    for _ in 0..500 {
        if stat(&server, "cluster.backend.upstream_rq_pending_active") == 1 {
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        stat(&server, "cluster.backend.upstream_rq_pending_active"),
        1
    );
    let (s, _, b) = get(addr, "/3").await;
    assert_eq!(s, 503);
    assert_eq!(
        b,
        "upstream connect error or disconnect/reset before headers. reset reason: overflow"
    );
    assert_eq!(
        stat(&server, "cluster.backend.upstream_rq_pending_overflow"),
        1
    );
    assert_eq!(stat(&server, "cluster.backend.upstream_cx_overflow"), 1);
    release_tx.send_replace(true);
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(second.await.unwrap().0, 200);
    // Both went over the one connection.
    assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn stream_idle_timeout_is_504_then_reset() {
    // Before response headers (request complete): 504 `stream timeout`, as Envoy 1.40.
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let black = tcp.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = tcp.accept().await {
            held.push(s);
        }
    });
    // After response headers: the body stalls, the stream is reset.
    let stall = upstream(
        false,
        handler(|_, _| async {
            let frames = futures_util::stream::iter(vec![Ok::<_, Infallible>(Frame::data(
                Bytes::from("partial"),
            ))]);
            let frames = futures_util::StreamExt::chain(frames, futures_util::stream::pending());
            Response::new(StreamBody::new(frames).boxed())
        }),
    )
    .await;
    let mut idle = forward("hole");
    idle.idle_timeout = Some(Duration::from_millis(150));
    let mut idle_body = forward("stall");
    idle_body.idle_timeout = Some(Duration::from_millis(150));
    let cfg = bootstrap(
        vec![
            route("/hole", RouteAction::Forward(idle)),
            route("/stall", RouteAction::Forward(idle_body)),
        ],
        vec![
            cluster("hole", &[black], UpstreamProtocol::Http1),
            cluster("stall", &[stall.addr], UpstreamProtocol::Http1),
        ],
        CodecType::Auto,
    );
    let (server, addr) = start(cfg).await;
    let (s, _, b) = get(addr, "/hole").await;
    assert_eq!(
        (s, b.as_ref()),
        (StatusCode::GATEWAY_TIMEOUT, &b"stream timeout"[..])
    );

    let mut tx = h1_client(addr).await;
    let req = Request::get("/stall")
        .header("host", "a")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.into_body().collect().await.is_err());
    assert_eq!(stat(&server, "http.ingress.downstream_rq_idle_timeout"), 2);
}

#[tokio::test]
async fn request_timeout_is_408_while_the_body_is_incomplete() {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let black = tcp.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = tcp.accept().await {
            held.push(s);
        }
    });
    let mut cfg = bootstrap(
        vec![route("/", RouteAction::Forward(forward("hole")))],
        vec![cluster("hole", &[black], UpstreamProtocol::Http1)],
        CodecType::Auto,
    );
    let l = Arc::get_mut(&mut cfg.listeners[0]).unwrap();
    Arc::get_mut(&mut l.hcm).unwrap().request_timeout = Some(Duration::from_millis(200));
    let (server, addr) = start(cfg).await;
    // Headers promise a body that never comes.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.ends_with("request timeout"), "{text}");
    assert_eq!(stat(&server, "http.ingress.downstream_rq_timeout"), 1);
}

#[tokio::test]
async fn oversized_request_headers_are_431() {
    let up = upstream(false, echo_headers()).await;
    let cfg = bootstrap(
        vec![route("/", RouteAction::Forward(forward("backend")))],
        vec![cluster("backend", &[up.addr], UpstreamProtocol::Http1)],
        CodecType::Auto,
    );
    let (_server, addr) = start(cfg).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let big = "x".repeat(70 * 1024);
    let req = format!("GET / HTTP/1.1\r\nhost: a\r\nx-big: {big}\r\n\r\n");
    // The proxy may answer before reading everything; a write error is fine then.
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn access_log_records_the_stream() {
    let up = upstream(false, echo_headers()).await;
    let dead = closed_port().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut cfg = bootstrap(
        vec![
            route("/dead", RouteAction::Forward(forward("dead"))),
            route("/ok", RouteAction::Forward(forward("backend"))),
        ],
        vec![
            cluster("backend", &[up.addr], UpstreamProtocol::Http1),
            cluster("dead", &[dead], UpstreamProtocol::Http1),
        ],
        CodecType::Auto,
    );
    use FormatToken as T;
    let sp = || T::Literal(" ".into());
    let l = Arc::get_mut(&mut cfg.listeners[0]).unwrap();
    Arc::get_mut(&mut l.hcm).unwrap().access_logs = vec![AccessLog {
        sink: AccessLogSink::File(path.clone()),
        format: LogFormat::Text(vec![
            T::ResponseCode,
            sp(),
            T::ResponseFlags,
            sp(),
            T::BytesReceived,
            sp(),
            T::BytesSent,
            sp(),
            T::UpstreamCluster,
            sp(),
            T::UpstreamHost,
            sp(),
            T::ResponseCodeDetails,
            T::Literal("\n".into()),
        ]),
    }];
    let (server, addr) = start(cfg).await;
    let mut tx = h1_client(addr).await;
    let req = Request::post("/ok")
        .header("host", "a")
        .body(Full::new(Bytes::from("hello")))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    resp.into_body().collect().await.unwrap();
    get(addr, "/nowhere").await;
    get(addr, "/dead").await;
    server.shutdown();
    server.wait().await;
    let log = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 3, "{log}");
    assert_eq!(
        lines[0],
        format!("200 - 5 2 backend {} via_upstream", up.addr)
    );
    assert_eq!(lines[1], "404 NR 0 0 - - route_not_found");
    assert_eq!(
        lines[2],
        format!(
            "503 UF 0 98 dead {dead} upstream_reset_before_response_started{{remote_connection_failure|delayed_connect_error:_Connection_refused}}"
        )
    );
}

#[tokio::test]
async fn idle_upstream_connections_are_closed() {
    let up = upstream(false, echo_headers()).await;
    let mut c = cluster("backend", &[up.addr], UpstreamProtocol::Http1);
    Arc::get_mut(&mut c).unwrap().idle_timeout = Some(Duration::from_millis(100));
    let cfg = bootstrap(
        vec![route("/", RouteAction::Forward(forward("backend")))],
        vec![c],
        CodecType::Auto,
    );
    let (server, addr) = start(cfg).await;
    assert_eq!(get(addr, "/").await.0, 200);
    // Bounded wait for the reaper (no event to wait on from outside the proxy).
    for _ in 0..300 {
        if stat(&server, "cluster.backend.upstream_cx_idle_timeout") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stat(&server, "cluster.backend.upstream_cx_idle_timeout"), 1);
    assert_eq!(stat(&server, "cluster.backend.upstream_cx_active"), 0);
    assert_eq!(get(addr, "/").await.0, 200);
    assert_eq!(up.accepts.load(Ordering::SeqCst), 2);
}
