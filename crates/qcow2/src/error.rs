//! The error type of this crate.

use std::io;
use std::path::PathBuf;

/// `the image has bitmaps "a", "b"`, or `the image has no bitmaps`.
fn bitmap_list(names: &[String]) -> String {
    if names.is_empty() {
        return "the image has no bitmaps".into();
    }
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    let s = if names.len() == 1 { "" } else { "s" };
    format!("the image has bitmap{s} {}", quoted.join(", "))
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading a qcow2 image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error inside a given file of a backing chain.
    #[error("{}", path.display())]
    File {
        /// The file the error happened in.
        path: PathBuf,
        /// What happened.
        #[source]
        source: Box<Error>,
    },
    /// Opening a file failed.
    #[error("opening {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The caller's [`crate::OnOpen`] hook refused a file.
    #[error("{role} {}", path.display())]
    Refused {
        /// The file.
        path: PathBuf,
        /// What it is to the image.
        role: crate::FileRole,
        /// The caller's error.
        #[source]
        source: crate::HookError,
    },
    /// Reading (pread) failed.
    #[error("reading {what} at {offset:#x}")]
    Read {
        /// What was being read.
        what: &'static str,
        /// Where.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Asking a file for its size, identity or allocation (fstat) failed.
    #[error("asking for the {what} of the file (fstat)")]
    Stat {
        /// What was asked for.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Asking where a host file has data (lseek SEEK_DATA / SEEK_HOLE)
    /// failed.
    #[error("finding data in {} at {offset:#x} (SEEK_DATA)", path.display())]
    SeekData {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing output the caller gave failed.
    #[error("writing the {what}")]
    Write {
        /// What was being written.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is shorter than a structure it must contain.
    #[error("{what} at {offset:#x}..{end:#x} lies beyond the end of the file ({file_size:#x})")]
    OutsideFile {
        /// What was referenced.
        what: &'static str,
        /// Start of the referenced range.
        offset: u64,
        /// End of the referenced range.
        end: u64,
        /// Size of the file.
        file_size: u64,
    },
    /// The file does not start with `QFI\xfb`.
    #[error("bad magic {found:#010x}, expected 0x514649fb (QFI\\xfb)")]
    BadMagic {
        /// The first four bytes, big-endian.
        found: u32,
    },
    /// Fewer bytes than the header needs.
    #[error("truncated header: {needed} bytes needed, {available} available")]
    TruncatedHeader {
        /// Bytes the header needs.
        needed: usize,
        /// Bytes there are.
        available: usize,
    },
    /// A header field with a value outside its valid range.
    #[error("header field {field} is {value:#x}: {expected}")]
    BadField {
        /// Name of the field, as in the spec.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What was expected.
        expected: &'static str,
    },
    /// An incompatible feature bit this crate does not know.
    #[error("unsupported incompatible feature bits {bits:#x} ({names})")]
    UnknownIncompatible {
        /// The unknown bits.
        bits: u64,
        /// Their names from the feature name table, or `bit N`.
        names: String,
    },
    /// The image is encrypted.
    #[error("encrypted images are not supported ({reason})")]
    Encrypted {
        /// What says so: the crypt method or the encryption header extension.
        reason: &'static str,
    },
    /// A header extension is malformed.
    #[error("header extension {kind:#010x} at {offset:#x}: {problem}")]
    BadExtension {
        /// The extension type.
        kind: u32,
        /// Its offset in the file.
        offset: u64,
        /// What is wrong.
        problem: &'static str,
    },
    /// An L1 entry with reserved bits set or a misaligned offset.
    #[error("L1 entry {index} of table at {table_offset:#x}: {problem} (entry {entry:#x})")]
    BadL1Entry {
        /// Offset of the L1 table.
        table_offset: u64,
        /// Index of the entry.
        index: u64,
        /// The raw entry.
        entry: u64,
        /// What is wrong.
        problem: &'static str,
    },
    /// An L2 entry that is invalid.
    #[error("L2 entry {index} of table at {table_offset:#x}: {problem} (entry {entry:#x})")]
    BadL2Entry {
        /// Offset of the L2 table.
        table_offset: u64,
        /// Index of the entry.
        index: u64,
        /// The raw entry (first 64 bits).
        entry: u64,
        /// What is wrong.
        problem: &'static str,
    },
    /// A refcount table entry that is invalid.
    #[error("refcount table entry {index} at {table_offset:#x}: {problem} (entry {entry:#x})")]
    BadRefcountEntry {
        /// Offset of the refcount table.
        table_offset: u64,
        /// Index of the entry.
        index: u64,
        /// The raw entry.
        entry: u64,
        /// What is wrong.
        problem: &'static str,
    },
    /// A compressed cluster that does not decompress to a full cluster.
    #[error("compressed cluster at host {host_offset:#x} ({size} bytes): {problem}")]
    Decompress {
        /// Host offset of the compressed data.
        host_offset: u64,
        /// Its size in bytes, as the L2 entry gives it.
        size: u64,
        /// What went wrong.
        problem: String,
    },
    /// The backing chain is too deep.
    #[error("backing chain deeper than {max} images")]
    ChainTooDeep {
        /// The cap.
        max: usize,
    },
    /// The backing chain comes back to a file already in it.
    #[error("backing chain loops back to {}", path.display())]
    BackingLoop {
        /// The file seen twice.
        path: PathBuf,
    },
    /// A backing or data file name this crate can not open.
    #[error("unsupported {what} {name:?}: {problem}")]
    UnsupportedFile {
        /// `backing file` or `data file`.
        what: &'static str,
        /// The name as stored in the image.
        name: String,
        /// Why.
        problem: &'static str,
    },
    /// A backing or data file name refused for an untrusted image.
    #[error("{what} {name:?} refused for an untrusted image: {problem}")]
    Untrusted {
        /// `backing file` or `data file`.
        what: &'static str,
        /// The name as stored in the image.
        name: String,
        /// Why.
        problem: &'static str,
    },
    /// A backing file format other than qcow2 or raw.
    #[error("unsupported backing file format {format:?}")]
    UnsupportedBackingFormat {
        /// The format named by the image.
        format: String,
    },
    /// A range outside the virtual disk.
    #[error("range {offset:#x}+{length:#x} is outside the virtual disk of {size:#x} bytes")]
    OutOfRange {
        /// Start of the range.
        offset: u64,
        /// Its length.
        length: u64,
        /// The virtual size.
        size: u64,
    },
    /// A persistent dirty bitmap that is not in the image; the message
    /// lists the ones that are, since a typo is the usual cause.
    #[error("no bitmap named {name:?} ({})", bitmap_list(.available))]
    NoSuchBitmap {
        /// The name asked for.
        name: String,
        /// The names of the image's bitmaps, in directory order.
        available: Vec<String>,
    },
    /// A bitmap directory entry or bitmap table entry that is invalid.
    #[error("bitmap {name:?}: {problem} (value {value:#x})")]
    BadBitmap {
        /// The bitmap name (empty when it could not be read).
        name: String,
        /// What is wrong.
        problem: &'static str,
        /// The offending value.
        value: u64,
    },
    /// A snapshot table entry that is invalid.
    #[error("snapshot table entry {index} at {offset:#x}: {problem}")]
    BadSnapshot {
        /// Index of the entry.
        index: u32,
        /// Its offset in the file.
        offset: u64,
        /// What is wrong.
        problem: &'static str,
    },
}

impl Error {
    /// The innermost error, past the [`Error::File`] wrappers that say
    /// which file of a chain it happened in.
    pub fn root(&self) -> &Error {
        match self {
            Error::File { source, .. } => source.root(),
            e => e,
        }
    }

    pub(crate) fn in_file(self, path: &std::path::Path) -> Error {
        match self {
            e @ Error::File { .. } => e,
            e => Error::File {
                path: path.to_path_buf(),
                source: Box::new(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_offsets_in_hex() {
        let e = Error::BadL2Entry {
            table_offset: 0x30000,
            index: 7,
            entry: 0x8000_0000_0005_0001,
            problem: "reserved bits set",
        };
        assert_eq!(
            e.to_string(),
            "L2 entry 7 of table at 0x30000: reserved bits set (entry 0x8000000000050001)"
        );
    }

    #[test]
    fn root_sees_through_file_wrappers() {
        let e = Error::BadMagic { found: 0 }.in_file(std::path::Path::new("/a"));
        let e = e.in_file(std::path::Path::new("/b"));
        assert!(matches!(e.root(), Error::BadMagic { .. }));
        assert_eq!(e.to_string(), "/a");
    }
}
