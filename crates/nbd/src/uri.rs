//! NBD URIs (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`),
//! as in the NBD URI specification.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::str::FromStr;

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
}

/// Why a string is not an NBD URI this client can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// No `scheme://`, or a scheme that is not NBD's.
    #[error("{uri:?}: not an NBD URI (expected nbd:// or nbd+unix://)")]
    NotNbd {
        /// The input.
        uri: String,
    },
    /// `nbds://` or `nbds+unix://`.
    #[error("{uri:?}: TLS not supported yet (scheme {scheme}://)")]
    TlsNotSupported {
        /// The input.
        uri: String,
        /// The TLS scheme.
        scheme: String,
    },
    /// A TLS query parameter; this client never negotiates TLS.
    #[error("{uri:?}: TLS not supported yet (query parameter {name:?})")]
    TlsParameter {
        /// The input.
        uri: String,
        /// The parameter.
        name: String,
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
        let unix = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" => {
                return Err(UriError::TlsNotSupported {
                    uri: err_uri(),
                    scheme: scheme.into(),
                });
            }
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
                match name.as_str() {
                    "socket" => {
                        if socket.is_some() {
                            return Err(UriError::DuplicateParameter {
                                uri: err_uri(),
                                name,
                            });
                        }
                        let bytes = decode(uri, v, here + k.len() + 1)?;
                        socket = Some(PathBuf::from(OsString::from_vec(bytes)));
                    }
                    "tls-type" | "tls-hostname" | "tls-verify-peer" | "tls-certificates"
                    | "tls-psk-file" => {
                        return Err(UriError::TlsParameter {
                            uri: err_uri(),
                            name,
                        });
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
        Ok(NbdUri {
            transport,
            export,
            user,
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
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        match &self.transport {
            Transport::Tcp { host, port } => {
                s.push_str("nbd://");
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
                s.push_str("nbd+unix:///");
                encode(&mut s, self.export.as_bytes(), b"/");
                s.push_str("?socket=");
                encode(&mut s, socket.as_os_str().as_bytes(), b"/");
            }
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
        assert!(matches!(
            e("nbds://host/x"),
            UriError::TlsNotSupported { .. }
        ));
        assert!(
            e("nbds+unix:///x?socket=s")
                .to_string()
                .contains("TLS not supported yet")
        );
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
            e("nbd://h/?tls-type=x509"),
            UriError::TlsParameter { .. }
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
        ] {
            let u = NbdUri::parse(s).unwrap();
            assert_eq!(u.to_string(), s);
            assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        }
    }
}
