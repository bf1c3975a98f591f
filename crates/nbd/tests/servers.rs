//! The client against real servers, with nbdinfo and qemu-img as oracles.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sparsekit_nbd::map::{self, StatusExtent};
use sparsekit_nbd::{Client, ClientConfig, Errno, Error, HandshakeError, HeaderMode, NbdUri};

const MIB: u64 = 1024 * 1024;

fn config(contexts: &[&str], extended: bool) -> ClientConfig {
    ClientConfig {
        contexts: contexts.iter().map(|s| s.to_string()).collect(),
        extended_headers: extended,
        timeout: Some(Duration::from_secs(20)),
        ..ClientConfig::default()
    }
}

fn connect(uri: &str, contexts: &[&str], extended: bool) -> Client {
    Client::connect_with(&NbdUri::parse(uri).unwrap(), &config(contexts, extended))
        .unwrap_or_else(|e| panic!("connecting to {uri}: {e:#?}"))
}

fn status(c: &mut Client, ctx: &str) -> Vec<StatusExtent> {
    let size = c.size();
    c.block_status(ctx, 0..size)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Our map of `ctx` in nbdinfo's JSON form.
fn our_nbdinfo(c: &mut Client, ctx: &str) -> Value {
    serde_json::to_value(map::nbdinfo_map(ctx, status(c, ctx))).unwrap()
}

/// A qcow2 chain: base (data at 0), top (data, a zero cluster, a bitmap
/// bm0 dirtied by writes made while it was enabled).
fn make_chain(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    run(Command::new(qemu_img())
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("8M"));
    qemu_io_cmds(&base, &["write -P 0x11 0 128k", "write -P 0x22 4M 64k"]);
    run(Command::new(qemu_img())
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top));
    qemu_io_cmds(&top, &["write -P 0xab 1M 192k", "write -z 2M 128k"]);
    run(Command::new(qemu_img())
        .args(["bitmap", "--add"])
        .arg(&top)
        .arg("bm0"));
    // Persistent bitmaps are enabled when added: these writes dirty it.
    qemu_io_cmds(&top, &["write -P 0xcd 3M 64k", "write -P 0xef 6M 256k"]);
    let info = run(Command::new(qemu_img())
        .args(["info", "--output=json"])
        .arg(&top));
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert_eq!(bitmaps[0]["name"], "bm0", "qemu-img info: {info}");
    top
}

fn check_qemu_nbd(extended: bool) {
    let dir = tempfile::tempdir().unwrap();
    let top = make_chain(dir.path());
    let sock = dir.path().join("q.sock");
    let server = start_qemu_nbd(
        &sock,
        &[
            "-r",
            "-f",
            "qcow2",
            "-B",
            "bm0",
            "-A",
            top.to_str().unwrap(),
        ],
    );
    let ctxs = [
        "base:allocation",
        "qemu:dirty-bitmap:bm0",
        "qemu:allocation-depth",
    ];
    let mut c = connect(&server.uri, &ctxs, extended);
    let expected_mode = if extended {
        HeaderMode::Extended
    } else {
        HeaderMode::Structured
    };
    assert_eq!(c.mode(), expected_mode);
    assert_eq!(c.size(), 8 * MIB);
    assert!(c.flags().read_only());
    assert_eq!(c.contexts().len(), 3);

    // Maps first: reads could change what the host file system reports.
    for ctx in ctxs {
        assert_eq!(
            our_nbdinfo(&mut c, ctx),
            nbdinfo_map(&server.uri, ctx),
            "context {ctx}"
        );
    }
    let dirty = status(&mut c, "qemu:dirty-bitmap:bm0");
    let dirty: Vec<(u64, u64)> = dirty
        .iter()
        .filter(|e| e.flags & map::NBD_STATE_DIRTY != 0)
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(dirty, [(3 * MIB, 64 * 1024), (6 * MIB, 256 * 1024)]);
    let ours = serde_json::to_value(map::qemu_img_map(status(&mut c, "base:allocation"))).unwrap();
    assert_eq!(ours, qemu_img_map(&server.uri));

    // A shared-vocabulary map: sorted, gap-free, covering the export.
    let extents: Vec<_> = c
        .map(0..c.size())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    sparsekit_extent::check_map(&extents, 0..8 * MIB).unwrap();

    // A sub-range that starts and ends mid-extent.
    let part: Vec<_> = c
        .block_status("base:allocation", MIB + 1000..2 * MIB + 5)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(part.first().unwrap().offset, MIB + 1000);
    assert_eq!(part.last().unwrap().end(), 2 * MIB + 5);

    let mut buf = vec![0u8; c.size() as usize];
    c.read(0, &mut buf).unwrap();
    let want = convert_raw(dir.path(), top.to_str().unwrap(), "qcow2");
    assert!(buf == want, "read differs from qemu-img convert");
    c.close().unwrap();
}

#[test]
fn qemu_nbd_qcow2_extended_headers() {
    check_qemu_nbd(true);
}

#[test]
fn qemu_nbd_qcow2_compact_headers() {
    check_qemu_nbd(false);
}

#[test]
fn qemu_nbd_unknown_export_is_typed() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    run(Command::new(qemu_img())
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("1M"));
    let sock = dir.path().join("q.sock");
    let _server = start_qemu_nbd(
        &sock,
        &["-r", "-f", "qcow2", "-x", "real", img.to_str().unwrap()],
    );
    let err = Client::connect(&unix_uri(&sock, "missing")).unwrap_err();
    match &err {
        Error::Handshake {
            source: HandshakeError::UnknownExport { export, .. },
            ..
        } => assert_eq!(export, "missing"),
        e => panic!("expected UnknownExport, got {e:?}"),
    }
    let c = Client::connect(&unix_uri(&sock, "real")).unwrap();
    assert_eq!(c.size(), MIB);
}

#[test]
fn nbdkit_data_plugin_map_and_pattern() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k.sock");
    // Bytes 1 2 3 at 0, "hello" at 1 MiB, the rest sparse.
    let server = start_nbdkit(&sock, &["data", "data=1 2 3 @1048576 \"hello\"", "size=4M"]);
    let mut c = connect(&server.uri, &["base:allocation"], true);
    assert_eq!(c.size(), 4 * MIB);
    assert_eq!(
        our_nbdinfo(&mut c, "base:allocation"),
        nbdinfo_map(&server.uri, "base:allocation")
    );
    assert_eq!(
        serde_json::to_value(map::qemu_img_map(status(&mut c, "base:allocation"))).unwrap(),
        qemu_img_map(&server.uri)
    );
    let mut buf = vec![0xffu8; 4 * MIB as usize];
    c.read(0, &mut buf).unwrap();
    let mut want = vec![0u8; 4 * MIB as usize];
    want[..3].copy_from_slice(&[1, 2, 3]);
    want[MIB as usize..MIB as usize + 5].copy_from_slice(b"hello");
    assert!(buf == want);
}

#[test]
fn nbdkit_memory_plugin_is_all_hole() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k.sock");
    let server = start_nbdkit(&sock, &["memory", "64M"]);
    let mut c = connect(&server.uri, &["base:allocation"], true);
    let m: Vec<_> = c
        .map(0..c.size())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        m,
        [sparsekit_extent::Extent::new(
            0,
            64 * MIB,
            sparsekit_extent::Kind::Hole
        )]
    );
    assert_eq!(
        our_nbdinfo(&mut c, "base:allocation"),
        nbdinfo_map(&server.uri, "base:allocation")
    );
}

#[test]
fn nbdkit_sparse_random_against_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k.sock");
    let server = start_nbdkit(&sock, &["sparse-random", "100M", "seed=42", "percent=5"]);
    // A small in-flight window and the default one must read the same.
    let mut c = connect(&server.uri, &["base:allocation"], true);
    assert_eq!(
        our_nbdinfo(&mut c, "base:allocation"),
        nbdinfo_map(&server.uri, "base:allocation")
    );
    assert_eq!(
        serde_json::to_value(map::qemu_img_map(status(&mut c, "base:allocation"))).unwrap(),
        qemu_img_map(&server.uri)
    );
    let mut buf = vec![0u8; c.size() as usize];
    c.read(0, &mut buf).unwrap();
    let want = convert_raw(dir.path(), &server.uri, "raw");
    assert!(buf == want, "read differs from qemu-img convert");

    // Only the data extents, read one by one, give the same bytes.
    let mut sparse = vec![0u8; c.size() as usize];
    let extents: Vec<_> = c
        .map(0..c.size())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for e in extents.iter().filter(|e| !e.kind.reads_as_zero()) {
        c.read(e.offset, &mut sparse[e.offset as usize..e.end() as usize])
            .unwrap();
    }
    assert!(sparse == want, "data extents miss some data");
}

#[test]
fn nbdkit_over_tcp_and_multi_conn() {
    let server = start_nbdkit_tcp(&["pattern", "16M"]);
    let uri = NbdUri::parse(&server.uri).unwrap();
    let conns = Client::connect_multi(&uri, &config(&["base:allocation"], true), 4).unwrap();
    let multi = conns[0].flags().can_multi_conn();
    assert_eq!(conns.len(), if multi { 4 } else { 1 });
    // The pattern plugin: each 8-byte word holds its own offset, big-endian.
    for (i, mut c) in conns.into_iter().enumerate() {
        let off = i as u64 * 4 * MIB;
        let mut buf = vec![0u8; 4 * MIB as usize];
        c.read(off, &mut buf).unwrap();
        for (j, w) in buf.chunks_exact(8).enumerate() {
            let v = u64::from_be_bytes(w.try_into().unwrap());
            assert_eq!(v, off + 8 * j as u64);
        }
    }
}

#[test]
fn nbdkit_error_filter_gives_typed_eio() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k.sock");
    let server = start_nbdkit(
        &sock,
        &[
            "--filter=error",
            "memory",
            "1M",
            "error-pread=EIO",
            "error-pread-rate=100%",
        ],
    );
    let mut c = connect(&server.uri, &["base:allocation"], true);
    let mut buf = vec![0u8; 64 * 1024];
    let err = c.read(0x8000, &mut buf).unwrap_err();
    match &err {
        Error::Server { errno, offset, .. } => {
            assert_eq!(*errno, Errno::EIO);
            assert_eq!(*offset, 0x8000);
        }
        e => panic!("expected a server EIO, got {e:?}"),
    }
    assert!(err.to_string().contains("0x8000"), "{err}");
    // The connection stays usable after a clean server error.
    assert!(c.block_status_once("base:allocation", 0..4096).is_ok());
}

#[test]
fn server_killed_mid_transfer_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k.sock");
    let mut server = start_nbdkit(&sock, &["--filter=delay", "pattern", "256M", "rdelay=2"]);
    let mut c = connect(&server.uri, &["base:allocation"], true);
    let pid = server.pid() as i32;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: kill(2) on the pid of our own child process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let start = Instant::now();
    let mut buf = vec![0u8; 64 * MIB as usize];
    let err = c.read(0, &mut buf).unwrap_err();
    killer.join().unwrap();
    server.kill();
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "took {:?}",
        start.elapsed()
    );
    assert!(
        matches!(err, Error::Closed { .. } | Error::Io { .. }),
        "unexpected {err:?}"
    );
    // Further calls refuse instead of reading a desynchronised stream.
    assert!(matches!(
        c.read(0, &mut [0u8; 512]),
        Err(Error::Poisoned { .. })
    ));
}
