//! `--worker-model per-core` (the default; Strait-only flag): per-core runtimes with
//! `SO_REUSEPORT` listeners serve HTTP/1.1 and h2c, the kernel spreads connections over both workers (per-worker stats
//! `listener.<address>.worker_<N>.*`), and SIGTERM still drains in-flight requests and exits 0.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Config, Conn, Reply, Upstream};
use http::Method;
use serde_json::json;

/// The harness passes `--concurrency 2`.
const WORKERS: usize = 2;
const CONNECTIONS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_spreads_connections_and_drains_on_sigterm() {
    let up = Upstream::start("up").await;
    let slow = Upstream::start_with(
        "slow",
        Reply::Delay(Duration::from_secs(1), Box::new(Reply::Echo)),
    )
    .await;
    let mut strait = common::Strait::start_with(
        &Config::new()
            .routes(json!([
                {"match": {"prefix": "/slow"}, "route": {"cluster": "slow"}},
                {"match": {"prefix": "/"}, "route": {"cluster": "up"}}
            ]))
            .cluster("up", &[up.addr])
            .cluster("slow", &[slow.addr])
            .yaml(),
        &["--worker-model", "per-core"],
    )
    .await;
    let addr = strait.listener("ingress");

    // Each HTTP/1.1 connection comes from its own source port: SO_REUSEPORT hashes the 4-tuple,
    // so all 40 landing on one of two workers would happen with probability 2^-39.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONNECTIONS {
        let url = strait.url(&format!("/c{i}"));
        tasks.spawn(async move {
            let mut conn = Conn::open(addr).await;
            let mut statuses = Vec::new();
            for _ in 0..3 {
                let r = conn
                    .send(common::req(Method::GET, &url, &[], common::empty()))
                    .await;
                statuses.push(r.map(|r| (r.status.as_u16(), r.upstream().map(str::to_string))));
            }
            statuses
        });
    }
    let mut ok = 0;
    while let Some(done) = common::within("requests", tasks.join_next()).await {
        for r in done.unwrap_or_else(|e| panic!("client task: {e}")) {
            match r {
                Ok((200, Some(u))) if u == "up" => ok += 1,
                other => panic!("request failed: {other:?}"),
            }
        }
    }
    assert_eq!(ok, CONNECTIONS * 3);
    assert_eq!(up.requests(), CONNECTIONS * 3);

    // h2c on the same workers.
    let h2 = Client::h2c();
    for i in 0..10 {
        let r = h2.get(&strait.url(&format!("/h2/{i}"))).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.version, http::Version::HTTP_2);
    }

    let stats = strait.stats().await;
    let prefix = format!("listener.{}_{}", addr.ip(), addr.port());
    let per_worker: Vec<i64> = (0..WORKERS)
        .map(|w| {
            let name = format!("{prefix}.worker_{w}.downstream_cx_total");
            stats.get(&name).copied().unwrap_or_else(|| {
                panic!("no {name} in /stats: {stats:?}");
            })
        })
        .collect();
    let total = stats
        .get(&format!("{prefix}.downstream_cx_total"))
        .copied()
        .unwrap_or(0);
    assert_eq!(
        per_worker.iter().sum::<i64>(),
        total,
        "every connection is counted by the worker that accepted it: {per_worker:?}"
    );
    assert!(total >= (CONNECTIONS + 1) as i64, "total {total}");
    assert!(
        per_worker.iter().all(|&n| n > 0),
        "both workers accept connections: {per_worker:?}"
    );

    // Drain: the in-flight request completes, new connections are refused, exit 0.
    let client = Client::http1();
    let url = strait.url("/slow");
    let in_flight = tokio::spawn(async move { client.get(&url).await });
    slow.wait_requests(1).await;
    strait.sigterm();
    let deadline = Instant::now() + Duration::from_secs(3);
    // Every worker's socket closes: fresh connections (spread over both) are all refused.
    loop {
        let mut refused = 0;
        for _ in 0..8 {
            if common::connect(addr).await.is_err() {
                refused += 1;
            }
        }
        if refused == 8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "listening sockets still open after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = common::within("in-flight request", in_flight)
        .await
        .unwrap_or_else(|e| panic!("in-flight task: {e}"));
    assert_eq!(
        r.status, 200,
        "the in-flight request completes during the drain"
    );
    assert_eq!(r.upstream(), Some("slow"));
    let status = strait.wait_exit().await;
    assert!(
        status.success(),
        "exit status {status}\n{}",
        strait.stderr()
    );
}

/// Per-core workers are the default (Envoy's model: per-worker stats); `--worker-model
/// work-stealing` shares one runtime and has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_is_the_default_and_work_stealing_has_no_per_worker_stats() {
    let up = Upstream::start("up").await;
    let cfg = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
        .cluster("up", &[up.addr]);
    let per_worker = |stats: &std::collections::HashMap<String, i64>| {
        stats
            .iter()
            .filter(|(k, _)| k.contains(".worker_") && k.ends_with(".downstream_cx_total"))
            .map(|(_, v)| *v)
            .sum::<i64>()
    };
    let default = cfg.start().await;
    let r = Client::http1().get(&default.url("/")).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        per_worker(&default.stats().await),
        1,
        "one connection, counted per worker"
    );
    let ws = common::Strait::start_with(&cfg.yaml(), &["--worker-model", "work-stealing"]).await;
    let r = Client::http1().get(&ws.url("/")).await;
    assert_eq!(r.status, 200);
    let stats = ws.stats().await;
    assert!(
        !stats.keys().any(|k| k.contains(".worker_")),
        "per-worker stats only with per-core workers"
    );
}

fn lds(version: &str, listener: bool) -> String {
    let mut s = format!("version_info: '{version}'\nresources:\n");
    if listener {
        s.push_str(
            "- '@type': type.googleapis.com/envoy.config.listener.v3.Listener
  name: ingress
  address: {socket_address: {address: 127.0.0.1, port_value: 0}}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: ingress
        route_config:
          virtual_hosts:
          - {name: all, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: slow}}]}
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
",
        );
    } else {
        s = format!("version_info: '{version}'\nresources: []\n");
    }
    s
}

/// Replaces `name` in `dir` atomically (write, then rename), as Envoy's documentation asks.
fn replace(dir: &std::path::Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, dir.join(name)))
    {
        panic!("write {name}: {e}");
    }
}

/// A listener removed by LDS closes every worker's socket and drains its connections: the
/// request in flight still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_listener_removed_by_lds_drains() {
    let slow = Upstream::start_with(
        "slow",
        Reply::Delay(Duration::from_secs(2), Box::new(Reply::Echo)),
    )
    .await;
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let d = dir.path();
    replace(d, "lds.yaml", &lds("1", true));
    let yaml = format!(
        "admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  clusters:
  - name: slow
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: slow
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: '{}', port_value: {}}}}}}}}}]}}]
dynamic_resources:
  lds_config: {{path_config_source: {{path: '{d}/lds.yaml', watched_directory: {{path: '{d}'}}}}}}
",
        slow.addr.ip(),
        slow.addr.port(),
        d = d.display()
    );
    let mut strait = common::Strait::start_with(&yaml, &["--worker-model", "per-core"]).await;
    let addr = strait.listener("ingress");
    let url = format!("http://{addr}/x");
    let client = Client::http1();
    let in_flight = tokio::spawn(async move { client.get(&url).await });
    slow.wait_requests(1).await;

    replace(d, "lds.yaml", &lds("2", false));
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        let mut refused = 0;
        for _ in 0..8 {
            if common::connect(addr).await.is_err() {
                refused += 1;
            }
        }
        if refused == 8 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "removed listener still accepts on some worker"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !in_flight.is_finished(),
        "the slow request should still be in flight"
    );
    let r = common::within("in-flight request", in_flight)
        .await
        .unwrap_or_else(|e| panic!("in-flight task: {e}"));
    assert_eq!(
        r.status, 200,
        "the in-flight request completes during the drain"
    );
    strait.sigterm();
    let status = strait.wait_exit().await;
    assert!(
        status.success(),
        "exit status {status}\n{}",
        strait.stderr()
    );
}
