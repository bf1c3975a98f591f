//! Mapping real files on the machine's file systems: ext4 (FIEMAP), tmpfs
//! (SEEK_DATA) and a loop block device, every method against the same
//! expectation.

#![allow(clippy::single_range_in_vec_init)] // one-range expectations read best as arrays

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use sparsekit_extent::{Extent, ExtentIterExt, Kind, check_map};
use sparsekit_fiemap::{Error, FileKind, Mapper, Method, drop_page_cache};

const BLOCK: u64 = 4096;

fn map(m: &Mapper, range: Range<u64>) -> Vec<Extent> {
    let v: Vec<Extent> = m.extents(range.clone()).collect::<Result<_, _>>().unwrap();
    let r = range.start.min(m.size())..range.end.min(m.size());
    check_map(&v, r).unwrap();
    v
}

/// The byte ranges that hold data, merged.
fn data_ranges(map: &[Extent]) -> Vec<Range<u64>> {
    map.iter()
        .filter(|e| e.kind == Kind::Data)
        .map(|e| e.range())
        .collect()
}

fn create(path: &Path, size: u64) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    f
}

fn fallocate(f: &File, offset: u64, len: u64) {
    nix::fcntl::fallocate(
        f,
        nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
    .unwrap();
}

/// `ranges` rounded out to whole file-system blocks and merged.
fn blocks_of(ranges: &[Range<u64>], size: u64) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges
        .iter()
        .filter(|r| !r.is_empty())
        .map(|r| r.start / BLOCK * BLOCK..r.end.div_ceil(BLOCK).saturating_mul(BLOCK).min(size))
        .collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in v {
        match out.last_mut() {
            Some(l) if l.end >= r.start => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[test]
fn ext4_uses_fiemap_and_agrees_with_seek_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.raw");
    let f = create(&path, 64 << 20);
    f.write_all_at(&[1; 8192], 0).unwrap();
    f.write_all_at(&[2; 4096], 1 << 20).unwrap();
    f.write_all_at(&[3; 100], (64 << 20) - 100).unwrap();
    f.sync_all().unwrap();

    let fiemap = Mapper::open(&path).unwrap();
    assert_eq!(
        fiemap.method(),
        Method::Fiemap,
        "/tmp should be ext4 on this machine"
    );
    assert_eq!(fiemap.kind(), FileKind::Regular);
    let a = map(&fiemap, 0..u64::MAX);
    let b = map(
        &Mapper::open(&path).unwrap().with_method(Method::SeekData),
        0..u64::MAX,
    );
    let c = map(
        &Mapper::open(&path).unwrap().with_method(Method::WholeFile),
        0..u64::MAX,
    );
    let want = vec![
        0..8192,
        1 << 20..(1 << 20) + 4096,
        (64 << 20) - 4096..64 << 20,
    ];
    assert_eq!(data_ranges(&a), want);
    assert_eq!(data_ranges(&b), want);
    assert_eq!(c, [Extent::new(0, 64 << 20, Kind::Data)]);
}

#[test]
fn unwritten_extents_are_zero_and_written_parts_are_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("falloc.raw");
    let f = create(&path, 16 << 20);
    fallocate(&f, 1 << 20, 4 << 20);
    // Write into the middle of the unwritten range, and past EOF (KEEP_SIZE).
    f.write_all_at(&[9; 4096], 2 << 20).unwrap();
    fallocate(&f, 16 << 20, 1 << 20);
    drop_page_cache(&f).unwrap();

    let m = Mapper::open(&path).unwrap();
    assert_eq!(m.size(), 16 << 20, "KEEP_SIZE must not grow the file");
    let v = map(&m, 0..u64::MAX);
    assert_eq!(
        v,
        [
            Extent::new(0, 1 << 20, Kind::Hole),
            Extent::new(1 << 20, 1 << 20, Kind::Zero),
            Extent::new(2 << 20, 4096, Kind::Data),
            Extent::new((2 << 20) + 4096, (3 << 20) - 4096, Kind::Zero),
            Extent::new(5 << 20, 11 << 20, Kind::Hole),
        ]
    );
    // SEEK_DATA cannot tell unwritten from hole once the cache is dropped.
    let s = map(&m.with_method(Method::SeekData), 0..u64::MAX);
    assert_eq!(data_ranges(&s), [2 << 20..(2 << 20) + 4096]);
}

/// Data written but not yet flushed must be in the map: cp and bmaptool
/// once lost such data by mapping with FIEMAP without syncing.
#[test]
fn regression_unflushed_data_is_never_missed() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..20u64 {
        let path = dir.path().join(format!("dirty{round}.raw"));
        let f = create(&path, 32 << 20);
        let at = (round * 1_234_567) % (31 << 20);
        f.write_all_at(&[0x5a; 12345], at).unwrap();
        // No fsync: the pages are dirty in the cache (ext4 delalloc).
        for method in [Method::Fiemap, Method::SeekData] {
            let m = Mapper::open(&path).unwrap().with_method(method);
            let v = map(&m, 0..u64::MAX);
            assert_eq!(
                data_ranges(&v),
                blocks_of(&[at..at + 12345], 32 << 20),
                "{method} missed unflushed data at {at:#x}"
            );
        }
    }
}

#[test]
fn tmpfs_falls_back_to_seek_data() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is needed for this test");
    let path = dir.path().join("t.raw");
    let f = create(&path, 8 << 20);
    f.write_all_at(&[7; 4096], 4 << 20).unwrap();
    let m = Mapper::open(&path).unwrap();
    assert_eq!(m.method(), Method::SeekData, "tmpfs has no FIEMAP");
    let v = map(&m, 0..u64::MAX);
    assert_eq!(data_ranges(&v), [4 << 20..(4 << 20) + 4096]);
    // Forcing FIEMAP on tmpfs is an error naming the file and offset.
    let err = Mapper::open(&path)
        .unwrap()
        .with_method(Method::Fiemap)
        .extents(0..u64::MAX)
        .find_map(Result::err)
        .expect("FIEMAP must fail on tmpfs");
    let msg = err.to_string();
    assert!(
        msg.contains("t.raw") && msg.contains("FIEMAP at offset 0x0"),
        "{msg}"
    );
}

/// More extents than one FIEMAP call returns: the stream must continue
/// exactly where the previous batch stopped.
#[test]
fn many_extents_span_several_fiemap_batches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("many.raw");
    let n = sparsekit_fiemap::FIEMAP_BATCH as u64 * 2 + 77;
    let f = create(&path, n * 2 * BLOCK);
    let block = [0xeeu8; BLOCK as usize];
    for i in 0..n {
        f.write_all_at(&block, i * 2 * BLOCK).unwrap();
    }
    let m = Mapper::open(&path).unwrap();
    let v = map(&m, 0..u64::MAX);
    let data = data_ranges(&v);
    assert_eq!(data.len() as u64, n);
    assert!(
        data.iter()
            .enumerate()
            .all(|(i, r)| *r == (i as u64 * 2 * BLOCK..(i as u64 * 2 + 1) * BLOCK))
    );
    let s = map(
        &Mapper::open(&path).unwrap().with_method(Method::SeekData),
        0..u64::MAX,
    );
    assert_eq!(data_ranges(&s), data);
    // A range starting and ending inside extents is clipped exactly.
    let r = 3 * BLOCK + 100..(n - 3) * BLOCK - 5;
    let part = map(&m, r.clone());
    let want: Vec<Extent> = v
        .iter()
        .copied()
        .map(Ok::<_, ()>)
        .clip(r)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(part, want);
}

#[test]
fn empty_file_huge_file_and_unaligned_size() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    create(&empty, 0);
    let m = Mapper::open(&empty).unwrap();
    assert_eq!(m.size(), 0);
    assert!(map(&m, 0..u64::MAX).is_empty());

    let huge = dir.path().join("huge");
    let tib = 1u64 << 40;
    let f = create(&huge, tib);
    f.write_all_at(b"x", tib / 2).unwrap();
    f.write_all_at(b"y", tib - 1).unwrap();
    let v = map(&Mapper::open(&huge).unwrap(), 0..u64::MAX);
    assert_eq!(
        data_ranges(&v),
        [tib / 2..tib / 2 + BLOCK, tib - BLOCK..tib]
    );

    let odd = dir.path().join("odd");
    let f = create(&odd, 10_000_007);
    f.write_all_at(&[1; 7], 10_000_000).unwrap();
    let v = map(&Mapper::open(&odd).unwrap(), 0..u64::MAX);
    let tail = 10_000_007 / BLOCK * BLOCK;
    assert_eq!(data_ranges(&v), [tail..10_000_007]);
}

#[test]
fn block_device_is_all_data_with_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("loop.img");
    create(&backing, 8 << 20)
        .write_all_at(&[1; 4096], 0)
        .unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .expect("losetup (Debian package mount) is needed to attach a loop device");
    assert!(
        out.status.success(),
        "losetup --find --show failed (needs root and /dev/loop-control): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    struct Detach(PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _guard = Detach(dev.clone());
    let m = Mapper::open(&dev).unwrap();
    assert_eq!(m.kind(), FileKind::BlockDevice);
    assert_eq!(m.method(), Method::WholeFile);
    assert_eq!(m.size(), 8 << 20);
    assert_eq!(
        map(&m, 4096..u64::MAX),
        [Extent::new(4096, (8 << 20) - 4096, Kind::Data)]
    );
}

#[test]
fn refuses_what_has_no_map() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let e = Mapper::open(&missing).unwrap_err();
    assert!(matches!(e, Error::Open { .. }), "{e:?}");
    assert!(e.to_string().contains("missing: opening"), "{e}");

    let e = Mapper::open(dir.path()).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("is a directory, not a regular file or block device"),
        "{e}"
    );

    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    // Must return at once, not block waiting for a writer.
    let e = Mapper::open(&fifo).unwrap_err();
    assert!(e.to_string().contains("is a FIFO"), "{e}");

    let sock = dir.path().join("sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    assert!(
        Mapper::open(&sock)
            .unwrap_err()
            .to_string()
            .contains("is a socket")
    );

    let e = Mapper::open("/dev/null").unwrap_err();
    assert!(e.to_string().contains("is a character device"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random writes: every method sees exactly the written blocks, and any
    /// sub-range is the clip of the whole map.
    #[test]
    fn random_layouts_map_to_written_blocks(
        writes in prop::collection::vec((0u64..(4 << 20), 1u64..40_000), 0..25),
        size in (4u64 << 20)..(5 << 20),
        sub in (0u64..(5 << 20), 0u64..(5 << 20)),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.raw");
        let f = create(&path, size);
        let mut ranges = Vec::new();
        for (at, len) in writes {
            let len = len.min(size - at);
            f.write_all_at(&vec![0xa5; len as usize], at).unwrap();
            ranges.push(at..at + len);
        }
        let want = blocks_of(&ranges, size);
        for method in [Method::Fiemap, Method::SeekData] {
            let m = Mapper::open(&path).unwrap().with_method(method);
            let whole = map(&m, 0..u64::MAX);
            prop_assert_eq!(data_ranges(&whole), want.clone(), "{}", method);
            let r = sub.0.min(sub.1)..sub.0.max(sub.1);
            let part = map(&m, r.clone());
            let clipped: Vec<Extent> = whole.iter().copied().map(Ok::<_, ()>).clip(r).collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(part, clipped);
        }
    }
}

/// A map is made for one size of the file: a file truncated while being
/// mapped gets an error, not a map of a file that no longer exists.
#[test]
fn file_truncated_while_mapped_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shrinks.raw");
    let f = create(&path, 8 << 20);
    f.write_all_at(&[1; 4096], 6 << 20).unwrap();
    let m = Mapper::open(&path).unwrap();
    f.set_len(1 << 20).unwrap();
    let err = m
        .extents(0..u64::MAX)
        .find_map(Result::err)
        .expect("an error");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: changed size while being mapped (was 8388608 bytes, now 1048576)",
            path.display()
        )
    );
}
