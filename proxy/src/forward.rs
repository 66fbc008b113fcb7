//! The router filter: per request, header hygiene, route selection, local replies, cluster and
//! host choice, upstream attempts with Envoy's timeouts and retries, response header changes,
//! HTTP/1.1 upgrades, stats and the access-log record when the stream ends.
//! Reads one config snapshot per request; bodies stream both ways, never fully buffered.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use strait_filters::{FilterChain, FilterContext, Hooks, LocalReply};
use strait_xds::model::{
    self, ClusterSpecifier, HostRewrite, RetryOn, RetryPolicy, RouteAction, ServerHeader,
};

use crate::access_log::Record;
use crate::body::{
    self, AttemptBody, BoxError, Downstream, FilteredRequest, FilteredResponse, Inbound, ProxyBody,
    ReplySlot, RequestSource, SharedFilterContext,
};
use crate::cluster::{Breakers, ClusterState, Host};
use crate::h1client::RawFields;
use crate::headers;
use crate::local_reply::{self, ResetReason};
use crate::pool::{Lease, PoolError, SendError, Sender};
use crate::response_flags::ResponseFlags;
use crate::router::{self, Selected};
use crate::server::{ListenerRuntime, ServerShared};
use crate::stream_timer::{ConnTimers, Expired, StreamTimer};

/// Envoy's default `per_connection_buffer_limit_bytes` (1 MiB), which also bounds the request
/// body the router keeps for retries; a larger body is not retried.
pub const RETRY_BUFFER_LIMIT: usize = 1024 * 1024;
const X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
const X_ENVOY_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");

/// What a request needs to know about its connection.
pub struct ConnCtx {
    pub listener: Arc<ListenerRuntime>,
    pub server: Arc<ServerShared>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// Spare stream timers: the connection's own, then those shared by the connections of one
    /// accept loop (one worker's listener socket), reused by their next streams.
    pub timers: ConnTimers,
    /// HTTP/1: the in-flight stream's idle timeout and route deadline, for writes the client
    /// does not take.
    pub write_stall: crate::conn::WriteStall,
}

// === Finisher: the stream's record, completed when the response ends ===

struct Finisher {
    cx: Arc<ConnCtx>,
    start: Instant,
    start_time: SystemTime,
    method: Method,
    path: String,
    authority: String,
    version: Version,
    request_headers: Option<HeaderMap>,
    status: u16,
    response_headers: Option<HeaderMap>,
    response_trailers: Option<HeaderMap>,
    flags: ResponseFlags,
    /// `x-envoy-upstream-service-time` in milliseconds, when the downstream HTTP/1.1 codec
    /// writes it after the response's headers instead of it being in them.
    service_time_ms: Option<u64>,
    /// The upstream response's fields, when the downstream HTTP/1.1 codec writes them as
    /// received instead of them being in the response's map.
    raw_fields: Option<Box<RawFields>>,
    details: Cow<'static, str>,
    source: Option<RequestSource>,
    /// Route, request and stream idle timeouts, while they apply.
    timer: StreamTimer,
    /// When the response's headers arrived.
    response_at: Option<Instant>,
    upstream_host: Option<Arc<Host>>,
    cluster: Option<Arc<ClusterState>>,
    transport_failure: Option<String>,
    upstream_local: Option<SocketAddr>,
    route_name: String,
    client: SocketAddr,
    bytes_sent: u64,
    rq: Option<RqGuard>,
    lease: Option<Lease>,
    /// The request's filter chain and context; dropped when the stream ends.
    filters: Option<FilterRun>,
    done: bool,
}

impl Drop for Finisher {
    fn drop(&mut self) {
        // Dropped unfinished: the downstream went away (connection closed, or on HTTP/2 the
        // stream reset) before a response was produced. Envoy still counts and logs it (code 0,
        // `DC`, or `DR` for a reset stream).
        if !self.done {
            self.finish(Outcome::DownstreamGone);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Complete,
    UpstreamError,
    Timeout,
    IdleTimeout,
    DownstreamGone,
}

impl Finisher {
    fn new(cx: Arc<ConnCtx>, parts: &Parts) -> Finisher {
        let peer = cx.peer;
        let logging = cx.listener.access_log.is_some();
        // Only the access log reads these copies.
        let (path, authority) = if logging {
            (
                parts
                    .uri
                    .path_and_query()
                    .map_or_else(|| "/".to_string(), |pq| pq.as_str().to_string()),
                OrigAuthority::of(parts).as_str().to_string(),
            )
        } else {
            (String::new(), String::new())
        };
        Finisher {
            cx,
            start: Instant::now(),
            // Only the access log prints the wall-clock start.
            start_time: if logging {
                SystemTime::now()
            } else {
                SystemTime::UNIX_EPOCH
            },
            method: parts.method.clone(),
            path,
            authority,
            version: parts.version,
            request_headers: None,
            status: 0,
            response_headers: None,
            response_trailers: None,
            flags: ResponseFlags::default(),
            service_time_ms: None,
            raw_fields: None,
            details: Cow::Borrowed(""),
            source: None,
            timer: StreamTimer::default(),
            response_at: None,
            upstream_host: None,
            cluster: None,
            transport_failure: None,
            upstream_local: None,
            route_name: String::new(),
            client: peer,
            bytes_sent: 0,
            rq: None,
            lease: None,
            filters: None,
            done: false,
        }
    }

    fn logging(&self) -> bool {
        self.cx.listener.access_log.is_some()
    }

    /// Ready once one of the stream's timeouts expires.
    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<Expired> {
        match &self.source {
            Some(src) => self.timer.poll_expired(src, cx),
            None => Poll::Pending,
        }
    }

    fn finish(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        // The stream is over: its route timeout no longer bounds the connection's writes.
        if self.version != Version::HTTP_2 {
            self.cx.write_stall.set_route_deadline(None);
        }
        let hs = &self.cx.listener.http_stats;
        hs.downstream_rq_active.dec();
        match outcome {
            Outcome::Complete => {
                if let Some(h) = &self.upstream_host {
                    if self.status >= 500 {
                        h.stats.rq_error.inc();
                    } else {
                        h.stats.rq_success.inc();
                    }
                }
            }
            Outcome::UpstreamError => {
                self.flags.set(ResponseFlags::UPSTREAM_REMOTE_RESET);
                if let Some(h) = &self.upstream_host {
                    h.stats.rq_error.inc();
                }
                hs.downstream_rq_tx_reset.inc();
            }
            Outcome::Timeout => {
                self.flags.set(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
                if let Some(c) = &self.cluster {
                    c.stats().upstream_rq_timeout.inc();
                }
                if let Some(h) = &self.upstream_host {
                    h.stats.rq_timeout.inc();
                }
                hs.downstream_rq_tx_reset.inc();
            }
            Outcome::IdleTimeout => {
                self.flags.set(ResponseFlags::STREAM_IDLE_TIMEOUT);
                hs.downstream_rq_idle_timeout.inc();
                hs.downstream_rq_tx_reset.inc();
            }
            Outcome::DownstreamGone => {
                if crate::h2server::dropping_for_peer_reset() {
                    // Envoy: a stream reset by the client is `DR`, `http2.remote_reset`.
                    self.flags.set(ResponseFlags::DOWNSTREAM_REMOTE_RESET);
                    self.details = Cow::Borrowed("http2.remote_reset");
                    hs.downstream_rq_rx_reset.inc();
                } else if crate::h2server::dropping_for_protocol_error() {
                    // Strait reset the stream: the client broke HTTP/2 on it (Envoy's `DPE`).
                    self.flags.set(ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR);
                    self.details = Cow::Borrowed("http2.protocol_error");
                    hs.downstream_rq_tx_reset.inc();
                } else {
                    self.flags
                        .set(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION);
                    hs.downstream_rq_rx_reset.inc();
                }
                if let Some(c) = &self.cluster {
                    if self.rq.is_some() {
                        c.stats().upstream_rq_cancelled.inc();
                    }
                }
            }
        }
        // Release the upstream connection and request slot before logging; the filter context
        // ends with the stream (the fault filter's active_faults counts it).
        self.lease.take();
        self.rq.take();
        self.filters.take();
        self.timer.release(&self.cx.timers);
        let Some(logger) = self.cx.listener.access_log.clone() else {
            return;
        };
        let empty = HeaderMap::new();
        let rec = Record {
            start_time: self.start_time,
            method: &self.method,
            path: &self.path,
            authority: &self.authority,
            scheme: "http",
            version: self.version,
            request_headers: self.request_headers.as_ref().unwrap_or(&empty),
            response_code: self.status,
            response_headers: self.response_headers.as_ref(),
            response_trailers: self.response_trailers.as_ref(),
            response_flags: self.flags,
            response_code_details: &self.details,
            bytes_received: self.source.as_ref().map_or(0, |s| s.bytes_received()),
            bytes_sent: self.bytes_sent,
            duration: self.start.elapsed(),
            request_duration: self
                .source
                .as_ref()
                .and_then(|s| s.end().when())
                .map(|t| t.saturating_duration_since(self.start)),
            response_duration: self
                .response_at
                .map(|t| t.saturating_duration_since(self.start)),
            upstream_host: self.upstream_host.as_ref().map(|h| h.address),
            upstream_cluster: self.cluster.as_ref().map(|c| c.name()),
            upstream_local_address: self.upstream_local,
            upstream_transport_failure_reason: self.transport_failure.as_deref(),
            downstream_remote_address: self.client,
            downstream_direct_remote_address: self.cx.peer,
            downstream_local_address: self.cx.local,
            route_name: &self.route_name,
        };
        logger.log(&rec);
    }
}

/// The request's authority as received (`:authority`, else `Host`), kept without copying: the
/// upstream `Host` unless the route rewrites it.
#[derive(Clone)]
enum OrigAuthority {
    Uri(http::uri::Authority),
    Host(HeaderValue),
    Missing,
}

impl OrigAuthority {
    fn of(parts: &Parts) -> OrigAuthority {
        if let Some(a) = parts.uri.authority() {
            OrigAuthority::Uri(a.clone())
        } else if let Some(h) = parts.headers.get(header::HOST) {
            OrigAuthority::Host(h.clone())
        } else {
            OrigAuthority::Missing
        }
    }

    fn as_str(&self) -> &str {
        match self {
            OrigAuthority::Uri(a) => a.as_str(),
            OrigAuthority::Host(h) => h.to_str().unwrap_or(""),
            OrigAuthority::Missing => "",
        }
    }

    fn header_value(&self) -> Option<HeaderValue> {
        match self {
            OrigAuthority::Uri(a) => HeaderValue::from_str(a.as_str()).ok(),
            // An invalid (non-visible-ASCII) Host was sent upstream as an empty one before.
            OrigAuthority::Host(h) if h.to_str().is_ok() => Some(h.clone()),
            OrigAuthority::Host(_) | OrigAuthority::Missing => Some(HeaderValue::from_static("")),
        }
    }
}

/// One upstream request's hold on the cluster's request breaker and active-request gauges.
struct RqGuard {
    cluster: Arc<ClusterState>,
    host: Arc<Host>,
    priority: model::RoutingPriority,
}

impl RqGuard {
    fn new(
        cluster: Arc<ClusterState>,
        host: Arc<Host>,
        priority: model::RoutingPriority,
    ) -> RqGuard {
        host.stats.rq_active.inc();
        cluster.stats().upstream_rq_active.inc();
        RqGuard {
            cluster,
            host,
            priority,
        }
    }
}

impl Drop for RqGuard {
    fn drop(&mut self) {
        self.host.stats.rq_active.dec();
        self.cluster.stats().upstream_rq_active.dec();
        Breakers::release(&priority_breakers(&self.cluster, self.priority).requests);
    }
}

// === HTTP filters around the router ===

/// The filter context, owned by the request path, or shared with the bodies when the chain has
/// body or trailer hooks (the upstream connection polls the request body while the response
/// side waits). Only the shared form allocates; the owned one lives in the boxed `Finisher`.
#[allow(clippy::large_enum_variant)]
enum Fcx {
    Owned(FilterContext),
    Shared(SharedFilterContext),
}

enum FcxGuard<'a> {
    Owned(&'a mut FilterContext),
    Locked(tokio::sync::MutexGuard<'a, FilterContext>),
}

impl std::ops::Deref for FcxGuard<'_> {
    type Target = FilterContext;
    fn deref(&self) -> &FilterContext {
        match self {
            FcxGuard::Owned(c) => c,
            FcxGuard::Locked(g) => g,
        }
    }
}

impl std::ops::DerefMut for FcxGuard<'_> {
    fn deref_mut(&mut self) -> &mut FilterContext {
        match self {
            FcxGuard::Owned(c) => c,
            FcxGuard::Locked(g) => g,
        }
    }
}

impl Fcx {
    async fn lock(&mut self) -> FcxGuard<'_> {
        match self {
            Fcx::Owned(c) => FcxGuard::Owned(c),
            Fcx::Shared(m) => FcxGuard::Locked(m.lock().await),
        }
    }
}

/// One request's run through the chain: the chain it started with (pinned across reloads) and
/// its context, alive until the stream ends.
struct FilterRun {
    chain: Arc<FilterChain>,
    fcx: Fcx,
}

const BODY_HOOKS: Hooks = Hooks::REQUEST_BODY
    .union(Hooks::REQUEST_TRAILERS)
    .union(Hooks::RESPONSE_BODY)
    .union(Hooks::RESPONSE_TRAILERS);

impl FilterRun {
    fn new(chain: Arc<FilterChain>, fcx: FilterContext) -> FilterRun {
        let fcx = if chain.has_hook(BODY_HOOKS) {
            Fcx::Shared(Arc::new(tokio::sync::Mutex::new(fcx)))
        } else {
            Fcx::Owned(fcx)
        };
        FilterRun { chain, fcx }
    }

    /// The request body as the router forwards it: through the body/trailer hooks when the
    /// chain has them and the request has a body. Runs the hooks up to the first data to forward
    /// first (bounded by `bound`), so a filter that buffers or rejects the body answers before
    /// any upstream request exists. The slot receives a reply a later hook produces.
    async fn request_body(
        &mut self,
        body: Inbound,
        bound: Option<Duration>,
    ) -> Result<(Downstream, Option<Arc<ReplySlot>>), LocalReply> {
        let Fcx::Shared(fcx) = &self.fcx else {
            return Ok((body.into(), None));
        };
        if body.is_end_stream()
            || !self
                .chain
                .has_hook(Hooks::REQUEST_BODY.union(Hooks::REQUEST_TRAILERS))
        {
            return Ok((body.into(), None));
        }
        let slot = Arc::new(ReplySlot::default());
        let mut filtered =
            FilteredRequest::new(body, self.chain.clone(), fcx.clone(), slot.clone());
        let primed = match bound {
            Some(t) => tokio::time::timeout(t, filtered.prime()).await,
            None => Ok(filtered.prime().await),
        };
        match primed {
            Ok(r) => r?,
            // The body did not arrive within the request (else stream idle) timeout: 408.
            Err(_) => {
                return Err(LocalReply::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request timeout",
                    "request_overall_timeout",
                ))
            }
        }
        Ok((Downstream::Filtered(Box::new(filtered)), Some(slot)))
    }

    /// Runs the response-header hooks (reverse order) on the response about to be sent, and
    /// puts the body behind the body/trailer hooks when there are any. `Some(reply)`: a hook
    /// answered instead. Flags set by filters go to the access log.
    async fn response(
        &mut self,
        head: &mut http::response::Parts,
        body: &mut ProxyBody,
        tunnel: bool,
        fin: &mut Finisher,
    ) -> Option<LocalReply> {
        let result = {
            let mut g = self.fcx.lock().await;
            let r = self.chain.run_response_headers(&mut g, head).await;
            for code in g.response_flags.drain(..) {
                fin.flags.set(ResponseFlags::from_code(code));
            }
            r
        };
        if let Err(reply) = result {
            return Some(reply);
        }
        if let Fcx::Shared(fcx) = &self.fcx {
            if !tunnel
                && self
                    .chain
                    .has_hook(Hooks::RESPONSE_BODY.union(Hooks::RESPONSE_TRAILERS))
            {
                let inner = std::mem::replace(body, body::empty());
                *body =
                    FilteredResponse::new(inner, self.chain.clone(), fcx.clone()).boxed_unsync();
            }
        }
        None
    }
}

/// A filter's local reply as the response: its status, body and headers (Envoy's
/// `content-type: text/plain` for a non-empty body), its flag and details for the access log.
fn filter_reply(fin: &mut Finisher, reply: LocalReply) -> Response<ProxyBody> {
    let LocalReply {
        status,
        body,
        headers,
        response_flag,
        details,
    } = reply;
    if let Some(code) = response_flag {
        fin.flags.set(ResponseFlags::from_code(code));
    }
    fin.details = Cow::Owned(details);
    let mut resp = local_reply::build(status, body);
    let h = resp.headers_mut();
    let mut last: Option<HeaderName> = None;
    for (name, value) in headers {
        match name {
            // The first value of a name replaces the default; later ones add to it.
            Some(n) => {
                h.insert(n.clone(), value);
                last = Some(n);
            }
            None => {
                if let Some(n) = &last {
                    h.append(n.clone(), value);
                }
            }
        }
    }
    resp
}

// === Response body ===

/// The downstream response body: streams the upstream body (or a local reply), counts bytes,
/// enforces the rest of the route timeout and the stream idle timeout, and completes the stream
/// record at the end.
pub struct RespBody {
    inner: ProxyBody,
    fin: Option<Box<Finisher>>,
    /// See [`Finisher::service_time_ms`].
    service_time_ms: Option<u64>,
    /// The `server` value the HTTP/1.1 codec writes in place of the map's.
    server: Option<HeaderValue>,
    /// See [`Finisher::raw_fields`].
    raw: Option<Box<RawFields>>,
}

impl crate::h1server::ExtraHeaders for RespBody {
    fn server(&self) -> Option<&HeaderValue> {
        self.server.as_ref()
    }

    fn write_extra_headers(&self, dst: &mut Vec<u8>) {
        if let Some(ms) = self.service_time_ms {
            dst.extend_from_slice(b"x-envoy-upstream-service-time: ");
            dst.extend_from_slice(itoa::Buffer::new().format(ms).as_bytes());
            dst.extend_from_slice(b"\r\n");
        }
    }

    fn raw_fields(&self) -> Option<&RawFields> {
        self.raw.as_deref()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("upstream request timeout")]
struct ResponseTimeout;

#[derive(Debug, thiserror::Error)]
#[error("stream idle timeout")]
struct IdleTimeout;

impl RespBody {
    fn end(&mut self, outcome: Outcome) {
        if let Some(mut f) = self.fin.take() {
            f.finish(outcome);
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let Some(f) = this.fin.as_mut() else {
            return polled;
        };
        // The timeouts matter only while waiting: a frame that is ready goes out.
        let frame = match polled {
            Poll::Pending => {
                return match f.poll_timer(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Expired::Idle) => {
                        this.end(Outcome::IdleTimeout);
                        Poll::Ready(Some(Err(IdleTimeout.into())))
                    }
                    Poll::Ready(Expired::Route | Expired::Request) => {
                        this.end(Outcome::Timeout);
                        Poll::Ready(Some(Err(ResponseTimeout.into())))
                    }
                };
            }
            Poll::Ready(None) => {
                this.end(Outcome::Complete);
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => {
                this.end(Outcome::UpstreamError);
                return Poll::Ready(Some(Err(e)));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if let Some(d) = frame.data_ref() {
            f.bytes_sent += d.len() as u64;
        } else if let Some(t) = frame.trailers_ref() {
            if f.logging() {
                f.response_trailers = Some(t.clone());
            }
        }
        if this.inner.is_end_stream() {
            this.end(Outcome::Complete);
        } else if f.timer.idle().is_some() {
            // Activity matters only to a stream that goes on (a clock read saved on the last
            // frame, often the only one).
            if let Some(src) = &f.source {
                src.activity().touch();
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl crate::h2server::Stall for RespBody {
    fn poll_stalled(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<BoxError> {
        let this = &mut *self;
        let Some(f) = this.fin.as_mut() else {
            return Poll::Pending;
        };
        match ready!(f.poll_timer(cx)) {
            Expired::Idle => {
                this.end(Outcome::IdleTimeout);
                Poll::Ready(IdleTimeout.into())
            }
            Expired::Route | Expired::Request => {
                this.end(Outcome::Timeout);
                Poll::Ready(ResponseTimeout.into())
            }
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        // Dropped before its end: the downstream went away (or hyper gave up on the stream),
        // or, over HTTP/1, stopped reading until the stream idle or the route timeout.
        if let Some(mut f) = self.fin.take() {
            let outcome = match f.cx.write_stall.fired() {
                Some(crate::conn::Stalled::Idle) => Outcome::IdleTimeout,
                Some(crate::conn::Stalled::Route) => Outcome::Timeout,
                None => Outcome::DownstreamGone,
            };
            f.finish(outcome);
        }
    }
}

// === The request path ===

/// Entry point for one downstream request (HTTP/1.1 from hyper's server, HTTP/2 from `h2server`).
pub fn handle(
    req: Request<Inbound>,
    cx: Arc<ConnCtx>,
) -> impl Future<Output = Result<Response<RespBody>, Infallible>> {
    let seen = headers::Seen::of(req.headers());
    handle_seen(req, seen, cx, false)
}

/// [`handle`] for a request whose codec (`h1server`) read off its header names already.
/// `extra_headers`: the codec writes the body's [`crate::h1server::ExtraHeaders`].
pub async fn handle_seen(
    mut req: Request<Inbound>,
    seen: headers::Seen,
    cx: Arc<ConnCtx>,
    extra_headers: bool,
) -> Result<Response<RespBody>, Infallible> {
    let hs = &cx.listener.http_stats;
    hs.downstream_rq_total.inc();
    hs.downstream_rq_active.inc();
    match req.version() {
        Version::HTTP_2 => hs.downstream_rq_http2_total.inc(),
        _ => hs.downstream_rq_http1_total.inc(),
    }
    // The names seen decide which lookups by name the request needs.
    // Envoy ignores an h2c upgrade and serves the request as HTTP/1.1: its `Upgrade` and the
    // headers its `Connection` names go as hop-by-hop headers.
    let upgrade = if req.version() == Version::HTTP_11 && seen.connection() {
        headers::upgrade_type(req.headers()).filter(|t| t != "h2c")
    } else {
        None
    };
    let down_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let mut fin = crate::boxed(|| Finisher::new(cx.clone(), &parts));
    let (resp, timed, mut tunnel) =
        route(parts, seen, body, upgrade, extra_headers, &cx, &mut fin).await;
    if timed {
        fin.timer.response_started();
        // HTTP/1: a client that stops reading still meets the route timeout (`conn::WriteStall`).
        if fin.version != Version::HTTP_2 {
            if let Some(d) = fin
                .source
                .as_ref()
                .and_then(|s| fin.timer.route_deadline(s))
            {
                cx.write_stall.set_route_deadline(Some(d));
            }
        }
    } else {
        // Local replies are not timed.
        fin.timer.stop();
    }
    let (mut head, mut inner) = resp.into_parts();
    // Fields kept as received are for the HTTP/1.1 codec alone: whatever else reads or changes
    // the response's headers here gets them in the map (`route` keeps none in such cases).
    if fin.raw_fields.is_some()
        && (!extra_headers
            || fin.logging()
            || fin.filters.is_some()
            || tunnel.is_some()
            || down_upgrade.is_some())
    {
        if let Some(raw) = fin.raw_fields.take() {
            (*raw).into_map(&mut head.headers);
        }
    }
    if let Some(mut run) = fin.filters.take() {
        // Boxed, as every path taken only with filters or retries: inline, its state would
        // size the request's future (moved and copied whole) even when it never runs.
        if let Some(reply) =
            Box::pin(run.response(&mut head, &mut inner, tunnel.is_some(), &mut fin)).await
        {
            // A response hook answered instead of the upstream: its body is dropped unread.
            let (h, b) = filter_reply(&mut fin, reply).into_parts();
            head = h;
            inner = b;
            tunnel = None;
        }
        fin.filters = Some(run);
    }
    // After the filters, on every response, as Envoy's `ActiveStream::encodeHeaders` does.
    let mut server = None;
    match &cx.listener.hcm().server_header {
        // The HTTP/1.1 codec writes it in the upstream's one's place (no insert, ~170
        // instructions) unless the access log reads the response's headers.
        ServerHeader::Overwrite(v) if extra_headers && !fin.logging() && tunnel.is_none() => {
            server = Some(v.clone());
        }
        ServerHeader::Overwrite(v) => {
            head.headers.insert(header::SERVER, v.clone());
        }
        ServerHeader::AppendIfAbsent(v) => {
            if let Some(raw) = fin.raw_fields.take() {
                (*raw).into_map(&mut head.headers);
            }
            if !head.headers.contains_key(header::SERVER) {
                head.headers.insert(header::SERVER, v.clone());
            }
        }
        ServerHeader::PassThrough => {}
    }
    // An upgrade answered without switching: Envoy closes the connection after the answer (the
    // request's upgraded bytes never came, so where the next request starts is unknown).
    if down_upgrade.is_some() && tunnel.is_none() {
        head.headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    fin.status = head.status.as_u16();
    hs.count_response(fin.status);
    if fin.logging() {
        fin.response_headers = Some(head.headers.clone());
    }
    if let (Some(up), Some(down)) = (tunnel, down_upgrade) {
        // The stream lives on as a tunnel; it is logged when the tunnel closes.
        head.headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let idle = match (fin.timer.idle(), &fin.source) {
            (Some(i), Some(src)) if timed => Some((i, src.clone())),
            _ => None,
        };
        fin.timer.stop();
        // The tunnel's idle timer counts bytes moved either way; a stalled write alone is not idle.
        cx.write_stall.set(None);
        spawn_tunnel(down, up, fin, idle, &cx);
        return Ok(Response::from_parts(
            head,
            RespBody {
                inner: body::empty(),
                fin: None,
                service_time_ms: None,
                server: None,
                raw: None,
            },
        ));
    }
    let mut rb = RespBody {
        inner,
        server,
        service_time_ms: fin.service_time_ms.take(),
        raw: fin.raw_fields.take(),
        fin: Some(fin),
    };
    // hyper never polls a body it must not send (HEAD, 204, 304): the stream ends here.
    let bodiless = rb.fin.as_ref().is_some_and(|f| f.method == Method::HEAD)
        || head.status == StatusCode::NO_CONTENT
        || head.status == StatusCode::NOT_MODIFIED;
    if bodiless || rb.inner.is_end_stream() {
        rb.end(Outcome::Complete);
    }
    Ok(Response::from_parts(head, rb))
}

fn spawn_tunnel(
    down: hyper::upgrade::OnUpgrade,
    up: crate::pool::Upgraded,
    fin: Box<Finisher>,
    idle: Option<(Duration, RequestSource)>,
    cx: &Arc<ConnCtx>,
) {
    let hs = cx.listener.http_stats.clone();
    let track = cx.server.track();
    let mut drain = cx.server.drain_rx();
    let drain_time = cx.server.drain_time();
    hs.downstream_cx_upgrades_total.inc();
    hs.downstream_cx_upgrades_active.inc();
    tokio::spawn(async move {
        let _track = track;
        let mut fin = fin;
        let activity = idle.as_ref().map(|(_, a)| a.clone());
        let tunnel = async {
            let d = down.await?;
            let mut d = Touching {
                inner: hyper_util::rt::TokioIo::new(d),
                activity: activity.clone(),
            };
            let mut u = up;
            let (rx, tx) = tokio::io::copy_bidirectional(&mut d, &mut u).await?;
            Ok::<_, BoxError>((rx, tx))
        };
        tokio::pin!(tunnel);
        // Envoy applies the stream idle timeout to upgraded streams too.
        let idle_wait = async {
            match &idle {
                Some((d, a)) => a.activity().idle_for(*d).await,
                None => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            r = tunnel.as_mut() => Ok(r),
            _ = idle_wait => Err(Outcome::IdleTimeout),
            _ = async {
                crate::server::drained(&mut drain).await;
                tokio::time::sleep(drain_time).await;
            } => Err(Outcome::DownstreamGone),
        };
        let outcome = match result {
            Ok(Ok((_, tx))) => {
                fin.bytes_sent += tx;
                Outcome::Complete
            }
            Ok(Err(_)) => Outcome::UpstreamError,
            Err(o) => o,
        };
        // An upgraded connection is never reused.
        fin.lease.take();
        fin.finish(outcome);
        hs.downstream_cx_upgrades_active.dec();
    });
}

/// Marks stream activity on every byte moved, for the tunnel's idle timeout.
struct Touching<T> {
    inner: T,
    activity: Option<RequestSource>,
}

impl<T> Touching<T> {
    fn touch(&self) {
        if let Some(a) = &self.activity {
            a.activity().touch();
        }
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Touching<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if r.is_ready() {
            self.touch();
        }
        r
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Touching<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if r.is_ready() {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn local(
    fin: &mut Finisher,
    status: StatusCode,
    text: impl Into<Bytes>,
    flag: u32,
    details: &'static str,
) -> Response<ProxyBody> {
    if flag != 0 {
        fin.flags.set(flag);
    }
    fin.details = Cow::Borrowed(details);
    local_reply::build(status, text)
}

/// The response, whether the stream's timeouts go on while its body streams (an upstream
/// response), and the upstream side of an upgrade.
type Routed = (Response<ProxyBody>, bool, Option<crate::pool::Upgraded>);

async fn route(
    mut parts: Parts,
    seen: headers::Seen,
    body: Inbound,
    upgrade: Option<String>,
    extra_headers: bool,
    cx: &Arc<ConnCtx>,
    fin: &mut Finisher,
) -> Routed {
    let hcm = cx.listener.hcm();
    let hs = &cx.listener.http_stats;
    cx.write_stall.set(hcm.stream_idle_timeout);
    // As received: filters and header mutations below do not change the upstream Host.
    let orig_authority = OrigAuthority::of(&parts);

    headers::remove_hop_by_hop_seen(&mut parts.headers, upgrade.is_some(), seen);
    let rc = hcm.route_config.clone();
    // The connection manager's `x-forwarded-proto` and `x-request-id` (and the router's
    // expected timeout) stay out of the map while nothing reads it: the HTTP/1.1 client codec
    // writes them (~230 instructions an insert). Filters, the access log and route matching on
    // headers read it from the start; a route that reads or changes it gets them put in first.
    let mut appended = headers::Appended::default();
    let defer =
        extra_headers && !fin.logging() && hcm.filter_chain.is_empty() && !rc.matches_on_headers();
    fin.client = headers::forwarded_seen(
        &mut parts.headers,
        cx.peer,
        hcm.use_remote_address,
        hcm.xff_num_trusted_hops,
        seen,
        defer.then_some(&mut appended),
    );
    // Envoy (proxy_100_continue: false) answers `Expect: 100-continue` itself and strips it;
    // hyper sends the 100 once the upstream attempt starts reading the body.
    if seen.expect()
        && parts
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
    {
        parts.headers.remove(header::EXPECT);
    }
    let edge_external = hcm.use_remote_address && !headers::is_internal(cx.peer.ip());
    headers::request_id_seen(
        &mut parts.headers,
        hcm.generate_request_id,
        edge_external,
        seen,
        defer.then_some(&mut appended),
    );

    let selected = match router::select(&rc, &parts) {
        Selected::Route { vhost, route } => Some((vhost, route)),
        Selected::NoVirtualHost | Selected::NoRoute => None,
    };
    if defer {
        // Only a plain forward keeps them out: a `cluster_header`, a hash policy, or any other
        // action may read them.
        let plain = selected.is_some_and(|(_, route)| match &route.action {
            RouteAction::Forward(a) => {
                !matches!(a.cluster, ClusterSpecifier::Header(_)) && a.hash_policy.is_empty()
            }
            _ => false,
        });
        if !plain {
            appended.insert_hcm(&mut parts.headers);
        }
    }
    if let (Some((_, route)), true) = (selected, fin.logging()) {
        fin.route_name = route.name.clone();
    }
    let picked = match selected {
        Some((_, route)) => match &route.action {
            RouteAction::Forward(a) => Some(pick_cluster(a, &parts.headers)),
            _ => None,
        },
        None => None,
    };
    if let (Some(t), Some((_, route))) = (&upgrade, selected) {
        // Envoy: the connection manager must know the upgrade type; a route may override it.
        let hcm_cfg = hcm.upgrade_types.iter().find(|u| &u.upgrade_type == t);
        let overrides: &[model::UpgradeConfig] = match &route.action {
            RouteAction::Forward(a) => &a.upgrade_overrides,
            _ => &[],
        };
        let allowed = hcm_cfg.is_some_and(|u| {
            overrides
                .iter()
                .find(|o| &o.upgrade_type == t)
                .map_or(u.enabled, |o| o.enabled)
        });
        if !allowed {
            hs.downstream_rq_ws_on_non_ws_route.inc();
            let mut resp = local(fin, StatusCode::FORBIDDEN, "", 0, "upgrade_failed");
            // Envoy closes the connection after refusing an upgrade.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return (resp, false, None);
        }
    }
    // The HTTP filters run before the router, on the route the connection manager picked.
    if !hcm.filter_chain.is_empty() {
        let mut fcx = FilterContext::new(fin.client, cx.local);
        fcx.direct_remote_address = cx.peer;
        fcx.request_id = parts
            .headers
            .get(headers::X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Some((_, route)) = selected {
            fcx.set_route_entry(route.filter_route.clone());
        }
        fcx.cluster_name = picked.as_ref().map(|(name, _)| name.to_string());
        let run = fin
            .filters
            .insert(FilterRun::new(hcm.filter_chain.clone(), fcx));
        let flags = &mut fin.flags;
        let result = Box::pin(async {
            let mut g = run.fcx.lock().await;
            let r = run.chain.run_request_headers(&mut g, &mut parts).await;
            for code in g.response_flags.drain(..) {
                flags.set(ResponseFlags::from_code(code));
            }
            r
        })
        .await;
        if let Err(reply) = result {
            return (filter_reply(fin, reply), false, None);
        }
    }
    let Some((vhost, route)) = selected else {
        hs.rq_total.inc();
        hs.no_route.inc();
        return (
            local(
                fin,
                StatusCode::NOT_FOUND,
                "",
                ResponseFlags::NO_ROUTE_FOUND,
                "route_not_found",
            ),
            false,
            None,
        );
    };
    // The router sees the request from here on (Envoy's `rq_total`).
    hs.rq_total.inc();
    let action = match &route.action {
        RouteAction::DirectResponse { status, body } => {
            hs.rq_direct_response.inc();
            let mut resp = local_reply::build(*status, body.clone().unwrap_or_default());
            router::apply_response_headers(
                resp.headers_mut(),
                &[&route.headers, &vhost.headers, &rc.headers],
            );
            fin.details = Cow::Borrowed("direct_response");
            return (resp, false, None);
        }
        RouteAction::Redirect(r) => {
            hs.rq_redirect.inc();
            let location = router::redirect_location(r, &parts, "http", route);
            let mut resp = local_reply::build(r.status, "");
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            router::apply_response_headers(
                resp.headers_mut(),
                &[&route.headers, &vhost.headers, &rc.headers],
            );
            fin.details = Cow::Borrowed("direct_response");
            return (resp, false, None);
        }
        RouteAction::Forward(a) => a,
    };

    let (cluster_name, wc_headers) = picked.unwrap_or((Cow::Borrowed(""), None));
    let snapshot = cx.server.snapshot();
    let Some(cluster) = snapshot.clusters.get(&cluster_name).cloned() else {
        hs.no_cluster.inc();
        return (
            local(
                fin,
                StatusCode::SERVICE_UNAVAILABLE,
                "",
                ResponseFlags::NO_CLUSTER_FOUND,
                "cluster_not_found",
            ),
            false,
            None,
        );
    };
    fin.cluster = Some(cluster.clone());

    // Request changes the route asks for.
    let rewritten = router::rewrite_path(
        action,
        route,
        parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
    );
    // Whether any level changes the request's headers: the headers Strait adds must be in the
    // map before (mutations may read or change them, and follow them).
    let request_mutated = any_level(
        wc_headers,
        [&route.headers, &vhost.headers, &rc.headers],
        |m| !m.request_headers_to_add.is_empty() || !m.request_headers_to_remove.is_empty(),
    );
    if (appended.forwarded_proto || appended.request_id.is_some())
        && (rewritten.is_some() || request_mutated)
    {
        appended.insert_hcm(&mut parts.headers);
    }
    // The router's own `x-envoy-*` headers go only without `suppress_envoy_headers`.
    let envoy_headers = !hcm.suppress_envoy_headers;
    if let Some(new_pq) = rewritten {
        if let (true, Ok(v)) = (envoy_headers, HeaderValue::from_str(parts.uri.path())) {
            parts.headers.insert(X_ENVOY_ORIGINAL_PATH, v);
        }
        if let Ok(u) = new_pq.parse::<Uri>() {
            parts.uri = u;
        }
    }
    let authority = match &action.host_rewrite {
        HostRewrite::Literal(h) => Authority::Literal(h),
        HostRewrite::Auto => Authority::Host,
        _ => Authority::Original(orig_authority),
    };
    // The `Host` received is still in the map, as an HTTP/1.1 upstream gets it, when nothing
    // between could change it: the attempts need not set it again (~170 instructions).
    // (`h1server` hands a repeated `Host` to hyper, whose requests come with `extra_headers`
    // false.)
    // (A `Connection` header may have named `host`, which the hop-by-hop removal then took.)
    let host_in_place = extra_headers
        && !seen.connection()
        && matches!(&authority, Authority::Original(OrigAuthority::Host(h)) if h.to_str().is_ok())
        && hcm.filter_chain.is_empty()
        && !(request_mutated
            && any_level(
                wc_headers,
                [&route.headers, &vhost.headers, &rc.headers],
                |m| {
                    m.request_headers_to_add
                        .iter()
                        .any(|a| a.name == header::HOST)
                        || m.request_headers_to_remove.contains(&header::HOST)
                },
            ));
    // `x-envoy-expected-rq-timeout-ms` (the route's per-try timeout, else its timeout), set
    // before the route's header mutations, as Envoy's router sets it: then in the map, as it is
    // whenever something reads the map or it may be there already. Otherwise the HTTP/1.1 codec
    // writes it after the map's headers (no insert, ~300 instructions).
    appended.expected_timeout_ms = action
        .retry_policy
        .as_ref()
        .and_then(|p| p.per_try_timeout)
        .or(action.timeout)
        .filter(|_| envoy_headers)
        .map(|t| t.as_millis() as u64);
    let in_map = fin.logging()
        || seen.expected_rq_timeout()
        || !hcm.filter_chain.is_empty()
        || request_mutated;
    if in_map {
        if let Some(ms) = appended.expected_timeout_ms.take() {
            parts.headers.insert(
                headers::X_ENVOY_EXPECTED_RQ_TIMEOUT_MS,
                headers::int_value(ms),
            );
        }
    }
    match wc_headers {
        Some(w) => router::apply_request_headers(
            &mut parts.headers,
            &[w, &route.headers, &vhost.headers, &rc.headers],
        ),
        None => router::apply_request_headers(
            &mut parts.headers,
            &[&route.headers, &vhost.headers, &rc.headers],
        ),
    }

    // The route's retry policy with the request's x-envoy-retry-* headers applied; an external
    // client at the edge may not steer retries (Envoy strips these internal headers there).
    if edge_external {
        crate::retry::strip_internal(&mut parts.headers);
    }
    let policy_cow = crate::retry::effective_policy(action.retry_policy.as_ref(), &parts.headers);
    let policy = policy_cow.as_deref();
    if fin.logging() {
        fin.request_headers = Some(parts.headers.clone());
    }

    let idle = action.idle_timeout.or(hcm.stream_idle_timeout);
    cx.write_stall.set(idle);
    let (body, filter_slot) = match fin.filters.as_mut() {
        Some(run) => match Box::pin(run.request_body(body, hcm.request_timeout.or(idle))).await {
            Ok(b) => b,
            Err(reply) => return (filter_reply(fin, reply), false, None),
        },
        None => (body.into(), None),
    };
    // Without filters nothing above waited: the stream's start is still "now" (one clock read
    // fewer). Filters may have held the request; then the activity and end are from now.
    let source_start = if fin.filters.is_some() {
        Instant::now()
    } else {
        fin.start
    };
    let source = RequestSource::new_at(
        body,
        if policy.is_some() {
            RETRY_BUFFER_LIMIT
        } else {
            0
        },
        source_start,
    );
    // The route timeout runs from the end of the downstream request to the end of the response;
    // HCM `request_timeout` until the whole request has arrived (from the stream's start).
    fin.timer.start(
        &cx.timers,
        hcm.request_timeout.map(|t| fin.start + t),
        action.timeout,
        idle,
    );
    fin.source = Some(source.clone());

    let hash = if cluster.info.config.lb_policy.is_hashing() {
        crate::router::hash_key(&action.hash_policy, &parts, fin.client.ip())
    } else {
        None
    };
    // The upstream's response fields stay as received, for the HTTP/1.1 codec to copy, when
    // nothing reads or changes the response's map on the way: no filter, access log, retry
    // policy (its checks read the response), response header mutation, or upgrade, and no
    // `server` added only when absent.
    let response_mutated = any_level(
        wc_headers,
        [&route.headers, &vhost.headers, &rc.headers],
        |m| !m.response_headers_to_add.is_empty() || !m.response_headers_to_remove.is_empty(),
    );
    let raw_ok = extra_headers
        && upgrade.is_none()
        && policy.is_none()
        && !fin.logging()
        && hcm.filter_chain.is_empty()
        && !matches!(hcm.server_header, ServerHeader::AppendIfAbsent(_))
        && !response_mutated;
    // The attempts own the headers: the only attempt takes them, retries copy them.
    let headers = std::mem::take(&mut parts.headers);
    let mut st = Attempts {
        parts: &parts,
        headers,
        authority,
        cluster: &cluster,
        policy,
        source: &source,
        upgrade: upgrade.is_some(),
        last_host: None,
        retried: false,
        transport_failure: None,
        // Flags set before the router (a filter's `DI`) stay first.
        flags: fin.flags,
        pending_retry_guard: None,
        priority: action.priority,
        attempted: Vec::new(),
        hash,
        idle,
        appended,
        host_in_place,
        raw_ok,
    };
    let result = {
        let run = st.run();
        tokio::pin!(run);
        std::future::poll_fn(|c| {
            if let Poll::Ready(r) = run.as_mut().poll(c) {
                return Poll::Ready(r);
            }
            fin.poll_timer(c).map(|e| match e {
                Expired::Route => AttemptResult::GlobalTimeout,
                Expired::Idle => AttemptResult::IdleTimeout,
                Expired::Request => AttemptResult::RequestTimeout,
            })
        })
        .await
    };
    // Keeps the order the flags were set in (Envoy prints them so).
    fin.flags = st.flags;
    fin.upstream_host = st.last_host.clone();
    fin.transport_failure = st.transport_failure.take();
    let retried = st.retried;
    if let Some(reply) = filter_slot.as_ref().and_then(|s| s.take()) {
        drop(result);
        return (filter_reply(fin, reply), false, None);
    }
    match result {
        AttemptResult::RequestTimeout => {
            hs.downstream_rq_timeout.inc();
            let mut resp = local(
                fin,
                StatusCode::REQUEST_TIMEOUT,
                "request timeout",
                0,
                "request_overall_timeout",
            );
            // The rest of the request will not be read: Envoy closes the connection.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            (resp, false, None)
        }
        AttemptResult::IdleTimeout => {
            hs.downstream_rq_idle_timeout.inc();
            // Envoy 1.40: 504 once the whole request was received, 408 while it was not.
            let status = if source.end().is_set() {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::REQUEST_TIMEOUT
            };
            (
                local(
                    fin,
                    status,
                    "stream timeout",
                    ResponseFlags::STREAM_IDLE_TIMEOUT,
                    "stream_idle_timeout",
                ),
                false,
                None,
            )
        }
        AttemptResult::NoHealthyUpstream => (
            local(
                fin,
                StatusCode::SERVICE_UNAVAILABLE,
                local_reply::NO_HEALTHY_UPSTREAM,
                ResponseFlags::NO_HEALTHY_UPSTREAM,
                "no_healthy_upstream",
            ),
            false,
            None,
        ),
        AttemptResult::Reset(reason) => {
            let details = reason.details_with(fin.transport_failure.as_deref());
            let mut resp = local(
                fin,
                reason.status(),
                reason.body(retried),
                reason.flag(),
                "",
            );
            // Envoy's router marks a request a circuit breaker turned away.
            if reason == ResetReason::Overflow && envoy_headers {
                resp.headers_mut()
                    .insert(X_ENVOY_OVERLOADED, HeaderValue::from_static("true"));
            }
            fin.details = details;
            (resp, false, None)
        }
        AttemptResult::GlobalTimeout | AttemptResult::PerTryTimeout => {
            let global = matches!(result, AttemptResult::GlobalTimeout);
            if global {
                cluster.stats().upstream_rq_timeout.inc();
                if let Some(h) = &fin.upstream_host {
                    h.stats.rq_timeout.inc();
                    // Envoy reports a route timeout to outlier detection as a local-origin
                    // timeout (504); per-try timeouts were reported by the attempt.
                    crate::outlier::report(&cluster, h, crate::outlier::Outcome::LocalTimeout);
                }
            }
            (
                local(
                    fin,
                    StatusCode::GATEWAY_TIMEOUT,
                    local_reply::UPSTREAM_REQUEST_TIMEOUT,
                    ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
                    if global {
                        "upstream_response_timeout"
                    } else {
                        "upstream_per_try_timeout"
                    },
                ),
                false,
                None,
            )
        }
        AttemptResult::Response(ok) => {
            let Done {
                mut resp,
                lease,
                rq,
                seen,
                raw,
            } = *ok;
            fin.raw_fields = raw;
            let now = Instant::now();
            fin.response_at = Some(now);
            fin.rq = Some(rq);
            fin.upstream_local = lease.local_addr();
            fin.lease = Some(lease);
            fin.details = Cow::Borrowed("via_upstream");
            let status = resp.status();
            cluster.stats().count_response(status.as_u16());
            let tunnel = if status == StatusCode::SWITCHING_PROTOCOLS && upgrade.is_some() {
                crate::pool::take_upgrade(&mut resp)
            } else {
                None
            };
            let (mut head, incoming) = resp.into_parts();
            headers::remove_response_hop_by_hop(&mut head.headers, tunnel.is_some(), seen);
            // Envoy's: from the end of the downstream request to the response's headers; none
            // on a response that came before the request ended.
            // (An upgrade request has not ended: its upgraded bytes follow, as in Envoy.)
            let request_end = source
                .end()
                .when()
                .filter(|_| envoy_headers && upgrade.is_none());
            if let Some(end) = request_end {
                let ms = now.saturating_duration_since(end).as_millis() as u64;
                // Left to the HTTP/1.1 codec (no insert, ~300 instructions) when nothing reads
                // the response's headers before it and none could already hold this one.
                // (A `server` the connection manager may append goes after it, in the map.)
                let in_map = !extra_headers
                    || tunnel.is_some()
                    || seen.upstream_service_time()
                    || fin.logging()
                    || !hcm.filter_chain.is_empty()
                    || matches!(hcm.server_header, ServerHeader::AppendIfAbsent(_))
                    || response_mutated;
                if in_map {
                    head.headers.insert(
                        headers::X_ENVOY_UPSTREAM_SERVICE_TIME,
                        headers::int_value(ms),
                    );
                } else {
                    fin.service_time_ms = Some(ms);
                }
            }
            match wc_headers {
                Some(w) => router::apply_response_headers(
                    &mut head.headers,
                    &[w, &route.headers, &vhost.headers, &rc.headers],
                ),
                None => router::apply_response_headers(
                    &mut head.headers,
                    &[&route.headers, &vhost.headers, &rc.headers],
                ),
            }
            let inner = incoming;
            (Response::from_parts(head, inner), true, tunnel)
        }
    }
}

/// Whether `f` holds for a level of the request's header mutations: the weighted cluster's,
/// the route's, the virtual host's, the route configuration's. (A plain loop: an iterator
/// flattening the optional level cost ~45 instructions a call.)
#[inline]
fn any_level(
    weighted: Option<&model::HeaderMutations>,
    levels: [&model::HeaderMutations; 3],
    f: impl Fn(&model::HeaderMutations) -> bool,
) -> bool {
    weighted.is_some_and(&f) || f(levels[0]) || f(levels[1]) || f(levels[2])
}

// === Attempts and retries ===

struct Done {
    resp: Response<ProxyBody>,
    lease: Lease,
    rq: RqGuard,
    /// The response's header names, scanned once (health-check header, hop-by-hop removal).
    seen: headers::Seen,
    /// The response's fields when kept out of its map (`Attempts::raw_ok`).
    raw: Option<Box<RawFields>>,
}

enum AttemptResult {
    Response(Box<Done>),
    Reset(ResetReason),
    NoHealthyUpstream,
    PerTryTimeout,
    GlobalTimeout,
    IdleTimeout,
    RequestTimeout,
}

struct Attempts<'a> {
    parts: &'a Parts,
    /// The request headers sent upstream (`parts.headers` is left empty).
    headers: HeaderMap,
    authority: Authority<'a>,
    cluster: &'a Arc<ClusterState>,
    policy: Option<&'a RetryPolicy>,
    source: &'a RequestSource,
    upgrade: bool,
    last_host: Option<Arc<Host>>,
    retried: bool,
    transport_failure: Option<String>,
    flags: ResponseFlags,
    /// The retry breaker slot taken for the next attempt.
    pending_retry_guard: Option<RetryGuard>,
    /// The route's `priority`: which circuit breakers the attempts count against.
    priority: model::RoutingPriority,
    /// Hosts tried so far, in order (for previous_hosts / previous_priorities).
    attempted: Vec<Arc<Host>>,
    /// The route `hash_policy` value, for RING_HASH / MAGLEV clusters.
    hash: Option<u64>,
    /// The stream idle timeout (route `idle_timeout`, else the HCM's).
    idle: Option<Duration>,
    /// Headers not in `headers` that each attempt adds after them.
    appended: headers::Appended,
    /// `headers` hold the upstream `Host` of an HTTP/1.1 attempt already.
    host_in_place: bool,
    /// Nothing reads or changes the response's headers before the downstream HTTP/1.1 codec:
    /// an HTTP/1.1 upstream's plain head may keep its fields as received (`RawFields`).
    raw_ok: bool,
}

/// The upstream cluster of a forwarding route, picked once per request when the route is
/// selected (Envoy resolves weighted and header-named clusters with the route), so the HTTP
/// filters and the router see the same choice.
fn pick_cluster<'r>(
    action: &'r model::ForwardAction,
    headers: &HeaderMap,
) -> (Cow<'r, str>, Option<&'r model::HeaderMutations>) {
    match &action.cluster {
        ClusterSpecifier::Cluster(n) => (Cow::Borrowed(n.as_str()), None),
        ClusterSpecifier::Weighted(w) => {
            let mut r = fastrand::u32(0..w.total_weight.max(1));
            let mut chosen = w.clusters.last();
            for c in &w.clusters {
                if r < c.weight {
                    chosen = Some(c);
                    break;
                }
                r -= c.weight;
            }
            match chosen {
                Some(c) => (Cow::Borrowed(c.name.as_str()), Some(&c.headers)),
                None => (Cow::Borrowed(""), None),
            }
        }
        ClusterSpecifier::Header(h) => (
            Cow::Owned(
                headers
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string(),
            ),
            None,
        ),
    }
}

fn retriable_status(p: &RetryPolicy, resp: &Response<ProxyBody>) -> bool {
    crate::retry::retriable_response(p, resp.status(), resp.headers())
}

/// Envoy's `RetryStateImpl::wouldRetryFromReset`: overflow is never retried.
fn retriable_reset(p: &RetryPolicy, reason: ResetReason) -> bool {
    let on = p.retry_on;
    if reason == ResetReason::Overflow {
        return false;
    }
    on.has(RetryOn::FIVE_XX)
        || on.has(RetryOn::GATEWAY_ERROR)
        || on.has(RetryOn::RESET)
        || (on.has(RetryOn::CONNECT_FAILURE)
            && matches!(
                reason,
                ResetReason::ConnectionFailure | ResetReason::ConnectionTimeout
            ))
        || (on.has(RetryOn::REFUSED_STREAM) && reason == ResetReason::RemoteRefusedStreamReset)
}

fn retriable_timeout(p: &RetryPolicy) -> bool {
    let on = p.retry_on;
    on.has(RetryOn::FIVE_XX) || on.has(RetryOn::GATEWAY_ERROR) || on.has(RetryOn::RESET)
}

/// Envoy's jittered exponential back-off: uniform in [0, min(base * 2^n, max)).
fn back_off(p: &RetryPolicy, retry: u32) -> Duration {
    let base = p.back_off_base.as_millis().max(1) as u64;
    let max = p.back_off_max.as_millis().max(1) as u64;
    let ceiling = base.saturating_mul(1u64 << retry.min(30)).min(max);
    Duration::from_millis(fastrand::u64(0..ceiling.max(1)))
}

fn reset_reason(e: &SendError) -> ResetReason {
    match e {
        SendError::H1(e) if e.is_protocol() => ResetReason::ProtocolError,
        SendError::H1(_) => ResetReason::ConnectionTermination,
        // The upstream reset the stream (REFUSED_STREAM: it never processed it, so it can be
        // retried); anything else (GOAWAY, I/O, a protocol error on the connection) ended it.
        SendError::H2(e) if e.is_reset() && e.is_remote() => {
            if e.reason() == Some(crate::h2frame::Reason::REFUSED_STREAM) {
                ResetReason::RemoteRefusedStreamReset
            } else {
                ResetReason::RemoteReset
            }
        }
        SendError::H2(_) => ResetReason::ConnectionTermination,
    }
}

impl Attempts<'_> {
    async fn run(&mut self) -> AttemptResult {
        let mut retry = 0u32;
        loop {
            let (result, retry_guard) = self.one(retry).await;
            let Some(p) = self.policy else {
                return result;
            };
            let wants_retry = match &result {
                AttemptResult::Response(d) => retriable_status(p, &d.resp),
                AttemptResult::Reset(r) => retriable_reset(p, *r),
                AttemptResult::PerTryTimeout => retriable_timeout(p),
                AttemptResult::NoHealthyUpstream
                | AttemptResult::GlobalTimeout
                | AttemptResult::IdleTimeout
                | AttemptResult::RequestTimeout => false,
            };
            drop(retry_guard);
            if !wants_retry {
                if retry > 0 {
                    if let AttemptResult::Response(_) = result {
                        self.cluster.stats().upstream_rq_retry_success.inc();
                    }
                }
                return result;
            }
            if retry >= p.num_retries {
                self.flags.set(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
                self.cluster.stats().upstream_rq_retry_limit_exceeded.inc();
                return result;
            }
            let stats = self.cluster.stats();
            let (breakers, thresholds) = self.breakers();
            let max_retries = crate::retry::max_active_retries(
                thresholds,
                stats.upstream_rq_active.get(),
                stats.upstream_rq_pending_active.get(),
            );
            if !Breakers::try_acquire(&breakers.retries, max_retries) {
                stats.upstream_rq_retry_overflow.inc();
                return result;
            }
            let guard = RetryGuard(self.cluster.clone(), self.priority);
            // The body already sent must be replayable, or this attempt stands.
            if !self.source_replayable() {
                drop(guard);
                return result;
            }
            drop(result);
            stats.upstream_rq_retry.inc();
            stats.upstream_rq_retry_backoff_exponential.inc();
            Box::pin(tokio::time::sleep(back_off(p, retry))).await;
            retry += 1;
            self.retried = true;
            self.pending_retry_guard = Some(guard);
        }
    }

    fn source_replayable(&self) -> bool {
        self.source.can_replay()
    }

    /// The circuit breakers and thresholds of the route's priority.
    fn breakers(&self) -> (&Breakers, &model::Thresholds) {
        let info = &self.cluster.info;
        match self.priority {
            model::RoutingPriority::Default => (&info.breakers, &info.config.circuit_breakers),
            model::RoutingPriority::High => {
                (&info.breakers_high, &info.config.circuit_breakers_high)
            }
        }
    }

    /// Chooses the attempt's host: `previous_priorities` excludes the priorities of earlier
    /// attempts (refreshed every `update_frequency` attempts), and `previous_hosts` re-picks a
    /// host already tried, up to `host_selection_retry_max_attempts` times.
    fn select_host(&self) -> Option<Arc<Host>> {
        let Some(p) = self.policy else {
            return self.cluster.pick_hashed(self.hash, 0);
        };
        let mut excluded = 0u64;
        if let Some(freq) = p.previous_priorities {
            let freq = freq.max(1) as usize;
            let counted = self.attempted.len() / freq * freq;
            for h in &self.attempted[..counted] {
                if h.priority < 64 {
                    excluded |= 1 << h.priority;
                }
            }
        }
        let avoid = if p.previous_hosts {
            &self.attempted[..]
        } else {
            &[]
        };
        let attempts = p.host_selection_retry_max_attempts;
        self.cluster
            .pick_retry(self.hash, excluded, avoid, attempts)
    }

    /// One attempt: pick a host, take a connection, send, wait for the response headers (within
    /// the per-try timeout).
    async fn one(&mut self, _retry: u32) -> (AttemptResult, Option<RetryGuard>) {
        let retry_guard = self.pending_retry_guard.take();
        let Some(host) = self.select_host() else {
            return (AttemptResult::NoHealthyUpstream, retry_guard);
        };
        self.last_host = Some(host.clone());
        if self.policy.is_some() {
            // Only retries look back at the hosts tried.
            self.attempted.push(host.clone());
        }
        let cluster = self.cluster;
        let info = &cluster.info;
        let (breakers, thresholds) = self.breakers();
        if !Breakers::try_acquire(&breakers.requests, thresholds.max_requests) {
            info.stats.upstream_rq_pending_overflow.inc();
            return (AttemptResult::Reset(ResetReason::Overflow), retry_guard);
        }
        let rq = RqGuard::new(self.cluster.clone(), host.clone(), self.priority);
        let Some(body) = self.source.attempt() else {
            return (
                AttemptResult::Reset(ResetReason::ConnectionTermination),
                retry_guard,
            );
        };
        let per_try = self.policy.and_then(|p| p.per_try_timeout);
        let r = match per_try {
            None => self.exchange(&host, body).await.map_err(Some),
            // Boxed: the per-try timer and a second copy of the exchange state would otherwise
            // size every request's future.
            Some(t) => match Box::pin(tokio::time::timeout(t, self.exchange(&host, body))).await {
                Ok(r) => r.map_err(Some),
                Err(_) => Err(None),
            },
        };
        let result = match r {
            Ok((resp, seen, raw, lease)) => AttemptResult::Response(crate::boxed(|| Done {
                seen,
                raw,
                resp,
                lease,
                rq,
            })),
            Err(Some(reason)) => {
                if !matches!(
                    reason,
                    ResetReason::Overflow
                        | ResetReason::ConnectionFailure
                        | ResetReason::ConnectionTimeout
                ) {
                    info.stats.upstream_rq_rx_reset.inc();
                }
                AttemptResult::Reset(reason)
            }
            Err(None) => {
                info.stats.upstream_rq_per_try_timeout.inc();
                host.stats.rq_timeout.inc();
                AttemptResult::PerTryTimeout
            }
        };
        if let AttemptResult::Response(d) = &result {
            if d.seen.immediate_hc_fail() {
                crate::health::on_immediate_fail(cluster, &host);
            }
        }
        // Passive health: every upstream answer and local-origin failure counts for the host.
        use crate::outlier::Outcome;
        let outcome = match &result {
            AttemptResult::Response(d) => Some(Outcome::Http(d.resp.status().as_u16())),
            AttemptResult::Reset(ResetReason::Overflow) => None,
            AttemptResult::Reset(ResetReason::ConnectionTimeout) | AttemptResult::PerTryTimeout => {
                Some(Outcome::LocalTimeout)
            }
            AttemptResult::Reset(_) => Some(Outcome::LocalConnectFailed),
            _ => None,
        };
        if let Some(o) = outcome {
            crate::outlier::report(cluster, &host, o);
        }
        (result, retry_guard)
    }

    /// Takes a connection to `host`, sends the request, waits for the response headers.
    async fn exchange(
        &mut self,
        host: &Arc<Host>,
        body: AttemptBody,
    ) -> Result<
        (
            Response<ProxyBody>,
            headers::Seen,
            Option<Box<RawFields>>,
            Lease,
        ),
        ResetReason,
    > {
        let cluster = self.cluster;
        let conn = match host.pool.acquire_for(self.priority).await {
            Ok(c) => c,
            Err(PoolError::Overflow) => return Err(ResetReason::Overflow),
            Err(PoolError::ConnectTimeout) => return Err(ResetReason::ConnectionTimeout),
            Err(PoolError::ConnectFailure(e)) => {
                self.transport_failure = Some(e);
                return Err(ResetReason::ConnectionFailure);
            }
        };
        crate::outlier::report(cluster, host, crate::outlier::Outcome::LocalSuccess);
        // Envoy counts a request upstream once it has a connection to go on.
        host.stats.rq_total.inc();
        cluster.info.stats.upstream_rq_total.inc();
        let req = self.upstream_request(host, body);
        let (sender, lease) = conn.into_sender();
        // The exchange awaited here, not through `Sender::send`: one state machine fewer per
        // request, the HTTP/1.1 and HTTP/2 exchanges sharing this future's space.
        let sent = match sender {
            Sender::H1(c) => {
                crate::h1client::send_with(
                    c,
                    req,
                    self.upgrade,
                    self.idle,
                    &self.appended,
                    self.raw_ok,
                )
                .await
            }
            .map_err(SendError::H1),
            Sender::H2(s) => crate::h2client::send(s, req)
                .await
                .map(|resp| {
                    let seen = headers::Seen::of(resp.headers());
                    (resp, seen, None)
                })
                .map_err(SendError::H2),
        };
        match sent {
            Ok((resp, seen, raw)) => Ok((resp, seen, raw, lease)),
            Err(e) => {
                tracing::debug!(upstream = %host.address, error = %e, "upstream request failed");
                Err(reset_reason(&e))
            }
        }
    }

    fn upstream_request(&mut self, host: &Host, body: AttemptBody) -> Request<ProxyBody> {
        let p = self.parts;
        let http2 = host.pool.is_http2();
        // HTTP/2 with the downstream's own `:authority`: the URI shares its bytes and the path's
        // rather than being formatted into a string and parsed again (0.7k instructions of a
        // gRPC call).
        let shared = match &self.authority {
            Authority::Original(OrigAuthority::Uri(a)) if http2 => {
                let mut up = http::uri::Parts::default();
                up.scheme = Some(http::uri::Scheme::HTTP);
                up.authority = Some(a.clone());
                up.path_and_query = Some(
                    p.uri
                        .path_and_query()
                        .cloned()
                        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
                );
                Uri::from_parts(up).ok()
            }
            _ => None,
        };
        let uri = if shared.is_some() {
            shared
        } else if http2 {
            let pq = p.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let authority = self.authority.as_str(host);
            format!("http://{authority}{pq}").parse::<Uri>().ok()
        } else if p.uri.scheme().is_none() && p.uri.authority().is_none() {
            // Origin form already: shares the downstream URI's bytes.
            Some(p.uri.clone())
        } else {
            let mut up = http::uri::Parts::default();
            up.path_and_query = Some(
                p.uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            );
            Uri::from_parts(up).ok()
        };
        let mut req = Request::new(body.boxed_unsync());
        *req.method_mut() = p.method.clone();
        *req.uri_mut() = uri.unwrap_or_else(|| Uri::from_static("/"));
        *req.version_mut() = if http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let h = req.headers_mut();
        if self.policy.is_some() {
            *h = self.headers.clone();
        } else {
            // The request's empty map takes the headers' place: one empty map fewer to drop.
            std::mem::swap(h, &mut self.headers);
        }
        if http2 {
            h.remove(header::HOST);
            h.remove(header::CONNECTION);
            h.remove(header::UPGRADE);
            let mut appended = self.appended;
            appended.insert_all(h);
        } else if !self.host_in_place {
            if let Some(v) = self.authority.header_value(host) {
                h.insert(header::HOST, v);
            }
        }
        req
    }
}

/// Where the upstream `Host` (`:authority`) comes from.
enum Authority<'a> {
    Original(OrigAuthority),
    /// `host_rewrite_literal`.
    Literal(&'a str),
    /// `auto_host_rewrite`: the chosen host's name.
    Host,
}

impl Authority<'_> {
    fn as_str(&self, host: &Host) -> Cow<'_, str> {
        match self {
            Authority::Original(o) => Cow::Borrowed(o.as_str()),
            Authority::Literal(s) => Cow::Borrowed(s),
            Authority::Host => Cow::Owned(host.authority()),
        }
    }

    fn header_value(&self, host: &Host) -> Option<HeaderValue> {
        match self {
            Authority::Original(o) => o.header_value(),
            Authority::Literal(s) => HeaderValue::from_str(s).ok(),
            Authority::Host => HeaderValue::from_str(&host.authority()).ok(),
        }
    }
}

struct RetryGuard(Arc<ClusterState>, model::RoutingPriority);

impl Drop for RetryGuard {
    fn drop(&mut self) {
        Breakers::release(&priority_breakers(&self.0, self.1).retries);
    }
}

fn priority_breakers(c: &ClusterState, p: model::RoutingPriority) -> &Breakers {
    match p {
        model::RoutingPriority::Default => &c.info.breakers,
        model::RoutingPriority::High => &c.info.breakers_high,
    }
}
