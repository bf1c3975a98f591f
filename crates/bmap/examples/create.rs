//! `cargo run --release -p sparsekit-bmap --example create -- IMAGE [OUT]`:
//! the bmap of IMAGE as `bmaptool create -o OUT IMAGE` writes it (to
//! stdout without OUT), from the file's FIEMAP extents; the time taken goes
//! to stderr. `--hash-speed MIB` instead hashes MIB mebibytes of memory with
//! SHA-256 on one thread and prints the throughput.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use sparsekit_bmap::{ChecksumType, Creator, Hasher};
use sparsekit_extent::Kind;
use sparsekit_fiemap::Mapper;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--hash-speed") {
        let mib: usize = args.get(1).map_or(Ok(4096), |s| s.parse())?;
        let buf: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let start = Instant::now();
        let mut h = Hasher::new(ChecksumType::Sha256);
        for _ in 0..mib {
            h.update(&buf);
        }
        let d = h.finish();
        let s = start.elapsed().as_secs_f64();
        eprintln!(
            "sha256 of {mib} MiB on one thread: {s:.3} s, {:.0} MiB/s ({d})",
            mib as f64 / s
        );
        return Ok(());
    }
    let image = args.first().ok_or("usage: create IMAGE [OUT]")?;
    let start = Instant::now();
    let map = Mapper::open(image)?;
    let mut extents = Vec::new();
    for e in map.extents(0..map.size()) {
        let e = e?;
        if e.kind != Kind::Hole {
            extents.push(e.range());
        }
    }
    let mapped = start.elapsed();
    let f = File::open(image)?;
    let bmap = Creator::new(map.size(), extents)?
        .hash(|buf: &mut [u8], offset| f.read_exact_at(buf, offset))?;
    let xml = bmap.to_xml();
    match args.get(1) {
        Some(out) => std::fs::write(out, xml)?,
        None => print!("{xml}"),
    }
    eprintln!(
        "{} ranges, {} bytes hashed on {} threads: mapped in {:.3} s, total {:.3} s",
        bmap.ranges().len(),
        bmap.mapped_bytes(),
        rayon::current_num_threads(),
        mapped.as_secs_f64(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
