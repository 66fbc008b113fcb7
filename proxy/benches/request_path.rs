//! Micro-benchmarks of per-request work that does not need sockets: route selection over 1,000
//! prefix or regex routes (first, last and no match) and header hygiene on a typical request.
//! `cargo bench -p strait-proxy --bench request_path`; see BENCHMARKS.md for the end-to-end harness.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Request};
use strait_proxy::{headers, router};
use strait_xds::model::RouteConfig;
use strait_xds::{load, Overrides, Source};

const ROUTES: usize = 1000;

/// A bootstrap whose only virtual host has `ROUTES` routes, each `prefix: /svcN/` or a
/// `safe_regex` on `^/svcN/[a-z]+$`, loaded through the same path as `strait -c`.
fn route_config(regex: bool) -> Option<Arc<RouteConfig>> {
    let mut routes = String::new();
    for i in 0..ROUTES {
        let matcher = if regex {
            format!("safe_regex: {{ regex: '^/svc{i}/[a-z]+$' }}")
        } else {
            format!("prefix: /svc{i}/")
        };
        routes.push_str(&format!(
            "              - match: {{ {matcher} }}\n                route: {{ cluster: c }}\n"
        ));
    }
    let yaml = format!(
        r#"static_resources:
  listeners:
  - name: l
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 1 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: b
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: v
              domains: ["*"]
              routes:
{routes}  clusters:
  - name: c
    type: STATIC
    load_assignment:
      cluster_name: c
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 2 }} }} }}
"#
    );
    match load(&Source::Yaml(yaml), &Overrides::default()) {
        Ok(b) => b.listeners.first().map(|l| l.hcm.route_config.clone()),
        Err(e) => {
            eprintln!("bench bootstrap rejected: {e:?}");
            None
        }
    }
}

fn request(path: &str) -> Parts {
    let (parts, ()) = Request::get(path)
        .header("host", "bench.local")
        .header("user-agent", "bench/1.0")
        .header("accept", "*/*")
        .body(())
        .map(Request::into_parts)
        .unwrap_or_else(|_| Request::new(()).into_parts());
    parts
}

fn bench_select(c: &mut Criterion) {
    for (name, regex) in [("prefix", false), ("regex", true)] {
        let Some(rc) = route_config(regex) else {
            continue;
        };
        let mut g = c.benchmark_group(format!("select_{name}_{ROUTES}"));
        for (case, path) in [
            ("first", "/svc0/items".to_string()),
            ("last", format!("/svc{}/items", ROUTES - 1)),
            ("none", "/nothing/here".to_string()),
        ] {
            let req = request(&path);
            g.bench_function(case, |b| {
                b.iter(|| {
                    matches!(
                        router::select(black_box(&rc), black_box(&req)),
                        router::Selected::Route { .. }
                    )
                })
            });
        }
        g.finish();
    }
}

/// Header hygiene as the data path does it on every HTTP/1.1 request: hop-by-hop removal,
/// `x-forwarded-*` and `x-request-id` generation.
fn bench_headers(c: &mut Criterion) {
    let mut base = HeaderMap::new();
    for (k, v) in [
        ("host", "bench.local"),
        ("user-agent", "curl/8.0"),
        ("accept", "*/*"),
        ("connection", "keep-alive"),
        ("content-type", "application/json"),
    ] {
        base.insert(k, HeaderValue::from_static(v));
    }
    let peer = SocketAddr::from(([10, 0, 0, 1], 40000));
    let mut g = c.benchmark_group("headers");
    g.bench_function("remove_hop_by_hop", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |h| headers::remove_hop_by_hop(h, false),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("forwarded_use_remote_address", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |h| headers::forwarded(h, peer, true, 0),
            criterion::BatchSize::SmallInput,
        )
    });
    g.bench_function("request_id_generate", |b| {
        b.iter_batched_ref(
            || base.clone(),
            |h| headers::request_id(h, true, false),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_select, bench_headers);
criterion_main!(benches);
