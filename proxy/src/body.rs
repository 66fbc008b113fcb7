//! Body plumbing for the data path: the boxed body type every response uses, and the request
//! body sent upstream, which streams with back-pressure and keeps a bounded copy so that a retry
//! can replay it (Envoy's retry buffer). Never holds more than the buffer limit per request.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
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
pub struct Activity(AtomicU64);

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity(AtomicU64::new(now_ms())))
    }

    #[inline]
    pub fn touch(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// When the stream becomes idle for `idle`, given no further activity.
    pub fn deadline(&self, idle: Duration) -> Instant {
        base() + Duration::from_millis(self.0.load(Ordering::Relaxed)) + idle
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
#[derive(Debug, Default)]
pub struct EndSignal {
    done: AtomicBool,
    notify: Notify,
    when: OnceLock<Instant>,
}

impl EndSignal {
    pub fn set(&self) {
        let _ = self.when.set(Instant::now());
        self.done.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// When the request ended, if it has.
    pub fn when(&self) -> Option<Instant> {
        self.when.get().copied()
    }

    pub fn is_set(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Debug)]
struct Shared {
    src: Incoming,
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

/// The downstream request body, shared by the upstream attempts of one request.
#[derive(Debug, Clone)]
pub struct RequestSource {
    shared: Arc<Mutex<Shared>>,
    end: Arc<EndSignal>,
    activity: Arc<Activity>,
}

impl RequestSource {
    /// `retry_buffer` is the replay limit in bytes (0 when the request will not be retried).
    pub fn new(src: Incoming, retry_buffer: usize, activity: Arc<Activity>) -> RequestSource {
        let end = Arc::new(EndSignal::default());
        let eos = src.is_end_stream();
        if eos {
            end.set();
        }
        let exact_len = src.size_hint().exact();
        RequestSource {
            shared: Arc::new(Mutex::new(Shared {
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
            })),
            end,
            activity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // Only this request's attempts take the lock, one frame at a time; a poisoned lock
        // means a panic elsewhere already failed the request, the state is still consistent.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn end_signal(&self) -> Arc<EndSignal> {
        self.end.clone()
    }

    pub fn bytes_received(&self) -> u64 {
        self.lock().bytes_received
    }

    /// Whether a further attempt could resend the whole body.
    pub fn can_replay(&self) -> bool {
        let s = self.lock();
        !s.failed && !(s.overflow && (s.bytes_received > 0 || !s.eos))
    }

    /// The body for the next attempt, or `None` when what was already sent cannot be replayed.
    pub fn attempt(&self) -> Option<AttemptBody> {
        let mut s = self.lock();
        let first = s.current == 0;
        if !first && (s.failed || (s.overflow && (s.bytes_received > 0 || !s.eos))) {
            return None;
        }
        s.current += 1;
        Some(AttemptBody {
            shared: self.shared.clone(),
            end: self.end.clone(),
            activity: self.activity.clone(),
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
    shared: Arc<Mutex<Shared>>,
    end: Arc<EndSignal>,
    activity: Arc<Activity>,
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
    Downstream(hyper::Error),
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
        let mut s = this.shared.lock().unwrap_or_else(|e| e.into_inner());
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
            this.activity.touch();
        }
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.eos = true;
                this.end.set();
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
                        this.end.set();
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(t) => {
                        s.eos = true;
                        s.trailers = Some(t.clone());
                        this.trailers_sent = true;
                        this.end.set();
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
        let s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        s.eos && s.trailers.is_none() && (s.overflow || self.pos >= s.chunks.len())
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        // The exact length lets HTTP/1.1 upstreams get Content-Length instead of chunking.
        match s.exact_len {
            Some(n) if self.fresh => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn end_signal_wakes_waiter() {
        let s = Arc::new(EndSignal::default());
        let s2 = s.clone();
        let t = tokio::spawn(async move { s2.wait().await });
        tokio::task::yield_now().await;
        s.set();
        t.await.unwrap();
        s.wait().await;
    }
}
