//! The copy engine's progress, for people and for programs: an indicatif
//! bar on a terminal, percentage lines as `qemu-img -p` prints them
//! elsewhere, and `N/100` lines on a file descriptor as nbdcopy's
//! `--progress=FD`.

use std::fs::File;
use std::io::{self, Write};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sparsekit_copy::Progress;

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nowhere.
    Off,
    /// A bar on standard error (a terminal).
    Bar,
    /// `    (12.00/100%)` lines on standard error, one per percent.
    Lines,
    /// `12/100` lines on this file descriptor, one per percent.
    Fd(i32),
}

/// Progress reported as [`Mode`] says.
#[derive(Debug)]
pub struct Reporter {
    bar: Option<ProgressBar>,
    lines: Option<Mutex<Lines>>,
    total: AtomicU64,
    done: AtomicU64,
    /// The last percentage written (u64::MAX: none yet), read without the
    /// lock so that most advances take none.
    last: AtomicU64,
}

struct Lines {
    out: Box<dyn Write + Send>,
    /// nbdcopy's `N/100`, rather than qemu-img's `    (N.NN/100%)`.
    nbdcopy: bool,
}

impl Reporter {
    /// Progress for `what` (the bar's label) as `mode` says. Fails when
    /// `--progress=FD` names a descriptor that is not open.
    pub fn new(mode: Mode, what: &str) -> io::Result<Self> {
        let lines = match mode {
            Mode::Lines => Some(Lines {
                out: Box::new(io::stderr()),
                nbdcopy: false,
            }),
            Mode::Fd(fd) => Some(Lines {
                out: Box::new(File::from(crate::sys::dup_fd(fd)?)),
                nbdcopy: true,
            }),
            Mode::Off | Mode::Bar => None,
        };
        let bar = (mode == Mode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message(what.to_owned());
            bar
        });
        Ok(Self {
            bar,
            lines: lines.map(Mutex::new),
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            last: AtomicU64::new(u64::MAX),
        })
    }

    /// The end: the bar is cleared; after a copy that succeeded, the lines
    /// end at 100.
    pub fn finish(&self, succeeded: bool) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if succeeded {
            self.report(100);
        }
    }

    /// Writes `percent` if it is past the last one written.
    fn report(&self, percent: u64) {
        let Some(lines) = &self.lines else { return };
        let last = self.last.load(Relaxed);
        if last != u64::MAX && percent <= last {
            return;
        }
        let mut l = lines.lock().unwrap_or_else(|e| e.into_inner());
        // Another worker may have written it while this one waited.
        let last = self.last.load(Relaxed);
        if last != u64::MAX && percent <= last {
            return;
        }
        self.last.store(percent, Relaxed);
        // Progress is advisory: a closed descriptor must not fail the copy.
        let _ = if l.nbdcopy {
            writeln!(l.out, "{percent}/100")
        } else {
            writeln!(l.out, "    ({percent}.00/100%)")
        };
        let _ = l.out.flush();
    }
}

impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lines")
            .field("nbdcopy", &self.nbdcopy)
            .finish()
    }
}

impl Progress for Reporter {
    fn start(&self, total: u64) {
        self.total.store(total, Relaxed);
        self.done.store(0, Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_length(total);
            bar.set_position(0);
        }
        self.report(0);
    }

    fn advance(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Relaxed) + bytes;
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
        let total = self.total.load(Relaxed);
        // An unknown total (a raw stream) has no percentages until the end.
        if total > 0 {
            self.report((done.min(total) as u128 * 100 / total as u128) as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn reporter(nbdcopy: bool) -> (Reporter, Shared) {
        let out = Shared::default();
        let mut r = Reporter::new(Mode::Off, "t").unwrap();
        r.lines = Some(Mutex::new(Lines {
            out: Box::new(out.clone()),
            nbdcopy,
        }));
        (r, out)
    }

    fn text(s: &Shared) -> String {
        String::from_utf8(s.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn one_line_per_percent_in_order() {
        let (r, out) = reporter(true);
        r.start(1000);
        for _ in 0..1000 {
            r.advance(1);
        }
        r.finish(true);
        let want: String = (0..=100).map(|p| format!("{p}/100\n")).collect();
        assert_eq!(text(&out), want);
    }

    #[test]
    fn big_steps_skip_percentages_and_qemu_img_s_form() {
        let (r, out) = reporter(false);
        r.start(4);
        r.advance(3);
        r.finish(false);
        assert_eq!(text(&out), "    (0.00/100%)\n    (75.00/100%)\n");
    }

    #[test]
    fn an_unknown_total_reports_only_the_end() {
        let (r, out) = reporter(true);
        r.start(0);
        r.advance(1 << 20);
        r.finish(true);
        assert_eq!(text(&out), "0/100\n100/100\n");
    }

    #[test]
    fn a_closed_descriptor_is_refused() {
        let e = Reporter::new(Mode::Fd(987), "t").unwrap_err();
        assert!(e.to_string().contains("--progress=987"), "{e}");
    }
}
