//! The crate's only `unsafe` code: the local time of a snapshot's date,
//! which the standard library cannot give, and a descriptor of our own
//! for `--progress=FD`.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

// POSIX's tzset(3), which the libc crate does not declare for glibc.
unsafe extern "C" {
    fn tzset();
}

/// A date and time of day in the local time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LocalTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

/// `secs` since the Epoch in the local time zone (`TZ`, else
/// /etc/localtime), as `localtime_r` gives it; `None` where it cannot.
pub(crate) fn local_time(secs: u64) -> Option<LocalTime> {
    let t = libc::time_t::try_from(secs).ok()?;
    let mut tm = std::mem::MaybeUninit::<libc::tm>::uninit();
    // SAFETY: tzset takes no arguments; it reads TZ, which nothing in the
    // binaries changes. localtime_r need not call it, so a TZ given to
    // the process is honoured only after it.
    unsafe { tzset() };
    // SAFETY: `t` and `tm` are valid for the call; localtime_r writes only
    // into `tm` and returns null on failure.
    let r = unsafe { libc::localtime_r(&t, tm.as_mut_ptr()) };
    if r.is_null() {
        return None;
    }
    // SAFETY: localtime_r succeeded, so it filled `tm`.
    let tm = unsafe { tm.assume_init() };
    let field = |v: libc::c_int| u32::try_from(v).ok();
    Some(LocalTime {
        year: i64::from(tm.tm_year) + 1900,
        month: field(tm.tm_mon)? + 1,
        day: field(tm.tm_mday)?,
        hour: field(tm.tm_hour)?,
        minute: field(tm.tm_min)?,
        second: field(tm.tm_sec)?,
    })
}

/// A descriptor of our own onto `fd`, checked to be open.
pub(crate) fn dup_fd(fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: fcntl with F_DUPFD_CLOEXEC only reads its integer arguments;
    // a descriptor that is not open gives EBADF.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("--progress={fd}: file descriptor {fd} is not open: {e}"),
        ));
    }
    // SAFETY: `new` was just made by fcntl and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the zone (all are within 14 hours of UTC, in whole
    /// minutes), the Epoch is 1969-12-31 or 1970-01-01 locally, and a
    /// second past a minute stays one.
    #[test]
    fn the_epoch_is_near_new_year_1970() {
        let t = local_time(0).unwrap();
        assert!(
            [(1970, 1, 1), (1969, 12, 31)].contains(&(t.year, t.month, t.day)),
            "{t:?}"
        );
        assert_eq!(t.second, 0);
        // 1971-01-02 00:01:01 UTC.
        let later = local_time(86_400 * 366 + 61).unwrap();
        assert_eq!((later.year, later.second), (1971, 1), "{later:?}");
    }
}
