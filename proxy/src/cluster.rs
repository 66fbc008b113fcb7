//! Clusters at run time: hosts with health, weights and per-host stats and pools; load balancing
//! (round robin, least request, random) over a precomputed [`LbState`] that is rebuilt when hosts
//! change and read lock-free per pick; circuit breakers; STRICT_DNS re-resolution.
//! Picking a host never locks (see [`crate::lb`] for its one allocation per thread and rebuild).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use strait_xds::model::{self, DiscoveryType, DnsLookupFamily, EndpointAddress, HealthStatus};

use crate::admin::{ClusterView, HostView};
use crate::health::{self, HostHealth};
use crate::lb::{BuildInput, LbContext, LbHealth};
use crate::pool::HostPool;
use crate::stats::{ClusterStats, HostStats, Store};

// === Host ===

/// One upstream endpoint.
#[derive(Debug)]
pub struct Host {
    pub address: SocketAddr,
    /// `endpoint.hostname`, or the DNS name for STRICT_DNS; may be empty.
    pub hostname: String,
    pub locality: model::Locality,
    pub priority: u32,
    pub weight: u32,
    /// The locality's `load_balancing_weight`; 0 when unset (such a locality gets no traffic
    /// under locality-weighted LB).
    pub locality_weight: u32,
    pub health: HealthStatus,
    pub stats: Arc<HostStats>,
    pub(crate) pool: HostPool,
    /// Active-check and outlier state, shared by every `Host` built for this address.
    pub(crate) hh: Arc<HostHealth>,
}

impl Host {
    /// Envoy's `/clusters` `health_flags`: `healthy`, or every flag that is set
    /// (`/failed_active_hc/failed_outlier_check/failed_eds_health/...`).
    pub fn health_flags(&self) -> String {
        let mut out = String::new();
        let eds = [
            matches!(self.health, HealthStatus::Unhealthy | HealthStatus::Timeout),
            self.health == HealthStatus::Degraded,
            self.health == HealthStatus::Draining,
        ];
        self.hh.flag_names(eds, &mut out);
        if out.is_empty() {
            out.push_str("healthy");
        }
        out
    }

    /// How load balancing counts the host: excluded when EDS says DRAINING, when pending its
    /// first active check, or after `x-envoy-immediate-health-check-fail` (Envoy's
    /// `excludeBasedOnHealthFlag`), then healthy, degraded or unhealthy.
    pub fn lb_health(&self) -> LbHealth {
        if self.health == HealthStatus::Draining || self.hh.excluded() {
            LbHealth::Excluded
        } else if self.healthy() {
            LbHealth::Healthy
        } else if self.degraded() {
            LbHealth::Degraded
        } else {
            LbHealth::Unhealthy
        }
    }

    /// Active-check and outlier-ejection state of this host.
    pub fn health_state(&self) -> &HostHealth {
        &self.hh
    }

    /// Envoy's HEALTHY: EDS healthy / unknown, passing active checks, not ejected, not degraded.
    pub fn healthy(&self) -> bool {
        self.usable() && !self.hh.has(health::DEGRADED_ACTIVE_HC)
    }

    /// Envoy's DEGRADED: EDS degraded or `x-envoy-degraded`, and not otherwise unhealthy.
    pub fn degraded(&self) -> bool {
        self.hh.passes()
            && (self.health == HealthStatus::Degraded
                || (self.hh.has(health::DEGRADED_ACTIVE_HC)
                    && matches!(self.health, HealthStatus::Healthy | HealthStatus::Unknown)))
    }

    fn usable(&self) -> bool {
        matches!(self.health, HealthStatus::Healthy | HealthStatus::Unknown)
            && self.hh.passes()
            && !self.hh.has(health::DEGRADED_ACTIVE_HC)
    }

    /// The Host header `auto_host_rewrite` sends: the hostname when known, else the address.
    pub fn authority(&self) -> String {
        if self.hostname.is_empty() {
            self.address.to_string()
        } else {
            self.hostname.clone()
        }
    }
}

// === Circuit breakers ===

/// Per-cluster resource counters checked against `circuit_breakers` (DEFAULT priority).
#[derive(Debug, Default)]
pub struct Breakers {
    pub connections: AtomicU32,
    pub pending: AtomicU32,
    pub requests: AtomicU32,
    pub retries: AtomicU32,
}

impl Breakers {
    /// Takes one unit of `counter` if it stays within `max`.
    pub fn try_acquire(counter: &AtomicU32, max: u32) -> bool {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                if v < max {
                    Some(v + 1)
                } else {
                    None
                }
            })
            .is_ok()
    }

    pub fn release(counter: &AtomicU32) {
        let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
    }
}

/// What every host's pool needs to know about its cluster.
#[derive(Debug)]
pub struct ClusterInfo {
    pub config: Arc<model::Cluster>,
    pub stats: Arc<ClusterStats>,
    pub breakers: Breakers,
    /// Request / retry counters of the HIGH routing priority (`circuit_breakers_high`).
    pub breakers_high: Breakers,
}

// === LbState ===

/// Hosts and picking tables; see [`crate::lb`].
pub use crate::lb::LbState;

// === ClusterState ===

/// One cluster's run-time state.
#[derive(Debug)]
pub struct ClusterState {
    pub info: Arc<ClusterInfo>,
    lb: ArcSwap<LbState>,
    /// The bootstrap's local cluster, for zone-aware routing (set by [`ClusterManager`]).
    local: std::sync::Mutex<Weak<ClusterState>>,
    /// Clusters whose zone-aware routing reads this one as their local cluster.
    dependents: std::sync::Mutex<Vec<Weak<ClusterState>>>,
    /// The load assignment's `policy` (overprovisioning factor), replaced by EDS updates.
    assignment: std::sync::Mutex<model::AssignmentPolicy>,
    host_stats: Arc<std::sync::Mutex<HashMap<SocketAddr, Arc<HostStats>>>>,
    /// Health and ejection state by address, kept while the address stays in the cluster.
    host_health: std::sync::Mutex<HashMap<SocketAddr, Arc<HostHealth>>>,
    /// Active health checking, once started (see [`ClusterState::start_health`]).
    checker: std::sync::OnceLock<(std::sync::Weak<ClusterState>, health::Checker)>,
    /// Outlier detection's interval task.
    outlier_task: std::sync::OnceLock<tokio::task::JoinHandle<()>>,
    /// The detector's last success-rate average / threshold (external, local origin), for
    /// `/clusters`.
    outlier_rates: std::sync::Mutex<[Option<f64>; 4]>,
    /// Serialises LB rebuilds: a health change rebuilding from the current hosts must not
    /// overwrite a concurrent host update with the old host list.
    writer: std::sync::Mutex<()>,
}

impl Drop for ClusterState {
    fn drop(&mut self) {
        if let Some(t) = self.outlier_task.get() {
            t.abort();
        }
    }
}

impl ClusterState {
    /// Builds the cluster; STATIC hosts are ready at once, STRICT_DNS hosts after [`Self::resolve`].
    pub fn new(config: Arc<model::Cluster>, store: &Store) -> Arc<ClusterState> {
        let info = Arc::new(ClusterInfo {
            stats: store.cluster(&config.name),
            config,
            breakers: Breakers::default(),
            breakers_high: Breakers::default(),
        });
        let assignment = info.config.load_assignment.policy;
        let cs = Arc::new(ClusterState {
            info,
            lb: ArcSwap::from_pointee(LbState::default()),
            local: std::sync::Mutex::new(Weak::new()),
            dependents: Default::default(),
            assignment: std::sync::Mutex::new(assignment),
            host_stats: Default::default(),
            host_health: Default::default(),
            checker: std::sync::OnceLock::new(),
            outlier_task: std::sync::OnceLock::new(),
            outlier_rates: Default::default(),
            writer: Default::default(),
        });
        if cs.info.config.discovery == DiscoveryType::Static {
            let mut hosts = Vec::new();
            for group in &cs.info.config.load_assignment.endpoints {
                for ep in &group.lb_endpoints {
                    if let EndpointAddress::Ip(addr) = ep.address {
                        let hostname = ep.hostname.clone().unwrap_or_default();
                        hosts.push(cs.make_host(addr, hostname, group, ep));
                    }
                }
            }
            cs.set_hosts(hosts);
        }
        cs
    }

    pub fn name(&self) -> &str {
        &self.info.config.name
    }

    pub fn stats(&self) -> &ClusterStats {
        &self.info.stats
    }

    fn make_host(
        &self,
        address: SocketAddr,
        hostname: String,
        group: &model::LocalityLbEndpoints,
        ep: &model::LbEndpoint,
    ) -> Arc<Host> {
        // Host stats outlive host rebuilds (DNS refresh), as Envoy keeps them per address.
        let stats = self
            .host_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(address)
            .or_default()
            .clone();
        let hh = self
            .host_health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(address)
            .or_insert_with(|| {
                let cfg = &self.info.config;
                // Envoy marks hosts pending only in `updateDynamicHostList` (EDS, DNS), and
                // only with `ignore_new_hosts_until_first_hc`.
                let pending = cfg.lb.ignore_new_hosts_until_first_hc
                    && cfg.discovery != DiscoveryType::Static;
                Arc::new(HostHealth::new(!cfg.health_checks.is_empty(), pending))
            })
            .clone();
        Arc::new(Host {
            address,
            hostname,
            locality: group.locality.clone(),
            priority: group.priority,
            weight: ep.load_balancing_weight.max(1),
            locality_weight: group.load_balancing_weight.unwrap_or(0),
            health: ep.health_status,
            stats: stats.clone(),
            pool: HostPool::new(self.info.clone(), address, stats.clone()),
            hh,
        })
    }

    fn set_hosts(&self, hosts: Vec<Arc<Host>>) {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        // A host that leaves forgets its health; one that comes back starts afresh, as in Envoy.
        let ejections = &self.info.stats.outlier_detection.ejections_active;
        self.host_health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|a, hh| {
                let keep = hosts.iter().any(|h| h.address == *a);
                if !keep && hh.has(health::FAILED_OUTLIER_CHECK) {
                    ejections.dec();
                }
                keep
            });
        if let Some((me, checker)) = self.checker.get() {
            if let Some(me) = me.upgrade() {
                checker.sync(&me, &hosts);
            }
        }
        self.rebuild(hosts);
    }

    /// Records the outlier detector's success-rate averages and thresholds (admin only).
    pub(crate) fn set_outlier_rates(&self, rates: [Option<f64>; 4]) {
        *self.outlier_rates.lock().unwrap_or_else(|e| e.into_inner()) = rates;
    }

    /// Rebuilds the picking tables after a host's health or ejection changed (off the request
    /// path except for an outlier ejection, which is rare).
    pub fn health_changed(&self) {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let hosts = self.lb.load().hosts.clone();
        self.rebuild(hosts);
    }

    /// Starts active health checking and outlier detection, and waits for the first round of
    /// checks (Envoy's cluster warming), at most the longest check timeout. Idempotent.
    pub async fn start_health(self: &Arc<Self>) {
        if self.outlier_task.get().is_none() {
            if let Some(t) = crate::outlier::spawn(self) {
                let _ = self.outlier_task.set(t);
            }
        }
        let cfg = &self.info.config.health_checks;
        if cfg.is_empty() || self.checker.get().is_some() {
            return;
        }
        self.info
            .stats
            .health_check
            .enabled
            .store(true, Ordering::Relaxed);
        let _ = self
            .checker
            .set((Arc::downgrade(self), health::Checker::new()));
        let Some((_, checker)) = self.checker.get() else {
            return;
        };
        let firsts = checker.sync(self, &self.hosts());
        let bound = cfg
            .iter()
            .map(|c| c.timeout + c.initial_jitter)
            .max()
            .unwrap_or_default()
            + std::time::Duration::from_millis(100);
        let _ = tokio::time::timeout(bound, futures_util::future::join_all(firsts)).await;
    }

    fn rebuild(&self, hosts: Vec<Arc<Host>>) {
        let s = &self.info.stats;
        s.membership_total.set(hosts.len() as i64);
        s.membership_healthy
            .set(hosts.iter().filter(|h| h.usable()).count() as i64);
        s.membership_degraded
            .set(hosts.iter().filter(|h| h.degraded()).count() as i64);
        if !self.info.config.health_checks.is_empty() {
            let hc = &s.health_check;
            hc.healthy.set(
                hosts
                    .iter()
                    .filter(|h| !h.hh.has(health::FAILED_ACTIVE_HC))
                    .count() as i64,
            );
            hc.degraded.set(
                hosts
                    .iter()
                    .filter(|h| h.hh.has(health::DEGRADED_ACTIVE_HC))
                    .count() as i64,
            );
        }
        s.membership_excluded.set(
            hosts
                .iter()
                .filter(|h| h.lb_health() == LbHealth::Excluded)
                .count() as i64,
        );
        s.max_host_weight
            .set(hosts.iter().map(|h| i64::from(h.weight)).max().unwrap_or(0));
        let local = self
            .local
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade();
        let local_hosts = local.as_ref().map(|l| l.hosts());
        let assignment = *self.assignment.lock().unwrap_or_else(|e| e.into_inner());
        let cfg = &self.info.config;
        let input = BuildInput {
            policy: cfg.lb_policy,
            lb: &cfg.lb,
            assignment,
            local_hosts: local_hosts.as_deref(),
            stats: s,
        };
        self.lb.store(Arc::new(LbState::build(hosts, &input)));
        // Zone-aware clusters that use this one as their local cluster follow its changes.
        let deps: Vec<Arc<ClusterState>> = self
            .dependents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for d in deps {
            if !std::ptr::eq(Arc::as_ptr(&d), self) {
                d.health_changed();
            }
        }
    }

    /// Makes `local` this cluster's local cluster (zone-aware routing) and rebuilds.
    fn set_local(self: &Arc<Self>, local: &Arc<ClusterState>) {
        *self.local.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(local);
        if !Arc::ptr_eq(self, local) {
            let mut deps = local.dependents.lock().unwrap_or_else(|e| e.into_inner());
            let me = Arc::downgrade(self);
            deps.retain(|w| w.strong_count() > 0 && !w.ptr_eq(&me));
            deps.push(me);
        }
        self.health_changed();
    }

    /// The current picking tables (priority plan, hosts).
    pub fn lb_state(&self) -> arc_swap::Guard<Arc<LbState>> {
        self.lb.load()
    }

    pub fn hosts(&self) -> Vec<Arc<Host>> {
        self.lb.load().hosts.clone()
    }

    /// Chooses a host per the cluster's LB policy, or `None` when there is none to choose.
    pub fn pick(&self) -> Option<Arc<Host>> {
        self.lb.load().pick(&LbContext::default(), &self.info.stats)
    }

    /// A pick with a route hash, a priority-load override or a host predicate.
    pub fn pick_with(&self, ctx: &LbContext<'_>) -> Option<Arc<Host>> {
        self.lb.load().pick(ctx, &self.info.stats)
    }

    /// A pick that ignores the priorities in `excluded` (a bit per priority), for a retry under
    /// `previous_priorities`: Envoy's adjusted priority load; when nothing is left, the normal
    /// load (Envoy resets the attempted priorities then).
    pub fn pick_excluding(&self, excluded: u64) -> Option<Arc<Host>> {
        self.pick_hashed(None, excluded)
    }

    /// [`Self::pick_excluding`] with the route's hash (RING_HASH / MAGLEV).
    pub fn pick_hashed(&self, hash: Option<u64>, excluded: u64) -> Option<Arc<Host>> {
        self.pick_retry(hash, excluded, &[], 0)
    }

    /// One attempt's pick as Envoy's router makes it: the route's `hash`, the priorities in
    /// `excluded` left out (`previous_priorities`), and a host in `avoid` refused and picked
    /// again up to `attempts` more times (`previous_hosts` with
    /// `host_selection_retry_max_attempts`); hashing policies move along the ring / Maglev
    /// table on each re-pick. When every pick is refused, the last one stands, as in Envoy.
    pub fn pick_retry(
        &self,
        hash: Option<u64>,
        excluded: u64,
        avoid: &[Arc<Host>],
        attempts: u32,
    ) -> Option<Arc<Host>> {
        let reject = |h: &Host| avoid.iter().any(|a| a.address == h.address);
        let lb = self.lb.load();
        let load = if excluded == 0 {
            None
        } else {
            let plan = lb.plan();
            crate::lb::priority::loads_excluding(&plan.health, &plan.degraded, excluded)
        };
        let ctx = LbContext {
            hash,
            priority_load: load.as_ref(),
            reject: if avoid.is_empty() {
                None
            } else {
                Some(&reject)
            },
            selection_attempts: if avoid.is_empty() { 0 } else { attempts },
        };
        lb.pick(&ctx, &self.info.stats)
    }

    /// Resolves every STRICT_DNS endpoint once and installs the result when it changed.
    /// A failed lookup keeps the previous hosts, as Envoy does.
    pub async fn resolve(&self) {
        let cfg = self.info.config.clone();
        let stats = &self.info.stats;
        stats.update_attempt.inc();
        let old = self.lb.load_full();
        let mut hosts: Vec<Arc<Host>> = Vec::new();
        for group in &cfg.load_assignment.endpoints {
            for ep in &group.lb_endpoints {
                let (name, port) = match &ep.address {
                    EndpointAddress::Dns { host, port } => (host.clone(), *port),
                    EndpointAddress::Ip(addr) => {
                        hosts.push(self.make_host(
                            *addr,
                            ep.hostname.clone().unwrap_or_default(),
                            group,
                            ep,
                        ));
                        continue;
                    }
                };
                let addrs = match tokio::net::lookup_host((name.as_str(), port)).await {
                    Ok(a) => filter_family(a.collect(), cfg.dns_lookup_family),
                    Err(e) => {
                        tracing::warn!(cluster = %cfg.name, host = %name, error = %e, "DNS resolution failed");
                        stats.update_failure.inc();
                        return;
                    }
                };
                let hostname = ep.hostname.clone().unwrap_or_else(|| name.clone());
                for addr in addrs {
                    // Keep the existing host (and its pooled connections) when nothing changed.
                    let same = old.hosts.iter().find(|h| {
                        h.address == addr
                            && h.priority == group.priority
                            && h.locality == group.locality
                            && h.weight == ep.load_balancing_weight.max(1)
                            && h.locality_weight == group.load_balancing_weight.unwrap_or(0)
                            && h.health == ep.health_status
                            && h.hostname == hostname
                    });
                    match same {
                        Some(h) => hosts.push(h.clone()),
                        None => hosts.push(self.make_host(addr, hostname.clone(), group, ep)),
                    }
                }
            }
        }
        stats.update_success.inc();
        let unchanged = hosts.len() == old.hosts.len()
            && hosts
                .iter()
                .zip(old.hosts.iter())
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if !unchanged {
            if hosts.is_empty() {
                stats.update_empty.inc();
            }
            self.set_hosts(hosts);
        }
    }

    /// Re-resolves every `dns_refresh_rate` until the task is aborted.
    pub async fn run_dns(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.info.config.dns_refresh_rate).await;
            self.resolve().await;
        }
    }

    pub fn view(&self) -> ClusterView {
        ClusterView {
            config: self.info.config.clone(),
            hosts: self
                .lb
                .load()
                .hosts
                .iter()
                .map(|h| HostView {
                    address: h.address,
                    hostname: h.hostname.clone(),
                    locality: h.locality.clone(),
                    priority: h.priority,
                    weight: h.weight,
                    health_flags: h.health_flags(),
                    stats: h.stats.clone(),
                    success_rate: h.hh.outlier.success_rate(),
                    local_origin_success_rate: h.hh.outlier.local_origin_success_rate(),
                })
                .collect(),
            outlier: self.info.config.outlier_detection.as_ref().map(|_| {
                let r = *self.outlier_rates.lock().unwrap_or_else(|e| e.into_inner());
                r.map(|v| v.unwrap_or(-1.0))
            }),
        }
    }
}

/// Applies `dns_lookup_family` as Envoy does (AUTO: IPv6 if any, else IPv4).
fn filter_family(addrs: Vec<SocketAddr>, family: DnsLookupFamily) -> Vec<SocketAddr> {
    let v4: Vec<SocketAddr> = addrs.iter().copied().filter(|a| a.is_ipv4()).collect();
    let v6: Vec<SocketAddr> = addrs.iter().copied().filter(|a| a.is_ipv6()).collect();
    match family {
        DnsLookupFamily::V4Only => v4,
        DnsLookupFamily::V6Only => v6,
        DnsLookupFamily::Auto => {
            if v6.is_empty() {
                v4
            } else {
                v6
            }
        }
        DnsLookupFamily::V4Preferred => {
            if v4.is_empty() {
                v6
            } else {
                v4
            }
        }
        DnsLookupFamily::All => addrs,
    }
}

// === EDS updates ===

impl ClusterState {
    /// Applies an EDS update: hosts whose address and attributes stay keep their `Host` (pool,
    /// stats, health and outlier state); the rest are built anew. Off the request path.
    pub fn update_endpoints(&self, la: &model::LoadAssignment) {
        *self.assignment.lock().unwrap_or_else(|e| e.into_inner()) = la.policy;
        let current = self.hosts();
        let by_addr: HashMap<SocketAddr, &Arc<Host>> =
            current.iter().map(|h| (h.address, h)).collect();
        let mut hosts = Vec::new();
        for group in &la.endpoints {
            for ep in &group.lb_endpoints {
                let EndpointAddress::Ip(addr) = ep.address else {
                    continue;
                };
                let hostname = ep.hostname.clone().unwrap_or_default();
                let same = by_addr.get(&addr).filter(|h| {
                    h.hostname == hostname
                        && h.locality == group.locality
                        && h.priority == group.priority
                        && h.weight == ep.load_balancing_weight.max(1)
                        && h.locality_weight == group.load_balancing_weight.unwrap_or(0)
                        && h.health == ep.health_status
                });
                match same {
                    Some(h) => hosts.push((*h).clone()),
                    None => hosts.push(self.make_host(addr, hostname, group, ep)),
                }
            }
        }
        // Stats of hosts EDS removed go with them (as in Envoy), so endpoint churn does not
        // grow memory.
        let kept: std::collections::HashSet<SocketAddr> = hosts.iter().map(|h| h.address).collect();
        self.host_stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|a, _| kept.contains(a));
        self.set_hosts(hosts);
    }
}

// === ClusterManager ===

/// Every cluster of one config snapshot, by name.
#[derive(Debug, Default)]
pub struct ClusterManager {
    clusters: Vec<Arc<ClusterState>>,
    by_name: HashMap<String, usize, BuildHasherDefault<NameHasher>>,
}

/// FxHash (rustc's hasher) for the per-request cluster lookup: SipHash was most of its ~260
/// instructions. The keys are cluster names from config; a request can only look a name up
/// (`cluster_header`), never insert one, so a weaker hash cannot be used to degrade the table.
#[derive(Debug, Default, Clone, Copy)]
struct NameHasher(u64);

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        const SEED: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(SEED);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(SEED);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl ClusterManager {
    pub fn new(configs: &[Arc<model::Cluster>], store: &Store) -> ClusterManager {
        let mut cm = ClusterManager::default();
        for c in configs {
            cm.by_name.insert(c.name.clone(), cm.clusters.len());
            cm.clusters.push(ClusterState::new(c.clone(), store));
        }
        cm.wire_local();
        cm
    }

    /// Points every cluster that names a local cluster (`cluster_manager.local_cluster_name`) at
    /// it, for zone-aware routing.
    fn wire_local(&self) {
        for c in &self.clusters {
            let Some(name) = &c.info.config.lb.local_cluster_name else {
                continue;
            };
            if let Some(local) = self.get(name) {
                c.set_local(local);
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ClusterState>> {
        self.by_name.get(name).map(|&i| &self.clusters[i])
    }

    pub fn all(&self) -> &[Arc<ClusterState>] {
        &self.clusters
    }

    /// A manager over clusters already built (xDS updates keep the ones that stay).
    pub fn from_states(states: Vec<Arc<ClusterState>>) -> ClusterManager {
        let mut cm = ClusterManager::default();
        for c in states {
            cm.by_name.insert(c.name().to_string(), cm.clusters.len());
            cm.clusters.push(c);
        }
        cm.wire_local();
        cm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use strait_xds::model::LbPolicy;

    fn cluster(policy: LbPolicy, eps: &[(u16, u32, HealthStatus, u32)]) -> Arc<ClusterState> {
        ClusterState::new(Arc::new(config(policy, eps)), &Store::default())
    }

    fn config(policy: LbPolicy, eps: &[(u16, u32, HealthStatus, u32)]) -> model::Cluster {
        let groups = eps
            .iter()
            .map(
                |&(port, weight, health, priority)| model::LocalityLbEndpoints {
                    locality: Default::default(),
                    priority,
                    load_balancing_weight: None,
                    lb_endpoints: vec![model::LbEndpoint {
                        address: EndpointAddress::Ip(SocketAddr::from(([127, 0, 0, 1], port))),
                        load_balancing_weight: weight,
                        health_status: health,
                        hostname: None,
                    }],
                },
            )
            .collect();
        model::Cluster {
            name: "c".into(),
            discovery: DiscoveryType::Static,
            connect_timeout: Duration::from_secs(1),
            lb_policy: policy,
            load_assignment: model::LoadAssignment {
                endpoints: groups,
                policy: Default::default(),
            },
            protocol: model::UpstreamProtocol::Http1,
            circuit_breakers: Default::default(),
            idle_timeout: None,
            dns_refresh_rate: Duration::from_secs(5),
            dns_lookup_family: DnsLookupFamily::Auto,
            health_checks: Vec::new(),
            outlier_detection: None,
            circuit_breakers_high: Default::default(),
            lb: Default::default(),
        }
    }

    fn counts(c: &ClusterState, n: usize) -> HashMap<u16, usize> {
        let mut m = HashMap::new();
        for _ in 0..n {
            *m.entry(c.pick().unwrap().address.port()).or_default() += 1;
        }
        m
    }

    #[test]
    fn round_robin_equal_and_weighted() {
        use HealthStatus::*;
        let c = cluster(
            LbPolicy::RoundRobin,
            &[(1, 1, Healthy, 0), (2, 1, Unknown, 0), (3, 1, Healthy, 0)],
        );
        assert_eq!(
            counts(&c, 300),
            HashMap::from([(1, 100), (2, 100), (3, 100)])
        );
        let c = cluster(
            LbPolicy::RoundRobin,
            &[(1, 1, Healthy, 0), (2, 3, Healthy, 0)],
        );
        assert_eq!(counts(&c, 400), HashMap::from([(1, 100), (2, 300)]));
        // Smooth: the light host is never starved for a whole cycle.
        let seq: Vec<u16> = (0..4).map(|_| c.pick().unwrap().address.port()).collect();
        assert_eq!(seq.iter().filter(|&&p| p == 1).count(), 1);
    }

    #[test]
    fn health_and_priority() {
        use HealthStatus::*;
        let c = cluster(
            LbPolicy::RoundRobin,
            &[(1, 1, Unhealthy, 0), (2, 1, Healthy, 0), (3, 1, Healthy, 1)],
        );
        // P0 at 50 % healthy: 1.4 × 50 = 70 % stays, 30 % spills to P1 (Envoy's priority load).
        let m = counts(&c, 2000);
        assert_eq!(m.get(&1), None);
        assert!((1250..1550).contains(&m[&2]), "{m:?}");
        let c = cluster(
            LbPolicy::Random,
            &[(1, 1, Unhealthy, 0), (2, 1, Healthy, 1)],
        );
        assert_eq!(counts(&c, 10), HashMap::from([(2, 10)]));
        let c = cluster(
            LbPolicy::Random,
            &[(1, 1, Degraded, 0), (2, 1, Draining, 0)],
        );
        assert_eq!(counts(&c, 10), HashMap::from([(1, 10)]));
        // Below the panic threshold Envoy ignores health.
        let c = cluster(
            LbPolicy::RoundRobin,
            &[
                (1, 1, Unhealthy, 0),
                (2, 1, Unhealthy, 0),
                (3, 1, Healthy, 0),
            ],
        );
        assert_eq!(counts(&c, 30).len(), 3);
        assert_eq!(c.stats().lb_healthy_panic.get(), 30);
        assert_eq!(c.view().hosts[0].health_flags, "/failed_eds_health");
    }

    #[test]
    fn least_request_prefers_idle_and_random_spreads() {
        use HealthStatus::*;
        let c = cluster(
            LbPolicy::LeastRequest { choice_count: 2 },
            &[(1, 1, Healthy, 0), (2, 1, Healthy, 0)],
        );
        c.hosts()[0].stats.rq_active.set(10);
        let m = counts(&c, 1000);
        // Host 1 only wins when both draws land on it (~1/4).
        assert!(m[&2] > 650, "{m:?}");
        let c = cluster(LbPolicy::Random, &[(1, 1, Healthy, 0), (2, 1, Healthy, 0)]);
        let m = counts(&c, 2000);
        assert!(m[&1] > 800 && m[&2] > 800, "{m:?}");
    }

    #[tokio::test]
    async fn strict_dns_resolves_and_keeps_hosts() {
        let mut cfg = config(LbPolicy::RoundRobin, &[]);
        cfg.discovery = DiscoveryType::StrictDns;
        cfg.dns_lookup_family = DnsLookupFamily::V4Only;
        cfg.load_assignment.endpoints = vec![model::LocalityLbEndpoints {
            locality: Default::default(),
            priority: 0,
            load_balancing_weight: None,
            lb_endpoints: vec![model::LbEndpoint {
                address: EndpointAddress::Dns {
                    host: "localhost".into(),
                    port: 8080,
                },
                load_balancing_weight: 1,
                health_status: HealthStatus::Unknown,
                hostname: None,
            }],
        }];
        let c = ClusterState::new(Arc::new(cfg), &Store::default());
        assert!(c.pick().is_none(), "no hosts before the first resolution");
        c.resolve().await;
        let h = c.pick().expect("resolved");
        assert_eq!(h.address, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(h.authority(), "localhost");
        c.resolve().await;
        assert!(
            Arc::ptr_eq(&h, &c.pick().unwrap()),
            "unchanged hosts are kept"
        );
        assert_eq!(c.stats().update_success.get(), 2);
    }

    #[test]
    fn breakers() {
        let c = AtomicU32::new(0);
        assert!(Breakers::try_acquire(&c, 1));
        assert!(!Breakers::try_acquire(&c, 1));
        Breakers::release(&c);
        assert!(Breakers::try_acquire(&c, 1));
    }
}
