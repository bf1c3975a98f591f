//! Where a host file has data, by `lseek(SEEK_DATA / SEEK_HOLE)`, the way
//! qemu's file-posix driver answers block status.

use std::fs::File;
use std::io;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

/// What `[offset, returned end)` of a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Region {
    /// Data up to the end.
    Data(u64),
    /// A hole (reads as zeros) up to the end.
    Hole(u64),
}

/// The region at `offset` of `file`, which is `len` bytes long; the
/// returned end is at most `limit`.
///
/// ENXIO means "no data after `offset`": a trailing hole. EINVAL and
/// EOPNOTSUPP mean the file system can not tell: like qemu, pretend it is
/// all data. Every other errno is an error.
pub(crate) fn region_at(file: &File, offset: u64, limit: u64) -> io::Result<Region> {
    let to_i64 =
        |o: u64| i64::try_from(o).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    match lseek(file, to_i64(offset)?, Whence::SeekData) {
        Err(Errno::ENXIO) => Ok(Region::Hole(limit)),
        Err(Errno::EINVAL | Errno::EOPNOTSUPP) => Ok(Region::Data(limit)),
        Err(e) => Err(e.into()),
        Ok(data) => {
            let data = data as u64;
            if data > offset {
                return Ok(Region::Hole(data.min(limit)));
            }
            match lseek(file, to_i64(offset)?, Whence::SeekHole) {
                Ok(hole) => Ok(Region::Data((hole as u64).min(limit).max(offset + 1))),
                Err(Errno::ENXIO | Errno::EINVAL | Errno::EOPNOTSUPP) => Ok(Region::Data(limit)),
                Err(e) => Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use super::*;

    #[test]
    fn data_then_trailing_hole() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[1u8; 4096]).unwrap();
        f.set_len(1 << 20).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        match region_at(&f, 0, 1 << 20).unwrap() {
            Region::Data(end) => assert!((4096..1 << 20).contains(&end)),
            r => panic!("{r:?}"),
        }
        assert_eq!(
            region_at(&f, 512 << 10, 1 << 20).unwrap(),
            Region::Hole(1 << 20)
        );
    }
}
