//! Writing a qcow2 v3 image strictly forward, in the layout of qemu's
//! `scripts/qcow2-to-stdout.py`: header cluster, refcount table, refcount
//! blocks (16-bit refcounts), L1 table, L2 tables, then the data clusters
//! in ascending guest order (so host order is guest order).
//!
//! Every table depends only on which guest clusters hold data, so
//! [`StreamLayout`] computes them from the list of data ranges before a
//! byte of data is read, and [`StreamWriter`] writes all the metadata at
//! once, then takes the data one cluster at a time. Memory: the merged
//! list of data ranges plus one cluster buffer; no table is kept.
//!
//! Clusters outside the data ranges are left unallocated (holes, reading
//! as zeros). Clusters inside them are written as data even when they
//! hold only zeros: the tables are written before the data is seen. A
//! caller that wants all-zero clusters left out filters them from its
//! ranges first (qcow2-to-stdout.py reads its input twice for that).

use std::io::{self, Write};
use std::ops::Range;

use zerocopy::IntoBytes;

use crate::header::{
    MAGIC, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MIN_CLUSTER_BITS, RawHeader,
};
use crate::types::{GuestOffset, HostOffset};

/// The cluster size qemu-img and qcow2-to-stdout.py use by default:
/// 64 KiB (`cluster_bits` 16).
pub const DEFAULT_CLUSTER_BITS: u32 = 16;

/// Header length written: the version 3 header with the compression type
/// byte, padded to a multiple of 8, as qemu 9 writes it.
const HEADER_LENGTH: u32 = 112;

/// Bit 63 of L1 and L2 entries: refcount exactly one.
const COPIED: u64 = 1 << 63;

/// Refcount width written: 16 bits (`refcount_order` 4), qemu's default.
const REFCOUNT_ORDER: u32 = 4;

/// Everything that can go wrong writing a qcow2 stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// A cluster size qemu does not open.
    #[error("cluster_bits {cluster_bits}: expected 9..=21 (512 B to 2 MiB clusters)")]
    ClusterBits {
        /// The value given.
        cluster_bits: u32,
    },
    /// A virtual size whose tables would pass qemu's caps.
    #[error(
        "virtual size {size:#x} needs {what} of {bytes} bytes, more than qemu's cap of {cap} bytes: \
         use larger clusters"
    )]
    TooLarge {
        /// The virtual size.
        size: u64,
        /// `an L1 table` or `a refcount table`.
        what: &'static str,
        /// Bytes it would take.
        bytes: u64,
        /// qemu's cap.
        cap: u64,
    },
    /// A data range outside the virtual disk.
    #[error("data range {start:#x}..{end:#x} ends past the virtual size {size:#x}")]
    RangeOutside {
        /// Start of the range.
        start: u64,
        /// Its end.
        end: u64,
        /// The virtual size.
        size: u64,
    },
    /// Writing the output failed.
    #[error("writing the {what} at {offset:#x}")]
    Write {
        /// What was being written.
        what: &'static str,
        /// Its stream offset.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The caller's source could not give a cluster.
    #[error("reading guest cluster {guest:#x} from the source")]
    Source {
        /// Guest offset of the cluster.
        guest: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A cluster given out of order.
    #[error("guest cluster {got:#x} given, guest cluster {expected:#x} expected next")]
    OutOfOrder {
        /// The guest offset given.
        got: u64,
        /// The one the layout wants next.
        expected: u64,
    },
    /// A cluster given after the last one.
    #[error("guest cluster {got:#x} given after the last data cluster")]
    NoMoreClusters {
        /// The guest offset given.
        got: u64,
    },
    /// More bytes than a cluster holds.
    #[error("{len} bytes given for guest cluster {guest:#x}, at most {max}")]
    ClusterTooLong {
        /// Guest offset of the cluster.
        guest: u64,
        /// Bytes given.
        len: usize,
        /// The cluster size, or what is left of the disk.
        max: u64,
    },
    /// [`StreamWriter::finish`] before every cluster was written.
    #[error("{missing} of {total} data clusters not written, the first at guest {next:#x}")]
    Unfinished {
        /// Clusters not written.
        missing: u64,
        /// Clusters in the layout.
        total: u64,
        /// Guest offset of the first missing one.
        next: u64,
    },
}

type Result<T, E = WriteError> = std::result::Result<T, E>;

/// Where everything goes in a stream: computed from the virtual size, the
/// cluster size and the data ranges, before anything is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLayout {
    size: u64,
    cluster_bits: u32,
    /// Data clusters as sorted, disjoint, non-adjacent ranges of cluster
    /// indices.
    runs: Vec<Range<u64>>,
    data_clusters: u64,
    l1_size: u64,
    l1_clusters: u64,
    l2_tables: u64,
    refcount_table_clusters: u64,
    refcount_blocks: u64,
}

impl StreamLayout {
    /// Lays out a disk of `virtual_size` bytes (rounded up to a multiple
    /// of 512, as qemu-img create and qcow2-to-stdout.py do: qemu reads
    /// the size in sectors) with clusters of `1 << cluster_bits` bytes
    /// ([`DEFAULT_CLUSTER_BITS`] is qemu's default), whose data lies in
    /// `data`: guest byte ranges in any order, overlapping or not. Every
    /// cluster a range touches is a data cluster.
    pub fn new(
        virtual_size: u64,
        cluster_bits: u32,
        data: impl IntoIterator<Item = Range<u64>>,
    ) -> Result<Self> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(WriteError::ClusterBits { cluster_bits });
        }
        let too_large = |what, bytes, cap| WriteError::TooLarge {
            size: virtual_size,
            what,
            bytes,
            cap,
        };
        // Header::parse's bound, which keeps every offset below in u64.
        if virtual_size > 1 << 62 {
            return Err(too_large("a virtual size", virtual_size, 1 << 62));
        }
        let size = virtual_size.next_multiple_of(512);
        let cs = 1u64 << cluster_bits;
        let l2_entries = cs / 8;
        let clusters = size.div_ceil(cs);
        let l1_size = clusters.div_ceil(l2_entries);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(too_large("an L1 table", l1_size * 8, MAX_L1_BYTES));
        }

        let mut runs: Vec<Range<u64>> = Vec::new();
        for r in data {
            if r.end > size {
                return Err(WriteError::RangeOutside {
                    start: r.start,
                    end: r.end,
                    size,
                });
            }
            if r.start < r.end {
                runs.push(r.start / cs..r.end.div_ceil(cs));
            }
        }
        runs.sort_unstable_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(runs.len());
        for r in runs {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        let runs = merged;
        let data_clusters: u64 = runs.iter().map(|r| r.end - r.start).sum();
        let l2_tables = l1_indices(&runs, l2_entries).count() as u64;
        let l1_clusters = (l1_size * 8).div_ceil(cs);

        // Refcount blocks and table count themselves: iterate to the fixed
        // point, as qcow2-to-stdout.py does.
        let per_block = cs * 8 / (1 << REFCOUNT_ORDER);
        let per_table_cluster = cs / 8;
        let others = 1 + l1_clusters + l2_tables + data_clusters;
        let mut blocks = others.div_ceil(per_block);
        let mut table = blocks.div_ceil(per_table_cluster);
        loop {
            let need = (others + blocks + table).div_ceil(per_block);
            if need <= blocks {
                break;
            }
            blocks = need;
            table = blocks.div_ceil(per_table_cluster);
        }
        if table * cs > MAX_REFTABLE_BYTES {
            return Err(too_large(
                "a refcount table",
                table * cs,
                MAX_REFTABLE_BYTES,
            ));
        }
        Ok(StreamLayout {
            size,
            cluster_bits,
            runs,
            data_clusters,
            l1_size,
            l1_clusters,
            l2_tables,
            refcount_table_clusters: table,
            refcount_blocks: blocks,
        })
    }

    /// The virtual size written in the header (rounded up to 512).
    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Number of data clusters.
    pub fn data_clusters(&self) -> u64 {
        self.data_clusters
    }

    /// Guest offsets of the data clusters, in the order they are written.
    pub fn clusters(&self) -> impl Iterator<Item = GuestOffset> + '_ {
        let bits = self.cluster_bits;
        self.runs
            .iter()
            .flat_map(move |r| r.clone().map(move |c| GuestOffset(c << bits)))
    }

    /// Bytes of data cluster `guest` inside the disk: the cluster size,
    /// less for the last cluster of a disk that is not cluster aligned.
    pub fn cluster_len(&self, guest: GuestOffset) -> u64 {
        self.cluster_size().min(self.size.saturating_sub(guest.0))
    }

    /// Metadata clusters: header, refcount table and blocks, L1 and L2
    /// tables.
    pub fn metadata_clusters(&self) -> u64 {
        1 + self.refcount_table_clusters + self.refcount_blocks + self.l1_clusters + self.l2_tables
    }

    /// Length of the whole stream in bytes.
    pub fn stream_len(&self) -> u64 {
        (self.metadata_clusters() + self.data_clusters) << self.cluster_bits
    }

    /// Host offset of the first data cluster.
    pub fn data_offset(&self) -> HostOffset {
        HostOffset(self.metadata_clusters() << self.cluster_bits)
    }

    fn refcount_table_offset(&self) -> u64 {
        self.cluster_size()
    }

    fn refcount_blocks_offset(&self) -> u64 {
        (1 + self.refcount_table_clusters) << self.cluster_bits
    }

    fn l1_offset(&self) -> u64 {
        (1 + self.refcount_table_clusters + self.refcount_blocks) << self.cluster_bits
    }

    fn l2_offset(&self) -> u64 {
        self.l1_offset() + (self.l1_clusters << self.cluster_bits)
    }

    /// The header cluster.
    fn header(&self) -> Vec<u8> {
        // qcow2-to-stdout.py: no L1 table cluster, L1 offset 0.
        let l1 = if self.l1_clusters == 0 {
            0
        } else {
            self.l1_offset()
        };
        // No backing file, encryption, snapshots or features; compression
        // type 0 (zlib) and the end of extensions are the zeros after it.
        let raw = RawHeader {
            magic: MAGIC.into(),
            version: 3.into(),
            backing_file_offset: 0.into(),
            backing_file_size: 0.into(),
            cluster_bits: self.cluster_bits.into(),
            size: self.size.into(),
            crypt_method: 0.into(),
            l1_size: (self.l1_size as u32).into(),
            l1_table_offset: l1.into(),
            refcount_table_offset: self.refcount_table_offset().into(),
            refcount_table_clusters: (self.refcount_table_clusters as u32).into(),
            nb_snapshots: 0.into(),
            snapshots_offset: 0.into(),
            incompatible_features: 0.into(),
            compatible_features: 0.into(),
            autoclear_features: 0.into(),
            refcount_order: REFCOUNT_ORDER.into(),
            header_length: HEADER_LENGTH.into(),
        };
        let mut h = vec![0u8; self.cluster_size() as usize];
        h[..size_of::<RawHeader>()].copy_from_slice(raw.as_bytes());
        h
    }
}

/// Distinct L1 indices of the data clusters, in order.
fn l1_indices(runs: &[Range<u64>], l2_entries: u64) -> impl Iterator<Item = u64> + '_ {
    let mut last = None;
    runs.iter()
        .flat_map(move |r| r.start / l2_entries..=(r.end - 1) / l2_entries)
        .filter(move |&i| {
            let new = last != Some(i);
            last = Some(i);
            new
        })
}

/// Counts what it writes and names it in errors.
#[derive(Debug)]
struct Out<W> {
    inner: W,
    pos: u64,
}

impl<W: Write> Out<W> {
    fn write(&mut self, what: &'static str, buf: &[u8]) -> Result<()> {
        self.inner
            .write_all(buf)
            .map_err(|source| WriteError::Write {
                what,
                offset: self.pos,
                source,
            })?;
        self.pos += buf.len() as u64;
        Ok(())
    }
}

/// Writes a [`StreamLayout`] forward: the metadata on
/// [`StreamWriter::new`], then one data cluster per
/// [`StreamWriter::write_cluster`], in [`StreamLayout::clusters`] order.
/// After an error the output is incomplete and must be discarded.
#[derive(Debug)]
pub struct StreamWriter<'a, W> {
    out: Out<W>,
    layout: &'a StreamLayout,
    /// Index of the current run and the next cluster in it.
    run: usize,
    next: u64,
    written: u64,
    pad: Vec<u8>,
}

impl<'a, W: Write> StreamWriter<'a, W> {
    /// Writes the header, refcount table, refcount blocks, L1 and L2
    /// tables, one cluster at a time.
    pub fn new(out: W, layout: &'a StreamLayout) -> Result<Self> {
        let mut out = Out { inner: out, pos: 0 };
        let cs = layout.cluster_size();
        let csu = cs as usize;
        out.write("header", &layout.header())?;
        let mut buf = vec![0u8; csu];

        // Refcount table: one entry per refcount block.
        let mut block = layout.refcount_blocks_offset();
        let mut left = layout.refcount_blocks;
        for _ in 0..layout.refcount_table_clusters {
            buf.fill(0);
            for e in buf.chunks_exact_mut(8) {
                if left == 0 {
                    break;
                }
                e.copy_from_slice(&block.to_be_bytes());
                block += cs;
                left -= 1;
            }
            out.write("refcount table", &buf)?;
        }

        // Refcount blocks: refcount 1 for every cluster of the stream.
        let mut left = layout.metadata_clusters() + layout.data_clusters;
        for _ in 0..layout.refcount_blocks {
            buf.fill(0);
            for e in buf.chunks_exact_mut(2) {
                if left == 0 {
                    break;
                }
                e.copy_from_slice(&1u16.to_be_bytes());
                left -= 1;
            }
            out.write("refcount block", &buf)?;
        }

        // L1 table: the L2 tables follow it in L1 order.
        let l2_entries = cs / 8;
        let mut l1 = l1_indices(&layout.runs, l2_entries).peekable();
        let mut l2 = layout.l2_offset();
        for c in 0..layout.l1_clusters {
            buf.fill(0);
            let first = c * l2_entries;
            while let Some(&i) = l1.peek() {
                if i >= first + l2_entries {
                    break;
                }
                let at = ((i - first) * 8) as usize;
                buf[at..at + 8].copy_from_slice(&(l2 | COPIED).to_be_bytes());
                l2 += cs;
                l1.next();
            }
            out.write("L1 table", &buf)?;
        }

        // L2 tables: data clusters follow in guest order.
        let mut data = layout.data_offset().0;
        let mut table: Option<u64> = None;
        for guest in layout.clusters() {
            let cluster = guest.0 >> layout.cluster_bits;
            let index = cluster / l2_entries;
            if table != Some(index) {
                if table.is_some() {
                    out.write("L2 table", &buf)?;
                }
                buf.fill(0);
                table = Some(index);
            }
            let at = ((cluster % l2_entries) * 8) as usize;
            buf[at..at + 8].copy_from_slice(&(data | COPIED).to_be_bytes());
            data += cs;
        }
        if table.is_some() {
            out.write("L2 table", &buf)?;
        }
        debug_assert_eq!(out.pos, layout.data_offset().0);

        let next = layout.runs.first().map_or(0, |r| r.start);
        buf.clear();
        Ok(StreamWriter {
            out,
            layout,
            run: 0,
            next,
            written: 0,
            pad: buf,
        })
    }

    /// The layout being written.
    pub fn layout(&self) -> &StreamLayout {
        self.layout
    }

    /// Guest offset of the cluster to write next, `None` when all are.
    pub fn next_cluster(&self) -> Option<GuestOffset> {
        (self.run < self.layout.runs.len())
            .then(|| GuestOffset(self.next << self.layout.cluster_bits))
    }

    /// Writes data cluster `guest`, which must be [`Self::next_cluster`].
    /// `data` is at most one cluster; a shorter one is padded with zeros
    /// (the last cluster of a disk that is not cluster aligned needs only
    /// [`StreamLayout::cluster_len`] bytes).
    pub fn write_cluster(&mut self, guest: GuestOffset, data: &[u8]) -> Result<()> {
        let Some(expected) = self.next_cluster() else {
            return Err(WriteError::NoMoreClusters { got: guest.0 });
        };
        if guest != expected {
            return Err(WriteError::OutOfOrder {
                got: guest.0,
                expected: expected.0,
            });
        }
        let cs = self.layout.cluster_size();
        if data.len() as u64 > cs {
            return Err(WriteError::ClusterTooLong {
                guest: guest.0,
                len: data.len(),
                max: cs,
            });
        }
        self.out.write("data cluster", data)?;
        let pad = (cs - data.len() as u64) as usize;
        if pad > 0 {
            self.pad.resize(pad, 0);
            self.out.write("data cluster", &self.pad[..pad])?;
        }
        self.written += 1;
        self.next += 1;
        if self.next >= self.layout.runs[self.run].end {
            self.run += 1;
            if let Some(r) = self.layout.runs.get(self.run) {
                self.next = r.start;
            }
        }
        Ok(())
    }

    /// Checks that every cluster was written, flushes, and returns the
    /// output.
    pub fn finish(mut self) -> Result<W> {
        if let Some(next) = self.next_cluster() {
            return Err(WriteError::Unfinished {
                missing: self.layout.data_clusters - self.written,
                total: self.layout.data_clusters,
                next: next.0,
            });
        }
        let pos = self.out.pos;
        self.out.inner.flush().map_err(|source| WriteError::Write {
            what: "end of the stream",
            offset: pos,
            source,
        })?;
        Ok(self.out.inner)
    }
}

/// Writes a whole stream: the metadata, then each data cluster filled by
/// `read(guest_offset, buf)`, where `buf` holds
/// [`StreamLayout::cluster_len`] bytes. One cluster buffer is used.
pub fn write_stream<W, F>(out: W, layout: &StreamLayout, mut read: F) -> Result<W>
where
    W: Write,
    F: FnMut(GuestOffset, &mut [u8]) -> io::Result<()>,
{
    let mut w = StreamWriter::new(out, layout)?;
    let mut buf = vec![0u8; layout.cluster_size() as usize];
    for guest in layout.clusters() {
        let len = layout.cluster_len(guest) as usize;
        buf[..len].fill(0);
        read(guest, &mut buf[..len]).map_err(|source| WriteError::Source {
            guest: guest.0,
            source,
        })?;
        w.write_cluster(guest, &buf[..len])?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::Header;

    #[test]
    fn header_cluster_fields() {
        let l = StreamLayout::new(1 << 20, 16, std::iter::once(0..1)).unwrap();
        let h = l.header();
        // Byte for byte the header qemu-img create writes for the same
        // image (the annotated fixture of the header tests), before its
        // extensions.
        assert_eq!(h[..112], crate::header::tests::v3_header()[..112]);
        assert!(h[112..].iter().all(|&b| b == 0), "no extensions");
        let parsed = Header::parse(&h).unwrap();
        assert_eq!(parsed.size, 1 << 20);
    }

    #[test]
    fn layout_counts() {
        // 1 MiB of 64 KiB clusters, data in clusters 0, 3, 4: header,
        // refcount table, one block, L1, one L2, three data clusters.
        let l = StreamLayout::new(1 << 20, 16, [200_000..300_000, 10..20]).unwrap();
        assert_eq!(l.data_clusters(), 3);
        assert_eq!(l.metadata_clusters(), 5);
        assert_eq!(l.data_offset(), HostOffset(5 << 16));
        assert_eq!(l.stream_len(), 8 << 16);
        let c: Vec<u64> = l.clusters().map(|g| g.0).collect();
        assert_eq!(c, [0, 3 << 16, 4 << 16]);
        // Overlapping and adjacent ranges merge.
        let l = StreamLayout::new(1 << 20, 16, [0..70_000, 65536..131072, 131072..131073]).unwrap();
        assert_eq!(l.data_clusters(), 3);
        // Rounded up to 512, last cluster short.
        let l = StreamLayout::new(100_000, 16, std::iter::once(99_999..100_000)).unwrap();
        assert_eq!(l.virtual_size(), 100_352);
        assert_eq!(l.cluster_len(GuestOffset(65536)), 100_352 - 65536);
    }

    #[test]
    fn refcount_blocks_count_themselves() {
        // 512-byte clusters: 256 refcounts per block. 250 data clusters
        // plus header, L1 and 4 L2 tables need 256 refcounts before the
        // refcount structures, so a second block (and its own refcount).
        let l = StreamLayout::new(250 * 512, 9, std::iter::once(0..250 * 512)).unwrap();
        assert_eq!((l.l1_clusters, l.l2_tables), (1, 4));
        assert_eq!((l.refcount_table_clusters, l.refcount_blocks), (1, 2));
    }
}
