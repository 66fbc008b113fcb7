//! `envoy.filters.http.cors`: answers CORS preflight requests and adds the CORS response headers,
//! following the route's `CorsPolicy` (given per route through `typed_per_filter_config`; the
//! filter-level `Cors` config has no fields). Without a policy the filter does nothing. As Envoy,
//! the policies of every level combine field by field: each field comes from the most specific
//! level that sets it.

use std::sync::Arc;

use envoy_types::pb::envoy::extensions::filters::http::cors::v3::{Cors, CorsPolicy};
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
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
    allow_credentials: Option<bool>,
    enabled: PerMillion,
    forward_not_matching_preflights: Option<bool>,
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
        allow_credentials: allow_credentials.map(|b| b.value),
        // Envoy: filter_enabled defaults to 100%.
        enabled: runtime_fractional(
            filter_enabled.as_ref(),
            &format!("{path}.filter_enabled"),
            PerMillion::ALL,
        )?,
        forward_not_matching_preflights: forward_not_matching_preflights.map(|b| b.value),
    })
}

/// The route's policies, most specific first (at most route, virtual host, route
/// configuration), read field by field as Envoy's `CorsFilter` does.
struct Levels<'a>([Option<&'a Policy>; 3]);

impl<'a> Levels<'a> {
    fn of(ctx: &'a FilterContext) -> Option<Levels<'a>> {
        let mut levels = [None; 3];
        for (slot, p) in levels.iter_mut().zip(ctx.route_configs::<Policy>().rev()) {
            *slot = Some(p);
        }
        levels[0].is_some().then_some(Levels(levels))
    }

    fn first<T>(&self, f: impl Fn(&'a Policy) -> Option<T>) -> Option<T> {
        self.0.iter().flatten().find_map(|p| f(p))
    }

    /// Envoy also accepts an origin when a matcher matches the literal `*`.
    fn origin_allowed(&self, origin: &str) -> bool {
        self.first(|p| (!p.allow_origins.is_empty()).then_some(&p.allow_origins))
            .is_some_and(|ms| ms.iter().any(|m| m.matches("*") || m.matches(origin)))
    }

    fn allow_credentials(&self) -> bool {
        self.first(|p| p.allow_credentials).unwrap_or(false)
    }

    fn forward_not_matching_preflights(&self) -> bool {
        self.first(|p| p.forward_not_matching_preflights)
            .unwrap_or(true)
    }
}

/// Per-request: the request was an allowed CORS request with this origin; what the response
/// needs of the policy. Set for preflights too: Envoy runs the filter's response hook on its
/// own preflight reply, which so also gets `access-control-expose-headers`.
#[derive(Default)]
struct CorsRequest {
    origin: Option<HeaderValue>,
    allow_credentials: bool,
    expose_headers: Option<HeaderValue>,
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
        let Some(levels) = Levels::of(ctx) else {
            return Action::Continue;
        };
        // `filter_enabled` is the most specific policy's (Envoy reads `policies_[0]`).
        if !levels.0[0].is_some_and(|p| p.enabled.sample()) {
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
        let allowed = levels.origin_allowed(origin.to_str().unwrap_or(""));
        if allowed {
            self.origin_valid.inc();
        } else {
            self.origin_invalid.inc();
        }
        let state = allowed.then(|| CorsRequest {
            origin: Some(origin.clone()),
            allow_credentials: levels.allow_credentials(),
            expose_headers: levels.first(|p| p.expose_headers.clone()),
        });
        if !is_preflight || (!allowed && levels.forward_not_matching_preflights()) {
            if let Some(state) = state {
                *ctx.local::<CorsRequest>() = state;
            }
            return Action::Continue;
        }
        // Envoy answers a preflight it does not forward with the policy's headers, and the
        // allowed origin only when it matched.
        let mut reply = LocalReply::new(StatusCode::OK, "", "cors_response");
        let h = &mut reply.headers;
        if allowed {
            h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        }
        if levels.allow_credentials() {
            h.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        // `*` echoes what the preflight asks for.
        let echo = |v: &HeaderValue, asked: Option<&HeaderValue>| {
            if v.as_bytes() == b"*" {
                asked
                    .cloned()
                    .unwrap_or_else(|| HeaderValue::from_static(""))
            } else {
                v.clone()
            }
        };
        if let Some(v) = levels.first(|p| p.allow_methods.as_ref()) {
            h.insert(
                ACCESS_CONTROL_ALLOW_METHODS,
                echo(v, req.headers.get(ACCESS_CONTROL_REQUEST_METHOD)),
            );
        }
        if let Some(v) = levels.first(|p| p.allow_headers.as_ref()) {
            h.insert(
                ACCESS_CONTROL_ALLOW_HEADERS,
                echo(v, req.headers.get(ACCESS_CONTROL_REQUEST_HEADERS)),
            );
        }
        if let Some(v) = levels.first(|p| p.max_age.as_ref()) {
            h.insert(ACCESS_CONTROL_MAX_AGE, v.clone());
        }
        if let Some(state) = state {
            *ctx.local::<CorsRequest>() = state;
        }
        Action::reply(reply)
    }

    fn on_response_headers(
        &self,
        ctx: &mut FilterContext,
        resp: &mut http::response::Parts,
    ) -> Action {
        let Some(CorsRequest {
            origin: Some(origin),
            allow_credentials,
            expose_headers,
        }) = ctx.local_ref::<CorsRequest>()
        else {
            return Action::Continue;
        };
        resp.headers
            .insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if *allow_credentials {
            resp.headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = expose_headers {
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
