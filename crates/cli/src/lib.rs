//! The shared code of sparsekit's binaries (`map`, `copy`, `qcow2-info`):
//! their common arguments and their output formats. Everything a binary
//! decides lives in the library crates.
//!
//! - [`cmd`]: each command's command line (clap definitions).
//! - [`args`]: the flags every tool takes, as the library's options.
//! - [`qemu`]: `qemu-img map --output=json`'s layout.
//! - [`nbdinfo`]: `nbdinfo --map --json`'s layout, and its table.
//! - [`human`]: sizes for people (`64 KiB`) and the `map` table.
//! - [`size`]: sizes from people (`16M`, `1.5G`, `0x1000`), read exactly
//!   as qemu-img reads them.
//! - [`info`]: `qemu-img info` and `qemu-img check`'s human output.
//! - [`progress`]: the copy's progress: a bar, qemu-img's percentage
//!   lines, nbdcopy's `--progress=FD`.
//! - [`dist`]: man pages and shell completions.
//! - `sys` (private): the crate's only `unsafe` code: `localtime_r` for
//!   snapshot dates, and duplicating `--progress=FD`'s descriptor.
//! - [`exit`]: error reporting shared by the binaries: broken pipes are
//!   success, everything else prints `tool: error: cause` and fails.
//!
//! ```
//! use sparsekit_cli::human::{format_size, parse_size};
//! assert_eq!(format_size(65536), "64 KiB");
//! assert_eq!(parse_size("1T").unwrap(), 1 << 40);
//! ```

pub mod args;
pub mod cmd;
pub mod dist;
pub mod exit;
pub mod human;
pub mod info;
pub mod nbdinfo;
pub mod progress;
pub mod qemu;
pub mod size;
mod sys;
