//! Where the data of a local file or block device is.
//!
//! [`Mapper`] opens a regular file or block device read-only and yields its
//! map as a stream of [`Extent`](sparsekit_extent::Extent)s over any byte range ([`Mapper::extents`]),
//! coalesced and gap-free, without collecting it: a file with a million
//! extents is mapped in a few hundred kilobytes.
//!
//! How the map is learned ([`Method`]) is chosen when the file is opened,
//! from what the kernel answers, never by probing with temporary files:
//!
//! 1. [`Method::Fiemap`]: the `FS_IOC_FIEMAP` ioctl, with `FIEMAP_FLAG_SYNC`
//!    so that data still in the page cache is flushed and mapped (the old
//!    FIEMAP data-loss bug of cp and bmaptool came from mapping without it),
//!    and a large extent buffer so that few calls are needed. Extents
//!    flagged `UNWRITTEN` (fallocated, never written) read as zeros and are
//!    reported as [`Kind::Zero`](sparsekit_extent::Kind::Zero); gaps between
//!    extents are [`Kind::Hole`](sparsekit_extent::Kind::Hole).
//! 2. [`Method::SeekData`]: `lseek` with `SEEK_DATA`/`SEEK_HOLE`, when the
//!    file system has no FIEMAP (tmpfs, many network file systems). It sees
//!    the page cache, so unflushed data is found; it cannot tell unwritten
//!    extents from holes, which both read as zeros.
//! 3. [`Method::WholeFile`]: everything is data. Used for block devices
//!    (their size comes from `BLKGETSIZE64`) and file systems that support
//!    neither.
//!
//! Beside the map: [`Uncached`] reads what the page cache does not hold
//! straight from the disk, and [`lock`] takes qemu's image locks on a
//! file, so that an image in use by qemu is neither read while it changes
//! nor written.
//!
//! ```
//! use sparsekit_extent::{Extent, Kind};
//! use sparsekit_fiemap::Mapper;
//! use std::io::{Seek, SeekFrom, Write};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.raw");
//! let mut f = std::fs::File::create(&path)?;
//! f.set_len(1 << 20)?;
//! f.seek(SeekFrom::Start(64 << 10))?;
//! f.write_all(&[0xab; 4096])?;
//!
//! let map = Mapper::open(&path)?;
//! let extents = map.extents(0..map.size()).collect::<Result<Vec<_>, _>>()?;
//! sparsekit_extent::check_map(&extents, 0..1 << 20)?;
//! assert!(extents.contains(&Extent::new(64 << 10, 4096, Kind::Data)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cache;
mod error;
pub mod lock;
mod map;
mod sys;

pub use cache::{DIRECT_ALIGN, Uncached, drop_page_cache};
pub use error::{Error, Result};
pub use map::{Extents, FIEMAP_BATCH, FileKind, Mapper, Method};
