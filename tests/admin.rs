//! The admin interface as an operator sees it after real traffic: `/ready`, `/server_info`,
//! `/stats` (text and JSON), `/stats/prometheus`, `/clusters`, `/listeners`, `/config_dump`.

mod common;

use common::{Config, Conn, Upstream};
use http::Method;
use serde_json::json;

const N: i64 = 7;

async fn proxy_with_traffic() -> (common::Strait, Upstream) {
    let up = Upstream::start("backend").await;
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]))
        .cluster("backend", &[up.addr])
        .start()
        .await;
    // One downstream connection, so exactly one upstream connection is expected.
    let mut conn = Conn::open(strait.listener("ingress")).await;
    for i in 0..N {
        let url = strait.url(&format!("/req/{i}"));
        let r = conn
            .send(common::req(Method::GET, &url, &[], common::empty()))
            .await;
        assert_eq!(
            r.map(|r| r.status).ok(),
            Some(http::StatusCode::OK),
            "request {i}"
        );
    }
    assert_eq!(
        strait
            .wait_stat("http.ingress.downstream_rq_total", N)
            .await,
        Some(N)
    );
    (strait, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_server_info_say_live() {
    let strait = Config::new().routes(json!([])).start().await;
    let ready = strait.admin_get("/ready").await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.text(), "LIVE\n");
    let info = strait.admin_get("/server_info").await;
    assert_eq!(info.status, 200);
    assert_eq!(info.json()["state"], "LIVE", "{}", info.text());
    assert!(
        info.json()["command_line_options"].is_object(),
        "{}",
        info.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_requests() {
    let (strait, up) = proxy_with_traffic().await;
    assert_eq!(up.requests(), N as usize);
    let stats = strait.stats().await;
    for (name, want) in [
        ("http.ingress.downstream_rq_total", N),
        ("http.ingress.downstream_rq_2xx", N),
        ("cluster.backend.upstream_rq_total", N),
        ("cluster.backend.upstream_rq_2xx", N),
        ("cluster.backend.upstream_rq_200", N),
        ("cluster.backend.upstream_cx_total", 1),
        ("http.ingress.downstream_rq_5xx", 0),
    ] {
        assert_eq!(stats.get(name).copied(), Some(want), "stat {name}");
    }

    let json = strait.admin_get("/stats?format=json").await.json();
    let entries = json["stats"].as_array().cloned().unwrap_or_default();
    let total = entries
        .iter()
        .find(|e| e["name"] == "http.ingress.downstream_rq_total")
        .map(|e| e["value"].clone());
    assert_eq!(total, Some(json!(N)), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_uses_envoy_names_and_tags() {
    let (strait, _up) = proxy_with_traffic().await;
    let prom = strait.admin_get("/stats/prometheus").await;
    assert_eq!(prom.status, 200);
    let text = prom.text();
    let line = format!("envoy_cluster_upstream_rq_total{{envoy_cluster_name=\"backend\"}} {N}");
    assert!(
        text.lines().any(|l| l == line),
        "no line {line:?} in:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "# TYPE envoy_cluster_upstream_rq_total counter"),
        "{text}"
    );
    let rq =
        format!("envoy_http_downstream_rq_total{{envoy_http_conn_manager_prefix=\"ingress\"}} {N}");
    assert!(text.lines().any(|l| l == rq), "no line {rq:?} in:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_lists_hosts_with_stats() {
    let (strait, up) = proxy_with_traffic().await;
    let text = strait.admin_get("/clusters").await.text();
    let host = format!("backend::{}", up.addr);
    for want in [
        format!("{host}::rq_total::{N}"),
        format!("{host}::rq_success::{N}"),
        format!("{host}::health_flags::healthy"),
        format!("{host}::weight::1"),
        "backend::default_priority::max_connections::1024".to_string(),
        "backend::added_via_api::false".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "no line {want:?} in:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_and_config_dump_show_the_config() {
    let up = Upstream::start("backend").await;
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}]))
        .cluster("backend", &[up.addr])
        .start()
        .await;
    let addr = strait.listener("ingress");
    let plain = strait.admin_get("/listeners").await.text();
    assert_eq!(plain.trim(), format!("ingress::{addr}"));

    let dump = strait.admin_get("/config_dump").await;
    assert_eq!(dump.status, 200);
    let v = dump.json();
    let configs = v["configs"].as_array().cloned().unwrap_or_default();
    let of = |t: &str| {
        configs
            .iter()
            .find(|c| c["@type"] == format!("type.googleapis.com/envoy.admin.v3.{t}"))
            .cloned()
            .unwrap_or_else(|| panic!("no {t} in {v}"))
    };
    assert_eq!(
        of("BootstrapConfigDump")["bootstrap"]["node"]["id"],
        "test",
        "{v}"
    );
    assert_eq!(
        of("ListenersConfigDump")["static_listeners"][0]["listener"]["name"],
        "ingress"
    );
    assert_eq!(
        of("ClustersConfigDump")["static_clusters"][0]["cluster"]["name"],
        "backend"
    );
    assert_eq!(
        of("RoutesConfigDump")["static_route_configs"][0]["route_config"]["name"],
        "local"
    );
}
