//! Bodies stream through the proxy: a large upload and download keep the proxy's memory
//! bounded, trailers pass both ways over HTTP/2, and `Expect: 100-continue` works.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::{Client, Config, Reply, Upstream};
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::json;

const MIB: u64 = 1024 * 1024;
/// Large enough that buffering it would blow the memory bound several times over.
const BIG: u64 = 256 * MIB;
/// Allowed growth of the proxy's peak RSS over its idle RSS.
const BOUND_KB: u64 = 64 * 1024;

async fn proxy(up: &Upstream, h2_upstream: bool) -> common::Strait {
    let cfg = Config::new().routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]));
    let cfg = if h2_upstream {
        cfg.cluster_h2("up", &[up.addr])
    } else {
        cfg.cluster("up", &[up.addr])
    };
    cfg.start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_and_download_keep_memory_bounded() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up, false).await;
    let client = Client::http1();
    assert_eq!(client.get(&strait.url("/warm-up")).await.status, 200);
    let peak_reset = strait.reset_peak_rss();
    let (idle_rss, _) = strait.memory_kb();
    // Sampling RSS as well catches sustained buffering even where VmHWM cannot be reset.
    let sampled = Arc::new(AtomicU64::new(idle_rss));
    let sampler = {
        let (pid, sampled) = (strait.pid(), sampled.clone());
        tokio::spawn(async move {
            let path = format!("/proc/{pid}/status");
            loop {
                let status = common::read(std::path::Path::new(&path));
                let rss = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
                if let Some(r) = rss {
                    sampled.fetch_max(r, Ordering::Relaxed);
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };

    up.script([Reply::CountBody]);
    let upload = common::req(
        Method::POST,
        &strait.url("/upload"),
        &[],
        common::generated(BIG),
    );
    let r = common::within_for(
        std::time::Duration::from_secs(120),
        "upload",
        client.send(upload),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["bytes"], json!(BIG));

    up.script([Reply::Stream(BIG)]);
    let resp = client.get_streaming(&strait.url("/download")).await;
    assert_eq!(resp.status(), 200);
    let (n, _) = common::within_for(
        std::time::Duration::from_secs(120),
        "download",
        common::drain_body(resp.into_body()),
    )
    .await
    .unwrap_or_else(|e| panic!("download: {e}"));
    assert_eq!(n, BIG);

    let (_, hwm) = strait.memory_kb();
    sampler.abort();
    let sampled = sampled.load(Ordering::Relaxed);
    let peak = if peak_reset {
        hwm.max(sampled)
    } else {
        sampled
    };
    assert!(
        peak.saturating_sub(idle_rss) < BOUND_KB,
        "proxy peak RSS {peak} KiB vs idle {idle_rss} KiB: grew by more than {BOUND_KB} KiB \
         while moving {} MiB each way",
        BIG / MIB
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_pass_through_h2() {
    let up = Upstream::start_with(
        "up",
        Reply::Trailers(vec![
            ("grpc-status".into(), "0".into()),
            ("x-checksum".into(), "abc123".into()),
        ]),
    )
    .await;
    let strait = proxy(&up, true).await;
    let r = Client::h2c().get(&strait.url("/trailers")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "trailers follow");
    let t = r.trailers.unwrap_or_else(|| panic!("no trailers"));
    assert_eq!(
        t.get("grpc-status").and_then(|v| v.to_str().ok()),
        Some("0")
    );
    assert_eq!(
        t.get("x-checksum").and_then(|v| v.to_str().ok()),
        Some("abc123")
    );
    assert_eq!(up.last_seen().version, http::Version::HTTP_2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_trailers_pass_through_h2() {
    let up = Upstream::start_with("up", Reply::CountBody).await;
    let strait = proxy(&up, true).await;
    let mut trailers = HeaderMap::new();
    trailers.insert("x-request-trailer", HeaderValue::from_static("yes"));
    let frames: Vec<Result<Frame<Bytes>, common::BoxError>> = vec![
        Ok(Frame::data(Bytes::from_static(b"0123456789"))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let r = Client::h2c()
        .send(common::req(
            Method::POST,
            &strait.url("/req-trailers"),
            &[],
            body,
        ))
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["bytes"], 10);
    assert_eq!(v["trailers"]["x-request-trailer"], json!(["yes"]), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_with_curl() {
    if !common::tool("curl") {
        return;
    }
    let up = Upstream::start_with("up", Reply::CountBody).await;
    let strait = proxy(&up, false).await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let file = dir.path().join("body.bin");
    std::fs::write(&file, vec![b'y'; 2 * MIB as usize]).unwrap_or_else(|e| panic!("{e}"));
    let (status, out, err) = common::run(
        common::TIMEOUT,
        "curl",
        &[
            "-sS".into(),
            "-v".into(),
            "--http1.1".into(),
            // Long enough that a proxy that never says 100 makes the assertion below fail
            // rather than curl sending the body anyway.
            "--expect100-timeout".into(),
            "15".into(),
            "-H".into(),
            "Expect: 100-continue".into(),
            "--data-binary".into(),
            format!("@{}", file.display()),
            strait.url("/upload"),
        ],
    )
    .await;
    assert!(status.success(), "curl failed: {err}");
    assert!(
        err.lines()
            .any(|l| l.trim_end() == "< HTTP/1.1 100 Continue"),
        "no 100 Continue:\n{err}"
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["bytes"], json!(2 * MIB));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_echoed_while_streaming_over_h2() {
    let up = Upstream::start_with("up", Reply::EchoBody).await;
    let strait = proxy(&up, true).await;
    let n = 16 * MIB;
    let resp = Client::h2c()
        .send_streaming(common::req(
            Method::POST,
            &strait.url("/echo"),
            &[],
            common::generated(n),
        ))
        .await;
    assert_eq!(resp.status(), 200);
    let (got, _) = common::within("echoed body", common::drain_body(resp.into_body()))
        .await
        .unwrap_or_else(|e| panic!("echo: {e}"));
    assert_eq!(got, n);
}

/// An HTTP/1.1 client that stops reading while a response streams: the proxy's socket fills and
/// nothing moves, so the stream ends at the route's idle timeout (`200 SI`, the connection
/// closed, as Envoy's stream idle timeout does) instead of holding the connection and its
/// upstream request open for as long as the client stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_stops_reading_meets_the_idle_timeout() {
    let up = Upstream::start("up").await;
    let strait = common::idle_timeout_route("1s")
        .cluster("up", &[up.addr])
        .start()
        .await;
    let client = Client::http1();
    common::stalled_download_is_cut(
        &strait,
        &up,
        &client,
        "GET /stall HTTP/1.1",
        BIG,
        common::IDLE_TIMEOUT,
    )
    .await;
}

/// The same stalled HTTP/1.1 client under a route timeout shorter than its idle timeout: the
/// route timeout covers the whole upstream response, which the client now holds back, so the
/// stream ends there (`200 UT`, counted in `upstream_rq_timeout`), as in Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_stops_reading_meets_the_route_timeout() {
    let up = Upstream::start("up").await;
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"},
                        "route": {"cluster": "up", "idle_timeout": "30s", "timeout": "1s"}}]))
        .cluster("up", &[up.addr])
        .start()
        .await;
    let client = Client::http1();
    let route_timeout = common::StallEnd {
        flag: "UT",
        counter: "cluster.up.upstream_rq_timeout",
    };
    let line = "GET /stall HTTP/1.1";
    common::stalled_download_is_cut(&strait, &up, &client, line, BIG, route_timeout).await;
}

/// An upstream streaming [`BIG`] (over HTTP/2 with `h2_upstream`) behind a proxy whose route has
/// a 1 s idle timeout, and a raw client connection on which `head` has been sent.
async fn raw_download(
    h2_upstream: bool,
    head: &[u8],
) -> (Upstream, common::Strait, tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::start("up").await;
    let cfg = common::idle_timeout_route("1s");
    let cfg = if h2_upstream {
        cfg.cluster_h2("up", &[up.addr])
    } else {
        cfg.cluster("up", &[up.addr])
    };
    let strait = cfg.start().await;
    up.script([Reply::Stream(BIG)]);
    let mut s = common::within(
        "connecting",
        tokio::net::TcpStream::connect(strait.listener("ingress")),
    )
    .await
    .unwrap();
    s.write_all(head).await.unwrap();
    (up, strait, s)
}

/// A slow HTTP/1.1 reader is not idle: each read lets the proxy's writes move again, which
/// restarts the stall clock, so a download that takes several idle timeouts in all goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_http1_reader_is_not_cut_at_the_idle_timeout() {
    use tokio::io::AsyncReadExt;
    let (_up, strait, mut s) =
        raw_download(false, b"GET /slow HTTP/1.1\r\nhost: slow\r\n\r\n").await;
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0u64;
    // 2.5 s in all, the sockets full between reads: two and a half idle timeouts, no pause
    // near one (reading slower leaves the proxy blocked behind the kernel's buffers, several
    // MiB on loopback, for longer than the timeout: Envoy then times out, rightly).
    for _ in 0..25 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let n = common::within("a slow read", s.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "the proxy closed the download after {total} bytes");
        total += n as u64;
    }
    assert_eq!(
        strait.stat("http.ingress.downstream_rq_idle_timeout").await,
        Some(0)
    );
    drop(s);
    strait.access_log("\"GET /slow HTTP/1.1\" 200 DC ", 1).await;
}

/// A client that keeps uploading while it does not read the response is still active: bytes
/// arriving restart the stall clock as bytes leaving do (Envoy's stream idle timer counts both
/// ways), so only once the upload stops does the stream meet its idle timeout. (An HTTP/2
/// upstream: its request body streams from a task of its own while the response streams. Over
/// an HTTP/1.1 upstream Strait moves the upload only as the client reads the response.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_still_uploading_is_not_idle() {
    use tokio::io::AsyncWriteExt;
    let head = b"POST /upload HTTP/1.1\r\nhost: up\r\ntransfer-encoding: chunked\r\n\r\n";
    let (_up, strait, mut s) = raw_download(true, head).await;
    let mut chunk = b"400\r\n".to_vec();
    chunk.extend_from_slice(&[b'u'; 1024]);
    chunk.extend_from_slice(b"\r\n");
    // 2.5 s of upload, a chunk every 100 ms, the response never read.
    for _ in 0..25 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        common::within("an upload chunk", s.write_all(&chunk))
            .await
            .unwrap();
    }
    assert_eq!(
        strait.stat("http.ingress.downstream_rq_idle_timeout").await,
        Some(0)
    );
    // The upload stops: now nothing moves either way.
    strait
        .access_log("\"POST /upload HTTP/1.1\" 200 SI ", 1)
        .await;
}

/// A response whose chunks come slower than nothing but faster than the idle timeout is not
/// idle: each frame from the upstream restarts the stream's idle clock, so a response that
/// takes longer than the timeout in all arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_keeps_coming_is_not_cut_at_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let strait = common::idle_timeout_route("1s")
        .cluster("up", &[up.local_addr().unwrap()])
        .start()
        .await;
    // Four chunks 400 ms apart: 1.6 s in all, no gap near 1 s.
    let upstream = tokio::spawn(async move {
        let (mut c, _) = up.accept().await.unwrap();
        common::read_request_head(&mut c).await;
        c.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        for _ in 0..4 {
            tokio::time::sleep(std::time::Duration::from_millis(400)).await;
            c.write_all(b"5\r\nchunk\r\n").await.unwrap();
        }
        c.write_all(b"0\r\n\r\n").await.unwrap();
        c
    });
    let mut s = tokio::net::TcpStream::connect(strait.listener("ingress"))
        .await
        .unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: up\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"0\r\n\r\n") {
        let n = common::within("the response", s.read(&mut buf))
            .await
            .unwrap();
        assert!(
            n > 0,
            "the proxy closed the response: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert_eq!(text.matches("5\r\nchunk\r\n").count(), 4, "{text}");
    let _upstream_conn = upstream.await.unwrap();
    assert_eq!(
        strait.stat("http.ingress.downstream_rq_idle_timeout").await,
        Some(0)
    );
}
