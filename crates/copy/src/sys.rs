//! The crate's system calls: page-aligned buffers, BLKZEROOUT,
//! sync_file_range, reads from the page cache only, signal handlers.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// A zero-initialised, page-aligned byte buffer (an anonymous mapping):
/// the kernel copies page-aligned buffers fastest, O_DIRECT needs them,
/// and pages are only backed once touched, so a worker whose items are
/// small keeps its resident memory small whatever the chunk size.
///
/// A buffer of [`HUGE_PAGE`] or more starts on a huge-page boundary and
/// asks for transparent huge pages: an O_DIRECT read into physically
/// contiguous memory reaches the disk as one request up to the queue's
/// largest, where 4 KiB pages cap it at the queue's segment count.
pub(crate) struct AlignedBuf {
    map: memmap2::MmapMut,
    start: usize,
    len: usize,
}

/// Size and alignment of a transparent huge page on x86-64 and arm64
/// with 4 KiB pages; elsewhere the advice is only a hint that may fail.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

impl AlignedBuf {
    /// A buffer of `len` bytes (`len > 0`).
    pub(crate) fn new(len: usize) -> Self {
        assert!(len > 0);
        let huge = len >= HUGE_PAGE;
        let slack = if huge { HUGE_PAGE } else { 0 };
        // Out of memory: abort as a failed Vec allocation does.
        let map = len
            .checked_add(slack)
            .and_then(|n| memmap2::MmapMut::map_anon(n).ok())
            .unwrap_or_else(|| {
                std::alloc::handle_alloc_error(
                    std::alloc::Layout::from_size_align(len, 4096).expect("a valid layout"),
                )
            });
        let mut start = 0;
        if huge {
            start = map.as_ptr().align_offset(HUGE_PAGE);
            // Only a hint: without huge pages the buffer works as before.
            let _ = map.advise_range(memmap2::Advice::HugePage, start, len);
        }
        Self { map, start, len }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map[self.start..self.start + self.len]
    }
}

/// `_IO(0x12, 127)`: zero a byte range of a block device, `[start, len]`.
const BLKZEROOUT: libc::c_ulong = nix::request_code_none!(0x12, 127) as libc::c_ulong;
const _: () = assert!(BLKZEROOUT == 0x127f);

/// Zeroes `len` bytes at `offset` of the block device open on `fd`; both
/// must be multiples of the logical block size.
pub(crate) fn blkzeroout(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<(), Errno> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64 through the pointer, which points to
    // a live local array of exactly that; `fd` is open for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
    Errno::result(r).map(drop)
}

/// sync_file_range(2) on `len` bytes at `offset`: starts writing them back,
/// and with `wait` first waits for any write-back already under way there
/// and then for this one, so that the pages are clean when it returns.
pub(crate) fn sync_file_range(
    fd: BorrowedFd<'_>,
    offset: u64,
    len: u64,
    wait: bool,
) -> Result<(), Errno> {
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    // SAFETY: sync_file_range takes plain integers and an open descriptor,
    // which `fd` guarantees for the call; it touches no memory of ours.
    let r = unsafe { libc::sync_file_range(fd.as_raw_fd(), offset as i64, len as i64, flags) };
    Errno::result(r).map(drop)
}

/// Reads into `buf` at `offset` only what the page cache holds, without
/// waiting for the disk (preadv2 with RWF_NOWAIT): the bytes read, fewer
/// than asked (possibly 0) where the cache runs out, or EAGAIN when it
/// holds none of them.
pub(crate) fn pread_cached(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    offset: u64,
) -> Result<usize, Errno> {
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the one iovec points to `buf`, writable for `buf.len()`
    // bytes and borrowed mutably for the call; `fd` is open for the call.
    let r = unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, offset as i64, libc::RWF_NOWAIT) };
    Errno::result(r).map(|n| n as usize)
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn raise_stop(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Installs handlers so that SIGINT and SIGTERM raise the returned flag
/// instead of killing the process.
pub(crate) fn stop_on_signals() -> std::io::Result<&'static std::sync::atomic::AtomicBool> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(raise_stop),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; no other code of this program installs a
        // handler for these signals.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(&STOP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_buffers_start_on_a_huge_page_and_small_ones_on_a_page() {
        for (len, align) in [
            (4096, 4096),
            (HUGE_PAGE - 4096, 4096),
            (HUGE_PAGE, HUGE_PAGE),
        ] {
            let mut b = AlignedBuf::new(len);
            let s = b.as_mut_slice();
            assert_eq!(s.len(), len);
            assert_eq!(s.as_ptr() as usize % align, 0, "{len} bytes");
            assert!(s.iter().all(|&x| x == 0));
            s[len - 1] = 1;
        }
        let mut b = AlignedBuf::new(3 * HUGE_PAGE + 4096);
        assert_eq!(b.as_mut_slice().as_ptr() as usize % HUGE_PAGE, 0);
    }
}
