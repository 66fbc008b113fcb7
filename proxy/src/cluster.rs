//! Clusters at run time: hosts with health, weights and per-host stats and pools; load balancing
//! (round robin, least request, random) over a precomputed [`LbState`] that is rebuilt when hosts
//! change and read lock-free per pick; circuit breakers; STRICT_DNS re-resolution.
//! Picking a host never locks and never allocates.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use strait_xds::model::{
    self, DiscoveryType, DnsLookupFamily, EndpointAddress, HealthStatus, LbPolicy,
};

use crate::admin::{ClusterView, HostView};
use crate::pool::HostPool;
use crate::stats::{ClusterStats, HostStats, Store};

/// Envoy's default `healthy_panic_threshold` (50%).
const PANIC_THRESHOLD_PERCENT: usize = 50;
/// Longest smooth weighted round-robin schedule; larger weight sums are scaled down to it.
const MAX_SCHEDULE: u64 = 4096;

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
    pub health: HealthStatus,
    pub stats: Arc<HostStats>,
    pub(crate) pool: HostPool,
}

impl Host {
    /// Envoy's `/clusters` `health_flags` for an EDS health status.
    pub fn health_flags(&self) -> &'static str {
        match self.health {
            HealthStatus::Healthy | HealthStatus::Unknown => "healthy",
            HealthStatus::Unhealthy | HealthStatus::Timeout => "/failed_eds_health",
            HealthStatus::Degraded => "/degraded_eds_health",
            HealthStatus::Draining => "/eds_status_draining",
        }
    }

    fn usable(&self) -> bool {
        matches!(self.health, HealthStatus::Healthy | HealthStatus::Unknown)
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
}

// === LbState ===

/// Hosts and the precomputed picking tables. Rebuilt off the request path on every host or
/// health change (the seam for priority-load and locality math).
#[derive(Debug, Default)]
pub struct LbState {
    /// Every host, for admin.
    pub hosts: Vec<Arc<Host>>,
    /// Hosts that picks choose from.
    pick: Vec<Arc<Host>>,
    /// Smooth weighted round-robin order over `pick`; empty when all weights are equal.
    schedule: Vec<u32>,
    /// Prefix sums of `pick` weights, for weighted random draws.
    cumulative: Vec<u64>,
    weighted: bool,
    /// Too few healthy hosts: picking ignores health, as Envoy's panic mode does.
    panic: bool,
}

impl LbState {
    pub fn build(hosts: Vec<Arc<Host>>) -> LbState {
        let mut priorities: Vec<u32> = hosts.iter().map(|h| h.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let in_prio = |p: u32| hosts.iter().filter(move |h| h.priority == p);
        let chosen = priorities
            .iter()
            .copied()
            .find(|&p| in_prio(p).any(|h| h.usable()))
            .or_else(|| {
                priorities
                    .iter()
                    .copied()
                    .find(|&p| in_prio(p).any(|h| h.health == HealthStatus::Degraded))
            })
            .or_else(|| priorities.first().copied());
        let mut pick = Vec::new();
        let mut panic = false;
        if let Some(p) = chosen {
            let total = in_prio(p).count();
            let healthy = in_prio(p).filter(|h| h.usable()).count();
            let degraded = in_prio(p)
                .filter(|h| h.health == HealthStatus::Degraded)
                .count();
            if (healthy + degraded) * 100 < PANIC_THRESHOLD_PERCENT * total {
                panic = true;
                pick = in_prio(p).cloned().collect();
            } else if healthy > 0 {
                pick = in_prio(p).filter(|h| h.usable()).cloned().collect();
            } else {
                pick = in_prio(p)
                    .filter(|h| h.health == HealthStatus::Degraded)
                    .cloned()
                    .collect();
            }
        }
        let weighted = pick.windows(2).any(|w| w[0].weight != w[1].weight);
        let mut cumulative = Vec::with_capacity(pick.len());
        let mut sum = 0u64;
        for h in &pick {
            sum += u64::from(h.weight.max(1));
            cumulative.push(sum);
        }
        let schedule = if weighted {
            smooth_wrr(&pick.iter().map(|h| h.weight).collect::<Vec<_>>())
        } else {
            Vec::new()
        };
        LbState {
            hosts,
            pick,
            schedule,
            cumulative,
            weighted,
            panic,
        }
    }

    fn weighted_random(&self) -> Option<&Arc<Host>> {
        let total = *self.cumulative.last()?;
        let r = fastrand::u64(0..total);
        let i = self.cumulative.partition_point(|&c| c <= r);
        self.pick.get(i)
    }
}

/// Smooth weighted round robin (nginx's): spreads each host's turns evenly over one cycle.
fn smooth_wrr(weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|&w| u64::from(w.max(1))).sum();
    let scaled: Vec<i64> = if total > MAX_SCHEDULE {
        weights
            .iter()
            .map(|&w| ((u64::from(w.max(1)) * MAX_SCHEDULE / total).max(1)) as i64)
            .collect()
    } else {
        weights.iter().map(|&w| i64::from(w.max(1))).collect()
    };
    let sum: i64 = scaled.iter().sum();
    let mut current = vec![0i64; scaled.len()];
    let mut out = Vec::with_capacity(sum as usize);
    for _ in 0..sum {
        let mut best = 0;
        for i in 0..scaled.len() {
            current[i] += scaled[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= sum;
        out.push(best as u32);
    }
    out
}

// === ClusterState ===

/// One cluster's run-time state.
#[derive(Debug)]
pub struct ClusterState {
    pub info: Arc<ClusterInfo>,
    lb: ArcSwap<LbState>,
    rr: AtomicUsize,
    host_stats: Arc<std::sync::Mutex<HashMap<SocketAddr, Arc<HostStats>>>>,
}

impl ClusterState {
    /// Builds the cluster; STATIC hosts are ready at once, STRICT_DNS hosts after [`Self::resolve`].
    pub fn new(config: Arc<model::Cluster>, store: &Store) -> Arc<ClusterState> {
        let info = Arc::new(ClusterInfo {
            stats: store.cluster(&config.name),
            config,
            breakers: Breakers::default(),
        });
        let cs = Arc::new(ClusterState {
            info,
            lb: ArcSwap::from_pointee(LbState::default()),
            rr: AtomicUsize::new(fastrand::usize(..)),
            host_stats: Default::default(),
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
        Arc::new(Host {
            address,
            hostname,
            locality: group.locality.clone(),
            priority: group.priority,
            weight: ep.load_balancing_weight.max(1),
            health: ep.health_status,
            stats: stats.clone(),
            pool: HostPool::new(self.info.clone(), address, stats.clone()),
        })
    }

    fn set_hosts(&self, hosts: Vec<Arc<Host>>) {
        let s = &self.info.stats;
        s.membership_total.set(hosts.len() as i64);
        s.membership_healthy
            .set(hosts.iter().filter(|h| h.usable()).count() as i64);
        s.membership_degraded.set(
            hosts
                .iter()
                .filter(|h| h.health == HealthStatus::Degraded)
                .count() as i64,
        );
        s.membership_excluded.set(0);
        s.max_host_weight
            .set(hosts.iter().map(|h| i64::from(h.weight)).max().unwrap_or(0));
        self.lb.store(Arc::new(LbState::build(hosts)));
    }

    pub fn hosts(&self) -> Vec<Arc<Host>> {
        self.lb.load().hosts.clone()
    }

    /// Chooses a host per the cluster's LB policy, or `None` when there is none to choose.
    pub fn pick(&self) -> Option<Arc<Host>> {
        let lb = self.lb.load();
        let n = lb.pick.len();
        if n == 0 {
            return None;
        }
        if lb.panic {
            self.info.stats.lb_healthy_panic.inc();
        }
        let host = match self.info.config.lb_policy {
            LbPolicy::RoundRobin => {
                let i = self.rr.fetch_add(1, Ordering::Relaxed);
                if lb.schedule.is_empty() {
                    &lb.pick[i % n]
                } else {
                    &lb.pick[lb.schedule[i % lb.schedule.len()] as usize]
                }
            }
            LbPolicy::Random => &lb.pick[fastrand::usize(..n)],
            LbPolicy::LeastRequest { choice_count } => {
                // P2C (or N choices) over active requests; with unequal weights the candidates
                // are drawn by weight, which approximates Envoy's weight / (active + 1).
                let mut best: Option<&Arc<Host>> = None;
                for _ in 0..choice_count.max(1) {
                    let cand = if lb.weighted {
                        lb.weighted_random().unwrap_or(&lb.pick[0])
                    } else {
                        &lb.pick[fastrand::usize(..n)]
                    };
                    best = match best {
                        Some(b) if b.stats.rq_active.get() <= cand.stats.rq_active.get() => Some(b),
                        _ => Some(cand),
                    };
                }
                best.unwrap_or(&lb.pick[0])
            }
        };
        Some(host.clone())
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
                    health_flags: h.health_flags().to_string(),
                    stats: h.stats.clone(),
                })
                .collect(),
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

// === ClusterManager ===

/// Every cluster of one config snapshot, by name.
#[derive(Debug, Default)]
pub struct ClusterManager {
    clusters: Vec<Arc<ClusterState>>,
    by_name: HashMap<String, usize>,
}

impl ClusterManager {
    pub fn new(configs: &[Arc<model::Cluster>], store: &Store) -> ClusterManager {
        let mut cm = ClusterManager::default();
        for c in configs {
            cm.by_name.insert(c.name.clone(), cm.clusters.len());
            cm.clusters.push(ClusterState::new(c.clone(), store));
        }
        cm
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ClusterState>> {
        self.by_name.get(name).map(|&i| &self.clusters[i])
    }

    pub fn all(&self) -> &[Arc<ClusterState>] {
        &self.clusters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
            load_assignment: model::LoadAssignment { endpoints: groups },
            protocol: model::UpstreamProtocol::Http1,
            circuit_breakers: Default::default(),
            idle_timeout: None,
            dns_refresh_rate: Duration::from_secs(5),
            dns_lookup_family: DnsLookupFamily::Auto,
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
        assert_eq!(counts(&c, 10), HashMap::from([(2, 10)]));
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

    #[test]
    fn schedule_scales_large_weights() {
        let s = smooth_wrr(&[1_000_000, 3_000_000]);
        assert_eq!(s.len(), 4096);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 1024);
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
