//! Extent mapping: FIEMAP, SEEK_DATA/SEEK_HOLE, or the whole file.

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use sparsekit_extent::{Coalesce, Extent, ExtentIterExt, Kind};

use crate::sys::{self, Fiemap, FiemapExtent, FiemapHeader};
use crate::{Error, Result};

/// `FIEMAP_FLAG_SYNC`: sync the file before mapping.
const FIEMAP_FLAG_SYNC: u32 = 0x0000_0001;
/// `FIEMAP_EXTENT_LAST`: the last extent of the file.
const FIEMAP_EXTENT_LAST: u32 = 0x0000_0001;
/// `FIEMAP_EXTENT_UNWRITTEN`: space allocated, but no data (reads as zeros).
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x0000_0800;

/// Extents asked for per FIEMAP call: 8192 × 56 bytes ≈ 448 KiB of buffer,
/// so a file with a million extents needs about 120 calls.
pub const FIEMAP_BATCH: usize = 8192;

/// What kind of file a [`Mapper`] has open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file; its size is `st_size`.
    Regular,
    /// A block device; its size is `BLKGETSIZE64`.
    BlockDevice,
}

/// How a [`Mapper`] learns where the data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// The FS_IOC_FIEMAP ioctl; knows unwritten extents.
    Fiemap,
    /// `lseek` with `SEEK_DATA` and `SEEK_HOLE`.
    SeekData,
    /// No map: everything is data.
    WholeFile,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Fiemap => "FIEMAP",
            Method::SeekData => "SEEK_DATA",
            Method::WholeFile => "whole file",
        })
    }
}

/// A regular file or block device open read-only for mapping.
#[derive(Debug)]
pub struct Mapper {
    file: File,
    path: PathBuf,
    size: u64,
    kind: FileKind,
    method: Method,
}

impl Mapper {
    /// Opens `path` read-only and chooses the [`Method`].
    ///
    /// A FIFO is refused without being opened (opening would block until a
    /// writer appears); directories, sockets and character devices are
    /// refused with [`Error::NotMappable`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let open_err = |what, source| Error::Open {
            path: path.to_owned(),
            what,
            source,
        };
        let meta = std::fs::metadata(path).map_err(|e| open_err("opening", e))?;
        check_mappable(path, &meta.file_type())?;
        // O_NONBLOCK: should the path be swapped for a FIFO after the check,
        // opening it must not block; fstat below refuses it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| open_err("opening", e))?;
        Self::from_file(file, path)
    }

    /// Wraps a file already open for reading; `path` is used in messages.
    pub fn from_file(file: File, path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let meta = file.metadata().map_err(|source| Error::Open {
            path: path.clone(),
            what: "fstat",
            source,
        })?;
        check_mappable(&path, &meta.file_type())?;
        let (kind, size, method) = if meta.file_type().is_block_device() {
            let size =
                sys::block_device_size(file.as_fd()).map_err(|e| Error::BlockDeviceSize {
                    path: path.clone(),
                    source: e.into(),
                })?;
            (FileKind::BlockDevice, size, Method::WholeFile)
        } else {
            let method = detect_method(&file, &path)?;
            (FileKind::Regular, meta.len(), method)
        };
        Ok(Self {
            file,
            path,
            size,
            kind,
            method,
        })
    }

    /// Forces a [`Method`]; a method the file system lacks then fails when
    /// mapping. For tests and comparisons.
    pub fn with_method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Regular file or block device.
    pub fn kind(&self) -> FileKind {
        self.kind
    }

    /// The method mapping uses.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The path given when opening.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file, for reading the data the map points at.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The map of `range ∩ [0, size)`: sorted, gap-free, neighbours of the
    /// same kind merged. The stream stops after the first error.
    pub fn extents(&self, range: Range<u64>) -> Extents<'_> {
        let end = range.end.min(self.size);
        let start = range.start.min(end);
        let state = match self.method {
            Method::Fiemap => State::Fiemap(Batch::new()),
            Method::SeekData => State::SeekData,
            Method::WholeFile => State::WholeFile,
        };
        Extents {
            inner: RawExtents {
                mapper: self,
                pos: start,
                end,
                state,
                checked: false,
            }
            .coalesce(),
        }
    }
}

fn check_mappable(path: &Path, t: &std::fs::FileType) -> Result<()> {
    let kind = if t.is_file() || t.is_block_device() {
        return Ok(());
    } else if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else {
        "special file"
    };
    Err(Error::NotMappable {
        path: path.to_owned(),
        kind,
    })
}

/// Chooses the method from the kernel's answers: a FIEMAP call over one
/// byte (cheap however many extents the file has), then SEEK_DATA.
/// EOPNOTSUPP, ENOTTY and ENOSYS mean "no FIEMAP here"; EINVAL and
/// EOPNOTSUPP from SEEK_DATA mean "no SEEK_DATA here"; any other error is
/// an error.
fn detect_method(file: &File, path: &Path) -> Result<Method> {
    let mut probe = Fiemap::<0> {
        header: FiemapHeader {
            fm_length: 1,
            ..FiemapHeader::default()
        },
        extents: [],
    };
    match sys::fiemap(file.as_fd(), &mut probe) {
        Ok(()) => return Ok(Method::Fiemap),
        Err(Errno::EOPNOTSUPP | Errno::ENOTTY | Errno::ENOSYS) => {}
        Err(e) => return Err(map_err(path, "FIEMAP", 0, e)),
    }
    match lseek(file.as_fd(), 0, Whence::SeekData) {
        Ok(_) | Err(Errno::ENXIO) => Ok(Method::SeekData),
        Err(Errno::EINVAL | Errno::EOPNOTSUPP) => Ok(Method::WholeFile),
        Err(e) => Err(map_err(path, "SEEK_DATA", 0, e)),
    }
}

fn map_err(path: &Path, call: &'static str, offset: u64, e: Errno) -> Error {
    Error::Map {
        path: path.to_owned(),
        call,
        offset,
        source: e.into(),
    }
}

/// Unwritten extents read as zeros; every other flag (DELALLOC, UNKNOWN,
/// ENCODED, DATA_INLINE, NOT_ALIGNED, SHARED, ...) still means data.
fn kind_of(x: &FiemapExtent) -> Kind {
    if x.fe_flags & FIEMAP_EXTENT_UNWRITTEN != 0 {
        Kind::Zero
    } else {
        Kind::Data
    }
}

/// The buffer of one FIEMAP call and how far it has been consumed.
struct Batch {
    /// Allocated on the first call, so that a stream over a range without
    /// extents costs no buffer.
    req: Option<Box<Fiemap<FIEMAP_BATCH>>>,
    next: usize,
    /// No further call is needed: the kernel returned fewer extents than
    /// asked for, or flagged one LAST.
    exhausted: bool,
    /// `pos` when the buffer was filled, to detect a batch that made no
    /// progress.
    filled_at: u64,
}

impl Batch {
    fn new() -> Self {
        Self {
            req: None,
            next: 0,
            exhausted: false,
            filled_at: 0,
        }
    }

    /// The extents of the last call (none before the first).
    fn mapped(&self) -> &[FiemapExtent] {
        self.req.as_deref().map_or(&[], Fiemap::mapped)
    }

    /// Calls FIEMAP for `pos..end`. The first call of a stream syncs the
    /// file, so that dirty pages are on disk and in the map.
    fn fill(&mut self, fd: BorrowedFd<'_>, pos: u64, end: u64) -> Result<(), Errno> {
        let first = self.req.is_none();
        let req = self.req.get_or_insert_with(Fiemap::boxed);
        req.header = FiemapHeader {
            fm_start: pos,
            fm_length: end - pos,
            fm_flags: if first { FIEMAP_FLAG_SYNC } else { 0 },
            ..FiemapHeader::default()
        };
        sys::fiemap(fd, req)?;
        let mapped = req.mapped();
        self.exhausted = mapped.len() < FIEMAP_BATCH
            || mapped
                .last()
                .is_some_and(|x| x.fe_flags & FIEMAP_EXTENT_LAST != 0);
        self.next = 0;
        self.filled_at = pos;
        Ok(())
    }
}

enum State {
    Fiemap(Batch),
    SeekData,
    WholeFile,
}

/// The uncoalesced stream: one item per FIEMAP extent, gap or seek step.
struct RawExtents<'a> {
    mapper: &'a Mapper,
    pos: u64,
    end: u64,
    state: State,
    /// The size was checked again at the end of the stream.
    checked: bool,
}

impl RawExtents<'_> {
    /// At the end of the stream: the file must still have the size the map
    /// was made for (a regular file truncated or grown meanwhile would get
    /// a map of a file that no longer exists).
    fn check_size(&mut self) -> Option<Result<Extent>> {
        self.checked = true;
        if self.mapper.kind != FileKind::Regular {
            return None;
        }
        match self.mapper.file.metadata() {
            Ok(m) if m.len() == self.mapper.size => None,
            Ok(m) => Some(Err(Error::Changed {
                path: self.mapper.path.clone(),
                was: self.mapper.size,
                now: m.len(),
            })),
            Err(source) => Some(Err(Error::Open {
                path: self.mapper.path.clone(),
                what: "fstat",
                source,
            })),
        }
    }

    /// Yields `pos..to` as `kind` and moves on.
    fn emit(&mut self, to: u64, kind: Kind) -> Option<Result<Extent>> {
        let e = Extent::new(self.pos, to - self.pos, kind);
        self.pos = to;
        Some(Ok(e))
    }

    fn fail(&mut self, err: Error) -> Option<Result<Extent>> {
        self.pos = self.end;
        self.checked = true;
        Some(Err(err))
    }

    fn next_fiemap(&mut self) -> Option<Result<Extent>> {
        let fd = self.mapper.file.as_fd();
        loop {
            let State::Fiemap(batch) = &mut self.state else {
                unreachable!()
            };
            let Some(x) = batch.mapped().get(batch.next).copied() else {
                if batch.exhausted {
                    return self.emit(self.end, Kind::Hole);
                }
                if batch.req.is_some() && batch.filled_at == self.pos {
                    // A full batch that ended before `pos`: asking again
                    // would get the same answer forever.
                    let answer = batch.mapped().last().map_or(0, |x| x.fe_logical);
                    let (path, offset) = (self.mapper.path.clone(), self.pos);
                    return self.fail(Error::NoProgress {
                        path,
                        call: "FIEMAP",
                        offset,
                        answer,
                    });
                }
                if let Err(e) = batch.fill(fd, self.pos, self.end) {
                    let err = map_err(&self.mapper.path, "FIEMAP", self.pos, e);
                    return self.fail(err);
                }
                continue;
            };
            if x.fe_logical >= self.end {
                batch.exhausted = true;
                batch.next = batch.mapped().len();
                continue;
            }
            let start = x.fe_logical.max(self.pos);
            let stop = x.fe_logical.saturating_add(x.fe_length).min(self.end);
            if stop <= start {
                // Wholly before `pos` (overlap from a previous batch) or empty.
                batch.next += 1;
                continue;
            }
            if start > self.pos {
                // The gap first; the extent is looked at again next time.
                return self.emit(start, Kind::Hole);
            }
            batch.next += 1;
            return self.emit(stop, kind_of(&x));
        }
    }

    fn next_seek(&mut self) -> Option<Result<Extent>> {
        let fd = self.mapper.file.as_fd();
        let pos = self.pos;
        let data = match lseek(fd, pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(Errno::ENXIO) => return self.emit(self.end, Kind::Hole),
            Err(e) => {
                let err = map_err(&self.mapper.path, "SEEK_DATA", pos, e);
                return self.fail(err);
            }
        };
        if data < pos {
            let path = self.mapper.path.clone();
            return self.fail(Error::NoProgress {
                path,
                call: "SEEK_DATA",
                offset: pos,
                answer: data,
            });
        }
        if data > pos {
            return self.emit(data.min(self.end), Kind::Hole);
        }
        match lseek(fd, pos as i64, Whence::SeekHole) {
            Ok(h) if h as u64 > pos => self.emit((h as u64).min(self.end), Kind::Data),
            Ok(h) => {
                let path = self.mapper.path.clone();
                self.fail(Error::NoProgress {
                    path,
                    call: "SEEK_HOLE",
                    offset: pos,
                    answer: h as u64,
                })
            }
            Err(e) => {
                let err = map_err(&self.mapper.path, "SEEK_HOLE", pos, e);
                self.fail(err)
            }
        }
    }
}

impl Iterator for RawExtents<'_> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return if self.checked {
                None
            } else {
                self.check_size()
            };
        }
        match self.state {
            State::Fiemap(_) => self.next_fiemap(),
            State::SeekData => self.next_seek(),
            State::WholeFile => self.emit(self.end, Kind::Data),
        }
    }
}

/// The stream returned by [`Mapper::extents`].
pub struct Extents<'a> {
    inner: Coalesce<RawExtents<'a>, Error>,
}

impl fmt::Debug for Extents<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extents").finish_non_exhaustive()
    }
}

impl Iterator for Extents<'_> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_extents_are_zero_every_other_flag_data() {
        let x = |fe_flags| FiemapExtent {
            fe_logical: 4096,
            fe_length: 8192,
            fe_flags,
            ..FiemapExtent::default()
        };
        assert_eq!(
            kind_of(&x(FIEMAP_EXTENT_UNWRITTEN | FIEMAP_EXTENT_LAST)),
            Kind::Zero
        );
        let delalloc_unknown = 0x4 | 0x2;
        assert_eq!(kind_of(&x(delalloc_unknown)), Kind::Data);
        assert_eq!(kind_of(&x(0)), Kind::Data);
    }
}
