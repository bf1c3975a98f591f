//! qemu's image locks against real qemu processes: every outcome of
//! [`lock::lock`] is compared with what qemu-img does in the same
//! situation, and the lock bytes are read from /proc/locks, not from the
//! code under test.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sparsekit_fiemap::Error;
use sparsekit_fiemap::lock::{self, Locked, Profile};
use sparsekit_testkit::require;

fn require_qemu() {
    for tool in ["qemu-img", "qemu-io", "qemu-nbd"] {
        require(tool);
    }
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
}

/// A directory with `img.qcow2` (a qcow2 image, opened as qcow2 or as
/// raw by the holders), `small.raw` (a source for `convert -n`) and
/// `ext.qcow2`, whose external data file is img.qcow2.
struct Images {
    dir: tempfile::TempDir,
}

impl Images {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
        qemu_img(&["create", "-q", "-f", "raw", &p("small.raw"), "64K"]);
        // The data file first: creating ext.qcow2 creates it as raw, then
        // it becomes a qcow2 image of its own.
        let data_file = format!("data_file={}", p("img.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &data_file,
            &p("ext.qcow2"),
            "64M",
        ]);
        qemu_img(&["create", "-q", "-f", "qcow2", &p("img.qcow2"), "64M"]);
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn img(&self) -> PathBuf {
        self.path("img.qcow2")
    }
}

/// The OFD lock bytes all processes hold on `path`, from /proc/locks
/// (`N: OFDLCK ADVISORY READ -1 MAJ:MIN:INODE START END`).
fn proc_lock_bytes(path: &Path) -> BTreeSet<u64> {
    let m = std::fs::metadata(path).unwrap();
    let id = format!(
        "{:02x}:{:02x}:{}",
        nix::sys::stat::major(m.dev()),
        nix::sys::stat::minor(m.dev()),
        m.ino()
    );
    let mut bytes = BTreeSet::new();
    for line in std::fs::read_to_string("/proc/locks").unwrap().lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Blocked waiters are marked "->"; they hold nothing.
        if f.len() < 8 || f[1] != "OFDLCK" || f[5] != id {
            continue;
        }
        let (start, end): (u64, u64) = (f[6].parse().unwrap(), f[7].parse().unwrap());
        bytes.extend(start..=end);
    }
    bytes
}

/// The lock bytes of a profile: 100 + n held, 200 + n not shared.
fn bytes_of(p: Profile) -> BTreeSet<u64> {
    let held = p.held.iter().map(|x| 100 + x as u64);
    held.chain(p.unshared.iter().map(|x| 200 + x as u64))
        .collect()
}

/// A qemu process holding an image open.
struct Holder {
    child: Child,
    what: String,
}

impl Holder {
    /// Starts `cmd` and waits until the locks on `img` are `expect`.
    fn start(mut cmd: Command, img: &Path, expect: &BTreeSet<u64>) -> Self {
        let what = format!("{cmd:?}");
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut h = Holder { child, what };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let seen = proc_lock_bytes(img);
            if &seen == expect {
                return h;
            }
            if let Some(status) = h.child.try_wait().unwrap() {
                let mut err = String::new();
                use std::io::Read;
                h.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                panic!("{} exited ({status}) before locking: {err}", h.what);
            }
            assert!(
                Instant::now() < deadline,
                "{}: lock bytes {seen:?}, expected {expect:?}",
                h.what
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `qemu-nbd -f FMT [-r] IMG`, serving on a socket nobody connects to.
    fn qemu_nbd(img: &Path, fmt: &str, read_only: bool, expect: &BTreeSet<u64>) -> Self {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", fmt, "-k"])
            .arg(img.with_extension("sock"))
            .args(read_only.then_some("-r"))
            .arg(img);
        Self::start(cmd, img, expect)
    }

    /// `qemu-io -f FMT [-r] IMG`, kept open by its standard input.
    fn qemu_io(img: &Path, fmt: &str, read_only: bool, expect: &BTreeSet<u64>) -> Self {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", fmt])
            .args(read_only.then_some("-r"))
            .arg(img);
        Self::start(cmd, img, expect)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // qemu-io ends at the end of its input; qemu-nbd is killed.
        drop(self.child.stdin.take());
        if self.what.contains("qemu-nbd") {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The refusal in a qemu tool's message, as [`lock::Conflict`] words it:
/// `failed to get shared "write" lock`.
fn qemu_refusal(stderr: &str) -> String {
    let at = stderr
        .find("Failed to get")
        .unwrap_or_else(|| panic!("not a lock refusal: {stderr}"));
    let end = stderr[at..].find(" lock").unwrap() + at + " lock".len();
    stderr[at..end].to_lowercase()
}

/// Runs a qemu-img command: `None` when it succeeds, the refusal when it
/// is refused for a lock.
fn qemu_img_outcome(args: &[&str]) -> Option<String> {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    if out.status.success() {
        return None;
    }
    Some(qemu_refusal(&String::from_utf8_lossy(&out.stderr)))
}

/// Starts qemu-nbd on `img`: `None` when it comes up serving (then it is
/// stopped), the refusal when it exits refusing. `--fork` makes its exit
/// status say which (the socket is there either way).
fn qemu_nbd_outcome(img: &Path, read_only: bool) -> Option<String> {
    let sock = img.with_extension("contender.sock");
    let pid_file = img.with_extension("contender.pid");
    let out = Command::new("qemu-nbd")
        .args(["--fork", "-f", "raw", "-k"])
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pid_file)
        .args(read_only.then_some("-r"))
        .arg(img)
        .output()
        .unwrap();
    if !out.status.success() {
        return Some(qemu_refusal(&String::from_utf8_lossy(&out.stderr)));
    }
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Not our child (its parent, which we waited for, exited): kill it
    // and wait until it has died, its files closed and its locks gone.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name; a zombie has
        // closed its files.
        if stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
        {
            break;
        }
        assert!(Instant::now() < deadline, "qemu-nbd {pid} does not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Locks `path` with `profile` on a new description, which is closed
/// again: `None` when taken, the refusal when refused.
fn our_outcome(path: &Path, profile: Profile) -> Option<String> {
    let f = File::open(path).unwrap();
    match lock::lock(&f, path, profile) {
        Ok(Locked::Held) => None,
        Ok(Locked::NoOfdLocks) => panic!("this kernel has OFD locks"),
        Err(Error::InUse { conflict, .. }) => Some(conflict.to_string()),
        Err(e) => panic!("{e}"),
    }
}

/// Each profile with the qemu-img command that takes the same locks on
/// img.qcow2.
fn profiles_and_qemu_img(im: &Images) -> Vec<(&'static str, Profile, Vec<String>)> {
    let img = im.img().to_str().unwrap().to_owned();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let out = im.path("out.raw").to_str().unwrap().to_owned();
    let small = im.path("small.raw").to_str().unwrap().to_owned();
    let ext = im.path("ext.qcow2").to_str().unwrap().to_owned();
    vec![
        ("READ", Profile::READ, s(&["map", "-f", "qcow2", &img])),
        (
            "READ",
            Profile::READ,
            s(&["convert", "-f", "qcow2", "-O", "raw", &img, &out]),
        ),
        (
            "READ",
            Profile::READ,
            s(&["check", "-q", "-f", "qcow2", &img]),
        ),
        (
            "SHARED_READ",
            Profile::SHARED_READ,
            s(&["map", "-f", "raw", &img]),
        ),
        (
            "READ.force_share",
            Profile::READ.force_share(),
            s(&["map", "-U", &img]),
        ),
        (
            "READ.force_share",
            Profile::READ.force_share(),
            s(&["convert", "-U", "-f", "qcow2", "-O", "raw", &img, &out]),
        ),
        ("INSPECT", Profile::INSPECT, s(&["info", &img])),
        (
            "INSPECT.force_share",
            Profile::INSPECT.force_share(),
            s(&["info", "-U", &img]),
        ),
        ("DATA_FILE", Profile::DATA_FILE, s(&["map", &ext])),
        (
            "WRITE",
            Profile::WRITE,
            s(&["convert", "-n", "-f", "raw", "-O", "qcow2", &small, &img]),
        ),
    ]
}

/// One holder: its lock bytes are what qemu 10 takes, and every profile is
/// refused exactly when qemu-img's command with the same locks is, for the
/// same permission; the profiles refused are `refused`.
fn against_holder(fmt: &str, nbd: bool, read_only: bool, expect: &[u64], refused: &[&str]) {
    require_qemu();
    let im = Images::new();
    let expect: BTreeSet<u64> = expect.iter().copied().collect();
    let holder = if nbd {
        Holder::qemu_nbd(&im.img(), fmt, read_only, &expect)
    } else {
        Holder::qemu_io(&im.img(), fmt, read_only, &expect)
    };
    // What another description sees of it through the API.
    let f = File::open(im.img()).unwrap();
    let seen = lock::held_elsewhere(&f, &im.img()).unwrap();
    assert_eq!(bytes_of(seen), expect, "{}", holder.what);
    for (name, profile, args) in profiles_and_qemu_img(&im) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let ours = our_outcome(&im.img(), profile);
        let qemu = qemu_img_outcome(&args);
        assert_eq!(
            ours, qemu,
            "{name} against {}: ours vs qemu-img {args:?}",
            holder.what
        );
        // The refusal follows from the bytes alone.
        assert_eq!(ours.is_some(), profile.conflicts_with(seen), "{name}");
        assert_eq!(ours.is_some(), refused.contains(&name), "{name}: {ours:?}");
        // Nothing of ours stays behind. (Under load, one of the holder's own
        // bytes was once missing from /proc/locks for a moment: 203 of a
        // writable qemu-nbd. Look again for a while before failing.)
        let t = std::time::Instant::now();
        let mut left = proc_lock_bytes(&im.img());
        while left != expect && t.elapsed() < std::time::Duration::from_secs(2) {
            std::thread::sleep(std::time::Duration::from_millis(20));
            left = proc_lock_bytes(&im.img());
        }
        assert_eq!(left, expect, "{name}");
    }
}

#[test]
fn qemu_nbd_raw_writable() {
    // consistent read, write held; resize not shared.
    against_holder(
        "raw",
        true,
        false,
        &[100, 101, 203],
        &["READ", "INSPECT", "WRITE"],
    );
}

#[test]
fn qemu_nbd_raw_read_only() {
    against_holder("raw", true, true, &[100, 203], &["WRITE"]);
}

#[test]
fn qemu_nbd_qcow2_writable() {
    against_holder(
        "qcow2",
        true,
        false,
        &[100, 101, 103, 201, 203],
        &["READ", "INSPECT", "DATA_FILE", "WRITE"],
    );
}

#[test]
fn qemu_nbd_qcow2_read_only() {
    against_holder("qcow2", true, true, &[100, 201, 203], &["WRITE"]);
}

#[test]
fn qemu_io_raw_writable() {
    // qemu-io shares everything on a raw image.
    against_holder(
        "raw",
        false,
        false,
        &[100, 101],
        &["READ", "INSPECT", "WRITE"],
    );
}

#[test]
fn qemu_io_raw_read_only() {
    against_holder("raw", false, true, &[100], &[]);
}

#[test]
fn qemu_io_qcow2_writable() {
    against_holder(
        "qcow2",
        false,
        false,
        &[100, 101, 103, 201, 203],
        &["READ", "INSPECT", "DATA_FILE", "WRITE"],
    );
}

#[test]
fn qemu_io_qcow2_read_only() {
    against_holder("qcow2", false, true, &[100, 201, 203], &["WRITE"]);
}

/// What qemu tools do with img.qcow2 while it is held: qemu-img convert
/// -n into it (last: if allowed, it overwrites the qcow2 header), qemu-img
/// info and map, qemu-nbd writable and read-only.
fn contenders(im: &Images) -> Vec<(&'static str, Option<String>)> {
    let img = im.img();
    let i = img.to_str().unwrap();
    let small = im.path("small.raw");
    vec![
        ("qemu-img info", qemu_img_outcome(&["info", i])),
        ("qemu-img info -U", qemu_img_outcome(&["info", "-U", i])),
        (
            "qemu-img map -f raw",
            qemu_img_outcome(&["map", "-f", "raw", i]),
        ),
        ("qemu-nbd", qemu_nbd_outcome(&img, false)),
        ("qemu-nbd -r", qemu_nbd_outcome(&img, true)),
        (
            "qemu-img convert -n",
            qemu_img_outcome(&["convert", "-n", "-O", "raw", small.to_str().unwrap(), i]),
        ),
    ]
}

/// While this process holds `profile`, qemu's tools do what they do while
/// `qemu-io -f FMT [-r]` holds the same lock bytes.
fn qemu_meets_our_profile(
    profile: Profile,
    fmt: &str,
    read_only: bool,
) -> Vec<(&'static str, Option<String>)> {
    require_qemu();
    let ours = {
        let im = Images::new();
        let f = File::open(im.img()).unwrap();
        assert_eq!(lock::lock(&f, &im.img(), profile).unwrap(), Locked::Held);
        assert_eq!(proc_lock_bytes(&im.img()), bytes_of(profile));
        contenders(&im)
    };
    let theirs = {
        let im = Images::new();
        let _h = Holder::qemu_io(&im.img(), fmt, read_only, &bytes_of(profile));
        contenders(&im)
    };
    assert_eq!(
        ours, theirs,
        "{profile:?} held by us vs by qemu-io -f {fmt}"
    );
    ours
}

#[test]
fn qemu_tools_refuse_a_file_held_for_writing() {
    let outcomes = qemu_meets_our_profile(Profile::WRITE, "qcow2", false);
    let refused = |name| outcomes.iter().find(|o| o.0 == name).unwrap().1.clone();
    assert_eq!(
        refused("qemu-img convert -n"),
        Some("failed to get \"write\" lock".into())
    );
    assert_eq!(
        refused("qemu-nbd"),
        Some("failed to get \"write\" lock".into())
    );
    assert_eq!(
        refused("qemu-nbd -r"),
        Some("failed to get shared \"resize\" lock".into())
    );
    assert_eq!(
        refused("qemu-img info"),
        Some("failed to get shared \"write\" lock".into())
    );
    // Readers that let others write are let in, as by qemu.
    assert_eq!(refused("qemu-img info -U"), None);
    assert_eq!(refused("qemu-img map -f raw"), None);
}

#[test]
fn qemu_tools_meet_a_file_held_for_reading() {
    let outcomes = qemu_meets_our_profile(Profile::READ, "qcow2", true);
    let refused = |name| outcomes.iter().find(|o| o.0 == name).unwrap().1.clone();
    assert_eq!(
        refused("qemu-nbd"),
        Some("failed to get \"write\" lock".into())
    );
    assert_eq!(
        refused("qemu-img convert -n"),
        Some("failed to get \"write\" lock".into())
    );
    assert_eq!(refused("qemu-img info"), None);
    assert_eq!(refused("qemu-nbd -r"), None);
}

#[test]
fn qemu_tools_meet_a_file_held_with_force_share() {
    let outcomes = qemu_meets_our_profile(Profile::READ.force_share(), "raw", true);
    // Nothing is refused: a force-shared reader lets everyone in.
    assert!(outcomes.iter().all(|o| o.1.is_none()), "{outcomes:?}");
}

#[test]
fn a_refusal_names_the_file_and_says_it_is_in_use() {
    require_qemu();
    let im = Images::new();
    let _h = Holder::qemu_nbd(&im.img(), "raw", false, &[100, 101, 203].into());
    let f = File::options()
        .read(true)
        .write(true)
        .open(im.img())
        .unwrap();
    let e = lock::lock(&f, &im.img(), Profile::WRITE).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with(im.img().to_str().unwrap()), "{msg}");
    assert!(msg.contains("in use by another process"), "{msg}");
    // qemu-img convert creating the file refuses with the same words.
    assert!(msg.ends_with("failed to get \"resize\" lock"), "{msg}");
    let small = im.path("small.raw");
    assert_eq!(
        qemu_img_outcome(&[
            "convert",
            "-O",
            "raw",
            small.to_str().unwrap(),
            im.img().to_str().unwrap()
        ]),
        Some("failed to get \"resize\" lock".into())
    );
}

/// The child half of [`without_working_locks_as_qemu`], run under strace
/// by the same test in a new process: locks `path` for reading and writes
/// what happened to `out`.
fn lock_child(path: &Path, out: &std::ffi::OsStr) {
    let f = File::open(path).unwrap();
    let said = match lock::lock(&f, path, Profile::READ) {
        Ok(l) => format!("{l:?}"),
        Err(e) => format!("{e}: {}", std::error::Error::source(&e).unwrap()),
    };
    std::fs::write(out, said).unwrap();
}

/// `strace -f -P PATH... -e inject=fcntl:error=ERRNO CMD`: every fcntl
/// call CMD makes on the files PATH fails with ERRNO.
fn under_strace(paths: &[&Path], errno: &str, cmd: &mut Command) -> Command {
    let mut s = Command::new("strace");
    s.args(["-f", "-o", "/dev/null", "-e", "trace=fcntl", "-e"])
        .arg(format!("inject=fcntl:error={errno}"));
    for p in paths {
        s.arg("-P").arg(p);
    }
    s.arg(cmd.get_program()).args(cmd.get_args());
    s
}

/// Where lock calls fail, sparsekit goes on or refuses as qemu-img does:
/// a kernel without OFD locks answers EINVAL to every F_OFD_* call and
/// qemu goes on unlocked; a file system without working locks (NFSv3
/// without lockd) answers ENOLCK and qemu refuses the image.
#[test]
fn without_working_locks_as_qemu() {
    if let (Some(path), Some(out)) = (
        std::env::var_os("SPARSEKIT_LOCK_CHILD"),
        std::env::var_os("SPARSEKIT_LOCK_CHILD_OUT"),
    ) {
        return lock_child(Path::new(&path), &out);
    }
    require_qemu();
    require("strace");
    let im = Images::new();
    let img = im.img();
    let said = im.path("said");
    let child = |errno: &str| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "without_working_locks_as_qemu", "--quiet"]);
        let status = under_strace(&[&img], errno, &mut c)
            .env("SPARSEKIT_LOCK_CHILD", &img)
            .env("SPARSEKIT_LOCK_CHILD_OUT", &said)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "the child under strace: {status}");
        std::fs::read_to_string(&said).unwrap()
    };
    let qemu = |errno: &str, paths: &[&Path]| {
        let mut c = Command::new("qemu-img");
        c.args(["map", "-f", "qcow2"]).arg(&img);
        let out = under_strace(paths, errno, &mut c).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // qemu probes OFD locks on /dev/null, then locks the image.
    let dev_null = Path::new("/dev/null");
    let (ok, err) = qemu("EINVAL", &[dev_null, &img]);
    assert!(ok, "qemu-img goes on without OFD locks: {err}");
    assert_eq!(child("EINVAL"), "NoOfdLocks");

    let (ok, err) = qemu("ENOLCK", &[&img]);
    assert!(
        !ok && err.contains("Failed to lock byte 100: No locks available"),
        "{err}"
    );
    let ours = child("ENOLCK");
    assert!(ours.contains("lock byte 100: No locks available"), "{ours}");
    assert!(ours.starts_with(img.to_str().unwrap()), "{ours}");
}
