//! Body plumbing for the data path: the boxed body type every response uses, and the request
//! body sent upstream, which streams with back-pressure and keeps a bounded copy so that a retry
//! can replay it (Envoy's retry buffer). Never holds more than the buffer limit per request.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use strait_filters::{BodyFlow, FilterChain, FilterContext, LocalReply};
use tokio::sync::Notify;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A process-wide monotonic origin, so instants fit in an `AtomicU64` as milliseconds.
pub fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Milliseconds since [`base`].
pub fn now_ms() -> u64 {
    base().elapsed().as_millis() as u64
}

/// The last time a stream saw activity in either direction (for stream idle timeouts).
#[derive(Debug)]
pub struct Activity {
    /// The stream's start: its last activity until the first touch.
    start: Instant,
    /// One more than the milliseconds since [`base`] of the last touch; 0 before the first.
    /// The start stays an `Instant` so that a stream touched never (a response in one frame)
    /// never converts it.
    touched: AtomicU64,
}

impl Activity {
    /// Last active at `t`.
    fn at(t: Instant) -> Activity {
        Activity {
            start: t,
            touched: AtomicU64::new(0),
        }
    }

    #[inline]
    pub fn touch(&self) {
        self.touched.store(now_ms() + 1, Ordering::Relaxed);
    }

    /// When the stream becomes idle for `idle`, given no further activity.
    pub fn deadline(&self, idle: Duration) -> Instant {
        match self.touched.load(Ordering::Relaxed) {
            0 => self.start + idle,
            ms => base() + Duration::from_millis(ms - 1) + idle,
        }
    }

    /// Resolves once the stream has seen no activity for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = self.deadline(idle);
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// The body of every response the proxy sends and every request it forwards.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> ProxyBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// Set once the whole downstream request has been received; the route timeout starts then.
/// One waiter (the stream's timer) is woken when it is set.
#[derive(Debug, Default)]
pub struct EndSignal {
    /// The end of a request that had ended when its stream began (no body): a plain field,
    /// as setting a `OnceLock` costs ~160 instructions.
    at_start: Option<Instant>,
    when: OnceLock<Instant>,
    waker: AtomicWaker,
}

impl EndSignal {
    /// A request whose end is its stream's start, `t`.
    fn ended(t: Instant) -> EndSignal {
        EndSignal {
            at_start: Some(t),
            ..EndSignal::default()
        }
    }

    pub fn set(&self) {
        self.set_at(Instant::now());
    }

    fn set_at(&self, t: Instant) {
        if self.at_start.is_none() && self.when.set(t).is_ok() {
            self.waker.wake();
        }
    }

    /// When the request ended, if it has.
    pub fn when(&self) -> Option<Instant> {
        self.at_start.or_else(|| self.when.get().copied())
    }

    pub fn is_set(&self) -> bool {
        self.when().is_some()
    }

    /// When the request ended; otherwise wakes `cx` once it does.
    pub fn poll_when(&self, cx: &mut Context<'_>) -> Poll<Instant> {
        if let Some(t) = self.when() {
            return Poll::Ready(t);
        }
        self.waker.register(cx.waker());
        match self.when() {
            Some(t) => Poll::Ready(t),
            None => Poll::Pending,
        }
    }
}

#[derive(Debug)]
struct Shared {
    src: Downstream,
    /// Data frames received so far, while they fit in the retry buffer.
    chunks: Vec<Bytes>,
    buffered: usize,
    limit: usize,
    /// The body outgrew the buffer (or retries are off): it cannot be replayed.
    overflow: bool,
    eos: bool,
    failed: bool,
    trailers: Option<HeaderMap>,
    /// Only the newest attempt may read the downstream body.
    current: u32,
    bytes_received: u64,
    exact_len: Option<u64>,
}

/// What the attempts of one request share, in one allocation: the body state, its end, and
/// the stream's activity clock.
#[derive(Debug)]
struct SourceInner {
    shared: Mutex<Shared>,
    end: EndSignal,
    activity: Activity,
}

impl SourceInner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // Only this request's attempts take the lock, one frame at a time; a poisoned lock
        // means a panic elsewhere already failed the request, the state is still consistent.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The downstream request body, shared by the upstream attempts of one request.
#[derive(Debug, Clone)]
pub struct RequestSource {
    inner: Arc<SourceInner>,
}

impl RequestSource {
    /// `retry_buffer` is the replay limit in bytes (0 when the request will not be retried).
    pub fn new(src: impl Into<Downstream>, retry_buffer: usize) -> RequestSource {
        RequestSource::new_at(src, retry_buffer, Instant::now())
    }

    /// [`Self::new`] for a stream that started at `start` (its first activity, and its end
    /// when the request has no body): saves reading the clock again.
    pub fn new_at(
        src: impl Into<Downstream>,
        retry_buffer: usize,
        start: Instant,
    ) -> RequestSource {
        let src = src.into();
        let eos = src.is_end_stream();
        let end = if eos {
            EndSignal::ended(start)
        } else {
            EndSignal::default()
        };
        let exact_len = src.size_hint().exact();
        RequestSource {
            inner: Arc::new(SourceInner {
                shared: Mutex::new(Shared {
                    src,
                    chunks: Vec::new(),
                    buffered: 0,
                    limit: retry_buffer,
                    overflow: retry_buffer == 0,
                    eos,
                    failed: false,
                    trailers: None,
                    current: 0,
                    bytes_received: 0,
                    exact_len,
                }),
                end,
                activity: Activity::at(start),
            }),
        }
    }

    /// Set once the whole request has been received.
    pub fn end(&self) -> &EndSignal {
        &self.inner.end
    }

    /// The stream's activity clock (request and response frames touch it).
    pub fn activity(&self) -> &Activity {
        &self.inner.activity
    }

    pub fn bytes_received(&self) -> u64 {
        self.inner.lock().bytes_received
    }

    /// Whether a further attempt could resend the whole body.
    pub fn can_replay(&self) -> bool {
        let s = self.inner.lock();
        !s.failed && !(s.overflow && (s.bytes_received > 0 || !s.eos))
    }

    /// The body for the next attempt, or `None` when what was already sent cannot be replayed.
    pub fn attempt(&self) -> Option<AttemptBody> {
        let mut s = self.inner.lock();
        let first = s.current == 0;
        if !first && (s.failed || (s.overflow && (s.bytes_received > 0 || !s.eos))) {
            return None;
        }
        s.current += 1;
        Some(AttemptBody {
            inner: self.inner.clone(),
            id: s.current,
            pos: 0,
            trailers_sent: false,
            fresh: true,
        })
    }
}

/// One attempt's view of the request body: replays the buffered frames, then reads on from
/// downstream (and keeps buffering while the limit allows).
#[derive(Debug)]
pub struct AttemptBody {
    inner: Arc<SourceInner>,
    id: u32,
    pos: usize,
    trailers_sent: bool,
    fresh: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("superseded by a retry")]
    Superseded,
    #[error("downstream request body failed: {0}")]
    Downstream(BoxError),
    #[error("downstream request body failed earlier")]
    Failed,
}

impl Body for AttemptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        this.fresh = false;
        let inner = &*this.inner;
        let mut s = inner.lock();
        if s.current != this.id {
            return Poll::Ready(Some(Err(RequestBodyError::Superseded.into())));
        }
        if !s.overflow && this.pos < s.chunks.len() {
            let c = s.chunks[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(c))));
        }
        if s.failed {
            return Poll::Ready(Some(Err(RequestBodyError::Failed.into())));
        }
        if s.eos {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = s.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut s.src).poll_frame(cx);
        if polled.is_ready() {
            inner.activity.touch();
        }
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.eos = true;
                inner.end.set();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.failed = true;
                Poll::Ready(Some(Err(RequestBodyError::Downstream(e).into())))
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    s.bytes_received += data.len() as u64;
                    if !s.overflow {
                        if s.buffered + data.len() > s.limit {
                            // Too large to replay: stop buffering, this attempt is the last.
                            s.overflow = true;
                            s.chunks = Vec::new();
                            s.buffered = 0;
                        } else {
                            s.buffered += data.len();
                            s.chunks.push(data.clone());
                            this.pos += 1;
                        }
                    }
                    if s.src.is_end_stream() {
                        s.eos = true;
                        this.trailers_sent = true;
                        inner.end.set();
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(t) => {
                        s.eos = true;
                        s.trailers = Some(t.clone());
                        this.trailers_sent = true;
                        inner.end.set();
                        Poll::Ready(Some(Ok(Frame::trailers(t))))
                    }
                    // Unknown frame kinds carry nothing to forward.
                    Err(_) => {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.inner.lock();
        s.eos && s.trailers.is_none() && (s.overflow || self.pos >= s.chunks.len())
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.inner.lock();
        // The exact length lets HTTP/1.1 upstreams get Content-Length instead of chunking.
        match s.exact_len {
            Some(n) if self.fresh => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

// === The downstream request body ===

/// A downstream request's body as its connection delivers it: hyper's HTTP/1.1 server body, or
/// an HTTP/2 stream's data ([`crate::h2server`]).
#[derive(Debug)]
pub enum Inbound {
    H1(Incoming),
    H2(crate::h2server::RecvBody),
    /// A request without a body (`h1server`'s fast path).
    Empty,
}

impl Body for Inbound {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Inbound::H1(b) => Pin::new(b).poll_frame(cx).map_err(|e| e.into()),
            Inbound::H2(b) => Pin::new(b).poll_frame(cx),
            Inbound::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Inbound::H1(b) => b.is_end_stream(),
            Inbound::H2(b) => b.is_end_stream(),
            Inbound::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Inbound::H1(b) => b.size_hint(),
            Inbound::H2(b) => b.size_hint(),
            Inbound::Empty => SizeHint::with_exact(0),
        }
    }
}

// === Request and response bodies through HTTP filters ===

/// The downstream request body as the router reads it: straight from the connection, or through
/// the request body/trailer hooks of the filter chain (only when some filter has them).
#[derive(Debug)]
pub enum Downstream {
    Plain(Inbound),
    Filtered(Box<FilteredRequest>),
    /// Any body, for unit tests (a connection's body cannot be built outside a connection).
    #[cfg(test)]
    Test(ProxyBody),
}

impl From<Inbound> for Downstream {
    fn from(b: Inbound) -> Downstream {
        Downstream::Plain(b)
    }
}

impl Body for Downstream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Downstream::Plain(b) => Pin::new(b).poll_frame(cx),
            Downstream::Filtered(b) => Pin::new(b.as_mut()).poll_frame(cx),
            #[cfg(test)]
            Downstream::Test(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Downstream::Plain(b) => b.is_end_stream(),
            Downstream::Filtered(b) => b.is_end_stream(),
            #[cfg(test)]
            Downstream::Test(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Downstream::Plain(b) => b.size_hint(),
            Downstream::Filtered(b) => b.size_hint(),
            #[cfg(test)]
            Downstream::Test(b) => b.size_hint(),
        }
    }
}

/// The per-request filter context when body or trailer hooks need it from the body's side too
/// (the upstream connection polls the request body while the response side waits).
pub type SharedFilterContext = Arc<tokio::sync::Mutex<FilterContext>>;

/// A local reply a body hook produced after the upstream request started; the router waits on
/// it next to the upstream response.
#[derive(Debug, Default)]
pub struct ReplySlot {
    reply: Mutex<Option<LocalReply>>,
    notify: Notify,
}

impl ReplySlot {
    fn set(&self, reply: LocalReply) {
        *self.reply.lock().unwrap_or_else(|e| e.into_inner()) = Some(reply);
        self.notify.notify_waiters();
    }

    /// Takes the reply, if a hook produced one.
    pub fn take(&self) -> Option<LocalReply> {
        self.reply.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Resolves with the reply once a hook produces one.
    pub async fn wait(&self) -> LocalReply {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.take() {
                return r;
            }
            notified.await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request stopped by an HTTP filter")]
pub struct FilterStopped;

type HookFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

enum ReqStep {
    Data(Bytes, bool, Result<BodyFlow, LocalReply>),
    Trailers(HeaderMap, Result<(), LocalReply>),
}

/// The downstream request body through the chain's request body and trailer hooks. Hooks may
/// hold chunks (`StopAndBuffer`), replace them, or stop the request with a local reply (put in
/// the [`ReplySlot`]; the upstream request is then aborted).
pub struct FilteredRequest {
    src: Inbound,
    chain: Arc<FilterChain>,
    fcx: SharedFilterContext,
    slot: Arc<ReplySlot>,
    pending: Option<HookFuture<ReqStep>>,
    /// Trailers that arrived; their hook runs after the end-of-stream body hook.
    trailers: Option<HeaderMap>,
    /// The body hook has been called with `end_of_stream`.
    eos_called: bool,
    /// Nothing more to yield.
    done: bool,
    /// A frame read ahead by [`FilteredRequest::prime`].
    primed: Option<Option<Result<Frame<Bytes>, BoxError>>>,
    exact_len: Option<u64>,
}

impl std::fmt::Debug for FilteredRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilteredRequest")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl FilteredRequest {
    pub fn new(
        src: Inbound,
        chain: Arc<FilterChain>,
        fcx: SharedFilterContext,
        slot: Arc<ReplySlot>,
    ) -> FilteredRequest {
        // Only a chain that cannot change the data keeps the length (and so Content-Length).
        let exact_len = if chain.has_hook(strait_filters::Hooks::REQUEST_BODY) {
            None
        } else {
            src.size_hint().exact()
        };
        FilteredRequest {
            src,
            chain,
            fcx,
            slot,
            pending: None,
            trailers: None,
            eos_called: false,
            done: false,
            primed: None,
            exact_len,
        }
    }

    /// Runs the hooks until the first frame to forward (or the end), before any upstream
    /// request exists: a filter that holds the body (buffer) or rejects it answers without the
    /// upstream seeing the request, as in Envoy.
    pub async fn prime(&mut self) -> Result<(), LocalReply> {
        let first = std::future::poll_fn(|cx| Pin::new(&mut *self).poll_frame(cx)).await;
        if let Some(reply) = self.slot.take() {
            return Err(reply);
        }
        self.primed = Some(first);
        Ok(())
    }

    fn body_hook(&mut self, chunk: Bytes, eos: bool) {
        self.eos_called |= eos;
        let chain = self.chain.clone();
        let fcx = self.fcx.clone();
        self.pending = Some(Box::pin(async move {
            let mut g = fcx.lock_owned().await;
            let mut chunk = chunk;
            let r = chain.run_request_body(&mut g, &mut chunk, eos).await;
            ReqStep::Data(chunk, eos, r)
        }));
    }

    fn trailers_hook(&mut self, trailers: HeaderMap) {
        let chain = self.chain.clone();
        let fcx = self.fcx.clone();
        self.pending = Some(Box::pin(async move {
            let mut g = fcx.lock_owned().await;
            let mut t = trailers;
            let r = chain.run_request_trailers(&mut g, &mut t).await;
            ReqStep::Trailers(t, r)
        }));
    }

    fn stop(&mut self, reply: LocalReply) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        self.slot.set(reply);
        Poll::Ready(Some(Err(FilterStopped.into())))
    }
}

impl Body for FilteredRequest {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(f) = this.primed.take() {
            return Poll::Ready(f);
        }
        loop {
            if let Some(p) = this.pending.as_mut() {
                let step = match p.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(s) => s,
                };
                this.pending = None;
                match step {
                    ReqStep::Data(_, _, Err(reply)) | ReqStep::Trailers(_, Err(reply)) => {
                        return this.stop(reply);
                    }
                    ReqStep::Data(chunk, eos, Ok(flow)) => {
                        if eos {
                            match this.trailers.take() {
                                Some(t) => this.trailers_hook(t),
                                None => this.done = true,
                            }
                        }
                        if flow == BodyFlow::Forward && !chunk.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(chunk))));
                        }
                        continue;
                    }
                    ReqStep::Trailers(t, Ok(())) => {
                        this.done = true;
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                }
            }
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.src).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    if this.eos_called {
                        this.done = true;
                    } else {
                        this.body_hook(Bytes::new(), true);
                    }
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let eos = this.src.is_end_stream();
                        this.body_hook(data, eos);
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            this.trailers = Some(t);
                            this.body_hook(Bytes::new(), true);
                        }
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_none() && self.primed.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact_len {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

enum RespStep {
    Data(Bytes, bool, Result<BodyFlow, LocalReply>),
    Trailers(HeaderMap, Result<(), LocalReply>),
}

/// The response body through the chain's response body and trailer hooks. A local reply from
/// them comes too late (the headers are sent): the stream is reset, as Envoy does.
pub struct FilteredResponse {
    inner: ProxyBody,
    chain: Arc<FilterChain>,
    fcx: SharedFilterContext,
    pending: Option<HookFuture<RespStep>>,
    trailers: Option<HeaderMap>,
    eos_called: bool,
    done: bool,
}

impl FilteredResponse {
    pub fn new(inner: ProxyBody, chain: Arc<FilterChain>, fcx: SharedFilterContext) -> Self {
        FilteredResponse {
            inner,
            chain,
            fcx,
            pending: None,
            trailers: None,
            eos_called: false,
            done: false,
        }
    }

    fn body_hook(&mut self, chunk: Bytes, eos: bool) {
        self.eos_called |= eos;
        let chain = self.chain.clone();
        let fcx = self.fcx.clone();
        self.pending = Some(Box::pin(async move {
            let mut g = fcx.lock_owned().await;
            let mut chunk = chunk;
            let r = chain.run_response_body(&mut g, &mut chunk, eos).await;
            RespStep::Data(chunk, eos, r)
        }));
    }

    fn trailers_hook(&mut self, trailers: HeaderMap) {
        let chain = self.chain.clone();
        let fcx = self.fcx.clone();
        self.pending = Some(Box::pin(async move {
            let mut g = fcx.lock_owned().await;
            let mut t = trailers;
            let r = chain.run_response_trailers(&mut g, &mut t).await;
            RespStep::Trailers(t, r)
        }));
    }
}

impl Body for FilteredResponse {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(p) = this.pending.as_mut() {
                let step = match p.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(s) => s,
                };
                this.pending = None;
                match step {
                    RespStep::Data(_, _, Err(_)) | RespStep::Trailers(_, Err(_)) => {
                        this.done = true;
                        return Poll::Ready(Some(Err(FilterStopped.into())));
                    }
                    RespStep::Data(chunk, eos, Ok(flow)) => {
                        if eos {
                            match this.trailers.take() {
                                Some(t) => this.trailers_hook(t),
                                None => this.done = true,
                            }
                        }
                        if flow == BodyFlow::Forward && !chunk.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(chunk))));
                        }
                        continue;
                    }
                    RespStep::Trailers(t, Ok(())) => {
                        this.done = true;
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                }
            }
            if this.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    if this.eos_called {
                        this.done = true;
                    } else {
                        this.body_hook(Bytes::new(), true);
                    }
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let eos = this.inner.is_end_stream();
                        this.body_hook(data, eos);
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            this.trailers = Some(t);
                            this.body_hook(Bytes::new(), true);
                        }
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod filtered_response {
        use super::*;
        use strait_filters::{Action, ChainEntry, HttpFilter};

        /// Upper-cases data, holds the chunk after "hold", counts chunks into a trailer.
        struct Shout;

        #[derive(Default)]
        struct Seen(usize);

        impl HttpFilter for Shout {
            fn hooks(&self) -> strait_filters::Hooks {
                strait_filters::Hooks::RESPONSE_BODY | strait_filters::Hooks::RESPONSE_TRAILERS
            }

            fn on_response_body(
                &self,
                ctx: &mut FilterContext,
                chunk: &mut Bytes,
                _eos: bool,
            ) -> Action {
                ctx.local::<Seen>().0 += 1;
                if chunk.as_ref() == b"hold" {
                    return Action::StopAndBuffer;
                }
                *chunk = Bytes::from(chunk.to_ascii_uppercase());
                Action::Continue
            }

            fn on_response_trailers(&self, ctx: &mut FilterContext, t: &mut HeaderMap) -> Action {
                let n = ctx.local::<Seen>().0;
                t.insert("x-chunks", http::HeaderValue::from(n));
                Action::Continue
            }
        }

        fn body_of(frames: Vec<Frame<Bytes>>) -> ProxyBody {
            let stream = futures_util::stream::iter(frames.into_iter().map(Ok::<_, BoxError>));
            http_body_util::StreamBody::new(stream).boxed_unsync()
        }

        #[tokio::test]
        async fn hooks_see_every_chunk_and_the_trailers() {
            let chain = Arc::new(FilterChain::new(vec![ChainEntry {
                name: "shout".into(),
                filter: Arc::new(Shout),
                disabled_by_default: false,
            }]));
            let addr: std::net::SocketAddr = ([127, 0, 0, 1], 1).into();
            let fcx = Arc::new(tokio::sync::Mutex::new(FilterContext::new(addr, addr)));
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let inner = body_of(vec![
                Frame::data(Bytes::from_static(b"ab")),
                Frame::data(Bytes::from_static(b"hold")),
                Frame::data(Bytes::from_static(b"cd")),
                Frame::trailers(trailers),
            ]);
            let body = FilteredResponse::new(inner, chain, fcx.clone());
            let collected = body.collect().await.unwrap_or_else(|e| panic!("{e}"));
            let t = collected.trailers().cloned().unwrap_or_default();
            assert_eq!(collected.to_bytes(), Bytes::from_static(b"ABCD"));
            // Three data frames and the end-of-stream call before the trailers.
            assert_eq!(t.get("x-chunks").map(|v| v.as_bytes()), Some(&b"4"[..]));
            assert_eq!(t.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
        }
    }

    #[tokio::test]
    async fn end_signal_wakes_waiter() {
        let s = Arc::new(EndSignal::default());
        let s2 = s.clone();
        let t = tokio::spawn(async move { std::future::poll_fn(|cx| s2.poll_when(cx)).await });
        tokio::task::yield_now().await;
        assert!(!s.is_set());
        s.set();
        let when = t.await.unwrap();
        assert_eq!(s.when(), Some(when));
        s.set();
        assert_eq!(s.when(), Some(when), "the first end is kept");

        let start = Instant::now() - Duration::from_secs(1);
        let s = EndSignal::ended(start);
        assert!(s.is_set());
        s.set();
        assert_eq!(
            s.when(),
            Some(start),
            "a request without a body ended at its start"
        );
    }
}
