//! Damaged, hostile and unsupported streams: each is a typed error that
//! says why, never a panic, never a wrong disk.

mod common;
mod stream_support;

use common::Dir;
use sparsekit_qcow2::{
    Error, Header, StreamDecoder, StreamError, StreamLayout, StreamLimits, write_stream,
};
use stream_support::{
    Trickle, assert_check_clean, assert_compare_equal, decode_piped, decode_trickled, drain, fill,
    get64, load, put64, save,
};

const CS: u64 = 4096;

/// A stream of 4 KiB clusters over an 8 MiB disk with data at 0, 4k, 3M
/// and 5M: three L2 tables (one covers 2 MiB).
fn base() -> (Vec<u8>, StreamLayout) {
    let data = [0..8192, 3 << 20..(3 << 20) + 4096, 5 << 20..(5 << 20) + 100];
    let layout = StreamLayout::new(8 << 20, 12, data).unwrap();
    let stream = write_stream(Vec::new(), &layout, |g, buf| {
        fill(buf, g.0 / CS * 2 + 1);
        Ok(())
    })
    .unwrap();
    (stream, layout)
}

/// Offsets of the L1 table and the L2 tables of a stream.
fn tables(stream: &[u8]) -> (u64, Vec<u64>) {
    let h = Header::parse(stream).unwrap();
    let l1 = h.l1_table_offset.0;
    let l2 = (0..u64::from(h.l1_size))
        .map(|i| get64(stream, (l1 + 8 * i) as usize) & 0x00ff_ffff_ffff_fe00)
        .filter(|&o| o != 0)
        .collect();
    (l1, l2)
}

fn cluster(stream: &mut [u8], at: u64) -> &mut [u8] {
    &mut stream[at as usize..(at + CS) as usize]
}

fn swap_clusters(stream: &mut [u8], a: u64, b: u64) {
    let tmp = cluster(stream, a).to_vec();
    let other = cluster(stream, b).to_vec();
    cluster(stream, a).copy_from_slice(&other);
    cluster(stream, b).copy_from_slice(&tmp);
}

fn decode_err(stream: &[u8]) -> StreamError {
    let e = decode_piped(stream.to_vec()).expect_err("decoding must fail");
    let e2 = decode_trickled(stream).expect_err("decoding must fail");
    assert_eq!(
        e.to_string(),
        e2.to_string(),
        "same error however it is read"
    );
    e
}

#[test]
fn the_base_stream_decodes() {
    let (stream, layout) = base();
    let disk = decode_piped(stream).unwrap();
    assert_eq!(disk.len() as u64, layout.virtual_size());
}

#[test]
fn truncated_streams() {
    let (stream, layout) = base();
    let (l1, l2) = tables(&stream);
    let data = layout.data_offset().0;
    let len = stream.len() as u64;
    let cases: &[(u64, &str)] = &[
        (0, "header"),
        (3, "header"),
        (50, "header"),
        (100, "header"),
        (300, "refcount table"),
        (CS - 1, "refcount table"),
        (CS, "refcount table"),
        (CS + 8, "refcount table"),
        (2 * CS + 10, "refcount block"),
        (l1 + 4, "L1 table"),
        (l2[0] + 100, "L2 table"),
        (l2[1], "L2 table"),
        (data, "beyond"),
        (data + 100, "data cluster"),
        (len - CS, "beyond"),
        (len - 1, "data cluster"),
    ];
    for &(cut, want) in cases {
        let e = decode_err(&stream[..cut as usize]);
        let ok = match (&e, want) {
            (
                StreamError::Header {
                    source: Error::TruncatedHeader { .. },
                },
                "header",
            ) => true,
            (StreamError::Truncated { what, end, .. }, w) => *what == w && *end == cut,
            (StreamError::BeyondEnd { end, .. }, "beyond") => *end == cut,
            _ => false,
        };
        assert!(ok, "cut at {cut:#x}: expected {want}, got {e:?}");
    }
    let e = decode_err(&stream[..(l1 + 4) as usize]);
    assert_eq!(
        e.to_string(),
        format!(
            "the stream ends at {:#x}, short of the L1 table at {l1:#x}..{:#x}: truncated stream",
            l1 + 4,
            l1 + 32
        )
    );
    let e = decode_err(&stream[..data as usize]);
    assert_eq!(
        e.to_string(),
        format!(
            "4 referenced data clusters lie beyond the end of the stream at {data:#x}, \
             the first for guest 0x0 at host {data:#x}"
        )
    );
}

#[test]
fn every_cut_is_an_error_and_the_whole_stream_is_not() {
    let (stream, _) = base();
    for cut in (0..stream.len()).step_by(97) {
        decode_trickled(&stream[..cut]).expect_err("a cut stream");
    }
    decode_trickled(&stream).unwrap();
}

/// A valid image for qemu, but the second L2 table comes after the last
/// data cluster.
#[test]
fn l2_table_after_data() {
    let d = Dir::new();
    let (mut stream, _) = base();
    save(&d, "base.qcow2", &stream);
    let (l1, l2) = tables(&stream);
    let last = stream.len() as u64 - CS;
    // The L2 entry of guest 5M (entry 256 of the third table) points to
    // the last cluster; swap that cluster with the table.
    let entry = l2[2] + 256 * 8;
    assert_eq!(get64(&stream, entry as usize), last | 1 << 63);
    put64(&mut stream, entry as usize, l2[2] | 1 << 63);
    swap_clusters(&mut stream, l2[2], last);
    put64(&mut stream, (l1 + 16) as usize, last | 1 << 63);
    save(&d, "moved.qcow2", &stream);
    assert_check_clean(&d, "moved.qcow2");
    assert_compare_equal(&d, "base.qcow2", "qcow2", "moved.qcow2", "qcow2");
    let e = decode_err(&stream);
    assert_eq!(
        e.to_string(),
        format!(
            "the L2 table at {last:#x} comes after data at {:#x}: not a forward-only stream",
            l2[2]
        )
    );
}

/// A valid image for qemu, but the L1 table comes after an L2 table.
#[test]
fn l2_table_before_the_l1_table() {
    let d = Dir::new();
    let (mut stream, _) = base();
    save(&d, "base.qcow2", &stream);
    let (l1, l2) = tables(&stream);
    swap_clusters(&mut stream, l1, l2[0]);
    put64(&mut stream, 40, l2[0]); // header: l1_table_offset
    put64(&mut stream, l2[0] as usize, l1 | 1 << 63);
    save(&d, "moved.qcow2", &stream);
    assert_check_clean(&d, "moved.qcow2");
    assert_compare_equal(&d, "base.qcow2", "qcow2", "moved.qcow2", "qcow2");
    let e = decode_err(&stream);
    assert!(
        matches!(
            e,
            StreamError::TableBehind {
                what: "L2 table",
                referrer: "L1 table",
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!(
            "the L2 table at {l1:#x} lies before the L1 table at {:#x} that points to it: \
             not a forward-only stream",
            l2[0]
        )
    );
}

#[test]
fn duplicate_reference() {
    let (mut stream, layout) = base();
    let (_, l2) = tables(&stream);
    let first = layout.data_offset().0;
    // Guest 4k points at guest 0's host cluster.
    put64(&mut stream, (l2[0] + 8) as usize, first | 1 << 63);
    let e = decode_err(&stream);
    assert_eq!(
        e.to_string(),
        format!("guest clusters 0x1000 and 0x0 both map to host {first:#x}: duplicate reference")
    );
}

#[test]
fn data_cluster_on_a_table() {
    let (mut stream, _) = base();
    let (l1, l2) = tables(&stream);
    put64(&mut stream, (l2[0] + 8) as usize, l1 | 1 << 63);
    let e = decode_err(&stream);
    assert_eq!(
        e.to_string(),
        format!("the data cluster at {l1:#x} overlaps the L1 table at {l1:#x}")
    );
}

#[test]
fn reference_past_the_end() {
    let (mut stream, _) = base();
    let (_, l2) = tables(&stream);
    let len = stream.len() as u64;
    let far = len + 16 * CS;
    put64(&mut stream, (l2[0] + 8) as usize, far | 1 << 63);
    let e = decode_err(&stream);
    assert_eq!(
        e.to_string(),
        format!(
            "1 referenced data clusters lie beyond the end of the stream at {len:#x}, \
             the first for guest 0x1000 at host {far:#x}"
        )
    );
}

#[test]
fn garbage_after_the_magic() {
    let mut garbage = vec![0u8; 8192];
    fill(&mut garbage, 7);
    garbage[..4].copy_from_slice(b"QFI\xfb");
    let e = decode_err(&garbage);
    assert!(matches!(e, StreamError::Header { .. }), "{e:?}");
    let mut no_magic = garbage.clone();
    no_magic[0] = b'X';
    let e = decode_err(&no_magic);
    assert!(
        matches!(
            e,
            StreamError::Header {
                source: Error::BadMagic { .. }
            }
        ),
        "{e:?}"
    );
    // Valid fixed fields, then garbage everywhere else.
    let (stream, _) = base();
    for seed in 0..64 {
        let mut s = stream.clone();
        fill(&mut s[104..], seed * 2 + 1);
        let _ = drain(Trickle {
            inner: &s[..],
            n: 0,
        });
    }
}

#[test]
fn flipped_metadata_bytes_never_panic() {
    let (stream, layout) = base();
    let meta = layout.data_offset().0 as usize;
    let mut x = 0x1234_5678_9abc_def1u64;
    for _ in 0..400 {
        let mut s = stream.clone();
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % meta as u64) as usize;
            s[at] ^= 1 << (x >> 60 & 7);
        }
        // Either an error or some disk: the test is that it returns.
        let _ = drain(Trickle {
            inner: &s[..],
            n: 0,
        });
    }
}

#[test]
fn invalid_entries() {
    let (mut stream, layout) = base();
    let (_, l2) = tables(&stream);
    let mut bad = stream.clone();
    put64(&mut bad, (l2[0] + 8) as usize, layout.data_offset().0 | 2); // bit 1
    let e = decode_err(&bad);
    assert!(
        matches!(
            e,
            StreamError::Entry {
                source: Error::BadL2Entry { index: 1, .. }
            }
        ),
        "{e:?}"
    );
    // A compressed descriptor over random bytes does not decompress.
    let host = layout.data_offset().0;
    put64(&mut stream, l2[0] as usize, 1 << 62 | host);
    let e = decode_err(&stream);
    assert!(
        matches!(e, StreamError::Decompress { guest: 0, .. }),
        "{e:?}"
    );
}

#[test]
fn header_flags_refused() {
    let (stream, _) = base();
    let mut s = stream.clone();
    put64(&mut s, 72, 1 << 20); // unknown incompatible bit
    let e = decode_err(&s);
    assert!(
        matches!(
            e,
            StreamError::Header {
                source: Error::UnknownIncompatible { .. }
            }
        ),
        "{e:?}"
    );
    let mut s = stream.clone();
    put64(&mut s, 72, 2); // corrupt
    assert!(matches!(decode_err(&s), StreamError::Corrupt));
    let mut s = stream;
    s[200..210].copy_from_slice(b"base.qcow2");
    put64(&mut s, 8, 200);
    s[16..20].copy_from_slice(&10u32.to_be_bytes());
    assert_eq!(
        decode_err(&s).to_string(),
        "the image has a backing file \"base.qcow2\": \
         a stream with a backing file can not be decoded alone"
    );
}

#[test]
fn metadata_cap() {
    let (stream, _) = base();
    let limits = StreamLimits {
        max_metadata_bytes: 3 * CS,
    };
    let e = StreamDecoder::with_limits(&stream[..], limits)
        .unwrap()
        .read_tables()
        .unwrap_err();
    assert!(
        matches!(e, StreamError::TooMuchMetadata { what: "tables", .. }),
        "{e:?}"
    );
}

#[test]
fn images_qemu_makes_that_a_stream_can_not_carry() {
    let d = Dir::new();
    d.create("base.qcow2", "", "1M");
    d.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "base.qcow2",
        "top.qcow2",
    ]);
    let e = decode_err(&load(&d, "top.qcow2"));
    assert!(
        matches!(&e, StreamError::BackingFile { name } if name == "base.qcow2"),
        "{e:?}"
    );

    d.create("ext.qcow2", "data_file=ext.raw", "1M");
    let e = decode_err(&load(&d, "ext.qcow2"));
    assert!(
        matches!(&e, StreamError::ExternalDataFile { name: Some(n) } if n == "ext.raw"),
        "{e:?}"
    );

    d.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=hunter2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        "enc.qcow2",
        "1M",
    ]);
    let e = decode_err(&load(&d, "enc.qcow2"));
    assert!(
        matches!(
            e,
            StreamError::Header {
                source: Error::Encrypted { .. }
            }
        ),
        "{e:?}"
    );
}
