//! `map` against its oracle, `qemu-img map --output=json -f raw`, on the
//! raw fixtures of fixtures/manifest.toml and on files made here.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use sparsekit_testkit::{LoopDevice, canonical_map, drop_cache, fixture, qemu_img_map, require};

fn map(args: &[&str], path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_map"))
        .args(args)
        .arg(path)
        .output()
        .unwrap()
}

fn map_json(path: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let o = map(&args, path);
    assert!(
        o.status.success(),
        "map {args:?} {}: {}",
        path.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `map --json` equals `qemu-img map --output=json -f raw` as JSON values
/// after merging agreeing neighbours, for the whole file and sub-ranges.
fn assert_like_qemu(path: &Path) {
    drop_cache(path);
    let ours = map_json(path, &[]);
    let theirs = qemu_img_map(path, "raw", &[]);
    assert_eq!(
        canonical_map(&ours),
        canonical_map(&theirs),
        "{}",
        path.display()
    );
    // Our output is already canonical: nothing left to merge.
    assert_eq!(ours.as_array().unwrap().len(), canonical_map(&ours).len());

    let size = std::fs::metadata(path).unwrap().len();
    for (start, len) in [
        (0, 1),
        (4095, 4097),
        (size / 3, size / 3 + 1),
        (size.saturating_sub(100), 1000),
        (size + 1000, 10),
    ] {
        let (s, l) = (start.to_string(), len.to_string());
        let ours = map_json(path, &["--start", &s, "--length", &l]);
        let theirs = qemu_img_map(path, "raw", &["--start-offset", &s, "--max-length", &l]);
        assert_eq!(
            canonical_map(&ours),
            canonical_map(&theirs),
            "{} --start {s} --length {l}",
            path.display()
        );
    }
}

macro_rules! like_qemu {
    ($($test:ident: $name:literal,)*) => {$(
        #[test]
        fn $test() {
            assert_like_qemu(&fixture($name));
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
fn many_extents_fixture_really_has_100k_extents() {
    let v = map_json(&fixture("many-extents.raw"), &[]);
    let data = v
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .count();
    assert!(data >= 100_000, "{data} data extents");
}

/// Written and not flushed: the map must show the data.
#[test]
fn file_just_written_without_fsync() {
    require("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    for i in 0..5u64 {
        let path = dir.path().join(format!("fresh{i}.raw"));
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[0x99; 70_000], i * 7_777_777).unwrap();
        let ours = map_json(&path, &[]);
        // qemu-img maps with SEEK_DATA, which sees the page cache.
        let o = Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(&path)
            .output()
            .unwrap();
        let theirs: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(canonical_map(&ours), canonical_map(&theirs));
        let data: u64 = ours
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum();
        assert!(
            data >= 70_000,
            "unflushed data missing: {data} bytes of data mapped"
        );
    }
}

/// tmpfs has no FIEMAP: the SEEK_DATA path.
#[test]
fn tmpfs_seek_data_path() {
    let dir = tempfile::tempdir_in("/dev/shm").expect("/dev/shm (tmpfs) is needed for this test");
    let path = dir.path().join("shm.raw");
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(20_000_001).unwrap();
    for at in [0, 65536, 1 << 20, 5_000_000, 19_999_990] {
        f.write_all_at(&[1; 11], at).unwrap();
    }
    let o = map(&[], &path);
    assert!(String::from_utf8_lossy(&o.stdout).contains("mapped with SEEK_DATA"));
    assert_like_qemu(&path);
}

#[test]
fn human_output_sums_to_the_size() {
    let path = fixture("holes-data.raw");
    let o = map(&[], &path);
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].contains("raw file, 64 MiB (67108864 bytes), mapped with FIEMAP"),
        "{}",
        lines[0]
    );
    let mut total = 0u64;
    let mut next = 0u64;
    for l in &lines[2..lines.len() - 1] {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (off, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        assert_eq!(off, next, "{l}");
        next += len;
        total += len;
    }
    assert_eq!(total, 64 << 20);
    assert!(
        lines.last().unwrap().contains("% of 64 MiB"),
        "{}",
        lines.last().unwrap()
    );
}

/// A block device has no FIEMAP: it is mapped whole, and the table says
/// so of a device, not of a file.
#[test]
fn a_block_device_is_mapped_as_the_whole_device() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    let f = std::fs::File::create(&backing).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(&[0x5a; 4096], 1 << 20).unwrap();
    let disk = LoopDevice::over(&backing);
    let o = map(&[], &disk.dev);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "{}: raw block device, 4 MiB (4194304 bytes), mapped with whole device",
            disk.dev.display()
        )
    );
    // All of it data, holes of the backing file included.
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(
        lines[2].split_whitespace().collect::<Vec<_>>(),
        ["0", "4194304", "4", "MiB", "data"]
    );
}

fn assert_fails(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(
        err.starts_with("map: error: ") && err.contains(needle),
        "stderr: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(o.stdout.is_empty(), "nothing may be printed as a map");
}

#[test]
fn errors_name_the_file_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    assert_fails(
        &map(&[], &dir.path().join("missing.raw")),
        "missing.raw: opening: No such file or directory",
    );
    assert_fails(
        &map(&["--json"], dir.path()),
        "is a directory, not a regular file or block device",
    );

    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    assert_fails(&map(&[], &fifo), "fifo: is a FIFO");

    let o = map(&["--start", "12Q"], &fifo);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid size '12Q'"));
}

/// Root reads anything, so the permission error is provoked as nobody.
#[test]
fn permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = dir.path().join("secret.raw");
    std::fs::write(&path, b"data").unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    let o = sparsekit_testkit::run_as_nobody(env!("CARGO_BIN_EXE_map"), &[path.as_os_str()]);
    assert_fails(&o, "secret.raw: opening: Permission denied");
}

#[test]
fn broken_pipe_is_success() {
    let path = fixture("many-extents.raw");
    let mut child = Command::new(env!("CARGO_BIN_EXE_map"))
        .arg("--json")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 10];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
