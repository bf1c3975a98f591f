//! A blocking NBD client over TCP or a Unix socket, in clear or TLS: the
//! only module that touches a socket.
//!
//! [`Client::connect`] opens the socket and drives the sans-IO
//! [`Handshake`], upgrading the socket to TLS (rustls) when the server
//! acknowledges `NBD_OPT_STARTTLS` (see [`crate::tls`] for certificates);
//! after it, [`Client`] is a thin driver of the sans-IO
//! [`Transmission`]: it writes the request bytes the machine produces and
//! reads exactly what the machine wants, with every socket operation
//! bounded by the configured timeout.
//!
//! [`Client::read`] reads into a caller's buffer, split into requests the
//! server's block size constraints allow and several of them in flight;
//! [`Client::block_status`] pages the extents of any negotiated metadata
//! context ([`StatusPager`]); [`Client::map`] gives the `base:allocation`
//! map as shared [`Extent`]s.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use rustls::{ClientConnection, StreamOwned};

use sparsekit_extent::{Extent, ExtentIterExt};

use crate::error::{Error, HandshakeError, RequestError};
use crate::handshake::{BlockSize, Handshake, HandshakeConfig, MetaContext, Negotiated, TlsMode};
use crate::map::{BASE_ALLOCATION, StatusExtent};
use crate::reply::ServerError;
use crate::status::{StatusPager, clip};
use crate::tls::TlsSetup;
use crate::transmission::{Completion, Op, Reply, StepError, Transmission, ZeroFlags};
use crate::types::{ContextId, Errno, HeaderMode};
use crate::uri::{NbdUri, Transport};
use crate::wire::TransmissionFlags;

/// Largest read sent in one request, whatever the server allows: 2^25,
/// the size every server must accept ([`crate::transmission::MAX_PAYLOAD`]).
pub const MAX_READ_REQUEST: u32 = crate::transmission::MAX_PAYLOAD as u32;

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
    /// Bytes asked for by one read or write request (default 256 KiB, as
    /// nbdcopy): a long read is split into requests of this size, several
    /// in flight at once, so the server reads some while it sends others.
    /// Rounded up to the server's preferred block size and capped by its
    /// maximum payload and 32 MiB.
    pub read_request: u32,
    /// The TLS certificates folder (`ca-cert.pem`, `client-cert.pem`,
    /// `client-key.pem`) for URIs without `tls-certificates=DIR`: a
    /// program's `--tls-certificates DIR`. The URI's own parameter wins;
    /// this wins over libnbd's default folders and the system's CAs (see
    /// [`crate::tls`]). It turns no TLS on: the URI says whether TLS is
    /// used. Default `None`.
    pub tls_certificates: Option<PathBuf>,
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
            tls_certificates: None,
        }
    }
}

/// A connection's byte stream. The TLS variants are boxed: a rustls
/// connection is large, and a `Client` is moved around.
#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    TlsTcp(Box<StreamOwned<ClientConnection, TcpStream>>),
    TlsUnix(Box<StreamOwned<ClientConnection, UnixStream>>),
}

impl Stream {
    /// Timeouts live on the socket, under TLS as well: rustls reads and
    /// writes through it.
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
            Stream::TlsTcp(s) => {
                s.sock.set_read_timeout(t)?;
                s.sock.set_write_timeout(t)
            }
            Stream::TlsUnix(s) => {
                s.sock.set_read_timeout(t)?;
                s.sock.set_write_timeout(t)
            }
        }
    }

    fn shutdown(&mut self) {
        // Best effort: the peer may already be gone.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::TlsTcp(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
                s.sock.shutdown(Shutdown::Both)
            }
            Stream::TlsUnix(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
                s.sock.shutdown(Shutdown::Both)
            }
        };
    }

    /// Runs the TLS handshake over this (plain) stream.
    fn upgrade(self, tls: &TlsSetup) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::TlsTcp(Box::new(tls.handshake(s)?)),
            Stream::Unix(s) => Stream::TlsUnix(Box::new(tls.handshake(s)?)),
            s @ (Stream::TlsTcp(_) | Stream::TlsUnix(_)) => s,
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::TlsTcp(s) => s.read(buf),
            Stream::TlsUnix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::TlsTcp(s) => s.write(buf),
            Stream::TlsUnix(s) => s.write(buf),
        }
    }
    /// Under TLS, sends the records rustls still holds: its `write` keeps
    /// what the socket did not take and reports socket errors only on the
    /// next call.
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
            Stream::TlsTcp(s) => s.flush(),
            Stream::TlsUnix(s) => s.flush(),
        }
    }
}

/// `write_all` then `flush`: everything on the wire, TLS or not.
fn send(stream: &mut Stream, b: &[u8]) -> io::Result<()> {
    stream.write_all(b)?;
    stream.flush()
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
    machine: Transmission,
    timeout: Option<Duration>,
    max_in_flight: usize,
    read_request: u32,
    /// The server refused a status request longer than its maximum
    /// payload: ask for no more from now on.
    status_within_payload: bool,
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

/// A failed TLS handshake: a timeout as any other, the rest (a refused
/// certificate, an alert, a closed socket) as [`Error::TlsHandshake`].
fn tls_error(uri: &str, e: io::Error, timeout: Option<Duration>) -> Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            io_error(uri, "the TLS handshake".into(), e, timeout)
        }
        _ => Error::TlsHandshake {
            uri: uri.into(),
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

    /// Connects to `uri` and completes the handshake, with TLS when the
    /// URI asks for it.
    pub fn connect_with(uri: &NbdUri, config: &ClientConfig) -> Result<Client, Error> {
        let shown = uri.to_string();
        let tls = Self::tls_setup(uri, &shown, config)?;
        Self::connect_prepared(uri, shown, config, tls.as_ref())
    }

    /// The TLS configuration of `uri`, read before any socket is opened,
    /// so that a missing certificate is reported as such.
    fn tls_setup(
        uri: &NbdUri,
        shown: &str,
        config: &ClientConfig,
    ) -> Result<Option<TlsSetup>, Error> {
        TlsSetup::for_uri(uri, config.tls_certificates.as_deref()).map_err(|source| Error::Tls {
            uri: shown.into(),
            source: Box::new(source),
        })
    }

    fn connect_prepared(
        uri: &NbdUri,
        shown: String,
        config: &ClientConfig,
        tls: Option<&TlsSetup>,
    ) -> Result<Client, Error> {
        let stream = open(uri, &shown, config.timeout)?;
        let mut hs_config = Self::handshake_config(&uri.export, config);
        hs_config.tls = if tls.is_some() {
            uri.tls.mode
        } else {
            TlsMode::Off
        };
        Self::handshake_on(stream, shown, hs_config, config, tls)
    }

    fn handshake_config(export: &str, config: &ClientConfig) -> HandshakeConfig {
        HandshakeConfig {
            export: export.into(),
            contexts: config.contexts.clone(),
            structured_replies: config.structured_replies,
            extended_headers: config.extended_headers,
            list_contexts: config.list_contexts,
            tls: TlsMode::Off,
        }
    }

    /// Runs the handshake on an open stream, upgrading it to TLS with
    /// `tls` when the machine says so.
    fn handshake_on(
        mut stream: Stream,
        shown: String,
        hs_config: HandshakeConfig,
        config: &ClientConfig,
        tls: Option<&TlsSetup>,
    ) -> Result<Client, Error> {
        let timeout = config.timeout;
        let fail = |stream: &mut Stream, e: Error| {
            stream.shutdown();
            Err(e)
        };
        if let Err(e) = stream.set_timeouts(timeout) {
            let e = io_error(&shown, "setting socket timeouts".into(), e, timeout);
            return fail(&mut stream, e);
        }
        let mut hs = match Handshake::new(hs_config) {
            Ok(hs) => hs,
            Err(source) => return fail(&mut stream, Error::Handshake { uri: shown, source }),
        };
        let mut buf = Vec::new();
        // Until the first reply after the upgrade: a server that refuses
        // the client's certificate (checked after the client's side of a
        // TLS 1.3 handshake is over) closes the connection then, without
        // an alert (qemu-nbd), and the bare "closed" would not say why.
        let mut just_upgraded = false;
        let failed = |e: io::Error, what: &str, just_upgraded: bool| match io_error(
            &shown,
            what.into(),
            e,
            timeout,
        ) {
            Error::Closed { uri, during } if just_upgraded => Error::Closed {
                uri,
                during: format!(
                    "{during}, just after the TLS handshake (a server that refuses \
                         the client's certificate closes the connection there)"
                ),
            },
            e => e,
        };
        let neg = loop {
            let out = hs.take_output();
            if !out.is_empty()
                && let Err(e) = send(&mut stream, &out)
            {
                let e = failed(e, "sending handshake options", just_upgraded);
                return fail(&mut stream, e);
            }
            if hs.starting_tls() {
                let setup = tls.expect("TLS is asked of the handshake only with a setup");
                stream = match stream.upgrade(setup) {
                    Ok(s) => s,
                    // The socket is gone with the failed upgrade.
                    Err(e) => return Err(tls_error(&shown, e, timeout)),
                };
                hs.tls_started().expect("a TLS upgrade was pending");
                just_upgraded = true;
                continue;
            }
            let n = hs.wanted();
            assert!(
                n > 0,
                "the handshake machine stops asking for bytes only when done"
            );
            buf.resize(n, 0);
            if let Err(e) = stream.read_exact(&mut buf) {
                let e = failed(e, "reading the handshake", just_upgraded);
                return fail(&mut stream, e);
            }
            just_upgraded = false;
            match hs.feed(&buf) {
                Ok(Some(neg)) => break neg,
                Ok(None) => {}
                Err(source) => {
                    // A refusal leaves both sides at an option boundary:
                    // say goodbye (best effort; the error is what matters).
                    if !matches!(source, HandshakeError::Protocol(_)) {
                        let _ = send(&mut stream, &Handshake::abort_request());
                    }
                    return fail(&mut stream, Error::Handshake { uri: shown, source });
                }
            }
        };
        let out = hs.take_output();
        if !out.is_empty()
            && let Err(e) = send(&mut stream, &out)
        {
            let e = io_error(&shown, "sending handshake options".into(), e, timeout);
            return fail(&mut stream, e);
        }
        Ok(Client {
            stream,
            uri: shown,
            machine: Transmission::new(&neg),
            neg,
            timeout,
            max_in_flight: config.max_in_flight.max(1),
            read_request: config.read_request.max(1),
            status_within_payload: false,
            poisoned: false,
            disconnected: false,
        })
    }

    /// Opens up to `n` connections to `uri`. More than one only when the
    /// server advertises `NBD_FLAG_CAN_MULTI_CONN`, as the spec asks; check
    /// the length of the result. Certificates are read once for all.
    pub fn connect_multi(
        uri: &NbdUri,
        config: &ClientConfig,
        n: usize,
    ) -> Result<Vec<Client>, Error> {
        let shown = uri.to_string();
        let tls = Self::tls_setup(uri, &shown, config)?;
        let first = Self::connect_prepared(uri, shown.clone(), config, tls.as_ref())?;
        let extra = if first.flags().can_multi_conn() {
            n.saturating_sub(1)
        } else {
            0
        };
        let mut all = vec![first];
        for _ in 0..extra {
            all.push(Self::connect_prepared(
                uri,
                shown.clone(),
                config,
                tls.as_ref(),
            )?);
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
    /// How requests are sized on this connection (alignment, preferred
    /// size, largest payload and effect length).
    pub fn limits(&self) -> crate::transmission::Limits {
        self.machine.limits()
    }
    /// Header layout in use.
    pub fn mode(&self) -> HeaderMode {
        self.neg.mode
    }
    /// Metadata contexts negotiated.
    pub fn contexts(&self) -> &[MetaContext] {
        &self.neg.contexts
    }
    /// True when the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::TlsTcp(_) | Stream::TlsUnix(_))
    }

    fn write_all(&mut self, b: &[u8], during: &str) -> Result<(), Error> {
        send(&mut self.stream, b).map_err(|e| {
            self.poisoned = true;
            io_error(&self.uri, during.into(), e, self.timeout)
        })
    }

    fn check_usable(&self) -> Result<(), Error> {
        if self.poisoned || self.disconnected || self.machine.is_failed() {
            return Err(Error::Poisoned {
                uri: self.uri.clone(),
            });
        }
        Ok(())
    }

    /// A refusal of the transmission machine, as a client error.
    fn refused(&self, reason: RequestError) -> Error {
        let uri = self.uri.clone();
        match reason {
            RequestError::OutOfRange {
                offset,
                length,
                size,
            } => Error::OutOfRange {
                uri,
                offset,
                length,
                size,
            },
            RequestError::Unaligned {
                offset,
                length,
                alignment,
            } => Error::Unaligned {
                uri,
                offset,
                length,
                minimum: u32::try_from(alignment).unwrap_or(u32::MAX),
            },
            RequestError::Failed { .. } | RequestError::Disconnected { .. } => {
                Error::Poisoned { uri }
            }
            reason => Error::Request { uri, reason },
        }
    }

    /// Checks `offset..offset + length` (range and alignment)
    /// before anything is sent.
    fn check_range(&self, offset: u64, length: u64) -> Result<(), Error> {
        self.machine
            .check_range(offset, length)
            .map_err(|e| self.refused(e))
    }

    fn server_error(&self, c: &Completion, e: ServerError) -> Error {
        Error::Server {
            uri: self.uri.clone(),
            command: c.command,
            offset: c.offset,
            length: c.length,
            errno: e.errno,
            message: e.message,
            at: e.offset,
        }
    }

    /// Sends what the machine has queued.
    fn send_output(&mut self, during: &str) -> Result<(), Error> {
        if self.machine.output().is_empty() {
            return Ok(());
        }
        let r = send(&mut self.stream, self.machine.output());
        self.machine.clear_output();
        r.map_err(|e| {
            self.poisoned = true;
            io_error(&self.uri, during.into(), e, self.timeout)
        })
    }

    /// Reads what the machine wants next (read data straight into `buf`,
    /// the buffer the read requests' `dest` offsets point into). Returns
    /// the request this completed, if any. Errors are fatal for the
    /// connection.
    fn receive(&mut self, buf: &mut [u8]) -> Result<Option<Completion>, Error> {
        let stream = &mut self.stream;
        match self.machine.step(buf, |b| stream.read_exact(b)) {
            Ok(c) => Ok(c),
            Err(StepError::Read { during, source }) => {
                self.poisoned = true;
                Err(io_error(&self.uri, during, source, self.timeout))
            }
            Err(StepError::Reply(e)) => {
                self.poisoned = true;
                Err(Error::Protocol {
                    uri: self.uri.clone(),
                    during: e.during,
                    source: e.source,
                })
            }
        }
    }

    /// Keeps up to `max_in_flight` of `ops` on the wire until every reply
    /// is in. Read data lands in `buf`; a write's payload is the bytes of
    /// `payload` from its offset minus `base`. Every op must have passed
    /// the machine's checks (its range was checked whole). On a server
    /// error no more requests are sent, the ones in flight are drained so
    /// the connection stays usable, and the error of the lowest offset is
    /// returned.
    fn pipeline(
        &mut self,
        mut ops: impl Iterator<Item = Op>,
        buf: &mut [u8],
        payload: (u64, &[u8]),
        during: &str,
    ) -> Result<(), Error> {
        // The failed request with the lowest offset, whatever order the
        // replies come in: everything before it is done.
        let mut first_err: Option<(u64, Error)> = None;
        loop {
            while first_err.is_none() && self.machine.in_flight() < self.max_in_flight {
                let Some(op) = ops.next() else { break };
                self.machine.request(op).map_err(|e| self.refused(e))?;
                if let Op::Write { offset, length, .. } = op {
                    // The payload follows its header on the wire.
                    self.send_output(during)?;
                    let at = usize::try_from(offset - payload.0).expect("inside the payload");
                    let bytes = &payload.1[at..at + length as usize];
                    self.write_all(bytes, during)?;
                }
            }
            self.send_output(during)?;
            if self.machine.in_flight() == 0 {
                break;
            }
            if let Some(c) = self.receive(buf)?
                && let Err(e) = c.outcome.clone()
                && first_err.as_ref().is_none_or(|(at, _)| c.offset < *at)
            {
                first_err = Some((c.offset, self.server_error(&c, e)));
            }
        }
        first_err.map_or(Ok(()), |(_, e)| Err(e))
    }

    /// Bytes per read or write request: the configured size rounded up to
    /// the preferred block size, at most the largest payload.
    fn request_size(&self) -> u64 {
        let l = self.machine.limits();
        u64::from(self.read_request)
            .next_multiple_of(l.preferred)
            .min(l.max_payload)
    }

    /// `offset..offset + length` cut at multiples of `step`, so that every
    /// request but the first and last is `step` long and `step`-aligned.
    fn split(
        offset: u64,
        length: u64,
        step: u64,
        op: impl Fn(u64, u64) -> Op,
    ) -> impl Iterator<Item = Op> {
        let end = offset + length;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let next = ((at / step + 1) * step).min(end);
            let o = op(at, next - at);
            at = next;
            Some(o)
        })
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    ///
    /// The range is split into requests of [`ClientConfig::read_request`]
    /// bytes (rounded to the server's preferred block size, at most its
    /// maximum payload and 32 MiB); up to `max_in_flight` of them are on
    /// the wire at once, and their data lands straight in `buf`. A range
    /// not aligned to the server's block size (or 512 bytes when it
    /// advertises none) is read aligned: the blocks holding its unaligned
    /// ends are read into a small buffer and copied. With structured
    /// replies, holes are zero-filled and the reply is checked to describe
    /// every byte exactly once. On a server error the requests already
    /// sent are drained, so the connection stays usable, and the failed
    /// request of the lowest offset is returned.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.check_usable()?;
        let total = buf.len() as u64;
        if total == 0 {
            return self.nothing_at(offset);
        }
        let end = offset.checked_add(total);
        match self.check_range(offset, total) {
            Ok(()) => return self.read_aligned(offset, buf),
            Err(Error::Unaligned { .. }) => {}
            Err(e) => return Err(e),
        }
        let end = end.expect("checked in range");
        let (a, size) = (self.machine.limits().alignment, self.neg.size);
        // The whole blocks inside the range, read in place; the tail of an
        // unaligned export counts as whole.
        let inner_lo = offset.next_multiple_of(a);
        let inner_hi = if end == size { end } else { end / a * a };
        if inner_lo >= inner_hi {
            return self.read_bounced(offset, buf);
        }
        let (head, rest) = buf.split_at_mut((inner_lo - offset) as usize);
        let (middle, tail) = rest.split_at_mut((inner_hi - inner_lo) as usize);
        if !head.is_empty() {
            self.read_bounced(offset, head)?;
        }
        self.read_aligned(inner_lo, middle)?;
        if !tail.is_empty() {
            self.read_bounced(inner_hi, tail)?;
        }
        Ok(())
    }

    /// Reads an unaligned range of at most two blocks through a buffer of
    /// the aligned blocks that hold it.
    fn read_bounced(&mut self, offset: u64, dst: &mut [u8]) -> Result<(), Error> {
        let (a, size) = (self.machine.limits().alignment, self.neg.size);
        let lo = offset / a * a;
        let hi = (offset + dst.len() as u64).next_multiple_of(a).min(size);
        let mut blocks = vec![0u8; (hi - lo) as usize];
        self.read_aligned(lo, &mut blocks)?;
        let at = (offset - lo) as usize;
        dst.copy_from_slice(&blocks[at..at + dst.len()]);
        Ok(())
    }

    /// Reads a range that satisfies the alignment.
    fn read_aligned(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.check_range(offset, buf.len() as u64)?;
        let ops = Self::split(offset, buf.len() as u64, self.request_size(), |o, l| {
            Op::Read {
                offset: o,
                length: l,
                dest: (o - offset) as usize,
            }
        });
        self.pipeline(ops, buf, (0, &[]), "sending read requests")
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

    /// Longest block status request: the connection's largest effect
    /// length ([`crate::transmission::Limits::max_effect`]), or its largest
    /// payload once the server refused a longer one.
    fn max_status(&self) -> u64 {
        let l = self.machine.limits();
        if self.status_within_payload {
            l.max_payload
        } else {
            l.max_effect
        }
    }

    /// One `NBD_CMD_BLOCK_STATUS` round trip for `context`: the extents
    /// the server returned, clipped to `range`. May cover less than
    /// `range` (servers may answer short) but always at least one byte.
    ///
    /// The request is aligned outwards to the block size and at most
    /// [`crate::transmission::Limits::max_effect`] long. The spec lets a
    /// server refuse a status request longer than its maximum payload
    /// (`NBD_EINVAL`, `NBD_EOVERFLOW`): such a request is asked again, and
    /// every later one, within the maximum payload.
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
            }) if !self.status_within_payload && length > self.machine.limits().max_payload => {
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
        let (a, size) = (self.machine.limits().alignment, self.neg.size);
        self.check_range(range.start, range.end - range.start)
            .or_else(|e| match e {
                Error::Unaligned { .. } => Ok(()),
                e => Err(e),
            })?;
        // Aligned outwards, never past the end.
        let start = range.start / a * a;
        let end = range.end.next_multiple_of(a).min(size);
        let length = (end - start).min(self.max_status());
        let op = Op::BlockStatus {
            offset: start,
            length,
            req_one: false,
        };
        let cookie = self.machine.request(op).map_err(|e| self.refused(e))?;
        self.send_output("sending a block status request")?;
        let done = loop {
            if let Some(c) = self.receive(&mut [])? {
                break c;
            }
        };
        debug_assert_eq!(done.cookie, cookie, "one request in flight");
        let per_context = match done.outcome.clone() {
            Ok(Reply::Status(v)) => v,
            Ok(_) => unreachable!("a status request completes with status"),
            Err(e) => return Err(self.server_error(&done, e)),
        };
        let descriptors = per_context
            .into_iter()
            .find(|(c, _)| *c == id)
            .map(|(_, d)| d)
            .unwrap_or_default();
        let extents = clip(start, &descriptors, &range);
        if extents.is_empty() {
            self.poisoned = true;
            return Err(Error::Protocol {
                uri: self.uri.clone(),
                during: format!("reply to NBD_CMD_BLOCK_STATUS at {start:#x}+{length:#x}"),
                source: crate::error::ProtocolError::NoProgress,
            });
        }
        Ok(extents)
    }

    /// A request of no bytes at `offset`: nothing to send, but the offset
    /// must lie inside the export.
    fn nothing_at(&self, offset: u64) -> Result<(), Error> {
        match self.check_range(offset, 0) {
            Err(e @ Error::OutOfRange { .. }) => Err(e),
            _ => Ok(()),
        }
    }

    /// Checks `op`, spanning a whole caller range, before anything is sent:
    /// everything but its length, which the caller splits.
    fn check_whole(&self, op: Op) -> Result<(), Error> {
        match self.machine.check(&op) {
            Ok(()) | Err(RequestError::TooLong { .. }) => Ok(()),
            Err(e) => Err(self.refused(e)),
        }
    }

    /// Writes `data` at `offset`.
    ///
    /// The range must be aligned to the server's block size (or 512 bytes
    /// when it advertises none): an unaligned write would need a
    /// read-modify-write that races other writers, so it is refused, as is
    /// a write to a read-only export, before anything is sent. The data is
    /// split like a read ([`ClientConfig::read_request`], rounded to the
    /// preferred block size, at most the maximum payload and 32 MiB) and
    /// sent straight from `data`, several requests in flight. On a server
    /// error the requests in flight are drained, so the connection stays
    /// usable, and the failed request of the lowest offset is returned.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.check_usable()?;
        let length = data.len() as u64;
        if length == 0 {
            return self.nothing_at(offset);
        }
        self.check_whole(Op::Write {
            offset,
            length,
            fua: false,
        })?;
        let ops = Self::split(offset, length, self.request_size(), |o, l| Op::Write {
            offset: o,
            length: l,
            fua: false,
        });
        self.pipeline(ops, &mut [], (offset, data), "sending write requests")
    }

    /// Zeroes `length` bytes at `offset` with `NBD_CMD_WRITE_ZEROES`
    /// (`NBD_FLAG_SEND_WRITE_ZEROES` needed; `flags.fast` needs
    /// `NBD_FLAG_SEND_FAST_ZERO`, `flags.fua` `NBD_FLAG_SEND_FUA`). Aligned
    /// as [`Client::write`]; split into requests of at most 2^32 minus
    /// 64 KiB, several in flight.
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        length: u64,
        flags: ZeroFlags,
    ) -> Result<(), Error> {
        self.check_usable()?;
        if length == 0 {
            return self.nothing_at(offset);
        }
        self.check_whole(Op::WriteZeroes {
            offset,
            length,
            flags,
        })?;
        let ops = Self::split(offset, length, self.effect_size(), |o, l| Op::WriteZeroes {
            offset: o,
            length: l,
            flags,
        });
        self.pipeline(ops, &mut [], (0, &[]), "sending write zeroes requests")
    }

    /// Discards `length` bytes at `offset` with `NBD_CMD_TRIM` (needs
    /// `NBD_FLAG_SEND_TRIM`); what they read afterwards is up to the
    /// server. Aligned and split as [`Client::write_zeroes`].
    pub fn trim(&mut self, offset: u64, length: u64) -> Result<(), Error> {
        self.check_usable()?;
        let trim = |offset, length| Op::Trim {
            offset,
            length,
            fua: false,
        };
        if length == 0 {
            return self.nothing_at(offset);
        }
        self.check_whole(trim(offset, length))?;
        let ops = Self::split(offset, length, self.effect_size(), trim);
        self.pipeline(ops, &mut [], (0, &[]), "sending trim requests")
    }

    /// `NBD_CMD_FLUSH`: every write acknowledged so far is on stable
    /// storage (needs `NBD_FLAG_SEND_FLUSH`).
    pub fn flush(&mut self) -> Result<(), Error> {
        self.check_usable()?;
        self.check_whole(Op::Flush)?;
        self.pipeline(
            std::iter::once(Op::Flush),
            &mut [],
            (0, &[]),
            "sending NBD_CMD_FLUSH",
        )
    }

    /// Bytes per write zeroes or trim request: the largest effect length,
    /// but not past 32 bits even with extended headers (nbdkit's plugin
    /// calls take 32-bit counts), in whole preferred blocks.
    fn effect_size(&self) -> u64 {
        let l = self.machine.limits();
        let max = l
            .max_effect
            .min((1 << 32) - crate::transmission::MAX_MINIMUM_BLOCK);
        (max / l.preferred * l.preferred).max(l.alignment)
    }

    /// Pages the extents of `context` over `range`, neighbours with equal
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
        let len = range.end.saturating_sub(range.start);
        if len > 0 {
            self.check_range(range.start, len).or_else(|e| match e {
                Error::Unaligned { .. } => Ok(()),
                e => Err(e),
            })?;
        }
        Ok(StatusPager::new(self, context, range))
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
        if self.disconnected || self.poisoned || self.machine.disconnect().is_err() {
            self.stream.shutdown();
            self.disconnected = true;
            return Ok(());
        }
        self.disconnected = true;
        let r = self.send_output("sending NBD_CMD_DISC");
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
pub type BlockStatusIter<'a> = StatusPager<&'a mut Client>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{ChunkType, Command};
    use crate::wire::{
        ChunkHeader, NBD_REPLY_FLAG_DONE, ReplyHeader, Request, STRUCTURED_REPLY_MAGIC,
    };

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
        let hs = Client::handshake_config("", &config);
        let mut c =
            Client::handshake_on(Stream::Unix(a), "test".into(), hs, &config, None).unwrap();
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
        let hs = Client::handshake_config("nope", &config);
        let e =
            Client::handshake_on(Stream::Unix(a), "test".into(), hs, &config, None).unwrap_err();
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

    /// A server that acknowledges NBD_OPT_STARTTLS and then says nothing:
    /// the socket's timeout bounds the TLS handshake too.
    #[test]
    fn a_silent_tls_handshake_times_out() {
        let (a, mut s) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            s.write_all(b"NBDMAGICIHAVEOPT\x00\x03").unwrap();
            let mut flags_and_option = [0u8; 4 + 16];
            s.read_exact(&mut flags_and_option).unwrap();
            assert_eq!(&flags_and_option[12..16], &[0, 0, 0, 5], "NBD_OPT_STARTTLS");
            let mut ack = 0x0003_e889_0455_65a9_u64.to_be_bytes().to_vec(); // reply magic
            ack.extend(5u32.to_be_bytes()); // NBD_OPT_STARTTLS
            ack.extend(1u32.to_be_bytes()); // NBD_REP_ACK
            ack.extend(0u32.to_be_bytes()); // no payload
            s.write_all(&ack).unwrap();
            // The client's ClientHello, never answered.
            let mut hello = [0u8; 5];
            s.read_exact(&mut hello).unwrap();
            assert_eq!(hello[0], 22, "a TLS handshake record");
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        });
        let config = ClientConfig {
            timeout: Some(Duration::from_millis(300)),
            ..ClientConfig::default()
        };
        let uri: NbdUri = "nbds+unix:///?socket=/x&tls-verify-peer=0".parse().unwrap();
        let tls = TlsSetup::for_uri(&uri, None).unwrap().unwrap();
        let mut hs = Client::handshake_config("", &config);
        hs.tls = TlsMode::Require;
        let e = Client::handshake_on(Stream::Unix(a), "test".into(), hs, &config, Some(&tls))
            .unwrap_err();
        assert!(
            matches!(&e, Error::Timeout { during, .. } if during == "the TLS handshake"),
            "{e:?}"
        );
        server.join().unwrap();
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
