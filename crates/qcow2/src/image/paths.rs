//! Backing and data file names: where they lead, and which an image from
//! an untrusted place may name.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Resolves a backing or data file name stored in the image at `image`:
/// relative names are relative to the image's folder.
/// Refuses a backing or data file `name` stored in `image` that is
/// absolute or leads out of the image's folder, by its components (`..`)
/// or, once resolved, through a symbolic link. For images from untrusted
/// places: such a name could make a tool read any file on the machine.
pub fn check_untrusted(image: &Path, name: &str, what: &'static str) -> Result<()> {
    let refuse = |problem| {
        Err(Error::Untrusted {
            what,
            name: name.into(),
            problem,
        })
    };
    let p = Path::new(name);
    if p.is_absolute() {
        return refuse("the name is absolute");
    }
    let mut depth = 0i64;
    for c in p.components() {
        match c {
            std::path::Component::Normal(_) => depth += 1,
            std::path::Component::ParentDir => depth -= 1,
            std::path::Component::CurDir => {}
            _ => return refuse("the name is absolute"),
        }
        if depth < 0 {
            return refuse("the name climbs out of the image's folder");
        }
    }
    let dir = image
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let (Ok(dir), Ok(target)) = (dir.canonicalize(), dir.join(p).canonicalize())
        && !target.starts_with(&dir)
    {
        return refuse("the name leads out of the image's folder through a symbolic link");
    }
    Ok(())
}

pub(crate) fn resolve(image: &Path, name: &str, what: &'static str) -> Result<PathBuf> {
    if name.is_empty() {
        return Err(Error::UnsupportedFile {
            what,
            name: name.into(),
            problem: "empty name",
        });
    }
    if name.starts_with("json:") || name.contains("://") {
        return Err(Error::UnsupportedFile {
            what,
            name: name.into(),
            problem: "only plain file names are supported",
        });
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(image.parent().unwrap_or(Path::new(".")).join(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_names() {
        let img = Path::new("/images/vm.qcow2");
        let why = |name: &str| match check_untrusted(img, name, "backing file") {
            Ok(()) => None,
            Err(Error::Untrusted { problem, .. }) => Some(problem),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(why("base.qcow2"), None);
        assert_eq!(why("sub/../base.qcow2"), None);
        assert_eq!(why("./sub/base.qcow2"), None);
        assert_eq!(why("/etc/shadow"), Some("the name is absolute"));
        assert_eq!(
            why("../base.qcow2"),
            Some("the name climbs out of the image's folder")
        );
        assert_eq!(
            why("sub/../../x"),
            Some("the name climbs out of the image's folder")
        );
    }

    #[test]
    fn names_resolve_against_the_image_folder() {
        let img = Path::new("/images/top.qcow2");
        assert_eq!(
            resolve(img, "base.raw", "backing file").unwrap(),
            Path::new("/images/base.raw")
        );
        assert_eq!(
            resolve(img, "/abs/b.qcow2", "backing file").unwrap(),
            Path::new("/abs/b.qcow2")
        );
        assert!(resolve(img, "json:{}", "backing file").is_err());
        assert!(resolve(img, "nbd://h/x", "backing file").is_err());
    }
}
