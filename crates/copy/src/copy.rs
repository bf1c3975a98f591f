//! The data path of a copy from a random-access source: each work item's
//! data read (from the page cache in pieces, from the disk whole, or with
//! O_DIRECT where the cache holds none of it) and written, zero items
//! zeroed or left as holes.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use crate::error::{Error, Failed};
use crate::executor::{Item, Planner, Workers, run_parallel};
use crate::plan::{CopyStats, Method, READ_PIECE, Settings};
use crate::progress::Progress;
use crate::sink::{Sink, WriteCounts};
use crate::source::Source;
use crate::sys;

/// Copies `settings.range` of `source` to `sink`.
pub(crate) fn copy(
    source: &dyn Source,
    sink: &Sink,
    settings: &Settings,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<CopyStats, Failed> {
    let range = settings.range.clone();
    let dirty = match &settings.bitmap {
        None => None,
        Some(b) => Some(
            source
                .dirty(b, range.clone())
                .map_err(|e| Failed::new(range.start, 0, Error::Source(e)))?,
        ),
    };
    progress.start(range.end - range.start);
    let chunk = settings.chunk_size as u64;
    // The first item is read as if cold: a large item of cached data
    // costs little, a small one from the disk a request.
    let cold = AtomicBool::new(true);
    let planner = Planner::new(source, range.clone(), settings.dest_offset, chunk, dirty)
        .cold_items(&cold, settings.cold_chunk_size as u64);
    let raw = source.raw_file();
    // Zero detection pays only where leaving a write out leaves zeros behind.
    let sparse = sink.sparse_block(settings.sparse_block);
    let regular = sink.regular_file();
    let use_cfr = AtomicBool::new(match settings.method {
        Method::Auto => sparse == 0 && raw.is_some() && regular.is_some(),
        Method::CopyFileRange => raw.is_some() && regular.is_some(),
        Method::ReadWrite => false,
    });
    // Pieces pay where a write is a copy into the page cache; an NBD
    // write of a whole item goes out as several requests in flight.
    let pieces = matches!(sink, Sink::File(_));
    let counts = WriteCounts::default();
    let data_read = AtomicU64::new(0);
    let unallocated = AtomicU64::new(0);
    // Cleared where the file system cannot read without waiting.
    let nowait = AtomicBool::new(true);

    let work = |item: &Item, buf: &mut [u8]| -> Result<(), Error> {
        if item.kind.reads_as_zero() {
            unallocated.fetch_add(item.len, Relaxed);
            return sink.zero(item.dst, item.len);
        }
        data_read.fetch_add(item.len, Relaxed);
        if use_cfr.load(Relaxed)
            && let (Some(f), Some(dst)) = (raw, regular)
        {
            if dst.copy_file_range(f, source.name(), item.src, item.len, item.dst)? {
                // The kernel reads as it sees fit: items stay small.
                cold.store(false, Relaxed);
                counts.written.fetch_add(item.len, Relaxed);
                return Ok(());
            }
            use_cfr.store(false, Relaxed);
        }
        let buf = &mut buf[..item.len as usize];
        let write =
            |data: &[u8], at: usize| sink.write_data(data, item.dst + at as u64, sparse, &counts);
        // What the page cache holds none of is read from the disk straight
        // into the buffer. What the cache holds goes piece by piece, each
        // written while it is still in the core's cache; from where it runs
        // out, the rest of the item is read in one request, which a disk
        // serves faster than several small ones.
        let mut done = source.read_uncached(buf, item.src);
        cold.store(done > 0, Relaxed);
        if done > 0 {
            write(&buf[..done], 0)?;
        }
        if let Some(f) = raw.filter(|_| pieces && nowait.load(Relaxed)) {
            while done < buf.len() {
                let end = (done + READ_PIECE).min(buf.len());
                let piece = &mut buf[done..end];
                match sys::pread_cached(f.as_fd(), piece, item.src + done as u64) {
                    Ok(n) if n == piece.len() => write(piece, done)?,
                    Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL) => {
                        nowait.store(false, Relaxed);
                        break;
                    }
                    _ => break,
                }
                done = end;
            }
        }
        // From a raw file the rest goes to the disk in one request (its
        // readahead is the kernel's); an image's reads, which decompress
        // and fall through to backing files, go piece by piece as well.
        let step = if raw.is_none() && pieces && source.reads_through_page_cache() {
            READ_PIECE
        } else {
            buf.len()
        };
        while done < buf.len() {
            let end = (done + step).min(buf.len());
            let rest = &mut buf[done..end];
            source
                .read_at(rest, item.src + done as u64)
                .map_err(Error::Source)?;
            write(rest, done)?;
            done = end;
        }
        Ok(())
    };
    let workers = Workers {
        jobs: settings.jobs,
        max_reads: source.max_reads(),
        buffer: settings.chunk_size.max(settings.cold_chunk_size),
    };
    run_parallel(planner, workers, stop, progress, &counts.written, &work)?;
    sink.finish(settings.flush)
        .map_err(|error| Failed::new(range.end, counts.written.load(Relaxed), error))?;
    Ok(CopyStats {
        total: range.end - range.start,
        data_read: data_read.load(Relaxed),
        data_written: counts.written.load(Relaxed),
        zero_detected: counts.zero_detected.load(Relaxed),
        unallocated: unallocated.load(Relaxed),
        zeroed: 0,
    })
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::sync::Mutex;

    use sparsekit_extent::{Extent, Kind};

    use super::*;
    use crate::dest::LocalDest;
    use crate::evict::Evict;
    use crate::sink::{DestMode, FileSink};
    use crate::source::{ExtentStream, SourceError};

    /// One data extent whose reads are recorded: uncached (straight from
    /// "the disk") when `cold`, else through the page cache.
    struct Disk {
        data: Vec<u8>,
        cold: bool,
        /// The length of every item, as offered to `read_uncached`.
        items: Mutex<Vec<usize>>,
        cached: Mutex<Vec<usize>>,
    }

    impl Source for Disk {
        fn name(&self) -> &str {
            "disk"
        }
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn extents(&self, range: Range<u64>) -> ExtentStream<'_> {
            let e = Extent::new(range.start, range.end - range.start, Kind::Data);
            Box::new(std::iter::once(Ok(e)))
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
            self.cached.lock().unwrap().push(buf.len());
            buf.copy_from_slice(&self.data[offset as usize..][..buf.len()]);
            Ok(())
        }
        fn reads_through_page_cache(&self) -> bool {
            true
        }
        fn read_uncached(&self, buf: &mut [u8], offset: u64) -> usize {
            self.items.lock().unwrap().push(buf.len());
            if !self.cold {
                return 0;
            }
            buf.copy_from_slice(&self.data[offset as usize..][..buf.len()]);
            buf.len()
        }
    }

    fn copy_disk(cold: bool) -> Disk {
        let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        let disk = Disk {
            data,
            cold,
            items: Mutex::default(),
            cached: Mutex::default(),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let dest = LocalDest {
            path: path.clone(),
            existing: None,
        };
        let file = FileSink::open(dest, disk.size(), DestMode::Replace, false, Evict::Never);
        let sink = Sink::File(file.unwrap());
        let settings = Settings {
            // One worker: the items come in order.
            jobs: 1,
            chunk_size: 256 << 10,
            cold_chunk_size: 4 << 20,
            sparse_block: 4096,
            method: Method::ReadWrite,
            range: 0..disk.size(),
            dest_offset: 0,
            flush: false,
            bitmap: None,
        };
        let stop = AtomicBool::new(false);
        copy(&disk, &sink, &settings, &crate::NoProgress, &stop).unwrap();
        assert!(std::fs::read(&path).unwrap() == disk.data, "copy differs");
        disk
    }

    #[test]
    fn uncached_data_goes_in_large_items_and_cached_data_in_small_ones() {
        let cold = copy_disk(true);
        assert_eq!(*cold.items.lock().unwrap(), [4 << 20; 4]);
        assert!(cold.cached.lock().unwrap().is_empty());
        // Warm: only the first item is large, and it is read in pieces.
        let warm = copy_disk(false);
        let items = warm.items.lock().unwrap();
        assert_eq!(items[0], 4 << 20);
        assert_eq!(items[1..], [256 << 10; 48]);
        assert_eq!(*warm.cached.lock().unwrap(), [256 << 10; 64]);
    }
}
