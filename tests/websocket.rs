//! WebSocket upgrades through the proxy: echoed messages when the connection manager enables
//! `websocket` in `upgrade_configs`, and Envoy's 403 when it does not.

mod common;

use common::Config;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::{self, Message};

/// A WebSocket echo server on 127.0.0.1:0.
async fn echo_server() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = common::bind().await;
    let addr = common::local_addr(&listener);
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            conns.spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, task)
}

fn config(addr: std::net::SocketAddr) -> Config {
    Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "ws"}}]))
        .cluster("ws", &[addr])
}

async fn connect(
    strait: &common::Strait,
) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, tungstenite::Error> {
    let stream = common::connect(strait.listener("ingress"))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let url = format!("ws://{}/chat", strait.listener("ingress"));
    common::within(
        "websocket handshake",
        tokio_tungstenite::client_async(url, stream),
    )
    .await
    .map(|(ws, _)| ws)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_proxy() {
    let (addr, server) = echo_server().await;
    let strait = config(addr)
        .hcm("upgrade_configs", json!([{"upgrade_type": "websocket"}]))
        .start()
        .await;
    let mut ws = connect(&strait)
        .await
        .unwrap_or_else(|e| panic!("handshake through proxy: {e}"));
    for i in 0..5 {
        let text = format!("hello {i}");
        common::within("send", ws.send(Message::text(text.clone())))
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        let back = common::within("echo", ws.next())
            .await
            .unwrap_or_else(|| panic!("closed before echo {i}"))
            .unwrap_or_else(|e| panic!("echo {i}: {e}"));
        assert_eq!(back, Message::text(text));
    }
    let big = vec![7u8; 256 * 1024];
    common::within("send binary", ws.send(Message::binary(big.clone())))
        .await
        .unwrap_or_else(|e| panic!("send: {e}"));
    let back = common::within("binary echo", ws.next()).await;
    assert!(
        matches!(&back, Some(Ok(Message::Binary(b))) if b.as_ref() == big.as_slice()),
        "binary echo mismatch"
    );
    common::within("close", ws.close(None))
        .await
        .unwrap_or_else(|e| panic!("close: {e}"));
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_without_upgrade_config_is_403() {
    let (addr, server) = echo_server().await;
    let strait = config(addr).start().await;
    match connect(&strait).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        Err(e) => panic!("expected HTTP 403, got {e}"),
        Ok(_) => panic!("upgrade should be refused without upgrade_configs"),
    }
    assert_eq!(
        strait
            .wait_stat("http.ingress.downstream_rq_ws_on_non_ws_route", 1)
            .await,
        Some(1)
    );
    server.abort();
}

/// An upgrade the upstream answers without switching (a 426 naming what it wants instead), as
/// Envoy answers it: the response's `Connection` and `Upgrade` are not passed on, it carries no
/// `x-envoy-upstream-service-time` (the request, whose upgraded bytes never came, has not
/// ended), and the connection closes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_answered_without_switching_closes_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = common::bind().await;
    let addr = common::local_addr(&listener);
    let upstream = tokio::spawn(async move {
        let Ok((mut c, _)) = listener.accept().await else {
            return;
        };
        let _ = common::read_request_head(&mut c).await;
        let _ = c
            .write_all(
                b"HTTP/1.1 426 Upgrade Required\r\nconnection: upgrade\r\nupgrade: h2c\r\n\
                  content-length: 4\r\n\r\nnope",
            )
            .await;
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest).await;
    });
    let strait = config(addr)
        .hcm("upgrade_configs", json!([{"upgrade_type": "websocket"}]))
        .start()
        .await;
    let mut c = common::connect(strait.listener("ingress"))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    c.write_all(
        b"GET /chat HTTP/1.1\r\nhost: ws.example\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
    )
    .await
    .unwrap_or_else(|e| panic!("write: {e}"));
    let mut answer = Vec::new();
    common::within("the answer and the close", c.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|e| panic!("read: {e}"));
    let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(head.starts_with("http/1.1 426"), "{text}");
    assert_eq!(body, "nope", "{text}");
    let lines: Vec<&str> = head.lines().collect();
    assert!(lines.contains(&"connection: close"), "{text}");
    for gone in ["upgrade:", "x-envoy-upstream-service-time:"] {
        assert!(!lines.iter().any(|l| l.starts_with(gone)), "{gone} {text}");
    }
    upstream.abort();
}

/// An HTTP/1.1 request asking to upgrade to h2c (what `curl --http2` sends for an `http://`
/// URL) is served as plain HTTP/1.1, as Envoy serves it: `Upgrade`, `HTTP2-Settings` and
/// their `Connection` tokens are dropped, the connection stays open for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_request_is_served_as_http1() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let up = common::Upstream::start("up").await;
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
        .cluster("up", &[up.addr])
        .start()
        .await;
    let mut c = common::connect(strait.listener("ingress"))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let request: &[u8] = b"GET /h2c HTTP/1.1\r\nhost: a.example\r\n\
        connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n\
        http2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n";
    for i in 0..2 {
        c.write_all(request)
            .await
            .unwrap_or_else(|e| panic!("write: {e}"));
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        // The echo's body is JSON ending in `}`; its length is in the head.
        loop {
            let n = common::within("the answer", c.read(&mut buf))
                .await
                .unwrap_or_else(|e| panic!("read: {e}"));
            assert!(
                n > 0,
                "request {i}: closed: {}",
                String::from_utf8_lossy(&answer)
            );
            answer.extend_from_slice(&buf[..n]);
            if answer.ends_with(b"}") {
                break;
            }
        }
        let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 200"), "request {i}: {text}");
        assert!(
            !text.contains("\r\nconnection: close"),
            "request {i}: {text}"
        );
        let seen = up.last_seen();
        for gone in ["upgrade", "http2-settings", "connection"] {
            assert!(
                seen.headers.get(gone).is_none(),
                "request {i}: {gone}: {:?}",
                seen.headers
            );
        }
        assert_eq!(seen.path, "/h2c");
    }
}
