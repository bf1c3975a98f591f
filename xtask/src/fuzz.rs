//! `cargo xtask fuzz [TARGET] [--seconds N]`: seed the corpora, build the
//! cargo-fuzz targets of fuzz/ and run each for N seconds under memory
//! and time limits, one after another; report executions per target and
//! fail on any crash, naming its input.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use sparsekit_fuzz_harness::{TARGETS, seeds};
use sparsekit_testkit as testkit;

use crate::{display, root, sh};

/// libFuzzer's limits: a target may not grow past 2 GiB of RSS, nor
/// allocate more than 1 GiB at once, nor spend 10 s on one input.
const LIBFUZZER_LIMITS: &[&str] = &[
    "-rss_limit_mb=2048",
    "-malloc_limit_mb=1024",
    "-timeout=10",
    "-print_final_stats=1",
];

/// Largest input per target: the first cluster for the header (64 KiB is
/// plenty of extensions), whole small images and streams, transcripts.
fn max_len(target: &str) -> usize {
    match target {
        "qcow2_header" => 64 << 10,
        "nbd_client" => 128 << 10,
        _ => 1 << 20,
    }
}

/// Largest seed kept: 1 MiB.
const MAX_SEED: u64 = 1 << 20;

/// What one run did.
#[derive(Debug)]
pub struct Outcome {
    pub target: &'static str,
    pub executions: u64,
    pub seconds: u64,
    pub corpus: usize,
    pub peak_rss_mb: u64,
}

/// How to call cargo-fuzz: with nightly where rustup has it, else the
/// stable toolchain told to allow the unstable flags cargo-fuzz passes.
#[derive(Debug, Clone, Copy)]
enum Toolchain {
    Nightly,
    StableBootstrap,
}

impl Toolchain {
    fn pick() -> Toolchain {
        if std::env::var_os("SPARSEKIT_FUZZ_STABLE").is_some() {
            return Toolchain::StableBootstrap;
        }
        let list = Command::new("rustup")
            .args(["toolchain", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        if list.lines().any(|l| l.starts_with("nightly")) {
            Toolchain::Nightly
        } else {
            Toolchain::StableBootstrap
        }
    }

    /// `cargo [+nightly] fuzz` in fuzz/. The rustup proxy `cargo`, not
    /// $CARGO: only the proxy understands `+nightly`.
    fn cargo_fuzz(self) -> Command {
        let mut c = Command::new("cargo");
        c.current_dir(fuzz_dir());
        // The toolchain cargo xtask runs under must not leak into the
        // fuzz build; it picks its own.
        c.env_remove("RUSTUP_TOOLCHAIN");
        match self {
            Toolchain::Nightly => {
                c.arg("+nightly");
            }
            Toolchain::StableBootstrap => {
                c.env("RUSTC_BOOTSTRAP", "1");
            }
        }
        c.arg("fuzz");
        c
    }
}

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

fn corpus_dir(target: &str) -> PathBuf {
    fuzz_dir().join("corpus").join(target)
}

/// Installs cargo-fuzz when `cargo fuzz` is missing.
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let ok = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("xtask: installing cargo-fuzz");
        sh(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// Seeds, built fuzz targets, then `seconds` of fuzzing for `only` (or
/// every target), one at a time. Fails on the first crash. With `seed`,
/// libFuzzer's random choices are fixed (`-seed=N`), so that the short runs
/// of `cargo xtask test` explore the same inputs on every machine instead of
/// failing at random on a new find; without it, each run explores afresh.
pub fn run(only: Option<&str>, seconds: u64, seed: Option<u64>) -> anyhow::Result<Vec<Outcome>> {
    let targets: Vec<&'static str> = match only {
        Some(t) => {
            let Some((name, _)) = TARGETS.iter().find(|(n, _)| *n == t) else {
                let names: Vec<_> = TARGETS.iter().map(|(n, _)| *n).collect();
                bail!("no fuzz target {t:?}: the targets are {}", names.join(", "));
            };
            vec![*name]
        }
        None => TARGETS.iter().map(|(n, _)| *n).collect(),
    };
    let start = Instant::now();
    ensure_cargo_fuzz()?;
    let tc = Toolchain::pick();
    eprintln!("xtask: fuzzing with {tc:?}");
    sh(tc.cargo_fuzz().arg("build"))?;
    write_seeds(&targets)?;
    let mut outcomes = Vec::new();
    for t in &targets {
        outcomes.push(run_one(tc, t, seconds, seed)?);
    }
    eprintln!(
        "xtask: fuzzing done in {} s (build and seeds included)",
        start.elapsed().as_secs()
    );
    println!(
        "{:<14} {:>12} {:>8} {:>8} {:>8}",
        "target", "executions", "seconds", "corpus", "rss MB"
    );
    for o in &outcomes {
        println!(
            "{:<14} {:>12} {:>8} {:>8} {:>8}",
            o.target, o.executions, o.seconds, o.corpus, o.peak_rss_mb
        );
    }
    Ok(outcomes)
}

fn run_one(
    tc: Toolchain,
    target: &'static str,
    seconds: u64,
    seed: Option<u64>,
) -> anyhow::Result<Outcome> {
    let corpus = corpus_dir(target);
    let log_path = root()
        .join("target/fuzz-logs")
        .join(format!("{target}.log"));
    fs::create_dir_all(log_path.parent().expect("a parent"))?;
    let mut log = fs::File::create(&log_path)?;
    eprintln!(
        "xtask: fuzzing {target} for {seconds} s (log: {})",
        display(&log_path)
    );
    let mut cmd = tc.cargo_fuzz();
    cmd.args(["run", target])
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={}", max_len(target)))
        .args(LIBFUZZER_LIMITS)
        .args(seed.map(|s| format!("-seed={s}")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    // libFuzzer writes to standard error; the target prints nothing.
    let stdout = child.stdout.take().expect("piped");
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut s);
        s
    });
    let mut executions = None;
    let mut done_runs = None;
    let mut peak_rss_mb = 0;
    let mut artifact = None;
    let mut tail: Vec<String> = Vec::new();
    for line in BufReader::new(child.stderr.take().expect("piped")).lines() {
        let line = line?;
        writeln!(log, "{line}")?;
        if let Some(v) = stat(&line, "stat::number_of_executed_units:") {
            executions = Some(v);
        } else if let Some(v) = stat(&line, "stat::peak_rss_mb:") {
            peak_rss_mb = v;
        } else if let Some(rest) = line.strip_prefix("Done ") {
            // "Done 123456 runs in 20 second(s)"
            done_runs = rest.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(i) = line.find("Test unit written to ") {
            artifact = Some(line[i + "Test unit written to ".len()..].trim().to_owned());
        }
        tail.push(line);
        if tail.len() > 60 {
            tail.remove(0);
        }
    }
    let status = child.wait()?;
    let stdout = out_thread.join().unwrap_or_default();
    write!(log, "{stdout}")?;
    if !status.success() || artifact.is_some() {
        for l in &tail {
            eprintln!("  {l}");
        }
        match artifact {
            Some(a) => bail!(
                "fuzz target {target} {} ({status}): input in {a}; keep it in \
                 fuzz/regressions/{target}/ once fixed (full log: {})",
                if a.contains("/slow-unit-") {
                    "took 10 s or more on one input"
                } else {
                    "failed"
                },
                display(&log_path)
            ),
            None => bail!(
                "fuzz target {target} failed ({status}), see {}",
                display(&log_path)
            ),
        }
    }
    let Some(executions) = executions.or(done_runs) else {
        bail!(
            "fuzz target {target}: no execution count in libFuzzer's output ({})",
            display(&log_path)
        );
    };
    let corpus = fs::read_dir(&corpus)?.count();
    let o = Outcome {
        target,
        executions,
        seconds,
        corpus,
        peak_rss_mb,
    };
    eprintln!(
        "xtask: {target}: {executions} executions in {seconds} s, corpus {corpus} inputs, peak RSS {peak_rss_mb} MB"
    );
    Ok(o)
}

fn stat(line: &str, key: &str) -> Option<u64> {
    line.strip_prefix(key)?.trim().parse().ok()
}

/// Writes the seeds of `targets` into their corpora (`fuzz/corpus/<target>/`,
/// which git ignores): fixtures and small images made with qemu-img for the
/// qcow2 targets, writer streams, NBD transcripts. Idempotent.
fn write_seeds(targets: &[&str]) -> anyhow::Result<()> {
    let images = seed_images()?;
    for &t in targets {
        let dir = corpus_dir(t);
        fs::create_dir_all(&dir)?;
        let put = |name: &str, bytes: &[u8]| -> anyhow::Result<()> {
            fs::write(dir.join(format!("seed-{name}")), bytes)
                .with_context(|| format!("writing a seed of {t}"))
        };
        match t {
            "qcow2_header" => {
                for (name, bytes) in &images {
                    let h = sparsekit_qcow2::RawHeader::decode(bytes);
                    let cs = h.map_or(65536, |h| 1usize << h.cluster_bits.get().clamp(9, 16));
                    put(name, &bytes[..bytes.len().min(cs)])?;
                }
            }
            "qcow2_image" | "qcow2_bitmaps" => {
                for (name, bytes) in &images {
                    put(name, bytes)?;
                }
            }
            "qcow2_stream" => {
                for (name, bytes) in seeds::streams() {
                    put(&name, &bytes)?;
                }
                for (name, bytes) in &images {
                    put(name, bytes)?;
                }
            }
            "bmap" => {
                for (name, bytes) in seeds::bmaps() {
                    put(&name, &bytes)?;
                }
            }
            "nbd_client" => {
                for (name, bytes) in seeds::nbd_transcripts() {
                    put(&name, &bytes)?;
                }
            }
            _ => bail!("no seeds for {t}"),
        }
        // Inputs kept as regressions are seeds too.
        let reg = root().join("fuzz/regressions").join(t);
        if let Ok(rd) = fs::read_dir(&reg) {
            for e in rd {
                let p = e?.path();
                let name = format!("regression-{}", p.file_name().unwrap_or_default().display());
                put(&name, &fs::read(&p)?)?;
            }
        }
    }
    Ok(())
}

/// Small qcow2 fixtures (at most 1 MiB) whole, and small images made here
/// with qemu-img and qemu-io for what the fixtures only have in large
/// files: 512-byte clusters, compression, extended L2, bitmaps, snapshots.
fn seed_images() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in [
        "v3.qcow2",
        "v2.qcow2",
        "c512-rc1.qcow2",
        "zlib.qcow2",
        "zstd.qcow2",
        "chain-top.qcow2",
        "unaligned.qcow2",
        "huge-3t.qcow2",
        "datafile.qcow2",
    ] {
        let p = testkit::fixture(name);
        if fs::metadata(&p)?.len() <= MAX_SEED {
            out.push((name.to_owned(), fs::read(&p)?));
        }
    }
    let dir = root().join("target/fuzz-seeds");
    fs::create_dir_all(&dir)?;
    let qemu_img = testkit::require("qemu-img");
    let qemu_io = testkit::require("qemu-io");
    // name, create options, size, qemu-io commands, extra qemu-img steps.
    type Recipe<'a> = (
        &'a str,
        &'a str,
        &'a str,
        &'a [&'a str],
        &'a [&'a [&'a str]],
    );
    let recipes: &[Recipe] = &[
        (
            "c512",
            "cluster_size=512",
            "1M",
            &[
                "write -P 1 0 1536",
                "write -P 2 700k 5000",
                "write -z 64k 4k",
            ],
            &[],
        ),
        (
            "c512-v2",
            "cluster_size=512,compat=0.10",
            "256k",
            &["write -P 3 1k 2k"],
            &[],
        ),
        (
            "c512-rc64",
            "cluster_size=512,refcount_bits=64",
            "256k",
            &["write -P 4 0 4k"],
            &[],
        ),
        (
            "c512-zlib",
            "cluster_size=512",
            "512k",
            &["write -c -P 5 0 4k", "write -P 6 8k 512"],
            &[],
        ),
        (
            "c512-zstd",
            "cluster_size=512,compression_type=zstd",
            "512k",
            &["write -c -P 7 4k 4k"],
            &[],
        ),
        (
            "c16k-extl2",
            "cluster_size=16k,extended_l2=on",
            "1M",
            &[
                "write -P 8 4k 1k",
                "write -z 20k 512",
                "write -P 9 100k 40k",
            ],
            &[],
        ),
        (
            "c512-prealloc",
            "cluster_size=512,preallocation=metadata",
            "64k",
            &["write -P 10 4k 1k"],
            &[],
        ),
        (
            "c512-unaligned",
            "cluster_size=512",
            "100000",
            &["write -P 11 99328 512"],
            &[],
        ),
        (
            "c512-bitmaps",
            "cluster_size=512",
            "1M",
            &[],
            &[
                &["bitmap", "--add", "{img}", "b0"],
                &["bitmap", "--add", "-g", "512", "{img}", "b1"],
                &["bitmap", "--add", "-g", "64k", "{img}", "b2"],
            ],
        ),
        (
            "c512-snapshots",
            "cluster_size=512",
            "256k",
            &["write -P 12 0 4k"],
            &[&["snapshot", "-c", "s1", "{img}"]],
        ),
        (
            "c512-backing",
            "cluster_size=512,backing_file=base.raw,backing_fmt=raw",
            "64k",
            &["write -P 13 0 512"],
            &[],
        ),
    ];
    fs::write(dir.join("base.raw"), vec![0x5a; 65536])?;
    for &(name, opts, size, io, steps) in recipes {
        let img = dir.join(format!("{name}.qcow2"));
        let _ = fs::remove_file(&img);
        let imgs = img.to_str().context("a UTF-8 path")?;
        quiet(
            Command::new(&qemu_img)
                .current_dir(&dir)
                .args(["create", "-q", "-f", "qcow2", "-o", opts, imgs, size]),
        )?;
        for s in steps {
            let args: Vec<&str> = s
                .iter()
                .map(|a| if *a == "{img}" { imgs } else { a })
                .collect();
            quiet(Command::new(&qemu_img).current_dir(&dir).args(&args))?;
        }
        if !io.is_empty() {
            let mut c = Command::new(&qemu_io);
            c.current_dir(&dir).args(["-f", "qcow2"]);
            for cmd in io {
                c.args(["-c", cmd]);
            }
            quiet(c.arg(imgs))?;
        }
        if name == "c512-bitmaps" {
            // Dirty the enabled bitmaps after they exist.
            quiet(Command::new(&qemu_io).args([
                "-f",
                "qcow2",
                "-c",
                "write -P 14 0 1536",
                "-c",
                "write -P 15 300k 64k",
                imgs,
            ]))?;
            quiet(Command::new(&qemu_img).args(["bitmap", "--disable", imgs, "b2"]))?;
        }
        let len = fs::metadata(&img)?.len();
        if len <= MAX_SEED {
            out.push((format!("{name}.qcow2"), fs::read(&img)?));
        } else {
            eprintln!(
                "xtask: seed {} is {len} bytes, over 1 MiB: left out",
                display(&img)
            );
        }
    }
    Ok(out)
}

/// Runs a command, failing with its standard error if it fails.
fn quiet(cmd: &mut Command) -> anyhow::Result<()> {
    crate::output(cmd).map(|_| ())
}
