//! A copy's plan: every check that can fail before anything is written,
//! and every choice (workers, chunk sizes, eviction, how DEST is opened,
//! the ranges), made from the opened source, the inspected destination and
//! the user's [`Request`]. [`Plan::execute`] is the only way to create,
//! truncate or write a destination.

use std::io::BufWriter;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::bmap::{Listed, StreamRanges, copy_ranges};
use crate::dest::{DestKind, DestTarget, Destination, LocalDest, create_locked};
use crate::endpoint::Opened;
use crate::error::{DestState, Error, Failed, PlanError};
use crate::evict::{Evict, dirty_thresholds, evict_by_default};
use crate::nbd_sink::NbdSink;
use crate::progress::Progress;
use crate::raw_stream::{Length, Select};
use crate::sink::{DestMode, FileSink, SPARSE_BLOCK, SPARSE_BLOCK_MAX, Sink};
use crate::source::{RawSource, Source};

/// Default bytes per data work item and per worker buffer: small enough
/// that a worker's buffer stays in its core's cache between the read that
/// fills it and the write that empties it.
pub const DEFAULT_CHUNK: usize = 256 << 10;
/// Bytes per data work item from a raw file or device while the page
/// cache holds its data: read in [`READ_PIECE`]s while the cache holds
/// them, the rest of the item in one request where it runs out.
pub const RAW_CHUNK: usize = 1 << 20;
/// Bytes per data work item from a local file, device or qcow2 image
/// while the page cache holds none of the data: each read with O_DIRECT
/// into a buffer of huge pages, which lets it reach the disk as one
/// request of up to this size. A disk serves one large request faster
/// than several small ones; cached data is copied faster in small items.
pub const COLD_CHUNK: usize = 4 << 20;
/// Reads of cached data from a local source go in pieces of this size, so
/// that each piece is still in the core's cache when it is written.
pub const READ_PIECE: usize = 256 << 10;
/// Bytes per data work item from an NBD source: four of the client's
/// default read requests, in flight together on the worker's connection.
/// One request per item leaves each connection idle while its worker
/// writes.
pub const NBD_CHUNK: usize = 1 << 20;
/// Most connections opened to an NBD server for reading, as nbdcopy.
pub const NBD_CONNECTIONS: usize = 4;
/// Bounds of `--chunk-size`.
pub const CHUNK_BOUNDS: Range<u64> = 4096..(1 << 30) + 1;

/// Default worker count for a local source: four per core, between 4 and
/// 16. Workers block in reads, and a cold disk needs several reads in
/// flight; memory stays bounded, as each worker owns one buffer, touched
/// only as far as its items fill it.
pub fn default_jobs() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores * 4).clamp(4, 16)
}

/// Connections to open to an NBD source for a copy with `jobs` workers
/// (`None`: the default): one per worker, at most [`NBD_CONNECTIONS`].
pub fn nbd_connections(jobs: Option<usize>) -> usize {
    jobs.unwrap_or(NBD_CONNECTIONS).clamp(1, NBD_CONNECTIONS)
}

/// How data extents are copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Method {
    /// pread/pwrite when detecting zeros, copy_file_range between raw files
    /// otherwise.
    #[default]
    Auto,
    /// pread/pwrite through page-aligned buffers.
    ReadWrite,
    /// copy_file_range, falling back to pread/pwrite where the kernel
    /// cannot (across file systems, block devices, or sources with no raw
    /// file).
    CopyFileRange,
}

/// The format a copy writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Output {
    /// The disk's bytes.
    #[default]
    Raw,
    /// A forward-only qcow2 stream with clusters of `1 << cluster_bits`
    /// bytes.
    Qcow2 {
        /// log2 of the cluster size.
        cluster_bits: u32,
    },
}

/// What the user asked of a copy, before it is checked against the
/// source and destination.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// Worker threads (`None`: [`default_jobs`], or one per NBD connection).
    pub jobs: Option<usize>,
    /// Bytes per data work item (`None`: by source kind).
    pub chunk_size: Option<u64>,
    /// Write every byte of data, zero blocks included.
    pub no_sparse: bool,
    /// The granularity of zero detection in data (qemu-img's `-S`):
    /// a multiple of 512 up to [`SPARSE_BLOCK_MAX`], 0 for none (`None`:
    /// [`SPARSE_BLOCK`]).
    pub sparse_block: Option<u64>,
    /// How data is moved.
    pub method: Method,
    /// Bytes of the source to skip.
    pub skip: u64,
    /// Bytes of the source to copy from `skip` (`None`: to its end).
    pub length: Option<u64>,
    /// Where in the destination the copy lands; the destination is then
    /// updated in place, never truncated.
    pub offset: Option<u64>,
    /// Write into an existing destination without creating or truncating
    /// it (qemu-img's `-n`).
    pub no_create: bool,
    /// Incremental copy of the ranges dirty in this bitmap of the source,
    /// into an existing destination.
    pub bitmap: Option<String>,
    /// The destination already reads as zeros.
    pub dest_is_zero: bool,
    /// Drop the destination's pages as written (`Some(true)`), never
    /// (`Some(false)`), or as [`evict_by_default`] decides.
    pub evict: Option<bool>,
    /// Flush the destination to stable storage at the end.
    pub flush: bool,
    /// Compare the destination with the source afterwards.
    pub verify: bool,
    /// Keep a destination the failed copy created.
    pub keep_partial: bool,
    /// What to write.
    pub output: Output,
    /// The size of a raw stream, known ahead: it must be exactly this long.
    pub size: Option<u64>,
    /// Copy only the ranges this bmap file lists, checking their
    /// checksums; the rest of the destination is not touched.
    pub bmap: Option<std::path::PathBuf>,
}

impl Request {
    /// How to open the source of this copy, from the caller's `base`:
    /// NBD connections for its workers, and the dirty bitmap's context.
    pub fn source_options(&self, base: crate::OpenOptions) -> crate::OpenOptions {
        let mut open = base;
        open.connections = nbd_connections(self.jobs);
        open.contexts.extend(
            (self.bitmap.iter()).map(|b| format!("{}{b}", sparsekit_nbd::map::QEMU_DIRTY_BITMAP)),
        );
        open
    }

    /// How to reach the destination of this copy: the source's NBD timeout
    /// and certificates, connections for its workers.
    pub fn dest_options(&self, source: &crate::OpenOptions) -> crate::DestOptions {
        crate::DestOptions {
            timeout: source.timeout,
            connections: nbd_connections(self.jobs),
            tls_certificates: source.tls_certificates.clone(),
        }
    }
}

/// The resolved settings of a copy's data path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Worker threads (at least 1).
    pub jobs: usize,
    /// Bytes per data work item while the page cache holds the source's
    /// data.
    pub chunk_size: usize,
    /// Bytes per data work item while it does not, read with O_DIRECT
    /// (at least `chunk_size`; each worker's buffer is this large).
    pub cold_chunk_size: usize,
    /// Leave holes (or skip writes) for blocks of this many bytes of data,
    /// aligned in the destination, that are all zeros, as `qemu-img
    /// convert -S`; 0: every byte of data is written.
    pub sparse_block: u64,
    /// How data is moved.
    pub method: Method,
    /// The source range copied.
    pub range: Range<u64>,
    /// Where in the destination `range.start` lands.
    pub dest_offset: u64,
    /// Flush the destination when done.
    pub flush: bool,
    /// Only the ranges dirty in this bitmap.
    pub bitmap: Option<String>,
}

/// What a copy did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes of the source handled.
    pub total: u64,
    /// Bytes of data read from the source (or copied in the kernel).
    pub data_read: u64,
    /// Bytes of data written to the destination.
    pub data_written: u64,
    /// Bytes of data found to be all zeros and not written.
    pub zero_detected: u64,
    /// Bytes the source maps as zero or hole.
    pub unallocated: u64,
    /// Bytes of the destination made to read as zeros by a zeroing call
    /// (holes punched, BLKZEROOUT, NBD_CMD_WRITE_ZEROES, written zeros);
    /// what was known to read as zeros already (a new file) is not.
    pub zeroed: u64,
}

/// What a qcow2 stream export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportStats {
    /// Bytes of the stream.
    pub stream_bytes: u64,
    /// Data clusters in it.
    pub data_clusters: u64,
}

/// What an executed plan did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// The copy's figures.
    pub stats: CopyStats,
    /// For a qcow2 stream export, the stream's.
    pub export: Option<ExportStats>,
    /// The destination was compared with the source and found equal.
    pub verified: bool,
    /// Time taken, the verification included.
    pub elapsed: Duration,
}

/// How the plan moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// From a random-access source into a raw file or device.
    Copy,
    /// A qcow2 stream on standard input into a raw file or device.
    Import,
    /// A raw image read forward (standard input, a compressed image) into
    /// a file, device or NBD export.
    ImportRaw,
    /// A random-access source out as raw bytes on standard output.
    WriteOut,
    /// A raw image read forward out as raw bytes on standard output.
    PipeOut,
    /// A random-access source out as a qcow2 stream.
    Export {
        /// log2 of the stream's cluster size.
        cluster_bits: u32,
    },
}

/// A checked copy, ready to run: see the module documentation.
#[derive(Debug)]
pub struct Plan {
    source: Opened,
    dest: Destination,
    kind: Kind,
    settings: Settings,
    mode: DestMode,
    evict: Evict,
    dest_is_zero: bool,
    verify: bool,
    keep_partial: bool,
    /// How long a raw stream may or must be.
    length: Length,
    /// The bmap whose ranges are copied.
    listed: Option<Listed>,
}

impl Plan {
    /// Checks `req` against `source` and `dest` and makes every choice of
    /// the copy. Nothing is created, truncated or written.
    pub fn new(source: Opened, mut dest: Destination, req: &Request) -> Result<Self, PlanError> {
        if let Some(c) = req.chunk_size
            && !CHUNK_BOUNDS.contains(&c)
        {
            return Err(PlanError::ChunkSize { size: c });
        }
        if let Some(b) = req.sparse_block
            && (!b.is_multiple_of(512) || b > SPARSE_BLOCK_MAX)
        {
            return Err(PlanError::SparseBlock { size: b });
        }
        let kind = kind(&source, &dest, req)?;
        let listed = match &req.bmap {
            None => None,
            Some(path) => Some(Listed::read(path)?),
        };
        let image_size = listed.as_ref().map(|l| l.bmap.image_size());
        if let (Some(l), Some(s)) = (&listed, source.random_access()) {
            l.bmap
                .check_image_size(s.size())
                .map_err(|e| PlanError::BmapSize {
                    bmap: l.name.clone(),
                    source_name: s.name().to_owned(),
                    source: e,
                })?;
        }
        if let (Some(l), Some(want)) = (&listed, req.size)
            && Some(want) != image_size
        {
            return Err(PlanError::BmapSize {
                bmap: l.name.clone(),
                source_name: format!("the --size {want} image"),
                source: sparsekit_bmap::ImageSizeMismatch {
                    bmap: l.bmap.image_size(),
                    image: want,
                },
            });
        }
        let size = req.size.or(image_size).unwrap_or(source.size());
        let name = source.name().to_owned();
        if req.skip > size {
            return Err(PlanError::SkipPastEnd {
                source_name: name,
                skip: req.skip,
                size,
            });
        }
        let end = match req.length {
            None => size,
            Some(length) => match req.skip.checked_add(length) {
                Some(end) if end <= size => end,
                _ => {
                    return Err(PlanError::LengthPastEnd {
                        source_name: name,
                        skip: req.skip,
                        length,
                        size,
                    });
                }
            },
        };
        let range = req.skip..end;
        let dest_offset = req.offset.unwrap_or(0);
        let dest_end =
            dest_offset
                .checked_add(end - req.skip)
                .ok_or(PlanError::OffsetOverflow {
                    offset: dest_offset,
                    length: end - req.skip,
                })?;
        let mode = if req.bitmap.is_some() || req.offset.is_some() || req.no_create {
            DestMode::Update
        } else {
            DestMode::Replace
        };
        if let (Some(b), Some(s)) = (&req.bitmap, source.random_access()) {
            // The bitmap must be there before the copy starts.
            let dirty = s
                .dirty(b, range.clone())
                .map_err(|source| PlanError::Bitmap {
                    source_name: s.name().to_owned(),
                    bitmap: b.clone(),
                    source,
                })?;
            drop(dirty);
        }
        check_dest(&source, &dest, req, dest_end)?;
        dest.lock().map_err(PlanError::Locked)?;
        // A raw stream's end is known only when it comes; it may not go
        // past a device's or an export's end.
        let length = Length {
            exact: req.size.or(image_size),
            room: match dest.kind() {
                Some(DestKind::BlockDevice | DestKind::Nbd) => {
                    dest.size().map(|s| s.saturating_sub(dest_offset))
                }
                _ => None,
            },
        };
        let nbd = matches!(source, Opened::Nbd(_));
        let jobs = req
            .jobs
            .unwrap_or_else(|| if nbd { NBD_CONNECTIONS } else { default_jobs() });
        let copy = kind == Kind::Copy;
        let chunk_size = match req.chunk_size {
            Some(c) => c as usize,
            None if nbd => NBD_CHUNK,
            None if copy && matches!(source, Opened::Raw(_)) => RAW_CHUNK,
            None => DEFAULT_CHUNK,
        };
        let cold_chunk_size = match req.chunk_size {
            None if copy && matches!(source, Opened::Raw(_) | Opened::Qcow2(_)) => COLD_CHUNK,
            _ => chunk_size,
        };
        let evict = match req.evict {
            _ if dest.nbd().is_some() => Evict::Never,
            Some(true) => Evict::Always,
            Some(false) => Evict::Never,
            // A copy that ends in fdatasync writes all of it back anyway:
            // starting as spans complete overlaps that with the copy.
            None if req.flush => Evict::Always,
            None => {
                let thresholds = dirty_thresholds();
                let ceiling = thresholds.map_or(0, |t| t.free_run());
                let data = match (&kind, source.random_access(), &listed) {
                    (_, _, Some(l)) => Some(l.bmap.mapped_bytes()),
                    (Kind::Copy, Some(s), _) => s.data_bytes(range.clone(), ceiling),
                    _ => None,
                };
                evict_by_default(data, thresholds)
            }
        };
        Ok(Self {
            source,
            dest,
            kind,
            settings: Settings {
                jobs: jobs.max(1),
                chunk_size,
                cold_chunk_size,
                sparse_block: match req.sparse_block {
                    _ if req.no_sparse => 0,
                    Some(b) => b,
                    None => SPARSE_BLOCK,
                },
                method: req.method,
                range,
                dest_offset,
                flush: req.flush,
                bitmap: req.bitmap.clone(),
            },
            mode,
            evict,
            dest_is_zero: req.dest_is_zero,
            verify: req.verify,
            keep_partial: req.keep_partial,
            length,
            listed,
        })
    }

    /// How the plan moves data.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The data path's settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Connections the source reads through (NBD: one per worker up to
    /// [`NBD_CONNECTIONS`] where the server allows several; a local source
    /// reads its files directly: 1).
    pub fn connections(&self) -> usize {
        match &self.source {
            Opened::Nbd(n) => n.connections(),
            _ => 1,
        }
    }

    /// How the destination will be opened.
    pub fn mode(&self) -> DestMode {
        self.mode
    }

    /// When the destination's pages are dropped.
    pub fn evict(&self) -> Evict {
        self.evict
    }

    /// The source.
    pub fn source(&self) -> &Opened {
        &self.source
    }

    /// The destination.
    pub fn dest(&self) -> &Destination {
        &self.dest
    }

    /// Bytes of the destination the copy writes up to.
    pub fn dest_end(&self) -> u64 {
        self.settings.dest_offset + (self.settings.range.end - self.settings.range.start)
    }

    /// Runs the plan: creates or opens the destination, copies, flushes,
    /// verifies. On failure the error says how far the copy got, and a
    /// destination the copy created is removed (unless `keep_partial`).
    pub fn execute(self, progress: &dyn Progress, stop: &AtomicBool) -> Result<Report, Failed> {
        let t = Instant::now();
        let Plan {
            source,
            dest,
            kind,
            settings,
            mode,
            evict,
            dest_is_zero,
            verify,
            keep_partial,
            length,
            listed,
        } = self;
        let dest_end = settings.dest_offset + (settings.range.end - settings.range.start);
        match kind {
            Kind::Export { cluster_bits } => {
                let src = source.random_access().expect("planned for random access");
                let export = export(
                    src,
                    dest,
                    cluster_bits,
                    &settings,
                    keep_partial,
                    progress,
                    stop,
                )?;
                let stats = CopyStats {
                    total: src.size(),
                    ..Default::default()
                };
                Ok(Report {
                    stats,
                    export: Some(export),
                    verified: false,
                    elapsed: t.elapsed(),
                })
            }
            Kind::WriteOut | Kind::PipeOut => {
                let out = stdout_file().map_err(|e| Failed::new(0, 0, e))?;
                let stats = match source {
                    Opened::RawStream(s) => {
                        crate::raw_stream::pipe_out(*s, out, &settings, length, progress, stop)?
                    }
                    ref other => {
                        let src = other.random_access().expect("planned for random access");
                        crate::raw_stream::write_out(src, out, &settings, progress, stop)?
                    }
                };
                Ok(Report {
                    stats,
                    export: None,
                    verified: false,
                    elapsed: t.elapsed(),
                })
            }
            Kind::Copy | Kind::Import | Kind::ImportRaw => {
                let fail = |e| Failed::new(settings.range.start, 0, e);
                let sink = match dest.into_target() {
                    DestTarget::Local(local) => Sink::File(
                        FileSink::open(local, dest_end, mode, dest_is_zero, evict).map_err(fail)?,
                    ),
                    DestTarget::Nbd(export) => {
                        let sink = NbdSink::new(*export, dest_is_zero);
                        // An incremental copy touches only its dirty ranges,
                        // a bmap copy its listed ones; a raw stream zeroes
                        // its zero blocks as they come.
                        if settings.bitmap.is_none() && listed.is_none() && kind != Kind::ImportRaw
                        {
                            sink.zero_fast(settings.dest_offset..dest_end)
                                .map_err(fail)?;
                        }
                        Sink::Nbd(sink)
                    }
                    DestTarget::Stdout => unreachable!("planned for a raw destination"),
                };
                let r = match source {
                    Opened::RawStream(s) => {
                        let mut ranges = listed.as_ref().map(StreamRanges::new);
                        let select = ranges.as_mut().map(|r| r as &mut dyn Select);
                        crate::raw_stream::import(
                            *s, &sink, &settings, length, select, progress, stop,
                        )
                    }
                    Opened::Stream(s) => {
                        let s = *s;
                        // Clusters the stream does not hold must read as
                        // zeros: zero everything first where it does not.
                        if sink.known_zero() {
                            Ok(())
                        } else {
                            sink.zero(0, dest_end).map_err(fail)
                        }
                        .and_then(|()| {
                            crate::stream::import(
                                s.decoder, &s.name, &sink, &settings, progress, stop,
                            )
                        })
                    }
                    ref other if listed.is_some() => {
                        let src = other.random_access().expect("random access");
                        let listed = listed.as_ref().expect("a bmap");
                        copy_ranges(src, &sink, listed, &settings, progress, stop)
                    }
                    ref other => {
                        let src = other.random_access().expect("random access");
                        crate::copy::copy(src, &sink, &settings, progress, stop).and_then(|stats| {
                            if verify {
                                verify_sink(src, &sink, &settings, progress, stop)?;
                            }
                            Ok(stats)
                        })
                    }
                };
                match r {
                    Ok(stats) => Ok(Report {
                        stats: CopyStats {
                            zeroed: sink.zeroed(),
                            ..stats
                        },
                        export: None,
                        verified: verify,
                        elapsed: t.elapsed(),
                    }),
                    Err(mut f) => {
                        *f.dest = match &sink {
                            Sink::File(file) => {
                                left_behind(file.path(), file.created(), mode, keep_partial)
                            }
                            Sink::Nbd(n) => DestState::PartlyUpdated(n.name().to_owned()),
                        };
                        Err(f)
                    }
                }
            }
        }
    }
}

/// Standard output as a file (a duplicate of its descriptor): raw bytes
/// go out unbuffered, in large writes.
fn stdout_file() -> Result<std::fs::File, Error> {
    use std::os::fd::AsFd;
    let fd = std::io::stdout().as_fd().try_clone_to_owned();
    fd.map(std::fs::File::from)
        .map_err(|source| Error::OpenDest {
            path: "standard output".into(),
            what: "duplicating the descriptor",
            source,
        })
}

/// Which kind of plan `source`, `dest` and `req` make, or why they make
/// none.
fn kind(source: &Opened, dest: &Destination, req: &Request) -> Result<Kind, PlanError> {
    use std::io::IsTerminal;
    if dest.is_stdout() && std::io::stdout().is_terminal() {
        return Err(PlanError::NotApplicable(
            "standard output is a terminal: redirect it to a file or a pipe",
        ));
    }
    let raw_stream = matches!(source, Opened::RawStream(_));
    let random = source.random_access().is_some();
    if req.bmap.is_some() {
        if !(random || raw_stream) {
            return Err(PlanError::NotApplicable(
                "--bmap copies a raw image: a qcow2 stream's clusters come out of order",
            ));
        }
        if dest.is_stdout()
            || req.output != Output::Raw
            || req.bitmap.is_some()
            || req.skip != 0
            || req.length.is_some()
            || req.offset.is_some()
            || req.verify
        {
            return Err(PlanError::NotApplicable(
                "--bmap writes the listed ranges of a raw image into a file, device or export \
                 (each range checked by its checksum): standard output, -O qcow2, --bitmap, \
                 --skip, --length, --offset and --verify do not apply",
            ));
        }
    }
    if req.size.is_some() && !raw_stream {
        return Err(PlanError::NotApplicable(
            "--size gives the size of a raw stream; this source knows its own",
        ));
    }
    match req.output {
        Output::Qcow2 { cluster_bits } => {
            if !random {
                return Err(PlanError::NotApplicable(
                    "-O qcow2 needs a source with a map: a stream on standard input or a \
                     compressed image is written raw",
                ));
            }
            if req.bitmap.is_some()
                || req.offset.is_some()
                || req.skip != 0
                || req.length.is_some()
                || req.verify
                || req.no_create
            {
                return Err(PlanError::NotApplicable(
                    "--bitmap, --offset, --skip, --length, -n and --verify do not apply to -O qcow2",
                ));
            }
            if dest.nbd().is_some() {
                return Err(PlanError::NotApplicable(
                    "-O qcow2 writes a stream to a file or standard output, not into an NBD export",
                ));
            }
            Ok(Kind::Export { cluster_bits })
        }
        Output::Raw if !random => {
            if req.bitmap.is_some() || req.skip != 0 || req.length.is_some() || req.verify {
                return Err(PlanError::NotApplicable(
                    "--bitmap, --skip, --length and --verify do not apply to a stream",
                ));
            }
            if !raw_stream && (req.offset.is_some() || req.no_create) {
                return Err(PlanError::NotApplicable(
                    "--offset and -n do not apply to a qcow2 stream",
                ));
            }
            match (raw_stream, dest.is_stdout()) {
                (false, true) => Err(PlanError::NotApplicable(
                    "a qcow2 stream on standard input is written to a raw file, device or NBD \
                     export, not to standard output (its clusters come out of order)",
                )),
                (false, false) => Ok(Kind::Import),
                (true, true) if req.offset.is_some() || req.no_create => Err(
                    PlanError::NotApplicable("--offset and -n do not apply to standard output"),
                ),
                (true, true) => Ok(Kind::PipeOut),
                (true, false) => Ok(Kind::ImportRaw),
            }
        }
        Output::Raw if dest.is_stdout() => {
            if req.bitmap.is_some() || req.offset.is_some() || req.no_create || req.verify {
                return Err(PlanError::NotApplicable(
                    "--bitmap, --offset, -n and --verify do not apply to standard output",
                ));
            }
            Ok(Kind::WriteOut)
        }
        Output::Raw => Ok(Kind::Copy),
    }
}

/// The destination's checks: not one of the source's files, there when it
/// is to be updated, large enough.
fn check_dest(
    source: &Opened,
    dest: &Destination,
    req: &Request,
    dest_end: u64,
) -> Result<(), PlanError> {
    if let Some(export) = dest.nbd() {
        return check_export(source, dest.name(), export, dest_end);
    }
    let Some(path) = dest.path() else {
        return Ok(());
    };
    if let Some(id) = dest.id()
        && source.file_ids().contains(&id)
    {
        return Err(PlanError::SameFile {
            path: path.to_owned(),
        });
    }
    let missing = |why| PlanError::DestMissing {
        path: path.to_owned(),
        why,
    };
    let Some(size) = dest.size() else {
        if req.bitmap.is_some() {
            return Err(missing("--bitmap updates an existing copy"));
        }
        if req.no_create {
            return Err(missing("-n writes into an existing destination"));
        }
        return Ok(());
    };
    if dest.kind() == Some(DestKind::BlockDevice) && size < dest_end {
        return Err(PlanError::DestTooSmall {
            path: path.to_owned(),
            size,
            needed: dest_end,
        });
    }
    if req.bitmap.is_some() && size < dest_end {
        return Err(PlanError::DestShort {
            path: path.to_owned(),
            len: size,
            source_name: source.name().to_owned(),
            want: dest_end,
        });
    }
    Ok(())
}

/// An NBD destination's checks: writable, large enough, not the source.
fn check_export(
    source: &Opened,
    name: &str,
    export: &crate::nbd::NbdSource,
    dest_end: u64,
) -> Result<(), PlanError> {
    if export.flags().read_only() {
        return Err(PlanError::ReadOnly { name: name.into() });
    }
    let size = Source::size(export);
    if size < dest_end {
        return Err(PlanError::ExportTooSmall {
            name: name.into(),
            size,
            needed: dest_end,
        });
    }
    if matches!(source, Opened::Nbd(_)) && source.name() == name {
        return Err(PlanError::SameExport { name: name.into() });
    }
    Ok(())
}

/// Compares the destination just written with the source.
fn verify_sink(
    source: &dyn Source,
    sink: &Sink,
    settings: &Settings,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<(), Failed> {
    let fail = |error| Failed::new(settings.range.start, 0, error);
    let file = match sink {
        Sink::File(f) => f,
        Sink::Nbd(n) => {
            return crate::verify::verify(source, n.export(), settings, progress, stop);
        }
    };
    let path = file.path();
    let file = file.file().try_clone().map_err(|source| {
        fail(Error::OpenDest {
            path: path.to_owned(),
            what: "opening for verification",
            source,
        })
    })?;
    // The mapper's error names the file already: wrapping it in OpenDest
    // printed the path twice.
    let mapper = sparsekit_fiemap::Mapper::from_file(file, path)
        .map_err(|e| fail(Error::Source(Box::new(e))))?;
    crate::verify::verify(source, &RawSource::new(mapper), settings, progress, stop)
}

/// What a failed copy leaves at `path`: a file it created is removed
/// unless `keep_partial`; one that existed was rewritten (`Replace`) or
/// updated in part.
fn left_behind(path: &Path, created: bool, mode: DestMode, keep_partial: bool) -> DestState {
    if !created {
        return match mode {
            DestMode::Replace => DestState::Rewritten(path.display().to_string()),
            DestMode::Update => DestState::PartlyUpdated(path.display().to_string()),
        };
    }
    if keep_partial {
        return DestState::KeptPartial(path.to_owned());
    }
    match std::fs::remove_file(path) {
        Ok(()) => DestState::Removed(path.to_owned()),
        Err(e) => DestState::NotRemoved(path.to_owned(), e.to_string()),
    }
}

/// Writes `source` as a qcow2 stream to `dest`: standard output, or a file
/// (truncated or created).
fn export(
    source: &dyn Source,
    dest: Destination,
    cluster_bits: u32,
    settings: &Settings,
    keep_partial: bool,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<ExportStats, Failed> {
    let Some(LocalDest { path, existing }) = dest.into_local() else {
        let out = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
        return crate::stream::export(
            source,
            out,
            "standard output",
            cluster_bits,
            settings,
            progress,
            stop,
        );
    };
    let fail = |what, source| {
        Failed::new(
            0,
            0,
            Error::OpenDest {
                path: path.clone(),
                what,
                source,
            },
        )
    };
    let created = existing.is_none();
    let (file, _lock) = match existing {
        Some(e) => {
            e.file.set_len(0).map_err(|s| fail("truncating", s))?;
            (e.file, e.lock)
        }
        None => {
            let (file, lock) = create_locked(&path).map_err(|e| Failed::new(0, 0, e))?;
            (file, Some(lock))
        }
    };
    let name = path.display().to_string();
    let out = BufWriter::with_capacity(1 << 20, file);
    crate::stream::export(source, out, &name, cluster_bits, settings, progress, stop).map_err(
        |mut f| {
            *f.dest = left_behind(&path, created, DestMode::Replace, keep_partial);
            f
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{OpenOptions, Spec};
    use std::os::unix::fs::FileExt;

    #[test]
    fn nbd_connections_follow_the_workers_up_to_four() {
        assert_eq!(nbd_connections(None), 4);
        assert_eq!(nbd_connections(Some(1)), 1);
        assert_eq!(nbd_connections(Some(3)), 3);
        assert_eq!(nbd_connections(Some(16)), 4);
        assert_eq!(nbd_connections(Some(0)), 1);
    }

    #[test]
    fn a_request_says_how_its_endpoints_are_opened() {
        let req = Request {
            jobs: Some(2),
            bitmap: Some("inc1".into()),
            ..Request::default()
        };
        let base = OpenOptions {
            timeout: Some(Duration::from_secs(5)),
            tls_certificates: Some("/certs".into()),
            ..OpenOptions::default()
        };
        let open = req.source_options(base);
        assert_eq!(open.connections, 2);
        assert_eq!(open.contexts, ["qemu:dirty-bitmap:inc1"]);
        let dest = req.dest_options(&open);
        assert_eq!(dest.connections, 2);
        assert_eq!(dest.timeout, Some(Duration::from_secs(5)));
        assert_eq!(dest.tls_certificates, Some("/certs".into()));
        assert_eq!(Request::default().dest_options(&open).connections, 4);
    }

    #[test]
    fn default_jobs_are_four_per_core_within_bounds() {
        let j = default_jobs();
        assert!((4..=16).contains(&j));
    }

    /// An 8 MiB raw file with 1 MiB of data at 2 MiB, and a folder for
    /// destinations.
    fn raw_source() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.raw");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1u8; 1 << 20], 2 << 20).unwrap();
        (dir, src)
    }

    fn plan(src: &Path, dst: &Path, req: &Request) -> Result<Plan, PlanError> {
        let source = Opened::open(&Spec::Path(src.into()), &OpenOptions::default()).unwrap();
        let dest = Destination::inspect(&Spec::Path(dst.into())).unwrap();
        Plan::new(source, dest, req)
    }

    #[test]
    fn a_raw_copy_takes_raw_chunks_and_the_default_workers() {
        let (dir, src) = raw_source();
        let p = plan(&src, &dir.path().join("d"), &Request::default()).unwrap();
        assert_eq!(p.kind(), Kind::Copy);
        let s = p.settings();
        assert_eq!((s.chunk_size, s.jobs), (RAW_CHUNK, default_jobs()));
        assert_eq!(s.cold_chunk_size, COLD_CHUNK);
        assert_eq!((s.range.clone(), s.dest_offset), (0..8 << 20, 0));
        assert_eq!(s.sparse_block, SPARSE_BLOCK);
        assert_eq!(p.mode(), DestMode::Replace);
        assert_eq!(p.connections(), 1);
        // 1 MiB of data is far below any free-run ceiling.
        assert_eq!(p.evict(), Evict::WhenSlow);
        assert!(!dir.path().join("d").exists(), "planning created DEST");
    }

    #[test]
    fn the_user_s_choices_win_where_given() {
        let (dir, src) = raw_source();
        let req = Request {
            jobs: Some(3),
            chunk_size: Some(64 << 10),
            no_sparse: true,
            evict: Some(false),
            skip: 1 << 20,
            length: Some(4 << 20),
            offset: Some(512),
            ..Request::default()
        };
        let p = plan(&src, &dir.path().join("d"), &req).unwrap();
        let s = p.settings();
        assert_eq!((s.jobs, s.chunk_size, s.sparse_block), (3, 64 << 10, 0));
        assert_eq!(s.cold_chunk_size, 64 << 10, "one chunk size, cold or not");
        assert_eq!(
            (s.range.clone(), s.dest_offset),
            ((1 << 20)..(5 << 20), 512)
        );
        assert_eq!(p.dest_end(), 512 + (4 << 20));
        assert_eq!(p.evict(), Evict::Never);
        assert_eq!(p.mode(), DestMode::Update, "--offset updates in place");
        let always = Request {
            evict: Some(true),
            ..Request::default()
        };
        assert_eq!(
            plan(&src, &dir.path().join("d"), &always).unwrap().evict(),
            Evict::Always
        );
    }

    #[test]
    fn a_flushed_copy_writes_back_as_it_goes() {
        let (dir, src) = raw_source();
        let flush = Request {
            flush: true,
            ..Request::default()
        };
        let p = plan(&src, &dir.path().join("d"), &flush).unwrap();
        assert_eq!(p.evict(), Evict::Always);
        let kept = Request {
            evict: Some(false),
            ..flush
        };
        assert_eq!(
            plan(&src, &dir.path().join("d"), &kept).unwrap().evict(),
            Evict::Never
        );
    }

    #[test]
    fn a_stream_export_reads_in_default_chunks_and_an_image_copy_in_cold_ones() {
        let (dir, src) = raw_source();
        let req = Request {
            output: Output::Qcow2 { cluster_bits: 16 },
            ..Request::default()
        };
        let p = plan(&src, &dir.path().join("d.qcow2"), &req).unwrap();
        assert_eq!(p.kind(), Kind::Export { cluster_bits: 16 });
        assert_eq!(p.settings().chunk_size, DEFAULT_CHUNK);
        assert_eq!(p.settings().cold_chunk_size, DEFAULT_CHUNK);
        // The image exported, copied: small items while cached, large ones
        // from the disk.
        p.execute(&crate::NoProgress, &AtomicBool::new(false))
            .unwrap();
        let p = plan(
            &dir.path().join("d.qcow2"),
            &dir.path().join("e"),
            &Request::default(),
        );
        let p = p.unwrap();
        assert_eq!(p.kind(), Kind::Copy);
        let s = p.settings();
        assert_eq!(
            (s.chunk_size, s.cold_chunk_size),
            (DEFAULT_CHUNK, COLD_CHUNK)
        );
    }

    #[test]
    fn updates_need_an_existing_dest_of_the_right_size() {
        let (dir, src) = raw_source();
        let missing = dir.path().join("missing");
        let no_create = Request {
            no_create: true,
            ..Request::default()
        };
        let e = plan(&src, &missing, &no_create).unwrap_err();
        assert!(matches!(e, PlanError::DestMissing { .. }), "{e:?}");
        let existing = dir.path().join("old");
        std::fs::write(&existing, b"old").unwrap();
        let p = plan(&src, &existing, &no_create).unwrap();
        assert_eq!(p.mode(), DestMode::Update);
    }

    #[test]
    fn ranges_past_the_source_and_bad_chunks_are_refused() {
        let (dir, src) = raw_source();
        let d = dir.path().join("d");
        let cases = [
            Request {
                skip: (8 << 20) + 1,
                ..Request::default()
            },
            Request {
                skip: 4 << 20,
                length: Some((4 << 20) + 1),
                ..Request::default()
            },
            Request {
                length: Some(u64::MAX),
                skip: 1,
                ..Request::default()
            },
            Request {
                offset: Some(u64::MAX - 10),
                ..Request::default()
            },
            Request {
                chunk_size: Some(1024),
                ..Request::default()
            },
            Request {
                chunk_size: Some((1 << 30) + 1),
                ..Request::default()
            },
            Request {
                sparse_block: Some(1000),
                ..Request::default()
            },
            Request {
                sparse_block: Some(SPARSE_BLOCK_MAX + 512),
                ..Request::default()
            },
        ];
        for req in cases {
            let e = plan(&src, &d, &req).expect_err(&format!("{req:?}"));
            assert!(
                matches!(
                    e,
                    PlanError::SkipPastEnd { .. }
                        | PlanError::LengthPastEnd { .. }
                        | PlanError::OffsetOverflow { .. }
                        | PlanError::ChunkSize { .. }
                        | PlanError::SparseBlock { .. }
                ),
                "{req:?}: {e:?}"
            );
        }
        // Exactly to the end is fine, and so is a length of 0.
        for (skip, length) in [(8 << 20, Some(0)), (0, Some(8 << 20)), (8 << 20, None)] {
            let req = Request {
                skip,
                length,
                ..Request::default()
            };
            plan(&src, &d, &req).unwrap();
        }
        assert!(!d.exists());
    }
}
