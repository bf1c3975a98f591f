//! The copy workloads of issue 4: sparsekit `copy` and its peers on the
//! same sparse source, side by side in one run.
//!
//! For each workload: the bmap file is made once with `bmaptool create`
//! (untimed). Each contender then runs once untimed, which warms the page
//! cache and checks its output: byte-identical to the source (a
//! sparse-aware compare, see [`first_difference`]). `qemu-img convert -O
//! raw` is one of the contenders, so every output that passes is also
//! byte-identical to qemu-img's. A contender that writes other bytes fails
//! the bench. Then `--runs` timed rounds with the source cached (warm), then
//! `--runs` rounds with the source's pages dropped before each run (cold,
//! posix_fadvise DONTNEED). The destination is deleted before and after
//! every run, untimed.
//!
//! Whether a command flushes the destination is not taken on trust: each
//! runs once under strace on a small fixture, and the flushes aimed at the
//! destination (fsync, fdatasync, sync_file_range, syncfs, sync) are counted.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use sparsekit_testkit as testkit;

use super::{Contender, Hooks, Ratio, Stats, contender, measure, race_with, tool_version};
use crate::{display, root, sh};

/// A copy workload: a bench fixture of fixtures/manifest.toml.
struct Workload {
    id: &'static str,
    fixture: &'static str,
    what: &'static str,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        id: "W1",
        fixture: "bench-copy-8g-2k.raw",
        what: "an 8 GiB raw file with 2 GiB of data in about 2,000 extents",
    },
    Workload {
        id: "W2",
        fixture: "bench-copy-4g-200k.raw",
        what: "a 4 GiB raw file with about 200,000 small extents",
    },
];

/// The file each command copies under strace: 128 MiB with 96 MiB of data
/// in 8 extents, made in the scratch folder. Large enough that a copy which
/// writes its destination back as it goes does so, as on the workloads.
pub(super) const STRACE_SOURCE: &str = "a 128 MiB file with 96 MiB of data in 8 extents";

/// Writes the [`STRACE_SOURCE`] file at `path`.
pub(super) fn write_strace_source(path: &Path) -> anyhow::Result<()> {
    const MIB: u64 = 1 << 20;
    let f = File::create(path).with_context(|| format!("creating {}", display(path)))?;
    f.set_len(128 * MIB)?;
    // In 1 MiB pieces: a child's peak RSS counts the pages of this process
    // at its spawn, so a larger buffer would raise every peak RSS measured.
    let piece: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
    for extent in 0..8 {
        for i in 0..12 {
            f.write_all_at(&piece, extent * 16 * MIB + i * MIB)?;
        }
    }
    Ok(())
}

/// How a contender's time is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// sparsekit `copy` with its defaults: the 1.00× of the ratios.
    Sparsekit,
    /// Another way to run sparsekit `copy`.
    Variant,
    /// A peer: the verdict compares sparsekit with the best of these.
    Peer,
    /// sparsekit `copy`, then `sync` of the destination: its time until
    /// the copy is on stable storage.
    Durable,
    /// A peer, then `sync` of the destination: the durable verdict
    /// compares [`Role::Durable`] with the best of these (and of the peers
    /// that flush by themselves).
    DurablePeer,
    /// `true`: the floor of time and peak RSS.
    Baseline,
}

/// The programs the contenders run.
struct Programs {
    copy: PathBuf,
    python: PathBuf,
    port: PathBuf,
}

impl Programs {
    fn find(bin: &Path) -> anyhow::Result<Self> {
        // Debian's interpreter, the one bmaptool runs on, rather than a
        // version manager's shim first on PATH.
        let python = Some(PathBuf::from("/usr/bin/python3"))
            .filter(|p| p.is_file())
            .or_else(|| testkit::which("python3"))
            .context("python3 is not installed: install the Debian package python3")?;
        Ok(Self {
            copy: bin.join("copy"),
            python,
            port: root().join("xtask/bench/sparse_copy.py"),
        })
    }

    /// Every contender, copying `src` to `dest`; `bmap` is `src`'s bmap file.
    fn contenders(&self, src: &Path, dest: &Path, bmap: &Path) -> Vec<(Role, Contender)> {
        let jobs = sparsekit_copy::default_jobs();
        let copy = &self.copy;
        let raw: [&dyn AsRef<std::ffi::OsStr>; 6] =
            [&"qemu-img", &"convert", &"-O", &"raw", &"-f", &"raw"];
        let sparsekit = contender(
            &format!("sparsekit copy (default: -j {jobs})"),
            &[copy, &src, &dest],
        );
        let cp = contender(
            "cp --sparse=always",
            &[&"cp", &"--sparse=always", &src, &dest],
        );
        let qemu16 = contender(
            "qemu-img convert -m 16 -W",
            &[&raw[..], &[&"-m", &"16", &"-W", &src, &dest]].concat(),
        );
        let nbdcopy16 = contender(
            "nbdcopy --requests=16",
            &[&"nbdcopy", &"--requests=16", &src, &dest],
        );
        let mut all = vec![
            (Role::Sparsekit, sparsekit.clone()),
            (
                Role::Variant,
                contender("sparsekit copy -j 1", &[copy, &"-j", &"1", &src, &dest]),
            ),
            (
                Role::Variant,
                contender("sparsekit copy --flush", &[copy, &"--flush", &src, &dest]),
            ),
            (Role::Peer, cp.clone()),
            (
                Role::Peer,
                contender("qemu-img convert", &[&raw[..], &[&src, &dest]].concat()),
            ),
            (
                Role::Peer,
                contender(
                    "qemu-img convert -m 8 -W",
                    &[&raw[..], &[&"-m", &"8", &"-W", &src, &dest]].concat(),
                ),
            ),
            (Role::Peer, qemu16.clone()),
            (Role::Peer, contender("nbdcopy", &[&"nbdcopy", &src, &dest])),
            (Role::Peer, nbdcopy16.clone()),
            (
                Role::Peer,
                contender(
                    "bmaptool copy",
                    &[&"bmaptool", &"copy", &"--bmap", &bmap, &src, &dest],
                ),
            ),
            (
                Role::Peer,
                contender(
                    "filemap sparse_copy, Python port",
                    &[&self.python, &self.port, &src, &dest],
                ),
            ),
            (Role::Durable, super::durable(&sparsekit, dest)),
        ];
        for peer in [&cp, &qemu16, &nbdcopy16] {
            all.push((Role::DurablePeer, super::durable(peer, dest)));
        }
        all.push((Role::Baseline, contender("baseline: true", &[&"true"])));
        all
    }
}

/// A folder of scratch files, removed when dropped.
pub(super) struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        Self::named(".bench-copy")
    }

    /// The folder `name` in the fixtures' folder, emptied.
    pub(super) fn named(name: &str) -> anyhow::Result<Self> {
        let dir = testkit::generated_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn run(md: &mut String, bin: &Path, runs: usize) -> anyhow::Result<()> {
    let programs = Programs::find(bin)?;
    let scratch = Scratch::new()?;
    let dest = scratch.path("dest.raw");
    let log = scratch.path("stderr.txt");

    super::note("copy: which commands flush (strace)");
    let flushes = flush_report(&programs, &scratch)?;

    let _ = write!(
        md,
        "## copy: the workloads of issue 4\n\n\
         Each contender copies the same source to a new file; the destination is deleted \
         (untimed) before and after every run. Before timing, each runs once (which also \
         warms the page cache) and its output is compared byte for byte with the source; \
         `qemu-img convert -O raw` is one of them, so every output that passes is also \
         identical to qemu-img's (a wrong answer fails the bench). *allocated* is the \
         output's st_blocks as the command left it (where the command does not flush, ext4 \
         has not yet allocated its extent-tree blocks: a few KiB more once written back). \
         **Warm**: the source's pages cached. **Cold**: the source's pages dropped before \
         every run (posix_fadvise DONTNEED). `÷ sparsekit` is the command's time divided by \
         sparsekit `copy`'s in the same round, warm with warm and cold with cold: the median \
         of those per-round ratios, then their range; above 1 means sparsekit is faster. \
         `bmaptool copy` checks \
         the SHA-256 of every range against the bmap file while copying (its default); the \
         bmap file is made beforehand (`bmaptool create`, untimed). The Python port is \
         [xtask/bench/sparse_copy.py](xtask/bench/sparse_copy.py), the original filemap \
         `sparse_copy` of bmap-tools: FIEMAP, then buffered reads and writes of at most \
         1 MiB on one thread.\n\n\
         Versions: {}; {}; {}; {}.\n\n",
        tool_version("cp", "--version"),
        tool_version("nbdcopy", "--version"),
        tool_version("bmaptool", "--version"),
        tool_version(&programs.python.to_string_lossy(), "--version"),
    );
    flush_note(md, &flushes);

    for w in WORKLOADS {
        super::empty_page_cache();
        let src = testkit::fixture(w.fixture);
        let bmap = scratch.path(&format!("{}.bmap", w.fixture));
        super::note(&format!("{}: making the bmap file", w.id));
        sh(Command::new("bmaptool")
            .args(["-q", "create", "-o"])
            .arg(&bmap)
            .arg(&src))?;
        let (extents, data) = data_ranges(&src)?;
        let size = std::fs::metadata(&src)?.len();

        let entries = programs.contenders(&src, &dest, &bmap);
        let contenders: Vec<Contender> = entries.iter().map(|(_, c)| c.clone()).collect();

        // Check each contender's answer; this run is also its warm-up.
        let mut allocated = Vec::new();
        for (role, c) in &entries {
            if *role == Role::Baseline {
                allocated.push(None);
                continue;
            }
            super::note(&format!("{}: checking {}", w.id, c.label));
            super::remove_and_sync(&dest)?;
            measure(&c.argv, Some(&log))?;
            let blocks = std::fs::metadata(&dest)
                .with_context(|| format!("{}: {} made no {}", w.id, c.label, dest.display()))?
                .blocks();
            if let Some(at) = first_difference(&src, &dest)? {
                bail!(
                    "{}: `{}` wrote other bytes than the source {} holds: {at}; \
                     not timing a wrong answer",
                    w.id,
                    c.label,
                    display(&src)
                );
            }
            allocated.push(Some(blocks));
            super::remove_and_sync(&dest)?;
        }

        super::note(&format!("{}: every answer checked", w.id));
        let warm_what = format!("{} warm", w.id);
        let warm = race_with(
            &contenders,
            runs,
            &mut Hooks {
                stderr_log: Some(&log),
                ..super::fresh_dest(&dest, &src, false, &warm_what)
            },
        )?;
        let cold_what = format!("{} cold", w.id);
        let cold = race_with(
            &contenders,
            runs,
            &mut Hooks {
                stderr_log: Some(&log),
                ..super::fresh_dest(&dest, &src, true, &cold_what)
            },
        )?;
        std::fs::remove_file(&bmap)?;

        let _ = writeln!(
            md,
            "### {}: {}\n\n\
             `{}`: {size} bytes ({:.1} GiB), {extents} data extents holding {data} bytes \
             ({:.2} GiB).\n",
            w.id,
            w.what,
            display(&src),
            size as f64 / GIB,
            data as f64 / GIB,
        );
        table(md, &warm, &cold, &allocated, &flushes);
        verdict(md, w.id, &warm, &cold, &flushes);
    }
    Ok(())
}

const GIB: f64 = (1u64 << 30) as f64;

fn table(
    md: &mut String,
    warm: &[Stats],
    cold: &[Stats],
    allocated: &[Option<u64>],
    flushes: &[(Role, String, String)],
) {
    let (wb, cb) = (&warm[0], &cold[0]);
    md.push_str(
        "| command | flushes DEST (strace) | allocated | peak RSS | warm median | warm min \
         | warm ÷ sparsekit | cold median | cold min | cold ÷ sparsekit |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (i, (w, c)) in warm.iter().zip(cold).enumerate() {
        let alloc = allocated[i].map_or("–".into(), |b| {
            format!("{:.1} MiB", (b * 512) as f64 / (1 << 20) as f64)
        });
        let flush = &flushes[i].2;
        let _ = writeln!(
            md,
            "| {} (`{}`) | {flush} | {alloc} | {:.1} MiB | {:.2} s | {:.2} s | {} \
             | {:.2} s | {:.2} s | {} |",
            w.label,
            w.cmdline,
            w.max_rss_kib.max(c.max_rss_kib) as f64 / 1024.0,
            w.median,
            w.min,
            Ratio::of(w, wb),
            c.median,
            c.min,
            Ratio::of(c, cb),
        );
    }
}

/// Whether a [`flushes_of`] answer says the destination was flushed at the
/// end (fsync, fdatasync, sync, syncfs), not merely written back.
fn flushes_at_end(flushes: &str) -> bool {
    ["fsync", "fdatasync", "sync ×", "syncfs"]
        .iter()
        .any(|f| flushes.contains(f))
}

/// The verdict: sparsekit's default copy against the best peer, warm and
/// cold; then, for fairness, `copy --flush` against the peers that flush.
fn verdict(
    md: &mut String,
    id: &str,
    warm: &[Stats],
    cold: &[Stats],
    flushes: &[(Role, String, String)],
) {
    let role = |i: usize| flushes[i].0;
    let sparsekit = (0..warm.len())
        .find(|&i| role(i) == Role::Sparsekit)
        .expect("sparsekit copy is a contender");
    let ratio = |peer: &Stats, sk: &Stats| {
        let r = Ratio::of(peer, sk);
        let word = if r.median >= 1.0 { "faster" } else { "slower" };
        format!("{r}, sparsekit {word}")
    };
    // The best peer is the one with the smallest paired ratio to `sk`.
    let best_of = |stats: &'_ [Stats], sk: usize, peer: &dyn Fn(usize) -> bool| {
        let sk = &stats[sk];
        let s = (0..stats.len())
            .filter(|&i| peer(i))
            .map(|i| &stats[i])
            .min_by(|a, b| Ratio::of(a, sk).median.total_cmp(&Ratio::of(b, sk).median))?;
        Some(format!(
            "{:.2} s against the best peer, {}, {:.2} s (medians): {}",
            sk.median,
            s.label,
            s.median,
            ratio(s, sk)
        ))
    };
    let is_peer = |i: usize| role(i) == Role::Peer;
    let best =
        |stats: &[Stats]| best_of(stats, sparsekit, &is_peer).expect("every workload has peers");
    let _ = writeln!(
        md,
        "\n**{id} verdict**: warm, sparsekit {}; cold, sparsekit {}.",
        best(warm),
        best(cold)
    );
    // Durable: sparsekit's faster way to stable storage (`--flush`, or
    // the copy then sync), against the peers followed by sync and the
    // peers that flush by themselves; warm and cold each pick their own.
    let ours = |i: usize| {
        role(i) == Role::Durable || (role(i) == Role::Variant && flushes_at_end(&flushes[i].2))
    };
    let durable_peer = |i: usize| {
        role(i) == Role::DurablePeer || (role(i) == Role::Peer && flushes_at_end(&flushes[i].2))
    };
    let fastest = |stats: &[Stats]| {
        (0..stats.len())
            .filter(|&i| ours(i))
            .min_by(|&a, &b| stats[a].median.total_cmp(&stats[b].median))
    };
    if let (Some(dw), Some(dc)) = (fastest(warm), fastest(cold))
        && let (Some(w), Some(c)) = (
            best_of(warm, dw, &durable_peer),
            best_of(cold, dc, &durable_peer),
        )
    {
        let _ = writeln!(
            md,
            "Durable (the copy on stable storage when the command ends): warm, `{}` {w}; \
             cold, `{}` {c}.",
            warm[dw].label, cold[dc].label
        );
    }
    let flushed =
        (0..warm.len()).find(|&i| role(i) == Role::Variant && flushes_at_end(&flushes[i].2));
    for peer in (0..warm.len()).filter(|&i| role(i) == Role::Peer && flushes_at_end(&flushes[i].2))
    {
        if let Some(f) = flushed {
            let _ = writeln!(
                md,
                "With the destination flushed on both sides: `{}` against `{}`: warm {:.2} s \
                 against {:.2} s (medians), {}; cold {:.2} s against {:.2} s, {}.",
                warm[f].label,
                warm[peer].label,
                warm[f].median,
                warm[peer].median,
                ratio(&warm[peer], &warm[f]),
                cold[f].median,
                cold[peer].median,
                ratio(&cold[peer], &cold[f]),
            );
        }
    }
    md.push('\n');
}

/// Runs every contender once under strace on a small fixture and says, for
/// each, which flushes reached its destination.
fn flush_report(
    programs: &Programs,
    scratch: &Scratch,
) -> anyhow::Result<Vec<(Role, String, String)>> {
    let src = scratch.path("strace-src.raw");
    write_strace_source(&src)?;
    let dest = scratch.path("strace-dest.raw");
    let bmap = scratch.path("strace.bmap");
    let trace = scratch.path("strace.txt");
    let log = scratch.path("stderr.txt");
    sh(Command::new("bmaptool")
        .args(["-q", "create", "-o"])
        .arg(&bmap)
        .arg(&src))?;
    let mut out = Vec::new();
    for (role, c) in programs.contenders(&src, &dest, &bmap) {
        if role == Role::Baseline {
            out.push((role, c.label, "–".into()));
            continue;
        }
        super::remove_and_sync(&dest)?;
        let mut argv: Vec<OsString> = [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=open,openat,creat,fsync,fdatasync,sync_file_range,syncfs,sync",
            "-o",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        argv.push(trace.clone().into());
        argv.extend(c.argv.iter().cloned());
        measure(&argv, Some(&log)).with_context(|| format!("strace of {}", c.label))?;
        let text = std::fs::read_to_string(&trace)?;
        out.push((role, c.label, flushes_of(&text, &dest)));
    }
    super::remove_and_sync(&dest)?;
    std::fs::remove_file(&src)?;
    Ok(out)
}

/// From an `strace -f` log: the flush calls aimed at `dest` (by the file
/// descriptors opened on it), or at every file (sync, syncfs).
fn flushes_of(trace: &str, dest: &Path) -> String {
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    // Descriptor -> opened on dest; the last open wins. Keyed by the number
    // alone: the threads of a process share their descriptors.
    let mut on_dest = std::collections::HashMap::new();
    // pid -> whether its unfinished open was of dest.
    let mut pending = std::collections::HashMap::new();
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for line in trace.lines() {
        let Some((pid, call)) = line.split_once(' ') else {
            continue;
        };
        let call = call.trim_start();
        let ret = call
            .rsplit_once(" = ")
            .and_then(|(_, r)| r.split_whitespace().next()?.parse::<i64>().ok());
        if let Some(rest) = call.strip_prefix("<... ") {
            // `<... openat resumed>...) = 5`
            if rest.starts_with("open")
                && let (Some(d), Some(fd)) = (pending.remove(pid), ret)
            {
                on_dest.insert(fd, d);
            }
            continue;
        }
        let (func, args) = call.split_once('(').unwrap_or((call, ""));
        let what = match func {
            "open" | "openat" | "creat" => {
                let is_dest = args.split('"').nth(1).is_some_and(|p| p.ends_with(&*name));
                if call.contains("<unfinished") {
                    pending.insert(pid, is_dest);
                } else if let Some(fd) = ret.filter(|fd| *fd >= 0) {
                    on_dest.insert(fd, is_dest);
                }
                continue;
            }
            "sync" => "sync",
            "syncfs" => "syncfs",
            "fsync" | "fdatasync" | "sync_file_range" => {
                let fd = args
                    .split([',', ')', ' '])
                    .next()
                    .and_then(|f| f.parse().ok());
                if fd.is_none_or(|fd: i64| on_dest.get(&fd) != Some(&true)) {
                    continue;
                }
                match func {
                    "fsync" => "fsync",
                    "fdatasync" => "fdatasync",
                    _ if args.contains("WAIT_AFTER") => "sync_file_range (write, wait)",
                    _ => "sync_file_range (start write-back)",
                }
            }
            _ => continue,
        };
        match counts.iter_mut().find(|(w, _)| *w == what) {
            Some((_, n)) => *n += 1,
            None => counts.push((what, 1)),
        }
    }
    if counts.is_empty() {
        return "no".into();
    }
    counts
        .iter()
        .map(|(w, n)| format!("{w} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The paragraph that says who flushes, from [`flush_report`].
fn flush_note(md: &mut String, flushes: &[(Role, String, String)]) {
    let group = |keep: &dyn Fn(&str) -> bool| {
        let v: Vec<String> = flushes
            .iter()
            .filter(|(r, _, f)| *r != Role::Baseline && keep(f))
            .map(|(_, l, _)| format!("`{l}`"))
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    };
    let _ = writeln!(
        md,
        "Which commands flush the destination was counted, not assumed: each ran once under \
         `strace -f` copying {}, counting flush calls on the destination's file descriptors \
         (column *flushes DEST*).\n\n\
         - fsync or fdatasync at the end: {}.\n\
         - data written back during the copy with `sync_file_range` (and the pages then \
         dropped), no fsync: {}.\n\
         - no flush, the data left in the page cache for the kernel to write later: {}.\n\n\
         So the fair comparison for a command that flushes is `sparsekit copy --flush`.\n",
        STRACE_SOURCE,
        group(&flushes_at_end),
        group(&|f| !flushes_at_end(f) && f.contains("sync_file_range")),
        group(&|f| f == "no"),
    );
}

/// A file's data ranges from SEEK_DATA/SEEK_HOLE, streamed: how many and
/// how many bytes.
fn data_ranges(path: &Path) -> anyhow::Result<(u64, u64)> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata()?.len();
    let (mut count, mut bytes, mut pos) = (0, 0, 0);
    while let Some(start) = seek(&f, pos, Whence::SeekData, size)? {
        let end = seek(&f, start, Whence::SeekHole, size)?.unwrap_or(size);
        count += 1;
        bytes += end - start;
        pos = end;
    }
    Ok((count, bytes))
}

/// lseek with SEEK_DATA or SEEK_HOLE; None past the end (ENXIO).
pub(super) fn seek(f: &File, pos: u64, whence: Whence, size: u64) -> anyhow::Result<Option<u64>> {
    if pos >= size {
        return Ok(None);
    }
    match lseek(f, pos as i64, whence) {
        Ok(o) => Ok(Some(o as u64)),
        Err(Errno::ENXIO) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("lseek({pos}, {whence:?})")),
    }
}

/// Where `b` first differs from `a`, as text, or None when they are
/// byte-identical; as `cmp` would answer, but reading only where either
/// file has data: a range that is a hole in both (SEEK_DATA/SEEK_HOLE)
/// reads as zeros in both. (`cmp` reads the holes too: 34 s for one pair of
/// 8 GiB files here.) Small buffers keep xtask's peak RSS low.
pub(super) fn first_difference(a: &Path, b: &Path) -> anyhow::Result<Option<String>> {
    let open = |p: &Path| File::open(p).with_context(|| format!("opening {}", p.display()));
    let (fa, fb) = (open(a)?, open(b)?);
    let (sa, sb) = (fa.metadata()?.len(), fb.metadata()?.len());
    if sa != sb {
        return Ok(Some(format!("{} bytes instead of {sa}", sb)));
    }
    const BUF: usize = 64 << 10;
    let mut buf = vec![0u8; 2 * BUF];
    let (ba, bb) = buf.split_at_mut(BUF);
    let mut pos = 0;
    loop {
        let next = |f: &File| seek(f, pos, Whence::SeekData, sa).map(|o| o.unwrap_or(sa));
        let start = next(&fa)?.min(next(&fb)?);
        if start >= sa {
            return Ok(None);
        }
        // At `start` at least one file has data; compare up to the later
        // of the two next holes (past a hole in one of them is fine: it
        // reads as zeros).
        let hole = |f: &File| seek(f, start, Whence::SeekHole, sa).map(|o| o.unwrap_or(sa));
        let end = hole(&fa)?.max(hole(&fb)?);
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(BUF);
            fa.read_exact_at(&mut ba[..n], at)?;
            fb.read_exact_at(&mut bb[..n], at)?;
            if ba[..n] != bb[..n] {
                let i = ba[..n]
                    .iter()
                    .zip(&bb[..n])
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                return Ok(Some(format!(
                    "first difference at offset {}",
                    at + i as u64
                )));
            }
            at += n as u64;
        }
        pos = end;
    }
}

#[cfg(test)]
mod tests {
    use super::super::timed;
    use super::*;

    #[test]
    fn flushes_of_counts_only_the_destination() {
        // qemu-img convert -t writeback: the flush comes from a worker thread.
        let qemu = r#"11924 openat(AT_FDCWD, "/f/src.raw", O_RDONLY|O_CLOEXEC) = 4
11924 openat(AT_FDCWD, "/f/dest.raw", O_RDONLY|O_NONBLOCK|O_CLOEXEC) = -1 ENOENT (No such file or directory)
11924 openat(AT_FDCWD, "/f/dest.raw", O_RDWR|O_CLOEXEC) = 8
11928 fdatasync(8)                      = 0"#;
        assert_eq!(flushes_of(qemu, Path::new("/f/dest.raw")), "fdatasync ×1");
        // The Python port fsyncs its source, not its destination.
        let port = r#"11943 openat(AT_FDCWD, "/f/src.raw", O_RDONLY|O_CLOEXEC) = 3
11943 fsync(3)                          = 0
11943 openat(AT_FDCWD, "/f/dest.raw", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0666) = 4"#;
        assert_eq!(flushes_of(port, Path::new("/f/dest.raw")), "no");
        // nbdcopy, with a split open.
        let nbd = r#"11934 openat(AT_FDCWD, "/f/dest.raw", O_WRONLY|O_CREAT|O_EXCL|O_TRUNC, 0644 <unfinished ...>
11935 openat(AT_FDCWD, "/f/src.raw", O_RDONLY) = 3
11934 <... openat resumed>)             = 4
11935 sync_file_range(4, 0, 65536, SYNC_FILE_RANGE_WRITE) = 0
11935 sync_file_range(4, 0, 65536, SYNC_FILE_RANGE_WAIT_BEFORE|SYNC_FILE_RANGE_WRITE|SYNC_FILE_RANGE_WAIT_AFTER) = 0
11935 sync_file_range(3, 0, 65536, SYNC_FILE_RANGE_WRITE) = 0"#;
        assert_eq!(
            flushes_of(nbd, Path::new("/f/dest.raw")),
            "sync_file_range (start write-back) ×1, sync_file_range (write, wait) ×1"
        );
    }

    /// Contenders c0, c1, … with one time a round: `rounds[r][i]` is ci's.
    fn stats<const N: usize>(rounds: &[[f64; N]]) -> Vec<Stats> {
        (0..N)
            .map(|i| {
                let secs: Vec<f64> = rounds.iter().map(|r| r[i]).collect();
                timed(&format!("c{i}"), &secs)
            })
            .collect()
    }

    /// Each contender's role and what strace saw it flush.
    fn roles(r: &[(Role, &str)]) -> Vec<(Role, String, String)> {
        r.iter()
            .map(|(r, f)| (*r, String::new(), f.to_string()))
            .collect()
    }

    #[test]
    fn verdict_pairs_each_comparison_with_its_own_sparsekit_command() {
        let flushes = roles(&[
            (Role::Sparsekit, "no"),
            (Role::Variant, "fdatasync ×1"),
            (Role::Peer, "no"),
            (Role::Peer, "fsync ×1"),
        ]);
        // Rounds of sparsekit, its --flush variant, then two peers. c3 has
        // the smaller median time but, round by round, c2 is the closer.
        let warm = stats(&[
            [0.5, 2.0, 0.55, 0.9],
            [1.0, 2.0, 1.1, 1.0],
            [3.0, 2.0, 3.3, 4.0],
        ]);
        let cold = stats(&[
            [2.0, 2.0, 3.0, 8.0],
            [2.0, 2.0, 3.0, 8.0],
            [2.0, 4.0, 3.0, 8.0],
        ]);
        let mut md = String::new();
        verdict(&mut md, "W9", &warm, &cold, &flushes);
        assert_eq!(
            md,
            "\n**W9 verdict**: warm, sparsekit 1.00 s against the best peer, c2, 1.10 s \
             (medians): 1.10× (1.10–1.10), sparsekit faster; cold, sparsekit 2.00 s against \
             the best peer, c2, 3.00 s (medians): 1.50× (1.50–1.50), sparsekit faster.\n\
             Durable (the copy on stable storage when the command ends): warm, `c1` 2.00 s \
             against the best peer, c3, 1.00 s (medians): 0.50× (0.45–2.00), sparsekit slower; \
             cold, `c1` 2.00 s against the best peer, c3, 8.00 s (medians): 4.00× (2.00–4.00), \
             sparsekit faster.\n\
             With the destination flushed on both sides: `c1` against `c3`: warm 2.00 s \
             against 1.00 s (medians), 0.50× (0.45–2.00), sparsekit slower; cold 2.00 s \
             against 8.00 s, 4.00× (2.00–4.00), sparsekit faster.\n\n"
        );
    }

    #[test]
    fn the_durable_verdict_compares_synced_rows_and_peers_that_flush() {
        let flushes = roles(&[
            (Role::Sparsekit, "no"),
            (Role::Peer, "no"),
            (Role::Peer, "fsync ×1"),
            (Role::Durable, "fsync ×1"),
            (Role::DurablePeer, "fsync ×1"),
            (Role::Variant, "fdatasync ×1"),
        ]);
        // c1 is the fastest peer, but does not flush. Warm, sparsekit's
        // faster durable way is c3 (then sync), against c4; cold, c5
        // (--flush), against c2.
        let warm = stats(&[
            [1.0, 1.0, 5.0, 2.0, 3.0, 2.5],
            [1.0, 1.0, 5.0, 2.0, 3.0, 2.5],
        ]);
        let cold = stats(&[
            [2.0, 2.0, 3.0, 4.0, 8.0, 2.5],
            [2.0, 2.0, 3.0, 4.0, 8.0, 2.5],
        ]);
        let mut md = String::new();
        verdict(&mut md, "W9", &warm, &cold, &flushes);
        let durable = md.lines().find(|l| l.starts_with("Durable")).unwrap();
        assert_eq!(
            durable,
            "Durable (the copy on stable storage when the command ends): warm, `c3` 2.00 s \
             against the best peer, c4, 3.00 s (medians): 1.50× (1.50–1.50), sparsekit faster; \
             cold, `c5` 2.50 s against the best peer, c2, 3.00 s (medians): 1.20× (1.20–1.20), \
             sparsekit faster."
        );
    }

    #[test]
    fn first_difference_reads_data_and_holes_alike() {
        let dir = std::env::temp_dir().join(format!("xtask-cmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let make = |name: &str, writes: &[(u64, &[u8])]| {
            let p = dir.join(name);
            let f = File::create(&p).unwrap();
            f.set_len(1 << 20).unwrap();
            for (at, b) in writes {
                f.write_all_at(b, *at).unwrap();
            }
            p
        };
        let a = make("a", &[(4096, b"data")]);
        let same = make("b", &[(4096, b"data"), (65536, &[0u8; 4096])]);
        let other = make("c", &[(4096, b"data"), (500_000, b"x")]);
        let short = dir.join("d");
        File::create(&short).unwrap().set_len(4096).unwrap();
        assert_eq!(first_difference(&a, &same).unwrap(), None);
        assert_eq!(
            first_difference(&a, &other).unwrap().as_deref(),
            Some("first difference at offset 500000")
        );
        assert_eq!(
            first_difference(&other, &a).unwrap().as_deref(),
            Some("first difference at offset 500000")
        );
        assert!(first_difference(&a, &short).unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
