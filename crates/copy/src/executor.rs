//! Parallel execution: a source's map (checked whole, maybe intersected
//! with dirty ranges) split into work items, handed out to worker threads
//! that pull from one streaming planner, each with its own buffer.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex};

use sparsekit_extent::{Extent, ExtentIterExt, Kind, MapChecker, intersect};

use crate::error::{Error, Failed};
use crate::progress::Progress;
use crate::source::{ExtentStream, RangeStream, Source};
use crate::sys;

/// Zero and hole ranges are split at this size, so that a stop request is
/// noticed between BLKZEROOUT calls.
const ZERO_CHUNK: u64 = 1 << 30;

/// One unit of work: `len` bytes at source offset `src`, destination offset
/// `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Item {
    pub(crate) src: u64,
    pub(crate) dst: u64,
    pub(crate) len: u64,
    pub(crate) kind: Kind,
}

/// A source's map checked to be whole: sorted, gap-free, covering exactly
/// the range asked for; a map that is not is an error, never a shorter copy.
struct Checked<'a> {
    extents: ExtentStream<'a>,
    source_name: &'a str,
    checker: MapChecker,
    done: bool,
}

impl Iterator for Checked<'_> {
    type Item = Result<Extent, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let not_whole = |source| Error::MapNotWhole {
            source_name: self.source_name.into(),
            source,
        };
        match self.extents.next() {
            None => {
                self.done = true;
                self.checker.finish().err().map(|e| Err(not_whole(e)))
            }
            Some(Err(e)) => {
                self.done = true;
                Some(Err(Error::Source(e)))
            }
            Some(Ok(e)) => match self.checker.push(&e) {
                Ok(()) => Some(Ok(e)),
                Err(err) => {
                    self.done = true;
                    Some(Err(not_whole(err)))
                }
            },
        }
    }
}

/// Splits a source's map (or its dirty part) into [`Item`]s.
pub(crate) struct Planner<'a> {
    extents: Box<dyn Iterator<Item = Result<Extent, Error>> + Send + 'a>,
    /// Destination offset minus source offset.
    shift: i128,
    chunk: u64,
    /// Item size while the workers find the data uncached, and where they
    /// say so ([`Planner::cold_items`]).
    cold: Option<(&'a AtomicBool, u64)>,
    current: Option<Extent>,
    /// Everything before this source offset has been handed out.
    handed_out: u64,
    done: bool,
}

impl<'a> Planner<'a> {
    /// Plans `range` of `source` to land at `dest_offset`, data in items of
    /// at most `chunk` bytes; with `dirty`, only the parts of the map inside
    /// those ranges.
    pub(crate) fn new(
        source: &'a dyn Source,
        range: Range<u64>,
        dest_offset: u64,
        chunk: u64,
        dirty: Option<RangeStream<'a>>,
    ) -> Self {
        let checked = Checked {
            extents: Box::new(source.extents(range.clone()).coalesce()),
            source_name: source.name(),
            checker: MapChecker::new(range.clone()),
            done: false,
        };
        let extents: Box<dyn Iterator<Item = Result<Extent, Error>> + Send + 'a> = match dirty {
            None => Box::new(checked),
            Some(d) => Box::new(intersect(checked, d.map(|r| r.map_err(Error::Source)))),
        };
        Self {
            extents,
            shift: dest_offset as i128 - range.start as i128,
            chunk,
            cold: None,
            current: None,
            handed_out: range.start,
            done: false,
        }
    }

    /// Hands out data items of `size` bytes instead while `cold` is set:
    /// the workers set it when the page cache held none of their last
    /// item, and clear it when it held some.
    pub(crate) fn cold_items(mut self, cold: &'a AtomicBool, size: u64) -> Self {
        self.cold = Some((cold, size));
        self
    }

    /// The source offset before which every item has been handed out.
    fn position(&self) -> u64 {
        self.current.map_or(self.handed_out, |e| e.offset)
    }

    /// The next item, or the error that ends the plan.
    pub(crate) fn next(&mut self) -> Option<Result<Item, Error>> {
        if self.done {
            return None;
        }
        if self.current.is_none() {
            match self.extents.next() {
                None => {
                    self.done = true;
                    return None;
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Some(Ok(e)) => self.current = Some(e),
            }
        }
        let e = self.current.take()?;
        let step = if e.kind == Kind::Data {
            match self.cold {
                Some((cold, size)) if cold.load(Relaxed) => size,
                _ => self.chunk,
            }
        } else {
            ZERO_CHUNK
        };
        let cut = (e.offset / step + 1).saturating_mul(step).min(e.end());
        if cut < e.end() {
            self.current = Some(Extent::new(cut, e.end() - cut, e.kind));
        }
        self.handed_out = cut;
        Some(Ok(Item {
            src: e.offset,
            dst: (e.offset as i128 + self.shift) as u64,
            len: cut - e.offset,
            kind: e.kind,
        }))
    }
}

/// What a worker does with one item, given its buffer.
pub(crate) type Work<'w> = dyn Fn(&Item, &mut [u8]) -> Result<(), Error> + Sync + 'w;

struct Shared<'a> {
    planner: Planner<'a>,
    in_flight: BTreeSet<u64>,
    /// Lowest source offset of an item that failed or was not done.
    not_done: Option<u64>,
    error: Option<Error>,
}

/// How many workers run, and how many of them may read data at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Workers {
    /// Worker threads (at least 1).
    pub(crate) jobs: usize,
    /// Data items worked on at once ([`Source::max_reads`]; `None`: as many
    /// as there are workers).
    pub(crate) max_reads: Option<usize>,
    /// Bytes of each worker's buffer.
    pub(crate) buffer: usize,
}

/// Runs `work` on every item of `planner` from `workers.jobs` threads, each
/// with its own buffer. Stops at the first error or when `stop` is raised;
/// the error says before which source offset everything was done.
pub(crate) fn run_parallel(
    planner: Planner<'_>,
    workers: Workers,
    stop: &AtomicBool,
    progress: &dyn Progress,
    written: &AtomicU64,
    work: &Work<'_>,
) -> Result<(), Failed> {
    let shared = Mutex::new(Shared {
        planner,
        in_flight: BTreeSet::new(),
        not_done: None,
        error: None,
    });
    let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
    // Permits for data items, when limited: free ones counted under the
    // mutex.
    let permits = workers
        .max_reads
        .map(|n| (Mutex::new(n.max(1)), Condvar::new()));
    std::thread::scope(|s| {
        for _ in 0..workers.jobs.max(1) {
            s.spawn(|| {
                let mut buf = sys::AlignedBuf::new(workers.buffer);
                loop {
                    let item = {
                        let mut sh = lock();
                        if sh.error.is_some() {
                            return;
                        }
                        if stop.load(Relaxed) {
                            sh.error = Some(Error::Interrupted);
                            return;
                        }
                        match sh.planner.next() {
                            None => return,
                            Some(Err(e)) => {
                                sh.error = Some(e);
                                return;
                            }
                            Some(Ok(item)) => {
                                sh.in_flight.insert(item.src);
                                item
                            }
                        }
                    };
                    let permit = permits.as_ref().filter(|_| item.kind == Kind::Data);
                    if let Some((free, freed)) = permit {
                        let mut free = free.lock().unwrap_or_else(|e| e.into_inner());
                        while *free == 0 {
                            free = freed.wait(free).unwrap_or_else(|e| e.into_inner());
                        }
                        *free -= 1;
                    }
                    let r = work(&item, buf.as_mut_slice());
                    if let Some((free, freed)) = permit {
                        *free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                        freed.notify_one();
                    }
                    let mut sh = lock();
                    sh.in_flight.remove(&item.src);
                    if let Err(e) = r {
                        sh.not_done = Some(sh.not_done.map_or(item.src, |n| n.min(item.src)));
                        if sh.error.is_none() {
                            sh.error = Some(e);
                        }
                        return;
                    }
                    drop(sh);
                    progress.advance(item.len);
                }
            });
        }
    });
    let sh = shared.into_inner().unwrap_or_else(|e| e.into_inner());
    match sh.error {
        None => Ok(()),
        Some(error) => {
            let pos = sh.planner.position();
            Err(Failed::new(
                sh.not_done.map_or(pos, |n| n.min(pos)),
                written.load(Relaxed),
                error,
            ))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::source::SourceError;
    use sparsekit_extent::MapError;

    /// A source over a fixed map, for planner tests.
    pub(crate) struct MapSource(pub(crate) Vec<Extent>, pub(crate) u64);

    impl Source for MapSource {
        fn name(&self) -> &str {
            "test"
        }
        fn size(&self) -> u64 {
            self.1
        }
        fn extents(&self, range: Range<u64>) -> ExtentStream<'_> {
            Box::new(self.0.clone().into_iter().map(Ok).clip(range))
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> Result<(), SourceError> {
            Ok(())
        }
    }

    fn plan(
        src: &MapSource,
        range: Range<u64>,
        dest_offset: u64,
        chunk: u64,
    ) -> Result<Vec<Item>, Error> {
        let mut p = Planner::new(src, range, dest_offset, chunk, None);
        std::iter::from_fn(|| p.next()).collect()
    }

    #[test]
    fn planner_splits_data_at_chunk_boundaries_and_shifts() {
        let src = MapSource(
            vec![
                Extent::new(0, 100, Kind::Hole),
                Extent::new(100, 250, Kind::Data),
                Extent::new(350, 50, Kind::Zero),
            ],
            400,
        );
        let items = plan(&src, 50..400, 1000, 128).unwrap();
        let got: Vec<(u64, u64, u64, Kind)> = items
            .iter()
            .map(|i| (i.src, i.dst, i.len, i.kind))
            .collect();
        assert_eq!(
            got,
            [
                (50, 1000, 50, Kind::Hole),
                (100, 1050, 28, Kind::Data),
                (128, 1078, 128, Kind::Data),
                (256, 1206, 94, Kind::Data),
                (350, 1300, 50, Kind::Zero),
            ]
        );
    }

    #[test]
    fn planner_hands_out_cold_items_while_the_workers_say_so() {
        let src = MapSource(
            vec![
                Extent::new(0, 1000, Kind::Data),
                Extent::new(1000, 24, Kind::Hole),
            ],
            1024,
        );
        let cold = AtomicBool::new(true);
        let mut p = Planner::new(&src, 0..1024, 0, 100, None).cold_items(&cold, 400);
        let mut next = || p.next().unwrap().unwrap();
        let i = next();
        assert_eq!((i.src, i.len), (0, 400));
        cold.store(false, Relaxed);
        // Cut at the small size's boundaries from where the planner is.
        let got: Vec<(u64, u64)> = (0..3).map(|_| next()).map(|i| (i.src, i.len)).collect();
        assert_eq!(got, [(400, 100), (500, 100), (600, 100)]);
        cold.store(true, Relaxed);
        let i = next();
        assert_eq!((i.src, i.len, i.kind), (700, 100, Kind::Data));
        let i = next();
        assert_eq!((i.src, i.len, i.kind), (800, 200, Kind::Data));
        assert_eq!(next().kind, Kind::Hole);
        assert!(p.next().is_none());
    }

    #[test]
    fn planner_refuses_a_map_with_a_gap() {
        let src = MapSource(
            vec![
                Extent::new(0, 100, Kind::Data),
                Extent::new(150, 50, Kind::Data),
            ],
            200,
        );
        let err = plan(&src, 0..200, 0, 64).unwrap_err();
        assert!(
            matches!(
                err,
                Error::MapNotWhole {
                    source: MapError::Gap {
                        expected: 100,
                        offset: 150
                    },
                    ..
                }
            ),
            "{err:?}"
        );
        let short = MapSource(vec![Extent::new(0, 100, Kind::Data)], 200);
        assert!(matches!(
            plan(&short, 0..200, 0, 64).unwrap_err(),
            Error::MapNotWhole { .. }
        ));
    }

    #[test]
    fn a_failed_item_bounds_how_far_the_run_got() {
        let src = MapSource(vec![Extent::new(0, 1 << 20, Kind::Data)], 1 << 20);
        let planner = Planner::new(&src, 0..1 << 20, 0, 4096, None);
        let work = |item: &Item, _: &mut [u8]| {
            if item.src == 40960 {
                Err(Error::Interrupted)
            } else {
                Ok(())
            }
        };
        let workers = Workers {
            jobs: 3,
            max_reads: Some(2),
            buffer: 4096,
        };
        let none = AtomicU64::new(0);
        let e = run_parallel(
            planner,
            workers,
            &AtomicBool::new(false),
            &crate::progress::NoProgress,
            &none,
            &work,
        )
        .unwrap_err();
        assert_eq!(e.done_before, 40960);
        assert!(matches!(e.error, Error::Interrupted));
    }
}
