//! Every syscall of the crate that needs `unsafe` or a kernel struct: the
//! FIEMAP and BLKGETSIZE64 ioctls, cachestat, and OFD byte-range locks.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// `struct fiemap` from linux/fiemap.h: the 32-byte header of a FIEMAP
/// request. The array of [`FiemapExtent`] follows it in the same buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FiemapHeader {
    /// Logical offset (inclusive) at which to start mapping (in).
    pub fm_start: u64,
    /// Logical length of the mapping the caller cares about (in).
    pub fm_length: u64,
    /// FIEMAP_FLAG_* for the request (in/out).
    pub fm_flags: u32,
    /// Number of extents that were mapped (out).
    pub fm_mapped_extents: u32,
    /// Size of the fm_extents array (in).
    pub fm_extent_count: u32,
    pub fm_reserved: u32,
}

/// `struct fiemap_extent` from linux/fiemap.h.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FiemapExtent {
    /// Logical offset in bytes of the start of the extent.
    pub fe_logical: u64,
    /// Physical offset in bytes of the start of the extent.
    pub fe_physical: u64,
    /// Length in bytes.
    pub fe_length: u64,
    pub fe_reserved64: [u64; 2],
    /// FIEMAP_EXTENT_* flags.
    pub fe_flags: u32,
    pub fe_reserved: [u32; 3],
}

/// A FIEMAP request: the header, then room for `N` extents, laid out as
/// the kernel reads and writes it.
#[repr(C)]
pub(crate) struct Fiemap<const N: usize> {
    pub header: FiemapHeader,
    pub extents: [FiemapExtent; N],
}

impl<const N: usize> Fiemap<N> {
    /// A zeroed request on the heap (N extents are too large for a stack).
    pub(crate) fn boxed() -> Box<Self> {
        let layout = std::alloc::Layout::new::<Self>();
        // SAFETY: the layout is not zero-sized: the header alone is 32 bytes.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<Self>();
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: `ptr` comes from the global allocator with `Self`'s
        // layout, as `Box` requires, and all-zero bytes are a valid `Self`
        // (integers only). (`Box::new_zeroed` needs Rust 1.92.)
        unsafe { Box::from_raw(ptr) }
    }

    /// The extents the last call mapped.
    pub(crate) fn mapped(&self) -> &[FiemapExtent] {
        &self.extents[..(self.header.fm_mapped_extents as usize).min(N)]
    }
}

// The kernel's layout (linux/fiemap.h); a public Rust binding once got
// these sizes wrong, so they are checked rather than trusted.
const _: () = assert!(size_of::<FiemapHeader>() == 32);
const _: () = assert!(size_of::<FiemapExtent>() == 56);
const _: () = assert!(std::mem::offset_of!(FiemapHeader, fm_flags) == 16);
const _: () = assert!(std::mem::offset_of!(FiemapHeader, fm_mapped_extents) == 20);
const _: () = assert!(std::mem::offset_of!(FiemapHeader, fm_extent_count) == 24);
const _: () = assert!(std::mem::offset_of!(FiemapExtent, fe_length) == 16);
const _: () = assert!(std::mem::offset_of!(FiemapExtent, fe_flags) == 40);
const _: () = assert!(size_of::<Fiemap<2>>() == 32 + 2 * 56);

/// `_IOWR('f', 11, struct fiemap)`: the size field is the header's alone.
pub(crate) const FS_IOC_FIEMAP: libc::c_ulong =
    nix::request_code_readwrite!(b'f', 11, size_of::<FiemapHeader>()) as libc::c_ulong;
const _: () = assert!(FS_IOC_FIEMAP == 0xC020_660B);

/// Runs FS_IOC_FIEMAP on `req` after setting its `fm_extent_count` to the
/// room it has.
pub(crate) fn fiemap<const N: usize>(fd: BorrowedFd<'_>, req: &mut Fiemap<N>) -> Result<(), Errno> {
    req.header.fm_extent_count = N as u32;
    // SAFETY: `req` is a live, exclusively borrowed header followed by
    // exactly `fm_extent_count` extents (set above), all the kernel reads
    // or writes; the structs are laid out as the kernel's (asserted
    // above); `fd` is open for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FIEMAP as _, req as *mut Fiemap<N>) };
    Errno::result(r).map(drop)
}

/// `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong =
    nix::request_code_read!(0x12, 114, size_of::<u64>()) as libc::c_ulong;
const _: () = assert!(BLKGETSIZE64 == 0x8008_1272);

/// The size in bytes of the block device open on `fd`.
pub(crate) fn block_device_size(fd: BorrowedFd<'_>) -> Result<u64, Errno> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // to a live local of that type; `fd` is open for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    Errno::result(r).map(|_| size)
}

/// `cachestat(2)`'s number: the same on every architecture (the numbers
/// from 424 on are shared), and missing from some of libc's tables.
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range` from linux/mman.h.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` from linux/mman.h.
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// How many pages of `[offset, offset + len)` of the file open on `fd`
/// the page cache holds, without reading any (`cachestat(2)`, Linux 6.5;
/// ENOSYS before).
pub(crate) fn cached_pages(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<u64, Errno> {
    let range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // SAFETY: `range` and `stat` live across the call and are laid out as
    // the kernel's structs (repr(C)); it reads one and writes the other.
    // `fd` is open for the call; flags must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0 as libc::c_uint,
        )
    };
    Errno::result(r).map(|_| stat.nr_cache)
}

/// An all-zero `struct flock` for one byte at absolute offset `byte`.
fn flock_byte(byte: u64, l_type: libc::c_int) -> libc::flock {
    // SAFETY: `struct flock` is plain integers (and, on some targets,
    // padding); all-zero bytes are a valid value of it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Takes a shared (read) lock on one byte for the open file description
/// of `fd`, or releases it (`take == false`), with `F_OFD_SETLK`: never
/// blocks; a conflicting write lock is EAGAIN.
pub(crate) fn ofd_lock_byte(fd: BorrowedFd<'_>, byte: u64, take: bool) -> Result<(), Errno> {
    let fl = flock_byte(byte, if take { libc::F_RDLCK } else { libc::F_UNLCK });
    loop {
        match nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)) {
            Err(Errno::EINTR) => {}
            r => return r.map(drop),
        }
    }
}

/// Whether an open file description other than `fd`'s holds any lock on
/// `byte` (`F_OFD_GETLK` asked for an exclusive lock, which every other
/// lock conflicts with), and whether that lock is exclusive.
pub(crate) fn ofd_byte_locked_elsewhere(
    fd: BorrowedFd<'_>,
    byte: u64,
) -> Result<Option<bool>, Errno> {
    let mut fl = flock_byte(byte, libc::F_WRLCK);
    loop {
        match nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut fl)) {
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
            Ok(_) => {
                return Ok(match libc::c_int::from(fl.l_type) {
                    libc::F_UNLCK => None,
                    t => Some(t == libc::F_WRLCK),
                });
            }
        }
    }
}

/// An exclusive lock on one byte, such as a program other than qemu might
/// hold; `fd` must be open for writing.
#[cfg(test)]
pub(crate) fn ofd_write_lock_byte(fd: BorrowedFd<'_>, byte: u64) -> Result<(), Errno> {
    let fl = flock_byte(byte, libc::F_WRLCK);
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_OFD_SETLK(&fl)).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_trusts_no_count_beyond_the_room() {
        let mut req = Fiemap::<2>::boxed();
        assert!(req.mapped().is_empty());
        req.header.fm_mapped_extents = 5;
        assert_eq!(req.mapped().len(), 2);
    }
}
