//! [`Bmap::to_xml`]: format 2.0 as `bmaptool create` 3.6 writes it.
//!
//! BmapCreate.py writes the file in one pass, leaving blanks for what it
//! learns at the end (the mapped size in a comment, `<MappedBlocksCount>`,
//! the file checksum) and overwriting them in place. A shorter value
//! leaves some of the blanks behind (`<MappedBlocksCount> 2   <`), and a
//! longer one runs over what follows; the same is done here, on the same
//! template, so that the bytes are the same.

use std::io::{self, Write};

use crate::checksum::{ChecksumType, Hasher};
use crate::{Bmap, Version};

/// BmapCreate.py's `_BMAP_START_TEMPLATE`, up to `<BlocksCount>`; `{}`
/// are the version, the image size for humans, the image size, the block
/// size and the block count.
const START: [&str; 6] = [
    r#"<?xml version="1.0" ?>
<!-- This file contains the block map for an image file, which is basically
     a list of useful (mapped) block numbers in the image file. In other words,
     it lists only those blocks which contain data (boot sector, partition
     table, file-system metadata, files, directories, extents, etc). These
     blocks have to be copied to the target device. The other blocks do not
     contain any useful data and do not have to be copied to the target
     device.

     The block map an optimization which allows to copy or flash the image to
     the image quicker than copying of flashing the entire image. This is
     because with bmap less data is copied: <MappedBlocksCount> blocks instead
     of <BlocksCount> blocks.

     Besides the machine-readable data, this file contains useful commentaries
     which contain human-readable information like image size, percentage of
     mapped data, etc.

     The 'version' attribute is the block map file format version in the
     'major.minor' format. The version major number is increased whenever an
     incompatible block map format change is made. The minor number changes
     in case of minor backward-compatible changes. -->

<bmap version=""#,
    r#"">
    <!-- Image size in bytes: "#,
    r#" -->
    <ImageSize> "#,
    r#" </ImageSize>

    <!-- Size of a block in bytes -->
    <BlockSize> "#,
    r#" </BlockSize>

    <!-- Count of blocks in the image file -->
    <BlocksCount> "#,
    r#" </BlocksCount>

"#,
];

impl Bmap {
    /// The bmap as format 2.0, byte for byte what `bmaptool create` 3.6
    /// writes for the same image: its comments (which hold nothing
    /// variable but sizes), its alignment blanks, `<BmapFileChecksum>`
    /// computed over the text with its own value as zeros.
    ///
    /// Always 2.0, whatever the version parsed: that is the format
    /// bmaptool creates, and it can hold every bmap. The checksum type is
    /// the bmap's (a 1.3 file's SHA-1 becomes `<ChecksumType> sha1`, which
    /// is what `BmapCreate(image, bmap, "sha1")` writes); a bmap without
    /// checksums (1.0 to 1.2) is written as `bmaptool create
    /// --no-checksum` writes one: `sha256` for the file and no `chksum`
    /// attributes.
    pub fn to_xml(&self) -> String {
        let kind = self.checksum_type.unwrap_or(ChecksumType::Sha256);
        let image_human = human_size(u128::from(self.image_size));
        let blocks = self.blocks_count.to_string();
        let mut x = String::new();
        let fields = [
            Version::CREATED.to_string(),
            image_human.clone(),
            self.image_size.to_string(),
            self.block_size.to_string(),
            blocks.clone(),
        ];
        for (text, value) in START.iter().zip(fields.iter()) {
            x.push_str(text);
            x.push_str(value);
        }
        x.push_str(START[5]);

        x.push_str("    <!-- Count of mapped blocks: ");
        let mapped_comment_at = x.len();
        // Blanks as long as the image size and "100.0%", filled in below.
        x.push_str(&format!(
            "{} or {}   -->\n",
            " ".repeat(image_human.len()),
            " ".repeat("100.0%".len())
        ));
        x.push_str("    <MappedBlocksCount> ");
        let mapped_count_at = x.len();
        x.push_str(&format!(
            "{} </MappedBlocksCount>\n\n",
            " ".repeat(blocks.len())
        ));
        x.push_str("    <!-- Type of checksum used in this file -->\n");
        x.push_str(&format!("    <ChecksumType> {kind} </ChecksumType>\n\n"));
        x.push_str(
            "    <!-- The checksum of this bmap file. When it is calculated, the value of\n",
        );
        x.push_str("         the checksum has be zero (all ASCII \"0\" symbols).  -->\n");
        x.push_str("    <BmapFileChecksum> ");
        let checksum_at = x.len();
        x.push_str(&"0".repeat(kind.hex_len()));
        x.push_str(" </BmapFileChecksum>\n\n");
        x.push_str("    <!-- The block map which consists of elements which may either be a\n");
        x.push_str("         range of blocks or a single block. The 'chksum' attribute\n");
        x.push_str("         (if present) is the checksum of this blocks range. -->\n");
        x.push_str("    <BlockMap>\n");
        for r in &self.ranges {
            x.push_str("        <Range");
            if let Some(d) = r.checksum {
                x.push_str(&format!(" chksum=\"{d}\""));
            }
            if r.first == r.last {
                x.push_str(&format!("> {} </Range>\n", r.first));
            } else {
                x.push_str(&format!("> {}-{} </Range>\n", r.first, r.last));
            }
        }
        x.push_str("    </BlockMap>\n");
        x.push_str("</bmap>\n");

        // bmaptool's mapped size counts the last block whole, and may pass
        // 2^64 bytes with it.
        let mapped_size = u128::from(self.mapped_blocks_count) * u128::from(self.block_size);
        // Python: (mapped_cnt * 100.0) / blocks_cnt, in doubles.
        let percent = (self.mapped_blocks_count as f64 * 100.0) / self.blocks_count as f64;
        let mut bytes = x.into_bytes();
        overwrite(
            &mut bytes,
            mapped_comment_at,
            format!("{} or {percent:.1}%", human_size(mapped_size)).as_bytes(),
        );
        overwrite(
            &mut bytes,
            mapped_count_at,
            self.mapped_blocks_count.to_string().as_bytes(),
        );
        let digest = Hasher::digest(kind, &bytes);
        overwrite(&mut bytes, checksum_at, digest.to_hex().as_bytes());
        String::from_utf8(bytes).expect("the text is ASCII")
    }

    /// Writes [`Bmap::to_xml`] to `w`.
    pub fn write_xml(&self, mut w: impl Write) -> io::Result<()> {
        w.write_all(self.to_xml().as_bytes())
    }
}

/// Writes `value` over `buf` from `at`, as a write after a seek overwrites
/// a file, growing it if it runs past the end.
fn overwrite(buf: &mut Vec<u8>, at: usize, value: &[u8]) {
    let end = at + value.len();
    if end > buf.len() {
        buf.resize(end, 0);
    }
    buf[at..end].copy_from_slice(value);
}

/// BmapHelpers.py's `human_size`: "1 byte", "N bytes" below 512, then one
/// decimal in KiB, MiB, GiB or TiB, and, past 1024 TiB, the number of TiB
/// labelled "EiB" (bmaptool skips PiB; kept, for the same bytes).
fn human_size(size: u128) -> String {
    if size == 1 {
        return "1 byte".to_owned();
    }
    if size < 512 {
        return format!("{size} bytes");
    }
    // Python divides an int by a float: the int rounds to the nearest
    // double first, as `as f64` does. Rust's {:.1} rounds the exact binary
    // value half to even, like Python's %.1f.
    let mut size = size as f64;
    for unit in ["KiB", "MiB", "GiB", "TiB"] {
        size /= 1024.0;
        if size < 1024.0 {
            return format!("{size:.1} {unit}");
        }
    }
    format!("{size:.1} EiB")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::Digest;
    use crate::{BlockRange, Bmap};

    #[test]
    fn human_size_like_bmaptool() {
        // Values from /usr/bin/python3 -c 'from bmaptools.BmapHelpers import human_size; ...'
        let cases: &[(u128, &str)] = &[
            (0, "0 bytes"),
            (1, "1 byte"),
            (2, "2 bytes"),
            (511, "511 bytes"),
            (512, "0.5 KiB"),
            (1000, "1.0 KiB"),
            (1_000_000, "976.6 KiB"),
            (1_048_524, "1023.9 KiB"),
            (1_048_575, "1024.0 KiB"),
            (1_048_576, "1.0 MiB"),
            (8 << 30, "8.0 GiB"),
            (3 << 40, "3.0 TiB"),
            (1 << 50, "1024.0 EiB"),
            (1 << 60, "1048576.0 EiB"),
            (u128::from(u64::MAX), "16777216.0 EiB"),
        ];
        for (size, want) in cases {
            assert_eq!(human_size(*size), *want, "{size}");
        }
    }

    #[test]
    fn overwrite_runs_over_and_grows() {
        let mut b = b"abc   -->".to_vec();
        overwrite(&mut b, 3, b"1234");
        assert_eq!(b, b"abc1234->");
        overwrite(&mut b, 8, b"xyz");
        assert_eq!(b, b"abc1234-xyz");
    }

    fn bmap(image_size: u64, ranges: &[(u64, u64)], kind: Option<ChecksumType>) -> Bmap {
        let ranges: Vec<BlockRange> = ranges
            .iter()
            .map(|&(first, last)| BlockRange {
                first,
                last,
                checksum: kind.map(|k| Hasher::digest(k, &first.to_le_bytes())),
            })
            .collect();
        Bmap {
            version: Version::CREATED,
            image_size,
            block_size: 4096,
            blocks_count: image_size.div_ceil(4096),
            mapped_blocks_count: ranges.iter().map(BlockRange::blocks).sum(),
            checksum_type: kind,
            ranges,
        }
    }

    #[test]
    fn the_layout_of_bmaptool_create() {
        let b = bmap(1_000_000, &[(2, 2), (100, 244)], Some(ChecksumType::Sha256));
        let x = b.to_xml();
        let lines: Vec<&str> = x.lines().collect();
        // The lines bmaptool writes after its long opening comment (line 24
        // is <bmap ...>).
        assert_eq!(lines[23], "<bmap version=\"2.0\">");
        assert_eq!(lines[24], "    <!-- Image size in bytes: 976.6 KiB -->");
        assert_eq!(lines[25], "    <ImageSize> 1000000 </ImageSize>");
        assert_eq!(lines[31], "    <BlocksCount> 245 </BlocksCount>");
        // "584.0 KiB or 59.6%" is one shorter than the blanks for "976.6
        // KiB or 100.0%": one blank is left before bmaptool's three.
        assert_eq!(
            lines[33],
            "    <!-- Count of mapped blocks: 584.0 KiB or 59.6%    -->"
        );
        assert_eq!(
            lines[34],
            "    <MappedBlocksCount> 146 </MappedBlocksCount>"
        );
        assert_eq!(lines[37], "    <ChecksumType> sha256 </ChecksumType>");
        let d2 = Hasher::digest(ChecksumType::Sha256, &2u64.to_le_bytes());
        assert!(lines.contains(&format!("        <Range chksum=\"{d2}\"> 2 </Range>").as_str()));
        assert!(lines.iter().any(|l| l.ends_with("> 100-244 </Range>")));
        assert_eq!(lines[lines.len() - 2], "    </BlockMap>");
        assert_eq!(lines[lines.len() - 1], "</bmap>");
        assert!(x.ends_with("</bmap>\n"));
    }

    #[test]
    fn short_values_leave_blanks_and_long_ones_run_over() {
        // One mapped block of 245: the count leaves two blanks.
        let x = bmap(1_000_000, &[(3, 3)], Some(ChecksumType::Sha256)).to_xml();
        assert!(x.contains("    <MappedBlocksCount> 1   </MappedBlocksCount>\n"));
        assert!(x.contains("    <!-- Count of mapped blocks: 4.0 KiB or 0.4%       -->\n"));
        // A 1-byte image: "4.0 KiB" is one longer than "1 byte" and eats
        // one of the three blanks before "-->".
        let x = bmap(1, &[(0, 0)], Some(ChecksumType::Sha256)).to_xml();
        assert!(x.contains("    <!-- Image size in bytes: 1 byte -->\n"));
        assert!(
            x.contains("    <!-- Count of mapped blocks: 4.0 KiB or 100.0%  -->\n"),
            "{x}"
        );
        // Nothing mapped.
        let x = bmap(1, &[], Some(ChecksumType::Sha256)).to_xml();
        assert!(
            x.contains("    <!-- Count of mapped blocks: 0 bytes or 0.0%    -->\n"),
            "{x}"
        );
        assert!(x.contains("    <BlockMap>\n    </BlockMap>\n"));
    }

    #[test]
    fn the_file_checksum_is_over_the_text_with_zeros() {
        for kind in [None, Some(ChecksumType::Sha1), Some(ChecksumType::Sha256)] {
            let b = bmap(1_000_000, &[(2, 2), (100, 244)], kind);
            let x = b.to_xml();
            let t = kind.unwrap_or(ChecksumType::Sha256);
            let open = "<BmapFileChecksum> ";
            let at = x.find(open).unwrap() + open.len();
            let stored = Digest::from_hex(t, &x[at..at + t.hex_len()]).unwrap();
            let zeroed = format!(
                "{}{}{}",
                &x[..at],
                "0".repeat(t.hex_len()),
                &x[at + t.hex_len()..]
            );
            assert_eq!(Hasher::digest(t, zeroed.as_bytes()), stored);
            assert!(x.contains(&format!("<ChecksumType> {t} </ChecksumType>")));
            assert_eq!(x.contains("chksum="), kind.is_some());
            // And it parses back to the same bmap.
            let back = Bmap::parse(x.as_bytes(), "x").unwrap();
            assert_eq!(back.ranges(), b.ranges());
            let mut w = Vec::new();
            b.write_xml(&mut w).unwrap();
            assert_eq!(w, x.as_bytes());
        }
    }

    #[test]
    fn a_1_x_bmap_is_written_as_2_0() {
        let mut b = bmap(8192, &[(1, 1)], Some(ChecksumType::Sha1));
        b.version = Version { major: 1, minor: 3 };
        let back = Bmap::parse(b.to_xml().as_bytes(), "x").unwrap();
        assert_eq!(back.version(), Version::CREATED);
        assert_eq!(back.checksum_type(), Some(ChecksumType::Sha1));
        assert_eq!(back.ranges(), b.ranges());
    }
}
