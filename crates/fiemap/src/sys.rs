//! Every syscall of the crate that needs `unsafe` or a kernel struct: the
//! FIEMAP and BLKGETSIZE64 ioctls, cachestat, and OFD byte-range locks.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// `struct fiemap` from linux/fiemap.h: the 32-byte header of a FIEMAP
/// request. The array of [`FiemapExtent`] follows it in the same buffer.
#[repr(C)]
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
pub(crate) struct FiemapExtent {
    pub fe_logical: u64,
    pub fe_physical: u64,
    pub fe_length: u64,
    pub fe_reserved64: [u64; 2],
    pub fe_flags: u32,
    pub fe_reserved: [u32; 3],
}

pub(crate) const HEADER_SIZE: usize = size_of::<FiemapHeader>();
pub(crate) const EXTENT_SIZE: usize = size_of::<FiemapExtent>();
const _: () = assert!(HEADER_SIZE == 32);
const _: () = assert!(EXTENT_SIZE == 56);

/// `_IOWR('f', 11, struct fiemap)`: the size field is the header's alone.
pub(crate) const FS_IOC_FIEMAP: libc::c_ulong =
    nix::request_code_readwrite!(b'f', 11, HEADER_SIZE) as libc::c_ulong;
const _: () = assert!(FS_IOC_FIEMAP == 0xC020_660B);

/// `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong =
    nix::request_code_read!(0x12, 114, size_of::<u64>()) as libc::c_ulong;
const _: () = assert!(BLKGETSIZE64 == 0x8008_1272);

/// Runs FS_IOC_FIEMAP on `buf`, which holds a header followed by room for
/// `fm_extent_count` extents.
pub(crate) fn fiemap(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<(), Errno> {
    let count = u32::from_ne_bytes(buf[24..28].try_into().unwrap()) as usize;
    assert!(buf.len() >= HEADER_SIZE + count * EXTENT_SIZE);
    // SAFETY: `buf` is a live, exclusively borrowed buffer of at least the
    // header plus `fm_extent_count` extents (asserted above), which is all
    // the kernel reads or writes; the kernel copies to and from user memory
    // byte-wise, so no alignment is required; `fd` is open for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_FIEMAP as _, buf.as_mut_ptr()) };
    Errno::result(r).map(drop)
}

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
