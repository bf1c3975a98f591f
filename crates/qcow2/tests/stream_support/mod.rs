//! Helpers of the stream tests: a non-seekable pipe into the decoder, a
//! qcow2-to-stdout.py layout generator, a rewriter that puts qemu-made
//! images into forward order, and source data builders.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::Path;

use sparsekit_qcow2::{Header, L2Mapping, StreamDecoder, StreamError};

use crate::common::{Dir, run};

/// Decodes `bytes` fed through an OS pipe by another thread, so the
/// decoder sees a stream it can not seek.
pub fn decode_piped(bytes: Vec<u8>) -> Result<Vec<u8>, StreamError> {
    let (reader, mut writer) = std::io::pipe().expect("pipe");
    let feeder = std::thread::spawn(move || {
        // The decoder may stop early (on an error): EPIPE is expected.
        let _ = writer.write_all(&bytes);
    });
    let r = decode(reader);
    feeder.join().expect("feeder thread");
    r
}

/// Decodes from a reader that gives at most a few bytes per `read()`.
pub fn decode_trickled(bytes: &[u8]) -> Result<Vec<u8>, StreamError> {
    decode(Trickle { inner: bytes, n: 0 })
}

/// A reader that only forwards `read()`, a few bytes at a time.
pub struct Trickle<R> {
    pub inner: R,
    pub n: usize,
}

impl<R: Read> Read for Trickle<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.n = self.n % 13 + 1;
        let len = buf.len().min(self.n * 37);
        self.inner.read(&mut buf[..len])
    }
}

/// Decodes a whole stream into a disk image in memory, checking what the
/// decoder promises on the way.
pub fn decode(reader: impl Read) -> Result<Vec<u8>, StreamError> {
    let dec = StreamDecoder::new(reader)?;
    let size = dec.virtual_size();
    let cs = dec.cluster_size();
    let mut disk = vec![0u8; size as usize];
    let mut chunks = dec.read_tables()?;
    assert_eq!(chunks.virtual_size(), size);
    let total = chunks.data_bytes();
    let mut seen = 0;
    let mut pos = chunks.position();
    while let Some(c) = chunks.next() {
        let c = c?;
        assert!(chunks.position() >= pos, "the decoder only reads forward");
        pos = chunks.position();
        let at = c.guest_offset.0 as usize;
        assert!(!c.data.is_empty());
        assert!(c.data.len() as u64 <= cs.max(1 << 20));
        assert!(at + c.data.len() <= disk.len(), "chunk past the disk");
        disk[at..at + c.data.len()].copy_from_slice(&c.data);
        seen += c.data.len() as u64;
        chunks.recycle(c.data);
    }
    assert_eq!(seen, total, "data_bytes() is what the chunks add up to");
    Ok(disk)
}

/// Reads every chunk of a stream without building the disk (whose size a
/// damaged header may make huge), checking each lies inside it.
pub fn drain(reader: impl Read) -> Result<u64, StreamError> {
    let dec = StreamDecoder::new(reader)?;
    let size = dec.virtual_size();
    let chunks = dec.read_tables()?;
    let total = chunks.data_bytes();
    let mut seen = 0;
    for c in chunks {
        let c = c?;
        assert!(
            c.guest_offset.0 + c.data.len() as u64 <= size,
            "chunk past the disk"
        );
        seen += c.data.len() as u64;
    }
    assert_eq!(seen, total, "data_bytes() is what the chunks add up to");
    Ok(seen)
}

/// `qemu-img convert -O raw` of an image: the expected disk.
pub fn qemu_raw(d: &Dir, name: &str, fmt: &str) -> Vec<u8> {
    let out = format!("{name}.expected.raw");
    d.img(&["convert", "-f", fmt, "-O", "raw", name, &out]);
    let v = std::fs::read(d.path(&out)).unwrap();
    std::fs::remove_file(d.path(&out)).unwrap();
    v
}

/// `qemu-img check` must find nothing wrong (exit 0, no leaks).
pub fn assert_check_clean(d: &Dir, name: &str) {
    let out = run(d.tmp.path(), "qemu-img", &["check", "-f", "qcow2", name]);
    assert!(
        out.contains("No errors were found on the image."),
        "qemu-img check {name}: {out}"
    );
}

/// `qemu-img compare` must find both images equal (exit 0).
pub fn assert_compare_equal(d: &Dir, a: &str, fa: &str, b: &str, fb: &str) {
    let out = run(
        d.tmp.path(),
        "qemu-img",
        &["compare", "-f", fa, "-F", fb, a, b],
    );
    assert!(out.contains("Images are identical"), "{out}");
}

/// Asserts two disks are equal, naming the first differing byte.
pub fn assert_disk_eq(ours: &[u8], expected: &[u8], what: &str) {
    assert_eq!(ours.len(), expected.len(), "{what}: disk sizes differ");
    if let Some(i) = (0..ours.len()).find(|&i| ours[i] != expected[i]) {
        panic!(
            "{what}: byte {i:#x} differs: decoded {:#x}, expected {:#x}",
            ours[i], expected[i]
        );
    }
}

/// Fills `buf` with data of a kind picked by `seed`: compressible runs
/// for even seeds, incompressible pseudo-random bytes for odd ones.
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for (i, b) in buf.iter_mut().enumerate() {
        if seed.is_multiple_of(2) {
            *b = (seed as u8).wrapping_add((i / 100) as u8);
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
}

/// A raw disk of `size` bytes with data in `ranges` (offset, length).
pub fn raw_disk(size: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    for (i, &(off, len)) in ranges.iter().enumerate() {
        fill(&mut v[off as usize..(off + len) as usize], i as u64 + 1);
    }
    v
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

pub fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

pub fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Writes refcount `value` of cluster `i` into refcount blocks laid out
/// back to back in `blocks`, `bits` wide, as qcow2.rst says (big-endian
/// for 8 bits and more, least significant bits first below).
fn set_refcount(blocks: &mut [u8], i: u64, bits: u32, value: u64) {
    let i = i as usize;
    match bits {
        64 => put64(blocks, i * 8, value),
        32 => put32(blocks, i * 4, value as u32),
        16 => blocks[i * 2..i * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        8 => blocks[i] = value as u8,
        _ => {
            let per = 8 / bits as usize;
            let shift = (i % per) * bits as usize;
            blocks[i / per] |= (value as u8) << shift;
        }
    }
}

/// Refcount table and block counts for `others` clusters besides them,
/// iterated to the fixed point (the refcount structures count
/// themselves).
fn refcount_clusters(others: u64, cs: u64, bits: u32) -> (u64, u64) {
    let per_block = cs * 8 / u64::from(bits);
    let per_table = cs / 8;
    let mut blocks = others.div_ceil(per_block);
    let mut table = blocks.div_ceil(per_table);
    loop {
        let need = (others + blocks + table).div_ceil(per_block);
        if need <= blocks {
            return (table, blocks);
        }
        blocks = need;
        table = blocks.div_ceil(per_table);
    }
}

/// The layout of qemu's scripts/qcow2-to-stdout.py, rewritten in Rust from
/// the script: header cluster (v3, header length 112, feature name
/// table, data file name extension with `-d`), refcount table, refcount
/// blocks, L1 table, L2 tables, data clusters in guest order. Clusters
/// that are all zeros are left unallocated, as the script does.
pub fn qcow2_to_stdout(
    raw: &[u8],
    cluster_size: u64,
    refcount_bits: u32,
    data_file: Option<&str>,
) -> Vec<u8> {
    let cs = cluster_size;
    let l2_per_table = cs / 8;
    let l1_per_table = cs / 8;
    let disk_size = (raw.len() as u64).next_multiple_of(512);
    let total_clusters = disk_size.div_ceil(cs);
    let l1_entries = total_clusters.div_ceil(l2_per_table);
    let l1_tables = l1_entries.div_ceil(l1_per_table);
    let cluster = |i: u64| -> Vec<u8> {
        let start = (i * cs) as usize;
        let end = ((i + 1) * cs).min(raw.len() as u64) as usize;
        let mut c = raw[start.min(raw.len())..end].to_vec();
        c.resize(cs as usize, 0);
        c
    };
    let allocated: Vec<u64> = (0..total_clusters)
        .filter(|&i| cluster(i).iter().any(|&b| b != 0))
        .collect();
    let mut l1_used: Vec<u64> = allocated.iter().map(|&i| i / l2_per_table).collect();
    l1_used.dedup();
    let mut others = 1 + l1_tables + l1_used.len() as u64;
    if data_file.is_none() {
        others += allocated.len() as u64;
    }
    let (rt, rb) = refcount_clusters(others, cs, refcount_bits);
    let total = others + rt + rb;
    let rt_off = cs;
    let rb_off = rt_off + rt * cs;
    let l1_off = rb_off + rb * cs;
    let l2_off = l1_off + l1_tables * cs;
    let data_off = l2_off + l1_used.len() as u64 * cs;

    let mut out = Vec::new();
    let mut h = vec![0u8; cs as usize];
    h[0..4].copy_from_slice(b"QFI\xfb");
    put32(&mut h, 4, 3);
    put32(&mut h, 20, cs.trailing_zeros());
    put64(&mut h, 24, disk_size);
    put32(&mut h, 36, l1_entries as u32);
    put64(&mut h, 40, if l1_tables == 0 { 0 } else { l1_off });
    put64(&mut h, 48, rt_off);
    put32(&mut h, 56, rt as u32);
    if data_file.is_some() {
        put64(&mut h, 72, 1 << 2); // incompatible: external data file
        put64(&mut h, 88, 0); // not raw: the script's -R is not used
    }
    put32(&mut h, 96, refcount_bits.trailing_zeros());
    put32(&mut h, 100, 112);
    let mut at = 112;
    if let Some(name) = data_file {
        put32(&mut h, at, 0x4441_5441); // data file name
        put32(&mut h, at + 4, name.len() as u32);
        h[at + 8..at + 8 + name.len()].copy_from_slice(name.as_bytes());
        at += 8 + name.len().next_multiple_of(8);
    }
    let features: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    put32(&mut h, at, 0x6803_f857); // feature name table
    put32(&mut h, at + 4, 48 * features.len() as u32);
    at += 8;
    for (kind, bit, name) in features {
        h[at] = kind;
        h[at + 1] = bit;
        h[at + 2..at + 2 + name.len()].copy_from_slice(name.as_bytes());
        at += 48;
    }
    out.extend_from_slice(&h);

    let mut table = vec![0u8; (rt * cs) as usize];
    for b in 0..rb {
        put64(&mut table, (b * 8) as usize, rb_off + b * cs);
    }
    out.extend_from_slice(&table);
    let mut blocks = vec![0u8; (rb * cs) as usize];
    for i in 0..total {
        set_refcount(&mut blocks, i, refcount_bits, 1);
    }
    out.extend_from_slice(&blocks);

    let mut l1 = vec![0u8; (l1_tables * cs) as usize];
    for (j, &i) in l1_used.iter().enumerate() {
        put64(
            &mut l1,
            (i * 8) as usize,
            (l2_off + j as u64 * cs) | 1 << 63,
        );
    }
    out.extend_from_slice(&l1);
    let mut next = data_off;
    for &t in &l1_used {
        let mut l2 = vec![0u8; cs as usize];
        for &c in allocated.iter().filter(|&&c| c / l2_per_table == t) {
            let host = if data_file.is_some() {
                c * cs
            } else {
                let h = next;
                next += cs;
                h
            };
            put64(&mut l2, ((c % l2_per_table) * 8) as usize, host | 1 << 63);
        }
        out.extend_from_slice(&l2);
    }
    if data_file.is_none() {
        for &c in &allocated {
            out.extend_from_slice(&cluster(c));
        }
    }
    out
}

/// Rewrites a qcow2 image made by qemu into forward order: header, a new
/// refcount table and blocks, L1, L2 tables, then the image's data area
/// moved as one piece by a whole number of clusters (so compressed
/// clusters keep their packing and their sector-rounded overlaps). The
/// refcounts are recomputed, so `qemu-img check` stays clean.
pub fn forward_order(img: &[u8]) -> Vec<u8> {
    let h = Header::parse(img).expect("header of the image to rewrite");
    assert!(h.nb_snapshots == 0 && h.backing_file.is_none() && !h.has_data_file());
    let cs = h.cluster_size();
    let es = h.l2_entry_size() as usize;
    let g = h.geometry();
    let l1_off = h.l1_table_offset.0 as usize;
    let l1: Vec<u64> = (0..h.l1_size as usize)
        .map(|i| get64(img, l1_off + 8 * i))
        .collect();
    let mut l2_tables: Vec<(usize, Vec<u8>)> = Vec::new();
    for (i, &e) in l1.iter().enumerate() {
        let off = (e & 0x00ff_ffff_ffff_fe00) as usize;
        if off != 0 {
            l2_tables.push((i, img[off..off + cs as usize].to_vec()));
        }
    }
    // The data area: from the first host cluster with guest data to the
    // end of the file or of the last compressed cluster.
    let mut first = u64::MAX;
    let mut last = img.len() as u64;
    for (_, t) in &l2_tables {
        for e in t.chunks_exact(es) {
            let bm = if es == 16 { get64(e, 8) } else { 0 };
            match L2Mapping::decode(get64(e, 0), bm, g).unwrap() {
                L2Mapping::Standard { host, .. } | L2Mapping::Zero { host: Some(host) } => {
                    first = first.min(host.0);
                }
                L2Mapping::Compressed { host, size } => {
                    first = first.min(host.0);
                    last = last.max(host.0 + size);
                }
                _ => {}
            }
        }
    }
    let old_start = if first == u64::MAX {
        img.len() as u64
    } else {
        first / cs * cs
    };
    let area_clusters = last.saturating_sub(old_start).div_ceil(cs);
    let mut area = img[old_start.min(img.len() as u64) as usize..].to_vec();
    area.resize((area_clusters * cs) as usize, 0);

    let l1_clusters = (h.l1_size as u64 * 8).div_ceil(cs);
    let others = 1 + l1_clusters + l2_tables.len() as u64 + area_clusters;
    let (rt, rb) = refcount_clusters(others, cs, 16);
    let new_l1 = (1 + rt + rb) * cs;
    let new_l2 = new_l1 + l1_clusters * cs;
    let new_start = new_l2 + l2_tables.len() as u64 * cs;
    let total = others + rt + rb;
    let mut refcounts = vec![0u64; total as usize];
    for r in &mut refcounts[..(new_start / cs) as usize] {
        *r = 1;
    }
    let moved = |host: u64| host - old_start + new_start;
    let mut new_l1_table = vec![0u8; (l1_clusters * cs) as usize];
    for (j, (i, t)) in l2_tables.iter_mut().enumerate() {
        put64(
            &mut new_l1_table,
            *i * 8,
            (new_l2 + j as u64 * cs) | 1 << 63,
        );
        for e in t.chunks_exact_mut(es) {
            let bm = if es == 16 { get64(e, 8) } else { 0 };
            let entry = get64(e, 0);
            match L2Mapping::decode(entry, bm, g).unwrap() {
                L2Mapping::Standard { host, .. } | L2Mapping::Zero { host: Some(host) } => {
                    let new = moved(host.0);
                    put64(e, 0, entry & !0x00ff_ffff_ffff_fe00 | new);
                    refcounts[(new / cs) as usize] += 1;
                }
                L2Mapping::Compressed { host, size } => {
                    let shift = 62 - (h.cluster_bits - 8);
                    let new = moved(host.0);
                    put64(e, 0, entry & !((1 << shift) - 1) | new);
                    for c in new / cs..=(new + size - 1) / cs {
                        refcounts[c as usize] += 1;
                    }
                }
                _ => {}
            }
        }
    }

    let mut out = img[..cs as usize].to_vec();
    put64(&mut out, 40, if h.l1_size == 0 { 0 } else { new_l1 });
    put64(&mut out, 48, cs);
    put32(&mut out, 56, rt as u32);
    if h.version >= 3 {
        let incompat = get64(&out, 72) & !1; // not dirty
        put64(&mut out, 72, incompat);
        put32(&mut out, 96, 4); // 16-bit refcounts, as version 2 has
    }
    let mut table = vec![0u8; (rt * cs) as usize];
    for b in 0..rb {
        put64(&mut table, (b * 8) as usize, (1 + rt + b) * cs);
    }
    out.extend_from_slice(&table);
    let mut blocks = vec![0u8; (rb * cs) as usize];
    for (i, &r) in refcounts.iter().enumerate() {
        set_refcount(&mut blocks, i as u64, 16, r);
    }
    out.extend_from_slice(&blocks);
    out.extend_from_slice(&new_l1_table);
    for (_, t) in &l2_tables {
        out.extend_from_slice(t);
    }
    assert_eq!(out.len() as u64, new_start);
    out.extend_from_slice(&area);
    out
}

/// Writes `bytes` to `name` in the test directory.
pub fn save(d: &Dir, name: &str, bytes: &[u8]) {
    std::fs::write(d.path(name), bytes).unwrap();
}

/// Reads `name` from the test directory.
pub fn load(d: &Dir, name: &str) -> Vec<u8> {
    std::fs::read(d.path(name)).unwrap()
}

/// The file's path as a `&str`.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
