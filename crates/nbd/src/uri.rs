//! NBD URIs (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`,
//! and their TLS forms `nbds://` and `nbds+unix://`), as in the NBD URI
//! specification, with libnbd's TLS query parameters.
//!
//! TLS, as the specification and libnbd read the URI:
//!
//! - `nbds://`, `nbds+unix://`: TLS or failure ([`TlsMode::Require`]).
//! - `nbd://`, `nbd+unix://` with any `tls-*` parameter: TLS if the server
//!   offers it, else unencrypted (the specification's "opportunistically
//!   TLS encrypted", [`TlsMode::Opportunistic`]); without one, no TLS.
//! - `tls-type=x509` (the default) is the only kind this client does:
//!   `anon` and `psk` (and `tls-psk-file`) are refused when parsed, because
//!   rustls, sparsekit's TLS library, has neither anonymous cipher suites
//!   nor TLS 1.3 external pre-shared keys (rustls issue 174).
//! - `tls-certificates=DIR`: `ca-cert.pem`, optional `client-cert.pem` and
//!   `client-key.pem`, laid out as qemu and libnbd lay them out (see
//!   [`crate::tls`] for the defaults without it).
//! - `tls-hostname=NAME`: the name checked in the server's certificate,
//!   instead of the URI's host (see [`crate::tls`] for Unix sockets).
//! - `tls-verify-peer=0`: do not verify the server's certificate.
//! - `userinfo@`: the PSK user name in libnbd; kept and shown, unused with
//!   X.509 certificates.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::str::FromStr;

pub use crate::handshake::TlsMode;

/// The IANA port of NBD, used when a TCP URI has none.
pub const DEFAULT_PORT: u16 = 10809;

/// How to reach the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP (scheme `nbd`).
    Tcp {
        /// Host name or address; IPv6 literals without brackets.
        host: String,
        /// Port, 10809 when the URI has none.
        port: u16,
    },
    /// A Unix domain socket (scheme `nbd+unix`). A path starting with a NUL
    /// byte names a Linux abstract socket.
    Unix {
        /// Socket path.
        socket: PathBuf,
    },
}

/// The TLS parameters of a URI; see the [module docs](self).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsParams {
    /// From the scheme and the presence of `tls-*` parameters.
    pub mode: TlsMode,
    /// `tls-type=x509` was written (the only type accepted; also the default).
    pub x509: bool,
    /// `tls-hostname`: the name the server's certificate must carry.
    pub hostname: Option<String>,
    /// `tls-verify-peer`: `None` when absent (verify).
    pub verify_peer: Option<bool>,
    /// `tls-certificates`: the folder of `ca-cert.pem` and the client's
    /// certificate and key.
    pub certificates: Option<PathBuf>,
}

impl TlsParams {
    fn any_parameter(&self) -> bool {
        self.x509
            || self.hostname.is_some()
            || self.verify_peer.is_some()
            || self.certificates.is_some()
    }
}

/// A parsed NBD URI.
///
/// ```
/// use sparsekit_nbd::{NbdUri, Transport};
/// let u: NbdUri = "nbd://[::1]:10810/my%20disk".parse().unwrap();
/// assert_eq!(u.export, "my disk");
/// assert_eq!(u.transport, Transport::Tcp { host: "::1".into(), port: 10810 });
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server is.
    pub transport: Transport,
    /// Export name: the path without its leading `/`, percent-decoded.
    pub export: String,
    /// The `userinfo` of the authority, if any (only meaningful with TLS).
    pub user: Option<String>,
    /// TLS: whether, and how the server is verified.
    pub tls: TlsParams,
}

/// Why a string is not an NBD URI this client can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// No `scheme://`, or a scheme that is not NBD's.
    #[error("{uri:?}: not an NBD URI (expected nbd://, nbds://, nbd+unix:// or nbds+unix://)")]
    NotNbd {
        /// The input.
        uri: String,
    },
    /// TLS with a pre-shared key (`tls-psk-file`, `tls-type=psk`).
    #[error(
        "{uri:?}: TLS with a pre-shared key ({name}) is not supported: sparsekit's TLS \
         library (rustls) cannot do TLS-PSK; use X.509 certificates (tls-certificates=DIR)"
    )]
    PskNotSupported {
        /// The input.
        uri: String,
        /// The parameter that asked for it.
        name: String,
    },
    /// `tls-type=anon`, or a type no one knows.
    #[error(
        "{uri:?}: tls-type={value:?} is not supported: sparsekit's TLS library (rustls) \
         does X.509 certificates only (tls-type=x509)"
    )]
    TlsTypeNotSupported {
        /// The input.
        uri: String,
        /// The type asked for.
        value: String,
    },
    /// A query parameter whose value can not be used, e.g. `tls-verify-peer=2`.
    #[error("{uri:?}: query parameter {name}={value:?}: expected {expected}")]
    BadParameterValue {
        /// The input.
        uri: String,
        /// The parameter.
        name: String,
        /// Its value.
        value: String,
        /// What it may be.
        expected: &'static str,
    },
    /// `nbd+unix` without `socket=`.
    #[error("{uri:?}: nbd+unix:// needs a socket=PATH query parameter")]
    MissingSocket {
        /// The input.
        uri: String,
    },
    /// `socket=` with a TCP scheme.
    #[error("{uri:?}: the socket query parameter is only valid with nbd+unix://")]
    SocketWithTcp {
        /// The input.
        uri: String,
    },
    /// A host in an `nbd+unix` URI.
    #[error(
        "{uri:?}: nbd+unix:// takes no host (found {host:?}); write nbd+unix:///export?socket=PATH"
    )]
    HostWithUnix {
        /// The input.
        uri: String,
        /// The host found.
        host: String,
    },
    /// `nbd://` with no host.
    #[error("{uri:?}: nbd:// needs a host")]
    MissingHost {
        /// The input.
        uri: String,
    },
    /// A port that is not a number in 0..=65535.
    #[error("{uri:?}: invalid port {port:?}")]
    BadPort {
        /// The input.
        uri: String,
        /// The port text.
        port: String,
    },
    /// `[` without a matching `]`, or junk after it.
    #[error("{uri:?}: malformed IPv6 literal in the authority")]
    BadIpv6 {
        /// The input.
        uri: String,
    },
    /// `%` not followed by two hex digits.
    #[error("{uri:?}: bad percent-encoding at byte {index}")]
    BadPercent {
        /// The input.
        uri: String,
        /// Byte index of the `%`.
        index: usize,
    },
    /// The decoded export name or host is not UTF-8, or contains NUL.
    #[error("{uri:?}: the {what} must be UTF-8 text without NUL")]
    BadText {
        /// The input.
        uri: String,
        /// Which component.
        what: &'static str,
    },
    /// A query parameter this client does not know; the spec says such
    /// parameters SHOULD be diagnosed.
    #[error("{uri:?}: unknown query parameter {name:?}")]
    UnknownParameter {
        /// The input.
        uri: String,
        /// The parameter.
        name: String,
    },
    /// A query parameter given twice.
    #[error("{uri:?}: query parameter {name:?} given more than once")]
    DuplicateParameter {
        /// The input.
        uri: String,
        /// The parameter.
        name: String,
    },
    /// A `#fragment`, which NBD URIs have no use for.
    #[error("{uri:?}: NBD URIs take no #fragment")]
    Fragment {
        /// The input.
        uri: String,
    },
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes `s`; `base` is its byte index in the whole URI, for errors.
fn decode(uri: &str, s: &str, base: usize) -> Result<Vec<u8>, UriError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = b.get(i + 1).copied().and_then(hex);
            let lo = b.get(i + 2).copied().and_then(hex);
            match (hi, lo) {
                (Some(h), Some(l)) => out.push(h << 4 | l),
                _ => {
                    return Err(UriError::BadPercent {
                        uri: uri.into(),
                        index: base + i,
                    });
                }
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn text(uri: &str, bytes: Vec<u8>, what: &'static str) -> Result<String, UriError> {
    let s = String::from_utf8(bytes).map_err(|_| UriError::BadText {
        uri: uri.into(),
        what,
    })?;
    if s.contains('\0') {
        return Err(UriError::BadText {
            uri: uri.into(),
            what,
        });
    }
    Ok(s)
}

impl NbdUri {
    /// Parses an NBD URI.
    pub fn parse(uri: &str) -> Result<NbdUri, UriError> {
        let err_uri = || uri.to_string();
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| UriError::NotNbd { uri: err_uri() })?;
        let (unix, require_tls) = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => (false, false),
            "nbd+unix" => (true, false),
            "nbds" => (false, true),
            "nbds+unix" => (true, true),
            _ => return Err(UriError::NotNbd { uri: err_uri() }),
        };
        if rest.contains('#') {
            return Err(UriError::Fragment { uri: err_uri() });
        }
        let base = scheme.len() + 3;
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i..]),
            None => (before_query, ""),
        };
        let path_base = base + authority.len();

        // userinfo@host:port
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(text(uri, decode(uri, u, base)?, "user")?), h),
            None => (None, authority),
        };
        let (host, port) = if let Some(after) = hostport.strip_prefix('[') {
            let (h, tail) = after
                .split_once(']')
                .ok_or_else(|| UriError::BadIpv6 { uri: err_uri() })?;
            let port = match tail {
                "" => None,
                t => Some(
                    t.strip_prefix(':')
                        .ok_or_else(|| UriError::BadIpv6 { uri: err_uri() })?,
                ),
            };
            (h.to_string(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (text(uri, decode(uri, h, base)?, "host")?, Some(p)),
                None => (text(uri, decode(uri, hostport, base)?, "host")?, None),
            }
        };
        let port = match port {
            None | Some("") => DEFAULT_PORT,
            Some(p) => p.parse::<u16>().map_err(|_| UriError::BadPort {
                uri: err_uri(),
                port: p.into(),
            })?,
        };

        // Export name: the path minus its leading '/'.
        let export_raw = path.strip_prefix('/').unwrap_or(path);
        let export = text(uri, decode(uri, export_raw, path_base + 1)?, "export name")?;

        let mut socket: Option<PathBuf> = None;
        let mut tls = TlsParams::default();
        let mut seen: Vec<String> = Vec::new();
        if let Some(q) = query {
            let qbase = base + before_query.len() + 1;
            let mut at = qbase;
            for pair in q.split('&') {
                let here = at;
                at += pair.len() + 1;
                if pair.is_empty() {
                    continue;
                }
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let name = text(uri, decode(uri, k, here)?, "query parameter name")?;
                if seen.contains(&name) {
                    return Err(UriError::DuplicateParameter {
                        uri: err_uri(),
                        name,
                    });
                }
                seen.push(name.clone());
                let value = || decode(uri, v, here + k.len() + 1);
                let bad = |name: &str, value: &str, expected| UriError::BadParameterValue {
                    uri: err_uri(),
                    name: name.into(),
                    value: value.into(),
                    expected,
                };
                match name.as_str() {
                    "socket" => {
                        socket = Some(PathBuf::from(OsString::from_vec(value()?)));
                    }
                    "tls-type" => {
                        let t = text(uri, value()?, "tls-type")?;
                        match t.to_ascii_lowercase().as_str() {
                            "x509" => tls.x509 = true,
                            "psk" => {
                                return Err(UriError::PskNotSupported {
                                    uri: err_uri(),
                                    name: "tls-type=psk".into(),
                                });
                            }
                            _ => {
                                return Err(UriError::TlsTypeNotSupported {
                                    uri: err_uri(),
                                    value: t,
                                });
                            }
                        }
                    }
                    "tls-psk-file" => {
                        return Err(UriError::PskNotSupported {
                            uri: err_uri(),
                            name,
                        });
                    }
                    "tls-hostname" => {
                        let h = text(uri, value()?, "tls-hostname")?;
                        if h.is_empty() {
                            return Err(bad(&name, &h, "a host name or address"));
                        }
                        tls.hostname = Some(h);
                    }
                    "tls-verify-peer" => {
                        let t = text(uri, value()?, "tls-verify-peer")?;
                        // libnbd's booleans; the spec writes 0 and 1.
                        tls.verify_peer = Some(match t.to_ascii_lowercase().as_str() {
                            "1" | "true" | "on" | "yes" => true,
                            "0" | "false" | "off" | "no" => false,
                            _ => return Err(bad(&name, &t, "0 or 1")),
                        });
                    }
                    "tls-certificates" => {
                        let bytes = value()?;
                        if bytes.is_empty() {
                            return Err(bad(&name, "", "a folder"));
                        }
                        tls.certificates = Some(PathBuf::from(OsString::from_vec(bytes)));
                    }
                    _ => {
                        return Err(UriError::UnknownParameter {
                            uri: err_uri(),
                            name,
                        });
                    }
                }
            }
        }

        let transport = if unix {
            if !host.is_empty() {
                return Err(UriError::HostWithUnix {
                    uri: err_uri(),
                    host,
                });
            }
            let socket = socket
                .filter(|s| !s.as_os_str().is_empty())
                .ok_or_else(|| UriError::MissingSocket { uri: err_uri() })?;
            Transport::Unix { socket }
        } else {
            if socket.is_some() {
                return Err(UriError::SocketWithTcp { uri: err_uri() });
            }
            if host.is_empty() {
                return Err(UriError::MissingHost { uri: err_uri() });
            }
            Transport::Tcp { host, port }
        };
        tls.mode = if require_tls {
            TlsMode::Require
        } else if tls.any_parameter() {
            TlsMode::Opportunistic
        } else {
            TlsMode::Off
        };
        Ok(NbdUri {
            transport,
            export,
            user,
            tls,
        })
    }

    /// A Unix-socket URI for `export` on `socket`.
    pub fn unix(socket: impl Into<PathBuf>, export: impl Into<String>) -> NbdUri {
        NbdUri {
            transport: Transport::Unix {
                socket: socket.into(),
            },
            export: export.into(),
            user: None,
            tls: TlsParams::default(),
        }
    }

    /// A TCP URI for `export` on `host:port`.
    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> NbdUri {
        NbdUri {
            transport: Transport::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
            user: None,
            tls: TlsParams::default(),
        }
    }
}

impl FromStr for NbdUri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NbdUri::parse(s)
    }
}

/// Percent-encodes everything outside RFC 3986's unreserved set and `keep`.
fn encode(out: &mut String, bytes: &[u8], keep: &[u8]) {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

impl fmt::Display for NbdUri {
    /// The canonical URI; parsing it gives back an equal [`NbdUri`].
    /// TLS parameters are kept, so that messages say how the server was
    /// reached (the URI holds no secret: PSK files are refused).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        let tls = self.tls.mode == TlsMode::Require;
        let mut query = Vec::new();
        match &self.transport {
            Transport::Tcp { host, port } => {
                s.push_str(if tls { "nbds://" } else { "nbd://" });
                if let Some(u) = &self.user {
                    encode(&mut s, u.as_bytes(), b"");
                    s.push('@');
                }
                if host.contains(':') {
                    s.push('[');
                    s.push_str(host);
                    s.push(']');
                } else {
                    encode(&mut s, host.as_bytes(), b"");
                }
                if *port != DEFAULT_PORT {
                    s.push_str(&format!(":{port}"));
                }
                s.push('/');
                encode(&mut s, self.export.as_bytes(), b"/");
            }
            Transport::Unix { socket } => {
                s.push_str(if tls { "nbds+unix://" } else { "nbd+unix://" });
                if let Some(u) = &self.user {
                    encode(&mut s, u.as_bytes(), b"");
                    s.push('@');
                }
                s.push('/');
                encode(&mut s, self.export.as_bytes(), b"/");
                query.push(("socket", socket.as_os_str().as_bytes()));
            }
        }
        let t = &self.tls;
        if t.x509 {
            query.push(("tls-type", b"x509"));
        }
        if let Some(h) = &t.hostname {
            query.push(("tls-hostname", h.as_bytes()));
        }
        if let Some(v) = t.verify_peer {
            query.push(("tls-verify-peer", if v { b"1" } else { b"0" }));
        }
        if let Some(d) = &t.certificates {
            query.push(("tls-certificates", d.as_os_str().as_bytes()));
        }
        for (i, (k, v)) in query.iter().enumerate() {
            s.push(if i == 0 { '?' } else { '&' });
            s.push_str(k);
            s.push('=');
            encode(&mut s, v, b"/");
        }
        f.write_str(&s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri::tcp(host, port, export)
    }

    #[test]
    fn export_names_from_the_spec_table() {
        let cases = [
            ("nbd://example.com/disk", "disk"),
            ("nbd://example.com/", ""),
            ("nbd://example.com", ""),
            ("nbd://example.com//disk", "/disk"),
            ("nbd://example.com/hello%20world", "hello world"),
        ];
        for (u, export) in cases {
            assert_eq!(
                NbdUri::parse(u).unwrap(),
                tcp("example.com", 10809, export),
                "{u}"
            );
        }
        assert_eq!(
            NbdUri::parse("nbd+unix:///disk?socket=sock").unwrap(),
            NbdUri::unix("sock", "disk")
        );
    }

    #[test]
    fn ports_ipv6_and_userinfo() {
        assert_eq!(
            NbdUri::parse("nbd://localhost:10810/x").unwrap(),
            tcp("localhost", 10810, "x")
        );
        assert_eq!(
            NbdUri::parse("nbd://[::1]/").unwrap(),
            tcp("::1", 10809, "")
        );
        assert_eq!(
            NbdUri::parse("nbd://[fe80::1]:99/e").unwrap(),
            tcp("fe80::1", 99, "e")
        );
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:/e").unwrap(),
            tcp("127.0.0.1", 10809, "e")
        );
        let u = NbdUri::parse("nbd://alice@host/e").unwrap();
        assert_eq!(u.user.as_deref(), Some("alice"));
    }

    #[test]
    fn unix_sockets_percent_decoded_and_abstract() {
        let u = NbdUri::parse("nbd+unix:///?socket=/tmp/my%20dir/s.sock").unwrap();
        assert_eq!(u, NbdUri::unix("/tmp/my dir/s.sock", ""));
        let u = NbdUri::parse("nbd+unix:///?socket=%00/abstract").unwrap();
        assert_eq!(
            u.transport,
            Transport::Unix {
                socket: PathBuf::from("\0/abstract")
            }
        );
    }

    #[test]
    fn refusals() {
        let e = |s: &str| NbdUri::parse(s).unwrap_err();
        assert!(matches!(e("http://host/"), UriError::NotNbd { .. }));
        assert!(matches!(e("/dev/nbd0"), UriError::NotNbd { .. }));
        assert!(matches!(e("nbd+unix:///x"), UriError::MissingSocket { .. }));
        assert!(matches!(
            e("nbd+unix:///x?socket="),
            UriError::MissingSocket { .. }
        ));
        assert!(matches!(
            e("nbd+unix://host/x?socket=s"),
            UriError::HostWithUnix { .. }
        ));
        assert!(matches!(e("nbd:///x"), UriError::MissingHost { .. }));
        assert!(matches!(e("nbd://h:99999/"), UriError::BadPort { .. }));
        assert!(matches!(e("nbd://h:x/"), UriError::BadPort { .. }));
        assert!(matches!(e("nbd://[::1/"), UriError::BadIpv6 { .. }));
        assert!(matches!(
            e("nbd://h/a%2"),
            UriError::BadPercent { index: 9, .. }
        ));
        assert!(matches!(e("nbd://h/a%00"), UriError::BadText { .. }));
        assert!(matches!(e("nbd://h/%ff"), UriError::BadText { .. }));
        assert!(matches!(
            e("nbd://h/?foo=1"),
            UriError::UnknownParameter { .. }
        ));
        assert!(matches!(
            e("nbd://h/?socket=/s"),
            UriError::SocketWithTcp { .. }
        ));
        assert!(matches!(
            e("nbd+unix:///?socket=a&socket=b"),
            UriError::DuplicateParameter { .. }
        ));
        assert!(matches!(
            e("nbd://h/?tls-hostname=a&tls-hostname=b"),
            UriError::DuplicateParameter { .. }
        ));
        assert!(matches!(e("nbd://h/x#frag"), UriError::Fragment { .. }));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "nbd://example.com/disk",
            "nbd://[::1]:10810/my%20disk",
            "nbd+unix:///e/x?socket=/tmp/a%20b.sock",
            "nbd://u@h/",
            "nbds://h/",
            "nbds+unix://alice@/e?socket=/s",
            "nbds://[::1]/e?tls-type=x509&tls-hostname=srv.example&tls-verify-peer=0&tls-certificates=/etc/my%20certs",
            "nbd+unix:///?socket=/s&tls-certificates=/c",
        ] {
            let u = NbdUri::parse(s).unwrap();
            assert_eq!(u.to_string(), s);
            assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        }
    }

    #[test]
    fn tls_schemes_and_parameters() {
        let u = NbdUri::parse("nbds://h:99/e").unwrap();
        assert_eq!(
            u.transport,
            Transport::Tcp {
                host: "h".into(),
                port: 99
            }
        );
        assert_eq!(u.tls.mode, TlsMode::Require);
        let u = NbdUri::parse("NBDS+UNIX:///e?socket=/s").unwrap();
        assert_eq!(u.tls.mode, TlsMode::Require);
        assert_eq!(u.to_string(), "nbds+unix:///e?socket=/s");

        // nbd:// is "unencrypted or opportunistically TLS encrypted": TLS
        // parameters ask for the opportunity.
        assert_eq!(NbdUri::parse("nbd://h/").unwrap().tls.mode, TlsMode::Off);
        for q in [
            "tls-type=x509",
            "tls-hostname=x",
            "tls-verify-peer=1",
            "tls-certificates=/d",
        ] {
            let u = NbdUri::parse(&format!("nbd://h/?{q}")).unwrap();
            assert_eq!(u.tls.mode, TlsMode::Opportunistic, "{q}");
            assert_eq!(u.to_string(), format!("nbd://h/?{q}"));
        }

        let u = NbdUri::parse(
            "nbds+unix:///?socket=/s&tls-hostname=srv&tls-verify-peer=false&tls-certificates=/a%20b",
        )
        .unwrap();
        assert_eq!(
            u.tls,
            TlsParams {
                mode: TlsMode::Require,
                x509: false,
                hostname: Some("srv".into()),
                verify_peer: Some(false),
                certificates: Some("/a b".into()),
            }
        );
    }

    #[test]
    fn tls_refusals() {
        let e = |s: &str| NbdUri::parse(s).unwrap_err();
        let psk = e("nbds://h/?tls-psk-file=/keys.psk");
        assert!(
            matches!(&psk, UriError::PskNotSupported { name, .. } if name == "tls-psk-file"),
            "{psk:?}"
        );
        let m = psk.to_string();
        assert!(m.contains("rustls") && m.contains("X.509"), "{m}");
        assert!(matches!(
            e("nbds://h/?tls-type=psk"),
            UriError::PskNotSupported { .. }
        ));
        assert!(matches!(
            e("nbds://h/?tls-type=anon"),
            UriError::TlsTypeNotSupported { .. }
        ));
        assert!(matches!(
            e("nbds://h/?tls-verify-peer=2"),
            UriError::BadParameterValue { .. }
        ));
        assert!(matches!(
            e("nbds://h/?tls-hostname="),
            UriError::BadParameterValue { .. }
        ));
        assert!(matches!(
            e("nbds://h/?tls-certificates="),
            UriError::BadParameterValue { .. }
        ));
        assert!(matches!(e("nbds:///x"), UriError::MissingHost { .. }));
        assert!(matches!(
            e("nbds+unix:///x"),
            UriError::MissingSocket { .. }
        ));
        assert!(matches!(e("nbdx://h/"), UriError::NotNbd { .. }));
    }
}
