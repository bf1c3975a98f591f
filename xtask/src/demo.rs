//! `cargo xtask demo`: the tools at work on generated images.

use std::process::Command;

use crate::{display, output, release_build};
use sparsekit_testkit as testkit;

pub fn run() -> anyhow::Result<()> {
    let bin = release_build()?;
    crate::fixtures(false)?;
    let map = bin.join("map");
    let show = |title: &str, cmd: &mut Command, max_lines: usize| -> anyhow::Result<()> {
        let text = output(cmd)?;
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
    let out = Command::new(&map).arg("/dev/null").output()?;
    println!(
        "\n== bad input gets a clear error and exit status {}\n$ map /dev/null\n{}",
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    Ok(())
}
