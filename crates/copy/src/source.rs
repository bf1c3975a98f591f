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

    /// Fills the start of `buf` with the bytes at `offset` straight from
    /// the disk, bypassing the page cache, where the source can and the
    /// cache holds none of them ([`sparsekit_fiemap::Uncached`]). Returns
    /// how many bytes it read (0 to `buf.len()`); the caller reads the rest
    /// with [`Source::read_at`], which reports any error. By default it
    /// reads none.
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> usize {
        let _ = (buf, offset);
        0
    }

    /// Whether reads come through this machine's page cache (a file, a
    /// device, an image on them), so that cached data is best read in
    /// pieces, each written while still in the core's cache; a remote
    /// source (NBD) reads an item whole, its requests in flight together.
    fn reads_through_page_cache(&self) -> bool {
        false
    }

    /// How many data reads the source serves best at once, when it has a
    /// limit (`None`: as many as there are workers): an NBD source, one
    /// per connection.
    fn max_reads(&self) -> Option<usize> {
        None
    }

    /// Bytes of data in `range`: what a copy of it reads and writes. The
    /// count may stop once it passes `limit` (a copy asks whether it will
    /// write more than some threshold, not how much), and is `None` when
    /// the source cannot tell without reading the data or its map fails
    /// (the copy then reports the failure).
    ///
    /// By default it walks [`Source::extents`], stopping past `limit`.
    fn data_bytes(&self, range: Range<u64>, limit: u64) -> Option<u64> {
        count_data(self.extents(range), limit)
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

/// Sums the data extents of `extents`, stopping once past `limit`; `None`
/// at the first error.
pub(crate) fn count_data(extents: ExtentStream<'_>, limit: u64) -> Option<u64> {
    let mut data = 0u64;
    for e in extents {
        let e = e.ok()?;
        if e.kind == sparsekit_extent::Kind::Data {
            data = data.saturating_add(e.length);
            if data > limit {
                break;
            }
        }
    }
    Some(data)
}

/// A raw file or block device: its bytes are the disk.
#[derive(Debug)]
pub struct RawSource {
    mapper: Mapper,
    name: String,
    /// The file again with O_DIRECT, where the file system has it.
    uncached: Option<sparsekit_fiemap::Uncached>,
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
            uncached: sparsekit_fiemap::Uncached::open(mapper.file()),
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

    fn reads_through_page_cache(&self) -> bool {
        true
    }

    /// All of `buf` or nothing: one request, when the cache holds none of
    /// it.
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> usize {
        match &self.uncached {
            Some(u) if u.read_at(buf, offset) => buf.len(),
            _ => 0,
        }
    }

    /// A regular file's allocated blocks bound its data from above, and
    /// cost one fstat: when they are within `limit`, they are the answer.
    /// Otherwise (a preallocated file, a block device) the map is walked.
    fn data_bytes(&self, range: Range<u64>, limit: u64) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        if self.mapper.kind() == sparsekit_fiemap::FileKind::Regular {
            let allocated = self
                .mapper
                .file()
                .metadata()
                .ok()?
                .blocks()
                .saturating_mul(512);
            if allocated <= limit {
                return Some(allocated.min(range.end.saturating_sub(range.start)));
            }
        }
        count_data(self.extents(range), limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_raw_file_counts_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.raw");
        let f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        for at in [1u64 << 20, 9 << 20, 40 << 20] {
            f.write_all_at(&[7u8; 1 << 20], at).unwrap();
        }
        f.sync_all().unwrap();
        let src = RawSource::open(&path).unwrap();
        // Under the limit: the allocated blocks, a bound from above.
        let blocks = f.metadata().unwrap().blocks() * 512;
        assert!(blocks >= 3 << 20);
        assert_eq!(src.data_bytes(0..64 << 20, u64::MAX), Some(blocks));
        // Over it: the map, counted until past the limit.
        assert_eq!(src.data_bytes(0..64 << 20, 1 << 20), Some(2 << 20));
        assert_eq!(src.data_bytes(8 << 20..64 << 20, 0), Some(1 << 20));
        // A range shorter than the file's blocks.
        assert_eq!(src.data_bytes(0..4096, u64::MAX), Some(4096));
    }

    #[test]
    fn a_failing_map_counts_nothing() {
        let extents: ExtentStream<'_> = Box::new(
            [
                Ok(Extent::new(0, 10, sparsekit_extent::Kind::Data)),
                Err("broken".into()),
            ]
            .into_iter(),
        );
        assert_eq!(count_data(extents, u64::MAX), None);
    }
}
