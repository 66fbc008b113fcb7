//! Header hygiene done by the connection manager before routing, as Envoy does: hop-by-hop
//! removal, `x-forwarded-for` / `x-forwarded-proto`, and `x-request-id` generation.
//! Pure functions over `http::HeaderMap`; nothing here does IO.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
pub const X_ENVOY_EXPECTED_RQ_TIMEOUT_MS: HeaderName =
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The upgrade token of an HTTP/1.1 upgrade request (`Connection: upgrade` + `Upgrade: X`),
/// lower-cased, e.g. `websocket`.
pub fn upgrade_type(headers: &HeaderMap) -> Option<String> {
    let wants_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !wants_upgrade {
        return None;
    }
    let up = headers.get(header::UPGRADE)?.to_str().ok()?.trim();
    if up.is_empty() {
        return None;
    }
    Some(up.to_ascii_lowercase())
}

const SEEN_CONNECTION: u16 = 1;
const SEEN_KEEP_ALIVE: u16 = 2;
const SEEN_PROXY_CONNECTION: u16 = 4;
const SEEN_TRANSFER_ENCODING: u16 = 8;
const SEEN_UPGRADE: u16 = 16;
const SEEN_TE: u16 = 32;
const SEEN_XFF: u16 = 64;
const SEEN_XFP: u16 = 128;
const SEEN_REQUEST_ID: u16 = 256;
const SEEN_EXPECT: u16 = 512;
const SEEN_IMMEDIATE_HC_FAIL: u16 = 1024;
const SEEN_EXPECTED_RQ_TIMEOUT: u16 = 2048;
const SEEN_UPSTREAM_SERVICE_TIME: u16 = 4096;
const HOP_BY_HOP: u16 = SEEN_CONNECTION
    | SEEN_KEEP_ALIVE
    | SEEN_PROXY_CONNECTION
    | SEEN_TRANSFER_ENCODING
    | SEEN_UPGRADE
    | SEEN_TE;

/// Which of the headers the connection manager acts on a message carries, from one pass over
/// its names: the usual request has none of them, and then costs no lookup by name. A header
/// seen may since have been removed (the lookup then finds nothing); one not seen is absent as
/// long as only removals happened in between.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen(u16);

impl Seen {
    pub fn of(headers: &HeaderMap) -> Seen {
        Seen(headers.keys().fold(0, |acc, n| acc | Seen::bit(n)))
    }

    /// What one name adds (an HTTP/1.1 codec reads the names as it parses the head).
    pub fn of_name(name: &HeaderName) -> Seen {
        Seen(Seen::bit(name))
    }

    // Single names, for codecs that know a name without comparing it (a table hit, a role).
    pub const NONE: Seen = Seen(0);
    pub const CONNECTION: Seen = Seen(SEEN_CONNECTION);
    pub const TRANSFER_ENCODING: Seen = Seen(SEEN_TRANSFER_ENCODING);
    pub const UPGRADE: Seen = Seen(SEEN_UPGRADE);
    pub const TE: Seen = Seen(SEEN_TE);
    pub const EXPECT: Seen = Seen(SEEN_EXPECT);
    pub const X_FORWARDED_FOR: Seen = Seen(SEEN_XFF);
    pub const X_FORWARDED_PROTO: Seen = Seen(SEEN_XFP);
    pub const X_REQUEST_ID: Seen = Seen(SEEN_REQUEST_ID);

    /// Both sets.
    pub fn with(self, other: Seen) -> Seen {
        Seen(self.0 | other.0)
    }

    /// What one lower-case name adds, from its bytes.
    pub fn of_lower(name: &[u8]) -> Seen {
        Seen(Seen::bit_of(name))
    }

    /// Whether no name the connection manager acts on was seen.
    pub fn is_none(self) -> bool {
        self.0 == 0
    }

    #[inline]
    fn bit(name: &HeaderName) -> u16 {
        Seen::bit_of(name.as_str().as_bytes())
    }

    #[inline]
    fn bit_of(name: &[u8]) -> u16 {
        match name {
            b"connection" => SEEN_CONNECTION,
            b"keep-alive" => SEEN_KEEP_ALIVE,
            b"proxy-connection" => SEEN_PROXY_CONNECTION,
            b"transfer-encoding" => SEEN_TRANSFER_ENCODING,
            b"upgrade" => SEEN_UPGRADE,
            b"te" => SEEN_TE,
            b"x-forwarded-for" => SEEN_XFF,
            b"x-forwarded-proto" => SEEN_XFP,
            b"x-request-id" => SEEN_REQUEST_ID,
            b"expect" => SEEN_EXPECT,
            b"x-envoy-immediate-health-check-fail" => SEEN_IMMEDIATE_HC_FAIL,
            b"x-envoy-expected-rq-timeout-ms" => SEEN_EXPECTED_RQ_TIMEOUT,
            b"x-envoy-upstream-service-time" => SEEN_UPSTREAM_SERVICE_TIME,
            _ => 0,
        }
    }

    fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }

    /// `Connection` is present.
    pub fn connection(self) -> bool {
        self.has(SEEN_CONNECTION)
    }

    /// `x-envoy-immediate-health-check-fail` is present (in an upstream response).
    pub fn immediate_hc_fail(self) -> bool {
        self.has(SEEN_IMMEDIATE_HC_FAIL)
    }

    /// `Expect` is present.
    pub fn expect(self) -> bool {
        self.has(SEEN_EXPECT)
    }

    /// `x-envoy-expected-rq-timeout-ms` is present.
    pub fn expected_rq_timeout(self) -> bool {
        self.has(SEEN_EXPECTED_RQ_TIMEOUT)
    }

    /// `x-envoy-upstream-service-time` is present (in an upstream response).
    pub fn upstream_service_time(self) -> bool {
        self.has(SEEN_UPSTREAM_SERVICE_TIME)
    }
}

/// `Connection` tokens whose headers go anyway (or are kept on purpose, `te`): no lookup by name.
const HANDLED_TOKENS: [&str; 5] = [
    "keep-alive",
    "upgrade",
    "te",
    "proxy-connection",
    "transfer-encoding",
];

/// Removes hop-by-hop headers. Headers named in `Connection` go too (RFC 9110 §7.6.1). With
/// `keep_upgrade`, `Connection: upgrade` and `Upgrade` survive so the next hop sees the upgrade.
/// `te` is kept only as `trailers`, which gRPC needs end to end.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    remove_hop_by_hop_seen(headers, keep_upgrade, Seen::of(headers));
}

/// Removes an upstream response's hop-by-hop headers as Envoy's `mutateResponseHeaders` does:
/// `Connection`, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, and `Upgrade` unless
/// the response completes an upgrade (`keep_upgrade`, which also sets `Connection: upgrade`).
/// Unlike on requests, the headers a `Connection` value names stay, and so does `TE` (checked
/// against Envoy: `tests/headers.rs`).
pub fn remove_response_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool, seen: Seen) {
    if !seen.has(HOP_BY_HOP) && !keep_upgrade {
        return;
    }
    if seen.has(SEEN_CONNECTION) {
        headers.remove(header::CONNECTION);
    }
    if seen.has(SEEN_KEEP_ALIVE) {
        headers.remove(KEEP_ALIVE);
    }
    if seen.has(SEEN_PROXY_CONNECTION) {
        headers.remove(PROXY_CONNECTION);
    }
    if seen.has(SEEN_TRANSFER_ENCODING) {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if seen.has(SEEN_UPGRADE) {
        headers.remove(header::UPGRADE);
    }
}

/// Removes the fields a `Connection` value names (RFC 9110 §7.6.1), but for the hop-by-hop
/// fields [`remove_hop_by_hop_seen`] handles itself (it keeps `te: trailers` and an upgrade's
/// `upgrade`). Tokens that are no field name (`close`) remove nothing.
fn remove_nominated(headers: &mut HeaderMap, value: &HeaderValue) {
    // Bytes, not `str::split`: its char searcher costs ~100 instructions a value.
    for t in value.as_bytes().split(|&b| b == b',') {
        let t = t.trim_ascii();
        if t.is_empty()
            || HANDLED_TOKENS
                .iter()
                .any(|k| t.eq_ignore_ascii_case(k.as_bytes()))
        {
            continue;
        }
        if let Ok(t) = std::str::from_utf8(t) {
            headers.remove(t);
        }
    }
}

/// [`remove_hop_by_hop`] with the names already scanned: what a response loses
/// ([`remove_response_hop_by_hop`]), and also the fields `Connection` names and `TE` but for
/// `trailers`.
pub fn remove_hop_by_hop_seen(headers: &mut HeaderMap, keep_upgrade: bool, seen: Seen) {
    if !seen.has(HOP_BY_HOP) && !keep_upgrade {
        return;
    }
    if seen.has(SEEN_CONNECTION) {
        // Tokens are read from clones of the values (a reference count each), so that the
        // headers they name are removed as they are found: no list of names, no owned
        // `HeaderName` per token. The tokens handled here (`keep-alive`, `te`, ...) go below
        // as their fields are seen, whatever the `Connection` header says.
        let mut values = headers.get_all(header::CONNECTION).iter();
        match (values.next().cloned(), values.next()) {
            (Some(v), None) => remove_nominated(headers, &v),
            (None, _) => {}
            (Some(_), Some(_)) => {
                let all: Vec<HeaderValue> = headers
                    .get_all(header::CONNECTION)
                    .iter()
                    .cloned()
                    .collect();
                for v in &all {
                    remove_nominated(headers, v);
                }
            }
        }
    }
    remove_response_hop_by_hop(headers, keep_upgrade, seen);
    if seen.has(SEEN_TE) {
        let te_trailers = headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
        headers.remove(header::TE);
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// Applies Envoy's `x-forwarded-for` / `x-forwarded-proto` rules and returns the address Envoy
/// would treat as the downstream client (`%DOWNSTREAM_REMOTE_ADDRESS%`).
///
/// XFF is appended only with `use_remote_address` (Envoy never appends otherwise). The client
/// address is the peer, unless trusted hops say to take it from XFF: without
/// `use_remote_address` the (n+1)-th entry from the right, with it the n-th one.
pub fn forwarded(
    headers: &mut HeaderMap,
    peer: SocketAddr,
    use_remote_address: bool,
    xff_num_trusted_hops: u32,
) -> SocketAddr {
    let seen = Seen::of(headers);
    forwarded_seen(
        headers,
        peer,
        use_remote_address,
        xff_num_trusted_hops,
        seen,
        None,
    )
}

/// [`forwarded`] with the names already scanned; an `x-forwarded-proto` added to a request
/// that had none goes to `appended` when given.
pub fn forwarded_seen(
    headers: &mut HeaderMap,
    peer: SocketAddr,
    use_remote_address: bool,
    xff_num_trusted_hops: u32,
    seen: Seen,
    appended: Option<&mut Appended>,
) -> SocketAddr {
    if !seen.has(SEEN_XFF) && !use_remote_address {
        if !seen.has(SEEN_XFP) {
            match appended {
                Some(a) => a.forwarded_proto = true,
                None => {
                    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
                }
            }
        }
        return peer;
    }
    let xff: Vec<IpAddr> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let n = xff_num_trusted_hops as usize;
    let client = if use_remote_address {
        if n > 0 && xff.len() >= n {
            SocketAddr::new(xff[xff.len() - n], 0)
        } else {
            peer
        }
    } else if xff.len() > n {
        SocketAddr::new(xff[xff.len() - 1 - n], 0)
    } else {
        peer
    };
    if use_remote_address {
        let ip = peer.ip().to_string();
        let joined = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            // Several XFF header lines are folded into one, as Envoy does.
            Some(_) => {
                let mut all: Vec<&str> = headers
                    .get_all(&X_FORWARDED_FOR)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                all.push(&ip);
                all.join(",")
            }
            None => ip.clone(),
        };
        if let Ok(v) = HeaderValue::from_str(&joined) {
            headers.insert(X_FORWARDED_FOR, v);
        }
    }
    if use_remote_address || !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    client
}

/// Envoy's internal addresses (RFC 1918, loopback, unique local): requests from them keep a
/// client-supplied `x-request-id` even at the edge.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// Sets `x-request-id` when missing (or when an external edge request brings its own, which
/// Envoy replaces unless `preserve_external_request_id`, default false).
pub fn request_id(headers: &mut HeaderMap, generate: bool, edge_external: bool) {
    let seen = Seen::of(headers);
    request_id_seen(headers, generate, edge_external, seen, None);
}

/// [`request_id`] with the names already scanned; an id for a request that had none goes to
/// `appended` when given.
pub fn request_id_seen(
    headers: &mut HeaderMap,
    generate: bool,
    edge_external: bool,
    seen: Seen,
    appended: Option<&mut Appended>,
) {
    if !generate {
        return;
    }
    if !seen.has(SEEN_REQUEST_ID) {
        if let Some(a) = appended {
            a.request_id = Some(uuid_v4_bytes());
            return;
        }
    } else if !edge_external && headers.contains_key(&X_REQUEST_ID) {
        return;
    }
    headers.insert(X_REQUEST_ID, request_id_value(&uuid_v4_bytes()));
}

/// Hex digits and `-`: a valid value without checking each byte again (~110 instructions).
fn request_id_value(id: &[u8; 36]) -> HeaderValue {
    crate::h1client::parsed_value(bytes::Bytes::copy_from_slice(id))
}

/// Headers the proxy adds to a request, kept out of its map while nothing reads them (no
/// filters, no access log, no route matching on headers or changing them): the HTTP/1.1
/// client codec writes them after the map's, in the order Envoy adds them; anything else puts
/// them in the map first.
#[derive(Debug, Default, Clone, Copy)]
pub struct Appended {
    /// The connection manager's `x-forwarded-proto: http`.
    pub forwarded_proto: bool,
    /// The connection manager's generated `x-request-id`.
    pub request_id: Option<[u8; 36]>,
    /// The router's `x-envoy-expected-rq-timeout-ms`.
    pub expected_timeout_ms: Option<u64>,
}

impl Appended {
    /// Moves the connection manager's headers into `headers` (before anything reads them).
    pub fn insert_hcm(&mut self, headers: &mut HeaderMap) {
        if std::mem::take(&mut self.forwarded_proto) {
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        }
        if let Some(id) = self.request_id.take() {
            headers.insert(X_REQUEST_ID, request_id_value(&id));
        }
    }

    /// Moves all of them into `headers`.
    pub fn insert_all(&mut self, headers: &mut HeaderMap) {
        self.insert_hcm(headers);
        if let Some(ms) = self.expected_timeout_ms.take() {
            headers.insert(X_ENVOY_EXPECTED_RQ_TIMEOUT_MS, int_value(ms));
        }
    }

    /// Their lines, for a request head.
    pub fn write(&self, w: &mut bytes::BytesMut) {
        use bytes::BufMut;
        if self.forwarded_proto {
            w.put_slice(b"x-forwarded-proto: http\r\n");
        }
        if let Some(id) = &self.request_id {
            w.put_slice(b"x-request-id: ");
            w.put_slice(id);
            w.put_slice(b"\r\n");
        }
        if let Some(ms) = self.expected_timeout_ms {
            w.put_slice(b"x-envoy-expected-rq-timeout-ms: ");
            w.put_slice(itoa::Buffer::new().format(ms).as_bytes());
            w.put_slice(b"\r\n");
        }
    }
}

/// A random UUID version 4 in its canonical text form.
pub fn uuid_v4() -> String {
    String::from_utf8_lossy(&uuid_v4_bytes()).into_owned()
}

/// A random UUID version 4 in its canonical text form, on the stack.
fn uuid_v4_bytes() -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Where each byte's two digits go in the 8-4-4-4-12 form: fixed positions, no branches.
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = [b'-'; 36];
    for (byte, at) in b.iter().zip(AT) {
        out[at] = HEX[usize::from(byte >> 4)];
        out[at + 1] = HEX[usize::from(byte & 0xf)];
    }
    out
}

/// Values below this come from [`SMALL_DIGITS`].
const SMALL_INTS: u64 = 1024;

/// `0123…1023`: the decimal forms of `0..SMALL_INTS` back to back, built at compile time (read-
/// only data instead of a 40 KiB table of header values on the heap).
const SMALL_DIGITS: &str = {
    const LEN: usize = 10 + 90 * 2 + 900 * 3 + 24 * 4;
    const BYTES: [u8; LEN] = {
        let mut out = [0u8; LEN];
        let (mut i, mut at) = (0u64, 0usize);
        while i < SMALL_INTS {
            let len = small_int_len(i);
            let (mut k, mut rest) = (len, i);
            while k > 0 {
                k -= 1;
                out[at + k] = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
            at += len;
            i += 1;
        }
        out
    };
    match std::str::from_utf8(&BYTES) {
        Ok(s) => s,
        Err(_) => panic!("ASCII digits"),
    }
};

const fn small_int_len(i: u64) -> usize {
    if i < 10 {
        1
    } else if i < 100 {
        2
    } else if i < 1000 {
        3
    } else {
        4
    }
}

/// A decimal header value (`x-envoy-upstream-service-time`, `x-envoy-expected-rq-timeout-ms`,
/// `content-length`) without a fresh allocation in the common cases: small values point into
/// [`SMALL_DIGITS`] (cloning copies two words, no reference count), and each thread keeps the
/// last larger one (a route's timeout repeats request after request).
pub fn int_value(n: u64) -> HeaderValue {
    if n < SMALL_INTS {
        let len = small_int_len(n);
        let at = match len {
            1 => n,
            2 => 10 + (n - 10) * 2,
            3 => 190 + (n - 100) * 3,
            _ => 2890 + (n - 1000) * 4,
        } as usize;
        if let Some(digits) = SMALL_DIGITS.get(at..at + len) {
            return HeaderValue::from_static(digits);
        }
    }
    thread_local! {
        static LAST: RefCell<Option<(u64, HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((m, v)) if *m == n => v.clone(),
            _ => {
                let v = HeaderValue::from(n);
                *last = Some((n, v.clone()));
                v
            }
        }
    })
}

/// The `Date` value for now, formatted once per second per thread.
pub fn date() -> HeaderValue {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHE: RefCell<(u64, HeaderValue)> =
            const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let text = httpdate::fmt_http_date(now);
            c.1 = HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""));
            c.0 = secs;
        }
        c.1.clone()
    })
}

/// A request's Content-Length value as hyper's `content_length_parse` reads it (both downstream
/// codecs use it): digits only, no sign or spaces, within `u64`.
pub fn parse_length(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    b.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each name the connection manager acts on sets its own bit; names of the same lengths
    /// and first letters set none.
    #[test]
    fn seen_names_each_header_it_tracks() {
        let tracked = [
            ("te", SEEN_TE),
            ("expect", SEEN_EXPECT),
            ("upgrade", SEEN_UPGRADE),
            ("connection", SEEN_CONNECTION),
            ("keep-alive", SEEN_KEEP_ALIVE),
            ("x-request-id", SEEN_REQUEST_ID),
            ("x-forwarded-for", SEEN_XFF),
            ("proxy-connection", SEEN_PROXY_CONNECTION),
            ("transfer-encoding", SEEN_TRANSFER_ENCODING),
            ("x-forwarded-proto", SEEN_XFP),
            (
                "x-envoy-immediate-health-check-fail",
                SEEN_IMMEDIATE_HC_FAIL,
            ),
        ];
        for (name, bit) in tracked {
            assert_eq!(Seen::of(&map(&[(name, "v")])), Seen(bit), "{name}");
        }
        let others = [
            "tx",
            "server",
            "expires",
            "keep-alivf",
            "connectiom",
            "content-type",
            "x-forwarded-fox",
            "proxy-connectiom",
            "transfer-encodinf",
            "x-forwarded-protp",
            "x-envoy-immediate-health-check-faik",
            "host",
            "date",
        ];
        for name in others {
            assert_eq!(Seen::of(&map(&[(name, "v")])), Seen(0), "{name}");
        }
        let all = map(&[("connection", "te"), ("te", "trailers"), ("host", "h")]);
        assert_eq!(Seen::of(&all), Seen(SEEN_CONNECTION | SEEN_TE));
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-custom"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "trailers, deflate"),
            ("x-custom", "1"),
            ("x-keep", "1"),
        ]);
        remove_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        names.sort();
        assert_eq!(names, vec!["te", "x-keep"]);
        assert_eq!(h["te"], "trailers");

        let mut h = map(&[("te", "gzip")]);
        remove_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
    }

    #[test]
    fn connection_named_headers_removed_with_or_without_handled_tokens() {
        let mut h = map(&[
            ("connection", "close, X-Custom"),
            ("close", "1"),
            ("x-custom", "1"),
            ("x-keep", "1"),
        ]);
        remove_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        assert_eq!(names, vec!["x-keep"]);

        let mut h = map(&[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("x-keep", "1"),
        ]);
        remove_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        assert_eq!(names, vec!["x-keep"]);

        let mut h = map(&[("x-keep", "1")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);

        // Tokens over several `Connection` fields.
        let mut h = map(&[
            ("connection", "x-a"),
            ("connection", " x-b ,te"),
            ("x-a", "1"),
            ("x-b", "1"),
            ("te", "trailers"),
            ("x-keep", "1"),
        ]);
        remove_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        names.sort();
        assert_eq!(names, vec!["te", "x-keep"]);
    }

    #[test]
    fn upgrade_kept_when_upgrading() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(upgrade_type(&h).as_deref(), Some("websocket"));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(upgrade_type(&map(&[("upgrade", "websocket")])), None);
    }

    #[test]
    fn xff_appended_only_with_use_remote_address() {
        let peer: SocketAddr = "10.0.0.9:1234".parse().unwrap();
        let mut h = map(&[("x-forwarded-for", "1.2.3.4")]);
        let client = forwarded(&mut h, peer, true, 0);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4,10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(client, peer);

        let mut h = map(&[("x-forwarded-for", "1.2.3.4, 5.6.7.8")]);
        let client = forwarded(&mut h, peer, false, 1);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 5.6.7.8");
        assert_eq!(client.ip().to_string(), "1.2.3.4");
        let client = forwarded(&mut h, peer, false, 0);
        assert_eq!(client.ip().to_string(), "5.6.7.8");

        let mut h = map(&[("x-forwarded-proto", "https")]);
        forwarded(&mut h, peer, false, 0);
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn int_values() {
        for n in (0u64..2048).chain([15000, 15000, 15001, u64::MAX]) {
            assert_eq!(int_value(n), n.to_string().as_str(), "{n}");
        }
    }

    #[test]
    fn request_id_generated_and_kept() {
        let mut h = HeaderMap::new();
        request_id(&mut h, true, false);
        let id = h["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(id.len(), 36);
        for (i, c) in id.char_indices() {
            if matches!(i, 8 | 13 | 18 | 23) {
                assert_eq!(c, '-', "{id}");
            } else {
                assert!(matches!(c, '0'..='9' | 'a'..='f'), "{id}");
            }
        }
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"));
        request_id(&mut h, true, false);
        assert_eq!(h["x-request-id"], id.as_str());
        request_id(&mut h, true, true);
        assert_ne!(h["x-request-id"], id.as_str());
        let mut h = HeaderMap::new();
        request_id(&mut h, false, false);
        assert!(h.is_empty());
    }

    #[test]
    fn date_is_an_http_date() {
        let d = date();
        let parsed = httpdate::parse_http_date(d.to_str().unwrap()).unwrap();
        let age = std::time::SystemTime::now()
            .duration_since(parsed)
            .unwrap_or_default();
        assert!(age < std::time::Duration::from_secs(5));
    }
}
