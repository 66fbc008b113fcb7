//! Decodes Envoy's proto3 JSON/YAML into `envoy_types::pb` messages and back into canonical JSON.
//!
//! Why prost-reflect: `envoy_types` has no serde support, and Envoy configs rely on the full proto3
//! JSON mapping (both snake_case and camelCase names, `Any` resolved through `@type`, durations as
//! `"5s"`, enums by name, wrapper types as plain values). A `DescriptorPool` built from the very
//! descriptor set `envoy_types` was generated from gives exactly that mapping; the decoded dynamic
//! message is re-encoded and decoded into the typed struct, so the wire format is the only bridge
//! and the two can never disagree on a field. The same pool prints `/config_dump`.

use std::sync::OnceLock;

use prost::Message;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage};

use crate::error::ConfigError;

/// The `FileDescriptorSet` shipped by `envoy-types` 0.7.7 (see `xds/proto/README.md`).
static DESCRIPTORS: &[u8] = include_bytes!("../proto/envoy-types-0.7.7.bin");

pub(crate) const BOOTSTRAP: &str = "envoy.config.bootstrap.v3.Bootstrap";
pub(crate) const LISTENER: &str = "envoy.config.listener.v3.Listener";
pub(crate) const CLUSTER: &str = "envoy.config.cluster.v3.Cluster";
pub(crate) const ROUTE_CONFIGURATION: &str = "envoy.config.route.v3.RouteConfiguration";

/// The descriptor pool, decoded once per process.
pub(crate) fn pool() -> Result<&'static DescriptorPool, ConfigError> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(DESCRIPTORS).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| {
            ConfigError::new(
                "<descriptors>",
                format!("cannot load Envoy descriptors: {e}"),
            )
        })
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
    let desc = pool()?
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
    let Ok(pool) = pool() else {
        return serde_json::Value::Null;
    };
    let Some(desc) = pool.get_message_by_name(full_name) else {
        return serde_json::Value::Null;
    };
    match DynamicMessage::decode(desc, msg.encode_to_vec().as_slice()) {
        Ok(dm) => serde_json::to_value(&dm).unwrap_or(serde_json::Value::Null),
        Err(_) => serde_json::Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::bootstrap::v3::Bootstrap;

    fn yaml(s: &str) -> serde_json::Value {
        parse_document(s, Syntax::Yaml).unwrap()
    }

    #[test]
    fn descriptor_set_has_the_types_we_decode() {
        let pool = pool().unwrap();
        for name in [
            BOOTSTRAP,
            LISTENER,
            CLUSTER,
            ROUTE_CONFIGURATION,
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "envoy.extensions.filters.http.router.v3.Router",
            "envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        ] {
            assert!(pool.get_message_by_name(name).is_some(), "{name}");
        }
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
