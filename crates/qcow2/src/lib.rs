//! qcow2 images for sparsekit, read-only and offline.
//!
//! - [`Header`] parses and validates the header and its extensions
//!   (two layers: [`RawHeader`] is the big-endian layout).
//! - [`L1Entry`], [`L2Entry`], [`L2Mapping`] and [`Subcluster`] decode the
//!   bit-packed table entries of every cluster kind, including extended
//!   L2 entries and compressed clusters.
//! - [`Qcow2`] is one image file: L1 table, L2 tables on demand through a
//!   bounded cache, refcounts, the external data file.
//! - [`probe`] tells a qcow2 image from a raw one on the caller's open
//!   file; [`Image::open_file`] and [`Qcow2::open_file`] open from it, and
//!   [`OpenOptions::on_open`] (an [`OnOpen`] hook) sees every other file
//!   an open opens, with its [`FileRole`], before it is read: where a
//!   caller takes its locks. [`Image::files`] lists the files held.
//! - [`GuestOffset`], [`HostOffset`] and [`HostCluster`] keep the kinds
//!   of offsets apart in the API.
//! - [`Image`] is an image with its backing chain (qcow2 or raw): the
//!   virtual disk. [`Image::map`] streams [`MapEntry`] values equal to
//!   `qemu-img map --output=json`, convertible to
//!   [`sparsekit_extent::Extent`]; [`Image::read_at`] reads the disk.
//! - [`Qcow2::dirty_ranges`] reads a persistent dirty bitmap offline
//!   ([`Bitmap`], [`DirtyRanges`]), as `qemu-nbd -B NAME` would export it.
//! - [`Qcow2::check`] rebuilds refcounts like `qemu-img check`
//!   ([`CheckResult`] serializes to its `--output=json`), and
//!   [`Qcow2::check_path`] opens a damaged image for it, reporting tables
//!   past the end of the file as qemu-img does; [`Qcow2::info`]
//!   gives `qemu-img info --output=json` ([`ImageInfo`]);
//!   [`Qcow2::write_allocation_bitmap`] streams one bit per guest cluster.
//! - [`StreamDecoder`] reads an image from a forward-only stream (a pipe,
//!   standard input) in the layout of qemu's `qcow2-to-stdout.py`, and
//!   [`Chunks`] yields its data as `(guest offset, bytes)` [`Chunk`]s with
//!   bounded memory; [`StreamLayout`] and [`StreamWriter`] (or
//!   [`write_stream`]) write such a stream.
//!
//! Everything is read-only: files are opened with `File::open` and read
//! with `pread`; nothing an image says is allocated before it is checked
//! against the file size or a stated cap.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use sparsekit_qcow2::{Header, Image};
//!
//! // A qcow2 image is refused without I/O when its header is wrong:
//! assert!(Header::parse(b"not a qcow2 image at all").is_err());
//!
//! // Build a tiny valid image by hand: header, refcount table, L1 table.
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("empty.qcow2");
//! let mut f = vec![0u8; 3 * 512];
//! f[0..4].copy_from_slice(b"QFI\xfb");
//! f[7] = 2; // version 2
//! f[23] = 9; // cluster_bits: 512-byte clusters
//! f[24..32].copy_from_slice(&(64u64 * 1024).to_be_bytes()); // 64 KiB disk
//! f[39] = 2; // l1_size: 2 entries of 32 KiB each
//! f[40..48].copy_from_slice(&1024u64.to_be_bytes()); // L1 table at 0x400
//! f[48..56].copy_from_slice(&512u64.to_be_bytes()); // refcount table at 0x200
//! f[59] = 1; // refcount_table_clusters
//! std::fs::write(&path, &f)?;
//!
//! let img = Image::open(&path)?;
//! assert_eq!(img.virtual_size(), 65536);
//! let map: Vec<_> = img.map_all().collect::<Result<_, _>>()?;
//! assert_eq!(map.len(), 1);
//! assert!(map[0].zero && !map[0].present);
//! let mut buf = [0xffu8; 4096];
//! img.read_at(&mut buf, 8192)?;
//! assert!(buf.iter().all(|&b| b == 0));
//! # Ok(())
//! # }
//! ```

mod bitmap;
mod chain;
mod check;
mod compress;
mod entry;
mod error;
mod header;
mod image;
mod info;
mod map;
mod open;
mod seek;
mod snapshot;
mod stream;
mod types;

pub use bitmap::{
    Bitmap, BitmapCluster, BitmapTableEntry, DirtyRanges, RawBitmapEntry, flags as bitmap_flags,
    parse_directory,
};
pub use chain::{Image, Layer, RawImage};
pub use check::{CheckResult, MAX_MESSAGES};
pub use compress::decompress;
pub use entry::{
    Geometry, L1Entry, L2Entry, L2Mapping, RefcountTableEntry, Subcluster, SubclusterBitmap,
};
pub use error::{Error, Result};
pub use header::{
    BitmapsExtension, CompressionType, FeatureKind, FeatureName, Header, RawHeader,
    UnknownExtension, autoclear, compat, ext, incompat,
};
pub use image::{L2_CACHE_TABLES, LayerStatus, Qcow2, check_untrusted};
pub use info::{
    BitmapInfo, ChainInfo, ChildInfo, Empty, FileInfo, FileSpecific, FormatSpecific, ImageInfo,
    Qcow2Specific, RawInfo, SnapshotInfo,
};
pub use map::{MapEntry, MapIter, merge_entries};
pub use open::{
    FileRole, Format, HookError, MAX_CHAIN_DEPTH, OnOpen, OpenOptions, OpenedFile, probe,
};
pub use snapshot::{RawSnapshotHeader, Snapshot};
pub use stream::{
    Chunk, Chunks, DEFAULT_CLUSTER_BITS, DEFAULT_MAX_METADATA_BYTES, MAX_CHUNK_BYTES,
    StreamDecoder, StreamError, StreamLayout, StreamLimits, StreamWriter, WriteError, write_stream,
};
pub use types::{GuestOffset, HostCluster, HostOffset};
