//! Retry decisions with Envoy's semantics, apart from the attempt loop in `forward`: the
//! request's `x-envoy-retry-on` / `x-envoy-retry-grpc-on` / `x-envoy-max-retries` merged into the
//! route's policy, which answers are retriable (status classes, retriable status codes and
//! headers, gRPC status), and the retry budget / `max_retries` circuit breaker.

use std::borrow::Cow;
use std::time::Duration;

use http::{HeaderMap, HeaderName, StatusCode};
use strait_xds::model::{HeaderMatchSpec, HeaderMatcher, RetryOn, RetryPolicy, Thresholds};

pub const X_ENVOY_RETRY_ON: HeaderName = HeaderName::from_static("x-envoy-retry-on");
pub const X_ENVOY_RETRY_GRPC_ON: HeaderName = HeaderName::from_static("x-envoy-retry-grpc-on");
pub const X_ENVOY_MAX_RETRIES: HeaderName = HeaderName::from_static("x-envoy-max-retries");

/// Removes the retry headers an untrusted (edge, external) client must not set.
pub fn strip_internal(headers: &mut HeaderMap) {
    if !has_envoy_headers(headers) {
        return;
    }
    headers.remove(X_ENVOY_RETRY_ON);
    headers.remove(X_ENVOY_RETRY_GRPC_ON);
    headers.remove(X_ENVOY_MAX_RETRIES);
}

/// Whether any `x-envoy-*` header is present: one pass over the names instead of three lookups
/// by name, for the usual request that has none.
fn has_envoy_headers(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|k| k.as_str().as_bytes().starts_with(b"x-envoy-"))
}

/// Tokens of a retry header; unknown ones are ignored, as Envoy does for headers (config
/// rejects them instead).
fn header_bits(headers: &HeaderMap, name: &HeaderName) -> u32 {
    let mut bits = 0;
    for v in headers.get_all(name) {
        let Ok(s) = v.to_str() else { continue };
        for tok in s.split(',').map(str::trim) {
            if let Ok(r) = RetryOn::parse(tok) {
                bits |= r.0;
            }
        }
    }
    bits
}

/// The route's retry policy with the request's retry headers applied: header conditions are
/// added to the route's, `x-envoy-max-retries` replaces `num_retries`. A request without a
/// route policy retries only when its headers ask for it.
pub fn effective_policy<'a>(
    route: Option<&'a RetryPolicy>,
    headers: &HeaderMap,
) -> Option<Cow<'a, RetryPolicy>> {
    if !has_envoy_headers(headers) {
        return route.map(Cow::Borrowed);
    }
    let bits =
        header_bits(headers, &X_ENVOY_RETRY_ON) | header_bits(headers, &X_ENVOY_RETRY_GRPC_ON);
    let max = headers
        .get(&X_ENVOY_MAX_RETRIES)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok());
    if bits == 0 && max.is_none() {
        return route.map(Cow::Borrowed);
    }
    let mut p = match route {
        Some(r) => r.clone(),
        None if bits == 0 => return None,
        None => RetryPolicy {
            retry_on: RetryOn::default(),
            num_retries: 1,
            per_try_timeout: None,
            retriable_status_codes: Vec::new(),
            back_off_base: Duration::from_millis(25),
            back_off_max: Duration::from_millis(250),
            retriable_headers: Vec::new(),
            previous_hosts: false,
            host_selection_retry_max_attempts: 1,
            previous_priorities: None,
        },
    };
    p.retry_on.0 |= bits;
    if let Some(n) = max {
        p.num_retries = n;
    }
    Some(Cow::Owned(p))
}

/// The gRPC status of a trailers-only answer (in the response headers).
fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn header_matches(m: &HeaderMatcher, headers: &HeaderMap) -> bool {
    let value = headers
        .get(m.name.as_str())
        .map(|v| String::from_utf8_lossy(v.as_bytes()));
    let hit = match (&m.spec, value) {
        (HeaderMatchSpec::Present(p), v) => v.is_some() == *p,
        (HeaderMatchSpec::StringMatch(s), Some(v)) => s.matches(&v),
        (HeaderMatchSpec::StringMatch(_), None) => false,
    };
    hit != m.invert
}

/// Envoy's `RetryStateImpl::wouldRetryFromHeaders` for an upstream answer.
pub fn retriable_response(p: &RetryPolicy, status: StatusCode, headers: &HeaderMap) -> bool {
    let s = status.as_u16();
    let on = p.retry_on;
    if (on.has(RetryOn::FIVE_XX) && status.is_server_error())
        || (on.has(RetryOn::GATEWAY_ERROR) && matches!(s, 502..=504))
        || (on.has(RetryOn::RETRIABLE_STATUS_CODES) && p.retriable_status_codes.contains(&s))
        || (on.has(RetryOn::RETRIABLE_4XX) && s == 409)
    {
        return true;
    }
    if on.has(RetryOn::RETRIABLE_HEADERS)
        && p.retriable_headers
            .iter()
            .any(|m| header_matches(m, headers))
    {
        return true;
    }
    match grpc_status(headers) {
        Some(1) => on.has(RetryOn::GRPC_CANCELLED),
        Some(4) => on.has(RetryOn::GRPC_DEADLINE_EXCEEDED),
        Some(8) => on.has(RetryOn::GRPC_RESOURCE_EXHAUSTED),
        Some(13) => on.has(RetryOn::GRPC_INTERNAL),
        Some(14) => on.has(RetryOn::GRPC_UNAVAILABLE),
        _ => false,
    }
}

/// The most retries that may be active at once: the retry budget when configured
/// (`budget_percent` of active plus pending requests, at least `min_retry_concurrency`), else
/// `max_retries`.
pub fn max_active_retries(t: &Thresholds, active_requests: i64, pending_requests: i64) -> u32 {
    match t.retry_budget {
        Some(b) => {
            let base = (active_requests.max(0) + pending_requests.max(0)) as f64;
            let budget = (base * b.budget_percent / 100.0) as u32;
            budget.max(b.min_retry_concurrency)
        }
        None => t.max_retries,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use strait_xds::model::RetryBudget;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn headers_merge_into_policy() {
        assert!(effective_policy(None, &HeaderMap::new()).is_none());
        assert!(effective_policy(None, &headers(&[("x-envoy-max-retries", "3")])).is_none());
        let p = effective_policy(
            None,
            &headers(&[
                ("x-envoy-retry-on", "5xx,bogus"),
                ("x-envoy-max-retries", "4"),
            ]),
        )
        .unwrap();
        assert!(p.retry_on.has(RetryOn::FIVE_XX));
        assert_eq!(p.num_retries, 4);
        let p =
            effective_policy(None, &headers(&[("x-envoy-retry-grpc-on", "unavailable")])).unwrap();
        assert!(p.retry_on.has(RetryOn::GRPC_UNAVAILABLE));
        assert_eq!(p.num_retries, 1);
    }

    #[test]
    fn grpc_and_status_conditions() {
        let p = effective_policy(
            None,
            &headers(&[("x-envoy-retry-on", "unavailable,retriable-4xx")]),
        )
        .unwrap();
        assert!(retriable_response(
            &p,
            StatusCode::OK,
            &headers(&[("grpc-status", "14")])
        ));
        assert!(!retriable_response(
            &p,
            StatusCode::OK,
            &headers(&[("grpc-status", "13")])
        ));
        assert!(retriable_response(
            &p,
            StatusCode::CONFLICT,
            &HeaderMap::new()
        ));
        assert!(!retriable_response(
            &p,
            StatusCode::SERVICE_UNAVAILABLE,
            &HeaderMap::new()
        ));
    }

    #[test]
    fn budget() {
        let mut t = Thresholds::default();
        assert_eq!(max_active_retries(&t, 100, 0), 3);
        t.retry_budget = Some(RetryBudget {
            budget_percent: 20.0,
            min_retry_concurrency: 3,
        });
        assert_eq!(max_active_retries(&t, 100, 50), 30);
        assert_eq!(max_active_retries(&t, 1, 0), 3);
    }
}
