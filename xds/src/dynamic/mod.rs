//! The dynamic configuration: every xDS resource Strait holds (from ADS, the last-known-good
//! store or `path_config_source` files), validated and translated when it arrives. It follows
//! RDS/EDS references, warms listeners and clusters before the data plane sees them
//! (make-before-break) and publishes complete [`model::Bootstrap`]s. Never on the request
//! path; never blocks on I/O (store writes go to `spawn_blocking`).

pub mod files;
pub mod resources;
mod stats;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

// tokio's clock, so warming timeouts follow paused time in tests.
use tokio::time::Instant;

use envoy_types::pb::envoy::config::cluster::v3 as cl;
use envoy_types::pb::envoy::config::listener::v3 as lst;
use envoy_types::pb::google::protobuf::Any;
use strait_filters::StatsSink;
use tokio::sync::watch;

use crate::ads::{
    self, Handler, Resource, Subscriptions, Update, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE,
    ROUTE_TYPE,
};
use crate::model::{self, ConfigSourceKind, ResourceSource};
use crate::store::Store;
use crate::translate::config_source::SourceRef;
use resources::{AnyBody, Env};
use stats::{Kind, Registry, SubStats};

pub use stats::version_hash;

/// Envoy's default `initial_fetch_timeout`, for sources that do not say.
const DEFAULT_INITIAL_FETCH: Duration = Duration::from_secs(15);

/// A file subscription to run: `(type_url, path, watched_directory)`.
pub type FileSubscription = (String, PathBuf, Option<PathBuf>);

/// The static part of a loaded bootstrap, as the dynamic configuration needs it.
#[derive(Debug, Default)]
pub struct Statics {
    pub(crate) listeners: Vec<lst::Listener>,
    pub(crate) clusters: Vec<cl::Cluster>,
}

/// Where an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Static,
    Dynamic(ResourceSource),
}

impl Origin {
    /// Held for the control plane: reported in `versions()` and saved to the store.
    fn is_ads(self) -> bool {
        matches!(
            self,
            Origin::Dynamic(ResourceSource::ControlPlane | ResourceSource::Store)
        )
    }
}

#[derive(Debug, Clone)]
struct Entry<T> {
    version: String,
    body: Option<Arc<Any>>,
    last_updated: SystemTime,
    /// When this name first appeared: warming times out from here.
    added: Instant,
    origin: Origin,
    value: T,
}

#[derive(Debug, Clone)]
struct ListenerVal {
    proto: lst::Listener,
    index: usize,
    path: String,
    /// Translated with a placeholder route configuration when it uses RDS.
    base: Arc<model::Listener>,
    rds: Option<SourceRef>,
    /// `http.<stat_prefix>.rds.<name>.*` of `rds`.
    rds_stats: Option<Arc<SubStats>>,
    /// The last listener published with real routes, and those routes.
    composed: Option<(Arc<model::RouteConfig>, Arc<model::Listener>)>,
    /// The previous version's published listener, served while this version warms
    /// (make-before-break).
    previous: Option<Arc<model::Listener>>,
}

#[derive(Debug, Clone)]
struct ClusterVal {
    cluster: Arc<model::Cluster>,
    eds: Option<SourceRef>,
    /// `cluster.<name>.*` subscription stats of `eds`.
    eds_stats: Option<Arc<SubStats>>,
}

#[derive(Debug, Default)]
struct State {
    listeners: BTreeMap<String, Entry<ListenerVal>>,
    routes: BTreeMap<String, Entry<Arc<model::RouteConfig>>>,
    clusters: BTreeMap<String, Entry<ClusterVal>>,
    endpoints: BTreeMap<String, Entry<Arc<model::LoadAssignment>>>,
    /// Last accepted `version_info` per type URL.
    versions: HashMap<String, String>,
    /// Types a control plane or a file has delivered at least once.
    received: HashSet<String>,
    /// Dynamic resources are published (a control plane answered, or the initial fetch timed out).
    gate_open: bool,
    /// RDS/EDS subscriptions whose `init_fetch_timeout` was already counted.
    fetch_timeouts: HashSet<(&'static str, String)>,
}

/// What one accepted update did to its type's set.
#[derive(Debug, Default)]
struct Staged {
    /// Added, or with a different body.
    changed: Vec<String>,
    /// Sent again with the same body.
    unchanged: Vec<String>,
    removed: Vec<String>,
}

struct Inner {
    base: model::Bootstrap,
    env_ads: bool,
    lds: Option<model::ConfigSource>,
    cds: Option<model::ConfigSource>,
    started: Instant,
    initial_timeout: Option<Duration>,
    state: Mutex<State>,
    out: watch::Sender<Option<Arc<model::Bootstrap>>>,
    ready: watch::Sender<bool>,
    subs: watch::Sender<Subscriptions>,
    files: watch::Sender<BTreeSet<FileSubscription>>,
    store: Option<Arc<StoreWriter>>,
    stats: Registry,
    /// `cluster_manager.cds.*` and `listener_manager.lds.*`, when CDS / LDS are configured.
    cds_stats: Option<Arc<SubStats>>,
    lds_stats: Option<Arc<SubStats>>,
    timer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Serialises store writes per type so an older set never overwrites a newer one.
struct StoreWriter {
    store: Store,
    /// Latest set queued per type; only held to bump or compare, never across I/O.
    generation: Mutex<HashMap<String, u64>>,
    /// Held across a write (blocking threads only).
    writing: Mutex<()>,
}

/// The dynamic configuration; clones share it. Implements [`ads::Handler`].
#[derive(Clone)]
pub struct Dynamic {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dynamic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dynamic").finish_non_exhaustive()
    }
}

/// A bootstrap as loaded: the model, plus the static protos the dynamic configuration re-uses.
#[derive(Debug)]
pub struct Loaded {
    pub model: model::Bootstrap,
    pub statics: Statics,
}

impl Loaded {
    /// Whether the configuration needs the dynamic machinery: `dynamic_resources`, or static
    /// listeners / clusters that use RDS / EDS.
    pub fn needs_dynamic(&self) -> bool {
        self.model.dynamic.is_some()
            || self
                .model
                .clusters
                .iter()
                .any(|c| c.discovery == model::DiscoveryType::Eds)
            || self.statics.listeners.iter().any(|l| {
                let any = Any {
                    type_url: LISTENER_TYPE.into(),
                    value: prost::Message::encode_to_vec(l),
                };
                !ads::references(LISTENER_TYPE, &any).is_empty()
            })
    }
}

impl Dynamic {
    /// Builds the state from the bootstrap and, when given, the last-known-good store (loaded
    /// now; a damaged store is logged and ignored as a whole). Counters go to `stats`.
    pub fn new(
        loaded: Loaded,
        store_dir: Option<PathBuf>,
        stats: Arc<dyn StatsSink>,
    ) -> Result<Dynamic, String> {
        let Loaded {
            model: base,
            statics,
        } = loaded;
        let dynamic = base.dynamic.clone();
        let (lds, cds, env_ads) = match &dynamic {
            Some(d) => (d.lds.clone(), d.cds.clone(), d.ads.is_some()),
            None => (None, None, false),
        };
        let initial_timeout = [&lds, &cds]
            .iter()
            .filter_map(|s| s.as_ref())
            .map(|s| s.initial_fetch_timeout)
            .max()
            .unwrap_or(Some(DEFAULT_INITIAL_FETCH));
        let registry = Registry::new(stats);
        let cds_stats = cds
            .as_ref()
            .map(|_| registry.get("cluster_manager.cds", Kind::Cds));
        let lds_stats = lds
            .as_ref()
            .map(|_| registry.get("listener_manager.lds", Kind::Lds));
        let store = match store_dir {
            Some(dir) => Some(Arc::new(StoreWriter {
                store: Store::open(&dir).map_err(|e| format!("--xds-state-dir: {e}"))?,
                generation: Mutex::new(HashMap::new()),
                writing: Mutex::new(()),
            })),
            None => None,
        };
        let now = Instant::now();
        let inner = Arc::new(Inner {
            base,
            env_ads,
            lds,
            cds,
            started: now,
            initial_timeout,
            state: Mutex::new(State::default()),
            out: watch::channel(None).0,
            ready: watch::channel(false).0,
            subs: watch::channel(Subscriptions::new()).0,
            files: watch::channel(BTreeSet::new()).0,
            store,
            stats: registry,
            cds_stats,
            lds_stats,
            timer: Mutex::new(None),
        });
        let d = Dynamic { inner };
        d.load_statics(statics)?;
        d.load_store();
        Ok(d)
    }

    /// The bootstrap's local cluster (translation copies it into every static cluster's LB
    /// config, so any static cluster carries it) and the node's locality.
    fn local_env(&self) -> Env {
        let base = &self.inner.base;
        Env {
            local_cluster_name: base
                .clusters
                .iter()
                .find_map(|c| c.lb.local_cluster_name.clone()),
            local_locality: base.node.locality.clone(),
            ..Env::default()
        }
    }

    fn env(&self, st: &State) -> Env {
        Env {
            ads_configured: self.inner.env_ads,
            cluster_names: st.clusters.keys().cloned().collect(),
            ..self.local_env()
        }
    }

    fn load_statics(&self, statics: Statics) -> Result<(), String> {
        let mut st = self.lock();
        let now = Instant::now();
        let wall = SystemTime::now();
        for c in statics.clusters {
            let name = c.name.clone();
            let i = st.clusters.len();
            let env = self.env(&st);
            let t = resources::cluster(&env, &format!("static_resources.clusters[{i}]"), c)?;
            let eds_stats = self.eds_stats(&name, &t.eds);
            st.clusters.insert(
                name,
                Entry {
                    version: String::new(),
                    body: None,
                    last_updated: wall,
                    added: now,
                    origin: Origin::Static,
                    value: ClusterVal {
                        eds_stats,
                        cluster: Arc::new(t.cluster),
                        eds: t.eds,
                    },
                },
            );
        }
        for (i, l) in statics.listeners.into_iter().enumerate() {
            let env = self.env(&st);
            let path = format!("static_resources.listeners[{i}]");
            let t = resources::listener(&env, &path, i, l.clone(), &HashMap::new())?;
            st.listeners.insert(
                t.listener.name.clone(),
                Entry {
                    version: String::new(),
                    body: None,
                    last_updated: wall,
                    added: now,
                    origin: Origin::Static,
                    value: ListenerVal {
                        proto: l,
                        index: i,
                        path,
                        base: Arc::new(t.listener),
                        rds_stats: self.rds_stats(&t.rds),
                        rds: t.rds,
                        composed: None,
                        previous: None,
                    },
                },
            );
        }
        if self.inner.lds.is_none() {
            st.received.insert(LISTENER_TYPE.to_string());
        }
        if self.inner.cds.is_none() {
            st.received.insert(CLUSTER_TYPE.to_string());
        }
        self.refresh(&mut st);
        Ok(())
    }

    fn load_store(&self) {
        let Some(w) = &self.inner.store else {
            return;
        };
        let saved = match w.store.load_all() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("xDS store unreadable, starting without it: {e}");
                return;
            }
        };
        let mut sets = Vec::new();
        for s in saved {
            match s {
                Ok(s) => sets.push(s),
                Err(e) => {
                    tracing::error!("xDS store damaged, starting without it: {e}");
                    return;
                }
            }
        }
        // Clusters before endpoints before listeners before routes, as ADS subscribes.
        sets.sort_by_key(|s| ads::TYPE_ORDER.iter().position(|t| *t == s.type_url));
        let snapshot = self.lock().clone_for_rollback();
        for s in &sets {
            let r = self.apply_source(
                &s.type_url,
                &s.version_info,
                Update::Delta {
                    added: s.resources.clone(),
                    removed: Vec::new(),
                },
                ResourceSource::Store,
            );
            if let Err(e) = r {
                tracing::error!("xDS store holds a set Strait refuses, starting without it: {e}");
                let mut st = self.lock();
                st.restore(snapshot);
                self.refresh(&mut st);
                return;
            }
        }
        for s in &sets {
            tracing::info!(
                type_url = %s.type_url,
                version = %s.version_info,
                resources = s.resources.len(),
                "xDS store loaded; served if no control plane answers in time"
            );
        }
    }

    fn eds_stats(&self, cluster: &str, eds: &Option<SourceRef>) -> Option<Arc<SubStats>> {
        eds.as_ref().map(|_| {
            self.inner
                .stats
                .get(&format!("cluster.{cluster}"), Kind::Eds)
        })
    }

    fn rds_stats(&self, rds: &Option<SourceRef>) -> Option<Arc<SubStats>> {
        rds.as_ref().map(|r| {
            self.inner
                .stats
                .get(&stats::rds_prefix(&r.stat_prefix, &r.name), Kind::Rds)
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation builds the next state before committing it, so a poisoned lock still
        // holds a consistent state.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Complete configurations as they are accepted; `None` until the first one.
    pub fn config(&self) -> watch::Receiver<Option<Arc<model::Bootstrap>>> {
        self.inner.out.subscribe()
    }

    /// `true` once the initial fetch (or the store, after the timeout) gave a warm config.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.inner.ready.subscribe()
    }

    /// The `path_config_source` files to watch, following the resources that name them.
    pub fn file_subscriptions(&self) -> watch::Receiver<BTreeSet<FileSubscription>> {
        self.inner.files.subscribe()
    }

    /// The ADS settings, when configured.
    pub fn ads(&self) -> Option<&model::AdsSource> {
        self.inner
            .base
            .dynamic
            .as_ref()
            .and_then(|d| d.ads.as_ref())
    }

    /// The static bootstrap (node, admin, static resources).
    pub fn base(&self) -> &model::Bootstrap {
        &self.inner.base
    }

    /// What the data plane starts with before the first publish: the static clusters (with
    /// the same `Arc`s later publishes carry, so they are kept), and no listener yet, as Envoy
    /// starts listeners only once its initial fetches are done.
    pub fn initial(&self) -> model::Bootstrap {
        let st = self.lock();
        let base = &self.inner.base;
        model::Bootstrap {
            node: base.node.clone(),
            admin: base.admin.clone(),
            dump: base.dump.clone(),
            dynamic: base.dynamic.clone(),
            clusters: st
                .clusters
                .values()
                .filter(|e| e.origin == Origin::Static)
                .map(|e| e.value.cluster.clone())
                .collect(),
            ..Default::default()
        }
    }

    /// Validates and applies one update from `source` (a control plane, the store, a file).
    /// On error nothing changes and the message names the resource and field.
    pub fn apply_source(
        &self,
        type_url: &str,
        version_info: &str,
        update: Update,
        source: ResourceSource,
    ) -> Result<(), String> {
        let mut st = self.lock();
        let result = self.stage(&mut st, type_url, version_info, update, source);
        // Loading the store is not a fetch: Envoy's subscription stats count fetches only.
        let counted = source != ResourceSource::Store;
        match result {
            Ok(staged) => {
                if counted {
                    self.count_accepted(&st, type_url, version_info, &staged);
                }
                if source != ResourceSource::Store {
                    st.received.insert(type_url.to_string());
                }
                self.refresh(&mut st);
                if source == ResourceSource::ControlPlane {
                    self.save(&st, type_url);
                }
                Ok(())
            }
            Err(e) => {
                if counted {
                    self.count_rejected(&st, type_url);
                }
                Err(e)
            }
        }
    }

    /// The subscriptions of `type_url`: the type's block for CDS/LDS, every RDS/EDS block.
    fn blocks_of(&self, st: &State, type_url: &str) -> Vec<Arc<SubStats>> {
        let mut out: Vec<Arc<SubStats>> = match type_url {
            CLUSTER_TYPE => self.inner.cds_stats.iter().cloned().collect(),
            LISTENER_TYPE => self.inner.lds_stats.iter().cloned().collect(),
            ROUTE_TYPE => st
                .listeners
                .values()
                .filter_map(|e| e.value.rds_stats.clone())
                .collect(),
            ENDPOINT_TYPE => st
                .clusters
                .values()
                .filter_map(|e| e.value.eds_stats.clone())
                .collect(),
            _ => Vec::new(),
        };
        dedup_arcs(&mut out);
        out
    }

    /// Envoy's per-subscription counting: CDS/LDS count every response; RDS/EDS count a
    /// response for each subscription whose resource it carries.
    fn count_accepted(&self, st: &State, type_url: &str, version_info: &str, staged: &Staged) {
        let reloaded = !staged.changed.is_empty() || !staged.removed.is_empty();
        // Subscription blocks by resource name, built once per update (10k names in a push).
        let mut index: HashMap<&str, Vec<Arc<SubStats>>> = HashMap::new();
        match type_url {
            CLUSTER_TYPE | LISTENER_TYPE => {
                for b in self.blocks_of(st, type_url) {
                    b.accepted(version_info, reloaded);
                }
                return;
            }
            ROUTE_TYPE => {
                for e in st.listeners.values() {
                    if let (Some(r), Some(b)) = (&e.value.rds, &e.value.rds_stats) {
                        index.entry(r.name.as_str()).or_default().push(b.clone());
                    }
                }
            }
            ENDPOINT_TYPE => {
                for e in st.clusters.values() {
                    if let (Some(r), Some(b)) = (&e.value.eds, &e.value.eds_stats) {
                        index.entry(r.name.as_str()).or_default().push(b.clone());
                    }
                }
            }
            _ => return,
        }
        index.values_mut().for_each(dedup_arcs);
        let blocks = |n: &String| index.get(n.as_str()).into_iter().flatten();
        for b in staged.changed.iter().flat_map(blocks) {
            b.accepted(version_info, true);
        }
        for b in staged.unchanged.iter().flat_map(blocks) {
            b.accepted(version_info, false);
        }
        for b in staged.removed.iter().flat_map(blocks) {
            b.emptied();
        }
    }

    /// A rejected response fails every subscription of its type, as Envoy's mux does.
    fn count_rejected(&self, st: &State, type_url: &str) {
        for b in self.blocks_of(st, type_url) {
            b.rejected();
        }
    }

    /// The ADS stream could not be opened or broke: Envoy counts `update_failure` on every
    /// subscription carried over ADS.
    pub fn connection_failed(&self) {
        let st = self.lock();
        let ads = |s: &Option<model::ConfigSource>| {
            s.as_ref().is_some_and(|s| s.kind == ConfigSourceKind::Ads)
        };
        let mut blocks = Vec::new();
        if ads(&self.inner.cds) {
            blocks.extend(self.inner.cds_stats.iter().cloned());
        }
        if ads(&self.inner.lds) {
            blocks.extend(self.inner.lds_stats.iter().cloned());
        }
        for e in st.listeners.values() {
            if let (Some(r), Some(b)) = (&e.value.rds, &e.value.rds_stats) {
                if r.source.kind == ConfigSourceKind::Ads {
                    blocks.push(b.clone());
                }
            }
        }
        for e in st.clusters.values() {
            if let (Some(r), Some(b)) = (&e.value.eds, &e.value.eds_stats) {
                if r.source.kind == ConfigSourceKind::Ads {
                    blocks.push(b.clone());
                }
            }
        }
        drop(st);
        dedup_arcs(&mut blocks);
        for b in blocks {
            b.connection_failed();
        }
    }

    /// Builds the next set for `type_url` and commits it only if all of it is valid.
    fn stage(
        &self,
        st: &mut State,
        type_url: &str,
        version_info: &str,
        update: Update,
        source: ResourceSource,
    ) -> Result<Staged, String> {
        let mut staged = Staged::default();
        let (upserts, removed, replace) = match update {
            Update::State(rs) => (rs, Vec::new(), ads::is_wildcard(type_url)),
            Update::Delta { added, removed } => (added, removed, false),
        };
        let same_source = |o: Origin| match (o, source) {
            (Origin::Static, _) => false,
            // A control plane's state replaces what the store held.
            (Origin::Dynamic(a), ResourceSource::ControlPlane) => a.is_cp_or_store(),
            (Origin::Dynamic(a), b) => a == b,
        };
        let wall = SystemTime::now();
        let now = Instant::now();
        let mut errors = Vec::new();
        macro_rules! next_set {
            ($map:expr, $translate:expr) => {{
                let mut next = $map.clone();
                let names: HashSet<&str> = upserts.iter().map(|r| r.name.as_str()).collect();
                if replace {
                    next.retain(|n, e| {
                        let keep = !same_source(e.origin) || names.contains(n.as_str());
                        if !keep {
                            staged.removed.push(n.clone());
                        }
                        keep
                    });
                }
                for n in &removed {
                    if next.get(n).is_some_and(|e| same_source(e.origin)) {
                        next.remove(n);
                        staged.removed.push(n.clone());
                    }
                }
                for r in &upserts {
                    if let Some(old) = next.get_mut(&r.name) {
                        if old.origin == Origin::Static {
                            errors.push(format!(
                                "'{}': a static resource of that name exists",
                                r.name
                            ));
                            continue;
                        }
                        if old.body.as_deref() == Some(&r.body) {
                            old.version = r.version.clone();
                            old.origin = Origin::Dynamic(source);
                            staged.unchanged.push(r.name.clone());
                            continue;
                        }
                    }
                    #[allow(clippy::redundant_closure_call)]
                    match ($translate)(r) {
                        Ok(value) => {
                            let added = next.get(&r.name).map_or(now, |e| e.added);
                            next.insert(
                                r.name.clone(),
                                Entry {
                                    version: r.version.clone(),
                                    body: Some(Arc::new(r.body.clone())),
                                    last_updated: wall,
                                    added,
                                    origin: Origin::Dynamic(source),
                                    value,
                                },
                            );
                            staged.changed.push(r.name.clone());
                        }
                        Err(e) => errors.push(e),
                    }
                }
                next
            }};
        }
        let env = self.env(st);
        match type_url {
            LISTENER_TYPE => {
                let next = next_set!(st.listeners, |r: &Resource| {
                    let proto = resources::decode_listener(&r.name, &r.body)?;
                    let t = resources::listener(&env, "", 0, proto.clone(), &HashMap::new())?;
                    Ok::<_, String>(ListenerVal {
                        proto,
                        index: 0,
                        path: String::new(),
                        base: Arc::new(t.listener),
                        rds_stats: self.rds_stats(&t.rds),
                        rds: t.rds,
                        composed: None,
                        previous: None,
                    })
                });
                // A changed listener that must warm keeps serving its previous version.
                let mut next = next;
                for (n, e) in next.iter_mut() {
                    if e.value.composed.is_some() || e.value.previous.is_some() {
                        continue;
                    }
                    if let Some(old) = st.listeners.get(n) {
                        let served = match &old.value.rds {
                            None => Some(old.value.base.clone()),
                            Some(_) => old
                                .value
                                .composed
                                .as_ref()
                                .map(|(_, l)| l.clone())
                                .or_else(|| old.value.previous.clone()),
                        };
                        e.value.previous = served.filter(|l| l.address == e.value.base.address);
                    }
                }
                let mut addrs = HashMap::new();
                for (n, e) in &next {
                    let a = e.value.base.address;
                    // Port 0 binds a fresh port each time, so it cannot conflict.
                    if a.port() != 0 {
                        if let Some(other) = addrs.insert(a, n) {
                            errors.push(format!(
                                "listener '{n}': address {a} is already used by listener '{other}'"
                            ));
                        }
                    }
                }
                if errors.is_empty() {
                    st.listeners = next;
                }
            }
            ROUTE_TYPE => {
                let next = next_set!(st.routes, |r: &Resource| {
                    resources::route_configuration(&env, &r.name, &r.body).map(Arc::new)
                });
                if errors.is_empty() {
                    st.routes = next;
                }
            }
            CLUSTER_TYPE => {
                let next = next_set!(st.clusters, |r: &Resource| {
                    let proto = resources::decode_cluster(&r.name, &r.body)?;
                    let t = resources::cluster(&env, "", proto)?;
                    Ok::<_, String>(ClusterVal {
                        eds_stats: self.eds_stats(&r.name, &t.eds),
                        cluster: Arc::new(t.cluster),
                        eds: t.eds,
                    })
                });
                if errors.is_empty() {
                    st.clusters = next;
                }
            }
            ENDPOINT_TYPE => {
                let next = next_set!(st.endpoints, |r: &Resource| {
                    resources::cluster_load_assignment(&r.name, &r.body).map(Arc::new)
                });
                if errors.is_empty() {
                    st.endpoints = next;
                }
            }
            other => return Err(format!("unsupported type URL {other}")),
        }
        if !errors.is_empty() {
            return Err(errors.join("; "));
        }
        st.versions
            .insert(type_url.to_string(), version_info.to_string());
        Ok(staged)
    }

    /// Recomputes subscriptions, composes and publishes, and schedules the next warming
    /// deadline.
    fn refresh(&self, st: &mut State) {
        let mut subs = Subscriptions::new();
        let mut files = BTreeSet::new();
        let mut want = |type_url: &str, name: &str, kind: &ConfigSourceKind| match kind {
            ConfigSourceKind::Ads => {
                subs.entry(type_url.to_string())
                    .or_default()
                    .insert(name.to_string());
            }
            ConfigSourceKind::Path {
                path,
                watched_directory,
            } => {
                files.insert((
                    type_url.to_string(),
                    path.clone(),
                    watched_directory.clone(),
                ));
            }
        };
        for e in st.listeners.values() {
            if let Some(r) = &e.value.rds {
                want(ROUTE_TYPE, &r.name, &r.source.kind);
            }
        }
        for e in st.clusters.values() {
            if let Some(r) = &e.value.eds {
                want(ENDPOINT_TYPE, &r.name, &r.source.kind);
            }
        }
        for (t, s) in [
            (LISTENER_TYPE, &self.inner.lds),
            (CLUSTER_TYPE, &self.inner.cds),
        ] {
            if let Some(model::ConfigSource {
                kind:
                    ConfigSourceKind::Path {
                        path,
                        watched_directory,
                    },
                ..
            }) = s
            {
                files.insert((t.to_string(), path.clone(), watched_directory.clone()));
            }
        }
        self.inner.subs.send_if_modified(|cur| {
            let changed = *cur != subs;
            *cur = subs;
            changed
        });
        self.inner.files.send_if_modified(|cur| {
            let changed = *cur != files;
            *cur = files;
            changed
        });
        let deadline = self.compose(st);
        self.schedule(deadline);
    }

    /// Publishes the warm resources (when the gate is open); returns the next instant at which
    /// warming or the initial-fetch gate times out.
    fn compose(&self, st: &mut State) -> Option<Instant> {
        let now = Instant::now();
        let mut next_deadline: Option<Instant> = None;
        let mut note = |since: Instant, timeout: Option<Duration>| {
            if let Some(t) = timeout {
                let d = since + t;
                next_deadline = Some(next_deadline.map_or(d, |n: Instant| n.min(d)));
            }
        };
        if !st.gate_open {
            let all_received = [LISTENER_TYPE, CLUSTER_TYPE]
                .iter()
                .all(|t| st.received.contains(*t));
            if all_received || timed_out(self.inner.started, self.inner.initial_timeout, now) {
                st.gate_open = true;
                if !all_received {
                    tracing::warn!(
                        "xDS: no complete answer within initial_fetch_timeout; serving what is held \
                         (static resources and the last-known-good store)"
                    );
                    for (t, b) in [
                        (CLUSTER_TYPE, &self.inner.cds_stats),
                        (LISTENER_TYPE, &self.inner.lds_stats),
                    ] {
                        if let Some(b) = b.as_ref().filter(|_| !st.received.contains(t)) {
                            b.init_fetch_timeout.inc();
                        }
                    }
                }
            } else {
                note(self.inner.started, self.inner.initial_timeout);
            }
        }
        // Clusters: warm once their endpoints arrived, or their fetch timed out.
        let mut clusters = Vec::new();
        let mut eds = HashMap::new();
        let mut warm_clusters = HashSet::new();
        let mut cluster_dump = Vec::new();
        for (name, e) in &st.clusters {
            let warm = match &e.value.eds {
                None => true,
                Some(r) => match st.endpoints.get(&r.name) {
                    Some(la) => {
                        eds.insert(name.clone(), la.value.clone());
                        true
                    }
                    // The cluster's own `eds_config.initial_fetch_timeout`, as in Envoy.
                    None if timed_out(e.added, r.source.initial_fetch_timeout, now) => {
                        eds.insert(name.clone(), Arc::new(model::LoadAssignment::default()));
                        if st.fetch_timeouts.insert((ENDPOINT_TYPE, name.clone())) {
                            if let Some(b) = &e.value.eds_stats {
                                b.init_fetch_timeout.inc();
                            }
                        }
                        true
                    }
                    None => {
                        note(e.added, r.source.initial_fetch_timeout);
                        false
                    }
                },
            };
            if warm {
                warm_clusters.insert(name.as_str());
                clusters.push(e.value.cluster.clone());
            }
            if let Some(d) = dump_entry(name, e, !warm) {
                cluster_dump.push(d);
            }
        }
        // Listeners: warm once their routes arrived and every cluster those routes name is
        // warm; until then a listener that was serving keeps its previous routes.
        let mut listeners = Vec::new();
        let mut listener_dump = Vec::new();
        let mut all_warm = warm_clusters.len() == st.clusters.len();
        for (name, e) in st.listeners.iter_mut() {
            let v = &mut e.value;
            let Some(rds_ref) = &v.rds else {
                listeners.push(v.base.clone());
                if let Some(d) = dump_entry(name, e, false) {
                    listener_dump.push(d);
                }
                continue;
            };
            let rds = &rds_ref.name;
            let fetch_timeout = rds_ref.source.initial_fetch_timeout;
            let route = st.routes.get(rds).map(|r| r.value.clone());
            let usable = route.as_ref().filter(|rc| {
                resources::route_clusters(rc)
                    .iter()
                    .all(|c| warm_clusters.contains(c) || !st.clusters.contains_key(*c))
            });
            let mut warming = false;
            match usable {
                Some(rc) => {
                    let fresh = v
                        .composed
                        .as_ref()
                        .is_none_or(|(used, _)| !Arc::ptr_eq(used, rc));
                    if fresh {
                        let mut routes = HashMap::new();
                        routes.insert(rds.clone(), rc.clone());
                        let env = Env {
                            ads_configured: self.inner.env_ads,
                            cluster_names: HashSet::new(),
                            ..self.local_env()
                        };
                        match resources::listener(&env, &v.path, v.index, v.proto.clone(), &routes)
                        {
                            Ok(t) => v.composed = Some((rc.clone(), Arc::new(t.listener))),
                            Err(err) => tracing::error!("xDS: {err}"),
                        }
                    }
                }
                None => {
                    warming = true;
                    // The listener's own `rds.config_source.initial_fetch_timeout`.
                    if timed_out(e.added, fetch_timeout, now) && v.composed.is_none() {
                        // Envoy starts the listener with no routes when RDS never answers.
                        warming = false;
                        v.composed =
                            Some((Arc::new(model::RouteConfig::default()), v.base.clone()));
                        if let Some(b) = &v.rds_stats {
                            b.init_fetch_timeout.inc();
                        }
                    } else if v.composed.is_none() {
                        note(e.added, fetch_timeout);
                    }
                }
            }
            // A listener whose RDS timed out serves with no routes: warm, as in Envoy, even
            // while it still waits for the routes.
            if warming && v.composed.is_none() {
                all_warm = false;
            }
            if let Some((_, l)) = &v.composed {
                v.previous = None;
                listeners.push(l.clone());
            } else if let Some(l) = &v.previous {
                listeners.push(l.clone());
            }
            if let Some(d) = dump_entry(name, e, warming && e.value.composed.is_none()) {
                listener_dump.push(d);
            }
        }
        if !st.gate_open {
            return next_deadline;
        }
        let mut routes_dump = Vec::new();
        for (name, e) in &st.routes {
            if let Some(d) = dump_entry(name, e, false) {
                routes_dump.push(d);
            }
        }
        let mut endpoint_dump = Vec::new();
        for (name, e) in &st.endpoints {
            if let Some(d) = dump_entry(name, e, false) {
                endpoint_dump.push(d);
            }
        }
        let base = &self.inner.base;
        let config = model::Bootstrap {
            node: base.node.clone(),
            admin: base.admin.clone(),
            listeners,
            clusters,
            dump: base.dump.clone(),
            dynamic: base.dynamic.clone(),
            eds,
            dynamic_dump: Arc::new(model::DynamicDump {
                listeners: listener_dump,
                clusters: cluster_dump,
                route_configs: routes_dump,
                endpoint_configs: endpoint_dump,
                lds_version: st.versions.get(LISTENER_TYPE).cloned().unwrap_or_default(),
                cds_version: st.versions.get(CLUSTER_TYPE).cloned().unwrap_or_default(),
            }),
        };
        // Before the publish, so whoever applies this configuration sees it is ready.
        if all_warm {
            self.inner
                .ready
                .send_if_modified(|r| !std::mem::replace(r, true));
        }
        self.inner.out.send_replace(Some(Arc::new(config)));
        next_deadline
    }

    fn schedule(&self, deadline: Option<Instant>) {
        let mut timer = self.inner.timer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = timer.take() {
            t.abort();
        }
        let Some(deadline) = deadline else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        *timer = Some(rt.spawn(async move {
            tokio::time::sleep_until(deadline).await;
            if let Some(inner) = weak.upgrade() {
                let d = Dynamic { inner };
                let next = ads::off_worker(|| {
                    let mut st = d.lock();
                    d.compose(&mut st)
                });
                d.schedule(next);
            }
        }));
    }

    fn save(&self, st: &State, type_url: &str) {
        let Some(w) = self.inner.store.clone() else {
            return;
        };
        fn held<T>(m: &BTreeMap<String, Entry<T>>) -> Vec<Resource> {
            m.iter()
                .filter(|(_, e)| e.origin.is_ads())
                .filter_map(|(n, e)| {
                    Some(Resource {
                        name: n.clone(),
                        version: e.version.clone(),
                        body: (*e.body.clone()?).clone(),
                    })
                })
                .collect()
        }
        let resources = match type_url {
            LISTENER_TYPE => held(&st.listeners),
            ROUTE_TYPE => held(&st.routes),
            CLUSTER_TYPE => held(&st.clusters),
            ENDPOINT_TYPE => held(&st.endpoints),
            _ => return,
        };
        let version = st.versions.get(type_url).cloned().unwrap_or_default();
        let type_url = type_url.to_string();
        let generation = {
            let mut g = w.generation.lock().unwrap_or_else(|e| e.into_inner());
            let n = g.entry(type_url.clone()).or_default();
            *n += 1;
            *n
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn_blocking(move || {
            // Writes are serialised; a set already superseded by a newer queued one skips
            // itself, so an older set never lands after a newer one.
            let _w = w.writing.lock().unwrap_or_else(|e| e.into_inner());
            let latest = w
                .generation
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&type_url)
                .copied();
            if latest != Some(generation) {
                return;
            }
            if let Err(e) = w.store.save(&type_url, &version, &resources) {
                tracing::error!(%type_url, "xDS store: cannot save: {e}");
            }
        });
    }
}

impl ResourceSource {
    fn is_cp_or_store(self) -> bool {
        matches!(self, ResourceSource::ControlPlane | ResourceSource::Store)
    }
}

impl State {
    fn clone_for_rollback(&self) -> Rollback {
        Rollback {
            listeners: self.listeners.clone(),
            routes: self.routes.clone(),
            clusters: self.clusters.clone(),
            endpoints: self.endpoints.clone(),
            versions: self.versions.clone(),
        }
    }

    fn restore(&mut self, r: Rollback) {
        self.listeners = r.listeners;
        self.routes = r.routes;
        self.clusters = r.clusters;
        self.endpoints = r.endpoints;
        self.versions = r.versions;
    }
}

struct Rollback {
    listeners: BTreeMap<String, Entry<ListenerVal>>,
    routes: BTreeMap<String, Entry<Arc<model::RouteConfig>>>,
    clusters: BTreeMap<String, Entry<ClusterVal>>,
    endpoints: BTreeMap<String, Entry<Arc<model::LoadAssignment>>>,
    versions: HashMap<String, String>,
}

/// Whether a fetch that started at `since` with `timeout` (`None`: wait forever) gave up.
fn timed_out(since: Instant, timeout: Option<Duration>, now: Instant) -> bool {
    timeout.is_some_and(|t| now >= since + t)
}

/// Keeps one of each block (listeners sharing a route configuration and prefix share it).
fn dedup_arcs(v: &mut Vec<Arc<SubStats>>) {
    let mut seen = HashSet::new();
    v.retain(|b| seen.insert(Arc::as_ptr(b)));
}

fn dump_entry<T>(name: &str, e: &Entry<T>, warming: bool) -> Option<model::DynamicEntry> {
    let Origin::Dynamic(source) = e.origin else {
        return None;
    };
    let body = e.body.clone()?;
    Some(model::DynamicEntry {
        name: name.to_string(),
        version_info: e.version.clone(),
        last_updated: e.last_updated,
        source,
        warming,
        body: Arc::new(AnyBody(body)),
    })
}

impl Handler for Dynamic {
    fn apply(&self, type_url: &str, version_info: &str, update: Update) -> Result<(), String> {
        self.apply_source(type_url, version_info, update, ResourceSource::ControlPlane)
    }

    fn subscriptions(&self) -> watch::Receiver<Subscriptions> {
        self.inner.subs.subscribe()
    }

    fn connection_failed(&self) {
        Dynamic::connection_failed(self);
    }

    fn rejected(&self, type_url: &str) {
        let st = self.lock();
        self.count_rejected(&st, type_url);
    }

    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        fn of<T>(m: &BTreeMap<String, Entry<T>>) -> HashMap<String, String> {
            m.iter()
                .filter(|(_, e)| e.origin.is_ads())
                .map(|(n, e)| (n.clone(), e.version.clone()))
                .collect()
        }
        let st = self.lock();
        match type_url {
            LISTENER_TYPE => of(&st.listeners),
            ROUTE_TYPE => of(&st.routes),
            CLUSTER_TYPE => of(&st.clusters),
            ENDPOINT_TYPE => of(&st.endpoints),
            _ => HashMap::new(),
        }
    }
}
