//! One Delta ADS stream on the server side.

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::envoy::service::discovery::v3::{
    self as discovery, DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use tokio::sync::{mpsc, watch};

use super::{resource_version, selected, ControlPlane, Seen, Snapshot};
use crate::ads::is_wildcard;

#[derive(Default)]
struct TypeState {
    started: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// Name -> version the client holds (as far as this stream told or was told).
    held: HashMap<String, String>,
}

pub(super) async fn run(
    cp: ControlPlane,
    stream: u64,
    mut requests: tonic::Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, tonic::Status>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut snapshots = cp.inner.snapshot.subscribe();
    let mut types: HashMap<String, TypeState> = HashMap::new();
    let mut node_id = String::new();
    loop {
        tokio::select! {
            req = requests.message() => {
                let req = match req {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(s) => {
                        tracing::debug!(stream, "control plane: Delta stream error: {s}");
                        return;
                    }
                };
                if let Some(n) = &req.node {
                    node_id = n.id.clone();
                }
                // Not marked seen: a push racing this request must still reach the other types.
                let snap = snapshots.borrow().clone();
                let type_url = req.type_url.clone();
                on_request(&cp, stream, &node_id, &mut types, req);
                if let Some(st) = types.get_mut(&type_url) {
                    if let Some(resp) = diff(&cp, &type_url, st, &snap) {
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                let snap = snapshots.borrow_and_update().clone();
                for t in crate::ads::TYPE_ORDER {
                    let Some(st) = types.get_mut(t) else { continue };
                    if let Some(resp) = diff(&cp, t, st, &snap) {
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            () = super::stopped(&mut stop) => return,
        }
    }
}

fn on_request(
    cp: &ControlPlane,
    stream: u64,
    node_id: &str,
    types: &mut HashMap<String, TypeState>,
    req: DeltaDiscoveryRequest,
) {
    let error = req.error_detail.as_ref().map(|s| s.message.clone());
    cp.record(Seen {
        stream,
        delta: true,
        node_id: node_id.to_string(),
        type_url: req.type_url.clone(),
        version_info: String::new(),
        response_nonce: req.response_nonce.clone(),
        names: req.resource_names_subscribe.clone(),
        unsubscribe: req.resource_names_unsubscribe.clone(),
        initial_versions: req
            .initial_resource_versions
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        error: error.clone(),
        stale: false,
    });
    if let Some(detail) = &error {
        tracing::warn!(stream, node = node_id, type_url = %req.type_url, nonce = %req.response_nonce,
            "control plane: NACK: {detail}");
    }
    let st = types.entry(req.type_url.clone()).or_default();
    if !st.started {
        st.started = true;
        st.held = req.initial_resource_versions;
        // A first request that names nothing is the legacy wildcard, for LDS/CDS only.
        st.wildcard = is_wildcard(&req.type_url) && req.resource_names_subscribe.is_empty();
    }
    for n in req.resource_names_subscribe {
        if n == "*" {
            st.wildcard = true;
        } else {
            st.names.insert(n);
        }
    }
    for n in req.resource_names_unsubscribe {
        if n == "*" {
            st.wildcard = false;
        } else {
            st.names.remove(&n);
            // The client forgets it; a later subscribe must send it again.
            st.held.remove(&n);
        }
    }
    if !st.wildcard {
        let names = &st.names;
        st.held.retain(|n, _| names.contains(n));
    }
}

/// What the client lacks or holds too much of for one type, as a response.
fn diff(
    cp: &ControlPlane,
    type_url: &str,
    st: &mut TypeState,
    snap: &Snapshot,
) -> Option<DeltaDiscoveryResponse> {
    let all = snap.resources.get(type_url);
    let mut resources = Vec::new();
    for (name, body) in selected(all, st.wildcard, &st.names) {
        let version = resource_version(body);
        if st.held.get(name) != Some(&version) {
            st.held.insert(name.clone(), version.clone());
            resources.push(discovery::Resource {
                name: name.clone(),
                version,
                resource: Some(body.clone()),
                ..Default::default()
            });
        }
    }
    let mut removed: Vec<String> = st
        .held
        .keys()
        .filter(|n| !all.is_some_and(|m| m.contains_key(*n)))
        .cloned()
        .collect();
    removed.sort();
    for n in &removed {
        st.held.remove(n);
    }
    if resources.is_empty() && removed.is_empty() {
        return None;
    }
    Some(DeltaDiscoveryResponse {
        system_version_info: snap.version.to_string(),
        resources,
        type_url: type_url.to_string(),
        removed_resources: removed,
        nonce: cp.next_nonce(),
        ..Default::default()
    })
}
