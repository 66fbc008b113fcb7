//! Outlier detection (passive health) with Envoy's semantics: consecutive 5xx / gateway /
//! local-origin failures counted on the request path with atomics only, success-rate and
//! failure-percentage ejection computed every `interval`, ejection backoff and un-ejection.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use strait_xds::model::OutlierDetection;
use tokio::time::Instant;

use crate::cluster::{ClusterState, Host};
use crate::health::FAILED_OUTLIER_CHECK;
use crate::stats::OutlierStats;

/// What one upstream attempt told about its host (Envoy's `Outlier::Result` and HTTP codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Http(u16),
    /// A connection to the host could be used (resets the local-origin streak).
    LocalSuccess,
    /// Connect failure, or the stream was reset.
    LocalConnectFailed,
    /// The attempt timed out.
    LocalTimeout,
}

/// Why a host is ejected; selects Envoy's stat names and enforcing percentage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
    SuccessRate,
    LocalOriginSuccessRate,
    FailurePercentage,
    LocalOriginFailurePercentage,
}

impl Kind {
    fn enforcing(self, c: &OutlierDetection) -> u32 {
        match self {
            Kind::Consecutive5xx => c.enforcing_consecutive_5xx,
            Kind::ConsecutiveGatewayFailure => c.enforcing_consecutive_gateway_failure,
            Kind::ConsecutiveLocalOriginFailure => c.enforcing_consecutive_local_origin_failure,
            Kind::SuccessRate => c.enforcing_success_rate,
            Kind::LocalOriginSuccessRate => c.enforcing_local_origin_success_rate,
            Kind::FailurePercentage => c.enforcing_failure_percentage,
            Kind::LocalOriginFailurePercentage => c.enforcing_failure_percentage_local_origin,
        }
    }

    fn detected(self, s: &OutlierStats) {
        match self {
            Kind::Consecutive5xx => s.ejections_detected_consecutive_5xx.inc(),
            Kind::ConsecutiveGatewayFailure => {
                s.ejections_detected_consecutive_gateway_failure.inc()
            }
            Kind::ConsecutiveLocalOriginFailure => {
                s.ejections_detected_consecutive_local_origin_failure.inc()
            }
            Kind::SuccessRate => s.ejections_detected_success_rate.inc(),
            Kind::LocalOriginSuccessRate => s.ejections_detected_local_origin_success_rate.inc(),
            Kind::FailurePercentage => s.ejections_detected_failure_percentage.inc(),
            Kind::LocalOriginFailurePercentage => {
                s.ejections_detected_failure_percentage_local_origin.inc()
            }
        }
    }

    fn enforced(self, s: &OutlierStats) {
        s.ejections_enforced_total.inc();
        match self {
            Kind::Consecutive5xx => s.ejections_enforced_consecutive_5xx.inc(),
            Kind::ConsecutiveGatewayFailure => {
                s.ejections_enforced_consecutive_gateway_failure.inc()
            }
            Kind::ConsecutiveLocalOriginFailure => {
                s.ejections_enforced_consecutive_local_origin_failure.inc()
            }
            Kind::SuccessRate => s.ejections_enforced_success_rate.inc(),
            Kind::LocalOriginSuccessRate => s.ejections_enforced_local_origin_success_rate.inc(),
            Kind::FailurePercentage => s.ejections_enforced_failure_percentage.inc(),
            Kind::LocalOriginFailurePercentage => {
                s.ejections_enforced_failure_percentage_local_origin.inc()
            }
        }
    }
}

/// A host's passive-health counters and ejection state (part of [`crate::health::HostHealth`]).
#[derive(Debug, Default)]
pub struct HostOutlier {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// Success-rate bucket of the current interval: external origin (or all, unsplit).
    ext_total: AtomicU64,
    ext_failed: AtomicU64,
    /// Local-origin bucket (split mode only).
    local_total: AtomicU64,
    local_failed: AtomicU64,
    /// The ejection-time multiplier: +1 per ejection, -1 per interval the host stays in.
    multiplier: AtomicU32,
    ejected_at: Mutex<Option<Instant>>,
    /// Success rates of the last interval as `/clusters` shows them (see [`Rate`]).
    success_rate: Rate,
    local_origin_success_rate: Rate,
}

/// A success rate computed by the detector, or none (`-1` in `/clusters`), lock-free.
#[derive(Debug, Default)]
pub struct Rate(AtomicU64);

impl Rate {
    fn set(&self, v: Option<f64>) {
        // 0 encodes "not computed"; otherwise the f64's bits with the top bit flipped, which
        // is never 0 for a rate within 0..=100.
        self.0
            .store(v.map_or(0, |r| r.to_bits() ^ (1 << 63)), Ordering::Relaxed);
    }

    /// The rate in percent, or -1 when it was not computed (too few requests or hosts).
    pub fn get(&self) -> f64 {
        match self.0.load(Ordering::Relaxed) {
            0 => -1.0,
            b => f64::from_bits(b ^ (1 << 63)),
        }
    }
}

impl HostOutlier {
    fn reset_consecutive(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        self.consecutive_local.store(0, Ordering::Relaxed);
    }

    /// The ejection-time multiplier (Envoy's number of ejections backoff).
    pub fn multiplier(&self) -> u32 {
        self.multiplier.load(Ordering::Relaxed)
    }

    /// External-origin (or, unsplit, all) success rate of the last interval; -1 when unknown.
    pub fn success_rate(&self) -> f64 {
        self.success_rate.get()
    }

    /// Local-origin success rate of the last interval (split mode); -1 when unknown.
    pub fn local_origin_success_rate(&self) -> f64 {
        self.local_origin_success_rate.get()
    }

    fn take_bucket(total: &AtomicU64, failed: &AtomicU64) -> (u64, u64) {
        (
            total.swap(0, Ordering::Relaxed),
            failed.swap(0, Ordering::Relaxed),
        )
    }
}

/// Envoy's non-split mapping of local-origin events to HTTP codes.
fn as_http(o: Outcome) -> Option<u16> {
    match o {
        Outcome::Http(c) => Some(c),
        Outcome::LocalConnectFailed => Some(503),
        Outcome::LocalTimeout => Some(504),
        Outcome::LocalSuccess => None,
    }
}

/// Records one attempt's outcome for its host; ejects at once when a consecutive-failure
/// threshold is reached. Request path: atomics only, except on the ejection itself.
pub fn report(cluster: &ClusterState, host: &Host, outcome: Outcome) {
    let Some(cfg) = cluster.info.config.outlier_detection.as_ref() else {
        return;
    };
    let o = &host.health_state().outlier;
    let split = cfg.split_external_local_origin_errors;
    let code = if split {
        match outcome {
            Outcome::Http(c) => Some(c),
            Outcome::LocalSuccess => {
                o.consecutive_local.store(0, Ordering::Relaxed);
                o.local_total.fetch_add(1, Ordering::Relaxed);
                None
            }
            Outcome::LocalConnectFailed | Outcome::LocalTimeout => {
                o.local_total.fetch_add(1, Ordering::Relaxed);
                o.local_failed.fetch_add(1, Ordering::Relaxed);
                // Envoy triggers on reaching the threshold exactly, once per streak.
                if o.consecutive_local.fetch_add(1, Ordering::Relaxed) + 1
                    == cfg.consecutive_local_origin_failure
                {
                    eject(cluster, host, Kind::ConsecutiveLocalOriginFailure);
                }
                None
            }
        }
    } else {
        as_http(outcome)
    };
    let Some(code) = code else { return };
    o.ext_total.fetch_add(1, Ordering::Relaxed);
    if code >= 500 {
        o.ext_failed.fetch_add(1, Ordering::Relaxed);
        if matches!(code, 502..=504)
            && o.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
                == cfg.consecutive_gateway_failure
        {
            eject(cluster, host, Kind::ConsecutiveGatewayFailure);
        }
        if o.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1 == cfg.consecutive_5xx {
            eject(cluster, host, Kind::Consecutive5xx);
        }
        if !matches!(code, 502..=504) {
            o.consecutive_gateway.store(0, Ordering::Relaxed);
        }
    } else {
        o.consecutive_5xx.store(0, Ordering::Relaxed);
        o.consecutive_gateway.store(0, Ordering::Relaxed);
    }
}

/// Envoy's `DetectorImpl::ejectHost`: respects `max_ejection_percent` (at least one host can
/// always be ejected) and the kind's `enforcing_*` percentage.
pub fn eject(cluster: &ClusterState, host: &Host, kind: Kind) {
    let Some(cfg) = cluster.info.config.outlier_detection.as_ref() else {
        return;
    };
    let hh = host.health_state();
    if hh.has(FAILED_OUTLIER_CHECK) {
        return;
    }
    let stats = &cluster.info.stats.outlier_detection;
    kind.detected(stats);
    let total = cluster.hosts().len().max(1) as u64;
    let active = stats.ejections_active.get().max(0) as u64;
    if 100 * active / total >= u64::from(cfg.max_ejection_percent) {
        stats.ejections_overflow.inc();
        return;
    }
    let enforcing = kind.enforcing(cfg);
    if enforcing == 0 || (enforcing < 100 && fastrand::u32(0..100) >= enforcing) {
        return;
    }
    {
        let mut at = hh
            .outlier
            .ejected_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if at.is_some() {
            return;
        }
        *at = Some(Instant::now());
    }
    hh.set(FAILED_OUTLIER_CHECK);
    // The multiplier stops growing once base × multiplier reaches max_ejection_time.
    let base = cfg.base_ejection_time.as_millis().max(1);
    let cap = (cfg
        .max_ejection_time
        .max(cfg.base_ejection_time)
        .as_millis()
        / base) as u32;
    let _ = hh
        .outlier
        .multiplier
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
            Some(if m < cap.max(1) { m + 1 } else { m })
        });
    stats.ejections_active.inc();
    kind.enforced(stats);
    tracing::debug!(cluster = %cluster.name(), host = %host.address, ?kind, "outlier ejected");
    cluster.health_changed();
}

/// Returns the host to the load balancer; `true` when it was ejected.
fn uneject(cluster: &ClusterState, host: &Host) -> bool {
    let hh = host.health_state();
    {
        let mut at = hh
            .outlier
            .ejected_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if at.take().is_none() {
            return false;
        }
    }
    hh.clear(FAILED_OUTLIER_CHECK);
    hh.outlier.reset_consecutive();
    cluster.info.stats.outlier_detection.ejections_active.dec();
    true
}

/// Envoy un-ejects a host that passes an active health check
/// (`successful_active_health_check_uneject_host`, default true). Returns whether it did; the
/// caller rebuilds the load balancer.
pub fn on_active_check_success(cluster: &ClusterState, host: &Host) -> bool {
    match cluster.info.config.outlier_detection.as_ref() {
        Some(c) if c.successful_active_health_check_uneject_host => uneject(cluster, host),
        _ => false,
    }
}

/// One detector interval: un-eject hosts whose time is up, decay multipliers, and run the
/// success-rate and failure-percentage algorithms over the interval's buckets.
pub fn interval_tick(cluster: &ClusterState) {
    let Some(cfg) = cluster.info.config.outlier_detection.clone() else {
        return;
    };
    let hosts = cluster.hosts();
    let now = Instant::now();
    let mut changed = false;
    for h in &hosts {
        let o = &h.health_state().outlier;
        let ejected_at = *o.ejected_at.lock().unwrap_or_else(|e| e.into_inner());
        match ejected_at {
            Some(at) => {
                let m = o.multiplier().max(1);
                let time = (cfg.base_ejection_time * m)
                    .min(cfg.max_ejection_time.max(cfg.base_ejection_time))
                    + jitter(&cfg);
                if now.saturating_duration_since(at) >= time {
                    changed |= uneject(cluster, h);
                }
            }
            None => {
                let _ = o
                    .multiplier
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| m.checked_sub(1));
            }
        }
    }
    let ext: Vec<(u64, u64)> = hosts
        .iter()
        .map(|h| {
            let o = &h.health_state().outlier;
            HostOutlier::take_bucket(&o.ext_total, &o.ext_failed)
        })
        .collect();
    let local: Vec<(u64, u64)> = hosts
        .iter()
        .map(|h| {
            let o = &h.health_state().outlier;
            HostOutlier::take_bucket(&o.local_total, &o.local_failed)
        })
        .collect();
    if changed {
        cluster.health_changed();
    }
    let mut ejects = Vec::new();
    let ext_rates = success_rate_stats(&cfg, &ext);
    let local_rates = if cfg.split_external_local_origin_errors {
        success_rate_stats(&cfg, &local)
    } else {
        SuccessRates::default()
    };
    for (i, h) in hosts.iter().enumerate() {
        let o = &h.health_state().outlier;
        o.success_rate
            .set(ext_rates.host_rates.get(i).copied().flatten());
        o.local_origin_success_rate
            .set(local_rates.host_rates.get(i).copied().flatten());
    }
    cluster.set_outlier_rates([
        ext_rates.average,
        ext_rates.threshold,
        local_rates.average,
        local_rates.threshold,
    ]);
    ejects.extend(ext_rates.ejects.into_iter().map(|i| (i, Kind::SuccessRate)));
    ejects.extend(
        failure_percentage(&cfg, &ext)
            .into_iter()
            .map(|i| (i, Kind::FailurePercentage)),
    );
    if cfg.split_external_local_origin_errors {
        ejects.extend(
            local_rates
                .ejects
                .into_iter()
                .map(|i| (i, Kind::LocalOriginSuccessRate)),
        );
        ejects.extend(
            failure_percentage(&cfg, &local)
                .into_iter()
                .map(|i| (i, Kind::LocalOriginFailurePercentage)),
        );
    }
    for (i, kind) in ejects {
        if let Some(h) = hosts.get(i) {
            eject(cluster, h, kind);
        }
    }
}

fn jitter(cfg: &OutlierDetection) -> std::time::Duration {
    let j = cfg.max_ejection_time_jitter.as_millis() as u64;
    std::time::Duration::from_millis(if j == 0 { 0 } else { fastrand::u64(0..j) })
}

/// Envoy's success-rate algorithm: among hosts with enough requests (and only when enough
/// hosts have them), eject those below mean − stdev_factor/1000 × stdev. Returns host indexes.
pub fn success_rate(cfg: &OutlierDetection, buckets: &[(u64, u64)]) -> Vec<usize> {
    success_rate_stats(cfg, buckets).ejects
}

/// One run of the success-rate algorithm: each host's rate (when it had the volume), the
/// cluster's average and ejection threshold (when enough hosts had it), and whom to eject.
#[derive(Debug, Default)]
pub struct SuccessRates {
    pub host_rates: Vec<Option<f64>>,
    pub average: Option<f64>,
    pub threshold: Option<f64>,
    pub ejects: Vec<usize>,
}

pub fn success_rate_stats(cfg: &OutlierDetection, buckets: &[(u64, u64)]) -> SuccessRates {
    let volume = u64::from(cfg.success_rate_request_volume);
    let host_rates: Vec<Option<f64>> = buckets
        .iter()
        .map(|&(total, failed)| {
            (total > 0 && total >= volume)
                .then(|| 100.0 * total.saturating_sub(failed) as f64 / total as f64)
        })
        .collect();
    let rates: Vec<(usize, f64)> = host_rates
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.map(|r| (i, r)))
        .collect();
    if rates.is_empty() || rates.len() < cfg.success_rate_minimum_hosts as usize {
        return SuccessRates {
            host_rates,
            ..Default::default()
        };
    }
    let n = rates.len() as f64;
    let mean = rates.iter().map(|r| r.1).sum::<f64>() / n;
    let var = rates.iter().map(|r| (r.1 - mean).powi(2)).sum::<f64>() / n;
    let threshold = mean - (f64::from(cfg.success_rate_stdev_factor) / 1000.0) * var.sqrt();
    let ejects = rates
        .into_iter()
        .filter(|r| r.1 < threshold)
        .map(|r| r.0)
        .collect();
    SuccessRates {
        host_rates,
        average: Some(mean),
        threshold: Some(threshold),
        ejects,
    }
}

/// Envoy's failure-percentage algorithm: with enough hosts having enough requests, eject each
/// whose success rate is below 100 − failure_percentage_threshold.
pub fn failure_percentage(cfg: &OutlierDetection, buckets: &[(u64, u64)]) -> Vec<usize> {
    let volume = u64::from(cfg.failure_percentage_request_volume);
    let rates: Vec<(usize, f64)> = buckets
        .iter()
        .enumerate()
        .filter(|(_, &(total, _))| total > 0 && total >= volume)
        .map(|(i, &(total, failed))| (i, 100.0 * (total - failed) as f64 / total as f64))
        .collect();
    if rates.is_empty() || rates.len() < cfg.failure_percentage_minimum_hosts as usize {
        return Vec::new();
    }
    let limit = 100.0 - f64::from(cfg.failure_percentage_threshold);
    rates
        .into_iter()
        .filter(|r| r.1 < limit)
        .map(|r| r.0)
        .collect()
}

/// Runs the detector's interval timer for a cluster until the cluster is dropped.
pub async fn run(cluster: Weak<ClusterState>) {
    let Some(interval) = cluster
        .upgrade()
        .and_then(|c| c.info.config.outlier_detection.as_ref().map(|o| o.interval))
    else {
        return;
    };
    loop {
        tokio::time::sleep(interval).await;
        let Some(c) = cluster.upgrade() else { return };
        interval_tick(&c);
    }
}

/// Spawns [`run`] for a cluster with outlier detection; `None` otherwise.
pub fn spawn(cluster: &Arc<ClusterState>) -> Option<tokio::task::JoinHandle<()>> {
    cluster.info.config.outlier_detection.as_ref()?;
    tokio::runtime::Handle::try_current().ok()?;
    Some(tokio::spawn(run(Arc::downgrade(cluster))))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::time::Duration;
    use strait_xds::model;

    /// A one-host cluster at `addr` with this health check.
    pub(crate) fn cluster_at(addr: SocketAddr, hc: model::HealthCheck) -> Arc<ClusterState> {
        build(&[addr], None, vec![hc])
    }

    /// [`cluster_at`] with the config adjusted by `tweak` first.
    pub(crate) fn cluster_at_with(
        addr: SocketAddr,
        hc: model::HealthCheck,
        tweak: impl FnOnce(&mut model::Cluster),
    ) -> Arc<ClusterState> {
        build_with(&[addr], None, vec![hc], tweak)
    }

    pub(crate) fn cluster(n: u16, od: Option<OutlierDetection>, hc: bool) -> Arc<ClusterState> {
        let addrs: Vec<SocketAddr> = (1..=n)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        let checks = if hc { vec![check()] } else { Vec::new() };
        build(&addrs, od, checks)
    }

    fn build(
        addrs: &[SocketAddr],
        od: Option<OutlierDetection>,
        health_checks: Vec<model::HealthCheck>,
    ) -> Arc<ClusterState> {
        build_with(addrs, od, health_checks, |_| {})
    }

    fn build_with(
        addrs: &[SocketAddr],
        od: Option<OutlierDetection>,
        health_checks: Vec<model::HealthCheck>,
        tweak: impl FnOnce(&mut model::Cluster),
    ) -> Arc<ClusterState> {
        let eps = addrs
            .iter()
            .map(|a| model::LbEndpoint {
                address: model::EndpointAddress::Ip(*a),
                load_balancing_weight: 1,
                health_status: model::HealthStatus::Unknown,
                hostname: None,
            })
            .collect();
        let cfg = model::Cluster {
            name: "c".into(),
            discovery: model::DiscoveryType::Static,
            connect_timeout: Duration::from_secs(1),
            lb_policy: model::LbPolicy::RoundRobin,
            load_assignment: model::LoadAssignment {
                endpoints: vec![model::LocalityLbEndpoints {
                    locality: Default::default(),
                    priority: 0,
                    load_balancing_weight: None,
                    lb_endpoints: eps,
                }],
                policy: Default::default(),
            },
            protocol: model::UpstreamProtocol::Http1,
            circuit_breakers: Default::default(),
            idle_timeout: None,
            dns_refresh_rate: Duration::from_secs(5),
            dns_lookup_family: Default::default(),
            lb: Default::default(),
            health_checks,
            outlier_detection: od,
            circuit_breakers_high: Default::default(),
        };
        let mut cfg = cfg;
        tweak(&mut cfg);
        ClusterState::new(Arc::new(cfg), &crate::stats::Store::default())
    }

    fn check() -> model::HealthCheck {
        model::HealthCheck {
            timeout: Duration::from_secs(1),
            interval: Duration::from_secs(1),
            initial_jitter: Duration::ZERO,
            interval_jitter: Duration::ZERO,
            interval_jitter_percent: 0,
            unhealthy_threshold: 1,
            healthy_threshold: 1,
            no_traffic_interval: Duration::from_secs(1),
            no_traffic_healthy_interval: Duration::from_secs(1),
            unhealthy_interval: Duration::from_secs(1),
            unhealthy_edge_interval: Duration::from_secs(1),
            healthy_edge_interval: Duration::from_secs(1),
            reuse_connection: true,
            kind: model::HealthCheckKind::Tcp(Default::default()),
        }
    }

    fn od() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 3,
            max_ejection_percent: 50,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_grows_with_ejections_and_decays() {
        let c = cluster(4, Some(od()), false);
        let h = c.hosts()[0].clone();
        let stats = &c.info.stats.outlier_detection;
        for _ in 0..2 {
            report(&c, &h, Outcome::Http(503));
        }
        // A success breaks the streak.
        report(&c, &h, Outcome::Http(200));
        for _ in 0..2 {
            report(&c, &h, Outcome::Http(503));
        }
        assert!(h.health_state().passes());
        report(&c, &h, Outcome::Http(503));
        assert!(!h.health_state().passes());
        assert_eq!(h.health_flags(), "/failed_outlier_check");
        assert_eq!(stats.ejections_active.get(), 1);
        assert!(c.hosts().iter().all(|x| x.address != h.address) || c.pick().is_some());
        // First ejection: base_ejection_time (30 s), checked on interval ticks.
        tokio::time::advance(Duration::from_secs(29)).await;
        interval_tick(&c);
        assert!(!h.health_state().passes());
        tokio::time::advance(Duration::from_secs(1)).await;
        interval_tick(&c);
        assert!(h.health_state().passes());
        assert_eq!(stats.ejections_active.get(), 0);
        // Second ejection at once: 2 × base.
        for _ in 0..3 {
            report(&c, &h, Outcome::LocalConnectFailed);
        }
        assert!(
            !h.health_state().passes(),
            "local-origin errors count as 5xx unsplit"
        );
        assert_eq!(h.health_state().outlier.multiplier(), 2);
        tokio::time::advance(Duration::from_secs(59)).await;
        interval_tick(&c);
        assert!(!h.health_state().passes());
        tokio::time::advance(Duration::from_secs(1)).await;
        interval_tick(&c);
        assert!(h.health_state().passes());
        // Each interval in good standing takes one off the multiplier.
        interval_tick(&c);
        assert_eq!(h.health_state().outlier.multiplier(), 1);
        assert_eq!(stats.ejections_enforced_consecutive_5xx.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_and_gateway_and_split() {
        // 4 hosts, 50 %: the third ejection overflows.
        let c = cluster(4, Some(od()), false);
        let hosts = c.hosts();
        for h in &hosts[..3] {
            for _ in 0..3 {
                report(&c, h, Outcome::Http(500));
            }
        }
        let s = &c.info.stats.outlier_detection;
        assert_eq!(s.ejections_active.get(), 2);
        assert_eq!(s.ejections_overflow.get(), 1);
        assert_eq!(s.ejections_detected_consecutive_5xx.get(), 3);

        // Gateway failures are detected but not enforced by default (enforcing 0 %).
        let c = cluster(
            2,
            Some(OutlierDetection {
                consecutive_5xx: 100,
                consecutive_gateway_failure: 2,
                max_ejection_percent: 100,
                ..Default::default()
            }),
            false,
        );
        let h = &c.hosts()[0];
        report(&c, h, Outcome::Http(502));
        report(&c, h, Outcome::Http(504));
        let s = &c.info.stats.outlier_detection;
        assert_eq!(s.ejections_detected_consecutive_gateway_failure.get(), 1);
        assert_eq!(s.ejections_enforced_total.get(), 0);

        // Split mode: local-origin failures have their own streak; 5xx answers do not feed it.
        let c = cluster(
            2,
            Some(OutlierDetection {
                split_external_local_origin_errors: true,
                consecutive_local_origin_failure: 2,
                max_ejection_percent: 100,
                ..Default::default()
            }),
            false,
        );
        let h = &c.hosts()[0];
        report(&c, h, Outcome::LocalConnectFailed);
        report(&c, h, Outcome::LocalSuccess);
        report(&c, h, Outcome::LocalConnectFailed);
        report(&c, h, Outcome::Http(503));
        assert!(h.health_state().passes());
        report(&c, h, Outcome::LocalTimeout);
        assert!(!h.health_state().passes());
        let s = &c.info.stats.outlier_detection;
        assert_eq!(
            s.ejections_enforced_consecutive_local_origin_failure.get(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn success_rate_runs_on_the_interval() {
        let c = cluster(
            5,
            Some(OutlierDetection {
                consecutive_5xx: 1000,
                success_rate_minimum_hosts: 5,
                success_rate_request_volume: 10,
                max_ejection_percent: 100,
                ..Default::default()
            }),
            false,
        );
        let hosts = c.hosts();
        for (i, h) in hosts.iter().enumerate() {
            for n in 0..100 {
                let code = if i == 4 && n % 2 == 0 { 500 } else { 200 };
                report(&c, h, Outcome::Http(code));
            }
        }
        interval_tick(&c);
        assert!(!hosts[4].health_state().passes());
        assert!(hosts[..4].iter().all(|h| h.health_state().passes()));
        assert_eq!(hosts[0].health_state().outlier.success_rate(), 100.0);
        assert_eq!(hosts[4].health_state().outlier.success_rate(), 50.0);
        assert_eq!(
            hosts[4].health_state().outlier.local_origin_success_rate(),
            -1.0
        );
        let view = c.view();
        assert_eq!(view.hosts[4].success_rate, 50.0);
        // Mean 90, stdev 20, threshold 90 - 1.9 × 20.
        let o = view.outlier.expect("outlier detection configured");
        assert_eq!(o[0], 90.0);
        assert!((o[1] - 52.0).abs() < 1e-9, "{o:?}");
        assert_eq!(o[2], -1.0);
        assert_eq!(
            c.info
                .stats
                .outlier_detection
                .ejections_enforced_success_rate
                .get(),
            1
        );
        // Buckets restart every interval: nothing more to judge.
        interval_tick(&c);
        assert_eq!(c.info.stats.outlier_detection.ejections_active.get(), 1);
    }

    #[test]
    fn success_rate_ejects_below_threshold() {
        let cfg = OutlierDetection {
            success_rate_minimum_hosts: 3,
            success_rate_request_volume: 10,
            ..Default::default()
        };
        // Rates 100, 100, 100, 100, 50: mean 90, stdev 20, threshold 90 - 38 = 52.
        let b = [(100, 0), (100, 0), (100, 0), (100, 0), (100, 50)];
        assert_eq!(success_rate(&cfg, &b), vec![4]);
        // Too few hosts with enough volume.
        let b = [(100, 0), (5, 0), (100, 50)];
        assert!(success_rate(&cfg, &b).is_empty());
    }

    #[test]
    fn failure_percentage_ejects_over_threshold() {
        let cfg = OutlierDetection {
            failure_percentage_minimum_hosts: 2,
            failure_percentage_request_volume: 10,
            ..Default::default()
        };
        let b = [(100, 0), (100, 90), (100, 80), (5, 5)];
        assert_eq!(failure_percentage(&cfg, &b), vec![1]);
    }
}
