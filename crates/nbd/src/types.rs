//! The protocol's value types: open enums of numbered codes (options,
//! option replies, commands, errors, chunk types) and the small newtypes
//! that travel in messages (cookies, context IDs, the header mode).
//!
//! This module sits below both [`crate::wire`] (which encodes them) and
//! [`crate::error`] (which names them in messages). Each open enum is
//! written once, in one `open_enum!` table that yields its constants and
//! its `Display` name; a value outside the table still displays, as a
//! number.

use std::fmt;

/// Declares an open enum: a newtype over the wire integer, one associated
/// constant per known value, `name()` giving the spec's name and a
/// `Display` that falls back to `$unknown` for values not in the table.
macro_rules! open_enum {
    (
        $(#[$meta:meta])*
        pub struct $name:ident($repr:ty);
        unknown = $unknown:literal;
        $( $konst:ident = $value:expr => $spec:literal, )+
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub struct $name(pub $repr);

        impl $name {
            $(
                #[doc = concat!("`", $spec, "` (", stringify!($value), ").")]
                pub const $konst: $name = $name($value);
            )+

            /// The spec's name for a known value, `None` for others.
            pub fn name(self) -> Option<&'static str> {
                $( if self == Self::$konst { return Some($spec); } )+
                None
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, $unknown, self.0),
                }
            }
        }
    };
}

/// Bit 31 marks the error replies of the handshake (`NBD_REP_ERR_*`).
const REP_ERR: u32 = 1 << 31;
/// Bit 15 marks the error chunk types (`NBD_REPLY_TYPE_ERROR*`).
const CHUNK_ERR: u16 = 1 << 15;

open_enum! {
    /// The option codes of the handshake phase (`NBD_OPT_*`).
    pub struct Opt(u32);
    unknown = "option {}";
    EXPORT_NAME = 1 => "NBD_OPT_EXPORT_NAME",
    ABORT = 2 => "NBD_OPT_ABORT",
    LIST = 3 => "NBD_OPT_LIST",
    STARTTLS = 5 => "NBD_OPT_STARTTLS",
    INFO = 6 => "NBD_OPT_INFO",
    GO = 7 => "NBD_OPT_GO",
    STRUCTURED_REPLY = 8 => "NBD_OPT_STRUCTURED_REPLY",
    LIST_META_CONTEXT = 9 => "NBD_OPT_LIST_META_CONTEXT",
    SET_META_CONTEXT = 10 => "NBD_OPT_SET_META_CONTEXT",
    EXTENDED_HEADERS = 11 => "NBD_OPT_EXTENDED_HEADERS",
}

open_enum! {
    /// Option reply types (`NBD_REP_*`); errors have bit 31 set.
    pub struct RepType(u32);
    unknown = "reply type {:#x}";
    ACK = 1 => "NBD_REP_ACK",
    SERVER = 2 => "NBD_REP_SERVER",
    INFO = 3 => "NBD_REP_INFO",
    META_CONTEXT = 4 => "NBD_REP_META_CONTEXT",
    ERR_UNSUP = REP_ERR + 1 => "NBD_REP_ERR_UNSUP",
    ERR_POLICY = REP_ERR + 2 => "NBD_REP_ERR_POLICY",
    ERR_INVALID = REP_ERR + 3 => "NBD_REP_ERR_INVALID",
    ERR_PLATFORM = REP_ERR + 4 => "NBD_REP_ERR_PLATFORM",
    ERR_TLS_REQD = REP_ERR + 5 => "NBD_REP_ERR_TLS_REQD",
    ERR_UNKNOWN = REP_ERR + 6 => "NBD_REP_ERR_UNKNOWN",
    ERR_SHUTDOWN = REP_ERR + 7 => "NBD_REP_ERR_SHUTDOWN",
    ERR_BLOCK_SIZE_REQD = REP_ERR + 8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
    ERR_TOO_BIG = REP_ERR + 9 => "NBD_REP_ERR_TOO_BIG",
    ERR_EXT_HEADER_REQD = REP_ERR + 10 => "NBD_REP_ERR_EXT_HEADER_REQD",
}

impl RepType {
    /// True for error replies (bit 31 set).
    pub fn is_error(self) -> bool {
        self.0 & REP_ERR != 0
    }
}

open_enum! {
    /// A request type (`NBD_CMD_*`).
    pub struct Command(u16);
    unknown = "command {}";
    READ = 0 => "NBD_CMD_READ",
    WRITE = 1 => "NBD_CMD_WRITE",
    DISC = 2 => "NBD_CMD_DISC",
    FLUSH = 3 => "NBD_CMD_FLUSH",
    TRIM = 4 => "NBD_CMD_TRIM",
    CACHE = 5 => "NBD_CMD_CACHE",
    WRITE_ZEROES = 6 => "NBD_CMD_WRITE_ZEROES",
    BLOCK_STATUS = 7 => "NBD_CMD_BLOCK_STATUS",
}

open_enum! {
    /// An error value of the transmission phase (`NBD_E*`). The spec: treat
    /// an unexpected value as `NBD_EINVAL`; it still displays the number
    /// the server sent.
    pub struct Errno(u32);
    unknown = "error {} (unknown, treated as NBD_EINVAL)";
    EPERM = 1 => "NBD_EPERM (Operation not permitted)",
    EIO = 5 => "NBD_EIO (Input/output error)",
    ENOMEM = 12 => "NBD_ENOMEM (Cannot allocate memory)",
    EINVAL = 22 => "NBD_EINVAL (Invalid argument)",
    ENOSPC = 28 => "NBD_ENOSPC (No space left on device)",
    EOVERFLOW = 75 => "NBD_EOVERFLOW (Value too large)",
    ENOTSUP = 95 => "NBD_ENOTSUP (Operation not supported)",
    ESHUTDOWN = 108 => "NBD_ESHUTDOWN (Server is shutting down)",
}

impl Errno {
    /// The spec's name and meaning, e.g. `NBD_EIO (Input/output error)`.
    pub fn describe(self) -> Option<&'static str> {
        self.name()
    }
}

open_enum! {
    /// A structured reply chunk type (`NBD_REPLY_TYPE_*`).
    pub struct ChunkType(u16);
    unknown = "chunk type {:#x}";
    NONE = 0 => "NBD_REPLY_TYPE_NONE",
    OFFSET_DATA = 1 => "NBD_REPLY_TYPE_OFFSET_DATA",
    OFFSET_HOLE = 2 => "NBD_REPLY_TYPE_OFFSET_HOLE",
    BLOCK_STATUS = 5 => "NBD_REPLY_TYPE_BLOCK_STATUS",
    BLOCK_STATUS_EXT = 6 => "NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
    ERROR = CHUNK_ERR + 1 => "NBD_REPLY_TYPE_ERROR",
    ERROR_OFFSET = CHUNK_ERR + 2 => "NBD_REPLY_TYPE_ERROR_OFFSET",
}

impl ChunkType {
    /// Error chunks have bit 15 set.
    pub fn is_error(self) -> bool {
        self.0 & CHUNK_ERR != 0
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

/// A metadata context ID assigned by the server in `NBD_REP_META_CONTEXT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContextId(pub u32);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_display_their_spec_names() {
        assert_eq!(Opt::GO.to_string(), "NBD_OPT_GO");
        assert_eq!(Opt(11), Opt::EXTENDED_HEADERS);
        assert_eq!(RepType(0x8000_0006).to_string(), "NBD_REP_ERR_UNKNOWN");
        assert!(RepType::ERR_TOO_BIG.is_error() && !RepType::ACK.is_error());
        assert_eq!(Command(6).to_string(), "NBD_CMD_WRITE_ZEROES");
        assert_eq!(Errno(5).to_string(), "NBD_EIO (Input/output error)");
        assert_eq!(ChunkType(0x8002).to_string(), "NBD_REPLY_TYPE_ERROR_OFFSET");
        assert!(ChunkType::ERROR.is_error() && !ChunkType::OFFSET_HOLE.is_error());
    }

    #[test]
    fn unknown_values_display_as_numbers() {
        assert_eq!(Opt(4).to_string(), "option 4");
        assert_eq!(Opt(4).name(), None);
        assert_eq!(RepType(0x8000_00ff).to_string(), "reply type 0x800000ff");
        assert_eq!(Command(9).to_string(), "command 9");
        assert_eq!(
            Errno(7).to_string(),
            "error 7 (unknown, treated as NBD_EINVAL)"
        );
        assert_eq!(ChunkType(77).to_string(), "chunk type 0x4d");
        assert_eq!(Cookie(255).to_string(), "0xff");
    }
}
