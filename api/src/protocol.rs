//! The goim v2 client frame: a 16-byte big-endian header and a body.
//!
//! ```text
//! offset size field
//!  0     4    packLen   (int32) header + body
//!  4     2    headerLen (int16) always 16
//!  6     2    ver       (int16)
//!  8     4    op        (int32)
//! 12     4    seq       (int32)
//! 16     ..   body
//! ```
//!
//! Client frames are limited to [`MAX_CLIENT_FRAME`] bytes; frames the server
//! sends are not (a room batch can be larger).

use bytes::{BufMut, Bytes, BytesMut};

/// Length of every frame header.
pub const HEADER_LEN: usize = 16;
/// goim's `MaxBodySize` (1 << 12).
pub const MAX_BODY_SIZE: usize = 4096;
/// The largest frame a client may send: 4112 bytes.
pub const MAX_CLIENT_FRAME: usize = HEADER_LEN + MAX_BODY_SIZE;
/// Version of frames the server creates.
pub const SERVER_VERSION: i16 = 1;

/// Operation codes (goim `api/protocol/operation.go`).
pub mod op {
    pub const HANDSHAKE: i32 = 0;
    pub const HANDSHAKE_REPLY: i32 = 1;
    pub const HEARTBEAT: i32 = 2;
    pub const HEARTBEAT_REPLY: i32 = 3;
    pub const SEND_MSG: i32 = 4;
    pub const SEND_MSG_REPLY: i32 = 5;
    pub const DISCONNECT_REPLY: i32 = 6;
    pub const AUTH: i32 = 7;
    pub const AUTH_REPLY: i32 = 8;
    /// A container of pre-encoded frames; on WebSocket the client sees it as
    /// a batch (outer header, then inner frames), on TCP only the inner frames.
    pub const RAW: i32 = 9;
    pub const PROTO_READY: i32 = 10;
    pub const PROTO_FINISH: i32 = 11;
    pub const CHANGE_ROOM: i32 = 12;
    pub const CHANGE_ROOM_REPLY: i32 = 13;
    pub const SUB: i32 = 14;
    pub const SUB_REPLY: i32 = 15;
    pub const UNSUB: i32 = 16;
    pub const UNSUB_REPLY: i32 = 17;
    /// pushcluster: sent to a connection that opted in to positions after
    /// it joined a room (auth or op 12), once any replay is written and
    /// before live messages; the body is JSON (`docs/recovery.md`).
    pub const RESUME_REPLY: i32 = 20;
    /// pushcluster: join one more room (body: the room id, or for a client
    /// with positions `{"room", "since"}`); answered with op 23, JSON
    /// `{"room", "ok", "reason"}` (`docs/goim-compatibility.md`).
    pub const JOIN: i32 = 22;
    pub const JOIN_REPLY: i32 = 23;
    /// pushcluster: leave one room (body: the room id); answered with op 25.
    pub const LEAVE: i32 = 24;
    pub const LEAVE_REPLY: i32 = 25;
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub ver: i16,
    pub op: i32,
    pub seq: i32,
    pub body: Bytes,
}

impl Frame {
    /// A frame created by the server: version 1, sequence 0.
    pub fn server(op: i32, body: impl Into<Bytes>) -> Self {
        Frame {
            ver: SERVER_VERSION,
            op,
            seq: 0,
            body: body.into(),
        }
    }

    /// A reply to this frame: version and sequence echoed, op and body replaced.
    pub fn reply(&self, op: i32, body: Bytes) -> Self {
        Frame {
            ver: self.ver,
            op,
            seq: self.seq,
            body,
        }
    }

    /// Length of the encoded frame.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }

    /// Appends the encoded frame to `buf`.
    pub fn encode_into(&self, buf: &mut BytesMut) {
        put_header(buf, self.body.len(), self.ver, self.op, self.seq);
        buf.put_slice(&self.body);
    }

    /// The encoded frame.
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut buf);
        buf.freeze()
    }
}

/// Why bytes from a client are not a valid frame. Every variant closes the
/// connection that sent them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("pack length {0} exceeds the client frame limit of {MAX_CLIENT_FRAME} bytes")]
    PackLenTooLarge(i32),
    #[error("pack length {0} is smaller than the {HEADER_LEN}-byte header")]
    PackLenTooSmall(i32),
    #[error("header length {0} is not {HEADER_LEN}")]
    BadHeaderLen(i16),
    #[error("pack length {pack_len} disagrees with the {payload}-byte WebSocket message")]
    PayloadMismatch { pack_len: i32, payload: usize },
    #[error("message of {0} bytes is shorter than a frame header")]
    Truncated(usize),
}

impl FrameError {
    /// A short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::PackLenTooLarge(_) => "pack_len_too_large",
            FrameError::PackLenTooSmall(_) => "pack_len_too_small",
            FrameError::BadHeaderLen(_) => "bad_header_len",
            FrameError::PayloadMismatch { .. } => "payload_mismatch",
            FrameError::Truncated(_) => "truncated",
        }
    }
}

/// A parsed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub pack_len: i32,
    pub header_len: i16,
    pub ver: i16,
    pub op: i32,
    pub seq: i32,
}

impl Header {
    /// Parses the 16 header bytes without validating them.
    pub fn parse(raw: &[u8; HEADER_LEN]) -> Header {
        Header {
            pack_len: i32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]),
            header_len: i16::from_be_bytes([raw[4], raw[5]]),
            ver: i16::from_be_bytes([raw[6], raw[7]]),
            op: i32::from_be_bytes([raw[8], raw[9], raw[10], raw[11]]),
            seq: i32::from_be_bytes([raw[12], raw[13], raw[14], raw[15]]),
        }
    }

    /// Validates a header sent by a client and returns the body length.
    ///
    /// goim accepts a pack length below 16 on TCP as an empty body; such a
    /// frame can only come from a broken client, so it is refused here.
    pub fn client_body_len(&self) -> Result<usize, FrameError> {
        self.body_len_within(MAX_CLIENT_FRAME)
    }

    /// Validates a header whose frame may be up to `max_frame` bytes long.
    pub fn body_len_within(&self, max_frame: usize) -> Result<usize, FrameError> {
        if i64::from(self.pack_len) > max_frame as i64 {
            return Err(FrameError::PackLenTooLarge(self.pack_len));
        }
        if self.header_len != HEADER_LEN as i16 {
            return Err(FrameError::BadHeaderLen(self.header_len));
        }
        if self.pack_len < HEADER_LEN as i32 {
            return Err(FrameError::PackLenTooSmall(self.pack_len));
        }
        Ok(self.pack_len as usize - HEADER_LEN)
    }

    fn into_frame(self, body: Bytes) -> Frame {
        Frame {
            ver: self.ver,
            op: self.op,
            seq: self.seq,
            body,
        }
    }
}

/// Decodes one client frame that arrived as a whole WebSocket message.
/// The message must hold exactly one frame: packLen equals its length.
pub fn decode_ws_message(payload: Bytes) -> Result<Frame, FrameError> {
    let Some(raw) = payload.first_chunk::<HEADER_LEN>() else {
        return Err(FrameError::Truncated(payload.len()));
    };
    let header = Header::parse(raw);
    let body_len = header.client_body_len()?;
    if HEADER_LEN + body_len != payload.len() {
        return Err(FrameError::PayloadMismatch {
            pack_len: header.pack_len,
            payload: payload.len(),
        });
    }
    Ok(header.into_frame(payload.slice(HEADER_LEN..)))
}

/// Decodes client frames from a byte stream buffer (TCP). Returns `Ok(None)`
/// when `buf` does not yet hold a whole frame; consumed bytes are removed.
pub fn decode_stream(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    decode_stream_within(buf, MAX_CLIENT_FRAME)
}

/// Decodes frames a server sent (what a client reads): any length.
pub fn decode_server_stream(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    decode_stream_within(buf, i32::MAX as usize)
}

fn decode_stream_within(buf: &mut BytesMut, max_frame: usize) -> Result<Option<Frame>, FrameError> {
    let Some(raw) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = Header::parse(raw);
    let body_len = header.body_len_within(max_frame)?;
    if buf.len() < HEADER_LEN + body_len {
        return Ok(None);
    }
    let mut frame = buf.split_to(HEADER_LEN + body_len);
    let body = frame.split_off(HEADER_LEN).freeze();
    Ok(Some(header.into_frame(body)))
}

/// Where a positioned frame sits in its stream (the header extension).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FramePosition {
    pub offset: u64,
    pub epoch: u64,
    /// The room id, or the direct stream's name (`@mid:<mid>`,
    /// `@key:<key>`).
    pub stream: String,
}

/// Decodes one frame as a client that opted in to positions reads it:
/// `headerLen` may exceed 16, and then the header carries a position.
pub fn decode_positioned_stream(
    buf: &mut BytesMut,
) -> Result<Option<(Frame, Option<FramePosition>)>, FrameError> {
    let Some(raw) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = Header::parse(raw);
    let header_len = usize::try_from(header.header_len)
        .ok()
        .filter(|len| *len >= HEADER_LEN)
        .ok_or(FrameError::BadHeaderLen(header.header_len))?;
    let pack_len = usize::try_from(header.pack_len)
        .ok()
        .filter(|len| *len >= header_len)
        .ok_or(FrameError::PackLenTooSmall(header.pack_len))?;
    if buf.len() < pack_len {
        return Ok(None);
    }
    let mut whole = buf.split_to(pack_len).freeze();
    let body = whole.split_off(header_len);
    let position = if header_len > HEADER_LEN {
        let ext = &whole[HEADER_LEN..];
        let fixed = ext
            .first_chunk::<18>()
            .ok_or(FrameError::BadHeaderLen(header.header_len))?;
        let name_len = usize::from(u16::from_be_bytes([fixed[16], fixed[17]]));
        let name = ext
            .get(18..18 + name_len)
            .ok_or(FrameError::BadHeaderLen(header.header_len))?;
        Some(FramePosition {
            offset: u64::from_be_bytes(fixed[0..8].try_into().unwrap_or_default()),
            epoch: u64::from_be_bytes(fixed[8..16].try_into().unwrap_or_default()),
            stream: String::from_utf8_lossy(name).into_owned(),
        })
    } else {
        None
    };
    Ok(Some((header.into_frame(body), position)))
}

/// Writes a header for a body of `body_len` bytes.
pub fn put_header(buf: &mut BytesMut, body_len: usize, ver: i16, op: i32, seq: i32) {
    // Server frames are not capped, but a pack length must fit an int32.
    let pack_len = i32::try_from(HEADER_LEN + body_len).unwrap_or(i32::MAX);
    buf.put_i32(pack_len);
    buf.put_i16(HEADER_LEN as i16);
    buf.put_i16(ver);
    buf.put_i32(op);
    buf.put_i32(seq);
}

/// The 20-byte heartbeat reply: op 3, ver and seq echoed, body = the room's
/// online count as a big-endian int32.
pub fn heartbeat_reply(ver: i16, seq: i32, online: i32) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + 4);
    put_header(&mut buf, 4, ver, op::HEARTBEAT_REPLY, seq);
    buf.put_i32(online);
    buf.freeze()
}

/// Concatenates server frames (ver 1, seq 0) into the body of one op-9 frame,
/// the shape job sends to comets for a room batch or a single push.
#[derive(Debug, Default)]
pub struct RawBatch {
    buf: BytesMut,
    frames: usize,
}

impl RawBatch {
    pub fn with_capacity(bytes: usize) -> Self {
        RawBatch {
            buf: BytesMut::with_capacity(bytes),
            frames: 0,
        }
    }

    /// Appends one server frame with this op and body.
    pub fn push(&mut self, op: i32, body: &[u8]) {
        put_header(&mut self.buf, body.len(), SERVER_VERSION, op, 0);
        self.buf.put_slice(body);
        self.frames += 1;
    }

    pub fn frames(&self) -> usize {
        self.frames
    }

    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// The op-9 frame wrapping everything pushed so far.
    pub fn finish(self) -> Frame {
        Frame::server(op::RAW, self.buf.freeze())
    }
}

/// A push as it is written to clients of each transport, encoded once per
/// comet and shared by reference count across every receiving connection.
#[derive(Clone, Debug)]
pub struct EncodedPush {
    /// One WebSocket message: the whole frame (for op 9, the outer header
    /// followed by the inner frames).
    pub websocket: Bytes,
    /// TCP bytes: for op 9 only the inner frames, else the whole frame.
    pub tcp: Bytes,
    /// When the (earliest) message in it was published, in µs since the
    /// epoch; 0 when unknown.
    pub published_us: u64,
}

impl EncodedPush {
    pub fn new(frame: &Frame) -> Self {
        let websocket = frame.encode();
        let tcp = if frame.op == op::RAW {
            websocket.slice(HEADER_LEN..)
        } else {
            websocket.clone()
        };
        EncodedPush {
            websocket,
            tcp,
            published_us: 0,
        }
    }

    pub fn published_at(mut self, unix_micros: i64) -> Self {
        self.published_us = u64::try_from(unix_micros).unwrap_or(0);
        self
    }
}

/// The body of an op-9 batch without its first `count` inner frames, or
/// `None` if the body does not hold that many well-formed frames.
pub fn skip_frames(batch: &Bytes, count: usize) -> Option<Bytes> {
    let mut offset = 0usize;
    for _ in 0..count {
        let header = batch.get(offset..)?.first_chunk::<HEADER_LEN>()?;
        let pack_len = usize::try_from(Header::parse(header).pack_len).ok()?;
        if pack_len < HEADER_LEN {
            return None;
        }
        offset = offset.checked_add(pack_len)?;
        if offset > batch.len() {
            return None;
        }
    }
    Some(batch.slice(offset..))
}

/// The frames at indices `keep` (ascending) of an op-9 batch body, copied
/// into a new body; `None` when the batch is malformed or has fewer frames.
pub fn select_frames(batch: &Bytes, keep: &[usize]) -> Option<Bytes> {
    let mut out = BytesMut::new();
    let mut offset = 0usize;
    let mut index = 0usize;
    for want in keep {
        loop {
            let header = batch.get(offset..)?.first_chunk::<HEADER_LEN>()?;
            let pack_len = usize::try_from(Header::parse(header).pack_len).ok()?;
            let end = offset.checked_add(pack_len)?;
            if pack_len < HEADER_LEN || end > batch.len() {
                return None;
            }
            let found = index == *want;
            if found {
                out.extend_from_slice(&batch[offset..end]);
            }
            offset = end;
            index += 1;
            if found {
                break;
            }
        }
    }
    Some(out.freeze())
}

/// The frames inside an op-9 batch body, as (op, body); stops at the first
/// malformed one.
pub fn inner_frames(batch: &Bytes) -> impl Iterator<Item = (i32, Bytes)> + '_ {
    let mut offset = 0usize;
    std::iter::from_fn(move || {
        let header = Header::parse(batch.get(offset..)?.first_chunk::<HEADER_LEN>()?);
        let pack_len = usize::try_from(header.pack_len).ok()?;
        let header_len = usize::try_from(header.header_len).ok()?;
        let end = offset.checked_add(pack_len)?;
        if header_len < HEADER_LEN || pack_len < header_len || end > batch.len() {
            return None;
        }
        let body = batch.slice(offset + header_len..end);
        offset = end;
        Some((header.op, body))
    })
}

/// Longest stream name a positioned header carries (a longer room id is
/// cut; `headerLen` is an int16).
pub const MAX_STREAM_NAME: usize = 1024;

fn stream_name(stream: &str) -> &[u8] {
    &stream.as_bytes()[..stream.len().min(MAX_STREAM_NAME)]
}

/// A positioned frame's header length for `stream`.
pub fn positioned_header_len(stream: &str) -> usize {
    HEADER_LEN + 8 + 8 + 2 + stream_name(stream).len()
}

/// Appends a server frame carrying its position, for connections that
/// opted in (`docs/goim-compatibility.md`): the header grows past 16 bytes
/// with `offset` (u64), `epoch` (u64), the stream name's length (u16) and
/// the name (the room id), all big-endian; `headerLen` says where the body
/// starts, so a reader that skips `headerLen` bytes still finds the body.
pub fn put_positioned_frame(
    buf: &mut BytesMut,
    op: i32,
    body: &[u8],
    offset: u64,
    epoch: u64,
    stream: &str,
) {
    let name = stream_name(stream);
    let header_len = positioned_header_len(stream);
    let pack_len = i32::try_from(header_len + body.len()).unwrap_or(i32::MAX);
    buf.put_i32(pack_len);
    buf.put_i16(header_len as i16);
    buf.put_i16(SERVER_VERSION);
    buf.put_i32(op);
    buf.put_i32(0);
    buf.put_u64(offset);
    buf.put_u64(epoch);
    buf.put_u16(name.len() as u16);
    buf.put_slice(name);
    buf.put_slice(body);
}

/// Parses goim's comma-separated op list ("1000,1001") used by op 14 / 16.
/// Like goim, one bad item makes the whole list invalid.
pub fn parse_op_list(body: &[u8]) -> Option<Vec<i32>> {
    let text = std::str::from_utf8(body).ok()?;
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',')
        .map(|item| item.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(text: &str) -> Vec<u8> {
        let text: String = text.split_whitespace().collect();
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
            .collect()
    }

    // docs/goim-compatibility.md: a positioned frame, op 1000, body "a",
    // offset 7, epoch 2, room "r".
    #[test]
    fn positioned_frame_bytes() {
        let mut buf = BytesMut::new();
        put_positioned_frame(&mut buf, 1000, b"a", 7, 2, "r");
        assert_eq!(
            &buf[..],
            &unhex(
                "00000024 0023 0001 000003E8 00000000 \
                 0000000000000007 0000000000000002 0001 72 61"
            )[..]
        );
        let (frame, position) = decode_positioned_stream(&mut buf)
            .expect("valid")
            .expect("whole");
        assert_eq!((frame.op, &frame.body[..]), (1000, &b"a"[..]));
        assert_eq!(
            position,
            Some(FramePosition {
                offset: 7,
                epoch: 2,
                stream: "r".into()
            })
        );
        // A plain frame decodes the same way, without a position.
        let mut plain = BytesMut::from(&Frame::server(1000, Bytes::from_static(b"a")).encode()[..]);
        let (frame, position) = decode_positioned_stream(&mut plain)
            .expect("valid")
            .expect("whole");
        assert_eq!((&frame.body[..], position), (&b"a"[..], None));
        // Inside a batch, the frames are found by their pack lengths.
        let mut batch = BytesMut::new();
        put_positioned_frame(&mut batch, 1000, b"x", 1, 2, "room");
        put_positioned_frame(&mut batch, 1001, b"yz", 2, 2, "room");
        let batch = batch.freeze();
        let ops: Vec<i32> = inner_frames(&batch).map(|(op, _)| op).collect();
        assert_eq!(ops, [1000, 1001]);
    }

    // PROTOCOL.md §1.10: client heartbeat, seq 1.
    #[test]
    fn client_heartbeat_bytes() {
        let wire = unhex("00000010 0010 0001 00000002 00000001");
        let mut buf = BytesMut::from(&wire[..]);
        let frame = decode_stream(&mut buf).expect("valid").expect("whole");
        assert_eq!(
            frame,
            Frame {
                ver: 1,
                op: op::HEARTBEAT,
                seq: 1,
                body: Bytes::new()
            }
        );
        assert!(buf.is_empty());
        assert_eq!(frame.encode().as_ref(), &wire[..]);
    }

    // PROTOCOL.md §1.10: reply when the room has 5 online.
    #[test]
    fn heartbeat_reply_bytes() {
        let reply = heartbeat_reply(1, 1, 5);
        assert_eq!(
            hex(&reply),
            hex(&unhex("00000014 0010 0001 00000003 00000001 00000005"))
        );
        assert_eq!(reply.len(), 20);
    }

    // PROTOCOL.md §1.10: WS room batch with two pushes, op 1000, bodies a, bc.
    #[test]
    fn room_batch_bytes() {
        let mut batch = RawBatch::default();
        batch.push(1000, b"a");
        batch.push(1000, b"bc");
        assert_eq!(batch.frames(), 2);
        let push = EncodedPush::new(&batch.finish());
        let outer = "00000033 0010 0001 00000009 00000000";
        let inner =
            "00000011 0010 0001 000003E8 00000000 61 00000012 0010 0001 000003E8 00000000 6263";
        assert_eq!(
            hex(&push.websocket),
            hex(&unhex(&format!("{outer} {inner}")))
        );
        // Over TCP the same push is just the two inner frames.
        assert_eq!(hex(&push.tcp), hex(&unhex(inner)));
    }

    #[test]
    fn non_raw_push_is_whole_frame_on_both_transports() {
        let push = EncodedPush::new(&Frame::server(1000, Bytes::from_static(b"x")));
        assert_eq!(push.websocket, push.tcp);
        assert_eq!(push.tcp.len(), 17);
    }

    #[test]
    fn stream_decoder_waits_for_whole_frames() {
        let frame = Frame {
            ver: 1,
            op: op::AUTH,
            seq: 7,
            body: Bytes::from_static(b"{\"mid\":1}"),
        };
        let wire = frame.encode();
        let mut buf = BytesMut::new();
        for (i, byte) in wire.iter().enumerate() {
            assert_eq!(decode_stream(&mut buf).expect("valid"), None, "at {i}");
            buf.put_u8(*byte);
        }
        assert_eq!(decode_stream(&mut buf).expect("valid"), Some(frame));
    }

    #[test]
    fn stream_decoder_splits_back_to_back_frames() {
        let mut buf = BytesMut::new();
        Frame::server(5, Bytes::from_static(b"one")).encode_into(&mut buf);
        Frame::server(6, Bytes::from_static(b"")).encode_into(&mut buf);
        let first = decode_stream(&mut buf).expect("valid").expect("whole");
        let second = decode_stream(&mut buf).expect("valid").expect("whole");
        assert_eq!((first.op, &first.body[..]), (5, &b"one"[..]));
        assert_eq!((second.op, second.body.len()), (6, 0));
        assert!(buf.is_empty());
    }

    fn header_bytes(pack_len: i32, header_len: i16) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_i32(pack_len);
        buf.put_i16(header_len);
        buf.put_i16(1);
        buf.put_i32(op::HEARTBEAT);
        buf.put_i32(0);
        buf
    }

    #[test]
    fn largest_client_frame_is_accepted_and_one_more_byte_refused() {
        let mut buf = header_bytes(MAX_CLIENT_FRAME as i32, 16);
        buf.put_bytes(0, MAX_BODY_SIZE);
        let frame = decode_stream(&mut buf)
            .expect("4112 is allowed")
            .expect("whole");
        assert_eq!(frame.body.len(), MAX_BODY_SIZE);

        let mut buf = header_bytes(MAX_CLIENT_FRAME as i32 + 1, 16);
        assert_eq!(
            decode_stream(&mut buf),
            Err(FrameError::PackLenTooLarge(4113))
        );
    }

    #[test]
    fn server_frames_may_exceed_the_client_limit() {
        let big = Frame::server(op::RAW, Bytes::from(vec![7u8; 10_000])).encode();
        let mut buf = BytesMut::from(&big[..]);
        assert!(decode_stream(&mut buf.clone()).is_err());
        let frame = decode_server_stream(&mut buf)
            .expect("valid")
            .expect("whole");
        assert_eq!(frame.body.len(), 10_000);
    }

    #[test]
    fn malformed_headers_are_refused() {
        assert_eq!(
            decode_stream(&mut header_bytes(20, 12)),
            Err(FrameError::BadHeaderLen(12))
        );
        assert_eq!(
            decode_stream(&mut header_bytes(8, 16)),
            Err(FrameError::PackLenTooSmall(8))
        );
        assert_eq!(
            decode_stream(&mut header_bytes(-1, 16)),
            Err(FrameError::PackLenTooSmall(-1))
        );
    }

    #[test]
    fn websocket_message_must_hold_exactly_one_frame() {
        let wire = Frame::server(4, Bytes::from_static(b"hello")).encode();
        assert_eq!(
            decode_ws_message(wire.clone()).expect("valid").body,
            "hello"
        );

        let mut longer = BytesMut::from(&wire[..]);
        longer.put_slice(b"!");
        assert_eq!(
            decode_ws_message(longer.freeze()),
            Err(FrameError::PayloadMismatch {
                pack_len: 21,
                payload: 22
            })
        );
        assert_eq!(
            decode_ws_message(wire.slice(..20)),
            Err(FrameError::PayloadMismatch {
                pack_len: 21,
                payload: 20
            })
        );
        assert_eq!(
            decode_ws_message(wire.slice(..10)),
            Err(FrameError::Truncated(10))
        );
    }

    #[test]
    fn replies_echo_version_and_sequence() {
        let request = Frame {
            ver: 7,
            op: op::CHANGE_ROOM,
            seq: 99,
            body: Bytes::from_static(b"live://1"),
        };
        let reply = request.reply(op::CHANGE_ROOM_REPLY, request.body.clone());
        assert_eq!((reply.ver, reply.seq, reply.op), (7, 99, 13));
    }

    #[test]
    fn skipping_inner_frames() {
        let mut batch = RawBatch::default();
        batch.push(1, b"a");
        batch.push(2, b"bc");
        batch.push(3, b"");
        let body = batch.finish().body;
        let rest = skip_frames(&body, 2).expect("two frames");
        let mut buf = BytesMut::from(&rest[..]);
        let third = decode_server_stream(&mut buf)
            .expect("valid")
            .expect("whole");
        assert_eq!((third.op, buf.len()), (3, 0));
        assert_eq!(skip_frames(&body, 0), Some(body.clone()));
        assert_eq!(skip_frames(&body, 3).map(|b| b.len()), Some(0));
        assert_eq!(skip_frames(&body, 4), None);
        assert_eq!(skip_frames(&Bytes::from_static(b"\x00\x00"), 1), None);
    }

    #[test]
    fn selecting_inner_frames() {
        let mut batch = RawBatch::default();
        for (op, body) in [(1, &b"a"[..]), (2, b"bc"), (3, b""), (4, b"d")] {
            batch.push(op, body);
        }
        let body = batch.finish().body;
        let ops = |picked: &Bytes| inner_frames(picked).map(|(op, _)| op).collect::<Vec<_>>();
        let picked = select_frames(&body, &[0, 2, 3]).expect("three frames");
        assert_eq!(ops(&picked), [1, 3, 4]);
        let picked = select_frames(&body, &[1]).expect("one frame");
        assert_eq!(
            inner_frames(&picked).collect::<Vec<_>>(),
            [(2, Bytes::from("bc"))]
        );
        assert_eq!(select_frames(&body, &[]).map(|b| b.len()), Some(0));
        assert_eq!(select_frames(&body, &[0, 1, 2, 3]), Some(body.clone()));
        assert_eq!(select_frames(&body, &[4]), None, "only four frames");
        assert_eq!(select_frames(&body.slice(..body.len() - 1), &[3]), None);
    }

    #[test]
    fn op_lists() {
        assert_eq!(parse_op_list(b"1000,1001"), Some(vec![1000, 1001]));
        assert_eq!(parse_op_list(b"5"), Some(vec![5]));
        assert_eq!(parse_op_list(b""), Some(vec![]));
        assert_eq!(parse_op_list(b"1,x"), None);
        assert_eq!(parse_op_list(&[0xff]), None);
    }
}
