//! TLS for NBD connections: the rustls client configuration a URI asks
//! for. The socket side (the upgrade after `NBD_OPT_STARTTLS`) is in
//! [`crate::client`]; this module reads certificate files and builds the
//! verifier, and opens no socket.
//!
//! Certificates, as qemu and libnbd lay them out in a folder: `ca-cert.pem`
//! (the CAs the server's certificate must chain to), and optionally
//! `client-cert.pem` with `client-key.pem` (for servers that ask for a
//! client certificate, as qemu-nbd's `tls-creds-x509` does by default).
//! The folder is, first found:
//!
//! 1. the URI's `tls-certificates=DIR`;
//! 2. [`ClientConfig::tls_certificates`](crate::ClientConfig::tls_certificates),
//!    a program's command-line default (qemu-img's
//!    `--object tls-creds-x509,dir=DIR` is the analogue);
//! 3. libnbd's default folders ([`default_dirs`]): for root
//!    `/etc/pki/libnbd`, for other users `$HOME/.pki/libnbd` then
//!    `$HOME/.config/pki/libnbd`, the first that holds a `ca-cert.pem`;
//! 4. else the system's CA bundle, [`SYSTEM_CA_BUNDLE`], as libnbd falls
//!    back to the system's trusted CAs (no client certificate then).
//!
//! A folder given by 1 or 2 must hold `ca-cert.pem` (unless
//! `tls-verify-peer=0`): a missing file is an error naming it, never a
//! silent fall-back to the system's CAs.
//!
//! The name checked in the server's certificate is `tls-hostname`, else
//! the URI's host (a DNS name or an IP address). A Unix socket has no
//! host: without `tls-hostname` the certificate's chain is verified but
//! not its name, as qemu's NBD client does (libnbd verifies nothing there;
//! a local socket's permissions already say who may listen on it).
//!
//! `tls-verify-peer=0` accepts any certificate, but the server must still
//! prove, by its handshake signature, that it holds the certificate's key.
//!
//! Pre-shared keys (`tls-psk-file`) are refused when the URI is parsed:
//! rustls has no TLS 1.3 external PSKs (rustls issue 174; pull request
//! 2524 was closed unmerged), and a hand-made key schedule is not a risk
//! worth taking.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConnection, DigitallySignedStruct, RootCertStore};
use rustls::{SignatureScheme, StreamOwned};

use crate::uri::{NbdUri, TlsMode, Transport};

/// The CA certificates in a certificates folder.
pub const CA_CERT: &str = "ca-cert.pem";
/// The client's certificate in a certificates folder (optional).
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client's private key in a certificates folder (with [`CLIENT_CERT`]).
pub const CLIENT_KEY: &str = "client-key.pem";
/// The system's trusted CAs (Debian's `ca-certificates`), used when no
/// folder holds a `ca-cert.pem`.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why no TLS configuration could be built. Every variant names the file
/// or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A certificate or key file could not be read.
    #[error("reading {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A file is not valid PEM.
    #[error("{}: invalid PEM", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no `CERTIFICATE` section.
    #[error("{}: no PEM CERTIFICATE in it", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key section.
    #[error("{}: no PEM private key in it", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate that can not be a trust anchor.
    #[error("{}: certificate {index} is not a usable CA certificate", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Its index in the file, from 0.
        index: usize,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// `client-cert.pem` without `client-key.pem`, or the reverse.
    #[error(
        "{} exists but {} does not: a client certificate needs both",
        present.display(),
        missing.display()
    )]
    HalfClientIdentity {
        /// The file found.
        present: PathBuf,
        /// The file missing.
        missing: PathBuf,
    },
    /// The client's certificate and key can not be used together.
    #[error("client certificate {} with key {}", cert.display(), key.display())]
    ClientIdentity {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// No CA certificate anywhere.
    #[error(
        "no CA certificate to verify the server with (looked for {}); give \
         tls-certificates=DIR with a {CA_CERT}, or tls-verify-peer=0",
        tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NoCa {
        /// Every file looked for.
        tried: Vec<PathBuf>,
    },
    /// The name to check is neither a DNS name nor an IP address.
    #[error("{name:?} is not a valid DNS name or IP address for TLS")]
    BadServerName {
        /// The name (`tls-hostname` or the URI's host).
        name: String,
    },
    /// rustls refused the verifier or the protocol versions.
    #[error("setting up rustls")]
    Rustls {
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// libnbd's default certificates folders for a user (`euid`, `$HOME`): for
/// root `/etc/pki/libnbd`, for others `$HOME/.pki/libnbd` and
/// `$HOME/.config/pki/libnbd` (libnbd's `lib/crypto.c`).
pub fn default_dirs(euid: u32, home: Option<&Path>) -> Vec<PathBuf> {
    match home {
        Some(home) if euid != 0 => vec![home.join(".pki/libnbd"), home.join(".config/pki/libnbd")],
        Some(_) => vec![PathBuf::from("/etc/pki/libnbd")],
        // libnbd: no $HOME, no per-user folder; root's only for root.
        None if euid == 0 => vec![PathBuf::from("/etc/pki/libnbd")],
        None => Vec::new(),
    }
}

/// A TLS client configuration for one URI, built once and shared by all
/// its connections.
#[derive(Clone)]
pub struct TlsSetup {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    /// Where the CAs came from, for `Debug`.
    trust: String,
}

impl fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSetup")
            .field("server_name", &self.server_name)
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read {
        path: path.into(),
        source,
    })
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsConfigError::Pem {
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate { path: path.into() });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsConfigError::NoKey { path: path.into() },
        source => TlsConfigError::Pem {
            path: path.into(),
            source,
        },
    })
}

fn rustls_error(e: impl std::error::Error + Send + Sync + 'static) -> TlsConfigError {
    TlsConfigError::Rustls {
        source: Box::new(e),
    }
}

/// Where the CAs are, and the folder of the client's certificate.
struct Sources {
    ca: Option<PathBuf>,
    /// The CA file is the system's bundle, which may hold certificates
    /// webpki can not parse: skip those rather than refuse.
    system: bool,
    identity_dir: Option<PathBuf>,
}

fn sources(
    explicit: Option<&Path>,
    verify: bool,
    defaults: &[PathBuf],
) -> Result<Sources, TlsConfigError> {
    if let Some(dir) = explicit {
        return Ok(Sources {
            // Read only when verifying.
            ca: Some(dir.join(CA_CERT)),
            system: false,
            identity_dir: Some(dir.into()),
        });
    }
    let mut tried = Vec::new();
    for dir in defaults {
        let ca = dir.join(CA_CERT);
        if ca.exists() {
            return Ok(Sources {
                ca: Some(ca),
                system: false,
                identity_dir: Some(dir.clone()),
            });
        }
        tried.push(ca);
    }
    let system = PathBuf::from(SYSTEM_CA_BUNDLE);
    if system.exists() {
        return Ok(Sources {
            ca: Some(system),
            system: true,
            identity_dir: None,
        });
    }
    if !verify {
        return Ok(Sources {
            ca: None,
            system: false,
            identity_dir: None,
        });
    }
    tried.push(system);
    Err(TlsConfigError::NoCa { tried })
}

impl TlsSetup {
    /// The configuration `uri` asks for; `None` when it asks for no TLS.
    /// `certificates` is the caller's default folder, used when the URI
    /// has no `tls-certificates` (see the [module docs](self)).
    pub fn for_uri(
        uri: &NbdUri,
        certificates: Option<&Path>,
    ) -> Result<Option<TlsSetup>, TlsConfigError> {
        if uri.tls.mode == TlsMode::Off {
            return Ok(None);
        }
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let defaults = default_dirs(nix::unistd::geteuid().as_raw(), home.as_deref());
        Self::build(uri, certificates, &defaults).map(Some)
    }

    fn build(
        uri: &NbdUri,
        certificates: Option<&Path>,
        defaults: &[PathBuf],
    ) -> Result<TlsSetup, TlsConfigError> {
        let t = &uri.tls;
        let verify = t.verify_peer != Some(false);
        let explicit = t.certificates.as_deref().or(certificates);
        let src = sources(explicit, verify, defaults)?;
        // ring, not the default aws-lc-rs, which needs cmake to build.
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let (name, check_name) = match (&t.hostname, &uri.transport) {
            (Some(h), _) => (h.clone(), true),
            (None, Transport::Tcp { host, .. }) => (host.clone(), true),
            // Sent as SNI only; see the module docs.
            (None, Transport::Unix { .. }) => ("localhost".to_string(), false),
        };
        let server_name = ServerName::try_from(name.clone())
            .map_err(|_| TlsConfigError::BadServerName { name })?;

        let algorithms = provider.signature_verification_algorithms;
        let mut trust = "nothing (tls-verify-peer=0)".to_string();
        let verifier: Arc<dyn ServerCertVerifier> = if verify {
            let ca = src.ca.as_deref().expect("a CA file when verifying");
            trust = ca.display().to_string();
            let mut roots = RootCertStore::empty();
            let certs = read_certificates(ca)?;
            if src.system {
                roots.add_parsable_certificates(certs);
            } else {
                for (index, c) in certs.into_iter().enumerate() {
                    roots.add(c).map_err(|source| TlsConfigError::BadCa {
                        path: ca.into(),
                        index,
                        source,
                    })?;
                }
            }
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(rustls_error)?;
            if check_name {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        } else {
            Arc::new(SignatureOnly(algorithms))
        };

        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(rustls_error)?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match client_identity(src.identity_dir.as_deref())? {
            Some((cert, key, chain, der)) => builder
                .with_client_auth_cert(chain, der)
                .map_err(|source| TlsConfigError::ClientIdentity { cert, key, source })?,
            None => builder.with_no_client_auth(),
        };
        Ok(TlsSetup {
            config: Arc::new(config),
            server_name,
            trust,
        })
    }

    /// Runs the TLS handshake on `sock` (after the server acknowledged
    /// `NBD_OPT_STARTTLS`), to its end, so that a refused certificate is
    /// reported as such and not as a failed NBD read. The error is an
    /// `io::Error` of `sock`, or one of kind `InvalidData` wrapping the
    /// [`rustls::Error`].
    pub(crate) fn handshake<S: Read + Write>(
        &self,
        sock: S,
    ) -> io::Result<StreamOwned<ClientConnection, S>> {
        let conn = ClientConnection::new(self.config.clone(), self.server_name.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut s = StreamOwned::new(conn, sock);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(s)
    }
}

type Identity = (
    PathBuf,
    PathBuf,
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
);

/// The client's certificate chain and key from `dir`, when it has both.
fn client_identity(dir: Option<&Path>) -> Result<Option<Identity>, TlsConfigError> {
    let Some(dir) = dir else { return Ok(None) };
    let (cert, key) = (dir.join(CLIENT_CERT), dir.join(CLIENT_KEY));
    match (cert.exists(), key.exists()) {
        (false, false) => Ok(None),
        (true, false) => Err(TlsConfigError::HalfClientIdentity {
            present: cert,
            missing: key,
        }),
        (false, true) => Err(TlsConfigError::HalfClientIdentity {
            present: key,
            missing: cert,
        }),
        (true, true) => {
            let chain = read_certificates(&cert)?;
            let der = private_key(&key)?;
            Ok(Some((cert, key, chain, der)))
        }
    }
}

/// The certificate chain verified, its name not: a Unix socket without
/// `tls-hostname` has no name to check (qemu's client does the same).
/// webpki checks the chain before the name, so a name error means the
/// chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `tls-verify-peer=0`: any certificate, but the handshake's signature
/// must be made with its key.
#[derive(Debug)]
struct SignatureOnly(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for SignatureOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libnbd_default_folders() {
        let home = Path::new("/home/u");
        assert_eq!(
            default_dirs(1000, Some(home)),
            [
                PathBuf::from("/home/u/.pki/libnbd"),
                PathBuf::from("/home/u/.config/pki/libnbd")
            ]
        );
        assert_eq!(
            default_dirs(0, Some(Path::new("/root"))),
            [PathBuf::from("/etc/pki/libnbd")]
        );
        assert!(default_dirs(1000, None).is_empty());
    }

    fn uri(s: &str) -> NbdUri {
        s.parse().unwrap()
    }

    #[test]
    fn plain_uris_need_no_setup() {
        assert!(TlsSetup::for_uri(&uri("nbd://h/"), None).unwrap().is_none());
    }

    #[test]
    fn an_explicit_folder_must_hold_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let e = TlsSetup::build(&uri(&format!("nbds://h/?tls-certificates={d}")), None, &[])
            .unwrap_err();
        assert!(
            matches!(&e, TlsConfigError::Read { path, .. } if path == &dir.path().join(CA_CERT)),
            "{e:?}"
        );
        // The caller's folder is used the same way when the URI has none...
        let e = TlsSetup::build(&uri("nbds://h/"), Some(dir.path()), &[]).unwrap_err();
        assert!(matches!(e, TlsConfigError::Read { .. }), "{e:?}");
        // ...but not needed without verification.
        TlsSetup::build(
            &uri(&format!("nbds://h/?tls-certificates={d}&tls-verify-peer=0")),
            None,
            &[],
        )
        .unwrap();
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join(CA_CERT);
        let u = uri(&format!(
            "nbds://h/?tls-certificates={}",
            dir.path().display()
        ));

        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n!!!!\n").unwrap();
        let e = TlsSetup::build(&u, None, &[]).unwrap_err();
        assert!(
            matches!(&e, TlsConfigError::Pem { path, .. } if *path == ca),
            "{e:?}"
        );
        assert!(e.to_string().contains("ca-cert.pem: invalid PEM"), "{e}");

        std::fs::write(&ca, "no PEM here\n").unwrap();
        let e = TlsSetup::build(&u, None, &[]).unwrap_err();
        assert!(
            matches!(&e, TlsConfigError::NoCertificate { path } if *path == ca),
            "{e:?}"
        );

        // A certificate that is not DER of a certificate.
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = TlsSetup::build(&u, None, &[]).unwrap_err();
        assert!(
            matches!(&e, TlsConfigError::BadCa { index: 0, .. }),
            "{e:?}"
        );

        // Half a client identity.
        let u0 = uri(&format!(
            "nbds://h/?tls-certificates={}&tls-verify-peer=0",
            dir.path().display()
        ));
        std::fs::write(dir.path().join(CLIENT_CERT), "x").unwrap();
        let e = TlsSetup::build(&u0, None, &[]).unwrap_err();
        assert!(
            matches!(e, TlsConfigError::HalfClientIdentity { .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("client-key.pem does not"), "{e}");
    }

    #[test]
    fn default_folders_then_the_system_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none");
        let src = sources(None, true, std::slice::from_ref(&missing));
        match src {
            Ok(s) => {
                assert_eq!(s.ca.as_deref(), Some(Path::new(SYSTEM_CA_BUNDLE)));
                assert!(s.system && s.identity_dir.is_none());
            }
            Err(TlsConfigError::NoCa { tried }) => {
                assert!(!Path::new(SYSTEM_CA_BUNDLE).exists());
                assert_eq!(tried, [missing.join(CA_CERT), SYSTEM_CA_BUNDLE.into()]);
            }
            Err(e) => panic!("{e:?}"),
        }
        std::fs::create_dir(&missing).unwrap();
        std::fs::write(missing.join(CA_CERT), "").unwrap();
        let s = sources(None, true, std::slice::from_ref(&missing)).unwrap();
        assert_eq!(s.ca, Some(missing.join(CA_CERT)));
        assert_eq!(s.identity_dir, Some(missing.clone()));
    }

    #[test]
    fn server_names() {
        let e = TlsSetup::build(
            &uri("nbds://h/?tls-hostname=bad%20name&tls-verify-peer=0"),
            None,
            &[],
        )
        .unwrap_err();
        assert!(matches!(e, TlsConfigError::BadServerName { .. }), "{e:?}");
        let s = TlsSetup::build(&uri("nbds://127.0.0.1/?tls-verify-peer=0"), None, &[]).unwrap();
        assert!(matches!(s.server_name, ServerName::IpAddress(_)));
        let s =
            TlsSetup::build(&uri("nbds+unix:///?socket=/s&tls-verify-peer=0"), None, &[]).unwrap();
        assert_eq!(s.server_name, ServerName::try_from("localhost").unwrap());
    }
}
