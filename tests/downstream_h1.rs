//! The downstream HTTP/1.1 codec on the wire: bodiless requests take Strait's own fast path
//! (`h1server`), anything else hands the connection to hyper's server. Checked with raw TCP
//! clients: both paths write the same response heads for the same upstream answers, pipelined
//! requests are answered in order, a request body mid-connection hands over without losing the
//! bytes already read, and a client that closes mid-request cancels it.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Config, Reply, Upstream};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(10);

/// Answers each request head with the next scripted bytes, on any connection; GET/HEAD only.
struct Raw {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Raw {
    /// Answers with these bytes in turn; an HTTP/1.0 answer without a length ends its body by
    /// closing the connection.
    async fn start(script: Vec<Vec<u8>>) -> Raw {
        let listener = common::bind().await;
        let addr = common::local_addr(&listener);
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let script = script.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => got.extend_from_slice(&buf[..n]),
                            }
                        }
                        let at = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
                        got.drain(..at + 4);
                        let next = script.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                        let Some(bytes) = next else { return };
                        if s.write_all(&bytes).await.is_err() {
                            return;
                        }
                        let head = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
                        if head.starts_with("http/1.0") && !head.contains("content-length") {
                            let _ = s.shutdown().await;
                            return;
                        }
                    }
                });
            }
        });
        Raw { addr, task }
    }
}

/// One response read off a raw connection: the head as sent, and the body after its framing.
#[derive(Debug)]
struct RawResponse {
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn status(&self) -> u16 {
        self.head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(": ")?;
            n.eq_ignore_ascii_case(name).then_some(v)
        })
    }

    /// The head with the values that change between requests blanked.
    /// The head with varying values starred, and a `content-length: 0` last: hyper writes it
    /// after the other fields, the fast path where the upstream had it (as Envoy does).
    fn normalized_head(&self) -> String {
        let (mut lines, zero): (Vec<String>, Vec<String>) = self
            .head
            .lines()
            .map(|l| match l.split_once(": ") {
                Some((n, _)) if n == "date" || n == "x-envoy-upstream-service-time" => {
                    format!("{n}: *")
                }
                _ => l.to_string(),
            })
            .partition(|l| l != "content-length: 0");
        lines.extend(zero);
        lines.join("\r\n")
    }
}

/// A raw client connection that reads responses by their framing.
struct RawConn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    async fn open(addr: SocketAddr) -> RawConn {
        let s = common::connect(addr).await.expect("connect");
        RawConn { s, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write");
    }

    async fn fill(&mut self) -> bool {
        let mut b = [0u8; 4096];
        match tokio::time::timeout(LIMIT, self.s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&b[..n]);
                true
            }
            Err(_) => panic!("no response within {LIMIT:?}"),
        }
    }

    /// The next response; `head_request`: it answers a HEAD (no body whatever the headers say).
    async fn response(&mut self, head_request: bool) -> RawResponse {
        let at = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at;
            }
            assert!(self.fill().await, "closed before a response head");
        };
        let head = String::from_utf8_lossy(&self.buf[..at]).into_owned();
        self.buf.drain(..at + 4);
        let mut r = RawResponse {
            head,
            body: Vec::new(),
        };
        let status = r.status();
        if head_request || status == 204 || status == 304 {
            return r;
        }
        if r.header("transfer-encoding") == Some("chunked") {
            loop {
                let line_end = loop {
                    if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break p;
                    }
                    assert!(self.fill().await, "closed inside a chunk size");
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&self.buf[..line_end]).trim(),
                    16,
                )
                .expect("chunk size");
                self.buf.drain(..line_end + 2);
                while self.buf.len() < size + 2 {
                    assert!(self.fill().await, "closed inside a chunk");
                }
                r.body.extend_from_slice(&self.buf[..size]);
                self.buf.drain(..size + 2);
                if size == 0 {
                    return r;
                }
            }
        }
        let Some(len) = r.header("content-length") else {
            // Delimited by the connection's end.
            while self.fill().await {}
            r.body = std::mem::take(&mut self.buf);
            return r;
        };
        let len: usize = len.parse().expect("content-length");
        while self.buf.len() < len {
            assert!(self.fill().await, "closed inside a body");
        }
        r.body = self.buf.drain(..len).collect();
        r
    }

    /// True once the server closed the connection (EOF after anything still buffered).
    async fn closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill().await
    }
}

async fn proxy(up: SocketAddr) -> common::Strait {
    Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
        .cluster("up", &[up])
        .start()
        .await
}

fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: example.com\r\n{extra}\r\n").into_bytes()
}

/// The same upstream answers, once to a bodiless request on a fresh connection (Strait's fast
/// path) and once on a connection that a `TE` header handed to hyper, reach the client with
/// the same head and body: the fast path encodes heads as hyper does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_path_writes_the_heads_hyper_writes() {
    if common::under_envoy() {
        return; // Compares Strait's two HTTP/1.1 paths with each other.
    }
    // (request method, upstream answer)
    let cases: Vec<(&str, &[u8])> = vec![
        ("GET", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello"),
        (
            "GET",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nset-cookie: a=1\r\nset-cookie: b=2\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        ("GET", b"HTTP/1.1 204 No Content\r\nx-b: 2\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\netag: \"x\"\r\n\r\n"),
        ("GET", b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"),
        ("GET", b"HTTP/1.1 599 Whatever\r\ncontent-length: 2\r\n\r\nno"),
        ("HEAD", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
        ("HEAD", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
        ("GET", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: Thu, 01 Jan 2026 00:00:00 GMT\r\n\r\n"),
    ];
    // Each answer twice: the first request (fast) then the second (hyper) consume them in turn.
    let mut script = Vec::new();
    // The hand-off request itself.
    script.push(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec());
    for (_, a) in &cases {
        script.push(a.to_vec());
        script.push(a.to_vec());
    }
    let raw = Raw::start(script).await;
    let strait = proxy(raw.addr).await;
    let addr = strait.listener("ingress");

    let mut fast = RawConn::open(addr).await;
    let mut hyper = RawConn::open(addr).await;
    // A `TE` header hands this connection to hyper for the rest of its life.
    hyper.send(&get("/handoff", "te: gzip\r\n")).await;
    assert_eq!(hyper.response(false).await.status(), 200);

    for (i, (method, _)) in cases.iter().enumerate() {
        let req = format!("{method} /c{i} HTTP/1.1\r\nhost: example.com\r\n\r\n");
        fast.send(req.as_bytes()).await;
        let a = fast.response(*method == "HEAD").await;
        hyper.send(req.as_bytes()).await;
        let b = hyper.response(*method == "HEAD").await;
        assert_eq!(
            a.normalized_head(),
            b.normalized_head(),
            "case {i}: fast path (left) and hyper (right) heads differ"
        );
        assert_eq!(a.body, b.body, "case {i}: bodies differ");
    }

    // `connection: close` from the client: both answer with it and close.
    let script = vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(); 3];
    let raw = Raw::start(script).await;
    let strait = proxy(raw.addr).await;
    let addr = strait.listener("ingress");
    let mut fast = RawConn::open(addr).await;
    fast.send(&get("/close", "connection: close\r\n")).await;
    let a = fast.response(false).await;
    assert!(
        fast.closed().await,
        "the fast path kept a closed connection"
    );
    let mut hyper = RawConn::open(addr).await;
    hyper.send(&get("/h", "te: gzip\r\n")).await;
    hyper.response(false).await;
    hyper.send(&get("/close", "connection: close\r\n")).await;
    let b = hyper.response(false).await;
    assert!(hyper.closed().await, "hyper kept a closed connection");
    assert_eq!(a.normalized_head(), b.normalized_head());
    assert_eq!(a.header("connection"), Some("close"));

    // An HTTP/1.0 upstream's answer keeps its version; without a length its body ends with
    // the connection, which then closes downstream too.
    for answer in [
        &b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nhello"[..],
        &b"HTTP/1.0 200 OK\r\nx-a: 1\r\n\r\nhello"[..],
    ] {
        let script = vec![
            answer.to_vec(),
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
            answer.to_vec(),
        ];
        let raw = Raw::start(script).await;
        let strait = proxy(raw.addr).await;
        let addr = strait.listener("ingress");
        let mut fast = RawConn::open(addr).await;
        fast.send(&get("/old", "")).await;
        let a = fast.response(false).await;
        let mut hyper = RawConn::open(addr).await;
        hyper.send(&get("/h", "te: gzip\r\n")).await;
        hyper.response(false).await;
        hyper.send(&get("/old", "")).await;
        let b = hyper.response(false).await;
        assert!(a.head.starts_with("HTTP/1.0 200 OK"), "{}", a.head);
        assert_eq!(a.normalized_head(), b.normalized_head());
        assert_eq!(a.body, b"hello");
        assert_eq!(a.body, b.body);
        if a.header("content-length").is_none() {
            assert!(
                fast.closed().await,
                "a body delimited by the close left it open"
            );
            assert!(hyper.closed().await);
        }
    }
}

/// A head that arrives a byte at a time is parsed once it is whole, and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_sent_a_byte_at_a_time_is_served() {
    let up = Upstream::start("up").await;
    let strait = proxy(up.addr).await;
    let mut c = RawConn::open(strait.listener("ingress")).await;
    let filler = "a".repeat(2000);
    let req = get("/slow", &format!("x-filler: {filler}\r\n"));
    for b in &req {
        c.send(std::slice::from_ref(b)).await;
    }
    let r = c.response(false).await;
    assert_eq!(r.status(), 200);
    let e = echoed(&r);
    assert_eq!(e["path"], "/slow");
    assert_eq!(e["headers"]["x-filler"][0], filler.as_str());
}

fn echoed(r: &RawResponse) -> Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)))
}

/// A head with more fields than the fast path keeps offsets for on the stack reaches the
/// upstream whole; the next request on the same connection, parsed into the map the first one's
/// response left behind, carries only its own fields, and so does its response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_fields_arrive_whole_and_nothing_carries_over() {
    let up = Upstream::start("up").await;
    let strait = proxy(up.addr).await;
    let mut c = RawConn::open(strait.listener("ingress")).await;
    let many: String = (0..40).map(|i| format!("x-many-{i}: v{i}\r\n")).collect();
    c.send(&get("/many", &many)).await;
    let r = c.response(false).await;
    assert_eq!(r.status(), 200);
    let e = echoed(&r);
    for i in 0..40 {
        assert_eq!(
            e["headers"][format!("x-many-{i}")][0],
            format!("v{i}"),
            "field {i}"
        );
    }
    c.send(&get("/few", "x-only: 1\r\n")).await;
    let r = c.response(false).await;
    assert_eq!(r.status(), 200);
    let e = echoed(&r);
    assert_eq!(e["path"], "/few");
    assert_eq!(e["headers"]["x-only"][0], "1");
    let names = e["headers"]
        .as_object()
        .map(|m| m.keys().cloned().collect::<Vec<_>>());
    assert!(
        names.iter().flatten().all(|n| !n.starts_with("x-many-")),
        "fields of the first request reached the second: {names:?}"
    );
    assert_eq!(up.accepts(), 1, "both requests on one upstream connection");
}

/// Requests written back to back in one segment are answered in order on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let up = Upstream::start("up").await;
    let strait = proxy(up.addr).await;
    let mut c = RawConn::open(strait.listener("ingress")).await;
    let mut all = Vec::new();
    for i in 0..3 {
        all.extend(get(&format!("/p{i}"), ""));
    }
    c.send(&all).await;
    for i in 0..3 {
        let r = c.response(false).await;
        assert_eq!(r.status(), 200);
        assert_eq!(echoed(&r)["path"], format!("/p{i}"));
    }
    assert_eq!(
        up.accepts(),
        1,
        "one upstream connection for three sequential requests"
    );
}

/// A request with a body after a bodiless one, all in one segment: the connection changes
/// codec between them without losing the bytes already read, and the next request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_midway_keeps_the_connection_and_its_bytes() {
    let up = Upstream::start("up").await;
    let strait = proxy(up.addr).await;
    let mut c = RawConn::open(strait.listener("ingress")).await;
    let mut all = get("/first", "");
    all.extend_from_slice(
        b"POST /second HTTP/1.1\r\nhost: example.com\r\ncontent-length: 3\r\n\r\nabc",
    );
    all.extend(get("/third", ""));
    c.send(&all).await;
    let first = c.response(false).await;
    assert_eq!(echoed(&first)["path"], "/first");
    let second = echoed(&c.response(false).await);
    assert_eq!(second["path"], "/second");
    assert_eq!(second["method"], "POST");
    assert_eq!(second["body"], "abc");
    let third = c.response(false).await;
    assert_eq!(third.status(), 200);
    assert_eq!(echoed(&third)["path"], "/third");
    // A garbage line on the same connection: hyper's 400, as before the fast path.
    c.send(b"NOT A REQUEST\r\n\r\n").await;
    assert_eq!(c.response(false).await.status(), 400);
}

/// A malformed head on a fresh connection reaches hyper too: 400, counted as a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_head_is_answered_400() {
    let up = Upstream::start("up").await;
    let strait = proxy(up.addr).await;
    let mut c = RawConn::open(strait.listener("ingress")).await;
    c.send(b"GET / HTTP/1.1\r\nbad header\r\n\r\n").await;
    assert_eq!(c.response(false).await.status(), 400);
    assert!(c.closed().await);
    assert_eq!(up.requests(), 0);
    if !common::under_envoy() {
        assert_eq!(
            strait
                .wait_stat("http.ingress.downstream_cx_protocol_error", 1)
                .await,
            Some(1)
        );
    }
}

/// A client that closes its connection while its request waits upstream cancels the request:
/// the stream ends, the upstream request is cancelled, and it is logged `DC`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_closing_mid_request_cancels_it() {
    let up = Upstream::start_with("up", Reply::Hang).await;
    let strait = proxy(up.addr).await;
    let mut c = RawConn::open(strait.listener("ingress")).await;
    c.send(&get("/hang", "")).await;
    up.wait_requests(1).await;
    assert_eq!(
        strait
            .wait_stat("http.ingress.downstream_rq_active", 1)
            .await,
        Some(1)
    );
    drop(c);
    assert_eq!(
        strait
            .wait_stat("http.ingress.downstream_rq_active", 0)
            .await,
        Some(0),
        "the request outlived its connection"
    );
    assert_eq!(
        strait.wait_stat("cluster.up.upstream_rq_active", 0).await,
        Some(0)
    );
    strait.access_log("\"GET /hang HTTP/1.1\" 0 DC ", 1).await;
}

/// A drain that begins while a connection's first request is still arriving answers that
/// request, with `connection: close`, as hyper's server does (a fresh connection is busy, not
/// idle); the process then exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_answers_a_first_request_still_arriving() {
    if common::under_envoy() {
        return; // Envoy exits at once on SIGTERM.
    }
    let up = Upstream::start("up").await;
    let mut strait = proxy(up.addr).await;
    let addr = strait.listener("ingress");
    let mut c = RawConn::open(addr).await;
    c.send(b"GET /late HTTP/1.1\r\nhost: example.com\r\n").await;
    // Counted once the codec is chosen from the first bytes.
    assert_eq!(
        strait
            .wait_stat("http.ingress.downstream_cx_active", 1)
            .await,
        Some(1)
    );
    strait.sigterm();
    // Counted when the connection is told to drain.
    assert_eq!(
        strait
            .wait_stat("http.ingress.downstream_cx_drain_close", 1)
            .await,
        Some(1)
    );
    c.send(b"\r\n").await;
    let r = c.response(false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(echoed(&r)["path"], "/late");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed().await);
    assert!(strait.wait_exit().await.success());
}

/// A head over `max_request_headers_kb`, after a request served on the same connection, is
/// refused with 431 and nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_the_limit_is_answered_431() {
    let up = Upstream::start("up").await;
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
        .cluster("up", &[up.addr])
        .hcm("max_request_headers_kb", json!(16))
        .start()
        .await;
    let mut c = RawConn::open(strait.listener("ingress")).await;
    c.send(&get("/ok", "")).await;
    assert_eq!(c.response(false).await.status(), 200);
    let big = "b".repeat(20 * 1024);
    c.send(&get("/big", &format!("x-big: {big}\r\n"))).await;
    assert_eq!(c.response(false).await.status(), 431);
    assert_eq!(
        up.requests(),
        1,
        "the oversized request reached the upstream"
    );
}

/// The connection's byte counters see every byte on the wire, the first read (which chooses
/// the codec) included: a small request is all in that read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_counters_include_the_first_read() {
    let up = Upstream::start("up").await;
    let strait = proxy(up.addr).await;
    let mut c = RawConn::open(strait.listener("ingress")).await;
    let req = get("/count", &format!("x-pad: {}\r\n", "p".repeat(700)));
    c.send(&req).await;
    let r = c.response(false).await;
    assert_eq!(r.status(), 200);
    let got = r.head.len() + 4 + r.body.len() + c.buf.len();
    drop(c);
    assert_eq!(
        strait
            .wait_stat("http.ingress.downstream_cx_destroy", 1)
            .await,
        Some(1)
    );
    assert_eq!(
        strait
            .stat("http.ingress.downstream_cx_rx_bytes_total")
            .await,
        Some(req.len() as i64)
    );
    assert_eq!(
        strait
            .stat("http.ingress.downstream_cx_tx_bytes_total")
            .await,
        Some(got as i64)
    );
}
