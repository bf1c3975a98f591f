//! Sizes for people, and the `map` table. Sizes from people are
//! [`crate::size`]'s, re-exported here as [`parse_size`].

use std::io::{self, Write};

use sparsekit_copy::map::Description;
use sparsekit_copy::{CopyStats, Report};
use sparsekit_fiemap::FileKind;

use sparsekit_extent::{Extent, Kind};

/// `n` bytes in binary units with three significant digits, as qemu-img
/// prints sizes: `512 B`, `64 KiB`, `1.5 GiB`, `1 TiB`.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    // 1023.9 KiB would print as "1024 KiB": move up a unit where the
    // rounding to three digits reaches 1024.
    while v >= 1023.5 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        return format!("{n} B");
    }
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    format!("{s} {}", UNITS[u])
}

/// Sizes from people, as qemu-img reads them (kept here for the
/// binaries' `value_parser`s).
pub use crate::size::parse_size;

/// Writes the `map` table: a header, one line per extent, nothing else.
/// Totals are gathered in [`Totals`] and summarised by [`Totals::summary`].
#[derive(Debug)]
pub struct Table<W: Write> {
    out: W,
    /// Totals of what has been written.
    pub totals: Totals,
    host_column: bool,
}

/// Counts of a map, for the summary line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Number of extents.
    pub extents: u64,
    /// Bytes of data.
    pub data: u64,
    /// Bytes that read as zeros but may be allocated.
    pub zero: u64,
    /// Bytes unallocated.
    pub hole: u64,
}

impl<W: Write> Table<W> {
    /// A table writing to `out`; `host_column` adds the host offset column
    /// (qcow2).
    pub fn new(mut out: W, host_column: bool) -> io::Result<Self> {
        write!(
            out,
            "{:>16}  {:>16} {:>10}  {:<4}",
            "offset", "length", "", "kind"
        )?;
        if host_column {
            write!(out, "  {:>16}", "host offset")?;
        }
        writeln!(out)?;
        Ok(Self {
            out,
            totals: Totals::default(),
            host_column,
        })
    }

    /// One line: offset, length in bytes and in units, kind, and the host
    /// offset where there is one (with the backing layer it is in, when
    /// `depth > 0`).
    pub fn row(&mut self, e: &Extent, host: Option<u64>, depth: u64) -> io::Result<()> {
        self.totals.add(e);
        write!(
            self.out,
            "{:>16}  {:>16} {:>10}  {:<4}",
            e.offset,
            e.length,
            format_size(e.length),
            e.kind
        )?;
        if self.host_column {
            match host {
                Some(h) => write!(self.out, "  {h:>#16x}")?,
                None => write!(self.out, "  {:>16}", "-")?,
            }
            if depth > 0 {
                write!(self.out, "  in backing file {depth}")?;
            }
        }
        writeln!(self.out)
    }

    /// The writer, for the summary.
    pub fn into_inner(self) -> (W, Totals) {
        (self.out, self.totals)
    }
}

impl Totals {
    /// Counts one extent.
    pub fn add(&mut self, e: &Extent) {
        self.extents += 1;
        match e.kind {
            Kind::Data => self.data += e.length,
            Kind::Zero => self.zero += e.length,
            Kind::Hole => self.hole += e.length,
        }
    }

    /// `N extents: data X (P% of SIZE), zero Y, hole Z`.
    pub fn summary(&self) -> String {
        let total = self.data + self.zero + self.hole;
        let pct = if total == 0 {
            0.0
        } else {
            self.data as f64 * 100.0 / total as f64
        };
        format!(
            "{} extent{}: data {} ({} bytes, {:.1}% of {}), zero {}, hole {}",
            self.extents,
            if self.extents == 1 { "" } else { "s" },
            format_size(self.data),
            self.data,
            pct,
            format_size(total),
            format_size(self.zero),
            format_size(self.hole),
        )
    }
}

/// The line above a map: what the source is; and whether its table has a
/// host offset column (qcow2).
pub fn describe(name: &str, d: &Description) -> (String, bool) {
    let size = |n: u64| format!("{} ({n} bytes)", format_size(n));
    match *d {
        Description::Raw {
            kind,
            size: n,
            method,
        } => {
            let kind = match kind {
                FileKind::Regular => "file",
                FileKind::BlockDevice => "block device",
            };
            (
                format!("{name}: raw {kind}, {}, mapped with {method}", size(n)),
                false,
            )
        }
        Description::Qcow2 {
            version,
            size: n,
            cluster_size,
            backing_depth,
        } => {
            let chain = match backing_depth {
                0 => "no backing file".to_string(),
                n => format!("backing chain of {n}"),
            };
            let cs = format_size(cluster_size);
            let line = format!(
                "{name}: qcow2 v{version}, {}, cluster size {cs}, {chain}",
                size(n)
            );
            (line, true)
        }
        Description::Nbd { size: n } => (format!("{name}: NBD export, {}", size(n)), false),
        Description::Stream { size: n } => (format!("{name}: qcow2 stream, {}", size(n)), false),
        Description::RawStream { compression } => {
            let how = compression.map_or("raw stream".to_string(), |c| {
                format!("{c}-compressed raw image")
            });
            (format!("{name}: {how}"), false)
        }
    }
}

/// Bytes of the copied range neither written nor zeroed: holes in a new
/// file, or blocks left as they were (a bmap's free blocks on a device).
fn left_as_holes(s: &CopyStats) -> u64 {
    (s.zero_detected + s.unallocated).saturating_sub(s.zeroed)
}

/// What a copy did, in one line: every figure in binary units (`--json`
/// has the exact bytes).
pub fn copy_summary(from: &str, to: &str, report: &Report) -> String {
    let (s, secs) = (report.stats, report.elapsed.as_secs_f64());
    match report.export {
        Some(e) => format!(
            "{from} -> {to}: qcow2 stream of {} ({} data clusters) for a {} image, in {secs:.2} s",
            format_size(e.stream_bytes),
            e.data_clusters,
            format_size(s.total),
        ),
        None => format!(
            "{from} -> {to}: {} image: read {}, wrote {}, zeroed {}, left {} as holes ({} found zero in data), in {secs:.2} s",
            format_size(s.total),
            format_size(s.data_read),
            format_size(s.data_written),
            format_size(s.zeroed),
            format_size(left_as_holes(&s)),
            format_size(s.zero_detected),
        ),
    }
}

/// What a copy did, as one JSON object for programs (`copy --json`):
/// bytes handled, read, written, zeroed and left as holes, seconds, the
/// two ends, and for a qcow2 stream its size and data clusters.
pub fn copy_json(from: &str, to: &str, report: &Report) -> serde_json::Value {
    let s = report.stats;
    let mut v = serde_json::json!({
        "source": from,
        "destination": to,
        "bytes_total": s.total,
        "bytes_read": s.data_read,
        "bytes_written": s.data_written,
        "bytes_zeroed": s.zeroed,
        "bytes_holes": left_as_holes(&s),
        "bytes_zero_detected": s.zero_detected,
        "bytes_unallocated": s.unallocated,
        "seconds": report.elapsed.as_secs_f64(),
        "verified": report.verified,
    });
    if let (Some(e), Some(m)) = (report.export, v.as_object_mut()) {
        m.insert("qcow2_stream_bytes".into(), e.stream_bytes.into());
        m.insert("qcow2_data_clusters".into(), e.data_clusters.into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_people() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(65536), "64 KiB");
        assert_eq!(format_size(10_000_007), "9.54 MiB");
        assert_eq!(format_size(1 << 40), "1 TiB");
        assert_eq!(format_size((1 << 40) - 1_118_208), "1 TiB");
        assert_eq!(format_size(1023 * 1024), "1023 KiB");
        assert_eq!(format_size(u64::MAX), "16 EiB");
    }

    #[test]
    fn table_and_summary() {
        let mut t = Table::new(Vec::new(), false).unwrap();
        t.row(&Extent::new(0, 65536, Kind::Data), None, 0).unwrap();
        t.row(&Extent::new(65536, 196608, Kind::Hole), None, 0)
            .unwrap();
        let (out, totals) = t.into_inner();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[1].ends_with("65536     64 KiB  data"),
            "{:?}",
            lines[1]
        );
        assert_eq!(
            totals.summary(),
            "2 extents: data 64 KiB (65536 bytes, 25.0% of 256 KiB), zero 0 B, hole 192 KiB"
        );
    }
}
