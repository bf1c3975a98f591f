//! The checksums of bmap files: their types, digests and an incremental
//! hasher.

use std::fmt;

use sha1::Digest as _;

/// A checksum function a bmap file may name.
///
/// Format 2.0 names it in `<ChecksumType>` (bmaptool accepts any name
/// Python's `hashlib` knows; `bmaptool create` writes `sha256`); format 1.3
/// implies SHA-1. Only these two are supported here: other names are
/// refused when parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChecksumType {
    /// SHA-1, the only checksum of format 1.3.
    Sha1,
    /// SHA-256, what `bmaptool create` writes.
    Sha256,
}

impl ChecksumType {
    /// The name in `<ChecksumType>`: `sha1` or `sha256`.
    pub fn name(self) -> &'static str {
        match self {
            ChecksumType::Sha1 => "sha1",
            ChecksumType::Sha256 => "sha256",
        }
    }

    /// The type named `name` in `<ChecksumType>`, if supported.
    ///
    /// bmaptool passes the name to Python's `hashlib.new`, which ignores
    /// case and takes OpenSSL's `sha-1`, `sha-256` and `sha2-256` too; the
    /// same spellings are taken here, so that a file bmaptool verifies is
    /// not refused. OpenSSL's rarer aliases are not.
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "sha1" | "sha-1" => Some(ChecksumType::Sha1),
            "sha256" | "sha-256" | "sha2-256" => Some(ChecksumType::Sha256),
            _ => None,
        }
    }

    /// Length of a digest in bytes: 20 or 32.
    pub fn digest_len(self) -> usize {
        match self {
            ChecksumType::Sha1 => 20,
            ChecksumType::Sha256 => 32,
        }
    }

    /// Length of a digest in hex digits, as the file writes it: 40 or 64.
    pub fn hex_len(self) -> usize {
        2 * self.digest_len()
    }
}

impl fmt::Display for ChecksumType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The longest digest of a supported type (SHA-256).
const MAX_DIGEST: usize = 32;

/// A digest of a [`ChecksumType`]; `Display` writes it as bmaptool does,
/// lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest {
    kind: ChecksumType,
    bytes: [u8; MAX_DIGEST],
}

impl Digest {
    /// A digest from its raw bytes; `None` unless `bytes` has the type's
    /// length.
    pub fn from_bytes(kind: ChecksumType, bytes: &[u8]) -> Option<Self> {
        if bytes.len() != kind.digest_len() {
            return None;
        }
        let mut d = Digest {
            kind,
            bytes: [0; MAX_DIGEST],
        };
        d.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(d)
    }

    /// A digest from exactly [`ChecksumType::hex_len`] lowercase hex
    /// digits, or `None`.
    ///
    /// Uppercase is refused: bmaptool compares the text of the file with
    /// Python's `hexdigest()`, which is lowercase, so an uppercase checksum
    /// never matches there.
    pub fn from_hex(kind: ChecksumType, hex: &str) -> Option<Self> {
        let hex = hex.as_bytes();
        if hex.len() != kind.hex_len() {
            return None;
        }
        let mut d = Digest {
            kind,
            bytes: [0; MAX_DIGEST],
        };
        for (out, pair) in d.bytes.iter_mut().zip(hex.chunks_exact(2)) {
            *out = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(d)
    }

    /// The type of checksum.
    pub fn checksum_type(&self) -> ChecksumType {
        self.kind
    }

    /// The raw digest, 20 or 32 bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.kind.digest_len()]
    }

    /// Lowercase hex, as in the file.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

/// The value of a lowercase hex digit.
fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{self}", self.kind)
    }
}

/// An incremental hasher of either [`ChecksumType`].
///
/// The copy engine feeds it the pieces of a range in order, as they pass,
/// and compares [`Hasher::finish`] with the range's checksum
/// ([`crate::BlockRange::verify`]). Both functions use the CPU's SHA
/// instructions (SHA-NI on x86-64) when it has them, chosen at run time.
#[derive(Clone, Debug)]
pub struct Hasher(Inner);

#[derive(Clone, Debug)]
enum Inner {
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
}

impl Hasher {
    /// A hasher of `kind` over no bytes yet.
    pub fn new(kind: ChecksumType) -> Self {
        Hasher(match kind {
            ChecksumType::Sha1 => Inner::Sha1(sha1::Sha1::new()),
            ChecksumType::Sha256 => Inner::Sha256(sha2::Sha256::new()),
        })
    }

    /// The type this hasher computes.
    pub fn checksum_type(&self) -> ChecksumType {
        match self.0 {
            Inner::Sha1(_) => ChecksumType::Sha1,
            Inner::Sha256(_) => ChecksumType::Sha256,
        }
    }

    /// Hash `data` after everything hashed so far.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.0 {
            Inner::Sha1(h) => h.update(data),
            Inner::Sha256(h) => h.update(data),
        }
    }

    /// The digest of all the bytes given to [`Hasher::update`].
    pub fn finish(self) -> Digest {
        let kind = self.checksum_type();
        let out = match self.0 {
            Inner::Sha1(h) => Digest::from_bytes(kind, &h.finalize()),
            Inner::Sha256(h) => Digest::from_bytes(kind, &h.finalize()),
        };
        out.expect("the hash functions' output lengths are the types' digest lengths")
    }

    /// The digest of `data` in one call.
    pub fn digest(kind: ChecksumType, data: &[u8]) -> Digest {
        let mut h = Hasher::new(kind);
        h.update(data);
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // FIPS 180-2 test vectors for "abc".
    const ABC_SHA1: &str = "a9993e364706816aba3e25717850c26c9cd0d89d";
    const ABC_SHA256: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn known_digests_of_abc() {
        assert_eq!(
            Hasher::digest(ChecksumType::Sha1, b"abc").to_hex(),
            ABC_SHA1
        );
        assert_eq!(
            Hasher::digest(ChecksumType::Sha256, b"abc").to_hex(),
            ABC_SHA256
        );
    }

    #[test]
    fn pieces_hash_like_the_whole() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for kind in [ChecksumType::Sha1, ChecksumType::Sha256] {
            let mut h = Hasher::new(kind);
            for piece in data.chunks(777) {
                h.update(piece);
            }
            assert_eq!(h.finish(), Hasher::digest(kind, &data));
        }
    }

    #[test]
    fn hex_round_trips_and_is_strict() {
        let d = Digest::from_hex(ChecksumType::Sha256, ABC_SHA256).unwrap();
        assert_eq!(d.to_hex(), ABC_SHA256);
        assert_eq!(d.as_bytes().len(), 32);
        assert_eq!(d.as_bytes()[..2], [0xba, 0x78]);
        assert_eq!(d, Hasher::digest(ChecksumType::Sha256, b"abc"));
        // Uppercase, wrong length, a non-hex digit, the other type's length.
        assert!(Digest::from_hex(ChecksumType::Sha256, &ABC_SHA256.to_uppercase()).is_none());
        assert!(Digest::from_hex(ChecksumType::Sha256, &ABC_SHA256[1..]).is_none());
        assert!(Digest::from_hex(ChecksumType::Sha256, &ABC_SHA256.replace('b', "g")).is_none());
        assert!(Digest::from_hex(ChecksumType::Sha256, ABC_SHA1).is_none());
        assert!(Digest::from_hex(ChecksumType::Sha1, ABC_SHA1).is_some());
        assert!(Digest::from_bytes(ChecksumType::Sha1, &[0; 32]).is_none());
    }

    #[test]
    fn digests_of_different_types_differ() {
        let zeros = [0u8; 20];
        let a = Digest::from_bytes(ChecksumType::Sha1, &zeros).unwrap();
        let b = Digest::from_hex(ChecksumType::Sha1, &"0".repeat(40)).unwrap();
        assert_eq!(a, b);
        let c = Digest::from_hex(ChecksumType::Sha256, &"0".repeat(64)).unwrap();
        assert_ne!(a, c);
        assert_eq!(format!("{a:?}"), format!("sha1:{}", "0".repeat(40)));
    }

    #[test]
    fn names() {
        for kind in [ChecksumType::Sha1, ChecksumType::Sha256] {
            assert_eq!(ChecksumType::from_name(kind.name()), Some(kind));
            assert_eq!(kind.hex_len(), Hasher::digest(kind, b"").to_hex().len());
        }
        // hashlib's spellings, which bmaptool takes.
        for name in ["SHA256", "Sha-256", "sha2-256"] {
            assert_eq!(ChecksumType::from_name(name), Some(ChecksumType::Sha256));
        }
        assert_eq!(ChecksumType::from_name("SHA-1"), Some(ChecksumType::Sha1));
        for name in ["sha512", "md5", "sha256 ", "sha_256", ""] {
            assert_eq!(ChecksumType::from_name(name), None, "{name:?}");
        }
    }
}
