//! The fixed newstyle handshake as a state machine over bytes.
//!
//! [`Handshake`] does no I/O. The driver loop is:
//!
//! 1. send everything [`Handshake::take_output`] returns;
//! 2. read exactly [`Handshake::wanted`] bytes and pass them to
//!    [`Handshake::feed`];
//! 3. repeat until `feed` returns `Ok(Some(negotiated))`.
//!
//! With TLS asked for ([`TlsMode`]), `NBD_OPT_STARTTLS` goes first; on
//! `NBD_REP_ACK` the machine stops in [`Handshake::starting_tls`]: the
//! driver runs the TLS handshake on its socket, calls
//! [`Handshake::tls_started`], and the loop goes on over the encrypted
//! stream (spec: "TLS support", "FORCEDTLS mode").
//!
//! The options sent, one at a time as the spec requires: optionally
//! `NBD_OPT_EXTENDED_HEADERS` (falling back to `NBD_OPT_STRUCTURED_REPLY`
//! when refused), optionally `NBD_OPT_LIST_META_CONTEXT`,
//! `NBD_OPT_SET_META_CONTEXT` when contexts are wanted, then `NBD_OPT_GO`
//! with `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE` requests (falling back
//! to `NBD_OPT_EXPORT_NAME` on `NBD_REP_ERR_UNSUP`).

use crate::error::{HandshakeError, ProtocolError};
use crate::wire::{
    ContextId, HeaderMode, IHAVEOPT, MAX_STRING, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_MAGIC, OLDSTYLE_MAGIC, OPTION_REPLY_MAGIC, Opt,
    RawBlockSize, RawExportInfo, RawGreeting, RawOptionReply, RawOptionRequest, RepType,
    TransmissionFlags, decode, decode_prefix, read_be16, read_be32,
};
use zerocopy::IntoBytes;

/// Bytes of the server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub const GREETING_LEN: usize = size_of::<RawGreeting>();
/// Bytes of an option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = size_of::<RawOptionReply>();
/// Largest option reply payload accepted: a 4096-byte string plus the
/// fixed fields of any reply type, with room to spare.
pub const MAX_OPTION_REPLY: u32 = 16 * 1024;
/// Most metadata contexts accepted from one list or set reply.
pub const MAX_CONTEXTS: usize = 4096;

/// Default maximum payload when the server advertises none (2^25).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Whether the client negotiates TLS with `NBD_OPT_STARTTLS`.
///
/// The NBD URI specification: `nbds://` and `nbds+unix://` "MUST use TLS";
/// `nbd://` and `nbd+unix://` are "unencrypted or opportunistically TLS
/// encrypted".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// No `NBD_OPT_STARTTLS`; a server that requires TLS is refused with
    /// [`HandshakeError::TlsRequired`].
    #[default]
    Off,
    /// `NBD_OPT_STARTTLS` first; if the server does not support TLS
    /// (`NBD_REP_ERR_UNSUP`, `NBD_REP_ERR_POLICY`), go on unencrypted. Open
    /// to a downgrade by anyone on the path (spec: "Security
    /// considerations"): only `nbd://` URIs with TLS parameters ask for it.
    Opportunistic,
    /// `NBD_OPT_STARTTLS` first, and TLS or nothing:
    /// [`HandshakeError::TlsUnsupported`] when the server can not.
    Require,
}

/// What to ask the server for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeConfig {
    /// Export name (may be empty: the default export).
    pub export: String,
    /// Metadata contexts to select with `NBD_OPT_SET_META_CONTEXT`, e.g.
    /// `base:allocation`, `qemu:dirty-bitmap:NAME`, `qemu:allocation-depth`.
    pub contexts: Vec<String>,
    /// Try `NBD_OPT_STRUCTURED_REPLY` (needed for block status and sparse reads).
    pub structured_replies: bool,
    /// Try `NBD_OPT_EXTENDED_HEADERS` first (64-bit lengths).
    pub extended_headers: bool,
    /// Send `NBD_OPT_LIST_META_CONTEXT` with no query, to learn every
    /// context the export offers.
    pub list_contexts: bool,
    /// Whether to upgrade to TLS first (default [`TlsMode::Off`]).
    pub tls: TlsMode,
}

impl Default for HandshakeConfig {
    /// The default export, `base:allocation`, structured replies and
    /// extended headers when offered, no listing.
    fn default() -> Self {
        HandshakeConfig {
            export: String::new(),
            contexts: vec!["base:allocation".into()],
            structured_replies: true,
            extended_headers: true,
            list_contexts: false,
            tls: TlsMode::Off,
        }
    }
}

/// The server's size constraints (spec: "Size constraints").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    /// Smallest addressable length and alignment; a power of 2 ≤ 64 KiB.
    pub minimum: u32,
    /// Smallest efficient length; a power of 2 ≥ max(minimum, 512).
    pub preferred: u32,
    /// Largest payload the server accepts in one request.
    pub maximum: u32,
    /// False when the server sent no `NBD_INFO_BLOCK_SIZE` and these are
    /// the spec's defaults (1, 4096, 2^25).
    pub advertised: bool,
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: DEFAULT_MAX_PAYLOAD,
            advertised: false,
        }
    }
}

/// Alignment of every request when the server advertises no minimum block
/// size: the spec's advice to a client "desiring maximum interoperability",
/// and what nbdinfo aligns to.
pub const DEFAULT_ALIGNMENT: u32 = 512;

impl BlockSize {
    /// What every request's offset and length must be a multiple of: the
    /// advertised minimum block size, else [`DEFAULT_ALIGNMENT`].
    pub fn alignment(&self) -> u32 {
        if self.advertised {
            self.minimum
        } else {
            DEFAULT_ALIGNMENT
        }
    }

    /// Parses the 12 bytes after the info type of `NBD_INFO_BLOCK_SIZE` and
    /// checks the spec's rules.
    pub fn parse(buf: &[u8]) -> Result<BlockSize, ProtocolError> {
        let raw: RawBlockSize = decode("NBD_INFO_BLOCK_SIZE", buf)?;
        let (minimum, preferred, maximum) =
            (raw.minimum.get(), raw.preferred.get(), raw.maximum.get());
        let bad = |reason| ProtocolError::BadBlockSize {
            minimum,
            preferred,
            maximum,
            reason,
        };
        if !minimum.is_power_of_two() || minimum > 65536 {
            return Err(bad("minimum must be a power of 2 no larger than 65536"));
        }
        if !preferred.is_power_of_two() || preferred < minimum.max(512) {
            return Err(bad(
                "preferred must be a power of 2 at least max(minimum, 512)",
            ));
        }
        if maximum < preferred {
            return Err(bad("maximum must be at least the preferred size"));
        }
        Ok(BlockSize {
            minimum,
            preferred,
            maximum,
            advertised: true,
        })
    }
}

/// A metadata context the server selected, with the ID its block status
/// chunks will carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContext {
    /// Server-assigned ID for this connection.
    pub id: ContextId,
    /// Context name, e.g. `base:allocation`.
    pub name: String,
}

/// The outcome of a successful handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Export name sent.
    pub export: String,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Size constraints (advertised or default).
    pub block_size: BlockSize,
    /// Header layout of the transmission phase.
    pub mode: HeaderMode,
    /// Contexts selected, with their IDs.
    pub contexts: Vec<MetaContext>,
    /// Every context offered, when `list_contexts` was asked and answered.
    pub available_contexts: Option<Vec<String>>,
    /// `NBD_INFO_DESCRIPTION`, if sent.
    pub description: Option<String>,
    /// `NBD_INFO_NAME` (canonical name), if sent.
    pub canonical_name: Option<String>,
    /// The connection was upgraded to TLS with `NBD_OPT_STARTTLS`.
    pub tls: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Greeting,
    ReplyHeader {
        opt: Opt,
    },
    ReplyPayload {
        opt: Opt,
        reply: RepType,
        len: u32,
    },
    ExportNameReply {
        len: usize,
    },
    /// `NBD_OPT_STARTTLS` acknowledged: the driver runs the TLS handshake.
    StartTls,
    Done,
}

/// The client side of the fixed newstyle handshake. See the module docs for
/// the driver loop.
///
/// ```
/// use sparsekit_nbd::{Handshake, HandshakeConfig};
/// let mut hs = Handshake::new(HandshakeConfig::default()).unwrap();
/// assert!(hs.take_output().is_empty()); // the server speaks first
/// assert_eq!(hs.wanted(), 18);          // NBDMAGIC, IHAVEOPT, flags
/// ```
#[derive(Debug)]
pub struct Handshake {
    config: HandshakeConfig,
    phase: Phase,
    out: Vec<u8>,
    mode: HeaderMode,
    /// `NBD_FLAG_C_NO_ZEROES` was sent.
    no_zeroes: bool,
    size_flags: Option<(u64, u16)>,
    block_size: Option<BlockSize>,
    contexts: Vec<MetaContext>,
    listed: Vec<String>,
    available: Option<Vec<String>>,
    description: Option<String>,
    canonical_name: Option<String>,
    tls: bool,
}

impl Handshake {
    /// A handshake that will ask for what `config` says.
    pub fn new(config: HandshakeConfig) -> Result<Handshake, HandshakeError> {
        if config.export.len() > MAX_STRING {
            return Err(HandshakeError::StringTooLong {
                what: "export name",
            });
        }
        if config.contexts.iter().any(|c| c.len() > MAX_STRING) {
            return Err(HandshakeError::StringTooLong {
                what: "metadata context name",
            });
        }
        Ok(Handshake {
            config,
            phase: Phase::Greeting,
            out: Vec::new(),
            mode: HeaderMode::Simple,
            no_zeroes: false,
            size_flags: None,
            block_size: None,
            contexts: Vec::new(),
            listed: Vec::new(),
            available: None,
            description: None,
            canonical_name: None,
            tls: false,
        })
    }

    /// Bytes to send to the server now (empty when there are none).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Exactly how many bytes the next [`Handshake::feed`] needs; 0 once
    /// done, and while [`Handshake::starting_tls`].
    pub fn wanted(&self) -> usize {
        match self.phase {
            Phase::Greeting => GREETING_LEN,
            Phase::ReplyHeader { .. } => OPTION_REPLY_HEADER_LEN,
            Phase::ReplyPayload { len, .. } => len as usize,
            Phase::ExportNameReply { len } => len,
            Phase::StartTls | Phase::Done => 0,
        }
    }

    /// True when the server acknowledged `NBD_OPT_STARTTLS`: the driver
    /// must now run the TLS handshake on its socket (nothing is left to
    /// send in clear), then call [`Handshake::tls_started`]. Every byte
    /// after that travels encrypted.
    pub fn starting_tls(&self) -> bool {
        self.phase == Phase::StartTls
    }

    /// Tells the machine that the TLS session is up; option haggling goes
    /// on with the next option, to be sent over the encrypted stream.
    pub fn tls_started(&mut self) -> Result<(), HandshakeError> {
        if self.phase != Phase::StartTls {
            return Err(HandshakeError::NotStartingTls);
        }
        self.tls = true;
        self.after_tls();
        Ok(())
    }

    /// True once the transmission phase has been reached.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Consumes exactly [`Handshake::wanted`] bytes from the server.
    /// Returns the negotiated export when the handshake is complete; then
    /// send [`Handshake::take_output`] one last time (it is empty unless
    /// the server closed nothing) and start the transmission phase.
    pub fn feed(&mut self, input: &[u8]) -> Result<Option<Negotiated>, HandshakeError> {
        if self.phase == Phase::StartTls {
            // Bytes now would be the server's TLS records, not NBD.
            return Err(HandshakeError::TlsPending);
        }
        let expected = self.wanted();
        if input.len() != expected {
            return Err(HandshakeError::WrongFeed {
                expected,
                found: input.len(),
            });
        }
        match self.phase {
            Phase::Greeting => self.greeting(input)?,
            Phase::ReplyHeader { opt } => {
                let raw: RawOptionReply = decode("option reply header", input)?;
                let magic = raw.magic.get();
                if magic != OPTION_REPLY_MAGIC {
                    return Err(ProtocolError::BadMagic {
                        what: "option reply",
                        expected: OPTION_REPLY_MAGIC,
                        found: magic,
                    }
                    .into());
                }
                let got = Opt(raw.option.get());
                if got != opt {
                    return Err(ProtocolError::OptionMismatch { sent: opt, got }.into());
                }
                let reply = RepType(raw.reply_type.get());
                let len = raw.length.get();
                if len > MAX_OPTION_REPLY {
                    return Err(ProtocolError::OptionReplyTooLong {
                        option: opt,
                        reply,
                        length: len,
                        max: MAX_OPTION_REPLY,
                    }
                    .into());
                }
                if len == 0 {
                    self.reply(opt, reply, &[])?;
                } else {
                    self.phase = Phase::ReplyPayload { opt, reply, len };
                }
            }
            Phase::ReplyPayload { opt, reply, .. } => self.reply(opt, reply, input)?,
            Phase::ExportNameReply { .. } => {
                // Size and flags, then 124 zeroes unless NO_ZEROES.
                let (info, _) = decode_prefix::<RawExportInfo>("NBD_OPT_EXPORT_NAME reply", input)?;
                self.size_flags = Some((info.size.get(), info.flags.get()));
                self.phase = Phase::Done;
            }
            Phase::StartTls | Phase::Done => {}
        }
        if self.phase == Phase::Done {
            return self.finish().map(Some);
        }
        Ok(None)
    }

    fn greeting(&mut self, input: &[u8]) -> Result<(), HandshakeError> {
        let g: RawGreeting = decode("greeting", input)?;
        let magic = g.magic.get();
        if magic != NBD_MAGIC {
            return Err(ProtocolError::BadMagic {
                what: "greeting",
                expected: NBD_MAGIC,
                found: magic,
            }
            .into());
        }
        let require_tls = self.config.tls == TlsMode::Require;
        match g.newstyle.get() {
            IHAVEOPT => {}
            // Spec: "TLS requires fixed newstyle negotiation".
            OLDSTYLE_MAGIC if require_tls => {
                return Err(HandshakeError::TlsUnsupported {
                    reason: "it uses oldstyle negotiation".into(),
                });
            }
            OLDSTYLE_MAGIC => return Err(ProtocolError::Oldstyle.into()),
            found => {
                return Err(ProtocolError::BadMagic {
                    what: "newstyle greeting",
                    expected: IHAVEOPT,
                    found,
                }
                .into());
            }
        }
        let flags = g.flags.get();
        if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            if require_tls {
                return Err(HandshakeError::TlsUnsupported {
                    reason: format!(
                        "it does not offer fixed newstyle negotiation (handshake flags {flags:#x})"
                    ),
                });
            }
            return Err(ProtocolError::NotFixedNewstyle { flags }.into());
        }
        let mut client = NBD_FLAG_C_FIXED_NEWSTYLE;
        if flags & NBD_FLAG_NO_ZEROES != 0 {
            client |= NBD_FLAG_C_NO_ZEROES;
            self.no_zeroes = true;
        }
        self.out.extend_from_slice(&client.to_be_bytes());
        if self.config.tls == TlsMode::Off {
            self.after_tls();
        } else {
            // First, so that nothing else is said in clear.
            self.send_option(Opt::STARTTLS, &[]);
        }
        Ok(())
    }

    /// The first option once TLS is settled (started, refused or not asked).
    fn after_tls(&mut self) {
        if self.config.extended_headers {
            self.send_option(Opt::EXTENDED_HEADERS, &[]);
        } else if self.config.structured_replies {
            self.send_option(Opt::STRUCTURED_REPLY, &[]);
        } else {
            self.after_structured();
        }
    }

    /// `NBD_OPT_ABORT`: what a client sends to end option haggling that
    /// failed on a server's reply (an unknown export, a refused option),
    /// so the server can close cleanly instead of seeing a hang-up.
    pub fn abort_request() -> [u8; 16] {
        let mut b = [0u8; 16];
        b.copy_from_slice(Self::option_header(Opt::ABORT, 0).as_bytes());
        b
    }

    fn option_header(opt: Opt, length: u32) -> RawOptionRequest {
        RawOptionRequest {
            magic: IHAVEOPT.into(),
            option: opt.0.into(),
            length: length.into(),
        }
    }

    fn send_option(&mut self, opt: Opt, data: &[u8]) {
        // Callers bound every string by MAX_STRING, so the data fits.
        let len = u32::try_from(data.len()).expect("option data under 4 GiB");
        self.out
            .extend_from_slice(Self::option_header(opt, len).as_bytes());
        self.out.extend_from_slice(data);
        self.phase = Phase::ReplyHeader { opt };
    }

    fn meta_context_data(&self, queries: &[String]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(self.config.export.len() as u32).to_be_bytes());
        d.extend_from_slice(self.config.export.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    /// Next option once structured replies are settled.
    fn after_structured(&mut self) {
        if self.mode.structured() && self.config.list_contexts {
            let d = self.meta_context_data(&[]);
            self.send_option(Opt::LIST_META_CONTEXT, &d);
        } else {
            self.after_list();
        }
    }

    fn after_list(&mut self) {
        if self.mode.structured() && !self.config.contexts.is_empty() {
            let d = self.meta_context_data(&self.config.contexts.clone());
            self.send_option(Opt::SET_META_CONTEXT, &d);
        } else {
            self.send_go();
        }
    }

    fn send_go(&mut self) {
        let mut d = Vec::new();
        d.extend_from_slice(&(self.config.export.len() as u32).to_be_bytes());
        d.extend_from_slice(self.config.export.as_bytes());
        let infos = [NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE];
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        self.send_option(Opt::GO, &d);
    }

    fn message(payload: &[u8]) -> String {
        String::from_utf8_lossy(payload).into_owned()
    }

    /// Errors every option treats alike; `None` for the rest.
    fn common_error(opt: Opt, reply: RepType, payload: &[u8]) -> Option<HandshakeError> {
        match reply {
            RepType::ERR_TLS_REQD => Some(HandshakeError::TlsRequired {
                option: opt,
                message: Self::message(payload),
            }),
            RepType::ERR_SHUTDOWN => Some(HandshakeError::Refused {
                option: opt,
                reply,
                message: Self::message(payload),
            }),
            _ => None,
        }
    }

    fn reply(&mut self, opt: Opt, reply: RepType, payload: &[u8]) -> Result<(), HandshakeError> {
        if reply.is_error()
            && let Some(e) = Self::common_error(opt, reply, payload)
        {
            return Err(e);
        }
        match opt {
            Opt::STARTTLS => match reply {
                RepType::ACK => self.phase = Phase::StartTls,
                RepType::ERR_UNSUP | RepType::ERR_POLICY
                    if self.config.tls == TlsMode::Opportunistic =>
                {
                    // A NOTLS server: on in clear, as asked.
                    self.after_tls();
                }
                RepType::ERR_UNSUP | RepType::ERR_POLICY => {
                    return Err(HandshakeError::TlsUnsupported {
                        reason: format!(
                            "it refused {opt} with {reply}{}",
                            crate::error::suffix(&Self::message(payload))
                        ),
                    });
                }
                r if r.is_error() => {
                    return Err(HandshakeError::Refused {
                        option: opt,
                        reply: r,
                        message: Self::message(payload),
                    });
                }
                r => return Err(unexpected(opt, r)),
            },
            Opt::EXTENDED_HEADERS => match reply {
                RepType::ACK => {
                    // Extended headers imply structured replies.
                    self.mode = HeaderMode::Extended;
                    self.after_structured();
                }
                r if r.is_error() => {
                    // Not offered: fall back.
                    if self.config.structured_replies {
                        self.send_option(Opt::STRUCTURED_REPLY, &[]);
                    } else {
                        self.after_structured();
                    }
                }
                r => return Err(unexpected(opt, r)),
            },
            Opt::STRUCTURED_REPLY => match reply {
                RepType::ACK => {
                    self.mode = HeaderMode::Structured;
                    self.after_structured();
                }
                // Old servers: simple replies only, hence no block status.
                r if r.is_error() => self.after_structured(),
                r => return Err(unexpected(opt, r)),
            },
            Opt::LIST_META_CONTEXT | Opt::SET_META_CONTEXT => match reply {
                RepType::META_CONTEXT => {
                    if payload.len() < 4 {
                        return Err(ProtocolError::BadOptionReply {
                            option: opt,
                            reply,
                            reason: "shorter than its 4-byte context id",
                        }
                        .into());
                    }
                    let id = ContextId(read_be32(payload, 0));
                    let name = String::from_utf8(payload[4..].to_vec()).map_err(|_| {
                        ProtocolError::BadOptionReply {
                            option: opt,
                            reply,
                            reason: "context name is not UTF-8",
                        }
                    })?;
                    let count = if opt == Opt::LIST_META_CONTEXT {
                        self.listed.push(name);
                        self.listed.len()
                    } else {
                        self.contexts.push(MetaContext { id, name });
                        self.contexts.len()
                    };
                    if count > MAX_CONTEXTS {
                        return Err(ProtocolError::TooManyContexts {
                            option: opt,
                            max: MAX_CONTEXTS,
                        }
                        .into());
                    }
                    self.phase = Phase::ReplyHeader { opt };
                }
                RepType::ACK if opt == Opt::LIST_META_CONTEXT => {
                    self.available = Some(std::mem::take(&mut self.listed));
                    self.after_list();
                }
                RepType::ACK => self.send_go(),
                r if r.is_error() => {
                    // "If an error is returned, the client MUST disregard
                    // any context replies that may have been sent."
                    // A server that can not list or select contexts is
                    // still usable for reads.
                    if opt == Opt::LIST_META_CONTEXT {
                        self.listed.clear();
                        self.after_list();
                    } else {
                        self.contexts.clear();
                        self.send_go();
                    }
                }
                r => return Err(unexpected(opt, r)),
            },
            Opt::GO => match reply {
                RepType::INFO => {
                    self.info(payload)?;
                    self.phase = Phase::ReplyHeader { opt };
                }
                RepType::ACK => {
                    if self.size_flags.is_none() {
                        return Err(ProtocolError::MissingExportInfo.into());
                    }
                    self.phase = Phase::Done;
                }
                RepType::ERR_UNKNOWN => {
                    return Err(HandshakeError::UnknownExport {
                        export: self.config.export.clone(),
                        message: Self::message(payload),
                    });
                }
                RepType::ERR_UNSUP => {
                    // Spec: fall back to NBD_OPT_EXPORT_NAME.
                    self.size_flags = None;
                    self.block_size = None;
                    let name = self.config.export.clone();
                    self.send_option(Opt::EXPORT_NAME, name.as_bytes());
                    // EXPORT_NAME has no option reply: size, flags, zeroes.
                    self.phase = Phase::ExportNameReply {
                        len: if self.no_zeroes { 10 } else { 10 + 124 },
                    };
                }
                r if r.is_error() => {
                    return Err(HandshakeError::Refused {
                        option: opt,
                        reply: r,
                        message: Self::message(payload),
                    });
                }
                r => return Err(unexpected(opt, r)),
            },
            _ => return Err(unexpected(opt, reply)),
        }
        Ok(())
    }

    fn info(&mut self, payload: &[u8]) -> Result<(), HandshakeError> {
        let bad = |reason| ProtocolError::BadOptionReply {
            option: Opt::GO,
            reply: RepType::INFO,
            reason,
        };
        if payload.len() < 2 {
            return Err(bad("shorter than its 2-byte information type").into());
        }
        let body = &payload[2..];
        match read_be16(payload, 0) {
            NBD_INFO_EXPORT => {
                let info: RawExportInfo = decode("NBD_INFO_EXPORT", body)
                    .map_err(|_| bad("NBD_INFO_EXPORT must have length 12"))?;
                self.size_flags = Some((info.size.get(), info.flags.get()));
            }
            NBD_INFO_BLOCK_SIZE => {
                self.block_size = Some(BlockSize::parse(body)?);
            }
            NBD_INFO_NAME => self.canonical_name = Some(Self::message(body)),
            NBD_INFO_DESCRIPTION => self.description = Some(Self::message(body)),
            // "The client MUST ignore information replies it does not understand."
            _ => {}
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Negotiated, HandshakeError> {
        let (size, flags) = self.size_flags.ok_or(ProtocolError::MissingExportInfo)?;
        Ok(Negotiated {
            export: self.config.export.clone(),
            size,
            flags: TransmissionFlags(flags),
            block_size: self.block_size.unwrap_or_default(),
            mode: self.mode,
            contexts: std::mem::take(&mut self.contexts),
            available_contexts: self.available.take(),
            description: self.description.take(),
            canonical_name: self.canonical_name.take(),
            tls: self.tls,
        })
    }
}

fn unexpected(option: Opt, reply: RepType) -> HandshakeError {
    ProtocolError::UnexpectedOptionReply { option, reply }.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The greeting: NBDMAGIC, IHAVEOPT, handshake flags.
    fn greeting(flags: u16) -> Vec<u8> {
        let mut g = Vec::new();
        g.extend_from_slice(&[0x4e, 0x42, 0x44, 0x4d, 0x41, 0x47, 0x49, 0x43]); // "NBDMAGIC"
        g.extend_from_slice(&[0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54]); // "IHAVEOPT"
        g.extend_from_slice(&flags.to_be_bytes()); // handshake flags
        g
    }

    /// An option reply header followed by its payload.
    fn reply(opt: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&0x0003_e889_0455_65a9_u64.to_be_bytes()); // option reply magic
        r.extend_from_slice(&opt.to_be_bytes()); // option being answered
        r.extend_from_slice(&reply_type.to_be_bytes()); // NBD_REP_*
        r.extend_from_slice(&(payload.len() as u32).to_be_bytes()); // payload length
        r.extend_from_slice(payload);
        r
    }

    /// Feeds a server byte stream in the pieces the machine asks for.
    fn drive(hs: &mut Handshake, mut server: &[u8]) -> Result<Option<Negotiated>, HandshakeError> {
        while hs.wanted() > 0 && !server.is_empty() {
            let n = hs.wanted();
            let (now, rest) = server.split_at(n);
            server = rest;
            if let Some(done) = hs.feed(now)? {
                return Ok(Some(done));
            }
        }
        Ok(None)
    }

    fn meta(id: u32, name: &str) -> Vec<u8> {
        let mut p = id.to_be_bytes().to_vec(); // context id
        p.extend_from_slice(name.as_bytes()); // context name
        p
    }

    #[rustfmt::skip]
    fn info_export(size: u64, flags: u16) -> Vec<u8> {
        let mut p = vec![0x00, 0x00]; // NBD_INFO_EXPORT
        p.extend_from_slice(&size.to_be_bytes()); // export size
        p.extend_from_slice(&flags.to_be_bytes()); // transmission flags
        p
    }

    #[rustfmt::skip]
    fn info_block_size(min: u32, pref: u32, max: u32) -> Vec<u8> {
        let mut p = vec![0x00, 0x03]; // NBD_INFO_BLOCK_SIZE
        p.extend_from_slice(&min.to_be_bytes()); // minimum
        p.extend_from_slice(&pref.to_be_bytes()); // preferred
        p.extend_from_slice(&max.to_be_bytes()); // maximum payload
        p
    }

    const ACK: u32 = 1;
    const INFO: u32 = 3;
    const META: u32 = 4;
    const UNSUP: u32 = (1 << 31) + 1;
    const POLICY: u32 = (1 << 31) + 2;
    const INVALID: u32 = (1 << 31) + 3;
    const TLS_REQD: u32 = (1 << 31) + 5;
    const UNKNOWN: u32 = (1 << 31) + 6;

    #[test]
    fn full_negotiation_with_extended_headers() {
        let mut hs = Handshake::new(HandshakeConfig {
            export: "disk".into(),
            contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:b".into()],
            list_contexts: true,
            ..HandshakeConfig::default()
        })
        .unwrap();
        let mut server = greeting(0x0003);
        server.extend(reply(11, ACK, &[])); // EXTENDED_HEADERS acked
        server.extend(reply(9, META, &meta(0, "base:allocation"))); // list
        server.extend(reply(9, META, &meta(0, "qemu:dirty-bitmap:b")));
        server.extend(reply(9, ACK, &[]));
        server.extend(reply(10, META, &meta(7, "base:allocation"))); // set
        server.extend(reply(10, META, &meta(8, "qemu:dirty-bitmap:b")));
        server.extend(reply(10, ACK, &[]));
        server.extend(reply(7, INFO, &info_export(1 << 20, 0x0103)));
        server.extend(reply(7, INFO, &info_block_size(512, 4096, 1 << 25)));
        server.extend(reply(7, INFO, &[0x00, 0x09, 1, 2])); // unknown info: ignored
        server.extend(reply(7, ACK, &[]));
        let n = drive(&mut hs, &server).unwrap().unwrap();
        assert_eq!(n.mode, HeaderMode::Extended);
        assert_eq!(n.size, 1 << 20);
        assert!(n.flags.read_only() && n.flags.can_multi_conn());
        assert_eq!(n.block_size.minimum, 512);
        assert!(n.block_size.advertised);
        assert_eq!(
            n.contexts,
            vec![
                MetaContext {
                    id: ContextId(7),
                    name: "base:allocation".into()
                },
                MetaContext {
                    id: ContextId(8),
                    name: "qemu:dirty-bitmap:b".into()
                },
            ]
        );
        assert_eq!(n.available_contexts.unwrap().len(), 2);

        // What the client sent, option by option.
        let out = hs.take_output();
        assert_eq!(
            &out[..4],
            &[0, 0, 0, 3],
            "client flags: fixed newstyle + no zeroes"
        );
        let mut at = 4;
        let mut opts = Vec::new();
        while at < out.len() {
            assert_eq!(&out[at..at + 8], b"IHAVEOPT");
            let opt = read_be32(&out, at + 8);
            let len = read_be32(&out, at + 12) as usize;
            opts.push((opt, out[at + 16..at + 16 + len].to_vec()));
            at += 16 + len;
        }
        let kinds: Vec<u32> = opts.iter().map(|o| o.0).collect();
        assert_eq!(kinds, [11, 9, 10, 7]);
        #[rustfmt::skip]
        let go = [
            0, 0, 0, 4, b'd', b'i', b's', b'k', // export name length, name
            0, 2, // two information requests
            0, 0, // NBD_INFO_EXPORT
            0, 3, // NBD_INFO_BLOCK_SIZE
        ];
        assert_eq!(opts[3].1, go);
        #[rustfmt::skip]
        let set_prefix = [
            0, 0, 0, 4, b'd', b'i', b's', b'k', // export name
            0, 0, 0, 2, // two queries
            0, 0, 0, 15, // length of "base:allocation"
        ];
        assert_eq!(&opts[2].1[..16], set_prefix);
    }

    #[test]
    fn falls_back_from_extended_to_structured_and_from_go_to_export_name() {
        let mut hs = Handshake::new(HandshakeConfig::default()).unwrap();
        let mut server = greeting(0x0001); // fixed newstyle, zeroes will be sent
        server.extend(reply(11, UNSUP, b"no extended headers"));
        server.extend(reply(8, ACK, &[]));
        server.extend(reply(10, ACK, &[])); // no contexts selected
        server.extend(reply(7, UNSUP, &[]));
        server.extend(4096u64.to_be_bytes()); // EXPORT_NAME reply: size
        server.extend(0x0001u16.to_be_bytes()); // transmission flags
        server.extend([0u8; 124]); // zeroes: no NBD_FLAG_C_NO_ZEROES
        let n = drive(&mut hs, &server).unwrap().unwrap();
        assert_eq!(n.mode, HeaderMode::Structured);
        assert_eq!(n.size, 4096);
        assert!(n.contexts.is_empty());
        assert_eq!(n.block_size, BlockSize::default());
        let out = hs.take_output();
        assert_eq!(&out[..4], &[0, 0, 0, 1], "no NBD_FLAG_C_NO_ZEROES");
    }

    #[test]
    fn unknown_export_is_typed() {
        let mut hs = Handshake::new(HandshakeConfig {
            export: "nope".into(),
            contexts: vec![],
            extended_headers: false,
            ..HandshakeConfig::default()
        })
        .unwrap();
        let mut server = greeting(3);
        server.extend(reply(8, ACK, &[]));
        server.extend(reply(7, UNKNOWN, b"no such export"));
        let e = drive(&mut hs, &server).unwrap_err();
        assert_eq!(
            e,
            HandshakeError::UnknownExport {
                export: "nope".into(),
                message: "no such export".into()
            }
        );
        assert!(e.to_string().contains("\"nope\""));
    }

    #[test]
    fn tls_required_is_typed() {
        let mut hs = Handshake::new(HandshakeConfig::default()).unwrap();
        let mut server = greeting(3);
        server.extend(reply(11, TLS_REQD, &[]));
        let e = drive(&mut hs, &server).unwrap_err();
        assert!(matches!(e, HandshakeError::TlsRequired { .. }), "{e:?}");
        let m = e.to_string();
        assert!(
            m.contains("requires TLS") && m.contains("nbds:// or nbds+unix://"),
            "{m}"
        );
    }

    fn tls(mode: TlsMode) -> Handshake {
        Handshake::new(HandshakeConfig {
            contexts: vec![],
            extended_headers: false,
            tls: mode,
            ..HandshakeConfig::default()
        })
        .unwrap()
    }

    /// The options in `out` after the 4 bytes of client flags.
    fn options(out: &[u8]) -> Vec<u32> {
        let mut at = 4;
        let mut opts = Vec::new();
        while at < out.len() {
            opts.push(read_be32(out, at + 8));
            at += 16 + read_be32(out, at + 12) as usize;
        }
        opts
    }

    #[test]
    fn starttls_first_then_haggling_goes_on_encrypted() {
        let mut hs = tls(TlsMode::Require);
        assert_eq!(drive(&mut hs, &greeting(3)).unwrap(), None);
        let out = hs.take_output();
        assert_eq!(options(&out), [5], "NBD_OPT_STARTTLS alone, first");
        #[rustfmt::skip]
        assert_eq!(&out[4..], [
            b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', // option magic
            0, 0, 0, 5, // NBD_OPT_STARTTLS
            0, 0, 0, 0, // no data
        ]);
        assert!(!hs.starting_tls());
        assert_eq!(drive(&mut hs, &reply(5, ACK, &[])).unwrap(), None);

        // The driver's turn: nothing to send, nothing to read in clear.
        assert!(hs.starting_tls() && !hs.is_done());
        assert_eq!(hs.wanted(), 0);
        assert!(hs.take_output().is_empty());
        assert_eq!(hs.feed(&[]), Err(HandshakeError::TlsPending));
        hs.tls_started().unwrap();
        assert!(!hs.starting_tls());
        assert_eq!(hs.tls_started(), Err(HandshakeError::NotStartingTls));

        // Haggling resumes where it would have started without TLS.
        let out = hs.take_output();
        assert_eq!(options(&[&[0; 4][..], &out].concat()), [8]);
        let mut server = reply(8, ACK, &[]);
        server.extend(reply(7, INFO, &info_export(4096, 1)));
        server.extend(reply(7, ACK, &[]));
        let n = drive(&mut hs, &server).unwrap().unwrap();
        assert!(n.tls);
        assert_eq!(n.mode, HeaderMode::Structured);
    }

    #[test]
    fn tls_out_of_turn_is_named() {
        let mut hs = tls(TlsMode::Off);
        assert_eq!(hs.tls_started(), Err(HandshakeError::NotStartingTls));
        drive(&mut hs, &greeting(3)).unwrap();
        assert_eq!(options(&hs.take_output()), [8], "no STARTTLS when off");
    }

    #[test]
    fn a_server_without_tls_is_refused_when_tls_is_required() {
        for (refusal, name) in [(UNSUP, "NBD_REP_ERR_UNSUP"), (POLICY, "NBD_REP_ERR_POLICY")] {
            let mut hs = tls(TlsMode::Require);
            let mut server = greeting(3);
            server.extend(reply(5, refusal, b"no TLS here"));
            let e = drive(&mut hs, &server).unwrap_err();
            assert!(matches!(e, HandshakeError::TlsUnsupported { .. }), "{e:?}");
            let m = e.to_string();
            assert!(
                m.contains("does not support TLS") && m.contains(name) && m.contains("no TLS here"),
                "{m}"
            );
        }
        // Other refusals are not "no TLS".
        let mut hs = tls(TlsMode::Require);
        let mut server = greeting(3);
        server.extend(reply(5, INVALID, &[]));
        assert!(matches!(
            drive(&mut hs, &server),
            Err(HandshakeError::Refused { .. })
        ));
        // Neither are old servers, which can not negotiate TLS at all.
        let mut hs = tls(TlsMode::Require);
        let mut g = greeting(3);
        g[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes()); // oldstyle magic
        let e = hs.feed(&g).unwrap_err();
        assert!(e.to_string().contains("does not support TLS"), "{e}");
        let mut hs = tls(TlsMode::Require);
        let e = hs.feed(&greeting(0)).unwrap_err();
        assert!(matches!(e, HandshakeError::TlsUnsupported { .. }), "{e:?}");
        assert!(e.to_string().contains("fixed newstyle"), "{e}");
    }

    #[test]
    fn opportunistic_tls_goes_on_in_clear_with_a_notls_server() {
        let mut hs = tls(TlsMode::Opportunistic);
        let mut server = greeting(3);
        server.extend(reply(5, POLICY, &[]));
        server.extend(reply(8, ACK, &[]));
        server.extend(reply(7, INFO, &info_export(4096, 1)));
        server.extend(reply(7, ACK, &[]));
        let n = drive(&mut hs, &server).unwrap().unwrap();
        assert!(!n.tls);
        assert_eq!(options(&hs.take_output()), [5, 8, 7]);
        // The same mode with a TLS server upgrades.
        let mut hs = tls(TlsMode::Opportunistic);
        let mut server = greeting(3);
        server.extend(reply(5, ACK, &[]));
        drive(&mut hs, &server).unwrap();
        assert!(hs.starting_tls());
    }

    #[test]
    fn hostile_replies_refused_before_allocation() {
        // A reply claiming a 4 GiB payload.
        let mut hs = Handshake::new(HandshakeConfig::default()).unwrap();
        let mut server = greeting(3);
        let mut r = reply(11, ACK, &[]);
        r[16..20].copy_from_slice(&u32::MAX.to_be_bytes()); // payload length
        server.extend(r);
        assert!(matches!(
            drive(&mut hs, &server),
            Err(HandshakeError::Protocol(
                ProtocolError::OptionReplyTooLong { .. }
            ))
        ));

        // A reply for another option.
        let mut hs = Handshake::new(HandshakeConfig::default()).unwrap();
        let mut server = greeting(3);
        server.extend(reply(8, ACK, &[]));
        assert!(matches!(
            drive(&mut hs, &server),
            Err(HandshakeError::Protocol(
                ProtocolError::OptionMismatch { .. }
            ))
        ));

        // GO acked without NBD_INFO_EXPORT.
        let mut hs = Handshake::new(HandshakeConfig {
            extended_headers: false,
            structured_replies: false,
            ..HandshakeConfig::default()
        })
        .unwrap();
        let mut server = greeting(3);
        server.extend(reply(7, ACK, &[]));
        assert!(matches!(
            drive(&mut hs, &server),
            Err(HandshakeError::Protocol(ProtocolError::MissingExportInfo))
        ));
    }

    #[test]
    fn greeting_checks() {
        let mut hs = Handshake::new(HandshakeConfig::default()).unwrap();
        let mut g = greeting(3);
        g[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes()); // oldstyle magic
        assert_eq!(
            hs.feed(&g),
            Err(HandshakeError::Protocol(ProtocolError::Oldstyle))
        );
        let mut hs = Handshake::new(HandshakeConfig::default()).unwrap();
        assert!(matches!(
            hs.feed(&greeting(0)),
            Err(HandshakeError::Protocol(ProtocolError::NotFixedNewstyle {
                flags: 0
            }))
        ));
        let mut hs = Handshake::new(HandshakeConfig::default()).unwrap();
        assert!(matches!(
            hs.feed(&[0; 3]),
            Err(HandshakeError::WrongFeed {
                expected: 18,
                found: 3
            })
        ));
    }

    #[test]
    fn block_size_rules() {
        #[rustfmt::skip]
        let ok = [
            0, 0, 0x02, 0, // minimum 512
            0, 0, 0x10, 0, // preferred 4096
            0, 0x20, 0, 0, // maximum 2 MiB
        ];
        assert_eq!(BlockSize::parse(&ok).unwrap().maximum, 2 << 20);
        let bad = |min: u32, pref: u32, max: u32| {
            let mut b = Vec::new();
            b.extend(min.to_be_bytes());
            b.extend(pref.to_be_bytes());
            b.extend(max.to_be_bytes());
            BlockSize::parse(&b).is_err()
        };
        assert!(bad(3, 4096, 1 << 20), "minimum not a power of 2");
        assert!(bad(1 << 17, 1 << 17, 1 << 20), "minimum over 64 KiB");
        assert!(bad(1, 256, 1 << 20), "preferred under 512");
        assert!(bad(4096, 512, 1 << 20), "preferred under minimum");
        assert!(bad(1, 4096, 1024), "maximum under preferred");
        assert!(!bad(1, 4096, u32::MAX), "no fixed limit");
    }
}
