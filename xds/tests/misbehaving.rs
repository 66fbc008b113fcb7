//! The ADS client against hand-driven servers that misbehave: every response is answered, bad
//! ones are NACKed, and the client keeps its state and reconnects. Protocol-level only (a test
//! handler); `tests/xds_misbehaving.rs` drives the real `strait` binary the same way.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::*;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    self as discovery, DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
    DiscoveryResponse,
};
use strait_xds::ads::{AdsClient, Protocol, CLUSTER_TYPE};
use strait_xds::control_plane::ControlPlane;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};

/// One stream as the test sees it: what the client sent, and a way to answer.
struct Scripted<Req, Resp> {
    requests: tonic::Streaming<Req>,
    responses: mpsc::UnboundedSender<Result<Resp, tonic::Status>>,
}

impl<Req: std::fmt::Debug, Resp> Scripted<Req, Resp> {
    async fn next(&mut self) -> Req {
        match tokio::time::timeout(WAIT, self.requests.message()).await {
            Ok(Ok(Some(r))) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }
}

type SotwStream = Scripted<DiscoveryRequest, DiscoveryResponse>;
type DeltaStream = Scripted<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

/// Hands every new stream to the test.
struct Server {
    sotw: mpsc::UnboundedSender<SotwStream>,
    delta: mpsc::UnboundedSender<DeltaStream>,
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
        let _ = self.sotw.send(Scripted {
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
        let _ = self.delta.send(Scripted {
            requests: request.into_inner(),
            responses: tx,
        });
        Ok(tonic::Response::new(UnboundedReceiverStream::new(rx)))
    }
}

struct Streams {
    addr: SocketAddr,
    sotw: mpsc::UnboundedReceiver<SotwStream>,
    delta: mpsc::UnboundedReceiver<DeltaStream>,
    _task: tokio::task::JoinHandle<()>,
}

impl Streams {
    async fn sotw(&mut self) -> SotwStream {
        tokio::time::timeout(WAIT, self.sotw.recv())
            .await
            .ok()
            .flatten()
            .expect("a SotW stream")
    }

    async fn delta(&mut self) -> DeltaStream {
        tokio::time::timeout(WAIT, self.delta.recv())
            .await
            .ok()
            .flatten()
            .expect("a Delta stream")
    }
}

async fn scripted() -> Streams {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (sotw_tx, sotw) = mpsc::unbounded_channel();
    let (delta_tx, delta) = mpsc::unbounded_channel();
    let svc = Server {
        sotw: sotw_tx,
        delta: delta_tx,
    };
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(svc))
            .serve_with_incoming(TcpListenerStream::new(l))
            .await;
    });
    Streams {
        addr,
        sotw,
        delta,
        _task: task,
    }
}

/// Reads the initial CDS and LDS requests (RDS/EDS wait for names).
async fn initial(s: &mut SotwStream) {
    let cds = s.next().await;
    assert_eq!(cds.type_url, CLUSTER_TYPE);
    assert!(cds.node.is_some());
    let lds = s.next().await;
    assert!(lds.node.is_none(), "node on the first request only");
}

fn response(
    type_url: &str,
    version: &str,
    nonce: &str,
    resources: Vec<envoy_types::pb::google::protobuf::Any>,
) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.into(),
        resources,
        type_url: type_url.into(),
        nonce: nonce.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn unknown_type_and_duplicate_names_are_nacked() {
    let mut srv = scripted().await;
    let h = TestHandler::new();
    let _c = AdsClient::spawn(config(vec![srv.addr], Protocol::Sotw), h.clone());
    let mut s = srv.sotw().await;
    initial(&mut s).await;

    s.responses
        .send(Ok(response(
            "type.googleapis.com/foo.Bar",
            "1",
            "n1",
            vec![],
        )))
        .unwrap();
    let nack = s.next().await;
    assert_eq!(nack.response_nonce, "n1");
    let e = nack.error_detail.expect("NACK");
    assert_eq!(e.code, 3);
    assert!(
        e.message
            .contains("unknown type URL type.googleapis.com/foo.Bar"),
        "{}",
        e.message
    );

    s.responses
        .send(Ok(response(
            CLUSTER_TYPE,
            "1",
            "n2",
            vec![
                eds_cluster("a", 1),
                eds_cluster("b", 1),
                eds_cluster("a", 2),
            ],
        )))
        .unwrap();
    let nack = s.next().await;
    assert_eq!(
        (nack.type_url.as_str(), nack.response_nonce.as_str()),
        (CLUSTER_TYPE, "n2")
    );
    assert_eq!(nack.version_info, "", "nothing accepted yet");
    let e = nack.error_detail.expect("NACK");
    assert!(
        e.message
            .contains("resources[2]: duplicate resource name \"a\""),
        "{}",
        e.message
    );
    assert!(h.names(CLUSTER_TYPE).is_empty());

    // A body of the wrong type is refused too.
    s.responses
        .send(Ok(response(
            CLUSTER_TYPE,
            "2",
            "n3",
            vec![endpoints("a", &[])],
        )))
        .unwrap();
    let nack = s.next().await;
    assert!(nack
        .error_detail
        .expect("NACK")
        .message
        .contains("ClusterLoadAssignment"));

    // Two responses back to back: each is answered, in order, the newest version last.
    s.responses
        .send(Ok(response(
            CLUSTER_TYPE,
            "3",
            "n4",
            vec![eds_cluster("a", 1)],
        )))
        .unwrap();
    s.responses
        .send(Ok(response(
            CLUSTER_TYPE,
            "4",
            "n5",
            vec![eds_cluster("b", 1)],
        )))
        .unwrap();
    let mut acks = Vec::new();
    while acks.len() < 2 {
        let r = s.next().await;
        if r.type_url == CLUSTER_TYPE {
            assert!(r.error_detail.is_none(), "{r:?}");
            acks.push((r.version_info, r.response_nonce));
        }
    }
    assert_eq!(acks, [("3".into(), "n4".into()), ("4".into(), "n5".into())]);
    assert_eq!(h.names(CLUSTER_TYPE), ["b"]);
}

#[tokio::test]
async fn delta_refuses_bad_responses() {
    let mut srv = scripted().await;
    let h = TestHandler::new();
    let _c = AdsClient::spawn(config(vec![srv.addr], Protocol::Delta), h.clone());
    let mut s = srv.delta().await;
    let cds = s.next().await;
    assert_eq!(cds.type_url, CLUSTER_TYPE);
    assert!(cds.resource_names_subscribe.is_empty(), "wildcard");
    let _lds = s.next().await;

    let res = |name: &str, body| discovery::Resource {
        name: name.into(),
        version: "v1".into(),
        resource: Some(body),
        ..Default::default()
    };
    let cases = [
        (
            DeltaDiscoveryResponse {
                type_url: "type.googleapis.com/foo.Bar".into(),
                nonce: "d1".into(),
                ..Default::default()
            },
            "unknown type URL",
        ),
        (
            DeltaDiscoveryResponse {
                type_url: CLUSTER_TYPE.into(),
                resources: vec![res("a", eds_cluster("a", 1)), res("a", eds_cluster("a", 1))],
                nonce: "d2".into(),
                ..Default::default()
            },
            "duplicate resource name",
        ),
        (
            DeltaDiscoveryResponse {
                type_url: CLUSTER_TYPE.into(),
                resources: vec![res("a", eds_cluster("b", 1))],
                nonce: "d3".into(),
                ..Default::default()
            },
            "does not match",
        ),
        (
            DeltaDiscoveryResponse {
                type_url: CLUSTER_TYPE.into(),
                resources: vec![res("a", eds_cluster("a", 1))],
                removed_resources: vec!["a".into()],
                nonce: "d4".into(),
                ..Default::default()
            },
            "also in resources",
        ),
    ];
    for (resp, expect) in cases {
        let nonce = resp.nonce.clone();
        s.responses.send(Ok(resp)).unwrap();
        let r = s.next().await;
        assert_eq!(r.response_nonce, nonce);
        let e = r
            .error_detail
            .unwrap_or_else(|| panic!("{expect}: not NACKed"));
        assert!(e.message.contains(expect), "{expect}: {}", e.message);
    }
    assert!(h.names(CLUSTER_TYPE).is_empty());
}

/// The server ends the stream with an error in the middle of a push: the client keeps what it
/// accepted, reconnects, and says what it holds.
#[tokio::test]
async fn stream_reset_mid_push_keeps_state_and_reconnects() {
    let mut srv = scripted().await;
    let h = TestHandler::new();
    let _c = AdsClient::spawn(config(vec![srv.addr], Protocol::Sotw), h.clone());
    let mut s = srv.sotw().await;
    initial(&mut s).await;
    s.responses
        .send(Ok(response(
            CLUSTER_TYPE,
            "7",
            "n1",
            vec![eds_cluster("a", 1)],
        )))
        .unwrap();
    // The ACK; then EDS asks for a's endpoints.
    let mut names = None;
    while names.is_none() {
        let r = s.next().await;
        if r.type_url == strait_xds::ads::ENDPOINT_TYPE {
            names = Some(r.resource_names);
        }
    }
    assert_eq!(names.unwrap(), ["a"]);
    s.responses
        .send(Err(tonic::Status::unavailable("going away")))
        .unwrap();
    drop(s);

    let mut s2 = srv.sotw().await;
    let cds = s2.next().await;
    assert_eq!(
        (cds.type_url.as_str(), cds.version_info.as_str()),
        (CLUSTER_TYPE, "7")
    );
    assert!(
        cds.response_nonce.is_empty(),
        "nonces do not survive a stream"
    );
    assert!(cds.node.is_some(), "node again on the new stream");
    assert_eq!(h.names(CLUSTER_TYPE), ["a"]);
}

/// Accepts TCP connections and never says a word.
async fn silent_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let task = tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            held.lock().await.push(sock);
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_server_that_never_answers_is_failed_over() {
    let (silent, _task) = silent_server().await;
    let good = ControlPlane::new();
    good.set_resources(CLUSTER_TYPE, vec![eds_cluster("from-good", 1)])
        .unwrap();
    good.push();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let good_addr = l.local_addr().unwrap();
    let _server = good.spawn(l);

    let h = TestHandler::new();
    h.seed(
        CLUSTER_TYPE,
        vec![strait_xds::ads::Resource {
            name: "saved".into(),
            version: "0".into(),
            body: eds_cluster("saved", 1),
        }],
    );
    let c = AdsClient::spawn(config(vec![silent, good_addr], Protocol::Sotw), h.clone());
    let mut state = c.state();
    // While the silent server is tried, the held state stays and the client is not connected.
    tokio::time::timeout(WAIT, state.wait_for(|s| s.server == Some(silent)))
        .await
        .unwrap()
        .unwrap();
    assert!(!c.connected());
    assert_eq!(h.names(CLUSTER_TYPE), ["saved"]);
    h.wait("the good server's cluster", |held| {
        held[CLUSTER_TYPE].contains_key("from-good")
    })
    .await;
    assert_eq!(state.borrow().server, Some(good_addr));
    assert!(c.connected());
}

/// A stream that gets stuck after the first response (the server stops answering but keeps
/// the stream open) leaves the client connected with its last state, never blank.
#[tokio::test]
async fn a_stuck_stream_keeps_the_last_state() {
    let mut srv = scripted().await;
    let h = TestHandler::new();
    let c = AdsClient::spawn(config(vec![srv.addr], Protocol::Delta), h.clone());
    let mut s = srv.delta().await;
    let _cds = s.next().await;
    let _lds = s.next().await;
    s.responses
        .send(Ok(DeltaDiscoveryResponse {
            type_url: CLUSTER_TYPE.into(),
            system_version_info: "1".into(),
            resources: vec![discovery::Resource {
                name: "a".into(),
                version: "v1".into(),
                resource: Some(eds_cluster("a", 1)),
                ..Default::default()
            }],
            nonce: "d1".into(),
            ..Default::default()
        }))
        .unwrap();
    let ack = s.next().await;
    assert_eq!(ack.response_nonce, "d1");
    assert!(ack.error_detail.is_none());
    // EDS for "a" follows the new cluster.
    let eds = s.next().await;
    assert_eq!(eds.resource_names_subscribe, ["a"]);
    assert!(c.connected());
    assert_eq!(h.names(CLUSTER_TYPE), ["a"]);
    assert_eq!(
        strait_xds::ads::Handler::versions(&*h, CLUSTER_TYPE)
            .get("a")
            .map(String::as_str),
        Some("v1")
    );
}
