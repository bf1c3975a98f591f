//! [`Bmap::parse`]: a bmap file's text to a checked [`Bmap`].
//!
//! What bmaptool 3.6 reads (BmapCopy.py, `_parse_bmap` and
//! `_get_block_ranges`) is read the same way: the fields are the direct
//! children of the root with that name, their text stripped of whitespace,
//! `<Range>` is `N` or `A-B`, the checksum scheme follows the version, the
//! file's own checksum is verified with its value replaced by zeros.
//! Where bmaptool checks less, this parser refuses more, always before a
//! byte is copied: bmaptool takes the first of duplicated fields, copies
//! ranges in any order, and finds a wrong `<MappedBlocksCount>` or a range
//! past the image only after the copy (or crashes on a missing field).

use roxmltree::{Document, Node};

use crate::checksum::{ChecksumType, Digest, Hasher};
use crate::error::{BmapError, BmapErrorKind as K};
use crate::{BlockRange, Bmap, Scheme, Version, blocks_for};

/// The fields that may appear once under `<bmap>`. Other elements are
/// ignored, as bmaptool ignores them, so a later minor version may add
/// some.
const FIELDS: [&str; 8] = [
    "ImageSize",
    "BlockSize",
    "BlocksCount",
    "MappedBlocksCount",
    "ChecksumType",
    "BmapFileChecksum",
    "BmapFileSHA1",
    "BlockMap",
];

/// Index of a field in [`FIELDS`].
#[derive(Clone, Copy)]
enum Field {
    ImageSize = 0,
    BlockSize,
    BlocksCount,
    MappedBlocksCount,
    ChecksumType,
    BlockMap = 7,
}

impl Bmap {
    /// Parses and checks a bmap file of format 1.0 to 2.x; `name` names
    /// the file in errors.
    ///
    /// Refuses, naming the element or range and its line: XML that is not
    /// well-formed, a missing or unsupported version (above 2.x, or 0.x),
    /// a missing, duplicated or non-numeric field, an empty image, a block
    /// size of 0, a `<BlocksCount>` other than `<ImageSize>` /
    /// `<BlockSize>` rounded up, a range that is not `N` or `A-B`, is
    /// reversed, ends past `<BlocksCount>`, overlaps or precedes the one
    /// before it, a `<MappedBlocksCount>` other than the sum of the ranges,
    /// a `<ChecksumType>` other than SHA-1 or SHA-256, a checksum that is
    /// not lowercase hex of its type's length, and a file checksum that
    /// does not match. The file checksum is checked first: when it fails,
    /// the other errors would only be symptoms of a damaged file.
    ///
    /// Ranges' checksums are kept, not checked: that needs the image (see
    /// [`BlockRange::verify`]). Memory is bounded by the length of `text`;
    /// nothing is allocated from a number in the file.
    pub fn parse(text: &[u8], name: &str) -> Result<Bmap, BmapError> {
        Parser { text, name }.parse()
    }
}

struct Parser<'a> {
    text: &'a [u8],
    name: &'a str,
}

impl Parser<'_> {
    fn err(&self, line: Option<u32>, kind: K) -> BmapError {
        BmapError {
            file: self.name.to_owned(),
            line,
            kind,
        }
    }

    fn parse(&self) -> Result<Bmap, BmapError> {
        let s = std::str::from_utf8(self.text).map_err(|e| {
            self.err(
                None,
                K::NotUtf8 {
                    offset: e.valid_up_to(),
                },
            )
        })?;
        let doc = Document::parse(s).map_err(|e| self.err(Some(e.pos().row), K::Xml(e)))?;
        // Lines are computed only for errors: text_pos_at scans from the
        // start of the text.
        let line = |node: Node| Some(doc.text_pos_at(node.range().start).row);
        let fail = |node: Node, kind| self.err(line(node), kind);

        let root = doc.root_element();
        if root.tag_name().name() != "bmap" {
            let name = root.tag_name().name().to_owned();
            return Err(fail(root, K::RootElement { name }));
        }
        let value = root
            .attribute("version")
            .ok_or_else(|| fail(root, K::MissingVersion))?;
        let version = parse_version(value).ok_or_else(|| {
            let value = value.to_owned();
            fail(root, K::BadVersion { value })
        })?;
        if !(1..=2).contains(&version.major) {
            return Err(fail(root, K::UnsupportedVersion { version }));
        }

        let mut fields: [Option<Node>; FIELDS.len()] = [None; FIELDS.len()];
        for child in root.children().filter(Node::is_element) {
            let Some(i) = FIELDS.iter().position(|f| *f == child.tag_name().name()) else {
                continue;
            };
            if let Some(first) = fields[i] {
                let first_line = line(first).unwrap_or(0);
                let element = FIELDS[i];
                return Err(fail(
                    child,
                    K::Duplicate {
                        element,
                        first_line,
                    },
                ));
            }
            fields[i] = Some(child);
        }
        let get = |f: Field| {
            let element = FIELDS[f as usize];
            fields[f as usize].ok_or_else(|| self.err(line(root), K::Missing { element }))
        };

        // The checksums, and the file's own first.
        let scheme = version.scheme();
        let checksum_type = match scheme {
            Scheme::None => None,
            Scheme::Sha1 => Some(ChecksumType::Sha1),
            Scheme::Typed => {
                let node = get(Field::ChecksumType)?;
                let name = text_of(node);
                let name = trim(&name);
                Some(ChecksumType::from_name(name).ok_or_else(|| {
                    let name = name.to_owned();
                    fail(node, K::UnknownChecksumType { name })
                })?)
            }
        };
        if let (Some(kind), Some(element)) = (checksum_type, scheme.file_element()) {
            let i = FIELDS.iter().position(|f| *f == element).expect("a field");
            let node = fields[i].ok_or_else(|| self.err(line(root), K::Missing { element }))?;
            let value = text_of(node);
            let value = trim(&value);
            let stored = Digest::from_hex(kind, value).ok_or_else(|| {
                let value = value.to_owned();
                let checksum_type = kind;
                fail(
                    node,
                    K::BadFileChecksum {
                        element,
                        value,
                        checksum_type,
                    },
                )
            })?;
            let computed = file_checksum(self.text, &stored);
            if computed != stored {
                return Err(fail(
                    node,
                    K::FileChecksum {
                        element,
                        stored,
                        computed,
                    },
                ));
            }
        }

        let number = |f: Field| -> Result<(u64, Node), BmapError> {
            let node = get(f)?;
            let text = text_of(node);
            let text = trim(&text);
            match text.parse() {
                Ok(n) => Ok((n, node)),
                Err(_) => {
                    let element = FIELDS[f as usize];
                    let text = text.to_owned();
                    Err(fail(node, K::NotANumber { element, text }))
                }
            }
        };
        let (image_size, image_node) = number(Field::ImageSize)?;
        let (block_size, block_node) = number(Field::BlockSize)?;
        let (blocks_count, count_node) = number(Field::BlocksCount)?;
        let (mapped_blocks_count, mapped_node) = number(Field::MappedBlocksCount)?;
        if image_size == 0 {
            return Err(fail(image_node, K::ZeroImageSize));
        }
        // Any other block size is taken, a power of two or not: bmaptool
        // copies with one of 1000 (tests/bmaptool.rs), and here it is only
        // ever a multiplier.
        if block_size == 0 {
            return Err(fail(block_node, K::ZeroBlockSize));
        }
        let expected = blocks_for(image_size, block_size);
        if blocks_count != expected {
            return Err(fail(
                count_node,
                K::BlocksCount {
                    blocks_count,
                    image_size,
                    block_size,
                    expected,
                },
            ));
        }

        let attribute = scheme.range_attribute();
        let mut ranges: Vec<BlockRange> = Vec::new();
        let mut counted: u64 = 0;
        for node in get(Field::BlockMap)?.children().filter(Node::is_element) {
            if node.tag_name().name() != "Range" {
                let name = node.tag_name().name().to_owned();
                return Err(fail(node, K::UnexpectedElement { name }));
            }
            let text = text_of(node);
            let text = trim(&text);
            let (first, last) = parse_range(text).ok_or_else(|| {
                let text = text.to_owned();
                fail(node, K::RangeSyntax { text })
            })?;
            if first > last {
                return Err(fail(node, K::RangeReversed { first, last }));
            }
            if last >= blocks_count {
                return Err(fail(
                    node,
                    K::RangePastEnd {
                        first,
                        last,
                        blocks_count,
                    },
                ));
            }
            if let Some(prev) = ranges.last()
                && first <= prev.last
            {
                let (previous_first, previous_last) = (prev.first, prev.last);
                let kind = if last < prev.first {
                    K::RangeOutOfOrder {
                        first,
                        last,
                        previous_first,
                        previous_last,
                    }
                } else {
                    K::RangeOverlap {
                        first,
                        last,
                        previous_first,
                        previous_last,
                    }
                };
                return Err(fail(node, kind));
            }
            let checksum = match (checksum_type, attribute) {
                (Some(kind), Some(attribute)) => match node.attribute(attribute) {
                    // bmaptool verifies a range only `if chksum`: an empty
                    // attribute is no checksum.
                    None | Some("") => None,
                    // Not trimmed: bmaptool compares the attribute as it is.
                    Some(value) => Some(Digest::from_hex(kind, value).ok_or_else(|| {
                        let value = value.to_owned();
                        let checksum_type = kind;
                        fail(
                            node,
                            K::BadRangeChecksum {
                                first,
                                last,
                                attribute,
                                value,
                                checksum_type,
                            },
                        )
                    })?),
                },
                _ => None,
            };
            // Sorted, disjoint and below blocks_count: the sum can not
            // overflow.
            counted += last - first + 1;
            ranges.push(BlockRange {
                first,
                last,
                checksum,
            });
        }
        if counted != mapped_blocks_count {
            return Err(fail(
                mapped_node,
                K::MappedBlocksCount {
                    declared: mapped_blocks_count,
                    counted,
                },
            ));
        }

        Ok(Bmap {
            version,
            image_size,
            block_size,
            blocks_count,
            mapped_blocks_count,
            checksum_type,
            ranges,
        })
    }
}

/// `MAJOR.MINOR`, each part a decimal number (Python's `int` around
/// `split('.', 1)` in bmaptool, which also allows surrounding whitespace).
fn parse_version(value: &str) -> Option<Version> {
    let (major, minor) = value.split_once('.')?;
    Some(Version {
        major: trim(major).parse().ok()?,
        minor: trim(minor).parse().ok()?,
    })
}

/// `N` or `A-B`, with whitespace allowed around the parts, as bmaptool
/// splits it (`split('-', 1)`, each part stripped).
fn parse_range(text: &str) -> Option<(u64, u64)> {
    match text.split_once('-') {
        None => {
            let n = text.parse().ok()?;
            Some((n, n))
        }
        Some((a, b)) => Some((trim(a).parse().ok()?, trim(b).parse().ok()?)),
    }
}

/// The text of an element: its text children joined, as ElementTree joins
/// the text around comments it drops.
fn text_of<'a>(node: Node<'a, '_>) -> std::borrow::Cow<'a, str> {
    let mut texts = node
        .children()
        .filter(Node::is_text)
        .filter_map(|n| n.text());
    match (texts.next(), texts.next()) {
        (None, _) => "".into(),
        (Some(one), None) => one.into(),
        (Some(a), Some(b)) => {
            let mut s = String::from(a);
            s.push_str(b);
            texts.for_each(|t| s.push_str(t));
            s.into()
        }
    }
}

/// Strips XML whitespace (the only whitespace XML text can hold besides
/// characters Python's `strip` would also remove but bmaptool never
/// writes).
fn trim(s: &str) -> &str {
    s.trim_matches([' ', '\t', '\r', '\n'])
}

/// The checksum of the file with the stored checksum replaced by zeros.
///
/// Like bmaptool, the value replaced is the first occurrence of the stored
/// hex anywhere in the file. That is the element's own in any file that
/// can verify: digits found earlier would be part of the text they are
/// the checksum of.
pub(crate) fn file_checksum(text: &[u8], stored: &Digest) -> Digest {
    let hex = stored.to_hex();
    let kind = stored.checksum_type();
    let mut h = Hasher::new(kind);
    match text.windows(hex.len()).position(|w| w == hex.as_bytes()) {
        Some(at) => {
            h.update(&text[..at]);
            h.update(&b"0".repeat(hex.len()));
            h.update(&text[at + hex.len()..]);
        }
        // Only when the value is not in the text as it is written, which
        // a parsed one always is; hashing the text then can not match.
        None => h.update(text),
    }
    h.finish()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Replaces the file checksum of a 2.0/1.4 (sha256) or 1.3 (sha1)
    /// text with the right one, after an edit.
    pub(crate) fn reseal(text: &str) -> String {
        let (open, kind) = if text.contains("<BmapFileSHA1>") {
            ("<BmapFileSHA1>", ChecksumType::Sha1)
        } else {
            ("<BmapFileChecksum>", ChecksumType::Sha256)
        };
        let start = text.find(open).unwrap() + open.len();
        let value = text[start..].split('<').next().unwrap();
        let zeroed = format!(" {} ", "0".repeat(kind.hex_len()));
        let text = format!("{}{zeroed}{}", &text[..start], &text[start + value.len()..]);
        let digest = Hasher::digest(kind, text.as_bytes());
        text.replacen(&zeroed, &format!(" {digest} "), 1)
    }

    /// A 2.0 file as bmaptool writes it: 10000 bytes, blocks 0 and 2 of 3
    /// mapped, one with a checksum, one without.
    fn v2() -> String {
        format!(
            r#"<?xml version="1.0" ?>
<!-- comment -->
<bmap version="2.0">
    <ImageSize> 10000 </ImageSize>
    <BlockSize> 4096 </BlockSize>
    <BlocksCount> 3 </BlocksCount>
    <MappedBlocksCount> 2   </MappedBlocksCount>
    <ChecksumType> sha256 </ChecksumType>
    <BmapFileChecksum> {zeros} </BmapFileChecksum>
    <BlockMap>
        <Range chksum="{a}"> 0 </Range>
        <Range> 2 </Range>
    </BlockMap>
</bmap>
"#,
            zeros = "0".repeat(64),
            a = Hasher::digest(ChecksumType::Sha256, b"a"),
        )
    }

    fn parse(text: &str) -> Result<Bmap, BmapError> {
        Bmap::parse(text.as_bytes(), "disk.bmap")
    }

    /// The message of the refusal of `text` after resealing it.
    fn refusal(text: &str) -> String {
        parse(&reseal(text)).unwrap_err().to_string()
    }

    #[test]
    fn reads_every_field_of_a_2_0_file() {
        let b = parse(&reseal(&v2())).unwrap();
        assert_eq!(b.version(), Version::CREATED);
        assert_eq!(b.image_size(), 10_000);
        assert_eq!(b.block_size(), 4096);
        assert_eq!(b.blocks_count(), 3);
        assert_eq!(b.mapped_blocks_count(), 2);
        assert_eq!(b.checksum_type(), Some(ChecksumType::Sha256));
        let a = Hasher::digest(ChecksumType::Sha256, b"a");
        assert_eq!(
            b.ranges(),
            [
                BlockRange {
                    first: 0,
                    last: 0,
                    checksum: Some(a)
                },
                BlockRange {
                    first: 2,
                    last: 2,
                    checksum: None
                },
            ]
        );
        let bytes: Vec<_> = b.byte_ranges().map(|(r, _)| r).collect();
        assert_eq!(bytes, [0..4096, 8192..10_000]);
        assert_eq!(b.mapped_bytes(), 4096 + 1808);
        assert!(b.check_image_size(10_000).is_ok());
        assert_eq!(
            b.check_image_size(10_001).unwrap_err().to_string(),
            "the image is 10001 bytes but the bmap's ImageSize is 10000"
        );
    }

    #[test]
    fn a_wrong_file_checksum_is_refused_with_both_values() {
        let sealed = reseal(&v2());
        let edited = sealed.replace("<Range> 2 </Range>", "<Range> 1 </Range>");
        let computed = {
            let start = edited.find("<BmapFileChecksum> ").unwrap() + 19;
            let stored = &edited[start..start + 64];
            let zeroed = edited.replacen(stored, &"0".repeat(64), 1);
            (
                stored.to_owned(),
                Hasher::digest(ChecksumType::Sha256, zeroed.as_bytes()),
            )
        };
        assert_eq!(
            parse(&edited).unwrap_err().to_string(),
            format!(
                "disk.bmap: line 9: BmapFileChecksum is {} but the file's sha256 is {}",
                computed.0, computed.1
            )
        );
        // The zeros themselves are not the checksum of anything.
        assert!(
            parse(&v2())
                .unwrap_err()
                .to_string()
                .contains("BmapFileChecksum is 0000")
        );
    }

    #[test]
    fn refusals_name_the_field_the_range_and_the_line() {
        let base = v2();
        let cases: &[(&str, &str, &str)] = &[
            (
                "<ImageSize> 10000 ",
                "<ImageSize> 10k ",
                "line 4: ImageSize \"10k\" is not a decimal number",
            ),
            (
                "<ImageSize> 10000 ",
                "<ImageSize>  ",
                "line 4: ImageSize \"\" is not a decimal number",
            ),
            (
                "<ImageSize> 10000 ",
                "<ImageSize> 18446744073709551616 ",
                "line 4: ImageSize \"18446744073709551616\"",
            ),
            (
                "<BlockSize> 4096 ",
                "<BlockSize> -1 ",
                "line 5: BlockSize \"-1\" is not a decimal number",
            ),
            (
                "<BlocksCount> 3 ",
                "<BlocksCount> 4 ",
                "line 6: BlocksCount 4 is not ImageSize 10000 / BlockSize 4096 rounded up (3)",
            ),
            (
                "<BlockSize> 4096 ",
                "<BlockSize> 0 ",
                "line 5: BlockSize is 0",
            ),
            (
                "<MappedBlocksCount> 2 ",
                "<MappedBlocksCount> 3 ",
                "line 7: MappedBlocksCount is 3 but the Ranges hold 2 blocks",
            ),
            (
                "<MappedBlocksCount> 2 ",
                "<MappedBlocksCount> x ",
                "line 7: MappedBlocksCount \"x\"",
            ),
            (
                "<Range> 2 </Range>",
                "<Range> 3 </Range>",
                "line 12: Range 3 ends past BlocksCount 3",
            ),
            (
                "<Range> 2 </Range>",
                "<Range> 1-3 </Range>",
                "line 12: Range 1-3 ends past BlocksCount 3",
            ),
            (
                "<Range> 2 </Range>",
                "<Range> 2-1 </Range>",
                "line 12: Range 2-1 starts after it ends",
            ),
            (
                "<Range> 2 </Range>",
                "<Range> 0-1 </Range>",
                "line 12: Range 0-1 overlaps the Range 0 before it",
            ),
            (
                "<Range> 2 </Range>",
                "<Range> 0 </Range>",
                "line 12: Range 0 overlaps the Range 0 before it",
            ),
            (
                "<Range> 2 </Range>",
                "<Range> 2- </Range>",
                "line 12: Range \"2-\" is neither",
            ),
            (
                "<Range> 2 </Range>",
                "<Range> two </Range>",
                "line 12: Range \"two\" is neither",
            ),
            (
                "<Range> 2 </Range>",
                "<Range/>",
                "line 12: Range \"\" is neither",
            ),
            (
                "<Range> 2 </Range>",
                "<range> 2 </range>",
                "line 12: <range> in <BlockMap>, where only <Range> may be",
            ),
            (
                "<ChecksumType> sha256 ",
                "<ChecksumType> sha512 ",
                "line 8: ChecksumType \"sha512\" is not supported",
            ),
            (
                "<ChecksumType> sha256 ",
                "<ChecksumType> sha1 ",
                "line 9: BmapFileChecksum \"",
            ),
            (
                "<Range> 2 </Range>",
                "<Range chksum=\"abc\"> 2 </Range>",
                "line 12: Range 2: chksum=\"abc\" is not 64 lowercase hex digits (sha256)",
            ),
            (
                "<BlockSize> 4096 </BlockSize>",
                "<BlockSize> 4096 </BlockSize><BlockSize> 4096 </BlockSize>",
                "line 5: a second <BlockSize> (the first is on line 5)",
            ),
            (
                "    <BlocksCount> 3 </BlocksCount>\n",
                "",
                "line 3: no <BlocksCount> element",
            ),
            (
                "    <ChecksumType> sha256 </ChecksumType>\n",
                "",
                "line 3: no <ChecksumType> element",
            ),
            (
                "version=\"2.0\"",
                "version=\"3.0\"",
                "line 3: bmap format version 3.0 is not supported",
            ),
            (
                "version=\"2.0\"",
                "version=\"0.9\"",
                "line 3: bmap format version 0.9 is not supported",
            ),
            (
                "version=\"2.0\"",
                "version=\"2\"",
                "line 3: version \"2\" is not MAJOR.MINOR",
            ),
            (
                "version=\"2.0\"",
                "version=\"2.0.1\"",
                "line 3: version \"2.0.1\" is not MAJOR.MINOR",
            ),
            (
                "version=\"2.0\"",
                "",
                "line 3: <bmap> has no version attribute",
            ),
            (
                "<bmap ",
                "<bmop ",
                "line 3: the root element is <bmop>, not <bmap>",
            ),
        ];
        for (from, to, want) in cases {
            assert!(base.contains(from), "{from}");
            let text = base.replacen(from, to, 1);
            let text = if to.contains("bmop") {
                text.replace("</bmap>", "</bmop>")
            } else {
                text
            };
            let got = refusal(&text);
            assert!(
                got.starts_with(&format!("disk.bmap: {want}")),
                "{from:?} -> {to:?}:\n got {got}\nwant disk.bmap: {want}"
            );
        }
    }

    #[test]
    fn ranges_out_of_order_are_refused() {
        let text = v2().replacen(
            "<Range> 2 </Range>",
            "<Range> 2 </Range>\n<Range> 1 </Range>",
            1,
        );
        let text = text.replacen("<MappedBlocksCount> 2 ", "<MappedBlocksCount> 3 ", 1);
        assert_eq!(
            refusal(&text),
            "disk.bmap: line 13: Range 1 lies before the Range 2 listed ahead of it"
        );
    }

    #[test]
    fn a_file_that_is_not_xml_or_not_utf8_is_refused() {
        let e = parse("<bmap version=\"2.0\">\n<ImageSize></Image>\n</bmap>").unwrap_err();
        assert_eq!(e.line, Some(2));
        assert_eq!(
            e.to_string(),
            "disk.bmap: line 2: not well-formed XML: expected 'ImageSize' tag, not 'Image' at 2:12"
        );
        let e = Bmap::parse(b"<bmap version=\"1.0\">\xff</bmap>", "x.bmap").unwrap_err();
        assert_eq!(
            e.to_string(),
            "x.bmap: not UTF-8 (invalid byte at offset 0x14)"
        );
        assert!(parse("").is_err());
    }

    #[test]
    fn whitespace_and_unknown_elements_are_taken_as_bmaptool_takes_them() {
        let text = v2()
            .replacen("<Range> 2 </Range>", "<Range>\n 1 -\t2 </Range>", 1)
            .replacen("<MappedBlocksCount> 2 ", "<MappedBlocksCount> 3 ", 1)
            .replacen(
                "<ImageSize> 10000 ",
                "<ImageSize><!-- c --> 10000 <!-- d --> ",
                1,
            )
            .replacen("<BlockMap>", "<Future>x</Future>\n<BlockMap>", 1)
            .replacen("version=\"2.0\"", "version=\"2.1\"", 1);
        let b = parse(&reseal(&text)).unwrap();
        assert_eq!(b.version(), Version { major: 2, minor: 1 });
        assert_eq!((b.ranges()[1].first, b.ranges()[1].last), (1, 2));
        assert_eq!(b.image_size(), 10_000);
    }

    #[test]
    fn a_non_power_of_two_block_size_is_taken_like_bmaptool() {
        let text = v2()
            .replacen("<BlockSize> 4096 ", "<BlockSize> 1000 ", 1)
            .replacen("<BlocksCount> 3 ", "<BlocksCount> 10 ", 1);
        let b = parse(&reseal(&text)).unwrap();
        assert_eq!(b.byte_ranges().nth(1).unwrap().0, 2000..3000);
    }

    #[test]
    fn an_empty_checksum_attribute_is_no_checksum_as_in_bmaptool() {
        let text = v2().replacen("<Range> 2 </Range>", "<Range chksum=\"\"> 2 </Range>", 1);
        assert_eq!(parse(&reseal(&text)).unwrap().ranges()[1].checksum, None);
    }

    /// Mutations of valid files: the parser never panics, and what it
    /// accepts keeps the invariants [`Bmap`] promises.
    #[test]
    fn mutated_files_are_refused_or_valid_never_a_panic() {
        let bases = [
            v2().replacen("version=\"2.0\"", "version=\"1.2\"", 1),
            reseal(&v2()),
            reseal(&v1_3()),
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rand = move |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let pieces: [&[u8]; 8] = [
            b"0",
            b"9",
            b"-",
            b" ",
            b"<",
            b"18446744073709551616",
            b"<Range> 1 </Range>",
            b"\xff",
        ];
        let mut accepted = 0;
        for i in 0..20_000 {
            let mut t = bases[i % bases.len()].clone().into_bytes();
            for _ in 0..1 + rand(3) {
                let at = rand(t.len());
                match rand(4) {
                    0 => t[at] = t[rand(t.len())],
                    1 => {
                        let end = (at + 1 + rand(8)).min(t.len());
                        t.drain(at..end);
                    }
                    2 => {
                        let p = pieces[rand(pieces.len())];
                        t.splice(at..at, p.iter().copied());
                    }
                    _ => t[at] = t[at].wrapping_add(1),
                }
            }
            if let Ok(b) = Bmap::parse(&t, "fuzz") {
                accepted += 1;
                let mut sum = 0;
                for (k, r) in b.ranges().iter().enumerate() {
                    assert!(r.first <= r.last && r.last < b.blocks_count());
                    if k > 0 {
                        assert!(b.ranges()[k - 1].last < r.first);
                    }
                    if let Some(d) = r.checksum {
                        assert_eq!(Some(d.checksum_type()), b.checksum_type());
                    }
                    sum += r.blocks();
                }
                assert_eq!(sum, b.mapped_blocks_count());
                assert_eq!(b.blocks_count(), b.image_size().div_ceil(b.block_size()));
                // And it writes a 2.0 file that reads back the same.
                let again = Bmap::parse(b.to_xml().as_bytes(), "again").unwrap();
                assert_eq!(again.ranges(), b.ranges());
            }
        }
        // Some mutations (whitespace, comments) are harmless.
        assert!(accepted > 100, "{accepted}");
    }

    #[test]
    fn adjacent_ranges_are_taken() {
        let text = v2()
            .replacen(
                "<Range> 2 </Range>",
                "<Range> 1 </Range><Range> 2 </Range>",
                1,
            )
            .replacen("<MappedBlocksCount> 2 ", "<MappedBlocksCount> 3 ", 1);
        assert_eq!(parse(&reseal(&text)).unwrap().ranges().len(), 3);
    }

    /// Format 1.3: SHA-1 everywhere, `<BmapFileSHA1>`, `sha1=` attributes,
    /// no `<ChecksumType>`.
    fn v1_3() -> String {
        format!(
            r#"<?xml version="1.0" ?>
<bmap version="1.3">
    <ImageSize> 8192 </ImageSize>
    <BlockSize> 4096 </BlockSize>
    <BlocksCount> 2 </BlocksCount>
    <MappedBlocksCount> 1 </MappedBlocksCount>
    <BmapFileSHA1> {zeros} </BmapFileSHA1>
    <BlockMap>
        <Range sha1="{d}" chksum="nonsense"> 1 </Range>
    </BlockMap>
</bmap>
"#,
            zeros = "0".repeat(40),
            d = Hasher::digest(ChecksumType::Sha1, b"x"),
        )
    }

    #[test]
    fn format_1_3_uses_sha1_attributes_and_bmap_file_sha1() {
        let b = parse(&reseal(&v1_3())).unwrap();
        assert_eq!(b.checksum_type(), Some(ChecksumType::Sha1));
        assert_eq!(
            b.ranges()[0].checksum,
            Some(Hasher::digest(ChecksumType::Sha1, b"x"))
        );
        // A wrong BmapFileSHA1 is refused.
        let e = parse(&reseal(&v1_3()).replacen("> 1 <", "> 0 <", 1)).unwrap_err();
        assert!(e.to_string().contains("line 7: BmapFileSHA1 is "), "{e}");
        assert!(e.to_string().contains("but the file's sha1 is"), "{e}");
        // Without it, too.
        let no_sum = v1_3().replace(
            &format!("    <BmapFileSHA1> {} </BmapFileSHA1>\n", "0".repeat(40)),
            "",
        );
        assert!(
            parse(&no_sum)
                .unwrap_err()
                .to_string()
                .contains("no <BmapFileSHA1> element")
        );
        // A bad sha1 attribute.
        let bad = v1_3().replacen("sha1=\"", "sha1=\"0", 1);
        assert!(
            refusal(&bad).contains("Range 1: sha1=\"0"),
            "{}",
            refusal(&bad)
        );
    }

    #[test]
    fn formats_1_0_to_1_2_have_no_checksums_and_ignore_attributes() {
        for minor in [0, 1, 2] {
            let text = v2()
                .replacen("version=\"2.0\"", &format!("version=\"1.{minor}\""), 1)
                .replace("chksum=", "sha1=");
            // Neither the (wrong) file checksum nor the attributes are read.
            let b = parse(&text).unwrap();
            assert_eq!(b.checksum_type(), None);
            assert!(b.ranges().iter().all(|r| r.checksum.is_none()));
            assert!(b.hasher().is_none());
        }
    }

    #[test]
    fn format_1_4_is_2_0() {
        let text = reseal(&v2().replacen("version=\"2.0\"", "version=\"1.4\"", 1));
        let b = parse(&text).unwrap();
        assert_eq!(b.checksum_type(), Some(ChecksumType::Sha256));
        assert!(b.ranges()[0].checksum.is_some());
    }

    #[test]
    fn numbers_from_the_file_are_not_allocated() {
        // A huge BlocksCount with a huge image: parsing is as cheap as the
        // text.
        let text = v2()
            .replacen("<ImageSize> 10000 ", "<ImageSize> 18446744073709551615 ", 1)
            .replacen("<BlockSize> 4096 ", "<BlockSize> 1 ", 1)
            .replacen("<BlocksCount> 3 ", "<BlocksCount> 18446744073709551615 ", 1)
            .replacen(
                "<Range> 2 </Range>",
                "<Range> 18446744073709551613-18446744073709551614 </Range>",
                1,
            )
            .replacen("<MappedBlocksCount> 2 ", "<MappedBlocksCount> 3 ", 1);
        let b = parse(&reseal(&text)).unwrap();
        assert_eq!(b.mapped_bytes(), 3);
        let last = b.byte_ranges().last().unwrap().0;
        assert_eq!(last, u64::MAX - 2..u64::MAX);
    }

    #[test]
    fn an_empty_image_is_refused() {
        let text = v2()
            .replacen("<ImageSize> 10000 ", "<ImageSize> 0 ", 1)
            .replacen("<BlocksCount> 3 ", "<BlocksCount> 0 ", 1);
        assert_eq!(refusal(&text), "disk.bmap: line 4: ImageSize is 0");
    }
}
