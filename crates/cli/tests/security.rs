//! Backing and data files from untrusted images: `--untrusted` refuses
//! names that are absolute or lead out of the image's folder, `--no-backing`
//! reads the top image alone, and a backing format named in the header is
//! never second-guessed by probing.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use sparsekit_testkit::{canonical_map, fixture, run};

fn tool(bin: &str, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().unwrap()
}

fn map_json(args: &[&str]) -> Value {
    let o = tool(env!("CARGO_BIN_EXE_map"), args);
    assert!(
        o.status.success(),
        "map {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn refused(o: &Output, tool: &str, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{tool}: {err}");
    assert!(
        err.contains("refused for an untrusted image") && err.contains(needle),
        "{tool}: {err}"
    );
}

fn qcow2_over(dir: &Path, name: &str, backing: &str) -> String {
    let img = dir.join(name);
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            "raw",
            img.to_str().unwrap(),
            "4M",
        ],
    );
    img.to_str().unwrap().to_owned()
}

#[test]
fn untrusted_refuses_names_that_leave_the_folder() {
    let root = tempfile::tempdir().unwrap();
    let inside = root.path().join("images");
    let outside = root.path().join("secrets");
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let secret = outside.join("secret.raw");
    std::fs::write(&secret, vec![0x5eu8; 4 << 20]).unwrap();
    std::fs::write(inside.join("base.raw"), vec![1u8; 4 << 20]).unwrap();
    std::os::unix::fs::symlink(&secret, inside.join("link.raw")).unwrap();

    let cases = [
        (
            qcow2_over(&inside, "abs.qcow2", secret.to_str().unwrap()),
            "the name is absolute",
        ),
        (
            qcow2_over(&inside, "climb.qcow2", "../secrets/secret.raw"),
            "climbs out of the image's folder",
        ),
        (
            qcow2_over(&inside, "link.qcow2", "link.raw"),
            "through a symbolic link",
        ),
    ];
    for (img, why) in &cases {
        // Trusted (the default, as qemu-img): followed.
        let o = tool(env!("CARGO_BIN_EXE_map"), &[img]);
        assert!(
            o.status.success(),
            "{img}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        refused(
            &tool(env!("CARGO_BIN_EXE_map"), &["--untrusted", img]),
            "map",
            why,
        );
        let out = root.path().join("out.raw");
        refused(
            &tool(
                env!("CARGO_BIN_EXE_copy"),
                &["--untrusted", img, out.to_str().unwrap()],
            ),
            "copy",
            why,
        );
        assert!(!out.exists(), "nothing may be written for a refused source");
        refused(
            &tool(
                env!("CARGO_BIN_EXE_qcow2-info"),
                &["--untrusted", "--backing-chain", img],
            ),
            "qcow2-info",
            why,
        );
    }
    // A plain name inside the folder is fine.
    let ok = qcow2_over(&inside, "ok.qcow2", "base.raw");
    let o = tool(env!("CARGO_BIN_EXE_map"), &["--untrusted", &ok]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // An external data file named by an absolute path.
    let df = inside.join("df.qcow2");
    let data = outside.join("df.data");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", data.display()),
            df.to_str().unwrap(),
            "1M",
        ],
    );
    refused(
        &tool(
            env!("CARGO_BIN_EXE_qcow2-info"),
            &["--untrusted", df.to_str().unwrap()],
        ),
        "qcow2-info",
        "data file",
    );
    refused(
        &tool(
            env!("CARGO_BIN_EXE_map"),
            &["--untrusted", df.to_str().unwrap()],
        ),
        "map",
        "data file",
    );
}

#[test]
fn no_backing_reads_the_top_image_alone() {
    let top = fixture("chain-top.qcow2");
    let spec = format!(
        r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{}"}}}}"#,
        top.display()
    );
    sparsekit_testkit::drop_cache(&top);
    let theirs: Value =
        serde_json::from_str(&run("qemu-img", &["map", "--output=json", &spec])).unwrap();
    let ours = map_json(&["--json", "--no-backing", top.to_str().unwrap()]);
    assert_eq!(canonical_map(&ours), canonical_map(&theirs));
    assert!(ours.as_array().unwrap().iter().all(|e| e["depth"] == 0));

    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("ours.raw"), dir.path().join("qemu.raw"));
    let o = tool(
        env!("CARGO_BIN_EXE_copy"),
        &["--no-backing", top.to_str().unwrap(), a.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    run(
        "qemu-img",
        &["convert", &spec, "-O", "raw", b.to_str().unwrap()],
    );
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
}

/// The header says the backing file is raw; it is in fact a qcow2 image.
/// Like qemu, sparsekit believes the header and reads its bytes as raw.
#[test]
fn backing_format_from_the_header_is_never_probed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("v3.qcow2"), dir.path().join("base.img")).unwrap();
    let top = dir.path().join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.img",
            "-F",
            "raw",
            top.to_str().unwrap(),
            "2M",
        ],
    );
    let theirs: Value = serde_json::from_str(&run(
        "qemu-img",
        &["map", "--output=json", top.to_str().unwrap()],
    ))
    .unwrap();
    let ours = map_json(&["--json", top.to_str().unwrap()]);
    assert_eq!(canonical_map(&ours), canonical_map(&theirs));
    // The qcow2 header's magic shows through: read as raw, not decoded.
    let out = dir.path().join("out.raw");
    let o = tool(
        env!("CARGO_BIN_EXE_copy"),
        &[top.to_str().unwrap(), out.to_str().unwrap()],
    );
    assert!(o.status.success());
    assert_eq!(&std::fs::read(&out).unwrap()[..4], b"QFI\xfb");
}
