//! `qcow2-info IMAGE`'s snapshot list against `qemu-img info IMAGE`'s, line
//! for line, in several time zones: dates are local time in both.
//!
//! Snapshots made by `qemu-img snapshot -c` all have a zero VM clock and no
//! VM state, and today's date; a copy of the image gets its snapshot table
//! entries patched by hand (date, VM clock, VM state size, icount) to reach
//! the other cases: qemu-img only prints these fields, it does not check
//! them against anything.

use std::path::Path;
use std::process::Command;

use sparsekit_testkit::{require, run};

/// The snapshot list `exe [info] image` prints with `TZ=tz`: the
/// `Snapshot list:` line, the header and `rows` snapshots.
fn snapshot_list(exe: &Path, image: &Path, tz: &str, rows: usize) -> Vec<String> {
    let mut cmd = Command::new(exe);
    if exe.ends_with("qemu-img") {
        cmd.arg("info");
    }
    let o = cmd.arg(image).env("TZ", tz).output().unwrap();
    assert!(
        o.status.success(),
        "{} {}: {}",
        exe.display(),
        image.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == "Snapshot list:")
        .unwrap_or_else(|| panic!("no snapshot list in:\n{text}"));
    lines[at..(at + 2 + rows).min(lines.len())]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

/// Sets fields of snapshot `index` of `image` in place: date, VM clock,
/// VM state size and icount (the last two in the extra data, which
/// `qemu-img snapshot -c` writes 24 bytes of).
fn patch_snapshot(image: &Path, index: usize, date: u32, clock_ns: u64, state: u64, icount: u64) {
    let mut b = std::fs::read(image).unwrap();
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let be16 = |b: &[u8], at: usize| u16::from_be_bytes(b[at..at + 2].try_into().unwrap());
    // Header bytes 60-63: nb_snapshots; 64-71: snapshots_offset.
    assert!(index < be32(&b, 60) as usize);
    let mut at = u64::from_be_bytes(b[64..72].try_into().unwrap()) as usize;
    for _ in 0..index {
        let len = 40
            + be32(&b, at + 36) as usize
            + be16(&b, at + 12) as usize
            + be16(&b, at + 14) as usize;
        at += len.next_multiple_of(8);
    }
    assert!(be32(&b, at + 36) >= 24, "extra data too short to patch");
    b[at + 16..at + 20].copy_from_slice(&date.to_be_bytes()); // date_sec
    b[at + 20..at + 24].copy_from_slice(&0u32.to_be_bytes()); // date_nsec
    b[at + 24..at + 32].copy_from_slice(&clock_ns.to_be_bytes()); // vm_clock_nsec
    b[at + 40..at + 48].copy_from_slice(&state.to_be_bytes()); // vm_state_size_large
    b[at + 56..at + 64].copy_from_slice(&icount.to_be_bytes()); // icount
    std::fs::write(image, b).unwrap();
}

const ZONES: [&str; 4] = [
    "UTC",
    "Asia/Kolkata",        // +05:30
    "America/St_Johns",    // -03:30, with summer time
    "Australia/Lord_Howe", // +10:30, summer time of half an hour
];

#[test]
fn snapshot_list_equals_qemu_img_info_in_every_zone() {
    let qemu_img = require("qemu-img");
    let ours = Path::new(env!("CARGO_BIN_EXE_qcow2-info"));
    for zone in ZONES {
        let file = Path::new("/usr/share/zoneinfo").join(zone);
        assert!(
            file.exists(),
            "{}: install the Debian package tzdata",
            file.display()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let made = dir.path().join("made.qcow2");
    let m = made.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", m, "8M"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0xd1 0 1M", m]);
    for name in ["snap1", "a-name-longer-than-sixteen", "third", "fourth"] {
        run("qemu-img", &["snapshot", "-c", name, m]);
    }

    let patched = dir.path().join("patched.qcow2");
    std::fs::copy(&made, &patched).unwrap();
    // The Epoch; 1 h 2 min 3.456789012 s; 118 MiB of VM state; no icount.
    patch_snapshot(&patched, 0, 0, 3_723_456_789_012, 123_456_789, u64::MAX);
    // 2024-02-29 12:59:59 UTC; 12500 hours and a bit; 1.5 KiB.
    patch_snapshot(&patched, 1, 1_709_211_599, 45_000_000_999_999_999, 1536, 42);
    // 2024-07-01 12:00:00 UTC, summer in the north, winter in the south.
    patch_snapshot(&patched, 2, 1_719_835_200, 59_999_999_999, 1 << 40, 0);
    // The last second a u32 holds: 2106-02-07 06:28:15 UTC.
    patch_snapshot(&patched, 3, u32::MAX, 1, 0, 7);

    for image in [&made, &patched] {
        let mut dates = Vec::new();
        for zone in ZONES {
            let theirs = snapshot_list(&qemu_img, image, zone, 4);
            assert_eq!(theirs.len(), 6, "{theirs:#?}");
            assert_eq!(
                snapshot_list(ours, image, zone, 4),
                theirs,
                "{} in TZ={zone}",
                image.display()
            );
            dates.push(theirs[2].clone());
        }
        // The zones did change the dates: they are local time.
        assert_ne!(dates[0], dates[1], "{dates:#?}");
    }

    // What the patched rows say, in UTC, spelled out.
    let utc = snapshot_list(ours, &patched, "UTC", 4);
    assert!(
        utc[2].contains("118 MiB 1970-01-01 00:00:00  0001:02:03.456         --"),
        "{}",
        utc[2]
    );
    assert!(
        utc[3].contains("2024-02-29 12:59:59 12500:00:00.999         42"),
        "{}",
        utc[3]
    );
    assert!(
        utc[5].contains("2106-02-07 06:28:15  0000:00:00.000          7"),
        "{}",
        utc[5]
    );
}
