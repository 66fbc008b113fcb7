//! Load-balancer micro-benchmarks: nanoseconds per host pick for each policy over 10,000 hosts
//! in 50 localities and 3 priorities (P0 partly unhealthy, so picks spill over), and the cost of
//! rebuilding the LB state after a health change.
//! `cargo bench -p strait-proxy --bench lb`; results are in BENCHMARKS.md.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use strait_proxy::cluster::ClusterState;
use strait_proxy::lb::LbContext;
use strait_proxy::stats::Store;
use strait_xds::model::{self, EndpointAddress, HealthStatus, LbPolicy, Locality};

const HOSTS: usize = 10_000;
const LOCALITIES: usize = 50;
const PRIORITIES: usize = 3;

/// 50 localities spread over 3 priorities, 200 hosts each; in P0 one host in three is unhealthy
/// (so P0 carries 93 % and spills the rest); `weighted` gives hosts weights 1..=5.
fn cluster(policy: LbPolicy, lb: model::LbConfig, weighted: bool) -> Arc<ClusterState> {
    let per = HOSTS / LOCALITIES;
    let endpoints = (0..LOCALITIES)
        .map(|l| {
            let priority = (l * PRIORITIES / LOCALITIES) as u32;
            model::LocalityLbEndpoints {
                locality: Locality {
                    region: format!("r{priority}"),
                    zone: format!("z{l}"),
                    sub_zone: String::new(),
                },
                priority,
                load_balancing_weight: Some(1 + (l % 3) as u32),
                lb_endpoints: (0..per)
                    .map(|i| {
                        let n = l * per + i;
                        let ip = [10, (n >> 16) as u8, (n >> 8) as u8, n as u8];
                        model::LbEndpoint {
                            address: EndpointAddress::Ip(SocketAddr::from((ip, 8080))),
                            load_balancing_weight: if weighted { 1 + (n % 5) as u32 } else { 1 },
                            health_status: if priority == 0 && n.is_multiple_of(3) {
                                HealthStatus::Unhealthy
                            } else {
                                HealthStatus::Healthy
                            },
                            hostname: None,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let cfg = model::Cluster {
        name: "bench".into(),
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
    };
    ClusterState::new(Arc::new(cfg), &Store::default())
}

fn cases() -> Vec<(&'static str, Arc<ClusterState>)> {
    let d = model::LbConfig::default;
    let lw = || model::LbConfig {
        locality_weighted: true,
        ..Default::default()
    };
    let ring = LbPolicy::RingHash {
        min_ring_size: 1024,
        max_ring_size: 8 * 1024 * 1024,
    };
    vec![
        ("round_robin", cluster(LbPolicy::RoundRobin, d(), false)),
        (
            "round_robin_weighted",
            cluster(LbPolicy::RoundRobin, d(), true),
        ),
        (
            "round_robin_locality_weighted",
            cluster(LbPolicy::RoundRobin, lw(), false),
        ),
        (
            "least_request",
            cluster(LbPolicy::LeastRequest { choice_count: 2 }, d(), false),
        ),
        (
            "least_request_weighted",
            cluster(LbPolicy::LeastRequest { choice_count: 2 }, d(), true),
        ),
        ("random", cluster(LbPolicy::Random, d(), false)),
        ("ring_hash", cluster(ring, d(), false)),
        (
            "maglev",
            cluster(LbPolicy::Maglev { table_size: 65537 }, d(), false),
        ),
    ]
}

fn picks(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for (name, cl) in cases() {
        let mut k = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                k = k.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let ctx = LbContext {
                    hash: Some(k),
                    ..Default::default()
                };
                black_box(cl.pick_with(black_box(&ctx)))
            })
        });
    }
    g.finish();
}

fn rebuilds(c: &mut Criterion) {
    let mut g = c.benchmark_group("rebuild");
    g.sample_size(10);
    for (name, cl) in cases() {
        // What a health-check or outlier transition triggers: every table rebuilt and published.
        g.bench_function(name, |b| b.iter(|| cl.health_changed()));
    }
    g.finish();
}

criterion_group!(benches, picks, rebuilds);
criterion_main!(benches);
