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
//! ```no_run
//! use sparsekit_nbd::{Client, Kind};
//!
//! let mut c = Client::connect("nbds://nbd.example/disk?tls-certificates=/etc/pki/qemu")?;
//! assert!(c.is_tls());
//! let size = c.size();
//! let mut buf = vec![0u8; 1 << 20];
//! let extents: Vec<_> = c.map(0..size)?.collect::<Result<_, _>>()?;
//! for e in extents {
//!     if e.kind == Kind::Data && e.length <= buf.len() as u64 {
//!         c.read(e.offset, &mut buf[..e.length as usize])?;
//!     }
//! }
//! # Ok::<(), sparsekit_nbd::Error>(())
//! ```
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
