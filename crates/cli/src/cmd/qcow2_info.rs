//! `qcow2-info IMAGE`: what a qcow2 image is, how much of it is allocated,
//! whether it is consistent.

use std::path::PathBuf;

use crate::args::{ImageArgs, OutputArg};

/// Show what a qcow2 image is, how much of it is allocated, and whether it
/// is consistent.
#[derive(Debug, clap::Parser)]
#[command(name = "qcow2-info", version = super::VERSION)]
#[command(group = clap::ArgGroup::new("mode").args(["bitmap", "allocated", "check"]))]
pub struct Args {
    /// The qcow2 image.
    pub image: PathBuf,
    #[command(flatten)]
    pub open: ImageArgs,
    /// JSON value-equal to `qemu-img info --output=json` (with --check: to
    /// `qemu-img check --output=json`), plus an `allocation` object.
    #[arg(long)]
    pub json: bool,
    /// The output format, as qemu-img's: `json` is --json, `human` the
    /// default.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub output: Option<OutputArg>,
    /// One entry per image of the backing chain, as qemu-img does.
    #[arg(long)]
    pub backing_chain: bool,
    /// Write the allocation bitmap: one bit per cluster of the virtual
    /// disk, bit i%8 of byte i/8 set when cluster i has host data in this
    /// image.
    #[arg(long)]
    pub bitmap: bool,
    /// With --bitmap: compress it with zlib.
    #[arg(long, requires = "bitmap")]
    pub zlib: bool,
    /// With --bitmap: write it to FILE instead of standard output.
    #[arg(long, requires = "bitmap", value_name = "FILE")]
    pub bitmap_file: Option<PathBuf>,
    /// Print allocated clusters × cluster size, as a plain number.
    #[arg(long)]
    pub allocated: bool,
    /// Check consistency like `qemu-img check`: exit status 0 clean,
    /// 2 corruption, 3 leaks only, 1 the check could not run.
    #[arg(long)]
    pub check: bool,
}

impl Args {
    /// True for JSON output (`--json` or `--output=json`).
    pub fn json(&self) -> bool {
        self.json || self.output == Some(OutputArg::Json)
    }
}
