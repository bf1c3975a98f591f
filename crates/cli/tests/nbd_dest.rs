//! `copy` into NBD exports served by real servers (qemu-nbd over raw and
//! qcow2 images, nbdkit's memory and file plugins, its error, log, nozero
//! and blocksize filters). Every export is read back with nbdcopy or
//! through its file and compared with `qemu-img convert -O raw` of the
//! source.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use sparsekit_testkit::{Rng, Server, fixture, run};

fn copy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_copy"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "copy failed: {}", stderr(o));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `copy - DEST` with `stream` on standard input.
fn copy_from_stdin(stream: &Path, dest: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_copy"))
        .args(["-", dest])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::io::copy(&mut std::fs::File::open(stream).unwrap(), &mut stdin).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// A file of `size` random bytes: a destination whose every byte the copy
/// must overwrite or leave alone, visibly.
fn random_file(path: &Path, size: u64, seed: u64) {
    let mut rng = Rng(seed);
    let bytes: Vec<u8> = (0..size.div_ceil(8))
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .take(size as usize)
        .collect();
    std::fs::write(path, bytes).unwrap();
}

/// `qemu-img convert -O raw` of `src`: what every restore must hold.
fn expected(dir: &Path, src: &Path) -> Vec<u8> {
    let out = dir.join("expected.raw");
    run("qemu-img", &["convert", "-O", "raw", s(src), s(&out)]);
    std::fs::read(out).unwrap()
}

/// The export's bytes, read back by nbdcopy.
fn read_back(dir: &Path, uri: &str) -> Vec<u8> {
    let out = dir.join("read-back.raw");
    let _ = std::fs::remove_file(&out);
    run("nbdcopy", &[uri, s(&out)]);
    std::fs::read(out).unwrap()
}

fn size_of(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// A writable qemu-nbd of `image` in `format`, one client at a time (it
/// then does not advertise multi-conn: the copy must use one connection).
fn qemu_nbd(dir: &Path, format: &str, image: &Path, extra: &[&str]) -> Server {
    let sock = dir.join("qemu-nbd.sock");
    let mut args = vec!["-f", format, "--persistent", "-k", s(&sock)];
    args.extend_from_slice(extra);
    args.push(s(image));
    Server::start("qemu-nbd", &args, &sock)
}

fn nbdkit(dir: &Path, args: &[&str]) -> Server {
    let sock = dir.join("nbdkit.sock");
    let mut all = vec!["-f", "--exit-with-parent", "-U", s(&sock)];
    all.extend_from_slice(args);
    Server::start("nbdkit", &all, &sock)
}

/// The requests nbdkit's log filter saw: (connection, command, offset,
/// count, the rest of the line).
fn requests(log: &Path) -> Vec<(u32, String, u64, u64, String)> {
    let text = std::fs::read_to_string(log).unwrap();
    let field = |line: &str, key: &str| -> Option<String> {
        let i = line.find(&format!(" {key}="))? + key.len() + 2;
        Some(line[i..].split(' ').next()?.to_owned())
    };
    let hex = |v: String| u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap();
    text.lines()
        .filter(|l| l.contains(" connection=") && l.ends_with("..."))
        .filter_map(|l| {
            let conn = field(l, "connection")?.parse().ok()?;
            let rest = &l[l.find(" connection=")? + 1..];
            let command = rest.split(' ').nth(1)?.to_owned();
            let offset = field(l, "offset").map(hex).unwrap_or(0);
            let count = field(l, "count").map(hex).unwrap_or(0);
            Some((conn, command, offset, count, l.to_owned()))
        })
        .collect()
}

/// Every kind of source restored into qemu-nbd serving a raw file full of
/// random bytes: afterwards the export reads as `qemu-img convert` of the
/// source, holes included, and the file past the source is untouched.
#[test]
fn restore_into_qemu_nbd_raw() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, name) in ["chain-top.qcow2", "zero-clusters.qcow2", "holes-data.raw"]
        .iter()
        .enumerate()
    {
        let src = fixture(name);
        let want = expected(d, &src);
        let target = d.join("target.raw");
        let size = want.len() as u64 + (1 << 20);
        random_file(&target, size, i as u64);
        let tail = std::fs::read(&target).unwrap()[want.len()..].to_vec();
        let server = qemu_nbd(d, "raw", &target, &[]);
        let o = copy(&[s(&src), &server.uri()]);
        assert_ok(&o);
        let back = read_back(d, &server.uri());
        assert!(back[..want.len()] == want[..], "{name}: export differs");
        assert!(back[want.len()..] == tail[..], "{name}: past the source");
        drop(server);
        assert_eq!(size_of(&target), size, "{name}: the export was resized");
    }
}

/// qemu-nbd serving a qcow2 image: the image passes `qemu-img check`, holds
/// the source's bytes, and maps the source's holes as unallocated or zero,
/// even where it held data before.
#[test]
fn restore_into_qemu_nbd_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = fixture("chain-top.qcow2");
    let want = expected(d, &src);
    let target = d.join("target.qcow2");
    let size = want.len().to_string();
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&target), &size],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P 0x5a 0 {size}"),
            s(&target),
        ],
    );
    {
        let server = qemu_nbd(d, "qcow2", &target, &[]);
        assert_ok(&copy(&[s(&src), &server.uri()]));
    }
    run("qemu-img", &["check", "-q", s(&target)]);
    let out = d.join("back.raw");
    run("qemu-img", &["convert", "-O", "raw", s(&target), s(&out)]);
    assert!(std::fs::read(&out).unwrap() == want, "image differs");

    let theirs: Value =
        serde_json::from_str(&run("qemu-img", &["map", "--output=json", s(&src)])).unwrap();
    let ours: Value =
        serde_json::from_str(&run("qemu-img", &["map", "--output=json", s(&target)])).unwrap();
    let data_at = |map: &Value, at: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let start = e["start"].as_u64().unwrap();
                (start..start + e["length"].as_u64().unwrap()).contains(&at)
            })
            .map(|e| e["data"] == true && e["zero"] == false)
            .unwrap()
    };
    let mut holes = 0;
    for e in theirs.as_array().unwrap() {
        if e["data"] == true && e["zero"] == false {
            continue;
        }
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let mut at = start;
        while at < start + len {
            assert!(
                !data_at(&ours, at),
                "source hole at {at:#x} allocated in the image"
            );
            holes += 1;
            at += 64 << 10;
        }
    }
    assert!(holes > 0);
}

/// nbdkit's memory plugin (multi-conn, fast zero) and its file plugin,
/// watched by the log filter: writes spread over several connections, one
/// fast zero of the whole range first, no NO_HOLE, a flush at the end.
#[test]
fn restore_into_nbdkit_memory_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = fixture("chain-top.qcow2");
    let want = expected(d, &src);
    let size = want.len().to_string();
    let log = d.join("log");
    let logfile = format!("logfile={}", s(&log));

    let server = nbdkit(d, &["--filter=log", "memory", &size, &logfile]);
    assert_ok(&copy(&[s(&src), &server.uri()]));
    assert!(read_back(d, &server.uri()) == want, "memory export differs");
    drop(server);
    let reqs = requests(&log);
    let writers: std::collections::BTreeSet<u32> = reqs
        .iter()
        .filter(|r| r.1 == "Write")
        .map(|r| r.0)
        .collect();
    assert!(writers.len() > 1, "one writing connection: {writers:?}");
    let first = reqs
        .iter()
        .find(|r| r.1 != "Read" && r.1 != "Extents")
        .unwrap();
    assert_eq!(first.1, "Zero", "{first:?}");
    assert!(
        first.4.contains("fast=1") && first.4.contains("trim=1"),
        "{first:?}"
    );
    assert_eq!((first.2, first.3), (0, want.len() as u64));
    // nbdcopy's reads come after: the copy's last request is the flush.
    let last = reqs.iter().rfind(|r| r.1 != "Read" && r.1 != "Extents");
    assert_eq!(last.unwrap().1, "Flush", "{last:?}");

    let target = d.join("target.raw");
    random_file(&target, want.len() as u64, 7);
    let server = nbdkit(d, &["file", &format!("file={}", s(&target))]);
    assert_ok(&copy(&[s(&src), &server.uri()]));
    drop(server);
    assert!(
        std::fs::read(&target).unwrap() == want,
        "file export differs"
    );
}

/// Every source kind into an export: a raw file, a qcow2 chain, an NBD
/// export (nbd to nbd) and the qcow2 stream on standard input.
#[test]
fn every_source_kind() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = fixture("chain-top.qcow2");
    let want = expected(d, &src);
    let size = want.len().to_string();
    let raw = d.join("src.raw");
    std::fs::write(&raw, &want).unwrap();

    let source = Server::start(
        "qemu-nbd",
        &[
            "-r",
            "-f",
            "qcow2",
            "--persistent",
            "--shared=8",
            "-k",
            s(&d.join("src.sock")),
            s(&src),
        ],
        &d.join("src.sock"),
    );
    let stream = d.join("stream.qcow2");
    assert_ok(&copy(&["-O", "qcow2", s(&src), s(&stream)]));

    let sources: [(&str, Vec<String>); 3] = [
        ("raw file", vec![raw.to_str().unwrap().into()]),
        ("qcow2 chain", vec![src.to_str().unwrap().into()]),
        ("nbd", vec![source.uri()]),
    ];
    for (what, args) in sources {
        let server = nbdkit(d, &["memory", &size]);
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        let uri = server.uri();
        a.push(&uri);
        assert_ok(&copy(&a));
        assert!(read_back(d, &uri) == want, "{what}: export differs");
    }

    let server = nbdkit(d, &["memory", &size]);
    assert_ok(&copy_from_stdin(&stream, &server.uri()));
    assert!(
        read_back(d, &server.uri()) == want,
        "stream: export differs"
    );

    // A stream into an export that held data: clusters the stream does not
    // carry must be zeroed, here without fast zero.
    let target = d.join("target.raw");
    random_file(&target, want.len() as u64, 3);
    let server = nbdkit(
        d,
        &[
            "--filter=nozero",
            "file",
            &format!("file={}", s(&target)),
            "zeromode=plugin",
            "fastzeromode=none",
        ],
    );
    assert_ok(&copy_from_stdin(&stream, &server.uri()));
    drop(server);
    assert!(
        std::fs::read(&target).unwrap() == want,
        "stream: old data left"
    );
}

/// Zeroing without fast zero, with a fast zero the server refuses
/// (`NBD_ENOTSUP`), and with no WRITE_ZEROES at all: the holes are zeros
/// every time. With --dest-is-zero nothing is zeroed: the old bytes stay.
#[test]
fn zeroing_as_the_server_allows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = fixture("chain-top.qcow2");
    let want = expected(d, &src);
    let target = d.join("target.raw");
    let file = format!("file={}", s(&target));
    let log = d.join("log");
    let logfile = format!("logfile={}", s(&log));
    for (i, (mode, fast)) in [
        ("zeromode=plugin", "fastzeromode=none"),
        ("zeromode=plugin", "fastzeromode=slow"),
        ("zeromode=none", "fastzeromode=none"),
    ]
    .iter()
    .enumerate()
    {
        random_file(&target, want.len() as u64, 10 + i as u64);
        let _ = std::fs::remove_file(&log);
        let server = nbdkit(
            d,
            &[
                "--filter=log",
                "--filter=nozero",
                "file",
                &file,
                mode,
                fast,
                &logfile,
            ],
        );
        assert_ok(&copy(&[s(&src), &server.uri()]));
        drop(server);
        assert!(
            std::fs::read(&target).unwrap() == want,
            "{mode} {fast}: differs"
        );
        let reqs = requests(&log);
        let zeroes = reqs.iter().filter(|r| r.1 == "Zero").count();
        let fasts = reqs.iter().filter(|r| r.4.contains("fast=1")).count();
        match (*mode, *fast) {
            ("zeromode=none", _) => assert_eq!(zeroes, 0, "{mode}"),
            // Refused at once (NBD_ENOTSUP), then range by range.
            (_, "fastzeromode=slow") => assert!(fasts == 1 && zeroes > 2, "{reqs:?}"),
            _ => assert!(fasts == 0 && zeroes > 1, "{mode} {fast}: {reqs:?}"),
        }
    }

    random_file(&target, want.len() as u64, 20);
    let before = std::fs::read(&target).unwrap();
    let server = nbdkit(d, &["file", &file]);
    assert_ok(&copy(&["--dest-is-zero", s(&src), &server.uri()]));
    drop(server);
    let after = std::fs::read(&target).unwrap();
    let theirs: Value =
        serde_json::from_str(&run("qemu-img", &["map", "--output=json", s(&src)])).unwrap();
    for e in theirs.as_array().unwrap() {
        let (start, len) = (
            e["start"].as_u64().unwrap() as usize,
            e["length"].as_u64().unwrap() as usize,
        );
        let r = start..start + len;
        if e["data"] == true && e["zero"] == false {
            assert!(after[r.clone()] == want[r], "data at {start:#x}");
        } else {
            assert!(
                after[r.clone()] == before[r],
                "zeroed at {start:#x} despite --dest-is-zero"
            );
        }
    }
}

/// Unaligned edges behind nbdkit's blocksize-policy filter (a 4 KiB
/// minimum block, unaligned requests failed with EINVAL): a 10000007-byte
/// source written at offset 1000 of a larger export. Every request is
/// aligned; the bytes around the copy are kept.
#[test]
fn unaligned_edges_are_read_modified_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = fixture("unaligned.raw");
    let want = std::fs::read(&src).unwrap();
    let target = d.join("target.raw");
    let size: u64 = 10_006_528; // 2443 blocks of 4 KiB
    random_file(&target, size, 5);
    let before = std::fs::read(&target).unwrap();
    let log = d.join("log");
    let server = nbdkit(
        d,
        &[
            "--filter=log",
            "--filter=blocksize-policy",
            "file",
            &format!("file={}", s(&target)),
            "blocksize-minimum=4096",
            "blocksize-error-policy=error",
            &format!("logfile={}", s(&log)),
        ],
    );
    assert_ok(&copy(&["--offset", "1000", s(&src), &server.uri()]));
    drop(server);
    let after = std::fs::read(&target).unwrap();
    let end = 1000 + want.len();
    assert!(after[..1000] == before[..1000], "head before the copy");
    assert!(after[1000..end] == want[..], "the copy");
    assert!(after[end..] == before[end..], "tail after the copy");
    for r in requests(&log) {
        if ["Write", "Zero", "Read"].contains(&r.1.as_str()) {
            assert!(
                r.2 % 4096 == 0 && (r.3 % 4096 == 0 || r.2 + r.3 == size),
                "unaligned request {r:?}"
            );
        }
    }
}

/// Refused before anything is written: a read-only export, one too small,
/// the source export itself, and -O qcow2.
#[test]
fn refusals_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = fixture("chain-top.qcow2");
    let want = expected(d, &src);
    let target = d.join("target.raw");

    random_file(&target, want.len() as u64, 1);
    let server = qemu_nbd(d, "raw", &target, &["-r"]);
    let o = copy(&[s(&src), &server.uri()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the export is read-only"),
        "{}",
        stderr(&o)
    );
    drop(server);

    random_file(&target, want.len() as u64 - 4096, 2);
    let small = std::fs::read(&target).unwrap();
    let server = qemu_nbd(d, "raw", &target, &[]);
    let o = copy(&[s(&src), &server.uri()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "the export holds {} bytes, the copy needs {}",
            small.len(),
            want.len()
        )),
        "{e}"
    );
    let o = copy(&["-O", "qcow2", s(&src), &server.uri()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not into an NBD export"),
        "{}",
        stderr(&o)
    );
    drop(server);
    assert!(
        std::fs::read(&target).unwrap() == small,
        "a refused copy wrote"
    );

    let server = nbdkit(d, &["memory", "1M"]);
    let o = copy(&[&server.uri(), &server.uri()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the destination is the source export"),
        "{}",
        stderr(&o)
    );
}

/// Server errors on writes (nbdkit's error filter): the copy stops, says
/// what the server said and how far it got, and never reports success.
#[test]
fn server_write_errors_stop_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = fixture("chain-top.qcow2");
    for (errno, text) in [("ENOSPC", "ENOSPC"), ("EIO", "EIO")] {
        let server = nbdkit(
            d,
            &[
                "--filter=error",
                "memory",
                "32M",
                &format!("error={errno}"),
                "error-pwrite-rate=100%",
            ],
        );
        let o = copy(&[s(&src), &server.uri()]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{e}");
        assert!(e.contains(text) && e.contains("NBD_CMD_WRITE"), "{e}");
        assert!(
            e.contains("stopped with everything before source offset"),
            "{e}"
        );
        assert!(e.contains("was partly updated"), "{e}");
        assert!(
            !e.contains(" -> ") || !e.contains(" image: read "),
            "reported success: {e}"
        );
        assert!(!e.contains("panicked"), "{e}");
    }
}

/// The restore of an incremental backup: `copy --bitmap` from a qcow2
/// image onto the export holding the previous full copy writes only what
/// is dirty, and the export then equals a fresh full copy.
#[test]
fn incremental_restore_writes_only_dirty_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vm = d.join("vm.qcow2");
    let v = s(&vm);
    run("qemu-img", &["create", "-q", "-f", "qcow2", v, "64M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 16M",
            "-c",
            "write -P 2 32M 8M",
            v,
        ],
    );
    let target = d.join("backup.raw");
    run("qemu-img", &["convert", "-O", "raw", v, s(&target)]);
    run("qemu-img", &["bitmap", "--add", "--enable", v, "inc1"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 3 1M 64k",
            "-c",
            "write -P 4 50M 1M",
            "-c",
            "write -z 8M 2M",
            "-c",
            "discard 32M 4M",
            v,
        ],
    );
    let want = expected(d, &vm);
    assert!(std::fs::read(&target).unwrap() != want);
    let log = d.join("log");
    let server = nbdkit(
        d,
        &[
            "--filter=log",
            "--filter=nozero",
            "file",
            &format!("file={}", s(&target)),
            &format!("logfile={}", s(&log)),
            // Fast zero advertised, so that a whole-range zeroing would be
            // tempting, and seen.
            "zeromode=plugin",
            "fastzeromode=ignore",
        ],
    );
    assert_ok(&copy(&["--bitmap", "inc1", v, &server.uri()]));
    drop(server);
    assert!(std::fs::read(&target).unwrap() == want, "restore differs");
    let touched: u64 = requests(&log)
        .iter()
        .filter(|r| r.1 == "Write" || r.1 == "Zero")
        .map(|r| r.3)
        .sum();
    // Dirty: 64k + 1M + 2M + 4M, rounded to the bitmap's 64 KiB granules.
    assert!(
        touched > 0 && touched <= (7 << 20) + (64 << 10),
        "{touched} bytes touched"
    );
}
