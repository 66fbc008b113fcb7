//! `envoy.filters.http.cors` (preflight, actual requests, origins) and
//! `envoy.filters.http.header_mutation` (filter and route levels, ordering).

mod common;

use std::sync::Arc;

use common::*;
use envoy_types::pb::envoy::config::common::mutation_rules::v3::{
    header_mutation::Action as MAction, HeaderMutation as Mutation,
};
use envoy_types::pb::envoy::config::core::v3::{
    header_value_option::HeaderAppendAction, HeaderValue as PbHeaderValue, HeaderValueOption,
};
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::{Cors, CorsPolicy};
use envoy_types::pb::envoy::extensions::filters::http::header_mutation::v3::{
    HeaderMutation, HeaderMutationPerRoute, Mutations,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher};
use envoy_types::pb::google::protobuf::BoolValue;
use http::StatusCode;
use strait_filters::builtin::{cors, header_mutation};
use strait_filters::PerFilterConfigs;

fn policy() -> CorsPolicy {
    CorsPolicy {
        allow_origin_string_match: vec![StringMatcher {
            ignore_case: false,
            match_pattern: Some(MatchPattern::Suffix(".example.com".into())),
        }],
        allow_methods: "GET, POST".into(),
        allow_headers: "content-type".into(),
        expose_headers: "x-trace".into(),
        max_age: "600".into(),
        allow_credentials: Some(BoolValue { value: true }),
        ..Default::default()
    }
}

#[tokio::test]
async fn preflight_is_answered_locally() {
    let env = Env::new();
    let chain = env.chain("cors", cors::TYPE_URL, &Cors {});
    let route = env.per_route(cors::PER_ROUTE_TYPE_URL, &policy());
    let h = [
        ("origin", "https://app.example.com"),
        ("access-control-request-method", "POST"),
    ];
    let mut c = ctx_with_route("cors", route);
    let reply = run(&chain, &mut c, &mut req("OPTIONS", "/api", &h))
        .await
        .unwrap_err();
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body.is_empty());
    assert_eq!(
        header(&reply.headers, "access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(
        header(&reply.headers, "access-control-allow-methods"),
        Some("GET, POST")
    );
    assert_eq!(
        header(&reply.headers, "access-control-allow-headers"),
        Some("content-type")
    );
    assert_eq!(
        header(&reply.headers, "access-control-max-age"),
        Some("600")
    );
    assert_eq!(
        header(&reply.headers, "access-control-allow-credentials"),
        Some("true")
    );
    // The data path runs the response hooks on the reply, as Envoy runs the filter's encoder on
    // its own preflight answer: expose-headers is added, nothing is duplicated.
    let mut p = resp(200);
    p.headers = reply.headers.clone();
    chain.run_response_headers(&mut c, &mut p).await.unwrap();
    assert_eq!(
        p.headers
            .get_all("access-control-allow-origin")
            .iter()
            .count(),
        1
    );
    assert_eq!(
        header(&p.headers, "access-control-expose-headers"),
        Some("x-trace")
    );
    assert_eq!(env.counter("http.ingress.cors.origin_valid"), 1);
}

#[tokio::test]
async fn actual_requests_get_cors_response_headers() {
    let env = Env::new();
    let chain = env.chain("cors", cors::TYPE_URL, &Cors {});
    let route = env.per_route(cors::PER_ROUTE_TYPE_URL, &policy());
    let mut c = ctx_with_route("cors", route.clone());
    run(
        &chain,
        &mut c,
        &mut req("GET", "/api", &[("origin", "https://app.example.com")]),
    )
    .await
    .unwrap();
    let mut p = resp(200);
    chain.run_response_headers(&mut c, &mut p).await.unwrap();
    assert_eq!(
        header(&p.headers, "access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(
        header(&p.headers, "access-control-expose-headers"),
        Some("x-trace")
    );

    // A foreign origin: no CORS headers, and its preflight goes upstream (forwarded by default).
    let mut c = ctx_with_route("cors", route.clone());
    let h = [
        ("origin", "https://evil.test"),
        ("access-control-request-method", "POST"),
    ];
    run(&chain, &mut c, &mut req("OPTIONS", "/api", &h))
        .await
        .unwrap();
    let mut p = resp(200);
    chain.run_response_headers(&mut c, &mut p).await.unwrap();
    assert!(p.headers.get("access-control-allow-origin").is_none());
    assert_eq!(env.counter("http.ingress.cors.origin_invalid"), 1);

    // No policy on the route: the filter does nothing.
    run(
        &chain,
        &mut ctx(),
        &mut req(
            "OPTIONS",
            "/api",
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "GET"),
            ],
        ),
    )
    .await
    .unwrap();
}

#[test]
fn cors_rejects_unsupported_policy_fields() {
    let env = Env::new();
    let mut p = policy();
    p.allow_private_network_access = Some(BoolValue { value: true });
    let err = env
        .registry
        .build_per_route(
            cors::PER_ROUTE_TYPE_URL,
            &prost::Message::encode_to_vec(&p),
            "vh.typed_per_filter_config[\"cors\"]",
            &env.cx(),
        )
        .unwrap_err();
    assert_eq!(
        err.path,
        "vh.typed_per_filter_config[\"cors\"].allow_private_network_access"
    );
}

/// Policies of every level combine field by field, the most specific level that sets a field
/// winning (Envoy's `CorsFilter`); `*` in allow_methods / allow_headers echoes the preflight's
/// request; an unmatched preflight that is not forwarded still gets the policy's headers.
#[tokio::test]
async fn policies_combine_field_by_field_across_levels() {
    let env = Env::new();
    let chain = env.chain("cors", cors::TYPE_URL, &Cors {});
    let vhost = env.per_route(
        cors::PER_ROUTE_TYPE_URL,
        &CorsPolicy {
            allow_origin_string_match: vec![StringMatcher {
                ignore_case: false,
                match_pattern: Some(MatchPattern::Exact("https://a.test".into())),
            }],
            allow_methods: "*".into(),
            max_age: "60".into(),
            allow_credentials: Some(BoolValue { value: true }),
            forward_not_matching_preflights: Some(BoolValue { value: false }),
            ..Default::default()
        },
    );
    let route = env.per_route(
        cors::PER_ROUTE_TYPE_URL,
        &CorsPolicy {
            allow_headers: "x-route".into(),
            allow_credentials: Some(BoolValue { value: false }),
            ..Default::default()
        },
    );
    let vh = [("cors".to_string(), vhost)];
    let rt = [("cors".to_string(), route)];
    let configs = Arc::new(PerFilterConfigs::resolve([&vh[..], &rt[..]]));
    let preflight = |origin: &'static str| {
        req(
            "OPTIONS",
            "/",
            &[
                ("origin", origin),
                ("access-control-request-method", "PATCH"),
            ],
        )
    };
    let mut c = ctx();
    c.set_route("r", Some(configs.clone()));
    let reply = run(&chain, &mut c, &mut preflight("https://a.test"))
        .await
        .unwrap_err();
    let h = &reply.headers;
    assert_eq!(
        header(h, "access-control-allow-origin"),
        Some("https://a.test")
    );
    assert_eq!(header(h, "access-control-allow-methods"), Some("PATCH"));
    assert_eq!(header(h, "access-control-allow-headers"), Some("x-route"));
    assert_eq!(header(h, "access-control-max-age"), Some("60"));
    assert!(h.get("access-control-allow-credentials").is_none());

    let mut c = ctx();
    c.set_route("r", Some(configs));
    let reply = run(&chain, &mut c, &mut preflight("https://evil.test"))
        .await
        .unwrap_err();
    assert!(reply.headers.get("access-control-allow-origin").is_none());
    assert_eq!(header(&reply.headers, "access-control-max-age"), Some("60"));
}

fn append(key: &str, value: &str, action: HeaderAppendAction) -> Mutation {
    Mutation {
        action: Some(MAction::Append(HeaderValueOption {
            header: Some(PbHeaderValue {
                key: key.into(),
                value: value.into(),
                raw_value: vec![],
            }),
            append_action: action as i32,
            ..Default::default()
        })),
    }
}

fn remove(key: &str) -> Mutation {
    Mutation {
        action: Some(MAction::Remove(key.into())),
    }
}

#[tokio::test]
async fn header_mutation_filter_and_route_levels() {
    let env = Env::new();
    let filter_level = Mutations {
        request_mutations: vec![
            append("x-chain", "v1", HeaderAppendAction::OverwriteIfExistsOrAdd),
            remove("x-secret"),
        ],
        response_mutations: vec![append(
            "x-served-by",
            "strait",
            HeaderAppendAction::AppendIfExistsOrAdd,
        )],
        ..Default::default()
    };
    let chain = env.chain(
        "hm",
        header_mutation::TYPE_URL,
        &HeaderMutation {
            mutations: Some(filter_level.clone()),
            most_specific_header_mutations_wins: false,
        },
    );
    let mut r = req("GET", "/", &[("x-secret", "s"), ("x-chain", "old")]);
    let mut c = ctx();
    run(&chain, &mut c, &mut r).await.unwrap();
    assert_eq!(header(&r.headers, "x-chain"), Some("v1"));
    assert!(r.headers.get("x-secret").is_none());
    let mut p = resp(200);
    chain.run_response_headers(&mut c, &mut p).await.unwrap();
    assert_eq!(header(&p.headers, "x-served-by"), Some("strait"));

    // Route level sets x-chain too: the filter level runs first, every per-route level after
    // it, so with one level the route wins in both modes (Envoy's header_mutation.cc).
    let route_level = Mutations {
        request_mutations: vec![append(
            "x-chain",
            "route",
            HeaderAppendAction::OverwriteIfExistsOrAdd,
        )],
        ..Default::default()
    };
    let route = env.per_route(
        header_mutation::PER_ROUTE_TYPE_URL,
        &HeaderMutationPerRoute {
            mutations: Some(route_level),
        },
    );
    let mut r = req("GET", "/", &[]);
    run(&chain, &mut ctx_with_route("hm", route.clone()), &mut r)
        .await
        .unwrap();
    assert_eq!(header(&r.headers, "x-chain"), Some("route"));
    let chain = env.chain(
        "hm",
        header_mutation::TYPE_URL,
        &HeaderMutation {
            mutations: Some(filter_level),
            most_specific_header_mutations_wins: true,
        },
    );
    let mut r = req("GET", "/", &[]);
    run(&chain, &mut ctx_with_route("hm", route), &mut r)
        .await
        .unwrap();
    assert_eq!(header(&r.headers, "x-chain"), Some("route"));
}

/// Every per-route level applies, in Envoy 1.40's order (observed on the real binary, see
/// tests/filters_e2e.rs): the filter level, then route, virtual host, route configuration; with
/// `most_specific_header_mutations_wins` the levels run route configuration first.
#[tokio::test]
async fn header_mutation_applies_every_per_route_level() {
    let env = Env::new();
    let level = |v: &str| {
        env.per_route(
            header_mutation::PER_ROUTE_TYPE_URL,
            &HeaderMutationPerRoute {
                mutations: Some(Mutations {
                    request_mutations: vec![
                        append("x-order", v, HeaderAppendAction::AppendIfExistsOrAdd),
                        append("x-last", v, HeaderAppendAction::OverwriteIfExistsOrAdd),
                    ],
                    response_mutations: vec![append(
                        "x-order",
                        v,
                        HeaderAppendAction::AppendIfExistsOrAdd,
                    )],
                    ..Default::default()
                }),
            },
        )
    };
    let rc = [("hm".to_string(), level("rc"))];
    let vh = [("hm".to_string(), level("vhost"))];
    let rt = [("hm".to_string(), level("route"))];
    let configs = Arc::new(PerFilterConfigs::resolve([&rc[..], &vh[..], &rt[..]]));
    for (wins, order) in [
        (false, ["filter", "route", "vhost", "rc"]),
        (true, ["filter", "rc", "vhost", "route"]),
    ] {
        let chain = env.chain(
            "hm",
            header_mutation::TYPE_URL,
            &HeaderMutation {
                mutations: Some(Mutations {
                    request_mutations: vec![append(
                        "x-order",
                        "filter",
                        HeaderAppendAction::AppendIfExistsOrAdd,
                    )],
                    response_mutations: vec![append(
                        "x-order",
                        "filter",
                        HeaderAppendAction::AppendIfExistsOrAdd,
                    )],
                    ..Default::default()
                }),
                most_specific_header_mutations_wins: wins,
            },
        );
        let mut c = ctx();
        c.set_route("r", Some(configs.clone()));
        let mut r = req("GET", "/", &[]);
        run(&chain, &mut c, &mut r).await.unwrap();
        let got: Vec<_> = r.headers.get_all("x-order").iter().collect();
        assert_eq!(got, order, "request, most_specific_wins={wins}");
        assert_eq!(header(&r.headers, "x-last"), Some(order[3]));
        let mut p = resp(200);
        chain.run_response_headers(&mut c, &mut p).await.unwrap();
        let got: Vec<_> = p.headers.get_all("x-order").iter().collect();
        assert_eq!(got, order, "response, most_specific_wins={wins}");
    }
}

#[test]
fn header_mutation_rejects_pseudo_headers_and_query_mutations() {
    let env = Env::new();
    let bad = Mutations {
        request_mutations: vec![remove(":path")],
        ..Default::default()
    };
    let err = env
        .try_build(
            header_mutation::TYPE_URL,
            &HeaderMutation {
                mutations: Some(bad),
                most_specific_header_mutations_wins: false,
            },
        )
        .err()
        .unwrap();
    assert_eq!(
        err.path,
        format!("{PATH}.mutations.request_mutations[0].remove")
    );
    let q = Mutations {
        query_parameter_mutations: vec![Default::default()],
        ..Default::default()
    };
    let err = env
        .try_build(
            header_mutation::TYPE_URL,
            &HeaderMutation {
                mutations: Some(q),
                most_specific_header_mutations_wins: false,
            },
        )
        .err()
        .unwrap();
    assert_eq!(
        err.path,
        format!("{PATH}.mutations.query_parameter_mutations")
    );
}
