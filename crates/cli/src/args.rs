//! Arguments the binaries share, and their translation into the library's
//! options.

use std::time::Duration;

use sparsekit_copy::{Format, OpenOptions, Purpose};

/// An image format, as `--format` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// The bytes of the file or device are the disk.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
        }
    }
}

impl From<FormatArg> for sparsekit_copy::Output {
    /// `-O`: raw, or a qcow2 stream with qemu's default clusters.
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Raw => Self::Raw,
            FormatArg::Qcow2 => Self::Qcow2 {
                cluster_bits: sparsekit_qcow2::DEFAULT_CLUSTER_BITS,
            },
        }
    }
}

/// How images are opened: the flags every tool takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ImageArgs {
    /// qcow2: read the image alone, without its backing file (what it does
    /// not allocate reads as zeros).
    #[arg(long)]
    pub no_backing: bool,
    /// qcow2: the image comes from an untrusted place: refuse backing and
    /// data file names that are absolute or lead out of its folder.
    #[arg(long)]
    pub untrusted: bool,
    /// Read an image that another process (qemu, qemu-nbd) may be writing,
    /// as qemu-img's -U: without it, such an image is refused.
    #[arg(short = 'U', long)]
    pub force_share: bool,
}

impl ImageArgs {
    /// The library's options for opening a source as `format`, for
    /// `purpose` (NBD's from [`NbdArgs::apply`]).
    pub fn open_options(&self, format: Option<FormatArg>, purpose: Purpose) -> OpenOptions {
        OpenOptions {
            purpose,
            force_share: self.force_share,
            format: format.map(Format::from),
            no_backing: self.no_backing,
            untrusted: self.untrusted,
            ..OpenOptions::default()
        }
    }
}

/// How NBD servers are reached: for the tools that take NBD URIs.
#[derive(Debug, Clone, clap::Args)]
pub struct NbdArgs {
    /// NBD: give up on a server that does not answer for this many seconds
    /// (0: wait forever).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub timeout: u64,
    /// NBD over TLS (nbds://, nbds+unix://): the folder holding
    /// ca-cert.pem, and client-cert.pem and client-key.pem if the server
    /// asks for a client certificate, as qemu and libnbd lay it out (the
    /// URI's tls-certificates= wins over it; default: libnbd's folders,
    /// then the system's CAs).
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<std::path::PathBuf>,
}

impl NbdArgs {
    /// `open` with the timeout and certificates asked for.
    pub fn apply(&self, open: OpenOptions) -> OpenOptions {
        OpenOptions {
            timeout: (self.timeout > 0).then(|| Duration::from_secs(self.timeout)),
            tls_certificates: self.tls_certificates.clone(),
            ..open
        }
    }
}

/// An output format, as qemu-img's `--output` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputArg {
    /// For people.
    Human,
    /// JSON, as qemu-img prints it.
    Json,
}

/// How data is moved, as `--method` names it.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum MethodArg {
    /// pread/pwrite when detecting zeros, copy_file_range otherwise.
    Auto,
    /// pread/pwrite through page-aligned buffers.
    ReadWrite,
    /// copy_file_range (reflink where the file system can).
    CopyFileRange,
}

impl From<MethodArg> for sparsekit_copy::Method {
    fn from(m: MethodArg) -> Self {
        match m {
            MethodArg::Auto => Self::Auto,
            MethodArg::ReadWrite => Self::ReadWrite,
            MethodArg::CopyFileRange => Self::CopyFileRange,
        }
    }
}

/// Progress and the summary: `-p`, `--progress=FD`, `-q`.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ProgressArgs {
    /// Show progress: a bar when standard error is a terminal (the default
    /// there), else a line per percent on standard error, as qemu-img -p;
    /// `--progress=FD` writes `N/100` lines to file descriptor FD, as
    /// nbdcopy does.
    #[arg(
        short = 'p',
        long,
        value_name = "FD",
        num_args = 0..=1,
        require_equals = true,
        overrides_with = "no_progress"
    )]
    pub progress: Option<Option<i32>>,
    /// Never show progress.
    #[arg(long, overrides_with = "progress")]
    pub no_progress: bool,
    /// Print nothing but errors: no progress, no summary.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

impl ProgressArgs {
    /// Where progress goes.
    pub fn mode(&self) -> crate::progress::Mode {
        use crate::progress::Mode;
        use std::io::IsTerminal;
        let terminal = std::io::stderr().is_terminal();
        match self.progress {
            _ if self.quiet || self.no_progress => Mode::Off,
            Some(Some(fd)) => Mode::Fd(fd),
            Some(None) if terminal => Mode::Bar,
            Some(None) => Mode::Lines,
            None if terminal => Mode::Bar,
            None => Mode::Off,
        }
    }
}

/// Raw streams and bmap files: how long a stream is, which ranges to write.
#[derive(Debug, Clone, clap::Args)]
pub struct FlashArgs {
    /// The size of a raw stream (standard input, a compressed image), when
    /// known ahead: a new file is sized at once, and a stream that ends
    /// before or goes on past it is an error. Without it the size is what
    /// arrives.
    #[arg(long, value_parser = crate::human::parse_size)]
    pub size: Option<u64>,
    /// Copy only the ranges the bmap FILE lists (bmaptool's formats 1.x and
    /// 2.0, SHA-1 or SHA-256), checking each range's checksum as it is
    /// copied and the file's own checksum first; the rest of DEST is not
    /// touched. An IMAGE.bmap lying beside the image is not picked up, as
    /// bmaptool would: a bmap decides what is never written, so it is used
    /// only when named.
    #[arg(long, value_name = "FILE")]
    pub bmap: Option<std::path::PathBuf>,
}

/// Whether DEST's pages are dropped as the copy goes.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct EvictArgs {
    /// Write DEST back as the copy goes and drop its pages from the page
    /// cache once clean, as nbdcopy does (the default with --flush, and for
    /// copies of more data than the kernel lets run free, or of an unknown
    /// amount; for less, once the page cache takes writes slower than
    /// 1 GiB/s).
    #[arg(long, overrides_with = "no_evict")]
    pub evict: bool,
    /// Leave DEST's pages in the page cache, to be written back by the
    /// kernel.
    #[arg(long, overrides_with = "evict")]
    pub no_evict: bool,
}

impl EvictArgs {
    /// The choice made on the command line (`None`: the library's default).
    pub fn choice(&self) -> Option<bool> {
        (self.evict || self.no_evict).then_some(self.evict)
    }
}
