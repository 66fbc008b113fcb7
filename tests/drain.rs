//! Graceful shutdown on SIGTERM, SIGINT and `POST /quitquitquit`: the in-flight request
//! completes, new connections are refused, and the process exits 0.
//! (Strait drains on SIGTERM; Envoy itself exits at once, so these differ from Envoy on purpose.)

mod common;

use std::time::{Duration, Instant};

use common::{Client, Config, Reply, Upstream};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

enum Trigger {
    Sigterm,
    Sigint,
    QuitQuitQuit,
}

/// True when a fresh connection gets no HTTP response (refused, or closed unanswered).
async fn new_connection_fails(addr: std::net::SocketAddr) -> bool {
    let Ok(mut s) = common::connect(addr).await else {
        return true;
    };
    let req = b"GET /probe HTTP/1.1\r\nhost: probe\r\nconnection: close\r\n\r\n";
    if s.write_all(req).await.is_err() {
        return true;
    }
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => !buf.starts_with(b"HTTP/1.1 "),
        Ok(Err(_)) => true,
        Err(_) => false,
    }
}

async fn drain(trigger: Trigger) {
    let up = Upstream::start_with(
        "up",
        Reply::Delay(Duration::from_secs(1), Box::new(Reply::Echo)),
    )
    .await;
    let mut strait = Config::new()
        .routes(json!([
            {"match": {"path": "/probe"}, "direct_response": {"status": 200}},
            {"match": {"prefix": "/"}, "route": {"cluster": "up"}}
        ]))
        .cluster("up", &[up.addr])
        .start()
        .await;
    let addr = strait.listener("ingress");
    assert!(
        !new_connection_fails(addr).await,
        "probe works before the drain"
    );

    let client = Client::http1();
    let url = strait.url("/slow");
    let in_flight = tokio::spawn(async move { client.get(&url).await });
    // The upstream having the request is the signal that it is in flight.
    up.wait_requests(1).await;

    match trigger {
        Trigger::Sigterm => strait.sigterm(),
        Trigger::Sigint => strait.sigint(),
        Trigger::QuitQuitQuit => {
            let r = strait.admin_post("/quitquitquit").await;
            assert_eq!(r.status, 200);
            assert_eq!(r.text(), "OK\n");
        }
    }

    // Bounded poll: the listener closes soon after the trigger, well before the in-flight
    // request's 1 s upstream delay ends.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !new_connection_fails(addr).await {
        assert!(
            Instant::now() < deadline,
            "new connections still served after the drain began"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !in_flight.is_finished(),
        "the slow request should still be in flight"
    );

    let r = common::within("in-flight request", in_flight)
        .await
        .unwrap_or_else(|e| panic!("in-flight task: {e}"));
    assert_eq!(
        r.status, 200,
        "the in-flight request completes during the drain"
    );
    assert_eq!(r.upstream(), Some("up"));

    let status = strait.wait_exit().await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_0() {
    drain(Trigger::Sigterm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_and_exits_0() {
    drain(Trigger::Sigint).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_drains_and_exits_0() {
    drain(Trigger::QuitQuitQuit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_requires_post() {
    let strait = Config::new().routes(json!([])).start().await;
    let r = strait.admin_get("/quitquitquit").await;
    assert_eq!(r.status, 405);
    assert_eq!(
        strait.admin_get("/ready").await.status,
        200,
        "still running"
    );
}
