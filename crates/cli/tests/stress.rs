//! Integrity stress (issue 7): thousands of random sparse layouts through
//! raw→raw copies, qcow2→raw copies of images qemu-img and qemu-io made,
//! and qcow2 stream round trips (export, then import), every byte checked
//! against an in-memory model of what the source reads as, and every copy
//! also checked by `verify` (what `copy --verify` runs).
//!
//! Layouts come from a seeded generator; a failure names the seed and the
//! layout, and `SPARSEKIT_STRESS_SEED=N` replays one. `SPARSEKIT_STRESS_SCALE`
//! multiplies the counts (default 1: 2,000 raw, 300 qcow2, 2,000 stream).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use sparsekit_copy::{
    Destination, Format, Method, NoProgress, OpenOptions, Opened, Output, Plan, Request, Spec,
};
use sparsekit_testkit::{Rng, require};

/// Scratch folders: tmpfs (SEEK_DATA, no disk I/O) for most layouts, and
/// the build's own file system (FIEMAP; ext4 on the development machine)
/// for every 16th, where mapping a file flushes it and costs milliseconds.
struct Dirs {
    memory: tempfile::TempDir,
    disk: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Self {
        let shm = Path::new("/dev/shm");
        let memory = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        };
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"));
        Dirs {
            memory: memory.unwrap(),
            disk: tempfile::tempdir_in(target).unwrap(),
        }
    }

    fn for_seed(&self, seed: u64) -> &Path {
        if seed.is_multiple_of(16) {
            self.disk.path()
        } else {
            self.memory.path()
        }
    }
}

static ZEROS: [u8; 512] = [0; 512];

/// One operation of a layout, applied to the file and to the model.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Data: a byte pattern derived from the fill byte and the offset.
    Write { at: u64, len: u64, fill: u8 },
    /// Written zeros: allocated blocks that read as zero.
    Zeros { at: u64, len: u64 },
    /// fallocate(KEEP_SIZE): unwritten extents.
    Falloc { at: u64, len: u64 },
    /// fallocate(PUNCH_HOLE).
    Punch { at: u64, len: u64 },
}

#[derive(Debug, Clone)]
struct Layout {
    size: u64,
    ops: Vec<Op>,
}

fn pattern(fill: u8, at: u64, len: u64) -> Vec<u8> {
    // Not all one byte, so a misplaced block cannot pass as the right one;
    // never zero, so the data stays data. Filled a 512-byte block at a time
    // (memset): the tests are built without optimisation.
    let mut v = vec![0u8; len as usize];
    let mut o = at;
    while o < at + len {
        let next = ((o / 512 + 1) * 512).min(at + len);
        v[(o - at) as usize..(next - at) as usize].fill((fill ^ (o / 512) as u8).max(1));
        o = next;
    }
    v
}

/// A random layout of up to 4 MiB: a few large runs and many small ones,
/// at block-aligned and odd offsets, sizes often not a multiple of 512.
fn layout(rng: &mut Rng) -> Layout {
    let size = match rng.below(4) {
        0 => 1 + rng.below(64 << 10),
        1 => (1 + rng.below(64)) << 16,
        _ => 1 + rng.below(4 << 20),
    };
    let mut ops = Vec::new();
    for _ in 0..rng.below(24) {
        let at = if rng.chance(50) {
            rng.below(size) / 4096 * 4096
        } else {
            rng.below(size)
        };
        let max = if rng.chance(80) { 64 << 10 } else { 1 << 20 };
        let len = (1 + rng.below(max)).min(size - at);
        ops.push(match rng.below(10) {
            0..=5 => Op::Write {
                at,
                len,
                fill: rng.next_u64() as u8,
            },
            6 => Op::Zeros { at, len },
            7 | 8 => Op::Falloc { at, len },
            _ => Op::Punch { at, len },
        });
    }
    Layout { size, ops }
}

/// Writes `l` to `path` and returns what it reads as.
fn make_raw(path: &Path, l: &Layout) -> Vec<u8> {
    let f = File::create(path).unwrap();
    f.set_len(l.size).unwrap();
    let mut model = vec![0u8; l.size as usize];
    for &op in &l.ops {
        use nix::fcntl::{FallocateFlags as F, fallocate};
        match op {
            Op::Write { at, len, fill } => {
                let p = pattern(fill, at, len);
                f.write_all_at(&p, at).unwrap();
                model[at as usize..(at + len) as usize].copy_from_slice(&p);
            }
            Op::Zeros { at, len } => {
                f.write_all_at(&vec![0; len as usize], at).unwrap();
                model[at as usize..(at + len) as usize].fill(0);
            }
            Op::Falloc { at, len } => {
                fallocate(&f, F::FALLOC_FL_KEEP_SIZE, at as i64, len as i64).unwrap();
            }
            Op::Punch { at, len } => {
                fallocate(
                    &f,
                    F::FALLOC_FL_PUNCH_HOLE | F::FALLOC_FL_KEEP_SIZE,
                    at as i64,
                    len as i64,
                )
                .unwrap();
                model[at as usize..(at + len) as usize].fill(0);
            }
        }
    }
    model
}

fn scale() -> u64 {
    std::env::var("SPARSEKIT_STRESS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// The seeds to run: one from the environment, or `count` from `base`.
fn seeds(base: u64, count: u64) -> Vec<u64> {
    match std::env::var("SPARSEKIT_STRESS_SEED") {
        Ok(s) => vec![s.parse().expect("SPARSEKIT_STRESS_SEED is a number")],
        Err(_) => (base..base + count * scale()).collect(),
    }
}

/// Random options: workers, chunk size, method, zero detection.
fn options(rng: &mut Rng) -> Request {
    Request {
        jobs: Some(1 + rng.below(6) as usize),
        chunk_size: Some(1 << (12 + rng.below(11))),
        no_sparse: !rng.chance(70),
        method: match rng.below(3) {
            0 => Method::Auto,
            1 => Method::ReadWrite,
            _ => Method::CopyFileRange,
        },
        // -S: 512 B to 16 MiB, aligned in DEST and cut at chunk edges.
        sparse_block: rng.chance(30).then(|| 512 << rng.below(16)),
        ..Request::default()
    }
}

/// Plans and runs a copy of `source` into `dst` as `req` asks.
fn execute(source: Opened, dst: &Path, req: &Request, what: &str) -> sparsekit_copy::Report {
    let dest = Destination::inspect(&Spec::Path(dst.into()))
        .unwrap_or_else(|e| panic!("{what}: inspecting the destination: {e}"));
    let plan = Plan::new(source, dest, req).unwrap_or_else(|e| panic!("{what}: planning: {e}"));
    plan.execute(&NoProgress, &AtomicBool::new(false))
        .unwrap_or_else(|e| panic!("{what}: copy failed: {e}: {}", e.error))
}

/// Copies `src` (as `format`) to `dst`, verifying it as `copy --verify`
/// does, then compares every byte with `model`.
fn copy_and_check(src: &Path, format: Format, dst: &Path, req: &Request, model: &[u8], what: &str) {
    let open = OpenOptions {
        format: Some(format),
        ..OpenOptions::default()
    };
    let source =
        Opened::open(&Spec::Path(src.into()), &open).unwrap_or_else(|e| panic!("{what}: {e}"));
    let req = Request {
        verify: true,
        ..req.clone()
    };
    let report = execute(source, dst, &req, what);
    assert_eq!(report.stats.total, model.len() as u64, "{what}");
    assert!(report.verified, "{what}");
    let got = std::fs::read(dst).unwrap();
    assert_eq!(got.len(), model.len(), "{what}: destination size");
    if got != model {
        let i = got.iter().zip(model).position(|(a, b)| a != b);
        panic!("{what}: first difference at byte {i:?}");
    }
}

#[test]
fn raw_to_raw_layouts() {
    let dirs = Dirs::new();
    let seeds = seeds(1, 2000);
    for &seed in &seeds {
        let dir = dirs.for_seed(seed);
        let (src, dst) = (dir.join("src.raw"), dir.join("dst.raw"));
        let mut rng = Rng(seed);
        let l = layout(&mut rng);
        let model = make_raw(&src, &l);
        let opts = options(&mut rng);
        let what = format!("seed {seed}: {l:?} with {opts:?}");
        copy_and_check(&src, Format::Raw, &dst, &opts, &model, &what);
    }
    eprintln!("raw→raw: {} layouts copied and verified", seeds.len());
}

/// qemu-img turns a raw layout into a qcow2 image with random options,
/// qemu-io then writes data and zeros into it; the copy must read as the
/// model, and as `qemu-img convert -O raw` (checked on every tenth).
#[test]
fn qcow2_to_raw_layouts() {
    let qemu_img = require("qemu-img");
    let qemu_io = require("qemu-io");
    let dirs = Dirs::new();
    let seeds = seeds(100_000, 300);
    for &seed in &seeds {
        let dir = dirs.for_seed(seed);
        let raw = dir.join("src.raw");
        let img = dir.join("src.qcow2");
        let dst = dir.join("dst.raw");
        let oracle = dir.join("oracle.raw");
        let mut rng = Rng(seed);
        let l = layout(&mut rng);
        let mut model = make_raw(&raw, &l);
        // qemu-img rounds a raw size up to 512 bytes.
        model.resize(l.size.next_multiple_of(512) as usize, 0);
        let cluster = [512u64, 4096, 65536, 2 << 20][rng.below(4) as usize];
        let extended = cluster >= 16384 && rng.chance(30);
        let mut o = format!("cluster_size={cluster}");
        if extended {
            o.push_str(",extended_l2=on");
        }
        if rng.chance(30) {
            o.push_str(",compression_type=");
            o.push_str(if rng.chance(50) { "zstd" } else { "zlib" });
        }
        let mut convert = Command::new(&qemu_img);
        convert.args(["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", &o]);
        if rng.chance(30) {
            convert.arg("-c");
        }
        let out = convert.arg(&raw).arg(&img).output().unwrap();
        assert!(
            out.status.success(),
            "seed {seed}: qemu-img convert: {out:?}"
        );
        // Writes after the conversion: data, plain zero writes (zero
        // clusters or allocated zeros) and unmapping ones.
        let mut io = Command::new(&qemu_io);
        io.args(["-f", "qcow2"]);
        let mut cmds = Vec::new();
        for _ in 0..rng.below(8) {
            let at = rng.below(l.size);
            let len = (1 + rng.below(256 << 10)).min(l.size - at);
            if rng.chance(50) {
                let fill = (rng.below(255) + 1) as u8;
                cmds.push(format!("write -q -P {fill} {at} {len}"));
                model[at as usize..(at + len) as usize].fill(fill);
            } else {
                let unmap = if rng.chance(50) { "-u " } else { "" };
                cmds.push(format!("write -q -z {unmap}{at} {len}"));
                model[at as usize..(at + len) as usize].fill(0);
            }
        }
        for c in &cmds {
            io.args(["-c", c]);
        }
        if !cmds.is_empty() {
            let out = io.arg(&img).output().unwrap();
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "seed {seed}: qemu-io {cmds:?}: {out:?}"
            );
        }
        let opts = options(&mut rng);
        let what = format!("seed {seed}: {l:?}, qcow2 {o}, qemu-io {cmds:?}, {opts:?}");
        if seed.is_multiple_of(10) {
            let out = Command::new(&qemu_img)
                .args(["convert", "-q", "-O", "raw"])
                .arg(&img)
                .arg(&oracle)
                .output()
                .unwrap();
            assert!(out.status.success(), "{what}: qemu-img convert -O raw");
            assert!(
                std::fs::read(&oracle).unwrap() == model,
                "{what}: model differs from qemu-img"
            );
        }
        copy_and_check(&img, Format::Qcow2, &dst, &opts, &model, &what);
    }
    eprintln!("qcow2→raw: {} images copied and verified", seeds.len());
}

/// raw → qcow2 stream (export) → raw (import), in memory.
#[test]
fn stream_round_trip_layouts() {
    let dirs = Dirs::new();
    let seeds = seeds(200_000, 2000);
    for &seed in &seeds {
        let dir = dirs.for_seed(seed);
        let (src, dst) = (dir.join("src.raw"), dir.join("dst.raw"));
        let stream = dir.join("stream.qcow2");
        let mut rng = Rng(seed);
        let l = layout(&mut rng);
        let model = make_raw(&src, &l);
        let cluster_bits = 9 + rng.below(13) as u32;
        let opts = Request {
            chunk_size: Some(1 << (12 + rng.below(9))),
            jobs: Some(1 + rng.below(4) as usize),
            no_sparse: !rng.chance(70),
            ..Request::default()
        };
        let what = format!("seed {seed}: {l:?}, cluster_bits {cluster_bits}, {opts:?}");
        let source = Opened::open(&Spec::Path(src.clone()), &OpenOptions::default()).unwrap();
        let export = Request {
            output: Output::Qcow2 { cluster_bits },
            ..opts.clone()
        };
        execute(source, &stream, &export, &what);
        let reader = Box::new(File::open(&stream).unwrap());
        let source = Opened::stream(reader, "stream")
            .unwrap_or_else(|e| panic!("{what}: stream header: {e}"));
        let size = source.size();
        assert_eq!(size, l.size.next_multiple_of(512), "{what}");
        execute(source, &dst, &opts, &what);
        let got = std::fs::read(&dst).unwrap();
        assert_eq!(got.len() as u64, size, "{what}");
        assert!(got[..model.len()] == model[..], "{what}: bytes differ");
        let pad = &got[model.len()..];
        assert!(pad == &ZEROS[..pad.len()], "{what}: padding");
    }
    eprintln!("stream round trips: {} layouts", seeds.len());
}
