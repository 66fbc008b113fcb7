//! Prunes Envoy's descriptor set to the messages Strait can decode, so the descriptor pool that
//! every Strait process keeps for proto3 JSON/YAML and `/config_dump` costs a few MiB instead of
//! ~45 MiB. The full set stays in the binary as a fallback (`decode.rs`), unread unless a config
//! names a type outside this subset.
//!
//! Reachability is by message: from the roots below, every field's message or enum type, plus the
//! enclosing messages of nested types. Services, extensions and unreachable messages are dropped;
//! files left empty are dropped and removed from the others' imports. Custom options (validation
//! rules, annotations) are dropped by `prost-types` decoding, which nothing in Strait reads.
//!
//! It also writes the same subset as plain static tables (`json_tables.rs`, for
//! `xds/src/decode/json.rs`): names in one string blob, fields and enum values in flat arrays,
//! no pointers, so the tables sit in read-only data without relocations and cost nothing until
//! read.

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
    std::fs::write(out.join("json_tables.rs"), json_tables(&pruned))
        .expect("write the JSON decoding tables");
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

/// One message or enum of the pruned set, flattened for `json_tables`.
struct FlatMsg {
    name: String,
    map_entry: bool,
    /// proto3 packs repeated scalars unless told not to; proto2 only when told to.
    proto3: bool,
    fields: Vec<prost_types::FieldDescriptorProto>,
}

/// An enum's full name and its values.
type FlatEnum = (String, Vec<(String, i32)>);

fn flatten(set: &FileDescriptorSet) -> (Vec<FlatMsg>, Vec<FlatEnum>) {
    fn walk(
        m: &DescriptorProto,
        prefix: &str,
        proto3: bool,
        msgs: &mut Vec<FlatMsg>,
        enums: &mut Vec<FlatEnum>,
    ) {
        let name = format!("{prefix}{}", m.name());
        for e in &m.enum_type {
            enums.push(enum_values(&format!("{name}."), e));
        }
        for n in &m.nested_type {
            walk(n, &format!("{name}."), proto3, msgs, enums);
        }
        let mut fields = m.field.clone();
        fields.sort_by_key(|f| f.number());
        msgs.push(FlatMsg {
            name,
            map_entry: m.options.as_ref().is_some_and(|o| o.map_entry()),
            proto3,
            fields,
        });
    }
    fn enum_values(prefix: &str, e: &prost_types::EnumDescriptorProto) -> FlatEnum {
        (
            format!("{prefix}{}", e.name()),
            e.value
                .iter()
                .map(|v| (v.name().to_string(), v.number()))
                .collect(),
        )
    }
    let (mut msgs, mut enums) = (Vec::new(), Vec::new());
    for file in &set.file {
        let prefix = if file.package().is_empty() {
            String::new()
        } else {
            format!("{}.", file.package())
        };
        for e in &file.enum_type {
            enums.push(enum_values(&prefix, e));
        }
        let proto3 = file.syntax() == "proto3";
        for m in &file.message_type {
            walk(m, &prefix, proto3, &mut msgs, &mut enums);
        }
    }
    msgs.sort_by(|a, b| a.name.cmp(&b.name));
    enums.sort_by(|a, b| a.0.cmp(&b.0));
    (msgs, enums)
}

/// protoc's default `json_name`: underscores dropped, the letter after each one upper-cased.
fn default_json_name(name: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Rust source for the static tables `xds/src/decode/json.rs` walks (see its `Table` types).
fn json_tables(set: &FileDescriptorSet) -> String {
    use std::fmt::Write;
    let (msgs, enums) = flatten(set);
    let msg_index: HashMap<&str, usize> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.as_str(), i))
        .collect();
    let enum_index: HashMap<&str, usize> = enums
        .iter()
        .enumerate()
        .map(|(i, e)| (e.0.as_str(), i))
        .collect();
    let mut blob = String::new();
    let mut interned: HashMap<String, (usize, usize)> = HashMap::new();
    let mut intern = |s: &str| -> (usize, usize) {
        *interned.entry(s.to_string()).or_insert_with(|| {
            let at = blob.len();
            blob.push_str(s);
            (at, s.len())
        })
    };
    let mut out = String::from("// Generated by xds/build.rs from the pruned descriptor set.\n");
    let mut fields = String::new();
    let mut nfields = 0usize;
    let mut messages = String::new();
    for m in &msgs {
        let (no, nl) = intern(&m.name);
        let start = nfields;
        for f in &m.fields {
            let (fo, fl) = intern(f.name());
            let json = if f.json_name().is_empty() {
                default_json_name(f.name())
            } else {
                f.json_name().to_string()
            };
            let (jo, jl) = intern(&json);
            let type_name = f.type_name().trim_start_matches('.');
            let (kind, target) = match f.r#type() {
                prost_types::field_descriptor_proto::Type::Message => (
                    "Message",
                    *msg_index
                        .get(type_name)
                        .unwrap_or_else(|| panic!("{type_name} not in the pruned set")),
                ),
                prost_types::field_descriptor_proto::Type::Enum => (
                    "Enum",
                    *enum_index
                        .get(type_name)
                        .unwrap_or_else(|| panic!("{type_name} not in the pruned set")),
                ),
                t => (scalar_kind(t), 0),
            };
            let repeated = f.label() == prost_types::field_descriptor_proto::Label::Repeated;
            let packable = !matches!(kind, "Message" | "String" | "Bytes" | "Group");
            let packed = repeated
                && packable
                && f.options
                    .as_ref()
                    .and_then(|o| o.packed)
                    .unwrap_or(m.proto3);
            // proto3 scalars outside any oneof (synthetic ones included) have no presence: their
            // default value is not encoded.
            let implicit = m.proto3 && !repeated && kind != "Message" && f.oneof_index.is_none();
            // proto3 `optional` fields sit in a synthetic oneof of their own: no conflicts.
            let oneof = match f.oneof_index {
                Some(i) if !f.proto3_optional() => i + 1,
                _ => 0,
            };
            writeln!(
                fields,
                "    Field {{ name: ({fo}, {fl}), json: ({jo}, {jl}), number: {}, kind: Kind::{kind}, target: {target}, repeated: {repeated}, packed: {packed}, implicit: {implicit}, oneof: {oneof} }},",
                f.number()
            )
            .unwrap();
            nfields += 1;
        }
        writeln!(
            messages,
            "    Msg {{ name: ({no}, {nl}), fields: ({start}, {}), map_entry: {} }},",
            nfields - start,
            m.map_entry
        )
        .unwrap();
    }
    let mut values = String::new();
    let mut nvalues = 0usize;
    let mut enum_rows = String::new();
    for (name, vals) in &enums {
        let (no, nl) = intern(name);
        let start = nvalues;
        for (v, n) in vals {
            let (vo, vl) = intern(v);
            writeln!(
                values,
                "    EnumValue {{ name: ({vo}, {vl}), number: {n} }},"
            )
            .unwrap();
            nvalues += 1;
        }
        writeln!(
            enum_rows,
            "    EnumDef {{ name: ({no}, {nl}), values: ({start}, {}) }},",
            nvalues - start
        )
        .unwrap();
    }
    writeln!(out, "pub(super) static NAMES: &str = {blob:?};").unwrap();
    writeln!(
        out,
        "pub(super) static MESSAGES: [Msg; {}] = [\n{messages}];",
        msgs.len()
    )
    .unwrap();
    writeln!(
        out,
        "pub(super) static FIELDS: [Field; {nfields}] = [\n{fields}];"
    )
    .unwrap();
    writeln!(
        out,
        "pub(super) static ENUMS: [EnumDef; {}] = [\n{enum_rows}];",
        enums.len()
    )
    .unwrap();
    writeln!(
        out,
        "pub(super) static ENUM_VALUES: [EnumValue; {nvalues}] = [\n{values}];"
    )
    .unwrap();
    out
}

fn scalar_kind(t: prost_types::field_descriptor_proto::Type) -> &'static str {
    use prost_types::field_descriptor_proto::Type;
    match t {
        Type::Double => "Double",
        Type::Float => "Float",
        Type::Int64 => "Int64",
        Type::Uint64 => "Uint64",
        Type::Int32 => "Int32",
        Type::Fixed64 => "Fixed64",
        Type::Fixed32 => "Fixed32",
        Type::Bool => "Bool",
        Type::String => "String",
        Type::Group => "Group",
        Type::Bytes => "Bytes",
        Type::Uint32 => "Uint32",
        Type::Sfixed32 => "Sfixed32",
        Type::Sfixed64 => "Sfixed64",
        Type::Sint32 => "Sint32",
        Type::Sint64 => "Sint64",
        Type::Message | Type::Enum => unreachable!("handled by the caller"),
    }
}
