//! ADS client: keeps one `AggregatedDiscoveryService` stream (SotW or Delta) to a control plane,
//! hands every response to a [`Handler`] and ACKs or NACKs it, reconnecting with back-off and
//! failing over between servers. It never interprets resources beyond their names: validation
//! and application belong to the handler.

mod backoff;
mod client;
mod delta;
mod resource;
mod sotw;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;

pub use backoff::Backoff;
pub(crate) use client::off_worker;
pub use client::{AdsClient, AdsHandle, ConnectionState};
pub use resource::{references, resource_name};

/// `envoy.config.listener.v3.Listener` (LDS).
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// `envoy.config.route.v3.RouteConfiguration` (RDS).
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// `envoy.config.cluster.v3.Cluster` (CDS).
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// `envoy.config.endpoint.v3.ClusterLoadAssignment` (EDS).
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The order Envoy subscribes in over ADS, so that a cluster's endpoints are asked for before
/// the listeners that route to it (make-before-break, see the xDS protocol's "eventual
/// consistency considerations").
pub const TYPE_ORDER: [&str; 4] = [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE];

/// LDS and CDS are wildcard subscriptions (all resources the server has for this node);
/// RDS and EDS name what they want.
pub fn is_wildcard(type_url: &str) -> bool {
    type_url == LISTENER_TYPE || type_url == CLUSTER_TYPE
}

/// One xDS resource as received. In SotW, `version` is the response's `version_info` (SotW has
/// no per-resource versions); in Delta it is the resource's own version.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub name: String,
    pub version: String,
    pub body: envoy_types::pb::google::protobuf::Any,
}

/// What one response carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// SotW: the full state of the type. For LDS/CDS a resource held but missing here has been
    /// removed; for RDS/EDS omission does NOT mean removal (the xDS spec), so the handler keeps
    /// resources it holds that are not listed.
    State(Vec<Resource>),
    /// Delta: resources added or changed, and names removed.
    Delta {
        added: Vec<Resource>,
        removed: Vec<String>,
    },
}

/// Names wanted per non-wildcard type URL (RDS/EDS). A type absent from the map wants nothing.
pub type Subscriptions = BTreeMap<String, BTreeSet<String>>;

/// The rest of Strait, as the ADS client sees it.
pub trait Handler: Send + Sync + 'static {
    /// Validates and applies one response. `Err(detail)` makes the client NACK with that detail
    /// (name the resource and field path in it) and the handler must keep its previous state.
    fn apply(&self, type_url: &str, version_info: &str, update: Update) -> Result<(), String>;

    /// The names currently needed for RDS/EDS; the client follows every change of the value
    /// (sending a new request for the changed types) for as long as it runs.
    fn subscriptions(&self) -> watch::Receiver<Subscriptions>;

    /// Resource name -> version currently held for `type_url`, sent as Delta's
    /// `initial_resource_versions` when a stream (re)starts.
    fn versions(&self, type_url: &str) -> HashMap<String, String>;

    /// A stream could not be opened, or closed before the server answered (Envoy counts
    /// `update_failure` on every ADS subscription then). Default: nothing.
    fn connection_failed(&self) {}

    /// The client refused a response of `type_url` before [`Handler::apply`] saw it (a body
    /// that does not decode, a duplicate name): counted like a rejected update. Default:
    /// nothing.
    fn rejected(&self, _type_url: &str) {}
}

/// Which ADS RPC to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// `StreamAggregatedResources` (state of the world).
    #[default]
    Sotw,
    /// `DeltaAggregatedResources` (incremental).
    Delta,
}

/// How to reach the control plane.
#[derive(Debug, Clone)]
pub struct AdsConfig {
    /// Control-plane addresses, in preference order, spoken to as plain HTTP/2 (h2c).
    pub servers: Vec<SocketAddr>,
    pub protocol: Protocol,
    /// Sent on the first request of every stream.
    pub node: crate::model::Node,
    /// Reconnect back-off; Envoy's defaults are 500 ms base and 30 s maximum.
    pub backoff: Backoff,
    /// Consecutive failed attempts on one server before moving to the next.
    pub failover_after: u32,
    /// While on a fallback server, how often to check whether the first one answers again.
    pub primary_probe_interval: Duration,
    /// Limit on TCP connect plus the server's response headers for the stream.
    pub connect_timeout: Duration,
}

impl AdsConfig {
    /// A config with Envoy-like defaults for `servers`.
    pub fn new(servers: Vec<SocketAddr>, protocol: Protocol, node: crate::model::Node) -> Self {
        AdsConfig {
            servers,
            protocol,
            node,
            backoff: Backoff::default(),
            failover_after: 2,
            primary_probe_interval: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }
}
