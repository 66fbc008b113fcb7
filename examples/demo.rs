//! A self-contained tour of Strait: three demo upstreams, Strait in-process with an embedded
//! Envoy bootstrap (80/20 weighted split, a retried flaky route, a direct response), ~200
//! requests, a table of where they went, a few admin stats, then a graceful drain.
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
    Ok(())
}

async fn fetch<C>(client: &Client<C, Empty<Bytes>>, url: &str) -> Result<String, Error>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let resp = tokio::time::timeout(Duration::from_secs(5), client.get(url.parse()?)).await??;
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}
