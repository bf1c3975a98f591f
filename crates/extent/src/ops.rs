//! Streaming adapters over maps: coalesce, clip, intersect.
//!
//! Every adapter consumes a fallible iterator of `Result<Extent, E>`, passes
//! the first error through and then stops, so a failure part-way through a
//! map is never mistaken for its end.

use std::ops::Range;

use crate::Extent;

/// Adapter methods for streams of extents.
pub trait ExtentIterExt<E>: Iterator<Item = Result<Extent, E>> + Sized {
    /// Merges neighbours that touch and have the same kind, and drops empty
    /// extents. See [`Coalesce`].
    fn coalesce(self) -> Coalesce<Self, E> {
        Coalesce {
            inner: self,
            pending: None,
            error: None,
            done: false,
        }
    }

    /// Restricts a sorted stream to `range`, cutting the extents that
    /// straddle its ends. See [`Clip`].
    fn clip(self, range: Range<u64>) -> Clip<Self> {
        Clip {
            inner: self,
            range,
            done: false,
        }
    }
}

impl<I, E> ExtentIterExt<E> for I where I: Iterator<Item = Result<Extent, E>> {}

/// Iterator returned by [`ExtentIterExt::coalesce`].
///
/// It holds back one extent at a time, so memory stays constant however long
/// the stream is. When the inner stream fails, the extent held back is
/// yielded first, then the error, then nothing.
#[derive(Debug)]
pub struct Coalesce<I, E> {
    inner: I,
    pending: Option<Extent>,
    error: Option<E>,
    done: bool,
}

impl<I, E> Iterator for Coalesce<I, E>
where
    I: Iterator<Item = Result<Extent, E>>,
{
    type Item = Result<Extent, E>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.error.take() {
            return Some(Err(e));
        }
        if self.done {
            return None;
        }
        loop {
            match self.inner.next() {
                None => {
                    self.done = true;
                    return self.pending.take().map(Ok);
                }
                Some(Err(e)) => {
                    self.done = true;
                    return match self.pending.take() {
                        Some(p) => {
                            self.error = Some(e);
                            Some(Ok(p))
                        }
                        None => Some(Err(e)),
                    };
                }
                Some(Ok(x)) if x.length == 0 => continue,
                Some(Ok(x)) => match &mut self.pending {
                    Some(p) if p.kind == x.kind && p.end() == x.offset => {
                        p.length += x.length;
                    }
                    Some(p) => {
                        let out = *p;
                        *p = x;
                        return Some(Ok(out));
                    }
                    None => self.pending = Some(x),
                },
            }
        }
    }
}

/// Iterator returned by [`ExtentIterExt::clip`].
///
/// The input must be sorted. Once an extent at or past the end of the range
/// arrives the adapter stops without pulling more from the inner stream.
#[derive(Debug)]
pub struct Clip<I> {
    inner: I,
    range: Range<u64>,
    done: bool,
}

impl<I, E> Iterator for Clip<I>
where
    I: Iterator<Item = Result<Extent, E>>,
{
    type Item = Result<Extent, E>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            match self.inner.next() {
                None => self.done = true,
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Some(Ok(x)) => {
                    if x.offset >= self.range.end {
                        self.done = true;
                    } else if let Some(c) = x.clip_to(&self.range) {
                        if c.end() >= self.range.end {
                            self.done = true;
                        }
                        return Some(Ok(c));
                    }
                }
            }
        }
        None
    }
}

/// The parts of `map` that lie inside `ranges`, with the kinds of `map`.
///
/// Both inputs must be sorted; `ranges` must not overlap. This is the view
/// an incremental backup copies: with `ranges` the dirty ranges of a bitmap
/// and `map` the allocation map, [`Kind::Data`](crate::Kind::Data) pieces
/// are copied and the others zeroed; what lies outside `ranges` is not
/// yielded at all.
///
/// ```
/// use sparsekit_extent::{Extent, Kind, intersect};
/// let map = [Extent::new(0, 100, Kind::Data), Extent::new(100, 100, Kind::Hole)];
/// let dirty = [50..150];
/// let out: Vec<_> = intersect(
///     map.into_iter().map(Ok::<_, ()>),
///     dirty.into_iter().map(Ok),
/// )
/// .collect::<Result<_, _>>()
/// .unwrap();
/// assert_eq!(out, [Extent::new(50, 50, Kind::Data), Extent::new(100, 50, Kind::Hole)]);
/// ```
pub fn intersect<M, R, E>(map: M, ranges: R) -> Intersect<M, R>
where
    M: Iterator<Item = Result<Extent, E>>,
    R: Iterator<Item = Result<Range<u64>, E>>,
{
    Intersect {
        map,
        ranges,
        extent: None,
        range: None,
        done: false,
    }
}

/// Iterator returned by [`intersect`].
#[derive(Debug)]
pub struct Intersect<M, R> {
    map: M,
    ranges: R,
    extent: Option<Extent>,
    range: Option<Range<u64>>,
    done: bool,
}

impl<M, R, E> Iterator for Intersect<M, R>
where
    M: Iterator<Item = Result<Extent, E>>,
    R: Iterator<Item = Result<Range<u64>, E>>,
{
    type Item = Result<Extent, E>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let extent = match self.extent {
                Some(e) => e,
                None => match self.map.next() {
                    None => break,
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    Some(Ok(e)) => {
                        self.extent = Some(e);
                        e
                    }
                },
            };
            let range = match &self.range {
                Some(r) => r.clone(),
                None => match self.ranges.next() {
                    None => break,
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                    Some(Ok(r)) => {
                        self.range = Some(r.clone());
                        r
                    }
                },
            };
            if range.start >= range.end {
                self.range = None;
                continue;
            }
            let piece = extent.clip_to(&range);
            if extent.end() <= range.end {
                self.extent = None;
            }
            if range.end <= extent.end() {
                self.range = None;
            }
            if let Some(p) = piece {
                return Some(Ok(p));
            }
        }
        self.done = true;
        None
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use proptest::prelude::*;

    use super::*;
    use crate::Kind;

    fn ok(v: &[Extent]) -> impl Iterator<Item = Result<Extent, Infallible>> + '_ {
        v.iter().copied().map(Ok)
    }

    fn collect<E: std::fmt::Debug>(i: impl Iterator<Item = Result<Extent, E>>) -> Vec<Extent> {
        i.collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn coalesce_merges_same_kind_neighbours_only() {
        let v = [
            Extent::new(0, 10, Kind::Data),
            Extent::new(10, 0, Kind::Hole),
            Extent::new(10, 10, Kind::Data),
            Extent::new(20, 10, Kind::Zero),
            Extent::new(30, 10, Kind::Hole),
            Extent::new(45, 5, Kind::Hole), // not touching: kept apart
        ];
        assert_eq!(
            collect(ok(&v).coalesce()),
            [
                Extent::new(0, 20, Kind::Data),
                Extent::new(20, 10, Kind::Zero),
                Extent::new(30, 10, Kind::Hole),
                Extent::new(45, 5, Kind::Hole),
            ]
        );
    }

    #[test]
    fn coalesce_yields_held_back_extent_before_error_then_stops() {
        let v: Vec<Result<Extent, &str>> = vec![
            Ok(Extent::new(0, 10, Kind::Data)),
            Ok(Extent::new(10, 10, Kind::Data)),
            Err("boom"),
            Ok(Extent::new(20, 10, Kind::Data)),
        ];
        let out: Vec<_> = v.into_iter().coalesce().collect();
        assert_eq!(out, [Ok(Extent::new(0, 20, Kind::Data)), Err("boom")]);
    }

    #[test]
    fn clip_cuts_both_ends_and_stops_early() {
        let v = [
            Extent::new(0, 10, Kind::Data),
            Extent::new(10, 10, Kind::Hole),
            Extent::new(20, 10, Kind::Data),
        ];
        assert_eq!(
            collect(ok(&v).clip(5..15)),
            [
                Extent::new(5, 5, Kind::Data),
                Extent::new(10, 5, Kind::Hole)
            ]
        );
        // Stops before pulling the item after the range end.
        let mut pulled = 0;
        let it = v.iter().copied().inspect(|_| pulled += 1).map(Ok::<_, ()>);
        assert_eq!(collect(it.clip(0..10)), [Extent::new(0, 10, Kind::Data)]);
        assert_eq!(pulled, 1);
    }

    #[test]
    fn clip_of_empty_range_is_empty() {
        let v = [Extent::new(0, 10, Kind::Data)];
        assert!(collect(ok(&v).clip(5..5)).is_empty());
    }

    #[test]
    fn intersect_dirty_and_allocated() {
        let map = [
            Extent::new(0, 100, Kind::Data),
            Extent::new(100, 100, Kind::Hole),
            Extent::new(200, 100, Kind::Zero),
        ];
        let dirty = [0..10, 90..110, 150..150, 190..250, 299..400];
        let out = collect(intersect(ok(&map), dirty.into_iter().map(Ok)));
        assert_eq!(
            out,
            [
                Extent::new(0, 10, Kind::Data),
                Extent::new(90, 10, Kind::Data),
                Extent::new(100, 10, Kind::Hole),
                Extent::new(190, 10, Kind::Hole),
                Extent::new(200, 50, Kind::Zero),
                Extent::new(299, 1, Kind::Zero),
            ]
        );
    }

    /// A random map of `0..size` made of `(length, kind)` pieces.
    fn map_strategy() -> impl Strategy<Value = Vec<Extent>> {
        prop::collection::vec(
            (
                1u64..5000,
                prop_oneof![Just(Kind::Data), Just(Kind::Zero), Just(Kind::Hole)],
            ),
            0..60,
        )
        .prop_map(|pieces| {
            let mut off = 0;
            pieces
                .into_iter()
                .map(|(len, kind)| {
                    let e = Extent::new(off, len, kind);
                    off += len;
                    e
                })
                .collect()
        })
    }

    /// Sorted, disjoint ranges below 300_000.
    fn ranges_strategy() -> impl Strategy<Value = Vec<Range<u64>>> {
        prop::collection::vec((0u64..8000, 0u64..8000), 0..40).prop_map(|gaps| {
            let mut off = 0;
            gaps.into_iter()
                .map(|(gap, len)| {
                    let r = off + gap..off + gap + len;
                    off = r.end;
                    r
                })
                .collect()
        })
    }

    fn kind_at(map: &[Extent], byte: u64) -> Option<Kind> {
        map.iter()
            .find(|e| e.range().contains(&byte))
            .map(|e| e.kind)
    }

    /// Every byte of `probe` a caller might ask about: each boundary and
    /// its neighbours.
    fn probes(maps: &[&[Extent]], ranges: &[Range<u64>]) -> Vec<u64> {
        let mut p: Vec<u64> = maps
            .iter()
            .flat_map(|m| m.iter().flat_map(|e| [e.offset, e.end()]))
            .chain(ranges.iter().flat_map(|r| [r.start, r.end]))
            .flat_map(|b| [b.saturating_sub(1), b, b + 1])
            .collect();
        p.sort_unstable();
        p.dedup();
        p
    }

    proptest! {
        #[test]
        fn coalesce_keeps_every_byte_and_leaves_no_mergeable_pair(map in map_strategy()) {
            let merged = collect(ok(&map).coalesce());
            for w in merged.windows(2) {
                prop_assert!(w[0].end() == w[1].offset && w[0].kind != w[1].kind);
            }
            for b in probes(&[&map, &merged], &[]) {
                prop_assert_eq!(kind_at(&map, b), kind_at(&merged, b));
            }
            // Idempotent.
            prop_assert_eq!(collect(ok(&merged).coalesce()), merged.clone());
        }

        #[test]
        fn clip_equals_bytewise_restriction(map in map_strategy(), a in 0u64..200_000, len in 0u64..100_000) {
            let range = a..a + len;
            let clipped = collect(ok(&map).clip(range.clone()));
            let covered = map.last().map_or(0, |e| e.end());
            let expect = range.start.min(covered)..range.end.min(covered);
            if expect.is_empty() {
                prop_assert!(clipped.is_empty());
            } else {
                crate::check_map(&clipped, expect).unwrap();
            }
            for b in probes(&[&map, &clipped], std::slice::from_ref(&range)) {
                let want = if range.contains(&b) { kind_at(&map, b) } else { None };
                prop_assert_eq!(kind_at(&clipped, b), want);
            }
        }

        #[test]
        fn intersect_equals_bytewise_and(map in map_strategy(), ranges in ranges_strategy()) {
            let out = collect(intersect(ok(&map), ranges.iter().cloned().map(Ok)));
            for w in out.windows(2) {
                prop_assert!(w[0].end() <= w[1].offset);
            }
            for b in probes(&[&map, &out], &ranges) {
                let inside = ranges.iter().any(|r| r.contains(&b));
                let want = if inside { kind_at(&map, b) } else { None };
                prop_assert_eq!(kind_at(&out, b), want);
            }
        }

        #[test]
        fn coalesce_after_clip_equals_clip_after_coalesce(map in map_strategy(), a in 0u64..100_000, len in 0u64..100_000) {
            let r = a..a + len;
            let x = collect(ok(&map).clip(r.clone()).coalesce());
            let y = collect(ok(&map).coalesce().clip(r));
            prop_assert_eq!(x, y);
        }
    }
}
