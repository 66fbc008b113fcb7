//! The stats seam: filters create Envoy-named counters and gauges through a [`StatsSink`] at
//! build time and update them with one relaxed atomic on the request path. The data plane
//! implements the sink over its store (keyed by name, so values survive reloads).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

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

/// Where filters get their stats. `name` is the full Envoy name, e.g.
/// `http.ingress.fault.aborts_injected`; the same name must return the same `Arc` every time
/// so a rebuilt filter keeps counting where the old one stopped.
pub trait StatsSink: Send + Sync {
    fn counter(&self, name: &str) -> Arc<Counter>;
    fn gauge(&self, name: &str) -> Arc<Gauge>;
}

/// A simple in-memory sink (tests, and a default for embedders without a store).
#[derive(Debug, Default)]
pub struct MemoryStats {
    counters: Mutex<BTreeMap<String, Arc<Counter>>>,
    gauges: Mutex<BTreeMap<String, Arc<Gauge>>>,
}

impl MemoryStats {
    /// Value of a counter, 0 if never created.
    pub fn counter_value(&self, name: &str) -> u64 {
        let map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        map.get(name).map_or(0, |c| c.get())
    }

    pub fn gauge_value(&self, name: &str) -> i64 {
        let map = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        map.get(name).map_or(0, |g| g.get())
    }

    /// All stat names created so far.
    pub fn names(&self) -> Vec<String> {
        let c = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let g = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        c.keys().chain(g.keys()).cloned().collect()
    }
}

impl StatsSink for MemoryStats {
    fn counter(&self, name: &str) -> Arc<Counter> {
        let mut map = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }

    fn gauge(&self, name: &str) -> Arc<Gauge> {
        let mut map = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }
}
