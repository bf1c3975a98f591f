//! Fixture matrix: every image is made by qemu-img / qemu-io at test time;
//! our map must equal `qemu-img map --output=json` and a full read must
//! equal `qemu-img convert -O raw`.

mod common;

use common::{Dir, assert_same};
use sparsekit_extent::Kind;
use sparsekit_qcow2::Image;

/// Writes of every cluster kind, at offsets that suit 64 KiB clusters.
const MIXED: &[&str] = &[
    "write -P 0xab 0 64k",
    "write -P 0x11 100k 4k",
    "write -z 192k 64k",
    "write -c -P 0x22 320k 64k",
    "write -P 0x33 448k 128k",
    "discard 448k 64k",
    "write -P 0x44 640k 64k",
    "write -z 640k 64k",
    "write -P 0x55 768k 64k",
    "write -z -u 768k 64k",
    "write -P 0x66 1000k 24k",
];

fn mixed(opts: &str) {
    let d = Dir::new();
    d.create("a.qcow2", opts, "2M");
    d.io("a.qcow2", MIXED);
    assert_same(&d, "a.qcow2");
}

#[test]
fn v2_compat_0_10() {
    mixed("compat=0.10");
}

#[test]
fn v3_default() {
    mixed("");
}

#[test]
fn cluster_512() {
    mixed("cluster_size=512");
}

#[test]
fn cluster_2m() {
    let d = Dir::new();
    d.create("a.qcow2", "cluster_size=2M", "64M");
    d.io(
        "a.qcow2",
        &[
            "write -P 1 0 4k",
            "write -P 2 3M 1M",
            "write -c -P 3 8M 2M",
            "write -z 12M 2M",
            "write -P 4 20M 2M",
            "write -z 20M 2M",
            "write -P 5 63M 1M",
        ],
    );
    assert_same(&d, "a.qcow2");
}

#[test]
fn refcount_bits_1() {
    mixed("refcount_bits=1");
}

#[test]
fn refcount_bits_16() {
    mixed("refcount_bits=16");
}

#[test]
fn refcount_bits_64() {
    mixed("refcount_bits=64");
}

/// `qemu-img convert -c` of a raw image with varied content: many
/// compressed clusters packed into shared host sectors.
fn compressed(ctype: &str) {
    let d = Dir::new();
    d.img(&["create", "-q", "-f", "raw", "src.raw", "4M"]);
    let mut cmds = Vec::new();
    for i in 0..40u32 {
        cmds.push(format!(
            "write -P {} {}k {}k",
            i + 1,
            i * 96,
            8 + (i % 5) * 12
        ));
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    d.io_fmt("src.raw", "raw", &cmds);
    d.img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        &format!("compression_type={ctype}"),
        "src.raw",
        "c.qcow2",
    ]);
    let m = assert_same(&d, "c.qcow2");
    assert!(m.iter().any(|e| e.compressed));
}

#[test]
fn compressed_zlib() {
    compressed("zlib");
}

#[test]
fn compressed_zstd() {
    compressed("zstd");
}

#[test]
fn compressed_zstd_small_clusters() {
    let d = Dir::new();
    d.create("a.qcow2", "compression_type=zstd,cluster_size=4k", "1M");
    d.io(
        "a.qcow2",
        &[
            "write -c -P 7 0 4k",
            "write -c -P 8 4k 4k",
            "write -c -P 9 64k 4k",
        ],
    );
    assert_same(&d, "a.qcow2");
}

#[test]
fn zero_clusters_with_and_without_host_cluster() {
    let d = Dir::new();
    d.create("a.qcow2", "", "1M");
    d.io(
        "a.qcow2",
        &[
            "write -P 1 0 256k",
            "write -z 0 64k",      // keeps its host cluster
            "write -z -u 64k 64k", // drops it
            "write -z 512k 64k",   // never allocated
        ],
    );
    let m = assert_same(&d, "a.qcow2");
    assert!(m.iter().any(|e| e.zero && e.present && e.offset.is_some()));
    assert!(m.iter().any(|e| e.zero && e.present && e.offset.is_none()));
}

#[test]
fn extended_l2_partial_subclusters() {
    let d = Dir::new();
    d.create("a.qcow2", "extended_l2=on,cluster_size=64k", "2M");
    d.io(
        "a.qcow2",
        &[
            "write -P 1 0 4k",
            "write -P 2 10k 2k",
            "write -z 64k 8k",
            "write -P 3 128k 64k",
            "write -z 136k 4k",
            "write -z 192k 64k",
            "write -c -P 4 256k 64k",
            "write -P 5 1M 2k",
        ],
    );
    assert_same(&d, "a.qcow2");
}

#[test]
fn extended_l2_over_backing() {
    let d = Dir::new();
    d.create("base.qcow2", "", "1M");
    d.io("base.qcow2", &["write -P 0xba 0 1M"]);
    d.create(
        "top.qcow2",
        "extended_l2=on,backing_file=base.qcow2,backing_fmt=qcow2",
        "1M",
    );
    d.io(
        "top.qcow2",
        &["write -P 1 6k 2k", "write -z 70k 4k", "write -P 2 300k 1k"],
    );
    assert_same(&d, "top.qcow2");
}

fn prealloc(mode: &str) {
    let d = Dir::new();
    d.create("a.qcow2", &format!("preallocation={mode}"), "4M");
    d.io("a.qcow2", &["write -P 1 64k 4k", "write -P 2 1M 100k"]);
    assert_same(&d, "a.qcow2");
}

#[test]
fn preallocation_metadata() {
    prealloc("metadata");
}

#[test]
fn preallocation_falloc() {
    prealloc("falloc");
}

#[test]
fn preallocation_full() {
    prealloc("full");
}

#[test]
fn backing_chain_three_deep_with_raw_base() {
    let d = Dir::new();
    d.img(&["create", "-q", "-f", "raw", "base.raw", "1M"]);
    d.io_fmt(
        "base.raw",
        "raw",
        &["write -P 5 0 32k", "write -P 6 900k 4k"],
    );
    d.create(
        "mid.qcow2",
        "backing_file=base.raw,backing_fmt=raw",
        "1536k",
    );
    d.io(
        "mid.qcow2",
        &[
            "write -P 7 64k 64k",
            "write -z 896k 64k",
            "write -P 8 1200k 4k",
        ],
    );
    d.create(
        "top.qcow2",
        "backing_file=mid.qcow2,backing_fmt=qcow2",
        "2M",
    );
    d.io(
        "top.qcow2",
        &["write -P 9 128k 4k", "write -c -P 10 256k 64k"],
    );
    let img = Image::open(d.path("top.qcow2")).unwrap();
    assert_eq!(img.backing_depth(), 2);
    let m = assert_same(&d, "top.qcow2");
    assert!(m.iter().any(|e| e.depth == 2));
}

#[test]
fn backing_chain_two_deep_qcow2() {
    let d = Dir::new();
    d.create("base.qcow2", "cluster_size=4k", "1M");
    d.io("base.qcow2", &["write -P 1 0 1M", "write -z 512k 64k"]);
    d.create(
        "top.qcow2",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "1M",
    );
    d.io(
        "top.qcow2",
        &["write -P 2 4k 4k", "discard 128k 64k", "write -z 700k 64k"],
    );
    assert_same(&d, "top.qcow2");
}

#[test]
fn unaligned_virtual_size() {
    let d = Dir::new();
    // 1 MiB + 4.5 KiB: not a multiple of the 64 KiB cluster.
    d.create("a.qcow2", "", "1053184");
    d.io("a.qcow2", &["write -P 1 1048576 4608", "write -P 2 0 512"]);
    assert_same(&d, "a.qcow2");
}

#[test]
fn beyond_two_tib() {
    let d = Dir::new();
    d.create("big.qcow2", "", "3T");
    let at = 2u64 << 40 | 5 << 30; // 2 TiB + 5 GiB
    let end = (3u64 << 40) - 65536;
    d.io(
        "big.qcow2",
        &[
            "write -P 1 0 64k",
            &format!("write -P 2 {at} 128k"),
            &format!("write -P 3 {end} 64k"),
        ],
    );
    let m = common::assert_map_eq(d.tmp.path(), &d.path("big.qcow2"));
    assert!(m.iter().any(|e| e.start == at && e.data));
    let img = Image::open(d.path("big.qcow2")).unwrap();
    let mut buf = vec![0u8; 256 << 10];
    img.read_at(&mut buf, at - 64 * 1024).unwrap();
    assert!(buf[..64 << 10].iter().all(|&b| b == 0));
    assert!(buf[64 << 10..192 << 10].iter().all(|&b| b == 2));
    assert!(buf[192 << 10..].iter().all(|&b| b == 0));
    let mut tail = vec![0u8; 64 << 10];
    img.read_at(&mut tail, end).unwrap();
    assert!(tail.iter().all(|&b| b == 3));
    assert!(img.read_at(&mut tail, end + 1).is_err());
}

#[test]
fn external_data_file() {
    let d = Dir::new();
    d.create("d.qcow2", "data_file=d.data", "1M");
    d.io(
        "d.qcow2",
        &[
            "write -P 1 0 64k",
            "write -z 128k 64k",
            "write -P 2 300k 8k",
        ],
    );
    let m = assert_same(&d, "d.qcow2");
    assert_eq!(m[0].offset, Some(0));
}

#[test]
fn external_data_file_raw() {
    let d = Dir::new();
    d.create("d.qcow2", "data_file=d.data,data_file_raw=on", "1M");
    d.io(
        "d.qcow2",
        &[
            "write -P 1 0 64k",
            "write -z 128k 64k",
            "write -P 2 300k 8k",
        ],
    );
    assert_same(&d, "d.qcow2");
}

#[test]
fn extents_at_the_edge() {
    let d = Dir::new();
    d.create("a.qcow2", "", "1M");
    d.io("a.qcow2", &["write -P 1 0 64k", "write -z 64k 64k"]);
    let img = Image::open(d.path("a.qcow2")).unwrap();
    let ext: Vec<_> = img.map_all().extents().collect::<Result<_, _>>().unwrap();
    sparsekit_extent::check_map(&ext, 0..1 << 20).unwrap();
    assert_eq!(ext[0].kind, Kind::Data);
    assert_eq!(ext[1].kind, Kind::Zero);
    assert_eq!(ext[2].kind, Kind::Hole);
    // A streamed sub-range.
    let part: Vec<_> = img
        .map(32768..98304)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(part.len(), 2);
    assert_eq!((part[0].start, part[0].length), (32768, 32768));
}

#[test]
fn sub_range_equals_qemu_img_start_offset_and_max_length() {
    let d = Dir::new();
    d.create("base.qcow2", "", "2M");
    d.io("base.qcow2", &["write -P 1 0 2M"]);
    d.create("a.qcow2", "backing_file=base.qcow2,backing_fmt=qcow2", "2M");
    d.io("a.qcow2", MIXED);
    let img = Image::open(d.path("a.qcow2")).unwrap();
    for (start, len) in [(0u64, 4096u64), (70_000, 300_000), (655_360, 1_441_792)] {
        let ours = sparsekit_qcow2::merge_entries(
            img.map(start..start + len)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap(),
        );
        let out = d.img(&[
            "map",
            "--output=json",
            "--start-offset",
            &start.to_string(),
            "--max-length",
            &len.to_string(),
            "a.qcow2",
        ]);
        let theirs: Vec<sparsekit_qcow2::MapEntry> = serde_json::from_str(&out).unwrap();
        assert_eq!(
            ours,
            sparsekit_qcow2::merge_entries(theirs),
            "{start}+{len}"
        );
    }
}
