//! Once serving, Strait unmaps the pages of code and read-only data that start-up ran
//! (src/memory.rs). It logs how much, and everything it unmapped still runs when needed again:
//! requests, and admin pages whose code only start-up had run (`/config_dump`'s protobuf
//! descriptors, `/server_info`'s command line).

mod common;

use std::time::{Duration, Instant};

use common::{Config, Upstream};
use serde_json::json;

#[tokio::test]
async fn unmaps_start_up_pages_and_keeps_serving() {
    if common::under_envoy() {
        return; // Strait's own start-up step: Envoy has nothing to compare.
    }
    let up = Upstream::start("backend").await;
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]))
        .cluster("backend", &[up.addr])
        .start()
        .await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let kib = loop {
        let log = strait.stderr();
        if let Some(kib) = log
            .split("start-up done: unmapping ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
        {
            break kib;
        }
        assert!(Instant::now() < deadline, "no start-up line logged:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // At least the binary's own code: megabytes in any build.
    assert!(kib > 1024, "unmapped only {kib} KiB");

    let client = common::Client::http1();
    for i in 0..5 {
        let r = client.get(&strait.url(&format!("/after/{i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.upstream(), Some("backend"));
    }
    let dump = strait.admin_get("/config_dump").await;
    assert_eq!(dump.status, 200, "{}", dump.text());
    let clusters = dump.json()["configs"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| {
                    c["@type"]
                        .as_str()
                        .is_some_and(|t| t.ends_with("ClustersConfigDump"))
                })
                .cloned()
        })
        .unwrap_or_default();
    assert!(
        clusters.to_string().contains("\"backend\""),
        "no backend cluster in {clusters}"
    );
    let info = strait.admin_get("/server_info").await;
    assert_eq!(info.json()["state"], "LIVE", "{}", info.text());
}
