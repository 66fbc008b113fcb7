//! `envoy.filters.http.local_ratelimit`: token bucket under paused time, enabled/enforced
//! fractions, response headers, per-route buckets, stats, and rejection.

mod common;

use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue as PbHeaderValue, HeaderValueOption, RuntimeFractionalPercent,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, TokenBucket};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use http::StatusCode;
use strait_filters::builtin::local_ratelimit::TYPE_URL;

fn rfp(n: u32) -> Option<RuntimeFractionalPercent> {
    Some(RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: n,
            denominator: 0,
        }),
        runtime_key: "k".into(),
    })
}

fn config(max: u32, per_fill: u32, secs: i64) -> LocalRateLimit {
    LocalRateLimit {
        stat_prefix: "lrl".into(),
        token_bucket: Some(TokenBucket {
            max_tokens: max,
            tokens_per_fill: Some(UInt32Value { value: per_fill }),
            fill_interval: Some(PbDuration {
                seconds: secs,
                nanos: 0,
            }),
        }),
        filter_enabled: rfp(100),
        filter_enforced: rfp(100),
        response_headers_to_add: vec![HeaderValueOption {
            header: Some(PbHeaderValue {
                key: "x-local-rate-limit".into(),
                value: "true".into(),
                raw_value: vec![],
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn bucket_empties_then_refills_per_interval() {
    let env = Env::new();
    let chain = env.chain("lrl", TYPE_URL, &config(2, 1, 1));
    for _ in 0..2 {
        run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
            .await
            .unwrap();
    }
    let reply = run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap_err();
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.response_flag, Some("RL"));
    assert_eq!(&reply.body[..], b"local_rate_limited");
    assert_eq!(header(&reply.headers, "x-envoy-ratelimited"), Some("true"));
    assert_eq!(header(&reply.headers, "x-local-rate-limit"), Some("true"));

    // Just short of an interval: still empty. At the interval: one token back.
    tokio::time::advance(Duration::from_millis(999)).await;
    run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap_err();
    tokio::time::advance(Duration::from_millis(1)).await;
    run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap();
    run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap_err();
    // A long idle period refills only up to max_tokens.
    tokio::time::advance(Duration::from_secs(60)).await;
    run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap();
    run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap();
    run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap_err();

    assert_eq!(env.counter("lrl.http_local_rate_limit.enabled"), 9);
    assert_eq!(env.counter("lrl.http_local_rate_limit.ok"), 5);
    assert_eq!(env.counter("lrl.http_local_rate_limit.rate_limited"), 4);
    assert_eq!(env.counter("lrl.http_local_rate_limit.enforced"), 4);
}

#[tokio::test(start_paused = true)]
async fn not_enforced_passes_and_unset_enabled_disables() {
    let env = Env::new();
    let mut cfg = config(1, 1, 1);
    cfg.filter_enforced = rfp(0);
    cfg.request_headers_to_add_when_not_enforced = vec![HeaderValueOption {
        header: Some(PbHeaderValue {
            key: "x-would-limit".into(),
            value: "1".into(),
            raw_value: vec![],
        }),
        ..Default::default()
    }];
    let chain = env.chain("lrl", TYPE_URL, &cfg);
    run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap();
    let mut r = req("GET", "/", &[]);
    run(&chain, &mut ctx(), &mut r).await.unwrap();
    assert_eq!(header(&r.headers, "x-would-limit"), Some("1"));
    assert_eq!(env.counter("lrl.http_local_rate_limit.rate_limited"), 1);
    assert_eq!(env.counter("lrl.http_local_rate_limit.enforced"), 0);

    let mut cfg = config(1, 1, 1);
    cfg.filter_enabled = None;
    cfg.stat_prefix = "off".into();
    let chain = env.chain("lrl", TYPE_URL, &cfg);
    for _ in 0..5 {
        run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
            .await
            .unwrap();
    }
    assert_eq!(env.counter("off.http_local_rate_limit.enabled"), 0);
}

#[tokio::test(start_paused = true)]
async fn a_route_config_has_its_own_bucket_and_status() {
    let env = Env::new();
    let chain = env.chain("lrl", TYPE_URL, &config(1, 1, 1));
    let mut route_cfg = config(2, 1, 1);
    route_cfg.status = Some(envoy_types::pb::envoy::r#type::v3::HttpStatus { code: 503 });
    let route = env.per_route(TYPE_URL, &route_cfg);
    // Exhaust the filter-level bucket; the route's bucket is untouched.
    run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap();
    run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap_err();
    for _ in 0..2 {
        run(
            &chain,
            &mut ctx_with_route("lrl", route.clone()),
            &mut req("GET", "/", &[]),
        )
        .await
        .unwrap();
    }
    let reply = run(
        &chain,
        &mut ctx_with_route("lrl", route.clone()),
        &mut req("GET", "/", &[]),
    )
    .await
    .unwrap_err();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn concurrent_acquires_never_exceed_the_bucket() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let bucket = rt.block_on(async {
        std::sync::Arc::new(strait_filters::builtin::local_ratelimit::TokenBucket::new(
            1000,
            1,
            Duration::from_secs(3600),
        ))
    });
    let granted = std::sync::atomic::AtomicU32::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..500 {
                    if bucket.try_acquire() {
                        granted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(granted.into_inner(), 1000);
}

#[test]
fn invalid_configs_are_rejected() {
    let env = Env::new();
    let mut cfg = config(1, 1, 1);
    cfg.token_bucket.as_mut().unwrap().fill_interval = Some(PbDuration {
        seconds: 0,
        nanos: 10_000_000,
    });
    assert_eq!(
        env.try_build(TYPE_URL, &cfg).err().unwrap().path,
        format!("{PATH}.token_bucket.fill_interval")
    );
    let mut cfg = config(1, 1, 1);
    cfg.stat_prefix.clear();
    assert_eq!(
        env.try_build(TYPE_URL, &cfg).err().unwrap().path,
        format!("{PATH}.stat_prefix")
    );
    let mut cfg = config(1, 1, 1);
    cfg.stage = 1;
    let err = env.try_build(TYPE_URL, &cfg).err().unwrap();
    assert_eq!(
        (err.path.as_str(), err.message.as_str()),
        (format!("{PATH}.stage").as_str(), "not supported yet")
    );
}
