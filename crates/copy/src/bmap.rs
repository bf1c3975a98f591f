//! Copies that write only what a bmap lists, checking each range's
//! checksum as its bytes go by: from a random-access source, ranges in
//! parallel ([`copy_ranges`]); from a raw stream, as the ranges pass
//! ([`StreamRanges`]).

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use sparsekit_bmap::{BlockRange, Bmap, Hasher};

use crate::error::{Error, Failed, PlanError};
use crate::plan::{CopyStats, Settings};
use crate::progress::Progress;
use crate::raw_stream::Select;
use crate::sink::{Sink, WriteCounts};
use crate::source::Source;
use crate::sys;

/// A bmap file, read and checked whole, and its name for messages.
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    pub(crate) bmap: Arc<Bmap>,
    pub(crate) name: String,
}

impl Listed {
    /// Reads and checks the bmap file `path` (its own checksum, every
    /// field and range).
    pub(crate) fn read(path: &Path) -> Result<Self, PlanError> {
        let text = std::fs::read(path).map_err(|source| PlanError::BmapRead {
            path: path.to_owned(),
            source,
        })?;
        let name = path.display().to_string();
        let bmap = Bmap::parse(&text, &name).map_err(|e| PlanError::Bmap(Box::new(e)))?;
        Ok(Self {
            bmap: Arc::new(bmap),
            name,
        })
    }

    /// The bytes of range `r`, clipped to the image.
    fn bytes(&self, r: &BlockRange) -> Range<u64> {
        r.bytes(self.bmap.image_size(), self.bmap.block_size())
    }

    /// Checks `hasher`'s result for range `r` against the bmap.
    fn verify(&self, r: &BlockRange, hasher: Option<Hasher>) -> Result<(), Error> {
        let Some(h) = hasher else { return Ok(()) };
        r.verify(&h.finish()).map_err(|source| {
            let bytes = self.bytes(r);
            Error::Checksum {
                bmap: self.name.clone(),
                start: bytes.start,
                end: bytes.end,
                source: Box::new(source),
            }
        })
    }
}

/// The hasher for range `r`, where the bmap gives it a checksum.
fn hasher(r: &BlockRange) -> Option<Hasher> {
    r.checksum.map(|d| Hasher::new(d.checksum_type()))
}

/// Starts of the ranges being copied, and the first failure.
type Progressing = (BTreeSet<u64>, Option<(u64, Error)>);

/// Copies the ranges `listed` names from `source` to `sink` (at the same
/// offsets), `settings.jobs` ranges at a time. Each range is read in
/// pieces of `settings.chunk_size` by one worker, hashed in order and
/// written as it goes; a range whose bytes do not match its checksum
/// stops the copy, naming it. What the bmap does not list is not touched.
pub(crate) fn copy_ranges(
    source: &dyn Source,
    sink: &Sink,
    listed: &Listed,
    settings: &Settings,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<CopyStats, Failed> {
    let ranges = listed.bmap.ranges();
    progress.start(listed.bmap.mapped_bytes());
    let sparse = sink.sparse_block(settings.sparse_block);
    let counts = WriteCounts::default();
    let next = AtomicUsize::new(0);
    let state: Mutex<Progressing> = Mutex::default();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let fail = |at: u64, e: Error| {
        let mut g = lock();
        if g.1.as_ref().is_none_or(|(o, _)| at < *o) {
            g.1 = Some((at, e));
        }
    };
    let copy_one = |r: &BlockRange, buf: &mut [u8]| -> Result<(), (u64, Error)> {
        let bytes = listed.bytes(r);
        let mut h = hasher(r);
        let mut at = bytes.start;
        while at < bytes.end {
            let n = (bytes.end - at).min(buf.len() as u64) as usize;
            let piece = &mut buf[..n];
            source
                .read_at(piece, at)
                .map_err(|e| (at, Error::Source(e)))?;
            if let Some(h) = &mut h {
                h.update(piece);
            }
            sink.write_data(piece, at, sparse, &counts)
                .map_err(|e| (at, e))?;
            progress.advance(n as u64);
            at += n as u64;
        }
        listed.verify(r, h).map_err(|e| (bytes.start, e))
    };
    std::thread::scope(|s| {
        for _ in 0..settings.jobs.max(1) {
            s.spawn(|| {
                let mut buf = sys::AlignedBuf::new(settings.chunk_size);
                loop {
                    let i = next.fetch_add(1, Relaxed);
                    let Some(r) = ranges.get(i) else { return };
                    let start = listed.bytes(r).start;
                    {
                        let mut g = lock();
                        if g.1.is_some() {
                            return;
                        }
                        if stop.load(Relaxed) {
                            g.1 = Some((start, Error::Interrupted));
                            return;
                        }
                        g.0.insert(start);
                    }
                    let r = copy_one(r, buf.as_mut_slice());
                    lock().0.remove(&start);
                    if let Err((at, e)) = r {
                        fail(at, e);
                        return;
                    }
                }
            });
        }
    });
    let written = counts.written.load(Relaxed);
    let (in_flight, error) = state.into_inner().unwrap_or_else(|p| p.into_inner());
    if let Some((at, error)) = error {
        // Everything before the first range not finished is done.
        let unstarted = ranges
            .get(next.load(Relaxed))
            .map(|r| listed.bytes(r).start);
        let done = in_flight.into_iter().chain(unstarted).fold(at, u64::min);
        return Err(Failed::new(done, written, error));
    }
    let end = listed.bmap.image_size();
    sink.fit(end)
        .and_then(|()| sink.finish(settings.flush))
        .map_err(|e| Failed::new(end, written, e))?;
    let mapped = listed.bmap.mapped_bytes();
    Ok(CopyStats {
        total: end,
        data_read: mapped,
        data_written: written,
        zero_detected: counts.zero_detected.load(Relaxed),
        unallocated: end - mapped,
        zeroed: 0,
    })
}

/// The ranges of a bmap picked out of a raw stream as it passes, each
/// hashed in order and checked when its last byte has gone by.
pub(crate) struct StreamRanges<'a> {
    listed: &'a Listed,
    /// The range the stream is in or before.
    next: usize,
    hasher: Option<Hasher>,
}

impl<'a> StreamRanges<'a> {
    /// Picks `listed`'s ranges.
    pub(crate) fn new(listed: &'a Listed) -> Self {
        let hasher = listed.bmap.ranges().first().and_then(hasher);
        Self {
            listed,
            next: 0,
            hasher,
        }
    }
}

impl Select for StreamRanges<'_> {
    fn pieces(&mut self, offset: u64, chunk: &[u8]) -> Result<Vec<Range<usize>>, Error> {
        let end = offset + chunk.len() as u64;
        let ranges = self.listed.bmap.ranges();
        let mut pieces = Vec::new();
        while let Some(r) = ranges.get(self.next) {
            let bytes = self.listed.bytes(r);
            if bytes.start >= end {
                break;
            }
            let from = bytes.start.max(offset);
            let to = bytes.end.min(end);
            let piece = (from - offset) as usize..(to - offset) as usize;
            if let Some(h) = &mut self.hasher {
                h.update(&chunk[piece.clone()]);
            }
            pieces.push(piece);
            if bytes.end > end {
                break;
            }
            let h = self.hasher.take();
            self.listed.verify(r, h)?;
            self.next += 1;
            self.hasher = ranges.get(self.next).and_then(hasher);
        }
        Ok(pieces)
    }

    fn finish(&mut self, total: u64) -> Result<(), Error> {
        match self.listed.bmap.ranges().get(self.next) {
            None => Ok(()),
            Some(r) => Err(Error::Stream(crate::error::StreamError::Short {
                name: self.listed.name.clone(),
                got: total,
                want: self.listed.bytes(r).end,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparsekit_bmap::Creator;

    fn listed(image: &[u8], extents: Vec<Range<u64>>) -> Listed {
        let bmap = Creator::new(image.len() as u64, extents)
            .unwrap()
            .hash(|buf: &mut [u8], off: u64| {
                buf.copy_from_slice(&image[off as usize..off as usize + buf.len()]);
                Ok::<_, std::io::Error>(())
            })
            .unwrap();
        Listed {
            bmap: Arc::new(bmap),
            name: "t.bmap".into(),
        }
    }

    /// Feeds `image` to `StreamRanges` in chunks of `chunk` bytes; returns
    /// the image offsets picked, or the first error.
    fn pick(l: &Listed, image: &[u8], chunk: usize) -> Result<Vec<Range<u64>>, Error> {
        let mut sel = StreamRanges::new(l);
        let mut got: Vec<Range<u64>> = Vec::new();
        for (i, c) in image.chunks(chunk).enumerate() {
            let off = (i * chunk) as u64;
            for p in sel.pieces(off, c)? {
                let r = off + p.start as u64..off + p.end as u64;
                match got.last_mut() {
                    Some(last) if last.end == r.start => last.end = r.end,
                    _ => got.push(r),
                }
            }
        }
        sel.finish(image.len() as u64)?;
        Ok(got)
    }

    #[test]
    fn a_stream_gives_exactly_the_listed_ranges_whatever_its_chunks() {
        let mut image = vec![0u8; 50_000];
        image[5000..9000].fill(1);
        image[20_000..20_001].fill(2);
        image[49_000..].fill(3);
        let l = listed(&image, vec![5000..9000, 20_000..20_001, 49_000..50_000]);
        let want = vec![4096..12288, 16384..20480, 45056..50000];
        for chunk in [1, 100, 4096, 5000, 65536] {
            assert_eq!(pick(&l, &image, chunk).unwrap(), want, "chunk {chunk}");
        }
    }

    #[test]
    fn a_changed_byte_is_named_by_its_range() {
        let mut image = vec![0u8; 50_000];
        image[20_000] = 2;
        let l = listed(&image, std::iter::once(20_000..20_001).collect());
        image[17_000] = 9;
        for chunk in [512, 65536] {
            let e = pick(&l, &image, chunk).unwrap_err().to_string();
            assert!(e.contains("t.bmap") && e.contains("0x4000..0x5000"), "{e}");
        }
    }

    #[test]
    fn a_stream_that_ends_inside_a_range_is_short() {
        let mut image = vec![1u8; 50_000];
        let l = listed(&image, std::iter::once(0..50_000).collect());
        image.truncate(30_000);
        let mut sel = StreamRanges::new(&l);
        sel.pieces(0, &image).unwrap();
        assert!(sel.finish(30_000).is_err());
    }
}
