//! `copy` against its oracle, `qemu-img convert -O raw`, on every raw
//! fixture; a loop block device as destination; and failures: a full
//! file system, an unreadable source, SIGINT in the middle.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sparsekit_testkit::{LoopDevice, fixture, require, run};

fn copy(args: &[&str], src: &Path, dst: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_copy"))
        .args(args)
        .arg(src)
        .arg(dst)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "copy failed: {err}");
    err
}

fn qemu_convert(src: &Path, out: &Path) {
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            "-f",
            "raw",
            src.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
}

/// Allocated 512-byte blocks, after a flush: ext4 counts its extent-tree
/// blocks only once delayed allocation has happened.
fn blocks(p: &Path) -> u64 {
    std::fs::File::open(p).unwrap().sync_data().unwrap();
    std::fs::metadata(p).unwrap().blocks()
}

/// Reads `len` bytes at `offset` of `f`.
fn read_range(f: &std::fs::File, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(f, &mut buf, offset).unwrap();
    buf
}

/// True when the first `len` bytes of `a` and `b` are the same, by an
/// oracle that does not use this project's mapper: `cmp`, which reads every
/// byte, up to 1 GiB; past that (the 1 TiB fixture) `qemu-img compare`,
/// which maps both files with qemu's own block status, a longer file's
/// tail reading as zeros.
fn same_bytes(a: &Path, b: &Path, len: u64) -> bool {
    let mut cmd = if len <= 1 << 30 {
        let mut c = Command::new(require("cmp"));
        c.args(["-s", "-n", &len.to_string()]);
        c
    } else {
        let mut c = Command::new(require("qemu-img"));
        c.args(["compare", "-q", "-f", "raw", "-F", "raw"]);
        c
    };
    let o = cmd.arg(a).arg(b).output().unwrap();
    match o.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("comparing {} with {}: {o:?}", a.display(), b.display()),
    }
}

/// Compares `ours` with qemu-img's output byte for byte. qemu sees a raw
/// file as whole 512-byte sectors, so for a source whose size is not a
/// multiple of 512 its output is longer by a tail of zeros; `copy` keeps
/// the source's size, like cp.
fn assert_same_as_qemu(src: &Path, ours: &Path, theirs: &Path) {
    let size = std::fs::metadata(src).unwrap().len();
    assert_eq!(
        std::fs::metadata(ours).unwrap().len(),
        size,
        "{}: copy keeps the source's size",
        src.display()
    );
    let qemu_len = std::fs::metadata(theirs).unwrap().len();
    assert_eq!(qemu_len, size.div_ceil(512) * 512, "qemu-img rounds to 512");
    assert!(
        same_bytes(ours, theirs, size),
        "{}: bytes differ from qemu-img convert",
        src.display()
    );
    let tail = read_range(&std::fs::File::open(theirs).unwrap(), size, qemu_len - size);
    assert!(tail.iter().all(|&x| x == 0));
}

macro_rules! like_qemu {
    ($($test:ident: $name:literal,)*) => {$(
        #[test]
        fn $test() {
            let src = fixture($name);
            // Outputs on tmpfs: on this machine's ext4 (mounted with
            // `discard`) deleting a file of 120,000 extents takes 10 s.
            // Destinations on ext4 are tested below and in sparsekit-copy.
            let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is needed");
            let theirs = dir.path().join("qemu.raw");
            qemu_convert(&src, &theirs);
            for args in [&[][..], &["-j", "1"], &["--no-sparse"], &["--method", "read-write", "--chunk-size", "64k", "-j", "3"], &["--verify"], &["--evict", "--chunk-size", "1M"]] {
                let ours = dir.path().join("ours.raw");
                ok(&copy(args, &src, &ours));
                assert_same_as_qemu(&src, &ours, &theirs);
                if !args.contains(&"--no-sparse") {
                    assert!(
                        blocks(&ours) <= blocks(&theirs),
                        "{} {args:?}: {} blocks allocated, qemu-img convert {}",
                        $name, blocks(&ours), blocks(&theirs)
                    );
                }
                std::fs::remove_file(&ours).unwrap();
            }
            // Cold: with the source's pages dropped, its data is read with
            // O_DIRECT.
            sparsekit_fiemap::drop_page_cache(&std::fs::File::open(&src).unwrap()).unwrap();
            let ours = dir.path().join("ours.raw");
            ok(&copy(&[], &src, &ours));
            assert_same_as_qemu(&src, &ours, &theirs);
        }
    )*};
}

like_qemu! {
    empty_file: "empty.raw",
    all_hole: "all-hole.raw",
    all_data: "all-data.raw",
    holes_and_data: "holes-data.raw",
    allocated_zero_filled_data: "zero-data.raw",
    fallocated_unwritten_ranges: "fallocated.raw",
    unaligned_size: "unaligned.raw",
    one_tib_nearly_all_hole: "huge-1t.raw",
    many_small_extents: "many-extents.raw",
}

#[test]
fn replaces_an_existing_file_and_leaves_holes() {
    let src = fixture("holes-data.raw");
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("old.raw");
    std::fs::write(&dst, vec![0xffu8; 80 << 20]).unwrap();
    let err = ok(&copy(&[], &src, &dst));
    assert!(err.contains(" image: read "), "{err}");
    assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
    assert!(
        blocks(&dst) <= blocks(&src),
        "old data must not stay allocated"
    );
}

/// Bytes of `path` in the page cache (mincore over a mapping of it).
fn resident_bytes(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let page = 4096usize;
    // SAFETY: a shared read-only mapping of a file we opened, of its
    // length; it is only passed to mincore and unmapped below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: `addr` maps `len` bytes; `vec` holds one byte per page.
    let r = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    // SAFETY: unmapping the mapping made above, not used afterwards.
    unsafe { libc::munmap(addr, len) };
    assert_eq!(r, 0);
    vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page as u64
}

/// `--evict` (nbdcopy's way): the destination is written back as the copy
/// goes and its clean pages dropped, so at most a window of it stays
/// cached; with `--no-evict` the whole copy is. By default a copy of an
/// amount it cannot know beforehand (a stream on standard input) evicts
/// from the start. (A copy of a known amount below the kernel's free-run
/// ceiling decides by how fast the page cache takes its writes, which no
/// test can fix; `evict_by_default` and the pace are unit-tested.)
/// A copy written in small pieces (8 KiB extents) is not evicted: writing
/// it back would cost the file system an allocation per piece. On ext4,
/// every copy byte-identical.
#[test]
fn evict_drops_the_destination_from_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole.raw");
    let data: Vec<u8> = (0..256u64 << 20).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(&whole, &data).unwrap();
    // 8 KiB of data every 16 KiB: 16,384 extents, 128 MiB of data.
    let pieces = dir.path().join("pieces.raw");
    let mut sparse = vec![0u8; data.len()];
    {
        let f = std::fs::File::create(&pieces).unwrap();
        f.set_len(data.len() as u64).unwrap();
        for at in (0..data.len()).step_by(16 << 10) {
            let piece = &data[at..at + (8 << 10)];
            f.write_all_at(piece, at as u64).unwrap();
            sparse[at..at + piece.len()].copy_from_slice(piece);
        }
    }
    // From a qcow2 stream on standard input: how much data it holds is not
    // known before the copy.
    let image = dir.path().join("whole.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            whole.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
    );
    let evicted = 96u64 << 20;
    let cached = 100u64 << 20;
    for (src, want, args, expect) in [
        (&whole, &data, &["--evict"][..], Some(evicted)),
        (&whole, &data, &["--evict", "--no-evict"], None),
        (&whole, &data, &["--no-evict", "--evict"], Some(evicted)),
        (&image, &data, &["-"], Some(evicted)),
        (&image, &data, &["-", "--no-evict"], None),
        (&pieces, &sparse, &["--evict"], None),
    ] {
        let dst = dir.path().join("dst.raw");
        if args.first() == Some(&"-") {
            let out = Command::new(env!("CARGO_BIN_EXE_copy"))
                .args(args)
                .arg(&dst)
                .stdin(std::fs::File::open(src).unwrap())
                .output()
                .unwrap();
            ok(&out);
        } else {
            ok(&copy(args, src, &dst));
        }
        // Before reading it back, which caches it.
        let resident = resident_bytes(&dst);
        let what = format!("{} {args:?}", src.display());
        assert!(
            std::fs::read(&dst).unwrap() == *want,
            "{what}: bytes differ"
        );
        match expect {
            Some(most) => assert!(resident <= most, "{what}: {resident} bytes still cached"),
            // Not evicted: nearly all of it (unless memory ran short) is cached.
            None => assert!(resident > cached, "{what}: only {resident} bytes cached"),
        }
        std::fs::remove_file(&dst).unwrap();
    }
}

/// A loop device over a file is a real block device: BLKGETSIZE64,
/// BLKZEROOUT for the zero ranges, O_EXCL.
#[test]
fn block_device_destination() {
    let src = fixture("holes-data.raw");
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    // Old content everywhere: zero ranges must be zeroed on a device.
    std::fs::write(&backing, vec![0xa5u8; 80 << 20]).unwrap();
    let disk = LoopDevice::over(&backing);
    let dev = disk.dev.clone();
    let theirs = dir.path().join("qemu.raw");
    qemu_convert(&src, &theirs);
    let want = std::fs::read(&theirs).unwrap();

    ok(&copy(&["--verify"], &src, &dev));
    let got = std::fs::read(&dev).unwrap();
    assert_eq!(got.len(), 80 << 20);
    assert!(
        got[..want.len()] == want[..],
        "device content differs from qemu-img convert"
    );
    assert!(
        got[want.len()..].iter().all(|&x| x == 0xa5),
        "bytes past the copy must be left alone"
    );

    // --dest-is-zero skips zeroing: with the old bytes written back, they
    // stay in the source's holes, and the data is copied over them.
    std::fs::write(&dev, vec![0xa5u8; 80 << 20]).unwrap();
    ok(&copy(&["--dest-is-zero"], &src, &dev));
    let got = std::fs::read(&dev).unwrap();
    assert_eq!(want[65536], 0, "a hole of the source");
    assert_eq!(got[65536], 0xa5, "--dest-is-zero zeroed a hole");
    let holes = want
        .iter()
        .zip(&got)
        .filter(|&(&w, &g)| w == 0 && g == 0xa5)
        .count();
    assert!(holes > 0);
    assert!(
        want.iter()
            .zip(&got)
            .all(|(&w, &g)| w == g || (w == 0 && g == 0xa5)),
        "--dest-is-zero: data differs from qemu-img convert"
    );

    // A device smaller than the source is refused before anything is written.
    let big = fixture("huge-1t.raw");
    let o = copy(&[], &big, &dev);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("the device holds 83886080 bytes, the copy needs 1099511627776"),
        "{err}"
    );
}

/// A destination on a full file system: ENOSPC named with the file and
/// offset, exit 1, and how far the copy got.
/// Unmounts a mount point when dropped, then waits for the process that
/// served it, if any.
struct Unmount(PathBuf, Option<std::process::Child>);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        if let Some(server) = &mut self.1 {
            let _ = server.wait();
        }
    }
}

#[test]
fn destination_file_system_full() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let o = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "mounting a small tmpfs needs root: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _guard = Unmount(mnt.clone(), None);
    let src = fixture("holes-data.raw");
    let o = copy(&["-j", "1"], &src, &mnt.join("out.raw"));
    assert_failed_writing(&o, "out.raw: writing", "No space left on device");
}

/// A copy that failed on a write: exit 1, the destination and the error
/// named, how far it got, no panic.
fn assert_failed_writing(o: &Output, writing: &str, error: &str) {
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(writing) && err.contains(error), "{err}");
    assert!(
        err.contains("stopped with everything before source offset"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
}

/// EIO on the destination: a FUSE file (nbdfuse) backed by nbdkit's memory
/// plugin behind its error filter, failing every write. `--offset 0`
/// updates the file in place (a FUSE export cannot be truncated).
#[test]
fn destination_write_errors() {
    let nbdfuse = require("nbdfuse");
    let nbdkit = require("nbdkit");
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: this test needs FUSE"
    );
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let disk = mnt.join("disk");
    let mut server = Command::new(nbdfuse)
        .arg(&disk)
        .arg("--command")
        .arg(nbdkit)
        .args(["-s", "--filter=error", "memory", "8M"])
        .args(["error-pwrite=EIO", "error-pwrite-rate=100%"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::fs::metadata(&disk).map_or(true, |m| m.len() != 8 << 20) {
        if let Ok(Some(st)) = server.try_wait() {
            panic!("nbdfuse exited with {st} before serving {}", disk.display());
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nbdfuse did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _guard = Unmount(mnt, Some(server));
    let src = dir.path().join("src.raw");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&src, data).unwrap();
    for extra in [&[][..], &["--dest-is-zero"][..]] {
        let mut args = vec!["--offset", "0"];
        args.extend_from_slice(extra);
        let o = copy(&args, &src, &disk);
        assert_failed_writing(&o, "disk: writing", "Input/output error");
    }
}

#[test]
fn unreadable_missing_and_bad_destinations() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let src = dir.path().join("secret.raw");
    std::fs::write(&src, b"data").unwrap();
    std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let out = dir.path().join("out.raw");
    let o = sparsekit_testkit::run_as_nobody(
        env!("CARGO_BIN_EXE_copy"),
        &[src.as_os_str(), out.as_os_str()],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("secret.raw: opening: Permission denied"));

    let o = copy(
        &[],
        &dir.path().join("nope.raw"),
        &dir.path().join("out.raw"),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope.raw: opening: No such file"));

    let good = fixture("holes-data.raw");
    let o = copy(&[], &good, dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("is a directory, not a regular file or block device")
    );

    let o = copy(&[], &good, &good);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("the destination is the source file"));
}

/// True once `pid` has handlers for SIGINT and SIGTERM (their bits in
/// SigCgt of /proc/PID/status).
fn catches_signals(pid: u32) -> bool {
    use nix::sys::signal::Signal;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let want = (1u64 << (Signal::SIGINT as u32 - 1)) | (1u64 << (Signal::SIGTERM as u32 - 1));
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & want == want)
}

/// SIGINT and SIGTERM stop the workers cleanly: exit 1, "interrupted",
/// how far it got.
#[test]
fn sigint_mid_copy() {
    signal_mid_copy(nix::sys::signal::Signal::SIGINT);
}

#[test]
fn sigterm_mid_copy() {
    signal_mid_copy(nix::sys::signal::Signal::SIGTERM);
}

fn signal_mid_copy(signal: nix::sys::signal::Signal) {
    let src = fixture("many-extents.raw");
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_copy"))
        .args(["-j", "2", "--no-progress"])
        .arg(&src)
        .arg(dir.path().join("out.raw"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !catches_signals(child.id()) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "copy never installed its signal handlers"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("stopped with everything before source offset")
            && err.ends_with("interrupted\n"),
        "{err}"
    );
}
