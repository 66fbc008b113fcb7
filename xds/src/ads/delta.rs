//! Incremental (Delta) ADS: subscribe and unsubscribe by name, announce what is held on every
//! new stream (`initial_resource_versions`), ACK or NACK every response by nonce.

use std::collections::{BTreeSet, HashMap, HashSet};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::client::{off_worker, open, StreamCtx, StreamEnd};
use super::resource::{check_resources, nack_status, node};
use super::{is_wildcard, Update, TYPE_ORDER};

pub(crate) async fn run(mut ctx: StreamCtx<'_>) -> Result<StreamEnd, String> {
    let (tx, rx) = mpsc::unbounded_channel::<DeltaDiscoveryRequest>();
    let mut subs = ctx.handler.subscriptions();
    // Names subscribed on this stream, for RDS/EDS.
    let mut names: HashMap<&'static str, BTreeSet<String>> = HashMap::new();
    let mut node = Some(node(&ctx.cfg.node));
    {
        let wanted = subs.borrow_and_update().clone();
        for t in TYPE_ORDER {
            let mut held = ctx.handler.versions(t);
            let subscribe = if is_wildcard(t) {
                // An empty first subscribe list is the (legacy) wildcard every server knows.
                Vec::new()
            } else {
                let n = wanted.get(t).cloned().unwrap_or_default();
                if n.is_empty() {
                    continue;
                }
                held.retain(|k, _| n.contains(k));
                let list = n.iter().cloned().collect();
                names.insert(t, n);
                list
            };
            let _ = tx.send(DeltaDiscoveryRequest {
                node: node.take(),
                type_url: t.to_string(),
                resource_names_subscribe: subscribe,
                initial_resource_versions: held,
                ..Default::default()
            });
        }
    }
    let mut stream = open(
        ctx.cfg,
        ctx.client
            .delta_aggregated_resources(UnboundedReceiverStream::new(rx)),
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
                let mut req = off_worker(|| respond(&ctx, resp));
                req.node = node.take();
                if tx.send(req).is_err() {
                    return Ok(end(got_response, "request stream closed"));
                }
            }
            changed = subs.changed(), if subs_open => {
                if changed.is_err() {
                    subs_open = false;
                    continue;
                }
                let wanted = subs.borrow_and_update().clone();
                for t in TYPE_ORDER.iter().copied().filter(|t| !is_wildcard(t)) {
                    let now = wanted.get(t).cloned().unwrap_or_default();
                    let before = names.entry(t).or_default();
                    let subscribe: Vec<String> = now.difference(before).cloned().collect();
                    let unsubscribe: Vec<String> = before.difference(&now).cloned().collect();
                    if subscribe.is_empty() && unsubscribe.is_empty() {
                        continue;
                    }
                    *before = now;
                    let _ = tx.send(DeltaDiscoveryRequest {
                        node: node.take(),
                        type_url: t.to_string(),
                        resource_names_subscribe: subscribe,
                        resource_names_unsubscribe: unsubscribe,
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

fn respond(ctx: &StreamCtx<'_>, resp: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    let type_url = resp.type_url.clone();
    let mut req = DeltaDiscoveryRequest {
        type_url: type_url.clone(),
        response_nonce: resp.nonce.clone(),
        ..Default::default()
    };
    let result = if !TYPE_ORDER.contains(&type_url.as_str()) {
        Err(format!("unknown type URL {type_url}"))
    } else {
        decode(&type_url, resp)
            .inspect_err(|_| ctx.handler.rejected(&type_url))
            .and_then(|(version, update)| ctx.handler.apply(&type_url, &version, update))
    };
    match result {
        Ok(()) => tracing::debug!(%type_url, "ADS: ACK"),
        Err(detail) => {
            tracing::warn!(%type_url, "ADS: NACK: {detail}");
            req.error_detail = Some(nack_status(detail));
        }
    }
    req
}

fn decode(type_url: &str, resp: DeltaDiscoveryResponse) -> Result<(String, Update), String> {
    let mut items = Vec::with_capacity(resp.resources.len());
    for (i, r) in resp.resources.into_iter().enumerate() {
        let body = r
            .resource
            .ok_or_else(|| format!("resources[{i}] ({:?}): no resource body", r.name))?;
        items.push((Some(r.name), r.version, body));
    }
    let added = check_resources(type_url, items)?;
    let added_names: HashSet<&str> = added.iter().map(|r| r.name.as_str()).collect();
    let mut removed_seen = HashSet::new();
    for (i, name) in resp.removed_resources.iter().enumerate() {
        if added_names.contains(name.as_str()) {
            return Err(format!(
                "removed_resources[{i}]: {name:?} is also in resources"
            ));
        }
        if !removed_seen.insert(name.as_str()) {
            return Err(format!("removed_resources[{i}]: duplicate name {name:?}"));
        }
    }
    Ok((
        resp.system_version_info,
        Update::Delta {
            added,
            removed: resp.removed_resources,
        },
    ))
}
