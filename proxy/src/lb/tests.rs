//! Unit tests of the LB state: priority, locality, zone-aware and hashing picks, over clusters
//! built from config as the data plane builds them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use strait_xds::model::{self, EndpointAddress, HealthStatus, LbPolicy, Locality};

use super::LbContext;
use crate::cluster::{ClusterManager, ClusterState};
use crate::stats::Store;

use HealthStatus::*;

/// (zone, priority, locality weight, [(port, weight, health)]).
type Group<'a> = (&'a str, u32, Option<u32>, &'a [(u16, u32, HealthStatus)]);

fn config(
    name: &str,
    policy: LbPolicy,
    lb: model::LbConfig,
    groups: &[Group<'_>],
) -> model::Cluster {
    let endpoints = groups
        .iter()
        .map(|&(zone, priority, lw, eps)| model::LocalityLbEndpoints {
            locality: Locality {
                region: "r".into(),
                zone: zone.into(),
                sub_zone: String::new(),
            },
            priority,
            load_balancing_weight: lw,
            lb_endpoints: eps
                .iter()
                .map(|&(port, weight, health)| model::LbEndpoint {
                    address: EndpointAddress::Ip(SocketAddr::from(([127, 0, 0, 1], port))),
                    load_balancing_weight: weight,
                    health_status: health,
                    hostname: None,
                })
                .collect(),
        })
        .collect();
    model::Cluster {
        name: name.into(),
        discovery: model::DiscoveryType::Static,
        connect_timeout: Duration::from_secs(1),
        lb_policy: policy,
        load_assignment: model::LoadAssignment {
            endpoints,
            policy: Default::default(),
        },
        protocol: model::UpstreamProtocol::Http1,
        circuit_breakers: Default::default(),
        idle_timeout: None,
        dns_refresh_rate: Duration::from_secs(5),
        dns_lookup_family: model::DnsLookupFamily::Auto,
        health_checks: Vec::new(),
        outlier_detection: None,
        circuit_breakers_high: Default::default(),
        lb,
    }
}

fn cluster(policy: LbPolicy, lb: model::LbConfig, groups: &[Group<'_>]) -> Arc<ClusterState> {
    ClusterState::new(Arc::new(config("c", policy, lb, groups)), &Store::default())
}

fn counts(c: &ClusterState, n: usize) -> HashMap<u16, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        if let Some(h) = c.pick() {
            *m.entry(h.address.port()).or_default() += 1;
        }
    }
    m
}

/// Share of `n` picks within 5 sigma of `p`.
fn near(got: usize, n: usize, p: f64) -> bool {
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    (got as f64 - n as f64 * p).abs() <= 5.0 * sigma + 1.0
}

#[test]
fn priority_spill_over_and_degraded() {
    let c = cluster(
        LbPolicy::RoundRobin,
        Default::default(),
        &[
            ("a", 0, None, &[(1, 1, Healthy), (2, 1, Unhealthy)]),
            ("a", 1, None, &[(3, 1, Healthy)]),
        ],
    );
    let m = counts(&c, 10_000);
    assert!(
        near(m[&1], 10_000, 0.7) && near(m[&3], 10_000, 0.3),
        "{m:?}"
    );
    assert_eq!(m.get(&2), None);
    assert_eq!(c.lb_state().plan().load.healthy, [70, 30]);
    // Degraded hosts take only what healthy hosts of every priority leave.
    let c = cluster(
        LbPolicy::Random,
        Default::default(),
        &[("a", 0, None, &[(1, 1, Healthy), (2, 1, Degraded)])],
    );
    let m = counts(&c, 10_000);
    assert!(
        near(m[&1], 10_000, 0.7) && near(m[&2], 10_000, 0.3),
        "{m:?}"
    );
    let c = cluster(
        LbPolicy::Random,
        Default::default(),
        &[
            ("a", 0, None, &[(1, 1, Healthy), (2, 1, Degraded)]),
            ("a", 1, None, &[(3, 1, Healthy)]),
        ],
    );
    let m = counts(&c, 10_000);
    assert!(
        near(m[&1], 10_000, 0.7) && near(m[&3], 10_000, 0.3),
        "{m:?}"
    );
    assert_eq!(m.get(&2), None);
    // DRAINING is excluded from the ratio: P0 is 1 of 1 healthy.
    let c = cluster(
        LbPolicy::RoundRobin,
        Default::default(),
        &[
            ("a", 0, None, &[(1, 1, Healthy), (2, 1, Draining)]),
            ("a", 1, None, &[(3, 1, Healthy)]),
        ],
    );
    assert_eq!(counts(&c, 100), HashMap::from([(1, 100)]));
}

#[test]
fn weighted_round_robin_is_exact() {
    let c = cluster(
        LbPolicy::RoundRobin,
        Default::default(),
        &[("a", 0, None, &[(1, 1, Healthy), (2, 3, Healthy)])],
    );
    assert_eq!(counts(&c, 400), HashMap::from([(1, 100), (2, 300)]));
}

#[test]
fn locality_weights_and_fail_on_panic() {
    let lb = model::LbConfig {
        locality_weighted: true,
        ..Default::default()
    };
    let c = cluster(
        LbPolicy::RoundRobin,
        lb.clone(),
        &[
            ("x", 0, Some(1), &[(1, 1, Healthy), (2, 1, Healthy)]),
            ("y", 0, Some(2), &[(3, 1, Healthy), (4, 1, Healthy)]),
            // Unweighted localities get nothing.
            ("z", 0, None, &[(5, 1, Healthy)]),
        ],
    );
    let m = counts(&c, 3 * 1024 * 4);
    let x = m[&1] + m[&2];
    let y = m[&3] + m[&4];
    assert!(x.abs_diff(4096) <= 4 && y.abs_diff(8192) <= 4, "{m:?}");
    assert_eq!(m.get(&5), None);
    // X at 50 %: effective weight 0.7 against 2.
    let c = cluster(
        LbPolicy::RoundRobin,
        lb.clone(),
        &[
            ("x", 0, Some(1), &[(1, 1, Healthy), (2, 1, Unhealthy)]),
            ("y", 0, Some(2), &[(3, 1, Healthy), (4, 1, Healthy)]),
        ],
    );
    let m = counts(&c, 27_000);
    assert!(m[&1].abs_diff(7000) <= 20, "{m:?}");
    // Panic with fail_traffic_on_panic (Strait's extension for locality-weighted): no host.
    let failing = model::LbConfig {
        fail_traffic_on_panic: true,
        ..lb
    };
    let c = cluster(
        LbPolicy::RoundRobin,
        failing,
        &[(
            "x",
            0,
            Some(1),
            &[(1, 1, Healthy), (2, 1, Unhealthy), (3, 1, Unhealthy)],
        )],
    );
    assert!(c.pick().is_none());
    assert_eq!(c.stats().lb_healthy_panic.get(), 1);
}

fn zone_clusters(upstream_a: &[(u16, u32, HealthStatus)], min: u64) -> (ClusterManager, Store) {
    let lb = model::LbConfig {
        zone_aware: model::ZoneAware {
            min_cluster_size: min,
            ..Default::default()
        },
        local_cluster_name: Some("local".into()),
        local_locality: Locality {
            region: "r".into(),
            zone: "a".into(),
            sub_zone: String::new(),
        },
        ..Default::default()
    };
    let local = config(
        "local",
        LbPolicy::RoundRobin,
        lb.clone(),
        &[
            ("a", 0, None, &[(101, 1, Healthy)]),
            ("b", 0, None, &[(102, 1, Healthy)]),
            ("c", 0, None, &[(103, 1, Healthy)]),
        ],
    );
    let up = config(
        "up",
        LbPolicy::RoundRobin,
        lb,
        &[
            ("a", 0, None, upstream_a),
            (
                "b",
                0,
                None,
                &[(3, 1, Healthy), (4, 1, Healthy), (7, 1, Healthy)],
            ),
            (
                "c",
                0,
                None,
                &[(5, 1, Healthy), (6, 1, Healthy), (8, 1, Healthy)],
            ),
        ],
    );
    let store = Store::default();
    let cm = ClusterManager::new(&[Arc::new(local), Arc::new(up)], &store);
    (cm, store)
}

#[test]
fn zone_aware_direct_and_residual() {
    // Equal shares on both sides (3 of 9 upstream hosts, 1 of 3 proxies): all stays in zone a.
    let (cm, _s) = zone_clusters(&[(1, 1, Healthy), (2, 1, Healthy), (9, 1, Healthy)], 6);
    let up = cm.get("up").expect("up");
    let m = counts(up, 999);
    let local: usize = [1, 2, 9]
        .iter()
        .map(|p| m.get(p).copied().unwrap_or(0))
        .sum();
    assert_eq!(local, 999, "{m:?}");
    assert_eq!(up.stats().lb_zone_routing_all_directly.get(), 999);
    // Zone a upstream has 1 of 7 healthy hosts (1428 / 10000) for 3333 / 10000 of the proxies:
    // 1428 x 10000 / 3333 = 4284 of 10000 picks stay local, the rest go to b and c by residual
    // capacity.
    let (cm, _s) = zone_clusters(&[(1, 1, Healthy), (2, 1, Unhealthy), (9, 1, Unhealthy)], 6);
    let up = cm.get("up").expect("up");
    let n = 10_000;
    let m = counts(up, n);
    assert!(near(m[&1], n, 0.4284), "{m:?}");
    assert!(up.stats().lb_zone_routing_sampled.get() > 0);
    assert!(up.stats().lb_zone_routing_cross_zone.get() > 0);
}

#[test]
fn zone_aware_needs_min_cluster_size() {
    let (cm, _s) = zone_clusters(&[(1, 1, Healthy)], 8);
    let up = cm.get("up").expect("up");
    // 7 healthy hosts < min_cluster_size 8: plain round robin over all of them.
    let m = counts(up, 700);
    assert_eq!(m.len(), 7, "{m:?}");
    assert!(up.stats().lb_zone_cluster_too_small.get() > 0);
}

fn hosts(n: u16) -> Vec<(u16, u32, HealthStatus)> {
    (1..=n).map(|p| (p, 1, Healthy)).collect()
}

fn stability(policy: LbPolicy) {
    let all = hosts(100);
    let before = cluster(policy, Default::default(), &[("a", 0, None, &all)]);
    let removed: Vec<_> = all.iter().copied().filter(|h| h.0 != 50).collect();
    let after = cluster(policy, Default::default(), &[("a", 0, None, &removed)]);
    let keys = 20_000u64;
    let mut moved = 0;
    let mut per_host: HashMap<u16, usize> = HashMap::new();
    for k in 0..keys {
        let hash = crate::lb::hash::xxhash64(&k.to_le_bytes());
        let ctx = LbContext {
            hash: Some(hash),
            ..Default::default()
        };
        let a = before.pick_with(&ctx).expect("host").address.port();
        let b = after.pick_with(&ctx).expect("host").address.port();
        // Same key, same host, every time.
        assert_eq!(before.pick_with(&ctx).expect("host").address.port(), a);
        *per_host.entry(a).or_default() += 1;
        if a != b {
            moved += 1;
        }
    }
    // About 1/100 of the keys lived on the removed host and must move; others barely move.
    let share = moved as f64 / keys as f64;
    assert!((0.005..0.03).contains(&share), "{policy:?}: {share}");
    let max = per_host.values().max().copied().unwrap_or(0);
    assert!(
        max < 3 * keys as usize / 100,
        "{policy:?}: hottest host {max}"
    );
}

#[test]
fn ring_hash_is_stable() {
    stability(LbPolicy::RingHash {
        min_ring_size: 1024,
        max_ring_size: 8 * 1024 * 1024,
    });
}

#[test]
fn maglev_is_stable() {
    stability(LbPolicy::Maglev { table_size: 65537 });
}

#[test]
fn bounded_load_moves_off_a_busy_host() {
    let lb = model::LbConfig {
        hash_balance_factor: Some(150),
        ..Default::default()
    };
    let c = cluster(
        LbPolicy::Maglev { table_size: 65537 },
        lb,
        &[("a", 0, None, &hosts(4))],
    );
    let ctx = LbContext {
        hash: Some(42),
        ..Default::default()
    };
    let first = c.pick_with(&ctx).expect("host");
    first.stats.rq_active.set(10);
    c.stats().upstream_rq_active.set(10);
    let second = c.pick_with(&ctx).expect("host");
    assert_ne!(first.address, second.address);
    first.stats.rq_active.set(0);
    c.stats().upstream_rq_active.set(0);
    assert_eq!(c.pick_with(&ctx).expect("host").address, first.address);
    // Envoy's threshold: 3 active in the cluster gives ceil(4 × 1.5) = 6 slots, a quarter of
    // which rounds up to 2 per host; a host with 2 active is at (not over) its share.
    c.stats().upstream_rq_active.set(3);
    first.stats.rq_active.set(2);
    assert_eq!(c.pick_with(&ctx).expect("host").address, first.address);
    first.stats.rq_active.set(3);
    let moved = c.pick_with(&ctx).expect("host");
    assert_ne!(moved.address, first.address);
    // The probe order is fixed by the hash: the same key moves to the same host.
    for _ in 0..5 {
        assert_eq!(c.pick_with(&ctx).expect("host").address, moved.address);
    }
}

#[test]
fn least_request_prefers_idle() {
    let c = cluster(
        LbPolicy::LeastRequest { choice_count: 2 },
        Default::default(),
        &[("a", 0, None, &hosts(3))],
    );
    c.hosts()[0].stats.rq_active.set(10);
    let m = counts(&c, 3000);
    // Host 1 wins only when both draws land on it (1/9).
    assert!(near(m[&1], 3000, 1.0 / 9.0), "{m:?}");
}

/// Envoy's weighted least request: EDF where a host's weight is weight / (active + 1)^bias,
/// taken again each time the host is re-queued after a pick.
#[test]
fn weighted_least_request_is_edf_over_active_requests() {
    let run = |bias: f64, active: i64| {
        let lb = model::LbConfig {
            active_request_bias: bias,
            ..Default::default()
        };
        let c = cluster(
            LbPolicy::LeastRequest { choice_count: 2 },
            lb,
            &[("a", 0, None, &[(1, 1, Healthy), (2, 3, Healthy)])],
        );
        // Idle: exactly 1:3 over whole EDF periods (from a random starting point).
        let m = counts(&c, 400);
        assert!(
            m[&1].abs_diff(100) <= 1 && m[&2].abs_diff(300) <= 1,
            "idle, bias {bias}: {m:?}"
        );
        let busy = c.hosts().into_iter().find(|h| h.address.port() == 2);
        busy.expect("host 2").stats.rq_active.set(active);
        counts(&c, 400)
    };
    // Bias 1: 3 / (2 + 1) = 1, level with host 1 once host 2 has been re-queued.
    let m = run(1.0, 2);
    assert!(m[&1].abs_diff(200) <= 2, "{m:?}");
    // Bias 2: 3 / 3^2 = 1/3: host 1 now gets three picks for one.
    let m = run(2.0, 2);
    assert!(m[&1].abs_diff(300) <= 2, "{m:?}");
    // Bias 0: active requests do not count (weighted round robin).
    let m = run(0.0, 2);
    assert!(m[&1].abs_diff(100) <= 1, "{m:?}");
    // Bias 0.5 with 3 active: 3 / 4^0.5 = 1.5 against 1, a 2:3 split.
    let m = run(0.5, 3);
    assert!(m[&1].abs_diff(160) <= 2, "{m:?}");
}

#[test]
fn least_request_weight_formula() {
    let c = cluster(
        LbPolicy::LeastRequest { choice_count: 2 },
        Default::default(),
        &[("a", 0, None, &[(1, 4, Healthy)])],
    );
    let h = &c.hosts()[0];
    h.stats.rq_active.set(3);
    use super::least::host_weight;
    assert_eq!(host_weight(h, 1.0), 1.0);
    assert_eq!(host_weight(h, 0.0), 4.0);
    assert_eq!(host_weight(h, 0.5), 2.0);
    assert_eq!(host_weight(h, 2.0), 0.25);
}

#[test]
fn previous_priorities_skip_attempted_levels() {
    let c = cluster(
        LbPolicy::RoundRobin,
        Default::default(),
        &[
            ("a", 0, None, &[(1, 1, Healthy)]),
            ("a", 1, None, &[(2, 1, Healthy)]),
            ("a", 2, None, &[(3, 1, Healthy)]),
        ],
    );
    for _ in 0..50 {
        assert_eq!(c.pick_excluding(0b01).expect("host").address.port(), 2);
        assert_eq!(c.pick_excluding(0b11).expect("host").address.port(), 3);
        // Everything tried: back to the normal load.
        assert_eq!(c.pick_excluding(0b111).expect("host").address.port(), 1);
    }
}
