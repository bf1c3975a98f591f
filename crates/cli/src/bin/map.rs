//! `map SOURCE`: where the data of a file, block device or image is.

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

use anyhow::Context;
use sparsekit_cli::exit::{finish, parse_args};
use sparsekit_cli::human::{Table, format_size, parse_size};
use sparsekit_cli::prefetch::prefetch;
use sparsekit_cli::qemu::{self, JsonMapError};
use sparsekit_cli::source::{self, Format, Source};

/// Show where the data of a file, block device or disk image is.
#[derive(Debug, clap::Parser)]
#[command(name = "map", version)]
struct Args {
    /// A regular file or block device; its format is detected by magic.
    source: String,
    /// Print a JSON array value-equal to `qemu-img map --output=json`.
    #[arg(long)]
    json: bool,
    /// The image format, instead of detecting it.
    #[arg(short = 'f', long, value_enum)]
    format: Option<Format>,
    /// First byte to map (qemu-img's --start-offset); k, M, G, T suffixes.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    start: u64,
    /// Bytes to map from --start (qemu-img's --max-length).
    #[arg(long, value_parser = parse_size)]
    length: Option<u64>,
}

fn main() -> ExitCode {
    match parse_args::<Args>() {
        Ok(args) => finish("map", run(args)),
        Err(code) => code,
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let path = source::local_path(&args.source);
    let Source::Raw(mapper) = source::open_local(&path, args.format)?;
    let stdout = io::stdout().lock();
    let mut out = BufWriter::with_capacity(1 << 16, stdout);
    let stopped = |offset: u64| format!("{}: map stopped at offset {offset:#x}", path.display());

    if args.json {
        let vsize = qemu::raw_virtual_size(mapper.size());
        let range = qemu::clamp_range(args.start, args.length, vsize);
        let written = prefetch(mapper.extents(range.clone()), |extents| {
            let entries = qemu::raw_entries(extents, mapper.size(), range);
            qemu::write_json_map(&mut out, entries, args.start)
        });
        match written {
            Ok(_) => {}
            Err(JsonMapError::Io(e)) => return Err(e).context("writing to standard output"),
            Err(JsonMapError::Source(e)) => {
                out.flush().ok();
                return Err(e).context(stopped(args.start));
            }
        }
        out.flush().context("writing to standard output")?;
        return Ok(ExitCode::SUCCESS);
    }

    let range = qemu::clamp_range(args.start, args.length, mapper.size());
    writeln!(
        out,
        "{}: raw {}, {} ({} bytes), mapped with {}",
        path.display(),
        match mapper.kind() {
            sparsekit_fiemap::FileKind::Regular => "file",
            sparsekit_fiemap::FileKind::BlockDevice => "block device",
        },
        format_size(mapper.size()),
        mapper.size(),
        mapper.method()
    )?;
    let mut table = Table::new(out, false)?;
    let failed = prefetch(mapper.extents(range.clone()), |extents| {
        for e in extents {
            match e {
                Ok(e) => table.row(&e, None)?,
                Err(err) => return Ok::<_, io::Error>(Some(err)),
            }
        }
        Ok(None)
    })?;
    let (mut out, totals) = table.into_inner();
    if let Some(err) = failed {
        out.flush().ok();
        let at = range.start + totals.data + totals.zero + totals.hole;
        return Err(err).context(stopped(at));
    }
    writeln!(out, "{}", totals.summary())?;
    out.flush().context("writing to standard output")?;
    Ok(ExitCode::SUCCESS)
}
