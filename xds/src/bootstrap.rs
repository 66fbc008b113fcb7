//! Loading a bootstrap: read the file, merge `--config-yaml`, apply the `--service-*` overrides,
//! decode, translate, and keep canonical JSON of the sources for `/config_dump`.

use std::path::{Path, PathBuf};

use envoy_types::pb::envoy::config::bootstrap::v3 as bs;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use prost::Message;

use crate::decode::{self, Syntax};
use crate::error::{ConfigError, ConfigErrors};
use crate::model;
use crate::translate::{self, listener::HCM_TYPE};

/// Where the bootstrap comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file; `.json` is parsed as JSON, anything else as YAML (a superset of JSON).
    Path(PathBuf),
    /// An inline YAML (or JSON) document.
    Yaml(String),
}

/// Command-line settings that Envoy applies over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--service-node`: `node.id`.
    pub service_node: Option<String>,
    /// `--service-cluster`: `node.cluster`.
    pub service_cluster: Option<String>,
    /// `--service-zone`: `node.locality.zone`.
    pub service_zone: Option<String>,
    /// `--config-yaml`: merged over the file.
    pub config_yaml: Option<String>,
}

/// Loads, decodes and translates. `config_yaml` (Envoy's `--config-yaml`) is merged over the file
/// (proto MergeFrom semantics: repeated fields append, messages merge, scalars overwrite).
pub fn load(source: &Source, overrides: &Overrides) -> Result<model::Bootstrap, ConfigErrors> {
    load_full(source, overrides).map(|l| l.model)
}

/// As [`load`], keeping what the dynamic configuration ([`crate::dynamic::Dynamic`]) needs.
pub fn load_full(
    source: &Source,
    overrides: &Overrides,
) -> Result<crate::dynamic::Loaded, ConfigErrors> {
    // A pool built for the decode (only if a document needs prost-reflect) is freed when loading
    // ends.
    let _descriptors = decode::Descriptors::hold();
    let mut bytes = match source {
        Source::Path(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| {
                ConfigError::new(p.display().to_string(), format!("cannot read file: {e}"))
            })?;
            decode_text(&text, syntax_of(p))?
        }
        Source::Yaml(y) => decode_text(y, Syntax::Yaml)?,
    };
    if let Some(extra) = &overrides.config_yaml {
        let extra = decode_text(extra, Syntax::Yaml).map_err(|mut e| {
            e.0.iter_mut()
                .for_each(|e| e.path = format!("--config-yaml: {}", e.path));
            e
        })?;
        // Concatenated encodings decode as a MergeFrom of the second into the first.
        bytes.extend_from_slice(&extra);
    }
    let mut proto = bs::Bootstrap::decode(bytes.as_slice())
        .map_err(|e| ConfigError::new("<root>", format!("cannot decode bootstrap: {e}")))?;
    apply_overrides(&mut proto, overrides);
    let dump = config_dump(&proto);

    let statics = match &proto.static_resources {
        Some(sr) => crate::dynamic::Statics {
            listeners: sr.listeners.clone(),
            clusters: sr.clusters.clone(),
        },
        None => Default::default(),
    };
    let mut cx = translate::Ctx::default();
    let mut model = translate::bootstrap::translate(&mut cx, proto);
    if !cx.errors.is_empty() {
        return Err(ConfigErrors(cx.errors));
    }
    model.dump = dump;
    Ok(crate::dynamic::Loaded { model, statics })
}

fn syntax_of(p: &Path) -> Syntax {
    match p.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("json") => Syntax::Json,
        _ => Syntax::Yaml,
    }
}

fn decode_text(text: &str, syntax: Syntax) -> Result<Vec<u8>, ConfigErrors> {
    let value = decode::parse_document(text, syntax)?;
    Ok(decode::json_to_proto(&value, decode::BOOTSTRAP)?)
}

fn apply_overrides(b: &mut bs::Bootstrap, o: &Overrides) {
    if o.service_node.is_none() && o.service_cluster.is_none() && o.service_zone.is_none() {
        return;
    }
    let node = b.node.get_or_insert_with(Default::default);
    if let Some(id) = &o.service_node {
        node.id = id.clone();
    }
    if let Some(c) = &o.service_cluster {
        node.cluster = c.clone();
    }
    if let Some(z) = &o.service_zone {
        node.locality
            .get_or_insert_with(core::Locality::default)
            .zone = z.clone();
    }
}

/// A source message kept encoded for `/config_dump`.
#[derive(Debug)]
struct Encoded {
    type_name: &'static str,
    bytes: Vec<u8>,
}

impl model::Render for Encoded {
    fn render(&self) -> serde_json::Value {
        decode::bytes_to_json(&self.bytes, self.type_name)
    }
}

fn doc<M: Message>(msg: &M, type_name: &'static str) -> model::Doc {
    std::sync::Arc::new(Encoded {
        type_name,
        bytes: msg.encode_to_vec(),
    })
}

/// The bootstrap and each static resource, for `/config_dump`.
fn config_dump(b: &bs::Bootstrap) -> model::ConfigDump {
    let mut dump = model::ConfigDump {
        bootstrap: Some(doc(b, decode::BOOTSTRAP)),
        ..Default::default()
    };
    let Some(sr) = &b.static_resources else {
        return dump;
    };
    for (i, l) in sr.listeners.iter().enumerate() {
        // Same naming as translation for unnamed listeners.
        let name = if l.name.is_empty() {
            format!("listener_{i}")
        } else {
            l.name.clone()
        };
        dump.static_listeners
            .push((name.clone(), doc(l, decode::LISTENER)));
        let inline_routes = l
            .filter_chains
            .iter()
            .flat_map(|fc| fc.filters.iter())
            .filter_map(|f| match &f.config_type {
                Some(
                    envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(
                        any,
                    ),
                ) if any.type_url == format!("type.googleapis.com/{HCM_TYPE}") => {
                    hcm::HttpConnectionManager::decode(any.value.as_slice()).ok()
                }
                _ => None,
            })
            .filter_map(|h| match h.route_specifier {
                Some(hcm::http_connection_manager::RouteSpecifier::RouteConfig(rc)) => Some(rc),
                _ => None,
            });
        for rc in inline_routes {
            dump.static_route_configs
                .push((name.clone(), doc(&rc, decode::ROUTE_CONFIGURATION)));
        }
    }
    for c in &sr.clusters {
        dump.static_clusters
            .push((c.name.clone(), doc(c, decode::CLUSTER)));
    }
    dump
}
