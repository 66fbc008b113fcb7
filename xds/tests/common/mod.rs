//! Shared pieces of the ADS tests: a handler that behaves like Strait's (validates, keeps
//! last-good state, follows RDS/EDS references) and resource builders.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source, socket_address, AggregatedConfigSource, ConfigSource, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{filter, Filter, FilterChain, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, route_match, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, http_filter, HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use prost::Message;
use strait_xds::ads::{
    self, AdsConfig, Backoff, Handler, Protocol, Resource, Subscriptions, Update, CLUSTER_TYPE,
    ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE,
};
use strait_xds::model::Node;
use tokio::sync::watch;

pub const WAIT: Duration = Duration::from_secs(10);

/// What the handler holds: type URL -> name -> (version, body).
pub type Held = BTreeMap<String, BTreeMap<String, Resource>>;

/// A handler with Strait's semantics: SotW LDS/CDS replace, SotW RDS/EDS merge, Delta applies
/// added/removed; a Cluster with a negative `connect_timeout` is refused.
pub struct TestHandler {
    held: watch::Sender<Held>,
    subs: watch::Sender<Subscriptions>,
    /// Applied (type_url, version_info) in order.
    pub applied: Mutex<Vec<(String, String)>>,
}

impl TestHandler {
    pub fn new() -> Arc<Self> {
        Arc::new(TestHandler {
            held: watch::channel(Held::new()).0,
            subs: watch::channel(Subscriptions::new()).0,
            applied: Mutex::new(Vec::new()),
        })
    }

    /// Starts from a held state (as if loaded from the last-known-good store).
    pub fn seed(&self, type_url: &str, resources: Vec<Resource>) {
        self.held.send_modify(|h| {
            let m = h.entry(type_url.to_string()).or_default();
            for r in resources {
                m.insert(r.name.clone(), r);
            }
        });
        self.refresh_subscriptions();
    }

    pub fn held(&self) -> Held {
        self.held.borrow().clone()
    }

    pub fn names(&self, type_url: &str) -> Vec<String> {
        self.held
            .borrow()
            .get(type_url)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Waits until `pred` holds for the held state.
    pub async fn wait(&self, what: &str, pred: impl FnMut(&Held) -> bool) -> Held {
        let mut rx = self.held.subscribe();
        let got = match tokio::time::timeout(WAIT, rx.wait_for(pred)).await {
            Ok(Ok(h)) => Some(h.clone()),
            _ => None,
        };
        got.unwrap_or_else(|| panic!("timed out waiting for {what}; held: {:#?}", self.held()))
    }

    pub fn body<M: Message + Default>(&self, type_url: &str, name: &str) -> Option<M> {
        let h = self.held.borrow();
        let r = h.get(type_url)?.get(name)?;
        M::decode(r.body.value.as_slice()).ok()
    }

    fn refresh_subscriptions(&self) {
        let held = self.held.borrow().clone();
        let mut subs = Subscriptions::new();
        for t in [LISTENER_TYPE, CLUSTER_TYPE] {
            for r in held.get(t).into_iter().flat_map(|m| m.values()) {
                for (rt, name) in ads::references(t, &r.body) {
                    subs.entry(rt.to_string()).or_default().insert(name);
                }
            }
        }
        self.subs.send_if_modified(|cur| {
            if *cur == subs {
                return false;
            }
            *cur = subs;
            true
        });
    }
}

fn validate(r: &Resource, type_url: &str) -> Result<(), String> {
    if type_url == CLUSTER_TYPE {
        let c = Cluster::decode(r.body.value.as_slice()).map_err(|e| e.to_string())?;
        if c.connect_timeout.is_some_and(|d| d.seconds < 0) {
            return Err(format!(
                "Cluster {}: connect_timeout: must be non-negative",
                r.name
            ));
        }
    }
    Ok(())
}

impl Handler for TestHandler {
    fn apply(&self, type_url: &str, version_info: &str, update: Update) -> Result<(), String> {
        let mut next = self
            .held
            .borrow()
            .get(type_url)
            .cloned()
            .unwrap_or_default();
        match update {
            Update::State(rs) => {
                for r in &rs {
                    validate(r, type_url)?;
                }
                if ads::is_wildcard(type_url) {
                    next.clear();
                }
                for r in rs {
                    next.insert(r.name.clone(), r);
                }
            }
            Update::Delta { added, removed } => {
                for r in &added {
                    validate(r, type_url)?;
                }
                for n in removed {
                    next.remove(&n);
                }
                for r in added {
                    next.insert(r.name.clone(), r);
                }
            }
        }
        self.applied
            .lock()
            .unwrap()
            .push((type_url.to_string(), version_info.to_string()));
        self.held.send_modify(|h| {
            h.insert(type_url.to_string(), next);
        });
        self.refresh_subscriptions();
        Ok(())
    }

    fn subscriptions(&self) -> watch::Receiver<Subscriptions> {
        self.subs.subscribe()
    }

    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        self.held
            .borrow()
            .get(type_url)
            .map(|m| {
                m.iter()
                    .map(|(n, r)| (n.clone(), r.version.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A client config with fast back-off for tests.
pub fn config(servers: Vec<SocketAddr>, protocol: Protocol) -> AdsConfig {
    let mut c = AdsConfig::new(
        servers,
        protocol,
        Node {
            id: "test-node".into(),
            cluster: "test".into(),
            ..Default::default()
        },
    );
    c.backoff = Backoff {
        base: Duration::from_millis(20),
        max: Duration::from_millis(200),
    };
    c.primary_probe_interval = Duration::from_millis(200);
    c.connect_timeout = Duration::from_millis(500);
    c
}

// === resource builders ===

pub fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: m.encode_to_vec(),
    }
}

fn ads_source() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        resource_api_version: 2, // V3
        ..Default::default()
    }
}

fn socket(addr: SocketAddr) -> envoy_types::pb::envoy::config::core::v3::Address {
    envoy_types::pb::envoy::config::core::v3::Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..Default::default()
        })),
    }
}

/// A listener on `addr` whose HTTP connection manager takes routes `route` over ADS.
pub fn listener(name: &str, addr: SocketAddr, route: &str) -> Any {
    let router = HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router".into(),
            value: Vec::new(),
        })),
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: "ingress".into(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads_source()),
            route_config_name: route.into(),
        })),
        http_filters: vec![router],
        ..Default::default()
    };
    any(
        LISTENER_TYPE,
        &Listener {
            name: name.into(),
            address: Some(socket(addr)),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(any(
                        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        &hcm,
                    ))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
}

/// A route configuration sending everything to `cluster`.
pub fn route_config(name: &str, cluster: &str) -> Any {
    any(
        ROUTE_TYPE,
        &RouteConfiguration {
            name: name.into(),
            virtual_hosts: vec![VirtualHost {
                name: "all".into(),
                domains: vec!["*".into()],
                routes: vec![Route {
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                            cluster.into(),
                        )),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    )
}

/// An EDS cluster (endpoints over ADS) with a 1 s connect timeout, or `timeout_s` seconds.
pub fn eds_cluster(name: &str, timeout_s: i64) -> Any {
    any(
        CLUSTER_TYPE,
        &Cluster {
            name: name.into(),
            connect_timeout: Some(PbDuration {
                seconds: timeout_s,
                nanos: 0,
            }),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(3)),
            eds_cluster_config: Some(cluster::EdsClusterConfig {
                eds_config: Some(ads_source()),
                service_name: String::new(),
            }),
            ..Default::default()
        },
    )
}

/// Endpoints of `cluster`.
pub fn endpoints(cluster: &str, addrs: &[SocketAddr]) -> Any {
    any(
        ENDPOINT_TYPE,
        &ClusterLoadAssignment {
            cluster_name: cluster.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: addrs
                    .iter()
                    .map(|a| LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                            address: Some(socket(*a)),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
}
