//! `cargo xtask`: the project's tasks.
//!
//! - `fixtures [--bench]`: generate fixtures/generated from fixtures/manifest.toml.
//! - `test`: install the external tools a fresh machine lacks, generate the
//!   fixtures, run every test of the workspace.
//! - `demo`: release build, fixtures, then the tools at work on them.
//! - `bench`: side-by-side timings against the peers, written to BENCHMARKS.md.
//! - `dist`: release binaries, man pages and shell completions in target/dist.
//! - `fuzz [TARGET] [--seconds N]`: seed and run the cargo-fuzz targets of
//!   fuzz/, one after another; `test` ends with a short run of each.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::Parser;
use sparsekit_testkit as testkit;

mod bench;
mod demo;
mod fuzz;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
enum Task {
    /// Generate the fixtures (idempotent).
    Fixtures {
        /// Also the large benchmark fixtures.
        #[arg(long)]
        bench: bool,
    },
    /// Install missing tools (as root, with apt-get), generate fixtures, run
    /// every test, then fuzz each target briefly.
    Test {
        /// Seconds of fuzzing per target after the tests (0: none).
        #[arg(long, default_value_t = 20)]
        fuzz_seconds: u64,
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Build in release mode and show the tools at work on generated images.
    Demo,
    /// Seed, build and run the cargo-fuzz targets (installs cargo-fuzz if
    /// missing; nightly if rustup has it, else stable with RUSTC_BOOTSTRAP=1).
    Fuzz {
        /// Only this target (default: every one, one after another).
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Release binaries, man pages and bash, zsh and fish completions in
    /// target/dist (bin/, man/man1/, completions/{bash,zsh,fish}/).
    Dist,
    /// Time sparsekit and its peers side by side; write BENCHMARKS.md.
    Bench {
        /// Rounds, each running every command of a workload once: times
        /// and each command's per-round ratio to sparsekit's are reported
        /// by their median and spread.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Only the image workloads (qcow2, W3, NBD, stream), printed to
        /// standard output; BENCHMARKS.md is left as it is.
        #[arg(long, conflicts_with = "only")]
        images_only: bool,
        /// Only these workloads, printed to standard output (fixtures they
        /// need are generated; BENCHMARKS.md is left as it is).
        #[arg(long, value_enum)]
        only: Option<bench::Only>,
    },
}

fn main() -> ExitCode {
    let task = Task::parse();
    let r = match task {
        Task::Fixtures { bench } => ensure_tools().and_then(|()| fixtures(bench)),
        Task::Test {
            fuzz_seconds,
            cargo_args,
        } => test(fuzz_seconds, &cargo_args),
        Task::Demo => ensure_tools().and_then(|()| demo::run()),
        Task::Dist => dist(),
        Task::Fuzz { target, seconds } => {
            ensure_tools().and_then(|()| fuzz::run(target.as_deref(), seconds, None).map(drop))
        }
        Task::Bench {
            runs,
            images_only,
            only,
        } => ensure_tools().and_then(|()| bench::run(runs, images_only, only)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    testkit::workspace_root()
}

/// Installs the Debian packages of the tools the tests and benchmarks use,
/// where a tool is missing: as root with apt-get, otherwise an error
/// naming the packages.
fn ensure_tools() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = testkit::TOOLS
        .iter()
        .filter(|(tool, _)| testkit::which(tool).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 || testkit::which("apt-get").is_none() {
        bail!(
            "missing tools: install the Debian packages {} (as root: apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    sh(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    let still: Vec<&str> = testkit::TOOLS
        .iter()
        .filter(|(tool, _)| testkit::which(tool).is_none())
        .map(|(tool, _)| *tool)
        .collect();
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(", "));
    }
    Ok(())
}

fn fixtures(bench: bool) -> anyhow::Result<()> {
    let fresh = testkit::generate_all(bench);
    eprintln!(
        "xtask: fixtures in {}: {} generated anew",
        testkit::generated_dir().display(),
        fresh.len()
    );
    Ok(())
}

fn test(fuzz_seconds: u64, cargo_args: &[String]) -> anyhow::Result<()> {
    ensure_tools()?;
    fixtures(false)?;
    sh(Command::new(cargo())
        .current_dir(root())
        .args(["test", "--workspace", "--locked"])
        .args(cargo_args))?;
    if fuzz_seconds > 0 {
        fuzz::run(None, fuzz_seconds, Some(1))?;
    }
    Ok(())
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Builds the binaries in release mode; returns the folder they are in.
/// `cargo xtask dist`: what `cargo install` leaves out, beside the
/// binaries.
fn dist() -> anyhow::Result<()> {
    let release = release_build()?;
    let dist = root().join("target/dist");
    if dist.exists() {
        std::fs::remove_dir_all(&dist).with_context(|| format!("emptying {}", dist.display()))?;
    }
    let bin = dist.join("bin");
    std::fs::create_dir_all(&bin)?;
    for name in ["map", "copy", "qcow2-info"] {
        std::fs::copy(release.join(name), bin.join(name))
            .with_context(|| format!("copying {name} into {}", bin.display()))?;
    }
    let pages = sparsekit_cli::dist::write_man_pages(&dist.join("man/man1"))?;
    let completions = sparsekit_cli::dist::write_completions(&dist.join("completions"))?;
    for p in pages.iter().chain(&completions) {
        println!("{}", display(p));
    }
    println!("{}", display(&dist));
    Ok(())
}

fn release_build() -> anyhow::Result<PathBuf> {
    sh(Command::new(cargo()).current_dir(root()).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "sparsekit-cli",
    ]))?;
    Ok(root().join("target/release"))
}

/// Runs a command, failing if it fails.
fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs a command and returns its standard output.
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let o = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn display(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}
