//! One SotW ADS stream on the server side.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::{mpsc, watch};

use super::{selected, ControlPlane, Seen, Snapshot};
use crate::ads::is_wildcard;

#[derive(Default)]
struct TypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// Last nonce sent; a request answering another one is stale.
    nonce: String,
    /// What the last response carried, to skip pushes that change nothing for this stream.
    sent: Option<Vec<(String, Vec<u8>)>>,
}

pub(super) async fn run(
    cp: ControlPlane,
    stream: u64,
    mut requests: tonic::Streaming<DiscoveryRequest>,
    tx: mpsc::Sender<Result<DiscoveryResponse, tonic::Status>>,
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
                        tracing::debug!(stream, "control plane: SotW stream error: {s}");
                        return;
                    }
                };
                if let Some(n) = &req.node {
                    node_id = n.id.clone();
                }
                // Not marked seen: a push racing this request must still reach the other types.
                let snap = snapshots.borrow().clone();
                if let Some(resp) = on_request(&cp, stream, &node_id, &mut types, &snap, req) {
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                let snap = snapshots.borrow_and_update().clone();
                let mut urls: Vec<String> = types.keys().cloned().collect();
                urls.sort_by_key(|t| order(t));
                for t in urls {
                    let Some(st) = types.get_mut(&t) else { continue };
                    if let Some(resp) = respond(&cp, &t, st, &snap, false) {
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

/// Envoy's subscription order, so pushes go out make-before-break (CDS, EDS, LDS, RDS).
fn order(type_url: &str) -> usize {
    crate::ads::TYPE_ORDER
        .iter()
        .position(|t| *t == type_url)
        .unwrap_or(usize::MAX)
}

fn on_request(
    cp: &ControlPlane,
    stream: u64,
    node_id: &str,
    types: &mut HashMap<String, TypeState>,
    snap: &Arc<Snapshot>,
    req: DiscoveryRequest,
) -> Option<DiscoveryResponse> {
    let st = types.entry(req.type_url.clone()).or_default();
    let stale = !req.response_nonce.is_empty() && req.response_nonce != st.nonce;
    let error = req.error_detail.as_ref().map(|s| s.message.clone());
    cp.record(Seen {
        stream,
        delta: false,
        node_id: node_id.to_string(),
        type_url: req.type_url.clone(),
        version_info: req.version_info.clone(),
        response_nonce: req.response_nonce.clone(),
        names: req.resource_names.clone(),
        unsubscribe: Vec::new(),
        initial_versions: Default::default(),
        error: error.clone(),
        stale,
    });
    if stale {
        // The xDS spec: a server ignores requests answering superseded responses; the client
        // will answer the newer one.
        tracing::debug!(stream, type_url = %req.type_url, "control plane: stale nonce ignored");
        return None;
    }
    if let Some(detail) = &error {
        tracing::warn!(stream, node = node_id, type_url = %req.type_url, version = %req.version_info,
            "control plane: NACK: {detail}");
    }
    let names: BTreeSet<String> = req.resource_names.into_iter().collect();
    let wildcard = is_wildcard(&req.type_url) && (names.is_empty() || names.contains("*"));
    let first = req.response_nonce.is_empty();
    let changed = wildcard != st.wildcard || names != st.names;
    st.wildcard = wildcard;
    st.names = names;
    if first || changed {
        respond(cp, &req.type_url, st, snap, true)
    } else {
        None
    }
}

/// The response for one type if the stream should get one: always when `force` (a new or
/// changed subscription), otherwise only when the selected resources changed. Named types
/// (RDS/EDS) with nothing to send get nothing: omission is not removal for them.
fn respond(
    cp: &ControlPlane,
    type_url: &str,
    st: &mut TypeState,
    snap: &Snapshot,
    force: bool,
) -> Option<DiscoveryResponse> {
    let chosen: Vec<(String, Vec<u8>)> =
        selected(snap.resources.get(type_url), st.wildcard, &st.names)
            .map(|(n, a)| (n.clone(), a.value.clone()))
            .collect();
    if !st.wildcard && chosen.is_empty() {
        return None;
    }
    if !force && st.sent.as_ref() == Some(&chosen) {
        return None;
    }
    let resources = selected(snap.resources.get(type_url), st.wildcard, &st.names)
        .map(|(_, a)| a.clone())
        .collect();
    st.nonce = cp.next_nonce();
    st.sent = Some(chosen);
    Some(DiscoveryResponse {
        version_info: snap.version.to_string(),
        resources,
        type_url: type_url.to_string(),
        nonce: st.nonce.clone(),
        ..Default::default()
    })
}
