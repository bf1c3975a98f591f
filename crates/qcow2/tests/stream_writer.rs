//! The stream writer against qemu: its output must pass `qemu-img check`
//! clean, be equal to its source for `qemu-img compare`, lie in the
//! forward layout, and decode back through a pipe to the source bytes.

mod common;
mod stream_support;

use common::Dir;
use sparsekit_qcow2::{
    GuestOffset, Header, Image, StreamLayout, StreamWriter, WriteError, write_stream,
};
use stream_support::{
    assert_check_clean, assert_compare_equal, assert_disk_eq, decode_piped, get64, qemu_raw,
    raw_disk, save,
};

/// Writes a stream of `raw` with data in `ranges`, checks it with qemu
/// and decodes it back.
fn write_raw(size: u64, data: &[(u64, u64)], ranges: &[(u64, u64)], cluster_bits: u32) {
    let d = Dir::new();
    let raw = raw_disk(size, data);
    save(&d, "src.raw", &raw);
    let layout = StreamLayout::new(size, cluster_bits, ranges.iter().map(|&(o, l)| o..o + l))
        .expect("layout");
    let stream = write_stream(Vec::new(), &layout, |g, buf| {
        // Past the end of an unaligned source: zeros, as qemu reads it.
        let start = (g.0 as usize).min(raw.len());
        let end = (g.0 as usize + buf.len()).min(raw.len());
        buf[..end - start].copy_from_slice(&raw[start..end]);
        Ok(())
    })
    .expect("write");
    assert_eq!(stream.len() as u64, layout.stream_len());
    assert_layout(&stream, &layout);
    save(&d, "w.qcow2", &stream);
    assert_check_clean(&d, "w.qcow2");
    assert_compare_equal(&d, "src.raw", "raw", "w.qcow2", "qcow2");
    let expected = qemu_raw(&d, "w.qcow2", "qcow2");
    let mut padded = raw.clone();
    padded.resize(size.next_multiple_of(512) as usize, 0);
    assert_disk_eq(&expected, &padded, "qemu's reading of the stream");
    assert_disk_eq(&decode_piped(stream).unwrap(), &padded, "decoded stream");
}

/// The qcow2-to-stdout.py layout: header, refcount table, refcount
/// blocks, L1, L2 tables, data clusters in guest order.
fn assert_layout(stream: &[u8], layout: &StreamLayout) {
    let h = Header::parse(stream).unwrap();
    let cs = h.cluster_size();
    assert_eq!(h.version, 3);
    assert_eq!(h.refcount_bits(), 16);
    assert_eq!(h.size, layout.virtual_size());
    assert_eq!(h.refcount_table_offset.0, cs);
    let rb = get64(stream, cs as usize);
    assert_eq!(rb, cs * (1 + u64::from(h.refcount_table_clusters)));
    if h.l1_size > 0 {
        assert!(h.l1_table_offset.0 > rb);
    }
    // Every L2 entry points at the data area, in guest order.
    let mut next = layout.data_offset().0;
    let l1_off = h.l1_table_offset.0 as usize;
    for i in 0..h.l1_size as usize {
        let l2 = get64(stream, l1_off + 8 * i) & 0x00ff_ffff_ffff_fe00;
        if l2 == 0 {
            continue;
        }
        assert!(l2 > h.l1_table_offset.0 && l2 < layout.data_offset().0);
        for j in 0..(cs / 8) as usize {
            let e = get64(stream, l2 as usize + 8 * j);
            if e != 0 {
                assert_eq!(e, next | 1 << 63);
                next += cs;
            }
        }
    }
    assert_eq!(next, stream.len() as u64);
}

#[test]
fn empty() {
    write_raw(1 << 20, &[], &[], 16);
}

#[test]
fn zero_sized_disk() {
    write_raw(0, &[], &[], 16);
}

#[test]
fn full() {
    write_raw(1 << 20, &[(0, 1 << 20)], &[(0, 1 << 20)], 16);
}

#[test]
fn sparse_with_zero_clusters_inside_the_ranges() {
    // The second range holds only zeros: written as data all the same.
    let data = [(70_000, 5_000), (3 << 20, 200_000)];
    let ranges = [(70_000, 5_000), (1 << 20, 65536), (3 << 20, 200_000)];
    write_raw(4 << 20, &data, &ranges, 16);
}

#[test]
fn unaligned_size() {
    // 1_000_037 is rounded up to 1_000_448, as qemu-img create rounds it.
    let size = 1_000_037;
    write_raw(
        size,
        &[(0, 10), (900_000, 100_037)],
        &[(0, 10), (900_000, 100_037)],
        16,
    );
}

#[test]
fn clusters_of_512_bytes_with_a_multi_cluster_refcount_table() {
    // 24576 data clusters: 99 refcount blocks, 2 refcount table clusters.
    let size = 12 << 20;
    write_raw(size, &[(0, size)], &[(0, size)], 9);
}

#[test]
fn clusters_of_512_bytes_sparse() {
    let data = [(1000, 3000), (1 << 20, 512), (5 << 20, 70_000)];
    write_raw(6 << 20, &data, &data, 9);
}

#[test]
fn clusters_of_2_mib() {
    let data = [(100, 3 << 20), (8 << 20, 1 << 20)];
    write_raw(9 << 20, &data, &data, 21);
}

#[test]
fn many_l2_tables() {
    // 4 KiB clusters: one L2 table covers 2 MiB.
    let data: Vec<(u64, u64)> = (0..20).map(|i| (i * 1_700_000 + 99, 10_000)).collect();
    write_raw(40 << 20, &data, &data, 12);
}

/// The use `copy -` has in mind in reverse: a qcow2 source's map gives
/// the ranges, its reader the clusters.
#[test]
fn from_a_qcow2_source() {
    let d = Dir::new();
    d.create("src.qcow2", "", "3M");
    d.io(
        "src.qcow2",
        &[
            "write -P 1 0 100k",
            "write -z 1M 64k",
            "write -c -P 2 2M 64k",
            "write -P 3 3000k 72k",
        ],
    );
    let img = Image::open(d.path("src.qcow2")).unwrap();
    let ranges: Vec<_> = img
        .map_all()
        .map(Result::unwrap)
        .filter(|e| e.data)
        .map(|e| e.start..e.start + e.length)
        .collect();
    let layout = StreamLayout::new(img.virtual_size(), 16, ranges).unwrap();
    let stream = write_stream(Vec::new(), &layout, |g, buf| {
        img.read_at(buf, g.0).map_err(std::io::Error::other)
    })
    .unwrap();
    save(&d, "w.qcow2", &stream);
    assert_check_clean(&d, "w.qcow2");
    assert_compare_equal(&d, "src.qcow2", "qcow2", "w.qcow2", "qcow2");
    let expected = qemu_raw(&d, "src.qcow2", "qcow2");
    assert_disk_eq(&decode_piped(stream).unwrap(), &expected, "decoded");
}

#[test]
fn push_api_checks_order_length_and_completeness() {
    let layout = StreamLayout::new(1 << 20, 16, [0..1, 200_000..300_000]).unwrap();
    let order: Vec<u64> = layout.clusters().map(|g| g.0).collect();
    assert_eq!(order, [0, 0x30000, 0x40000]);
    let mut w = StreamWriter::new(Vec::new(), &layout).unwrap();
    assert_eq!(w.next_cluster(), Some(GuestOffset(0)));
    w.write_cluster(GuestOffset(0), &[1; 100]).unwrap();
    let e = w.write_cluster(GuestOffset(0x40000), &[2; 10]).unwrap_err();
    assert!(
        matches!(
            e,
            WriteError::OutOfOrder {
                got: 0x40000,
                expected: 0x30000
            }
        ),
        "{e}"
    );
    let e = w
        .write_cluster(GuestOffset(0x30000), &vec![0; 65537])
        .unwrap_err();
    assert!(matches!(e, WriteError::ClusterTooLong { .. }), "{e}");
    w.write_cluster(GuestOffset(0x30000), &[3; 65536]).unwrap();
    let e = StreamWriter::new(Vec::new(), &layout)
        .unwrap()
        .finish()
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "3 of 3 data clusters not written, the first at guest 0x0"
    );
    w.write_cluster(GuestOffset(0x40000), &[4; 65536]).unwrap();
    let e = w.write_cluster(GuestOffset(0x50000), &[5]).unwrap_err();
    assert!(matches!(e, WriteError::NoMoreClusters { got: 0x50000 }));
    let out = w.finish().unwrap();
    assert_eq!(out.len() as u64, layout.stream_len());
}

#[test]
fn layout_refuses_bad_parameters() {
    let e = StreamLayout::new(1 << 20, 22, []).unwrap_err();
    assert!(matches!(e, WriteError::ClusterBits { cluster_bits: 22 }));
    let e = StreamLayout::new(1 << 20, 16, std::iter::once(1000..2 << 20)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "data range 0x3e8..0x200000 ends past the virtual size 0x100000"
    );
    // 512-byte clusters: 64 entries per L2 table, so 1 TiB needs a
    // 256 MiB L1 table.
    let e = StreamLayout::new(1 << 40, 9, []).unwrap_err();
    assert!(
        matches!(
            e,
            WriteError::TooLarge {
                what: "an L1 table",
                ..
            }
        ),
        "{e}"
    );
    // A full disk of 512-byte clusters past the 8 MiB refcount table.
    let e = StreamLayout::new(1 << 37, 9, std::iter::once(0..1 << 37)).unwrap_err();
    assert!(
        matches!(
            e,
            WriteError::TooLarge {
                what: "a refcount table",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn source_errors_name_the_cluster() {
    let layout = StreamLayout::new(1 << 20, 16, std::iter::once(65536..65537)).unwrap();
    let e = write_stream(Vec::new(), &layout, |_, _| {
        Err(std::io::Error::other("disk on fire"))
    })
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "reading guest cluster 0x10000 from the source"
    );
}
