//! `copy SOURCE DEST`: copy a disk image's data, and only its data.

use sparsekit_copy::Request;

use crate::args::{EvictArgs, FlashArgs, FormatArg, ImageArgs, MethodArg, NbdArgs, ProgressArgs};
use crate::human::parse_size;

/// Copy a disk image's data, and only its data, in parallel.
///
/// DEST is created or truncated to the size of SOURCE, holes left where
/// SOURCE has no data; a block device (zero ranges with BLKZEROOUT) or an
/// NBD export (NBD_CMD_WRITE_ZEROES) is written in place and must be large
/// enough. Nothing is created, truncated or written before SOURCE, the
/// options and DEST are checked.
#[derive(Debug, clap::Parser)]
#[command(name = "copy", version = super::VERSION)]
pub struct Args {
    /// A regular file, block device, qcow2 image or raw image compressed
    /// with gzip, xz, zstd or bzip2 (all detected by magic), an NBD URI
    /// (nbd://HOST/EXPORT or nbd://HOST:PORT/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH), or `-`: standard input, read
    /// forward: a qcow2 stream, or raw bytes, compressed or not.
    pub source: String,
    /// A regular file (created or truncated), a block device, an NBD URI
    /// (the export is written in place: it must be writable and large
    /// enough; the rest of it is left alone), or `-`: standard output (the
    /// raw image, holes as zeros; with `-O qcow2`, a qcow2 stream).
    pub dest: String,
    /// The source's format, instead of detecting it: `-f raw` takes the
    /// bytes as they are (no qcow2 or compression magic looked for).
    #[arg(short = 'f', long, value_enum)]
    pub format: Option<FormatArg>,
    #[command(flatten)]
    pub image: ImageArgs,
    #[command(flatten)]
    pub nbd: NbdArgs,
    /// Worker threads (default: four per core, between 4 and 16; from NBD,
    /// one per connection, up to 4).
    #[arg(short = 'j', long)]
    pub jobs: Option<usize>,
    #[command(flatten)]
    pub progress: ProgressArgs,
    /// Print the result as one JSON object on standard output (bytes read,
    /// written, zeroed and left as holes, seconds, source, destination)
    /// instead of the summary line.
    #[arg(long)]
    pub json: bool,
    /// Write at this offset of DEST, keeping the rest of it (`--offset 0`
    /// too: DEST is then updated in place, never truncated).
    #[arg(long, value_parser = parse_size)]
    pub offset: Option<u64>,
    /// Skip this many bytes of SOURCE: 4096, 0x1000, 64k, 1.5G.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    pub skip: u64,
    /// Copy only this many bytes of SOURCE, from --skip on.
    #[arg(long, value_parser = parse_size)]
    pub length: Option<u64>,
    /// DEST exists: write into it without creating or truncating it, as
    /// qemu-img convert's -n.
    #[arg(short = 'n')]
    pub no_create: bool,
    /// After copying, compare DEST with SOURCE and fail on any difference.
    #[arg(long)]
    pub verify: bool,
    /// Leave holes for all-zero 4 KiB blocks of data (default for files).
    #[arg(long, overrides_with = "no_sparse")]
    pub sparse: bool,
    /// Write every byte of data, zero or not.
    #[arg(long)]
    pub no_sparse: bool,
    /// The zero-detection granularity, as qemu-img convert's -S: blocks of
    /// SIZE bytes of data that are all zeros are left as holes; a multiple
    /// of 512 up to 16M, 0 turns it off (default 4k).
    #[arg(short = 'S', value_name = "SIZE", value_parser = parse_size, conflicts_with = "no_sparse")]
    pub sparse_size: Option<u64>,
    /// DEST already reads as zeros: do not zero anything on it (also
    /// spelled as qemu-img's --target-is-zero and nbdcopy's
    /// --destination-is-zero).
    #[arg(long, visible_aliases = ["target-is-zero", "destination-is-zero"])]
    pub dest_is_zero: bool,
    #[command(flatten)]
    pub evict: EvictArgs,
    /// Flush DEST to stable storage at the end (always done for devices
    /// and NBD exports).
    #[arg(long)]
    pub flush: bool,
    /// Keep a DEST this copy created when the copy fails (by default it is
    /// removed, so that nothing incomplete looks like a copy).
    #[arg(long)]
    pub keep_partial: bool,
    /// How data is moved.
    #[arg(long, value_enum, default_value = "auto")]
    pub method: MethodArg,
    /// Output format: raw (default) or qcow2, written as a forward-only
    /// stream (header and tables, then data), to DEST or to standard
    /// output when DEST is `-`.
    #[arg(short = 'O', long = "output-format", value_enum, default_value = "raw")]
    pub output_format: FormatArg,
    /// Incremental copy into an existing DEST: only the ranges dirty in the
    /// persistent bitmap NAME (a qcow2 bitmap, or the NBD context
    /// `qemu:dirty-bitmap:NAME`); dirty data is copied, dirty unallocated
    /// ranges are zeroed, the rest of DEST is left alone.
    #[arg(long, value_name = "NAME")]
    pub bitmap: Option<String>,
    #[command(flatten)]
    pub flash: FlashArgs,
    /// Bytes per work item and per worker buffer, 4k to 1G (default: 1M
    /// from a raw file or device or from NBD, 256k otherwise, and 4M while
    /// the page cache holds none of a local source's data).
    #[arg(long, value_parser = parse_size)]
    pub chunk_size: Option<u64>,
}

impl Args {
    /// Refuses what clap cannot see: `--json` with DEST `-`, where the
    /// image itself goes to standard output.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.json && self.dest == "-" {
            anyhow::bail!("--json prints on standard output, where DEST `-` writes the image");
        }
        Ok(())
    }

    /// The copy the command line asks for.
    pub fn request(&self) -> Request {
        Request {
            jobs: self.jobs,
            chunk_size: self.chunk_size,
            no_sparse: self.no_sparse,
            sparse_block: self.sparse_size,
            method: self.method.into(),
            skip: self.skip,
            length: self.length,
            offset: self.offset,
            no_create: self.no_create,
            bitmap: self.bitmap.clone(),
            dest_is_zero: self.dest_is_zero,
            evict: self.evict.choice(),
            flush: self.flush,
            verify: self.verify,
            keep_partial: self.keep_partial,
            output: self.output_format.into(),
            size: self.flash.size,
            bmap: self.flash.bmap.clone(),
        }
    }
}
