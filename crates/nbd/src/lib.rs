//! An NBD client for sparsekit: where the data of an NBD export is, and
//! reading it.
//!
//! The protocol core does no I/O (like quinn-proto):
//!
//! - [`NbdUri`] parses `nbd://host[:port]/export` and
//!   `nbd+unix:///export?socket=PATH` URIs, and their TLS forms `nbds://`
//!   and `nbds+unix://` with libnbd's `tls-*` parameters ([`uri`],
//!   [`TlsParams`]);
//! - [`Handshake`] is the fixed newstyle handshake as a state machine over
//!   bytes: `NBD_OPT_STARTTLS` first when TLS is asked for ([`TlsMode`];
//!   the machine stops in [`Handshake::starting_tls`] while the driver
//!   upgrades its socket), then structured replies or extended headers,
//!   metadata contexts and the export with `NBD_OPT_GO` ([`handshake`]);
//! - [`Request`], [`ReplyHeader`] and [`Chunk`] encode requests and decode
//!   replies over big-endian `Raw*` layouts ([`wire`]), with the protocol's
//!   numbered codes as open enums ([`types`]); [`reply::ReadReply`],
//!   [`reply::StatusReply`] and [`reply::AckReply`] check every chunk of a
//!   reply against its request;
//! - [`Transmission`] is the transmission phase as a state machine:
//!   requests in ([`Op`]: read, write, write zeroes, trim, flush, block
//!   status), request bytes out, reply bytes in, replies routed by cookie,
//!   [`Completion`]s out; read data goes straight into the caller's buffer
//!   ([`transmission`]);
//! - [`StatusPager`] pages block status one round trip at a time over any
//!   [`StatusRoundTrip`], a `&mut Client` or a `&Mutex<Client>` ([`status`]);
//! - [`map`] turns block status into the shared
//!   [`sparsekit_extent::Extent`] vocabulary and into the JSON that
//!   `nbdinfo --map --json` and `qemu-img map --output=json` print.
//!
//! Only [`Client`] touches a socket: it connects by URI over TCP or a Unix
//! socket, in clear or over TLS (rustls with the ring provider; [`tls`]
//! reads the certificates folder as qemu and libnbd lay it out, and
//! [`ClientConfig::tls_certificates`] gives a default folder; TLS with a
//! pre-shared key is refused, rustls has none), drives the two machines, reads with pipelined requests sized by
//! the server's block size constraints ([`Client::read`]), writes the same
//! way ([`Client::write`], [`Client::write_zeroes`], [`Client::trim`],
//! [`Client::flush`]; refused before sending on a read-only export), pages
//! block status for any negotiated context ([`Client::block_status`],
//! [`Client::map`]) and sends `NBD_CMD_DISC` when dropped.
//!
//! Errors are typed: [`ProtocolError`] for bytes that break the protocol
//! ([`ReplyError`] says what was being read), [`HandshakeError`] for a
//! failed negotiation (a server without TLS for an `nbds://` URI, a server
//! that requires TLS for an `nbd://` one), [`TlsConfigError`] for
//! certificate files (each named), [`Error::TlsHandshake`] for a refused
//! TLS handshake (the rustls reason in [`Error::rustls`]), [`RequestError`]
//! for a request refused before it is sent, [`Error`] for everything a
//! client call reports (each naming the URI, and the offset where known).
//!
//! Reading an export's map and data, from an nbdkit started here on a Unix
//! socket (1 MiB holding `hello` at 64 KiB; the rest was never written):
//!
//! ```
//! use std::process::{Child, Command, Stdio};
//! use std::time::Duration;
//! use sparsekit_nbd::{Client, Extent, Kind};
//!
//! /// The server, killed when dropped, even if an assertion fails.
//! struct Server(Child);
//! impl Drop for Server {
//!     fn drop(&mut self) {
//!         let _ = self.0.kill();
//!         let _ = self.0.wait();
//!     }
//! }
//!
//! let dir = tempfile::tempdir()?;
//! let socket = dir.path().join("nbd.sock");
//! let _server = Server(
//!     Command::new("nbdkit")
//!         .args(["-f", "--exit-with-parent", "-U"])
//!         .arg(&socket)
//!         .args(["data", r#"@65536 "hello""#, "size=1M"])
//!         .stdin(Stdio::null())
//!         .spawn()?,
//! );
//! // nbdkit listens a moment after it starts: retry for up to 5 s.
//! let uri = format!("nbd+unix:///?socket={}", socket.display());
//! let mut tries = 0;
//! let mut client = loop {
//!     match Client::connect(&uri) {
//!         Ok(c) => break c,
//!         Err(_) if tries < 500 => tries += 1,
//!         Err(e) => return Err(e.into()),
//!     }
//!     std::thread::sleep(Duration::from_millis(10));
//! };
//!
//! let size = client.size();
//! assert_eq!(size, 1 << 20);
//! let map: Vec<Extent> = client.map(0..size)?.collect::<Result<_, _>>()?;
//! sparsekit_extent::check_map(&map, 0..size)?;
//! // One run of data around "hello" (nbdkit allocates 32 KiB pages), holes
//! // around it.
//! let data: Vec<&Extent> = map.iter().filter(|e| e.kind == Kind::Data).collect();
//! assert_eq!(data.len(), 1, "{map:?}");
//! assert!(data[0].offset <= 65536 && 65536 + 5 <= data[0].offset + data[0].length);
//! assert!(map.iter().all(|e| e.kind == Kind::Data || e.kind == Kind::Hole));
//! let mut hello = [0; 5];
//! client.read(65536, &mut hello)?;
//! assert_eq!(&hello, b"hello");
//! client.close()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Over TLS the calls are the same: connect to an `nbds://` or
//! `nbds+unix://` URI, with `tls-certificates=DIR` for the client's
//! certificates and CA (or [`ClientConfig::tls_certificates`]), and
//! [`Client::is_tls`] says the session is encrypted.
//!
//! The sans-IO handshake, driven by hand:
//!
//! ```
//! use sparsekit_nbd::{Handshake, HandshakeConfig, HeaderMode, NbdUri};
//!
//! let uri: NbdUri = "nbd+unix:///disk?socket=/run/nbd.sock".parse().unwrap();
//! let mut hs = Handshake::new(HandshakeConfig {
//!     export: uri.export.clone(),
//!     extended_headers: false,
//!     ..HandshakeConfig::default()
//! })
//! .unwrap();
//!
//! // The server's greeting: NBDMAGIC, IHAVEOPT, fixed newstyle + no zeroes.
//! let mut greeting = Vec::new();
//! greeting.extend_from_slice(b"NBDMAGICIHAVEOPT");
//! greeting.extend_from_slice(&[0, 3]);
//! assert_eq!(hs.feed(&greeting).unwrap(), None);
//!
//! // The client answers with its flags and NBD_OPT_STRUCTURED_REPLY (8).
//! let out = hs.take_output();
//! assert_eq!(&out[..4], &[0, 0, 0, 3]);
//! assert_eq!(&out[4..12], b"IHAVEOPT");
//! assert_eq!(&out[12..16], &[0, 0, 0, 8]);
//! assert_eq!(hs.wanted(), 20); // an option reply header comes next
//! # let _ = HeaderMode::Structured;
//! ```

#![warn(missing_docs)]

pub mod client;
pub mod error;
pub mod handshake;
pub mod map;
pub mod reply;
pub mod status;
pub mod tls;
pub mod transmission;
pub mod types;
pub mod uri;
pub mod wire;

pub use client::{BlockStatusIter, Client, ClientConfig};
pub use error::{Error, HandshakeError, ProtocolError, ReplyError, RequestError};
pub use handshake::{BlockSize, Handshake, HandshakeConfig, MetaContext, Negotiated, TlsMode};
pub use map::StatusExtent;
pub use sparsekit_extent::{Extent, Kind};
pub use status::{StatusPager, StatusRoundTrip};
pub use tls::{TlsConfigError, TlsSetup};
pub use transmission::{Completion, Limits, Op, Reply, Transmission, Want, ZeroFlags};
pub use uri::{NbdUri, TlsParams, Transport, UriError};
pub use wire::{
    Chunk, ChunkHeader, ChunkType, Command, ContextId, Cookie, Descriptor, Errno, HeaderMode,
    ReplyHeader, Request, TransmissionFlags,
};
