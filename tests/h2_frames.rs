//! Strait's HTTP/2 server codec spoken to frame by frame, for what ordinary clients rarely send:
//! header blocks split over CONTINUATION with padding and priority, PING, malformed requests,
//! bodies that contradict their Content-Length, a client's HPACK table size of zero, and a
//! rapid-reset flood.

mod common;

use common::{Config, Upstream};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

async fn proxy(up: &Upstream) -> common::Strait {
    Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
        .cluster("up", &[up.addr])
        .start()
        .await
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A literal field without indexing, new name, raw strings (RFC 7541 §6.2.2).
fn literal(name: &str, value: &str) -> Vec<u8> {
    let mut b = vec![0x00];
    for s in [name, value] {
        string(&mut b, s);
    }
    b
}

/// A raw string literal: its length as a 7-bit-prefix integer (RFC 7541 §5.1), then its bytes.
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

/// `method` (static-table literal name), `:scheme http`, `:path`, `:authority`, then `extra`.
fn request_block(method: &str, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0x02, method.len() as u8];
    b.extend_from_slice(method.as_bytes());
    b.push(0x86); // :scheme http
    b.extend_from_slice(&[0x04, path.len() as u8]);
    b.extend_from_slice(path.as_bytes());
    b.extend_from_slice(&[0x01, 9]);
    b.extend_from_slice(b"127.0.0.1");
    for (n, v) in extra {
        b.extend_from_slice(&literal(n, v));
    }
    b
}

/// Connects, sends the preface and `settings`, and returns the stream.
async fn open(strait: &common::Strait, settings: &[(u16, u32)]) -> TcpStream {
    let mut s = common::connect(strait.listener("ingress"))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let mut p = Vec::new();
    for (id, v) in settings {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    bytes.extend_from_slice(&frame(SETTINGS, 0, 0, &p));
    send(&mut s, &bytes).await;
    s
}

async fn send(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes)
        .await
        .unwrap_or_else(|e| panic!("write: {e}"));
}

/// Reads frames until `done` says the one just read is the last wanted: `(type, flags, stream,
/// payload)` of each.
async fn read_until(
    s: &mut TcpStream,
    mut done: impl FnMut(u8, u8, u32) -> bool,
) -> Vec<(u8, u8, u32, Vec<u8>)> {
    common::within("the frames expected", async {
        let mut frames = Vec::new();
        loop {
            let mut h = [0u8; 9];
            if s.read_exact(&mut h).await.is_err() {
                return frames;
            }
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            let mut p = vec![0u8; len];
            if s.read_exact(&mut p).await.is_err() {
                return frames;
            }
            let end = done(h[3], h[4], stream);
            frames.push((h[3], h[4], stream, p));
            if end {
                return frames;
            }
        }
    })
    .await
}

/// Reads until stream `id` ends (END_STREAM or RST_STREAM) and returns its frames.
async fn stream_frames(s: &mut TcpStream, id: u32) -> Vec<(u8, u8, u32, Vec<u8>)> {
    read_until(s, |kind, flags, stream| {
        stream == id && (kind == RST_STREAM || (kind != 9 && flags & END_STREAM != 0))
    })
    .await
    .into_iter()
    .filter(|f| f.2 == id)
    .collect()
}

/// The stream's last frame is RST_STREAM with this error code (PROTOCOL_ERROR is 1).
fn assert_reset(frames: &[(u8, u8, u32, Vec<u8>)], code: u32) {
    assert_eq!(
        frames.last().map(|f| (f.0, f.3.clone())),
        Some((RST_STREAM, code.to_be_bytes().to_vec())),
        "{frames:?}"
    );
}

/// The access-log line's response flags (its sixth field) include `flag`.
fn assert_flag(line: &str, flag: &str) {
    let flags = line.split(' ').nth(5).unwrap_or_default();
    assert!(flags.split(',').any(|f| f == flag), "{line}");
}

/// The `:status` of a response header block as Strait encodes it: an indexed 200 (0x88) after
/// an optional table size update.
fn is_200(block: &[u8]) -> bool {
    let b = if block.first() == Some(&0x20) {
        &block[1..]
    } else {
        block
    };
    b.first() == Some(&0x88)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_is_acknowledged_with_its_payload() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let mut s = open(&strait, &[]).await;
    send(&mut s, &frame(PING, 0, 0, b"strait!!")).await;
    let frames = read_until(&mut s, |kind, _, _| kind == PING).await;
    let ping = frames.last().unwrap_or_else(|| panic!("no frames"));
    assert_eq!((ping.0, ping.1), (PING, 1), "{frames:?}");
    assert_eq!(ping.3, b"strait!!");
}

/// A header block in a padded HEADERS frame with priority, finished by CONTINUATION frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_over_continuation_frames_with_padding_and_priority_is_served() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let mut s = open(&strait, &[]).await;
    let block = request_block("GET", "/split", &[("x-part", "three")]);
    let (a, rest) = block.split_at(7);
    let (b, c) = rest.split_at(9);
    let mut first = vec![3]; // pad length
    first.extend_from_slice(&[0, 0, 0, 0, 15]); // depends on stream 0, weight 16
    first.extend_from_slice(a);
    first.extend_from_slice(&[0, 0, 0]);
    let mut bytes = frame(HEADERS, END_STREAM | PADDED | PRIORITY, 1, &first);
    bytes.extend_from_slice(&frame(CONTINUATION, 0, 1, b));
    bytes.extend_from_slice(&frame(CONTINUATION, END_HEADERS, 1, c));
    send(&mut s, &bytes).await;
    let frames = stream_frames(&mut s, 1).await;
    let head = frames
        .iter()
        .find(|f| f.0 == HEADERS)
        .unwrap_or_else(|| panic!("no response HEADERS: {frames:?}"));
    assert!(is_200(&head.3), "{frames:?}");
    let body: Vec<u8> = frames
        .iter()
        .filter(|f| f.0 == DATA)
        .flat_map(|f| f.3.clone())
        .collect();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v["path"], "/split");
    assert_eq!(v["headers"]["x-part"][0], "three");
}

/// An uppercase field name makes the request malformed (RFC 9113 §8.2.1): that stream is reset
/// with PROTOCOL_ERROR before reaching the upstream; the connection serves the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_resets_its_stream_only() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let mut s = open(&strait, &[]).await;
    let bad = request_block("GET", "/bad", &[("X-Upper", "1")]);
    send(&mut s, &frame(HEADERS, END_STREAM | END_HEADERS, 1, &bad)).await;
    let frames = stream_frames(&mut s, 1).await;
    assert_reset(&frames, 1);
    let good = request_block("GET", "/good", &[]);
    send(&mut s, &frame(HEADERS, END_STREAM | END_HEADERS, 3, &good)).await;
    let frames = stream_frames(&mut s, 3).await;
    assert!(
        frames.iter().any(|f| f.0 == HEADERS && is_200(&f.3)),
        "{frames:?}"
    );
    assert_eq!(
        up.requests(),
        1,
        "only the good request reached the upstream"
    );
}

/// Less data than the request's Content-Length: the stream is reset with PROTOCOL_ERROR
/// (RFC 9113 §8.1.1) and the upstream request does not complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_short_of_the_content_length_resets_the_stream() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let mut s = open(&strait, &[]).await;
    let block = request_block("POST", "/short", &[("content-length", "10")]);
    let mut bytes = frame(HEADERS, END_HEADERS, 1, &block);
    bytes.extend_from_slice(&frame(DATA, END_STREAM, 1, b"abc"));
    send(&mut s, &bytes).await;
    let frames = stream_frames(&mut s, 1).await;
    let rst = frames
        .iter()
        .find(|f| f.0 == RST_STREAM)
        .unwrap_or_else(|| panic!("no RST_STREAM: {frames:?}"));
    assert_eq!(rst.3, vec![0, 0, 0, 1]);
    assert!(
        !frames.iter().any(|f| f.0 == HEADERS && is_200(&f.3)),
        "a short body must not be answered 200: {frames:?}"
    );
}

/// A client that sets SETTINGS_HEADER_TABLE_SIZE to 0 expects the next header block to start
/// with a dynamic table size update (RFC 7541 §4.2); nghttp2 fails the connection otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_table_size_of_zero_gets_a_size_update() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let mut s = open(&strait, &[(1, 0)]).await;
    let block = request_block("GET", "/t", &[]);
    send(&mut s, &frame(HEADERS, END_STREAM | END_HEADERS, 1, &block)).await;
    let frames = stream_frames(&mut s, 1).await;
    let head = frames
        .iter()
        .find(|f| f.0 == HEADERS)
        .unwrap_or_else(|| panic!("no response HEADERS: {frames:?}"));
    assert_eq!(head.3.first(), Some(&0x20), "{:?}", head.3);
    assert!(is_200(&head.3));
}

/// Streams opened and reset at once, over and over (CVE-2023-44487): once 500 streams closed
/// with half or more reset before their response, the connection gets GOAWAY(ENHANCE_YOUR_CALM)
/// and ends, as Envoy's premature-reset guard does; the proxy serves other connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_ends_the_connection() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let s = open(&strait, &[]).await;
    let (mut rx, mut tx) = s.into_split();
    // Everything the proxy sends, until its GOAWAY (or the connection's end).
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 65536];
        loop {
            match rx.read(&mut chunk).await {
                Ok(0) | Err(_) => return buf,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if goaway_code(&buf).is_some() {
                return buf;
            }
        }
    });
    let block = request_block("GET", "/flood", &[]);
    // Bounded: 5,000 streams at most, in batches of 50.
    for batch in 0..100u32 {
        if reader.is_finished() {
            break;
        }
        let mut bytes = Vec::new();
        for i in 0..50u32 {
            let id = 1 + 2 * (batch * 50 + i);
            bytes.extend_from_slice(&frame(HEADERS, END_STREAM | END_HEADERS, id, &block));
            bytes.extend_from_slice(&frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        }
        if tx.write_all(&bytes).await.is_err() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let buf = common::within("the GOAWAY", reader)
        .await
        .unwrap_or_else(|e| panic!("reader: {e}"));
    assert_eq!(goaway_code(&buf), Some(0xb), "ENHANCE_YOUR_CALM");
    assert!(
        up.requests() < 5000,
        "the flood was stopped before all its streams ran ({} reached the upstream)",
        up.requests()
    );
    assert_eq!(
        common::Client::h2c()
            .get(&strait.url("/after"))
            .await
            .status,
        200
    );
}

/// The error code of the first GOAWAY among the whole frames in `buf`.
fn goaway_code(buf: &[u8]) -> Option<u32> {
    let mut at = 0;
    while buf.len() >= at + 9 {
        let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
        if buf.len() < at + 9 + len {
            return None;
        }
        if buf[at + 3] == GOAWAY && len >= 8 {
            let p = &buf[at + 9..];
            return Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        }
        at += 9 + len;
    }
    None
}

/// A stream error in the middle of an upload (here a WINDOW_UPDATE of 0 on the stream): the
/// stream is reset with PROTOCOL_ERROR, and the request is stopped rather than forwarded as if
/// its body had ended; the access log says `DPE` (Envoy's downstream protocol error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_error_mid_upload_stops_the_request() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let mut s = open(&strait, &[]).await;
    let block = request_block("POST", "/upload", &[]);
    let mut bytes = frame(HEADERS, END_HEADERS, 1, &block);
    bytes.extend_from_slice(&frame(DATA, 0, 1, &[b'x'; 100]));
    send(&mut s, &bytes).await;
    up.wait_requests(1).await;
    send(&mut s, &frame(WINDOW_UPDATE, 0, 1, &0u32.to_be_bytes())).await;
    let frames = stream_frames(&mut s, 1).await;
    assert_reset(&frames, 1);
    let lines = strait.access_log("/upload", 1).await;
    // The flags field: `DPE`, with `UC` for the upstream request the aborted body ended.
    assert_flag(&lines[0], "DPE");
    assert!(
        !frames.iter().any(|f| f.0 == HEADERS),
        "no answer for a reset stream: {frames:?}"
    );
}

/// HEADERS on a stream id below one already used, never opened (RFC 9113 §5.1.1): a connection
/// error, GOAWAY(PROTOCOL_ERROR), not a stream left unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_on_a_lower_unused_stream_id_end_the_connection() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let mut s = open(&strait, &[]).await;
    let block = request_block("GET", "/five", &[]);
    send(&mut s, &frame(HEADERS, END_STREAM | END_HEADERS, 5, &block)).await;
    let _ = stream_frames(&mut s, 5).await;
    let block = request_block("GET", "/three", &[]);
    send(&mut s, &frame(HEADERS, END_STREAM | END_HEADERS, 3, &block)).await;
    let frames = read_until(&mut s, |kind, _, _| kind == GOAWAY).await;
    let goaway = frames
        .iter()
        .find(|f| f.0 == GOAWAY)
        .unwrap_or_else(|| panic!("no GOAWAY: {frames:?}"));
    // Last stream 5, PROTOCOL_ERROR.
    assert_eq!(goaway.3[..8], [0, 0, 0, 5, 0, 0, 0, 1]);
}

/// A Content-Length that is not plain digits, or two that disagree, make the request malformed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_content_length_resets_the_stream() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let mut s = open(&strait, &[]).await;
    let cases: [&[(&str, &str)]; 2] = [
        &[("content-length", "+3")],
        &[("content-length", "3"), ("content-length", "7")],
    ];
    for (i, extra) in cases.iter().enumerate() {
        let id = 1 + 2 * i as u32;
        let block = request_block("POST", "/cl", extra);
        let mut bytes = frame(HEADERS, END_HEADERS, id, &block);
        bytes.extend_from_slice(&frame(DATA, END_STREAM, id, b"abc"));
        send(&mut s, &bytes).await;
        let frames = stream_frames(&mut s, id).await;
        assert_reset(&frames, 1);
    }
    assert_eq!(up.requests(), 0);
}

/// A header list over the limit (60 KiB by default) is answered 431 and the stream refused, as
/// the h2 crate's server did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_header_list_gets_431_and_a_refused_stream() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let mut s = open(&strait, &[]).await;
    // 70 fields of 1,000 bytes: 70 KiB, sent over CONTINUATION frames.
    let value = "v".repeat(1000);
    let fields: Vec<(String, &str)> = (0..70)
        .map(|i| (format!("x-f{i}"), value.as_str()))
        .collect();
    let extra: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    let block = request_block("GET", "/big", &extra);
    let mut chunks = block.chunks(16_000);
    let mut bytes = frame(HEADERS, END_STREAM, 1, chunks.next().unwrap_or_default());
    let rest: Vec<&[u8]> = chunks.collect();
    for (i, c) in rest.iter().enumerate() {
        let flags = if i + 1 == rest.len() { END_HEADERS } else { 0 };
        bytes.extend_from_slice(&frame(CONTINUATION, flags, 1, c));
    }
    send(&mut s, &bytes).await;
    let frames = stream_frames(&mut s, 1).await;
    let head = frames
        .iter()
        .find(|f| f.0 == HEADERS)
        .unwrap_or_else(|| panic!("no 431: {frames:?}"));
    assert!(head.3.windows(3).any(|w| w == b"431"), "{:?}", head.3);
    assert_eq!(up.requests(), 0);
}

/// Graceful shutdown in two steps, as h2 and Envoy do it: GOAWAY(2^31-1) with a PING, and
/// only once the client answered the PING a GOAWAY naming the last stream. A stream the client
/// opens before it answers (one that was on the wire when the drain began) is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_goaway_comes_in_two_steps_and_serves_streams_in_flight() {
    if common::under_envoy() {
        return;
    }
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let mut s = open(&strait, &[]).await;
    let block = request_block("GET", "/before", &[]);
    send(&mut s, &frame(HEADERS, END_STREAM | END_HEADERS, 1, &block)).await;
    let _ = stream_frames(&mut s, 1).await;
    strait.sigterm();
    let frames = read_until(&mut s, |kind, _, _| kind == PING).await;
    let first = frames
        .iter()
        .find(|f| f.0 == GOAWAY)
        .unwrap_or_else(|| panic!("no GOAWAY before the PING: {frames:?}"));
    assert_eq!(first.3[..8], [0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    let ping = frames.last().map(|f| f.3.clone()).unwrap_or_default();
    // A stream opened before the client acknowledges the PING is served.
    let block = request_block("GET", "/racing", &[]);
    send(&mut s, &frame(HEADERS, END_STREAM | END_HEADERS, 3, &block)).await;
    let frames = stream_frames(&mut s, 3).await;
    assert!(
        frames.iter().any(|f| f.0 == HEADERS && is_200(&f.3)),
        "{frames:?}"
    );
    send(&mut s, &frame(PING, 1, 0, &ping)).await;
    let frames = read_until(&mut s, |kind, _, _| kind == GOAWAY).await;
    let last = frames
        .iter()
        .find(|f| f.0 == GOAWAY)
        .unwrap_or_else(|| panic!("no final GOAWAY: {frames:?}"));
    assert_eq!(last.3[..8], [0, 0, 0, 3, 0, 0, 0, 0]);
}

/// A stream error on a request waiting for its upstream (a WINDOW_UPDATE of 0 on the stream):
/// the request is cancelled at once, not left running until the upstream answers
/// ("MadeYouReset", CVE-2025-8671: resets the client provokes must free what the stream held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_error_cancels_a_request_waiting_upstream() {
    let up = Upstream::start_with(
        "up",
        common::Reply::Delay(
            std::time::Duration::from_secs(60),
            Box::new(common::Reply::Echo),
        ),
    )
    .await;
    let strait = proxy(&up).await;
    let mut s = open(&strait, &[]).await;
    let block = request_block("GET", "/slow", &[]);
    send(&mut s, &frame(HEADERS, END_STREAM | END_HEADERS, 1, &block)).await;
    up.wait_requests(1).await;
    send(&mut s, &frame(WINDOW_UPDATE, 0, 1, &0u32.to_be_bytes())).await;
    let frames = stream_frames(&mut s, 1).await;
    assert_reset(&frames, 1);
    // Logged within the test's timeout (20 s), not after the upstream's 60 s.
    let lines = strait.access_log("/slow", 1).await;
    assert_flag(&lines[0], "DPE");
}

/// A header block HPACK cannot decode (index 0, RFC 7541 §6.1) breaks the connection's shared
/// decoding state: GOAWAY(COMPRESSION_ERROR), counted as a protocol error; other connections
/// are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_header_block_ends_the_connection() {
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let mut s = open(&strait, &[]).await;
    send(
        &mut s,
        &frame(HEADERS, END_STREAM | END_HEADERS, 1, &[0x80]),
    )
    .await;
    let frames = read_until(&mut s, |kind, _, _| kind == GOAWAY).await;
    let goaway = frames
        .iter()
        .find(|f| f.0 == GOAWAY)
        .unwrap_or_else(|| panic!("no GOAWAY: {frames:?}"));
    // COMPRESSION_ERROR is 9.
    assert_eq!(goaway.3.get(4..8), Some(&[0, 0, 0, 9][..]), "{frames:?}");
    assert_eq!(
        strait
            .wait_stat("http.ingress.downstream_cx_protocol_error", 1)
            .await,
        Some(1)
    );
    assert_eq!(up.requests(), 0);
    assert_eq!(
        common::Client::h2c()
            .get(&strait.url("/after"))
            .await
            .status,
        200
    );
}

/// A client's RST_STREAM(CANCEL) in the middle of an upload the upstream already answered (the
/// body then goes on from a task of its own): the upstream sees its connection close short of
/// the chunked body's end, not a last chunk making the truncated upload look whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_mid_upload_does_not_complete_the_upstream_body() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let up_addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"));
    // The upstream answers as soon as the head is in, then reads the body until its last
    // chunk or the connection's end, and says which it saw.
    let upstream = tokio::spawn(async move {
        let (mut c, _) = listener
            .accept()
            .await
            .unwrap_or_else(|e| panic!("accept: {e}"));
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = c.read(&mut buf).await.unwrap_or(0);
            assert!(n > 0, "the head never arrived");
            seen.extend_from_slice(&buf[..n]);
        }
        c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap_or_else(|e| panic!("answer: {e}"));
        let head_end = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
        let mut body = seen.split_off(head_end);
        loop {
            if body.ends_with(b"0\r\n\r\n") {
                return (body, true);
            }
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return (body, false),
                Ok(n) => body.extend_from_slice(&buf[..n]),
            }
        }
    });
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
        .cluster("up", &[up_addr])
        .start()
        .await;
    let mut s = open(&strait, &[]).await;
    let block = request_block("POST", "/upload", &[]);
    send(&mut s, &frame(HEADERS, END_HEADERS, 1, &block)).await;
    // The whole response arrives while the upload is still open.
    let frames = stream_frames(&mut s, 1).await;
    assert!(
        frames.iter().any(|f| f.0 == DATA && f.1 & END_STREAM != 0),
        "{frames:?}"
    );
    let mut bytes = frame(DATA, 0, 1, b"abc");
    bytes.extend_from_slice(&frame(RST_STREAM, 0, 1, &8u32.to_be_bytes())); // CANCEL
    send(&mut s, &bytes).await;
    let (body, completed) = common::within("the upstream's view of the upload", upstream)
        .await
        .unwrap_or_else(|e| panic!("upstream task: {e}"));
    assert!(
        !completed,
        "a cancelled upload reached the upstream as a whole body: {:?}",
        String::from_utf8_lossy(&body)
    );
}
