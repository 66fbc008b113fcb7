//! Header hygiene as the upstream and the client see it: hop-by-hop headers removed,
//! x-forwarded-for / x-forwarded-proto, x-request-id, x-envoy-upstream-service-time, Host kept.

mod common;

use bytes::Bytes;
use common::{Client, Config, Reply, Upstream};
use serde_json::json;

async fn proxy(up: &Upstream, use_remote_address: bool) -> common::Strait {
    Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
        .cluster("up", &[up.addr])
        .hcm("use_remote_address", json!(use_remote_address))
        .start()
        .await
}

fn values(seen: &common::Seen, name: &str) -> Vec<String> {
    seen.headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up, false).await;
    let r = Client::http1()
        .get_with(
            &strait.url("/"),
            &[
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("te", "trailers"),
                ("x-end-to-end", "kept"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = up.last_seen();
    for gone in [
        "connection",
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(values(&seen, gone).is_empty(), "{gone}: {:?}", seen.headers);
    }
    assert_eq!(values(&seen, "te"), ["trailers"], "TE: trailers is kept");
    assert_eq!(values(&seen, "x-end-to-end"), ["kept"]);

    Client::http1()
        .get_with(&strait.url("/"), &[("te", "gzip")])
        .await;
    assert!(
        values(&up.last_seen(), "te").is_empty(),
        "TE other than trailers is removed"
    );
}

/// An HTTP/1.1 upstream's hop-by-hop response headers stop at the proxy: `Connection`,
/// `Keep-Alive` and `Proxy-Connection`. As in Envoy (unlike on requests, and unlike RFC 9110
/// §7.6.1), a header that `Connection` names goes on, as do end-to-end ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_response_headers_are_removed() {
    use tokio::io::AsyncWriteExt;
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
        .cluster("up", &[up.local_addr().unwrap()])
        .start()
        .await;
    let upstream = tokio::spawn(async move {
        let (mut c, _) = up.accept().await.unwrap();
        common::read_request_head(&mut c).await;
        c.write_all(
            b"HTTP/1.1 200 OK\r\nConnection: x-hop, keep-alive\r\nX-Hop: 1\r\n\
              Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-End: kept\r\n\
              Content-Length: 2\r\n\r\nok",
        )
        .await
        .unwrap();
        c
    });
    let r = Client::http1().get(&strait.url("/")).await;
    let _conn = upstream.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, Bytes::from_static(b"ok"));
    for gone in ["connection", "keep-alive", "proxy-connection"] {
        assert!(r.headers.get(gone).is_none(), "{gone}: {:?}", r.headers);
    }
    for (kept, value) in [("x-end", "kept"), ("x-hop", "1")] {
        assert_eq!(
            r.headers.get(kept).map(|v| v.as_bytes()),
            Some(value.as_bytes()),
            "{kept}: {:?}",
            r.headers
        );
    }
}

/// The address Envoy appends for this test's peer. Envoy records a loopback peer as the
/// proxy's own (first non-loopback) address, so accept either form, but exactly one IP.
fn appended_ip(xff: &str, before: &str) -> std::net::IpAddr {
    let rest = xff
        .strip_prefix(before)
        .unwrap_or_else(|| panic!("x-forwarded-for {xff:?} should start with {before:?}"));
    rest.parse()
        .unwrap_or_else(|e| panic!("x-forwarded-for {xff:?}: appended {rest:?} is no IP: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_with_use_remote_address() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up, true).await;
    let client = Client::http1();
    client.get(&strait.url("/")).await;
    let seen = up.last_seen();
    let xff = values(&seen, "x-forwarded-for");
    assert_eq!(xff.len(), 1, "{xff:?}");
    let ip = appended_ip(&xff[0], "");
    assert_eq!(values(&seen, "x-forwarded-proto"), ["http"]);

    client
        .get_with(&strait.url("/"), &[("x-forwarded-for", "203.0.113.7")])
        .await;
    let xff = values(&up.last_seen(), "x-forwarded-for");
    assert_eq!(xff.len(), 1, "{xff:?}");
    assert_eq!(appended_ip(&xff[0], "203.0.113.7,"), ip);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_untouched_without_use_remote_address() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up, false).await;
    let client = Client::http1();
    client
        .get_with(&strait.url("/"), &[("x-forwarded-for", "203.0.113.7")])
        .await;
    let seen = up.last_seen();
    assert_eq!(values(&seen, "x-forwarded-for"), ["203.0.113.7"]);
    assert_eq!(values(&seen, "x-forwarded-proto"), ["http"]);
    client.get(&strait.url("/")).await;
    assert!(values(&up.last_seen(), "x-forwarded-for").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_generated_or_kept() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up, false).await;
    let client = Client::http1();
    client.get(&strait.url("/")).await;
    let id = values(&up.last_seen(), "x-request-id");
    assert_eq!(id.len(), 1);
    let uuid =
        regex::Regex::new("^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
            .unwrap_or_else(|e| panic!("{e}"));
    assert!(uuid.is_match(&id[0]), "not a UUID v4: {}", id[0]);

    client.get(&strait.url("/")).await;
    let id2 = values(&up.last_seen(), "x-request-id");
    assert_ne!(id, id2, "a fresh id per request");

    client
        .get_with(&strait.url("/"), &[("x-request-id", "my-own-id")])
        .await;
    assert_eq!(values(&up.last_seen(), "x-request-id"), ["my-own-id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_service_time_and_host() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up, false).await;
    let r = Client::http1()
        .get_with(&strait.url("/"), &[("host", "svc.example:1234")])
        .await;
    let ust = r
        .header("x-envoy-upstream-service-time")
        .unwrap_or_default();
    assert!(
        ust.parse::<u64>().is_ok(),
        "x-envoy-upstream-service-time: {ust:?}"
    );
    assert_eq!(
        up.last_seen().authority.as_deref(),
        Some("svc.example:1234")
    );

    // Local replies are not from an upstream: no service time.
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]))
        .start()
        .await;
    let r = Client::http1().get(&strait.url("/")).await;
    assert_eq!(r.header("x-envoy-upstream-service-time"), None);
}

/// The router's `x-envoy-*` headers (`x-envoy-expected-rq-timeout-ms` and, on a rewritten path,
/// `x-envoy-original-path` upstream; `x-envoy-upstream-service-time` downstream) are added by
/// default and left out with the router's `suppress_envoy_headers`; the connection manager's
/// own (`x-request-id`, `x-forwarded-proto`) stay either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppress_envoy_headers_leaves_out_the_routers_headers() {
    let up = Upstream::start("up").await;
    for suppress in [false, true] {
        let strait = Config::new()
            .routes(json!([{"match": {"prefix": "/old/"},
                            "route": {"cluster": "up", "prefix_rewrite": "/new/", "timeout": "5s"}}]))
            .cluster("up", &[up.addr])
            .hcm(
                "http_filters",
                json!([{
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                        "suppress_envoy_headers": suppress
                    }
                }]),
            )
            .start()
            .await;
        let r = Client::http1().get(&strait.url("/old/x")).await;
        assert_eq!(r.status, 200);
        let seen = up.last_seen();
        assert_eq!(seen.path, "/new/x");
        let envoy = |name: &str| values(&seen, name);
        if suppress {
            assert!(
                envoy("x-envoy-expected-rq-timeout-ms").is_empty(),
                "{:?}",
                seen.headers
            );
            assert!(
                envoy("x-envoy-original-path").is_empty(),
                "{:?}",
                seen.headers
            );
            assert_eq!(r.header("x-envoy-upstream-service-time"), None);
        } else {
            assert_eq!(envoy("x-envoy-expected-rq-timeout-ms"), ["5000"]);
            assert_eq!(envoy("x-envoy-original-path"), ["/old/x"]);
            assert!(r.header("x-envoy-upstream-service-time").is_some());
        }
        assert_eq!(envoy("x-forwarded-proto"), ["http"], "suppress: {suppress}");
        assert_eq!(envoy("x-request-id").len(), 1, "suppress: {suppress}");
    }
}

/// Envoy's `server` response header: `server_header_transformation` OVERWRITE (the default)
/// writes `server_name` (default `envoy`) on every response, proxied or local;
/// APPEND_IF_ABSENT keeps the upstream's; PASS_THROUGH leaves the header as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_header_follows_the_transformation() {
    let with = Upstream::start_with(
        "with",
        Reply::Full {
            status: 200,
            headers: vec![("server".into(), "upstream/1".into())],
            body: Bytes::new(),
        },
    )
    .await;
    let bare = Upstream::start("bare").await;
    let two = Upstream::start_with(
        "two",
        Reply::Full {
            status: 200,
            headers: vec![
                ("server".into(), "upstream/1".into()),
                ("server".into(), "upstream/2".into()),
            ],
            body: Bytes::new(),
        },
    )
    .await;
    // (server_header_transformation, server_name, `server` seen on /with, /bare, /local, /none)
    type Case<'a> = (Option<&'a str>, Option<&'a str>, [Option<&'a str>; 4]);
    let cases: [Case; 4] = [
        (None, None, [Some("envoy"); 4]),
        (Some("OVERWRITE"), Some("edge-7"), [Some("edge-7"); 4]),
        (
            Some("APPEND_IF_ABSENT"),
            Some("edge-7"),
            [
                Some("upstream/1"),
                Some("edge-7"),
                Some("edge-7"),
                Some("edge-7"),
            ],
        ),
        (
            Some("PASS_THROUGH"),
            None,
            [Some("upstream/1"), None, None, None],
        ),
    ];
    // Without an access log the HTTP/1.1 codec writes an overwritten `server` itself.
    for ((transformation, name, want), logged) in
        cases.into_iter().flat_map(|c| [(c, true), (c, false)])
    {
        let mut config = Config::new()
            .routes(json!([
                {"match": {"prefix": "/with"}, "route": {"cluster": "with"}},
                {"match": {"prefix": "/bare"}, "route": {"cluster": "bare"}},
                {"match": {"prefix": "/two"}, "route": {"cluster": "two"}},
                {"match": {"prefix": "/local"}, "direct_response": {"status": 200}},
            ]))
            .cluster("with", &[with.addr])
            .cluster("bare", &[bare.addr])
            .cluster("two", &[two.addr]);
        if !logged {
            config = config.access_logs(Vec::new());
        }
        if let Some(t) = transformation {
            config = config.hcm("server_header_transformation", json!(t));
        }
        if let Some(n) = name {
            config = config.hcm("server_name", json!(n));
        }
        let strait = config.start().await;
        // The last path matches no route: a 404 local reply.
        for (path, want) in ["/with", "/bare", "/local", "/none"].into_iter().zip(want) {
            for client in [Client::http1(), Client::h2c()] {
                let r = client.get(&strait.url(path)).await;
                let what = format!(
                    "{transformation:?} {name:?} {path} {:?} {logged}",
                    r.version
                );
                assert_eq!(r.header("server"), want, "{what}");
                assert_eq!(
                    r.headers.get_all("server").iter().count(),
                    usize::from(want.is_some()),
                    "{what}"
                );
            }
        }
        // Overwritten, an upstream's two lines become one.
        if matches!(transformation, None | Some("OVERWRITE")) {
            for client in [Client::http1(), Client::h2c()] {
                let r = client.get(&strait.url("/two")).await;
                let got: Vec<_> = r.headers.get_all("server").iter().collect();
                assert_eq!(
                    got,
                    [want[0].unwrap_or_default()],
                    "{transformation:?} {logged}"
                );
            }
        }
    }
}

/// The router sets `x-envoy-expected-rq-timeout-ms` upstream and `x-envoy-upstream-service-time`
/// downstream: one value each, its own, whatever the client or the upstream brought, over
/// HTTP/1.1 and h2c; a route's `response_headers_to_remove` still takes the service time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_headers_replace_earlier_ones() {
    let up = Upstream::start_with(
        "up",
        Reply::Full {
            status: 200,
            headers: vec![("x-envoy-upstream-service-time".into(), "999999".into())],
            body: Bytes::new(),
        },
    )
    .await;
    // Sends no service time of its own.
    let plain = Upstream::start("plain").await;
    // With no access log the HTTP/1.1 codecs write these headers themselves; with one, the
    // headers are in the maps the log reads.
    for logged in [false, true] {
        let mut config = Config::new()
            .routes(json!([
                {"match": {"prefix": "/plain"}, "route": {"cluster": "plain", "timeout": "5s"}},
                {"match": {"prefix": "/no-timeout"}, "route": {"cluster": "plain", "timeout": "5s"},
                 "request_headers_to_remove": ["x-envoy-expected-rq-timeout-ms"]},
                {"match": {"prefix": "/removed"}, "route": {"cluster": "plain", "timeout": "5s"},
                 "response_headers_to_remove": ["x-envoy-upstream-service-time"]},
                {"match": {"prefix": "/"}, "route": {"cluster": "up", "timeout": "5s"}}
            ]))
            .cluster("up", &[up.addr])
            .cluster("plain", &[plain.addr]);
        if !logged {
            config = config.access_logs(Vec::new());
        }
        let strait = config.start().await;
        router_headers_replace_earlier_ones_on(&up, &plain, &strait, logged).await;
    }
}

async fn router_headers_replace_earlier_ones_on(
    up: &Upstream,
    plain: &Upstream,
    strait: &common::Strait,
    logged: bool,
) {
    for (proto, client) in [("HTTP/1.1", Client::http1()), ("h2c", Client::h2c())] {
        let proto = format!("{proto}, logged: {logged}");
        let r = client
            .get_with(&strait.url("/"), &[("x-envoy-expected-rq-timeout-ms", "1")])
            .await;
        assert_eq!(r.status, 200, "{proto}");
        assert_eq!(
            values(&up.last_seen(), "x-envoy-expected-rq-timeout-ms"),
            ["5000"],
            "{proto}"
        );
        let ust: Vec<&str> = r
            .headers
            .get_all("x-envoy-upstream-service-time")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(ust.len(), 1, "{proto}: {ust:?}");
        assert!(
            ust[0].parse::<u64>().is_ok_and(|ms| ms < 5000),
            "{proto}: the upstream's own value is replaced: {ust:?}"
        );

        // An upstream without one: Strait's own, once (without an access log, the HTTP/1.1
        // codec writes it).
        let r = client.get(&strait.url("/plain")).await;
        assert_eq!(r.upstream(), Some("plain"), "{proto}");
        let ust: Vec<&str> = r
            .headers
            .get_all("x-envoy-upstream-service-time")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert!(
            ust.len() == 1 && ust[0].parse::<u64>().is_ok_and(|ms| ms < 5000),
            "{proto}: {ust:?}"
        );

        // The router sets it before the route's header mutations, which may remove it.
        client.get(&strait.url("/no-timeout")).await;
        assert_eq!(
            values(&plain.last_seen(), "x-envoy-expected-rq-timeout-ms"),
            Vec::<String>::new(),
            "{proto}"
        );

        let r = client.get(&strait.url("/removed")).await;
        assert_eq!(r.upstream(), Some("plain"), "{proto}");
        assert_eq!(r.header("x-envoy-upstream-service-time"), None, "{proto}");
    }
}

/// Envoy times `x-envoy-upstream-service-time` from the end of the downstream request, so a
/// response that arrives while the client is still sending its body has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_service_time_on_a_response_before_the_request_ends() {
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, StreamBody};

    // Answers without reading the request body.
    let up = Upstream::start_with("up", Reply::Status(200)).await;
    for logged in [false, true] {
        let mut config = Config::new()
            .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
            .cluster("up", &[up.addr]);
        if !logged {
            config = config.access_logs(Vec::new());
        }
        let strait = config.start().await;
        // One chunk, then a body that never ends.
        let chunk: Result<hyper::body::Frame<Bytes>, common::BoxError> =
            Ok(hyper::body::Frame::data(Bytes::from_static(b"partial")));
        let body = BodyExt::boxed(StreamBody::new(
            futures_util::stream::iter([chunk]).chain(futures_util::stream::pending()),
        ));
        let r = Client::http1()
            .send_streaming(common::req(
                http::Method::POST,
                &strait.url("/upload"),
                &[],
                body,
            ))
            .await;
        assert_eq!(r.status(), 200, "logged: {logged}");
        assert_eq!(
            r.headers().get("x-envoy-upstream-service-time"),
            None,
            "logged: {logged}"
        );
        // A whole request gets one, with a body or without (the HTTP/1.1 fast path).
        let r = Client::http1().post(&strait.url("/upload"), "whole").await;
        assert!(
            r.header("x-envoy-upstream-service-time").is_some(),
            "logged: {logged}"
        );
        let r = Client::http1().get(&strait.url("/upload")).await;
        assert!(
            r.header("x-envoy-upstream-service-time").is_some(),
            "logged: {logged}"
        );
    }
}

/// The upstream gets the client's `Host` as it was sent, and one `Host` line even when the
/// client sent two (Envoy folds them into one value; Strait sends the first), with or without
/// an access log, with or without a header mutation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_gets_one_host() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let up = Upstream::start("up").await;
    for (logged, mutated) in [(false, false), (true, false), (false, true)] {
        let mut route = json!({"match": {"prefix": "/"}, "route": {"cluster": "up"}});
        if mutated {
            route["request_headers_to_add"] = json!([{"header": {"key": "x-added", "value": "1"}}]);
        }
        let mut config = Config::new()
            .routes(json!([route]))
            .cluster("up", &[up.addr]);
        if !logged {
            config = config.access_logs(Vec::new());
        }
        let strait = config.start().await;
        let what = format!("logged: {logged}, mutated: {mutated}");

        let r = Client::http1()
            .get_with(&strait.url("/"), &[("host", "svc.example:1234")])
            .await;
        assert_eq!(r.status, 200, "{what}");
        assert_eq!(
            values(&up.last_seen(), "host"),
            ["svc.example:1234"],
            "{what}"
        );

        let mut c = tokio::net::TcpStream::connect(strait.listener("ingress"))
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"));
        c.write_all(
            b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap_or_else(|e| panic!("write: {e}"));
        let mut answer = Vec::new();
        common::within("the answer", c.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|e| panic!("read: {e}"));
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{what}: {}",
            String::from_utf8_lossy(&answer)
        );
        let host = values(&up.last_seen(), "host");
        assert_eq!(host.len(), 1, "{what}: {host:?}");
        assert!(host[0].starts_with("a.example"), "{what}: {host:?}");

        // `Connection` naming `host`: the hop-by-hop removal takes the header; the upstream
        // still gets the authority. (Envoy refuses such a request with a 400.)
        let r = Client::http1()
            .get_with(
                &strait.url("/"),
                &[("host", "c.example"), ("connection", "host")],
            )
            .await;
        if r.status == 200 {
            assert_eq!(values(&up.last_seen(), "host"), ["c.example"], "{what}");
        } else {
            assert_eq!(r.status, 400, "{what}");
        }
    }
}

/// The connection manager's `x-forwarded-proto` and `x-request-id` reach the upstream whatever
/// reads them on the way, without an access log (then Strait's HTTP/1.1 client writes them
/// itself unless something reads them): a route matching on one, a `cluster_header` naming one,
/// a route's header mutation, an HTTP/2 upstream, a retry (the same id on both attempts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_manager_headers_reach_every_reader() {
    let up = Upstream::start("up").await;
    let h2 = Upstream::start("h2").await;
    let by_proto = Upstream::start("http").await;
    let flaky = Upstream::start("flaky").await;
    let uuid =
        regex::Regex::new("^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
            .unwrap_or_else(|e| panic!("{e}"));
    for matches_on_headers in [false, true] {
        let mut routes = vec![
            json!({"match": {"prefix": "/cluster-header"},
                   "route": {"cluster_header": "x-forwarded-proto"}}),
            json!({"match": {"prefix": "/mutated"}, "route": {"cluster": "up"},
                   "request_headers_to_add": [{
                       "header": {"key": "x-request-id", "value": "replaced"},
                       "append_action": "OVERWRITE_IF_EXISTS"}]}),
            json!({"match": {"prefix": "/h2"}, "route": {"cluster": "h2"}}),
            json!({"match": {"prefix": "/retried"},
                   "route": {"cluster": "flaky",
                             "retry_policy": {"retry_on": "5xx", "num_retries": 1}}}),
            json!({"match": {"prefix": "/"}, "route": {"cluster": "up"}}),
        ];
        if matches_on_headers {
            // Matched only while the request holds the connection manager's header.
            routes.insert(
                0,
                json!({"match": {"prefix": "/matched",
                                 "headers": [{"name": "x-forwarded-proto",
                                              "string_match": {"exact": "http"}}]},
                       "route": {"cluster": "http"}}),
            );
        }
        let strait = Config::new()
            .routes(json!(routes))
            .cluster("up", &[up.addr])
            .cluster_h2("h2", &[h2.addr])
            .cluster("http", &[by_proto.addr])
            .cluster("flaky", &[flaky.addr])
            .access_logs(Vec::new())
            .start()
            .await;
        let client = Client::http1();
        let what = format!("matches_on_headers: {matches_on_headers}");
        let check = |seen: &common::Seen, path: &str| {
            assert_eq!(values(seen, "x-forwarded-proto"), ["http"], "{what} {path}");
            let id = values(seen, "x-request-id");
            assert!(
                id.len() == 1 && uuid.is_match(&id[0]),
                "{what} {path}: {id:?}"
            );
            id[0].clone()
        };

        let r = client.get(&strait.url("/plain")).await;
        assert_eq!(r.upstream(), Some("up"), "{what}");
        let first = check(&up.last_seen(), "/plain");
        client.get(&strait.url("/plain")).await;
        assert_ne!(
            check(&up.last_seen(), "/plain"),
            first,
            "{what}: a fresh id"
        );
        client
            .get_with(&strait.url("/plain"), &[("x-request-id", "mine")])
            .await;
        assert_eq!(values(&up.last_seen(), "x-request-id"), ["mine"], "{what}");

        let r = client.get(&strait.url("/cluster-header")).await;
        assert_eq!(
            r.upstream(),
            Some("http"),
            "{what}: picked by x-forwarded-proto"
        );
        check(&by_proto.last_seen(), "/cluster-header");

        client.get(&strait.url("/mutated")).await;
        assert_eq!(
            values(&up.last_seen(), "x-request-id"),
            ["replaced"],
            "{what}: the mutation sees the generated id"
        );

        let r = client.get(&strait.url("/h2")).await;
        assert_eq!(r.upstream(), Some("h2"), "{what}");
        check(&h2.last_seen(), "/h2");

        flaky.script([Reply::Status(503)]);
        let before = flaky.seen().len();
        let r = client.get(&strait.url("/retried")).await;
        assert_eq!(r.status, 200, "{what}: retried");
        let seen = flaky.seen();
        assert_eq!(seen.len(), before + 2, "{what}");
        let ids: Vec<String> = seen[before..]
            .iter()
            .map(|s| check(s, "/retried"))
            .collect();
        assert_eq!(ids[0], ids[1], "{what}: one id for both attempts");

        if matches_on_headers {
            let r = client.get(&strait.url("/matched")).await;
            assert_eq!(
                r.upstream(),
                Some("http"),
                "{what}: matched on x-forwarded-proto"
            );
        }
    }
}
