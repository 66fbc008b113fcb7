//! Reference ADS control plane (SotW and Delta) for tests, demos and small deployments: serves
//! resource sets held in memory or read from a directory, pushes a new version to every stream
//! when they change, and records what each client ACKed or NACKed. Not on Strait's data path.

mod delta;
mod files;
mod sotw;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

pub use files::load_dir;

/// Requests kept for [`ControlPlane::seen`].
const SEEN_LIMIT: usize = 10_000;

/// Resources by type URL, then by name.
pub type Resources = BTreeMap<String, BTreeMap<String, Any>>;

/// One published version of everything the control plane serves.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Bumped on every publish; the SotW `version_info` of every response.
    pub version: u64,
    pub resources: Resources,
}

/// One request a client sent, as the control plane understood it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Streams are numbered from 1 in the order they opened.
    pub stream: u64,
    pub delta: bool,
    pub node_id: String,
    pub type_url: String,
    /// SotW only.
    pub version_info: String,
    pub response_nonce: String,
    /// SotW `resource_names`, or Delta `resource_names_subscribe`.
    pub names: Vec<String>,
    /// Delta `resource_names_unsubscribe`.
    pub unsubscribe: Vec<String>,
    /// Delta `initial_resource_versions`, sorted.
    pub initial_versions: BTreeMap<String, String>,
    /// The NACK's `error_detail.message`.
    pub error: Option<String>,
    /// The nonce was not the last one sent for the type, so the request was ignored (SotW).
    pub stale: bool,
}

impl Seen {
    /// An ACK: answers a response, with no error.
    pub fn is_ack(&self) -> bool {
        !self.response_nonce.is_empty() && self.error.is_none() && !self.stale
    }

    /// A NACK.
    pub fn is_nack(&self) -> bool {
        self.error.is_some()
    }
}

struct Inner {
    snapshot: watch::Sender<Arc<Snapshot>>,
    staged: Mutex<Resources>,
    seen: watch::Sender<Vec<Seen>>,
    streams: AtomicU64,
    nonces: AtomicU64,
}

/// A control plane; clones share state.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

impl Default for ControlPlane {
    fn default() -> Self {
        ControlPlane::new()
    }
}

impl ControlPlane {
    /// An empty control plane (version 0, no resources).
    pub fn new() -> Self {
        let (snapshot, _) = watch::channel(Arc::new(Snapshot::default()));
        let (seen, _) = watch::channel(Vec::new());
        ControlPlane {
            inner: Arc::new(Inner {
                snapshot,
                staged: Mutex::new(Resources::new()),
                seen,
                streams: AtomicU64::new(0),
                nonces: AtomicU64::new(0),
            }),
        }
    }

    /// Stages the whole set of `type_url` (any type URL, so tests can serve what a client must
    /// refuse); [`push`](Self::push) publishes it. Names come from the bodies, as
    /// [`crate::ads::resource_name`] reads them.
    pub fn set_resources(&self, type_url: &str, bodies: Vec<Any>) -> Result<(), String> {
        let mut set = BTreeMap::new();
        for (i, body) in bodies.into_iter().enumerate() {
            let name = crate::ads::resource_name(type_url, &body)
                .map_err(|e| format!("{type_url}[{i}]: {e}"))?;
            if set.insert(name.clone(), body).is_some() {
                return Err(format!("{type_url}[{i}]: duplicate name {name:?}"));
            }
        }
        self.staged().insert(type_url.to_string(), set);
        Ok(())
    }

    /// Stages a resource under an explicit name without looking inside it (for serving bodies
    /// a client must reject).
    pub fn set_raw(&self, type_url: &str, name: &str, body: Any) {
        self.staged()
            .entry(type_url.to_string())
            .or_default()
            .insert(name.to_string(), body);
    }

    /// Stages everything at once, replacing all types.
    pub fn replace_all(&self, resources: Resources) {
        *self.staged() = resources;
    }

    /// Publishes the staged resources as a new version, unless they equal the current ones.
    /// Returns the version now served.
    pub fn push(&self) -> u64 {
        let staged = self.staged().clone();
        let mut version = 0;
        self.inner.snapshot.send_if_modified(|cur| {
            if cur.resources == staged && cur.version != 0 {
                version = cur.version;
                return false;
            }
            version = cur.version + 1;
            *cur = Arc::new(Snapshot {
                version,
                resources: staged,
            });
            true
        });
        version
    }

    /// The snapshot being served.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.borrow().clone()
    }

    /// The requests received so far (the latest 10 000).
    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.borrow().clone()
    }

    /// Waits until `pred` holds for the requests received so far, up to `timeout`.
    pub async fn wait_seen(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[Seen]) -> bool,
    ) -> Result<Vec<Seen>, Vec<Seen>> {
        let mut rx = self.inner.seen.subscribe();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|v| pred(v))).await;
        match waited {
            Ok(Ok(v)) => Ok(v.clone()),
            _ => Err(self.seen()),
        }
    }

    /// Loads `dir` (see [`load_dir`]), publishes it, and keeps polling it every `interval`:
    /// a change that loads is published as a new version; one that does not is logged and the
    /// previous resources stay served.
    ///
    /// Polling modification times rather than `notify`: no new dependency, it sees changes on
    /// every filesystem (bind mounts, overlays, NFS) where inotify may not, and 200 ms of
    /// latency does not matter for a control plane.
    pub fn watch_dir(
        &self,
        dir: impl Into<PathBuf>,
        interval: Duration,
    ) -> Result<JoinHandle<()>, String> {
        let dir = dir.into();
        let (resources, mut fingerprint) = files::load_with_fingerprint(&dir)?;
        self.replace_all(resources);
        self.push();
        let cp = self.clone();
        Ok(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = files::fingerprint(&dir);
                if now == fingerprint {
                    continue;
                }
                fingerprint = now;
                match files::load_with_fingerprint(&dir) {
                    Ok((resources, fp)) => {
                        fingerprint = fp;
                        cp.replace_all(resources);
                        let v = cp.push();
                        tracing::info!(dir = %dir.display(), version = v, "control plane: reloaded");
                    }
                    Err(e) => {
                        tracing::error!(dir = %dir.display(), "control plane: keeping the previous resources: {e}")
                    }
                }
            }
        }))
    }

    /// Serves ADS on `listener` until the returned handle is stopped or dropped.
    pub fn spawn(&self, listener: TcpListener) -> ServerHandle {
        let (stop_tx, stop_rx) = watch::channel(false);
        let svc = Service {
            cp: self.clone(),
            stop: stop_rx.clone(),
        };
        let mut stop_signal = stop_rx;
        let task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(svc))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    let _ = stop_signal.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!("control plane server: {e}");
            }
        });
        ServerHandle {
            stop: stop_tx,
            task: Some(task),
        }
    }

    /// Serves the resources of `dir` (watched every 200 ms) on `listener` until the process ends.
    pub async fn serve(listener: TcpListener, dir: impl Into<PathBuf>) -> Result<(), String> {
        let cp = ControlPlane::new();
        let _watch = cp.watch_dir(dir, Duration::from_millis(200))?;
        let mut server = cp.spawn(listener);
        match server.task.take() {
            Some(task) => task.await.map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, Resources> {
        // A poisoned lock only means a panic elsewhere while staging; the map is still whole.
        self.inner
            .staged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn next_nonce(&self) -> String {
        (self.inner.nonces.fetch_add(1, Ordering::Relaxed) + 1).to_string()
    }

    pub(crate) fn record(&self, seen: Seen) {
        self.inner.seen.send_modify(|v| {
            // A long-running server keeps only the recent past.
            if v.len() >= SEEN_LIMIT {
                v.drain(..SEEN_LIMIT / 10);
            }
            v.push(seen)
        });
    }
}

/// A running server: [`stop`](Self::stop) closes every stream and the listener.
pub struct ServerHandle {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Ends every stream, stops accepting, and waits for the server to finish.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

// === impl Service ===

struct Service {
    cp: ControlPlane,
    stop: watch::Receiver<bool>,
}

type Out<T> = ReceiverStream<Result<T, tonic::Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        let id = self.cp.inner.streams.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::spawn(sotw::run(
            self.cp.clone(),
            id,
            request.into_inner(),
            tx,
            self.stop.clone(),
        ));
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let (tx, rx) = mpsc::channel(16);
        let id = self.cp.inner.streams.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::spawn(delta::run(
            self.cp.clone(),
            id,
            request.into_inner(),
            tx,
            self.stop.clone(),
        ));
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// Names a stream asked for: every resource (wildcard) or the listed ones.
pub(crate) fn selected<'a>(
    all: Option<&'a BTreeMap<String, Any>>,
    wildcard: bool,
    names: &'a std::collections::BTreeSet<String>,
) -> impl Iterator<Item = (&'a String, &'a Any)> + 'a {
    all.into_iter()
        .flat_map(|m| m.iter())
        .filter(move |(n, _)| wildcard || names.contains(*n))
}

/// A resource's version for Delta: a digest of its encoding, so unchanged resources are not
/// resent and versions survive a control-plane restart.
pub(crate) fn resource_version(body: &Any) -> String {
    format!("{:08x}", crate::store::crc32(&body.value))
}

/// Resolves when the server is stopping (the guard `wait_for` returns is not `Send`).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
