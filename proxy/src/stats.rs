//! Envoy-named counters and gauges. Stat blocks are created at config time and handed to the
//! request path as `Arc`s; on the request path a stat update is one relaxed atomic add, never a
//! lock or a map lookup. Blocks are keyed by name in the [`Store`] so that they survive config
//! reloads, as Envoy's do.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    #[inline]
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One stat as the admin endpoints see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatValue {
    Counter(u64),
    Gauge(i64),
}

/// Declares a block of stats with a `visit` method that yields `(suffix, value)` pairs.
macro_rules! stat_block {
    ($(#[$m:meta])* $name:ident { counters: [$($c:ident),* $(,)?], gauges: [$($g:ident),* $(,)?] $(, extra: [$($x:ident: $xt:ty),* $(,)?])? $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name {
            $(pub $c: Counter,)*
            $(pub $g: Gauge,)*
            $($(pub $x: $xt,)*)?
        }
        impl $name {
            /// Calls `f` with each stat's Envoy suffix and value.
            pub fn visit(&self, f: &mut dyn FnMut(&'static str, StatValue)) {
                $(f(stringify!($c), StatValue::Counter(self.$c.get()));)*
                $(f(stringify!($g), StatValue::Gauge(self.$g.get()));)*
            }
        }
    };
}

stat_block! {
    /// `http.<stat_prefix>.*` — one per HTTP connection manager stat prefix.
    HttpStats {
        counters: [
            downstream_cx_total, downstream_cx_http1_total, downstream_cx_http2_total,
            downstream_cx_destroy, downstream_cx_protocol_error, downstream_cx_drain_close,
            downstream_cx_rx_bytes_total, downstream_cx_tx_bytes_total,
            downstream_rq_total, downstream_rq_http1_total, downstream_rq_http2_total,
            downstream_rq_1xx, downstream_rq_2xx, downstream_rq_3xx, downstream_rq_4xx,
            downstream_rq_5xx, downstream_rq_completed, downstream_rq_timeout,
            downstream_rq_idle_timeout, downstream_rq_header_timeout, downstream_rq_rx_reset,
            downstream_rq_tx_reset, downstream_rq_too_large, downstream_rq_ws_on_non_ws_route,
            downstream_cx_upgrades_total,
            no_route, no_cluster, rq_direct_response, rq_redirect, rq_total,
        ],
        gauges: [downstream_cx_active, downstream_cx_http1_active, downstream_cx_http2_active,
                 downstream_rq_active, downstream_cx_upgrades_active],
    }
}

impl HttpStats {
    /// Counts a finished downstream response by class.
    #[inline]
    pub fn count_response(&self, status: u16) {
        match status / 100 {
            1 => self.downstream_rq_1xx.inc(),
            2 => self.downstream_rq_2xx.inc(),
            3 => self.downstream_rq_3xx.inc(),
            4 => self.downstream_rq_4xx.inc(),
            _ => self.downstream_rq_5xx.inc(),
        }
        self.downstream_rq_completed.inc();
    }
}

stat_block! {
    /// `cluster.<name>.*` — one per cluster name.
    ClusterStats {
        counters: [
            upstream_cx_total, upstream_cx_http1_total, upstream_cx_http2_total,
            upstream_cx_connect_fail, upstream_cx_connect_timeout, upstream_cx_destroy,
            upstream_cx_destroy_local, upstream_cx_destroy_remote, upstream_cx_idle_timeout,
            upstream_cx_overflow, upstream_cx_protocol_error, upstream_cx_close_notify,
            upstream_cx_rx_bytes_total, upstream_cx_tx_bytes_total,
            upstream_rq_total, upstream_rq_completed, upstream_rq_1xx, upstream_rq_2xx,
            upstream_rq_3xx, upstream_rq_4xx, upstream_rq_5xx,
            upstream_rq_timeout, upstream_rq_per_try_timeout, upstream_rq_rx_reset,
            upstream_rq_tx_reset, upstream_rq_pending_total, upstream_rq_pending_overflow,
            upstream_rq_pending_failure_eject, upstream_rq_cancelled,
            upstream_rq_retry, upstream_rq_retry_success, upstream_rq_retry_overflow,
            upstream_rq_retry_limit_exceeded,
            upstream_rq_retry_backoff_exponential,
            lb_healthy_panic, lb_local_cluster_not_ok, lb_recalculate_zone_structures,
            lb_zone_cluster_too_small, lb_zone_no_capacity_left, lb_zone_routing_all_directly,
            lb_zone_routing_sampled, lb_zone_routing_cross_zone, update_attempt, update_success, update_failure, update_empty,
            upstream_flow_control_paused_reading_total, upstream_flow_control_resumed_reading_total,
        ],
        gauges: [upstream_cx_active, upstream_rq_active, upstream_rq_pending_active,
                 membership_total, membership_healthy, membership_degraded, membership_excluded,
                 max_host_weight],
        extra: [upstream_rq_by_code: CodeCounters, health_check: HealthCheckStats,
                outlier_detection: OutlierStats],
    }
}

stat_block! {
    /// `cluster.<name>.health_check.*` — active health checking.
    HealthCheckStats {
        counters: [attempt, success, failure, passive_failure, network_failure, verify_cluster],
        gauges: [healthy, degraded],
        extra: [enabled: std::sync::atomic::AtomicBool],
    }
}

stat_block! {
    /// `cluster.<name>.outlier_detection.*` — Envoy's ejection stats.
    OutlierStats {
        counters: [
            ejections_enforced_total, ejections_overflow,
            ejections_enforced_consecutive_5xx, ejections_detected_consecutive_5xx,
            ejections_enforced_success_rate, ejections_detected_success_rate,
            ejections_enforced_consecutive_gateway_failure,
            ejections_detected_consecutive_gateway_failure,
            ejections_enforced_consecutive_local_origin_failure,
            ejections_detected_consecutive_local_origin_failure,
            ejections_enforced_local_origin_success_rate,
            ejections_detected_local_origin_success_rate,
            ejections_enforced_failure_percentage, ejections_detected_failure_percentage,
            ejections_enforced_failure_percentage_local_origin,
            ejections_detected_failure_percentage_local_origin,
        ],
        gauges: [ejections_active],
    }
}

/// Per-status-code counters (`upstream_rq_200`, `upstream_rq_503`, ...), allocated on the first
/// response so that clusters that never answer cost nothing; only codes seen are reported, as in
/// Envoy.
#[derive(Debug, Default)]
pub struct CodeCounters(std::sync::OnceLock<Box<[Counter]>>);

impl CodeCounters {
    const FIRST: u16 = 100;
    const LAST: u16 = 599;

    #[inline]
    pub fn inc(&self, status: u16) {
        if !(Self::FIRST..=Self::LAST).contains(&status) {
            return;
        }
        let table = self.0.get_or_init(|| {
            (Self::FIRST..=Self::LAST)
                .map(|_| Counter::default())
                .collect()
        });
        table[usize::from(status - Self::FIRST)].inc();
    }

    /// Calls `f` with each code that was counted at least once.
    pub fn visit(&self, f: &mut dyn FnMut(u16, u64)) {
        if let Some(table) = self.0.get() {
            for (i, c) in table.iter().enumerate() {
                let n = c.get();
                if n > 0 {
                    f(Self::FIRST + i as u16, n);
                }
            }
        }
    }
}

impl ClusterStats {
    /// Counts a finished upstream response by class and by code.
    #[inline]
    pub fn count_response(&self, status: u16) {
        self.upstream_rq_by_code.inc(status);
        match status / 100 {
            1 => self.upstream_rq_1xx.inc(),
            2 => self.upstream_rq_2xx.inc(),
            3 => self.upstream_rq_3xx.inc(),
            4 => self.upstream_rq_4xx.inc(),
            _ => self.upstream_rq_5xx.inc(),
        }
        self.upstream_rq_completed.inc();
    }
}

stat_block! {
    /// Per-host counters shown by `/clusters` (`cluster::addr::rq_total::N`).
    HostStats {
        counters: [cx_total, cx_connect_fail, rq_total, rq_success, rq_error, rq_timeout],
        gauges: [cx_active, rq_active, rq_pending_active],
    }
}

stat_block! {
    /// `server.*`, `cluster_manager.*`, `listener_manager.*` and other process-wide stats.
    ServerStats {
        counters: [],
        gauges: [live, concurrency, total_connections, days_until_first_cert_expiring],
    }
}

stat_block! {
    /// `listener.<address>.*` — one per listener address.
    ListenerStats {
        counters: [downstream_cx_total, downstream_cx_destroy, downstream_cx_overflow],
        gauges: [downstream_cx_active],
    }
}

/// Stats created by name at config time (HTTP filters' `http.<prefix>.fault.*`, `lrl.*`, ...),
/// as [`strait_filters::StatsSink`]. Process-wide, because filters are built while translating
/// config, before and apart from any [`Store`]; every `Store` lists them. The same name always
/// returns the same `Arc`, so counts survive reloads.
#[derive(Debug, Default)]
pub struct NamedStats {
    counters: Mutex<BTreeMap<String, Arc<strait_filters::Counter>>>,
    gauges: Mutex<BTreeMap<String, Arc<strait_filters::Gauge>>>,
}

impl NamedStats {
    /// The process's named stats.
    pub fn process() -> Arc<NamedStats> {
        static PROCESS: std::sync::OnceLock<Arc<NamedStats>> = std::sync::OnceLock::new();
        PROCESS.get_or_init(Arc::default).clone()
    }

    fn visit(&self, f: &mut dyn FnMut(&str, StatValue)) {
        // Config-time only maps; a poisoned lock still holds whole entries.
        let c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in c.iter() {
            f(k, StatValue::Counter(v.get()));
        }
        drop(c);
        let g = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in g.iter() {
            f(k, StatValue::Gauge(v.get()));
        }
    }
}

impl strait_filters::StatsSink for NamedStats {
    fn counter(&self, name: &str) -> Arc<strait_filters::Counter> {
        let mut c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        c.entry(name.to_string()).or_default().clone()
    }

    fn gauge(&self, name: &str) -> Arc<strait_filters::Gauge> {
        let mut g = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        g.entry(name.to_string()).or_default().clone()
    }
}

/// All stat blocks of the process, by name. Only touched at config time and by the admin server.
#[derive(Debug, Default)]
pub struct Store {
    inner: Mutex<StoreInner>,
    pub server: ServerStats,
    /// Config-plane gauges.
    pub xds: XdsGauges,
}

stat_block! {
    /// `control_plane.connected_state`, `cluster_manager.active_clusters`,
    /// `listener_manager.total_listeners_active` (see [`XdsGauges::visit_named`]).
    XdsGauges {
        counters: [],
        gauges: [connected_state, active_clusters, total_listeners_active],
    }
}

impl XdsGauges {
    /// Each gauge with its full Envoy name.
    pub fn visit_named(&self, f: &mut dyn FnMut(&'static str, StatValue)) {
        f(
            "control_plane.connected_state",
            StatValue::Gauge(self.connected_state.get()),
        );
        f(
            "cluster_manager.active_clusters",
            StatValue::Gauge(self.active_clusters.get()),
        );
        f(
            "listener_manager.total_listeners_active",
            StatValue::Gauge(self.total_listeners_active.get()),
        );
    }
}

#[derive(Debug, Default)]
struct StoreInner {
    http: BTreeMap<String, Arc<HttpStats>>,
    cluster: BTreeMap<String, Arc<ClusterStats>>,
    listener: BTreeMap<String, Arc<ListenerStats>>,
}

impl Store {
    pub fn new() -> Arc<Store> {
        Arc::new(Store::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoreInner> {
        // A panic while holding this lock cannot leave the maps inconsistent (each insert is
        // one call), so a poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The block for `http.<prefix>.`, created on first use.
    pub fn http(&self, prefix: &str) -> Arc<HttpStats> {
        self.lock()
            .http
            .entry(prefix.to_string())
            .or_default()
            .clone()
    }

    /// The block for `cluster.<name>.`, created on first use.
    pub fn cluster(&self, name: &str) -> Arc<ClusterStats> {
        self.lock()
            .cluster
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// The block for `listener.<address>.`, created on first use.
    pub fn listener(&self, address: &str) -> Arc<ListenerStats> {
        self.lock()
            .listener
            .entry(address.to_string())
            .or_default()
            .clone()
    }

    /// Every stat as `(full Envoy name, value)`, sorted by name.
    pub fn all(&self) -> Vec<(String, StatValue)> {
        let mut out = Vec::new();
        {
            let inner = self.lock();
            for (p, s) in &inner.http {
                s.visit(&mut |k, v| out.push((format!("http.{p}.{k}"), v)));
            }
            for (n, s) in &inner.cluster {
                s.visit(&mut |k, v| out.push((format!("cluster.{n}.{k}"), v)));
                // Only clusters with health checks have these, as in Envoy.
                if s.health_check
                    .enabled
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    s.health_check
                        .visit(&mut |k, v| out.push((format!("cluster.{n}.health_check.{k}"), v)));
                }
                s.outlier_detection
                    .visit(&mut |k, v| out.push((format!("cluster.{n}.outlier_detection.{k}"), v)));
                s.upstream_rq_by_code.visit(&mut |code, v| {
                    out.push((
                        format!("cluster.{n}.upstream_rq_{code}"),
                        StatValue::Counter(v),
                    ))
                });
            }
            for (a, s) in &inner.listener {
                s.visit(&mut |k, v| out.push((format!("listener.{a}.{k}"), v)));
            }
        }
        self.server
            .visit(&mut |k, v| out.push((format!("server.{k}"), v)));
        self.xds
            .visit_named(&mut |k, v| out.push((k.to_string(), v)));
        NamedStats::process().visit(&mut |k, v| out.push((k.to_string(), v)));
        // Strait-only: live tasks of the runtime serving the admin request (the proxy's), so a
        // reload test can see that replaced config leaves no tasks behind.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let n = i64::try_from(rt.metrics().num_alive_tasks()).unwrap_or(i64::MAX);
            out.push(("server.tokio_alive_tasks".to_string(), StatValue::Gauge(n)));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        // One name, two sources: an EDS cluster's `cluster.<name>.update_*` come from both its
        // block (DNS refreshes) and the xDS subscription's named stats. Envoy has one stat.
        out.dedup_by(|next, kept| {
            if next.0 != kept.0 {
                return false;
            }
            kept.1 = match (kept.1, next.1) {
                (StatValue::Counter(a), StatValue::Counter(b)) => StatValue::Counter(a + b),
                (StatValue::Gauge(a), StatValue::Gauge(b)) => StatValue::Gauge(a + b),
                (k, _) => k,
            };
            true
        });
        out
    }
}
