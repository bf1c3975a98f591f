//! sparsekit's copy engine: moves a virtual disk's data, and only its
//! data, from a [`Source`] to a [`Sink`], in parallel, in bounded memory.
//!
//! - [`Source`]: size, a stream of extents, `read_at`; implemented here for
//!   raw files and block devices ([`RawSource`]) and qcow2 images with
//!   their backing chains ([`Qcow2Source`]).
//! - [`Sink`]: a regular file (created or truncated to size: holes are
//!   left where the source has no data, punched where an existing file held
//!   some) or a block device (zero ranges with BLKZEROOUT, or skipped when
//!   it is known to read as zeros).
//! - [`copy`]: plans work items from the source's map (data split into
//!   chunks, zero and hole ranges as they are) and runs them on `jobs`
//!   worker threads pulling from one streaming planner, so memory is about
//!   `(jobs + 1) × chunk_size` whatever the image size. Data is copied with
//!   pread/pwrite through page-aligned buffers, detecting all-zero blocks
//!   and leaving holes for them ([`CopyOptions::sparse`]), or with
//!   `copy_file_range` (reflinks where the file system shares blocks).
//! - [`verify`]: reads both sides again and fails at the first difference.
//! - [`Progress`] is how the engine reports; [`copy`] stops cleanly when a
//!   stop flag is raised (Ctrl-C), and a failure says how far it got.
//!
//! ```
//! use sparsekit_copy::{CopyOptions, DestMode, NoProgress, RawSource, Sink, Source, copy};
//! use std::os::unix::fs::FileExt;
//! use std::sync::atomic::AtomicBool;
//!
//! let dir = tempfile::tempdir()?;
//! let (src, dst) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
//! let f = std::fs::File::create(&src)?;
//! f.set_len(8 << 20)?;
//! f.write_all_at(b"hello", 1 << 20)?;
//!
//! let source = RawSource::open(&src)?;
//! let sink = Sink::open(&dst, source.size(), DestMode::Replace, false, &[])?;
//! let stats = copy(&source, &sink, &CopyOptions::default(), &NoProgress, &AtomicBool::new(false))?;
//! assert_eq!(stats.data_written, 4096);
//! assert_eq!(std::fs::read(&dst)?, std::fs::read(&src)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeSet;
use std::ops::Range;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use sparsekit_extent::{Extent, ExtentIterExt, Kind, MapChecker, MapError, intersect};

mod nbd;
mod qcow2;
mod sink;
mod source;
pub mod stream;
mod sys;

pub use nbd::{NbdSource, StatusStream};
pub use qcow2::Qcow2Source;
pub use sink::{
    DestKind, DestMode, DirtyThresholds, EVICT_MIN_WRITE, EVICT_SPAN, EVICT_WINDOW, Evict,
    PACE_WINDOW, SLOW_PACE, Sink, WRITE_PIECE, dirty_thresholds, evict_by_default,
};
pub use source::{
    ExtentStream, NoBitmaps, RangeStream, RawReadError, RawSource, Source, SourceError,
};

/// Default bytes per data work item and per worker buffer.
///
/// Small enough that a worker's buffer stays in its core's cache between
/// the read that fills it and the write that empties it: copying 2 GiB of
/// 1 MiB extents from a warm cache took 0.54 s with 256 KiB, 1.2 s with
/// 512 KiB and 1.6-2.5 s with 1 and 4 MiB (the kernel's copy into the
/// destination's page cache ran several times slower per byte), on 2
/// cores with 2 MiB of L2 each.
pub const DEFAULT_CHUNK: usize = 256 << 10;
/// Default bytes per data work item from a raw file or device: read in
/// [`READ_PIECE`]s while the page cache holds them, whole where it does
/// not, and with O_DIRECT where it holds none of the item
/// ([`Source::read_uncached`]). On W1 (2 GiB in 2,000 extents), cold, 1 MiB items copied in
/// 1.98 s and 256 KiB ones in 3.07 s (qemu-img convert 2.55 s). Warm, 1 MiB
/// items read whole took 1.22 s against 1.04 s; read in pieces, 1.34 s
/// against 1.27 s and 2.08 s against 1.86 s in a slow phase (cp 2.05 s).
pub const RAW_CHUNK: usize = 1 << 20;
/// Reads of cached data from a raw source go in pieces of this size, so
/// that each piece is still in the core's cache when it is written.
pub const READ_PIECE: usize = 256 << 10;
/// Bytes per data work item from an NBD source: four of the client's
/// default read requests ([`sparsekit_nbd::client::DEFAULT_READ_REQUEST`]), in
/// flight together on the worker's connection. One request per item
/// leaves each connection idle while its worker writes.
pub const NBD_CHUNK: usize = 1 << 20;
/// Zero and hole ranges are split at this size, so that a stop request is
/// noticed between BLKZEROOUT calls.
const ZERO_CHUNK: u64 = 1 << 30;
/// Granularity of zero detection inside data, as `qemu-img convert -S 4k`.
pub const SPARSE_BLOCK: u64 = 4096;

static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// Errors of the copy engine. Each names the file and offset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The destination could not be opened, examined, sized or flushed.
    #[error("{}: {what}", path.display())]
    OpenDest {
        /// The destination.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The destination is the source.
    #[error("{}: the destination is the source file", path.display())]
    SameFile {
        /// The destination.
        path: PathBuf,
    },
    /// The destination is not a regular file or block device.
    #[error("{}: is a {kind}, not a regular file or block device", path.display())]
    DestNotWritable {
        /// The destination.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// A block device destination is smaller than the copy.
    #[error("{}: the device holds {size} bytes, the copy needs {needed}", path.display())]
    DestTooSmall {
        /// The device.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Bytes the copy writes (offset + length).
        needed: u64,
    },
    /// `--skip` lies past the end of the source.
    #[error("{source_name}: cannot skip {skip} bytes of a {size}-byte source")]
    SkipPastEnd {
        /// The source.
        source_name: String,
        /// Bytes to skip.
        skip: u64,
        /// Its size.
        size: u64,
    },
    /// The source failed (mapping or reading); its error has the context.
    #[error(transparent)]
    Source(SourceError),
    /// The source's map does not cover the range it was asked for.
    #[error("{source_name}: the map is not whole")]
    MapNotWhole {
        /// The source.
        source_name: String,
        /// What is wrong with it.
        #[source]
        source: MapError,
    },
    /// Writing the destination failed.
    #[error("{}: writing {len} bytes at offset {offset:#x}", path.display())]
    Write {
        /// The destination.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
        /// The cause (ENOSPC, EIO, ...).
        #[source]
        source: std::io::Error,
    },
    /// Zeroing a range of the destination failed.
    #[error("{}: zeroing {len} bytes at offset {offset:#x}", path.display())]
    Zero {
        /// The destination.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// copy_file_range failed.
    #[error("{source_name} -> {}: copy_file_range at source offset {offset:#x}", path.display())]
    Copy {
        /// The source.
        source_name: String,
        /// The destination.
        path: PathBuf,
        /// Source offset where it failed.
        offset: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A stop was requested (SIGINT, SIGTERM).
    #[error("interrupted")]
    Interrupted,
    /// A qcow2 stream could not be read or written.
    #[error(transparent)]
    Stream(#[from] stream::StreamError),
    /// `verify` found a difference.
    #[error("{}: differs from {source_name} at destination offset {offset:#x}", path.display())]
    Differs {
        /// The source.
        source_name: String,
        /// The destination.
        path: PathBuf,
        /// First differing byte.
        offset: u64,
    },
}

/// A copy or verify that did not finish, and how far it got.
#[derive(Debug, thiserror::Error)]
#[error(
    "stopped with everything before source offset {done_before:#x} done ({bytes_written} bytes written)"
)]
pub struct Failed {
    /// Every byte of the source before this offset was handled (copied,
    /// zeroed or checked); after it, some may not have been.
    pub done_before: u64,
    /// Bytes of data written to the destination.
    pub bytes_written: u64,
    /// Why it stopped.
    #[source]
    pub error: Error,
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

/// Default worker count: four per core, between 4 and 16.
///
/// Workers block in reads: from a cold cache one worker per core leaves
/// the disk idle most of the time (on a 4 GiB file with 200,000 small
/// extents, 2 workers took 10 s and 8 took 3.3-4.2 s, on 2 cores), while
/// warm copies were no slower with 8. Memory stays bounded: each worker
/// owns one chunk-sized buffer, touched only as far as items fill it.
pub fn default_jobs() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores * 4).clamp(4, 16)
}

/// What to copy and how.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Worker threads (at least 1).
    pub jobs: usize,
    /// Bytes per data work item and per worker buffer.
    pub chunk_size: usize,
    /// Leave holes (or skip writes) for 4 KiB blocks of data that are all
    /// zeros, as `qemu-img convert -S 4k`.
    pub sparse: bool,
    /// How data is moved.
    pub method: Method,
    /// Bytes of the source to skip (`--skip`).
    pub skip: u64,
    /// Where in the destination the copy starts (`--offset`).
    pub dest_offset: u64,
    /// Flush the destination when done.
    pub flush: bool,
    /// Incremental copy: only the ranges dirty in this bitmap of the source
    /// are handled (allocated ones copied, the others zeroed); the rest of
    /// the destination is left alone.
    pub bitmap: Option<String>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            jobs: default_jobs(),
            chunk_size: DEFAULT_CHUNK,
            sparse: true,
            method: Method::Auto,
            skip: 0,
            dest_offset: 0,
            flush: false,
            bitmap: None,
        }
    }
}

/// Receives progress from the workers (from several threads at once).
pub trait Progress: Sync {
    /// The copy is about to start; `total` bytes of the source will be
    /// handled.
    fn start(&self, total: u64) {
        let _ = total;
    }
    /// `bytes` more of the source were handled.
    fn advance(&self, bytes: u64);
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn advance(&self, _: u64) {}
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
}

/// One unit of work: `len` bytes at source offset `src`, destination offset
/// `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Item {
    src: u64,
    dst: u64,
    len: u64,
    kind: Kind,
}

/// A source's map checked to be whole: sorted, gap-free, covering exactly
/// the range asked for; a map that is not is an error, never a shorter copy.
struct Checked<'a> {
    extents: ExtentStream<'a>,
    source_name: &'a str,
    checker: MapChecker,
    done: bool,
}

impl Iterator for Checked<'_> {
    type Item = Result<Extent, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let not_whole = |source| Error::MapNotWhole {
            source_name: self.source_name.into(),
            source,
        };
        match self.extents.next() {
            None => {
                self.done = true;
                self.checker.finish().err().map(|e| Err(not_whole(e)))
            }
            Some(Err(e)) => {
                self.done = true;
                Some(Err(Error::Source(e)))
            }
            Some(Ok(e)) => match self.checker.push(&e) {
                Ok(()) => Some(Ok(e)),
                Err(err) => {
                    self.done = true;
                    Some(Err(not_whole(err)))
                }
            },
        }
    }
}

/// Splits a source's map (or its dirty part) into [`Item`]s.
struct Planner<'a> {
    extents: Box<dyn Iterator<Item = Result<Extent, Error>> + Send + 'a>,
    /// Destination offset minus source offset.
    shift: i128,
    chunk: u64,
    current: Option<Extent>,
    /// Everything before this source offset has been handed out.
    handed_out: u64,
    done: bool,
}

impl<'a> Planner<'a> {
    /// Plans `range` of `source`; with `dirty`, only the parts of the map
    /// inside those ranges.
    fn new(
        source: &'a dyn Source,
        range: Range<u64>,
        dest_offset: u64,
        chunk: u64,
        dirty: Option<RangeStream<'a>>,
    ) -> Self {
        let checked = Checked {
            extents: Box::new(source.extents(range.clone()).coalesce()),
            source_name: source.name(),
            checker: MapChecker::new(range.clone()),
            done: false,
        };
        let extents: Box<dyn Iterator<Item = Result<Extent, Error>> + Send + 'a> = match dirty {
            None => Box::new(checked),
            Some(d) => Box::new(intersect(checked, d.map(|r| r.map_err(Error::Source)))),
        };
        Self {
            extents,
            shift: dest_offset as i128 - range.start as i128,
            chunk,
            current: None,
            handed_out: range.start,
            done: false,
        }
    }

    /// The source offset before which every item has been handed out.
    fn position(&self) -> u64 {
        self.current.map_or(self.handed_out, |e| e.offset)
    }

    fn next(&mut self) -> Option<Result<Item, Error>> {
        if self.done {
            return None;
        }
        if self.current.is_none() {
            match self.extents.next() {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Some(Ok(e)) => self.current = Some(e),
            }
        }
        let e = self.current.take()?;
        let step = if e.kind == Kind::Data {
            self.chunk
        } else {
            ZERO_CHUNK
        };
        let cut = (e.offset / step + 1).saturating_mul(step).min(e.end());
        if cut < e.end() {
            self.current = Some(Extent::new(cut, e.end() - cut, e.kind));
        }
        self.handed_out = cut;
        Some(Ok(Item {
            src: e.offset,
            dst: (e.offset as i128 + self.shift) as u64,
            len: cut - e.offset,
            kind: e.kind,
        }))
    }
}

/// Writes `buf` at `dst` of `sink`, then tells the sink it was written
/// ([`Sink::written`]). With `sparse`, runs of 4 KiB destination blocks that
/// are all zeros are zeroed instead ([`Sink::zero`]: nothing to do on a
/// destination known to be zero), each run in one call. Counts the bytes
/// written and those left out as zeros.
pub(crate) fn write_data(
    sink: &Sink,
    buf: &[u8],
    dst: u64,
    sparse: bool,
    written: &AtomicU64,
    zero_detected: &AtomicU64,
) -> Result<(), Error> {
    if !sparse {
        sink.write_at(buf, dst)?;
        written.fetch_add(buf.len() as u64, Relaxed);
        return sink.written(dst, buf.len() as u64);
    }
    // Runs of all-zero and not-all-zero blocks, aligned to the
    // destination's 4 KiB blocks.
    let mut at = 0usize;
    while at < buf.len() {
        let off = dst + at as u64;
        let first = ((off / SPARSE_BLOCK + 1) * SPARSE_BLOCK - off) as usize;
        let zero = is_zero(&buf[at..(at + first).min(buf.len())]);
        let mut end = (at + first).min(buf.len());
        while end < buf.len() {
            let next = (end + SPARSE_BLOCK as usize).min(buf.len());
            if is_zero(&buf[end..next]) != zero {
                break;
            }
            end = next;
        }
        let n = (end - at) as u64;
        if zero {
            sink.zero(off, n, &ZEROS)?;
            zero_detected.fetch_add(n, Relaxed);
        } else {
            sink.write_at(&buf[at..end], off)?;
            written.fetch_add(n, Relaxed);
        }
        at = end;
    }
    sink.written(dst, buf.len() as u64)
}

/// True when every byte of `b` is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let (chunks, rest) = b.as_chunks::<64>();
    // OR-folding whole 64-byte chunks vectorises; stop at the first chunk
    // with a non-zero byte.
    chunks
        .iter()
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
        && rest.iter().all(|&x| x == 0)
}

/// What a worker does with one item, given its buffer.
type Work<'w> = dyn Fn(&Item, &mut [u8]) -> Result<(), Error> + Sync + 'w;

struct Shared<'a> {
    planner: Planner<'a>,
    in_flight: BTreeSet<u64>,
    /// Lowest source offset of an item that failed or was not done.
    not_done: Option<u64>,
    error: Option<Error>,
}

/// Runs `work` on every item of `planner` from `jobs` threads, each with its
/// own buffer of `chunk` bytes, at most `max_reads` of them on data items at
/// once ([`Source::max_reads`]; `None`: no limit). Stops at the first error
/// or when `stop` is raised.
///
/// Local sources have no such limit: an earlier default of one data item
/// per core dated from whole-item writes, when 8 workers on 1 MiB extents
/// took twice as long as 2. With writes in [`WRITE_PIECE`]s that cost is
/// gone (W1 warm: 0.94 s unlimited, 0.95 s at 2), while a cold copy needs
/// many reads in flight (W1 cold: 2.1 s unlimited, 5.3 s at 2, qemu-img
/// -m 8 -W 2.1 s).
fn run_parallel<'a>(
    planner: Planner<'a>,
    (jobs, max_reads): (usize, Option<usize>),
    chunk: usize,
    stop: &AtomicBool,
    progress: &dyn Progress,
    written: &AtomicU64,
    work: &Work<'_>,
) -> Result<(), Failed> {
    let shared = Mutex::new(Shared {
        planner,
        in_flight: BTreeSet::new(),
        not_done: None,
        error: None,
    });
    let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
    // Permits for data items, when limited: free ones counted under the
    // mutex.
    let permits = max_reads.map(|n| (Mutex::new(n.max(1)), std::sync::Condvar::new()));
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| {
                let mut buf = sys::AlignedBuf::new(chunk);
                loop {
                    let item = {
                        let mut sh = lock();
                        if sh.error.is_some() {
                            return;
                        }
                        if stop.load(Relaxed) {
                            sh.error = Some(Error::Interrupted);
                            return;
                        }
                        match sh.planner.next() {
                            None => return,
                            Some(Err(e)) => {
                                sh.error = Some(e);
                                return;
                            }
                            Some(Ok(item)) => {
                                sh.in_flight.insert(item.src);
                                item
                            }
                        }
                    };
                    let permit = permits.as_ref().filter(|_| item.kind == Kind::Data);
                    if let Some((free, freed)) = permit {
                        let mut free = free.lock().unwrap_or_else(|e| e.into_inner());
                        while *free == 0 {
                            free = freed.wait(free).unwrap_or_else(|e| e.into_inner());
                        }
                        *free -= 1;
                    }
                    let r = work(&item, buf.as_mut_slice());
                    if let Some((free, freed)) = permit {
                        *free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                        freed.notify_one();
                    }
                    let mut sh = lock();
                    sh.in_flight.remove(&item.src);
                    if let Err(e) = r {
                        sh.not_done = Some(sh.not_done.map_or(item.src, |n| n.min(item.src)));
                        if sh.error.is_none() {
                            sh.error = Some(e);
                        }
                        return;
                    }
                    drop(sh);
                    progress.advance(item.len);
                }
            });
        }
    });
    let sh = shared.into_inner().unwrap_or_else(|e| e.into_inner());
    match sh.error {
        None => Ok(()),
        Some(error) => {
            let pos = sh.planner.position();
            Err(Failed {
                done_before: sh.not_done.map_or(pos, |n| n.min(pos)),
                bytes_written: written.load(Relaxed),
                error,
            })
        }
    }
}

/// The source range a copy or verify with `opts` covers, and the chunk
/// size it works in.
fn prepare(source: &dyn Source, opts: &CopyOptions) -> Result<(Range<u64>, usize), Failed> {
    if opts.skip > source.size() {
        return Err(Failed {
            done_before: opts.skip,
            bytes_written: 0,
            error: Error::SkipPastEnd {
                source_name: source.name().into(),
                skip: opts.skip,
                size: source.size(),
            },
        });
    }
    Ok((
        opts.skip..source.size(),
        opts.chunk_size.max(SPARSE_BLOCK as usize),
    ))
}

/// Bytes of the destination a copy with `opts` writes up to: the end of
/// the copied range.
pub fn dest_end(source: &dyn Source, opts: &CopyOptions) -> u64 {
    opts.dest_offset + source.size().saturating_sub(opts.skip)
}

/// Copies the source's data to `sink`: see the crate documentation.
pub fn copy(
    source: &dyn Source,
    sink: &Sink,
    opts: &CopyOptions,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<CopyStats, Failed> {
    let (range, chunk) = prepare(source, opts)?;
    let fail = |error| Failed {
        done_before: opts.skip,
        bytes_written: 0,
        error,
    };
    let dirty = match &opts.bitmap {
        None => None,
        Some(b) => Some(
            source
                .dirty(b, range.clone())
                .map_err(|e| fail(Error::Source(e)))?,
        ),
    };
    progress.start(range.end - range.start);
    let planner = Planner::new(source, range.clone(), opts.dest_offset, chunk as u64, dirty);
    let raw = source.raw_file();
    // Zero detection pays only where leaving a write out leaves zeros behind.
    let sparse = opts.sparse && (sink.kind() == DestKind::Regular || sink.known_zero());
    let use_cfr = AtomicBool::new(match opts.method {
        Method::Auto => !sparse && raw.is_some() && sink.kind() == DestKind::Regular,
        Method::CopyFileRange => raw.is_some(),
        Method::ReadWrite => false,
    });
    let stats = [(); 4].map(|()| AtomicU64::new(0));
    let [data_read, written, zero_detected, unallocated] = &stats;
    // Cleared where the file system cannot read without waiting.
    let nowait = AtomicBool::new(true);

    let work = |item: &Item, buf: &mut [u8]| -> Result<(), Error> {
        if item.kind.reads_as_zero() {
            unallocated.fetch_add(item.len, Relaxed);
            return sink.zero(item.dst, item.len, &ZEROS);
        }
        data_read.fetch_add(item.len, Relaxed);
        if use_cfr.load(Relaxed)
            && let Some(f) = raw
        {
            if sink.copy_file_range(f, source.name(), item.src, item.len, item.dst)? {
                written.fetch_add(item.len, Relaxed);
                return Ok(());
            }
            use_cfr.store(false, Relaxed);
        }
        let buf = &mut buf[..item.len as usize];
        let write = |data: &[u8], at: usize| {
            write_data(
                sink,
                data,
                item.dst + at as u64,
                sparse,
                written,
                zero_detected,
            )
        };
        // What the page cache holds none of is read from the disk straight
        // into the buffer, in one request per host run. What the cache holds
        // goes piece by piece, each written while it is still in the
        // core's cache; from where it runs out, the rest of the item is
        // read in one request, which a disk serves faster than several
        // small ones.
        let mut done = source.read_uncached(buf, item.src);
        if done > 0 {
            write(&buf[..done], 0)?;
        }
        if let Some(f) = raw.filter(|_| nowait.load(Relaxed)) {
            while done < buf.len() {
                let end = (done + READ_PIECE).min(buf.len());
                let piece = &mut buf[done..end];
                match sys::pread_cached(f.as_fd(), piece, item.src + done as u64) {
                    Ok(n) if n == piece.len() => write(piece, done)?,
                    Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL) => {
                        nowait.store(false, Relaxed);
                        break;
                    }
                    _ => break,
                }
                done = end;
            }
        }
        if done < buf.len() {
            let rest = &mut buf[done..];
            source
                .read_at(rest, item.src + done as u64)
                .map_err(Error::Source)?;
            write(rest, done)?;
        }
        Ok(())
    };
    let limits = (opts.jobs, source.max_reads());
    run_parallel(planner, limits, chunk, stop, progress, written, &work)?;
    if opts.flush || sink.kind() == DestKind::BlockDevice {
        sink.sync().map_err(|error| Failed {
            done_before: range.end,
            bytes_written: written.load(Relaxed),
            error,
        })?;
    }
    Ok(CopyStats {
        total: range.end - range.start,
        data_read: data_read.load(Relaxed),
        data_written: written.load(Relaxed),
        zero_detected: zero_detected.load(Relaxed),
        unallocated: unallocated.load(Relaxed),
    })
}

/// Compares the destination with the source after a copy with `opts`:
/// data ranges byte for byte, zero and hole ranges must read as zeros
/// (only the destination's own data extents there are read). Fails at the
/// first difference with [`Error::Differs`].
pub fn verify(
    source: &dyn Source,
    dest: &RawSource,
    opts: &CopyOptions,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<(), Failed> {
    let (range, chunk) = prepare(source, opts)?;
    progress.start(range.end - range.start);
    let planner = Planner::new(source, range, opts.dest_offset, chunk as u64, None);
    let none = AtomicU64::new(0);
    let differs = |offset| Error::Differs {
        source_name: source.name().into(),
        path: dest.mapper().path().to_owned(),
        offset,
    };
    let work = |item: &Item, buf: &mut [u8]| -> Result<(), Error> {
        let half = buf.len() / 2;
        let (a, b) = buf.split_at_mut(half);
        if item.kind == Kind::Data {
            let mut off = 0;
            while off < item.len {
                let n = (item.len - off).min(half as u64) as usize;
                source
                    .read_at(&mut a[..n], item.src + off)
                    .map_err(Error::Source)?;
                dest.read_at(&mut b[..n], item.dst + off)
                    .map_err(Error::Source)?;
                if a[..n] != b[..n] {
                    let i = a
                        .iter()
                        .zip(b.iter())
                        .position(|(x, y)| x != y)
                        .unwrap_or(0);
                    return Err(differs(item.dst + off + i as u64));
                }
                off += n as u64;
            }
            return Ok(());
        }
        // Only the destination's data extents can hold non-zero bytes.
        for e in dest.extents(item.dst..item.dst + item.len) {
            let e = e.map_err(Error::Source)?;
            if e.kind != Kind::Data {
                continue;
            }
            let mut off = e.offset;
            while off < e.end() {
                let n = (e.end() - off).min(half as u64) as usize;
                dest.read_at(&mut b[..n], off).map_err(Error::Source)?;
                if let Some(i) = b[..n].iter().position(|&x| x != 0) {
                    return Err(differs(off + i as u64));
                }
                off += n as u64;
            }
        }
        Ok(())
    };
    let limits = (opts.jobs, source.max_reads());
    run_parallel(planner, limits, chunk * 2, stop, progress, &none, &work)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An item whose first pieces are cached and the rest not: the cached
    /// pieces and the rest read whole make up the same bytes.
    #[test]
    fn partly_cached_items_copy_whole() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8 + 1).collect();
        let f = std::fs::File::create(&src).unwrap();
        f.write_all_at(&data, 0).unwrap();
        f.sync_all().unwrap();
        // Drop every other 384 KiB: items of 1 MiB start cached and end
        // not, or the other way round.
        for at in (0..8u64 << 20).step_by(768 << 10) {
            nix::fcntl::posix_fadvise(
                f.as_fd(),
                at as i64,
                384 << 10,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .unwrap();
        }
        let source = RawSource::open(&src).unwrap();
        let sink = Sink::open(&dst, source.size(), DestMode::Replace, false, &[]).unwrap();
        let opts = CopyOptions {
            chunk_size: RAW_CHUNK,
            jobs: 3,
            ..CopyOptions::default()
        };
        let stats = copy(&source, &sink, &opts, &NoProgress, &AtomicBool::new(false)).unwrap();
        assert_eq!(stats.data_written, 8 << 20);
        assert!(std::fs::read(&dst).unwrap() == data);
    }

    #[test]
    fn is_zero_finds_any_byte() {
        let mut v = vec![0u8; 4096 + 7];
        assert!(is_zero(&v));
        for i in [0, 63, 64, 4095, 4096, 4102] {
            v[i] = 1;
            assert!(!is_zero(&v), "byte {i}");
            v[i] = 0;
        }
        assert!(is_zero(&[]));
    }

    /// A source over a fixed map, for planner tests.
    struct MapSource(Vec<Extent>, u64);

    impl Source for MapSource {
        fn name(&self) -> &str {
            "test"
        }
        fn size(&self) -> u64 {
            self.1
        }
        fn extents(&self, range: Range<u64>) -> ExtentStream<'_> {
            Box::new(self.0.clone().into_iter().map(Ok).clip(range))
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> Result<(), SourceError> {
            Ok(())
        }
    }

    fn plan(
        src: &MapSource,
        range: Range<u64>,
        dest_offset: u64,
        chunk: u64,
    ) -> Result<Vec<Item>, Error> {
        let mut p = Planner::new(src, range, dest_offset, chunk, None);
        std::iter::from_fn(|| p.next()).collect()
    }

    #[test]
    fn planner_splits_data_at_chunk_boundaries_and_shifts() {
        let src = MapSource(
            vec![
                Extent::new(0, 100, Kind::Hole),
                Extent::new(100, 250, Kind::Data),
                Extent::new(350, 50, Kind::Zero),
            ],
            400,
        );
        let items = plan(&src, 50..400, 1000, 128).unwrap();
        let got: Vec<(u64, u64, u64, Kind)> = items
            .iter()
            .map(|i| (i.src, i.dst, i.len, i.kind))
            .collect();
        assert_eq!(
            got,
            [
                (50, 1000, 50, Kind::Hole),
                (100, 1050, 28, Kind::Data),
                (128, 1078, 128, Kind::Data),
                (256, 1206, 94, Kind::Data),
                (350, 1300, 50, Kind::Zero),
            ]
        );
    }

    #[test]
    fn planner_refuses_a_map_with_a_gap() {
        let src = MapSource(
            vec![
                Extent::new(0, 100, Kind::Data),
                Extent::new(150, 50, Kind::Data),
            ],
            200,
        );
        let err = plan(&src, 0..200, 0, 64).unwrap_err();
        assert!(
            matches!(
                err,
                Error::MapNotWhole {
                    source: MapError::Gap {
                        expected: 100,
                        offset: 150
                    },
                    ..
                }
            ),
            "{err:?}"
        );
        let short = MapSource(vec![Extent::new(0, 100, Kind::Data)], 200);
        assert!(matches!(
            plan(&short, 0..200, 0, 64).unwrap_err(),
            Error::MapNotWhole { .. }
        ));
    }
}
