//! The running proxy: binds admin and listeners, owns the active config [`Snapshot`] (swapped
//! whole through `ArcSwap`, read once per request), runs DNS refresh, and drains gracefully.
//! It is also the [`AdminSource`] the admin server reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use strait_xds::model;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::access_log::AccessLogger;
use crate::admin::{self, AdminSource, ClusterView, ServerState};
use crate::cluster::{ClusterManager, ClusterState};
use crate::listener;
use crate::stats::{HttpStats, ListenerStats, Store};

/// How the server runs, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub concurrency: usize,
    /// How long in-flight requests may finish after shutdown starts.
    pub drain_time: Duration,
    /// Shown by `/server_info`.
    pub command_line_options: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {what} on {address}: {source}")]
    Bind {
        what: String,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener {listener}: cannot open access log: {source}")]
    AccessLog {
        listener: String,
        source: std::io::Error,
    },
}

/// Resolves once draining has started (never, if the server is gone).
pub async fn drained(rx: &mut watch::Receiver<bool>) {
    // The `Ref` returned by `wait_for` is not `Send`; drop it before any other await.
    let started = rx.wait_for(|d| *d).await.is_ok();
    if !started {
        std::future::pending::<()>().await;
    }
}

/// [`drained`], owning its receiver: a wait that can be kept across the turns of a loop.
pub async fn drained_owned(mut rx: watch::Receiver<bool>) {
    drained(&mut rx).await
}

/// One listener's built state: config, stats blocks, access logger. A listener updated in
/// place (same name and address) gets a new generation; connections keep the generation they
/// were accepted with but read routes from [`ListenerRuntime::hcm`], shared by all generations.
#[derive(Debug)]
pub struct ListenerRuntime {
    pub name: String,
    /// The bound address.
    pub address: SocketAddr,
    pub http_stats: Arc<HttpStats>,
    pub listener_stats: Arc<ListenerStats>,
    pub access_log: Option<Arc<AccessLogger>>,
    live: Arc<ListenerLive>,
}

/// What every generation of one listener shares. Old generations (held by open connections)
/// do not pin the configuration they were built from: only the latest one is referenced.
#[derive(Debug)]
struct ListenerLive {
    config: ArcSwap<model::Listener>,
    drain: watch::Sender<bool>,
}

impl ListenerRuntime {
    /// The connection manager (routes, filters, timeouts) a new request uses: the latest one,
    /// so an RDS update reaches connections that are already open.
    pub fn hcm(&self) -> Arc<model::HttpConnectionManager> {
        self.live.config.load().hcm.clone()
    }

    /// The listener's latest configuration.
    pub fn config(&self) -> Arc<model::Listener> {
        self.live.config.load_full()
    }

    /// Becomes `true` when this listener drains (removed by LDS, or server shutdown).
    pub fn drain_rx(&self) -> watch::Receiver<bool> {
        self.live.drain.subscribe()
    }
}

/// Everything a request reads, from one configuration.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<model::Bootstrap>,
    pub clusters: ClusterManager,
    pub listeners: Vec<Arc<ListenerRuntime>>,
}

/// A bound listener, as the config path sees it.
#[derive(Debug)]
struct ListenerHandle {
    /// The generation new connections get.
    slot: Arc<ArcSwap<ListenerRuntime>>,
    /// One accept loop, or one per per-core worker (each on its own `SO_REUSEPORT` socket).
    accept: Vec<JoinHandle<()>>,
}

impl ListenerHandle {
    fn abort(&self) {
        for a in &self.accept {
            a.abort();
        }
    }
}

/// Per-core workers (`--worker-model per-core`): one current-thread runtime per OS thread, each
/// with its own `SO_REUSEPORT` socket per listener, so the kernel spreads connections and a
/// connection is served where it was accepted. Dropping this stops the workers and joins them.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stop: watch::Sender<bool>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Workers {
    /// Starts `n` (at least 1) worker threads, each running its own current-thread runtime;
    /// each first runs `on_start` (the binary's allocator set-up for its workers).
    pub fn start(n: usize, on_start: fn()) -> std::io::Result<Arc<Workers>> {
        crate::pool::set_workers(n);
        let (stop, _) = watch::channel(false);
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let mut stop_rx = stop.subscribe();
            let thread = std::thread::Builder::new()
                .name(format!("strait-worker-{i}"))
                .spawn(move || {
                    on_start();
                    crate::pool::set_worker(i);
                    rt.block_on(async move {
                        let _ = stop_rx.wait_for(|s| *s).await;
                    });
                });
            match thread {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop.send_replace(true);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(Arc::new(Workers {
            handles,
            stop,
            threads: std::sync::Mutex::new(threads),
        }))
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Resolves once every worker has run what was spawned on it before this call (its
    /// runtime takes tasks from other threads in order).
    pub async fn settled(&self) {
        for h in &self.handles {
            let _ = h.spawn(async {}).await;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Stops the workers (their tasks are dropped) and joins their threads; idempotent. Call
    /// after the server drained: connections still open on a worker end abruptly.
    pub fn stop(&self) {
        self.stop.send_replace(true);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let me = std::thread::current().id();
        for t in threads {
            // A worker dropping the last reference would otherwise join itself.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Config-path state: what `update` diffs against. Never touched by requests.
#[derive(Debug, Default)]
struct Control {
    listeners: HashMap<String, ListenerHandle>,
    /// DNS refresh tasks of STRICT_DNS clusters, by cluster name.
    dns: HashMap<String, JoinHandle<()>>,
    /// The EDS assignment last applied to each cluster.
    eds: HashMap<String, Arc<model::LoadAssignment>>,
}

const STATE_INIT: u8 = 0;
const STATE_LIVE: u8 = 1;
const STATE_DRAINING: u8 = 2;

/// State shared by the listeners, the requests and the admin server.
#[derive(Debug)]
pub struct ServerShared {
    snapshot: ArcSwap<Snapshot>,
    stats: Arc<Store>,
    state: AtomicU8,
    /// Notified when `state` leaves INITIALIZING (`wait_live`).
    became_live: tokio::sync::Notify,
    start_time: SystemTime,
    command_line_options: serde_json::Value,
    drain_tx: watch::Sender<bool>,
    drain_time: Duration,
    active: AtomicUsize,
    idle: Notify,
    control: std::sync::Mutex<Control>,
    /// Serialises config updates.
    updating: tokio::sync::Mutex<()>,
    /// Per-core workers that accept and serve connections; `None`: the current runtime does.
    workers: Option<Arc<Workers>>,
}

/// Keeps [`Server::wait`] waiting while a connection or tunnel is open.
pub struct Track(Arc<ServerShared>);

impl Drop for Track {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl ServerShared {
    /// The active configuration; a request loads it once and keeps it to its end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Becomes `true` when draining starts.
    pub fn drain_rx(&self) -> watch::Receiver<bool> {
        self.drain_tx.subscribe()
    }

    pub fn drain_time(&self) -> Duration {
        self.drain_time
    }

    pub fn track(self: &Arc<Self>) -> Track {
        self.active.fetch_add(1, Ordering::AcqRel);
        Track(self.clone())
    }

    fn begin_drain(&self) {
        self.state.store(STATE_DRAINING, Ordering::Release);
        self.became_live.notify_waiters();
        self.stats.server.live.set(0);
        self.drain_tx.send_replace(true);
        for l in self.control().listeners.values() {
            l.slot.load().live.drain.send_replace(true);
        }
    }

    fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        // Updates commit each map entry in one step, so a poisoned lock is still consistent.
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the server LIVE (`/ready` 200) unless it is draining: after the initial xDS fetch.
    pub fn set_live(&self) {
        if self
            .state
            .compare_exchange(STATE_INIT, STATE_LIVE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.stats.server.live.set(1);
            self.became_live.notify_waiters();
        }
    }

    /// Resolves once the server is LIVE (true, at once if it is already) or draining (false).
    pub async fn wait_live(&self) -> bool {
        loop {
            let live = self.became_live.notified();
            tokio::pin!(live);
            live.as_mut().enable();
            match self.state.load(Ordering::Acquire) {
                STATE_LIVE => return true,
                STATE_INIT => live.await,
                _ => return false,
            }
        }
    }

    async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.active.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }
}

impl AdminSource for ServerShared {
    fn state(&self) -> ServerState {
        match self.state.load(Ordering::Acquire) {
            STATE_LIVE => ServerState::Live,
            STATE_DRAINING => ServerState::Draining,
            _ => ServerState::Initializing,
        }
    }

    fn stats(&self) -> &Store {
        &self.stats
    }

    fn config(&self) -> Arc<model::Bootstrap> {
        self.snapshot.load().config.clone()
    }

    fn listeners(&self) -> Vec<(String, SocketAddr)> {
        self.snapshot
            .load()
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.address))
            .collect()
    }

    fn clusters(&self) -> Vec<ClusterView> {
        self.snapshot
            .load()
            .clusters
            .all()
            .iter()
            .map(|c| c.view())
            .collect()
    }

    fn start_time(&self) -> SystemTime {
        self.start_time
    }

    fn command_line_options(&self) -> serde_json::Value {
        self.command_line_options.clone()
    }

    fn begin_shutdown(&self) {
        self.begin_drain();
    }
}

/// The running proxy.
#[derive(Debug)]
pub struct Server {
    shared: Arc<ServerShared>,
    admin_address: Option<SocketAddr>,
    /// The admin server: stopped by `wait`.
    background: Vec<JoinHandle<()>>,
}

/// One `SO_REUSEPORT` socket for `address`, registered with (so accepting on) `worker`.
fn bind_reuseport(
    address: SocketAddr,
    worker: &tokio::runtime::Handle,
) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` (mio): SO_REUSEADDR and a backlog of 1024.
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(address)?;
    let _entered = worker.enter();
    socket.listen(1024)
}

/// One socket per worker on the same address (the first fixes a port-0 listener's port).
fn bind_workers(
    what: String,
    address: SocketAddr,
    workers: &Workers,
) -> Result<Vec<TcpListener>, StartError> {
    let mut out = Vec::with_capacity(workers.len());
    let mut at = address;
    for h in &workers.handles {
        let tcp = bind_reuseport(at, h).map_err(|source| StartError::Bind {
            what: what.clone(),
            address,
            source,
        })?;
        if let Ok(a) = tcp.local_addr() {
            at = a;
        }
        out.push(tcp);
    }
    Ok(out)
}

async fn bind(what: String, address: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind {
            what,
            address,
            source,
        })
}

impl Server {
    /// Binds the admin and every listener (errors name the address), warms clusters (STRICT_DNS
    /// resolved once, first health checks), then starts accepting, the admin server and DNS
    /// refresh, and goes LIVE. Call inside a tokio runtime.
    pub async fn start(config: model::Bootstrap, opts: Options) -> Result<Server, StartError> {
        let server = Server::start_initializing(config, opts).await?;
        server.shared.set_live();
        Ok(server)
    }

    /// As [`Server::start`], but stays INITIALIZING (`/ready` 503) until
    /// [`ServerShared::set_live`]: for configurations that wait for xDS.
    pub async fn start_initializing(
        config: model::Bootstrap,
        opts: Options,
    ) -> Result<Server, StartError> {
        Server::start_initializing_on(config, opts, None).await
    }

    /// As [`Server::start_initializing`]; with `workers`, listeners accept and serve on those
    /// per-core runtimes instead of the current one (admin, xDS, DNS and health checks stay on
    /// the current runtime).
    pub async fn start_initializing_on(
        config: model::Bootstrap,
        opts: Options,
        workers: Option<Arc<Workers>>,
    ) -> Result<Server, StartError> {
        let stats = Store::new();
        stats.server.concurrency.set(opts.concurrency as i64);
        let admin_tcp = match &config.admin {
            Some(a) => Some(bind("admin".into(), a.address).await?),
            None => None,
        };
        let admin_address = admin_tcp.as_ref().and_then(|t| t.local_addr().ok());
        let (drain_tx, _) = watch::channel(false);
        let empty = model::Bootstrap {
            node: config.node.clone(),
            admin: config.admin.clone(),
            dump: config.dump.clone(),
            dynamic: config.dynamic.clone(),
            ..Default::default()
        };
        let shared = Arc::new(ServerShared {
            snapshot: ArcSwap::from_pointee(Snapshot {
                config: Arc::new(empty),
                clusters: ClusterManager::default(),
                listeners: Vec::new(),
            }),
            stats,
            state: AtomicU8::new(STATE_INIT),
            became_live: tokio::sync::Notify::new(),
            start_time: SystemTime::now(),
            command_line_options: opts.command_line_options,
            drain_tx,
            drain_time: opts.drain_time,
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            control: Default::default(),
            updating: tokio::sync::Mutex::new(()),
            workers,
        });
        let mut background = Vec::new();
        // Admin answers during initialization (`/ready`: 503 until LIVE), as Envoy's does.
        if let Some(tcp) = admin_tcp {
            let source: Arc<dyn AdminSource> = shared.clone();
            background.push(tokio::spawn(admin::serve(tcp, source)));
        }
        shared.apply(config, true).await?;
        Ok(Server {
            shared,
            admin_address,
            background,
        })
    }

    /// Applies a new configuration (an xDS update) without dropping traffic: clusters and
    /// listeners that did not change are kept as they are; see [`ServerShared::update`].
    pub async fn update(&self, config: model::Bootstrap) {
        self.shared.update(config).await
    }

    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin_address
    }

    pub fn listener_addresses(&self) -> Vec<(String, SocketAddr)> {
        self.shared.listeners()
    }

    /// The state requests and the admin server share (stats, snapshot).
    pub fn shared(&self) -> &Arc<ServerShared> {
        &self.shared
    }

    /// Begins a graceful drain (idempotent): listeners stop accepting, HTTP/1.1 connections
    /// close after their current response, HTTP/2 connections get GOAWAY, and in-flight
    /// requests have `drain_time` to finish.
    pub fn shutdown(&self) {
        self.shared.begin_drain();
    }

    /// Resolves once shutdown was requested (by `shutdown()` or `POST /quitquitquit`) and the
    /// drain ended.
    pub async fn wait(self) {
        let mut drain = self.shared.drain_rx();
        crate::server::drained(&mut drain).await;
        let (accepts, dns): (Vec<_>, Vec<_>) = {
            let mut c = self.shared.control();
            (
                c.listeners.drain().map(|(_, l)| l.accept).collect(),
                c.dns.drain().map(|(_, t)| t).collect(),
            )
        };
        for h in accepts.iter().flatten() {
            h.abort();
        }
        // Every connection bounds itself by drain_time; the margin covers the last writes.
        let bound = self.shared.drain_time + Duration::from_secs(1);
        let _ = tokio::time::timeout(bound, self.shared.wait_idle()).await;
        for l in &self.shared.snapshot().listeners {
            if let Some(a) = &l.access_log {
                a.flush();
            }
        }
        for h in self.background.iter().chain(&dns) {
            h.abort();
        }
    }
}

// === Updates ===

impl ServerShared {
    /// Applies a new configuration off the request path and swaps it in:
    /// - clusters whose config is the same `Arc` keep their state (hosts, pools, stats, health);
    ///   EDS assignments go through `update_endpoints`, keeping hosts that stay;
    /// - listeners that are the same `Arc` are untouched; one with the same name and address gets
    ///   a new generation (open connections use its routes on their next request); a new one is
    ///   bound; a removed one stops accepting and drains its connections.
    ///
    /// Requests in flight finish on the snapshot they started with.
    pub async fn update(self: &Arc<Self>, config: model::Bootstrap) {
        if let Err(e) = self.apply(config, false).await {
            tracing::error!("config update: {e}");
        }
    }

    async fn apply(
        self: &Arc<Self>,
        config: model::Bootstrap,
        strict: bool,
    ) -> Result<(), StartError> {
        let _serial = self.updating.lock().await;
        let old = self.snapshot();
        let config = Arc::new(config);

        // Clusters.
        let mut states = Vec::with_capacity(config.clusters.len());
        let mut fresh = Vec::new();
        for c in &config.clusters {
            match old.clusters.get(&c.name) {
                Some(cs) if Arc::ptr_eq(&cs.info.config, c) => states.push(cs.clone()),
                _ => {
                    let cs = ClusterState::new(c.clone(), &self.stats);
                    fresh.push(cs.clone());
                    states.push(cs);
                }
            }
        }
        {
            let mut control = self.control();
            control.eds.retain(|n, _| config.eds.contains_key(n));
            for cs in &states {
                let Some(la) = config.eds.get(cs.name()) else {
                    continue;
                };
                let is_fresh = fresh.iter().any(|f| Arc::ptr_eq(f, cs));
                let applied = control.eds.get(cs.name());
                if is_fresh || applied.is_none_or(|a| !Arc::ptr_eq(a, la)) {
                    cs.update_endpoints(la);
                    control.eds.insert(cs.name().to_string(), la.clone());
                }
            }
        }
        // Warming: new STRICT_DNS clusters resolve once, new clusters run their first checks.
        let dns: Vec<_> = fresh
            .iter()
            .filter(|c| c.info.config.discovery == model::DiscoveryType::StrictDns)
            .cloned()
            .collect();
        futures_util::future::join_all(dns.iter().map(|c| c.resolve())).await;
        futures_util::future::join_all(fresh.iter().map(|c| c.start_health())).await;
        {
            let mut control = self.control();
            for c in &dns {
                if let Some(t) = control.dns.remove(c.name()) {
                    t.abort();
                }
                control
                    .dns
                    .insert(c.name().to_string(), tokio::spawn(c.clone().run_dns()));
            }
            // DNS tasks of clusters that left or were replaced by a non-DNS cluster.
            control.dns.retain(|name, task| {
                let keep = states.iter().any(|s| {
                    s.name() == name && s.info.config.discovery == model::DiscoveryType::StrictDns
                });
                if !keep {
                    task.abort();
                }
                keep
            });
        }

        // Listeners.
        let mut runtimes = Vec::with_capacity(config.listeners.len());
        let mut to_bind = Vec::new();
        let mut to_drain = Vec::new();
        {
            let mut control = self.control();
            let mut keep = HashMap::new();
            for l in &config.listeners {
                match control.listeners.remove(&l.name) {
                    Some(h) => {
                        let cur = h.slot.load_full();
                        let cur_config = cur.config();
                        if Arc::ptr_eq(&cur_config, l) {
                            runtimes.push(cur);
                            keep.insert(l.name.clone(), h);
                        } else if cur_config.address == l.address || cur.address == l.address {
                            // Same socket (a port-0 listener also matches its bound port): a
                            // new generation, no rebind. Open connections pick up new routes
                            // and filters on their next request; a change they cannot pick up
                            // (settings fixed when a connection starts) gives the new
                            // generation its own connections and drains the old ones gradually.
                            let reconnect = fixed_per_connection_changed(&cur_config, l);
                            let live = (!reconnect).then(|| cur.live.clone());
                            match self.runtime(l, cur.address, live) {
                                Ok(rt) => {
                                    rt.live.config.store(l.clone());
                                    h.slot.store(rt.clone());
                                    runtimes.push(rt);
                                    if reconnect {
                                        tracing::info!(listener = %l.name, "listener connection settings changed: draining its open connections");
                                        cur.live.drain.send_replace(true);
                                    }
                                }
                                Err(e) => {
                                    tracing::error!("{e}; keeping the previous listener");
                                    runtimes.push(cur);
                                }
                            }
                            keep.insert(l.name.clone(), h);
                        } else {
                            to_drain.push(h);
                            to_bind.push(l.clone());
                        }
                    }
                    None => to_bind.push(l.clone()),
                }
            }
            to_drain.extend(control.listeners.drain().map(|(_, h)| h));
            control.listeners = keep;
        }
        for h in to_drain {
            let rt = h.slot.load_full();
            tracing::info!(listener = %rt.name, "listener removed: draining");
            h.abort();
            rt.live.drain.send_replace(true);
        }
        for l in to_bind {
            let what = format!("listener {}", l.name);
            let bound = match &self.workers {
                Some(w) => bind_workers(what, l.address, w),
                None => bind(what, l.address).await.map(|t| vec![t]),
            };
            let tcps = match bound {
                Ok(t) => t,
                Err(e) if !strict => {
                    tracing::error!("{e}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let address = tcps
                .first()
                .and_then(|t| t.local_addr().ok())
                .unwrap_or(l.address);
            let rt = match self.runtime(&l, address, None) {
                Ok(rt) => rt,
                Err(e) if !strict => {
                    tracing::error!("{e}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let slot = Arc::new(ArcSwap::new(rt.clone()));
            let accept = match &self.workers {
                Some(w) => tcps
                    .into_iter()
                    .zip(&w.handles)
                    .enumerate()
                    .map(|(i, (tcp, h))| {
                        // Envoy's per-worker block: `listener.<address>.worker_<N>.`.
                        let stat = format!("{}_{}.worker_{i}", address.ip(), address.port());
                        let ws = Some(self.stats.listener(&stat));
                        h.spawn(listener::accept_loop(tcp, slot.clone(), self.clone(), ws))
                    })
                    .collect(),
                None => tcps
                    .into_iter()
                    .map(|tcp| {
                        tokio::spawn(listener::accept_loop(tcp, slot.clone(), self.clone(), None))
                    })
                    .collect(),
            };
            if !strict {
                tracing::info!(listener = %l.name, %address, "listener added");
            }
            runtimes.push(rt);
            self.control()
                .listeners
                .insert(l.name.clone(), ListenerHandle { slot, accept });
        }
        if *self.drain_tx.borrow() {
            // Added while shutting down: drain at once.
            for l in self.control().listeners.values() {
                l.slot.load().live.drain.send_replace(true);
            }
        }

        self.stats.xds.active_clusters.set(states.len() as i64);
        self.stats
            .xds
            .total_listeners_active
            .set(runtimes.len() as i64);
        self.snapshot.store(Arc::new(Snapshot {
            config,
            clusters: ClusterManager::from_states(states),
            listeners: runtimes,
        }));
        Ok(())
    }

    fn runtime(
        &self,
        l: &Arc<model::Listener>,
        address: SocketAddr,
        live: Option<Arc<ListenerLive>>,
    ) -> Result<Arc<ListenerRuntime>, StartError> {
        let access_log =
            AccessLogger::new(&l.hcm.access_logs).map_err(|source| StartError::AccessLog {
                listener: l.name.clone(),
                source,
            })?;
        // Envoy names listener stats by address, with `:` made `_`.
        let stat_name = format!("{}_{}", address.ip(), address.port());
        let live = live.unwrap_or_else(|| {
            Arc::new(ListenerLive {
                config: ArcSwap::new(l.clone()),
                drain: watch::channel(false).0,
            })
        });
        Ok(Arc::new(ListenerRuntime {
            name: l.name.clone(),
            address,
            http_stats: self.stats.http(&l.hcm.stat_prefix),
            listener_stats: self.stats.listener(&stat_name),
            access_log,
            live,
        }))
    }
}

/// Whether a listener update changes what a connection fixes when it starts (the codec and
/// its header limits in `conn`, the stat block and access loggers in its `ListenerRuntime`),
/// so that open connections must be replaced rather than updated in place.
fn fixed_per_connection_changed(old: &model::Listener, new: &model::Listener) -> bool {
    let (a, b) = (&old.hcm, &new.hcm);
    a.codec_type != b.codec_type
        || a.max_request_headers_kb != b.max_request_headers_kb
        || a.request_headers_timeout != b.request_headers_timeout
        || a.stat_prefix != b.stat_prefix
        || a.access_logs != b.access_logs
}
