//! Every `unsafe` block of the crate: page-aligned buffers and BLKZEROOUT.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// A zero-initialised, page-aligned byte buffer: the kernel copies page
/// aligned buffers fastest, and O_DIRECT needs them.
pub(crate) struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

const ALIGN: usize = 4096;

impl AlignedBuf {
    /// A buffer of `len` bytes (`len > 0`).
    pub(crate) fn new(len: usize) -> Self {
        assert!(len > 0);
        let layout = Layout::from_size_align(len, ALIGN).expect("buffer size fits a Layout");
        // SAFETY: the layout has a non-zero size (asserted above).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of len initialised (zeroed) bytes
        // owned by self, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated in `new` with exactly this layout and is
        // freed only here.
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len, ALIGN),
            )
        }
    }
}

// SAFETY: AlignedBuf owns its bytes like a Vec<u8>; nothing is shared.
unsafe impl Send for AlignedBuf {}

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
