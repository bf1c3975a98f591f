//! What a copy writes to: a regular file or a block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};

use crate::Error;
use crate::sys;

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
    zeroing_unsupported: std::sync::atomic::AtomicBool,
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
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| Error::Write {
                path: self.path.clone(),
                offset,
                len: buf.len() as u64,
                source,
            })
    }

    /// Makes `len` bytes at `offset` read as zeros: nothing to do where the
    /// destination is known to be zero; a punched hole in a regular file;
    /// BLKZEROOUT on a block device; written zeros where the kernel can do
    /// neither.
    pub fn zero(&self, offset: u64, len: u64, zeros: &[u8]) -> Result<(), Error> {
        if self.known_zero || len == 0 {
            return Ok(());
        }
        use std::sync::atomic::Ordering::Relaxed;
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
