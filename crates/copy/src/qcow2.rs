//! qcow2 images (with their backing chains) as a [`Source`].

use std::ops::Range;
use std::path::Path;

use sparsekit_extent::ExtentIterExt;
use sparsekit_qcow2::{GuestOffset, Image, Subcluster};

use crate::source::{ExtentStream, RangeStream, Source, SourceError};

/// A qcow2 image as a virtual disk: its map walks the backing chain like
/// `qemu-img map`, its reads decompress and fall through to backing files.
/// Reads from several workers decompress in parallel.
#[derive(Debug)]
pub struct Qcow2Source {
    image: Image,
    name: String,
    /// The top image's data file again with O_DIRECT, where the file
    /// system has it.
    uncached: Option<sparsekit_fiemap::Uncached>,
}

impl Qcow2Source {
    /// Opens `path` and its backing chain read-only.
    pub fn open(path: &Path) -> Result<Self, sparsekit_qcow2::Error> {
        Ok(Self::new(Image::open(path)?, path))
    }

    /// Wraps an open image; `path` is used in messages.
    pub fn new(image: Image, path: &Path) -> Self {
        Self {
            uncached: sparsekit_fiemap::Uncached::open(image.top().data_file()),
            image,
            name: path.display().to_string(),
        }
    }

    /// The image.
    pub fn image(&self) -> &Image {
        &self.image
    }
}

impl Source for Qcow2Source {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.image.virtual_size()
    }

    fn extents(&self, range: Range<u64>) -> ExtentStream<'_> {
        let end = range.end.min(self.size());
        let start = range.start.min(end);
        match self.image.map(start..end) {
            Ok(map) => Box::new(
                map.extents()
                    .map(|r| r.map_err(SourceError::from))
                    .coalesce(),
            ),
            Err(e) => Box::new(std::iter::once(Err(SourceError::from(e)))),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
        self.image.read_at(buf, offset).map_err(SourceError::from)
    }

    fn reads_through_page_cache(&self) -> bool {
        true
    }

    /// Reads the top image's own uncompressed data clusters at the start
    /// of `buf` straight from its data file, one host-contiguous run at a
    /// time, up to the first thing that is not (holes, zeros, compressed
    /// clusters, backing files, cached pages): [`Source::read_at`] reads
    /// from there on.
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> usize {
        let Some(u) = &self.uncached else {
            return 0;
        };
        let top = self.image.top();
        let mut done = 0usize;
        while done < buf.len() {
            let want = (buf.len() - done) as u64;
            let Ok((Subcluster::Normal(host), len)) =
                top.subcluster_run(GuestOffset(offset + done as u64), want)
            else {
                break;
            };
            let end = done + len.min(want) as usize;
            if !u.read_at(&mut buf[done..end], host.0) {
                break;
            }
            done = end;
        }
        done
    }

    fn dirty(&self, bitmap: &str, range: Range<u64>) -> Result<RangeStream<'_>, SourceError> {
        let ranges = self.image.top().dirty_ranges(bitmap)?;
        Ok(Box::new(ranges.filter_map(move |r| match r {
            Ok(r) => {
                let clipped = r.start.max(range.start)..r.end.min(range.end);
                (!clipped.is_empty()).then_some(Ok(clipped))
            }
            Err(e) => Some(Err(SourceError::from(e))),
        })))
    }
}
