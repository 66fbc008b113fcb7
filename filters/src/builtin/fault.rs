//! `envoy.filters.http.fault`: injects delays and aborts into a configured share of requests,
//! optionally controlled by `x-envoy-fault-*` request headers, bounded by `max_active_faults`.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{
    fault_delay::FaultDelaySecifier, FaultDelay,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
    fault_abort::ErrorType, FaultAbort, HttpFault,
};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use http::StatusCode;

use crate::api::{Action, FilterContext, Hooks, HttpFilter, LocalReply, PerRoute};
use crate::convert::{
    duration, fractional, invalid, reject_set, unsupported, HeaderMatch, PerMillion, Result,
};
use crate::registry::{decode, per_route, BuildContext, FilterConfigError, FilterFactory};
use crate::stats::{Counter, Gauge};

pub const TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";

const ABORT_HEADER: &str = "x-envoy-fault-abort-request";
const ABORT_PCT_HEADER: &str = "x-envoy-fault-abort-request-percentage";
const DELAY_HEADER: &str = "x-envoy-fault-delay-request";
const DELAY_PCT_HEADER: &str = "x-envoy-fault-delay-request-percentage";

/// A percentage with its denominator kept, because header percentages are read in the
/// configured denominator (Envoy's `HeaderPercentageProvider`).
#[derive(Debug, Clone, Copy)]
struct Pct {
    numerator: u32,
    /// Parts per million of one numerator unit.
    unit: u32,
}

impl Pct {
    fn from_proto(fp: Option<&FractionalPercent>, path: &str) -> Result<Pct> {
        // Envoy: an unset percentage is 0/100.
        let fp = fp.copied().unwrap_or_default();
        let unit = fractional(
            &FractionalPercent {
                numerator: 1,
                denominator: fp.denominator,
            },
            path,
        )?
        .0;
        Ok(Pct {
            numerator: fp.numerator,
            unit,
        })
    }

    fn per_million(self, header_numerator: Option<u32>) -> PerMillion {
        let n = header_numerator.map_or(self.numerator, |h| h.min(self.numerator));
        PerMillion((u64::from(n) * u64::from(self.unit)).min(1_000_000) as u32)
    }
}

#[derive(Debug, Clone)]
enum DelayKind {
    Fixed(Duration),
    Header,
}

#[derive(Debug, Clone)]
enum AbortKind {
    Status(StatusCode),
    Header,
}

/// A parsed `HTTPFault` (the filter config and the per-route override have the same shape).
#[derive(Debug, Clone)]
pub struct FaultConfig {
    delay: Option<(DelayKind, Pct)>,
    abort: Option<(AbortKind, Pct, String)>,
    headers: Vec<HeaderMatch>,
    max_active_faults: Option<u32>,
}

fn parse(cfg: &HttpFault, path: &str) -> Result<FaultConfig> {
    let HttpFault {
        delay,
        abort,
        upstream_cluster,
        headers,
        downstream_nodes,
        max_active_faults,
        response_rate_limit,
        // Runtime keys: Strait has no runtime layer, and Envoy uses the configured values when a
        // key is absent from runtime, so accepting them behaves like Envoy with empty runtime.
        delay_percent_runtime: _,
        abort_percent_runtime: _,
        delay_duration_runtime: _,
        abort_http_status_runtime: _,
        max_active_faults_runtime: _,
        response_rate_limit_percent_runtime: _,
        abort_grpc_status_runtime: _,
        // Only affects per-downstream-cluster stats, which Strait does not emit.
        disable_downstream_cluster_stats: _,
        filter_metadata,
    } = cfg;
    reject_set(!upstream_cluster.is_empty(), path, "upstream_cluster")?;
    reject_set(!downstream_nodes.is_empty(), path, "downstream_nodes")?;
    reject_set(response_rate_limit.is_some(), path, "response_rate_limit")?;
    reject_set(filter_metadata.is_some(), path, "filter_metadata")?;
    let delay = match delay {
        Some(FaultDelay {
            percentage,
            fault_delay_secifier,
        }) => {
            let p = format!("{path}.delay");
            let kind = match fault_delay_secifier {
                Some(FaultDelaySecifier::FixedDelay(d)) => {
                    DelayKind::Fixed(duration(d, &format!("{p}.fixed_delay"))?)
                }
                Some(FaultDelaySecifier::HeaderDelay(_)) => DelayKind::Header,
                None => {
                    return Err(invalid(
                        &p,
                        "fault_delay_secifier",
                        "one of fixed_delay, header_delay is required",
                    ))
                }
            };
            Some((
                kind,
                Pct::from_proto(percentage.as_ref(), &format!("{p}.percentage"))?,
            ))
        }
        None => None,
    };
    let abort = match abort {
        Some(FaultAbort {
            percentage,
            response_body,
            error_type,
        }) => {
            let p = format!("{path}.abort");
            let kind = match error_type {
                Some(ErrorType::HttpStatus(code)) => {
                    match StatusCode::from_u16(u16::try_from(*code).unwrap_or(0)) {
                        Ok(s) if (200..600).contains(code) => AbortKind::Status(s),
                        _ => {
                            return Err(invalid(
                                &p,
                                "http_status",
                                format!("{code} is not in [200, 600)"),
                            ))
                        }
                    }
                }
                Some(ErrorType::GrpcStatus(_)) => return Err(unsupported(&p, "grpc_status")),
                Some(ErrorType::HeaderAbort(_)) => AbortKind::Header,
                None => {
                    return Err(invalid(
                        &p,
                        "error_type",
                        "one of http_status, grpc_status, header_abort is required",
                    ))
                }
            };
            let body = if response_body.is_empty() {
                "fault filter abort".to_string()
            } else {
                response_body.clone()
            };
            Some((
                kind,
                Pct::from_proto(percentage.as_ref(), &format!("{p}.percentage"))?,
                body,
            ))
        }
        None => None,
    };
    let headers = headers
        .iter()
        .enumerate()
        .map(|(i, h)| HeaderMatch::from_proto(h, &format!("{path}.headers[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    Ok(FaultConfig {
        delay,
        abort,
        headers,
        max_active_faults: max_active_faults.map(|v| v.value),
    })
}

#[derive(Debug)]
struct Stats {
    delays_injected: Arc<Counter>,
    aborts_injected: Arc<Counter>,
    faults_overflow: Arc<Counter>,
    active_faults: Arc<Gauge>,
}

/// Decrements `active_faults` when the request ends (the context, which owns it, is dropped).
struct ActiveFault(Arc<Gauge>);

impl Drop for ActiveFault {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Default)]
struct Active(Option<ActiveFault>);

#[derive(Debug)]
pub struct FaultFilter {
    config: Arc<FaultConfig>,
    stats: Arc<Stats>,
}

fn header_u32(req: &http::request::Parts, name: &str) -> Option<u32> {
    req.headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

impl FaultFilter {
    fn abort_reply(status: StatusCode, body: &str) -> Action {
        Action::reply(
            LocalReply::new(status, body.to_string(), "fault_filter_abort").with_flag("FI"),
        )
    }
}

impl HttpFilter for FaultFilter {
    fn hooks(&self) -> Hooks {
        Hooks::REQUEST_HEADERS
    }

    fn on_request_headers(
        &self,
        ctx: &mut FilterContext,
        req: &mut http::request::Parts,
    ) -> Action {
        let cfg = ctx
            .route_config::<FaultConfig>()
            .unwrap_or_else(|| self.config.clone());
        if !cfg.headers.iter().all(|h| h.matches_request(req)) {
            return Action::Continue;
        }
        let delay = cfg.delay.as_ref().and_then(|(kind, pct)| {
            let duration = match kind {
                DelayKind::Fixed(d) => *d,
                DelayKind::Header => {
                    Duration::from_millis(u64::from(header_u32(req, DELAY_HEADER)?))
                }
            };
            let header_pct = matches!(kind, DelayKind::Header)
                .then(|| header_u32(req, DELAY_PCT_HEADER))
                .flatten();
            pct.per_million(header_pct).sample().then_some(duration)
        });
        let abort = cfg.abort.as_ref().and_then(|(kind, pct, body)| {
            let status = match kind {
                AbortKind::Status(s) => *s,
                AbortKind::Header => {
                    let code = header_u32(req, ABORT_HEADER)?;
                    if !(200..600).contains(&code) {
                        return None;
                    }
                    StatusCode::from_u16(u16::try_from(code).ok()?).ok()?
                }
            };
            let header_pct = matches!(kind, AbortKind::Header)
                .then(|| header_u32(req, ABORT_PCT_HEADER))
                .flatten();
            pct.per_million(header_pct)
                .sample()
                .then(|| (status, body.clone()))
        });
        if delay.is_none() && abort.is_none() {
            return Action::Continue;
        }
        if let Some(max) = cfg.max_active_faults {
            if self.stats.active_faults.get() >= i64::from(max) {
                self.stats.faults_overflow.inc();
                return Action::Continue;
            }
        }
        self.stats.active_faults.inc();
        ctx.local::<Active>().0 = Some(ActiveFault(self.stats.active_faults.clone()));
        match (delay, abort) {
            (Some(d), abort) => {
                self.stats.delays_injected.inc();
                ctx.response_flags.push("DI");
                let stats = self.stats.clone();
                Action::Wait(Box::pin(async move {
                    tokio::time::sleep(d).await;
                    match abort {
                        Some((status, body)) => {
                            stats.aborts_injected.inc();
                            FaultFilter::abort_reply(status, &body)
                        }
                        None => Action::Continue,
                    }
                }))
            }
            (None, Some((status, body))) => {
                self.stats.aborts_injected.inc();
                FaultFilter::abort_reply(status, &body)
            }
            (None, None) => Action::Continue,
        }
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
        let cfg: HttpFault = decode(value, path)?;
        let config = Arc::new(parse(&cfg, path)?);
        let p = format!("http.{}.fault.", cx.stat_prefix);
        let stats = Arc::new(Stats {
            delays_injected: cx.stats.counter(&format!("{p}delays_injected")),
            aborts_injected: cx.stats.counter(&format!("{p}aborts_injected")),
            faults_overflow: cx.stats.counter(&format!("{p}faults_overflow")),
            active_faults: cx.stats.gauge(&format!("{p}active_faults")),
        });
        Ok(Arc::new(FaultFilter { config, stats }))
    }

    fn build_per_route(
        &self,
        _type_url: &str,
        value: &[u8],
        path: &str,
        _cx: &BuildContext<'_>,
    ) -> std::result::Result<PerRoute, FilterConfigError> {
        let cfg: HttpFault = decode(value, path)?;
        Ok(per_route(parse(&cfg, path)?))
    }
}
