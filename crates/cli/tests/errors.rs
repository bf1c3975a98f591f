//! How the tools fail: a list of failing commands (full or closed
//! destinations, bad URIs, bad options, missing files, truncated and
//! damaged images, failing NBD servers), each of which must print one
//! line `TOOL: error: ...` that names the tool once and says nothing
//! twice (an issue reported `copy: error: copy: writing raw data`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use sparsekit_testkit::{Server, run};

/// Where a failing command's standard output goes.
#[derive(Debug, Clone, Copy)]
enum Out {
    /// A pipe, read to the end.
    Pipe,
    /// /dev/full: every write fails with ENOSPC.
    Full,
    /// A pipe whose reading end is closed first: EPIPE.
    Closed,
}

/// One failing command.
struct Case<'a> {
    tool: &'a str,
    args: Vec<String>,
    stdin: Option<Vec<u8>>,
    out: Out,
}

fn case(tool: &'static str, args: &[&str]) -> Case<'static> {
    Case {
        tool,
        args: args.iter().map(|s| s.to_string()).collect(),
        stdin: None,
        out: Out::Pipe,
    }
}

impl Case<'_> {
    fn out(mut self, out: Out) -> Self {
        self.out = out;
        self
    }

    fn stdin(mut self, bytes: Vec<u8>) -> Self {
        self.stdin = Some(bytes);
        self
    }

    fn exe(&self) -> &'static str {
        match self.tool {
            "map" => env!("CARGO_BIN_EXE_map"),
            "copy" => env!("CARGO_BIN_EXE_copy"),
            "qcow2-info" => env!("CARGO_BIN_EXE_qcow2-info"),
            t => panic!("no tool {t}"),
        }
    }

    /// Runs it; its exit code and standard error.
    fn run(&self) -> (Option<i32>, String) {
        let mut cmd = Command::new(self.exe());
        cmd.args(&self.args).stderr(Stdio::piped());
        cmd.stdin(if self.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        match self.out {
            Out::Pipe | Out::Closed => cmd.stdout(Stdio::piped()),
            Out::Full => cmd.stdout(OpenOptions::new().write(true).open("/dev/full").unwrap()),
        };
        let mut child = cmd.spawn().unwrap();
        if let Out::Closed = self.out {
            drop(child.stdout.take());
        }
        if let Some(bytes) = &self.stdin {
            let mut w = child.stdin.take().unwrap();
            // The tool may stop reading early: a broken pipe here is fine.
            let _ = std::io::Write::write_all(&mut w, bytes);
        }
        let o = child.wait_with_output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }
}

/// The checks on one failure's standard error.
fn problems(c: &Case, code: Option<i32>, err: &str) -> Vec<String> {
    let mut p = Vec::new();
    let prefix = format!("{}: error: ", c.tool);
    if code != Some(1) {
        p.push(format!("exit code {code:?}, not 1"));
    }
    if !err.starts_with(&prefix) {
        p.push(format!("does not start with {prefix:?}"));
    }
    let named = format!("{}:", c.tool);
    let n = err.matches(&named).count();
    if n != 1 {
        p.push(format!("{named:?} {n} times"));
    }
    if err.contains("panicked") {
        p.push("a panic".into());
    }
    // Nothing said twice in the error line: a context that repeats what
    // its cause says ("x.raw: map stopped: x.raw: FIEMAP").
    let line = err.lines().next().unwrap_or("");
    let parts: Vec<&str> = line.split(": ").map(|s| s.trim_matches('"')).collect();
    for (i, a) in parts.iter().enumerate() {
        if parts[..i].contains(a) {
            p.push(format!("{a:?} twice"));
        }
    }
    p
}

/// A qcow2 image of 4 MiB with 1 MiB of data.
fn qcow2(path: &Path) {
    let p = path.to_str().unwrap();
    run("qemu-img", &["create", "-q", "-f", "qcow2", p, "4M"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 1 0 1M", p]);
}

/// Points the image's second L2 entry at a cluster far past its end.
fn damage_l2(path: &Path) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 40).unwrap(); // header bytes 40-47: l1_table_offset
    let l1 = u64::from_be_bytes(b);
    f.read_exact_at(&mut b, l1).unwrap();
    let l2 = u64::from_be_bytes(b) & 0x00ff_ffff_ffff_fe00;
    let entry = (1u64 << 63) | 0x77_7777_0000; // copied, standard, far away
    f.write_all_at(&entry.to_be_bytes(), l2 + 8).unwrap();
}

#[test]
fn every_failure_names_the_tool_once_and_says_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (raw, img, cut, bad, bm) = (
        d("src.raw"),
        d("img.qcow2"),
        d("cut.qcow2"),
        d("bad.qcow2"),
        d("bm.qcow2"),
    );
    let f = File::create(&raw).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(b"hello", 0).unwrap();
    qcow2(Path::new(&img));
    std::fs::copy(&img, &cut).unwrap();
    File::options()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(100_000)
        .unwrap();
    std::fs::copy(&img, &bad).unwrap();
    damage_l2(Path::new(&bad));
    qcow2(Path::new(&bm));
    run("qemu-img", &["bitmap", "--add", &bm, "daily"]);
    let out = d("out.raw");
    // A gzip-compressed raw image, whole and cut in half.
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, &[7u8; 100_000]).unwrap();
        e.finish().unwrap()
    };
    let gz_cut = gz[..gz.len() / 2].to_vec();

    // NBD servers that fail every block status, read and write.
    let failing = Server::start(
        "nbdkit",
        &[
            "-f",
            "--exit-with-parent",
            "-U",
            &d("bad.sock"),
            "--filter=error",
            "memory",
            "4M",
            "error-extents-rate=1",
            "error-pread-rate=1",
            "error-pwrite-rate=1",
            "error=EIO",
        ],
        &dir.path().join("bad.sock"),
    );
    let read_only = Server::start(
        "nbdkit",
        &[
            "-f",
            "--exit-with-parent",
            "-r",
            "-U",
            &d("ro.sock"),
            "memory",
            "1M",
        ],
        &dir.path().join("ro.sock"),
    );
    let (fu, ro) = (failing.uri(), read_only.uri());
    let missing_sock = format!("nbd+unix:///?socket={}", d("none.sock"));

    let cases = vec![
        // Full, closed and impossible destinations.
        case("copy", &[&raw, "-"]).out(Out::Full),
        case("copy", &[&img, "-"]).out(Out::Full),
        case("copy", &["-O", "qcow2", &img, "-"]).out(Out::Full),
        case("copy", &["-O", "qcow2", &raw, "-"]).out(Out::Closed),
        case("copy", &[&raw, "-"]).out(Out::Closed),
        case("copy", &["-", "-"]).stdin(gz).out(Out::Full),
        case("copy", &[&raw, "/dev/full"]),
        case("copy", &[&raw, dir.path().to_str().unwrap()]),
        case("copy", &[&raw, &d("no/such/dir/out.raw")]),
        case("copy", &[&raw, &ro]),
        case("copy", &[&raw, &fu]),
        case("map", &[&raw]).out(Out::Full),
        case("map", &["--json", &img]).out(Out::Full),
        case("qcow2-info", &[&img]).out(Out::Full),
        case("qcow2-info", &["--json", &img]).out(Out::Full),
        case(
            "qcow2-info",
            &["--bitmap", "--output", &d("no/such/dir/b"), &img],
        ),
        // Bad URIs and unreachable servers.
        case("map", &["nbd://bad:host:x/"]),
        case("copy", &[&raw, "nbd://h/?tls-type=psk"]),
        case("copy", &["nbd+unix:///", &out]),
        case("copy", &[&missing_sock, &out]),
        case("map", &["nbd://127.0.0.1:1/"]),
        // Bad options and sizes.
        case("map", &["--bogus", &raw]),
        case("copy", &[]),
        case("qcow2-info", &["--zlib", &img]),
        case("map", &["--length", "10MB", &raw]),
        case("copy", &["--skip", "99999999", &raw, &out]),
        case("copy", &["--chunk-size", "1", &raw, &out]),
        // Missing files.
        case("map", &[&d("missing.raw")]),
        case("copy", &[&d("missing.raw"), &out]),
        case("qcow2-info", &[&d("missing.qcow2")]),
        case("copy", &["--bmap", &d("missing.bmap"), &raw, &out]),
        case("map", &["--bitmap", "nope", &bm]),
        case("copy", &["--bitmap", "nope", &bm, &raw]),
        // Truncated and damaged images and streams.
        case("map", &[&cut]),
        case("copy", &[&cut, &out]),
        case("qcow2-info", &[&cut]),
        case("map", &["--bmap", &bad]),
        case("copy", &[&bad, &out]),
        case("copy", &["-", &out]).stdin(gz_cut),
        case("copy", &["--size", "1M", "-", &out]).stdin(b"short".to_vec()),
        // Servers that fail.
        case("map", &[&fu]),
        case("map", &["--json", &fu]),
        case("copy", &[&fu, &out]),
    ];
    let mut wrong = Vec::new();
    for c in &cases {
        let (code, err) = c.run();
        // What each says, for `--nocapture`.
        println!("{}", err.lines().next().unwrap_or("(nothing)"));
        let p = problems(c, code, &err);
        if !p.is_empty() {
            wrong.push(format!(
                "{} {:?}: {}\n    {}",
                c.tool,
                c.args,
                p.join(", "),
                err.trim_end()
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} failures:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}
