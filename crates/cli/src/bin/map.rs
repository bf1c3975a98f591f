//! `map SOURCE`: where the data of a file, block device or image is.

use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use sparsekit_cli::exit::{finish, parse_args};
use sparsekit_cli::human::{Table, format_size, parse_size};
use sparsekit_cli::nbdinfo;
use sparsekit_cli::prefetch::prefetch;
use sparsekit_cli::qemu::{self, JsonMapError, Merge};
use sparsekit_cli::source::{self, Format, ImageOptions, Source};
use sparsekit_copy::{NbdSource, Source as _};
use sparsekit_extent::ExtentIterExt;
use sparsekit_fiemap::{FileKind, Mapper};
use sparsekit_qcow2::Image;

/// Show where the data of a file, block device or disk image is.
#[derive(Debug, clap::Parser)]
#[command(name = "map", version)]
struct Args {
    /// A regular file, block device or qcow2 image (the format is detected
    /// by magic), or an NBD URI (nbd://HOST/EXPORT or nbd://HOST:PORT/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH).
    source: String,
    /// Print a JSON array value-equal to `qemu-img map --output=json`
    /// (with --bitmap: to `nbdinfo --map=qemu:dirty-bitmap:NAME --json`).
    #[arg(long)]
    json: bool,
    /// The image format, instead of detecting it.
    #[arg(short = 'f', long, value_enum)]
    format: Option<Format>,
    #[command(flatten)]
    image: ImageOptions,
    /// First byte to map (qemu-img's --start-offset); k, M, G, T suffixes.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    start: u64,
    /// Bytes to map from --start (qemu-img's --max-length).
    #[arg(long, value_parser = parse_size)]
    length: Option<u64>,
    /// Map the persistent dirty bitmap NAME of a qcow2 image, read offline,
    /// as `qemu-nbd -B NAME` would export it (on an NBD source: the context
    /// `qemu:dirty-bitmap:NAME`).
    #[arg(long, value_name = "NAME", conflicts_with = "context")]
    bitmap: Option<String>,
    /// NBD: map this meta context (e.g. `qemu:dirty-bitmap:NAME`,
    /// `qemu:allocation-depth`); with --json as `nbdinfo --map=CTX --json`.
    #[arg(long, value_name = "CTX")]
    context: Option<String>,
}

fn main() -> ExitCode {
    match parse_args::<Args>() {
        Ok(args) => finish("map", run(args)),
        Err(code) => code,
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let path = source::local_path(&args.source);
    let context = args.context.clone().or_else(|| {
        source::is_nbd_uri(&args.source)
            .then(|| {
                args.bitmap
                    .as_ref()
                    .map(|b| format!("qemu:dirty-bitmap:{b}"))
            })
            .flatten()
    });
    let src = source::open(
        &args.source,
        args.format,
        &args.image,
        context.as_slice(),
        // Mapping needs the status connection alone.
        0,
    )?;
    let mut out = BufWriter::with_capacity(1 << 16, io::stdout().lock());
    if let Source::Nbd(n) = &src {
        map_nbd(&args, n, context.as_deref(), &mut out)?;
        out.flush().context("writing to standard output")?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.context.is_some() {
        bail!(
            "{}: --context maps a meta context of an NBD export; this is a local file",
            path.display()
        );
    }
    match (&src, &args.bitmap) {
        (Source::Qcow2(img), Some(name)) => map_bitmap(&args, &path, img, name, &mut out)?,
        (Source::Raw(_), Some(_)) => bail!(
            "{}: --bitmap reads a persistent bitmap of a qcow2 image; this is a raw file",
            path.display()
        ),
        (Source::Raw(m), None) => map_raw(&args, &path, m, &mut out)?,
        (Source::Qcow2(img), None) => map_qcow2(&args, &path, img, &mut out)?,
        (Source::Nbd(_), _) => unreachable!("handled above"),
    }
    out.flush().context("writing to standard output")?;
    Ok(ExitCode::SUCCESS)
}

fn stopped(path: &Path, offset: u64) -> String {
    format!("{}: map stopped at offset {offset:#x}", path.display())
}

/// `--json` for any source: the entries, or the error that stopped them.
fn json<E>(
    out: &mut impl Write,
    path: &Path,
    start: u64,
    entries: impl Iterator<Item = Result<qemu::MapEntry, E>>,
) -> anyhow::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match qemu::write_json_map(out, entries, start) {
        Ok(_) => Ok(()),
        Err(JsonMapError::Io(e)) => Err(e).context("writing to standard output"),
        Err(JsonMapError::Source(e)) => {
            out.flush().ok();
            Err(e).context(stopped(path, start))
        }
    }
}

fn map_raw(args: &Args, path: &Path, mapper: &Mapper, out: &mut impl Write) -> anyhow::Result<()> {
    if args.json {
        let vsize = qemu::raw_virtual_size(mapper.size());
        let range = qemu::clamp_range(args.start, args.length, vsize);
        return prefetch(mapper.extents(range.clone()), |extents| {
            json(
                out,
                path,
                args.start,
                qemu::raw_entries(extents, mapper.size(), range),
            )
        });
    }
    let range = qemu::clamp_range(args.start, args.length, mapper.size());
    writeln!(
        out,
        "{}: raw {}, {} ({} bytes), mapped with {}",
        path.display(),
        match mapper.kind() {
            FileKind::Regular => "file",
            FileKind::BlockDevice => "block device",
        },
        format_size(mapper.size()),
        mapper.size(),
        mapper.method()
    )?;
    let mut table = Table::new(out, false)?;
    let failed = prefetch(mapper.extents(range.clone()), |extents| {
        for e in extents {
            match e {
                Ok(e) => table.row(&e, None, 0)?,
                Err(err) => return Ok::<_, io::Error>(Some(err)),
            }
        }
        Ok(None)
    })?;
    finish_table(table, path, range.start, failed)
}

fn map_qcow2(args: &Args, path: &Path, img: &Image, out: &mut impl Write) -> anyhow::Result<()> {
    let vsize = img.virtual_size();
    let range = qemu::clamp_range(args.start, args.length, vsize);
    let entries = img
        .map(range.clone())
        .with_context(|| stopped(path, range.start))?;
    if args.json {
        return prefetch(entries, |entries| {
            json(out, path, args.start, Merge::new(entries))
        });
    }
    let top = img.top();
    writeln!(
        out,
        "{}: qcow2 v{}, {} ({} bytes), cluster size {}, {}",
        path.display(),
        top.header().version,
        format_size(vsize),
        vsize,
        format_size(top.cluster_size()),
        match img.backing_depth() {
            0 => "no backing file".to_string(),
            n => format!("backing chain of {n}"),
        }
    )?;
    let mut table = Table::new(out, true)?;
    let failed = prefetch(entries, |entries| {
        for e in Merge::new(entries) {
            match e {
                Ok(e) => table.row(&e.to_extent(), e.offset, e.depth)?,
                Err(err) => return Ok::<_, io::Error>(Some(err)),
            }
        }
        Ok(None)
    })?;
    finish_table(table, path, range.start, failed)
}

/// The summary line, or the error that stopped the table.
fn finish_table<W: Write, E>(
    table: Table<W>,
    path: &Path,
    start: u64,
    failed: Option<E>,
) -> anyhow::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let (mut out, totals) = table.into_inner();
    if let Some(err) = failed {
        out.flush().ok();
        let at = start + totals.data + totals.zero + totals.hole;
        return Err(err).context(stopped(path, at));
    }
    writeln!(out, "{}", totals.summary())?;
    Ok(())
}

fn map_bitmap(
    args: &Args,
    path: &Path,
    img: &Image,
    name: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let range = qemu::clamp_range(args.start, args.length, img.virtual_size());
    let dirty = img
        .top()
        .dirty_ranges(name)
        .with_context(|| format!("{}: bitmap {name:?}", path.display()))?;
    let extents = nbdinfo::bitmap_extents(dirty, range)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: reading bitmap {name:?}", path.display()))?;
    let entries = sparsekit_nbd::map::nbdinfo_map(&format!("qemu:dirty-bitmap:{name}"), extents);
    if args.json {
        nbdinfo::write_json(out, &entries)?;
    } else {
        let dirty: u64 = entries
            .iter()
            .filter(|e| e.kind == 1)
            .map(|e| e.length)
            .sum();
        writeln!(
            out,
            "{}: bitmap {name}, {} dirty of {}",
            path.display(),
            format_size(dirty),
            format_size(img.virtual_size())
        )?;
        nbdinfo::write_table(out, &entries)?;
    }
    Ok(())
}

fn map_nbd(
    args: &Args,
    src: &NbdSource,
    context: Option<&str>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let name = Path::new(src.name());
    let range = qemu::clamp_range(args.start, args.length, src.size());
    if let Some(ctx) = context {
        let extents = src
            .status(ctx, range.clone())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| stopped(name, range.start))?;
        let entries = sparsekit_nbd::map::nbdinfo_map(ctx, extents);
        if args.json {
            nbdinfo::write_json(out, &entries)?;
        } else {
            writeln!(
                out,
                "{}: {ctx}, {} ({} bytes)",
                src.name(),
                format_size(src.size()),
                src.size()
            )?;
            nbdinfo::write_table(out, &entries)?;
        }
        return Ok(());
    }
    let status = src.status(sparsekit_nbd::map::BASE_ALLOCATION, range.clone());
    if args.json {
        let entries =
            Merge::new(status.map(|r| r.map(|e| sparsekit_nbd::map::qemu_img_map_entry(&e))));
        return json(out, name, args.start, entries);
    }
    writeln!(
        out,
        "{}: NBD export, {} ({} bytes)",
        src.name(),
        format_size(src.size()),
        src.size()
    )?;
    let mut table = Table::new(out, false)?;
    let mut failed = None;
    for e in status.map(|r| r.map(|e| e.to_extent())).coalesce() {
        match e {
            Ok(e) => table.row(&e, None, 0)?,
            Err(err) => {
                failed = Some(err);
                break;
            }
        }
    }
    finish_table(table, name, range.start, failed)
}
