//! Active health checks (HTTP, TCP, gRPC) and outlier detection as a client and `/clusters` see
//! them: real upstreams on loopback, the real `strait` binary, bounded polling of the admin API.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::{Client, Config, Reply, Upstream};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn endpoints(addrs: &[SocketAddr]) -> Value {
    let eps: Vec<Value> = addrs
        .iter()
        .map(|a| {
            json!({"endpoint": {"address": {"socket_address": {
                "address": a.ip().to_string(), "port_value": a.port()
            }}}})
        })
        .collect();
    json!({"cluster_name": "c", "endpoints": [{"lb_endpoints": eps}]})
}

fn cluster(addrs: &[SocketAddr], extra: Value) -> Value {
    let mut c = json!({
        "name": "c",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": endpoints(addrs),
    });
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

async fn start(cluster: Value, route: Value) -> common::Strait {
    let mut route = route;
    route["cluster"] = json!("c");
    Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": route}]))
        .cluster_json(cluster)
        .start()
        .await
}

/// `health_flags` of each host in `/clusters` text, by address.
async fn flags(strait: &common::Strait) -> Vec<(String, String)> {
    let text = strait.admin_get("/clusters").await.text();
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("c::")?;
            let (addr, v) = rest.split_once("::health_flags::")?;
            Some((addr.to_string(), v.to_string()))
        })
        .collect()
}

/// Polls `/clusters` (bounded) until `addr`'s health flags satisfy `want`.
async fn wait_flags(
    strait: &common::Strait,
    addr: SocketAddr,
    want: impl Fn(&str) -> bool,
) -> String {
    let a = addr.to_string();
    let mut last = String::new();
    for _ in 0..200 {
        if let Some((_, f)) = flags(strait).await.into_iter().find(|(x, _)| *x == a) {
            if want(&f) {
                return f;
            }
            last = f;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{addr}: health flags never matched; last {last:?}");
}

async fn spread(strait: &common::Strait, n: usize) -> std::collections::HashMap<String, usize> {
    let client = Client::http1();
    let mut m = std::collections::HashMap::new();
    for _ in 0..n {
        let r = client.get(&strait.url("/x")).await;
        let who = format!("{}:{}", r.status.as_u16(), r.upstream().unwrap_or("-"));
        *m.entry(who).or_default() += 1;
    }
    m
}

fn http_hc(extra: Value) -> Value {
    let mut hc = json!({
        "timeout": "1s", "interval": "0.05s", "unhealthy_threshold": 2, "healthy_threshold": 2,
        "no_traffic_interval": "0.05s", "http_health_check": {"path": "/healthz"}
    });
    if let (Some(h), Some(e)) = (hc.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            h.insert(k.clone(), v.clone());
        }
    }
    hc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_removes_and_restores_a_host() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let strait = start(
        cluster(
            &[a.addr, b.addr],
            json!({"health_checks": [http_hc(json!({}))]}),
        ),
        json!({}),
    )
    .await;
    // Warming: both hosts passed their first check before the listener accepted.
    assert_eq!(
        wait_flags(&strait, a.addr, |f| f == "healthy").await,
        "healthy"
    );
    let seen = a.seen();
    let check = seen
        .iter()
        .find(|s| s.path == "/healthz")
        .expect("a was checked");
    assert_eq!(
        check.authority.as_deref(),
        Some("c"),
        "Host defaults to the cluster name"
    );
    assert_eq!(
        check
            .headers
            .get("user-agent")
            .and_then(|v| v.to_str().ok()),
        Some("Envoy/HC")
    );

    // A non-retriable status fails the host at once (Envoy's ACTIVE failure).
    a.set_default(Reply::Status(503));
    wait_flags(&strait, a.addr, |f| f.contains("/failed_active_hc")).await;
    let m = spread(&strait, 20).await;
    assert_eq!(m.get("200:b"), Some(&20), "{m:?}");

    // Back after healthy_threshold (2) passing checks.
    a.set_default(Reply::Echo);
    wait_flags(&strait, a.addr, |f| f == "healthy").await;
    let m = spread(&strait, 20).await;
    assert_eq!(m.get("200:a"), Some(&10), "{m:?}");
    assert_eq!(m.get("200:b"), Some(&10), "{m:?}");
    let stats = strait.stats().await;
    assert!(stats["cluster.c.health_check.attempt"] >= 6, "{stats:?}");
    assert!(stats["cluster.c.health_check.failure"] >= 1);
    assert!(stats["cluster.c.health_check.success"] >= 4);
    assert_eq!(stats["cluster.c.health_check.healthy"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_headers_degraded_and_immediate_fail() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let strait = start(
        cluster(
            &[a.addr, b.addr],
            json!({"health_checks": [http_hc(json!({"http_health_check": {"path": "/healthz",
                "expected_statuses": [{"start": 200, "end": 300}],
                "retriable_statuses": [{"start": 429, "end": 430}]}}))]}),
        ),
        json!({}),
    )
    .await;
    wait_flags(&strait, a.addr, |f| f == "healthy").await;
    a.set_default(Reply::Full {
        status: 200,
        headers: vec![("x-envoy-degraded".into(), "1".into())],
        body: Bytes::new(),
    });
    wait_flags(&strait, a.addr, |f| f.contains("/degraded_active_hc")).await;
    // Envoy's degraded load: 1 healthy of 2 gives the priority 70 % healthy load; the other
    // 30 % goes to its degraded hosts (binomial, n = 100: far from both bounds).
    let m = spread(&strait, 100).await;
    let to_a = m.get("200:a").copied().unwrap_or(0);
    assert!((10..=50).contains(&to_a), "{m:?}");

    a.set_default(Reply::Full {
        status: 503,
        headers: vec![("x-envoy-immediate-health-check-fail".into(), "".into())],
        body: Bytes::new(),
    });
    let f = wait_flags(&strait, a.addr, |f| f.contains("/failed_active_hc")).await;
    assert!(f.contains("/excluded_via_immediate_hc_fail"), "{f}");

    // A retriable status counts toward unhealthy_threshold instead of failing at once.
    b.set_default(Reply::Status(429));
    wait_flags(&strait, b.addr, |f| f.contains("/failed_active_hc")).await;
    let stats = strait.stats().await;
    assert!(stats["cluster.c.health_check.failure"] >= 3, "{stats:?}");
}

/// A raw TCP server: answers `PONG` to `PING` when `good`, else `NOPE`.
async fn pinger(good: bool) -> SocketAddr {
    let l = common::bind().await;
    let addr = common::local_addr(&l);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let reply: &[u8] = if good { b"..PONG.." } else { b"NOPE" };
                    if s.write_all(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_checks_connect_and_payloads() {
    let good = pinger(true).await;
    let bad = pinger(false).await;
    let closed = common::closed_port().await;
    let strait = start(
        cluster(
            &[good, bad, closed],
            json!({"health_checks": [{
                "timeout": "0.2s", "interval": "0.05s", "unhealthy_threshold": 1,
                "healthy_threshold": 1, "no_traffic_interval": "0.05s",
                "tcp_health_check": {"send": {"text": "50494E47"}, "receive": [{"text": "504F4E47"}]}
            }]}),
        ),
        json!({}),
    )
    .await;
    assert_eq!(
        wait_flags(&strait, good, |f| f == "healthy").await,
        "healthy"
    );
    // A wrong reply is not a failure by itself: Envoy keeps waiting for a match until the
    // check times out (NETWORK_TIMEOUT, hence `/active_hc_timeout`); a refused connect fails
    // at once.
    wait_flags(&strait, bad, |f| f == "/failed_active_hc/active_hc_timeout").await;
    wait_flags(&strait, closed, |f| f == "/failed_active_hc").await;
    let stats = strait.stats().await;
    assert!(
        stats["cluster.c.health_check.network_failure"] >= 2,
        "{stats:?}"
    );
    assert_eq!(stats["cluster.c.health_check.healthy"], 1);
}

/// An h2c server implementing `grpc.health.v1.Health/Check`: SERVING for service `ok`, else
/// NOT_SERVING.
async fn grpc_health_server() -> SocketAddr {
    let l = common::bind().await;
    let addr = common::local_addr(&l);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let ok_path = req.uri().path() == "/grpc.health.v1.Health/Check";
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        // Request: 5-byte prefix, then field 1 (service) = "ok" for the good service.
                        let serving = ok_path && body.get(5..) == Some(&[0x0a, 2, b'o', b'k'][..]);
                        let status: u8 = if serving { 1 } else { 2 };
                        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
                            Ok(Frame::data(Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]))),
                            Ok(Frame::trailers({
                                let mut t = http::HeaderMap::new();
                                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                                t
                            })),
                        ];
                        let body = StreamBody::new(futures_util::stream::iter(frames));
                        hyper::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(body)
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_checks_service_name() {
    let srv = grpc_health_server().await;
    let hc = |name: &str| {
        json!({"timeout": "1s", "interval": "0.05s", "unhealthy_threshold": 1,
               "healthy_threshold": 1, "no_traffic_interval": "0.05s",
               "grpc_health_check": {"service_name": name}})
    };
    let strait = start(
        cluster(&[srv], json!({"health_checks": [hc("ok")]})),
        json!({}),
    )
    .await;
    assert_eq!(
        wait_flags(&strait, srv, |f| f == "healthy").await,
        "healthy"
    );
    drop(strait);
    let strait = start(
        cluster(&[srv], json!({"health_checks": [hc("other")]})),
        json!({}),
    )
    .await;
    wait_flags(&strait, srv, |f| f == "/failed_active_hc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_5xx_ejects_and_reports() {
    let a = Upstream::start_with("a", Reply::Status(503)).await;
    let b = Upstream::start("b").await;
    let strait = start(
        cluster(
            &[a.addr, b.addr],
            json!({"outlier_detection": {"consecutive_5xx": 3, "max_ejection_percent": 50,
                    "interval": "60s"}}),
        ),
        json!({}),
    )
    .await;
    let m = spread(&strait, 20).await;
    // Round robin sends every other request to `a` until its third 503 ejects it.
    assert_eq!(m.get("503:a"), Some(&3), "{m:?}");
    assert_eq!(m.get("200:b"), Some(&17), "{m:?}");
    let f = wait_flags(&strait, a.addr, |f| f.contains("/failed_outlier_check")).await;
    assert_eq!(f, "/failed_outlier_check");
    let stats = strait.stats().await;
    assert_eq!(
        stats["cluster.c.outlier_detection.ejections_enforced_consecutive_5xx"],
        1
    );
    assert_eq!(
        stats["cluster.c.outlier_detection.ejections_detected_consecutive_5xx"],
        1
    );
    assert_eq!(stats["cluster.c.outlier_detection.ejections_active"], 1);
    let j = strait.admin_get("/clusters?format=json").await.json();
    let hosts = &j["cluster_statuses"][0]["host_statuses"];
    let ejected = hosts.as_array().and_then(|h| {
        h.iter()
            .find(|h| h["health_status"]["failed_outlier_check"] == json!(true))
    });
    assert!(ejected.is_some(), "{j}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_check_success_unejects() {
    // `a` fails all traffic with 500 but passes its check (any status is expected): the 5xx
    // streak ejects it, the next passing check lifts the ejection at once.
    let a = Upstream::start_with("a", Reply::Status(500)).await;
    let b = Upstream::start("b").await;
    let strait = start(
        cluster(
            &[a.addr, b.addr],
            json!({
                "outlier_detection": {"consecutive_5xx": 2, "max_ejection_percent": 50,
                    "interval": "60s", "base_ejection_time": "60s"},
                "health_checks": [http_hc(json!({"interval": "0.2s", "no_traffic_interval": "0.2s",
                    "healthy_threshold": 1, "http_health_check": {"path": "/healthz",
                    "expected_statuses": [{"start": 200, "end": 600}]}}))],
            }),
        ),
        json!({}),
    )
    .await;
    wait_flags(&strait, a.addr, |f| f == "healthy").await;
    let client = Client::http1();
    for _ in 0..4 {
        let _ = client.get(&strait.url("/x")).await;
    }
    assert_eq!(
        strait
            .stat("cluster.c.outlier_detection.ejections_enforced_consecutive_5xx")
            .await,
        Some(1)
    );
    wait_flags(&strait, a.addr, |f| f == "healthy").await;
    assert_eq!(
        strait
            .stat("cluster.c.outlier_detection.ejections_active")
            .await,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_headers_and_grpc_status() {
    let a = Upstream::start("a").await;
    let strait = start(cluster(&[a.addr], json!({})), json!({})).await;
    let client = Client::http1();
    // No route policy: the request's x-envoy-retry-on asks for one retry.
    a.script([Reply::Status(503)]);
    let r = client
        .get_with(&strait.url("/h"), &[("x-envoy-retry-on", "5xx")])
        .await;
    assert_eq!(r.status, 200);
    a.script([Reply::Status(503), Reply::Status(503), Reply::Status(503)]);
    let r = client
        .get_with(
            &strait.url("/h"),
            &[("x-envoy-retry-on", "5xx"), ("x-envoy-max-retries", "3")],
        )
        .await;
    assert_eq!(r.status, 200);
    // A trailers-only gRPC answer with grpc-status 14 is retried under `unavailable`.
    a.script([Reply::Full {
        status: 200,
        headers: vec![("grpc-status".into(), "14".into())],
        body: Bytes::new(),
    }]);
    let r = client
        .get_with(
            &strait.url("/g"),
            &[("x-envoy-retry-grpc-on", "unavailable")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.upstream(), Some("a"));
    assert!(
        r.header("grpc-status").is_none(),
        "the retry's answer is returned"
    );
    assert_eq!(
        strait.wait_stat("cluster.c.upstream_rq_retry", 5).await,
        Some(5)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_hosts_retries_elsewhere() {
    let bad = Upstream::start_with("bad", Reply::Status(503)).await;
    let g1 = Upstream::start("g1").await;
    let g2 = Upstream::start("g2").await;
    let strait = start(
        cluster(&[bad.addr, g1.addr, g2.addr], json!({"lb_policy": "RANDOM"})),
        json!({"retry_policy": {"retry_on": "5xx", "num_retries": 1,
            "host_selection_retry_max_attempts": 10,
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}]}}),
    )
    .await;
    let m = spread(&strait, 60).await;
    // Random picks may land on `bad` twice in a row; previous_hosts re-picks (up to 10 times).
    assert_eq!(m.get("503:bad"), None, "{m:?}");
    assert!(bad.requests() > 5, "bad was picked first some of the time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breakers_per_routing_priority() {
    let a = Upstream::start_with(
        "a",
        Reply::Delay(Duration::from_millis(300), Box::new(Reply::Echo)),
    )
    .await;
    let c = cluster(
        &[a.addr],
        json!({"circuit_breakers": {"thresholds": [
            {"priority": "DEFAULT", "max_requests": 1},
            {"priority": "HIGH", "max_requests": 5},
        ]}}),
    );
    let strait = Config::new()
        .routes(json!([
            {"match": {"prefix": "/high"}, "route": {"cluster": "c", "priority": "HIGH"}},
            {"match": {"prefix": "/"}, "route": {"cluster": "c"}},
        ]))
        .cluster_json(c)
        .start()
        .await;
    let text = strait.admin_get("/clusters").await.text();
    assert!(text.contains("c::high_priority::max_requests::5"), "{text}");
    assert!(
        text.contains("c::default_priority::max_requests::1"),
        "{text}"
    );
    let client = Client::http1();
    let burst = |path: &'static str| {
        let client = client.clone();
        let url = strait.url(path);
        async move {
            let reqs = (0..3).map(|_| client.get(&url));
            futures_util::future::join_all(reqs)
                .await
                .into_iter()
                .map(|r| r.status.as_u16())
                .collect::<Vec<_>>()
        }
    };
    let high = burst("/high").await;
    assert_eq!(high, [200, 200, 200]);
    let mut default = burst("/d").await;
    default.sort_unstable();
    assert_eq!(default, [200, 503, 503]);
    assert_eq!(
        strait
            .wait_stat("cluster.c.upstream_rq_pending_overflow", 2)
            .await,
        Some(2)
    );
}

/// A proxied answer with `x-envoy-immediate-health-check-fail` takes the host out at once, as
/// Envoy's router does: `/excluded_via_immediate_hc_fail`, `health_check.passive_failure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_fail_header_in_a_response_is_a_passive_failure() {
    let a = Upstream::start("a").await;
    let b = Upstream::start_with(
        "b",
        Reply::Full {
            status: 200,
            headers: vec![("x-envoy-immediate-health-check-fail".into(), "true".into())],
            body: Bytes::from_static(b"going away"),
        },
    )
    .await;
    // `b` passes its first (and, with a 10 s interval, only) check.
    b.script([Reply::Echo]);
    let hc = http_hc(json!({"interval": "10s", "no_traffic_interval": "10s"}));
    let strait = start(
        cluster(&[a.addr, b.addr], json!({"health_checks": [hc]})),
        json!({}),
    )
    .await;
    let client = Client::http1();
    let mut reached_b = false;
    for _ in 0..10 {
        let r = client.get(&strait.url("/x")).await;
        assert_eq!(r.status, 200);
        if r.upstream() == Some("b") {
            reached_b = true;
            break;
        }
    }
    assert!(reached_b, "round robin never reached b");
    let f = wait_flags(&strait, b.addr, |f| f != "healthy").await;
    assert_eq!(f, "/failed_active_hc/excluded_via_immediate_hc_fail");
    let m = spread(&strait, 20).await;
    assert_eq!(m.get("200:a"), Some(&20), "{m:?}");
    assert_eq!(
        strait
            .wait_stat("cluster.c.health_check.passive_failure", 1)
            .await,
        Some(1)
    );
    assert_eq!(strait.stat("cluster.c.health_check.failure").await, Some(1));
}

/// `service_name_matcher`: a passing answer must name the cluster in
/// `x-envoy-upstream-healthchecked-cluster`; each verification counts in
/// `health_check.verify_cluster`, and a host that does not say it fails its check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_name_matcher_verifies_the_checked_cluster() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    a.script([Reply::Full {
        status: 200,
        headers: vec![(
            "x-envoy-upstream-healthchecked-cluster".into(),
            "svc-a".into(),
        )],
        body: Bytes::new(),
    }]);
    let hc = http_hc(json!({"interval": "10s", "no_traffic_interval": "10s",
        "http_health_check": {"path": "/healthz",
                              "service_name_matcher": {"prefix": "svc"}}}));
    let strait = start(
        cluster(&[a.addr, b.addr], json!({"health_checks": [hc]})),
        json!({}),
    )
    .await;
    assert_eq!(
        wait_flags(&strait, b.addr, |f| f != "healthy").await,
        "/failed_active_hc"
    );
    assert_eq!(
        wait_flags(&strait, a.addr, |f| f == "healthy").await,
        "healthy"
    );
    let m = spread(&strait, 10).await;
    assert_eq!(m.get("200:a"), Some(&10), "{m:?}");
    assert_eq!(
        strait
            .wait_stat("cluster.c.health_check.verify_cluster", 2)
            .await,
        Some(2)
    );
}
