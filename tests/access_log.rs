//! Access logs as an operator reads them: Envoy's default text line on stdout, and a
//! `json_format` log written to a file with typed values.

mod common;

use common::{Client, Config, Upstream};
use http::Method;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_format_line() {
    let up = Upstream::start("up").await;
    let strait = Config::new()
        .routes(json!([
            {"match": {"prefix": "/old/"}, "route": {"cluster": "up", "prefix_rewrite": "/new/"}},
            {"match": {"prefix": "/"}, "route": {"cluster": "up"}}
        ]))
        .cluster("up", &[up.addr])
        .start()
        .await;
    let client = Client::http1();
    let r = client
        .send(common::req(
            Method::POST,
            &strait.url("/log/me?x=1"),
            &[
                ("user-agent", "test-agent/1.0"),
                ("x-request-id", "req-123"),
            ],
            common::full("hello"),
        ))
        .await;
    assert_eq!(r.status, 200);

    let line = strait.access_log("req-123", 1).await.remove(0);
    let re = regex::Regex::new(
        r#"^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] "POST /log/me\?x=1 HTTP/1\.1" 200 - 5 (\d+) (\d+) (\d+) "-" "test-agent/1\.0" "req-123" "127\.0\.0\.1:(\d+)" "127\.0\.0\.1:(\d+)"$"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let caps = re
        .captures(&line)
        .unwrap_or_else(|| panic!("not Envoy's default format: {line:?}"));
    assert_eq!(
        caps[1].parse::<usize>().ok(),
        Some(r.body.len()),
        "BYTES_SENT"
    );
    assert_eq!(
        caps[4].parse::<u16>().ok(),
        Some(strait.listener("ingress").port())
    );
    assert_eq!(
        caps[5].parse::<u16>().ok(),
        Some(up.addr.port()),
        "UPSTREAM_HOST"
    );

    // The path logged is the one the client sent, not the rewritten one.
    client
        .get_with(&strait.url("/old/thing"), &[("x-request-id", "req-456")])
        .await;
    assert_eq!(up.last_seen().path, "/new/thing");
    let line = strait.access_log("req-456", 1).await.remove(0);
    assert!(
        line.contains("\"GET /old/thing HTTP/1.1\" 200 - 0 "),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_format_to_file() {
    let up = Upstream::start("up").await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("access.json");
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
        .cluster("up", &[up.addr])
        .access_logs(vec![json!({
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": path.display().to_string(),
                "log_format": {"json_format": {
                    "method": "%REQ(:METHOD)%",
                    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
                    "code": "%RESPONSE_CODE%",
                    "flags": "%RESPONSE_FLAGS%",
                    "bytes_sent": "%BYTES_SENT%",
                    "upstream": "%UPSTREAM_HOST%",
                    "cluster": "%UPSTREAM_CLUSTER%",
                    "protocol": "%PROTOCOL%",
                    "ua": "%REQ(USER-AGENT)%",
                    "id": "%REQ(X-REQUEST-ID)%",
                    "mixed": "code=%RESPONSE_CODE%",
                    "local": "%DOWNSTREAM_LOCAL_ADDRESS%",
                    "note": "static"
                }}
            }
        })])
        .start()
        .await;
    let r = Client::http1()
        .get_with(&strait.url("/json?y=2"), &[("x-request-id", "json-1")])
        .await;
    assert_eq!(r.status, 200);

    let line = strait.wait_lines(&path, "json-1", 1).await.remove(0);
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/json?y=2");
    assert_eq!(v["code"], json!(200), "typed: a number");
    assert_eq!(v["flags"], "-");
    assert_eq!(v["bytes_sent"], json!(r.body.len()));
    assert_eq!(v["upstream"], up.addr.to_string());
    assert_eq!(v["cluster"], "up");
    assert_eq!(v["protocol"], "HTTP/1.1");
    assert_eq!(v["ua"], Value::Null, "a missing header is null");
    assert_eq!(v["mixed"], "code=200");
    assert_eq!(v["note"], "static");
    // The listener's own address (bound to one IP): known without asking each connection.
    assert_eq!(v["local"], strait.listener("ingress").to_string());
    let keys: Vec<&str> = v
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    assert_eq!(keys.len(), 13, "{keys:?}");
}
