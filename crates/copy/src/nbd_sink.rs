//! Writing to an NBD export: pipelined `NBD_CMD_WRITE`s over the export's
//! connections, zero ranges as `NBD_CMD_WRITE_ZEROES` (holes allowed), and
//! the partial blocks at unaligned edges read, patched and written back one
//! at a time.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use sparsekit_nbd::{Client, Errno, ZeroFlags};

use crate::error::Error;
use crate::nbd::NbdSource;

/// Bytes of zeros sent per write where the server cannot write zeroes.
const ZERO_WRITE: usize = 1 << 20;
static ZEROS: [u8; ZERO_WRITE] = [0; ZERO_WRITE];

/// An NBD export opened for writing.
#[derive(Debug)]
pub(crate) struct NbdSink {
    export: NbdSource,
    alignment: u64,
    can_zero: bool,
    can_flush: bool,
    /// Everything not yet written reads as zeros: the user said so, or the
    /// whole range was zeroed fast at the start.
    known_zero: AtomicBool,
    /// Bytes zeroed by our requests (see [`crate::sink::Sink::zeroed`]).
    zeroed: AtomicU64,
    /// Serialises the read-modify-write of partial blocks: two items that
    /// share a block patch it one after the other.
    edges: Mutex<()>,
}

impl NbdSink {
    /// Takes the export's connections for a copy. Refusals (read-only, too
    /// small) are the plan's, made before this.
    pub(crate) fn new(export: NbdSource, dest_is_zero: bool) -> Self {
        let flags = export.flags();
        Self {
            alignment: export.alignment(),
            can_zero: flags.can_zero(),
            can_flush: flags.can_flush(),
            known_zero: dest_is_zero.into(),
            zeroed: 0.into(),
            edges: Mutex::new(()),
            export,
        }
    }

    /// The export's URI, for messages.
    pub(crate) fn name(&self) -> &str {
        use crate::source::Source;
        self.export.name()
    }

    /// The connections, read as a source (for verification).
    pub(crate) fn export(&self) -> &NbdSource {
        &self.export
    }

    /// Bytes zeroed by our requests so far.
    pub(crate) fn zeroed(&self) -> u64 {
        self.zeroed.load(Relaxed)
    }

    /// Whether what the copy does not write already reads as zeros.
    pub(crate) fn known_zero(&self) -> bool {
        self.known_zero.load(Relaxed)
    }

    /// Zeroes `range` up front with `NBD_CMD_FLAG_FAST_ZERO`, as
    /// `qemu-img convert` does, where the server promises that zeroing is
    /// fast (a hole punched, not zeros written): the copy then writes only
    /// data. A server that would be slow says so at once (`NBD_ENOTSUP`),
    /// and the copy zeroes range by range instead. Only a range of whole
    /// blocks is zeroed this way (its edges are the copy's to write).
    pub(crate) fn zero_fast(&self, range: Range<u64>) -> Result<(), Error> {
        let flags = self.export.flags();
        if self.known_zero()
            || !self.can_zero
            || !flags.can_fast_zero()
            || range.is_empty()
            || !range.start.is_multiple_of(self.alignment)
            || (!range.end.is_multiple_of(self.alignment) && range.end != self.size())
        {
            return Ok(());
        }
        let fast = ZeroFlags {
            fast: true,
            ..ZeroFlags::default()
        };
        let len = range.end - range.start;
        match self
            .export
            .with_client(|c| c.write_zeroes(range.start, len, fast))
        {
            Ok(()) => {
                self.zeroed.fetch_add(len, Relaxed);
                self.known_zero.store(true, Relaxed);
                Ok(())
            }
            Err(sparsekit_nbd::Error::Server {
                errno: Errno::ENOTSUP,
                ..
            }) => Ok(()),
            Err(source) => Err(self.fail("zeroing", range.start, len, source)),
        }
    }

    fn size(&self) -> u64 {
        use crate::source::Source;
        self.export.size()
    }

    /// Writes all of `buf` at `offset`.
    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), Error> {
        let len = buf.len() as u64;
        let (head, middle, tail) = self.split(offset, len);
        if !head.is_empty() {
            self.patch(head.start, &buf[..(head.end - offset) as usize])?;
        }
        if !middle.is_empty() {
            let part = &buf[(middle.start - offset) as usize..(middle.end - offset) as usize];
            self.export
                .with_client(|c| c.write(middle.start, part))
                .map_err(|e| self.fail("writing", middle.start, part.len() as u64, e))?;
        }
        if !tail.is_empty() {
            self.patch(tail.start, &buf[(tail.start - offset) as usize..])?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros: nothing to do where the
    /// export is known to be zero; `NBD_CMD_WRITE_ZEROES` (the server may
    /// punch holes) where it can; written zeros where it cannot.
    pub(crate) fn zero(&self, offset: u64, len: u64) -> Result<(), Error> {
        if self.known_zero() || len == 0 {
            return Ok(());
        }
        self.zeroed.fetch_add(len, Relaxed);
        let (head, middle, tail) = self.split(offset, len);
        for edge in [head, tail] {
            if !edge.is_empty() {
                self.patch(edge.start, &ZEROS[..(edge.end - edge.start) as usize])?;
            }
        }
        if middle.is_empty() {
            return Ok(());
        }
        let n = middle.end - middle.start;
        if self.can_zero {
            return self
                .export
                .with_client(|c| c.write_zeroes(middle.start, n, ZeroFlags::default()))
                .map_err(|e| self.fail("zeroing", middle.start, n, e));
        }
        let mut at = middle.start;
        while at < middle.end {
            let piece = (middle.end - at).min(ZERO_WRITE as u64) as usize;
            self.export
                .with_client(|c| c.write(at, &ZEROS[..piece]))
                .map_err(|e| self.fail("writing zeros", at, piece as u64, e))?;
            at += piece as u64;
        }
        Ok(())
    }

    /// `NBD_CMD_FLUSH` where the server has it: every write acknowledged
    /// on any connection is on stable storage (several connections are
    /// only open where the server advertises multi-conn, which promises
    /// exactly that).
    pub(crate) fn flush(&self) -> Result<(), Error> {
        if !self.can_flush {
            return Ok(());
        }
        self.export
            .with_client(Client::flush)
            .map_err(|e| self.fail("flushing", 0, 0, e))
    }

    fn split(&self, offset: u64, len: u64) -> (Range<u64>, Range<u64>, Range<u64>) {
        split(offset, len, self.alignment, self.size())
    }

    /// Writes `bytes` at `offset`, inside one block: the block is read,
    /// patched and written back while no other edge is being patched.
    fn patch(&self, offset: u64, bytes: &[u8]) -> Result<(), Error> {
        let a = self.alignment;
        let start = offset / a * a;
        let block_len = a.min(self.size() - start) as usize;
        let mut block = vec![0u8; block_len];
        let at = (offset - start) as usize;
        let _g = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        self.export
            .with_client(|c| c.read(start, &mut block))
            .map_err(|e| self.fail("reading back a partial block", start, a, e))?;
        block[at..at + bytes.len()].copy_from_slice(bytes);
        self.export
            .with_client(|c| c.write(start, &block))
            .map_err(|e| self.fail("writing", start, block_len as u64, e))
    }

    fn fail(
        &self,
        what: &'static str,
        offset: u64,
        len: u64,
        source: sparsekit_nbd::Error,
    ) -> Error {
        Error::Nbd {
            what,
            offset,
            len,
            source: Box::new(source),
        }
    }
}

/// `[offset, offset + len)` cut into a partial block before the first
/// `alignment` boundary, whole blocks, and a partial block after the last.
/// A range that ends at the end of the export (`size`) ends aligned.
fn split(offset: u64, len: u64, alignment: u64, size: u64) -> (Range<u64>, Range<u64>, Range<u64>) {
    let end = offset + len;
    let up = offset.next_multiple_of(alignment).min(end);
    let down = if end == size {
        end
    } else {
        end / alignment * alignment
    };
    if down <= up {
        // Within one block, or across one boundary with no whole block.
        return (offset..up, up..up, up..end);
    }
    (offset..up, up..down, down..end)
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn ranges_split_at_block_boundaries() {
        let size = 1 << 20;
        assert_eq!(split(0, 8192, 4096, size), (0..0, 0..8192, 8192..8192));
        assert_eq!(
            split(1000, 10000, 4096, size),
            (1000..4096, 4096..8192, 8192..11000)
        );
        // Inside one block; across one boundary with no whole block.
        assert_eq!(split(100, 50, 4096, size), (100..150, 150..150, 150..150));
        assert_eq!(
            split(4000, 200, 4096, size),
            (4000..4096, 4096..4096, 4096..4200)
        );
        // Up to the end of the export: the last block is whole.
        assert_eq!(
            split(1000, size - 1000, 4096, size),
            (1000..4096, 4096..size, size..size)
        );
        assert_eq!(split(5, 7, 1, size), (5..5, 5..12, 12..12));
    }
}
