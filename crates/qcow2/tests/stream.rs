//! The stream decoder against qemu: streams in the layout of qemu's
//! qcow2-to-stdout.py (made by a Rust rewrite of its layout), images made
//! by qemu-img / qemu-io and rewritten into forward order (compressed
//! zlib and zstd clusters, extended L2 subclusters, zero clusters, v2),
//! and qemu-img's own output. Every stream goes through an OS pipe, and
//! the decoded disk must equal `qemu-img convert -O raw` byte for byte.

mod common;
mod stream_support;

use common::Dir;
use sparsekit_qcow2::{Image, StreamError};
use stream_support::{
    assert_check_clean, assert_compare_equal, assert_disk_eq, decode_piped, decode_trickled,
    forward_order, load, qcow2_to_stdout, qemu_raw, raw_disk, save,
};

/// A raw disk in the layout of qcow2-to-stdout.py: qemu-img must find it
/// clean, and the decoded disk must equal qemu-img's reading of it.
fn script_layout(size: u64, ranges: &[(u64, u64)], cluster_size: u64, refcount_bits: u32) {
    let d = Dir::new();
    let raw = raw_disk(size, ranges);
    save(&d, "src.raw", &raw);
    let stream = qcow2_to_stdout(&raw, cluster_size, refcount_bits, None);
    save(&d, "s.qcow2", &stream);
    assert_check_clean(&d, "s.qcow2");
    assert_compare_equal(&d, "src.raw", "raw", "s.qcow2", "qcow2");
    let expected = qemu_raw(&d, "s.qcow2", "qcow2");
    let what = format!("{size:#x} bytes, {cluster_size} B clusters, refcount_bits={refcount_bits}");
    assert_disk_eq(&decode_piped(stream.clone()).unwrap(), &expected, &what);
    assert_disk_eq(&decode_trickled(&stream).unwrap(), &expected, &what);
}

#[test]
fn script_layout_empty() {
    script_layout(1 << 20, &[], 65536, 16);
}

#[test]
fn script_layout_full() {
    script_layout(1 << 20, &[(0, 1 << 20)], 65536, 16);
}

#[test]
fn script_layout_sparse_many_l2_tables() {
    // 512-byte clusters: one L2 table covers 32 KiB.
    script_layout(
        4 << 20,
        &[
            (0, 700),
            (40_000, 100_000),
            (1 << 20, 512),
            (4_190_000, 4_000),
        ],
        512,
        16,
    );
}

#[test]
fn script_layout_unaligned_size() {
    // Rounded up to 512 by the script, not to the cluster.
    script_layout(1_000_037, &[(0, 10), (900_000, 100_037)], 65536, 16);
}

#[test]
fn script_layout_2m_clusters() {
    script_layout(9 << 20, &[(100, 3 << 20), (8 << 20, 1 << 20)], 2 << 20, 16);
}

#[test]
fn script_layout_refcount_widths() {
    for bits in [1, 8, 64] {
        script_layout(3 << 20, &[(5000, 300_000), (2 << 20, 70_000)], 4096, bits);
    }
}

/// Makes an image with qemu-img/qemu-io, rewrites it into forward order
/// (checked clean and equal by qemu-img), and decodes it.
fn forward(d: &Dir, name: &str) {
    let img = load(d, name);
    let fwd = forward_order(&img);
    save(d, "fwd.qcow2", &fwd);
    assert_check_clean(d, "fwd.qcow2");
    assert_compare_equal(d, name, "qcow2", "fwd.qcow2", "qcow2");
    let expected = qemu_raw(d, name, "qcow2");
    assert_disk_eq(&decode_piped(fwd.clone()).unwrap(), &expected, name);
    assert_disk_eq(&decode_trickled(&fwd).unwrap(), &expected, name);
}

fn has_compressed(d: &Dir, name: &str) -> bool {
    let img = Image::open(d.path(name)).unwrap();
    img.map_all().any(|e| e.unwrap().compressed)
}

/// `qemu-img convert -c` of varied content: compressible and random
/// clusters, holes, a size that is not cluster aligned.
fn compressed(ctype: &str, cluster_size: &str) {
    let d = Dir::new();
    let size = 3 * 1024 * 1024 + 7 * 512;
    let ranges: Vec<(u64, u64)> = (0..30u64)
        .map(|i| (i * 100_000 + 1234, 8000 + (i % 5) * 20_000))
        .chain([(size - 3000, 3000)])
        .collect();
    save(&d, "src.raw", &raw_disk(size, &ranges));
    d.img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        &format!("compression_type={ctype},cluster_size={cluster_size}"),
        "src.raw",
        "c.qcow2",
    ]);
    assert!(has_compressed(&d, "c.qcow2"));
    forward(&d, "c.qcow2");
}

#[test]
fn compressed_zlib() {
    compressed("zlib", "64k");
}

#[test]
fn compressed_zstd() {
    compressed("zstd", "64k");
}

#[test]
fn compressed_zlib_small_clusters() {
    compressed("zlib", "4k");
}

#[test]
fn compressed_zstd_2m_clusters() {
    compressed("zstd", "2M");
}

/// Writes of every cluster kind (from the fixture matrix).
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
    "write -P 0x77 1900k 40k",
    "write -P 0x88 1200k 4k",
];

fn mixed(opts: &str) {
    let d = Dir::new();
    d.create("a.qcow2", opts, "2M");
    d.io("a.qcow2", MIXED);
    forward(&d, "a.qcow2");
}

#[test]
fn mixed_v3() {
    mixed("");
}

#[test]
fn mixed_v2() {
    mixed("compat=0.10");
}

#[test]
fn mixed_512_byte_clusters() {
    mixed("cluster_size=512");
}

#[test]
fn mixed_refcount_bits_1() {
    mixed("refcount_bits=1");
}

#[test]
fn mixed_2m_clusters_unaligned_size() {
    let d = Dir::new();
    d.create("a.qcow2", "cluster_size=2M", "9437696"); // 9 MiB + 512
    d.io(
        "a.qcow2",
        &[
            "write -P 1 0 4k",
            "write -P 2 3M 1M",
            "write -c -P 3 4M 2M",
            "write -z 6M 1M",
            "write -P 4 9216k 512",
        ],
    );
    forward(&d, "a.qcow2");
}

#[test]
fn extended_l2_subclusters() {
    let d = Dir::new();
    d.create("a.qcow2", "extended_l2=on,cluster_size=64k", "2M");
    d.io(
        "a.qcow2",
        &[
            "write -P 1 0 4k",
            "write -P 2 10k 2k",
            "write -P 6 30k 6k",
            "write -z 64k 8k",
            "write -P 3 128k 64k",
            "write -z 136k 4k",
            "write -z 192k 64k",
            "write -c -P 4 256k 64k",
            "write -P 5 1M 2k",
            "write -P 7 2046k 2k",
        ],
    );
    forward(&d, "a.qcow2");
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
    forward(&d, "a.qcow2");
}

#[test]
fn data_written_backwards_in_one_l2_table() {
    // Host order is the reverse of guest order: chunks come in host order.
    let d = Dir::new();
    d.create("a.qcow2", "", "8M");
    let cmds: Vec<String> = (0..16)
        .rev()
        .map(|i| format!("write -P {} {}k 64k", i + 1, i * 448))
        .collect();
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    d.io("a.qcow2", &cmds);
    forward(&d, "a.qcow2");
    // qemu's own file is forward-ordered too here: one L2 table, first.
    let img = load(&d, "a.qcow2");
    let expected = qemu_raw(&d, "a.qcow2", "qcow2");
    assert_disk_eq(&decode_piped(img).unwrap(), &expected, "a.qcow2");
}

/// qemu-img convert output is decoded right, or refused as not forward
/// ordered: never decoded wrong. Returns whether it decoded.
fn qemu_output(d: &Dir, name: &str) -> bool {
    let img = load(d, name);
    let expected = qemu_raw(d, name, "qcow2");
    match decode_piped(img) {
        Ok(disk) => {
            assert_disk_eq(&disk, &expected, name);
            true
        }
        Err(e @ (StreamError::NotForward { .. } | StreamError::TableBehind { .. })) => {
            assert!(e.to_string().contains("not a forward-only stream"), "{e}");
            false
        }
        Err(e) => panic!("{name}: {e}"),
    }
}

#[test]
fn qemu_img_convert_output_decodes_or_is_refused() {
    let d = Dir::new();
    let size = 4 << 20;
    let ranges: Vec<(u64, u64)> = (0..12u64).map(|i| (i * 340_000, 30_000)).collect();
    save(&d, "src.raw", &raw_disk(size, &ranges));
    let mut decoded = Vec::new();
    for (name, opts) in [
        // One L2 table, allocated before the first data cluster.
        ("one_l2.qcow2", "cluster_size=64k"),
        ("one_l2_v2.qcow2", "cluster_size=64k,compat=0.10"),
        ("prealloc.qcow2", "cluster_size=64k,preallocation=metadata"),
        // Many L2 tables, each allocated after the data before it.
        ("many_l2.qcow2", "cluster_size=512"),
        (
            "many_l2_prealloc.qcow2",
            "cluster_size=512,preallocation=metadata",
        ),
    ] {
        d.img(&["convert", "-O", "qcow2", "-o", opts, "src.raw", name]);
        decoded.push((name, qemu_output(&d, name)));
    }
    assert!(decoded.iter().any(|&(_, ok)| ok), "{decoded:?}");
    assert!(decoded.iter().any(|&(_, ok)| !ok), "{decoded:?}");
}
