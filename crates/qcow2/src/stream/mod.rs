//! Decoding a qcow2 image from a stream that can only be read forward
//! (standard input, a pipe, a socket), in the layout of qemu's
//! `scripts/qcow2-to-stdout.py`: header cluster, refcount table, refcount
//! blocks, L1 table, L2 tables, then the data clusters.
//!
//! [`StreamDecoder::new`] reads and checks the header, so the virtual size
//! is known before anything else. [`StreamDecoder::read_tables`] then reads
//! forward through the metadata, discarding bytes no table points to, and
//! turns the L2 tables into a compact host-ordered map of the data
//! clusters (24 bytes per allocated cluster; the tables themselves are not
//! kept). The [`Chunks`] it returns is a pull iterator of [`Chunk`]s,
//! guest data in the order its host clusters arrive.
//!
//! Only data is yielded. Unallocated clusters, zero clusters (with or
//! without a preallocated host cluster) and unallocated or zero
//! subclusters are left out: every byte of the virtual disk that no chunk
//! covers reads as zeros, so the caller starts from a zeroed or sparse
//! destination of [`StreamDecoder::virtual_size`] bytes.
//!
//! The decoder refuses, with a [`StreamError`] that says why, everything it
//! could not decode with bounded memory or could only decode wrongly: a
//! table after data, a table behind one that points to it, host bytes
//! referenced twice, references past the end of the stream, truncation,
//! a backing file, an external data file, encryption and unknown
//! incompatible features.

mod chunks;
mod error;
mod pieces;
mod tables;
mod writer;

use std::io::{self, Read};

pub use chunks::{Chunk, Chunks};
pub use error::StreamError;
pub use writer::{DEFAULT_CLUSTER_BITS, StreamLayout, StreamWriter, WriteError, write_stream};

use crate::error::Error;
use crate::header::{Header, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, RawHeader};
use error::Result;

/// Default cap on the metadata a stream may make the decoder hold: 1 GiB.
pub const DEFAULT_MAX_METADATA_BYTES: u64 = 1 << 30;

/// Largest chunk the decoder yields when it merges host- and
/// guest-contiguous clusters: 1 MiB, or one cluster when clusters are
/// larger.
pub const MAX_CHUNK_BYTES: u64 = 1 << 20;

/// Caps on what a stream may make the decoder allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Cap on the L1 table, the L2 tables and the refcount table together,
    /// as their sizes are announced (header and L1 entries), checked
    /// before they are read; and, separately, on the memory of the
    /// cluster map the decoder builds from the L2 tables (24 bytes per
    /// cluster with host data). Default [`DEFAULT_MAX_METADATA_BYTES`].
    pub max_metadata_bytes: u64,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            max_metadata_bytes: DEFAULT_MAX_METADATA_BYTES,
        }
    }
}

/// A reader that counts the bytes it has consumed.
#[derive(Debug)]
struct Forward<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Forward<R> {
    /// Reads until `buf` is full or the stream ends; returns the count.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(StreamError::Read {
                        offset: self.pos + done as u64,
                        source,
                    });
                }
            }
        }
        self.pos += done as u64;
        Ok(done)
    }

    /// Appends up to `len` bytes to `buf`, growing it only as bytes arrive.
    fn append(&mut self, buf: &mut Vec<u8>, len: u64) -> Result<()> {
        let before = buf.len();
        let r = (&mut self.inner).take(len).read_to_end(buf);
        let got = (buf.len() - before) as u64;
        self.pos += got;
        r.map(drop).map_err(|source| StreamError::Read {
            offset: self.pos,
            source,
        })
    }

    /// Reads and discards bytes up to `target` or the end of the stream.
    fn skip_to(&mut self, target: u64) -> Result<()> {
        if target > self.pos {
            let mut take = (&mut self.inner).take(target - self.pos);
            let r = io::copy(&mut take, &mut io::sink());
            let left = take.limit();
            self.pos = target - left;
            r.map_err(|source| StreamError::Read {
                offset: self.pos,
                source,
            })?;
        }
        Ok(())
    }
}

/// Reads a qcow2 image from a forward-only stream. See the module docs.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use sparsekit_qcow2::{StreamDecoder, StreamLayout, write_stream};
///
/// // A 1 MiB disk with data in its second 64 KiB cluster.
/// let layout = StreamLayout::new(1 << 20, 16, [65536..70000])?;
/// let stream = write_stream(Vec::new(), &layout, |_, buf| {
///     buf.fill(7);
///     Ok(())
/// })?;
///
/// let decoder = StreamDecoder::new(&stream[..])?;
/// assert_eq!(decoder.virtual_size(), 1 << 20);
/// let mut disk = vec![0u8; decoder.virtual_size() as usize];
/// let chunks = decoder.read_tables()?;
/// assert_eq!(chunks.data_bytes(), 65536);
/// for chunk in chunks {
///     let chunk = chunk?;
///     let at = chunk.guest_offset.0 as usize;
///     disk[at..at + chunk.data.len()].copy_from_slice(&chunk.data);
/// }
/// assert!(disk[65536..131072].iter().all(|&b| b == 7));
/// assert!(disk[131072..].iter().all(|&b| b == 0));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct StreamDecoder<R> {
    r: Forward<R>,
    header: Header,
    limits: StreamLimits,
}

impl<R: Read> StreamDecoder<R> {
    /// Reads and checks the header cluster, with default limits.
    pub fn new(reader: R) -> Result<Self> {
        Self::with_limits(reader, StreamLimits::default())
    }

    /// Reads and checks the header cluster.
    pub fn with_limits(reader: R, limits: StreamLimits) -> Result<Self> {
        let header_err = |source| StreamError::Header { source };
        let mut r = Forward {
            inner: reader,
            pos: 0,
        };
        // The smallest cluster first: it holds every fixed header field.
        let first = 1usize << MIN_CLUSTER_BITS;
        let mut buf = vec![0u8; first];
        let n = r.fill(&mut buf)?;
        buf.truncate(n);
        let raw = RawHeader::decode(&buf).map_err(header_err)?;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&raw.cluster_bits.get()) {
            return Err(header_err(Error::BadField {
                field: "cluster_bits",
                value: raw.cluster_bits.get().into(),
                expected: "9..=21",
            }));
        }
        if n == first {
            let rest = (1u64 << raw.cluster_bits.get()) - first as u64;
            r.append(&mut buf, rest)?;
        }
        let header = Header::parse(&buf).map_err(header_err)?;
        if let Some(name) = &header.backing_file {
            return Err(StreamError::BackingFile { name: name.clone() });
        }
        if header.has_data_file() {
            return Err(StreamError::ExternalDataFile {
                name: header.data_file.clone(),
            });
        }
        if header.corrupt() {
            return Err(StreamError::Corrupt);
        }
        Ok(StreamDecoder { r, header, limits })
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Size of the virtual disk in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.header.size
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Reads forward through the refcount table and blocks, the L1 table
    /// and the L2 tables, and returns the iterator over the data.
    ///
    /// Every table must start at or after the end of the previous one read
    /// (tables are read in host order as they become known), and every
    /// data cluster must come after the last table.
    pub fn read_tables(self) -> Result<Chunks<R>> {
        let StreamDecoder {
            mut r,
            header,
            limits,
        } = self;
        let (pieces, read) = tables::read(&mut r, &header, limits.max_metadata_bytes)?;
        let (pieces, data_bytes) = pieces::arrange(pieces, &read, &header)?;
        Ok(Chunks::new(r, header, pieces, data_bytes))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A stream of `size` bytes with clusters of `1 << bits` bytes, data
    /// in the `(start, end)` ranges, cluster `i` filled with byte `i + 1`.
    pub(crate) fn stream(size: u64, bits: u32, ranges: &[(u64, u64)]) -> Vec<u8> {
        let layout = StreamLayout::new(size, bits, ranges.iter().map(|&(a, b)| a..b)).unwrap();
        write_stream(Vec::new(), &layout, |g, buf| {
            buf.fill(((g.0 >> bits) as u8).wrapping_add(1));
            Ok(())
        })
        .unwrap()
    }

    pub(crate) fn chunks(s: &[u8]) -> Vec<(u64, usize)> {
        StreamDecoder::new(s)
            .unwrap()
            .read_tables()
            .unwrap()
            .map(|c| c.map(|c| (c.guest_offset.0, c.data.len())))
            .collect::<Result<_>>()
            .unwrap()
    }

    #[test]
    fn reports_sizes_before_the_data() {
        let s = stream(3 << 20, 16, &[(0, 1), (2 << 20, (2 << 20) + 70_000)]);
        let d = StreamDecoder::new(&s[..]).unwrap();
        assert_eq!((d.virtual_size(), d.cluster_size()), (3 << 20, 65536));
        let c = d.read_tables().unwrap();
        assert_eq!(c.data_clusters(), 3);
        assert_eq!(c.data_bytes(), 3 * 65536);
        assert_eq!(c.position() % 65536, 0, "all tables read, no data yet");
    }

    /// A reader that fails after `left` bytes.
    struct Failing<'a> {
        inner: &'a [u8],
        left: usize,
    }

    impl Read for Failing<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::Error::other("cable unplugged"));
            }
            let n = buf.len().min(self.left);
            let n = self.inner.read(&mut buf[..n])?;
            self.left -= n;
            Ok(n)
        }
    }

    #[test]
    fn read_errors_are_typed_and_stop_the_iterator() {
        let s = stream(1 << 20, 16, &[(0, 1 << 20)]);
        let cut = s.len() - 65536 - 10;
        let r = Failing {
            inner: &s[..],
            left: cut,
        };
        let mut c = StreamDecoder::new(r).unwrap().read_tables().unwrap();
        let mut errors = 0;
        for item in c.by_ref() {
            if let Err(e) = item {
                assert!(
                    matches!(&e, StreamError::Read { offset, .. } if *offset == cut as u64),
                    "{e:?}"
                );
                errors += 1;
            }
        }
        assert_eq!(errors, 1);
        assert!(c.next().is_none());
    }
}
