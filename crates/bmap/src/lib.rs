//! bmap files, as bmap-tools' `bmaptool` 3.6 reads and writes them.
//!
//! A bmap file lists the blocks of a sparse image that hold data, each run
//! of blocks as a `<Range>` with the checksum of its bytes, so that a copy
//! reads and writes only those and checks what it read.
//!
//! - [`Bmap::parse`] reads formats 1.0 to 2.x and checks every field, the
//!   ranges' order and the file's own checksum; a refusal is a
//!   [`BmapError`] naming the file, the line and the field or range.
//! - [`Creator`] turns the data extents of an image into the block ranges
//!   `bmaptool create` lists ([`block_ranges`]), then hashes the ranges in
//!   parallel through a reader the caller supplies ([`Creator::hash`]).
//! - [`Bmap::to_xml`] writes format 2.0 byte for byte as `bmaptool create`
//!   does, comments and the file's checksum included.
//! - [`Hasher`] hashes a range incrementally as the copy engine passes its
//!   pieces, and [`BlockRange::verify`] compares the result with the bmap;
//!   [`Bmap::byte_ranges`] gives each range as bytes, clipped to the image.
//!
//! ```
//! use sparsekit_bmap::{Bmap, ChecksumType, Creator, Hasher};
//!
//! // A 10000-byte image with data at 5000..5100 and in its last byte.
//! let mut image = vec![0u8; 10_000];
//! image[5000..5100].fill(0xab);
//! image[9999] = 1;
//! let creator = Creator::new(10_000, [5000..5100, 9999..10_000])?;
//! let bmap = creator.hash(|buf: &mut [u8], offset: u64| {
//!     let at = offset as usize;
//!     buf.copy_from_slice(&image[at..at + buf.len()]);
//!     Ok::<_, std::io::Error>(())
//! })?;
//! // Blocks 1 (4096..8192) and 2 (8192..10000, the partial last block)
//! // touch data and are merged into one range.
//! assert_eq!(bmap.blocks_count(), 3);
//! assert_eq!(bmap.mapped_blocks_count(), 2);
//! assert_eq!(bmap.mapped_bytes(), 10_000 - 4096);
//!
//! let xml = bmap.to_xml();
//! assert!(xml.contains("<Range chksum=\""));
//! let again = Bmap::parse(xml.as_bytes(), "disk.bmap")?;
//! assert_eq!(again, bmap);
//!
//! // What a copy engine does with each range.
//! for (bytes, range) in again.byte_ranges() {
//!     let mut h = Hasher::new(ChecksumType::Sha256);
//!     h.update(&image[bytes.start as usize..bytes.end as usize]);
//!     range.verify(&h.finish())?;
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::ops::Range;

mod checksum;
mod create;
mod error;
mod parse;
mod write;

pub use checksum::{ChecksumType, Digest, Hasher};
pub use create::{Creator, PIECE, block_ranges};
pub use error::{
    BmapError, BmapErrorKind, ImageSizeMismatch, LayoutError, RangeChecksumMismatch, ReadError,
};

/// The block size `bmaptool create` uses on ext4, xfs and btrfs with 4 KiB
/// blocks (it asks the file system with `FIGETBSZ`), and [`Creator::new`]'s.
pub const DEFAULT_BLOCK_SIZE: u64 = 4096;

/// A bmap format version, `MAJOR.MINOR`.
///
/// What the version means for checksums (BmapCopy.py's `_parse_bmap`):
/// 2.x and 1.4 (a mistaken name for 2.0, released in bmap-tools 3.0) name
/// the function in `<ChecksumType>`, the file's checksum in
/// `<BmapFileChecksum>` and each range's in a `chksum` attribute; 1.3 uses
/// SHA-1, `<BmapFileSHA1>` and `sha1` attributes; the others (1.0 to 1.2,
/// and 1.5 and later, which never existed) have no checksums.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Raised for incompatible changes; bmaptool 3.6 reads up to 2.
    pub major: u32,
    /// Raised for compatible changes.
    pub minor: u32,
}

impl Version {
    /// The version `bmaptool create` 3.6 writes, and [`Bmap::to_xml`].
    pub const CREATED: Version = Version { major: 2, minor: 0 };

    /// Where this version keeps its checksums.
    pub(crate) fn scheme(self) -> Scheme {
        match (self.major, self.minor) {
            (2.., _) | (1, 4) => Scheme::Typed,
            (1, 3) => Scheme::Sha1,
            _ => Scheme::None,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Where a format version keeps its checksums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// 1.0 to 1.2: none.
    None,
    /// 1.3: SHA-1 in `<BmapFileSHA1>` and `sha1` attributes.
    Sha1,
    /// 2.x and 1.4: `<ChecksumType>`, `<BmapFileChecksum>`, `chksum`.
    Typed,
}

impl Scheme {
    /// The element that holds the file's own checksum.
    pub(crate) fn file_element(self) -> Option<&'static str> {
        match self {
            Scheme::None => None,
            Scheme::Sha1 => Some("BmapFileSHA1"),
            Scheme::Typed => Some("BmapFileChecksum"),
        }
    }

    /// The `<Range>` attribute that holds its checksum.
    pub(crate) fn range_attribute(self) -> Option<&'static str> {
        match self {
            Scheme::None => None,
            Scheme::Sha1 => Some("sha1"),
            Scheme::Typed => Some("chksum"),
        }
    }
}

/// A run of mapped blocks, `first..=last`, and the checksum of its bytes.
///
/// The checksum covers the bytes of the blocks that lie inside the image:
/// for a range that holds the last, partial block, it stops at
/// `<ImageSize>` (bmaptool reads up to the end of the file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockRange {
    /// First block, counted from 0.
    pub first: u64,
    /// Last block, inclusive.
    pub last: u64,
    /// Checksum of the range's bytes, if the bmap has one.
    pub checksum: Option<Digest>,
}

impl BlockRange {
    /// Number of blocks in the range (saturating, like
    /// [`BlockRange::bytes`]).
    pub fn blocks(&self) -> u64 {
        self.last.saturating_sub(self.first).saturating_add(1)
    }

    /// The range's bytes, `first * block_size` up to `(last + 1) *
    /// block_size` clipped to `image_size`: the bytes its checksum covers
    /// and a copy reads.
    ///
    /// Saturating, so it never panics; for a range of a parsed [`Bmap`],
    /// with its image and block size, nothing saturates and the range is
    /// never empty.
    pub fn bytes(&self, image_size: u64, block_size: u64) -> Range<u64> {
        let end = self
            .last
            .saturating_add(1)
            .saturating_mul(block_size)
            .min(image_size);
        let start = self.first.saturating_mul(block_size).min(end);
        start..end
    }

    /// Checks `computed`, the checksum of the range's bytes (see
    /// [`BlockRange::bytes`]), against the range's; a range without a
    /// checksum takes any.
    pub fn verify(&self, computed: &Digest) -> Result<(), RangeChecksumMismatch> {
        match self.checksum {
            Some(stored) if stored != *computed => Err(RangeChecksumMismatch {
                first: self.first,
                last: self.last,
                stored,
                computed: *computed,
            }),
            _ => Ok(()),
        }
    }
}

/// A block map: an image's size and the ranges of its blocks that hold
/// data.
///
/// Built by [`Bmap::parse`] or [`Creator`], which check its invariants: the
/// image is not empty, the block size is not 0, `blocks_count` is
/// `image_size / block_size` rounded up, the ranges are sorted, disjoint
/// and end before `blocks_count`, `mapped_blocks_count` is the number of
/// blocks they hold, and each checksum is of `checksum_type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bmap {
    pub(crate) version: Version,
    pub(crate) image_size: u64,
    pub(crate) block_size: u64,
    pub(crate) blocks_count: u64,
    pub(crate) mapped_blocks_count: u64,
    pub(crate) checksum_type: Option<ChecksumType>,
    pub(crate) ranges: Vec<BlockRange>,
}

impl Bmap {
    /// The format version of the file it was parsed from; 2.0 for one from
    /// [`Creator`].
    pub fn version(&self) -> Version {
        self.version
    }

    /// `<ImageSize>`: the image's size in bytes.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// `<BlockSize>`: bytes per block. bmaptool accepts any size but 0, a
    /// power of two or not, and so does this crate: it is never more than
    /// a multiplier here.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// `<BlocksCount>`: blocks in the image, the last one possibly partial.
    pub fn blocks_count(&self) -> u64 {
        self.blocks_count
    }

    /// `<MappedBlocksCount>`: blocks in the ranges.
    pub fn mapped_blocks_count(&self) -> u64 {
        self.mapped_blocks_count
    }

    /// The type of the checksums, or `None` for formats 1.0 to 1.2, which
    /// have none. A bmap with a type may still have ranges without
    /// checksums (`bmaptool create --no-checksum`).
    pub fn checksum_type(&self) -> Option<ChecksumType> {
        self.checksum_type
    }

    /// The ranges of mapped blocks, sorted and disjoint.
    pub fn ranges(&self) -> &[BlockRange] {
        &self.ranges
    }

    /// The bytes a copy reads: the ranges' blocks, the last one clipped to
    /// the image. (bmaptool's "mapped size" is `mapped_blocks_count *
    /// block_size`, which counts the partial last block whole.)
    pub fn mapped_bytes(&self) -> u64 {
        self.byte_ranges().map(|(b, _)| b.end - b.start).sum()
    }

    /// Each range as bytes clipped to the image (see
    /// [`BlockRange::bytes`]), in order, with the range itself for its
    /// checksum and [`BlockRange::verify`].
    pub fn byte_ranges(&self) -> impl ExactSizeIterator<Item = (Range<u64>, &BlockRange)> + '_ {
        self.ranges
            .iter()
            .map(|r| (r.bytes(self.image_size, self.block_size), r))
    }

    /// A hasher for this bmap's checksums, if it has any.
    pub fn hasher(&self) -> Option<Hasher> {
        self.checksum_type.map(Hasher::new)
    }

    /// Refuses an image whose size is not `<ImageSize>`, as `bmaptool
    /// copy` does whenever it knows the image's size (BmapCopy.py's
    /// `_set_image_size`; it skips the check for a compressed image whose
    /// size it can not tell in advance).
    pub fn check_image_size(&self, image_size: u64) -> Result<(), ImageSizeMismatch> {
        if image_size == self.image_size {
            Ok(())
        } else {
            Err(ImageSizeMismatch {
                bmap: self.image_size,
                image: image_size,
            })
        }
    }
}

/// `ceil(image_size / block_size)` for a block size other than 0, without
/// overflow.
pub(crate) fn blocks_for(image_size: u64, block_size: u64) -> u64 {
    image_size.div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u64, last: u64) -> BlockRange {
        BlockRange {
            first,
            last,
            checksum: None,
        }
    }

    #[test]
    fn bytes_clip_the_last_block_to_the_image() {
        assert_eq!(range(0, 0).bytes(10_000, 4096), 0..4096);
        assert_eq!(range(1, 2).bytes(10_000, 4096), 4096..10_000);
        assert_eq!(range(2, 2).bytes(8193, 4096), 8192..8193);
        assert_eq!(range(2, 2).bytes(12288, 4096), 8192..12288);
        // Out-of-bounds input saturates instead of panicking.
        assert_eq!(
            range(u64::MAX - 1, u64::MAX).bytes(u64::MAX, 4096),
            u64::MAX..u64::MAX
        );
        assert_eq!(range(5, 6).bytes(100, 4096), 100..100);
        assert_eq!(range(0, u64::MAX).blocks(), u64::MAX);
        assert_eq!(range(7, 7).blocks(), 1);
    }

    #[test]
    fn versions_map_to_checksum_schemes() {
        let v = |major, minor| Version { major, minor }.scheme();
        assert_eq!(v(2, 0), Scheme::Typed);
        assert_eq!(v(2, 7), Scheme::Typed);
        assert_eq!(v(1, 4), Scheme::Typed);
        assert_eq!(v(1, 3), Scheme::Sha1);
        assert_eq!(v(1, 2), Scheme::None);
        assert_eq!(v(1, 0), Scheme::None);
        assert_eq!(v(1, 5), Scheme::None);
        assert_eq!(Version::CREATED.to_string(), "2.0");
    }

    #[test]
    fn verify_compares_only_when_there_is_a_checksum() {
        let a = Hasher::digest(ChecksumType::Sha256, b"a");
        let b = Hasher::digest(ChecksumType::Sha256, b"b");
        assert!(range(1, 2).verify(&a).is_ok());
        let with = BlockRange {
            checksum: Some(a),
            ..range(1, 2)
        };
        assert!(with.verify(&a).is_ok());
        let err = with.verify(&b).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("checksum mismatch for blocks range 1-2: calculated {b}, should be {a}")
        );
    }

    #[test]
    fn blocks_for_rounds_up_without_overflow() {
        assert_eq!(blocks_for(1, 4096), 1);
        assert_eq!(blocks_for(4096, 4096), 1);
        assert_eq!(blocks_for(4097, 4096), 2);
        assert_eq!(blocks_for(u64::MAX, 4096), u64::MAX / 4096 + 1);
        assert_eq!(blocks_for(u64::MAX, 1), u64::MAX);
    }
}
