//! `parse_size` against qemu-img 10 itself, on inputs chosen at the edges
//! of `qemu_strtosz` and qemu-img's `cvtnum` range check.
//!
//! Two qemu-img commands read a size with `cvtnum` and say what they read
//! without touching anything:
//! - `qemu-img create -f raw -- /dev/null SIZE` prints
//!   `Formatting '/dev/null', fmt=raw size=N` with the exact value before
//!   it fails to grow the device (nothing is written);
//! - `qemu-img measure --size=SIZE -O raw` prints `required size: N`,
//!   rounded up to 512 bytes (raw's sector size).
//!
//! Both take the whole range up to 2^63 - 1; both must agree on what they
//! accept, `create`'s value must be ours, and `measure`'s ours rounded up.

use std::path::Path;
use std::process::Command;

use sparsekit_cli::size::parse_size;
use sparsekit_testkit::{canonical_map, qemu_img_map, require};

/// Inputs, one per line of thought.
fn inputs() -> Vec<String> {
    let mut v: Vec<String> = [
        // integers, whitespace, signs
        "0",
        "1",
        "4096",
        "+1",
        " 1",
        "\t1",
        "\n1",
        "1 ",
        " 1 ",
        "",
        " ",
        "0000000000000000000000001",
        "-1",
        "-0",
        " -0",
        "-1k",
        "-0x1",
        "+0x10",
        // octal-looking, binary-looking
        "08",
        "010",
        "0b101",
        // fractions with and without suffix
        "1.5k",
        "1.5",
        "1.",
        "1.k",
        ".5M",
        ".5",
        "+.5k",
        "-.5",
        "-.5k",
        ".",
        ".k",
        "1.0",
        "12.345M",
        "1.9999k",
        "0.0005k",
        "0.0004k",
        "1.99999999999999999999",
        "0.99999999999999999999k",
        "1.00000000000000000001B",
        "1.5B",
        "1.5b",
        "1..5k",
        "1.5.5k",
        "1.5 k",
        ". 5k",
        "1,5k",
        // hex
        "0x1000",
        "0X1000",
        "0xfF",
        "0x1b",
        "0x1B",
        "0x1E",
        "0x10k",
        "0x10K",
        "0x10M",
        "0x1p3",
        "0x1.8",
        "0x1.8k",
        "0x",
        "00x5",
        "0xg",
        "0x7fffffffffffffff",
        "0x8000000000000000",
        "0xffffffffffffffff",
        "0x10000000000000000",
        "0x00000000000000000001",
        // exponents: `e` is the exabyte suffix
        "1e3",
        "1E3",
        "1e",
        "1E",
        "1.5e1k",
        "1.5E",
        "1e-3",
        "2.5e",
        // each suffix, both cases, and what is not a suffix
        "3b",
        "3B",
        "3k",
        "3K",
        "3m",
        "3M",
        "3g",
        "3G",
        "3t",
        "3T",
        "3p",
        "3P",
        "3x",
        "3Z",
        "1KB",
        "1kb",
        "10MB",
        "1KiB",
        "1MiB",
        "1 k",
        "1k2",
        // junk
        "k",
        "abc",
        "inf",
        "nan",
        "-inf",
        "infinity",
        "1_000",
        "1k\u{a0}",
        "\u{ff11}",
        // the top of the range: 2^63 - 1, 2^63, 2^64 - 1, 2^64
        "9223372036854775807",
        "9223372036854775808",
        "18446744073709551615",
        "18446744073709551616",
        "99999999999999999999",
        "7E",
        "8E",
        "7.9E",
        "7.999999999999999E",
        "7.99999999999999999E",
        "7.9999999999999999999999E",
        "8191P",
        "8192P",
        "8388607T",
        "8388608T",
        "16E",
        "17E",
        "15.9999999999999999999999999999999999999999999999999999E",
        "9223372036854775807B",
        "9223372036854775807k",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // A fraction that underflows a double is still not a whole byte.
    v.push(format!("1.{}1B", "0".repeat(350)));
    v.push(format!("1.{}1k", "0".repeat(350)));
    v
}

/// What `qemu-img create -f raw -- /dev/null SIZE` read, if it took it.
fn qemu_create(size: &str) -> Option<u64> {
    let o = Command::new(require("qemu-img"))
        .args(["create", "-f", "raw", "--", "/dev/null", size])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.starts_with("Formatting '/dev/null'"))?;
    let n = line.split("size=").nth(1).expect("a size= field");
    Some(n.trim().parse().unwrap_or_else(|e| panic!("{line:?}: {e}")))
}

/// What `qemu-img measure --size=SIZE -O raw` says a raw image needs, if it
/// took the size.
fn qemu_measure(size: &str) -> Option<u64> {
    let o = Command::new(require("qemu-img"))
        .args(["measure", &format!("--size={size}"), "-O", "raw"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let n = out
        .lines()
        .find_map(|l| l.strip_prefix("required size: "))?;
    Some(n.trim().parse().unwrap())
}

#[test]
fn parse_size_reads_what_qemu_img_reads() {
    let inputs = inputs();
    assert!(inputs.len() >= 40);
    let mut wrong = Vec::new();
    let mut accepted = 0;
    for s in &inputs {
        let (created, measured) = (qemu_create(s), qemu_measure(s));
        assert_eq!(
            created.is_some(),
            measured.is_some(),
            "{s:?}: qemu-img create and measure disagree: {created:?} {measured:?}"
        );
        let ours = parse_size(s).ok();
        // The table, for `--nocapture`.
        let show = |n: Option<u64>| n.map_or("refused".to_string(), |n| n.to_string());
        println!(
            "{:<26} create {:<20} measure {:<20} ours {}",
            format!("{s:?}"),
            show(created),
            show(measured),
            show(ours)
        );
        if ours != created {
            wrong.push(format!("{s:?}: qemu-img {created:?}, ours {ours:?}"));
        }
        if let (Some(n), Some(m)) = (ours, measured) {
            accepted += 1;
            let rounded = n.div_ceil(512) * 512;
            if rounded != m {
                wrong.push(format!("{s:?}: measure {m}, ours {n} rounds to {rounded}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} inputs read differently:\n{}",
        wrong.len(),
        inputs.len(),
        wrong.join("\n")
    );
    // Both kinds well represented.
    assert!(
        accepted >= 30 && inputs.len() - accepted >= 30,
        "{accepted}"
    );
}

fn map(args: &[&str], path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_map"))
        .args(args)
        .arg(path)
        .output()
        .unwrap()
}

/// `map --start 0x1000 --length 1.5k` maps the same bytes as qemu-img map
/// given the same strings.
#[test]
fn map_takes_hex_and_fractions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(64 << 10).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 4096], 8192).unwrap();
    drop(f);

    let args = ["--start", "0x1000", "--length", "1.5k"];
    let o = map(&[&["--json"][..], &args].concat(), &path);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let theirs = qemu_img_map(
        &path,
        "raw",
        &["--start-offset", "0x1000", "--max-length", "1.5k"],
    );
    assert_eq!(canonical_map(&ours), canonical_map(&theirs));
    let first = &ours[0];
    assert_eq!(
        (first["start"].as_u64(), first["length"].as_u64()),
        (Some(4096), Some(1536))
    );

    // The human table too: one extent of 1536 bytes at 4096.
    let o = map(&args, &path);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().take(2).eq(["4096", "1536"])),
        "{text}"
    );
}

/// clap prints the size's own message after naming the flag.
#[test]
fn a_bad_size_names_the_flag_and_shows_what_a_size_is() {
    let o = map(&["--length", "10MB"], Path::new("/dev/null"));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "invalid value '10MB' for '--length <LENGTH>': invalid size '10MB': a size is a \
             number of bytes with an optional suffix: 4096, 0x1000, 64k, 1.5G (k, M, G, T, P, \
             E: powers of 1024)"
        ),
        "{err}"
    );
}
