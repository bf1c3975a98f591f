//! The qcow2 header and its extensions (qcow2.rst, "Header" and
//! "Header extensions").
//!
//! Two layers: [`RawHeader`] is the big-endian layout, field for field, and
//! [`Header`] is the validated type built by [`Header::parse`] from the
//! first cluster of the file, without I/O.

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::{Error, Result};
use crate::types::HostOffset;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header: up to `incompatible_features`.
pub const V2_HEADER_LEN: usize = std::mem::offset_of!(RawHeader, incompatible_features);
/// Minimum length of a version 3 header (through `header_length`).
pub const V3_HEADER_LEN: usize = size_of::<RawHeader>();
/// Smallest `cluster_bits` (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest `cluster_bits` qemu opens (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's cap on the active L1 table: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu's cap on the refcount table: 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// qemu's cap on the number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name the spec allows.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Header extension types (qcow2.rst, "Header extensions").
pub mod ext {
    /// End of the header extension area.
    pub const END: u32 = 0;
    /// Backing file format name string.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    /// Bitmaps extension.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name string.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// Incompatible feature bits (header bytes 72-79).
pub mod incompat {
    /// Bit 0: dirty bit, refcounts may be inconsistent.
    pub const DIRTY: u64 = 1 << 0;
    /// Bit 1: corrupt bit, any structure may be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Bit 2: external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// Bit 3: compression type field is present and non-zero.
    pub const COMPRESSION: u64 = 1 << 3;
    /// Bit 4: extended L2 entries (subclusters).
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this crate understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTENDED_L2;
}

/// Compatible feature bits (header bytes 80-87).
pub mod compat {
    /// Bit 0: lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Auto-clear feature bits (header bytes 88-95).
pub mod autoclear {
    /// Bit 0: the bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// Bit 1: the external data file is a consistent raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// The fixed part of the header, as stored (big-endian), for versions 2
/// and 3. Version 2 headers stop after `snapshots_offset`; the later
/// fields then read as their version 2 defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RawHeader {
    /// Bytes 0-3: `QFI\xfb`.
    pub magic: U32,
    /// Bytes 4-7: 2 or 3.
    pub version: U32,
    /// Bytes 8-15: offset of the backing file name, 0 for none.
    pub backing_file_offset: U64,
    /// Bytes 16-19: length of the backing file name.
    pub backing_file_size: U32,
    /// Bytes 20-23: log2 of the cluster size.
    pub cluster_bits: U32,
    /// Bytes 24-31: virtual disk size in bytes.
    pub size: U64,
    /// Bytes 32-35: 0 none, 1 AES, 2 LUKS.
    pub crypt_method: U32,
    /// Bytes 36-39: entries in the active L1 table.
    pub l1_size: U32,
    /// Bytes 40-47: offset of the active L1 table.
    pub l1_table_offset: U64,
    /// Bytes 48-55: offset of the refcount table.
    pub refcount_table_offset: U64,
    /// Bytes 56-59: clusters the refcount table occupies.
    pub refcount_table_clusters: U32,
    /// Bytes 60-63: number of internal snapshots.
    pub nb_snapshots: U32,
    /// Bytes 64-71: offset of the snapshot table.
    pub snapshots_offset: U64,
    /// Bytes 72-79 (v3): incompatible features.
    pub incompatible_features: U64,
    /// Bytes 80-87 (v3): compatible features.
    pub compatible_features: U64,
    /// Bytes 88-95 (v3): auto-clear features.
    pub autoclear_features: U64,
    /// Bytes 96-99 (v3): log2 of the refcount width in bits.
    pub refcount_order: U32,
    /// Bytes 100-103 (v3): length of the header structure.
    pub header_length: U32,
}

// qcow2.rst: a version 2 header is 72 bytes, version 3 adds fields up to
// byte 103, and the compression type is byte 104.
const _: () = assert!(size_of::<RawHeader>() == 104);
const _: () = assert!(std::mem::offset_of!(RawHeader, incompatible_features) == 72);
const _: () = assert!(std::mem::offset_of!(RawHeader, l1_table_offset) == 40);

impl RawHeader {
    /// Decodes the fixed fields; `buf` must hold at least 72 bytes, and 104
    /// for version 3.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        if buf.len() < 8 {
            return Err(Error::TruncatedHeader {
                needed: V2_HEADER_LEN,
                available: buf.len(),
            });
        }
        let mut fixed = [0u8; V3_HEADER_LEN];
        let n = buf.len().min(V3_HEADER_LEN);
        fixed[..n].copy_from_slice(&buf[..n]);
        let mut raw: RawHeader = zerocopy::transmute!(fixed);
        if raw.magic.get() != MAGIC {
            return Err(Error::BadMagic {
                found: raw.magic.get(),
            });
        }
        let v3 = raw.version.get() >= 3;
        let needed = if v3 { V3_HEADER_LEN } else { V2_HEADER_LEN };
        if buf.len() < needed {
            return Err(Error::TruncatedHeader {
                needed,
                available: buf.len(),
            });
        }
        if !v3 {
            // What follows a version 2 header is its extensions.
            raw.incompatible_features = U64::ZERO;
            raw.compatible_features = U64::ZERO;
            raw.autoclear_features = U64::ZERO;
            raw.refcount_order = U32::new(4);
            raw.header_length = U32::new(V2_HEADER_LEN as u32);
        }
        Ok(raw)
    }
}

/// The header of a header extension, as stored.
#[derive(Debug, Clone, Copy, FromBytes, Immutable, KnownLayout)]
#[repr(C)]
struct RawExtensionHeader {
    /// Bytes 0-3: the extension type.
    kind: U32,
    /// Bytes 4-7: length of its data, not counting padding to 8.
    len: U32,
}

const _: () = assert!(size_of::<RawExtensionHeader>() == 8);

/// The data of the bitmaps extension, as stored.
#[derive(Debug, Clone, Copy, FromBytes, Immutable, KnownLayout)]
#[repr(C)]
struct RawBitmapsExtension {
    /// Bytes 0-3: number of bitmaps.
    nb_bitmaps: U32,
    /// Bytes 4-7: reserved, zero.
    reserved: U32,
    /// Bytes 8-15: size of the bitmap directory.
    directory_size: U64,
    /// Bytes 16-23: offset of the bitmap directory.
    directory_offset: U64,
}

const _: () = assert!(size_of::<RawBitmapsExtension>() == 24);

/// One entry of the feature name table, as stored.
#[derive(Debug, Clone, Copy, FromBytes, Immutable, KnownLayout)]
#[repr(C)]
struct RawFeatureName {
    /// Byte 0: 0 incompatible, 1 compatible, 2 auto-clear.
    kind: u8,
    /// Byte 1: bit number.
    bit: u8,
    /// Bytes 2-47: the name, zero padded.
    name: [u8; 46],
}

const _: () = assert!(size_of::<RawFeatureName>() == 48);

/// How compressed clusters are compressed (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// 0: raw deflate (RFC 1951, no zlib header); qemu calls it "zlib".
    Zlib,
    /// 1: zstd.
    Zstd,
}

impl CompressionType {
    /// The name `qemu-img info` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// Which feature bitmap a feature name table entry refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// 0: incompatible.
    Incompatible,
    /// 1: compatible.
    Compatible,
    /// 2: auto-clear.
    Autoclear,
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Byte 0: the feature bitmap.
    pub kind: FeatureKind,
    /// Byte 1: bit number, 0-63.
    pub bit: u8,
    /// Bytes 2-47: the name, zero padded.
    pub name: String,
}

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Number of bitmaps, 1..=65535.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory, cluster aligned.
    pub directory_offset: HostOffset,
    /// Whether auto-clear bit 0 vouches for the extension; when clear, qemu
    /// considers every bitmap inconsistent and ignores them.
    pub consistent: bool,
}

/// A header extension this crate does not interpret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownExtension {
    /// The extension type.
    pub kind: u32,
    /// Length of its data.
    pub length: u32,
}

/// Largest bitmap directory qemu accepts.
pub const MAX_BITMAP_DIRECTORY: u64 = 65535 * 1024;

/// A validated qcow2 header with its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, 9..=21.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table (enough for `size`, at most 32 MiB).
    pub l1_size: u32,
    /// Offset of the active L1 table, cluster aligned.
    pub l1_table_offset: HostOffset,
    /// Offset of the refcount table, cluster aligned.
    pub refcount_table_offset: HostOffset,
    /// Clusters the refcount table occupies (at most 8 MiB).
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: HostOffset,
    /// Incompatible feature bits; only bits of [`incompat::KNOWN`].
    pub incompatible_features: u64,
    /// Compatible feature bits, as stored.
    pub compatible_features: u64,
    /// Auto-clear feature bits, as stored.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits, 0..=6.
    pub refcount_order: u32,
    /// Length of the header structure (72 for version 2).
    pub header_length: u32,
    /// The compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing file format from its extension, if any.
    pub backing_format: Option<String>,
    /// The external data file name from its extension, if any.
    pub data_file: Option<String>,
    /// The feature name table.
    pub feature_names: Vec<FeatureName>,
    /// The bitmaps extension.
    pub bitmaps: Option<BitmapsExtension>,
    /// Extensions of unknown type, in file order.
    pub unknown_extensions: Vec<UnknownExtension>,
}

fn bad(field: &'static str, value: u64, expected: &'static str) -> Error {
    Error::BadField {
        field,
        value,
        expected,
    }
}

fn string(bytes: &[u8]) -> Option<String> {
    std::str::from_utf8(bytes).ok().map(str::to_owned)
}

impl Header {
    /// Parses and validates the header from the start of the image: `buf`
    /// holds the first cluster (or the whole file if it is shorter).
    ///
    /// Checks every field on its own and against the others; checks
    /// against the file size are [`Header::check_file_size`]'s.
    pub fn parse(buf: &[u8]) -> Result<Self> {
        let raw = RawHeader::decode(buf)?;
        if raw.version.get() != 2 && raw.version.get() != 3 {
            return Err(bad("version", raw.version.get().into(), "2 or 3"));
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&raw.cluster_bits.get()) {
            return Err(bad("cluster_bits", raw.cluster_bits.get().into(), "9..=21"));
        }
        let cluster_size = 1u64 << raw.cluster_bits.get();
        if raw.version.get() == 3 {
            let hl = u64::from(raw.header_length.get());
            if hl < V3_HEADER_LEN as u64 || hl % 8 != 0 || hl > cluster_size {
                return Err(bad(
                    "header_length",
                    hl,
                    "a multiple of 8, at least 104, at most the cluster size",
                ));
            }
            if buf.len() < raw.header_length.get() as usize {
                return Err(Error::TruncatedHeader {
                    needed: raw.header_length.get() as usize,
                    available: buf.len(),
                });
            }
        }
        if raw.refcount_order.get() > 6 {
            return Err(bad(
                "refcount_order",
                raw.refcount_order.get().into(),
                "0..=6",
            ));
        }
        if raw.crypt_method.get() != 0 {
            return Err(Error::Encrypted {
                reason: if raw.crypt_method.get() == 1 {
                    "crypt_method 1, AES"
                } else {
                    "crypt_method is not 0"
                },
            });
        }
        // Size: qemu refuses sizes whose cluster count overflows; 2^62 keeps
        // every offset computation below in u64.
        if raw.size.get() > 1 << 62 {
            return Err(bad("size", raw.size.get(), "at most 2^62"));
        }
        for (field, off) in [
            ("l1_table_offset", raw.l1_table_offset.get()),
            ("refcount_table_offset", raw.refcount_table_offset.get()),
            ("snapshots_offset", raw.snapshots_offset.get()),
        ] {
            if off % cluster_size != 0 {
                return Err(bad(field, off, "aligned to a cluster"));
            }
            if off > 1 << 56 {
                return Err(bad(field, off, "below 2^56"));
            }
        }
        if u64::from(raw.l1_size.get()) * 8 > MAX_L1_BYTES {
            return Err(bad(
                "l1_size",
                raw.l1_size.get().into(),
                "at most 32 MiB of entries",
            ));
        }
        let l2_entries_bits = raw.cluster_bits.get()
            - if raw.incompatible_features.get() & incompat::EXTENDED_L2 != 0 {
                4
            } else {
                3
            };
        let l1_span = 1u64 << (raw.cluster_bits.get() + l2_entries_bits);
        let needed = raw.size.get().div_ceil(l1_span);
        if needed > u64::from(raw.l1_size.get()) {
            return Err(bad(
                "l1_size",
                raw.l1_size.get().into(),
                "large enough for the virtual size",
            ));
        }
        if raw.refcount_table_clusters.get() == 0
            || u64::from(raw.refcount_table_clusters.get()) * cluster_size > MAX_REFTABLE_BYTES
        {
            return Err(bad(
                "refcount_table_clusters",
                raw.refcount_table_clusters.get().into(),
                "1 to 8 MiB worth of clusters",
            ));
        }
        if raw.nb_snapshots.get() > MAX_SNAPSHOTS {
            return Err(bad(
                "nb_snapshots",
                raw.nb_snapshots.get().into(),
                "at most 65536",
            ));
        }

        let mut feature_names = Vec::new();
        let mut backing_format = None;
        let mut data_file = None;
        let mut bitmaps = None;
        let mut unknown_extensions = Vec::new();
        // Extensions run from the end of the header to the backing file
        // name, or to the end of the first cluster.
        let mut ext_end = cluster_size.min(buf.len() as u64);
        if raw.backing_file_offset.get() != 0 {
            ext_end = ext_end.min(raw.backing_file_offset.get());
        }
        let mut pos = u64::from(raw.header_length.get());
        let mut seen = Vec::new();
        while pos + 8 <= ext_end {
            let p = pos as usize;
            let Ok((ext, _)) = RawExtensionHeader::read_from_prefix(&buf[p..]) else {
                break; // unreachable: pos + 8 <= ext_end <= buf.len()
            };
            let (kind, len) = (ext.kind.get(), u64::from(ext.len.get()));
            if kind == ext::END {
                break;
            }
            let ext_err = |problem| Error::BadExtension {
                kind,
                offset: pos,
                problem,
            };
            if pos + 8 + len > ext_end {
                return Err(ext_err("data runs past the end of the extension area"));
            }
            let data = &buf[p + 8..p + 8 + len as usize];
            if kind != ext::END && seen.contains(&kind) && kind != 0 {
                // Only unknown extensions may repeat; the spec says each
                // known one appears at most once.
                if matches!(
                    kind,
                    ext::BACKING_FORMAT
                        | ext::FEATURE_NAMES
                        | ext::BITMAPS
                        | ext::CRYPTO
                        | ext::DATA_FILE
                ) {
                    return Err(ext_err("appears twice"));
                }
            }
            seen.push(kind);
            match kind {
                ext::BACKING_FORMAT => {
                    backing_format =
                        Some(string(data).ok_or_else(|| ext_err("name is not UTF-8"))?);
                }
                ext::DATA_FILE => {
                    data_file = Some(string(data).ok_or_else(|| ext_err("name is not UTF-8"))?);
                }
                ext::FEATURE_NAMES => {
                    let Ok(entries) = <[RawFeatureName]>::ref_from_bytes(data) else {
                        return Err(ext_err("length is not a multiple of 48"));
                    };
                    for e in entries {
                        let kind = match e.kind {
                            0 => FeatureKind::Incompatible,
                            1 => FeatureKind::Compatible,
                            2 => FeatureKind::Autoclear,
                            _ => return Err(ext_err("feature type is not 0, 1 or 2")),
                        };
                        if e.bit > 63 {
                            return Err(ext_err("feature bit number above 63"));
                        }
                        let end = e.name.iter().position(|&b| b == 0).unwrap_or(e.name.len());
                        feature_names.push(FeatureName {
                            kind,
                            bit: e.bit,
                            name: String::from_utf8_lossy(&e.name[..end]).into_owned(),
                        });
                    }
                }
                ext::BITMAPS => {
                    let Ok(b) = RawBitmapsExtension::read_from_bytes(data) else {
                        return Err(ext_err("length is not 24"));
                    };
                    let nb_bitmaps = b.nb_bitmaps.get();
                    let reserved = b.reserved.get();
                    let directory_size = b.directory_size.get();
                    let directory_offset = b.directory_offset.get();
                    if !(1..=65535).contains(&nb_bitmaps) {
                        return Err(ext_err("nb_bitmaps is not in 1..=65535"));
                    }
                    if reserved != 0 {
                        return Err(ext_err("reserved field is not zero"));
                    }
                    if directory_size > MAX_BITMAP_DIRECTORY
                        || directory_size < 24 * u64::from(nb_bitmaps)
                    {
                        return Err(ext_err("bitmap_directory_size out of range"));
                    }
                    if !directory_offset.is_multiple_of(cluster_size) || directory_offset == 0 {
                        return Err(ext_err("bitmap_directory_offset is not cluster aligned"));
                    }
                    bitmaps = Some(BitmapsExtension {
                        nb_bitmaps,
                        directory_size,
                        directory_offset: HostOffset(directory_offset),
                        consistent: raw.autoclear_features.get() & autoclear::BITMAPS != 0,
                    });
                }
                ext::CRYPTO => {
                    return Err(Error::Encrypted {
                        reason: "full disk encryption header extension present",
                    });
                }
                _ => unknown_extensions.push(UnknownExtension {
                    kind,
                    length: len as u32,
                }),
            }
            pos += 8 + len.next_multiple_of(8);
        }

        let unknown = raw.incompatible_features.get() & !incompat::KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1 << b) != 0)
                .map(|b| {
                    feature_names
                        .iter()
                        .find(|f| f.kind == FeatureKind::Incompatible && u32::from(f.bit) == b)
                        .map_or_else(|| format!("bit {b}"), |f| f.name.clone())
                })
                .collect();
            return Err(Error::UnknownIncompatible {
                bits: unknown,
                names: names.join(", "),
            });
        }
        if raw.incompatible_features.get() & incompat::EXTENDED_L2 != 0
            && raw.cluster_bits.get() < 14
        {
            return Err(bad(
                "cluster_bits",
                raw.cluster_bits.get().into(),
                "at least 14 with extended L2 entries",
            ));
        }
        let compression_type = if raw.header_length.get() as usize > V3_HEADER_LEN {
            match buf[V3_HEADER_LEN] {
                0 => CompressionType::Zlib,
                1 => CompressionType::Zstd,
                v => return Err(bad("compression_type", v.into(), "0 (zlib) or 1 (zstd)")),
            }
        } else {
            CompressionType::Zlib
        };
        let has_bit = raw.incompatible_features.get() & incompat::COMPRESSION != 0;
        if has_bit != (compression_type != CompressionType::Zlib) {
            return Err(bad(
                "compression_type",
                raw.incompatible_features.get(),
                "non-zero exactly when incompatible bit 3 is set",
            ));
        }
        if raw.autoclear_features.get() & autoclear::DATA_FILE_RAW != 0
            && raw.incompatible_features.get() & incompat::DATA_FILE == 0
        {
            return Err(bad(
                "autoclear_features",
                raw.autoclear_features.get(),
                "raw external data bit only with the external data file bit",
            ));
        }

        let backing_file =
            if raw.backing_file_offset.get() != 0 {
                if raw.backing_file_size.get() > MAX_BACKING_NAME {
                    return Err(bad(
                        "backing_file_size",
                        raw.backing_file_size.get().into(),
                        "at most 1023",
                    ));
                }
                let start = raw.backing_file_offset.get();
                let end = start.saturating_add(u64::from(raw.backing_file_size.get()));
                if end > cluster_size || end > buf.len() as u64 {
                    return Err(bad(
                        "backing_file_offset",
                        start,
                        "a name inside the first cluster",
                    ));
                }
                let name = &buf[start as usize..end as usize];
                Some(string(name).ok_or_else(|| {
                    bad("backing_file_offset", start, "a UTF-8 backing file name")
                })?)
            } else {
                None
            };

        Ok(Header {
            version: raw.version.get(),
            cluster_bits: raw.cluster_bits.get(),
            size: raw.size.get(),
            l1_size: raw.l1_size.get(),
            l1_table_offset: HostOffset(raw.l1_table_offset.get()),
            refcount_table_offset: HostOffset(raw.refcount_table_offset.get()),
            refcount_table_clusters: raw.refcount_table_clusters.get(),
            nb_snapshots: raw.nb_snapshots.get(),
            snapshots_offset: HostOffset(raw.snapshots_offset.get()),
            incompatible_features: raw.incompatible_features.get(),
            compatible_features: raw.compatible_features.get(),
            autoclear_features: raw.autoclear_features.get(),
            refcount_order: raw.refcount_order.get(),
            header_length: raw.header_length.get(),
            compression_type,
            backing_file,
            backing_format,
            data_file,
            feature_names,
            bitmaps,
            unknown_extensions,
        })
    }

    /// Checks that the tables the header points to lie inside a file of
    /// `file_size` bytes. Done before any of them is read or allocated.
    pub fn check_file_size(&self, file_size: u64) -> Result<()> {
        let within = |what, offset: u64, len: u64| {
            let end = offset.saturating_add(len);
            if end > file_size {
                Err(Error::OutsideFile {
                    what,
                    offset,
                    end,
                    file_size,
                })
            } else {
                Ok(())
            }
        };
        if self.l1_size > 0 {
            within(
                "L1 table",
                self.l1_table_offset.0,
                u64::from(self.l1_size) * 8,
            )?;
        }
        within(
            "refcount table",
            self.refcount_table_offset.0,
            self.refcount_table_bytes(),
        )?;
        if self.nb_snapshots > 0 {
            // Each snapshot table entry takes at least 40 bytes.
            within(
                "snapshot table",
                self.snapshots_offset.0,
                u64::from(self.nb_snapshots) * 40,
            )?;
        }
        if let Some(b) = &self.bitmaps {
            within("bitmap directory", b.directory_offset.0, b.directory_size)?;
        }
        Ok(())
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Size of the refcount table in bytes.
    pub fn refcount_table_bytes(&self) -> u64 {
        u64::from(self.refcount_table_clusters) << self.cluster_bits
    }

    /// Width of a refcount in bits: `1 << refcount_order`.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The geometry L2 entries of this image are decoded against.
    pub fn geometry(&self) -> crate::entry::Geometry {
        crate::entry::Geometry {
            cluster_bits: self.cluster_bits,
            extended_l2: self.extended_l2(),
            v3: self.version >= 3,
            data_file: self.has_data_file(),
            data_file_raw: self.data_file_raw(),
        }
    }

    /// Whether L2 entries are 128 bits with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    /// Whether guest clusters live in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & incompat::DATA_FILE != 0
    }

    /// Whether the external data file is a consistent raw image.
    pub fn data_file_raw(&self) -> bool {
        self.autoclear_features & autoclear::DATA_FILE_RAW != 0
    }

    /// Whether the dirty bit is set.
    pub fn dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn corrupt(&self) -> bool {
        self.incompatible_features & incompat::CORRUPT != 0
    }

    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }

    /// Bytes in an L2 entry: 8, or 16 with extended L2 entries.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() { 16 } else { 8 }
    }

    /// Entries in an L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Guest bytes one L1 entry covers.
    pub fn l1_span(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// Subclusters per cluster: 32 with extended L2 entries, else 1.
    pub fn subclusters(&self) -> u64 {
        if self.extended_l2() { 32 } else { 1 }
    }

    /// Bytes in a subcluster (the cluster size without extended L2).
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / self.subclusters()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A version 3 header of a 1 MiB image with 64 KiB clusters, as
    /// `qemu-img create -f qcow2 x 1M` writes it, padded to 512 bytes.
    pub(crate) fn v3_header() -> Vec<u8> {
        let mut h = vec![
            0x51, 0x46, 0x49, 0xfb, // magic "QFI\xfb"
            0, 0, 0, 3, // version 3
            0, 0, 0, 0, 0, 0, 0, 0, // backing_file_offset: none
            0, 0, 0, 0, // backing_file_size
            0, 0, 0, 16, // cluster_bits: 64 KiB
            0, 0, 0, 0, 0, 0x10, 0, 0, // size: 1 MiB
            0, 0, 0, 0, // crypt_method: none
            0, 0, 0, 1, // l1_size: 1 entry
            0, 0, 0, 0, 0, 3, 0, 0, // l1_table_offset: 0x30000
            0, 0, 0, 0, 0, 1, 0, 0, // refcount_table_offset: 0x10000
            0, 0, 0, 1, // refcount_table_clusters: 1
            0, 0, 0, 0, // nb_snapshots
            0, 0, 0, 0, 0, 0, 0, 0, // snapshots_offset
            0, 0, 0, 0, 0, 0, 0, 0, // incompatible_features
            0, 0, 0, 0, 0, 0, 0, 0, // compatible_features
            0, 0, 0, 0, 0, 0, 0, 0, // autoclear_features
            0, 0, 0, 4, // refcount_order: 16 bits
            0, 0, 0, 112, // header_length
            0,   // compression_type: zlib
            0, 0, 0, 0, 0, 0, 0, // padding
        ];
        // Feature name table: one entry naming incompatible bit 0.
        h.extend_from_slice(&[0x68, 0x03, 0xf8, 0x57, 0, 0, 0, 48]);
        let mut entry = [0u8; 48];
        entry[0] = 0; // incompatible
        entry[1] = 0; // bit 0
        entry[2..7].copy_from_slice(b"dirty");
        h.extend_from_slice(&entry);
        h.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]); // end of extensions
        h.resize(512, 0);
        h
    }

    fn put32(h: &mut [u8], at: usize, v: u32) {
        h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn put64(h: &mut [u8], at: usize, v: u64) {
        h[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn parses_a_plain_v3_header() {
        let h = Header::parse(&v3_header()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 20);
        assert_eq!(h.l1_table_offset, HostOffset(0x30000));
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.compression_type, CompressionType::Zlib);
        assert_eq!(h.feature_names.len(), 1);
        assert_eq!(h.feature_names[0].name, "dirty");
        assert!(h.backing_file.is_none());
    }

    #[test]
    fn refuses_bad_magic() {
        let mut b = v3_header();
        b[0] = b'X';
        assert!(matches!(
            Header::parse(&b),
            Err(Error::BadMagic { found: 0x584649fb })
        ));
    }

    #[test]
    fn refuses_truncated_header() {
        let b = v3_header();
        assert!(matches!(
            Header::parse(&b[..50]),
            Err(Error::TruncatedHeader {
                needed: 104,
                available: 50
            })
        ));
        assert!(matches!(
            Header::parse(&b[..4]),
            Err(Error::TruncatedHeader { .. })
        ));
    }

    #[test]
    fn refuses_cluster_bits_out_of_range() {
        for bits in [0, 8, 22, 64] {
            let mut b = v3_header();
            put32(&mut b, 20, bits);
            let e = Header::parse(&b).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::BadField {
                        field: "cluster_bits",
                        ..
                    }
                ),
                "{e}"
            );
        }
    }

    #[test]
    fn names_unknown_incompatible_bit_from_table() {
        let mut b = v3_header();
        // Rename the table entry to bit 9 "frobnicate" and set bit 9.
        b[112 + 8 + 1] = 9;
        b[112 + 8 + 2..112 + 8 + 12].copy_from_slice(b"frobnicate");
        put64(&mut b, 72, 1 << 9 | 1 << 12);
        let e = Header::parse(&b).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unsupported incompatible feature bits 0x1200 (frobnicate, bit 12)"
        );
    }

    #[test]
    fn refuses_encryption() {
        let mut b = v3_header();
        put32(&mut b, 32, 2);
        assert!(matches!(Header::parse(&b), Err(Error::Encrypted { .. })));
        let mut b = v3_header();
        // Replace the feature table with a crypto header pointer.
        put32(&mut b, 112, ext::CRYPTO);
        put32(&mut b, 116, 16);
        assert!(matches!(Header::parse(&b), Err(Error::Encrypted { .. })));
    }

    #[test]
    fn refuses_huge_l1_without_allocating() {
        let mut b = v3_header();
        put32(&mut b, 36, 3_000_000_000);
        assert!(matches!(
            Header::parse(&b),
            Err(Error::BadField {
                field: "l1_size",
                ..
            })
        ));
        // A sane count still has to fit the file.
        let mut b = v3_header();
        put32(&mut b, 36, 4_000_000);
        put64(&mut b, 24, 4_000_000 << 29);
        let h = Header::parse(&b).unwrap();
        assert!(matches!(
            h.check_file_size(1 << 20),
            Err(Error::OutsideFile {
                what: "L1 table",
                ..
            })
        ));
    }

    #[test]
    fn refuses_l1_too_small_for_size() {
        let mut b = v3_header();
        put64(&mut b, 24, 1 << 40); // 1 TiB needs 2048 L1 entries
        assert!(matches!(
            Header::parse(&b),
            Err(Error::BadField {
                field: "l1_size",
                ..
            })
        ));
    }

    #[test]
    fn reads_v2_header_and_backing_name() {
        let mut b = v3_header();
        put32(&mut b, 4, 2);
        b.truncate(72);
        b.extend_from_slice(&[0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 3]); // backing format, 3 bytes
        b.extend_from_slice(b"raw\0\0\0\0\0"); // "raw" + padding
        b.extend_from_slice(&[0; 8]); // end
        let at = b.len() as u64;
        put64(&mut b, 8, at); // backing_file_offset
        put32(&mut b, 16, 8); // backing_file_size
        b.extend_from_slice(b"base.img");
        b.resize(512, 0);
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.version, 2);
        assert_eq!(h.refcount_order, 4);
        assert_eq!(h.header_length, 72);
        assert_eq!(h.backing_file.as_deref(), Some("base.img"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
    }

    #[test]
    fn keeps_unknown_extensions_and_reads_bitmaps_ext() {
        let mut b = v3_header();
        b.truncate(112);
        b.extend_from_slice(&[0x12, 0x34, 0x56, 0x78, 0, 0, 0, 3, 1, 2, 3, 0, 0, 0, 0, 0]);
        b.extend_from_slice(&[0x23, 0x85, 0x28, 0x75, 0, 0, 0, 24]); // bitmaps ext
        b.extend_from_slice(&[0, 0, 0, 1]); // nb_bitmaps
        b.extend_from_slice(&[0, 0, 0, 0]); // reserved
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 32]); // directory size
        b.extend_from_slice(&[0, 0, 0, 0, 0, 5, 0, 0]); // directory offset
        b.resize(512, 0);
        let h = Header::parse(&b).unwrap();
        assert_eq!(
            h.unknown_extensions,
            [UnknownExtension {
                kind: 0x1234_5678,
                length: 3
            }]
        );
        let bm = h.bitmaps.unwrap();
        assert_eq!(bm.directory_offset, HostOffset(0x50000));
        assert!(!bm.consistent);
    }

    #[test]
    fn refuses_extension_running_past_cluster() {
        let mut b = v3_header();
        put32(&mut b, 116, 4000);
        assert!(matches!(Header::parse(&b), Err(Error::BadExtension { .. })));
    }

    #[test]
    fn zstd_needs_the_incompatible_bit() {
        let mut b = v3_header();
        b[104] = 1;
        assert!(Header::parse(&b).is_err());
        put64(&mut b, 72, incompat::COMPRESSION);
        assert_eq!(
            Header::parse(&b).unwrap().compression_type,
            CompressionType::Zstd
        );
    }
}
