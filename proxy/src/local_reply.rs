//! Responses the proxy makes itself (no route, no healthy upstream, overflow, timeouts...), with
//! Envoy's status codes, plain-text bodies and response-code details.

use std::borrow::Cow;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{self, ProxyBody};
use crate::response_flags::ResponseFlags;

/// Why an upstream exchange failed before response headers, named as Envoy's reset reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// The upstream refused or dropped the connection attempt.
    ConnectionFailure,
    /// `connect_timeout` elapsed.
    ConnectionTimeout,
    ConnectionTermination,
    Overflow,
    RemoteReset,
    RemoteRefusedStreamReset,
    ProtocolError,
}

impl ResetReason {
    /// Envoy's `Http::Utility::resetReasonToString` (Envoy 1.40 names a refused connection
    /// `remote connection failure`).
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::ConnectionFailure => "remote connection failure",
            ResetReason::ConnectionTimeout => "connection timeout",
            ResetReason::ConnectionTermination => "connection termination",
            ResetReason::Overflow => "overflow",
            ResetReason::RemoteReset => "remote reset",
            ResetReason::RemoteRefusedStreamReset => "remote refused stream reset",
            ResetReason::ProtocolError => "protocol error",
        }
    }

    /// The response flag Envoy sets for this reason.
    pub fn flag(self) -> u32 {
        match self {
            ResetReason::ConnectionFailure | ResetReason::ConnectionTimeout => {
                ResponseFlags::UPSTREAM_CONNECTION_FAILURE
            }
            ResetReason::ConnectionTermination => ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
            ResetReason::Overflow => ResponseFlags::UPSTREAM_OVERFLOW,
            ResetReason::RemoteReset | ResetReason::RemoteRefusedStreamReset => {
                ResponseFlags::UPSTREAM_REMOTE_RESET
            }
            ResetReason::ProtocolError => ResponseFlags::UPSTREAM_PROTOCOL_ERROR,
        }
    }

    /// Envoy answers 502 for upstream protocol errors and 503 for the other resets.
    pub fn status(self) -> StatusCode {
        match self {
            ResetReason::ProtocolError => StatusCode::BAD_GATEWAY,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// `%RESPONSE_CODE_DETAILS%` for a reset before response headers.
    pub fn details(self) -> &'static str {
        match self {
            ResetReason::ConnectionFailure => {
                "upstream_reset_before_response_started{remote_connection_failure}"
            }
            ResetReason::ConnectionTimeout => {
                "upstream_reset_before_response_started{connection_timeout}"
            }
            ResetReason::ConnectionTermination => {
                "upstream_reset_before_response_started{connection_termination}"
            }
            ResetReason::Overflow => "upstream_reset_before_response_started{overflow}",
            ResetReason::RemoteReset => "upstream_reset_before_response_started{remote_reset}",
            ResetReason::RemoteRefusedStreamReset => {
                "upstream_reset_before_response_started{remote_refused_stream_reset}"
            }
            ResetReason::ProtocolError => "upstream_reset_before_response_started{protocol_error}",
        }
    }

    /// `details()` with Envoy's `|<transport failure reason>` suffix when there is one.
    pub fn details_with(self, transport_failure: Option<&str>) -> Cow<'static, str> {
        match transport_failure {
            None => Cow::Borrowed(self.details()),
            Some(t) => {
                let d = self.details();
                Cow::Owned(format!("{}|{t}}}", &d[..d.len() - 1]))
            }
        }
    }

    /// The body Envoy's router sends for a reset before response headers.
    pub fn body(self, retried: bool) -> String {
        format!(
            "upstream connect error or disconnect/reset before headers. {}reset reason: {}",
            if retried {
                "retried and the latest "
            } else {
                ""
            },
            self.as_str()
        )
    }
}

/// A local reply with Envoy's shape: `content-type: text/plain` and `content-length` when there
/// is a body. Without one, HTTP/1.1 still says `content-length: 0` (hyper's server, as Envoy's
/// HTTP/1 codec) and HTTP/2 ends the stream with the headers, as Envoy does.
pub fn build(status: StatusCode, text: impl Into<Bytes>) -> Response<ProxyBody> {
    let text = text.into();
    let mut resp = Response::new(body::full(text.clone()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if !text.is_empty() {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(text.len()));
    }
    resp
}

/// Envoy's `%UPSTREAM_TRANSPORT_FAILURE_REASON%` for a failed connect: `delayed connect
/// error: <strerror>`, spaces as `_` (as Envoy 1.40 prints it).
pub fn transport_failure(e: &std::io::Error) -> String {
    let text = e.to_string();
    // Rust appends ` (os error N)` to the strerror text Envoy prints.
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text,
    };
    format!("delayed connect error: {text}").replace(' ', "_")
}

/// `no healthy upstream` (503 UH).
pub const NO_HEALTHY_UPSTREAM: &str = "no healthy upstream";
/// Route timeout (504 UT).
pub const UPSTREAM_REQUEST_TIMEOUT: &str = "upstream request timeout";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_texts() {
        assert_eq!(
            ResetReason::ConnectionFailure.body(false),
            "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
        );
        assert_eq!(
            ResetReason::Overflow.body(true),
            "upstream connect error or disconnect/reset before headers. retried and the latest reset reason: overflow"
        );
        assert_eq!(
            ResetReason::ConnectionFailure.details_with(Some("delayed_connect_error:_Connection_refused")),
            "upstream_reset_before_response_started{remote_connection_failure|delayed_connect_error:_Connection_refused}"
        );
        assert_eq!(
            transport_failure(&std::io::Error::from_raw_os_error(111)),
            "delayed_connect_error:_Connection_refused"
        );
        let r = build(StatusCode::NOT_FOUND, "");
        assert!(r.headers().is_empty());
        let r = build(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        assert_eq!(r.headers()["content-length"], "19");
        assert_eq!(r.headers()["content-type"], "text/plain");
    }
}
