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
    CopyStats, Destination, Error, Failed, Method, NoProgress, Opened, Plan, PlanError, RawSource,
    Request, Settings, Source, Spec, verify,
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

fn plan(src: &Path, dst: &Path, req: &Request) -> Result<Plan, PlanError> {
    let source = Opened::open(&Spec::Path(src.into()), &Default::default()).unwrap();
    let dest = Destination::inspect(&Spec::Path(dst.into())).unwrap();
    Plan::new(source, dest, req)
}

fn run_with(src: &Path, dst: &Path, req: &Request, stop: bool) -> Result<CopyStats, Failed> {
    let plan = plan(src, dst, req).unwrap();
    plan.execute(&NoProgress, &AtomicBool::new(stop))
        .map(|r| r.stats)
}

fn run(src: &Path, dst: &Path, req: &Request) -> Result<CopyStats, Failed> {
    run_with(src, dst, req, false)
}

/// What verification compares for a whole-file copy with `jobs` workers.
fn whole(size: u64, jobs: usize) -> Settings {
    Settings {
        jobs,
        chunk_size: 1 << 16,
        cold_chunk_size: 1 << 16,
        sparse_block: sparsekit_copy::SPARSE_BLOCK,
        method: Method::Auto,
        range: 0..size,
        dest_offset: 0,
        flush: false,
        bitmap: None,
    }
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
            let req = Request { jobs: Some(jobs), chunk_size: Some(chunk as u64), no_sparse: !sparse, method, verify: true, ..Request::default() };
            let stats = run(&src, &dst, &req).unwrap();
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
            verify(&source, &RawSource::open(&dst).unwrap(), &whole(l.size, jobs), &NoProgress, &AtomicBool::new(false)).unwrap();
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
        let req = Request { jobs: Some(jobs), skip, offset: Some(offset), chunk_size: Some(1 << 16), ..Request::default() };
        run(&src, &dst, &req).unwrap();
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
    run(&src, &dst, &Request::default()).unwrap();
    let check = || {
        verify(
            &RawSource::open(&src).unwrap(),
            &RawSource::open(&dst).unwrap(),
            &whole(l.size, 4),
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
    let dst = dir.path().join("dst.raw");
    let e = run_with(&src, &dst, &Request::default(), true).unwrap_err();
    assert!(matches!(e.error, Error::Interrupted));
    assert_eq!(e.done_before, 0);
    assert_eq!(
        e.to_string(),
        format!(
            "stopped with everything before source offset 0x0 done (0 bytes written); {} was created by this copy and has been removed (--keep-partial keeps it)",
            dst.display()
        )
    );
    assert!(!dst.exists());
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
    let dst = dir.path().join("dst.raw");
    let req = Request {
        jobs: Some(1),
        chunk_size: Some(1 << 20),
        ..Request::default()
    };
    let set_len = |n| {
        File::options()
            .write(true)
            .open(&src)
            .unwrap()
            .set_len(n)
            .unwrap()
    };
    let plan = plan(&src, &dst, &req).unwrap();
    // The plan says 4 MiB; then the file shrinks.
    set_len(1 << 20);
    let e = plan
        .execute(&NoProgress, &AtomicBool::new(false))
        .unwrap_err();
    assert!(
        e.error
            .to_string()
            .contains("changed size while being mapped (was 4194304 bytes, now 1048576)"),
        "{}",
        e.error
    );
    // Once mapped, a read past the new end says what happened.
    set_len(4 << 20);
    let source = RawSource::open(&src).unwrap();
    set_len(1 << 20);
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
    let mtime = std::fs::metadata(&src).unwrap().mtime_nsec();
    let e = plan(&src, &src, &Request::default()).unwrap_err();
    assert!(matches!(e, PlanError::SameFile { .. }), "{e:?}");
    assert_eq!(std::fs::read(&src).unwrap(), b"precious");
    assert_eq!(std::fs::metadata(&src).unwrap().mtime_nsec(), mtime);
}
