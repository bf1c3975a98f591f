//! The ecosystem's conventions: qemu-img's and nbdcopy's spellings
//! (`-p`, `-q`, `--output=json`, `-n`, `--target-is-zero`, `-S`,
//! `--progress=FD`), results for programs (`copy --json`), `--version`,
//! and the man pages and completions an installation ships, each checked
//! against the tool whose spelling it borrows.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use sparsekit_testkit::{LoopDevice, fixture, require, run};

fn tool(bin: &str, args: &[&str]) -> Output {
    let exe = match bin {
        "map" => env!("CARGO_BIN_EXE_map"),
        "copy" => env!("CARGO_BIN_EXE_copy"),
        _ => env!("CARGO_BIN_EXE_qcow2-info"),
    };
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(o: &Output, what: &str) -> (String, String) {
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(o.status.success(), "{what} failed: {err}");
    (out, err)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A raw file of `len` bytes filled with `byte`.
fn filled(path: &Path, len: usize, byte: u8) {
    std::fs::write(path, vec![byte; len]).unwrap();
}

/// A qcow2 image with some data, written by qemu-io.
fn qcow2_image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("img.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "64M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 1M 3M",
            "-c",
            "write -z 8M 1M",
            s(&img),
        ],
    );
    img
}

#[test]
fn version_names_sparsekit() {
    for bin in ["map", "copy", "qcow2-info"] {
        let (out, _) = ok(&tool(bin, &["--version"]), bin);
        assert_eq!(
            out,
            format!("{bin} (sparsekit) {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
    // qcow2-info opens no NBD URI: it offers no NBD flags.
    let (help, _) = ok(&tool("qcow2-info", &["--help"]), "qcow2-info --help");
    assert!(
        !help.contains("--timeout") && !help.contains("--tls"),
        "{help}"
    );
    let (help, _) = ok(&tool("map", &["--help"]), "map --help");
    assert!(help.contains("--timeout") && help.contains("--tls-certificates"));
}

#[test]
fn qemu_img_s_output_spellings() {
    let dir = tempfile::tempdir().unwrap();
    let img = qcow2_image(dir.path());
    let raw = fixture("holes-data.raw");
    for src in [s(&img), s(&raw)] {
        let json = ok(&tool("map", &["--json", src]), "map --json").0;
        for spelled in [&["--output=json", src][..], &["--output", "json", src]] {
            assert_eq!(
                ok(&tool("map", spelled), "map --output").0,
                json,
                "{spelled:?}"
            );
        }
        let table = ok(&tool("map", &[src]), "map").0;
        assert_eq!(ok(&tool("map", &["--output=human", src]), "human").0, table);
        // qemu-img map's --start-offset and --max-length.
        let part = ok(
            &tool("map", &["--json", "--start", "1M", "--length", "2M", src]),
            "",
        )
        .0;
        let qemu_spelled = ["--json", "--start-offset=1M", "--max-length=2M", src];
        assert_eq!(ok(&tool("map", &qemu_spelled), "qemu's names").0, part);
    }
    let info = ok(&tool("qcow2-info", &["--json", s(&img)]), "info --json").0;
    let spelled = ok(&tool("qcow2-info", &["--output=json", s(&img)]), "").0;
    assert_eq!(spelled, info);
    let v: Value = serde_json::from_str(&spelled).unwrap();
    assert_eq!(v["format"], "qcow2");
    let human = ok(&tool("qcow2-info", &[s(&img)]), "info").0;
    assert_eq!(
        ok(&tool("qcow2-info", &["--output=human", s(&img)]), "").0,
        human
    );
    let check = ok(
        &tool("qcow2-info", &["--check", "--output=json", s(&img)]),
        "",
    )
    .0;
    let v: Value = serde_json::from_str(&check).unwrap();
    assert_eq!(v["check-errors"], 0, "{check}");
    // A format qemu-img does not know is refused, as by qemu-img.
    assert!(!tool("map", &["--output=yaml", s(&img)]).status.success());
}

#[test]
fn quiet_prints_nothing_but_errors() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("d.raw");
    let o = tool("copy", &["-q", s(&fixture("holes-data.raw")), s(&dst)]);
    assert!(o.status.success());
    assert_eq!((o.stdout.len(), o.stderr.len()), (0, 0), "{o:?}");
    let loud = tool("copy", &[s(&fixture("holes-data.raw")), s(&dst)]);
    assert!(!ok(&loud, "copy").1.is_empty(), "the summary line");
    let o = tool("copy", &["-q", "/nonexistent/source", s(&dst)]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("copy: error: /nonexistent/source"));
}

/// `copy -p`'s lines on a standard error that is a pipe, as qemu-img -p
/// prints them: `    (N.NN/100%)`, rising, ending at 100.
#[test]
fn progress_lines_when_standard_error_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("holes-data.raw");
    for flag in ["-p", "--progress"] {
        let o = tool("copy", &[flag, s(&src), s(&dir.path().join("d"))]);
        let (_, err) = ok(&o, flag);
        let lines: Vec<&str> = err.lines().filter(|l| l.ends_with("/100%)")).collect();
        let percents: Vec<f64> = lines
            .iter()
            .map(|l| {
                let n = l.strip_prefix("    (").expect("qemu-img's indent");
                n.split('/').next().unwrap().parse().unwrap()
            })
            .collect();
        assert!(percents.len() > 2, "{flag}: {err}");
        assert!(percents.windows(2).all(|w| w[0] < w[1]), "{percents:?}");
        assert_eq!((percents[0], *percents.last().unwrap()), (0.0, 100.0));
    }
    // Without -p (or with --no-progress after it) nothing but the summary.
    for args in [&[][..], &["-p", "--no-progress"]] {
        let e = dir.path().join("e");
        let mut a = args.to_vec();
        a.extend([s(&src), s(&e)]);
        let (_, err) = ok(&tool("copy", &a), "copy");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    // The same shape as qemu-img's own -p into a pipe.
    let o = Command::new(require("qemu-img"))
        .args([
            "convert",
            "-p",
            "-O",
            "raw",
            s(&src),
            s(&dir.path().join("q")),
        ])
        .output()
        .unwrap();
    let qemu = String::from_utf8_lossy(&o.stdout);
    assert!(qemu.contains("    (100.00/100%)"), "{qemu}");
}

/// Runs `argv` with file descriptor 3 the write end of a pipe, and returns
/// what was read from the pipe.
fn read_fd3(argv: &[&str]) -> (Output, String) {
    let (mut reader, writer) = std::io::pipe().unwrap();
    let fd = writer.as_raw_fd();
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null());
    // SAFETY: dup2 is async-signal-safe; it only puts the pipe at fd 3 of
    // the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(writer);
    let mut text = String::new();
    reader.read_to_string(&mut text).unwrap();
    (child.wait_with_output().unwrap(), text)
}

/// `--progress=FD`, read back from a pipe: nbdcopy's `N/100` lines, as
/// nbdcopy itself writes them for the same copy.
#[test]
fn progress_to_a_file_descriptor_as_nbdcopy() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("holes-data.raw");
    let dst = dir.path().join("d.raw");
    let (o, ours) = read_fd3(&[env!("CARGO_BIN_EXE_copy"), "--progress=3", s(&src), s(&dst)]);
    ok(&o, "copy --progress=3");
    let percents: Vec<u32> = ours
        .lines()
        .map(|l| l.strip_suffix("/100").expect("N/100").parse().unwrap())
        .collect();
    assert!(percents.len() > 2, "{ours}");
    assert!(percents.windows(2).all(|w| w[0] < w[1]), "{percents:?}");
    assert_eq!((percents[0], *percents.last().unwrap()), (0, 100));
    // nbdcopy's lines for the same copy have the same form and end.
    let nbdcopy = require("nbdcopy");
    let (o, theirs) = read_fd3(&[
        s(&nbdcopy),
        "--progress=3",
        s(&src),
        s(&dir.path().join("n.raw")),
    ]);
    assert!(o.status.success(), "{o:?}");
    assert!(theirs.lines().all(|l| {
        l.strip_suffix("/100")
            .is_some_and(|n| n.parse::<u32>().is_ok())
    }));
    assert_eq!(theirs.lines().last(), Some("100/100"));
    // A descriptor that is not open is refused before anything is made.
    let o = tool("copy", &["--progress=9", s(&src), s(&dir.path().join("x"))]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--progress=9"));
    assert!(!dir.path().join("x").exists());
}

/// The bytes `qemu-img map` says hold data.
fn data_bytes(path: &Path) -> u64 {
    let v = sparsekit_testkit::qemu_img_map(path, "raw", &[]);
    (v.as_array().unwrap().iter())
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn copy_json_is_one_object_for_programs() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("holes-data.raw");
    let dst = dir.path().join("d.raw");
    let (out, err) = ok(&tool("copy", &["--json", s(&src), s(&dst)]), "copy --json");
    assert!(err.is_empty(), "the summary goes, not beside JSON: {err}");
    let v: Value = serde_json::from_str(&out).expect("one JSON object");
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    let size = std::fs::metadata(&src).unwrap().len();
    assert_eq!(
        (v["source"].as_str(), v["destination"].as_str()),
        (Some(s(&src)), Some(s(&dst)))
    );
    assert_eq!(n("bytes_total"), size);
    assert_eq!(n("bytes_read"), data_bytes(&src));
    assert_eq!(
        n("bytes_written") + n("bytes_zero_detected"),
        n("bytes_read")
    );
    // A new file: nothing to zero, everything unwritten is a hole.
    assert_eq!(n("bytes_zeroed"), 0);
    assert_eq!(n("bytes_holes"), size - n("bytes_written"));
    assert!(v["seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());

    // A device is zeroed where the image has no data.
    let disk = dir.path().join("disk.img");
    filled(&disk, size as usize, 0xa5);
    let dev = LoopDevice::over(&disk);
    let (out, _) = ok(
        &tool("copy", &["--json", s(&src), s(&dev.dev)]),
        "onto a device",
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["bytes_zeroed"].as_u64(),
        Some(size - v["bytes_written"].as_u64().unwrap())
    );
    assert_eq!(v["bytes_holes"], 0);
    drop(dev);
    assert_eq!(std::fs::read(&disk).unwrap(), std::fs::read(&src).unwrap());

    // A raw stream on standard input: every byte read, zero blocks left
    // as holes, and nothing counted twice.
    let o = Command::new(env!("CARGO_BIN_EXE_copy"))
        .args(["--json", "-", s(&dir.path().join("in.raw"))])
        .stdin(std::fs::File::open(&src).unwrap())
        .output()
        .unwrap();
    let v: Value = serde_json::from_str(&ok(&o, "copy --json -").0).unwrap();
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    assert_eq!((n("bytes_total"), n("bytes_read")), (size, size));
    assert_eq!(n("bytes_written") + n("bytes_holes"), size, "{v}");
    assert_eq!(n("bytes_written"), data_bytes(&src), "{v}");
    // To standard output every byte is written, zeros too: no holes.
    let o = Command::new(env!("CARGO_BIN_EXE_copy"))
        .args([s(&src), "-"])
        .stdout(std::fs::File::create(dir.path().join("out.raw")).unwrap())
        .output()
        .unwrap();
    let summary = ok(&o, "copy SRC -").1;
    assert!(
        summary.contains("wrote 64 MiB, zeroed 0 B, left 0 B unwritten"),
        "{summary}"
    );
    // Standard output carries the image there: --json is refused first.
    let o = tool("copy", &["--json", s(&src), "-"]);
    assert!(!o.status.success() && o.stdout.is_empty());
}

/// `-n` and `--target-is-zero` as `qemu-img convert -n [--target-is-zero]`:
/// the same bytes in the same pre-filled file.
#[test]
fn no_create_and_target_is_zero_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("holes-data.raw");
    let size = std::fs::metadata(&src).unwrap().len() as usize;
    let bytes = |p: &Path| std::fs::read(p).unwrap();
    for flags in [&["-n"][..], &["-n", "--target-is-zero"]] {
        let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
        // Longer than the image: the tail is not ours to touch.
        filled(&ours, size + 65536, 0xa5);
        filled(&theirs, size + 65536, 0xa5);
        let mut a = flags.to_vec();
        a.extend([s(&src), s(&ours)]);
        ok(&tool("copy", &a), &format!("copy {flags:?}"));
        let mut q = vec!["convert", "-f", "raw", "-O", "raw"];
        q.extend_from_slice(flags);
        q.extend([s(&src), s(&theirs)]);
        run("qemu-img", &q);
        assert!(
            bytes(&ours) == bytes(&theirs),
            "{flags:?}: not qemu-img's bytes"
        );
        assert!(
            bytes(&ours)[size..].iter().all(|&b| b == 0xa5),
            "{flags:?}: tail touched"
        );
        let holes_kept = bytes(&ours)[..size] != bytes(&src)[..];
        assert_eq!(holes_kept, flags.len() == 2, "{flags:?}");
    }
    // --dest-is-zero is the same flag.
    let d = dir.path().join("d");
    filled(&d, size + 65536, 0xa5);
    ok(&tool("copy", &["-n", "--dest-is-zero", s(&src), s(&d)]), "");
    assert!(bytes(&d) == bytes(&dir.path().join("ours")));
    // -n with no DEST: nothing is created.
    let o = tool("copy", &["-n", s(&src), s(&dir.path().join("none"))]);
    assert!(!o.status.success() && !dir.path().join("none").exists());
}

/// `-S SIZE` as qemu-img convert's: the same data ranges in the result, and
/// the same sizes refused.
#[test]
fn dash_s_is_the_zero_detection_granularity() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // 2 MiB of data with an aligned 4 KiB zero block and an aligned 64 KiB
    // zero run in it.
    let mut data: Vec<u8> = (0..2u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    data[128 << 10..132 << 10].fill(0);
    data[512 << 10..576 << 10].fill(0);
    std::fs::write(&src, &data).unwrap();
    let data_ranges = |p: &Path| -> Vec<(u64, u64)> {
        let v = sparsekit_testkit::qemu_img_map(p, "raw", &[]);
        (v.as_array().unwrap().iter())
            .filter(|e| e["data"] == true)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect()
    };
    let mut seen = Vec::new();
    for size in ["4k", "64k", "0"] {
        let (ours, theirs) = (dir.path().join("o"), dir.path().join("t"));
        ok(&tool("copy", &["-S", size, s(&src), s(&ours)]), size);
        run(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                "-S",
                size,
                s(&src),
                s(&theirs),
            ],
        );
        assert_eq!(std::fs::read(&ours).unwrap(), data);
        let got = data_ranges(&ours);
        assert_eq!(got, data_ranges(&theirs), "-S {size}");
        seen.push(got.len());
        std::fs::remove_file(&ours).unwrap();
    }
    // 4k: three pieces of data; 64k: two; 0: one.
    assert_eq!(seen, [3, 2, 1]);
    for bad in ["1000", "17M", "511"] {
        let o = tool("copy", &["-S", bad, s(&src), s(&dir.path().join("x"))]);
        assert!(!o.status.success(), "-S {bad}");
        let q = Command::new(require("qemu-img"))
            .args([
                "convert",
                "-O",
                "raw",
                "-S",
                bad,
                s(&src),
                s(&dir.path().join("y")),
            ])
            .output()
            .unwrap();
        assert!(!q.status.success(), "qemu-img -S {bad}");
        assert!(!dir.path().join("x").exists());
    }
}

/// The man pages and completions `cargo xtask dist` ships, made here from
/// the same definitions: man renders each page, bash loads each
/// completion.
#[test]
fn man_pages_and_completions_load() {
    let dir = tempfile::tempdir().unwrap();
    let pages = sparsekit_cli::dist::write_man_pages(&dir.path().join("man1")).unwrap();
    let completions = sparsekit_cli::dist::write_completions(dir.path()).unwrap();
    for page in &pages {
        let o = Command::new(require("man"))
            .args(["-l", s(page)])
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && text.contains("--version"),
            "{}: {text}",
            page.display()
        );
    }
    let copy_page = String::from_utf8_lossy(
        &Command::new("man")
            .args(["-l", s(&pages[1])])
            .env("MANPAGER", "cat")
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    for flag in ["--target-is-zero", "--progress", "--json", "-S"] {
        assert!(copy_page.contains(flag), "copy.1 lacks {flag}");
    }
    for name in ["map", "copy", "qcow2-info"] {
        let script = dir.path().join(format!("bash/{name}.bash"));
        assert!(completions.contains(&script));
        let o = Command::new(require("bash"))
            .args([
                "-c",
                &format!("source {} && complete -p {name}", s(&script)),
            ])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            out.starts_with("complete ") && out.trim_end().ends_with(name),
            "{out}"
        );
    }
}

/// On a terminal (a pty from `script`), progress is a bar, by default and
/// with `-p`, never qemu-img's lines; `-q` draws nothing.
#[test]
fn a_bar_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("holes-data.raw");
    let on_a_pty = |flags: &str, dst: &str| -> String {
        let line = format!(
            "{} {flags} {} {}",
            env!("CARGO_BIN_EXE_copy"),
            s(&src),
            s(&dir.path().join(dst))
        );
        let o = Command::new(require("script"))
            .args(["-qec", &line, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(o.status.success(), "{line}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    for flags in ["", "-p"] {
        let tty = on_a_pty(flags, "a");
        assert!(
            tty.contains("copy [") && tty.contains("MiB"),
            "{flags}: {tty}"
        );
        assert!(
            !tty.contains("/100%)"),
            "{flags}: lines on a terminal: {tty}"
        );
    }
    assert_eq!(on_a_pty("-q", "b"), "", "-q on a terminal");
}
