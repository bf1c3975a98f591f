//! Damaged images never panic: a qemu-made image with every feature is
//! mutated byte by byte (deterministic xorshift), and every entry point
//! must return a value or an error.

mod common;

use common::Dir;
use sparsekit_qcow2::{Image, Qcow2};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Every metadata structure of `path`: header, L1, L2, refcounts,
/// bitmaps, snapshots. Offsets of interesting bytes to mutate.
fn exercise(path: &std::path::Path) {
    if let Ok(img) = Image::open(path) {
        let end = img.virtual_size().min(1 << 20);
        if let Ok(m) = img.map(0..end) {
            let _ = m.take(10_000).count();
        }
        let mut buf = vec![0u8; 64 << 10];
        for off in [0u64, 64 << 10, 512 << 10] {
            if off + buf.len() as u64 <= img.virtual_size() {
                let _ = img.read_at(&mut buf, off);
            }
        }
    }
    if let Ok(q) = Qcow2::open(path) {
        let _ = q.check();
        let _ = q.info();
        let _ = q.write_allocation_bitmap(&mut std::io::sink());
        if let Ok(r) = q.dirty_ranges("b") {
            let _ = r.take(10_000).count();
        }
    }
}

#[test]
fn mutated_images_return_errors_not_panics() {
    let d = Dir::new();
    d.create("a.qcow2", "cluster_size=4k", "1M");
    d.img(&["bitmap", "--add", "-g", "4k", "a.qcow2", "b"]);
    d.io(
        "a.qcow2",
        &[
            "write -P 1 0 16k",
            "write -c -P 2 64k 4k",
            "write -z 128k 8k",
            "write -P 3 900k 8k",
        ],
    );
    d.img(&["snapshot", "-c", "s", "a.qcow2"]);
    d.io("a.qcow2", &["write -P 4 0 4k"]);
    let pristine = std::fs::read(d.path("a.qcow2")).unwrap();
    // Metadata lives in the first clusters and wherever qemu put tables;
    // mutate anywhere, with a bias towards the first 64 KiB.
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let target = d.path("m.qcow2");
    for round in 0..1500 {
        let mut img = pristine.clone();
        let flips = 1 + rng.next() % 4;
        for _ in 0..flips {
            let span = if rng.next().is_multiple_of(4) {
                img.len() as u64
            } else {
                (64 << 10).min(img.len() as u64)
            };
            let at = (rng.next() % span) as usize;
            img[at] = match rng.next() % 3 {
                0 => img[at] ^ (1 << (rng.next() % 8)),
                1 => rng.next() as u8,
                _ => 0xff,
            };
        }
        std::fs::write(&target, &img).unwrap();
        let r = std::panic::catch_unwind(|| exercise(&target));
        assert!(r.is_ok(), "round {round} panicked");
    }
}
