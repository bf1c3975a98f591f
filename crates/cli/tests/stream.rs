//! qcow2 streams through real pipes: `copy -O qcow2 SRC - | copy - OUT`
//! against `qemu-img convert -O raw`, exported streams against `qemu-img
//! check` and `compare`, qemu-made images piped in with `cat`, and broken
//! streams.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use sparsekit_testkit::{fixture, run};

const COPY: &str = env!("CARGO_BIN_EXE_copy");

/// `copy -O qcow2 src - | copy - out`, both ends real processes.
fn round_trip(src: &Path, out: &Path) -> (Output, Output) {
    let mut export = Command::new(COPY)
        .args(["-O", "qcow2"])
        .arg(src)
        .arg("-")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let import = Command::new(COPY)
        .arg("-")
        .arg(out)
        .stdin(Stdio::from(export.stdout.take().unwrap()))
        .output()
        .unwrap();
    (export.wait_with_output().unwrap(), import)
}

/// `cat file | copy - out`.
fn pipe_in(file: &Path, out: &Path) -> Output {
    let mut cat = Command::new("cat")
        .arg(file)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let o = Command::new(COPY)
        .arg("-")
        .arg(out)
        .stdin(Stdio::from(cat.stdout.take().unwrap()))
        .output()
        .unwrap();
    let _ = cat.wait();
    o
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn round_trips_equal_qemu_img_convert() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is needed");
    for name in [
        "empty.raw",
        "all-hole.raw",
        "all-data.raw",
        "holes-data.raw",
        "zero-data.raw",
        "fallocated.raw",
        "unaligned.raw",
        "v3.qcow2",
        "v2.qcow2",
        "c512-rc1.qcow2",
        "c2m-rc64.qcow2",
        "zlib.qcow2",
        "zstd.qcow2",
        "zero-clusters.qcow2",
        "extended-l2.qcow2",
        "prealloc-metadata.qcow2",
        "chain-top.qcow2",
        "unaligned.qcow2",
        "snapshots.qcow2",
        "datafile.qcow2",
        "many-extents.raw",
        "chain-base.raw",
        "chain-mid.qcow2",
        "prealloc-falloc.qcow2",
        "prealloc-full.qcow2",
        "bitmaps.qcow2",
    ] {
        let src = fixture(name);
        let out = dir.path().join("out.raw");
        let theirs = dir.path().join("qemu.raw");
        let (e, i) = round_trip(&src, &out);
        ok(&e, &format!("export {name}"));
        ok(&i, &format!("import {name}"));
        run(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                src.to_str().unwrap(),
                theirs.to_str().unwrap(),
            ],
        );
        assert!(
            same(&out, &theirs),
            "{name}: round trip differs from qemu-img convert"
        );

        // The same stream as a file: a valid image equal to the source.
        let q = dir.path().join("stream.qcow2");
        ok(
            &Command::new(COPY)
                .args(["-O", "qcow2"])
                .arg(&src)
                .arg(&q)
                .output()
                .unwrap(),
            name,
        );
        run("qemu-img", &["check", "-q", q.to_str().unwrap()]);
        let cmp = Command::new("qemu-img")
            .args(["compare", "-q"])
            .arg(&q)
            .arg(&src)
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "{name}: qemu-img compare: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        // Only data crosses the pipe: the stream holds the 64 KiB clusters
        // that the source maps as data, plus metadata (preallocated
        // clusters are data to qemu-img map too, and go as zeros).
        let stream_len = std::fs::metadata(&q).unwrap().len();
        let map = Command::new(env!("CARGO_BIN_EXE_map"))
            .arg("--json")
            .arg(&src)
            .output()
            .unwrap();
        let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
        let mut clusters = std::collections::BTreeSet::new();
        for e in map.as_array().unwrap().iter().filter(|e| e["data"] == true) {
            let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            clusters.extend(s >> 16..(s + l).div_ceil(1 << 16));
        }
        let data = clusters.len() as u64 * (64 << 10);
        assert!(
            stream_len <= data + (4 << 20),
            "{name}: {stream_len} bytes of stream for {data} bytes of data clusters"
        );
        for f in [&out, &theirs, &q] {
            std::fs::remove_file(f).unwrap();
        }
    }
}

/// The 1 TiB raw and 3 TiB qcow2 fixtures: too big to compare byte for
/// byte, so qemu-img compare (which walks block status) checks the round
/// trip's output and the exported stream against the source.
#[test]
fn huge_round_trips_equal_the_source() {
    let dir = tempfile::tempdir().unwrap();
    for (name, fmt) in [("huge-1t.raw", "raw"), ("huge-3t.qcow2", "qcow2")] {
        let src = fixture(name);
        let out = dir.path().join("out.raw");
        let (e, i) = round_trip(&src, &out);
        ok(&e, &format!("export {name}"));
        ok(&i, &format!("import {name}"));
        let cmp = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", fmt])
            .arg(&out)
            .arg(&src)
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "{name}: qemu-img compare: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        std::fs::remove_file(&out).unwrap();
    }
}

/// Images qemu wrote in forward order (one L2 table, allocated before the
/// data), compressed ones included, decode from `cat`.
#[test]
fn qemu_made_forward_images_decode_from_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["v3.qcow2", "zlib.qcow2", "zstd.qcow2"] {
        let src = fixture(name);
        let out = dir.path().join("out.raw");
        ok(&pipe_in(&src, &out), name);
        let theirs = dir.path().join("qemu.raw");
        run(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                src.to_str().unwrap(),
                theirs.to_str().unwrap(),
            ],
        );
        assert!(same(&out, &theirs), "{name}");
    }
}

fn fails(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn broken_streams_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    // Tables after data: qemu allocated this 3 TiB image's L2 tables as it
    // wrote, between data clusters.
    fails(
        &pipe_in(&fixture("huge-3t.qcow2"), &out),
        "not a forward-only stream",
    );

    let good = dir.path().join("good.qcow2");
    ok(
        &Command::new(COPY)
            .args(["-O", "qcow2"])
            .arg(fixture("holes-data.raw"))
            .arg(&good)
            .output()
            .unwrap(),
        "export",
    );
    let bytes = std::fs::read(&good).unwrap();
    // Truncated: in the header, in the tables, in the data.
    for cut in [50, 70_000, bytes.len() - 1000] {
        let t = dir.path().join("cut.qcow2");
        std::fs::write(&t, &bytes[..cut]).unwrap();
        fails(&pipe_in(&t, &out), "truncated");
    }
    // Garbage after the magic.
    let mut g = bytes.clone();
    for b in &mut g[4..104] {
        *b = 0xa5;
    }
    let t = dir.path().join("garbage.qcow2");
    std::fs::write(&t, &g).unwrap();
    fails(&pipe_in(&t, &out), "qcow2 stream on standard input");
}

#[test]
fn stream_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("holes-data.raw");
    // A qcow2 stream's clusters come in host order: not to standard output.
    let stream = dir.path().join("s.qcow2");
    let o = Command::new(COPY)
        .args(["-O", "qcow2"])
        .arg(&src)
        .arg(&stream)
        .output()
        .unwrap();
    ok(&o, "export");
    let o = Command::new(COPY)
        .args(["-", "-"])
        .stdin(std::fs::File::open(&stream).unwrap())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    fails(&o, "not to standard output");
    let o = Command::new(COPY)
        .args(["-O", "qcow2", "--skip", "4096"])
        .arg(&src)
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    fails(&o, "do not apply to -O qcow2");
}
