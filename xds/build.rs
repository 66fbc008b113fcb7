//! Prunes Envoy's descriptor set to the messages Strait can decode, so the descriptor pool that
//! every Strait process keeps for proto3 JSON/YAML and `/config_dump` costs a few MiB instead of
//! ~45 MiB. The full set stays in the binary as a fallback (`decode.rs`), unread unless a config
//! names a type outside this subset.
//!
//! Reachability is by message: from the roots below, every field's message or enum type, plus the
//! enclosing messages of nested types. Services, extensions and unreachable messages are dropped;
//! files left empty are dropped and removed from the others' imports. Custom options (validation
//! rules, annotations) are dropped by `prost-types` decoding, which nothing in Strait reads.

use std::collections::{BTreeSet, HashMap};

use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorSet};

const FULL: &str = "proto/envoy-types-0.7.7.bin";
const ROOTS: &str = "proto/strait-types.txt";

fn main() {
    println!("cargo:rerun-if-changed={FULL}");
    println!("cargo:rerun-if-changed={ROOTS}");
    println!("cargo:rerun-if-changed=build.rs");
    let full = std::fs::read(FULL).expect("read the Envoy descriptor set");
    let set = FileDescriptorSet::decode(full.as_slice()).expect("decode the Envoy descriptor set");
    let roots = std::fs::read_to_string(ROOTS).expect("read the descriptor roots");
    let roots: Vec<&str> = roots
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let pruned = prune(set, &roots);
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("envoy-pruned.bin"), pruned.encode_to_vec())
        .expect("write the pruned descriptor set");
}

/// A message or enum: the file that declares it and the types it needs.
struct Decl {
    file: usize,
    /// Full names of what it needs: its fields' types and, when nested, its enclosing message.
    refs: Vec<String>,
}

fn prune(mut set: FileDescriptorSet, roots: &[&str]) -> FileDescriptorSet {
    let mut decls: HashMap<String, Decl> = HashMap::new();
    for (fi, file) in set.file.iter().enumerate() {
        let pkg = file.package();
        let prefix = if pkg.is_empty() {
            String::new()
        } else {
            format!("{pkg}.")
        };
        for m in &file.message_type {
            index_message(m, &prefix, fi, None, &mut decls);
        }
        for e in &file.enum_type {
            decls.insert(
                format!("{prefix}{}", e.name()),
                Decl {
                    file: fi,
                    refs: vec![],
                },
            );
        }
    }

    let mut keep: BTreeSet<String> = BTreeSet::new();
    let mut todo: Vec<String> = roots.iter().map(|r| r.to_string()).collect();
    while let Some(name) = todo.pop() {
        let Some(decl) = decls.get(&name) else {
            panic!("root or referenced type {name} is not in {FULL}");
        };
        if !keep.insert(name.clone()) {
            continue;
        }
        todo.extend(decl.refs.iter().cloned());
    }

    let kept_files: BTreeSet<usize> = keep.iter().map(|n| decls[n].file).collect();
    let names: Vec<String> = set.file.iter().map(|f| f.name().to_string()).collect();
    let mut files = Vec::new();
    for (fi, mut file) in std::mem::take(&mut set.file).into_iter().enumerate() {
        if !kept_files.contains(&fi) {
            continue;
        }
        let pkg = file.package().to_string();
        let prefix = if pkg.is_empty() {
            String::new()
        } else {
            format!("{pkg}.")
        };
        file.message_type = std::mem::take(&mut file.message_type)
            .into_iter()
            .filter_map(|m| prune_message(m, &prefix, &keep))
            .collect();
        file.enum_type
            .retain(|e| keep.contains(&format!("{prefix}{}", e.name())));
        file.service.clear();
        file.extension.clear();
        file.options = None;
        file.source_code_info = None;
        file.public_dependency.clear();
        file.weak_dependency.clear();
        file.dependency.retain(|d| {
            names
                .iter()
                .position(|n| n == d)
                .is_some_and(|i| kept_files.contains(&i))
        });
        files.push(file);
    }
    // Imports of files that only re-exported (public imports) may now be missing: add every kept
    // file that declares a type a file refers to, so each file imports what it uses.
    let owner: HashMap<&str, &str> = keep
        .iter()
        .map(|n| (n.as_str(), names[decls[n].file].as_str()))
        .collect();
    for file in &mut files {
        let mut deps: BTreeSet<String> = file.dependency.iter().cloned().collect();
        let mut refs = Vec::new();
        for m in &file.message_type {
            collect_refs(m, &mut refs);
        }
        for r in refs {
            if let Some(o) = owner.get(r.as_str()) {
                if *o != file.name() {
                    deps.insert(o.to_string());
                }
            }
        }
        file.dependency = deps.into_iter().collect();
    }
    FileDescriptorSet { file: files }
}

fn index_message(
    m: &DescriptorProto,
    prefix: &str,
    file: usize,
    parent: Option<&str>,
    decls: &mut HashMap<String, Decl>,
) {
    let name = format!("{prefix}{}", m.name());
    let mut refs: Vec<String> = m
        .field
        .iter()
        .filter(|f| !f.type_name().is_empty())
        .map(|f| f.type_name().trim_start_matches('.').to_string())
        .collect();
    // A nested type needs its enclosing message to exist.
    if let Some(p) = parent {
        refs.push(p.to_string());
    }
    let nested_prefix = format!("{name}.");
    for n in &m.nested_type {
        index_message(n, &nested_prefix, file, Some(&name), decls);
    }
    for e in &m.enum_type {
        decls.insert(
            format!("{nested_prefix}{}", e.name()),
            Decl {
                file,
                refs: vec![name.clone()],
            },
        );
    }
    decls.insert(name, Decl { file, refs });
}

/// Drops unreachable nested types; `None` when the message itself is unreachable.
fn prune_message(
    mut m: DescriptorProto,
    prefix: &str,
    keep: &BTreeSet<String>,
) -> Option<DescriptorProto> {
    let name = format!("{prefix}{}", m.name());
    if !keep.contains(&name) {
        return None;
    }
    let nested_prefix = format!("{name}.");
    m.nested_type = std::mem::take(&mut m.nested_type)
        .into_iter()
        .filter_map(|n| prune_message(n, &nested_prefix, keep))
        .collect();
    m.enum_type
        .retain(|e| keep.contains(&format!("{nested_prefix}{}", e.name())));
    m.extension.clear();
    m.options = m.options.map(|o| prost_types::MessageOptions {
        // Map entries must stay marked as such for proto3 JSON.
        map_entry: o.map_entry,
        ..Default::default()
    });
    for f in &mut m.field {
        f.options = f.options.take().map(|o| prost_types::FieldOptions {
            packed: o.packed,
            ..Default::default()
        });
    }
    Some(m)
}

fn collect_refs(m: &DescriptorProto, out: &mut Vec<String>) {
    for f in &m.field {
        if !f.type_name().is_empty() {
            out.push(f.type_name().trim_start_matches('.').to_string());
        }
    }
    for n in &m.nested_type {
        collect_refs(n, out);
    }
}
