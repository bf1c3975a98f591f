//! `qcow2-info`'s human output, in the style of `qemu-img info` and
//! `qemu-img check`.

use std::fs::File;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, bail};
use flate2::Compression;
use flate2::write::ZlibEncoder;

use serde_json::Value;
use sparsekit_qcow2::{CheckResult, Qcow2};

use crate::human::format_size;

/// Writes a JSON value the way qemu-img prints its "Format specific
/// information": `key: value` lines with dashes in keys turned to spaces,
/// objects and arrays nested four spaces deeper, array items as `[i]:`.
pub fn write_tree(w: &mut impl Write, v: &Value, indent: usize) -> io::Result<()> {
    let pad = " ".repeat(indent);
    let item = |w: &mut dyn Write, label: &str, v: &Value| -> io::Result<()> {
        match v {
            Value::Object(_) | Value::Array(_) => {
                writeln!(w, "{pad}{label}:")?;
                let mut buf = Vec::new();
                write_tree(&mut buf, v, indent + 4)?;
                w.write_all(&buf)
            }
            Value::String(s) => writeln!(w, "{pad}{label}: {s}"),
            other => writeln!(w, "{pad}{label}: {other}"),
        }
    };
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                item(w, &k.replace('-', " "), v)?;
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                item(w, &format!("[{i}]"), v)?;
            }
        }
        other => writeln!(w, "{pad}{other}")?,
    }
    Ok(())
}

/// The allocation object `qcow2-info --json` adds to qemu-img's fields.
pub fn allocation(clusters: u64, allocated: u64, cluster_size: u64) -> Value {
    serde_json::json!({
        "clusters": clusters,
        "allocated-clusters": allocated,
        "allocated-bytes": allocated * cluster_size,
    })
}

/// What `qemu-img check` prints for a result (human output).
pub fn write_check(w: &mut impl Write, r: &CheckResult) -> io::Result<()> {
    for m in &r.messages {
        writeln!(w, "{m}")?;
    }
    if r.corruptions > 0 {
        writeln!(
            w,
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
            r.corruptions
        )?;
    }
    if r.leaks > 0 {
        writeln!(
            w,
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
            r.leaks
        )?;
    }
    if r.check_errors > 0 {
        writeln!(
            w,
            "\n{} internal errors have occurred during the check.",
            r.check_errors
        )?;
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        writeln!(w, "No errors were found on the image.")?;
    }
    if r.total_clusters > 0 {
        let pct = |n: u64| n as f64 * 100.0 / r.total_clusters as f64;
        let of_alloc = |n: u64| {
            if r.allocated_clusters == 0 {
                0.0
            } else {
                n as f64 * 100.0 / r.allocated_clusters as f64
            }
        };
        writeln!(
            w,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters),
            of_alloc(r.fragmented_clusters),
            of_alloc(r.compressed_clusters)
        )?;
    }
    if r.image_end_offset > 0 {
        writeln!(w, "Image end offset: {}", r.image_end_offset)?;
    }
    Ok(())
}

/// `virtual size: 4 MiB (4194304 bytes)`.
pub fn size_line(label: &str, n: u64) -> String {
    format!("{label}: {} ({n} bytes)", format_size(n))
}

/// One line of `qemu-img info`'s snapshot list from the JSON of one
/// snapshot, or the list's header for `None`: qemu's `bdrv_snapshot_dump`
/// (block/qapi.c, columns as of qemu 9.1). The date is local time, as
/// qemu-img prints it (GLib's `g_date_time_new_from_unix_local`: `TZ`,
/// else /etc/localtime).
pub fn snapshot_row(sn: Option<&Value>) -> String {
    let (id, name, size, date, clock, icount) = match sn {
        None => (
            "ID".into(),
            "TAG".into(),
            "VM_SIZE".into(),
            "DATE".into(),
            "VM_CLOCK".into(),
            "ICOUNT".into(),
        ),
        Some(sn) => {
            let s = |k: &str| sn[k].as_str().unwrap_or("").to_owned();
            let n = |k: &str| sn[k].as_u64().unwrap_or(0);
            (
                s("id"),
                s("name"),
                format_size(n("vm-state-size")),
                snapshot_date(n("date-sec")),
                vm_clock(n("vm-clock-sec"), n("vm-clock-nsec")),
                // qemu's -1, "none recorded", is absent from the JSON.
                sn["icount"].as_u64().map_or("--".into(), |i| i.to_string()),
            )
        }
    };
    // printf's "%-7s %-16s %8s %19s %15s %10s": widths in bytes.
    let pad = |s: &str, width: usize| " ".repeat(width.saturating_sub(s.len()));
    format!(
        "{id}{} {name}{} {}{size} {}{date} {}{clock} {}{icount}",
        pad(&id, 7),
        pad(&name, 16),
        pad(&size, 8),
        pad(&date, 19),
        pad(&clock, 15),
        pad(&icount, 10),
    )
}

/// `2026-12-02 04:25:56`: seconds since the Epoch in local time; the bare
/// number where the C library cannot convert it.
pub fn snapshot_date(secs: u64) -> String {
    match crate::sys::local_time(secs) {
        Some(t) => format!(
            "{}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year, t.month, t.day, t.hour, t.minute, t.second
        ),
        None => secs.to_string(),
    }
}

/// The guest's run time as qemu prints it, `HHHH:MM:SS.mmm` (hours at
/// least four digits, milliseconds truncated), from the JSON's split of
/// `vm_clock_nsec` into seconds and nanoseconds.
pub fn vm_clock(secs: u64, nsec: u64) -> String {
    format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        nsec / 1_000_000
    )
}

/// A `qemu-img info`-like summary from the JSON of one layer.
pub fn write_human(w: &mut impl Write, v: &Value, alloc: Option<&Value>) -> io::Result<()> {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    writeln!(w, "image: {}", s("filename"))?;
    writeln!(w, "file format: {}", s("format"))?;
    writeln!(w, "{}", size_line("virtual size", n("virtual-size")))?;
    writeln!(w, "disk size: {}", format_size(n("actual-size")))?;
    if v.get("cluster-size").is_some() {
        writeln!(w, "cluster_size: {}", n("cluster-size"))?;
    }
    if let Some(b) = v["backing-filename"].as_str() {
        writeln!(
            w,
            "backing file: {b} (actual path: {})",
            s("full-backing-filename")
        )?;
    }
    if let Some(f) = v["backing-filename-format"].as_str() {
        writeln!(w, "backing file format: {f}")?;
    }
    if let Some(snaps) = v["snapshots"].as_array() {
        writeln!(w, "Snapshot list:")?;
        writeln!(w, "{}", snapshot_row(None))?;
        for sn in snaps {
            writeln!(w, "{}", snapshot_row(Some(sn)))?;
        }
    }
    if let Some(fs) = v.get("format-specific") {
        writeln!(w, "Format specific information:")?;
        write_tree(w, &fs["data"], 4)?;
    }
    if let Some(a) = alloc {
        let clusters = a["clusters"].as_u64().unwrap_or(0);
        let allocated = a["allocated-clusters"].as_u64().unwrap_or(0);
        let pct = if clusters == 0 {
            0.0
        } else {
            allocated as f64 * 100.0 / clusters as f64
        };
        writeln!(w, "Allocation:")?;
        writeln!(
            w,
            "    allocated clusters: {allocated} of {clusters} ({}, {pct:.2}%)",
            format_size(a["allocated-bytes"].as_u64().unwrap_or(0))
        )?;
    }
    Ok(())
}

/// Writes the allocation bitmap of `q` (zlib-compressed with `zlib`) to
/// `output`, or to `stdout` unless that is a terminal.
pub fn write_bitmap(
    q: &Qcow2,
    zlib: bool,
    output: Option<&Path>,
    stdout: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut file;
    let sink: &mut dyn Write = match output {
        Some(p) => {
            let f = File::create(p).with_context(|| format!("{}: creating", p.display()))?;
            file = BufWriter::new(f);
            &mut file
        }
        None if io::stdout().is_terminal() => {
            bail!("the allocation bitmap is binary: redirect standard output or use --output FILE")
        }
        None => stdout,
    };
    if zlib {
        let mut z = ZlibEncoder::new(sink, Compression::default());
        q.write_allocation_bitmap(&mut z)?;
        z.finish()
            .context("writing the compressed bitmap")?
            .flush()?;
    } else {
        q.write_allocation_bitmap(sink)?;
        sink.flush().context("writing the bitmap")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_clock_like_qemu() {
        assert_eq!(vm_clock(0, 0), "0000:00:00.000");
        assert_eq!(vm_clock(3723, 456_789_012), "0001:02:03.456");
        assert_eq!(vm_clock(59, 999_999_999), "0000:00:59.999");
        // More than 9999 hours: the field grows, as printf's does.
        assert_eq!(vm_clock(45_000_000, 0), "12500:00:00.000");
    }

    #[test]
    fn snapshot_rows_keep_qemus_columns() {
        assert_eq!(
            snapshot_row(None),
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
        );
        let sn = serde_json::json!({
            "id": "1", "name": "snap1", "vm-state-size": 0, "date-sec": 0,
            "date-nsec": 0, "vm-clock-sec": 3723, "vm-clock-nsec": 456_000_000,
        });
        let row = snapshot_row(Some(&sn));
        // The date is local: check everything around it.
        let date = snapshot_date(0);
        assert_eq!(
            row,
            format!("1       snap1                 0 B {date:>19}  0001:02:03.456         --")
        );
        // A long name pushes the rest right, as printf does; widths count
        // bytes (é is two).
        let sn = serde_json::json!({"id": "2", "name": "é".repeat(10), "icount": 7});
        let row = snapshot_row(Some(&sn));
        assert!(
            row.starts_with(&format!("2       {}      0 B ", "é".repeat(10))),
            "{row:?}"
        );
        assert!(row.ends_with("  0000:00:00.000          7"), "{row:?}");
    }

    #[test]
    fn tree_like_qemu_img() {
        let v = serde_json::json!({
            "compat": "1.1",
            "lazy-refcounts": false,
            "bitmaps": [{"flags": ["auto"], "name": "bm0", "granularity": 65536}],
            "refcount-bits": 16,
        });
        let mut out = Vec::new();
        write_tree(&mut out, &v, 4).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "    compat: 1.1\n    lazy refcounts: false\n    bitmaps:\n        [0]:\n            flags:\n                [0]: auto\n            name: bm0\n            granularity: 65536\n    refcount bits: 16\n"
        );
    }
}
