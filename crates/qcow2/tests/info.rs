//! `Qcow2::info` serializes to exactly what `qemu-img info --output=json`
//! prints, compared as JSON values.

mod common;

use common::Dir;
use sparsekit_qcow2::{Image, Qcow2};

fn assert_info(d: &Dir, name: &str) -> serde_json::Value {
    let p = d.path(name);
    let ours = serde_json::to_value(Qcow2::open(&p).unwrap().info().unwrap()).unwrap();
    let out = d.img(&["info", "--output=json", p.to_str().unwrap()]);
    let theirs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ours, theirs, "info of {name}");
    ours
}

#[test]
fn plain_v3_and_v2() {
    let d = Dir::new();
    d.create("a.qcow2", "", "1M");
    d.io("a.qcow2", &["write -P 1 0 64k"]);
    assert_info(&d, "a.qcow2");
    d.create("v2.qcow2", "compat=0.10,cluster_size=4k", "3M");
    assert_info(&d, "v2.qcow2");
}

#[test]
fn bitmaps_and_snapshots() {
    let d = Dir::new();
    d.create("a.qcow2", "refcount_bits=64", "4M");
    d.img(&["bitmap", "--add", "a.qcow2", "b1"]);
    d.img(&["bitmap", "--add", "-g", "1M", "--disable", "a.qcow2", "b2"]);
    d.io("a.qcow2", &["write -P 1 0 64k"]);
    d.img(&["snapshot", "-c", "first", "a.qcow2"]);
    d.io("a.qcow2", &["write -P 2 0 64k"]);
    d.img(&["snapshot", "-c", "second", "a.qcow2"]);
    let v = assert_info(&d, "a.qcow2");
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 2);
}

#[test]
fn backing_and_data_file() {
    let d = Dir::new();
    d.img(&["create", "-q", "-f", "raw", "base.raw", "1M"]);
    d.create("top.qcow2", "backing_file=base.raw,backing_fmt=raw", "2M");
    assert_info(&d, "top.qcow2");
    d.create(
        "d.qcow2",
        "data_file=d.data,extended_l2=on,lazy_refcounts=on,compression_type=zstd",
        "1M",
    );
    assert_info(&d, "d.qcow2");
    d.create("r.qcow2", "data_file=r.data,data_file_raw=on", "1M");
    assert_info(&d, "r.qcow2");
}

#[test]
fn backing_chain() {
    let d = Dir::new();
    d.img(&["create", "-q", "-f", "raw", "base.raw", "1M"]);
    d.io_fmt("base.raw", "raw", &["write -P 1 0 4k"]);
    d.create("mid.qcow2", "backing_file=base.raw,backing_fmt=raw", "1M");
    d.create(
        "top.qcow2",
        "backing_file=mid.qcow2,backing_fmt=qcow2",
        "2M",
    );
    let p = d.path("top.qcow2");
    let ours = Image::open(&p).unwrap().info_chain().unwrap();
    assert_eq!(ours.len(), 3);
    let out = d.img(&[
        "info",
        "--backing-chain",
        "--output=json",
        p.to_str().unwrap(),
    ]);
    let theirs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(serde_json::to_value(&ours).unwrap(), theirs);
}

#[test]
fn allocation_bitmap_and_allocated_bytes() {
    let d = Dir::new();
    d.create("a.qcow2", "cluster_size=4k", "100k");
    d.io(
        "a.qcow2",
        &[
            "write -P 1 0 4k",     // cluster 0: data
            "write -c -P 2 8k 4k", // cluster 2: compressed
            "write -z 12k 4k",     // cluster 3: zero, no host cluster
            "write -P 5 16k 4k",   // cluster 4: data...
            "write -z 16k 4k",     // ...then zero, host cluster kept
            "write -P 3 36k 8k",   // clusters 9, 10
            "write -P 4 96k 4k",   // cluster 24, the last one
        ],
    );
    let q = Qcow2::open(d.path("a.qcow2")).unwrap();
    let mut bits = Vec::new();
    assert_eq!(q.write_allocation_bitmap(&mut bits).unwrap(), 6);
    // 25 clusters: 4 bytes.
    assert_eq!(bits, [0b0001_0101, 0b0000_0110, 0, 0b0000_0001]);
    assert_eq!(q.allocated_bytes().unwrap(), 6 * 4096);
    assert_eq!(q.check().unwrap().allocated_clusters, 6);
}
