//! The entries of `qemu-img map --output=json`: what every source's map
//! becomes when scripts written for qemu-img read it.
//!
//! [`MapEntry`] is one entry; [`Merge`] and [`merge_entries`] merge
//! neighbours that agree on every field, as qemu-img does, so that two maps
//! of the same disk compare equal; [`MapEntry::write_json`] prints an entry
//! in qemu-img's layout.

use std::io::{self, Write};

use crate::{Extent, Kind};

/// One entry of `qemu-img map --output=json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MapEntry {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer of the backing chain that answers (0: the image itself).
    pub depth: u64,
    /// Allocated in that layer (data or known zeros).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data (may also be zero, when qemu knows the host range is a
    /// hole).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the file of layer `depth`, where qemu-img prints one.
    #[cfg_attr(
        feature = "serde",
        serde(skip_serializing_if = "Option::is_none", default)
    )]
    pub offset: Option<u64>,
}

impl MapEntry {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.length
    }

    /// True when `next` continues `self` and agrees on every field, the
    /// host offset included (qemu-img's `entry_mergeable`), so that
    /// qemu-img would print the two as one entry.
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

    /// The extent vocabulary's view: data not known to be zero is
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

    /// What qemu-img prints for an empty range at `start`: one entry of
    /// length 0 that is not present.
    pub fn empty_at(start: u64) -> Self {
        Self {
            start,
            length: 0,
            depth: 0,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        }
    }

    /// The entry in qemu-img's layout:
    /// `{ "start": 0, "length": 4096, "depth": 0, "present": true, ... }`.
    pub fn write_json(&self, w: &mut impl Write) -> io::Result<()> {
        // Hand-assembled: `write!` costs a third of the time of printing a
        // map of 200,000 extents.
        let mut b = [0u8; 192];
        let mut n = 0;
        let mut put = |s: &[u8]| {
            b[n..n + s.len()].copy_from_slice(s);
            n += s.len();
        };
        let mut num = itoa::Buffer::new();
        let flag = |v: bool| if v { &b"true"[..] } else { &b"false"[..] };
        put(b"{ \"start\": ");
        put(num.format(self.start).as_bytes());
        put(b", \"length\": ");
        put(num.format(self.length).as_bytes());
        put(b", \"depth\": ");
        put(num.format(self.depth).as_bytes());
        put(b", \"present\": ");
        put(flag(self.present));
        put(b", \"zero\": ");
        put(flag(self.zero));
        put(b", \"data\": ");
        put(flag(self.data));
        put(b", \"compressed\": ");
        put(flag(self.compressed));
        if let Some(o) = self.offset {
            put(b", \"offset\": ");
            put(num.format(o).as_bytes());
        }
        put(b"}");
        w.write_all(&b[..n])
    }
}

/// Merges neighbours that are [`MapEntry::mergeable`]; passes the first
/// error through and stops, dropping the entry held back (a map that
/// failed is not printed as if whole).
#[derive(Debug)]
pub struct Merge<I> {
    inner: I,
    pending: Option<MapEntry>,
    done: bool,
}

impl<I> Merge<I> {
    /// Merges the entries of `inner`.
    pub fn new(inner: I) -> Self {
        Self {
            inner,
            pending: None,
            done: false,
        }
    }
}

impl<I, E> Iterator for Merge<I>
where
    I: Iterator<Item = Result<MapEntry, E>>,
{
    type Item = Result<MapEntry, E>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            match self.inner.next() {
                None => {
                    self.done = true;
                    break;
                }
                Some(Err(e)) => {
                    self.done = true;
                    self.pending = None;
                    return Some(Err(e));
                }
                Some(Ok(x)) => match &mut self.pending {
                    Some(p) if p.mergeable(&x) => p.length += x.length,
                    Some(p) => return Some(Ok(std::mem::replace(p, x))),
                    None => self.pending = Some(x),
                },
            }
        }
        self.pending.take().map(Ok)
    }
}

/// Merges neighbours that agree on every field: the canonical form in
/// which two maps of the same disk compare equal.
pub fn merge_entries(entries: impl IntoIterator<Item = MapEntry>) -> Vec<MapEntry> {
    Merge::new(entries.into_iter().map(Ok::<_, std::convert::Infallible>))
        .map(|r| match r {
            Ok(e) => e,
            Err(never) => match never {},
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(start: u64, length: u64, offset: Option<u64>) -> MapEntry {
        MapEntry {
            start,
            length,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset,
        }
    }

    #[test]
    fn layout_matches_qemu_img() {
        let mut out = Vec::new();
        data(20480, 12288, Some(20480))
            .write_json(&mut out)
            .unwrap();
        MapEntry::empty_at(7).write_json(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{ \"start\": 20480, \"length\": 12288, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 20480}\
             { \"start\": 7, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}"
        );
    }

    #[test]
    fn merge_requires_contiguous_host_offsets() {
        let a = data(0, 10, Some(100));
        let b = data(10, 10, Some(110));
        let c = data(20, 10, Some(500));
        let out = merge_entries([a, b, c]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].length, 20);
    }

    #[test]
    fn merge_drops_held_back_entry_on_error() {
        let v = vec![Ok(data(0, 1, Some(0))), Err("boom")];
        let out: Vec<_> = Merge::new(v.into_iter()).collect();
        assert_eq!(out, [Err("boom")]);
    }

    #[test]
    fn kinds() {
        let mut e = data(0, 1, None);
        assert_eq!(e.kind(), Kind::Data);
        e.zero = true;
        assert_eq!(e.kind(), Kind::Zero);
        e.present = false;
        e.data = false;
        assert_eq!(e.kind(), Kind::Hole);
    }
}
