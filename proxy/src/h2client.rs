//! Strait's HTTP/2 upstream client: its own codec (frames, HPACK through [`crate::hpack`], flow
//! control, stream states), the client twin of [`crate::h2server`].
//!
//! One connection task (the driver, [`Connection`], polled by `pool`'s driver task with the idle
//! timer) owns the socket, the read buffer and the HPACK decoder; it parses frames, hands
//! response heads, data and trailers to the streams' slots and writes what is queued with one
//! write per wake-up. The request's own task opens its stream (the HEADERS frame is encoded
//! straight into the output buffer, fields never indexed nor Huffman-coded), pipes the request
//! body while it waits for the response head, and reads the response body; a body still unsent
//! when the head arrives (a streaming call) goes on from a task of its own, so a unary call
//! spawns nothing. Slots, windows and the output buffer sit behind one per-connection mutex,
//! uncontended: a connection and the requests on it run on one worker.
//!
//! Why not the h2 crate: its client was most of what the upstream side of a gRPC call cost
//! (BENCHMARKS.md, "Strait's own HTTP/2 client codec"): HPACK indexing and Huffman coding of
//! every request field, frames moved through queues, its stream lock taken many times a call.
//! Settings and semantics are those the h2 crate had here (hyper's client defaults: 2 MiB stream
//! and 5 MiB connection receive windows, 16 KiB frames and header list, 1 MiB send buffer,
//! 100 streams until the server's SETTINGS, no push; a stream reset by the upstream fails the
//! request as a remote reset, REFUSED_STREAM as a refused one; the server's GOAWAY stops new
//! streams while those it accepted finish; the response body hands received data back to the
//! upstream's windows as it is read).

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::body::{BoxError, ProxyBody};
use crate::conn::Side;
use crate::h2frame::{
    end_header_block, put_head, Reason, ACK, CONTINUATION, DATA, DEFAULT_WINDOW, END_HEADERS,
    END_STREAM, GOAWAY, HEADERS, MAX_WINDOW, PING, PREFACE, PRIORITY, PRIORITY_FLAG, PUSH_PROMISE,
    RST_STREAM, SETTINGS, WINDOW_UPDATE,
};
use crate::h2server::reset_reason;
use crate::hpack::{self, FieldName};

/// hyper's client defaults, kept from when the h2 crate's client ran here.
const CONN_WINDOW: u32 = 5 * 1024 * 1024;
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const MAX_FRAME_SIZE: usize = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const MAX_HEADER_LIST_SIZE: usize = 16 * 1024;
/// Streams the client may open before the server's SETTINGS say how many.
const INITIAL_MAX_SEND_STREAMS: usize = 100;
/// Stream errors of the server's making before the connection is closed (h2's limit).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Our SETTINGS_HEADER_TABLE_SIZE (the default, not sent).
const HEADER_TABLE_SIZE: usize = 4096;
const MAX_STREAM_ID: u32 = (1 << 31) - 1;
const READ_SIZE: usize = 16 * 1024;
/// Rounds of read-then-write in one poll before yielding to other tasks.
const ROUNDS: usize = 16;
/// How long an ending connection may take to write out its last frames (a GOAWAY) before it is
/// closed anyway: an upstream that stopped reading would otherwise hold it until the pool's
/// idle timeout. Envoy's `delayed_close_timeout` default.
const CLOSE_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

// === Errors ===

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// The stream was reset; `remote`: by the upstream.
    Reset { reason: Reason, remote: bool },
    /// The connection ended with GOAWAY: the upstream's (`remote`) or Strait's, for a protocol
    /// error of the upstream's.
    GoAway { reason: Reason, remote: bool },
    /// The socket failed, or the upstream closed it.
    Io(io::ErrorKind),
    /// The connection is gone (its task ended).
    Closed,
}

/// Why an upstream HTTP/2 exchange, or the connection, failed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Error {
    kind: Kind,
    what: &'static str,
}

impl Error {
    fn reset(reason: Reason, remote: bool, what: &'static str) -> Error {
        Error {
            kind: Kind::Reset { reason, remote },
            what,
        }
    }

    fn io(kind: io::ErrorKind, what: &'static str) -> Error {
        Error {
            kind: Kind::Io(kind),
            what,
        }
    }

    fn closed() -> Error {
        Error {
            kind: Kind::Closed,
            what: "connection closed",
        }
    }

    /// A stream reset (not a connection error).
    pub fn is_reset(&self) -> bool {
        matches!(self.kind, Kind::Reset { .. })
    }

    /// Caused by the upstream's frame (RST_STREAM, GOAWAY).
    pub fn is_remote(&self) -> bool {
        matches!(
            self.kind,
            Kind::Reset { remote: true, .. } | Kind::GoAway { remote: true, .. }
        )
    }

    /// The connection ended because the upstream broke the protocol (Strait sent GOAWAY).
    pub fn is_protocol_error(&self) -> bool {
        matches!(self.kind, Kind::GoAway { remote: false, .. })
    }

    /// The HTTP/2 error code, for resets and GOAWAY.
    pub fn reason(&self) -> Option<Reason> {
        match self.kind {
            Kind::Reset { reason, .. } | Kind::GoAway { reason, .. } => Some(reason),
            Kind::Io(_) | Kind::Closed => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::Reset { reason, remote } => {
                let by = if remote { "received" } else { "detected" };
                write!(f, "stream error {by}: {reason} ({})", self.what)
            }
            Kind::GoAway { reason, remote } => {
                let by = if remote { "received" } else { "detected" };
                write!(f, "connection error {by}: {reason} ({})", self.what)
            }
            Kind::Io(kind) => write!(f, "connection error: {kind} ({})", self.what),
            Kind::Closed => f.write_str(self.what),
        }
    }
}

impl std::error::Error for Error {}

/// A connection error found in what the upstream sent: GOAWAY with this code.
type ConnResult = Result<(), (Reason, &'static str)>;

// === Shared state ===

/// What the connection shares with its requests' tasks and response bodies.
struct Shared {
    inner: Mutex<Inner>,
    /// No new streams: the upstream sent GOAWAY, or the connection failed. Read without the lock
    /// by the pool, which stops handing the connection out.
    gone: AtomicBool,
    /// [`SendRequest`] handles alive: with none and no streams, the connection closes.
    senders: AtomicUsize,
    /// The upstream's SETTINGS_MAX_CONCURRENT_STREAMS (100 until its SETTINGS), read without the
    /// lock by the pool, which opens another connection rather than queue past it (Envoy's
    /// pool lowers a connection's stream limit to the peer's the same way).
    max_streams: AtomicU32,
}

struct Inner {
    /// Frames queued for the socket.
    out: BytesMut,
    conn_send_window: i64,
    /// The upstream's SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE and
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    peer_initial_window: i64,
    peer_max_frame: usize,
    peer_max_streams: usize,
    /// The upstream changed SETTINGS_HEADER_TABLE_SIZE: the next header block starts with a size
    /// update (to 0: Strait never indexes).
    size_update_due: bool,
    /// Bytes the upstream may still send on the connection, and bytes consumed but not yet given
    /// back with a WINDOW_UPDATE.
    conn_recv_window: i64,
    conn_unreleased: u32,
    streams: Vec<Slot>,
    next_id: u32,
    /// Streams not yet closed both ways: what SETTINGS_MAX_CONCURRENT_STREAMS limits.
    open: usize,
    /// Requests waiting for a stream under that limit.
    waiters: Vec<Waker>,
    /// Wakes the connection's writer when something outside its own poll queued output.
    writer: Waker,
    /// The connection is unusable: open streams failed with this, new ones fail with it.
    error: Option<Error>,
    /// The last stream id of the upstream's GOAWAY.
    goaway: Option<u32>,
    /// No [`SendRequest`] is left: the connection closes once its streams are done.
    unused: bool,
    local_resets: usize,
}

/// One stream, from its HEADERS until neither its response side nor its request body's pipe
/// needs it.
struct Slot {
    id: u32,
    send_window: i64,
    /// The request body's pipe, waiting for window, buffer space, the body or a reset.
    send_task: Option<Waker>,
    send_blocked: bool,
    /// END_STREAM sent.
    send_done: bool,
    /// The stream was reset (`reset_remote`: by the upstream).
    reset: Option<Reason>,
    reset_remote: bool,
    /// Still counted in `Inner::open`.
    counted: bool,
    pipe_alive: bool,
    /// A HEAD request: the response's Content-Length describes no body.
    head_request: bool,
    recv: Recv,
}

/// A response head and the Content-Length it declared.
type Head = (Response<()>, Option<u64>);

struct Recv {
    /// The response head (and its Content-Length), until the request takes it.
    head: Option<Head>,
    head_seen: bool,
    data: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    /// END_STREAM received.
    eos: bool,
    /// The response failed before it ended.
    error: Option<Error>,
    /// The request's task (waiting for the head) or the response body's reader.
    task: Option<Waker>,
    /// The response future or body still exists.
    alive: bool,
    /// Bytes the upstream may still send on this stream, and bytes consumed but not given back.
    window: i64,
    unreleased: u32,
    /// Content-Length minus the data received.
    remaining: Option<u64>,
}

impl Recv {
    fn open(&self) -> bool {
        !self.eos && self.error.is_none()
    }

    fn wake(&mut self) {
        if let Some(w) = self.task.take() {
            w.wake();
        }
    }
}

impl Slot {
    /// The stream failed (reset, or the connection is gone): a response still arriving fails
    /// with `e`, and both sides hear of it.
    fn fail(&mut self, e: Error) {
        if self.recv.open() {
            self.recv.error = Some(e);
        }
        self.recv.wake();
        if let Some(w) = &self.send_task {
            w.wake_by_ref();
        }
    }

    fn closed(&self) -> bool {
        self.reset.is_some() || (self.recv.eos && self.send_done)
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock cannot leave frames half-written in a way that matters more
    // than losing the connection; go on with the state as it is.
    shared.inner.lock().unwrap_or_else(|p| p.into_inner())
}

fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

impl Inner {
    fn slot(&mut self, id: u32) -> Option<&mut Slot> {
        self.streams.iter_mut().find(|s| s.id == id)
    }

    fn wake_writer(&self) {
        self.writer.wake_by_ref();
    }

    fn wake_waiters(&mut self) {
        for w in self.waiters.drain(..) {
            w.wake();
        }
    }

    fn rst(&mut self, id: u32, reason: Reason) {
        put_head(&mut self.out, 4, RST_STREAM, 0, id);
        self.out.put_u32(reason.into());
        self.wake_writer();
    }

    fn window_update(&mut self, id: u32, n: u32) {
        put_head(&mut self.out, 4, WINDOW_UPDATE, 0, id);
        self.out.put_u32(n);
        self.wake_writer();
    }

    /// Consumed (or discarded) received bytes go back to the upstream's windows, in updates of
    /// at least half a window, as h2 does.
    fn release(&mut self, id: u32, n: usize) {
        if n == 0 || self.error.is_some() {
            return;
        }
        let n = n as u32;
        self.conn_unreleased += n;
        // h2's threshold: half the window the upstream still has. A fixed half of the whole
        // window is never reached once unread bodies hold the rest, and the window stays shut.
        if i64::from(self.conn_unreleased) >= self.conn_recv_window / 2 {
            let u = std::mem::take(&mut self.conn_unreleased);
            self.conn_recv_window += i64::from(u);
            self.window_update(0, u);
        }
        let Some(s) = self.slot(id) else { return };
        if !s.recv.open() || s.reset.is_some() {
            return;
        }
        s.recv.unreleased += n;
        if i64::from(s.recv.unreleased) >= s.recv.window / 2 {
            let u = std::mem::take(&mut s.recv.unreleased);
            s.recv.window += i64::from(u);
            self.window_update(id, u);
        }
    }

    /// Wakes every pipe waiting for window or buffer space.
    fn wake_blocked(&mut self) {
        for s in &mut self.streams {
            if std::mem::take(&mut s.send_blocked) {
                if let Some(w) = &s.send_task {
                    w.wake_by_ref();
                }
            }
        }
    }

    /// A stream that closed (both ways, or reset) stops counting against the upstream's limit.
    fn update_open(&mut self, id: u32) {
        let Some(s) = self.slot(id) else { return };
        if s.counted && s.closed() {
            s.counted = false;
            self.open -= 1;
            self.wake_waiters();
        }
    }

    /// Resets a stream from Strait's side with `reason`; the request (or its response body)
    /// fails with `e`.
    fn reset_stream(&mut self, id: u32, reason: Reason, e: Error) {
        let Some(s) = self.slot(id) else { return };
        if s.reset.is_some() {
            return;
        }
        s.reset = Some(reason);
        s.reset_remote = false;
        s.fail(e);
        if self.error.is_none() {
            self.rst(id, reason);
        }
        self.update_open(id);
    }

    /// Forgets a stream once neither its response side nor its pipe uses it. A stream still
    /// open then (its pipe dropped mid-body) is cancelled.
    fn maybe_remove(&mut self, id: u32) {
        let Some(i) = self.streams.iter().position(|s| s.id == id) else {
            return;
        };
        let s = &self.streams[i];
        if s.recv.alive || s.pipe_alive {
            return;
        }
        let cancel = !s.closed();
        let counted = s.counted;
        let discarded: usize = s.recv.data.iter().map(Bytes::len).sum();
        if cancel && self.error.is_none() {
            self.rst(id, Reason::CANCEL);
        }
        self.release(0, discarded);
        self.streams.swap_remove(i);
        if counted {
            self.open -= 1;
            self.wake_waiters();
        }
        if self.streams.is_empty() && (self.unused || self.goaway.is_some()) {
            // The connection was only waiting for its last stream to close.
            self.wake_writer();
        }
    }

    /// The connection failed: every stream and waiting request fails with `e`.
    fn fail_all(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        }
        for s in &mut self.streams {
            s.fail(e);
        }
        self.wake_waiters();
    }
}

// === Opening the connection ===

/// Sends the connection preface and SETTINGS over `io` (as the h2 crate's client handshake did,
/// before the first request) and returns the handle to open streams with and the connection's
/// future, which a task must poll until it ends.
pub async fn handshake<T>(mut io: T) -> Result<(SendRequest, Connection<T>), Error>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = BytesMut::with_capacity(PREFACE.len() + 9 + 24 + 13);
    hello.put_slice(PREFACE);
    // SETTINGS as the h2 crate sent them for hyper's client, then the connection window.
    put_head(&mut hello, 24, SETTINGS, 0, 0);
    for (id, v) in [
        (2u16, 0),
        (4, STREAM_WINDOW),
        (5, MAX_FRAME_SIZE as u32),
        (6, MAX_HEADER_LIST_SIZE as u32),
    ] {
        hello.put_u16(id);
        hello.put_u32(v);
    }
    put_head(&mut hello, 4, WINDOW_UPDATE, 0, 0);
    hello.put_u32(CONN_WINDOW - DEFAULT_WINDOW as u32);
    io.write_all(&hello)
        .await
        .map_err(|e| Error::io(e.kind(), "sending the connection preface"))?;
    let read_side = Side::new();
    let write_side = read_side.sibling();
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            out: BytesMut::with_capacity(4096),
            conn_send_window: DEFAULT_WINDOW,
            peer_initial_window: DEFAULT_WINDOW,
            peer_max_frame: MAX_FRAME_SIZE,
            peer_max_streams: INITIAL_MAX_SEND_STREAMS,
            size_update_due: false,
            conn_recv_window: i64::from(CONN_WINDOW),
            conn_unreleased: 0,
            streams: Vec::new(),
            next_id: 1,
            open: 0,
            waiters: Vec::new(),
            writer: write_side.waker().clone(),
            error: None,
            goaway: None,
            unused: false,
            local_resets: 0,
        }),
        gone: AtomicBool::new(false),
        senders: AtomicUsize::new(1),
        max_streams: AtomicU32::new(INITIAL_MAX_SEND_STREAMS as u32),
    });
    let conn = Connection {
        io,
        shared: shared.clone(),
        st: State {
            decoder: hpack::Decoder::new(HEADER_TABLE_SIZE),
            rbuf: BytesMut::new(),
            settings_seen: false,
            on_more_streams: None,
            partial: None,
        },
        wbuf: BytesMut::new(),
        read_side,
        write_side,
        read_closed: false,
        ending: None,
        close_timer: None,
    };
    Ok((SendRequest { shared }, conn))
}

/// Opens streams on one connection; cloned per request by the pool.
pub struct SendRequest {
    shared: Arc<Shared>,
}

impl SendRequest {
    /// The connection takes no new streams (GOAWAY received, or it failed).
    pub fn is_gone(&self) -> bool {
        self.shared.gone.load(Ordering::Acquire)
    }

    /// The upstream's limit on concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub fn max_streams(&self) -> u32 {
        self.shared.max_streams.load(Ordering::Acquire)
    }
}

impl Clone for SendRequest {
    fn clone(&self) -> SendRequest {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        SendRequest {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for SendRequest {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The last handle: the connection closes once its streams are done.
            let mut inner = lock(&self.shared);
            inner.unused = true;
            inner.wake_writer();
        }
    }
}

impl fmt::Debug for SendRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendRequest").finish_non_exhaustive()
    }
}

// === The connection ===

/// One upstream HTTP/2 connection: a future that reads and writes its socket until it ends.
pub struct Connection<T> {
    io: T,
    shared: Arc<Shared>,
    st: State,
    /// Bytes being written; refilled from `Inner::out` once empty.
    wbuf: BytesMut,
    /// Polled only after their own wake-ups: the socket readable; the socket writable or output
    /// queued from outside the poll.
    read_side: Side,
    write_side: Side,
    read_closed: bool,
    /// Set once the connection must end: after the output is flushed, with this result.
    ending: Option<Result<(), Error>>,
    /// Started once the connection is ending: bounds the wait for its output to go out.
    close_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// The reading half's state.
struct State {
    decoder: hpack::Decoder,
    rbuf: BytesMut,
    settings_seen: bool,
    /// Called when the upstream raises its stream limit: the pool may have requests waiting for
    /// a stream on a connection it found full.
    on_more_streams: Option<Box<dyn Fn() + Send + Sync>>,
    /// A header block being assembled from HEADERS and CONTINUATION frames.
    partial: Option<Partial>,
}

struct Partial {
    id: u32,
    end_stream: bool,
    block: BytesMut,
}

impl<T> Connection<T> {
    /// Calls `f` (from the connection's task) whenever the upstream raises its
    /// SETTINGS_MAX_CONCURRENT_STREAMS, after [`SendRequest::max_streams`] shows the new limit.
    pub fn on_more_streams(&mut self, f: impl Fn() + Send + Sync + 'static) {
        self.st.on_more_streams = Some(Box::new(f));
    }
}

impl<T> Connection<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    fn drive(&mut self) -> Poll<Result<(), Error>> {
        for _ in 0..ROUNDS {
            if self.read_side.take() && self.ending.is_none() && !self.read_closed {
                self.read();
            }
            if let Poll::Ready(Err(e)) = self.flush() {
                // A GOAWAY for the upstream's protocol error that cannot go out (the upstream
                // reset the connection after its garbage) ends the connection with that error,
                // which the pool counts as `upstream_cx_protocol_error`.
                let e = match self.ending {
                    Some(Err(pending)) => pending,
                    _ => Error::io(e.kind(), "writing to the upstream"),
                };
                let mut inner = lock(&self.shared);
                inner.fail_all(e);
                self.shared.gone.store(true, Ordering::Release);
                return Poll::Ready(Err(e));
            }
            if let Some(done) = self.finished() {
                return Poll::Ready(done);
            }
            if !self.read_side.fired() && !self.write_side.fired() {
                return Poll::Pending;
            }
        }
        Poll::Pending
    }

    /// The connection's result once it has nothing left to do.
    fn finished(&mut self) -> Option<Result<(), Error>> {
        if self.ending.is_none() {
            let gone = self.shared.gone.load(Ordering::Acquire);
            let unused = self.shared.senders.load(Ordering::Acquire) == 0;
            if !(gone || unused || self.read_closed) {
                // Serving: the usual answer, without taking the lock.
                return None;
            }
            let mut inner = lock(&self.shared);
            if self.read_closed {
                // The upstream closed the connection: what is still open cannot be answered.
                inner.fail_all(Error::io(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection",
                ));
                self.shared.gone.store(true, Ordering::Release);
                return Some(Ok(()));
            }
            if !inner.streams.is_empty() {
                return None;
            }
            if !gone {
                // Nobody will open streams on it any more: GOAWAY, then close.
                put_head(&mut inner.out, 8, GOAWAY, 0, 0);
                inner.out.put_u32(0);
                inner.out.put_u32(Reason::NO_ERROR.into());
            }
            inner.fail_all(Error::closed());
            self.shared.gone.store(true, Ordering::Release);
            self.ending = Some(Ok(()));
            self.write_side.rearm();
            return None;
        }
        let flushed = self.wbuf.is_empty() && lock(&self.shared).out.is_empty();
        if !flushed {
            return None;
        }
        self.ending.take()
    }

    /// A connection error of the upstream's making: GOAWAY with its code, every stream fails,
    /// and the connection ends once the GOAWAY is out.
    fn fail(
        shared: &Shared,
        write_side: &Side,
        ending: &mut Option<Result<(), Error>>,
        inner: &mut Inner,
        reason: Reason,
        what: &'static str,
    ) {
        tracing::debug!(?reason, what, "upstream HTTP/2 connection error");
        put_head(&mut inner.out, 8, GOAWAY, 0, 0);
        inner.out.put_u32(0);
        inner.out.put_u32(reason.into());
        let e = Error {
            kind: Kind::GoAway {
                reason,
                remote: false,
            },
            what,
        };
        inner.fail_all(e);
        shared.gone.store(true, Ordering::Release);
        write_side.rearm();
        *ending = Some(Err(e));
    }

    /// Writes queued frames until done or the socket is full.
    fn flush(&mut self) -> Poll<io::Result<()>> {
        if !self.write_side.take() && self.wbuf.is_empty() {
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

    /// Reads once and handles the frames read.
    fn read(&mut self) {
        let rbuf = &mut self.st.rbuf;
        if rbuf.capacity() - rbuf.len() < READ_SIZE / 2 {
            rbuf.reserve(READ_SIZE);
        }
        let mut cx = self.read_side.context();
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), &mut cx, rbuf) {
            Poll::Pending => {}
            Poll::Ready(Ok(0)) => {
                self.read_closed = true;
            }
            Poll::Ready(Ok(_)) => {
                let shared = &*self.shared;
                let mut inner = lock(shared);
                let r = self.st.frames(&mut inner, shared);
                if let Err((reason, what)) = r {
                    let ending = &mut self.ending;
                    Self::fail(shared, &self.write_side, ending, &mut inner, reason, what);
                } else if inner.out.len() < MAX_SEND_BUFFER {
                    // An upstream that sends but does not read (PING/SETTINGS
                    // floods) is read again only once the output went to the socket.
                    self.read_side.rearm();
                }
                if !inner.out.is_empty() {
                    self.write_side.rearm();
                }
            }
            Poll::Ready(Err(e)) => {
                let e = Error::io(e.kind(), "reading from the upstream");
                let mut inner = lock(&self.shared);
                inner.fail_all(e);
                self.shared.gone.store(true, Ordering::Release);
                self.ending = Some(Err(e));
            }
        }
    }
}

impl<T> Future for Connection<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Result<(), Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let me = self.get_mut();
        // The sides are siblings: entering and leaving one does it for both.
        me.read_side.enter(cx);
        let r = me.drive();
        // A wake that raced with the loop's end must not be lost.
        let again = me.read_side.leave() | me.write_side.left_fired();
        if r.is_pending() && me.ending.is_some() {
            let timer = me
                .close_timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_FLUSH_TIMEOUT)));
            if timer.as_mut().poll(cx).is_ready() {
                // The upstream does not take the last frames: close without them.
                let done = me.ending.take().unwrap_or(Ok(()));
                lock(&me.shared).fail_all(done.err().unwrap_or_else(Error::closed));
                me.shared.gone.store(true, Ordering::Release);
                return Poll::Ready(done);
            }
        }
        if r.is_pending() && again {
            cx.waker().wake_by_ref();
        }
        r
    }
}

impl<T> Drop for Connection<T> {
    fn drop(&mut self) {
        self.shared.gone.store(true, Ordering::Release);
        lock(&self.shared).fail_all(Error::closed());
    }
}

fn conn_err(reason: Reason, what: &'static str) -> ConnResult {
    Err((reason, what))
}

impl State {
    /// Handles every whole frame in the read buffer.
    fn frames(&mut self, inner: &mut Inner, shared: &Shared) -> ConnResult {
        while self.rbuf.len() >= 9 {
            let h = &self.rbuf[..9];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let (kind, flags) = (h[3], h[4]);
            let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if len > MAX_FRAME_SIZE {
                return conn_err(
                    Reason::FRAME_SIZE_ERROR,
                    "frame over SETTINGS_MAX_FRAME_SIZE",
                );
            }
            if self.rbuf.len() < 9 + len {
                break;
            }
            if !self.settings_seen && (kind != SETTINGS || flags & ACK != 0) {
                return conn_err(Reason::PROTOCOL_ERROR, "first frame is not SETTINGS");
            }
            if self.partial.is_some() && kind != CONTINUATION {
                return conn_err(Reason::PROTOCOL_ERROR, "header block interrupted");
            }
            let mut frame = self.rbuf.split_to(9 + len);
            frame.advance(9);
            self.frame(inner, shared, kind, flags, id, frame)?;
        }
        Ok(())
    }

    fn frame(
        &mut self,
        inner: &mut Inner,
        shared: &Shared,
        kind: u8,
        flags: u8,
        id: u32,
        payload: BytesMut,
    ) -> ConnResult {
        match kind {
            DATA => on_data(inner, flags, id, payload),
            HEADERS => self.on_headers(inner, flags, id, payload),
            CONTINUATION => self.on_continuation(inner, flags, id, payload),
            PRIORITY => {
                if id == 0 {
                    return conn_err(Reason::PROTOCOL_ERROR, "PRIORITY on stream 0");
                }
                // Priorities are ignored; a PRIORITY frame of another length than 5 is a stream
                // error (RFC 9113 §6.3), as in `h2server`.
                if payload.len() != 5 {
                    return local_reset(inner, id, Reason::FRAME_SIZE_ERROR, "PRIORITY size");
                }
                Ok(())
            }
            RST_STREAM => on_rst(inner, id, &payload),
            SETTINGS => {
                let first = !self.settings_seen && flags & ACK == 0;
                self.settings_seen |= first;
                let before = inner.peer_max_streams;
                let r = on_settings(inner, flags, id, &payload, first);
                if inner.peer_max_streams != before {
                    let max = u32::try_from(inner.peer_max_streams).unwrap_or(u32::MAX);
                    shared.max_streams.store(max, Ordering::Release);
                }
                if inner.peer_max_streams > before {
                    // Requests waiting for a stream here, and in the pool for a connection.
                    inner.wake_waiters();
                    if let Some(f) = &self.on_more_streams {
                        f();
                    }
                }
                r
            }
            PING => {
                if id != 0 {
                    return conn_err(Reason::PROTOCOL_ERROR, "PING on a stream");
                }
                if payload.len() != 8 {
                    return conn_err(Reason::FRAME_SIZE_ERROR, "PING not 8 bytes");
                }
                if flags & ACK == 0 {
                    put_head(&mut inner.out, 8, PING, ACK, 0);
                    inner.out.put_slice(&payload);
                }
                Ok(())
            }
            GOAWAY => on_goaway(inner, shared, id, &payload),
            WINDOW_UPDATE => on_window_update(inner, id, &payload),
            PUSH_PROMISE => conn_err(Reason::PROTOCOL_ERROR, "PUSH_PROMISE with push disabled"),
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => Ok(()),
        }
    }

    fn on_headers(&mut self, inner: &mut Inner, flags: u8, id: u32, mut p: BytesMut) -> ConnResult {
        if id == 0 {
            return conn_err(Reason::PROTOCOL_ERROR, "HEADERS on stream 0");
        }
        crate::h2frame::strip_padding(flags, &mut p)?;
        if flags & PRIORITY_FLAG != 0 {
            if p.len() < 5 {
                return conn_err(Reason::PROTOCOL_ERROR, "HEADERS priority fields missing");
            }
            p.advance(5);
        }
        let end_stream = flags & END_STREAM != 0;
        if flags & END_HEADERS == 0 {
            self.partial = Some(Partial {
                id,
                end_stream,
                block: p,
            });
            return Ok(());
        }
        self.header_block(inner, id, end_stream, p.freeze())
    }

    fn on_continuation(
        &mut self,
        inner: &mut Inner,
        flags: u8,
        id: u32,
        p: BytesMut,
    ) -> ConnResult {
        let Some(partial) = &mut self.partial else {
            return conn_err(Reason::PROTOCOL_ERROR, "CONTINUATION without HEADERS");
        };
        if partial.id != id {
            return conn_err(Reason::PROTOCOL_ERROR, "CONTINUATION on another stream");
        }
        // A header block is bounded before it is decoded (CONTINUATION floods): twice the
        // header list limit, as h2's "way too large" bound.
        if partial.block.len() + p.len() > MAX_HEADER_LIST_SIZE * 2 + MAX_FRAME_SIZE {
            return conn_err(Reason::ENHANCE_YOUR_CALM, "header block too large");
        }
        partial.block.extend_from_slice(&p);
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        let Some(partial) = self.partial.take() else {
            return Ok(());
        };
        self.header_block(
            inner,
            partial.id,
            partial.end_stream,
            partial.block.freeze(),
        )
    }

    /// A whole header block: a response head (or an informational one, skipped), or trailers.
    fn header_block(
        &mut self,
        inner: &mut Inner,
        id: u32,
        end_stream: bool,
        block: Bytes,
    ) -> ConnResult {
        let mut fields = RespFields::new();
        // Decoded whatever the stream's state, to keep the table in step with the upstream's.
        self.decoder
            .decode(block, |f| fields.push(f))
            .map_err(|_| (Reason::COMPRESSION_ERROR, "HPACK decoding failed"))?;
        if idle(inner, id) {
            return conn_err(Reason::PROTOCOL_ERROR, "HEADERS on an idle stream");
        }
        let Some(s) = inner.slot(id) else {
            // A stream Strait reset or forgot: ignored.
            return Ok(());
        };
        if s.reset.is_some() {
            return Ok(());
        }
        if s.recv.eos {
            return local_reset(inner, id, Reason::STREAM_CLOSED, "HEADERS after END_STREAM");
        }
        if fields.size > MAX_HEADER_LIST_SIZE {
            // As h2: refused (no DATA wanted), a local reset for the request.
            tracing::debug!(stream = id, "response header list over the limit");
            return local_reset(
                inner,
                id,
                Reason::REFUSED_STREAM,
                "response headers too large",
            );
        }
        if s.recv.head_seen {
            // Trailers: they end the stream and carry no pseudo-header.
            let length_ok = matches!(s.recv.remaining, None | Some(0));
            if !end_stream || fields.malformed || fields.pseudo || !length_ok {
                return local_reset(inner, id, Reason::PROTOCOL_ERROR, "malformed trailers");
            }
            if s.recv.alive {
                s.recv.trailers = Some(fields.headers);
            }
            s.recv.eos = true;
            s.recv.wake();
            inner.update_open(id);
            return Ok(());
        }
        let head_request = s.head_request;
        let Some((status, declared)) = fields.status() else {
            return local_reset(inner, id, Reason::PROTOCOL_ERROR, "malformed response head");
        };
        if status == StatusCode::SWITCHING_PROTOCOLS {
            // HTTP/2 has no 101 (RFC 9113 §8.6): a malformed response.
            return local_reset(
                inner,
                id,
                Reason::PROTOCOL_ERROR,
                "101 response over HTTP/2",
            );
        }
        if status.is_informational() {
            if end_stream {
                return local_reset(
                    inner,
                    id,
                    Reason::PROTOCOL_ERROR,
                    "1xx response with END_STREAM",
                );
            }
            // 1xx heads (100-continue, 103) are not forwarded, as with h2.
            return Ok(());
        }
        let remaining = if head_request { None } else { declared };
        if end_stream
            && remaining.is_some_and(|n| n > 0)
            && status != StatusCode::NO_CONTENT
            && status != StatusCode::NOT_MODIFIED
        {
            return local_reset(
                inner,
                id,
                Reason::PROTOCOL_ERROR,
                "END_STREAM with a non-zero Content-Length",
            );
        }
        let mut head = Response::new(());
        *head.status_mut() = status;
        *head.version_mut() = Version::HTTP_2;
        *head.headers_mut() = fields.headers;
        s.recv.head = Some((head, declared));
        s.recv.head_seen = true;
        s.recv.remaining = remaining;
        s.recv.eos = end_stream;
        s.recv.wake();
        if end_stream {
            inner.update_open(id);
        }
        Ok(())
    }
}

/// A stream id the client never opened (even ids are the server's, and it may not open any).
fn idle(inner: &Inner, id: u32) -> bool {
    id.is_multiple_of(2) || id >= inner.next_id
}

/// A stream error of the upstream's making: RST_STREAM, the request fails as reset locally
/// (a connection termination for the router, as with h2), with h2's limit on how many a
/// connection may cause.
fn local_reset(inner: &mut Inner, id: u32, reason: Reason, what: &'static str) -> ConnResult {
    tracing::debug!(stream = id, ?reason, what, "upstream HTTP/2 stream error");
    inner.reset_stream(id, reason, Error::reset(reason, false, what));
    inner.local_resets += 1;
    if inner.local_resets > MAX_LOCAL_ERROR_RESETS {
        return conn_err(Reason::ENHANCE_YOUR_CALM, "too many stream errors");
    }
    Ok(())
}

fn on_data(inner: &mut Inner, flags: u8, id: u32, mut p: BytesMut) -> ConnResult {
    if id == 0 {
        return conn_err(Reason::PROTOCOL_ERROR, "DATA on stream 0");
    }
    if idle(inner, id) {
        return conn_err(Reason::PROTOCOL_ERROR, "DATA on an idle stream");
    }
    let flow_len = p.len();
    crate::h2frame::strip_padding(flags, &mut p)?;
    inner.conn_recv_window -= flow_len as i64;
    if inner.conn_recv_window < 0 {
        return conn_err(
            Reason::FLOW_CONTROL_ERROR,
            "DATA over the connection window",
        );
    }
    let Some(s) = inner.slot(id) else {
        // A stream Strait forgot: ignored, but its bytes still count against, and go back to,
        // the connection window.
        inner.release(0, flow_len);
        return Ok(());
    };
    if s.reset.is_some() {
        inner.release(id, flow_len);
        return Ok(());
    }
    if !s.recv.head_seen || s.recv.eos {
        let (reason, what) = if s.recv.eos {
            (Reason::STREAM_CLOSED, "DATA after END_STREAM")
        } else {
            (Reason::PROTOCOL_ERROR, "DATA before the response head")
        };
        inner.release(id, flow_len);
        return local_reset(inner, id, reason, what);
    }
    s.recv.window -= flow_len as i64;
    if s.recv.window < 0 {
        inner.release(id, flow_len);
        return local_reset(
            inner,
            id,
            Reason::FLOW_CONTROL_ERROR,
            "DATA over the stream window",
        );
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
        // The data does not match the response's Content-Length (RFC 9113 §8.1.1).
        inner.release(id, flow_len);
        return local_reset(
            inner,
            id,
            Reason::PROTOCOL_ERROR,
            "DATA does not match Content-Length",
        );
    }
    let alive = s.recv.alive;
    if alive && n > 0 {
        s.recv.data.push_back(p.freeze());
    }
    let eos = flags & END_STREAM != 0;
    s.recv.eos |= eos;
    s.recv.wake();
    // Padding is consumed at once; data nobody will read too.
    let consumed = (flow_len - n) + if alive { 0 } else { n };
    inner.release(id, consumed);
    if eos {
        inner.update_open(id);
    }
    Ok(())
}

fn on_rst(inner: &mut Inner, id: u32, p: &[u8]) -> ConnResult {
    if id == 0 {
        return conn_err(Reason::PROTOCOL_ERROR, "RST_STREAM on stream 0");
    }
    let &[a, b, c, d] = p else {
        return conn_err(Reason::FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes");
    };
    if idle(inner, id) {
        return conn_err(Reason::PROTOCOL_ERROR, "RST_STREAM on an idle stream");
    }
    let reason = Reason::from(u32::from_be_bytes([a, b, c, d]));
    let Some(s) = inner.slot(id) else {
        return Ok(());
    };
    if s.reset.is_some() {
        return Ok(());
    }
    s.reset = Some(reason);
    s.reset_remote = true;
    // A response that already ended keeps what it received (RST_STREAM(NO_ERROR) after a whole
    // response only asks Strait to stop sending the request body, RFC 9113 §8.1).
    s.fail(Error::reset(reason, true, "reset by the upstream"));
    inner.update_open(id);
    Ok(())
}

/// `first`: the upstream's first SETTINGS, which ends the initial stream limit whether or not it
/// sets one.
fn on_settings(inner: &mut Inner, flags: u8, id: u32, p: &[u8], first: bool) -> ConnResult {
    if id != 0 {
        return conn_err(Reason::PROTOCOL_ERROR, "SETTINGS on a stream");
    }
    if flags & ACK != 0 {
        if !p.is_empty() {
            return conn_err(Reason::FRAME_SIZE_ERROR, "SETTINGS ACK with a payload");
        }
        return Ok(());
    }
    if !p.len().is_multiple_of(6) {
        return conn_err(
            Reason::FRAME_SIZE_ERROR,
            "SETTINGS not a multiple of 6 bytes",
        );
    }
    if first && !p.chunks_exact(6).any(|s| s[..2] == [0, 3]) {
        // No SETTINGS_MAX_CONCURRENT_STREAMS: no limit (RFC 9113 §6.5.2), as nghttp2 (Envoy's
        // codec) and the h2 crate take it once the first SETTINGS is in. gRPC-go omits it.
        inner.peer_max_streams = usize::MAX;
    }
    for s in p.chunks_exact(6) {
        let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
        match u16::from_be_bytes([s[0], s[1]]) {
            1 => inner.size_update_due = true,
            2 if v > 1 => return conn_err(Reason::PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH over 1"),
            3 => inner.peer_max_streams = v as usize,
            4 => {
                let v = i64::from(v);
                if v > MAX_WINDOW {
                    return conn_err(
                        Reason::FLOW_CONTROL_ERROR,
                        "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1",
                    );
                }
                let delta = v - inner.peer_initial_window;
                inner.peer_initial_window = v;
                for st in &mut inner.streams {
                    st.send_window += delta;
                    if st.send_window > MAX_WINDOW {
                        return conn_err(
                            Reason::FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window",
                        );
                    }
                }
                if delta > 0 {
                    inner.wake_blocked();
                }
            }
            5 => {
                if !(16_384..=16_777_215).contains(&v) {
                    return conn_err(
                        Reason::PROTOCOL_ERROR,
                        "SETTINGS_MAX_FRAME_SIZE out of range",
                    );
                }
                inner.peer_max_frame = v as usize;
            }
            _ => {}
        }
    }
    put_head(&mut inner.out, 0, SETTINGS, ACK, 0);
    Ok(())
}

fn on_window_update(inner: &mut Inner, id: u32, p: &[u8]) -> ConnResult {
    let &[a, b, c, d] = p else {
        return conn_err(Reason::FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes");
    };
    let inc = i64::from(u32::from_be_bytes([a, b, c, d]) & 0x7fff_ffff);
    if id == 0 {
        if inc == 0 {
            return conn_err(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0");
        }
        inner.conn_send_window += inc;
        if inner.conn_send_window > MAX_WINDOW {
            return conn_err(Reason::FLOW_CONTROL_ERROR, "connection window over 2^31-1");
        }
        inner.wake_blocked();
        return Ok(());
    }
    if idle(inner, id) {
        return conn_err(Reason::PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream");
    }
    let Some(s) = inner.slot(id) else {
        // A closed stream: ignored.
        return Ok(());
    };
    if inc == 0 {
        return local_reset(inner, id, Reason::PROTOCOL_ERROR, "WINDOW_UPDATE of 0");
    }
    s.send_window += inc;
    if s.send_window > MAX_WINDOW {
        return local_reset(
            inner,
            id,
            Reason::FLOW_CONTROL_ERROR,
            "stream window over 2^31-1",
        );
    }
    if std::mem::take(&mut s.send_blocked) {
        if let Some(w) = &s.send_task {
            w.wake_by_ref();
        }
    }
    Ok(())
}

fn on_goaway(inner: &mut Inner, shared: &Shared, id: u32, p: &[u8]) -> ConnResult {
    if id != 0 {
        return conn_err(Reason::PROTOCOL_ERROR, "GOAWAY on a stream");
    }
    if p.len() < 8 {
        return conn_err(Reason::FRAME_SIZE_ERROR, "GOAWAY under 8 bytes");
    }
    let last = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff;
    let reason = Reason::from(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
    tracing::debug!(last, ?reason, "upstream sent GOAWAY");
    inner.goaway = Some(inner.goaway.map_or(last, |l| l.min(last)));
    shared.gone.store(true, Ordering::Release);
    // Streams above the last id were never processed: refused, so they may be retried (as
    // nghttp2 closes them for Envoy).
    let mut refused = Vec::new();
    for s in &mut inner.streams {
        if s.id > last && s.reset.is_none() {
            s.reset = Some(Reason::REFUSED_STREAM);
            s.reset_remote = true;
            s.fail(Error::reset(
                Reason::REFUSED_STREAM,
                true,
                "above the last stream id of the upstream's GOAWAY",
            ));
            refused.push(s.id);
        }
    }
    for id in refused {
        inner.update_open(id);
    }
    inner.wake_waiters();
    Ok(())
}

// === Response heads ===

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// A decoded response header block (a head or trailers), with what makes it malformed.
struct RespFields {
    status: Option<Bytes>,
    headers: HeaderMap,
    /// A regular field was seen (pseudo-headers must come first).
    regular: bool,
    pseudo: bool,
    malformed: bool,
    /// The header list size (RFC 9113 §6.5.2); over the limit nothing more is kept.
    size: usize,
    /// The first Content-Length value, when it parses (h2 read the first one only).
    content_length: Option<Option<u64>>,
}

impl RespFields {
    fn new() -> RespFields {
        RespFields {
            status: None,
            headers: HeaderMap::new(),
            regular: false,
            pseudo: false,
            malformed: false,
            size: 0,
            content_length: None,
        }
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
        if self.size > MAX_HEADER_LIST_SIZE {
            return;
        }
        match f.name {
            FieldName::Header(name) => {
                self.regular = true;
                // Connection-specific fields are malformed in HTTP/2 (RFC 9113 §8.2.2).
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
                if name == header::CONTENT_LENGTH && self.content_length.is_none() {
                    self.content_length = Some(crate::headers::parse_length(&f.value));
                }
                match HeaderValue::from_maybe_shared(f.value) {
                    Ok(v) => {
                        if self.headers.try_append(name, v).is_err() {
                            self.size = usize::MAX;
                        }
                    }
                    Err(_) => self.malformed = true,
                }
            }
            FieldName::Status => {
                self.pseudo = true;
                if self.regular || self.status.is_some() {
                    self.malformed = true;
                } else {
                    self.status = Some(f.value);
                }
            }
            // Request pseudo-headers, unknown ones and invalid names.
            _ => {
                self.pseudo = true;
                self.malformed = true;
            }
        }
    }

    /// The status and Content-Length of a well-formed response head.
    fn status(&self) -> Option<(StatusCode, Option<u64>)> {
        if self.malformed {
            return None;
        }
        let status = StatusCode::from_bytes(self.status.as_deref()?).ok()?;
        let declared = match self.content_length {
            None => None,
            Some(Some(n)) => Some(n),
            Some(None) => return None,
        };
        Some((status, declared))
    }
}

// === Requests ===

/// Sends `req` on the connection and resolves with the response head; the response body reads
/// from the stream. The URI must be absolute (`:scheme`, `:authority`) and the headers free of
/// connection-specific fields (`forward` prepares both). Waits while the upstream's
/// SETTINGS_MAX_CONCURRENT_STREAMS streams are open.
pub async fn send(
    sender: SendRequest,
    req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, Error> {
    let (mut parts, body) = req.into_parts();
    // As hyper's client: an exact length becomes Content-Length, zero only where the method
    // gives a body meaning.
    if let Some(len) = body.size_hint().exact() {
        if (len != 0 || method_has_payload(&parts.method))
            && !parts.headers.contains_key(header::CONTENT_LENGTH)
        {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, crate::headers::int_value(len));
        }
    }
    let eos = body.is_end_stream();
    let shared = sender.shared.clone();
    drop(sender);
    let mut head = Some(parts);
    // A request abandoned while it waits for a stream takes its waker back.
    struct Waiting<'a>(&'a Shared, Option<Waker>);
    impl Drop for Waiting<'_> {
        fn drop(&mut self) {
            if let Some(w) = self.1.take() {
                lock(self.0).waiters.retain(|x| !x.will_wake(&w));
            }
        }
    }
    let mut waiting = Waiting(&shared, None);
    let id = std::future::poll_fn(|cx| {
        let r = open_stream(&shared, &mut head, eos, cx);
        waiting.1 = r.is_pending().then(|| cx.waker().clone());
        r
    })
    .await?;
    waiting.1 = None;
    drop(waiting);
    let mut pipe = (!eos).then(|| Pipe {
        shared: shared.clone(),
        id,
        body,
        waiting: None,
        done: false,
    });
    // From here, dropping the exchange (or the response body later) cancels the stream.
    let stream = RecvHandle { shared, id };
    let (head, declared) = std::future::poll_fn(|cx| {
        if let Some(p) = &mut pipe {
            if let Poll::Ready(r) = p.poll(cx) {
                log_unsent(r);
                pipe = None;
            }
        }
        stream.poll_head(cx)
    })
    .await?;
    if let Some(mut pipe) = pipe {
        // The response came first (a streaming call): the body goes on from its own task.
        tokio::spawn(async move {
            log_unsent(std::future::poll_fn(|cx| pipe.poll(cx)).await);
        });
    }
    let body = H2Body {
        stream,
        remaining: declared,
    };
    Ok(head.map(|()| body.boxed_unsync()))
}

/// Opens the stream (its HEADERS queued) once the upstream's stream limit allows.
fn open_stream(
    shared: &Shared,
    head: &mut Option<http::request::Parts>,
    eos: bool,
    cx: &Context<'_>,
) -> Poll<Result<u32, Error>> {
    let mut inner = lock(shared);
    if let Some(e) = inner.error {
        return Poll::Ready(Err(e));
    }
    if inner.goaway.is_some() || inner.next_id > MAX_STREAM_ID {
        shared.gone.store(true, Ordering::Release);
        return Poll::Ready(Err(Error::reset(
            Reason::REFUSED_STREAM,
            true,
            "the connection takes no new streams",
        )));
    }
    if inner.open >= inner.peer_max_streams {
        if !inner.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            inner.waiters.push(cx.waker().clone());
        }
        return Poll::Pending;
    }
    let Some(p) = head.take() else {
        return Poll::Ready(Err(Error::closed()));
    };
    let id = inner.next_id;
    inner.next_id += 2;
    inner.open += 1;
    let size_update = std::mem::take(&mut inner.size_update_due);
    let max = inner.peer_max_frame;
    let out = &mut inner.out;
    let start = out.len();
    put_head(out, 0, HEADERS, 0, id);
    let path = p.uri.path_and_query().map_or("/", |pq| pq.as_str());
    hpack::encode_request(
        &p.method,
        p.uri.scheme_str().unwrap_or("http"),
        p.uri.authority().map_or("", |a| a.as_str()),
        if path.is_empty() { "/" } else { path },
        &p.headers,
        size_update,
        out,
    );
    end_header_block(out, start, eos, max);
    inner.wake_writer();
    let send_window = inner.peer_initial_window;
    inner.streams.push(Slot {
        id,
        send_window,
        send_task: None,
        send_blocked: false,
        send_done: eos,
        reset: None,
        reset_remote: false,
        counted: true,
        pipe_alive: !eos,
        head_request: p.method == Method::HEAD,
        recv: Recv {
            head: None,
            head_seen: false,
            data: VecDeque::new(),
            trailers: None,
            eos: false,
            error: None,
            task: None,
            alive: true,
            window: i64::from(STREAM_WINDOW),
            unreleased: 0,
            remaining: None,
        },
    });
    Poll::Ready(Ok(id))
}

fn log_unsent(r: Result<(), PipeEnd>) {
    match r {
        Ok(()) => {}
        Err(PipeEnd::PeerReset(reason)) => {
            tracing::debug!(
                ?reason,
                "upstream reset the stream before the request body ended"
            )
        }
        Err(PipeEnd::Failed(e)) => {
            tracing::debug!(error = %e, "upstream request body not sent whole")
        }
    }
}

/// hyper's `method_has_defined_payload_semantics`.
fn method_has_payload(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

// === Request bodies ===

/// Why a pipe stopped early.
#[derive(Debug)]
enum PipeEnd {
    /// The upstream reset the stream.
    PeerReset(Reason),
    /// The body failed (the stream was reset with its reason), or the connection is gone.
    Failed(BoxError),
}

/// Copies a request body into the stream, within the upstream's flow-control windows and the
/// send buffer (a chunk in hand waits for window, so none is reserved for data that does not
/// exist yet).
struct Pipe {
    shared: Arc<Shared>,
    id: u32,
    body: ProxyBody,
    waiting: Option<(Bytes, bool)>,
    /// Ended, and said so in the slot.
    done: bool,
}

/// The pipe ends: the slot no longer waits for it.
fn finish_pipe(id: u32, done: &mut bool, inner: &mut Inner) {
    *done = true;
    if let Some(s) = inner.slot(id) {
        s.pipe_alive = false;
        s.send_task = None;
    }
    inner.maybe_remove(id);
}

/// Why the pipe cannot go on, if it cannot (then it is finished); else registers the task to
/// hear of a reset (and, `blocked`, of window or buffer space).
fn pipe_stopped(
    id: u32,
    done: &mut bool,
    inner: &mut Inner,
    cx: &Context<'_>,
    blocked: bool,
) -> Option<PipeEnd> {
    let err = inner.error;
    let end = match inner.slot(id) {
        None => Some(PipeEnd::Failed("HTTP/2 stream gone".into())),
        Some(s) => match (s.reset, err) {
            (Some(reason), _) if s.reset_remote => Some(PipeEnd::PeerReset(reason)),
            (Some(reason), _) => Some(PipeEnd::Failed(Box::new(Error::reset(
                reason,
                false,
                "stream reset",
            )))),
            (None, Some(e)) => Some(PipeEnd::Failed(Box::new(e))),
            (None, None) => {
                s.send_blocked |= blocked;
                register(&mut s.send_task, cx);
                None
            }
        },
    };
    if end.is_some() {
        finish_pipe(id, done, inner);
    }
    end
}

impl Pipe {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PipeEnd>> {
        let id = self.id;
        loop {
            if let Some((data, eos)) = &mut self.waiting {
                let mut inner = lock(&self.shared);
                let full = inner.out.len() >= MAX_SEND_BUFFER;
                let conn_window = inner.conn_send_window;
                let window = inner.slot(id).map_or(0, |s| s.send_window);
                let allowed = window.min(conn_window).max(0) as usize;
                let blocked = !data.is_empty() && (allowed == 0 || full);
                if let Some(end) = pipe_stopped(id, &mut self.done, &mut inner, cx, blocked) {
                    return Poll::Ready(Err(end));
                }
                if blocked {
                    return Poll::Pending;
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
                inner.wake_writer();
                let done = data.is_empty() && *eos;
                let empty = data.is_empty();
                if let Some(s) = inner.slot(id) {
                    s.send_window -= sent;
                    s.send_done |= done;
                }
                if done {
                    inner.update_open(id);
                    self.waiting = None;
                    finish_pipe(id, &mut self.done, &mut inner);
                    return Poll::Ready(Ok(()));
                }
                if empty {
                    self.waiting = None;
                }
                continue;
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => {
                    let mut inner = lock(&self.shared);
                    return match pipe_stopped(id, &mut self.done, &mut inner, cx, false) {
                        Some(end) => Poll::Ready(Err(end)),
                        None => Poll::Pending,
                    };
                }
                Poll::Ready(f) => f,
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = self.body.is_end_stream();
                        if data.is_empty() && !eos {
                            continue;
                        }
                        self.waiting = Some((data, eos));
                    }
                    Err(frame) => {
                        let Ok(trailers) = frame.into_trailers() else {
                            continue;
                        };
                        let mut inner = lock(&self.shared);
                        if let Some(end) = pipe_stopped(id, &mut self.done, &mut inner, cx, false) {
                            return Poll::Ready(Err(end));
                        }
                        let size_update = std::mem::take(&mut inner.size_update_due);
                        let max = inner.peer_max_frame;
                        let start = inner.out.len();
                        put_head(&mut inner.out, 0, HEADERS, 0, id);
                        hpack::encode_trailers(&trailers, size_update, &mut inner.out);
                        end_header_block(&mut inner.out, start, true, max);
                        inner.wake_writer();
                        if let Some(s) = inner.slot(id) {
                            s.send_done = true;
                        }
                        inner.update_open(id);
                        finish_pipe(id, &mut self.done, &mut inner);
                        return Poll::Ready(Ok(()));
                    }
                },
                Some(Err(e)) => {
                    let mut inner = lock(&self.shared);
                    let reason = reset_reason(&e);
                    let failed = Error::reset(reason, false, "request body failed");
                    inner.reset_stream(id, reason, failed);
                    finish_pipe(id, &mut self.done, &mut inner);
                    return Poll::Ready(Err(PipeEnd::Failed(e)));
                }
                None => self.waiting = Some((Bytes::new(), true)),
            }
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if !self.done {
            let mut inner = lock(&self.shared);
            finish_pipe(self.id, &mut self.done, &mut inner);
        }
    }
}

// === Responses ===

/// The response side of a stream: the exchange waiting for the head, then the body. Dropped
/// before the response ended, it cancels the stream (RST_STREAM(CANCEL)).
struct RecvHandle {
    shared: Arc<Shared>,
    id: u32,
}

impl RecvHandle {
    fn poll_head(&self, cx: &Context<'_>) -> Poll<Result<Head, Error>> {
        let mut inner = lock(&self.shared);
        let err = inner.error;
        let Some(s) = inner.slot(self.id) else {
            return Poll::Ready(Err(err.unwrap_or_else(Error::closed)));
        };
        if let Some(head) = s.recv.head.take() {
            return Poll::Ready(Ok(head));
        }
        if let Some(e) = s.recv.error {
            return Poll::Ready(Err(e));
        }
        register(&mut s.recv.task, cx);
        Poll::Pending
    }
}

impl Drop for RecvHandle {
    fn drop(&mut self) {
        let mut inner = lock(&self.shared);
        let Some(s) = inner.slot(self.id) else {
            return;
        };
        s.recv.alive = false;
        s.recv.task = None;
        s.recv.trailers = None;
        s.recv.head = None;
        // What was received but never read goes back to the windows; what still comes is
        // discarded on arrival.
        let unread: usize = s.recv.data.drain(..).map(|d| d.len()).sum();
        let cancel = !s.recv.eos && s.reset.is_none();
        inner.release(self.id, unread);
        if cancel {
            inner.reset_stream(
                self.id,
                Reason::CANCEL,
                Error::reset(Reason::CANCEL, false, "response no longer wanted"),
            );
        }
        inner.maybe_remove(self.id);
    }
}

/// An upstream stream's response body: DATA frames as they arrive, then the trailers. Data is
/// given back to the upstream's windows as it is read, so the download's back-pressure is how
/// fast the downstream side takes it.
pub struct H2Body {
    stream: RecvHandle,
    /// Content-Length minus the data read so far, when the response declared one.
    remaining: Option<u64>,
}

impl fmt::Debug for H2Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Body")
            .field("stream", &self.stream.id)
            .finish()
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let me = &mut *self;
        let id = me.stream.id;
        let mut inner = lock(&me.stream.shared);
        let err = inner.error;
        let Some(s) = inner.slot(id) else {
            return Poll::Ready(Some(Err(Box::new(err.unwrap_or_else(Error::closed)))));
        };
        if let Some(data) = s.recv.data.pop_front() {
            let n = data.len();
            if let Some(r) = &mut me.remaining {
                *r = r.saturating_sub(n as u64);
            }
            inner.release(id, n);
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if s.recv.eos {
            return Poll::Ready(s.recv.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        if let Some(e) = s.recv.error {
            // A reset before END_STREAM leaves the response incomplete, whatever its code (h2
            // and hyper end the body cleanly on NO_ERROR and CANCEL, which would pass a
            // truncated response on as whole); Envoy resets the downstream stream instead.
            return Poll::Ready(Some(Err(Box::new(e))));
        }
        register(&mut s.recv.task, cx);
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let mut inner = lock(&self.stream.shared);
        match inner.slot(self.stream.id) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, ReadBuf};

    /// Lets the other tasks of this (single-threaded) test runtime run until `f` holds.
    async fn until(shared: &Shared, f: impl Fn(&Inner) -> bool) {
        for _ in 0..100_000 {
            if f(&lock(shared)) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("condition not reached");
    }

    fn get() -> Request<ProxyBody> {
        Request::get("http://a/")
            .body(crate::body::empty())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Writes fail once `broken` is set, as on a socket the peer reset.
    struct Breaks {
        io: tokio::io::DuplexStream,
        broken: Arc<AtomicBool>,
    }

    impl AsyncRead for Breaks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Breaks {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.broken.load(Ordering::Acquire) {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            Pin::new(&mut self.io).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// An upstream that answers the preface with HTTP/1.1 and resets the connection: the
    /// GOAWAY for its protocol error cannot be written, and the connection still ends with
    /// that protocol error, not the write's.
    #[tokio::test]
    async fn a_protocol_error_whose_goaway_cannot_go_out_is_still_one() {
        let (client_io, mut server) = tokio::io::duplex(1 << 16);
        let broken = Arc::new(AtomicBool::new(false));
        let io = Breaks {
            io: client_io,
            broken: broken.clone(),
        };
        let (_sender, conn) = handshake(io).await.unwrap_or_else(|e| panic!("{e}"));
        broken.store(true, Ordering::Release);
        server
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), conn)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(r.is_err_and(|e| e.is_protocol_error()));
    }

    /// An upstream that sends garbage and reads nothing more: the GOAWAY Strait answers with
    /// cannot go out, and the connection ends anyway after `CLOSE_FLUSH_TIMEOUT`, with the
    /// protocol error.
    #[tokio::test(start_paused = true)]
    async fn an_ending_connection_does_not_wait_forever_for_its_goaway_to_go_out() {
        // Room for the preface and SETTINGS (70 bytes), not for the GOAWAY after them.
        let (client_io, mut server) = tokio::io::duplex(75);
        let (_sender, conn) = handshake(client_io).await.unwrap_or_else(|e| panic!("{e}"));
        server
            .write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let r = tokio::time::timeout(std::time::Duration::from_secs(30), conn)
            .await
            .unwrap_or_else(|_| panic!("still waiting for the GOAWAY to go out"));
        assert!(r.is_err_and(|e| e.is_protocol_error()));
        drop(server);
    }

    /// Requests abandoned while they wait for a stream under the upstream's
    /// SETTINGS_MAX_CONCURRENT_STREAMS take their wakers back, rather than leaving them (and the
    /// tasks they keep alive) until a stream closes, which a long-lived stream never does.
    #[tokio::test]
    async fn abandoned_waiters_are_not_kept() {
        let (client_io, mut server) = tokio::io::duplex(1 << 20);
        let (sender, conn) = handshake(client_io).await.unwrap_or_else(|e| panic!("{e}"));
        let shared = sender.shared.clone();
        tokio::spawn(conn);
        let mut s = BytesMut::new();
        put_head(&mut s, 6, SETTINGS, 0, 0);
        s.put_u16(3); // SETTINGS_MAX_CONCURRENT_STREAMS
        s.put_u32(1);
        server.write_all(&s).await.unwrap_or_else(|e| panic!("{e}"));
        until(&shared, |i| i.peer_max_streams == 1).await;
        let _first = tokio::spawn(send(sender.clone(), get()));
        until(&shared, |i| i.open == 1).await;
        for n in 1..=1000 {
            let t = tokio::spawn(send(sender.clone(), get()));
            until(&shared, |i| !i.waiters.is_empty()).await;
            t.abort();
            assert!(
                t.await.is_err_and(|e| e.is_cancelled()),
                "request {n} did not wait"
            );
        }
        let n = lock(&shared).waiters.len();
        assert_eq!(n, 0, "wakers of abandoned requests kept");
        drop(server);
    }

    /// Two responses nobody reads yet hold 4 MiB of the 5 MiB connection window; a third
    /// stream's 1 MiB is read in full. Consumed bytes go back once they reach half the window
    /// the upstream still has (h2's rule); with a fixed half of the whole window the connection
    /// window stayed at 0 and every stream on the connection stalled.
    #[tokio::test]
    async fn consumed_data_goes_back_when_the_connection_window_is_exhausted() {
        let (client_io, mut server) = tokio::io::duplex(16 << 20);
        let (sender, conn) = handshake(client_io).await.unwrap_or_else(|e| panic!("{e}"));
        let shared = sender.shared.clone();
        tokio::spawn(conn);
        let mut b = BytesMut::new();
        put_head(&mut b, 0, SETTINGS, 0, 0);
        server.write_all(&b).await.unwrap_or_else(|e| panic!("{e}"));
        let mut calls = Vec::new();
        for k in 1..=3 {
            calls.push(tokio::spawn(send(sender.clone(), get())));
            until(&shared, |i| i.open == k).await;
        }
        let mut b = BytesMut::new();
        for (id, len) in [(1u32, 2usize << 20), (3, 2 << 20), (5, 1 << 20)] {
            put_head(&mut b, 1, HEADERS, END_HEADERS, id);
            b.put_u8(0x88); // :status 200
            for _ in 0..len / 16384 {
                put_head(&mut b, 16384, DATA, 0, id);
                b.put_bytes(b'x', 16384);
            }
        }
        server.write_all(&b).await.unwrap_or_else(|e| panic!("{e}"));
        let mut resps = Vec::new();
        for c in calls {
            let r = c.await.unwrap_or_else(|e| panic!("{e}"));
            resps.push(r.unwrap_or_else(|e| panic!("{e}")));
        }
        let mut body5 = resps
            .pop()
            .unwrap_or_else(|| panic!("three calls"))
            .into_body();
        let mut got = 0;
        while got < 1 << 20 {
            let f = body5.frame().await;
            let f = f.unwrap_or_else(|| panic!("stream 5 ended after {got} bytes"));
            let f = f.unwrap_or_else(|e| panic!("stream 5 after {got} bytes: {e}"));
            got += f.into_data().map_or(0, |d| d.len());
        }
        let (window, unreleased) = {
            let i = lock(&shared);
            (i.conn_recv_window, i.conn_unreleased)
        };
        assert!(
            window > 0,
            "connection window 0 with {unreleased} consumed bytes not given back"
        );
        drop(resps);
    }
}
