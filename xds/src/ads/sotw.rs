//! State-of-the-world ADS: one `DiscoveryRequest` per type to subscribe, then an ACK or NACK for
//! every response, and a new request whenever the RDS/EDS names change.

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::client::{off_worker, open, StreamCtx, StreamEnd};
use super::resource::{check_resources, nack_status, node, unwrap_sotw};
use super::{is_wildcard, Update, TYPE_ORDER};

#[derive(Default)]
struct TypeState {
    nonce: String,
    names: BTreeSet<String>,
    /// A request went out on this stream (RDS/EDS wait for names before the first one).
    requested: bool,
}

pub(crate) async fn run(
    mut ctx: StreamCtx<'_>,
    versions: &mut HashMap<String, String>,
) -> Result<StreamEnd, String> {
    let (tx, rx) = mpsc::unbounded_channel::<DiscoveryRequest>();
    let mut subs = ctx.handler.subscriptions();
    let mut types: HashMap<&'static str, TypeState> = HashMap::new();
    let mut node = Some(node(&ctx.cfg.node));
    {
        let wanted = subs.borrow_and_update().clone();
        for t in TYPE_ORDER {
            let st = types.entry(t).or_default();
            if !is_wildcard(t) {
                st.names = wanted.get(t).cloned().unwrap_or_default();
                if st.names.is_empty() {
                    continue;
                }
            }
            st.requested = true;
            let _ = tx.send(DiscoveryRequest {
                version_info: versions.get(t).cloned().unwrap_or_default(),
                node: node.take(),
                resource_names: st.names.iter().cloned().collect(),
                type_url: t.to_string(),
                ..Default::default()
            });
        }
    }
    let mut stream = open(
        ctx.cfg,
        ctx.client
            .stream_aggregated_resources(UnboundedReceiverStream::new(rx)),
    )
    .await?;
    ctx.set_connected();
    let mut got_response = false;
    let mut subs_open = true;
    loop {
        tokio::select! {
            msg = stream.message() => {
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ok(end(got_response, "server closed the stream")),
                    Err(s) => return Ok(end(got_response, &format!("{}: {}", s.code(), s.message()))),
                };
                got_response = true;
                let req = off_worker(|| respond(&ctx, versions, &mut types, resp, &mut node));
                if tx.send(req).is_err() {
                    return Ok(end(got_response, "request stream closed"));
                }
            }
            changed = subs.changed(), if subs_open => {
                if changed.is_err() {
                    // The handler dropped its sender: names can no longer change.
                    subs_open = false;
                    continue;
                }
                let wanted = subs.borrow_and_update().clone();
                for t in TYPE_ORDER.iter().copied().filter(|t| !is_wildcard(t)) {
                    let st = types.entry(t).or_default();
                    let names = wanted.get(t).cloned().unwrap_or_default();
                    if names == st.names || (!st.requested && names.is_empty()) {
                        continue;
                    }
                    // After a non-empty list, an empty one unsubscribes from everything: RDS
                    // and EDS are never wildcard.
                    st.names = names;
                    st.requested = true;
                    let _ = tx.send(DiscoveryRequest {
                        version_info: versions.get(t).cloned().unwrap_or_default(),
                        node: node.take(),
                        resource_names: st.names.iter().cloned().collect(),
                        type_url: t.to_string(),
                        response_nonce: st.nonce.clone(),
                        ..Default::default()
                    });
                }
            }
            () = &mut ctx.preempt => {
                return Ok(StreamEnd { got_response, preempted: true, reason: "preempted".into() });
            }
        }
    }
}

fn end(got_response: bool, reason: &str) -> StreamEnd {
    StreamEnd {
        got_response,
        preempted: false,
        reason: reason.to_string(),
    }
}

/// Validates and applies one response; returns its ACK or NACK.
fn respond(
    ctx: &StreamCtx<'_>,
    versions: &mut HashMap<String, String>,
    types: &mut HashMap<&'static str, TypeState>,
    resp: DiscoveryResponse,
    node: &mut Option<envoy_types::pb::envoy::config::core::v3::Node>,
) -> DiscoveryRequest {
    let type_url = resp.type_url.clone();
    let Some(st) = TYPE_ORDER
        .iter()
        .find(|t| **t == type_url)
        .and_then(|t| types.get_mut(t))
    else {
        tracing::warn!(%type_url, "ADS: NACK of a response for an unknown type");
        return DiscoveryRequest {
            type_url: type_url.clone(),
            response_nonce: resp.nonce,
            node: node.take(),
            error_detail: Some(nack_status(format!("unknown type URL {type_url}"))),
            ..Default::default()
        };
    };
    st.nonce = resp.nonce.clone();
    let previous = versions.get(&type_url).cloned().unwrap_or_default();
    let result = resp
        .resources
        .into_iter()
        .map(|a| unwrap_sotw(a).map(|a| (None, resp.version_info.clone(), a)))
        .collect::<Result<Vec<_>, _>>()
        .and_then(|items| check_resources(&type_url, items))
        .inspect_err(|_| ctx.handler.rejected(&type_url))
        .and_then(|resources| {
            ctx.handler
                .apply(&type_url, &resp.version_info, Update::State(resources))
        });
    let mut req = DiscoveryRequest {
        node: node.take(),
        resource_names: st.names.iter().cloned().collect(),
        type_url: type_url.clone(),
        response_nonce: resp.nonce,
        ..Default::default()
    };
    match result {
        Ok(()) => {
            tracing::debug!(%type_url, version = %resp.version_info, "ADS: ACK");
            versions.insert(type_url, resp.version_info.clone());
            req.version_info = resp.version_info;
        }
        Err(detail) => {
            tracing::warn!(%type_url, version = %resp.version_info, "ADS: NACK: {detail}");
            req.version_info = previous;
            req.error_detail = Some(nack_status(detail));
        }
    }
    req
}
