//! What `nbdinfo --map=CONTEXT --json` prints, for `map --context` and
//! `map --bitmap`.

use std::io::{self, Write};

use sparsekit_nbd::map::NbdinfoMapEntry;

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
    use sparsekit_nbd::map::StatusExtent;

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
