//! sparsekit's copy engine and the door to every endpoint: sources and
//! destinations opened from what a command line names, a plan that checks
//! everything before anything is written, and parallel execution in
//! bounded memory.
//!
//! - [`Spec`] reads a command-line argument: a path, `-`, or an NBD URI.
//! - [`Opened::open`] opens a source once (probing its format once): a
//!   raw file or block device ([`RawSource`]), a qcow2 image with its
//!   backing chain ([`Qcow2Source`]), an NBD export ([`NbdSource`]), or a
//!   qcow2 stream on standard input. [`Opened::map_rows`],
//!   [`Opened::qemu_map`] and [`Opened::status_map`] are what `map` prints.
//! - [`Destination::inspect`] learns what DEST is (kind, size, identity)
//!   without writing anything.
//! - [`Plan::new`] checks a [`Request`] against both (ranges, sizes, the
//!   same file, options that do not apply) and makes every choice: workers,
//!   chunk sizes, eviction, how DEST is opened. [`Plan::execute`] is the
//!   only way to create, truncate or write a destination; a failure says
//!   how far it got ([`Failed`]), and a destination the copy created is
//!   removed unless kept on purpose.
//! - Execution: the source's map, checked whole, is split into work items
//!   pulled by worker threads from one streaming planner, each with one
//!   buffer, so memory is about `(jobs + 1) ×` the larger chunk size
//!   whatever the image size. Data is copied with pread/pwrite through
//!   page-aligned buffers, all-zero blocks left as holes, or with
//!   `copy_file_range`.
//! - [`Progress`] is how the engine reports; a stop flag
//!   ([`stop_on_signals`]) stops it cleanly.
//!
//! ```
//! use sparsekit_copy::{Destination, NoProgress, OpenOptions, Opened, Plan, Request, Spec};
//! use std::os::unix::fs::FileExt;
//! use std::sync::atomic::AtomicBool;
//!
//! let dir = tempfile::tempdir()?;
//! let (src, dst) = (dir.path().join("a.raw"), dir.path().join("b.raw"));
//! let f = std::fs::File::create(&src)?;
//! f.set_len(8 << 20)?;
//! f.write_all_at(b"hello", 1 << 20)?;
//!
//! let source = Opened::open(&Spec::Path(src.clone()), &OpenOptions::default())?;
//! let dest = Destination::inspect(&Spec::Path(dst.clone()))?;
//! let plan = Plan::new(source, dest, &Request::default())?;
//! let report = plan.execute(&NoProgress, &AtomicBool::new(false))?;
//! assert_eq!(report.stats.data_written, 4096);
//! assert_eq!(std::fs::read(&dst)?, std::fs::read(&src)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod bmap;
mod compressed;
mod copy;
mod dest;
mod endpoint;
mod error;
mod evict;
mod executor;
pub mod map;
mod nbd;
mod nbd_sink;
pub mod plan;
mod progress;
mod qcow2;
mod raw_stream;
mod sink;
mod source;
mod stream;
mod sys;
mod verify;

pub use compressed::Compression;
pub use dest::{DestKind, DestOptions, Destination};
pub use endpoint::{
    FileId, Format, OpenOptions, Opened, Purpose, Role, Spec, StreamSource, open_local,
};
pub use error::{DestState, Error, Failed, OpenError, PlanError, StreamError};
pub use evict::{
    DirtyThresholds, EVICT_MIN_WRITE, EVICT_SPAN, EVICT_WINDOW, Evict, PACE_WINDOW, SLOW_PACE,
    dirty_thresholds, evict_by_default,
};
pub use nbd::{NbdSource, StatusStream};
pub use plan::{
    COLD_CHUNK, CopyStats, DEFAULT_CHUNK, ExportStats, Method, NBD_CHUNK, Output, Plan, RAW_CHUNK,
    Report, Request, Settings, default_jobs,
};
pub use progress::{NoProgress, Progress};
pub use qcow2::Qcow2Source;
pub use sink::{DestMode, SPARSE_BLOCK, SPARSE_BLOCK_MAX, WRITE_PIECE, is_zero};
pub use source::{
    ExtentStream, NoBitmaps, RangeStream, RawReadError, RawSource, Source, SourceError,
};
pub use verify::verify;

/// Installs handlers so that SIGINT and SIGTERM raise the returned flag
/// instead of killing the process: a running [`Plan`] then stops its
/// workers cleanly and says how far it got.
pub fn stop_on_signals() -> std::io::Result<&'static std::sync::atomic::AtomicBool> {
    sys::stop_on_signals()
}
