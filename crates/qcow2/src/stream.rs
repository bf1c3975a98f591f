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

use std::collections::BTreeMap;
use std::io::{self, Read};

use crate::compress::decompress;
use crate::entry::{Geometry, L1Entry, L2Mapping, RefcountTableEntry, SubclusterBitmap};
use crate::error::Error;
use crate::header::{Header, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, RawHeader};
use crate::types::{GuestOffset, be64};

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

/// Everything that can go wrong decoding a qcow2 stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// Reading from the underlying reader failed.
    #[error("reading the stream at {offset:#x}")]
    Read {
        /// Stream offset of the read.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The header is not a valid qcow2 header (garbage, truncated,
    /// encrypted, unknown incompatible features...).
    #[error("qcow2 stream header")]
    Header {
        /// What is wrong.
        #[source]
        source: Error,
    },
    /// The image has a backing file.
    #[error(
        "the image has a backing file {name:?}: a stream with a backing file can not be decoded alone"
    )]
    BackingFile {
        /// The backing file name as stored.
        name: String,
    },
    /// The image keeps its data in an external data file.
    #[error(
        "the image keeps its guest data in an external data file {name:?}: a stream does not carry it"
    )]
    ExternalDataFile {
        /// The data file name from its header extension, if any.
        name: Option<String>,
    },
    /// The corrupt bit is set: qemu itself distrusts every table.
    #[error("the image is marked corrupt (incompatible feature bit 1)")]
    Corrupt,
    /// A table entry is invalid.
    #[error("invalid qcow2 table entry")]
    Entry {
        /// What is wrong, with the table offset and entry index.
        #[source]
        source: Error,
    },
    /// The tables are larger than [`StreamLimits::max_metadata_bytes`].
    #[error("the stream's {what} takes {bytes} bytes, more than the cap of {cap} bytes")]
    TooMuchMetadata {
        /// `tables` (L1, L2 and refcount tables) or `cluster map`.
        what: &'static str,
        /// Bytes needed.
        bytes: u64,
        /// The cap.
        cap: u64,
    },
    /// The stream ends before a table or a data cluster is complete.
    #[error(
        "the stream ends at {end:#x}, short of the {what} at {offset:#x}..{region_end:#x}: truncated stream"
    )]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Its start.
        offset: u64,
        /// Its end.
        region_end: u64,
        /// Where the stream ended.
        end: u64,
    },
    /// Data clusters are referenced past the end of the stream.
    #[error(
        "{count} referenced data clusters lie beyond the end of the stream at {end:#x}, \
         the first for guest {guest:#x} at host {host:#x}"
    )]
    BeyondEnd {
        /// Clusters never reached.
        count: u64,
        /// Guest offset of the first.
        guest: u64,
        /// Host offset of the first.
        host: u64,
        /// Where the stream ended.
        end: u64,
    },
    /// A table comes after data the stream has already passed.
    #[error("the {what} at {offset:#x} comes after data at {data:#x}: not a forward-only stream")]
    NotForward {
        /// The table.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Host offset of the first data cluster before it.
        data: u64,
    },
    /// A table lies before the table that points to it.
    #[error(
        "the {what} at {offset:#x} lies before the {referrer} at {referrer_offset:#x} \
         that points to it: not a forward-only stream"
    )]
    TableBehind {
        /// The table pointed to.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// The table pointing to it.
        referrer: &'static str,
        /// Offset of that table.
        referrer_offset: u64,
    },
    /// Host bytes used by two structures.
    #[error("the {what} at {offset:#x} overlaps the {other} at {other_offset:#x}")]
    Overlap {
        /// The later structure.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// The structure it overlaps.
        other: &'static str,
        /// Its offset.
        other_offset: u64,
    },
    /// Two guest clusters map to the same host bytes.
    #[error(
        "guest clusters {guest:#x} and {other_guest:#x} both map to host {host:#x}: duplicate reference"
    )]
    DuplicateReference {
        /// The host offset referenced twice.
        host: u64,
        /// One guest offset.
        guest: u64,
        /// The other.
        other_guest: u64,
    },
    /// A compressed cluster does not decompress.
    #[error("guest cluster {guest:#x}")]
    Decompress {
        /// Guest offset of the cluster.
        guest: u64,
        /// The decompression error, with host offset and size.
        #[source]
        source: Error,
    },
}

type Result<T, E = StreamError> = std::result::Result<T, E>;

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

/// One run of guest data read from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Where the data goes in the virtual disk.
    pub guest_offset: GuestOffset,
    /// The data: whole clusters or subclusters, clipped at the virtual
    /// size; at most [`MAX_CHUNK_BYTES`] or one cluster.
    pub data: Vec<u8>,
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
        let cap = limits.max_metadata_bytes;
        let cs = header.cluster_size();
        // No data file: refused in `new`.
        let geometry = header.geometry();
        let mut tables = Tables {
            pending: BTreeMap::new(),
            read: vec![Region {
                start: 0,
                end: cs,
                what: "header",
            }],
        };
        let l1_bytes = u64::from(header.l1_size) * 8;
        let mut announced = header.refcount_table_bytes() + l1_bytes;
        check_cap("tables", announced, cap)?;
        tables.schedule(
            &r,
            header.refcount_table_offset.0,
            header.refcount_table_bytes(),
            Meta::RefcountTable,
            ("header", 0),
        )?;
        if header.l1_size > 0 {
            tables.schedule(
                &r,
                header.l1_table_offset.0,
                l1_bytes,
                Meta::L1,
                ("header", 0),
            )?;
        }

        let mut pieces: Vec<Piece> = Vec::new();
        let mut buf = Vec::new();
        while let Some((start, p)) = tables.pending.pop_first() {
            if start < r.pos {
                return Err(tables.behind(start, p.end, p.table.name(), p.referrer));
            }
            buf.clear();
            r.skip_to(start)?;
            if r.pos == start {
                r.append(&mut buf, p.end - start)?;
            }
            if r.pos < p.end {
                return Err(StreamError::Truncated {
                    what: p.table.name(),
                    offset: start,
                    region_end: p.end,
                    end: r.pos,
                });
            }
            tables.read.push(Region {
                start,
                end: p.end,
                what: p.table.name(),
            });
            match p.table {
                Meta::RefcountTable => {
                    for (index, e) in buf.chunks_exact(8).enumerate() {
                        let e = RefcountTableEntry(be64(e, 0));
                        let problem = if e.0 & RefcountTableEntry::RESERVED_MASK != 0 {
                            Some("reserved bits set")
                        } else if e.0 & (cs - 1) != 0 {
                            Some("refcount block offset not cluster aligned")
                        } else {
                            None
                        };
                        if let Some(problem) = problem {
                            return Err(StreamError::Entry {
                                source: Error::BadRefcountEntry {
                                    table_offset: start,
                                    index: index as u64,
                                    entry: e.0,
                                    problem,
                                },
                            });
                        }
                        if let Some(block) = e.block_offset() {
                            tables.schedule(
                                &r,
                                block.0,
                                cs,
                                Meta::RefcountBlock,
                                ("refcount table", start),
                            )?;
                        }
                    }
                }
                Meta::RefcountBlock => {}
                Meta::L1 => {
                    for (index, e) in buf.chunks_exact(8).enumerate() {
                        let e = L1Entry(be64(e, 0));
                        e.validate(header.cluster_bits)
                            .map_err(|problem| StreamError::Entry {
                                source: Error::BadL1Entry {
                                    table_offset: start,
                                    index: index as u64,
                                    entry: e.0,
                                    problem,
                                },
                            })?;
                        if let Some(l2) = e.l2_offset() {
                            announced += cs;
                            check_cap("tables", announced, cap)?;
                            tables.schedule(
                                &r,
                                l2.0,
                                cs,
                                Meta::L2 {
                                    l1_index: index as u64,
                                },
                                ("L1 table", start),
                            )?;
                        }
                    }
                }
                Meta::L2 { l1_index } => {
                    map_l2(&header, geometry, &buf, start, l1_index, &mut pieces, cap)?;
                }
            }
        }

        pieces.sort_unstable_by_key(|p| (p.host, p.guest));
        check_pieces(&pieces, &tables.read, cs)?;
        pieces.retain(|p| !matches!(p.kind, Kind::Reserved));
        let mut data_bytes = 0;
        for p in &pieces {
            data_bytes += guest_bytes(&header, p);
        }
        Ok(Chunks {
            r,
            header,
            pieces,
            next: 0,
            sub: 0,
            carry: Vec::new(),
            carry_start: 0,
            spare: Vec::new(),
            data_bytes,
            deferred: None,
            done: false,
        })
    }
}

fn check_cap(what: &'static str, bytes: u64, cap: u64) -> Result<()> {
    if bytes > cap {
        return Err(StreamError::TooMuchMetadata { what, bytes, cap });
    }
    Ok(())
}

/// The tables the decoder reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Meta {
    RefcountTable,
    RefcountBlock,
    L1,
    L2 { l1_index: u64 },
}

impl Meta {
    fn name(self) -> &'static str {
        match self {
            Meta::RefcountTable => "refcount table",
            Meta::RefcountBlock => "refcount block",
            Meta::L1 => "L1 table",
            Meta::L2 { .. } => "L2 table",
        }
    }
}

/// A table known but not read yet.
#[derive(Debug)]
struct PendingTable {
    end: u64,
    table: Meta,
    referrer: (&'static str, u64),
}

/// Host bytes of a structure already read.
#[derive(Debug, Clone, Copy)]
struct Region {
    start: u64,
    end: u64,
    what: &'static str,
}

#[derive(Debug)]
struct Tables {
    /// Tables to read, by host offset.
    pending: BTreeMap<u64, PendingTable>,
    /// Structures read, in host order (each starts at or after the end of
    /// the one before).
    read: Vec<Region>,
}

impl Tables {
    /// Adds a table to read; refuses one the stream has already passed
    /// or one that starts where another does.
    fn schedule<R>(
        &mut self,
        r: &Forward<R>,
        start: u64,
        len: u64,
        table: Meta,
        referrer: (&'static str, u64),
    ) -> Result<()> {
        let end = start.saturating_add(len);
        if start < r.pos {
            return Err(self.behind(start, end, table.name(), referrer));
        }
        if let Some(other) = self.pending.get(&start) {
            return Err(StreamError::Overlap {
                what: table.name(),
                offset: start,
                other: other.table.name(),
                other_offset: start,
            });
        }
        self.pending.insert(
            start,
            PendingTable {
                end,
                table,
                referrer,
            },
        );
        Ok(())
    }

    /// The error for a table at `start..end` the stream has passed: it
    /// overlaps a structure read, or lies behind its referrer.
    fn behind(
        &self,
        start: u64,
        end: u64,
        what: &'static str,
        (referrer, referrer_offset): (&'static str, u64),
    ) -> StreamError {
        if let Some(other) = self.overlapping(start, end) {
            return StreamError::Overlap {
                what,
                offset: start,
                other: other.what,
                other_offset: other.start,
            };
        }
        StreamError::TableBehind {
            what,
            offset: start,
            referrer,
            referrer_offset,
        }
    }

    /// A structure read that shares bytes with `start..end`.
    fn overlapping(&self, start: u64, end: u64) -> Option<&Region> {
        let i = self.read.partition_point(|r| r.end <= start);
        self.read.get(i).filter(|r| r.start < end)
    }
}

/// What a guest cluster with host data holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Standard cluster; bit `i` set when subcluster `i` holds data (bit
    /// 0 alone without extended L2 entries).
    Data(u32),
    /// Compressed data of this many bytes.
    Compressed(u32),
    /// A host cluster with nothing to read: a preallocated zero cluster,
    /// or one whose subclusters are all zero or unallocated. Only checked
    /// for duplicate references.
    Reserved,
}

/// One guest cluster with host data: the compact map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    host: u64,
    guest: u64,
    kind: Kind,
}

const _: () = assert!(size_of::<Piece>() == 24);

impl Piece {
    /// Host bytes the piece takes.
    fn host_end(&self, cs: u64) -> u64 {
        match self.kind {
            Kind::Compressed(size) => self.host + u64::from(size),
            _ => self.host + cs,
        }
    }
}

/// Adds the clusters with host data of one L2 table to `pieces`.
fn map_l2(
    header: &Header,
    geometry: Geometry,
    table: &[u8],
    table_offset: u64,
    l1_index: u64,
    pieces: &mut Vec<Piece>,
    cap: u64,
) -> Result<()> {
    let cs = header.cluster_size();
    let entry_size = header.l2_entry_size() as usize;
    let first_guest = l1_index * header.l1_span();
    for (index, e) in table.chunks_exact(entry_size).enumerate() {
        let guest = first_guest + index as u64 * cs;
        if guest >= header.size {
            // Entries past the end of the disk are never read by qemu.
            break;
        }
        let entry = be64(e, 0);
        let bitmap = if geometry.extended_l2 { be64(e, 8) } else { 0 };
        let mapping =
            L2Mapping::decode(entry, bitmap, geometry).map_err(|problem| StreamError::Entry {
                source: Error::BadL2Entry {
                    table_offset,
                    index: index as u64,
                    entry,
                    problem,
                },
            })?;
        let (host, kind) = match mapping {
            L2Mapping::Unallocated
            | L2Mapping::UnallocatedSubclusters { .. }
            | L2Mapping::Zero { host: None } => continue,
            L2Mapping::Zero { host: Some(h) } => (h, Kind::Reserved),
            L2Mapping::Standard {
                host,
                subclusters: None,
            } => (host, Kind::Data(1)),
            L2Mapping::Standard {
                host,
                subclusters: Some(bm),
            } => {
                // decode() refuses a subcluster both allocated and zero.
                let alloc = (bm.0 & SubclusterBitmap::ALLOC_MASK) as u32;
                (
                    host,
                    if alloc == 0 {
                        Kind::Reserved
                    } else {
                        Kind::Data(alloc)
                    },
                )
            }
            L2Mapping::Compressed { host, size } => {
                // At most 2^(cluster_bits - 8) sectors: 2 * cluster size.
                let size = u32::try_from(size).unwrap_or(u32::MAX);
                (host, Kind::Compressed(size))
            }
        };
        let bytes = (pieces.len() as u64 + 1) * size_of::<Piece>() as u64;
        check_cap("cluster map", bytes, cap)?;
        pieces.push(Piece {
            host: host.0,
            guest,
            kind,
        });
    }
    Ok(())
}

/// Checks the host-sorted map: no host bytes referenced twice, nothing
/// to read before the end of the tables.
fn check_pieces(pieces: &[Piece], tables: &[Region], cs: u64) -> Result<()> {
    let meta_end = tables.last().map_or(0, |r| r.end);
    // The piece reaching furthest so far.
    let mut reach: Option<(u64, &Piece)> = None;
    for p in pieces {
        let end = p.host_end(cs);
        if let Some((q_end, q)) = reach
            && q_end > p.host
        {
            // qemu packs compressed clusters byte after byte while their
            // descriptors round up to whole sectors: such ranges overlap.
            let packed = matches!(q.kind, Kind::Compressed(_))
                && matches!(p.kind, Kind::Compressed(_))
                && q.host != p.host;
            if !packed {
                return Err(StreamError::DuplicateReference {
                    host: p.host,
                    guest: p.guest,
                    other_guest: q.guest,
                });
            }
        }
        if reach.is_none_or(|(q_end, _)| end > q_end) {
            reach = Some((end, p));
        }
        if p.host < meta_end {
            let i = tables.partition_point(|r| r.end <= p.host);
            if let Some(t) = tables.get(i) {
                if t.start < end {
                    return Err(StreamError::Overlap {
                        what: "data cluster",
                        offset: p.host,
                        other: t.what,
                        other_offset: t.start,
                    });
                }
                if !matches!(p.kind, Kind::Reserved) {
                    return Err(StreamError::NotForward {
                        what: t.what,
                        offset: t.start,
                        data: p.host,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Guest bytes a piece yields.
fn guest_bytes(header: &Header, p: &Piece) -> u64 {
    let cs = header.cluster_size();
    let in_disk = header.size.saturating_sub(p.guest);
    match p.kind {
        Kind::Reserved => 0,
        Kind::Compressed(_) => cs.min(in_disk),
        Kind::Data(mask) => {
            let sc = header.subcluster_size();
            (0..header.subclusters())
                .filter(|&i| mask >> i & 1 != 0)
                .map(|i| sc.min(in_disk.saturating_sub(i * sc)))
                .sum()
        }
    }
}

/// A run of allocated subclusters of one piece.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Index of the piece.
    piece: usize,
    /// First subcluster after the run.
    sub_end: u32,
    host: u64,
    guest: u64,
    len: u64,
}

/// What comes next in the stream.
#[derive(Debug)]
enum Next {
    Run(Run),
    Compressed { piece: Piece, size: u64 },
    End,
}

/// The data of a stream, in host order: an iterator of [`Chunk`]s made
/// by [`StreamDecoder::read_tables`]. It stops after the first error.
#[derive(Debug)]
pub struct Chunks<R> {
    r: Forward<R>,
    header: Header,
    /// Pieces to read, sorted by host offset.
    pieces: Vec<Piece>,
    /// The piece to read next.
    next: usize,
    /// The first subcluster of that piece not read yet.
    sub: u32,
    /// Bytes `carry_start..r.pos` of the last compressed cluster read:
    /// the next compressed cluster may start inside them.
    carry: Vec<u8>,
    carry_start: u64,
    /// A buffer given back by the caller.
    spare: Vec<u8>,
    data_bytes: u64,
    /// An error met while extending a chunk: returned after the chunk.
    deferred: Option<StreamError>,
    done: bool,
}

impl<R: Read> Chunks<R> {
    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Size of the virtual disk in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.header.size
    }

    /// Guest bytes the iterator will yield in all: the total for a
    /// progress bar.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Guest clusters (standard or compressed) with data to yield.
    pub fn data_clusters(&self) -> usize {
        self.pieces.len()
    }

    /// Bytes of the stream consumed so far.
    pub fn position(&self) -> u64 {
        self.r.pos
    }

    /// Gives back the buffer of a chunk the caller is done with, to be
    /// reused for a later chunk.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() > self.spare.capacity() {
            self.spare = buf;
        }
    }

    /// The underlying reader, positioned after the last byte consumed.
    pub fn into_inner(self) -> R {
        self.r.inner
    }

    /// Finds what comes next from the cursor, stepping over pieces with
    /// nothing left inside the disk.
    fn peek(&mut self) -> Next {
        let cs = self.header.cluster_size();
        let sc = self.header.subcluster_size();
        let nsub = self.header.subclusters() as u32;
        while let Some(&p) = self.pieces.get(self.next) {
            let mask = match p.kind {
                Kind::Compressed(size) => {
                    return Next::Compressed {
                        piece: p,
                        size: size.into(),
                    };
                }
                Kind::Data(mask) => mask,
                Kind::Reserved => 0,
            };
            let rest = if self.sub >= 32 {
                0
            } else {
                mask >> self.sub << self.sub
            };
            if rest != 0 {
                let a = rest.trailing_zeros();
                let b = (a + (rest >> a).trailing_ones()).min(nsub);
                let guest = p.guest + u64::from(a) * sc;
                if guest < self.header.size {
                    let len = (u64::from(b - a) * sc).min(self.header.size - guest);
                    return Next::Run(Run {
                        piece: self.next,
                        sub_end: b,
                        host: p.host + u64::from(a) * sc,
                        guest,
                        len: len.min(cs),
                    });
                }
            }
            self.next += 1;
            self.sub = 0;
        }
        Next::End
    }

    /// Moves the cursor past a run.
    fn consume(&mut self, run: &Run) {
        self.next = run.piece;
        self.sub = run.sub_end;
    }

    fn beyond_end(&self, piece: usize) -> StreamError {
        let p = self.pieces[piece];
        StreamError::BeyondEnd {
            count: (self.pieces.len() - piece) as u64,
            guest: p.guest,
            host: p.host,
            end: self.r.pos,
        }
    }

    /// Reads one run at the end of `buf`.
    fn read_run(&mut self, run: &Run, buf: &mut Vec<u8>) -> Result<()> {
        self.r.skip_to(run.host)?;
        if self.r.pos < run.host {
            return Err(self.beyond_end(run.piece));
        }
        let at = buf.len();
        buf.resize(at + run.len as usize, 0);
        let n = self.r.fill(&mut buf[at..])?;
        if n < run.len as usize {
            return Err(if n == 0 && run.host == self.pieces[run.piece].host {
                self.beyond_end(run.piece)
            } else {
                StreamError::Truncated {
                    what: "data cluster",
                    offset: run.host,
                    region_end: run.host + run.len,
                    end: self.r.pos,
                }
            });
        }
        Ok(())
    }

    fn step(&mut self) -> Result<Option<Chunk>> {
        let max = MAX_CHUNK_BYTES.max(self.header.cluster_size());
        match self.peek() {
            Next::End => Ok(None),
            Next::Compressed { piece, size } => {
                self.next += 1;
                self.sub = 0;
                self.compressed(piece, size).map(Some)
            }
            Next::Run(first) => {
                let mut data = std::mem::take(&mut self.spare);
                data.clear();
                self.read_run(&first, &mut data)?;
                self.consume(&first);
                let (host0, guest0) = (first.host, first.guest);
                // Merge what follows on both sides, clusters or subclusters.
                while let Next::Run(run) = self.peek() {
                    let len = data.len() as u64;
                    if run.host != host0 + len || run.guest != guest0 + len || len + run.len > max {
                        break;
                    }
                    let before = data.len();
                    if let Err(e) = self.read_run(&run, &mut data) {
                        // Hand over what was read; the error comes next.
                        data.truncate(before);
                        self.deferred = Some(e);
                        break;
                    }
                    self.consume(&run);
                }
                Ok(Some(Chunk {
                    guest_offset: GuestOffset(guest0),
                    data,
                }))
            }
        }
    }

    /// Reads and decompresses one compressed cluster.
    fn compressed(&mut self, p: Piece, size: u64) -> Result<Chunk> {
        let end = p.host + size;
        if p.host >= self.r.pos {
            self.r.skip_to(p.host)?;
            self.carry.clear();
            self.carry_start = self.r.pos;
        } else if p.host >= self.carry_start {
            // Packed after the previous compressed cluster: its bytes are
            // kept (check_pieces allows no other overlap).
            let drop = (p.host - self.carry_start) as usize;
            self.carry.drain(..drop.min(self.carry.len()));
            self.carry_start = p.host;
        } else {
            return Err(StreamError::DuplicateReference {
                host: p.host,
                guest: p.guest,
                other_guest: p.guest,
            });
        }
        if self.carry_start < p.host {
            return Err(self.beyond_end(self.next - 1));
        }
        if end > self.r.pos {
            let want = end - self.r.pos;
            self.r.append(&mut self.carry, want)?;
        }
        let avail = self.carry.len().min(size as usize);
        if avail == 0 {
            return Err(self.beyond_end(self.next - 1));
        }
        // The last compressed cluster's sector count may reach past the
        // end of the file (qemu reads zeros there); a short input is only
        // an error if it does not decompress to a full cluster.
        let cs = self.header.cluster_size();
        let mut out = decompress(
            self.header.compression_type,
            &self.carry[..avail],
            cs as usize,
        )
        .map_err(|problem| StreamError::Decompress {
            guest: p.guest,
            source: Error::Decompress {
                host_offset: p.host,
                size,
                problem,
            },
        })?;
        out.truncate(cs.min(self.header.size - p.guest) as usize);
        Ok(Chunk {
            guest_offset: GuestOffset(p.guest),
            data: out,
        })
    }
}

impl<R: Read> Iterator for Chunks<R> {
    type Item = Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if let Some(e) = self.deferred.take() {
            self.done = true;
            return Some(Err(e));
        }
        match self.step() {
            Ok(Some(c)) => Some(Ok(c)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl<R: Read> std::iter::FusedIterator for Chunks<R> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::{StreamLayout, write_stream};

    /// A stream of `size` bytes with clusters of `1 << bits` bytes, data
    /// in the `(start, end)` ranges, cluster `i` filled with byte `i + 1`.
    fn stream(size: u64, bits: u32, ranges: &[(u64, u64)]) -> Vec<u8> {
        let layout = StreamLayout::new(size, bits, ranges.iter().map(|&(a, b)| a..b)).unwrap();
        write_stream(Vec::new(), &layout, |g, buf| {
            buf.fill(((g.0 >> bits) as u8).wrapping_add(1));
            Ok(())
        })
        .unwrap()
    }

    fn chunks(s: &[u8]) -> Vec<(u64, usize)> {
        StreamDecoder::new(s)
            .unwrap()
            .read_tables()
            .unwrap()
            .map(|c| c.map(|c| (c.guest_offset.0, c.data.len())))
            .collect::<Result<_>>()
            .unwrap()
    }

    #[test]
    fn virtual_size_not_a_multiple_of_512_clips_the_last_chunk() {
        let mut s = stream(1 << 20, 16, &[((1 << 20) - 1, 1 << 20)]);
        let size = (1u64 << 20) - 100;
        s[24..32].copy_from_slice(&size.to_be_bytes()); // header: size
        let d = StreamDecoder::new(&s[..]).unwrap();
        assert_eq!(d.virtual_size(), size);
        let c = d.read_tables().unwrap();
        assert_eq!(c.data_bytes(), 65536 - 100);
        let all: Vec<Chunk> = c.collect::<Result<_>>().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].guest_offset, GuestOffset(15 << 16));
        assert_eq!(all[0].data, vec![16u8; 65536 - 100]);
    }

    #[test]
    fn contiguous_clusters_merge_up_to_the_chunk_cap() {
        // 512-byte clusters, 3 MiB of data then a gap then one cluster.
        let s = stream(8 << 20, 9, &[(0, 3 << 20), (5 << 20, (5 << 20) + 1)]);
        assert_eq!(
            chunks(&s),
            [
                (0, 1 << 20),
                (1 << 20, 1 << 20),
                (2 << 20, 1 << 20),
                (5 << 20, 512)
            ]
        );
        // 2 MiB clusters are never merged past one cluster.
        let s = stream(8 << 20, 21, &[(0, 4 << 20)]);
        assert_eq!(chunks(&s), [(0, 2 << 20), (2 << 20, 2 << 20)]);
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

    #[test]
    fn refuses_a_table_inside_the_header_cluster() {
        let mut s = stream(1 << 20, 16, &[(0, 1)]);
        s[48..56].copy_from_slice(&0u64.to_be_bytes()); // refcount table at 0
        let e = StreamDecoder::new(&s[..])
            .unwrap()
            .read_tables()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the refcount table at 0x0 overlaps the header at 0x0"
        );
    }
}
