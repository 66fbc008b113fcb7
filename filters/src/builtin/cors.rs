//! `envoy.filters.http.cors`: answers CORS preflight requests and adds the CORS response headers,
//! following the route's `CorsPolicy` (given per route through `typed_per_filter_config`; the
//! filter-level `Cors` config has no fields). Without a policy the filter does nothing.

use std::sync::Arc;

use envoy_types::pb::envoy::extensions::filters::http::cors::v3::{Cors, CorsPolicy};
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
};
use http::{HeaderValue, Method, StatusCode};

use crate::api::{Action, FilterContext, Hooks, HttpFilter, LocalReply, PerRoute};
use crate::convert::{invalid, reject_set, runtime_fractional, PerMillion, Result, StringMatch};
use crate::registry::{decode, per_route, BuildContext, FilterConfigError, FilterFactory};
use crate::stats::Counter;

pub const TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors";
pub const PER_ROUTE_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy";

/// A parsed `CorsPolicy`.
#[derive(Debug)]
pub struct Policy {
    allow_origins: Vec<StringMatch>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    allow_credentials: bool,
    enabled: PerMillion,
    forward_not_matching_preflights: bool,
}

fn opt_value(s: &str, path: &str, field: &str) -> Result<Option<HeaderValue>> {
    if s.is_empty() {
        return Ok(None);
    }
    HeaderValue::from_str(s)
        .map(Some)
        .map_err(|_| invalid(path, field, "invalid header value"))
}

fn parse(p: &CorsPolicy, path: &str) -> Result<Policy> {
    let CorsPolicy {
        allow_origin_string_match,
        allow_methods,
        allow_headers,
        expose_headers,
        max_age,
        allow_credentials,
        filter_enabled,
        shadow_enabled,
        allow_private_network_access,
        forward_not_matching_preflights,
    } = p;
    reject_set(shadow_enabled.is_some(), path, "shadow_enabled")?;
    reject_set(
        allow_private_network_access.is_some_and(|b| b.value),
        path,
        "allow_private_network_access",
    )?;
    if !max_age.is_empty() && max_age.parse::<u64>().is_err() {
        return Err(invalid(path, "max_age", "must be a number of seconds"));
    }
    Ok(Policy {
        allow_origins: allow_origin_string_match
            .iter()
            .enumerate()
            .map(|(i, m)| {
                StringMatch::from_proto(m, &format!("{path}.allow_origin_string_match[{i}]"))
            })
            .collect::<Result<_>>()?,
        allow_methods: opt_value(allow_methods, path, "allow_methods")?,
        allow_headers: opt_value(allow_headers, path, "allow_headers")?,
        expose_headers: opt_value(expose_headers, path, "expose_headers")?,
        max_age: opt_value(max_age, path, "max_age")?,
        allow_credentials: allow_credentials.is_some_and(|b| b.value),
        // Envoy: filter_enabled defaults to 100%.
        enabled: runtime_fractional(
            filter_enabled.as_ref(),
            &format!("{path}.filter_enabled"),
            PerMillion::ALL,
        )?,
        forward_not_matching_preflights: forward_not_matching_preflights.is_none_or(|b| b.value),
    })
}

impl Policy {
    /// Envoy also accepts an origin when a matcher matches the literal `*`.
    fn origin_allowed(&self, origin: &str) -> bool {
        self.allow_origins
            .iter()
            .any(|m| m.matches("*") || m.matches(origin))
    }
}

/// Per-request: the request was an allowed CORS request with this origin.
#[derive(Default)]
struct CorsRequest {
    origin: Option<HeaderValue>,
    policy: Option<Arc<Policy>>,
    /// The preflight reply already carries its headers.
    answered: bool,
}

#[derive(Debug)]
pub struct CorsFilter {
    origin_valid: Arc<Counter>,
    origin_invalid: Arc<Counter>,
}

impl HttpFilter for CorsFilter {
    fn hooks(&self) -> Hooks {
        Hooks::REQUEST_HEADERS | Hooks::RESPONSE_HEADERS
    }

    fn on_request_headers(
        &self,
        ctx: &mut FilterContext,
        req: &mut http::request::Parts,
    ) -> Action {
        let Some(policy) = ctx.route_config::<Policy>() else {
            return Action::Continue;
        };
        if !policy.enabled.sample() {
            return Action::Continue;
        }
        let Some(origin) = req.headers.get(ORIGIN).filter(|o| !o.is_empty()) else {
            return Action::Continue;
        };
        let is_preflight = req.method == Method::OPTIONS
            && req
                .headers
                .get(ACCESS_CONTROL_REQUEST_METHOD)
                .is_some_and(|m| !m.is_empty());
        if !policy.origin_allowed(origin.to_str().unwrap_or("")) {
            self.origin_invalid.inc();
            if is_preflight && !policy.forward_not_matching_preflights {
                return Action::reply(LocalReply::new(StatusCode::OK, "", "cors_response"));
            }
            return Action::Continue;
        }
        self.origin_valid.inc();
        let origin = origin.clone();
        if !is_preflight {
            let state = ctx.local::<CorsRequest>();
            state.origin = Some(origin);
            state.policy = Some(policy);
            return Action::Continue;
        }
        let mut reply = LocalReply::new(StatusCode::OK, "", "cors_response");
        let h = &mut reply.headers;
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        if policy.allow_credentials {
            h.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &policy.allow_methods {
            h.insert(ACCESS_CONTROL_ALLOW_METHODS, v.clone());
        }
        if let Some(v) = &policy.allow_headers {
            h.insert(ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
        if let Some(v) = &policy.max_age {
            h.insert(ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        ctx.local::<CorsRequest>().answered = true;
        Action::reply(reply)
    }

    fn on_response_headers(
        &self,
        ctx: &mut FilterContext,
        resp: &mut http::response::Parts,
    ) -> Action {
        let Some(CorsRequest {
            origin: Some(origin),
            policy: Some(policy),
            answered: false,
        }) = ctx.local_ref::<CorsRequest>()
        else {
            return Action::Continue;
        };
        resp.headers
            .insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if policy.allow_credentials {
            resp.headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &policy.expose_headers {
            resp.headers
                .insert(ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
        Action::Continue
    }
}

pub struct Factory;

impl FilterFactory for Factory {
    fn type_url(&self) -> &'static str {
        TYPE_URL
    }

    fn per_route_type_urls(&self) -> &'static [&'static str] {
        &[PER_ROUTE_TYPE_URL]
    }

    fn build(
        &self,
        value: &[u8],
        path: &str,
        cx: &BuildContext<'_>,
    ) -> std::result::Result<Arc<dyn HttpFilter>, FilterConfigError> {
        let Cors {} = decode(value, path)?;
        let p = format!("http.{}.cors.", cx.stat_prefix);
        Ok(Arc::new(CorsFilter {
            origin_valid: cx.stats.counter(&format!("{p}origin_valid")),
            origin_invalid: cx.stats.counter(&format!("{p}origin_invalid")),
        }))
    }

    fn build_per_route(
        &self,
        _type_url: &str,
        value: &[u8],
        path: &str,
        _cx: &BuildContext<'_>,
    ) -> std::result::Result<PerRoute, FilterConfigError> {
        let policy: CorsPolicy = decode(value, path)?;
        Ok(per_route(parse(&policy, path)?))
    }
}
