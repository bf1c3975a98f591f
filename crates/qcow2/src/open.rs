//! How images are opened: the options, the format probe, and the caller's
//! say over every file a chain opens (the endpoint layer takes qemu's
//! image locks there; this crate knows nothing of locks).

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::header::MAGIC;
use crate::image::{HostFile, pread_zero_fill};

/// Default cap on the number of images in a backing chain.
pub const MAX_CHAIN_DEPTH: usize = 64;

/// What a file is to the image that opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileRole {
    /// The image itself (layer 0).
    Top,
    /// The backing file at this depth (1: the top image's backing file).
    Backing(usize),
    /// The external data file of the qcow2 image at this depth.
    DataFile(usize),
}

impl fmt::Display for FileRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileRole::Top => write!(f, "image"),
            FileRole::Backing(d) => write!(f, "backing file (depth {d})"),
            FileRole::DataFile(0) => write!(f, "data file"),
            FileRole::DataFile(d) => write!(f, "data file of the backing file at depth {d}"),
        }
    }
}

/// The error an [`OnOpen`] hook refuses a file with; the caller finds its
/// own error again in [`Error::Refused`] by downcasting.
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Called on every file an image opens, right after opening it and
/// before anything is read from it; an error refuses the file and the
/// open fails with [`Error::Refused`].
///
/// A closure `Fn(&File, &Path, FileRole) -> Result<(), HookError>` is one.
pub trait OnOpen: Send + Sync {
    /// `file` was just opened read-only from `path` as `role`.
    fn opened(&self, file: &File, path: &Path, role: FileRole) -> Result<(), HookError>;
}

impl<F> OnOpen for F
where
    F: Fn(&File, &Path, FileRole) -> Result<(), HookError> + Send + Sync,
{
    fn opened(&self, file: &File, path: &Path, role: FileRole) -> Result<(), HookError> {
        self(file, path, role)
    }
}

/// How [`crate::Image`] and [`crate::Qcow2`] open an image.
#[derive(Clone)]
pub struct OpenOptions {
    /// Most images in the chain, the top one included.
    pub max_depth: usize,
    /// Read the top image alone: its backing file is not opened, and what
    /// the image does not allocate reads as zeros.
    pub no_backing: bool,
    /// The image comes from an untrusted place: backing and data file
    /// names that are absolute or lead out of the image's folder are
    /// refused ([`crate::check_untrusted`]).
    pub untrusted: bool,
    /// Called on every file the open opens itself (not on a file the
    /// caller hands in: the caller has it already).
    pub on_open: Option<Arc<dyn OnOpen>>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            max_depth: MAX_CHAIN_DEPTH,
            no_backing: false,
            untrusted: false,
            on_open: None,
        }
    }
}

impl fmt::Debug for OpenOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenOptions")
            .field("max_depth", &self.max_depth)
            .field("no_backing", &self.no_backing)
            .field("untrusted", &self.untrusted)
            .field("on_open", &self.on_open.as_ref().map(|_| "hook"))
            .finish()
    }
}

impl OpenOptions {
    /// Opens `path` read-only as `role`: the file is stat'ed, checked
    /// against the files already open (`seen`, to notice a chain that
    /// loops), handed to the hook, and only then advised for reading.
    pub(crate) fn open(
        &self,
        path: &Path,
        role: FileRole,
        seen: Option<&mut HashSet<(u64, u64)>>,
    ) -> Result<HostFile> {
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let host = HostFile::new(file, path)?;
        // Before the hook: a loop would hand it the same file twice.
        if let Some(seen) = seen
            && !seen.insert(host.id)
        {
            return Err(Error::BackingLoop {
                path: path.to_path_buf(),
            });
        }
        if let Some(hook) = &self.on_open {
            hook.opened(&host.file, path, role)
                .map_err(|source| Error::Refused {
                    path: path.to_path_buf(),
                    role,
                    source,
                })?;
        }
        host.advise_random();
        Ok(host)
    }
}

/// One file an image holds open: see [`crate::Image::files`].
#[derive(Debug, Clone, Copy)]
pub struct OpenedFile<'a> {
    /// Its path, as opened.
    pub path: &'a Path,
    /// The open file.
    pub file: &'a File,
    /// What it is to the image.
    pub role: FileRole,
    /// Its (device, inode), from when it was opened.
    pub id: (u64, u64),
}

impl<'a> OpenedFile<'a> {
    pub(crate) fn of(host: &'a HostFile, role: FileRole) -> Self {
        OpenedFile {
            path: &host.path,
            file: &host.file,
            role,
            id: host.id,
        }
    }
}

/// The format of an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A qcow2 image.
    Qcow2,
    /// A raw image.
    Raw,
}

impl Format {
    /// The name qemu uses: `qcow2` or `raw`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    /// The format the first bytes of a file say: qcow2 when they are the
    /// qcow2 magic `QFI\xfb`, raw otherwise (fewer than 4 bytes too).
    /// No I/O: for bytes read from a stream as much as from a file.
    pub fn of_magic(first: &[u8]) -> Format {
        match first.get(..4) {
            Some(m) if m == MAGIC.to_be_bytes() => Format::Qcow2,
            _ => Format::Raw,
        }
    }
}

/// The format of an open file, by its magic ([`Format::of_magic`]): one
/// `pread` at offset 0, on the caller's file descriptor.
///
/// No readahead: a read at offset 0 would pull the start of the image
/// into the page cache, and cached pages of unwritten extents read as data
/// to SEEK_DATA, which block status consults (as qemu's does). The file is
/// left advised `POSIX_FADV_RANDOM` when it is a qcow2 image (its reads
/// are table lookups) and `POSIX_FADV_NORMAL` otherwise (a raw reader
/// wants readahead).
pub fn probe(file: &File) -> Result<Format> {
    advise(file, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM);
    let format = read_format(file)?;
    if format == Format::Raw {
        advise(file, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_NORMAL);
    }
    Ok(format)
}

/// [`probe`] without touching the advice, for files this crate holds.
pub(crate) fn read_format(file: &File) -> Result<Format> {
    let mut magic = [0u8; 4];
    pread_zero_fill(file, &mut magic, 0, "magic")?;
    Ok(Format::of_magic(&magic))
}

/// Advice only: an error from it changes nothing that is read.
pub(crate) fn advise(file: &File, advice: nix::fcntl::PosixFadviseAdvice) {
    let _ = nix::fcntl::posix_fadvise(file, 0, 0, advice);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_says_the_format() {
        assert_eq!(Format::of_magic(b"QFI\xfb\0\0\0\x03"), Format::Qcow2);
        assert_eq!(Format::of_magic(b"QFI"), Format::Raw);
        assert_eq!(Format::of_magic(b"QFI\xfa"), Format::Raw);
        assert_eq!(Format::of_magic(b""), Format::Raw);
    }

    #[test]
    fn probe_reads_the_callers_file() {
        let mut f = tempfile::tempfile().unwrap();
        assert_eq!(probe(&f).unwrap(), Format::Raw);
        std::io::Write::write_all(&mut f, b"QFI\xfb").unwrap();
        assert_eq!(probe(&f).unwrap(), Format::Qcow2);
    }

    #[test]
    fn roles_read_as_words() {
        assert_eq!(FileRole::Backing(2).to_string(), "backing file (depth 2)");
        assert_eq!(FileRole::DataFile(0).to_string(), "data file");
    }
}
