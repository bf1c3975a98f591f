//! Test support shared by the integration tests and xtask.
//!
//! - [`fixture`] returns the path of a fixture from `fixtures/manifest.toml`,
//!   generating it first if it is missing or its recipe changed (safe to call
//!   from parallel tests and processes).
//! - [`require`] finds an external tool or panics naming the Debian package
//!   that provides it: a test whose tool is missing fails, it never skips.
//! - [`qemu_img_map`] runs the oracle, `qemu-img map --output=json`, after
//!   dropping the file's cached pages, and [`canonical_map`] merges the
//!   neighbours of a qemu-img map that agree on every field, so that two maps
//!   can be compared as JSON values.
//! - [`Server`] runs qemu-nbd or nbdkit on a Unix socket ([`Server::start`])
//!   or a TCP port bound here ([`Server::start_tcp`]); [`make_certs`] makes
//!   the X.509 certificates of a TLS test with openssl, laid out as qemu
//!   and nbdkit read them.
//!
//! A test compares with its oracle; here, qemu-img's map of a file with
//! one run of data:
//!
//! ```
//! use std::os::unix::fs::FileExt;
//! use sparsekit_testkit::{canonical_map, qemu_img_map, require};
//!
//! assert!(require("qemu-img").is_file());
//! let dir = std::env::temp_dir().join(format!("testkit-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("disk.raw");
//! let f = std::fs::File::create(&path).unwrap();
//! f.set_len(1 << 20).unwrap();
//! f.write_all_at(&[1; 4096], 64 << 10).unwrap();
//! let map = canonical_map(&qemu_img_map(&path, "raw", &[]));
//! std::fs::remove_dir_all(&dir).unwrap();
//! // A hole, the 4 KiB of data, a hole.
//! assert_eq!(map.len(), 3, "{map:?}");
//! let data = &map[1];
//! assert_eq!(data["start"], 64 << 10);
//! assert_eq!(data["length"], 4096);
//! assert_eq!(data["data"], true);
//! ```

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::Value;

/// External tools and the Debian packages that provide them.
pub const TOOLS: &[(&str, &str)] = &[
    ("qemu-img", "qemu-utils"),
    ("qemu-io", "qemu-utils"),
    ("qemu-nbd", "qemu-utils"),
    ("nbdkit", "nbdkit"),
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("nbdfuse", "libnbd-bin"),
    ("filefrag", "e2fsprogs"),
    ("fallocate", "util-linux"),
    ("truncate", "coreutils"),
    ("losetup", "mount"),
    ("setpriv", "util-linux"),
    ("bmaptool", "bmap-tools"),
    ("python3", "python3"),
    ("strace", "strace"),
    ("cp", "coreutils"),
    ("cmp", "diffutils"),
    ("openssl", "openssl"),
    ("gzip", "gzip"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
    ("bzip2", "bzip2"),
    ("man", "man-db"),
    ("bash", "bash"),
    ("script", "bsdutils"),
];

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/testkit is two levels below the workspace root")
        .to_path_buf()
}

/// Where generated fixtures live (gitignored).
pub fn generated_dir() -> PathBuf {
    workspace_root().join("fixtures/generated")
}

/// A loop device over a file, detached when dropped: a real block device
/// for the tests (BLKGETSIZE64, BLKZEROOUT, O_EXCL).
#[derive(Debug)]
pub struct LoopDevice {
    /// The device, `/dev/loopN`.
    pub dev: PathBuf,
    losetup: PathBuf,
}

impl LoopDevice {
    /// Attaches a free loop device to `backing` (needs root and
    /// /dev/loop-control).
    pub fn over(backing: &Path) -> Self {
        let losetup = require("losetup");
        let out = Command::new(&losetup)
            .args(["--find", "--show"])
            .arg(backing)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup failed (needs root and /dev/loop-control): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        Self { dev, losetup }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new(&self.losetup)
            .arg("-d")
            .arg(&self.dev)
            .status();
    }
}

/// The path of `tool`, or a panic naming the Debian package to install.
pub fn require(tool: &str) -> PathBuf {
    match which(tool) {
        Some(p) => p,
        None => {
            let pkg = TOOLS
                .iter()
                .find(|(t, _)| *t == tool)
                .map_or("?", |(_, p)| p);
            panic!(
                "{tool} is not installed: install the Debian package {pkg} \
                 (`cargo xtask test` installs it)"
            )
        }
    }
}

/// The path of `tool` on PATH (or in /sbin, /usr/sbin), if any.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// One entry of fixtures/manifest.toml.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    /// File name under fixtures/generated.
    pub name: String,
    /// What it is for.
    pub about: String,
    /// Shell commands run in order with `{out}` replaced by the file being
    /// built and `{dir}` by the fixtures folder; a step starting with `@` is
    /// built in (see [`run_builtin`]).
    pub steps: Vec<String>,
    /// Other fixtures that must exist first (backing files).
    #[serde(default)]
    pub needs: Vec<String>,
    /// Extra files the steps write beside the fixture (external data files).
    #[serde(default)]
    pub also: Vec<String>,
    /// Made only for benchmarks (large).
    #[serde(default)]
    pub bench: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    fixture: Vec<Fixture>,
}

/// The fixtures of fixtures/manifest.toml, by name.
pub fn manifest() -> BTreeMap<String, Fixture> {
    let path = workspace_root().join("fixtures/manifest.toml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let m: Manifest = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = BTreeMap::new();
    for f in m.fixture {
        assert!(
            !f.name.contains('/') && !f.name.starts_with('.'),
            "fixture name {:?} must be a plain file name",
            f.name
        );
        let name = f.name.clone();
        assert!(
            out.insert(name.clone(), f).is_none(),
            "fixture {name} twice in manifest"
        );
    }
    out
}

static LOCAL: Mutex<()> = Mutex::new(());

/// The path of fixture `name`, generated first if needed.
pub fn fixture(name: &str) -> PathBuf {
    let m = manifest();
    let dir = generated_dir();
    fs::create_dir_all(&dir).unwrap();
    let _local = LOCAL.lock().unwrap_or_else(|e| e.into_inner());
    let lock = File::create(dir.join(".lock")).unwrap();
    let _flock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    ensure(&m, name, &dir, &mut Vec::new())
}

/// Generates every fixture (with `bench`, the benchmark ones too); returns
/// the names generated anew.
pub fn generate_all(bench: bool) -> Vec<String> {
    let m = manifest();
    let mut fresh = Vec::new();
    for f in m.values().filter(|f| bench || !f.bench) {
        if !is_current(f, &generated_dir()) {
            fresh.push(f.name.clone());
        }
        fixture(&f.name);
    }
    fresh
}

fn recipe_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.recipe"))
}

fn recipe(f: &Fixture) -> String {
    f.steps.join("\n")
}

fn is_current(f: &Fixture, dir: &Path) -> bool {
    dir.join(&f.name).exists()
        && fs::read_to_string(recipe_path(dir, &f.name)).is_ok_and(|r| r == recipe(f))
}

fn ensure(
    m: &BTreeMap<String, Fixture>,
    name: &str,
    dir: &Path,
    stack: &mut Vec<String>,
) -> PathBuf {
    let f = m
        .get(name)
        .unwrap_or_else(|| panic!("no fixture {name} in fixtures/manifest.toml"));
    assert!(
        !stack.contains(&f.name),
        "fixtures depend on each other in a loop: {stack:?}"
    );
    stack.push(f.name.clone());
    for n in &f.needs {
        ensure(m, n, dir, stack);
    }
    stack.pop();
    let out = dir.join(&f.name);
    if is_current(f, dir) {
        return out;
    }
    let tmp = dir.join(format!(".{}.tmp", f.name));
    let _ = fs::remove_file(&tmp);
    let _ = fs::remove_file(recipe_path(dir, &f.name));
    for step in &f.steps {
        let step = step
            .replace("{out}", tmp.to_str().unwrap())
            .replace("{dir}", dir.to_str().unwrap());
        if let Some(builtin) = step.strip_prefix('@') {
            run_builtin(builtin, &tmp).unwrap_or_else(|e| panic!("fixture {name}: {step}: {e}"));
            continue;
        }
        let first = step.split_whitespace().next().unwrap_or_default();
        require(first);
        let o = Command::new("sh").arg("-c").arg(&step).output().unwrap();
        assert!(
            o.status.success(),
            "fixture {name}: `{step}` failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    fs::rename(&tmp, &out).unwrap();
    fs::write(recipe_path(dir, &f.name), recipe(f)).unwrap();
    out
}

/// Built-in fixture steps, for layouts that would take thousands of tool
/// runs:
///
/// - `@stripes {out} OFFSET COUNT STRIDE LEN`: writes `COUNT` runs of `LEN`
///   non-zero bytes, one every `STRIDE` bytes from `OFFSET` (the file must
///   exist; it grows if needed). Each run is its own extent when the gaps
///   are at least one file-system block.
pub fn run_builtin(step: &str, tmp: &Path) -> Result<(), String> {
    let words: Vec<&str> = step.split_whitespace().collect();
    match words.as_slice() {
        ["stripes", path, offset, count, stride, len] => {
            let n = |s: &str| parse_size(s).ok_or_else(|| format!("bad number {s:?}"));
            let (offset, count, stride, len) = (n(offset)?, n(count)?, n(stride)?, n(len)?);
            assert_eq!(Path::new(path), tmp);
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| e.to_string())?;
            let buf: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
            for i in 0..count {
                f.write_all_at(&buf, offset + i * stride)
                    .map_err(|e| e.to_string())?;
            }
            f.sync_all().map_err(|e| e.to_string())
        }
        _ => Err("unknown built-in step".into()),
    }
}

/// `123`, `4k`, `16M`, `2G`, `1T` (binary units, as qemu-img takes them).
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'M') => (&s[..i], 20),
        (i, 'G') => (&s[..i], 30),
        (i, 'T') => (&s[..i], 40),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// A server process (qemu-nbd, nbdkit) listening on a Unix socket or a
/// TCP port; killed when dropped.
#[derive(Debug)]
pub struct Server {
    child: std::process::Child,
    /// The socket it listens on (empty for TCP).
    pub socket: PathBuf,
    /// The 127.0.0.1 port it listens on, for [`Server::start_tcp`].
    pub port: Option<u16>,
}

impl Server {
    /// Starts `tool args...` (which must be told to listen on `socket`)
    /// and waits up to 10 s for the socket to appear.
    pub fn start(tool: &str, args: &[&str], socket: &Path) -> Server {
        let exe = require(tool);
        // A socket left by an earlier server would look like this one
        // listening already.
        let _ = std::fs::remove_file(socket);
        let child = Command::new(exe)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {tool}: {e}"));
        let mut server = Server {
            child,
            socket: socket.to_owned(),
            port: None,
        };
        let t = std::time::Instant::now();
        // Listening, not only bound: connect until the server accepts.
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{tool} {args:?} exited before listening: {status}");
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "{tool} is not listening on {}",
                socket.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        server
    }

    /// Starts `tool args...` on a free port of 127.0.0.1, bound here and
    /// handed over by socket activation (fd 3, `LISTEN_FDS=1`,
    /// `LISTEN_PID` its own pid; qemu-nbd and nbdkit both take it when
    /// given no address): picking a free port for the server to bind later
    /// races with other tests' servers. Waits up to 10 s for the server's
    /// greeting on a first connection (qemu-nbd needs `--persistent` to
    /// serve the next one).
    pub fn start_tcp(tool: &str, args: &[&str]) -> Server {
        let exe = require(tool);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec 3<&0 0</dev/null; LISTEN_FDS=1 LISTEN_PID=$$ exec "$0" "$@""#)
            .arg(exe)
            .args(args)
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                listener,
            )))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {tool}: {e}"));
        let mut server = Server {
            child,
            socket: PathBuf::new(),
            port: Some(port),
        };
        // The port accepts at once (the kernel queues connections): wait
        // for the NBD greeting, so that a server that fails to start fails
        // here and not as a client's timeout.
        let greeting = (|| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
            let mut magic = [0u8; 8];
            std::io::Read::read_exact(&mut s, &mut magic)?;
            Ok::<_, std::io::Error>(magic)
        })();
        match greeting {
            Ok(magic) if &magic == b"NBDMAGIC" => server,
            r => {
                let status = server.child.try_wait();
                panic!("{tool} {args:?} does not greet on port {port}: {r:?}, exit {status:?}")
            }
        }
    }

    /// The URI of the default export: `nbd+unix:///?socket=PATH`, or
    /// `nbd://127.0.0.1:PORT/` for [`Server::start_tcp`].
    pub fn uri(&self) -> String {
        match self.port {
            Some(port) => format!("nbd://127.0.0.1:{port}/"),
            None => format!("nbd+unix:///?socket={}", self.socket.display()),
        }
    }

    /// The TLS URI of the default export with `tls-certificates=certs`:
    /// `nbds+unix://` or `nbds://`. `certs` must need no percent-encoding.
    pub fn tls_uri(&self, certs: &Path) -> String {
        let certs = certs.display();
        match self.port {
            Some(port) => format!("nbds://127.0.0.1:{port}/?tls-certificates={certs}"),
            None => format!(
                "nbds+unix:///?socket={}&tls-certificates={certs}",
                self.socket.display()
            ),
        }
    }

    /// Stops the server now (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The openssl configuration of [`make_certs`]: a CA, a server certificate
/// for `{names}`, a client certificate. Key usages as qemu's
/// own sanity check of its credentials wants them (crypto/tlscredsx509.c).
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = sparsekit test
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = {names}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

/// Makes a new CA and the certificates of one TLS test in `dir` (created
/// if needed), laid out as qemu's `tls-creds-x509,dir=` (both endpoints),
/// nbdkit's `--tls-certificates` and libnbd's `tls-certificates` read
/// them: `ca-cert.pem`, `server-cert.pem` and `server-key.pem` (names
/// `localhost` and `127.0.0.1`), `client-cert.pem` and `client-key.pem`;
/// the CA's key is kept beside them as `ca-key.pem`. ECDSA P-256 keys,
/// fast to make. Returns `dir`.
pub fn make_certs(dir: &Path) -> PathBuf {
    make_certs_named(dir, "DNS:localhost,IP:127.0.0.1")
}

/// [`make_certs`] with a server certificate for `names`, an openssl
/// `subjectAltName` list such as `DNS:nbd.example,IP:10.0.0.1`.
pub fn make_certs_named(dir: &Path, names: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let cnf = dir.join("openssl.cnf");
    fs::write(&cnf, OPENSSL_CNF.replace("{names}", names)).unwrap();
    let p = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let cnf = p("openssl.cnf");
    // A name of its own: a client given another test's CA must find no
    // issuer (UnknownIssuer), not an issuer whose signature fails.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let ca_name = format!("/CN=sparsekit test CA {}-{nanos}", std::process::id());
    for who in ["ca", "server", "client"] {
        run(
            "openssl",
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &p(&format!("{who}-key.pem")),
            ],
        );
    }
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-new",
            "-config",
            &cnf,
            "-extensions",
            "ca",
            "-subj",
            &ca_name,
            "-days",
            "3650",
            "-key",
            &p("ca-key.pem"),
            "-out",
            &p("ca-cert.pem"),
        ],
    );
    for (who, cn, serial) in [
        ("server", "localhost", "2"),
        ("client", "sparsekit test client", "3"),
    ] {
        let csr = p(&format!("{who}.csr"));
        run(
            "openssl",
            &[
                "req",
                "-new",
                "-config",
                &cnf,
                "-subj",
                &format!("/CN={cn}"),
                "-key",
                &p(&format!("{who}-key.pem")),
                "-out",
                &csr,
            ],
        );
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &p("ca-cert.pem"),
                "-CAkey",
                &p("ca-key.pem"),
                "-set_serial",
                serial,
                "-days",
                "3650",
                "-extfile",
                &cnf,
                "-extensions",
                who,
                "-out",
                &p(&format!("{who}-cert.pem")),
            ],
        );
        fs::remove_file(&csr).unwrap();
    }
    dir.to_owned()
}

/// Flushes and drops the file's cached pages, so that tools mapping with
/// SEEK_DATA (qemu-img) see unwritten extents as holes, as on disk.
pub fn drop_cache(path: &Path) {
    let f = File::open(path).unwrap();
    nix::unistd::fdatasync(&f).unwrap();
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
}

/// Runs `exe args...` as the unprivileged user nobody (uid and gid 65534)
/// with setpriv: root reads any file, so permission errors need another
/// user.
pub fn run_as_nobody(exe: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(require("setpriv"))
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", exe])
        .args(args)
        .output()
        .unwrap()
}

/// Runs `tool args...` and returns its standard output; panics with its
/// standard error if it fails.
pub fn run(tool: &str, args: &[&str]) -> String {
    let exe = require(tool);
    let o = Command::new(exe).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// `qemu-img map --output=json -f FORMAT [extra...] PATH`, after dropping the
/// file's cached pages.
pub fn qemu_img_map(path: &Path, format: &str, extra: &[&str]) -> Value {
    drop_cache(path);
    let mut args = vec!["map", "--output=json", "-f", format];
    args.extend_from_slice(extra);
    args.push(path.to_str().unwrap());
    serde_json::from_str(&run("qemu-img", &args)).unwrap()
}

/// A qemu-img map (JSON array) with neighbours merged where they agree on
/// every field: same depth, present, zero, data and compressed, and host
/// offsets that continue (or both absent).
pub fn canonical_map(v: &Value) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for e in v.as_array().expect("a JSON array") {
        if let Some(last) = out.last_mut()
            && mergeable(last, e)
        {
            let len = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
            last["length"] = len.into();
            continue;
        }
        out.push(e.clone());
    }
    out
}

fn mergeable(a: &Value, b: &Value) -> bool {
    let (Some(a_start), Some(a_len)) = (a["start"].as_u64(), a["length"].as_u64()) else {
        return false;
    };
    if a_start + a_len != b["start"].as_u64().unwrap_or(u64::MAX) || a_len == 0 {
        return false;
    }
    let same = |k: &str| a.get(k) == b.get(k);
    if !["depth", "present", "zero", "data", "compressed"]
        .iter()
        .all(|k| same(k))
    {
        return false;
    }
    match (a.get("offset"), b.get("offset")) {
        (None, None) => true,
        (Some(x), Some(y)) => x.as_u64().map(|x| x + a_len) == y.as_u64(),
        _ => false,
    }
}

/// splitmix64: a small, seedable generator, good enough to spread random
/// layouts in tests (a failure names its seed, which replays it).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_map_merges_only_agreeing_neighbours() {
        let v: Value = serde_json::from_str(
            r#"[{"start":0,"length":10,"depth":0,"present":true,"zero":true,"data":false,"compressed":false,"offset":0},
                {"start":10,"length":5,"depth":0,"present":true,"zero":true,"data":false,"compressed":false,"offset":10},
                {"start":15,"length":5,"depth":0,"present":true,"zero":true,"data":false,"compressed":false,"offset":99},
                {"start":20,"length":5,"depth":0,"present":true,"zero":false,"data":true,"compressed":false,"offset":104}]"#,
        )
        .unwrap();
        let c = canonical_map(&v);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0]["length"], 15);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("x"), None);
    }

    #[test]
    fn manifest_parses() {
        assert!(!manifest().is_empty());
    }
}
