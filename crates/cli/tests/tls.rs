//! `map` and `copy` reading NBD over TLS (`nbds://`, `nbds+unix://` with
//! `tls-certificates=DIR`) from qemu-nbd (`tls-creds-x509`) and nbdkit
//! (`--tls=require`), with nbdinfo, qemu-img and the same export served in
//! clear as oracles; and a wrong CA refused with the reason.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use sparsekit_testkit::{Server, canonical_map, fixture, make_certs, run};

fn bin(name: &str) -> &'static str {
    match name {
        "map" => env!("CARGO_BIN_EXE_map"),
        "copy" => env!("CARGO_BIN_EXE_copy"),
        _ => unreachable!(),
    }
}

fn sparsekit(tool: &str, args: &[&str]) -> Output {
    Command::new(bin(tool)).args(args).output().unwrap()
}

fn json(tool: &str, args: &[&str]) -> Value {
    let o = sparsekit(tool, args);
    assert!(
        o.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// qemu-nbd serving `image` read-only, with TLS from `certs` when given,
/// over a Unix socket in `dir` or a TCP port.
fn qemu_nbd(dir: &Path, image: &Path, certs: Option<&Path>, unix: bool) -> Server {
    let sock = dir.join(if certs.is_some() {
        "tls.sock"
    } else {
        "plain.sock"
    });
    let object =
        certs.map(|c| format!("tls-creds-x509,id=tls0,dir={},endpoint=server", c.display()));
    let mut args = vec!["-r", "-f", "qcow2", "--persistent", "--shared=16"];
    if let Some(o) = &object {
        args.extend(["--object", o, "--tls-creds", "tls0"]);
    }
    if unix {
        args.extend(["-k", sock.to_str().unwrap()]);
    }
    args.push(image.to_str().unwrap());
    if unix {
        Server::start("qemu-nbd", &args, &sock)
    } else {
        Server::start_tcp("qemu-nbd", &args)
    }
}

fn nbdkit_tls(dir: &Path, certs: &Path) -> Server {
    let sock = dir.join("nbdkit.sock");
    let c = format!("--tls-certificates={}", certs.display());
    Server::start(
        "nbdkit",
        &[
            "-f",
            "--exit-with-parent",
            "-U",
            sock.to_str().unwrap(),
            "--tls=require",
            &c,
            "data",
            "data=1 2 3 @1048576 4 5 6 @33554432 7 @67108863 9",
        ],
        &sock,
    )
}

/// `copy SOURCE out` with `args`, whose bytes must be `expect`.
fn assert_copy(source: &str, dir: &Path, args: &[&str], expect: &[u8]) {
    let out = dir.join("ours.raw");
    let mut a = args.to_vec();
    a.extend([source, out.to_str().unwrap()]);
    let o = sparsekit("copy", &a);
    assert!(
        o.status.success(),
        "copy {a:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        std::fs::read(&out).unwrap() == expect,
        "copy {a:?}: bytes differ"
    );
    std::fs::remove_file(out).unwrap();
}

#[test]
fn map_and_copy_over_tls_from_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(&dir.path().join("certs"));
    let image = fixture("v3.qcow2");
    let plain = qemu_nbd(dir.path(), &image, None, true);
    let plain_uri = plain.uri();
    let qemu_map: Value = serde_json::from_str(&run(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &plain_uri],
    ))
    .unwrap();
    let converted = dir.path().join("qemu.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &plain_uri,
            converted.to_str().unwrap(),
        ],
    );
    let bytes = std::fs::read(&converted).unwrap();

    for unix in [false, true] {
        let server = qemu_nbd(dir.path(), &image, Some(&certs), unix);
        let uri = server.tls_uri(&certs);
        assert_eq!(
            canonical_map(&json("map", &["--json", &uri])),
            canonical_map(&qemu_map),
            "{uri}"
        );
        // nbdinfo takes the same URI, tls-certificates and all.
        let theirs: Value =
            serde_json::from_str(&run("nbdinfo", &["--map", "--json", &uri])).unwrap();
        assert_eq!(
            json("map", &["--context", "base:allocation", "--json", &uri]),
            theirs,
            "{uri}"
        );
        assert_copy(&uri, dir.path(), &[], &bytes);
        assert_copy(&uri, dir.path(), &["-j", "1", "--verify"], &bytes);
    }
}

#[test]
fn map_and_copy_over_tls_from_nbdkit() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(&dir.path().join("certs"));
    let server = nbdkit_tls(dir.path(), &certs);
    let uri = server.tls_uri(&certs);
    let theirs: Value = serde_json::from_str(&run("nbdinfo", &["--map", "--json", &uri])).unwrap();
    assert_eq!(
        json("map", &["--context", "base:allocation", "--json", &uri]),
        theirs
    );
    let mut expect = vec![0u8; 64 << 20];
    expect[..3].copy_from_slice(&[1, 2, 3]);
    expect[1 << 20..(1 << 20) + 3].copy_from_slice(&[4, 5, 6]);
    expect[32 << 20] = 7;
    expect[(64 << 20) - 1] = 9;
    assert_copy(&uri, dir.path(), &["--verify"], &expect);
}

#[test]
fn refusals_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(&dir.path().join("certs"));
    let other = make_certs(&dir.path().join("other"));
    let server = qemu_nbd(dir.path(), &fixture("v3.qcow2"), Some(&certs), false);

    // A CA that did not sign the server's certificate.
    let uri = server.tls_uri(&other);
    for (tool, extra) in [("map", None), ("copy", Some(dir.path().join("out.raw")))] {
        let mut args = vec![uri.as_str()];
        if let Some(out) = &extra {
            args.push(out.to_str().unwrap());
        }
        let o = sparsekit(tool, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{tool}: {err}");
        assert!(
            err.contains(&format!(
                "{uri}: TLS handshake failed: invalid peer certificate: UnknownIssuer"
            )),
            "{tool}: {err}"
        );
        if let Some(out) = extra {
            assert!(!out.exists(), "copy created DEST");
        }
    }

    // A URI without TLS for a server that requires it.
    let o = sparsekit("map", &[&server.uri()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("the server requires TLS") && err.contains("nbds:// or nbds+unix://"),
        "{err}"
    );

    // A pre-shared key: refused, saying what to use instead.
    let o = sparsekit(
        "map",
        &[&format!(
            "{}&tls-psk-file=/keys.psk",
            server.tls_uri(&certs)
        )],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("rustls") && err.contains("use X.509 certificates"),
        "{err}"
    );
}

/// `copy` into exports served over TLS: qemu-nbd (raw target, TCP, with
/// the certificates given by `--tls-certificates`) and nbdkit
/// `--tls=require` (memory, Unix socket, certificates in the URI), from a
/// qcow2 image and from a TLS source (nbds to nbds). The export then reads
/// as `qemu-img convert` of the source. A wrong CA is refused before
/// anything is written.
#[test]
fn copy_into_exports_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = make_certs(&d.join("certs"));
    let c = certs.to_str().unwrap();
    let src = fixture("chain-top.qcow2");
    let want = d.join("want.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            src.to_str().unwrap(),
            want.to_str().unwrap(),
        ],
    );
    let want = std::fs::read(&want).unwrap();
    let read_back = |uri: &str| {
        let out = d.join("back.raw");
        let _ = std::fs::remove_file(&out);
        let o = Command::new(sparsekit_testkit::require("nbdcopy"))
            .args([uri, out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "nbdcopy: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::read(out).unwrap()
    };

    // qemu-nbd over TCP into a raw file of random bytes.
    let target = d.join("target.raw");
    let noise: Vec<u8> = (0..want.len()).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&target, &noise).unwrap();
    let object = format!("tls-creds-x509,id=tls0,dir={c},endpoint=server");
    let server = Server::start_tcp(
        "qemu-nbd",
        &[
            "-f",
            "raw",
            "--persistent",
            "--shared=8",
            "--object",
            &object,
            "--tls-creds",
            "tls0",
            target.to_str().unwrap(),
        ],
    );
    let tls = server.tls_uri(&certs);
    let bare = tls.split('?').next().unwrap().to_owned();
    let o = sparsekit(
        "copy",
        &["--tls-certificates", c, src.to_str().unwrap(), &bare],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    drop(server);
    assert!(
        std::fs::read(&target).unwrap() == want,
        "qemu-nbd target differs"
    );

    // nbdkit --tls=require over a Unix socket, the certificates in the URI,
    // from a TLS source.
    let source = qemu_nbd(d, &src, Some(&certs), true);
    let sock = d.join("dest.sock");
    let kit = Server::start(
        "nbdkit",
        &[
            "-f",
            "--exit-with-parent",
            "-U",
            sock.to_str().unwrap(),
            "--tls=require",
            &format!("--tls-certificates={c}"),
            "memory",
            &want.len().to_string(),
        ],
        &sock,
    );
    let dest = kit.tls_uri(&certs);
    let o = sparsekit("copy", &["--verify", &source.tls_uri(&certs), &dest]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(read_back(&dest) == want, "nbdkit target differs");

    // A wrong CA: refused in the handshake, nothing written.
    std::fs::write(&target, &noise).unwrap();
    let other = make_certs(&d.join("other"));
    let server = Server::start_tcp(
        "qemu-nbd",
        &[
            "-f",
            "raw",
            "--persistent",
            "--object",
            &object,
            "--tls-creds",
            "tls0",
            target.to_str().unwrap(),
        ],
    );
    let o = sparsekit("copy", &[src.to_str().unwrap(), &server.tls_uri(&other)]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("TLS handshake failed") && e.contains("UnknownIssuer"),
        "{e}"
    );
    drop(server);
    assert!(
        std::fs::read(&target).unwrap() == noise,
        "a refused copy wrote"
    );

    // A plain URI to a server that requires TLS says so.
    let o = sparsekit("copy", &[src.to_str().unwrap(), &server_plain_uri(&sock)]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("requires TLS"), "{e}");
    drop(kit);
}

fn server_plain_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}
