//! One downstream connection: picks the codec (HTTP/1.1, or HTTP/2 with prior knowledge when the
//! client sends the h2 preface), serves it, counts bytes and connection stats, drains it
//! gracefully (Connection: close / GOAWAY) when the server shuts down, and ends an HTTP/1
//! connection whose client stopped reading at the stream idle or route timeout.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use strait_xds::model::CodecType;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::body::Inbound;
use crate::cluster::ClusterInfo;
use crate::forward::{self, ConnCtx};
use crate::stats::HttpStats;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The first read of a connection (`sniff`).
const SNIFF_READ: usize = 4096;
/// Envoy's default `http2_protocol_options.max_concurrent_streams`.
const H2_MAX_CONCURRENT_STREAMS: u32 = 2_147_483_647;
/// Vectored writes up to this size are copied together and go out as one `send`.
const SMALL_WRITE: usize = 4096;

thread_local! {
    /// Where small vectored writes are joined: one per thread, so no connection keeps one.
    static SMALL_WRITE_BUF: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(SMALL_WRITE));
}
/// hyper's smallest allowed HTTP/1 read buffer.
const MIN_H1_BUF: usize = 8192;

// === CountingIo ===

/// Which stats a connection's bytes count towards.
#[derive(Debug, Clone)]
pub enum Counted {
    Downstream(Arc<HttpStats>),
    Upstream(Arc<ClusterInfo>),
}

impl Counted {
    #[inline]
    fn rx(&self, n: usize) {
        match self {
            Counted::Downstream(s) => s.downstream_cx_rx_bytes_total.add(n as u64),
            Counted::Upstream(c) => c.stats.upstream_cx_rx_bytes_total.add(n as u64),
        }
    }
    #[inline]
    fn tx(&self, n: usize) {
        match self {
            Counted::Downstream(s) => s.downstream_cx_tx_bytes_total.add(n as u64),
            Counted::Upstream(c) => c.stats.upstream_cx_tx_bytes_total.add(n as u64),
        }
    }
}

/// A TCP stream that counts bytes and can replay bytes already read (the sniffed preface).
#[derive(Debug)]
pub struct CountingIo {
    inner: TcpStream,
    counted: Counted,
    prefix: Bytes,
    stall: Option<Box<StallGuard>>,
    /// What is written from now on is the last of the connection's output: see
    /// [`CountingIo::last_writes`].
    last: bool,
}

impl CountingIo {
    pub fn new(inner: TcpStream, counted: Counted) -> CountingIo {
        CountingIo {
            inner,
            counted,
            prefix: Bytes::new(),
            stall: None,
            last: false,
        }
    }

    /// The connection closes once what is written from now on is: the writes go with
    /// `MSG_MORE`, so that the kernel holds their last segment for the FIN the close adds to
    /// it (one segment and one wake-up fewer at the peer per short connection). Only for
    /// output that is complete, the close following at once: held data leaves with the FIN.
    pub(crate) fn last_writes(&mut self) {
        self.last = true;
    }

    /// One `send` of `buf` with `MSG_MORE` (see [`CountingIo::last_writes`]).
    fn poll_send_more(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.inner.poll_write_ready(cx))?;
            let sent = self.inner.try_io(tokio::io::Interest::WRITABLE, || {
                socket2::SockRef::from(&self.inner)
                    .send_with_flags(buf, libc::MSG_MORE | libc::MSG_NOSIGNAL)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    /// Writes that make no progress for the current stream's idle timeout, or by its route
    /// deadline, fail (see [`WriteStall`]).
    fn guard_writes(&mut self, cx: Arc<ConnCtx>) {
        self.stall = Some(Box::new(StallGuard {
            cx,
            sleep: None,
            sleep_at: None,
            armed: false,
            idle_deadline: None,
        }));
    }

    /// After a write: progress disarms the stall timer; a write that cannot go arms it, and
    /// fails once it expired.
    #[inline]
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        r: &Poll<io::Result<usize>>,
    ) -> Option<io::Error> {
        let guard = self.stall.as_deref_mut()?;
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => {
                guard.armed = false;
                None
            }
            Poll::Pending => guard.poll_stalled(cx),
            Poll::Ready(_) => None,
        }
    }

    /// Writes `head[*wpos..]`, then `data`, then `post` (a message head, a body chunk, its
    /// framing), in as few vectored writes as the socket takes, advancing all three.
    pub(crate) fn poll_write_parts(
        &mut self,
        cx: &mut Context<'_>,
        head: &[u8],
        wpos: &mut usize,
        data: &mut Bytes,
        post: &mut &'static [u8],
    ) -> Poll<io::Result<()>> {
        loop {
            let rest = &head[*wpos..];
            if rest.is_empty() && data.is_empty() && post.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let bufs = [IoSlice::new(rest), IoSlice::new(data), IoSlice::new(post)];
            let mut n = ready!(Pin::new(&mut *self).poll_write_vectored(cx, &bufs))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let h = rest.len().min(n);
            *wpos += h;
            n -= h;
            let d = data.len().min(n);
            data.advance(d);
            n -= d;
            *post = &post[n.min(post.len())..];
        }
    }

    /// Puts bytes already read back in front of what the socket has yet to give.
    pub(crate) fn unread(&mut self, bytes: Bytes) {
        if self.prefix.is_empty() {
            self.prefix = bytes;
        } else if !bytes.is_empty() {
            let mut all = BytesMut::with_capacity(bytes.len() + self.prefix.len());
            all.extend_from_slice(&bytes);
            all.extend_from_slice(&self.prefix);
            self.prefix = all.freeze();
        }
    }

    /// The socket, for readiness checks on an idle connection.
    pub fn tcp(&self) -> &TcpStream {
        &self.inner
    }
}

impl AsyncRead for CountingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                // An emptied `Bytes` still holds its buffer (the 4 KiB sniff read) alive.
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = buf.filled().len() - before;
            self.counted.rx(n);
            // Bytes in from the client are stream activity too (Envoy's idle timer counts both
            // ways): a client still uploading is not stalled because it does not read yet.
            if let (Some(guard), true) = (self.stall.as_deref_mut(), n > 0) {
                guard.armed = false;
            }
        }
        r
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.counted.tx(n);
        }
        match self.after_write(cx, &r) {
            Some(e) => Poll::Ready(Err(e)),
            None => r,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let (total, parts) = bufs.iter().fold((0, 0), |(t, p), b| {
            (t + b.len(), p + usize::from(!b.is_empty()))
        });
        let r = if parts == 1 {
            let one = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            if self.last {
                self.poll_send_more(cx, one)
            } else {
                Pin::new(&mut self.inner).poll_write(cx, one)
            }
        } else if total <= SMALL_WRITE {
            // One `send` costs the kernel 0.2-0.4 µs less than a `writev` of the same bytes
            // (BENCHMARKS.md, "Small vectored writes"); below 4 KiB copying is cheaper still.
            let this = &mut *self;
            SMALL_WRITE_BUF
                .try_with(|buf| {
                    let mut one = buf.borrow_mut();
                    one.clear();
                    for b in bufs {
                        one.extend_from_slice(b);
                    }
                    if this.last {
                        this.poll_send_more(cx, &one)
                    } else {
                        Pin::new(&mut this.inner).poll_write(cx, &one)
                    }
                })
                // The thread is exiting and its buffer is gone: write the slices as they are.
                .unwrap_or_else(|_| Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))
        } else {
            Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        };
        if let Poll::Ready(Ok(n)) = r {
            self.counted.tx(n);
        }
        match self.after_write(cx, &r) {
            Some(e) => Poll::Ready(Err(e)),
            None => r,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// === Write stalls ===

/// A downstream HTTP/1 connection's write-stall watch. hyper's HTTP/1 server stops polling the
/// response body while the socket is full, so the body's own timers cannot fire for a client
/// that stopped reading; Envoy's do: the stream idle timeout (no data moved for that long, `SI`)
/// and the route timeout (the upstream response not complete in time, `UT`, the upstream held
/// back by the stalled client). Either resets the stream, over HTTP/1 closes the connection. The
/// request path records the stream's idle timeout and route deadline here; the connection's
/// writes fail once they made no progress for the idle timeout (bytes read from the client count
/// as progress too) or reach the deadline, and the stream's record then says `SI` or `UT`
/// rather than `DC`.
#[derive(Debug, Default)]
pub struct WriteStall {
    /// The in-flight stream's idle timeout in milliseconds; 0: none.
    timeout_ms: AtomicU64,
    /// The in-flight stream's route deadline, milliseconds after [`stall_base`] plus one; 0: none.
    route_deadline: AtomicU64,
    /// What ended the connection's writes: [`STALL_IDLE`] or [`STALL_ROUTE`]; 0: nothing.
    fired: AtomicU8,
}

const STALL_IDLE: u8 = 1;
const STALL_ROUTE: u8 = 2;

/// Why the connection's writes failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stalled {
    /// The stream idle timeout.
    Idle,
    /// The route timeout.
    Route,
}

/// The origin of the route deadlines kept as integers.
fn stall_base() -> std::time::Instant {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(std::time::Instant::now)
}

impl WriteStall {
    /// A new stream: its idle timeout, and no route deadline yet.
    pub fn set(&self, timeout: Option<Duration>) {
        let ms = timeout.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.timeout_ms.store(ms, Ordering::Relaxed);
        self.route_deadline.store(0, Ordering::Relaxed);
    }

    /// The stream's route deadline (the end of the request plus the route timeout), or none
    /// once its response is complete.
    pub fn set_route_deadline(&self, deadline: Option<std::time::Instant>) {
        let v = deadline.map_or(0, |d| {
            let ms = d.saturating_duration_since(stall_base()).as_millis();
            u64::try_from(ms).unwrap_or(u64::MAX - 1) + 1
        });
        self.route_deadline.store(v, Ordering::Relaxed);
    }

    fn route_deadline(&self) -> Option<tokio::time::Instant> {
        match self.route_deadline.load(Ordering::Relaxed) {
            0 => None,
            v => Some((stall_base() + Duration::from_millis(v - 1)).into()),
        }
    }

    /// Whether, and why, the connection's writes failed for a stall.
    pub fn fired(&self) -> Option<Stalled> {
        match self.fired.load(Ordering::Relaxed) {
            STALL_IDLE => Some(Stalled::Idle),
            STALL_ROUTE => Some(Stalled::Route),
            _ => None,
        }
    }
}

struct StallGuard {
    cx: Arc<ConnCtx>,
    /// Created at the first write that cannot go, then reused.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// What the sleep is set to.
    sleep_at: Option<tokio::time::Instant>,
    /// The idle deadline runs from the first write that could not go since the last progress.
    armed: bool,
    idle_deadline: Option<tokio::time::Instant>,
}

impl std::fmt::Debug for StallGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StallGuard")
            .field("armed", &self.armed)
            .finish_non_exhaustive()
    }
}

impl StallGuard {
    #[cold]
    fn poll_stalled(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let ws = &self.cx.write_stall;
        let ms = ws.timeout_ms.load(Ordering::Relaxed);
        let route = ws.route_deadline();
        if !self.armed {
            self.idle_deadline =
                (ms > 0).then(|| tokio::time::Instant::now() + Duration::from_millis(ms));
            self.armed = true;
        }
        loop {
            let target = match (self.idle_deadline, route) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b)?,
            };
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(target)));
            if self.sleep_at != Some(target) {
                sleep.as_mut().reset(target);
                self.sleep_at = Some(target);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return None;
            }
            let now = tokio::time::Instant::now();
            let (why, what) = if route.is_some_and(|r| now >= r) {
                (STALL_ROUTE, "route timeout")
            } else if self.idle_deadline.is_some_and(|d| now >= d) {
                (STALL_IDLE, "stream idle timeout")
            } else {
                // Fired for a deadline since moved: sleep again.
                self.sleep_at = None;
                continue;
            };
            ws.fired.store(why, Ordering::Relaxed);
            tracing::debug!("downstream stopped reading: {what}");
            return Some(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no write progress before the {what}"),
            ));
        }
    }
}

// === Serving ===

/// Reads until the bytes either are or cannot be the HTTP/2 preface. Returns what was read and
/// whether it is the preface.
async fn sniff(stream: &mut TcpStream) -> io::Result<(Bytes, bool)> {
    // Room for a whole first request: reading only the preface's 24 bytes left the rest of an
    // HTTP/1.1 request for a second `recv` (one syscall in six of a short connection).
    let mut buf = BytesMut::with_capacity(SNIFF_READ);
    while buf.len() < H2_PREFACE.len() {
        let n = stream.read_buf(&mut buf).await?;
        if n == 0 || !H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
            let is_h2 = false;
            return Ok((buf.freeze(), is_h2));
        }
    }
    let is_h2 = buf.starts_with(H2_PREFACE);
    Ok((buf.freeze(), is_h2))
}

/// Drives a hyper server connection (HTTP/1.1 or HTTP/2: their types differ but both have
/// `graceful_shutdown`) until it ends; once its listener drains, closes it gracefully after
/// [`gradual_drain_delay`] and gives in-flight requests until the drain deadline.
macro_rules! serve_until_drained {
    ($conn:ident, $cx:ident, $hs:ident, $drain:ident, $drain_time:ident) => {
        tokio::pin!($conn);
        match until_drained($conn.as_mut(), $drain.as_mut()).await {
            Some(r) => log_conn_end(&$hs, r.err()),
            None => {
                let started = tokio::time::Instant::now();
                let delay = gradual_drain_delay(&$cx.server, $drain_time);
                let mut server_drain = $cx.server.drain_rx();
                let finished = tokio::select! {
                    r = $conn.as_mut() => { log_conn_end(&$hs, r.err()); true }
                    _ = tokio::time::sleep(delay) => false,
                    _ = crate::server::drained(&mut server_drain) => false,
                };
                if !finished {
                    $hs.downstream_cx_drain_close.inc();
                    $conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        r = $conn.as_mut() => log_conn_end(&$hs, r.err()),
                        _ = tokio::time::sleep($drain_time.saturating_sub(started.elapsed())) => {}
                    }
                }
            }
        }
    };
}

/// Wakes a task on behalf of a secondary future (a drain signal, an idle timer) and remembers
/// that it did, so that future is polled only after its own wake-up, not on every wake-up of the
/// task (several per request; polling a pending `watch` wait or `Sleep` is not free).
struct SideWake {
    fired: AtomicBool,
    task: Arc<SideTask>,
}

/// The task a side wakes; shared by sides made with [`Side::sibling`], so that a task polling
/// several registers its waker once, not once per side.
struct SideTask {
    /// The task is being polled and looks at `fired` before it returns (see [`Side::enter`]).
    polling: AtomicBool,
    task: AtomicWaker,
}

impl Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // SeqCst pairs with `Side::leave`: either the poller sees `fired`, or this sees it left.
        self.fired.store(true, Ordering::SeqCst);
        if !self.task.polling.load(Ordering::SeqCst) {
            self.task.task.wake();
        }
    }
}

/// The task side of a [`SideWake`].
pub(crate) struct Side {
    wake: Arc<SideWake>,
    waker: Waker,
}

impl Side {
    /// Starts fired: the secondary future must be polled once to register.
    pub(crate) fn new() -> Side {
        Side::with_task(Arc::new(SideTask {
            polling: AtomicBool::new(false),
            task: AtomicWaker::new(),
        }))
    }

    /// Another side of the same task: [`Self::enter`] and [`Self::leave`] on this one (or on
    /// `self`) speak for both, so a task with several sides registers its waker once a poll.
    /// Starts fired, as [`Self::new`].
    pub(crate) fn sibling(&self) -> Side {
        Side::with_task(self.wake.task.clone())
    }

    fn with_task(task: Arc<SideTask>) -> Side {
        let wake = Arc::new(SideWake {
            fired: AtomicBool::new(true),
            task,
        });
        let waker = Waker::from(wake.clone());
        Side { wake, waker }
    }

    /// Polls `fut` if it woke (or was never polled) since its last poll, else reports pending.
    pub(crate) fn poll<F: Future + ?Sized>(
        &self,
        fut: Pin<&mut F>,
        cx: &mut Context<'_>,
    ) -> Poll<F::Output> {
        // Register before reading the flag: a wake in between still reaches this task.
        self.wake.task.task.register(cx.waker());
        if !self.wake.fired.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        fut.poll(&mut Context::from_waker(&self.waker))
    }

    /// Has a wake of the side wake the task polled with `cx`, for callers that poll the side
    /// by hand ([`Self::take`], [`Self::context`]).
    pub(crate) fn register(&self, cx: &Context<'_>) {
        self.wake.task.task.register(cx.waker());
    }

    /// The side's waker, for wakes from outside the task's poll.
    pub(crate) fn waker(&self) -> &Waker {
        &self.waker
    }

    /// Makes the next [`Self::poll`] poll the future (after it was reset, for instance).
    pub(crate) fn rearm(&self) {
        self.wake.fired.store(true, Ordering::Release);
    }

    /// For a task that polls several sides in a loop until none fired: from here to
    /// [`Self::leave`] a wake only sets the flag, so what the loop itself causes (a stream
    /// queueing a frame wakes the connection) does not make the runtime poll the task again.
    pub(crate) fn enter(&self, cx: &Context<'_>) {
        self.wake.task.task.register(cx.waker());
        self.wake.task.polling.store(true, Ordering::SeqCst);
    }

    /// Clears the flag and says whether the side fired since its last poll.
    pub(crate) fn take(&self) -> bool {
        self.wake.fired.swap(false, Ordering::AcqRel)
    }

    pub(crate) fn fired(&self) -> bool {
        self.wake.fired.load(Ordering::Acquire)
    }

    /// The context to poll the side's future with.
    pub(crate) fn context(&self) -> Context<'_> {
        Context::from_waker(&self.waker)
    }

    /// Ends [`Self::enter`] (for its siblings too). True when the side fired and nobody will
    /// poll it: the caller must wake its task; each sibling says the same with
    /// [`Self::left_fired`].
    pub(crate) fn leave(&self) -> bool {
        self.wake.task.polling.store(false, Ordering::SeqCst);
        self.wake.fired.load(Ordering::SeqCst)
    }

    /// After a sibling's [`Self::leave`]: this side fired and nobody will poll it. SeqCst, as
    /// `leave`, so that either this sees a wake's flag or the wake sees the task left.
    pub(crate) fn left_fired(&self) -> bool {
        self.wake.fired.load(Ordering::SeqCst)
    }
}

/// Drives `conn` until it ends (`Some`) or `drained` resolves first (`None`).
async fn until_drained<C: Future>(
    mut conn: Pin<&mut C>,
    drained: impl Future<Output = ()>,
) -> Option<C::Output> {
    let mut drained = std::pin::pin!(drained);
    let side = Side::new();
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if side.poll(drained.as_mut(), cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// Serves one accepted connection until it closes, or until the drain deadline after shutdown.
pub async fn serve(mut stream: TcpStream, cx: Arc<ConnCtx>) {
    // Only the settings: holding the manager would pin its filter chain after a reload.
    let (codec_type, max_request_headers_kb, request_headers_timeout) = {
        let hcm = cx.listener.hcm();
        (
            hcm.codec_type,
            hcm.max_request_headers_kb,
            hcm.request_headers_timeout,
        )
    };
    let hs = cx.listener.http_stats.clone();
    let mut drain = cx.listener.drain_rx();
    // One wait for the sniff and the connection: each new one registers with the watch.
    let drained = crate::server::drained(&mut drain);
    tokio::pin!(drained);

    let (prefix, is_h2) = match codec_type {
        CodecType::Http1 => (Bytes::new(), false),
        CodecType::Http2 => (Bytes::new(), true),
        CodecType::Auto => {
            tokio::select! {
                r = sniff(&mut stream) => match r {
                    Ok(x) => x,
                    Err(_) => return,
                },
                _ = drained.as_mut() => return,
            }
        }
    };
    hs.downstream_cx_total.inc();
    hs.downstream_cx_active.inc();
    if is_h2 {
        hs.downstream_cx_http2_total.inc();
        hs.downstream_cx_http2_active.inc();
    } else {
        hs.downstream_cx_http1_total.inc();
        hs.downstream_cx_http1_active.inc();
    }
    // The sniff read from the socket itself, past the counting wrapper.
    hs.downstream_cx_rx_bytes_total.add(prefix.len() as u64);
    let mut io = CountingIo::new(stream, Counted::Downstream(hs.clone()));
    io.prefix = prefix;
    if !is_h2 {
        io.guard_writes(cx.clone());
    }
    let svc_cx = cx.clone();
    let drain_time = cx.server.drain_time();
    let max_buf = MIN_H1_BUF.max(max_request_headers_kb as usize * 1024);

    if is_h2 {
        let settings = crate::h2server::Settings {
            max_concurrent_streams: H2_MAX_CONCURRENT_STREAMS,
            max_header_list_size: max_request_headers_kb.saturating_mul(1024),
        };
        // Boxed: the ~3 KB request future then moves into its stream's task as a pointer; inline
        // it was copied whole twice on the way (-130 instructions per request net of the box),
        // and built in its box it is not copied at all (-305 more). hyper's HTTP/1 server keeps
        // the future inline in a box of its own: boxing it there too costs more than the copy.
        let svc = move |req| Box::into_pin(crate::boxed(|| forward::handle(req, svc_cx.clone())));
        let conn = crate::h2server::Server::new(io, settings, svc);
        serve_until_drained!(conn, cx, hs, drained, drain_time);
        hs.downstream_cx_http2_active.dec();
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            // hyper would otherwise default to 30 s; Envoy has no header timeout unless set.
            .header_read_timeout(request_headers_timeout)
            .max_buf_size(max_buf);
        let hyper_cx = svc_cx.clone();
        let hyper_conn = move |io: CountingIo| {
            let svc = service_fn(move |req: Request<Incoming>| {
                forward::handle(req.map(Inbound::H1), hyper_cx.clone())
            });
            b.serve_connection(TokioIo::new(io), svc).with_upgrades()
        };
        if request_headers_timeout.is_some() {
            // The fast path has no header timer: hyper serves such connections whole.
            let conn = hyper_conn(io);
            serve_until_drained!(conn, cx, hs, drained, drain_time);
        } else {
            // Boxed in place, as on HTTP/2: the ~3 KB request future moves as a pointer.
            let svc = move |req, seen| {
                Box::into_pin(crate::boxed(|| {
                    forward::handle_seen(req, seen, svc_cx.clone(), true)
                }))
            };
            let conn = crate::h1server::Server::new(io, max_buf, svc, hyper_conn);
            serve_until_drained!(conn, cx, hs, drained, drain_time);
        }
        hs.downstream_cx_http1_active.dec();
    }
    hs.downstream_cx_active.dec();
    hs.downstream_cx_destroy.inc();
}

/// When only this listener drains (removed or replaced by LDS while the server keeps running),
/// each connection gets its `Connection: close` / GOAWAY at a uniformly random point of the drain
/// window, so clients reconnect spread over it rather than all at once (the reconnect storm of
/// envoyproxy/envoy#35085). On server shutdown every connection is told at once: the process is
/// going away and the drain time is the deadline for in-flight requests.
fn gradual_drain_delay(server: &crate::server::ServerShared, drain_time: Duration) -> Duration {
    if *server.drain_rx().borrow() {
        Duration::ZERO
    } else {
        drain_time.mul_f64(fastrand::f64())
    }
}

/// How a downstream connection's error reads: hyper's (HTTP/1.1) or h2's.
trait ConnError: std::fmt::Display {
    /// The client broke the protocol (Envoy's `downstream_cx_protocol_error`).
    fn is_protocol_error(&self) -> bool;
}

impl ConnError for hyper::Error {
    fn is_protocol_error(&self) -> bool {
        self.is_parse() || self.is_parse_too_large()
    }
}

impl ConnError for crate::h1server::Error {
    fn is_protocol_error(&self) -> bool {
        matches!(self, crate::h1server::Error::Fallback(e) if e.is_protocol_error())
    }
}

impl ConnError for crate::h2server::Error {
    fn is_protocol_error(&self) -> bool {
        // A GOAWAY Strait sent because of what the client did; I/O errors are not.
        crate::h2server::Error::is_protocol_error(self)
    }
}

fn log_conn_end(hs: &HttpStats, err: Option<impl ConnError>) {
    if let Some(e) = err {
        if e.is_protocol_error() {
            hs.downstream_cx_protocol_error.inc();
        }
        tracing::debug!(error = %e, "downstream connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small vectored writes are joined into one `send`; larger ones stay vectored. Either way
    /// the peer reads the slices in order, and the bytes are counted once.
    #[tokio::test]
    async fn vectored_writes_small_and_large_arrive_in_order() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let stats = crate::stats::Store::new().http("t");
        let mut io = CountingIo::new(client.unwrap(), Counted::Downstream(stats.clone()));
        let (mut peer, _) = accepted.unwrap();
        let big = vec![b'b'; 3 * SMALL_WRITE];
        let mut want = Vec::new();
        for parts in [
            vec![&b"head "[..], &b""[..], &b"body"[..]],
            vec![&b""[..], &b"only"[..], &b""[..]],
            vec![&b"x"[..], &big[..], &b"y"[..]],
        ] {
            let mut slices: Vec<io::IoSlice<'_>> =
                parts.iter().map(|p| io::IoSlice::new(p)).collect();
            let mut left: &mut [io::IoSlice<'_>] = &mut slices;
            while !left.is_empty() {
                let n = io.write_vectored(left).await.unwrap();
                io::IoSlice::advance_slices(&mut left, n);
            }
            want.extend(parts.concat());
        }
        io.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, want);
        assert_eq!(stats.downstream_cx_tx_bytes_total.get(), want.len() as u64);
    }

    #[tokio::test]
    async fn until_drained_sees_a_drain_while_the_connection_waits() {
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let conn = std::pin::pin!(std::future::pending::<()>());
            until_drained(conn, crate::server::drained(&mut rx)).await
        });
        tokio::task::yield_now().await;
        tx.send_replace(true);
        assert_eq!(task.await.ok(), Some(None));
    }

    #[tokio::test]
    async fn until_drained_returns_the_connection_result() {
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<u8>();
        let task = tokio::spawn(async move {
            let conn = std::pin::pin!(async { done_rx.await.unwrap_or(0) });
            until_drained(conn, crate::server::drained(&mut rx)).await
        });
        tokio::task::yield_now().await;
        let _ = done_tx.send(7);
        assert_eq!(task.await.ok(), Some(Some(7)));
        drop(tx);
    }
}
