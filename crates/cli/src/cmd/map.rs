//! `map SOURCE`: where the data of a file, block device, image or NBD
//! export is.

use crate::args::{FormatArg, ImageArgs, NbdArgs, OutputArg};
use crate::human::parse_size;

/// Show where the data of a file, block device or disk image is.
#[derive(Debug, clap::Parser)]
#[command(name = "map", version = super::VERSION)]
pub struct Args {
    /// A regular file, block device or qcow2 image (the format is detected
    /// by magic), or an NBD URI (nbd://HOST/EXPORT or nbd://HOST:PORT/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH).
    pub source: String,
    /// Print a JSON array value-equal to `qemu-img map --output=json`
    /// (with --bitmap or --context: to `nbdinfo --map=CTX --json`).
    #[arg(long)]
    pub json: bool,
    /// The output format, as qemu-img's: `json` is --json, `human` the
    /// table (the default).
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub output: Option<OutputArg>,
    /// The image format, instead of detecting it.
    #[arg(short = 'f', long, value_enum)]
    pub format: Option<FormatArg>,
    #[command(flatten)]
    pub image: ImageArgs,
    #[command(flatten)]
    pub nbd: NbdArgs,
    /// First byte to map (also spelled as qemu-img's --start-offset):
    /// 4096, 0x1000, 64k, 1.5G.
    #[arg(long, visible_alias = "start-offset", value_parser = parse_size, default_value = "0")]
    pub start: u64,
    /// Bytes to map from --start (also spelled as qemu-img's
    /// --max-length).
    #[arg(long, visible_alias = "max-length", value_parser = parse_size)]
    pub length: Option<u64>,
    /// Map the persistent dirty bitmap NAME of a qcow2 image, read offline,
    /// as `qemu-nbd -B NAME` would export it (on an NBD source: the context
    /// `qemu:dirty-bitmap:NAME`).
    #[arg(long, value_name = "NAME", conflicts_with = "context")]
    pub bitmap: Option<String>,
    /// Print the bmap of SOURCE, as `bmaptool create` writes it (format
    /// 2.0, 4 KiB blocks, SHA-256 of each range, hashed in parallel), for
    /// `copy --bmap` or `bmaptool copy --bmap`.
    #[arg(long, conflicts_with_all = ["json", "output", "context", "bitmap", "start", "length"])]
    pub bmap: bool,
    /// NBD: map this meta context (e.g. `qemu:dirty-bitmap:NAME`,
    /// `qemu:allocation-depth`); with --json as `nbdinfo --map=CTX --json`.
    #[arg(long, value_name = "CTX")]
    pub context: Option<String>,
}

impl Args {
    /// True for JSON output (`--json` or `--output=json`).
    pub fn json(&self) -> bool {
        self.json || self.output == Some(OutputArg::Json)
    }
}
