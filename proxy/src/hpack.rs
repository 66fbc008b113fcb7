//! HPACK (RFC 7541) for the HTTP/2 server: decodes request header blocks, encodes responses.
//! Encoding never indexes (as HAProxy and nginx): a stateless copy; only decoding keeps a table.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName};
use http::StatusCode;

use crate::hpack_huffman;

/// A header block that cannot be decoded: a COMPRESSION_ERROR for the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("HPACK decoding error: {0}")]
pub struct DecodeError(&'static str);

impl DecodeError {
    /// What was wrong, e.g. "index out of range".
    pub fn reason(&self) -> &'static str {
        self.0
    }
}

const TRUNCATED: DecodeError = DecodeError("truncated header block");
const STRING_TOO_LONG: DecodeError = DecodeError("string longer than the header block");
const INTEGER_TOO_LONG: DecodeError = DecodeError("integer too long");
const INTEGER_OVERFLOW: DecodeError = DecodeError("integer overflow");
const INDEX_ZERO: DecodeError = DecodeError("index 0");
const INDEX_OUT_OF_RANGE: DecodeError = DecodeError("index out of range");
const SIZE_UPDATE_TOO_LARGE: DecodeError = DecodeError("table size update above the limit");
const SIZE_UPDATE_AFTER_FIELD: DecodeError = DecodeError("table size update after a field");
pub(crate) const INVALID_HUFFMAN: DecodeError = DecodeError("invalid Huffman code");

/// One decoded field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: FieldName,
    pub value: Bytes,
}

/// A field's name, sorted for the caller: pseudo-headers by name, regular names parsed once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldName {
    Authority,
    Method,
    Path,
    Scheme,
    Status,
    Protocol,
    /// Any other name starting with ':' (the request is malformed).
    UnknownPseudo,
    /// A valid lowercase field name; names from the static table are `http::header` constants.
    Header(HeaderName),
    /// Not a valid HTTP/2 field name: empty, an uppercase letter (RFC 9113 §8.2.1), or a byte
    /// that is not a token character.
    Invalid,
}

impl FieldName {
    fn from_literal(raw: &[u8]) -> FieldName {
        if let [b':', pseudo @ ..] = raw {
            return match pseudo {
                b"authority" => FieldName::Authority,
                b"method" => FieldName::Method,
                b"path" => FieldName::Path,
                b"scheme" => FieldName::Scheme,
                b"status" => FieldName::Status,
                b"protocol" => FieldName::Protocol,
                _ => FieldName::UnknownPseudo,
            };
        }
        // `from_lowercase` rejects uppercase letters where `from_bytes` would lowercase them,
        // which would hide a malformed name; it also rejects the empty name.
        match HeaderName::from_lowercase(raw) {
            Ok(name) => FieldName::Header(name),
            Err(_) => FieldName::Invalid,
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    name: FieldName,
    /// The name's length on the wire (decoded), which `FieldName` does not keep for
    /// `Invalid`/`UnknownPseudo` but entry sizes (§4.1) need.
    name_len: usize,
    value: Bytes,
}

impl Entry {
    /// RFC 7541 §4.1; also the RFC 9113 §6.5.2 header list size of the field.
    fn size(&self) -> usize {
        // Each length is bounded by a header block's (or its Huffman decoding, at most 8/5 of
        // it), so the sum cannot overflow.
        self.name_len + self.value.len() + 32
    }
}

/// Request header block decoder: the dynamic table of one connection.
#[derive(Debug)]
pub struct Decoder {
    /// Newest entry first, so dynamic index 62 is `table[0]`.
    table: VecDeque<Entry>,
    /// Sum of the entries' sizes.
    size: usize,
    /// The table's current maximum size, as last set by a size update.
    max_size: usize,
    /// Our SETTINGS_HEADER_TABLE_SIZE: the limit for size updates.
    max_allowed: usize,
}

impl Decoder {
    /// `max_table_size` is our SETTINGS_HEADER_TABLE_SIZE (4096 by default).
    pub fn new(max_table_size: usize) -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: max_table_size,
            max_allowed: max_table_size,
        }
    }

    /// Decodes one complete header block (HEADERS and CONTINUATION fragments joined, padding and
    /// priority removed) and calls `f` for each field in order. Returns the header list size as
    /// RFC 9113 §6.5.2 defines it for SETTINGS_MAX_HEADER_LIST_SIZE: the sum over all fields,
    /// pseudo-headers included, of decoded name length + value length + 32.
    ///
    /// Literal values are zero-copy slices of `block`; Huffman-coded values share one buffer
    /// allocated on the first of them. Every field is decoded and indexed whatever it contains
    /// (invalid names included), because the table must stay in step with the peer's encoder
    /// even when the caller rejects the request. An `Err` is a connection error
    /// (COMPRESSION_ERROR): `f` has been called for the fields before the error, and the table
    /// is no longer usable.
    pub fn decode(&mut self, block: Bytes, mut f: impl FnMut(Field)) -> Result<usize, DecodeError> {
        let src: &[u8] = &block;
        let mut pos = 0;
        let mut list_size = 0usize;
        let mut scratch = BytesMut::new();

        // §4.2: size updates may only start a block (possibly two of them, §6.3).
        while let Some(&first) = src.get(pos) {
            if first & 0xe0 != 0x20 {
                break;
            }
            let size = decode_int(src, &mut pos, 5)?;
            if size > self.max_allowed {
                return Err(SIZE_UPDATE_TOO_LARGE);
            }
            self.max_size = size;
            self.evict_to(size);
        }

        while let Some(&first) = src.get(pos) {
            let field = if first & 0x80 != 0 {
                // §6.1 Indexed Header Field.
                let entry = self.entry(decode_int(src, &mut pos, 7)?)?;
                list_size = list_size.saturating_add(entry.size());
                Field {
                    name: entry.name.clone(),
                    value: entry.value.clone(),
                }
            } else if first & 0x40 != 0 {
                // §6.2.1 Literal Header Field with Incremental Indexing.
                let entry = self.literal(&block, &mut pos, 6, &mut scratch)?;
                list_size = list_size.saturating_add(entry.size());
                let field = Field {
                    name: entry.name.clone(),
                    value: entry.value.clone(),
                };
                self.insert(entry);
                field
            } else if first & 0x20 == 0 {
                // §6.2.2/§6.2.3 Literal Header Field without Indexing / Never Indexed. `Field`
                // drops the "never" flag: requests are re-encoded upstream by other encoders.
                let entry = self.literal(&block, &mut pos, 4, &mut scratch)?;
                list_size = list_size.saturating_add(entry.size());
                Field {
                    name: entry.name,
                    value: entry.value,
                }
            } else {
                return Err(SIZE_UPDATE_AFTER_FIELD);
            };
            f(field);
        }
        Ok(list_size)
    }

    /// A field by index: 1-61 static, 62 onwards dynamic (§2.3.3).
    #[inline]
    fn entry(&self, index: usize) -> Result<&Entry, DecodeError> {
        match index {
            0 => Err(INDEX_ZERO),
            1..=61 => STATIC_TABLE.get(index - 1).ok_or(INDEX_OUT_OF_RANGE),
            _ => self.table.get(index - 62).ok_or(INDEX_OUT_OF_RANGE),
        }
    }

    /// A literal field (§6.2) after its first byte's pattern: the name index with a `prefix`-bit
    /// integer (0 for a literal name), then the value.
    fn literal(
        &self,
        block: &Bytes,
        pos: &mut usize,
        prefix: u32,
        scratch: &mut BytesMut,
    ) -> Result<Entry, DecodeError> {
        let index = decode_int(block, pos, prefix)?;
        let (name, name_len) = if index == 0 {
            literal_name(block, pos, scratch)?
        } else {
            let entry = self.entry(index)?;
            (entry.name.clone(), entry.name_len)
        };
        let value = literal_value(block, pos, scratch)?;
        Ok(Entry {
            name,
            name_len,
            value,
        })
    }

    /// §4.4: an entry larger than the table empties it and is not added.
    fn insert(&mut self, entry: Entry) {
        let size = entry.size();
        if size > self.max_size {
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max_size - size);
        self.size += size;
        self.table.push_front(entry);
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            match self.table.pop_back() {
                Some(entry) => self.size -= entry.size(),
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }
}

/// §5.1 integer with a `prefix_bits`-bit prefix starting at `src[*pos]`; advances `pos`.
#[inline(always)]
fn decode_int(src: &[u8], pos: &mut usize, prefix_bits: u32) -> Result<usize, DecodeError> {
    let mask = (1u8 << prefix_bits) - 1;
    let first = *src.get(*pos).ok_or(TRUNCATED)? & mask;
    *pos += 1;
    if first < mask {
        return Ok(usize::from(first));
    }
    decode_int_continuation(src, pos, u64::from(mask))
}

// Out of line: most integers (indices below the prefix, short strings) fit in the first byte.
fn decode_int_continuation(
    src: &[u8],
    pos: &mut usize,
    mut value: u64,
) -> Result<usize, DecodeError> {
    // Up to 5 continuation bytes (35 bits) are accepted, which covers any size that could fit
    // in a header block; more is a peer trying to make us loop or overflow.
    let mut shift = 0;
    loop {
        let byte = *src.get(*pos).ok_or(TRUNCATED)?;
        *pos += 1;
        value += u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return usize::try_from(value).map_err(|_| INTEGER_OVERFLOW);
        }
        shift += 7;
        if shift > 28 {
            return Err(INTEGER_TOO_LONG);
        }
    }
}

/// A §5.2 string literal's header: whether it is Huffman-coded, and where its bytes are in
/// `src`; advances `pos` past it.
#[inline(always)]
fn string_bounds(src: &[u8], pos: &mut usize) -> Result<(bool, usize, usize), DecodeError> {
    let huffman = *src.get(*pos).ok_or(TRUNCATED)? & 0x80 != 0;
    let len = decode_int(src, pos, 7)?;
    let start = *pos;
    // `start <= src.len()`: decode_int only steps over bytes it read.
    if len > src.len() - start {
        return Err(STRING_TOO_LONG);
    }
    *pos = start + len;
    Ok((huffman, start, start + len))
}

/// Huffman-decodes `block[start..end]`, appending to `scratch`.
fn huffman_decode(
    block: &[u8],
    start: usize,
    end: usize,
    scratch: &mut BytesMut,
) -> Result<(), DecodeError> {
    if scratch.capacity() == 0 {
        // One buffer for every Huffman string of the block: what is left of it decodes to at
        // most 8/5 of its length (5-bit shortest code), plus the byte of slack the decoder
        // wants, so the buffer never grows.
        *scratch = BytesMut::with_capacity((block.len() - start) * 8 / 5 + 1);
    }
    hpack_huffman::decode(block.get(start..end).ok_or(TRUNCATED)?, scratch)
}

fn literal_value(
    block: &Bytes,
    pos: &mut usize,
    scratch: &mut BytesMut,
) -> Result<Bytes, DecodeError> {
    let (huffman, start, end) = string_bounds(block, pos)?;
    if !huffman {
        return Ok(block.slice(start..end));
    }
    huffman_decode(block, start, end, scratch)?;
    Ok(scratch.split().freeze())
}

/// A literal name and its decoded length. Huffman-coded names are decoded into `scratch` only
/// to be parsed, so their space is given back.
fn literal_name(
    block: &Bytes,
    pos: &mut usize,
    scratch: &mut BytesMut,
) -> Result<(FieldName, usize), DecodeError> {
    let (huffman, start, end) = string_bounds(block, pos)?;
    if !huffman {
        let raw = block.get(start..end).ok_or(TRUNCATED)?;
        return Ok((FieldName::from_literal(raw), raw.len()));
    }
    // `scratch` is empty here: values are split off it and names cleared.
    huffman_decode(block, start, end, scratch)?;
    let name = FieldName::from_literal(scratch);
    let len = scratch.len();
    scratch.clear();
    Ok((name, len))
}

macro_rules! static_entry {
    ($name:expr, $text:literal) => {
        static_entry!($name, $text, "")
    };
    ($name:expr, $text:literal, $value:literal) => {
        Entry {
            name: $name,
            name_len: $text.len(),
            value: Bytes::from_static($value.as_bytes()),
        }
    };
}

/// RFC 7541 Appendix A; index `i` is `STATIC_TABLE[i - 1]`.
static STATIC_TABLE: [Entry; 61] = [
    static_entry!(FieldName::Authority, ":authority"),
    static_entry!(FieldName::Method, ":method", "GET"),
    static_entry!(FieldName::Method, ":method", "POST"),
    static_entry!(FieldName::Path, ":path", "/"),
    static_entry!(FieldName::Path, ":path", "/index.html"),
    static_entry!(FieldName::Scheme, ":scheme", "http"),
    static_entry!(FieldName::Scheme, ":scheme", "https"),
    static_entry!(FieldName::Status, ":status", "200"),
    static_entry!(FieldName::Status, ":status", "204"),
    static_entry!(FieldName::Status, ":status", "206"),
    static_entry!(FieldName::Status, ":status", "304"),
    static_entry!(FieldName::Status, ":status", "400"),
    static_entry!(FieldName::Status, ":status", "404"),
    static_entry!(FieldName::Status, ":status", "500"),
    static_entry!(FieldName::Header(header::ACCEPT_CHARSET), "accept-charset"),
    static_entry!(
        FieldName::Header(header::ACCEPT_ENCODING),
        "accept-encoding",
        "gzip, deflate"
    ),
    static_entry!(
        FieldName::Header(header::ACCEPT_LANGUAGE),
        "accept-language"
    ),
    static_entry!(FieldName::Header(header::ACCEPT_RANGES), "accept-ranges"),
    static_entry!(FieldName::Header(header::ACCEPT), "accept"),
    static_entry!(
        FieldName::Header(header::ACCESS_CONTROL_ALLOW_ORIGIN),
        "access-control-allow-origin"
    ),
    static_entry!(FieldName::Header(header::AGE), "age"),
    static_entry!(FieldName::Header(header::ALLOW), "allow"),
    static_entry!(FieldName::Header(header::AUTHORIZATION), "authorization"),
    static_entry!(FieldName::Header(header::CACHE_CONTROL), "cache-control"),
    static_entry!(
        FieldName::Header(header::CONTENT_DISPOSITION),
        "content-disposition"
    ),
    static_entry!(
        FieldName::Header(header::CONTENT_ENCODING),
        "content-encoding"
    ),
    static_entry!(
        FieldName::Header(header::CONTENT_LANGUAGE),
        "content-language"
    ),
    static_entry!(FieldName::Header(header::CONTENT_LENGTH), "content-length"),
    static_entry!(
        FieldName::Header(header::CONTENT_LOCATION),
        "content-location"
    ),
    static_entry!(FieldName::Header(header::CONTENT_RANGE), "content-range"),
    static_entry!(FieldName::Header(header::CONTENT_TYPE), "content-type"),
    static_entry!(FieldName::Header(header::COOKIE), "cookie"),
    static_entry!(FieldName::Header(header::DATE), "date"),
    static_entry!(FieldName::Header(header::ETAG), "etag"),
    static_entry!(FieldName::Header(header::EXPECT), "expect"),
    static_entry!(FieldName::Header(header::EXPIRES), "expires"),
    static_entry!(FieldName::Header(header::FROM), "from"),
    static_entry!(FieldName::Header(header::HOST), "host"),
    static_entry!(FieldName::Header(header::IF_MATCH), "if-match"),
    static_entry!(
        FieldName::Header(header::IF_MODIFIED_SINCE),
        "if-modified-since"
    ),
    static_entry!(FieldName::Header(header::IF_NONE_MATCH), "if-none-match"),
    static_entry!(FieldName::Header(header::IF_RANGE), "if-range"),
    static_entry!(
        FieldName::Header(header::IF_UNMODIFIED_SINCE),
        "if-unmodified-since"
    ),
    static_entry!(FieldName::Header(header::LAST_MODIFIED), "last-modified"),
    static_entry!(FieldName::Header(header::LINK), "link"),
    static_entry!(FieldName::Header(header::LOCATION), "location"),
    static_entry!(FieldName::Header(header::MAX_FORWARDS), "max-forwards"),
    static_entry!(
        FieldName::Header(header::PROXY_AUTHENTICATE),
        "proxy-authenticate"
    ),
    static_entry!(
        FieldName::Header(header::PROXY_AUTHORIZATION),
        "proxy-authorization"
    ),
    static_entry!(FieldName::Header(header::RANGE), "range"),
    static_entry!(FieldName::Header(header::REFERER), "referer"),
    static_entry!(FieldName::Header(header::REFRESH), "refresh"),
    static_entry!(FieldName::Header(header::RETRY_AFTER), "retry-after"),
    static_entry!(FieldName::Header(header::SERVER), "server"),
    static_entry!(FieldName::Header(header::SET_COOKIE), "set-cookie"),
    static_entry!(
        FieldName::Header(header::STRICT_TRANSPORT_SECURITY),
        "strict-transport-security"
    ),
    static_entry!(
        FieldName::Header(header::TRANSFER_ENCODING),
        "transfer-encoding"
    ),
    static_entry!(FieldName::Header(header::USER_AGENT), "user-agent"),
    static_entry!(FieldName::Header(header::VARY), "vary"),
    static_entry!(FieldName::Header(header::VIA), "via"),
    static_entry!(
        FieldName::Header(header::WWW_AUTHENTICATE),
        "www-authenticate"
    ),
];

/// Appends the header block of a response: `:status`, then every field of `headers` in
/// iteration order (each value of a name is a field). Names must be lowercase, as `HeaderName`s
/// are; connection-specific fields must already be gone. With `size_update`, the block starts
/// with a Dynamic Table Size Update to 0 (§6.3), for the first block after the peer changed its
/// SETTINGS_HEADER_TABLE_SIZE; 0 is always allowed since this encoder never uses the table.
pub fn encode_response(
    status: StatusCode,
    headers: &HeaderMap,
    size_update: bool,
    dst: &mut BytesMut,
) {
    // Size update + the longest status (5 bytes).
    reserve(headers, 6, dst);
    if size_update {
        dst.put_u8(0x20);
    }
    let indexed = match status.as_u16() {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => 0,
    };
    if indexed != 0 {
        dst.put_u8(0x80 | indexed);
    } else if let &[a, b, c] = status.as_str().as_bytes() {
        // Literal without indexing, name :status (index 8), 3-byte value.
        dst.put_slice(&[0x08, 3, a, b, c]);
    }
    encode_fields(headers, dst);
}

/// Appends a trailers block (no pseudo-headers); `size_update` as for [`encode_response`].
pub fn encode_trailers(headers: &HeaderMap, size_update: bool, dst: &mut BytesMut) {
    reserve(headers, 1, dst);
    if size_update {
        dst.put_u8(0x20);
    }
    encode_fields(headers, dst);
}

/// Appends the header block of a request (the upstream client's): `:method`, `:scheme`,
/// `:authority`, `:path` in the h2 crate's order (CONNECT: `:method` and `:authority` only),
/// then every field of `headers` as [`encode_response`] encodes them; `size_update` likewise.
pub fn encode_request(
    method: &http::Method,
    scheme: &str,
    authority: &str,
    path: &str,
    headers: &HeaderMap,
    size_update: bool,
    dst: &mut BytesMut,
) {
    reserve(headers, 8 + authority.len() + path.len(), dst);
    if size_update {
        dst.put_u8(0x20);
    }
    let connect = method == http::Method::CONNECT;
    match *method {
        http::Method::GET => dst.put_u8(0x82),
        http::Method::POST => dst.put_u8(0x83),
        // Literal without indexing, name :method (index 2).
        _ => {
            dst.put_u8(0x02);
            put_string(method.as_str().as_bytes(), dst);
        }
    }
    if !connect {
        match scheme {
            "http" => dst.put_u8(0x86),
            "https" => dst.put_u8(0x87),
            _ => {
                dst.put_u8(0x06);
                put_string(scheme.as_bytes(), dst);
            }
        }
    }
    if !authority.is_empty() {
        dst.put_u8(0x01);
        put_string(authority.as_bytes(), dst);
    }
    if !connect {
        if path == "/" {
            dst.put_u8(0x84);
        } else {
            dst.put_u8(0x04);
            put_string(path.as_bytes(), dst);
        }
    }
    encode_fields(headers, dst);
}

/// Reserves room for a usual block at once (a response's fields are short), from the field
/// count alone: summing the lengths first cost as much as a fifth of the encoding. Longer
/// values grow the buffer as they go; the connection's output buffer keeps its capacity
/// between blocks, so that happens once.
fn reserve(headers: &HeaderMap, extra: usize, dst: &mut BytesMut) {
    const USUAL_FIELD: usize = 48;
    dst.reserve(extra + headers.len() * USUAL_FIELD);
}

fn encode_fields(headers: &HeaderMap, dst: &mut BytesMut) {
    for (name, value) in headers {
        // §6.2.2 Literal without Indexing (0000), or §6.2.3 Never Indexed (0001) so that an
        // intermediary re-encoding the field will not index it either.
        let pattern = if value.is_sensitive() { 0x10 } else { 0x00 };
        let name = name.as_str();
        match static_name_index(name) {
            0 => {
                dst.put_u8(pattern);
                put_string(name.as_bytes(), dst);
            }
            // Fits the 4-bit prefix.
            index @ 1..15 => dst.put_u8(pattern | index),
            // At most 61 - 15 = 46 left after the prefix: one continuation byte.
            index => dst.put_slice(&[pattern | 0x0f, index - 15]),
        }
        put_string(value.as_bytes(), dst);
    }
}

/// A raw (not Huffman-coded) §5.2 string: Huffman coding costs instructions per byte, and the
/// bytes it saves do not matter to a proxy's peers.
#[inline]
fn put_string(s: &[u8], dst: &mut BytesMut) {
    put_int(0, 7, s.len(), dst);
    dst.put_slice(s);
}

/// §5.1 integer: `pattern` holds the first byte's bits above the `prefix_bits`-bit prefix.
#[inline]
fn put_int(pattern: u8, prefix_bits: u32, value: usize, dst: &mut BytesMut) {
    let mask = (1usize << prefix_bits) - 1;
    if value < mask {
        dst.put_u8(pattern | value as u8);
        return;
    }
    dst.put_u8(pattern | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        dst.put_u8(rest as u8 | 0x80);
        rest >>= 7;
    }
    dst.put_u8(rest as u8);
}

/// The lowest static table index (Appendix A) with this name, or 0. Dispatching on the length
/// first leaves one or a few comparisons per name, where a flat string match compares with
/// every arm in turn.
fn static_name_index(name: &str) -> u8 {
    match name.len() {
        3 => match name {
            "age" => 21,
            "via" => 60,
            _ => 0,
        },
        4 => match name {
            "date" => 33,
            "etag" => 34,
            "from" => 37,
            "host" => 38,
            "link" => 45,
            "vary" => 59,
            _ => 0,
        },
        5 => match name {
            "allow" => 22,
            "range" => 50,
            _ => 0,
        },
        6 => match name {
            "accept" => 19,
            "cookie" => 32,
            "expect" => 35,
            "server" => 54,
            _ => 0,
        },
        7 => match name {
            "expires" => 36,
            "referer" => 51,
            "refresh" => 52,
            _ => 0,
        },
        8 => match name {
            "if-match" => 39,
            "if-range" => 42,
            "location" => 46,
            _ => 0,
        },
        10 => match name {
            "set-cookie" => 55,
            "user-agent" => 58,
            _ => 0,
        },
        11 => match name {
            "retry-after" => 53,
            _ => 0,
        },
        12 => match name {
            "content-type" => 31,
            "max-forwards" => 47,
            _ => 0,
        },
        13 => match name {
            "accept-ranges" => 18,
            "authorization" => 23,
            "cache-control" => 24,
            "content-range" => 30,
            "if-none-match" => 41,
            "last-modified" => 44,
            _ => 0,
        },
        14 => match name {
            "accept-charset" => 15,
            "content-length" => 28,
            _ => 0,
        },
        15 => match name {
            "accept-encoding" => 16,
            "accept-language" => 17,
            _ => 0,
        },
        16 => match name {
            "content-encoding" => 26,
            "content-language" => 27,
            "content-location" => 29,
            "www-authenticate" => 61,
            _ => 0,
        },
        17 => match name {
            "if-modified-since" => 40,
            "transfer-encoding" => 57,
            _ => 0,
        },
        18 => match name {
            "proxy-authenticate" => 48,
            _ => 0,
        },
        19 => match name {
            "content-disposition" => 25,
            "if-unmodified-since" => 43,
            "proxy-authorization" => 49,
            _ => 0,
        },
        25 => match name {
            "strict-transport-security" => 56,
            _ => 0,
        },
        27 => match name {
            "access-control-allow-origin" => 20,
            _ => 0,
        },
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn hex(s: &str) -> Bytes {
        let s: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        s.chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect::<Vec<u8>>()
            .into()
    }

    fn name_text(name: &FieldName) -> &str {
        match name {
            FieldName::Authority => ":authority",
            FieldName::Method => ":method",
            FieldName::Path => ":path",
            FieldName::Scheme => ":scheme",
            FieldName::Status => ":status",
            FieldName::Protocol => ":protocol",
            FieldName::UnknownPseudo => "<unknown pseudo>",
            FieldName::Header(name) => name.as_str(),
            FieldName::Invalid => "<invalid>",
        }
    }

    fn pairs<'a>(
        list: impl IntoIterator<Item = (&'a FieldName, &'a Bytes)>,
    ) -> Vec<(String, String)> {
        list.into_iter()
            .map(|(n, v)| {
                (
                    name_text(n).to_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    fn expected(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|&(n, v)| (n.to_owned(), v.to_owned()))
            .collect()
    }

    fn decode(d: &mut Decoder, block: Bytes) -> Result<(Vec<Field>, usize), DecodeError> {
        let mut fields = Vec::new();
        let size = d.decode(block, |f| fields.push(f))?;
        Ok((fields, size))
    }

    fn decode_pairs(d: &mut Decoder, block: Bytes) -> Result<Vec<(String, String)>, DecodeError> {
        let (fields, _) = decode(d, block)?;
        Ok(pairs(fields.iter().map(|f| (&f.name, &f.value))))
    }

    fn table(d: &Decoder) -> Vec<(String, String)> {
        pairs(d.table.iter().map(|e| (&e.name, &e.value)))
    }

    /// Decodes a series of blocks on one decoder, checking the fields, the dynamic table
    /// (newest first) and its size after each.
    #[allow(clippy::type_complexity)]
    fn check_series(max: usize, steps: &[(&str, &[(&str, &str)], &[(&str, &str)], usize)]) {
        let mut d = Decoder::new(max);
        for (i, &(wire, fields, table_after, size)) in steps.iter().enumerate() {
            let (got, list_size) = decode(&mut d, hex(wire)).unwrap();
            let got_pairs = pairs(got.iter().map(|f| (&f.name, &f.value)));
            assert_eq!(got_pairs, expected(fields), "block {i}");
            assert_eq!(table(&d), expected(table_after), "table after block {i}");
            assert_eq!(d.size, size, "table size after block {i}");
            let want_list: usize = fields.iter().map(|(n, v)| n.len() + v.len() + 32).sum();
            assert_eq!(list_size, want_list, "header list size of block {i}");
        }
    }

    const C3_FIELDS_1: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
    ];
    const C3_FIELDS_2: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
        ("cache-control", "no-cache"),
    ];
    const C3_FIELDS_3: &[(&str, &str)] = &[
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ];
    const C3_TABLE_1: &[(&str, &str)] = &[(":authority", "www.example.com")];
    const C3_TABLE_2: &[(&str, &str)] = &[
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ];
    const C3_TABLE_3: &[(&str, &str)] = &[
        ("custom-key", "custom-value"),
        ("cache-control", "no-cache"),
        (":authority", "www.example.com"),
    ];

    #[test]
    fn rfc_c2_single_fields() {
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode_pairs(
                &mut d,
                hex("400a637573746f6d2d6b65790d637573746f6d2d686561646572")
            )
            .unwrap(),
            expected(&[("custom-key", "custom-header")])
        );
        assert_eq!(table(&d), expected(&[("custom-key", "custom-header")]));
        assert_eq!(d.size, 55);

        let mut d = Decoder::new(4096);
        assert_eq!(
            decode_pairs(&mut d, hex("040c2f73616d706c652f70617468")).unwrap(),
            expected(&[(":path", "/sample/path")])
        );
        assert!(d.table.is_empty());

        let mut d = Decoder::new(4096);
        assert_eq!(
            decode_pairs(&mut d, hex("100870617373776f726406736563726574")).unwrap(),
            expected(&[("password", "secret")])
        );
        assert!(d.table.is_empty());

        let mut d = Decoder::new(4096);
        assert_eq!(
            decode_pairs(&mut d, hex("82")).unwrap(),
            expected(&[(":method", "GET")])
        );
        assert!(d.table.is_empty());
    }

    #[test]
    fn rfc_c3_requests_without_huffman() {
        check_series(
            4096,
            &[
                (
                    "828684410f7777772e6578616d706c652e636f6d",
                    C3_FIELDS_1,
                    C3_TABLE_1,
                    57,
                ),
                ("828684be58086e6f2d6361636865", C3_FIELDS_2, C3_TABLE_2, 110),
                (
                    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
                    C3_FIELDS_3,
                    C3_TABLE_3,
                    164,
                ),
            ],
        );
    }

    #[test]
    fn rfc_c4_requests_with_huffman() {
        check_series(
            4096,
            &[
                (
                    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
                    C3_FIELDS_1,
                    C3_TABLE_1,
                    57,
                ),
                ("828684be5886a8eb10649cbf", C3_FIELDS_2, C3_TABLE_2, 110),
                (
                    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
                    C3_FIELDS_3,
                    C3_TABLE_3,
                    164,
                ),
            ],
        );
    }

    const C5_FIELDS_1: &[(&str, &str)] = &[
        (":status", "302"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("location", "https://www.example.com"),
    ];
    const C5_TABLE_1: &[(&str, &str)] = &[
        ("location", "https://www.example.com"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("cache-control", "private"),
        (":status", "302"),
    ];
    const C5_FIELDS_2: &[(&str, &str)] = &[
        (":status", "307"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("location", "https://www.example.com"),
    ];
    const C5_TABLE_2: &[(&str, &str)] = &[
        (":status", "307"),
        ("location", "https://www.example.com"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("cache-control", "private"),
    ];
    const C5_FIELDS_3: &[(&str, &str)] = &[
        (":status", "200"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
        ("location", "https://www.example.com"),
        ("content-encoding", "gzip"),
        (
            "set-cookie",
            "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
        ),
    ];
    const C5_TABLE_3: &[(&str, &str)] = &[
        (
            "set-cookie",
            "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
        ),
        ("content-encoding", "gzip"),
        ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
    ];

    #[test]
    fn rfc_c5_responses_without_huffman_evicting() {
        check_series(
            256,
            &[
                (
                    "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a3133
                     3a323120474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
                    C5_FIELDS_1,
                    C5_TABLE_1,
                    222,
                ),
                ("4803333037c1c0bf", C5_FIELDS_2, C5_TABLE_2, 222),
                (
                    "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a
                     69707738666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d
                     61782d6167653d333630303b2076657273696f6e3d31",
                    C5_FIELDS_3,
                    C5_TABLE_3,
                    215,
                ),
            ],
        );
    }

    #[test]
    fn rfc_c6_responses_with_huffman_evicting() {
        check_series(
            256,
            &[
                (
                    "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d
                     29ad171863c78f0b97c8e9ae82ae43d3",
                    C5_FIELDS_1,
                    C5_TABLE_1,
                    222,
                ),
                ("4883640effc1c0bf", C5_FIELDS_2, C5_TABLE_2, 222),
                (
                    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821d
                     d7f2e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b106
                     3d5007",
                    C5_FIELDS_3,
                    C5_TABLE_3,
                    215,
                ),
            ],
        );
    }

    #[test]
    fn static_table_matches_appendix_a() {
        let names = [
            ":authority",
            ":method",
            ":method",
            ":path",
            ":path",
            ":scheme",
            ":scheme",
            ":status",
            ":status",
            ":status",
            ":status",
            ":status",
            ":status",
            ":status",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "accept",
            "access-control-allow-origin",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "content-disposition",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-range",
            "content-type",
            "cookie",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "link",
            "location",
            "max-forwards",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "refresh",
            "retry-after",
            "server",
            "set-cookie",
            "strict-transport-security",
            "transfer-encoding",
            "user-agent",
            "vary",
            "via",
            "www-authenticate",
        ];
        for (i, (entry, name)) in STATIC_TABLE.iter().zip(names).enumerate() {
            assert_eq!(name_text(&entry.name), name, "index {}", i + 1);
            assert_eq!(entry.name_len, name.len(), "index {}", i + 1);
            // The literal parse of the name gives the same FieldName as the table.
            assert_eq!(
                FieldName::from_literal(name.as_bytes()),
                entry.name,
                "index {}",
                i + 1
            );
            let lowest = names.iter().position(|n| *n == name).unwrap() + 1;
            let expect = if name.starts_with(':') { 0 } else { lowest };
            assert_eq!(usize::from(static_name_index(name)), expect, "{name}");
        }
        let values: Vec<&[u8]> = STATIC_TABLE.iter().map(|e| &e.value[..]).collect();
        assert_eq!(
            &values[1..14],
            &[
                &b"GET"[..],
                b"POST",
                b"/",
                b"/index.html",
                b"http",
                b"https",
                b"200",
                b"204",
                b"206",
                b"304",
                b"400",
                b"404",
                b"500"
            ]
        );
        assert_eq!(values[15], b"gzip, deflate");
        assert!(values[14..]
            .iter()
            .enumerate()
            .all(|(i, v)| i == 1 || v.is_empty()));
        assert_eq!(static_name_index("x-custom"), 0);
        assert_eq!(static_name_index(""), 0);
    }

    fn encode(status: StatusCode, headers: &HeaderMap, size_update: bool) -> Vec<u8> {
        let mut dst = BytesMut::new();
        encode_response(status, headers, size_update, &mut dst);
        dst.to_vec()
    }

    fn map(list: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for &(n, v) in list {
            m.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn encode_known_bytes() {
        assert_eq!(
            encode(StatusCode::OK, &map(&[("content-length", "5")]), false),
            [0x88, 0x0f, 0x0d, 0x01, b'5']
        );
        let mut want = vec![0x20, 0x08, 0x03, b'4', b'1', b'8', 0x00, 0x05];
        want.extend_from_slice(b"x-foo\x03bar");
        want.extend_from_slice(&[0x0f, 0x06, 0x01, b'1']); // age = 21
        assert_eq!(
            encode(
                StatusCode::IM_A_TEAPOT,
                &map(&[("x-foo", "bar"), ("age", "1")]),
                true
            ),
            want
        );
        // Static names below 15 fit the prefix (accept-charset = 15 does not).
        let mut want = vec![0x8d, 0x0f, 0x00, 0x00];
        want.extend_from_slice(&[0x0f, 0x12, 0x01, b'd']); // date = 33
        want.extend_from_slice(&[0x0f, 0x27, 0x01, b's']); // server = 54
        want.extend_from_slice(&[0x0f, 0x10, 0x01, b't']); // content-type = 31
        assert_eq!(
            encode(
                StatusCode::NOT_FOUND,
                &map(&[
                    ("accept-charset", ""),
                    ("date", "d"),
                    ("server", "s"),
                    ("content-type", "t")
                ]),
                false
            ),
            want
        );
        for (code, byte) in [
            (200, 0x88),
            (204, 0x89),
            (206, 0x8a),
            (304, 0x8b),
            (400, 0x8c),
            (404, 0x8d),
            (500, 0x8e),
        ] {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(encode(status, &HeaderMap::new(), false), [byte]);
            assert_eq!(encode(status, &HeaderMap::new(), true), [0x20, byte]);
        }
    }

    /// Request blocks (the upstream client's): pseudo-headers from the static table where it
    /// has the value, literals otherwise, and the decoder reads them back in order.
    #[test]
    fn encode_request_known_bytes_and_round_trip() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        let mut out = BytesMut::new();
        encode_request(
            &http::Method::GET,
            "http",
            "a.b",
            "/",
            &HeaderMap::new(),
            false,
            &mut out,
        );
        assert_eq!(&out[..], b"\x82\x86\x01\x03a.b\x84");
        let mut out = BytesMut::new();
        encode_request(&http::Method::PUT, "https", "", "/x?y", &h, true, &mut out);
        assert_eq!(
            &out[..],
            b"\x20\x02\x03PUT\x87\x04\x04/x?y\x00\x02te\x08trailers"
        );
        let (fields, _) = decode(&mut Decoder::new(4096), out.freeze()).unwrap();
        let got: Vec<(FieldName, &[u8])> = fields
            .iter()
            .map(|f| (f.name.clone(), &f.value[..]))
            .collect();
        assert_eq!(
            got,
            [
                (FieldName::Method, &b"PUT"[..]),
                (FieldName::Scheme, b"https"),
                (FieldName::Path, b"/x?y"),
                (FieldName::Header(header::TE), b"trailers"),
            ]
        );
        // CONNECT: :method and :authority only.
        let mut out = BytesMut::new();
        encode_request(
            &http::Method::CONNECT,
            "http",
            "h:443",
            "/",
            &HeaderMap::new(),
            false,
            &mut out,
        );
        assert_eq!(&out[..], b"\x02\x07CONNECT\x01\x05h:443");
    }

    #[test]
    fn encode_sensitive_never_indexed() {
        let mut m = HeaderMap::new();
        let mut v = HeaderValue::from_static("Bearer x");
        v.set_sensitive(true);
        m.insert(header::AUTHORIZATION, v.clone());
        m.insert(HeaderName::from_static("x-token"), v);
        let mut want = vec![0x88, 0x1f, 0x08, 0x08];
        want.extend_from_slice(b"Bearer x");
        want.extend_from_slice(b"\x10\x07x-token\x08Bearer x");
        assert_eq!(encode(StatusCode::OK, &m, false), want);
    }

    #[test]
    fn encode_long_lengths() {
        let value = "v".repeat(200);
        let name = "n".repeat(130);
        let mut m = HeaderMap::new();
        m.insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(&value).unwrap(),
        );
        let got = encode(StatusCode::OK, &m, false);
        let mut want = vec![0x88, 0x00, 0x7f, 3];
        want.extend_from_slice(name.as_bytes());
        want.extend_from_slice(&[0x7f, 73]);
        want.extend_from_slice(value.as_bytes());
        assert_eq!(got, want);

        let mut dst = BytesMut::new();
        put_int(0x20, 5, 4096, &mut dst);
        assert_eq!(&dst[..], [0x3f, 0xe1, 0x1f]);
        dst.clear();
        put_int(0, 5, 1337, &mut dst);
        assert_eq!(&dst[..], [0x1f, 0x9a, 0x0a]); // RFC 7541 C.1.2
    }

    #[test]
    fn encode_trailers_known_bytes() {
        let mut dst = BytesMut::new();
        encode_trailers(&map(&[("grpc-status", "0")]), false, &mut dst);
        assert_eq!(&dst[..], b"\x00\x0bgrpc-status\x010");
        dst.clear();
        encode_trailers(&HeaderMap::new(), true, &mut dst);
        assert_eq!(&dst[..], [0x20]);
    }

    #[test]
    fn encode_does_not_reallocate() {
        let mut m = map(&[("content-type", "text/plain"), ("x-a", "1"), ("x-a", "2")]);
        m.insert(
            HeaderName::from_static("x-long"),
            HeaderValue::from_str(&"y".repeat(1000)).unwrap(),
        );
        let mut dst = BytesMut::new();
        encode_response(StatusCode::IM_A_TEAPOT, &m, true, &mut dst);
        let cap = dst.capacity();
        let ptr = dst.as_ptr();
        dst.clear();
        encode_response(StatusCode::IM_A_TEAPOT, &m, true, &mut dst);
        assert_eq!(dst.as_ptr(), ptr);
        assert_eq!(dst.capacity(), cap);
    }

    #[test]
    fn round_trip() {
        let mut sensitive = HeaderValue::from_static("secret");
        sensitive.set_sensitive(true);
        let mut m = map(&[
            ("content-type", "application/json"),
            ("content-length", "1234"),
            ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
            ("server", "strait"),
            ("x-request-id", "abc-123"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("vary", ""),
            ("x-empty", ""),
        ]);
        m.append(header::AUTHORIZATION, sensitive.clone());
        m.append(HeaderName::from_static("x-secret"), sensitive);
        m.append(
            HeaderName::from_static("x-long"),
            HeaderValue::from_str(&"z".repeat(5000)).unwrap(),
        );
        let want: Vec<(String, String)> = m
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.to_str().unwrap().to_owned()))
            .collect();

        for (status, size_update) in [(StatusCode::OK, false), (StatusCode::IM_A_TEAPOT, true)] {
            let block = encode(status, &m, size_update);
            let mut d = Decoder::new(4096);
            let (fields, list_size) = decode(&mut d, block.into()).unwrap();
            assert_eq!(fields[0].name, FieldName::Status);
            assert_eq!(fields[0].value, status.as_str().as_bytes());
            let got = pairs(fields[1..].iter().map(|f| (&f.name, &f.value)));
            assert_eq!(got, want);
            // Static names decode to the prebuilt constants.
            assert_eq!(fields[1].name, FieldName::Header(header::CONTENT_TYPE));
            assert!(d.table.is_empty(), "the encoder never indexes");
            let want_size: usize = 7
                + 3
                + 32
                + want
                    .iter()
                    .map(|(n, v)| n.len() + v.len() + 32)
                    .sum::<usize>();
            assert_eq!(list_size, want_size);
        }

        let mut dst = BytesMut::new();
        encode_trailers(&m, true, &mut dst);
        let got = decode_pairs(&mut Decoder::new(4096), dst.freeze()).unwrap();
        assert_eq!(got, want);
    }

    fn err(block: &[u8]) -> &'static str {
        decode(&mut Decoder::new(4096), Bytes::copy_from_slice(block))
            .unwrap_err()
            .reason()
    }

    fn huff(s: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        hpack_huffman::encode(s, &mut v);
        v
    }

    #[test]
    fn rejects_bad_indices() {
        assert_eq!(err(&[0x80]), INDEX_ZERO.0);
        assert_eq!(err(&[0xbe]), INDEX_OUT_OF_RANGE.0); // 62, table empty
        assert_eq!(err(&[0xff, 0x00]), INDEX_OUT_OF_RANGE.0); // 127

        // Name index out of range, in all three literal forms.
        assert_eq!(err(&[0x7e, 0x00]), INDEX_OUT_OF_RANGE.0);
        assert_eq!(err(&[0x0f, 0x2f, 0x00]), INDEX_OUT_OF_RANGE.0);
        assert_eq!(err(&[0x1f, 0x2f, 0x00]), INDEX_OUT_OF_RANGE.0);
        // Largest valid index is the last dynamic entry.
        let mut d = Decoder::new(4096);
        decode(&mut d, hex("400161016240016301644001650166")).unwrap();
        assert_eq!(
            decode_pairs(&mut d, hex("be bf c0")).unwrap(),
            expected(&[("e", "f"), ("c", "d"), ("a", "b")])
        );
        assert_eq!(decode(&mut d, hex("c1")).unwrap_err(), INDEX_OUT_OF_RANGE);
    }

    #[test]
    fn rejects_bad_integers() {
        // 0x1f then 10 continuation bytes.
        let mut block = vec![0x1f];
        block.extend_from_slice(&[0xff; 10]);
        assert_eq!(err(&block), INTEGER_TOO_LONG.0);
        // Five continuation bytes are accepted (the value is then out of range)...
        assert_eq!(
            err(&[0xff, 0x80, 0x80, 0x80, 0x80, 0x0f]),
            INDEX_OUT_OF_RANGE.0
        );
        // ...six are not.
        assert_eq!(
            err(&[0xff, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01]),
            INTEGER_TOO_LONG.0
        );
        // Truncated integers.
        assert_eq!(err(&[0xff]), TRUNCATED.0);
        assert_eq!(err(&[0xff, 0x80]), TRUNCATED.0);
        assert_eq!(err(&[0x04, 0x7f]), TRUNCATED.0);
        assert_eq!(err(&[0x3f]), TRUNCATED.0);
        // A string length near 2^35.
        assert_eq!(
            err(&[0x04, 0x7f, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            STRING_TOO_LONG.0
        );
    }

    #[test]
    fn rejects_truncated_blocks() {
        assert_eq!(err(&[0x41]), TRUNCATED.0); // no value
        assert_eq!(err(&[0x40]), TRUNCATED.0); // no name
        assert_eq!(err(&[0x40, 0x01, b'a']), TRUNCATED.0); // no value
        assert_eq!(err(&[0x40, 0x05, b'a']), STRING_TOO_LONG.0);
        assert_eq!(err(&[0x04, 0x02, b'/']), STRING_TOO_LONG.0);
        assert_eq!(err(&[0x04, 0x81]), STRING_TOO_LONG.0);
        // The exact length is fine, including empty strings.
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode_pairs(
                &mut d,
                Bytes::from_static(&[0x04, 0x01, b'/', 0x00, 0x01, b'a', 0x00, 0x04, 0x80])
            )
            .unwrap(),
            expected(&[(":path", "/"), ("a", ""), (":path", "")])
        );
        assert_eq!(decode_pairs(&mut d, Bytes::new()).unwrap(), expected(&[]));
    }

    #[test]
    fn rejects_bad_huffman() {
        let mut bad_padding = vec![0x04, 0x81, 0xff];
        assert_eq!(err(&bad_padding), INVALID_HUFFMAN.0);
        bad_padding = vec![0x04, 0x81, 0b0001_1000];
        assert_eq!(err(&bad_padding), INVALID_HUFFMAN.0);
        let eos = [0x04, 0x84, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(err(&eos), INVALID_HUFFMAN.0);
        // In a name too.
        assert_eq!(err(&[0x00, 0x81, 0xff, 0x00]), INVALID_HUFFMAN.0);
        // A good Huffman name and value.
        let n = huff(b"x-foo");
        let v = huff(b"Hello, World");
        let mut block = vec![0x00, 0x80 | n.len() as u8];
        block.extend_from_slice(&n);
        block.push(0x80 | v.len() as u8);
        block.extend_from_slice(&v);
        let mut d = Decoder::new(4096);
        assert_eq!(
            decode_pairs(&mut d, block.into()).unwrap(),
            expected(&[("x-foo", "Hello, World")])
        );
    }

    #[test]
    fn huffman_values_of_every_byte() {
        // Every byte value as a Huffman-coded value, many strings in one block sharing the
        // scratch buffer, checked against the literal form.
        let mut block = Vec::new();
        for b in 0..=u8::MAX {
            let h = huff(&[b, b'a', b, b'0']);
            block.extend_from_slice(&[0x00, 0x01, b'x', 0x80 | h.len() as u8]);
            block.extend_from_slice(&h);
        }
        let (fields, _) = decode(&mut Decoder::new(4096), block.into()).unwrap();
        assert_eq!(fields.len(), 256);
        for (b, f) in (0..=u8::MAX).zip(&fields) {
            assert_eq!(f.value, &[b, b'a', b, b'0'][..]);
        }
        // All decoded into one buffer, back to back.
        for pair in fields.windows(2) {
            assert_eq!(pair[1].value.as_ptr(), pair[0].value.as_ptr_range().end);
        }
        // One long string (a multi-byte length).
        let all: Vec<u8> = (0..=u8::MAX).collect();
        let h = huff(&all);
        let mut block = BytesMut::from(&[0x04][..]);
        put_int(0x80, 7, h.len(), &mut block);
        block.extend_from_slice(&h);
        let (fields, _) = decode(&mut Decoder::new(4096), block.freeze()).unwrap();
        assert_eq!(fields[0].value, all);
    }

    #[test]
    fn size_updates() {
        // Over the limit.
        let mut over = BytesMut::new();
        put_int(0x20, 5, 4097, &mut over);
        assert_eq!(err(&over), SIZE_UPDATE_TOO_LARGE.0);
        // After a field.
        assert_eq!(err(&[0x82, 0x20]), SIZE_UPDATE_AFTER_FIELD.0);
        assert_eq!(
            err(&[0x20, 0x82, 0x3f, 0xe1, 0x1f]),
            SIZE_UPDATE_AFTER_FIELD.0
        );

        let mut d = Decoder::new(4096);
        decode(&mut d, hex("400161016240016301644001650166")).unwrap();
        assert_eq!(d.size, 3 * 34);
        // Two updates at the start: shrink to 70 (evicting the oldest), then back to the limit;
        // the smaller one wins for eviction.
        decode(&mut d, hex("3f 27 3f e1 1f")).unwrap();
        assert_eq!(table(&d), expected(&[("e", "f"), ("c", "d")]));
        assert_eq!(d.max_size, 4096);
        // An update to 0 empties the table; entries can be added again after a new update.
        assert_eq!(decode(&mut d, hex("20")).unwrap().1, 0);
        assert!(d.table.is_empty());
        assert_eq!(d.size, 0);
        decode(&mut d, hex("40016101 62")).unwrap();
        assert!(d.table.is_empty(), "max size 0 keeps nothing");
        decode(&mut d, hex("3f 03 400161016240016301 64")).unwrap();
        assert_eq!(
            table(&d),
            expected(&[("c", "d")]),
            "34-byte table holds one entry"
        );
        // An entry larger than the table empties it (§4.4).
        decode(&mut d, hex("40 01 61 02 6262")).unwrap();
        assert!(d.table.is_empty());
        assert_eq!(d.size, 0);
    }

    #[test]
    fn eviction_keeps_name_of_evicted_entry() {
        // A literal whose indexed name is the entry its own insertion evicts (§4.4).
        let mut d = Decoder::new(34);
        decode(&mut d, hex("40016101 62")).unwrap();
        let got = decode_pairs(&mut d, hex("7e 01 63 be")).unwrap();
        assert_eq!(got, expected(&[("a", "c"), ("a", "c")]));
        assert_eq!(table(&d), expected(&[("a", "c")]));
    }

    #[test]
    fn bad_names_keep_the_table_in_sync() {
        let mut block = Vec::new();
        block.extend_from_slice(b"\x40\x03Foo\x01x"); // uppercase → Invalid, indexed
        block.extend_from_slice(b"\x40\x04:foo\x01y"); // unknown pseudo, indexed
        block.extend_from_slice(b"\x40\x00\x01z"); // empty name → Invalid, indexed
        block.extend_from_slice(b"\x00\x03a b\x01w"); // space → Invalid, not indexed
        block.extend_from_slice(b"\x40\x05x-bar\x01v"); // good
        let upper = huff(b"Abc"); // Huffman-coded uppercase, empty value
        block.extend_from_slice(&[0x00, 0x80 | upper.len() as u8]);
        block.extend_from_slice(&upper);
        block.push(0x00);
        block.extend_from_slice(b"\x40\x09:protocol\x09websocket");
        let mut d = Decoder::new(4096);
        let (fields, list_size) = decode(&mut d, block.into()).unwrap();
        let names: Vec<&FieldName> = fields.iter().map(|f| &f.name).collect();
        assert_eq!(
            names,
            [
                &FieldName::Invalid,
                &FieldName::UnknownPseudo,
                &FieldName::Invalid,
                &FieldName::Invalid,
                &FieldName::Header(HeaderName::from_static("x-bar")),
                &FieldName::Invalid,
                &FieldName::Protocol,
            ]
        );
        assert_eq!(
            list_size,
            (3 + 1) + (4 + 1) + 1 + (3 + 1) + (5 + 1) + 3 + (9 + 9) + 7 * 32
        );
        // Entry sizes use the real name lengths: 36 + 37 + 33 + 38 + 50.
        assert_eq!(d.size, 36 + 37 + 33 + 38 + 50);
        let got = decode(&mut d, hex("be bf c0 c1 c2")).unwrap().0;
        let got: Vec<(FieldName, &[u8])> =
            got.iter().map(|f| (f.name.clone(), &f.value[..])).collect();
        assert_eq!(
            got,
            [
                (FieldName::Protocol, &b"websocket"[..]),
                (FieldName::Header(HeaderName::from_static("x-bar")), b"v"),
                (FieldName::Invalid, b"z"),
                (FieldName::UnknownPseudo, b"y"),
                (FieldName::Invalid, b"x"),
            ]
        );
    }

    #[test]
    fn pseudo_and_standard_names() {
        let mut block = Vec::new();
        for name in [
            ":authority",
            ":method",
            ":path",
            ":scheme",
            ":status",
            ":protocol",
            ":Path",
            "user-agent",
            "x-custom",
        ] {
            block.push(0x00);
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
            block.push(0x00);
        }
        let (fields, _) = decode(&mut Decoder::new(4096), block.into()).unwrap();
        let names: Vec<FieldName> = fields.into_iter().map(|f| f.name).collect();
        assert_eq!(
            names,
            [
                FieldName::Authority,
                FieldName::Method,
                FieldName::Path,
                FieldName::Scheme,
                FieldName::Status,
                FieldName::Protocol,
                FieldName::UnknownPseudo,
                FieldName::Header(header::USER_AGENT),
                FieldName::Header(HeaderName::from_static("x-custom")),
            ]
        );
    }

    #[test]
    fn literal_values_are_slices_of_the_block() {
        let block = hex("828684410f7777772e6578616d706c652e636f6d");
        let range = block.as_ptr_range();
        let mut d = Decoder::new(4096);
        let (fields, _) = decode(&mut d, block.clone()).unwrap();
        assert!(range.contains(&fields[3].value.as_ptr()));
    }

    /// Arbitrary input must never panic, and errors are reported, not hidden.
    #[test]
    fn random_blocks_do_not_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut d = Decoder::new(4096);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let block: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if decode(&mut d, block.into()).is_err() {
                d = Decoder::new(4096);
            }
            assert!(d.size <= d.max_size);
            assert_eq!(d.size, d.table.iter().map(Entry::size).sum::<usize>());
        }
    }
}
