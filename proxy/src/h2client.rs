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
use std::task::Poll;

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use http::header;
use http::{Method, Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::body::ProxyBody;
use crate::h2server::{H2Body, Pipe, PipeEnd};

const CONN_WINDOW: u32 = 5 * 1024 * 1024;
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

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
    if let Err(e) = r {
        tracing::debug!(error = ?e, "upstream request body not sent whole");
    }
}

/// hyper's `method_has_defined_payload_semantics`.
fn method_has_payload(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}
