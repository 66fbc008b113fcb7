//! The downstream HTTP/2 server as an h2c client sees it: bodies larger than every flow-control
//! window move both ways, a client's RST_STREAM cancels the request upstream, local replies carry
//! `date` and `content-length`, and many concurrent streams share one connection.

mod common;

use std::time::Duration;

use common::{Client, Config, Reply, Upstream};
use http::Method;
use http_body_util::BodyExt;
use serde_json::json;

const MIB: u64 = 1024 * 1024;

async fn proxy(up: &Upstream) -> common::Strait {
    Config::new()
        .routes(json!([
            {"match": {"prefix": "/hang"}, "route": {"cluster": "up", "timeout": "0s"}},
            {"match": {"prefix": "/"}, "route": {"cluster": "up"}}
        ]))
        .cluster("up", &[up.addr])
        .start()
        .await
}

/// 24 MiB each way over one stream: several times the proxy's 1 MiB receive windows (the
/// upload stalls unless received data is handed back to the client's window) and the client's
/// own windows (the download waits for WINDOW_UPDATEs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_larger_than_the_windows_move_both_ways() {
    let size = 24 * MIB;
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let client = Client::h2c();

    up.script([Reply::CountBody]);
    let upload = common::req(
        Method::POST,
        &strait.url("/upload"),
        &[],
        common::generated(size),
    );
    let r = common::within_for(Duration::from_secs(60), "upload", client.send(upload)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.json()["bytes"], json!(size));

    up.script([Reply::Stream(size)]);
    let resp = client.get_streaming(&strait.url("/download")).await;
    assert_eq!(resp.status(), 200);
    let (n, _) = common::within_for(
        Duration::from_secs(60),
        "download",
        common::drain_body(resp.into_body()),
    )
    .await
    .unwrap_or_else(|e| panic!("download: {e}"));
    assert_eq!(n, size);
}

/// Dropping the response future makes the client send RST_STREAM(CANCEL). The request has no
/// route timeout and its upstream never answers, so only the reset can end it; it is counted and
/// logged as Envoy does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_cancels_the_upstream_request() {
    let up = Upstream::start_with("up", Reply::Hang).await;
    let strait = proxy(&up).await;
    let client = Client::h2c();
    // Warm the connection so that the reset goes over an established one.
    up.script([Reply::Status(204)]);
    assert_eq!(client.get(&strait.url("/warm")).await.status, 204);

    let url = strait.url("/hang");
    let inflight = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .try_send(common::req(Method::GET, &url, &[], common::empty()))
                .await
        }
    });
    // The upstream has the request once it counted it.
    up.wait_requests(2).await;
    assert_eq!(
        strait
            .wait_stat("http.ingress.downstream_rq_active", 1)
            .await,
        Some(1)
    );
    inflight.abort();

    assert_eq!(
        strait
            .wait_stat("http.ingress.downstream_rq_active", 0)
            .await,
        Some(0),
        "the request outlived its stream's reset"
    );
    assert_eq!(
        strait
            .wait_stat("http.ingress.downstream_rq_rx_reset", 1)
            .await,
        Some(1)
    );
    assert_eq!(
        strait.wait_stat("cluster.up.upstream_rq_active", 0).await,
        Some(0)
    );
    // Logged as Envoy does: no response code, `DR` (downstream remote reset).
    strait.access_log("\"GET /hang HTTP/2\" 0 DR ", 1).await;
    // The connection goes on serving.
    up.script([Reply::Status(204)]);
    assert_eq!(client.get(&strait.url("/after")).await.status, 204);
}

/// A client that resets the stream in the middle of a large response: the response stops, the
/// upstream request is cancelled, and the log says `DR` after the status that was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset_mid_response_stops_the_download() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let client = Client::h2c();
    up.script([Reply::Stream(512 * MIB)]);
    let resp = client.get_streaming(&strait.url("/big")).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = common::within("first bytes", body.frame()).await;
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    // Dropping the unfinished body resets the stream.
    drop(body);
    strait.access_log("\"GET /big HTTP/2\" 200 DR ", 1).await;
    assert_eq!(
        strait
            .wait_stat("http.ingress.downstream_rq_active", 0)
            .await,
        Some(0)
    );
    assert_eq!(
        strait.wait_stat("cluster.up.upstream_rq_active", 0).await,
        Some(0)
    );
}

/// A client that stops granting flow-control window while a response streams: the stream ends
/// at the route's idle timeout (`SI`, as Envoy's stream idle timeout does when no window
/// update comes), instead of holding the stream and its upstream request open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_meets_the_idle_timeout() {
    let up = Upstream::start("up").await;
    let strait = common::idle_timeout_route("1s")
        .cluster("up", &[up.addr])
        .start()
        .await;
    let client = Client::h2c();
    common::stalled_download_is_cut(
        &strait,
        &up,
        &client,
        "GET /stall HTTP/2",
        512 * MIB,
        common::IDLE_TIMEOUT,
    )
    .await;
}

/// Local replies over HTTP/2 as Envoy sends them: `date` always; `content-length` with a body
/// (503, no healthy upstream) and none when the headers end the stream (404, no route).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_carry_date_and_content_length() {
    let up = Upstream::start("up").await;
    let strait = Config::new()
        .routes(json!([
            {"match": {"prefix": "/only"}, "route": {"cluster": "up"}},
            {"match": {"prefix": "/empty"}, "route": {"cluster": "empty"}}
        ]))
        .cluster("up", &[up.addr])
        .cluster("empty", &[])
        .start()
        .await;
    let client = Client::h2c();
    let fresh_date = |r: &common::Resp| {
        let date = r.header("date").unwrap_or_else(|| panic!("no date: {r:?}"));
        let when = httpdate::parse_http_date(date).unwrap_or_else(|e| panic!("{date}: {e}"));
        let skew = std::time::SystemTime::now()
            .duration_since(when)
            .unwrap_or_default();
        assert!(
            skew < Duration::from_secs(60),
            "date {date} is {skew:?} old"
        );
    };

    let r = client.get(&strait.url("/elsewhere")).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.version, http::Version::HTTP_2);
    fresh_date(&r);
    assert!(r.body.is_empty());
    assert_eq!(r.header("content-length"), None);

    let r = client.get(&strait.url("/empty")).await;
    assert_eq!(r.status, 503);
    fresh_date(&r);
    assert_eq!(r.text(), "no healthy upstream");
    assert_eq!(r.header("content-length"), Some("19"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(up.requests(), 0);
}

/// 200 requests, 50 at a time, over one connection (the proxy's SETTINGS allow 100 streams):
/// each answer is the one for its own request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_on_one_connection_get_their_own_answers() {
    let up = Upstream::start_with("up", Reply::Echo).await;
    let strait = proxy(&up).await;
    let client = Client::h2c();
    assert_eq!(client.get(&strait.url("/warm")).await.status, 200);
    for round in 0..4 {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..50 {
            let client = client.clone();
            let url = strait.url(&format!("/r{round}-{i}"));
            set.spawn(async move {
                let r = client.get(&url).await;
                (format!("/r{round}-{i}"), r)
            });
        }
        while let Some(done) = set.join_next().await {
            let (path, r) = done.unwrap_or_else(|e| panic!("request task: {e}"));
            assert_eq!(r.status, 200, "{path}");
            assert_eq!(r.json()["path"], json!(path));
            let body = r.body.clone();
            assert_eq!(
                r.header("content-length"),
                Some(body.len().to_string().as_str()),
                "{path}"
            );
        }
    }
    assert_eq!(
        up.requests(),
        201,
        "every request reached the upstream once"
    );
    // One downstream connection served them all.
    assert_eq!(
        strait.stat("http.ingress.downstream_cx_http2_total").await,
        Some(1)
    );
}

/// On SIGTERM an HTTP/2 connection gets GOAWAY: the client stops opening streams on it at once
/// (a connection still taking new streams is served until the in-flight one ends), while its
/// in-flight stream still completes. (Envoy exits at once on SIGTERM: Strait-only, as in
/// tests/drain.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_goaway_and_the_in_flight_stream_finishes() {
    if common::under_envoy() {
        return;
    }
    let up = Upstream::start_with(
        "up",
        Reply::Delay(Duration::from_secs(3), Box::new(Reply::Echo)),
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
    let client = Client::h2c();
    let probe = strait.url("/probe");
    assert_eq!(client.get(&probe).await.status, 200);
    let in_flight = tokio::spawn({
        let (client, url) = (client.clone(), strait.url("/slow"));
        async move { client.get(&url).await }
    });
    up.wait_requests(1).await;
    strait.sigterm();
    // Bounded poll, well within the in-flight request's 3 s upstream delay.
    let deadline = std::time::Instant::now() + Duration::from_millis(2500);
    loop {
        match client
            .try_send(common::req(Method::GET, &probe, &[], common::empty()))
            .await
        {
            Ok(r) if r.status == 200 => {}
            _ => break,
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the connection still took new streams after the drain began"
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
    assert_eq!(r.status, 200);
    assert_eq!(r.version, http::Version::HTTP_2);
    let status = strait.wait_exit().await;
    assert!(status.success(), "exit status {status}");
}

/// Reads HTTP/2 frames until the peer closes: `(type, stream id, payload)` of each.
async fn frames_until_close(s: &mut tokio::net::TcpStream) -> Vec<(u8, u32, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    // A reset after the GOAWAY ends the read too; what arrived before it is in `buf`.
    let _ = common::within("the connection's close", s.read_to_end(&mut buf)).await;
    let mut frames = Vec::new();
    let mut at = 0;
    while buf.len() >= at + 9 {
        let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
        let kind = buf[at + 3];
        let stream = u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]]);
        let end = (at + 9 + len).min(buf.len());
        frames.push((kind, stream & 0x7fff_ffff, buf[at + 9..end].to_vec()));
        at = end;
    }
    frames
}

/// Garbage after the preface (a DATA frame on stream 0, where SETTINGS must come first): the
/// connection ends with GOAWAY(PROTOCOL_ERROR), is counted as a protocol error, and the proxy
/// goes on serving other connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_violation_ends_the_connection_with_goaway() {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let mut s = common::connect(strait.listener("ingress"))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend_from_slice(&[0, 0, 0, 0x0, 0, 0, 0, 0, 0]);
    s.write_all(&bytes)
        .await
        .unwrap_or_else(|e| panic!("write: {e}"));
    let frames = frames_until_close(&mut s).await;
    let goaway = frames.iter().find(|(kind, _, _)| *kind == 0x7);
    let Some((_, _, payload)) = goaway else {
        panic!("no GOAWAY among {frames:?}");
    };
    // Last-stream-id (4 bytes), then the error code: PROTOCOL_ERROR is 1.
    assert_eq!(payload.get(4..8), Some(&[0, 0, 0, 1][..]), "{payload:?}");
    assert_eq!(
        strait
            .wait_stat("http.ingress.downstream_cx_protocol_error", 1)
            .await,
        Some(1)
    );
    assert_eq!(Client::h2c().get(&strait.url("/after")).await.status, 200);
}

/// A request whose header list is over the HCM's limit (60 KiB by default): the stream is refused
/// (curl retries a refused stream on fresh connections, then gives up) without reaching the
/// upstream, and the proxy goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_list_is_refused_with_the_stream_only() {
    if !common::tool("curl") {
        eprintln!("skipped: curl not installed");
        return;
    }
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let big = format!("x-big: {}", "x".repeat(70 * 1024));
    let url = strait.url("/big-headers");
    let after = strait.url("/after");
    let args: Vec<String> = [
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        "--http2-prior-knowledge",
        "-H",
        &big,
        &url,
        "--next",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        "--http2-prior-knowledge",
        &after,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let (_, out, err) = common::run(Duration::from_secs(30), "curl", &args).await;
    let codes: Vec<&str> = out.lines().collect();
    assert_eq!(codes.len(), 2, "{out} {err}");
    assert!(
        codes[0] == "000" || codes[0] == "431",
        "oversized headers got {}",
        codes[0]
    );
    assert_eq!(codes[1], "200", "{err}");
    assert_eq!(
        up.requests(),
        1,
        "only the second request reached the upstream"
    );
}
