//! Upstream connection reuse: HTTP/1.1 keep-alive across sequential requests, and HTTP/2
//! multiplexing of concurrent requests over one connection.

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
