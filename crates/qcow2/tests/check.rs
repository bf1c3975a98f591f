//! `Qcow2::check` against `qemu-img check --output=json`, on clean
//! images and on images damaged by poking bytes.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::Dir;
use sparsekit_qcow2::{CheckResult, OpenOptions, Qcow2};

/// What `qemu-img check --output=json` printed on standard output, and
/// its exit status (non-zero when it finds something).
fn qemu_check_raw(image: &Path) -> (Vec<u8>, i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(image)
        // qemu opens a relative data file name from its working directory.
        .current_dir(image.parent().unwrap())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run qemu-img ({e}): install the Debian package qemu-utils")
        });
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.stdout, out.status.code().unwrap(), stderr)
}

/// `qemu-img check --output=json` and its exit status.
fn qemu_check(image: &Path) -> (serde_json::Value, i32) {
    let (stdout, code, stderr) = qemu_check_raw(image);
    let v = serde_json::from_slice(&stdout)
        .unwrap_or_else(|e| panic!("qemu-img check printed no JSON ({e}): {stderr}"));
    (v, code)
}

fn assert_check(image: &Path) -> CheckResult {
    let r = Qcow2::open(image).unwrap().check().unwrap();
    let (theirs, code) = qemu_check(image);
    assert_same(&r, &theirs, code, image);
    r
}

fn assert_same(r: &CheckResult, theirs: &serde_json::Value, code: i32, image: &Path) {
    assert_eq!(
        &serde_json::to_value(r).unwrap(),
        theirs,
        "check of {}: {:#?}",
        image.display(),
        r.messages
    );
    assert_eq!(r.exit_code(), code, "{}", image.display());
}

/// `Qcow2::check_path`, the entry point for damaged images, against
/// `qemu-img check` on the same file: the same JSON and exit status; or,
/// where qemu's check does not run at all (exit status 1, nothing on
/// standard output), an error. `None` in that case.
fn assert_check_path(image: &Path) -> Option<CheckResult> {
    let ours = Qcow2::check_path(image, &OpenOptions::default());
    let (stdout, code, stderr) = qemu_check_raw(image);
    match ours {
        Ok(r) => {
            let theirs: serde_json::Value = serde_json::from_slice(&stdout).unwrap_or_else(|e| {
                panic!(
                    "{}: we checked it ({:?}), qemu-img printed no JSON ({e}): {stderr}",
                    image.display(),
                    r.messages
                )
            });
            assert_same(&r, &theirs, code, image);
            Some(r)
        }
        Err(e) => {
            assert_eq!(
                (code, stdout.as_slice()),
                (1, &b""[..]),
                "{}: we refused ({e}: {}), qemu-img check ran: {stderr}",
                image.display(),
                e.root()
            );
            None
        }
    }
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn peek64(path: &Path, offset: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

const WRITES: &[&str] = &[
    "write -P 1 0 128k",
    "write -c -P 2 1M 64k",
    "write -c -P 3 1088k 64k",
    "write -P 3 2M 64k",
    "write -z 3M 64k",
    "write -P 4 3200k 64k",
    "write -z 3200k 64k",
];

#[test]
fn clean_images() {
    let d = Dir::new();
    for (name, opts) in [
        ("plain.qcow2", ""),
        ("v2.qcow2", "compat=0.10"),
        ("rc1.qcow2", "refcount_bits=1"),
        ("rc64.qcow2", "refcount_bits=64,cluster_size=4k"),
        ("ext.qcow2", "extended_l2=on"),
        ("zstd.qcow2", "compression_type=zstd,cluster_size=512"),
        ("meta.qcow2", "preallocation=metadata"),
    ] {
        d.create(name, opts, "4M");
        // Compressed writes need unallocated clusters.
        let writes: Vec<&str> = WRITES
            .iter()
            .copied()
            .filter(|w| name != "meta.qcow2" || !w.contains("-c"))
            .collect();
        d.io(name, &writes);
        let r = assert_check(&d.path(name));
        assert_eq!(r.exit_code(), 0, "{name}");
    }
    assert_check(&d.path("empty.qcow2").with_file_name({
        d.create("empty.qcow2", "", "1M");
        "empty.qcow2"
    }));
}

#[test]
fn snapshots_bitmaps_and_data_file() {
    let d = Dir::new();
    d.create("a.qcow2", "", "4M");
    d.img(&["bitmap", "--add", "a.qcow2", "b1"]);
    d.img(&["bitmap", "--add", "-g", "4k", "a.qcow2", "b2"]);
    d.io("a.qcow2", WRITES);
    d.img(&["snapshot", "-c", "s1", "a.qcow2"]);
    d.io("a.qcow2", &["write -P 9 0 64k", "write -P 9 3M 64k"]);
    d.img(&["snapshot", "-c", "s2", "a.qcow2"]);
    d.io("a.qcow2", &["write -P 8 64k 64k"]);
    assert_check(&d.path("a.qcow2"));

    d.create("d.qcow2", "data_file=d.data", "4M");
    d.io("d.qcow2", &["write -P 1 0 128k", "write -z 3M 64k"]);
    assert_check(&d.path("d.qcow2"));
}

/// A 4 MiB image with data clusters; returns its L2 table offset.
fn damaged(d: &Dir) -> (std::path::PathBuf, u64) {
    let p = d.create("a.qcow2", "", "4M");
    d.io("a.qcow2", &["write -P 1 0 192k", "write -P 2 1M 64k"]);
    let l1 = peek64(&p, 40);
    (p.clone(), peek64(&p, l1) & 0x00ff_ffff_ffff_fe00)
}

#[test]
fn leaked_cluster_by_refcount_bump() {
    let d = Dir::new();
    let (p, _) = damaged(&d);
    // A refcount for the cluster after the last one in use.
    let rt = peek64(&p, 48);
    let rb = peek64(&p, rt);
    let len = std::fs::metadata(&p).unwrap().len();
    let last = len / 65536 - 1;
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len + 65536).unwrap();
    poke(&p, rb + 2 * (last + 1), &1u16.to_be_bytes());
    let r = assert_check(&p);
    assert_eq!((r.leaks, r.corruptions), (1, 0));
    assert_eq!(r.exit_code(), 3);
}

#[test]
fn l2_entry_pointing_past_the_end() {
    let d = Dir::new();
    let (p, l2) = damaged(&d);
    poke(&p, l2 + 8, &0x8000_0000_4000_0000u64.to_be_bytes());
    let r = assert_check(&p);
    assert!(r.corruptions > 0);
}

#[test]
fn two_l2_entries_sharing_a_cluster() {
    let d = Dir::new();
    let (p, l2) = damaged(&d);
    let first = peek64(&p, l2);
    poke(&p, l2 + 16, &first.to_be_bytes());
    let r = assert_check(&p);
    assert!(r.corruptions > 0 && r.leaks > 0);
}

#[test]
fn reserved_bits_and_copied_flag() {
    let d = Dir::new();
    let (p, l2) = damaged(&d);
    let e = peek64(&p, l2);
    poke(&p, l2, &(e | 1 << 57).to_be_bytes());
    let e = peek64(&p, l2 + 8);
    poke(&p, l2 + 8, &(e & !(1 << 63)).to_be_bytes());
    assert_check(&p);
}

/// A hostile image of 512-byte clusters: an active L1 table of `n`
/// entries that all point at one L2 table whose 64 entries all point at
/// one data cluster, and `m` snapshots that all share that L1 table. No
/// refcount blocks. qemu-img check walks the tables once per reference:
/// `(m + 1) * n * 64` entries.
fn shared_tables_image(path: &Path, n: u32, m: u32) {
    let cs = 512u64;
    let l1 = 2 * cs;
    let l2 = l1 + (u64::from(n) * 8).next_multiple_of(cs);
    let data = l2 + cs;
    let snaps = data + cs;
    let entry = 40 + 16; // fixed part, extra data: vm_state_size_large, disk_size
    let size = u64::from(n) * 64 * cs;
    let mut f = vec![0u8; (snaps + u64::from(m) * entry) as usize];
    let put32 = |f: &mut Vec<u8>, at: u64, v: u32| {
        f[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
    };
    let put64 = |f: &mut Vec<u8>, at: u64, v: u64| {
        f[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
    };
    put32(&mut f, 0, 0x5146_49fb); // magic
    put32(&mut f, 4, 3); // version
    put32(&mut f, 20, 9); // cluster_bits
    put64(&mut f, 24, size);
    put32(&mut f, 36, n); // l1_size
    put64(&mut f, 40, l1);
    put64(&mut f, 48, cs); // refcount_table_offset
    put32(&mut f, 56, 1); // refcount_table_clusters
    put32(&mut f, 60, m); // nb_snapshots
    put64(&mut f, 64, snaps);
    put32(&mut f, 96, 4); // refcount_order
    put32(&mut f, 100, 104); // header_length
    for i in 0..u64::from(n) {
        put64(&mut f, l1 + 8 * i, l2);
    }
    for i in 0..64 {
        put64(&mut f, l2 + 8 * i, data);
    }
    for j in 0..u64::from(m) {
        let e = snaps + j * entry;
        put64(&mut f, e, l1); // l1_table_offset
        put32(&mut f, e + 8, n); // l1_size
        put32(&mut f, e + 36, 16); // extra_data_size
        put64(&mut f, e + 48, size); // disk_size
    }
    std::fs::write(path, f).unwrap();
}

#[test]
fn snapshots_sharing_tables_count_like_qemu() {
    // 41 walks of 64 * 64 entries: 167,936 references to one data
    // cluster, 65,535 of them counted, the rest overflows.
    let d = Dir::new();
    let p = d.path("shared.qcow2");
    shared_tables_image(&p, 64, 40);
    let r = assert_check(&p);
    assert!(r.corruptions > 100_000, "{}", r.corruptions);
    assert!(r.messages.len() <= sparsekit_qcow2::MAX_MESSAGES + 2);
}

/// Found by reading check.rs while writing the fuzz targets: 12,000
/// snapshots sharing one L1 table of 65,536 entries in a 1 MiB file made
/// the check walk 5 * 10^10 entries and push a message for each overflow,
/// until memory ran out.
#[test]
fn many_snapshots_sharing_one_large_table_are_checked_in_bounded_time_and_memory() {
    let d = Dir::new();
    let p = d.path("shared.qcow2");
    shared_tables_image(&p, 65536, 12000);
    let start = std::time::Instant::now();
    let r = Qcow2::open(&p).unwrap().check().unwrap();
    assert!(
        start.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(r.messages.len() <= sparsekit_qcow2::MAX_MESSAGES + 2);
    assert!(r.corruptions > 0);
    assert_eq!(r.exit_code(), 1, "the walk stops: a check error");
    assert!(r.messages.iter().any(|m| m.contains("stopped counting")));
}

/// An image with every table a header points to: data, a snapshot (its
/// own L1 table), a persistent bitmap (directory, table), refcounts.
fn every_table(d: &Dir, name: &str) -> std::path::PathBuf {
    let p = d.create(name, "", "4M");
    d.io(name, &["write -P 1 0 192k", "write -P 2 1M 64k"]);
    d.img(&["snapshot", "-c", "s1", name]);
    d.io(name, &["write -P 3 2M 64k"]);
    d.img(&["bitmap", "--add", name, "b1"]);
    assert_check(&p);
    p
}

/// Offset of the data of the bitmaps header extension.
fn bitmaps_extension(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, 100).unwrap();
    let mut at = u64::from(u32::from_be_bytes(b)); // header_length
    loop {
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, at).unwrap();
        let kind = u32::from_be_bytes(e[..4].try_into().unwrap());
        let len = u64::from(u32::from_be_bytes(e[4..].try_into().unwrap()));
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return at + 8;
        }
        at += 8 + len.next_multiple_of(8);
    }
}

const PAST_THE_END: u64 = 0x1000_0000;

/// Issue 17: tables that lie beyond the end of the file, or are
/// misaligned, are reported as qemu-img check reports them (corruptions,
/// their clusters leaked, exit status 2), or refused where qemu's check
/// does not run either (exit status 1).
#[test]
fn misplaced_tables_are_reported_like_qemu_img_check() {
    let d = Dir::new();
    let base = every_table(&d, "base.qcow2");
    let len = std::fs::metadata(&base).unwrap().len();
    let snapshots = peek64(&base, 64);
    let bitmaps = bitmaps_extension(&base);
    let directory = peek64(&base, bitmaps + 16);
    // Field offset and value of each damage; whether qemu's check runs.
    let cases: &[(&str, u64, &[u8], bool)] = &[
        ("l1-past-end", 40, &PAST_THE_END.to_be_bytes(), true),
        ("l1-misaligned", 40, &(0x30200u64).to_be_bytes(), false),
        (
            "refcount-table-past-end",
            48,
            &PAST_THE_END.to_be_bytes(),
            true,
        ),
        (
            "refcount-table-misaligned",
            48,
            &(0x10200u64).to_be_bytes(),
            false,
        ),
        (
            "snapshot-table-past-end",
            64,
            &PAST_THE_END.to_be_bytes(),
            true,
        ),
        (
            "snapshot-table-misaligned",
            64,
            &(snapshots + 8).to_be_bytes(),
            false,
        ),
        (
            "snapshot-l1-past-end",
            snapshots,
            &PAST_THE_END.to_be_bytes(),
            true,
        ),
        (
            "snapshot-l1-misaligned",
            snapshots,
            &(0x30200u64).to_be_bytes(),
            true,
        ),
        (
            "snapshot-l1-too-large",
            snapshots + 8,
            &(5u32 << 20).to_be_bytes(),
            true,
        ),
        (
            "bitmap-directory-past-end",
            bitmaps + 16,
            &PAST_THE_END.to_be_bytes(),
            false,
        ),
        (
            "bitmap-directory-misaligned",
            bitmaps + 16,
            &(directory + 512).to_be_bytes(),
            false,
        ),
        (
            "bitmap-table-past-end",
            directory,
            &PAST_THE_END.to_be_bytes(),
            true,
        ),
        (
            "bitmap-table-misaligned",
            directory,
            &(0x30200u64).to_be_bytes(),
            false,
        ),
    ];
    for &(name, at, bytes, runs) in cases {
        let p = d.path(&format!("{name}.qcow2"));
        std::fs::copy(&base, &p).unwrap();
        poke(&p, at, bytes);
        match assert_check_path(&p) {
            Some(r) => {
                assert!(runs, "{name}: qemu-img check should not run");
                assert_eq!(r.exit_code(), 2, "{name}: {:#?}", r.messages);
                assert!(r.corruptions > 0, "{name}");
            }
            None => assert!(!runs, "{name}: qemu-img check runs"),
        }
        // The header's own tables: what the strict open refuses.
        if at < 72 && name.ends_with("past-end") {
            assert!(
                Qcow2::open(&p).is_err(),
                "{name}: the strict open refuses it"
            );
        }
    }

    // A table that starts inside the file and runs past its end: the part
    // inside is read.
    let p = d.path("l1-runs-past-end.qcow2");
    std::fs::copy(&base, &p).unwrap();
    poke(&p, 40, &(len & !0xffff).to_be_bytes());
    poke(&p, 36, &20_000u32.to_be_bytes());
    let r = assert_check_path(&p).expect("qemu-img check runs");
    assert_eq!(r.exit_code(), 2);

    // Many snapshots past the end: each entry reads as zeros, which a
    // version 3 image calls incomplete.
    let p = d.path("snapshots-past-end.qcow2");
    std::fs::copy(&base, &p).unwrap();
    poke(&p, 64, &PAST_THE_END.to_be_bytes());
    poke(&p, 60, &1000u32.to_be_bytes());
    let r = assert_check_path(&p).expect("qemu-img check runs");
    assert!(r.corruptions > 1000, "{}", r.corruptions);
}
