//! Error types: why a bmap file is refused ([`BmapError`] with its
//! [`BmapErrorKind`]), why a layout of extents can not be made into block
//! ranges ([`LayoutError`]), a failed read while hashing ([`ReadError`]),
//! and what the copy engine checks against a parsed bmap
//! ([`ImageSizeMismatch`], [`RangeChecksumMismatch`]).

use std::ops::Range;

use crate::checksum::{ChecksumType, Digest};
use crate::{BlockRange, Version};

/// A bmap file that is refused, with the file's name and, where the
/// problem is in one element, its line (1-based).
///
/// Displays as `disk.bmap: line 23: Range 1000-2000 ends past BlocksCount
/// 512`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {}{kind}", line_prefix(.line))]
pub struct BmapError {
    /// The name the caller gave the file.
    pub file: String,
    /// The line of the element at fault, if one is.
    pub line: Option<u32>,
    /// What is wrong.
    pub kind: BmapErrorKind,
}

fn line_prefix(line: &Option<u32>) -> String {
    line.map(|l| format!("line {l}: ")).unwrap_or_default()
}

/// A block range as bmaptool writes it: `N` for one block, `A-B` for more.
pub(crate) struct Span(pub u64, pub u64);

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == self.1 {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{}-{}", self.0, self.1)
        }
    }
}

/// What is wrong with a refused bmap file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BmapErrorKind {
    /// The file is not UTF-8 (bmaptool writes ASCII).
    #[error("not UTF-8 (invalid byte at offset {offset:#x})")]
    NotUtf8 {
        /// Offset of the first invalid byte.
        offset: usize,
    },
    /// The file is not well-formed XML (or has a DTD, which bmaptool never
    /// writes).
    #[error("not well-formed XML: {0}")]
    Xml(roxmltree::Error),
    /// The root element is not `<bmap>`.
    #[error("the root element is <{name}>, not <bmap>")]
    RootElement {
        /// The root element's name.
        name: String,
    },
    /// `<bmap>` has no `version` attribute.
    #[error("<bmap> has no version attribute")]
    MissingVersion,
    /// The `version` attribute is not `MAJOR.MINOR`.
    #[error("version \"{value}\" is not MAJOR.MINOR")]
    BadVersion {
        /// The attribute's value.
        value: String,
    },
    /// A format version bmaptool 3.6 can not read (it reads up to 2.x), or
    /// 0.x, which was never released.
    #[error("bmap format version {version} is not supported (1.0 to 2.x are)")]
    UnsupportedVersion {
        /// The version in the file.
        version: Version,
    },
    /// A required element is missing.
    #[error("no <{element}> element")]
    Missing {
        /// The element's name.
        element: &'static str,
    },
    /// An element that must appear once appears again.
    #[error("a second <{element}> (the first is on line {first_line})")]
    Duplicate {
        /// The element's name.
        element: &'static str,
        /// Line of the first one.
        first_line: u32,
    },
    /// A number field is not a decimal number that fits 64 bits.
    #[error("{element} \"{text}\" is not a decimal number below 2^64")]
    NotANumber {
        /// The element's name.
        element: &'static str,
        /// Its text, without surrounding whitespace.
        text: String,
    },
    /// `<ImageSize>` is 0: bmaptool can not create a bmap of an empty image
    /// and divides by its block count (0) when copying one.
    #[error("ImageSize is 0")]
    ZeroImageSize,
    /// `<BlockSize>` is 0; bmaptool divides by it.
    #[error("BlockSize is 0")]
    ZeroBlockSize,
    /// `<BlocksCount>` is not `ImageSize / BlockSize` rounded up, which
    /// bmaptool refuses too.
    #[error(
        "BlocksCount {blocks_count} is not ImageSize {image_size} / BlockSize {block_size} \
         rounded up ({expected})"
    )]
    BlocksCount {
        /// The count in the file.
        blocks_count: u64,
        /// `<ImageSize>`.
        image_size: u64,
        /// `<BlockSize>`.
        block_size: u64,
        /// The count it must be.
        expected: u64,
    },
    /// `<ChecksumType>` names a function not supported here.
    #[error("ChecksumType \"{name}\" is not supported (sha1 and sha256 are)")]
    UnknownChecksumType {
        /// The name in the file.
        name: String,
    },
    /// The file's own checksum is not a digest of its type.
    #[error("{element} \"{value}\" is not {} lowercase hex digits ({checksum_type})", checksum_type.hex_len())]
    BadFileChecksum {
        /// `BmapFileChecksum` or `BmapFileSHA1`.
        element: &'static str,
        /// The element's text.
        value: String,
        /// The type it must be.
        checksum_type: ChecksumType,
    },
    /// The file's own checksum does not match its text.
    #[error("{element} is {stored} but the file's {} is {computed}", stored.checksum_type())]
    FileChecksum {
        /// `BmapFileChecksum` or `BmapFileSHA1`.
        element: &'static str,
        /// The checksum in the file.
        stored: Digest,
        /// The checksum of the file with that value replaced by zeros.
        computed: Digest,
    },
    /// `<BlockMap>` holds an element other than `<Range>`.
    #[error("<{name}> in <BlockMap>, where only <Range> may be")]
    UnexpectedElement {
        /// The element's name.
        name: String,
    },
    /// A `<Range>`'s text is neither `N` nor `A-B`.
    #[error("Range \"{text}\" is neither a block number N nor a range A-B")]
    RangeSyntax {
        /// Its text, without surrounding whitespace.
        text: String,
    },
    /// A `<Range>` whose first block is after its last.
    #[error("Range {first}-{last} starts after it ends")]
    RangeReversed {
        /// First block.
        first: u64,
        /// Last block.
        last: u64,
    },
    /// A `<Range>` that ends at or past `<BlocksCount>`.
    #[error("Range {} ends past BlocksCount {blocks_count}", Span(*.first, *.last))]
    RangePastEnd {
        /// First block.
        first: u64,
        /// Last block.
        last: u64,
        /// `<BlocksCount>`.
        blocks_count: u64,
    },
    /// A `<Range>` that overlaps the one before it.
    #[error("Range {} overlaps the Range {} before it", Span(*.first, *.last), Span(*.previous_first, *.previous_last))]
    RangeOverlap {
        /// First block.
        first: u64,
        /// Last block.
        last: u64,
        /// First block of the previous range.
        previous_first: u64,
        /// Last block of the previous range.
        previous_last: u64,
    },
    /// A `<Range>` that lies wholly before the one before it.
    #[error("Range {} lies before the Range {} listed ahead of it", Span(*.first, *.last), Span(*.previous_first, *.previous_last))]
    RangeOutOfOrder {
        /// First block.
        first: u64,
        /// Last block.
        last: u64,
        /// First block of the previous range.
        previous_first: u64,
        /// Last block of the previous range.
        previous_last: u64,
    },
    /// A `<Range>`'s checksum attribute is not a digest of the file's type.
    #[error(
        "Range {}: {attribute}=\"{value}\" is not {} lowercase hex digits ({checksum_type})",
        Span(*.first, *.last),
        checksum_type.hex_len()
    )]
    BadRangeChecksum {
        /// First block.
        first: u64,
        /// Last block.
        last: u64,
        /// `chksum` (2.0, 1.4) or `sha1` (1.3).
        attribute: &'static str,
        /// The attribute's value.
        value: String,
        /// The type it must be.
        checksum_type: ChecksumType,
    },
    /// `<MappedBlocksCount>` is not the number of blocks in the ranges.
    /// bmaptool refuses this too, at the end of the copy.
    #[error("MappedBlocksCount is {declared} but the Ranges hold {counted} blocks")]
    MappedBlocksCount {
        /// The count in the file.
        declared: u64,
        /// The blocks in the ranges.
        counted: u64,
    },
}

/// Extents that can not be made into block ranges.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// bmaptool refuses to create a bmap of an empty image.
    #[error("the image is empty")]
    ZeroImageSize,
    /// A block size of 0.
    #[error("the block size is 0")]
    ZeroBlockSize,
    /// An extent that ends before it starts.
    #[error("extent {:#x}..{:#x} ends before it starts", .0.start, .0.end)]
    Reversed(Range<u64>),
    /// Extents not sorted by start.
    #[error(
        "extent {:#x}..{:#x} starts before extent {:#x}..{:#x}, which precedes it",
        next.start, next.end, previous.start, previous.end
    )]
    OutOfOrder {
        /// The earlier extent in the input.
        previous: Range<u64>,
        /// The extent that starts before it.
        next: Range<u64>,
    },
}

/// The caller's reader failed while a range was hashed.
#[derive(Debug, thiserror::Error)]
#[error("reading {len} bytes at {offset:#x} to hash blocks {}", Span(range.first, range.last))]
pub struct ReadError<E> {
    /// The range being hashed.
    pub range: BlockRange,
    /// Offset of the failed read.
    pub offset: u64,
    /// Length of the failed read.
    pub len: usize,
    /// The reader's error.
    #[source]
    pub source: E,
}

/// An image whose size is not the bmap's `<ImageSize>`; bmaptool copy
/// refuses it when it knows the image's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the image is {image} bytes but the bmap's ImageSize is {bmap}")]
pub struct ImageSizeMismatch {
    /// `<ImageSize>`.
    pub bmap: u64,
    /// The size of the image.
    pub image: u64,
}

/// The bytes of a range do not hash to its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "checksum mismatch for blocks range {}: calculated {computed}, should be {stored}",
    Span(*.first, *.last)
)]
pub struct RangeChecksumMismatch {
    /// First block of the range.
    pub first: u64,
    /// Last block of the range.
    pub last: u64,
    /// The checksum in the bmap.
    pub stored: Digest,
    /// The checksum of the bytes read.
    pub computed: Digest,
}
