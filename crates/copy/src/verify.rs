//! Comparing a destination with its source after a copy.

use std::sync::atomic::{AtomicBool, AtomicU64};

use sparsekit_extent::Kind;

use crate::error::{Error, Failed};
use crate::executor::{Item, Planner, Workers, run_parallel};
use crate::plan::Settings;
use crate::progress::Progress;
use crate::source::Source;

/// Compares `dest` with `source` over what a copy with `settings` wrote:
/// data ranges byte for byte; zero and hole ranges must read as zeros
/// (only the destination's own data extents there are read). Fails at the
/// first difference with [`Error::Differs`].
pub fn verify(
    source: &dyn Source,
    dest: &dyn Source,
    settings: &Settings,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<(), Failed> {
    let range = settings.range.clone();
    progress.start(range.end - range.start);
    let chunk = settings.chunk_size;
    let planner = Planner::new(source, range, settings.dest_offset, chunk as u64, None);
    let none = AtomicU64::new(0);
    let differs = |offset| Error::Differs {
        source_name: source.name().into(),
        dest_name: dest.name().into(),
        offset,
    };
    let work = |item: &Item, buf: &mut [u8]| -> Result<(), Error> {
        let half = buf.len() / 2;
        let (a, b) = buf.split_at_mut(half);
        if item.kind == Kind::Data {
            let mut off = 0;
            while off < item.len {
                let n = (item.len - off).min(half as u64) as usize;
                source
                    .read_at(&mut a[..n], item.src + off)
                    .map_err(Error::Source)?;
                dest.read_at(&mut b[..n], item.dst + off)
                    .map_err(Error::Source)?;
                if a[..n] != b[..n] {
                    let i = a
                        .iter()
                        .zip(b.iter())
                        .position(|(x, y)| x != y)
                        .unwrap_or(0);
                    return Err(differs(item.dst + off + i as u64));
                }
                off += n as u64;
            }
            return Ok(());
        }
        // Only the destination's data extents can hold non-zero bytes.
        for e in dest.extents(item.dst..item.dst + item.len) {
            let e = e.map_err(Error::Source)?;
            if e.kind != Kind::Data {
                continue;
            }
            let mut off = e.offset;
            while off < e.end() {
                let n = (e.end() - off).min(half as u64) as usize;
                dest.read_at(&mut b[..n], off).map_err(Error::Source)?;
                if let Some(i) = b[..n].iter().position(|&x| x != 0) {
                    return Err(differs(off + i as u64));
                }
                off += n as u64;
            }
        }
        Ok(())
    };
    let workers = Workers {
        jobs: settings.jobs,
        max_reads: source.max_reads(),
        buffer: chunk * 2,
    };
    run_parallel(planner, workers, stop, progress, &none, &work)
}
