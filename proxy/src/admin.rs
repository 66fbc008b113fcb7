//! The admin server on `admin.address`: `/ready`, `/server_info`, `/config_dump`, `/clusters`,
//! `/stats`, `/stats/prometheus`, `POST /quitquitquit`, with Envoy's paths and output shapes.
//! It reads the data plane through [`AdminSource`] and never blocks a worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use strait_xds::model;

use crate::stats::{HostStats, Store};

/// Lifecycle state, as `/ready` and `/server_info` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    /// Config not loaded yet: `/ready` answers 503 `PRE_INITIALIZING`/`INITIALIZING`.
    Initializing,
    /// `/ready` answers 200 `LIVE`.
    Live,
    /// Shutting down: `/ready` answers 503 `DRAINING`.
    Draining,
}

/// What the admin server needs from the running proxy.
pub trait AdminSource: Send + Sync + 'static {
    fn state(&self) -> ServerState;
    fn stats(&self) -> &Store;
    /// The active configuration.
    fn config(&self) -> Arc<model::Bootstrap>;
    /// Every active listener's name and bound address (`/listeners`).
    fn listeners(&self) -> Vec<(String, SocketAddr)>;
    /// Every cluster with its current hosts.
    fn clusters(&self) -> Vec<ClusterView>;
    /// When the process started (for `/server_info` uptime).
    fn start_time(&self) -> SystemTime;
    /// Command-line options as `/server_info` shows them (`command_line_options`).
    fn command_line_options(&self) -> serde_json::Value;
    /// Starts a graceful shutdown (`POST /quitquitquit`). Returns at once.
    fn begin_shutdown(&self);
}

/// A cluster as `/clusters` prints it.
#[derive(Debug, Clone)]
pub struct ClusterView {
    pub config: Arc<model::Cluster>,
    pub hosts: Vec<HostView>,
}

/// A host as `/clusters` prints it.
#[derive(Debug, Clone)]
pub struct HostView {
    pub address: SocketAddr,
    pub hostname: String,
    pub locality: model::Locality,
    pub priority: u32,
    pub weight: u32,
    /// Envoy's `health_flags` value: `healthy`, or flags such as `/failed_eds_health`.
    pub health_flags: String,
    pub stats: Arc<HostStats>,
}
