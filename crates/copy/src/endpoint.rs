//! Sources, opened from what a command line names: a path (a raw file or
//! block device, or a qcow2 image with its chain), an NBD URI, or `-`
//! (a qcow2 stream on standard input). Each is probed once and opened
//! once; the result knows its kind, size, map and the files it reads.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sparsekit_fiemap::Mapper;
use sparsekit_nbd::NbdUri;
use sparsekit_qcow2::StreamDecoder;

use crate::error::OpenError;
use crate::nbd::NbdSource;
use crate::qcow2::Qcow2Source;
use crate::source::{RawSource, Source};

/// What a command line names as a source or destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Spec {
    /// `-`: standard input or output.
    Stdio,
    /// A local path.
    Path(PathBuf),
    /// An NBD URI (`nbd://`, `nbd+unix://`, `nbds://`, ...).
    Nbd(Box<NbdUri>),
}

/// The URI schemes of NBD (the NBD URI specification).
const NBD_SCHEMES: [&str; 6] = [
    "nbd://",
    "nbd+unix://",
    "nbds://",
    "nbds+unix://",
    "nbd+vsock://",
    "nbds+vsock://",
];

impl Spec {
    /// Reads a command-line argument: `-`, an NBD URI (by its scheme), or
    /// a path.
    pub fn parse(s: &str) -> Result<Self, OpenError> {
        if s == "-" {
            return Ok(Spec::Stdio);
        }
        if NBD_SCHEMES.iter().any(|p| s.starts_with(p)) {
            let uri = s.parse::<NbdUri>().map_err(|source| OpenError::Uri {
                spec: s.into(),
                source: source.into(),
            })?;
            return Ok(Spec::Nbd(Box::new(uri)));
        }
        Ok(Spec::Path(PathBuf::from(s)))
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Spec::Stdio => f.write_str("standard input"),
            Spec::Path(p) => write!(f, "{}", p.display()),
            Spec::Nbd(u) => write!(f, "{u}"),
        }
    }
}

/// A file's identity: (device, inode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileId {
    /// The identity in `meta`.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// The identity of the file at `path`, if it can be examined.
    pub fn of_path(path: &Path) -> Option<Self> {
        std::fs::metadata(path).ok().map(|m| Self::of(&m))
    }
}

/// An image format, as `--format` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The bytes of the file or device are the disk.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

/// How sources are opened: the options every tool takes.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// The format, instead of probing the magic.
    pub format: Option<Format>,
    /// qcow2: read the image alone, without its backing file.
    pub no_backing: bool,
    /// qcow2: refuse backing and data file names that are absolute or lead
    /// out of the image's folder.
    pub untrusted: bool,
    /// NBD: give up on a server that does not answer for this long
    /// (`None`: wait forever).
    pub timeout: Option<Duration>,
    /// NBD: meta contexts to negotiate besides `base:allocation`.
    pub contexts: Vec<String>,
    /// NBD: connections for reading besides the one that asks for block
    /// status (0: that one reads too); see [`crate::plan::nbd_connections`].
    pub connections: usize,
}

/// A forward-only qcow2 stream (standard input), its header read.
pub struct StreamSource {
    /// The decoder, positioned after the header.
    pub(crate) decoder: StreamDecoder<Box<dyn Read>>,
    pub(crate) name: String,
}

impl fmt::Debug for StreamSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamSource")
            .field("name", &self.name)
            .field("virtual_size", &self.decoder.virtual_size())
            .finish()
    }
}

impl StreamSource {
    /// Where the stream comes from, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A source, opened.
#[derive(Debug)]
pub enum Opened {
    /// A raw file or block device.
    Raw(RawSource),
    /// A qcow2 image with its backing chain.
    Qcow2(Qcow2Source),
    /// An NBD export.
    Nbd(NbdSource),
    /// A forward-only qcow2 stream (standard input).
    Stream(StreamSource),
}

impl Opened {
    /// Opens the source `spec` names.
    pub fn open(spec: &Spec, opts: &OpenOptions) -> Result<Self, OpenError> {
        match spec {
            Spec::Path(p) => open_path(p, opts),
            Spec::Nbd(uri) => {
                if opts.format == Some(Format::Qcow2) {
                    return Err(OpenError::NotApplicable {
                        name: uri.to_string(),
                        why: "an NBD export is read as the raw disk it serves; --format qcow2 does not apply",
                    });
                }
                let src = NbdSource::connect(uri, &opts.contexts, opts.connections, opts.timeout)?;
                Ok(Opened::Nbd(src))
            }
            Spec::Stdio => {
                if opts.format == Some(Format::Raw) {
                    return Err(OpenError::NotApplicable {
                        name: "standard input".into(),
                        why: "standard input is read as a qcow2 stream; -f raw does not apply",
                    });
                }
                Self::stream(Box::new(std::io::stdin().lock()), "standard input")
            }
        }
    }

    /// Reads the header of the qcow2 stream `reader` (named `name` in
    /// messages): a source that can only be read forward.
    pub fn stream(reader: Box<dyn Read>, name: &str) -> Result<Self, OpenError> {
        let decoder = StreamDecoder::new(reader).map_err(|source| OpenError::Stream {
            name: name.into(),
            source,
        })?;
        Ok(Opened::Stream(StreamSource {
            decoder,
            name: name.into(),
        }))
    }

    /// The file, device or URI, for messages.
    pub fn name(&self) -> &str {
        match self {
            Opened::Stream(s) => &s.name,
            other => other.random_access().map_or("", |s| s.name()),
        }
    }

    /// Size of the virtual disk in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Opened::Stream(s) => s.decoder.virtual_size(),
            other => other.random_access().map_or(0, |s| s.size()),
        }
    }

    /// The source as the copy engine reads it, unless it can only be read
    /// forward (a stream).
    pub fn random_access(&self) -> Option<&dyn Source> {
        match self {
            Opened::Raw(s) => Some(s),
            Opened::Qcow2(s) => Some(s),
            Opened::Nbd(s) => Some(s),
            Opened::Stream(_) => None,
        }
    }

    /// The identities of every local file this source reads (an image, its
    /// backing files, its data files): a copy must write to none of them.
    pub fn file_ids(&self) -> Vec<FileId> {
        let paths: Vec<&Path> = match self {
            Opened::Raw(r) => vec![r.mapper().path()],
            Opened::Nbd(_) | Opened::Stream(_) => Vec::new(),
            Opened::Qcow2(q) => {
                let img = q.image();
                img.layers()
                    .iter()
                    .map(|l| l.path())
                    .chain(img.layers().iter().filter_map(|l| match l {
                        sparsekit_qcow2::Layer::Qcow2(q) => q.data_file_path(),
                        sparsekit_qcow2::Layer::Raw(_) => None,
                    }))
                    .collect()
            }
        };
        paths.into_iter().filter_map(FileId::of_path).collect()
    }
}

/// Opens the local file or device `path` as `format`, or as the format its
/// magic says. Special files are refused before anything reads them (a
/// FIFO would block).
fn open_path(path: &Path, opts: &OpenOptions) -> Result<Opened, OpenError> {
    let mapper = Mapper::open(path)?;
    let format = match opts.format {
        Some(f) => f,
        None => probe(mapper.file(), path)?,
    };
    Ok(match format {
        Format::Raw => Opened::Raw(RawSource::new(mapper)),
        Format::Qcow2 => {
            let chain = sparsekit_qcow2::OpenOptions {
                no_backing: opts.no_backing,
                untrusted: opts.untrusted,
                ..Default::default()
            };
            let img = sparsekit_qcow2::Image::open_with(path, &chain)?;
            Opened::Qcow2(Qcow2Source::new(img, path))
        }
    })
}

/// qcow2 when `file` starts with its magic, raw otherwise (as qemu-img
/// probes).
fn probe(file: &std::fs::File, path: &Path) -> Result<Format, OpenError> {
    // No readahead for four bytes: it would pull the start of the image
    // into the page cache, and cached pages of unwritten extents read as
    // data to SEEK_DATA, which qcow2 block status consults (as qemu's).
    let _ = nix::fcntl::posix_fadvise(
        file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM,
    );
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match file.read_at(&mut magic[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(OpenError::Io {
                    path: path.to_owned(),
                    what: "reading the magic at offset 0x0",
                    source,
                });
            }
        }
    }
    Ok(if got == 4 && magic == *b"QFI\xfb" {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_stdio_uris_or_paths() {
        assert_eq!(Spec::parse("-").unwrap(), Spec::Stdio);
        assert_eq!(
            Spec::parse("disk.raw").unwrap(),
            Spec::Path("disk.raw".into())
        );
        assert!(matches!(
            Spec::parse("nbd+unix:///?socket=/s").unwrap(),
            Spec::Nbd(_)
        ));
        assert!(matches!(
            Spec::parse("nbd://host:notaport/x"),
            Err(OpenError::Uri { .. })
        ));
        // A relative path that merely contains a colon is a path.
        assert!(matches!(Spec::parse("a:b").unwrap(), Spec::Path(_)));
    }

    #[test]
    fn the_magic_decides_the_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, b"QFI\xfbrest").unwrap();
        let f = std::fs::File::open(&p).unwrap();
        assert_eq!(probe(&f, &p).unwrap(), Format::Qcow2);
        std::fs::write(&p, b"QFI").unwrap();
        let f = std::fs::File::open(&p).unwrap();
        assert_eq!(probe(&f, &p).unwrap(), Format::Raw);
    }
}
