//! Route configuration translation: virtual hosts, route matching, forwarding / redirect /
//! direct-response actions, retry policies and header mutations.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::route::v3 as rt;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use http::{HeaderName, HeaderValue, StatusCode};
use regex::Regex;

use super::{at, bool_value, duration, format, ix, reject_set, timeout_or, u32_value, unpack, Ctx};
use crate::model::{self, FormatToken};

pub(crate) fn translate(
    cx: &mut Ctx,
    path: &str,
    rc: rt::RouteConfiguration,
) -> Option<model::RouteConfig> {
    let rt::RouteConfiguration {
        name,
        virtual_hosts,
        vhds,
        internal_only_headers,
        response_headers_to_add,
        response_headers_to_remove,
        request_headers_to_add,
        request_headers_to_remove,
        most_specific_header_mutations_wins,
        validate_clusters,
        max_direct_response_body_size_bytes,
        cluster_specifier_plugins,
        request_mirror_policies,
        ignore_port_in_host_matching,
        vhost_header,
        ignore_path_parameters_in_path_matching,
        typed_per_filter_config,
        // Accepted: filters see the route's own metadata (Envoy's `route->metadata()`).
        metadata: _,
        route_specifiers,
    } = rc;
    let start = cx.errors.len();
    reject_set!(cx, path;
        vhds, internal_only_headers, most_specific_header_mutations_wins,
        max_direct_response_body_size_bytes, cluster_specifier_plugins, request_mirror_policies,
        ignore_port_in_host_matching, vhost_header, ignore_path_parameters_in_path_matching,
        route_specifiers);
    cx.per_filter_rc = per_filter_level(cx, path, typed_per_filter_config);
    let headers = header_mutations(
        cx,
        path,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
    );
    // Inline route configurations are checked against the static clusters unless told not to.
    let validate = bool_value(validate_clusters).unwrap_or(true);
    let mut seen_domains = HashSet::new();
    let mut wildcard_seen = false;
    let mut vhosts = Vec::new();
    for (i, vh) in virtual_hosts.into_iter().enumerate() {
        let vpath = ix(path, "virtual_hosts", i);
        if let Some(v) = virtual_host(cx, &vpath, vh, validate) {
            for (j, d) in v.domains.iter().enumerate() {
                let dpath = ix(&vpath, "domains", j);
                if *d == model::DomainMatcher::Any {
                    if wildcard_seen {
                        cx.err(
                            &dpath,
                            format!("Only a single wildcard domain is permitted in route {name}"),
                        );
                    }
                    wildcard_seen = true;
                } else if !seen_domains.insert(domain_text(d)) {
                    cx.err(
                        &dpath,
                        format!(
                            "Only unique values for domains are permitted. Duplicate entry of domain {} in route {name}",
                            domain_text(d)
                        ),
                    );
                }
            }
            vhosts.push(v);
        }
    }
    if cx.errors.len() > start {
        return None;
    }
    Some(model::RouteConfig {
        name,
        virtual_hosts: vhosts,
        headers,
        header_matchers: Default::default(),
    })
}

fn domain_text(d: &model::DomainMatcher) -> String {
    match d {
        model::DomainMatcher::Exact(s) => s.clone(),
        model::DomainMatcher::Suffix(s) => format!("*{s}"),
        model::DomainMatcher::Prefix(s) => format!("{s}*"),
        model::DomainMatcher::Any => "*".into(),
    }
}

fn virtual_host(
    cx: &mut Ctx,
    path: &str,
    vh: rt::VirtualHost,
    validate: bool,
) -> Option<model::VirtualHost> {
    let rt::VirtualHost {
        name,
        domains,
        routes,
        matcher,
        require_tls,
        virtual_clusters,
        rate_limits,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        cors,
        typed_per_filter_config,
        include_request_attempt_count,
        include_attempt_count_in_response,
        retry_policy,
        retry_policy_typed_config,
        hedge_policy,
        include_is_timeout_retry_header,
        per_request_buffer_limit_bytes,
        request_body_buffer_limit,
        request_mirror_policies,
        // Accepted: filters see the route's own metadata (Envoy's `route->metadata()`).
        metadata: _,
        route_specifiers,
    } = vh;
    let start = cx.errors.len();
    if name.is_empty() {
        cx.err(at(path, "name"), "required");
    }
    if domains.is_empty() {
        cx.err(at(path, "domains"), "at least one domain required");
    }
    let domains: Vec<_> = domains
        .iter()
        .enumerate()
        .filter_map(|(i, d)| domain(cx, &ix(path, "domains", i), d))
        .collect();
    reject_set!(cx, path;
        matcher, require_tls, virtual_clusters, rate_limits, cors,
        include_request_attempt_count, include_attempt_count_in_response,
        retry_policy_typed_config, hedge_policy, include_is_timeout_retry_header,
        per_request_buffer_limit_bytes, request_body_buffer_limit, request_mirror_policies,
        route_specifiers);
    let headers = header_mutations(
        cx,
        path,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
    );
    cx.per_filter_vh = per_filter_level(cx, path, typed_per_filter_config);
    let retry_policy = retry_policy.and_then(|r| retry(cx, &at(path, "retry_policy"), r));
    let mut out_routes = Vec::new();
    for (i, r) in routes.into_iter().enumerate() {
        if let Some(r) = route(cx, &ix(path, "routes", i), r, &retry_policy, validate) {
            out_routes.push(r);
        }
    }
    if cx.errors.len() > start {
        return None;
    }
    Some(model::VirtualHost {
        name,
        domains,
        routes: out_routes,
        headers,
        retry_policy,
    })
}

fn domain(cx: &mut Ctx, path: &str, d: &str) -> Option<model::DomainMatcher> {
    let d = d.to_ascii_lowercase();
    if d.is_empty() {
        cx.err(path, "empty domain");
        return None;
    }
    if d == "*" {
        return Some(model::DomainMatcher::Any);
    }
    if let Some(s) = d.strip_prefix('*') {
        return Some(model::DomainMatcher::Suffix(s.to_string()));
    }
    if let Some(p) = d.strip_suffix('*') {
        return Some(model::DomainMatcher::Prefix(p.to_string()));
    }
    Some(model::DomainMatcher::Exact(d))
}

fn route(
    cx: &mut Ctx,
    path: &str,
    r: rt::Route,
    vhost_retry: &Option<model::RetryPolicy>,
    validate: bool,
) -> Option<model::Route> {
    let rt::Route {
        name,
        r#match,
        metadata,
        decorator,
        typed_per_filter_config,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
        tracing,
        per_request_buffer_limit_bytes,
        stat_prefix,
        request_body_buffer_limit,
        route_specifiers,
        action,
    } = r;
    let start = cx.errors.len();
    let matcher = match r#match {
        Some(m) => route_match(cx, &at(path, "match"), m),
        None => {
            cx.err(at(path, "match"), "required");
            None
        }
    };
    reject_set!(cx, path; decorator);
    let route_level = per_filter_level(cx, path, typed_per_filter_config);
    let per_filter_configs = strait_filters::PerFilterConfigs::resolve([
        &cx.per_filter_rc[..],
        &cx.per_filter_vh[..],
        &route_level[..],
    ]);
    let metadata = metadata
        .map(|m| strait_filters::Metadata::from_proto(&m))
        .unwrap_or_default();
    let headers = header_mutations(
        cx,
        path,
        request_headers_to_add,
        request_headers_to_remove,
        response_headers_to_add,
        response_headers_to_remove,
    );
    reject_set!(cx, path;
        tracing, per_request_buffer_limit_bytes, stat_prefix, request_body_buffer_limit,
        route_specifiers);
    use rt::route::Action as A;
    let action = match action {
        Some(A::Route(ra)) => forward(cx, &at(path, "route"), ra, vhost_retry, validate)
            .map(model::RouteAction::Forward),
        Some(A::Redirect(ra)) => redirect(cx, &at(path, "redirect"), ra),
        Some(A::DirectResponse(d)) => direct_response(cx, &at(path, "direct_response"), d),
        Some(A::FilterAction(_)) => {
            cx.unsupported(at(path, "filter_action"));
            None
        }
        Some(A::NonForwardingAction(_)) => {
            cx.unsupported(at(path, "non_forwarding_action"));
            None
        }
        None => {
            cx.err(
                path,
                "an action (route, redirect or direct_response) is required",
            );
            None
        }
    };
    if cx.errors.len() > start {
        return None;
    }
    let action = action?;
    let cluster = match &action {
        model::RouteAction::Forward(model::ForwardAction {
            cluster: model::ClusterSpecifier::Cluster(c),
            ..
        }) => Some(c.clone()),
        _ => None,
    };
    let upstream_stats = matches!(action, model::RouteAction::Forward(_))
        .then(|| strait_filters::StatsScope::new("cluster.", cx.filter_env.0.stats.clone()));
    let filter_route = Arc::new(strait_filters::RouteEntry {
        name: name.clone(),
        cluster,
        upstream_stats,
        metadata,
        per_filter_configs,
    });
    Some(model::Route {
        name,
        matcher: matcher?,
        action,
        headers,
        filter_route,
    })
}

/// One level's `typed_per_filter_config`, parsed by the filter registry. Unknown optional
/// configs (`FilterConfig { is_optional: true }`) are left out, as Envoy ignores them.
fn per_filter_level(
    cx: &mut Ctx,
    path: &str,
    configs: std::collections::HashMap<String, envoy_types::pb::google::protobuf::Any>,
) -> Vec<(String, strait_filters::PerRoute)> {
    if configs.is_empty() {
        return Vec::new();
    }
    let env = cx.filter_env.0.clone();
    let stat_prefix = cx.stat_prefix.clone();
    let bcx = strait_filters::BuildContext {
        stat_prefix: &stat_prefix,
        stats: env.stats.as_ref(),
        clusters: env.clusters.as_ref(),
    };
    // Sorted, so errors come out in a stable order.
    let mut configs: Vec<_> = configs.into_iter().collect();
    configs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut level = Vec::new();
    for (name, any) in configs {
        let p = format!("{}[\"{name}\"]", at(path, "typed_per_filter_config"));
        match env
            .registry
            .build_per_route(&any.type_url, &any.value, &p, &bcx)
        {
            Ok(Some(pr)) => level.push((name, pr)),
            Ok(None) => {}
            Err(e) => cx.err(e.path, e.message),
        }
    }
    level
}

fn route_match(cx: &mut Ctx, path: &str, m: rt::RouteMatch) -> Option<model::RouteMatch> {
    let rt::RouteMatch {
        case_sensitive,
        runtime_fraction,
        headers,
        query_parameters,
        cookies,
        grpc,
        tls_context,
        dynamic_metadata,
        filter_state,
        path_specifier,
    } = m;
    let start = cx.errors.len();
    use rt::route_match::PathSpecifier as P;
    let path_match = match path_specifier {
        Some(P::Prefix(p)) => Some(model::PathMatch::Prefix(p)),
        Some(P::Path(p)) => Some(model::PathMatch::Path(p)),
        Some(P::SafeRegex(r)) => {
            full_regex(cx, &at(path, "safe_regex"), r).map(model::PathMatch::Regex)
        }
        Some(P::PathSeparatedPrefix(p)) => {
            // Envoy's constraint: `^[^?#]+[^?#/]$`.
            let ok = p.len() >= 2 && !p.contains(['?', '#']) && !p.ends_with('/');
            if ok {
                Some(model::PathMatch::PathSeparatedPrefix(p))
            } else {
                cx.err(
                    at(path, "path_separated_prefix"),
                    "must not be empty, contain '?' or '#', or end with '/'",
                );
                None
            }
        }
        Some(P::ConnectMatcher(_)) => {
            cx.unsupported(at(path, "connect_matcher"));
            None
        }
        Some(P::PathMatchPolicy(_)) => {
            cx.unsupported(at(path, "path_match_policy"));
            None
        }
        None => {
            cx.err(
                path,
                "a path specifier (prefix, path, safe_regex or path_separated_prefix) is required",
            );
            None
        }
    };
    reject_set!(cx, path; runtime_fraction);
    let headers: Vec<_> = headers
        .into_iter()
        .enumerate()
        .filter_map(|(i, h)| header_matcher(cx, &ix(path, "headers", i), h))
        .collect();
    let query_parameters: Vec<_> = query_parameters
        .into_iter()
        .enumerate()
        .filter_map(|(i, q)| query_matcher(cx, &ix(path, "query_parameters", i), q))
        .collect();
    reject_set!(cx, path; cookies, grpc, tls_context, dynamic_metadata, filter_state);
    if cx.errors.len() > start {
        return None;
    }
    Some(model::RouteMatch {
        path: path_match?,
        case_sensitive: bool_value(case_sensitive).unwrap_or(true),
        headers,
        query_parameters,
    })
}

/// A `RegexMatcher` compiled to match whole inputs, like RE2's FullMatch.
fn full_regex(cx: &mut Ctx, path: &str, r: matcher::RegexMatcher) -> Option<Regex> {
    let pattern = regex_matcher(cx, path, r)?;
    compile(
        cx,
        &at(path, "regex"),
        &format!("^(?:{pattern})$"),
        &pattern,
    )
}

/// The pattern of a `RegexMatcher` (RE2 syntax; only the default engine).
fn regex_matcher(cx: &mut Ctx, path: &str, r: matcher::RegexMatcher) -> Option<String> {
    let matcher::RegexMatcher { regex, engine_type } = r;
    reject_set!(cx, path; engine_type);
    Some(regex)
}

fn compile(cx: &mut Ctx, path: &str, anchored: &str, original: &str) -> Option<Regex> {
    match Regex::new(anchored) {
        Ok(r) => Some(r),
        Err(e) => {
            // Report the regex crate's reason, without its echo of the (anchored) pattern.
            let reason = match &e {
                regex::Error::Syntax(s) => {
                    let last = s.lines().last().unwrap_or(s).trim();
                    last.strip_prefix("error: ").unwrap_or(last).to_string()
                }
                other => other.to_string(),
            };
            cx.err(path, format!("invalid regex '{original}': {reason}"));
            None
        }
    }
}

fn regex_subst(
    cx: &mut Ctx,
    path: &str,
    r: matcher::RegexMatchAndSubstitute,
) -> Option<(Regex, String)> {
    let matcher::RegexMatchAndSubstitute {
        pattern,
        substitution,
    } = r;
    let Some(pattern) = pattern else {
        cx.err(at(path, "pattern"), "required");
        return None;
    };
    let ppath = at(path, "pattern");
    let p = regex_matcher(cx, &ppath, pattern)?;
    let re = compile(cx, &at(&ppath, "regex"), &p, &p)?;
    Some((re, substitution))
}

fn header_matcher(cx: &mut Ctx, path: &str, h: rt::HeaderMatcher) -> Option<model::HeaderMatcher> {
    let rt::HeaderMatcher {
        name,
        invert_match,
        treat_missing_header_as_empty,
        header_match_specifier,
    } = h;
    reject_set!(cx, path; treat_missing_header_as_empty);
    if name.is_empty() {
        cx.err(at(path, "name"), "required");
        return None;
    }
    use rt::header_matcher::HeaderMatchSpecifier as S;
    let sm = |pattern| {
        Some(model::HeaderMatchSpec::StringMatch(model::StringMatcher {
            pattern,
            ignore_case: false,
        }))
    };
    let spec = match header_match_specifier {
        // Envoy's default: the header must be present.
        None => Some(model::HeaderMatchSpec::Present(true)),
        Some(S::PresentMatch(b)) => Some(model::HeaderMatchSpec::Present(b)),
        Some(S::ExactMatch(s)) => sm(model::StringPattern::Exact(s)),
        Some(S::PrefixMatch(s)) => sm(model::StringPattern::Prefix(s)),
        Some(S::SuffixMatch(s)) => sm(model::StringPattern::Suffix(s)),
        Some(S::ContainsMatch(s)) => sm(model::StringPattern::Contains(s)),
        Some(S::SafeRegexMatch(r)) => full_regex(cx, &at(path, "safe_regex_match"), r)
            .and_then(|r| sm(model::StringPattern::Regex(r))),
        Some(S::StringMatch(m)) => string_matcher(cx, &at(path, "string_match"), m)
            .map(model::HeaderMatchSpec::StringMatch),
        Some(S::RangeMatch(_)) => {
            cx.unsupported(at(path, "range_match"));
            None
        }
    };
    Some(model::HeaderMatcher {
        name: name.to_ascii_lowercase(),
        spec: spec?,
        invert: invert_match,
    })
}

fn query_matcher(
    cx: &mut Ctx,
    path: &str,
    q: rt::QueryParameterMatcher,
) -> Option<model::QueryParameterMatcher> {
    let rt::QueryParameterMatcher {
        name,
        query_parameter_match_specifier,
    } = q;
    if name.is_empty() {
        cx.err(at(path, "name"), "required");
        return None;
    }
    use rt::query_parameter_matcher::QueryParameterMatchSpecifier as S;
    let spec = match query_parameter_match_specifier {
        None | Some(S::PresentMatch(true)) => Some(model::QueryParameterSpec::Present),
        Some(S::PresentMatch(false)) => {
            cx.unsupported(at(path, "present_match"));
            None
        }
        Some(S::StringMatch(m)) => string_matcher(cx, &at(path, "string_match"), m)
            .map(model::QueryParameterSpec::StringMatch),
    };
    Some(model::QueryParameterMatcher { name, spec: spec? })
}

pub(super) fn string_matcher(
    cx: &mut Ctx,
    path: &str,
    m: matcher::StringMatcher,
) -> Option<model::StringMatcher> {
    let matcher::StringMatcher {
        ignore_case,
        match_pattern,
    } = m;
    use matcher::string_matcher::MatchPattern as P;
    let non_empty = |cx: &mut Ctx, field: &str, s: String| {
        if s.is_empty() {
            cx.err(at(path, field), "must not be empty");
            None
        } else {
            Some(s)
        }
    };
    let pattern = match match_pattern {
        Some(P::Exact(s)) => Some(model::StringPattern::Exact(s)),
        Some(P::Prefix(s)) => non_empty(cx, "prefix", s).map(model::StringPattern::Prefix),
        Some(P::Suffix(s)) => non_empty(cx, "suffix", s).map(model::StringPattern::Suffix),
        Some(P::Contains(s)) => non_empty(cx, "contains", s).map(|s| {
            // The model matches `contains` case-insensitively against a lower-cased pattern.
            model::StringPattern::Contains(if ignore_case {
                s.to_ascii_lowercase()
            } else {
                s
            })
        }),
        Some(P::SafeRegex(r)) => {
            full_regex(cx, &at(path, "safe_regex"), r).map(model::StringPattern::Regex)
        }
        Some(P::Custom(_)) => {
            cx.unsupported(at(path, "custom"));
            None
        }
        None => {
            cx.err(path, "a match pattern is required");
            None
        }
    };
    Some(model::StringMatcher {
        pattern: pattern?,
        ignore_case,
    })
}

fn forward(
    cx: &mut Ctx,
    path: &str,
    ra: rt::RouteAction,
    vhost_retry: &Option<model::RetryPolicy>,
    validate: bool,
) -> Option<model::ForwardAction> {
    let rt::RouteAction {
        cluster_not_found_response_code,
        metadata_match,
        prefix_rewrite,
        regex_rewrite,
        path_rewrite_policy,
        path_rewrite,
        append_x_forwarded_host,
        timeout,
        idle_timeout,
        flush_timeout,
        early_data_policy,
        retry_policy,
        retry_policy_typed_config,
        request_mirror_policies,
        priority,
        rate_limits,
        include_vh_rate_limits,
        hash_policy,
        cors,
        max_grpc_timeout,
        grpc_timeout_offset,
        upgrade_configs,
        internal_redirect_policy,
        internal_redirect_action,
        max_internal_redirects,
        hedge_policy,
        max_stream_duration,
        cluster_specifier,
        host_rewrite_specifier,
    } = ra;
    let start = cx.errors.len();
    use rt::route_action::ClusterSpecifier as C;
    let cluster = match cluster_specifier {
        Some(C::Cluster(name)) => {
            check_cluster(cx, &at(path, "cluster"), &name, validate);
            Some(model::ClusterSpecifier::Cluster(name))
        }
        Some(C::ClusterHeader(h)) => {
            match HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()) {
                Ok(h) => Some(model::ClusterSpecifier::Header(h)),
                Err(_) => {
                    cx.err(
                        at(path, "cluster_header"),
                        format!("invalid header name '{h}'"),
                    );
                    None
                }
            }
        }
        Some(C::WeightedClusters(w)) => weighted(cx, &at(path, "weighted_clusters"), w, validate)
            .map(model::ClusterSpecifier::Weighted),
        Some(C::ClusterSpecifierPlugin(_)) => {
            cx.unsupported(at(path, "cluster_specifier_plugin"));
            None
        }
        Some(C::InlineClusterSpecifierPlugin(_)) => {
            cx.unsupported(at(path, "inline_cluster_specifier_plugin"));
            None
        }
        None => {
            cx.err(
                path,
                "a cluster specifier (cluster, cluster_header or weighted_clusters) is required",
            );
            None
        }
    };
    reject_set!(cx, path; cluster_not_found_response_code, metadata_match);
    if !prefix_rewrite.is_empty() && regex_rewrite.is_some() {
        cx.err(path, "Cannot specify both prefix_rewrite and regex_rewrite");
    }
    let regex_rewrite = regex_rewrite.and_then(|r| regex_subst(cx, &at(path, "regex_rewrite"), r));
    reject_set!(cx, path; path_rewrite_policy, path_rewrite, append_x_forwarded_host);
    let timeout = timeout_or(
        cx,
        &at(path, "timeout"),
        timeout,
        Some(Duration::from_secs(15)),
    );
    let idle_timeout = timeout_or(cx, &at(path, "idle_timeout"), idle_timeout, None);
    reject_set!(cx, path; flush_timeout, early_data_policy);
    let own_retry = retry_policy.and_then(|r| retry(cx, &at(path, "retry_policy"), r));
    let priority = match core::RoutingPriority::try_from(priority) {
        Ok(core::RoutingPriority::High) => model::RoutingPriority::High,
        Ok(_) => model::RoutingPriority::Default,
        Err(_) => {
            cx.err(at(path, "priority"), format!("unknown value {priority}"));
            model::RoutingPriority::Default
        }
    };
    reject_set!(cx, path;
        retry_policy_typed_config, request_mirror_policies, rate_limits,
        include_vh_rate_limits, cors, max_grpc_timeout, grpc_timeout_offset);
    let hash_policy = super::lb::hash_policies(cx, path, hash_policy);
    let mut upgrade_overrides = Vec::new();
    let mut seen = HashSet::new();
    for (i, u) in upgrade_configs.into_iter().enumerate() {
        let upath = ix(path, "upgrade_configs", i);
        let rt::route_action::UpgradeConfig {
            upgrade_type,
            enabled,
            connect_config,
        } = u;
        reject_set!(cx, &upath; connect_config);
        let t = upgrade_type.to_ascii_lowercase();
        if t.is_empty() {
            cx.err(at(&upath, "upgrade_type"), "required");
        } else if !seen.insert(t.clone()) {
            cx.err(
                at(&upath, "upgrade_type"),
                format!("Duplicate upgrade {upgrade_type}"),
            );
        } else {
            upgrade_overrides.push(model::UpgradeConfig {
                upgrade_type: t,
                enabled: bool_value(enabled).unwrap_or(true),
            });
        }
    }
    reject_set!(cx, path;
        internal_redirect_policy, internal_redirect_action, max_internal_redirects, hedge_policy,
        max_stream_duration);
    use rt::route_action::HostRewriteSpecifier as H;
    let host_rewrite = match host_rewrite_specifier {
        None => model::HostRewrite::None,
        Some(H::HostRewriteLiteral(h)) => model::HostRewrite::Literal(h),
        Some(H::AutoHostRewrite(b)) if b.value => model::HostRewrite::Auto,
        Some(H::AutoHostRewrite(_)) => model::HostRewrite::None,
        Some(H::HostRewriteHeader(_)) => {
            cx.unsupported(at(path, "host_rewrite_header"));
            model::HostRewrite::None
        }
        Some(H::HostRewritePathRegex(_)) => {
            cx.unsupported(at(path, "host_rewrite_path_regex"));
            model::HostRewrite::None
        }
        Some(H::HostRewrite(_)) => {
            cx.unsupported(at(path, "host_rewrite"));
            model::HostRewrite::None
        }
    };
    if cx.errors.len() > start {
        return None;
    }
    Some(model::ForwardAction {
        cluster: cluster?,
        prefix_rewrite: (!prefix_rewrite.is_empty()).then_some(prefix_rewrite),
        regex_rewrite,
        host_rewrite,
        timeout,
        idle_timeout,
        retry_policy: own_retry.or_else(|| vhost_retry.clone()),
        upgrade_overrides,
        priority,
        hash_policy,
    })
}

fn check_cluster(cx: &mut Ctx, path: &str, name: &str, validate: bool) {
    if name.is_empty() {
        cx.err(path, "required");
    } else if validate && !cx.cluster_names.contains(name) {
        cx.err(path, format!("unknown cluster '{name}'"));
    }
}

fn weighted(
    cx: &mut Ctx,
    path: &str,
    w: rt::WeightedCluster,
    validate: bool,
) -> Option<model::WeightedClusters> {
    let rt::WeightedCluster {
        clusters,
        total_weight,
        runtime_key_prefix,
        random_value_specifier,
    } = w;
    let start = cx.errors.len();
    reject_set!(cx, path; runtime_key_prefix, random_value_specifier);
    if clusters.is_empty() {
        cx.err(at(path, "clusters"), "at least one cluster required");
    }
    let mut sum: u64 = 0;
    let mut out = Vec::new();
    for (i, c) in clusters.into_iter().enumerate() {
        let cpath = ix(path, "clusters", i);
        let rt::weighted_cluster::ClusterWeight {
            name,
            cluster_header,
            weight,
            metadata_match,
            request_headers_to_add,
            request_headers_to_remove,
            response_headers_to_add,
            response_headers_to_remove,
            typed_per_filter_config,
            host_rewrite_specifier,
        } = c;
        reject_set!(cx, &cpath; cluster_header);
        if cluster_header.is_empty() {
            check_cluster(cx, &at(&cpath, "name"), &name, validate);
        }
        reject_set!(cx, &cpath; metadata_match);
        let headers = header_mutations(
            cx,
            &cpath,
            request_headers_to_add,
            request_headers_to_remove,
            response_headers_to_add,
            response_headers_to_remove,
        );
        reject_set!(cx, &cpath; typed_per_filter_config, host_rewrite_specifier);
        let weight = u32_value(weight).unwrap_or(0);
        sum += u64::from(weight);
        // A zero weight never receives traffic; the model only holds clusters that can.
        if weight > 0 {
            out.push(model::WeightedCluster {
                name,
                weight,
                headers,
            });
        }
    }
    let Ok(total) = u32::try_from(sum) else {
        cx.err(
            at(path, "clusters"),
            format!("the sum of weights ({sum}) exceeds {}", u32::MAX),
        );
        return None;
    };
    if let Some(t) = u32_value(total_weight) {
        if t != total {
            cx.err(
                at(path, "total_weight"),
                format!("Sum of weights in the weighted_cluster must add up to total_weight: {total} != {t}"),
            );
        }
    }
    if total == 0 && cx.errors.len() == start {
        cx.err(
            at(path, "clusters"),
            "Sum of weights in the weighted_cluster must be greater than 0",
        );
    }
    if cx.errors.len() > start {
        return None;
    }
    Some(model::WeightedClusters {
        clusters: out,
        total_weight: total,
    })
}

fn retry(cx: &mut Ctx, path: &str, r: rt::RetryPolicy) -> Option<model::RetryPolicy> {
    let rt::RetryPolicy {
        retry_on,
        num_retries,
        per_try_timeout,
        per_try_idle_timeout,
        retry_priority,
        retry_host_predicate,
        retry_options_predicates,
        host_selection_retry_max_attempts,
        retriable_status_codes,
        retry_back_off,
        rate_limited_retry_back_off,
        retriable_headers,
        retriable_request_headers,
        refresh_cluster_on_retry,
    } = r;
    let start = cx.errors.len();
    let retry_on = match model::RetryOn::parse(&retry_on) {
        Ok(r) => r,
        Err(tok) => {
            cx.err(
                at(path, "retry_on"),
                format!("unsupported retry_on condition '{tok}'"),
            );
            model::RetryOn::default()
        }
    };
    let per_try_timeout =
        duration(cx, &at(path, "per_try_timeout"), per_try_timeout).filter(|d| !d.is_zero());
    reject_set!(cx, path; per_try_idle_timeout, retry_options_predicates);
    let (previous_hosts, previous_priorities) =
        retry_extensions(cx, path, retry_host_predicate, retry_priority);
    // Envoy's default is 1 (proto default 0 means unset).
    let host_selection_retry_max_attempts = match host_selection_retry_max_attempts {
        0 => 1,
        n => u32::try_from(n).unwrap_or(u32::MAX),
    };
    let mut retriable_header_matchers = Vec::new();
    for (i, h) in retriable_headers.into_iter().enumerate() {
        if let Some(m) = header_matcher(cx, &ix(path, "retriable_headers", i), h) {
            retriable_header_matchers.push(m);
        }
    }
    let mut codes = Vec::new();
    for (i, c) in retriable_status_codes.into_iter().enumerate() {
        match u16::try_from(c) {
            Ok(c) if (100..=599).contains(&c) => codes.push(c),
            _ => cx.err(
                ix(path, "retriable_status_codes", i),
                format!("invalid HTTP status code {c}"),
            ),
        }
    }
    let (back_off_base, back_off_max) = match retry_back_off {
        None => (Duration::from_millis(25), Duration::from_millis(250)),
        Some(rt::retry_policy::RetryBackOff {
            base_interval,
            max_interval,
        }) => {
            let bpath = at(path, "retry_back_off");
            let base = duration(cx, &at(&bpath, "base_interval"), base_interval);
            let max = duration(cx, &at(&bpath, "max_interval"), max_interval);
            match base {
                Some(b) if !b.is_zero() => {
                    let m = max.unwrap_or(b.saturating_mul(10));
                    if m.is_zero() {
                        cx.err(at(&bpath, "max_interval"), "must be greater than 0");
                    } else if m < b {
                        cx.err(
                            at(&bpath, "max_interval"),
                            "max_interval must be greater than or equal to the base_interval",
                        );
                    }
                    (b, m)
                }
                _ => {
                    if cx.errors.len() == start {
                        cx.err(at(&bpath, "base_interval"), "required and greater than 0");
                    }
                    (Duration::ZERO, Duration::ZERO)
                }
            }
        }
    };
    reject_set!(cx, path;
        rate_limited_retry_back_off, retriable_request_headers, refresh_cluster_on_retry);
    if cx.errors.len() > start {
        return None;
    }
    Some(model::RetryPolicy {
        retry_on,
        num_retries: u32_value(num_retries).unwrap_or(1),
        per_try_timeout,
        retriable_status_codes: codes,
        back_off_base,
        back_off_max,
        retriable_headers: retriable_header_matchers,
        previous_hosts,
        host_selection_retry_max_attempts,
        previous_priorities,
    })
}

const PREVIOUS_HOSTS: &str = "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";
const PREVIOUS_PRIORITIES: &str =
    "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig";

/// `retry_host_predicate` (only previous_hosts) and `retry_priority` (only previous_priorities,
/// whose `update_frequency` must be positive).
fn retry_extensions(
    cx: &mut Ctx,
    path: &str,
    hosts: Vec<rt::retry_policy::RetryHostPredicate>,
    priority: Option<rt::retry_policy::RetryPriority>,
) -> (bool, Option<u32>) {
    use envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3 as pp;
    let mut previous_hosts = false;
    for (i, p) in hosts.into_iter().enumerate() {
        let ppath = ix(path, "retry_host_predicate", i);
        let rt::retry_policy::RetryHostPredicate {
            name: _,
            config_type,
        } = p;
        match config_type {
            Some(rt::retry_policy::retry_host_predicate::ConfigType::TypedConfig(any))
                if any.type_url == format!("type.googleapis.com/{PREVIOUS_HOSTS}") =>
            {
                previous_hosts = true
            }
            Some(rt::retry_policy::retry_host_predicate::ConfigType::TypedConfig(any)) => cx.err(
                at(&ppath, "typed_config"),
                format!("unsupported retry host predicate '{}'", any.type_url),
            ),
            None => cx.err(at(&ppath, "typed_config"), "required"),
        }
    }
    let mut previous_priorities = None;
    if let Some(p) = priority {
        let ppath = at(path, "retry_priority");
        let rt::retry_policy::RetryPriority {
            name: _,
            config_type,
        } = p;
        match config_type {
            Some(rt::retry_policy::retry_priority::ConfigType::TypedConfig(any)) => {
                let tpath = at(&ppath, "typed_config");
                if let Some(c) =
                    unpack::<pp::PreviousPrioritiesConfig>(cx, &tpath, &any, PREVIOUS_PRIORITIES)
                {
                    let pp::PreviousPrioritiesConfig { update_frequency } = c;
                    if update_frequency <= 0 {
                        cx.err(at(&tpath, "update_frequency"), "must be greater than 0");
                    } else {
                        previous_priorities = Some(update_frequency as u32);
                    }
                }
            }
            None => cx.err(at(&ppath, "typed_config"), "required"),
        }
    }
    (previous_hosts, previous_priorities)
}

fn redirect(cx: &mut Ctx, path: &str, r: rt::RedirectAction) -> Option<model::RouteAction> {
    let rt::RedirectAction {
        host_redirect,
        port_redirect,
        response_code,
        strip_query,
        scheme_rewrite_specifier,
        path_rewrite_specifier,
    } = r;
    let start = cx.errors.len();
    use rt::redirect_action::{
        PathRewriteSpecifier as P, RedirectResponseCode as R, SchemeRewriteSpecifier as S,
    };
    let scheme = match scheme_rewrite_specifier {
        Some(S::HttpsRedirect(true)) => Some("https".to_string()),
        Some(S::HttpsRedirect(false)) | None => None,
        Some(S::SchemeRedirect(s)) if s.is_empty() => None,
        Some(S::SchemeRedirect(s)) => Some(s.to_ascii_lowercase()),
    };
    let port = match u16::try_from(port_redirect) {
        Ok(0) => None,
        Ok(p) => Some(p),
        Err(_) => {
            cx.err(
                at(path, "port_redirect"),
                format!("port {port_redirect} out of range"),
            );
            None
        }
    };
    let status = match R::try_from(response_code) {
        Ok(R::MovedPermanently) => StatusCode::MOVED_PERMANENTLY,
        Ok(R::Found) => StatusCode::FOUND,
        Ok(R::SeeOther) => StatusCode::SEE_OTHER,
        Ok(R::TemporaryRedirect) => StatusCode::TEMPORARY_REDIRECT,
        Ok(R::PermanentRedirect) => StatusCode::PERMANENT_REDIRECT,
        Err(_) => {
            cx.err(
                at(path, "response_code"),
                format!("unknown value {response_code}"),
            );
            StatusCode::MOVED_PERMANENTLY
        }
    };
    let rpath = match path_rewrite_specifier {
        None => Some(model::RedirectPath::Keep),
        Some(P::PathRedirect(p)) => Some(model::RedirectPath::Path(p)),
        Some(P::PrefixRewrite(p)) => Some(model::RedirectPath::Prefix(p)),
        Some(P::RegexRewrite(r)) => regex_subst(cx, &at(path, "regex_rewrite"), r)
            .map(|(re, s)| model::RedirectPath::Regex(re, s)),
        Some(P::PathRewrite(_)) => {
            cx.unsupported(at(path, "path_rewrite"));
            None
        }
    };
    if cx.errors.len() > start {
        return None;
    }
    Some(model::RouteAction::Redirect(model::Redirect {
        scheme,
        host: (!host_redirect.is_empty()).then_some(host_redirect),
        port,
        path: rpath?,
        status,
        strip_query,
    }))
}

fn direct_response(
    cx: &mut Ctx,
    path: &str,
    d: rt::DirectResponseAction,
) -> Option<model::RouteAction> {
    let rt::DirectResponseAction {
        status,
        body,
        body_format,
    } = d;
    let start = cx.errors.len();
    let code = u16::try_from(status)
        .ok()
        .filter(|s| (200..600).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok());
    if code.is_none() {
        cx.err(
            at(path, "status"),
            format!("must be in 200..=599, got {status}"),
        );
    }
    reject_set!(cx, path; body_format);
    let body = match body {
        None => None,
        Some(core::DataSource {
            watched_directory,
            specifier,
        }) => {
            let bpath = at(path, "body");
            reject_set!(cx, &bpath; watched_directory);
            use core::data_source::Specifier as S;
            match specifier {
                Some(S::InlineString(s)) => Some(bytes::Bytes::from(s)),
                Some(S::InlineBytes(b)) => Some(bytes::Bytes::from(b)),
                Some(S::Filename(_)) => {
                    cx.unsupported(at(&bpath, "filename"));
                    None
                }
                Some(S::EnvironmentVariable(_)) => {
                    cx.unsupported(at(&bpath, "environment_variable"));
                    None
                }
                None => None,
            }
        }
    };
    if cx.errors.len() > start {
        return None;
    }
    Some(model::RouteAction::DirectResponse {
        status: code?,
        body,
    })
}

/// Header additions/removals at one level; `path` is the owning message's path.
pub(crate) fn header_mutations(
    cx: &mut Ctx,
    path: &str,
    request_add: Vec<core::HeaderValueOption>,
    request_remove: Vec<String>,
    response_add: Vec<core::HeaderValueOption>,
    response_remove: Vec<String>,
) -> model::HeaderMutations {
    model::HeaderMutations {
        request_headers_to_add: header_adds(cx, path, "request_headers_to_add", request_add),
        request_headers_to_remove: header_removes(
            cx,
            path,
            "request_headers_to_remove",
            request_remove,
        ),
        response_headers_to_add: header_adds(cx, path, "response_headers_to_add", response_add),
        response_headers_to_remove: header_removes(
            cx,
            path,
            "response_headers_to_remove",
            response_remove,
        ),
    }
}

/// Envoy refuses to touch pseudo-headers and `host` through header mutations.
fn modifiable(name: &str) -> bool {
    !name.starts_with(':') && !name.eq_ignore_ascii_case("host")
}

fn header_adds(
    cx: &mut Ctx,
    path: &str,
    field: &str,
    adds: Vec<core::HeaderValueOption>,
) -> Vec<model::HeaderValueOption> {
    let mut out = Vec::new();
    for (i, hvo) in adds.into_iter().enumerate() {
        let hpath = ix(path, field, i);
        let core::HeaderValueOption {
            header,
            append,
            append_action,
            keep_empty_value,
        } = hvo;
        let Some(core::HeaderValue {
            key,
            value,
            raw_value,
        }) = header
        else {
            cx.err(at(&hpath, "header"), "required");
            continue;
        };
        let hv_path = at(&hpath, "header");
        use core::header_value_option::HeaderAppendAction as AA;
        let action = match (bool_value(append), AA::try_from(append_action)) {
            (Some(_), Ok(a)) if a != AA::AppendIfExistsOrAdd => {
                cx.err(
                    &hpath,
                    "Both append and append_action are set and it's not allowed",
                );
                continue;
            }
            (Some(true), _) => model::AppendAction::AppendIfExistsOrAdd,
            (Some(false), _) => model::AppendAction::OverwriteIfExistsOrAdd,
            (None, Ok(AA::AppendIfExistsOrAdd)) => model::AppendAction::AppendIfExistsOrAdd,
            (None, Ok(AA::AddIfAbsent)) => model::AppendAction::AddIfAbsent,
            (None, Ok(AA::OverwriteIfExistsOrAdd)) => model::AppendAction::OverwriteIfExistsOrAdd,
            (None, Ok(AA::OverwriteIfExists)) => model::AppendAction::OverwriteIfExists,
            (_, Err(_)) => {
                cx.err(
                    at(&hpath, "append_action"),
                    format!("unknown value {append_action}"),
                );
                continue;
            }
        };
        if !modifiable(&key) {
            cx.err(
                at(&hv_path, "key"),
                ":-prefixed or host headers may not be modified",
            );
            continue;
        }
        let Ok(name) = HeaderName::from_bytes(key.to_ascii_lowercase().as_bytes()) else {
            cx.err(at(&hv_path, "key"), format!("invalid header name '{key}'"));
            continue;
        };
        if !value.is_empty() && !raw_value.is_empty() {
            cx.err(&hv_path, "only one of value and raw_value may be set");
            continue;
        }
        let raw = if raw_value.is_empty() {
            value.into_bytes()
        } else {
            raw_value
        };
        let raw = if raw.contains(&b'%') {
            match literal_header_value(&raw) {
                Ok(v) => v,
                Err(e) => {
                    cx.err(at(&hv_path, "value"), e);
                    continue;
                }
            }
        } else {
            raw
        };
        let Ok(value) = HeaderValue::from_bytes(&raw) else {
            cx.err(at(&hv_path, "value"), "invalid header value");
            continue;
        };
        out.push(model::HeaderValueOption {
            name,
            value,
            append_action: action,
            keep_empty_value,
        });
    }
    out
}

/// A header value with `%` in it: `%%` is a literal percent; any `%COMMAND%` is not supported.
fn literal_header_value(raw: &[u8]) -> Result<Vec<u8>, String> {
    let s = std::str::from_utf8(raw).map_err(|_| "invalid header value".to_string())?;
    let tokens = format::parse(s)?;
    let mut out = String::new();
    for t in tokens {
        match t {
            FormatToken::Literal(l) => out.push_str(&l),
            _ => return Err("not supported yet (header value formatters)".into()),
        }
    }
    Ok(out.into_bytes())
}

fn header_removes(cx: &mut Ctx, path: &str, field: &str, names: Vec<String>) -> Vec<HeaderName> {
    let mut out = Vec::new();
    for (i, n) in names.into_iter().enumerate() {
        let npath = ix(path, field, i);
        if !modifiable(&n) {
            cx.err(npath, ":-prefixed or host headers may not be removed");
            continue;
        }
        match HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()) {
            Ok(h) => out.push(h),
            Err(_) => cx.err(npath, format!("invalid header name '{n}'")),
        }
    }
    out
}
