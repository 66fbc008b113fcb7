//! `envoy.filters.http.buffer`: holds the whole request body before forwarding it, answering
//! 413 once it would exceed `max_request_bytes`. Chunks are kept as `Bytes` (no copy) until the
//! end of the stream, then joined once.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use envoy_types::pb::envoy::extensions::filters::http::buffer::v3::{
    buffer_per_route::Override, Buffer, BufferPerRoute,
};
use http::StatusCode;
use prost::Name;

use crate::api::{Action, FilterContext, Hooks, HttpFilter, LocalReply, PerRoute};
use crate::convert::{invalid, Result};
use crate::registry::{decode, per_route, BuildContext, FilterConfigError, FilterFactory};

pub const TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer";
pub const PER_ROUTE_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute";

#[derive(Debug)]
pub struct BufferFilter {
    max_request_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct RouteMax(u64);

fn max_bytes(b: &Buffer, path: &str) -> Result<u64> {
    let Buffer { max_request_bytes } = b;
    match max_request_bytes {
        Some(v) if v.value > 0 => Ok(u64::from(v.value)),
        _ => Err(invalid(
            path,
            "max_request_bytes",
            "required and must be greater than 0",
        )),
    }
}

/// Chunks held so far for one request.
#[derive(Default)]
struct Held {
    chunks: Vec<Bytes>,
    len: u64,
}

fn too_large() -> Action {
    Action::reply(LocalReply::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "Payload Too Large",
        "request_payload_too_large",
    ))
}

impl BufferFilter {
    fn limit(&self, ctx: &FilterContext) -> u64 {
        ctx.route_config::<RouteMax>()
            .map_or(self.max_request_bytes, |r| r.0)
    }
}

impl HttpFilter for BufferFilter {
    fn hooks(&self) -> Hooks {
        Hooks::REQUEST_HEADERS | Hooks::REQUEST_BODY
    }

    fn on_request_headers(
        &self,
        ctx: &mut FilterContext,
        req: &mut http::request::Parts,
    ) -> Action {
        // A declared length over the limit cannot succeed; answer before reading the body.
        let declared = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(n) if n > self.limit(ctx) => too_large(),
            _ => Action::Continue,
        }
    }

    fn on_request_body(
        &self,
        ctx: &mut FilterContext,
        chunk: &mut Bytes,
        end_of_stream: bool,
    ) -> Action {
        let limit = self.limit(ctx);
        let held = ctx.local::<Held>();
        held.len += chunk.len() as u64;
        if held.len > limit {
            held.chunks.clear();
            return too_large();
        }
        if !chunk.is_empty() {
            held.chunks.push(std::mem::take(chunk));
        }
        if !end_of_stream {
            return Action::StopAndBuffer;
        }
        let chunks = std::mem::take(&mut held.chunks);
        *chunk = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.into_iter().next().unwrap_or_default(),
            _ => {
                let mut all = BytesMut::with_capacity(usize::try_from(held.len).unwrap_or(0));
                for c in chunks {
                    all.extend_from_slice(&c);
                }
                all.freeze()
            }
        };
        Action::Continue
    }
}

pub struct Factory;

impl FilterFactory for Factory {
    fn type_url(&self) -> &'static str {
        TYPE_URL
    }

    fn per_route_type_urls(&self) -> &'static [&'static str] {
        &[PER_ROUTE_TYPE_URL]
    }

    fn build(
        &self,
        value: &[u8],
        path: &str,
        _cx: &BuildContext<'_>,
    ) -> std::result::Result<Arc<dyn HttpFilter>, FilterConfigError> {
        let cfg: Buffer = decode(value, path)?;
        Ok(Arc::new(BufferFilter {
            max_request_bytes: max_bytes(&cfg, path)?,
        }))
    }

    fn build_per_route(
        &self,
        _type_url: &str,
        value: &[u8],
        path: &str,
        _cx: &BuildContext<'_>,
    ) -> std::result::Result<PerRoute, FilterConfigError> {
        debug_assert_eq!(BufferPerRoute::type_url(), PER_ROUTE_TYPE_URL);
        let BufferPerRoute { r#override } = decode(value, path)?;
        match r#override {
            Some(Override::Disabled(true)) => Ok(PerRoute {
                config: None,
                disabled: Some(true),
            }),
            Some(Override::Disabled(false)) => {
                Err(invalid(path, "disabled", "must be true when set"))
            }
            Some(Override::Buffer(b)) => Ok(per_route(RouteMax(max_bytes(
                &b,
                &format!("{path}.buffer"),
            )?))),
            None => Err(invalid(
                path,
                "override",
                "one of disabled, buffer is required",
            )),
        }
    }
}
