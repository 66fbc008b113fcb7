//! The HTTP/1.1 upstream client on the wire: a raw TCP upstream answers with hand-written bytes
//! (chunked bodies with extensions and trailers, bodies read to EOF, HTTP/1.0, 1xx heads,
//! malformed and oversized heads, truncated bodies, connections closed while idle), and
//! request bodies reach a real server framed by length or chunked.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{Client, Config, Upstream};
use http::{Method, StatusCode};
use http_body_util::StreamBody;
use hyper::body::Frame;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads on until `got` holds a whole request head, then takes it out of `got`; None at EOF.
async fn read_head(
    s: &mut tokio::net::TcpStream,
    got: &mut Vec<u8>,
    buf: &mut [u8],
) -> Option<Vec<u8>> {
    loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(got.drain(..at + 4).collect());
        }
        match s.read(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// One scripted answer: the bytes, written in these pieces, then whether to close.
struct Answer {
    pieces: Vec<Vec<u8>>,
    close: bool,
}

fn answer(bytes: &[u8], close: bool) -> Answer {
    Answer {
        pieces: vec![bytes.to_vec()],
        close,
    }
}

/// Answers each request head it reads with the next scripted answer, on any connection.
struct Raw {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Raw {
    async fn start(script: Vec<Answer>) -> Raw {
        let listener = common::bind().await;
        let addr = common::local_addr(&listener);
        let accepts = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let counted = accepts.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    // GET requests only: a head ends the request.
                    while read_head(&mut s, &mut got, &mut buf).await.is_some() {
                        let next = script.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                        let Some(a) = next else { return };
                        for p in &a.pieces {
                            if s.write_all(p).await.is_err() {
                                return;
                            }
                            let _ = s.flush().await;
                            tokio::task::yield_now().await;
                        }
                        if a.close {
                            let _ = s.shutdown().await;
                            return;
                        }
                    }
                });
            }
        });
        Raw {
            addr,
            accepts,
            task,
        }
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

async fn proxy(addr: SocketAddr) -> common::Strait {
    Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
        .cluster("up", &[addr])
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_with_extensions_and_trailers_then_connection_reused() {
    let chunked = Answer {
        pieces: vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-a: 1\r\n\r\n5;name=val".to_vec(),
            b"ue\r\nhel".to_vec(),
            b"lo\r\n6\r\n world\r".to_vec(),
            b"\n0\r\nx-trailer: t\r\n\r\n".to_vec(),
        ],
        close: false,
    };
    let raw = Raw::start(vec![
        chunked,
        answer(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond", false),
    ])
    .await;
    let strait = proxy(raw.addr).await;
    let mut conn = common::Conn::open(strait.listener("ingress")).await;
    let url = strait.url("/a");
    let r = conn
        .send(common::req(Method::GET, &url, &[], common::empty()))
        .await
        .unwrap_or_else(|e| panic!("first: {e}"));
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "hello world");
    assert_eq!(r.header("x-a"), Some("1"));
    let r = conn
        .send(common::req(Method::GET, &url, &[], common::empty()))
        .await
        .unwrap_or_else(|e| panic!("second: {e}"));
    assert_eq!(r.text(), "second");
    assert_eq!(
        raw.accepts(),
        1,
        "the connection is reused after a chunked body"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_read_to_eof_and_http10_close_the_connection() {
    let raw = Raw::start(vec![
        answer(b"HTTP/1.1 200 OK\r\nx-kind: eof\r\n\r\nuntil the end", true),
        answer(b"HTTP/1.0 200 OK\r\ncontent-length: 4\r\n\r\nold!", true),
        answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nthird", false),
    ])
    .await;
    let strait = proxy(raw.addr).await;
    let client = Client::http1();
    let r = client.get(&strait.url("/eof")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "until the end");
    let r = client.get(&strait.url("/old")).await;
    assert_eq!(r.text(), "old!");
    let r = client.get(&strait.url("/third")).await;
    assert_eq!(r.text(), "third");
    assert_eq!(
        raw.accepts(),
        3,
        "neither answer leaves a reusable connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informational_heads_before_the_response_are_skipped() {
    let raw = Raw::start(vec![answer(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n\
          HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
        false,
    )])
    .await;
    let strait = proxy(raw.addr).await;
    let r = Client::http1().get(&strait.url("/")).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.text(), "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_heads_are_502_protocol_errors() {
    // Envoy 1.40 takes a response head of up to 80 KiB.
    let head = |headers: usize| {
        let mut h = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..headers {
            h.extend_from_slice(format!("x-big-{i}: {}\r\n", "v".repeat(1000)).as_bytes());
        }
        h.extend_from_slice(b"content-length: 0\r\n\r\n");
        h
    };
    let raw = Raw::start(vec![
        answer(&head(75), false),
        answer(b"HTTP/1.1 2x0 OK\r\n\r\n", true),
        answer(
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
            true,
        ),
        answer(&head(85), true),
    ])
    .await;
    let strait = proxy(raw.addr).await;
    let client = Client::http1();
    let r = client.get(&strait.url("/")).await;
    assert_eq!(r.status, StatusCode::OK, "a 75 KiB head passes");
    assert_eq!(r.header("x-big-74").map(str::len), Some(1000));
    for what in [
        "bad status",
        "conflicting content-length",
        "head over 80 KiB",
    ] {
        let r = client.get(&strait.url("/")).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{what}: {}", r.text());
        assert!(
            r.text().ends_with("reset reason: protocol error"),
            "{what}: {}",
            r.text()
        );
    }
    // Each closed the connection it came on, counted as Envoy counts codec errors.
    assert_eq!(
        strait
            .wait_stat("cluster.up.upstream_cx_protocol_error", 3)
            .await,
        Some(3)
    );
    // Closed by the proxy, not the upstream.
    assert_eq!(
        strait
            .wait_stat("cluster.up.upstream_cx_destroy_local", 3)
            .await,
        Some(3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_fails_the_downstream_response() {
    let raw = Raw::start(vec![answer(
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
        true,
    )])
    .await;
    let strait = proxy(raw.addr).await;
    let r = Client::http1()
        .try_send(common::req(
            Method::GET,
            &strait.url("/"),
            &[],
            common::empty(),
        ))
        .await;
    assert!(r.is_err(), "a truncated body must not look complete: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_closed_by_the_upstream_is_dropped_not_used() {
    let raw = Raw::start(vec![
        answer(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none", true),
        answer(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ntwo", false),
    ])
    .await;
    let strait = proxy(raw.addr).await;
    let client = Client::http1();
    assert_eq!(client.get(&strait.url("/1")).await.text(), "one");
    // The proxy notices the close while the connection is idle, before any request needs it.
    assert_eq!(
        strait
            .wait_stat("cluster.up.upstream_cx_destroy_remote", 1)
            .await,
        Some(1)
    );
    assert_eq!(strait.stat("cluster.up.upstream_cx_active").await, Some(0));
    let r = client.get(&strait.url("/2")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "two");
    assert_eq!(raw.accepts(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_framed_by_length_or_chunked() {
    let up = Upstream::start("up").await;
    let strait = proxy(up.addr).await;
    // HTTP/1.1 with a length: sent with that length.
    let r = Client::http1()
        .post(&strait.url("/len"), "0123456789")
        .await;
    let v = r.json();
    assert_eq!(v["body"], "0123456789", "{v}");
    assert_eq!(v["headers"]["content-length"], json!(["10"]), "{v}");
    // HTTP/2 without a length, in several frames: chunked upstream.
    let frames = futures_util::stream::iter(
        ["ab", "cd", "ef"].map(|s| Ok::<_, common::BoxError>(Frame::data(Bytes::from(s)))),
    );
    let body = http_body_util::BodyExt::boxed(StreamBody::new(frames));
    let r = Client::h2c()
        .send(common::req(
            Method::POST,
            &strait.url("/chunked"),
            &[],
            body,
        ))
        .await;
    let v = r.json();
    assert_eq!(v["body"], "abcdef", "{v}");
    assert_eq!(v["headers"]["transfer-encoding"], json!(["chunked"]), "{v}");
    assert!(v["headers"]["content-length"].is_null(), "{v}");
}

/// An upstream that answers each request as soon as its head is in, before reading the body
/// (as nginx's `return 200` does), then reads the body (by its `content-length`) and discards
/// it. Returns its address, the connections it accepted and the body bytes it has read, as
/// they arrive.
async fn early_answerer(
    read_body: bool,
) -> (
    SocketAddr,
    Arc<AtomicUsize>,
    tokio::sync::watch::Receiver<u64>,
) {
    let listener = common::bind().await;
    let addr = common::local_addr(&listener);
    let accepts = Arc::new(AtomicUsize::new(0));
    let counted = accepts.clone();
    let (bytes_tx, bytes_rx) = tokio::sync::watch::channel(0u64);
    let bytes_tx = Arc::new(bytes_tx);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            let count = bytes_tx.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                while let Some(head) = read_head(&mut s, &mut got, &mut buf).await {
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    let mut left = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if !read_body {
                        // Holds the connection open and reads no more.
                        std::future::pending::<()>().await;
                    }
                    let taken = left.min(got.len());
                    got.drain(..taken);
                    left -= taken;
                    count.send_modify(|c| *c += taken as u64);
                    while left > 0 {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                let used = n.min(left);
                                left -= used;
                                count.send_modify(|c| *c += used as u64);
                                got.extend_from_slice(&buf[used..n]);
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, accepts, bytes_rx)
}

/// POSTs `size` bytes on a new connection to an [`early_answerer`] behind `strait` and checks
/// the early answer. Far more than the socket buffers hold: the answer comes back while most of
/// the body is still unsent. Returns the connection and the URL, for the next request.
async fn upload_answered_early(strait: &common::Strait, size: u64) -> (common::Conn, String) {
    let mut conn = common::Conn::open(strait.listener("ingress")).await;
    let url = strait.url("/upload");
    let r = conn
        .send(common::req(
            Method::POST,
            &url,
            &[("content-length", &size.to_string())],
            common::generated(size),
        ))
        .await
        .unwrap_or_else(|e| panic!("upload: {e}"));
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "ok");
    (conn, url)
}

/// RFC 9110 section 15 lets a client keep sending its body after an early final response; Strait
/// does (as hyper's client does), so the upload is not cut and the downstream connection is
/// not reset. Envoy resets the upstream request instead (`Router::onUpstreamComplete`), so the
/// whole-body check is Strait's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_before_the_whole_upload_leaves_the_connection_usable() {
    let (addr, accepts, mut body_bytes) = early_answerer(true).await;
    let strait = proxy(addr).await;
    const SIZE: u64 = 16 << 20;
    let (mut conn, url) = upload_answered_early(&strait, SIZE).await;
    if common::under_envoy() {
        return;
    }
    common::within(
        "the whole body upstream",
        body_bytes.wait_for(|&n| n == SIZE),
    )
    .await
    .unwrap_or_else(|e| panic!("upstream gone: {e}"));
    // The upload's last write and the connection's return to the pool happen in one poll of
    // the worker that also serves this connection: the next request finds it idle.
    let r = conn
        .send(common::req(Method::GET, &url, &[], common::empty()))
        .await
        .unwrap_or_else(|e| panic!("the request after the upload, same connection: {e}"));
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "ok");
    assert_eq!(
        accepts.load(Ordering::SeqCst),
        1,
        "the upstream connection is reused"
    );
}

/// The rest of an upload after an early answer is bounded by the stream idle timeout: an
/// upstream that stops reading (and keeps the connection) does not hold the downstream
/// connection beyond it. (Envoy resets at once, which this test accepts too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_upstream_stops_reading_ends_at_the_idle_timeout() {
    let (addr, _, _) = early_answerer(false).await;
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"},
                         "route": {"cluster": "up", "idle_timeout": "1s"}}]))
        .cluster("up", &[addr])
        .start()
        .await;
    let (mut conn, url) = upload_answered_early(&strait, 64 << 20).await;
    // The client's upload stalls; the next request on the connection waits behind it until
    // the proxy gives up on the stream and closes the connection.
    // (Well under the 20 s after which `Conn::send` gives up by itself.)
    let next = common::within_for(
        std::time::Duration::from_secs(8),
        "the connection to end",
        conn.send(common::req(Method::GET, &url, &[], common::empty())),
    )
    .await;
    assert!(
        next.is_err(),
        "the stalled connection served another request"
    );
}

/// Sends `method path` on `c` and reads the response: its head's field lines (name, value) in
/// order as they came on the wire, and its body (by `content-length`; none for HEAD or 204).
async fn exchange_raw(
    c: &mut tokio::net::TcpStream,
    method: &str,
    path: &str,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let req = format!("{method} {path} HTTP/1.1\r\nhost: raw.test\r\n\r\n");
    common::within("the request", c.write_all(req.as_bytes()))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        let n = common::within("the response head", c.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "closed before the response head");
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8(got[..end].to_vec()).unwrap();
    let mut rest = got[end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap()[9..12].parse().unwrap();
    let fields: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(": ").unwrap_or_else(|| panic!("line {l:?}"));
            (n.to_string(), v.to_string())
        })
        .collect();
    let len = match (method, status) {
        ("HEAD", _) | (_, 204) => 0,
        _ => fields
            .iter()
            .find(|(n, _)| n == "content-length")
            .map_or(0, |(_, v)| v.parse().unwrap()),
    };
    while rest.len() < len {
        let n = common::within("the response body", c.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "closed before the response body");
        rest.extend_from_slice(&buf[..n]);
    }
    (status, fields, rest)
}

/// The fields of `got` but the service time (its value varies), which must come once, last
/// among the upstream's fields and before an added `server`.
fn without_service_time(got: &[(String, String)]) -> Vec<(String, String)> {
    let at: Vec<usize> = got
        .iter()
        .enumerate()
        .filter(|(_, (n, _))| n == "x-envoy-upstream-service-time")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "{got:?}");
    let mut rest = got.to_vec();
    rest.remove(at[0]);
    rest
}

fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// The upstream's response fields reach the client as Envoy writes them, whether or not
/// anything on the way reads them (without an access log Strait copies a plain head's lines
/// as they came): names lower-cased, values and order kept, the upstream's `server` replaced
/// where it was, `Connection: keep-alive` consumed, `content-length` kept on HEAD and left off
/// a 204; lines not as the codec writes them (no space after the colon, trailing spaces) and
/// heads of many fields come out the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_fields_reach_the_client_as_envoy_writes_them() {
    let many: String = (0..14).map(|i| format!("X-Many-{i}: v{i}\r\n")).collect();
    for logged in [false, true] {
        let raw =
            Raw::start(vec![
            answer(
                b"HTTP/1.1 200 OK\r\nServer: Up/1\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\n\
                  X-Mixed-Case: Va lue\r\nContent-Type: text/plain\r\nSet-Cookie: a=1\r\n\
                  Set-Cookie: b=2\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
                false,
            ),
            answer(
                b"HTTP/1.1 200 OK\r\nX-Tight:v\r\nX-Spaced:   v2  \r\ncontent-length: 0\r\n\r\n",
                false,
            ),
            answer(
                format!("HTTP/1.1 200 OK\r\n{many}Content-Length: 1\r\n\r\nm").as_bytes(),
                false,
            ),
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-H: h\r\n\r\n", false),
            answer(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", false),
            answer(
                b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-B: 2\r\nset-cookie: c=3\r\n\
                  Content-Length: 0\r\n\r\n",
                false,
            ),
        ])
            .await;
        let mut config = Config::new()
            .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
            .cluster("up", &[raw.addr]);
        if !logged {
            config = config.access_logs(Vec::new());
        }
        let strait = config.start().await;
        let mut c = common::connect(strait.listener("ingress")).await.unwrap();

        let (status, got, body) = exchange_raw(&mut c, "GET", "/plain").await;
        assert_eq!((status, &body[..]), (200, &b"ok"[..]), "{logged}");
        assert_eq!(
            without_service_time(&got),
            fields(&[
                ("server", "envoy"),
                ("date", "Tue, 01 Jan 2030 00:00:00 GMT"),
                ("x-mixed-case", "Va lue"),
                ("content-type", "text/plain"),
                ("set-cookie", "a=1"),
                ("set-cookie", "b=2"),
                ("content-length", "2"),
            ]),
            "logged: {logged}"
        );
        assert_eq!(got.last().unwrap().0, "x-envoy-upstream-service-time");

        let (status, got, _) = exchange_raw(&mut c, "GET", "/spacing").await;
        assert_eq!(status, 200);
        let got = without_service_time(&got);
        assert_eq!(
            got[..3],
            fields(&[
                ("x-tight", "v"),
                ("x-spaced", "v2"),
                ("content-length", "0")
            ]),
            "logged: {logged}"
        );
        assert!(got[3..].iter().any(|(n, v)| n == "server" && v == "envoy"));

        let (status, got, body) = exchange_raw(&mut c, "GET", "/many").await;
        assert_eq!((status, &body[..]), (200, &b"m"[..]));
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        let want: Vec<String> = (0..14).map(|i| format!("x-many-{i}")).collect();
        assert_eq!(names[..14], want, "logged: {logged}");
        assert_eq!(got[13].1, "v13");

        let (status, got, _) = exchange_raw(&mut c, "HEAD", "/head").await;
        assert_eq!(status, 200);
        let got = without_service_time(&got);
        assert_eq!(
            got[..2],
            fields(&[("content-length", "5"), ("x-h", "h")]),
            "logged: {logged}"
        );

        let (status, got, _) = exchange_raw(&mut c, "GET", "/nothing").await;
        assert_eq!(status, 204);
        assert!(
            !got.iter()
                .any(|(n, _)| n == "content-length" || n == "transfer-encoding"),
            "{got:?}"
        );
        assert_eq!(got[0], ("x-a".to_string(), "1".to_string()));

        // A name repeated around another: Envoy keeps the order received. (With an access
        // log, Strait's map puts a name's values together.)
        let (status, got, _) = exchange_raw(&mut c, "GET", "/interleaved").await;
        assert_eq!(status, 200);
        let got = without_service_time(&got);
        let mut upstream: Vec<_> = got[..4].to_vec();
        if logged {
            upstream.sort();
        }
        let mut want = fields(&[
            ("set-cookie", "a=1"),
            ("x-b", "2"),
            ("set-cookie", "c=3"),
            ("content-length", "0"),
        ]);
        if logged {
            want.sort();
        }
        assert_eq!(upstream, want, "logged: {logged}");
    }
}
