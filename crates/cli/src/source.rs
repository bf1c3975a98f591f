//! Opening what a command line names: a path (regular file or block
//! device, raw or qcow2) or an NBD URI.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use sparsekit_fiemap::Mapper;

/// The magic at offset 0 of every qcow2 image: `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// An image format, as `--format` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// The bytes of the file or device are the disk.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

/// Reads the first bytes of `path` and says which format it is: qcow2 when
/// it starts with [`QCOW2_MAGIC`], raw otherwise (as qemu-img probes).
pub fn probe_format(path: &Path) -> anyhow::Result<Format> {
    let mut f = File::open(path).with_context(|| format!("{}: opening", path.display()))?;
    // No readahead for four bytes: it would pull the start of the image
    // into the page cache, and cached pages of unwritten extents read as
    // data to SEEK_DATA, which qcow2 block status consults (as qemu's).
    let _ = nix::fcntl::posix_fadvise(&f, 0, 0, nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM);
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match f.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("{}: reading the magic at offset 0x0", path.display())
                });
            }
        }
    }
    Ok(if got == 4 && magic == QCOW2_MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// A source opened for mapping.
#[derive(Debug)]
pub enum Source {
    /// A raw file or block device.
    Raw(Mapper),
    /// A qcow2 image with its backing chain.
    Qcow2(sparsekit_qcow2::Image),
    /// An NBD export.
    Nbd(Box<sparsekit_copy::NbdSource>),
}

/// True when `spec` is an NBD URI rather than a path.
pub fn is_nbd_uri(spec: &str) -> bool {
    [
        "nbd://",
        "nbd+unix://",
        "nbds://",
        "nbds+unix://",
        "nbd+vsock://",
        "nbds+vsock://",
    ]
    .iter()
    .any(|p| spec.starts_with(p))
}

/// Opens `spec`: an NBD URI (negotiating `base:allocation` and
/// `contexts`, with up to `connections` connections for reading) or a
/// local path as [`open_local`] does.
pub fn open(
    spec: &str,
    format: Option<Format>,
    image: &ImageOptions,
    contexts: &[String],
    connections: usize,
) -> anyhow::Result<Source> {
    if !is_nbd_uri(spec) {
        return open_local(Path::new(spec), format, image);
    }
    if format == Some(Format::Qcow2) {
        anyhow::bail!(
            "{spec}: an NBD export is read as the raw disk it serves; --format qcow2 does not apply"
        );
    }
    let uri: sparsekit_nbd::NbdUri = spec
        .parse()
        .with_context(|| format!("{spec}: not a usable NBD URI"))?;
    let timeout = (image.timeout > 0).then(|| std::time::Duration::from_secs(image.timeout));
    let src = sparsekit_copy::NbdSource::connect(&uri, contexts, connections, timeout)?;
    Ok(Source::Nbd(Box::new(src)))
}

/// How images are opened: the flags every tool takes.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ImageOptions {
    /// qcow2: read the image alone, without its backing file (what it does
    /// not allocate reads as zeros).
    #[arg(long)]
    pub no_backing: bool,
    /// qcow2: the image comes from an untrusted place: refuse backing and
    /// data file names that are absolute or lead out of its folder.
    #[arg(long)]
    pub untrusted: bool,
    /// NBD: give up on a server that does not answer for this many seconds
    /// (0: wait forever).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub timeout: u64,
}

impl ImageOptions {
    /// The qcow2 crate's options for a chain.
    pub fn chain(&self) -> sparsekit_qcow2::OpenOptions {
        sparsekit_qcow2::OpenOptions {
            no_backing: self.no_backing,
            untrusted: self.untrusted,
            ..Default::default()
        }
    }
}

/// Opens the local file or device `path` as `format`, or as the format its
/// magic says. Special files are refused before anything reads them (a
/// FIFO would block).
pub fn open_local(
    path: &Path,
    format: Option<Format>,
    image: &ImageOptions,
) -> anyhow::Result<Source> {
    // Refuse directories, FIFOs and the like with the fiemap crate's
    // message before probing reads them.
    let mapper = Mapper::open(path)?;
    let format = match format {
        Some(f) => f,
        None => probe_format(path)?,
    };
    match format {
        Format::Raw => Ok(Source::Raw(mapper)),
        Format::Qcow2 => Ok(Source::Qcow2(sparsekit_qcow2::Image::open_with(
            path,
            &image.chain(),
        )?)),
    }
}

/// The (device, inode) of every file `source` reads: a copy must not
/// write to any of them.
pub fn file_ids(source: &Source) -> Vec<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let paths: Vec<&Path> = match source {
        Source::Raw(m) => vec![m.path()],
        Source::Nbd(_) => Vec::new(),
        Source::Qcow2(img) => img
            .layers()
            .iter()
            .map(|l| l.path())
            .chain(img.layers().iter().filter_map(|l| match l {
                sparsekit_qcow2::Layer::Qcow2(q) => q.data_file_path(),
                sparsekit_qcow2::Layer::Raw(_) => None,
            }))
            .collect(),
    };
    paths
        .into_iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect()
}

/// The copy engine's view of an opened source.
pub fn into_copy_source(source: Source, path: &Path) -> Box<dyn sparsekit_copy::Source> {
    match source {
        Source::Raw(m) => Box::new(sparsekit_copy::RawSource::new(m)),
        Source::Qcow2(img) => Box::new(sparsekit_copy::Qcow2Source::new(img, path)),
        Source::Nbd(n) => n,
    }
}

/// A path as given on the command line.
pub fn local_path(spec: &str) -> PathBuf {
    PathBuf::from(spec)
}
