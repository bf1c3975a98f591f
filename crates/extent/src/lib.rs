//! The extent vocabulary shared by every sparsekit crate.
//!
//! An [`Extent`] is a byte range of a virtual disk, `(offset, length, kind)`,
//! where [`Kind`] says what the range holds:
//!
//! - [`Kind::Data`]: bytes that must be read to be known;
//! - [`Kind::Zero`]: reads as zeros, storage may be allocated (an unwritten
//!   fallocated extent, a qcow2 zero cluster);
//! - [`Kind::Hole`]: unallocated, reads as zeros.
//!
//! A *map* of a range is a sequence of extents that is sorted, gap-free and
//! covers exactly that range. Producers (FIEMAP, qcow2 tables, NBD block
//! status) yield maps as fallible iterators of `Result<Extent, E>`; the
//! adapters here work on such streams without collecting them:
//!
//! - [`ExtentIterExt::coalesce`] merges neighbours of the same kind;
//! - [`ExtentIterExt::clip`] restricts a map to a range;
//! - [`intersect`] keeps the parts of a map that lie inside a set of ranges
//!   (the "dirty ∩ allocated" view an incremental backup copies);
//! - [`MapChecker`] verifies, extent by extent, that a stream is a map of
//!   the range it claims to cover.
//!
//! ```
//! use sparsekit_extent::{Extent, ExtentIterExt, Kind, check_map};
//!
//! let raw = [
//!     Extent::new(0, 4096, Kind::Data),
//!     Extent::new(4096, 4096, Kind::Data),
//!     Extent::new(8192, 8192, Kind::Hole),
//! ];
//! let merged: Vec<Extent> = raw
//!     .into_iter()
//!     .map(Ok::<_, std::convert::Infallible>)
//!     .coalesce()
//!     .clip(1024..12288)
//!     .collect::<Result<_, _>>()
//!     .unwrap();
//! assert_eq!(
//!     merged,
//!     [Extent::new(1024, 7168, Kind::Data), Extent::new(8192, 4096, Kind::Hole)]
//! );
//! check_map(&merged, 1024..12288).unwrap();
//! ```

use std::fmt;
use std::ops::Range;

mod check;
mod ops;
pub mod qemu;

pub use check::{MapChecker, MapError, check_map};
pub use ops::{Clip, Coalesce, ExtentIterExt, Intersect, intersect};

/// What a range of a virtual disk holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Allocated bytes whose content must be read.
    Data,
    /// Reads as zeros; storage may be allocated (unwritten extent, qcow2
    /// zero cluster, NBD `NBD_STATE_ZERO` without `NBD_STATE_HOLE`).
    Zero,
    /// Unallocated; reads as zeros.
    Hole,
}

impl Kind {
    /// True for [`Kind::Zero`] and [`Kind::Hole`]: the range never needs to
    /// be read.
    pub fn reads_as_zero(self) -> bool {
        !matches!(self, Kind::Data)
    }

    /// The lowercase name used in human output: `data`, `zero` or `hole`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Data => "data",
            Kind::Zero => "zero",
            Kind::Hole => "hole",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A byte range `[offset, offset + length)` of a virtual disk and what it
/// holds.
///
/// `offset + length` never overflows `u64` for extents built with
/// [`Extent::new`] or [`Extent::try_new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    /// First byte of the range.
    pub offset: u64,
    /// Number of bytes; a map never contains an extent of length 0.
    pub length: u64,
    /// What the range holds.
    pub kind: Kind,
}

impl Extent {
    /// An extent; panics if `offset + length` overflows `u64`.
    ///
    /// Use [`Extent::try_new`] for numbers that come from input.
    pub fn new(offset: u64, length: u64, kind: Kind) -> Self {
        Self::try_new(offset, length, kind).expect("extent end overflows u64")
    }

    /// An extent, or `None` if `offset + length` overflows `u64`.
    pub fn try_new(offset: u64, length: u64, kind: Kind) -> Option<Self> {
        offset.checked_add(length)?;
        Some(Self {
            offset,
            length,
            kind,
        })
    }

    /// An extent covering `range`; `None` if the range is reversed.
    pub fn from_range(range: Range<u64>, kind: Kind) -> Option<Self> {
        let length = range.end.checked_sub(range.start)?;
        Some(Self {
            offset: range.start,
            length,
            kind,
        })
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// The byte range `offset..end`.
    pub fn range(&self) -> Range<u64> {
        self.offset..self.end()
    }

    /// The part of this extent inside `range`, if any.
    pub fn clip_to(&self, range: &Range<u64>) -> Option<Extent> {
        let start = self.offset.max(range.start);
        let end = self.end().min(range.end);
        (start < end).then(|| Extent {
            offset: start,
            length: end - start,
            kind: self.kind,
        })
    }
}

/// Sum of the lengths of the extents of `kind`.
pub fn total_of<'a>(extents: impl IntoIterator<Item = &'a Extent>, kind: Kind) -> u64 {
    extents
        .into_iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.length)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_to_inside_outside_and_straddling() {
        let e = Extent::new(100, 100, Kind::Data);
        assert_eq!(e.clip_to(&(0..50)), None);
        assert_eq!(e.clip_to(&(200..300)), None);
        assert_eq!(
            e.clip_to(&(150..250)),
            Some(Extent::new(150, 50, Kind::Data))
        );
        assert_eq!(e.clip_to(&(0..u64::MAX)), Some(e));
        assert_eq!(
            e.clip_to(&(120..130)),
            Some(Extent::new(120, 10, Kind::Data))
        );
    }

    #[test]
    fn try_new_refuses_overflow() {
        assert!(Extent::try_new(u64::MAX, 1, Kind::Hole).is_none());
        assert!(Extent::try_new(u64::MAX - 1, 1, Kind::Hole).is_some());
        #[allow(clippy::reversed_empty_ranges)] // the reversed range is the point
        let reversed = 10..5;
        assert!(Extent::from_range(reversed, Kind::Data).is_none());
    }

    #[test]
    fn kind_reads_as_zero() {
        assert!(!Kind::Data.reads_as_zero());
        assert!(Kind::Zero.reads_as_zero());
        assert!(Kind::Hole.reads_as_zero());
    }

    #[test]
    fn total_of_sums_one_kind() {
        let m = [
            Extent::new(0, 10, Kind::Data),
            Extent::new(10, 5, Kind::Hole),
            Extent::new(15, 7, Kind::Data),
        ];
        assert_eq!(total_of(&m, Kind::Data), 17);
        assert_eq!(total_of(&m, Kind::Zero), 0);
    }
}
