//! Traffic splitting: `weighted_clusters` proportions over many requests, per-cluster header
//! mutations, and `cluster_header` picking the cluster from a request header.

mod common;

use common::{Client, Config, Upstream};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_20_80() {
    const N: usize = 2000;
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let strait = Config::new()
        .routes(
            json!([{"match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [
                {"name": "a", "weight": 20,
                 "response_headers_to_add": [{"header": {"key": "x-split", "value": "a"}}]},
                {"name": "b", "weight": 80,
                 "response_headers_to_add": [{"header": {"key": "x-split", "value": "b"}}]}
            ]}}}]),
        )
        .cluster("a", &[a.addr])
        .cluster("b", &[b.addr])
        .start()
        .await;
    let client = Client::http1();
    let url = strait.url("/split");
    let mut tasks = tokio::task::JoinSet::new();
    // 8 concurrent senders keep the run short on 2 cores.
    for _ in 0..8 {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            let mut got = Vec::new();
            for _ in 0..N / 8 {
                let r = client.get(&url).await;
                assert_eq!(r.status, 200, "{}", r.text());
                assert_eq!(r.header("x-split"), r.upstream(), "per-cluster headers");
                got.push(r.upstream().unwrap_or_default().to_string());
            }
            got
        });
    }
    let mut to_a = 0usize;
    let mut total = 0usize;
    while let Some(res) = common::within("senders", tasks.join_next()).await {
        let got = res.unwrap_or_else(|e| panic!("sender: {e}"));
        total += got.len();
        to_a += got.iter().filter(|u| *u == "a").count();
    }
    assert_eq!(total, N);
    assert_eq!(a.requests() + b.requests(), N);
    // Binomial(2000, 0.2): mean 400, sigma ~17.9; 5 sigma ~ 90 (fails by chance ~1 in 1.7M runs).
    let mean = N as f64 * 0.2;
    let sigma = (N as f64 * 0.2 * 0.8).sqrt();
    assert!(
        (to_a as f64 - mean).abs() <= 5.0 * sigma,
        "a got {to_a} of {N}, want {mean} +- {:.0}",
        5.0 * sigma
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_header_picks_the_cluster() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster_header": "x-cluster"}}]))
        .cluster("a", &[a.addr])
        .cluster("b", &[b.addr])
        .start()
        .await;
    let client = Client::http1();
    let url = strait.url("/");
    assert_eq!(
        client
            .get_with(&url, &[("x-cluster", "a")])
            .await
            .upstream(),
        Some("a")
    );
    assert_eq!(
        client
            .get_with(&url, &[("x-cluster", "b")])
            .await
            .upstream(),
        Some("b")
    );
    // Envoy: an unknown or missing cluster is 503 with response flag NC.
    let r = client.get_with(&url, &[("x-cluster", "nope")]).await;
    assert_eq!(r.status, 503);
    let r = client.get(&url).await;
    assert_eq!(r.status, 503);
    let lines = strait.access_log("\" 503 NC ", 2).await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(a.requests() + b.requests(), 2);
}
