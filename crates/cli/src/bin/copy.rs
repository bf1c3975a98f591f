//! `copy SOURCE DEST`: copy a disk image's data, and only its data.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use sparsekit_cli::exit::{finish, parse_args};
use sparsekit_cli::human::{format_size, parse_size};
use sparsekit_cli::progress::Bar;
use sparsekit_cli::source::{self, Format, ImageOptions};
use sparsekit_cli::sys::stop_on_signals;
use sparsekit_copy::{
    CopyOptions, DEFAULT_CHUNK, DestMode, Evict, Method, RawSource, Sink, copy, dest_end, verify,
};

/// Copy a disk image's data, and only its data, in parallel.
///
/// DEST is created or truncated to the size of SOURCE, holes left where
/// SOURCE has no data; a block device is written in place (zero ranges
/// with BLKZEROOUT) and must be large enough.
#[derive(Debug, clap::Parser)]
#[command(name = "copy", version)]
struct Args {
    /// A regular file, block device or qcow2 image (the format is detected
    /// by magic), an NBD URI (nbd://HOST/EXPORT or nbd://HOST:PORT/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH), or `-`: a forward-only qcow2 stream
    /// on standard input.
    source: String,
    /// A regular file (created or truncated) or a block device; `-` with
    /// `-O qcow2`: standard output.
    dest: String,
    /// The source's format, instead of detecting it.
    #[arg(short = 'f', long, value_enum)]
    format: Option<Format>,
    #[command(flatten)]
    image: ImageOptions,
    /// Worker threads (default: four per core, between 4 and 16; from NBD,
    /// one per connection, up to 4).
    #[arg(short = 'j', long)]
    jobs: Option<usize>,
    /// Show a progress bar on standard error (default: when it is a terminal).
    #[arg(long, overrides_with = "no_progress")]
    progress: bool,
    /// Never show a progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Write at this offset of DEST, keeping the rest of it (`--offset 0`
    /// too: DEST is then updated in place, never truncated).
    #[arg(long, value_parser = parse_size)]
    offset: Option<u64>,
    /// Skip this many bytes of SOURCE.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    skip: u64,
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
    #[arg(long)]
    dest_is_zero: bool,
    /// Write DEST back as the copy goes and drop its pages from the page
    /// cache once clean, as nbdcopy does: the copy recycles a small window
    /// of memory instead of filling the cache (regular files only, and only
    /// where DEST is written in pieces of 64 KiB or more). The default,
    /// from the first write, when the copy writes more data than halfway
    /// between the kernel's two dirty thresholds (vm.dirty_background_* and
    /// vm.dirty_*, where the kernel starts slowing writers) or an unknown
    /// amount (from NBD or a stream); for less, once the page cache takes
    /// writes slower than 1 GiB/s.
    #[arg(long, overrides_with = "no_evict")]
    evict: bool,
    /// Leave DEST's pages in the page cache, to be written back by the
    /// kernel (the default for copies of less data than the free-run
    /// ceiling, as long as the page cache takes writes fast).
    #[arg(long, overrides_with = "evict")]
    no_evict: bool,
    /// Flush DEST to stable storage at the end (always done for devices).
    #[arg(long)]
    flush: bool,
    /// How data is moved.
    #[arg(long, value_enum, default_value = "auto")]
    method: MethodArg,
    /// Output format: raw (default) or qcow2, written as a forward-only
    /// stream (header and tables, then data), to DEST or to standard
    /// output when DEST is `-`.
    #[arg(short = 'O', long = "output-format", value_enum, default_value = "raw")]
    output_format: Format,
    /// Incremental copy into an existing DEST: only the ranges dirty in the
    /// persistent bitmap NAME (a qcow2 bitmap, or the NBD context
    /// `qemu:dirty-bitmap:NAME`); dirty data is copied, dirty unallocated
    /// ranges are zeroed, the rest of DEST is left alone.
    #[arg(long, value_name = "NAME")]
    bitmap: Option<String>,
    /// Bytes per work item and per worker buffer (default: 256k; from NBD,
    /// 1M, read as four requests in flight).
    #[arg(long, value_parser = parse_size)]
    chunk_size: Option<u64>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum MethodArg {
    /// pread/pwrite when detecting zeros, copy_file_range otherwise.
    Auto,
    /// pread/pwrite through page-aligned buffers.
    ReadWrite,
    /// copy_file_range (reflink where the file system can).
    CopyFileRange,
}

fn main() -> ExitCode {
    match parse_args::<Args>() {
        Ok(args) => finish("copy", run(args)),
        Err(code) => code,
    }
}

/// Most connections opened to an NBD server for reading.
const NBD_CONNECTIONS: usize = 4;

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let stop = stop_on_signals().context("installing signal handlers")?;
    if let Some(c) = args.chunk_size {
        anyhow::ensure!(
            (4096..=1 << 30).contains(&c),
            "--chunk-size must be 4k to 1G"
        );
    }
    if args.source == "-" {
        return import_stream(&args, stop);
    }
    let path = source::local_path(&args.source);
    let from_nbd = source::is_nbd_uri(&args.source);
    let mut opts = options(&args, from_nbd);
    let connections = opts.jobs.min(NBD_CONNECTIONS);
    let contexts: Vec<String> = args
        .bitmap
        .iter()
        .map(|b| format!("qemu:dirty-bitmap:{b}"))
        .collect();
    let opened = source::open(
        &args.source,
        args.format,
        &args.image,
        &contexts,
        connections,
    )?;
    let source_ids = source::file_ids(&opened);
    let source = source::into_copy_source(opened, &path);
    let source = source.as_ref();

    if args.output_format == Format::Qcow2 {
        return export_stream(&args, source, &opts, stop);
    }
    anyhow::ensure!(
        args.dest != "-",
        "copy: writing raw data to standard output is not supported; use -O qcow2 for a stream"
    );
    if args.chunk_size.is_none() && source.raw_file().is_some() {
        opts.chunk_size = sparsekit_copy::RAW_CHUNK;
    }
    let dest = source::local_path(&args.dest);
    let mode = if args.bitmap.is_some() {
        // An incremental copy updates the previous full copy in place.
        let len = std::fs::metadata(&dest)
            .with_context(|| format!("{}: --bitmap updates an existing copy", dest.display()))?
            .len();
        let want = dest_end(source, &opts);
        if len < want {
            anyhow::bail!(
                "{}: is {len} bytes; the copy of {} it should be holds {want}",
                dest.display(),
                source.name()
            );
        }
        DestMode::Update
    } else if args.offset.is_some() {
        DestMode::Update
    } else {
        DestMode::Replace
    };
    let sink = Sink::open(
        &dest,
        dest_end(source, &opts),
        mode,
        args.dest_is_zero,
        &source_ids,
    )?
    .evict_written(evict(&args, |threshold| {
        source.data_bytes(opts.skip..source.size(), threshold)
    }));

    let show = show_progress(&args);
    let t = Instant::now();
    let bar = Bar::new(show, "copy");
    let stats = copy(source, &sink, &opts, &bar, stop);
    bar.finish();
    let stats = stats.with_context(|| format!("{} -> {}", source.name(), dest.display()))?;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "copy: {} -> {}: read {} bytes of data ({}), wrote {} bytes, {} bytes of zero blocks left as holes, {} bytes zero or unallocated ({}), in {:.2} s",
        source.name(),
        dest.display(),
        stats.data_read,
        format_size(stats.data_read),
        stats.data_written,
        stats.zero_detected,
        stats.unallocated,
        format_size(stats.unallocated),
        secs
    );
    if args.verify {
        let dest_src = RawSource::open(&dest)?;
        let bar = Bar::new(show, "verify");
        let r = verify(source, &dest_src, &opts, &bar, stop);
        bar.finish();
        r.with_context(|| format!("verifying {} against {}", dest.display(), source.name()))?;
        eprintln!(
            "copy: verified: {} is identical to {}",
            dest.display(),
            source.name()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The copy's options from the command line; `from_nbd` picks the
/// defaults for an NBD source.
fn options(args: &Args, from_nbd: bool) -> CopyOptions {
    // From NBD, one worker per connection (as nbdcopy: up to 4, each with
    // many requests in flight): on the 16 GiB W3 export 4 workers copied in
    // 2.1-2.3 s and 8 in 3.4-4.0 s (nbdcopy 2.5-3.0 s).
    let jobs = args.jobs.unwrap_or_else(|| {
        if from_nbd {
            NBD_CONNECTIONS
        } else {
            sparsekit_copy::default_jobs()
        }
    });
    // From NBD, an item's read goes out as several requests in flight on
    // its worker's connection: on W3, 256 KiB items (one request each)
    // copied in 4.5-4.7 s, 1 MiB ones in 3.1 s (nbdcopy 3.1 s).
    let chunk_size = args.chunk_size.map_or(
        if from_nbd {
            sparsekit_copy::NBD_CHUNK
        } else {
            DEFAULT_CHUNK
        },
        |c| c as usize,
    );
    CopyOptions {
        jobs: jobs.max(1),
        chunk_size,
        sparse: !args.no_sparse,
        method: match args.method {
            MethodArg::Auto => Method::Auto,
            MethodArg::ReadWrite => Method::ReadWrite,
            MethodArg::CopyFileRange => Method::CopyFileRange,
        },
        skip: args.skip,
        dest_offset: args.offset.unwrap_or(0),
        flush: args.flush,
        bitmap: args.bitmap.clone(),
    }
}

/// When DEST's pages are dropped as they are written back: as the last of
/// `--evict` and `--no-evict` says, else from the bytes of data the copy
/// will write (`data`, given the threshold where it may stop counting;
/// `None` if unknown) against the kernel's dirty thresholds.
fn evict(args: &Args, data: impl FnOnce(u64) -> Option<u64>) -> Evict {
    if args.evict {
        Evict::Always
    } else if args.no_evict {
        Evict::Never
    } else {
        let thresholds = sparsekit_copy::dirty_thresholds();
        let ceiling = thresholds.map_or(0, |t| t.free_run());
        sparsekit_copy::evict_by_default(data(ceiling), thresholds)
    }
}

fn show_progress(args: &Args) -> bool {
    !args.no_progress && (args.progress || std::io::stderr().is_terminal())
}

/// `copy - DEST`: a qcow2 stream on standard input to a raw DEST.
fn import_stream(args: &Args, stop: &std::sync::atomic::AtomicBool) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        matches!(args.format, None | Some(Format::Qcow2)),
        "copy: standard input is read as a qcow2 stream; -f raw does not apply"
    );
    anyhow::ensure!(
        args.bitmap.is_none() && args.offset.unwrap_or(0) == 0 && args.skip == 0,
        "copy: --bitmap, --offset and --skip do not apply to a stream"
    );
    anyhow::ensure!(
        args.output_format == Format::Raw && args.dest != "-",
        "copy: a stream on standard input is written to a raw file or device"
    );
    let opts = options(args, false);
    let stdin = std::io::stdin().lock();
    let decoder =
        sparsekit_qcow2::StreamDecoder::new(stdin).context("qcow2 stream on standard input")?;
    let dest = source::local_path(&args.dest);
    let sink = Sink::open(
        &dest,
        decoder.virtual_size(),
        DestMode::Replace,
        args.dest_is_zero,
        &[],
    )?
    .evict_written(evict(args, |_| None));
    let t = Instant::now();
    let bar = Bar::new(show_progress(args), "copy");
    let stats = sparsekit_copy::stream::import(decoder, "standard input", &sink, &opts, &bar, stop);
    bar.finish();
    let stats = stats.with_context(|| format!("standard input -> {}", dest.display()))?;
    eprintln!(
        "copy: standard input -> {}: read {} bytes of data ({}), wrote {} bytes, {} bytes of zero blocks left as holes, in {:.2} s",
        dest.display(),
        stats.data_read,
        format_size(stats.data_read),
        stats.data_written,
        stats.zero_detected,
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// `copy -O qcow2 SOURCE DEST|-`: SOURCE as a forward-only qcow2 stream.
fn export_stream(
    args: &Args,
    source: &dyn sparsekit_copy::Source,
    opts: &CopyOptions,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.bitmap.is_none() && args.offset.unwrap_or(0) == 0 && args.skip == 0 && !args.verify,
        "copy: --bitmap, --offset, --skip and --verify do not apply to -O qcow2"
    );
    let t = Instant::now();
    let bar = Bar::new(show_progress(args), "copy");
    let (name, stats) = if args.dest == "-" {
        let out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
        let r = sparsekit_copy::stream::export(
            source,
            out,
            "standard output",
            sparsekit_qcow2::DEFAULT_CLUSTER_BITS,
            opts,
            &bar,
            stop,
        );
        ("standard output".to_string(), r)
    } else {
        let dest = source::local_path(&args.dest);
        let file = std::fs::File::create(&dest)
            .with_context(|| format!("{}: creating", dest.display()))?;
        let out = std::io::BufWriter::with_capacity(1 << 20, file);
        let name = dest.display().to_string();
        let r = sparsekit_copy::stream::export(
            source,
            out,
            &name,
            sparsekit_qcow2::DEFAULT_CLUSTER_BITS,
            opts,
            &bar,
            stop,
        );
        (name, r)
    };
    bar.finish();
    let stats = stats.with_context(|| format!("{} -> {name}", source.name()))?;
    eprintln!(
        "copy: {} -> {name}: qcow2 stream of {} bytes ({} data clusters), in {:.2} s",
        source.name(),
        stats.stream_bytes,
        stats.data_clusters,
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
