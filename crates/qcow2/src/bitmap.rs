//! Persistent dirty bitmaps (qcow2.rst "Bitmaps", "Bitmap directory",
//! "Bitmap table"), read offline.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::image::{Qcow2, Within};
use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::types::{HostOffset, be64};

/// Smallest granularity qemu supports: 512 bytes.
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity qemu supports: 2 GiB.
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name qemu supports.
pub const MAX_NAME: u16 = 1023;
/// Cap on one bitmap table, in bytes.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

/// Bitmap directory entry flags (bytes 12-15).
pub mod flags {
    /// Bit 0: the bitmap was not saved correctly and may be inconsistent.
    pub const IN_USE: u32 = 1 << 0;
    /// Bit 1: the bitmap tracks every write (enabled).
    pub const AUTO: u32 = 1 << 1;
    /// Bit 2: unknown extra data may be ignored.
    pub const EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
    /// Bits 3-31: reserved, zero.
    pub const RESERVED: u32 = !0b111;
}

/// Type 1: dirty tracking bitmap, the only type there is.
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// The fixed 24 bytes of a bitmap directory entry, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RawBitmapEntry {
    /// Bytes 0-7: offset of the bitmap table.
    pub table_offset: U64,
    /// Bytes 8-11: entries in the bitmap table.
    pub table_size: U32,
    /// Bytes 12-15: flags.
    pub flags: U32,
    /// Byte 16: type (1 = dirty tracking).
    pub kind: u8,
    /// Byte 17: log2 of the granularity.
    pub granularity_bits: u8,
    /// Bytes 18-19: length of the name.
    pub name_size: U16,
    /// Bytes 20-23: length of the extra data.
    pub extra_data_size: U32,
}

// qcow2.rst, "Bitmap directory": extra data starts at byte 24.
const _: () = assert!(size_of::<RawBitmapEntry>() == 24);

impl RawBitmapEntry {
    /// Size of the fixed part.
    pub const LEN: usize = size_of::<Self>();

    /// Decodes the fixed part from the start of `b`; `None` when `b` is
    /// shorter than 24 bytes.
    pub fn decode(b: &[u8]) -> Option<Self> {
        Self::read_from_prefix(b).ok().map(|(e, _)| e)
    }
}

/// A validated bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// The bitmap's name.
    pub name: String,
    /// Guest bytes per bit.
    pub granularity: u64,
    /// Flags as stored (see [`flags`]).
    pub flags: u32,
    /// Offset of the bitmap table, cluster aligned.
    pub table_offset: HostOffset,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Bytes of type-specific extra data.
    pub extra_data_size: u32,
}

impl Bitmap {
    /// Bit 0: possibly inconsistent.
    pub fn in_use(&self) -> bool {
        self.flags & flags::IN_USE != 0
    }

    /// Bit 1: enabled (tracks writes).
    pub fn auto(&self) -> bool {
        self.flags & flags::AUTO != 0
    }

    /// The flag names `qemu-img info` prints: `in-use`, `auto`.
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.in_use() {
            v.push("in-use");
        }
        if self.auto() {
            v.push("auto");
        }
        v
    }
}

fn bad(name: &str, problem: &'static str, value: u64) -> Error {
    Error::BadBitmap {
        name: name.into(),
        problem,
        value,
    }
}

/// Parses and validates a bitmap directory of `nb_bitmaps` entries for a
/// disk of `virtual_size` bytes with `1 << cluster_bits`-byte clusters.
/// No I/O. Whether each bitmap table lies inside the file is checked where
/// it is read: qemu opens an image whose bitmap table lies past the end of
/// the file, and `qemu-img check` reports it as a corruption.
pub fn parse_directory(
    buf: &[u8],
    nb_bitmaps: u32,
    cluster_bits: u32,
    virtual_size: u64,
) -> Result<Vec<Bitmap>> {
    let cluster_size = 1u64 << cluster_bits;
    let mut out: Vec<Bitmap> = Vec::new();
    let mut pos = 0usize;
    for _ in 0..nb_bitmaps {
        let Some(raw) = buf.get(pos..).and_then(RawBitmapEntry::decode) else {
            return Err(bad(
                "",
                "directory entry runs past the directory",
                pos as u64,
            ));
        };
        let (table_offset, table_size) = (raw.table_offset.get(), raw.table_size.get());
        let (flags, extra_data_size) = (raw.flags.get(), raw.extra_data_size.get());
        let name_size = raw.name_size.get();
        let name_at = pos + RawBitmapEntry::LEN + extra_data_size as usize;
        let end = name_at + usize::from(name_size);
        let padded = end.next_multiple_of(8);
        if name_size == 0 || name_size > MAX_NAME {
            return Err(bad("", "name_size is not in 1..=1023", name_size.into()));
        }
        if padded > buf.len() {
            return Err(bad(
                "",
                "directory entry runs past the directory",
                pos as u64,
            ));
        }
        let name = std::str::from_utf8(&buf[name_at..end])
            .map_err(|_| bad("", "name is not UTF-8", pos as u64))?
            .to_owned();
        if buf[end..padded].iter().any(|&b| b != 0) {
            return Err(bad(&name, "entry padding is not zero", pos as u64));
        }
        if raw.kind != TYPE_DIRTY_TRACKING {
            return Err(bad(
                &name,
                "type is not 1 (dirty tracking)",
                raw.kind.into(),
            ));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&raw.granularity_bits) {
            return Err(bad(
                &name,
                "granularity_bits is not in 9..=31",
                raw.granularity_bits.into(),
            ));
        }
        if flags & flags::RESERVED != 0 {
            return Err(bad(&name, "reserved flag bits set", flags.into()));
        }
        if extra_data_size != 0 && flags & flags::EXTRA_DATA_COMPATIBLE == 0 {
            return Err(bad(
                &name,
                "unknown extra data without the extra_data_compatible flag",
                extra_data_size.into(),
            ));
        }
        if !table_offset.is_multiple_of(cluster_size) || table_offset == 0 {
            return Err(bad(
                &name,
                "bitmap_table_offset is not cluster aligned",
                table_offset,
            ));
        }
        let granularity = 1u64 << raw.granularity_bits;
        let bits = virtual_size.div_ceil(granularity);
        let needed = bits.div_ceil(8).div_ceil(cluster_size);
        if u64::from(table_size) != needed {
            return Err(bad(
                &name,
                "bitmap_table_size does not match the virtual size",
                table_size.into(),
            ));
        }
        let table_bytes = u64::from(table_size) * 8;
        if table_bytes > MAX_TABLE_BYTES {
            return Err(bad(&name, "bitmap table larger than 64 MiB", table_bytes));
        }
        if out.iter().any(|b| b.name == name) {
            return Err(bad(&name, "name appears twice", pos as u64));
        }
        out.push(Bitmap {
            name,
            granularity,
            flags,
            table_offset: HostOffset(table_offset),
            table_size,
            extra_data_size,
        });
        pos = padded;
    }
    if pos != buf.len() {
        return Err(bad(
            "",
            "bitmap_directory_size does not match its entries",
            buf.len() as u64,
        ));
    }
    Ok(out)
}

/// A bitmap table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapTableEntry(pub u64);

impl BitmapTableEntry {
    /// Bits 9-55: offset of a cluster of bitmap data.
    pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    /// Bit 0: without an offset, the cluster reads as all ones.
    pub const ALL_ONES: u64 = 1;
    /// Bits 1-8 and 56-63: reserved, zero.
    pub const RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
}

/// What one cluster of bitmap data holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapCluster {
    /// Every bit clear.
    AllZeros,
    /// Every bit set.
    AllOnes,
    /// Stored at this host offset.
    Stored(HostOffset),
}

impl BitmapTableEntry {
    /// Decodes the entry; the error says which rule it breaks.
    pub fn decode(self, cluster_bits: u32) -> Result<BitmapCluster, &'static str> {
        if self.0 & Self::RESERVED_MASK != 0 {
            return Err("bitmap table entry has reserved bits set");
        }
        let off = self.0 & Self::OFFSET_MASK;
        if off == 0 {
            return Ok(if self.0 & Self::ALL_ONES != 0 {
                BitmapCluster::AllOnes
            } else {
                BitmapCluster::AllZeros
            });
        }
        if self.0 & Self::ALL_ONES != 0 {
            return Err("bitmap table entry has bit 0 set with an offset");
        }
        if off & ((1 << cluster_bits) - 1) != 0 {
            return Err("bitmap data cluster is not cluster aligned");
        }
        Ok(BitmapCluster::Stored(HostOffset(off)))
    }
}

impl Qcow2 {
    /// The persistent bitmaps of the image, from its bitmap directory.
    /// Empty when there is no bitmaps extension.
    pub fn bitmaps(&self) -> Result<Vec<Bitmap>> {
        let h = self.header();
        let Some(ext) = h.bitmaps else {
            return Ok(Vec::new());
        };
        // Bounded by the header check: at most 64 MiB, inside the file.
        let mut buf = vec![0; ext.directory_size as usize];
        self.host().pread(
            Within::File,
            &mut buf,
            ext.directory_offset.0,
            "bitmap directory",
        )?;
        parse_directory(&buf, ext.nb_bitmaps, h.cluster_bits, h.size)
    }

    /// The dirty ranges of bitmap `name`, sorted and merged, clipped to
    /// the virtual disk: what `qemu-nbd -B NAME` exports as dirty in the
    /// `qemu:dirty-bitmap:NAME` context. Reads one bitmap cluster at a
    /// time.
    pub fn dirty_ranges(&self, name: &str) -> Result<DirtyRanges<'_>> {
        if let Some(ext) = self.header().bitmaps
            && !ext.consistent
        {
            return Err(bad(
                name,
                "the bitmaps extension is inconsistent (auto-clear bit 0 is clear)",
                self.header().autoclear_features,
            ));
        }
        let mut bitmaps = self.bitmaps()?;
        let Some(i) = bitmaps.iter().position(|b| b.name == name) else {
            return Err(Error::NoSuchBitmap {
                name: name.into(),
                available: bitmaps.into_iter().map(|b| b.name).collect(),
            });
        };
        let b = bitmaps.swap_remove(i);
        if b.in_use() {
            return Err(bad(
                name,
                "the bitmap is in use (inconsistent)",
                b.flags.into(),
            ));
        }
        let mut table = vec![0; b.table_size as usize * 8];
        self.host()
            .pread(Within::File, &mut table, b.table_offset.0, "bitmap table")?;
        let table = table
            .chunks_exact(8)
            .map(|c| BitmapTableEntry(be64(c, 0)))
            .collect();
        Ok(DirtyRanges {
            image: self,
            bitmap: b,
            table,
            index: 0,
            cluster: Vec::new(),
            bit: 0,
            bits_in_cluster: 0,
            pending: None,
            done: false,
        })
    }
}

/// Iterator over the dirty ranges of one bitmap, from
/// [`Qcow2::dirty_ranges`]. Stops after an error.
#[derive(Debug)]
pub struct DirtyRanges<'a> {
    image: &'a Qcow2,
    bitmap: Bitmap,
    table: Vec<BitmapTableEntry>,
    /// Next table entry to load.
    index: usize,
    /// Current bitmap data cluster (empty for all-zeros / all-ones).
    cluster: Vec<u8>,
    /// Next bit of the current cluster, and how many it has.
    bit: u64,
    bits_in_cluster: u64,
    pending: Option<Range<u64>>,
    done: bool,
}

impl DirtyRanges<'_> {
    /// The bitmap being read.
    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    fn size(&self) -> u64 {
        self.image.virtual_size()
    }

    /// Next dirty run before merging, or `None` at the end.
    fn next_run(&mut self) -> Result<Option<Range<u64>>> {
        let cs = self.image.cluster_size();
        let bits_per_cluster = cs * 8;
        let gran = self.bitmap.granularity;
        loop {
            if self.bit >= self.bits_in_cluster {
                if self.index >= self.table.len() {
                    return Ok(None);
                }
                let i = self.index;
                self.index += 1;
                let first_bit = i as u64 * bits_per_cluster;
                let start = first_bit * gran;
                let end = ((first_bit + bits_per_cluster) * gran).min(self.size());
                match self.table[i]
                    .decode(self.image.header().cluster_bits)
                    .map_err(|problem| bad(&self.bitmap.name, problem, self.table[i].0))?
                {
                    BitmapCluster::AllZeros => continue,
                    BitmapCluster::AllOnes => {
                        self.bits_in_cluster = 0;
                        return Ok(Some(start..end));
                    }
                    BitmapCluster::Stored(off) => {
                        self.cluster.resize(cs as usize, 0);
                        self.image.host().pread(
                            Within::File,
                            &mut self.cluster,
                            off.0,
                            "bitmap data",
                        )?;
                        self.bit = 0;
                        self.bits_in_cluster =
                            (self.size().div_ceil(gran) - first_bit).min(bits_per_cluster);
                        continue;
                    }
                }
            }
            let base = (self.index as u64 - 1) * bits_per_cluster;
            // Pass over clear bytes whole where possible.
            while self.bit < self.bits_in_cluster {
                let b = self.bit;
                let byte = self.cluster[(b / 8) as usize];
                if b.is_multiple_of(8) && byte == 0 {
                    self.bit += 8;
                    continue;
                }
                if byte >> (b % 8) & 1 == 0 {
                    self.bit += 1;
                    continue;
                }
                let mut e = b;
                while e < self.bits_in_cluster && self.cluster[(e / 8) as usize] >> (e % 8) & 1 != 0
                {
                    e += 1;
                }
                self.bit = e;
                let start = (base + b) * gran;
                let end = ((base + e) * gran).min(self.size());
                return Ok(Some(start..end));
            }
        }
    }
}

impl Iterator for DirtyRanges<'_> {
    type Item = Result<Range<u64>>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            match self.next_run() {
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Ok(None) => {
                    self.done = true;
                    break;
                }
                Ok(Some(r)) if r.start >= r.end => {}
                Ok(Some(r)) => match &mut self.pending {
                    Some(p) if p.end == r.start => p.end = r.end,
                    Some(p) => {
                        let out = p.clone();
                        *p = r;
                        return Some(Ok(out));
                    }
                    None => self.pending = Some(r),
                },
            }
        }
        self.pending.take().map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One directory entry: bitmap "b1", 64 KiB granularity, auto, table
    /// of 1 entry at 0x50000.
    fn entry() -> Vec<u8> {
        let mut e = vec![
            0, 0, 0, 0, 0, 5, 0, 0, // bitmap_table_offset 0x50000
            0, 0, 0, 1, // bitmap_table_size 1
            0, 0, 0, 2,  // flags: auto
            1,  // type: dirty tracking
            16, // granularity_bits: 64 KiB
            0, 2, // name_size 2
            0, 0, 0, 0, // extra_data_size 0
            b'b', b'1', // name
        ];
        e.resize(32, 0); // padding to 8
        e
    }

    #[test]
    fn parses_a_directory_entry() {
        let v = parse_directory(&entry(), 1, 16, 1 << 30).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].name, "b1");
        assert_eq!(v[0].granularity, 65536);
        assert!(v[0].auto() && !v[0].in_use());
        assert_eq!(v[0].flag_names(), ["auto"]);
        assert_eq!(v[0].table_offset, HostOffset(0x50000));
    }

    #[test]
    fn refuses_bad_entries() {
        let check = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut e = entry();
            f(&mut e);
            parse_directory(&e, 1, 16, 1 << 30).unwrap_err()
        };
        check(&|e| e[16] = 2); // type
        check(&|e| e[17] = 8); // granularity below 512
        check(&|e| e[15] = 8); // reserved flag bit 3
        check(&|e| e[19] = 0); // empty name
        check(&|e| e[11] = 2); // table size does not fit 1 GiB
        check(&|e| e[7] = 1); // unaligned table offset
        check(&|e| e[31] = 1); // non-zero padding
        // Directory size not matching the entries.
        let mut e = entry();
        e.extend_from_slice(&[0; 8]);
        assert!(parse_directory(&e, 1, 16, 1 << 30).is_err());
        // Fewer bytes than nb_bitmaps entries.
        assert!(parse_directory(&entry(), 2, 16, 1 << 30).is_err());
    }

    #[test]
    fn table_entries() {
        let d = |v| BitmapTableEntry(v).decode(16);
        assert_eq!(d(0), Ok(BitmapCluster::AllZeros));
        assert_eq!(d(1), Ok(BitmapCluster::AllOnes));
        assert_eq!(d(0x70000), Ok(BitmapCluster::Stored(HostOffset(0x70000))));
        assert!(d(0x70001).is_err());
        assert!(d(0x70200).is_err());
        assert!(d(1 << 60).is_err());
        assert!(d(2).is_err());
    }
}
