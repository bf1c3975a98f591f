//! What `qemu-img map --output=json` prints, so that scripts written for it
//! work unchanged on `map --json`.

use std::io::{self, Write};
use std::ops::Range;

use sparsekit_extent::{Extent, Kind};

/// One entry of `qemu-img map --output=json`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer of the backing chain that answers (0: the image itself).
    pub depth: u32,
    /// Allocated in some layer of the chain.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the file of layer `depth`, where qemu-img prints one.
    pub offset: Option<u64>,
}

impl MapEntry {
    /// True when `next` continues `self` and agrees on every field, so that
    /// qemu-img would print the two as one entry.
    pub fn continues_into(&self, next: &MapEntry) -> bool {
        self.start + self.length == next.start
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

    /// The entry in qemu-img's layout:
    /// `{ "start": 0, "length": 4096, "depth": 0, "present": true, ... }`.
    pub fn write_json(&self, w: &mut impl Write) -> io::Result<()> {
        // Hand-assembled: `write!` costs a third of `map --json`'s time on a
        // file with 200,000 extents.
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
}

/// Merges neighbours that [`MapEntry::continues_into`] each other; passes
/// the first error through and stops.
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
                    // The error wins over the held-back entry: a map that
                    // failed is not printed as if whole.
                    self.done = true;
                    self.pending = None;
                    return Some(Err(e));
                }
                Some(Ok(x)) => match &mut self.pending {
                    Some(p) if p.continues_into(&x) => p.length += x.length,
                    Some(p) => return Some(Ok(std::mem::replace(p, x))),
                    None => self.pending = Some(x),
                },
            }
        }
        self.pending.take().map(Ok)
    }
}

/// qemu's raw driver sees a file as a disk of whole 512-byte sectors: the
/// virtual size is the file size rounded up to 512, and the bytes past the
/// end of the file read as zeros (`qemu-img info` and `qemu-img map` say so,
/// and `qemu-img convert -O raw` writes them).
pub fn raw_virtual_size(file_size: u64) -> u64 {
    file_size.div_ceil(512).saturating_mul(512)
}

/// The range qemu-img maps for `--start-offset start --max-length length`
/// on a disk of `virtual_size` bytes.
pub fn clamp_range(start: u64, length: Option<u64>, virtual_size: u64) -> Range<u64> {
    let end = length.map_or(virtual_size, |l| start.saturating_add(l).min(virtual_size));
    start.min(end)..end
}

/// The qemu-img map entries of a raw file, from the file's map over
/// `range ∩ [0, file_size)`: every byte is present at depth 0 with the host
/// offset equal to the guest offset; data is data, zero and hole read as
/// zeros. The part of `range` past the end of the file (up to the next
/// 512-byte boundary, see [`raw_virtual_size`]) reads as zeros.
pub fn raw_entries<E>(
    extents: impl Iterator<Item = Result<Extent, E>>,
    file_size: u64,
    range: Range<u64>,
) -> impl Iterator<Item = Result<MapEntry, E>> {
    let tail = range.start.max(file_size)..range.end.max(file_size);
    let tail =
        (!tail.is_empty()).then(|| Ok(Extent::new(tail.start, tail.end - tail.start, Kind::Zero)));
    Merge::new(extents.chain(tail).map(|r| {
        r.map(|e| MapEntry {
            start: e.offset,
            length: e.length,
            depth: 0,
            present: true,
            zero: e.kind.reads_as_zero(),
            data: e.kind == Kind::Data,
            compressed: false,
            offset: Some(e.offset),
        })
    }))
}

/// Writes entries as qemu-img does: `[` entry `,\n` entry ... `]\n`, or
/// the single empty entry at `empty_start` when there are none. On an
/// error the array is left unclosed, so that nothing reads a partial map as
/// whole, and the error is returned.
pub fn write_json_map<W: Write, E>(
    w: &mut W,
    entries: impl Iterator<Item = Result<MapEntry, E>>,
    empty_start: u64,
) -> Result<u64, JsonMapError<E>> {
    let mut n = 0u64;
    w.write_all(b"[")?;
    for e in entries {
        let e = e.map_err(JsonMapError::Source)?;
        if n > 0 {
            w.write_all(b",\n")?;
        }
        e.write_json(w)?;
        n += 1;
    }
    if n == 0 {
        MapEntry::empty_at(empty_start).write_json(w)?;
    }
    w.write_all(b"]\n")?;
    Ok(n)
}

/// Why [`write_json_map`] stopped.
#[derive(Debug)]
pub enum JsonMapError<E> {
    /// Mapping failed.
    Source(E),
    /// Writing failed.
    Io(io::Error),
}

impl<E> From<io::Error> for JsonMapError<E> {
    fn from(e: io::Error) -> Self {
        JsonMapError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(v: &[Extent], size: u64, range: Range<u64>) -> Vec<MapEntry> {
        raw_entries(v.iter().copied().map(Ok::<_, ()>), size, range)
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn json(v: &[MapEntry], empty_start: u64) -> String {
        let mut out = Vec::new();
        write_json_map(&mut out, v.iter().copied().map(Ok::<_, ()>), empty_start).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn layout_matches_qemu_img() {
        let v = entries(
            &[
                Extent::new(0, 20480, Kind::Hole),
                Extent::new(20480, 12288, Kind::Data),
            ],
            32768,
            0..32768,
        );
        assert_eq!(
            json(&v, 0),
            "[{ \"start\": 0, \"length\": 20480, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false, \"compressed\": false, \"offset\": 0},\n\
             { \"start\": 20480, \"length\": 12288, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 20480}]\n"
        );
    }

    #[test]
    fn empty_map_is_one_entry_of_length_zero() {
        assert_eq!(
            json(&[], 100),
            "[{ \"start\": 100, \"length\": 0, \"depth\": 0, \"present\": false, \"zero\": false, \"data\": false, \"compressed\": false}]\n"
        );
    }

    #[test]
    fn zero_and_hole_merge_and_unaligned_tail_reads_as_zero() {
        // A 10000007-byte file: qemu maps 10000384 bytes, the last 377 zero.
        let size = 10_000_007;
        let vsize = raw_virtual_size(size);
        assert_eq!(vsize, 10_000_384);
        let v = entries(
            &[
                Extent::new(0, 4096, Kind::Hole),
                Extent::new(4096, 4096, Kind::Zero),
                Extent::new(8192, size - 8192, Kind::Data),
            ],
            size,
            0..vsize,
        );
        assert_eq!(v.len(), 3);
        assert_eq!((v[0].start, v[0].length, v[0].zero), (0, 8192, true));
        assert_eq!(
            (v[2].start, v[2].length, v[2].zero, v[2].offset),
            (size, 377, true, Some(size))
        );
        // A tail range that lies wholly past the file.
        let t = entries(&[], size, 10_000_100..vsize);
        assert_eq!(
            t,
            [MapEntry {
                start: 10_000_100,
                length: 284,
                depth: 0,
                present: true,
                zero: true,
                data: false,
                compressed: false,
                offset: Some(10_000_100)
            }]
        );
    }

    #[test]
    fn clamp_like_start_offset_and_max_length() {
        assert_eq!(clamp_range(0, None, 1000), 0..1000);
        assert_eq!(clamp_range(100, Some(50), 1000), 100..150);
        assert_eq!(clamp_range(900, Some(500), 1000), 900..1000);
        assert_eq!(clamp_range(2000, None, 1000), 1000..1000);
        assert_eq!(clamp_range(5, Some(u64::MAX), 1000), 5..1000);
    }

    #[test]
    fn merge_drops_held_back_entry_on_error() {
        let e = MapEntry {
            start: 0,
            length: 1,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: Some(0),
        };
        let v = vec![Ok(e), Err("boom")];
        let out: Vec<_> = Merge::new(v.into_iter()).collect();
        assert_eq!(out, [Err("boom")]);
    }

    #[test]
    fn merge_requires_contiguous_host_offsets() {
        let a = MapEntry {
            start: 0,
            length: 10,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: Some(100),
        };
        let b = MapEntry {
            start: 10,
            offset: Some(110),
            ..a
        };
        let c = MapEntry {
            start: 20,
            offset: Some(500),
            ..a
        };
        let out: Vec<_> = Merge::new([a, b, c].into_iter().map(Ok::<_, ()>))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].length, 20);
    }
}
