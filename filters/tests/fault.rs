//! `envoy.filters.http.fault`: aborts, delays (paused time), header control, max_active_faults,
//! per-route override and config rejection.

mod common;

use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{fault_delay, FaultDelay};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
    fault_abort, FaultAbort, HttpFault,
};
use envoy_types::pb::envoy::r#type::v3::FractionalPercent;
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use http::StatusCode;
use strait_filters::builtin::fault::TYPE_URL;

fn pct(n: u32) -> Option<FractionalPercent> {
    Some(FractionalPercent {
        numerator: n,
        denominator: 0,
    })
}

fn abort(status: u32, p: u32) -> Option<FaultAbort> {
    Some(FaultAbort {
        percentage: pct(p),
        response_body: String::new(),
        error_type: Some(fault_abort::ErrorType::HttpStatus(status)),
    })
}

fn delay_ms(ms: i32, p: u32) -> Option<FaultDelay> {
    Some(FaultDelay {
        percentage: pct(p),
        fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(PbDuration {
            seconds: 0,
            nanos: ms * 1_000_000,
        })),
    })
}

#[tokio::test]
async fn abort_at_100_percent_replies_with_fi_and_counts() {
    let env = Env::new();
    let chain = env.chain(
        "fault",
        TYPE_URL,
        &HttpFault {
            abort: abort(503, 100),
            ..Default::default()
        },
    );
    let reply = run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap_err();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.response_flag, Some("FI"));
    assert_eq!(&reply.body[..], b"fault filter abort");
    assert_eq!(reply.details, "fault_filter_abort");
    assert_eq!(env.counter("http.ingress.fault.aborts_injected"), 1);
}

#[tokio::test]
async fn zero_percent_and_unset_percentage_inject_nothing() {
    let env = Env::new();
    for p in [Some(0), None] {
        let mut a = abort(503, 0).unwrap();
        a.percentage = p.and_then(pct);
        let chain = env.chain(
            "fault",
            TYPE_URL,
            &HttpFault {
                abort: Some(a),
                delay: delay_ms(10, 0),
                ..Default::default()
            },
        );
        for _ in 0..100 {
            run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
                .await
                .unwrap();
        }
    }
    assert_eq!(env.counter("http.ingress.fault.aborts_injected"), 0);
}

#[tokio::test(start_paused = true)]
async fn delay_waits_then_aborts_and_marks_di() {
    let env = Env::new();
    let chain = env.chain(
        "fault",
        TYPE_URL,
        &HttpFault {
            delay: delay_ms(300, 100),
            abort: abort(429, 100),
            ..Default::default()
        },
    );
    let start = tokio::time::Instant::now();
    let mut c = ctx();
    let reply = run(&chain, &mut c, &mut req("GET", "/", &[]))
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_millis(300));
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(c.response_flags, ["DI"]);
    assert_eq!(env.counter("http.ingress.fault.delays_injected"), 1);
}

#[tokio::test]
async fn header_abort_uses_the_header_status_and_caps_its_percentage() {
    let env = Env::new();
    let header_abort = FaultAbort {
        percentage: pct(100),
        response_body: "custom".into(),
        error_type: Some(fault_abort::ErrorType::HeaderAbort(
            fault_abort::HeaderAbort {},
        )),
    };
    let chain = env.chain(
        "fault",
        TYPE_URL,
        &HttpFault {
            abort: Some(header_abort),
            ..Default::default()
        },
    );
    // No header: no fault.
    run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap();
    let reply = run(
        &chain,
        &mut ctx(),
        &mut req("GET", "/", &[("x-envoy-fault-abort-request", "418")]),
    )
    .await
    .unwrap_err();
    assert_eq!(reply.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(&reply.body[..], b"custom");
    // Header percentage 0 lowers the configured 100%.
    let h = [
        ("x-envoy-fault-abort-request", "418"),
        ("x-envoy-fault-abort-request-percentage", "0"),
    ];
    run(&chain, &mut ctx(), &mut req("GET", "/", &h))
        .await
        .unwrap();
    // Out-of-range status: ignored.
    run(
        &chain,
        &mut ctx(),
        &mut req("GET", "/", &[("x-envoy-fault-abort-request", "700")]),
    )
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn header_delay_takes_milliseconds_from_the_request() {
    let env = Env::new();
    let d = FaultDelay {
        percentage: pct(100),
        fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::HeaderDelay(
            fault_delay::HeaderDelay {},
        )),
    };
    let chain = env.chain(
        "fault",
        TYPE_URL,
        &HttpFault {
            delay: Some(d),
            ..Default::default()
        },
    );
    let start = tokio::time::Instant::now();
    run(
        &chain,
        &mut ctx(),
        &mut req("GET", "/", &[("x-envoy-fault-delay-request", "1500")]),
    )
    .await
    .unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
}

#[tokio::test]
async fn max_active_faults_bounds_concurrent_faults() {
    let env = Env::new();
    let chain = env.chain(
        "fault",
        TYPE_URL,
        &HttpFault {
            abort: abort(503, 100),
            max_active_faults: Some(UInt32Value { value: 1 }),
            ..Default::default()
        },
    );
    // The first request's context is still alive: its fault is active.
    let mut first = ctx();
    run(&chain, &mut first, &mut req("GET", "/", &[]))
        .await
        .unwrap_err();
    assert_eq!(env.stats.gauge_value("http.ingress.fault.active_faults"), 1);
    run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap();
    assert_eq!(env.counter("http.ingress.fault.faults_overflow"), 1);
    drop(first);
    assert_eq!(env.stats.gauge_value("http.ingress.fault.active_faults"), 0);
    run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap_err();
}

#[tokio::test]
async fn header_matchers_and_per_route_override() {
    let env = Env::new();
    let matcher = envoy_types::pb::envoy::config::route::v3::HeaderMatcher {
        name: "x-fault".into(),
        header_match_specifier: Some(envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier::PresentMatch(true)),
        ..Default::default()
    };
    let chain = env.chain(
        "fault",
        TYPE_URL,
        &HttpFault {
            abort: abort(503, 100),
            headers: vec![matcher],
            ..Default::default()
        },
    );
    run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .unwrap();
    run(
        &chain,
        &mut ctx(),
        &mut req("GET", "/", &[("x-fault", "1")]),
    )
    .await
    .unwrap_err();

    let route = env.per_route(
        TYPE_URL,
        &HttpFault {
            abort: abort(404, 100),
            ..Default::default()
        },
    );
    let reply = run(
        &chain,
        &mut ctx_with_route("fault", route),
        &mut req("GET", "/", &[]),
    )
    .await
    .unwrap_err();
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

#[test]
fn unsupported_fields_are_rejected_with_their_path() {
    let env = Env::new();
    let grpc = FaultAbort {
        percentage: pct(1),
        response_body: String::new(),
        error_type: Some(fault_abort::ErrorType::GrpcStatus(14)),
    };
    let err = env
        .try_build(
            TYPE_URL,
            &HttpFault {
                abort: Some(grpc),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
    assert_eq!(err.path, format!("{PATH}.abort.grpc_status"));
    assert_eq!(err.message, "not supported yet");
    let err = env
        .try_build(
            TYPE_URL,
            &HttpFault {
                upstream_cluster: "c".into(),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
    assert_eq!(err.path, format!("{PATH}.upstream_cluster"));
    let err = env
        .try_build(
            TYPE_URL,
            &HttpFault {
                abort: abort(99, 1),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
    assert_eq!(err.path, format!("{PATH}.abort.http_status"));
}
