//! `qcow2-info IMAGE`: what a qcow2 image is, how much of it is allocated,
//! whether it is consistent.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use flate2::Compression;
use flate2::write::ZlibEncoder;
use serde_json::Value;
use sparsekit_cli::exit::{finish, parse_args};
use sparsekit_cli::human::format_size;
use sparsekit_cli::info::{allocation, size_line, write_check, write_tree};
use sparsekit_cli::source::ImageOptions;
use sparsekit_qcow2::{ChainInfo, Image, Qcow2};

/// Show what a qcow2 image is, how much of it is allocated, and whether it
/// is consistent.
#[derive(Debug, clap::Parser)]
#[command(name = "qcow2-info", version)]
#[command(group = clap::ArgGroup::new("mode").args(["bitmap", "allocated", "check"]))]
struct Args {
    /// The qcow2 image.
    image: PathBuf,
    #[command(flatten)]
    open: ImageOptions,
    /// JSON value-equal to `qemu-img info --output=json` (with --check: to
    /// `qemu-img check --output=json`), plus an `allocation` object.
    #[arg(long)]
    json: bool,
    /// One entry per image of the backing chain, as qemu-img does.
    #[arg(long)]
    backing_chain: bool,
    /// Write the allocation bitmap: one bit per cluster of the virtual
    /// disk, bit i%8 of byte i/8 set when cluster i has host data in this
    /// image.
    #[arg(long)]
    bitmap: bool,
    /// With --bitmap: compress it with zlib.
    #[arg(long, requires = "bitmap")]
    zlib: bool,
    /// With --bitmap: write it to FILE instead of standard output.
    #[arg(long, requires = "bitmap", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Print allocated clusters × cluster size, as a plain number.
    #[arg(long)]
    allocated: bool,
    /// Check consistency like `qemu-img check`: exit status 0 clean,
    /// 2 corruption, 3 leaks only, 1 the check could not run.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    match parse_args::<Args>() {
        Ok(args) => finish("qcow2-info", run(args)),
        Err(code) => code,
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut out = BufWriter::new(io::stdout().lock());
    let open_top = |p: &Path| {
        if args.open.untrusted {
            Qcow2::open_untrusted(p)
        } else {
            Qcow2::open(p)
        }
    };
    if args.bitmap {
        let q = open_top(&args.image)?;
        write_bitmap(&q, args.zlib, args.output.as_deref(), &mut out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.allocated {
        let q = open_top(&args.image)?;
        writeln!(out, "{}", q.allocated_bytes()?)?;
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.check {
        let r = Qcow2::check_path(&args.image, &args.open.chain())?;
        if args.json {
            serde_json::to_writer_pretty(&mut out, &r)?;
            writeln!(out)?;
        } else {
            write_check(&mut out, &r)?;
        }
        out.flush()?;
        return Ok(ExitCode::from(r.exit_code() as u8));
    }
    let entries: Vec<(Value, Option<Value>)> = if args.backing_chain {
        let img = Image::open_with(&args.image, &args.open.chain())?;
        img.info_chain()?
            .into_iter()
            .zip(img.layers())
            .map(|(info, layer)| {
                let alloc = match layer {
                    sparsekit_qcow2::Layer::Qcow2(q) => Some(allocation_of(q)?),
                    sparsekit_qcow2::Layer::Raw(_) => None,
                };
                let v = match info {
                    ChainInfo::Qcow2(i) => serde_json::to_value(i)?,
                    ChainInfo::Raw(r) => serde_json::to_value(r)?,
                };
                Ok((v, alloc))
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        let q = open_top(&args.image)?;
        vec![(serde_json::to_value(q.info()?)?, Some(allocation_of(&q)?))]
    };
    if args.json {
        let mut values: Vec<Value> = entries
            .into_iter()
            .map(|(mut v, alloc)| {
                if let (Some(a), Some(m)) = (alloc, v.as_object_mut()) {
                    m.insert("allocation".into(), a);
                }
                v
            })
            .collect();
        if args.backing_chain {
            serde_json::to_writer_pretty(&mut out, &values)?;
        } else {
            serde_json::to_writer_pretty(&mut out, &values.remove(0))?;
        }
        writeln!(out)?;
    } else {
        for (i, (v, alloc)) in entries.iter().enumerate() {
            if i > 0 {
                writeln!(out)?;
            }
            write_human(&mut out, v, alloc.as_ref())?;
        }
    }
    out.flush().context("writing to standard output")?;
    Ok(ExitCode::SUCCESS)
}

fn allocation_of(q: &Qcow2) -> anyhow::Result<Value> {
    let allocated = q.write_allocation_bitmap(&mut io::sink())?;
    let clusters = q.virtual_size().div_ceil(q.cluster_size());
    Ok(allocation(clusters, allocated, q.cluster_size()))
}

fn write_bitmap(
    q: &Qcow2,
    zlib: bool,
    output: Option<&Path>,
    stdout: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut file;
    let sink: &mut dyn Write = match output {
        Some(p) => {
            file = BufWriter::new(
                File::create(p).with_context(|| format!("{}: creating", p.display()))?,
            );
            &mut file
        }
        None => {
            if io::stdout().is_terminal() {
                bail!(
                    "the allocation bitmap is binary: redirect standard output or use --output FILE"
                );
            }
            stdout
        }
    };
    if zlib {
        let mut z = ZlibEncoder::new(sink, Compression::default());
        q.write_allocation_bitmap(&mut z)?;
        z.finish()
            .context("writing the compressed bitmap")?
            .flush()?;
    } else {
        q.write_allocation_bitmap(sink)?;
        sink.flush().context("writing the bitmap")?;
    }
    Ok(())
}

/// A `qemu-img info`-like summary from the JSON of one layer.
fn write_human(w: &mut impl Write, v: &Value, alloc: Option<&Value>) -> anyhow::Result<()> {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    writeln!(w, "image: {}", s("filename"))?;
    writeln!(w, "file format: {}", s("format"))?;
    writeln!(w, "{}", size_line("virtual size", n("virtual-size")))?;
    writeln!(w, "disk size: {}", format_size(n("actual-size")))?;
    if v.get("cluster-size").is_some() {
        writeln!(w, "cluster_size: {}", n("cluster-size"))?;
    }
    if let Some(b) = v["backing-filename"].as_str() {
        writeln!(
            w,
            "backing file: {b} (actual path: {})",
            s("full-backing-filename")
        )?;
    }
    if let Some(f) = v["backing-filename-format"].as_str() {
        writeln!(w, "backing file format: {f}")?;
    }
    if let Some(snaps) = v["snapshots"].as_array() {
        writeln!(w, "Snapshot list:")?;
        writeln!(
            w,
            "ID        TAG               VM SIZE                DATE     VM CLOCK"
        )?;
        for sn in snaps {
            writeln!(
                w,
                "{:<9} {:<17} {:>7} {:>20} {:>12}",
                sn["id"].as_str().unwrap_or(""),
                sn["name"].as_str().unwrap_or(""),
                format_size(sn["vm-state-size"].as_u64().unwrap_or(0)),
                sn["date-sec"].as_u64().unwrap_or(0),
                sn["vm-clock-sec"].as_u64().unwrap_or(0)
            )?;
        }
    }
    if let Some(fs) = v.get("format-specific") {
        writeln!(w, "Format specific information:")?;
        write_tree(w, &fs["data"], 4)?;
    }
    if let Some(a) = alloc {
        let clusters = a["clusters"].as_u64().unwrap_or(0);
        let allocated = a["allocated-clusters"].as_u64().unwrap_or(0);
        let pct = if clusters == 0 {
            0.0
        } else {
            allocated as f64 * 100.0 / clusters as f64
        };
        writeln!(w, "Allocation:")?;
        writeln!(
            w,
            "    allocated clusters: {allocated} of {clusters} ({}, {pct:.2}%)",
            format_size(a["allocated-bytes"].as_u64().unwrap_or(0))
        )?;
    }
    Ok(())
}
