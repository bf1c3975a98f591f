//! `copy SOURCE DEST`: copy a disk image's data, and only its data.

use std::process::ExitCode;

use anyhow::Context;
use sparsekit_cli::args::{EvictArgs, FlashArgs, FormatArg, ImageArgs, MethodArg, ProgressArgs};
use sparsekit_cli::exit::{finish, parse_args};
use sparsekit_cli::human::{copy_summary, parse_size};
use sparsekit_cli::progress::Bar;
use sparsekit_copy::{Destination, Opened, Plan, Purpose, Request, Spec, stop_on_signals};

/// Copy a disk image's data, and only its data, in parallel.
///
/// DEST is created or truncated to the size of SOURCE, holes left where
/// SOURCE has no data; a block device (zero ranges with BLKZEROOUT) or an
/// NBD export (NBD_CMD_WRITE_ZEROES) is written in place and must be large
/// enough. Nothing is created,
/// truncated or written before SOURCE, the options and DEST are checked.
#[derive(Debug, clap::Parser)]
#[command(name = "copy", version)]
struct Args {
    /// A regular file, block device, qcow2 image or raw image compressed
    /// with gzip, xz, zstd or bzip2 (all detected by magic), an NBD URI
    /// (nbd://HOST/EXPORT or nbd://HOST:PORT/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH), or `-`: standard input, read
    /// forward: a qcow2 stream, or raw bytes, compressed or not.
    source: String,
    /// A regular file (created or truncated), a block device, an NBD URI
    /// (the export is written in place: it must be writable and large
    /// enough; the rest of it is left alone), or `-`: standard output (the
    /// raw image, holes as zeros; with `-O qcow2`, a qcow2 stream).
    dest: String,
    /// The source's format, instead of detecting it: `-f raw` takes the
    /// bytes as they are (no qcow2 or compression magic looked for).
    #[arg(short = 'f', long, value_enum)]
    format: Option<FormatArg>,
    #[command(flatten)]
    image: ImageArgs,
    /// Worker threads (default: four per core, between 4 and 16; from NBD,
    /// one per connection, up to 4).
    #[arg(short = 'j', long)]
    jobs: Option<usize>,
    #[command(flatten)]
    progress: ProgressArgs,
    /// Write at this offset of DEST, keeping the rest of it (`--offset 0`
    /// too: DEST is then updated in place, never truncated).
    #[arg(long, value_parser = parse_size)]
    offset: Option<u64>,
    /// Skip this many bytes of SOURCE.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    skip: u64,
    /// Copy only this many bytes of SOURCE, from --skip on.
    #[arg(long, value_parser = parse_size)]
    length: Option<u64>,
    /// Write into an existing DEST without creating or truncating it.
    #[arg(short = 'n')]
    no_create: bool,
    /// After copying, compare DEST with SOURCE and fail on any difference.
    #[arg(long)]
    verify: bool,
    /// Leave holes for all-zero 4 KiB blocks of data (default for files).
    #[arg(long, overrides_with = "no_sparse")]
    sparse: bool,
    /// Write every byte of data, zero or not.
    #[arg(long)]
    no_sparse: bool,
    /// DEST already reads as zeros: do not zero anything on it.
    #[arg(long, alias = "target-is-zero")]
    dest_is_zero: bool,
    #[command(flatten)]
    evict: EvictArgs,
    /// Flush DEST to stable storage at the end (always done for devices
    /// and NBD exports).
    #[arg(long)]
    flush: bool,
    /// Keep a DEST this copy created when the copy fails (by default it is
    /// removed, so that nothing incomplete looks like a copy).
    #[arg(long)]
    keep_partial: bool,
    /// How data is moved.
    #[arg(long, value_enum, default_value = "auto")]
    method: MethodArg,
    /// Output format: raw (default) or qcow2, written as a forward-only
    /// stream (header and tables, then data), to DEST or to standard
    /// output when DEST is `-`.
    #[arg(short = 'O', long = "output-format", value_enum, default_value = "raw")]
    output_format: FormatArg,
    /// Incremental copy into an existing DEST: only the ranges dirty in the
    /// persistent bitmap NAME (a qcow2 bitmap, or the NBD context
    /// `qemu:dirty-bitmap:NAME`); dirty data is copied, dirty unallocated
    /// ranges are zeroed, the rest of DEST is left alone.
    #[arg(long, value_name = "NAME")]
    bitmap: Option<String>,
    #[command(flatten)]
    flash: FlashArgs,
    /// Bytes per work item and per worker buffer, 4k to 1G (default: 1M
    /// from a raw file or device or from NBD, 256k otherwise).
    #[arg(long, value_parser = parse_size)]
    chunk_size: Option<u64>,
}

fn main() -> ExitCode {
    match parse_args::<Args>() {
        Ok(args) => finish("copy", run(args)),
        Err(code) => code,
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let stop = stop_on_signals().context("installing signal handlers")?;
    let request = request(&args);
    let open = request.source_options(args.image.open_options(args.format, Purpose::Copy));
    let source = Opened::open(&Spec::parse(&args.source)?, &open)?;
    let dest = Destination::open(&Spec::parse(&args.dest)?, &request.dest_options(&open))?;
    let plan = Plan::new(source, dest, &request)?;
    let (from, to) = (
        plan.source().name().to_owned(),
        plan.dest().name().to_owned(),
    );
    let bar = Bar::new(args.progress.show(), "copy");
    let report = plan.execute(&bar, stop);
    bar.finish();
    let report = report.with_context(|| format!("{from} -> {to}"))?;
    eprintln!("copy: {}", copy_summary(&from, &to, &report));
    if report.verified {
        eprintln!("copy: verified: {to} is identical to {from}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The copy the command line asks for.
fn request(args: &Args) -> Request {
    Request {
        jobs: args.jobs,
        chunk_size: args.chunk_size,
        no_sparse: args.no_sparse,
        method: args.method.into(),
        skip: args.skip,
        length: args.length,
        offset: args.offset,
        no_create: args.no_create,
        bitmap: args.bitmap.clone(),
        dest_is_zero: args.dest_is_zero,
        evict: args.evict.choice(),
        flush: args.flush,
        verify: args.verify,
        keep_partial: args.keep_partial,
        output: args.output_format.into(),
        size: args.flash.size,
        bmap: args.flash.bmap.clone(),
    }
}
