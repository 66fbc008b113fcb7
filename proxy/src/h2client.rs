//! Strait's HTTP/2 upstream client: the h2 crate's client used directly. The request's own task
//! sends on h2's `SendRequest` and pipes the request body while it waits for the response; one
//! driver task per connection (`pool`) polls the connection.
//!
//! hyper's client handed every request to a dispatch task over a channel and spawned a task per
//! request to pipe its body (BENCHMARKS.md, "Strait's own HTTP/2 server": about 10k instructions
//! of a gRPC call). Here a body still unsent when the response head arrives (a streaming call)
//! moves to a task of its own then; a unary call spawns nothing. Settings are hyper's client
//! defaults, so behaviour did not change with it.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use http::header;
use http::{HeaderMap, Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::body::{BoxError, ProxyBody};
use crate::h2server::{reset_reason, Stall};

const CONN_WINDOW: u32 = 5 * 1024 * 1024;
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// A body's last chunk up to this size goes to h2 without waiting for flow-control window.
const DIRECT_LAST_CHUNK: usize = MAX_FRAME_SIZE as usize;

/// Opens the HTTP/2 connection (preface and SETTINGS) over `io`.
pub async fn handshake<T>(io: T) -> Result<(SendRequest<Bytes>, Connection<T, Bytes>), h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    h2::client::Builder::new()
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONN_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
        .max_frame_size(MAX_FRAME_SIZE)
        .enable_push(false)
        .handshake(io)
        .await
}

/// Sends `req` on the connection and resolves with the response head; the response body reads
/// from the stream. The URI must be absolute (`:scheme`, `:authority`) and the headers free of
/// connection-specific fields (`forward` prepares both).
pub async fn send(
    sender: SendRequest<Bytes>,
    req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, h2::Error> {
    let mut sender = sender.ready().await?;
    let (mut parts, body) = req.into_parts();
    // As hyper's client: an exact length becomes Content-Length, zero only where the method
    // gives a body meaning.
    if let Some(len) = body.size_hint().exact() {
        if (len != 0 || method_has_payload(&parts.method))
            && !parts.headers.contains_key(header::CONTENT_LENGTH)
        {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, crate::headers::int_value(len));
        }
    }
    let eos = body.is_end_stream();
    let (mut response, tx) = sender.send_request(Request::from_parts(parts, ()), eos)?;
    let head = if eos {
        response.await?
    } else {
        let mut pipe = Pipe::new(body, tx);
        let mut piped = false;
        let head = std::future::poll_fn(|cx| {
            if !piped {
                if let Poll::Ready(r) = Pin::new(&mut pipe).poll(cx) {
                    piped = true;
                    log_unsent(r);
                }
            }
            Pin::new(&mut response).poll(cx)
        })
        .await?;
        if !piped {
            // The response came first (a streaming call): the body goes on from its own task.
            tokio::spawn(async move {
                log_unsent(std::future::poll_fn(|cx| Pin::new(&mut pipe).poll(cx)).await);
            });
        }
        head
    };
    let (parts, recv) = head.into_parts();
    let body = H2Body::new(recv, &parts.headers);
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

fn log_unsent(r: Result<(), PipeEnd>) {
    match r {
        Ok(()) => {}
        Err(PipeEnd::PeerReset(reason)) => {
            tracing::debug!(
                ?reason,
                "upstream reset the stream before the request body ended"
            )
        }
        Err(PipeEnd::Failed(e)) => {
            tracing::debug!(error = %e, "upstream request body not sent whole")
        }
    }
}

/// hyper's `method_has_defined_payload_semantics`.
fn method_has_payload(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

// === Request bodies ===

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

// === Response bodies ===

/// An upstream stream's response body. Received data is handed back to the peer's window at
/// once, as hyper does: the body's back-pressure is the downstream write, not the window.
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
