//! Runs the config plane for a running [`Server`]: the ADS client (servers taken from the
//! static clusters `ads_config` names), the `path_config_source` file watchers, and the task
//! that applies each accepted configuration. Marks the server LIVE once the initial fetch (or
//! the last-known-good store, after `initial_fetch_timeout`) gave a warm configuration.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use strait_xds::ads::{AdsClient, AdsConfig, AdsHandle, Handler, Protocol, Subscriptions, Update};
use strait_xds::dynamic::{files, Dynamic};
use strait_xds::model;
use tokio::task::JoinHandle;

use crate::admin::AdminSource;
use crate::server::ServerShared;

/// The running config plane; dropping it stops the ADS client and the watchers.
pub struct XdsRuntime {
    tasks: Vec<JoinHandle<()>>,
    ads: Option<AdsHandle>,
}

impl std::fmt::Debug for XdsRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsRuntime")
            .field("ads", &self.ads.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for XdsRuntime {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.ads.take();
    }
}

/// The control-plane addresses: every endpoint of each named static cluster, in order (the
/// order of `grpc_services` is the failover order). STRICT_DNS names are resolved once here.
pub async fn ads_servers(
    ads: &model::AdsSource,
    clusters: &[Arc<model::Cluster>],
) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for name in &ads.clusters {
        let Some(c) = clusters.iter().find(|c| &c.name == name) else {
            continue;
        };
        for group in &c.load_assignment.endpoints {
            for ep in &group.lb_endpoints {
                match &ep.address {
                    model::EndpointAddress::Ip(a) => out.push(*a),
                    model::EndpointAddress::Dns { host, port } => {
                        match tokio::net::lookup_host((host.as_str(), *port)).await {
                            Ok(addrs) => out.extend(addrs.take(1)),
                            Err(e) => {
                                tracing::error!(cluster = %name, %host, "xDS: cannot resolve control plane: {e}")
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// The ADS handler as the proxy runs it. Applying an update decodes and strictly translates
/// every changed resource (hundreds of milliseconds for 100k endpoints); on a multi-threaded
/// runtime that work runs under `block_in_place`, so the connections queued on this worker move
/// to another one instead of waiting behind the update.
struct OffWorker(Dynamic);

impl Handler for OffWorker {
    fn apply(&self, type_url: &str, version_info: &str, update: Update) -> Result<(), String> {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(|| self.0.apply(type_url, version_info, update))
        } else {
            self.0.apply(type_url, version_info, update)
        }
    }

    fn subscriptions(&self) -> tokio::sync::watch::Receiver<Subscriptions> {
        self.0.subscriptions()
    }

    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.0.versions(type_url)
    }

    fn connection_failed(&self) {
        self.0.connection_failed()
    }

    fn rejected(&self, type_url: &str) {
        self.0.rejected(type_url)
    }
}

/// Applies a configuration without holding a data-plane worker: building 10k clusters and
/// 100k hosts takes hundreds of milliseconds of CPU, and connections queued on the worker that
/// runs it would wait behind it. On a multi-threaded runtime this worker hands its queue to a
/// new one (`block_in_place`) and drives the update itself; tasks the update spawns (accept
/// loops, health checks, DNS refresh) still go to the runtime's workers.
async fn apply_off_worker(s: &Arc<ServerShared>, config: model::Bootstrap) {
    let old = s.snapshot();
    let handle = tokio::runtime::Handle::current();
    if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        tokio::task::block_in_place(|| handle.block_on(s.update(config)))
    } else {
        s.update(config).await
    }
    // A refused update keeps the old snapshot in service: nothing to release.
    if !Arc::ptr_eq(&old, &s.snapshot()) {
        retire(old);
    }
}

/// How long a replaced snapshot may stay in use before it is released anyway.
const RETIRE_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Releases a replaced snapshot on a blocking thread. Requests hold the snapshot they started
/// with; without this, the last of them would free the old clusters and hosts (100k hosts take
/// hundreds of milliseconds) on a data-plane worker, stalling every connection queued there.
fn retire(old: Arc<crate::server::Snapshot>) {
    tokio::spawn(async move {
        let until = tokio::time::Instant::now() + RETIRE_LIMIT;
        // It was swapped out: nobody can take a new reference, so the count only goes down.
        while Arc::strong_count(&old) > 1 && tokio::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = tokio::task::spawn_blocking(move || drop(old)).await;
    });
}

/// Starts the config plane for `server` on the current runtime.
pub async fn start(server: &Arc<ServerShared>, dynamic: Dynamic) -> XdsRuntime {
    let mut tasks = Vec::new();
    // Apply every published configuration, latest first: intermediate ones superseded while
    // an update ran are skipped. LIVE once a warm one is applied (`ready` is set before the
    // configuration that completes warming is published).
    let mut configs = dynamic.config();
    let ready = dynamic.ready();
    let s = server.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            let next = configs.borrow_and_update().clone();
            if let Some(cfg) = next {
                let started = std::time::Instant::now();
                apply_off_worker(&s, model::Bootstrap::clone(&cfg)).await;
                tracing::debug!(elapsed = ?started.elapsed(), "xDS: configuration applied");
                if *ready.borrow() {
                    s.set_live();
                }
            }
            if configs.changed().await.is_err() {
                return;
            }
        }
    }));
    tasks.push(files::spawn_watchers(dynamic.clone()));

    let ads = match dynamic.ads().cloned() {
        None => None,
        Some(a) => {
            let servers = ads_servers(&a, &dynamic.initial().clusters).await;
            let protocol = if a.delta {
                Protocol::Delta
            } else {
                Protocol::Sotw
            };
            tracing::info!(?servers, ?protocol, "xDS: ADS client starting");
            let cfg = AdsConfig::new(servers, protocol, dynamic.base().node.clone());
            let handler: Arc<dyn Handler> = Arc::new(OffWorker(dynamic.clone()));
            let handle = AdsClient::spawn(cfg, handler);
            let mut state = handle.state();
            let s = server.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let connected = state.borrow_and_update().connected;
                    s.stats().xds.connected_state.set(i64::from(connected));
                    if state.changed().await.is_err() {
                        return;
                    }
                }
            }));
            Some(handle)
        }
    };
    XdsRuntime { tasks, ads }
}
