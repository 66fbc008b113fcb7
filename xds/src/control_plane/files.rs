//! Reads a directory of resource files in Envoy's filesystem-xDS shapes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;

use super::Resources;
use crate::ads::{resource_name, TYPE_ORDER};
use crate::decode::{json_to_proto, parse_document, Syntax};

/// Loads every `*.yaml`, `*.yml` and `*.json` file of `dir` (not recursive; names starting with
/// `.` skipped, so editors' temp files are not read half-written). A file holds a
/// DiscoveryResponse-shaped object (`{version_info, resources: [...]}`), a list of resources, or
/// one resource; each resource carries its `@type`. Any error fails the whole load, naming the
/// file and resource, so a half-edited directory is never served.
pub fn load_dir(dir: &Path) -> Result<Resources, String> {
    load_with_fingerprint(dir).map(|(r, _)| r)
}

pub(super) type Fingerprint = Vec<(PathBuf, Option<SystemTime>, u64)>;

/// The files `load_dir` reads, with their modification time and length.
pub(super) fn fingerprint(dir: &Path) -> Fingerprint {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Fingerprint = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| is_resource_file(p))
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map(|m| m.len()).unwrap_or(0);
            (p, mtime, len)
        })
        .collect();
    out.sort();
    out
}

fn is_resource_file(p: &Path) -> bool {
    let hidden = p
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'));
    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
    !hidden && matches!(ext, "yaml" | "yml" | "json") && p.is_file()
}

pub(super) fn load_with_fingerprint(dir: &Path) -> Result<(Resources, Fingerprint), String> {
    // Taken before reading, so a write racing the load is seen by the next poll.
    let fp = fingerprint(dir);
    std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _descriptors = crate::decode::Descriptors::hold();
    let mut out: Resources = BTreeMap::new();
    let mut origin: BTreeMap<(String, String), String> = BTreeMap::new();
    for (path, _, _) in &fp {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: {e}"))?;
        let syntax = if path.extension().is_some_and(|e| e == "json") {
            Syntax::Json
        } else {
            Syntax::Yaml
        };
        let doc = parse_document(&text, syntax).map_err(|e| format!("{file}: {e}"))?;
        let (items, base) = match doc {
            serde_json::Value::Object(mut o) if o.contains_key("resources") => {
                match o.remove("resources") {
                    Some(serde_json::Value::Array(a)) => (a, "resources"),
                    _ => return Err(format!("{file}: resources: expected a list")),
                }
            }
            serde_json::Value::Array(a) => (a, ""),
            other => (vec![other], ""),
        };
        for (i, item) in items.iter().enumerate() {
            let at = if base.is_empty() {
                format!("{file}[{i}]")
            } else {
                format!("{file}: {base}[{i}]")
            };
            let any = to_any(item).map_err(|e| format!("{at}: {e}"))?;
            if !TYPE_ORDER.contains(&any.type_url.as_str()) {
                return Err(format!("{at}: unsupported @type {}", any.type_url));
            }
            let name = resource_name(&any.type_url, &any).map_err(|e| format!("{at}: {e}"))?;
            let key = (any.type_url.clone(), name.clone());
            if let Some(first) = origin.insert(key, at.clone()) {
                return Err(format!("{at}: duplicate {name:?}, also at {first}"));
            }
            out.entry(any.type_url.clone())
                .or_default()
                .insert(name, any);
        }
    }
    Ok((out, fp))
}

/// A proto3-JSON resource with `@type` to an `Any`, strictly (unknown fields are errors).
fn to_any(value: &serde_json::Value) -> Result<Any, String> {
    if value.get("@type").and_then(|t| t.as_str()).is_none() {
        return Err("missing \"@type\"".into());
    }
    let bytes = json_to_proto(value, "google.protobuf.Any").map_err(|e| e.to_string())?;
    Any::decode(bytes.as_slice()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ads::{CLUSTER_TYPE, LISTENER_TYPE};

    #[test]
    fn reads_all_shapes_and_names_errors() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cds.yaml"),
            "version_info: '1'\nresources:\n- '@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: a\n  connect_timeout: 1s\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("more.json"),
            r#"[{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "b"}]"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("l.yml"),
            "'@type': type.googleapis.com/envoy.config.listener.v3.Listener\nname: l\n",
        )
        .unwrap();
        std::fs::write(dir.path().join(".swap.yaml"), "garbage: [").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let r = load_dir(dir.path()).unwrap();
        let names: Vec<_> = r[CLUSTER_TYPE].keys().cloned().collect();
        assert_eq!(names, ["a", "b"]);
        assert!(r[LISTENER_TYPE].contains_key("l"));

        std::fs::write(
            dir.path().join("dup.yaml"),
            "'@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\nname: a\n",
        )
        .unwrap();
        let e = load_dir(dir.path()).unwrap_err();
        assert!(e.contains("duplicate \"a\""), "{e}");
        std::fs::remove_file(dir.path().join("dup.yaml")).unwrap();

        std::fs::write(
            dir.path().join("bad.yaml"),
            "'@type': type.googleapis.com/envoy.config.cluster.v3.Cluster\nname: c\nbogus: 1\n",
        )
        .unwrap();
        let e = load_dir(dir.path()).unwrap_err();
        assert!(e.contains("bad.yaml") && e.contains("bogus"), "{e}");
        std::fs::write(dir.path().join("bad.yaml"), "name: c\n").unwrap();
        let e = load_dir(dir.path()).unwrap_err();
        assert!(e.contains("@type"), "{e}");
    }
}
