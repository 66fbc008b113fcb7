//! gRPC channels to Strait's clusters for filters that call services (ext_authz): each channel
//! connects lazily, and every new connection picks a host of the cluster as the live config has
//! it then (load balancing, health, EDS updates), within the cluster's connect timeout.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use strait_filters::ClusterConnector;
use tokio::net::TcpStream;

use crate::server::ServerShared;

/// The [`ClusterConnector`] the data plane gives filter translation. It is created before the
/// server (config is translated first) and [attached](ProxyClusters::attach) once it runs;
/// until then connections fail, as requests that could use them do not exist yet.
#[derive(Debug, Clone, Default)]
pub struct ProxyClusters {
    server: Arc<OnceLock<Weak<ServerShared>>>,
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("the proxy is not running")]
    NotRunning,
    #[error("unknown cluster '{0}'")]
    UnknownCluster(String),
    #[error("no healthy upstream in cluster '{0}'")]
    NoHost(String),
    #[error("connect timeout")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ProxyClusters {
    pub fn new() -> ProxyClusters {
        ProxyClusters::default()
    }

    /// Connections from now on use `server`'s clusters. Later calls are ignored.
    pub fn attach(&self, server: &Arc<ServerShared>) {
        let _ = self.server.set(Arc::downgrade(server));
    }
}

async fn connect(
    server: Arc<OnceLock<Weak<ServerShared>>>,
    cluster: Arc<str>,
) -> Result<TokioIo<TcpStream>, ConnectError> {
    let shared = server
        .get()
        .and_then(Weak::upgrade)
        .ok_or(ConnectError::NotRunning)?;
    let snapshot = shared.snapshot();
    let state = snapshot
        .clusters
        .get(&cluster)
        .cloned()
        .ok_or_else(|| ConnectError::UnknownCluster(cluster.to_string()))?;
    drop(snapshot);
    let host = state
        .pick()
        .ok_or_else(|| ConnectError::NoHost(cluster.to_string()))?;
    let timeout: Duration = state.info.config.connect_timeout;
    let stream = tokio::time::timeout(timeout, TcpStream::connect(host.address))
        .await
        .map_err(|_| ConnectError::Timeout)??;
    // gRPC messages are small and latency-bound.
    let _ = stream.set_nodelay(true);
    Ok(TokioIo::new(stream))
}

impl ClusterConnector for ProxyClusters {
    fn grpc_channel(&self, cluster: &str) -> Result<tonic::transport::Channel, String> {
        // The authority is only a label (`:authority` of the gRPC calls); the connector picks
        // the address. Cluster names that are not valid authorities get a neutral one.
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{cluster}"))
            .or_else(|_| tonic::transport::Endpoint::from_shared("http://ext-authz".to_string()))
            .map_err(|e| e.to_string())?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err("gRPC services need a running proxy (no async runtime)".into());
        }
        let server = self.server.clone();
        let name: Arc<str> = cluster.into();
        let connector =
            tower::service_fn(move |_uri: http::Uri| connect(server.clone(), name.clone()));
        Ok(endpoint.connect_with_connector_lazy(connector))
    }
}
