//! What a filter sees of the matched route: its name, target cluster, metadata and per-filter
//! configs at every level. Built once per route at config time and shared (`Arc`) by all of its
//! requests, so handing it to a request is one reference count.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Metadata as PbMetadata;
use envoy_types::pb::google::protobuf::{
    value::Kind, Any, ListValue, NullValue, Struct, Value as PbValue,
};

use crate::api::PerFilterConfigs;
use crate::stats::{Counter, StatsSink};

/// A `google.protobuf.Value`, as route metadata holds it.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum MetadataValue {
    #[default]
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    List(Vec<MetadataValue>),
    Struct(BTreeMap<String, MetadataValue>),
}

impl MetadataValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            MetadataValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            MetadataValue::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// The field `key` of a struct value.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        match self {
            MetadataValue::Struct(m) => m.get(key),
            _ => None,
        }
    }

    fn from_proto(v: &PbValue) -> MetadataValue {
        match &v.kind {
            None | Some(Kind::NullValue(_)) => MetadataValue::Null,
            Some(Kind::BoolValue(b)) => MetadataValue::Bool(*b),
            Some(Kind::NumberValue(n)) => MetadataValue::Number(*n),
            Some(Kind::StringValue(s)) => MetadataValue::String(s.clone()),
            Some(Kind::ListValue(l)) => {
                MetadataValue::List(l.values.iter().map(MetadataValue::from_proto).collect())
            }
            Some(Kind::StructValue(s)) => MetadataValue::Struct(struct_fields(s)),
        }
    }

    fn to_proto(&self) -> PbValue {
        let kind = match self {
            MetadataValue::Null => Kind::NullValue(NullValue::NullValue as i32),
            MetadataValue::Bool(b) => Kind::BoolValue(*b),
            MetadataValue::Number(n) => Kind::NumberValue(*n),
            MetadataValue::String(s) => Kind::StringValue(s.clone()),
            MetadataValue::List(l) => Kind::ListValue(ListValue {
                values: l.iter().map(MetadataValue::to_proto).collect(),
            }),
            MetadataValue::Struct(m) => Kind::StructValue(to_struct(m)),
        };
        PbValue { kind: Some(kind) }
    }
}

fn struct_fields(s: &Struct) -> BTreeMap<String, MetadataValue> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), MetadataValue::from_proto(v)))
        .collect()
}

fn to_struct(m: &BTreeMap<String, MetadataValue>) -> Struct {
    Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), v.to_proto())).collect(),
    }
}

/// One `typed_filter_metadata` entry, kept encoded: only the filter that owns the namespace
/// knows its type, and decodes it with `prost` at build or request time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TypedMetadata {
    pub type_url: String,
    pub value: Vec<u8>,
}

/// `envoy.config.core.v3.Metadata`: `filter_metadata` by namespace (reverse-DNS filter name,
/// e.g. `envoy.filters.http.rbac` or `com.acme.widget`), and `typed_filter_metadata`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metadata {
    pub filter_metadata: BTreeMap<String, BTreeMap<String, MetadataValue>>,
    pub typed_filter_metadata: BTreeMap<String, TypedMetadata>,
}

impl Metadata {
    pub fn from_proto(m: &PbMetadata) -> Metadata {
        let PbMetadata {
            filter_metadata,
            typed_filter_metadata,
        } = m;
        Metadata {
            filter_metadata: filter_metadata
                .iter()
                .map(|(ns, s)| (ns.clone(), struct_fields(s)))
                .collect(),
            typed_filter_metadata: typed_filter_metadata
                .iter()
                .map(|(ns, Any { type_url, value })| {
                    (
                        ns.clone(),
                        TypedMetadata {
                            type_url: type_url.clone(),
                            value: value.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Back to the proto (ext_authz sends route metadata to the authorization service).
    pub fn to_proto(&self) -> PbMetadata {
        PbMetadata {
            filter_metadata: self
                .filter_metadata
                .iter()
                .map(|(ns, m)| (ns.clone(), to_struct(m)))
                .collect(),
            typed_filter_metadata: self
                .typed_filter_metadata
                .iter()
                .map(|(ns, t)| {
                    (
                        ns.clone(),
                        Any {
                            type_url: t.type_url.clone(),
                            value: t.value.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.filter_metadata.is_empty() && self.typed_filter_metadata.is_empty()
    }

    /// The value at `path` inside namespace `namespace` of `filter_metadata` (Envoy's
    /// `MetadataKey { key, path }`): `path[0]` is a field of the namespace's struct, each
    /// further element a field of the struct value before it.
    pub fn value(&self, namespace: &str, path: &[&str]) -> Option<&MetadataValue> {
        let (first, rest) = path.split_first()?;
        let mut v = self.filter_metadata.get(namespace)?.get(*first)?;
        for key in rest {
            v = v.get(key)?;
        }
        Some(v)
    }

    /// The typed metadata of `namespace` decoded as `M`: `None` when absent or of another
    /// type, `Some(Err)` when the bytes do not decode.
    pub fn typed<M: prost::Message + prost::Name + Default>(
        &self,
        namespace: &str,
    ) -> Option<Result<M, prost::DecodeError>> {
        let t = self.typed_filter_metadata.get(namespace)?;
        if t.type_url != M::type_url() {
            return None;
        }
        Some(M::decode(t.value.as_slice()))
    }
}

/// Counters under a prefix of a [`StatsSink`], e.g. `cluster.<name>.` for the route's target
/// cluster (Envoy's `clusterInfo()->statsScope()`). Looking a counter up takes the sink's lock:
/// filters that count per request on a hot path should keep the returned `Arc`.
#[derive(Clone)]
pub struct StatsScope {
    prefix: String,
    sink: Arc<dyn StatsSink>,
}

impl fmt::Debug for StatsScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatsScope")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl StatsScope {
    /// `prefix` ends with `.` (e.g. `cluster.backend.`).
    pub fn new(prefix: impl Into<String>, sink: Arc<dyn StatsSink>) -> Self {
        StatsScope {
            prefix: prefix.into(),
            sink,
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The counter `<prefix><name>`.
    pub fn counter(&self, name: &str) -> Arc<Counter> {
        let mut full = String::with_capacity(self.prefix.len() + name.len());
        full.push_str(&self.prefix);
        full.push_str(name);
        self.sink.counter(&full)
    }
}

/// The matched route as filters see it. The config plane builds one per route.
#[derive(Debug, Default)]
pub struct RouteEntry {
    /// `routes[].name` (may be empty).
    pub name: String,
    /// The cluster the route forwards to when it names one (`route.cluster`); `None` for
    /// weighted clusters and `cluster_header` (the data path picks one per request when the
    /// route is selected and sets `FilterContext::cluster_name`), redirects and direct responses.
    pub cluster: Option<String>,
    /// The `cluster.` stats scope of a forwarding route: filters count per-cluster stats as
    /// `<FilterContext::cluster_name>.<name>` in it (Envoy's `cluster.<c>.ext_authz.*`).
    pub upstream_stats: Option<StatsScope>,
    /// The route's `metadata`.
    pub metadata: Metadata,
    /// `typed_per_filter_config` of the route configuration, virtual host and route.
    pub per_filter_configs: PerFilterConfigs,
}

impl RouteEntry {
    /// An entry with only a name and per-filter configs (tests, embedders without a config
    /// plane).
    pub fn new(name: impl Into<String>, per_filter_configs: PerFilterConfigs) -> Self {
        RouteEntry {
            name: name.into(),
            per_filter_configs,
            ..RouteEntry::default()
        }
    }
}
