//! The bodies of sparsekit's fuzz targets.
//!
//! Each function takes the fuzzer's bytes and drives one parser with them;
//! it returns normally for any input the library refuses or accepts, and
//! panics only when the library breaks one of its own promises (a panic,
//! an overflow, a map that does not cover the disk, a chunk outside it).
//! The libFuzzer targets in `fuzz/fuzz_targets/` are one line each around
//! these, and `tests/regressions.rs` replays every input kept under
//! `fuzz/regressions/<target>/` through the same functions on stable Rust.
//!
//! - [`qcow2_header`]: the first cluster; no I/O.
//! - [`qcow2_image`]: a whole image file: the check of damaged images,
//!   then open, map, read, check, info, allocation bitmap, snapshots.
//! - [`qcow2_bitmaps`]: a whole image file: the bitmap directory and
//!   every bitmap's dirty ranges.
//! - [`qcow2_stream`]: a qcow2 stream through [`StreamDecoder`], read whole
//!   and in short reads, which must agree.
//! - [`bmap`]: a bmap file through [`Bmap::parse`], and what it accepts
//!   written back with [`Bmap::to_xml`] and read again.
//! - [`nbd_client`]: what a server says, to the sans-IO [`Handshake`]
//!   and then to the [`Transmission`] the client drives, as replies to a
//!   read, a block status request and writes.
//!
//! The harness bounds only what the libraries legitimately stream without
//! end of their own (a 2^62-byte disk mapped extent by extent): at most
//! [`MAX_STEPS`] items of any iterator.
//!
//! ```
//! for (name, run) in sparsekit_fuzz_harness::TARGETS {
//!     run(b"QFI\xfb not much of an image");
//!     assert!(!name.is_empty());
//! }
//! ```

use std::io::{Cursor, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub mod seeds;

use sparsekit_bmap::Bmap;
use sparsekit_nbd::{
    Completion, Handshake, HandshakeConfig, HeaderMode, Negotiated, Op, Reply, TlsMode,
    Transmission, Want, ZeroFlags,
};
use sparsekit_qcow2::{
    GuestOffset, Header, HostCluster, Image, L1Entry, L2Mapping, MAX_CHUNK_BYTES, OpenOptions,
    Qcow2, RawHeader, RawSnapshotHeader, RefcountTableEntry, Snapshot, StreamDecoder, StreamLimits,
    parse_directory,
};

/// The body of a fuzz target.
pub type Target = fn(&[u8]);

/// Every target: its name (the fuzz/ binary and the regressions folder)
/// and its body.
pub const TARGETS: &[(&str, Target)] = &[
    ("qcow2_header", qcow2_header),
    ("qcow2_image", qcow2_image),
    ("qcow2_bitmaps", qcow2_bitmaps),
    ("qcow2_stream", qcow2_stream),
    ("nbd_client", nbd_client),
    ("bmap", bmap),
];

/// Most items the harness takes from any one iterator (map entries, dirty
/// ranges, stream chunks).
pub const MAX_STEPS: usize = 100_000;

/// Cap on the metadata a fuzzed stream may make the decoder hold: 64 MiB,
/// well inside the fuzzers' malloc limit.
pub const STREAM_METADATA_CAP: u64 = 64 << 20;

/// The first cluster of an image: `RawHeader::decode`, `Header::parse`
/// with its extensions, the checks against a file size and every
/// accessor; then the bytes after the header as a bitmap directory, a
/// snapshot table entry and table entries decoded against the header's
/// geometry.
pub fn qcow2_header(data: &[u8]) {
    let _ = RawHeader::decode(data);
    let _ = RawSnapshotHeader::decode(data);
    let Ok(h) = Header::parse(data) else {
        return;
    };
    let _ = format!("{h:?}");
    for size in [0, data.len() as u64, 1 << 20, u64::MAX] {
        let _ = h.check_file_size(size);
    }
    let sizes = [
        h.cluster_size(),
        h.refcount_table_bytes(),
        h.refcount_bits().into(),
        h.l2_entry_size(),
        h.l2_entries(),
        h.l1_span(),
        h.subclusters(),
        h.subcluster_size(),
    ];
    assert!(sizes.iter().all(|&s| s > 0), "{sizes:?}");
    std::hint::black_box([
        h.extended_l2(),
        h.has_data_file(),
        h.data_file_raw(),
        h.dirty(),
        h.corrupt(),
        h.lazy_refcounts(),
    ]);

    let rest = &data[(h.header_length as usize).min(data.len())..];
    let nb = h.bitmaps.map_or(1, |b| b.nb_bitmaps);
    let _ = parse_directory(rest, nb, h.cluster_bits, h.size);
    if let Ok(s) = Snapshot::parse(rest, 0, 0) {
        let _ = s.l1_problem(h.cluster_bits);
    }
    let g = h.geometry();
    for (i, c) in rest.chunks_exact(16).take(64).enumerate() {
        let a = u64::from_be_bytes(c[..8].try_into().expect("8 bytes"));
        let b = u64::from_be_bytes(c[8..].try_into().expect("8 bytes"));
        let _ = L1Entry(a).validate(h.cluster_bits);
        let _ = L1Entry(a).l2_offset();
        let _ = RefcountTableEntry(a).block_offset();
        if let Ok(m) = L2Mapping::decode(a, b, g) {
            let _ = m.has_host_data();
            for sc in 0..h.subclusters() as u32 {
                let _ = m.subcluster(sc, h.subcluster_size(), g, GuestOffset(i as u64));
            }
        }
    }
}

/// A folder of this process's own for the image file, removed at exit
/// only by the OS's temp cleaning: the fuzzer never returns normally.
fn image_path() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = DIR.get_or_init(|| {
        let d = tempfile::Builder::new()
            .prefix("sparsekit-fuzz")
            .tempdir()
            .expect("creating a temporary folder");
        let p = d.path().join("image.qcow2");
        (d, p)
    });
    p
}

/// Writes `data` as the image file and returns its path. A backing or data
/// file name can only reach files of the same (private) folder, and the
/// images are opened untrusted, so nothing else is read.
fn write_image(data: &[u8]) -> &'static Path {
    let p = image_path();
    std::fs::write(p, data).expect("writing the image file");
    p
}

fn untrusted() -> OpenOptions {
    OpenOptions {
        no_backing: true,
        untrusted: true,
        ..OpenOptions::default()
    }
}

/// A whole image file: checked as damaged images are (the lenient open
/// reads tables past the end of the file as zeros); then opened untrusted
/// without its backing file, mapped (the map must cover the disk from 0,
/// in order, without gaps), read where the map says the disk reads as
/// zeros (it must), checked, and described.
pub fn qcow2_image(data: &[u8]) {
    let path = write_image(data);
    let _ = Qcow2::check_path(path, &untrusted());
    let Ok(img) = Image::open_with(path, &untrusted()) else {
        return;
    };
    let q = img.top();
    let size = img.virtual_size();
    assert_eq!(size, q.virtual_size());
    std::hint::black_box((q.header(), q.file_size(), q.cluster_size()));
    std::hint::black_box((q.l1_table().len(), q.refcount_table().len()));
    std::hint::black_box((img.layers().len(), img.backing_depth(), q.data_file_path()));
    std::hint::black_box((img.file_ids(), img.files().count()));

    let mut at = 0;
    let mut zeros: Vec<Range<u64>> = Vec::new();
    for e in img.map_all().take(MAX_STEPS) {
        let Ok(e) = e else {
            break;
        };
        assert_eq!(e.start, at, "map entries must follow each other: {e:?}");
        assert!(
            e.length > 0 && e.end() <= size,
            "map entry {e:?} of a {size}-byte disk"
        );
        at = e.end();
        if e.zero && zeros.len() < 4 {
            zeros.push(e.start..e.end().min(e.start + 65536));
        }
    }
    if let Ok(mut extents) = img.map(0..size.min(1 << 20)) {
        let _ = extents.next();
    }
    let _ = img.map_all().extents().take(16).count();

    // Reads: the start, the middle, the last byte, and where the map said
    // zeros.
    let mut buf = vec![0u8; 65536];
    let mut reads = vec![0..size.min(4096), size / 2..(size / 2 + 65536).min(size)];
    reads.push(size.saturating_sub(1)..size);
    for r in &reads {
        let _ = img.read_at(&mut buf[..(r.end - r.start) as usize], r.start);
    }
    for r in &zeros {
        let b = &mut buf[..(r.end - r.start) as usize];
        b.fill(0xa5);
        if img.read_at(b, r.start).is_ok() {
            assert!(b.iter().all(|&x| x == 0), "map says zeros at {r:?}");
        }
    }
    let _ = img.read_at(&mut buf[..1], size);

    for g in [0, size / 2, size.saturating_sub(1)] {
        let _ = q.mapping(GuestOffset(g));
        let _ = q.subcluster_run(GuestOffset(g), size - g.min(size));
        let _ = q.layer_status(GuestOffset(g), size - g.min(size));
    }
    for c in 0..4 {
        let _ = q.refcount(HostCluster(c));
    }
    let _ = q.metadata_preallocated();
    let _ = q.refcount_block_entries();
    let _ = q.check();
    let _ = q.write_allocation_bitmap(&mut std::io::sink());
    let _ = q.allocated_bytes();
    let _ = q.snapshots();
    let _ = q.info();
    let _ = img.info_chain();
}

/// A whole image file: its persistent bitmaps and the dirty ranges of
/// each, which must be sorted, disjoint and inside the disk.
pub fn qcow2_bitmaps(data: &[u8]) {
    let Ok(q) = Qcow2::open_untrusted(write_image(data)) else {
        return;
    };
    let Ok(bitmaps) = q.bitmaps() else {
        return;
    };
    let size = q.virtual_size();
    for b in &bitmaps {
        std::hint::black_box((b.in_use(), b.auto(), b.flag_names()));
        let Ok(ranges) = q.dirty_ranges(&b.name) else {
            continue;
        };
        assert_eq!(ranges.bitmap().name, b.name);
        let mut at = 0;
        for r in ranges.take(MAX_STEPS) {
            let Ok(r) = r else {
                break;
            };
            assert!(
                r.start >= at && r.start < r.end && r.end <= size,
                "dirty range {r:?} after {at:#x} of a {size}-byte disk"
            );
            at = r.end;
        }
    }
}

/// Hands out its bytes in short reads of 1 byte to 4 KiB, as the data
/// says, the way a pipe may.
struct Trickle<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = &self.data[self.pos..];
        let step = left.first().map_or(1, |&b| 1 << (b % 13));
        let n = step.min(buf.len()).min(left.len());
        buf[..n].copy_from_slice(&left[..n]);
        self.pos += n;
        Ok(n)
    }
}

/// What a stream decodes to: each chunk's guest offset and a digest of
/// its bytes, or where it failed.
fn decode_stream(r: impl Read) -> Vec<(u64, usize, u64)> {
    let limits = StreamLimits {
        max_metadata_bytes: STREAM_METADATA_CAP,
    };
    let mut out = Vec::new();
    let Ok(dec) = StreamDecoder::with_limits(r, limits) else {
        return out;
    };
    let (size, cs) = (dec.virtual_size(), dec.cluster_size());
    std::hint::black_box(dec.header());
    let Ok(mut chunks) = dec.read_tables() else {
        return out;
    };
    std::hint::black_box((chunks.header(), chunks.data_bytes(), chunks.data_clusters()));
    for _ in 0..MAX_STEPS {
        let Some(c) = chunks.next() else {
            break;
        };
        let Ok(c) = c else {
            out.push((u64::MAX, 0, chunks.position()));
            break;
        };
        let len = c.data.len() as u64;
        assert!(
            len > 0 && len <= MAX_CHUNK_BYTES.max(cs) && c.guest_offset.0 + len <= size,
            "chunk of {len} bytes at {:#x} of a {size}-byte disk",
            c.guest_offset.0
        );
        let digest = c
            .data
            .iter()
            .fold(0u64, |h, &b| h.rotate_left(5) ^ u64::from(b));
        out.push((c.guest_offset.0, c.data.len(), digest));
        chunks.recycle(c.data);
    }
    out
}

/// A qcow2 stream, decoded from memory and again in short reads:
/// both must give the same chunks.
pub fn qcow2_stream(data: &[u8]) {
    let whole = decode_stream(Cursor::new(data));
    let trickled = decode_stream(Trickle { data, pos: 0 });
    // Errors may be met at different stream positions; the chunks before
    // them must agree.
    let ok = |v: &[(u64, usize, u64)]| v.iter().take_while(|c| c.0 != u64::MAX).count();
    let n = ok(&whole).min(ok(&trickled));
    assert_eq!(whole[..n], trickled[..n]);
    assert_eq!(
        whole.len(),
        trickled.len(),
        "one decode failed, not the other"
    );
}

/// A bmap file: refused, or accepted with ranges in order inside the image
/// that add up to its mapped size, and written back as text that reads as
/// the same bmap.
pub fn bmap(data: &[u8]) {
    let Ok(b) = Bmap::parse(data, "fuzz.bmap") else {
        return;
    };
    let mut end = 0;
    let mut mapped = 0;
    for (bytes, _) in b.byte_ranges() {
        assert!(end <= bytes.start && bytes.start < bytes.end, "{bytes:?}");
        assert!(bytes.end <= b.image_size(), "{bytes:?} past the image");
        mapped += bytes.end - bytes.start;
        end = bytes.end;
    }
    assert_eq!(mapped, b.mapped_bytes());
    let again = Bmap::parse(b.to_xml().as_bytes(), "again.bmap")
        .unwrap_or_else(|e| panic!("what to_xml wrote is refused: {e}"));
    assert_eq!(again.ranges(), b.ranges());
    assert_eq!(
        (again.image_size(), again.block_size()),
        (b.image_size(), b.block_size())
    );
    // A bmap without range checksums is written as `bmaptool create
    // --no-checksum` writes one, with a ChecksumType for the file's own.
    if b.ranges().iter().any(|r| r.checksum.is_some()) {
        assert_eq!(again.checksum_type(), b.checksum_type());
    }
}

/// Takes `n` bytes off the front of `data`, if it has them.
fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (a, b) = data.split_at_checked(n)?;
    *data = b;
    Some(a)
}

/// What a server says, as the sans-IO client hears it. The first byte
/// picks the client's options; the rest is the server's side of the
/// handshake, fed in the pieces [`Handshake::wanted`] asks for, then its
/// replies, in any order, to the requests [`nbd_requests`] sends: fed to
/// the very [`Transmission`] the blocking client drives, through the same
/// [`Transmission::step`].
pub fn nbd_client(data: &[u8]) {
    let _ = nbd_conversation(data);
}

/// What [`nbd_client`] runs: the requests sent, the completions received,
/// and the bytes left over; `None` when the handshake does not finish.
pub fn nbd_conversation(data: &[u8]) -> Option<(Vec<Op>, Vec<Completion>, usize)> {
    let (&opts, mut data) = data.split_first()?;
    let neg = handshake(opts, &mut data)?;
    let bs = neg.block_size;
    assert!(bs.minimum.is_power_of_two() && bs.minimum <= bs.preferred.max(bs.minimum));
    let mut t = Transmission::new(&neg);
    let l = t.limits();
    assert!(l.alignment.is_power_of_two() && l.preferred.is_multiple_of(l.alignment));
    assert!(l.max_payload.is_multiple_of(l.alignment) && l.max_payload <= 32 << 20);
    assert!(l.max_effect.is_multiple_of(l.alignment));
    if neg.mode != HeaderMode::Extended {
        assert!(
            l.max_effect <= (1 << 32) - 65536,
            "compact effect {:#x}",
            l.max_effect
        );
    }

    let (read_len, sent) = nbd_requests(opts, &neg, &mut t);
    t.clear_output();
    let mut buf = vec![0u8; read_len as usize];
    let mut source = |dst: &mut [u8]| data.read_exact(dst);
    let mut done = Vec::new();
    while t.want() != Want::Nothing {
        match t.step(&mut buf, &mut source) {
            Ok(Some(c)) => {
                completed(&neg, &c);
                done.push(c);
            }
            Ok(None) => {}
            Err(_) => break,
        }
    }
    Some((sent, done, data.len()))
}

/// The requests the `nbd_client` target sends, as the client would: a
/// read of up to 64 KiB (and the maximum payload) at 0 (cookie 1), block status of up to 1 MiB at 0
/// for every context, and with bit 7 of `opts` a write, write zeroes, trim
/// and flush at 0 where the export allows them. Returns the read length
/// and the requests sent.
pub fn nbd_requests(opts: u8, neg: &Negotiated, t: &mut Transmission) -> (u64, Vec<Op>) {
    let l = t.limits();
    let a = l.alignment;
    let mut sent = Vec::new();
    // As Client::read splits: never more than the maximum payload.
    let read_len = neg.size.min(65536).min(l.max_payload) / a * a;
    if read_len > 0 {
        let op = Op::Read {
            offset: 0,
            length: read_len,
            dest: 0,
        };
        t.request(op).expect("an aligned read inside the export");
        sent.push(op);
    }
    if neg.size > 0 && neg.mode.structured() && !neg.contexts.is_empty() {
        let op = Op::BlockStatus {
            offset: 0,
            length: neg.size.min(1 << 20),
            req_one: opts & 0x40 != 0,
        };
        t.request(op).expect("status inside the export");
        sent.push(op);
    }
    if opts & 0x80 != 0 && read_len > 0 {
        let length = a;
        let ops = [
            Op::Write {
                offset: 0,
                length,
                fua: true,
            },
            Op::WriteZeroes {
                offset: 0,
                length,
                flags: ZeroFlags {
                    no_hole: true,
                    fast: true,
                    fua: false,
                },
            },
            Op::Trim {
                offset: 0,
                length,
                fua: false,
            },
            Op::Flush,
        ];
        for op in ops {
            // Refused when the export does not offer it: nothing is sent.
            if t.request(op).is_ok() {
                sent.push(op);
            }
        }
    }
    (read_len, sent)
}

/// A completed request: its reply must lie inside the request; block
/// status becomes the maps the tools print.
fn completed(neg: &Negotiated, c: &Completion) {
    let Ok(Reply::Status(results)) = &c.outcome else {
        return;
    };
    let range = c.offset..c.offset + c.length;
    for (id, descriptors) in results {
        let name = neg
            .contexts
            .iter()
            .find(|x| x.id == *id)
            .map_or("", |x| x.name.as_str());
        // Clipped to the request, as `Client::block_status_once` does.
        let extents = sparsekit_nbd::status::clip(c.offset, descriptors, &range);
        for e in &extents {
            assert!(e.offset >= range.start && e.end() <= range.end, "{e:?}");
            let _ = e.to_extent();
            let _ = sparsekit_nbd::map::nbdinfo_description(name, e.flags);
        }
        let _ = sparsekit_nbd::map::nbdinfo_map(name, extents.iter().copied());
        let _ = sparsekit_nbd::map::qemu_img_map(extents);
    }
}

/// What the client asks for, from the first byte of the input: bit 0
/// structured replies, bit 1 extended headers, bit 2 list contexts, bit 3
/// a named export, bits 4-5 no context, `base:allocation`, or that and a
/// dirty bitmap; bits 6 and 7 are for [`nbd_requests`]:
/// `NBD_CMD_FLAG_REQ_ONE`, and writes.
fn nbd_config(opts: u8) -> HandshakeConfig {
    let contexts = match opts >> 4 & 3 {
        0 => vec![],
        1 => vec!["base:allocation".to_owned()],
        _ => vec![
            "base:allocation".to_owned(),
            "qemu:dirty-bitmap:b".to_owned(),
        ],
    };
    HandshakeConfig {
        export: if opts & 8 != 0 {
            "disk".into()
        } else {
            String::new()
        },
        contexts,
        structured_replies: opts & 1 != 0,
        extended_headers: opts & 2 != 0,
        list_contexts: opts & 4 != 0,
        // The fuzzer's bytes stand for a server in clear: with TLS the
        // bytes after STARTTLS would be TLS records, not NBD.
        tls: TlsMode::Off,
    }
}

/// Runs the handshake on the front of `data`, in the pieces the machine
/// asks for, as `Client` does; `None` when it fails or the bytes run out.
fn handshake(opts: u8, data: &mut &[u8]) -> Option<Negotiated> {
    let mut hs = Handshake::new(nbd_config(opts)).expect("a valid config");
    let neg = loop {
        let _ = hs.take_output();
        let n = hs.wanted();
        // Client::connect would reach `unreachable!` here.
        assert!(n > 0, "the handshake wants no bytes but is not done");
        match hs.feed(take(data, n)?) {
            Ok(Some(neg)) => break neg,
            Ok(None) => {}
            Err(_) => return None,
        }
    };
    assert!(hs.is_done() && hs.wanted() == 0);
    Some(neg)
}
