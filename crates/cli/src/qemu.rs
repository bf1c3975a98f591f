//! What `qemu-img map --output=json` prints, so that scripts written for it
//! work unchanged on `map --json`.

use std::io::{self, Write};
use std::ops::Range;

pub use sparsekit_extent::qemu::{MapEntry, Merge};
use sparsekit_extent::{Extent, Kind};

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
}
