//! Reading host files: whole buffers by `pread`, tables inside the file
//! or zero-filled past its end as qemu reads them, and the open files an
//! image holds.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the
/// file read as zeros.
pub(crate) fn pread_zero_fill(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    what: &'static str,
) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(Error::Read {
                    what,
                    offset: offset + done as u64,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// How the tables a header points to are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Within {
    /// Only inside the file: a table past its end is an error.
    File,
    /// As qemu reads them, with zeros past the end of the file: how
    /// `qemu-img check` gets to report such a table instead of refusing.
    ZeroFill,
}

/// An open host file: an image, a backing file, a data file.
#[derive(Debug)]
pub(crate) struct HostFile {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) size: u64,
    /// (device, inode).
    pub(crate) id: (u64, u64),
}

impl HostFile {
    /// Takes an open file: its size and identity (fstat), nothing read.
    pub(crate) fn new(file: File, path: &Path) -> Result<Self> {
        let m = file.metadata().map_err(|source| Error::Stat {
            what: "size and identity",
            source,
        })?;
        Ok(HostFile {
            path: path.to_path_buf(),
            file,
            size: m.len(),
            id: (m.dev(), m.ino()),
        })
    }

    /// Takes a file the caller opened and has done with what it needs.
    pub(crate) fn adopt(file: File, path: &Path) -> Result<Self> {
        let host = HostFile::new(file, path)?;
        host.advise_random();
        Ok(host)
    }

    /// Reads `buf.len()` bytes at `offset`: inside the file, or with zeros
    /// past its end, as `within` says.
    pub(crate) fn pread(
        &self,
        within: Within,
        buf: &mut [u8],
        offset: u64,
        what: &'static str,
    ) -> Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if within == Within::File && end > self.size {
            return Err(Error::OutsideFile {
                what,
                offset,
                end,
                file_size: self.size,
            });
        }
        pread_zero_fill(&self.file, buf, offset, what)
    }

    /// No readahead: reading tables must not pull the data clusters
    /// around them into the page cache, where SEEK_DATA (which the map
    /// asks for preallocated images, as qemu does) would see cached pages
    /// of unwritten extents as data.
    pub(crate) fn advise_random(&self) {
        crate::open::advise(
            &self.file,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM,
        );
    }
}

pub(crate) fn actual_size(file: &File) -> Result<u64> {
    Ok(file
        .metadata()
        .map_err(|source| Error::Stat {
            what: "allocated blocks",
            source,
        })?
        .blocks()
        * 512)
}
