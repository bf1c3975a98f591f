#!/usr/bin/env python3
"""sparse_copy SOURCE DEST [--offset BYTES] [--skip BYTES] [--length BYTES]

A port, for `cargo xtask bench`, of the filemap `sparse_copy` of bmap-tools
(bmaptools/Filemap.py, intel/bmap-tools, later yoctoproject/bmaptool): the
way people copied sparse images in Python before the function was dropped
from the package. Written anew; what it does is what the original did:

- The source is opened buffered ('rb') and fsynced before it is mapped.
- Its map comes from FIEMAP, called with FIEMAP_FLAG_SYNC and a 256 KiB
  buffer (4680 extents per call), or from SEEK_DATA/SEEK_HOLE where there is
  no FIEMAP. Ranges are in file-system blocks (FIGETBSZ); neighbouring
  mapped ranges are merged; FIEMAP's unwritten (fallocated) extents count as
  mapped, so they are copied as data.
- DEST is opened for update ('r+b') when it exists; otherwise it is created
  ('wb') and truncated to the source's size (plus offset, minus skip), or to
  offset plus length when a length is given.
- Only the source bytes from skip up to skip + length (to the end without a
  length) are copied, to offset + (their offset - skip) of DEST.
- Each mapped range is copied with buffered read() and write() calls of at
  most 1 MiB, on one thread. Zeros inside data are written, not skipped.
- DEST is closed, never fsynced.
"""

import argparse
import errno
import fcntl
import os
import struct
import sys

# struct fiemap (32 bytes) and struct fiemap_extent (56 bytes), as in
# linux/fiemap.h; FS_IOC_FIEMAP is _IOWR('f', 11, struct fiemap).
FIEMAP_HEADER = struct.Struct("=QQLLLL")
FIEMAP_EXTENT = struct.Struct("=QQQQQLLLL")
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_BUFFER = 256 * 1024
FIGETBSZ = 2
SEEK_DATA, SEEK_HOLE = 3, 4
CHUNK = 1024 * 1024


class NotSupported(Exception):
    """The kernel or file system cannot map this file that way."""


def block_size(f):
    """The file system's block size (FIGETBSZ), else st_blksize."""
    try:
        (bsize,) = struct.unpack("I", fcntl.ioctl(f, FIGETBSZ, struct.pack("I", 0)))
        if bsize:
            return bsize
    except OSError:
        pass
    return os.fstat(f.fileno()).st_blksize


def fiemap(f, start, length, count):
    """One FIEMAP call: a buffer holding the header and `count` extents."""
    buf = bytearray(FIEMAP_HEADER.size + count * FIEMAP_EXTENT.size)
    FIEMAP_HEADER.pack_into(buf, 0, start, length, FIEMAP_FLAG_SYNC, 0, count, 0)
    try:
        fcntl.ioctl(f, FS_IOC_FIEMAP, buf, True)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
            raise NotSupported("FIEMAP") from e
        raise
    return buf


def fiemap_ranges(f, bsize, blocks):
    """(first, last) mapped blocks, one pair per extent, from FIEMAP."""
    count = (FIEMAP_BUFFER - FIEMAP_HEADER.size) // FIEMAP_EXTENT.size
    block = 0
    while block < blocks:
        buf = fiemap(f, block * bsize, (blocks - block) * bsize, count)
        mapped = FIEMAP_HEADER.unpack_from(buf)[3]
        if mapped == 0:
            return
        for i in range(mapped):
            logical, _physical, length = FIEMAP_EXTENT.unpack_from(
                buf, FIEMAP_HEADER.size + i * FIEMAP_EXTENT.size
            )[:3]
            first = logical // bsize
            if first >= blocks:
                return
            end = min(first + length // bsize, blocks)
            yield max(first, block), end - 1
        block = first + length // bsize


def seek_ranges(fd, bsize, size, blocks):
    """(first, last) mapped blocks from SEEK_DATA/SEEK_HOLE."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            if e.errno == errno.EINVAL:
                raise NotSupported("SEEK_DATA") from e
            raise
        end = os.lseek(fd, start, SEEK_HOLE)
        if end >= size:
            end = blocks * bsize
        yield start // bsize, end // bsize - 1
        pos = end


def merged(ranges):
    """Merges ranges whose blocks follow on."""
    current = None
    for first, last in ranges:
        if current is not None and current[1] + 1 == first:
            current = (current[0], last)
            continue
        if current is not None:
            yield current
        current = (first, last)
    if current is not None:
        yield current


def mapped_ranges(f, bsize, size):
    """FIEMAP when the file system has it (probed on block 0), else SEEK_DATA."""
    blocks = (size + bsize - 1) // bsize
    try:
        fiemap(f, 0, bsize, 1)
        return merged(fiemap_ranges(f, bsize, blocks))
    except NotSupported:
        return merged(seek_ranges(f.fileno(), bsize, size, blocks))


def sparse_copy(src_path, dst_path, offset=0, skip=0, length=None):
    with open(src_path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        bsize = block_size(src)
        os.fsync(src.fileno())
        ranges = mapped_ranges(src, bsize, size)
        stop = size if length is None else skip + length
        try:
            dst = open(dst_path, "r+b")
        except OSError:
            dst = open(dst_path, "wb")
            dst.truncate(offset + (size - skip if length is None else length))
        with dst:
            for first, last in ranges:
                start, end = first * bsize, min((last + 1) * bsize, stop)
                if end <= skip:
                    continue
                if start >= stop:
                    break
                start = max(start, skip)
                src.seek(start)
                dst.seek(offset + start - skip)
                left = end - start
                while left > 0:
                    chunk = src.read(min(CHUNK, left))
                    if not chunk:
                        break
                    dst.write(chunk)
                    left -= len(chunk)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("dest")
    p.add_argument("--offset", type=int, default=0, help="write at this offset of DEST")
    p.add_argument("--skip", type=int, default=0, help="skip this many bytes of SOURCE")
    p.add_argument("--length", type=int, help="copy only this many bytes of SOURCE")
    a = p.parse_args()
    try:
        sparse_copy(a.source, a.dest, a.offset, a.skip, a.length)
    except OSError as e:
        print(f"sparse_copy: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
