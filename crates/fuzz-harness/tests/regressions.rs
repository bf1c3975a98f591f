//! Replays every input kept under `fuzz/regressions/<target>/` through the
//! same function its libFuzzer target runs, on stable Rust: each one once
//! crashed, hung or ran out of memory, and must not again.

use std::path::Path;
use std::time::{Duration, Instant};

use sparsekit_fuzz_harness::TARGETS;

#[test]
fn every_kept_input_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    let mut replayed = 0;
    for (target, run) in TARGETS {
        let Ok(dir) = std::fs::read_dir(root.join(target)) else {
            continue;
        };
        for entry in dir {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let start = Instant::now();
            run(&data);
            // libFuzzer's -timeout is 10 s, on an optimised build.
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{} took {:?}",
                path.display(),
                start.elapsed()
            );
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} regression inputs");
}

#[test]
fn regression_folders_are_named_after_targets() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    for entry in std::fs::read_dir(&root).unwrap() {
        let name = entry.unwrap().file_name();
        let name = name.to_str().unwrap();
        assert!(
            name == "README.md" || TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz/regressions/{name} is no target"
        );
    }
}
