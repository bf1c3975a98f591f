//! What a copy writes to: a regular file, a block device or an NBD export,
//! opened only by executing a [`crate::Plan`].

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};

use crate::dest::{DestKind, LocalDest, WriteLock, create_locked};
use crate::error::Error;
use crate::evict::{Evict, Evictor};
use crate::nbd_sink::NbdSink;
use crate::sys;

/// Largest single write: longer ones go out in pieces of this size, so
/// that no worker holds the destination's inode lock for long while the
/// others wait for it.
pub const WRITE_PIECE: usize = 128 << 10;

/// Default granularity of zero detection inside data, as `qemu-img
/// convert -S 4k`.
pub const SPARSE_BLOCK: u64 = 4096;

/// Writes smaller than this into a file take turns ([`takes_turns`]).
pub const GATED_WRITE: usize = 64 << 10;

/// Whether a write of `len` bytes into a file waits for the other workers'
/// small writes first. The kernel writes one inode's page cache under an
/// exclusive lock, and its waiters spin on it: with many workers writing
/// small pieces, that spinning is half the copy's system time. Taking turns
/// in user space costs a wake-up now and then, which only small writes
/// outnumber; large ones are left to the kernel's lock.
pub(crate) fn takes_turns(len: usize) -> bool {
    len < GATED_WRITE
}

/// The granularities `-S` accepts, as qemu-img: multiples of 512 up to
/// 16 MiB (0 turns detection off).
pub const SPARSE_BLOCK_MAX: u64 = 16 << 20;

/// What writes of data counted: bytes written, and bytes of all-zero
/// blocks left out.
#[derive(Debug, Default)]
pub(crate) struct WriteCounts {
    pub(crate) written: AtomicU64,
    pub(crate) zero_detected: AtomicU64,
}

/// How a destination file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestMode {
    /// Create the file or truncate it, then size it: every byte the copy
    /// does not write is a hole. (A block device is never truncated.)
    Replace,
    /// Keep what the file holds and grow it if it is too small: ranges the
    /// source has no data for are zeroed (holes punched), the rest of the
    /// file is left alone. For `-n`, `--offset` and incremental copies.
    Update,
}

/// An open destination.
#[derive(Debug)]
pub(crate) enum Sink {
    /// A regular file or block device.
    File(FileSink),
    /// An NBD export.
    Nbd(NbdSink),
}

impl Sink {
    /// Whether ranges the copy does not write already read as zeros.
    pub(crate) fn known_zero(&self) -> bool {
        match self {
            Sink::File(f) => f.known_zero,
            Sink::Nbd(n) => n.known_zero(),
        }
    }

    /// Whether finding all-zero blocks in data pays: where leaving a write
    /// out leaves zeros behind (a regular file, or a destination known to
    /// be zero), rather than costing a zeroing call of its own.
    pub(crate) fn zero_detection_pays(&self) -> bool {
        match self {
            Sink::File(f) => f.kind == DestKind::Regular || f.known_zero,
            Sink::Nbd(n) => n.known_zero(),
        }
    }

    /// The zero-detection granularity to use here: `asked` (0: none)
    /// where detection pays, else 0.
    pub(crate) fn sparse_block(&self, asked: u64) -> u64 {
        if self.zero_detection_pays() { asked } else { 0 }
    }

    /// The regular file, where the kernel could copy into it
    /// (copy_file_range).
    pub(crate) fn regular_file(&self) -> Option<&FileSink> {
        match self {
            Sink::File(f) if f.kind == DestKind::Regular => Some(f),
            _ => None,
        }
    }

    /// Writes all of `buf` at `offset`.
    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        match self {
            Sink::File(f) => f.write_at(buf, offset),
            Sink::Nbd(n) => n.write_at(buf, offset),
        }
    }

    /// Bytes zeroed so far by zeroing calls (holes punched, BLKZEROOUT,
    /// NBD_CMD_WRITE_ZEROES, written zeros); ranges already known to read
    /// as zeros are not counted.
    pub(crate) fn zeroed(&self) -> u64 {
        match self {
            Sink::File(f) => f.zeroed.load(Relaxed),
            Sink::Nbd(n) => n.zeroed(),
        }
    }

    /// Makes `len` bytes at `offset` read as zeros (see [`FileSink::zero`]
    /// and [`NbdSink::zero`]).
    pub(crate) fn zero(&self, offset: u64, len: u64) -> Result<(), Error> {
        match self {
            Sink::File(f) => f.zero(offset, len),
            Sink::Nbd(n) => n.zero(offset, len),
        }
    }

    /// Writes the data `buf` at `dst`, then lets eviction see it. With a
    /// `sparse` block size (0: none), runs of destination blocks of that
    /// size that are all zeros are zeroed instead ([`Sink::zero`]: nothing
    /// to do where the destination is known to be zero), each run in one
    /// call.
    pub(crate) fn write_data(
        &self,
        buf: &[u8],
        dst: u64,
        sparse: u64,
        counts: &WriteCounts,
    ) -> Result<(), Error> {
        if sparse == 0 {
            self.write_at(buf, dst)?;
            counts.written.fetch_add(buf.len() as u64, Relaxed);
            return self.written(dst, buf.len() as u64);
        }
        // Runs of all-zero and not-all-zero blocks, aligned to the
        // destination's blocks.
        let mut at = 0usize;
        while at < buf.len() {
            let off = dst + at as u64;
            let first = ((off / sparse + 1) * sparse - off) as usize;
            let zero = is_zero(&buf[at..(at + first).min(buf.len())]);
            let mut end = (at + first).min(buf.len());
            while end < buf.len() {
                let next = (end + sparse as usize).min(buf.len());
                if is_zero(&buf[end..next]) != zero {
                    break;
                }
                end = next;
            }
            let n = (end - at) as u64;
            if zero {
                self.zero(off, n)?;
                counts.zero_detected.fetch_add(n, Relaxed);
            } else {
                self.write_at(&buf[at..end], off)?;
                counts.written.fetch_add(n, Relaxed);
            }
            at = end;
        }
        self.written(dst, buf.len() as u64)
    }

    fn written(&self, offset: u64, len: u64) -> Result<(), Error> {
        match self {
            Sink::File(f) => f.written(offset, len),
            Sink::Nbd(_) => Ok(()),
        }
    }

    /// Grows a regular file to `end` bytes if it is shorter: a stream of
    /// unknown length may end in zeros that were left as holes.
    pub(crate) fn fit(&self, end: u64) -> Result<(), Error> {
        let Sink::File(f) = self else { return Ok(()) };
        if f.kind != DestKind::Regular {
            return Ok(());
        }
        let fail = |what| {
            move |source| Error::OpenDest {
                path: f.path.clone(),
                what,
                source,
            }
        };
        let len = f.file.metadata().map_err(fail("examining"))?.len();
        if len < end {
            f.file.set_len(end).map_err(fail("sizing"))?;
        }
        Ok(())
    }

    /// The end of a copy: flushed to stable storage where asked
    /// (`flush`), and always for a block device (whose cache the kernel
    /// would otherwise write back at close) and an NBD export (whose
    /// server may hold writes in memory).
    pub(crate) fn finish(&self, flush: bool) -> Result<(), Error> {
        match self {
            Sink::File(f) if flush || f.kind == DestKind::BlockDevice => f.sync(),
            Sink::File(_) => Ok(()),
            Sink::Nbd(n) => n.flush(),
        }
    }
}

/// An open regular file or block device.
#[derive(Debug)]
pub(crate) struct FileSink {
    file: File,
    path: PathBuf,
    kind: DestKind,
    /// Everything the copy does not write already reads as zeros: a file
    /// just created or truncated, or a device the caller says is zeroed.
    known_zero: bool,
    /// The copy created the file (it did not exist before).
    created: bool,
    /// Zero ranges go through BLKZEROOUT / PUNCH_HOLE until the kernel says
    /// it cannot, then as written zeros.
    zeroing_unsupported: AtomicBool,
    /// Bytes made to read as zeros by a call of ours (not known zero).
    zeroed: AtomicU64,
    evictor: Evictor,
    /// Held while writing a small piece ([`takes_turns`]).
    gate: std::sync::Mutex<()>,
    /// qemu's write locks, held while the sink is open.
    _lock: Option<WriteLock>,
}

/// A megabyte of zeros, to write where zeroing cannot be asked for.
pub(crate) static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

impl FileSink {
    /// Opens the inspected destination `dest` for a copy that writes bytes
    /// `[0, end)` of it: an existing file or device is used through the
    /// descriptor inspection opened; a new file is created (and must still
    /// not exist). `dest_is_zero` says a block device (or an existing file
    /// in [`DestMode::Update`]) already reads as zeros.
    pub(crate) fn open(
        dest: LocalDest,
        end: u64,
        mode: DestMode,
        dest_is_zero: bool,
        evict: Evict,
    ) -> Result<Self, Error> {
        let LocalDest { path, existing } = dest;
        let err = |what: &'static str| {
            let path = path.clone();
            move |source: io::Error| Error::OpenDest { path, what, source }
        };
        let (file, kind, created, lock) = match existing {
            Some(e) => (e.file, e.kind, false, e.lock),
            None => {
                let (file, lock) = create_locked(&path)?;
                (file, DestKind::Regular, true, Some(lock))
            }
        };
        let sized = match kind {
            DestKind::BlockDevice | DestKind::Nbd => Ok(dest_is_zero),
            DestKind::Regular => size_file(&file, end, mode)
                .map(|()| mode == DestMode::Replace || created || dest_is_zero),
        };
        let known_zero = match sized {
            Ok(z) => z,
            Err((what, source)) => {
                if created {
                    // Best effort: the sizing error is what matters.
                    let _ = std::fs::remove_file(&path);
                }
                return Err(err(what)(source));
            }
        };
        let evict = if kind == DestKind::Regular {
            evict
        } else {
            Evict::Never
        };
        Ok(Self {
            file,
            path,
            kind,
            known_zero,
            created,
            zeroing_unsupported: false.into(),
            zeroed: 0.into(),
            evictor: Evictor::new(evict),
            gate: Default::default(),
            _lock: lock,
        })
    }

    /// The path, for messages.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the copy created the file.
    pub(crate) fn created(&self) -> bool {
        self.created
    }

    /// The open file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Writes all of `buf` at `offset`, in [`WRITE_PIECE`]s.
    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        for (i, piece) in buf.chunks(WRITE_PIECE).enumerate() {
            let at = offset + (i * WRITE_PIECE) as u64;
            let _turn = (self.kind == DestKind::Regular && takes_turns(piece.len()))
                .then(|| self.gate.lock().unwrap_or_else(|e| e.into_inner()));
            self.evictor
                .timed(piece.len() as u64, || self.file.write_all_at(piece, at))
                .map_err(|source| Error::Write {
                    path: self.path.clone(),
                    offset: at,
                    len: piece.len() as u64,
                    source,
                })?;
        }
        Ok(())
    }

    /// `len` bytes at `offset` were written: with eviction on, starts the
    /// write-back of full spans and drops the pages of the oldest.
    fn written(&self, offset: u64, len: u64) -> Result<(), Error> {
        let Some(due) = self.evictor.written(offset, len) else {
            return Ok(());
        };
        let fail = |span: crate::evict::Span| {
            move |source: Errno| Error::WriteBack {
                path: self.path.clone(),
                offset: span.start,
                len: span.end - span.start,
                source: source.into(),
            }
        };
        let start = due.start;
        sys::sync_file_range(
            self.file.as_fd(),
            start.start,
            start.end - start.start,
            false,
        )
        .map_err(fail(start))?;
        if let Some(old) = due.drop {
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
    /// BLKZEROOUT on a block device (its unaligned edges written); written
    /// zeros where the kernel can do neither.
    pub(crate) fn zero(&self, offset: u64, len: u64) -> Result<(), Error> {
        if self.known_zero || len == 0 {
            return Ok(());
        }
        self.zeroed.fetch_add(len, Relaxed);
        if !self.zeroing_unsupported.load(Relaxed) {
            let r = match self.kind {
                DestKind::Regular => fallocate(
                    self.file.as_fd(),
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    offset as i64,
                    len as i64,
                )
                .map(|()| true),
                DestKind::BlockDevice | DestKind::Nbd => self.blkzeroout(offset, len)?,
            };
            match r {
                Ok(true) => return Ok(()),
                Ok(false) => {}
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
        self.write_zeros(offset, len)
    }

    /// BLKZEROOUT on the 512-aligned middle of the range, written zeros on
    /// its edges. `Ok(Ok(false))`: no aligned middle, nothing done; the
    /// outer error is a failed write of an edge, the inner one BLKZEROOUT's.
    fn blkzeroout(&self, offset: u64, len: u64) -> Result<Result<bool, Errno>, Error> {
        let start = offset.next_multiple_of(512);
        let end = (offset + len) / 512 * 512;
        if start >= end {
            return Ok(Ok(false));
        }
        if let Err(e) = sys::blkzeroout(self.file.as_fd(), start, end - start) {
            return Ok(Err(e));
        }
        self.write_zeros(offset, start - offset)?;
        self.write_zeros(end, offset + len - end)?;
        Ok(Ok(true))
    }

    fn write_zeros(&self, mut offset: u64, len: u64) -> Result<(), Error> {
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZEROS.len() as u64) as usize;
            self.write_at(&ZEROS[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Copies `len` bytes from `src` at `src_offset` to `dst_offset` in the
    /// kernel (copy_file_range: a reflink where the file system shares
    /// blocks). Returns false, having copied nothing, where the kernel
    /// cannot do it for these files (EXDEV, EOPNOTSUPP, EINVAL, ENOSYS).
    pub(crate) fn copy_file_range(
        &self,
        src: &File,
        src_name: &str,
        src_offset: u64,
        len: u64,
        dst_offset: u64,
    ) -> Result<bool, Error> {
        let (mut si, mut di) = (src_offset as i64, dst_offset as i64);
        let mut left = len;
        let fail = |offset: i64, source: io::Error| Error::Copy {
            source_name: src_name.into(),
            path: self.path.clone(),
            offset: offset as u64,
            source,
        };
        while left > 0 {
            match nix::fcntl::copy_file_range(
                src.as_fd(),
                Some(&mut si),
                self.file.as_fd(),
                Some(&mut di),
                left as usize,
            ) {
                Ok(0) => {
                    return Err(fail(
                        si,
                        io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the source ended early: was it truncated during the copy?",
                        ),
                    ));
                }
                Ok(n) => left -= n as u64,
                Err(Errno::EXDEV | Errno::EOPNOTSUPP | Errno::EINVAL | Errno::ENOSYS)
                    if left == len =>
                {
                    return Ok(false);
                }
                Err(Errno::EINTR) => {}
                Err(e) => return Err(fail(si, e.into())),
            }
        }
        Ok(true)
    }

    /// Flushes written data to stable storage.
    pub(crate) fn sync(&self) -> Result<(), Error> {
        self.file.sync_data().map_err(|source| Error::Flush {
            path: self.path.clone(),
            source,
        })
    }
}

/// Truncates (`Replace`) or grows (`Update`) a regular file to hold `end`
/// bytes; the error says which step failed.
fn size_file(file: &File, end: u64, mode: DestMode) -> Result<(), (&'static str, io::Error)> {
    let len = file.metadata().map_err(|e| ("examining", e))?.len();
    let replace = mode == DestMode::Replace;
    if replace && len > 0 {
        file.set_len(0).map_err(|e| ("truncating", e))?;
    }
    if replace || len < end {
        file.set_len(if replace { end } else { end.max(len) })
            .map_err(|e| ("sizing", e))?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn new_file(dir: &Path, name: &str) -> LocalDest {
        LocalDest {
            path: dir.join(name),
            existing: None,
        }
    }

    #[test]
    fn only_small_writes_take_turns() {
        assert!(takes_turns(4096));
        assert!(takes_turns(60 << 10));
        // A qcow2 cluster of the default size, and the pieces of large items.
        assert!(!takes_turns(64 << 10));
        assert!(!takes_turns(WRITE_PIECE));
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

    #[test]
    fn a_new_file_is_created_sized_and_known_zero() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::open(
            new_file(dir.path(), "d"),
            1 << 20,
            DestMode::Replace,
            false,
            Evict::Never,
        )
        .unwrap();
        assert!(sink.created() && sink.known_zero);
        assert_eq!(sink.file().metadata().unwrap().len(), 1 << 20);
    }

    #[test]
    fn a_file_that_appeared_since_inspection_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let dest = new_file(dir.path(), "d");
        std::fs::write(&dest.path, b"someone else's").unwrap();
        let e = FileSink::open(dest, 4096, DestMode::Replace, false, Evict::Never).unwrap_err();
        assert!(
            matches!(&e, Error::OpenDest { what: "creating", source, .. } if source.kind() == io::ErrorKind::AlreadyExists),
            "{e:?}"
        );
        assert_eq!(
            std::fs::read(dir.path().join("d")).unwrap(),
            b"someone else's"
        );
    }

    #[test]
    fn sparse_writes_leave_zero_blocks_out() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::open(
            new_file(dir.path(), "d"),
            64 << 10,
            DestMode::Replace,
            false,
            Evict::Never,
        )
        .unwrap();
        let mut buf = vec![0u8; 16 << 10];
        buf[5000] = 1;
        let sink = Sink::File(sink);
        let counts = WriteCounts::default();
        // At destination offset 2048: blocks [0,4k) [4k,8k) ... of the
        // destination, so the data block is [4k, 8k).
        sink.write_data(&buf, 2048, SPARSE_BLOCK, &counts).unwrap();
        assert_eq!(counts.written.load(Relaxed), 4096);
        assert_eq!(counts.zero_detected.load(Relaxed), (16 << 10) - 4096);
        let got = std::fs::read(dir.path().join("d")).unwrap();
        assert_eq!(got[2048 + 5000], 1);
        assert_eq!(got.iter().filter(|&&b| b != 0).count(), 1);

        // `-S 16k`: the data sits in the destination's block [0, 16k), of
        // which the buffer holds [2k, 16k); [16k, 18k) is left out.
        let counts = WriteCounts::default();
        sink.write_data(&buf, 2048, 16 << 10, &counts).unwrap();
        assert_eq!(counts.written.load(Relaxed), (16 << 10) - 2048);
        assert_eq!(counts.zero_detected.load(Relaxed), 2048);
        // 0: no detection.
        let counts = WriteCounts::default();
        sink.write_data(&buf, 2048, 0, &counts).unwrap();
        assert_eq!(counts.written.load(Relaxed), 16 << 10);
    }
}
