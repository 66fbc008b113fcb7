//! Active health checking with Envoy's semantics: one session per (host, `health_checks` entry)
//! probing over HTTP, TCP or gRPC, thresholds and edge intervals, and the per-host health flags
//! the load balancer and `/clusters` read. Runs off the request path; never blocks a request.

mod probe;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
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
/// `PENDING_ACTIVE_HC`: not checked yet since an update added it, with
/// `ignore_new_hosts_until_first_hc` (the host is excluded from load balancing until then).
pub const PENDING_ACTIVE_HC: u32 = 1 << 2;
/// `FAILED_OUTLIER_CHECK`: ejected by outlier detection.
pub const FAILED_OUTLIER_CHECK: u32 = 1 << 3;
/// `EXCLUDED_VIA_IMMEDIATE_HC_FAIL`: answered `x-envoy-immediate-health-check-fail`.
pub const EXCLUDED_VIA_IMMEDIATE_HC_FAIL: u32 = 1 << 4;
/// `ACTIVE_HC_TIMEOUT`: failing active checks, the last one by timing out.
pub const ACTIVE_HC_TIMEOUT: u32 = 1 << 5;

/// Health and ejection state of one host address. Shared by every [`Host`] object built for
/// that address while it stays in the cluster, so state survives EDS / DNS updates.
#[derive(Debug, Default)]
pub struct HostHealth {
    flags: AtomicU32,
    pub outlier: HostOutlier,
    /// A passive failure arrived since the session last ran (it resets the session's counts).
    passive_failure: AtomicBool,
}

impl HostHealth {
    /// A host of a cluster that has active health checks starts unhealthy
    /// (`/failed_active_hc`) until its first check passes, as Envoy's do; with `pending`
    /// (Envoy's `ignore_new_hosts_until_first_hc`, for hosts EDS or DNS added) it is also
    /// `/pending_active_hc`, which excludes it from load balancing until that first check.
    pub fn new(active_checks: bool, pending: bool) -> HostHealth {
        let h = HostHealth::default();
        if active_checks {
            h.set(FAILED_ACTIVE_HC);
            if pending {
                h.set(PENDING_ACTIVE_HC);
            }
        }
        h
    }

    /// Envoy's `excludeBasedOnHealthFlag`: pending its first check or told to go by
    /// `x-envoy-immediate-health-check-fail`: counted in no health ratio, picked only in panic.
    pub fn excluded(&self) -> bool {
        self.flags() & (PENDING_ACTIVE_HC | EXCLUDED_VIA_IMMEDIATE_HC_FAIL) != 0
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

    /// Envoy's `/clusters` flag suffixes, in the order of Envoy's `HealthFlag` enum, with the
    /// EDS flags (`failed`, `degraded`, `draining`) at their places.
    pub fn flag_names(&self, eds: [bool; 3], out: &mut String) {
        let f = self.flags();
        let [eds_failed, eds_degraded, eds_draining] = eds;
        for (set, name) in [
            (f & FAILED_ACTIVE_HC != 0, "/failed_active_hc"),
            (f & FAILED_OUTLIER_CHECK != 0, "/failed_outlier_check"),
            (eds_failed, "/failed_eds_health"),
            (f & DEGRADED_ACTIVE_HC != 0, "/degraded_active_hc"),
            (eds_degraded, "/degraded_eds_health"),
            (f & PENDING_ACTIVE_HC != 0, "/pending_active_hc"),
            (
                f & EXCLUDED_VIA_IMMEDIATE_HC_FAIL != 0,
                "/excluded_via_immediate_hc_fail",
            ),
            (f & ACTIVE_HC_TIMEOUT != 0, "/active_hc_timeout"),
            (eds_draining, "/eds_status_draining"),
        ] {
            if set {
                out.push_str(name);
            }
        }
    }
}

// === Passive failure ===

/// Envoy's router on `x-envoy-immediate-health-check-fail` in a proxied response: the host is
/// excluded (`/excluded_via_immediate_hc_fail`) and its health-check session takes a PASSIVE
/// failure, which is immediate (`health_check.failure` and `health_check.passive_failure`).
/// Only hosts of an actively checked cluster have a session; others are left alone.
pub fn on_immediate_fail(cluster: &ClusterState, host: &Host) {
    if cluster.info.config.health_checks.is_empty() {
        return;
    }
    let hh = host.health_state();
    let before = hh.flags();
    hh.set(EXCLUDED_VIA_IMMEDIATE_HC_FAIL | FAILED_ACTIVE_HC);
    hh.clear(PENDING_ACTIVE_HC | ACTIVE_HC_TIMEOUT);
    hh.passive_failure.store(true, Ordering::Release);
    let st = &cluster.info.stats.health_check;
    st.failure.inc();
    st.passive_failure.inc();
    if hh.flags() != before {
        cluster.health_changed();
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
    /// Envoy's `setUnhealthy(PASSIVE)` on the session: progress toward healthy starts over,
    /// and a later first check no longer counts as the first.
    pub fn on_passive_failure(&mut self) {
        self.num_healthy = 0;
        self.first_check = false;
    }

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
                        host.clear(
                            FAILED_ACTIVE_HC | EXCLUDED_VIA_IMMEDIATE_HC_FAIL | ACTIVE_HC_TIMEOUT,
                        );
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
                timeout,
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
                // Envoy toggles the timeout flag with each failure of a failed host.
                if timeout && host.has(FAILED_ACTIVE_HC) {
                    host.set(ACTIVE_HC_TIMEOUT);
                } else {
                    host.clear(ACTIVE_HC_TIMEOUT);
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
        let check = prober.check(&authority, &stats.health_check);
        let result = match tokio::time::timeout(cfg.timeout, check).await {
            Ok(r) => r,
            Err(_) => {
                // A timed-out check leaves the connection in an unknown state.
                prober.reset();
                CheckResult::timeout()
            }
        };
        if !cfg.reuse_connection {
            prober.reset();
        }
        let health = host.health_state();
        if health.passive_failure.swap(false, Ordering::AcqRel) {
            session.on_passive_failure();
        }
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
        timeout: false,
    };
    const ACTIVE: CheckResult = CheckResult::Failed {
        network: false,
        retriable: false,
        immediate: false,
        timeout: false,
    };
    const RETRIABLE: CheckResult = CheckResult::Failed {
        network: false,
        retriable: true,
        immediate: false,
        timeout: false,
    };

    #[test]
    fn first_success_is_healthy_at_once_then_thresholds_apply() {
        let c = cfg();
        let h = HostHealth::new(true, true);
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
        let h = HostHealth::new(true, true);
        let st = HealthCheckStats::default();
        let mut s = Session::default();
        assert_eq!(s.on_result(&c, &h, &st, NET), (Transition::Changed, false));
        assert!(h.has(FAILED_ACTIVE_HC) && !h.has(PENDING_ACTIVE_HC));
        let mut names = String::new();
        h.flag_names([false; 3], &mut names);
        assert_eq!(names, "/failed_active_hc");
    }

    /// Envoy's NETWORK_TIMEOUT: counts toward unhealthy_threshold like any network failure,
    /// and a failed host shows `/active_hc_timeout` while its failures are timeouts.
    #[test]
    fn timeouts_mark_failed_hosts_active_hc_timeout() {
        let c = cfg();
        let h = HostHealth::new(false, false);
        let st = HealthCheckStats::default();
        let mut s = Session::default();
        let timeout = CheckResult::timeout();
        assert_eq!(
            s.on_result(&c, &h, &st, timeout).0,
            Transition::ChangePending
        );
        assert!(!h.has(ACTIVE_HC_TIMEOUT), "not failed yet");
        s.on_result(&c, &h, &st, timeout);
        assert_eq!(
            s.on_result(&c, &h, &st, timeout),
            (Transition::Changed, false)
        );
        assert!(h.has(ACTIVE_HC_TIMEOUT));
        assert_eq!(st.network_failure.get(), 3);
        // A failure of another kind clears it; the next timeout sets it again.
        s.on_result(&c, &h, &st, ACTIVE);
        assert!(!h.has(ACTIVE_HC_TIMEOUT));
        s.on_result(&c, &h, &st, timeout);
        let mut names = String::new();
        h.flag_names([false, false, true], &mut names);
        assert_eq!(
            names,
            "/failed_active_hc/active_hc_timeout/eds_status_draining"
        );
        // Healthy again (healthy_threshold 2): the flag goes with FAILED_ACTIVE_HC.
        s.on_result(&c, &h, &st, OK);
        s.on_result(&c, &h, &st, OK);
        assert!(h.passes() && !h.has(ACTIVE_HC_TIMEOUT));
    }

    #[test]
    fn degraded_and_immediate_fail() {
        let c = cfg();
        let h = HostHealth::new(false, false);
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
                timeout: false,
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
    /// host added later starts `/failed_active_hc` (as in Envoy) until its first check; a host
    /// that leaves and comes back starts afresh.
    #[tokio::test(start_paused = true)]
    async fn eds_updates_keep_health_and_new_hosts_start_failed() {
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
        assert_eq!(flags(b).as_deref(), Some("/failed_active_hc"));
        // `b`'s session was started by the update; its first check passes at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(flags(b).as_deref(), Some("healthy"));
        cs.update_endpoints(&assignment(&[(b, 1)]));
        assert_eq!(flags(a), None);
        cs.update_endpoints(&assignment(&[(a, 1), (b, 1)]));
        assert_eq!(flags(a).as_deref(), Some("/failed_active_hc"));
        assert_eq!(flags(b).as_deref(), Some("healthy"));
    }

    /// `ignore_new_hosts_until_first_hc`: hosts an EDS update adds are also pending, which
    /// excludes them (Envoy's `excludeBasedOnHealthFlag`) until their first check.
    #[tokio::test(start_paused = true)]
    async fn ignore_new_hosts_until_first_hc_excludes_them() {
        let a = accepting().await;
        let b = accepting().await;
        let cs = crate::outlier::tests::cluster_at_with(a, cfg(), |c| {
            c.discovery = strait_xds::model::DiscoveryType::Eds;
            c.lb.ignore_new_hosts_until_first_hc = true;
        });
        cs.update_endpoints(&assignment(&[(a, 1)]));
        cs.start_health().await;
        let flags = |addr: SocketAddr| {
            cs.hosts()
                .iter()
                .find(|h| h.address == addr)
                .map(|h| h.health_flags())
        };
        assert_eq!(flags(a).as_deref(), Some("healthy"));
        cs.update_endpoints(&assignment(&[(a, 1), (b, 1)]));
        assert_eq!(
            flags(b).as_deref(),
            Some("/failed_active_hc/pending_active_hc")
        );
        assert_eq!(cs.stats().membership_excluded.get(), 1);
        // Excluded hosts count in no ratio: `a` alone is 100 % healthy.
        for _ in 0..20 {
            assert_eq!(cs.pick().map(|h| h.address), Some(a));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(flags(b).as_deref(), Some("healthy"));
        assert_eq!(cs.stats().membership_excluded.get(), 0);
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
