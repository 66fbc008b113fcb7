//! gRPC through the proxy with tonic: a unary call (Envoy's ext_authz `Authorization/Check`,
//! including an error status in trailers) and a bidirectional stream (ADS
//! `StreamAggregatedResources`) whose messages interleave, over an HTTP/2 upstream cluster.

mod common;

use common::Config;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{
    attribute_context, AttributeContext, CheckRequest, CheckResponse,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc;
use serde_json::json;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

struct Auth;

#[tonic::async_trait]
impl Authorization for Auth {
    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let path = req
            .into_inner()
            .attributes
            .and_then(|a| a.request)
            .and_then(|r| r.http)
            .map(|h| h.path)
            .unwrap_or_default();
        if path == "/denied" {
            return Err(Status::permission_denied("denied by test"));
        }
        Ok(Response::new(CheckResponse {
            status: Some(rpc::Status {
                code: 0,
                message: format!("ok {path}"),
                details: vec![],
            }),
            ..Default::default()
        }))
    }
}

struct Ads;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    /// Answers each request at once with its version and type, and a counting nonce.
    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok(Some(r)) = inbound.message().await {
                n += 1;
                let resp = DiscoveryResponse {
                    version_info: r.version_info,
                    type_url: r.type_url,
                    nonce: format!("n{n}"),
                    ..Default::default()
                };
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("delta"))
    }
}

/// A tonic server on 127.0.0.1:0 with both services, and Strait in front of it.
async fn setup() -> (common::Strait, tokio::task::JoinHandle<()>) {
    let listener = common::bind().await;
    let addr = common::local_addr(&listener);
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(Auth))
            .add_service(AggregatedDiscoveryServiceServer::new(Ads))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    let strait = Config::new()
        .routes(json!([{"match": {"prefix": "/"}, "route": {"cluster": "grpc"}}]))
        .cluster_h2("grpc", &[addr])
        .start()
        .await;
    (strait, server)
}

async fn channel(strait: &common::Strait) -> tonic::transport::Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(strait.url(""))
        .unwrap_or_else(|e| panic!("endpoint: {e}"));
    common::within("grpc connect", endpoint.connect())
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

fn check_request(path: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    path: path.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_call_and_error_status() {
    let (strait, server) = setup().await;
    let mut client = AuthorizationClient::new(channel(&strait).await);

    let ok = common::within("check", client.check(check_request("/allowed")))
        .await
        .unwrap_or_else(|s| panic!("check failed: {s:?}"));
    let status = ok.into_inner().status.unwrap_or_default();
    assert_eq!(status.code, 0);
    assert_eq!(status.message, "ok /allowed");

    let err = common::within("check denied", client.check(check_request("/denied")))
        .await
        .err()
        .unwrap_or_else(|| panic!("expected an error status"));
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(err.message(), "denied by test");

    assert_eq!(
        strait.wait_stat("cluster.grpc.upstream_rq_total", 2).await,
        Some(2)
    );
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_stream_interleaves() {
    let (strait, server) = setup().await;
    let mut client = AggregatedDiscoveryServiceClient::new(channel(&strait).await);
    let (tx, rx) = tokio::sync::mpsc::channel::<DiscoveryRequest>(1);
    let send = |v: &str| DiscoveryRequest {
        version_info: v.to_string(),
        type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster".into(),
        ..Default::default()
    };
    tx.send(send("v1")).await.unwrap_or_else(|e| panic!("{e}"));
    let resp = common::within(
        "open stream",
        client.stream_aggregated_resources(ReceiverStream::new(rx)),
    )
    .await
    .unwrap_or_else(|s| panic!("stream: {s:?}"));
    let mut inbound = resp.into_inner();
    // Each response arrives before the next request is sent: nothing is buffered until the
    // request stream ends.
    for i in 1..=3 {
        let msg = common::within("response", inbound.message())
            .await
            .unwrap_or_else(|s| panic!("message {i}: {s:?}"))
            .unwrap_or_else(|| panic!("stream ended before response {i}"));
        assert_eq!(msg.version_info, format!("v{i}"));
        assert_eq!(msg.nonce, format!("n{i}"));
        if i < 3 {
            tx.send(send(&format!("v{}", i + 1)))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    drop(tx);
    let end = common::within("end of stream", inbound.message()).await;
    assert!(
        matches!(end, Ok(None)),
        "stream should end cleanly: {end:?}"
    );
    server.abort();
}
