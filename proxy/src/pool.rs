//! Per-host upstream connection pools: HTTP/1.1 keep-alive reuse (one request per connection at a
//! time, an idle list watched by one task per pool; requests drive their connection themselves,
//! see `h1client`) and HTTP/2 multiplexing (streams up to `max_concurrent_streams` per
//! connection, lowered to the upstream's SETTINGS_MAX_CONCURRENT_STREAMS, `h2client`). Enforces
//! the cluster's connection and pending-request circuit breakers of the request's routing
//! priority (as Envoy, DEFAULT and HIGH requests use separate pools), reaps idle connections
//! after `idle_timeout`, and counts Envoy's `upstream_cx_*` stats.
//! No lock is held across an await, except the per-host HTTP/2 connect lock (see `H2Pool`).

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http::{Request, Response};
use strait_xds::model::{RoutingPriority, Thresholds, UpstreamProtocol};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::body::ProxyBody;
use crate::cluster::{Breakers, ClusterInfo};
use crate::conn::{Counted, CountingIo};
use crate::h1client;
use crate::stats::HostStats;

/// Why no connection could be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolError {
    /// A circuit breaker (pending requests) is full.
    Overflow,
    ConnectFailure(String),
    ConnectTimeout,
}

use crate::body::{base, now_ms};

/// State one connection shares between its pool entry, its leases and its driver task.
#[derive(Debug, Default)]
struct ConnMeta {
    active: AtomicU32,
    idle_since_ms: AtomicU64,
    closed: AtomicBool,
    /// Our side of the connection (`%UPSTREAM_LOCAL_ADDRESS%`).
    local: Option<SocketAddr>,
}

impl ConnMeta {
    fn begin(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
    }
    fn end(&self) {
        self.idle_since_ms.store(now_ms(), Ordering::Release);
        let _ = self
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
    }
}

/// A pooled HTTP/1.1 connection: idle in its pool's list, or owned by the exchange using it.
/// Dropping it closes the connection and counts it as Envoy does. Boxed once when it connects:
/// every request moves it several times (out of the idle list, through the exchange, back), and
/// a pointer moves for less than the ~200 bytes of its state.
pub struct H1Conn(Box<H1State>);

impl std::ops::Deref for H1Conn {
    type Target = H1State;
    fn deref(&self) -> &H1State {
        &self.0
    }
}

impl std::ops::DerefMut for H1Conn {
    fn deref_mut(&mut self) -> &mut H1State {
        &mut self.0
    }
}

/// What an [`H1Conn`] points to.
pub struct H1State {
    conn: h1client::Connection,
    pool: Arc<PoolShared>,
    local: Option<SocketAddr>,
    idle_since_ms: u64,
    remote: bool,
    idle_expired: bool,
}

impl h1client::Pooled for H1Conn {
    fn conn(&mut self) -> &mut h1client::Connection {
        &mut self.conn
    }

    fn release(mut self) {
        let st = &mut *self.0;
        st.idle_since_ms = now_ms();
        let mut cx = Context::from_waker(st.pool.h1.waker());
        if st.conn.poll_peer_gone(&mut cx) {
            st.remote = true;
            return;
        }
        let pool = self.pool.clone();
        lock(&pool.h1.idle).push(self);
        pool.freed.notify_one();
    }

    fn peer_closed(&mut self) {
        self.remote = true;
    }

    fn protocol_error(&mut self) {
        // Envoy's codec client closes the connection itself: a local destroy.
        self.pool.info.stats.upstream_cx_protocol_error.inc();
    }
}

impl Drop for H1State {
    fn drop(&mut self) {
        // Counted before the socket closes (the field drops after this).
        let s = &self.pool;
        let st = &s.info.stats;
        if self.idle_expired {
            st.upstream_cx_idle_timeout.inc();
            st.upstream_cx_destroy_local.inc();
        } else if self.remote {
            st.upstream_cx_destroy_remote.inc();
        } else {
            st.upstream_cx_destroy_local.inc();
        }
        st.upstream_cx_destroy.inc();
        st.upstream_cx_active.dec();
        s.host_stats.cx_active.dec();
        Breakers::release(&s.breakers().connections);
        s.open.fetch_sub(1, Ordering::AcqRel);
        s.freed.notify_one();
    }
}

/// The upstream side of an upgraded (tunnelled) HTTP/1.1 connection.
pub type Upgraded = h1client::Upgraded<H1Conn>;

struct H2Conn {
    sender: crate::h2client::SendRequest,
    meta: Arc<ConnMeta>,
}

#[derive(Default)]
struct H1Pool {
    // A short critical section per acquire/release on one host; contention is per host only.
    idle: Mutex<Vec<H1Conn>>,
    /// The watcher task's waker: idle connections wake it when their peer closes them.
    watcher: OnceLock<Waker>,
    watching: AtomicBool,
}

impl H1Pool {
    fn waker(&self) -> &Waker {
        self.watcher.get().unwrap_or(Waker::noop())
    }
}

#[derive(Default)]
struct H2Pool {
    conns: Mutex<Vec<Arc<H2Conn>>>,
    /// Serialises connection setup so that a burst of requests shares one new connection instead
    /// of opening one each (held across the connect await on purpose; per host only).
    connecting: tokio::sync::Mutex<()>,
}

struct PoolShared {
    info: Arc<ClusterInfo>,
    addr: SocketAddr,
    host_stats: Arc<HostStats>,
    /// Whose circuit breakers this pool counts against (the route's `priority`).
    priority: RoutingPriority,
    h1: H1Pool,
    h2: H2Pool,
    /// Woken when a connection or stream frees up.
    freed: Notify,
    /// Connections of this pool, connecting or open.
    open: AtomicU32,
    /// The HIGH-priority pool of this host, made on first use (in the DEFAULT pool only):
    /// Envoy keeps a pool per priority, so HIGH requests never queue behind DEFAULT ones.
    high: std::sync::OnceLock<Arc<PoolShared>>,
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        // The watcher ends once it sees the pool gone.
        self.h1.waker().wake_by_ref();
    }
}

impl PoolShared {
    fn new(
        info: Arc<ClusterInfo>,
        addr: SocketAddr,
        host_stats: Arc<HostStats>,
        priority: RoutingPriority,
    ) -> PoolShared {
        PoolShared {
            info,
            addr,
            host_stats,
            priority,
            h1: H1Pool::default(),
            h2: H2Pool::default(),
            freed: Notify::new(),
            open: AtomicU32::new(0),
            high: std::sync::OnceLock::new(),
        }
    }

    /// The cluster's resource counters of this pool's priority.
    fn breakers(&self) -> &Breakers {
        match self.priority {
            RoutingPriority::Default => &self.info.breakers,
            RoutingPriority::High => &self.info.breakers_high,
        }
    }

    fn thresholds(&self) -> &Thresholds {
        match self.priority {
            RoutingPriority::Default => &self.info.config.circuit_breakers,
            RoutingPriority::High => &self.info.config.circuit_breakers_high,
        }
    }
}

/// How many pools each host keeps: one per per-core worker (set before any config is built),
/// else one.
static WORKERS: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// This thread's per-core worker index (0 elsewhere).
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Gives each host `n` pools, one per per-core worker. Call before any cluster is built.
pub fn set_workers(n: usize) {
    WORKERS.store(n.max(1), Ordering::Release);
}

/// Marks the calling thread as per-core worker `i`: its requests use the hosts' pool `i`.
pub fn set_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// One host's connections: a pool per per-core worker (Envoy keeps pools per worker too), so
/// a worker only drives sockets registered with its own event loop and never wakes another
/// worker for its I/O. The work-stealing runtime moves tasks between threads: one pool.
/// Circuit breakers and stats are the cluster's and the host's, shared by all the pools.
#[derive(Clone)]
pub struct HostPool(Arc<HostPools>);

struct HostPools {
    info: Arc<ClusterInfo>,
    addr: SocketAddr,
    host_stats: Arc<HostStats>,
    pools: Box<[OnceLock<Pool>]>,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("addr", &self.0.addr)
            .finish()
    }
}

impl HostPool {
    pub fn new(info: Arc<ClusterInfo>, addr: SocketAddr, host_stats: Arc<HostStats>) -> HostPool {
        let n = WORKERS.load(Ordering::Acquire).max(1);
        HostPool(Arc::new(HostPools {
            info,
            addr,
            host_stats,
            pools: (0..n).map(|_| OnceLock::new()).collect(),
        }))
    }

    /// The calling worker's pool, made on first use.
    fn current(&self) -> &Pool {
        let h = &*self.0;
        let i = WORKER.with(|w| w.get()) % h.pools.len();
        h.pools[i].get_or_init(|| Pool {
            shared: Arc::new(PoolShared::new(
                h.info.clone(),
                h.addr,
                h.host_stats.clone(),
                RoutingPriority::Default,
            )),
        })
    }

    pub fn is_http2(&self) -> bool {
        matches!(self.0.info.config.protocol, UpstreamProtocol::Http2 { .. })
    }

    /// A connection ready for one DEFAULT-priority request; see [`Self::acquire_for`].
    pub async fn acquire(&self) -> Result<Conn, PoolError> {
        self.current().acquire_for(RoutingPriority::Default).await
    }

    /// A connection ready for one request of the route's `priority`: an idle or not-full one,
    /// else a new one (waiting as a pending request while that priority's connection breaker
    /// is full). Envoy's `upstream_cx_overflow` counts a request that found the connection
    /// breaker full, `upstream_rq_pending_overflow` one turned away by the pending breaker.
    pub async fn acquire_for(&self, priority: RoutingPriority) -> Result<Conn, PoolError> {
        self.current().acquire_for(priority).await
    }
}

/// One worker's connections to one host.
#[derive(Clone)]
struct Pool {
    shared: Arc<PoolShared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a push/pop/scan: a panic cannot leave the list inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    /// The pool of the route's routing priority.
    fn for_priority(&self, priority: RoutingPriority) -> Pool {
        match priority {
            RoutingPriority::Default => self.clone(),
            RoutingPriority::High => {
                let s = &self.shared;
                let high = s.high.get_or_init(|| {
                    Arc::new(PoolShared::new(
                        s.info.clone(),
                        s.addr,
                        s.host_stats.clone(),
                        RoutingPriority::High,
                    ))
                });
                Pool {
                    shared: high.clone(),
                }
            }
        }
    }

    fn is_http2(&self) -> bool {
        matches!(
            self.shared.info.config.protocol,
            UpstreamProtocol::Http2 { .. }
        )
    }

    async fn acquire_for(&self, priority: RoutingPriority) -> Result<Conn, PoolError> {
        if priority != RoutingPriority::Default {
            return Box::pin(self.for_priority(priority).acquire_pool()).await;
        }
        self.acquire_pool().await
    }

    async fn acquire_pool(&self) -> Result<Conn, PoolError> {
        // A new connection's future (connect, handshake) is boxed: inline it would size every
        // request's future (and each move of one) for that rare path.
        let s = &self.shared;
        if let Some(c) = self.try_existing().await {
            return Ok(c);
        }
        let cb = s.thresholds();
        if !Breakers::try_acquire(&s.breakers().pending, cb.max_pending_requests) {
            s.info.stats.upstream_rq_pending_overflow.inc();
            return Err(PoolError::Overflow);
        }
        s.info.stats.upstream_rq_pending_total.inc();
        s.info.stats.upstream_rq_pending_active.inc();
        let _pending = PendingGuard(s.clone());
        let mut overflowed = false;
        loop {
            let freed = s.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(c) = self.try_existing().await {
                return Ok(c);
            }
            if self.is_http2() {
                let _connecting = s.h2.connecting.lock().await;
                if let Some(c) = self.try_existing().await {
                    return Ok(c);
                }
                if self.connection_slot(&mut overflowed) {
                    return Box::pin(self.connect()).await;
                }
            } else if self.connection_slot(&mut overflowed) {
                return Box::pin(self.connect()).await;
            }
            freed.await;
        }
    }

    /// Envoy's `tryCreateNewConnection`: a connection within the priority's connection
    /// breaker, or past it when this pool has no connection at all (else its requests could
    /// only wait for other hosts' connections to close). Finding the breaker full counts
    /// `upstream_cx_overflow` (once per waiting request).
    fn connection_slot(&self, overflowed: &mut bool) -> bool {
        let s = &self.shared;
        let connections = &s.breakers().connections;
        if Breakers::try_acquire(connections, s.thresholds().max_connections) {
            return true;
        }
        if !*overflowed {
            s.info.stats.upstream_cx_overflow.inc();
            *overflowed = true;
        }
        if s.open.load(Ordering::Acquire) == 0 {
            connections.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        false
    }

    async fn try_existing(&self) -> Option<Conn> {
        let s = &self.shared;
        if let UpstreamProtocol::Http2 {
            max_concurrent_streams,
        } = s.info.config.protocol
        {
            let mut conns = lock(&s.h2.conns);
            // A connection that got GOAWAY takes no new streams; its open ones finish.
            conns.retain(|c| !c.meta.closed.load(Ordering::Acquire) && !c.sender.is_gone());
            for c in conns.iter() {
                let active = c.meta.active.load(Ordering::Acquire);
                // The configured limit, lowered to the upstream's own (as Envoy's pool does): a
                // connection at it makes the pool open another rather than queue streams on it.
                // Never below one, so that an upstream advertising 0 does not make every
                // request open a connection.
                let limit = max_concurrent_streams.min(c.sender.max_streams()).max(1);
                if active < limit {
                    c.meta.begin();
                    return Some(Conn {
                        kind: ConnKind::H2(c.sender.clone(), c.meta.clone(), s.clone()),
                    });
                }
            }
            return None;
        }
        loop {
            let mut c = lock(&s.h1.idle).pop()?;
            if c.conn.peer_gone() {
                c.remote = true;
                continue;
            }
            return Some(Conn {
                kind: ConnKind::H1(c),
            });
        }
    }

    async fn connect(&self) -> Result<Conn, PoolError> {
        let s = &self.shared;
        let st = &s.info.stats;
        st.upstream_cx_total.inc();
        s.host_stats.cx_total.inc();
        s.open.fetch_add(1, Ordering::AcqRel);
        let fail = |e: PoolError| {
            // As Envoy counts it: the failed connection is destroyed (remotely) and the
            // request that waited on it is ejected from the pending queue.
            st.upstream_cx_connect_fail.inc();
            st.upstream_cx_destroy.inc();
            st.upstream_cx_destroy_remote.inc();
            st.upstream_rq_pending_failure_eject.inc();
            s.host_stats.cx_connect_fail.inc();
            Breakers::release(&s.breakers().connections);
            s.open.fetch_sub(1, Ordering::AcqRel);
            s.freed.notify_one();
            e
        };
        let stream =
            match tokio::time::timeout(s.info.config.connect_timeout, TcpStream::connect(s.addr))
                .await
            {
                Err(_) => {
                    st.upstream_cx_connect_timeout.inc();
                    return Err(fail(PoolError::ConnectTimeout));
                }
                Ok(Err(e)) => {
                    return Err(fail(PoolError::ConnectFailure(
                        crate::local_reply::transport_failure(&e),
                    )))
                }
                Ok(Ok(stream)) => stream,
            };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        let io = CountingIo::new(stream, Counted::Upstream(s.info.clone()));
        let kind = if let UpstreamProtocol::Http2 { .. } = s.info.config.protocol {
            let meta = Arc::new(ConnMeta {
                local,
                ..ConnMeta::default()
            });
            meta.begin();
            let (sender, mut conn) = match crate::h2client::handshake(io).await {
                Ok(x) => x,
                Err(e) => return Err(fail(PoolError::ConnectFailure(e.to_string()))),
            };
            // Requests pending because this connection was full may now fit on it.
            let waker = s.clone();
            conn.on_more_streams(move || waker.freed.notify_waiters());
            st.upstream_cx_http2_total.inc();
            self.spawn_driver(conn, meta.clone());
            let c = Arc::new(H2Conn {
                sender: sender.clone(),
                meta: meta.clone(),
            });
            lock(&s.h2.conns).push(c);
            ConnKind::H2(sender, meta, s.clone())
        } else {
            st.upstream_cx_http1_total.inc();
            watch_h1(s);
            ConnKind::H1(H1Conn(Box::new(H1State {
                conn: h1client::Connection::new(io),
                pool: s.clone(),
                local,
                idle_since_ms: 0,
                remote: false,
                idle_expired: false,
            })))
        };
        st.upstream_cx_active.inc();
        s.host_stats.cx_active.inc();
        Ok(Conn { kind })
    }

    /// Drives one HTTP/2 connection until it closes or stays idle for `idle_timeout`.
    fn spawn_driver<F>(&self, conn: F, meta: Arc<ConnMeta>)
    where
        F: Future<Output = Result<(), crate::h2client::Error>> + Send + 'static,
    {
        let s = self.shared.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let idle = s.info.config.idle_timeout;
            let st = &s.info.stats;
            // The connection is busy when spawned: it cannot expire sooner than `d` from now.
            let mut sleep = idle.map(|d| Box::pin(tokio::time::sleep(d)));
            // The idle timer is polled only after its own wake-up, not on each of the
            // connection's (several per request).
            let side = crate::conn::Side::new();
            let ended = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                let (Some(sleep), Some(d)) = (sleep.as_mut(), idle) else {
                    return Poll::Pending;
                };
                while side.poll(sleep.as_mut(), cx).is_ready() {
                    let since = meta.idle_since_ms.load(Ordering::Acquire);
                    let busy = meta.active.load(Ordering::Acquire) > 0;
                    if !busy && now_ms().saturating_sub(since) >= d.as_millis() as u64 {
                        return Poll::Ready(None);
                    }
                    let deadline = if busy {
                        Instant::now() + d
                    } else {
                        base() + Duration::from_millis(since) + d
                    };
                    sleep.as_mut().reset(deadline.into());
                    side.rearm();
                }
                Poll::Pending
            })
            .await;
            match ended {
                // Strait closed it over the upstream's protocol error, as Envoy's codec client
                // does: a local destroy.
                Some(Err(e)) if e.is_protocol_error() => {
                    tracing::debug!(upstream = %s.addr, error = %e, "upstream protocol error");
                    st.upstream_cx_protocol_error.inc();
                    st.upstream_cx_destroy_local.inc();
                }
                Some(Err(e)) => {
                    tracing::debug!(upstream = %s.addr, error = %e, "upstream connection failed");
                    st.upstream_cx_destroy_remote.inc();
                }
                Some(Ok(())) => st.upstream_cx_destroy_remote.inc(),
                None => {
                    st.upstream_cx_idle_timeout.inc();
                    st.upstream_cx_destroy_local.inc();
                }
            }
            meta.closed.store(true, Ordering::Release);
            st.upstream_cx_destroy.inc();
            st.upstream_cx_active.dec();
            s.host_stats.cx_active.dec();
            Breakers::release(&s.breakers().connections);
            s.open.fetch_sub(1, Ordering::AcqRel);
            s.freed.notify_one();
        });
    }
}

struct PendingGuard(Arc<PoolShared>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        Breakers::release(&self.0.breakers().pending);
        self.0.info.stats.upstream_rq_pending_active.dec();
    }
}

/// Watches a pool's idle HTTP/1.1 connections (one task per pool, started with its first
/// connection): closes those idle for `idle_timeout` and those whose peer closed them. It wakes
/// on its timer and when an idle connection turns readable, never per request.
fn watch_h1(s: &Arc<PoolShared>) {
    if s.h1.watching.swap(true, Ordering::AcqRel) {
        return;
    }
    let weak: Weak<PoolShared> = Arc::downgrade(s);
    let idle = s.info.config.idle_timeout;
    let mut sleep = idle.map(|d| Box::pin(tokio::time::sleep(d)));
    tokio::spawn(std::future::poll_fn(move |cx| loop {
        let Some(s) = weak.upgrade() else {
            return Poll::Ready(());
        };
        let _ = s.h1.watcher.set(cx.waker().clone());
        let now = now_ms();
        let mut next: Option<u64> = None;
        let closing: Vec<H1Conn> = lock(&s.h1.idle)
            .extract_if(.., |c| {
                if c.conn.poll_peer_gone(cx) {
                    c.remote = true;
                    return true;
                }
                if let Some(d) = idle {
                    let expires = c.idle_since_ms + d.as_millis() as u64;
                    if now >= expires {
                        c.idle_expired = true;
                        return true;
                    }
                    next = Some(next.map_or(expires, |n| n.min(expires)));
                }
                false
            })
            .collect();
        // Closed (and counted) outside the lock.
        drop(closing);
        drop(s);
        let (Some(sleep), Some(d)) = (sleep.as_mut(), idle) else {
            return Poll::Pending;
        };
        let deadline = match next {
            Some(ms) => base() + Duration::from_millis(ms),
            None => Instant::now() + d,
        };
        sleep.as_mut().reset(deadline.into());
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
    }));
}

enum ConnKind {
    H1(H1Conn),
    H2(crate::h2client::SendRequest, Arc<ConnMeta>, Arc<PoolShared>),
}

/// A connection reserved for one request.
pub struct Conn {
    kind: ConnKind,
}

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    H1(#[from] h1client::Error),
    #[error(transparent)]
    H2(#[from] crate::h2client::Error),
}

/// The connection of a 101 answer to an upgrade request (HTTP/1.1 only).
pub fn take_upgrade<B>(resp: &mut Response<B>) -> Option<Upgraded> {
    h1client::take_upgrade(resp)
}

/// The protocol side of a reserved connection, to send one request on.
pub enum Sender {
    H1(H1Conn),
    H2(crate::h2client::SendRequest),
}

impl Sender {
    /// Sends the request (`upgrade`: it asks for a protocol upgrade; `idle`: the stream idle
    /// timeout an HTTP/1.1 upload finishing on its own task keeps to).
    pub async fn send(
        self,
        req: Request<ProxyBody>,
        upgrade: bool,
        idle: Option<Duration>,
    ) -> Result<Response<ProxyBody>, SendError> {
        // Each protocol's exchange is awaited in its own arm, so the HTTP/1.1 one (~130 bytes)
        // is not carried in a value sized for the HTTP/2 one (~850) as an `Either` would be.
        match self {
            Sender::H1(c) => h1client::send(c, req, upgrade, idle)
                .await
                .map(|(resp, _, _)| resp)
                .map_err(SendError::H1),
            Sender::H2(s) => crate::h2client::send(s, req).await.map_err(SendError::H2),
        }
    }
}

impl Conn {
    /// The connection to send on, and the lease: it holds an HTTP/2 stream slot until the
    /// exchange ends; an HTTP/1.1 connection goes back to its pool when the response body ends
    /// cleanly.
    pub fn into_sender(self) -> (Sender, Lease) {
        match self.kind {
            ConnKind::H1(c) => {
                let kind = LeaseKind::H1(c.local);
                (Sender::H1(c), Lease { kind })
            }
            ConnKind::H2(sender, meta, pool) => (
                Sender::H2(sender),
                Lease {
                    kind: LeaseKind::H2(meta, pool),
                },
            ),
        }
    }
}

enum LeaseKind {
    H1(Option<SocketAddr>),
    H2(Arc<ConnMeta>, Arc<PoolShared>),
}

/// Holds an HTTP/2 stream slot until the exchange ends.
pub struct Lease {
    kind: LeaseKind,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("local", &self.local_addr())
            .finish()
    }
}

impl Lease {
    /// The local address of the upstream connection.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.kind {
            LeaseKind::H1(local) => *local,
            LeaseKind::H2(meta, _) => meta.local,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let LeaseKind::H2(meta, pool) = &self.kind {
            meta.end();
            pool.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use strait_xds::model;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn info(addr: SocketAddr, idle: Duration) -> Arc<ClusterInfo> {
        let config = model::Cluster {
            name: "c".into(),
            discovery: model::DiscoveryType::Static,
            connect_timeout: Duration::from_secs(1),
            lb_policy: model::LbPolicy::RoundRobin,
            load_assignment: model::LoadAssignment {
                endpoints: vec![model::LocalityLbEndpoints {
                    locality: Default::default(),
                    priority: 0,
                    load_balancing_weight: None,
                    lb_endpoints: vec![model::LbEndpoint {
                        address: model::EndpointAddress::Ip(addr),
                        load_balancing_weight: 1,
                        health_status: model::HealthStatus::Healthy,
                        hostname: None,
                    }],
                }],
                policy: Default::default(),
            },
            protocol: UpstreamProtocol::Http1,
            circuit_breakers: Default::default(),
            idle_timeout: Some(idle),
            dns_refresh_rate: Duration::from_secs(5),
            dns_lookup_family: model::DnsLookupFamily::Auto,
            health_checks: Vec::new(),
            outlier_detection: None,
            circuit_breakers_high: Default::default(),
            lb: Default::default(),
        };
        Arc::new(ClusterInfo {
            stats: crate::stats::Store::default().cluster("c"),
            config: Arc::new(config),
            breakers: Breakers::default(),
            breakers_high: Breakers::default(),
        })
    }

    /// The driver's idle timer: a connection busy for longer than `idle_timeout` stays open,
    /// and once idle it is closed after `idle_timeout` (counted as Envoy does).
    #[tokio::test]
    async fn idle_connection_closed_after_idle_timeout_busy_one_kept() {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "request cut short");
                got.extend_from_slice(&buf[..n]);
            }
            // Busy for three idle timeouts.
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            let answered = Instant::now();
            // The proxy side closes the idle connection: EOF.
            while s.read(&mut buf).await.unwrap_or(0) > 0 {}
            let _ = closed_tx.send(answered.elapsed());
        });
        let info = info(addr, Duration::from_millis(100));
        let pool = HostPool::new(info.clone(), addr, Arc::new(HostStats::default()));
        let conn = pool.acquire().await.unwrap();
        let req = get();
        let (sender, lease) = conn.into_sender();
        let fut = sender.send(req, false, None);
        let resp = fut.await.unwrap();
        assert_eq!(resp.status(), 200);
        drop(resp);
        drop(lease);
        let idle_for = tokio::time::timeout(Duration::from_secs(10), closed_rx)
            .await
            .expect("idle connection not closed")
            .unwrap();
        // Idle time is kept in whole milliseconds.
        assert!(idle_for >= Duration::from_millis(99), "{idle_for:?}");
        // The driver counts before it drops the connection (this runtime has one thread).
        assert_eq!(info.stats.upstream_cx_idle_timeout.get(), 1);
        assert_eq!(info.stats.upstream_cx_destroy_local.get(), 1);
        assert_eq!(info.stats.upstream_cx_destroy_remote.get(), 0);
        assert_eq!(info.stats.upstream_cx_active.get(), 0);
    }

    /// A bodiless `GET /` for host `c`.
    fn get() -> Request<ProxyBody> {
        Request::builder()
            .uri("/")
            .header("host", "c")
            .body(crate::body::empty())
            .unwrap()
    }

    /// Answers every request head on every connection with an empty 200, counting accepts.
    async fn keep_alive_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = accepts.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = vec![0u8; 4096];
                    loop {
                        while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            got.drain(..end + 4);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                            if s.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                });
            }
        });
        (addr, accepts)
    }

    fn pool_has_idle(pool: &HostPool, worker: usize) -> bool {
        pool.0.pools[worker]
            .get()
            .is_some_and(|p| !lock(&p.shared.h1.idle).is_empty())
    }

    /// Per-core workers each keep their own connections to a host (Envoy's per-worker pools):
    /// two requests in a row on one worker share a connection, another worker opens its own.
    #[test]
    fn each_per_core_worker_has_its_own_pool() {
        let upstream = tokio::runtime::Runtime::new().unwrap();
        let (addr, accepts) = upstream.block_on(keep_alive_upstream());
        set_workers(2);
        let pool = HostPool::new(
            info(addr, Duration::from_secs(60)),
            addr,
            Arc::new(HostStats::default()),
        );
        set_workers(1);
        // Worker 0 keeps its runtime (and so its connection's registration) alive until the
        // end: were the pool shared, worker 1 would take that idle connection and never see its
        // response, as worker 0's event loop is not running; the timeout turns that into a failure.
        type Hold = Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>;
        let worker = |i: usize, pool: HostPool, hold: Hold| {
            std::thread::spawn(move || {
                set_worker(i);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    for _ in 0..2 {
                        let exchange = async {
                            let conn = pool.acquire().await.unwrap();
                            let req = get();
                            let (sender, _lease) = conn.into_sender();
                            let fut = sender.send(req, false, None);
                            fut.await.unwrap().status()
                        };
                        let status = tokio::time::timeout(Duration::from_secs(5), exchange)
                            .await
                            .expect("no response: a connection of another worker was used");
                        assert_eq!(status, 200);
                    }
                });
                if let Some((done, hold)) = hold {
                    let _ = done.send(());
                    let _ = hold.recv();
                }
                drop(rt);
            })
        };
        let (release, hold) = std::sync::mpsc::channel();
        let (done, first_done) = std::sync::mpsc::channel();
        let first = worker(0, pool.clone(), Some((done, hold)));
        first_done.recv().unwrap();
        assert!(
            pool_has_idle(&pool, 0),
            "worker 0's connection is idle in its pool"
        );
        assert_eq!(
            accepts.load(Ordering::SeqCst),
            1,
            "one worker, one connection"
        );
        worker(1, pool, None).join().unwrap();
        assert_eq!(
            accepts.load(Ordering::SeqCst),
            2,
            "the other worker opens its own"
        );
        let _ = release.send(());
        first.join().unwrap();
    }
}
