//! Per-host upstream connection pools: HTTP/1.1 keep-alive reuse (one request per connection at a
//! time, an idle list) and HTTP/2 multiplexing (streams up to `max_concurrent_streams` per
//! connection). Enforces the cluster's connection and pending-request circuit breakers of the
//! request's routing priority (as Envoy, DEFAULT and HIGH requests use separate pools), reaps
//! idle connections after `idle_timeout`, and counts Envoy's `upstream_cx_*` stats.
//! No lock is held across an await, except the per-host HTTP/2 connect lock (see `H2Pool`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use strait_xds::model::{RoutingPriority, Thresholds, UpstreamProtocol};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::body::ProxyBody;
use crate::cluster::{Breakers, ClusterInfo};
use crate::conn::{Counted, CountingIo};
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

struct IdleH1 {
    sender: http1::SendRequest<ProxyBody>,
    meta: Arc<ConnMeta>,
}

struct H2Conn {
    sender: http2::SendRequest<ProxyBody>,
    meta: Arc<ConnMeta>,
}

#[derive(Default)]
struct H1Pool {
    // A short critical section per acquire/release on one host; contention is per host only.
    idle: Mutex<Vec<IdleH1>>,
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

/// One host's connections.
#[derive(Clone)]
pub struct HostPool {
    shared: Arc<PoolShared>,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("addr", &self.shared.addr)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a push/pop/scan: a panic cannot leave the list inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl HostPool {
    pub fn new(info: Arc<ClusterInfo>, addr: SocketAddr, host_stats: Arc<HostStats>) -> HostPool {
        HostPool {
            shared: Arc::new(PoolShared::new(
                info,
                addr,
                host_stats,
                RoutingPriority::Default,
            )),
        }
    }

    /// The pool of the route's routing priority.
    fn for_priority(&self, priority: RoutingPriority) -> HostPool {
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
                HostPool {
                    shared: high.clone(),
                }
            }
        }
    }

    pub fn is_http2(&self) -> bool {
        matches!(
            self.shared.info.config.protocol,
            UpstreamProtocol::Http2 { .. }
        )
    }

    /// A connection ready for one DEFAULT-priority request; see [`Self::acquire_for`].
    pub async fn acquire(&self) -> Result<Conn, PoolError> {
        self.acquire_for(RoutingPriority::Default).await
    }

    /// A connection ready for one request of the route's `priority`: an idle or not-full one,
    /// else a new one (waiting as a pending request while that priority's connection breaker
    /// is full). Envoy's `upstream_cx_overflow` counts a request that found the connection
    /// breaker full, `upstream_rq_pending_overflow` one turned away by the pending breaker.
    pub async fn acquire_for(&self, priority: RoutingPriority) -> Result<Conn, PoolError> {
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
            conns.retain(|c| !c.meta.closed.load(Ordering::Acquire) && !c.sender.is_closed());
            for c in conns.iter() {
                let active = c.meta.active.load(Ordering::Acquire);
                if active < max_concurrent_streams.max(1) {
                    c.meta.begin();
                    return Some(Conn {
                        kind: ConnKind::H2(c.sender.clone(), c.meta.clone()),
                        pool: s.clone(),
                    });
                }
            }
            return None;
        }
        loop {
            let idle = lock(&s.h1.idle).pop()?;
            let mut sender = idle.sender;
            if sender.is_closed() || idle.meta.closed.load(Ordering::Acquire) {
                continue;
            }
            // The previous response just ended; the connection turns ready right after.
            if sender.ready().await.is_err() {
                continue;
            }
            idle.meta.begin();
            return Some(Conn {
                kind: ConnKind::H1(sender, idle.meta),
                pool: s.clone(),
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
        let io = TokioIo::new(CountingIo::new(stream, Counted::Upstream(s.info.clone())));
        let meta = Arc::new(ConnMeta {
            local,
            ..ConnMeta::default()
        });
        meta.begin();
        let kind = if let UpstreamProtocol::Http2 { .. } = s.info.config.protocol {
            let (sender, conn) = match http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
            {
                Ok(x) => x,
                Err(e) => return Err(fail(PoolError::ConnectFailure(e.to_string()))),
            };
            st.upstream_cx_http2_total.inc();
            self.spawn_driver(conn, meta.clone());
            let c = Arc::new(H2Conn {
                sender: sender.clone(),
                meta: meta.clone(),
            });
            lock(&s.h2.conns).push(c);
            ConnKind::H2(sender, meta)
        } else {
            let (sender, conn) = match http1::Builder::new().handshake(io).await {
                Ok(x) => x,
                Err(e) => return Err(fail(PoolError::ConnectFailure(e.to_string()))),
            };
            st.upstream_cx_http1_total.inc();
            self.spawn_driver(conn.with_upgrades(), meta.clone());
            ConnKind::H1(sender, meta)
        };
        st.upstream_cx_active.inc();
        s.host_stats.cx_active.inc();
        Ok(Conn {
            kind,
            pool: s.clone(),
        })
    }

    /// Drives one connection until it closes or stays idle for `idle_timeout`.
    fn spawn_driver<F>(&self, conn: F, meta: Arc<ConnMeta>)
    where
        F: Future<Output = Result<(), hyper::Error>> + Send + 'static,
    {
        let s = self.shared.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let idle = s.info.config.idle_timeout;
            let st = &s.info.stats;
            // The connection is busy when spawned: it cannot expire sooner than `d` from now.
            let mut sleep = idle.map(|d| Box::pin(tokio::time::sleep(d)));
            // The idle timer is polled only after its own wake-up, not on each of the
            // connection's (three per request on HTTP/1.1).
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
                Some(r) => {
                    if let Err(e) = r {
                        tracing::debug!(upstream = %s.addr, error = %e, "upstream connection failed");
                    }
                    st.upstream_cx_destroy_remote.inc();
                }
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

enum ConnKind {
    H1(http1::SendRequest<ProxyBody>, Arc<ConnMeta>),
    H2(http2::SendRequest<ProxyBody>, Arc<ConnMeta>),
}

/// A connection reserved for one request.
pub struct Conn {
    kind: ConnKind,
    pool: Arc<PoolShared>,
}

impl Conn {
    /// Sends the request; the lease must live until the response body ends (HTTP/1.1 reuse).
    pub fn send(
        self,
        req: Request<ProxyBody>,
    ) -> (
        impl Future<Output = Result<Response<Incoming>, hyper::Error>> + Send,
        Lease,
    ) {
        let Conn { kind, pool } = self;
        let (fut, lease) = match kind {
            ConnKind::H1(mut sender, meta) => {
                let fut = sender.send_request(req);
                (
                    futures_util::future::Either::Left(fut),
                    LeaseKind::H1(Some(sender), meta),
                )
            }
            ConnKind::H2(mut sender, meta) => {
                let fut = sender.send_request(req);
                (
                    futures_util::future::Either::Right(fut),
                    LeaseKind::H2(meta),
                )
            }
        };
        (
            fut,
            Lease {
                kind: lease,
                pool,
                reusable: false,
            },
        )
    }
}

enum LeaseKind {
    H1(Option<http1::SendRequest<ProxyBody>>, Arc<ConnMeta>),
    H2(Arc<ConnMeta>),
}

/// Holds a connection (HTTP/1.1) or a stream slot (HTTP/2) until the exchange ends.
pub struct Lease {
    kind: LeaseKind,
    pool: Arc<PoolShared>,
    reusable: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("addr", &self.pool.addr)
            .finish()
    }
}

impl Lease {
    /// The local address of the upstream connection.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.kind {
            LeaseKind::H1(_, meta) | LeaseKind::H2(meta) => meta.local,
        }
    }

    /// The exchange completed cleanly: an HTTP/1.1 connection may serve the next request.
    pub fn set_reusable(&mut self) {
        self.reusable = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        match &mut self.kind {
            LeaseKind::H1(sender, meta) => {
                meta.end();
                if let Some(sender) = sender.take() {
                    if self.reusable && !sender.is_closed() {
                        lock(&self.pool.h1.idle).push(IdleH1 {
                            sender,
                            meta: meta.clone(),
                        });
                    }
                }
            }
            LeaseKind::H2(meta) => meta.end(),
        }
        self.pool.freed.notify_one();
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
        let req = Request::builder()
            .uri("/")
            .header("host", "c")
            .body(crate::body::empty())
            .unwrap();
        let (fut, mut lease) = conn.send(req);
        let resp = fut.await.unwrap();
        assert_eq!(resp.status(), 200);
        lease.set_reusable();
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
}
