//! The running proxy: binds admin and listeners, owns the active config [`Snapshot`] (swapped
//! whole through `ArcSwap`, read once per request), runs DNS refresh, and drains gracefully.
//! It is also the [`AdminSource`] the admin server reads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use strait_xds::model;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::access_log::AccessLogger;
use crate::admin::{self, AdminSource, ClusterView, ServerState};
use crate::cluster::ClusterManager;
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

/// One listener's built state: config, stats blocks, access logger.
#[derive(Debug)]
pub struct ListenerRuntime {
    pub config: Arc<model::Listener>,
    pub address: SocketAddr,
    pub http_stats: Arc<HttpStats>,
    pub listener_stats: Arc<ListenerStats>,
    pub access_log: Option<Arc<AccessLogger>>,
}

/// Everything a request reads, from one configuration.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<model::Bootstrap>,
    pub clusters: ClusterManager,
    pub listeners: Vec<Arc<ListenerRuntime>>,
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
    start_time: SystemTime,
    command_line_options: serde_json::Value,
    drain_tx: watch::Sender<bool>,
    drain_time: Duration,
    active: AtomicUsize,
    idle: Notify,
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
        self.stats.server.live.set(0);
        self.drain_tx.send_replace(true);
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
            .map(|l| (l.config.name.clone(), l.address))
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
    /// Admin server and DNS refresh: stopped by `wait`.
    background: Vec<JoinHandle<()>>,
    accept_loops: Vec<JoinHandle<()>>,
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
    /// Binds the admin and every listener (errors name the address), resolves STRICT_DNS
    /// clusters once (Envoy's cluster warming), then starts accepting, the admin server and DNS
    /// refresh. Call inside a tokio runtime.
    pub async fn start(config: model::Bootstrap, opts: Options) -> Result<Server, StartError> {
        let stats = Store::new();
        stats.server.concurrency.set(opts.concurrency as i64);
        let config = Arc::new(config);
        let clusters = ClusterManager::new(&config.clusters, &stats);
        let admin_tcp = match &config.admin {
            Some(a) => Some(bind("admin".into(), a.address).await?),
            None => None,
        };
        let admin_address = admin_tcp.as_ref().and_then(|t| t.local_addr().ok());
        let mut bound = Vec::new();
        let mut runtimes = Vec::new();
        for l in &config.listeners {
            let tcp = bind(format!("listener {}", l.name), l.address).await?;
            let address = tcp.local_addr().unwrap_or(l.address);
            let access_log =
                AccessLogger::new(&l.hcm.access_logs).map_err(|source| StartError::AccessLog {
                    listener: l.name.clone(),
                    source,
                })?;
            // Envoy names listener stats by address, with `:` made `_`.
            let stat_name = format!("{}_{}", address.ip(), address.port());
            let rt = Arc::new(ListenerRuntime {
                config: l.clone(),
                address,
                http_stats: stats.http(&l.hcm.stat_prefix),
                listener_stats: stats.listener(&stat_name),
                access_log,
            });
            runtimes.push(rt.clone());
            bound.push((tcp, rt));
        }
        let (drain_tx, _) = watch::channel(false);
        let shared = Arc::new(ServerShared {
            snapshot: ArcSwap::from_pointee(Snapshot {
                config: config.clone(),
                clusters,
                listeners: runtimes,
            }),
            stats,
            state: AtomicU8::new(STATE_INIT),
            start_time: SystemTime::now(),
            command_line_options: opts.command_line_options,
            drain_tx,
            drain_time: opts.drain_time,
            active: AtomicUsize::new(0),
            idle: Notify::new(),
        });
        let mut background = Vec::new();
        // Admin answers during initialization (`/ready`: 503 until LIVE), as Envoy's does.
        if let Some(tcp) = admin_tcp {
            let source: Arc<dyn AdminSource> = shared.clone();
            background.push(tokio::spawn(admin::serve(tcp, source)));
        }
        // Cluster warming: STRICT_DNS clusters resolve once before listeners accept.
        let snapshot = shared.snapshot();
        let dns: Vec<_> = snapshot
            .clusters
            .all()
            .iter()
            .filter(|c| c.info.config.discovery == model::DiscoveryType::StrictDns)
            .cloned()
            .collect();
        futures_util::future::join_all(dns.iter().map(|c| c.resolve())).await;
        background.extend(dns.into_iter().map(|c| tokio::spawn(c.run_dns())));
        let accept_loops = bound
            .into_iter()
            .map(|(tcp, rt)| tokio::spawn(listener::accept_loop(tcp, rt, shared.clone())))
            .collect();
        shared.state.store(STATE_LIVE, Ordering::Release);
        shared.stats.server.live.set(1);
        Ok(Server {
            shared,
            admin_address,
            background,
            accept_loops,
        })
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
        for h in &self.accept_loops {
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
        for h in &self.background {
            h.abort();
        }
    }
}
