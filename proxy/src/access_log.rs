//! Access logging: Envoy's default text format, custom `text_format_source`, and `json_format`,
//! to stdout, stderr or a file. Formatting happens after the response ends, off the hot path of
//! the response body; writes go through a buffered background writer so a request never waits on
//! disk.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::response_flags::ResponseFlags;

/// Everything one access-log line may print, filled by the data path when a stream ends.
#[derive(Debug)]
pub struct Record<'a> {
    pub start_time: SystemTime,
    pub method: &'a http::Method,
    /// Path and query as received (before rewrites).
    pub path: &'a str,
    pub authority: &'a str,
    pub scheme: &'a str,
    pub version: http::Version,
    /// Request headers as forwarded (after hygiene and route mutations).
    pub request_headers: &'a HeaderMap,
    /// 0 when no response was sent.
    pub response_code: u16,
    pub response_headers: Option<&'a HeaderMap>,
    pub response_trailers: Option<&'a HeaderMap>,
    pub response_flags: ResponseFlags,
    /// `%RESPONSE_CODE_DETAILS%`, e.g. `via_upstream`, `route_not_found`.
    pub response_code_details: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    /// Time until the last request byte was received.
    pub request_duration: Option<Duration>,
    /// Time until the first response byte was received from upstream.
    pub response_duration: Option<Duration>,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<&'a str>,
    pub upstream_local_address: Option<SocketAddr>,
    pub upstream_transport_failure_reason: Option<&'a str>,
    pub downstream_remote_address: SocketAddr,
    pub downstream_direct_remote_address: SocketAddr,
    pub downstream_local_address: SocketAddr,
    pub route_name: &'a str,
}
