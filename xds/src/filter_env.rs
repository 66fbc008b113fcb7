//! What HTTP filter translation needs from outside the config plane: the filter registry, the
//! stats sink filters count into, and gRPC channels to clusters (ext_authz). The data plane
//! installs one per process before loading config; translation never builds a filter without it.

use std::sync::{Arc, OnceLock, RwLock};

use strait_filters::{ClusterConnector, MemoryStats, Registry, StatsSink};

/// The environment HTTP filters are built in.
#[derive(Clone)]
pub struct FilterEnv {
    pub registry: Registry,
    pub stats: Arc<dyn StatsSink>,
    pub clusters: Arc<dyn ClusterConnector>,
}

impl std::fmt::Debug for FilterEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterEnv")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl FilterEnv {
    /// The built-in filters over the given stats and clusters.
    pub fn builtin(stats: Arc<dyn StatsSink>, clusters: Arc<dyn ClusterConnector>) -> FilterEnv {
        FilterEnv {
            registry: Registry::builtin(),
            stats,
            clusters,
        }
    }

    /// Built-in filters, stats kept in memory only, and lazy channels that never connect:
    /// enough to validate a configuration (`--mode validate`, tests of translation).
    pub fn detached() -> FilterEnv {
        FilterEnv {
            registry: Registry::builtin(),
            stats: Arc::new(MemoryStats::default()),
            clusters: Arc::new(DetachedClusters),
        }
    }
}

fn slot() -> &'static RwLock<Option<Arc<FilterEnv>>> {
    static SLOT: OnceLock<RwLock<Option<Arc<FilterEnv>>>> = OnceLock::new();
    SLOT.get_or_init(|| RwLock::new(None))
}

/// Makes `env` the one every later translation (bootstrap, LDS, RDS) builds filters in.
/// Process-wide because filter stats and clusters are: a process runs one proxy.
pub fn install(env: FilterEnv) {
    let mut s = slot().write().unwrap_or_else(|e| e.into_inner());
    *s = Some(Arc::new(env));
}

/// The installed environment, or a detached one.
pub fn current() -> Arc<FilterEnv> {
    let installed = slot().read().unwrap_or_else(|e| e.into_inner()).clone();
    installed.unwrap_or_else(|| {
        static DETACHED: OnceLock<Arc<FilterEnv>> = OnceLock::new();
        DETACHED
            .get_or_init(|| Arc::new(FilterEnv::detached()))
            .clone()
    })
}

/// Channels that are never used: translation only checks the cluster name (the caller does),
/// so validation needs no connection. Needs a Tokio runtime, as every tonic channel does; without
/// one the filter is rejected instead of panicking.
#[derive(Debug, Clone, Copy)]
struct DetachedClusters;

impl ClusterConnector for DetachedClusters {
    fn grpc_channel(&self, _cluster: &str) -> Result<tonic::transport::Channel, String> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err("gRPC services need a running proxy (no async runtime)".into());
        }
        Ok(tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy())
    }
}

/// The environment a translation builds filters in: the installed one when it starts.
#[derive(Debug, Clone)]
pub(crate) struct EnvRef(pub Arc<FilterEnv>);

impl Default for EnvRef {
    fn default() -> Self {
        EnvRef(current())
    }
}
