//! What `nbdinfo --map=CONTEXT --json` prints, for `map --context` and
//! `map --bitmap`.

use std::io::{self, Write};
use std::ops::Range;

use sparsekit_nbd::map::{NbdinfoMapEntry, StatusExtent};

/// The status extents of a dirty bitmap over `range`: `dirty` ranges
/// (sorted, disjoint) have type 1, the bytes between them type 0, as
/// `qemu-nbd -B NAME` exports the bitmap as `qemu:dirty-bitmap:NAME`.
pub fn bitmap_extents<E>(
    dirty: impl Iterator<Item = Result<Range<u64>, E>>,
    range: Range<u64>,
) -> impl Iterator<Item = Result<StatusExtent, E>> {
    let mut pos = range.start;
    let end = range.end;
    let mut dirty = dirty.peekable();
    let mut failed = false;
    std::iter::from_fn(move || {
        while pos < end && !failed {
            match dirty.peek() {
                Some(Err(_)) => {
                    failed = true;
                    return dirty.next().map(|r| r.map(|_| unreachable!()));
                }
                Some(Ok(r)) if r.end <= pos || r.start >= r.end => {
                    dirty.next();
                }
                Some(Ok(r)) if r.start <= pos => {
                    let stop = r.end.min(end);
                    let e = StatusExtent {
                        offset: pos,
                        length: stop - pos,
                        flags: 1,
                    };
                    pos = stop;
                    return Some(Ok(e));
                }
                Some(Ok(r)) => {
                    let stop = r.start.min(end);
                    let e = StatusExtent {
                        offset: pos,
                        length: stop - pos,
                        flags: 0,
                    };
                    pos = stop;
                    return Some(Ok(e));
                }
                None => {
                    let e = StatusExtent {
                        offset: pos,
                        length: end - pos,
                        flags: 0,
                    };
                    pos = end;
                    return Some(Ok(e));
                }
            }
        }
        None
    })
}

/// Writes entries in nbdinfo's layout: `[`, one entry per line, `]`.
pub fn write_json(w: &mut impl Write, entries: &[NbdinfoMapEntry]) -> io::Result<()> {
    w.write_all(b"[\n")?;
    for (i, e) in entries.iter().enumerate() {
        write!(
            w,
            "{{ \"offset\": {}, \"length\": {}, \"type\": {}",
            e.offset, e.length, e.kind
        )?;
        if let Some(d) = &e.description {
            write!(
                w,
                ", \"description\": {}",
                serde_json::Value::from(d.as_str())
            )?;
        }
        w.write_all(if i + 1 == entries.len() {
            b"}\n"
        } else {
            b"},\n"
        })?;
    }
    w.write_all(b"]\n")
}

/// Writes entries as a table: offset, length, type, description.
pub fn write_table(w: &mut impl Write, entries: &[NbdinfoMapEntry]) -> io::Result<()> {
    writeln!(
        w,
        "{:>16}  {:>16} {:>10}  {:>4}  description",
        "offset", "length", "", "type"
    )?;
    for e in entries {
        writeln!(
            w,
            "{:>16}  {:>16} {:>10}  {:>4}  {}",
            e.offset,
            e.length,
            crate::human::format_size(e.length),
            e.kind,
            e.description.as_deref().unwrap_or("")
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(v: &[Range<u64>], range: Range<u64>) -> Vec<(u64, u64, u64)> {
        bitmap_extents(v.iter().cloned().map(Ok::<_, ()>), range)
            .map(|r| r.map(|e| (e.offset, e.length, e.flags)))
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn fills_clean_gaps_and_clips() {
        assert_eq!(ext(&[], 0..100), [(0, 100, 0)]);
        assert_eq!(
            ext(&[10..20, 20..30, 50..60], 0..100),
            [
                (0, 10, 0),
                (10, 10, 1),
                (20, 10, 1),
                (30, 20, 0),
                (50, 10, 1),
                (60, 40, 0)
            ]
        );
        assert_eq!(
            ext(&[10..20, 50..60], 15..55),
            [(15, 5, 1), (20, 30, 0), (50, 5, 1)]
        );
        assert_eq!(ext(std::slice::from_ref(&(0..100)), 0..100), [(0, 100, 1)]);
    }

    #[test]
    fn layout_matches_nbdinfo() {
        let entries = sparsekit_nbd::map::nbdinfo_map(
            "qemu:dirty-bitmap:bm0",
            [
                StatusExtent {
                    offset: 0,
                    length: 1048576,
                    flags: 0,
                },
                StatusExtent {
                    offset: 1048576,
                    length: 65536,
                    flags: 1,
                },
            ],
        );
        let mut out = Vec::new();
        write_json(&mut out, &entries).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[\n{ \"offset\": 0, \"length\": 1048576, \"type\": 0, \"description\": \"clean\"},\n\
             { \"offset\": 1048576, \"length\": 65536, \"type\": 1, \"description\": \"dirty\"}\n]\n"
        );
    }
}
