//! The client over TLS against real servers: qemu-nbd with
//! `tls-creds-x509` (which also asks for the client's certificate) and
//! nbdkit `--tls=require`, over TCP and Unix sockets, with certificates
//! made by openssl; and every refusal, with the message it gives.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sparsekit_nbd::{
    Client, ClientConfig, Error, HandshakeError, Kind, NbdUri, TlsConfigError, ZeroFlags,
};
use sparsekit_testkit::{Server, make_certs, make_certs_named, run};

const MIB: u64 = 1024 * 1024;

fn config() -> ClientConfig {
    ClientConfig {
        timeout: Some(Duration::from_secs(20)),
        ..ClientConfig::default()
    }
}

fn try_connect(uri: &str, config: &ClientConfig) -> Result<Client, Error> {
    Client::connect_with(&NbdUri::parse(uri).unwrap(), config)
}

fn connect(uri: &str) -> Client {
    try_connect(uri, &config()).unwrap_or_else(|e| panic!("{}", chain(&e)))
}

/// An error and its causes, as the binaries print them (`{:#}`).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A 16 MiB raw image: data at 1 MiB and 9 MiB, holes elsewhere.
fn image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("disk.raw");
    let mut bytes = vec![0u8; 16 * MIB as usize];
    for (at, b) in [(MIB, 0x11u8), (9 * MIB, 0x22)] {
        bytes[at as usize..(at + 256 * 1024) as usize].fill(b);
    }
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    for at in [MIB, 9 * MIB] {
        std::os::unix::fs::FileExt::write_all_at(
            &f,
            &bytes[at as usize..(at + 256 * 1024) as usize],
            at,
        )
        .unwrap();
    }
    (path, bytes)
}

fn qemu_nbd_args<'a>(certs: &'a str, file: &'a str) -> Vec<String> {
    [
        "--persistent",
        "--shared=8",
        "-f",
        "raw",
        "--object",
        &format!("tls-creds-x509,id=tls0,dir={certs},endpoint=server"),
        "--tls-creds",
        "tls0",
        file,
    ]
    .map(String::from)
    .to_vec()
}

/// qemu-nbd serving `file` with TLS over Unix (`unix`) or TCP.
fn qemu_nbd_tls(dir: &Path, certs: &Path, file: &Path, unix: bool) -> Server {
    let args = qemu_nbd_args(certs.to_str().unwrap(), file.to_str().unwrap());
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    if unix {
        let sock = dir.join("q.sock");
        a.splice(0..0, ["-k", sock.to_str().unwrap()]);
        Server::start("qemu-nbd", &a, &sock)
    } else {
        Server::start_tcp("qemu-nbd", &a)
    }
}

fn nbdkit(dir: &Path, args: &[&str], unix: bool) -> Server {
    let mut a = vec!["-f", "--exit-with-parent"];
    a.extend_from_slice(args);
    if unix {
        let sock = dir.join("k.sock");
        let mut u = vec!["-U", sock.to_str().unwrap()];
        u.extend(a);
        Server::start("nbdkit", &u, &sock)
    } else {
        Server::start_tcp("nbdkit", &a)
    }
}

fn nbdkit_tls(dir: &Path, certs: &Path, unix: bool) -> Server {
    let c = format!("--tls-certificates={}", certs.display());
    nbdkit(dir, &["--tls=require", &c, "memory", "64M"], unix)
}

/// Reads, block status and writes over `c`, which must be TLS; `expect`
/// is the export's first bytes.
fn exercise(c: &mut Client, expect: &[u8]) {
    assert!(c.is_tls() && c.negotiated().tls, "{}", c.uri());
    let mut buf = vec![0u8; expect.len()];
    c.read(0, &mut buf).unwrap();
    assert!(buf == expect, "{}: read differs", c.uri());
    let size = c.size();
    let map: Vec<_> = c.map(0..size).unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(map.first().unwrap().offset, 0);
    assert_eq!(map.last().map(|e| e.offset + e.length), Some(size));

    // A write, several requests in flight, read back.
    let data: Vec<u8> = (0..2 * MIB).map(|i| (i % 251) as u8).collect();
    c.write(4 * MIB, &data).unwrap();
    c.write_zeroes(7 * MIB, MIB, ZeroFlags::default()).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(4 * MIB, &mut back).unwrap();
    assert!(back == data, "{}: written data read back differs", c.uri());
    let map: Vec<_> = c
        .map(4 * MIB..6 * MIB)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(map.iter().all(|e| e.kind == Kind::Data), "{map:?}");
}

#[test]
fn qemu_nbd_over_tcp_and_unix() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(&dir.path().join("certs"));
    let (file, bytes) = image(dir.path());
    for unix in [false, true] {
        let server = qemu_nbd_tls(dir.path(), &certs, &file, unix);
        let uri = server.tls_uri(&certs);
        let mut c = connect(&uri);
        assert_eq!(c.size(), 16 * MIB);
        // Block status over TLS: the holes are holes.
        let map: Vec<_> = c
            .map(0..c.size())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let data: u64 = map
            .iter()
            .filter(|e| e.kind == Kind::Data)
            .map(|e| e.length)
            .sum();
        assert!(data < 4 * MIB, "{uri}: {map:?}");
        exercise(&mut c, &bytes[..2 * MIB as usize]);
        c.close().unwrap();
    }
}

#[test]
fn nbdkit_over_tcp_and_unix_with_multi_conn() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(&dir.path().join("certs"));
    for unix in [false, true] {
        let server = nbdkit_tls(dir.path(), &certs, unix);
        let uri = server.tls_uri(&certs);
        let mut c = connect(&uri);
        exercise(&mut c, &vec![0u8; MIB as usize]);
        drop(c);
        // Certificates read once, four TLS sessions (memory is multi-conn).
        let all = Client::connect_multi(&NbdUri::parse(&uri).unwrap(), &config(), 4).unwrap();
        assert_eq!(all.len(), 4);
        for mut c in all {
            assert!(c.is_tls());
            let mut b = vec![0u8; 4096];
            c.read(4 * MIB, &mut b).unwrap();
            assert_eq!(b[1], 1, "{uri}: the first client's write");
        }
    }
}

#[test]
fn a_wrong_ca_fails_the_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(&dir.path().join("certs"));
    let other = make_certs(&dir.path().join("other"));
    let (file, _) = image(dir.path());
    let q = qemu_nbd_tls(dir.path(), &certs, &file, false);
    let k = nbdkit_tls(dir.path(), &certs, true);
    for server in [&q, &k] {
        let uri = server.tls_uri(&other);
        let e = try_connect(&uri, &config()).unwrap_err();
        assert!(matches!(e, Error::TlsHandshake { .. }), "{e:?}");
        assert_eq!(
            e.rustls(),
            Some(&rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer
            ))
        );
        let shown = NbdUri::parse(&uri).unwrap().to_string();
        assert_eq!(
            chain(&e),
            format!("{shown}: TLS handshake failed: invalid peer certificate: UnknownIssuer")
        );
    }
    // With no certificates folder at all, the system's CAs (the fall-back
    // when libnbd's default folders are absent, as here) do not know ours.
    let bare = format!("nbds://127.0.0.1:{}/", q.port.unwrap());
    let e = try_connect(&bare, &config()).unwrap_err();
    assert!(
        matches!(e.rustls(), Some(rustls::Error::InvalidCertificate(_))),
        "{}",
        chain(&e)
    );
}

#[test]
fn tls_verify_peer_0_accepts_a_wrong_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(&dir.path().join("certs"));
    let other = make_certs(&dir.path().join("other"));
    // nbdkit asks for no client certificate (qemu-nbd would refuse ours,
    // signed by the other CA).
    let server = nbdkit_tls(dir.path(), &certs, false);
    let uri = format!("{}&tls-verify-peer=0", server.tls_uri(&other));
    let mut c = connect(&uri);
    assert!(c.is_tls());
    let mut b = [1u8; 512];
    c.read(0, &mut b).unwrap();
    assert_eq!(b, [0u8; 512]);
    // The same URI verifying: refused.
    let uri = format!("{}&tls-verify-peer=1", server.tls_uri(&other));
    assert!(matches!(
        try_connect(&uri, &config()),
        Err(Error::TlsHandshake { .. })
    ));
}

#[test]
fn tls_hostname_is_the_name_checked() {
    let dir = tempfile::tempdir().unwrap();
    // A server certificate for another name than localhost and 127.0.0.1.
    let certs = make_certs_named(&dir.path().join("certs"), "DNS:nbd.example");
    let tcp = nbdkit_tls(dir.path(), &certs, false);
    let unix = nbdkit_tls(dir.path(), &certs, true);
    for server in [&tcp, &unix] {
        connect(&format!(
            "{}&tls-hostname=nbd.example",
            server.tls_uri(&certs)
        ));
        let uri = format!("{}&tls-hostname=localhost", server.tls_uri(&certs));
        let e = try_connect(&uri, &config()).unwrap_err();
        assert!(
            matches!(
                e.rustls(),
                Some(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                        | rustls::CertificateError::NotValidForNameContext { .. }
                ))
            ),
            "{}",
            chain(&e)
        );
        assert!(
            chain(&e).contains("tls-hostname=localhost"),
            "{}",
            chain(&e)
        );
    }
    // Without tls-hostname, TCP checks the URI's host...
    let e = try_connect(&tcp.tls_uri(&certs), &config()).unwrap_err();
    assert!(e.rustls().is_some(), "{}", chain(&e));
    // ...and a Unix socket, which has none, the chain only (the CA must
    // still be right: see a_wrong_ca_fails_the_tls_handshake).
    assert!(connect(&unix.tls_uri(&certs)).is_tls());
}

#[test]
fn a_server_without_tls_is_refused_for_nbds() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(&dir.path().join("certs"));
    let (file, _) = image(dir.path());
    let sock = dir.path().join("plain.sock");
    let plain_qemu = Server::start(
        "qemu-nbd",
        &[
            "--persistent",
            "-k",
            sock.to_str().unwrap(),
            "-f",
            "raw",
            file.to_str().unwrap(),
        ],
        &sock,
    );
    let plain_kit = nbdkit(dir.path(), &["--tls=off", "memory", "1M"], false);
    for server in [&plain_qemu, &plain_kit] {
        let uri = server.tls_uri(&certs);
        let e = try_connect(&uri, &config()).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Handshake {
                    source: HandshakeError::TlsUnsupported { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        let m = chain(&e);
        assert!(
            m.contains("the server does not support TLS, which the URI requires")
                && m.contains("NBD_OPT_STARTTLS"),
            "{m}"
        );
        // nbd:// with TLS parameters: TLS if offered, else in clear.
        let uri = server.uri();
        let sep = if uri.contains('?') { '&' } else { '?' };
        let opportunistic = format!("{uri}{sep}tls-certificates={}", certs.display());
        let c = connect(&opportunistic);
        assert!(!c.is_tls(), "{opportunistic}");
    }
    // ...and with a TLS server, TLS.
    let tls = nbdkit_tls(dir.path(), &certs, false);
    let c = connect(&format!(
        "{}?tls-certificates={}",
        tls.uri(),
        certs.display()
    ));
    assert!(c.is_tls());
}

#[test]
fn a_plain_uri_is_told_the_server_requires_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(&dir.path().join("certs"));
    for unix in [false, true] {
        let server = nbdkit_tls(dir.path(), &certs, unix);
        let e = try_connect(&server.uri(), &config()).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Handshake {
                    source: HandshakeError::TlsRequired { .. },
                    ..
                }
            ),
            "{e:?}"
        );
        let m = chain(&e);
        assert!(
            m.contains("the server requires TLS")
                && m.contains("use an nbds:// or nbds+unix:// URI"),
            "{m}"
        );
    }
}

#[test]
fn the_certificates_folder_of_the_caller_and_of_the_uri() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(&dir.path().join("certs"));
    let other = make_certs(&dir.path().join("other"));
    let (file, _) = image(dir.path());
    let server = qemu_nbd_tls(dir.path(), &certs, &file, true);
    let bare = format!("nbds+unix:///?socket={}", server.socket.display());
    // The caller's folder when the URI has none...
    let with = ClientConfig {
        tls_certificates: Some(certs.clone()),
        ..config()
    };
    assert!(try_connect(&bare, &with).unwrap().is_tls());
    // ...but the URI's own wins.
    let e = try_connect(&server.tls_uri(&other), &with).unwrap_err();
    assert!(e.rustls().is_some(), "{}", chain(&e));
    let right = ClientConfig {
        tls_certificates: Some(other.clone()),
        ..config()
    };
    assert!(
        try_connect(&server.tls_uri(&certs), &right)
            .unwrap()
            .is_tls()
    );

    // qemu-nbd asks for a client certificate: without one, refused.
    let ca_only = dir.path().join("ca-only");
    std::fs::create_dir(&ca_only).unwrap();
    std::fs::copy(certs.join("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    let e = try_connect(&server.tls_uri(&ca_only), &config()).unwrap_err();
    assert!(matches!(e, Error::Closed { .. }), "{}", chain(&e));
    assert!(
        chain(&e).contains(
            "just after the TLS handshake (a server that refuses the client's certificate"
        ),
        "{}",
        chain(&e)
    );

    // Files missing or broken are named, before anything is sent.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = try_connect(&server.tls_uri(&empty), &config()).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Tls { source, .. }
                if matches!(&**source, TlsConfigError::Read { path, .. } if *path == empty.join("ca-cert.pem"))
        ),
        "{e:?}"
    );
    let m = chain(&e);
    assert!(
        m.contains(&format!("reading {}/ca-cert.pem", empty.display())),
        "{m}"
    );
    std::fs::write(empty.join("ca-cert.pem"), "-----BEGIN CERTIFICATE-----\n").unwrap();
    let m = chain(&try_connect(&server.tls_uri(&empty), &config()).unwrap_err());
    assert!(m.contains("ca-cert.pem: invalid PEM"), "{m}");
    std::fs::copy(certs.join("ca-cert.pem"), empty.join("ca-cert.pem")).unwrap();
    std::fs::copy(certs.join("client-cert.pem"), empty.join("client-cert.pem")).unwrap();
    std::fs::write(empty.join("client-key.pem"), "not a key\n").unwrap();
    let m = chain(&try_connect(&server.tls_uri(&empty), &config()).unwrap_err());
    assert!(m.contains("client-key.pem: no PEM private key"), "{m}");
}

#[test]
fn nbdinfo_reads_the_same_uris() {
    // The oracle takes the very URI syntax we take (libnbd's parameters).
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(&dir.path().join("certs"));
    let (file, _) = image(dir.path());
    let server = qemu_nbd_tls(dir.path(), &certs, &file, false);
    let out = run("nbdinfo", &["--size", &server.tls_uri(&certs)]);
    assert_eq!(out.trim(), (16 * MIB).to_string());
}
