//! Checking that a stream of extents is a map of a range.

use std::ops::Range;

use crate::Extent;

/// Why a sequence of extents is not a map of the range it should cover.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// An extent of length zero.
    #[error("extent at {offset:#x} has length 0")]
    Empty {
        /// Offset of the empty extent.
        offset: u64,
    },
    /// An extent starts before the previous one ends (unsorted or overlapping).
    #[error("extent at {offset:#x} starts before {expected:#x}, where the previous extent ends")]
    Overlap {
        /// Offset of the offending extent.
        offset: u64,
        /// Where it should have started.
        expected: u64,
    },
    /// Bytes between two extents (or before the first) are not covered.
    #[error("bytes {expected:#x}..{offset:#x} are not covered by any extent")]
    Gap {
        /// Where the next extent should have started.
        expected: u64,
        /// Where it did start.
        offset: u64,
    },
    /// An extent runs past the end of the range.
    #[error("extent {offset:#x}..{end:#x} runs past the end of the range at {range_end:#x}")]
    PastEnd {
        /// Offset of the offending extent.
        offset: u64,
        /// Its end.
        end: u64,
        /// End of the range being mapped.
        range_end: u64,
    },
    /// The map stops before the end of the range.
    #[error("the map ends at {end:#x}, short of the end of the range at {range_end:#x}")]
    Short {
        /// Where the last extent ended.
        end: u64,
        /// End of the range being mapped.
        range_end: u64,
    },
}

/// Checks a stream of extents one at a time against a range: sorted,
/// gap-free, no empty extents, covering exactly the range.
///
/// Producers use it to refuse to present a partial map as whole:
///
/// ```
/// use sparsekit_extent::{Extent, Kind, MapChecker, MapError};
/// let mut c = MapChecker::new(0..100);
/// c.push(&Extent::new(0, 60, Kind::Data)).unwrap();
/// assert_eq!(c.finish(), Err(MapError::Short { end: 60, range_end: 100 }));
/// ```
#[derive(Debug, Clone)]
pub struct MapChecker {
    range: Range<u64>,
    next: u64,
}

impl MapChecker {
    /// A checker for a map of `range`.
    pub fn new(range: Range<u64>) -> Self {
        Self {
            next: range.start,
            range,
        }
    }

    /// Where the next extent must start.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Checks the next extent.
    pub fn push(&mut self, e: &Extent) -> Result<(), MapError> {
        if e.length == 0 {
            return Err(MapError::Empty { offset: e.offset });
        }
        if e.offset < self.next {
            return Err(MapError::Overlap {
                offset: e.offset,
                expected: self.next,
            });
        }
        if e.offset > self.next {
            return Err(MapError::Gap {
                expected: self.next,
                offset: e.offset,
            });
        }
        if e.end() > self.range.end {
            return Err(MapError::PastEnd {
                offset: e.offset,
                end: e.end(),
                range_end: self.range.end,
            });
        }
        self.next = e.end();
        Ok(())
    }

    /// Checks that the extents pushed so far reach the end of the range.
    pub fn finish(&self) -> Result<(), MapError> {
        if self.next < self.range.end {
            return Err(MapError::Short {
                end: self.next,
                range_end: self.range.end,
            });
        }
        Ok(())
    }
}

/// Checks that `extents` is a map of `range`: sorted, gap-free, without
/// empty extents, covering exactly `range`.
pub fn check_map<'a>(
    extents: impl IntoIterator<Item = &'a Extent>,
    range: Range<u64>,
) -> Result<(), MapError> {
    let mut c = MapChecker::new(range);
    for e in extents {
        c.push(e)?;
    }
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Kind;

    #[test]
    fn accepts_exact_cover() {
        let m = [
            Extent::new(10, 5, Kind::Data),
            Extent::new(15, 5, Kind::Hole),
        ];
        assert_eq!(check_map(&m, 10..20), Ok(()));
        assert_eq!(check_map(&[], 7..7), Ok(()));
    }

    #[test]
    fn names_each_fault() {
        let d = |o, l| Extent::new(o, l, Kind::Data);
        assert_eq!(
            check_map(&[d(0, 0)], 0..1),
            Err(MapError::Empty { offset: 0 })
        );
        assert_eq!(
            check_map(&[d(0, 10), d(5, 10)], 0..15),
            Err(MapError::Overlap {
                offset: 5,
                expected: 10
            })
        );
        assert_eq!(
            check_map(&[d(0, 10), d(12, 3)], 0..15),
            Err(MapError::Gap {
                expected: 10,
                offset: 12
            })
        );
        assert_eq!(
            check_map(&[d(1, 10)], 0..15),
            Err(MapError::Gap {
                expected: 0,
                offset: 1
            })
        );
        assert_eq!(
            check_map(&[d(0, 16)], 0..15),
            Err(MapError::PastEnd {
                offset: 0,
                end: 16,
                range_end: 15
            })
        );
        assert_eq!(
            check_map(&[d(0, 10)], 0..15),
            Err(MapError::Short {
                end: 10,
                range_end: 15
            })
        );
    }

    #[test]
    fn error_messages_print_hex_offsets() {
        let e = MapError::Gap {
            expected: 4096,
            offset: 8192,
        };
        assert_eq!(
            e.to_string(),
            "bytes 0x1000..0x2000 are not covered by any extent"
        );
    }
}
