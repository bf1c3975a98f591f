//! Requests sized as the server's block size constraints allow, checked
//! against real nbdkit servers: their own request log (the log filter,
//! which sees what the client sent) says every request was aligned and
//! bounded, and the maps and bytes agree with nbdinfo and qemu-img.

mod common;

use std::time::Duration;

use common::*;
use sparsekit_extent::{Extent, Kind};
use sparsekit_nbd::map::{self, StatusExtent};
use sparsekit_nbd::{Client, ClientConfig, NbdUri};

const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;

fn connect(uri: &str) -> Client {
    let config = ClientConfig {
        timeout: Some(Duration::from_secs(20)),
        ..ClientConfig::default()
    };
    Client::connect_with(&NbdUri::parse(uri).unwrap(), &config)
        .unwrap_or_else(|e| panic!("connecting to {uri}: {e:#?}"))
}

fn status(c: &mut Client, range: std::ops::Range<u64>) -> Vec<StatusExtent> {
    c.block_status("base:allocation", range)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// nbdkit 1.32 aborts on a block status request of 0xffffffff over an
/// extent longer than 4 GiB, and the export is gone for every client.
#[test]
fn nbdkit_memory_1t_maps_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (server, log) = nbdkit_logged(dir.path(), &["memory", "size=1T"]);
    let oracle = nbdinfo_map(&server.uri, "base:allocation");
    let skip = connections(&log);
    let mut c = connect(&server.uri);
    assert_eq!(c.size(), TIB);
    let ours =
        serde_json::to_value(map::nbdinfo_map("base:allocation", status(&mut c, 0..TIB))).unwrap();
    assert_eq!(ours, oracle);
    let mut buf = vec![0xffu8; 2 * MIB as usize];
    c.read(TIB - 2 * MIB, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));

    // Still serving: a second client connects and maps.
    let mut second = connect(&server.uri);
    let m: Vec<Extent> = second
        .map(0..TIB)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(m, [Extent::new(0, TIB, Kind::Hole)]);
    drop((c, second));
    let reqs = requests(&log, skip);
    assert_eq!(nbdinfo_map(&server.uri, "base:allocation"), oracle);

    let statuses: Vec<_> = reqs.iter().filter(|r| r.kind == "Extents").collect();
    assert!(!statuses.is_empty(), "no status request logged: {reqs:?}");
    for r in &reqs {
        // No minimum advertised: 512-byte alignment, as nbdinfo.
        assert!(r.offset % 512 == 0 && r.count % 512 == 0, "{r:?}");
        match r.kind.as_str() {
            "Extents" => assert!(r.count <= (1 << 32) - 512, "{r:?}"),
            "Read" => assert!(r.count <= 32 * MIB, "{r:?}"),
            _ => {}
        }
    }
}

/// The blocksize filter advertises a minimum of 1 whatever its minblock,
/// and rounds status requests up to minblock in 32 bits: nbdinfo's
/// 0xffffffff on a 1 TiB export kills it. Unaligned reads go through it
/// as through any server.
#[test]
fn nbdkit_blocksize_filter_minblock_4096() {
    let dir = tempfile::tempdir().unwrap();
    let data = "1 2 3 @1048576 \"hello\" @4294967296 \"far\"";
    let sock = dir.path().join("k.sock");
    let server = start_nbdkit(
        &sock,
        &[
            "--filter=blocksize",
            "data",
            data,
            "size=1T",
            "minblock=4096",
        ],
    );
    let mut c = connect(&server.uri);
    let ours = serde_json::to_value(map::qemu_img_map(status(&mut c, 0..TIB))).unwrap();
    assert_eq!(ours, qemu_img_map(&server.uri));
    let mut three = [0u8; 3];
    c.read(0, &mut three).unwrap();
    assert_eq!(three, [1, 2, 3]);
    let mut around = [0u8; 7];
    c.read(MIB - 1, &mut around).unwrap();
    assert_eq!(&around, b"\0hello\0");
    let mut far = [0u8; 3];
    c.read(1 << 32, &mut far).unwrap();
    assert_eq!(&far, b"far");

    // Still serving.
    let mut second = connect(&server.uri);
    let sub = status(&mut second, MIB..MIB + 4096);
    assert_eq!(sub.first().unwrap().offset, MIB);
}

/// A server that enforces a 4 KiB minimum block (blocksize-policy with the
/// error policy): every request aligned and within the maximum payload,
/// unaligned caller ranges read through whole blocks, maps equal to
/// nbdinfo's.
#[test]
fn nbdkit_enforced_minimum_4096() {
    let dir = tempfile::tempdir().unwrap();
    let data = "1 2 3 @1048576 \"hello\" @3145728 ( 0x55 ) * 3000000";
    let (server, log) = nbdkit_logged(
        dir.path(),
        &[
            "--filter=blocksize-policy",
            "data",
            data,
            "size=8M",
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=1M",
            "blocksize-error-policy=error",
        ],
    );
    let oracle = nbdinfo_map(&server.uri, "base:allocation");
    let want = convert_raw(dir.path(), &server.uri, "raw");
    let skip = connections(&log);
    let mut c = connect(&server.uri);
    let bs = c.block_size();
    assert_eq!(
        (bs.minimum, bs.preferred, bs.maximum),
        (4096, 65536, MIB as u32)
    );
    let ours = serde_json::to_value(map::nbdinfo_map(
        "base:allocation",
        status(&mut c, 0..8 * MIB),
    ))
    .unwrap();
    assert_eq!(ours, oracle);

    let mut whole = vec![0u8; 8 * MIB as usize];
    c.read(0, &mut whole).unwrap();
    assert!(whole == want, "aligned read differs from qemu-img convert");
    // Unaligned: inside one block, across a boundary, head+middle+tail.
    for (offset, len) in [
        (1u64, 2usize),
        (4095, 2),
        (MIB - 5, 10),
        (1000, 3 << 20 | 12345),
    ] {
        let mut buf = vec![0xeeu8; len];
        c.read(offset, &mut buf).unwrap();
        let o = offset as usize;
        assert!(buf == want[o..o + len], "read at {offset:#x}+{len:#x}");
    }
    let sub = status(&mut c, 5000..MIB + 7);
    assert_eq!((sub[0].offset, sub.last().unwrap().end()), (5000, MIB + 7));
    drop(c);

    let reqs = requests(&log, skip);
    assert!(reqs.iter().any(|r| r.kind == "Read"), "{reqs:?}");
    for r in &reqs {
        assert!(r.offset % 4096 == 0 && r.count % 4096 == 0, "{r:?}");
        if r.kind == "Read" {
            assert!(r.count <= MIB, "{r:?}");
        }
    }
}

/// The log parser reads what the log filter writes.
#[test]
fn log_lines_parse() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("l");
    std::fs::write(
        &log,
        "2026-01-01 00:00:00.0 connection=1 Extents id=1 offset=0x0 count=0xfffffe00 req_one=0 ...\n\
         2026-01-01 00:00:00.1 connection=1 ...Extents id=1 extents=(0x0 0x1 \"\") return=0\n\
         2026-01-01 00:00:00.2 connection=1 Read id=2 offset=0x1000 count=0x40000 ...\n",
    )
    .unwrap();
    let r = requests(&log, 0);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(connections(&log), 1);
    assert_eq!((r[0].kind.as_str(), r[0].count), ("Extents", 0xffff_fe00));
    assert_eq!((r[1].kind.as_str(), r[1].offset), ("Read", 0x1000));
}
