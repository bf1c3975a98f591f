//! Bit-packed table entries (qcow2.rst, "Cluster mapping", "Extended L2
//! Entries", "Host cluster management").

use crate::types::{GuestOffset, HostOffset};

/// Geometry an L2 entry is decoded against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// 128-bit entries with subcluster bitmaps.
    pub extended_l2: bool,
    /// Version 3 (zero clusters exist only there).
    pub v3: bool,
    /// Guest data lives in an external data file.
    pub data_file: bool,
    /// The external data file is a raw image: unallocated clusters read
    /// from it at the guest offset.
    pub data_file_raw: bool,
}

/// An L1 table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// Bits 9-55: offset of the L2 table.
    pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    /// Bit 63: refcount is exactly one.
    pub const COPIED: u64 = 1 << 63;
    /// Bits 0-8 and 56-62: reserved, zero.
    pub const RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;

    /// The L2 table offset, `None` when the L2 table is unallocated.
    pub fn l2_offset(self) -> Option<HostOffset> {
        let o = self.0 & Self::OFFSET_MASK;
        (o != 0).then_some(HostOffset(o))
    }

    /// Checks reserved bits and alignment; returns what is wrong.
    pub fn validate(self, cluster_bits: u32) -> Result<(), &'static str> {
        if self.0 & Self::RESERVED_MASK != 0 {
            return Err("reserved bits set");
        }
        if (self.0 & Self::OFFSET_MASK) & ((1 << cluster_bits) - 1) != 0 {
            return Err("L2 table offset not cluster aligned");
        }
        Ok(())
    }
}

/// A refcount table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefcountTableEntry(pub u64);

impl RefcountTableEntry {
    /// Bits 9-63: offset of the refcount block.
    pub const OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
    /// Bits 0-8: reserved, zero.
    pub const RESERVED_MASK: u64 = 0x1ff;

    /// What [`RefcountTableEntry::validate`] says of reserved bits.
    pub const RESERVED_BITS_SET: &'static str = "reserved bits set";
    /// What it says of a refcount block offset that is not aligned.
    pub const BLOCK_MISALIGNED: &'static str = "refcount block offset not cluster aligned";

    /// The refcount block offset, `None` when unallocated.
    pub fn block_offset(self) -> Option<HostOffset> {
        let o = self.0 & Self::OFFSET_MASK;
        (o != 0).then_some(HostOffset(o))
    }

    /// Checks reserved bits and alignment, the two faults `qemu-img check`
    /// reports in a refcount table; returns what is wrong.
    pub fn validate(self, cluster_bits: u32) -> Result<(), &'static str> {
        if self.0 & Self::RESERVED_MASK != 0 {
            return Err(Self::RESERVED_BITS_SET);
        }
        self.block(cluster_bits).map(drop)
    }

    /// The refcount block as a lookup reads it (qemu's
    /// `qcow2_get_refcount`): reserved bits are not looked at, a
    /// misaligned offset is an error, `None` is unallocated.
    pub fn block(self, cluster_bits: u32) -> Result<Option<HostOffset>, &'static str> {
        match self.block_offset() {
            Some(o) if o.0 & ((1 << cluster_bits) - 1) != 0 => Err(Self::BLOCK_MISALIGNED),
            b => Ok(b),
        }
    }
}

/// The first 64 bits of an L2 table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Entry(pub u64);

impl L2Entry {
    /// Bit 63: standard cluster whose refcount is exactly one.
    pub const COPIED: u64 = 1 << 63;
    /// Bit 62: compressed cluster.
    pub const COMPRESSED: u64 = 1 << 62;
    /// Standard descriptor bit 0: reads as zeros (v3, no extended L2).
    pub const ZERO: u64 = 1;
    /// Standard descriptor bits 9-55: host cluster offset.
    pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    /// Standard descriptor bits 1-8 and 56-61: reserved, zero.
    pub const RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;

    /// Compressed descriptor: bits `0..x` hold the host offset, with
    /// `x = 62 - (cluster_bits - 8)`.
    pub fn compressed_shift(cluster_bits: u32) -> u32 {
        62 - (cluster_bits - 8)
    }
}

/// Subcluster allocation bitmap of an extended L2 entry (second 64 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubclusterBitmap(pub u64);

impl SubclusterBitmap {
    /// Bits 0-31: subcluster `x` is allocated.
    pub const ALLOC_MASK: u64 = 0xffff_ffff;
    /// Bits 32-63: subcluster `x - 32` reads as zeros.
    pub const ZERO_MASK: u64 = 0xffff_ffff_0000_0000;

    /// Whether subcluster `i` is allocated.
    pub fn allocated(self, i: u32) -> bool {
        self.0 >> i & 1 != 0
    }

    /// Whether subcluster `i` reads as zeros.
    pub fn zero(self, i: u32) -> bool {
        self.0 >> (32 + i) & 1 != 0
    }
}

/// What one L2 entry says about its guest cluster as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Mapping {
    /// Nothing here: read the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster, if any.
    Zero {
        /// Preallocated host cluster.
        host: Option<HostOffset>,
    },
    /// A standard cluster at `host` (in the data file when there is one).
    /// With extended L2 entries, the bitmap says per subcluster.
    Standard {
        /// Host cluster offset.
        host: HostOffset,
        /// Subcluster bitmap, for extended L2 entries.
        subclusters: Option<SubclusterBitmap>,
    },
    /// Unallocated with extended L2 entries, some subclusters zero.
    UnallocatedSubclusters {
        /// The bitmap; only zero bits are set.
        subclusters: SubclusterBitmap,
    },
    /// Compressed data starting at `host`, `size` bytes long.
    Compressed {
        /// Host byte offset (not aligned).
        host: HostOffset,
        /// Bytes of compressed data the entry covers.
        size: u64,
    },
}

/// What a single (sub)cluster reads as, qemu's `QCow2SubclusterType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subcluster {
    /// Unallocated, no host cluster: read the backing file or zeros.
    UnallocatedPlain,
    /// Unallocated in a cluster that has a host cluster (extended L2).
    UnallocatedAlloc(HostOffset),
    /// Reads as zeros, no host cluster.
    ZeroPlain,
    /// Reads as zeros, host cluster preallocated at the offset.
    ZeroAlloc(HostOffset),
    /// Data at the host offset (of the subcluster, not the cluster).
    Normal(HostOffset),
    /// Part of a compressed cluster.
    Compressed {
        /// Host byte offset of the compressed data.
        host: HostOffset,
        /// Bytes of compressed data.
        size: u64,
    },
}

impl L2Mapping {
    /// Decodes an L2 entry (and its bitmap with extended L2 entries);
    /// the error says which rule it breaks.
    pub fn decode(entry: u64, bitmap: u64, g: Geometry) -> Result<Self, &'static str> {
        if entry & L2Entry::COMPRESSED != 0 {
            if g.data_file {
                return Err("compressed cluster in an image with an external data file");
            }
            if entry & L2Entry::COPIED != 0 {
                return Err("compressed cluster with the copied bit set");
            }
            if g.extended_l2 && bitmap != 0 {
                return Err("compressed cluster with a non-zero subcluster bitmap");
            }
            let x = L2Entry::compressed_shift(g.cluster_bits);
            let host = entry & ((1 << x) - 1);
            if host >> 56 != 0 {
                return Err("compressed cluster offset above 2^56");
            }
            let sectors = ((entry >> x) & ((1 << (g.cluster_bits - 8)) - 1)) + 1;
            let size = sectors * 512 - (host & 511);
            return Ok(L2Mapping::Compressed {
                host: HostOffset(host),
                size,
            });
        }
        if entry & L2Entry::RESERVED_MASK != 0 {
            return Err("reserved bits set");
        }
        let offset = entry & L2Entry::OFFSET_MASK;
        if offset & ((1 << g.cluster_bits) - 1) != 0 {
            return Err("host cluster offset not cluster aligned");
        }
        let zero_bit = entry & L2Entry::ZERO != 0;
        if zero_bit && (!g.v3 || g.extended_l2) {
            return Err("zero bit set in an image without zero clusters");
        }
        // Offset 0 is a valid data file offset; the copied bit tells it
        // from unallocated (qcow2.rst, "Standard Cluster Descriptor").
        let allocated = offset != 0 || (g.data_file && entry & L2Entry::COPIED != 0);
        if zero_bit {
            return Ok(L2Mapping::Zero {
                host: allocated.then_some(HostOffset(offset)),
            });
        }
        if g.extended_l2 {
            let bm = SubclusterBitmap(bitmap);
            if allocated {
                if (bitmap >> 32) & bitmap != 0 {
                    return Err("subcluster both allocated and zero");
                }
                return Ok(L2Mapping::Standard {
                    host: HostOffset(offset),
                    subclusters: Some(bm),
                });
            }
            if bitmap & SubclusterBitmap::ALLOC_MASK != 0 {
                return Err("allocated subclusters without a host cluster");
            }
            if entry & L2Entry::COPIED != 0 {
                return Err("copied bit set on an unallocated cluster");
            }
            return Ok(if bitmap == 0 {
                L2Mapping::Unallocated
            } else {
                L2Mapping::UnallocatedSubclusters { subclusters: bm }
            });
        }
        if allocated {
            Ok(L2Mapping::Standard {
                host: HostOffset(offset),
                subclusters: None,
            })
        } else if entry & L2Entry::COPIED != 0 {
            Err("copied bit set on an unallocated cluster")
        } else {
            Ok(L2Mapping::Unallocated)
        }
    }

    /// What subcluster `sc` reads as; `sc_size` is the subcluster size.
    /// Applies the raw external data file rule: unallocated reads the
    /// data file at the guest offset of the cluster, `guest_cluster`.
    pub fn subcluster(
        self,
        sc: u32,
        sc_size: u64,
        g: Geometry,
        guest_cluster: GuestOffset,
    ) -> Subcluster {
        let s = match self {
            L2Mapping::Unallocated => Subcluster::UnallocatedPlain,
            L2Mapping::Zero { host: None } => Subcluster::ZeroPlain,
            L2Mapping::Zero { host: Some(h) } => Subcluster::ZeroAlloc(h),
            L2Mapping::Compressed { host, size } => Subcluster::Compressed { host, size },
            L2Mapping::Standard {
                host,
                subclusters: None,
            } => Subcluster::Normal(host),
            L2Mapping::Standard {
                host,
                subclusters: Some(bm),
            } => {
                let h = HostOffset(host.0 + u64::from(sc) * sc_size);
                if bm.zero(sc) {
                    Subcluster::ZeroAlloc(h)
                } else if bm.allocated(sc) {
                    Subcluster::Normal(h)
                } else {
                    Subcluster::UnallocatedAlloc(h)
                }
            }
            L2Mapping::UnallocatedSubclusters { subclusters } => {
                if subclusters.zero(sc) {
                    Subcluster::ZeroPlain
                } else {
                    Subcluster::UnallocatedPlain
                }
            }
        };
        if g.data_file_raw && s == Subcluster::UnallocatedPlain {
            // The raw data file holds the disk as is: host offset = guest.
            return Subcluster::Normal(HostOffset(guest_cluster.0 + u64::from(sc) * sc_size));
        }
        s
    }

    /// Whether this entry has a host cluster in this image: a standard
    /// cluster (whatever its subcluster bitmap says), a preallocated zero
    /// cluster, or a compressed one. Zero clusters without a host cluster
    /// and unallocated ones do not. This is what `qemu-img check` counts
    /// as allocated clusters.
    pub fn has_host_data(self) -> bool {
        matches!(
            self,
            L2Mapping::Compressed { .. }
                | L2Mapping::Standard { .. }
                | L2Mapping::Zero { host: Some(_) }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G64K: Geometry = Geometry {
        cluster_bits: 16,
        extended_l2: false,
        v3: true,
        data_file: false,
        data_file_raw: false,
    };

    #[test]
    fn l1_entry_offset_and_reserved_bits() {
        let e = L1Entry(0x8000_0000_0003_0000); // copied | 0x30000
        assert_eq!(e.l2_offset(), Some(HostOffset(0x30000)));
        assert!(e.validate(16).is_ok());
        assert_eq!(
            L1Entry(0x0100_0000_0000_0000).validate(16),
            Err("reserved bits set")
        );
        assert_eq!(
            L1Entry(0x0000_0000_0003_0200).validate(16),
            Err("L2 table offset not cluster aligned")
        );
        assert_eq!(L1Entry(0).l2_offset(), None);
    }

    #[test]
    fn refcount_table_entries() {
        let e = |v| RefcountTableEntry(v);
        assert_eq!(e(0x3_0000).validate(16), Ok(()));
        assert_eq!(e(0x3_0000).block(16), Ok(Some(HostOffset(0x30000))));
        assert_eq!(e(0).block(16), Ok(None));
        // Reserved bits: a fault to report, not one that stops a lookup.
        assert_eq!(
            e(0x3_0001).validate(16),
            Err(RefcountTableEntry::RESERVED_BITS_SET)
        );
        assert_eq!(e(0x3_0001).block(16), Ok(Some(HostOffset(0x30000))));
        assert_eq!(
            e(0x3_0200).block(16),
            Err(RefcountTableEntry::BLOCK_MISALIGNED)
        );
        assert_eq!(
            e(0x3_0200).validate(16),
            Err(RefcountTableEntry::BLOCK_MISALIGNED)
        );
    }

    #[test]
    fn standard_zero_and_unallocated() {
        let d = |e| L2Mapping::decode(e, 0, G64K);
        assert_eq!(d(0), Ok(L2Mapping::Unallocated));
        assert_eq!(
            d(0x8000_0000_0005_0000), // copied | 0x50000
            Ok(L2Mapping::Standard {
                host: HostOffset(0x50000),
                subclusters: None
            })
        );
        assert_eq!(d(1), Ok(L2Mapping::Zero { host: None })); // "all zeros" bit only
        assert_eq!(
            d(0x8000_0000_0005_0001), // preallocated zero cluster
            Ok(L2Mapping::Zero {
                host: Some(HostOffset(0x50000))
            })
        );
        assert_eq!(d(0x0000_0000_0005_0002), Err("reserved bits set")); // bit 1
        assert_eq!(d(0x0100_0000_0005_0000), Err("reserved bits set")); // bit 56
        assert_eq!(
            d(0x0000_0000_0005_8000),
            Err("host cluster offset not cluster aligned")
        );
        let v2 = Geometry { v3: false, ..G64K };
        assert!(L2Mapping::decode(1, 0, v2).is_err());
    }

    #[test]
    fn compressed_descriptor_bit_split() {
        // 64 KiB clusters: x = 62 - 8 = 54; offset in bits 0-53, sectors
        // in bits 54-61.
        let host = 0x5_0123u64;
        let e = L2Entry::COMPRESSED | 3 << 54 | host;
        assert_eq!(
            L2Mapping::decode(e, 0, G64K),
            Ok(L2Mapping::Compressed {
                host: HostOffset(host),
                size: 4 * 512 - 0x123,
            })
        );
        // 2 MiB clusters: x = 49.
        let g = Geometry {
            cluster_bits: 21,
            ..G64K
        };
        let e = L2Entry::COMPRESSED | 1 << 49 | 0x20_0000;
        assert_eq!(
            L2Mapping::decode(e, 0, g),
            Ok(L2Mapping::Compressed {
                host: HostOffset(0x20_0000),
                size: 1024
            })
        );
        // 512-byte clusters: x = 61, offset bits above 55 must be zero.
        let g = Geometry {
            cluster_bits: 9,
            ..G64K
        };
        assert!(L2Mapping::decode(L2Entry::COMPRESSED | 1 << 57, 0, g).is_err());
        assert!(L2Mapping::decode(L2Entry::COMPRESSED | L2Entry::COPIED, 0, G64K).is_err());
    }

    #[test]
    fn extended_l2_subclusters() {
        let g = Geometry {
            extended_l2: true,
            ..G64K
        };
        // Subclusters 0 and 5 allocated, 1 zero.
        let bm = 1 | 1 << 5 | 1 << 33;
        let m = L2Mapping::decode(0x8000_0000_0005_0000, bm, g).unwrap();
        let sc = 2048;
        assert_eq!(
            m.subcluster(0, sc, g, GuestOffset(0)),
            Subcluster::Normal(HostOffset(0x50000))
        );
        assert_eq!(
            m.subcluster(1, sc, g, GuestOffset(0)),
            Subcluster::ZeroAlloc(HostOffset(0x50800))
        );
        assert_eq!(
            m.subcluster(2, sc, g, GuestOffset(0)),
            Subcluster::UnallocatedAlloc(HostOffset(0x51000))
        );
        assert!(m.has_host_data());
        // Allocated and zero at once.
        assert!(L2Mapping::decode(0x5_0000, 1 | 1 << 32, g).is_err());
        // Allocated bits without a host cluster.
        assert!(L2Mapping::decode(0, 1, g).is_err());
        // Zero-only bitmap without host cluster.
        let m = L2Mapping::decode(0, 1 << 63, g).unwrap();
        assert_eq!(
            m.subcluster(31, sc, g, GuestOffset(0)),
            Subcluster::ZeroPlain
        );
        assert_eq!(
            m.subcluster(30, sc, g, GuestOffset(0)),
            Subcluster::UnallocatedPlain
        );
        assert!(!m.has_host_data());
        // The standard zero bit is reserved with extended L2 entries.
        assert!(L2Mapping::decode(1, 0, g).is_err());
    }

    #[test]
    fn data_file_offset_zero_and_raw() {
        let g = Geometry {
            data_file: true,
            ..G64K
        };
        assert_eq!(
            L2Mapping::decode(L2Entry::COPIED, 0, g),
            Ok(L2Mapping::Standard {
                host: HostOffset(0),
                subclusters: None
            })
        );
        let raw = Geometry {
            data_file_raw: true,
            ..g
        };
        let m = L2Mapping::decode(0, 0, raw).unwrap();
        assert_eq!(
            m.subcluster(0, 65536, raw, GuestOffset(0x70000)),
            Subcluster::Normal(HostOffset(0x70000))
        );
    }
}
