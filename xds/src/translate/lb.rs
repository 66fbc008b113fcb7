//! Load-balancing translation: `lb_policy` with its policy config, `common_lb_config`
//! (panic threshold, zone-aware / locality-weighted, consistent hashing), the load assignment
//! `policy`, and Strait's `strait.lb` cluster metadata. Envoy's defaults are applied here.

use envoy_types::pb::envoy::config::cluster::v3 as cl;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as ep;
use envoy_types::pb::google::protobuf as wkt;

use super::{at, reject_set, u32_value, Ctx};
use crate::model;

/// Strait's cluster metadata namespace (Envoy ignores unknown `filter_metadata` keys, so the
/// same cluster still loads in Envoy).
pub(crate) const STRAIT_LB_METADATA: &str = "strait.lb";

/// Envoy's ring size bounds and Maglev default.
const MIN_RING_DEFAULT: u64 = 1024;
const MAX_RING_DEFAULT: u64 = 8 * 1024 * 1024;
const MAGLEV_DEFAULT: u64 = 65537;
const MAGLEV_MAX: u64 = 5_000_011;

/// `lb_policy` + `lb_config` + `common_lb_config` + metadata into the model.
pub(crate) fn translate(
    cx: &mut Ctx,
    path: &str,
    policy: i32,
    config: Option<cl::cluster::LbConfig>,
    common: Option<cl::cluster::CommonLbConfig>,
    metadata: Option<core::Metadata>,
) -> (Option<model::LbPolicy>, model::LbConfig) {
    let mut lb = model::LbConfig {
        local_cluster_name: cx.local_cluster_name.clone(),
        local_locality: cx.local_locality.clone(),
        ..Default::default()
    };
    let policy = policy_config(cx, path, policy, config, &mut lb);
    if let Some(c) = common {
        common_lb(cx, &at(path, "common_lb_config"), c, &mut lb);
    }
    if let Some(m) = metadata {
        strait_metadata(cx, &at(path, "metadata"), m, &mut lb);
    }
    if lb.hash_balance_factor.is_some() && !policy.is_some_and(|p| p.is_hashing()) {
        // Envoy only applies bounded loads to the hashing policies; accept and ignore elsewhere.
        lb.hash_balance_factor = None;
    }
    (policy, lb)
}

fn policy_config(
    cx: &mut Ctx,
    path: &str,
    policy: i32,
    config: Option<cl::cluster::LbConfig>,
    lb: &mut model::LbConfig,
) -> Option<model::LbPolicy> {
    use cl::cluster::{LbConfig as C, LbPolicy as P};
    let mut choice_count = 2;
    let mut ring = (MIN_RING_DEFAULT, MAX_RING_DEFAULT);
    let mut table_size = MAGLEV_DEFAULT;
    match config {
        None => {}
        Some(C::LeastRequestLbConfig(c)) if policy == P::LeastRequest as i32 => {
            let lpath = at(path, "least_request_lb_config");
            let cl::cluster::LeastRequestLbConfig {
                choice_count: cc,
                active_request_bias,
                slow_start_config,
            } = c;
            if let Some(n) = u32_value(cc) {
                if n < 2 {
                    cx.err(at(&lpath, "choice_count"), "must be at least 2");
                }
                choice_count = n;
            }
            if let Some(b) = active_request_bias {
                let core::RuntimeDouble {
                    default_value,
                    runtime_key: _,
                } = b;
                // Envoy rejects a negative bias (and NaN cannot be compared sensibly).
                if !default_value.is_finite() || default_value < 0.0 {
                    cx.err(
                        at(&lpath, "active_request_bias"),
                        "must be a finite number >= 0",
                    );
                } else {
                    lb.active_request_bias = default_value;
                }
            }
            reject_set!(cx, &lpath; slow_start_config);
        }
        Some(C::RoundRobinLbConfig(c)) if policy == P::RoundRobin as i32 => {
            let cl::cluster::RoundRobinLbConfig { slow_start_config } = c;
            reject_set!(cx, &at(path, "round_robin_lb_config"); slow_start_config);
        }
        Some(C::RingHashLbConfig(c)) if policy == P::RingHash as i32 => {
            let rpath = at(path, "ring_hash_lb_config");
            let cl::cluster::RingHashLbConfig {
                minimum_ring_size,
                hash_function,
                maximum_ring_size,
            } = c;
            use cl::cluster::ring_hash_lb_config::HashFunction as H;
            if hash_function != H::XxHash as i32 {
                cx.unsupported(at(&rpath, "hash_function"));
            }
            let min = minimum_ring_size.map_or(MIN_RING_DEFAULT, |v| v.value);
            let max = maximum_ring_size.map_or(MAX_RING_DEFAULT, |v| v.value);
            if min > MAX_RING_DEFAULT {
                cx.err(at(&rpath, "minimum_ring_size"), "must be at most 8388608");
            }
            if max > MAX_RING_DEFAULT {
                cx.err(at(&rpath, "maximum_ring_size"), "must be at most 8388608");
            }
            if min == 0 || max == 0 {
                cx.err(&rpath, "ring sizes must be at least 1");
            }
            if min > max {
                cx.err(
                    at(&rpath, "minimum_ring_size"),
                    format!("minimum_ring_size ({min}) > maximum_ring_size ({max})"),
                );
            }
            ring = (min, max);
        }
        Some(C::MaglevLbConfig(c)) if policy == P::Maglev as i32 => {
            let mpath = at(path, "maglev_lb_config");
            let cl::cluster::MaglevLbConfig { table_size: t } = c;
            if let Some(t) = t.map(|v| v.value) {
                if t > MAGLEV_MAX || !is_prime(t) {
                    cx.err(
                        at(&mpath, "table_size"),
                        format!("must be a prime number no larger than {MAGLEV_MAX}"),
                    );
                }
                table_size = t;
            }
        }
        Some(C::LeastRequestLbConfig(_)) => cx.unsupported(at(path, "least_request_lb_config")),
        Some(C::RoundRobinLbConfig(_)) => cx.unsupported(at(path, "round_robin_lb_config")),
        Some(C::RingHashLbConfig(_)) => cx.unsupported(at(path, "ring_hash_lb_config")),
        Some(C::MaglevLbConfig(_)) => cx.unsupported(at(path, "maglev_lb_config")),
        Some(C::OriginalDstLbConfig(_)) => cx.unsupported(at(path, "original_dst_lb_config")),
    }
    match P::try_from(policy) {
        Ok(P::RoundRobin) => Some(model::LbPolicy::RoundRobin),
        Ok(P::LeastRequest) => Some(model::LbPolicy::LeastRequest { choice_count }),
        Ok(P::Random) => Some(model::LbPolicy::Random),
        Ok(P::RingHash) => Some(model::LbPolicy::RingHash {
            min_ring_size: ring.0,
            max_ring_size: ring.1,
        }),
        Ok(P::Maglev) => Some(model::LbPolicy::Maglev { table_size }),
        _ => {
            cx.unsupported(at(path, "lb_policy"));
            None
        }
    }
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// `Percent` rounded to an integer, as Envoy's `PROTOBUF_PERCENT_TO_ROUNDED_INTEGER_OR_DEFAULT`.
fn percent(
    cx: &mut Ctx,
    path: &str,
    p: Option<envoy_types::pb::envoy::r#type::v3::Percent>,
    default: u32,
) -> u32 {
    match p {
        None => default,
        Some(p) if (0.0..=100.0).contains(&p.value) => p.value.round() as u32,
        Some(p) => {
            cx.err(path, format!("must be within [0, 100], got {}", p.value));
            default
        }
    }
}

fn common_lb(cx: &mut Ctx, path: &str, c: cl::cluster::CommonLbConfig, lb: &mut model::LbConfig) {
    use cl::cluster::common_lb_config::LocalityConfigSpecifier as L;
    let cl::cluster::CommonLbConfig {
        healthy_panic_threshold,
        update_merge_window,
        ignore_new_hosts_until_first_hc,
        close_connections_on_host_set_change,
        consistent_hashing_lb_config,
        override_host_status,
        locality_config_specifier,
    } = c;
    lb.healthy_panic_threshold = percent(
        cx,
        &at(path, "healthy_panic_threshold"),
        healthy_panic_threshold,
        50,
    );
    // Strait rebuilds LB state on every change at once; the merge window only batches updates.
    let _ = update_merge_window;
    lb.ignore_new_hosts_until_first_hc = ignore_new_hosts_until_first_hc;
    reject_set!(cx, path; close_connections_on_host_set_change, override_host_status);
    if let Some(ch) = consistent_hashing_lb_config {
        let hpath = at(path, "consistent_hashing_lb_config");
        let cl::cluster::common_lb_config::ConsistentHashingLbConfig {
            use_hostname_for_hashing,
            hash_balance_factor,
        } = ch;
        reject_set!(cx, &hpath; use_hostname_for_hashing);
        if let Some(f) = u32_value(hash_balance_factor) {
            if f < 100 {
                cx.err(at(&hpath, "hash_balance_factor"), "must be at least 100");
            }
            lb.hash_balance_factor = Some(f);
        }
    }
    match locality_config_specifier {
        None => {}
        Some(L::LocalityWeightedLbConfig(
            cl::cluster::common_lb_config::LocalityWeightedLbConfig {},
        )) => {
            lb.locality_weighted = true;
        }
        Some(L::ZoneAwareLbConfig(z)) => {
            let zpath = at(path, "zone_aware_lb_config");
            let cl::cluster::common_lb_config::ZoneAwareLbConfig {
                routing_enabled,
                min_cluster_size,
                fail_traffic_on_panic,
            } = z;
            lb.zone_aware.routing_enabled =
                percent(cx, &at(&zpath, "routing_enabled"), routing_enabled, 100);
            lb.zone_aware.min_cluster_size = min_cluster_size.map_or(6, |v| v.value);
            lb.fail_traffic_on_panic = fail_traffic_on_panic;
        }
    }
}

/// `metadata.filter_metadata["strait.lb"]`: `fail_traffic_on_panic` (bool) for locality-weighted
/// clusters. Other namespaces are left to their owners.
fn strait_metadata(cx: &mut Ctx, path: &str, m: core::Metadata, lb: &mut model::LbConfig) {
    let Some(s) = m.filter_metadata.get(STRAIT_LB_METADATA) else {
        return;
    };
    let mpath = format!("{path}.filter_metadata[{STRAIT_LB_METADATA}]");
    let mut keys: Vec<_> = s.fields.iter().collect();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in keys {
        match (k.as_str(), &v.kind) {
            ("fail_traffic_on_panic", Some(wkt::value::Kind::BoolValue(b))) => {
                if *b && !lb.locality_weighted {
                    cx.err(
                        format!("{mpath}.{k}"),
                        "only for locality_weighted_lb_config clusters \
                         (zone-aware clusters use zone_aware_lb_config.fail_traffic_on_panic)",
                    );
                }
                lb.fail_traffic_on_panic |= *b;
            }
            ("fail_traffic_on_panic", _) => cx.err(format!("{mpath}.{k}"), "must be a bool"),
            _ => cx.unsupported(format!("{mpath}.{k}")),
        }
    }
}

/// `ClusterLoadAssignment.policy`.
pub(crate) fn assignment_policy(
    cx: &mut Ctx,
    path: &str,
    p: ep::cluster_load_assignment::Policy,
) -> model::AssignmentPolicy {
    let ep::cluster_load_assignment::Policy {
        drop_overloads,
        overprovisioning_factor,
        endpoint_stale_after,
        weighted_priority_health,
    } = p;
    reject_set!(cx, path; drop_overloads, endpoint_stale_after);
    let factor = u32_value(overprovisioning_factor).unwrap_or(140);
    if factor == 0 {
        cx.err(
            at(path, "overprovisioning_factor"),
            "must be greater than 0",
        );
    }
    model::AssignmentPolicy {
        overprovisioning_factor: factor,
        weighted_priority_health,
    }
}

/// `RouteAction.hash_policy`.
pub(crate) fn hash_policies(
    cx: &mut Ctx,
    path: &str,
    policies: Vec<envoy_types::pb::envoy::config::route::v3::route_action::HashPolicy>,
) -> Vec<model::HashPolicy> {
    use envoy_types::pb::envoy::config::route::v3::route_action::hash_policy as hp;
    let mut out = Vec::new();
    for (i, p) in policies.into_iter().enumerate() {
        let ppath = super::ix(path, "hash_policy", i);
        let envoy_types::pb::envoy::config::route::v3::route_action::HashPolicy {
            terminal,
            policy_specifier,
        } = p;
        let source = match policy_specifier {
            Some(hp::PolicySpecifier::Header(h)) => {
                let hpath = at(&ppath, "header");
                let hp::Header {
                    header_name,
                    regex_rewrite,
                } = h;
                reject_set!(cx, &hpath; regex_rewrite);
                let name = header_name.to_ascii_lowercase();
                let pseudo = [":authority", ":path", ":method", ":scheme"];
                let valid = if name.starts_with(':') {
                    pseudo.contains(&name.as_str())
                } else {
                    http::HeaderName::from_bytes(name.as_bytes()).is_ok()
                };
                if !valid {
                    cx.err(
                        at(&hpath, "header_name"),
                        format!("invalid header name '{header_name}'"),
                    );
                    continue;
                }
                model::HashSource::Header(name)
            }
            Some(hp::PolicySpecifier::Cookie(c)) => {
                let cpath = at(&ppath, "cookie");
                let hp::Cookie {
                    name,
                    ttl,
                    path,
                    attributes,
                } = c;
                // With a ttl Envoy generates the cookie when absent; Strait does not (yet).
                reject_set!(cx, &cpath; ttl, path, attributes);
                if name.is_empty() {
                    cx.err(at(&cpath, "name"), "required");
                    continue;
                }
                model::HashSource::Cookie(name)
            }
            Some(hp::PolicySpecifier::ConnectionProperties(c)) => {
                let hp::ConnectionProperties { source_ip } = c;
                if !source_ip {
                    // Envoy yields no hash for this policy then.
                    continue;
                }
                model::HashSource::SourceIp
            }
            Some(hp::PolicySpecifier::QueryParameter(q)) => {
                let hp::QueryParameter { name } = q;
                if name.is_empty() {
                    cx.err(at(&at(&ppath, "query_parameter"), "name"), "required");
                    continue;
                }
                model::HashSource::QueryParameter(name)
            }
            Some(hp::PolicySpecifier::FilterState(_)) => {
                cx.unsupported(at(&ppath, "filter_state"));
                continue;
            }
            None => {
                cx.err(&ppath, "a policy_specifier is required");
                continue;
            }
        };
        out.push(model::HashPolicy { source, terminal });
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::model::{self, HashSource, LbPolicy, RouteAction};
    use crate::{load, Overrides, Source};

    fn bootstrap(cluster_extra: Value, route_extra: Value, cm: Value) -> Value {
        let mut cluster = json!({
            "name": "c", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "c", "endpoints": [{
                "locality": {"region": "r", "zone": "a"},
                "load_balancing_weight": 3,
                "lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": 1}}}}]}]}
        });
        for (k, v) in cluster_extra.as_object().cloned().unwrap_or_default() {
            cluster[k] = v;
        }
        let mut route = json!({"cluster": "c"});
        for (k, v) in route_extra.as_object().cloned().unwrap_or_default() {
            route[k] = v;
        }
        json!({
            "node": {"id": "n", "cluster": "c", "locality": {"region": "r", "zone": "a"}},
            "cluster_manager": cm,
            "static_resources": {
                "listeners": [{"name": "l", "address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "x",
                            "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "route": route}]}]},
                            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
                        }}]}]}],
                "clusters": [cluster]
            }
        })
    }

    fn try_load(v: &Value) -> Result<model::Bootstrap, Vec<String>> {
        load(&Source::Yaml(v.to_string()), &Overrides::default())
            .map_err(|e| e.0.iter().map(ToString::to_string).collect())
    }

    fn ok(v: &Value) -> model::Bootstrap {
        try_load(v).unwrap_or_else(|e| panic!("unexpected errors: {e:?}"))
    }

    #[test]
    fn defaults_are_envoys() {
        let b = ok(&bootstrap(json!({}), json!({}), json!({})));
        let c = &b.clusters[0];
        assert_eq!(
            c.lb,
            model::LbConfig {
                local_locality: b.node.locality.clone(),
                ..Default::default()
            }
        );
        assert_eq!(c.lb.healthy_panic_threshold, 50);
        assert_eq!(c.load_assignment.policy.overprovisioning_factor, 140);
        assert_eq!(
            c.load_assignment.endpoints[0].load_balancing_weight,
            Some(3)
        );
    }

    #[test]
    fn common_lb_config_policies_and_hashing() {
        let b = ok(&bootstrap(
            json!({
                "lb_policy": "RING_HASH",
                "ring_hash_lb_config": {"minimum_ring_size": 2048},
                "common_lb_config": {
                    "healthy_panic_threshold": {"value": 30.6},
                    "zone_aware_lb_config": {"routing_enabled": {"value": 80},
                        "min_cluster_size": 3, "fail_traffic_on_panic": true},
                    "consistent_hashing_lb_config": {"hash_balance_factor": 150}
                },
                "load_assignment": {"cluster_name": "c", "endpoints": [],
                    "policy": {"overprovisioning_factor": 100, "weighted_priority_health": true}}
            }),
            json!({"hash_policy": [
                {"header": {"header_name": "X-User"}},
                {"cookie": {"name": "sid"}, "terminal": true},
                {"connection_properties": {"source_ip": true}},
                {"query_parameter": {"name": "u"}}
            ]}),
            json!({"local_cluster_name": "c"}),
        ));
        let c = &b.clusters[0];
        assert_eq!(
            c.lb_policy,
            LbPolicy::RingHash {
                min_ring_size: 2048,
                max_ring_size: 8 * 1024 * 1024
            }
        );
        assert_eq!(c.lb.healthy_panic_threshold, 31);
        assert_eq!(c.lb.zone_aware.routing_enabled, 80);
        assert_eq!(c.lb.zone_aware.min_cluster_size, 3);
        assert!(c.lb.fail_traffic_on_panic);
        assert_eq!(c.lb.hash_balance_factor, Some(150));
        assert_eq!(c.lb.local_cluster_name.as_deref(), Some("c"));
        assert_eq!(
            c.load_assignment.policy,
            model::AssignmentPolicy {
                overprovisioning_factor: 100,
                weighted_priority_health: true,
            }
        );
        let RouteAction::Forward(f) =
            &b.listeners[0].hcm.route_config.virtual_hosts[0].routes[0].action
        else {
            panic!("not a forward action");
        };
        let sources: Vec<_> = f
            .hash_policy
            .iter()
            .map(|p| (p.source.clone(), p.terminal))
            .collect();
        assert_eq!(
            sources,
            [
                (HashSource::Header("x-user".into()), false),
                (HashSource::Cookie("sid".into()), true),
                (HashSource::SourceIp, false),
                (HashSource::QueryParameter("u".into()), false),
            ]
        );
        let b = ok(&bootstrap(
            json!({"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 5},
                   "common_lb_config": {"locality_weighted_lb_config": {}},
                   "metadata": {"filter_metadata": {"strait.lb": {"fail_traffic_on_panic": true}}}}),
            json!({}),
            json!({}),
        ));
        let c = &b.clusters[0];
        assert_eq!(c.lb_policy, LbPolicy::Maglev { table_size: 5 });
        assert!(c.lb.locality_weighted && c.lb.fail_traffic_on_panic);
    }

    #[test]
    fn invalid_lb_settings_are_errors_with_paths() {
        let cases = [
            (
                json!({"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 65536}}),
                json!({}),
                json!({}),
                "maglev_lb_config.table_size",
            ),
            (
                json!({"lb_policy": "RING_HASH", "ring_hash_lb_config":
                {"minimum_ring_size": 10, "maximum_ring_size": 5}}),
                json!({}),
                json!({}),
                "ring_hash_lb_config.minimum_ring_size",
            ),
            (
                json!({"common_lb_config": {"healthy_panic_threshold": {"value": 120}}}),
                json!({}),
                json!({}),
                "common_lb_config.healthy_panic_threshold",
            ),
            (
                json!({"common_lb_config": {"consistent_hashing_lb_config":
                {"hash_balance_factor": 50}}}),
                json!({}),
                json!({}),
                "hash_balance_factor",
            ),
            (
                json!({"metadata": {"filter_metadata": {"strait.lb": {"fail_traffic_on_panic": true}}}}),
                json!({}),
                json!({}),
                "strait.lb",
            ),
            (
                json!({}),
                json!({"hash_policy": [{"cookie": {"name": "s", "ttl": "1s"}}]}),
                json!({}),
                "hash_policy[0].cookie.ttl",
            ),
            (
                json!({}),
                json!({"hash_policy": [{"filter_state": {"key": "k"}}]}),
                json!({}),
                "hash_policy[0].filter_state",
            ),
            (
                json!({}),
                json!({}),
                json!({"local_cluster_name": "missing"}),
                "cluster_manager.local_cluster_name",
            ),
        ];
        for (cluster, route, cm, want) in cases {
            let errs = try_load(&bootstrap(cluster, route, cm)).expect_err("must be rejected");
            assert!(errs.iter().any(|e| e.contains(want)), "{want}: {errs:?}");
        }
    }
}
