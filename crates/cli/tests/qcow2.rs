//! The tools on qcow2 images against their oracles: `qemu-img map`,
//! `qemu-img info`, `qemu-img check`, `qemu-img convert`, and
//! `nbdinfo --map=qemu:dirty-bitmap:NAME` over `qemu-nbd -B NAME`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sparsekit_testkit::{canonical_map, fixture, qemu_img_map, require, run};

const QCOW2: &[&str] = &[
    "v3.qcow2",
    "v2.qcow2",
    "c512-rc1.qcow2",
    "c2m-rc64.qcow2",
    "zlib.qcow2",
    "zstd.qcow2",
    "zero-clusters.qcow2",
    "extended-l2.qcow2",
    "prealloc-metadata.qcow2",
    "prealloc-falloc.qcow2",
    "prealloc-full.qcow2",
    "chain-mid.qcow2",
    "chain-top.qcow2",
    "unaligned.qcow2",
    "huge-3t.qcow2",
    "snapshots.qcow2",
    "bitmaps.qcow2",
    "datafile.qcow2",
];

fn tool(bin: &str, args: &[&str], path: &Path) -> Output {
    Command::new(bin).args(args).arg(path).output().unwrap()
}

fn json_of(bin: &str, args: &[&str], path: &Path) -> Value {
    let o = tool(bin, args, path);
    assert!(
        o.status.success(),
        "{bin} {args:?} {}: {}",
        path.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn map_json_equals_qemu_img_map() {
    for name in QCOW2 {
        let img = fixture(name);
        // qemu decides an image is "metadata preallocated" from st_blocks,
        // which ext4 settles only when delayed allocation is done: both
        // sides map a flushed file (qemu_img_map flushes too).
        sparsekit_testkit::drop_cache(&img);
        let ours = json_of(env!("CARGO_BIN_EXE_map"), &["--json"], &img);
        let theirs = qemu_img_map(&img, "qcow2", &[]);
        assert_eq!(canonical_map(&ours), canonical_map(&theirs), "{name}");
        let size = json_of("qemu-img", &["info", "--output=json"], &img)["virtual-size"]
            .as_u64()
            .unwrap();
        for (start, len) in [
            (0, 4096),
            (65535, 200_000),
            (size / 2, size / 3 + 7),
            (size - 1, 10),
            (size + 5, 1),
        ] {
            let (s, l) = (start.to_string(), len.to_string());
            let ours = json_of(
                env!("CARGO_BIN_EXE_map"),
                &["--json", "--start", &s, "--length", &l],
                &img,
            );
            let theirs = qemu_img_map(&img, "qcow2", &["--start-offset", &s, "--max-length", &l]);
            assert_eq!(
                canonical_map(&ours),
                canonical_map(&theirs),
                "{name} --start {s} --length {l}"
            );
        }
    }
}

/// The rows of `map IMG`'s table as (start, end, host column, depth).
fn table_rows(img: &Path) -> Vec<(u64, u64, String, u64)> {
    let o = tool(env!("CARGO_BIN_EXE_map"), &[], img);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // A line saying what the image is, the header, the rows, the summary.
    lines[2..lines.len() - 1]
        .iter()
        .map(|l| {
            // offset, length, size, unit, kind, host [in backing file N]
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |s: &str| s.parse::<u64>().unwrap();
            let depth = if f.len() > 6 { n(f[9]) } else { 0 };
            (n(f[0]), n(f[0]) + n(f[1]), f[5].to_owned(), depth)
        })
        .collect()
}

/// The table says `compressed` in the host column exactly where `qemu-img
/// map` says `"compressed": true`, at the same depth: on an image made
/// with `qemu-img convert -c`, on the same image after plain writes over
/// part of it, and on an image whose backing file is compressed.
#[test]
fn the_table_marks_the_clusters_qemu_img_calls_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    run(
        "qemu-img",
        &["create", "-q", "-f", "raw", &p("src.raw"), "8M"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -P 0x22 3M 512k",
            "-c",
            "write -P 0x33 6M 64k",
            &p("src.raw"),
        ],
    );
    let (whole, part, top) = (p("whole.qcow2"), p("part.qcow2"), p("top.qcow2"));
    run(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", &p("src.raw"), &whole],
    );
    std::fs::copy(&whole, &part).unwrap();
    // Plain clusters inside and beside the compressed ones.
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x44 256k 128k",
            "-c",
            "write -P 0x55 7M 64k",
            &part,
        ],
    );
    run(
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", &whole, "-F", "qcow2", &top,
        ],
    );
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x66 3M 64k", &top],
    );

    for img in [&whole, &part, &top] {
        let img = Path::new(img);
        let theirs = qemu_img_map(img, "qcow2", &[]);
        // The JSON map carries the flag already, as qemu-img does.
        let ours = json_of(env!("CARGO_BIN_EXE_map"), &["--json"], img);
        assert_eq!(canonical_map(&ours), canonical_map(&theirs));

        let theirs: Vec<(u64, u64, bool, u64)> = canonical_map(&theirs)
            .iter()
            .map(|e| {
                let n = |k: &str| e[k].as_u64().unwrap();
                let start = n("start");
                (
                    start,
                    start + n("length"),
                    e["compressed"] == true,
                    n("depth"),
                )
            })
            .collect();
        let rows = table_rows(img);
        // Every byte: marked in the table exactly where qemu-img says so.
        let mut cuts: Vec<u64> = (rows.iter().flat_map(|r| [r.0, r.1]))
            .chain(theirs.iter().flat_map(|e| [e.0, e.1]))
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        for at in &cuts[..cuts.len() - 1] {
            let row = rows.iter().find(|r| r.0 <= *at && *at < r.1).unwrap();
            let entry = theirs.iter().find(|e| e.0 <= *at && *at < e.1).unwrap();
            assert_eq!(
                (row.2 == "compressed", row.3),
                (entry.2, entry.3),
                "{} at {at}: row {row:?}, qemu-img {entry:?}",
                img.display()
            );
        }
        let marked = rows.iter().filter(|r| r.2 == "compressed").count();
        assert!(marked > 0, "{}: no compressed rows", img.display());
    }
    // The writes into `part` show as plain clusters with their offsets.
    let plain = table_rows(Path::new(&part));
    assert!(plain.iter().any(|r| r.2.starts_with("0x")), "{plain:?}");
}

/// `qemu-img check --output=json`'s count of allocated clusters of the
/// image at `path` (left out of its JSON when zero).
fn qemu_allocated_clusters(path: &str) -> u64 {
    let o = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2", path])
        .output()
        .unwrap();
    let v: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("qemu-img check {path}: {e}"));
    v.get("allocated-clusters")
        .map_or(0, |n| n.as_u64().unwrap())
}

/// Checks and removes the `allocation` object of each qcow2 entry:
/// `allocated-clusters` against `qemu-img check`'s, `clusters` and
/// `allocated-bytes` from the entry's own geometry.
fn checked_allocation(mut v: Value) -> Value {
    match &mut v {
        Value::Object(m) if m["format"] == "qcow2" => {
            let a = m
                .remove("allocation")
                .expect("qcow2 entries carry an allocation object");
            let name = m["filename"].as_str().unwrap();
            let (size, cs) = (
                m["virtual-size"].as_u64().unwrap(),
                m["cluster-size"].as_u64().unwrap(),
            );
            let allocated = qemu_allocated_clusters(name);
            assert_eq!(
                a,
                serde_json::json!({
                    "clusters": size.div_ceil(cs),
                    "allocated-clusters": allocated,
                    "allocated-bytes": allocated * cs,
                }),
                "allocation of {name}"
            );
        }
        Value::Object(m) => assert!(m.get("allocation").is_none(), "{m:?}"),
        Value::Array(a) => {
            for x in a.iter_mut() {
                *x = checked_allocation(x.take());
            }
        }
        _ => {}
    }
    v
}

#[test]
fn info_json_equals_qemu_img_info() {
    for name in QCOW2 {
        let img = fixture(name);
        let ours = json_of(env!("CARGO_BIN_EXE_qcow2-info"), &["--json"], &img);
        let theirs = json_of("qemu-img", &["info", "--output=json", "-f", "qcow2"], &img);
        assert_eq!(checked_allocation(ours), theirs, "{name}");
    }
    let top = fixture("chain-top.qcow2");
    let ours = json_of(
        env!("CARGO_BIN_EXE_qcow2-info"),
        &["--json", "--backing-chain"],
        &top,
    );
    let theirs = json_of(
        "qemu-img",
        &["info", "--output=json", "--backing-chain"],
        &top,
    );
    assert_eq!(ours.as_array().unwrap().len(), 3);
    assert_eq!(checked_allocation(ours), theirs);
}

#[test]
fn check_equals_qemu_img_check() {
    for name in QCOW2 {
        let img = fixture(name);
        let ours = tool(
            env!("CARGO_BIN_EXE_qcow2-info"),
            &["--check", "--json"],
            &img,
        );
        let theirs = tool("qemu-img", &["check", "--output=json", "-f", "qcow2"], &img);
        assert_eq!(ours.status.code(), theirs.status.code(), "{name}");
        let (a, b): (Value, Value) = (
            serde_json::from_slice(&ours.stdout).unwrap(),
            serde_json::from_slice(&theirs.stdout).unwrap(),
        );
        assert_eq!(a, b, "{name}");
        let human = tool(env!("CARGO_BIN_EXE_qcow2-info"), &["--check"], &img);
        assert!(
            String::from_utf8_lossy(&human.stdout)
                .starts_with("No errors were found on the image.")
        );
    }
}

/// `qcow2-info --check --json` and `qemu-img check --output=json` on
/// `img`: both exit statuses and the two JSON values, which must be equal.
fn check_both(img: &Path) -> (Option<i32>, Option<i32>) {
    let ours = tool(
        env!("CARGO_BIN_EXE_qcow2-info"),
        &["--check", "--json"],
        img,
    );
    let theirs = tool("qemu-img", &["check", "--output=json"], img);
    let (a, b): (Value, Value) = (
        serde_json::from_slice(&ours.stdout).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&ours.stderr));
        }),
        serde_json::from_slice(&theirs.stdout).unwrap(),
    );
    assert_eq!(a, b, "{}", img.display());
    (ours.status.code(), theirs.status.code())
}

/// Leaks and corruption: exit codes 3 and 2 as qemu-img check's.
#[test]
fn check_exit_codes_on_damaged_images() {
    let dir = tempfile::tempdir().unwrap();
    let damaged = |name: &str, damage: &dyn Fn(&mut Vec<u8>)| {
        let img = dir.path().join(name);
        let mut bytes = std::fs::read(fixture("v3.qcow2")).unwrap();
        damage(&mut bytes);
        std::fs::write(&img, &bytes).unwrap();
        img
    };
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    // A leak: one more cluster at the end of the file with refcount 1 and
    // no reference to it.
    let img = damaged("leak.qcow2", &|bytes| {
        let cluster = 65536u64;
        let idx = (bytes.len() as u64).div_ceil(cluster);
        bytes.resize(((idx + 1) * cluster) as usize, 0);
        let rt = be64(bytes, 48) as usize;
        let rb = be64(bytes, rt) as usize;
        let at = rb + idx as usize * 2; // 16-bit refcounts
        bytes[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    });
    assert_eq!(check_both(&img), (Some(3), Some(3)), "a leak");

    // An L2 entry pointing past the end of the file: corruption (exit 2).
    let img = damaged("corrupt.qcow2", &|bytes| {
        let l1 = be64(bytes, 40) as usize;
        let l2 = (be64(bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
        let far: u64 = (1 << 63) | (1 << 40);
        bytes[l2..l2 + 8].copy_from_slice(&far.to_be_bytes());
    });
    assert_eq!(check_both(&img), (Some(2), Some(2)), "a corruption");

    // Issue 17: an L1 table beyond the end of the file is damage to
    // report (exit 2), not a reason to refuse.
    let img = damaged("l1-past-end.qcow2", &|bytes| {
        bytes[40..48].copy_from_slice(&0x1000_0000u64.to_be_bytes());
    });
    assert_eq!(
        check_both(&img),
        (Some(2), Some(2)),
        "an L1 table past the end"
    );
}

/// The allocation bitmap against one computed here from qemu-img map:
/// cluster i is set when some byte of it is mapped at depth 0 with a host
/// offset or compressed (host data in this image).
#[test]
fn allocation_bitmap_equals_an_independent_computation() {
    for name in QCOW2 {
        let img = fixture(name);
        let info = json_of("qemu-img", &["info", "--output=json", "-f", "qcow2"], &img);
        let (size, cs) = (
            info["virtual-size"].as_u64().unwrap(),
            info["cluster-size"].as_u64().unwrap(),
        );
        if size > 1 << 40 {
            continue; // 3 TiB: 48M clusters; checked by --allocated below
        }
        let clusters = size.div_ceil(cs);
        let mut want = vec![0u8; clusters.div_ceil(8) as usize];
        let map = qemu_img_map(&img, "qcow2", &[]);
        for e in map.as_array().unwrap() {
            if e["depth"] == 0 && (e.get("offset").is_some() || e["compressed"] == true) {
                let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                for c in s / cs..(s + l).div_ceil(cs) {
                    want[(c / 8) as usize] |= 1 << (c % 8);
                }
            }
        }
        let o = tool(env!("CARGO_BIN_EXE_qcow2-info"), &["--bitmap"], &img);
        assert!(o.status.success());
        assert_eq!(o.stdout, want, "{name}");
        let set: u64 = want.iter().map(|b| b.count_ones() as u64).sum();
        let alloc = tool(env!("CARGO_BIN_EXE_qcow2-info"), &["--allocated"], &img);
        assert_eq!(
            String::from_utf8_lossy(&alloc.stdout).trim(),
            (set * cs).to_string(),
            "{name}"
        );

        // --zlib --output FILE: the same bytes, compressed.
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("bm.z");
        let o = tool(
            env!("CARGO_BIN_EXE_qcow2-info"),
            &["--bitmap", "--zlib", "--bitmap-file", out.to_str().unwrap()],
            &img,
        );
        assert!(o.status.success());
        let mut z = flate2::read::ZlibDecoder::new(std::fs::File::open(&out).unwrap());
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut z, &mut got).unwrap();
        assert_eq!(got, want, "{name} --zlib");
    }
    let big = fixture("huge-3t.qcow2");
    let alloc = tool(env!("CARGO_BIN_EXE_qcow2-info"), &["--allocated"], &big);
    assert_eq!(
        String::from_utf8_lossy(&alloc.stdout).trim(),
        (3 * 65536).to_string()
    );
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd(img: &Path, bitmap: &str, sock: &Path) -> Server {
    let child = Command::new(require("qemu-nbd"))
        .args([
            "-r",
            "-f",
            "qcow2",
            "--persistent",
            "--shared=4",
            "-B",
            bitmap,
            "-k",
        ])
        .arg(sock)
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "qemu-nbd did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

#[test]
fn map_bitmap_equals_nbdinfo_over_qemu_nbd() {
    require("nbdinfo");
    let img = fixture("bitmaps.qcow2");
    for bitmap in ["b1", "b2"] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let _server = qemu_nbd(&img, bitmap, &sock);
        let uri = format!("nbd+unix:///?socket={}", sock.display());
        let ctx = format!("--map=qemu:dirty-bitmap:{bitmap}");
        let theirs: Value = serde_json::from_str(&run("nbdinfo", &[&ctx, "--json", &uri])).unwrap();
        let ours = json_of(
            env!("CARGO_BIN_EXE_map"),
            &["--bitmap", bitmap, "--json"],
            &img,
        );
        assert_eq!(ours, theirs, "bitmap {bitmap}");
        assert!(
            theirs
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["description"] == "dirty"),
            "{bitmap} should be dirty"
        );
    }
    let o = tool(env!("CARGO_BIN_EXE_map"), &["--bitmap", "nope"], &img);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope"));
}

/// `--bitmap` with a name the image lacks: map and copy both say which
/// bitmaps it has (or that it has none), before anything is written.
#[test]
fn a_missing_bitmap_lists_the_images_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.qcow2");
    let i = img.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", i, "1M"]);
    let dest = dir.path().join("dest.raw");
    std::fs::write(&dest, vec![0u8; 1 << 20]).unwrap();
    let d = dest.to_str().unwrap();
    let both = |wanted: &str| {
        let map = tool(env!("CARGO_BIN_EXE_map"), &["--bitmap", wanted], &img);
        let copy = Command::new(env!("CARGO_BIN_EXE_copy"))
            .args(["--bitmap", wanted, i, d])
            .output()
            .unwrap();
        [("map", map), ("copy", copy)]
    };
    for (name, o) in both("b0") {
        assert_fails(
            &o,
            name,
            r#"no bitmap named "b0" (the image has no bitmaps)"#,
        );
    }
    run("qemu-img", &["bitmap", "--add", i, "bo"]);
    run("qemu-img", &["bitmap", "--add", "-g", "128k", i, "daily"]);
    for (name, o) in both("b0") {
        assert_fails(
            &o,
            name,
            r#"no bitmap named "b0" (the image has bitmaps "bo", "daily")"#,
        );
    }
    assert_eq!(std::fs::read(&dest).unwrap(), vec![0u8; 1 << 20]);
}

fn blocks(p: &Path) -> u64 {
    std::fs::File::open(p).unwrap().sync_data().unwrap();
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap())
}

#[test]
fn copy_equals_qemu_img_convert() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is needed");
    for name in QCOW2 {
        if *name == "huge-3t.qcow2" {
            continue; // 3 TiB of output does not fit tmpfs; copied below on ext4
        }
        let img = fixture(name);
        let theirs = dir.path().join("qemu.raw");
        run(
            "qemu-img",
            &[
                "convert",
                "-O",
                "raw",
                img.to_str().unwrap(),
                theirs.to_str().unwrap(),
            ],
        );
        // Cold runs read the image's data clusters with O_DIRECT: in
        // 1 MiB items with `--chunk-size 1M`, by default in 4 MiB items
        // into huge-page buffers.
        for (args, cold) in [
            (&[][..], false),
            (&["-j", "1", "--verify"], false),
            (&["--no-sparse", "--chunk-size", "64k"], false),
            (&["--chunk-size", "1M"], true),
            (&[], true),
        ] {
            if cold {
                sparsekit_fiemap::drop_page_cache(&std::fs::File::open(&img).unwrap()).unwrap();
            }
            let ours = dir.path().join("ours.raw");
            let o = Command::new(env!("CARGO_BIN_EXE_copy"))
                .args(args)
                .arg(&img)
                .arg(&ours)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{name} {args:?} cold {cold}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
                "{name} {args:?} cold {cold}: bytes differ from qemu-img convert"
            );
            if args.is_empty() && !cold {
                assert!(
                    blocks(&ours) <= blocks(&theirs),
                    "{name}: {} blocks vs qemu-img's {}",
                    blocks(&ours),
                    blocks(&theirs)
                );
            }
            std::fs::remove_file(&ours).unwrap();
        }
        std::fs::remove_file(&theirs).unwrap();
    }
}

#[test]
fn copy_of_a_3_tib_image_writes_only_its_data() {
    let img = fixture("huge-3t.qcow2");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("huge.raw");
    let o = Command::new(env!("CARGO_BIN_EXE_copy"))
        .arg("--verify")
        .arg(&img)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 3 << 40);
    assert!(blocks(&out) <= 3 * 128 + 64, "{} blocks", blocks(&out));
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&img)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

fn assert_fails(o: &Output, tool: &str, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{tool}: {err}");
    assert!(
        err.starts_with(&format!("{tool}: error: ")) && err.contains(needle),
        "{tool}: {err}"
    );
    assert!(!err.contains("panicked"));
}

#[test]
fn damaged_images_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Truncated: the header says more than the file holds.
    let cut = dir.path().join("cut.qcow2");
    let bytes = std::fs::read(fixture("v3.qcow2")).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("out.raw");
    let o = Command::new(env!("CARGO_BIN_EXE_copy"))
        .arg(&cut)
        .arg(&out)
        .output()
        .unwrap();
    assert_fails(&o, "copy", "cut.qcow2");
    // The tables are intact: map says what they say, as qemu-img map does
    // (it does not read data); the check finds the clusters past the end.
    let ours = json_of(env!("CARGO_BIN_EXE_map"), &["--json"], &cut);
    assert_eq!(
        canonical_map(&ours),
        canonical_map(&qemu_img_map(&cut, "qcow2", &[]))
    );
    let ours = tool(
        env!("CARGO_BIN_EXE_qcow2-info"),
        &["--check", "--json"],
        &cut,
    );
    let theirs = tool("qemu-img", &["check", "--output=json"], &cut);
    assert_eq!(
        (ours.status.code(), theirs.status.code()),
        (Some(2), Some(2))
    );

    // Bad magic, format forced.
    let raw = fixture("holes-data.raw");
    assert_fails(
        &tool(env!("CARGO_BIN_EXE_map"), &["-f", "qcow2"], &raw),
        "map",
        "holes-data.raw",
    );
    assert_fails(
        &tool(env!("CARGO_BIN_EXE_qcow2-info"), &[], &raw),
        "qcow2-info",
        "holes-data.raw",
    );
    let o = tool(env!("CARGO_BIN_EXE_qcow2-info"), &["--check"], &raw);
    assert_eq!(o.status.code(), Some(1), "a check that cannot run exits 1");
    // A header cut short.
    let stub = dir.path().join("stub.qcow2");
    std::fs::write(&stub, &bytes[..40]).unwrap();
    assert_fails(
        &tool(env!("CARGO_BIN_EXE_map"), &[], &stub),
        "map",
        "stub.qcow2",
    );

    // An unknown incompatible feature bit.
    let feat = dir.path().join("feature.qcow2");
    let mut b = bytes.clone();
    b[72 + 7] |= 0x80; // incompatible_features bit 7
    std::fs::write(&feat, &b).unwrap();
    assert_fails(
        &tool(env!("CARGO_BIN_EXE_qcow2-info"), &[], &feat),
        "qcow2-info",
        "feature.qcow2",
    );

    // Encrypted images are refused.
    let enc = dir.path().join("enc.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            enc.to_str().unwrap(),
            "1M",
        ],
    );
    assert_fails(
        &tool(env!("CARGO_BIN_EXE_map"), &[], &enc),
        "map",
        "enc.qcow2",
    );

    // Nothing was written to the images read.
    assert_eq!(std::fs::read(fixture("v3.qcow2")).unwrap(), bytes);
}

#[test]
fn copy_refuses_to_overwrite_a_backing_file() {
    let top = fixture("chain-top.qcow2");
    let base: PathBuf = fixture("chain-base.raw");
    let before = std::fs::read(&base).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_copy"))
        .arg(&top)
        .arg(&base)
        .output()
        .unwrap();
    assert_fails(&o, "copy", "the destination is the source file");
    assert_eq!(std::fs::read(&base).unwrap(), before);
}
