//! Compressed raw images (gzip, xz, zstd, bzip2), recognised by their
//! magic and read as a forward-only stream of the image's bytes.

use std::fmt;
use std::io::{self, Read};

/// A compression format of a raw image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// gzip (RFC 1952); concatenated members, as `pigz` writes, are read on.
    Gzip,
    /// xz; concatenated streams are read on, as `xz -d` does.
    Xz,
    /// Zstandard; every frame is read.
    Zstd,
    /// bzip2; concatenated streams, as `pbzip2` writes, are read on.
    Bzip2,
}

/// Bytes [`Compression::sniff`] looks at.
pub const MAGIC_LEN: usize = 10;

impl Compression {
    /// The format whose magic `head` starts with, if any. bzip2's magic is
    /// short ("BZh" and a digit), so its first block's (or the empty
    /// stream's end) magic must follow too.
    pub fn sniff(head: &[u8]) -> Option<Self> {
        const BZ_BLOCK: [u8; 6] = [0x31, 0x41, 0x59, 0x26, 0x53, 0x59];
        const BZ_END: [u8; 6] = [0x17, 0x72, 0x45, 0x38, 0x50, 0x90];
        if head.starts_with(&[0x1f, 0x8b, 0x08]) {
            Some(Self::Gzip)
        } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Some(Self::Xz)
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Self::Zstd)
        } else if head.len() >= 10
            && head.starts_with(b"BZh")
            && (b'1'..=b'9').contains(&head[3])
            && (head[4..10] == BZ_BLOCK || head[4..10] == BZ_END)
        {
            Some(Self::Bzip2)
        } else {
            None
        }
    }

    /// The format's usual name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::Bzip2 => "bzip2",
        }
    }

    /// A reader of the decompressed bytes of `compressed`.
    pub fn decoder<'a>(
        self,
        compressed: impl Read + Send + 'a,
    ) -> io::Result<Box<dyn Read + Send + 'a>> {
        // The decoders read in large pieces: fewer reads of a pipe.
        let input = io::BufReader::with_capacity(1 << 20, compressed);
        Ok(match self {
            Self::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
            Self::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(input)),
            Self::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(input)?),
            Self::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(input)),
        })
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Reads from `r` until `buf` is full or the input ends; returns the bytes
/// read (short only at the end).
pub(crate) fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
        match c {
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Xz => {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(data, 1).unwrap(),
            Compression::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
        }
    }

    const ALL: [Compression; 4] = [
        Compression::Gzip,
        Compression::Xz,
        Compression::Zstd,
        Compression::Bzip2,
    ];

    #[test]
    fn each_format_is_known_by_its_magic_and_read_back_whole() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for c in ALL {
            let z = compress(c, &data);
            assert_eq!(Compression::sniff(&z[..MAGIC_LEN]), Some(c), "{c}");
            // Two streams end to end read as one, as the command-line tools do.
            let twice = [z.clone(), z].concat();
            let mut out = Vec::new();
            c.decoder(&twice[..])
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
            assert_eq!(out.len(), 2 * data.len(), "{c}");
            assert!(
                out[..data.len()] == data[..] && out[data.len()..] == data[..],
                "{c}"
            );
            // An empty input compresses to something that is still known.
            let empty = compress(c, b"");
            assert_eq!(Compression::sniff(&empty), Some(c), "{c} of nothing");
        }
    }

    #[test]
    fn raw_disks_are_not_mistaken_for_compressed() {
        for head in [
            &[0u8; 10][..],
            b"QFI\xfb\0\0\0\x03\0\0",
            b"\xeb\x63\x90\x10\x8e\xd0\xbc\0\xb0\xb8",
            b"BZh9 plain",
            b"\x1f\x8b",
        ] {
            assert_eq!(Compression::sniff(head), None, "{head:?}");
        }
    }

    #[test]
    fn a_truncated_stream_is_an_error_not_a_short_image() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 253) as u8).collect();
        for c in ALL {
            let z = compress(c, &data);
            let cut = &z[..z.len() - 20];
            let mut out = Vec::new();
            let r = c.decoder(cut).unwrap().read_to_end(&mut out);
            assert!(r.is_err(), "{c}: a cut stream read as {} bytes", out.len());
        }
    }

    #[test]
    fn read_full_fills_until_the_end() {
        let data = [7u8; 10];
        let mut r = io::Read::chain(&data[..4], &data[4..]);
        let mut buf = [0u8; 8];
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 8);
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 2);
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 0);
    }
}
