//! `cargo xtask bench`: sparsekit and its peers timed side by side in one
//! run, written to BENCHMARKS.md as paired ratios ([`Ratio`]).
//!
//! - `map`: a file with 200,000 extents (here);
//! - `copy`: the workloads of issue 4, warm and cold ([`copy`]);
//! - the image workloads: qcow2, W3, NBD, streams ([`images`]);
//! - restores into NBD exports, TLS against plain ([`restore`]);
//! - bmap files and compressed images against bmaptool ([`flash`]).
//!
//! A child's peak RSS from wait4 starts at xtask's own peak (the child is
//! spawned from xtask's memory), so xtask keeps its own footprint small:
//! maps and file comparisons are streamed, never held whole.

mod copy;
mod flash;
mod images;
mod pages;
mod restore;

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use sparsekit_testkit as testkit;

use crate::{display, output, release_build, root};

/// One timed run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    secs: f64,
    max_rss_kib: u64,
}

/// Runs `argv` with standard output to /dev/null and standard error to
/// `stderr_log` (when given: shown if the command fails); wall time and
/// peak RSS (from wait4's rusage, so only this child is counted).
fn measure(argv: &[OsString], stderr_log: Option<&Path>) -> anyhow::Result<Sample> {
    let stderr = match stderr_log {
        Some(p) => Stdio::from(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        ),
        None => Stdio::inherit(),
    };
    let t = Instant::now();
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting {argv:?}"))?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `child` is our unwaited child, so its pid is valid; status
    // and ru point to live locals of the types wait4 writes.
    let r = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut ru) };
    let secs = t.elapsed().as_secs_f64();
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("wait4");
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let log = stderr_log
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        bail!("{argv:?} failed (wait status {status:#x}): {}", log.trim());
    }
    Ok(Sample {
        secs,
        max_rss_kib: ru.ru_maxrss as u64,
    })
}

/// One entry of a qemu-img map as a tuple: start, length, depth, present,
/// zero, data, compressed, offset.
type Entry = (u64, u64, u64, bool, bool, bool, bool, Option<u64>);

/// Runs two commands that print qemu-img map JSON (one entry per line) and
/// compares their canonical forms while streaming, so that xtask stays
/// small: a child's peak RSS counts its parent's at spawn time. Returns
/// whether they agree and how many data entries the first printed.
fn same_map(a: &mut Command, b: &mut Command) -> anyhow::Result<(bool, usize)> {
    use std::io::{BufRead, BufReader};
    let mut ca = a.stdout(Stdio::piped()).spawn()?;
    let mut cb = b.stdout(Stdio::piped()).spawn()?;
    let entries = |r: std::process::ChildStdout| {
        BufReader::new(r).lines().map(|l| -> anyhow::Result<Entry> {
            let l = l?;
            let v: serde_json::Value =
                serde_json::from_str(l.trim_start_matches('[').trim_end_matches([',', ']']))?;
            let n = |k: &str| v[k].as_u64().context("a number");
            let f = |k: &str| v[k].as_bool().context("a boolean");
            Ok((
                n("start")?,
                n("length")?,
                n("depth")?,
                f("present")?,
                f("zero")?,
                f("data")?,
                f("compressed")?,
                v["offset"].as_u64(),
            ))
        })
    };
    let mut data = 0;
    let (mut ia, mut ib) = (
        merged(entries(ca.stdout.take().unwrap())),
        merged(entries(cb.stdout.take().unwrap())),
    );
    let same = loop {
        match (ia.next().transpose()?, ib.next().transpose()?) {
            (None, None) => break true,
            (Some(x), Some(y)) if x == y => data += usize::from(x.5),
            _ => break false,
        }
    };
    let (sa, sb) = (ca.wait()?, cb.wait()?);
    anyhow::ensure!(
        !same || (sa.success() && sb.success()),
        "a map command failed"
    );
    Ok((same, data))
}

/// Merges neighbours that agree on every field and whose offsets continue.
fn merged(
    mut it: impl Iterator<Item = anyhow::Result<Entry>>,
) -> impl Iterator<Item = anyhow::Result<Entry>> {
    let mut pending: Option<Entry> = None;
    std::iter::from_fn(move || {
        loop {
            match it.next() {
                None => return pending.take().map(Ok),
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok(x)) => match &mut pending {
                    Some(p)
                        if p.0 + p.1 == x.0
                            && (p.2, p.3, p.4, p.5, p.6) == (x.2, x.3, x.4, x.5, x.6)
                            && p.7.map(|o| o + p.1) == x.7 =>
                    {
                        p.1 += x.1
                    }
                    Some(p) => return Some(Ok(std::mem::replace(p, x))),
                    None => pending = Some(x),
                },
            }
        }
    })
}

/// A command of a workload.
#[derive(Clone)]
struct Contender {
    label: String,
    argv: Vec<OsString>,
}

/// A contender's runs in one race.
struct Stats {
    label: String,
    cmdline: String,
    /// Wall time of each round, in round order: `secs[r]` ran in the same
    /// round as every other contender's `secs[r]`, so they pair.
    secs: Vec<f64>,
    median: f64,
    min: f64,
    max_rss_kib: u64,
}

impl Stats {
    /// `samples` in round order, one a round.
    fn new(c: &Contender, samples: &[Sample]) -> Self {
        let secs: Vec<f64> = samples.iter().map(|s| s.secs).collect();
        let mut sorted = secs.clone();
        sorted.sort_by(f64::total_cmp);
        Stats {
            label: c.label.clone(),
            cmdline: c
                .argv
                .iter()
                .map(|a| display(Path::new(a)))
                .collect::<Vec<_>>()
                .join(" "),
            median: median(&sorted),
            min: sorted.first().copied().unwrap_or(f64::NAN),
            max_rss_kib: samples.iter().map(|x| x.max_rss_kib).max().unwrap_or(0),
            secs,
        }
    }
}

/// The stats of a contender `label` that took `secs[r]` in round r, for
/// the tests of the verdicts.
#[cfg(test)]
fn timed(label: &str, secs: &[f64]) -> Stats {
    let samples: Vec<Sample> = secs
        .iter()
        .map(|&secs| Sample {
            secs,
            max_rss_kib: 0,
        })
        .collect();
    Stats::new(&contender(label, &[&"x"]), &samples)
}

/// The median of sorted values: the middle one, or the mean of the two
/// middle ones (NaN if there are none).
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// A paired ratio: in each round, a command's time divided by the
/// reference's time in the same round; the median of those per-round
/// ratios and their range. Pairing cancels what a round shares (this
/// machine's speed swings 2× between runs), which a ratio of medians,
/// each taken over different rounds, does not.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ratio {
    median: f64,
    min: f64,
    max: f64,
}

impl Ratio {
    /// `times[r] / base[r]` for each round r.
    fn paired(times: &[f64], base: &[f64]) -> Self {
        debug_assert_eq!(times.len(), base.len(), "one time a round each");
        let mut r: Vec<f64> = times.iter().zip(base).map(|(t, b)| t / b).collect();
        r.sort_by(f64::total_cmp);
        Ratio {
            median: median(&r),
            min: r.first().copied().unwrap_or(f64::NAN),
            max: r.last().copied().unwrap_or(f64::NAN),
        }
    }

    /// `s` against `base`, round by round (the same race).
    fn of(s: &Stats, base: &Stats) -> Self {
        Self::paired(&s.secs, &base.secs)
    }
}

/// `1.42× (1.20–1.61)`: the median, then the range; the precision (2 by
/// default) applies to all three.
impl std::fmt::Display for Ratio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = f.precision().unwrap_or(2);
        write!(
            f,
            "{:.p$}× ({:.p$}–{:.p$})",
            self.median, self.min, self.max
        )
    }
}

/// What the ratios of every table mean, for the top of BENCHMARKS.md and
/// of `--images-only`'s output.
const RATIOS: &str = "The ratios are paired: in every round each command runs once, and its \
     time in that round is divided by sparsekit's time in the same round (warm rounds with \
     warm, cold with cold); a ratio column shows the median of these per-round ratios and, \
     in parentheses, their range over the rounds (smallest–largest), as in `1.42× (1.20–1.61)`. \
     Above 1 means sparsekit is faster. Times of different rounds are never divided by each \
     other: this machine's speed swings 2× from one run to the next, and a round's slowness \
     hits both commands of a pair alike.";

fn contender(label: &str, argv: &[&dyn AsRef<std::ffi::OsStr>]) -> Contender {
    Contender {
        label: label.into(),
        argv: argv.iter().map(|a| a.as_ref().to_owned()).collect(),
    }
}

/// The ending of the labels of the rows made by [`durable`].
const SYNCED: &str = ", then sync DEST";

/// `c`, then `sync DEST` (coreutils' `sync` of a file: an fsync of it): the
/// time until the copy is on stable storage, for a command that leaves its
/// writes in the page cache.
fn durable(c: &Contender, dest: &Path) -> Contender {
    let mut argv: Vec<OsString> = [
        "sh",
        "-c",
        r#"d=$1; shift; "$@" && exec sync -- "$d""#,
        "sh",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    argv.push(dest.into());
    argv.extend(c.argv.iter().cloned());
    Contender {
        label: format!("{}{SYNCED}", c.label),
        argv,
    }
}

/// Hooks that delete `dest` (and sync its folder) before and after each
/// run, so every contender writes a new file and no run pays for another's
/// blocks; before each run, `source`'s data is also read into the page
/// cache (warm) or its pages dropped (cold), whatever the run before did.
fn fresh_dest<'a>(dest: &'a Path, source: &'a Path, cold: bool, what: &'a str) -> Hooks<'a> {
    Hooks {
        before: Some(Box::new(move || {
            remove_and_sync(dest)?;
            if cold {
                testkit::drop_cache(source);
                Ok(())
            } else {
                pages::cache_data(source)
            }
        })),
        after: Some(Box::new(move || remove_and_sync(dest))),
        progress: Some(what),
        ..Hooks::default()
    }
}

/// Runs every contender `runs` times, interleaved (a, b, c, a, b, c, ...)
/// after one warm-up each, so that drift in the machine hits all alike and
/// each round's times pair ([`Ratio`]).
fn race(contenders: &[Contender], runs: usize) -> anyhow::Result<Vec<Stats>> {
    for c in contenders {
        measure(&c.argv, None)?;
    }
    race_with(contenders, runs, &mut Hooks::default())
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Says what the bench is doing, with the time since it started.
fn note(what: &str) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs();
    eprintln!("xtask: [{:2}:{:02}] {what}", t / 60, t % 60);
}

/// What happens around each timed run, untimed.
#[derive(Default)]
struct Hooks<'a> {
    /// Before each run (delete the destination, drop the cache, ...).
    before: Option<Box<dyn FnMut() -> anyhow::Result<()> + 'a>>,
    /// After each run (delete the destination).
    after: Option<Box<dyn FnMut() -> anyhow::Result<()> + 'a>>,
    /// Standard error of the commands goes there.
    stderr_log: Option<&'a Path>,
    /// Says which run is going on, on standard error.
    progress: Option<&'a str>,
}

/// The order of the contenders in round `run`: the listed order first,
/// then a different shuffle each round (seeded by the round, so the same
/// in every bench). A fixed order gives each command the same predecessor
/// every round, and on this VM that matters: a command that follows one
/// which left GiBs of page cache to free (deleted with its output) fills
/// the cache with recycled pages, while one that follows an evicting
/// command takes pages the host has reclaimed (the balloon's free page
/// reporting), each a host fault. In W3, `qemu-img convert -m 8 -W` took
/// 1.4 s after `qemu-img convert` and 3.1–9.2 s after other commands.
fn round_order(n: usize, run: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if run == 0 {
        return order;
    }
    // xorshift64*, seeded by the round.
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (run as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    for i in (1..n).rev() {
        order.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    order
}

/// Runs every contender `runs` times, interleaved, with no warm-up, calling
/// the hooks around each run.
fn race_with(
    contenders: &[Contender],
    runs: usize,
    hooks: &mut Hooks<'_>,
) -> anyhow::Result<Vec<Stats>> {
    let mut samples: Vec<Vec<Sample>> = contenders.iter().map(|_| Vec::new()).collect();
    for run in 0..runs {
        for i in round_order(contenders.len(), run) {
            let (c, s) = (&contenders[i], &mut samples[i]);
            if let Some(what) = hooks.progress {
                note(&format!("{what}, run {}/{runs}: {}", run + 1, c.label));
            }
            if let Some(f) = &mut hooks.before {
                f()?;
            }
            s.push(measure(&c.argv, hooks.stderr_log)?);
            if let Some(f) = &mut hooks.after {
                f()?;
            }
        }
    }
    Ok(contenders
        .iter()
        .zip(samples)
        .map(|(c, s)| Stats::new(c, &s))
        .collect())
}

/// A race's table; the first row is sparsekit's, the one every ratio pairs
/// with.
fn table(md: &mut String, stats: &[Stats]) {
    let base = &stats[0];
    md.push_str(
        "| command | median | min | peak RSS | time ÷ sparsekit's (paired) |\n\
         |---|---:|---:|---:|---:|\n",
    );
    for s in stats {
        let _ = writeln!(
            md,
            "| {} (`{}`) | {:.3} s | {:.3} s | {:.1} MiB | {} |",
            s.label.replace('|', "\\|"),
            s.cmdline.replace('|', "\\|"),
            s.median,
            s.min,
            s.max_rss_kib as f64 / 1024.0,
            Ratio::of(s, base)
        );
    }
}

/// The contender `label` of a race.
fn find<'a>(stats: &'a [Stats], label: &str) -> &'a Stats {
    stats
        .iter()
        .find(|s| s.label == label)
        .unwrap_or_else(|| panic!("{label:?} is not a contender of this race"))
}

/// The contender `label` against the race's first, sparsekit's, paired.
fn ratio(stats: &[Stats], label: &str) -> Ratio {
    Ratio::of(find(stats, label), &stats[0])
}

/// The first three fields of /proc/loadavg.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// MemTotal of /proc/meminfo in GiB (0 if unreadable).
fn memory_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            kib.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / (1 << 20) as f64)
}

fn tool_version(cmd: &str, arg: &str) -> String {
    output(Command::new(cmd).arg(arg))
        .map(|s| s.lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Deletes `path` if it exists, then fsyncs its folder: the journal commit
/// that frees (and discards) its blocks happens now, untimed, rather than
/// during the next run. (Not sync(2): on a shared machine that waits for
/// everyone's dirty pages.)
pub(super) fn remove_and_sync(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("deleting {}", path.display())),
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync {}", dir.display()))
}

/// Empties the page cache (sync, then `drop_caches` = 1) when xtask may,
/// as root: a workload then starts with free memory rather than paying to
/// reclaim what earlier ones (and the fixtures) left cached. With the cache
/// full, every new page of a destination waited for reclaim: the same W3
/// copy took 2.2 s on a full cache and 1.05 s on an emptied one. Returns
/// whether it could.
pub(super) fn empty_page_cache() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "1\n").is_ok()
}

/// The map workload: a raw file with 200,000 extents, mapped by sparsekit
/// (JSON and table), qemu-img and filefrag.
fn map(md: &mut String, bin: &Path, runs: usize) -> anyhow::Result<()> {
    let map = bin.join("map");
    let f = testkit::fixture("bench-200k-extents.raw");
    testkit::drop_cache(&f);
    let (same, data_extents) = same_map(
        Command::new(&map).arg("--json").arg(&f),
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&f),
    )?;
    anyhow::ensure!(
        same,
        "map --json and qemu-img map disagree on {}: not benchmarking a wrong answer",
        f.display()
    );
    let size = std::fs::metadata(&f)?.len();
    let small = testkit::fixture("holes-data.raw");
    let stats = race(
        &[
            contender("sparsekit map --json", &[&map, &"--json", &f]),
            contender("sparsekit map (table)", &[&map, &f]),
            contender(
                "qemu-img map",
                &[&"qemu-img", &"map", &"--output=json", &"-f", &"raw", &f],
            ),
            contender("filefrag -e", &[&"filefrag", &"-e", &f]),
            contender(
                "sparsekit map --json, 9-extent file (memory reference)",
                &[&map, &"--json", &small],
            ),
            contender("baseline: true", &[&"true"]),
        ],
        runs,
    )?;
    let _ = writeln!(
        md,
        "## map: a raw file with {data_extents} data extents\n\n\
         `{}`: {size} bytes, 4 KiB of data every 16 KiB; page cache warm, the file flushed. \
         sparsekit's answer is checked equal to qemu-img's before timing.\n",
        display(&f)
    );
    table(md, &stats);
    let _ = writeln!(
        md,
        "\nsparsekit `map --json` against `qemu-img map --output=json`: {:.1}; against \
         `filefrag -e`: {:.1}. The table (`map FILE`) against `filefrag -e`, both printing \
         a line per extent: {:.2} (paired, `filefrag -e`'s time ÷ the table's). Above 1: \
         sparsekit faster.\n",
        ratio(&stats, "qemu-img map"),
        ratio(&stats, "filefrag -e"),
        Ratio::of(
            find(&stats, "filefrag -e"),
            find(&stats, "sparsekit map (table)")
        ),
    );
    Ok(())
}

/// A group of workloads that `--only` runs alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// The copy workloads W1 and W2 into a new file, warm and cold, against
    /// every peer at its best and followed by sync.
    Copy,
    /// The map workload: a file of 200,000 extents, sparsekit's JSON and
    /// table against qemu-img map and filefrag -e.
    Map,
    /// Restores into NBD exports: W1 and W3 into qemu-nbd, W1 into nbdkit
    /// memory, W1 over TCP with TLS against without.
    Restore,
    /// Flashing: bmaps of W1 and W2, copies with them, W1 compressed with
    /// xz and zstd, against bmaptool.
    Flash,
    /// `qcow2-info --check` against `qemu-img check` on the 1 TiB image.
    Check,
}

pub fn run(runs: usize, images_only: bool, only: Option<Only>) -> anyhow::Result<()> {
    anyhow::ensure!(runs >= 1, "--runs must be at least 1");
    if let Some(only) = only {
        START.get_or_init(Instant::now);
        let load_start = load_average();
        let held = pages::hold();
        let bin = release_build()?;
        let mut md = format!("{RATIOS}\n\n{}\n\n", memory_state(&held)?);
        match only {
            Only::Map => map(&mut md, &bin, runs)?,
            Only::Copy => copy::run(&mut md, &bin, runs)?,
            Only::Restore => restore::run(&mut md, &bin, runs)?,
            Only::Flash => flash::run(&mut md, &bin, runs)?,
            Only::Check => images::check(&mut md, &bin, runs)?,
        }
        let _ = writeln!(
            md,
            "This part took {:.1} min (`--runs {runs}`). Load average (1, 5, 15 min) when it \
             started: {load_start}; when it ended: {}.\n",
            START.get_or_init(Instant::now).elapsed().as_secs_f64() / 60.0,
            load_average()
        );
        print!("{md}");
        return Ok(());
    }
    if images_only {
        let held = pages::hold();
        let bin = release_build()?;
        crate::fixtures(true)?;
        let mut md = format!("{RATIOS}\n\n{}\n\n", memory_state(&held)?);
        images::run(&mut md, &bin, runs)?;
        print!("{md}");
        return Ok(());
    }
    START.get_or_init(Instant::now);
    let load_start = load_average();
    let held = pages::hold();
    let bin = release_build()?;
    crate::fixtures(true)?;
    let emptied = empty_page_cache();
    let state = memory_state(&held)?;
    let mut md = String::new();
    let fs = output(
        Command::new("findmnt")
            .args(["-no", "FSTYPE", "-T"])
            .arg(testkit::generated_dir()),
    )
    .unwrap_or_default();
    let _ = write!(
        md,
        "# Benchmarks\n\n\
         Written by `cargo xtask bench` (reproduce with that command; `--runs N` sets the runs \
         per command, default 5; this file: `--runs {runs}`). Every command runs once to warm \
         up, then all of a workload's commands take turns, `--runs` times, in the listed order \
         the first round and a different shuffle (seeded by the round) in each of the others, \
         so that no command always follows the same one; the median and least wall \
         times are reported, with standard output sent to /dev/null and peak RSS from wait4 \
         (xtask's own footprint at spawn is its floor: see the `true` rows).\n\n\
         {RATIOS}\n\n\
         {} {state}\n\n\
         Machine: {} cores, {:.0} GiB of memory, Linux {}, fixtures on {}; {}, {}.\n\n",
        if emptied {
            "Each workload starts on an emptied page cache (sync, then `drop_caches`), so that \
             no run pays to reclaim the pages of earlier ones."
        } else {
            "The page cache could not be emptied between workloads (not root): runs may pay \
             to reclaim the pages of earlier ones."
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib(),
        tool_version("uname", "-r"),
        fs.trim(),
        tool_version("qemu-img", "--version"),
        tool_version("filefrag", "-V"),
    );

    map(&mut md, &bin, runs)?;
    copy::run(&mut md, &bin, runs)?;
    images::run(&mut md, &bin, runs)?;
    restore::run(&mut md, &bin, runs)?;
    flash::run(&mut md, &bin, runs)?;
    let _ = writeln!(
        md,
        "The whole bench took {:.1} min. Load average (1, 5, 15 min) when it started: \
         {load_start}; when it ended: {}. Other work on the machine shares its cores and disk: \
         the spread between the median and min columns, and the range of each paired ratio, \
         show how much.\n",
        START.get_or_init(Instant::now).elapsed().as_secs_f64() / 60.0,
        load_average()
    );

    let path = root().join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    md.push_str(hand_written(&old));
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    print!("{md}");
    eprintln!("xtask: wrote {}", path.display());
    Ok(())
}

/// Backs the guest's free memory when free page reporting is held, and
/// says in a line how memory stands for the runs.
fn memory_state(held: &pages::Reporting) -> anyhow::Result<String> {
    let mut line = held.describe();
    if held.is_held() {
        note("touching the free memory once");
        let (bytes, secs) = pages::prefault()?;
        let _ = write!(
            line,
            " (Touched: {:.1} GiB in {secs:.1} s.)",
            bytes as f64 / (1u64 << 30) as f64
        );
    }
    line.push_str(
        " Before each warm run the source's data is read into the page cache, and before \
         each cold run its pages are dropped, so that no run inherits what the one before \
         it evicted or left.",
    );
    Ok(line)
}

/// The line after which BENCHMARKS.md is written by hand (notes, the
/// tuning history, rows from partial runs): a full run keeps it and
/// what follows.
const HAND_WRITTEN: &str = "<!-- Written by hand from here on: cargo xtask bench keeps it. -->";

/// The hand-written end of `old` (from [`HAND_WRITTEN`] on), or nothing.
fn hand_written(old: &str) -> &str {
    old.find(HAND_WRITTEN).map_or("", |i| &old[i..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_run_keeps_the_hand_written_end() {
        let old = format!("# Benchmarks\n\nold rows\n\n{HAND_WRITTEN}\n\n## Hand note\n");
        assert_eq!(
            hand_written(&old),
            format!("{HAND_WRITTEN}\n\n## Hand note\n")
        );
        assert_eq!(hand_written("# Benchmarks\n\nno marker\n"), "");
    }

    #[test]
    fn ratios_pair_round_by_round() {
        // The peer is 3× slower in round 0 and 3× faster in round 2: paired,
        // that is a median of 1 and a range of 1/3 to 3. Sorting each
        // command's times before pairing would say 1 every round.
        let r = Ratio::paired(&[3.0, 2.0, 1.0], &[1.0, 2.0, 3.0]);
        assert_eq!(
            r,
            Ratio {
                median: 1.0,
                min: 1.0 / 3.0,
                max: 3.0
            }
        );
        assert_eq!(r.to_string(), "1.00× (0.33–3.00)");
        // Twice as slow in every round of a machine that swings 2× between
        // rounds: no spread.
        let r = Ratio::paired(&[2.0, 4.0, 4.0, 2.0], &[1.0, 2.0, 2.0, 1.0]);
        assert_eq!(format!("{r:.1}"), "2.0× (2.0–2.0)");
        // An even count: the mean of the two middle ratios.
        let r = Ratio::paired(&[1.0, 4.0, 2.0, 3.0], &[1.0; 4]);
        assert_eq!((r.median, r.min, r.max), (2.5, 1.0, 4.0));
        assert_eq!(format!("{r:.0}"), "2× (1–4)");
        assert!(Ratio::paired(&[], &[]).median.is_nan());
    }

    #[test]
    fn table_rows_show_paired_ratios_and_times() {
        let sample = |secs, max_rss_kib| Sample { secs, max_rss_kib };
        let stats = [
            Stats::new(
                &contender("sparsekit", &[&"sk"]),
                &[sample(1.0, 1024), sample(2.0, 2048), sample(1.0, 1024)],
            ),
            Stats::new(
                &contender("peer | pipe", &[&"peer"]),
                &[sample(1.5, 1024), sample(4.0, 1024), sample(3.0, 1024)],
            ),
        ];
        assert_eq!(stats[1].secs, [1.5, 4.0, 3.0], "kept in round order");
        let mut md = String::new();
        table(&mut md, &stats);
        let rows: Vec<&str> = md.lines().collect();
        assert_eq!(
            rows[2],
            "| sparsekit (`sk`) | 1.000 s | 1.000 s | 2.0 MiB | 1.00× (1.00–1.00) |"
        );
        assert_eq!(
            rows[3],
            "| peer \\| pipe (`peer`) | 3.000 s | 1.500 s | 1.0 MiB | 2.00× (1.50–3.00) |"
        );
        assert_eq!(
            ratio(&stats, "peer | pipe").to_string(),
            "2.00× (1.50–3.00)"
        );
    }

    #[test]
    fn a_race_keeps_one_time_a_round() {
        let stats = race(
            &[
                contender("a", &[&"true"]),
                contender("b", &[&"sh", &"-c", &":"]),
            ],
            3,
        )
        .unwrap();
        assert!(stats.iter().all(|s| s.secs.len() == 3));
        let r = Ratio::of(&stats[1], &stats[0]);
        assert!(r.min <= r.median && r.median <= r.max);
    }

    #[test]
    fn rounds_are_permutations_in_changing_orders() {
        assert_eq!(round_order(5, 0), vec![0, 1, 2, 3, 4]);
        let rounds: Vec<Vec<usize>> = (0..5).map(|r| round_order(5, r)).collect();
        for r in &rounds {
            let mut sorted = r.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        }
        // Each command follows more than one other across the rounds.
        let predecessors = |c: usize| -> std::collections::HashSet<usize> {
            rounds
                .iter()
                .filter_map(|r| {
                    let p = r.iter().position(|&x| x == c)?;
                    p.checked_sub(1).map(|q| r[q])
                })
                .collect()
        };
        assert!((0..5).all(|c| predecessors(c).len() >= 2));
        assert_eq!(round_order(1, 3), vec![0]);
    }
}
