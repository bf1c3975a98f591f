//! The transmission phase as a state machine over bytes, like
//! [`crate::Handshake`]: requests in, request bytes out, reply bytes in,
//! replies routed by cookie, completions out. No I/O.
//!
//! The machine knows, for every command it sends, what reply it expects:
//!
//! | command                | reply                                           |
//! |------------------------|-------------------------------------------------|
//! | `NBD_CMD_READ`         | data chunks into the caller's buffer, holes zeroed ([`ReadReply`]) |
//! | `NBD_CMD_BLOCK_STATUS` | one descriptor chunk per context ([`StatusReply`]) |
//! | `NBD_CMD_WRITE` (payload follows the header), `NBD_CMD_WRITE_ZEROES`, `NBD_CMD_TRIM`, `NBD_CMD_FLUSH` | an acknowledgement or an error ([`AckReply`]) |
//! | `NBD_CMD_DISC`         | none                                            |
//!
//! A driver (the blocking [`crate::Client`], or a fuzz target) loops:
//!
//! 1. [`Transmission::request`] for each request, then sends
//!    [`Transmission::output`] (and, after a write's header, its payload)
//!    and calls [`Transmission::clear_output`];
//! 2. while [`Transmission::want`] asks for something: reads exactly
//!    [`Want::Bytes`] bytes and passes them to [`Transmission::feed`], or
//!    reads [`Want::Data`] into that range of its read buffer, or zeroes the
//!    [`Want::Zero`] range, then calls [`Transmission::filled`]. Either call
//!    may return a [`Completion`].
//!
//! [`Transmission::step`] is that second loop's body over any
//! `read_exact`-like function, so every driver shares it.
//!
//! Read data never passes through the machine: a read request names where
//! its bytes go in the driver's buffer ([`Op::Read::dest`]), and the
//! machine answers with ranges of that buffer.

use std::collections::HashMap;
use std::ops::Range;

use crate::error::{ProtocolError, ReplyError, RequestError};
use crate::handshake::{BlockSize, Negotiated};
use crate::reply::{AckReply, ReadReply, ServerError, StatusReply};
use crate::types::{ChunkType, Command, ContextId, Cookie, HeaderMode};
use crate::wire::{
    Chunk, ChunkHeader, Descriptor, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE, ReplyHeader, Request, SIMPLE_REPLY_MAGIC, TransmissionFlags,
};

/// Largest `NBD_CMD_READ` or `NBD_CMD_WRITE` payload sent, whatever the
/// server advertises: 2^25, the size every server must accept (spec: "Size
/// constraints"), and libnbd's limit.
pub const MAX_PAYLOAD: u64 = 32 << 20;

/// The largest minimum block size the spec allows. Compact effect lengths
/// stay this far below 2^32: nbdkit 1.32 aborts on a block status request
/// of 0xffffffff (protocol.c, extents_to_block_descriptors), and its
/// blocksize filter, which advertises a minimum of 1 whatever its
/// `minblock`, on one that rounding up to `minblock` carries past 2^32.
pub const MAX_MINIMUM_BLOCK: u64 = 1 << 16;

/// How requests must be and should be sized on a connection, from the
/// server's block size constraints and the header mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Every offset and length is a multiple of this, except a length that
    /// ends at the end of the export: [`BlockSize::alignment`].
    pub alignment: u64,
    /// Requests should be multiples of this where possible: the preferred
    /// block size, at least the alignment.
    pub preferred: u64,
    /// Largest `NBD_CMD_READ` or `NBD_CMD_WRITE` payload: the server's
    /// maximum, at most [`MAX_PAYLOAD`], a multiple of the alignment.
    pub max_payload: u64,
    /// Largest effect length of a request without payload
    /// (`NBD_CMD_BLOCK_STATUS`, `NBD_CMD_WRITE_ZEROES`, `NBD_CMD_TRIM`):
    /// with compact headers 2^32 minus [`MAX_MINIMUM_BLOCK`] (at most 2^32
    /// minus the minimum block size, as libnbd's nbdinfo asks); with
    /// extended headers 2^62, as nbdinfo asks for the whole export.
    pub max_effect: u64,
}

impl Limits {
    /// The limits for `block_size` in header `mode`.
    pub fn new(block_size: BlockSize, mode: HeaderMode) -> Limits {
        let alignment = u64::from(block_size.alignment()).max(1);
        let down = |n: u64| (n / alignment * alignment).max(alignment);
        let max_effect = if mode == HeaderMode::Extended {
            1 << 62
        } else {
            (1 << 32) - MAX_MINIMUM_BLOCK.max(alignment)
        };
        Limits {
            alignment,
            preferred: u64::from(block_size.preferred).max(alignment),
            max_payload: down(u64::from(block_size.maximum).min(MAX_PAYLOAD)),
            max_effect: down(max_effect),
        }
    }
}

/// Flags of `NBD_CMD_WRITE_ZEROES`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// `NBD_CMD_FLAG_NO_HOLE`: allocate the zeros instead of punching a hole.
    pub no_hole: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail with `NBD_ENOTSUP` rather than zero
    /// slowly (needs `NBD_FLAG_SEND_FAST_ZERO`).
    pub fast: bool,
    /// `NBD_CMD_FLAG_FUA`: on stable storage before the reply (needs
    /// `NBD_FLAG_SEND_FUA`).
    pub fua: bool,
}

/// One request to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `NBD_CMD_READ`.
    Read {
        /// First byte.
        offset: u64,
        /// Bytes to read.
        length: u64,
        /// Where the first byte goes in the driver's read buffer.
        dest: usize,
    },
    /// `NBD_CMD_WRITE`; the driver sends `length` payload bytes right
    /// after the header.
    Write {
        /// First byte.
        offset: u64,
        /// Bytes of payload.
        length: u64,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes {
        /// First byte.
        offset: u64,
        /// Bytes to zero.
        length: u64,
        /// Command flags.
        flags: ZeroFlags,
    },
    /// `NBD_CMD_TRIM`.
    Trim {
        /// First byte.
        offset: u64,
        /// Bytes to trim.
        length: u64,
        /// `NBD_CMD_FLAG_FUA`.
        fua: bool,
    },
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_BLOCK_STATUS` for every negotiated context.
    BlockStatus {
        /// First byte.
        offset: u64,
        /// Bytes to describe.
        length: u64,
        /// `NBD_CMD_FLAG_REQ_ONE`: one descriptor per context.
        req_one: bool,
    },
}

impl Op {
    /// The command sent for this request.
    pub fn command(&self) -> Command {
        match self {
            Op::Read { .. } => Command::READ,
            Op::Write { .. } => Command::WRITE,
            Op::WriteZeroes { .. } => Command::WRITE_ZEROES,
            Op::Trim { .. } => Command::TRIM,
            Op::Flush => Command::FLUSH,
            Op::BlockStatus { .. } => Command::BLOCK_STATUS,
        }
    }

    /// Offset and length on the wire (0 and 0 for a flush).
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Op::Read { offset, length, .. }
            | Op::Write { offset, length, .. }
            | Op::WriteZeroes { offset, length, .. }
            | Op::Trim { offset, length, .. }
            | Op::BlockStatus { offset, length, .. } => (offset, length),
            Op::Flush => (0, 0),
        }
    }

    fn flags(&self) -> u16 {
        let fua = |on: bool| if on { NBD_CMD_FLAG_FUA } else { 0 };
        match *self {
            Op::Write { fua: f, .. } | Op::Trim { fua: f, .. } => fua(f),
            Op::WriteZeroes { flags, .. } => {
                let mut v = fua(flags.fua);
                if flags.no_hole {
                    v |= NBD_CMD_FLAG_NO_HOLE;
                }
                if flags.fast {
                    v |= NBD_CMD_FLAG_FAST_ZERO;
                }
                v
            }
            Op::BlockStatus { req_one: true, .. } => NBD_CMD_FLAG_REQ_ONE,
            _ => 0,
        }
    }
}

/// What a completed request produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// `NBD_CMD_READ`: every byte of the request's range of the buffer is
    /// filled.
    Read,
    /// `NBD_CMD_BLOCK_STATUS`: the descriptors of each negotiated context,
    /// from the request's offset.
    Status(Vec<(ContextId, Vec<Descriptor>)>),
    /// Any other command: done.
    Ack,
}

/// A request whose reply is complete. A server error leaves the connection
/// usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The request's cookie, as [`Transmission::request`] returned it.
    pub cookie: Cookie,
    /// Its command.
    pub command: Command,
    /// Its offset.
    pub offset: u64,
    /// Its length.
    pub length: u64,
    /// The reply, or the error the server reported.
    pub outcome: Result<Reply, ServerError>,
}

/// What the machine needs next from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    /// Exactly this many bytes, for [`Transmission::feed`].
    Bytes(usize),
    /// Read data: exactly `range.len()` bytes into this range of the read
    /// buffer, then [`Transmission::filled`].
    Data(Range<usize>),
    /// A hole in a read reply: zero this range of the read buffer, then
    /// [`Transmission::filled`].
    Zero(Range<usize>),
    /// Nothing: no reply is outstanding, or the connection failed.
    Nothing,
}

/// A failure of [`Transmission::step`]: the byte source's, or the
/// server's.
#[derive(Debug, thiserror::Error)]
pub enum StepError<E: std::error::Error + 'static> {
    /// Reading failed.
    #[error("{during}")]
    Read {
        /// What was being read.
        during: String,
        /// The byte source's error.
        #[source]
        source: E,
    },
    /// The server broke the protocol.
    #[error(transparent)]
    Reply(#[from] ReplyError),
}

/// A request on the wire whose reply is not complete.
#[derive(Debug)]
struct InFlight {
    command: Command,
    offset: u64,
    length: u64,
    expect: Expect,
}

impl InFlight {
    fn during(&self) -> String {
        format!(
            "reply to {} at {:#x}+{:#x}",
            self.command, self.offset, self.length
        )
    }
}

/// The reply a request expects, with its tracker.
#[derive(Debug)]
enum Expect {
    Read { dest: usize, tracker: ReadReply },
    Status(StatusReply),
    Ack(AckReply),
}

/// Where the machine is in the server's byte stream.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Recv {
    /// At a message boundary: the 4-byte magic comes next.
    Magic,
    /// The rest of a header of `len` bytes in all.
    HeaderRest { magic: [u8; 4], len: usize },
    /// The data of a successful simple reply to a read.
    SimpleData { cookie: Cookie, range: Range<usize> },
    /// The offset before an `OFFSET_DATA` chunk's data.
    DataPrefix { chunk: ChunkHeader, len: u64 },
    /// An `OFFSET_DATA` chunk's data.
    Data {
        chunk: ChunkHeader,
        range: Range<usize>,
    },
    /// A hole for the driver to zero.
    Zero {
        chunk: ChunkHeader,
        range: Range<usize>,
    },
    /// The payload of any other chunk.
    Payload { chunk: ChunkHeader, len: usize },
}

/// The client side of the transmission phase. See the module docs for the
/// driver loop.
///
/// ```
/// use sparsekit_nbd::transmission::{Completion, Op, Reply, Transmission, Want};
/// use sparsekit_nbd::{BlockSize, HeaderMode, Negotiated, TransmissionFlags};
///
/// let neg = Negotiated {
///     export: String::new(),
///     size: 1 << 20,
///     flags: TransmissionFlags(1),
///     block_size: BlockSize::default(),
///     mode: HeaderMode::Simple,
///     contexts: vec![],
///     available_contexts: None,
///     description: None,
///     canonical_name: None,
///     tls: false,
/// };
/// let mut t = Transmission::new(&neg);
/// let cookie = t.request(Op::Read { offset: 0, length: 512, dest: 0 }).unwrap();
/// assert_eq!(t.output().len(), 28); // one compact request header
/// t.clear_output();
///
/// let mut buf = [0u8; 512];
/// assert_eq!(t.want(), Want::Bytes(4)); // a reply's magic
/// t.feed(&[0x67, 0x44, 0x66, 0x98]).unwrap(); // NBD_SIMPLE_REPLY_MAGIC
/// assert_eq!(t.want(), Want::Bytes(12)); // error and cookie
/// let mut rest = [0u8; 12];
/// rest[4..].copy_from_slice(&cookie.0.to_be_bytes());
/// t.feed(&rest).unwrap();
/// assert_eq!(t.want(), Want::Data(0..512)); // straight into `buf`
/// buf.fill(7);
/// let done = t.filled().unwrap().unwrap();
/// assert_eq!(done.outcome, Ok(Reply::Read));
/// assert_eq!(t.want(), Want::Nothing);
/// ```
#[derive(Debug)]
pub struct Transmission {
    mode: HeaderMode,
    size: u64,
    flags: TransmissionFlags,
    limits: Limits,
    contexts: Vec<ContextId>,
    next_cookie: u64,
    in_flight: HashMap<Cookie, InFlight>,
    out: Vec<u8>,
    recv: Recv,
    /// Reused by [`Transmission::step`] for [`Want::Bytes`].
    scratch: Vec<u8>,
    failed: Option<ReplyError>,
    disconnected: bool,
}

impl Transmission {
    /// The transmission phase of a connection that negotiated `neg`.
    pub fn new(neg: &Negotiated) -> Transmission {
        Transmission {
            mode: neg.mode,
            size: neg.size,
            flags: neg.flags,
            limits: Limits::new(neg.block_size, neg.mode),
            contexts: neg.contexts.iter().map(|c| c.id).collect(),
            next_cookie: 1,
            in_flight: HashMap::new(),
            out: Vec::new(),
            recv: Recv::Magic,
            scratch: Vec::new(),
            failed: None,
            disconnected: false,
        }
    }

    /// How requests must be sized on this connection.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Requests sent whose replies are not complete.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// True after a protocol error: nothing more can be sent or received.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Request bytes to send, in order (empty when there are none).
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Forgets [`Transmission::output`] once it is sent.
    pub fn clear_output(&mut self) {
        self.out.clear();
    }

    /// Checks `op` as [`Transmission::request`] would, without sending it.
    pub fn check(&self, op: &Op) -> Result<(), RequestError> {
        let command = op.command();
        if self.failed.is_some() {
            return Err(RequestError::Failed { command });
        }
        if self.disconnected {
            return Err(RequestError::Disconnected { command });
        }
        let writes = matches!(
            op,
            Op::Write { .. } | Op::WriteZeroes { .. } | Op::Trim { .. }
        );
        if writes && self.flags.read_only() {
            return Err(RequestError::ReadOnly { command });
        }
        let needs = |ok: bool, needs: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(RequestError::Unsupported { command, needs })
            }
        };
        match *op {
            Op::Flush => return needs(self.flags.can_flush(), "NBD_FLAG_SEND_FLUSH"),
            Op::Read { .. } => {}
            Op::Write { fua, .. } | Op::Trim { fua, .. } => {
                needs(!fua || self.flags.can_fua(), "NBD_FLAG_SEND_FUA")?;
                if command == Command::TRIM {
                    needs(self.flags.can_trim(), "NBD_FLAG_SEND_TRIM")?;
                }
            }
            Op::WriteZeroes { flags, .. } => {
                needs(self.flags.can_zero(), "NBD_FLAG_SEND_WRITE_ZEROES")?;
                needs(!flags.fua || self.flags.can_fua(), "NBD_FLAG_SEND_FUA")?;
                needs(
                    !flags.fast || self.flags.can_fast_zero(),
                    "NBD_FLAG_SEND_FAST_ZERO",
                )?;
            }
            Op::BlockStatus { .. } => {
                needs(self.mode.structured(), "structured replies")?;
                needs(!self.contexts.is_empty(), "a metadata context")?;
            }
        }
        let (offset, length) = op.range();
        if length == 0 {
            return Err(RequestError::Empty { command, offset });
        }
        self.check_range(offset, length)?;
        let max = match op {
            Op::Read { .. } | Op::Write { .. } => self.limits.max_payload,
            _ if self.mode == HeaderMode::Extended => u64::MAX,
            _ => u32::MAX.into(),
        };
        let fits_buffer = match *op {
            Op::Read { dest, .. } => usize::try_from(length)
                .ok()
                .and_then(|l| dest.checked_add(l))
                .is_some(),
            _ => true,
        };
        if length > max || !fits_buffer {
            return Err(RequestError::TooLong {
                command,
                length,
                max,
            });
        }
        Ok(())
    }

    /// Checks that `offset..offset + length` lies inside the export and
    /// respects [`Limits::alignment`] (the tail of an export whose size is
    /// not a multiple of it counts as aligned).
    pub fn check_range(&self, offset: u64, length: u64) -> Result<(), RequestError> {
        if offset.checked_add(length).is_none_or(|end| end > self.size) {
            return Err(RequestError::OutOfRange {
                offset,
                length,
                size: self.size,
            });
        }
        let a = self.limits.alignment;
        let end = offset + length;
        if !offset.is_multiple_of(a) || (!end.is_multiple_of(a) && end != self.size) {
            return Err(RequestError::Unaligned {
                offset,
                length,
                alignment: a,
            });
        }
        Ok(())
    }

    /// Queues `op`'s request header in [`Transmission::output`] and returns
    /// its cookie. For [`Op::Write`] the driver sends the payload right
    /// after the output.
    pub fn request(&mut self, op: Op) -> Result<Cookie, RequestError> {
        self.check(&op)?;
        let command = op.command();
        let (offset, length) = op.range();
        let cookie = Cookie(self.next_cookie);
        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
        Request {
            flags: op.flags(),
            command,
            cookie,
            offset,
            length,
        }
        .encode(self.mode, &mut self.out)
        .map_err(|_| RequestError::TooLong {
            command,
            length,
            max: u32::MAX.into(),
        })?;
        let expect = match op {
            Op::Read { dest, .. } => Expect::Read {
                dest,
                tracker: ReadReply::new(offset, length),
            },
            Op::BlockStatus { req_one, .. } => Expect::Status(StatusReply::new(
                offset,
                length,
                req_one,
                self.contexts.clone(),
            )),
            _ => Expect::Ack(AckReply::new(command, offset, length)),
        };
        self.in_flight.insert(
            cookie,
            InFlight {
                command,
                offset,
                length,
                expect,
            },
        );
        Ok(cookie)
    }

    /// Queues `NBD_CMD_DISC`, which has no reply; the machine takes no
    /// further requests.
    pub fn disconnect(&mut self) -> Result<(), RequestError> {
        let command = Command::DISC;
        if self.failed.is_some() {
            return Err(RequestError::Failed { command });
        }
        if self.disconnected {
            return Err(RequestError::Disconnected { command });
        }
        self.disconnected = true;
        let cookie = Cookie(self.next_cookie);
        Request {
            flags: 0,
            command,
            cookie,
            offset: 0,
            length: 0,
        }
        .encode(self.mode, &mut self.out)
        .expect("a zero length fits every header");
        Ok(())
    }

    /// What the machine needs next from the server.
    pub fn want(&self) -> Want {
        if self.failed.is_some() {
            return Want::Nothing;
        }
        match &self.recv {
            Recv::Magic if self.in_flight.is_empty() => Want::Nothing,
            Recv::Magic => Want::Bytes(4),
            Recv::HeaderRest { len, .. } => Want::Bytes(len - 4),
            Recv::DataPrefix { .. } => Want::Bytes(Chunk::DATA_PREFIX_LEN),
            Recv::Payload { len, .. } => Want::Bytes(*len),
            Recv::SimpleData { range, .. } | Recv::Data { range, .. } => Want::Data(range.clone()),
            Recv::Zero { range, .. } => Want::Zero(range.clone()),
        }
    }

    /// What the bytes wanted now belong to, for error messages.
    pub fn reading(&self) -> String {
        let request = |cookie: &Cookie| {
            self.in_flight
                .get(cookie)
                .map_or_else(|| "a reply".to_owned(), InFlight::during)
        };
        match &self.recv {
            Recv::Magic | Recv::HeaderRest { .. } => "reading a reply header".into(),
            Recv::SimpleData { cookie, .. } => request(cookie),
            Recv::DataPrefix { chunk, .. }
            | Recv::Data { chunk, .. }
            | Recv::Zero { chunk, .. }
            | Recv::Payload { chunk, .. } => request(&chunk.cookie),
        }
    }

    /// Consumes exactly the [`Want::Bytes`] asked for. Returns the request
    /// this completed, if any. After an error, every call returns it again.
    pub fn feed(&mut self, input: &[u8]) -> Result<Option<Completion>, ReplyError> {
        self.guard(|t| t.feed_inner(input))
    }

    /// Says that the [`Want::Data`] range was read, or the [`Want::Zero`]
    /// range zeroed. Returns the request this completed, if any.
    pub fn filled(&mut self) -> Result<Option<Completion>, ReplyError> {
        self.guard(Transmission::filled_inner)
    }

    /// Satisfies one [`Want`] from `read_exact` (which fills its whole
    /// argument or fails) and `buf` (the read buffer the requests' `dest`
    /// offsets point into). Returns the request this completed, if any;
    /// `Ok(None)` also when nothing is wanted.
    ///
    /// # Panics
    ///
    /// If `buf` does not hold a range a read request named.
    pub fn step<E: std::error::Error + 'static>(
        &mut self,
        buf: &mut [u8],
        mut read_exact: impl FnMut(&mut [u8]) -> Result<(), E>,
    ) -> Result<Option<Completion>, StepError<E>> {
        let during = |t: &Transmission, source| StepError::Read {
            during: t.reading(),
            source,
        };
        match self.want() {
            Want::Nothing => Ok(None),
            Want::Bytes(n) => {
                let mut scratch = std::mem::take(&mut self.scratch);
                scratch.clear();
                scratch.resize(n, 0);
                let r = match read_exact(&mut scratch) {
                    Ok(()) => self.feed(&scratch).map_err(StepError::from),
                    Err(e) => Err(during(self, e)),
                };
                self.scratch = scratch;
                r
            }
            Want::Data(r) => {
                let dst = buf
                    .get_mut(r)
                    .expect("the read buffer holds every range its requests named");
                read_exact(dst).map_err(|e| during(self, e))?;
                Ok(self.filled()?)
            }
            Want::Zero(r) => {
                buf.get_mut(r)
                    .expect("the read buffer holds every range its requests named")
                    .fill(0);
                Ok(self.filled()?)
            }
        }
    }

    fn guard(
        &mut self,
        f: impl FnOnce(&mut Transmission) -> Result<Option<Completion>, ReplyError>,
    ) -> Result<Option<Completion>, ReplyError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = f(self);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn fail<T>(during: String, source: ProtocolError) -> Result<T, ReplyError> {
        Err(ReplyError { during, source })
    }

    /// A driver that fed or filled out of turn (a bug in the driver).
    fn misfed(&self, what: &'static str, found: usize) -> ReplyError {
        let expected = match self.want() {
            Want::Bytes(n) => n,
            _ => 0,
        };
        ReplyError {
            during: self.reading(),
            source: ProtocolError::WrongLength {
                what,
                expected,
                found,
            },
        }
    }

    fn feed_inner(&mut self, input: &[u8]) -> Result<Option<Completion>, ReplyError> {
        if self.want() != Want::Bytes(input.len()) {
            return Err(self.misfed("bytes fed to the transmission machine", input.len()));
        }
        match self.recv.clone() {
            Recv::Magic => {
                let magic: [u8; 4] = input.try_into().expect("4 bytes wanted");
                let len = ReplyHeader::len_for_magic(magic, self.mode)
                    .or_else(|e| Self::fail("reading a reply header".into(), e))?;
                self.recv = Recv::HeaderRest { magic, len };
                Ok(None)
            }
            Recv::HeaderRest { magic, .. } => {
                let mut whole = [0u8; 32];
                whole[..4].copy_from_slice(&magic);
                whole[4..4 + input.len()].copy_from_slice(input);
                let header = ReplyHeader::parse(&whole[..4 + input.len()], self.mode)
                    .or_else(|e| Self::fail("reading a reply header".into(), e))?;
                self.header(header)
            }
            Recv::DataPrefix { chunk, len } => {
                let p = self.expect_read(&chunk.cookie);
                let at = Chunk::data_prefix(input).expect("8 bytes wanted");
                let (during, dest, tracker) = p;
                let rel = tracker.data(at, len).or_else(|e| Self::fail(during, e))?;
                self.recv = Recv::Data {
                    chunk,
                    range: dest + rel.start..dest + rel.end,
                };
                Ok(None)
            }
            Recv::Payload { chunk, .. } => {
                let p = self
                    .in_flight
                    .get_mut(&chunk.cookie)
                    .expect("a chunk's request stays in flight until its last chunk");
                let during = p.during();
                let parsed = Chunk::parse(&chunk, self.mode, input)
                    .or_else(|e| Self::fail(during.clone(), e))?;
                let routed = match &mut p.expect {
                    Expect::Read { dest, tracker } => tracker
                        .chunk(parsed)
                        .map(|hole| hole.map(|z| *dest + z.start..*dest + z.end)),
                    Expect::Status(tracker) => tracker.chunk(parsed).map(|()| None),
                    Expect::Ack(tracker) => tracker.chunk(parsed).map(|()| None),
                };
                match routed.or_else(|e| Self::fail(during, e))? {
                    Some(range) => {
                        self.recv = Recv::Zero { chunk, range };
                        Ok(None)
                    }
                    None => self.end_of_chunk(&chunk),
                }
            }
            Recv::SimpleData { .. } | Recv::Data { .. } | Recv::Zero { .. } => {
                unreachable!("want() says Bytes only in the states above")
            }
        }
    }

    fn filled_inner(&mut self) -> Result<Option<Completion>, ReplyError> {
        match self.recv.clone() {
            Recv::SimpleData { cookie, .. } => {
                self.recv = Recv::Magic;
                let p = self
                    .in_flight
                    .remove(&cookie)
                    .expect("a simple read stays in flight until its data is read");
                Ok(Some(Self::completion(cookie, &p, Ok(Reply::Read))))
            }
            Recv::Data { chunk, .. } | Recv::Zero { chunk, .. } => self.end_of_chunk(&chunk),
            _ => Err(self.misfed("bytes wanted when filled() was called", 0)),
        }
    }

    /// The in-flight read a data chunk belongs to (checked by `header`).
    fn expect_read(&mut self, cookie: &Cookie) -> (String, usize, &mut ReadReply) {
        let p = self
            .in_flight
            .get_mut(cookie)
            .expect("a chunk's request stays in flight until its last chunk");
        let during = p.during();
        match &mut p.expect {
            Expect::Read { dest, tracker } => (during, *dest, tracker),
            _ => unreachable!("data chunks are accepted only for reads"),
        }
    }

    fn completion(cookie: Cookie, p: &InFlight, outcome: Result<Reply, ServerError>) -> Completion {
        Completion {
            cookie,
            command: p.command,
            offset: p.offset,
            length: p.length,
            outcome,
        }
    }

    /// A complete reply header: route it by cookie.
    fn header(&mut self, header: ReplyHeader) -> Result<Option<Completion>, ReplyError> {
        self.recv = Recv::Magic;
        match header {
            ReplyHeader::Simple { cookie, error } => self.simple(cookie, error),
            ReplyHeader::Chunk(chunk) => {
                let mode = self.mode;
                let Some(p) = self.in_flight.get(&chunk.cookie) else {
                    return Self::fail(
                        format!("reading a {} chunk", chunk.chunk_type),
                        ProtocolError::UnknownCookie {
                            cookie: chunk.cookie,
                        },
                    );
                };
                let during = p.during();
                if chunk.chunk_type == ChunkType::OFFSET_DATA {
                    if !matches!(p.expect, Expect::Read { .. }) {
                        return Self::fail(
                            during,
                            ProtocolError::ChunkForWrongCommand {
                                chunk_type: chunk.chunk_type,
                                command: p.command,
                            },
                        );
                    }
                    let len = Chunk::check_len(&chunk, mode, p.length)
                        .or_else(|e| Self::fail(during, e))?;
                    self.recv = Recv::DataPrefix { chunk, len };
                    return Ok(None);
                }
                // Every other payload is capped by check_len (at most 16 MiB
                // for 2^20 extended descriptors).
                let len = Chunk::check_len(&chunk, mode, 0).or_else(|e| Self::fail(during, e))?;
                self.recv = Recv::Payload {
                    chunk,
                    len: usize::try_from(len).expect("check_len caps payloads"),
                };
                if len == 0 {
                    return self.feed_inner(&[]);
                }
                Ok(None)
            }
        }
    }

    fn simple(&mut self, cookie: Cookie, error: u32) -> Result<Option<Completion>, ReplyError> {
        let Some(p) = self.in_flight.get(&cookie) else {
            return Self::fail(
                "reading a simple reply".into(),
                ProtocolError::UnknownCookie { cookie },
            );
        };
        if error != 0 {
            let p = self.in_flight.remove(&cookie).expect("looked up above");
            let e = ServerError {
                errno: crate::types::Errno(error),
                message: String::new(),
                offset: None,
            };
            return Ok(Some(Self::completion(cookie, &p, Err(e))));
        }
        match &p.expect {
            Expect::Read { dest, .. } => {
                if self.mode.structured() {
                    return Self::fail(p.during(), ProtocolError::SimpleReplyToStructuredRead);
                }
                let len = usize::try_from(p.length).expect("checked against the buffer");
                self.recv = Recv::SimpleData {
                    cookie,
                    range: *dest..*dest + len,
                };
                Ok(None)
            }
            Expect::Status(_) => Self::fail(
                p.during(),
                ProtocolError::UnexpectedReplyMagic {
                    magic: SIMPLE_REPLY_MAGIC,
                    mode: self.mode,
                },
            ),
            Expect::Ack(_) => {
                let p = self.in_flight.remove(&cookie).expect("looked up above");
                Ok(Some(Self::completion(cookie, &p, Ok(Reply::Ack))))
            }
        }
    }

    /// A chunk is fully consumed: the request completes if it was the last.
    fn end_of_chunk(&mut self, chunk: &ChunkHeader) -> Result<Option<Completion>, ReplyError> {
        self.recv = Recv::Magic;
        if !chunk.done() {
            return Ok(None);
        }
        let p = self
            .in_flight
            .remove(&chunk.cookie)
            .expect("a chunk's request stays in flight until its last chunk");
        let during = p.during();
        let outcome = match p.expect {
            Expect::Read { tracker, .. } => tracker
                .finish()
                .map(|r| r.map(|()| Reply::Read))
                .or_else(|e| Self::fail(during, e))?,
            Expect::Status(tracker) => tracker
                .finish()
                .map(|r| r.map(Reply::Status))
                .or_else(|e| Self::fail(during, e))?,
            Expect::Ack(tracker) => tracker.finish().map(|()| Reply::Ack),
        };
        Ok(Some(Completion {
            cookie: chunk.cookie,
            command: p.command,
            offset: p.offset,
            length: p.length,
            outcome,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::MetaContext;
    use crate::types::Errno;

    const ALL_FLAGS: u16 = TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_TRIM
        | TransmissionFlags::SEND_WRITE_ZEROES
        | TransmissionFlags::SEND_FAST_ZERO;

    fn negotiated(mode: HeaderMode, flags: u16, block_size: BlockSize) -> Negotiated {
        Negotiated {
            export: String::new(),
            size: 1 << 20,
            flags: TransmissionFlags(flags),
            block_size,
            mode,
            contexts: vec![
                MetaContext {
                    id: ContextId(1),
                    name: "base:allocation".into(),
                },
                MetaContext {
                    id: ContextId(2),
                    name: "qemu:dirty-bitmap:b".into(),
                },
            ],
            available_contexts: None,
            description: None,
            canonical_name: None,
            tls: false,
        }
    }

    fn machine(mode: HeaderMode) -> Transmission {
        Transmission::new(&negotiated(mode, ALL_FLAGS, BlockSize::default()))
    }

    fn advertised(minimum: u32, preferred: u32, maximum: u32) -> BlockSize {
        BlockSize {
            minimum,
            preferred,
            maximum,
            advertised: true,
        }
    }

    /// Feeds `server` through `step`, as every driver does; returns the
    /// completions and the first error.
    fn drive(
        t: &mut Transmission,
        mut server: &[u8],
        buf: &mut [u8],
    ) -> (Vec<Completion>, Option<ReplyError>) {
        let mut done = Vec::new();
        let mut source = |dst: &mut [u8]| std::io::Read::read_exact(&mut server, dst);
        while t.want() != Want::Nothing {
            match t.step(buf, &mut source) {
                Ok(Some(c)) => done.push(c),
                Ok(None) => {}
                Err(StepError::Reply(e)) => return (done, Some(e)),
                Err(StepError::Read { during, .. }) => panic!("fixture too short: {during}"),
            }
        }
        (done, None)
    }

    #[rustfmt::skip]
    fn simple(cookie: u8, error: u8) -> Vec<u8> {
        vec![
            0x67, 0x44, 0x66, 0x98, // NBD_SIMPLE_REPLY_MAGIC
            0, 0, 0, error, // error
            0, 0, 0, 0, 0, 0, 0, cookie, // cookie
        ]
    }

    #[rustfmt::skip]
    fn structured(cookie: u8, flags: u8, chunk_type: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![
            0x66, 0x8e, 0x33, 0xef, // NBD_STRUCTURED_REPLY_MAGIC
            0, flags, // flags (1: NBD_REPLY_FLAG_DONE)
        ];
        v.extend(chunk_type.to_be_bytes()); // type
        v.extend([0, 0, 0, 0, 0, 0, 0, cookie]); // cookie
        v.extend((payload.len() as u32).to_be_bytes()); // payload length
        v.extend(payload);
        v
    }

    #[rustfmt::skip]
    fn extended(cookie: u8, flags: u8, chunk_type: u16, offset: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![
            0x6e, 0x8a, 0x27, 0x8c, // NBD_EXTENDED_REPLY_MAGIC
            0, flags, // flags
        ];
        v.extend(chunk_type.to_be_bytes()); // type
        v.extend([0, 0, 0, 0, 0, 0, 0, cookie]); // cookie
        v.extend(offset.to_be_bytes()); // the request's offset, echoed
        v.extend((payload.len() as u64).to_be_bytes()); // payload length (64 bits)
        v.extend(payload);
        v
    }

    const DONE: u8 = 1;

    #[test]
    fn limits_follow_the_block_size_constraints() {
        let l = Limits::new(BlockSize::default(), HeaderMode::Structured);
        assert_eq!(
            l,
            Limits {
                alignment: 512,
                preferred: 4096,
                max_payload: 32 << 20,
                max_effect: 0xffff_0000,
            }
        );
        let l = Limits::new(advertised(4096, 65536, 1 << 20), HeaderMode::Structured);
        assert_eq!(
            (l.alignment, l.preferred, l.max_payload),
            (4096, 65536, 1 << 20)
        );
        // A minimum of 1 is honoured for reads, but status stays clear of
        // what nbdkit 1.32 can not take.
        let l = Limits::new(advertised(1, 4096, u32::MAX), HeaderMode::Structured);
        assert_eq!(
            (l.alignment, l.max_payload, l.max_effect),
            (1, 32 << 20, 0xffff_0000)
        );
        // A maximum that is no multiple of the minimum is rounded down.
        let l = Limits::new(advertised(4096, 4096, 100_000), HeaderMode::Structured);
        assert_eq!(l.max_payload, 24 * 4096);
        let l = Limits::new(advertised(65536, 65536, 1 << 25), HeaderMode::Extended);
        assert_eq!(l.max_effect, 1 << 62);
    }

    #[test]
    fn request_bytes_for_every_command() {
        let mut t = machine(HeaderMode::Structured);
        let ops = [
            Op::Read {
                offset: 0x1000,
                length: 0x200,
                dest: 0,
            },
            Op::Write {
                offset: 0x1000,
                length: 0x200,
                fua: true,
            },
            Op::WriteZeroes {
                offset: 0x2000,
                length: 0x400,
                flags: ZeroFlags {
                    no_hole: true,
                    fast: true,
                    fua: false,
                },
            },
            Op::Trim {
                offset: 0,
                length: 0x200,
                fua: false,
            },
            Op::Flush,
            Op::BlockStatus {
                offset: 0,
                length: 1 << 20,
                req_one: true,
            },
        ];
        for (i, op) in ops.into_iter().enumerate() {
            assert_eq!(t.request(op).unwrap(), Cookie(i as u64 + 1));
        }
        t.disconnect().unwrap();
        #[rustfmt::skip]
        let expected: [[u8; 28]; 7] = [
            [0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, // magic, flags, NBD_CMD_READ
             0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x02, 0], // cookie, offset, length
            [0x25, 0x60, 0x95, 0x13, 0, 0x01, 0, 1, // flags FUA, NBD_CMD_WRITE
             0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x02, 0],
            [0x25, 0x60, 0x95, 0x13, 0, 0x12, 0, 6, // flags NO_HOLE|FAST_ZERO, NBD_CMD_WRITE_ZEROES
             0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 0x04, 0],
            [0x25, 0x60, 0x95, 0x13, 0, 0, 0, 4, // NBD_CMD_TRIM
             0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0],
            [0x25, 0x60, 0x95, 0x13, 0, 0, 0, 3, // NBD_CMD_FLUSH, offset and length 0
             0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0x25, 0x60, 0x95, 0x13, 0, 0x08, 0, 7, // flags REQ_ONE, NBD_CMD_BLOCK_STATUS
             0, 0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0],
            [0x25, 0x60, 0x95, 0x13, 0, 0, 0, 2, // NBD_CMD_DISC
             0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ];
        assert_eq!(t.output(), expected.concat());
        assert_eq!(t.in_flight(), 6, "DISC has no reply");
        assert!(matches!(
            t.request(Op::Flush),
            Err(RequestError::Disconnected { .. })
        ));
    }

    #[test]
    fn refusals_send_nothing() {
        let ro = TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY;
        let mut t = Transmission::new(&negotiated(
            HeaderMode::Structured,
            ro,
            BlockSize::default(),
        ));
        let refused = |t: &mut Transmission, op: Op| {
            let e = t.request(op).unwrap_err();
            assert!(t.output().is_empty() && t.in_flight() == 0, "{op:?}");
            e
        };
        let w = Op::Write {
            offset: 0,
            length: 512,
            fua: false,
        };
        assert_eq!(
            refused(&mut t, w),
            RequestError::ReadOnly {
                command: Command::WRITE
            }
        );
        let z = Op::WriteZeroes {
            offset: 0,
            length: 512,
            flags: ZeroFlags::default(),
        };
        assert!(matches!(refused(&mut t, z), RequestError::ReadOnly { .. }));
        let trim = Op::Trim {
            offset: 0,
            length: 512,
            fua: false,
        };
        assert!(matches!(
            refused(&mut t, trim),
            RequestError::ReadOnly { .. }
        ));
        // Flags the server did not advertise.
        let e = refused(&mut t, Op::Flush);
        assert_eq!(
            e.to_string(),
            "NBD_CMD_FLUSH: the server does not offer NBD_FLAG_SEND_FLUSH"
        );

        let bare = TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_WRITE_ZEROES;
        let mut t = Transmission::new(&negotiated(
            HeaderMode::Structured,
            bare,
            BlockSize::default(),
        ));
        let fast = Op::WriteZeroes {
            offset: 0,
            length: 512,
            flags: ZeroFlags {
                fast: true,
                ..ZeroFlags::default()
            },
        };
        assert!(matches!(
            refused(&mut t, fast),
            RequestError::Unsupported {
                needs: "NBD_FLAG_SEND_FAST_ZERO",
                ..
            }
        ));
        let fua = Op::Write {
            offset: 0,
            length: 512,
            fua: true,
        };
        assert!(matches!(
            refused(&mut t, fua),
            RequestError::Unsupported { .. }
        ));

        // Ranges: empty, outside, unaligned (512 when nothing advertised),
        // longer than a payload.
        let mut t = machine(HeaderMode::Structured);
        let read = |offset, length| Op::Read {
            offset,
            length,
            dest: 0,
        };
        assert!(matches!(
            refused(&mut t, read(0, 0)),
            RequestError::Empty { .. }
        ));
        assert!(matches!(
            refused(&mut t, read((1 << 20) - 512, 1024)),
            RequestError::OutOfRange { .. }
        ));
        assert!(matches!(
            refused(&mut t, read(u64::MAX, 2)),
            RequestError::OutOfRange { .. }
        ));
        assert!(matches!(
            refused(&mut t, read(100, 512)),
            RequestError::Unaligned { alignment: 512, .. }
        ));
        assert!(matches!(
            refused(&mut t, read(0, 1000)),
            RequestError::Unaligned { .. }
        ));
        let mut big = negotiated(HeaderMode::Structured, ALL_FLAGS, BlockSize::default());
        big.size = 1 << 40;
        let mut t = Transmission::new(&big);
        assert_eq!(
            refused(&mut t, read(0, (32 << 20) + 512)),
            RequestError::TooLong {
                command: Command::READ,
                length: (32 << 20) + 512,
                max: 32 << 20
            }
        );
        // Compact headers carry 32-bit lengths; extended ones do not.
        let status = Op::BlockStatus {
            offset: 0,
            length: 1 << 32,
            req_one: false,
        };
        assert!(matches!(
            refused(&mut t, status),
            RequestError::TooLong { .. }
        ));
        big.mode = HeaderMode::Extended;
        assert!(Transmission::new(&big).request(status).is_ok());
        // Block status needs structured replies and a context.
        big.mode = HeaderMode::Simple;
        let mut t = Transmission::new(&big);
        let status = Op::BlockStatus {
            offset: 0,
            length: 512,
            req_one: false,
        };
        assert!(matches!(
            refused(&mut t, status),
            RequestError::Unsupported { .. }
        ));
    }

    #[test]
    fn the_unaligned_tail_of_an_export_is_reachable() {
        let mut n = negotiated(
            HeaderMode::Structured,
            ALL_FLAGS,
            advertised(4096, 4096, 1 << 20),
        );
        n.size = 10_000;
        let mut t = Transmission::new(&n);
        t.request(Op::Read {
            offset: 8192,
            length: 10_000 - 8192,
            dest: 0,
        })
        .unwrap();
        assert!(
            t.request(Op::Read {
                offset: 8192,
                length: 1000,
                dest: 0
            })
            .is_err()
        );
    }

    #[test]
    fn structured_reads_routed_by_cookie_into_the_buffer() {
        let mut t = machine(HeaderMode::Structured);
        let mut buf = vec![0xffu8; 2048];
        t.request(Op::Read {
            offset: 0,
            length: 1024,
            dest: 0,
        })
        .unwrap();
        t.request(Op::Read {
            offset: 1024,
            length: 1024,
            dest: 1024,
        })
        .unwrap();
        let mut server = Vec::new();
        // Cookie 2 first: all data.
        let mut p = 1024u64.to_be_bytes().to_vec(); // offset
        p.extend([2u8; 1024]); // data
        server.extend(structured(2, DONE, 1, &p)); // NBD_REPLY_TYPE_OFFSET_DATA
        // Cookie 1: a hole for the first half, then data, done on an empty NONE.
        #[rustfmt::skip]
        let hole = [
            0, 0, 0, 0, 0, 0, 0, 0, // offset 0
            0, 0, 0x02, 0, // length 512
        ];
        server.extend(structured(1, 0, 2, &hole)); // NBD_REPLY_TYPE_OFFSET_HOLE
        let mut p = 512u64.to_be_bytes().to_vec();
        p.extend([1u8; 512]);
        server.extend(structured(1, 0, 1, &p));
        server.extend(structured(1, DONE, 0, &[])); // NBD_REPLY_TYPE_NONE

        let (done, err) = drive(&mut t, &server, &mut buf);
        assert_eq!(err, None);
        let cookies: Vec<_> = done
            .iter()
            .map(|c| (c.cookie.0, c.outcome.clone()))
            .collect();
        assert_eq!(cookies, [(2, Ok(Reply::Read)), (1, Ok(Reply::Read))]);
        assert!(buf[..512].iter().all(|&b| b == 0));
        assert!(buf[512..1024].iter().all(|&b| b == 1));
        assert!(buf[1024..].iter().all(|&b| b == 2));
    }

    #[test]
    fn wants_name_buffer_ranges_not_bytes() {
        let mut t = machine(HeaderMode::Structured);
        t.request(Op::Read {
            offset: 4096,
            length: 1024,
            dest: 100,
        })
        .unwrap();
        let mut p = 4608u64.to_be_bytes().to_vec();
        p.extend([9u8; 512]);
        let reply = structured(1, 0, 1, &p);
        t.feed(&reply[..4]).unwrap();
        t.feed(&reply[4..20]).unwrap();
        assert_eq!(t.want(), Want::Bytes(8)); // the data's offset
        t.feed(&reply[20..28]).unwrap();
        // The second half of the request, at dest 100 + 512.
        assert_eq!(t.want(), Want::Data(612..1124));
        assert_eq!(t.filled().unwrap(), None);
        assert_eq!(t.want(), Want::Bytes(4));
    }

    #[test]
    fn simple_replies_errors_and_data() {
        let mut t = machine(HeaderMode::Simple);
        let mut buf = vec![0u8; 1024];
        t.request(Op::Read {
            offset: 0,
            length: 512,
            dest: 0,
        })
        .unwrap();
        t.request(Op::Read {
            offset: 512,
            length: 512,
            dest: 512,
        })
        .unwrap();
        t.request(Op::Flush).unwrap();
        let mut server = simple(1, 5); // NBD_EIO for the first read: no data follows
        server.extend(simple(3, 0)); // flush done
        server.extend(simple(2, 0));
        server.extend([7u8; 512]); // the second read's data
        let (done, err) = drive(&mut t, &server, &mut buf);
        assert_eq!(err, None);
        assert_eq!(done[0].outcome.as_ref().unwrap_err().errno, Errno::EIO);
        assert_eq!(
            (done[1].command, done[1].outcome.clone()),
            (Command::FLUSH, Ok(Reply::Ack))
        );
        assert_eq!(done[2].outcome, Ok(Reply::Read));
        assert!(buf[..512].iter().all(|&b| b == 0) && buf[512..].iter().all(|&b| b == 7));
    }

    #[test]
    fn acknowledgements_and_errors_of_writes() {
        for mode in [HeaderMode::Structured, HeaderMode::Extended] {
            let mut t = machine(mode);
            t.request(Op::Write {
                offset: 0,
                length: 512,
                fua: false,
            })
            .unwrap();
            t.request(Op::WriteZeroes {
                offset: 4096,
                length: 4096,
                flags: ZeroFlags::default(),
            })
            .unwrap();
            t.request(Op::Trim {
                offset: 8192,
                length: 4096,
                fua: false,
            })
            .unwrap();
            t.request(Op::Flush).unwrap();
            let chunk = |cookie, flags, chunk_type, offset, payload: &[u8]| match mode {
                HeaderMode::Extended => extended(cookie, flags, chunk_type, offset, payload),
                _ => structured(cookie, flags, chunk_type, payload),
            };
            #[rustfmt::skip]
            let error_offset = [
                0, 0, 0, 28, // NBD_ENOSPC
                0, 4, b'f', b'u', b'l', b'l', // message
                0, 0, 0, 0, 0, 0, 0x28, 0, // offset 0x2800, inside the trim
            ];
            #[rustfmt::skip]
            let error = [
                0, 0, 0, 5, // NBD_EIO
                0, 0, // no message
            ];
            let mut server = chunk(4, DONE, 0x8001, 0, &error); // flush: NBD_REPLY_TYPE_ERROR
            server.extend(chunk(3, DONE, 0x8002, 8192, &error_offset)); // trim: ERROR_OFFSET
            server.extend(chunk(2, DONE, 0, 4096, &[])); // zeroes: NONE
            server.extend(chunk(1, DONE, 0, 0, &[])); // write: NONE
            let (done, err) = drive(&mut t, &server, &mut []);
            assert_eq!(err, None, "{mode}");
            let got: Vec<_> = done
                .iter()
                .map(|c| {
                    (
                        c.command,
                        c.outcome.as_ref().err().map(|e| (e.errno, e.offset)),
                    )
                })
                .collect();
            assert_eq!(
                got,
                [
                    (Command::FLUSH, Some((Errno::EIO, None))),
                    (Command::TRIM, Some((Errno::ENOSPC, Some(0x2800)))),
                    (Command::WRITE_ZEROES, None),
                    (Command::WRITE, None),
                ],
                "{mode}"
            );
        }
    }

    #[test]
    fn block_status_for_every_context() {
        let mut t = machine(HeaderMode::Extended);
        t.request(Op::BlockStatus {
            offset: 0,
            length: 1 << 20,
            req_one: false,
        })
        .unwrap();
        #[rustfmt::skip]
        let ctx2 = [
            0, 0, 0, 2, // context id 2
            0, 0, 0, 1, // one descriptor
            0, 0, 0, 0, 0, 0x10, 0, 0, // length 1 MiB
            0, 0, 0, 0, 0, 0, 0, 1, // flags: dirty
        ];
        #[rustfmt::skip]
        let ctx1 = [
            0, 0, 0, 1, // context id 1
            0, 0, 0, 2, // two descriptors
            0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, // 4096 bytes of data
            0, 0, 0, 0, 0, 0x0f, 0xf0, 0, 0, 0, 0, 0, 0, 0, 0, 3, // the rest: hole, zero
        ];
        let mut server = extended(1, 0, 6, 0, &ctx2); // NBD_REPLY_TYPE_BLOCK_STATUS_EXT
        server.extend(extended(1, DONE, 6, 0, &ctx1));
        let (done, err) = drive(&mut t, &server, &mut []);
        assert_eq!(err, None);
        let Ok(Reply::Status(v)) = &done[0].outcome else {
            panic!("{done:?}")
        };
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].0, ContextId(1));
        assert_eq!(
            v[1].1[1],
            Descriptor {
                length: (1 << 20) - 4096,
                flags: 3
            }
        );
    }

    #[test]
    fn protocol_errors_are_labelled_and_sticky() {
        let mut t = machine(HeaderMode::Structured);
        t.request(Op::Write {
            offset: 0,
            length: 512,
            fua: false,
        })
        .unwrap();
        let mut p = 0u64.to_be_bytes().to_vec();
        p.extend([0u8; 512]);
        // Read data in reply to a write.
        let (_, err) = drive(&mut t, &structured(1, DONE, 1, &p), &mut []);
        let err = err.unwrap();
        assert_eq!(err.during, "reply to NBD_CMD_WRITE at 0x0+0x200");
        assert!(matches!(
            err.source,
            ProtocolError::ChunkForWrongCommand { .. }
        ));
        assert_eq!(t.want(), Want::Nothing);
        assert_eq!(t.feed(&[0; 4]), Err(err));
        assert!(matches!(
            t.request(Op::Flush),
            Err(RequestError::Failed { .. })
        ));

        // A cookie nobody sent.
        let mut t = machine(HeaderMode::Structured);
        t.request(Op::Flush).unwrap();
        let (_, err) = drive(&mut t, &simple(9, 0), &mut []);
        assert_eq!(
            err.unwrap().source,
            ProtocolError::UnknownCookie { cookie: Cookie(9) }
        );

        // Bytes fed that were not asked for.
        let mut t = machine(HeaderMode::Structured);
        t.request(Op::Flush).unwrap();
        assert!(matches!(
            t.feed(&[0; 3]).unwrap_err().source,
            ProtocolError::WrongLength {
                expected: 4,
                found: 3,
                ..
            }
        ));
    }
}
