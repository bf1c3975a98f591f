//! `cargo xtask demo`: the tools at work on generated images.

use std::process::Command;

use crate::{display, output, release_build};
use sparsekit_testkit as testkit;

pub fn run() -> anyhow::Result<()> {
    let bin = release_build()?;
    crate::fixtures(false)?;
    let map = bin.join("map");
    let show = |title: &str, cmd: &mut Command, max_lines: usize| -> anyhow::Result<()> {
        let o = cmd
            .output()
            .map_err(|e| anyhow::anyhow!("running {cmd:?}: {e}"))?;
        anyhow::ensure!(
            o.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let args: Vec<String> = cmd.get_args().map(|a| display(a.as_ref())).collect();
        println!(
            "\n== {title}\n$ {} {}",
            display(cmd.get_program().as_ref()),
            args.join(" ")
        );
        let lines: Vec<&str> = text.lines().collect();
        for l in lines.iter().take(max_lines) {
            println!("{l}");
        }
        if lines.len() > max_lines {
            println!("... ({} more lines)", lines.len() - max_lines);
            println!("{}", lines[lines.len() - 1]);
        }
        Ok(())
    };

    let holes = testkit::fixture("holes-data.raw");
    show(
        "map: where the data of a sparse raw file is",
        Command::new(&map).arg(&holes),
        40,
    )?;
    let falloc = testkit::fixture("fallocated.raw");
    show(
        "map: fallocated (unwritten) ranges read as zeros: kind zero, never data",
        Command::new(&map).arg(&falloc),
        40,
    )?;
    show(
        "map --json: what qemu-img map --output=json prints, for scripts written for it",
        Command::new(&map).arg("--json").arg(&holes),
        20,
    )?;
    testkit::drop_cache(&holes);
    show(
        "qemu-img map --output=json -f raw, the same file",
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&holes),
        20,
    )?;
    let huge = testkit::fixture("huge-1t.raw");
    show(
        "map: a 1 TiB file that is nearly all hole",
        Command::new(&map).arg(&huge),
        20,
    )?;
    show(
        "map --start/--length: one range of it",
        Command::new(&map)
            .args(["--start", "512G", "--length", "2M"])
            .arg(&huge),
        20,
    )?;
    let many = testkit::fixture("many-extents.raw");
    let t = std::time::Instant::now();
    let json = output(Command::new(&map).arg("--json").arg(&many))?;
    println!(
        "\n== map --json on {} ({} entries): {:.0} ms",
        display(&many),
        json.lines().count(),
        t.elapsed().as_secs_f64() * 1000.0
    );
    // qcow2: map, info, check, allocation, copy.
    let copy = bin.join("copy");
    let info = bin.join("qcow2-info");
    let top = testkit::fixture("chain-top.qcow2");
    show(
        "map on a qcow2 image with a backing chain (qcow2 over qcow2 over raw): host offsets and layers",
        Command::new(&map).arg(&top),
        30,
    )?;
    show(
        "qcow2-info: like qemu-img info, plus allocation",
        Command::new(&info).arg(&top),
        40,
    )?;
    show(
        "qcow2-info --backing-chain --json: value-equal to qemu-img info --backing-chain --output=json",
        Command::new(&info)
            .args(["--backing-chain", "--json"])
            .arg(&top),
        25,
    )?;
    show(
        "qcow2-info --check: like qemu-img check, same exit codes",
        Command::new(&info).arg("--check").arg(&top),
        10,
    )?;
    let zlib = testkit::fixture("zlib.qcow2");
    show(
        "qcow2-info --allocated: allocated clusters x cluster size",
        Command::new(&info).arg("--allocated").arg(&zlib),
        5,
    )?;
    let bitmaps = testkit::fixture("bitmaps.qcow2");
    show(
        "map --bitmap: a persistent dirty bitmap read offline, as qemu-nbd -B would export it",
        Command::new(&map).args(["--bitmap", "b1"]).arg(&bitmaps),
        20,
    )?;
    let dir = std::env::temp_dir().join(format!("sparsekit-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("chain-top.raw");
    show(
        "copy: a qcow2 chain to a sparse raw file, in parallel, checked with --verify",
        Command::new(&copy).arg("--verify").arg(&top).arg(&out),
        10,
    )?;
    show(
        "qemu-img compare agrees",
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&top)
            .arg(&out),
        5,
    )?;
    let many_out = dir.join("many.raw");
    show(
        "copy: a raw file of 120,000 extents",
        Command::new(&copy).arg(&many).arg(&many_out),
        5,
    )?;
    show(
        "map of the copy: the same extents, holes kept",
        Command::new(&map).arg(&many_out),
        4,
    )?;
    show(
        "copy --json: the result for programs, exact bytes (-p, -q, -n, -S, --target-is-zero as qemu-img spells them)",
        Command::new(&copy)
            .arg("--json")
            .arg(&top)
            .arg(dir.join("top-again.raw")),
        5,
    )?;
    show(
        "map --output=json with qemu-img's names and sizes: 0x100000, 1.5M",
        Command::new(&map)
            .args([
                "--output=json",
                "--start-offset",
                "0x100000",
                "--max-length",
                "1.5M",
            ])
            .arg(&holes),
        5,
    )?;
    // A usage error never costs a file: the copy is refused before DEST is
    // opened for writing, and DEST keeps every byte.
    let before = std::fs::read(&many_out)?;
    let refused = Command::new(&copy)
        .args(["--skip", "2T"])
        .arg(&top)
        .arg(&many_out)
        .output()?;
    anyhow::ensure!(!refused.status.success(), "copy --skip 2T succeeded");
    anyhow::ensure!(std::fs::read(&many_out)? == before, "DEST changed");
    println!(
        "\n== a usage error is refused before DEST is touched (exit status {}; {} unchanged)\n$ copy --skip 2T {} {}\n{}",
        refused.status.code().unwrap_or(-1),
        display(&many_out),
        display(&top),
        display(&many_out),
        String::from_utf8_lossy(&refused.stderr).trim_end()
    );
    // Flashing, as bmaptool does: a bmap, a compressed image, only the
    // listed blocks written, each range checked.
    let bmap = dir.join("holes-data.bmap");
    show(
        "map --bmap: the bmap bmaptool create would write, byte for byte",
        Command::new(&map).arg("--bmap").arg(&holes),
        12,
    )?;
    std::fs::write(&bmap, output(Command::new(&map).arg("--bmap").arg(&holes))?)?;
    let zst = dir.join("holes-data.raw.zst");
    let z = Command::new(testkit::require("zstd"))
        .args(["-q", "-c"])
        .arg(&holes)
        .output()?;
    anyhow::ensure!(z.status.success(), "zstd failed");
    std::fs::write(&zst, z.stdout)?;
    let flashed = dir.join("flashed.raw");
    show(
        "copy --bmap: a zstd-compressed image, decompressed on the fly, only the listed ranges written",
        Command::new(&copy)
            .arg("--bmap")
            .arg(&bmap)
            .arg(&zst)
            .arg(&flashed),
        5,
    )?;
    anyhow::ensure!(
        std::fs::read(&flashed)? == std::fs::read(&holes)?,
        "the flashed image differs"
    );
    println!("(identical to {})", display(&holes));
    std::fs::remove_dir_all(&dir)?;

    let out = Command::new(&map).arg("/dev/null").output()?;
    println!(
        "\n== bad input gets a clear error and exit status {}\n$ map /dev/null\n{}",
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    Ok(())
}
