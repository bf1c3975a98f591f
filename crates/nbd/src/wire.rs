//! NBD wire constants and transmission-phase messages, encoded to and
//! decoded from bytes with no I/O.
//!
//! Names and values follow the NBD protocol document ("Values" section);
//! the extended-header layouts follow the `EXTENDED_HEADERS` extension as
//! implemented by qemu (8.1+) and libnbd (1.18+).

use std::fmt;

use crate::error::ProtocolError;

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

/// Bytes in a compact request header (magic, flags, type, cookie, offset, u32 length).
pub const COMPACT_REQUEST_LEN: usize = 28;
/// Bytes in an extended request header (as compact, with a u64 length).
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Bytes in a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes in a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Bytes in an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;

/// `NBD_REPLY_FLAG_DONE`: the final chunk of a structured reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;

/// `NBD_CMD_FLAG_FUA`.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_DF`: at most one content chunk in the read reply.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`: one extent per context in the block status reply.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Longest string the protocol allows (export names, messages, context names).
pub const MAX_STRING: usize = 4096;
/// Largest payload we accept for an error chunk: error, message length,
/// a 4096-byte message and an offset.
pub const MAX_ERROR_PAYLOAD: u64 = 4 + 2 + MAX_STRING as u64 + 8;
/// Largest number of block status descriptors we accept in one chunk. The
/// spec says servers SHOULD NOT send more than 2^20.
pub const MAX_DESCRIPTORS: u64 = 1 << 20;

/// The option codes of the handshake phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Opt(pub u32);

impl Opt {
    /// `NBD_OPT_EXPORT_NAME` (1).
    pub const EXPORT_NAME: Opt = Opt(1);
    /// `NBD_OPT_ABORT` (2).
    pub const ABORT: Opt = Opt(2);
    /// `NBD_OPT_LIST` (3).
    pub const LIST: Opt = Opt(3);
    /// `NBD_OPT_STARTTLS` (5).
    pub const STARTTLS: Opt = Opt(5);
    /// `NBD_OPT_INFO` (6).
    pub const INFO: Opt = Opt(6);
    /// `NBD_OPT_GO` (7).
    pub const GO: Opt = Opt(7);
    /// `NBD_OPT_STRUCTURED_REPLY` (8).
    pub const STRUCTURED_REPLY: Opt = Opt(8);
    /// `NBD_OPT_LIST_META_CONTEXT` (9).
    pub const LIST_META_CONTEXT: Opt = Opt(9);
    /// `NBD_OPT_SET_META_CONTEXT` (10).
    pub const SET_META_CONTEXT: Opt = Opt(10);
    /// `NBD_OPT_EXTENDED_HEADERS` (11).
    pub const EXTENDED_HEADERS: Opt = Opt(11);

    /// The spec's name, e.g. `NBD_OPT_GO`.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            1 => "NBD_OPT_EXPORT_NAME",
            2 => "NBD_OPT_ABORT",
            3 => "NBD_OPT_LIST",
            5 => "NBD_OPT_STARTTLS",
            6 => "NBD_OPT_INFO",
            7 => "NBD_OPT_GO",
            8 => "NBD_OPT_STRUCTURED_REPLY",
            9 => "NBD_OPT_LIST_META_CONTEXT",
            10 => "NBD_OPT_SET_META_CONTEXT",
            11 => "NBD_OPT_EXTENDED_HEADERS",
            _ => return None,
        })
    }
}

impl fmt::Display for Opt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "option {}", self.0),
        }
    }
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RepType(pub u32);

impl RepType {
    /// `NBD_REP_ACK` (1).
    pub const ACK: RepType = RepType(1);
    /// `NBD_REP_SERVER` (2).
    pub const SERVER: RepType = RepType(2);
    /// `NBD_REP_INFO` (3).
    pub const INFO: RepType = RepType(3);
    /// `NBD_REP_META_CONTEXT` (4).
    pub const META_CONTEXT: RepType = RepType(4);
    /// `NBD_REP_ERR_UNSUP` (2^31 + 1).
    pub const ERR_UNSUP: RepType = RepType((1 << 31) + 1);
    /// `NBD_REP_ERR_POLICY` (2^31 + 2).
    pub const ERR_POLICY: RepType = RepType((1 << 31) + 2);
    /// `NBD_REP_ERR_INVALID` (2^31 + 3).
    pub const ERR_INVALID: RepType = RepType((1 << 31) + 3);
    /// `NBD_REP_ERR_PLATFORM` (2^31 + 4).
    pub const ERR_PLATFORM: RepType = RepType((1 << 31) + 4);
    /// `NBD_REP_ERR_TLS_REQD` (2^31 + 5).
    pub const ERR_TLS_REQD: RepType = RepType((1 << 31) + 5);
    /// `NBD_REP_ERR_UNKNOWN` (2^31 + 6).
    pub const ERR_UNKNOWN: RepType = RepType((1 << 31) + 6);
    /// `NBD_REP_ERR_SHUTDOWN` (2^31 + 7).
    pub const ERR_SHUTDOWN: RepType = RepType((1 << 31) + 7);
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD` (2^31 + 8).
    pub const ERR_BLOCK_SIZE_REQD: RepType = RepType((1 << 31) + 8);
    /// `NBD_REP_ERR_TOO_BIG` (2^31 + 9).
    pub const ERR_TOO_BIG: RepType = RepType((1 << 31) + 9);
    /// `NBD_REP_ERR_EXT_HEADER_REQD` (2^31 + 10).
    pub const ERR_EXT_HEADER_REQD: RepType = RepType((1 << 31) + 10);

    /// True for error replies (bit 31 set).
    pub fn is_error(self) -> bool {
        self.0 & (1 << 31) != 0
    }

    /// The spec's name, e.g. `NBD_REP_ERR_UNKNOWN`.
    pub fn name(self) -> Option<&'static str> {
        const E: u32 = 1 << 31;
        Some(match self.0 {
            1 => "NBD_REP_ACK",
            2 => "NBD_REP_SERVER",
            3 => "NBD_REP_INFO",
            4 => "NBD_REP_META_CONTEXT",
            x if x == E + 1 => "NBD_REP_ERR_UNSUP",
            x if x == E + 2 => "NBD_REP_ERR_POLICY",
            x if x == E + 3 => "NBD_REP_ERR_INVALID",
            x if x == E + 4 => "NBD_REP_ERR_PLATFORM",
            x if x == E + 5 => "NBD_REP_ERR_TLS_REQD",
            x if x == E + 6 => "NBD_REP_ERR_UNKNOWN",
            x if x == E + 7 => "NBD_REP_ERR_SHUTDOWN",
            x if x == E + 8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
            x if x == E + 9 => "NBD_REP_ERR_TOO_BIG",
            x if x == E + 10 => "NBD_REP_ERR_EXT_HEADER_REQD",
            _ => return None,
        })
    }
}

impl fmt::Display for RepType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "reply type {:#x}", self.0),
        }
    }
}

/// `NBD_INFO_EXPORT` (0).
pub const NBD_INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME` (1).
pub const NBD_INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION` (2).
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE` (3).
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

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

/// Which header layout the transmission phase uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeaderMode {
    /// 28-byte requests with a 32-bit length; simple replies only.
    Simple,
    /// 28-byte requests; simple replies or 20-byte structured chunks
    /// (`NBD_OPT_STRUCTURED_REPLY` was acknowledged).
    Structured,
    /// 32-byte requests with a 64-bit length and 32-byte extended reply
    /// chunks (`NBD_OPT_EXTENDED_HEADERS` was acknowledged).
    Extended,
}

impl HeaderMode {
    /// True when structured (or extended) replies were negotiated.
    pub fn structured(self) -> bool {
        !matches!(self, HeaderMode::Simple)
    }
    /// Bytes in one request header in this mode.
    pub fn request_len(self) -> usize {
        match self {
            HeaderMode::Extended => EXTENDED_REQUEST_LEN,
            _ => COMPACT_REQUEST_LEN,
        }
    }
}

impl fmt::Display for HeaderMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeaderMode::Simple => "simple",
            HeaderMode::Structured => "structured",
            HeaderMode::Extended => "extended",
        })
    }
}

/// A request type (`NBD_CMD_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Command(pub u16);

impl Command {
    /// `NBD_CMD_READ` (0).
    pub const READ: Command = Command(0);
    /// `NBD_CMD_WRITE` (1).
    pub const WRITE: Command = Command(1);
    /// `NBD_CMD_DISC` (2).
    pub const DISC: Command = Command(2);
    /// `NBD_CMD_FLUSH` (3).
    pub const FLUSH: Command = Command(3);
    /// `NBD_CMD_TRIM` (4).
    pub const TRIM: Command = Command(4);
    /// `NBD_CMD_CACHE` (5).
    pub const CACHE: Command = Command(5);
    /// `NBD_CMD_WRITE_ZEROES` (6).
    pub const WRITE_ZEROES: Command = Command(6);
    /// `NBD_CMD_BLOCK_STATUS` (7).
    pub const BLOCK_STATUS: Command = Command(7);
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = match self.0 {
            0 => "NBD_CMD_READ",
            1 => "NBD_CMD_WRITE",
            2 => "NBD_CMD_DISC",
            3 => "NBD_CMD_FLUSH",
            4 => "NBD_CMD_TRIM",
            5 => "NBD_CMD_CACHE",
            6 => "NBD_CMD_WRITE_ZEROES",
            7 => "NBD_CMD_BLOCK_STATUS",
            x => return write!(f, "command {x}"),
        };
        f.write_str(n)
    }
}

/// The opaque 64-bit value that pairs a reply with its request (called
/// *handle* in older versions of the spec).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cookie(pub u64);

impl fmt::Display for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// An error value of the transmission phase (`NBD_E*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Errno(pub u32);

impl Errno {
    /// `NBD_EPERM` (1).
    pub const EPERM: Errno = Errno(1);
    /// `NBD_EIO` (5).
    pub const EIO: Errno = Errno(5);
    /// `NBD_ENOMEM` (12).
    pub const ENOMEM: Errno = Errno(12);
    /// `NBD_EINVAL` (22).
    pub const EINVAL: Errno = Errno(22);
    /// `NBD_ENOSPC` (28).
    pub const ENOSPC: Errno = Errno(28);
    /// `NBD_EOVERFLOW` (75).
    pub const EOVERFLOW: Errno = Errno(75);
    /// `NBD_ENOTSUP` (95).
    pub const ENOTSUP: Errno = Errno(95);
    /// `NBD_ESHUTDOWN` (108).
    pub const ESHUTDOWN: Errno = Errno(108);

    /// The spec's name and meaning, e.g. `NBD_EIO (Input/output error)`.
    pub fn describe(self) -> Option<&'static str> {
        Some(match self.0 {
            1 => "NBD_EPERM (Operation not permitted)",
            5 => "NBD_EIO (Input/output error)",
            12 => "NBD_ENOMEM (Cannot allocate memory)",
            22 => "NBD_EINVAL (Invalid argument)",
            28 => "NBD_ENOSPC (No space left on device)",
            75 => "NBD_EOVERFLOW (Value too large)",
            95 => "NBD_ENOTSUP (Operation not supported)",
            108 => "NBD_ESHUTDOWN (Server is shutting down)",
            _ => return None,
        })
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.describe() {
            Some(d) => f.write_str(d),
            // The spec: treat an unexpected value as NBD_EINVAL; we still
            // show the number the server sent.
            None => write!(f, "error {} (unknown, treated as NBD_EINVAL)", self.0),
        }
    }
}

/// A structured reply chunk type (`NBD_REPLY_TYPE_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkType(pub u16);

impl ChunkType {
    /// `NBD_REPLY_TYPE_NONE` (0).
    pub const NONE: ChunkType = ChunkType(0);
    /// `NBD_REPLY_TYPE_OFFSET_DATA` (1).
    pub const OFFSET_DATA: ChunkType = ChunkType(1);
    /// `NBD_REPLY_TYPE_OFFSET_HOLE` (2).
    pub const OFFSET_HOLE: ChunkType = ChunkType(2);
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` (5).
    pub const BLOCK_STATUS: ChunkType = ChunkType(5);
    /// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT` (6).
    pub const BLOCK_STATUS_EXT: ChunkType = ChunkType(6);
    /// `NBD_REPLY_TYPE_ERROR` (2^15 + 1).
    pub const ERROR: ChunkType = ChunkType((1 << 15) + 1);
    /// `NBD_REPLY_TYPE_ERROR_OFFSET` (2^15 + 2).
    pub const ERROR_OFFSET: ChunkType = ChunkType((1 << 15) + 2);

    /// Error chunks have bit 15 set.
    pub fn is_error(self) -> bool {
        self.0 & (1 << 15) != 0
    }
}

impl fmt::Display for ChunkType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = match self.0 {
            0 => "NBD_REPLY_TYPE_NONE",
            1 => "NBD_REPLY_TYPE_OFFSET_DATA",
            2 => "NBD_REPLY_TYPE_OFFSET_HOLE",
            5 => "NBD_REPLY_TYPE_BLOCK_STATUS",
            6 => "NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
            32769 => "NBD_REPLY_TYPE_ERROR",
            32770 => "NBD_REPLY_TYPE_ERROR_OFFSET",
            x => return write!(f, "chunk type {x:#x}"),
        };
        f.write_str(n)
    }
}

/// A metadata context ID assigned by the server in `NBD_REP_META_CONTEXT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContextId(pub u32);

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

pub(crate) fn read_be16(b: &[u8], at: usize) -> u16 {
    be16(b, at)
}
pub(crate) fn read_be32(b: &[u8], at: usize) -> u32 {
    be32(b, at)
}
pub(crate) fn read_be64(b: &[u8], at: usize) -> u64 {
    be64(b, at)
}

fn exact(what: &'static str, buf: &[u8], expected: usize) -> Result<(), ProtocolError> {
    if buf.len() != expected {
        return Err(ProtocolError::WrongLength {
            what,
            expected,
            found: buf.len(),
        });
    }
    Ok(())
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
            HeaderMode::Extended => {
                out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
                out.extend_from_slice(&self.flags.to_be_bytes());
                out.extend_from_slice(&self.command.0.to_be_bytes());
                out.extend_from_slice(&self.cookie.0.to_be_bytes());
                out.extend_from_slice(&self.offset.to_be_bytes());
                out.extend_from_slice(&self.length.to_be_bytes());
            }
            HeaderMode::Simple | HeaderMode::Structured => {
                let length =
                    u32::try_from(self.length).map_err(|_| ProtocolError::LengthTooLarge {
                        length: self.length,
                        max: u32::MAX.into(),
                    })?;
                out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                out.extend_from_slice(&self.flags.to_be_bytes());
                out.extend_from_slice(&self.command.0.to_be_bytes());
                out.extend_from_slice(&self.cookie.0.to_be_bytes());
                out.extend_from_slice(&self.offset.to_be_bytes());
                out.extend_from_slice(&length.to_be_bytes());
            }
        }
        Ok(())
    }

    /// Parses a request header (compact or extended, told apart by the
    /// magic); the server side of [`Request::encode`], used by test servers.
    pub fn parse(buf: &[u8]) -> Result<Request, ProtocolError> {
        if buf.len() < 4 {
            return Err(ProtocolError::WrongLength {
                what: "request header",
                expected: COMPACT_REQUEST_LEN,
                found: buf.len(),
            });
        }
        let magic = be32(buf, 0);
        let extended = match magic {
            REQUEST_MAGIC => false,
            EXTENDED_REQUEST_MAGIC => true,
            found => {
                return Err(ProtocolError::BadMagic {
                    what: "request",
                    expected: REQUEST_MAGIC.into(),
                    found: found.into(),
                });
            }
        };
        let len = if extended {
            EXTENDED_REQUEST_LEN
        } else {
            COMPACT_REQUEST_LEN
        };
        exact("request header", buf, len)?;
        Ok(Request {
            flags: be16(buf, 4),
            command: Command(be16(buf, 6)),
            cookie: Cookie(be64(buf, 8)),
            offset: be64(buf, 16),
            length: if extended {
                be64(buf, 24)
            } else {
                be32(buf, 24).into()
            },
        })
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
        if buf.len() < 4 {
            return Err(ProtocolError::WrongLength {
                what: "reply header",
                expected: 4,
                found: buf.len(),
            });
        }
        let len = Self::len_for_magic(buf[..4].try_into().expect("4 bytes"), mode)?;
        exact("reply header", buf, len)?;
        Ok(match be32(buf, 0) {
            SIMPLE_REPLY_MAGIC => ReplyHeader::Simple {
                error: be32(buf, 4),
                cookie: Cookie(be64(buf, 8)),
            },
            STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk(ChunkHeader {
                flags: be16(buf, 4),
                chunk_type: ChunkType(be16(buf, 6)),
                cookie: Cookie(be64(buf, 8)),
                offset: None,
                payload_len: be32(buf, 16).into(),
            }),
            _ => ReplyHeader::Chunk(ChunkHeader {
                flags: be16(buf, 4),
                chunk_type: ChunkType(be16(buf, 6)),
                cookie: Cookie(be64(buf, 8)),
                offset: Some(be64(buf, 16)),
                payload_len: be64(buf, 24),
            }),
        })
    }

    /// Appends this header to `out`; the server side of
    /// [`ReplyHeader::parse`], used by test servers. A chunk with
    /// `offset: Some(_)` is written as an extended chunk.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            ReplyHeader::Simple { cookie, error } => {
                out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
                out.extend_from_slice(&error.to_be_bytes());
                out.extend_from_slice(&cookie.0.to_be_bytes());
            }
            ReplyHeader::Chunk(c) => {
                let magic = if c.offset.is_some() {
                    EXTENDED_REPLY_MAGIC
                } else {
                    STRUCTURED_REPLY_MAGIC
                };
                out.extend_from_slice(&magic.to_be_bytes());
                out.extend_from_slice(&c.flags.to_be_bytes());
                out.extend_from_slice(&c.chunk_type.0.to_be_bytes());
                out.extend_from_slice(&c.cookie.0.to_be_bytes());
                match c.offset {
                    Some(o) => {
                        out.extend_from_slice(&o.to_be_bytes());
                        out.extend_from_slice(&c.payload_len.to_be_bytes());
                    }
                    None => {
                        // Test servers may want to send a lying length;
                        // truncation is their business.
                        out.extend_from_slice(&(c.payload_len as u32).to_be_bytes());
                    }
                }
            }
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
    pub const DATA_PREFIX_LEN: usize = 8;

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
        match t {
            ChunkType::NONE => (len == 0).then_some(0).ok_or_else(|| bad("0")),
            ChunkType::OFFSET_DATA => {
                if len < 9 {
                    return Err(bad("at least 9"));
                }
                let data = len - 8;
                if data > max_data {
                    return Err(ProtocolError::ChunkTooLong {
                        chunk_type: t,
                        length: len,
                        max: max_data + 8,
                    });
                }
                Ok(data)
            }
            ChunkType::OFFSET_HOLE => (len == 12).then_some(12).ok_or_else(|| bad("12")),
            ChunkType::BLOCK_STATUS if mode == HeaderMode::Extended => {
                Err(ProtocolError::UnexpectedChunkType {
                    chunk_type: t,
                    mode,
                })
            }
            ChunkType::BLOCK_STATUS_EXT if mode != HeaderMode::Extended => {
                Err(ProtocolError::UnexpectedChunkType {
                    chunk_type: t,
                    mode,
                })
            }
            ChunkType::BLOCK_STATUS => {
                if len < 12 || !(len - 4).is_multiple_of(8) {
                    return Err(bad("4 + a positive multiple of 8"));
                }
                let max = 4 + 8 * MAX_DESCRIPTORS;
                if len > max {
                    return Err(ProtocolError::ChunkTooLong {
                        chunk_type: t,
                        length: len,
                        max,
                    });
                }
                Ok(len)
            }
            ChunkType::BLOCK_STATUS_EXT => {
                if len < 24 || !(len - 8).is_multiple_of(16) {
                    return Err(bad("8 + a positive multiple of 16"));
                }
                let max = 8 + 16 * MAX_DESCRIPTORS;
                if len > max {
                    return Err(ProtocolError::ChunkTooLong {
                        chunk_type: t,
                        length: len,
                        max,
                    });
                }
                Ok(len)
            }
            ChunkType::ERROR_OFFSET if len < 14 => Err(bad("at least 14")),
            _ if t.is_error() => {
                if len < 6 {
                    return Err(bad("at least 6"));
                }
                if len > MAX_ERROR_PAYLOAD {
                    return Err(ProtocolError::ChunkTooLong {
                        chunk_type: t,
                        length: len,
                        max: MAX_ERROR_PAYLOAD,
                    });
                }
                Ok(len)
            }
            _ => Err(ProtocolError::UnknownChunkType { chunk_type: t }),
        }
    }

    /// Parses the 8-byte prefix of an `OFFSET_DATA` payload: the offset.
    pub fn data_prefix(buf: &[u8]) -> Result<u64, ProtocolError> {
        exact("offset data prefix", buf, Self::DATA_PREFIX_LEN)?;
        Ok(be64(buf, 0))
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
                let length = be32(payload, 8);
                if length == 0 {
                    return Err(ProtocolError::EmptyHole);
                }
                Chunk::OffsetHole {
                    offset: be64(payload, 0),
                    length,
                }
            }
            ChunkType::BLOCK_STATUS => {
                let descriptors = payload[4..]
                    .chunks_exact(8)
                    .map(|d| Descriptor {
                        length: be32(d, 0).into(),
                        flags: be32(d, 4).into(),
                    })
                    .collect();
                Chunk::BlockStatus {
                    context: ContextId(be32(payload, 0)),
                    descriptors,
                }
            }
            ChunkType::BLOCK_STATUS_EXT => {
                let count = be32(payload, 4);
                let actual = (payload.len() - 8) / 16;
                if count as usize != actual {
                    return Err(ProtocolError::DescriptorCount {
                        count,
                        fits: actual,
                    });
                }
                let descriptors = payload[8..]
                    .chunks_exact(16)
                    .map(|d| Descriptor {
                        length: be64(d, 0),
                        flags: be64(d, 8),
                    })
                    .collect();
                Chunk::BlockStatus {
                    context: ContextId(be32(payload, 0)),
                    descriptors,
                }
            }
            _ => {
                // Every error chunk starts with error, message length, message.
                let errno = Errno(be32(payload, 0));
                if errno.0 == 0 {
                    return Err(ProtocolError::ZeroErrno { chunk_type: t });
                }
                let msg_len = usize::from(be16(payload, 4));
                let trailer = if t == ChunkType::ERROR_OFFSET { 8 } else { 0 };
                let available = payload.len() - 6 - trailer;
                if msg_len > available {
                    return Err(ProtocolError::ErrorMessageTooLong {
                        message_length: msg_len,
                        available,
                    });
                }
                let message = String::from_utf8_lossy(&payload[6..6 + msg_len]).into_owned();
                if t == ChunkType::ERROR_OFFSET {
                    if msg_len != available {
                        return Err(ProtocolError::ErrorMessageTooLong {
                            message_length: msg_len,
                            available,
                        });
                    }
                    Chunk::ErrorOffset {
                        errno,
                        message,
                        offset: be64(payload, 6 + msg_len),
                    }
                } else {
                    // ERROR, or an unknown error type: its trailing fields
                    // are unknown to us, so the message is all we keep.
                    Chunk::Error { errno, message }
                }
            }
        })
    }
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
