//! qemu's image locks, with real qemu processes holding the files: `copy`
//! never writes into a file qemu-nbd or qemu-io has open; `map` and
//! `qcow2-info` refuse an image a writer holds unless `-U`; and while
//! `copy` writes a DEST, qemu-img and qemu-nbd refuse to open it.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sparsekit_fiemap::lock::{Perms, held_elsewhere};
use sparsekit_testkit::{Server, require, run};

fn tool(bin: &str, args: &[&str]) -> Output {
    let exe = match bin {
        "copy" => env!("CARGO_BIN_EXE_copy"),
        "map" => env!("CARGO_BIN_EXE_map"),
        "qcow2-info" => env!("CARGO_BIN_EXE_qcow2-info"),
        _ => unreachable!(),
    };
    Command::new(exe).args(args).output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn in_use(o: &Output, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{what}: {err}");
    assert!(err.contains("in use by another process"), "{what}: {err}");
}

fn succeeds(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Waits until `path` exists and another process holds lock bytes on it.
fn wait_for_locks(path: &Path) {
    let t = Instant::now();
    loop {
        if let Ok(f) = std::fs::File::open(path)
            && held_elsewhere(&f, path).unwrap().held != Perms::NONE
        {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} never locked",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `qemu-io ARGS FILE`, kept open on its standard input until dropped.
struct QemuIo(Child);

impl QemuIo {
    fn hold(args: &[&str], file: &Path) -> Self {
        let child = Command::new(require("qemu-io"))
            .args(args)
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_locks(file);
        QemuIo(child)
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
        let _ = self.0.wait();
    }
}

/// Starts a process that holds a file open until the value is dropped.
type Holder<'a> = Box<dyn Fn() -> Box<dyn std::any::Any> + 'a>;

fn qemu_nbd(dir: &Path, args: &[&str], file: &Path) -> Server {
    let sock = dir.join("qemu-nbd.sock");
    let mut all = vec!["--persistent", "-k", s(&sock)];
    all.extend_from_slice(args);
    all.push(s(file));
    let server = Server::start("qemu-nbd", &all, &sock);
    // qemu-nbd may listen before it has taken its locks.
    wait_for_locks(file);
    server
}

fn image(dir: &Path, name: &str, format: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    run("qemu-img", &["create", "-q", "-f", format, s(&p), "16M"]);
    run(
        "qemu-io",
        &["-f", format, "-c", "write -q -P 3 1M 1M", s(&p)],
    );
    p
}

#[test]
fn copy_never_writes_a_file_qemu_holds() {
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "src.qcow2", "qcow2");
    let disk = image(dir.path(), "disk.raw", "raw");
    let before = std::fs::read(&disk).unwrap();
    let holders: Vec<(&str, Holder)> = vec![
        (
            "qemu-nbd -f raw",
            Box::new(|| Box::new(qemu_nbd(dir.path(), &["-f", "raw"], &disk))),
        ),
        (
            "qemu-nbd -r -f raw",
            Box::new(|| Box::new(qemu_nbd(dir.path(), &["-r", "-f", "raw"], &disk))),
        ),
        (
            "qemu-io -f raw",
            Box::new(|| Box::new(QemuIo::hold(&["-f", "raw"], &disk))),
        ),
    ];
    for (what, hold) in holders {
        let held = hold();
        in_use(&tool("copy", &[s(&src), s(&disk)]), what);
        in_use(&tool("copy", &["--offset", "0", s(&src), s(&disk)]), what);
        // -U is about reading: a DEST in use is refused all the same.
        in_use(&tool("copy", &["-U", s(&src), s(&disk)]), what);
        drop(held);
        assert!(
            std::fs::read(&disk).unwrap() == before,
            "{what}: DEST changed"
        );
    }
    // Nobody holds it now: the copy goes ahead.
    succeeds(&tool("copy", &[s(&src), s(&disk)]), "unheld");
}

#[test]
fn readers_refuse_an_image_a_writer_holds_unless_force_share() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "img.qcow2", "qcow2");
    let raw = image(dir.path(), "img.raw", "raw");
    let out = dir.path().join("out.raw");
    {
        let _w = qemu_nbd(dir.path(), &["-f", "qcow2"], &img);
        let reads: [&[&str]; 6] = [
            &["map", s(&img)],
            &["map", "--json", s(&img)],
            &["qcow2-info", s(&img)],
            &["qcow2-info", "--check", s(&img)],
            &["qcow2-info", "--allocated", s(&img)],
            &["copy", s(&img), s(&out)],
        ];
        for (i, args) in reads.into_iter().enumerate() {
            in_use(&tool(args[0], &args[1..]), &format!("{args:?}"));
            // qemu-img's short and long spellings.
            let mut forced = vec![["-U", "--force-share"][i % 2]];
            forced.extend_from_slice(&args[1..]);
            succeeds(&tool(args[0], &forced), &format!("{forced:?}"));
        }
        // As qemu-img: its refusal and its -U agree with ours.
        let o = Command::new(require("qemu-img"))
            .args(["info", s(&img)])
            .output()
            .unwrap();
        assert!(!o.status.success(), "qemu-img info of a served image");
        succeeds(
            &Command::new(require("qemu-img"))
                .args(["info", "-U", s(&img)])
                .output()
                .unwrap(),
            "qemu-img info -U",
        );
    }
    {
        // A raw image written by qemu-io: map and copy refuse it too (a
        // map of a file being written would not be whole).
        let _w = QemuIo::hold(&["-f", "raw"], &raw);
        in_use(
            &tool("map", &[s(&raw)]),
            "map of a raw image qemu-io writes",
        );
        succeeds(&tool("map", &["-U", s(&raw)]), "map -U");
        in_use(&tool("copy", &[s(&raw), s(&out)]), "copy from it");
    }
    {
        // Read-only holders share reading with readers.
        let _r = qemu_nbd(dir.path(), &["-r", "-f", "qcow2"], &img);
        succeeds(
            &tool("map", &[s(&img)]),
            "map of an image qemu-nbd -r serves",
        );
        succeeds(&tool("qcow2-info", &[s(&img)]), "qcow2-info of it");
        succeeds(&tool("copy", &[s(&img), s(&out)]), "copy of it");
        let _io = QemuIo::hold(&["-r", "-f", "raw"], &raw);
        succeeds(
            &tool("map", &[s(&raw)]),
            "map of a raw image qemu-io -r reads",
        );
    }
}

#[test]
fn qemu_refuses_a_dest_while_copy_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("slow.sock");
    // A slow source keeps the copy busy.
    let slow = Server::start(
        "nbdkit",
        &[
            "-f",
            "--exit-with-parent",
            "-U",
            s(&sock),
            "--filter=delay",
            "pattern",
            "size=256M",
            "delay-read=200ms",
        ],
        &sock,
    );
    let other = image(dir.path(), "other.raw", "raw");
    for existing in [false, true] {
        let dest = dir.path().join("dest.raw");
        if existing {
            std::fs::write(&dest, b"old").unwrap();
        }
        let mut copy = Command::new(env!("CARGO_BIN_EXE_copy"))
            .args(["-j", "1", &slow.uri(), s(&dest)])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_locks(&dest);
        let qemu = |args: &[&str]| {
            Command::new(require(args[0]))
                .args(&args[1..])
                .output()
                .unwrap()
        };
        let refused = |o: Output, what: &str| {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{what} opened a DEST being written");
            assert!(err.contains("lock"), "{what}: {err}");
        };
        refused(
            qemu(&[
                "qemu-img",
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "raw",
                s(&other),
                s(&dest),
            ]),
            "qemu-img convert -n",
        );
        let sock2 = dir.path().join("q.sock");
        refused(
            qemu(&["qemu-nbd", "-f", "raw", "-k", s(&sock2), s(&dest)]),
            "qemu-nbd",
        );
        refused(
            qemu(&["qemu-nbd", "-r", "-f", "raw", "-k", s(&sock2), s(&dest)]),
            "qemu-nbd -r",
        );
        // Neither do sparsekit's own tools, unless asked to share.
        in_use(
            &tool("copy", &[s(&other), s(&dest)]),
            "a second copy into it",
        );
        in_use(&tool("map", &[s(&dest)]), "map of it");
        succeeds(&tool("map", &["-U", s(&dest)]), "map -U of it");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(copy.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let o = copy.wait().unwrap();
        assert!(!o.success());
        let _ = copy.stderr.take();
        assert_eq!(
            dest.exists(),
            existing,
            "a created DEST is removed, an existing one kept"
        );
        let _ = std::fs::remove_file(&dest);
    }
}
