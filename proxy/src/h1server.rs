//! The downstream HTTP/1.1 connection. Requests without a body (GET, HEAD, DELETE, a POST with
//! `content-length: 0` …) on a keep-alive HTTP/1.1 connection are served here: the head parsed
//! with httparse, the request future polled in the connection's task, the response head encoded
//! the way hyper's server encodes it and sent with the body's first bytes in one write. The first
//! request that needs more (a body, `Expect`, an upgrade or CONNECT, `TE`, HTTP/1.0, a head that
//! does not parse or is too large) hands the connection, with the bytes already read, to hyper's
//! server for the rest of its life, so those keep hyper's behaviour exactly.
//!
//! Why: hyper's dispatcher cost ~8.4k instructions of a 26.6k-instruction proxied request
//! (BENCHMARKS.md, "Strait's own HTTP/1.1 server").

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;

use crate::body::{BoxError, Inbound};
use crate::conn::{CountingIo, Side};
use crate::h1client::{FieldKind, RawFields, RawLine};
use crate::headers::parse_length;
use crate::headers::Seen;

/// hyper's default limit on request header fields.
const MAX_HEADERS: usize = 100;
/// hyper's limit on the request target (longer ones get its 414).
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;
/// Read size; a request head larger than this grows the buffer up to the header size limit.
const READ_SIZE: usize = 4096;
/// Bytes reserved for a response head before it is encoded.
const HEAD_ROOM: usize = 512;

/// A connection's spare header map. A closing connection leaves it to the next connection on the
/// same thread (per-core workers: the same worker), whose first request then parses into it
/// instead of allocating a map (two allocations, and two frees at the end).
#[derive(Debug)]
struct SpareMap(HeaderMap);

thread_local! {
    static SPARE_MAPS: std::cell::RefCell<Vec<HeaderMap>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Maps kept per thread: up to this many connections closing at once.
const SPARE_MAPS_MAX: usize = 16;

impl SpareMap {
    fn take() -> SpareMap {
        let m = SPARE_MAPS.try_with(|m| m.borrow_mut().pop()).ok().flatten();
        SpareMap(m.unwrap_or_default())
    }
}

impl Drop for SpareMap {
    fn drop(&mut self) {
        // Only maps this module emptied and found small are here (`recyclable`); an unused
        // one has no allocation to keep.
        if self.0.capacity() == 0 {
            return;
        }
        let m = std::mem::take(&mut self.0);
        let _ = SPARE_MAPS.try_with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < SPARE_MAPS_MAX {
                s.push(m);
            }
        });
    }
}

/// hyper's connection, which takes over when a request needs more than this module serves.
pub trait Fallback: Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> Fallback for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self)
    }
}

/// How a connection ended badly.
#[derive(Debug)]
pub enum Error {
    /// hyper's, after the hand-off.
    Fallback(hyper::Error),
    Io(io::Error),
    /// The client closed its side with a request in flight (hyper: "incomplete message").
    ClosedMidMessage,
    Body(BoxError),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Fallback(e) => e.fmt(f),
            Error::Io(e) => write!(f, "connection error: {e}"),
            Error::ClosedMidMessage => f.write_str("connection closed before message completed"),
            Error::Body(e) => write!(f, "error reading the response body: {e}"),
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Error {
        Error::Io(e)
    }
}

/// Header lines a response carries beside its map, written after the map's: the router's own
/// when nothing between it and this codec reads them (an insert costs ~300 instructions).
pub trait ExtraHeaders {
    /// A `server` value written in the place of the map's (or after the others if it has none).
    fn server(&self) -> Option<&HeaderValue>;

    fn write_extra_headers(&self, dst: &mut Vec<u8>);

    /// The upstream's fields kept out of the map, written before the map's.
    fn raw_fields(&self) -> Option<&crate::h1client::RawFields> {
        None
    }
}

/// One downstream HTTP/1.1 connection. A future that ends with the connection.
pub struct Server<S, F, B, M, H> {
    fast: Option<Fast<S, F, B>>,
    make_fallback: Option<M>,
    fallback: Option<Pin<Box<H>>>,
    shutdown: bool,
}

impl<S, F, B, M, H> Server<S, F, B, M, H>
where
    S: FnMut(Request<Inbound>, Seen) -> F + Unpin,
    F: Future<Output = Result<Response<B>, Infallible>> + Unpin,
    B: Body<Data = Bytes, Error = BoxError> + ExtraHeaders + Unpin,
    M: FnOnce(CountingIo) -> H + Unpin,
    H: Fallback,
{
    /// `max_head`: the request header size limit (hyper's `max_buf_size`); `make_fallback`
    /// builds hyper's connection on the socket when a request needs it.
    pub fn new(io: CountingIo, max_head: usize, service: S, make_fallback: M) -> Self {
        Server {
            fast: Some(Fast {
                io,
                service,
                rbuf: BytesMut::new(),
                max_head,
                wbuf: Vec::new(),
                wpos: 0,
                data: Bytes::new(),
                post: b"",
                stream: Stream::Idle,
                read_closed: false,
                scanned: 0,
                spare: SpareMap::take(),
                served: false,
                read_side: Side::new(),
            }),
            make_fallback: Some(make_fallback),
            fallback: None,
            shutdown: false,
        }
    }

    /// Finishes the response in flight with `connection: close` (or without, if its head went
    /// already) and closes; an idle connection closes at once. hyper's graceful shutdown.
    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        let me = self.get_mut();
        me.shutdown = true;
        if let Some(h) = me.fallback.as_mut() {
            h.as_mut().graceful_shutdown();
        }
    }
}

impl<S, F, B, M, H> Future for Server<S, F, B, M, H>
where
    S: FnMut(Request<Inbound>, Seen) -> F + Unpin,
    F: Future<Output = Result<Response<B>, Infallible>> + Unpin,
    B: Body<Data = Bytes, Error = BoxError> + ExtraHeaders + Unpin,
    M: FnOnce(CountingIo) -> H + Unpin,
    H: Fallback,
{
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let me = self.get_mut();
        if let Some(fast) = me.fast.as_mut() {
            match ready!(fast.poll(cx, me.shutdown)) {
                Ok(End::Closed) => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(e)),
                Ok(End::HandOff) => {}
            }
            let Some(Fast { mut io, rbuf, .. }) = me.fast.take() else {
                unreachable!("taken just above")
            };
            let Some(make) = me.make_fallback.take() else {
                unreachable!("the hand-off happens once")
            };
            io.unread(rbuf.freeze());
            let mut h = Box::pin(make(io));
            if me.shutdown {
                h.as_mut().graceful_shutdown();
            }
            me.fallback = Some(h);
        }
        match me.fallback.as_mut() {
            Some(h) => h.as_mut().poll(cx).map_err(Error::Fallback),
            None => Poll::Ready(Ok(())),
        }
    }
}

enum End {
    Closed,
    HandOff,
}

/// The fast path's connection state.
struct Fast<S, F, B> {
    io: CountingIo,
    service: S,
    rbuf: BytesMut,
    max_head: usize,
    /// Pending output, in order: `wbuf[wpos..]`, `data`, `post`.
    wbuf: Vec<u8>,
    wpos: usize,
    data: Bytes,
    post: &'static [u8],
    stream: Stream<F, B>,
    read_closed: bool,
    /// How much of `rbuf` is known to hold no complete head: httparse runs only once the end
    /// of a head arrived (hyper's `is_complete_fast`), so a head sent a byte at a time is not
    /// re-parsed from its start on every read.
    scanned: usize,
    /// The last response's header map, emptied once its head is encoded: the next request's
    /// fields go into it, which spares a map's two allocations and two frees per request.
    spare: SpareMap,
    /// A request was taken off this connection: a drain then closes between requests, where
    /// before the first one it still answers what the client is sending (hyper's `KA::Busy`).
    served: bool,
    /// The socket is read only after its own wake-up (or after a read that found bytes): a
    /// read that would find nothing costs ~200 instructions, and the task wakes for the
    /// upstream's response too.
    read_side: Side,
}

enum Stream<F, B> {
    /// Between requests.
    Idle,
    /// The request future, until the response head.
    Waiting {
        fut: F,
        keep_alive: bool,
        head: bool,
    },
    /// The response body, `None` once it ended.
    Sending {
        body: Option<B>,
        framing: Framing,
        keep_alive: bool,
    },
    /// Sends what is pending, then closes.
    Closing,
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    /// An HTTP/1.0 response of unknown length: the body ends with the connection.
    Close,
}

// Returned once per request and taken apart at once: boxing the request would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Partial,
    HandOff,
    Request {
        req: Request<Inbound>,
        keep_alive: bool,
        seen: Seen,
    },
}

impl<S, F, B> Fast<S, F, B>
where
    S: FnMut(Request<Inbound>, Seen) -> F,
    F: Future<Output = Result<Response<B>, Infallible>> + Unpin,
    B: Body<Data = Bytes, Error = BoxError> + ExtraHeaders + Unpin,
{
    fn poll(&mut self, cx: &mut Context<'_>, shutdown: bool) -> Poll<Result<End, Error>> {
        loop {
            match &mut self.stream {
                Stream::Idle => {
                    if shutdown && (self.served || self.rbuf.is_empty()) {
                        return Poll::Ready(Ok(End::Closed));
                    }
                    match self.parse() {
                        Parsed::Request {
                            req,
                            keep_alive,
                            seen,
                        } => {
                            self.served = true;
                            let head = req.method() == Method::HEAD;
                            let fut = (self.service)(req, seen);
                            self.stream = Stream::Waiting {
                                fut,
                                keep_alive,
                                head,
                            };
                        }
                        Parsed::HandOff => return Poll::Ready(Ok(End::HandOff)),
                        Parsed::Partial => {
                            // Too large, or cut short: hyper answers these (431, or nothing).
                            if self.rbuf.len() >= self.max_head || self.read_closed {
                                return Poll::Ready(Ok(if self.rbuf.is_empty() {
                                    End::Closed
                                } else {
                                    End::HandOff
                                }));
                            }
                            if ready!(self.poll_read(cx))? == 0 {
                                self.read_closed = true;
                            }
                        }
                    }
                }
                Stream::Waiting { .. } => {
                    // hyper's `mid_message_detect_eof`, before each poll of the request as in
                    // its dispatcher: a client that closed its side ends the connection,
                    // dropping (cancelling) the request.
                    if self.poll_client_gone(cx)? {
                        self.stream = Stream::Idle;
                        return Poll::Ready(Err(Error::ClosedMidMessage));
                    }
                    let Stream::Waiting {
                        fut,
                        keep_alive,
                        head,
                    } = &mut self.stream
                    else {
                        unreachable!("matched above")
                    };
                    match Pin::new(fut).poll(cx) {
                        Poll::Ready(Ok(resp)) => {
                            let keep_alive = *keep_alive && !shutdown;
                            let head = *head;
                            self.start_response(resp, keep_alive, head);
                        }
                        Poll::Ready(Err(never)) => match never {},
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Stream::Sending { .. } => {
                    ready!(self.poll_send(cx))?;
                    let Stream::Sending { keep_alive, .. } = self.stream else {
                        unreachable!("still sending")
                    };
                    self.stream = if keep_alive && !shutdown {
                        Stream::Idle
                    } else {
                        Stream::Closing
                    };
                }
                Stream::Closing => {
                    // No `shutdown`: the socket closes as this returns, and closing it sends
                    // the FIN after what is queued (a syscall per connection less).
                    ready!(self.poll_flush(cx))?;
                    return Poll::Ready(Ok(End::Closed));
                }
            }
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Not fired: the side's waker is registered with the socket, and this task with the
        // side (the connection's future never changes task), so nothing to do until it fires.
        if !self.read_side.fired() {
            return Poll::Pending;
        }
        self.read_side.register(cx);
        self.read_side.take();
        if self.rbuf.capacity() - self.rbuf.len() < READ_SIZE / 4 {
            self.rbuf.reserve(READ_SIZE);
        }
        let r = tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            &mut self.read_side.context(),
            &mut self.rbuf,
        );
        // Pending registered the side's waker with the socket. A read that found bytes may
        // leave the socket readable with no waker registered: the next read must go to it.
        if r.is_ready() {
            self.read_side.rearm();
        }
        r
    }

    /// With a request in flight: true once the client closed its side. Bytes it sends meanwhile
    /// (a pipelined request) wait in the buffer, which is not read past while non-empty.
    fn poll_client_gone(&mut self, cx: &mut Context<'_>) -> Result<bool, Error> {
        if !self.rbuf.is_empty() || self.read_closed {
            return Ok(false);
        }
        match self.poll_read(cx) {
            Poll::Ready(Ok(0)) => {
                self.read_closed = true;
                Ok(true)
            }
            Poll::Ready(Ok(_)) | Poll::Pending => Ok(false),
            Poll::Ready(Err(e)) => Err(e.into()),
        }
    }

    /// Takes a request head off the read buffer if one is complete and this module serves it.
    fn parse(&mut self) -> Parsed {
        // After a partial head, httparse runs again only once an empty line (the head's end)
        // arrived: look for one in the new bytes, from 3 back where `\r\n\r\n` may be split.
        if self.scanned > 0 {
            let tail = &self.rbuf[self.scanned.saturating_sub(3).min(self.rbuf.len())..];
            if !has_empty_line(tail) {
                self.scanned = self.rbuf.len();
                return Parsed::Partial;
            }
        } else if self.rbuf.is_empty() {
            return Parsed::Partial;
        }
        let mut slots =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        // Offsets into the buffer, taken while the parser borrows it: method, target, headers.
        let (mut inline, mut heap) = ([[0u32; 4]; crate::h1client::INLINE_FIELDS], Vec::new());
        let (len, method_end, target, idx) = {
            let len = match httparse::ParserConfig::default()
                .parse_request_with_uninit_headers(&mut req, &self.rbuf, &mut slots)
            {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => {
                    self.scanned = self.rbuf.len();
                    return Parsed::Partial;
                }
                Err(_) => return Parsed::HandOff,
            };
            if req.version != Some(1) {
                return Parsed::HandOff;
            }
            let (Some(method), Some(path)) = (req.method, req.path) else {
                return Parsed::HandOff;
            };
            if path.len() > MAX_URI_LEN {
                return Parsed::HandOff;
            }
            let p = path.as_ptr() as usize - self.rbuf.as_ptr() as usize;
            let idx =
                crate::h1client::header_offsets(&self.rbuf, req.headers, &mut inline, &mut heap);
            (len, method.len(), p..p + path.len(), idx)
        };
        if len > self.max_head {
            return Parsed::HandOff;
        }
        let head = self.rbuf.split_to(len).freeze();
        self.scanned = 0;
        match build_request(&head, method_end, target, idx, &mut self.spare.0) {
            Some((req, keep_alive, seen)) => Parsed::Request {
                req,
                keep_alive,
                seen,
            },
            None => {
                // Put the head back in front of what follows it, for hyper to read.
                let mut all = BytesMut::with_capacity(head.len() + self.rbuf.len());
                all.extend_from_slice(&head);
                all.extend_from_slice(&self.rbuf);
                self.rbuf = all;
                Parsed::HandOff
            }
        }
    }

    fn start_response(&mut self, resp: Response<B>, keep_alive: bool, head_request: bool) {
        let (parts, body) = resp.into_parts();
        // hyper's `Body::is_end_stream` / `size_hint` reading: no body, a known length, or not.
        let length = if body.is_end_stream() {
            None
        } else {
            Some(body.size_hint().exact())
        };
        self.wbuf.clear();
        // Room for a usual head at once: grown from empty on a connection's first response, it
        // took five reallocations (~950 instructions).
        self.wbuf.reserve(HEAD_ROOM);
        self.wpos = 0;
        let encoded = encode_head(
            &mut self.wbuf,
            parts.version,
            parts.status,
            &parts.headers,
            body.raw_fields(),
            body.server(),
            |dst| body.write_extra_headers(dst),
            head_request,
            length,
            keep_alive,
        );
        match encoded {
            Ok((framing, keep_alive)) => {
                let body = match framing {
                    Framing::Length(0) => None,
                    _ => Some(body),
                };
                let keep_alive = keep_alive && framing != Framing::Close;
                self.stream = Stream::Sending {
                    body,
                    framing,
                    keep_alive,
                };
            }
            Err(e) => {
                tracing::debug!(error = e, "response head not sendable; closing");
                self.wbuf.clear();
                self.stream = Stream::Closing;
            }
        }
        let mut headers = parts.headers;
        if crate::h1client::recyclable(&headers) {
            headers.clear();
            self.spare.0 = headers;
        }
    }

    /// Sends the response: the head with the body's first bytes when they are there already,
    /// then the rest as it comes. Ready(Ok) once all of it is written.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            let mut waiting = false;
            if self.data.is_empty() && self.post.is_empty() {
                // hyper's dispatcher looks for the client's EOF on every round of its loop.
                if self.poll_client_gone(cx)? {
                    return Poll::Ready(Err(Error::ClosedMidMessage));
                }
                let Stream::Sending {
                    body,
                    framing,
                    keep_alive,
                } = &mut self.stream
                else {
                    return Poll::Ready(Ok(()));
                };
                if let Some(b) = body.as_mut() {
                    let ended = match Pin::new(&mut *b).poll_frame(cx) {
                        Poll::Pending => {
                            waiting = true;
                            false
                        }
                        Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                            Ok(data) => {
                                let end = b.is_end_stream();
                                queue(
                                    &mut self.wbuf,
                                    &mut self.data,
                                    &mut self.post,
                                    framing,
                                    data,
                                );
                                // A length reached ends the body (hyper drops the rest).
                                end || *framing == Framing::Length(0)
                            }
                            // Trailers: only sent for a request with `TE: trailers`, which
                            // hyper serves; the body ends here.
                            Err(_) => true,
                        },
                        Poll::Ready(None) => true,
                        Poll::Ready(Some(Err(e))) => {
                            *body = None;
                            return Poll::Ready(Err(Error::Body(e)));
                        }
                    };
                    if ended {
                        *body = None;
                        // A body shorter than its length: what came is sent, then the
                        // connection closes (hyper's `encode_and_end` / `end_body`).
                        if !end_body(&mut self.wbuf, &mut self.post, *framing) {
                            *keep_alive = false;
                        }
                    }
                }
            }
            let done = matches!(self.stream, Stream::Sending { body: None, .. });
            if matches!(
                self.stream,
                Stream::Sending {
                    body: None,
                    keep_alive: false,
                    ..
                }
            ) {
                // The connection closes once this is out: its FIN goes with the last bytes.
                self.io.last_writes();
            }
            ready!(self.poll_flush(cx))?;
            if done {
                return Poll::Ready(Ok(()));
            }
            if waiting {
                return Poll::Pending;
            }
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.io.poll_write_parts(
            cx,
            &self.wbuf,
            &mut self.wpos,
            &mut self.data,
            &mut self.post
        ))?;
        self.wbuf.clear();
        self.wpos = 0;
        Poll::Ready(Ok(()))
    }
}

/// Queues one chunk of body; bytes past a known length are dropped (hyper's length encoder).
fn queue(
    wbuf: &mut Vec<u8>,
    data_slot: &mut Bytes,
    post: &mut &'static [u8],
    framing: &mut Framing,
    mut data: Bytes,
) {
    if data.is_empty() {
        return;
    }
    match framing {
        Framing::Length(rem) => {
            if data.len() as u64 > *rem {
                data.truncate(*rem as usize);
            }
            *rem -= data.len() as u64;
        }
        Framing::Close => {}
        Framing::Chunked => {
            let mut hex = [0u8; 16];
            wbuf.extend_from_slice(crate::h1client::hex_digits(data.len() as u64, &mut hex));
            wbuf.extend_from_slice(b"\r\n");
            *post = b"\r\n";
        }
    }
    *data_slot = data;
}

/// The body ended: a chunked one says so. False when it was shorter than its length, which
/// the connection's end must then tell the client.
fn end_body(wbuf: &mut Vec<u8>, post: &mut &'static [u8], framing: Framing) -> bool {
    match framing {
        Framing::Length(n) => n == 0,
        Framing::Close => true,
        Framing::Chunked if post.is_empty() => {
            wbuf.extend_from_slice(b"0\r\n\r\n");
            true
        }
        Framing::Chunked => {
            *post = b"\r\n0\r\n\r\n";
            true
        }
    }
}

/// Whether `b` holds `\n\n` or `\n\r\n` (hyper's `is_complete_fast`).
fn has_empty_line(b: &[u8]) -> bool {
    b.iter().enumerate().any(|(i, &c)| {
        c == b'\n' && (b.get(i + 1) == Some(&b'\n') || b.get(i + 1..i + 3) == Some(b"\r\n"))
    })
}

/// The request, if this module serves it, and whether the client keeps the connection.
fn build_request(
    head: &Bytes,
    method_end: usize,
    target: std::ops::Range<usize>,
    idx: &[[u32; 4]],
    spare: &mut HeaderMap,
) -> Option<(Request<Inbound>, bool, Seen)> {
    let method = Method::from_bytes(&head[..method_end]).ok()?;
    if method == Method::CONNECT {
        return None;
    }
    let uri = Uri::from_maybe_shared(head.slice(target)).ok()?;
    // The spare map (with the last response's allocation) and the new request's empty one
    // trade places: no map is dropped here (an empty one's drop costs ~60 instructions).
    let mut req = Request::new(Inbound::Empty);
    std::mem::swap(req.headers_mut(), spare);
    let headers = req.headers_mut();
    // Room for what the proxy adds (`x-request-id`, `x-forwarded-proto`, …) without a rehash.
    headers.reserve(idx.len() + 6);
    let mut keep_alive = true;
    let mut seen = Seen::default();
    for &[ns, ne, vs, ve] in idx {
        let (name, name_seen) = request_header_name(&head[ns as usize..ne as usize])?;
        seen = seen.with(name_seen);
        let value = crate::h1client::parsed_value(head.slice(vs as usize..ve as usize));
        match name {
            // A body, an upgrade, a 100-continue, trailers: hyper's.
            header::TRANSFER_ENCODING | header::EXPECT | header::UPGRADE | header::TE => {
                return None
            }
            header::CONTENT_LENGTH if value.as_bytes() != b"0" => return None,
            // hyper keeps one of equal lengths.
            header::CONTENT_LENGTH if headers.contains_key(header::CONTENT_LENGTH) => continue,
            header::CONNECTION => keep_alive &= !has_token(&value, "close"),
            _ => {}
        }
        let host = name == header::HOST;
        // A repeated `Host`: hyper's (the proxy sends the first upstream); here the map holds
        // at most one, which the proxy forwards as it is.
        if headers.append(name, value) && host {
            return None;
        }
    }
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    Some((req, keep_alive, seen))
}

/// Names most clients send, lower-case; every name this module acts on is among them, and
/// every name [`Seen`] tracks that reaches the proxy from here (`keep-alive` and
/// `proxy-connection` take the slow path, which asks `Seen`).
static COMMON_NAMES: [(&[u8], HeaderName, Seen); 20] = [
    (b"te", header::TE, Seen::TE),
    (b"host", header::HOST, Seen::NONE),
    (b"accept", header::ACCEPT, Seen::NONE),
    (b"cookie", header::COOKIE, Seen::NONE),
    (b"expect", header::EXPECT, Seen::EXPECT),
    (b"origin", header::ORIGIN, Seen::NONE),
    (b"referer", header::REFERER, Seen::NONE),
    (b"upgrade", header::UPGRADE, Seen::UPGRADE),
    (b"user-agent", header::USER_AGENT, Seen::NONE),
    (b"connection", header::CONNECTION, Seen::CONNECTION),
    (b"content-type", header::CONTENT_TYPE, Seen::NONE),
    (
        b"x-request-id",
        HeaderName::from_static("x-request-id"),
        Seen::X_REQUEST_ID,
    ),
    (b"authorization", header::AUTHORIZATION, Seen::NONE),
    (b"cache-control", header::CACHE_CONTROL, Seen::NONE),
    (b"content-length", header::CONTENT_LENGTH, Seen::NONE),
    (b"accept-encoding", header::ACCEPT_ENCODING, Seen::NONE),
    (b"accept-language", header::ACCEPT_LANGUAGE, Seen::NONE),
    (
        b"x-forwarded-for",
        HeaderName::from_static("x-forwarded-for"),
        Seen::X_FORWARDED_FOR,
    ),
    (
        b"x-forwarded-proto",
        HeaderName::from_static("x-forwarded-proto"),
        Seen::X_FORWARDED_PROTO,
    ),
    (
        b"transfer-encoding",
        header::TRANSFER_ENCODING,
        Seen::TRANSFER_ENCODING,
    ),
];

/// A request header's name: the usual ones matched a word at a time (as `h1client` does for
/// responses), any other through `HeaderName::from_bytes`.
fn request_header_name(raw: &[u8]) -> Option<(HeaderName, Seen)> {
    for (lower, name, seen) in common_names_of_len(raw.len()) {
        if crate::h1client::token_eq_lower(raw, lower) {
            return Some((name.clone(), *seen));
        }
    }
    let name = HeaderName::from_bytes(raw).ok()?;
    let seen = Seen::of_name(&name);
    Some((name, seen))
}

/// The entries of [`COMMON_NAMES`] `len` bytes long: a name is compared with those alone.
fn common_names_of_len(len: usize) -> &'static [(&'static [u8], HeaderName, Seen)] {
    let range = match len {
        2 => 0..1,
        4 => 1..2,
        6 => 2..6,
        7 => 6..8,
        10 => 8..10,
        12 => 10..12,
        13 => 12..14,
        14 => 14..15,
        15 => 15..18,
        17 => 18..20,
        _ => 0..0,
    };
    &COMMON_NAMES[range]
}

/// hyper's `connection_has`: a value that is not visible ASCII has no tokens.
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// hyper's `Server::can_chunked` / `can_have_body` for a request that is not CONNECT.
fn can_have_body(head_request: bool, status: StatusCode) -> bool {
    !head_request
        && !status.is_informational()
        && !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
}

/// Encodes a response head to an HTTP/1.1 request as hyper's server does (`role::Server::encode`
/// and `Conn::enforce_version`): lower-case names in the map's order; `connection` values
/// joined on one line, with `close` added when the connection will not be kept; a body's length
/// from its `content-length`, else its exact size, else chunked; `content-length: 0` for an empty
/// body; `date` when absent. `length`: `None` for no body, `Some(exact size)` otherwise.
/// Returns the body's framing and whether the connection stays open after it.
#[allow(clippy::too_many_arguments)]
fn encode_head(
    dst: &mut Vec<u8>,
    version: Version,
    status: StatusCode,
    headers: &HeaderMap,
    raw: Option<&crate::h1client::RawFields>,
    server: Option<&HeaderValue>,
    extra: impl FnOnce(&mut Vec<u8>),
    head_request: bool,
    length: Option<Option<u64>>,
    keep_alive: bool,
) -> Result<(Framing, bool), &'static str> {
    if status.is_informational() {
        // hyper sends a 1xx as the final response nowhere: it answers 500 and closes.
        dst.extend_from_slice(b"HTTP/1.1 500 Internal Server Error\r\n");
        if !head_request {
            dst.extend_from_slice(b"content-length: 0\r\n");
        }
        write_date(dst, false);
        return Ok((Framing::Length(0), false));
    }
    // The response's own version (an HTTP/1.0 upstream's answer keeps it), as hyper writes it.
    let http10 = version == Version::HTTP_10;
    if status == StatusCode::OK && !http10 {
        dst.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        dst.extend_from_slice(if http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
        dst.extend_from_slice(status.as_str().as_bytes());
        dst.push(b' ');
        dst.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    let body_allowed = can_have_body(head_request, status);
    // hyper frames an HTTP/1.0 response by length or by closing, never chunked.
    let can_chunk = body_allowed && !http10;
    let mut keep = keep_alive;
    let mut framing: Option<Framing> = None;
    let mut wrote_connection = false;
    let mut has_date = false;
    let mut server_pending = server;
    // A first `content-length`: what it frames, and whether it is written.
    let first_length = |value: &[u8]| -> Result<Option<Framing>, &'static str> {
        match length {
            Some(Some(n)) => Ok(Some(Framing::Length(n))),
            Some(None) => match parse_length(value) {
                Some(n) => Ok(Some(Framing::Length(n))),
                None => Err("invalid content-length"),
            },
            // No body: the header stays on a HEAD response, and where it says so (Envoy keeps
            // an upstream's `content-length: 0` where it was).
            None if head_request => Ok(Some(Framing::Length(0))),
            None if body_allowed && parse_length(value) == Some(0) => Ok(Some(Framing::Length(0))),
            None => Ok(None),
        }
    };
    // The upstream's fields as received (a plain head: one `content-length` at most, no
    // framing or hop-by-hop field), before anything the proxy put in the map: each run of
    // lines written as they are in one copy.
    if let Some(raw) = raw {
        let mut run: Option<(&RawLine, &RawLine)> = None;
        for l in raw.lines() {
            let keep = match l.kind {
                FieldKind::ContentLength => {
                    if framing.is_some() {
                        return Err("multiple content-length values");
                    }
                    framing = first_length(raw.value(l))?;
                    framing.is_some()
                }
                FieldKind::Server => server.is_none(),
                FieldKind::Date => {
                    has_date = true;
                    true
                }
                FieldKind::Other => true,
            };
            match run {
                Some((first, last)) if keep && RawFields::adjacent(last, l) => {
                    run = Some((first, l));
                    continue;
                }
                Some((first, last)) => dst.extend_from_slice(raw.span(first, last)),
                None => {}
            }
            run = keep.then_some((l, l));
            if l.kind == FieldKind::Server && !keep {
                if let Some(v) = server_pending.take() {
                    write_line(dst, "server: ", v);
                }
            }
        }
        if let Some((first, last)) = run {
            dst.extend_from_slice(raw.span(first, last));
        }
    }
    let mut prev: Option<&HeaderName> = None;
    for (name, value) in headers {
        let continues = prev == Some(name);
        prev = Some(name);
        match *name {
            header::CONTENT_LENGTH => {
                if continues {
                    // Only the first value is written; others must agree when it is parsed.
                    // Without a body, hyper writes a HEAD's first value as a plain field and
                    // then refuses the second.
                    if length == Some(None)
                        && framing != parse_length(value.as_bytes()).map(Framing::Length)
                        || length.is_none() && head_request
                    {
                        return Err("multiple content-length values");
                    }
                    continue;
                }
                if framing.is_some() {
                    return Err("content-length after transfer-encoding");
                }
                framing = first_length(value.as_bytes())?;
                if framing.is_none() {
                    continue;
                }
                write_line(dst, "content-length: ", value);
            }
            header::TRANSFER_ENCODING => {
                if continues {
                    continue;
                }
                if framing.is_some() {
                    return Err("transfer-encoding after content-length");
                }
                if !can_chunk {
                    continue;
                }
                framing = Some(Framing::Chunked);
                let values = headers.get_all(name);
                let chunked = values
                    .iter()
                    .next_back()
                    .is_some_and(crate::h1client::ends_in_chunked);
                let end: &[u8] = if chunked { b"" } else { b", chunked" };
                write_joined(dst, "transfer-encoding: ", values, end);
            }
            header::CONNECTION => {
                if continues {
                    continue;
                }
                wrote_connection = true;
                let values = headers.get_all(name);
                let close = values.iter().any(|v| has_token(v, "close"));
                keep &= !close;
                let end: &[u8] = if close || keep_alive { b"" } else { b", close" };
                write_joined(dst, "connection: ", values, end);
            }
            header::TRAILER => {
                if !can_chunk || continues {
                    continue;
                }
                write_joined(dst, "trailer: ", headers.get_all(name), b"");
            }
            // Every line of the map's replaced by the one value, where the first was.
            header::SERVER if server.is_some() => {
                if let Some(v) = server_pending.take() {
                    write_line(dst, "server: ", v);
                }
            }
            _ => {
                has_date |= *name == header::DATE;
                dst.extend_from_slice(name.as_str().as_bytes());
                dst.extend_from_slice(b": ");
                dst.extend_from_slice(value.as_bytes());
                dst.extend_from_slice(b"\r\n");
            }
        }
    }
    extra(dst);
    if let Some(v) = server_pending {
        write_line(dst, "server: ", v);
    }
    if !keep_alive && !wrote_connection {
        dst.extend_from_slice(b"connection: close\r\n");
    }
    let framing = match (framing, length) {
        (Some(f), _) => f,
        (None, Some(None)) if can_chunk => {
            dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
        (None, Some(None)) if body_allowed => Framing::Close,
        (None, Some(Some(n))) if n > 0 => {
            // hyper's `can_have_content_length` (a 1xx returned above).
            if !matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED) {
                write_line(dst, "content-length: ", &crate::headers::int_value(n));
                Framing::Length(n)
            } else {
                Framing::Length(0)
            }
        }
        _ => {
            if body_allowed {
                dst.extend_from_slice(b"content-length: 0\r\n");
            }
            Framing::Length(0)
        }
    };
    let framing = if body_allowed {
        framing
    } else {
        Framing::Length(0)
    };
    write_date(dst, has_date);
    Ok((framing, keep))
}

/// The head's last lines: `date` unless the response has one, and the empty line.
fn write_date(dst: &mut Vec<u8>, has_date: bool) {
    if !has_date {
        dst.extend_from_slice(b"date: ");
        dst.extend_from_slice(crate::headers::date().as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
}

fn write_line(dst: &mut Vec<u8>, name: &str, value: &HeaderValue) {
    dst.extend_from_slice(name.as_bytes());
    dst.extend_from_slice(value.as_bytes());
    dst.extend_from_slice(b"\r\n");
}

/// One line with all of a name's values joined by `, `, then `end`.
fn write_joined(
    dst: &mut Vec<u8>,
    name: &str,
    values: http::header::GetAll<'_, HeaderValue>,
    end: &[u8],
) {
    dst.extend_from_slice(name.as_bytes());
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            dst.extend_from_slice(b", ");
        }
        dst.extend_from_slice(v.as_bytes());
    }
    dst.extend_from_slice(end);
    dst.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A closed connection's emptied map goes to the next connection on the thread; an unused
    /// one (no allocation) does not, and the thread keeps at most `SPARE_MAPS_MAX`.
    #[test]
    fn spare_maps_pass_to_the_next_connection() {
        let spares = || SPARE_MAPS.with(|s| s.borrow().len());
        assert_eq!(spares(), 0);
        drop(SpareMap::take());
        assert_eq!(spares(), 0, "an unused map is not kept");
        let mut m = SpareMap::take();
        m.0.insert("x-a", HeaderValue::from_static("1"));
        m.0.clear();
        let cap = m.0.capacity();
        drop(m);
        assert_eq!(spares(), 1);
        let next = SpareMap::take();
        assert_eq!((next.0.capacity(), next.0.len()), (cap, 0));
        assert_eq!(spares(), 0);
        drop(next);
        let many: Vec<SpareMap> = (0..SPARE_MAPS_MAX + 4)
            .map(|_| SpareMap(HeaderMap::with_capacity(4)))
            .collect();
        drop(many);
        assert_eq!(spares(), SPARE_MAPS_MAX);
    }

    /// The table gives what `HeaderName::from_bytes` gives, whatever the case on the wire, and
    /// what `Seen` would make of the name.
    #[test]
    fn common_request_names_match_the_slow_path_in_any_case() {
        for entry @ (lower, name, seen) in &COMMON_NAMES {
            let of_len = common_names_of_len(lower.len());
            assert!(of_len.iter().any(|e| std::ptr::eq(e, entry)), "{name}");
            assert!(
                of_len.iter().all(|(l, _, _)| l.len() == lower.len()),
                "{name}"
            );
            assert_eq!(*seen, Seen::of_name(name), "{name}");
            let upper = lower.to_ascii_uppercase();
            let mut title = lower.to_vec();
            let mut start = true;
            for b in title.iter_mut() {
                if start {
                    b.make_ascii_uppercase();
                }
                start = *b == b'-';
            }
            for raw in [lower.to_vec(), upper, title] {
                assert_eq!(request_header_name(&raw), Some((name.clone(), *seen)));
                assert_eq!(HeaderName::from_bytes(&raw).ok().as_ref(), Some(name));
            }
        }
        assert_eq!(
            request_header_name(b"X-Custom")
                .as_ref()
                .map(|(n, s)| (n.as_str(), *s)),
            Some(("x-custom", Seen::NONE))
        );
        assert_eq!(
            request_header_name(b"Keep-Alive").map(|(_, s)| s),
            Some(Seen::of_name(&HeaderName::from_static("keep-alive")))
        );
        assert!(request_header_name(b"bad name").is_none());
    }

    fn head(
        status: u16,
        headers: &[(&str, &str)],
        head_request: bool,
        length: Option<Option<u64>>,
        keep_alive: bool,
    ) -> (String, Result<(Framing, bool), &'static str>) {
        let mut h = HeaderMap::new();
        for (n, v) in headers {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let mut dst = Vec::new();
        let status = StatusCode::from_u16(status).unwrap();
        let r = encode_head(
            &mut dst,
            Version::HTTP_11,
            status,
            &h,
            None,
            None,
            |_| {},
            head_request,
            length,
            keep_alive,
        );
        (String::from_utf8(dst).unwrap(), r)
    }

    /// Heads hyper would refuse (it closes the connection instead) and the cases the
    /// end-to-end comparison cannot reach through the router.
    #[test]
    fn heads_hyper_refuses_or_frames_specially() {
        let date = [("date", "x")];
        let (_, r) = head(
            200,
            &[("content-length", "3"), ("content-length", "4"), date[0]],
            false,
            Some(None),
            true,
        );
        assert_eq!(r, Err("multiple content-length values"));
        let (_, r) = head(
            200,
            &[
                ("content-length", "3"),
                ("transfer-encoding", "chunked"),
                date[0],
            ],
            false,
            Some(None),
            true,
        );
        assert_eq!(r, Err("transfer-encoding after content-length"));
        // A transfer-coding that does not end in chunked gets it added.
        let (h, r) = head(
            200,
            &[("transfer-encoding", "gzip"), date[0]],
            false,
            Some(None),
            true,
        );
        assert_eq!(r, Ok((Framing::Chunked, true)));
        assert!(h.contains("transfer-encoding: gzip, chunked\r\n"), "{h}");
        // A 1xx cannot be the final response: hyper answers 500 and closes.
        let (h, r) = head(103, &[], false, None, true);
        assert_eq!(r, Ok((Framing::Length(0), false)));
        assert!(h.starts_with("HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\ndate: "));
        // The response's own `connection: close` ends the connection; a drain adds one.
        let (h, r) = head(200, &[("connection", "close"), date[0]], false, None, true);
        assert_eq!(r, Ok((Framing::Length(0), false)));
        assert!(h.contains("connection: close\r\n"));
        let (h, r) = head(
            200,
            &[("connection", "x-a"), date[0]],
            false,
            Some(Some(2)),
            false,
        );
        assert_eq!(r, Ok((Framing::Length(2), false)));
        assert!(h.contains("connection: x-a, close\r\n"), "{h}");
        // A HEAD's repeated length without a body: hyper refuses it.
        let (_, r) = head(
            200,
            &[("content-length", "3"), ("content-length", "3"), date[0]],
            true,
            None,
            true,
        );
        assert_eq!(r, Err("multiple content-length values"));
        // A 1xx answering a HEAD: the 500 has no content-length either.
        let (h, _) = head(100, &[], true, None, true);
        assert!(!h.contains("content-length"), "{h}");
    }

    /// An HTTP/1.0 response (an HTTP/1.0 upstream's) keeps its version and is framed by
    /// length or by the connection's end, never chunked.
    #[test]
    fn http10_responses_are_never_chunked() {
        let h = HeaderMap::new();
        let mut dst = Vec::new();
        let r = encode_head(
            &mut dst,
            Version::HTTP_10,
            StatusCode::OK,
            &h,
            None,
            None,
            |_| {},
            false,
            Some(None),
            true,
        );
        assert_eq!(r, Ok((Framing::Close, true)));
        let text = String::from_utf8(dst).unwrap();
        assert!(text.starts_with("HTTP/1.0 200 OK\r\ndate: "), "{text}");
        assert!(!text.contains("transfer-encoding"));
    }

    #[test]
    fn a_head_end_is_found_across_read_boundaries() {
        assert!(has_empty_line(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"));
        assert!(has_empty_line(b"\n\r\n"));
        assert!(has_empty_line(b"x\n\n"));
        assert!(!has_empty_line(b"GET / HTTP/1.1\r\nhost: a\r\n\r"));
        assert!(!has_empty_line(b"\r\n"));
        assert!(!has_empty_line(b""));
    }

    #[test]
    fn lengths_and_tokens_read_as_hyper_reads_them() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(parse_length(v("00000000000000000005").as_bytes()), Some(5));
        assert_eq!(parse_length(v("18446744073709551616").as_bytes()), None);
        assert_eq!(parse_length(v("1 2").as_bytes()), None);
        assert_eq!(parse_length(v("").as_bytes()), None);
        assert!(has_token(&v("keep-alive, Close"), "close"));
        assert!(!has_token(
            &HeaderValue::from_bytes(b"close, \xe9").unwrap(),
            "close"
        ));
    }
}
