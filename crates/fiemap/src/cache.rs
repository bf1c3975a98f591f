//! Page-cache I/O: reading around the cache with O_DIRECT where it holds
//! nothing, and dropping a file's cached pages.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use crate::sys;

/// Writes the file's dirty pages back and asks the kernel to drop its
/// cached pages (`fdatasync`, then `posix_fadvise(POSIX_FADV_DONTNEED)`).
///
/// The content is unchanged. Tools that map with SEEK_DATA (qemu-img)
/// report cached pages of unwritten extents as data; after this they report
/// what is on disk. Benchmarks use it for cold-cache runs.
pub fn drop_page_cache(file: &File) -> io::Result<()> {
    nix::unistd::fdatasync(file.as_fd())?;
    nix::fcntl::posix_fadvise(
        file.as_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )?;
    Ok(())
}

/// Alignment of an [`Uncached`] read: its offset, length and buffer
/// address. 4096 covers the logical block size of every disk and file
/// system in use (512 or 4096).
pub const DIRECT_ALIGN: usize = 4096;

/// A second descriptor of an open file with O_DIRECT, for reading what
/// the page cache does not hold straight from the disk into the caller's
/// buffer.
///
/// A buffered read of uncached data allocates page-cache pages, fills
/// them from the disk and copies them out; a direct read skips both and
/// reaches the disk in requests as large as the caller's. Cached pages are
/// never read this way: [`Uncached::read_at`] only reads ranges of which
/// the cache holds nothing, so what another process wrote and the cache
/// holds is never bypassed.
#[derive(Debug)]
pub struct Uncached {
    direct: File,
}

impl Uncached {
    /// Opens `file` again (through /proc/self/fd, so the same inode) with
    /// O_DIRECT, read-only. `None` where that fails: a file system without
    /// direct I/O (tmpfs), /proc not mounted.
    pub fn open(file: &File) -> Option<Self> {
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        let id = |f: &File| f.metadata().ok().map(|m| (m.dev(), m.ino(), m.rdev()));
        let direct_id = id(&direct)?;
        (id(file) == Some(direct_id)).then_some(Self { direct })
    }

    /// Fills `buf` with the bytes at `offset` straight from the disk when
    /// the page cache holds none of them and `offset`, `buf.len()` and
    /// `buf`'s address are multiples of [`DIRECT_ALIGN`]. Returns whether
    /// it did; when not (cached pages, misaligned, a short read at the end
    /// of the file, any error), `buf` holds nothing to trust and the caller
    /// reads it the usual way, which reports errors as they are.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> bool {
        use std::os::unix::fs::FileExt;
        let aligned = |n: u64| n.is_multiple_of(DIRECT_ALIGN as u64);
        if buf.is_empty()
            || !aligned(offset)
            || !aligned(buf.len() as u64)
            || !aligned(buf.as_ptr() as u64)
            || sys::cached_pages(self.direct.as_fd(), offset, buf.len() as u64) != Ok(0)
        {
            return false;
        }
        let mut done = 0;
        while done < buf.len() {
            match self.direct.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => return false,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page-aligned window of `v`, `len` bytes long.
    fn aligned(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
        v.resize(len + DIRECT_ALIGN, 0);
        let skip = v.as_ptr().align_offset(DIRECT_ALIGN);
        &mut v[skip..skip + len]
    }

    #[test]
    fn uncached_reads_only_what_the_cache_does_not_hold() {
        use std::os::unix::fs::FileExt;
        // In the crate's directory: /tmp may be a tmpfs, which has no
        // direct I/O.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        drop_page_cache(&file).unwrap();
        let u = Uncached::open(&file).expect("ext4 or xfs has O_DIRECT");
        let mut v = Vec::new();
        let buf = aligned(&mut v, 64 * 1024);
        assert!(u.read_at(buf, 128 * 1024));
        assert_eq!(buf, &data[128 * 1024..192 * 1024]);
        // Misaligned offset, length or address: left to the caller.
        assert!(!u.read_at(&mut buf[..1000], 0));
        assert!(!u.read_at(buf, 100));
        assert!(!u.read_at(&mut buf[1..4097], 0));
        // Past the end: a short read, left to the caller.
        assert!(!u.read_at(buf, 224 * 1024));
        // Once a page of the range is cached, the range is read buffered.
        let mut one = [0u8; 1];
        file.read_exact_at(&mut one, 4096).unwrap();
        assert!(!u.read_at(buf, 0));
        assert!(u.read_at(buf, 192 * 1024));
        assert_eq!(buf, &data[192 * 1024..]);
    }
}
