//! The probes of active health checking: HTTP (GET, expected / retriable statuses, Envoy's
//! `x-envoy-*` answer headers), TCP (connect, optional send / receive) and gRPC
//! (`grpc.health.v1.Health/Check`). A probe only reports; the session decides health.

use std::net::SocketAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use strait_xds::model::{
    GrpcHealthCheck, HealthCheck, HealthCheckKind, HttpHealthCheck, TcpHealthCheck,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stats::HealthCheckStats;

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    Healthy {
        /// `x-envoy-degraded` was in the answer.
        degraded: bool,
    },
    Failed {
        /// Connect failure, reset or timeout (Envoy's NETWORK failure type).
        network: bool,
        /// The status is one of `retriable_statuses`.
        retriable: bool,
        /// `x-envoy-immediate-health-check-fail` was in the answer.
        immediate: bool,
        /// No answer within the check's `timeout` (Envoy's NETWORK_TIMEOUT: a network failure
        /// that also marks a failed host `/active_hc_timeout`).
        timeout: bool,
    },
}

impl CheckResult {
    pub fn network() -> CheckResult {
        CheckResult::Failed {
            network: true,
            retriable: false,
            immediate: false,
            timeout: false,
        }
    }

    pub fn timeout() -> CheckResult {
        CheckResult::Failed {
            network: true,
            retriable: false,
            immediate: false,
            timeout: true,
        }
    }

    fn active() -> CheckResult {
        CheckResult::Failed {
            network: false,
            retriable: false,
            immediate: false,
            timeout: false,
        }
    }
}

const X_ENVOY_DEGRADED: &str = "x-envoy-degraded";
const X_ENVOY_IMMEDIATE_HC_FAIL: &str = "x-envoy-immediate-health-check-fail";
/// What the upstream says it is, for `service_name_matcher`.
const X_ENVOY_UPSTREAM_HC_CLUSTER: &str = "x-envoy-upstream-healthchecked-cluster";
/// Envoy's health-check user agent.
const USER_AGENT: &str = "Envoy/HC";
/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;

type ReqBody = Full<Bytes>;

enum Conn {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

/// One session's probe and the connection it keeps between checks (`reuse_connection`).
pub(crate) struct Prober {
    addr: SocketAddr,
    kind: HealthCheckKind,
    conn: Option<Conn>,
    tcp: Option<TcpStream>,
}

impl Prober {
    pub fn new(addr: SocketAddr, cfg: &HealthCheck) -> Prober {
        Prober {
            addr,
            kind: cfg.kind.clone(),
            conn: None,
            tcp: None,
        }
    }

    /// Drops the kept connection; the next check connects anew.
    pub fn reset(&mut self) {
        self.conn = None;
        self.tcp = None;
    }

    /// Runs one check; the caller bounds it by the check's `timeout`.
    pub async fn check(&mut self, cluster: &str, stats: &HealthCheckStats) -> CheckResult {
        let kind = self.kind.clone();
        match &kind {
            HealthCheckKind::Http(h) => self.http(h, cluster, stats).await,
            HealthCheckKind::Grpc(g) => self.grpc(g, cluster).await,
            HealthCheckKind::Tcp(t) => self.tcp(t).await,
        }
    }

    async fn connect(&mut self, h2: bool) -> Result<(), ()> {
        if let Some(c) = &self.conn {
            let alive = match c {
                Conn::H1(s) => !s.is_closed(),
                Conn::H2(s) => !s.is_closed(),
            };
            if alive {
                return Ok(());
            }
        }
        let stream = TcpStream::connect(self.addr).await.map_err(|_| ())?;
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        self.conn = Some(if h2 {
            let (s, c) = http2::Builder::new(TokioExecutor::new())
                .handshake(io)
                .await
                .map_err(|_| ())?;
            tokio::spawn(c);
            Conn::H2(s)
        } else {
            let (s, c) = http1::handshake(io).await.map_err(|_| ())?;
            tokio::spawn(c);
            Conn::H1(s)
        });
        Ok(())
    }

    async fn send(
        &mut self,
        req: Request<ReqBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, ()> {
        let r = match self.conn.as_mut() {
            Some(Conn::H1(s)) => {
                s.ready().await.map_err(|_| ())?;
                s.send_request(req).await
            }
            Some(Conn::H2(s)) => {
                s.ready().await.map_err(|_| ())?;
                s.send_request(req).await
            }
            None => return Err(()),
        };
        r.map_err(|_| ())
    }

    async fn http(
        &mut self,
        h: &HttpHealthCheck,
        cluster: &str,
        stats: &HealthCheckStats,
    ) -> CheckResult {
        if self.connect(h.http2).await.is_err() {
            self.reset();
            return CheckResult::network();
        }
        let authority = super::check_authority(h.host.as_deref(), cluster);
        let mut req = Request::new(Full::new(Bytes::new()));
        *req.method_mut() = Method::GET;
        let uri = if h.http2 {
            format!("http://{authority}{}", h.path).parse::<Uri>()
        } else {
            h.path.parse::<Uri>()
        };
        *req.uri_mut() = uri.unwrap_or_else(|_| Uri::from_static("/"));
        *req.version_mut() = if h.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let hd = req.headers_mut();
        if !h.http2 {
            if let Ok(v) = HeaderValue::from_str(authority) {
                hd.insert(header::HOST, v);
            }
        }
        hd.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        for (n, v) in &h.request_headers_to_add {
            hd.append(n.clone(), v.clone());
        }
        for n in &h.request_headers_to_remove {
            hd.remove(n);
        }
        let Ok(resp) = self.send(req).await else {
            self.reset();
            return CheckResult::network();
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        // Read the body so the connection can carry the next check.
        if resp.into_body().collect().await.is_err() {
            self.reset();
        }
        if headers
            .get(header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"))
        {
            self.reset();
        }
        let in_ranges = |rs: &[(u16, u16)]| rs.iter().any(|&(a, b)| (a..b).contains(&status));
        let immediate = headers.contains_key(X_ENVOY_IMMEDIATE_HC_FAIL);
        if in_ranges(&h.expected_statuses) && !immediate {
            // Envoy's cluster verification: only answers with an expected status get that far,
            // and a mismatch (or no header) is an active, non-retriable failure.
            if let Some(m) = &h.service_name_matcher {
                stats.verify_cluster.inc();
                let named = headers
                    .get(X_ENVOY_UPSTREAM_HC_CLUSTER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if !m.matches(named) {
                    return CheckResult::active();
                }
            }
            CheckResult::Healthy {
                degraded: headers.contains_key(X_ENVOY_DEGRADED),
            }
        } else {
            CheckResult::Failed {
                network: false,
                retriable: in_ranges(&h.retriable_statuses),
                immediate,
                timeout: false,
            }
        }
    }

    async fn grpc(&mut self, g: &GrpcHealthCheck, cluster: &str) -> CheckResult {
        if self.connect(true).await.is_err() {
            self.reset();
            return CheckResult::network();
        }
        let authority = super::check_authority(g.authority.as_deref(), cluster);
        let mut req = Request::new(Full::new(grpc_check_request(&g.service_name)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = format!("http://{authority}/grpc.health.v1.Health/Check")
            .parse::<Uri>()
            .unwrap_or_else(|_| Uri::from_static("/grpc.health.v1.Health/Check"));
        *req.version_mut() = Version::HTTP_2;
        let hd = req.headers_mut();
        hd.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        hd.insert(header::TE, HeaderValue::from_static("trailers"));
        hd.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        let Ok(resp) = self.send(req).await else {
            self.reset();
            return CheckResult::network();
        };
        if resp.status() != StatusCode::OK {
            return CheckResult::active();
        }
        let headers = resp.headers().clone();
        let Ok(collected) = resp.into_body().collect().await else {
            self.reset();
            return CheckResult::network();
        };
        let trailers = collected.trailers().cloned();
        let body = collected.to_bytes();
        // grpc-status comes in trailers, or in the headers of a trailers-only answer.
        let grpc_status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        if grpc_status != Some(0) {
            return CheckResult::active();
        }
        if grpc_serving(&body) {
            CheckResult::Healthy { degraded: false }
        } else {
            CheckResult::active()
        }
    }

    async fn tcp(&mut self, t: &TcpHealthCheck) -> CheckResult {
        // Connect-only checks always reconnect: a kept idle connection proves nothing.
        if t.receive.is_empty() && t.send.is_none() {
            self.tcp = None;
        }
        let mut stream = match self.tcp.take() {
            Some(s) => s,
            None => match TcpStream::connect(self.addr).await {
                Ok(s) => s,
                Err(_) => return CheckResult::network(),
            },
        };
        if let Some(p) = &t.send {
            if stream.write_all(p).await.is_err() {
                return CheckResult::network();
            }
        }
        if !t.receive.is_empty() {
            let mut buf = BytesMut::new();
            loop {
                if tcp_match(&buf, &t.receive) {
                    break;
                }
                match stream.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return CheckResult::network(),
                    Ok(_) => {}
                }
            }
        }
        self.tcp = Some(stream);
        CheckResult::Healthy { degraded: false }
    }
}

/// Envoy's `TcpHealthCheckMatcher::match`: every block appears, in order, in what was read.
fn tcp_match(buf: &[u8], blocks: &[Bytes]) -> bool {
    let mut from = 0;
    for b in blocks {
        match find(&buf[from..], b) {
            Some(i) => from += i + b.len(),
            None => return false,
        }
    }
    true
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

// The health protocol has one string field in the request and one enum in the answer, so the
// two messages are encoded by hand rather than generating protobuf code for them.

/// A length-prefixed gRPC message `grpc.health.v1.HealthCheckRequest { service }`.
pub fn grpc_check_request(service: &str) -> Bytes {
    let mut msg = BytesMut::new();
    if !service.is_empty() {
        msg.put_u8(0x0a); // field 1, length-delimited
        put_varint(&mut msg, service.len() as u64);
        msg.put_slice(service.as_bytes());
    }
    let mut out = BytesMut::with_capacity(5 + msg.len());
    out.put_u8(0);
    out.put_u32(msg.len() as u32);
    out.put_slice(&msg);
    out.freeze()
}

/// Whether a length-prefixed `grpc.health.v1.HealthCheckResponse` says SERVING.
pub fn grpc_serving(mut body: &[u8]) -> bool {
    if body.len() < 5 || body[0] != 0 {
        return false;
    }
    body.advance(1);
    let len = body.get_u32() as usize;
    let Some(mut msg) = body.get(..len) else {
        return false;
    };
    let mut status = 0;
    while !msg.is_empty() {
        let Some(key) = get_varint(&mut msg) else {
            return false;
        };
        match (key >> 3, key & 7) {
            (1, 0) => match get_varint(&mut msg) {
                Some(v) => status = v,
                None => return false,
            },
            (_, 0) => {
                if get_varint(&mut msg).is_none() {
                    return false;
                }
            }
            (_, 2) => {
                let Some(l) = get_varint(&mut msg) else {
                    return false;
                };
                let Some(rest) = msg.get(l as usize..) else {
                    return false;
                };
                msg = rest;
            }
            (_, 5) if msg.len() >= 4 => msg = &msg[4..],
            (_, 1) if msg.len() >= 8 => msg = &msg[8..],
            _ => return false,
        }
    }
    status == SERVING
}

fn put_varint(b: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        b.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    b.put_u8(v as u8);
}

fn get_varint(b: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages() {
        let r = grpc_check_request("svc");
        assert_eq!(&r[..], &[0, 0, 0, 0, 5, 0x0a, 3, b's', b'v', b'c']);
        assert_eq!(&grpc_check_request("")[..], &[0, 0, 0, 0, 0]);
        assert!(grpc_serving(&[0, 0, 0, 0, 2, 0x08, 1]));
        assert!(!grpc_serving(&[0, 0, 0, 0, 2, 0x08, 2]));
        // Empty message: status UNKNOWN.
        assert!(!grpc_serving(&[0, 0, 0, 0, 0]));
        assert!(!grpc_serving(&[0, 0, 0, 0, 9, 0x08]));
        assert!(!grpc_serving(&[1, 2]));
    }

    #[test]
    fn tcp_blocks_in_order() {
        let blocks = [Bytes::from_static(b"PO"), Bytes::from_static(b"NG")];
        assert!(tcp_match(b"xxPOyyNG", &blocks));
        assert!(!tcp_match(b"NGPO", &blocks));
        assert!(!tcp_match(b"PO", &blocks));
    }
}
