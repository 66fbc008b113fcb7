//! The real `strait` binary against hand-driven ADS servers that misbehave: invalid protos,
//! unknown type URLs, duplicate names, routes to clusters that do not exist, stale nonces, a
//! stream reset in the middle of a push, a server that accepts and never answers, and a
//! flapping server, and (Delta) bad resources and a reset stream. Each bad response must be NACKed with a precise `error_detail`, and a real
//! request through the proxy must still be served from the last good configuration.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::xds::{eds_cluster, endpoints, listener};
use common::{Client, Strait, Upstream};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use strait_xds::ads::{CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE};
use strait_xds::control_plane::{load_dir, ControlPlane};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};

const LIMIT: Duration = Duration::from_secs(15);

// === resources ===

/// A route configuration: `/` goes to `cluster`, and each `(prefix, cluster)` of `extra`.
fn route(name: &str, cluster: &str, extra: &[(&str, &str)], validate: bool) -> String {
    let mut routes = String::new();
    for (p, c) in extra {
        routes.push_str(&format!(
            "  - {{match: {{prefix: '{p}'}}, route: {{cluster: {c}}}}}\n"
        ));
    }
    format!(
        "'@type': type.googleapis.com/envoy.config.route.v3.RouteConfiguration
name: {name}
validate_clusters: {validate}
virtual_hosts:
- name: all
  domains: ['*']
  routes:
{routes}  - {{match: {{prefix: /}}, route: {{cluster: {cluster}}}}}
"
    )
}

/// One resource document as an `Any`, read the way the reference control plane reads files.
fn any(doc: &str) -> Any {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("r.yaml"), doc).unwrap();
    let all = load_dir(dir.path()).unwrap();
    all.into_values()
        .flat_map(|m| m.into_values())
        .next()
        .expect("one resource")
}

fn response(type_url: &str, version: &str, nonce: &str, docs: &[String]) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.into(),
        resources: docs.iter().map(|d| any(d)).collect(),
        type_url: type_url.into(),
        nonce: nonce.into(),
        ..Default::default()
    }
}

fn bootstrap(cp: SocketAddr, fetch_timeout: &str) -> String {
    format!(
        "node: {{id: test-node, cluster: test}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3, initial_fetch_timeout: {fetch_timeout}}}
  lds_config: {{ads: {{}}, resource_api_version: V3, initial_fetch_timeout: {fetch_timeout}}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: '{}', port_value: {}}}}}}}}}]}}]
",
        cp.ip(),
        cp.port()
    )
}

// === a hand-driven ADS server ===

/// One SotW stream as the test drives it.
struct Stream {
    requests: tonic::Streaming<DiscoveryRequest>,
    responses: mpsc::UnboundedSender<Result<DiscoveryResponse, tonic::Status>>,
}

impl Stream {
    async fn next(&mut self) -> DiscoveryRequest {
        match tokio::time::timeout(LIMIT, self.requests.message()).await {
            Ok(Ok(Some(r))) => r,
            other => panic!("expected a request from strait, got {other:?}"),
        }
    }

    /// Reads requests until one for `type_url` (subscriptions may come in any order).
    async fn request_for(&mut self, type_url: &str) -> DiscoveryRequest {
        loop {
            let r = self.next().await;
            if r.type_url == type_url {
                return r;
            }
        }
    }

    fn send(&self, resp: DiscoveryResponse) {
        self.responses.send(Ok(resp)).expect("stream open");
    }

    /// Sends `resp` and returns strait's answer to it: the request carrying its nonce.
    async fn answer(&mut self, resp: DiscoveryResponse) -> DiscoveryRequest {
        let nonce = resp.nonce.clone();
        self.send(resp);
        loop {
            let r = self.next().await;
            if r.response_nonce == nonce {
                return r;
            }
        }
    }

    /// Pushes a whole good configuration on this stream and checks every ACK.
    async fn push_good(&mut self, version: &str, docs: &Docs) {
        for (type_url, set) in docs.by_type() {
            let nonce = format!("{version}-{type_url}");
            let ack = self.answer(response(type_url, version, &nonce, set)).await;
            assert_ack(&ack, version);
        }
    }
}

/// A good configuration, by type.
#[derive(Clone)]
struct Docs {
    clusters: Vec<String>,
    endpoints: Vec<String>,
    listeners: Vec<String>,
    routes: Vec<String>,
}

impl Docs {
    /// Each type's documents, in the order a control plane pushes them (CDS, EDS, LDS, RDS).
    fn by_type(&self) -> [(&'static str, &[String]); 4] {
        [
            (CLUSTER_TYPE, &self.clusters),
            (ENDPOINT_TYPE, &self.endpoints),
            (LISTENER_TYPE, &self.listeners),
            (ROUTE_TYPE, &self.routes),
        ]
    }
}

fn good(a: SocketAddr) -> Docs {
    Docs {
        clusters: vec![eds_cluster("up")],
        endpoints: vec![endpoints("up", &[a])],
        listeners: vec![listener("ingress", "rc")],
        routes: vec![route("rc", "up", &[], false)],
    }
}

fn assert_ack(r: &DiscoveryRequest, version: &str) {
    assert!(
        r.error_detail.is_none(),
        "expected an ACK of {version} for {}, got a NACK: {:?}",
        r.type_url,
        r.error_detail
    );
    assert_eq!(r.version_info, version, "ACK of {}", r.type_url);
}

/// Asserts a NACK that keeps `kept` and whose detail contains every `needles`.
fn assert_nack(r: &DiscoveryRequest, kept: &str, needles: &[&str]) {
    let e = r
        .error_detail
        .as_ref()
        .unwrap_or_else(|| panic!("expected a NACK, got an ACK of {}", r.version_info));
    assert_eq!(e.code, 3, "INVALID_ARGUMENT");
    for n in needles {
        assert!(
            e.message.contains(n),
            "{n:?} not in NACK detail {:?}",
            e.message
        );
    }
    assert_eq!(
        r.version_info, kept,
        "a NACK carries the last accepted version"
    );
}

struct Server {
    streams: mpsc::UnboundedSender<Stream>,
    deltas: mpsc::UnboundedSender<DeltaStream>,
    opened: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Server {
    type StreamAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
    type DeltaAggregatedResourcesStream =
        UnboundedReceiverStream<Result<DeltaDiscoveryResponse, tonic::Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.opened.fetch_add(1, Ordering::SeqCst);
        let _ = self.streams.send(Stream {
            requests: request.into_inner(),
            responses: tx,
        });
        Ok(tonic::Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.opened.fetch_add(1, Ordering::SeqCst);
        let _ = self.deltas.send(DeltaStream {
            requests: request.into_inner(),
            responses: tx,
        });
        Ok(tonic::Response::new(UnboundedReceiverStream::new(rx)))
    }
}

struct Scripted {
    addr: SocketAddr,
    streams: mpsc::UnboundedReceiver<Stream>,
    deltas: mpsc::UnboundedReceiver<DeltaStream>,
    opened: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Scripted {
    async fn start() -> Scripted {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, streams) = mpsc::unbounded_channel();
        let (delta_tx, deltas) = mpsc::unbounded_channel();
        let opened = Arc::new(AtomicUsize::new(0));
        let svc = Server {
            streams: tx,
            deltas: delta_tx,
            opened: opened.clone(),
        };
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(svc))
                .serve_with_incoming(TcpListenerStream::new(l))
                .await;
        });
        Scripted {
            addr,
            streams,
            deltas,
            opened,
            _task: task,
        }
    }

    /// The next stream strait opens, and its initial requests up to LDS's (CDS first, then
    /// EDS when strait already holds clusters, then LDS).
    async fn stream(&mut self) -> (Stream, Vec<DiscoveryRequest>) {
        let mut s = tokio::time::timeout(LIMIT, self.streams.recv())
            .await
            .ok()
            .flatten()
            .expect("strait opens an ADS stream");
        let first = s.next().await;
        assert_eq!(first.type_url, CLUSTER_TYPE, "CDS first, as Envoy");
        assert!(first.node.as_ref().is_some_and(|n| n.id == "test-node"));
        let mut initial = vec![first];
        loop {
            let r = s.next().await;
            assert!(r.node.is_none(), "node on the first request only");
            let lds = r.type_url == LISTENER_TYPE;
            initial.push(r);
            if lds {
                return (s, initial);
            }
        }
    }
}

/// Starts strait against `srv` and pushes `docs` on its first stream.
async fn start(srv: &mut Scripted, docs: &Docs, extra_args: &[&str]) -> (Strait, Stream) {
    let yaml = bootstrap(srv.addr, "10s");
    let (s, stream) = tokio::join!(Strait::start_with(&yaml, extra_args), async {
        let (mut stream, _) = srv.stream().await;
        stream.push_good("1", docs).await;
        stream
    });
    (s, stream)
}

/// A real request through the ingress listener: 200 from `want`.
async fn serves(s: &Strait, client: &Client, path: &str, want: &str) {
    let r = client.get(&s.url(path)).await;
    assert_eq!(
        (r.status.as_u16(), r.upstream()),
        (200, Some(want)),
        "GET {path}: {}",
        r.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_responses_are_nacked_precisely_and_the_last_good_config_serves() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut srv = Scripted::start().await;
    let docs = good(a.addr);
    let (s, mut st) = start(&mut srv, &docs, &[]).await;
    let client = Client::http1();
    serves(&s, &client, "/", "a").await;

    // An invalid proto: the bytes of the Cluster do not decode.
    let mut r = response(CLUSTER_TYPE, "2", "bad-proto", &[]);
    r.resources.push(Any {
        type_url: CLUSTER_TYPE.into(),
        value: vec![0x0a, 0xff, 0xff],
    });
    let nack = st.answer(r).await;
    assert_nack(&nack, "1", &["resources[0]", "cannot decode"]);
    serves(&s, &client, "/", "a").await;

    // An unknown type URL.
    let unknown = "type.googleapis.com/envoy.config.nothing.v3.Nothing";
    let nack = st.answer(response(unknown, "1", "unknown", &[])).await;
    assert_eq!(nack.type_url, unknown);
    assert_nack(&nack, "", &["unknown type URL", unknown]);

    // A body of another type than the response's.
    let nack = st
        .answer(response(
            CLUSTER_TYPE,
            "2",
            "wrong-type",
            &[endpoints("up", &[a.addr])],
        ))
        .await;
    assert_nack(&nack, "1", &["resources[0]", "ClusterLoadAssignment"]);

    // Duplicate names.
    let nack = st
        .answer(response(
            CLUSTER_TYPE,
            "2",
            "dup",
            &[eds_cluster("up"), eds_cluster("b"), eds_cluster("up")],
        ))
        .await;
    assert_nack(
        &nack,
        "1",
        &["resources[2]", "duplicate resource name \"up\""],
    );

    // A route to a cluster nobody sent, with validate_clusters: refused, naming the field.
    let nack = st
        .answer(response(
            ROUTE_TYPE,
            "2",
            "missing-validated",
            &[route("rc", "up", &[("/gone", "missing")], true)],
        ))
        .await;
    assert_nack(
        &nack,
        "1",
        &["route configuration 'rc'", "unknown cluster 'missing'"],
    );
    serves(&s, &client, "/", "a").await;

    // Without validate_clusters (RDS's default), Envoy accepts it and answers 503 for that
    // route only ("cluster not found"); so does strait.
    let ack = st
        .answer(response(
            ROUTE_TYPE,
            "3",
            "missing-unvalidated",
            &[route("rc", "up", &[("/gone", "missing")], false)],
        ))
        .await;
    assert_ack(&ack, "3");
    let deadline = Instant::now() + LIMIT;
    loop {
        let r = client.get(&s.url("/gone")).await;
        if r.status == 503 {
            break;
        }
        assert_eq!(
            r.upstream(),
            Some("a"),
            "old routes until the new ones apply"
        );
        assert!(Instant::now() < deadline, "/gone never answered 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    serves(&s, &client, "/", "a").await;

    // A second cluster, for the next cases.
    let ack = st
        .answer(response(
            CLUSTER_TYPE,
            "2",
            "c2",
            &[eds_cluster("up"), eds_cluster("b")],
        ))
        .await;
    assert_ack(&ack, "2");
    let ack = st
        .answer(response(
            ENDPOINT_TYPE,
            "2",
            "e2",
            &[endpoints("up", &[a.addr]), endpoints("b", &[b.addr])],
        ))
        .await;
    assert_ack(&ack, "2");

    // Stale nonces: two responses back to back, so strait's ACK of the first carries a nonce
    // the server already superseded. Both are answered in order; the newest wins.
    st.send(response(
        ROUTE_TYPE,
        "4",
        "r4",
        &[route("rc", "up", &[("/gone", "missing")], false)],
    ));
    st.send(response(
        ROUTE_TYPE,
        "5",
        "r5",
        &[route("rc", "b", &[], false)],
    ));
    let first = st.request_for(ROUTE_TYPE).await;
    let second = st.request_for(ROUTE_TYPE).await;
    assert_eq!(
        [
            (first.response_nonce.as_str(), first.version_info.as_str()),
            (second.response_nonce.as_str(), second.version_info.as_str())
        ],
        [("r4", "4"), ("r5", "5")]
    );
    let deadline = Instant::now() + LIMIT;
    while client.get(&s.url("/")).await.upstream() != Some("b") {
        assert!(Instant::now() < deadline, "route to b never served");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A replayed response (an old nonce, the current version) is ACKed again, changes nothing.
    let ack = st
        .answer(response(
            ROUTE_TYPE,
            "5",
            "r5",
            &[route("rc", "b", &[], false)],
        ))
        .await;
    assert_ack(&ack, "5");
    serves(&s, &client, "/", "b").await;

    // Stream reset in the middle of a push: CDS adds a cluster and the stream dies before its
    // endpoints come. The new cluster stays warming, nothing else changes, and the new stream
    // says what strait holds.
    let ack = st
        .answer(response(
            CLUSTER_TYPE,
            "3",
            "c3",
            &[eds_cluster("up"), eds_cluster("b"), eds_cluster("late")],
        ))
        .await;
    assert_ack(&ack, "3");
    let eds = st.request_for(ENDPOINT_TYPE).await;
    assert!(eds.resource_names.contains(&"late".to_string()), "{eds:?}");
    st.responses
        .send(Err(tonic::Status::unavailable("going away mid-push")))
        .unwrap();
    drop(st);
    serves(&s, &client, "/", "b").await;
    let (_st, initial) = srv.stream().await;
    let cds = &initial[0];
    assert_eq!(
        cds.version_info, "3",
        "the new stream resumes from what was accepted"
    );
    assert!(
        cds.response_nonce.is_empty(),
        "nonces do not survive a stream"
    );
    let eds = initial
        .iter()
        .find(|r| r.type_url == ENDPOINT_TYPE)
        .expect("EDS asked for on the new stream");
    assert_eq!(eds.version_info, "2");
    assert_eq!(eds.resource_names, ["b", "late", "up"]);
    serves(&s, &client, "/", "b").await;

    // The rejections are counted with Envoy's names.
    let stats = s.stats().await;
    assert_eq!(stats.get("cluster_manager.cds.update_rejected"), Some(&3));
    assert_eq!(stats.get("http.ingress.rds.rc.update_rejected"), Some(&1));
    assert!(stats.get("cluster_manager.cds.update_failure") >= Some(&1));
    assert_eq!(stats.get("cluster.late.update_success"), Some(&0));
    // The new stream is open (the gauge follows the connection state asynchronously).
    assert_eq!(
        s.wait_stat("control_plane.connected_state", 1).await,
        Some(1)
    );
    drop(b);
}

/// A control plane that accepts connections and never says a word: strait, restarted against
/// it, serves from its last-known-good store once `initial_fetch_timeout` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_control_plane_leaves_strait_serving_from_its_store() {
    let a = Upstream::start("a").await;
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().to_str().unwrap().to_string();
    let args = ["--xds-state-dir", state_dir.as_str()];
    {
        let cp = ControlPlane::new();
        let d = good(a.addr);
        let mut all = Vec::new();
        for doc in d
            .clusters
            .iter()
            .chain(&d.endpoints)
            .chain(&d.listeners)
            .chain(&d.routes)
        {
            all.push(doc.clone());
        }
        let dir = tempfile::tempdir().unwrap();
        for (i, doc) in all.iter().enumerate() {
            std::fs::write(dir.path().join(format!("r{i}.yaml")), doc).unwrap();
        }
        cp.replace_all(load_dir(dir.path()).unwrap());
        cp.push();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cp_addr = l.local_addr().unwrap();
        let _srv = cp.spawn(l);
        let s = Strait::start_with(&bootstrap(cp_addr, "10s"), &args).await;
        serves(&s, &Client::http1(), "/", "a").await;
        // The store is written after each ACK, off the request path.
        let deadline = Instant::now() + LIMIT;
        while std::fs::read_dir(state.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".lkg"))
            .count()
            < 4
        {
            assert!(Instant::now() < deadline, "store never written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Accepts TCP and never answers: not even the HTTP/2 preface.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = silent.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            held.push(sock);
        }
    });
    let started = Instant::now();
    let s = Strait::start_with(&bootstrap(silent_addr, "1s"), &args).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "ready before the timeout"
    );
    serves(&s, &Client::http1(), "/", "a").await;
    assert!(
        accepted.load(Ordering::SeqCst) >= 1,
        "strait never tried the control plane"
    );
    assert_eq!(s.stat("control_plane.connected_state").await, Some(0));
    assert_eq!(
        s.stat("cluster_manager.cds.init_fetch_timeout").await,
        Some(1)
    );
    assert_eq!(
        s.stat("listener_manager.lds.init_fetch_timeout").await,
        Some(1)
    );
}

/// A control plane that keeps dropping the stream after each push: a client loop through
/// strait sees no failure, and the last push (a route change) is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_control_plane_never_fails_a_request() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut srv = Scripted::start().await;
    let mut docs = good(a.addr);
    let (s, st) = start(&mut srv, &docs, &[]).await;
    let url = s.url("/");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let looped = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = Client::http1();
            let mut n = 0usize;
            // Bounded: the test ends it, or it gives up after a minute.
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let r = client.get(&url).await;
                assert_eq!(r.status, 200, "request {n} failed: {}", r.text());
                n += 1;
            }
            n
        })
    };
    let mut st = Some(st);
    for flap in 0..3 {
        if let Some(st) = st.take() {
            st.responses
                .send(Err(tonic::Status::unavailable("flap")))
                .unwrap();
        }
        let (mut next, initial) = srv.stream().await;
        assert_eq!(initial[0].version_info, (flap + 1).to_string());
        if flap == 2 {
            docs.routes = vec![route("rc", "b", &[], false)];
            docs.clusters.push(eds_cluster("b"));
            docs.endpoints.push(endpoints("b", &[b.addr]));
        }
        next.push_good(&(flap + 2).to_string(), &docs).await;
        st = Some(next);
    }
    let client = Client::http1();
    let deadline = Instant::now() + LIMIT;
    while client.get(&s.url("/")).await.upstream() != Some("b") {
        assert!(Instant::now() < deadline, "the last push never applied");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let n = looped.await.expect("no failed request during the flaps");
    assert!(n > 0);
    assert_eq!(srv.opened.load(Ordering::SeqCst), 4);
    assert!(s.stat("cluster_manager.cds.update_failure").await >= Some(3));
}

// === Delta ===

/// One Delta stream as the test drives it.
struct DeltaStream {
    requests: tonic::Streaming<DeltaDiscoveryRequest>,
    responses: mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, tonic::Status>>,
}

impl DeltaStream {
    async fn next(&mut self) -> DeltaDiscoveryRequest {
        match tokio::time::timeout(LIMIT, self.requests.message()).await {
            Ok(Ok(Some(r))) => r,
            other => panic!("expected a Delta request from strait, got {other:?}"),
        }
    }

    /// Sends `resp` and returns strait's answer to it: the request carrying its nonce.
    async fn answer(&mut self, resp: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let nonce = resp.nonce.clone();
        self.responses.send(Ok(resp)).expect("stream open");
        loop {
            let r = self.next().await;
            if r.response_nonce == nonce {
                return r;
            }
        }
    }

    /// Pushes a whole good configuration, every resource at `version`, and checks every ACK.
    async fn push_good(&mut self, version: &str, docs: &Docs) {
        for (type_url, set) in docs.by_type() {
            let nonce = format!("{version}-{type_url}");
            let ack = self
                .answer(delta_response(type_url, version, &nonce, set))
                .await;
            assert!(
                ack.error_detail.is_none(),
                "expected an ACK for {type_url}, got {:?}",
                ack.error_detail
            );
        }
    }
}

/// The resources' names as strait derives them: each document's `name` or `cluster_name`.
fn doc_name(doc: &str) -> String {
    doc.lines()
        .find_map(|l| {
            l.strip_prefix("name: ")
                .or_else(|| l.strip_prefix("cluster_name: "))
        })
        .expect("a named resource")
        .trim()
        .to_string()
}

fn delta_response(
    type_url: &str,
    version: &str,
    nonce: &str,
    docs: &[String],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: version.into(),
        resources: docs
            .iter()
            .map(|d| Resource {
                name: doc_name(d),
                version: version.into(),
                resource: Some(any(d)),
                ..Default::default()
            })
            .collect(),
        type_url: type_url.into(),
        nonce: nonce.into(),
        ..Default::default()
    }
}

impl Scripted {
    /// The next Delta stream strait opens, and its initial requests up to LDS's.
    async fn delta_stream(&mut self) -> (DeltaStream, Vec<DeltaDiscoveryRequest>) {
        let mut s = tokio::time::timeout(LIMIT, self.deltas.recv())
            .await
            .ok()
            .flatten()
            .expect("strait opens a Delta ADS stream");
        let first = s.next().await;
        assert_eq!(first.type_url, CLUSTER_TYPE, "CDS first, as Envoy");
        assert!(first.node.as_ref().is_some_and(|n| n.id == "test-node"));
        let mut initial = vec![first];
        loop {
            let r = s.next().await;
            let lds = r.type_url == LISTENER_TYPE;
            initial.push(r);
            if lds {
                return (s, initial);
            }
        }
    }
}

/// Delta: bad resources are NACKed with their name and reason while the last good config
/// serves, and after a stream reset strait resumes with `initial_resource_versions` naming
/// what it had accepted, and keeps serving without a new push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_bad_resources_are_nacked_and_a_reset_resumes_from_accepted_versions() {
    let a = Upstream::start("a").await;
    let mut srv = Scripted::start().await;
    let docs = good(a.addr);
    let yaml = bootstrap(srv.addr, "10s").replace("api_type: GRPC", "api_type: DELTA_GRPC");
    let (s, mut st) = tokio::join!(Strait::start(&yaml), async {
        let (mut st, _) = srv.delta_stream().await;
        st.push_good("1", &docs).await;
        st
    });
    let client = Client::http1();
    serves(&s, &client, "/", "a").await;

    // A resource whose bytes do not decode.
    let mut bad = delta_response(CLUSTER_TYPE, "2", "bad-proto", &[]);
    bad.resources.push(Resource {
        name: "broken".into(),
        version: "2".into(),
        resource: Some(Any {
            type_url: CLUSTER_TYPE.into(),
            value: vec![0x0a, 0xff, 0xff],
        }),
        ..Default::default()
    });
    let nack = st.answer(bad).await;
    let detail = nack.error_detail.expect("a NACK");
    assert_eq!(detail.code, 3, "INVALID_ARGUMENT");
    for needle in ["resources[0]", "cannot decode"] {
        assert!(detail.message.contains(needle), "{}", detail.message);
    }
    serves(&s, &client, "/", "a").await;

    // Two resources with one name in one response.
    let twice = vec![eds_cluster("dup"), eds_cluster("dup")];
    let nack = st
        .answer(delta_response(CLUSTER_TYPE, "3", "dup", &twice))
        .await;
    let detail = nack.error_detail.expect("a NACK");
    assert!(detail.message.contains("dup"), "{}", detail.message);
    serves(&s, &client, "/", "a").await;

    // The control plane drops the stream; strait reconnects and says what it holds.
    drop(st);
    let (_st, initial) = srv.delta_stream().await;
    let versions = |type_url: &str| {
        let r = initial
            .iter()
            .find(|r| r.type_url == type_url)
            .unwrap_or_else(|| panic!("no {type_url} request on the new stream"));
        let mut v: Vec<(String, String)> =
            r.initial_resource_versions.clone().into_iter().collect();
        v.sort();
        v
    };
    assert_eq!(
        versions(CLUSTER_TYPE),
        [("up".to_string(), "1".to_string())]
    );
    assert_eq!(
        versions(LISTENER_TYPE),
        [("ingress".to_string(), "1".to_string())]
    );
    serves(&s, &client, "/", "a").await;
}
