//! The virtual map: `qemu-img map --output=json` entries, streamed.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use sparsekit_extent::{Extent, Kind};

use crate::chain::Image;
use crate::error::{Error, Result};

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapEntry {
    /// First guest byte.
    pub start: u64,
    /// Number of bytes.
    pub length: u64,
    /// Layer of the chain that decides the content (0 = the image).
    pub depth: u64,
    /// Whether that layer has it allocated (data or zero).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data (may be zeros too, when qemu knows the host range is a
    /// hole).
    pub data: bool,
    /// Compressed cluster.
    pub compressed: bool,
    /// Host offset in the layer's file (or data file), when known.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub offset: Option<u64>,
}

impl MapEntry {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.length
    }

    /// Whether `next` continues this entry with every field the same (and
    /// the host offset contiguous): qemu-img's `entry_mergeable`.
    pub fn mergeable(&self, next: &MapEntry) -> bool {
        self.end() == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }

    /// The extent vocabulary's view: data that is not known to be zero is
    /// [`Kind::Data`]; zeros allocated in some layer are [`Kind::Zero`];
    /// zeros allocated nowhere are [`Kind::Hole`].
    pub fn kind(&self) -> Kind {
        if self.data && !self.zero {
            Kind::Data
        } else if self.present {
            Kind::Zero
        } else {
            Kind::Hole
        }
    }

    /// This entry as an [`Extent`].
    pub fn to_extent(&self) -> Extent {
        Extent {
            offset: self.start,
            length: self.length,
            kind: self.kind(),
        }
    }
}

/// Merges neighbours that agree on every field (the canonical form in
/// which two maps of the same image compare equal).
pub fn merge_entries(entries: impl IntoIterator<Item = MapEntry>) -> Vec<MapEntry> {
    let mut out: Vec<MapEntry> = Vec::new();
    for e in entries {
        match out.last_mut() {
            Some(p) if p.mergeable(&e) => p.length += e.length,
            _ => out.push(e),
        }
    }
    out
}

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
            let st = self.image.layer_status(depth, self.pos, len)?;
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
            offset: st.offset,
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
