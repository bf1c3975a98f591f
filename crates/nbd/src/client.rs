//! A blocking NBD client over TCP or a Unix socket: the only module that
//! touches a socket.
//!
//! [`Client::connect`] opens the socket and drives the sans-IO
//! [`Handshake`]; [`Client::read`] reads into a caller's buffer, splitting
//! at the server's maximum and keeping several requests in flight;
//! [`Client::block_status`] streams the extents of any negotiated metadata
//! context; [`Client::map`] gives the `base:allocation` map as shared
//! [`Extent`]s. Every socket operation is bounded by the configured timeout.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use sparsekit_extent::{Extent, ExtentIterExt};

use crate::error::{Error, HandshakeError, ProtocolError};
use crate::handshake::{BlockSize, Handshake, HandshakeConfig, MetaContext, Negotiated};
use crate::map::{BASE_ALLOCATION, StatusExtent};
use crate::reply::{ReadReply, ServerError, StatusReply};
use crate::uri::{NbdUri, Transport};
use crate::wire::{
    Chunk, ChunkHeader, ChunkType, Command, ContextId, Cookie, Descriptor, Errno, HeaderMode,
    ReplyHeader, Request, TransmissionFlags,
};

/// Largest read sent in one request, whatever the server allows (2^25,
/// the size every server must accept).
pub const MAX_READ_REQUEST: u32 = 32 * 1024 * 1024;

/// Default bytes per read request: [`ClientConfig::read_request`].
pub const DEFAULT_READ_REQUEST: u32 = 256 * 1024;

/// How to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// Metadata contexts to negotiate (default `base:allocation`).
    pub contexts: Vec<String>,
    /// Try `NBD_OPT_EXTENDED_HEADERS` (default true).
    pub extended_headers: bool,
    /// Try `NBD_OPT_STRUCTURED_REPLY` (default true).
    pub structured_replies: bool,
    /// Ask the server for every context it offers (default false).
    pub list_contexts: bool,
    /// Bound on every connect, read and write; `None` waits forever
    /// (default 30 s).
    pub timeout: Option<Duration>,
    /// Requests kept in flight on one connection (default 16, at least 1).
    pub max_in_flight: usize,
    /// Bytes asked for by one read request (default 256 KiB, as nbdcopy):
    /// a long read is split into requests of this size, all in flight at
    /// once, so the server reads some while it sends others. Rounded to the
    /// server's minimum block size and capped by its maximum.
    pub read_request: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            contexts: vec![BASE_ALLOCATION.into()],
            extended_headers: true,
            structured_replies: true,
            list_contexts: false,
            timeout: Some(Duration::from_secs(30)),
            max_in_flight: 16,
            read_request: DEFAULT_READ_REQUEST,
        }
    }
}

#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
    fn shutdown(&self) {
        // Best effort: the peer may already be gone.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// A request on the wire whose reply is not complete yet.
#[derive(Debug)]
enum Pending {
    Read {
        offset: u64,
        length: u64,
        /// Where this request's bytes start in the caller's buffer.
        buf_start: usize,
        tracker: ReadReply,
    },
    Status {
        offset: u64,
        length: u64,
        tracker: StatusReply,
    },
}

impl Pending {
    fn what(&self) -> (Command, u64, u64) {
        match self {
            Pending::Read { offset, length, .. } => (Command::READ, *offset, *length),
            Pending::Status { offset, length, .. } => (Command::BLOCK_STATUS, *offset, *length),
        }
    }
}

/// A request whose reply is complete: its cookie and outcome (a server
/// error leaves the connection usable).
type Completed = (Cookie, Result<Finished, Error>);

/// What a completed request produced.
#[derive(Debug)]
enum Finished {
    Read,
    Status(Vec<(ContextId, Vec<Descriptor>)>),
}

/// A connection to one NBD export.
///
/// Dropping it sends `NBD_CMD_DISC` (unless an error left the connection
/// out of step with the server, in which case it is just closed).
#[derive(Debug)]
pub struct Client {
    stream: Stream,
    uri: String,
    neg: Negotiated,
    timeout: Option<Duration>,
    max_in_flight: usize,
    read_request: u32,
    /// The server refused a status request longer than its maximum
    /// payload: ask for no more from now on.
    status_within_payload: bool,
    next_cookie: u64,
    poisoned: bool,
    disconnected: bool,
}

fn io_error(uri: &str, during: String, e: io::Error, timeout: Option<Duration>) -> Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout {
            uri: uri.into(),
            during,
            timeout: timeout.unwrap_or_default(),
        },
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionAborted => Error::Closed {
            uri: uri.into(),
            during,
        },
        _ => Error::Io {
            uri: uri.into(),
            during,
            source: e,
        },
    }
}

fn open(uri: &NbdUri, shown: &str, timeout: Option<Duration>) -> Result<Stream, Error> {
    let connect_err = |target: String, source: io::Error| Error::Connect {
        uri: shown.into(),
        target,
        source,
    };
    match &uri.transport {
        Transport::Tcp { host, port } => {
            let target = format!("{host}:{port}");
            let addrs = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| connect_err(target.clone(), e))?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address for host");
            for a in addrs {
                let r = match timeout {
                    Some(t) => TcpStream::connect_timeout(&a, t),
                    None => TcpStream::connect(a),
                };
                match r {
                    Ok(s) => {
                        // Requests are small and latency-bound.
                        let _ = s.set_nodelay(true);
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(connect_err(target, last))
        }
        Transport::Unix { socket } => {
            let bytes = socket.as_os_str().as_bytes();
            let target = socket.display().to_string();
            let s = if let Some(name) = bytes.strip_prefix(b"\0") {
                abstract_connect(name)
            } else {
                UnixStream::connect(socket)
            };
            s.map(Stream::Unix).map_err(|e| connect_err(target, e))
        }
    }
}

#[cfg(target_os = "linux")]
fn abstract_connect(name: &[u8]) -> io::Result<UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    UnixStream::connect_addr(&addr)
}

#[cfg(not(target_os = "linux"))]
fn abstract_connect(_name: &[u8]) -> io::Result<UnixStream> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract Unix sockets exist only on Linux",
    ))
}

impl Client {
    /// Connects to an NBD URI with the default [`ClientConfig`].
    pub fn connect(uri: &str) -> Result<Client, Error> {
        Self::connect_with(&NbdUri::parse(uri)?, &ClientConfig::default())
    }

    /// Connects to `uri` and completes the handshake.
    pub fn connect_with(uri: &NbdUri, config: &ClientConfig) -> Result<Client, Error> {
        let shown = uri.to_string();
        let stream = open(uri, &shown, config.timeout)?;
        Self::handshake_on(stream, shown, &uri.export, config)
    }

    /// Runs the handshake on an open stream.
    fn handshake_on(
        stream: Stream,
        shown: String,
        export: &str,
        config: &ClientConfig,
    ) -> Result<Client, Error> {
        stream
            .set_timeouts(config.timeout)
            .map_err(|e| io_error(&shown, "setting socket timeouts".into(), e, config.timeout))?;
        let mut c = Client {
            stream,
            uri: shown,
            neg: Negotiated {
                export: export.into(),
                size: 0,
                flags: TransmissionFlags::default(),
                block_size: BlockSize::default(),
                mode: HeaderMode::Simple,
                contexts: Vec::new(),
                available_contexts: None,
                description: None,
                canonical_name: None,
            },
            timeout: config.timeout,
            max_in_flight: config.max_in_flight.max(1),
            read_request: config.read_request.max(1),
            status_within_payload: false,
            next_cookie: 1,
            poisoned: false,
            // No NBD_CMD_DISC until the transmission phase is reached.
            disconnected: true,
        };
        let hs_config = HandshakeConfig {
            export: export.into(),
            contexts: config.contexts.clone(),
            structured_replies: config.structured_replies,
            extended_headers: config.extended_headers,
            list_contexts: config.list_contexts,
        };
        let mut hs = Handshake::new(hs_config).map_err(|source| Error::Handshake {
            uri: c.uri.clone(),
            source,
        })?;
        let mut buf = Vec::new();
        loop {
            let out = hs.take_output();
            if !out.is_empty() {
                c.write_all(&out, "sending handshake options")?;
            }
            let n = hs.wanted();
            if n == 0 {
                break;
            }
            buf.resize(n, 0);
            c.read_exact(&mut buf, "reading the handshake")?;
            match hs.feed(&buf) {
                Ok(Some(neg)) => {
                    let out = hs.take_output();
                    if !out.is_empty() {
                        c.write_all(&out, "sending handshake options")?;
                    }
                    c.neg = neg;
                    c.disconnected = false;
                    return Ok(c);
                }
                Ok(None) => {}
                Err(source) => {
                    // A refusal leaves both sides at an option boundary:
                    // say goodbye (best effort; the error is what matters).
                    if !matches!(source, HandshakeError::Protocol(_)) {
                        let _ = c.stream.write_all(&Handshake::abort_request());
                    }
                    c.poisoned = true;
                    return Err(Error::Handshake {
                        uri: c.uri.clone(),
                        source,
                    });
                }
            }
        }
        unreachable!("the handshake machine stops asking for bytes only when done")
    }

    /// Opens up to `n` connections to `uri`. More than one only when the
    /// server advertises `NBD_FLAG_CAN_MULTI_CONN`, as the spec asks; check
    /// the length of the result.
    pub fn connect_multi(
        uri: &NbdUri,
        config: &ClientConfig,
        n: usize,
    ) -> Result<Vec<Client>, Error> {
        let first = Self::connect_with(uri, config)?;
        let extra = if first.flags().can_multi_conn() {
            n.saturating_sub(1)
        } else {
            0
        };
        let mut all = vec![first];
        for _ in 0..extra {
            all.push(Self::connect_with(uri, config)?);
        }
        Ok(all)
    }

    /// The URI this client is connected to.
    pub fn uri(&self) -> &str {
        &self.uri
    }
    /// Everything negotiated in the handshake.
    pub fn negotiated(&self) -> &Negotiated {
        &self.neg
    }
    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.neg.size
    }
    /// Transmission flags.
    pub fn flags(&self) -> TransmissionFlags {
        self.neg.flags
    }
    /// Size constraints (advertised, or the spec's defaults).
    pub fn block_size(&self) -> BlockSize {
        self.neg.block_size
    }
    /// Header layout in use.
    pub fn mode(&self) -> HeaderMode {
        self.neg.mode
    }
    /// Metadata contexts negotiated.
    pub fn contexts(&self) -> &[MetaContext] {
        &self.neg.contexts
    }

    fn write_all(&mut self, b: &[u8], during: &str) -> Result<(), Error> {
        self.stream.write_all(b).map_err(|e| {
            self.poisoned = true;
            io_error(&self.uri, during.into(), e, self.timeout)
        })
    }

    fn read_exact(&mut self, b: &mut [u8], during: &str) -> Result<(), Error> {
        self.stream.read_exact(b).map_err(|e| {
            self.poisoned = true;
            io_error(&self.uri, during.into(), e, self.timeout)
        })
    }

    fn check_usable(&self) -> Result<(), Error> {
        if self.poisoned || self.disconnected {
            return Err(Error::Poisoned {
                uri: self.uri.clone(),
            });
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<(), Error> {
        if offset
            .checked_add(length)
            .is_none_or(|end| end > self.neg.size)
        {
            return Err(Error::OutOfRange {
                uri: self.uri.clone(),
                offset,
                length,
                size: self.neg.size,
            });
        }
        Ok(())
    }

    fn cookie(&mut self) -> Cookie {
        let c = Cookie(self.next_cookie);
        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
        c
    }

    fn protocol(&mut self, during: String, source: ProtocolError) -> Error {
        self.poisoned = true;
        Error::Protocol {
            uri: self.uri.clone(),
            during,
            source,
        }
    }

    fn server_error(&self, cmd: Command, offset: u64, length: u64, e: ServerError) -> Error {
        Error::Server {
            uri: self.uri.clone(),
            command: cmd,
            offset,
            length,
            errno: e.errno,
            message: e.message,
            at: e.offset,
        }
    }

    /// Reads one reply message and routes it to its pending request.
    /// Returns the cookie and outcome when that request's reply is
    /// complete. Errors returned directly are fatal for the connection.
    fn recv(
        &mut self,
        pending: &mut HashMap<Cookie, Pending>,
        buf: &mut [u8],
    ) -> Result<Option<Completed>, Error> {
        let mode = self.neg.mode;
        let mut head = [0u8; 32];
        self.read_exact(&mut head[..4], "reading a reply header")?;
        let len = ReplyHeader::len_for_magic(head[..4].try_into().expect("4 bytes"), mode)
            .map_err(|e| self.protocol("reading a reply header".into(), e))?;
        self.read_exact(&mut head[4..len], "reading a reply header")?;
        let header = ReplyHeader::parse(&head[..len], mode)
            .map_err(|e| self.protocol("reading a reply header".into(), e))?;
        match header {
            ReplyHeader::Simple { cookie, error } => {
                let Some(p) = pending.remove(&cookie) else {
                    return Err(self.protocol(
                        "reading a simple reply".into(),
                        ProtocolError::UnknownCookie { cookie },
                    ));
                };
                let (cmd, offset, length) = p.what();
                let during = format!("reply to {cmd} at {offset:#x}+{length:#x}");
                if error != 0 {
                    let e = ServerError {
                        errno: crate::wire::Errno(error),
                        message: String::new(),
                        offset: None,
                    };
                    return Ok(Some((
                        cookie,
                        Err(self.server_error(cmd, offset, length, e)),
                    )));
                }
                match p {
                    Pending::Read { buf_start, .. } => {
                        if mode.structured() {
                            return Err(
                                self.protocol(during, ProtocolError::SimpleReplyToStructuredRead)
                            );
                        }
                        let dst = &mut buf[buf_start..buf_start + length as usize];
                        self.read_exact(dst, &during)?;
                        Ok(Some((cookie, Ok(Finished::Read))))
                    }
                    Pending::Status { .. } => Err(self.protocol(
                        during,
                        ProtocolError::UnexpectedReplyMagic {
                            magic: crate::wire::SIMPLE_REPLY_MAGIC,
                            mode,
                        },
                    )),
                }
            }
            ReplyHeader::Chunk(h) => self.chunk(h, pending, buf),
        }
    }

    fn chunk(
        &mut self,
        h: ChunkHeader,
        pending: &mut HashMap<Cookie, Pending>,
        buf: &mut [u8],
    ) -> Result<Option<Completed>, Error> {
        let mode = self.neg.mode;
        let cookie = h.cookie;
        let Some(p) = pending.get_mut(&cookie) else {
            return Err(self.protocol(
                format!("reading a {} chunk", h.chunk_type),
                ProtocolError::UnknownCookie { cookie },
            ));
        };
        let (cmd, offset, length) = p.what();
        let during = format!("reply to {cmd} at {offset:#x}+{length:#x}");
        let max_data = match p {
            Pending::Read { length, .. } => *length,
            Pending::Status { .. } => 0,
        };
        let checked = Chunk::check_len(&h, mode, max_data);
        let n = match checked {
            Ok(n) => n,
            Err(e) => return Err(self.protocol(during, e)),
        };
        if h.chunk_type == ChunkType::OFFSET_DATA {
            let Pending::Read {
                buf_start, tracker, ..
            } = p
            else {
                return Err(self.protocol(
                    during,
                    ProtocolError::ChunkForWrongCommand {
                        chunk_type: h.chunk_type,
                        command: cmd,
                    },
                ));
            };
            let buf_start = *buf_start;
            let mut prefix = [0u8; 8];
            self.stream
                .read_exact(&mut prefix)
                .map_err(|e| io_error(&self.uri, during.clone(), e, self.timeout))
                .inspect_err(|_| self.poisoned = true)?;
            let at = Chunk::data_prefix(&prefix).expect("8 bytes");
            let range = match tracker.data(at, n) {
                Ok(r) => r,
                Err(e) => return Err(self.protocol(during, e)),
            };
            let dst = &mut buf[buf_start + range.start..buf_start + range.end];
            self.read_exact(dst, &during)?;
        } else {
            // Every other payload is capped by check_len (at most 16 MiB
            // for 2^20 extended descriptors), so this allocation is bounded.
            let mut payload = vec![0u8; n as usize];
            self.read_exact(&mut payload, &during)?;
            let chunk = match Chunk::parse(&h, mode, &payload) {
                Ok(c) => c,
                Err(e) => return Err(self.protocol(during, e)),
            };
            let p = pending.get_mut(&cookie).expect("looked up above");
            let r = match p {
                Pending::Read {
                    buf_start, tracker, ..
                } => tracker.chunk(chunk).map(|zero| {
                    if let Some(z) = zero {
                        buf[*buf_start + z.start..*buf_start + z.end].fill(0);
                    }
                }),
                Pending::Status { tracker, .. } => tracker.chunk(chunk),
            };
            if let Err(e) = r {
                return Err(self.protocol(during, e));
            }
        }
        if !h.done() {
            return Ok(None);
        }
        let p = pending.remove(&cookie).expect("looked up above");
        let outcome = match p {
            Pending::Read { tracker, .. } => tracker.finish().map(|r| r.map(|()| Finished::Read)),
            Pending::Status { tracker, .. } => tracker.finish().map(|r| r.map(Finished::Status)),
        };
        match outcome {
            Ok(Ok(f)) => Ok(Some((cookie, Ok(f)))),
            Ok(Err(se)) => Ok(Some((
                cookie,
                Err(self.server_error(cmd, offset, length, se)),
            ))),
            Err(e) => Err(self.protocol(during, e)),
        }
    }

    /// Size of one read request: the configured size capped by the
    /// server's maximum (and 32 MiB), a multiple of the minimum block size.
    fn max_read(&self) -> u64 {
        let bs = self.neg.block_size;
        let m = u64::from(bs.maximum.min(MAX_READ_REQUEST).min(self.read_request));
        let min = u64::from(bs.minimum);
        (m / min * min).max(min)
    }

    fn check_aligned(&self, offset: u64, length: u64) -> Result<(), Error> {
        let min = self.neg.block_size.minimum;
        let m = u64::from(min);
        // A tail shorter than a block at the end of an unaligned export
        // can only be reached unaligned.
        let end = offset + length;
        if !offset.is_multiple_of(m) || (!end.is_multiple_of(m) && end != self.neg.size) {
            return Err(Error::Unaligned {
                uri: self.uri.clone(),
                offset,
                length,
                minimum: min,
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    ///
    /// The range is split into requests of [`ClientConfig::read_request`]
    /// bytes (at most the server's maximum and 32 MiB); up to `max_in_flight` of them are on the wire at once.
    /// With structured replies, holes are zero-filled and the reply is
    /// checked to describe every byte exactly once. On a server error the
    /// requests already sent are drained, so the connection stays usable,
    /// and the first error is returned.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.check_usable()?;
        let total = buf.len() as u64;
        self.check_range(offset, total)?;
        if total == 0 {
            return Ok(());
        }
        self.check_aligned(offset, total)?;
        let step = self.max_read();
        let mode = self.neg.mode;
        let mut pending: HashMap<Cookie, Pending> = HashMap::new();
        let mut next = 0u64; // relative offset of the next request to send
        let mut first_err: Option<Error> = None;
        loop {
            // Fill the window.
            let mut out = Vec::new();
            while first_err.is_none() && next < total && pending.len() < self.max_in_flight {
                let len = step.min(total - next);
                let cookie = self.cookie();
                let req = Request {
                    flags: 0,
                    command: Command::READ,
                    cookie,
                    offset: offset + next,
                    length: len,
                };
                req.encode(mode, &mut out)
                    .expect("read requests are at most 32 MiB");
                pending.insert(
                    cookie,
                    Pending::Read {
                        offset: offset + next,
                        length: len,
                        buf_start: next as usize,
                        tracker: ReadReply::new(offset + next, len),
                    },
                );
                next += len;
            }
            if !out.is_empty() {
                self.write_all(&out, "sending read requests")?;
            }
            if pending.is_empty() {
                break;
            }
            if let Some((_, Err(e))) = self.recv(&mut pending, buf)? {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn context_id(&self, name: &str) -> Result<ContextId, Error> {
        self.neg
            .contexts
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.id)
            .ok_or_else(|| Error::ContextNotNegotiated {
                uri: self.uri.clone(),
                name: name.into(),
                negotiated: self.neg.contexts.iter().map(|c| c.name.clone()).collect(),
            })
    }

    /// Longest block status request. A status request carries no payload,
    /// so the spec lets its length exceed the maximum payload size: the
    /// whole 32-bit length of compact headers (2^62 with extended ones), as
    /// libnbd asks, so a large sparse export maps in a few round trips
    /// instead of one per 32 MiB. A server that refused such a request
    /// (`NBD_EINVAL`, `NBD_EOVERFLOW`) is asked for its maximum payload
    /// from then on. A multiple of the minimum block size.
    fn max_status(&self) -> u64 {
        let bs = self.neg.block_size;
        let min = u64::from(bs.minimum);
        let m = if self.status_within_payload {
            u64::from(bs.maximum)
        } else if self.neg.mode == HeaderMode::Extended {
            1 << 62
        } else {
            u64::from(u32::MAX)
        };
        (m / min * min).max(min)
    }

    /// One `NBD_CMD_BLOCK_STATUS` round trip for `context`: the extents
    /// the server returned, clipped to `range`. May cover less than
    /// `range` (servers may answer short) but always at least one byte.
    pub fn block_status_once(
        &mut self,
        context: &str,
        range: Range<u64>,
    ) -> Result<Vec<StatusExtent>, Error> {
        match self.status_round_trip(context, range.clone()) {
            Err(Error::Server {
                errno: Errno::EINVAL | Errno::EOVERFLOW,
                length,
                ..
            }) if !self.status_within_payload
                && length > u64::from(self.neg.block_size.maximum) =>
            {
                self.status_within_payload = true;
                self.status_round_trip(context, range)
            }
            r => r,
        }
    }

    fn status_round_trip(
        &mut self,
        context: &str,
        range: Range<u64>,
    ) -> Result<Vec<StatusExtent>, Error> {
        self.check_usable()?;
        let id = self.context_id(context)?;
        if range.is_empty() {
            return Ok(Vec::new());
        }
        self.check_range(range.start, range.end - range.start)?;
        let min = u64::from(self.neg.block_size.minimum);
        // Aligned outwards to the minimum block size, never past the end.
        let start = range.start / min * min;
        let end = range
            .end
            .div_ceil(min)
            .saturating_mul(min)
            .min(self.neg.size);
        let length = (end - start).min(self.max_status());
        let cookie = self.cookie();
        let req = Request {
            flags: 0,
            command: Command::BLOCK_STATUS,
            cookie,
            offset: start,
            length,
        };
        let mut out = Vec::new();
        req.encode(self.neg.mode, &mut out)
            .expect("max_status fits a compact header");
        let ids: Vec<ContextId> = self.neg.contexts.iter().map(|c| c.id).collect();
        let mut pending = HashMap::new();
        pending.insert(
            cookie,
            Pending::Status {
                offset: start,
                length,
                tracker: StatusReply::new(start, length, false, ids),
            },
        );
        self.write_all(&out, "sending a block status request")?;
        let finished = loop {
            if let Some((_, outcome)) = self.recv(&mut pending, &mut [])? {
                break outcome?;
            }
        };
        let Finished::Status(per_context) = finished else {
            unreachable!("a status request finishes as status")
        };
        let descriptors = per_context
            .into_iter()
            .find(|(c, _)| *c == id)
            .map(|(_, d)| d)
            .unwrap_or_default();
        let mut at = start;
        let mut extents = Vec::new();
        for d in descriptors {
            let e_start = at;
            let e_end = at.saturating_add(d.length);
            at = e_end;
            let s = e_start.max(range.start);
            let t = e_end.min(range.end);
            if s < t {
                extents.push(StatusExtent {
                    offset: s,
                    length: t - s,
                    flags: d.flags,
                });
            }
        }
        if extents.is_empty() {
            return Err(self.protocol(
                format!("reply to NBD_CMD_BLOCK_STATUS at {start:#x}+{length:#x}"),
                ProtocolError::NoProgress,
            ));
        }
        Ok(extents)
    }

    /// Streams the extents of `context` over `range`, neighbours with equal
    /// flags merged, sending further requests as the map is consumed.
    ///
    /// The iterator stops after the first error.
    pub fn block_status(
        &mut self,
        context: &str,
        range: Range<u64>,
    ) -> Result<BlockStatusIter<'_>, Error> {
        self.check_usable()?;
        self.context_id(context)?;
        self.check_range(range.start, range.end.saturating_sub(range.start))?;
        Ok(BlockStatusIter {
            client: self,
            context: context.into(),
            pos: range.start,
            end: range.end,
            queue: Vec::new().into_iter(),
            held: None,
            pending_error: None,
            done: false,
        })
    }

    /// The `base:allocation` map of `range` as shared [`Extent`]s (see
    /// [`crate::map::allocation_kind`] for the kinds), neighbours of equal
    /// kind merged.
    pub fn map(
        &mut self,
        range: Range<u64>,
    ) -> Result<impl Iterator<Item = Result<Extent, Error>> + '_, Error> {
        let it = self.block_status(BASE_ALLOCATION, range)?;
        Ok(it.map(|r| r.map(|e| e.to_extent())).coalesce())
    }

    /// Sends `NBD_CMD_DISC` and closes the connection.
    pub fn close(mut self) -> Result<(), Error> {
        self.disconnect()
    }

    fn disconnect(&mut self) -> Result<(), Error> {
        if self.disconnected || self.poisoned {
            self.stream.shutdown();
            self.disconnected = true;
            return Ok(());
        }
        self.disconnected = true;
        let cookie = self.cookie();
        let mut out = Vec::new();
        Request {
            flags: 0,
            command: Command::DISC,
            cookie,
            offset: 0,
            length: 0,
        }
        .encode(self.neg.mode, &mut out)
        .expect("zero length fits");
        let r = self.write_all(&out, "sending NBD_CMD_DISC");
        self.stream.shutdown();
        r
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Best effort; close() reports the error for callers who care.
        let _ = self.disconnect();
    }
}

/// Iterator returned by [`Client::block_status`].
#[derive(Debug)]
pub struct BlockStatusIter<'a> {
    client: &'a mut Client,
    context: String,
    pos: u64,
    end: u64,
    queue: std::vec::IntoIter<StatusExtent>,
    held: Option<StatusExtent>,
    pending_error: Option<Error>,
    done: bool,
}

impl Iterator for BlockStatusIter<'_> {
    type Item = Result<StatusExtent, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.pending_error.take() {
            return Some(Err(e));
        }
        loop {
            if let Some(e) = self.queue.next() {
                match &mut self.held {
                    Some(h) if h.flags == e.flags && h.end() == e.offset => {
                        h.length += e.length;
                        continue;
                    }
                    Some(_) => return self.held.replace(e).map(Ok),
                    None => {
                        self.held = Some(e);
                        continue;
                    }
                }
            }
            if self.done || self.pos >= self.end {
                self.done = true;
                return self.held.take().map(Ok);
            }
            match self
                .client
                .block_status_once(&self.context, self.pos..self.end)
            {
                Ok(v) => {
                    self.pos = v.last().map_or(self.end, |e| e.end());
                    self.queue = v.into_iter();
                }
                Err(e) => {
                    self.done = true;
                    // The extent held back is complete up to here; the
                    // error follows it on the next call.
                    self.queue = Vec::new().into_iter();
                    if let Some(h) = self.held.take() {
                        self.pending_error = Some(e);
                        return Some(Ok(h));
                    }
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{NBD_REPLY_FLAG_DONE, STRUCTURED_REPLY_MAGIC};

    /// A scripted server: greeting, then acks structured replies, one
    /// meta context, GO; then answers one read with a data chunk and a
    /// hole chunk, out of order.
    fn serve(mut s: UnixStream) {
        let mut out = Vec::new();
        out.extend_from_slice(b"NBDMAGICIHAVEOPT"); // magics
        out.extend_from_slice(&[0, 3]); // fixed newstyle, no zeroes
        s.write_all(&out).unwrap();
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).unwrap();
        let reply = |opt: u32, t: u32, p: &[u8]| {
            let mut v = 0x0003_e889_0455_65a9_u64.to_be_bytes().to_vec(); // magic
            v.extend(opt.to_be_bytes()); // option
            v.extend(t.to_be_bytes()); // reply type
            v.extend((p.len() as u32).to_be_bytes()); // length
            v.extend(p);
            v
        };
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data).unwrap();
            match opt {
                11 => s.write_all(&reply(11, (1 << 31) + 1, &[])).unwrap(), // ERR_UNSUP
                8 => s.write_all(&reply(8, 1, &[])).unwrap(),
                10 => {
                    let mut m = 5u32.to_be_bytes().to_vec(); // context id 5
                    m.extend(b"base:allocation");
                    s.write_all(&reply(10, 4, &m)).unwrap();
                    s.write_all(&reply(10, 1, &[])).unwrap();
                }
                7 => {
                    let mut i = vec![0, 0]; // NBD_INFO_EXPORT
                    i.extend(8192u64.to_be_bytes()); // size
                    i.extend(1u16.to_be_bytes()); // flags: HAS_FLAGS
                    s.write_all(&reply(7, 3, &i)).unwrap();
                    s.write_all(&reply(7, 1, &[])).unwrap();
                    break;
                }
                _ => panic!("unexpected option {opt}"),
            }
        }
        let mut req = [0u8; 28];
        s.read_exact(&mut req).unwrap();
        let req = Request::parse(&req).unwrap();
        assert_eq!(
            (req.command, req.offset, req.length),
            (Command::READ, 0, 8192)
        );
        let mut out = Vec::new();
        // Data for the second half first...
        ReplyHeader::Chunk(ChunkHeader {
            flags: 0,
            chunk_type: ChunkType::OFFSET_DATA,
            cookie: req.cookie,
            offset: None,
            payload_len: 8 + 4096,
        })
        .encode(&mut out);
        out.extend(4096u64.to_be_bytes()); // offset
        out.extend([0x5a; 4096]); // data
        // ...then a hole for the first half, final chunk.
        ReplyHeader::Chunk(ChunkHeader {
            flags: NBD_REPLY_FLAG_DONE,
            chunk_type: ChunkType::OFFSET_HOLE,
            cookie: req.cookie,
            offset: None,
            payload_len: 12,
        })
        .encode(&mut out);
        out.extend(0u64.to_be_bytes()); // offset
        out.extend(4096u32.to_be_bytes()); // hole size
        assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        s.write_all(&out).unwrap();
        // NBD_CMD_DISC on drop.
        let mut req = [0u8; 28];
        s.read_exact(&mut req).unwrap();
        assert_eq!(Request::parse(&req).unwrap().command, Command::DISC);
    }

    #[test]
    fn read_reassembles_out_of_order_chunks_and_disconnects() {
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || serve(b));
        let config = ClientConfig {
            timeout: Some(Duration::from_secs(10)),
            ..ClientConfig::default()
        };
        let mut c = Client::handshake_on(Stream::Unix(a), "test".into(), "", &config).unwrap();
        assert_eq!(c.mode(), HeaderMode::Structured);
        assert_eq!(c.contexts()[0].id, ContextId(5));
        let mut buf = vec![0xffu8; 8192];
        c.read(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..].iter().all(|&b| b == 0x5a));
        assert!(matches!(
            c.read(8000, &mut [0u8; 500]),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            c.block_status("qemu:dirty-bitmap:x", 0..10),
            Err(Error::ContextNotNegotiated { .. })
        ));
        drop(c);
        server.join().unwrap();
    }

    /// A server refusing the export: the client says NBD_OPT_ABORT before
    /// it goes, and returns the typed refusal.
    #[test]
    fn refused_export_ends_with_opt_abort() {
        let (a, mut s) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            s.write_all(b"NBDMAGICIHAVEOPT\x00\x03").unwrap();
            let mut flags = [0u8; 4];
            s.read_exact(&mut flags).unwrap();
            let mut seen = Vec::new();
            loop {
                let mut h = [0u8; 16];
                if s.read_exact(&mut h).is_err() {
                    return seen;
                }
                let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
                let mut data = vec![0u8; len];
                s.read_exact(&mut data).unwrap();
                seen.push(opt);
                // Every option refused: NBD_REP_ERR_UNSUP, and for GO
                // NBD_REP_ERR_UNKNOWN.
                let t: u32 = if opt == 7 {
                    (1 << 31) + 6
                } else {
                    (1 << 31) + 1
                };
                let mut v = 0x0003_e889_0455_65a9_u64.to_be_bytes().to_vec();
                v.extend(opt.to_be_bytes());
                v.extend(t.to_be_bytes());
                v.extend(0u32.to_be_bytes());
                if opt != 2 {
                    s.write_all(&v).unwrap();
                }
            }
        });
        let config = ClientConfig {
            timeout: Some(Duration::from_secs(10)),
            ..ClientConfig::default()
        };
        let e = Client::handshake_on(Stream::Unix(a), "test".into(), "nope", &config).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Handshake {
                    source: HandshakeError::UnknownExport { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        let seen = server.join().unwrap();
        assert_eq!(seen.last(), Some(&2), "options seen: {seen:?}");
    }

    #[test]
    fn io_errors_are_classified() {
        let t = Some(Duration::from_secs(1));
        let e = io_error("u", "x".into(), io::ErrorKind::WouldBlock.into(), t);
        assert!(matches!(e, Error::Timeout { .. }));
        let e = io_error("u", "x".into(), io::ErrorKind::UnexpectedEof.into(), t);
        assert!(matches!(e, Error::Closed { .. }));
        let e = io_error("u", "x".into(), io::ErrorKind::PermissionDenied.into(), t);
        assert!(matches!(e, Error::Io { .. }));
    }
}
