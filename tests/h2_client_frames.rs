//! Strait's HTTP/2 upstream client spoken to frame by frame: a fake upstream on a raw socket
//! sends what real servers rarely do on cue (a stream limit of one, REFUSED_STREAM, GOAWAY below
//! a stream in flight, a closed flow-control window, trailers over CONTINUATION with padding,
//! garbage) and sees what Strait sends back (RST_STREAM(CANCEL) when the client goes away).

mod common;

use std::net::SocketAddr;

use common::{Client, Config};
use http::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

const REFUSED_STREAM: u32 = 7;
const CANCEL: u32 = 8;

type Frame = (u8, u8, u32, Vec<u8>);

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A raw string literal (RFC 7541 §5.2, no Huffman).
fn string(b: &mut Vec<u8>, s: &str) {
    let mut n = s.len();
    if n < 127 {
        b.push(n as u8);
    } else {
        b.push(127);
        n -= 127;
        while n >= 128 {
            b.push((n % 128) as u8 | 0x80);
            n /= 128;
        }
        b.push(n as u8);
    }
    b.extend_from_slice(s.as_bytes());
}

/// A header block: `:status` (literal, static name 8) when given, then literal fields with new
/// names, none indexed.
fn block(status: Option<&str>, fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    if let Some(s) = status {
        b.push(0x08);
        string(&mut b, s);
    }
    for (n, v) in fields {
        b.push(0x00);
        string(&mut b, n);
        string(&mut b, v);
    }
    b
}

/// RFC 7541 Appendix A, the names.
const STATIC_NAMES: [&str; 61] = [
    ":authority",
    ":method",
    ":method",
    ":path",
    ":path",
    ":scheme",
    ":scheme",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow-origin",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
];

fn int(b: &[u8], at: &mut usize, prefix: u32) -> usize {
    let mask = (1usize << prefix) - 1;
    let mut v = usize::from(b[*at]) & mask;
    *at += 1;
    if v < mask {
        return v;
    }
    let mut shift = 0;
    loop {
        let byte = b[*at];
        *at += 1;
        v += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return v;
        }
    }
}

fn raw_string(b: &[u8], at: &mut usize) -> String {
    assert_eq!(b[*at] & 0x80, 0, "Strait does not Huffman-code");
    let n = int(b, at, 7);
    let s = String::from_utf8_lossy(&b[*at..*at + n]).into_owned();
    *at += n;
    s
}

/// Decodes a request header block as Strait encodes them: static-table indexed pseudo-headers,
/// literals without indexing (or never indexed), raw strings; no dynamic table.
fn decode(b: &[u8]) -> Vec<(String, String)> {
    const INDEXED: [(&str, &str); 7] = [
        (":authority", ""),
        (":method", "GET"),
        (":method", "POST"),
        (":path", "/"),
        (":path", "/index.html"),
        (":scheme", "http"),
        (":scheme", "https"),
    ];
    let mut at = 0;
    let mut fields = Vec::new();
    while at < b.len() {
        let first = b[at];
        if first & 0x80 != 0 {
            let i = int(b, &mut at, 7);
            let (n, v) = INDEXED[i - 1];
            fields.push((n.to_string(), v.to_string()));
        } else if first & 0xe0 == 0x20 {
            let _ = int(b, &mut at, 5);
        } else {
            assert_eq!(first & 0xe0, 0, "Strait never indexes: {first:#x}");
            let i = int(b, &mut at, 4);
            let name = if i == 0 {
                raw_string(b, &mut at)
            } else {
                STATIC_NAMES[i - 1].to_string()
            };
            fields.push((name, raw_string(b, &mut at)));
        }
    }
    fields
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// One connection from Strait, spoken to as an HTTP/2 server.
struct Peer {
    s: TcpStream,
}

impl Peer {
    /// Accepts a connection, checks the preface and sends `settings` (Strait's SETTINGS are
    /// acknowledged as they arrive, by [`Self::next`]).
    async fn accept(l: &TcpListener, settings: &[(u16, u32)]) -> Peer {
        let (mut s, _) = common::within("a connection from Strait", l.accept())
            .await
            .unwrap_or_else(|e| panic!("accept: {e}"));
        let mut preface = [0u8; 24];
        s.read_exact(&mut preface)
            .await
            .unwrap_or_else(|e| panic!("preface: {e}"));
        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        let mut p = Vec::new();
        for (id, v) in settings {
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(&v.to_be_bytes());
        }
        let mut peer = Peer { s };
        peer.send(&frame(SETTINGS, 0, 0, &p)).await;
        peer
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s
            .write_all(bytes)
            .await
            .unwrap_or_else(|e| panic!("write: {e}"));
    }

    /// The next frame other than SETTINGS (acknowledged), PINGs' ACKs are returned; `None` at EOF.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            let mut h = [0u8; 9];
            self.s.read_exact(&mut h).await.ok()?;
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let mut p = vec![0u8; len];
            self.s.read_exact(&mut p).await.ok()?;
            if h[3] == SETTINGS {
                if h[4] & ACK == 0 {
                    self.send(&frame(SETTINGS, ACK, 0, &[])).await;
                }
                continue;
            }
            if h[3] == WINDOW_UPDATE {
                continue;
            }
            return Some((h[3], h[4], stream, p));
        }
    }

    /// Frames until `done` says the one just read is the last wanted.
    async fn until(&mut self, mut done: impl FnMut(&Frame) -> bool) -> Vec<Frame> {
        common::within("the frames expected from Strait", async {
            let mut frames = Vec::new();
            while let Some(f) = self.next().await {
                let end = done(&f);
                frames.push(f);
                if end {
                    break;
                }
            }
            frames
        })
        .await
    }

    /// The next request's HEADERS: its stream, its fields, and whether it ended the stream.
    async fn request(&mut self) -> (u32, Vec<(String, String)>, bool) {
        let frames = self.until(|f| f.0 == HEADERS).await;
        let Some(h) = frames.last().filter(|f| f.0 == HEADERS) else {
            panic!("no request HEADERS: {frames:?}");
        };
        assert_ne!(h.1 & END_HEADERS, 0, "{h:?}");
        (h.2, decode(&h.3), h.1 & END_STREAM != 0)
    }

    /// A PING round trip: every frame Strait queued before it read the PING is returned.
    async fn sync(&mut self) -> Vec<Frame> {
        self.send(&frame(PING, 0, 0, b"syncsync")).await;
        let mut frames = self.until(|f| f.0 == PING && f.1 & ACK != 0).await;
        assert!(
            frames.pop().is_some_and(|f| f.3 == b"syncsync"),
            "PING not acknowledged"
        );
        frames
    }

    /// A 200 with `body`, ending the stream.
    async fn ok(&mut self, id: u32, body: &[u8]) {
        let mut bytes = frame(HEADERS, END_HEADERS, id, &block(Some("200"), &[]));
        bytes.extend_from_slice(&frame(DATA, END_STREAM, id, body));
        self.send(&bytes).await;
    }
}

async fn listener() -> (TcpListener, SocketAddr) {
    let l = common::bind().await;
    let addr = common::local_addr(&l);
    (l, addr)
}

/// Strait with one HTTP/2 cluster `up`. The work-stealing worker model keeps one pool per host,
/// so every request of a test meets the fake upstream's one connection, whichever worker
/// accepted its client (per-core workers would each open their own).
async fn proxy(up: SocketAddr, routes: serde_json::Value) -> common::Strait {
    proxy_with(up, routes, json!({})).await
}

/// [`proxy`], with `extra` merged into the cluster's HTTP protocol options.
async fn proxy_with(
    up: SocketAddr,
    routes: serde_json::Value,
    extra: serde_json::Value,
) -> common::Strait {
    start(routes, h2_cluster(up, extra)).await
}

async fn start(routes: serde_json::Value, cluster: serde_json::Value) -> common::Strait {
    let yaml = Config::new().routes(routes).cluster_json(cluster).yaml();
    common::Strait::start_with(&yaml, &["--worker-model", "work-stealing"]).await
}

/// Strait with `cluster`, and its first connection to the fake upstream (whose SETTINGS are
/// `settings`) once a warm-up request was answered on it. The warm-up may leave before Strait
/// read the SETTINGS; answered, it shows they were read (they came first on the connection).
async fn warmed(
    l: &TcpListener,
    cluster: serde_json::Value,
    settings: &[(u16, u32)],
) -> (common::Strait, Peer) {
    let strait = start(plain_route(), cluster).await;
    let client = Client::h2c();
    let url = strait.url("/warm");
    let warm = tokio::spawn(async move { client.get(&url).await.status });
    let mut peer = Peer::accept(l, settings).await;
    let (id, _, _) = peer.request().await;
    peer.ok(id, b"warm").await;
    assert_eq!(warm.await.ok(), Some(http::StatusCode::OK));
    (strait, peer)
}

/// `n` GETs of `{prefix}/{i}` through Strait at once, on one h2c client connection.
fn concurrent_gets(
    strait: &common::Strait,
    prefix: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<common::Resp>> {
    let client = Client::h2c();
    (0..n)
        .map(|i| {
            let client = client.clone();
            let url = strait.url(&format!("{prefix}/{i}"));
            tokio::spawn(async move { client.get(&url).await })
        })
        .collect()
}

/// Every call got a 200 with `body`.
async fn all_answered(calls: Vec<tokio::task::JoinHandle<common::Resp>>, body: &str) {
    for c in calls {
        let r = c.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, body));
    }
}

/// The cluster `up` over HTTP/2, `extra` merged into its HTTP protocol options.
fn h2_cluster(up: SocketAddr, extra: serde_json::Value) -> serde_json::Value {
    let mut cluster = common::cluster("up", &[up]);
    let mut options = json!({
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}
    });
    if let (Some(o), Some(e)) = (options.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    cluster["typed_extension_protocol_options"] =
        json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options});
    cluster
}

fn plain_route() -> serde_json::Value {
    json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}])
}

/// The access-log line's response flags (its sixth field).
fn flags(line: &str) -> &str {
    line.split(' ').nth(5).unwrap_or_default()
}

/// A connection at the upstream's stream limit (SETTINGS_MAX_CONCURRENT_STREAMS = 1) takes no
/// more streams: the pool opens another connection for the next request, as Envoy's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_at_the_upstreams_stream_limit_makes_the_pool_open_another() {
    let (l, addr) = listener().await;
    let (strait, mut first) = warmed(&l, h2_cluster(addr, json!({})), &[(3, 1)]).await;

    // One request holds the first connection's only stream.
    let client = Client::h2c();
    let url = strait.url("/held");
    let held = tokio::spawn({
        let client = client.clone();
        async move { client.get(&url).await }
    });
    let (held_id, _, _) = first.request().await;
    // The next one goes out on a second connection.
    let url = strait.url("/next");
    let next = tokio::spawn(async move { client.get(&url).await });
    let mut second = Peer::accept(&l, &[(3, 1)]).await;
    let (id, fields, _) = second.request().await;
    assert_eq!(field(&fields, ":path"), Some("/next"));
    second.ok(id, b"second").await;
    first.ok(held_id, b"first").await;
    let r = next.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "second"));
    let r = held.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "first"));
    assert_eq!(
        strait.stat("cluster.up.upstream_cx_http2_total").await,
        Some(2)
    );
}

/// The upstream allows one stream at a time and the cluster one connection
/// (`circuit_breakers.max_connections: 1`): five requests on one downstream connection go out
/// one after another on the one upstream connection, each only once the previous stream closed,
/// and all are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_limit_of_one_on_one_connection_serializes_requests() {
    let (l, addr) = listener().await;
    let mut cluster = h2_cluster(addr, json!({}));
    cluster["circuit_breakers"] = json!({"thresholds": [{"max_connections": 1}]});
    let (strait, mut peer) = warmed(&l, cluster, &[(3, 1)]).await;

    let calls = concurrent_gets(&strait, "/one", 5);
    let mut paths = Vec::new();
    for n in 0..5 {
        let (id, fields, _) = peer.request().await;
        paths.push(field(&fields, ":path").unwrap_or_default().to_string());
        if n == 0 {
            // The other four wait in the pool for the connection's one stream.
            assert_eq!(
                strait
                    .wait_stat("cluster.up.upstream_rq_pending_active", 4)
                    .await,
                Some(4)
            );
        }
        // Whatever Strait had queued by now is in: no second stream while this one is open.
        let more = peer.sync().await;
        assert!(
            !more.iter().any(|f| f.0 == HEADERS),
            "a second stream opened over the limit: {more:?}"
        );
        peer.ok(id, b"one").await;
    }
    for c in calls {
        let r = c.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), "one");
    }
    paths.sort();
    assert_eq!(paths, ["/one/0", "/one/1", "/one/2", "/one/3", "/one/4"]);
    assert_eq!(
        strait.stat("cluster.up.upstream_cx_http2_total").await,
        Some(1)
    );
}

/// Requests pending because the one allowed connection is at the upstream's stream limit go
/// out as soon as the upstream raises SETTINGS_MAX_CONCURRENT_STREAMS, while the stream that
/// filled it is still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_requests_go_out_when_the_upstream_raises_its_stream_limit() {
    let (l, addr) = listener().await;
    let mut cluster = h2_cluster(addr, json!({}));
    cluster["circuit_breakers"] = json!({"thresholds": [{"max_connections": 1}]});
    let (strait, mut peer) = warmed(&l, cluster, &[(3, 1)]).await;

    let calls = concurrent_gets(&strait, "/raise", 3);
    let (held, _, _) = peer.request().await;
    assert_eq!(
        strait
            .wait_stat("cluster.up.upstream_rq_pending_active", 2)
            .await,
        Some(2)
    );
    let mut p = Vec::new();
    p.extend_from_slice(&3u16.to_be_bytes());
    p.extend_from_slice(&10u32.to_be_bytes());
    peer.send(&frame(SETTINGS, 0, 0, &p)).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (id, _, _) = peer.request().await;
        ids.push(id);
    }
    ids.push(held);
    for id in ids {
        peer.ok(id, b"raised").await;
    }
    all_answered(calls, "raised").await;
    assert_eq!(
        strait.stat("cluster.up.upstream_cx_http2_total").await,
        Some(1)
    );
}

/// An upstream whose SETTINGS do not limit concurrent streams (gRPC-go's do not) has no limit
/// (RFC 9113 §6.5.2): 150 concurrent requests share its one connection, past the 100 streams
/// a client assumes before the first SETTINGS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_without_a_stream_limit_mean_no_limit() {
    let (l, addr) = listener().await;
    let (strait, mut peer) = warmed(&l, h2_cluster(addr, json!({})), &[(4, 65_535)]).await;

    let calls = concurrent_gets(&strait, "/many", 150);
    let mut ids = Vec::new();
    for _ in 0..150 {
        let (id, _, _) = peer.request().await;
        ids.push(id);
    }
    for id in ids {
        peer.ok(id, b"many").await;
    }
    all_answered(calls, "many").await;
    assert_eq!(
        strait.stat("cluster.up.upstream_cx_http2_total").await,
        Some(1)
    );
}

/// REFUSED_STREAM from the upstream: without a retry policy a 503 with Envoy's `remote refused
/// stream reset` and `UR`; with `retry_on: refused-stream` the request is retried and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_503_ur_or_retried() {
    let (l, addr) = listener().await;
    let strait = proxy(
        addr,
        json!([
            {"match": {"prefix": "/retried"}, "route": {"cluster": "up",
                "retry_policy": {"retry_on": "refused-stream", "num_retries": 1}}},
            {"match": {"prefix": "/"}, "route": {"cluster": "up"}}
        ]),
    )
    .await;
    let url = strait.url("/refused");
    let plain = tokio::spawn(async move { Client::http1().get(&url).await });
    let mut peer = Peer::accept(&l, &[]).await;
    let (id, _, _) = peer.request().await;
    peer.send(&frame(RST_STREAM, 0, id, &REFUSED_STREAM.to_be_bytes()))
        .await;
    let r = plain.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 503);
    assert_eq!(
        r.text(),
        "upstream connect error or disconnect/reset before headers. reset reason: remote refused stream reset"
    );
    let lines = strait.access_log("GET /refused", 1).await;
    assert_eq!(flags(&lines[0]), "UR", "{}", lines[0]);

    let url = strait.url("/retried");
    let retried = tokio::spawn(async move { Client::http1().get(&url).await });
    let (id, _, _) = peer.request().await;
    peer.send(&frame(RST_STREAM, 0, id, &REFUSED_STREAM.to_be_bytes()))
        .await;
    let (again, fields, _) = peer.request().await;
    assert!(again > id, "the retry is a new stream");
    assert_eq!(field(&fields, ":path"), Some("/retried"));
    peer.ok(again, b"second try").await;
    let r = retried.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "second try"));
    assert_eq!(
        strait.wait_stat("cluster.up.upstream_rq_retry", 1).await,
        Some(1)
    );
}

/// GOAWAY whose last stream id is below a stream in flight: that stream was never processed,
/// so it fails as refused, and the retry goes out on a new connection (the old one takes no
/// new streams).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_above_goaway_is_retried_on_a_new_connection() {
    let (l, addr) = listener().await;
    let strait = proxy(
        addr,
        json!([{"match": {"prefix": "/"}, "route": {"cluster": "up",
            "retry_policy": {"retry_on": "refused-stream", "num_retries": 1}}}]),
    )
    .await;
    let url = strait.url("/goaway");
    let call = tokio::spawn(async move { Client::http1().get(&url).await });
    let mut first = Peer::accept(&l, &[]).await;
    let (id, _, _) = first.request().await;
    // Last stream id 0: nothing was processed.
    let mut p = 0u32.to_be_bytes().to_vec();
    p.extend_from_slice(&0u32.to_be_bytes());
    first.send(&frame(GOAWAY, 0, 0, &p)).await;
    let mut second = Peer::accept(&l, &[]).await;
    let (id2, fields, _) = second.request().await;
    assert_eq!(field(&fields, ":path"), Some("/goaway"));
    second.ok(id2, b"from the second connection").await;
    let r = call.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "from the second connection");
    assert_eq!(id, 1);
    assert_eq!(
        strait.wait_stat("cluster.up.upstream_rq_retry", 1).await,
        Some(1)
    );
    // The first connection is closed by Strait once it has no streams left.
    let rest = first.until(|_| false).await;
    assert!(!rest.iter().any(|f| f.0 == HEADERS), "{rest:?}");
}

/// A gRPC-shaped response: the head split over a padded HEADERS with priority and a
/// CONTINUATION, two DATA frames (one padded), then trailers. The client gets the body and the
/// trailers intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_trailers_and_split_heads_arrive_intact() {
    let (l, addr) = listener().await;
    let strait = proxy(addr, plain_route()).await;
    let url = strait.url("/pkg.Svc/Call");
    let call = tokio::spawn(async move {
        let req = common::req(
            Method::POST,
            &url,
            &[("content-type", "application/grpc"), ("te", "trailers")],
            common::full(&b"\0\0\0\0\x03abc"[..]),
        );
        let resp = Client::h2c().send_streaming(req).await;
        let (parts, body) = resp.into_parts();
        let collected = http_body_util::BodyExt::collect(body)
            .await
            .unwrap_or_else(|e| panic!("body: {e}"));
        let trailers = collected.trailers().cloned();
        (parts, collected.to_bytes(), trailers)
    });
    let mut peer = Peer::accept(&l, &[]).await;
    let (id, fields, eos) = peer.request().await;
    assert_eq!(field(&fields, ":method"), Some("POST"));
    assert_eq!(field(&fields, ":path"), Some("/pkg.Svc/Call"));
    assert_eq!(field(&fields, "te"), Some("trailers"));
    assert_eq!(field(&fields, "content-type"), Some("application/grpc"));
    if !eos {
        let body = peer.until(|f| f.0 == DATA && f.1 & END_STREAM != 0).await;
        let bytes: Vec<u8> = body
            .iter()
            .filter(|f| f.0 == DATA)
            .flat_map(|f| f.3.clone())
            .collect();
        assert_eq!(bytes, b"\0\0\0\0\x03abc");
    }
    let head = block(
        Some("200"),
        &[("content-type", "application/grpc"), ("x-split", "yes")],
    );
    let (a, b) = head.split_at(6);
    let mut first = vec![2]; // pad length
    first.extend_from_slice(&[0, 0, 0, 0, 15]); // priority: stream 0, weight 16
    first.extend_from_slice(a);
    first.extend_from_slice(&[0, 0]);
    let mut bytes = frame(HEADERS, PADDED | PRIORITY, id, &first);
    bytes.extend_from_slice(&frame(CONTINUATION, END_HEADERS, id, b));
    bytes.extend_from_slice(&frame(DATA, 0, id, b"\0\0\0\0\x02"));
    let mut padded = vec![3];
    padded.extend_from_slice(b"ok");
    padded.extend_from_slice(&[0, 0, 0]);
    bytes.extend_from_slice(&frame(DATA, PADDED, id, &padded));
    let trailers = block(None, &[("grpc-status", "0"), ("grpc-message", "fine")]);
    bytes.extend_from_slice(&frame(HEADERS, END_HEADERS | END_STREAM, id, &trailers));
    peer.send(&bytes).await;
    let (parts, body, trailers) = call.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parts.status, 200);
    assert_eq!(parts.headers["x-split"], "yes");
    assert_eq!(&body[..], b"\0\0\0\0\x02ok");
    let trailers = trailers.unwrap_or_else(|| panic!("no trailers"));
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "fine");
}

/// The upstream opens with a stream window of 0: Strait sends the request head but no data
/// until WINDOW_UPDATEs come, then a 1 MiB upload goes through in the windows granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_waits_for_window_updates_and_finishes() {
    const SIZE: usize = 1024 * 1024;
    let (l, addr) = listener().await;
    let strait = proxy(addr, plain_route()).await;
    let client = Client::h2c();
    let url = strait.url("/warm");
    let warm = tokio::spawn({
        let client = client.clone();
        async move { client.get(&url).await.status }
    });
    let mut peer = Peer::accept(&l, &[(4, 0)]).await;
    let (id, _, _) = peer.request().await;
    peer.ok(id, b"").await;
    assert_eq!(warm.await.ok(), Some(http::StatusCode::OK));

    let url = strait.url("/upload");
    let upload = tokio::spawn(async move {
        let len = SIZE.to_string();
        let headers = [("content-length", len.as_str())];
        let req = common::req(Method::POST, &url, &headers, common::generated(SIZE as u64));
        client.send(req).await
    });
    let (id, fields, eos) = peer.request().await;
    assert!(!eos);
    assert_eq!(field(&fields, "content-length"), Some("1048576"));
    assert_eq!(
        strait.wait_stat("cluster.up.upstream_rq_total", 2).await,
        Some(2)
    );
    let before = peer.sync().await;
    assert!(
        !before.iter().any(|f| f.0 == DATA && !f.3.is_empty()),
        "DATA sent without window: {before:?}"
    );
    // Grant 64 KiB at a time, on the stream and the connection, as data arrives.
    let mut got = 0usize;
    let mut granted = 0usize;
    let mut ended = false;
    while !ended {
        if granted == got {
            let mut wu = frame(WINDOW_UPDATE, 0, id, &65_536u32.to_be_bytes());
            wu.extend_from_slice(&frame(WINDOW_UPDATE, 0, 0, &65_536u32.to_be_bytes()));
            peer.send(&wu).await;
            granted += 65_536;
        }
        let f = common::within("upload data", peer.next())
            .await
            .unwrap_or_else(|| panic!("connection closed after {got} bytes"));
        if f.0 == DATA && f.2 == id {
            got += f.3.len();
            ended = f.1 & END_STREAM != 0;
            assert!(got <= granted, "{got} bytes sent with {granted} granted");
        }
    }
    assert_eq!(got, SIZE);
    peer.ok(id, format!("got {got}").as_bytes()).await;
    let r = upload.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "got 1048576");
}

/// An upstream that answers the preface with garbage (an HTTP/1.1 answer): the request fails
/// with 503 `UC` (connection termination, as with the h2 crate's client), Strait sends
/// GOAWAY, and it keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_upstream_is_503_uc() {
    let (l, addr) = listener().await;
    let strait = proxy(addr, plain_route()).await;
    let url = strait.url("/garbage");
    let call = tokio::spawn(async move { Client::http1().get(&url).await });
    let (mut s, _) = common::within("a connection", l.accept())
        .await
        .unwrap_or_else(|e| panic!("accept: {e}"));
    let mut preface = [0u8; 24];
    s.read_exact(&mut preface)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let r = call.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 503);
    assert_eq!(
        r.text(),
        "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
    );
    let lines = strait.access_log("GET /garbage", 1).await;
    assert_eq!(flags(&lines[0]), "UC", "{}", lines[0]);
    // Strait closes the connection (with GOAWAY first).
    let mut rest = Vec::new();
    common::within("the connection to close", s.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        strait
            .wait_stat("cluster.up.upstream_cx_protocol_error", 1)
            .await,
        Some(1)
    );
    assert_eq!(
        strait
            .wait_stat("cluster.up.upstream_cx_destroy_local", 1)
            .await,
        Some(1)
    );
    // Still serving: the next request gets a connection of its own.
    let url = strait.url("/after");
    let next = tokio::spawn(async move { Client::http1().get(&url).await });
    let mut peer = Peer::accept(&l, &[]).await;
    let (id, _, _) = peer.request().await;
    peer.ok(id, b"fine").await;
    let r = next.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "fine"));
}

/// A client that goes away in the middle of a response: Strait resets the upstream stream with
/// CANCEL, and the connection serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_response_cancels_the_upstream_stream() {
    let (l, addr) = listener().await;
    let strait = proxy(addr, plain_route()).await;
    let mut c = common::connect(strait.listener("ingress"))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    c.write_all(b"GET /long HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut peer = Peer::accept(&l, &[]).await;
    let (id, _, _) = peer.request().await;
    let mut bytes = frame(HEADERS, END_HEADERS, id, &block(Some("200"), &[]));
    bytes.extend_from_slice(&frame(DATA, 0, id, b"first part;"));
    peer.send(&bytes).await;
    // The client reads the head and the first part, then leaves.
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(11).any(|w| w == b"first part;") {
        let n = common::within("the first part", c.read(&mut buf))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    drop(c);
    let frames = peer.until(|f| f.0 == RST_STREAM).await;
    let rst = frames
        .last()
        .filter(|f| f.0 == RST_STREAM)
        .unwrap_or_else(|| panic!("no RST_STREAM: {frames:?}"));
    assert_eq!((rst.2, rst.3.clone()), (id, CANCEL.to_be_bytes().to_vec()));
    // The connection itself stays in use.
    let url = strait.url("/next");
    let next = tokio::spawn(async move { Client::http1().get(&url).await });
    let (id2, _, _) = peer.request().await;
    assert!(id2 > id);
    peer.ok(id2, b"next").await;
    let r = next.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 200);
    assert_eq!(
        strait.stat("cluster.up.upstream_cx_http2_total").await,
        Some(1)
    );
}

/// The upstream answers in full and then resets with NO_ERROR while the request body is still
/// coming (RFC 9113 §8.1: stop sending, the response stands): the client gets the whole answer
/// and Strait sends no more DATA on the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_with_no_error_reset_stops_the_upload() {
    let (l, addr) = listener().await;
    let strait = proxy(addr, plain_route()).await;
    type Chunk = Result<hyper::body::Frame<bytes::Bytes>, common::BoxError>;
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(4);
    let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let url = strait.url("/early");
    let call = tokio::spawn(async move {
        let req = common::req(Method::POST, &url, &[], body);
        Client::h2c().send(req).await
    });
    let _ = tx
        .send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
            b"part one;",
        ))))
        .await;
    let mut peer = Peer::accept(&l, &[]).await;
    let (id, _, eos) = peer.request().await;
    assert!(!eos);
    let frames = peer.until(|f| f.0 == DATA).await;
    assert_eq!(
        frames.last().map(|f| f.3.clone()),
        Some(b"part one;".to_vec())
    );
    let mut bytes = frame(HEADERS, END_HEADERS, id, &block(Some("200"), &[]));
    bytes.extend_from_slice(&frame(DATA, END_STREAM, id, b"answered early"));
    bytes.extend_from_slice(&frame(RST_STREAM, 0, id, &0u32.to_be_bytes()));
    peer.send(&bytes).await;
    let r = call.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "answered early")
    );
    // The client is told to stop too (its body is dropped), and nothing more went upstream.
    common::within("the client's upload to be stopped", tx.closed()).await;
    let after = peer.sync().await;
    assert!(
        !after
            .iter()
            .any(|f| f.2 == id && (f.0 == DATA || f.0 == RST_STREAM)),
        "{after:?}"
    );
}

/// GOAWAY naming the streams in flight: they are answered on the old connection, the next
/// request goes out on a new one, and the old one is closed once its streams are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_goaway_streams_in_flight_finish_and_new_ones_use_a_new_connection() {
    let (l, addr) = listener().await;
    let strait = proxy(addr, plain_route()).await;
    let calls = concurrent_gets(&strait, "/inflight", 2);
    let mut old = Peer::accept(&l, &[]).await;
    let (a, _, _) = old.request().await;
    let (b, _, _) = old.request().await;
    let mut p = a.max(b).to_be_bytes().to_vec();
    p.extend_from_slice(&0u32.to_be_bytes());
    old.send(&frame(GOAWAY, 0, 0, &p)).await;
    // Once Strait has read the GOAWAY, a new request must not go out on this connection.
    assert!(old.sync().await.is_empty());
    let url = strait.url("/later");
    let later = tokio::spawn(async move { Client::http1().get(&url).await });
    let mut new = Peer::accept(&l, &[]).await;
    let (c, fields, _) = new.request().await;
    assert_eq!(field(&fields, ":path"), Some("/later"));
    new.ok(c, b"new").await;
    old.ok(a, b"old").await;
    old.ok(b, b"old").await;
    for call in calls {
        let r = call.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "old"));
    }
    let r = later.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "new"));
    let rest = old.until(|_| false).await;
    assert!(
        rest.iter().all(|f| f.0 == GOAWAY),
        "only a GOAWAY after the answers, then the close: {rest:?}"
    );
    assert_eq!(
        strait.stat("cluster.up.upstream_cx_http2_total").await,
        Some(2)
    );
}

/// The route timeout expires while the upstream has not answered: 504 `UT` for the client, and
/// the upstream stream is reset with CANCEL (the exchange waiting for the head was dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_before_the_head_cancels_the_upstream_stream() {
    let (l, addr) = listener().await;
    let strait = proxy(
        addr,
        json!([{"match": {"prefix": "/"}, "route": {"cluster": "up", "timeout": "0.2s"}}]),
    )
    .await;
    let url = strait.url("/slow");
    let call = tokio::spawn(async move { Client::http1().get(&url).await });
    let mut peer = Peer::accept(&l, &[]).await;
    let (id, _, _) = peer.request().await;
    let frames = peer.until(|f| f.0 == RST_STREAM).await;
    let rst = frames
        .last()
        .filter(|f| f.0 == RST_STREAM)
        .unwrap_or_else(|| panic!("no RST_STREAM: {frames:?}"));
    assert_eq!((rst.2, rst.3.clone()), (id, CANCEL.to_be_bytes().to_vec()));
    let r = call.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status, 504);
    let lines = strait.access_log("GET /slow", 1).await;
    assert_eq!(flags(&lines[0]), "UT", "{}", lines[0]);
}

/// The upstream resets a stream mid-response: an h2c client's stream is reset with the same
/// error code (its body fails with INTERNAL_ERROR here), and the connection stays in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_response_reaches_the_client_with_its_code() {
    let (l, addr) = listener().await;
    let strait = proxy(addr, plain_route()).await;
    let url = strait.url("/cut");
    let client = Client::h2c();
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            let resp = client.get_streaming(&url).await;
            let status = resp.status();
            let body = http_body_util::BodyExt::collect(resp.into_body()).await;
            (status, body.map(|_| ()).map_err(|e| format!("{e:?}")))
        }
    });
    let mut peer = Peer::accept(&l, &[]).await;
    let (id, _, _) = peer.request().await;
    let mut bytes = frame(HEADERS, END_HEADERS, id, &block(Some("200"), &[]));
    bytes.extend_from_slice(&frame(DATA, 0, id, b"partial"));
    bytes.extend_from_slice(&frame(RST_STREAM, 0, id, &2u32.to_be_bytes()));
    peer.send(&bytes).await;
    let (status, body) = call.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status, 200);
    let err = body.expect_err("the body must fail");
    assert!(err.contains("INTERNAL_ERROR"), "{err}");
    let url = strait.url("/next");
    let next = tokio::spawn(async move { client.get(&url).await });
    let (id2, _, _) = peer.request().await;
    peer.ok(id2, b"next").await;
    let r = next.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "next"));
}

/// An idle connection is closed after the cluster's `idle_timeout` (counted as Envoy does),
/// a busy one is not: the driver's idle timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let (l, addr) = listener().await;
    let strait = proxy_with(
        addr,
        plain_route(),
        json!({"common_http_protocol_options": {"idle_timeout": "0.3s"}}),
    )
    .await;
    let url = strait.url("/once");
    let call = tokio::spawn(async move { Client::http1().get(&url).await });
    let mut peer = Peer::accept(&l, &[]).await;
    let (id, _, _) = peer.request().await;
    peer.ok(id, b"once").await;
    assert_eq!(call.await.ok().map(|r| r.status.as_u16()), Some(200));
    let answered = std::time::Instant::now();
    // Strait closes the connection (GOAWAY is all it sends first).
    let rest = peer.until(|_| false).await;
    assert!(rest.iter().all(|f| f.0 == GOAWAY), "{rest:?}");
    assert!(
        answered.elapsed() >= std::time::Duration::from_millis(250),
        "closed after {:?}",
        answered.elapsed()
    );
    assert_eq!(
        strait
            .wait_stat("cluster.up.upstream_cx_idle_timeout", 1)
            .await,
        Some(1)
    );
    assert_eq!(
        strait.stat("cluster.up.upstream_cx_destroy_local").await,
        Some(1)
    );
}

/// An upstream that floods PINGs and never reads what Strait sends: Strait stops reading it
/// once the ACKs it owes fill its output buffer (as `h2server` does; the h2 crate kept one
/// pending pong), so the flood backs up into the upstream's socket instead of Strait's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_from_an_upstream_that_does_not_read_is_bounded() {
    let (l, addr) = listener().await;
    let strait = proxy(addr, plain_route()).await;
    let url = strait.url("/warm");
    let warm = tokio::spawn(async move { Client::h2c().get(&url).await.status });
    let mut peer = Peer::accept(&l, &[]).await;
    let (id, _, _) = peer.request().await;
    peer.ok(id, b"warm").await;
    assert_eq!(warm.await.ok(), Some(http::StatusCode::OK));
    let _ = peer.sync().await;
    let (rss0, _) = strait.memory_kb();
    // From here the upstream never reads.
    let chunk: Vec<u8> = (0..4096)
        .flat_map(|_| frame(PING, 0, 0, b"floodxyz"))
        .collect();
    let mut sent = 0usize;
    while sent < 96 << 20 {
        let w = tokio::time::timeout(std::time::Duration::from_secs(3), peer.s.write_all(&chunk));
        match w.await {
            Ok(Ok(())) => sent += chunk.len(),
            Ok(Err(e)) => panic!("write: {e}"),
            Err(_) => break,
        }
    }
    let (rss1, _) = strait.memory_kb();
    assert!(
        sent < 32 << 20,
        "Strait kept reading PINGs it could not answer: {} MiB, RSS {} -> {} MiB",
        sent >> 20,
        rss0 >> 10,
        rss1 >> 10
    );
}

/// The upstream resets a stream mid-response with CANCEL or NO_ERROR, codes the h2 crate and
/// hyper take as a clean end of the body: the response was cut short all the same, so an
/// HTTP/1.1 client's chunked body fails rather than ending with a last chunk that would make the
/// truncated answer look whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_mid_response_does_not_complete_the_clients_body() {
    let (l, addr) = listener().await;
    let strait = proxy(addr, plain_route()).await;
    let mut peer = None;
    for (n, code) in [8u32, 0].into_iter().enumerate() {
        let url = strait.url(&format!("/cut{n}"));
        let call = tokio::spawn(async move {
            let resp = Client::http1().get_streaming(&url).await;
            let status = resp.status();
            let body = http_body_util::BodyExt::collect(resp.into_body()).await;
            (
                status,
                body.map(|b| b.to_bytes()).map_err(|e| format!("{e:?}")),
            )
        });
        if peer.is_none() {
            peer = Some(Peer::accept(&l, &[]).await);
        }
        let Some(p) = peer.as_mut() else {
            unreachable!("set above")
        };
        let (id, _, _) = p.request().await;
        let mut bytes = frame(HEADERS, END_HEADERS, id, &block(Some("200"), &[]));
        bytes.extend_from_slice(&frame(DATA, 0, id, b"partial"));
        bytes.extend_from_slice(&frame(RST_STREAM, 0, id, &code.to_be_bytes()));
        p.send(&bytes).await;
        let (status, body) = call.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, 200);
        assert!(
            body.is_err(),
            "RST_STREAM({code}) mid-response reached the client as a whole body: {body:?}"
        );
    }
}

/// Malformed answers on one stream are that stream's errors (RFC 9113): a PRIORITY frame of the
/// wrong size (§6.3) and a 101 head, which HTTP/2 does not have (§8.6). Each request fails with
/// a 503, and the connection serves the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_priority_frame_or_a_101_fails_only_its_stream() {
    let (l, addr) = listener().await;
    let strait = proxy(addr, plain_route()).await;
    let mut peer = None;
    const PRIORITY_FRAME: u8 = 2;
    let bad_priority = |id| frame(PRIORITY_FRAME, 0, id, &[0, 0, 0, 0]);
    let switching = |id| frame(HEADERS, END_HEADERS, id, &block(Some("101"), &[]));
    let answers: [&dyn Fn(u32) -> Vec<u8>; 2] = [&bad_priority, &switching];
    for (n, answer) in answers.into_iter().enumerate() {
        let url = strait.url(&format!("/bad{n}"));
        let call = tokio::spawn(async move { Client::http1().get(&url).await });
        if peer.is_none() {
            peer = Some(Peer::accept(&l, &[]).await);
        }
        let Some(p) = peer.as_mut() else {
            unreachable!("set above")
        };
        let (id, _, _) = p.request().await;
        p.send(&answer(id)).await;
        let r = call.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, 503, "answer {n}: {}", r.text());
    }
    let Some(p) = peer.as_mut() else {
        unreachable!("set above")
    };
    let url = strait.url("/after");
    let next = tokio::spawn(async move { Client::http1().get(&url).await });
    let (id, _, _) = p.request().await;
    p.ok(id, b"fine").await;
    let r = next.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "fine"));
}
