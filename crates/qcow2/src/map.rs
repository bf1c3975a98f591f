//! The virtual map: `qemu-img map --output=json` entries, streamed.

use std::ops::Range;

use sparsekit_extent::Extent;
pub use sparsekit_extent::qemu::{MapEntry, merge_entries};

use crate::chain::Image;
use crate::error::{Error, Result};
use crate::types::GuestOffset;

/// Iterator over the map of a guest range, returned by [`Image::map`].
///
/// Yields merged entries one at a time; after an error it stops.
#[derive(Debug)]
pub struct MapIter<'a> {
    image: &'a Image,
    pos: u64,
    end: u64,
    pending: Option<MapEntry>,
    done: bool,
}

impl<'a> MapIter<'a> {
    pub(crate) fn new(image: &'a Image, range: Range<u64>) -> Self {
        MapIter {
            image,
            pos: range.start,
            end: range.end,
            pending: None,
            done: false,
        }
    }

    /// The entry at `pos`, walking the chain like qemu-img's
    /// `get_block_status`.
    fn probe(&self) -> Result<MapEntry> {
        let mut len = self.end - self.pos;
        let mut depth = 0;
        let layers = self.image.layers().len();
        let st = loop {
            let st = self.image.layer_status(depth, GuestOffset(self.pos), len)?;
            if st.len == 0 {
                return Err(Error::OutOfRange {
                    offset: self.pos,
                    length: len,
                    size: self.image.layers()[depth].virtual_size(),
                });
            }
            len = st.len;
            if st.data || st.zero || depth + 1 == layers {
                break st;
            }
            depth += 1;
        };
        Ok(MapEntry {
            start: self.pos,
            length: len,
            depth: depth as u64,
            present: st.allocated,
            zero: st.zero,
            data: st.data,
            compressed: st.compressed,
            offset: st.offset.map(|h| h.0),
        })
    }

    /// Adapts this map to the extent vocabulary (coalesce it downstream
    /// to merge neighbours of the same kind).
    pub fn extents(self) -> impl Iterator<Item = Result<Extent>> + 'a {
        self.map(|r| r.map(|e| e.to_extent()))
    }
}

impl Iterator for MapIter<'_> {
    type Item = Result<MapEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        while self.pos < self.end {
            let e = match self.probe() {
                Ok(e) => e,
                Err(err) => {
                    self.done = true;
                    return Some(Err(err));
                }
            };
            self.pos = e.end();
            match &mut self.pending {
                Some(p) if p.mergeable(&e) => p.length += e.length,
                Some(p) => {
                    let out = *p;
                    *p = e;
                    return Some(Ok(out));
                }
                None => self.pending = Some(e),
            }
        }
        self.done = true;
        self.pending.take().map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparsekit_extent::Kind;

    fn e(start: u64, length: u64, data: bool, offset: Option<u64>) -> MapEntry {
        MapEntry {
            start,
            length,
            depth: 0,
            present: data,
            zero: !data,
            data,
            compressed: false,
            offset,
        }
    }

    #[test]
    fn merges_only_contiguous_host_offsets() {
        let m = merge_entries([
            e(0, 10, true, Some(100)),
            e(10, 10, true, Some(110)),
            e(20, 10, true, Some(500)),
            e(30, 10, false, None),
            e(40, 10, false, None),
        ]);
        assert_eq!(
            m,
            [
                e(0, 20, true, Some(100)),
                e(20, 10, true, Some(500)),
                e(30, 20, false, None)
            ]
        );
    }

    #[test]
    fn json_matches_qemu_img_field_names() {
        let j = serde_json::to_value(e(0, 512, true, Some(4096))).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"start": 0, "length": 512, "depth": 0, "present": true,
                "zero": false, "data": true, "compressed": false, "offset": 4096})
        );
        let j = serde_json::to_value(e(0, 512, false, None)).unwrap();
        assert!(j.get("offset").is_none());
    }

    #[test]
    fn kinds_at_the_edge() {
        assert_eq!(e(0, 1, true, Some(0)).kind(), Kind::Data);
        let mut z = e(0, 1, false, None);
        assert_eq!(z.kind(), Kind::Hole);
        z.present = true;
        assert_eq!(z.kind(), Kind::Zero);
        // Metadata preallocation: data and zero at once reads as zeros.
        let mut dz = e(0, 1, true, Some(0));
        dz.zero = true;
        assert_eq!(dz.kind(), Kind::Zero);
    }
}
