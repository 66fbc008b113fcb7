//! Region affinity with health-based failover, end to end: three regions × two zones of upstream
//! servers on loopback (priority by region, locality by zone), Strait running in region A zone 1
//! (`node.locality`, zone-aware routing against a local cluster), and a bounded client loop that
//! runs throughout while zones and regions are killed and restored. Asserts counts, not timing.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::Client;
use http_body_util::Full;
use serde_json::{json, Value};
use tokio::sync::watch;

/// An upstream that can be taken down (every connection closed, new ones closed on accept) and
/// brought back, answering `x-upstream: NAME` while up.
struct Zone {
    addr: SocketAddr,
    up: watch::Sender<bool>,
}

impl Zone {
    async fn start(name: &'static str) -> Zone {
        let l = common::bind().await;
        let addr = common::local_addr(&l);
        let (up, rx) = watch::channel(true);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                if !*rx.borrow() {
                    drop(s);
                    continue;
                }
                let mut down = rx.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        hyper::Response::builder()
                            .header("x-upstream", name)
                            .body(Full::new(Bytes::from(name)))
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Zone { addr, up }
    }

    fn set_up(&self, up: bool) {
        self.up.send_replace(up);
    }
}

fn lb_endpoints(zones: &[&Zone]) -> Value {
    json!(zones
        .iter()
        .map(|z| json!({"endpoint": {"address": {"socket_address": {
            "address": z.addr.ip().to_string(), "port_value": z.addr.port()}}}}))
        .collect::<Vec<_>>())
}

struct World {
    a1: Zone,
    a2: Vec<Zone>,
    b: Vec<Zone>,
    c: Vec<Zone>,
}

impl World {
    async fn start() -> World {
        World {
            a1: Zone::start("a1").await,
            a2: vec![
                Zone::start("a2").await,
                Zone::start("a2").await,
                Zone::start("a2").await,
            ],
            b: vec![Zone::start("b1").await, Zone::start("b2").await],
            c: vec![Zone::start("c1").await, Zone::start("c2").await],
        }
    }

    /// Priority 0 = region A (zone 1: one host, zone 2: three, so that losing zone 1 keeps the
    /// priority above 100 % overprovisioned health), 1 = region B, 2 = region C.
    fn endpoints(&self) -> Value {
        let loc = |r: &str, z: &str| json!({"region": r, "zone": z});
        json!([
            {"locality": loc("A", "z1"), "priority": 0, "lb_endpoints": lb_endpoints(&[&self.a1])},
            {"locality": loc("A", "z2"), "priority": 0,
             "lb_endpoints": lb_endpoints(&self.a2.iter().collect::<Vec<_>>())},
            {"locality": loc("B", "z1"), "priority": 1, "lb_endpoints": lb_endpoints(&[&self.b[0]])},
            {"locality": loc("B", "z2"), "priority": 1, "lb_endpoints": lb_endpoints(&[&self.b[1]])},
            {"locality": loc("C", "z1"), "priority": 2, "lb_endpoints": lb_endpoints(&[&self.c[0]])},
            {"locality": loc("C", "z2"), "priority": 2, "lb_endpoints": lb_endpoints(&[&self.c[1]])},
        ])
    }

    fn all(&self) -> impl Iterator<Item = &Zone> {
        std::iter::once(&self.a1)
            .chain(self.a2.iter())
            .chain(self.b.iter())
            .chain(self.c.iter())
    }
}

/// The bootstrap: cluster `svc` over the world, the local cluster `local` (this service's own
/// instances: one in A/z1, three in A/z2, matching the upstream spread so each sidecar keeps
/// its traffic in its zone), Strait in A/z1.
async fn strait(world: &World, svc_extra: Value, route_extra: Value) -> common::Strait {
    let mut svc = json!({
        "name": "svc", "type": "STATIC", "connect_timeout": "0.5s",
        "load_assignment": {"cluster_name": "svc", "endpoints": world.endpoints()},
        "common_lb_config": {"zone_aware_lb_config": {"min_cluster_size": 2}},
    });
    for (k, v) in svc_extra.as_object().into_iter().flatten() {
        svc[k] = v.clone();
    }
    let port = |p: u16| json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}});
    let local = json!({
        "name": "local", "type": "STATIC", "connect_timeout": "0.5s",
        "load_assignment": {"cluster_name": "local", "endpoints": [
            {"locality": {"region": "A", "zone": "z1"}, "lb_endpoints": [port(1)]},
            {"locality": {"region": "A", "zone": "z2"}, "lb_endpoints": [port(2), port(3), port(4)]},
        ]},
    });
    let mut route = json!({"cluster": "svc", "timeout": "5s"});
    for (k, v) in route_extra.as_object().into_iter().flatten() {
        route[k] = v.clone();
    }
    let cfg = common::Config::new()
        .access_logs(vec![])
        .routes(json!([{"match": {"prefix": "/"}, "route": route}]))
        .cluster_json(svc)
        .cluster_json(local);
    let mut v = cfg.json();
    v["node"]["locality"] = json!({"region": "A", "zone": "z1"});
    v["cluster_manager"] = json!({"local_cluster_name": "local"});
    common::Strait::start(&serde_json::to_string_pretty(&v).unwrap_or_default()).await
}

/// What the client loop saw in each phase: upstream (or `error <status>`) → count.
type Tally = Arc<Mutex<BTreeMap<usize, BTreeMap<String, usize>>>>;

struct Driver {
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tally: Tally,
    task: tokio::task::JoinHandle<()>,
}

impl Driver {
    /// Sends requests in a loop (bounded) until stopped, tallying by phase.
    fn start(url: String) -> Driver {
        let phase = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tally: Tally = Arc::default();
        let (p, s, t) = (phase.clone(), stop.clone(), tally.clone());
        let task = tokio::spawn(async move {
            let client = Client::http1();
            for _ in 0..100_000 {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                // Even phases are steady, odd ones transitions (each begins before the zones
                // change). A request that spans a phase change belongs to the transition it
                // overlaps, so a steady phase only counts requests that began and ended in it.
                let started = p.load(Ordering::SeqCst);
                let r = client
                    .try_send(common::req(http::Method::GET, &url, &[], common::empty()))
                    .await;
                let key = match r {
                    Ok(r) if r.status == 200 => r.upstream().unwrap_or("?").to_string(),
                    Ok(r) => format!("error {}", r.status.as_u16()),
                    Err(e) => format!("error {e}"),
                };
                let ended = p.load(Ordering::SeqCst);
                let ph = if started == ended || started % 2 == 1 {
                    started
                } else {
                    started + 1
                };
                let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                *t.entry(ph).or_default().entry(key).or_default() += 1;
            }
        });
        Driver {
            phase,
            stop,
            tally,
            task,
        }
    }

    fn count(&self, phase: usize) -> usize {
        let t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        t.get(&phase).map_or(0, |m| m.values().sum())
    }

    /// Enters `phase` and waits (bounded) until the loop has sent `n` requests in it.
    async fn run_phase(&self, phase: usize, n: usize) {
        self.phase.store(phase, Ordering::SeqCst);
        for _ in 0..2000 {
            if self.count(phase) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("phase {phase}: the client loop stalled");
    }

    async fn finish(self) -> BTreeMap<usize, BTreeMap<String, usize>> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = common::within("client loop", self.task).await;
        let t = self.tally.lock().unwrap_or_else(|e| e.into_inner());
        t.clone()
    }
}

/// Polls `/clusters` (bounded) until every given host's health flags satisfy `want`.
async fn wait_hosts(s: &common::Strait, hosts: &[&Zone], want: impl Fn(&str) -> bool) {
    for _ in 0..400 {
        let text = s.admin_get("/clusters").await.text();
        let ok = hosts.iter().all(|z| {
            let key = format!("svc::{}::health_flags::", z.addr);
            text.lines()
                .find_map(|l| l.strip_prefix(&key))
                .is_some_and(&want)
        });
        if ok {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("hosts never reached the wanted health");
}

fn only(m: &BTreeMap<String, usize>, names: &[&str]) -> bool {
    m.keys().all(|k| names.contains(&k.as_str()))
}

fn errors(t: &BTreeMap<usize, BTreeMap<String, usize>>) -> usize {
    t.values()
        .flat_map(|m| m.iter())
        .filter(|(k, _)| k.starts_with("error"))
        .map(|(_, n)| n)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_and_retries_fail_over_without_errors() {
    let w = World::start().await;
    let s = strait(
        &w,
        json!({"health_checks": [{
            "timeout": "0.5s", "interval": "0.05s", "no_traffic_interval": "0.05s",
            "unhealthy_threshold": 1, "healthy_threshold": 2,
            "http_health_check": {"path": "/healthz"}
        }]}),
        json!({"retry_policy": {
            "retry_on": "5xx,reset,connect-failure", "num_retries": 3,
            "retry_back_off": {"base_interval": "0.005s"},
            "retry_priority": {"name": "envoy.retry_priorities.previous_priorities",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig", "update_frequency": 1}},
            "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}]
        }}),
    )
    .await;
    let all: Vec<&Zone> = w.all().collect();
    wait_hosts(&s, &all, |f| f == "healthy").await;
    let d = Driver::start(s.url("/work"));

    d.run_phase(0, 100).await; // steady: local zone
    d.phase.store(1, Ordering::SeqCst); // transition
    w.a1.set_up(false);
    wait_hosts(&s, &[&w.a1], |f| f.contains("/failed_active_hc")).await;
    d.run_phase(2, 100).await; // steady: zone 2 of region A
    d.phase.store(3, Ordering::SeqCst);
    for z in &w.a2 {
        z.set_up(false);
    }
    wait_hosts(&s, &w.a2.iter().collect::<Vec<_>>(), |f| {
        f.contains("/failed_active_hc")
    })
    .await;
    d.run_phase(4, 100).await; // steady: region B
    d.phase.store(5, Ordering::SeqCst);
    w.a1.set_up(true);
    for z in &w.a2 {
        z.set_up(true);
    }
    wait_hosts(&s, &all, |f| f == "healthy").await;
    d.run_phase(6, 100).await; // steady: back home
    let t = d.finish().await;
    eprintln!("traffic by phase: {t:?}");

    assert!(only(&t[&0], &["a1"]), "{t:?}");
    assert!(only(&t[&2], &["a2"]), "{t:?}");
    assert!(only(&t[&4], &["b1", "b2"]), "{t:?}");
    assert!(only(&t[&6], &["a1"]), "{t:?}");
    assert_eq!(errors(&t), 0, "{t:?}");
    // Region C was never needed.
    assert!(
        t.values()
            .all(|m| !m.contains_key("c1") && !m.contains_key("c2")),
        "{t:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_alone_bounds_errors() {
    const CONSECUTIVE_5XX: usize = 5;
    let w = World::start().await;
    let s = strait(
        &w,
        json!({"outlier_detection": {
            "consecutive_5xx": CONSECUTIVE_5XX, "interval": "60s", "base_ejection_time": "60s",
            "max_ejection_percent": 100
        }}),
        json!({}),
    )
    .await;
    let d = Driver::start(s.url("/work"));
    d.run_phase(0, 100).await;
    d.phase.store(1, Ordering::SeqCst);
    w.a1.set_up(false);
    wait_hosts(&s, &[&w.a1], |f| f.contains("/failed_outlier_check")).await;
    d.run_phase(2, 100).await;
    d.phase.store(3, Ordering::SeqCst);
    for z in &w.a2 {
        z.set_up(false);
    }
    wait_hosts(&s, &w.a2.iter().collect::<Vec<_>>(), |f| {
        f.contains("/failed_outlier_check")
    })
    .await;
    d.run_phase(4, 100).await;
    let t = d.finish().await;
    eprintln!("traffic by phase: {t:?}");

    assert!(only(&t[&0], &["a1"]), "{t:?}");
    assert!(only(&t[&2], &["a2"]), "{t:?}");
    assert!(only(&t[&4], &["b1", "b2"]), "{t:?}");
    let killed = 1 + w.a2.len();
    let e = errors(&t);
    assert!(e >= 1 && e <= CONSECUTIVE_5XX * killed, "{e} errors: {t:?}");
    assert_eq!(
        s.stat("cluster.svc.outlier_detection.ejections_enforced_consecutive_5xx")
            .await,
        Some(killed as i64)
    );
}
