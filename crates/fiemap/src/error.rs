//! The crate's error type.

use std::io;
use std::path::PathBuf;

use crate::lock;

/// Errors of this crate. Each names the file; those of mapping name the
/// offset at which the kernel call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened or examined.
    #[error("{}: {what}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// What was being done (`opening`, `fstat`).
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The path names something that has no map (a directory, a FIFO, a
    /// socket, a character device).
    #[error("{}: is a {kind}, not a regular file or block device", path.display())]
    NotMappable {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// `BLKGETSIZE64` failed on a block device.
    #[error("{}: BLKGETSIZE64 (block device size)", path.display())]
    BlockDeviceSize {
        /// The device.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A FIEMAP or lseek call failed while mapping.
    #[error("{}: {call} at offset {offset:#x}", path.display())]
    Map {
        /// The file.
        path: PathBuf,
        /// The failing call (`FIEMAP`, `SEEK_DATA`, `SEEK_HOLE`).
        call: &'static str,
        /// Where the call started.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file changed size while it was being mapped: the map would
    /// describe a file that no longer exists.
    #[error("{}: changed size while being mapped (was {was} bytes, now {now})", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
        /// Size when opened.
        was: u64,
        /// Size at the end of the map.
        now: u64,
    },
    /// The kernel answered in a way that would make mapping loop forever or
    /// go backwards.
    #[error("{}: {call} made no progress at offset {offset:#x} (answered {answer:#x})", path.display())]
    NoProgress {
        /// The file.
        path: PathBuf,
        /// The call.
        call: &'static str,
        /// Where the call started.
        offset: u64,
        /// What it answered.
        answer: u64,
    },
    /// Another user's image locks refuse the [`lock::Profile`] asked for:
    /// qemu, qemu-nbd or qemu-img has the file open.
    #[error("{}: in use by another process: {conflict}", path.display())]
    InUse {
        /// The file.
        path: PathBuf,
        /// Which permission, in qemu's words.
        conflict: lock::Conflict,
    },
    /// A lock call failed for another reason than a conflict (a file
    /// system without working locks answers ENOLCK).
    #[error("{}: {call} on lock byte {byte}", path.display())]
    Lock {
        /// The file.
        path: PathBuf,
        /// `F_OFD_SETLK` or `F_OFD_GETLK`.
        call: &'static str,
        /// The lock byte.
        byte: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
