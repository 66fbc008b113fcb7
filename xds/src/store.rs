//! Last-known-good store: every accepted xDS resource set, one file per type, so Strait can start
//! with the last configuration it accepted when no control plane answers. Writes are atomic
//! (temp file, fsync, rename, fsync dir); a damaged file is an error for its type, never a
//! partial set. Blocking I/O: call it from `spawn_blocking` on async paths.
//!
//! File layout: `MAGIC` (8 bytes), format version (u32 BE), payload length (u64 BE), CRC-32
//! (IEEE, u32 BE) of the payload, payload. The payload is an
//! `envoy.service.discovery.v3.DeltaDiscoveryResponse` (type URL, `system_version_info`, and each
//! resource with its name and version), so no second serialisation format exists. CRC-32, not a
//! cryptographic hash, because it guards against torn writes and bit rot, not an attacker: anyone
//! who can write this directory can also write a matching digest.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::service::discovery::v3::{self as discovery, DeltaDiscoveryResponse};
use prost::Message;

use crate::ads::Resource;

const MAGIC: &[u8; 8] = b"STRAITKG";
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;
const EXTENSION: &str = "lkg";
/// Larger than any sane resource set; bounds the allocation a damaged header could ask for.
const MAX_PAYLOAD: u64 = 1 << 30;

/// What went wrong with the store or with one type's file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// One type's saved set.
#[derive(Debug, Clone, PartialEq)]
pub struct Saved {
    pub type_url: String,
    pub version_info: String,
    pub resources: Vec<Resource>,
}

/// A directory of last-known-good resource sets.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating if needed) the store directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Store { dir })
    }

    /// Replaces the saved set of `type_url` atomically: after a crash the file holds either the
    /// old set or the new one.
    pub fn save(
        &self,
        type_url: &str,
        version_info: &str,
        resources: &[Resource],
    ) -> Result<(), StoreError> {
        let msg = DeltaDiscoveryResponse {
            system_version_info: version_info.to_string(),
            type_url: type_url.to_string(),
            resources: resources
                .iter()
                .map(|r| discovery::Resource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: Some(r.body.clone()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let payload = msg.encode_to_vec();
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        bytes.extend_from_slice(&crc32(&payload).to_be_bytes());
        bytes.extend_from_slice(&payload);

        let path = self.path_for(type_url);
        let tmp = self.dir.join(format!(
            ".{}.tmp.{}.{}",
            file_stem(type_url),
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| StoreError::Io { path: p, source }
        };
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io(&tmp)(e));
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(io(&path)(e));
        }
        // The rename is durable only once the directory entry is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }

    /// Loads one type's saved set; `Ok(None)` when none was saved.
    pub fn load(&self, type_url: &str) -> Result<Option<Saved>, StoreError> {
        let path = self.path_for(type_url);
        match read_file(&path) {
            Ok(saved) if saved.type_url != type_url => Err(StoreError::Corrupt {
                path,
                reason: format!("holds {} instead", saved.type_url),
            }),
            Ok(saved) => Ok(Some(saved)),
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Loads every saved set. The outer error is an unreadable directory; each file gives its
    /// own result, so one damaged type does not hide the others. Temp files left by a crash
    /// before the rename are ignored.
    pub fn load_all(&self) -> Result<Vec<Result<Saved, StoreError>>, StoreError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| StoreError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| StoreError::Io {
                path: self.dir.clone(),
                source,
            })?;
            let path = entry.path();
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if !hidden && path.extension().is_some_and(|e| e == EXTENSION) {
                paths.push(path);
            }
        }
        paths.sort();
        Ok(paths.iter().map(|p| read_file(p)).collect())
    }

    fn path_for(&self, type_url: &str) -> PathBuf {
        self.dir
            .join(format!("{}.{EXTENSION}", file_stem(type_url)))
    }
}

/// `type.googleapis.com/envoy.config.listener.v3.Listener` -> `envoy.config.listener.v3.Listener`,
/// with anything outside `[A-Za-z0-9._-]` replaced so a type URL cannot escape the directory.
fn file_stem(type_url: &str) -> String {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    let stem: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    stem.trim_start_matches('.').to_string()
}

fn read_file(path: &Path) -> Result<Saved, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = File::open(path).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut header = [0u8; HEADER_LEN];
    f.read_exact(&mut header).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt("truncated header".into())
        } else {
            StoreError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })?;
    if &header[..8] != MAGIC {
        return Err(corrupt("not a Strait last-known-good file".into()));
    }
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let version = be32(&header[8..12]);
    if version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "format version {version}, this Strait reads {FORMAT_VERSION}"
        )));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&header[12..20]);
    let len = u64::from_be_bytes(len_bytes);
    if len > MAX_PAYLOAD {
        return Err(corrupt(format!("payload length {len} is implausible")));
    }
    let want_crc = be32(&header[20..24]);
    let mut payload = Vec::with_capacity(len as usize);
    f.take(len + 1)
        .read_to_end(&mut payload)
        .map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if payload.len() as u64 != len {
        return Err(corrupt(format!(
            "payload is {} bytes, header says {len}",
            payload.len()
        )));
    }
    let got_crc = crc32(&payload);
    if got_crc != want_crc {
        return Err(corrupt(format!(
            "checksum mismatch (crc32 {got_crc:08x}, header {want_crc:08x})"
        )));
    }
    let msg = DeltaDiscoveryResponse::decode(payload.as_slice())
        .map_err(|e| corrupt(format!("payload does not decode: {e}")))?;
    let mut resources = Vec::with_capacity(msg.resources.len());
    for r in msg.resources {
        let body = r
            .resource
            .ok_or_else(|| corrupt(format!("resource {:?} has no body", r.name)))?;
        resources.push(Resource {
            name: r.name,
            version: r.version,
            body,
        });
    }
    Ok(Saved {
        type_url: msg.type_url,
        version_info: msg.system_version_info,
        resources,
    })
}

/// CRC-32/ISO-HDLC (the zlib/PNG one), bytewise with a table built at compile time.
pub(crate) fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ads::{CLUSTER_TYPE, LISTENER_TYPE};
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::google::protobuf::Any;

    fn cluster(name: &str) -> Resource {
        Resource {
            name: name.into(),
            version: format!("v-{name}"),
            body: Any {
                type_url: CLUSTER_TYPE.into(),
                value: Cluster {
                    name: name.into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            },
        }
    }

    fn saved(store: &Store) -> Vec<Saved> {
        store
            .load_all()
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap())
            .collect()
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.load(CLUSTER_TYPE).unwrap().is_none());
        store
            .save(CLUSTER_TYPE, "1", &[cluster("a"), cluster("b")])
            .unwrap();
        store.save(LISTENER_TYPE, "7", &[]).unwrap();
        store.save(CLUSTER_TYPE, "2", &[cluster("c")]).unwrap();
        let all = saved(&Store::open(dir.path()).unwrap());
        assert_eq!(all.len(), 2);
        let c = all.iter().find(|s| s.type_url == CLUSTER_TYPE).unwrap();
        assert_eq!(c.version_info, "2");
        assert_eq!(c.resources, vec![cluster("c")]);
        let l = all.iter().find(|s| s.type_url == LISTENER_TYPE).unwrap();
        assert_eq!((l.version_info.as_str(), l.resources.len()), ("7", 0));
        assert_eq!(store.load(CLUSTER_TYPE).unwrap().unwrap(), *c);
    }

    /// Each kind of damage is an error for that type only; the other type still loads.
    #[test]
    fn damaged_files_are_errors_for_their_type() {
        type Damage = fn(&mut Vec<u8>);
        let cases: [(&str, Damage, &str); 6] = [
            (
                "flipped payload bit",
                |b| *b.last_mut().unwrap() ^= 1,
                "checksum",
            ),
            (
                "truncated payload",
                |b| b.truncate(b.len() - 3),
                "header says",
            ),
            ("truncated header", |b| b.truncate(10), "truncated header"),
            ("empty file", |b| b.clear(), "truncated header"),
            ("wrong magic", |b| b[0] = b'X', "not a Strait"),
            ("future format", |b| b[11] = 9, "format version 9"),
        ];
        for (what, damage, expect) in cases {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            store.save(CLUSTER_TYPE, "1", &[cluster("a")]).unwrap();
            store.save(LISTENER_TYPE, "1", &[]).unwrap();
            let path = store.path_for(CLUSTER_TYPE);
            let mut bytes = fs::read(&path).unwrap();
            damage(&mut bytes);
            fs::write(&path, &bytes).unwrap();
            let all = store.load_all().unwrap();
            assert_eq!(all.len(), 2, "{what}");
            let errors: Vec<String> = all
                .iter()
                .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
                .collect();
            assert_eq!(errors.len(), 1, "{what}: {errors:?}");
            assert!(errors[0].contains(expect), "{what}: {}", errors[0]);
            assert!(errors[0].contains("Cluster.lkg"), "{what}: {}", errors[0]);
            assert!(store.load(CLUSTER_TYPE).is_err(), "{what}");
            assert!(all
                .iter()
                .any(|r| matches!(r, Ok(s) if s.type_url == LISTENER_TYPE)));
        }
    }

    #[test]
    fn checksummed_garbage_payload_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let payload = [0xffu8; 5];
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        bytes.extend_from_slice(&5u64.to_be_bytes());
        bytes.extend_from_slice(&crc32(&payload).to_be_bytes());
        bytes.extend_from_slice(&payload);
        fs::write(store.path_for(CLUSTER_TYPE), bytes).unwrap();
        let err = store.load(CLUSTER_TYPE).unwrap_err().to_string();
        assert!(err.contains("does not decode"), "{err}");
    }

    /// A crash after writing the temp file but before the rename leaves the old set in force.
    #[test]
    fn stray_temp_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(CLUSTER_TYPE, "1", &[cluster("a")]).unwrap();
        let tmp = dir
            .path()
            .join(format!(".{}.tmp.1.0", file_stem(CLUSTER_TYPE)));
        fs::write(&tmp, b"STRAITKG half a new file").unwrap();
        let all = saved(&store);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].version_info, "1");
        // The next save still works and replaces the file, not the stray.
        store.save(CLUSTER_TYPE, "2", &[]).unwrap();
        assert_eq!(store.load(CLUSTER_TYPE).unwrap().unwrap().version_info, "2");
    }

    #[test]
    fn type_urls_cannot_escape_the_directory() {
        assert_eq!(file_stem("type.googleapis.com/../../x"), "x");
        assert_eq!(file_stem("a/..\\b c"), "_b_c");
        assert_eq!(file_stem(".."), "");
    }
}
