//! What a copy writes to: a regular file or a block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};

use crate::Error;
use crate::sys;

/// Largest single write: longer ones go out in pieces of this size. While
/// one buffered write holds the destination's inode lock, the other
/// workers wait for it, and larger writes copied slower per byte: 2 GiB of
/// 1 MiB extents with 1 MiB items took 1.8-2.5 s written whole and 0.59 s
/// in 256 KiB pieces. With 256 KiB items, 2 GiB in 2,000 extents (W1,
/// warm) copied in 1.11 s in 256 KiB pieces, 0.74 s in 128 KiB ones (cp
/// 0.91 s), and 0.74 s in 64 KiB ones; reads stay whole, so a cold copy
/// is unchanged (2.5 s against 2.4 s).
pub const WRITE_PIECE: usize = 128 << 10;

/// Bytes written but not yet dropped from the page cache.
pub const EVICT_WINDOW: u64 = 64 << 20;

/// Bytes written before their write-back is started, in one call. One
/// call per item made the 200,000 small extents of 4 GiB (W2) copy 3×
/// slower than without eviction: 600,000 system calls, and the disk
/// written in pieces of a few KiB.
pub const EVICT_SPAN: u64 = 4 << 20;

/// Spans written in pieces smaller than this on average are left to the
/// kernel: writing them back costs the file system an allocation per
/// piece, which without eviction happens after the copy. With eviction of
/// every span, W2 (200,000 extents of a few KiB) took 3.3 s, against 1.1 s
/// without.
pub const EVICT_MIN_WRITE: u64 = 64 << 10;

/// When a copy drops the destination's pages from the page cache as it
/// writes them ([`Sink::evict_written`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evict {
    /// Never: the kernel writes the destination back when it sees fit, as
    /// it does for `cp` and `qemu-img convert`.
    Never,
    /// From the first write, as nbdcopy does.
    Always,
    /// Once the page cache takes the destination's writes slower than
    /// [`SLOW_PACE`], measured over every [`PACE_WINDOW`] bytes written.
    WhenSlow,
}

/// Below this many bytes a second of writing into the page cache, a copy
/// in [`Evict::WhenSlow`] starts evicting: recycling its own pages is then
/// faster than taking new ones. The time counted is the time some worker
/// spends in a write, so workers waiting on each other or on their reads
/// do not slow the pace. On the bench VM, whose balloon hands free pages
/// back to the host, a write into pages the cache has not used recently
/// costs a host fault per page: 3 GiB of W3 went into the cache at about
/// 0.4 GiB/s (7.0 s, against 2.7 s evicting); into recycled pages, at over
/// 2 GiB/s (1.25 s, against 2.2 s evicting, which writes the 3 GiB back
/// inside the copy).
pub const SLOW_PACE: u64 = 1 << 30;

/// Bytes of writes over which [`SLOW_PACE`] is measured.
pub const PACE_WINDOW: u64 = 128 << 20;

/// How long a [`PACE_WINDOW`] may take at [`SLOW_PACE`]: a window busy
/// longer can only end slow.
const SLOWEST_WINDOW: Duration = Duration::from_micros(PACE_WINDOW * 1_000_000 / SLOW_PACE);

/// How much dirty data the kernel lets the page cache hold: past
/// `background` its flusher starts writing back, past `limit` writers wait
/// for it, and halfway between the two (its "free-run ceiling") it starts
/// slowing them down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyThresholds {
    /// `vm.dirty_background_bytes`, else `vm.dirty_background_ratio`
    /// percent of the memory that can hold dirty pages.
    pub background: u64,
    /// `vm.dirty_bytes`, else `vm.dirty_ratio` percent of it.
    pub limit: u64,
}

impl DirtyThresholds {
    /// The thresholds the kernel applies for these settings: a background
    /// threshold not below the limit is taken as half the limit.
    pub fn new(background: u64, limit: u64) -> Self {
        let background = if background >= limit {
            limit / 2
        } else {
            background
        };
        Self { background, limit }
    }

    /// Where the kernel starts throttling writers: halfway between the two
    /// thresholds.
    pub fn free_run(&self) -> u64 {
        self.background / 2 + self.limit / 2
    }
}

/// When a copy that writes `data` bytes of data should evict the
/// destination's pages, when the user did not say.
///
/// - Up to the free-run ceiling: [`Evict::WhenSlow`]. The kernel does not
///   hold the copy up, so it can end with its data dirty in the cache, as
///   `cp`'s; writing back as it goes only adds work, unless the cache is
///   slow to take new pages (see [`SLOW_PACE`]). W1 (2 GiB of 2,000
///   extents) copied in 0.9-1.07 s this way and 1.4-1.6 s evicting where
///   the cache recycled pages; where it did not, in 2.0-2.1 s this way,
///   1.45-1.55 s evicting and 4.3-11 s never evicting.
/// - Past it, or when `data` or the thresholds are unknown:
///   [`Evict::Always`]. The kernel would throttle the copy to the disk's
///   pace anyway, and the cache would fill with pages nobody reads again.
pub fn evict_by_default(data: Option<u64>, thresholds: Option<DirtyThresholds>) -> Evict {
    match (data, thresholds) {
        (Some(data), Some(t)) if data <= t.free_run() => Evict::WhenSlow,
        _ => Evict::Always,
    }
}

/// The kernel's [`DirtyThresholds`] now, from /proc; `None` when /proc
/// cannot tell.
pub fn dirty_thresholds() -> Option<DirtyThresholds> {
    let read = |p: &str| std::fs::read_to_string(format!("/proc/sys/vm/{p}")).ok();
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let background = threshold(
        &read("dirty_background_bytes")?,
        &read("dirty_background_ratio")?,
        &meminfo,
    )?;
    let limit = threshold(&read("dirty_bytes")?, &read("dirty_ratio")?, &meminfo)?;
    Some(DirtyThresholds::new(background, limit))
}

/// One threshold from the texts of its two sysctls (bytes, which wins when
/// set, and ratio) and /proc/meminfo: the ratio applies to the memory that
/// can hold dirty pages (free pages and the file cache, as the kernel
/// counts it).
fn threshold(bytes: &str, ratio: &str, meminfo: &str) -> Option<u64> {
    let bytes: u64 = bytes.trim().parse().ok()?;
    if bytes > 0 {
        return Some(bytes);
    }
    let ratio: u64 = ratio.trim().parse().ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = meminfo
            .lines()
            .find(|l| l.split(':').next() == Some(name))?;
        let kib: u64 = line
            .split(':')
            .nth(1)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()?;
        kib.checked_mul(1024)
    };
    let dirtyable = field("MemFree")?
        .saturating_add(field("Active(file)")?)
        .saturating_add(field("Inactive(file)")?);
    Some(dirtyable / 100 * ratio.min(100))
}

/// Regular file or block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestKind {
    /// A regular file.
    Regular,
    /// A block device.
    BlockDevice,
}

/// How a destination file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestMode {
    /// Create the file or truncate it, then size it: every byte the copy
    /// does not write is a hole. (A block device is never truncated.)
    Replace,
    /// Keep what the file holds and grow it if it is too small: ranges the
    /// source has no data for are zeroed (holes punched), the rest of the
    /// file is left alone. For `--offset` and incremental copies.
    Update,
}

/// An open destination.
#[derive(Debug)]
pub struct Sink {
    file: File,
    path: PathBuf,
    kind: DestKind,
    /// Everything the copy does not write already reads as zeros: a file
    /// just truncated, or a device the caller says is zeroed.
    known_zero: bool,
    size: u64,
    /// Zero ranges go through BLKZEROOUT / PUNCH_HOLE until the kernel says
    /// it cannot, then as written zeros.
    zeroing_unsupported: AtomicBool,
    /// What was written and not yet dropped from the page cache, when
    /// [`Sink::evict_written`] is on (regular files only).
    behind: Option<Mutex<Behind>>,
    /// Whether written ranges are evicted now: from the start with
    /// [`Evict::Always`], once the pace is slow with [`Evict::WhenSlow`].
    evicting: AtomicBool,
    /// The pace of writes, while [`Evict::WhenSlow`] waits to decide.
    pace: Option<Mutex<Pace>>,
}

/// Writes into the page cache measured for [`Evict::WhenSlow`]: bytes
/// written in the current [`PACE_WINDOW`] and the time during which some
/// worker was writing.
#[derive(Debug, Default)]
struct Pace {
    writing: u32,
    since: Option<Instant>,
    busy: Duration,
    bytes: u64,
}

impl Pace {
    /// A write starts at `now`.
    fn start(&mut self, now: Instant) {
        if self.writing == 0 {
            self.since = Some(now);
        }
        self.writing += 1;
    }

    /// A write of `len` bytes ends at `now`. At the end of a
    /// [`PACE_WINDOW`], returns the window's pace in bytes a second and
    /// starts the next; so it does as soon as the window has taken longer
    /// than a whole one may at [`SLOW_PACE`] (it can only end slow then),
    /// so that a slow window costs at most that long.
    fn end(&mut self, now: Instant, len: u64) -> Option<u64> {
        let since = self.since.unwrap_or(now);
        self.writing = self.writing.saturating_sub(1);
        self.bytes += len;
        if self.writing == 0 {
            self.busy += now - since;
            self.since = None;
        }
        let busy = self.busy + self.since.map_or_else(Default::default, |s| now - s);
        if self.bytes < PACE_WINDOW && busy <= SLOWEST_WINDOW {
            return None;
        }
        // A window written in under a microsecond is fast, not unmeasured.
        let pace = self.bytes as u128 * 1_000_000 / busy.as_micros().max(1);
        self.bytes = 0;
        self.busy = Default::default();
        if self.since.is_some() {
            self.since = Some(now);
        }
        Some(u64::try_from(pace).unwrap_or(u64::MAX))
    }
}

/// Written ranges of the destination, gathered into spans of
/// [`EVICT_SPAN`] bytes: the one being gathered, then those whose
/// write-back started, oldest first.
#[derive(Debug, Default)]
struct Behind {
    gathering: Option<Span>,
    started: std::collections::VecDeque<Span>,
    /// Bytes written in `started`.
    started_bytes: u64,
}

/// The smallest range covering some written ranges, and how many bytes
/// they wrote. Workers finish items nearly in offset order, so a span
/// covers little more than what it wrote; where it covers other workers'
/// unfinished writes, their pages are merely written back twice or left
/// in the cache, never lost.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: u64,
    end: u64,
    bytes: u64,
    writes: u64,
}

impl Sink {
    /// Opens `path` for a copy that writes bytes `[0, end)` of it.
    ///
    /// `source_ids` are the (device, inode) pairs of the files the source
    /// reads (an image, its backing files, its data file): the destination
    /// is refused when it is one of them, before anything is truncated. `dest_is_zero` says a block device (or an
    /// existing file in [`DestMode::Update`]) already reads as zeros.
    pub fn open(
        path: &Path,
        end: u64,
        mode: DestMode,
        dest_is_zero: bool,
        source_ids: &[(u64, u64)],
    ) -> Result<Self, Error> {
        let err = |what: &'static str| {
            let path = path.to_owned();
            move |source: io::Error| Error::OpenDest { path, what, source }
        };
        let existing = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(err("examining")(e)),
        };
        if let Some(m) = &existing {
            if source_ids.contains(&(m.dev(), m.ino())) {
                return Err(Error::SameFile {
                    path: path.to_owned(),
                });
            }
            let t = m.file_type();
            if !(t.is_file() || t.is_block_device()) {
                return Err(Error::DestNotWritable {
                    path: path.to_owned(),
                    kind: if t.is_dir() {
                        "directory"
                    } else if t.is_fifo() {
                        "FIFO"
                    } else if t.is_char_device() {
                        "character device"
                    } else {
                        "special file"
                    },
                });
            }
        }
        let is_block = existing
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device());
        if is_block {
            // O_EXCL on a block device: refuse one that is mounted or held.
            let file = OpenOptions::new()
                .write(true)
                .read(true)
                .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
                .open(path)
                .map_err(err("opening"))?;
            let size = sparsekit_fiemap::Mapper::from_file(
                file.try_clone().map_err(err("opening"))?,
                path,
            )
            .map_err(|e| Error::OpenDest {
                path: path.to_owned(),
                what: "sizing",
                source: io::Error::other(e),
            })?
            .size();
            if size < end {
                return Err(Error::DestTooSmall {
                    path: path.to_owned(),
                    size,
                    needed: end,
                });
            }
            return Ok(Self::new(
                file,
                path,
                DestKind::BlockDevice,
                dest_is_zero,
                size,
            ));
        }
        let replace = mode == DestMode::Replace;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(replace)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(err("opening"))?;
        let len = file.metadata().map_err(err("examining"))?.len();
        if replace || len < end {
            file.set_len(if replace { end } else { end.max(len) })
                .map_err(err("sizing"))?;
        }
        let known_zero = replace || existing.is_none() || dest_is_zero;
        let size = file.metadata().map_err(err("examining"))?.len();
        Ok(Self::new(file, path, DestKind::Regular, known_zero, size))
    }

    fn new(file: File, path: &Path, kind: DestKind, known_zero: bool, size: u64) -> Self {
        Self {
            file,
            path: path.to_owned(),
            kind,
            known_zero,
            size,
            zeroing_unsupported: false.into(),
            behind: None,
            evicting: false.into(),
            pace: None,
        }
    }

    /// The path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Regular file or block device.
    pub fn kind(&self) -> DestKind {
        self.kind
    }

    /// Size in bytes after opening.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether ranges the copy does not write already read as zeros.
    pub fn known_zero(&self) -> bool {
        self.known_zero
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        let pace = self.pace.as_ref().filter(|_| !self.evicting.load(Relaxed));
        fn lock(p: &Mutex<Pace>) -> MutexGuard<'_, Pace> {
            p.lock().unwrap_or_else(|e| e.into_inner())
        }
        for (i, piece) in buf.chunks(WRITE_PIECE).enumerate() {
            let at = offset + (i * WRITE_PIECE) as u64;
            if let Some(pace) = pace {
                lock(pace).start(Instant::now());
            }
            let r = self.file.write_all_at(piece, at);
            if let Some(pace) = pace {
                let window = lock(pace).end(Instant::now(), piece.len() as u64);
                if window.is_some_and(|bytes_per_s| bytes_per_s < SLOW_PACE) {
                    self.evicting.store(true, Relaxed);
                }
            }
            r.map_err(|source| Error::Write {
                path: self.path.clone(),
                offset: at,
                len: piece.len() as u64,
                source,
            })?;
        }
        Ok(())
    }

    /// Drops the destination's pages from the page cache as they are
    /// written back ([`Sink::written`]), as nbdcopy does, always or once
    /// the page cache is slow to take writes ([`Evict`]): a regular file's
    /// copy then recycles a window of [`EVICT_WINDOW`] bytes of pages
    /// instead of filling the cache with the destination. No effect on a
    /// block device, nor where the copy writes pieces smaller than
    /// [`EVICT_MIN_WRITE`] on average; [`Evict::WhenSlow`] measures only
    /// writes through [`Sink::write_at`], not copy_file_range. On the
    /// bench VM, where a page the cache has not used before costs a host
    /// fault, it took W3 (3 GiB of a 16 GiB qcow2) from 4.4 s to 1.9 s, W1
    /// (2 GiB in 2,000 extents) from 2.0 s to 1.5 s; from qemu-nbd, 4.1 s
    /// to 2.0 s.
    pub fn evict_written(mut self, when: Evict) -> Self {
        let regular = self.kind == DestKind::Regular;
        self.behind = (when != Evict::Never && regular).then(Default::default);
        self.evicting = (when == Evict::Always).into();
        self.pace = (when == Evict::WhenSlow && regular).then(Default::default);
        self
    }

    /// Called once `len` bytes at `offset` were written. With eviction on,
    /// adds them to the span being gathered; once it holds [`EVICT_SPAN`]
    /// bytes, starts its write-back (unless it was written in pieces
    /// under [`EVICT_MIN_WRITE`]) and, past [`EVICT_WINDOW`], waits for
    /// the oldest span's write-back and drops its pages.
    pub fn written(&self, offset: u64, len: u64) -> Result<(), Error> {
        let Some(behind) = &self.behind else {
            return Ok(());
        };
        if !self.evicting.load(Relaxed) {
            return Ok(());
        }
        let (start, evict) = {
            let mut b = behind.lock().unwrap_or_else(|e| e.into_inner());
            let span = b.gathering.get_or_insert(Span {
                start: offset,
                end: offset + len,
                bytes: 0,
                writes: 0,
            });
            span.start = span.start.min(offset);
            span.end = span.end.max(offset + len);
            span.bytes += len;
            span.writes += 1;
            if span.bytes < EVICT_SPAN {
                return Ok(());
            }
            let span = b.gathering.take().expect("gathered above");
            if span.bytes / span.writes < EVICT_MIN_WRITE {
                return Ok(());
            }
            b.started.push_back(span);
            b.started_bytes += span.bytes;
            let evict = (b.started_bytes > EVICT_WINDOW).then(|| {
                let old = b.started.pop_front().expect("not empty: over the window");
                b.started_bytes -= old.bytes;
                old
            });
            (span, evict)
        };
        let fail = |span: Span| {
            move |source: Errno| Error::Write {
                path: self.path.clone(),
                offset: span.start,
                len: span.end - span.start,
                source: source.into(),
            }
        };
        sys::sync_file_range(
            self.file.as_fd(),
            start.start,
            start.end - start.start,
            false,
        )
        .map_err(fail(start))?;
        if let Some(old) = evict {
            let len = old.end - old.start;
            sys::sync_file_range(self.file.as_fd(), old.start, len, true).map_err(fail(old))?;
            nix::fcntl::posix_fadvise(
                self.file.as_fd(),
                old.start as i64,
                len as i64,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            )
            .map_err(fail(old))?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros: nothing to do where the
    /// destination is known to be zero; a punched hole in a regular file;
    /// BLKZEROOUT on a block device; written zeros where the kernel can do
    /// neither.
    pub fn zero(&self, offset: u64, len: u64, zeros: &[u8]) -> Result<(), Error> {
        if self.known_zero || len == 0 {
            return Ok(());
        }
        if !self.zeroing_unsupported.load(Relaxed) {
            let r = match self.kind {
                DestKind::Regular => fallocate(
                    self.file.as_fd(),
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    offset as i64,
                    len as i64,
                ),
                DestKind::BlockDevice => self.blkzeroout(offset, len, zeros),
            };
            match r {
                Ok(()) => return Ok(()),
                Err(Errno::EOPNOTSUPP | Errno::ENOTTY | Errno::ENOSYS) => {
                    self.zeroing_unsupported.store(true, Relaxed)
                }
                Err(e) => {
                    return Err(Error::Zero {
                        path: self.path.clone(),
                        offset,
                        len,
                        source: e.into(),
                    });
                }
            }
        }
        self.write_zeros(offset, len, zeros)
    }

    /// BLKZEROOUT on the 512-aligned middle, written zeros on the edges.
    fn blkzeroout(&self, offset: u64, len: u64, zeros: &[u8]) -> Result<(), Errno> {
        let start = offset.next_multiple_of(512);
        let end = (offset + len) / 512 * 512;
        if start >= end {
            return self.write_zeros(offset, len, zeros).map_err(|_| Errno::EIO);
        }
        let edge = |o, l| self.write_zeros(o, l, zeros).map_err(|_| Errno::EIO);
        edge(offset, start - offset)?;
        sys::blkzeroout(self.file.as_fd(), start, end - start)?;
        edge(end, offset + len - end)
    }

    fn write_zeros(&self, mut offset: u64, len: u64, zeros: &[u8]) -> Result<(), Error> {
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Copies `len` bytes from `src` at `src_offset` to `dst_offset` in the
    /// kernel (copy_file_range: a reflink where the file system shares
    /// blocks). Returns false, having copied nothing, where the kernel
    /// cannot do it for these files (EXDEV, EOPNOTSUPP, EINVAL, ENOSYS).
    pub fn copy_file_range(
        &self,
        src: &File,
        src_name: &str,
        src_offset: u64,
        len: u64,
        dst_offset: u64,
    ) -> Result<bool, Error> {
        let (mut si, mut di) = (src_offset as i64, dst_offset as i64);
        let mut left = len;
        while left > 0 {
            match nix::fcntl::copy_file_range(
                src.as_fd(),
                Some(&mut si),
                self.file.as_fd(),
                Some(&mut di),
                left as usize,
            ) {
                Ok(0) => {
                    return Err(Error::Copy {
                        source_name: src_name.into(),
                        path: self.path.clone(),
                        offset: si as u64,
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the source ended early: was it truncated during the copy?",
                        ),
                    });
                }
                Ok(n) => left -= n as u64,
                Err(Errno::EXDEV | Errno::EOPNOTSUPP | Errno::EINVAL | Errno::ENOSYS)
                    if left == len =>
                {
                    return Ok(false);
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    return Err(Error::Copy {
                        source_name: src_name.into(),
                        path: self.path.clone(),
                        offset: si as u64,
                        source: e.into(),
                    });
                }
            }
        }
        Ok(true)
    }

    /// Flushes written data to stable storage.
    pub fn sync(&self) -> Result<(), Error> {
        self.file.sync_data().map_err(|source| Error::OpenDest {
            path: self.path.clone(),
            what: "flushing (fdatasync)",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24000000 kB\nMemFree:        20000000 kB\nMemAvailable:   23000000 kB\nActive(file):     1000000 kB\nInactive(file):   2000000 kB\n";

    #[test]
    fn the_threshold_is_a_ratio_of_free_and_file_pages() {
        // (20,000,000 + 1,000,000 + 2,000,000) kB, 10%.
        let t = threshold("0\n", "10\n", MEMINFO);
        assert_eq!(t, Some(23_000_000 * 1024 / 100 * 10));
    }

    #[test]
    fn bytes_win_over_the_ratio_when_set() {
        assert_eq!(threshold("1048576\n", "10\n", MEMINFO), Some(1 << 20));
    }

    #[test]
    fn a_meminfo_without_the_fields_gives_no_threshold() {
        assert_eq!(threshold("0", "10", "MemTotal: 1 kB\n"), None);
        assert_eq!(threshold("0", "ten", MEMINFO), None);
        assert_eq!(threshold("", "10", MEMINFO), None);
    }

    #[test]
    fn evicts_when_slow_up_to_free_run_and_always_past_it() {
        let thresholds = DirtyThresholds::new(2 << 30, 4 << 30);
        assert_eq!(thresholds.free_run(), 3 << 30);
        let t = Some(thresholds);
        assert_eq!(evict_by_default(Some(0), t), Evict::WhenSlow);
        assert_eq!(evict_by_default(Some(2 << 30), t), Evict::WhenSlow);
        assert_eq!(evict_by_default(Some(3 << 30), t), Evict::WhenSlow);
        assert_eq!(evict_by_default(Some((3 << 30) + 1), t), Evict::Always);
        assert_eq!(evict_by_default(None, t), Evict::Always);
        assert_eq!(evict_by_default(Some(0), None), Evict::Always);
    }

    #[test]
    fn a_background_threshold_not_below_the_limit_is_half_of_it() {
        // As the kernel's domain_dirty_limits() takes it.
        let t = DirtyThresholds::new(2 << 30, 1 << 30);
        assert_eq!(t.background, 512 << 20);
        assert_eq!(t.free_run(), 768 << 20);
        assert_eq!(DirtyThresholds::new(1 << 30, 4 << 30).background, 1 << 30);
    }

    #[test]
    fn the_pace_counts_time_when_some_write_is_running_once() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let half = PACE_WINDOW / 2;
        let mut p = Pace::default();
        // Two writes overlapping over [0, 100) ms, then an idle gap that
        // does not count, then a write over [500, 600) ms ending the window.
        p.start(ms(0));
        p.start(ms(50));
        assert_eq!(p.end(ms(80), 0), None);
        assert_eq!(p.end(ms(100), half), None);
        p.start(ms(500));
        let pace = p.end(ms(600), half).expect("a whole window");
        assert_eq!(pace, PACE_WINDOW * 5);
        // The next window starts empty; one still writing at its end counts
        // up to then, and the rest of its time goes to the next window.
        p.start(ms(1000));
        p.start(ms(1000));
        let pace = p.end(ms(1200), PACE_WINDOW).expect("a whole window");
        assert_eq!(pace, PACE_WINDOW * 5);
        assert_eq!(p.end(ms(1300), half), None);
        assert_eq!(p.busy, Duration::from_millis(100));
    }

    #[test]
    fn a_window_slower_than_the_slow_pace_ends_early() {
        let t0 = Instant::now();
        let longest = SLOWEST_WINDOW;
        let mut p = Pace::default();
        p.start(t0);
        assert_eq!(p.end(t0 + longest, 1 << 20), None);
        p.start(t0 + longest);
        let pace = p.end(t0 + longest * 2, 1 << 20).expect("decided early");
        assert!(pace < SLOW_PACE, "{pace}");
        assert_eq!((p.bytes, p.busy), (0, Duration::ZERO));
    }

    #[test]
    fn this_machine_has_a_threshold() {
        // Linux always has these files; a None here would make every copy
        // evict without anyone noticing.
        let t = dirty_thresholds().expect("/proc/sys/vm and /proc/meminfo readable");
        assert!(t.background > 0 && t.limit > 0);
    }
}
