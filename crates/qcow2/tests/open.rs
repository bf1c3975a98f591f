//! Opening for the endpoint layer: the format probed on the caller's file
//! descriptor, images opened from it, the caller's hook on every file a
//! chain opens, and the identities of the files an image holds.

mod common;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::Dir;
use sparsekit_qcow2::{Error, FileRole, Format, HookError, Image, OpenOptions, Qcow2, probe};

/// raw base ← mid.qcow2 (external data file mid.data) ← top.qcow2.
fn chain(d: &Dir) -> PathBuf {
    d.img(&["create", "-q", "-f", "raw", "base.raw", "4M"]);
    d.io_fmt("base.raw", "raw", &["write -P 1 0 64k"]);
    d.img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=mid.data",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "mid.qcow2",
        "4M",
    ]);
    d.io("mid.qcow2", &["write -P 2 1M 64k"]);
    d.create(
        "top.qcow2",
        "backing_file=mid.qcow2,backing_fmt=qcow2",
        "4M",
    );
    d.io("top.qcow2", &["write -P 3 2M 64k"]);
    d.path("top.qcow2")
}

type Seen = Arc<Mutex<Vec<(PathBuf, FileRole)>>>;

/// Options whose hook records every call, and refuses `refuse`.
fn recording(refuse: Option<FileRole>) -> (OpenOptions, Seen) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let hook = move |_: &File, path: &Path, role: FileRole| -> Result<(), HookError> {
        log.lock().unwrap().push((path.to_path_buf(), role));
        if Some(role) == refuse {
            return Err(format!("{} is in use", path.display()).into());
        }
        Ok(())
    };
    let opts = OpenOptions {
        on_open: Some(Arc::new(hook)),
        ..OpenOptions::default()
    };
    (opts, seen)
}

fn names(seen: &Seen) -> Vec<(String, FileRole)> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|(p, r)| (p.file_name().unwrap().to_string_lossy().into_owned(), *r))
        .collect()
}

fn id(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap();
    (m.dev(), m.ino())
}

#[test]
fn the_hook_sees_every_file_of_the_chain_with_its_role() {
    let d = Dir::new();
    let top = chain(&d);
    let (opts, seen) = recording(None);
    let img = Image::open_with(&top, &opts).unwrap();
    let want = [
        ("top.qcow2".to_string(), FileRole::Top),
        ("mid.qcow2".to_string(), FileRole::Backing(1)),
        ("mid.data".to_string(), FileRole::DataFile(1)),
        ("base.raw".to_string(), FileRole::Backing(2)),
    ];
    assert_eq!(names(&seen), want);

    // The image holds exactly those files, with their identities.
    let held: Vec<_> = img
        .files()
        .map(|f| {
            (
                f.path.file_name().unwrap().to_string_lossy().into_owned(),
                f.role,
            )
        })
        .collect();
    assert_eq!(held, want);
    let ids: Vec<_> = ["top.qcow2", "mid.qcow2", "mid.data", "base.raw"]
        .iter()
        .map(|n| id(&d.path(n)))
        .collect();
    assert_eq!(img.file_ids(), ids);
    for f in img.files() {
        let m = f.file.metadata().unwrap();
        assert_eq!((m.dev(), m.ino()), f.id, "{}", f.path.display());
    }
}

#[test]
fn a_refusal_stops_the_open_with_the_callers_error() {
    let d = Dir::new();
    let top = chain(&d);
    for role in [
        FileRole::Top,
        FileRole::Backing(1),
        FileRole::DataFile(1),
        FileRole::Backing(2),
    ] {
        let (opts, seen) = recording(Some(role));
        let e = Image::open_with(&top, &opts).unwrap_err();
        let Error::Refused {
            role: refused,
            source,
            ..
        } = e.root()
        else {
            panic!("{role}: {e:?}");
        };
        assert_eq!(*refused, role);
        assert!(source.to_string().ends_with("is in use"), "{source}");
        // Nothing after the refused file was opened.
        assert_eq!(names(&seen).last().unwrap().1, role);
    }
    // A lone qcow2 image: the image and its data file.
    let (opts, seen) = recording(Some(FileRole::DataFile(0)));
    let e = Qcow2::open_with(d.path("mid.qcow2"), &opts).unwrap_err();
    assert!(matches!(e.root(), Error::Refused { .. }), "{e:?}");
    assert_eq!(
        names(&seen),
        [
            ("mid.qcow2".to_string(), FileRole::Top),
            ("mid.data".to_string(), FileRole::DataFile(0))
        ]
    );
}

#[test]
fn one_file_descriptor_probed_and_opened() {
    let d = Dir::new();
    let top = chain(&d);
    let file = File::open(&top).unwrap();
    assert_eq!(probe(&file).unwrap(), Format::Qcow2);
    let (opts, seen) = recording(None);
    let img = Image::open_file(file, &top, &opts).unwrap();
    // The caller's own file is not handed back to its hook.
    assert_eq!(
        names(&seen)[0],
        ("mid.qcow2".to_string(), FileRole::Backing(1))
    );
    assert_eq!(img.files().next().unwrap().id, id(&top));
    let mut buf = vec![0u8; 65536];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 1), "read through to the raw base");

    let raw = File::open(d.path("base.raw")).unwrap();
    assert_eq!(probe(&raw).unwrap(), Format::Raw);

    let q = Qcow2::open_file(
        File::open(d.path("mid.qcow2")).unwrap(),
        d.path("mid.qcow2"),
        &opts,
    )
    .unwrap();
    assert_eq!(q.files().count(), 2);
    let r = Qcow2::check_file(File::open(&top).unwrap(), &top, &opts).unwrap();
    assert_eq!(r.exit_code(), 0);
}

#[test]
fn a_loop_is_noticed_before_the_hook_sees_a_file_twice() {
    let d = Dir::new();
    d.create("a.qcow2", "", "1M");
    d.create("b.qcow2", "backing_file=a.qcow2,backing_fmt=qcow2", "1M");
    // Point a at b: a loop.
    d.img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"]);
    let (opts, seen) = recording(None);
    let e = Image::open_with(d.path("b.qcow2"), &opts).unwrap_err();
    assert!(matches!(e.root(), Error::BackingLoop { .. }), "{e:?}");
    assert_eq!(
        names(&seen),
        [
            ("b.qcow2".to_string(), FileRole::Top),
            ("a.qcow2".to_string(), FileRole::Backing(1))
        ]
    );
}
