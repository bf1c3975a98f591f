//! Shared helpers: run qemu-img / qemu-io in a temp dir and compare.

#![allow(dead_code)]

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sparsekit_qcow2::{Image, MapEntry, merge_entries};

/// Runs a tool; a missing tool fails the test naming its Debian package.
pub fn run(dir: &Path, tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {tool} ({e}): install the Debian package qemu-utils (nbdinfo: libnbd-bin)")
        });
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A temp dir with fixture builders.
pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Self {
        Dir {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn img(&self, args: &[&str]) -> String {
        run(self.tmp.path(), "qemu-img", args)
    }

    /// `qemu-img create -f qcow2 -o OPTS NAME SIZE`.
    pub fn create(&self, name: &str, opts: &str, size: &str) -> PathBuf {
        let mut a = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.extend([name, size]);
        self.img(&a);
        self.path(name)
    }

    /// Runs qemu-io commands on a qcow2 image.
    pub fn io(&self, name: &str, cmds: &[&str]) {
        self.io_fmt(name, "qcow2", cmds);
    }

    pub fn io_fmt(&self, name: &str, fmt: &str, cmds: &[&str]) {
        let mut a = vec!["-f", fmt];
        for c in cmds {
            a.extend(["-c", c]);
        }
        a.push(name);
        run(self.tmp.path(), "qemu-io", &a);
    }
}

/// Drops the cached pages of every file in `dir` so that SEEK_DATA answers
/// the same for qemu-img and for us (DESIGN.md, fallocated ranges).
pub fn drop_caches(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let f = File::open(e.unwrap().path()).unwrap();
        f.sync_all().unwrap();
        nix::fcntl::posix_fadvise(
            &f,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
    }
}

/// `qemu-img map --output=json`, merged.
pub fn qemu_map(dir: &Path, image: &Path) -> Vec<MapEntry> {
    let out = run(
        dir,
        "qemu-img",
        &["map", "--output=json", image.to_str().unwrap()],
    );
    let v: Vec<MapEntry> = serde_json::from_str(&out).expect("qemu-img map JSON");
    merge_entries(v)
}

/// Our map, merged.
pub fn our_map(image: &Image) -> Vec<MapEntry> {
    merge_entries(image.map_all().collect::<Result<Vec<_>, _>>().unwrap())
}

/// Compares our map with qemu-img's as JSON values.
pub fn assert_map_eq(dir: &Path, image: &Path) -> Vec<MapEntry> {
    drop_caches(dir);
    let ours = {
        let img = Image::open(image).unwrap();
        our_map(&img)
    };
    let theirs = qemu_map(dir, image);
    let a = serde_json::to_value(&ours).unwrap();
    let b = serde_json::to_value(&theirs).unwrap();
    assert_eq!(
        a,
        b,
        "map of {} differs\nours:   {}\nqemu:   {}",
        image.display(),
        serde_json::to_string(&ours).unwrap(),
        serde_json::to_string(&theirs).unwrap()
    );
    ours
}

/// Compares a full read of the virtual disk with `qemu-img convert -O raw`.
pub fn assert_read_eq(dir: &Path, image: &Path) {
    let raw = dir.join("converted.raw");
    run(
        dir,
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let img = Image::open(image).unwrap();
    let size = img.virtual_size();
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), size);
    // Whole clusters, then reads that start and end inside clusters (the
    // compressed ones take another path for those).
    for chunk in [1 << 20, 66_049] {
        let mut f = File::open(&raw).unwrap();
        let mut ours = vec![0u8; chunk];
        let mut theirs = vec![0u8; chunk];
        let mut off = 0;
        while off < size {
            let n = chunk.min((size - off) as usize);
            img.read_at(&mut ours[..n], off).unwrap();
            f.read_exact(&mut theirs[..n]).unwrap();
            if ours[..n] != theirs[..n] {
                let i = (0..n).find(|&i| ours[i] != theirs[i]).unwrap();
                panic!(
                    "{}: byte {:#x} differs in reads of {chunk}: ours {:#x}, qemu {:#x}",
                    image.display(),
                    off + i as u64,
                    ours[i],
                    theirs[i]
                );
            }
            off += n as u64;
        }
    }
    std::fs::remove_file(raw).unwrap();
}

/// Both comparisons.
pub fn assert_same(dir: &Dir, name: &str) -> Vec<MapEntry> {
    let p = dir.path(name);
    let m = assert_map_eq(dir.tmp.path(), &p);
    assert_read_eq(dir.tmp.path(), &p);
    m
}
