//! The state of memory and of the page cache before each timed run, the
//! same for every contender.
//!
//! On a VM whose kernel reports free pages to the host (virtio-balloon free
//! page reporting), a page freed by one run goes back to the host within a
//! fraction of a second, and the next run to take it pays a host fault on
//! first touch. Whether a run gets such pages then depends on what the run
//! before it freed, and when (BENCHMARKS.md, issue 22). [`hold`] stops the
//! reporting for the bench's lifetime and [`prefault`] backs the guest's
//! free memory once, so that every run takes pages the way it would on
//! bare metal.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;

/// The smallest order of free block the kernel reports to the host.
const REPORTING_ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";

/// One past the largest buddy order (MAX_PAGE_ORDER is 10 on x86-64 and
/// arm64 with 4 KiB pages): no free block is that large, so none is
/// reported.
const NO_BLOCK_THAT_LARGE: &str = "11";

/// What [`hold`] found and did.
pub(super) enum Reporting {
    /// The kernel reports no free pages to a host (no such module).
    Absent,
    /// Reporting is off until xtask ends; then the order goes back.
    Held {
        /// The order as it was.
        was: String,
        /// Writes `was` back once its standard input reaches EOF, which
        /// happens when xtask exits, however it exits.
        restorer: Child,
    },
    /// Reporting is on and could not be turned off (not root, or the
    /// kernel refused the order).
    On(String),
}

/// Turns free page reporting off until xtask ends, when there is any.
pub(super) fn hold() -> Reporting {
    let Ok(was) = std::fs::read_to_string(REPORTING_ORDER) else {
        return Reporting::Absent;
    };
    let was = was.trim().to_owned();
    // The restorer runs in its own process group, so a ^C in the terminal
    // does not reach it, and learns of xtask's end from the pipe closing.
    let restorer = Command::new("sh")
        .args([
            "-c",
            r#"cat >/dev/null; printf '%s\n' "$1" > "$2""#,
            "sh",
            &was,
            REPORTING_ORDER,
        ])
        .stdin(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut restorer = match restorer {
        Ok(c) => c,
        Err(e) => return Reporting::On(format!("starting sh: {e}")),
    };
    if let Err(e) = std::fs::write(REPORTING_ORDER, format!("{NO_BLOCK_THAT_LARGE}\n")) {
        drop(restorer.stdin.take());
        let _ = restorer.wait();
        return Reporting::On(format!("writing {REPORTING_ORDER}: {e}"));
    }
    Reporting::Held { was, restorer }
}

impl Reporting {
    /// What BENCHMARKS.md says about it.
    pub(super) fn describe(&self) -> String {
        match self {
            Reporting::Absent => "This kernel reports no free pages to a host.".into(),
            Reporting::Held { was, .. } => format!(
                "Free page reporting to the host (virtio-balloon) is off for the bench \
                 (`page_reporting_order` {was} → {NO_BLOCK_THAT_LARGE}, put back at the \
                 end), and the guest's free memory is touched once at the start: every run \
                 takes pages already backed by the host, as on bare metal, whatever the run \
                 before it freed."
            ),
            Reporting::On(why) => format!(
                "Free page reporting to the host stays on ({why}): a run that takes pages \
                 the run before it freed may pay a host fault for each."
            ),
        }
    }

    /// Whether reporting is off.
    pub(super) fn is_held(&self) -> bool {
        matches!(self, Reporting::Held { .. })
    }
}

impl Drop for Reporting {
    fn drop(&mut self) {
        if let Reporting::Held { was, restorer } = self {
            drop(restorer.stdin.take());
            let _ = restorer.wait();
            let now = std::fs::read_to_string(REPORTING_ORDER).unwrap_or_default();
            if now.trim() != was {
                eprintln!("xtask: could not put back {REPORTING_ORDER} = {was}");
            }
        }
    }
}

/// Touches all but 1 GiB of the free memory once, in a child process (a
/// child's peak RSS from wait4 starts at its parent's, so xtask stays
/// small), then frees it: with reporting held, the guest keeps those pages
/// backed. Returns the bytes touched and the seconds it took.
pub(super) fn prefault() -> anyhow::Result<(u64, f64)> {
    let free = mem_free()?;
    let bytes = free.saturating_sub(1 << 30) as usize;
    if bytes == 0 {
        return Ok((0, 0.0));
    }
    let t = std::time::Instant::now();
    // SAFETY: the child calls only async-signal-safe functions (mmap,
    // stores to its own mapping, _exit) before it exits.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("fork"),
        0 => {
            // SAFETY: an anonymous private mapping of `bytes`; the stores
            // stay inside it.
            unsafe {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                );
                if p == libc::MAP_FAILED {
                    libc::_exit(1);
                }
                for i in (0..bytes).step_by(4096) {
                    std::ptr::write_volatile(p.cast::<u8>().add(i), 1);
                }
                libc::_exit(0);
            }
        }
        pid => {
            let mut status = 0;
            // SAFETY: `pid` is our child; status is a live local.
            if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
                return Err(std::io::Error::last_os_error()).context("waitpid");
            }
            anyhow::ensure!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "touching {bytes} bytes of free memory failed (wait status {status:#x})"
            );
            Ok((bytes as u64, t.elapsed().as_secs_f64()))
        }
    }
}

/// MemFree of /proc/meminfo, in bytes.
fn mem_free() -> anyhow::Result<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    m.lines()
        .find_map(|l| l.strip_prefix("MemFree:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib << 10)
        .context("no MemFree in /proc/meminfo")
}

/// Reads the data of `path` (its SEEK_DATA extents; reading a hole would
/// cache pages of zeros), so that a warm run finds all of it cached
/// whatever evicted it since: the run before, or a reclaimer of pages idle
/// for a minute (DAMON's pageout scheme on this VM).
pub(super) fn cache_data(path: &Path) -> anyhow::Result<()> {
    use super::copy::seek;
    use nix::unistd::Whence;
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let size = f.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while let Some(start) = seek(&f, pos, Whence::SeekData, size)? {
        let end = seek(&f, start, Whence::SeekHole, size)?.unwrap_or(size);
        let mut at = start;
        while at < end {
            let want = buf.len().min((end - at) as usize);
            let n = f
                .read_at(&mut buf[..want], at)
                .with_context(|| format!("reading {} at {at}", path.display()))?;
            if n == 0 {
                break;
            }
            at += n as u64;
        }
        pos = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn cache_data_reads_only_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, &[7u8; 4096], 32 << 20).unwrap();
        drop(f);
        let before = read_bytes();
        cache_data(&p).unwrap();
        let read = read_bytes() - before;
        // The 4 KiB block of data and not the 64 MiB of holes (rchar counts
        // what read(2) returned, cached or not, on this thread alone).
        assert!((4096..1 << 20).contains(&read), "read {read} bytes");
    }

    /// rchar of this thread's /proc/thread-self/io.
    fn read_bytes() -> u64 {
        let mut s = String::new();
        std::fs::File::open("/proc/thread-self/io")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .unwrap()
            .parse()
            .unwrap()
    }
}
