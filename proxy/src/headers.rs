//! Header hygiene done by the connection manager before routing, as Envoy does: hop-by-hop
//! removal, `x-forwarded-for` / `x-forwarded-proto`, and `x-request-id` generation.
//! Pure functions over `http::HeaderMap`; nothing here does IO.

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

/// Removes hop-by-hop headers. Headers named in `Connection` go too (RFC 9110 §7.6.1). With
/// `keep_upgrade`, `Connection: upgrade` and `Upgrade` survive so the next hop sees the upgrade.
/// `te` is kept only as `trailers`, which gRPC needs end to end.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && *n == header::UPGRADE))
        .filter(|n| *n != header::TE)
        .collect();
    for n in named {
        headers.remove(n);
    }
    headers.remove(header::CONNECTION);
    headers.remove(KEEP_ALIVE);
    headers.remove(PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
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
    if !generate {
        return;
    }
    if headers.contains_key(&X_REQUEST_ID) && !edge_external {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(&uuid_v4()) {
        headers.insert(X_REQUEST_ID, v);
    }
}

/// A random UUID version 4 in its canonical text form.
pub fn uuid_v4() -> String {
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
        s.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn request_id_generated_and_kept() {
        let mut h = HeaderMap::new();
        request_id(&mut h, true, false);
        let id = h["x-request-id"].to_str().unwrap().to_string();
        assert_eq!(id.len(), 36);
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
}
