//! Writes, write zeroes, trim and flush against real servers: qemu-nbd on
//! a raw file (the file is the oracle), nbdkit's memory plugin behind its
//! log filter (the requests as the server saw them), and nbdkit's error
//! filter (errors typed, the connection still usable).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use sparsekit_nbd::{
    Client, ClientConfig, Command as Cmd, Errno, Error, NbdUri, RequestError, ZeroFlags,
};

const MIB: u64 = 1 << 20;

fn connect_with(uri: &str, config: ClientConfig) -> Client {
    let config = ClientConfig {
        timeout: Some(Duration::from_secs(20)),
        ..config
    };
    Client::connect_with(&NbdUri::parse(uri).unwrap(), &config)
        .unwrap_or_else(|e| panic!("connecting to {uri}: {e:#?}"))
}

fn connect(uri: &str) -> Client {
    connect_with(uri, ClientConfig::default())
}

/// Bytes that differ from one position to the next.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i / 7) as u8 ^ seed).collect()
}

#[test]
fn qemu_nbd_raw_file_takes_writes_zeroes_trim_and_flush() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    run(Command::new(qemu_img())
        .args(["create", "-q", "-f", "raw"])
        .arg(&img)
        .arg("64M"));
    let sock = dir.path().join("q.sock");
    let server = start_qemu_nbd(
        &sock,
        &["-f", "raw", "--discard=unmap", img.to_str().unwrap()],
    );
    let mut c = connect(&server.uri);
    let f = c.flags();
    assert!(
        !f.read_only() && f.can_flush() && f.can_zero() && f.can_trim(),
        "{f:?}"
    );

    let mut model = vec![0u8; 64 * MIB as usize];
    // 40 MiB: more than one request can carry, written in many.
    let big = pattern(40 * MIB as usize, 0x5a);
    c.write(4 * MIB, &big).unwrap();
    model[4 * MIB as usize..44 * MIB as usize].copy_from_slice(&big);
    let small = pattern(4096, 0xc3);
    c.write(60 * MIB, &small).unwrap();
    model[60 * MIB as usize..60 * MIB as usize + 4096].copy_from_slice(&small);
    // Zeroes over written data, allocated and punched.
    c.write_zeroes(8 * MIB, 3 * MIB, ZeroFlags::default())
        .unwrap();
    let no_hole = ZeroFlags {
        no_hole: true,
        ..ZeroFlags::default()
    };
    c.write_zeroes(20 * MIB, MIB, no_hole).unwrap();
    model[8 * MIB as usize..11 * MIB as usize].fill(0);
    model[20 * MIB as usize..21 * MIB as usize].fill(0);
    c.flush().unwrap();

    let mut back = vec![0xffu8; model.len()];
    c.read(0, &mut back).unwrap();
    assert!(back == model, "read back differs from what was written");
    assert!(std::fs::read(&img).unwrap() == model, "the file differs");

    // Trimmed bytes read as whatever the server likes; with qemu-nbd's
    // --discard=unmap on a raw file they become a hole, reading as zeros.
    c.trim(30 * MIB, 2 * MIB).unwrap();
    c.flush().unwrap();
    let mut t = vec![0xffu8; 2 * MIB as usize];
    c.read(30 * MIB, &mut t).unwrap();
    let on_disk = std::fs::read(&img).unwrap();
    assert!(t[..] == on_disk[30 * MIB as usize..32 * MIB as usize]);
    c.close().unwrap();
}

#[test]
fn requests_respect_the_block_size_constraints() {
    let dir = tempfile::tempdir().unwrap();
    let (server, log) = nbdkit_logged(
        dir.path(),
        &[
            "--filter=blocksize-policy",
            "memory",
            "size=64M",
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=1M",
            "blocksize-error-policy=error",
        ],
    );
    // A request size that is no multiple of the preferred block.
    let mut c = connect_with(
        &server.uri,
        ClientConfig {
            read_request: 300_000,
            ..ClientConfig::default()
        },
    );
    let data = pattern(5 * MIB as usize + 8192, 0x11);
    c.write(4096, &data).unwrap();
    c.write_zeroes(12 * MIB, 20 * MIB, ZeroFlags::default())
        .unwrap();
    c.trim(40 * MIB, 8 * MIB).unwrap();
    c.flush().unwrap();
    // Unaligned writes are refused before anything is sent.
    let e = c.write(100, &[1, 2, 3]).unwrap_err();
    assert!(matches!(e, Error::Unaligned { minimum: 4096, .. }), "{e:?}");
    let e = c.write_zeroes(4096, 100, ZeroFlags::default()).unwrap_err();
    assert!(matches!(e, Error::Unaligned { .. }), "{e:?}");
    let mut back = vec![0u8; data.len()];
    c.read(4096, &mut back).unwrap();
    assert!(back == data);
    drop(c);

    let reqs = requests(&log, 0);
    // Threads of nbdkit may log them out of order.
    let mut writes: Vec<_> = reqs.iter().filter(|r| r.kind == "Write").collect();
    writes.sort_by_key(|w| w.offset);
    // 300000 rounds up to 327680 (five preferred blocks); cut at its
    // multiples, so only the first and last write are shorter.
    assert!(writes.len() >= 17, "{writes:?}");
    for (i, w) in writes.iter().enumerate() {
        assert!(w.count <= MIB, "{w:?}");
        if i > 0 && i + 1 < writes.len() {
            assert_eq!((w.offset % 327_680, w.count), (0, 327_680), "{w:?}");
        }
    }
    let covered: u64 = writes.iter().map(|w| w.count).sum();
    assert_eq!(covered, data.len() as u64, "an unaligned write was sent");
    for kind in ["Zero", "Trim", "Flush"] {
        assert!(reqs.iter().any(|r| r.kind == kind), "no {kind} in {reqs:?}");
    }
    for r in &reqs {
        assert!(r.offset % 4096 == 0 && r.count % 4096 == 0, "{r:?}");
    }
}

#[test]
fn payloads_stay_within_32_mib() {
    let dir = tempfile::tempdir().unwrap();
    // nbdkit advertises no fixed limit (maximum 0xffffffff).
    let (server, log) = nbdkit_logged(dir.path(), &["memory", "size=128M"]);
    let mut c = connect_with(
        &server.uri,
        ClientConfig {
            read_request: 64 << 20,
            ..ClientConfig::default()
        },
    );
    let data = pattern(80 * MIB as usize, 0x77);
    c.write(0, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(0, &mut back).unwrap();
    assert!(back == data);
    drop(c);
    let reqs = requests(&log, 0);
    for kind in ["Write", "Read"] {
        let mut sizes: Vec<u64> = reqs
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.count)
            .collect();
        sizes.sort();
        assert_eq!(sizes, [16 * MIB, 32 * MIB, 32 * MIB], "{kind}");
    }
}

#[test]
fn read_only_exports_refuse_writes_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    let (server, log) = nbdkit_logged(dir.path(), &["-r", "memory", "size=1M"]);
    let mut c = connect(&server.uri);
    assert!(c.flags().read_only());
    let refusals = [
        c.write(0, &[0u8; 4096]).unwrap_err(),
        c.write_zeroes(0, 4096, ZeroFlags::default()).unwrap_err(),
        c.trim(0, 4096).unwrap_err(),
    ];
    for e in &refusals {
        assert!(
            matches!(
                e,
                Error::Request {
                    reason: RequestError::ReadOnly { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("read-only"), "{e}");
    }
    // Still usable: nothing half-sent.
    let mut buf = [1u8; 4096];
    c.read(0, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 4096]);
    drop(c);
    let reqs = requests(&log, 0);
    assert!(reqs.iter().all(|r| r.kind == "Read"), "{reqs:?}");
}

#[test]
fn qemu_nbd_read_only_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![7u8; MIB as usize]).unwrap();
    let sock = dir.path().join("q.sock");
    let server = start_qemu_nbd(&sock, &["-r", "-f", "raw", img.to_str().unwrap()]);
    let mut c = connect(&server.uri);
    let e = c.write(0, &[0u8; 512]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Request {
                reason: RequestError::ReadOnly { .. },
                ..
            }
        ),
        "{e:?}"
    );
    let mut buf = [0u8; 512];
    c.read(0, &mut buf).unwrap();
    assert_eq!(buf, [7u8; 512]);
    assert_eq!(std::fs::read(&img).unwrap(), vec![7u8; MIB as usize]);
}

#[test]
fn server_errors_on_writes_are_typed_and_the_connection_survives() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k.sock");
    let server = start_nbdkit(
        &sock,
        &[
            "--filter=error",
            "memory",
            "size=4M",
            "error-pwrite=EIO",
            "error-pwrite-rate=100%",
            "error-zero=ENOSPC",
            "error-zero-rate=100%",
            "error-trim=EIO",
            "error-trim-rate=100%",
        ],
    );
    let mut c = connect(&server.uri);
    let server_error = |e: Error| match e {
        Error::Server {
            command,
            offset,
            errno,
            ..
        } => (command, offset, errno),
        e => panic!("expected a server error, got {e:?}"),
    };
    let e = c.write(0x30000, &pattern(MIB as usize, 1)).unwrap_err();
    assert!(e.to_string().contains("NBD_CMD_WRITE at 0x30000"), "{e}");
    assert_eq!(server_error(e), (Cmd::WRITE, 0x30000, Errno::EIO));
    let e = c
        .write_zeroes(0x10000, 4096, ZeroFlags::default())
        .unwrap_err();
    assert_eq!(server_error(e), (Cmd::WRITE_ZEROES, 0x10000, Errno::ENOSPC));
    let e = c.trim(0x20000, 4096).unwrap_err();
    assert_eq!(server_error(e), (Cmd::TRIM, 0x20000, Errno::EIO));
    // Every reply was drained: the connection still flushes, reads and maps.
    c.flush().unwrap();
    let mut buf = vec![1u8; MIB as usize];
    c.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert!(c.block_status_once("base:allocation", 0..4096).is_ok());
}
