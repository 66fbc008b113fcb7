//! Strict translation of decoded Envoy protos into [`crate::model`].
//!
//! Every proto struct is destructured exhaustively (no `..`), so a field added to Envoy's API
//! cannot be ignored by accident: a field Strait does not implement is an error at its path
//! (`not supported yet`). Errors are collected, never returned early, so `--mode validate` lists
//! all of them. Envoy's defaults are applied here, never in the data plane.

// Deprecated Envoy fields still have to be destructured to be rejected.
#![allow(deprecated)]

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::google::protobuf as wkt;
use prost::Message;

use crate::error::ConfigError;

pub(crate) mod access_log;
pub(crate) mod bootstrap;
pub(crate) mod cluster;
pub(crate) mod config_source;
pub(crate) mod format;
pub(crate) mod health;
pub(crate) mod lb;
pub(crate) mod listener;
pub(crate) mod route;

/// Collected errors plus what cross-resource checks need.
#[derive(Debug, Default)]
pub(crate) struct Ctx {
    pub errors: Vec<ConfigError>,
    /// Names of all static clusters (routes must name one of them).
    pub cluster_names: HashSet<String>,
    /// Where HTTP filters are built (registry, stats, cluster channels).
    pub filter_env: crate::filter_env::EnvRef,
    /// Per-filter configs of the route configuration and virtual host being translated, for
    /// resolving each route's overrides (Envoy's precedence: route > vhost > route config).
    pub per_filter_rc: Vec<(String, strait_filters::PerRoute)>,
    pub per_filter_vh: Vec<(String, strait_filters::PerRoute)>,
    /// The `stat_prefix` of the connection manager being translated (filter stats use it).
    pub stat_prefix: String,
    /// `dynamic_resources.ads_config` is configured, so `ads: {}` sources are valid.
    pub ads_configured: bool,
    /// Route configurations for listeners using RDS, by name; a name missing here gets an empty
    /// placeholder (the listener is still warming).
    pub rds_routes: std::collections::HashMap<String, std::sync::Arc<crate::model::RouteConfig>>,
    /// RDS names the translated listeners use, with their source.
    pub rds_refs: Vec<config_source::SourceRef>,
    /// EDS service names the translated clusters use, with their source.
    pub eds_refs: Vec<config_source::SourceRef>,
    /// `cluster_manager.local_cluster_name` and `node.locality` of the bootstrap, copied into
    /// each cluster's LB config for zone-aware routing.
    pub local_cluster_name: Option<String>,
    pub local_locality: crate::model::Locality,
}

impl Ctx {
    pub fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path, message));
    }

    pub fn unsupported(&mut self, path: impl Into<String>) {
        self.err(path, "not supported yet");
    }
}

/// `base.field`, or `field` at the root.
pub(crate) fn at(base: &str, field: &str) -> String {
    if base.is_empty() {
        field.to_string()
    } else {
        format!("{base}.{field}")
    }
}

/// `base.field[i]`.
pub(crate) fn ix(base: &str, field: &str, i: usize) -> String {
    format!("{}[{i}]", at(base, field))
}

/// Whether a proto field differs from its default (i.e. the config set it).
pub(crate) fn is_set<T: Default + PartialEq>(v: &T) -> bool {
    *v != T::default()
}

/// Rejects each listed (owned, destructured) field that is set, as `not supported yet`.
macro_rules! reject_set {
    ($cx:expr, $base:expr; $($field:ident),+ $(,)?) => {
        $(
            if $crate::translate::is_set(&$field) {
                $cx.unsupported($crate::translate::at($base, stringify!($field)));
            }
        )+
    };
}
pub(crate) use reject_set;

/// A proto `Duration` as a std one; negative or out-of-range values are errors.
pub(crate) fn duration(cx: &mut Ctx, path: &str, d: Option<wkt::Duration>) -> Option<Duration> {
    let d = d?;
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        cx.err(path, "must be a non-negative duration");
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// A timeout where 0 means disabled: `None` when unset gives `default`.
pub(crate) fn timeout_or(
    cx: &mut Ctx,
    path: &str,
    d: Option<wkt::Duration>,
    default: Option<Duration>,
) -> Option<Duration> {
    if d.is_none() {
        return default;
    }
    duration(cx, path, d).filter(|d| !d.is_zero())
}

pub(crate) fn u32_value(v: Option<wkt::UInt32Value>) -> Option<u32> {
    v.map(|v| v.value)
}

pub(crate) fn bool_value(v: Option<wkt::BoolValue>) -> Option<bool> {
    v.map(|v| v.value)
}

/// Decodes an `Any` after checking its type URL; errors name `path`.
pub(crate) fn unpack<M: Message + Default>(
    cx: &mut Ctx,
    path: &str,
    any: &wkt::Any,
    full_name: &str,
) -> Option<M> {
    let expected = format!("type.googleapis.com/{full_name}");
    if any.type_url != expected {
        cx.err(path, format!("expected {expected}, got '{}'", any.type_url));
        return None;
    }
    match M::decode(any.value.as_slice()) {
        Ok(m) => Some(m),
        Err(e) => {
            cx.err(path, format!("cannot decode {full_name}: {e}"));
            None
        }
    }
}

/// Where a socket address's host part may be a hostname.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostKind {
    IpOnly,
    Hostname,
}

/// The host and port of an `Address` that must be a TCP `socket_address` with a numeric port.
/// `path` is the `Address` field's path.
pub(crate) fn socket_address(
    cx: &mut Ctx,
    path: &str,
    addr: Option<core::Address>,
    kind: HostKind,
) -> Option<(String, u16)> {
    use core::address::Address as A;
    use core::socket_address::PortSpecifier;
    let Some(core::Address { address }) = addr else {
        cx.err(path, "required");
        return None;
    };
    let sa = match address {
        Some(A::SocketAddress(sa)) => sa,
        Some(A::Pipe(_)) => {
            cx.unsupported(at(path, "pipe"));
            return None;
        }
        Some(A::EnvoyInternalAddress(_)) => {
            cx.unsupported(at(path, "envoy_internal_address"));
            return None;
        }
        None => {
            cx.err(path, "required");
            return None;
        }
    };
    let path = at(path, "socket_address");
    let core::SocketAddress {
        protocol,
        address,
        resolver_name,
        ipv4_compat,
        network_namespace_filepath,
        port_specifier,
    } = sa;
    let start = cx.errors.len();
    if protocol != core::socket_address::Protocol::Tcp as i32 {
        cx.unsupported(at(&path, "protocol"));
    }
    reject_set!(cx, &path; resolver_name, ipv4_compat, network_namespace_filepath);
    let port = match port_specifier {
        Some(PortSpecifier::PortValue(p)) => match u16::try_from(p) {
            Ok(p) => Some(p),
            Err(_) => {
                cx.err(at(&path, "port_value"), format!("port {p} out of range"));
                None
            }
        },
        Some(PortSpecifier::NamedPort(_)) => {
            cx.unsupported(at(&path, "named_port"));
            None
        }
        None => Some(0),
    };
    if address.is_empty() {
        cx.err(at(&path, "address"), "required");
    } else if kind == HostKind::IpOnly && address.parse::<IpAddr>().is_err() {
        cx.err(
            at(&path, "address"),
            format!("malformed IP address: {address}"),
        );
    }
    if cx.errors.len() > start {
        return None;
    }
    Some((address, port?))
}

/// A socket address whose host must be an IP literal.
pub(crate) fn ip_socket_address(
    cx: &mut Ctx,
    path: &str,
    addr: Option<core::Address>,
) -> Option<SocketAddr> {
    let (host, port) = socket_address(cx, path, addr, HostKind::IpOnly)?;
    let ip: IpAddr = host.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

/// A `Locality` as the model's.
pub(crate) fn locality(l: Option<core::Locality>) -> crate::model::Locality {
    let core::Locality {
        region,
        zone,
        sub_zone,
    } = l.unwrap_or_default();
    crate::model::Locality {
        region,
        zone,
        sub_zone,
    }
}
