//! `envoy.filters.http.rbac`: a table of requests against ALLOW and DENY policies, shadow
//! rules, per-route override, and rejection of what Strait does not implement.

mod common;

use std::collections::HashMap;

use common::*;
use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, Permission, Policy, Principal, Rbac as Rules,
};
use envoy_types::pb::envoy::config::route::v3::{
    header_matcher::HeaderMatchSpecifier, HeaderMatcher,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::{Rbac, RbacPerRoute};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    path_matcher, string_matcher::MatchPattern, PathMatcher, StringMatcher,
};
use envoy_types::pb::google::protobuf::UInt32Value;
use http::StatusCode;
use strait_filters::builtin::rbac::{PER_ROUTE_TYPE_URL, TYPE_URL};

fn perm(rule: permission::Rule) -> Permission {
    Permission { rule: Some(rule) }
}

fn id(i: principal::Identifier) -> Principal {
    Principal {
        identifier: Some(i),
    }
}

fn prefix(p: &str) -> StringMatcher {
    StringMatcher {
        ignore_case: false,
        match_pattern: Some(MatchPattern::Prefix(p.into())),
    }
}

fn cidr(a: &str, len: u32) -> CidrRange {
    CidrRange {
        address_prefix: a.into(),
        prefix_len: Some(UInt32Value { value: len }),
    }
}

fn rules(action: i32, policies: Vec<(&str, Vec<Permission>, Vec<Principal>)>) -> Rules {
    Rules {
        action,
        policies: policies
            .into_iter()
            .map(|(n, permissions, principals)| {
                (
                    n.to_string(),
                    Policy {
                        permissions,
                        principals,
                        ..Default::default()
                    },
                )
            })
            .collect::<HashMap<_, _>>(),
        audit_logging_options: None,
    }
}

/// ALLOW: GET under /public from anywhere, or anything from 10.0.0.0/8 except port 9999.
fn allow_rules() -> Rules {
    let get = perm(permission::Rule::Header(HeaderMatcher {
        name: ":method".into(),
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
            ignore_case: false,
            match_pattern: Some(MatchPattern::Exact("GET".into())),
        })),
        ..Default::default()
    }));
    let public = perm(permission::Rule::UrlPath(PathMatcher {
        rule: Some(path_matcher::Rule::Path(prefix("/public"))),
    }));
    let not_9999 = perm(permission::Rule::NotRule(Box::new(perm(
        permission::Rule::DestinationPort(9999),
    ))));
    rules(
        0,
        vec![
            (
                "public-get",
                vec![perm(permission::Rule::AndRules(permission::Set {
                    rules: vec![get, public],
                }))],
                vec![id(principal::Identifier::Any(true))],
            ),
            (
                "internal",
                vec![not_9999],
                vec![id(principal::Identifier::RemoteIp(cidr("10.0.0.0", 8)))],
            ),
        ],
    )
}

async fn decide(
    chain: &strait_filters::FilterChain,
    method: &str,
    path: &str,
    remote: &str,
    local: &str,
) -> Result<(), StatusCode> {
    let mut c = strait_filters::FilterContext::new(addr(remote), addr(local));
    run(chain, &mut c, &mut req(method, path, &[]))
        .await
        .map_err(|r| r.status)
}

#[tokio::test]
async fn allow_policies_table() {
    let env = Env::new();
    let chain = env.chain(
        "rbac",
        TYPE_URL,
        &Rbac {
            rules: Some(allow_rules()),
            ..Default::default()
        },
    );
    let cases = [
        ("GET", "/public/x?q=1", "192.0.2.1:1", "127.0.0.1:80", true),
        ("POST", "/public/x", "192.0.2.1:1", "127.0.0.1:80", false),
        ("GET", "/private", "192.0.2.1:1", "127.0.0.1:80", false),
        ("POST", "/private", "10.9.8.7:1", "127.0.0.1:80", true),
        ("POST", "/private", "10.9.8.7:1", "127.0.0.1:9999", false),
        ("GET", "/public", "10.9.8.7:1", "127.0.0.1:9999", true),
    ];
    for (method, path, remote, local, allowed) in cases {
        let got = decide(&chain, method, path, remote, local).await;
        assert_eq!(
            got.is_ok(),
            allowed,
            "{method} {path} from {remote} to {local}"
        );
        if let Err(s) = got {
            assert_eq!(s, StatusCode::FORBIDDEN);
        }
    }
    assert_eq!(env.counter("http.ingress.rbac.allowed"), 3);
    assert_eq!(env.counter("http.ingress.rbac.denied"), 3);
}

#[tokio::test]
async fn deny_policies_and_reply_shape() {
    let env = Env::new();
    let deny = rules(
        1,
        vec![(
            "block-admin",
            vec![perm(permission::Rule::UrlPath(PathMatcher {
                rule: Some(path_matcher::Rule::Path(prefix("/admin"))),
            }))],
            vec![id(principal::Identifier::Any(true))],
        )],
    );
    let chain = env.chain(
        "rbac",
        TYPE_URL,
        &Rbac {
            rules: Some(deny),
            ..Default::default()
        },
    );
    assert!(decide(&chain, "GET", "/x", "1.2.3.4:1", "127.0.0.1:80")
        .await
        .is_ok());
    let mut c = ctx();
    let reply = run(&chain, &mut c, &mut req("GET", "/admin/users", &[]))
        .await
        .unwrap_err();
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(&reply.body[..], b"RBAC: access denied");
    assert_eq!(reply.response_flag, Some("RBAC"));
    assert_eq!(
        reply.details,
        "rbac_access_denied_matched_policy[block-admin]"
    );
}

#[tokio::test]
async fn shadow_rules_only_count() {
    let env = Env::new();
    let shadow = rules(
        0,
        vec![(
            "nobody",
            vec![perm(permission::Rule::Any(true))],
            vec![id(principal::Identifier::DirectRemoteIp(cidr(
                "203.0.113.0",
                24,
            )))],
        )],
    );
    let chain = env.chain(
        "rbac",
        TYPE_URL,
        &Rbac {
            shadow_rules: Some(shadow),
            shadow_rules_stat_prefix: "s_".into(),
            ..Default::default()
        },
    );
    assert!(decide(&chain, "GET", "/", "192.0.2.1:1", "127.0.0.1:80")
        .await
        .is_ok());
    assert!(decide(&chain, "GET", "/", "203.0.113.9:1", "127.0.0.1:80")
        .await
        .is_ok());
    assert_eq!(env.counter("http.ingress.rbac.s_shadow_denied"), 1);
    assert_eq!(env.counter("http.ingress.rbac.s_shadow_allowed"), 1);
}

#[tokio::test]
async fn per_route_rbac_overrides_or_disables() {
    let env = Env::new();
    let deny_all = rules(0, vec![]);
    let chain = env.chain(
        "rbac",
        TYPE_URL,
        &Rbac {
            rules: Some(deny_all),
            ..Default::default()
        },
    );
    assert!(run(&chain, &mut ctx(), &mut req("GET", "/", &[]))
        .await
        .is_err());
    let off = env.per_route(PER_ROUTE_TYPE_URL, &RbacPerRoute { rbac: None });
    assert!(run(
        &chain,
        &mut ctx_with_route("rbac", off),
        &mut req("GET", "/", &[])
    )
    .await
    .is_ok());
    let allow = env.per_route(
        PER_ROUTE_TYPE_URL,
        &RbacPerRoute {
            rbac: Some(Rbac {
                rules: Some(allow_rules()),
                ..Default::default()
            }),
        },
    );
    assert!(run(
        &chain,
        &mut ctx_with_route("rbac", allow),
        &mut req("GET", "/public", &[])
    )
    .await
    .is_ok());
}

#[test]
fn unsupported_principals_are_rejected_with_their_path() {
    let env = Env::new();
    let authn = rules(
        0,
        vec![(
            "p",
            vec![perm(permission::Rule::Any(true))],
            vec![id(principal::Identifier::Authenticated(
                principal::Authenticated {
                    principal_name: None,
                },
            ))],
        )],
    );
    let err = env
        .try_build(
            TYPE_URL,
            &Rbac {
                rules: Some(authn),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
    assert_eq!(
        err.path,
        format!("{PATH}.rules.policies[\"p\"].principals[0].authenticated")
    );
    let err = env
        .try_build(
            TYPE_URL,
            &Rbac {
                track_per_rule_stats: true,
                ..Default::default()
            },
        )
        .err()
        .unwrap();
    assert_eq!(err.path, format!("{PATH}.track_per_rule_stats"));
}

/// `sourced_metadata` with `metadata_source: ROUTE` matches the matched route's metadata, with
/// Envoy's value matchers; dynamic metadata (the default source) is rejected with its path.
#[tokio::test]
async fn route_metadata_permissions() {
    use envoy_types::pb::envoy::config::core::v3::Metadata as PbMetadata;
    use envoy_types::pb::envoy::config::rbac::v3::{MetadataSource, SourcedMetadata};
    use envoy_types::pb::envoy::r#type::matcher::v3::{
        metadata_matcher::{path_segment::Segment, PathSegment},
        value_matcher::MatchPattern as V,
        ListMatcher, MetadataMatcher, ValueMatcher,
    };
    use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
    use std::sync::Arc;
    use strait_filters::{Metadata, RouteEntry};

    let matcher = |keys: &[&str], value: V, invert: bool, source: MetadataSource| {
        perm(permission::Rule::SourcedMetadata(SourcedMetadata {
            metadata_matcher: Some(MetadataMatcher {
                filter: "acme.authz".into(),
                path: keys
                    .iter()
                    .map(|k| PathSegment {
                        segment: Some(Segment::Key(k.to_string())),
                    })
                    .collect(),
                value: Some(ValueMatcher {
                    match_pattern: Some(value),
                }),
                invert,
            }),
            metadata_source: source as i32,
        }))
    };
    let build = |p: Permission| {
        env_chain(rules(
            0,
            vec![("p", vec![p], vec![id(principal::Identifier::Any(true))])],
        ))
    };
    let kind = |k: Kind| Value { kind: Some(k) };
    let md = Metadata::from_proto(&PbMetadata {
        filter_metadata: [(
            "acme.authz".to_string(),
            Struct {
                fields: [
                    ("public".to_string(), kind(Kind::BoolValue(true))),
                    (
                        "roles".to_string(),
                        kind(Kind::ListValue(ListValue {
                            values: vec![kind(Kind::StringValue("admin".into()))],
                        })),
                    ),
                    (
                        "nested".to_string(),
                        kind(Kind::StructValue(Struct {
                            fields: [("level".to_string(), kind(Kind::NumberValue(3.0)))].into(),
                        })),
                    ),
                ]
                .into(),
            },
        )]
        .into(),
        typed_filter_metadata: HashMap::new(),
    });
    let route = Arc::new(RouteEntry {
        name: "r".into(),
        metadata: md,
        ..RouteEntry::default()
    });
    let admin = V::ListMatch(Box::new(ListMatcher {
        match_pattern: Some(
            envoy_types::pb::envoy::r#type::matcher::v3::list_matcher::MatchPattern::OneOf(
                Box::new(ValueMatcher {
                    match_pattern: Some(V::StringMatch(prefix("adm"))),
                }),
            ),
        ),
    }));
    let level3 = V::DoubleMatch(envoy_types::pb::envoy::r#type::matcher::v3::DoubleMatcher {
        match_pattern: Some(
            envoy_types::pb::envoy::r#type::matcher::v3::double_matcher::MatchPattern::Exact(3.0),
        ),
    });
    let route_src = MetadataSource::Route;
    let cases = [
        (
            matcher(&["public"], V::BoolMatch(true), false, route_src),
            true,
        ),
        (
            matcher(&["public"], V::BoolMatch(false), false, route_src),
            false,
        ),
        (
            matcher(&["public"], V::BoolMatch(false), true, route_src),
            true,
        ),
        (matcher(&["roles"], admin, false, route_src), true),
        (
            matcher(&["nested", "level"], level3, false, route_src),
            true,
        ),
        (
            matcher(&["missing"], V::PresentMatch(true), false, route_src),
            false,
        ),
        (
            matcher(&["missing"], V::PresentMatch(true), true, route_src),
            true,
        ),
    ];
    for (i, (p, want)) in cases.into_iter().enumerate() {
        let (env, chain) = build(p);
        let mut c = ctx();
        c.set_route_entry(route.clone());
        let got = run(&chain, &mut c, &mut req("GET", "/", &[])).await;
        assert_eq!(got.is_ok(), want, "case {i}");
        // Without a matched route the metadata is empty: only inverted matchers pass.
        let got = run(&chain, &mut ctx(), &mut req("GET", "/", &[])).await;
        assert_eq!(got.is_ok(), i == 2 || i == 6, "case {i} without a route");
        drop(env);
    }

    let dynamic = matcher(
        &["public"],
        V::BoolMatch(true),
        false,
        MetadataSource::Dynamic,
    );
    let err = Env::new()
        .try_build(
            TYPE_URL,
            &Rbac {
                rules: Some(rules(
                    0,
                    vec![(
                        "p",
                        vec![dynamic],
                        vec![id(principal::Identifier::Any(true))],
                    )],
                )),
                ..Default::default()
            },
        )
        .err()
        .unwrap();
    assert_eq!(
        err.path,
        format!("{PATH}.rules.policies[\"p\"].permissions[0].sourced_metadata.metadata_source")
    );
}

fn env_chain(r: Rules) -> (Env, strait_filters::FilterChain) {
    let env = Env::new();
    let chain = env.chain(
        "rbac",
        TYPE_URL,
        &Rbac {
            rules: Some(r),
            ..Default::default()
        },
    );
    (env, chain)
}
