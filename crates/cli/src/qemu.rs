//! What `qemu-img map --output=json` prints, so that scripts written for it
//! work unchanged on `map --json`.

use std::io::{self, Write};

pub use sparsekit_extent::qemu::MapEntry;

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

    fn entry(start: u64, length: u64, data: bool) -> MapEntry {
        MapEntry {
            start,
            length,
            depth: 0,
            present: true,
            zero: !data,
            data,
            compressed: false,
            offset: Some(start),
        }
    }

    fn json(v: &[MapEntry], empty_start: u64) -> String {
        let mut out = Vec::new();
        write_json_map(&mut out, v.iter().copied().map(Ok::<_, ()>), empty_start).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn layout_matches_qemu_img() {
        let v = [entry(0, 20480, false), entry(20480, 12288, true)];
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
}
