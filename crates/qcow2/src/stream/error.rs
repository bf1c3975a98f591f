//! What can go wrong decoding a qcow2 stream.

use std::io;

use crate::error::Error;

/// Everything that can go wrong decoding a qcow2 stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// Reading from the underlying reader failed.
    #[error("reading the stream at {offset:#x}")]
    Read {
        /// Stream offset of the read.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The header is not a valid qcow2 header (garbage, truncated,
    /// encrypted, unknown incompatible features...).
    #[error("qcow2 stream header")]
    Header {
        /// What is wrong.
        #[source]
        source: Error,
    },
    /// The image has a backing file.
    #[error(
        "the image has a backing file {name:?}: a stream with a backing file can not be decoded alone"
    )]
    BackingFile {
        /// The backing file name as stored.
        name: String,
    },
    /// The image keeps its data in an external data file.
    #[error(
        "the image keeps its guest data in an external data file {name:?}: a stream does not carry it"
    )]
    ExternalDataFile {
        /// The data file name from its header extension, if any.
        name: Option<String>,
    },
    /// The corrupt bit is set: qemu itself distrusts every table.
    #[error("the image is marked corrupt (incompatible feature bit 1)")]
    Corrupt,
    /// A table entry is invalid.
    #[error("invalid qcow2 table entry")]
    Entry {
        /// What is wrong, with the table offset and entry index.
        #[source]
        source: Error,
    },
    /// The tables are larger than [`super::StreamLimits::max_metadata_bytes`].
    #[error("the stream's {what} takes {bytes} bytes, more than the cap of {cap} bytes")]
    TooMuchMetadata {
        /// `tables` (L1, L2 and refcount tables) or `cluster map`.
        what: &'static str,
        /// Bytes needed.
        bytes: u64,
        /// The cap.
        cap: u64,
    },
    /// The stream ends before a table or a data cluster is complete.
    #[error(
        "the stream ends at {end:#x}, short of the {what} at {offset:#x}..{region_end:#x}: truncated stream"
    )]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Its start.
        offset: u64,
        /// Its end.
        region_end: u64,
        /// Where the stream ended.
        end: u64,
    },
    /// Data clusters are referenced past the end of the stream.
    #[error(
        "{count} referenced data clusters lie beyond the end of the stream at {end:#x}, \
         the first for guest {guest:#x} at host {host:#x}"
    )]
    BeyondEnd {
        /// Clusters never reached.
        count: u64,
        /// Guest offset of the first.
        guest: u64,
        /// Host offset of the first.
        host: u64,
        /// Where the stream ended.
        end: u64,
    },
    /// A table comes after data the stream has already passed.
    #[error("the {what} at {offset:#x} comes after data at {data:#x}: not a forward-only stream")]
    NotForward {
        /// The table.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Host offset of the first data cluster before it.
        data: u64,
    },
    /// A table lies before the table that points to it.
    #[error(
        "the {what} at {offset:#x} lies before the {referrer} at {referrer_offset:#x} \
         that points to it: not a forward-only stream"
    )]
    TableBehind {
        /// The table pointed to.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// The table pointing to it.
        referrer: &'static str,
        /// Offset of that table.
        referrer_offset: u64,
    },
    /// Host bytes used by two structures.
    #[error("the {what} at {offset:#x} overlaps the {other} at {other_offset:#x}")]
    Overlap {
        /// The later structure.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// The structure it overlaps.
        other: &'static str,
        /// Its offset.
        other_offset: u64,
    },
    /// Two guest clusters map to the same host bytes.
    #[error(
        "guest clusters {guest:#x} and {other_guest:#x} both map to host {host:#x}: duplicate reference"
    )]
    DuplicateReference {
        /// The host offset referenced twice.
        host: u64,
        /// One guest offset.
        guest: u64,
        /// The other.
        other_guest: u64,
    },
    /// A compressed cluster does not decompress.
    #[error("guest cluster {guest:#x}")]
    Decompress {
        /// Guest offset of the cluster.
        guest: u64,
        /// The decompression error, with host offset and size.
        #[source]
        source: Error,
    },
}

/// Result alias of the stream decoder.
pub(crate) type Result<T, E = StreamError> = std::result::Result<T, E>;
