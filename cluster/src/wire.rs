//! The wire format between twinfs clients and nodes.
//!
//! Every request and every reply is one frame on its own QUIC stream:
//!
//! ```text
//!   magic  b"TW"   2 bytes
//!   version u8     1 byte   (WIRE_VERSION; anything else is refused)
//!   kind    u8     1 byte   (MessageKind)
//!   length  u32 BE 4 bytes  (body length; bounded per kind, see `max_body_len`)
//!   body    `length` bytes, laid out per kind (all integers big-endian)
//! ```
//!
//! The decoder is total: any byte string decodes to a message or to a [`WireError`]; it never
//! panics and never allocates more than the bounded body it was handed. `decode_frame` is
//! property-tested against arbitrary input in this module's tests.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::BlockHash;

pub const MAGIC: [u8; 2] = *b"TW";
/// 2: list entries carry the time a copy was stored; Verify and Collect requests. GetMany and
/// DataMany came later within 2: an older node answers an unknown kind with `BadRequest`, and a
/// client then fetches those blocks one by one, so no version bump was needed.
pub const WIRE_VERSION: u8 = 2;
pub const HEADER_LEN: usize = 8;
/// Largest block a node accepts. Files are cut into 4 MiB chunks; the margin leaves room for a
/// larger chunk size per volume later without a wire change.
pub const MAX_BLOCK_SIZE: usize = 8 << 20;
/// Largest number of hashes in one `Has` request (32 B each: 256 KiB).
pub const MAX_HAS_BATCH: usize = 8192;
/// Largest page of a `List` reply.
pub const MAX_LIST_PAGE: usize = 8192;
/// Most hashes in one `GetMany` request.
pub const MAX_GET_MANY: usize = 64;
/// Most block bytes in one `DataMany` reply: a node leaves out the blocks past it (the
/// client fetches those one by one).
pub const MAX_GET_MANY_BYTES: usize = MAX_BLOCK_SIZE;
/// Largest string (error message, node id, zone, version) carried in a frame.
pub const MAX_STRING: usize = 4096;
/// Largest body of any frame that does not carry block data.
const MAX_SMALL_BODY: usize = 512 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageKind {
    Put = 0x01,
    Get = 0x02,
    Has = 0x03,
    Delete = 0x04,
    List = 0x05,
    Info = 0x06,
    Verify = 0x07,
    Collect = 0x08,
    GetMany = 0x09,
    Ok = 0x41,
    Data = 0x42,
    HasReply = 0x43,
    ListReply = 0x44,
    InfoReply = 0x45,
    DataMany = 0x46,
    Error = 0x7f,
}

impl MessageKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        use MessageKind::*;
        Some(match v {
            0x01 => Put,
            0x02 => Get,
            0x03 => Has,
            0x04 => Delete,
            0x05 => List,
            0x06 => Info,
            0x07 => Verify,
            0x08 => Collect,
            0x09 => GetMany,
            0x41 => Ok,
            0x42 => Data,
            0x43 => HasReply,
            0x44 => ListReply,
            0x45 => InfoReply,
            0x46 => DataMany,
            0x7f => Error,
            _ => return None,
        })
    }

    /// The largest body this kind may carry; a header announcing more is refused before the
    /// body is read, so a peer cannot make a node allocate more than this.
    pub fn max_body_len(self) -> usize {
        match self {
            MessageKind::Put => 32 + MAX_BLOCK_SIZE,
            MessageKind::Data => MAX_BLOCK_SIZE,
            MessageKind::Has | MessageKind::Verify => 4 + 32 * MAX_HAS_BATCH,
            MessageKind::Collect => 12 + 32 * MAX_HAS_BATCH,
            MessageKind::ListReply => 5 + 48 * MAX_LIST_PAGE,
            MessageKind::GetMany => 4 + 32 * MAX_GET_MANY,
            MessageKind::DataMany => 4 + 5 * MAX_GET_MANY + MAX_GET_MANY_BYTES,
            _ => MAX_SMALL_BODY,
        }
    }
}

/// Error codes carried in an `Error` reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    NotFound = 1,
    /// The bytes of a `Put` do not hash to the hash it names.
    HashMismatch = 2,
    /// The stored copy failed verification; it has been quarantined.
    Corrupt = 3,
    NoSpace = 4,
    BadRequest = 5,
    TooLarge = 6,
    Internal = 7,
    BadVersion = 8,
    Unknown = 0xffff,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Self {
        use ErrorCode::*;
        match v {
            1 => NotFound,
            2 => HashMismatch,
            3 => Corrupt,
            4 => NoSpace,
            5 => BadRequest,
            6 => TooLarge,
            7 => Internal,
            8 => BadVersion,
            _ => Unknown,
        }
    }
}

/// Inclusive-exclusive byte range of a block; `len == None` reads to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    pub hash: BlockHash,
    pub size: u64,
    /// When the copy was stored or last re-stored (seconds since the epoch): garbage
    /// collection spares copies younger than its grace period.
    pub stored_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub node_id: String,
    pub zone: String,
    pub version: String,
    pub blocks: u64,
    pub bytes_used: u64,
    pub capacity: u64,
    pub free: u64,
    /// Copies found corrupt (on read, or on receipt) and quarantined since the node started.
    pub corrupt_detected: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Put {
        hash: BlockHash,
        data: Bytes,
    },
    Get {
        hash: BlockHash,
        range: Option<ByteRange>,
    },
    Has {
        hashes: Vec<BlockHash>,
    },
    Delete {
        hash: BlockHash,
    },
    List {
        after: Option<BlockHash>,
        limit: u32,
    },
    Info,
    /// Re-read and re-hash each listed copy; a bad copy is quarantined. Answered by a
    /// `HasReply`: true for a present, good copy.
    Verify {
        hashes: Vec<BlockHash>,
    },
    /// Garbage collection: delete each listed copy unless it was stored (or re-stored) at or
    /// after `older_than_unix`, atomically with respect to puts. `HasReply`: true if deleted.
    Collect {
        hashes: Vec<BlockHash>,
        older_than_unix: u64,
    },
    Ok,
    Data(Bytes),
    HasReply(Vec<bool>),
    ListReply {
        entries: Vec<ListEntry>,
        more: bool,
    },
    InfoReply(NodeInfo),
    /// Several whole blocks in one request (small blocks fetched ahead: one stream and one
    /// round trip instead of one each). Answered by `DataMany`.
    GetMany {
        hashes: Vec<BlockHash>,
    },
    /// The blocks a `GetMany` asked for, in its order, as stored (the client verifies them);
    /// `None` for a block the node has not, cannot read, or left out to stay within
    /// [`MAX_GET_MANY_BYTES`].
    DataMany(Vec<Option<Bytes>>),
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:02x?}: not a twinfs frame")]
    BadMagic([u8; 2]),
    #[error("unsupported wire version {0} (this build speaks {WIRE_VERSION})")]
    BadVersion(u8),
    #[error("unknown message kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("frame of kind {kind:?} announces {len} bytes, more than its limit of {max}")]
    TooLarge {
        kind: MessageKind,
        len: usize,
        max: usize,
    },
    #[error("frame body of kind {0:?} is malformed: {1}")]
    Malformed(MessageKind, &'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: MessageKind,
    pub len: usize,
}

/// Validates a frame header. Checks magic, version, kind and the per-kind length bound.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
    if h[0..2] != MAGIC {
        return Err(WireError::BadMagic([h[0], h[1]]));
    }
    if h[2] != WIRE_VERSION {
        return Err(WireError::BadVersion(h[2]));
    }
    let kind = MessageKind::from_u8(h[3]).ok_or(WireError::UnknownKind(h[3]))?;
    let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let max = kind.max_body_len();
    if len > max {
        return Err(WireError::TooLarge { kind, len, max });
    }
    Ok(Header { kind, len })
}

struct Reader {
    kind: MessageKind,
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.buf.remaining() < n {
            Err(WireError::Malformed(self.kind, "truncated"))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }
    fn hash(&mut self) -> Result<BlockHash, WireError> {
        self.need(32)?;
        let mut h = [0u8; 32];
        self.buf.copy_to_slice(&mut h);
        Ok(BlockHash(h))
    }
    /// A count and that many hashes (at most [`MAX_HAS_BATCH`]).
    fn hashes(&mut self) -> Result<Vec<BlockHash>, WireError> {
        let n = self.u32()? as usize;
        if n > MAX_HAS_BATCH {
            return Err(WireError::Malformed(self.kind, "too many hashes"));
        }
        self.need(n * 32)?;
        let mut hashes = Vec::with_capacity(n);
        for _ in 0..n {
            hashes.push(self.hash()?);
        }
        Ok(hashes)
    }
    fn string(&mut self) -> Result<String, WireError> {
        let len = self.u16()? as usize;
        if len > MAX_STRING {
            return Err(WireError::Malformed(self.kind, "string too long"));
        }
        self.need(len)?;
        let bytes = self.buf.split_to(len);
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Malformed(self.kind, "bad utf-8"))
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
    fn finish(&self) -> Result<(), WireError> {
        if self.buf.has_remaining() {
            Err(WireError::Malformed(self.kind, "trailing bytes"))
        } else {
            Ok(())
        }
    }
}

/// Decodes the body of a frame whose header has been validated by [`decode_header`].
pub fn decode_body(kind: MessageKind, body: Bytes) -> Result<Message, WireError> {
    if body.len() > kind.max_body_len() {
        return Err(WireError::TooLarge {
            kind,
            len: body.len(),
            max: kind.max_body_len(),
        });
    }
    let mut r = Reader { kind, buf: body };
    let msg = match kind {
        MessageKind::Put => {
            let hash = r.hash()?;
            Message::Put {
                hash,
                data: r.rest(),
            }
        }
        MessageKind::Get => {
            let hash = r.hash()?;
            let range = match r.u8()? {
                0 => None,
                1 => {
                    let offset = r.u64()?;
                    let len = match r.u8()? {
                        0 => None,
                        1 => Some(r.u64()?),
                        _ => return Err(WireError::Malformed(kind, "bad range length flag")),
                    };
                    Some(ByteRange { offset, len })
                }
                _ => return Err(WireError::Malformed(kind, "bad range flag")),
            };
            Message::Get { hash, range }
        }
        MessageKind::Has => Message::Has {
            hashes: r.hashes()?,
        },
        MessageKind::Verify => Message::Verify {
            hashes: r.hashes()?,
        },
        MessageKind::Collect => {
            let older_than_unix = r.u64()?;
            Message::Collect {
                hashes: r.hashes()?,
                older_than_unix,
            }
        }
        MessageKind::Delete => Message::Delete { hash: r.hash()? },
        MessageKind::GetMany => {
            let hashes = r.hashes()?;
            if hashes.len() > MAX_GET_MANY {
                return Err(WireError::Malformed(kind, "too many hashes"));
            }
            Message::GetMany { hashes }
        }
        MessageKind::DataMany => {
            let n = r.u32()? as usize;
            if n > MAX_GET_MANY {
                return Err(WireError::Malformed(kind, "too many blocks"));
            }
            let mut blocks = Vec::with_capacity(n);
            for _ in 0..n {
                blocks.push(match r.u8()? {
                    0 => None,
                    1 => {
                        let len = r.u32()? as usize;
                        if len > MAX_BLOCK_SIZE {
                            return Err(WireError::Malformed(kind, "block too large"));
                        }
                        r.need(len)?;
                        Some(r.buf.split_to(len))
                    }
                    _ => return Err(WireError::Malformed(kind, "bad block flag")),
                });
            }
            Message::DataMany(blocks)
        }
        MessageKind::List => {
            let after = match r.u8()? {
                0 => None,
                1 => Some(r.hash()?),
                _ => return Err(WireError::Malformed(kind, "bad cursor flag")),
            };
            let limit = r.u32()?;
            if limit == 0 || limit as usize > MAX_LIST_PAGE {
                return Err(WireError::Malformed(kind, "page limit out of range"));
            }
            Message::List { after, limit }
        }
        MessageKind::Info => Message::Info,
        MessageKind::Ok => Message::Ok,
        MessageKind::Data => Message::Data(r.rest()),
        MessageKind::HasReply => {
            let n = r.u32()? as usize;
            if n > MAX_HAS_BATCH {
                return Err(WireError::Malformed(kind, "too many answers"));
            }
            let nbytes = n.div_ceil(8);
            r.need(nbytes)?;
            let bits = r.buf.split_to(nbytes);
            Message::HasReply((0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect())
        }
        MessageKind::ListReply => {
            let n = r.u32()? as usize;
            if n > MAX_LIST_PAGE {
                return Err(WireError::Malformed(kind, "page too long"));
            }
            r.need(n * 48)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let hash = r.hash()?;
                let size = r.u64()?;
                let stored_unix = r.u64()?;
                entries.push(ListEntry {
                    hash,
                    size,
                    stored_unix,
                });
            }
            let more = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(WireError::Malformed(kind, "bad more flag")),
            };
            Message::ListReply { entries, more }
        }
        MessageKind::InfoReply => Message::InfoReply(NodeInfo {
            node_id: r.string()?,
            zone: r.string()?,
            version: r.string()?,
            blocks: r.u64()?,
            bytes_used: r.u64()?,
            capacity: r.u64()?,
            free: r.u64()?,
            corrupt_detected: r.u64()?,
        }),
        MessageKind::Error => {
            let code = ErrorCode::from_u16(r.u16()?);
            let message = r.string()?;
            Message::Error { code, message }
        }
    };
    r.finish()?;
    Ok(msg)
}

/// Decodes one whole frame (header and body) from a byte string.
pub fn decode_frame(frame: &[u8]) -> Result<Message, WireError> {
    let Some(head) = frame.first_chunk::<HEADER_LEN>() else {
        return Err(WireError::Malformed(
            MessageKind::Error,
            "frame shorter than its header",
        ));
    };
    let header = decode_header(head)?;
    let body = &frame[HEADER_LEN..];
    if body.len() != header.len {
        return Err(WireError::Malformed(
            header.kind,
            "body length differs from header",
        ));
    }
    decode_body(header.kind, Bytes::copy_from_slice(body))
}

fn put_hashes(b: &mut BytesMut, hashes: &[BlockHash]) {
    b.put_u32(hashes.len() as u32);
    for h in hashes {
        b.put_slice(&h.0);
    }
}

fn put_string(b: &mut BytesMut, s: &str) {
    // Strings are bounded on decode; truncate on encode (at a char boundary) so an over-long
    // error message cannot make a frame undecodable.
    let mut end = s.len().min(MAX_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    b.put_u16(end as u16);
    b.put_slice(&s.as_bytes()[..end]);
}

impl Message {
    pub fn kind(&self) -> MessageKind {
        match self {
            Message::Put { .. } => MessageKind::Put,
            Message::Get { .. } => MessageKind::Get,
            Message::Has { .. } => MessageKind::Has,
            Message::Delete { .. } => MessageKind::Delete,
            Message::List { .. } => MessageKind::List,
            Message::Info => MessageKind::Info,
            Message::Verify { .. } => MessageKind::Verify,
            Message::Collect { .. } => MessageKind::Collect,
            Message::GetMany { .. } => MessageKind::GetMany,
            Message::DataMany(_) => MessageKind::DataMany,
            Message::Ok => MessageKind::Ok,
            Message::Data(_) => MessageKind::Data,
            Message::HasReply(_) => MessageKind::HasReply,
            Message::ListReply { .. } => MessageKind::ListReply,
            Message::InfoReply(_) => MessageKind::InfoReply,
            Message::Error { .. } => MessageKind::Error,
        }
    }

    /// Encodes the message as a frame: a small head (header and structured fields) and, for
    /// messages that carry block bytes, the bytes themselves as a second part so that they are
    /// handed to the transport without being copied.
    pub fn encode(&self) -> (BytesMut, Option<Bytes>) {
        let mut b = BytesMut::with_capacity(64);
        b.put_slice(&MAGIC);
        b.put_u8(WIRE_VERSION);
        b.put_u8(self.kind() as u8);
        b.put_u32(0); // length, patched below
        let mut tail = None;
        match self {
            Message::Put { hash, data } => {
                b.put_slice(&hash.0);
                tail = Some(data.clone());
            }
            Message::Get { hash, range } => {
                b.put_slice(&hash.0);
                match range {
                    None => b.put_u8(0),
                    Some(r) => {
                        b.put_u8(1);
                        b.put_u64(r.offset);
                        match r.len {
                            None => b.put_u8(0),
                            Some(l) => {
                                b.put_u8(1);
                                b.put_u64(l);
                            }
                        }
                    }
                }
            }
            Message::Has { hashes } | Message::Verify { hashes } | Message::GetMany { hashes } => {
                put_hashes(&mut b, hashes)
            }
            Message::Collect {
                hashes,
                older_than_unix,
            } => {
                b.put_u64(*older_than_unix);
                put_hashes(&mut b, hashes);
            }
            Message::Delete { hash } => b.put_slice(&hash.0),
            Message::List { after, limit } => {
                match after {
                    None => b.put_u8(0),
                    Some(h) => {
                        b.put_u8(1);
                        b.put_slice(&h.0);
                    }
                }
                b.put_u32(*limit);
            }
            Message::Info | Message::Ok => {}
            Message::Data(data) => tail = Some(data.clone()),
            Message::DataMany(blocks) => {
                // Small blocks (see `MAX_GET_MANY_BYTES`): one copy into the frame is cheaper
                // than a transport write per block.
                let bytes: usize = blocks.iter().flatten().map(|d| d.len() + 5).sum();
                b.reserve(4 + blocks.len() + bytes);
                b.put_u32(blocks.len() as u32);
                for block in blocks {
                    match block {
                        None => b.put_u8(0),
                        Some(d) => {
                            b.put_u8(1);
                            b.put_u32(d.len() as u32);
                            b.put_slice(d);
                        }
                    }
                }
            }
            Message::HasReply(bits) => {
                b.put_u32(bits.len() as u32);
                let mut packed = vec![0u8; bits.len().div_ceil(8)];
                for (i, &bit) in bits.iter().enumerate() {
                    if bit {
                        packed[i / 8] |= 1 << (i % 8);
                    }
                }
                b.put_slice(&packed);
            }
            Message::ListReply { entries, more } => {
                b.put_u32(entries.len() as u32);
                for e in entries {
                    b.put_slice(&e.hash.0);
                    b.put_u64(e.size);
                    b.put_u64(e.stored_unix);
                }
                b.put_u8(*more as u8);
            }
            Message::InfoReply(info) => {
                put_string(&mut b, &info.node_id);
                put_string(&mut b, &info.zone);
                put_string(&mut b, &info.version);
                b.put_u64(info.blocks);
                b.put_u64(info.bytes_used);
                b.put_u64(info.capacity);
                b.put_u64(info.free);
                b.put_u64(info.corrupt_detected);
            }
            Message::Error { code, message } => {
                b.put_u16(*code as u16);
                put_string(&mut b, message);
            }
        }
        let body_len = b.len() - HEADER_LEN + tail.as_ref().map_or(0, |t| t.len());
        b[4..8].copy_from_slice(&(body_len as u32).to_be_bytes());
        (b, tail)
    }

    /// Encodes into one contiguous buffer (tests and small messages).
    pub fn encode_to_vec(&self) -> Vec<u8> {
        let (head, tail) = self.encode();
        let mut v = head.to_vec();
        if let Some(t) = tail {
            v.extend_from_slice(&t);
        }
        v
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_hash() -> impl Strategy<Value = BlockHash> {
        any::<[u8; 32]>().prop_map(BlockHash)
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let s = "[a-z0-9-]{0,40}";
        prop_oneof![
            (arb_hash(), proptest::collection::vec(any::<u8>(), 0..2048)).prop_map(|(hash, d)| {
                Message::Put {
                    hash,
                    data: d.into(),
                }
            }),
            (
                arb_hash(),
                proptest::option::of((any::<u64>(), proptest::option::of(any::<u64>())))
            )
                .prop_map(|(hash, r)| Message::Get {
                    hash,
                    range: r.map(|(offset, len)| ByteRange { offset, len })
                }),
            proptest::collection::vec(arb_hash(), 0..50).prop_map(|hashes| Message::Has { hashes }),
            arb_hash().prop_map(|hash| Message::Delete { hash }),
            (
                proptest::option::of(arb_hash()),
                1u32..=MAX_LIST_PAGE as u32
            )
                .prop_map(|(after, limit)| Message::List { after, limit }),
            Just(Message::Info),
            Just(Message::Ok),
            proptest::collection::vec(any::<u8>(), 0..2048).prop_map(|d| Message::Data(d.into())),
            proptest::collection::vec(any::<bool>(), 0..100).prop_map(Message::HasReply),
            (
                proptest::collection::vec((arb_hash(), any::<u64>(), any::<u64>()), 0..20),
                any::<bool>()
            )
                .prop_map(|(e, more)| Message::ListReply {
                    entries: e
                        .into_iter()
                        .map(|(hash, size, stored_unix)| ListEntry {
                            hash,
                            size,
                            stored_unix
                        })
                        .collect(),
                    more
                }),
            proptest::collection::vec(arb_hash(), 0..20)
                .prop_map(|hashes| Message::Verify { hashes }),
            proptest::collection::vec(arb_hash(), 0..=MAX_GET_MANY)
                .prop_map(|hashes| Message::GetMany { hashes }),
            proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
                0..20
            )
            .prop_map(|b| Message::DataMany(b.into_iter().map(|d| d.map(Bytes::from)).collect())),
            (proptest::collection::vec(arb_hash(), 0..20), any::<u64>()).prop_map(
                |(hashes, older_than_unix)| Message::Collect {
                    hashes,
                    older_than_unix
                }
            ),
            (s, s, s, any::<[u64; 5]>()).prop_map(|(a, b, c, n)| Message::InfoReply(NodeInfo {
                node_id: a,
                zone: b,
                version: c,
                blocks: n[0],
                bytes_used: n[1],
                capacity: n[2],
                free: n[3],
                corrupt_detected: n[4],
            })),
            (1u16..=8, ".{0,100}").prop_map(|(c, m)| Message::Error {
                code: ErrorCode::from_u16(c),
                message: m
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any byte string decodes to a message or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode_frame(&bytes);
        }

        /// Arbitrary bodies behind a valid header (the interesting case: past the magic check).
        #[test]
        fn arbitrary_bodies_never_panic(kind in prop::sample::select(vec![
            1u8, 2, 3, 4, 5, 6, 7, 8, 9, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x7f]),
            body in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let mut frame = vec![b'T', b'W', WIRE_VERSION, kind];
            frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
            frame.extend_from_slice(&body);
            let _ = decode_frame(&frame);
        }

        #[test]
        fn encode_decode_roundtrip(msg in arb_message()) {
            let bytes = msg.encode_to_vec();
            prop_assert_eq!(decode_frame(&bytes), Ok(msg));
        }

        /// Every truncation of a valid frame is an error, never a panic or a wrong message.
        #[test]
        fn truncated_frames_are_errors(msg in arb_message(), cut in any::<prop::sample::Index>()) {
            let bytes = msg.encode_to_vec();
            let n = cut.index(bytes.len());
            prop_assert!(decode_frame(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn oversized_header_is_refused_before_reading_body() {
        let mut h = [0u8; HEADER_LEN];
        h[0..2].copy_from_slice(&MAGIC);
        h[2] = WIRE_VERSION;
        h[3] = MessageKind::Put as u8;
        h[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode_header(&h), Err(WireError::TooLarge { .. })));
        h[3] = MessageKind::Info as u8;
        h[4..8].copy_from_slice(&(MAX_SMALL_BODY as u32 + 1).to_be_bytes());
        assert!(matches!(decode_header(&h), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn wrong_version_and_magic_are_refused() {
        let mut frame = Message::Info.encode_to_vec();
        frame[2] = 1;
        assert_eq!(decode_frame(&frame), Err(WireError::BadVersion(1)));
        frame[0] = b'X';
        assert!(matches!(decode_frame(&frame), Err(WireError::BadMagic(_))));
    }
}
