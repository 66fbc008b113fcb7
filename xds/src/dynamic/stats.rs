//! Envoy's xDS subscription stats, by Envoy's names: `cluster_manager.cds.*`,
//! `listener_manager.lds.*`, `http.<stat_prefix>.rds.<route_config_name>.*` and, for EDS
//! clusters, `cluster.<name>.*`. Created once per subscription through the [`StatsSink`]; only
//! touched while applying an update, never on the request path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use strait_filters::{Counter, Gauge, StatsSink};

/// Which subscription a block belongs to: each has the stats Envoy 1.40 shows for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Cds,
    Lds,
    Rds,
    Eds,
}

/// One subscription's stats. Optional ones exist only for the kinds where Envoy has them.
#[derive(Debug)]
pub(crate) struct SubStats {
    pub(crate) attempt: Arc<Counter>,
    pub(crate) success: Arc<Counter>,
    pub(crate) rejected: Arc<Counter>,
    pub(crate) failure: Arc<Counter>,
    pub(crate) init_fetch_timeout: Arc<Counter>,
    pub(crate) version: Arc<Gauge>,
    pub(crate) update_time: Arc<Gauge>,
    pub(crate) empty: Option<Arc<Counter>>,
    pub(crate) no_rebuild: Option<Arc<Counter>>,
    pub(crate) config_reload: Option<(Arc<Counter>, Arc<Gauge>)>,
}

impl SubStats {
    fn new(sink: &dyn StatsSink, prefix: &str, kind: Kind) -> SubStats {
        let c = |s: &str| sink.counter(&format!("{prefix}.{s}"));
        let g = |s: &str| sink.gauge(&format!("{prefix}.{s}"));
        SubStats {
            attempt: c("update_attempt"),
            success: c("update_success"),
            rejected: c("update_rejected"),
            failure: c("update_failure"),
            init_fetch_timeout: c("init_fetch_timeout"),
            version: g("version"),
            update_time: g("update_time"),
            empty: matches!(kind, Kind::Rds | Kind::Eds).then(|| c("update_empty")),
            no_rebuild: (kind == Kind::Eds).then(|| c("update_no_rebuild")),
            config_reload: matches!(kind, Kind::Cds | Kind::Rds)
                .then(|| (c("config_reload"), g("config_reload_time_ms"))),
        }
    }

    /// An accepted update: `changed` when it reloaded the configuration.
    pub(crate) fn accepted(&self, version_info: &str, changed: bool) {
        let now = epoch_ms();
        self.attempt.inc();
        self.success.inc();
        self.version.set(version_hash(version_info));
        self.update_time.set(now);
        if changed {
            if let Some((reload, at)) = &self.config_reload {
                reload.inc();
                at.set(now);
            }
        } else if let Some(n) = &self.no_rebuild {
            n.inc();
        }
    }

    pub(crate) fn rejected(&self) {
        self.attempt.inc();
        self.rejected.inc();
    }

    /// The resource was removed (Delta) or the stream failed: Envoy counts both as an attempt.
    pub(crate) fn emptied(&self) {
        self.attempt.inc();
        if let Some(e) = &self.empty {
            e.inc();
        }
    }

    pub(crate) fn connection_failed(&self) {
        self.attempt.inc();
        self.failure.inc();
    }
}

/// Envoy's `version` gauge: xxHash64 of `version_info`. Strait's gauges are signed, so the top
/// bit is cleared (Envoy shows the full unsigned value); the gauge still changes exactly when
/// the version does, which is what dashboards compare.
pub fn version_hash(version_info: &str) -> i64 {
    let h = xxhash_rust::xxh64::xxh64(version_info.as_bytes(), 0);
    i64::try_from(h & (i64::MAX as u64)).unwrap_or(i64::MAX)
}

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The stat prefix of an RDS subscription: Envoy replaces `:` in the route configuration name.
pub(crate) fn rds_prefix(stat_prefix: &str, route_config_name: &str) -> String {
    format!(
        "http.{stat_prefix}.rds.{}",
        route_config_name.replace(':', "_")
    )
}

/// Blocks by prefix, so a subscription keeps its block across updates.
pub(crate) struct Registry {
    sink: Arc<dyn StatsSink>,
    blocks: Mutex<HashMap<String, Arc<SubStats>>>,
}

impl Registry {
    pub(crate) fn new(sink: Arc<dyn StatsSink>) -> Registry {
        Registry {
            sink,
            blocks: Mutex::new(HashMap::new()),
        }
    }

    /// The block for `prefix`. Creating it starts the subscription, which Envoy counts as an
    /// attempt (so `update_attempt` = 1 + responses, as Envoy shows).
    pub(crate) fn get(&self, prefix: &str, kind: Kind) -> Arc<SubStats> {
        let mut blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = blocks.get(prefix) {
            return b.clone();
        }
        let b = Arc::new(SubStats::new(self.sink.as_ref(), prefix, kind));
        b.attempt.inc();
        blocks.insert(prefix.to_string(), b.clone());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_hash_is_envoys_xxhash64_without_the_sign_bit() {
        // Envoy 1.40 showed `version: 13237225503670494420` for version_info "1".
        assert_eq!(
            version_hash("1"),
            (13237225503670494420u64 & (i64::MAX as u64)) as i64
        );
        assert_ne!(version_hash("1"), version_hash("2"));
    }

    #[test]
    fn rds_prefix_replaces_colons() {
        assert_eq!(rds_prefix("ing", "rc:one"), "http.ing.rds.rc_one");
    }
}
