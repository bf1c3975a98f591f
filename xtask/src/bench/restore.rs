//! Restore workloads (issue 19): `copy SOURCE NBD-URI` writing a local
//! image into an NBD export, against nbdcopy and `qemu-img convert -n`.
//!
//! - W1 (8 GiB raw, 2 GiB of data) into qemu-nbd serving a raw file;
//! - W3 (16 GiB qcow2, 3 GiB of data) into the same kind of export;
//! - W1 into nbdkit's memory plugin;
//! - W1 into qemu-nbd over TCP, with TLS against without.
//!
//! Every contender gets the same export in the same state: before each
//! run (untimed) the target file is created anew, sparse, and a new server
//! started on it (nbdkit memory starts empty); after the run the server is
//! killed and reaped and the file deleted, its folder synced. Recreating
//! costs a server start per run, and in return no run writes into the
//! blocks another run allocated (qemu-nbd turns WRITE_ZEROES into
//! `fallocate(ZERO_RANGE)`, so a reused target would start allocated for
//! some contenders and sparse for others), and no run pays for another's
//! dirty pages. A server is ready when it has sent its NBD greeting, so no
//! timed run waits for a server to start.
//!
//! Before timing, each contender runs once (which also warms the source's
//! pages: the timed runs read a cached source, as the warm copy workloads)
//! and the export is read back and compared with the source: a wrong answer
//! fails the bench.
//!
//! What each command sends is counted, not assumed: each runs once against
//! `nbdkit memory` behind the log filter, copying a small file, and its
//! connections, WRITE, WRITE_ZEROES and FLUSH requests are counted (the
//! *NBD requests* column). sparsekit always ends with FLUSH on an NBD
//! destination; the verdict therefore also compares it with the best peer
//! that flushes.

use std::cell::RefCell;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use sparsekit_testkit as testkit;

use super::{Contender, Hooks, Ratio, Stats, contender, measure, note, race_with, tool_version};
use crate::{display, output};

/// `--shared` for every qemu-nbd: more than one client makes qemu-nbd 10
/// advertise multi-conn on a writable export (it has no other switch for
/// it), the best configuration for the peers as for sparsekit.
const SHARED: &str = "--shared=16";

/// A server process; killed (SIGKILL) and reaped when dropped, so the
/// bench leaves none running, whatever fails.
struct Server {
    child: Child,
}

impl Server {
    /// Spawns `cmd` and waits up to 10 s for its NBD greeting at `at`.
    fn start(mut cmd: Command, at: &Listen) -> anyhow::Result<Server> {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let mut server = Server { child };
        let t = Instant::now();
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!("{cmd:?} exited before serving: {status}");
            }
            if greets(at) {
                return Ok(server);
            }
            ensure!(
                t.elapsed() < Duration::from_secs(10),
                "{cmd:?} sent no NBD greeting within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the server with SIGTERM (so that nbdkit's log filter writes
    /// its last lines) and reaps it.
    fn terminate(mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let t = Instant::now();
        while self.child.try_wait()?.is_none() {
            ensure!(
                t.elapsed() < Duration::from_secs(10),
                "the server did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a server at `at` accepts a connection and sends the NBD
/// greeting (`NBDMAGIC`): connecting alone is not enough, since a
/// listening socket queues connections before the server accepts them.
fn greets(at: &Listen) -> bool {
    let mut magic = [0u8; 8];
    let timeout = Some(Duration::from_secs(10));
    let read = match at {
        Listen::Unix(path) => UnixStream::connect(path).and_then(|mut s| {
            s.set_read_timeout(timeout)?;
            s.read_exact(&mut magic)
        }),
        Listen::Tcp(l) => l
            .local_addr()
            .and_then(TcpStream::connect)
            .and_then(|mut s| {
                s.set_read_timeout(timeout)?;
                s.read_exact(&mut magic)
            }),
    };
    read.is_ok() && &magic == b"NBDMAGIC"
}

/// Where a server listens.
enum Listen {
    /// A Unix socket the server creates (`-k`, `-U`).
    Unix(PathBuf),
    /// A TCP port on 127.0.0.1 bound by xtask and handed to each server by
    /// socket activation (fd 3, LISTEN_FDS=1, LISTEN_PID its own pid), as
    /// crates/nbd/tests do: the port stays ours between runs, so no other
    /// process can take it while the server restarts.
    Tcp(TcpListener),
}

/// An export a contender writes into, brought up fresh before each run.
struct Export {
    /// The server's program and arguments (without the listening socket
    /// when activated).
    argv: Vec<OsString>,
    listen: Listen,
    /// The raw file served, created sparse before each run; None for
    /// nbdkit memory.
    file: Option<PathBuf>,
    size: u64,
    uri: String,
}

impl Export {
    /// `qemu-nbd -f raw -t --shared=16 [TLS] -k SOCK FILE` on a Unix socket.
    fn qemu_nbd_unix(file: PathBuf, size: u64, socket: PathBuf) -> Self {
        let argv = ["qemu-nbd", "-f", "raw", "-t", SHARED, "-k"]
            .iter()
            .map(OsString::from)
            .chain([socket.clone().into(), file.clone().into()])
            .collect();
        Export {
            argv,
            uri: format!("nbd+unix:///?socket={}", socket.display()),
            listen: Listen::Unix(socket),
            file: Some(file),
            size,
        }
    }

    /// `qemu-nbd -f raw -t --shared=16 [TLS] FILE` on a TCP port of
    /// 127.0.0.1 (socket activation); with `tls`, the x509 credentials
    /// in that folder, and an `nbds://` URI naming them.
    fn qemu_nbd_tcp(file: PathBuf, size: u64, tls: Option<&Path>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding a TCP port")?;
        let port = listener.local_addr()?.port();
        let mut argv: Vec<OsString> = ["qemu-nbd", "-f", "raw", "-t", SHARED]
            .iter()
            .map(OsString::from)
            .collect();
        let uri = match tls {
            Some(dir) => {
                argv.push("--object".into());
                argv.push(
                    format!(
                        "tls-creds-x509,id=tls0,dir={},endpoint=server",
                        dir.display()
                    )
                    .into(),
                );
                argv.extend(["--tls-creds".into(), "tls0".into()]);
                format!(
                    "nbds://127.0.0.1:{port}/?tls-certificates={}",
                    dir.display()
                )
            }
            None => format!("nbd://127.0.0.1:{port}/"),
        };
        argv.push(file.clone().into());
        Ok(Export {
            argv,
            listen: Listen::Tcp(listener),
            file: Some(file),
            size,
            uri,
        })
    }

    /// `nbdkit -f -U SOCK memory SIZE`: data kept in nbdkit's memory.
    fn nbdkit_memory(size: u64, socket: PathBuf, filters: &[&str]) -> Self {
        let argv = ["nbdkit", "-f", "-U"]
            .iter()
            .map(OsString::from)
            .chain([socket.clone().into()])
            .chain(filters.iter().map(OsString::from))
            .chain(["memory".into(), size.to_string().into()])
            .collect();
        Export {
            argv,
            uri: format!("nbd+unix:///?socket={}", socket.display()),
            listen: Listen::Unix(socket),
            file: None,
            size,
        }
    }

    /// The server's command line, for the report.
    fn cmdline(&self) -> String {
        let mut words: Vec<String> = self.argv.iter().map(|a| display(Path::new(a))).collect();
        if let Listen::Tcp(l) = &self.listen {
            let port = l.local_addr().map_or(0, |a| a.port());
            let at = words.len() - 1;
            words.insert(at, format!("-b 127.0.0.1 -p {port} (socket-activated)"));
        }
        words.join(" ")
    }

    /// A new sparse target file (if any) and a new server on it.
    fn start(&self) -> anyhow::Result<Server> {
        if let Some(f) = &self.file {
            super::remove_and_sync(f)?;
            File::create(f)
                .and_then(|file| file.set_len(self.size))
                .with_context(|| format!("creating {}", f.display()))?;
        }
        let cmd = match &self.listen {
            Listen::Unix(sock) => {
                let _ = std::fs::remove_file(sock);
                let mut cmd = Command::new(&self.argv[0]);
                cmd.args(&self.argv[1..]);
                cmd
            }
            Listen::Tcp(l) => {
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(r#"exec 3<&0 0</dev/null; LISTEN_FDS=1 LISTEN_PID=$$ exec "$0" "$@""#)
                    .args(&self.argv)
                    .stdin(Stdio::from(std::os::fd::OwnedFd::from(l.try_clone()?)));
                cmd
            }
        };
        Server::start(cmd, &self.listen)
    }

    /// After a run: the server gone (dropped by the caller), the target
    /// file deleted and its folder synced.
    fn clean(&self) -> anyhow::Result<()> {
        if let Some(f) = &self.file {
            super::remove_and_sync(f)?;
        }
        if let Listen::Unix(sock) = &self.listen {
            let _ = std::fs::remove_file(sock);
        }
        Ok(())
    }
}

/// How a contender's time is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// sparsekit `copy` with its defaults: the 1.00× of the ratios.
    Sparsekit,
    /// Another way to run sparsekit `copy`.
    Variant,
    /// A peer: the verdict compares sparsekit with the best of these.
    Peer,
}

/// A contender of a restore workload.
struct Entry {
    role: Role,
    contender: Contender,
    /// Told the target reads as zeros already (`--dest-is-zero`,
    /// `--target-is-zero`), so it zeroes nothing.
    told_zero: bool,
    /// Which of the workload's exports it writes into.
    export: usize,
}

/// A restore source: a raw file, or a qcow2 image that nbdcopy reads
/// through qemu-nbd (its usual way to read qcow2, as in the W3 copies).
#[derive(Clone, Copy)]
enum Source<'a> {
    Raw(&'a Path),
    Qcow2(&'a Path),
}

impl Source<'_> {
    fn path(&self) -> &Path {
        match self {
            Source::Raw(p) | Source::Qcow2(p) => p,
        }
    }

    fn format(&self) -> &'static str {
        match self {
            Source::Raw(_) => "raw",
            Source::Qcow2(_) => "qcow2",
        }
    }

    /// nbdcopy's SOURCE arguments.
    fn nbdcopy_args(&self) -> Vec<OsString> {
        match self {
            Source::Raw(p) => vec![p.into()],
            Source::Qcow2(p) => ["[", "qemu-nbd", "-r", "-f", "qcow2"]
                .iter()
                .map(OsString::from)
                .chain([p.into(), "]".into()])
                .collect(),
        }
    }
}

/// The contenders of the single-export workloads, writing `src` into `uri`.
fn contenders(copy: &Path, src: Source<'_>, uri: &str) -> Vec<Entry> {
    let entry = |role, told_zero, label: &str, argv: Vec<OsString>| Entry {
        role,
        contender: Contender {
            label: label.into(),
            argv,
        },
        told_zero,
        export: 0,
    };
    let argv = |words: &[&dyn AsRef<std::ffi::OsStr>]| -> Vec<OsString> {
        words.iter().map(|w| w.as_ref().to_owned()).collect()
    };
    let path = src.path();
    let nbdcopy = |flags: &[&str]| -> Vec<OsString> {
        let mut v: Vec<OsString> = std::iter::once("nbdcopy")
            .chain(flags.iter().copied())
            .map(OsString::from)
            .collect();
        if matches!(src, Source::Qcow2(_)) {
            v.push("--".into());
        }
        v.extend(src.nbdcopy_args());
        v.push(uri.into());
        v
    };
    let convert = |flags: &[&str]| -> Vec<OsString> {
        ["qemu-img", "convert", "-n"]
            .iter()
            .chain(flags)
            .chain(&["-f", src.format(), "-O", "raw"])
            .map(OsString::from)
            .chain([path.into(), uri.into()])
            .collect()
    };
    vec![
        entry(
            Role::Sparsekit,
            false,
            "sparsekit copy",
            argv(&[&copy, &"--no-progress", &path, &uri]),
        ),
        entry(
            Role::Variant,
            true,
            "sparsekit copy --dest-is-zero",
            argv(&[&copy, &"--no-progress", &"--dest-is-zero", &path, &uri]),
        ),
        entry(Role::Peer, false, "nbdcopy", nbdcopy(&[])),
        entry(Role::Peer, false, "nbdcopy --flush", nbdcopy(&["--flush"])),
        entry(
            Role::Peer,
            false,
            "nbdcopy --flush --requests=16",
            nbdcopy(&["--flush", "--requests=16"]),
        ),
        entry(
            Role::Peer,
            true,
            "nbdcopy --flush --target-is-zero",
            nbdcopy(&["--flush", "--target-is-zero"]),
        ),
        entry(Role::Peer, false, "qemu-img convert -n", convert(&[])),
        entry(
            Role::Peer,
            false,
            "qemu-img convert -n -m 8 -W",
            convert(&["-m", "8", "-W"]),
        ),
        entry(
            Role::Peer,
            false,
            "qemu-img convert -n -m 16 -W",
            convert(&["-m", "16", "-W"]),
        ),
        entry(
            Role::Peer,
            true,
            "qemu-img convert -n -m 8 -W --target-is-zero",
            convert(&["-m", "8", "-W", "--target-is-zero"]),
        ),
    ]
}

/// The NBD requests one run sent, from nbdkit's log filter.
#[derive(Debug, Default, PartialEq, Eq)]
struct Requests {
    connections: usize,
    writes: usize,
    write_bytes: u64,
    zeroes: usize,
    fast_zeroes: usize,
    flushes: usize,
}

impl Requests {
    /// Counts the requests of a log filter's log (one line as a request
    /// starts, `connection=N Write id=.. offset=0x.. count=0x.. ...`, one
    /// as it ends, `...Write id=.. return=0`).
    fn parse(log: &str) -> Self {
        let mut r = Requests::default();
        for line in log.lines() {
            let Some((_, rest)) = line.split_once(" connection=") else {
                continue;
            };
            let mut words = rest.split_whitespace().skip(1);
            let (Some(what), Some(id)) = (words.next(), words.next()) else {
                continue;
            };
            if !id.starts_with("id=") && what != "Connect" {
                continue;
            }
            let field = |name: &str| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .map(str::to_owned)
            };
            match what {
                "Connect" => r.connections += 1,
                "Write" => {
                    r.writes += 1;
                    r.write_bytes += field("count=0x")
                        .and_then(|c| u64::from_str_radix(&c, 16).ok())
                        .unwrap_or(0);
                }
                "Zero" => {
                    r.zeroes += 1;
                    r.fast_zeroes += usize::from(field("fast=").as_deref() == Some("1"));
                }
                "Flush" => r.flushes += 1,
                _ => {}
            }
        }
        r
    }
}

impl std::fmt::Display for Requests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} conn., WRITE ×{}", self.connections, self.writes)?;
        if self.writes > 0 {
            write!(
                f,
                " ({} KiB each)",
                (self.write_bytes / self.writes as u64) >> 10
            )?;
        }
        write!(f, ", WRITE_ZEROES ×{}", self.zeroes)?;
        if self.fast_zeroes > 0 {
            write!(f, " ({} fast)", self.fast_zeroes)?;
        }
        write!(f, ", FLUSH ×{}", self.flushes)
    }
}

/// Runs each contender once into `nbdkit memory` behind the log filter,
/// copying a small raw file; what each sent, in the order of
/// [`contenders`].
fn probe(copy: &Path, scratch: &Scratch) -> anyhow::Result<Vec<Requests>> {
    let src = scratch.path("probe-src.raw");
    super::copy::write_strace_source(&src)?;
    let log = scratch.path("probe.log");
    let filter = format!("logfile={}", log.display());
    let export = Export::nbdkit_memory(
        std::fs::metadata(&src)?.len(),
        scratch.path("probe.sock"),
        &["--filter=log"],
    );
    let mut out = Vec::new();
    for e in contenders(copy, Source::Raw(&src), &export.uri) {
        let _ = std::fs::remove_file(&log);
        let mut argv = export.argv.clone();
        argv.push(filter.clone().into());
        let exp = Export {
            argv,
            ..export_like(&export)
        };
        let server = exp.start()?;
        measure(&e.contender.argv, Some(&scratch.path("stderr.txt")))
            .with_context(|| format!("probe of {}", e.contender.label))?;
        server.terminate()?;
        exp.clean()?;
        let text =
            std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
        out.push(Requests::parse(&text));
    }
    std::fs::remove_file(&src)?;
    let _ = std::fs::remove_file(&log);
    Ok(out)
}

/// A copy of a Unix-socket export's description (a TCP one owns its
/// listener and is not copied).
fn export_like(e: &Export) -> Export {
    let Listen::Unix(sock) = &e.listen else {
        unreachable!("only Unix-socket exports are copied")
    };
    Export {
        argv: e.argv.clone(),
        listen: Listen::Unix(sock.clone()),
        file: e.file.clone(),
        size: e.size,
        uri: e.uri.clone(),
    }
}

/// A folder of scratch files (targets, sockets, certificates), removed
/// when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        let dir = testkit::generated_dir().join(".bench-restore");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How an export is read back after a contender's check run.
enum Check<'a> {
    /// `qemu-img compare -f FORMAT -F raw SOURCE URI`, through the server.
    Compare(Source<'a>),
    /// The export's target file compared with this raw file.
    File(&'a Path),
}

impl Check<'_> {
    fn verify(&self, export: &Export, label: &str) -> anyhow::Result<()> {
        match self {
            Check::Compare(src) => {
                let o = Command::new("qemu-img")
                    .args(["compare", "-f", src.format(), "-F", "raw"])
                    .arg(src.path())
                    .arg(&export.uri)
                    .output()
                    .context("running qemu-img compare")?;
                ensure!(
                    o.status.success(),
                    "`{label}`: the export differs from {} (qemu-img compare, exit {}): {}; \
                     not timing a wrong answer",
                    display(src.path()),
                    o.status,
                    String::from_utf8_lossy(&o.stdout).trim()
                );
            }
            Check::File(raw) => {
                let target = export.file.as_ref().expect("a file-backed export");
                if let Some(at) = super::copy::first_difference(raw, target)? {
                    bail!(
                        "`{label}`: {} differs from {}: {at}; not timing a wrong answer",
                        display(target),
                        display(raw)
                    );
                }
            }
        }
        Ok(())
    }
}

/// One workload: contenders writing into exports brought up fresh for
/// every run.
struct Workload<'a> {
    what: &'a str,
    exports: Vec<Export>,
    entries: Vec<Entry>,
    check: Check<'a>,
}

/// Checks every contender once (its warm-up), then races them with fresh
/// exports around every run.
fn race(w: &Workload<'_>, runs: usize, log: &Path) -> anyhow::Result<Vec<Stats>> {
    super::empty_page_cache();
    for e in &w.entries {
        note(&format!("{}: checking {}", w.what, e.contender.label));
        let servers = w
            .exports
            .iter()
            .map(Export::start)
            .collect::<anyhow::Result<Vec<_>>>()?;
        measure(&e.contender.argv, Some(log))?;
        w.check.verify(&w.exports[e.export], &e.contender.label)?;
        drop(servers);
        for x in &w.exports {
            x.clean()?;
        }
    }
    let running: RefCell<Vec<Server>> = RefCell::new(Vec::new());
    let contenders: Vec<Contender> = w.entries.iter().map(|e| e.contender.clone()).collect();
    let stats = race_with(
        &contenders,
        runs,
        &mut Hooks {
            before: Some(Box::new(|| {
                for x in &w.exports {
                    running.borrow_mut().push(x.start()?);
                }
                Ok(())
            })),
            after: Some(Box::new(|| {
                running.borrow_mut().clear();
                for x in &w.exports {
                    x.clean()?;
                }
                Ok(())
            })),
            stderr_log: Some(log),
            progress: Some(w.what),
        },
    )?;
    Ok(stats)
}

/// A race's table, with what each command sent (from [`probe`]).
fn table(md: &mut String, stats: &[Stats], requests: Option<&[Requests]>) {
    let base = &stats[0];
    if requests.is_some() {
        md.push_str(
            "| command | NBD requests (probe) | median | min | peak RSS | time ÷ sparsekit's (paired) |\n\
             |---|---|---:|---:|---:|---:|\n",
        );
    } else {
        md.push_str(
            "| command | median | min | peak RSS | time ÷ sparsekit's (paired) |\n\
             |---|---:|---:|---:|---:|\n",
        );
    }
    for (i, s) in stats.iter().enumerate() {
        let sent = requests.map_or(String::new(), |r| format!(" {} |", r[i]));
        let _ = writeln!(
            md,
            "| {} (`{}`) |{sent} {:.3} s | {:.3} s | {:.1} MiB | {} |",
            s.label,
            s.cmdline,
            s.median,
            s.min,
            s.max_rss_kib as f64 / 1024.0,
            Ratio::of(s, base)
        );
    }
}

/// `peer` against `ours` (a sparsekit command), paired, with the word
/// that reads it.
fn against(peer: &Stats, ours: &Stats) -> String {
    let r = Ratio::of(peer, ours);
    let word = match r.median {
        m if (m - 1.0).abs() < 0.005 => "even",
        m if m > 1.0 => "sparsekit faster",
        _ => "sparsekit slower",
    };
    format!(
        "`{}` {:.2} s against {}, {:.2} s (medians): {r}, {word}",
        ours.label, ours.median, peer.label, peer.median
    )
}

/// Of the peers that `keep` selects, the one with the smallest paired
/// ratio to `sk`.
fn best<'s>(
    stats: &'s [Stats],
    entries: &[Entry],
    sk: &Stats,
    keep: impl Fn(usize) -> bool,
) -> Option<&'s Stats> {
    (0..stats.len())
        .filter(|&i| entries[i].role == Role::Peer && keep(i))
        .map(|i| &stats[i])
        .min_by(|a, b| Ratio::of(a, sk).median.total_cmp(&Ratio::of(b, sk).median))
}

/// The verdict lines of a single-export workload: sparsekit against the
/// best peer, against the best peer that flushes and zeroes as it does,
/// and `--dest-is-zero` against the best peer told the same.
fn verdict(md: &mut String, stats: &[Stats], entries: &[Entry], requests: &[Requests]) {
    let sk = &stats[0];
    let all = best(stats, entries, sk, |_| true).expect("every workload has peers");
    let _ = writeln!(md, "\n**Verdict**: {}.", against(all, sk));
    if let Some(p) = best(stats, entries, sk, |i| {
        requests[i].flushes > 0 && !entries[i].told_zero
    }) {
        let _ = writeln!(
            md,
            "Like for like (the peer also flushes and zeroes the target itself): {}.",
            against(p, sk)
        );
    }
    if let Some(v) =
        (0..stats.len()).find(|&i| entries[i].role == Role::Variant && entries[i].told_zero)
        && let Some(p) = best(stats, entries, &stats[v], |i| entries[i].told_zero)
    {
        let _ = writeln!(md, "Told the target is zero: {}.", against(p, &stats[v]));
    }
    md.push('\n');
}

/// The virtual size of a qcow2 image, from `qemu-img info`.
fn virtual_size(img: &Path) -> anyhow::Result<u64> {
    let text = output(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-f", "qcow2"])
            .arg(img),
    )?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v["virtual-size"]
        .as_u64()
        .context("qemu-img info printed no virtual-size")
}

pub(super) fn run(md: &mut String, bin: &Path, runs: usize) -> anyhow::Result<()> {
    let copy = bin.join("copy");
    let scratch = Scratch::new()?;
    let log = scratch.path("stderr.txt");
    let w1 = testkit::fixture("bench-copy-8g-2k.raw");
    let w3 = testkit::fixture("bench-w3.qcow2");
    let w1_size = std::fs::metadata(&w1)?.len();
    let w3_size = virtual_size(&w3)?;

    note("restore: what each command sends (nbdkit log filter)");
    let requests = probe(&copy, &scratch)?;

    let _ = writeln!(
        md,
        "## Restore: copy an image into an NBD export\n\n\
         `copy SOURCE NBD-URI` against nbdcopy and `qemu-img convert -n` writing the same \
         source into the same export. Before every run (untimed) the export is brought up \
         fresh: its target file created anew, sparse, of the source's virtual size, and a new \
         server started on it (nbdkit memory starts empty); after the run the server is \
         killed and the file deleted, so every contender writes into the same state and none \
         pays for another's blocks or dirty pages. A server counts as started once it has \
         sent its NBD greeting. qemu-nbd runs with `{SHARED}`: with more than one client \
         allowed, qemu-nbd 10 advertises multi-conn on a writable export (it has no other \
         switch for it), and the peers use it as sparsekit does. The source is warm (its \
         pages cached), as in the warm copy workloads. Before timing, each contender runs \
         once and the export is read back and compared with the source (a wrong answer fails \
         the bench).\n\n\
         *NBD requests (probe)* is counted, not assumed: each command ran once into `nbdkit \
         memory` behind the log filter copying {} (the same flags; for W3 nbdcopy's source is \
         then the file itself, not qemu-nbd). sparsekit always ends with FLUSH on an NBD \
         destination; `nbdcopy` sends none unless `--flush`. On qemu-nbd (cache=writeback, \
         its default) FLUSH is an fdatasync of the target, so the like-for-like verdict \
         compares sparsekit with the peers that flush. `--dest-is-zero` / `--target-is-zero` \
         tell the command the target already reads as zeros (true here: a new sparse file, \
         a new memory disk), so it sends no WRITE_ZEROES.\n\n\
         Versions: {}; {}; {}.\n",
        super::copy::STRACE_SOURCE,
        tool_version("qemu-nbd", "--version"),
        tool_version("nbdkit", "--version"),
        tool_version("nbdcopy", "--version"),
    );

    // W1 and W3 into qemu-nbd serving a raw file; W1 into nbdkit memory.
    let sock = scratch.path("nbd.sock");
    let target = scratch.path("target.raw");
    let single = [
        (
            "restore W1 into qemu-nbd",
            format!(
                "W1, `{}` (8 GiB raw, 2 GiB of data in 2,048 extents), into qemu-nbd serving a \
                 raw file",
                display(&w1)
            ),
            Source::Raw(&w1),
            Export::qemu_nbd_unix(target.clone(), w1_size, sock.clone()),
        ),
        (
            "restore W3 into qemu-nbd",
            format!(
                "W3, `{}` (16 GiB qcow2, 3 GiB of data), into qemu-nbd serving a raw file",
                display(&w3)
            ),
            Source::Qcow2(&w3),
            Export::qemu_nbd_unix(target.clone(), w3_size, sock.clone()),
        ),
        (
            "restore W1 into nbdkit memory",
            "W1 into nbdkit's memory plugin (FLUSH costs nothing there)".to_string(),
            Source::Raw(&w1),
            Export::nbdkit_memory(w1_size, sock.clone(), &[]),
        ),
    ];
    for (what, title, src, export) in single {
        let w = Workload {
            what,
            entries: contenders(&copy, src, &export.uri),
            exports: vec![export],
            check: Check::Compare(src),
        };
        let stats = race(&w, runs, &log)?;
        let _ = writeln!(
            md,
            "### {title}\n\nServer, started anew before every run: `{}`. Checked with \
             `qemu-img compare -f {} -F raw {} URI`.\n",
            w.exports[0].cmdline(),
            src.format(),
            display(src.path()),
        );
        table(md, &stats, Some(&requests));
        verdict(md, &stats, &w.entries, &requests);
    }

    tls(md, &copy, &scratch, &w1, w1_size, runs, &log)
}

/// W1 into qemu-nbd over TCP, with TLS (`nbds://`) against without, for
/// sparsekit and nbdcopy (which takes `tls-certificates` in the URI too).
fn tls(
    md: &mut String,
    copy: &Path,
    scratch: &Scratch,
    w1: &Path,
    size: u64,
    runs: usize,
    log: &Path,
) -> anyhow::Result<()> {
    let certs = scratch.path("tls");
    note("restore TLS: certificates (openssl)");
    testkit::make_certs(&certs);
    let exports = vec![
        Export::qemu_nbd_tcp(scratch.path("target-tls.raw"), size, Some(&certs))?,
        Export::qemu_nbd_tcp(scratch.path("target-plain.raw"), size, None)?,
    ];
    let (tls_uri, plain_uri) = (exports[0].uri.clone(), exports[1].uri.clone());
    let entry = |role, export, c: Contender| Entry {
        role,
        contender: c,
        told_zero: false,
        export,
    };
    let w = Workload {
        what: "restore W1 over TCP, TLS and plain",
        entries: vec![
            entry(
                Role::Sparsekit,
                0,
                contender(
                    "sparsekit copy, TLS",
                    &[&copy, &"--no-progress", &w1, &tls_uri],
                ),
            ),
            entry(
                Role::Variant,
                1,
                contender(
                    "sparsekit copy, plain",
                    &[&copy, &"--no-progress", &w1, &plain_uri],
                ),
            ),
            entry(
                Role::Peer,
                0,
                contender(
                    "nbdcopy --flush, TLS",
                    &[&"nbdcopy", &"--flush", &w1, &tls_uri],
                ),
            ),
            entry(
                Role::Peer,
                1,
                contender(
                    "nbdcopy --flush, plain",
                    &[&"nbdcopy", &"--flush", &w1, &plain_uri],
                ),
            ),
        ],
        exports,
        check: Check::File(w1),
    };
    let _ = writeln!(
        md,
        "### W1 into qemu-nbd over TCP: TLS against plain\n\n\
         Two servers, both started anew before every run, each on its own new sparse target \
         and its own port of 127.0.0.1 (bound by xtask and handed over by socket activation, \
         so no other process can take it between runs): `{}` and `{}`. Certificates made with \
         openssl for this run (testkit's `make_certs`: a CA, a server certificate for \
         IP:127.0.0.1 and DNS:localhost, a client certificate, ECDSA P-256; qemu-nbd \
         verifies the client). nbdcopy flushes as sparsekit \
         does. Checked by comparing each target file with the source.\n",
        w.exports[0].cmdline(),
        w.exports[1].cmdline(),
    );
    if !tls_supported(copy) {
        note("restore TLS: not measured: this build of copy refuses nbds:// URIs");
        let _ = writeln!(
            md,
            "Not measured: this build of `copy` refuses `nbds://` URIs (TLS not supported \
             yet).\n"
        );
        return Ok(());
    }
    let stats = race(&w, runs, log)?;
    table(md, &stats, None);
    let find = |label: &str| super::find(&stats, label);
    let _ = writeln!(
        md,
        "\n**TLS cost** (paired, TLS ÷ plain; goal below 1.5×): sparsekit {}; nbdcopy {}. \
         **Against nbdcopy over TLS**: {}.\n",
        Ratio::of(find("sparsekit copy, TLS"), find("sparsekit copy, plain")),
        Ratio::of(find("nbdcopy --flush, TLS"), find("nbdcopy --flush, plain")),
        against(find("nbdcopy --flush, TLS"), find("sparsekit copy, TLS")),
    );
    Ok(())
}

/// Whether `copy` accepts an `nbds://` URI at all: a refusal that names
/// TLS as unsupported, before connecting, says no.
fn tls_supported(copy: &Path) -> bool {
    let o = Command::new(copy)
        .args(["--no-progress", "nbds://127.0.0.1:9/", "/dev/null"])
        .output();
    o.is_ok_and(|o| {
        let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
        !(err.contains("tls") && err.contains("not supported"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_from_the_log_filter() {
        let log = "\
2026-12-02 12:43:31.814247 Ready thread_model=3
2026-12-02 12:43:32.340765 Preconnect id=1 readonly=0 ...
2026-12-02 12:43:32.344827 connection=1 Connect export=\"\" tls=0 size=0x8000000 write=1 flush=1
2026-12-02 12:43:32.345179 connection=2 Connect export=\"\" tls=0 size=0x8000000 write=1 flush=1
2026-12-02 12:43:32.346847 connection=1 Zero id=1 offset=0x0 count=0x8000000 trim=1 fua=0 fast=1 ...
2026-12-02 12:43:32.346868 connection=1 ...Zero id=1 return=0
2026-12-02 12:43:32.346900 connection=2 Write id=1 offset=0x0 count=0x40000 fua=0 ...
2026-12-02 12:43:32.346950 connection=2 ...Write id=1 return=0
2026-12-02 12:43:32.346960 connection=1 Write id=2 offset=0x40000 count=0x20000 fua=0 ...
2026-12-02 12:43:32.346970 connection=1 ...Write id=2 return=0
2026-12-02 12:43:32.533634 connection=2 Flush id=92 ...
2026-12-02 12:43:32.533639 connection=2 ...Flush id=92 return=0
2026-12-02 12:43:32.544694 connection=2 Disconnect transactions=92";
        let r = Requests::parse(log);
        assert_eq!(
            r,
            Requests {
                connections: 2,
                writes: 2,
                write_bytes: 0x60000,
                zeroes: 1,
                fast_zeroes: 1,
                flushes: 1
            }
        );
        assert_eq!(
            r.to_string(),
            "2 conn., WRITE ×2 (192 KiB each), WRITE_ZEROES ×1 (1 fast), FLUSH ×1"
        );
    }

    /// The TLS workload's servers, on a small target: the certificates
    /// satisfy qemu-nbd and libnbd, the socket-activated servers greet,
    /// restart on the same port, and a write lands in the target file.
    #[test]
    fn tcp_exports_serve_plain_and_tls_across_restarts() {
        let dir = std::env::temp_dir().join(format!("xtask-restore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let certs = dir.join("tls");
        testkit::make_certs(&certs);
        let src = dir.join("src.raw");
        let f = File::create(&src).unwrap();
        f.set_len(1 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"restored", 4096).unwrap();
        for tls in [Some(certs.as_path()), None] {
            let target = dir.join("target.raw");
            let export = Export::qemu_nbd_tcp(target.clone(), 1 << 20, tls).unwrap();
            assert_eq!(export.uri.starts_with("nbds://"), tls.is_some());
            for _ in 0..2 {
                let server = export.start().unwrap();
                let o = Command::new("nbdcopy")
                    .arg("--flush")
                    .arg(&src)
                    .arg(&export.uri)
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                assert_eq!(
                    super::super::copy::first_difference(&src, &target).unwrap(),
                    None
                );
                drop(server);
                export.clean().unwrap();
                assert!(!target.exists());
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn qcow2_sources_reach_nbdcopy_through_qemu_nbd() {
        let c = contenders(
            Path::new("/b/copy"),
            Source::Qcow2(Path::new("/f/w3.qcow2")),
            "nbd+unix:///?socket=/s",
        );
        let line = |label: &str| {
            let e = c.iter().find(|e| e.contender.label == label).unwrap();
            e.contender
                .argv
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            line("nbdcopy --flush"),
            "nbdcopy --flush -- [ qemu-nbd -r -f qcow2 /f/w3.qcow2 ] nbd+unix:///?socket=/s"
        );
        assert_eq!(
            line("qemu-img convert -n -m 8 -W"),
            "qemu-img convert -n -m 8 -W -f qcow2 -O raw /f/w3.qcow2 nbd+unix:///?socket=/s"
        );
        assert_eq!(c[0].role, Role::Sparsekit);
        assert_eq!(
            c.iter().filter(|e| e.told_zero).count(),
            3,
            "each told-zero peer has its sparsekit counterpart"
        );
    }
}
