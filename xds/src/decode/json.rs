//! proto3 JSON → protobuf encoding straight from static tables that `build.rs` generates from the
//! pruned descriptor set, so loading a bootstrap needs no descriptor pool (the pool peaks at
//! ~4 MiB, and mimalloc keeps much of it resident long after it is freed).
//!
//! It covers what Envoy configs are made of: messages, scalars, enums, repeated fields, maps,
//! oneofs, `Any`, `Duration`, the wrapper types and `Struct`/`Value`/`ListValue`. Anything else
//! (a `null`, bytes, floats, timestamps, field masks, a type outside the subset) and every error
//! returns `None`; the caller then decodes through prost-reflect, whose result or error is the
//! canonical one. Where this module answers it agrees with prost-reflect (the tests check both
//! against each other), and its output is canonical: fields in number order, repeated scalars
//! packed as proto3 packs them.

use serde_json::{Map, Value};

/// A name in [`NAMES`]: offset and length.
type Name = (u32, u16);

/// A field's type, as `FieldDescriptorProto.type` (not every kind occurs in the subset).
#[allow(dead_code)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Double,
    Float,
    Int64,
    Uint64,
    Int32,
    Fixed64,
    Fixed32,
    Bool,
    String,
    Group,
    Bytes,
    Uint32,
    Sfixed32,
    Sfixed64,
    Sint32,
    Sint64,
    /// `target` indexes [`MESSAGES`].
    Message,
    /// `target` indexes [`ENUMS`].
    Enum,
}

pub(super) struct Msg {
    name: Name,
    /// Start and count in [`FIELDS`], in field-number order.
    fields: (u32, u16),
    map_entry: bool,
}

pub(super) struct Field {
    name: Name,
    json: Name,
    number: u32,
    kind: Kind,
    target: u16,
    repeated: bool,
    packed: bool,
    /// No presence (a proto3 scalar outside any oneof): a default value is left out.
    implicit: bool,
    /// 1 + the oneof's index within its message; 0 outside a (real) oneof.
    oneof: u16,
}

pub(super) struct EnumDef {
    name: Name,
    values: (u32, u16),
}

pub(super) struct EnumValue {
    name: Name,
    number: i32,
}

include!(concat!(env!("OUT_DIR"), "/json_tables.rs"));

fn text(n: Name) -> &'static str {
    &NAMES[n.0 as usize..n.0 as usize + n.1 as usize]
}

fn message_index(full_name: &str) -> Option<usize> {
    MESSAGES
        .binary_search_by(|m| text(m.name).cmp(full_name))
        .ok()
}

fn fields_of(m: &Msg) -> &'static [Field] {
    &FIELDS[m.fields.0 as usize..][..m.fields.1 as usize]
}

/// The binary encoding of `value` as message `full_name`, or `None` where prost-reflect must
/// decide (see the module docs).
pub(super) fn encode(value: &Value, full_name: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    message(message_index(full_name)?, value, &mut out)?;
    Some(out)
}

/// The types prost-reflect gives a JSON form of their own (and nests under `"value"` in an Any).
fn is_well_known(name: &str) -> bool {
    matches!(
        name,
        "google.protobuf.Any"
            | "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.Struct"
            | "google.protobuf.FloatValue"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.Int32Value"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
            | "google.protobuf.FieldMask"
            | "google.protobuf.ListValue"
            | "google.protobuf.Value"
            | "google.protobuf.Empty"
    )
}

/// Appends the fields of message `m` (no tag or length of its own).
fn message(m: usize, v: &Value, out: &mut Vec<u8>) -> Option<()> {
    let msg = &MESSAGES[m];
    let name = text(msg.name);
    if let Some(wkt) = name.strip_prefix("google.protobuf.") {
        // A wrapper's `value` (field 1) has no presence.
        let wrapper = |kind, out: &mut Vec<u8>| {
            let start = out.len();
            let value = scalar(kind, 1, v, out)?;
            drop_default(out, start, value);
            Some(())
        };
        return match wkt {
            "Any" => any(v, out),
            "Duration" => duration(v, out),
            "DoubleValue" => wrapper(Kind::Double, out),
            "Int64Value" => wrapper(Kind::Int64, out),
            "UInt64Value" => wrapper(Kind::Uint64, out),
            "Int32Value" => wrapper(Kind::Int32, out),
            "UInt32Value" => wrapper(Kind::Uint32, out),
            "BoolValue" => wrapper(Kind::Bool, out),
            "StringValue" => wrapper(Kind::String, out),
            "Struct" => structure(v.as_object()?, out),
            "ListValue" => list(v.as_array()?, out),
            "Value" => dynamic_value(v, out),
            "Empty" => v.as_object()?.is_empty().then_some(()),
            _ if is_well_known(name) => None,
            _ => fields(msg, v.as_object()?, None, out),
        };
    }
    fields(msg, v.as_object()?, None, out)
}

/// The fields of `msg` from `obj`, in field-number order. `skip` is a key that is not a field
/// (an Any's `@type`). An unknown key, a field given under both its names, two members of one
/// oneof or a `null` all return `None`.
fn fields(
    msg: &Msg,
    obj: &Map<String, Value>,
    skip: Option<&str>,
    out: &mut Vec<u8>,
) -> Option<()> {
    let mut used = usize::from(skip.is_some_and(|k| obj.contains_key(k)));
    let mut oneofs: Vec<u16> = Vec::new();
    for f in fields_of(msg) {
        let (json, name) = (text(f.json), text(f.name));
        let v = match (obj.get(json), obj.get(name)) {
            (Some(v), None) | (None, Some(v)) => v,
            (Some(v), Some(_)) if json == name => v,
            (None, None) => continue,
            (Some(_), Some(_)) => return None,
        };
        used += 1;
        if f.oneof != 0 {
            if oneofs.contains(&f.oneof) {
                return None;
            }
            oneofs.push(f.oneof);
        }
        field(f, v, out)?;
    }
    (used == obj.len()).then_some(())
}

fn field(f: &Field, v: &Value, out: &mut Vec<u8>) -> Option<()> {
    if !f.repeated {
        return single(f, v, out);
    }
    if f.kind == Kind::Message && MESSAGES[f.target as usize].map_entry {
        return map(f, v.as_object()?, out);
    }
    let items = v.as_array()?;
    if f.packed && !items.is_empty() {
        let mut packed = Vec::new();
        for item in items {
            scalar_value(f, item, &mut packed)?;
        }
        return length_delimited(f.number, &packed, out);
    }
    for item in items {
        single(f, item, out)?;
    }
    Some(())
}

fn single(f: &Field, v: &Value, out: &mut Vec<u8>) -> Option<()> {
    let start = out.len();
    let value = match f.kind {
        Kind::Message => {
            let mut body = Vec::new();
            message(f.target as usize, v, &mut body)?;
            return length_delimited(f.number, &body, out);
        }
        Kind::Enum => {
            key(f.number, 0, out);
            let value = out.len();
            scalar_value(f, v, out)?;
            value
        }
        kind => scalar(kind, f.number, v, out)?,
    };
    if f.implicit {
        drop_default(out, start, value);
    }
    Some(())
}

/// Leaves out a field whose value (from `value` on) encodes a default: zero, false, an empty
/// string, `+0.0`, all of which encode as zero bytes only; as prost-reflect does.
fn drop_default(out: &mut Vec<u8>, start: usize, value: usize) {
    if out[value..].iter().all(|&b| b == 0) {
        out.truncate(start);
    }
}

/// A map field: one entry message (key = 1, value = 2) per JSON member.
fn map(f: &Field, obj: &Map<String, Value>, out: &mut Vec<u8>) -> Option<()> {
    let entry = fields_of(&MESSAGES[f.target as usize]);
    let (kf, vf) = (entry.first()?, entry.get(1)?);
    if kf.number != 1 || vf.number != 2 || kf.kind == Kind::Bool {
        return None;
    }
    for (k, v) in obj {
        let mut body = Vec::new();
        // Integer keys are decimal strings, parsed as prost-reflect parses them.
        scalar(kf.kind, 1, &Value::String(k.clone()), &mut body)?;
        single(vf, v, &mut body)?;
        length_delimited(f.number, &body, out)?;
    }
    Some(())
}

/// A scalar field with its tag; returns where its value starts.
fn scalar(kind: Kind, number: u32, v: &Value, out: &mut Vec<u8>) -> Option<usize> {
    let wire = match kind {
        Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => 1,
        Kind::Fixed32 | Kind::Sfixed32 => 5,
        Kind::String => {
            let text = v.as_str()?;
            key(number, 2, out);
            let value = out.len();
            varint(text.len() as u64, out);
            out.extend_from_slice(text.as_bytes());
            return Some(value);
        }
        Kind::Int64
        | Kind::Uint64
        | Kind::Int32
        | Kind::Uint32
        | Kind::Sint32
        | Kind::Sint64
        | Kind::Bool => 0,
        Kind::Float | Kind::Group | Kind::Bytes | Kind::Message | Kind::Enum => return None,
    };
    key(number, wire, out);
    let value = out.len();
    encode_scalar(kind, v, out)?;
    Some(value)
}

/// A packable value without its tag (enums and numeric scalars).
fn scalar_value(f: &Field, v: &Value, out: &mut Vec<u8>) -> Option<()> {
    if f.kind != Kind::Enum {
        return encode_scalar(f.kind, v, out);
    }
    let e = &ENUMS[f.target as usize];
    if text(e.name) == "google.protobuf.NullValue" {
        return None;
    }
    let number = match v {
        Value::String(s) => {
            ENUM_VALUES[e.values.0 as usize..][..e.values.1 as usize]
                .iter()
                .find(|ev| text(ev.name) == s)?
                .number
        }
        Value::Number(_) => integer::<i32>(v)?,
        _ => return None,
    };
    varint(i64::from(number) as u64, out);
    Some(())
}

fn encode_scalar(kind: Kind, v: &Value, out: &mut Vec<u8>) -> Option<()> {
    match kind {
        Kind::Double => {
            let Value::Number(n) = v else { return None };
            out.extend_from_slice(&n.as_f64()?.to_le_bytes());
        }
        Kind::Int64 => varint(integer::<i64>(v)? as u64, out),
        Kind::Uint64 => varint(integer::<u64>(v)?, out),
        Kind::Int32 => varint(i64::from(integer::<i32>(v)?) as u64, out),
        Kind::Uint32 => varint(u64::from(integer::<u32>(v)?), out),
        Kind::Sint32 => {
            let x = integer::<i32>(v)?;
            varint(u64::from(((x << 1) ^ (x >> 31)) as u32), out)
        }
        Kind::Sint64 => {
            let x = integer::<i64>(v)?;
            varint(((x << 1) ^ (x >> 63)) as u64, out)
        }
        Kind::Fixed64 => out.extend_from_slice(&integer::<u64>(v)?.to_le_bytes()),
        Kind::Sfixed64 => out.extend_from_slice(&integer::<i64>(v)?.to_le_bytes()),
        Kind::Fixed32 => out.extend_from_slice(&integer::<u32>(v)?.to_le_bytes()),
        Kind::Sfixed32 => out.extend_from_slice(&integer::<i32>(v)?.to_le_bytes()),
        Kind::Bool => varint(u64::from(v.as_bool()?), out),
        Kind::Float | Kind::String | Kind::Group | Kind::Bytes | Kind::Message | Kind::Enum => {
            return None
        }
    }
    Some(())
}

/// An integer as prost-reflect reads one: a JSON integer in range, or a decimal string
/// (`str::parse`). JSON floats, even integral ones, are left to prost-reflect.
fn integer<T>(v: &Value) -> Option<T>
where
    T: TryFrom<i64> + TryFrom<u64> + std::str::FromStr,
{
    match v {
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => T::try_from(i).ok(),
            (None, Some(u)) => T::try_from(u).ok(),
            (None, None) => None,
        },
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// `{"@type": URL, ...fields}`, or `{"@type": URL, "value": ...}` for a well-known type.
fn any(v: &Value, out: &mut Vec<u8>) -> Option<()> {
    let obj = v.as_object()?;
    let url = obj.get("@type")?.as_str()?;
    let (_, name) = url.rsplit_once('/')?;
    let m = message_index(name)?;
    let mut payload = Vec::new();
    if is_well_known(name) {
        if obj.len() != 2 {
            return None;
        }
        message(m, obj.get("value")?, &mut payload)?;
    } else {
        fields(&MESSAGES[m], obj, Some("@type"), &mut payload)?;
    }
    length_delimited(1, url.as_bytes(), out)?;
    if !payload.is_empty() {
        length_delimited(2, &payload, out)?;
    }
    Some(())
}

/// `"1.5s"`, parsed as prost-reflect parses it, with its range check.
fn duration(v: &Value, out: &mut Vec<u8>) -> Option<()> {
    let d: prost_types::Duration = v.as_str()?.parse().ok()?;
    if d.seconds.unsigned_abs() > 315_576_000_000 || d.nanos.unsigned_abs() > 999_999_999 {
        return None;
    }
    if d.seconds != 0 {
        key(1, 0, out);
        varint(d.seconds as u64, out);
    }
    if d.nanos != 0 {
        key(2, 0, out);
        varint(i64::from(d.nanos) as u64, out);
    }
    Some(())
}

/// `google.protobuf.Struct`: `map<string, Value> fields = 1`.
fn structure(obj: &Map<String, Value>, out: &mut Vec<u8>) -> Option<()> {
    for (k, v) in obj {
        let mut entry = Vec::new();
        length_delimited(1, k.as_bytes(), &mut entry)?;
        let mut value = Vec::new();
        dynamic_value(v, &mut value)?;
        length_delimited(2, &value, &mut entry)?;
        length_delimited(1, &entry, out)?;
    }
    Some(())
}

/// `google.protobuf.ListValue`: `repeated Value values = 1`.
fn list(items: &[Value], out: &mut Vec<u8>) -> Option<()> {
    for v in items {
        let mut value = Vec::new();
        dynamic_value(v, &mut value)?;
        length_delimited(1, &value, out)?;
    }
    Some(())
}

/// `google.protobuf.Value`: whichever member of its `kind` oneof the JSON value is.
fn dynamic_value(v: &Value, out: &mut Vec<u8>) -> Option<()> {
    match v {
        Value::Null => {
            key(1, 0, out);
            varint(0, out);
        }
        Value::Number(n) => {
            key(2, 1, out);
            out.extend_from_slice(&n.as_f64()?.to_le_bytes());
        }
        Value::String(s) => length_delimited(3, s.as_bytes(), out)?,
        Value::Bool(b) => {
            key(4, 0, out);
            varint(u64::from(*b), out);
        }
        Value::Object(o) => {
            let mut body = Vec::new();
            structure(o, &mut body)?;
            length_delimited(5, &body, out)?;
        }
        Value::Array(a) => {
            let mut body = Vec::new();
            list(a, &mut body)?;
            length_delimited(6, &body, out)?;
        }
    }
    Some(())
}

fn varint(mut x: u64, out: &mut Vec<u8>) {
    while x >= 0x80 {
        out.push(x as u8 | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

fn key(number: u32, wire: u8, out: &mut Vec<u8>) {
    varint(u64::from(number) << 3 | u64::from(wire), out);
}

fn length_delimited(number: u32, body: &[u8], out: &mut Vec<u8>) -> Option<()> {
    key(number, 2, out);
    varint(body.len() as u64, out);
    out.extend_from_slice(body);
    Some(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::decode::{
        bytes_to_json, json_to_proto, parse_document, reflect_json_to_proto, Syntax, BOOTSTRAP,
    };

    /// Where the tables answer, prost-reflect must accept the document too and read the same
    /// message from both encodings.
    pub(crate) fn agrees_with_reflect(value: &Value, full_name: &str, fast: Option<&[u8]>) {
        let Some(fast) = fast else { return };
        let slow = reflect_json_to_proto(value, full_name).unwrap_or_else(|e| {
            panic!("tables accepted what prost-reflect rejects ({e}): {value}")
        });
        assert_eq!(
            bytes_to_json(fast, full_name),
            bytes_to_json(&slow, full_name),
            "{value}"
        );
    }

    fn yaml(s: &str) -> Value {
        parse_document(s, Syntax::Yaml).unwrap()
    }

    fn repo_file(path: &str) -> Value {
        let p = std::path::PathBuf::from(
            // Run-time first: a test binary reused from another checkout (shared target
            // directory) carries that checkout's compile-time path.
            std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("..")
        .join(path);
        yaml(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
    }

    /// The same bytes as prost-reflect (field order, packing) when no map is involved, whose
    /// order prost-reflect leaves to a hash map.
    fn same_bytes(v: &Value) {
        let fast = encode(v, BOOTSTRAP).expect("the tables decode it");
        assert_eq!(fast, reflect_json_to_proto(v, BOOTSTRAP).unwrap(), "{v}");
    }

    #[test]
    fn shipped_configs_decode_without_the_pool() {
        for path in [
            "benches/peers/strait-envoy.yaml",
            "examples/configs/front-proxy.yaml",
            "examples/configs/grpc-h2.yaml",
        ] {
            let v = repo_file(path);
            let fast = encode(&v, BOOTSTRAP).unwrap_or_else(|| panic!("{path} needs the pool"));
            agrees_with_reflect(&v, BOOTSTRAP, Some(&fast));
        }
        same_bytes(&repo_file("benches/peers/strait-envoy.yaml"));
    }

    #[test]
    fn proto3_json_mapping_matches_prost_reflect() {
        let v = yaml(
            r#"
node: {id: n, cluster: c, locality: {zone: z}, metadata: {a: 1, b: [true, null, "s", {c: 2.5}], d: {}}}
admin: {address: {socket_address: {address: 127.0.0.1, portValue: "9901"}}}
stats_flush_interval: 1.5s
static_resources:
  clusters:
  - name: c0
    connectTimeout: 0.250s
    type: STRICT_DNS
    lb_policy: 3
    per_connection_buffer_limit_bytes: 32768
    common_http_protocol_options: {idle_timeout: -1.000000001s, max_headers_count: 100}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {max_concurrent_streams: 7}}
    metadata:
      filter_metadata:
        envoy.lb: {canary: true, weight: 3}
    load_assignment:
      cluster_name: c0
      endpoints:
      - locality: {region: r}
        priority: 1
        load_balancing_weight: 5
        lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8080}}}
          health_status: DEGRADED
  listeners:
  - name: l0
    address: {socket_address: {address: 0.0.0.0, port_value: 10000}}
    filter_chains:
    - filters:
      - name: hcm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          codec_type: AUTO
          stream_idle_timeout: 0s
          route_config:
            name: local
            virtual_hosts:
            - name: vh
              domains: ["*"]
              typed_per_filter_config:
                envoy.filters.http.buffer:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute
                  disabled: true
              routes:
              - match: {prefix: /, headers: [{name: x, string_match: {exact: y}}]}
                route:
                  cluster: c0
                  timeout: 3s
                  retry_policy:
                    retry_on: 5xx
                    num_retries: 2
                    retriable_status_codes: [503, 504]
                    per_try_timeout: 1s
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
"#,
        );
        let fast = encode(&v, BOOTSTRAP).expect("the tables decode it");
        agrees_with_reflect(&v, BOOTSTRAP, Some(&fast));
        // A well-known type inside an Any sits under "value".
        let any = yaml("{'@type': type.googleapis.com/google.protobuf.Duration, value: 2s}");
        let fast = encode(&any, "google.protobuf.Any").expect("the tables decode it");
        agrees_with_reflect(&any, "google.protobuf.Any", Some(&fast));
        // Both field names, enum numbers, packed repeated scalars: byte for byte.
        same_bytes(&yaml(
            "static_resources: {clusters: [{name: a, lbPolicy: 1, dns_lookup_family: V4_ONLY}]}",
        ));
    }

    #[test]
    fn what_the_tables_leave_to_prost_reflect() {
        for (doc, error) in [
            // Decided by prost-reflect: a null is an absent field.
            ("admin: null", None),
            ("node: {id: n}\nadmin: ~", None),
            // Bytes, floats, integral floats for integers: prost-reflect's reading.
            (
                "static_resources: {clusters: [{name: a, per_connection_buffer_limit_bytes: 1.0}]}",
                None,
            ),
            // Errors are prost-reflect's, with their paths.
            ("no_such_field: 1", Some("no_such_field: unknown field")),
            (
                "admin: {address: {socket_address: {protocol: SCTP}}}",
                Some("SCTP"),
            ),
            (
                "static_resources: {clusters: [{name: a, port: 1}]}",
                Some("static_resources.clusters[0].port: unknown field"),
            ),
            ("stats_flush_interval: 5", Some("stats_flush_interval")),
            ("stats_flush_interval: 1m", Some("stats_flush_interval")),
            // Two members of one oneof.
            (
                "static_resources: {clusters: [{name: a, type: STATIC, cluster_type: {name: x}}]}",
                Some("oneof"),
            ),
            // One field under both of its names.
            (
                "static_resources: {clusters: [{name: a, lbPolicy: 1, lb_policy: 2}]}",
                None,
            ),
        ] {
            let v = yaml(doc);
            assert!(encode(&v, BOOTSTRAP).is_none(), "{doc}");
            let got = json_to_proto(&v, BOOTSTRAP);
            let want = reflect_json_to_proto(&v, BOOTSTRAP);
            match (got, want, error) {
                (Ok(g), Ok(w), None) => assert_eq!(g, w, "{doc}"),
                (Err(g), Err(w), Some(e)) => {
                    assert_eq!(g.to_string(), w.to_string());
                    assert!(g.to_string().contains(e), "{doc}: {g}");
                }
                (g, w, e) => panic!("{doc}: {g:?} / {w:?}, expected error {e:?}"),
            }
        }
    }
}
