//! Persistent dirty bitmaps: made with `qemu-img bitmap`, dirtied by
//! writing through qemu-io (which loads enabled bitmaps and stores them on
//! close), read offline by us and compared with
//! `nbdinfo --map=qemu:dirty-bitmap:NAME --json` on `qemu-nbd -r -B NAME`.

mod common;

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Dir, run};
use sparsekit_qcow2::{Error, Qcow2};

/// Dirty ranges as qemu-nbd exports them, read with nbdinfo.
fn nbd_dirty(d: &Dir, image: &str, bitmap: &str) -> Vec<Range<u64>> {
    let sock = d.path(&format!("{bitmap}.sock"));
    let mut child = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", bitmap, "-k"])
        .arg(&sock)
        .arg(d.path(image))
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run qemu-nbd ({e}): install the Debian package qemu-utils")
        });
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "qemu-nbd did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let ctx = format!("--map=qemu:dirty-bitmap:{bitmap}");
    let out = run(d.tmp.path(), "nbdinfo", &[&ctx, "--json", &uri]);
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut dirty: Vec<Range<u64>> = Vec::new();
    for e in v.as_array().unwrap() {
        if e["type"].as_u64().unwrap() & 1 == 1 {
            let s = e["offset"].as_u64().unwrap();
            let r = s..s + e["length"].as_u64().unwrap();
            match dirty.last_mut() {
                Some(p) if p.end == r.start => p.end = r.end,
                _ => dirty.push(r),
            }
        }
    }
    dirty
}

fn ours(d: &Dir, image: &str, bitmap: &str) -> Vec<Range<u64>> {
    let q = Qcow2::open(d.path(image)).unwrap();
    q.dirty_ranges(bitmap)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn assert_same(d: &Dir, image: &str, bitmap: &str) -> Vec<Range<u64>> {
    let a = ours(d, image, bitmap);
    let b = nbd_dirty(d, image, bitmap);
    assert_eq!(a, b, "dirty ranges of {bitmap}");
    a
}

#[test]
fn enabled_bitmaps_dirtied_by_qemu_io() {
    let d = Dir::new();
    d.create("a.qcow2", "", "4M");
    d.img(&["bitmap", "--add", "a.qcow2", "b64k"]);
    d.img(&["bitmap", "--add", "-g", "512k", "a.qcow2", "b512k"]);
    d.img(&["bitmap", "--add", "--disable", "a.qcow2", "off"]);
    d.io(
        "a.qcow2",
        &["write -P 1 64k 4k", "write -P 2 1M 200k", "write -z 3M 8k"],
    );
    let q = Qcow2::open(d.path("a.qcow2")).unwrap();
    let names: Vec<_> = q.bitmaps().unwrap().into_iter().map(|b| b.name).collect();
    assert_eq!(names, ["b64k", "b512k", "off"]);
    assert_eq!(
        assert_same(&d, "a.qcow2", "b64k"),
        [65536..131072, 1048576..1310720, 3145728..3211264]
    );
    assert_same(&d, "a.qcow2", "b512k");
    assert!(assert_same(&d, "a.qcow2", "off").is_empty());
    let e = q.dirty_ranges("nope").unwrap_err();
    assert!(matches!(e, Error::NoSuchBitmap { .. }));
    assert_eq!(
        e.to_string(),
        r#"no bitmap named "nope" (the image has bitmaps "b64k", "b512k", "off")"#
    );
}

/// A misspelt name is the usual reason: the error says what there is.
#[test]
fn a_missing_bitmap_names_the_ones_there_are() {
    let d = Dir::new();
    d.create("none.qcow2", "", "1M");
    let q = Qcow2::open(d.path("none.qcow2")).unwrap();
    let e = q.dirty_ranges("b0").unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"no bitmap named "b0" (the image has no bitmaps)"#
    );
    d.img(&["bitmap", "--add", "none.qcow2", "bo"]);
    let q = Qcow2::open(d.path("none.qcow2")).unwrap();
    let e = q.dirty_ranges("b0").unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"no bitmap named "b0" (the image has bitmap "bo")"#
    );
}

#[test]
fn bitmap_spanning_several_clusters_and_unaligned_size() {
    let d = Dir::new();
    // 4 KiB clusters and 512-byte granularity: each bitmap cluster covers
    // 16 MiB, so 40 MiB + 1.5 KiB needs three.
    d.create("a.qcow2", "cluster_size=4k", "41944576");
    d.img(&["bitmap", "--add", "-g", "512", "a.qcow2", "fine"]);
    let mut cmds = Vec::new();
    for i in 0..30u64 {
        cmds.push(format!(
            "write -P 1 {} {}",
            i * 1_300_000 + 512 * (i % 3),
            512 * (1 + i % 9)
        ));
    }
    cmds.push("write -P 2 41943040 1536".into());
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    d.io("a.qcow2", &cmds);
    let r = assert_same(&d, "a.qcow2", "fine");
    assert_eq!(r.last().unwrap().end, 41944576);
}

#[test]
fn all_ones_table_entry() {
    let d = Dir::new();
    d.create("a.qcow2", "", "4M");
    d.img(&["bitmap", "--add", "a.qcow2", "b"]);
    d.io("a.qcow2", &["write -P 1 0 4k"]);
    let q = Qcow2::open(d.path("a.qcow2")).unwrap();
    let b = &q.bitmaps().unwrap()[0];
    // Replace the table's only entry by "all ones, no cluster".
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.path("a.qcow2"))
        .unwrap();
    f.write_all_at(&1u64.to_be_bytes(), b.table_offset.0)
        .unwrap();
    let r = assert_same(&d, "a.qcow2", "b");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0], 0..4 << 20);
}
