//! Filesystem subscriptions (`path_config_source`): the file holds a DiscoveryResponse in YAML
//! or JSON and is replaced by atomic rename, as Envoy documents. Polls the file's identity
//! (inode, mtime, length) rather than using inotify: no new dependency, and it sees a
//! Kubernetes ConfigMap's symlink swap on every filesystem. Each change feeds the same
//! validation as ADS.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tokio::task::JoinHandle;

use super::{Dynamic, FileSubscription};
use crate::ads::{Resource, Update};
use crate::decode::{json_to_proto, parse_document, Syntax};
use crate::model::ResourceSource;

/// How often a watched file is checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Reads a DiscoveryResponse-shaped file: `version_info` and `resources` (each with `@type`).
pub fn read(path: &Path, type_url: &str) -> Result<(String, Vec<Resource>), String> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: {e}"))?;
    let syntax = if path.extension().is_some_and(|e| e == "json") {
        Syntax::Json
    } else {
        Syntax::Yaml
    };
    let doc = parse_document(&text, syntax).map_err(|e| format!("{file}: {e}"))?;
    let serde_json::Value::Object(mut o) = doc else {
        return Err(format!("{file}: expected a DiscoveryResponse object"));
    };
    let version = match o.remove("version_info").or_else(|| o.remove("versionInfo")) {
        None => String::new(),
        Some(serde_json::Value::String(s)) => s,
        Some(other) => other.to_string(),
    };
    let items = match o.remove("resources") {
        Some(serde_json::Value::Array(a)) => a,
        None => Vec::new(),
        Some(_) => return Err(format!("{file}: resources: expected a list")),
    };
    o.remove("type_url");
    o.remove("typeUrl");
    if let Some(k) = o.keys().next() {
        return Err(format!("{file}: {k}: unknown field"));
    }
    let _descriptors = crate::decode::Descriptors::hold();
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("{file}: resources[{i}]");
        if item.get("@type").and_then(|t| t.as_str()).is_none() {
            return Err(format!("{at}: missing \"@type\""));
        }
        let bytes = json_to_proto(item, "google.protobuf.Any").map_err(|e| format!("{at}: {e}"))?;
        let body = Any::decode(bytes.as_slice()).map_err(|e| format!("{at}: {e}"))?;
        let name = crate::ads::resource_name(type_url, &body).map_err(|e| format!("{at}: {e}"))?;
        out.push(Resource {
            name,
            version: version.clone(),
            body,
        });
    }
    Ok((version, out))
}

type Fingerprint = Option<(u64, u64, i64, i64, u64)>;

fn fingerprint(path: &Path) -> Fingerprint {
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
}

/// Loads `path` into `d` now and whenever it changes; a file that does not load is logged and
/// the previous resources stay.
async fn watch_file(d: Dynamic, type_url: String, path: PathBuf) {
    // A watched file is decoded again on every change: keep the descriptor pool for as long as
    // it is watched rather than rebuild (and free) it per change.
    let _descriptors = crate::decode::Descriptors::hold();
    let mut last: Fingerprint = None;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let fp = fingerprint(&path);
        if fp.is_none() || fp == last {
            continue;
        }
        last = fp;
        let (p, t) = (path.clone(), type_url.clone());
        let read = tokio::task::spawn_blocking(move || read(&p, &t)).await;
        let result = match read {
            // Validation and apply off the runtime's workers, as for ADS.
            Ok(Ok((version, resources))) => crate::ads::off_worker(|| {
                d.apply_source(
                    &type_url,
                    &version,
                    Update::State(resources),
                    ResourceSource::File,
                )
            }),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => tracing::info!(file = %path.display(), %type_url, "xDS file applied"),
            Err(e) => {
                tracing::error!(file = %path.display(), "xDS file rejected, keeping the previous config: {e}")
            }
        }
    }
}

/// Runs one watcher per file the configuration names, starting and stopping them as the
/// set changes. Dropping or aborting the handle stops them all.
pub fn spawn_watchers(d: Dynamic) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut rx = d.file_subscriptions();
        // Aborted when dropped, so aborting this task stops every watcher.
        let mut running: BTreeMap<FileSubscription, AbortOnDrop> = BTreeMap::new();
        loop {
            let wanted = rx.borrow_and_update().clone();
            running.retain(|k, _| wanted.contains(k));
            for sub in wanted {
                if let std::collections::btree_map::Entry::Vacant(slot) = running.entry(sub) {
                    let (t, p, _) = slot.key().clone();
                    slot.insert(AbortOnDrop(tokio::spawn(watch_file(d.clone(), t, p))));
                }
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
    })
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
