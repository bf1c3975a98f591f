//! `qcow2-info IMAGE`: what a qcow2 image is, how much of it is allocated,
//! whether it is consistent.

use std::io::{self, BufWriter, Write};
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::Value;
use sparsekit_cli::args::FormatArg;
use sparsekit_cli::cmd::qcow2_info::Args;
use sparsekit_cli::exit::{finish, parse_args};
use sparsekit_cli::info::{allocation, write_bitmap, write_check, write_human};
use sparsekit_copy::{Opened, Purpose, Spec, open_local};
use sparsekit_qcow2::{ChainInfo, Layer, Qcow2};

fn main() -> ExitCode {
    match parse_args::<Args>() {
        Ok(args) => finish("qcow2-info", run(args)),
        Err(code) => code,
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut out = BufWriter::new(io::stdout().lock());
    let purpose = if args.check {
        Purpose::Check
    } else {
        Purpose::Info
    };
    let mut open = args.open.open_options(Some(FormatArg::Qcow2), purpose);
    // As qemu-img info: backing files only for --backing-chain.
    open.no_backing = args.open.no_backing || !args.backing_chain;
    if args.check {
        // Damaged tables are what a check reports, not reasons to refuse.
        let (file, chain) = open_local(&args.image, &open)?;
        let r = Qcow2::check_file(file, &args.image, &chain)?;
        if args.json() {
            serde_json::to_writer_pretty(&mut out, &r)?;
            writeln!(out)?;
        } else {
            write_check(&mut out, &r)?;
        }
        out.flush()?;
        return Ok(ExitCode::from(r.exit_code() as u8));
    }
    let src = Opened::open(&Spec::Path(args.image.clone()), &open)?;
    let Opened::Qcow2(img) = &src else {
        bail!("{}: not opened as a qcow2 image", args.image.display());
    };
    let (img, top) = (img.image(), img.image().top());
    if args.bitmap {
        write_bitmap(top, args.zlib, args.bitmap_file.as_deref(), &mut out)?;
        return Ok(ExitCode::SUCCESS);
    }
    if args.allocated {
        writeln!(out, "{}", top.allocated_bytes()?)?;
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    let infos = if args.backing_chain {
        img.info_chain()?
    } else {
        vec![ChainInfo::Qcow2(Box::new(top.info()?))]
    };
    let mut entries = Vec::new();
    for (info, layer) in infos.into_iter().zip(img.layers()) {
        let mut v = match info {
            ChainInfo::Qcow2(i) => serde_json::to_value(i)?,
            ChainInfo::Raw(r) => serde_json::to_value(r)?,
        };
        if let (Layer::Qcow2(q), Some(m)) = (layer, v.as_object_mut()) {
            m.insert("allocation".into(), allocation_of(q)?);
        }
        entries.push(v);
    }
    if args.json() {
        let v = if args.backing_chain {
            Value::from(entries)
        } else {
            entries.remove(0)
        };
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
    } else {
        for (i, v) in entries.iter().enumerate() {
            if i > 0 {
                writeln!(out)?;
            }
            write_human(&mut out, v, v.get("allocation"))?;
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
