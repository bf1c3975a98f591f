//! What a copy reads from.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use sparsekit_extent::Extent;
use sparsekit_fiemap::Mapper;

/// The error a [`Source`] reports; each implementation carries its own
/// context (file, offset, field).
pub type SourceError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A stream of extents from a [`Source`].
pub type ExtentStream<'a> = Box<dyn Iterator<Item = Result<Extent, SourceError>> + Send + 'a>;

/// A stream of byte ranges (sorted, disjoint) from a [`Source`]: the dirty
/// ranges of a bitmap.
pub type RangeStream<'a> = Box<dyn Iterator<Item = Result<Range<u64>, SourceError>> + Send + 'a>;

/// A source without the dirty bitmap asked for.
#[derive(Debug, thiserror::Error)]
#[error("{name}: has no dirty bitmaps (only qcow2 images and NBD exports have)")]
pub struct NoBitmaps {
    /// The source.
    pub name: String,
}

/// A virtual disk that can say where its data is and read it.
///
/// Implementations must allow concurrent calls from several threads: the
/// executor reads from as many workers as it has.
pub trait Source: Send + Sync {
    /// The file, device or URI, for messages.
    fn name(&self) -> &str;

    /// Size of the virtual disk in bytes.
    fn size(&self) -> u64;

    /// The map of `range ∩ [0, size)`: sorted, gap-free, as a stream.
    fn extents(&self, range: Range<u64>) -> ExtentStream<'_>;

    /// Fills `buf` with the bytes at `offset`; `offset + buf.len()` is at
    /// most [`Source::size`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError>;

    /// The file whose bytes are the disk, when there is one (a raw file or
    /// device), so that `copy_file_range` can copy without a user-space
    /// buffer.
    fn raw_file(&self) -> Option<&File> {
        None
    }

    /// How many data reads the source serves best at once, when it has a
    /// limit (`None`: as many as there are workers): an NBD source, one
    /// per connection.
    fn max_reads(&self) -> Option<usize> {
        None
    }

    /// The ranges of `range` marked dirty in the persistent bitmap
    /// `bitmap` (for incremental copies).
    fn dirty(&self, bitmap: &str, range: Range<u64>) -> Result<RangeStream<'_>, SourceError> {
        let _ = (bitmap, range);
        Err(Box::new(NoBitmaps {
            name: self.name().to_owned(),
        }))
    }
}

/// A raw file or block device: its bytes are the disk.
#[derive(Debug)]
pub struct RawSource {
    mapper: Mapper,
    name: String,
}

impl RawSource {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<Self, sparsekit_fiemap::Error> {
        Ok(Self::new(Mapper::open(path)?))
    }

    /// Wraps an open mapper.
    pub fn new(mapper: Mapper) -> Self {
        Self {
            name: mapper.path().display().to_string(),
            mapper,
        }
    }

    /// The mapper, for the method and file kind.
    pub fn mapper(&self) -> &Mapper {
        &self.mapper
    }
}

/// A short read of a raw source: the file shrank while being copied.
#[derive(Debug, thiserror::Error)]
#[error("{name}: reading {len} bytes at offset {offset:#x}")]
pub struct RawReadError {
    /// The file.
    pub name: String,
    /// Where the read started.
    pub offset: u64,
    /// How much was asked for.
    pub len: usize,
    /// The cause; `UnexpectedEof` when the file is shorter than it was.
    #[source]
    pub source: io::Error,
}

impl Source for RawSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.mapper.size()
    }

    fn extents(&self, range: Range<u64>) -> ExtentStream<'_> {
        Box::new(
            self.mapper
                .extents(range)
                .map(|r| r.map_err(SourceError::from)),
        )
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
        self.mapper
            .file()
            .read_exact_at(buf, offset)
            .map_err(|source| {
                let source = if source.kind() == io::ErrorKind::UnexpectedEof {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file ended early: was it truncated during the copy?",
                    )
                } else {
                    source
                };
                Box::new(RawReadError {
                    name: self.name.clone(),
                    offset,
                    len: buf.len(),
                    source,
                }) as SourceError
            })
    }

    fn raw_file(&self) -> Option<&File> {
        Some(self.mapper.file())
    }
}
