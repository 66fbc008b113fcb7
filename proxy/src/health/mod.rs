//! Active health checking with Envoy's semantics: one session per (host, `health_checks` entry)
//! probing over HTTP, TCP or gRPC, thresholds and edge intervals, and the per-host health flags
//! the load balancer and `/clusters` read. Runs off the request path; never blocks a request.

mod probe;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use strait_xds::model::HealthCheck;
use tokio::task::JoinHandle;

use crate::cluster::{ClusterState, Host};
use crate::outlier::HostOutlier;
use crate::stats::HealthCheckStats;

pub use probe::{grpc_check_request, grpc_serving, CheckResult};

// === Host health flags ===

/// `FAILED_ACTIVE_HC`: the active checker considers the host unhealthy.
pub const FAILED_ACTIVE_HC: u32 = 1 << 0;
/// `DEGRADED_ACTIVE_HC`: the last check answered `x-envoy-degraded`.
pub const DEGRADED_ACTIVE_HC: u32 = 1 << 1;
/// `PENDING_ACTIVE_HC`: not checked yet since it was added.
pub const PENDING_ACTIVE_HC: u32 = 1 << 2;
/// `FAILED_OUTLIER_CHECK`: ejected by outlier detection.
pub const FAILED_OUTLIER_CHECK: u32 = 1 << 3;
/// `EXCLUDED_VIA_IMMEDIATE_HC_FAIL`: answered `x-envoy-immediate-health-check-fail`.
pub const EXCLUDED_VIA_IMMEDIATE_HC_FAIL: u32 = 1 << 4;

/// Health and ejection state of one host address. Shared by every [`Host`] object built for
/// that address while it stays in the cluster, so state survives EDS / DNS updates.
#[derive(Debug, Default)]
pub struct HostHealth {
    flags: AtomicU32,
    pub outlier: HostOutlier,
}

impl HostHealth {
    /// A host of a cluster that has active health checks starts unhealthy and pending, as
    /// Envoy's do, until its first check.
    pub fn new(active_checks: bool) -> HostHealth {
        let h = HostHealth::default();
        if active_checks {
            h.set(FAILED_ACTIVE_HC | PENDING_ACTIVE_HC);
        }
        h
    }

    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Acquire)
    }

    pub fn has(&self, flag: u32) -> bool {
        self.flags() & flag != 0
    }

    pub fn set(&self, flag: u32) {
        self.flags.fetch_or(flag, Ordering::AcqRel);
    }

    pub fn clear(&self, flag: u32) {
        self.flags.fetch_and(!flag, Ordering::AcqRel);
    }

    /// No active-check or outlier flag makes the host unhealthy.
    pub fn passes(&self) -> bool {
        self.flags() & (FAILED_ACTIVE_HC | FAILED_OUTLIER_CHECK | EXCLUDED_VIA_IMMEDIATE_HC_FAIL)
            == 0
    }

    /// Envoy's `/clusters` flag suffixes for these flags, in Envoy's order.
    pub fn flag_names(&self, out: &mut String) {
        let f = self.flags();
        for (bit, name) in [
            (FAILED_ACTIVE_HC, "/failed_active_hc"),
            (FAILED_OUTLIER_CHECK, "/failed_outlier_check"),
            (DEGRADED_ACTIVE_HC, "/degraded_active_hc"),
            (PENDING_ACTIVE_HC, "/pending_active_hc"),
            (
                EXCLUDED_VIA_IMMEDIATE_HC_FAIL,
                "/excluded_via_immediate_hc_fail",
            ),
        ] {
            if f & bit != 0 {
                out.push_str(name);
            }
        }
    }
}

// === Session state machine ===

/// Whether a check changed the host's health (Envoy's `HealthTransition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Unchanged,
    Changed,
    /// The result differs from the state but a threshold delays the change.
    ChangePending,
}

/// One host's counters for one health check: Envoy's `ActiveHealthCheckSession`.
#[derive(Debug)]
pub struct Session {
    first_check: bool,
    num_healthy: u32,
    num_unhealthy: u32,
}

impl Default for Session {
    fn default() -> Self {
        Session {
            first_check: true,
            num_healthy: 0,
            num_unhealthy: 0,
        }
    }
}

impl Session {
    /// Applies one check result to the host's flags; returns the transition and whether the
    /// host is now healthy as far as active checking goes.
    pub fn on_result(
        &mut self,
        cfg: &HealthCheck,
        host: &HostHealth,
        stats: &HealthCheckStats,
        result: CheckResult,
    ) -> (Transition, bool) {
        let mut t = Transition::Unchanged;
        match result {
            CheckResult::Healthy { degraded } => {
                self.num_unhealthy = 0;
                if host.has(FAILED_ACTIVE_HC) {
                    // Envoy: the first check after a host is added marks it healthy at once.
                    self.num_healthy += 1;
                    if self.first_check || self.num_healthy >= cfg.healthy_threshold {
                        host.clear(FAILED_ACTIVE_HC | EXCLUDED_VIA_IMMEDIATE_HC_FAIL);
                        t = Transition::Changed;
                    } else {
                        t = Transition::ChangePending;
                    }
                }
                if degraded != host.has(DEGRADED_ACTIVE_HC) {
                    if degraded {
                        host.set(DEGRADED_ACTIVE_HC);
                    } else {
                        host.clear(DEGRADED_ACTIVE_HC);
                    }
                    t = Transition::Changed;
                }
                stats.success.inc();
            }
            CheckResult::Failed {
                network,
                retriable,
                immediate,
            } => {
                self.num_healthy = 0;
                if immediate {
                    host.set(EXCLUDED_VIA_IMMEDIATE_HC_FAIL);
                }
                if !host.has(FAILED_ACTIVE_HC) {
                    // Envoy: an active (non-network, non-retriable) failure is immediate; network
                    // failures and retriable statuses count toward unhealthy_threshold.
                    self.num_unhealthy += 1;
                    if (!network && !retriable) || self.num_unhealthy >= cfg.unhealthy_threshold {
                        host.set(FAILED_ACTIVE_HC);
                        t = Transition::Changed;
                    } else {
                        t = Transition::ChangePending;
                    }
                }
                stats.failure.inc();
                if network {
                    stats.network_failure.inc();
                }
            }
        }
        if host.has(PENDING_ACTIVE_HC) {
            host.clear(PENDING_ACTIVE_HC);
            // Leaving pending changes what the load balancer may pick.
            if t == Transition::Unchanged {
                t = Transition::Changed;
            }
        }
        self.first_check = false;
        (t, !host.has(FAILED_ACTIVE_HC))
    }
}

/// Envoy's `HealthCheckerImplBase::interval`: the wait before the next check, with jitter.
/// `had_traffic`: the cluster has ever opened a connection for a request.
pub fn next_interval(
    cfg: &HealthCheck,
    healthy: bool,
    t: Transition,
    had_traffic: bool,
) -> Duration {
    let changed = t == Transition::Changed;
    let base = if had_traffic {
        match (healthy, changed) {
            (true, true) => cfg.healthy_edge_interval,
            (true, false) => cfg.interval,
            (false, true) => cfg.unhealthy_edge_interval,
            (false, false) => cfg.unhealthy_interval,
        }
    } else if healthy && !changed {
        cfg.no_traffic_healthy_interval
    } else {
        cfg.no_traffic_interval
    };
    let mut ms = base.as_millis() as u64;
    let pct = cfg.interval_jitter_percent as u64 * ms / 100;
    if pct > 0 {
        ms += fastrand::u64(0..pct);
    }
    let j = cfg.interval_jitter.as_millis() as u64;
    if j > 0 {
        ms += fastrand::u64(0..j);
    }
    Duration::from_millis(ms)
}

// === Checker: the sessions of one cluster ===

/// The active health checker of one cluster: a task per (host, health check).
#[derive(Debug)]
pub struct Checker {
    sessions: Mutex<HashMap<SocketAddr, Vec<JoinHandle<()>>>>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        let s = self.sessions.get_mut().unwrap_or_else(|e| e.into_inner());
        for h in s.drain().flat_map(|(_, v)| v) {
            h.abort();
        }
    }
}

impl Checker {
    pub fn new() -> Checker {
        Checker {
            sessions: Mutex::default(),
        }
    }

    /// Starts sessions for hosts not checked yet and stops those of hosts that left. Returns a
    /// receiver per started session that fires after its first check (for warming).
    pub fn sync(
        &self,
        cluster: &Arc<ClusterState>,
        hosts: &[Arc<Host>],
    ) -> Vec<tokio::sync::oneshot::Receiver<()>> {
        let mut firsts = Vec::new();
        if tokio::runtime::Handle::try_current().is_err() {
            return firsts;
        }
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|addr, tasks| {
            let keep = hosts.iter().any(|h| h.address == *addr);
            if !keep {
                tasks.iter().for_each(JoinHandle::abort);
            }
            keep
        });
        for host in hosts {
            if sessions.contains_key(&host.address) {
                continue;
            }
            let mut tasks = Vec::new();
            for cfg in &cluster.info.config.health_checks {
                let (tx, rx) = tokio::sync::oneshot::channel();
                firsts.push(rx);
                tasks.push(tokio::spawn(run_session(
                    Arc::downgrade(cluster),
                    host.clone(),
                    cfg.clone(),
                    tx,
                )));
            }
            sessions.insert(host.address, tasks);
        }
        firsts
    }
}

impl Default for Checker {
    fn default() -> Self {
        Checker::new()
    }
}

async fn run_session(
    cluster: Weak<ClusterState>,
    host: Arc<Host>,
    cfg: HealthCheck,
    first: tokio::sync::oneshot::Sender<()>,
) {
    let mut first = Some(first);
    let mut session = Session::default();
    let mut prober = probe::Prober::new(host.address, &cfg);
    if !cfg.initial_jitter.is_zero() {
        let j = cfg.initial_jitter.as_millis() as u64;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..j.max(1)))).await;
    }
    loop {
        let Some(cs) = cluster.upgrade() else { return };
        let stats = cs.info.stats.clone();
        let authority = cs.name().to_string();
        drop(cs);
        stats.health_check.attempt.inc();
        let result = match tokio::time::timeout(cfg.timeout, prober.check(&authority)).await {
            Ok(r) => r,
            Err(_) => {
                // A timed-out check leaves the connection in an unknown state.
                prober.reset();
                CheckResult::network()
            }
        };
        if !cfg.reuse_connection {
            prober.reset();
        }
        let health = host.health_state();
        let ok = matches!(result, CheckResult::Healthy { .. });
        let (t, healthy) = session.on_result(&cfg, health, &stats.health_check, result);
        let Some(cs) = cluster.upgrade() else { return };
        let mut rebuild = t == Transition::Changed;
        if ok {
            // Envoy: a passing active check un-ejects an outlier-ejected host.
            rebuild |= crate::outlier::on_active_check_success(&cs, &host);
        }
        if rebuild {
            cs.health_changed();
        }
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
        let had_traffic = cs.info.stats.upstream_cx_total.get() > 0;
        drop(cs);
        tokio::time::sleep(next_interval(&cfg, healthy, t, had_traffic)).await;
    }
}

/// The default `Host` / authority of HTTP and gRPC checks: the configured one, else the cluster.
pub(crate) fn check_authority<'a>(configured: Option<&'a str>, cluster: &'a str) -> &'a str {
    configured.unwrap_or(cluster)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_xds::model::{HealthCheckKind, TcpHealthCheck};

    fn cfg() -> HealthCheck {
        HealthCheck {
            timeout: Duration::from_secs(1),
            interval: Duration::from_secs(5),
            initial_jitter: Duration::ZERO,
            interval_jitter: Duration::ZERO,
            interval_jitter_percent: 0,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            no_traffic_interval: Duration::from_secs(60),
            no_traffic_healthy_interval: Duration::from_secs(60),
            unhealthy_interval: Duration::from_secs(7),
            unhealthy_edge_interval: Duration::from_secs(1),
            healthy_edge_interval: Duration::from_secs(2),
            reuse_connection: true,
            kind: HealthCheckKind::Tcp(TcpHealthCheck::default()),
        }
    }

    const OK: CheckResult = CheckResult::Healthy { degraded: false };
    const NET: CheckResult = CheckResult::Failed {
        network: true,
        retriable: false,
        immediate: false,
    };
    const ACTIVE: CheckResult = CheckResult::Failed {
        network: false,
        retriable: false,
        immediate: false,
    };
    const RETRIABLE: CheckResult = CheckResult::Failed {
        network: false,
        retriable: true,
        immediate: false,
    };

    #[test]
    fn first_success_is_healthy_at_once_then_thresholds_apply() {
        let c = cfg();
        let h = HostHealth::new(true);
        let st = HealthCheckStats::default();
        let mut s = Session::default();
        assert!(!h.passes() && h.has(PENDING_ACTIVE_HC));
        assert_eq!(s.on_result(&c, &h, &st, OK), (Transition::Changed, true));
        assert!(h.passes() && !h.has(PENDING_ACTIVE_HC));
        // Network failures count toward unhealthy_threshold (3).
        assert_eq!(s.on_result(&c, &h, &st, NET).0, Transition::ChangePending);
        assert_eq!(s.on_result(&c, &h, &st, NET).0, Transition::ChangePending);
        assert_eq!(s.on_result(&c, &h, &st, NET), (Transition::Changed, false));
        assert_eq!(st.network_failure.get(), 3);
        // Back needs healthy_threshold (2) successes now that it is not the first check.
        assert_eq!(s.on_result(&c, &h, &st, OK).0, Transition::ChangePending);
        assert_eq!(s.on_result(&c, &h, &st, OK), (Transition::Changed, true));
        // A non-retriable status fails at once; a retriable one counts.
        assert_eq!(
            s.on_result(&c, &h, &st, ACTIVE),
            (Transition::Changed, false)
        );
        s.on_result(&c, &h, &st, OK);
        s.on_result(&c, &h, &st, OK);
        assert_eq!(
            s.on_result(&c, &h, &st, RETRIABLE).0,
            Transition::ChangePending
        );
        assert_eq!(st.success.get(), 5);
        assert_eq!(st.failure.get(), 5);
    }

    #[test]
    fn first_failure_clears_pending_and_stays_unhealthy() {
        let c = cfg();
        let h = HostHealth::new(true);
        let st = HealthCheckStats::default();
        let mut s = Session::default();
        assert_eq!(s.on_result(&c, &h, &st, NET), (Transition::Changed, false));
        assert!(h.has(FAILED_ACTIVE_HC) && !h.has(PENDING_ACTIVE_HC));
        let mut names = String::new();
        h.flag_names(&mut names);
        assert_eq!(names, "/failed_active_hc");
    }

    #[test]
    fn degraded_and_immediate_fail() {
        let c = cfg();
        let h = HostHealth::new(false);
        let st = HealthCheckStats::default();
        let mut s = Session::default();
        let t = s.on_result(&c, &h, &st, CheckResult::Healthy { degraded: true });
        assert_eq!(t, (Transition::Changed, true));
        assert!(h.has(DEGRADED_ACTIVE_HC) && h.passes());
        let t = s.on_result(
            &c,
            &h,
            &st,
            CheckResult::Failed {
                network: false,
                retriable: false,
                immediate: true,
            },
        );
        assert_eq!(t, (Transition::Changed, false));
        assert!(h.has(EXCLUDED_VIA_IMMEDIATE_HC_FAIL));
    }

    /// A TCP-checked host on loopback: the session checks once, then every interval (the
    /// no-traffic interval while the cluster has seen no request), with paused time.
    #[tokio::test(start_paused = true)]
    async fn sessions_schedule_checks_and_warm() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let a2 = accepts.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                a2.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        let mut c = cfg();
        c.no_traffic_interval = Duration::from_secs(60);
        c.no_traffic_healthy_interval = Duration::from_secs(60);
        let cs = crate::outlier::tests::cluster_at(addr, c);
        let h = cs.hosts()[0].clone();
        assert!(h.health_state().has(FAILED_ACTIVE_HC | PENDING_ACTIVE_HC));
        assert!(cs.pick().is_some(), "panic mode before warming");
        cs.start_health().await;
        assert!(h.health_state().passes(), "{}", h.health_flags());
        assert_eq!(cs.info.stats.health_check.attempt.get(), 1);
        // No traffic yet: the next check waits no_traffic_interval (60 s).
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(cs.info.stats.health_check.attempt.get(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(cs.info.stats.health_check.attempt.get(), 2);
        // Once the cluster has had traffic, `interval` (5 s) applies.
        cs.info.stats.upstream_cx_total.inc();
        tokio::time::sleep(Duration::from_secs(60)).await;
        let n = cs.info.stats.health_check.attempt.get();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(cs.info.stats.health_check.attempt.get(), n + 1);
        assert_eq!(cs.info.stats.health_check.healthy.get(), 1);
        drop(cs);
    }

    async fn accepting() -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { while l.accept().await.is_ok() {} });
        addr
    }

    fn assignment(eps: &[(SocketAddr, u32)]) -> strait_xds::model::LoadAssignment {
        use strait_xds::model as m;
        m::LoadAssignment {
            endpoints: vec![m::LocalityLbEndpoints {
                locality: Default::default(),
                priority: 0,
                load_balancing_weight: None,
                lb_endpoints: eps
                    .iter()
                    .map(|&(a, w)| m::LbEndpoint {
                        address: m::EndpointAddress::Ip(a),
                        load_balancing_weight: w,
                        health_status: m::HealthStatus::Unknown,
                        hostname: None,
                    })
                    .collect(),
            }],
            policy: Default::default(),
        }
    }

    /// Health belongs to the address: an EDS update that rebuilds a staying host keeps it; a
    /// host added later starts failed + pending until its first check; a host that leaves and
    /// comes back starts afresh.
    #[tokio::test(start_paused = true)]
    async fn eds_updates_keep_health_and_new_hosts_start_pending() {
        let a = accepting().await;
        let b = accepting().await;
        let cs = crate::outlier::tests::cluster_at(a, cfg());
        cs.start_health().await;
        let flags = |addr: SocketAddr| {
            cs.hosts()
                .iter()
                .find(|h| h.address == addr)
                .map(|h| h.health_flags())
        };
        assert_eq!(flags(a).as_deref(), Some("healthy"));
        // A weight change rebuilds `a`'s Host; its health stays. `b` is new.
        cs.update_endpoints(&assignment(&[(a, 2), (b, 1)]));
        assert_eq!(flags(a).as_deref(), Some("healthy"));
        assert_eq!(
            flags(b).as_deref(),
            Some("/failed_active_hc/pending_active_hc")
        );
        // `b`'s session was started by the update; its first check passes at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(flags(b).as_deref(), Some("healthy"));
        cs.update_endpoints(&assignment(&[(b, 1)]));
        assert_eq!(flags(a), None);
        cs.update_endpoints(&assignment(&[(a, 1), (b, 1)]));
        assert_eq!(
            flags(a).as_deref(),
            Some("/failed_active_hc/pending_active_hc")
        );
        assert_eq!(flags(b).as_deref(), Some("healthy"));
    }

    #[test]
    fn intervals_follow_envoy() {
        let c = cfg();
        use Transition::*;
        assert_eq!(next_interval(&c, true, Unchanged, true), c.interval);
        assert_eq!(
            next_interval(&c, true, Changed, true),
            c.healthy_edge_interval
        );
        assert_eq!(
            next_interval(&c, false, Changed, true),
            c.unhealthy_edge_interval
        );
        assert_eq!(
            next_interval(&c, false, ChangePending, true),
            c.unhealthy_interval
        );
        assert_eq!(
            next_interval(&c, true, Unchanged, false),
            c.no_traffic_healthy_interval
        );
        assert_eq!(
            next_interval(&c, false, Unchanged, false),
            c.no_traffic_interval
        );
        let mut j = cfg();
        j.interval_jitter_percent = 10;
        j.interval_jitter = Duration::from_millis(100);
        for _ in 0..100 {
            let d = next_interval(&j, true, Unchanged, true);
            assert!(
                d >= j.interval && d < j.interval + Duration::from_millis(600),
                "{d:?}"
            );
        }
    }
}
