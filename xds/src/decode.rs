//! Decodes Envoy's proto3 JSON/YAML into `envoy_types::pb` messages and back into canonical JSON.
//!
//! Why prost-reflect: `envoy_types` has no serde support, and Envoy configs rely on the full proto3
//! JSON mapping (both snake_case and camelCase names, `Any` resolved through `@type`, durations as
//! `"5s"`, enums by name, wrapper types as plain values). A `DescriptorPool` built from the very
//! descriptor set `envoy_types` was generated from gives exactly that mapping; the decoded dynamic
//! message is re-encoded and decoded into the typed struct, so the wire format is the only bridge
//! and the two can never disagree on a field. The same pool prints `/config_dump`.

use std::sync::{Arc, Mutex, Weak};

use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};

use crate::error::ConfigError;

mod json;

/// The `FileDescriptorSet` shipped by `envoy-types` 0.7.7 (see `xds/proto/README.md`).
static FULL_DESCRIPTORS: &[u8] = include_bytes!("../proto/envoy-types-0.7.7.bin");
/// The part of it Strait can decode (built by `build.rs`): a few MiB of pool instead of ~45.
static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy-pruned.bin"));

pub(crate) const BOOTSTRAP: &str = "envoy.config.bootstrap.v3.Bootstrap";
pub(crate) const LISTENER: &str = "envoy.config.listener.v3.Listener";
pub(crate) const CLUSTER: &str = "envoy.config.cluster.v3.Cluster";
pub(crate) const ROUTE_CONFIGURATION: &str = "envoy.config.route.v3.RouteConfiguration";

/// The pruned descriptor pool while anyone uses it or a [`Descriptors`] lease is out. It is built
/// on demand (about a millisecond, ~4 MiB at its peak) rather than kept for the process's life:
/// decoding goes through the static tables of [`json`] and needs no pool unless a document has
/// something they leave to prost-reflect, so a sidecar builds it for `/config_dump` and for
/// errors, and its memory is better spent on connections.
pub(crate) fn pool() -> Result<Arc<DescriptorPool>, ConfigError> {
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = shared.pool.upgrade() {
        return Ok(p);
    }
    let p = Arc::new(
        DescriptorPool::decode(DESCRIPTORS).map_err(|e| descriptor_error(&e.to_string()))?,
    );
    shared.pool = Arc::downgrade(&p);
    if shared.leases > 0 {
        shared.held = Some(p.clone());
    }
    Ok(p)
}

struct Shared {
    pool: Weak<DescriptorPool>,
    /// Keeps the pool alive while leases are out.
    held: Option<Arc<DescriptorPool>>,
    leases: usize,
}

static SHARED: Mutex<Shared> = Mutex::new(Shared {
    pool: Weak::new(),
    held: None,
    leases: 0,
});

/// A batch of decodes or renders (a bootstrap, a file subscription's resources, one
/// `/config_dump`): a pool built during the batch is kept until the last lease drops, so it is
/// built at most once per batch, and not at all if nothing in the batch needs it.
#[derive(Debug)]
pub struct Descriptors(());

impl Descriptors {
    pub fn hold() -> Self {
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        shared.leases += 1;
        Descriptors(())
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        shared.leases -= 1;
        if shared.leases == 0 {
            shared.held = None;
        }
    }
}

/// The full Envoy descriptor pool, built for one call and dropped after it. Only a config that
/// names a type outside the pruned set pays for it (it is then usually rejected by translation,
/// with the same message as if the full set were always loaded).
fn full_pool() -> Result<DescriptorPool, ConfigError> {
    tracing::debug!("config names a type outside Strait's descriptor subset: loading the full set");
    DescriptorPool::decode(FULL_DESCRIPTORS).map_err(|e| descriptor_error(&e.to_string()))
}

fn descriptor_error(e: &str) -> ConfigError {
    ConfigError::new(
        "<descriptors>",
        format!("cannot load Envoy descriptors: {e}"),
    )
}

/// Document syntax: Envoy picks the parser by file extension; `--config-yaml` is always YAML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Syntax {
    Json,
    Yaml,
}

/// Parses a JSON or YAML document into a JSON value (YAML merge keys `<<` applied, as Envoy does).
pub(crate) fn parse_document(text: &str, syntax: Syntax) -> Result<serde_json::Value, ConfigError> {
    match syntax {
        Syntax::Json => serde_json::from_str(text)
            .map_err(|e| ConfigError::new("<document>", format!("invalid JSON: {e}"))),
        Syntax::Yaml => {
            let mut v: serde_yaml_ng::Value = serde_yaml_ng::from_str(text)
                .map_err(|e| ConfigError::new("<document>", format!("invalid YAML: {e}")))?;
            v.apply_merge()
                .map_err(|e| ConfigError::new("<document>", format!("invalid YAML: {e}")))?;
            // An empty document is an empty message, as in Envoy.
            if v.is_null() {
                return Ok(serde_json::Value::Object(Default::default()));
            }
            serde_json::to_value(&v)
                .map_err(|e| ConfigError::new("<document>", format!("invalid YAML: {e}")))
        }
    }
}

/// Decodes a proto3-JSON value as message `full_name`, returning its binary encoding.
/// Unknown fields, unknown enum names and unknown `@type`s are errors at their field path.
pub(crate) fn json_to_proto(
    value: &serde_json::Value,
    full_name: &str,
) -> Result<Vec<u8>, ConfigError> {
    let fast = json::encode(value, full_name);
    // Every document the unit tests decode doubles as a check of the tables against prost-reflect.
    #[cfg(test)]
    json::tests::agrees_with_reflect(value, full_name, fast.as_deref());
    match fast {
        Some(bytes) => Ok(bytes),
        None => reflect_json_to_proto(value, full_name),
    }
}

/// [`json_to_proto`] through prost-reflect: the canonical decoder, and the only one that reports
/// errors.
fn reflect_json_to_proto(
    value: &serde_json::Value,
    full_name: &str,
) -> Result<Vec<u8>, ConfigError> {
    match json_to_proto_in(&*pool()?, value, full_name) {
        Err(e) if is_unknown_type(&e.message) => json_to_proto_in(&full_pool()?, value, full_name),
        r => r,
    }
}

/// prost-reflect's error for an `Any` whose `@type` is not in the pool.
fn is_unknown_type(message: &str) -> bool {
    message.starts_with("message '") && message.contains("' not found")
}

fn json_to_proto_in(
    pool: &DescriptorPool,
    value: &serde_json::Value,
    full_name: &str,
) -> Result<Vec<u8>, ConfigError> {
    let desc = pool
        .get_message_by_name(full_name)
        .ok_or_else(|| ConfigError::new("<descriptors>", format!("no message {full_name}")))?;
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(value, &mut track);
    let opts = DeserializeOptions::new().deny_unknown_fields(true);
    match DynamicMessage::deserialize_with_options(desc, de, &opts) {
        Ok(msg) => Ok(msg.encode_to_vec()),
        Err(e) => {
            let mut path = track.path().to_string();
            let mut message = e.to_string();
            // Name the unknown field in the path, as for every other error.
            if let Some(name) = message
                .strip_prefix("unrecognized field name '")
                .and_then(|m| m.strip_suffix('\''))
            {
                path = if path == "." {
                    name.to_string()
                } else {
                    format!("{path}.{name}")
                };
                message = "unknown field".to_string();
            } else if path == "." {
                path = "<root>".to_string();
            }
            Err(ConfigError::new(path, message))
        }
    }
}

/// Decodes a typed message from a proto3-JSON value.
#[cfg(test)]
pub(crate) fn decode_json<M: Message + Default>(
    value: &serde_json::Value,
    full_name: &str,
) -> Result<M, ConfigError> {
    let bytes = json_to_proto(value, full_name)?;
    M::decode(bytes.as_slice()).map_err(|e| ConfigError::new("<root>", e.to_string()))
}

/// Canonical proto3 JSON (camelCase names, `@type` on `Any`, defaults omitted) of a message.
pub(crate) fn to_json<M: Message>(msg: &M, full_name: &str) -> serde_json::Value {
    bytes_to_json(&msg.encode_to_vec(), full_name)
}

/// [`to_json`] of an encoded message.
pub(crate) fn bytes_to_json(bytes: &[u8], full_name: &str) -> serde_json::Value {
    if let Some(v) = pool().ok().and_then(|p| to_json_in(&p, bytes, full_name)) {
        return v;
    }
    // An `Any` of a type outside the subset (an optional filter Strait skips, say).
    full_pool()
        .ok()
        .and_then(|p| to_json_in(&p, bytes, full_name))
        .unwrap_or(serde_json::Value::Null)
}

fn to_json_in(pool: &DescriptorPool, bytes: &[u8], full_name: &str) -> Option<serde_json::Value> {
    let desc = pool.get_message_by_name(full_name)?;
    let dm = DynamicMessage::decode(desc, bytes).ok()?;
    serde_json::to_value(&dm).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;

    fn yaml(s: &str) -> serde_json::Value {
        parse_document(s, Syntax::Yaml).unwrap()
    }

    #[test]
    fn pruned_descriptor_set_has_the_types_we_decode() {
        use strait_filters::builtin::*;
        use strait_filters::FilterFactory;
        let pool = pool().unwrap();
        let factories: [&dyn FilterFactory; 7] = [
            &buffer::Factory,
            &cors::Factory,
            &ext_authz::Factory,
            &fault::Factory,
            &header_mutation::Factory,
            &local_ratelimit::Factory,
            &rbac::Factory,
        ];
        let filter_types = factories
            .iter()
            .flat_map(|f| {
                std::iter::once(f.type_url()).chain(f.per_route_type_urls().iter().copied())
            })
            .map(|url| url.trim_start_matches("type.googleapis.com/"));
        // build.rs fails on a root it cannot find; this catches a filter missing from the roots.
        for name in filter_types {
            assert!(pool.get_message_by_name(name).is_some(), "{name}");
        }
        // The point of pruning: a type Strait never decodes is not resident.
        assert!(pool
            .get_message_by_name("envoy.extensions.filters.http.lua.v3.Lua")
            .is_none());
        assert!(DESCRIPTORS.len() * 10 < FULL_DESCRIPTORS.len());
    }

    #[test]
    fn types_outside_the_subset_decode_and_dump_through_the_full_set() {
        let v = yaml(
            "static_resources:\n  listeners:\n  - filter_chains:\n    - filters:\n      - name: x\n        typedConfig:\n          '@type': type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua\n          default_source_code: { inline_string: 'x' }\n",
        );
        let b = decode_json::<Bootstrap>(&v, BOOTSTRAP).unwrap();
        let j = to_json(&b, BOOTSTRAP);
        assert_eq!(
            j["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
                ["defaultSourceCode"]["inlineString"],
            "x"
        );
        // Errors inside such a type still name their path, as with the full set.
        let bad = yaml(
            "static_resources:\n  listeners:\n  - filter_chains:\n    - filters:\n      - name: x\n        typedConfig:\n          '@type': type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua\n          no_such_field: 1\n",
        );
        let e = decode_json::<Bootstrap>(&bad, BOOTSTRAP).unwrap_err();
        assert!(e.path.ends_with("typedConfig.no_such_field"), "{e}");
        assert_eq!(e.message, "unknown field");
        // A type in no descriptor set at all is still an error.
        let unknown = yaml(
            "static_resources:\n  listeners:\n  - filter_chains:\n    - filters:\n      - name: x\n        typedConfig:\n          '@type': type.googleapis.com/no.such.Type\n",
        );
        let e = decode_json::<Bootstrap>(&unknown, BOOTSTRAP).unwrap_err();
        assert!(e.message.contains("no.such.Type"), "{e}");
    }

    #[test]
    fn any_is_decoded_through_its_type_url_and_dumped_back() {
        let v = yaml(
            "static_resources:\n  listeners:\n  - filter_chains:\n    - filters:\n      - name: x\n        typedConfig:\n          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          statPrefix: p\n",
        );
        let b = decode_json::<Bootstrap>(&v, BOOTSTRAP).unwrap();
        let any = match &b.static_resources.as_ref().unwrap().listeners[0].filter_chains[0].filters
            [0]
        .config_type
        {
            Some(
                envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(a),
            ) => a.clone(),
            other => panic!("{other:?}"),
        };
        let h = envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        assert_eq!(h.stat_prefix, "p");
        let j = to_json(&b, BOOTSTRAP);
        assert_eq!(
            j["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
                ["statPrefix"],
            "p"
        );
    }
}
