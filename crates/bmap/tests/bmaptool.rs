//! Against the real bmaptool (Debian package bmap-tools): bmaps of sparse
//! files made in a temp dir, by `bmaptool create` and by this crate, must
//! be the same bytes; each side must read the other's; `bmaptool copy`
//! must accept hand-made 1.x files and refuse what this crate refuses
//! where bmaptool refuses it too.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sparsekit_bmap::{BlockRange, Bmap, BmapErrorKind, ChecksumType, Creator, Hasher};
use sparsekit_extent::Kind;
use sparsekit_fiemap::Mapper;
use sparsekit_testkit::{Rng, require};

const MIB: u64 = 1 << 20;

fn bmaptool() -> PathBuf {
    require("bmaptool")
}

/// The interpreter bmaptool runs on (its `#!` line), which is the one that
/// has the `bmaptools` module.
fn bmaptool_python() -> PathBuf {
    let mut first = String::new();
    BufReader::new(File::open(bmaptool()).unwrap())
        .read_line(&mut first)
        .unwrap();
    let interp = first
        .strip_prefix("#!")
        .expect("bmaptool is a script")
        .trim();
    PathBuf::from(interp.split_whitespace().next().unwrap())
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `bmaptool create [args] -o OUT image`, read back from OUT.
fn bmaptool_create(image: &Path, args: &[&str]) -> Vec<u8> {
    let out = image.with_extension("theirs.bmap");
    run(Command::new(bmaptool())
        .arg("create")
        .args(args)
        .arg("-o")
        .arg(&out)
        .arg(image));
    fs::read(&out).unwrap()
}

/// `bmaptool copy --bmap BMAP image dest`; the output, successful or not.
fn bmaptool_copy(bmap_text: &[u8], image: &Path) -> (Output, PathBuf) {
    let bmap = image.with_extension("copy.bmap");
    fs::write(&bmap, bmap_text).unwrap();
    let dest = image.with_extension("copy");
    let out = Command::new(bmaptool())
        .arg("copy")
        .arg("--bmap")
        .arg(&bmap)
        .arg(image)
        .arg(&dest)
        .output()
        .unwrap();
    (out, dest)
}

fn assert_copy_accepted(bmap_text: &[u8], image: &Path) {
    let (out, dest) = bmaptool_copy(bmap_text, image);
    assert!(
        out.status.success(),
        "bmaptool copy refused the bmap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read(&dest).unwrap(),
        fs::read(image).unwrap(),
        "the copy differs"
    );
}

/// `bmaptool copy` fails, saying `reason`.
fn assert_copy_refused(bmap_text: &[u8], image: &Path, reason: &str) {
    let (out, _) = bmaptool_copy(bmap_text, image);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bmaptool copy accepted the bmap");
    assert!(stderr.contains(reason), "bmaptool copy: {stderr}");
}

/// The extents bmaptool lists: all that FIEMAP reports, data or unwritten.
fn allocated(image: &Path) -> (u64, Vec<std::ops::Range<u64>>) {
    let map = Mapper::open(image).unwrap();
    let extents = map
        .extents(0..map.size())
        .filter_map(|e| {
            let e = e.unwrap();
            (e.kind != Kind::Hole).then(|| e.range())
        })
        .collect();
    (map.size(), extents)
}

fn reader(image: &Path) -> impl Fn(&mut [u8], u64) -> std::io::Result<()> + Sync {
    let f = File::open(image).unwrap();
    move |buf, offset| f.read_exact_at(buf, offset)
}

/// This crate's bmap of `image`, made from its FIEMAP extents.
fn ours(image: &Path, kind: ChecksumType) -> Bmap {
    let (size, extents) = allocated(image);
    Creator::new(size, extents)
        .unwrap()
        .with_checksum_type(kind)
        .hash(reader(image))
        .unwrap()
}

/// This crate's bmap of `image` made from the byte ranges written into it,
/// unaligned and unmerged: the blocks they touch are the blocks ext4
/// allocates for them, so this must be bmaptool's bmap too.
fn ours_from_writes(image: &Path, writes: &[(u64, u64)]) -> Bmap {
    let size = fs::metadata(image).unwrap().len();
    let mut extents: Vec<_> = writes.iter().map(|&(o, l)| o..o + l).collect();
    extents.sort_by_key(|e| e.start);
    Creator::new(size, extents)
        .unwrap()
        .hash(reader(image))
        .unwrap()
}

/// A sparse file of `size` bytes with random bytes written at `writes`.
fn sparse(dir: &Path, name: &str, size: u64, writes: &[(u64, u64)], seed: u64) -> PathBuf {
    let path = dir.join(name);
    let f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng(seed);
    for &(offset, len) in writes {
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        f.write_all_at(&data, offset).unwrap();
    }
    f.sync_all().unwrap();
    path
}

/// Shows the first differing line of two bmap texts.
fn assert_same_text(ours: &[u8], theirs: &[u8], what: &str) {
    if ours != theirs {
        let (a, b) = (
            String::from_utf8_lossy(ours),
            String::from_utf8_lossy(theirs),
        );
        let at = a.lines().zip(b.lines()).position(|(x, y)| x != y);
        panic!(
            "{what}: our bmap differs from bmaptool's at line {:?}\n--- ours\n{a}\n--- bmaptool\n{b}",
            at.map(|i| i + 1)
        );
    }
}

/// Every check of one image: bmaptool's bmap parses to exactly ours, its
/// ranges are the blocks the file's extents touch, the checksums are those
/// of the file's bytes, our text is bmaptool's, and bmaptool copies with
/// ours.
fn check_image(image: &Path) {
    let theirs_text = bmaptool_create(image, &[]);
    let theirs = Bmap::parse(&theirs_text, "bmaptool.bmap").unwrap();
    let our = ours(image, ChecksumType::Sha256);
    assert_eq!(our, theirs, "{}", image.display());

    // The ranges, block by block, against the file's allocated extents.
    let (size, extents) = allocated(image);
    assert_eq!(theirs.image_size(), size);
    let mut ranges = theirs.ranges().iter().peekable();
    for block in 0..theirs.blocks_count() {
        let (lo, hi) = (block * 4096, (block + 1) * 4096);
        let touched = extents.iter().any(|e| e.start < hi && lo < e.end);
        while ranges.next_if(|r| r.last < block).is_some() {}
        let listed = ranges.peek().is_some_and(|r| r.first <= block);
        assert_eq!(listed, touched, "block {block} of {}", image.display());
    }
    let f = File::open(image).unwrap();
    for (bytes, r) in theirs.byte_ranges() {
        let mut buf = vec![0; (bytes.end - bytes.start) as usize];
        f.read_exact_at(&mut buf, bytes.start).unwrap();
        r.verify(&Hasher::digest(ChecksumType::Sha256, &buf))
            .unwrap();
    }
    let text = our.to_xml();
    assert_same_text(text.as_bytes(), &theirs_text, &image.display().to_string());
    assert_copy_accepted(text.as_bytes(), image);
}

#[test]
fn holes_data_and_a_partial_last_block() {
    let dir = tempfile::tempdir().unwrap();
    let size = 10 * MIB + 1234;
    // Unaligned writes: two in neighbouring blocks, two sharing a block.
    let writes = [
        (0, 4096),
        (MIB, MIB / 2),
        (5 * MIB + 100, 100),
        (5 * MIB + 4096 + 50, 200),
        (7 * MIB + 10, 10),
        (7 * MIB + 30, 4096),
        (size - 10, 10),
    ];
    let image = sparse(dir.path(), "mixed.img", size, &writes, 1);
    check_image(&image);
    let b = ours_from_writes(&image, &writes);
    let spans: Vec<_> = b.ranges().iter().map(|r| (r.first, r.last)).collect();
    assert_eq!(
        spans,
        [(0, 0), (256, 383), (1280, 1281), (1792, 1793), (2560, 2560)]
    );
    assert_same_text(
        b.to_xml().as_bytes(),
        &bmaptool_create(&image, &[]),
        "from writes",
    );
    // The last range is the partial block, hashed up to ImageSize.
    let (bytes, _) = b.byte_ranges().last().unwrap();
    assert_eq!(bytes, 10 * MIB..size);
}

#[test]
fn a_file_with_no_data() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "empty.img", 3 * MIB + 5, &[], 2);
    check_image(&image);
    let b = ours(&image, ChecksumType::Sha256);
    assert!(b.ranges().is_empty());
    assert_eq!(b.mapped_bytes(), 0);
}

#[test]
fn a_fully_allocated_file() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * MIB + 5;
    let image = sparse(dir.path(), "full.img", size, &[(0, size)], 3);
    check_image(&image);
    let b = ours(&image, ChecksumType::Sha256);
    assert_eq!(b.mapped_blocks_count(), b.blocks_count());
    assert_eq!(b.mapped_bytes(), size);
}

#[test]
fn a_one_byte_image_whose_mapped_size_runs_over_the_comment() {
    // "4.0 KiB or 100.0%" is longer than the blanks left for "1 byte".
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "one.img", 1, &[(0, 1)], 4);
    check_image(&image);
}

#[test]
fn unwritten_extents_are_listed_as_bmaptool_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "falloc.img", 8 * MIB, &[(6 * MIB, 4096)], 5);
    run(Command::new(require("fallocate"))
        .args(["-o", "1048576", "-l", "2097152"])
        .arg(&image));
    let (_, extents) = allocated(&image);
    assert!(extents.contains(&(MIB..3 * MIB)), "{extents:?}");
    check_image(&image);
}

#[test]
fn a_run_longer_than_an_ext4_extent() {
    // ext4 extents hold at most 128 MiB: FIEMAP reports neighbours that
    // bmaptool merges into one range.
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(
        dir.path(),
        "long.img",
        200 * MIB,
        &[(8 * MIB, 140 * MIB)],
        6,
    );
    check_image(&image);
    let b = ours(&image, ChecksumType::Sha256);
    assert_eq!(b.ranges().len(), 1);
}

#[test]
fn random_layouts() {
    let dir = tempfile::tempdir().unwrap();
    for seed in 0..6u64 {
        let mut rng = Rng(seed * 7919 + 11);
        let size = 1 + rng.below(24 * MIB);
        let mut writes = Vec::new();
        for _ in 0..rng.below(40) {
            let offset = rng.below(size);
            let max = if rng.chance(20) { 2 * MIB } else { 20_000 };
            let len = 1 + rng.below(max);
            writes.push((offset, len.min(size - offset)));
        }
        let image = sparse(
            dir.path(),
            &format!("random{seed}.img"),
            size,
            &writes,
            seed,
        );
        check_image(&image);
        let theirs = Bmap::parse(&bmaptool_create(&image, &[]), "x").unwrap();
        assert_eq!(ours_from_writes(&image, &writes), theirs, "seed {seed}");
    }
}

#[test]
fn sha1_and_no_checksum_bmaps_match_bmaptool_too() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(
        dir.path(),
        "sha1.img",
        5 * MIB + 3,
        &[(4096, 10_000), (3 * MIB, MIB)],
        7,
    );
    // The CLI always asks for sha256; BmapCreate itself takes any hashlib
    // name.
    let theirs = dir.path().join("sha1.bmap");
    run(Command::new(bmaptool_python())
        .arg("-c")
        .arg(
            "import sys; from bmaptools.BmapCreate import BmapCreate; \
             BmapCreate(sys.argv[1], sys.argv[2], 'sha1').generate()",
        )
        .arg(&image)
        .arg(&theirs));
    let our = ours(&image, ChecksumType::Sha1);
    assert_same_text(our.to_xml().as_bytes(), &fs::read(&theirs).unwrap(), "sha1");
    assert_copy_accepted(our.to_xml().as_bytes(), &image);

    let theirs = bmaptool_create(&image, &["--no-checksum"]);
    let (size, extents) = allocated(&image);
    let our = Creator::new(size, extents).unwrap().without_checksums();
    assert_same_text(our.to_xml().as_bytes(), &theirs, "--no-checksum");
    assert_eq!(Bmap::parse(&theirs, "x").unwrap(), our);
}

/// An image of 6 blocks with data in block 1 and in blocks 3 to 5, the
/// last one partial.
fn small_image(dir: &Path) -> PathBuf {
    sparse(
        dir,
        "small.img",
        5 * 4096 + 100,
        &[(4096, 4096), (3 * 4096 + 7, 2 * 4096 + 50)],
        8,
    )
}

/// The checksum of blocks `first..=last` of `image` (clipped to its end).
fn range_digest(image: &Path, kind: ChecksumType, first: u64, last: u64) -> String {
    let size = fs::metadata(image).unwrap().len();
    let r = BlockRange {
        first,
        last,
        checksum: None,
    };
    let bytes = r.bytes(size, 4096);
    let mut buf = vec![0; (bytes.end - bytes.start) as usize];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut buf, bytes.start)
        .unwrap();
    Hasher::digest(kind, &buf).to_hex()
}

/// A hand-made bmap of [`small_image`] in format `version`, following
/// BmapCopy.py's reading of it: `<ChecksumType>`, `<BmapFileChecksum>` and
/// `chksum` from 1.4 on, `<BmapFileSHA1>` and `sha1` in 1.3, no checksums
/// before. Deliberately not in bmaptool's layout.
fn hand_made(image: &Path, version: &str) -> String {
    let (kind, file_el, attr, typ) = match version {
        "1.3" => (Some(ChecksumType::Sha1), "BmapFileSHA1", "sha1", ""),
        "1.4" | "2.0" => (
            Some(ChecksumType::Sha256),
            "BmapFileChecksum",
            "chksum",
            "<ChecksumType>sha256</ChecksumType>\n",
        ),
        _ => (None, "", "", ""),
    };
    let range = |first, last, text: &str| match kind {
        Some(k) => format!(
            "<Range {attr}=\"{}\">{text}</Range>\n",
            range_digest(image, k, first, last)
        ),
        None => format!("<Range>{text}</Range>\n"),
    };
    let zeros = kind.map(|k| "0".repeat(k.hex_len())).unwrap_or_default();
    let file_sum = kind
        .map(|_| format!("<{file_el}>{zeros}</{file_el}>\n"))
        .unwrap_or_default();
    let text = format!(
        "<?xml version=\"1.0\"?>\n<bmap version=\"{version}\">\n\
         <ImageSize>20580</ImageSize>\n<BlockSize>4096</BlockSize>\n\
         <BlocksCount>6</BlocksCount>\n<MappedBlocksCount>4</MappedBlocksCount>\n\
         {typ}{file_sum}<BlockMap>\n{}{}</BlockMap>\n</bmap>\n",
        range(1, 1, "1"),
        range(3, 5, " 3 - 5 "),
    );
    match kind {
        Some(k) => {
            let d = Hasher::digest(k, text.as_bytes()).to_hex();
            text.replacen(&zeros, &d, 1)
        }
        None => text,
    }
}

#[test]
fn hand_made_1_x_files_are_read_by_both() {
    let dir = tempfile::tempdir().unwrap();
    let image = small_image(dir.path());
    for (version, kind) in [
        ("1.2", None),
        ("1.3", Some(ChecksumType::Sha1)),
        ("1.4", Some(ChecksumType::Sha256)),
        ("2.0", Some(ChecksumType::Sha256)),
    ] {
        let text = hand_made(&image, version);
        assert_copy_accepted(text.as_bytes(), &image);
        let b = Bmap::parse(text.as_bytes(), version).unwrap();
        assert_eq!(b.version().to_string(), version);
        assert_eq!(b.checksum_type(), kind);
        let spans: Vec<_> = b.ranges().iter().map(|r| (r.first, r.last)).collect();
        assert_eq!(spans, [(1, 1), (3, 5)]);
        assert_eq!(b.ranges()[1].checksum.is_some(), kind.is_some());
        // What bmaptool create makes of the same image, from our reading
        // of the hand-made file (same ranges, 2.0, checksums of its type).
        if kind == Some(ChecksumType::Sha256) {
            assert_same_text(
                b.to_xml().as_bytes(),
                &bmaptool_create(&image, &[]),
                version,
            );
        }
    }
}

#[test]
fn bmaptool_checks_the_hand_made_checksums() {
    // So the 1.3 and 1.4 fixtures are known to hold checksums bmaptool
    // verifies, not ones it ignores.
    let dir = tempfile::tempdir().unwrap();
    let image = small_image(dir.path());
    for version in ["1.3", "1.4"] {
        let text = hand_made(&image, version);
        let kind = if version == "1.3" {
            ChecksumType::Sha1
        } else {
            ChecksumType::Sha256
        };
        // A wrong range checksum, the file's checksum updated.
        let good = range_digest(&image, kind, 1, 1);
        let bad = range_digest(&image, kind, 3, 5);
        let swapped = text.replacen(&good, &bad, 1);
        let file_el = if version == "1.3" {
            "BmapFileSHA1"
        } else {
            "BmapFileChecksum"
        };
        let resealed = reseal(&swapped, file_el, kind);
        assert_copy_refused(
            resealed.as_bytes(),
            &image,
            "checksum mismatch for blocks range 1-1",
        );
        // Our parser takes it (the image is not its business)...
        let b = Bmap::parse(resealed.as_bytes(), version).unwrap();
        // ...and the Hasher over the range's bytes tells.
        let e = b.ranges()[0]
            .verify(&Hasher::digest(
                kind,
                &fs::read(&image).unwrap()[4096..8192],
            ))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("checksum mismatch for blocks range 1: calculated")
        );
        // A wrong file checksum: both refuse.
        assert_copy_refused(
            swapped.as_bytes(),
            &image,
            "checksum mismatch for bmap file",
        );
        let e = Bmap::parse(swapped.as_bytes(), "hand.bmap").unwrap_err();
        assert!(matches!(e.kind, BmapErrorKind::FileChecksum { .. }), "{e}");
        assert!(e.to_string().contains(&format!("{file_el} is ")), "{e}");
    }
}

/// `text` with the value of `<element>` replaced by the checksum of the
/// text with zeros there.
fn reseal(text: &str, element: &str, kind: ChecksumType) -> String {
    let open = format!("<{element}>");
    let start = text.find(&open).unwrap() + open.len();
    let zeros = "0".repeat(kind.hex_len());
    let zeroed = format!(
        "{}{zeros}{}",
        &text[..start],
        &text[start + kind.hex_len()..]
    );
    let d = Hasher::digest(kind, zeroed.as_bytes()).to_hex();
    zeroed.replacen(&zeros, &d, 1)
}

#[test]
fn a_non_power_of_two_block_size_is_copied_by_bmaptool() {
    // Why the parser takes any block size but 0.
    let dir = tempfile::tempdir().unwrap();
    let image = small_image(dir.path());
    let text = "<?xml version=\"1.0\"?>\n<bmap version=\"1.2\">\n<ImageSize>20580</ImageSize>\n\
        <BlockSize>1000</BlockSize>\n<BlocksCount>21</BlocksCount>\n\
        <MappedBlocksCount>21</MappedBlocksCount>\n<BlockMap><Range>0-20</Range></BlockMap>\n</bmap>\n";
    assert_copy_accepted(text.as_bytes(), &image);
    let b = Bmap::parse(text.as_bytes(), "x").unwrap();
    assert_eq!(b.byte_ranges().next().unwrap().0, 0..20580);
}

#[test]
fn a_wrong_mapped_blocks_count_is_refused_by_both() {
    let dir = tempfile::tempdir().unwrap();
    let image = small_image(dir.path());
    let text = hand_made(&image, "1.2").replace("<MappedBlocksCount>4<", "<MappedBlocksCount>5<");
    assert_copy_refused(text.as_bytes(), &image, "does not belong to this image");
    let e = Bmap::parse(text.as_bytes(), "hand.bmap").unwrap_err();
    assert_eq!(
        e.to_string(),
        "hand.bmap: line 6: MappedBlocksCount is 5 but the Ranges hold 4 blocks"
    );
}

#[test]
fn an_image_of_another_size_is_refused_by_both() {
    let dir = tempfile::tempdir().unwrap();
    let image = small_image(dir.path());
    let b = ours(&image, ChecksumType::Sha256);
    let longer = dir.path().join("longer.img");
    let mut bytes = fs::read(&image).unwrap();
    bytes.push(0);
    fs::write(&longer, bytes).unwrap();
    assert_copy_refused(b.to_xml().as_bytes(), &longer, "cannot set image size");
    let e = b.check_image_size(5 * 4096 + 101).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the image is 20581 bytes but the bmap's ImageSize is 20580"
    );
    b.check_image_size(5 * 4096 + 100).unwrap();
}

#[test]
fn a_changed_image_fails_the_range_checksum_for_both() {
    let dir = tempfile::tempdir().unwrap();
    let image = small_image(dir.path());
    let b = ours(&image, ChecksumType::Sha256);
    // Change one byte of blocks 3-5 after the bmap was made.
    let f = OpenOptions::new().write(true).open(&image).unwrap();
    f.write_all_at(b"!", 5 * 4096 + 50).unwrap();
    assert_copy_refused(
        b.to_xml().as_bytes(),
        &image,
        "checksum mismatch for blocks range 3-5",
    );
    let (bytes, r) = b.byte_ranges().nth(1).unwrap();
    let mut buf = vec![0; (bytes.end - bytes.start) as usize];
    File::open(&image)
        .unwrap()
        .read_exact_at(&mut buf, bytes.start)
        .unwrap();
    let e = r
        .verify(&Hasher::digest(ChecksumType::Sha256, &buf))
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("checksum mismatch for blocks range 3-5"),
        "{e}"
    );
}
