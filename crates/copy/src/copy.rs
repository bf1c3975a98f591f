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
    let planner = Planner::new(source, range.clone(), settings.dest_offset, chunk, dirty);
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
        if done < buf.len() {
            let rest = &mut buf[done..];
            source
                .read_at(rest, item.src + done as u64)
                .map_err(Error::Source)?;
            write(rest, done)?;
        }
        Ok(())
    };
    let workers = Workers {
        jobs: settings.jobs,
        max_reads: source.max_reads(),
        buffer: settings.chunk_size,
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
