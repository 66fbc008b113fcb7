//! A listener removed by LDS while the server keeps running drains its connections gradually:
//! each keep-alive connection is closed at its own point of the drain window instead of all at
//! once (the reconnect storm of envoyproxy/envoy#35085), and all of them are gone by its end.
//! An update at the same address keeps the socket: a route change reaches open connections on
//! their next request, a change to what a connection fixes at its start (here the header limit)
//! drains the open connections the same gradual way while new ones are served at once.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::Strait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT: Duration = Duration::from_secs(20);
/// The harness starts Strait with `--drain-time-s 5`.
const DRAIN_TIME: Duration = Duration::from_secs(5);
const CONNECTIONS: usize = 20;

fn lds_file(version: &str, with_listener: bool) -> String {
    lds_listener(version, with_listener, "ok", 60)
}

fn lds_listener(version: &str, with_listener: bool, body: &str, max_kb: u32) -> String {
    let mut s = format!("version_info: '{version}'\nresources:\n");
    if with_listener {
        s.push_str(&format!(
            "- '@type': type.googleapis.com/envoy.config.listener.v3.Listener
  name: ingress
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: ingress
        max_request_headers_kb: {max_kb}
        route_config:
          virtual_hosts:
          - name: all
            domains: ['*']
            routes: [{{match: {{prefix: /}}, direct_response: {{status: 200, body: {{inline_string: {body}}}}}}}]
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"
        ));
    } else {
        s = format!("version_info: '{version}'\nresources: []\n");
    }
    s
}

fn replace(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

async fn ingress(s: &Strait) -> SocketAddr {
    let deadline = Instant::now() + LIMIT;
    loop {
        let v = s.admin_get("/listeners?format=json").await.json();
        let found = v["listener_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["name"] == "ingress")
            .and_then(|l| {
                let sa = &l["local_address"]["socket_address"];
                format!("{}:{}", sa["address"].as_str()?, sa["port_value"])
                    .parse()
                    .ok()
            });
        if let Some(a) = found {
            return a;
        }
        assert!(Instant::now() < deadline, "no ingress listener: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens a keep-alive HTTP/1.1 connection and completes one request on it.
async fn keep_alive_connection(addr: SocketAddr) -> TcpStream {
    let mut c = TcpStream::connect(addr).await.unwrap();
    request(&mut c, "ok").await;
    c
}

/// One request on an open connection; the direct response's body must be `body`.
async fn request(c: &mut TcpStream, body: &str) {
    c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(body.as_bytes())) {
        let n = tokio::time::timeout(LIMIT, c.read(&mut buf))
            .await
            .expect("response in time")
            .unwrap();
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_listener_closes_its_connections_spread_over_the_drain_window() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    replace(d, "lds.yaml", &lds_file("1", true));
    let yaml = format!(
        "admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
dynamic_resources:
  lds_config: {{path_config_source: {{path: '{d}/lds.yaml', watched_directory: {{path: '{d}'}}}}}}
",
        d = d.display()
    );
    let s = Strait::start(&yaml).await;
    let addr = ingress(&s).await;

    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(keep_alive_connection(addr).await);
    }

    // Remove the listener; each connection reports when the proxy closed it.
    replace(d, "lds.yaml", &lds_file("2", false));
    assert_closed_gradually(conns).await;
    assert!(
        s.stat("http.ingress.downstream_cx_drain_close")
            .await
            .unwrap_or(0)
            >= 1,
        "drain closes are counted"
    );
}

/// Waits for the proxy to close every connection (the change that drains them was just made)
/// and checks the closes were spread over the drain window and all came by its end.
async fn assert_closed_gradually(conns: Vec<TcpStream>) {
    let removed = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for mut c in conns {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let _ = tx.send(Instant::now());
        });
    }
    drop(tx);
    let mut closed = Vec::new();
    while let Some(t) = tokio::time::timeout(LIMIT, rx.recv())
        .await
        .expect("every connection closes by the end of the drain window")
    {
        closed.push(t.duration_since(removed));
    }
    assert_eq!(closed.len(), CONNECTIONS);
    closed.sort();

    // Spread: with closes uniform over 5 s, about a fifth land in the first second; closing all
    // at once would put all twenty there. Every close comes by the end of the window (plus the
    // file poll interval and scheduling slack).
    let early = closed
        .iter()
        .filter(|d| **d < Duration::from_secs(1))
        .count();
    assert!(
        early < CONNECTIONS * 3 / 4,
        "{early} of {CONNECTIONS} connections closed in the first second: {closed:?}"
    );
    let last = closed[CONNECTIONS - 1];
    assert!(
        last <= DRAIN_TIME + Duration::from_secs(3),
        "the last connection closed after {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_address_update_keeps_the_socket_and_drains_only_for_connection_settings() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    replace(d, "lds.yaml", &lds_listener("1", true, "ok", 60));
    let yaml = format!(
        "admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
dynamic_resources:
  lds_config: {{path_config_source: {{path: '{d}/lds.yaml', watched_directory: {{path: '{d}'}}}}}}
",
        d = d.display()
    );
    let s = Strait::start(&yaml).await;
    let addr = ingress(&s).await;
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(keep_alive_connection(addr).await);
    }

    // A route change: the open connections answer with the new route on their next request.
    replace(d, "lds.yaml", &lds_listener("2", true, "v2", 60));
    let deadline = Instant::now() + LIMIT;
    loop {
        let mut probe = TcpStream::connect(addr).await.unwrap();
        probe
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(LIMIT, probe.read_to_end(&mut got)).await;
        if got.ends_with(b"v2") {
            break;
        }
        assert!(Instant::now() < deadline, "the route change never applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for c in &mut conns {
        request(c, "v2").await;
    }
    assert_eq!(ingress(&s).await, addr, "same socket");

    // The header limit is fixed per connection: the open ones drain gradually, new ones are
    // served on the same socket at once.
    replace(d, "lds.yaml", &lds_listener("3", true, "v3", 30));
    let deadline = Instant::now() + LIMIT;
    loop {
        let mut probe = TcpStream::connect(addr).await.unwrap();
        probe
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(LIMIT, probe.read_to_end(&mut got)).await;
        if got.ends_with(b"v3") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new listener generation never served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_closed_gradually(conns).await;
    assert_eq!(ingress(&s).await, addr, "same socket");
}
