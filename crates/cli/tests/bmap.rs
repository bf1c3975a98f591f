//! bmap files against bmaptool 3.x both ways: `map --bmap` equals `bmaptool
//! create` byte for byte, `bmaptool copy` takes our bmaps and `copy
//! --bmap` takes theirs (files, compressed images, standard input, a loop
//! device), formats 1.x with SHA-1, and damaged bmaps and images refused.

use std::path::Path;
use std::process::{Command, Output};

use sparsekit_bmap::{ChecksumType, Hasher};
use sparsekit_testkit::{LoopDevice, Server, fixture, require, run};

const COPY: &str = env!("CARGO_BIN_EXE_copy");
const MAP: &str = env!("CARGO_BIN_EXE_map");

/// Raw fixtures with data (bmaptool cannot describe an empty image).
const RAW: [&str; 8] = [
    "all-hole.raw",
    "all-data.raw",
    "holes-data.raw",
    "zero-data.raw",
    "fallocated.raw",
    "unaligned.raw",
    "many-extents.raw",
    "chain-base.raw",
];

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn fails(o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{needles:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "wanted {n:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

fn map_bmap(src: &str) -> Vec<u8> {
    let o = Command::new(MAP).args(["--bmap", src]).output().unwrap();
    ok(&o, src);
    o.stdout
}

fn bmaptool_create(src: &Path, out: &Path) -> Vec<u8> {
    let o = Command::new(require("bmaptool"))
        .arg("create")
        .arg(src)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap();
    ok(&o, "bmaptool create");
    std::fs::read(out).unwrap()
}

fn bmaptool_copy(bmap: &Path, src: &Path, dst: &Path) -> Output {
    Command::new(require("bmaptool"))
        .args(["copy", "--bmap"])
        .arg(bmap)
        .arg(src)
        .arg(dst)
        .output()
        .unwrap()
}

fn copy(args: &[&str], bmap: &Path, src: &Path, dst: &Path) -> Output {
    Command::new(COPY)
        .args(args)
        .arg("--bmap")
        .arg(bmap)
        .arg(src)
        .arg(dst)
        .output()
        .unwrap()
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn map_bmap_is_bmaptool_create_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs.bmap");
    for name in RAW {
        let src = fixture(name);
        let want = bmaptool_create(&src, &theirs);
        let got = map_bmap(src.to_str().unwrap());
        assert!(
            got == want,
            "{name}:\n--- ours\n{}\n--- bmaptool\n{}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want)
        );
    }
    // The same image served by qemu-nbd maps to the same bmap.
    let sock = dir.path().join("nbd.sock");
    let src = fixture("holes-data.raw");
    let args = [
        "-r",
        "-f",
        "raw",
        "--persistent",
        "-k",
        sock.to_str().unwrap(),
        src.to_str().unwrap(),
    ];
    let _server = Server::start("qemu-nbd", &args, &sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    assert!(map_bmap(&uri) == bmaptool_create(&src, &theirs), "over NBD");
}

#[test]
fn each_tool_copies_with_the_other_s_bmap() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (dir.path().join("ours.bmap"), dir.path().join("theirs.bmap"));
    let (d1, d2) = (dir.path().join("d1.raw"), dir.path().join("d2.raw"));
    for name in RAW {
        let src = fixture(name);
        std::fs::write(&ours, map_bmap(src.to_str().unwrap())).unwrap();
        bmaptool_create(&src, &theirs);
        ok(&bmaptool_copy(&ours, &src, &d1), name);
        assert!(same(&d1, &src), "{name}: bmaptool copy with our bmap");
        ok(&copy(&[], &theirs, &src, &d2), name);
        assert!(same(&d2, &src), "{name}: copy with bmaptool's bmap");
        for d in [&d1, &d2] {
            std::fs::remove_file(d).unwrap();
        }
    }

    // A qcow2 image's bmap: bmaptool copies its raw form with it, and copy
    // the image itself.
    let image = fixture("chain-top.qcow2");
    let raw = dir.path().join("chain.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::write(&ours, map_bmap(image.to_str().unwrap())).unwrap();
    ok(&bmaptool_copy(&ours, &raw, &d1), "qcow2 bmap");
    assert!(same(&d1, &raw));
    ok(&copy(&[], &ours, &image, &d2), "qcow2 with its bmap");
    assert!(same(&d2, &raw));

    // Compressed, from a file and from standard input, with bmaptool's bmap.
    let src = fixture("holes-data.raw");
    bmaptool_create(&src, &theirs);
    let xz = dir.path().join("img.xz");
    let o = Command::new(require("xz"))
        .args(["-1", "-c"])
        .arg(&src)
        .stdout(std::fs::File::create(&xz).unwrap())
        .status()
        .unwrap();
    assert!(o.success());
    for d in [&d1, &d2] {
        let _ = std::fs::remove_file(d);
    }
    ok(&copy(&[], &theirs, &xz, &d1), "xz with a bmap");
    assert!(same(&d1, &src));
    let o = Command::new(COPY)
        .arg("--bmap")
        .arg(&theirs)
        .args(["-", d2.to_str().unwrap()])
        .stdin(std::fs::File::open(&xz).unwrap())
        .output()
        .unwrap();
    ok(&o, "xz on stdin with a bmap");
    assert!(same(&d2, &src));
}

#[test]
fn onto_a_device_only_the_listed_blocks_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    std::fs::write(&backing, vec![0xa5u8; 80 << 20]).unwrap();
    let disk = LoopDevice::over(&backing);
    let dev = disk.dev.clone();
    let src = fixture("holes-data.raw");
    let bmap = dir.path().join("theirs.bmap");
    bmaptool_create(&src, &bmap);
    let image = std::fs::read(&src).unwrap();
    // Where bmaptool writes, and so must we: the listed blocks.
    let listed: Vec<std::ops::Range<usize>> =
        sparsekit_bmap::Bmap::parse(&std::fs::read(&bmap).unwrap(), "b")
            .unwrap()
            .byte_ranges()
            .map(|(r, _)| r.start as usize..r.end as usize)
            .collect();
    let xz = dir.path().join("img.xz");
    let z = Command::new(require("xz"))
        .args(["-1", "-c"])
        .arg(&src)
        .output()
        .unwrap();
    std::fs::write(&xz, z.stdout).unwrap();
    for from in [&src, &xz] {
        std::fs::write(&dev, vec![0xa5u8; 80 << 20]).unwrap();
        ok(&copy(&[], &bmap, from, &dev), "onto the device");
        let got = std::fs::read(&dev).unwrap();
        let mut at = 0;
        for r in &listed {
            assert!(
                got[at..r.start].iter().all(|&b| b == 0xa5),
                "{from:?}: an unlisted block at {at:#x} was written"
            );
            assert!(
                got[r.clone()] == image[r.clone()],
                "{from:?}: listed range {r:?}"
            );
            at = r.end;
        }
        assert!(got[at..].iter().all(|&b| b == 0xa5));
    }
}

/// `text` with the value of `<element>` replaced by the checksum of the
/// text with zeros there, as bmaptool seals a bmap.
fn reseal(text: &str, element: &str, kind: ChecksumType) -> String {
    let open = format!("<{element}>");
    let start = text.find(&open).unwrap() + open.len();
    let value_start = start + text[start..].find(|c: char| c != ' ').unwrap();
    let zeros = "0".repeat(kind.hex_len());
    let zeroed = format!(
        "{}{zeros}{}",
        &text[..value_start],
        &text[value_start + kind.hex_len()..]
    );
    let d = Hasher::digest(kind, zeroed.as_bytes()).to_hex();
    zeroed.replacen(&zeros, &d, 1)
}

#[test]
fn damaged_bmaps_and_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("holes-data.raw");
    let good = String::from_utf8(bmaptool_create(&src, &dir.path().join("b"))).unwrap();
    let bmap = dir.path().join("bad.bmap");
    let dst = dir.path().join("dst.raw");
    let refused = |text: &str, source: &Path, needles: &[&str]| {
        std::fs::write(&bmap, text).unwrap();
        fails(&copy(&[], &bmap, source, &dst), needles);
        assert!(!dst.exists(), "{needles:?}: DEST was left behind");
    };
    // A range's checksum changed, the file resealed: found as it is copied.
    let at = good.find("chksum=\"").unwrap() + 8;
    let flipped = if &good[at..at + 1] == "0" { "1" } else { "0" };
    let text = format!("{}{flipped}{}", &good[..at], &good[at + 1..]);
    let text = reseal(&text, "BmapFileChecksum", ChecksumType::Sha256);
    refused(
        &text,
        &src,
        &[
            "bad.bmap: bytes 0x",
            "of the image do not match the bmap",
            "checksum mismatch for blocks range",
        ],
    );
    // The file's own checksum wrong.
    let text = format!("{}{flipped}{}", &good[..at], &good[at + 1..]);
    refused(&text, &src, &["bad.bmap", "BmapFileChecksum is"]);
    // A range past the image.
    let last = good.rfind("</Range>").unwrap();
    let start = good[..last].rfind('>').unwrap() + 1;
    let text = format!("{} 16380-16390 {}", &good[..start], &good[last..]);
    let text = reseal(&text, "BmapFileChecksum", ChecksumType::Sha256);
    refused(&text, &src, &["bad.bmap: line", "ends past BlocksCount"]);
    // Another image's bmap.
    refused(
        &good,
        &fixture("all-data.raw"),
        &["bad.bmap: not the bmap of", "ImageSize"],
    );
    // The image changed after its bmap was made: the range that changed is
    // named, from a file and from a pipe.
    let changed = dir.path().join("changed.raw");
    let mut bytes = std::fs::read(&src).unwrap();
    let (r, _) = sparsekit_bmap::Bmap::parse(good.as_bytes(), "b")
        .unwrap()
        .byte_ranges()
        .nth(1)
        .unwrap();
    bytes[r.start as usize + 5] ^= 0xff;
    std::fs::write(&changed, &bytes).unwrap();
    let name = format!("bytes {:#x}..{:#x} of the image", r.start, r.end);
    refused(&good, &changed, &[&name]);
    std::fs::write(&bmap, &good).unwrap();
    let o = Command::new(COPY)
        .arg("--bmap")
        .arg(&bmap)
        .args(["-", dst.to_str().unwrap()])
        .stdin(std::fs::File::open(&changed).unwrap())
        .output()
        .unwrap();
    fails(&o, &[&name]);
    assert!(!dst.exists());
}

#[test]
fn formats_1_x_and_sha1_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("holes-data.raw");
    let v2 = String::from_utf8(bmaptool_create(&src, &dir.path().join("b"))).unwrap();
    let parsed = sparsekit_bmap::Bmap::parse(v2.as_bytes(), "b").unwrap();
    let image = std::fs::read(&src).unwrap();
    // Format 1.3: SHA-1 in `sha1` attributes, the file's in <BmapFileSHA1>.
    let mut ranges = String::new();
    for (r, b) in parsed.byte_ranges() {
        let d = Hasher::digest(ChecksumType::Sha1, &image[r.start as usize..r.end as usize]);
        let span = if b.first == b.last {
            b.first.to_string()
        } else {
            format!("{}-{}", b.first, b.last)
        };
        ranges.push_str(&format!("        <Range sha1=\"{d}\"> {span} </Range>\n"));
    }
    let head = format!(
        "<?xml version=\"1.0\" ?>\n<bmap version=\"1.3\">\n    <ImageSize> {} </ImageSize>\n    \
         <BlockSize> 4096 </BlockSize>\n    <BlocksCount> {} </BlocksCount>\n    \
         <MappedBlocksCount> {} </MappedBlocksCount>\n    <BmapFileSHA1> {} </BmapFileSHA1>\n",
        parsed.image_size(),
        parsed.blocks_count(),
        parsed.mapped_blocks_count(),
        "0".repeat(40)
    );
    let v13 = reseal(
        &format!("{head}    <BlockMap>\n{ranges}    </BlockMap>\n</bmap>\n"),
        "BmapFileSHA1",
        ChecksumType::Sha1,
    );
    // Format 1.2: no checksums at all.
    let v12 = format!(
        "{}    <BlockMap>\n{}    </BlockMap>\n</bmap>\n",
        head.replace("1.3", "1.2")
            .lines()
            .filter(|l| !l.contains("BmapFileSHA1"))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n",
        ranges
            .lines()
            .map(|l| format!(
                "{}\n",
                l.split('"')
                    .enumerate()
                    .filter(|(i, _)| *i != 1)
                    .map(|(_, s)| s)
                    .collect::<String>()
                    .replace("<Range sha1=>", "<Range>")
            ))
            .collect::<String>()
    );
    let bmap = dir.path().join("old.bmap");
    let (d1, d2) = (dir.path().join("d1.raw"), dir.path().join("d2.raw"));
    for (version, text) in [("1.3", &v13), ("1.2", &v12)] {
        std::fs::write(&bmap, text).unwrap();
        // bmaptool takes the hand-made file: it is a real 1.x bmap.
        ok(&bmaptool_copy(&bmap, &src, &d1), version);
        ok(&copy(&[], &bmap, &src, &d2), version);
        assert!(same(&d2, &src), "{version}");
        std::fs::remove_file(&d1).unwrap();
        std::fs::remove_file(&d2).unwrap();
    }
    // A changed byte is caught by SHA-1 as well.
    let changed = dir.path().join("changed.raw");
    let mut bytes = image.clone();
    let (r, _) = parsed.byte_ranges().next().unwrap();
    bytes[r.start as usize] ^= 1;
    std::fs::write(&changed, &bytes).unwrap();
    std::fs::write(&bmap, &v13).unwrap();
    fails(
        &copy(&[], &bmap, &changed, &d2),
        &["old.bmap: bytes 0x", "do not match"],
    );
}
