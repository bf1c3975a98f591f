//! [`Creator`]: the bmap of an image from its data extents, as `bmaptool
//! create` makes it.
//!
//! bmaptool lists every block that FIEMAP reports mapped, runs of them
//! merged when they touch (Filemap.py's `get_mapped_ranges`: `last_prev ==
//! first - 1`), cut at the image's last block; it hashes each run from
//! its first byte up to the end of the run or of the file, in 1 MiB reads
//! (BmapCreate.py's `_calculate_chksum`). Here the extents come from the
//! caller (FIEMAP, SEEK_DATA, a qcow2 map) and may be unaligned: a block is
//! listed when any byte of it is in an extent, so that blocks two extents
//! share become one run.

use std::cmp::Reverse;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::checksum::{ChecksumType, Digest, Hasher};
use crate::error::{LayoutError, ReadError};
use crate::{BlockRange, Bmap, DEFAULT_BLOCK_SIZE, Version, blocks_for};

/// The most bytes read at once while hashing, bmaptool's chunk size: each
/// hashing thread holds one buffer of this size.
pub const PIECE: usize = 1 << 20;

/// The runs of `block_size` blocks of an image of `image_size` bytes that
/// hold a byte of `extents`, as bmaptool lists them: each run maximal (runs
/// that touch or overlap are one), none past the image's last block.
///
/// `extents` are byte ranges sorted by start; they may be unaligned,
/// overlap, be empty or reach past the image. The result holds at most one
/// range per extent, so its size is bounded by the input's. The checksums
/// are `None`.
pub fn block_ranges(
    image_size: u64,
    block_size: u64,
    extents: impl IntoIterator<Item = Range<u64>>,
) -> Result<Vec<BlockRange>, LayoutError> {
    if image_size == 0 {
        return Err(LayoutError::ZeroImageSize);
    }
    if block_size == 0 {
        return Err(LayoutError::ZeroBlockSize);
    }
    let blocks = blocks_for(image_size, block_size);
    let mut out: Vec<BlockRange> = Vec::new();
    let mut previous: Option<Range<u64>> = None;
    for e in extents {
        if e.start > e.end {
            return Err(LayoutError::Reversed(e));
        }
        if let Some(p) = &previous
            && e.start < p.start
        {
            let previous = p.clone();
            return Err(LayoutError::OutOfOrder { previous, next: e });
        }
        let first = e.start / block_size;
        // Like Filemap, blocks past the last are dropped; the last one,
        // partial or not, is the image's.
        if e.start < e.end && first < blocks {
            let last = ((e.end - 1) / block_size).min(blocks - 1);
            match out.last_mut() {
                Some(r) if first <= r.last.saturating_add(1) => r.last = r.last.max(last),
                _ => out.push(BlockRange {
                    first,
                    last,
                    checksum: None,
                }),
            }
        }
        previous = Some(e);
    }
    Ok(out)
}

/// Makes the bmap of an image: its block ranges from its extents
/// ([`Creator::new`]), then their checksums ([`Creator::hash`]).
#[derive(Debug, Clone)]
pub struct Creator {
    image_size: u64,
    block_size: u64,
    checksum_type: ChecksumType,
    ranges: Vec<BlockRange>,
}

impl Creator {
    /// The bmap of an image of `image_size` bytes whose data lies in
    /// `extents`, in 4096-byte blocks, with SHA-256 checksums: what `bmaptool
    /// create` makes on a file system with 4 KiB blocks.
    ///
    /// To list what bmaptool lists for a file, pass every extent FIEMAP
    /// reports, unwritten (fallocated) ones included: bmaptool copies
    /// those too. See [`block_ranges`] for what `extents` may be.
    pub fn new(
        image_size: u64,
        extents: impl IntoIterator<Item = Range<u64>>,
    ) -> Result<Self, LayoutError> {
        Self::with_block_size(image_size, DEFAULT_BLOCK_SIZE, extents)
    }

    /// Like [`Creator::new`] with another block size (bmaptool uses the
    /// file system's).
    pub fn with_block_size(
        image_size: u64,
        block_size: u64,
        extents: impl IntoIterator<Item = Range<u64>>,
    ) -> Result<Self, LayoutError> {
        Ok(Creator {
            ranges: block_ranges(image_size, block_size, extents)?,
            image_size,
            block_size,
            checksum_type: ChecksumType::Sha256,
        })
    }

    /// Use `kind` for the checksums instead of SHA-256 (as
    /// `BmapCreate(image, bmap, "sha1")` does; the CLI always uses SHA-256).
    pub fn with_checksum_type(mut self, kind: ChecksumType) -> Self {
        self.checksum_type = kind;
        self
    }

    /// The ranges the bmap will list.
    pub fn ranges(&self) -> &[BlockRange] {
        &self.ranges
    }

    /// The bmap without range checksums, as `bmaptool create
    /// --no-checksum` makes it (the file still has its own checksum).
    pub fn without_checksums(self) -> Bmap {
        self.finish(self.ranges.clone())
    }

    /// Hashes every range through `read` and returns the bmap.
    ///
    /// `read(buf, offset)` must fill all of `buf` with the image's bytes at
    /// `offset` (zeros in holes), like `FileExt::read_exact_at`; `buf` is
    /// never longer than [`PIECE`]. One range is hashed by one thread, its
    /// pieces in order; ranges are hashed in parallel on the current rayon
    /// pool, one [`PIECE`] buffer per thread. The first failed read stops
    /// the work (reads in progress finish) and is returned.
    pub fn hash<F, E>(self, read: F) -> Result<Bmap, ReadError<E>>
    where
        F: Fn(&mut [u8], u64) -> Result<(), E> + Sync,
        E: Send,
    {
        let bytes = |r: &BlockRange| r.bytes(self.image_size, self.block_size);
        // Longest first from a shared counter: greedy list scheduling, so
        // the job ends at most one range's time after the first thread runs
        // out of work, and that range is one of the shortest. What is left
        // is inherent: one range is one sequential hash, so the job takes
        // at least as long as its longest range.
        let mut order: Vec<usize> = (0..self.ranges.len()).collect();
        order.sort_by_key(|&i| Reverse(bytes(&self.ranges[i]).end - bytes(&self.ranges[i]).start));
        let longest = order.first().map_or(0, |&i| {
            bytes(&self.ranges[i]).end - bytes(&self.ranges[i]).start
        });
        // A small image needs no 1 MiB buffers.
        let piece = usize::try_from(longest)
            .map_or(PIECE, |l| l.min(PIECE))
            .max(1);

        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let failed: Mutex<Option<ReadError<E>>> = Mutex::new(None);
        let digests: Vec<OnceLock<Digest>> = self.ranges.iter().map(|_| OnceLock::new()).collect();
        let workers = rayon::current_num_threads().min(order.len());
        rayon::scope(|s| {
            for _ in 0..workers {
                s.spawn(|_| {
                    let mut buf = vec![0u8; piece];
                    while !stop.load(Ordering::Relaxed) {
                        let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) else {
                            break;
                        };
                        let r = &self.ranges[i];
                        match hash_range(r, bytes(r), self.checksum_type, &mut buf, &read) {
                            Ok(d) => {
                                let _ = digests[i].set(d);
                            }
                            Err(e) => {
                                stop.store(true, Ordering::Relaxed);
                                failed
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .get_or_insert(e);
                                break;
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
            return Err(e);
        }
        let ranges = self
            .ranges
            .iter()
            .zip(digests)
            .map(|(r, d)| BlockRange {
                checksum: d.into_inner(),
                ..*r
            })
            .collect();
        Ok(self.finish(ranges))
    }

    fn finish(&self, ranges: Vec<BlockRange>) -> Bmap {
        Bmap {
            version: Version::CREATED,
            image_size: self.image_size,
            block_size: self.block_size,
            blocks_count: blocks_for(self.image_size, self.block_size),
            mapped_blocks_count: ranges.iter().map(BlockRange::blocks).sum(),
            checksum_type: Some(self.checksum_type),
            ranges,
        }
    }
}

/// The checksum of `bytes`, read in pieces of at most `buf.len()`.
fn hash_range<F, E>(
    range: &BlockRange,
    bytes: Range<u64>,
    kind: ChecksumType,
    buf: &mut [u8],
    read: &F,
) -> Result<Digest, ReadError<E>>
where
    F: Fn(&mut [u8], u64) -> Result<(), E>,
{
    let mut h = Hasher::new(kind);
    let mut at = bytes.start;
    while at < bytes.end {
        let len = usize::try_from(bytes.end - at).map_or(buf.len(), |l| l.min(buf.len()));
        let piece = &mut buf[..len];
        read(piece, at).map_err(|source| ReadError {
            range: *range,
            offset: at,
            len,
            source,
        })?;
        h.update(piece);
        at += len as u64;
    }
    Ok(h.finish())
}

#[cfg(test)]
// A layout of one extent is a list of one range.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spans(ranges: &[BlockRange]) -> Vec<(u64, u64)> {
        ranges.iter().map(|r| (r.first, r.last)).collect()
    }

    fn layout(image_size: u64, extents: &[Range<u64>]) -> Vec<(u64, u64)> {
        spans(&block_ranges(image_size, 4096, extents.iter().cloned()).unwrap())
    }

    #[test]
    fn blocks_touching_data_merged_when_they_touch() {
        // Unaligned extents, one sharing a block with the next.
        assert_eq!(layout(40960, &[100..200, 4000..4100]), [(0, 1)]);
        // Touching after rounding: 4095 is in block 0, 4096 in block 1.
        assert_eq!(layout(40960, &[0..4095, 4096..4097]), [(0, 1)]);
        // A one-block gap keeps them apart.
        assert_eq!(layout(40960, &[0..4096, 8192..8193]), [(0, 0), (2, 2)]);
        // Overlapping and empty extents.
        assert_eq!(
            layout(40960, &[0..10000, 5000..6000, 6000..6000, 9000..20000]),
            [(0, 4)]
        );
        // Past the end: cut at the last block, dropped after it.
        assert_eq!(layout(10000, &[8000..1 << 40, 20000..30000]), [(1, 2)]);
        assert_eq!(layout(10000, &[12287..12288]), [(2, 2)]);
        assert_eq!(layout(10000, &[12288..12289]), []);
        assert_eq!(layout(10000, &[]), []);
        assert_eq!(layout(u64::MAX, &[0..u64::MAX]), [(0, u64::MAX / 4096)]);
    }

    #[test]
    fn bad_layouts_are_refused() {
        assert_eq!(
            block_ranges(0, 4096, [0..1]),
            Err(LayoutError::ZeroImageSize)
        );
        assert_eq!(block_ranges(1, 0, [0..1]), Err(LayoutError::ZeroBlockSize));
        #[allow(clippy::reversed_empty_ranges)] // the reversed range is the point
        let reversed = 10..5;
        assert_eq!(
            block_ranges(100, 4096, [reversed.clone()]),
            Err(LayoutError::Reversed(reversed))
        );
        let e = block_ranges(100_000, 4096, [0..10, 8192..9000, 4096..5000]).unwrap_err();
        assert_eq!(
            e,
            LayoutError::OutOfOrder {
                previous: 8192..9000,
                next: 4096..5000
            }
        );
        assert_eq!(
            e.to_string(),
            "extent 0x1000..0x1388 starts before extent 0x2000..0x2328, which precedes it"
        );
    }

    /// The blocks that hold a byte of `extents`, one by one.
    fn model(image_size: u64, block_size: u64, extents: &[Range<u64>]) -> Vec<(u64, u64)> {
        let blocks = image_size.div_ceil(block_size);
        let mapped: Vec<bool> = (0..blocks)
            .map(|b| {
                let (lo, hi) = (b * block_size, (b + 1) * block_size);
                extents
                    .iter()
                    .any(|e| !e.is_empty() && e.start < hi && lo < e.end)
            })
            .collect();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (b, m) in mapped.iter().enumerate() {
            let b = b as u64;
            match out.last_mut() {
                Some(r) if *m && r.1 + 1 == b => r.1 = b,
                _ if *m => out.push((b, b)),
                _ => {}
            }
        }
        out
    }

    proptest! {
        #[test]
        fn block_ranges_match_a_block_by_block_model(
            block_size in prop::sample::select(vec![1u64, 512, 1000, 4096]),
            blocks in 1u64..40,
            tail in 0u64..4096,
            raw in prop::collection::vec((0u64..200_000, 0u64..20_000), 0..12),
        ) {
            let image_size = (blocks - 1) * block_size + tail % block_size + 1;
            let mut extents: Vec<Range<u64>> = raw.iter().map(|&(s, l)| {
                let s = s % (image_size + 2 * block_size);
                s..s + l % (3 * block_size + 1)
            }).collect();
            extents.sort_by_key(|e| e.start);
            let got = spans(&block_ranges(image_size, block_size, extents.iter().cloned()).unwrap());
            prop_assert_eq!(got, model(image_size, block_size, &extents));
        }
    }

    /// An image of `len` bytes whose byte i is a function of i.
    fn image(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
            .collect()
    }

    fn reader(img: &[u8]) -> impl Fn(&mut [u8], u64) -> Result<(), std::io::Error> + Sync + '_ {
        |buf, offset| {
            let at = offset as usize;
            buf.copy_from_slice(&img[at..at + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn checksums_cover_the_range_up_to_the_image_size() {
        let size = 5 * 1024 * 1024 + 1234;
        let img = image(size);
        let extents = [
            0..10,
            4096 * 3..3 * 1024 * 1024,
            5 * 1024 * 1024..size as u64,
        ];
        for kind in [ChecksumType::Sha256, ChecksumType::Sha1] {
            let b = Creator::new(size as u64, extents.clone())
                .unwrap()
                .with_checksum_type(kind)
                .hash(reader(&img))
                .unwrap();
            assert_eq!(spans(b.ranges()), [(0, 0), (3, 767), (1280, 1280)]);
            assert_eq!(b.checksum_type(), Some(kind));
            for (bytes, r) in b.byte_ranges() {
                let want = Hasher::digest(kind, &img[bytes.start as usize..bytes.end as usize]);
                assert_eq!(r.checksum, Some(want), "{r:?}");
            }
            // The last range is the partial block: 1234 bytes.
            assert_eq!(
                b.byte_ranges().last().unwrap().0,
                5 * 1024 * 1024..size as u64
            );
            assert_eq!(b.mapped_blocks_count(), 1 + 765 + 1);
        }
    }

    #[test]
    fn a_changed_byte_changes_the_range_checksum() {
        // What the copy engine relies on to catch a wrong range.
        let img = image(100_000);
        let b = Creator::new(100_000, [5000..9000])
            .unwrap()
            .hash(reader(&img))
            .unwrap();
        let (bytes, r) = b.byte_ranges().next().unwrap();
        let mut other = img[bytes.start as usize..bytes.end as usize].to_vec();
        other[4000] ^= 1;
        let e = r
            .verify(&Hasher::digest(ChecksumType::Sha256, &other))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("checksum mismatch for blocks range 1-2: calculated ")
        );
        r.verify(&Hasher::digest(
            ChecksumType::Sha256,
            &img[bytes.start as usize..bytes.end as usize],
        ))
        .unwrap();
    }

    #[test]
    fn reads_are_pieces_of_at_most_1_mib_in_order_within_a_range() {
        let size = 7 * 1024 * 1024 + 5;
        let img = image(size);
        let calls = Mutex::new(Vec::new());
        let extents = [0..3 * 1024 * 1024 + 1, 4 * 1024 * 1024..size as u64];
        let b = Creator::new(size as u64, extents)
            .unwrap()
            .hash(|buf: &mut [u8], offset| {
                calls.lock().unwrap().push((offset, buf.len()));
                reader(&img)(buf, offset)
            })
            .unwrap();
        let calls = calls.into_inner().unwrap();
        assert!(calls.iter().all(|&(_, len)| len <= 1 << 20 && len > 0));
        for (bytes, _) in b.byte_ranges() {
            // This range's reads, in the order made: contiguous, covering it.
            let mut at = bytes.start;
            for &(offset, len) in calls.iter().filter(|c| bytes.contains(&c.0)) {
                assert_eq!(offset, at);
                at += len as u64;
            }
            assert_eq!(at, bytes.end);
        }
    }

    #[test]
    fn a_failed_read_is_returned_with_its_range_and_offset() {
        let img = image(10 << 20);
        let extents = [0..4096, 1 << 20..5 << 20, 8 << 20..9 << 20];
        let e = Creator::new(10 << 20, extents)
            .unwrap()
            .hash(|buf: &mut [u8], offset| {
                if offset == 3 << 20 {
                    Err(std::io::Error::other("bad sector"))
                } else {
                    reader(&img)(buf, offset)
                }
            })
            .unwrap_err();
        assert_eq!((e.range.first, e.range.last), (256, 1279));
        assert_eq!((e.offset, e.len), (3 << 20, 1 << 20));
        assert_eq!(e.source.to_string(), "bad sector");
        assert_eq!(
            e.to_string(),
            "reading 1048576 bytes at 0x300000 to hash blocks 256-1279"
        );
    }

    #[test]
    fn one_thread_or_many_give_the_same_bmap() {
        let mut rng = 0x1234_5678_u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let size = 3 * 1024 * 1024 + 77;
        let img = image(size);
        for _ in 0..10 {
            let mut starts: Vec<u64> = (0..next(30)).map(|_| next(size as u64)).collect();
            starts.sort();
            let extents: Vec<Range<u64>> = starts.iter().map(|&s| s..s + next(300_000)).collect();
            let make = |threads| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| {
                        Creator::new(size as u64, extents.clone())
                            .unwrap()
                            .hash(reader(&img))
                    })
                    .unwrap()
            };
            let one = make(1);
            assert_eq!(one, make(4));
            for (bytes, r) in one.byte_ranges() {
                let want = Hasher::digest(
                    ChecksumType::Sha256,
                    &img[bytes.start as usize..bytes.end as usize],
                );
                assert_eq!(r.checksum, Some(want));
            }
        }
    }

    #[test]
    fn without_checksums_and_with_no_data() {
        let b = Creator::new(10_000, [0..1]).unwrap().without_checksums();
        assert_eq!(b.ranges()[0].checksum, None);
        assert_eq!(b.checksum_type(), Some(ChecksumType::Sha256));
        let empty = Creator::new(10_000, []).unwrap().hash(reader(&[])).unwrap();
        assert_eq!(empty.mapped_blocks_count(), 0);
        assert!(empty.ranges().is_empty());
        assert_eq!(empty.blocks_count(), 3);
    }
}
