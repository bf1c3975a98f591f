//! A copy never costs the user a file: usage errors and damaged sources are
//! refused before DEST is touched (bytes, size and mtime unchanged), and a
//! copy that fails midway removes the DEST it created (kept with
//! `--keep-partial`) or says how much of an existing one it rewrote.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sparsekit_testkit::run;

fn copy(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_copy"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An 8 MiB file of random bytes, and what to compare it with later.
struct Kept {
    path: PathBuf,
    bytes: Vec<u8>,
    meta: std::fs::Metadata,
}

impl Kept {
    fn new(path: PathBuf) -> Self {
        let bytes: Vec<u8> = (0..8u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(&path, &bytes).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        Self { path, bytes, meta }
    }

    /// Same bytes, size and modification time (to the nanosecond).
    fn assert_untouched(&self, what: &str) {
        let now = std::fs::metadata(&self.path).unwrap();
        assert_eq!(now.len(), self.meta.len(), "{what}: size");
        assert_eq!(
            (now.mtime(), now.mtime_nsec()),
            (self.meta.mtime(), self.meta.mtime_nsec()),
            "{what}: mtime"
        );
        assert!(
            std::fs::read(&self.path).unwrap() == self.bytes,
            "{what}: bytes"
        );
    }
}

/// A 128 MiB qcow2 image with some data, made by qemu-img and qemu-io.
fn small_qcow2(dir: &Path) -> PathBuf {
    let img = dir.join("small.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&img), "128M"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -q -P 7 0 4M",
            "-c",
            "write -q -P 9 64M 4M",
            s(&img),
        ],
    );
    img
}

fn fails(o: &Output, needle: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn usage_errors_leave_an_existing_dest_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let img = small_qcow2(dir.path());
    let raw = dir.path().join("plain.raw");
    std::fs::write(&raw, vec![5u8; 1 << 20]).unwrap();
    let keep = Kept::new(dir.path().join("keep.raw"));
    let k = s(&keep.path);
    let cases: &[(&[&str], &str)] = &[
        (
            &["--skip", "200M", s(&img), k],
            "cannot skip 209715200 bytes of a 134217728-byte source",
        ),
        (
            &["--skip", "100M", "--length", "50M", s(&img), k],
            "cannot copy 52428800 bytes from offset 104857600",
        ),
        (
            &["--chunk-size", "1k", s(&img), k],
            "--chunk-size must be 4k to 1G",
        ),
        (&["--bitmap", "nope", s(&raw), k], "has no dirty bitmaps"),
        (
            &["--bitmap", "nope", s(&img), k],
            "small.qcow2: bitmap \"nope\": no bitmap named \"nope\"",
        ),
        (
            &["-O", "qcow2", "--skip", "1M", s(&img), k],
            "do not apply to -O qcow2",
        ),
        (&["-f", "qcow2", s(&raw), k], "plain.raw"),
        (
            &["--offset", "18446744073709551000", s(&img), k],
            "--offset",
        ),
        (&[s(&img), s(&img)], "the destination is the source file"),
    ];
    for (args, needle) in cases {
        fails(&copy(args), needle);
        keep.assert_untouched(&format!("{args:?}"));
    }
}

/// A qcow2 image whose first L1 entry points far past the end of the file:
/// refused when opened, before DEST is touched.
#[test]
fn a_damaged_l1_table_leaves_an_existing_dest_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let img = small_qcow2(dir.path());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut h = [0u8; 48];
    f.read_exact_at(&mut h, 0).unwrap();
    let l1 = u64::from_be_bytes(h[40..48].try_into().unwrap());
    // COPIED flag, L2 table at 1 TiB.
    f.write_all_at(&((1u64 << 63) | (1 << 40)).to_be_bytes(), l1)
        .unwrap();
    drop(f);
    let keep = Kept::new(dir.path().join("keep.raw"));
    let err = fails(&copy(&[s(&img), s(&keep.path)]), "small.qcow2");
    assert!(err.contains("L1") || err.contains("L2"), "{err}");
    keep.assert_untouched("damaged L1");
    let new = dir.path().join("new.raw");
    fails(&copy(&[s(&img), s(&new)]), "small.qcow2");
    assert!(!new.exists());
}

/// A qcow2 image whose second L2 entry points past the end of the file:
/// found only while copying.
fn damaged_l2(dir: &Path) -> PathBuf {
    let img = dir.join("bad-l2.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -q -P 7 0 8M", s(&img)],
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let mut h = [0u8; 48];
    f.read_exact_at(&mut h, 0).unwrap();
    let l1 = u64::from_be_bytes(h[40..48].try_into().unwrap());
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, l1).unwrap();
    let l2 = u64::from_be_bytes(e) & 0x00ff_ffff_ffff_fe00;
    // The data cluster at guest 4 MiB: COPIED flag, host offset 1 TiB.
    let index = (4 << 20) / 65536;
    f.write_all_at(&((1u64 << 63) | (1 << 40)).to_be_bytes(), l2 + index * 8)
        .unwrap();
    img
}

#[test]
fn a_failed_copy_removes_the_dest_it_created_unless_kept() {
    let dir = tempfile::tempdir().unwrap();
    let img = damaged_l2(dir.path());
    let new = dir.path().join("new.raw");
    let err = fails(
        &copy(&["-j", "1", s(&img), s(&new)]),
        "stopped with everything before source offset",
    );
    assert!(
        err.contains("was created by this copy and has been removed"),
        "{err}"
    );
    assert!(!new.exists());

    let err = fails(
        &copy(&["-j", "1", "--keep-partial", s(&img), s(&new)]),
        "stopped with everything before source offset",
    );
    assert!(
        err.contains("is incomplete, kept as --keep-partial asks"),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&new).unwrap().len(), 16 << 20);

    // An existing DEST is never removed: the message says what happened.
    let keep = Kept::new(dir.path().join("keep.raw"));
    let err = fails(&copy(&[s(&img), s(&keep.path)]), "stopped with everything");
    assert!(
        err.contains("keep.raw was truncated and partly rewritten"),
        "{err}"
    );
    assert!(keep.path.exists());
    let err = fails(
        &copy(&["--offset", "0", s(&img), s(&keep.path)]),
        "stopped with everything",
    );
    assert!(err.contains("keep.raw was partly updated"), "{err}");
}

#[test]
fn a_failed_stream_export_removes_the_file_it_created() {
    let dir = tempfile::tempdir().unwrap();
    let img = damaged_l2(dir.path());
    let out = dir.path().join("out.qcow2");
    let err = fails(&copy(&["-O", "qcow2", s(&img), s(&out)]), "bad-l2.qcow2");
    assert!(err.contains("has been removed"), "{err}");
    assert!(!out.exists());
}
