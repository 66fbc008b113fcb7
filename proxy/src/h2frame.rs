//! What Strait's two HTTP/2 codecs share (`h2server` downstream, `h2client` upstream): frame
//! types and flags (RFC 9113 §6), error codes ([`Reason`], §7), and the few helpers that write
//! or take apart a frame.

use std::fmt;

use bytes::{Buf, BufMut, BytesMut};

pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// HTTP/2's default SETTINGS_INITIAL_WINDOW_SIZE, and the largest window.
pub(crate) const DEFAULT_WINDOW: i64 = 65_535;
pub(crate) const MAX_WINDOW: i64 = (1 << 31) - 1;

// Frame types and flags (RFC 9113 §6).
pub(crate) const DATA: u8 = 0;
pub(crate) const HEADERS: u8 = 1;
pub(crate) const PRIORITY: u8 = 2;
pub(crate) const RST_STREAM: u8 = 3;
pub(crate) const SETTINGS: u8 = 4;
pub(crate) const PUSH_PROMISE: u8 = 5;
pub(crate) const PING: u8 = 6;
pub(crate) const GOAWAY: u8 = 7;
pub(crate) const WINDOW_UPDATE: u8 = 8;
pub(crate) const CONTINUATION: u8 = 9;
pub(crate) const END_STREAM: u8 = 0x1;
pub(crate) const ACK: u8 = 0x1;
pub(crate) const END_HEADERS: u8 = 0x4;
pub(crate) const PADDED: u8 = 0x8;
pub(crate) const PRIORITY_FLAG: u8 = 0x20;

/// An HTTP/2 error code (RFC 9113 §7), as RST_STREAM and GOAWAY carry it. Formats as the h2
/// crate's type of the same name did (Debug: the code's name; Display: its description), so
/// logs read the same.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reason(u32);

impl Reason {
    pub const NO_ERROR: Reason = Reason(0);
    pub const PROTOCOL_ERROR: Reason = Reason(1);
    pub const INTERNAL_ERROR: Reason = Reason(2);
    pub const FLOW_CONTROL_ERROR: Reason = Reason(3);
    pub const SETTINGS_TIMEOUT: Reason = Reason(4);
    pub const STREAM_CLOSED: Reason = Reason(5);
    pub const FRAME_SIZE_ERROR: Reason = Reason(6);
    pub const REFUSED_STREAM: Reason = Reason(7);
    pub const CANCEL: Reason = Reason(8);
    pub const COMPRESSION_ERROR: Reason = Reason(9);
    pub const CONNECT_ERROR: Reason = Reason(10);
    pub const ENHANCE_YOUR_CALM: Reason = Reason(11);
    pub const INADEQUATE_SECURITY: Reason = Reason(12);
    pub const HTTP_1_1_REQUIRED: Reason = Reason(13);

    fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "NO_ERROR",
            1 => "PROTOCOL_ERROR",
            2 => "INTERNAL_ERROR",
            3 => "FLOW_CONTROL_ERROR",
            4 => "SETTINGS_TIMEOUT",
            5 => "STREAM_CLOSED",
            6 => "FRAME_SIZE_ERROR",
            7 => "REFUSED_STREAM",
            8 => "CANCEL",
            9 => "COMPRESSION_ERROR",
            10 => "CONNECT_ERROR",
            11 => "ENHANCE_YOUR_CALM",
            12 => "INADEQUATE_SECURITY",
            13 => "HTTP_1_1_REQUIRED",
            _ => return None,
        })
    }

    /// h2's descriptions.
    pub fn description(&self) -> &'static str {
        match self.0 {
            0 => "not a result of an error",
            1 => "unspecific protocol error detected",
            2 => "unexpected internal error encountered",
            3 => "flow-control protocol violated",
            4 => "settings ACK not received in timely manner",
            5 => "received frame when stream half-closed",
            6 => "frame with invalid size",
            7 => "refused stream before processing any application logic",
            8 => "stream no longer needed",
            9 => "unable to maintain the header compression context",
            10 => "connection established in response to a CONNECT request was reset or abnormally closed",
            11 => "detected excessive load generating behavior",
            12 => "security properties do not meet minimum requirements",
            13 => "endpoint requires HTTP/1.1",
            _ => "unknown reason",
        }
    }
}

impl From<u32> for Reason {
    fn from(v: u32) -> Reason {
        Reason(v)
    }
}

impl From<Reason> for u32 {
    fn from(r: Reason) -> u32 {
        r.0
    }
}

impl fmt::Debug for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "Reason({:#x})", self.0),
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())
    }
}

/// Appends a frame header (RFC 9113 §4.1).
pub(crate) fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, id: u32) {
    out.put_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.put_u32(id);
}

/// Takes the padding off a PADDED frame's payload; returns how many bytes it took (pad length
/// field included). An error is a connection error with this code and description.
pub(crate) fn strip_padding(flags: u8, p: &mut BytesMut) -> Result<usize, (Reason, &'static str)> {
    if flags & PADDED == 0 {
        return Ok(0);
    }
    let Some(&pad) = p.first() else {
        return Err((
            Reason::FRAME_SIZE_ERROR,
            "padded frame without a pad length",
        ));
    };
    let pad = usize::from(pad);
    if pad >= p.len() {
        return Err((Reason::PROTOCOL_ERROR, "padding longer than the frame"));
    }
    p.advance(1);
    p.truncate(p.len() - pad);
    Ok(pad + 1)
}

/// Fixes up the HEADERS frame begun at `start` of `out` (its header block encoded after it):
/// length and flags, and CONTINUATION frames when the block is over the peer's frame size.
pub(crate) fn end_header_block(out: &mut BytesMut, start: usize, eos: bool, max: usize) {
    let block_len = out.len() - start - 9;
    let first = block_len.min(max);
    let mut flags = if eos { END_STREAM } else { 0 };
    if block_len <= max {
        flags |= END_HEADERS;
    }
    let h = &mut out[start..start + 9];
    h[0] = (first >> 16) as u8;
    h[1] = (first >> 8) as u8;
    h[2] = first as u8;
    h[4] = flags;
    if block_len > max {
        let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
        let rest = out.split_off(start + 9 + first);
        let mut rest = &rest[..];
        while !rest.is_empty() {
            let n = rest.len().min(max);
            let f = if n == rest.len() { END_HEADERS } else { 0 };
            put_head(out, n, CONTINUATION, f, id);
            out.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_format_as_h2_did() {
        assert_eq!(format!("{:?}", Reason::REFUSED_STREAM), "REFUSED_STREAM");
        assert_eq!(format!("{:?}", Reason::from(0x1234)), "Reason(0x1234)");
        assert_eq!(Reason::CANCEL.to_string(), "stream no longer needed");
        assert_eq!(u32::from(Reason::ENHANCE_YOUR_CALM), 11);
    }

    #[test]
    fn a_long_header_block_is_split_into_continuation_frames() {
        let mut out = BytesMut::new();
        put_head(&mut out, 0, HEADERS, 0, 3);
        out.extend_from_slice(&[7u8; 25]);
        end_header_block(&mut out, 0, true, 10);
        // HEADERS(10, END_STREAM), CONTINUATION(10), CONTINUATION(5, END_HEADERS).
        assert_eq!(&out[..9], &[0, 0, 10, HEADERS, END_STREAM, 0, 0, 0, 3]);
        assert_eq!(&out[19..28], &[0, 0, 10, CONTINUATION, 0, 0, 0, 0, 3]);
        assert_eq!(
            &out[38..47],
            &[0, 0, 5, CONTINUATION, END_HEADERS, 0, 0, 0, 3]
        );
        assert_eq!(out.len(), 25 + 27);
    }
}
