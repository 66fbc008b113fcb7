//! The connection loop: pick a server, open the stream, run the SotW or Delta protocol on it,
//! back off and reconnect when it ends; while on a fallback server, probe the first one.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use super::backoff::{BackoffState, ServerChoice};
use super::{AdsConfig, Handler, Protocol};

/// Connection state, for the `control_plane.connected_state` gauge (1 when `connected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectionState {
    /// A stream is open to `server`.
    pub connected: bool,
    /// The server of the open stream, or of the last attempt.
    pub server: Option<SocketAddr>,
}

/// Spawns the ADS client task.
pub struct AdsClient;

impl AdsClient {
    /// Starts talking to the control plane on the current tokio runtime. The task runs until the
    /// handle is dropped or shut down.
    pub fn spawn(config: AdsConfig, handler: Arc<dyn Handler>) -> AdsHandle {
        let (state_tx, state_rx) = watch::channel(ConnectionState::default());
        let task = tokio::spawn(run(config, handler, state_tx));
        AdsHandle {
            state: state_rx,
            task,
        }
    }
}

/// Owns the client task; dropping it stops the client.
pub struct AdsHandle {
    state: watch::Receiver<ConnectionState>,
    task: JoinHandle<()>,
}

impl AdsHandle {
    /// Whether a stream is currently open (`control_plane.connected_state`).
    pub fn connected(&self) -> bool {
        self.state.borrow().connected
    }

    /// Follows connection state changes.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// Stops the client and closes its stream.
    pub fn shutdown(self) {}
}

impl Drop for AdsHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a stream that did open ended.
pub(crate) struct StreamEnd {
    /// At least one response arrived: the server is healthy, so back-off and failure counts reset.
    pub(crate) got_response: bool,
    /// The first server answers again: reconnect there now.
    pub(crate) preempted: bool,
    pub(crate) reason: String,
}

/// What a protocol run needs from the connection loop.
pub(crate) struct StreamCtx<'a> {
    pub(crate) cfg: &'a AdsConfig,
    pub(crate) handler: &'a Arc<dyn Handler>,
    pub(crate) client: AggregatedDiscoveryServiceClient<Channel>,
    pub(crate) state: &'a watch::Sender<ConnectionState>,
    pub(crate) server: SocketAddr,
    /// Completes when the client should move back to the first server.
    pub(crate) preempt: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
}

impl StreamCtx<'_> {
    pub(crate) fn set_connected(&self) {
        self.state.send_replace(ConnectionState {
            connected: true,
            server: Some(self.server),
        });
    }
}

pub(crate) fn endpoint(addr: SocketAddr, cfg: &AdsConfig) -> Result<Endpoint, String> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map(|e| {
            e.connect_timeout(cfg.connect_timeout)
                // Detects a silently dead peer; Envoy relies on TCP keepalive for the same.
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(true)
        })
        .map_err(|e| format!("bad control plane address {addr}: {e}"))
}

async fn run(cfg: AdsConfig, handler: Arc<dyn Handler>, state: watch::Sender<ConnectionState>) {
    if cfg.servers.is_empty() {
        tracing::error!("ADS: no control plane server configured");
        return;
    }
    let mut backoff = BackoffState::new(cfg.backoff);
    let mut choice = ServerChoice::new(cfg.servers.len(), cfg.failover_after);
    // SotW accepted versions survive reconnects so a new stream says what it already holds.
    let mut sotw_versions = std::collections::HashMap::new();
    loop {
        let idx = choice.current();
        let server = cfg.servers[idx];
        state.send_replace(ConnectionState {
            connected: false,
            server: Some(server),
        });
        let outcome = match connect(server, &cfg).await {
            Err(e) => Err(e),
            Ok(channel) => {
                let preempt: Pin<Box<dyn Future<Output = ()> + Send + '_>> =
                    if idx != 0 && cfg.servers.len() > 1 {
                        Box::pin(wait_for_primary(cfg.servers[0], &cfg))
                    } else {
                        Box::pin(std::future::pending())
                    };
                let ctx = StreamCtx {
                    cfg: &cfg,
                    handler: &handler,
                    client: AggregatedDiscoveryServiceClient::new(channel),
                    state: &state,
                    server,
                    preempt,
                };
                match cfg.protocol {
                    Protocol::Sotw => super::sotw::run(ctx, &mut sotw_versions).await,
                    Protocol::Delta => super::delta::run(ctx).await,
                }
            }
        };
        state.send_replace(ConnectionState {
            connected: false,
            server: Some(server),
        });
        match outcome {
            Err(e) => {
                tracing::warn!(%server, "ADS: cannot open stream: {e}");
                handler.connection_failed();
                choice.failed();
            }
            Ok(end) if end.preempted => {
                tracing::info!(%server, "ADS: first control plane answers again, moving back");
                choice.go_primary();
                backoff.reset();
                continue;
            }
            Ok(end) => {
                tracing::warn!(%server, "ADS: stream closed: {}", end.reason);
                handler.connection_failed();
                if end.got_response {
                    choice.succeeded();
                    backoff.reset();
                } else {
                    choice.failed();
                }
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn connect(server: SocketAddr, cfg: &AdsConfig) -> Result<Channel, String> {
    let ep = endpoint(server, cfg)?;
    match tokio::time::timeout(cfg.connect_timeout, ep.connect()).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err("connect: timed out".to_string()),
    }
}

/// Resolves once `primary` accepts an ADS stream (its response headers arrive).
async fn wait_for_primary(primary: SocketAddr, cfg: &AdsConfig) {
    loop {
        tokio::time::sleep(cfg.primary_probe_interval).await;
        let probe = async {
            let channel = connect(primary, cfg).await.ok()?;
            let mut client = AggregatedDiscoveryServiceClient::new(channel);
            client
                .stream_aggregated_resources(tokio_stream::empty())
                .await
                .ok()
        };
        if let Ok(Some(_)) = tokio::time::timeout(cfg.connect_timeout, probe).await {
            return;
        }
    }
}

/// Runs the handling of one response (decoding every resource, then the handler's
/// validation and apply: hundreds of milliseconds for 100k endpoints) without holding a
/// runtime worker: on a multi-threaded runtime the worker hands its other tasks to a new one
/// first, so data-plane connections sharing the runtime do not wait behind an update.
pub(crate) fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// Opens the stream with the configured limit on the server's response headers: a server that
/// accepts connections and never answers counts as a failed connect.
pub(crate) async fn open<F, T>(cfg: &AdsConfig, fut: F) -> Result<T, String>
where
    F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    match tokio::time::timeout(cfg.connect_timeout, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(format!("{}: {}", s.code(), s.message())),
        Err(_) => Err("no response headers in time".to_string()),
    }
}
