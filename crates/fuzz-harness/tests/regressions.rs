//! Replays every input kept under `fuzz/regressions/<target>/` through the
//! same function its libFuzzer target runs, on stable Rust: each one once
//! crashed, hung or ran out of memory, and must not again.
//!
//! A replay that finds nothing proves nothing, so the inputs are listed in
//! fuzz/regressions/README.md and the replay fails on a listed input that
//! is missing, a kept one that is not listed, and a target folder without
//! inputs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sparsekit_fuzz_harness::TARGETS;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions")
}

/// The inputs README.md lists, as `target/name`: its lines
/// "- `target/name`: what it caught".
fn listed(readme: &str) -> BTreeSet<String> {
    readme
        .lines()
        .filter_map(|l| l.strip_prefix("- `")?.split_once('`'))
        .map(|(input, _)| input.to_owned())
        .collect()
}

/// The inputs kept in `root`'s target folders, as `target/name`, and the
/// target folders that hold none.
fn kept(root: &Path) -> (BTreeSet<String>, Vec<&'static str>) {
    let mut inputs = BTreeSet::new();
    let mut empty = Vec::new();
    for (target, _) in TARGETS {
        let Ok(dir) = std::fs::read_dir(root.join(target)) else {
            continue;
        };
        let before = inputs.len();
        for entry in dir {
            let name = entry.unwrap().file_name();
            inputs.insert(format!("{target}/{}", name.to_str().unwrap()));
        }
        if inputs.len() == before {
            empty.push(*target);
        }
    }
    (inputs, empty)
}

#[test]
fn every_kept_input_is_listed_and_every_listed_one_kept() {
    let root = root();
    let listed = listed(&std::fs::read_to_string(root.join("README.md")).unwrap());
    let (kept, empty) = kept(&root);
    assert!(
        !listed.is_empty(),
        "fuzz/regressions/README.md lists no input"
    );
    assert!(
        empty.is_empty(),
        "fuzz/regressions/ folders without inputs: {empty:?}"
    );
    let missing: Vec<_> = listed.difference(&kept).collect();
    assert!(
        missing.is_empty(),
        "listed in fuzz/regressions/README.md but missing: {missing:?}"
    );
    let unlisted: Vec<_> = kept.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "kept but not listed in fuzz/regressions/README.md (list each with what it caught): \
         {unlisted:?}"
    );
}

#[test]
fn every_kept_input_runs_clean() {
    let root = root();
    let (kept, _) = kept(&root);
    let mut replayed = 0;
    for (target, run) in TARGETS {
        let prefix = format!("{target}/");
        for input in kept.iter().filter(|i| i.starts_with(&prefix)) {
            let path = root.join(input);
            let data = std::fs::read(&path).unwrap();
            // Slowness is the fuzz run's to catch (libFuzzer's -timeout in
            // `cargo xtask test`), not a timing assertion's.
            run(&data);
            replayed += 1;
        }
    }
    assert!(replayed > 0, "no regression input under {}", root.display());
}

#[test]
fn regression_folders_are_named_after_targets() {
    for entry in std::fs::read_dir(root()).unwrap() {
        let name = entry.unwrap().file_name();
        let name = name.to_str().unwrap();
        assert!(
            name == "README.md" || TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz/regressions/{name} is no target"
        );
    }
}

#[test]
fn the_list_is_read_from_its_lines() {
    let readme = "intro `not/this`\n## Inputs\n- `a/b`: caught x,\n  continued\n- `c/d`: y\n";
    assert_eq!(listed(readme), BTreeSet::from(["a/b".into(), "c/d".into()]));
}
