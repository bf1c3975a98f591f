//! The shared code of sparsekit's binaries (`map`, `copy`, `qcow2-info`):
//! opening a source named on the command line, and formatting output.
//!
//! - [`source`]: a path or URI to an open [`source::Source`], with its
//!   format detected by magic or given by `--format`.
//! - [`qemu`]: entries of `qemu-img map --output=json`, merged as qemu-img
//!   merges them, printed in its layout.
//! - [`human`]: sizes for people (`64 KiB`), sizes from people (`16M`), and
//!   the `map` table.
//! - [`exit`]: error reporting shared by the binaries: broken pipes are
//!   success, everything else prints `tool: error: cause` and fails.
//!
//! ```
//! use sparsekit_cli::human::{format_size, parse_size};
//! assert_eq!(format_size(65536), "64 KiB");
//! assert_eq!(parse_size("1T").unwrap(), 1 << 40);
//! ```

pub mod exit;
pub mod human;
pub mod info;
pub mod nbdinfo;
pub mod prefetch;
pub mod progress;
pub mod qemu;
pub mod source;
pub mod sys;
