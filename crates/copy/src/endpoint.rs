//! Sources, opened from what a command line names: a path (a raw file or
//! block device, a qcow2 image with its chain, or a compressed raw image),
//! an NBD URI, or `-` (standard input: a qcow2 stream, or raw bytes,
//! compressed or not). Each is probed once and opened once; the result
//! knows its kind, size, map and the files it reads.

use std::fmt;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sparsekit_fiemap::Mapper;
use std::sync::Arc;

use sparsekit_fiemap::lock::{self, Profile};
use sparsekit_nbd::NbdUri;
use sparsekit_qcow2::FileRole;
use sparsekit_qcow2::StreamDecoder;

use crate::compressed::{Compression, MAGIC_LEN, read_full};
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

/// What a source is opened for. Local files are locked as qemu-img locks
/// them for the same job (`sparsekit_fiemap::lock`), so that an image in
/// use by qemu is not read behind its back unless `force_share` says so.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Purpose {
    /// To copy it, as `qemu-img convert` reads its source: every file of
    /// the chain must not be written or resized by anyone else.
    #[default]
    Copy,
    /// To map it, as `qemu-img map` (stricter for raw images, which qemu-img
    /// maps while others write them: a map of a file being written would
    /// be presented as whole).
    Map,
    /// To look at a qcow2 image's metadata, as `qemu-img info`.
    Info,
    /// To check a qcow2 image's consistency, as `qemu-img check`.
    Check,
}

impl Purpose {
    /// The locks to take on a file of the source in `role`; `None`: none
    /// (what `-U` leaves of `qemu-img info`'s).
    pub fn profile(self, role: Role, force_share: bool) -> Option<Profile> {
        let p = match (self, role) {
            (Purpose::Info, _) => Profile::INSPECT,
            (Purpose::Map, Role::DataFile) => Profile::DATA_FILE,
            _ => Profile::READ,
        };
        let p = if force_share { p.force_share() } else { p };
        (p != Profile::INSPECT.force_share()).then_some(p)
    }
}

/// Which file of a source is being locked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The image named on the command line, or one of its backing files.
    Image,
    /// An external data file of a qcow2 image.
    DataFile,
}

/// How sources are opened: the options every tool takes.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// What the source is opened for: which locks its files get.
    pub purpose: Purpose,
    /// Read an image that others may be writing (qemu-img's `-U`): its
    /// files are locked without refusing writers.
    pub force_share: bool,
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
    /// NBD over TLS: the folder of `ca-cert.pem` (and `client-cert.pem`,
    /// `client-key.pem`) where the URI does not name one.
    pub tls_certificates: Option<PathBuf>,
}

/// A forward-only qcow2 stream (standard input), its header read.
pub struct StreamSource {
    /// The decoder, positioned after the header.
    pub(crate) decoder: StreamDecoder<Box<dyn Read + Send>>,
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

/// A raw image that can only be read forward: raw bytes on standard
/// input, or a compressed raw image (from a file or standard input),
/// decompressed as it is read. Its size is known only at its end.
pub struct RawStream {
    pub(crate) reader: Box<dyn Read + Send>,
    pub(crate) name: String,
    pub(crate) compression: Option<Compression>,
    pub(crate) file_ids: Vec<FileId>,
}

impl fmt::Debug for RawStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawStream")
            .field("name", &self.name)
            .field("compression", &self.compression)
            .finish()
    }
}

impl RawStream {
    /// Where the stream comes from, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How the bytes are compressed, if they are.
    pub fn compression(&self) -> Option<Compression> {
        self.compression
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
    Nbd(Box<NbdSource>),
    /// A forward-only qcow2 stream (standard input).
    Stream(Box<StreamSource>),
    /// A forward-only raw image (standard input, or a compressed file).
    RawStream(Box<RawStream>),
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
                let config = sparsekit_nbd::ClientConfig {
                    timeout: opts.timeout,
                    tls_certificates: opts.tls_certificates.clone(),
                    ..Default::default()
                };
                let src = NbdSource::connect(uri, &opts.contexts, opts.connections, config)?;
                Ok(Opened::Nbd(Box::new(src)))
            }
            Spec::Stdio => {
                let name = "standard input";
                let stdin = std::io::stdin()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|source| OpenError::Io {
                        path: name.into(),
                        what: "duplicating the descriptor",
                        source,
                    })?;
                Self::forward(
                    Box::new(std::fs::File::from(stdin)),
                    name,
                    opts.format,
                    Vec::new(),
                )
            }
        }
    }

    /// Opens what `input` (named `name`) carries, read forward: as `format`
    /// says, or by its magic: a qcow2 stream, or a raw image, compressed
    /// (decompressed as it is read, and then itself a qcow2 stream or raw)
    /// or not. `-f raw` takes the bytes as they are.
    pub fn forward(
        input: Box<dyn Read + Send>,
        name: &str,
        format: Option<Format>,
        file_ids: Vec<FileId>,
    ) -> Result<Self, OpenError> {
        let io_err = |source| OpenError::Io {
            path: name.into(),
            what: "reading",
            source,
        };
        let raw = |reader, compression| {
            Opened::RawStream(Box::new(RawStream {
                reader,
                name: name.into(),
                compression,
                file_ids: file_ids.clone(),
            }))
        };
        let (head, input) = peek(input).map_err(io_err)?;
        match format {
            Some(Format::Raw) => return Ok(raw(input, None)),
            Some(Format::Qcow2) => return Self::stream(input, name),
            None => {}
        }
        let (compression, input) = match Compression::sniff(&head) {
            None => (None, input),
            Some(c) => {
                let decoded = c.decoder(input).map_err(io_err)?;
                let (inner, decoded) = peek(decoded).map_err(|source| OpenError::Io {
                    path: name.into(),
                    what: "decompressing",
                    source,
                })?;
                if inner.starts_with(&QCOW2_MAGIC) {
                    return Self::stream(decoded, name);
                }
                (Some(c), decoded)
            }
        };
        if head.starts_with(&QCOW2_MAGIC) {
            return Self::stream(input, name);
        }
        Ok(raw(input, compression))
    }

    /// Reads the header of the qcow2 stream `reader` (named `name` in
    /// messages): a source that can only be read forward.
    pub fn stream(reader: Box<dyn Read + Send>, name: &str) -> Result<Self, OpenError> {
        let decoder = StreamDecoder::new(reader).map_err(|source| OpenError::Stream {
            name: name.into(),
            source,
        })?;
        Ok(Opened::Stream(Box::new(StreamSource {
            decoder,
            name: name.into(),
        })))
    }

    /// The file, device or URI, for messages.
    pub fn name(&self) -> &str {
        match self {
            Opened::Stream(s) => &s.name,
            Opened::RawStream(s) => &s.name,
            other => other.random_access().map_or("", |s| s.name()),
        }
    }

    /// Size of the virtual disk in bytes (a raw stream's is not known
    /// before its end: 0).
    pub fn size(&self) -> u64 {
        match self {
            Opened::Stream(s) => s.decoder.virtual_size(),
            Opened::RawStream(_) => 0,
            other => other.random_access().map_or(0, |s| s.size()),
        }
    }

    /// The source as the copy engine reads it, unless it can only be read
    /// forward (a stream).
    pub fn random_access(&self) -> Option<&dyn Source> {
        match self {
            Opened::Raw(s) => Some(s),
            Opened::Qcow2(s) => Some(s),
            Opened::Nbd(s) => Some(s.as_ref()),
            Opened::Stream(_) | Opened::RawStream(_) => None,
        }
    }

    /// The identities of every local file this source reads (an image, its
    /// backing files, its data files): a copy must write to none of them.
    pub fn file_ids(&self) -> Vec<FileId> {
        match self {
            Opened::Raw(r) => (r.mapper().file().metadata().iter())
                .map(FileId::of)
                .collect(),
            Opened::Nbd(_) | Opened::Stream(_) => Vec::new(),
            Opened::RawStream(s) => s.file_ids.clone(),
            Opened::Qcow2(q) => (q.image().file_ids().into_iter())
                .map(|(dev, ino)| FileId { dev, ino })
                .collect(),
        }
    }
}

/// Opens the local file or device `path` as `format`, or as the format its
/// magic says, on one descriptor: opened (special files refused before
/// anything reads them: a FIFO would block), locked, probed, then read as
/// raw or as a qcow2 chain whose every other file is locked as it opens.
fn open_path(path: &Path, opts: &OpenOptions) -> Result<Opened, OpenError> {
    let mapper = Mapper::open(path)?;
    lock(mapper.file(), path, opts, Role::Image)?;
    let format = match opts.format {
        Some(f) => f,
        None => match sparsekit_qcow2::probe(mapper.file())? {
            sparsekit_qcow2::Format::Qcow2 => Format::Qcow2,
            sparsekit_qcow2::Format::Raw => Format::Raw,
        },
    };
    let compressed = match opts.format {
        None if format == Format::Raw => {
            let mut head = [0u8; MAGIC_LEN];
            // A short or failing read is a file too small to be compressed.
            let n = std::os::unix::fs::FileExt::read_at(mapper.file(), &mut head, 0).unwrap_or(0);
            Compression::sniff(&head[..n])
        }
        _ => None,
    };
    if compressed.is_some() {
        let file = mapper.file().try_clone().map_err(|source| OpenError::Io {
            path: path.to_owned(),
            what: "opening",
            source,
        })?;
        let ids = file.metadata().iter().map(FileId::of).collect();
        drop(mapper);
        return Opened::forward(Box::new(file), &path.display().to_string(), None, ids);
    }
    Ok(match format {
        Format::Raw => Opened::Raw(RawSource::new(mapper)),
        Format::Qcow2 => {
            let file = mapper.file().try_clone().map_err(|source| OpenError::Io {
                path: path.to_owned(),
                what: "opening",
                source,
            })?;
            drop(mapper);
            let img = sparsekit_qcow2::Image::open_file(file, path, &chain_options(opts))?;
            Opened::Qcow2(Qcow2Source::new(img, path))
        }
    })
}

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// The first bytes of `input`, and a reader that still yields them.
fn peek(mut input: Box<dyn Read + Send>) -> std::io::Result<(Vec<u8>, Box<dyn Read + Send>)> {
    let mut head = vec![0u8; MAGIC_LEN];
    let n = read_full(&mut input, &mut head)?;
    head.truncate(n);
    let again = std::io::Cursor::new(head.clone()).chain(input);
    Ok((head, Box::new(again)))
}

/// Opens the local file `path` as [`Opened::open`] would (refused if
/// special, locked for `opts.purpose`), for a reader that reads it as only
/// its format crate can (`qcow2-info --check`); with the qcow2 crate's
/// options that lock every other file it opens the same way.
pub fn open_local(
    path: &Path,
    opts: &OpenOptions,
) -> Result<(std::fs::File, sparsekit_qcow2::OpenOptions), OpenError> {
    let mapper = Mapper::open(path)?;
    lock(mapper.file(), path, opts, Role::Image)?;
    let file = mapper.file().try_clone().map_err(|source| OpenError::Io {
        path: path.to_owned(),
        what: "opening",
        source,
    })?;
    Ok((file, chain_options(opts)))
}

/// The qcow2 crate's options for `opts`: backing files and data files are
/// locked as they open, for `opts.purpose`.
fn chain_options(opts: &OpenOptions) -> sparsekit_qcow2::OpenOptions {
    let (purpose, force_share) = (opts.purpose, opts.force_share);
    let hook = move |file: &std::fs::File, path: &Path, role: FileRole| {
        let role = match role {
            FileRole::DataFile(_) => Role::DataFile,
            FileRole::Top | FileRole::Backing(_) => Role::Image,
        };
        match purpose.profile(role, force_share) {
            Some(profile) => lock::lock(file, path, profile)
                .map(drop)
                .map_err(sparsekit_qcow2::HookError::from),
            None => Ok(()),
        }
    };
    sparsekit_qcow2::OpenOptions {
        no_backing: opts.no_backing,
        untrusted: opts.untrusted,
        on_open: Some(Arc::new(hook)),
        ..Default::default()
    }
}

/// Takes the locks `opts` asks for on `file`, a file of the source in
/// `role`. Where the kernel has no OFD locks, goes on without, as qemu does.
fn lock(
    file: &std::fs::File,
    path: &Path,
    opts: &OpenOptions,
    role: Role,
) -> Result<(), sparsekit_fiemap::Error> {
    match opts.purpose.profile(role, opts.force_share) {
        Some(profile) => lock::lock(file, path, profile).map(drop),
        None => Ok(()),
    }
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
    fn purposes_take_qemu_img_s_locks() {
        use Purpose::*;
        assert_eq!(Copy.profile(Role::Image, false), Some(Profile::READ));
        assert_eq!(Copy.profile(Role::DataFile, false), Some(Profile::READ));
        assert_eq!(Map.profile(Role::Image, false), Some(Profile::READ));
        assert_eq!(Map.profile(Role::DataFile, false), Some(Profile::DATA_FILE));
        assert_eq!(Check.profile(Role::Image, false), Some(Profile::READ));
        assert_eq!(Info.profile(Role::Image, false), Some(Profile::INSPECT));
        assert_eq!(Copy.profile(Role::Image, true), Some(Profile::SHARED_READ));
        assert_eq!(Info.profile(Role::Image, true), None);
    }
}
