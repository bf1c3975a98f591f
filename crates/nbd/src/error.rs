//! Error types: what the server sent that breaks the protocol
//! ([`ProtocolError`], labelled with what was being read in
//! [`ReplyError`]), why a handshake failed ([`HandshakeError`]), why a
//! request can not be sent ([`RequestError`]), and everything a client
//! call can report ([`Error`]).

use std::io;
use std::time::Duration;

use crate::types::{ChunkType, Command, ContextId, Cookie, Errno, HeaderMode, Opt, RepType};

/// Bytes from the peer that break the NBD protocol. After one of these the
/// stream can not be trusted any more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A magic number is not the one the protocol requires here.
    #[error("bad {what} magic: expected {expected:#x}, found {found:#x}")]
    BadMagic {
        /// Which message.
        what: &'static str,
        /// The magic required.
        expected: u64,
        /// The magic received.
        found: u64,
    },
    /// A message or field does not have the length its type requires.
    #[error("{what}: expected {expected} bytes, got {found}")]
    WrongLength {
        /// Which message or field.
        what: &'static str,
        /// Bytes required.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// A request length does not fit the header in use.
    #[error("request length {length:#x} exceeds the header's limit of {max:#x}")]
    LengthTooLarge {
        /// Requested length.
        length: u64,
        /// Largest length the header can carry.
        max: u64,
    },
    /// The server greeted with the oldstyle protocol.
    #[error("server uses oldstyle negotiation; only fixed newstyle is supported")]
    Oldstyle,
    /// The server does not set `NBD_FLAG_FIXED_NEWSTYLE`.
    #[error("server does not support fixed newstyle negotiation (handshake flags {flags:#x})")]
    NotFixedNewstyle {
        /// Handshake flags received.
        flags: u16,
    },
    /// An option reply answers another option than the one sent.
    #[error("reply for {got} while waiting for the reply to {sent}")]
    OptionMismatch {
        /// Option sent.
        sent: Opt,
        /// Option named in the reply.
        got: Opt,
    },
    /// An option reply announces a payload longer than we accept.
    #[error("{reply} to {option}: payload of {length} bytes exceeds the limit of {max}")]
    OptionReplyTooLong {
        /// Option being answered.
        option: Opt,
        /// Reply type.
        reply: RepType,
        /// Announced payload length.
        length: u32,
        /// Our limit.
        max: u32,
    },
    /// A reply type that does not belong to this option.
    #[error("unexpected {reply} in reply to {option}")]
    UnexpectedOptionReply {
        /// Option being answered.
        option: Opt,
        /// Reply type received.
        reply: RepType,
    },
    /// An option reply payload is malformed.
    #[error("{reply} to {option}: {reason}")]
    BadOptionReply {
        /// Option being answered.
        option: Opt,
        /// Reply type.
        reply: RepType,
        /// What is wrong.
        reason: &'static str,
    },
    /// Too many `NBD_REP_META_CONTEXT` replies.
    #[error("{option}: more than {max} metadata contexts in the reply")]
    TooManyContexts {
        /// Option being answered.
        option: Opt,
        /// Our limit.
        max: usize,
    },
    /// The block size constraints break the spec's rules.
    #[error(
        "invalid NBD_INFO_BLOCK_SIZE: minimum {minimum}, preferred {preferred}, maximum {maximum}: {reason}"
    )]
    BadBlockSize {
        /// Advertised minimum block size.
        minimum: u32,
        /// Advertised preferred block size.
        preferred: u32,
        /// Advertised maximum payload.
        maximum: u32,
        /// Which rule is broken.
        reason: &'static str,
    },
    /// `NBD_OPT_GO` succeeded without `NBD_INFO_EXPORT`.
    #[error("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")]
    MissingExportInfo,
    /// A reply magic that is valid, but not in the negotiated mode.
    #[error("reply magic {magic:#x} is not allowed with {mode} headers")]
    UnexpectedReplyMagic {
        /// Magic received.
        magic: u32,
        /// Negotiated header mode.
        mode: HeaderMode,
    },
    /// A reply for a cookie with no request in flight.
    #[error("reply for cookie {cookie}, which has no request in flight")]
    UnknownCookie {
        /// Cookie received.
        cookie: Cookie,
    },
    /// A chunk's payload length is wrong for its type.
    #[error("{chunk_type} with payload length {length}, expected {expected}")]
    BadChunkLength {
        /// Chunk type.
        chunk_type: ChunkType,
        /// Payload length announced.
        length: u64,
        /// What the type requires.
        expected: &'static str,
    },
    /// A chunk's payload is longer than we allow for it.
    #[error("{chunk_type} with payload length {length} exceeds the limit of {max}")]
    ChunkTooLong {
        /// Chunk type.
        chunk_type: ChunkType,
        /// Payload length announced.
        length: u64,
        /// Our limit (what was requested, or a fixed cap).
        max: u64,
    },
    /// A known chunk type that is not valid here.
    #[error("{chunk_type} is not valid with {mode} headers or for this request")]
    UnexpectedChunkType {
        /// Chunk type.
        chunk_type: ChunkType,
        /// Negotiated header mode.
        mode: HeaderMode,
    },
    /// A chunk type we do not know, without the error bit.
    #[error("unknown {chunk_type}")]
    UnknownChunkType {
        /// Chunk type.
        chunk_type: ChunkType,
    },
    /// A chunk type not valid in reply to this command.
    #[error("{chunk_type} in reply to {command}")]
    ChunkForWrongCommand {
        /// Chunk type.
        chunk_type: ChunkType,
        /// Command of the request.
        command: Command,
    },
    /// `NBD_REPLY_TYPE_NONE` must carry `NBD_REPLY_FLAG_DONE`.
    #[error("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE")]
    NoneWithoutDone,
    /// An `OFFSET_HOLE` chunk of size 0.
    #[error("NBD_REPLY_TYPE_OFFSET_HOLE with hole size 0")]
    EmptyHole,
    /// The descriptor count of a `BLOCK_STATUS_EXT` chunk disagrees with its length.
    #[error("NBD_REPLY_TYPE_BLOCK_STATUS_EXT claims {count} descriptors, payload holds {fits}")]
    DescriptorCount {
        /// Count field.
        count: u32,
        /// Descriptors the payload holds.
        fits: usize,
    },
    /// An error chunk with error value 0.
    #[error("{chunk_type} with error value 0")]
    ZeroErrno {
        /// Chunk type.
        chunk_type: ChunkType,
    },
    /// An error chunk's message length runs past its payload.
    #[error(
        "error chunk message length {message_length} does not match the {available} bytes available"
    )]
    ErrorMessageTooLong {
        /// Message length field.
        message_length: usize,
        /// Bytes left for the message.
        available: usize,
    },
    /// A content or error chunk outside the request's range.
    #[error(
        "chunk for {offset:#x}+{length:#x} lies outside the request {request_offset:#x}+{request_length:#x}"
    )]
    ChunkOutsideRequest {
        /// Chunk's offset.
        offset: u64,
        /// Chunk's length (0 for an error offset).
        length: u64,
        /// Request's offset.
        request_offset: u64,
        /// Request's length.
        request_length: u64,
    },
    /// A content chunk overlapping an earlier one.
    #[error("chunk for {offset:#x}+{length:#x} overlaps an earlier chunk of the same reply")]
    ChunkOverlap {
        /// Chunk's offset.
        offset: u64,
        /// Chunk's length.
        length: u64,
    },
    /// A read reply finished without describing every byte.
    #[error(
        "read reply finished with {missing} of {length} bytes unaccounted for, the first at {first:#x}"
    )]
    ReadIncomplete {
        /// First byte not covered by a data or hole chunk.
        first: u64,
        /// Bytes not covered.
        missing: u64,
        /// Request length.
        length: u64,
    },
    /// A simple reply to `NBD_CMD_READ` once structured replies are on.
    #[error("simple reply to NBD_CMD_READ after structured replies were negotiated")]
    SimpleReplyToStructuredRead,
    /// Block status for a context ID that was not negotiated.
    #[error("block status for context id {id:?}, which was not negotiated")]
    UnknownContext {
        /// Context ID received.
        id: ContextId,
    },
    /// Two block status chunks for one context in one reply.
    #[error("two block status chunks for context id {id:?} in one reply")]
    DuplicateContext {
        /// Context ID received twice.
        id: ContextId,
    },
    /// A successful block status reply without a chunk for a context.
    #[error("block status reply ended without a chunk for context id {id:?}")]
    MissingContext {
        /// Context ID missing.
        id: ContextId,
    },
    /// A block status descriptor of length 0.
    #[error("block status descriptor {index} has length 0")]
    ZeroLengthExtent {
        /// Index in the chunk.
        index: usize,
    },
    /// Block status descriptors continue after covering the request.
    #[error(
        "block status descriptor {index} starts at {at:#x}, past the end of the request at {end:#x}"
    )]
    ExtentPastRequest {
        /// Index in the chunk.
        index: usize,
        /// Where it starts.
        at: u64,
        /// End of the request.
        end: u64,
    },
    /// `NBD_CMD_FLAG_REQ_ONE` was set but the server broke its rule.
    #[error(
        "NBD_CMD_FLAG_REQ_ONE reply with {count} descriptors, the first {length:#x} bytes long"
    )]
    ReqOneViolated {
        /// Descriptors received.
        count: usize,
        /// Length of the first.
        length: u64,
    },
    /// A read reply split into more disjoint pieces than we track.
    #[error("read reply split into more than {max} disjoint pieces")]
    TooFragmented {
        /// Our limit.
        max: usize,
    },
    /// A block status reply without a single usable descriptor.
    #[error("block status reply covers no bytes of the request")]
    NoProgress,
}

/// A [`ProtocolError`] in the transmission phase, labelled with what was
/// being read. After one of these the connection can not be trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {during}")]
pub struct ReplyError {
    /// What was being read, e.g. `reply to NBD_CMD_READ at 0x0+0x1000`.
    pub during: String,
    /// What was wrong.
    #[source]
    pub source: ProtocolError,
}

/// Why a request was refused before anything was sent: the export, the
/// negotiated options or the server's constraints do not allow it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The range does not lie inside the export.
    #[error("range {offset:#x}+{length:#x} is outside the export of {size:#x} bytes")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        length: u64,
        /// Export size.
        size: u64,
    },
    /// The range is not aligned to the minimum block size (or 512 bytes
    /// when the server advertises none).
    #[error("range {offset:#x}+{length:#x} is not aligned to the block size {alignment}")]
    Unaligned {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        length: u64,
        /// Required alignment.
        alignment: u64,
    },
    /// A zero-length request for a command that needs a range.
    #[error("{command} of 0 bytes at {offset:#x}")]
    Empty {
        /// The command.
        command: Command,
        /// Requested offset.
        offset: u64,
    },
    /// Longer than one request may be.
    #[error("{command} of {length:#x} bytes exceeds the limit of {max:#x}")]
    TooLong {
        /// The command.
        command: Command,
        /// Requested length.
        length: u64,
        /// The limit: the server's maximum payload (at most 32 MiB) or what
        /// the header can carry.
        max: u64,
    },
    /// A write to an export the server marked `NBD_FLAG_READ_ONLY`.
    #[error("{command}: the export is read-only")]
    ReadOnly {
        /// The command.
        command: Command,
    },
    /// The server did not advertise what the request needs.
    #[error("{command}: the server does not offer {needs}")]
    Unsupported {
        /// The command.
        command: Command,
        /// The missing flag or negotiated option, e.g. `NBD_FLAG_SEND_TRIM`.
        needs: &'static str,
    },
    /// `NBD_CMD_DISC` was sent: no more requests.
    #[error("{command} after NBD_CMD_DISC")]
    Disconnected {
        /// The command.
        command: Command,
    },
    /// An earlier protocol error left the connection out of step.
    #[error("{command} on a connection that failed earlier")]
    Failed {
        /// The command.
        command: Command,
    },
}

/// Why the handshake did not reach the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The server broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// `NBD_REP_ERR_UNKNOWN` to `NBD_OPT_GO`: no such export.
    #[error("export {export:?} does not exist on the server{}", suffix(message))]
    UnknownExport {
        /// Export name asked for.
        export: String,
        /// Server's message, possibly empty.
        message: String,
    },
    /// `NBD_REP_ERR_TLS_REQD`: the server wants TLS, which the URI did not
    /// ask for.
    #[error(
        "the server requires TLS (it refused {option} with NBD_REP_ERR_TLS_REQD{}): \
         use an nbds:// or nbds+unix:// URI",
        suffix(message)
    )]
    TlsRequired {
        /// Option refused.
        option: Opt,
        /// Server's message, possibly empty.
        message: String,
    },
    /// TLS is required (`nbds://`, `nbds+unix://`) but the server can not
    /// do it: it refused `NBD_OPT_STARTTLS` (`NBD_REP_ERR_UNSUP`,
    /// `NBD_REP_ERR_POLICY`) or does not speak fixed newstyle.
    #[error("the server does not support TLS, which the URI requires: {reason}")]
    TlsUnsupported {
        /// Why we know, e.g. `it refused NBD_OPT_STARTTLS with NBD_REP_ERR_POLICY`.
        reason: String,
    },
    /// The server does not support an option we can not do without.
    #[error("server does not support {option} ({reply}){}", suffix(message))]
    Unsupported {
        /// Option refused.
        option: Opt,
        /// The error reply (`NBD_REP_ERR_UNSUP` or `NBD_REP_ERR_POLICY`).
        reply: RepType,
        /// Server's message, possibly empty.
        message: String,
    },
    /// Any other error reply to an option.
    #[error("server refused {option} with {reply}{}", suffix(message))]
    Refused {
        /// Option refused.
        option: Opt,
        /// The error reply.
        reply: RepType,
        /// Server's message, possibly empty.
        message: String,
    },
    /// Metadata contexts were asked for, but the server has no structured replies.
    #[error("metadata contexts {contexts:?} need structured replies, which the server refused")]
    NoStructuredReplies {
        /// Contexts asked for.
        contexts: Vec<String>,
    },
    /// The caller's configuration can not be sent.
    #[error("{what} is longer than the protocol's 4096-byte string limit")]
    StringTooLong {
        /// Which string.
        what: &'static str,
    },
    /// [`crate::Handshake::feed`] was called while the machine waits for
    /// the driver's TLS handshake.
    #[error("handshake fed while a TLS upgrade is pending: call Handshake::tls_started first")]
    TlsPending,
    /// [`crate::Handshake::tls_started`] was called with no upgrade pending.
    #[error("Handshake::tls_started called, but the server has not acknowledged NBD_OPT_STARTTLS")]
    NotStartingTls,
    /// [`crate::Handshake::feed`] got a different number of bytes than it asked for.
    #[error("handshake fed {found} bytes, expected {expected}")]
    WrongFeed {
        /// Bytes expected.
        expected: usize,
        /// Bytes given.
        found: usize,
    },
}

pub(crate) fn suffix(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// Everything a client call can report. Every variant names the URI of the
/// connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URI could not be parsed.
    #[error(transparent)]
    Uri(#[from] crate::uri::UriError),
    /// The socket could not be opened.
    #[error("{uri}: connecting to {target}")]
    Connect {
        /// URI of the connection.
        uri: String,
        /// Address or socket path.
        target: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The TLS configuration could not be built (a certificate file
    /// missing or invalid, no CA, a bad host name): nothing was sent.
    #[error("{uri}: TLS setup")]
    Tls {
        /// URI of the connection.
        uri: String,
        /// Cause, naming the file or value (boxed: rustls's errors are
        /// large, and every `Result` of the client carries this type).
        #[source]
        source: Box<crate::tls::TlsConfigError>,
    },
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed. The cause is the
    /// socket's error, or one of kind `InvalidData` wrapping the
    /// [`rustls::Error`] (see [`Error::rustls`]), e.g. `invalid peer
    /// certificate: UnknownIssuer`.
    #[error("{uri}: TLS handshake failed")]
    TlsHandshake {
        /// URI of the connection.
        uri: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The handshake failed.
    #[error("{uri}: handshake")]
    Handshake {
        /// URI of the connection.
        uri: String,
        /// Cause.
        #[source]
        source: HandshakeError,
    },
    /// A socket read or write failed.
    #[error("{uri}: {during}")]
    Io {
        /// URI of the connection.
        uri: String,
        /// What was being done.
        during: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A socket read or write did not finish in time.
    #[error("{uri}: {during}: no progress within {timeout:?}")]
    Timeout {
        /// URI of the connection.
        uri: String,
        /// What was being done.
        during: String,
        /// The configured timeout.
        timeout: Duration,
    },
    /// The server closed the connection.
    #[error("{uri}: server closed the connection during {during}")]
    Closed {
        /// URI of the connection.
        uri: String,
        /// What was being done.
        during: String,
    },
    /// The server broke the protocol in the transmission phase.
    #[error("{uri}: invalid {during}")]
    Protocol {
        /// URI of the connection.
        uri: String,
        /// What was being read, e.g. `reply to NBD_CMD_READ at 0x0+0x1000`.
        during: String,
        /// What was wrong.
        #[source]
        source: ProtocolError,
    },
    /// The server answered a request with an error.
    #[error(
        "{uri}: {command} at {offset:#x}+{length:#x} failed{}: {errno}{}",
        at.map(|a| format!(" at offset {a:#x}")).unwrap_or_default(),
        suffix(message)
    )]
    Server {
        /// URI of the connection.
        uri: String,
        /// Command of the request.
        command: Command,
        /// Offset of the request.
        offset: u64,
        /// Length of the request.
        length: u64,
        /// Error value.
        errno: Errno,
        /// Server's message, possibly empty.
        message: String,
        /// Where the error happened (`NBD_REPLY_TYPE_ERROR_OFFSET`).
        at: Option<u64>,
    },
    /// A request outside the export.
    #[error("{uri}: range {offset:#x}+{length:#x} is outside the export of {size:#x} bytes")]
    OutOfRange {
        /// URI of the connection.
        uri: String,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        length: u64,
        /// Export size.
        size: u64,
    },
    /// A request that breaks the server's minimum block size.
    #[error(
        "{uri}: range {offset:#x}+{length:#x} is not aligned to the minimum block size {minimum}"
    )]
    Unaligned {
        /// URI of the connection.
        uri: String,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        length: u64,
        /// Minimum block size.
        minimum: u32,
    },
    /// A request refused before anything was sent.
    #[error("{uri}: {reason}")]
    Request {
        /// URI of the connection.
        uri: String,
        /// Why.
        reason: RequestError,
    },
    /// Block status for a context not negotiated on this connection.
    #[error("{uri}: metadata context {name:?} is not available (negotiated: {negotiated:?})")]
    ContextNotNegotiated {
        /// URI of the connection.
        uri: String,
        /// Context asked for.
        name: String,
        /// Contexts the server agreed to.
        negotiated: Vec<String>,
    },
    /// An earlier failure left the connection out of step with the server.
    #[error("{uri}: connection unusable after an earlier error")]
    Poisoned {
        /// URI of the connection.
        uri: String,
    },
}

impl Error {
    /// The rustls error behind a failed TLS handshake, if that is what
    /// this is.
    pub fn rustls(&self) -> Option<&rustls::Error> {
        match self {
            Error::TlsHandshake { source, .. } => source.get_ref()?.downcast_ref(),
            _ => None,
        }
    }
}
