//! What `map` shows of an opened source: its description, its extents with
//! the detail each format has (host offset, backing depth), the entries
//! `qemu-img map --output=json` prints for it, and the status of any NBD
//! meta context or qcow2 dirty bitmap. Maps are produced on a thread of
//! their own, so that the kernel's mapping work (FIEMAP, reading tables,
//! network round trips) overlaps the formatting of what it found.

use std::ops::Range;
use std::sync::mpsc;

use sparsekit_extent::qemu::{MapEntry, Merge};
use sparsekit_extent::{Extent, ExtentIterExt, Kind};
use sparsekit_nbd::map::{BASE_ALLOCATION, QEMU_DIRTY_BITMAP, StatusExtent, qemu_img_map_entry};

use crate::endpoint::Opened;
use crate::source::{Source, SourceError};

/// Items per batch sent from a map's producer thread.
pub const BATCH: usize = 4096;
/// Batches in flight: memory is bounded by `DEPTH × BATCH` items.
pub const DEPTH: usize = 4;

/// One row of a map for people: an extent, and where its data lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row {
    /// The guest range and what it holds.
    pub extent: Extent,
    /// Host offset in the file of layer `depth` (qcow2 images only).
    pub host: Option<u64>,
    /// Layer of the backing chain that answers (0: the image itself).
    pub depth: u64,
    /// Stored compressed (qcow2 images only): the data has no host offset
    /// of its own, as in `qemu-img map`'s `compressed` field.
    pub compressed: bool,
}

/// What a source is, for the line above its map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Description {
    /// A raw file or block device.
    Raw {
        /// Regular file or block device.
        kind: sparsekit_fiemap::FileKind,
        /// Size in bytes.
        size: u64,
        /// How its map is learned.
        method: sparsekit_fiemap::Method,
    },
    /// A qcow2 image.
    Qcow2 {
        /// qcow2 version (2 or 3).
        version: u32,
        /// Virtual size in bytes.
        size: u64,
        /// Bytes per cluster.
        cluster_size: u64,
        /// Files below it in its backing chain.
        backing_depth: usize,
    },
    /// An NBD export.
    Nbd {
        /// Size in bytes.
        size: u64,
    },
    /// A qcow2 stream.
    Stream {
        /// Virtual size in bytes.
        size: u64,
    },
    /// A raw image read forward: raw bytes on standard input, or a
    /// compressed image.
    RawStream {
        /// How it is compressed.
        compression: Option<crate::Compression>,
    },
}

/// An error that stopped a map, and where it stopped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The map cannot be made of this source.
    #[error("{name}: {why}")]
    NotApplicable {
        /// The source.
        name: String,
        /// Why.
        why: &'static str,
    },
    /// The source failed; the map stopped at `offset`. The source is
    /// named unless its error does so already (most do).
    #[error("{}stopped mapping at offset {offset:#x}", unless_named(.name, .source))]
    Stopped {
        /// The source.
        name: String,
        /// Everything before this offset was mapped.
        offset: u64,
        /// Why.
        #[source]
        source: SourceError,
    },
}

/// `NAME: `, or nothing when `source`'s message starts with that already:
/// `map: error: disk.raw: stopped mapping at offset 0x0: disk.raw: FIEMAP`
/// said the name twice.
fn unless_named(name: &str, source: &SourceError) -> String {
    let prefix = format!("{name}: ");
    // qcow2's errors are the file's name with the cause behind it.
    let said = source.to_string();
    if said == name || said.starts_with(&prefix) {
        String::new()
    } else {
        prefix
    }
}

/// The range qemu-img maps for `--start-offset start --max-length length`
/// on a disk of `size` bytes.
pub fn clamp_range(start: u64, length: Option<u64>, size: u64) -> Range<u64> {
    let end = length.map_or(size, |l| start.saturating_add(l).min(size));
    start.min(end)..end
}

/// qemu's raw driver sees a file as a disk of whole 512-byte sectors: the
/// virtual size is the file size rounded up to 512, and the bytes past the
/// end of the file read as zeros (`qemu-img info` and `qemu-img map` say so,
/// and `qemu-img convert -O raw` writes them).
pub fn raw_virtual_size(file_size: u64) -> u64 {
    file_size.div_ceil(512).saturating_mul(512)
}

/// A stream of map items, produced on another thread.
pub type MapStream<'a, T> = dyn Iterator<Item = Result<T, SourceError>> + 'a;

impl Opened {
    /// What the source is.
    pub fn describe(&self) -> Description {
        match self {
            Opened::Raw(r) => Description::Raw {
                kind: r.mapper().kind(),
                size: r.size(),
                method: r.mapper().method(),
            },
            Opened::Qcow2(q) => {
                let img = q.image();
                Description::Qcow2 {
                    version: img.top().header().version,
                    size: img.virtual_size(),
                    cluster_size: img.top().cluster_size(),
                    backing_depth: img.backing_depth(),
                }
            }
            Opened::Nbd(n) => Description::Nbd { size: n.size() },
            Opened::Stream(s) => Description::Stream {
                size: s.decoder.virtual_size(),
            },
            Opened::RawStream(s) => Description::RawStream {
                compression: s.compression,
            },
        }
    }

    /// The disk's size as qemu-img sees it: a raw file's rounded up to
    /// whole sectors ([`raw_virtual_size`]).
    pub fn qemu_size(&self) -> u64 {
        match self {
            Opened::Raw(r) => raw_virtual_size(r.size()),
            other => other.size(),
        }
    }

    /// Calls `consume` with the rows of `range ∩ [0, size)`: neighbours of
    /// one kind merged (for qcow2, those qemu-img would merge), each with
    /// its host offset and depth. The stream stops after an error.
    pub fn map_rows<R>(
        &self,
        range: Range<u64>,
        consume: impl FnOnce(&mut MapStream<'_, Row>) -> R,
    ) -> R {
        let plain = |e: Extent| Row {
            extent: e,
            host: None,
            depth: 0,
            compressed: false,
        };
        match self {
            Opened::Raw(r) => prefetch(r.extents(range), |it| {
                consume(&mut it.map(|r| r.map(plain)))
            }),
            Opened::Qcow2(q) => prefetch(qcow2_entries(q, range), |it| {
                consume(&mut Merge::new(it).map(|r| {
                    r.map(|e| Row {
                        extent: e.to_extent(),
                        host: e.offset,
                        depth: e.depth,
                        compressed: e.compressed,
                    })
                }))
            }),
            Opened::Nbd(n) => {
                let extents = n
                    .status(BASE_ALLOCATION, range)
                    .map(|r| r.map(|e| e.to_extent()).map_err(SourceError::from))
                    .coalesce();
                prefetch(extents, |it| consume(&mut it.map(|r| r.map(plain))))
            }
            Opened::Stream(_) | Opened::RawStream(_) => {
                consume(&mut std::iter::once(Err(not_mappable())))
            }
        }
    }

    /// Calls `consume` with the entries `qemu-img map --output=json` prints
    /// for `range` of [`Opened::qemu_size`], neighbours that agree on every
    /// field merged. The stream stops after an error.
    pub fn qemu_map<R>(
        &self,
        range: Range<u64>,
        consume: impl FnOnce(&mut MapStream<'_, MapEntry>) -> R,
    ) -> R {
        match self {
            Opened::Raw(r) => {
                let size = r.size();
                let within = range.start.min(size)..range.end.min(size);
                prefetch(r.extents(within), |it| {
                    consume(&mut raw_entries(it, size, range))
                })
            }
            Opened::Qcow2(q) => {
                prefetch(qcow2_entries(q, range), |it| consume(&mut Merge::new(it)))
            }
            Opened::Nbd(n) => {
                let entries = n
                    .status(BASE_ALLOCATION, range)
                    .map(|r| r.map(|e| qemu_img_map_entry(&e)).map_err(SourceError::from));
                prefetch(entries, |it| consume(&mut Merge::new(it)))
            }
            Opened::Stream(_) | Opened::RawStream(_) => {
                consume(&mut std::iter::once(Err(not_mappable())))
            }
        }
    }

    /// The status of meta context `context` over `range`: any context an
    /// NBD server negotiated, or for a qcow2 image its persistent bitmap
    /// NAME as `qemu:dirty-bitmap:NAME`, read offline, exactly as
    /// `qemu-nbd -B NAME` exports it.
    pub fn status_map(
        &self,
        context: &str,
        range: Range<u64>,
    ) -> Result<Vec<StatusExtent>, MapError> {
        let stopped = |source| MapError::Stopped {
            name: self.name().to_owned(),
            offset: range.start,
            source,
        };
        match self {
            Opened::Nbd(n) => n
                .status(context, range.clone())
                .collect::<Result<_, _>>()
                .map_err(|e| stopped(e.into())),
            Opened::Qcow2(q) => {
                let Some(name) = context.strip_prefix(QEMU_DIRTY_BITMAP) else {
                    return Err(MapError::NotApplicable {
                        name: self.name().to_owned(),
                        why: "--context maps a meta context of an NBD export; this is a local file",
                    });
                };
                let dirty = q
                    .image()
                    .top()
                    .dirty_ranges(name)
                    .map_err(|e| stopped(e.into()))?;
                bitmap_extents(dirty, range.clone())
                    .collect::<Result<_, _>>()
                    .map_err(|e| stopped(e.into()))
            }
            Opened::Raw(_) => Err(MapError::NotApplicable {
                name: self.name().to_owned(),
                why: if context.starts_with(QEMU_DIRTY_BITMAP) {
                    "--bitmap reads a persistent bitmap of a qcow2 image; this is a raw file"
                } else {
                    "--context maps a meta context of an NBD export; this is a local file"
                },
            }),
            Opened::Stream(_) | Opened::RawStream(_) => Err(MapError::NotApplicable {
                name: self.name().to_owned(),
                why: NOT_MAPPABLE,
            }),
        }
    }
}

impl Opened {
    /// The source, where it has a map: not a stream.
    pub fn mappable(&self) -> Result<&dyn Source, MapError> {
        self.random_access().ok_or_else(|| MapError::NotApplicable {
            name: self.name().to_owned(),
            why: NOT_MAPPABLE,
        })
    }

    /// The bmap of the whole source, as `bmaptool create` makes it of a
    /// file: the 4096-byte blocks that touch allocated ranges (data, and
    /// allocated zeros such as unwritten extents, which bmaptool lists
    /// too), each range with the SHA-256 of its bytes, hashed in parallel
    /// on the rayon pool. The map is checked whole first.
    pub fn bmap(&self) -> Result<sparsekit_bmap::Bmap, MapError> {
        let src = self.mappable()?;
        let size = src.size();
        let stopped = |offset, source| MapError::Stopped {
            name: self.name().to_owned(),
            offset,
            source,
        };
        let mut checker = sparsekit_extent::MapChecker::new(0..size);
        let mut allocated = Vec::new();
        for e in src.extents(0..size).coalesce() {
            let e = e.map_err(|e| stopped(checker.position(), e))?;
            let at = e.offset;
            checker.push(&e).map_err(|err| stopped(at, Box::new(err)))?;
            if e.kind != Kind::Hole {
                allocated.push(e.range());
            }
        }
        checker
            .finish()
            .map_err(|err| stopped(size, Box::new(err)))?;
        let creator =
            sparsekit_bmap::Creator::new(size, allocated).map_err(|e| stopped(0, Box::new(e)))?;
        creator
            .hash(|buf: &mut [u8], offset: u64| src.read_at(buf, offset))
            .map_err(|e| stopped(e.offset, e.source))
    }
}

const NOT_MAPPABLE: &str = "a stream (standard input, or a compressed image) can only be read \
     forward and has no map; `-f raw` maps a compressed file's own bytes";

fn not_mappable() -> SourceError {
    NOT_MAPPABLE.into()
}

/// The qcow2 crate's map entries of `range`, as a stream.
fn qcow2_entries(
    q: &crate::qcow2::Qcow2Source,
    range: Range<u64>,
) -> Box<dyn Iterator<Item = Result<MapEntry, SourceError>> + Send + '_> {
    match q.image().map(range) {
        Ok(m) => Box::new(m.map(|r| r.map_err(SourceError::from))),
        Err(e) => Box::new(std::iter::once(Err(e.into()))),
    }
}

/// The qemu-img map entries of a raw file, from the file's map over
/// `range ∩ [0, file_size)`: every byte is present at depth 0 with the host
/// offset equal to the guest offset; data is data, zero and hole read as
/// zeros. The part of `range` past the end of the file (up to the next
/// 512-byte boundary, see [`raw_virtual_size`]) reads as zeros.
pub fn raw_entries<E>(
    extents: impl Iterator<Item = Result<Extent, E>>,
    file_size: u64,
    range: Range<u64>,
) -> impl Iterator<Item = Result<MapEntry, E>> {
    let tail = range.start.max(file_size)..range.end.max(file_size);
    let tail =
        (!tail.is_empty()).then(|| Ok(Extent::new(tail.start, tail.end - tail.start, Kind::Zero)));
    Merge::new(extents.chain(tail).map(|r| {
        r.map(|e| MapEntry {
            start: e.offset,
            length: e.length,
            depth: 0,
            present: true,
            zero: e.kind.reads_as_zero(),
            data: e.kind == Kind::Data,
            compressed: false,
            offset: Some(e.offset),
        })
    }))
}

/// The status extents of a dirty bitmap over `range`: `dirty` ranges
/// (sorted, disjoint) have type 1, the bytes between them type 0, as
/// `qemu-nbd -B NAME` exports the bitmap as `qemu:dirty-bitmap:NAME`.
pub fn bitmap_extents<E>(
    dirty: impl Iterator<Item = Result<Range<u64>, E>>,
    range: Range<u64>,
) -> impl Iterator<Item = Result<StatusExtent, E>> {
    let mut pos = range.start;
    let end = range.end;
    let mut dirty = dirty.peekable();
    let mut failed = false;
    std::iter::from_fn(move || {
        while pos < end && !failed {
            let (stop, flags) = match dirty.peek() {
                Some(Err(_)) => {
                    failed = true;
                    return dirty.next().and_then(|r| r.err()).map(Err);
                }
                Some(Ok(r)) if r.end <= pos || r.start >= r.end => {
                    dirty.next();
                    continue;
                }
                Some(Ok(r)) if r.start <= pos => (r.end.min(end), 1),
                Some(Ok(r)) => (r.start.min(end), 0),
                None => (end, 0),
            };
            let e = StatusExtent {
                offset: pos,
                length: stop - pos,
                flags,
            };
            pos = stop;
            return Some(Ok(e));
        }
        None
    })
}

/// Calls `consume` with an iterator over the items of `producer`, which
/// runs on another thread, at most [`DEPTH`] batches ahead. The producer
/// stops after its first error, and as soon as `consume` returns (it
/// notices at its next send).
pub fn prefetch<T, E, I, R>(
    producer: I,
    consume: impl FnOnce(&mut dyn Iterator<Item = Result<T, E>>) -> R,
) -> R
where
    I: Iterator<Item = Result<T, E>> + Send,
    T: Send,
    E: Send,
{
    let (tx, rx) = mpsc::sync_channel::<Vec<Result<T, E>>>(DEPTH);
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            for item in producer {
                let failed = item.is_err();
                batch.push(item);
                if batch.len() < BATCH && !failed {
                    continue;
                }
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                if tx.send(full).is_err() || failed {
                    return;
                }
            }
            if !batch.is_empty() {
                let _ = tx.send(batch);
            }
        });
        let mut items = rx.into_iter().flatten();
        consume(&mut items)
        // `items` (the receiver) is dropped here, before the scope joins
        // the producer, so a producer blocked on a full channel wakes up.
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_yields_everything_in_order() {
        let n = BATCH * 3 + 17;
        let out = prefetch((0..n).map(Ok::<_, ()>), |it| {
            it.map(Result::unwrap).collect::<Vec<_>>()
        });
        assert_eq!(out, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn prefetch_stops_after_the_first_error() {
        let src = (0..10).map(|i| if i == 5 { Err(i) } else { Ok(i) });
        let out: Vec<_> = prefetch(src, |it| it.collect());
        assert_eq!(out, [Ok(0), Ok(1), Ok(2), Ok(3), Ok(4), Err(5)]);
    }

    #[test]
    fn a_consumer_may_stop_early_without_deadlock() {
        let out: Vec<_> = prefetch((0u64..).map(Ok::<_, ()>), |it| it.take(3).collect());
        assert_eq!(out, [Ok(0), Ok(1), Ok(2)]);
    }

    fn ext(v: &[Range<u64>], range: Range<u64>) -> Vec<(u64, u64, u64)> {
        bitmap_extents(v.iter().cloned().map(Ok::<_, ()>), range)
            .map(|r| r.map(|e| (e.offset, e.length, e.flags)))
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn bitmaps_fill_clean_gaps_and_clip() {
        assert_eq!(ext(&[], 0..100), [(0, 100, 0)]);
        assert_eq!(
            ext(&[10..20, 20..30, 50..60], 0..100),
            [
                (0, 10, 0),
                (10, 10, 1),
                (20, 10, 1),
                (30, 20, 0),
                (50, 10, 1),
                (60, 40, 0)
            ]
        );
        assert_eq!(
            ext(&[10..20, 50..60], 15..55),
            [(15, 5, 1), (20, 30, 0), (50, 5, 1)]
        );
        assert_eq!(ext(std::slice::from_ref(&(0..100)), 0..100), [(0, 100, 1)]);
    }

    #[test]
    fn a_bitmap_error_ends_the_stream() {
        let dirty = [Ok(0..10), Err("bad"), Ok(20..30)];
        let got: Vec<_> = bitmap_extents(dirty.into_iter(), 0..100).collect();
        assert_eq!(got.len(), 2);
        assert!(got[1].is_err());
    }

    #[test]
    fn a_stopped_map_names_the_source_once() {
        let stopped = |source: &str| {
            MapError::Stopped {
                name: "d.raw".into(),
                offset: 0x1000,
                source: source.into(),
            }
            .to_string()
        };
        assert_eq!(
            stopped("d.raw: FIEMAP at offset 0x1000"),
            "stopped mapping at offset 0x1000"
        );
        // qcow2's errors: the file's name, the cause behind it.
        assert_eq!(stopped("d.raw"), "stopped mapping at offset 0x1000");
        assert_eq!(
            stopped("no bitmap named \"x\""),
            "d.raw: stopped mapping at offset 0x1000"
        );
        assert_eq!(
            stopped("d.raw.bak: gone"),
            "d.raw: stopped mapping at offset 0x1000"
        );
    }

    fn entries(v: &[Extent], size: u64, range: Range<u64>) -> Vec<MapEntry> {
        raw_entries(v.iter().copied().map(Ok::<_, ()>), size, range)
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn a_raw_file_is_present_everywhere_and_padded_to_a_sector() {
        let v = entries(
            &[
                Extent::new(0, 20480, Kind::Hole),
                Extent::new(20480, 12288, Kind::Data),
                Extent::new(32768, 1000, Kind::Zero),
            ],
            33768,
            0..raw_virtual_size(33768),
        );
        assert_eq!(v.len(), 3);
        assert!(v.iter().all(|e| e.present && e.offset == Some(e.start)));
        assert!(v[0].zero && !v[0].data);
        assert!(v[1].data && !v[1].zero);
        // The zero extent and the padding past the file merge.
        assert_eq!((v[2].start, v[2].length), (32768, 1024));
    }

    #[test]
    fn ranges_clamp_as_qemu_img_clamps_them() {
        assert_eq!(clamp_range(0, None, 100), 0..100);
        assert_eq!(clamp_range(50, Some(10), 100), 50..60);
        assert_eq!(clamp_range(50, Some(100), 100), 50..100);
        assert_eq!(clamp_range(150, None, 100), 100..100);
        assert_eq!(clamp_range(u64::MAX, Some(u64::MAX), 100), 100..100);
    }

    #[test]
    fn zero_and_hole_merge_and_unaligned_tail_reads_as_zero() {
        // A 10000007-byte file: qemu maps 10000384 bytes, the last 377 zero.
        let size = 10_000_007;
        let vsize = raw_virtual_size(size);
        assert_eq!(vsize, 10_000_384);
        let v = entries(
            &[
                Extent::new(0, 4096, Kind::Hole),
                Extent::new(4096, 4096, Kind::Zero),
                Extent::new(8192, size - 8192, Kind::Data),
            ],
            size,
            0..vsize,
        );
        assert_eq!(v.len(), 3);
        assert_eq!((v[0].start, v[0].length, v[0].zero), (0, 8192, true));
        assert_eq!(
            (v[2].start, v[2].length, v[2].zero, v[2].offset),
            (size, 377, true, Some(size))
        );
        // A tail range that lies wholly past the file.
        let t = entries(&[], size, 10_000_100..vsize);
        assert_eq!(
            t,
            [MapEntry {
                start: 10_000_100,
                length: 284,
                depth: 0,
                present: true,
                zero: true,
                data: false,
                compressed: false,
                offset: Some(10_000_100)
            }]
        );
    }

    #[test]
    fn clamp_like_start_offset_and_max_length() {
        assert_eq!(clamp_range(0, None, 1000), 0..1000);
        assert_eq!(clamp_range(100, Some(50), 1000), 100..150);
        assert_eq!(clamp_range(900, Some(500), 1000), 900..1000);
        assert_eq!(clamp_range(2000, None, 1000), 1000..1000);
        assert_eq!(clamp_range(5, Some(u64::MAX), 1000), 5..1000);
    }
}
