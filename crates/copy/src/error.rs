//! What can go wrong, in the order it can: opening an endpoint
//! ([`OpenError`]), planning a copy ([`PlanError`], nothing written yet),
//! and executing it ([`Error`], wrapped in [`Failed`] with how far it got).

use std::fmt;
use std::io;
use std::path::PathBuf;

use sparsekit_extent::MapError;

use crate::source::SourceError;

/// A source or destination could not be opened or inspected. Nothing was
/// written.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A local file or device could not be opened or mapped.
    #[error(transparent)]
    File(#[from] sparsekit_fiemap::Error),
    /// A qcow2 image (or a file of its chain) could not be opened.
    #[error(transparent)]
    Qcow2(#[from] sparsekit_qcow2::Error),
    /// An NBD server could not be reached or refused the handshake.
    #[error(transparent)]
    Nbd(#[from] sparsekit_nbd::Error),
    /// A string that starts like an NBD URI but is not a usable one. The
    /// cause quotes the string, so the message does not.
    #[error("not a usable NBD URI")]
    Uri {
        /// The string given.
        spec: String,
        /// Why.
        #[source]
        source: sparsekit_nbd::Error,
    },
    /// A format was asked for that this kind of endpoint cannot have.
    #[error("{name}: {why}")]
    NotApplicable {
        /// The endpoint.
        name: String,
        /// What does not apply, and why.
        why: &'static str,
    },
    /// A qcow2 stream on standard input could not be read.
    #[error("qcow2 stream on {name}")]
    Stream {
        /// Where it came from.
        name: String,
        /// Why.
        #[source]
        source: sparsekit_qcow2::StreamError,
    },
    /// A local file could not be examined or opened.
    #[error("{}: {what}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The destination is neither a regular file nor a block device.
    #[error("{}: is a {kind}, not a regular file or block device", path.display())]
    DestNotWritable {
        /// The destination.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The destination's folder does not exist or cannot hold a new file.
    #[error("{}: cannot be created", path.display())]
    DestFolder {
        /// The destination.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A copy that cannot be done as asked: found while planning, before
/// anything was created, truncated or written.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// `--skip` lies past the end of the source.
    #[error("{source_name}: cannot skip {skip} bytes of a {size}-byte source")]
    SkipPastEnd {
        /// The source.
        source_name: String,
        /// Bytes to skip.
        skip: u64,
        /// Its size.
        size: u64,
    },
    /// `--skip` plus `--length` lies past the end of the source.
    #[error("{source_name}: cannot copy {length} bytes from offset {skip} of a {size}-byte source")]
    LengthPastEnd {
        /// The source.
        source_name: String,
        /// Bytes skipped.
        skip: u64,
        /// Bytes asked for.
        length: u64,
        /// Its size.
        size: u64,
    },
    /// `--offset` plus the copy's length does not fit in 64 bits.
    #[error("--offset {offset} plus {length} bytes lies past the largest possible offset")]
    OffsetOverflow {
        /// Where the copy would start in the destination.
        offset: u64,
        /// Bytes it would write.
        length: u64,
    },
    /// A chunk size out of bounds.
    #[error("--chunk-size must be 4k to 1G, not {size}")]
    ChunkSize {
        /// The size asked for.
        size: u64,
    },
    /// A zero-detection granularity qemu-img would refuse.
    #[error("-S must be a multiple of 512 up to 16M (0 turns zero detection off), not {size}")]
    SparseBlock {
        /// The size asked for.
        size: u64,
    },
    /// The bmap file could not be read.
    #[error("{}: reading the bmap", path.display())]
    BmapRead {
        /// The bmap file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The bmap file is not one that can be trusted to describe an image.
    #[error(transparent)]
    Bmap(Box<sparsekit_bmap::BmapError>),
    /// The bmap describes an image of another size.
    #[error("{bmap}: not the bmap of {source_name}")]
    BmapSize {
        /// The bmap file.
        bmap: String,
        /// The source.
        source_name: String,
        /// The sizes.
        #[source]
        source: sparsekit_bmap::ImageSizeMismatch,
    },
    /// The destination is the source, or one of the files it reads.
    #[error("{}: the destination is the source file", path.display())]
    SameFile {
        /// The destination.
        path: PathBuf,
    },
    /// A block device destination is smaller than the copy.
    #[error("{}: the device holds {size} bytes, the copy needs {needed}", path.display())]
    DestTooSmall {
        /// The device.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Bytes the copy writes up to (offset + length).
        needed: u64,
    },
    /// An NBD destination that cannot be written: the server says the
    /// export is read-only.
    #[error("{name}: the export is read-only")]
    ReadOnly {
        /// The export.
        name: String,
    },
    /// An NBD destination smaller than the copy.
    #[error("{name}: the export holds {size} bytes, the copy needs {needed}")]
    ExportTooSmall {
        /// The export.
        name: String,
        /// Its size.
        size: u64,
        /// Bytes the copy writes up to (offset + length).
        needed: u64,
    },
    /// The destination export is the source export.
    #[error("{name}: the destination is the source export")]
    SameExport {
        /// The export.
        name: String,
    },
    /// An update in place (`-n`, `--bitmap`) of a destination that does
    /// not exist.
    #[error("{}: {why}, and it does not exist", path.display())]
    DestMissing {
        /// The destination.
        path: PathBuf,
        /// Which option needs it.
        why: &'static str,
    },
    /// An incremental copy into a destination shorter than the full copy
    /// it should be.
    #[error("{}: is {len} bytes; the copy of {source_name} it should be holds {want}", path.display())]
    DestShort {
        /// The destination.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The source.
        source_name: String,
        /// The length the copy needs.
        want: u64,
    },
    /// The destination is in use (qemu's image locks), or cannot be
    /// locked.
    #[error(transparent)]
    Locked(sparsekit_fiemap::Error),
    /// Options that do not go together, or do not apply to these
    /// endpoints.
    #[error("{0}")]
    NotApplicable(&'static str),
    /// The source has no such dirty bitmap, or cannot read it.
    #[error("{source_name}: bitmap {bitmap:?}")]
    Bitmap {
        /// The source.
        source_name: String,
        /// The bitmap asked for.
        bitmap: String,
        /// Why it cannot be used.
        #[source]
        source: SourceError,
    },
}

/// Errors of a running copy. Each names the file and offset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The destination could not be created or sized.
    #[error("{}: {what}", path.display())]
    OpenDest {
        /// The destination.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A destination the copy created could not be locked (someone opened
    /// it at once).
    #[error(transparent)]
    Locked(sparsekit_fiemap::Error),
    /// Flushing the destination to stable storage failed.
    #[error("{}: flushing to stable storage (fdatasync)", path.display())]
    Flush {
        /// The destination.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The source failed (mapping or reading); its error has the context.
    #[error(transparent)]
    Source(SourceError),
    /// The source's map does not cover the range it was asked for.
    #[error("{source_name}: the map is not whole")]
    MapNotWhole {
        /// The source.
        source_name: String,
        /// What is wrong with it.
        #[source]
        source: MapError,
    },
    /// Writing the destination failed.
    #[error("{}: writing {len} bytes at offset {offset:#x}", path.display())]
    Write {
        /// The destination.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
        /// The cause (ENOSPC, EIO, ...).
        #[source]
        source: io::Error,
    },
    /// Writing back or dropping written pages of the destination failed.
    #[error("{}: writing back {len} bytes at offset {offset:#x}", path.display())]
    WriteBack {
        /// The destination.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Zeroing a range of the destination failed.
    #[error("{}: zeroing {len} bytes at offset {offset:#x}", path.display())]
    Zero {
        /// The destination.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing, zeroing or flushing an NBD destination failed; the NBD
    /// error names the export, the command and what the server said.
    #[error("{}", nbd_what(what, *offset, *len))]
    Nbd {
        /// What was being done.
        what: &'static str,
        /// Where.
        offset: u64,
        /// How much.
        len: u64,
        /// The cause (boxed: NBD errors are large, and rare).
        #[source]
        source: Box<sparsekit_nbd::Error>,
    },
    /// copy_file_range failed.
    #[error("{source_name} -> {}: copy_file_range at source offset {offset:#x}", path.display())]
    Copy {
        /// The source.
        source_name: String,
        /// The destination.
        path: PathBuf,
        /// Source offset where it failed.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A range of the image does not hash to its checksum in the bmap.
    #[error("{bmap}: bytes {start:#x}..{end:#x} of the image do not match the bmap")]
    Checksum {
        /// The bmap file.
        bmap: String,
        /// First byte of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// The checksums.
        #[source]
        source: Box<sparsekit_bmap::RangeChecksumMismatch>,
    },
    /// A stop was requested (SIGINT, SIGTERM).
    #[error("interrupted")]
    Interrupted,
    /// A qcow2 stream could not be read or written.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// `verify` found a difference.
    #[error("{dest_name}: differs from {source_name} at destination offset {offset:#x}")]
    Differs {
        /// The source.
        source_name: String,
        /// The destination.
        dest_name: String,
        /// First differing byte.
        offset: u64,
    },
}

fn nbd_what(what: &str, offset: u64, len: u64) -> String {
    if len == 0 {
        format!("{what} the destination")
    } else {
        format!("{what} {len} bytes at offset {offset:#x} of the destination")
    }
}

/// Errors of stream import and export.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The stream could not be decoded.
    #[error("qcow2 stream on {name}")]
    Decode {
        /// Where the stream came from (`standard input`).
        name: String,
        /// Why.
        #[source]
        source: sparsekit_qcow2::StreamError,
    },
    /// A raw stream could not be read (or decompressed).
    #[error("{name}: reading{} at image offset {offset:#x}", compression.map_or(String::new(), |c| format!(" {c} data")))]
    Read {
        /// Where the stream comes from.
        name: String,
        /// How it is compressed.
        compression: Option<crate::Compression>,
        /// Bytes of the image read before the error.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A raw stream went on past its size or past the destination's end.
    #[error("{name}: the image goes on past {limit} bytes, {}", if *exact { "the size it was given" } else { "the room in the destination" })]
    TooLong {
        /// Where the stream comes from.
        name: String,
        /// Where it had to end.
        limit: u64,
        /// The limit is the size it was given (`--size`, a bmap's
        /// ImageSize), not the destination's end.
        exact: bool,
    },
    /// A raw stream ended before the size it was given.
    #[error("{name}: the image ended after {got} bytes, but it was to be {want} bytes: cut short?")]
    Short {
        /// Where the stream comes from.
        name: String,
        /// Bytes it had.
        got: u64,
        /// Bytes it was to have.
        want: u64,
    },
    /// The stream could not be written.
    #[error("writing a qcow2 stream to {name}")]
    Encode {
        /// Where it went (`standard output`).
        name: String,
        /// Why.
        #[source]
        source: sparsekit_qcow2::WriteError,
    },
}

/// What a failed copy left at its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestState {
    /// Nothing was written to it (the copy failed before its first write,
    /// or it is a stream that has said so).
    Untouched,
    /// The copy created it, and it was removed.
    Removed(PathBuf),
    /// The copy created it; it was kept, incomplete, as `--keep-partial`
    /// asked.
    KeptPartial(PathBuf),
    /// The copy created it and could not remove it.
    NotRemoved(PathBuf, String),
    /// It existed, was truncated, and was partly rewritten.
    Rewritten(String),
    /// It existed and was partly updated in place.
    PartlyUpdated(String),
}

impl fmt::Display for DestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DestState::Untouched => Ok(()),
            DestState::Removed(p) => write!(
                f,
                "; {} was created by this copy and has been removed (--keep-partial keeps it)",
                p.display()
            ),
            DestState::KeptPartial(p) => {
                write!(
                    f,
                    "; {} is incomplete, kept as --keep-partial asks",
                    p.display()
                )
            }
            DestState::NotRemoved(p, why) => write!(
                f,
                "; {} is incomplete and could not be removed: {why}",
                p.display()
            ),
            DestState::Rewritten(name) => write!(f, "; {name} was truncated and partly rewritten"),
            DestState::PartlyUpdated(name) => write!(f, "; {name} was partly updated"),
        }
    }
}

/// A copy or verify that did not finish, and how far it got.
#[derive(Debug, thiserror::Error)]
#[error(
    "stopped with everything before source offset {done_before:#x} done ({bytes_written} bytes written){dest}"
)]
pub struct Failed {
    /// Every byte of the source before this offset was handled (copied,
    /// zeroed or checked); after it, some may not have been.
    pub done_before: u64,
    /// Bytes of data written to the destination.
    pub bytes_written: u64,
    /// What was left at the destination (boxed: a failure is rare, and
    /// every `Result` of the data path carries room for one).
    pub dest: Box<DestState>,
    /// Why it stopped.
    #[source]
    pub error: Error,
}

impl Failed {
    /// A failure at `done_before`, the destination's state not yet known.
    pub(crate) fn new(done_before: u64, bytes_written: u64, error: Error) -> Self {
        Self {
            done_before,
            bytes_written,
            dest: Box::new(DestState::Untouched),
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_says_what_became_of_the_destination() {
        let mut f = Failed::new(0x1000, 4096, Error::Interrupted);
        assert_eq!(
            f.to_string(),
            "stopped with everything before source offset 0x1000 done (4096 bytes written)"
        );
        *f.dest = DestState::Removed("d.raw".into());
        assert!(f.to_string().ends_with(
            "d.raw was created by this copy and has been removed (--keep-partial keeps it)"
        ));
        *f.dest = DestState::PartlyUpdated("d.raw".into());
        assert!(f.to_string().ends_with("; d.raw was partly updated"));
    }
}
