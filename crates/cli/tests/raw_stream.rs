//! Raw images read forward and written to standard output: every raw
//! fixture compressed by gzip, xz, zstd and bzip2 themselves and copied
//! from the file and from a pipe (byte-identical to the uncompressed copy,
//! holes where it has them), onto a loop device, raw bytes on standard
//! input, and `copy SRC - | copy - DEST` through real pipes from raw,
//! qcow2 and NBD sources.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use sparsekit_testkit::{LoopDevice, Server, fixture, qemu_img_map, require, run};

const COPY: &str = env!("CARGO_BIN_EXE_copy");
const MAP: &str = env!("CARGO_BIN_EXE_map");

/// The raw fixtures, but the 1 TiB one (a terabyte of zeros through a
/// decompressor is a test of patience, not of sparsekit).
const RAW: [&str; 9] = [
    "empty.raw",
    "all-hole.raw",
    "all-data.raw",
    "holes-data.raw",
    "zero-data.raw",
    "fallocated.raw",
    "unaligned.raw",
    "many-extents.raw",
    "chain-base.raw",
];

/// The compressors, as their tools name them, and the file suffix.
const TOOLS: [(&str, &str); 4] = [
    ("gzip", "gz"),
    ("xz", "xz"),
    ("zstd", "zst"),
    ("bzip2", "bz2"),
];

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn fails(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{needle}: {err}");
    assert!(err.contains(needle), "wanted {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn copy(args: &[&str], src: &Path, dst: &Path) -> Output {
    Command::new(COPY)
        .args(args)
        .arg(src)
        .arg(dst)
        .output()
        .unwrap()
}

/// `copy ARGS - DST` with `input` on standard input.
fn copy_stdin(args: &[&str], input: &Path, dst: &Path) -> Output {
    Command::new(COPY)
        .args(args)
        .arg("-")
        .arg(dst)
        .stdin(std::fs::File::open(input).unwrap())
        .output()
        .unwrap()
}

/// `TOOL -1 -c src > dst`, started (the four run side by side).
fn compress(tool: &str, src: &Path, dst: &Path) -> std::process::Child {
    Command::new(require(tool))
        .args(["-1", "-c"])
        .arg(src)
        .stdout(std::fs::File::create(dst).unwrap())
        .spawn()
        .unwrap()
}

/// The data map of a raw file as qemu-img sees it (SEEK_DATA): where the
/// holes are.
fn holes(path: &Path) -> serde_json::Value {
    qemu_img_map(path, "raw", &[])
}

#[test]
fn compressed_images_copy_as_their_raw_selves() {
    let dir = tempfile::tempdir().unwrap();
    for (i, name) in RAW.iter().enumerate() {
        let src = fixture(name);
        let plain = dir.path().join("plain.raw");
        ok(&copy(&[], &src, &plain), name);
        let want = std::fs::read(&src).unwrap();
        let children: Vec<_> = TOOLS
            .iter()
            .map(|(tool, ext)| {
                let z = dir.path().join(format!("{name}.{ext}"));
                (compress(tool, &src, &z), z, *tool)
            })
            .collect();
        for (j, (mut child, z, tool)) in children.into_iter().enumerate() {
            assert!(child.wait().unwrap().success(), "{tool} {name}");
            let what = format!("{name} by {tool}");
            // Every image from its file; from a pipe, each fixture through
            // one of the decoders in turn (the path after the decoder is
            // the same).
            let pipes = if j == i % TOOLS.len() {
                &[false, true][..]
            } else {
                &[false]
            };
            for &stdin in pipes {
                let out = dir.path().join("out.raw");
                let o = if stdin {
                    copy_stdin(&[], &z, &out)
                } else {
                    copy(&[], &z, &out)
                };
                ok(&o, &what);
                let got = std::fs::read(&out).unwrap();
                assert!(got == want, "{what} (stdin: {stdin}): bytes differ");
                assert_eq!(
                    holes(&out),
                    holes(&plain),
                    "{what} (stdin: {stdin}): not the holes of the plain copy"
                );
                std::fs::remove_file(&out).unwrap();
            }
            std::fs::remove_file(&z).unwrap();
        }
    }
}

#[test]
fn compressed_images_onto_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    std::fs::write(&backing, vec![0xa5u8; 80 << 20]).unwrap();
    let disk = LoopDevice::over(&backing);
    // Every raw fixture that fits on the 80 MiB device (many-extents.raw,
    // 983 MB, is copied into files above).
    for (i, name) in RAW.iter().enumerate() {
        let src = fixture(name);
        let want = std::fs::read(&src).unwrap();
        if want.len() > 80 << 20 {
            continue;
        }
        for (j, (tool, ext)) in TOOLS.iter().enumerate() {
            let z = dir.path().join(format!("img.{ext}"));
            assert!(compress(tool, &src, &z).wait().unwrap().success());
            let pipes = if j == i % TOOLS.len() {
                &[false, true][..]
            } else {
                &[false]
            };
            for &stdin in pipes {
                std::fs::write(&disk.dev, vec![0xa5u8; 80 << 20]).unwrap();
                let o = if stdin {
                    copy_stdin(&[], &z, &disk.dev)
                } else {
                    copy(&[], &z, &disk.dev)
                };
                let what = format!("{name} by {tool} (stdin: {stdin})");
                ok(&o, &what);
                let got = std::fs::read(&disk.dev).unwrap();
                // The zero blocks of the image were zeroed over the old bytes.
                assert!(got[..want.len()] == want[..], "{what}");
                assert!(
                    got[want.len()..].iter().all(|&b| b == 0xa5),
                    "{what}: bytes past the image must be left alone"
                );
            }
        }
    }
    // An image larger than the device stops at its end, and says so.
    let big = dir.path().join("big.raw");
    std::fs::write(&big, vec![1u8; 81 << 20]).unwrap();
    fails(
        &copy_stdin(&[], &big, &disk.dev),
        "goes on past 83886080 bytes, the room in the destination",
    );
}

/// `copy SRC - | copy ARGS - DST`, both real processes.
fn pipe(src: &str, args: &[&str], dst: &Path) -> (Output, Output) {
    let mut out = Command::new(COPY)
        .arg(src)
        .arg("-")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let into = Command::new(COPY)
        .args(args)
        .arg("-")
        .arg(dst)
        .stdin(Stdio::from(out.stdout.take().unwrap()))
        .output()
        .unwrap();
    (out.wait_with_output().unwrap(), into)
}

fn qemu_convert(src: &str, format: &str, out: &Path) -> Vec<u8> {
    let o = out.to_str().unwrap();
    run("qemu-img", &["convert", "-f", format, "-O", "raw", src, o]);
    std::fs::read(out).unwrap()
}

#[test]
fn raw_streams_round_trip_through_pipes() {
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("dst.raw");
    let theirs = dir.path().join("theirs.raw");
    for name in [
        "holes-data.raw",
        "unaligned.raw",
        "empty.raw",
        "fallocated.raw",
    ] {
        let src = fixture(name);
        let (o, i) = pipe(src.to_str().unwrap(), &[], &dst);
        ok(&o, name);
        ok(&i, name);
        assert!(
            std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap(),
            "{name}"
        );
        assert_eq!(holes(&dst), holes(&src), "{name}: holes");
    }
    for name in [
        "chain-top.qcow2",
        "zero-clusters.qcow2",
        "zlib.qcow2",
        "unaligned.qcow2",
    ] {
        let src = fixture(name);
        let src = src.to_str().unwrap();
        let (o, i) = pipe(src, &[], &dst);
        ok(&o, name);
        ok(&i, name);
        let want = qemu_convert(src, "qcow2", &theirs);
        assert!(want == std::fs::read(&dst).unwrap(), "{name}");
    }
    // From an NBD export: qemu-nbd serving a qcow2 chain.
    let sock = dir.path().join("nbd.sock");
    let image = fixture("chain-top.qcow2");
    let args = [
        "-r",
        "-f",
        "qcow2",
        "--persistent",
        "-k",
        sock.to_str().unwrap(),
        image.to_str().unwrap(),
    ];
    let _server = Server::start("qemu-nbd", &args, &sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let (o, i) = pipe(&uri, &[], &dst);
    ok(&o, "nbd");
    ok(&i, "nbd");
    let want = qemu_convert(image.to_str().unwrap(), "qcow2", &theirs);
    assert!(want == std::fs::read(&dst).unwrap(), "from NBD");

    // A qcow2 stream compressed on its way is still a qcow2 stream.
    let stream = dir.path().join("s.qcow2");
    let o = Command::new(COPY)
        .args(["-O", "qcow2"])
        .arg(fixture("chain-top.qcow2"))
        .arg(&stream)
        .output()
        .unwrap();
    ok(&o, "export");
    let zst = dir.path().join("s.qcow2.zst");
    assert!(compress("zstd", &stream, &zst).wait().unwrap().success());
    ok(
        &copy_stdin(&[], &zst, &dst),
        "a zstd-compressed qcow2 stream",
    );
    assert!(
        want == std::fs::read(&dst).unwrap(),
        "compressed qcow2 stream"
    );

    // Standard output as cmp reads it: the whole image, holes as zeros.
    let src = fixture("holes-data.raw");
    let o = Command::new(COPY)
        .arg(&src)
        .arg("-")
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    ok(&o, "to stdout");
    assert!(o.stdout == std::fs::read(&src).unwrap());
    // --skip and --length pick the bytes written out.
    let o = Command::new(COPY)
        .args(["--skip", "1000", "--length", "70000"])
        .arg(&src)
        .arg("-")
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    ok(&o, "a range to stdout");
    assert!(o.stdout[..] == std::fs::read(&src).unwrap()[1000..71000]);
}

#[test]
fn raw_stream_sizes_and_damage_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("holes-data.raw");
    let len = std::fs::metadata(&src).unwrap().len();
    let dst = dir.path().join("d.raw");
    // The size, given ahead, is what the stream must be.
    ok(
        &copy_stdin(&["--size", &len.to_string()], &src, &dst),
        "--size",
    );
    assert!(std::fs::read(&dst).unwrap() == std::fs::read(&src).unwrap());
    std::fs::remove_file(&dst).unwrap();
    fails(
        &copy_stdin(&["--size", &(len + 4096).to_string()], &src, &dst),
        &format!("ended after {len} bytes, but it was to be {}", len + 4096),
    );
    assert!(!dst.exists(), "a cut-short copy was left behind");
    fails(
        &copy_stdin(&["--size", &(len - 4096).to_string()], &src, &dst),
        "the size it was given",
    );
    assert!(!dst.exists());

    // A truncated xz image: the decoder's error, where in the image.
    let z = dir.path().join("img.xz");
    assert!(compress("xz", &src, &z).wait().unwrap().success());
    let bytes = std::fs::read(&z).unwrap();
    let cut = dir.path().join("cut.xz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = copy(&[], &cut, &dst);
    fails(&o, "cut.xz: reading xz data at image offset 0x");
    assert!(!dst.exists(), "a partial copy was left behind");
    fails(
        &copy_stdin(&[], &cut, &dst),
        "standard input: reading xz data",
    );

    // -f raw takes the compressed bytes as they are; map has nothing to map.
    ok(&copy(&["-f", "raw"], &z, &dst), "-f raw");
    assert!(std::fs::read(&dst).unwrap() == bytes);
    let o = Command::new(MAP).arg(&z).output().unwrap();
    fails(&o, "can only be read forward");
    // Options that need random access are refused before anything is made.
    for args in [
        &["--skip", "4096"][..],
        &["--verify"],
        &["-O", "qcow2"],
        &["--size", "1M"],
    ] {
        let target = dir.path().join("never.raw");
        let source = if args[0] == "--size" { &src } else { &z };
        let o = copy(args, source, &target);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(!target.exists(), "{args:?}");
    }
}
