//! A self-contained tour of Strait. Part 1: three demo upstreams, Strait in-process with an
//! embedded Envoy bootstrap (80/20 weighted split, a retried flaky route, a direct response),
//! ~200 requests, a table of where they went, a few admin stats, then a graceful drain.
//! Part 2, multi-region failover: three regions × two zones of upstreams in-process, Strait as
//! the sidecar of a service in region A zone 1 (zone-aware routing, priorities by region, active
//! health checks, retries with previous_priorities); it drives traffic, kills a zone, then the
//! region, restores them, and prints after each step where the traffic went and what failed.
//!
//! Run with `cargo run --release --example demo`. It finishes on its own in a few seconds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_proxy::server::{Options, Server};
use strait_xds::bootstrap::{self, Overrides, Source};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Starts a demo upstream named `instance`. Every second request to `/flaky` fails with 503
/// (so the retry policy has something to do); everything else answers `instance`.
async fn upstream(instance: &'static str) -> Result<SocketAddr, Error> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let flaky = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let flaky = flaky.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let flaky = flaky.clone();
                    async move {
                        let fail = req.uri().path() == "/flaky"
                            && flaky.fetch_add(1, Ordering::Relaxed).is_multiple_of(2);
                        let status = if fail { 503 } else { 200 };
                        Response::builder()
                            .status(status)
                            .header("x-instance", instance)
                            .body(Full::new(Bytes::from(instance)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn bootstrap_yaml(blue: [SocketAddr; 2], green: SocketAddr) -> String {
    let endpoint = |a: SocketAddr| {
        format!(
            "{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}",
            a.ip(),
            a.port()
        )
    };
    format!(
        r#"
node: {{id: demo, cluster: demo}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: demo
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: demo
          route_config:
            name: demo
            virtual_hosts:
            - name: demo
              domains: ["*"]
              routes:
              - match: {{path: /health}}
                direct_response: {{status: 200, body: {{inline_string: "ok"}}}}
              - match: {{path: /flaky}}
                route:
                  cluster: green
                  retry_policy: {{retry_on: 5xx, num_retries: 2}}
              - match: {{prefix: /shop}}
                route:
                  weighted_clusters:
                    clusters:
                    - {{name: blue, weight: 80}}
                    - {{name: green, weight: 20}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: blue
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: blue
      endpoints: [{{lb_endpoints: [{}, {}]}}]
  - name: green
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: green
      endpoints: [{{lb_endpoints: [{}]}}]
"#,
        endpoint(blue[0]),
        endpoint(blue[1]),
        endpoint(green)
    )
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let blue = [upstream("blue-1").await?, upstream("blue-2").await?];
    let green = upstream("green-1").await?;

    let config = bootstrap::load(
        &Source::Yaml(bootstrap_yaml(blue, green)),
        &Overrides::default(),
    )
    .map_err(|e| format!("invalid demo bootstrap:\n{e}"))?;
    let server = Server::start(
        config,
        Options {
            concurrency: 2,
            drain_time: Duration::from_secs(2),
            command_line_options: serde_json::json!({"demo": true}),
        },
    )
    .await?;
    let listener = server
        .listener_addresses()
        .into_iter()
        .find(|(name, _)| name == "demo")
        .map(|(_, addr)| addr)
        .ok_or("the demo listener is not running")?;
    let admin = server.admin_address().ok_or("no admin address")?;
    println!("Strait is listening on http://{listener}  (admin: http://{admin}/)\n");

    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let plan = [("/shop", 150), ("/flaky", 40), ("/health", 10)];
    // path -> (who answered or "local reply") -> count; status -> count
    let mut answered: BTreeMap<&str, BTreeMap<String, u32>> = BTreeMap::new();
    let mut statuses: BTreeMap<u16, u32> = BTreeMap::new();
    for (path, n) in plan {
        for _ in 0..n {
            let uri = format!("http://{listener}{path}").parse::<hyper::Uri>()?;
            let resp = tokio::time::timeout(Duration::from_secs(5), client.get(uri)).await??;
            let status = resp.status().as_u16();
            let who = resp
                .headers()
                .get("x-instance")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("(direct response)")
                .to_string();
            resp.into_body().collect().await?;
            *statuses.entry(status).or_default() += 1;
            *answered.entry(path).or_default().entry(who).or_default() += 1;
        }
    }

    println!("{:<10} {:<20} {:>8}", "path", "answered by", "requests");
    println!("{}", "-".repeat(40));
    for (path, who) in &answered {
        for (instance, n) in who {
            println!("{path:<10} {instance:<20} {n:>8}");
        }
    }
    println!("\nstatus codes seen by the client:");
    for (status, n) in &statuses {
        println!("  {status}: {n}");
    }

    let stats = fetch(&client, &format!("http://{admin}/stats")).await?;
    println!("\na few lines of http://{admin}/stats:");
    for line in stats.lines().filter(|l| {
        [
            "cluster.blue.upstream_rq_total:",
            "cluster.green.upstream_rq_total:",
            "cluster.green.upstream_rq_retry:",
            "http.demo.downstream_rq_total:",
            "http.demo.downstream_rq_2xx:",
        ]
        .iter()
        .any(|p| l.starts_with(p))
    }) {
        println!("  {line}");
    }

    println!("\ndraining and shutting down...");
    server.shutdown();
    tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .map_err(|_| "the drain did not finish")?;
    println!("done.");

    multi_region::run().await
}

async fn fetch<C>(client: &Client<C, Empty<Bytes>>, url: &str) -> Result<String, Error>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let resp = tokio::time::timeout(Duration::from_secs(5), client.get(url.parse()?)).await??;
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Part 2: region affinity and health-based failover.
mod multi_region {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use strait_proxy::server::{Options, Server};
    use strait_xds::bootstrap::{self, Overrides, Source};
    use tokio::sync::watch;

    use super::Error;

    /// Region, zone and how many instances; region A zone 2 is the larger zone.
    const ZONES: [(&str, &str, usize); 6] = [
        ("A", "z1", 1),
        ("A", "z2", 3),
        ("B", "z1", 1),
        ("B", "z2", 1),
        ("C", "z1", 1),
        ("C", "z2", 1),
    ];

    /// An upstream that can be taken down (connections closed) and brought back.
    struct Instance {
        addr: SocketAddr,
        up: watch::Sender<bool>,
    }

    async fn instance(name: String) -> Result<Instance, Error> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        let (up, rx) = watch::channel(true);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                if !*rx.borrow() {
                    continue;
                }
                let mut down = rx.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let name = name.clone();
                        async move {
                            hyper::Response::builder()
                                .header("x-zone", name.as_str())
                                .body(Full::new(Bytes::from(name)))
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Ok(Instance { addr, up })
    }

    fn yaml(zones: &[Vec<Instance>], retries: bool) -> String {
        let ep = |a: SocketAddr| {
            format!(
                "{{endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}}}",
                a.ip(),
                a.port()
            )
        };
        let mut svc = String::new();
        for ((region, zone, _), insts) in ZONES.iter().zip(zones) {
            let prio = match *region {
                "A" => 0,
                "B" => 1,
                _ => 2,
            };
            let eps: Vec<String> = insts.iter().map(|i| ep(i.addr)).collect();
            svc.push_str(&format!(
                "      - {{locality: {{region: {region}, zone: {zone}}}, priority: {prio}, lb_endpoints: [{}]}}\n",
                eps.join(", ")
            ));
        }
        format!(
            r#"
node: {{id: sidecar, cluster: shop, locality: {{region: A, zone: z1}}}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
cluster_manager: {{local_cluster_name: shop}}
static_resources:
  listeners:
  - name: egress
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: egress
          route_config:
            virtual_hosts:
            - name: backend
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route:
                  cluster: backend
{retry}          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: backend
    type: STATIC
    connect_timeout: 0.5s
    common_lb_config: {{zone_aware_lb_config: {{min_cluster_size: 2}}}}
    health_checks:
    - {{timeout: 0.5s, interval: 0.05s, no_traffic_interval: 0.05s, unhealthy_threshold: 1,
        healthy_threshold: 2, http_health_check: {{path: /healthz}}}}
    load_assignment:
      cluster_name: backend
      endpoints:
{svc}  # This service's own instances, spread like the backend's region A, for zone-aware routing.
  - name: shop
    type: STATIC
    connect_timeout: 0.5s
    load_assignment:
      cluster_name: shop
      endpoints:
      - {{locality: {{region: A, zone: z1}}, lb_endpoints: [{}]}}
      - {{locality: {{region: A, zone: z2}}, lb_endpoints: [{}, {}, {}]}}
"#,
            ep(SocketAddr::from(([127, 0, 0, 1], 1))),
            ep(SocketAddr::from(([127, 0, 0, 1], 2))),
            ep(SocketAddr::from(([127, 0, 0, 1], 3))),
            ep(SocketAddr::from(([127, 0, 0, 1], 4))),
            retry = if retries { RETRY } else { "" },
        )
    }

    const RETRY: &str = r#"                  retry_policy:
                    retry_on: 5xx,reset,connect-failure
                    num_retries: 3
                    retry_back_off: {base_interval: 0.005s}
                    retry_priority:
                      name: envoy.retry_priorities.previous_priorities
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig
                        update_frequency: 1
"#;

    type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

    /// Sends `n` requests; returns zone → answers, and failure times.
    async fn drive(
        client: &Http,
        url: &str,
        n: usize,
        seen: &mut BTreeMap<String, u32>,
        failures: &mut Vec<Instant>,
    ) -> Result<(), Error> {
        for _ in 0..n {
            let r = tokio::time::timeout(Duration::from_secs(5), client.get(url.parse()?)).await?;
            match r {
                Ok(resp) if resp.status() == 200 => {
                    let zone = resp
                        .headers()
                        .get("x-zone")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("?")
                        .to_string();
                    resp.into_body().collect().await?;
                    *seen.entry(zone).or_default() += 1;
                }
                _ => failures.push(Instant::now()),
            }
        }
        Ok(())
    }

    /// Polls `/clusters` until the backend hosts show `want` (bounded).
    async fn settle(
        client: &Http,
        admin: SocketAddr,
        zones: &[Vec<Instance>],
        up: &[bool; 6],
    ) -> Result<(), Error> {
        for _ in 0..400 {
            let r = client
                .get(format!("http://{admin}/clusters").parse()?)
                .await?;
            let text =
                String::from_utf8_lossy(&r.into_body().collect().await?.to_bytes()).into_owned();
            let ok = zones.iter().zip(up).all(|(insts, &u)| {
                insts.iter().all(|i| {
                    let key = format!("backend::{}::health_flags::", i.addr);
                    text.lines()
                        .find_map(|l| l.strip_prefix(&key))
                        .is_some_and(|f| (f == "healthy") == u)
                })
            });
            if ok {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err("the backend's health never settled".into())
    }

    pub async fn run() -> Result<(), Error> {
        println!("\n=== Part 2: multi-region failover ===");
        scenario(true).await?;
        scenario(false).await
    }

    async fn scenario(retries: bool) -> Result<(), Error> {
        if retries {
            println!("\n--- active health checks + retries (previous_priorities) ---");
        } else {
            println!("\n--- active health checks only, no retries ---");
        }
        let mut zones = Vec::new();
        for (region, zone, n) in ZONES {
            let mut insts = Vec::new();
            for _ in 0..n {
                insts.push(instance(format!("{region}/{zone}")).await?);
            }
            zones.push(insts);
        }
        let config = bootstrap::load(&Source::Yaml(yaml(&zones, retries)), &Overrides::default())
            .map_err(|e| format!("invalid multi-region bootstrap:\n{e}"))?;
        let server = Server::start(
            config,
            Options {
                concurrency: 2,
                drain_time: Duration::from_secs(1),
                command_line_options: serde_json::json!({"demo": "multi-region"}),
            },
        )
        .await?;
        let listener = server
            .listener_addresses()
            .into_iter()
            .map(|(_, a)| a)
            .next()
            .ok_or("no listener")?;
        let admin = server.admin_address().ok_or("no admin address")?;
        if retries {
            println!(
                "Strait runs as the sidecar of `shop` in region A zone z1 (http://{listener})."
            );
            println!("backend: region A = priority 0 (z1: 1 instance, z2: 3), B = 1, C = 2.");
            println!("`failover`: first to last failed request of the step.\n");
        }
        let client: Http = Client::builder(TokioExecutor::new()).build_http();
        let url = format!("http://{listener}/");
        let names = ["A/z1", "A/z2", "B/z1", "B/z2", "C/z1", "C/z2"];
        println!(
            "{:<18} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>7} {:>9}",
            "step",
            names[0],
            names[1],
            names[2],
            names[3],
            names[4],
            names[5],
            "failed",
            "failover"
        );
        println!("{}", "-".repeat(76));
        let steps: [(&str, [bool; 6]); 4] = [
            ("all zones up", [true; 6]),
            ("kill zone A/z1", [false, true, true, true, true, true]),
            ("kill region A", [false, false, true, true, true, true]),
            ("restore region A", [true; 6]),
        ];
        for (label, up) in steps {
            for (insts, &u) in zones.iter().zip(&up) {
                for i in insts {
                    i.up.send_replace(u);
                }
            }
            let mut seen = BTreeMap::new();
            let mut failures = Vec::new();
            // Traffic keeps flowing while health checks notice, then a steady window.
            let wait = settle(&client, admin, &zones, &up);
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    r = &mut wait => { r?; break; }
                    r = drive(&client, &url, 1, &mut seen, &mut failures) => r?,
                }
            }
            drive(&client, &url, 200, &mut seen, &mut failures).await?;
            let failover = match (failures.first(), failures.last()) {
                (Some(a), Some(b)) => format!("{}ms", b.duration_since(*a).as_millis()),
                _ => "-".to_string(),
            };
            let col = |n: &str| seen.get(n).copied().unwrap_or(0);
            println!(
                "{:<18} {:>5} {:>5} {:>5} {:>5} {:>5} {:>5} {:>7} {:>9}",
                label,
                col(names[0]),
                col(names[1]),
                col(names[2]),
                col(names[3]),
                col(names[4]),
                col(names[5]),
                failures.len(),
                failover
            );
        }
        server.shutdown();
        tokio::time::timeout(Duration::from_secs(10), server.wait())
            .await
            .map_err(|_| "the drain did not finish")?;
        println!("done.");
        Ok(())
    }
}
