//! Upstream connection reuse: HTTP/1.1 keep-alive across sequential requests, HTTP/2
//! multiplexing of concurrent requests over one connection, and the connection / pending
//! circuit breakers of each routing priority.

mod common;

use std::time::Duration;

use common::{Client, Config, Conn, Reply, Upstream};
use http::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_connections_are_reused() {
    let up = Upstream::start("up").await;
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
        .cluster("up", &[up.addr])
        .start()
        .await;
    // One downstream connection: the proxy must then reuse one upstream connection.
    let mut conn = Conn::open(strait.listener("ingress")).await;
    for i in 0..100 {
        let url = strait.url(&format!("/seq/{i}"));
        let r = conn
            .send(common::req(Method::GET, &url, &[], common::empty()))
            .await;
        assert_eq!(
            r.map(|r| r.status).ok(),
            Some(http::StatusCode::OK),
            "request {i}"
        );
    }
    assert_eq!(up.requests(), 100);
    assert_eq!(
        up.accepts(),
        1,
        "100 sequential requests should share one upstream connection"
    );
    assert_eq!(strait.stat("cluster.up.upstream_cx_total").await, Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_are_multiplexed() {
    const N: usize = 20;
    let up = Upstream::start_with(
        "up",
        Reply::Delay(Duration::from_millis(300), Box::new(Reply::Echo)),
    )
    .await;
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
        .cluster_h2("up", &[up.addr])
        .start()
        .await;
    // Open the upstream connection first so the concurrent burst has one to share.
    let client = Client::h2c();
    assert_eq!(client.get(&strait.url("/first")).await.status, 200);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let (client, url) = (client.clone(), strait.url(&format!("/mux/{i}")));
        tasks.spawn(async move { client.get(&url).await.status });
    }
    while let Some(res) = common::within("h2 burst", tasks.join_next()).await {
        assert_eq!(res.unwrap_or_else(|e| panic!("{e}")), 200);
    }
    assert_eq!(up.requests(), N + 1);
    assert_eq!(up.accepts(), 1, "all streams on one HTTP/2 connection");
    assert!(
        up.max_concurrent() >= N / 2,
        "only {} requests were in flight at once",
        up.max_concurrent()
    );
    assert!(up.seen().iter().all(|s| s.version == http::Version::HTTP_2));
}

/// Polls (bounded) until the upstream has received `n` requests.
async fn wait_requests(up: &Upstream, n: usize) {
    for _ in 0..500 {
        if up.requests() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("upstream saw {} requests, wanted {n}", up.requests());
}

/// Routes with `priority: HIGH` count against the HIGH thresholds for connections and pending
/// requests too, in a pool of their own as in Envoy: with HIGH max_connections 1 and
/// max_pending_requests 1, a second HIGH request waits for the connection
/// (`upstream_cx_overflow`), a third is turned away at once (503, UO,
/// `upstream_rq_pending_overflow`), while a DEFAULT request still gets a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_breakers_cover_connections_and_pending() {
    let up = Upstream::start_with(
        "up",
        Reply::Delay(Duration::from_millis(400), Box::new(Reply::Echo)),
    )
    .await;
    let mut cluster = common::cluster("up", &[up.addr]);
    cluster["circuit_breakers"] = json!({"thresholds": [
        {"priority": "HIGH", "max_connections": 1, "max_pending_requests": 1, "max_requests": 100},
    ]});
    let strait = Config::new()
        .routes(json!([
            {"match": {"prefix": "/high"}, "route": {"cluster": "up", "priority": "HIGH"}},
            {"match": {"prefix": "/"}, "route": {"cluster": "up"}},
        ]))
        .cluster_json(cluster)
        .start()
        .await;
    // One HTTP/2 connection carries every request: pools are per worker (Envoy's and Strait's
    // per-core model), and separate downstream connections may land on different workers,
    // each of which could open its own first connection past the breaker.
    let client = Client::h2c();
    let get = |path: &str| {
        let (client, url) = (client.clone(), strait.url(path));
        tokio::spawn(async move { client.get(&url).await.status.as_u16() })
    };
    // 1: takes the only HIGH connection and holds it for 400 ms.
    let first = get("/high/1");
    wait_requests(&up, 1).await;
    // 2: pending, waiting for that connection.
    let second = get("/high/2");
    assert_eq!(
        strait.wait_stat("cluster.up.upstream_cx_overflow", 1).await,
        Some(1)
    );
    assert_eq!(
        strait.stat("cluster.up.upstream_rq_pending_active").await,
        Some(1)
    );
    // 3: the HIGH pending breaker is full.
    let r = client.get(&strait.url("/high/3")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("x-envoy-overloaded"), Some("true"));
    strait.access_log("\"GET /high/3 HTTP/2\" 503 UO ", 1).await;
    // DEFAULT traffic has its own connections and breakers.
    let r = client.get(&strait.url("/default")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-envoy-overloaded"), None);
    assert_eq!(common::within("first", first).await.ok(), Some(200));
    assert_eq!(common::within("second", second).await.ok(), Some(200));
    assert_eq!(up.requests(), 3);
    assert_eq!(
        up.accepts(),
        2,
        "one HIGH connection (reused) and one DEFAULT"
    );
    assert_eq!(
        strait
            .wait_stat("cluster.up.upstream_rq_pending_overflow", 1)
            .await,
        Some(1)
    );
    assert_eq!(
        strait.stat("cluster.up.upstream_cx_overflow").await,
        Some(1)
    );
}

/// Envoy's `tryCreateNewConnection`: a host whose pool has no connection opens one even when
/// other hosts hold every connection `max_connections` allows (counting
/// `upstream_cx_overflow`), instead of queueing behind connections it can never get.
///
/// The two requests must reach different hosts whatever the worker: both clusters use
/// RING_HASH on `x-key` (placement depends on the host addresses only, and Envoy places keys
/// as Strait does), and an unbounded `probe` cluster over the same hosts finds a key for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_connections_gets_one_past_the_breaker() {
    let slow = || Reply::Delay(Duration::from_millis(400), Box::new(Reply::Echo));
    let a = Upstream::start_with("a", Reply::Echo).await;
    let b = Upstream::start_with("b", Reply::Echo).await;
    let hashed = |name: &str| {
        let mut c = common::cluster(name, &[a.addr, b.addr]);
        c["lb_policy"] = json!("RING_HASH");
        c
    };
    let mut up = hashed("up");
    up["circuit_breakers"] = json!({"thresholds": [{"max_connections": 1}]});
    let by_key = json!([{"header": {"header_name": "x-key"}}]);
    let strait = Config::new()
        .routes(json!([
            {"match": {"prefix": "/probe"}, "route": {"cluster": "probe", "hash_policy": by_key}},
            {"match": {"prefix": "/"}, "route": {"cluster": "up", "timeout": "3s", "hash_policy": by_key}}
        ]))
        .cluster_json(hashed("probe"))
        .cluster_json(up)
        .start()
        .await;
    let client = Client::http1();
    let mut keys: [Option<String>; 2] = [None, None];
    for i in 0..64 {
        let key = format!("k{i}");
        let r = client
            .get_with(&strait.url("/probe"), &[("x-key", key.as_str())])
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let slot = if r.upstream() == Some("a") { 0 } else { 1 };
        keys[slot].get_or_insert(key);
        if keys.iter().all(Option::is_some) {
            break;
        }
    }
    let [Some(key_a), Some(key_b)] = keys else {
        panic!("64 keys all hashed to one host: {keys:?}");
    };
    a.set_default(slow());
    b.set_default(slow());
    let (before_a, before_b) = (a.requests(), b.requests());

    let (c1, url) = (client.clone(), strait.url("/1"));
    let first = tokio::spawn(async move {
        c1.get_with(&url, &[("x-key", key_a.as_str())])
            .await
            .status
            .as_u16()
    });
    for _ in 0..500 {
        if a.requests() > before_a {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // `b` has no connection of `up` while `a` holds the only one the breaker allows.
    let r = client
        .get_with(&strait.url("/2"), &[("x-key", key_b.as_str())])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.upstream(), Some("b"));
    assert_eq!(common::within("first", first).await.ok(), Some(200));
    assert_eq!((a.requests() - before_a, b.requests() - before_b), (1, 1));
    assert_eq!(
        strait.stat("cluster.up.upstream_cx_overflow").await,
        Some(1)
    );
}
