//! `map SOURCE`: where the data of a file, block device, image or NBD
//! export is.

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

use anyhow::Context;
use sparsekit_cli::cmd::map::Args;
use sparsekit_cli::exit::{finish, parse_args};
use sparsekit_cli::human::{Table, describe, format_size};
use sparsekit_cli::{nbdinfo, qemu};
use sparsekit_copy::map::{Description, MapError, clamp_range};
use sparsekit_copy::{Opened, Purpose, SourceError, Spec};

fn main() -> ExitCode {
    match parse_args::<Args>() {
        Ok(args) => finish("map", run(args)),
        Err(code) => code,
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let context = (args.context.clone())
        .or_else(|| (args.bitmap.as_ref()).map(|b| format!("qemu:dirty-bitmap:{b}")));
    let mut open = (args.nbd).apply(args.image.open_options(args.format, Purpose::Map));
    open.contexts.extend(context.clone());
    if args.bmap {
        // Ranges are hashed in parallel: one connection each.
        open.connections = sparsekit_copy::plan::nbd_connections(None);
    }
    let src = Opened::open(&Spec::parse(&args.source)?, &open)?;
    let mut out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    match &context {
        None if args.bmap => src.bmap()?.write_xml(&mut out)?,
        Some(ctx) => status(&args, &src, ctx, &mut out)?,
        None if args.json() => {
            let range = clamp_range(args.start, args.length, src.qemu_size());
            let r = src.qemu_map(range, |entries| {
                qemu::write_json_map(&mut out, entries, args.start)
            });
            if let Err(e) = r {
                out.flush().ok();
                return Err(stopped(&src, args.start, e));
            }
        }
        None => table(&args, &src, &mut out)?,
    }
    out.flush().context("writing to standard output")?;
    Ok(ExitCode::SUCCESS)
}

/// A map that stopped: a write error, or the source's error at `offset`.
fn stopped(src: &Opened, offset: u64, e: qemu::JsonMapError<SourceError>) -> anyhow::Error {
    match e {
        qemu::JsonMapError::Io(e) => anyhow::Error::new(e).context("writing to standard output"),
        qemu::JsonMapError::Source(source) => MapError::Stopped {
            name: src.name().to_owned(),
            offset,
            source,
        }
        .into(),
    }
}

/// The table for people: a line saying what the source is, one row per
/// extent, and a summary, or the error that stopped the rows.
fn table(args: &Args, src: &Opened, out: &mut impl Write) -> anyhow::Result<()> {
    let (name, size) = (src.name(), src.size());
    // A stream has no rows: say so before a header that promises them.
    src.mappable()?;
    let (head, host) = describe(name, &src.describe());
    writeln!(out, "{head}")?;
    let range = clamp_range(args.start, args.length, size);
    let mut table = Table::new(out, host)?;
    let failed = src.map_rows(range.clone(), |rows| {
        for r in rows {
            match r {
                Ok(r) => table.row(&r)?,
                Err(e) => return Ok::<_, io::Error>(Some(e)),
            }
        }
        Ok(None)
    })?;
    let (out, totals) = table.into_inner();
    if let Some(e) = failed {
        out.flush().ok();
        let at = range.start + totals.data + totals.zero + totals.hole;
        return Err(MapError::Stopped {
            name: name.to_owned(),
            offset: at,
            source: e,
        }
        .into());
    }
    writeln!(out, "{}", totals.summary())?;
    Ok(())
}

/// `--context` and `--bitmap`: a meta context's status, as nbdinfo prints
/// it.
fn status(args: &Args, src: &Opened, ctx: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let range = clamp_range(args.start, args.length, src.size());
    let extents = src.status_map(ctx, range)?;
    let entries = sparsekit_nbd::map::nbdinfo_map(ctx, extents);
    if args.json() {
        return Ok(nbdinfo::write_json(out, &entries)?);
    }
    let size = format_size(src.size());
    match (&args.bitmap, src.describe()) {
        (Some(name), Description::Qcow2 { .. }) => {
            let dirty: u64 = entries
                .iter()
                .filter(|e| e.kind == 1)
                .map(|e| e.length)
                .sum();
            let dirty = format_size(dirty);
            writeln!(
                out,
                "{}: bitmap {name}, {dirty} dirty of {size}",
                src.name()
            )?;
        }
        _ => writeln!(out, "{}: {ctx}, {size} ({} bytes)", src.name(), src.size())?,
    }
    Ok(nbdinfo::write_table(out, &entries)?)
}
