//! Strait's HTTP/1.1 upstream client: the request's own task writes the request and reads the
//! response on a pooled connection, with no connection task and no channel in between (hyper's
//! client puts a task and three channel hops between a request and its connection: about a
//! third of Strait's instructions per request, BENCHMARKS.md). Framing follows hyper's client
//! and RFC 9112: a request body as its headers say, else by its known length, else chunked;
//! a response by HEAD/1xx/204/304, then `Transfer-Encoding`, then `Content-Length`, else read
//! to EOF. Trailers are not sent or forwarded on HTTP/1.1 (Envoy's `enable_trailers: false`).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::body::{BoxError, ProxyBody};
use crate::conn::CountingIo;
use crate::headers::Seen;

/// Envoy 1.40's default response head limit (80 KiB, measured): longer is a protocol error.
const MAX_HEAD: usize = 80 * 1024;
/// hyper's default header count limit.
const MAX_HEADERS: usize = 100;
/// A response head fits (they are a few hundred bytes); a body that fills a read doubles the next
/// one. Small because a pooled connection holds what is left of its buffer between responses,
/// and over successive responses touches all of it: 8 KiB cost 0.5 MiB more at 100 upstream
/// connections (BENCHMARKS.md, row 39).
const INIT_READ: usize = 2 * 1024;
const MAX_READ: usize = 256 * 1024;
/// A chunk-size line (with extensions) longer than this is a protocol error.
const MAX_CHUNK_LINE: usize = 4096;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection before the response ended")]
    Closed,
    #[error("upstream protocol error: {0}")]
    Protocol(&'static str),
    #[error("request body: {0}")]
    Body(BoxError),
}

impl Error {
    pub fn is_protocol(&self) -> bool {
        matches!(self, Error::Protocol(_))
    }
}

/// A connection keeps an empty header map of up to this many fields for its next message (here
/// the response; `h1server`: the next request).
pub(crate) const SPARE_FIELDS: usize = 24;

/// Whether `headers` may be emptied and kept for the next message: small, counting repeated
/// values too (kept in a separate list that `clear` does not shrink). Values removed since the
/// message was parsed are not seen here; the room they leave is bounded by the parsers' limit of
/// 100 fields (a few KB per connection).
#[inline]
pub(crate) fn recyclable(headers: &HeaderMap) -> bool {
    headers.capacity() <= SPARE_FIELDS && headers.len() - headers.keys_len() <= SPARE_FIELDS
}

/// One upstream HTTP/1.1 connection and the buffers it keeps between requests.
#[derive(Debug)]
pub struct Connection {
    io: CountingIo,
    rbuf: BytesMut,
    /// Request heads and chunk framing are encoded here.
    wbuf: BytesMut,
    read_size: usize,
    /// The last request's header map, emptied once its head is encoded: the response's fields
    /// go into it, which spares a map's two allocations and two frees per exchange.
    spare: HeaderMap,
}

impl Connection {
    pub fn new(io: CountingIo) -> Connection {
        Connection {
            io,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            read_size: INIT_READ,
            spare: HeaderMap::new(),
        }
    }

    /// [`Self::poll_peer_gone`] for a connection about to be used: its next read registers the
    /// waker that matters, so this registers none (~120 instructions fewer). No syscall unless
    /// the socket was seen readable since the last read.
    pub fn peer_gone(&mut self) -> bool {
        if !self.rbuf.is_empty() {
            return true;
        }
        let mut b = [0u8; 1];
        match self.io.tcp().try_read(&mut b) {
            // EOF, or bytes nobody asked for: either way the connection is done.
            Ok(_) => true,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        }
    }

    /// Whether the idle connection's peer closed it (or sent something unasked). Registers `cx`
    /// to be woken when that happens; costs no syscall while the socket has nothing to read.
    pub fn poll_peer_gone(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.rbuf.is_empty() {
            return true;
        }
        let tcp = self.io.tcp();
        for _ in 0..2 {
            match tcp.poll_read_ready(cx) {
                Poll::Pending => return false,
                Poll::Ready(Err(_)) => return true,
                Poll::Ready(Ok(())) => {
                    let mut b = [0u8; 1];
                    match tcp.try_read(&mut b) {
                        // EOF, or bytes nobody asked for: either way the connection is done.
                        Ok(_) => return true,
                        // Stale readiness, now cleared: poll again to register the waker.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(_) => return true,
                    }
                }
            }
        }
        false
    }

    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < self.read_size / 2 {
            self.rbuf.reserve(self.read_size);
        }
        let space = self.rbuf.capacity() - self.rbuf.len();
        let n = ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.rbuf
        ))?;
        // A read that fills the space asks for more next time (large bodies); hyper adapts the
        // same way.
        if n == space && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// Ready for the next exchange: a buffer grown for a large body is not kept while idle.
    fn settle(&mut self) {
        if self.rbuf.is_empty() && self.rbuf.capacity() > 4 * INIT_READ {
            self.rbuf = BytesMut::new();
            self.read_size = INIT_READ;
        }
        if self.wbuf.capacity() > 4 * INIT_READ {
            self.wbuf = BytesMut::new();
        }
    }
}

/// The pool's handle on a connection: gives the connection to the exchange and takes it back
/// when the exchange ends cleanly. Dropping it closes the connection.
pub trait Pooled: Send + Unpin + 'static {
    fn conn(&mut self) -> &mut Connection;
    /// The exchange ended cleanly and the connection may serve another request.
    fn release(self);
    /// The peer closed the connection (counted as a remote close).
    fn peer_closed(&mut self);
    /// The peer broke the protocol: Strait closes the connection (counted as a local close).
    fn protocol_error(&mut self);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoder {
    Length(u64),
    Chunked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    Length(u64),
    Chunked(Chunk),
    Eof,
    Done,
}

/// The request side and the connection of one exchange.
struct State<C: Pooled> {
    conn: C,
    body: Option<ProxyBody>,
    enc: Encoder,
    /// Pending output, in order: `conn.wbuf[wpos..]`, `data`, `post`.
    wpos: usize,
    data: Bytes,
    post: &'static [u8],
    /// The request is written to its end.
    written: bool,
    /// Writing failed; the response may still come.
    write_failed: bool,
    head_request: bool,
    upgrade: bool,
    /// See [`send_with`].
    raw_ok: bool,
    /// The stream idle timeout: bounds a request body still sent after its response ended.
    idle: Option<Duration>,
    /// Request body bytes taken so far (progress, for that bound).
    pulled: u64,
}

/// Starts an exchange on `conn`; `upgrade`: the request asks for a protocol upgrade.
pub fn send<C: Pooled>(
    conn: C,
    req: Request<ProxyBody>,
    upgrade: bool,
    idle: Option<Duration>,
) -> Exchange<C> {
    send_with(
        conn,
        req,
        upgrade,
        idle,
        &crate::headers::Appended::default(),
        false,
    )
}

/// [`send`], with `appended` written after the request's own headers; `raw_ok`: a plain
/// response head's fields may come as [`RawFields`] instead of in the response's map.
pub fn send_with<C: Pooled>(
    mut conn: C,
    req: Request<ProxyBody>,
    upgrade: bool,
    idle: Option<Duration>,
    appended: &crate::headers::Appended,
    raw_ok: bool,
) -> Exchange<C> {
    let (parts, body) = req.into_parts();
    let http::request::Parts {
        method,
        uri,
        mut headers,
        ..
    } = parts;
    let (enc, body) = framing(&method, &mut headers, body);
    let w = &mut conn.conn().wbuf;
    w.clear();
    w.reserve(256);
    w.put_slice(method.as_str().as_bytes());
    w.put_u8(b' ');
    w.put_slice(
        uri.path_and_query()
            .map_or("/", |pq| pq.as_str())
            .as_bytes(),
    );
    w.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in &headers {
        w.put_slice(name.as_str().as_bytes());
        w.put_slice(b": ");
        w.put_slice(value.as_bytes());
        w.put_slice(b"\r\n");
    }
    appended.write(w);
    w.put_slice(b"\r\n");
    if recyclable(&headers) {
        headers.clear();
        conn.conn().spare = headers;
    }
    Exchange {
        state: Some(State {
            conn,
            body,
            enc,
            wpos: 0,
            data: Bytes::new(),
            post: b"",
            written: false,
            write_failed: false,
            head_request: method == Method::HEAD,
            upgrade,
            raw_ok,
            idle,
            pulled: 0,
        }),
    }
}

/// hyper's client framing of a request body (`role::Client::set_length`): headers the caller
/// set win; else the body's exact length; else chunked, except that GET, HEAD and CONNECT
/// with a body of unknown length are sent without one.
fn framing(
    method: &Method,
    headers: &mut HeaderMap,
    body: ProxyBody,
) -> (Encoder, Option<ProxyBody>) {
    if body.is_end_stream() {
        headers.remove(header::TRANSFER_ENCODING);
        return (Encoder::Length(0), None);
    }
    if let Some(last) = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        if !ends_in_chunked(last) {
            // A request may not end its codings with anything but chunked: add it.
            let mut v = last.as_bytes().to_vec();
            v.extend_from_slice(b", chunked");
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                let mut all: Vec<HeaderValue> = headers
                    .get_all(header::TRANSFER_ENCODING)
                    .iter()
                    .cloned()
                    .collect();
                all.pop();
                all.push(v);
                headers.remove(header::TRANSFER_ENCODING);
                for v in all {
                    headers.append(header::TRANSFER_ENCODING, v);
                }
            }
        }
        headers.remove(header::CONTENT_LENGTH);
        return (Encoder::Chunked, Some(body));
    }
    if let Some(len) = content_length(headers.get_all(header::CONTENT_LENGTH).iter()) {
        return match len {
            Ok(n) => (Encoder::Length(n), Some(body)),
            // The downstream codec rejects these; never guess a length.
            Err(_) => {
                headers.remove(header::CONTENT_LENGTH);
                headers.insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
                (Encoder::Chunked, Some(body))
            }
        };
    }
    if let Some(n) = body.size_hint().exact() {
        headers.insert(header::CONTENT_LENGTH, crate::headers::int_value(n));
        return (Encoder::Length(n), Some(body));
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::CONNECT) {
        return (Encoder::Length(0), None);
    }
    headers.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    (Encoder::Chunked, Some(body))
}

pub(crate) fn ends_in_chunked(v: &HeaderValue) -> bool {
    v.as_bytes()
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// All `Content-Length` values (each maybe a list) must be the same number. `None`: absent.
fn content_length<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> Option<Result<u64, ()>> {
    content_length_of(values.map(HeaderValue::as_bytes))
}

/// [`content_length`] of values as bytes.
fn content_length_of<'a>(values: impl Iterator<Item = &'a [u8]>) -> Option<Result<u64, ()>> {
    let mut found: Option<u64> = None;
    for v in values {
        for part in v.split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Some(Err(()));
            }
            let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
            match found {
                Some(f) if f != n => return Some(Err(())),
                _ => found = Some(n),
            }
        }
    }
    found.map(Ok)
}

impl<C: Pooled> State<C> {
    /// Writes what is pending and pulls the request body on. Ready(Ok) once the whole request
    /// is written; the first body data goes out in the same `writev` as the head.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            let mut body_pending = false;
            if self.data.is_empty() && self.post.is_empty() {
                if let Some(b) = self.body.as_mut() {
                    match Pin::new(b).poll_frame(cx) {
                        Poll::Pending => body_pending = true,
                        Poll::Ready(None) => self.end_body()?,
                        Poll::Ready(Some(Err(e))) => {
                            self.body = None;
                            return Poll::Ready(Err(Error::Body(e)));
                        }
                        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                            Ok(data) => self.queue(data)?,
                            // Trailers end the body; HTTP/1.1 does not carry them upstream.
                            Err(_) => self.end_body()?,
                        },
                    }
                }
            }
            ready!(self.poll_flush(cx))?;
            if self.body.is_none() {
                self.written = true;
                return Poll::Ready(Ok(()));
            }
            if body_pending {
                return Poll::Pending;
            }
        }
    }

    fn end_body(&mut self) -> Result<(), Error> {
        self.body = None;
        match self.enc {
            Encoder::Length(0) => Ok(()),
            Encoder::Length(_) => Err(Error::Body(
                "request body shorter than its content-length".into(),
            )),
            Encoder::Chunked => {
                self.conn.conn().wbuf.put_slice(b"0\r\n\r\n");
                Ok(())
            }
        }
    }

    fn queue(&mut self, data: Bytes) -> Result<(), Error> {
        let len = data.len() as u64;
        self.pulled += len;
        if len > 0 {
            match &mut self.enc {
                Encoder::Length(rem) => {
                    if len > *rem {
                        return Err(Error::Body(
                            "request body longer than its content-length".into(),
                        ));
                    }
                    *rem -= len;
                }
                Encoder::Chunked => {
                    let w = &mut self.conn.conn().wbuf;
                    let mut hex = [0u8; 16];
                    let digits = hex_digits(len, &mut hex);
                    w.put_slice(digits);
                    w.put_slice(b"\r\n");
                    self.post = b"\r\n";
                }
            }
            self.data = data;
        }
        // A body known to be over sends its end with its last data.
        if self.body.as_ref().is_some_and(|b| b.is_end_stream()) {
            self.body = None;
            match self.enc {
                Encoder::Length(0) => {}
                Encoder::Length(_) => {
                    return Err(Error::Body(
                        "request body shorter than its content-length".into(),
                    ))
                }
                Encoder::Chunked if len > 0 => self.post = b"\r\n0\r\n\r\n",
                Encoder::Chunked => self.conn.conn().wbuf.put_slice(b"0\r\n\r\n"),
            }
        }
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let State {
            conn,
            wpos,
            data,
            post,
            ..
        } = self;
        let c = conn.conn();
        ready!(c.io.poll_write_parts(cx, &c.wbuf, wpos, data, post))?;
        c.wbuf.clear();
        *wpos = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes on while reading; Ready with the first final (non-1xx) response head.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Head, Error>> {
        loop {
            if !self.written && !self.write_failed {
                match self.poll_write(cx) {
                    Poll::Ready(Err(Error::Io(e))) => {
                        // The peer may have answered and closed: read what it sent.
                        tracing::debug!(error = %e, "writing the upstream request failed");
                        self.write_failed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    _ => {}
                }
            }
            let c = self.conn.conn();
            if !c.rbuf.is_empty() {
                match parse_head(
                    &mut c.rbuf,
                    &mut c.spare,
                    self.head_request,
                    self.upgrade,
                    self.raw_ok,
                ) {
                    Ok(Some(Parsed::Final(h))) => return Poll::Ready(Ok(h)),
                    Ok(Some(Parsed::Informational)) => continue,
                    Ok(None) if c.rbuf.len() > MAX_HEAD => {
                        self.conn.protocol_error();
                        return Poll::Ready(Err(Error::Protocol("response headers too large")));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.conn.protocol_error();
                        return Poll::Ready(Err(e));
                    }
                }
            }
            let c = self.conn.conn();
            match ready!(c.poll_read_more(cx)) {
                Ok(0) => {
                    self.conn.peer_closed();
                    return Poll::Ready(Err(Error::Closed));
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn.peer_closed();
                    return Poll::Ready(Err(Error::Io(e)));
                }
            }
        }
    }
}

/// `n` in upper-case hex (a chunk size), written at the end of `buf`.
pub(crate) fn hex_digits(mut n: u64, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789ABCDEF"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

struct Head {
    response: Response<()>,
    dec: Decoder,
    keep_alive: bool,
    upgrade: bool,
    seen: Seen,
    /// The fields, when kept as received rather than in the response's map.
    raw: Option<Box<RawFields>>,
}

/// A response's fields as received, names lower-cased in place, for a downstream HTTP/1.1
/// codec to copy out as they are: taken when nothing reads the response's headers before that
/// codec (building the map cost ~170 instructions a field, and writing it out as much again).
/// Only a plain head is kept so: at most [`RAW_LINES`] lines, each `name: value` CR LF as the
/// codec would write it; no framing or hop-by-hop field but one `Content-Length` and a
/// `Connection` of `keep-alive` / `close` (which the codec consumes and leaves out); and no
/// name the proxy acts on ([`Seen`]). Anything else goes into the map as before.
#[derive(Debug)]
pub struct RawFields {
    head: Bytes,
    lines: [RawLine; RAW_LINES],
    len: u8,
}

/// The most lines a head kept as [`RawFields`] has.
pub const RAW_LINES: usize = 12;

#[derive(Debug, Clone, Copy)]
pub struct RawLine {
    /// Where the line starts, its value starts, and it ends (past its CR LF), in the head.
    start: u32,
    value: u32,
    end: u32,
    pub kind: FieldKind,
}

const NO_LINE: RawLine = RawLine {
    start: 0,
    value: 0,
    end: 0,
    kind: FieldKind::Other,
};

/// What the downstream codec treats apart among a response's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    ContentLength,
    Server,
    Date,
    Other,
}

impl RawFields {
    pub fn lines(&self) -> &[RawLine] {
        &self.lines[..usize::from(self.len)]
    }

    /// A line's bytes, `name: value` CR LF.
    pub fn line(&self, l: &RawLine) -> &[u8] {
        &self.head[l.start as usize..l.end as usize]
    }

    /// Lines `from.start` to `to.end`, in one piece.
    pub fn span(&self, from: &RawLine, to: &RawLine) -> &[u8] {
        &self.head[from.start as usize..to.end as usize]
    }

    /// Whether `next` follows `l` in the head with nothing between.
    pub fn adjacent(l: &RawLine, next: &RawLine) -> bool {
        l.end == next.start
    }

    /// A line's value.
    pub fn value(&self, l: &RawLine) -> &[u8] {
        &self.head[l.value as usize..l.end as usize - 2]
    }

    /// Puts the fields into `headers`, in order and before what it holds: for a path that
    /// reads the response's map after all.
    pub fn into_map(self, headers: &mut HeaderMap) {
        let rest = std::mem::take(headers);
        headers.reserve(usize::from(self.len) + rest.len());
        for l in self.lines() {
            // The name: up to the `: ` before the value (checked a token, lower-cased).
            let name = &self.head[l.start as usize..l.value as usize - 2];
            let Ok(name) = HeaderName::from_bytes(name) else {
                continue;
            };
            let value = self.head.slice(l.value as usize..l.end as usize - 2);
            headers.append(name, parsed_value(value));
        }
        let mut last: Option<HeaderName> = None;
        for (name, value) in rest {
            if let Some(n) = name {
                last = Some(n);
            }
            if let Some(n) = &last {
                headers.append(n.clone(), value);
            }
        }
    }
}

/// The lines of a plain head (see [`RawFields`]), with their names lower-cased in `head`;
/// `None`: not a plain head (names may be lower-cased already, which changes nothing for the
/// map that is built instead). Sets what the framing needs, as the map's loop does.
fn raw_lines(
    head: &mut BytesMut,
    idx: &[[u32; 4]],
    cl: &mut Option<u64>,
    close: &mut bool,
    keep_alive_token: &mut bool,
) -> Result<Option<([RawLine; RAW_LINES], u8)>, Error> {
    let mut lines = [NO_LINE; RAW_LINES];
    let mut n = 0;
    for &[ns, ne, vs, ve] in idx {
        let (nsu, neu, vsu, veu) = (ns as usize, ne as usize, vs as usize, ve as usize);
        // `name: value` CR LF exactly, as written out: one space, nothing trailing.
        if vsu != neu + 2
            || head.get(neu..vsu) != Some(b": ")
            || head.get(veu..veu + 2) != Some(b"\r\n")
        {
            return Ok(None);
        }
        let kind = match common_name(&head[nsu..neu]) {
            Some((lower, role)) => {
                let kind = match role {
                    Role::ContentLength => {
                        if cl.is_some() {
                            return Ok(None);
                        }
                        match content_length_of(std::iter::once(&head[vsu..veu])) {
                            Some(Ok(len)) => *cl = Some(len),
                            _ => return Err(Error::Protocol("invalid content-length")),
                        }
                        FieldKind::ContentLength
                    }
                    Role::Connection => {
                        let (c, k, only_handled) = connection_tokens(&head[vsu..veu]);
                        *close |= c;
                        *keep_alive_token |= k;
                        if !only_handled {
                            return Ok(None);
                        }
                        continue;
                    }
                    Role::TransferEncoding | Role::Hop => return Ok(None),
                    Role::Plain | Role::Other => match lower {
                        b"server" => FieldKind::Server,
                        b"date" => FieldKind::Date,
                        _ => FieldKind::Other,
                    },
                };
                head[nsu..neu].make_ascii_lowercase();
                kind
            }
            // (`HeaderName` takes no name of 64 KiB or more: the map's path answers those.)
            None if neu - nsu >= 1 << 16 => return Ok(None),
            None => {
                let name = &mut head[nsu..neu];
                name.make_ascii_lowercase();
                if !Seen::of_lower(name).is_none() {
                    return Ok(None);
                }
                FieldKind::Other
            }
        };
        if n == RAW_LINES {
            return Ok(None);
        }
        lines[n] = RawLine {
            start: ns,
            value: vs,
            end: ve + 2,
            kind,
        };
        n += 1;
    }
    Ok(Some((lines, n as u8)))
}

/// A `Connection` value's `close` and `keep-alive` tokens, and whether it has no other.
#[inline]
fn connection_tokens(value: &[u8]) -> (bool, bool, bool) {
    // The usual values, whole.
    if value.len() == 10 && token_eq_lower(value, b"keep-alive") {
        return (false, true, true);
    }
    if value.len() == 5 && token_eq_lower(value, b"close") {
        return (true, false, true);
    }
    let (mut close, mut keep_alive, mut only_handled) = (false, false, true);
    for t in value.split(|&b| b == b',') {
        let t = t.trim_ascii();
        let c = t.eq_ignore_ascii_case(b"close");
        let k = t.eq_ignore_ascii_case(b"keep-alive");
        close |= c;
        keep_alive |= k;
        only_handled &= c || k || t.is_empty();
    }
    (close, keep_alive, only_handled)
}

enum Parsed {
    Informational,
    Final(Head),
}

/// What the response-head loop does with a header.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    ContentLength,
    TransferEncoding,
    Connection,
    /// Other hop-by-hop headers: `upgrade`, `keep-alive`, `proxy-connection`.
    Hop,
    /// A table name with none of the roles above.
    Plain,
    /// A name not in the table (so with none of the roles above either).
    Other,
}

/// Names most upstreams send, lower-case, by length; every name with a role other than
/// [`Role::Plain`] is among them.
static COMMON_NAMES: [(&[u8], HeaderName, Role); 17] = [
    (b"date", header::DATE, Role::Plain),
    (b"vary", header::VARY, Role::Plain),
    (b"etag", header::ETAG, Role::Plain),
    (b"server", header::SERVER, Role::Plain),
    (b"upgrade", header::UPGRADE, Role::Hop),
    (b"location", header::LOCATION, Role::Plain),
    (b"connection", header::CONNECTION, Role::Connection),
    (b"set-cookie", header::SET_COOKIE, Role::Plain),
    (
        b"keep-alive",
        HeaderName::from_static("keep-alive"),
        Role::Hop,
    ),
    (b"content-type", header::CONTENT_TYPE, Role::Plain),
    (b"accept-ranges", header::ACCEPT_RANGES, Role::Plain),
    (b"cache-control", header::CACHE_CONTROL, Role::Plain),
    (b"last-modified", header::LAST_MODIFIED, Role::Plain),
    (
        b"content-length",
        header::CONTENT_LENGTH,
        Role::ContentLength,
    ),
    (b"content-encoding", header::CONTENT_ENCODING, Role::Plain),
    (
        b"proxy-connection",
        HeaderName::from_static("proxy-connection"),
        Role::Hop,
    ),
    (
        b"transfer-encoding",
        header::TRANSFER_ENCODING,
        Role::TransferEncoding,
    ),
];

/// A response header's name and role. The names upstreams usually send are matched here, a
/// word at a time, instead of through `HeaderName::from_bytes`, which lower-cases a copy and
/// looks it up among every standard name (about half the cost of each header); any other name
/// goes through it.
fn response_header_name(raw: &[u8]) -> Result<(HeaderName, Role), Error> {
    for (lower, name, role) in common_names_of_len(raw.len()) {
        if token_eq_lower(raw, lower) {
            return Ok((name.clone(), *role));
        }
    }
    // Not a table name in any case, so a plain header.
    let name =
        HeaderName::from_bytes(raw).map_err(|_| Error::Protocol("invalid response header name"))?;
    Ok((name, Role::Other))
}

/// The table's lower-case form and role of a response header name; `None`: not in the table
/// (so [`Role::Other`]).
fn common_name(raw: &[u8]) -> Option<(&'static [u8], Role)> {
    for (lower, _, role) in common_names_of_len(raw.len()) {
        if token_eq_lower(raw, lower) {
            return Some((lower, *role));
        }
    }
    None
}

/// The entries of [`COMMON_NAMES`] `len` bytes long: a name is compared with those alone.
fn common_names_of_len(len: usize) -> &'static [(&'static [u8], HeaderName, Role)] {
    let range = match len {
        4 => 0..3,
        6 => 3..4,
        7 => 4..5,
        8 => 5..6,
        10 => 6..9,
        12 => 9..10,
        13 => 10..13,
        14 => 13..14,
        16 => 14..16,
        17 => 16..17,
        _ => 0..0,
    };
    &COMMON_NAMES[range]
}

/// Whether `raw`, an HTTP token (httparse checked every name), equals `lower`, a name of the
/// same length in lower-case letters and `-`, ignoring ASCII case. Setting bit 0x20 lower-cases
/// a letter and keeps `-`; the only other byte it turns into a letter or `-` is CR (into `-`),
/// which no token contains.
pub(crate) fn token_eq_lower(raw: &[u8], lower: &[u8]) -> bool {
    let n = raw.len();
    if n < 8 {
        return raw.iter().zip(lower).all(|(&r, &l)| r | 0x20 == l);
    }
    let word = |s: &[u8], at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&s[at..at + 8]);
        u64::from_ne_bytes(w)
    };
    const CASE: u64 = 0x2020_2020_2020_2020;
    let mut at = 0;
    while at + 8 < n {
        if word(raw, at) | CASE != word(lower, at) {
            return false;
        }
        at += 8;
    }
    // The last word overlaps the previous one when the length is not a multiple of 8.
    word(raw, n - 8) | CASE == word(lower, n - 8)
}

/// A header value as httparse returned it (or bytes this crate made of the same kinds), without
/// `HeaderValue`'s second pass over its bytes (~4 instructions a byte, ~450 per proxied HTTP/1.1
/// request).
#[allow(unsafe_code)]
pub(crate) fn parsed_value(value: Bytes) -> HeaderValue {
    // SAFETY: `HeaderValue`'s invariant is its bytes (HT, 0x20–0x7E, 0x80–0xFF), not memory
    // safety. httparse (default config: no obs-fold) accepts in a value exactly those bytes and
    // trims the line's CR LF; `tests::httparse_values_are_header_values` checks all 256 bytes
    // in requests and responses. The other caller passes lower-case hex digits and `-` (a
    // generated `x-request-id`). Debug builds check the bytes again (`http` does).
    unsafe { HeaderValue::from_maybe_shared_unchecked(value) }
}

/// Heads with up to this many fields keep their offsets on the stack; zeroing room for
/// `MAX_HEADERS` on every head cost ~100 instructions.
pub(crate) const INLINE_FIELDS: usize = 24;

/// Where each parsed header's name and value lie in `buf` (start and end of each), so that
/// they can be sliced out of the head once the parser no longer borrows the buffer: in `inline`
/// for the usual few fields, in `heap` past that.
pub(crate) fn header_offsets<'a>(
    buf: &[u8],
    headers: &[httparse::Header<'_>],
    inline: &'a mut [[u32; 4]; INLINE_FIELDS],
    heap: &'a mut Vec<[u32; 4]>,
) -> &'a [[u32; 4]] {
    let base = buf.as_ptr() as usize;
    let offsets = |h: &httparse::Header<'_>| {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        [
            n as u32,
            (n + h.name.len()) as u32,
            v as u32,
            (v + h.value.len()) as u32,
        ]
    };
    if headers.len() <= INLINE_FIELDS {
        for (slot, h) in inline.iter_mut().zip(headers) {
            *slot = offsets(h);
        }
        &inline[..headers.len()]
    } else {
        heap.extend(headers.iter().map(offsets));
        heap
    }
}

/// Parses a response head at the start of `buf` and takes it out; `None`: not all there yet.
/// `raw_ok`: a plain head's fields may stay out of the map ([`RawFields`]).
fn parse_head(
    buf: &mut BytesMut,
    spare: &mut HeaderMap,
    head_request: bool,
    upgrade: bool,
    raw_ok: bool,
) -> Result<Option<Parsed>, Error> {
    let mut slots =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    // Name and value offsets into `buf`, taken while it is borrowed by the parser.
    let (mut inline, mut heap) = ([[0u32; 4]; INLINE_FIELDS], Vec::new());
    let (len, code, version, idx) = {
        let len = match httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut res, buf, &mut slots)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Error::Protocol("too many response headers"))
            }
            Err(_) => return Err(Error::Protocol("invalid response head")),
        };
        (
            len,
            res.code.unwrap_or(0),
            res.version.unwrap_or(1),
            header_offsets(buf, res.headers, &mut inline, &mut heap),
        )
    };
    if len > MAX_HEAD {
        return Err(Error::Protocol("response headers too large"));
    }
    let status = StatusCode::from_u16(code).map_err(|_| Error::Protocol("invalid status code"))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        // 100 Continue and friends: the final response follows.
        buf.advance(len);
        return Ok(Some(Parsed::Informational));
    }
    let mut head = buf.split_to(len);
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut response = Response::new(());
    let mut close = false;
    let mut keep_alive_token = false;
    let mut te: Option<bool> = None;
    let mut cl: Option<u64> = None;
    // What the proxy's header handling needs to know of the names kept, read off here rather
    // than in another pass over the map.
    let mut seen = Seen::default();
    let raw = match raw_ok && !switching {
        true => raw_lines(&mut head, idx, &mut cl, &mut close, &mut keep_alive_token)?,
        false => None,
    };
    let head = head.freeze();
    // The spare map and the response's empty one trade places: no map is dropped here (one
    // left empty still goes round, to the downstream codec's next request).
    std::mem::swap(response.headers_mut(), spare);
    let raw = match raw {
        Some((lines, len)) => Some(Box::new(RawFields { head, lines, len })),
        None => {
            let headers = response.headers_mut();
            headers.reserve(idx.len());
            for &[ns, ne, vs, ve] in idx {
                let (name, role) = response_header_name(&head[ns as usize..ne as usize])?;
                let value = parsed_value(head.slice(vs as usize..ve as usize));
                // Hop-by-hop headers this codec consumes are left out, so the proxy's own
                // hop-by-hop removal finds nothing to do on the usual response. A `Connection`
                // naming other headers stays (that removal takes it out, and leaves what it
                // names, as Envoy does); a 101 keeps everything for the tunnel.
                let hop = match role {
                    Role::ContentLength => {
                        match content_length(std::iter::once(&value)) {
                            Some(Ok(n)) if cl.is_none_or(|c| c == n) => cl = Some(n),
                            _ => return Err(Error::Protocol("invalid content-length")),
                        }
                        false
                    }
                    Role::TransferEncoding => {
                        te = Some(ends_in_chunked(&value));
                        true
                    }
                    Role::Connection => {
                        let (c, k, only_handled) = connection_tokens(value.as_bytes());
                        close |= c;
                        keep_alive_token |= k;
                        only_handled
                    }
                    Role::Hop => true,
                    Role::Plain | Role::Other => false,
                };
                if hop && !switching {
                    continue;
                }
                match role {
                    Role::Connection => seen = seen.with(Seen::CONNECTION),
                    Role::TransferEncoding => seen = seen.with(Seen::TRANSFER_ENCODING),
                    Role::Hop | Role::Other => seen = seen.with(Seen::of_name(&name)),
                    Role::ContentLength | Role::Plain => {}
                }
                headers.append(name, value);
            }
            None
        }
    };
    let (version, mut keep_alive) = if version == 0 {
        (Version::HTTP_10, keep_alive_token && !close)
    } else {
        (Version::HTTP_11, !close)
    };
    let mut upgraded = false;
    let dec = if status == StatusCode::SWITCHING_PROTOCOLS {
        if !upgrade {
            return Err(Error::Protocol("101 without an upgrade request"));
        }
        upgraded = true;
        keep_alive = false;
        Decoder::Done
    } else if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED
    {
        Decoder::Length(0)
    } else if let Some(chunked) = te {
        if chunked {
            Decoder::Chunked(Chunk::Size)
        } else {
            Decoder::Eof
        }
    } else if let Some(n) = cl {
        Decoder::Length(n)
    } else {
        Decoder::Eof
    };
    if dec == Decoder::Eof {
        keep_alive = false;
    }
    *response.status_mut() = status;
    *response.version_mut() = version;
    Ok(Some(Parsed::Final(Head {
        response,
        dec,
        keep_alive,
        upgrade: upgraded,
        seen,
        raw,
    })))
}

/// The response head's future.
pub struct Exchange<C: Pooled> {
    state: Option<State<C>>,
}

impl<C: Pooled> std::future::Future for Exchange<C> {
    /// The body is boxed here, once: the response moves through several futures on its way
    /// out, and the unboxed body (with the connection) is ten times the size of a box.
    /// With what the response's header names tell [`Seen`].
    /// With the fields kept out of the map, if they were.
    type Output = Result<(Response<ProxyBody>, Seen, Option<Box<RawFields>>), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(st) = this.state.as_mut() else {
            return Poll::Ready(Err(Error::Protocol("exchange polled after it ended")));
        };
        let head = ready!(st.poll_head(cx));
        let state = this.state.take();
        let Head {
            mut response,
            dec,
            keep_alive,
            upgrade,
            seen,
            raw,
        } = head?;
        if upgrade {
            if let Some(st) = state {
                let slot = UpgradeSlot(Arc::new(Mutex::new(Some(Upgraded { conn: st.conn }))));
                response.extensions_mut().insert(slot);
            }
            return Poll::Ready(Ok((response.map(|()| crate::body::empty()), seen, raw)));
        }
        let mut body = ResponseBody {
            state,
            dec,
            keep_alive,
        };
        if matches!(body.dec, Decoder::Length(0)) {
            body.finish();
        }
        Poll::Ready(Ok((response.map(|()| body.boxed_unsync()), seen, raw)))
    }
}

/// Carries the connection of a 101 answer to an upgrade request in the response's extensions
/// (as hyper carries its `OnUpgrade`).
struct UpgradeSlot<C: Pooled>(Arc<Mutex<Option<Upgraded<C>>>>);

impl<C: Pooled> Clone for UpgradeSlot<C> {
    fn clone(&self) -> Self {
        UpgradeSlot(self.0.clone())
    }
}

/// The connection of a 101 answer to an upgrade request, with any bytes already read.
pub fn take_upgrade<C: Pooled, B>(resp: &mut Response<B>) -> Option<Upgraded<C>> {
    let slot = resp.extensions_mut().remove::<UpgradeSlot<C>>()?;
    let mut g = slot.0.lock().unwrap_or_else(|e| e.into_inner());
    g.take()
}

/// The upstream response body; hands the connection back to its pool at a clean end.
struct ResponseBody<C: Pooled> {
    state: Option<State<C>>,
    dec: Decoder,
    keep_alive: bool,
}

enum Step {
    Data(Bytes),
    More,
    End,
}

impl<C: Pooled> ResponseBody<C> {
    fn finish(&mut self) {
        self.dec = Decoder::Done;
        let Some(mut st) = self.state.take() else {
            return;
        };
        if !self.keep_alive {
            // The upstream closes (Connection: close, or a body read to EOF).
            st.conn.peer_closed();
            return;
        }
        if !st.written && !st.write_failed {
            finish_upload(st);
            return;
        }
        let c = st.conn.conn();
        // Bytes past the response, or a failed write, leave the connection unusable.
        if !st.write_failed && c.rbuf.is_empty() {
            c.settle();
            st.conn.release();
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.dec = Decoder::Done;
        if let Some(mut st) = self.state.take() {
            if e.is_protocol() {
                st.conn.protocol_error();
            } else {
                st.conn.peer_closed();
            }
        }
        Poll::Ready(Some(Err(e.into())))
    }
}

/// The upstream answered in full, and keeps the connection, before the whole request was sent
/// (nginx's `return 200` to an upload). The rest goes out from a task of its own, as hyper's
/// connection task sends it (RFC 9110 lets a client go on sending): the downstream body is
/// read to its end, so the downstream connection stays usable instead of being reset with
/// unread bytes, and this connection goes back to the pool once the request is out. The
/// stream idle timeout still applies: without progress for that long, both are dropped.
fn finish_upload<C: Pooled>(mut st: State<C>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let mut idle = st.idle.map(|d| (d, Box::pin(tokio::time::sleep(d))));
        let sent = std::future::poll_fn(|cx| {
            let before = (st.pulled, st.data.len(), st.wpos);
            if let Poll::Ready(r) = st.poll_write(cx) {
                return Poll::Ready(Some(r));
            }
            let Some((d, timer)) = idle.as_mut() else {
                return Poll::Pending;
            };
            if before != (st.pulled, st.data.len(), st.wpos) {
                timer.as_mut().reset(tokio::time::Instant::now() + *d);
            }
            std::future::Future::poll(timer.as_mut(), cx).map(|()| None)
        })
        .await;
        match sent {
            Some(Ok(())) if st.conn.conn().rbuf.is_empty() => {
                st.conn.conn().settle();
                st.conn.release();
            }
            Some(Ok(())) => {}
            Some(Err(e)) => tracing::debug!(error = %e, "upload after the response failed"),
            None => tracing::debug!("upload after the response: stream idle timeout"),
        }
    });
}

/// One step of chunked decoding over `buf`. Without `data`, stops before chunk data (to see
/// whether the body ends right after the data just taken).
fn chunked(buf: &mut BytesMut, st: &mut Chunk, data: bool) -> Result<Step, Error> {
    loop {
        match *st {
            Chunk::Size => {
                let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err(Error::Protocol("chunk size line too long"));
                    }
                    return Ok(Step::More);
                };
                let line = buf[..nl]
                    .strip_suffix(b"\r")
                    .ok_or(Error::Protocol("chunk size line without CR"))?;
                let mut size: u64 = 0;
                let mut digits = 0;
                for &b in line {
                    let d = match b {
                        b'0'..=b'9' => b - b'0',
                        b'a'..=b'f' => b - b'a' + 10,
                        b'A'..=b'F' => b - b'A' + 10,
                        _ => break,
                    };
                    size = size
                        .checked_mul(16)
                        .map(|s| s + u64::from(d))
                        .ok_or(Error::Protocol("chunk size too large"))?;
                    digits += 1;
                }
                // Optional whitespace, then the end or an extension.
                let rest = line[digits..].trim_ascii_start();
                if digits == 0 || !(rest.is_empty() || rest[0] == b';') {
                    return Err(Error::Protocol("invalid chunk size"));
                }
                buf.advance(nl + 1);
                *st = if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(rem) => {
                if buf.is_empty() || !data {
                    return Ok(Step::More);
                }
                let n = rem.min(buf.len() as u64) as usize;
                *st = if n as u64 == rem {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(rem - n as u64)
                };
                return Ok(Step::Data(buf.split_to(n).freeze()));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(Error::Protocol("chunk data not followed by CRLF"));
                }
                buf.advance(2);
                *st = Chunk::Size;
            }
            Chunk::Trailers => {
                let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                    if buf.len() > MAX_HEAD {
                        return Err(Error::Protocol("response trailers too large"));
                    }
                    return Ok(Step::More);
                };
                let last = nl == 0 || (nl == 1 && buf[0] == b'\r');
                // Trailer fields are read and dropped (HTTP/1.1 trailers are not forwarded).
                buf.advance(nl + 1);
                if last {
                    return Ok(Step::End);
                }
            }
        }
    }
}

impl<C: Pooled> Body for ResponseBody<C> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(st) = this.state.as_mut() else {
                return Poll::Ready(None);
            };
            if !st.written && !st.write_failed {
                // The request body streams on while the response does (a body echoed back).
                if let Poll::Ready(Err(e)) = st.poll_write(cx) {
                    tracing::debug!(error = %e, "upstream request ended early");
                    st.write_failed = true;
                }
            }
            let c = st.conn.conn();
            let step = match &mut this.dec {
                Decoder::Done => Ok(Step::End),
                Decoder::Length(rem) => {
                    if c.rbuf.is_empty() {
                        Ok(Step::More)
                    } else {
                        let n = (*rem).min(c.rbuf.len() as u64) as usize;
                        *rem -= n as u64;
                        Ok(Step::Data(c.rbuf.split_to(n).freeze()))
                    }
                }
                Decoder::Eof => {
                    if c.rbuf.is_empty() {
                        Ok(Step::More)
                    } else {
                        Ok(Step::Data(c.rbuf.split().freeze()))
                    }
                }
                Decoder::Chunked(ch) => chunked(&mut c.rbuf, ch, true),
            };
            match step {
                Err(e) => return this.fail(e),
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::Data(data)) => {
                    let ended = match &mut this.dec {
                        Decoder::Length(0) => true,
                        Decoder::Chunked(ch) => {
                            matches!(chunked(&mut c.rbuf, ch, false), Ok(Step::End))
                        }
                        _ => false,
                    };
                    // Ends the body with its last data, so the connection is back in the
                    // pool before the response is finished downstream.
                    if ended {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::More) => match ready!(c.poll_read_more(cx)) {
                    Ok(0) if this.dec == Decoder::Eof => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(0) => return this.fail(Error::Closed),
                    Ok(_) => {}
                    Err(e) => return this.fail(Error::Io(e)),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state.is_none() || self.dec == Decoder::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.dec {
            Decoder::Length(n) => SizeHint::with_exact(n),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// An upgraded (tunnelled) upstream connection: the bytes read past the 101 come first.
pub struct Upgraded<C: Pooled> {
    conn: C,
}

impl<C: Pooled> AsyncRead for Upgraded<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let c = self.conn.conn();
        if !c.rbuf.is_empty() {
            let n = c.rbuf.len().min(buf.remaining());
            buf.put_slice(&c.rbuf[..n]);
            c.rbuf.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut c.io).poll_read(cx, buf)
    }
}

impl<C: Pooled> AsyncWrite for Upgraded<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.conn.conn().io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.conn.conn().io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.conn.conn().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle connection about to be used is refused once its peer has closed it or sent
    /// bytes nobody asked for, and taken while the peer is quiet, also when readiness seen
    /// earlier is stale.
    #[tokio::test]
    async fn peer_gone_sees_a_close_or_stray_bytes_and_passes_a_quiet_peer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = crate::stats::Store::new().http("t");
        let pair = || async {
            let (client, accepted) =
                tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
            let io = CountingIo::new(
                client.unwrap(),
                crate::conn::Counted::Downstream(stats.clone()),
            );
            (Connection::new(io), accepted.unwrap().0)
        };
        // Quiet: usable. Then a response is read in full; readiness left from it is stale.
        let (mut c, mut peer) = pair().await;
        assert!(!c.peer_gone());
        peer.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        c.io.read_exact(&mut b).await.unwrap();
        assert!(!c.peer_gone());
        assert!(!c.peer_gone());
        // Closed by the peer.
        drop(peer);
        c.io.tcp().readable().await.unwrap();
        assert!(c.peer_gone());
        // Bytes nobody asked for.
        let (mut c, mut peer) = pair().await;
        peer.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        c.io.tcp().readable().await.unwrap();
        assert!(c.peer_gone());
    }

    /// `parsed_value`'s premise: a byte httparse takes inside a header value is one
    /// `HeaderValue` takes, and the other way round, for requests and responses alike.
    #[test]
    fn httparse_values_are_header_values() {
        // Short values, and 40-byte ones with the byte at the edges of httparse's 8-, 16- and
        // 32-byte scanners (SWAR and SIMD) as well as between them.
        let values = (0..=255u8)
            .filter(|b| !matches!(b, b'\r' | b'\n'))
            .flat_map(|b| {
                let short = vec![b'a', b, b'a'];
                let long = [1, 7, 8, 15, 16, 31, 32, 38].map(|at| {
                    let mut v = vec![b'a'; 40];
                    v[at] = b;
                    v
                });
                std::iter::once((b, short)).chain(long.into_iter().map(move |v| (b, v)))
            });
        for (b, value) in values {
            let valid = HeaderValue::from_bytes(&value).is_ok();
            let mut resp = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
            resp.extend_from_slice(&value);
            resp.extend_from_slice(b"\r\n\r\n");
            let mut h = [httparse::EMPTY_HEADER; 4];
            let parsed = httparse::Response::new(&mut h).parse(&resp);
            assert_eq!(parsed.is_ok(), valid, "response, byte {b:#04x}");
            if let Ok(httparse::Status::Complete(_)) = parsed {
                assert_eq!(h[0].value, &value[..], "byte {b:#04x} in {value:?}");
            }
            let mut req = b"GET / HTTP/1.1\r\nx: ".to_vec();
            req.extend_from_slice(&value);
            req.extend_from_slice(b"\r\n\r\n");
            let mut h = [httparse::EMPTY_HEADER; 4];
            let parsed = httparse::Request::new(&mut h).parse(&req);
            assert_eq!(parsed.is_ok(), valid, "request, byte {b:#04x}");
        }
    }

    /// A map kept for the next message is small in both its fields and its repeated values: a
    /// message with a thousand `set-cookie`s does not leave its value list on the connection.
    #[test]
    fn only_small_maps_are_kept() {
        let mut few = HeaderMap::new();
        few.append("set-cookie", HeaderValue::from_static("a"));
        few.append("set-cookie", HeaderValue::from_static("b"));
        assert!(recyclable(&few));
        let mut repeated = HeaderMap::new();
        for _ in 0..1000 {
            repeated.append("set-cookie", HeaderValue::from_static("c"));
        }
        assert!(!recyclable(&repeated));
        let mut wide = HeaderMap::new();
        for i in 0..100 {
            wide.insert(
                HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("w"),
            );
        }
        assert!(!recyclable(&wide));
    }

    /// The slow path's answer, to hold the table to.
    fn slow(raw: &[u8]) -> (HeaderName, Role) {
        let name = match HeaderName::from_bytes(raw) {
            Ok(n) => n,
            Err(e) => panic!("{raw:?}: {e}"),
        };
        let role = match name.as_str() {
            "content-length" => Role::ContentLength,
            "transfer-encoding" => Role::TransferEncoding,
            "connection" => Role::Connection,
            "upgrade" | "keep-alive" | "proxy-connection" => Role::Hop,
            n if COMMON_NAMES.iter().any(|(l, _, _)| *l == n.as_bytes()) => Role::Plain,
            _ => Role::Other,
        };
        (name, role)
    }

    fn title_case(s: &[u8]) -> Vec<u8> {
        let mut up = true;
        s.iter()
            .map(|&b| {
                let out = if up { b.to_ascii_uppercase() } else { b };
                up = b == b'-';
                out
            })
            .collect()
    }

    #[test]
    fn common_names_match_in_any_case_as_the_slow_path_would() {
        for entry @ (lower, name, role) in &COMMON_NAMES {
            assert_eq!(name.as_str().as_bytes(), *lower);
            let of_len = common_names_of_len(lower.len());
            assert!(of_len.iter().any(|e| std::ptr::eq(e, entry)), "{name}");
            assert!(
                of_len.iter().all(|(l, _, _)| l.len() == lower.len()),
                "{name}"
            );
            for raw in [
                lower.to_vec(),
                title_case(lower),
                lower.to_ascii_uppercase(),
            ] {
                let got = response_header_name(&raw).ok();
                assert_eq!(got.as_ref(), Some(&slow(&raw)), "{raw:?}");
                assert_eq!(got.map(|(_, r)| r), Some(*role));
            }
        }
    }

    #[test]
    fn other_names_take_the_slow_path() {
        // Same lengths as table names, one byte off (first, middle, last; a word boundary).
        for raw in [
            &b"dat_"[..],
            b"Xerver",
            b"content_type",
            b"content-lengtx",
            b"Content-Lengt0",
            b"transfer-encodinx",
            b"x-envoy-upstream-service-time",
            b"X-Custom",
            b"a",
        ] {
            let got = response_header_name(raw).ok();
            assert_eq!(got, Some(slow(raw)), "{raw:?}");
        }
        assert!(token_eq_lower(b"Transfer-Encoding", b"transfer-encoding"));
        assert!(!token_eq_lower(b"Transfer-Encodinh", b"transfer-encoding"));
        assert!(!token_eq_lower(b"Uransfer-Encoding", b"transfer-encoding"));
        assert!(!token_eq_lower(b"Transfer_Encoding", b"transfer-encoding"));
        assert!(matches!(
            response_header_name(b"bad name"),
            Err(Error::Protocol("invalid response header name"))
        ));
    }

    fn decode_bytewise(wire: &[u8]) -> Result<(Vec<u8>, bool), Error> {
        let (mut buf, mut st, mut out) = (BytesMut::new(), Chunk::Size, Vec::new());
        for &b in wire {
            buf.put_u8(b);
            loop {
                match chunked(&mut buf, &mut st, true)? {
                    Step::Data(d) => out.extend_from_slice(&d),
                    Step::More => break,
                    Step::End => return Ok((out, buf.is_empty())),
                }
            }
        }
        Err(Error::Closed)
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let wire =
            b"5;ext=\"a\"\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\n\r\n";
        let (out, drained) = decode_bytewise(wire).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, b"helloabcdefghijklmnopqrstuvwxyz");
        assert!(drained, "the decoder stops at the end of the body");
    }

    #[test]
    fn chunked_framing_errors_are_protocol_errors() {
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"5\nhello\r\n",
            b"5 x\r\n",
            b"1FFFFFFFFFFFFFFFF\r\n",
        ] {
            match decode_bytewise(bad) {
                Err(e) => assert!(e.is_protocol(), "{bad:?}: {e}"),
                Ok(r) => panic!("{bad:?} decoded as {r:?}"),
            }
        }
    }

    #[test]
    fn a_head_parses_once_complete_and_leaves_the_body() {
        let wire =
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\nX-A: b\r\n\r\nabc";
        let mut buf = BytesMut::new();
        let mut parsed = None;
        for &b in wire {
            buf.put_u8(b);
            if parsed.is_none() {
                parsed = parse_head(&mut buf, &mut HeaderMap::new(), false, false, false)
                    .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let Some(Parsed::Final(h)) = parsed else {
            panic!("no final head");
        };
        assert_eq!(h.dec, Decoder::Length(3));
        assert!(!h.keep_alive, "Connection: close");
        assert_eq!(h.response.headers()["x-a"], "b");
        assert_eq!(&buf[..], b"abc");
        // HTTP/1.0 keeps the connection only when asked to; HEAD answers carry no body.
        let mut buf = BytesMut::from(&b"HTTP/1.0 200 OK\r\ncontent-length: 9\r\n\r\n"[..]);
        let Ok(Some(Parsed::Final(h))) =
            parse_head(&mut buf, &mut HeaderMap::new(), true, false, false)
        else {
            panic!("HTTP/1.0 head");
        };
        assert_eq!((h.dec, h.keep_alive), (Decoder::Length(0), false));
    }

    /// With `raw_ok`, a plain head keeps its lines (names lower-cased) out of the map; any
    /// head that is not plain comes in the map as without it.
    #[test]
    fn plain_heads_keep_their_lines_and_others_fill_the_map() {
        let parse = |head: &[u8]| {
            let mut buf = BytesMut::from(head);
            match parse_head(&mut buf, &mut HeaderMap::new(), false, false, true) {
                Ok(Some(Parsed::Final(h))) => h,
                _ => panic!("no head in {:?}", String::from_utf8_lossy(head)),
            }
        };
        let h = parse(
            b"HTTP/1.1 200 OK\r\nServer: S\r\nX-Case: V a\r\nConnection: Keep-Alive\r\n\
              Content-Length: 0\r\ndate: d\r\n\r\n",
        );
        let raw = h.raw.expect("a plain head");
        assert!(h.response.headers().is_empty());
        assert!(h.keep_alive);
        let lines: Vec<(FieldKind, &[u8])> =
            raw.lines().iter().map(|l| (l.kind, raw.line(l))).collect();
        assert_eq!(
            lines,
            [
                (FieldKind::Server, &b"server: S\r\n"[..]),
                (FieldKind::Other, b"x-case: V a\r\n"),
                (FieldKind::ContentLength, b"content-length: 0\r\n"),
                (FieldKind::Date, b"date: d\r\n"),
            ]
        );
        // The connection line is left out: the runs around it are apart.
        let l = raw.lines();
        assert!(RawFields::adjacent(&l[0], &l[1]) && !RawFields::adjacent(&l[1], &l[2]));
        let mut map = HeaderMap::new();
        map.insert("x-after", HeaderValue::from_static("1"));
        (*raw).into_map(&mut map);
        let names: Vec<&str> = map.keys().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            ["server", "x-case", "content-length", "date", "x-after"]
        );

        let many: Vec<u8> = (0..RAW_LINES + 1)
            .flat_map(|i| format!("x-{i}: v\r\n").into_bytes())
            .collect();
        for head in [
            &b"HTTP/1.1 200 OK\r\nx-a:v\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nx-a: v \r\n\r\n",
            b"HTTP/1.1 200 OK\nx-a: v\n\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: x-a\r\nx-a: v\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-Envoy-Immediate-Health-Check-Fail: true\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nx-envoy-upstream-service-time: 5\r\n\r\n",
            &[&b"HTTP/1.1 200 OK\r\n"[..], &many, b"\r\n"].concat(),
        ] {
            let h = parse(head);
            assert!(h.raw.is_none(), "{:?}", String::from_utf8_lossy(head));
        }
        let h = parse(b"HTTP/1.1 200 OK\r\nX-Envoy-Immediate-Health-Check-Fail: true\r\n\r\n");
        assert!(h.seen.immediate_hc_fail());
    }

    /// Past the fields whose offsets fit on the stack, and into a recycled map too small for
    /// them: every field arrives, in order.
    #[test]
    fn a_head_with_many_fields_keeps_them_all() {
        for n in [
            INLINE_FIELDS - 1,
            INLINE_FIELDS,
            INLINE_FIELDS + 1,
            MAX_HEADERS - 1,
        ] {
            let mut raw = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n".to_vec();
            for i in 0..n {
                raw.extend_from_slice(format!("x-f{i}: v{i}\r\n").as_bytes());
            }
            raw.extend_from_slice(b"\r\n");
            let mut buf = BytesMut::from(&raw[..]);
            let mut spare = HeaderMap::with_capacity(2);
            let Ok(Some(Parsed::Final(h))) = parse_head(&mut buf, &mut spare, false, false, false)
            else {
                panic!("{n} fields");
            };
            let names: Vec<String> = h.response.headers().keys().map(|k| k.to_string()).collect();
            let want: Vec<String> = std::iter::once("content-length".to_string())
                .chain((0..n).map(|i| format!("x-f{i}")))
                .collect();
            assert_eq!(names, want);
            assert_eq!(
                h.response.headers()[format!("x-f{}", n - 1)],
                format!("v{}", n - 1)
            );
        }
    }
}
