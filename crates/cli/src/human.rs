//! Sizes for people, and the `map` table. Sizes from people are
//! [`crate::size`]'s, re-exported here as [`parse_size`].

use std::io::{self, Write};

use sparsekit_copy::map::{Description, Row};
use sparsekit_copy::{CopyStats, Report};
use sparsekit_fiemap::{FileKind, Method};

use sparsekit_extent::{Extent, Kind};

/// `n` bytes in binary units with three significant digits, as qemu-img
/// prints sizes: `512 B`, `64 KiB`, `1.5 GiB`, `1 TiB`.
pub fn format_size(n: u64) -> String {
    SizeText::new(n).as_str().to_owned()
}

/// [`format_size`]'s text in a buffer of its own, for the table's rows,
/// which print hundreds of thousands of sizes without allocating.
#[derive(Clone, Copy, Debug)]
pub struct SizeText {
    buf: [u8; 16],
    len: usize,
}

impl SizeText {
    /// `n` as [`format_size`] writes it.
    pub fn new(n: u64) -> Self {
        const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let mut t = SizeText {
            buf: [0; 16],
            len: 0,
        };
        let mut num = itoa::Buffer::new();
        // In exact integers what `{:.N}` prints of the f64 `n / 1024^u`:
        // `n as f64` (which rounds above 2^53; u64::MAX becomes 2^64), a
        // power-of-two division that is exact, and decimals rounded half
        // to even, as core::fmt rounds them.
        let x = n as f64 as u128;
        // 1023.9 KiB would print as "1024 KiB": move up a unit where the
        // rounding to three digits reaches 1024 (x / 1024^u >= 1023.5).
        let mut u = 0;
        while u + 1 < UNITS.len() && 2 * x >= 2047 << (10 * u) {
            u += 1;
        }
        if u == 0 {
            t.put(num.format(n).as_bytes());
            t.put(b" B");
            return t;
        }
        let shift = 10 * u;
        let decimals = if x >= 100 << shift {
            0
        } else if x >= 10 << shift {
            1
        } else {
            2
        };
        let scaled = x * 10u128.pow(decimals);
        let (mut q, rest, half) = (
            scaled >> shift,
            scaled & ((1 << shift) - 1),
            1 << (shift - 1),
        );
        if rest > half || (rest == half && q & 1 == 1) {
            q += 1;
        }
        let p = 10u128.pow(decimals);
        t.put(num.format((q / p) as u64).as_bytes());
        let mut frac = q % p;
        let mut digits = decimals;
        while digits > 0 && frac % 10 == 0 {
            frac /= 10;
            digits -= 1;
        }
        if digits > 0 {
            t.put(b".");
            let f = num.format(frac as u64).as_bytes();
            // Leading zeros of the fraction: 1.05 is q = 105, frac 5.
            for _ in f.len()..digits as usize {
                t.put(b"0");
            }
            t.put(f);
        }
        t.put(b" ");
        t.put(UNITS[u].as_bytes());
        t
    }

    fn put(&mut self, s: &[u8]) {
        self.buf[self.len..self.len + s.len()].copy_from_slice(s);
        self.len += s.len();
    }

    /// The text, as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits, '.', ' ' and unit names were put in.
        std::str::from_utf8(&self.buf[..self.len]).expect("ASCII")
    }
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
    /// The line being assembled, kept between rows: a map of 200,000
    /// extents is printed without an allocation per row.
    line: Vec<u8>,
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
            line: Vec::with_capacity(128),
        })
    }

    /// One line: offset, length in bytes and in units, kind, and in the
    /// host column the host offset, or `compressed` for data stored
    /// compressed (which has no offset of its own), or `-`; then the
    /// backing layer the row is in, when `depth > 0`.
    pub fn row(&mut self, r: &Row) -> io::Result<()> {
        let e = &r.extent;
        self.totals.add(e);
        // By hand, not with `write!`: its formatting was where a long
        // table's time went (BENCHMARKS.md, the map section).
        let line = &mut self.line;
        line.clear();
        let mut num = itoa::Buffer::new();
        pad_left(line, num.format(e.offset).as_bytes(), 16);
        line.extend_from_slice(b"  ");
        pad_left(line, num.format(e.length).as_bytes(), 16);
        line.push(b' ');
        pad_left(line, SizeText::new(e.length).as_bytes(), 10);
        line.extend_from_slice(b"  ");
        line.extend_from_slice(e.kind.as_str().as_bytes());
        if self.host_column {
            line.extend_from_slice(b"  ");
            match r.host {
                Some(h) => {
                    let mut hex = [0u8; 18];
                    pad_left(line, hex_prefixed(h, &mut hex), 16);
                }
                // qemu-img gives a compressed cluster no host offset: say why.
                None if r.compressed => pad_left(line, b"compressed", 16),
                None => pad_left(line, b"-", 16),
            }
            if r.depth > 0 {
                line.extend_from_slice(b"  in backing file ");
                line.extend_from_slice(num.format(r.depth).as_bytes());
            }
        }
        line.push(b'\n');
        self.out.write_all(line)
    }

    /// The writer, for the summary.
    pub fn into_inner(self) -> (W, Totals) {
        (self.out, self.totals)
    }
}

/// `s` right-aligned in `width` columns, as `{:>width}` aligns it.
fn pad_left(line: &mut Vec<u8>, s: &[u8], width: usize) {
    line.resize(line.len() + width.saturating_sub(s.len()), b' ');
    line.extend_from_slice(s);
}

/// `n` as `{:#x}` writes it, into `buf`.
fn hex_prefixed(n: u64, buf: &mut [u8; 18]) -> &[u8] {
    let mut i = buf.len();
    let mut v = n;
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[(v & 0xf) as usize];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    buf[i - 2..i].copy_from_slice(b"0x");
    &buf[i - 2..]
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
            // A block device without a map is mapped as one device-long
            // extent: "whole file" would misname it.
            let (kind, how): (&str, &dyn std::fmt::Display) = match (kind, method) {
                (FileKind::Regular, _) => ("file", &method),
                (FileKind::BlockDevice, Method::WholeFile) => ("block device", &"whole device"),
                (FileKind::BlockDevice, _) => ("block device", &method),
            };
            (
                format!("{name}: raw {kind}, {}, mapped with {how}", size(n)),
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
/// Zeroing may cover more than the range (an NBD export zeroed whole
/// first), hence the saturation.
fn left_as_holes(s: &CopyStats) -> u64 {
    s.total.saturating_sub(s.data_written + s.zeroed)
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
            "{from} -> {to}: {} image: read {}, wrote {}, zeroed {}, left {} unwritten ({} found zero in data), in {secs:.2} s",
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

    /// The float formatting that [`SizeText`] does in integers, as
    /// `format_size` was written before: the oracle for every size below.
    fn float_size(n: u64) -> String {
        const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let mut v = n as f64;
        let mut u = 0;
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

    #[test]
    fn integer_sizes_print_what_float_formatting_printed() {
        let mut sizes: Vec<u64> = (0..1 << 16).collect();
        for u in 1..=6u32 {
            let unit = 1u64 << (10 * u);
            // Where the unit, the number of decimals and rounding change.
            for edge in [1023.5, 100.0, 99.995, 10.0, 9.995, 1.0, 0.9995] {
                let x = (edge * unit as f64) as u64;
                sizes.extend((0..64).map(|d| x.saturating_sub(32).saturating_add(d)));
            }
            // Exact ties at every number of decimals: (2j + 1) · 2^(10u - 1 - d)
            // times 10^d is an odd multiple of half a unit's last digit.
            for d in 0..=2 {
                let step = 1u64 << (10 * u - 1 - d);
                for j in 0..1024 {
                    let Some(x) = (2 * j + 1u64).checked_mul(step) else {
                        break;
                    };
                    sizes.extend([x - 1, x, x.saturating_add(1)]);
                }
            }
        }
        // Above 2^53, where `n as f64` rounds, and the very top.
        sizes.extend((0..64).map(|i| (1 << 53) - 32 + i));
        sizes.extend((0..64).map(|i| u64::MAX - i));
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            sizes.push(x >> (x % 64));
        }
        for n in sizes {
            assert_eq!(SizeText::new(n).as_str(), float_size(n), "{n}");
        }
    }

    /// A row as `write!` printed it, the oracle for the hand-assembled one.
    fn written_row(r: &Row, host_column: bool) -> String {
        let e = &r.extent;
        let mut s = format!(
            "{:>16}  {:>16} {:>10}  {:<4}",
            e.offset,
            e.length,
            float_size(e.length),
            e.kind
        );
        if host_column {
            match r.host {
                Some(h) => s += &format!("  {h:>#16x}"),
                None if r.compressed => s += &format!("  {:>16}", "compressed"),
                None => s += &format!("  {:>16}", "-"),
            }
            if r.depth > 0 {
                s += &format!("  in backing file {}", r.depth);
            }
        }
        s + "\n"
    }

    #[test]
    fn rows_print_as_write_printed_them() {
        let row = |offset, length, kind, host, depth| Row {
            extent: Extent::new(offset, length, kind),
            host,
            depth,
            compressed: false,
        };
        let compressed = |offset, length, depth| Row {
            compressed: true,
            ..row(offset, length, Kind::Data, None, depth)
        };
        let rows = [
            row(0, 1, Kind::Data, Some(0), 0),
            row(0, 65536, Kind::Hole, None, 0),
            row(4096, 1 << 30, Kind::Zero, Some(0x5_0000), 1),
            row(123_456_789, 10_000_007, Kind::Data, Some(0xfff), 12),
            row(1 << 50, 1023 * 1024, Kind::Data, Some(1 << 60), 0),
            // Wider than the columns: pushed right, never cut.
            row(u64::MAX - 1, 1, Kind::Data, Some(u64::MAX), u64::MAX),
            row(0, u64::MAX, Kind::Hole, Some(0x1234_5678_9abc_def0), 0),
            compressed(65536, 196608, 0),
            compressed(1 << 20, 65536, 2),
        ];
        for host_column in [false, true] {
            for r in &rows {
                // A table each: the totals of these rows would overflow.
                let mut t = Table::new(Vec::new(), host_column).unwrap();
                let head = t.out.len();
                t.row(r).unwrap();
                let out = t.into_inner().0;
                assert_eq!(
                    std::str::from_utf8(&out[head..]).unwrap(),
                    written_row(r, host_column)
                );
            }
        }
    }

    #[test]
    fn raw_sources_say_how_they_are_mapped() {
        let line = |kind, method| {
            let d = Description::Raw {
                kind,
                size: 1 << 20,
                method,
            };
            describe("x", &d).0
        };
        let (file, dev) = (FileKind::Regular, FileKind::BlockDevice);
        assert_eq!(
            line(dev, Method::WholeFile),
            "x: raw block device, 1 MiB (1048576 bytes), mapped with whole device"
        );
        assert!(
            line(file, Method::WholeFile)
                .ends_with("raw file, 1 MiB (1048576 bytes), mapped with whole file")
        );
        assert!(line(file, Method::Fiemap).ends_with("mapped with FIEMAP"));
        assert!(line(file, Method::SeekData).ends_with("mapped with SEEK_DATA"));
    }

    #[test]
    fn table_and_summary() {
        let mut t = Table::new(Vec::new(), false).unwrap();
        for (offset, length, kind) in [(0, 65536, Kind::Data), (65536, 196608, Kind::Hole)] {
            let extent = Extent::new(offset, length, kind);
            t.row(&Row {
                extent,
                host: None,
                depth: 0,
                compressed: false,
            })
            .unwrap();
        }
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
