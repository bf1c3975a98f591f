//! `map` and `copy` over NBD against real servers (qemu-nbd, nbdkit), with
//! `qemu-img map`, `nbdinfo --map` and `qemu-img convert` as oracles; an
//! incremental backup cycle; and server faults.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use sparsekit_testkit::{Server, canonical_map, fixture, require, run};

fn bin(name: &str) -> &'static str {
    match name {
        "map" => env!("CARGO_BIN_EXE_map"),
        "copy" => env!("CARGO_BIN_EXE_copy"),
        _ => unreachable!(),
    }
}

fn sparsekit(tool: &str, args: &[&str]) -> Output {
    Command::new(bin(tool)).args(args).output().unwrap()
}

fn json(tool: &str, args: &[&str]) -> Value {
    let o = sparsekit(tool, args);
    assert!(
        o.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn qemu_nbd(dir: &Path, image: &Path, extra: &[&str]) -> Server {
    let sock = dir.join("qemu-nbd.sock");
    let mut args = vec![
        "-r",
        "-f",
        "qcow2",
        "--persistent",
        "--shared=16",
        "-k",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.push(image.to_str().unwrap());
    Server::start("qemu-nbd", &args, &sock)
}

fn nbdkit(dir: &Path, plugin_args: &[&str]) -> Server {
    let sock = dir.join("nbdkit.sock");
    let mut args = vec!["-f", "--exit-with-parent", "-U", sock.to_str().unwrap()];
    args.extend_from_slice(plugin_args);
    Server::start("nbdkit", &args, &sock)
}

fn qemu_img_map_uri(uri: &str) -> Value {
    serde_json::from_str(&run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", uri],
    ))
    .unwrap()
}

/// Copies `uri` with sparsekit and with qemu-img convert; the bytes must
/// be the same.
fn assert_copy_like_qemu(uri: &str, dir: &Path, args: &[&str]) {
    let theirs = dir.join("qemu.raw");
    let ours = dir.join("ours.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            theirs.to_str().unwrap(),
        ],
    );
    let mut a = args.to_vec();
    a.extend([uri, ours.to_str().unwrap()]);
    let o = sparsekit("copy", &a);
    assert!(
        o.status.success(),
        "copy {a:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
        "{uri} {args:?}: bytes differ"
    );
    std::fs::remove_file(ours).unwrap();
    std::fs::remove_file(theirs).unwrap();
}

#[test]
fn qemu_nbd_exports_map_and_copy_like_qemu_img() {
    for name in [
        "v3.qcow2",
        "zero-clusters.qcow2",
        "zlib.qcow2",
        "chain-top.qcow2",
        "extended-l2.qcow2",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = qemu_nbd(dir.path(), &fixture(name), &[]);
        let uri = server.uri();
        let ours = json("map", &["--json", &uri]);
        assert_eq!(
            canonical_map(&ours),
            canonical_map(&qemu_img_map_uri(&uri)),
            "{name}"
        );
        let ours = json(
            "map",
            &["--json", "--start", "1000000", "--length", "3000000", &uri],
        );
        let theirs: Value = serde_json::from_str(&run(
            "qemu-img",
            &[
                "map",
                "--output=json",
                "-f",
                "raw",
                "--start-offset",
                "1000000",
                "--max-length",
                "3000000",
                &uri,
            ],
        ))
        .unwrap();
        assert_eq!(canonical_map(&ours), canonical_map(&theirs), "{name} range");
        let base: Value =
            serde_json::from_str(&run("nbdinfo", &["--map", "--json", &uri])).unwrap();
        assert_eq!(
            json("map", &["--context", "base:allocation", "--json", &uri]),
            base,
            "{name}"
        );
        assert_copy_like_qemu(&uri, dir.path(), &[]);
        assert_copy_like_qemu(&uri, dir.path(), &["-j", "1", "--verify"]);
    }
}

#[test]
fn nbdkit_plugins_map_and_copy_like_qemu_img() {
    require("nbdkit");
    for plugin in [
        &["memory", "64M"][..],
        &["data", "data=1 2 3 @1048576 4 5 6 @33554432 7 @67108863 9"],
        &["sparse-random", "size=256M", "seed=7"],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = nbdkit(dir.path(), plugin);
        let uri = server.uri();
        let ours = json("map", &["--json", &uri]);
        assert_eq!(
            canonical_map(&ours),
            canonical_map(&qemu_img_map_uri(&uri)),
            "{plugin:?}"
        );
        let theirs: Value =
            serde_json::from_str(&run("nbdinfo", &["--map", "--json", &uri])).unwrap();
        assert_eq!(
            json("map", &["--context", "base:allocation", "--json", &uri]),
            theirs,
            "{plugin:?}"
        );
        assert_copy_like_qemu(&uri, dir.path(), &[]);
    }
}

#[test]
fn contexts_equal_nbdinfo() {
    require("nbdinfo");
    let img = fixture("bitmaps.qcow2");
    let dir = tempfile::tempdir().unwrap();
    let server = qemu_nbd(dir.path(), &img, &["-B", "b1", "-B", "b2", "-A"]);
    let uri = server.uri();
    for ctx in [
        "qemu:dirty-bitmap:b1",
        "qemu:dirty-bitmap:b2",
        "qemu:allocation-depth",
        "base:allocation",
    ] {
        let theirs: Value =
            serde_json::from_str(&run("nbdinfo", &[&format!("--map={ctx}"), "--json", &uri]))
                .unwrap();
        assert_eq!(
            json("map", &["--context", ctx, "--json", &uri]),
            theirs,
            "{ctx}"
        );
    }
    // --bitmap NAME on an NBD source is the dirty-bitmap context, and equals
    // the offline reading of the same image.
    assert_eq!(
        json("map", &["--bitmap", "b1", "--json", &uri]),
        json("map", &["--bitmap", "b1", "--json", img.to_str().unwrap()])
    );
    // A context the server does not offer is a clear error.
    let o = sparsekit("map", &["--context", "qemu:dirty-bitmap:nope", &uri]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `bytes_read` of `copy --json`'s result.
fn bytes_read(stdout: &[u8]) -> u64 {
    let v: Value = serde_json::from_slice(stdout).expect("copy --json's object");
    v["bytes_read"].as_u64().expect("bytes_read")
}

/// Full copy, guest writes recorded by a bitmap, incremental copy onto the
/// old copy: the result equals a fresh full copy, and only dirty data
/// crossed the wire.
#[test]
fn incremental_backup_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let vm = dir.path().join("vm.qcow2");
    let v = vm.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", v, "256M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 64M",
            "-c",
            "write -P 2 128M 8M",
            v,
        ],
    );
    let backup = dir.path().join("backup.raw");
    let b = backup.to_str().unwrap();
    {
        let server = qemu_nbd(dir.path(), &vm, &[]);
        let o = sparsekit("copy", &["--json", &server.uri(), b]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(bytes_read(&o.stdout), 72 << 20);
    }
    // The full copy as it stands before the incremental ones, for the
    // offline incremental copy below.
    let full = dir.path().join("full.raw");
    std::fs::copy(&backup, &full).unwrap();
    // The guest writes: data, zeroes, a discard, all recorded in inc1.
    run("qemu-img", &["bitmap", "--add", "--enable", v, "inc1"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 3 1M 64k",
            "-c",
            "write -P 4 200M 1M",
            "-c",
            "write -z 8M 2M",
            "-c",
            "discard 128M 4M",
            v,
        ],
    );
    let dirty_map = json("map", &["--bitmap", "inc1", "--json", v]);
    let dirty: u64 = dirty_map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == 1)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(dirty > 0 && dirty < 16 << 20, "{dirty} bytes dirty");

    let server = qemu_nbd(dir.path(), &vm, &["-B", "inc1"]);
    let o = sparsekit("copy", &["--json", "--bitmap", "inc1", &server.uri(), b]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = bytes_read(&o.stdout);
    assert!(
        read > 0 && read <= dirty,
        "read {read} bytes, {dirty} dirty"
    );

    let fresh = dir.path().join("fresh.raw");
    run(
        "qemu-img",
        &["convert", "-O", "raw", v, fresh.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&backup).unwrap() == std::fs::read(&fresh).unwrap(),
        "incremental result differs from a full copy"
    );

    // The same incremental copy read offline from the qcow2 bitmap, onto
    // the old full copy (which differs from the fresh one where dirty).
    let backup2 = dir.path().join("backup2.raw");
    std::fs::copy(&full, &backup2).unwrap();
    assert!(std::fs::read(&backup2).unwrap() != std::fs::read(&fresh).unwrap());
    let o = sparsekit(
        "copy",
        &["--json", "--bitmap", "inc1", v, backup2.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = bytes_read(&o.stdout);
    assert!(
        read > 0 && read <= dirty,
        "offline: read {read} bytes, {dirty} dirty"
    );
    assert!(
        std::fs::read(&backup2).unwrap() == std::fs::read(&fresh).unwrap(),
        "offline incremental result differs from a full copy"
    );

    // --bitmap needs an existing copy of the right size.
    let o = sparsekit(
        "copy",
        &[
            "--bitmap",
            "inc1",
            v,
            dir.path().join("missing.raw").to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--bitmap updates an existing copy"));
}

fn assert_fails_quickly(o: &Output, started: Instant, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn injected_read_errors_fail_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit(
        dir.path(),
        &[
            "--filter=error",
            "pattern",
            "size=64M",
            "error-pread-rate=100%",
            "error-pread=EIO",
        ],
    );
    let t = Instant::now();
    let o = sparsekit(
        "copy",
        &[&server.uri(), dir.path().join("out.raw").to_str().unwrap()],
    );
    assert_fails_quickly(&o, t, "Input/output error");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("stopped with everything before source offset")
    );
}

#[test]
fn server_killed_mid_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = nbdkit(
        dir.path(),
        &["--filter=delay", "pattern", "size=1G", "delay-read=20ms"],
    );
    let uri = server.uri();
    let out = dir.path().join("out.raw");
    let t = Instant::now();
    let child = Command::new(bin("copy"))
        .args(["-j", "2", &uri, out.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    server.kill();
    let o = child.wait_with_output().unwrap();
    // The copy was under way (not a failure to connect), and stopped
    // because the server went away; the partial DEST it created is gone.
    assert_fails_quickly(&o, t, "stopped with everything before source offset");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("{uri}: server closed the connection during")),
        "{err}"
    );
    assert!(err.contains("has been removed"), "{err}");
    assert!(!out.exists());
}

#[test]
fn unreachable_server_and_tls_uris() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!(
        "nbd+unix:///?socket={}",
        dir.path().join("none.sock").display()
    );
    let t = Instant::now();
    assert_fails_quickly(&sparsekit("map", &[&uri]), t, "none.sock");
    // TLS-PSK is refused when the URI is read: rustls cannot do it.
    assert_fails_quickly(
        &sparsekit("map", &["nbds://localhost/x?tls-psk-file=/k"]),
        t,
        "PSK",
    );
}

/// A server that stops answering: the copy gives up after --timeout, says
/// so, and exits 1 (no hang).
#[test]
fn stalled_server_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = nbdkit(
        dir.path(),
        &["--filter=delay", "pattern", "size=64M", "delay-read=120"],
    );
    let t = Instant::now();
    let o = sparsekit(
        "copy",
        &[
            "--timeout",
            "2",
            &server.uri(),
            dir.path().join("out.raw").to_str().unwrap(),
        ],
    );
    assert_fails_quickly(&o, t, "nbd");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no progress within 2s"), "{err}");
}

/// `nbdkit memory size=1T` with a little data written into it, and the
/// same behind the blocksize filter with minblock=4096 (which nbdkit 1.32
/// kills itself over when asked for 0xffffffff or 0xfffffe00 bytes of
/// block status): `map`, `map --context base:allocation` and `copy` work,
/// agree with qemu-img, and the server is still serving afterwards.
#[test]
fn one_tib_exports_and_the_blocksize_filter() {
    const TIB: u64 = 1 << 40;
    for filter in [&[][..], &["--filter=blocksize"][..]] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = filter.to_vec();
        args.extend(["memory", "size=1T"]);
        if !filter.is_empty() {
            args.push("minblock=4096");
        }
        let server = nbdkit(dir.path(), &args);
        let uri = server.uri();
        // Data at 1 GiB and at the very end, written by qemu-io over NBD.
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "write -q -P 5 1G 1M",
                "-c",
                "write -q -P 6 1099510579200 1M",
                &uri,
            ],
        );
        let what = format!("{filter:?}");
        let ours = json("map", &["--json", &uri]);
        assert_eq!(
            canonical_map(&ours),
            canonical_map(&qemu_img_map_uri(&uri)),
            "{what}"
        );
        let ctx = json("map", &["--context", "base:allocation", "--json", &uri]);
        let entries = ctx.as_array().unwrap();
        let sum: u64 = entries.iter().map(|e| e["length"].as_u64().unwrap()).sum();
        assert_eq!(sum, TIB, "{what}");
        let data: u64 = entries
            .iter()
            .filter(|e| e["type"].as_u64().unwrap() & 1 == 0)
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert!(
            (2 << 20..=64 << 20).contains(&data),
            "{what}: {data} bytes of data"
        );

        let out = dir.path().join("out.raw");
        let o = sparsekit("copy", &[&uri, out.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(std::fs::metadata(&out).unwrap().len(), TIB);
        let cmp = Command::new(require("qemu-img"))
            .args([
                "compare",
                "-q",
                "-f",
                "raw",
                "-F",
                "raw",
                &uri,
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            cmp.status.success(),
            "{what}: copy differs from the export: {cmp:?}"
        );
        assert!(
            std::fs::metadata(&out).unwrap().blocks() * 512 <= 16 << 20,
            "{what}: only the data is allocated"
        );
        // Still serving.
        let again = json("map", &["--json", &uri]);
        assert_eq!(again, ours, "{what}: the server is gone");
    }
}
