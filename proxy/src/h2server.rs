//! The downstream HTTP/2 connection: the h2 crate's server driven directly, with every stream's
//! request future polled inside the connection's own task instead of a task per stream.
//!
//! hyper's HTTP/2 server spawns a task per stream and hops between it and the connection task
//! for each response; it also re-checks every response for connection headers with five map
//! lookups. Here a stream is a future in a [`FuturesUnordered`] owned by the connection: frames a
//! stream queues go out on the connection's next poll in the same task wake-up, and the
//! connection itself is polled only when h2 asked for it (see [`crate::conn::Side`]).
//! Semantics follow hyper's server (the same settings, `date` added when absent, content-length
//! from an exact body size, body errors reset the stream) plus two of Envoy's: a client's
//! RST_STREAM cancels the request and is logged `DR`, and a response waiting for flow-control
//! window still meets the stream idle timeout ([`Stall`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::{Connection, Handshake, SendResponse};
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderName};
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::body::{BoxError, Inbound};
use crate::conn::Side;

/// hyper's server defaults, kept so behaviour did not change when hyper's wrapper went.
const CONN_WINDOW: u32 = 1024 * 1024;
const STREAM_WINDOW: u32 = 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// Rounds of streams-then-connection in one poll before yielding to other tasks.
const ROUNDS: usize = 16;
/// A body's last chunk up to this size goes to h2 without waiting for flow-control window.
const DIRECT_LAST_CHUNK: usize = MAX_FRAME_SIZE as usize;

/// Settings of a downstream HTTP/2 connection.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub max_concurrent_streams: u32,
    pub max_header_list_size: u32,
}

/// One HTTP/2 server connection and its streams. A future that ends with the connection.
pub struct Server<T, S, F, B>
where
    T: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Body<Data = Bytes>,
{
    state: State<T>,
    service: S,
    streams: FuturesUnordered<StreamTask<F, B>>,
    /// Polls the connection only after h2 woke it: new frames, or a stream queued something.
    side: Side,
    /// Polls the streams only after one of them woke.
    streams_side: Side,
    close_pending: bool,
}

enum State<T: AsyncRead + AsyncWrite + Unpin> {
    Handshaking(Handshake<T, Bytes>),
    Serving(Connection<T, Bytes>),
}

impl<T, S, F, B> Server<T, S, F, B>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<Inbound>) -> F + Unpin,
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Stall,
{
    pub fn new(io: T, settings: Settings, service: S) -> Self {
        let handshake = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
            .max_concurrent_streams(settings.max_concurrent_streams)
            .max_header_list_size(settings.max_header_list_size)
            .handshake(io);
        Server {
            state: State::Handshaking(handshake),
            service,
            streams: FuturesUnordered::new(),
            side: Side::new(),
            streams_side: Side::new(),
            close_pending: false,
        }
    }

    /// Sends GOAWAY: streams already open (and any the client opened before it sees the
    /// GOAWAY) finish; the future ends once they have.
    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        let me = self.get_mut();
        match &mut me.state {
            State::Handshaking(_) => me.close_pending = true,
            State::Serving(conn) => conn.graceful_shutdown(),
        }
        // h2 queued a GOAWAY: the connection must be polled to send it.
        me.side.rearm();
    }

    fn poll_serving(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
        self.side.enter(cx);
        self.streams_side.enter(cx);
        let r = self.drive();
        // Both sides are left: a wake that raced with the loop's end must not be lost.
        let conn_again = self.side.leave();
        let streams_again = self.streams_side.leave();
        if r.is_pending() && (conn_again || streams_again) {
            cx.waker().wake_by_ref();
        }
        r
    }

    /// Polls streams and the connection until neither woke again, within [`ROUNDS`].
    fn drive(&mut self) -> Poll<Result<(), h2::Error>> {
        let State::Serving(conn) = &mut self.state else {
            unreachable!("polled only once serving")
        };
        for _ in 0..ROUNDS {
            // Streams first: frames they queue go out with the connection's poll below.
            if self.streams_side.take() {
                let mut scx = self.streams_side.context();
                while let Poll::Ready(Some(())) = self.streams.poll_next_unpin(&mut scx) {}
            }
            if self.side.take() {
                match conn.poll_accept(&mut self.side.context()) {
                    Poll::Ready(Some(Ok((req, respond)))) => {
                        // More frames may be buffered behind this stream's.
                        self.side.rearm();
                        self.streams_side.rearm();
                        let (parts, recv) = req.into_parts();
                        let body = Inbound::H2(H2Body::new(recv, &parts.headers));
                        let fut = (self.service)(Request::from_parts(parts, body));
                        self.streams.push(StreamTask::new(fut, respond));
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                    // The connection is closed; streams still here cannot send any more.
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => {}
                }
            }
            if !self.side.fired() && !self.streams_side.fired() {
                return Poll::Pending;
            }
        }
        // Still busy: `poll_serving` wakes the task so that other tasks get their turn first.
        Poll::Pending
    }
}

impl<T, S, F, B> Future for Server<T, S, F, B>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<Inbound>) -> F + Unpin,
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Stall,
{
    type Output = Result<(), h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let me = self.get_mut();
        if let State::Handshaking(hs) = &mut me.state {
            let mut conn = ready!(Pin::new(hs).poll(cx))?;
            if me.close_pending {
                conn.graceful_shutdown();
            }
            me.state = State::Serving(conn);
            me.side.rearm();
            me.streams_side.rearm();
        }
        me.poll_serving(cx)
    }
}

/// A body a pipe carries (`RespBody` downstream, request bodies upstream). A response body's
/// stream timeouts (the stream idle timeout, the rest of the route timeout) are polled as part of
/// `poll_frame`, but a pipe waiting for the client's flow-control window does not poll the body:
/// there it asks this instead, so a client that stops granting window ends at the stream idle
/// timeout as in Envoy, not never.
pub trait Stall: Body<Data = Bytes, Error = BoxError> {
    /// Ready with the error to reset the stream with once a timeout expired.
    fn poll_stalled(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<BoxError>;
}

/// Request bodies sent upstream (`h2client`) have no stream timers of their own: the request's
/// timeouts run on the downstream side.
impl Stall for crate::body::ProxyBody {
    fn poll_stalled(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<BoxError> {
        Poll::Pending
    }
}

// === Streams ===

pin_project! {
    /// One stream: the request future until the response head, then the body pipe.
    struct StreamTask<F, B>
    where
        B: Body<Data = Bytes>,
    {
        reply: SendResponse<Bytes>,
        #[pin]
        state: StreamState<F, B>,
    }
}

pin_project! {
    #[project = StreamStateProj]
    enum StreamState<F, B>
    where
        B: Body<Data = Bytes>,
    {
        Service { #[pin] fut: F },
        Body { #[pin] pipe: Pipe<B> },
        Done,
    }
}

thread_local! {
    static PEER_RESET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True while a stream's request is being dropped because the client reset the stream: the
/// request's finisher, dropped with it, then logs Envoy's `DR` (downstream remote reset) rather
/// than `DC`. A thread-local rather than a per-request flag: the drop is synchronous, on this
/// thread, and requests that are never reset pay nothing.
pub fn dropping_for_peer_reset() -> bool {
    PEER_RESET.with(std::cell::Cell::get)
}

/// Drops what the stream still runs (request future or response pipe) as a client reset.
fn end_by_peer_reset<F, B>(mut state: Pin<&mut StreamState<F, B>>)
where
    B: Body<Data = Bytes>,
{
    PEER_RESET.with(|f| f.set(true));
    state.set(StreamState::Done);
    PEER_RESET.with(|f| f.set(false));
}

impl<F, B> StreamTask<F, B>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Stall,
{
    fn new(fut: F, reply: SendResponse<Bytes>) -> Self {
        StreamTask {
            reply,
            state: StreamState::Service { fut },
        }
    }
}

impl<F, B> Future for StreamTask<F, B>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Stall,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut me = self.project();
        let pipe = match me.state.as_mut().project() {
            StreamStateProj::Service { fut } => {
                let res = match fut.poll(cx) {
                    Poll::Ready(Ok(r)) => r,
                    Poll::Ready(Err(never)) => match never {},
                    Poll::Pending => {
                        // A client's RST_STREAM cancels the request (dropping its future).
                        if let Poll::Ready(r) = me.reply.poll_reset(cx) {
                            tracing::debug!(reason = ?r, "downstream reset the stream");
                            end_by_peer_reset(me.state);
                            return Poll::Ready(());
                        }
                        return Poll::Pending;
                    }
                };
                let (mut head, body) = res.into_parts();
                let names = HeadNames::of(&head.headers);
                if names.connection_specific {
                    strip_connection_headers(&mut head.headers);
                }
                if !names.date {
                    head.headers.insert(header::DATE, crate::headers::date());
                }
                let eos = body.is_end_stream();
                if !eos && !names.content_length {
                    if let Some(len) = body.size_hint().exact() {
                        head.headers
                            .insert(header::CONTENT_LENGTH, crate::headers::int_value(len));
                    }
                }
                let tx = match me.reply.send_response(Response::from_parts(head, ()), eos) {
                    Ok(tx) => tx,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot send the response head");
                        me.reply.send_reset(Reason::INTERNAL_ERROR);
                        return Poll::Ready(());
                    }
                };
                if eos {
                    return Poll::Ready(());
                }
                Pipe::new(body, tx)
            }
            StreamStateProj::Body { .. } => return poll_pipe(me.state, cx),
            StreamStateProj::Done => return Poll::Ready(()),
        };
        me.state.set(StreamState::Body { pipe });
        // The body may already have data: poll it now rather than on a later wake-up.
        poll_pipe(me.state, cx)
    }
}

fn poll_pipe<F, B>(mut state: Pin<&mut StreamState<F, B>>, cx: &mut Context<'_>) -> Poll<()>
where
    B: Stall,
{
    let StreamStateProj::Body { pipe } = state.as_mut().project() else {
        return Poll::Ready(());
    };
    match ready!(pipe.poll(cx)) {
        Ok(()) => state.set(StreamState::Done),
        Err(PipeEnd::PeerReset(reason)) => {
            tracing::debug!(?reason, "downstream reset the stream mid-response");
            end_by_peer_reset(state);
        }
        Err(PipeEnd::Failed(e)) => {
            tracing::debug!(error = %e, "response body not sent whole");
            state.set(StreamState::Done);
        }
    }
    Poll::Ready(())
}

/// Why a pipe stopped early.
#[derive(Debug)]
pub(crate) enum PipeEnd {
    /// The client reset the stream.
    PeerReset(Reason),
    /// The body failed (the stream was reset with its reason), or h2 refused the data.
    Failed(BoxError),
}

impl From<h2::Error> for PipeEnd {
    fn from(e: h2::Error) -> PipeEnd {
        match e.reason() {
            Some(reason) if e.is_reset() && e.is_remote() => PipeEnd::PeerReset(reason),
            _ => PipeEnd::Failed(e.into()),
        }
    }
}

pin_project! {
    /// Copies a response body into the stream, within the peer's flow-control window (hyper's
    /// `PipeToSendStream`: a chunk in hand waits for capacity, so capacity is never reserved for
    /// data that does not exist yet).
    pub(crate) struct Pipe<B>
    where
        B: Body<Data = Bytes>,
    {
        tx: SendStream<Bytes>,
        waiting: Option<(Bytes, bool)>,
        #[pin]
        body: B,
    }
}

impl<B> Pipe<B>
where
    B: Stall,
{
    pub(crate) fn new(body: B, tx: SendStream<Bytes>) -> Self {
        Pipe {
            tx,
            waiting: None,
            body,
        }
    }

    pub(crate) fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), PipeEnd>> {
        let mut me = self.project();
        loop {
            if me.waiting.is_some() {
                while me.tx.capacity() == 0 {
                    match me.tx.poll_capacity(cx) {
                        Poll::Pending => {
                            if let Poll::Ready(end) = reset_or_pending(me.tx, cx) {
                                return Poll::Ready(end);
                            }
                            let e = ready!(me.body.as_mut().poll_stalled(cx));
                            me.tx.send_reset(reset_reason(&e));
                            return Poll::Ready(Err(PipeEnd::Failed(e)));
                        }
                        Poll::Ready(Some(Ok(0))) => {}
                        Poll::Ready(Some(Ok(_))) => break,
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                        // No longer sending: h2 says None when the client reset the stream.
                        Poll::Ready(None) => {
                            return match reset_or_pending(me.tx, cx) {
                                Poll::Ready(end) => Poll::Ready(end),
                                Poll::Pending => Poll::Ready(Err(PipeEnd::Failed(
                                    "stream closed while sending".into(),
                                ))),
                            };
                        }
                    }
                }
                let Some((data, eos)) = me.waiting.take() else {
                    continue;
                };
                me.tx.send_data(data, eos)?;
                if eos {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let frame = match me.body.as_mut().poll_frame(cx) {
                Poll::Pending => return reset_or_pending(me.tx, cx),
                Poll::Ready(f) => f,
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = me.body.is_end_stream();
                        // The body's last chunk, when small, is handed to h2 without waiting for
                        // window: h2 holds it until the window opens, and the pipe owes nothing
                        // after it, so no unbounded buffering. Saves two of h2's locked
                        // operations per response (reserve, capacity).
                        if data.is_empty() || (eos && data.len() <= DIRECT_LAST_CHUNK) {
                            me.tx.send_data(data, eos)?;
                            if eos {
                                return Poll::Ready(Ok(()));
                            }
                            continue;
                        }
                        me.tx.reserve_capacity(1);
                        *me.waiting = Some((data, eos));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            me.tx.reserve_capacity(0);
                            me.tx.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(e)) => {
                    me.tx.send_reset(reset_reason(&e));
                    return Poll::Ready(Err(PipeEnd::Failed(e)));
                }
                None => {
                    me.tx.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// Before the pipe waits (for the body or for window): a client's RST_STREAM ends it, and
/// registers this task to hear of one. Not on every step: each call takes h2's stream lock.
fn reset_or_pending(tx: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<Result<(), PipeEnd>> {
    match tx.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => Poll::Ready(Err(PipeEnd::PeerReset(reason))),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
        Poll::Pending => Poll::Pending,
    }
}

/// An HTTP/2 reset reason found in the error's chain (an upstream stream reset passes through),
/// else INTERNAL_ERROR.
fn reset_reason(e: &BoxError) -> Reason {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(err) = cur {
        if let Some(reason) = err.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return reason;
        }
        cur = err.source();
    }
    Reason::INTERNAL_ERROR
}

// === Request bodies ===

/// A stream's request body. Received data is handed back to the peer's window at once, as
/// hyper does: the request body's back-pressure is the upstream write, not the window.
#[derive(Debug)]
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
    /// Content-Length minus the data received so far, when the request declared one.
    remaining: Option<u64>,
}

impl H2Body {
    pub(crate) fn new(recv: RecvStream, headers: &HeaderMap) -> H2Body {
        // h2 resets a stream whose data does not match its Content-Length.
        let remaining = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok());
        H2Body {
            recv,
            data_done: false,
            remaining,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let me = &mut *self;
        if !me.data_done {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = &mut me.remaining {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    return match e.reason() {
                        // The client stopped sending without failing the request.
                        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => Poll::Ready(None),
                        _ => Poll::Ready(Some(Err(e.into()))),
                    };
                }
                None => me.data_done = true,
            }
        }
        match ready!(me.recv.poll_trailers(cx)) {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

// === Response heads ===

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// What the server needs to know of a response head's names, from one pass over them (instead
/// of a hashed lookup each).
#[derive(Debug, Default, PartialEq)]
struct HeadNames {
    /// A connection-specific field, which HTTP/2 forbids (RFC 9113 §8.2.2) and h2 refuses to
    /// send.
    connection_specific: bool,
    date: bool,
    content_length: bool,
}

impl HeadNames {
    fn of(h: &HeaderMap) -> HeadNames {
        let mut seen = HeadNames::default();
        for n in h.keys() {
            if n == header::DATE {
                seen.date = true;
            } else if n == header::CONTENT_LENGTH {
                seen.content_length = true;
            } else if n == header::CONNECTION
                || n == header::TRANSFER_ENCODING
                || n == header::UPGRADE
                || n == header::TE
                || n == KEEP_ALIVE
                || n == PROXY_CONNECTION
            {
                seen.connection_specific = true;
            }
        }
        seen
    }
}

fn strip_connection_headers(h: &mut HeaderMap) {
    for name in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::TE,
    ] {
        h.remove(name);
    }
    if let Some(listed) = h.remove(header::CONNECTION) {
        if let Ok(listed) = listed.to_str() {
            for name in listed.split(',') {
                h.remove(name.trim());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn connection_headers_are_found_and_stripped_with_the_fields_they_list() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(HeadNames::of(&h), HeadNames::default());
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::DATE,
            HeaderValue::from_static("Fri, 27 Nov 2026 05:00:00 GMT"),
        );
        let seen = HeadNames::of(&h);
        assert!(seen.connection_specific && seen.date && !seen.content_length);
        strip_connection_headers(&mut h);
        assert!(!HeadNames::of(&h).connection_specific);
        assert!(h.get("x-hop").is_none());
        assert_eq!(h.len(), 2);
    }
}
