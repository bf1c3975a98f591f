//! `--skip`, `--offset` and `--length` on random sparse layouts, against
//! the Python port of the original filemap `sparse_copy` (which took skip,
//! seek and length) and against a model of the bytes.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use sparsekit_testkit::{Rng, require, workspace_root};

/// A sparse file of up to 3 MiB with a few runs of data; its bytes.
fn make_source(path: &Path, rng: &mut Rng) -> Vec<u8> {
    let size = 1 + rng.below(3 << 20);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut model = vec![0u8; size as usize];
    for _ in 0..rng.below(10) {
        let at = rng.below(size);
        let len = (1 + rng.below(300_000)).min(size - at);
        let fill = 1 + rng.below(255) as u8;
        let data: Vec<u8> = (0..len).map(|i| fill ^ (i / 512) as u8 | 1).collect();
        f.write_all_at(&data, at).unwrap();
        model[at as usize..(at + len) as usize].copy_from_slice(&data);
    }
    model
}

fn copy(src: &Path, dst: &Path, skip: u64, offset: u64, length: u64) {
    let o = Command::new(env!("CARGO_BIN_EXE_copy"))
        .args(["--skip", &skip.to_string(), "--offset", &offset.to_string()])
        .args(["--length", &length.to_string()])
        .arg(src)
        .arg(dst)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "copy --skip {skip} --offset {offset} --length {length}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn sparse_copy(src: &Path, dst: &Path, skip: u64, offset: u64, length: u64) {
    let port = workspace_root().join("xtask/bench/sparse_copy.py");
    let o = Command::new(require("python3"))
        .arg(port)
        .arg(src)
        .arg(dst)
        .args(["--skip", &skip.to_string(), "--offset", &offset.to_string()])
        .args(["--length", &length.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "sparse_copy.py: {o:?}");
}

#[test]
fn skip_offset_and_length_match_sparse_copy_and_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let (src, ours, theirs) = (
        dir.path().join("src.raw"),
        dir.path().join("ours.raw"),
        dir.path().join("theirs.raw"),
    );
    for seed in 0..40u64 {
        let mut rng = Rng(seed);
        let model = make_source(&src, &mut rng);
        let size = model.len() as u64;
        let skip = rng.below(size + 1);
        let length = rng.below(size - skip + 1);
        let offset = rng.below(2 << 20);
        let what =
            format!("seed {seed}: size {size}, skip {skip}, length {length}, offset {offset}");
        for p in [&ours, &theirs] {
            let _ = std::fs::remove_file(p);
        }
        // A new DEST: both tools create it at offset + length.
        copy(&src, &ours, skip, offset, length);
        sparse_copy(&src, &theirs, skip, offset, length);
        let (a, b) = (
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
        );
        assert_eq!(a.len() as u64, offset + length, "{what}");
        assert!(a == b, "{what}: differs from sparse_copy");
        let slice = &model[skip as usize..(skip + length) as usize];
        assert!(
            &a[offset as usize..] == slice,
            "{what}: differs from the model"
        );
        assert!(a[..offset as usize].iter().all(|&x| x == 0), "{what}");

        // An existing DEST full of 0xab: only the copied range changes, holes
        // of the source included (where sparse_copy would leave stale bytes).
        let old = (rng.below(4 << 20) as usize).max(1);
        std::fs::write(&ours, vec![0xabu8; old]).unwrap();
        copy(&src, &ours, skip, offset, length);
        let a = std::fs::read(&ours).unwrap();
        let end = (offset + length) as usize;
        assert_eq!(a.len(), old.max(end), "{what}: existing DEST of {old}");
        assert!(&a[offset as usize..end] == slice, "{what}: existing DEST");
        let (start, kept) = (offset as usize, (offset as usize).min(old));
        assert!(
            a[..kept].iter().all(|&x| x == 0xab),
            "{what}: before the range"
        );
        assert!(
            a[kept..start].iter().all(|&x| x == 0),
            "{what}: grown to the range"
        );
        assert!(
            a[end..].iter().all(|&x| x == 0xab),
            "{what}: after the range"
        );
    }
}

#[test]
fn a_range_past_the_end_is_refused_before_dest_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    std::fs::write(&src, vec![1u8; 1 << 20]).unwrap();
    std::fs::write(&dst, b"keep").unwrap();
    for args in [
        ["--skip", "2M", "--length", "0"],
        ["--skip", "512k", "--length", "513k"],
        ["--skip", "0", "--length", "1025k"],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_copy"))
            .args(args)
            .arg(&src)
            .arg(&dst)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("src.raw: cannot"), "{args:?}: {err}");
        assert_eq!(std::fs::read(&dst).unwrap(), b"keep", "{args:?}");
    }
}
