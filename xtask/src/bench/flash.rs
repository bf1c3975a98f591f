//! Flashing workloads (issue 20), against bmaptool 3.x:
//!
//! - `map --bmap` against `bmaptool create` on W1 and W2 (page cache warm);
//!   the two bmaps are checked identical before timing;
//! - `copy --bmap` against `bmaptool copy --bmap` of W1 and W2 into a new
//!   file; bmaptool always ends with fsync, so sparsekit runs with
//!   `--flush` (the pair that does the same work) and without;
//! - W1 compressed with xz and with zstd (made once by the tools, `-1`,
//!   single-threaded as an image builder's default makes them), copied with
//!   its bmap by both, and by sparsekit without a bmap too (all-zero blocks
//!   found and left as holes).
//!
//! Every copy writes a new file, deleted (its folder synced) before and
//! after each run; each command's output is compared with the image once
//! before timing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, ensure};
use sparsekit_testkit as testkit;

use super::copy::Scratch;
use super::{
    Contender, Hooks, Ratio, Stats, contender, find, measure, note, race, race_with, table,
};
use crate::{display, output};

pub(super) fn run(md: &mut String, bin: &Path, runs: usize) -> anyhow::Result<()> {
    let scratch = Scratch::named(".bench-flash")?;
    let (map, copy) = (bin.join("map"), bin.join("copy"));
    let bmaptool = testkit::require("bmaptool");
    let _ = writeln!(
        md,
        "## Flashing: bmap files and compressed images (issue 20)\n\n\
         Against {}. bmaptool hashes with Python's hashlib (OpenSSL, SHA-NI on this CPU, as \
         sparsekit's sha2), reads and writes in 1 MiB pieces and ends every copy with fsync; \
         for compressed images it pipes the file through `xz -d -c` or `zstd -d`, a process of \
         its own. Page cache warm; every copy writes a new file in the fixtures' folder.\n",
        tool_line(&bmaptool)
    );
    let w1 = testkit::fixture("bench-copy-8g-2k.raw");
    let w2 = testkit::fixture("bench-copy-4g-200k.raw");
    let mut verdicts = Vec::new();
    let mut bmaps = Vec::new();
    for (w, name) in [(&w1, "W1"), (&w2, "W2")] {
        note(&format!("flash: bmap of {name}"));
        let bmap = scratch.path(&format!("{name}.bmap"));
        // Through files, compared by cmp: xtask's own footprint is the
        // floor of every child's peak RSS.
        let theirs = scratch.path(&format!("{name}.bmaptool.bmap"));
        let status = Command::new(&map)
            .arg("--bmap")
            .arg(w)
            .stdout(std::fs::File::create(&bmap)?)
            .status()?;
        ensure!(status.success(), "map --bmap {} failed", w.display());
        output(
            Command::new(&bmaptool)
                .arg("create")
                .arg(w)
                .arg("-o")
                .arg(&theirs),
        )?;
        ensure!(
            same(&bmap, &theirs)?,
            "map --bmap and bmaptool create disagree on {}: not benchmarking a wrong answer",
            w.display()
        );
        let stats = race(
            &[
                contender("sparsekit map --bmap", &[&map, &"--bmap", w]),
                contender("bmaptool create", &[&bmaptool, &"create", w]),
            ],
            runs,
        )?;
        let _ = writeln!(
            md,
            "### `map --bmap` on {name} ({}), identical to bmaptool's\n",
            about(w)
        );
        table(md, &stats);
        let r = super::ratio(&stats, "bmaptool create");
        let _ = writeln!(md);
        verdicts.push(format!(
            "`map --bmap` on {name}: bmaptool create takes {r} sparsekit's time (goal: 5×)"
        ));
        bmaps.push((w, name, bmap));
    }

    let dest = scratch.path("dest.raw");
    let log = scratch.path("stderr.txt");
    for (w, name, bmap) in &bmaps {
        let contenders = [
            contender(
                "sparsekit copy --bmap --flush",
                &[&copy, &"--bmap", bmap, &"--flush", w, &dest],
            ),
            contender("sparsekit copy --bmap", &[&copy, &"--bmap", bmap, w, &dest]),
            contender(
                "bmaptool copy --bmap",
                &[&bmaptool, &"copy", &"--bmap", bmap, w, &dest],
            ),
        ];
        let stats = copies(
            &contenders,
            w,
            &dest,
            &log,
            runs,
            &format!("flash: copy {name}"),
        )?;
        let _ = writeln!(md, "### `copy --bmap` of {name} into a new file\n");
        table(md, &stats);
        let _ = writeln!(md);
        verdicts.push(format!(
            "`copy --bmap` of {name} (both fsync at the end): bmaptool copy takes {} sparsekit's \
             time (goal: 3×)",
            super::ratio(&stats, "bmaptool copy --bmap")
        ));
    }

    let w1_bmap = &bmaps[0].2;
    for (tool, ext) in [("xz", "xz"), ("zstd", "zst")] {
        let z = compressed(&w1, tool, ext)?;
        let contenders = [
            contender(
                "sparsekit copy --bmap --flush",
                &[&copy, &"--bmap", w1_bmap, &"--flush", &z, &dest],
            ),
            contender(
                "sparsekit copy (no bmap) --flush",
                &[&copy, &"--flush", &z, &dest],
            ),
            contender(
                "bmaptool copy --bmap",
                &[&bmaptool, &"copy", &"--bmap", w1_bmap, &z, &dest],
            ),
        ];
        let stats = copies(
            &contenders,
            &w1,
            &dest,
            &log,
            runs,
            &format!("flash: {tool}"),
        )?;
        let _ = writeln!(
            md,
            "### W1 compressed with {tool} (`{}`, {} bytes) into a new file\n",
            display(&z),
            std::fs::metadata(&z)?.len()
        );
        table(md, &stats);
        let decode = decode_time(tool, &z)?;
        let _ = writeln!(
            md,
            "\n`{tool} -d -c` alone, to /dev/null: {decode:.3} s (one core decompressing: the \
             floor for both).\n"
        );
        let theirs = find(&stats, "bmaptool copy --bmap");
        let plain = find(&stats, "sparsekit copy (no bmap) --flush");
        verdicts.push(format!(
            "W1 from {tool}: bmaptool copy --bmap takes {} the time of sparsekit with the bmap, \
             {} the time of sparsekit without one",
            super::ratio(&stats, "bmaptool copy --bmap"),
            Ratio::of(theirs, plain)
        ));
    }
    let _ = writeln!(md, "Flashing, in short:\n");
    for v in verdicts {
        let _ = writeln!(md, "- {v}");
    }
    let _ = writeln!(md);
    Ok(())
}

/// What a bench image is, for a heading.
fn about(w: &Path) -> String {
    testkit::manifest()
        .get(&*w.file_name().unwrap_or_default().to_string_lossy())
        .map_or_else(|| display(w), |f| f.about.clone())
}

/// bmaptool's version line.
fn tool_line(bmaptool: &Path) -> String {
    let v = output(Command::new(bmaptool).arg("--version")).unwrap_or_default();
    let v = v.trim();
    if v.is_empty() {
        "bmaptool".into()
    } else {
        v.into()
    }
}

/// Runs each contender once, checks that it wrote `image`'s bytes to
/// `dest`, then races them, `dest` removed around each run.
fn copies(
    contenders: &[Contender],
    image: &Path,
    dest: &Path,
    log: &Path,
    runs: usize,
    what: &str,
) -> anyhow::Result<Vec<Stats>> {
    for c in contenders {
        super::remove_and_sync(dest)?;
        measure(&c.argv, Some(log))?;
        let same = same(image, dest)?;
        ensure!(
            same,
            "{}: the copy differs from {}",
            c.label,
            image.display()
        );
    }
    super::remove_and_sync(dest)?;
    race_with(
        contenders,
        runs,
        &mut Hooks {
            stderr_log: Some(log),
            ..super::fresh_dest(dest, image, false, what)
        },
    )
}

/// Whether files `a` and `b` hold the same bytes (cmp).
fn same(a: &Path, b: &Path) -> anyhow::Result<bool> {
    Ok(Command::new("cmp")
        .arg(a)
        .arg(b)
        .stdout(Stdio::null())
        .status()?
        .success())
}

/// `image` compressed by `tool -1` (single-threaded), made once beside it
/// and remade when older than the image.
fn compressed(image: &Path, tool: &str, ext: &str) -> anyhow::Result<PathBuf> {
    let z = PathBuf::from(format!("{}.{ext}", image.display()));
    let fresh = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if fresh(&z).is_some() && fresh(&z) >= fresh(image) {
        return Ok(z);
    }
    note(&format!(
        "flash: compressing {} with {tool}",
        display(image)
    ));
    let tmp = z.with_extension("tmp");
    let status = Command::new(testkit::require(tool))
        .args(["-1", "-T1", "-c"])
        .arg(image)
        .stdout(std::fs::File::create(&tmp)?)
        .status()
        .with_context(|| format!("running {tool}"))?;
    ensure!(status.success(), "{tool} failed on {}", image.display());
    std::fs::rename(&tmp, &z)?;
    Ok(z)
}

/// Seconds `tool -d -c z > /dev/null` takes, once.
fn decode_time(tool: &str, z: &Path) -> anyhow::Result<f64> {
    let argv: Vec<std::ffi::OsString> = vec![
        testkit::require(tool).into(),
        "-d".into(),
        "-c".into(),
        z.into(),
    ];
    Ok(measure(&argv, None)?.secs)
}
