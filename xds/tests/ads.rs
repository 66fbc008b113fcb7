//! The ADS client against the reference control plane over real gRPC on loopback, SotW and Delta.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use strait_xds::ads::{
    AdsClient, Protocol, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, TYPE_ORDER,
};
use strait_xds::control_plane::{ControlPlane, Seen};
use tokio::net::TcpListener;

const PROTOCOLS: [Protocol; 2] = [Protocol::Sotw, Protocol::Delta];

async fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// listener l1 -> route r1 -> EDS cluster c1 -> one endpoint.
fn base(cp: &ControlPlane) {
    cp.set_resources(LISTENER_TYPE, vec![listener("l1", addr(10001), "r1")])
        .unwrap();
    cp.set_resources(ROUTE_TYPE, vec![route_config("r1", "c1")])
        .unwrap();
    cp.set_resources(CLUSTER_TYPE, vec![eds_cluster("c1", 1)])
        .unwrap();
    cp.set_resources(ENDPOINT_TYPE, vec![endpoints("c1", &[addr(9001)])])
        .unwrap();
    cp.push();
}

fn all_four(h: &Held) -> bool {
    TYPE_ORDER
        .iter()
        .all(|t| h.get(*t).is_some_and(|m| !m.is_empty()))
}

async fn seen(cp: &ControlPlane, what: &str, pred: impl FnMut(&[Seen]) -> bool) -> Vec<Seen> {
    match cp.wait_seen(WAIT, pred).await {
        Ok(v) => v,
        Err(v) => panic!("timed out waiting for {what}; seen: {v:#?}"),
    }
}

fn acked(s: &[Seen], type_url: &str) -> bool {
    s.iter().any(|r| r.type_url == type_url && r.is_ack())
}

#[tokio::test]
async fn bring_up_update_references_and_removal() {
    for protocol in PROTOCOLS {
        let cp = ControlPlane::new();
        base(&cp);
        let (l, a) = bind().await;
        let _server = cp.spawn(l);
        let h = TestHandler::new();
        let client = AdsClient::spawn(config(vec![a], protocol), h.clone());

        h.wait("all four types", all_four).await;
        seen(&cp, "an ACK per type", |s| {
            TYPE_ORDER.iter().all(|t| acked(s, t))
        })
        .await;
        assert!(client.connected(), "{protocol:?}");
        let s = cp.seen();
        let first: Vec<&Seen> = s.iter().filter(|r| r.response_nonce.is_empty()).collect();
        // The node goes on the first request of the stream only.
        assert_eq!(s[0].node_id, "test-node");
        assert!(s.iter().all(|r| r.delta == (protocol == Protocol::Delta)));
        assert_eq!(first[0].type_url, CLUSTER_TYPE, "CDS first: {first:#?}");
        assert!(
            s.iter()
                .any(|r| r.type_url == ENDPOINT_TYPE && r.names == ["c1"]),
            "{s:#?}"
        );

        // An update to endpoints arrives.
        cp.set_resources(
            ENDPOINT_TYPE,
            vec![endpoints("c1", &[addr(9001), addr(9002)])],
        )
        .unwrap();
        cp.push();
        h.wait("two endpoints", |held| {
            held[ENDPOINT_TYPE]["c1"].body.value == endpoints("c1", &[addr(9001), addr(9002)]).value
        })
        .await;

        // The listener now refers to r2: the client asks for r2 and gets it.
        cp.set_resources(LISTENER_TYPE, vec![listener("l1", addr(10001), "r2")])
            .unwrap();
        cp.set_resources(
            ROUTE_TYPE,
            vec![route_config("r1", "c1"), route_config("r2", "c1")],
        )
        .unwrap();
        cp.push();
        h.wait("route r2", |held| held[ROUTE_TYPE].contains_key("r2"))
            .await;
        let s = cp.seen();
        let asked = s
            .iter()
            .find(|r| r.type_url == ROUTE_TYPE && r.names.contains(&"r2".to_string()))
            .unwrap_or_else(|| panic!("{protocol:?}: no request for r2: {s:#?}"));
        match protocol {
            Protocol::Sotw => assert_eq!(asked.names, ["r2"]),
            Protocol::Delta => assert_eq!(asked.unsubscribe, ["r1"]),
        }

        // A second cluster appears, then is removed: gone from the handler (SotW by omission
        // for CDS, Delta through removed_resources).
        cp.set_resources(
            CLUSTER_TYPE,
            vec![eds_cluster("c1", 1), eds_cluster("c2", 1)],
        )
        .unwrap();
        cp.set_resources(
            ENDPOINT_TYPE,
            vec![
                endpoints("c1", &[addr(9001)]),
                endpoints("c2", &[addr(9003)]),
            ],
        )
        .unwrap();
        cp.push();
        h.wait("c2 and its endpoints", |held| {
            held[CLUSTER_TYPE].contains_key("c2") && held[ENDPOINT_TYPE].contains_key("c2")
        })
        .await;
        cp.set_resources(CLUSTER_TYPE, vec![eds_cluster("c1", 1)])
            .unwrap();
        cp.push();
        h.wait("c2 removed", |held| {
            !held[CLUSTER_TYPE].contains_key("c2") && held[CLUSTER_TYPE].contains_key("c1")
        })
        .await;
        // The client stops asking for c2's endpoints once no cluster refers to them.
        seen(&cp, "EDS names back to c1", |s| {
            s.iter()
                .rev()
                .find(|r| r.type_url == ENDPOINT_TYPE)
                .is_some_and(|r| match protocol {
                    Protocol::Sotw => r.names == ["c1"],
                    Protocol::Delta => r.unsubscribe == ["c2"],
                })
        })
        .await;
        assert!(cp.seen().iter().all(|r| !r.is_nack()), "{protocol:?}");
    }
}

#[tokio::test]
async fn nack_keeps_the_old_state_and_names_the_field() {
    for protocol in PROTOCOLS {
        let cp = ControlPlane::new();
        base(&cp);
        let (l, a) = bind().await;
        let _server = cp.spawn(l);
        let h = TestHandler::new();
        let _client = AdsClient::spawn(config(vec![a], protocol), h.clone());
        h.wait("all four types", all_four).await;
        let good_version = cp.snapshot().version.to_string();

        cp.set_resources(CLUSTER_TYPE, vec![eds_cluster("c1", -1)])
            .unwrap();
        cp.push();
        let s = seen(&cp, "a CDS NACK", |s| {
            s.iter().any(|r| r.type_url == CLUSTER_TYPE && r.is_nack())
        })
        .await;
        let nack = s.iter().find(|r| r.is_nack()).unwrap();
        let detail = nack.error.as_deref().unwrap_or_default();
        assert!(
            detail.contains("c1") && detail.contains("connect_timeout"),
            "{detail}"
        );
        if protocol == Protocol::Sotw {
            // A SotW NACK carries the last accepted version.
            assert_eq!(nack.version_info, good_version);
        }
        let c: Cluster = h.body(CLUSTER_TYPE, "c1").unwrap();
        assert_eq!(c.connect_timeout.unwrap().seconds, 1, "{protocol:?}");

        // A fixed version is accepted.
        cp.set_resources(CLUSTER_TYPE, vec![eds_cluster("c1", 2)])
            .unwrap();
        cp.push();
        h.wait("fixed cluster", |held| {
            held[CLUSTER_TYPE]["c1"].body.value == eds_cluster("c1", 2).value
        })
        .await;
    }
}

#[tokio::test]
async fn reconnects_after_the_server_restarts() {
    for protocol in PROTOCOLS {
        let cp = ControlPlane::new();
        base(&cp);
        let (l, a) = bind().await;
        let server = cp.spawn(l);
        let h = TestHandler::new();
        let client = AdsClient::spawn(config(vec![a], protocol), h.clone());
        h.wait("all four types", all_four).await;
        let mut state = client.state();
        state.wait_for(|s| s.connected).await.unwrap();

        server.stop().await;
        tokio::time::timeout(WAIT, state.wait_for(|s| !s.connected))
            .await
            .expect("disconnect seen")
            .unwrap();
        assert!(all_four(&h.held()), "state kept while disconnected");
        let version = cp.snapshot().version.to_string();

        let l = TcpListener::bind(a).await.unwrap();
        let _server = cp.spawn(l);
        tokio::time::timeout(WAIT, state.wait_for(|s| s.connected))
            .await
            .expect("reconnected")
            .unwrap();
        let s = seen(&cp, "CDS on the second stream", |s| {
            s.iter()
                .any(|r| r.stream == 2 && r.type_url == CLUSTER_TYPE)
        })
        .await;
        let again = s
            .iter()
            .find(|r| r.stream == 2 && r.type_url == CLUSTER_TYPE)
            .unwrap();
        match protocol {
            // SotW says which version it holds; Delta lists each resource's version.
            Protocol::Sotw => assert_eq!(again.version_info, version),
            Protocol::Delta => {
                assert_eq!(again.initial_versions.keys().collect::<Vec<_>>(), ["c1"])
            }
        }

        cp.set_resources(CLUSTER_TYPE, vec![eds_cluster("c1", 5)])
            .unwrap();
        cp.push();
        h.wait("update after reconnect", |held| {
            held[CLUSTER_TYPE]["c1"].body.value == eds_cluster("c1", 5).value
        })
        .await;
    }
}

fn only_cluster(cp: &ControlPlane, name: &str) {
    cp.set_resources(CLUSTER_TYPE, vec![eds_cluster(name, 1)])
        .unwrap();
    cp.push();
}

#[tokio::test]
async fn fails_over_to_the_second_server_and_back() {
    for protocol in PROTOCOLS {
        let (primary, backup) = (ControlPlane::new(), ControlPlane::new());
        only_cluster(&primary, "from-primary");
        only_cluster(&backup, "from-backup");
        let (l1, a1) = bind().await;
        let (l2, a2) = bind().await;
        let server1 = primary.spawn(l1);
        let _server2 = backup.spawn(l2);
        let h = TestHandler::new();
        let client = AdsClient::spawn(config(vec![a1, a2], protocol), h.clone());
        let mut state = client.state();
        h.wait("primary's cluster", |held| {
            held.get(CLUSTER_TYPE)
                .is_some_and(|m| m.contains_key("from-primary"))
        })
        .await;

        server1.stop().await;
        h.wait("backup's cluster", |held| {
            held[CLUSTER_TYPE].contains_key("from-backup")
        })
        .await;
        assert_eq!(state.borrow_and_update().server, Some(a2));

        let l1 = TcpListener::bind(a1).await.unwrap();
        let _server1 = primary.spawn(l1);
        h.wait("primary's cluster again", |held| {
            held[CLUSTER_TYPE].contains_key("from-primary")
        })
        .await;
        tokio::time::timeout(
            WAIT,
            state.wait_for(|s| s.connected && s.server == Some(a1)),
        )
        .await
        .expect("back on the primary")
        .unwrap();
    }
}

#[tokio::test]
async fn serves_a_watched_directory() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        // Written aside and renamed, as editors and config pushers do, so no poll sees half a file.
        let tmp = dir.path().join(format!(".{name}"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.path().join(name)).unwrap();
    };
    let cds = |timeout: &str| {
        format!(
            "version_info: x\nresources:\n- '@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: c1\n  connect_timeout: {timeout}\n  type: EDS\n  eds_cluster_config:\n    eds_config:\n      ads: {{}}\n"
        )
    };
    write("cds.yaml", &cds("1s"));
    write(
        "eds.json",
        r#"{"@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment", "cluster_name": "c1"}"#,
    );
    let cp = ControlPlane::new();
    let _watch = cp.watch_dir(dir.path(), Duration::from_millis(50)).unwrap();
    let (l, a) = bind().await;
    let _server = cp.spawn(l);
    let h = TestHandler::new();
    let _client = AdsClient::spawn(config(vec![a], Protocol::Sotw), h.clone());
    h.wait("cluster and endpoints from files", |held| {
        held.get(CLUSTER_TYPE).is_some_and(|m| m.contains_key("c1"))
            && held
                .get(ENDPOINT_TYPE)
                .is_some_and(|m| m.contains_key("c1"))
    })
    .await;

    // A broken file is not served; the next good content is.
    write(
        "broken.yaml",
        "'@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\nnope: 1\n",
    );
    write("cds.yaml", &cds("3s"));
    std::fs::remove_file(dir.path().join("broken.yaml")).unwrap();
    h.wait("edited cluster", |held| {
        Cluster::decode_from(&held[CLUSTER_TYPE]["c1"].body.value)
            .is_some_and(|c| c.connect_timeout.is_some_and(|d| d.seconds == 3))
    })
    .await;
    let cla: ClusterLoadAssignment = h.body(ENDPOINT_TYPE, "c1").unwrap();
    assert_eq!(cla.cluster_name, "c1");
}

trait DecodeFrom: Sized {
    fn decode_from(b: &[u8]) -> Option<Self>;
}

impl<M: prost::Message + Default> DecodeFrom for M {
    fn decode_from(b: &[u8]) -> Option<Self> {
        M::decode(b).ok()
    }
}
