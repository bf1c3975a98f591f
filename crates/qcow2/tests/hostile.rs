//! Damaged and hostile images, made by qemu-img then poked: every one is
//! an error with a clear cause, never a panic.

mod common;

use std::os::unix::fs::FileExt;

use common::Dir;
use sparsekit_qcow2::{Error, Image, OpenOptions, Qcow2};

fn poke(path: &std::path::Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn peek64(path: &std::path::Path, offset: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

/// A 1 MiB image with one data cluster at guest 0; returns (path, L1
/// table offset, L2 table offset).
fn one_cluster(d: &Dir) -> (std::path::PathBuf, u64, u64) {
    let p = d.create("a.qcow2", "", "1M");
    d.io("a.qcow2", &["write -P 1 0 64k"]);
    let l1 = peek64(&p, 40);
    let l2 = peek64(&p, l1) & 0x00ff_ffff_ffff_fe00;
    (p, l1, l2)
}

/// A damaged L1 table refuses the image when it is opened, before
/// anything is read through it.
fn open_err(p: &std::path::Path) -> Error {
    Image::open(p).expect_err("open must fail")
}

fn map_err(p: &std::path::Path) -> Error {
    let img = Image::open(p).unwrap();
    img.map_all()
        .collect::<Result<Vec<_>, _>>()
        .expect_err("map must fail")
}

#[test]
fn l1_entry_pointing_outside_the_file() {
    let d = Dir::new();
    let (p, l1, _) = one_cluster(&d);
    poke(&p, l1, &0x8000_0000_7000_0000u64.to_be_bytes());
    let e = open_err(&p);
    assert!(
        matches!(
            e.root(),
            Error::OutsideFile {
                what: "L2 table",
                offset: 0x7000_0000,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn l1_entry_with_reserved_bits() {
    let d = Dir::new();
    let (p, l1, l2) = one_cluster(&d);
    poke(&p, l1, &(0x8000_0000_0000_0001 | l2).to_be_bytes());
    let e = open_err(&p);
    assert!(
        matches!(e.root(), Error::BadL1Entry { index: 0, .. }),
        "{e:?}"
    );
}

#[test]
fn l2_entry_pointing_outside_the_file() {
    let d = Dir::new();
    let (p, _, l2) = one_cluster(&d);
    poke(&p, l2, &0x8000_0000_7000_0000u64.to_be_bytes());
    let img = Image::open(&p).unwrap();
    let mut buf = [0u8; 512];
    let e = img.read_at(&mut buf, 0).unwrap_err();
    assert!(
        matches!(
            e.root(),
            Error::OutsideFile {
                what: "data cluster",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn l2_entry_with_reserved_bits_names_table_and_index() {
    let d = Dir::new();
    let (p, _, l2) = one_cluster(&d);
    // Entry 3: bit 56 set.
    poke(&p, l2 + 24, &0x0100_0000_0001_0000u64.to_be_bytes());
    let e = map_err(&p);
    match e.root() {
        Error::BadL2Entry {
            table_offset,
            index,
            ..
        } => assert_eq!((*table_offset, *index), (l2, 3)),
        other => panic!("{other:?}"),
    }
    assert!(format!("{}", e.root()).contains(&format!("{l2:#x}")));
}

#[test]
fn huge_l1_size_is_refused_before_allocating() {
    let d = Dir::new();
    let (p, _, _) = one_cluster(&d);
    poke(&p, 36, &3_000_000_000u32.to_be_bytes());
    let e = Qcow2::open(&p).unwrap_err();
    assert!(
        matches!(
            e.root(),
            Error::BadField {
                field: "l1_size",
                ..
            }
        ),
        "{e:?}"
    );
    // Within qemu's cap but beyond the file.
    poke(&p, 36, &4_000_000u32.to_be_bytes());
    poke(&p, 24, &(4_000_000u64 << 29).to_be_bytes());
    let e = Qcow2::open(&p).unwrap_err();
    assert!(
        matches!(
            e.root(),
            Error::OutsideFile {
                what: "L1 table",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn unknown_incompatible_bit() {
    let d = Dir::new();
    let (p, _, _) = one_cluster(&d);
    poke(&p, 72, &(1u64 << 20).to_be_bytes());
    let e = Qcow2::open(&p).unwrap_err();
    assert_eq!(
        e.root().to_string(),
        "unsupported incompatible feature bits 0x100000 (bit 20)"
    );
}

#[test]
fn bad_magic_and_truncated() {
    let d = Dir::new();
    let (p, _, _) = one_cluster(&d);
    std::fs::write(d.path("short.qcow2"), &std::fs::read(&p).unwrap()[..60]).unwrap();
    let e = Qcow2::open(d.path("short.qcow2")).unwrap_err();
    assert!(matches!(e.root(), Error::TruncatedHeader { .. }), "{e:?}");
    poke(&p, 0, b"QFI\x00");
    let e = Qcow2::open(&p).unwrap_err();
    assert!(matches!(e.root(), Error::BadMagic { .. }), "{e:?}");
}

#[test]
fn looping_backing_chain() {
    let d = Dir::new();
    d.create("a.qcow2", "", "1M");
    d.create("b.qcow2", "backing_file=a.qcow2,backing_fmt=qcow2", "1M");
    d.img(&["rebase", "-u", "-F", "qcow2", "-b", "b.qcow2", "a.qcow2"]);
    let e = Image::open(d.path("b.qcow2")).unwrap_err();
    assert!(matches!(e.root(), Error::BackingLoop { .. }), "{e:?}");
}

#[test]
fn chain_deeper_than_the_cap() {
    let d = Dir::new();
    d.create("c0.qcow2", "", "1M");
    for i in 1..4 {
        d.create(
            &format!("c{i}.qcow2"),
            &format!("backing_file=c{}.qcow2,backing_fmt=qcow2", i - 1),
            "1M",
        );
    }
    let e = Image::open_with(
        d.path("c3.qcow2"),
        &OpenOptions {
            max_depth: 3,
            ..OpenOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e.root(), Error::ChainTooDeep { max: 3 }), "{e:?}");
    assert_eq!(Image::open(d.path("c3.qcow2")).unwrap().backing_depth(), 3);
}

#[test]
fn encrypted_image() {
    let d = Dir::new();
    d.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "e.qcow2",
        "1M",
    ]);
    let e = Image::open(d.path("e.qcow2")).unwrap_err();
    assert!(matches!(e.root(), Error::Encrypted { .. }), "{e:?}");
}

#[test]
fn missing_backing_file() {
    let d = Dir::new();
    d.create("base.qcow2", "", "1M");
    d.create(
        "top.qcow2",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "1M",
    );
    std::fs::remove_file(d.path("base.qcow2")).unwrap();
    let e = Image::open(d.path("top.qcow2")).unwrap_err();
    assert!(matches!(e.root(), Error::Open { .. }), "{e:?}");
}

#[test]
fn backing_probed_when_format_absent() {
    let d = Dir::new();
    d.img(&["create", "-q", "-f", "raw", "base.raw", "1M"]);
    d.io_fmt("base.raw", "raw", &["write -P 3 0 4k"]);
    d.create("top.qcow2", "backing_file=base.raw,backing_fmt=raw", "1M");
    // Drop the backing format extension: rewrite its type to an unknown one.
    let p = d.path("top.qcow2");
    let mut off = 112;
    loop {
        let t = {
            let f = std::fs::File::open(&p).unwrap();
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, off).unwrap();
            b
        };
        let kind = u32::from_be_bytes(t[..4].try_into().unwrap());
        let len = u32::from_be_bytes(t[4..].try_into().unwrap()) as u64;
        assert_ne!(kind, 0, "no backing format extension");
        if kind == 0xe279_2aca {
            poke(&p, off, &0x1234_5678u32.to_be_bytes());
            break;
        }
        off += 8 + len.next_multiple_of(8);
    }
    let img = Image::open(&p).unwrap();
    assert_eq!(img.layers()[1].format(), sparsekit_qcow2::Format::Raw);
    assert!(img.top().header().backing_format.is_none());
    let mut b = [0u8; 4096];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 3));
}
