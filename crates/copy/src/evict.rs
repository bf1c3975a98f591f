//! When and what to drop of the destination's pages from the page cache:
//! the kernel's dirty thresholds, the default policy, the pace of writes
//! that can switch it on, and the spans of written bytes it works in. The
//! system calls are the sink's; this module only decides.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes written but not yet dropped from the page cache.
pub const EVICT_WINDOW: u64 = 64 << 20;

/// Bytes written before their write-back is started, in one call: one call
/// per item costs a system call per item and writes the disk in small
/// pieces.
pub const EVICT_SPAN: u64 = 4 << 20;

/// Spans written in pieces smaller than this on average are left to the
/// kernel: writing them back costs the file system an allocation per
/// piece, which without eviction happens after the copy.
pub const EVICT_MIN_WRITE: u64 = 64 << 10;

/// Below this many bytes a second of writing into the page cache, a copy
/// in [`Evict::WhenSlow`] starts evicting: recycling its own pages is then
/// faster than taking new ones (on a VM whose balloon hands free pages back
/// to the host, each new page costs a host fault). The time counted is the
/// time some worker spends in a write, so workers waiting on each other or
/// on their reads do not slow the pace.
pub const SLOW_PACE: u64 = 1 << 30;

/// Bytes of writes over which [`SLOW_PACE`] is measured.
pub const PACE_WINDOW: u64 = 128 << 20;

/// How long a [`PACE_WINDOW`] may take at [`SLOW_PACE`]: a window busy
/// longer can only end slow.
const SLOWEST_WINDOW: Duration = Duration::from_micros(PACE_WINDOW * 1_000_000 / SLOW_PACE);

/// When a copy drops the destination's pages from the page cache as it
/// writes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evict {
    /// Never: the kernel writes the destination back when it sees fit, as
    /// it does for `cp` and `qemu-img convert`.
    Never,
    /// From the first write, as nbdcopy does.
    Always,
    /// Once the page cache takes the destination's writes slower than
    /// [`SLOW_PACE`], measured over every [`PACE_WINDOW`] bytes written.
    WhenSlow,
}

/// How much dirty data the kernel lets the page cache hold: past
/// `background` its flusher starts writing back, past `limit` writers wait
/// for it, and halfway between the two (its "free-run ceiling") it starts
/// slowing them down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyThresholds {
    /// `vm.dirty_background_bytes`, else `vm.dirty_background_ratio`
    /// percent of the memory that can hold dirty pages.
    pub background: u64,
    /// `vm.dirty_bytes`, else `vm.dirty_ratio` percent of it.
    pub limit: u64,
}

impl DirtyThresholds {
    /// The thresholds the kernel applies for these settings: a background
    /// threshold not below the limit is taken as half the limit (the
    /// kernel's domain_dirty_limits()).
    pub fn new(background: u64, limit: u64) -> Self {
        let background = if background >= limit {
            limit / 2
        } else {
            background
        };
        Self { background, limit }
    }

    /// Where the kernel starts throttling writers: halfway between the two
    /// thresholds.
    pub fn free_run(&self) -> u64 {
        self.background / 2 + self.limit / 2
    }
}

/// When a copy that writes `data` bytes of data should evict the
/// destination's pages, when the user did not say.
///
/// - Up to the free-run ceiling: [`Evict::WhenSlow`]. The kernel does not
///   hold the copy up, so it can end with its data dirty in the cache, as
///   `cp`'s; writing back as it goes only adds work, unless the cache is
///   slow to take new pages (see [`SLOW_PACE`]).
/// - Past it, or when `data` or the thresholds are unknown:
///   [`Evict::Always`]. The kernel would throttle the copy to the disk's
///   pace anyway, and the cache would fill with pages nobody reads again.
pub fn evict_by_default(data: Option<u64>, thresholds: Option<DirtyThresholds>) -> Evict {
    match (data, thresholds) {
        (Some(data), Some(t)) if data <= t.free_run() => Evict::WhenSlow,
        _ => Evict::Always,
    }
}

/// The kernel's [`DirtyThresholds`] now, from /proc; `None` when /proc
/// cannot tell.
pub fn dirty_thresholds() -> Option<DirtyThresholds> {
    let read = |p: &str| std::fs::read_to_string(format!("/proc/sys/vm/{p}")).ok();
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let background = threshold(
        &read("dirty_background_bytes")?,
        &read("dirty_background_ratio")?,
        &meminfo,
    )?;
    let limit = threshold(&read("dirty_bytes")?, &read("dirty_ratio")?, &meminfo)?;
    Some(DirtyThresholds::new(background, limit))
}

/// One threshold from the texts of its two sysctls (bytes, which wins when
/// set, and ratio) and /proc/meminfo: the ratio applies to the memory that
/// can hold dirty pages (free pages and the file cache, as the kernel
/// counts it).
fn threshold(bytes: &str, ratio: &str, meminfo: &str) -> Option<u64> {
    let bytes: u64 = bytes.trim().parse().ok()?;
    if bytes > 0 {
        return Some(bytes);
    }
    let ratio: u64 = ratio.trim().parse().ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = meminfo
            .lines()
            .find(|l| l.split(':').next() == Some(name))?;
        let kib: u64 = line
            .split(':')
            .nth(1)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()?;
        kib.checked_mul(1024)
    };
    let dirtyable = field("MemFree")?
        .saturating_add(field("Active(file)")?)
        .saturating_add(field("Inactive(file)")?);
    Some(dirtyable / 100 * ratio.min(100))
}

/// Writes into the page cache measured for [`Evict::WhenSlow`]: bytes
/// written in the current [`PACE_WINDOW`] and the time during which some
/// worker was writing.
#[derive(Debug, Default)]
struct Pace {
    writing: u32,
    since: Option<Instant>,
    busy: Duration,
    bytes: u64,
}

impl Pace {
    /// A write starts at `now`.
    fn start(&mut self, now: Instant) {
        if self.writing == 0 {
            self.since = Some(now);
        }
        self.writing += 1;
    }

    /// A write of `len` bytes ends at `now`. At the end of a
    /// [`PACE_WINDOW`], returns the window's pace in bytes a second and
    /// starts the next; so it does as soon as the window has taken longer
    /// than a whole one may at [`SLOW_PACE`] (it can only end slow then),
    /// so that a slow window costs at most that long.
    fn end(&mut self, now: Instant, len: u64) -> Option<u64> {
        let since = self.since.unwrap_or(now);
        self.writing = self.writing.saturating_sub(1);
        self.bytes += len;
        if self.writing == 0 {
            self.busy += now - since;
            self.since = None;
        }
        let busy = self.busy + self.since.map_or_else(Default::default, |s| now - s);
        if self.bytes < PACE_WINDOW && busy <= SLOWEST_WINDOW {
            return None;
        }
        // A window written in under a microsecond is fast, not unmeasured.
        let pace = self.bytes as u128 * 1_000_000 / busy.as_micros().max(1);
        self.bytes = 0;
        self.busy = Default::default();
        if self.since.is_some() {
            self.since = Some(now);
        }
        Some(u64::try_from(pace).unwrap_or(u64::MAX))
    }
}

/// The smallest range covering some written ranges, and how many bytes
/// they wrote. Workers finish items nearly in offset order, so a span
/// covers little more than what it wrote; where it covers other workers'
/// unfinished writes, their pages are merely written back twice or left
/// in the cache, never lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) start: u64,
    pub(crate) end: u64,
    bytes: u64,
    writes: u64,
}

/// Written ranges of the destination, gathered into spans of
/// [`EVICT_SPAN`] bytes: the one being gathered, then those whose
/// write-back started, oldest first.
#[derive(Debug, Default)]
struct Behind {
    gathering: Option<Span>,
    started: VecDeque<Span>,
    /// Bytes written in `started`.
    started_bytes: u64,
}

/// What the sink must do after a write: start writing back `start`, and
/// wait for `drop`'s write-back and drop its pages.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Due {
    pub(crate) start: Span,
    pub(crate) drop: Option<Span>,
}

/// The eviction state of one destination.
#[derive(Debug)]
pub(crate) struct Evictor {
    behind: Option<Mutex<Behind>>,
    /// Whether written ranges are evicted now: from the start with
    /// [`Evict::Always`], once the pace is slow with [`Evict::WhenSlow`].
    evicting: AtomicBool,
    /// The pace of writes, while [`Evict::WhenSlow`] waits to decide.
    pace: Option<Mutex<Pace>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Evictor {
    /// The state for `when` (`Evict::Never` for what cannot be evicted,
    /// such as block devices).
    pub(crate) fn new(when: Evict) -> Self {
        Self {
            behind: (when != Evict::Never).then(Default::default),
            evicting: (when == Evict::Always).into(),
            pace: (when == Evict::WhenSlow).then(Default::default),
        }
    }

    /// Times a write of `len` bytes done by `write` (only while the pace is
    /// still to be decided), switching eviction on once a window is slow.
    pub(crate) fn timed<T>(&self, len: u64, write: impl FnOnce() -> T) -> T {
        let Some(pace) = self.pace.as_ref().filter(|_| !self.evicting.load(Relaxed)) else {
            return write();
        };
        lock(pace).start(Instant::now());
        let r = write();
        let window = lock(pace).end(Instant::now(), len);
        if window.is_some_and(|bytes_per_s| bytes_per_s < SLOW_PACE) {
            self.evicting.store(true, Relaxed);
        }
        r
    }

    /// `len` bytes at `offset` were written: adds them to the span being
    /// gathered; once it holds [`EVICT_SPAN`] bytes (and was not written in
    /// pieces under [`EVICT_MIN_WRITE`]), says to start its write-back and,
    /// past [`EVICT_WINDOW`], to drop the oldest span.
    pub(crate) fn written(&self, offset: u64, len: u64) -> Option<Due> {
        let behind = self.behind.as_ref()?;
        if !self.evicting.load(Relaxed) {
            return None;
        }
        let mut b = lock(behind);
        let span = b.gathering.get_or_insert(Span {
            start: offset,
            end: offset + len,
            bytes: 0,
            writes: 0,
        });
        span.start = span.start.min(offset);
        span.end = span.end.max(offset + len);
        span.bytes += len;
        span.writes += 1;
        if span.bytes < EVICT_SPAN {
            return None;
        }
        let span = b.gathering.take()?;
        if span.bytes / span.writes < EVICT_MIN_WRITE {
            return None;
        }
        b.started.push_back(span);
        b.started_bytes += span.bytes;
        let drop = if b.started_bytes > EVICT_WINDOW {
            let old = b.started.pop_front();
            b.started_bytes -= old.map_or(0, |o| o.bytes);
            old
        } else {
            None
        };
        Some(Due { start: span, drop })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24000000 kB\nMemFree:        20000000 kB\nMemAvailable:   23000000 kB\nActive(file):     1000000 kB\nInactive(file):   2000000 kB\n";

    #[test]
    fn the_threshold_is_a_ratio_of_free_and_file_pages() {
        // (20,000,000 + 1,000,000 + 2,000,000) kB, 10%.
        let t = threshold("0\n", "10\n", MEMINFO);
        assert_eq!(t, Some(23_000_000 * 1024 / 100 * 10));
    }

    #[test]
    fn bytes_win_over_the_ratio_when_set() {
        assert_eq!(threshold("1048576\n", "10\n", MEMINFO), Some(1 << 20));
    }

    #[test]
    fn a_meminfo_without_the_fields_gives_no_threshold() {
        assert_eq!(threshold("0", "10", "MemTotal: 1 kB\n"), None);
        assert_eq!(threshold("0", "ten", MEMINFO), None);
        assert_eq!(threshold("", "10", MEMINFO), None);
    }

    #[test]
    fn evicts_when_slow_up_to_free_run_and_always_past_it() {
        let thresholds = DirtyThresholds::new(2 << 30, 4 << 30);
        assert_eq!(thresholds.free_run(), 3 << 30);
        let t = Some(thresholds);
        assert_eq!(evict_by_default(Some(0), t), Evict::WhenSlow);
        assert_eq!(evict_by_default(Some(2 << 30), t), Evict::WhenSlow);
        assert_eq!(evict_by_default(Some(3 << 30), t), Evict::WhenSlow);
        assert_eq!(evict_by_default(Some((3 << 30) + 1), t), Evict::Always);
        assert_eq!(evict_by_default(None, t), Evict::Always);
        assert_eq!(evict_by_default(Some(0), None), Evict::Always);
    }

    #[test]
    fn a_background_threshold_not_below_the_limit_is_half_of_it() {
        let t = DirtyThresholds::new(2 << 30, 1 << 30);
        assert_eq!(t.background, 512 << 20);
        assert_eq!(t.free_run(), 768 << 20);
        assert_eq!(DirtyThresholds::new(1 << 30, 4 << 30).background, 1 << 30);
    }

    #[test]
    fn the_pace_counts_time_when_some_write_is_running_once() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let half = PACE_WINDOW / 2;
        let mut p = Pace::default();
        // Two writes overlapping over [0, 100) ms, then an idle gap that
        // does not count, then a write over [500, 600) ms ending the window.
        p.start(ms(0));
        p.start(ms(50));
        assert_eq!(p.end(ms(80), 0), None);
        assert_eq!(p.end(ms(100), half), None);
        p.start(ms(500));
        let pace = p.end(ms(600), half).expect("a whole window");
        assert_eq!(pace, PACE_WINDOW * 5);
        // The next window starts empty; one still writing at its end counts
        // up to then, and the rest of its time goes to the next window.
        p.start(ms(1000));
        p.start(ms(1000));
        let pace = p.end(ms(1200), PACE_WINDOW).expect("a whole window");
        assert_eq!(pace, PACE_WINDOW * 5);
        assert_eq!(p.end(ms(1300), half), None);
        assert_eq!(p.busy, Duration::from_millis(100));
    }

    #[test]
    fn a_window_slower_than_the_slow_pace_ends_early() {
        let t0 = Instant::now();
        let longest = SLOWEST_WINDOW;
        let mut p = Pace::default();
        p.start(t0);
        assert_eq!(p.end(t0 + longest, 1 << 20), None);
        p.start(t0 + longest);
        let pace = p.end(t0 + longest * 2, 1 << 20).expect("decided early");
        assert!(pace < SLOW_PACE, "{pace}");
        assert_eq!((p.bytes, p.busy), (0, Duration::ZERO));
    }

    #[test]
    fn spans_start_write_back_then_drop_past_the_window() {
        let e = Evictor::new(Evict::Always);
        let piece = 1 << 20;
        let mut dues = Vec::new();
        for i in 0..(EVICT_WINDOW + 2 * EVICT_SPAN) / piece {
            if let Some(d) = e.written(i * piece, piece) {
                dues.push(d);
            }
        }
        let spans = (EVICT_WINDOW + 2 * EVICT_SPAN) / EVICT_SPAN;
        assert_eq!(dues.len() as u64, spans);
        assert_eq!(dues[0].start.start, 0);
        assert_eq!(dues[0].start.end, EVICT_SPAN);
        // The window fills up; from then on each new span drops the oldest.
        let first_drop = dues.iter().position(|d| d.drop.is_some()).unwrap();
        assert_eq!(first_drop as u64, EVICT_WINDOW / EVICT_SPAN);
        assert_eq!(dues[first_drop].drop.unwrap().start, 0);
    }

    #[test]
    fn small_pieces_and_never_are_left_to_the_kernel() {
        let e = Evictor::new(Evict::Always);
        let small = EVICT_MIN_WRITE / 2;
        assert!((0..EVICT_SPAN / small).all(|i| e.written(i * small, small).is_none()));
        let never = Evictor::new(Evict::Never);
        assert!((0..64).all(|i| never.written(i << 20, 1 << 20).is_none()));
        // WhenSlow does nothing until a slow window was timed.
        let slow = Evictor::new(Evict::WhenSlow);
        assert!((0..64).all(|i| slow.written(i << 20, 1 << 20).is_none()));
    }

    #[test]
    fn this_machine_has_a_threshold() {
        // Linux always has these files; a None here would make every copy
        // evict without anyone noticing.
        let t = dirty_thresholds().expect("/proc/sys/vm and /proc/meminfo readable");
        assert!(t.background > 0 && t.limit > 0);
    }
}
