//! Real-world clients: curl over HTTP/1.1 and HTTP/2 (prior knowledge), and an h2load smoke load
//! that must finish with no failed or errored requests.

mod common;

use common::{Config, Upstream};
use serde_json::json;

async fn proxy(up: &Upstream) -> common::Strait {
    Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]))
        .cluster("up", &[up.addr])
        .start()
        .await
}

async fn curl(version_flag: &str, url: &str) -> (String, String) {
    let (status, out, err) = common::run(
        common::TIMEOUT,
        "curl",
        &[
            "-sS".into(),
            version_flag.into(),
            "-H".into(),
            "user-agent: curl-test".into(),
            "-w".into(),
            "\n%{http_code} %{http_version}".into(),
            url.into(),
        ],
    )
    .await;
    assert!(status.success(), "curl {version_flag} failed: {err}");
    match out.rsplit_once('\n') {
        Some((body, tail)) => (body.to_string(), tail.to_string()),
        None => panic!("unexpected curl output: {out}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http1_and_h2c() {
    if !common::tool("curl") {
        return;
    }
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;

    let (body, tail) = curl("--http1.1", &strait.url("/one?x=1")).await;
    assert_eq!(tail, "200 1.1");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["upstream"], "up");
    assert_eq!(v["path"], "/one?x=1");
    assert_eq!(v["headers"]["user-agent"], json!(["curl-test"]));

    let (body, tail) = curl("--http2-prior-knowledge", &strait.url("/two")).await;
    assert_eq!(tail, "200 2");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["path"], "/two");
    // The cluster speaks HTTP/1.1 upstream whatever the client spoke.
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(up.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_smoke() {
    if !common::tool("h2load") {
        return;
    }
    let up = Upstream::start("up").await;
    let strait = proxy(&up).await;
    let args: Vec<String> = ["-n", "2000", "-c", "4", "-m", "10"]
        .iter()
        .map(|s| s.to_string())
        .chain([strait.url("/load")])
        .collect();
    let (status, out, err) =
        common::run(std::time::Duration::from_secs(120), "h2load", &args).await;
    assert!(status.success(), "h2load failed:\n{out}\n{err}");
    let re = regex::Regex::new(
        r"requests: 2000 total, 2000 started, 2000 done, (\d+) succeeded, (\d+) failed, (\d+) errored",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let caps = re
        .captures(&out)
        .unwrap_or_else(|| panic!("no requests line in h2load output:\n{out}"));
    assert_eq!(
        (&caps[1], &caps[2], &caps[3]),
        ("2000", "0", "0"),
        "h2load output:\n{out}"
    );
    assert!(out.contains("status codes: 2000 2xx"), "{out}");
    assert_eq!(up.requests(), 2000);
    assert_eq!(
        strait
            .wait_stat("http.ingress.downstream_rq_2xx", 2000)
            .await,
        Some(2000)
    );
}
