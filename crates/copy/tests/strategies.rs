//! Every copy strategy against one expectation: random sparse layouts
//! copied serially and in parallel, with pread/pwrite and copy_file_range,
//! sparse or not, at offsets; the destination must hold the source's bytes
//! and no more allocated blocks than needed.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::AtomicBool;

use proptest::prelude::*;
use sparsekit_copy::{
    CopyOptions, DestMode, Error, Method, NoProgress, RawSource, Sink, Source, copy, dest_end,
    verify,
};

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

fn run(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    mode: DestMode,
) -> Result<sparsekit_copy::CopyStats, sparsekit_copy::Failed> {
    let source = RawSource::open(src).unwrap();
    let sink = Sink::open(dst, dest_end(&source, opts), mode, false, &[]).unwrap();
    copy(&source, &sink, opts, &NoProgress, &AtomicBool::new(false))
}

fn blocks(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks()
}

/// A layout: (offset, length, fill byte) writes; fill 0 writes zeros
/// (allocated zero blocks), and `falloc` ranges are fallocated.
#[derive(Debug, Clone)]
struct Layout {
    size: u64,
    writes: Vec<(u64, u64, u8)>,
    falloc: Vec<(u64, u64)>,
}

fn layout() -> impl Strategy<Value = Layout> {
    (1u64..(3 << 20)).prop_flat_map(|size| {
        (
            Just(size),
            prop::collection::vec(
                (0..size, 1u64..200_000, prop_oneof![Just(0u8), 1u8..=255]),
                0..12,
            ),
            prop::collection::vec((0..size, 1u64..300_000), 0..3),
        )
            .prop_map(|(size, writes, falloc)| Layout {
                size,
                writes: writes
                    .into_iter()
                    .map(|(o, l, b)| (o, l.min(size - o), b))
                    .collect(),
                falloc: falloc
                    .into_iter()
                    .map(|(o, l)| (o, l.min(size - o)))
                    .collect(),
            })
    })
}

fn make(dir: &Path, l: &Layout) -> std::path::PathBuf {
    let p = dir.join("src.raw");
    let f = create(&p, l.size);
    for &(o, n) in &l.falloc {
        nix::fcntl::fallocate(
            &f,
            nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            o as i64,
            n as i64,
        )
        .unwrap();
    }
    for &(o, n, b) in &l.writes {
        f.write_all_at(&vec![b; n as usize], o).unwrap();
    }
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn every_strategy_gives_the_source_bytes(l in layout(), jobs in 1usize..5, chunk_pow in 12u32..22) {
        let dir = tempfile::tempdir().unwrap();
        let src = make(dir.path(), &l);
        let want = std::fs::read(&src).unwrap();
        let chunk = 1usize << chunk_pow;
        for (method, sparse) in [(Method::ReadWrite, true), (Method::ReadWrite, false), (Method::CopyFileRange, false), (Method::Auto, true)] {
            let dst = dir.path().join("dst.raw");
            let opts = CopyOptions { jobs, chunk_size: chunk, sparse, method, ..CopyOptions::default() };
            let stats = run(&src, &dst, &opts, DestMode::Replace).unwrap();
            prop_assert_eq!(stats.total, l.size);
            let got = std::fs::read(&dst).unwrap();
            prop_assert!(got == want, "{:?} sparse={} jobs={} chunk={}: bytes differ", method, sparse, jobs, chunk);
            if sparse {
                // Zero blocks are holes: never more blocks than the source's
                // data needs.
                let nonzero_blocks = want.chunks(4096).filter(|b| b.iter().any(|&x| x != 0)).count() as u64;
                prop_assert!(blocks(&dst) <= nonzero_blocks * 8 + 8, "{} blocks for {} non-zero 4k blocks", blocks(&dst), nonzero_blocks);
            }
            let source = RawSource::open(&src).unwrap();
            verify(&source, &RawSource::open(&dst).unwrap(), &opts, &NoProgress, &AtomicBool::new(false)).unwrap();
        }
    }

    /// --skip and --offset into an existing file full of 0xff: the bytes
    /// outside the written range stay, the holes of the source are zeroed.
    #[test]
    fn skip_and_offset_update_an_existing_file(l in layout(), skip_frac in 0u64..100, offset in 0u64..(1 << 20), jobs in 1usize..4) {
        let dir = tempfile::tempdir().unwrap();
        let src = make(dir.path(), &l);
        let skip = l.size * skip_frac / 100;
        let dst = dir.path().join("dst.raw");
        let old_len = offset + (l.size - skip) + 12345;
        std::fs::write(&dst, vec![0xffu8; old_len as usize]).unwrap();
        let opts = CopyOptions { jobs, skip, dest_offset: offset, chunk_size: 1 << 16, ..CopyOptions::default() };
        run(&src, &dst, &opts, DestMode::Update).unwrap();
        let s = std::fs::read(&src).unwrap();
        let d = std::fs::read(&dst).unwrap();
        prop_assert_eq!(d.len() as u64, old_len);
        prop_assert!(d[..offset as usize].iter().all(|&x| x == 0xff));
        prop_assert!(d[offset as usize..(offset + l.size - skip) as usize] == s[skip as usize..]);
        prop_assert!(d[(offset + l.size - skip) as usize..].iter().all(|&x| x == 0xff));
    }
}

#[test]
fn verify_finds_a_changed_byte() {
    let dir = tempfile::tempdir().unwrap();
    let l = Layout {
        size: 1 << 20,
        writes: vec![(4096, 8192, 7)],
        falloc: vec![],
    };
    let src = make(dir.path(), &l);
    let dst = dir.path().join("dst.raw");
    let opts = CopyOptions::default();
    run(&src, &dst, &opts, DestMode::Replace).unwrap();
    let check = || {
        verify(
            &RawSource::open(&src).unwrap(),
            &RawSource::open(&dst).unwrap(),
            &opts,
            &NoProgress,
            &AtomicBool::new(false),
        )
    };
    check().unwrap();
    // In data.
    OpenOptions::new()
        .write(true)
        .open(&dst)
        .unwrap()
        .write_all_at(&[8], 5000)
        .unwrap();
    let e = check().unwrap_err();
    assert!(
        matches!(e.error, Error::Differs { offset: 5000, .. }),
        "{e:?}"
    );
    // In a hole of the source.
    OpenOptions::new()
        .write(true)
        .open(&dst)
        .unwrap()
        .write_all_at(&[7], 5000)
        .unwrap();
    OpenOptions::new()
        .write(true)
        .open(&dst)
        .unwrap()
        .write_all_at(&[1], 700_000)
        .unwrap();
    let e = check().unwrap_err();
    assert!(
        matches!(
            e.error,
            Error::Differs {
                offset: 700_000,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn stop_flag_stops_before_any_work_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    let l = Layout {
        size: 1 << 20,
        writes: vec![(0, 1 << 20, 1)],
        falloc: vec![],
    };
    let src = make(dir.path(), &l);
    let source = RawSource::open(&src).unwrap();
    let dst = dir.path().join("dst.raw");
    let sink = Sink::open(&dst, source.size(), DestMode::Replace, false, &[]).unwrap();
    let e = copy(
        &source,
        &sink,
        &CopyOptions::default(),
        &NoProgress,
        &AtomicBool::new(true),
    )
    .unwrap_err();
    assert!(matches!(e.error, Error::Interrupted));
    assert_eq!(e.done_before, 0);
    assert_eq!(
        e.to_string(),
        "stopped with everything before source offset 0x0 done (0 bytes written)"
    );
}

#[test]
fn source_truncated_during_copy_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let l = Layout {
        size: 4 << 20,
        writes: vec![(0, 4 << 20, 3)],
        falloc: vec![],
    };
    let src = make(dir.path(), &l);
    let source = RawSource::open(&src).unwrap();
    // The map says 4 MiB of data; then the file shrinks.
    File::options()
        .write(true)
        .open(&src)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let dst = dir.path().join("dst.raw");
    let sink = Sink::open(&dst, source.size(), DestMode::Replace, false, &[]).unwrap();
    let opts = CopyOptions {
        jobs: 1,
        chunk_size: 1 << 20,
        ..CopyOptions::default()
    };
    let e = copy(&source, &sink, &opts, &NoProgress, &AtomicBool::new(false)).unwrap_err();
    assert!(
        e.error
            .to_string()
            .contains("changed size while being mapped (was 4194304 bytes, now 1048576)"),
        "{}",
        e.error
    );
    // Once mapped, a read past the new end says what happened.
    let mut buf = vec![0; 4096];
    let e = source.read_at(&mut buf, 2 << 20).unwrap_err();
    let chain = format!("{e}: {}", std::error::Error::source(&*e).unwrap());
    assert!(
        chain.contains("reading 4096 bytes at offset 0x200000")
            && chain.contains("truncated during the copy"),
        "{chain}"
    );
}

#[test]
fn same_file_is_refused_before_truncating() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    std::fs::write(&src, b"precious").unwrap();
    let m = std::fs::metadata(&src).unwrap();
    let e = Sink::open(&src, 8, DestMode::Replace, false, &[(m.dev(), m.ino())]).unwrap_err();
    assert!(matches!(e, Error::SameFile { .. }));
    assert_eq!(std::fs::read(&src).unwrap(), b"precious");
}
