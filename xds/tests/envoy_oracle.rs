//! Envoy as the oracle for the reference control plane: real Envoy, configured only over ADS
//! (SotW, then Delta) by `ControlPlane`, must ACK every type and route a request to an upstream.
//! Skipped (with a message) when no `envoy` binary is found: ENVOY_BIN, then PATH.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use strait_xds::ads::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, TYPE_ORDER};
use strait_xds::control_plane::ControlPlane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const UPSTREAM_BODY: &str = "hello from upstream";
/// Envoy start-up and config fan-out; generous because CI machines are small.
const ENVOY_WAIT: Duration = Duration::from_secs(60);

fn envoy_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("envoy"))
        .find(|p| p.is_file())
}

/// A tiny HTTP/1.1 upstream answering every request with `UPSTREAM_BODY`.
async fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(UPSTREAM_BODY.as_bytes()),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    addr
}

/// One HTTP/1.1 GET; `None` when the connection fails.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: oracle\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((status, body))
}

/// Polls `f` every 100 ms until it gives a value: Envoy is another process, so there is no
/// signal to wait on. Bounded by `ENVOY_WAIT`.
async fn poll<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    log: &std::path::Path,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + ENVOY_WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("timed out waiting for {what}; envoy log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn bootstrap(api_type: &str, xds: SocketAddr) -> String {
    format!(
        r#"
node: {{id: oracle, cluster: oracle}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}
"#,
        ip = xds.ip(),
        port = xds.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_accepts_everything_the_control_plane_serves() {
    let Some(envoy) = envoy_bin() else {
        println!("skipped: envoy not found");
        return;
    };
    let up = upstream().await;
    for api_type in ["GRPC", "DELTA_GRPC"] {
        // A free port for Envoy's listener: bind, note, release.
        let listen = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let cp = ControlPlane::new();
        cp.set_resources(LISTENER_TYPE, vec![listener("ingress", listen, "routes")])
            .unwrap();
        cp.set_resources(ROUTE_TYPE, vec![route_config("routes", "backend")])
            .unwrap();
        cp.set_resources(CLUSTER_TYPE, vec![eds_cluster("backend", 1)])
            .unwrap();
        cp.set_resources(ENDPOINT_TYPE, vec![endpoints("backend", &[up])])
            .unwrap();
        cp.push();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let xds = l.local_addr().unwrap();
        let _server = cp.spawn(l);

        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, bootstrap(api_type, xds)).unwrap();
        let admin_path = dir.path().join("admin");
        let log_path = dir.path().join("envoy.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let _envoy = tokio::process::Command::new(&envoy)
            .arg("-c")
            .arg(&config)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--disable-hot-restart", "-l", "info"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start envoy");

        let admin: SocketAddr = poll("the admin address", &log_path, || async {
            std::fs::read_to_string(&admin_path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        })
        .await;
        poll("/ready", &log_path, || async {
            get(admin, "/ready").await.filter(|(s, _)| *s == 200)
        })
        .await;
        let (status, body) = poll("a proxied response", &log_path, || async {
            get(listen, "/").await.filter(|(s, _)| *s == 200)
        })
        .await;
        assert_eq!((status, body.as_str()), (200, UPSTREAM_BODY), "{api_type}");

        let seen = cp.seen();
        for t in TYPE_ORDER {
            assert!(
                seen.iter().any(|r| r.type_url == t && r.is_ack()),
                "{api_type}: no ACK for {t}: {seen:#?}"
            );
        }
        assert!(
            seen.iter().all(|r| !r.is_nack()),
            "{api_type}: NACK: {seen:#?}"
        );
        assert!(seen.iter().all(|r| r.delta == (api_type == "DELTA_GRPC")));
    }
}
