//! One timer per stream for the route timeout, the HCM request timeout and the stream idle
//! timeout, taken from its connection or a pool per listener socket and moved rather than
//! re-created: tokio wakes its I/O driver (an eventfd write) whenever a new timer is earlier than
//! the driver's next wake-up.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;

use crate::body::RequestSource;

/// Idle timers kept per pool: one per stream in flight on its listener socket, up to this many;
/// past it timers are let go.
const POOL_MAX: usize = 64;

/// Spare timers of one listener socket's connections. A returned timer stays registered with
/// tokio at its last deadline, which keeps the driver's next wake-up early enough that the next
/// stream moving it later (the usual case: a later request, the same timeout) costs an atomic
/// store, no wake-up.
#[derive(Default)]
pub struct TimerPool {
    free: Mutex<Vec<Pin<Box<Sleep>>>>,
}

impl std::fmt::Debug for TimerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerPool").finish_non_exhaustive()
    }
}

impl TimerPool {
    fn take(&self) -> Option<Pin<Box<Sleep>>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn put(&self, mut sleep: Pin<Box<Sleep>>) {
        // The timer keeps its registration but not its last stream's waker, which would hold
        // that stream's task (and its connection's) until the deadline. Unconstrained: with the
        // task's cooperative budget spent, `Sleep::poll` would return before it swaps the waker.
        let _ = std::pin::pin!(tokio::task::unconstrained(sleep.as_mut()))
            .poll(&mut Context::from_waker(std::task::Waker::noop()));
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < POOL_MAX {
            free.push(sleep);
        }
    }
}

/// A connection's spare timer, in front of its listener socket's pool. A keep-alive
/// connection's next stream takes back its last one's timer, whose waker is the connection's
/// own task (HTTP/1.1), so it is kept as is; a timer that goes to the pool is first made to
/// let go of its waker (~110 instructions), once per connection rather than per stream.
pub struct ConnTimers {
    pool: std::sync::Arc<TimerPool>,
    own: Mutex<Option<Pin<Box<Sleep>>>>,
}

impl std::fmt::Debug for ConnTimers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTimers").finish_non_exhaustive()
    }
}

impl ConnTimers {
    pub fn new(pool: std::sync::Arc<TimerPool>) -> ConnTimers {
        ConnTimers {
            pool,
            own: Mutex::new(None),
        }
    }

    fn take(&self) -> Option<Pin<Box<Sleep>>> {
        let own = self.own.lock().unwrap_or_else(|e| e.into_inner()).take();
        own.or_else(|| self.pool.take())
    }

    fn put(&self, sleep: Pin<Box<Sleep>>) {
        let mut own = self.own.lock().unwrap_or_else(|e| e.into_inner());
        if own.is_none() {
            *own = Some(sleep);
        } else {
            drop(own);
            self.pool.put(sleep);
        }
    }
}

impl Drop for ConnTimers {
    fn drop(&mut self) {
        let own = self.own.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(sleep) = own {
            self.pool.put(sleep);
        }
    }
}

/// Which timeout ended the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// HCM `request_timeout`: the request did not arrive in time.
    Request,
    /// The route timeout, counted from the end of the request.
    Route,
    /// No activity in either direction for the stream idle timeout.
    Idle,
}

/// The deadlines of one stream, on one `Sleep` armed at the earliest of them.
#[derive(Default)]
pub struct StreamTimer {
    sleep: Option<Pin<Box<Sleep>>>,
    /// The deadline the sleep is set to for this stream (`None`: not yet set).
    armed: Option<Instant>,
    request_deadline: Option<Instant>,
    route_timeout: Option<Duration>,
    idle: Option<Duration>,
    /// When the request ended, once seen.
    ended: Option<Instant>,
}

impl StreamTimer {
    /// Starts timing: the request timeout is an absolute deadline, the route timeout runs from
    /// the end of the request, the idle timeout from the last activity of `source`.
    pub fn start(
        &mut self,
        pool: &ConnTimers,
        request_deadline: Option<Instant>,
        route_timeout: Option<Duration>,
        idle: Option<Duration>,
    ) {
        self.request_deadline = request_deadline;
        self.route_timeout = route_timeout;
        self.idle = idle;
        self.armed = None;
        self.ended = None;
        if self.sleep.is_none() && self.active() {
            self.sleep = pool.take();
        }
    }

    fn active(&self) -> bool {
        self.request_deadline.is_some() || self.route_timeout.is_some() || self.idle.is_some()
    }

    /// Whether the idle timeout runs (activity must then be recorded).
    pub fn idle(&self) -> Option<Duration> {
        self.idle
    }

    /// When the route timeout expires, once the request has ended (the deadline `poll_expired`
    /// works to).
    pub fn route_deadline(&self, source: &RequestSource) -> Option<Instant> {
        let t = self.route_timeout?;
        Some(self.ended.or_else(|| source.end().when())? + t)
    }

    /// The response headers are out: the request timeout no longer applies.
    pub fn response_started(&mut self) {
        self.request_deadline = None;
    }

    /// Stops every timeout (a local reply, or the stream is over).
    pub fn stop(&mut self) {
        self.request_deadline = None;
        self.route_timeout = None;
        self.idle = None;
    }

    /// Gives the sleep back to the connection for its next stream.
    pub fn release(&mut self, pool: &ConnTimers) {
        self.stop();
        if let Some(s) = self.sleep.take() {
            pool.put(s);
        }
    }

    /// The earliest deadline now in force.
    fn target(&self, source: &RequestSource) -> Option<Instant> {
        let phase = match self.ended {
            None => self.request_deadline,
            Some(e) => self.route_timeout.map(|t| e + t),
        };
        let idle = self.idle.map(|i| source.activity().deadline(i));
        match (phase, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Ready with the timeout that expired; otherwise registers `cx` for the earliest one (and
    /// for the end of the request, which starts the route timeout).
    pub fn poll_expired(&mut self, source: &RequestSource, cx: &mut Context<'_>) -> Poll<Expired> {
        if !self.active() {
            return Poll::Pending;
        }
        loop {
            if self.ended.is_none() {
                if let Poll::Ready(t) = source.end().poll_when(cx) {
                    self.ended = Some(t);
                    self.armed = None;
                }
            }
            let Some(target) = self.target(source) else {
                return Poll::Pending;
            };
            // A later deadline (activity since, or the next stream's) is picked up when the
            // sleep fires; only an earlier one moves it. A stream takes its timer over still
            // set for the previous stream's deadline, the usual case earlier than its own: it
            // is kept (~120 instructions a stream) unless it has already fired.
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(target.into())));
            if self.armed.is_none() {
                let set = sleep.deadline().into_std();
                if set <= target && !sleep.is_elapsed() {
                    self.armed = Some(set);
                }
            }
            if self.armed.is_none_or(|a| target < a) {
                sleep.as_mut().reset(target.into());
                self.armed = Some(target);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if let (Some(e), Some(t)) = (self.ended, self.route_timeout) {
                if now >= e + t {
                    return Poll::Ready(Expired::Route);
                }
            }
            if let Some(i) = self.idle {
                if now >= source.activity().deadline(i) {
                    return Poll::Ready(Expired::Idle);
                }
            }
            if self.ended.is_none() && self.request_deadline.is_some_and(|d| now >= d) {
                return Poll::Ready(Expired::Request);
            }
            // Fired for a deadline that has since moved (activity): re-arm.
            self.armed = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A listener socket's pool and one connection in front of it.
    fn pools() -> (Arc<TimerPool>, ConnTimers) {
        let pool = Arc::new(TimerPool::default());
        let conn = ConnTimers::new(pool.clone());
        (pool, conn)
    }

    /// A request without a body: it has ended when the stream starts.
    fn source() -> RequestSource {
        RequestSource::new(crate::body::Downstream::Test(crate::body::empty()), 0)
    }

    // Real time: the deadlines are `std::time::Instant`s, which paused tokio time does not move.

    #[tokio::test]
    async fn route_timeout_counts_from_the_end_of_the_request() {
        let (pool, conn) = pools();
        let src = source();
        let mut t = StreamTimer::default();
        t.start(&conn, None, Some(Duration::from_millis(50)), None);
        let e = std::future::poll_fn(|cx| t.poll_expired(&src, cx)).await;
        assert_eq!(e, Expired::Route);
        let ended = src.end().when().unwrap_or_else(Instant::now);
        assert!(
            ended.elapsed() >= Duration::from_millis(50),
            "{:?}",
            ended.elapsed()
        );
        t.release(&conn);
        assert_eq!(pool.free.lock().unwrap().len(), 0, "kept by its connection");
        drop(conn);
        assert_eq!(pool.free.lock().unwrap().len(), 1, "pooled when it closes");
    }

    #[tokio::test]
    async fn idle_timeout_moves_with_activity_and_timers_are_reused() {
        let (pool, conn) = pools();
        for _ in 0..3 {
            let src = source();
            let mut t = StreamTimer::default();
            t.start(
                &conn,
                None,
                Some(Duration::from_secs(60)),
                Some(Duration::from_millis(100)),
            );
            let start = Instant::now();
            let touched = async {
                tokio::time::sleep(Duration::from_millis(60)).await;
                src.activity().touch();
                std::future::pending::<()>().await
            };
            let e = tokio::select! {
                e = std::future::poll_fn(|cx| t.poll_expired(&src, cx)) => e,
                _ = touched => unreachable!(),
            };
            assert_eq!(e, Expired::Idle);
            // 60 ms of activity, then 100 ms idle (activity is kept in whole milliseconds).
            assert!(
                start.elapsed() >= Duration::from_millis(159),
                "{:?}",
                start.elapsed()
            );
            t.release(&conn);
        }
        // One timer served the connection's three streams.
        assert!(conn.own.lock().unwrap().is_some());
        assert_eq!(pool.free.lock().unwrap().len(), 0);
    }

    /// A stream that takes over a timer still set for its previous stream's deadline expires
    /// at its own: not at an earlier left-over one, not after a later one.
    #[tokio::test]
    async fn a_taken_over_timer_expires_at_the_new_streams_deadline() {
        let (_pool, conn) = pools();
        let first = |route: Duration| {
            let src = source();
            let mut t = StreamTimer::default();
            t.start(&conn, None, Some(route), None);
            // Registered at its deadline, then the stream ends before it.
            let waker = std::task::Waker::noop();
            assert!(t
                .poll_expired(&src, &mut Context::from_waker(waker))
                .is_pending());
            t.release(&conn);
        };
        // Left over: earlier than the next stream's deadline.
        first(Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (src, mut t) = (source(), StreamTimer::default());
        let start = Instant::now();
        t.start(&conn, None, Some(Duration::from_millis(150)), None);
        let e = std::future::poll_fn(|cx| t.poll_expired(&src, cx)).await;
        assert_eq!(e, Expired::Route);
        assert!(
            start.elapsed() >= Duration::from_millis(150),
            "{:?}",
            start.elapsed()
        );
        t.release(&conn);
        // Left over: later than the next stream's deadline.
        first(Duration::from_secs(60));
        let (src, mut t) = (source(), StreamTimer::default());
        let start = Instant::now();
        t.start(&conn, None, Some(Duration::from_millis(50)), None);
        let e = std::future::poll_fn(|cx| t.poll_expired(&src, cx)).await;
        assert_eq!(e, Expired::Route);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(50) && took < Duration::from_secs(30),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn request_timeout_applies_until_the_request_ends() {
        use http_body_util::BodyExt;
        // A request body that never ends: the route timeout never starts.
        let pending = futures_util::stream::pending::<Result<http_body::Frame<bytes::Bytes>, _>>();
        let body = http_body_util::StreamBody::new(pending).boxed_unsync();
        let src = RequestSource::new(crate::body::Downstream::Test(body), 0);
        let (_pool, conn) = pools();
        let mut t = StreamTimer::default();
        let start = Instant::now();
        t.start(
            &conn,
            Some(start + Duration::from_millis(50)),
            Some(Duration::from_millis(10)),
            None,
        );
        let e = std::future::poll_fn(|cx| t.poll_expired(&src, cx)).await;
        assert_eq!(e, Expired::Request);
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(!src.end().is_set());
    }

    /// A timer pooled when its connection closes holds no waker of the stream that used it
    /// last (the connection's task).
    #[tokio::test]
    async fn a_pooled_timer_lets_its_streams_waker_go() {
        struct Counted;
        impl std::task::Wake for Counted {
            fn wake(self: std::sync::Arc<Self>) {}
        }
        let (pool, conn) = pools();
        let src = source();
        let mut t = StreamTimer::default();
        t.start(&conn, None, Some(Duration::from_secs(60)), None);
        let task = std::sync::Arc::new(Counted);
        let waker = std::task::Waker::from(task.clone());
        assert!(t
            .poll_expired(&src, &mut Context::from_waker(&waker))
            .is_pending());
        drop(waker);
        assert!(
            std::sync::Arc::strong_count(&task) > 1,
            "the timer holds the waker"
        );
        t.release(&conn);
        // Dropped at the end of a poll that spent the task's cooperative budget, where a plain
        // poll of the timer returns before it lets the waker go.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        for _ in 0..200 {
            let _ = tx.send(());
        }
        let mut conn = Some(conn);
        std::future::poll_fn(|cx| {
            for _ in 0..200 {
                let _ = rx.poll_recv(cx);
            }
            drop(conn.take());
            Poll::Ready(())
        })
        .await;
        assert_eq!(std::sync::Arc::strong_count(&task), 1);
        assert_eq!(pool.free.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn stopped_timer_never_fires() {
        let (_pool, conn) = pools();
        let src = source();
        let mut t = StreamTimer::default();
        t.start(&conn, None, Some(Duration::from_millis(10)), None);
        t.stop();
        let r = tokio::time::timeout(
            Duration::from_millis(100),
            std::future::poll_fn(|cx| t.poll_expired(&src, cx)),
        )
        .await;
        assert!(r.is_err());
    }
}
