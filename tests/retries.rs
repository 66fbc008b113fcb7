//! Retries, timeouts and upstream failures as a client sees them: status, body, the response
//! flag in the access log, and the cluster stats Envoy keeps for them.

mod common;

use std::time::Duration;

use common::{Blackhole, Client, Config, Reply, Upstream};
use serde_json::{json, Value};

async fn proxy(up_addr: std::net::SocketAddr, route: Value) -> common::Strait {
    let mut route = route;
    route["cluster"] = json!("up");
    Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": route}]))
        .cluster("up", &[up_addr])
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_503_then_200() {
    let up = Upstream::start("up").await;
    up.script([Reply::Status(503)]);
    let strait = proxy(
        up.addr,
        json!({"retry_policy": {"retry_on": "5xx", "num_retries": 1}}),
    )
    .await;
    let r = Client::http1().get(&strait.url("/retry")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.requests(), 2);
    assert_eq!(
        strait.wait_stat("cluster.up.upstream_rq_retry", 1).await,
        Some(1)
    );
    assert_eq!(
        strait
            .wait_stat("cluster.up.upstream_rq_retry_success", 1)
            .await,
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_exhausted_return_the_last_response() {
    let up = Upstream::start_with("up", Reply::Status(503)).await;
    let strait = proxy(
        up.addr,
        json!({"retry_policy": {"retry_on": "5xx", "num_retries": 2}}),
    )
    .await;
    let r = Client::http1().get(&strait.url("/always503")).await;
    assert_eq!(r.status, 503);
    assert_eq!(up.requests(), 3, "1 try + 2 retries");
    assert_eq!(
        strait.wait_stat("cluster.up.upstream_rq_retry", 2).await,
        Some(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_reset() {
    let up = Upstream::start("up").await;
    up.script([Reply::Reset]);
    let strait = proxy(
        up.addr,
        json!({"retry_policy": {"retry_on": "reset", "num_retries": 1}}),
    )
    .await;
    let r = Client::http1().get(&strait.url("/reset")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.requests(), 2);
    assert_eq!(
        strait.wait_stat("cluster.up.upstream_rq_retry", 1).await,
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_without_retry_is_503_ur() {
    let up = Upstream::start_with("up", Reply::Reset).await;
    let strait = proxy(up.addr, json!({})).await;
    let r = Client::http1().get(&strait.url("/reset-no-retry")).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.text(),
        "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
    );
    strait
        .access_log("\"GET /reset-no-retry HTTP/1.1\" 503 UC ", 1)
        .await;
    assert_eq!(up.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_status_codes() {
    let up = Upstream::start("up").await;
    let strait = proxy(
        up.addr,
        json!({"retry_policy": {"retry_on": "retriable-status-codes",
                                "retriable_status_codes": [409], "num_retries": 1}}),
    )
    .await;
    let client = Client::http1();
    up.script([Reply::Status(409)]);
    let r = client.get(&strait.url("/conflict")).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.requests(), 2);
    // 503 is not in the list and `5xx` is not set: passed through, no retry.
    up.script([Reply::Status(503)]);
    let r = client.get(&strait.url("/unavailable")).await;
    assert_eq!(r.status, 503);
    assert_eq!(up.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_retry_without_policy() {
    let up = Upstream::start("up").await;
    up.script([Reply::Status(503)]);
    let strait = proxy(up.addr, json!({})).await;
    let r = Client::http1().get(&strait.url("/")).await;
    assert_eq!(r.status, 503);
    assert_eq!(up.requests(), 1);
    assert_eq!(
        strait.wait_stat("cluster.up.upstream_rq_503", 1).await,
        Some(1)
    );
    assert_eq!(strait.stat("cluster.up.upstream_rq_retry").await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_is_retried() {
    let up = Upstream::start("up").await;
    up.script([Reply::Hang]);
    let strait = proxy(
        up.addr,
        json!({"timeout": "5s", "retry_policy": {"retry_on": "5xx", "num_retries": 1,
                                                 "per_try_timeout": "0.2s"}}),
    )
    .await;
    let r = Client::http1().get(&strait.url("/slow-once")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(up.requests(), 2);
    assert_eq!(
        strait
            .wait_stat("cluster.up.upstream_rq_per_try_timeout", 1)
            .await,
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeouts_exhausted_is_504() {
    let up = Upstream::start_with("up", Reply::Hang).await;
    let strait = proxy(
        up.addr,
        json!({"timeout": "5s", "retry_policy": {"retry_on": "5xx", "num_retries": 1,
                                                 "per_try_timeout": "0.2s"}}),
    )
    .await;
    let started = std::time::Instant::now();
    let r = Client::http1().get(&strait.url("/always-slow")).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream request timeout");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "per-try, not route, timeout"
    );
    assert_eq!(up.requests(), 2);
    assert_eq!(
        strait
            .wait_stat("cluster.up.upstream_rq_per_try_timeout", 2)
            .await,
        Some(2)
    );
    // Envoy flags both the exhausted retries and the timeout.
    strait
        .access_log("\"GET /always-slow HTTP/1.1\" 504 URX,UT ", 1)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_is_504_ut() {
    let hole = Blackhole::start().await;
    let strait = proxy(hole.addr, json!({"timeout": "0.3s"})).await;
    let started = std::time::Instant::now();
    let r = Client::http1().get(&strait.url("/hang")).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream request timeout");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(hole.accepts(), 1);
    assert_eq!(
        strait.wait_stat("cluster.up.upstream_rq_timeout", 1).await,
        Some(1)
    );
    strait.access_log("\"GET /hang HTTP/1.1\" 504 UT ", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_503_uf() {
    let down = common::closed_port().await;
    let strait = proxy(down, json!({})).await;
    let r = Client::http1().get(&strait.url("/down")).await;
    assert_eq!(r.status, 503);
    // Envoy 1.40's exact text for a refused connection.
    assert_eq!(
        r.text(),
        "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
    );
    assert_eq!(
        strait
            .wait_stat("cluster.up.upstream_cx_connect_fail", 1)
            .await,
        Some(1)
    );
    let line = strait.access_log("\"GET /down HTTP/1.1\" 503 UF ", 1).await;
    assert!(line[0].ends_with(&format!("\"{down}\"")), "{line:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_retried_to_another_host() {
    let down = common::closed_port().await;
    let up = Upstream::start("up").await;
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up",
            "retry_policy": {"retry_on": "connect-failure", "num_retries": 3}}}]))
        .cluster("up", &[down, up.addr])
        .start()
        .await;
    let client = Client::http1();
    for _ in 0..4 {
        let r = client.get(&strait.url("/")).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(up.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404_nr() {
    let strait = Config::new()
        .routes(json!([{"match": {"path": "/only"}, "direct_response": {"status": 200}}]))
        .start()
        .await;
    let r = Client::http1().get(&strait.url("/missing")).await;
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty());
    strait
        .access_log("\"GET /missing HTTP/1.1\" 404 NR ", 1)
        .await;
    assert_eq!(
        strait.wait_stat("http.ingress.downstream_rq_4xx", 1).await,
        Some(1)
    );
}

/// `previous_hosts` with RING_HASH and MAGLEV: a retry asks the table again with the attempt
/// number (Envoy's `chooseHost(hash, attempt)`: the next ring entry, or a Maglev hash perturbed
/// per attempt), so a key whose host fails reaches another host instead of the same one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashed_retry_with_previous_hosts_reaches_another_host() {
    for policy in ["RING_HASH", "MAGLEV"] {
        let bad = Upstream::start_with("bad", Reply::Status(503)).await;
        let g1 = Upstream::start("g1").await;
        let g2 = Upstream::start("g2").await;
        let mut cluster = common::cluster("c", &[bad.addr, g1.addr, g2.addr]);
        cluster["lb_policy"] = json!(policy);
        let strait = Config::new()
            .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "c",
                "hash_policy": [{"header": {"header_name": "x-user"}}],
                "retry_policy": {"retry_on": "5xx", "num_retries": 1,
                    // Each re-pick of a refused host lands on `bad` again with p = 1/3.
                    "host_selection_retry_max_attempts": 20,
                    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}]}}}]))
            .cluster_json(cluster)
            .start()
            .await;
        let client = Client::http1();
        let url = strait.url("/k");
        for k in 0..30 {
            let key = format!("user-{k}");
            let r = client.get_with(&url, &[("x-user", &key)]).await;
            assert_eq!(r.status, 200, "{policy} {key}: {}", r.text());
        }
        // With 30 keys over 3 hosts, some hash to `bad` (all miss it with p = (2/3)^30).
        assert!(
            bad.requests() > 0,
            "{policy}: no key hashed to the failing host"
        );
        assert_eq!(
            strait.stat("cluster.c.upstream_rq_retry").await,
            Some(bad.requests() as i64),
            "{policy}: exactly the requests that hit `bad` were retried"
        );
    }
}

/// An HTTP/2 upstream that resets the stream (RST_STREAM, the connection stays): 503 with
/// Envoy's `remote reset` text and `UR`, and a `reset` retry policy retries it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_stream_reset_is_503_ur_then_retried() {
    let up = Upstream::start_with("up", Reply::Reset).await;
    let strait = Config::new()
        .routes(json!([
            {"match": {"prefix": "/retried"}, "route": {"cluster": "up",
                "retry_policy": {"retry_on": "reset", "num_retries": 1}}},
            {"match": {"prefix": "/"}, "route": {"cluster": "up"}}
        ]))
        .cluster_h2("up", &[up.addr])
        .start()
        .await;
    let r = Client::http1().get(&strait.url("/reset-h2")).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.text(),
        "upstream connect error or disconnect/reset before headers. reset reason: remote reset"
    );
    strait
        .access_log("\"GET /reset-h2 HTTP/1.1\" 503 UR ", 1)
        .await;

    up.script([Reply::Reset, Reply::Status(204)]);
    let r = Client::http1().get(&strait.url("/retried")).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(up.requests(), 3);
    assert_eq!(
        strait.wait_stat("cluster.up.upstream_rq_retry", 1).await,
        Some(1)
    );
    // The reset stream did not cost its connection: at most one per proxy worker.
    assert!(up.accepts() <= 2, "{} upstream connections", up.accepts());
}
