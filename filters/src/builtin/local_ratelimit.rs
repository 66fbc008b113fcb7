//! `envoy.filters.http.local_ratelimit`: a per-process token bucket per filter, or per route
//! when a route carries its own config. The bucket is lock-free: one atomic word holds the
//! tokens left and the fill period they were counted in; refills are computed from elapsed time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, TokenBucket as PbTokenBucket};
use http::{HeaderValue, StatusCode};
use tokio::time::Instant;

use crate::api::{Action, FilterContext, Hooks, HttpFilter, LocalReply, PerRoute};
use crate::convert::{
    duration, invalid, reject_set, runtime_fractional, HeaderAdd, PerMillion, Result,
};
use crate::registry::{decode, per_route, BuildContext, FilterConfigError, FilterFactory};
use crate::stats::{Counter, StatsSink};

pub const TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";

/// Tokens refill in whole `fill_interval` steps, as Envoy's timer-driven bucket does.
#[derive(Debug)]
pub struct TokenBucket {
    max_tokens: u32,
    tokens_per_fill: u32,
    fill_interval: Duration,
    start: Instant,
    /// High 32 bits: tokens left; low 32 bits: fill period index (wrapping).
    state: AtomicU64,
}

fn pack(tokens: u32, period: u32) -> u64 {
    (u64::from(tokens) << 32) | u64::from(period)
}

impl TokenBucket {
    pub fn new(max_tokens: u32, tokens_per_fill: u32, fill_interval: Duration) -> Self {
        TokenBucket {
            max_tokens,
            tokens_per_fill,
            fill_interval,
            start: Instant::now(),
            state: AtomicU64::new(pack(max_tokens, 0)),
        }
    }

    fn period_now(&self) -> u32 {
        let nanos = self.fill_interval.as_nanos().max(1);
        // Wrapping is fine: only differences between periods are used.
        (self.start.elapsed().as_nanos() / nanos) as u32
    }

    /// Takes one token if there is one.
    pub fn try_acquire(&self) -> bool {
        let now = self.period_now();
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            let tokens = (cur >> 32) as u32;
            let period = cur as u32;
            let elapsed = now.wrapping_sub(period);
            let refilled = if elapsed == 0 || elapsed > u32::MAX / 2 {
                // `elapsed > MAX/2`: another thread stored a later period; keep it.
                tokens
            } else {
                let add = u64::from(elapsed) * u64::from(self.tokens_per_fill);
                (u64::from(tokens) + add).min(u64::from(self.max_tokens)) as u32
            };
            let new_period = if elapsed > u32::MAX / 2 { period } else { now };
            if refilled == 0 {
                if refilled != tokens || new_period != period {
                    let _ = self.state.compare_exchange(
                        cur,
                        pack(0, new_period),
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                return false;
            }
            match self.state.compare_exchange_weak(
                cur,
                pack(refilled - 1, new_period),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }
}

#[derive(Debug)]
struct Stats {
    enabled: Arc<Counter>,
    enforced: Arc<Counter>,
    rate_limited: Arc<Counter>,
    ok: Arc<Counter>,
}

/// One parsed `LocalRateLimit` with its bucket (filter level or one route).
#[derive(Debug)]
pub struct Limiter {
    bucket: Option<TokenBucket>,
    enabled: PerMillion,
    enforced: PerMillion,
    status: StatusCode,
    response_headers: Vec<HeaderAdd>,
    request_headers_when_not_enforced: Vec<HeaderAdd>,
    stats: Stats,
}

fn parse(cfg: &LocalRateLimit, path: &str, stats: &dyn StatsSink) -> Result<Limiter> {
    let LocalRateLimit {
        stat_prefix,
        status,
        token_bucket,
        filter_enabled,
        filter_enforced,
        request_headers_to_add_when_not_enforced,
        response_headers_to_add,
        descriptors,
        stage,
        local_rate_limit_per_downstream_connection,
        local_cluster_rate_limit,
        enable_x_ratelimit_headers,
        vh_rate_limits,
        always_consume_default_token_bucket,
        rate_limited_as_resource_exhausted,
        rate_limits,
        max_dynamic_descriptors,
        enable_retry_after_header,
    } = cfg;
    if stat_prefix.is_empty() {
        return Err(invalid(path, "stat_prefix", "required"));
    }
    reject_set(!descriptors.is_empty(), path, "descriptors")?;
    reject_set(*stage != 0, path, "stage")?;
    reject_set(
        *local_rate_limit_per_downstream_connection,
        path,
        "local_rate_limit_per_downstream_connection",
    )?;
    reject_set(
        local_cluster_rate_limit.is_some(),
        path,
        "local_cluster_rate_limit",
    )?;
    reject_set(
        *enable_x_ratelimit_headers != 0,
        path,
        "enable_x_ratelimit_headers",
    )?;
    // vh_rate_limits selects route vs virtual-host `rate_limits` descriptors; without
    // descriptors it has no effect.
    let _ = vh_rate_limits;
    reject_set(
        always_consume_default_token_bucket.is_some(),
        path,
        "always_consume_default_token_bucket",
    )?;
    reject_set(
        *rate_limited_as_resource_exhausted,
        path,
        "rate_limited_as_resource_exhausted",
    )?;
    reject_set(!rate_limits.is_empty(), path, "rate_limits")?;
    reject_set(
        max_dynamic_descriptors.is_some(),
        path,
        "max_dynamic_descriptors",
    )?;
    reject_set(
        *enable_retry_after_header,
        path,
        "enable_retry_after_header",
    )?;

    let bucket = match token_bucket {
        Some(PbTokenBucket {
            max_tokens,
            tokens_per_fill,
            fill_interval,
        }) => {
            let p = format!("{path}.token_bucket");
            if *max_tokens == 0 {
                return Err(invalid(&p, "max_tokens", "must be greater than 0"));
            }
            let per_fill = tokens_per_fill.map_or(1, |v| v.value);
            if per_fill == 0 {
                return Err(invalid(&p, "tokens_per_fill", "must be greater than 0"));
            }
            let Some(fill) = fill_interval else {
                return Err(invalid(&p, "fill_interval", "required"));
            };
            let fill = duration(fill, &format!("{p}.fill_interval"))?;
            // Envoy rejects fill intervals under 50ms.
            if fill < Duration::from_millis(50) {
                return Err(invalid(&p, "fill_interval", "must be at least 50ms"));
            }
            Some(TokenBucket::new(*max_tokens, per_fill, fill))
        }
        None => None,
    };
    // Envoy: status codes below 400 fall back to 429.
    let status = match status {
        Some(HttpStatus { code }) => u16::try_from(*code)
            .ok()
            .filter(|c| *c >= 400)
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::TOO_MANY_REQUESTS),
        None => StatusCode::TOO_MANY_REQUESTS,
    };
    let headers = |list: &[envoy_types::pb::envoy::config::core::v3::HeaderValueOption],
                   field: &str| {
        list.iter()
            .enumerate()
            .map(|(i, h)| HeaderAdd::from_proto(h, &format!("{path}.{field}[{i}]")))
            .collect::<Result<Vec<_>>>()
    };
    let p = format!("{stat_prefix}.http_local_rate_limit.");
    Ok(Limiter {
        bucket,
        // Envoy: unset filter_enabled / filter_enforced mean 0%.
        enabled: runtime_fractional(
            filter_enabled.as_ref(),
            &format!("{path}.filter_enabled"),
            PerMillion::NONE,
        )?,
        enforced: runtime_fractional(
            filter_enforced.as_ref(),
            &format!("{path}.filter_enforced"),
            PerMillion::NONE,
        )?,
        status,
        response_headers: headers(response_headers_to_add, "response_headers_to_add")?,
        request_headers_when_not_enforced: headers(
            request_headers_to_add_when_not_enforced,
            "request_headers_to_add_when_not_enforced",
        )?,
        stats: Stats {
            enabled: stats.counter(&format!("{p}enabled")),
            enforced: stats.counter(&format!("{p}enforced")),
            rate_limited: stats.counter(&format!("{p}rate_limited")),
            ok: stats.counter(&format!("{p}ok")),
        },
    })
}

#[derive(Debug)]
pub struct LocalRateLimitFilter {
    limiter: Arc<Limiter>,
}

impl HttpFilter for LocalRateLimitFilter {
    fn hooks(&self) -> Hooks {
        Hooks::REQUEST_HEADERS
    }

    fn on_request_headers(
        &self,
        ctx: &mut FilterContext,
        req: &mut http::request::Parts,
    ) -> Action {
        let route = ctx.route_config::<Limiter>();
        let l = route.as_deref().unwrap_or(&self.limiter);
        let Some(bucket) = &l.bucket else {
            return Action::Continue;
        };
        if !l.enabled.sample() {
            return Action::Continue;
        }
        l.stats.enabled.inc();
        if bucket.try_acquire() {
            l.stats.ok.inc();
            return Action::Continue;
        }
        l.stats.rate_limited.inc();
        if !l.enforced.sample() {
            for h in &l.request_headers_when_not_enforced {
                h.apply(&mut req.headers);
            }
            return Action::Continue;
        }
        l.stats.enforced.inc();
        let mut reply =
            LocalReply::new(l.status, "local_rate_limited", "local_rate_limited").with_flag("RL");
        reply
            .headers
            .insert("x-envoy-ratelimited", HeaderValue::from_static("true"));
        for h in &l.response_headers {
            h.apply(&mut reply.headers);
        }
        Action::reply(reply)
    }
}

pub struct Factory;

impl FilterFactory for Factory {
    fn type_url(&self) -> &'static str {
        TYPE_URL
    }

    fn per_route_type_urls(&self) -> &'static [&'static str] {
        &[TYPE_URL]
    }

    fn build(
        &self,
        value: &[u8],
        path: &str,
        cx: &BuildContext<'_>,
    ) -> std::result::Result<Arc<dyn HttpFilter>, FilterConfigError> {
        let cfg: LocalRateLimit = decode(value, path)?;
        Ok(Arc::new(LocalRateLimitFilter {
            limiter: Arc::new(parse(&cfg, path, cx.stats)?),
        }))
    }

    fn build_per_route(
        &self,
        _type_url: &str,
        value: &[u8],
        path: &str,
        cx: &BuildContext<'_>,
    ) -> std::result::Result<PerRoute, FilterConfigError> {
        let cfg: LocalRateLimit = decode(value, path)?;
        Ok(per_route(parse(&cfg, path, cx.stats)?))
    }
}
