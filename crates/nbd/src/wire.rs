//! NBD wire constants and messages, encoded to and decoded from bytes with
//! no I/O.
//!
//! Two layers, as for every fixed structure of the protocol: `Raw*` types
//! are the big-endian layouts, field for field (zerocopy, sizes asserted
//! against the spec's), and [`Request`], [`ReplyHeader`] and [`Chunk`] are
//! the validated values built from them.
//!
//! Names and values follow the NBD protocol document ("Values" section);
//! the extended-header layouts follow the `EXTENDED_HEADERS` extension as
//! implemented by qemu (8.1+) and libnbd (1.18+).

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, Unaligned};

use crate::error::ProtocolError;
pub use crate::types::{ChunkType, Command, ContextId, Cookie, Errno, HeaderMode, Opt, RepType};

/// `NBDMAGIC`, first 8 bytes of every server greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second magic of the newstyle greeting and prefix of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Second magic of the oldstyle greeting (`cliserv_magic`).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic that starts every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag bit 0: the server supports fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag bit 1: the server can omit the 124 zero bytes.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag bit 0: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag bit 1: the server must omit the 124 zero bytes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// `NBD_REQUEST_MAGIC`, compact request header.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_EXTENDED_REQUEST_MAGIC`, extended request header.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// `NBD_EXTENDED_REPLY_MAGIC`.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// `NBD_REPLY_FLAG_DONE`: the final chunk of a structured reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

/// `NBD_CMD_FLAG_FUA`: the write is on stable storage before the reply.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`: `NBD_CMD_WRITE_ZEROES` must not punch a hole.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`: at most one content chunk in the read reply.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`: one extent per context in the block status reply.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`: fail `NBD_CMD_WRITE_ZEROES` rather than
/// zeroing slowly.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Longest string the protocol allows (export names, messages, context names).
pub const MAX_STRING: usize = 4096;
/// Largest payload we accept for an error chunk: error, message length,
/// a 4096-byte message and an offset.
pub const MAX_ERROR_PAYLOAD: u64 = (size_of::<RawErrorPrefix>() + MAX_STRING + 8) as u64;
/// Largest number of block status descriptors we accept in one chunk. The
/// spec says servers SHOULD NOT send more than 2^20.
pub const MAX_DESCRIPTORS: u64 = 1 << 20;

/// `NBD_INFO_EXPORT` (0).
pub const NBD_INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME` (1).
pub const NBD_INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION` (2).
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE` (3).
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// The server's greeting (spec: "Newstyle negotiation").
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawGreeting {
    /// `NBDMAGIC`.
    pub magic: U64,
    /// `IHAVEOPT` (newstyle) or the oldstyle magic.
    pub newstyle: U64,
    /// Handshake flags (`NBD_FLAG_FIXED_NEWSTYLE`, `NBD_FLAG_NO_ZEROES`).
    pub flags: U16,
}
const _: () = assert!(size_of::<RawGreeting>() == 18);

/// The header of an option request; `length` bytes of data follow.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawOptionRequest {
    /// `IHAVEOPT`.
    pub magic: U64,
    /// Option code.
    pub option: U32,
    /// Bytes of option data.
    pub length: U32,
}
const _: () = assert!(size_of::<RawOptionRequest>() == 16);

/// The header of an option reply; `length` bytes of payload follow.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawOptionReply {
    /// `0x3e889045565a9`.
    pub magic: U64,
    /// The option answered.
    pub option: U32,
    /// `NBD_REP_*`.
    pub reply_type: U32,
    /// Bytes of payload.
    pub length: U32,
}
const _: () = assert!(size_of::<RawOptionReply>() == 20);

/// The export's size and transmission flags: the body of `NBD_INFO_EXPORT`
/// and the start of the `NBD_OPT_EXPORT_NAME` reply.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawExportInfo {
    /// Export size in bytes.
    pub size: U64,
    /// Transmission flags.
    pub flags: U16,
}
const _: () = assert!(size_of::<RawExportInfo>() == 10);

/// The body of `NBD_INFO_BLOCK_SIZE`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawBlockSize {
    /// Minimum block size.
    pub minimum: U32,
    /// Preferred block size.
    pub preferred: U32,
    /// Maximum payload size.
    pub maximum: U32,
}
const _: () = assert!(size_of::<RawBlockSize>() == 12);

/// A compact request header (structured or simple replies).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawCompactRequest {
    /// `NBD_REQUEST_MAGIC`.
    pub magic: U32,
    /// `NBD_CMD_FLAG_*`.
    pub flags: U16,
    /// `NBD_CMD_*`.
    pub command: U16,
    /// Echoed in the reply.
    pub cookie: U64,
    /// Offset into the export.
    pub offset: U64,
    /// Length (32 bits).
    pub length: U32,
}
const _: () = assert!(size_of::<RawCompactRequest>() == 28);

/// An extended request header (`NBD_OPT_EXTENDED_HEADERS`).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawExtendedRequest {
    /// `NBD_EXTENDED_REQUEST_MAGIC`.
    pub magic: U32,
    /// `NBD_CMD_FLAG_*`.
    pub flags: U16,
    /// `NBD_CMD_*`.
    pub command: U16,
    /// Echoed in the reply.
    pub cookie: U64,
    /// Offset into the export.
    pub offset: U64,
    /// Effect length (64 bits).
    pub length: U64,
}
const _: () = assert!(size_of::<RawExtendedRequest>() == 32);

/// A simple reply; a successful simple `NBD_CMD_READ` reply is followed by its data.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSimpleReply {
    /// `NBD_SIMPLE_REPLY_MAGIC`.
    pub magic: U32,
    /// 0 or an `NBD_E*` value.
    pub error: U32,
    /// The request's cookie.
    pub cookie: U64,
}
const _: () = assert!(size_of::<RawSimpleReply>() == 16);

/// A structured reply chunk header; `length` bytes of payload follow.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawStructuredReply {
    /// `NBD_STRUCTURED_REPLY_MAGIC`.
    pub magic: U32,
    /// `NBD_REPLY_FLAG_*`.
    pub flags: U16,
    /// `NBD_REPLY_TYPE_*`.
    pub chunk_type: U16,
    /// The request's cookie.
    pub cookie: U64,
    /// Bytes of payload (32 bits).
    pub length: U32,
}
const _: () = assert!(size_of::<RawStructuredReply>() == 20);

/// An extended reply chunk header; `length` bytes of payload follow.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawExtendedReply {
    /// `NBD_EXTENDED_REPLY_MAGIC`.
    pub magic: U32,
    /// `NBD_REPLY_FLAG_*`.
    pub flags: U16,
    /// `NBD_REPLY_TYPE_*`.
    pub chunk_type: U16,
    /// The request's cookie.
    pub cookie: U64,
    /// The request's offset, echoed.
    pub offset: U64,
    /// Bytes of payload (64 bits).
    pub length: U64,
}
const _: () = assert!(size_of::<RawExtendedReply>() == 32);

/// The payload of `NBD_REPLY_TYPE_OFFSET_HOLE`.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawOffsetHole {
    /// Offset of the hole.
    pub offset: U64,
    /// Its length, nonzero.
    pub length: U32,
}
const _: () = assert!(size_of::<RawOffsetHole>() == 12);

/// The start of every error chunk's payload; the message follows.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawErrorPrefix {
    /// `NBD_E*`, nonzero.
    pub error: U32,
    /// Bytes of message.
    pub message_length: U16,
}
const _: () = assert!(size_of::<RawErrorPrefix>() == 6);

/// The start of an `NBD_REPLY_TYPE_BLOCK_STATUS` payload; descriptors follow.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawStatusPrefix {
    /// Metadata context ID.
    pub context: U32,
}
const _: () = assert!(size_of::<RawStatusPrefix>() == 4);

/// The start of an `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` payload; extended
/// descriptors follow.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawStatusExtPrefix {
    /// Metadata context ID.
    pub context: U32,
    /// Number of descriptors.
    pub count: U32,
}
const _: () = assert!(size_of::<RawStatusExtPrefix>() == 8);

/// A block status descriptor (compact headers).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawDescriptor {
    /// Length of the extent, nonzero.
    pub length: U32,
    /// Context-defined status flags.
    pub flags: U32,
}
const _: () = assert!(size_of::<RawDescriptor>() == 8);

/// A block status descriptor (extended headers).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, Unaligned)]
#[repr(C)]
pub struct RawExtDescriptor {
    /// Length of the extent, nonzero.
    pub length: U64,
    /// Context-defined status flags.
    pub flags: U64,
}
const _: () = assert!(size_of::<RawExtDescriptor>() == 16);

/// Bytes in a compact request header (magic, flags, type, cookie, offset, u32 length).
pub const COMPACT_REQUEST_LEN: usize = size_of::<RawCompactRequest>();
/// Bytes in an extended request header (as compact, with a u64 length).
pub const EXTENDED_REQUEST_LEN: usize = size_of::<RawExtendedRequest>();
/// Bytes in a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = size_of::<RawSimpleReply>();
/// Bytes in a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = size_of::<RawStructuredReply>();
/// Bytes in an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = size_of::<RawExtendedReply>();

/// Decodes a fixed layout from exactly its size in bytes.
pub(crate) fn decode<T: FromBytes>(what: &'static str, buf: &[u8]) -> Result<T, ProtocolError> {
    T::read_from_bytes(buf).map_err(|_| ProtocolError::WrongLength {
        what,
        expected: size_of::<T>(),
        found: buf.len(),
    })
}

/// Splits a fixed layout off the front of `buf`.
pub(crate) fn decode_prefix<'a, T: FromBytes>(
    what: &'static str,
    buf: &'a [u8],
) -> Result<(T, &'a [u8]), ProtocolError> {
    T::read_from_prefix(buf).map_err(|_| ProtocolError::WrongLength {
        what,
        expected: size_of::<T>(),
        found: buf.len(),
    })
}

/// The 16 transmission flags sent with the export size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    /// Bit 0, `NBD_FLAG_HAS_FLAGS`: MUST always be 1.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Bit 1, `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// Bit 2, `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// Bit 3, `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Bit 4, `NBD_FLAG_ROTATIONAL`.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// Bit 5, `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// Bit 6, `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// Bit 7, `NBD_FLAG_SEND_DF`.
    pub const SEND_DF: u16 = 1 << 7;
    /// Bit 8, `NBD_FLAG_CAN_MULTI_CONN`.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// Bit 10, `NBD_FLAG_SEND_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// Bit 11, `NBD_FLAG_SEND_FAST_ZERO`.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;

    fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }
    /// The export is read-only.
    pub fn read_only(self) -> bool {
        self.has(Self::READ_ONLY)
    }
    /// The server supports `NBD_CMD_FLUSH`.
    pub fn can_flush(self) -> bool {
        self.has(Self::SEND_FLUSH)
    }
    /// The server supports `NBD_CMD_FLAG_FUA`.
    pub fn can_fua(self) -> bool {
        self.has(Self::SEND_FUA)
    }
    /// The export behaves like a rotational medium.
    pub fn rotational(self) -> bool {
        self.has(Self::ROTATIONAL)
    }
    /// The server supports `NBD_CMD_TRIM`.
    pub fn can_trim(self) -> bool {
        self.has(Self::SEND_TRIM)
    }
    /// The server supports `NBD_CMD_WRITE_ZEROES`.
    pub fn can_zero(self) -> bool {
        self.has(Self::SEND_WRITE_ZEROES)
    }
    /// The server supports `NBD_CMD_FLAG_DF` on reads.
    pub fn can_df(self) -> bool {
        self.has(Self::SEND_DF)
    }
    /// Several connections to this export see one consistent cache.
    pub fn can_multi_conn(self) -> bool {
        self.has(Self::CAN_MULTI_CONN)
    }
    /// The server advertises `NBD_CMD_CACHE`.
    pub fn can_cache(self) -> bool {
        self.has(Self::SEND_CACHE)
    }
    /// The server supports `NBD_CMD_FLAG_FAST_ZERO`.
    pub fn can_fast_zero(self) -> bool {
        self.has(Self::SEND_FAST_ZERO)
    }
}

impl HeaderMode {
    /// Bytes in one request header in this mode.
    pub fn request_len(self) -> usize {
        match self {
            HeaderMode::Extended => EXTENDED_REQUEST_LEN,
            _ => COMPACT_REQUEST_LEN,
        }
    }
}

/// A transmission-phase request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// What to do.
    pub command: Command,
    /// Echoed by the server in every reply to this request.
    pub cookie: Cookie,
    /// First byte of the export concerned.
    pub offset: u64,
    /// Number of bytes concerned (the *effect length*).
    pub length: u64,
}

impl Request {
    /// Appends the header to `out`: 28 bytes in compact modes, 32 bytes in
    /// extended mode.
    ///
    /// Fails if the length does not fit the 32-bit field of a compact header.
    pub fn encode(&self, mode: HeaderMode, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
        match mode {
            HeaderMode::Extended => out.extend_from_slice(
                RawExtendedRequest {
                    magic: EXTENDED_REQUEST_MAGIC.into(),
                    flags: self.flags.into(),
                    command: self.command.0.into(),
                    cookie: self.cookie.0.into(),
                    offset: self.offset.into(),
                    length: self.length.into(),
                }
                .as_bytes(),
            ),
            HeaderMode::Simple | HeaderMode::Structured => {
                let length =
                    u32::try_from(self.length).map_err(|_| ProtocolError::LengthTooLarge {
                        length: self.length,
                        max: u32::MAX.into(),
                    })?;
                out.extend_from_slice(
                    RawCompactRequest {
                        magic: REQUEST_MAGIC.into(),
                        flags: self.flags.into(),
                        command: self.command.0.into(),
                        cookie: self.cookie.0.into(),
                        offset: self.offset.into(),
                        length: length.into(),
                    }
                    .as_bytes(),
                );
            }
        }
        Ok(())
    }

    /// Parses a request header (compact or extended, told apart by the
    /// magic); the server side of [`Request::encode`], used by test servers.
    pub fn parse(buf: &[u8]) -> Result<Request, ProtocolError> {
        let (magic, _) = decode_prefix::<U32>("request header", buf)?;
        match magic.get() {
            REQUEST_MAGIC => {
                let r: RawCompactRequest = decode("request header", buf)?;
                Ok(Request {
                    flags: r.flags.get(),
                    command: Command(r.command.get()),
                    cookie: Cookie(r.cookie.get()),
                    offset: r.offset.get(),
                    length: r.length.get().into(),
                })
            }
            EXTENDED_REQUEST_MAGIC => {
                let r: RawExtendedRequest = decode("extended request header", buf)?;
                Ok(Request {
                    flags: r.flags.get(),
                    command: Command(r.command.get()),
                    cookie: Cookie(r.cookie.get()),
                    offset: r.offset.get(),
                    length: r.length.get(),
                })
            }
            found => Err(ProtocolError::BadMagic {
                what: "request",
                expected: REQUEST_MAGIC.into(),
                found: found.into(),
            }),
        }
    }
}

/// The header of one reply message: a simple reply or a structured
/// (compact or extended) chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply; for a successful `NBD_CMD_READ` the requested
    /// number of data bytes follows.
    Simple {
        /// Cookie of the request.
        cookie: Cookie,
        /// 0 on success.
        error: u32,
    },
    /// A structured reply chunk; `payload_len` bytes follow.
    Chunk(ChunkHeader),
}

/// The header of a structured or extended reply chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// `NBD_REPLY_FLAG_*`; unknown flags are ignored, as the spec requires.
    pub flags: u16,
    /// How to read the payload.
    pub chunk_type: ChunkType,
    /// Cookie of the request.
    pub cookie: Cookie,
    /// Extended headers only: the request's offset, echoed.
    pub offset: Option<u64>,
    /// Bytes of payload after the header.
    pub payload_len: u64,
}

impl ChunkHeader {
    /// `NBD_REPLY_FLAG_DONE` is set: no more chunks for this cookie.
    pub fn done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }
}

impl ReplyHeader {
    /// Total header length (magic included) for a message starting with
    /// `magic`, or why that magic is wrong in `mode`.
    ///
    /// A client reads 4 bytes, calls this, then reads the rest.
    pub fn len_for_magic(magic: [u8; 4], mode: HeaderMode) -> Result<usize, ProtocolError> {
        let m = u32::from_be_bytes(magic);
        match (m, mode) {
            (SIMPLE_REPLY_MAGIC, HeaderMode::Simple | HeaderMode::Structured) => {
                Ok(SIMPLE_REPLY_LEN)
            }
            (STRUCTURED_REPLY_MAGIC, HeaderMode::Structured) => Ok(STRUCTURED_REPLY_LEN),
            (EXTENDED_REPLY_MAGIC, HeaderMode::Extended) => Ok(EXTENDED_REPLY_LEN),
            (SIMPLE_REPLY_MAGIC | STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC, _) => {
                Err(ProtocolError::UnexpectedReplyMagic { magic: m, mode })
            }
            _ => Err(ProtocolError::BadMagic {
                what: "reply",
                expected: match mode {
                    HeaderMode::Simple => SIMPLE_REPLY_MAGIC,
                    HeaderMode::Structured => STRUCTURED_REPLY_MAGIC,
                    HeaderMode::Extended => EXTENDED_REPLY_MAGIC,
                }
                .into(),
                found: m.into(),
            }),
        }
    }

    /// Parses a whole reply header (magic included).
    pub fn parse(buf: &[u8], mode: HeaderMode) -> Result<ReplyHeader, ProtocolError> {
        let (magic, _) = decode_prefix::<[u8; 4]>("reply header", buf)?;
        Self::len_for_magic(magic, mode)?;
        Ok(match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let r: RawSimpleReply = decode("simple reply header", buf)?;
                ReplyHeader::Simple {
                    error: r.error.get(),
                    cookie: Cookie(r.cookie.get()),
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let r: RawStructuredReply = decode("structured reply header", buf)?;
                ReplyHeader::Chunk(ChunkHeader {
                    flags: r.flags.get(),
                    chunk_type: ChunkType(r.chunk_type.get()),
                    cookie: Cookie(r.cookie.get()),
                    offset: None,
                    payload_len: r.length.get().into(),
                })
            }
            _ => {
                let r: RawExtendedReply = decode("extended reply header", buf)?;
                ReplyHeader::Chunk(ChunkHeader {
                    flags: r.flags.get(),
                    chunk_type: ChunkType(r.chunk_type.get()),
                    cookie: Cookie(r.cookie.get()),
                    offset: Some(r.offset.get()),
                    payload_len: r.length.get(),
                })
            }
        })
    }

    /// Appends this header to `out`; the server side of
    /// [`ReplyHeader::parse`], used by test servers. A chunk with
    /// `offset: Some(_)` is written as an extended chunk.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            ReplyHeader::Simple { cookie, error } => out.extend_from_slice(
                RawSimpleReply {
                    magic: SIMPLE_REPLY_MAGIC.into(),
                    error: error.into(),
                    cookie: cookie.0.into(),
                }
                .as_bytes(),
            ),
            ReplyHeader::Chunk(c) => match c.offset {
                Some(offset) => out.extend_from_slice(
                    RawExtendedReply {
                        magic: EXTENDED_REPLY_MAGIC.into(),
                        flags: c.flags.into(),
                        chunk_type: c.chunk_type.0.into(),
                        cookie: c.cookie.0.into(),
                        offset: offset.into(),
                        length: c.payload_len.into(),
                    }
                    .as_bytes(),
                ),
                None => out.extend_from_slice(
                    RawStructuredReply {
                        magic: STRUCTURED_REPLY_MAGIC.into(),
                        flags: c.flags.into(),
                        chunk_type: c.chunk_type.0.into(),
                        cookie: c.cookie.0.into(),
                        // Test servers may want to send a lying length;
                        // truncation is their business.
                        length: (c.payload_len as u32).into(),
                    }
                    .as_bytes(),
                ),
            },
        }
    }
}

/// One block status descriptor: `length` bytes with status `flags`, whose
/// meaning depends on the metadata context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Bytes described; never 0 after parsing.
    pub length: u64,
    /// Context-defined status flags (32 bits in compact mode).
    pub flags: u64,
}

/// The payload of a structured reply chunk other than
/// `NBD_REPLY_TYPE_OFFSET_DATA` (whose data the client reads in place; see
/// [`ChunkHeader`] and [`Chunk::data_prefix`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// `NBD_REPLY_TYPE_NONE`.
    None,
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: `length` bytes at `offset` read as zeros.
    OffsetHole {
        /// Absolute export offset.
        offset: u64,
        /// Hole size, nonzero.
        length: u32,
    },
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` or `_EXT`.
    BlockStatus {
        /// Which negotiated context this describes.
        context: ContextId,
        /// Consecutive extents from the request's offset.
        descriptors: Vec<Descriptor>,
    },
    /// `NBD_REPLY_TYPE_ERROR`, or an unknown error chunk type.
    Error {
        /// Nonzero error value.
        errno: Errno,
        /// Human-readable message, possibly empty.
        message: String,
    },
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    ErrorOffset {
        /// Nonzero error value.
        errno: Errno,
        /// Human-readable message, possibly empty.
        message: String,
        /// Where the error happened, inside the request.
        offset: u64,
    },
}

impl Chunk {
    /// Bytes of `NBD_REPLY_TYPE_OFFSET_DATA` payload before the data (the
    /// 64-bit offset).
    pub const DATA_PREFIX_LEN: usize = size_of::<U64>();

    /// Checks a chunk header's payload length for its type before the
    /// payload is read or allocated. For `OFFSET_DATA`, returns the number
    /// of data bytes (checked against `max_data`); for other types, the
    /// payload length.
    pub fn check_len(
        header: &ChunkHeader,
        mode: HeaderMode,
        max_data: u64,
    ) -> Result<u64, ProtocolError> {
        let len = header.payload_len;
        let t = header.chunk_type;
        let bad = |expected: &'static str| ProtocolError::BadChunkLength {
            chunk_type: t,
            length: len,
            expected,
        };
        let too_long = |max: u64| ProtocolError::ChunkTooLong {
            chunk_type: t,
            length: len,
            max,
        };
        let wrong_mode = || ProtocolError::UnexpectedChunkType {
            chunk_type: t,
            mode,
        };
        let prefix = Self::DATA_PREFIX_LEN as u64;
        let hole = size_of::<RawOffsetHole>() as u64;
        let (status, status_ext) = (
            size_of::<RawStatusPrefix>() as u64,
            size_of::<RawStatusExtPrefix>() as u64,
        );
        let (desc, desc_ext) = (
            size_of::<RawDescriptor>() as u64,
            size_of::<RawExtDescriptor>() as u64,
        );
        let error = size_of::<RawErrorPrefix>() as u64;
        match t {
            ChunkType::NONE => (len == 0).then_some(0).ok_or_else(|| bad("0")),
            ChunkType::OFFSET_DATA => {
                if len <= prefix {
                    return Err(bad("at least 9"));
                }
                let data = len - prefix;
                if data > max_data {
                    return Err(too_long(max_data + prefix));
                }
                Ok(data)
            }
            ChunkType::OFFSET_HOLE => (len == hole).then_some(hole).ok_or_else(|| bad("12")),
            ChunkType::BLOCK_STATUS if mode == HeaderMode::Extended => Err(wrong_mode()),
            ChunkType::BLOCK_STATUS_EXT if mode != HeaderMode::Extended => Err(wrong_mode()),
            ChunkType::BLOCK_STATUS => {
                if len < status + desc || !(len - status).is_multiple_of(desc) {
                    return Err(bad("4 + a positive multiple of 8"));
                }
                let max = status + desc * MAX_DESCRIPTORS;
                if len > max {
                    return Err(too_long(max));
                }
                Ok(len)
            }
            ChunkType::BLOCK_STATUS_EXT => {
                if len < status_ext + desc_ext || !(len - status_ext).is_multiple_of(desc_ext) {
                    return Err(bad("8 + a positive multiple of 16"));
                }
                let max = status_ext + desc_ext * MAX_DESCRIPTORS;
                if len > max {
                    return Err(too_long(max));
                }
                Ok(len)
            }
            ChunkType::ERROR_OFFSET if len < error + 8 => Err(bad("at least 14")),
            _ if t.is_error() => {
                if len < error {
                    return Err(bad("at least 6"));
                }
                if len > MAX_ERROR_PAYLOAD {
                    return Err(too_long(MAX_ERROR_PAYLOAD));
                }
                Ok(len)
            }
            _ => Err(ProtocolError::UnknownChunkType { chunk_type: t }),
        }
    }

    /// Parses the 8-byte prefix of an `OFFSET_DATA` payload: the offset.
    pub fn data_prefix(buf: &[u8]) -> Result<u64, ProtocolError> {
        Ok(decode::<U64>("offset data prefix", buf)?.get())
    }

    /// Parses the payload of a chunk other than `OFFSET_DATA`. Call
    /// [`Chunk::check_len`] on the header first; `payload` must be exactly
    /// `header.payload_len` bytes.
    pub fn parse(
        header: &ChunkHeader,
        mode: HeaderMode,
        payload: &[u8],
    ) -> Result<Chunk, ProtocolError> {
        Self::check_len(header, mode, 0).map_err(|e| match e {
            // check_len with max_data 0 refuses any data chunk: report it
            // as a misuse of this function instead.
            ProtocolError::ChunkTooLong { chunk_type, .. }
                if chunk_type == ChunkType::OFFSET_DATA =>
            {
                ProtocolError::UnexpectedChunkType { chunk_type, mode }
            }
            e => e,
        })?;
        if payload.len() as u64 != header.payload_len {
            return Err(ProtocolError::WrongLength {
                what: "chunk payload",
                expected: usize::try_from(header.payload_len).unwrap_or(usize::MAX),
                found: payload.len(),
            });
        }
        let t = header.chunk_type;
        Ok(match t {
            ChunkType::NONE => {
                if !header.done() {
                    return Err(ProtocolError::NoneWithoutDone);
                }
                Chunk::None
            }
            ChunkType::OFFSET_HOLE => {
                let h: RawOffsetHole = decode("offset hole payload", payload)?;
                if h.length.get() == 0 {
                    return Err(ProtocolError::EmptyHole);
                }
                Chunk::OffsetHole {
                    offset: h.offset.get(),
                    length: h.length.get(),
                }
            }
            ChunkType::BLOCK_STATUS => {
                let (p, rest) = decode_prefix::<RawStatusPrefix>("block status payload", payload)?;
                let raw = <[RawDescriptor]>::ref_from_bytes(rest).map_err(|_| {
                    ProtocolError::BadChunkLength {
                        chunk_type: t,
                        length: header.payload_len,
                        expected: "4 + a positive multiple of 8",
                    }
                })?;
                Chunk::BlockStatus {
                    context: ContextId(p.context.get()),
                    descriptors: raw
                        .iter()
                        .map(|d| Descriptor {
                            length: d.length.get().into(),
                            flags: d.flags.get().into(),
                        })
                        .collect(),
                }
            }
            ChunkType::BLOCK_STATUS_EXT => {
                let (p, rest) =
                    decode_prefix::<RawStatusExtPrefix>("block status payload", payload)?;
                let raw = <[RawExtDescriptor]>::ref_from_bytes(rest).map_err(|_| {
                    ProtocolError::BadChunkLength {
                        chunk_type: t,
                        length: header.payload_len,
                        expected: "8 + a positive multiple of 16",
                    }
                })?;
                if p.count.get() as usize != raw.len() {
                    return Err(ProtocolError::DescriptorCount {
                        count: p.count.get(),
                        fits: raw.len(),
                    });
                }
                Chunk::BlockStatus {
                    context: ContextId(p.context.get()),
                    descriptors: raw
                        .iter()
                        .map(|d| Descriptor {
                            length: d.length.get(),
                            flags: d.flags.get(),
                        })
                        .collect(),
                }
            }
            _ => Self::parse_error(t, payload)?,
        })
    }

    /// An error chunk: error, message length, message, and for
    /// `ERROR_OFFSET` the offset.
    fn parse_error(t: ChunkType, payload: &[u8]) -> Result<Chunk, ProtocolError> {
        let (p, rest) = decode_prefix::<RawErrorPrefix>("error chunk payload", payload)?;
        let errno = Errno(p.error.get());
        if errno.0 == 0 {
            return Err(ProtocolError::ZeroErrno { chunk_type: t });
        }
        let msg_len = usize::from(p.message_length.get());
        let trailer = if t == ChunkType::ERROR_OFFSET { 8 } else { 0 };
        let available = rest.len() - trailer;
        let too_long = ProtocolError::ErrorMessageTooLong {
            message_length: msg_len,
            available,
        };
        if msg_len > available {
            return Err(too_long);
        }
        let (msg, tail) = rest.split_at(msg_len);
        let message = String::from_utf8_lossy(msg).into_owned();
        if t == ChunkType::ERROR_OFFSET {
            if msg_len != available {
                return Err(too_long);
            }
            return Ok(Chunk::ErrorOffset {
                errno,
                message,
                offset: decode::<U64>("error offset", tail)?.get(),
            });
        }
        // ERROR, or an unknown error type: its trailing fields are unknown
        // to us, so the message is all we keep.
        Ok(Chunk::Error { errno, message })
    }
}

/// The `u16` at `at` in `b`, big-endian. Callers check the length first.
pub(crate) fn read_be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
/// The `u32` at `at` in `b`, big-endian.
pub(crate) fn read_be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_request_bytes() {
        let r = Request {
            flags: NBD_CMD_FLAG_REQ_ONE,
            command: Command::BLOCK_STATUS,
            cookie: Cookie(0x0102_0304_0506_0708),
            offset: 0x1000,
            length: 0x2000,
        };
        let mut out = Vec::new();
        r.encode(HeaderMode::Structured, &mut out).unwrap();
        #[rustfmt::skip]
        let expected = [
            0x25, 0x60, 0x95, 0x13, // NBD_REQUEST_MAGIC
            0x00, 0x08, // flags: NBD_CMD_FLAG_REQ_ONE
            0x00, 0x07, // type: NBD_CMD_BLOCK_STATUS
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // cookie
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, // offset
            0x00, 0x00, 0x20, 0x00, // length (32 bits)
        ];
        assert_eq!(out, expected);
        assert_eq!(Request::parse(&out).unwrap(), r);
    }

    #[test]
    fn extended_request_bytes() {
        let r = Request {
            flags: 0,
            command: Command::READ,
            cookie: Cookie(9),
            offset: 0,
            length: 0x1_0000_0000,
        };
        let mut out = Vec::new();
        r.encode(HeaderMode::Extended, &mut out).unwrap();
        #[rustfmt::skip]
        let expected = [
            0x21, 0xe4, 0x1c, 0x71, // NBD_EXTENDED_REQUEST_MAGIC
            0x00, 0x00, // flags
            0x00, 0x00, // type: NBD_CMD_READ
            0, 0, 0, 0, 0, 0, 0, 9, // cookie
            0, 0, 0, 0, 0, 0, 0, 0, // offset
            0, 0, 0, 1, 0, 0, 0, 0, // length (64 bits): 4 GiB
        ];
        assert_eq!(out, expected);
        assert_eq!(Request::parse(&out).unwrap(), r);
    }

    #[test]
    fn compact_request_refuses_64_bit_length() {
        let r = Request {
            flags: 0,
            command: Command::BLOCK_STATUS,
            cookie: Cookie(1),
            offset: 0,
            length: 1 << 32,
        };
        let err = r
            .encode(HeaderMode::Structured, &mut Vec::new())
            .unwrap_err();
        assert!(matches!(err, ProtocolError::LengthTooLarge { .. }), "{err}");
    }

    #[test]
    fn simple_reply_header() {
        #[rustfmt::skip]
        let buf = [
            0x67, 0x44, 0x66, 0x98, // NBD_SIMPLE_REPLY_MAGIC
            0x00, 0x00, 0x00, 0x05, // error: NBD_EIO
            0, 0, 0, 0, 0, 0, 0, 7, // cookie
        ];
        assert_eq!(
            ReplyHeader::len_for_magic(buf[..4].try_into().unwrap(), HeaderMode::Structured)
                .unwrap(),
            16
        );
        assert_eq!(
            ReplyHeader::parse(&buf, HeaderMode::Structured).unwrap(),
            ReplyHeader::Simple {
                cookie: Cookie(7),
                error: 5
            }
        );
    }

    #[test]
    fn structured_and_extended_chunk_headers() {
        #[rustfmt::skip]
        let compact = [
            0x66, 0x8e, 0x33, 0xef, // NBD_STRUCTURED_REPLY_MAGIC
            0x00, 0x01, // flags: NBD_REPLY_FLAG_DONE
            0x00, 0x02, // type: NBD_REPLY_TYPE_OFFSET_HOLE
            0, 0, 0, 0, 0, 0, 0, 3, // cookie
            0x00, 0x00, 0x00, 0x0c, // payload length 12
        ];
        let h = ReplyHeader::parse(&compact, HeaderMode::Structured).unwrap();
        let ReplyHeader::Chunk(c) = h else { panic!() };
        assert!(c.done());
        assert_eq!(c.chunk_type, ChunkType::OFFSET_HOLE);
        assert_eq!(c.payload_len, 12);
        let mut round = Vec::new();
        h.encode(&mut round);
        assert_eq!(round, compact);

        #[rustfmt::skip]
        let extended = [
            0x6e, 0x8a, 0x27, 0x8c, // NBD_EXTENDED_REPLY_MAGIC
            0x00, 0x00, // flags
            0x00, 0x06, // type: NBD_REPLY_TYPE_BLOCK_STATUS_EXT
            0, 0, 0, 0, 0, 0, 0, 4, // cookie
            0, 0, 0, 0, 0, 0, 0x10, 0, // offset echoed
            0, 0, 0, 0, 0, 0, 0, 24, // payload length (64 bits)
        ];
        let h = ReplyHeader::parse(&extended, HeaderMode::Extended).unwrap();
        let ReplyHeader::Chunk(c) = h else { panic!() };
        assert_eq!(c.offset, Some(0x1000));
        assert_eq!(c.payload_len, 24);
        let mut round = Vec::new();
        h.encode(&mut round);
        assert_eq!(round, extended);
    }

    #[test]
    fn reply_magic_must_match_mode() {
        let simple = SIMPLE_REPLY_MAGIC.to_be_bytes();
        let structured = STRUCTURED_REPLY_MAGIC.to_be_bytes();
        assert!(matches!(
            ReplyHeader::len_for_magic(simple, HeaderMode::Extended),
            Err(ProtocolError::UnexpectedReplyMagic { .. })
        ));
        assert!(matches!(
            ReplyHeader::len_for_magic(structured, HeaderMode::Simple),
            Err(ProtocolError::UnexpectedReplyMagic { .. })
        ));
        assert!(matches!(
            ReplyHeader::len_for_magic([0xde, 0xad, 0xbe, 0xef], HeaderMode::Structured),
            Err(ProtocolError::BadMagic {
                found: 0xdead_beef,
                ..
            })
        ));
    }

    fn header(t: ChunkType, len: u64) -> ChunkHeader {
        ChunkHeader {
            flags: NBD_REPLY_FLAG_DONE,
            chunk_type: t,
            cookie: Cookie(1),
            offset: None,
            payload_len: len,
        }
    }

    #[test]
    fn block_status_payload() {
        #[rustfmt::skip]
        let payload = [
            0, 0, 0, 1, // metadata context id 1
            0, 0, 0x10, 0, 0, 0, 0, 0, // 4096 bytes, flags 0 (data)
            0, 0, 0x20, 0, 0, 0, 0, 3, // 8192 bytes, NBD_STATE_HOLE|NBD_STATE_ZERO
        ];
        let h = header(ChunkType::BLOCK_STATUS, payload.len() as u64);
        let c = Chunk::parse(&h, HeaderMode::Structured, &payload).unwrap();
        assert_eq!(
            c,
            Chunk::BlockStatus {
                context: ContextId(1),
                descriptors: vec![
                    Descriptor {
                        length: 4096,
                        flags: 0
                    },
                    Descriptor {
                        length: 8192,
                        flags: 3
                    },
                ]
            }
        );
    }

    #[test]
    fn block_status_ext_payload() {
        #[rustfmt::skip]
        let payload = [
            0, 0, 0, 2, // metadata context id 2
            0, 0, 0, 1, // descriptor count 1
            0, 0, 0, 1, 0, 0, 0, 0, // length 4 GiB (64 bits)
            0, 0, 0, 0, 0, 0, 0, 1, // flags (64 bits): dirty
        ];
        let h = header(ChunkType::BLOCK_STATUS_EXT, payload.len() as u64);
        let c = Chunk::parse(&h, HeaderMode::Extended, &payload).unwrap();
        assert_eq!(
            c,
            Chunk::BlockStatus {
                context: ContextId(2),
                descriptors: vec![Descriptor {
                    length: 1 << 32,
                    flags: 1
                }]
            }
        );
        // Wrong count field.
        let mut bad = payload;
        bad[7] = 2;
        assert!(matches!(
            Chunk::parse(&h, HeaderMode::Extended, &bad),
            Err(ProtocolError::DescriptorCount { count: 2, fits: 1 })
        ));
        // Compact type in extended mode and vice versa.
        assert!(Chunk::check_len(&h, HeaderMode::Structured, 0).is_err());
        let h5 = header(ChunkType::BLOCK_STATUS, 12);
        assert!(Chunk::check_len(&h5, HeaderMode::Extended, 0).is_err());
    }

    #[test]
    fn hole_and_error_payloads() {
        #[rustfmt::skip]
        let hole = [
            0, 0, 0, 0, 0, 0, 0x02, 0, // offset 512
            0, 0, 0x02, 0, // hole size 512
        ];
        let c = Chunk::parse(
            &header(ChunkType::OFFSET_HOLE, 12),
            HeaderMode::Structured,
            &hole,
        )
        .unwrap();
        assert_eq!(
            c,
            Chunk::OffsetHole {
                offset: 512,
                length: 512
            }
        );

        #[rustfmt::skip]
        let err = [
            0, 0, 0, 5, // error: NBD_EIO
            0, 2, // message length 2
            b'n', b'o', // message
            0, 0, 0, 0, 0, 0, 0x30, 0, // offset 0x3000
        ];
        let c = Chunk::parse(
            &header(ChunkType::ERROR_OFFSET, err.len() as u64),
            HeaderMode::Structured,
            &err,
        )
        .unwrap();
        assert_eq!(
            c,
            Chunk::ErrorOffset {
                errno: Errno::EIO,
                message: "no".into(),
                offset: 0x3000
            }
        );

        #[rustfmt::skip]
        let liar = [
            0, 0, 0, 5, // error: NBD_EIO
            0x10, 0, // message length 4096, more than the payload holds
            b'x', // one byte of message
        ];
        assert!(matches!(
            Chunk::parse(
                &header(ChunkType::ERROR, liar.len() as u64),
                HeaderMode::Structured,
                &liar
            ),
            Err(ProtocolError::ErrorMessageTooLong { .. })
        ));
    }

    #[test]
    fn lengths_checked_before_reading() {
        // OFFSET_DATA bigger than what was asked for.
        let h = header(ChunkType::OFFSET_DATA, 8 + 4096);
        assert_eq!(
            Chunk::check_len(&h, HeaderMode::Structured, 4096).unwrap(),
            4096
        );
        assert!(matches!(
            Chunk::check_len(&h, HeaderMode::Structured, 4095),
            Err(ProtocolError::ChunkTooLong { .. })
        ));
        // An error chunk claiming 4 GiB.
        let h = header(ChunkType::ERROR, u32::MAX.into());
        assert!(matches!(
            Chunk::check_len(&h, HeaderMode::Structured, 0),
            Err(ProtocolError::ChunkTooLong { .. })
        ));
        // Unknown non-error type.
        let h = header(ChunkType(77), 0);
        assert!(matches!(
            Chunk::check_len(&h, HeaderMode::Structured, 0),
            Err(ProtocolError::UnknownChunkType { .. })
        ));
        // NONE with a payload.
        let h = header(ChunkType::NONE, 4);
        assert!(Chunk::check_len(&h, HeaderMode::Structured, 0).is_err());
    }
}
