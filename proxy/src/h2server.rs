//! The downstream HTTP/2 connection: Strait's own server codec (frames, HPACK through
//! [`crate::hpack`], flow control, stream states), with every stream's request future polled
//! inside the connection's own task.
//!
//! Why not the h2 crate: its connection cost ~16k instructions of a 41k-instruction proxied h2c
//! request, against ~7k for the HTTP/1.1 server around the same request path (BENCHMARKS.md,
//! "Strait's own HTTP/2 server codec"): it indexes and Huffman-codes every response field,
//! moves frames through queues, and takes its stream lock many times a request. Here response
//! fields are never indexed (as HAProxy and nginx do), frames are encoded straight into one
//! output buffer, and a bodiless request touches no shared state but that buffer.
//!
//! Semantics follow h2 as hyper's server configured it (1 MiB stream and connection windows,
//! 16 KiB frames, 400 KiB send buffer, GOAWAY after 1,024 local stream errors, malformed requests
//! reset with PROTOCOL_ERROR, an over-large header list refused with REFUSED_STREAM), plus
//! Envoy's: a client's RST_STREAM cancels the request (logged `DR`), a response waiting for
//! window still meets the stream idle timeout ([`Stall`]), and a connection whose streams are
//! mostly reset by the client before their response ends is closed (Envoy's premature-reset
//! guard against rapid-reset floods).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::header::{self, HeaderName};
use http::{uri, HeaderMap, HeaderValue, Method, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::body::{BoxError, Inbound};
use crate::conn::Side;
use crate::h2frame::{
    put_head, Reason, ACK, CONTINUATION, DATA, DEFAULT_WINDOW, END_HEADERS, END_STREAM, GOAWAY,
    HEADERS, MAX_WINDOW, PING, PREFACE, PRIORITY, PRIORITY_FLAG, PUSH_PROMISE, RST_STREAM,
    SETTINGS, WINDOW_UPDATE,
};
use crate::hpack::{self, FieldName};

/// hyper's server defaults, kept from when hyper's (then the h2 crate's) server ran here.
const CONN_WINDOW: u32 = 1024 * 1024;
const STREAM_WINDOW: u32 = 1024 * 1024;
const MAX_FRAME_SIZE: usize = 16 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Our SETTINGS_HEADER_TABLE_SIZE (the default, not sent).
const HEADER_TABLE_SIZE: usize = 4096;
/// Envoy's premature-reset guard (`overload.premature_reset_total_stream_count`): once this many
/// streams closed, a connection where half or more were reset by the client before their
/// response ended is closed.
const PREMATURE_RESET_MIN_STREAMS: u64 = 500;
/// Rounds of streams-then-connection in one poll before yielding to other tasks.
const ROUNDS: usize = 16;
const READ_SIZE: usize = 16 * 1024;
/// The payload of the PING that follows a graceful shutdown's first GOAWAY.
const GOAWAY_PING: [u8; 8] = *b"strait-g";

/// Settings of a downstream HTTP/2 connection.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
}

/// How a connection ended badly.
#[derive(Debug)]
pub enum Error {
    /// The client broke the protocol; Strait sent GOAWAY with this code.
    Protocol {
        reason: Reason,
        what: &'static str,
    },
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Protocol { reason, what } => {
                write!(f, "HTTP/2 connection error {reason:?}: {what}")
            }
            Error::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    /// A GOAWAY Strait sent because of what the client did.
    pub fn is_protocol_error(&self) -> bool {
        matches!(self, Error::Protocol { reason, .. } if *reason != Reason::NO_ERROR)
    }
}

/// A stream reset, as the request body reports it.
#[derive(Debug)]
pub struct StreamReset(pub Reason);

impl fmt::Display for StreamReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream reset: {:?}", self.0)
    }
}

impl std::error::Error for StreamReset {}

fn conn_err(reason: Reason, what: &'static str) -> Error {
    Error::Protocol { reason, what }
}

// === Shared state ===

/// What the connection shares with its streams' tasks and request bodies (a request body may be
/// read from another task). One lock, taken a few times per request and never contended: the
/// connection, its streams and (nearly always) its bodies run on one thread.
struct Inner {
    /// Frames queued for the socket.
    out: BytesMut,
    conn_send_window: i64,
    /// The client's SETTINGS_INITIAL_WINDOW_SIZE and SETTINGS_MAX_FRAME_SIZE.
    peer_initial_window: i64,
    peer_max_frame: usize,
    /// The client changed SETTINGS_HEADER_TABLE_SIZE: the next header block starts with a size
    /// update (to 0: Strait never indexes).
    size_update_due: bool,
    /// Bytes the client may still send on the connection, and bytes consumed but not yet given
    /// back with a WINDOW_UPDATE.
    conn_recv_window: i64,
    conn_unreleased: u32,
    streams: Vec<Slot>,
    /// Wakes the connection's writer when something outside its own poll queued output.
    writer: Waker,
    /// The connection is gone: bodies end with an error.
    closed: bool,
    local_resets: usize,
    closed_streams: u64,
    premature_resets: u64,
    /// The streams Strait reset last: frames the client sent on them before it saw the reset
    /// are ignored (RFC 9113 §5.1), other frames on closed streams are errors.
    reset_ids: [u32; 64],
    reset_at: usize,
}

/// One open stream (open or half-closed either way).
struct Slot {
    id: u32,
    send_window: i64,
    /// The stream's task, waiting for window, buffer space or a reset.
    task: Option<Waker>,
    /// The client reset the stream.
    peer_reset: Option<Reason>,
    /// Strait reset the stream (a stream error of the client's making): the request stops.
    local_reset: bool,
    /// The response ended (or the stream was reset).
    send_done: bool,
    /// The stream's task still runs (the request, then the response body).
    task_alive: bool,
    /// Waiting for window or buffer space: woken when either grows.
    send_blocked: bool,
    recv: Recv,
}

#[derive(Default)]
struct Recv {
    data: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    /// END_STREAM received (or the stream was reset: `error`).
    eos: bool,
    error: Option<Reason>,
    body: Option<Waker>,
    body_alive: bool,
    /// Bytes the client may still send on this stream, and bytes consumed but not given back.
    window: i64,
    unreleased: u32,
    /// Content-Length minus the data received.
    remaining: Option<u64>,
}

impl Recv {
    fn open(&self) -> bool {
        !self.eos && self.error.is_none()
    }

    /// Tells the body's reader something arrived (data, its end, an error).
    fn wake_body(&mut self) {
        if let Some(w) = self.body.take() {
            w.wake();
        }
    }
}

impl Slot {
    /// The stream was reset, by either side: a request body still arriving fails with
    /// `reason`, and the body's reader and the stream's task hear of it.
    fn fail(&mut self, reason: Reason) {
        if self.recv.open() {
            self.recv.error = Some(reason);
        }
        self.recv.wake_body();
        if let Some(w) = &self.task {
            w.wake_by_ref();
        }
    }
}

type Shared = Arc<Mutex<Inner>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock cannot leave frames half-written in a way that matters more
    // than losing the connection; go on with the state as it is.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn slot(&mut self, id: u32) -> Option<&mut Slot> {
        self.streams.iter_mut().find(|s| s.id == id)
    }

    fn wake_writer(&self) {
        self.writer.wake_by_ref();
    }

    fn rst(&mut self, id: u32, reason: Reason) {
        put_head(&mut self.out, 4, RST_STREAM, 0, id);
        self.out.put_u32(reason.into());
        self.reset_ids[self.reset_at % self.reset_ids.len()] = id;
        self.reset_at = self.reset_at.wrapping_add(1);
    }

    fn was_reset(&self, id: u32) -> bool {
        self.reset_ids.contains(&id)
    }

    fn window_update(&mut self, id: u32, n: u32) {
        put_head(&mut self.out, 4, WINDOW_UPDATE, 0, id);
        self.out.put_u32(n);
    }

    /// Consumed (or discarded) received bytes go back to the client's windows, in updates of
    /// at least half a window, as h2 does.
    fn release(&mut self, id: u32, n: usize) {
        if n == 0 {
            return;
        }
        let n = n as u32;
        self.conn_unreleased += n;
        if self.conn_unreleased >= CONN_WINDOW / 2 {
            let u = std::mem::take(&mut self.conn_unreleased);
            self.conn_recv_window += i64::from(u);
            self.window_update(0, u);
            self.wake_writer();
        }
        let Some(s) = self.slot(id) else { return };
        if !s.recv.open() {
            return;
        }
        s.recv.unreleased += n;
        if s.recv.unreleased >= STREAM_WINDOW / 2 {
            let u = std::mem::take(&mut s.recv.unreleased);
            s.recv.window += i64::from(u);
            self.window_update(id, u);
            self.wake_writer();
        }
    }

    /// Wakes every stream waiting for window or buffer space.
    fn wake_blocked(&mut self) {
        for s in &mut self.streams {
            if std::mem::take(&mut s.send_blocked) {
                if let Some(w) = &s.task {
                    w.wake_by_ref();
                }
            }
        }
    }

    /// Resets a stream from Strait's side: the response stops, the request body fails, and
    /// the request itself is dropped when its task next runs.
    fn reset_stream(&mut self, id: u32, reason: Reason) {
        self.rst(id, reason);
        self.wake_writer();
        if let Some(s) = self.slot(id) {
            s.send_done = true;
            s.local_reset = true;
            s.fail(reason);
        }
    }

    /// Forgets a stream once nothing uses it any more: its task ended and its request body was
    /// dropped (until then the stream counts against SETTINGS_MAX_CONCURRENT_STREAMS, and the
    /// body can still read what arrived). A request still arriving after the response ended is
    /// stopped with RST_STREAM(NO_ERROR) (RFC 9113 §8.1, as h2 does).
    fn maybe_remove(&mut self, id: u32) {
        let Some(i) = self.streams.iter().position(|s| s.id == id) else {
            return;
        };
        let s = &self.streams[i];
        if s.task_alive || s.recv.body_alive {
            return;
        }
        let discarded: usize = s.recv.data.iter().map(Bytes::len).sum();
        let stop = s.recv.open() && s.peer_reset.is_none() && !s.local_reset;
        self.streams.swap_remove(i);
        self.closed_streams += 1;
        if stop {
            self.rst(id, Reason::NO_ERROR);
            self.wake_writer();
        }
        self.release(id, discarded);
    }
}

// === The connection ===

/// One HTTP/2 server connection and its streams. A future that ends with the connection.
pub struct Server<T, S, F, B>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Body<Data = Bytes>,
{
    io: T,
    service: S,
    streams: FuturesUnordered<StreamTask<F, B>>,
    shared: Shared,
    settings: Settings,
    decoder: hpack::Decoder,
    rbuf: BytesMut,
    /// Bytes being written; refilled from `Inner::out` once empty.
    wbuf: BytesMut,
    /// Polled only after their own wake-ups: the socket readable, the socket writable (or output
    /// queued from outside the poll), a stream.
    read_side: Side,
    write_side: Side,
    streams_side: Side,
    preface_done: bool,
    settings_seen: bool,
    /// A header block being assembled from HEADERS and CONTINUATION frames.
    partial: Option<Partial>,
    last_stream_id: u32,
    /// Graceful shutdown: GOAWAY(2^31-1) and a PING sent (`goaway_noticed`), then, once the
    /// PING is acknowledged, GOAWAY with the last stream (`goaway_sent`), as h2 and Envoy do:
    /// streams the client opened before it saw the first GOAWAY are still served.
    goaway_due: bool,
    goaway_noticed: bool,
    goaway_sent: bool,
    peer_goaway: bool,
    read_closed: bool,
    /// Set once the connection must end: after the output is flushed, with this result.
    ending: Option<Result<(), Error>>,
}

struct Partial {
    head: Head,
    block: BytesMut,
}

/// What a HEADERS frame says besides its header block.
struct Head {
    id: u32,
    end_stream: bool,
    /// A priority dependency on the stream itself (RFC 9113 §5.3.1: a stream error).
    depends_on_itself: bool,
}

impl<T, S, F, B> Server<T, S, F, B>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<Inbound>) -> F + Unpin,
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Stall,
{
    pub fn new(io: T, settings: Settings, service: S) -> Self {
        // One task, three sides: one waker registration a poll.
        let read_side = Side::new();
        let write_side = read_side.sibling();
        let streams_side = read_side.sibling();
        let mut out = BytesMut::with_capacity(4096);
        // SETTINGS as h2 sent them for hyper's server, then the connection window.
        put_head(&mut out, 24, SETTINGS, 0, 0);
        for (id, v) in [
            (3u16, settings.max_concurrent_streams),
            (4, STREAM_WINDOW),
            (5, MAX_FRAME_SIZE as u32),
            (6, settings.max_header_list_size),
        ] {
            out.put_u16(id);
            out.put_u32(v);
        }
        put_head(&mut out, 4, WINDOW_UPDATE, 0, 0);
        out.put_u32(CONN_WINDOW - DEFAULT_WINDOW as u32);
        let shared = Arc::new(Mutex::new(Inner {
            out,
            conn_send_window: DEFAULT_WINDOW,
            peer_initial_window: DEFAULT_WINDOW,
            peer_max_frame: MAX_FRAME_SIZE,
            size_update_due: false,
            conn_recv_window: i64::from(CONN_WINDOW),
            conn_unreleased: 0,
            streams: Vec::new(),
            writer: write_side.waker().clone(),
            closed: false,
            local_resets: 0,
            closed_streams: 0,
            premature_resets: 0,
            reset_ids: [0; 64],
            reset_at: 0,
        }));
        Server {
            io,
            service,
            streams: FuturesUnordered::new(),
            shared,
            settings,
            decoder: hpack::Decoder::new(HEADER_TABLE_SIZE),
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            read_side,
            write_side,
            streams_side,
            preface_done: false,
            settings_seen: false,
            partial: None,
            last_stream_id: 0,
            goaway_due: false,
            goaway_noticed: false,
            goaway_sent: false,
            peer_goaway: false,
            read_closed: false,
            ending: None,
        }
    }

    /// Sends GOAWAY: streams already open finish (those the client opens after are refused);
    /// the future ends once they have.
    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        let me = self.get_mut();
        me.goaway_due = true;
        me.write_side.rearm();
        me.read_side.rearm();
    }

    /// Polls streams and the connection until neither woke again, within [`ROUNDS`].
    fn drive(&mut self) -> Poll<Result<(), Error>> {
        for _ in 0..ROUNDS {
            if self.streams_side.take() {
                let mut scx = self.streams_side.context();
                while let Poll::Ready(Some(())) = self.streams.poll_next_unpin(&mut scx) {}
            }
            if self.read_side.take() && self.ending.is_none() {
                if let Err(e) = self.read() {
                    self.fail(e);
                }
            }
            if self.goaway_due && !self.goaway_noticed && self.ending.is_none() {
                self.goaway_noticed = true;
                let mut inner = lock(&self.shared);
                put_head(&mut inner.out, 8, GOAWAY, 0, 0);
                inner.out.put_u32(MAX_WINDOW as u32);
                inner.out.put_u32(Reason::NO_ERROR.into());
                put_head(&mut inner.out, 8, PING, 0, 0);
                inner.out.put_slice(&GOAWAY_PING);
                self.write_side.rearm();
            }
            // Whatever the streams and the frames just read queued goes out now, in one write.
            match self.flush() {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::Io(e))),
                Poll::Pending => {}
            }
            if let Some(done) = self.finished() {
                return Poll::Ready(done);
            }
            if !self.read_side.fired() && !self.streams_side.fired() && !self.write_side.fired() {
                return Poll::Pending;
            }
        }
        Poll::Pending
    }

    /// The connection's result once it has nothing left to do.
    fn finished(&mut self) -> Option<Result<(), Error>> {
        let idle = self.streams.is_empty();
        let closing = self.read_closed || self.peer_goaway || self.goaway_sent;
        if self.ending.is_none() && !(idle && closing) {
            // Serving: the usual answer, without looking at the output.
            return None;
        }
        if self.read_closed && !idle {
            // The client went away with streams open: they cannot answer anyone.
            return Some(Ok(()));
        }
        let flushed = self.wbuf.is_empty() && lock(&self.shared).out.is_empty();
        if !flushed {
            return None;
        }
        Some(self.ending.take().unwrap_or(Ok(())))
    }

    /// A connection error: GOAWAY with its code, then the connection ends once that is out.
    fn fail(&mut self, e: Error) {
        if let Error::Protocol { reason, what } = &e {
            tracing::debug!(?reason, what, "HTTP/2 connection error");
            let mut inner = lock(&self.shared);
            put_head(&mut inner.out, 8, GOAWAY, 0, 0);
            inner.out.put_u32(self.last_stream_id);
            inner.out.put_u32((*reason).into());
        }
        self.write_side.rearm();
        self.ending = Some(Err(e));
    }

    /// Writes queued frames until done or the socket is full.
    fn flush(&mut self) -> Poll<io::Result<()>> {
        if !self.write_side.take() && self.wbuf.is_empty() {
            // Whatever queues output wakes (or rearms) the write side: nothing to do.
            return Poll::Ready(Ok(()));
        }
        let mut cx = self.write_side.context();
        loop {
            if self.wbuf.is_empty() {
                let mut inner = lock(&self.shared);
                if inner.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let was_full = inner.out.len() >= MAX_SEND_BUFFER;
                self.wbuf.clear();
                std::mem::swap(&mut self.wbuf, &mut inner.out);
                if was_full {
                    inner.wake_blocked();
                    // Reading stopped while the output was full.
                    self.read_side.rearm();
                }
            }
            match Pin::new(&mut self.io).poll_write(&mut cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.wbuf.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Reads once and handles the frames read. After a read the side is rearmed, so the streams
    /// just opened run before the next read (a client's resets then meet running streams rather
    /// than a backlog of refused ones) — unless the output is too full to take more of the
    /// client's requests (a client that sends but does not read): then reading resumes once the
    /// output went to the socket.
    fn read(&mut self) -> Result<(), Error> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_SIZE / 2 {
            self.rbuf.reserve(READ_SIZE);
        }
        let mut cx = self.read_side.context();
        let r = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), &mut cx, &mut self.rbuf);
        match r {
            Poll::Pending => Ok(()),
            Poll::Ready(Ok(0)) => {
                self.read_closed = true;
                Ok(())
            }
            Poll::Ready(Ok(_)) => {
                self.frames()?;
                // The next read waits until the output drained (`flush` rearms the side then).
                if lock(&self.shared).out.len() < MAX_SEND_BUFFER {
                    self.read_side.rearm();
                }
                Ok(())
            }
            Poll::Ready(Err(e)) => Err(Error::Io(e)),
        }
    }

    /// Handles every whole frame in the read buffer.
    fn frames(&mut self) -> Result<(), Error> {
        if !self.preface_done {
            let n = self.rbuf.len().min(PREFACE.len());
            if self.rbuf[..n] != PREFACE[..n] {
                return Err(conn_err(
                    Reason::PROTOCOL_ERROR,
                    "invalid connection preface",
                ));
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            self.rbuf.advance(PREFACE.len());
            self.preface_done = true;
        }
        while self.rbuf.len() >= 9 {
            let h = &self.rbuf[..9];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let (kind, flags) = (h[3], h[4]);
            let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if len > MAX_FRAME_SIZE {
                return Err(conn_err(
                    Reason::FRAME_SIZE_ERROR,
                    "frame over SETTINGS_MAX_FRAME_SIZE",
                ));
            }
            if self.rbuf.len() < 9 + len {
                break;
            }
            if !self.settings_seen && (kind != SETTINGS || flags & ACK != 0) {
                return Err(conn_err(
                    Reason::PROTOCOL_ERROR,
                    "first frame is not SETTINGS",
                ));
            }
            if self.partial.is_some() && kind != CONTINUATION {
                return Err(conn_err(Reason::PROTOCOL_ERROR, "header block interrupted"));
            }
            let mut frame = self.rbuf.split_to(9 + len);
            frame.advance(9);
            self.frame(kind, flags, id, frame)?;
            if self.ending.is_some() {
                break;
            }
        }
        Ok(())
    }

    fn frame(&mut self, kind: u8, flags: u8, id: u32, payload: BytesMut) -> Result<(), Error> {
        match kind {
            DATA => self.on_data(flags, id, payload),
            HEADERS => self.on_headers(flags, id, payload),
            CONTINUATION => self.on_continuation(flags, id, payload),
            PRIORITY => {
                if id == 0 {
                    return Err(conn_err(Reason::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                // Stream errors (RFC 9113 §6.3, §5.3.1); priorities themselves are ignored.
                if payload.len() != 5 {
                    return self.local_reset(id, Reason::FRAME_SIZE_ERROR);
                }
                let dep = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if dep & 0x7fff_ffff == id {
                    return self.local_reset(id, Reason::PROTOCOL_ERROR);
                }
                Ok(())
            }
            RST_STREAM => self.on_rst(id, &payload),
            SETTINGS => self.on_settings(flags, id, &payload),
            PING => {
                if id != 0 {
                    return Err(conn_err(Reason::PROTOCOL_ERROR, "PING on a stream"));
                }
                if payload.len() != 8 {
                    return Err(conn_err(Reason::FRAME_SIZE_ERROR, "PING not 8 bytes"));
                }
                if flags & ACK == 0 {
                    let mut inner = lock(&self.shared);
                    put_head(&mut inner.out, 8, PING, ACK, 0);
                    inner.out.put_slice(&payload);
                    self.write_side.rearm();
                } else if self.goaway_noticed && !self.goaway_sent && payload[..] == GOAWAY_PING {
                    // The client has seen the first GOAWAY: streams it opens from now on are
                    // refused.
                    self.goaway_sent = true;
                    let mut inner = lock(&self.shared);
                    put_head(&mut inner.out, 8, GOAWAY, 0, 0);
                    inner.out.put_u32(self.last_stream_id);
                    inner.out.put_u32(Reason::NO_ERROR.into());
                    self.write_side.rearm();
                }
                Ok(())
            }
            GOAWAY => {
                if id != 0 {
                    return Err(conn_err(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
                }
                if payload.len() < 8 {
                    return Err(conn_err(Reason::FRAME_SIZE_ERROR, "GOAWAY under 8 bytes"));
                }
                self.peer_goaway = true;
                Ok(())
            }
            WINDOW_UPDATE => self.on_window_update(id, &payload),
            PUSH_PROMISE => Err(conn_err(
                Reason::PROTOCOL_ERROR,
                "PUSH_PROMISE from a client",
            )),
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => Ok(()),
        }
    }

    fn on_settings(&mut self, flags: u8, id: u32, p: &[u8]) -> Result<(), Error> {
        if id != 0 {
            return Err(conn_err(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if flags & ACK != 0 {
            if !p.is_empty() {
                return Err(conn_err(
                    Reason::FRAME_SIZE_ERROR,
                    "SETTINGS ACK with a payload",
                ));
            }
            return Ok(());
        }
        if !p.len().is_multiple_of(6) {
            return Err(conn_err(
                Reason::FRAME_SIZE_ERROR,
                "SETTINGS not a multiple of 6 bytes",
            ));
        }
        self.settings_seen = true;
        let mut inner = lock(&self.shared);
        for s in p.chunks_exact(6) {
            let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
            match u16::from_be_bytes([s[0], s[1]]) {
                1 => inner.size_update_due = true,
                2 if v > 1 => {
                    return Err(conn_err(
                        Reason::PROTOCOL_ERROR,
                        "SETTINGS_ENABLE_PUSH over 1",
                    ))
                }
                4 => {
                    let v = i64::from(v);
                    if v > MAX_WINDOW {
                        return Err(conn_err(
                            Reason::FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1",
                        ));
                    }
                    let delta = v - inner.peer_initial_window;
                    inner.peer_initial_window = v;
                    for st in &mut inner.streams {
                        st.send_window += delta;
                        if st.send_window > MAX_WINDOW {
                            return Err(conn_err(
                                Reason::FLOW_CONTROL_ERROR,
                                "SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window",
                            ));
                        }
                    }
                    if delta > 0 {
                        inner.wake_blocked();
                    }
                }
                5 => {
                    if !(16_384..=16_777_215).contains(&v) {
                        return Err(conn_err(
                            Reason::PROTOCOL_ERROR,
                            "SETTINGS_MAX_FRAME_SIZE out of range",
                        ));
                    }
                    inner.peer_max_frame = v as usize;
                }
                _ => {}
            }
        }
        put_head(&mut inner.out, 0, SETTINGS, ACK, 0);
        self.write_side.rearm();
        Ok(())
    }

    fn on_window_update(&mut self, id: u32, p: &[u8]) -> Result<(), Error> {
        if p.len() != 4 {
            return Err(conn_err(
                Reason::FRAME_SIZE_ERROR,
                "WINDOW_UPDATE not 4 bytes",
            ));
        }
        let inc = i64::from(u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff);
        let mut inner = lock(&self.shared);
        if id == 0 {
            if inc == 0 {
                return Err(conn_err(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0"));
            }
            inner.conn_send_window += inc;
            if inner.conn_send_window > MAX_WINDOW {
                return Err(conn_err(
                    Reason::FLOW_CONTROL_ERROR,
                    "connection window over 2^31-1",
                ));
            }
            inner.wake_blocked();
            return Ok(());
        }
        if id > self.last_stream_id {
            return Err(conn_err(
                Reason::PROTOCOL_ERROR,
                "WINDOW_UPDATE on an idle stream",
            ));
        }
        let Some(s) = inner.slot(id) else {
            // A closed stream: ignored.
            return Ok(());
        };
        if inc == 0 {
            drop(inner);
            return self.local_reset(id, Reason::PROTOCOL_ERROR);
        }
        s.send_window += inc;
        if s.send_window > MAX_WINDOW {
            drop(inner);
            return self.local_reset(id, Reason::FLOW_CONTROL_ERROR);
        }
        if std::mem::take(&mut s.send_blocked) {
            if let Some(w) = &s.task {
                w.wake_by_ref();
            }
        }
        Ok(())
    }

    fn on_rst(&mut self, id: u32, p: &[u8]) -> Result<(), Error> {
        if id == 0 {
            return Err(conn_err(Reason::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
        }
        if p.len() != 4 {
            return Err(conn_err(Reason::FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes"));
        }
        if id > self.last_stream_id {
            return Err(conn_err(
                Reason::PROTOCOL_ERROR,
                "RST_STREAM on an idle stream",
            ));
        }
        let reason = Reason::from(u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
        let mut inner = lock(&self.shared);
        let Some(s) = inner.slot(id) else {
            return Ok(());
        };
        if s.peer_reset.is_some() {
            return Ok(());
        }
        s.peer_reset = Some(reason);
        let premature = !s.send_done && !s.local_reset;
        s.fail(reason);
        if premature {
            inner.premature_resets += 1;
        }
        if inner.closed_streams >= PREMATURE_RESET_MIN_STREAMS
            && inner.premature_resets * 2 >= inner.closed_streams
        {
            return Err(conn_err(
                Reason::ENHANCE_YOUR_CALM,
                "too many streams reset by the client before their response",
            ));
        }
        Ok(())
    }

    /// A stream error from Strait's side (RST_STREAM), with h2's limit on how many a
    /// connection may cause.
    fn local_reset(&mut self, id: u32, reason: Reason) -> Result<(), Error> {
        let mut inner = lock(&self.shared);
        inner.reset_stream(id, reason);
        inner.local_resets += 1;
        if inner.local_resets > MAX_LOCAL_ERROR_RESETS {
            return Err(conn_err(
                Reason::ENHANCE_YOUR_CALM,
                "too many stream errors",
            ));
        }
        Ok(())
    }

    fn on_data(&mut self, flags: u8, id: u32, mut p: BytesMut) -> Result<(), Error> {
        if id == 0 {
            return Err(conn_err(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        if id > self.last_stream_id {
            return Err(conn_err(Reason::PROTOCOL_ERROR, "DATA on an idle stream"));
        }
        let flow_len = p.len();
        strip_padding(flags, &mut p)?;
        let mut inner = lock(&self.shared);
        inner.conn_recv_window -= flow_len as i64;
        if inner.conn_recv_window < 0 {
            return Err(conn_err(
                Reason::FLOW_CONTROL_ERROR,
                "DATA over the connection window",
            ));
        }
        let Some(s) = inner.slot(id) else {
            // A closed stream (one Strait reset, or whose response ended): ignored, but its bytes
            // still count against, and go back to, the connection window.
            inner.release(0, flow_len);
            return Ok(());
        };
        if !s.recv.open() {
            let stream_closed = s.recv.eos;
            inner.release(id, flow_len);
            drop(inner);
            if stream_closed {
                return self.local_reset(id, Reason::STREAM_CLOSED);
            }
            return Ok(());
        }
        s.recv.window -= flow_len as i64;
        if s.recv.window < 0 {
            inner.release(id, flow_len);
            drop(inner);
            return self.local_reset(id, Reason::FLOW_CONTROL_ERROR);
        }
        let n = p.len();
        let over = match &mut s.recv.remaining {
            Some(r) if (n as u64) > *r => true,
            Some(r) => {
                *r -= n as u64;
                flags & END_STREAM != 0 && *r != 0
            }
            None => false,
        };
        if over {
            // The data does not match the request's Content-Length (RFC 9113 §8.1.1).
            inner.release(id, flow_len);
            drop(inner);
            return self.local_reset(id, Reason::PROTOCOL_ERROR);
        }
        let alive = s.recv.body_alive;
        if alive && n > 0 {
            s.recv.data.push_back(p.freeze());
        }
        if flags & END_STREAM != 0 {
            s.recv.eos = true;
        }
        s.recv.wake_body();
        // Padding is consumed at once; data nobody will read too.
        let consumed = (flow_len - n) + if alive { 0 } else { n };
        inner.release(id, consumed);
        if flags & END_STREAM != 0 {
            inner.maybe_remove(id);
        }
        Ok(())
    }

    fn on_headers(&mut self, flags: u8, id: u32, mut p: BytesMut) -> Result<(), Error> {
        if id == 0 {
            return Err(conn_err(Reason::PROTOCOL_ERROR, "HEADERS on stream 0"));
        }
        strip_padding(flags, &mut p)?;
        let mut depends_on_itself = false;
        if flags & PRIORITY_FLAG != 0 {
            if p.len() < 5 {
                return Err(conn_err(
                    Reason::PROTOCOL_ERROR,
                    "HEADERS priority fields missing",
                ));
            }
            depends_on_itself = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff == id;
            p.advance(5);
        }
        let head = Head {
            id,
            end_stream: flags & END_STREAM != 0,
            depends_on_itself,
        };
        if flags & END_HEADERS == 0 {
            self.partial = Some(Partial { head, block: p });
            return Ok(());
        }
        self.header_block(head, p.freeze())
    }

    fn on_continuation(&mut self, flags: u8, id: u32, p: BytesMut) -> Result<(), Error> {
        let Some(partial) = &mut self.partial else {
            return Err(conn_err(
                Reason::PROTOCOL_ERROR,
                "CONTINUATION without HEADERS",
            ));
        };
        if partial.head.id != id {
            return Err(conn_err(
                Reason::PROTOCOL_ERROR,
                "CONTINUATION on another stream",
            ));
        }
        // A header block is bounded before it is decoded (CONTINUATION floods): twice the
        // header list limit, as h2's "way too large" bound.
        let limit =
            (self.settings.max_header_list_size as usize).saturating_mul(2) + MAX_FRAME_SIZE;
        if partial.block.len() + p.len() > limit {
            return Err(conn_err(
                Reason::ENHANCE_YOUR_CALM,
                "header block too large",
            ));
        }
        partial.block.extend_from_slice(&p);
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        let Some(partial) = self.partial.take() else {
            return Ok(());
        };
        self.header_block(partial.head, partial.block.freeze())
    }

    /// A whole header block: a new request, or a request's trailers.
    fn header_block(&mut self, head: Head, block: Bytes) -> Result<(), Error> {
        let Head {
            id,
            end_stream,
            depends_on_itself,
        } = head;
        let mut fields = Fields::new(self.settings.max_header_list_size as usize);
        self.decoder
            .decode(block, |f| fields.push(f))
            .map_err(|_| conn_err(Reason::COMPRESSION_ERROR, "HPACK decoding failed"))?;
        let over_size = fields.over_size();

        if id <= self.last_stream_id {
            let mut inner = lock(&self.shared);
            let Some(s) = inner.slot(id) else {
                if inner.was_reset(id) {
                    // Sent before the client saw Strait's reset: ignored, its block decoded above.
                    return Ok(());
                }
                return Err(conn_err(
                    Reason::PROTOCOL_ERROR,
                    "HEADERS on a closed stream",
                ));
            };
            if !s.recv.open() {
                drop(inner);
                return self.local_reset(id, Reason::STREAM_CLOSED);
            }
            // Trailers: they end the stream and carry no pseudo-header.
            let trailers = fields.trailers();
            let length_ok = matches!(s.recv.remaining, None | Some(0));
            match trailers {
                Some(t) if end_stream && length_ok && !over_size => {
                    if s.recv.body_alive {
                        s.recv.trailers = Some(t);
                    }
                    s.recv.eos = true;
                    s.recv.wake_body();
                    inner.maybe_remove(id);
                    return Ok(());
                }
                _ => {
                    drop(inner);
                    return self.local_reset(id, Reason::PROTOCOL_ERROR);
                }
            }
        }
        if id.is_multiple_of(2) {
            return Err(conn_err(
                Reason::PROTOCOL_ERROR,
                "even stream id from a client",
            ));
        }
        self.last_stream_id = id;
        if self.goaway_sent {
            lock(&self.shared).reset_stream(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        let remaining = fields.content_length;
        let malformed = (end_stream && remaining.is_some_and(|n| n != 0)) || depends_on_itself;
        // Built before the lock is taken; an over-size block was not kept whole.
        let req = if over_size || malformed {
            None
        } else {
            fields.request()
        };
        let mut inner = lock(&self.shared);
        if over_size {
            // As h2 did: a 431 answer, then the stream refused (no DATA wanted).
            tracing::debug!(
                stream = id,
                "request header list over the limit: 431, stream refused"
            );
            let size_update = std::mem::take(&mut inner.size_update_due);
            let start = inner.out.len();
            put_head(&mut inner.out, 0, HEADERS, 0, id);
            let status = http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
            hpack::encode_response(status, &HeaderMap::new(), size_update, &mut inner.out);
            end_header_block(&mut inner, start, true);
            inner.reset_stream(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        if inner.streams.len() >= self.settings.max_concurrent_streams as usize {
            inner.reset_stream(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        let Some(req) = req else {
            drop(inner);
            return self.local_reset(id, Reason::PROTOCOL_ERROR);
        };
        let body = RecvBody {
            shared: (!end_stream).then(|| self.shared.clone()),
            id,
            remaining,
        };
        let send_window = inner.peer_initial_window;
        inner.streams.push(Slot {
            id,
            send_window,
            task: None,
            peer_reset: None,
            local_reset: false,
            send_done: false,
            task_alive: true,
            send_blocked: false,
            recv: Recv {
                eos: end_stream,
                body_alive: !end_stream,
                window: i64::from(STREAM_WINDOW),
                remaining,
                ..Recv::default()
            },
        });
        drop(inner);
        let fut = (self.service)(req.map(|()| Inbound::H2(body)));
        self.streams.push(StreamTask {
            shared: self.shared.clone(),
            id,
            state: StreamState::Service { fut },
        });
        self.streams_side.rearm();
        Ok(())
    }
}

impl<T, S, F, B> Future for Server<T, S, F, B>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<Inbound>) -> F + Unpin,
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Stall,
{
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let me = self.get_mut();
        // The sides are siblings: entering and leaving one does it for all three.
        me.read_side.enter(cx);
        let r = me.drive();
        // A wake that raced with the loop's end must not be lost.
        let again =
            me.read_side.leave() | me.write_side.left_fired() | me.streams_side.left_fired();
        if r.is_pending() && again {
            cx.waker().wake_by_ref();
        }
        r
    }
}

impl<T, S, F, B> Drop for Server<T, S, F, B>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Body<Data = Bytes>,
{
    fn drop(&mut self) {
        let mut inner = lock(&self.shared);
        inner.closed = true;
        for s in &mut inner.streams {
            s.recv.wake_body();
        }
    }
}

fn strip_padding(flags: u8, p: &mut BytesMut) -> Result<usize, Error> {
    crate::h2frame::strip_padding(flags, p).map_err(|(reason, what)| conn_err(reason, what))
}

// === Request heads ===

/// A decoded header block: pseudo-headers and fields, with what makes it malformed.
struct Fields {
    method: Option<Bytes>,
    scheme: Option<Bytes>,
    authority: Option<Bytes>,
    path: Option<Bytes>,
    headers: HeaderMap,
    /// A regular field was seen (pseudo-headers must come first).
    regular: bool,
    malformed: bool,
    pseudo: bool,
    /// The header list size (RFC 9113 §6.5.2) so far, and the limit: over it, nothing more is
    /// kept (an indexed field is one byte on the wire but can be 4 KiB decoded).
    size: usize,
    limit: usize,
    /// Content-Length, noted as the fields go by (no lookup afterwards); every value must be
    /// digits and the same, else the request is malformed.
    content_length: Option<u64>,
}

impl Fields {
    fn new(limit: usize) -> Fields {
        Fields {
            method: None,
            scheme: None,
            authority: None,
            path: None,
            headers: HeaderMap::new(),
            regular: false,
            malformed: false,
            pseudo: false,
            size: 0,
            limit,
            content_length: None,
        }
    }

    fn over_size(&self) -> bool {
        self.size > self.limit
    }

    fn push(&mut self, f: hpack::Field) {
        let name_len = match &f.name {
            FieldName::Header(n) => n.as_str().len(),
            FieldName::Method | FieldName::Scheme | FieldName::Status => 7,
            FieldName::Authority => 10,
            FieldName::Path => 5,
            FieldName::Protocol => 9,
            FieldName::UnknownPseudo | FieldName::Invalid => 0,
        };
        self.size = self.size.saturating_add(name_len + f.value.len() + 32);
        if self.over_size() {
            return;
        }
        let slot = match f.name {
            FieldName::Header(name) => {
                self.regular = true;
                // Connection-specific fields are malformed in HTTP/2 (RFC 9113 §8.2.2), as is
                // any `te` but "trailers".
                if name == header::CONNECTION
                    || name == header::TRANSFER_ENCODING
                    || name == header::UPGRADE
                    || name == KEEP_ALIVE
                    || name == PROXY_CONNECTION
                    || (name == header::TE && f.value != "trailers")
                {
                    self.malformed = true;
                    return;
                }
                if name == header::CONTENT_LENGTH {
                    match crate::headers::parse_length(&f.value) {
                        Some(n) if self.content_length.is_none_or(|l| l == n) => {
                            self.content_length = Some(n);
                        }
                        _ => self.malformed = true,
                    }
                }
                match HeaderValue::from_maybe_shared(f.value) {
                    Ok(v) => {
                        if self.headers.try_append(name, v).is_err() {
                            self.size = usize::MAX;
                        }
                    }
                    Err(_) => self.malformed = true,
                }
                return;
            }
            FieldName::Method => &mut self.method,
            FieldName::Scheme => &mut self.scheme,
            FieldName::Authority => &mut self.authority,
            FieldName::Path => &mut self.path,
            // `:protocol` needs SETTINGS_ENABLE_CONNECT_PROTOCOL, which Strait does not send;
            // `:status` belongs to responses.
            FieldName::Protocol
            | FieldName::Status
            | FieldName::UnknownPseudo
            | FieldName::Invalid => {
                self.malformed = true;
                return;
            }
        };
        self.pseudo = true;
        if self.regular || slot.is_some() {
            self.malformed = true;
        } else {
            *slot = Some(f.value);
        }
    }

    /// Trailers: fields only.
    fn trailers(self) -> Option<HeaderMap> {
        (!self.malformed && !self.pseudo).then_some(self.headers)
    }

    /// The request head, as h2's server builds it; `None` when malformed.
    fn request(self) -> Option<Request<()>> {
        if self.malformed {
            return None;
        }
        let method = Method::from_bytes(&self.method?).ok()?;
        let is_connect = method == Method::CONNECT;
        let mut parts = uri::Parts::default();
        if let Some(a) = self.authority {
            parts.authority = Some(uri::Authority::from_maybe_shared(a).ok()?);
        }
        match self.scheme {
            Some(_) if is_connect => return None,
            Some(s) => {
                let scheme = match &s[..] {
                    b"http" => uri::Scheme::HTTP,
                    b"https" => uri::Scheme::HTTPS,
                    other => std::str::from_utf8(other).ok()?.parse().ok()?,
                };
                // A URI cannot have a scheme without an authority: kept only with one.
                if parts.authority.is_some() {
                    parts.scheme = Some(scheme);
                }
            }
            None if !is_connect => return None,
            None => {}
        }
        match self.path {
            Some(_) if is_connect => return None,
            Some(p) if p.is_empty() => return None,
            Some(p) => parts.path_and_query = Some(uri::PathAndQuery::from_maybe_shared(p).ok()?),
            None => {}
        }
        let uri = http::Uri::from_parts(parts).ok()?;
        let mut req = Request::new(());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_2;
        *req.headers_mut() = self.headers;
        Some(req)
    }
}

// === Request bodies ===

/// A stream's request body. Data is given back to the client's windows as it is read, so the
/// upload's back-pressure is how fast the upstream takes it.
pub struct RecvBody {
    /// None: the request ended with its head.
    shared: Option<Shared>,
    id: u32,
    /// Content-Length minus the data read so far, when the request declared one.
    remaining: Option<u64>,
}

impl fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvBody")
            .field("stream", &self.id)
            .finish()
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let me = &mut *self;
        let Some(shared) = &me.shared else {
            return Poll::Ready(None);
        };
        let mut inner = lock(shared);
        let closed = inner.closed;
        let Some(s) = inner.slot(me.id) else {
            // The slot lives as long as this body: only a closed connection takes it.
            return Poll::Ready(Some(Err("HTTP/2 connection closed".into())));
        };
        if let Some(data) = s.recv.data.pop_front() {
            let n = data.len();
            if let Some(r) = &mut me.remaining {
                *r = r.saturating_sub(n as u64);
            }
            inner.release(me.id, n);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(reason) = s.recv.error {
            // A reset before END_STREAM leaves the body incomplete, whatever its code: ending it
            // cleanly (as hyper does for NO_ERROR and CANCEL) would let an upload still being
            // sent from its own task (an early-answered one, a streaming call) reach the
            // upstream looking whole. Envoy resets the upstream request instead.
            return Poll::Ready(Some(Err(Box::new(StreamReset(reason)))));
        }
        if s.recv.eos {
            return Poll::Ready(s.recv.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        if closed {
            return Poll::Ready(Some(Err("HTTP/2 connection closed".into())));
        }
        match &s.recv.body {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => s.recv.body = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let Some(shared) = &self.shared else {
            return true;
        };
        let mut inner = lock(shared);
        match inner.slot(self.id) {
            Some(s) => s.recv.eos && s.recv.data.is_empty() && s.recv.trailers.is_none(),
            None => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        let mut inner = lock(&shared);
        let Some(s) = inner.slot(self.id) else {
            return;
        };
        s.recv.body_alive = false;
        s.recv.body = None;
        // What was received but never read goes back to the windows; what still comes is
        // discarded on arrival.
        let unread: usize = s.recv.data.drain(..).map(|d| d.len()).sum();
        s.recv.trailers = None;
        inner.release(self.id, unread);
        inner.maybe_remove(self.id);
    }
}

// === Streams ===

pin_project! {
    /// One stream: the request future until the response head, then the response body.
    struct StreamTask<F, B>
    where
        B: Body<Data = Bytes>,
    {
        shared: Shared,
        id: u32,
        #[pin]
        state: StreamState<F, B>,
    }
}

pin_project! {
    #[project = StreamStateProj]
    enum StreamState<F, B>
    where
        B: Body<Data = Bytes>,
    {
        Service { #[pin] fut: F },
        Body { #[pin] body: B, waiting: Option<(Bytes, bool)> },
        Done,
    }
}

/// Why a stream's task ends before its response did.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ended {
    /// The client reset the stream.
    PeerReset,
    /// Strait reset it: the client broke the protocol on this stream.
    LocalReset,
    /// The connection is gone.
    Gone,
}

thread_local! {
    static DROPPING: std::cell::Cell<Option<Ended>> = const { std::cell::Cell::new(None) };
}

/// True while a stream's request is being dropped because the client reset the stream: the
/// request's finisher, dropped with it, then logs Envoy's `DR` (downstream remote reset) rather
/// than `DC`. A thread-local rather than a per-request flag: the drop is synchronous, on this
/// thread, and requests that are never reset pay nothing.
pub fn dropping_for_peer_reset() -> bool {
    DROPPING.with(std::cell::Cell::get) == Some(Ended::PeerReset)
}

/// True while a stream's request is being dropped because Strait reset the stream for a
/// protocol error of the client's (Envoy's `DPE`).
pub fn dropping_for_protocol_error() -> bool {
    DROPPING.with(std::cell::Cell::get) == Some(Ended::LocalReset)
}

/// Drops what the stream still runs (request future or response body), saying why.
fn end_early<F, B>(mut state: Pin<&mut StreamState<F, B>>, why: Ended)
where
    B: Body<Data = Bytes>,
{
    DROPPING.with(|f| f.set(Some(why)));
    state.set(StreamState::Done);
    DROPPING.with(|f| f.set(None));
}

fn reset_of(s: &Slot) -> Option<Ended> {
    if s.peer_reset.is_some() {
        Some(Ended::PeerReset)
    } else if s.local_reset {
        Some(Ended::LocalReset)
    } else {
        None
    }
}

/// Registers the stream's task to hear of a reset, window or buffer space; says whether the
/// stream was reset meanwhile.
fn park(inner: &mut Inner, id: u32, cx: &Context<'_>, blocked: bool) -> Option<Ended> {
    let Some(s) = inner.slot(id) else {
        return Some(Ended::Gone);
    };
    if let Some(why) = reset_of(s) {
        return Some(why);
    }
    s.send_blocked |= blocked;
    match &s.task {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => s.task = Some(cx.waker().clone()),
    }
    None
}

/// The stream's task ends: the response is over from Strait's side.
fn finish(inner: &mut Inner, id: u32) {
    if let Some(s) = inner.slot(id) {
        s.send_done = true;
        s.task_alive = false;
        s.task = None;
    }
    inner.maybe_remove(id);
}

impl<F, B> Future for StreamTask<F, B>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Stall,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut me = self.project();
        let id = *me.id;
        if let StreamStateProj::Service { fut } = me.state.as_mut().project() {
            let res = match fut.poll(cx) {
                Poll::Ready(Ok(r)) => r,
                Poll::Ready(Err(never)) => match never {},
                Poll::Pending => {
                    let reset = park(&mut lock(me.shared), id, cx, false);
                    if let Some(why) = reset {
                        tracing::debug!(stream = id, ?why, "stream reset before its response");
                        end_early(me.state.as_mut(), why);
                        finish(&mut lock(me.shared), id);
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                }
            };
            let (mut head, body) = res.into_parts();
            let names = HeadNames::of(&head.headers);
            if names.connection_specific {
                strip_connection_headers(&mut head.headers);
            }
            if !names.date {
                head.headers.insert(header::DATE, crate::headers::date());
            }
            let eos = body.is_end_stream();
            if !eos && !names.content_length {
                if let Some(len) = body.size_hint().exact() {
                    head.headers
                        .insert(header::CONTENT_LENGTH, crate::headers::int_value(len));
                }
            }
            let mut inner = lock(me.shared);
            let reset = inner.slot(id).map_or(Some(Ended::Gone), |s| reset_of(s));
            if let Some(why) = reset {
                drop(inner);
                // The response body may hold the request's finisher: it logs why too.
                DROPPING.with(|f| f.set(Some(why)));
                drop(body);
                DROPPING.with(|f| f.set(None));
                end_early(me.state.as_mut(), why);
                finish(&mut lock(me.shared), id);
                return Poll::Ready(());
            }
            let size_update = std::mem::take(&mut inner.size_update_due);
            let start = inner.out.len();
            put_head(&mut inner.out, 0, HEADERS, 0, id);
            hpack::encode_response(head.status, &head.headers, size_update, &mut inner.out);
            end_header_block(&mut inner, start, eos);
            inner.wake_writer();
            if eos {
                finish(&mut inner, id);
                drop(inner);
                me.state.set(StreamState::Done);
                return Poll::Ready(());
            }
            drop(inner);
            me.state.set(StreamState::Body {
                body,
                waiting: None,
            });
        }
        match poll_body(me.shared, id, me.state.as_mut(), cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(end) => {
                match end {
                    // Finished with the last frame, under the same lock.
                    BodyEnd::Sent => {
                        me.state.set(StreamState::Done);
                        return Poll::Ready(());
                    }
                    BodyEnd::Reset(why) => {
                        tracing::debug!(stream = id, ?why, "stream reset mid-response");
                        end_early(me.state.as_mut(), why);
                    }
                    BodyEnd::Failed(e) => {
                        tracing::debug!(stream = id, error = %e, "response body not sent whole");
                    }
                }
                me.state.set(StreamState::Done);
                finish(&mut lock(me.shared), id);
                Poll::Ready(())
            }
        }
    }
}

enum BodyEnd {
    Sent,
    Reset(Ended),
    Failed(BoxError),
}

/// Fixes up the HEADERS frame begun at `start` for the client's frame size (`h2frame`).
fn end_header_block(inner: &mut Inner, start: usize, eos: bool) {
    let max = inner.peer_max_frame;
    crate::h2frame::end_header_block(&mut inner.out, start, eos, max);
}

/// Moves the response body into DATA frames within the client's windows and the send buffer.
fn poll_body<F, B>(
    shared: &Shared,
    id: u32,
    mut state: Pin<&mut StreamState<F, B>>,
    cx: &mut Context<'_>,
) -> Poll<BodyEnd>
where
    B: Stall,
{
    let StreamStateProj::Body { mut body, waiting } = state.as_mut().project() else {
        return Poll::Ready(BodyEnd::Failed("no response body to send".into()));
    };
    loop {
        if let Some((data, eos)) = waiting {
            let mut inner = lock(shared);
            let Some(s) = inner.slot(id) else {
                return Poll::Ready(BodyEnd::Reset(Ended::Gone));
            };
            if let Some(why) = reset_of(s) {
                return Poll::Ready(BodyEnd::Reset(why));
            }
            let send_window = s.send_window;
            let full = inner.out.len() >= MAX_SEND_BUFFER;
            let allowed = send_window.min(inner.conn_send_window).max(0) as usize;
            if !data.is_empty() && (allowed == 0 || full) {
                let _ = park(&mut inner, id, cx, true);
                drop(inner);
                // Waiting for the client's window: the stream idle timeout still runs.
                return match body.as_mut().poll_stalled(cx) {
                    Poll::Ready(e) => {
                        lock(shared).reset_stream(id, reset_reason(&e));
                        Poll::Ready(BodyEnd::Failed(e))
                    }
                    Poll::Pending => Poll::Pending,
                };
            }
            let max = inner.peer_max_frame;
            let mut budget = allowed;
            loop {
                let n = data.len().min(budget).min(max);
                let last = n == data.len();
                let flags = if last && *eos { END_STREAM } else { 0 };
                put_head(&mut inner.out, n, DATA, flags, id);
                inner.out.extend_from_slice(&data[..n]);
                data.advance(n);
                budget -= n;
                if last || budget == 0 {
                    break;
                }
            }
            let sent = (allowed - budget) as i64;
            inner.conn_send_window -= sent;
            if let Some(s) = inner.slot(id) {
                s.send_window -= sent;
            }
            inner.wake_writer();
            if !data.is_empty() {
                continue;
            }
            let eos = *eos;
            *waiting = None;
            if eos {
                finish(&mut inner, id);
                return Poll::Ready(BodyEnd::Sent);
            }
            continue;
        }
        let frame = match body.as_mut().poll_frame(cx) {
            Poll::Pending => {
                if let Some(why) = park(&mut lock(shared), id, cx, false) {
                    return Poll::Ready(BodyEnd::Reset(why));
                }
                return Poll::Pending;
            }
            Poll::Ready(f) => f,
        };
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let eos = body.is_end_stream();
                    if data.is_empty() && !eos {
                        continue;
                    }
                    *waiting = Some((data, eos));
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let mut inner = lock(shared);
                        let reset = inner.slot(id).map_or(Some(Ended::Gone), |s| reset_of(s));
                        if let Some(why) = reset {
                            return Poll::Ready(BodyEnd::Reset(why));
                        }
                        let size_update = std::mem::take(&mut inner.size_update_due);
                        let start = inner.out.len();
                        put_head(&mut inner.out, 0, HEADERS, 0, id);
                        hpack::encode_trailers(&trailers, size_update, &mut inner.out);
                        end_header_block(&mut inner, start, true);
                        inner.wake_writer();
                        finish(&mut inner, id);
                        return Poll::Ready(BodyEnd::Sent);
                    }
                }
            },
            Some(Err(e)) => {
                lock(shared).reset_stream(id, reset_reason(&e));
                return Poll::Ready(BodyEnd::Failed(e));
            }
            None => *waiting = Some((Bytes::new(), true)),
        }
    }
}

/// A body a pipe carries (`RespBody` downstream, request bodies upstream). A response body's
/// stream timeouts (the stream idle timeout, the rest of the route timeout) are polled as part of
/// `poll_frame`, but a pipe waiting for the client's flow-control window does not poll the body:
/// there it asks this instead, so a client that stops granting window ends at the stream idle
/// timeout as in Envoy, not never.
pub trait Stall: Body<Data = Bytes, Error = BoxError> {
    /// Ready with the error to reset the stream with once a timeout expired.
    fn poll_stalled(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<BoxError>;
}

/// Request bodies sent upstream (`h2client`) have no stream timers of their own: the request's
/// timeouts run on the downstream side.
impl Stall for crate::body::ProxyBody {
    fn poll_stalled(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<BoxError> {
        Poll::Pending
    }
}

/// An HTTP/2 reset reason found in the error's chain (an upstream stream reset, a downstream
/// request body's reset), else INTERNAL_ERROR.
pub(crate) fn reset_reason(e: &BoxError) -> Reason {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(err) = cur {
        if let Some(reason) = err
            .downcast_ref::<crate::h2client::Error>()
            .and_then(crate::h2client::Error::reason)
        {
            return reason;
        }
        if let Some(StreamReset(reason)) = err.downcast_ref::<StreamReset>() {
            return *reason;
        }
        cur = err.source();
    }
    Reason::INTERNAL_ERROR
}

// === Response heads ===

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// What the server needs to know of a response head's names, from one pass over them (instead
/// of a hashed lookup each).
#[derive(Debug, Default, PartialEq)]
struct HeadNames {
    /// A connection-specific field, which HTTP/2 forbids (RFC 9113 §8.2.2).
    connection_specific: bool,
    date: bool,
    content_length: bool,
}

impl HeadNames {
    fn of(h: &HeaderMap) -> HeadNames {
        let mut seen = HeadNames::default();
        for n in h.keys() {
            if n == header::DATE {
                seen.date = true;
            } else if n == header::CONTENT_LENGTH {
                seen.content_length = true;
            } else if n == header::CONNECTION
                || n == header::TRANSFER_ENCODING
                || n == header::UPGRADE
                || n == header::TE
                || n == KEEP_ALIVE
                || n == PROXY_CONNECTION
            {
                seen.connection_specific = true;
            }
        }
        seen
    }
}

fn strip_connection_headers(h: &mut HeaderMap) {
    for name in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::TE,
    ] {
        h.remove(name);
    }
    if let Some(listed) = h.remove(header::CONNECTION) {
        if let Ok(listed) = listed.to_str() {
            for name in listed.split(',') {
                h.remove(name.trim());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn connection_headers_are_found_and_stripped_with_the_fields_they_list() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(HeadNames::of(&h), HeadNames::default());
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::DATE,
            HeaderValue::from_static("Fri, 27 Nov 2026 05:00:00 GMT"),
        );
        let seen = HeadNames::of(&h);
        assert!(seen.connection_specific && seen.date && !seen.content_length);
        strip_connection_headers(&mut h);
        assert!(!HeadNames::of(&h).connection_specific);
        assert!(h.get("x-hop").is_none());
        assert_eq!(h.len(), 2);
    }
}
