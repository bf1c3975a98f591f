//! Benchmarks of the image workloads: the qcow2 allocation bitmap and map
//! (against the XCP-ng Python walk and qemu-img map), copying a qcow2 image
//! (W3, plain and compressed) against qemu-img convert and nbdcopy, copying
//! and mapping over NBD against nbdcopy and nbdinfo, and decoding a qcow2
//! stream from a pipe against qemu-img convert from a file.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::ensure;
use sparsekit_testkit as testkit;

use super::{
    Ratio, SYNCED, Stats, contender, durable, find, fresh_dest, note, race, race_with, ratio,
    same_map, table,
};
use crate::{display, root, sh};

/// The best peer: of the contenders whose label does not start with
/// "sparsekit", the one with the smallest paired ratio to the race's first.
/// Rows followed by sync are compared only with each other: with `synced`,
/// sparsekit's synced row against the peers' synced rows.
fn best_peer(stats: &[Stats], synced: bool) -> Option<(&str, Ratio)> {
    let base = stats
        .iter()
        .find(|s| s.label.starts_with("sparsekit") && s.label.ends_with(SYNCED) == synced)?;
    stats
        .iter()
        .filter(|s| !s.label.starts_with("sparsekit") && s.label.ends_with(SYNCED) == synced)
        .map(|s| (s.label.as_str(), Ratio::of(s, base)))
        .min_by(|a, b| a.1.median.total_cmp(&b.1.median))
}

fn same_bytes(a: &Path, b: &Path) -> anyhow::Result<bool> {
    Ok(Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()?
        .success())
}

pub(super) fn run(md: &mut String, bin: &Path, runs: usize) -> anyhow::Result<()> {
    let map = bin.join("map");
    let copy = bin.join("copy");
    let info = bin.join("qcow2-info");
    let port = root().join("xtask/bench/xcpng_qcow2_allocation.py");
    let scratch = testkit::generated_dir().join("bench-scratch");
    std::fs::create_dir_all(&scratch)?;

    // --- qcow2 allocation bitmap and map (issue 3) ---
    super::empty_page_cache();
    let big = testkit::fixture("bench-1t-100k.qcow2");
    note("qcow2 bitmap: checking sparsekit against the XCP-ng port");
    let ours_bm = scratch.join("ours.bitmap");
    let port_bm = scratch.join("port.bitmap");
    sh(Command::new(&info)
        .arg("--bitmap")
        .arg("--bitmap-file")
        .arg(&ours_bm)
        .arg(&big))?;
    sh(Command::new("python3")
        .arg(&port)
        .arg(&big)
        .arg("--output")
        .arg(&port_bm))?;
    let (a, b) = (std::fs::read(&ours_bm)?, std::fs::read(&port_bm)?);
    // The port writes l1_size × 1024 bytes, ours ceil(clusters / 8): the
    // common part must agree and the port's extra bytes be zero.
    ensure!(
        b.len() >= a.len() && a[..] == b[..a.len()] && b[a.len()..].iter().all(|&x| x == 0),
        "qcow2-info --bitmap and the XCP-ng port disagree on {}",
        big.display()
    );
    let set: u32 = a.iter().map(|x| x.count_ones()).sum();
    let stats = race(
        &[
            contender(
                "sparsekit qcow2-info --bitmap",
                &[&info, &"--bitmap", &"--bitmap-file", &"/dev/null", &big],
            ),
            contender(
                "XCP-ng sm walk (Python port) bitmap",
                &[&"python3", &port, &big, &"--output", &"/dev/null"],
            ),
            contender(
                "sparsekit qcow2-info --allocated",
                &[&info, &"--allocated", &big],
            ),
            contender(
                "XCP-ng sm walk (Python port) --allocated",
                &[&"python3", &port, &big, &"--allocated"],
            ),
        ],
        runs,
    )?;
    let _ = writeln!(
        md,
        "## qcow2-info --bitmap: a 1 TiB qcow2 with {set} allocated clusters\n\n\
         `{}`: 1 TiB virtual, 64 KiB clusters, one 512-byte write every ~10.5 MB (qemu-io). \
         The baseline is a faithful Python port of XCP-ng sm's `drivers/qcow2util.py` \
         (`QCowUtil.getBlockBitmap` / `getAllocatedSize`), `xtask/bench/xcpng_qcow2_allocation.py`; \
         both bitmaps are checked equal before timing.\n",
        display(&big)
    );
    table(md, &stats);
    let _ = writeln!(
        md,
        "\n`qcow2-info --bitmap` against the XCP-ng walk: {:.0} (goal: 50×); \
         `--allocated` against the walk's `--allocated`: {:.0} (above 1: sparsekit faster).\n",
        ratio(&stats, "XCP-ng sm walk (Python port) bitmap"),
        Ratio::of(
            find(&stats, "XCP-ng sm walk (Python port) --allocated"),
            find(&stats, "sparsekit qcow2-info --allocated"),
        ),
    );

    note("qcow2 map: checking sparsekit against qemu-img");
    testkit::drop_cache(&big);
    let (same, _) = same_map(
        Command::new(&map).arg("--json").arg(&big),
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "qcow2"])
            .arg(&big),
    )?;
    ensure!(
        same,
        "map --json and qemu-img map disagree on {}",
        big.display()
    );
    let stats = race(
        &[
            contender("sparsekit map --json", &[&map, &"--json", &big]),
            contender(
                "qemu-img map",
                &[&"qemu-img", &"map", &"--output=json", &"-f", &"qcow2", &big],
            ),
        ],
        runs,
    )?;
    let _ = writeln!(
        md,
        "## map --json: the same 1 TiB qcow2\n\nBoth maps checked equal before timing.\n"
    );
    table(md, &stats);
    let _ = writeln!(
        md,
        "\n`map --json` against `qemu-img map`: {:.1} (goal: no slower).\n",
        ratio(&stats, "qemu-img map")
    );

    check(md, bin, runs)?;

    // --- W3: a 16 GiB qcow2 with 3 GiB of data, plain and compressed (issue 4) ---
    for (name, what) in [
        ("bench-w3.qcow2", "qcow2"),
        ("bench-w3-zlib.qcow2", "qcow2, zlib-compressed clusters"),
    ] {
        super::empty_page_cache();
        let img = testkit::fixture(name);
        let out = scratch.join("w3.raw");
        let reference = scratch.join("w3-qemu.raw");
        note(&format!("W3 {name}: reference copy with qemu-img convert"));
        let _ = std::fs::remove_file(&reference);
        sh(Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&img)
            .arg(&reference))?;
        let nbdcopy_src = format!("[ qemu-nbd -r -f qcow2 {} ]", img.display());
        let nbdcopy = |label: &str, flags: &str| {
            contender(
                label,
                &[
                    &"sh",
                    &"-c",
                    &format!("nbdcopy {flags}-- {nbdcopy_src} {}", out.display()),
                ],
            )
        };
        let qemu = |m: &str| {
            contender(
                &format!("qemu-img convert -m {m} -W"),
                &[
                    &"qemu-img",
                    &"convert",
                    &"-m",
                    &m,
                    &"-W",
                    &"-O",
                    &"raw",
                    &img,
                    &out,
                ],
            )
        };
        let sparsekit = contender("sparsekit copy", &[&copy, &"--no-progress", &img, &out]);
        let qemu16 = qemu("16");
        let nbdcopy16 = nbdcopy("nbdcopy --requests=16 (qemu-nbd)", "--requests=16 ");
        let contenders = [
            sparsekit.clone(),
            contender(
                "sparsekit copy -j 1",
                &[&copy, &"--no-progress", &"-j", &"1", &img, &out],
            ),
            contender(
                "qemu-img convert",
                &[&"qemu-img", &"convert", &"-O", &"raw", &img, &out],
            ),
            qemu("8"),
            qemu16.clone(),
            nbdcopy("nbdcopy (qemu-nbd)", ""),
            nbdcopy16.clone(),
            durable(&sparsekit, &out),
            durable(&qemu16, &out),
            durable(&nbdcopy16, &out),
        ];
        for c in &contenders {
            let _ = std::fs::remove_file(&out);
            sh(Command::new(&c.argv[0]).args(&c.argv[1..]))?;
            ensure!(
                same_bytes(&out, &reference)?,
                "{}: output differs from qemu-img convert",
                c.label
            );
        }
        let warm = race_with(
            &contenders,
            runs,
            &mut fresh_dest(&out, &img, false, "W3 warm"),
        )?;
        let cold = race_with(
            &contenders,
            runs,
            &mut fresh_dest(&out, &img, true, "W3 cold"),
        )?;
        let _ = std::fs::remove_file(&out);
        let _ = writeln!(
            md,
            "## W3: copy a 16 GiB {what} with 3 GiB of data to a raw file\n\n\
             `{}`; every output checked byte-identical to `qemu-img convert` first. \
             nbdcopy reads the image through qemu-nbd (its usual way to read qcow2). \
             None of these fsyncs the destination; sparsekit and nbdcopy write it back \
             during the copy (sync_file_range) and drop its pages; qemu-img leaves it in the page cache.\n\n\
             **Warm** (the image's pages cached):\n",
            display(&img)
        );
        table(md, &warm);
        let _ = writeln!(
            md,
            "\n**Cold** (the image's pages dropped before every run, posix_fadvise DONTNEED):\n"
        );
        table(md, &cold);
        for (synced, what) in [
            (false, "Against the best peer"),
            (true, "Durable (each followed by sync)"),
        ] {
            if let (Some((wpeer, w)), Some((cpeer, c))) =
                (best_peer(&warm, synced), best_peer(&cold, synced))
            {
                let _ = writeln!(
                    md,
                    "\n{what}, above 1: sparsekit faster: warm, {wpeer}: {w}; cold, {cpeer}: {c}."
                );
            }
        }
        md.push('\n');
    }

    // --- NBD: copy and map from qemu-nbd over a Unix socket (issue 6) ---
    super::empty_page_cache();
    let img = testkit::fixture("bench-w3.qcow2");
    let sock = scratch.join("nbd.sock");
    let server = testkit::Server::start(
        "qemu-nbd",
        &[
            "-r",
            "-f",
            "qcow2",
            "--persistent",
            "--shared=16",
            "-k",
            sock.to_str().unwrap(),
            img.to_str().unwrap(),
        ],
        &sock,
    );
    let uri = server.uri();
    let out = scratch.join("nbd.raw");
    let reference = scratch.join("w3-qemu.raw");
    for c in [
        vec![
            copy.clone().into_os_string(),
            "--no-progress".into(),
            uri.clone().into(),
            out.clone().into_os_string(),
        ],
        vec![
            "nbdcopy".into(),
            uri.clone().into(),
            out.clone().into_os_string(),
        ],
    ] {
        let _ = std::fs::remove_file(&out);
        sh(Command::new(&c[0]).args(&c[1..]))?;
        ensure!(
            same_bytes(&out, &reference)?,
            "{:?}: output differs from qemu-img convert",
            c[0]
        );
    }
    let mut hooks = fresh_dest(&out, &img, false, "NBD copy");
    let qemu = |flags: &[&str]| {
        let label = ["qemu-img convert"].iter().chain(flags).copied();
        let mut argv: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"qemu-img", &"convert", &"-f", &"raw", &"-O", &"raw"];
        argv.extend(flags.iter().map(|f| f as &dyn AsRef<std::ffi::OsStr>));
        argv.extend([&uri as &dyn AsRef<std::ffi::OsStr>, &out]);
        contender(&label.collect::<Vec<_>>().join(" "), &argv)
    };
    let sparsekit = contender("sparsekit copy", &[&copy, &"--no-progress", &uri, &out]);
    let nbdcopy16 = contender(
        "nbdcopy --requests=16",
        &[&"nbdcopy", &"--requests=16", &uri, &out],
    );
    let qemu16 = qemu(&["-m", "16", "-W"]);
    let stats = race_with(
        &[
            sparsekit.clone(),
            contender("nbdcopy", &[&"nbdcopy", &uri, &out]),
            nbdcopy16.clone(),
            qemu(&[]),
            qemu(&["-m", "8", "-W"]),
            qemu16.clone(),
            durable(&sparsekit, &out),
            durable(&nbdcopy16, &out),
            durable(&qemu16, &out),
        ],
        runs,
        &mut hooks,
    )?;
    let _ = std::fs::remove_file(&out);
    let _ = writeln!(
        md,
        "## NBD: copy W3 from qemu-nbd over a Unix socket\n\n\
         `qemu-nbd -r -f qcow2 --shared=16` serving `{}`; nbdcopy with its defaults and with 16 requests in flight, qemu-img with 8 and 16 coroutines and out-of-order writes. Outputs checked \
         byte-identical to `qemu-img convert` of the image first.\n",
        display(&img)
    );
    table(md, &stats);
    for (synced, what) in [
        (false, "Against the best peer"),
        (true, "Durable (each followed by sync)"),
    ] {
        if let Some((peer, r)) = best_peer(&stats, synced) {
            let _ = writeln!(md, "\n{what}, {peer}: {r} (above 1: sparsekit faster).");
        }
    }
    md.push('\n');
    let stats = race(
        &[
            contender("sparsekit map --json", &[&map, &"--json", &uri]),
            contender(
                "sparsekit map --context base:allocation --json",
                &[&map, &"--context", &"base:allocation", &"--json", &uri],
            ),
            contender("nbdinfo --map", &[&"nbdinfo", &"--map", &uri]),
            contender(
                "nbdinfo --map --json",
                &[&"nbdinfo", &"--map", &"--json", &uri],
            ),
        ],
        runs,
    )?;
    let _ = writeln!(md, "## NBD: map the same export\n");
    table(md, &stats);
    let _ = writeln!(
        md,
        "\n`map --json` against `nbdinfo --map`: {}.\n",
        ratio(&stats, "nbdinfo --map")
    );
    drop(server);

    // --- qcow2 stream from a pipe (issue 5) ---
    super::empty_page_cache();
    let raw = testkit::fixture("bench-w3.raw");
    let stream = scratch.join("w3-stream.qcow2");
    note("stream: writing the W3 stream once");
    let _ = std::fs::remove_file(&stream);
    sh(Command::new(&copy)
        .args(["--no-progress", "-O", "qcow2"])
        .arg(&raw)
        .arg(&stream))?;
    let out = scratch.join("stream.raw");
    let pipe = format!(
        "cat {} | {} --no-progress - {}",
        stream.display(),
        copy.display(),
        out.display()
    );
    let _ = std::fs::remove_file(&out);
    sh(Command::new("sh").arg("-c").arg(&pipe))?;
    let reference = scratch.join("w3-qemu.raw");
    ensure!(
        same_bytes(&out, &reference)?,
        "the stream decoded to other bytes than qemu-img convert"
    );
    let mut hooks = fresh_dest(&out, &stream, false, "stream");
    let stats = race_with(
        &[
            contender("sparsekit: cat stream | copy - OUT", &[&"sh", &"-c", &pipe]),
            contender(
                "qemu-img convert (from the file)",
                &[&"qemu-img", &"convert", &"-O", &"raw", &stream, &out],
            ),
        ],
        runs,
        &mut hooks,
    )?;
    let _ = std::fs::remove_file(&out);
    let _ = writeln!(
        md,
        "## qcow2 stream: decode 16 GiB virtual / 3 GiB data from a pipe\n\n\
         The stream is W3 written by `copy -O qcow2` (forward layout of qemu's qcow2-to-stdout); \
         sparsekit reads it from `cat` through a pipe, qemu-img (which cannot read a pipe) converts \
         the same image from the file. Outputs checked identical first.\n"
    );
    table(md, &stats);
    let _ = writeln!(
        md,
        "\nAgainst qemu-img from a file: {}.\n",
        ratio(&stats, "qemu-img convert (from the file)")
    );
    for f in [
        "w3-qemu.raw",
        "w3-stream.qcow2",
        "ours.bitmap",
        "port.bitmap",
    ] {
        let _ = std::fs::remove_file(scratch.join(f));
    }
    Ok(())
}

/// `qcow2-info --check` against `qemu-img check` on the 1 TiB image of
/// 100,000 clusters, warm: both results checked equal before timing.
pub(super) fn check(md: &mut String, bin: &Path, runs: usize) -> anyhow::Result<()> {
    let info = bin.join("qcow2-info");
    let big = testkit::fixture("bench-1t-100k.qcow2");
    note("qcow2 check: checking sparsekit against qemu-img");
    let json = |cmd: &mut Command| -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&crate::output(cmd)?)?)
    };
    let ours = json(Command::new(&info).args(["--check", "--json"]).arg(&big))?;
    let theirs = json(
        Command::new("qemu-img")
            .args(["check", "--output=json"])
            .arg(&big),
    )?;
    ensure!(
        ours == theirs,
        "qcow2-info --check and qemu-img check disagree on {}: {ours} against {theirs}",
        big.display()
    );
    let stats = race(
        &[
            contender("sparsekit qcow2-info --check", &[&info, &"--check", &big]),
            contender("qemu-img check", &[&"qemu-img", &"check", &big]),
        ],
        runs,
    )?;
    let _ = writeln!(
        md,
        "## qcow2-info --check: the same 1 TiB qcow2, warm\n\n\
         Both results (`--json`, `--output=json`) checked equal before timing.\n"
    );
    table(md, &stats);
    let _ = writeln!(
        md,
        "\n`qcow2-info --check` against `qemu-img check`: {:.2} (above 1: sparsekit faster).\n",
        ratio(&stats, "qemu-img check")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(rows: &[(&str, [f64; 2])]) -> Vec<Stats> {
        rows.iter()
            .map(|(label, secs)| crate::bench::timed(label, secs))
            .collect()
    }

    #[test]
    fn synced_rows_are_compared_only_with_each_other() {
        let s = stats(&[
            ("sparsekit copy", [1.0, 1.0]),
            ("qemu-img convert", [2.0, 2.0]),
            ("sparsekit copy, then sync DEST", [4.0, 4.0]),
            ("qemu-img convert, then sync DEST", [3.0, 3.0]),
            ("nbdcopy, then sync DEST", [5.0, 6.0]),
        ]);
        let (peer, r) = best_peer(&s, false).unwrap();
        assert_eq!((peer, r.median), ("qemu-img convert", 2.0));
        let (peer, r) = best_peer(&s, true).unwrap();
        assert_eq!((peer, r.median), ("qemu-img convert, then sync DEST", 0.75));
        assert!(best_peer(&s[..2], true).is_none());
    }
}
