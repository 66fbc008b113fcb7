//! The ordered filter chain of one HTTP connection manager and the driver functions the data
//! path calls per hook. Per-hook index lists are computed once when the chain is built, so a
//! hook no filter implements costs one empty-slice check per request.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;

use crate::api::{Action, FilterContext, HeaderEdits, Hooks, HttpFilter, LocalReply};

/// One configured filter: its name (`http_filters[].name`) and the built filter.
#[derive(Clone)]
pub struct ChainEntry {
    pub name: Arc<str>,
    pub filter: Arc<dyn HttpFilter>,
    /// `http_filters[].disabled`: skipped unless a route enables it with a per-route config.
    pub disabled_by_default: bool,
}

impl std::fmt::Debug for ChainEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainEntry")
            .field("name", &self.name)
            .field("hooks", &self.filter.hooks())
            .field("disabled_by_default", &self.disabled_by_default)
            .finish()
    }
}

/// What happened to a body chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFlow {
    /// Forward the (possibly replaced) chunk.
    Forward,
    /// A filter kept the chunk; forward nothing now.
    Held,
}

const HOOKS: [Hooks; 6] = [
    Hooks::REQUEST_HEADERS,
    Hooks::REQUEST_BODY,
    Hooks::REQUEST_TRAILERS,
    Hooks::RESPONSE_HEADERS,
    Hooks::RESPONSE_BODY,
    Hooks::RESPONSE_TRAILERS,
];

enum Target<'a> {
    ReqHeaders(&'a mut http::request::Parts),
    ReqBody(&'a mut Bytes, bool),
    ReqTrailers(&'a mut HeaderMap),
    RespHeaders(&'a mut http::response::Parts),
    RespBody(&'a mut Bytes, bool),
    RespTrailers(&'a mut HeaderMap),
}

impl Target<'_> {
    fn call(&mut self, f: &dyn HttpFilter, ctx: &mut FilterContext) -> Action {
        match self {
            Target::ReqHeaders(p) => f.on_request_headers(ctx, p),
            Target::ReqBody(b, eos) => f.on_request_body(ctx, b, *eos),
            Target::ReqTrailers(t) => f.on_request_trailers(ctx, t),
            Target::RespHeaders(p) => f.on_response_headers(ctx, p),
            Target::RespBody(b, eos) => f.on_response_body(ctx, b, *eos),
            Target::RespTrailers(t) => f.on_response_trailers(ctx, t),
        }
    }

    fn edit(&mut self, edits: &HeaderEdits, ctx: &mut FilterContext) {
        match self {
            Target::ReqHeaders(p) => edits.apply(&mut p.headers),
            Target::ReqTrailers(t) | Target::RespTrailers(t) => edits.apply(t),
            Target::RespHeaders(p) => edits.apply(&mut p.headers),
            Target::ReqBody(..) | Target::RespBody(..) => {}
        }
        ctx.pending_response_headers
            .extend(edits.response_headers.iter().cloned());
    }
}

/// An immutable, ordered chain of built filters, shared by all requests of a config snapshot.
/// The router is not part of it: it is the data path's terminal step.
#[derive(Debug, Clone, Default)]
pub struct FilterChain {
    entries: Vec<ChainEntry>,
    /// For each hook (in `HOOKS` order), the positions of the filters implementing it.
    by_hook: [Vec<u16>; 6],
}

impl FilterChain {
    pub fn new(entries: Vec<ChainEntry>) -> Self {
        let mut by_hook: [Vec<u16>; 6] = Default::default();
        for (i, e) in entries.iter().enumerate() {
            let hooks = e.filter.hooks();
            for (h, list) in HOOKS.iter().zip(by_hook.iter_mut()) {
                if hooks.contains(*h) {
                    // A chain longer than u16::MAX filters is not a configuration anyone writes;
                    // saturate instead of panicking.
                    list.push(u16::try_from(i).unwrap_or(u16::MAX));
                }
            }
        }
        FilterChain { entries, by_hook }
    }

    pub fn entries(&self) -> &[ChainEntry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether any filter implements `hook`; lets the data path skip wrapping bodies at all.
    pub fn has_hook(&self, hook: Hooks) -> bool {
        HOOKS
            .iter()
            .zip(self.by_hook.iter())
            .any(|(h, list)| hook.contains(*h) && !list.is_empty())
    }

    async fn drive(
        &self,
        hook: usize,
        reverse: bool,
        ctx: &mut FilterContext,
        mut target: Target<'_>,
    ) -> Result<BodyFlow, LocalReply> {
        let list = &self.by_hook[hook];
        if list.is_empty() {
            return Ok(BodyFlow::Forward);
        }
        let n = list.len();
        for k in 0..n {
            let pos = usize::from(if reverse { list[n - 1 - k] } else { list[k] });
            let Some(entry) = self.entries.get(pos) else {
                continue;
            };
            let per_route = ctx.per_route();
            let disabled = per_route
                .and_then(|p| p.disabled(&entry.name))
                .unwrap_or(entry.disabled_by_default);
            if disabled {
                continue;
            }
            // The name is only needed to look up per-route configs; skip the refcount otherwise.
            let has_per_route = per_route.is_some();
            ctx.current = pos;
            if has_per_route {
                ctx.current_name = Some(entry.name.clone());
            }
            let mut action = target.call(entry.filter.as_ref(), ctx);
            // A waiting future may itself resolve to another wait; each is awaited in turn.
            loop {
                match action {
                    Action::Continue => break,
                    Action::ContinueWith(edits) => {
                        target.edit(&edits, ctx);
                        break;
                    }
                    Action::Reply(reply) => return Err(*reply),
                    Action::StopAndBuffer => match target {
                        Target::ReqBody(..) | Target::RespBody(..) => return Ok(BodyFlow::Held),
                        _ => break,
                    },
                    Action::Wait(fut) => action = fut.await,
                }
            }
        }
        Ok(BodyFlow::Forward)
    }

    /// Runs the request-header hooks in order. `Err` is the local reply to send instead of
    /// forwarding; the data path then runs the response hooks on that reply.
    pub async fn run_request_headers(
        &self,
        ctx: &mut FilterContext,
        req: &mut http::request::Parts,
    ) -> Result<(), LocalReply> {
        self.drive(0, false, ctx, Target::ReqHeaders(req))
            .await
            .map(drop)
    }

    /// Runs the request-body hooks on one chunk. Call with `end_of_stream = true` exactly once
    /// when no more data follows (with an empty chunk if the last data frame was already seen),
    /// before the trailers hook.
    pub async fn run_request_body(
        &self,
        ctx: &mut FilterContext,
        chunk: &mut Bytes,
        end_of_stream: bool,
    ) -> Result<BodyFlow, LocalReply> {
        self.drive(1, false, ctx, Target::ReqBody(chunk, end_of_stream))
            .await
    }

    pub async fn run_request_trailers(
        &self,
        ctx: &mut FilterContext,
        trailers: &mut HeaderMap,
    ) -> Result<(), LocalReply> {
        self.drive(2, false, ctx, Target::ReqTrailers(trailers))
            .await
            .map(drop)
    }

    /// Runs the response-header hooks in reverse order, after adding headers that waiting
    /// request filters asked for (`HeaderEdits::response_headers`).
    pub async fn run_response_headers(
        &self,
        ctx: &mut FilterContext,
        resp: &mut http::response::Parts,
    ) -> Result<(), LocalReply> {
        for (name, value) in ctx.pending_response_headers.drain(..) {
            resp.headers.append(name, value);
        }
        self.drive(3, true, ctx, Target::RespHeaders(resp))
            .await
            .map(drop)
    }

    pub async fn run_response_body(
        &self,
        ctx: &mut FilterContext,
        chunk: &mut Bytes,
        end_of_stream: bool,
    ) -> Result<BodyFlow, LocalReply> {
        self.drive(4, true, ctx, Target::RespBody(chunk, end_of_stream))
            .await
    }

    pub async fn run_response_trailers(
        &self,
        ctx: &mut FilterContext,
        trailers: &mut HeaderMap,
    ) -> Result<(), LocalReply> {
        self.drive(5, true, ctx, Target::RespTrailers(trailers))
            .await
            .map(drop)
    }
}
