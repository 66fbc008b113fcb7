//! `envoy.filters.http.rbac`: allows or denies requests by policies over request headers, path,
//! destination port, downstream addresses and route metadata; shadow rules only count. Policies are compiled
//! into a matcher tree at build time; matching allocates nothing except for joined multi-value
//! headers.

use std::net::SocketAddr;
use std::sync::Arc;

use envoy_types::pb::envoy::config::rbac::v3::{
    permission, principal, rbac::Action as PbAction, MetadataSource, Permission, Policy, Principal,
    Rbac as PbRules, SourcedMetadata,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::{Rbac, RbacPerRoute};
use envoy_types::pb::envoy::r#type::matcher::v3::{path_matcher::Rule as PathRule, PathMatcher};
use http::StatusCode;

use crate::api::{Action, FilterContext, Hooks, HttpFilter, LocalReply, PerRoute};
use crate::convert::{invalid, reject_set, unsupported, Cidr, HeaderMatch, Result, StringMatch};
use crate::metadata_match::MetadataMatch;
use crate::registry::{decode, per_route, BuildContext, FilterConfigError, FilterFactory};
use crate::route::Metadata;
use crate::stats::{Counter, StatsSink};

pub const TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
pub const PER_ROUTE_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute";

/// What a matcher looks at.
struct Request<'a> {
    req: &'a http::request::Parts,
    remote: SocketAddr,
    direct_remote: SocketAddr,
    local: SocketAddr,
    route_metadata: Option<&'a Metadata>,
}

#[derive(Debug)]
enum Perm {
    Any,
    And(Vec<Perm>),
    Or(Vec<Perm>),
    Not(Box<Perm>),
    Header(HeaderMatch),
    UrlPath(StringMatch),
    DestinationIp(Cidr),
    DestinationPort(u16),
    /// `[start, end)`.
    DestinationPortRange(i32, i32),
    /// `sourced_metadata` with `metadata_source: ROUTE`.
    RouteMetadata(MetadataMatch),
}

#[derive(Debug)]
enum Id {
    Any,
    And(Vec<Id>),
    Or(Vec<Id>),
    Not(Box<Id>),
    Header(HeaderMatch),
    UrlPath(StringMatch),
    DirectRemoteIp(Cidr),
    RemoteIp(Cidr),
    RouteMetadata(MetadataMatch),
}

/// The URL path without query or fragment, as `PathMatcher` sees it.
fn url_path(req: &http::request::Parts) -> &str {
    let p = req.uri.path();
    p.split(['?', '#']).next().unwrap_or(p)
}

impl Perm {
    fn matches(&self, r: &Request<'_>) -> bool {
        match self {
            Perm::Any => true,
            Perm::And(v) => v.iter().all(|p| p.matches(r)),
            Perm::Or(v) => v.iter().any(|p| p.matches(r)),
            Perm::Not(p) => !p.matches(r),
            Perm::Header(h) => h.matches_request(r.req),
            Perm::UrlPath(m) => m.matches(url_path(r.req)),
            Perm::DestinationIp(c) => c.contains(r.local.ip()),
            Perm::DestinationPort(p) => r.local.port() == *p,
            Perm::DestinationPortRange(s, e) => (*s..*e).contains(&i32::from(r.local.port())),
            Perm::RouteMetadata(m) => m.matches(r.route_metadata),
        }
    }
}

impl Id {
    fn matches(&self, r: &Request<'_>) -> bool {
        match self {
            Id::Any => true,
            Id::And(v) => v.iter().all(|p| p.matches(r)),
            Id::Or(v) => v.iter().any(|p| p.matches(r)),
            Id::Not(p) => !p.matches(r),
            Id::Header(h) => h.matches_request(r.req),
            Id::UrlPath(m) => m.matches(url_path(r.req)),
            Id::DirectRemoteIp(c) => c.contains(r.direct_remote.ip()),
            Id::RemoteIp(c) => c.contains(r.remote.ip()),
            Id::RouteMetadata(m) => m.matches(r.route_metadata),
        }
    }
}

fn path_matcher(m: &PathMatcher, path: &str) -> Result<StringMatch> {
    let PathMatcher { rule } = m;
    match rule {
        Some(PathRule::Path(s)) => StringMatch::from_proto(s, &format!("{path}.path")),
        None => Err(invalid(path, "rule", "path is required")),
    }
}

/// `SourcedMetadata` over the route's metadata; dynamic metadata (the default source) does not
/// exist in Strait yet.
fn route_metadata(m: &SourcedMetadata, path: &str) -> Result<MetadataMatch> {
    let SourcedMetadata {
        metadata_matcher,
        metadata_source,
    } = m;
    match MetadataSource::try_from(*metadata_source) {
        Ok(MetadataSource::Route) => {}
        _ => {
            return Err(FilterConfigError::new(
                format!("{path}.metadata_source"),
                "only ROUTE is supported (dynamic metadata is not supported yet)",
            ))
        }
    }
    match metadata_matcher {
        Some(mm) => MetadataMatch::from_proto(mm, &format!("{path}.metadata_matcher")),
        None => Err(invalid(path, "metadata_matcher", "required")),
    }
}

#[allow(deprecated)]
fn perm(p: &Permission, path: &str) -> Result<Perm> {
    use permission::Rule as R;
    let Permission { rule } = p;
    let list = |set: &permission::Set, field: &str| {
        let permission::Set { rules } = set;
        rules
            .iter()
            .enumerate()
            .map(|(i, p)| perm(p, &format!("{path}.{field}.rules[{i}]")))
            .collect::<Result<Vec<_>>>()
    };
    Ok(match rule {
        Some(R::Any(true)) => Perm::Any,
        Some(R::Any(false)) => return Err(invalid(path, "any", "must be true")),
        Some(R::AndRules(s)) => Perm::And(list(s, "and_rules")?),
        Some(R::OrRules(s)) => Perm::Or(list(s, "or_rules")?),
        Some(R::NotRule(p)) => Perm::Not(Box::new(perm(p, &format!("{path}.not_rule"))?)),
        Some(R::Header(h)) => Perm::Header(HeaderMatch::from_proto(h, &format!("{path}.header"))?),
        Some(R::UrlPath(m)) => Perm::UrlPath(path_matcher(m, &format!("{path}.url_path"))?),
        Some(R::DestinationIp(c)) => {
            Perm::DestinationIp(Cidr::from_proto(c, &format!("{path}.destination_ip"))?)
        }
        Some(R::DestinationPort(port)) => match u16::try_from(*port) {
            Ok(p) => Perm::DestinationPort(p),
            Err(_) => return Err(invalid(path, "destination_port", "must be at most 65535")),
        },
        Some(R::DestinationPortRange(r)) => Perm::DestinationPortRange(r.start, r.end),
        Some(R::Metadata(_)) => return Err(unsupported(path, "metadata")),
        Some(R::RequestedServerName(_)) => return Err(unsupported(path, "requested_server_name")),
        Some(R::Matcher(_)) => return Err(unsupported(path, "matcher")),
        Some(R::UriTemplate(_)) => return Err(unsupported(path, "uri_template")),
        Some(R::SourcedMetadata(m)) => {
            Perm::RouteMetadata(route_metadata(m, &format!("{path}.sourced_metadata"))?)
        }
        None => return Err(invalid(path, "rule", "required")),
    })
}

fn id(p: &Principal, path: &str) -> Result<Id> {
    use principal::Identifier as I;
    let Principal { identifier } = p;
    let list = |set: &principal::Set, field: &str| {
        let principal::Set { ids } = set;
        ids.iter()
            .enumerate()
            .map(|(i, p)| id(p, &format!("{path}.{field}.ids[{i}]")))
            .collect::<Result<Vec<_>>>()
    };
    #[allow(deprecated)]
    Ok(match identifier {
        Some(I::Any(true)) => Id::Any,
        Some(I::Any(false)) => return Err(invalid(path, "any", "must be true")),
        Some(I::AndIds(s)) => Id::And(list(s, "and_ids")?),
        Some(I::OrIds(s)) => Id::Or(list(s, "or_ids")?),
        Some(I::NotId(p)) => Id::Not(Box::new(id(p, &format!("{path}.not_id"))?)),
        Some(I::Header(h)) => Id::Header(HeaderMatch::from_proto(h, &format!("{path}.header"))?),
        Some(I::UrlPath(m)) => Id::UrlPath(path_matcher(m, &format!("{path}.url_path"))?),
        // source_ip (deprecated) is the downstream connection's peer, like direct_remote_ip.
        Some(I::SourceIp(c)) => {
            Id::DirectRemoteIp(Cidr::from_proto(c, &format!("{path}.source_ip"))?)
        }
        Some(I::DirectRemoteIp(c)) => {
            Id::DirectRemoteIp(Cidr::from_proto(c, &format!("{path}.direct_remote_ip"))?)
        }
        Some(I::RemoteIp(c)) => Id::RemoteIp(Cidr::from_proto(c, &format!("{path}.remote_ip"))?),
        Some(I::Authenticated(_)) => {
            return Err(FilterConfigError::new(
                format!("{path}.authenticated"),
                "not supported yet (needs downstream TLS)",
            ))
        }
        Some(I::Metadata(_)) => return Err(unsupported(path, "metadata")),
        Some(I::FilterState(_)) => return Err(unsupported(path, "filter_state")),
        Some(I::SourcedMetadata(m)) => {
            Id::RouteMetadata(route_metadata(m, &format!("{path}.sourced_metadata"))?)
        }
        Some(I::Custom(_)) => return Err(unsupported(path, "custom")),
        None => return Err(invalid(path, "identifier", "required")),
    })
}

#[derive(Debug)]
struct CompiledPolicy {
    name: String,
    permissions: Vec<Perm>,
    principals: Vec<Id>,
}

/// A compiled `envoy.config.rbac.v3.RBAC`.
#[derive(Debug)]
struct Engine {
    allow: bool,
    /// Sorted by name, as Envoy iterates its policy map.
    policies: Vec<CompiledPolicy>,
}

impl Engine {
    fn from_proto(r: &PbRules, path: &str) -> Result<Engine> {
        let PbRules {
            action,
            policies,
            audit_logging_options,
        } = r;
        reject_set(
            audit_logging_options.is_some(),
            path,
            "audit_logging_options",
        )?;
        let allow = match PbAction::try_from(*action) {
            Ok(PbAction::Allow) => true,
            Ok(PbAction::Deny) => false,
            Ok(PbAction::Log) => {
                return Err(FilterConfigError::new(
                    format!("{path}.action"),
                    "LOG is not supported yet",
                ))
            }
            Err(_) => return Err(invalid(path, "action", format!("unknown action {action}"))),
        };
        let mut names: Vec<&String> = policies.keys().collect();
        names.sort();
        let mut compiled = Vec::with_capacity(names.len());
        for name in names {
            let Some(policy) = policies.get(name) else {
                continue;
            };
            let p = format!("{path}.policies[\"{name}\"]");
            let Policy {
                permissions,
                principals,
                condition,
                checked_condition,
                cel_config,
            } = policy;
            reject_set(condition.is_some(), &p, "condition")?;
            reject_set(checked_condition.is_some(), &p, "checked_condition")?;
            reject_set(cel_config.is_some(), &p, "cel_config")?;
            if permissions.is_empty() {
                return Err(invalid(
                    &p,
                    "permissions",
                    "at least one permission is required",
                ));
            }
            if principals.is_empty() {
                return Err(invalid(
                    &p,
                    "principals",
                    "at least one principal is required",
                ));
            }
            compiled.push(CompiledPolicy {
                name: name.clone(),
                permissions: permissions
                    .iter()
                    .enumerate()
                    .map(|(i, x)| perm(x, &format!("{p}.permissions[{i}]")))
                    .collect::<Result<_>>()?,
                principals: principals
                    .iter()
                    .enumerate()
                    .map(|(i, x)| id(x, &format!("{p}.principals[{i}]")))
                    .collect::<Result<_>>()?,
            });
        }
        Ok(Engine {
            allow,
            policies: compiled,
        })
    }

    /// `(allowed, the policy that matched)`.
    fn decide<'a>(&'a self, r: &Request<'_>) -> (bool, Option<&'a str>) {
        let matched = self
            .policies
            .iter()
            .find(|p| {
                p.permissions.iter().any(|x| x.matches(r))
                    && p.principals.iter().any(|x| x.matches(r))
            })
            .map(|p| p.name.as_str());
        (matched.is_some() == self.allow, matched)
    }
}

#[derive(Debug)]
struct Stats {
    allowed: Arc<Counter>,
    denied: Arc<Counter>,
    shadow_allowed: Arc<Counter>,
    shadow_denied: Arc<Counter>,
}

/// A parsed `RBAC` filter config (filter level or one route's).
#[derive(Debug)]
pub struct RbacConfig {
    rules: Option<Engine>,
    shadow: Option<Engine>,
    stats: Stats,
}

fn parse(cfg: &Rbac, path: &str, stat_prefix: &str, stats: &dyn StatsSink) -> Result<RbacConfig> {
    let Rbac {
        rules,
        rules_stat_prefix,
        matcher,
        shadow_rules,
        shadow_matcher,
        shadow_rules_stat_prefix,
        track_per_rule_stats,
    } = cfg;
    reject_set(matcher.is_some(), path, "matcher")?;
    reject_set(shadow_matcher.is_some(), path, "shadow_matcher")?;
    reject_set(*track_per_rule_stats, path, "track_per_rule_stats")?;
    let rules = rules
        .as_ref()
        .map(|r| Engine::from_proto(r, &format!("{path}.rules")))
        .transpose()?;
    let shadow = shadow_rules
        .as_ref()
        .map(|r| Engine::from_proto(r, &format!("{path}.shadow_rules")))
        .transpose()?;
    // Envoy: `http.<stat_prefix>.rbac.<rules_stat_prefix>allowed`, and the shadow counters under
    // `shadow_rules_stat_prefix`.
    let p = format!("http.{stat_prefix}.rbac.");
    Ok(RbacConfig {
        rules,
        shadow,
        stats: Stats {
            allowed: stats.counter(&format!("{p}{rules_stat_prefix}allowed")),
            denied: stats.counter(&format!("{p}{rules_stat_prefix}denied")),
            shadow_allowed: stats.counter(&format!("{p}{shadow_rules_stat_prefix}shadow_allowed")),
            shadow_denied: stats.counter(&format!("{p}{shadow_rules_stat_prefix}shadow_denied")),
        },
    })
}

/// The per-route form: `RBACPerRoute` without `rbac` disables the filter on the route.
#[derive(Debug)]
struct RouteRbac(Option<RbacConfig>);

#[derive(Debug)]
pub struct RbacFilter {
    config: RbacConfig,
}

impl HttpFilter for RbacFilter {
    fn hooks(&self) -> Hooks {
        Hooks::REQUEST_HEADERS
    }

    fn on_request_headers(
        &self,
        ctx: &mut FilterContext,
        req: &mut http::request::Parts,
    ) -> Action {
        let route = ctx.route_config::<RouteRbac>();
        let cfg = match route.as_deref() {
            Some(RouteRbac(None)) => return Action::Continue,
            Some(RouteRbac(Some(cfg))) => cfg,
            None => &self.config,
        };
        let r = Request {
            req,
            remote: ctx.remote_address,
            direct_remote: ctx.direct_remote_address,
            local: ctx.local_address,
            route_metadata: ctx.route().map(|r| &r.metadata),
        };
        if let Some(shadow) = &cfg.shadow {
            if shadow.decide(&r).0 {
                cfg.stats.shadow_allowed.inc();
            } else {
                cfg.stats.shadow_denied.inc();
            }
        }
        let Some(rules) = &cfg.rules else {
            return Action::Continue;
        };
        let (allowed, policy) = rules.decide(&r);
        if allowed {
            cfg.stats.allowed.inc();
            return Action::Continue;
        }
        cfg.stats.denied.inc();
        let details = format!(
            "rbac_access_denied_matched_policy[{}]",
            policy.unwrap_or("none")
        );
        Action::reply(
            LocalReply::new(StatusCode::FORBIDDEN, "RBAC: access denied", details)
                .with_flag("RBAC"),
        )
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
        let cfg: Rbac = decode(value, path)?;
        Ok(Arc::new(RbacFilter {
            config: parse(&cfg, path, cx.stat_prefix, cx.stats)?,
        }))
    }

    fn build_per_route(
        &self,
        _type_url: &str,
        value: &[u8],
        path: &str,
        cx: &BuildContext<'_>,
    ) -> std::result::Result<PerRoute, FilterConfigError> {
        let RbacPerRoute { rbac } = decode(value, path)?;
        let cfg = rbac
            .as_ref()
            .map(|r| parse(r, &format!("{path}.rbac"), cx.stat_prefix, cx.stats))
            .transpose()?;
        Ok(per_route(RouteRbac(cfg)))
    }
}
