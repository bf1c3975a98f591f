//! What an installation needs beside the binaries: man pages and shell
//! completions, made from the commands' definitions ([`crate::cmd`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// The shells completions are made for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes `NAME.1` for every command into `dir` (created if missing), and
/// returns their paths.
pub fn write_man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for cmd in crate::cmd::all() {
        let path = dir.join(format!("{}.1", cmd.get_name()));
        let mut out = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        fs::write(&path, out)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes every command's completions into `dir/bash` (`NAME.bash`),
/// `dir/zsh` (`_NAME`) and `dir/fish` (`NAME.fish`), and returns their
/// paths.
pub fn write_completions(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for shell in SHELLS {
        let sub = dir.join(shell.to_string());
        fs::create_dir_all(&sub)?;
        for mut cmd in crate::cmd::all() {
            let name = cmd.get_name().to_owned();
            written.push(clap_complete::generate_to(shell, &mut cmd, name, &sub)?);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_and_three_completions_per_command() {
        let dir = tempfile::tempdir().unwrap();
        let pages = write_man_pages(&dir.path().join("man1")).unwrap();
        let names: Vec<_> = pages.iter().map(|p| p.file_name().unwrap()).collect();
        assert_eq!(names, ["map.1", "copy.1", "qcow2-info.1"]);
        let page = fs::read_to_string(&pages[1]).unwrap();
        assert!(page.starts_with(".ie"), "not roff: {page:.40}");
        assert!(
            page.contains("\\-\\-dest\\-is\\-zero"),
            "copy.1 lacks its flags"
        );
        let done = write_completions(dir.path()).unwrap();
        assert_eq!(done.len(), 9);
        assert!(dir.path().join("zsh/_qcow2-info").is_file());
        assert!(dir.path().join("fish/copy.fish").is_file());
    }
}
