//! Test harness: real NBD servers (qemu-nbd, nbdkit) started in a temp
//! dir and always killed, tools run with a deadline, and the oracles
//! (nbdinfo, qemu-img) parsed as JSON.

#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Every external tool gets this long before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Full path of `tool`, or a failure naming the Debian package to install.
pub fn tool(name: &str, package: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: install the Debian package {package} (apt-get install {package})");
}

pub fn qemu_img() -> PathBuf {
    tool("qemu-img", "qemu-utils")
}
pub fn qemu_io() -> PathBuf {
    tool("qemu-io", "qemu-utils")
}
pub fn qemu_nbd() -> PathBuf {
    tool("qemu-nbd", "qemu-utils")
}
pub fn nbdkit() -> PathBuf {
    tool("nbdkit", "nbdkit")
}
pub fn nbdinfo() -> PathBuf {
    tool("nbdinfo", "libnbd-bin")
}

/// Runs a command to completion within [`DEADLINE`]; panics (after
/// killing it) if it takes longer or fails.
pub fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {shown}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    };
    assert!(
        out.status.success(),
        "{shown} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A server process, killed and reaped on drop.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub uri: String,
}

impl Server {
    /// Kills the server now (for fault tests).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id (to kill it from another thread).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_and_wait(mut cmd: Command, ready: impl Fn() -> bool, uri: String) -> Server {
    let shown = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {shown}: {e}"));
    let mut server = Server { child, uri };
    let start = Instant::now();
    while !ready() {
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!("{shown} exited early: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{shown} did not start listening within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

fn unix_ready(sock: &Path) -> impl Fn() -> bool + '_ {
    move || std::os::unix::net::UnixStream::connect(sock).is_ok()
}

/// Socket URI for `sock` and export `export`.
pub fn unix_uri(sock: &Path, export: &str) -> String {
    sparsekit_nbd::NbdUri::unix(sock, export).to_string()
}

/// `qemu-nbd --persistent -k SOCK ARGS...`, read-only unless args say otherwise.
pub fn start_qemu_nbd(sock: &Path, args: &[&str]) -> Server {
    let mut cmd = Command::new(qemu_nbd());
    cmd.args(["--persistent", "--shared=8"])
        .arg("-k")
        .arg(sock)
        .args(args);
    spawn_and_wait(cmd, unix_ready(sock), unix_uri(sock, ""))
}

/// `nbdkit -f --exit-with-parent -U SOCK ARGS...`.
pub fn start_nbdkit(sock: &Path, args: &[&str]) -> Server {
    let mut cmd = Command::new(nbdkit());
    cmd.args(["-f", "--exit-with-parent", "-U"])
        .arg(sock)
        .args(args);
    spawn_and_wait(cmd, unix_ready(sock), unix_uri(sock, ""))
}

/// `nbdkit` on 127.0.0.1 and a free TCP port.
pub fn start_nbdkit_tcp(args: &[&str]) -> Server {
    // The port is bound here and handed to nbdkit by socket activation
    // (fd 3, LISTEN_FDS=1, LISTEN_PID its own pid): picking a free port and
    // letting nbdkit bind it later raced with other tests' servers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"exec 3<&0 0</dev/null; LISTEN_FDS=1 LISTEN_PID=$$ exec "$0" "$@""#)
        .arg(nbdkit())
        .args(["-f", "--exit-with-parent"])
        .args(args);
    let child = cmd
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(listener)))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning nbdkit: {e}"));
    // Listening already: connections queue until nbdkit accepts them.
    Server {
        child,
        uri: format!("nbd://127.0.0.1:{port}/"),
    }
}

/// `nbdinfo --map[=CTX] --json URI`, neighbours with equal type merged.
pub fn nbdinfo_map(uri: &str, context: &str) -> Value {
    let out = run(Command::new(nbdinfo())
        .arg(format!("--map={context}"))
        .arg("--json")
        .arg(uri));
    let v: Value = serde_json::from_slice(&out.stdout).expect("nbdinfo prints JSON");
    merge(v, |a, b| a["type"] == b["type"])
}

/// `qemu-img map --output=json URI`, merged the way qemu-img merges.
pub fn qemu_img_map(uri: &str) -> Value {
    let out = run(Command::new(qemu_img())
        .args(["map", "--output=json", "-f", "raw"])
        .arg(uri));
    let v: Value = serde_json::from_slice(&out.stdout).expect("qemu-img prints JSON");
    merge(v, |a, b| {
        ["depth", "present", "zero", "data", "compressed"]
            .iter()
            .all(|k| a[k] == b[k])
            && match (a.get("offset"), b.get("offset")) {
                (None, None) => true,
                (Some(x), Some(y)) => {
                    x.as_u64().unwrap() + a["length"].as_u64().unwrap() == y.as_u64().unwrap()
                }
                _ => false,
            }
    })
}

/// Merges neighbouring JSON entries for which `same` holds (lengths add).
pub fn merge(v: Value, same: impl Fn(&Value, &Value) -> bool) -> Value {
    let mut out: Vec<Value> = Vec::new();
    for e in v.as_array().expect("a JSON array").iter().cloned() {
        if let Some(last) = out.last_mut()
            && same(last, &e)
        {
            let l = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
            last["length"] = l.into();
            continue;
        }
        out.push(e);
    }
    Value::Array(out)
}

/// The raw bytes of an image or export, via `qemu-img convert -O raw`.
pub fn convert_raw(dir: &Path, src: &str, format: &str) -> Vec<u8> {
    let out = dir.join("converted.raw");
    run(Command::new(qemu_img())
        .args(["convert", "-f", format, "-O", "raw", src])
        .arg(&out));
    std::fs::read(&out).unwrap()
}

/// Runs qemu-io commands on a qcow2 image.
pub fn qemu_io_cmds(image: &Path, cmds: &[&str]) {
    let mut cmd = Command::new(qemu_io());
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(image);
    run(&mut cmd);
}

/// One request as nbdkit's log filter records it.
#[derive(Debug)]
pub struct Logged {
    /// nbdkit's connection number, from 1.
    pub connection: u64,
    /// `Read`, `Write`, `Extents`, `Zero`, `Trim` or `Flush`.
    pub kind: String,
    /// Offset asked for.
    pub offset: u64,
    /// Length asked for.
    pub count: u64,
}

/// The requests in a log filter's file, in order, of the connections
/// opened after the first `skip` (those of the oracles run before).
pub fn requests(log: &Path, skip: u64) -> Vec<Logged> {
    let text = std::fs::read_to_string(log).unwrap();
    let hex = |line: &str, key: &str| {
        let at = line.find(key)? + key.len();
        let v = line[at..].split_whitespace().next()?;
        u64::from_str_radix(v.strip_prefix("0x")?, 16).ok()
    };
    text.lines()
        .filter(|l| !l.contains(" ...") || l.ends_with(" ..."))
        .filter_map(|l| {
            let mut words = l.split_whitespace().skip(3);
            let kind = words.next()?;
            if !matches!(
                kind,
                "Read" | "Write" | "Extents" | "Zero" | "Trim" | "Flush"
            ) {
                return None;
            }
            let connection = l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("connection="))?
                .parse()
                .ok()?;
            Some(Logged {
                connection,
                kind: kind.into(),
                offset: hex(l, "offset=").unwrap_or(0),
                count: hex(l, "count=").unwrap_or(0),
            })
        })
        .filter(|r| r.connection > skip)
        .collect()
}

/// How many connections the log has seen so far.
pub fn connections(log: &Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.split_whitespace()
        .filter_map(|w| w.strip_prefix("connection=")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// `nbdkit --filter=log ARGS... logfile=DIR/requests.log`: the log filter
/// first, so it records what the client sent.
pub fn nbdkit_logged(dir: &Path, args: &[&str]) -> (Server, PathBuf) {
    let log = dir.join("requests.log");
    let sock = dir.join("k.sock");
    let logfile = format!("logfile={}", log.display());
    let mut all = vec!["--filter=log"];
    all.extend_from_slice(args);
    all.push(&logfile);
    (start_nbdkit(&sock, &all), log)
}
