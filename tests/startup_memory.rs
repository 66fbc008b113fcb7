//! Once serving, Strait unmaps the pages of code and read-only data that start-up ran
//! (src/memory.rs). It logs how much, its mapped file pages shrink, and everything it unmapped
//! still runs when needed again: requests, DNS re-resolution, and admin pages whose code only
//! start-up had run (`/config_dump`'s protobuf descriptors, `/server_info`).

mod common;

use std::time::{Duration, Instant};

use common::{Config, Upstream};
use serde_json::json;

/// The log line's figures: KiB to unmap, and mapped file KiB before.
async fn start_up_line(strait: &common::Strait) -> (u64, u64) {
    const NEEDLE: &str = "start-up done: unmapping ";
    let lines = strait.log_lines(NEEDLE, 1).await;
    // After the needle: the log line's own timestamp holds digits too.
    let line = lines[0].split(NEEDLE).nth(1).unwrap_or_default();
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    match nums[..] {
        [unmapping, before, ..] => (unmapping, before),
        _ => panic!("unexpected start-up line: {line}"),
    }
}

/// `RssFile` of `pid`, KiB.
fn rss_file_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssFile:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no RssFile in /proc/{pid}/status:\n{status}"))
}

async fn unmaps_and_keeps_serving(worker_model: &str) {
    if common::under_envoy() {
        return; // Strait's own start-up step: Envoy has nothing to compare.
    }
    let up = Upstream::start("backend").await;
    // A STRICT_DNS cluster too: its resolver runs on other threads (getaddrinfo) around the
    // moment start-up pages are unmapped, and again after.
    let dns = json!({
        "name": "by_name",
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "dns_refresh_rate": "0.2s",
        "load_assignment": {"cluster_name": "by_name", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": "localhost", "port_value": up.addr.port()
            }}}}
        ]}]}
    });
    let strait = common::Strait::start_with(
        &Config::new()
            .routes(json!([
                // localhost may also resolve to ::1, where nothing listens.
                {"match": {"prefix": "/dns"}, "route": {"cluster": "by_name", "retry_policy": {
                    "retry_on": "connect-failure", "num_retries": 3
                }}},
                {"match": {"prefix": "/"}, "route": {"cluster": "backend"}}
            ]))
            .cluster("backend", &[up.addr])
            .cluster_json(dns)
            .yaml(),
        &["--worker-model", worker_model],
    )
    .await;

    let (unmapping, before) = start_up_line(&strait).await;
    // At least the binary's own code: megabytes in any build.
    assert!(unmapping > 1024, "unmapping only {unmapping} KiB");
    // The line comes just before the unmapping; its effect follows within moments.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rss_file_kib(strait.pid()) + 1024 > before {
        assert!(
            Instant::now() < deadline,
            "mapped file pages stayed at {} KiB (from {before})",
            rss_file_kib(strait.pid())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let client = common::Client::http1();
    for i in 0..5 {
        let r = client.get(&strait.url(&format!("/after/{i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.upstream(), Some("backend"));
    }
    // Re-resolved since (every 0.2 s), and routable.
    let deadline = Instant::now() + Duration::from_secs(10);
    while strait.stat("cluster.by_name.update_success").await < Some(3) {
        assert!(Instant::now() < deadline, "by_name never re-resolved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client.get(&strait.url("/dns")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.upstream(), Some("backend"));
    let dump = strait.admin_get("/config_dump").await;
    assert_eq!(dump.status, 200, "{}", dump.text());
    assert!(
        dump.text().contains("\"by_name\""),
        "no by_name cluster in /config_dump"
    );
    let info = strait.admin_get("/server_info").await;
    assert_eq!(info.json()["state"], "LIVE", "{}", info.text());
}

#[tokio::test]
async fn per_core_unmaps_start_up_pages_and_keeps_serving() {
    unmaps_and_keeps_serving("per-core").await;
}

#[tokio::test]
async fn work_stealing_unmaps_start_up_pages_and_keeps_serving() {
    unmaps_and_keeps_serving("work-stealing").await;
}
