//! The data of a stream, read forward in host order as [`Chunk`]s.

use std::io::Read;

use super::error::{Result, StreamError};
use super::pieces::{Payload, Piece};
use super::{Forward, MAX_CHUNK_BYTES};
use crate::compress::decompress;
use crate::error::Error;
use crate::header::Header;
use crate::types::GuestOffset;

/// One run of guest data read from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Where the data goes in the virtual disk.
    pub guest_offset: GuestOffset,
    /// The data: whole clusters or subclusters, clipped at the virtual
    /// size; at most [`MAX_CHUNK_BYTES`] or one cluster.
    pub data: Vec<u8>,
}

/// A run of allocated subclusters of one piece.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Index of the piece.
    piece: usize,
    /// First subcluster after the run.
    sub_end: u32,
    host: u64,
    guest: u64,
    len: u64,
}

/// What comes next in the stream.
#[derive(Debug)]
enum Next {
    Run(Run),
    Compressed { piece: Piece, size: u64 },
    End,
}

/// The data of a stream, in host order: an iterator of [`Chunk`]s made
/// by [`super::StreamDecoder::read_tables`]. It stops after the first error.
#[derive(Debug)]
pub struct Chunks<R> {
    r: Forward<R>,
    header: Header,
    /// Pieces to read, sorted by host offset.
    pieces: Vec<Piece>,
    /// The piece to read next.
    next: usize,
    /// The first subcluster of that piece not read yet.
    sub: u32,
    /// Bytes `carry_start..r.pos` of the last compressed cluster read:
    /// the next compressed cluster may start inside them.
    carry: Vec<u8>,
    carry_start: u64,
    /// A buffer given back by the caller.
    spare: Vec<u8>,
    data_bytes: u64,
    /// An error met while extending a chunk: returned after the chunk.
    deferred: Option<StreamError>,
    done: bool,
}

impl<R: Read> Chunks<R> {
    pub(super) fn new(r: Forward<R>, header: Header, pieces: Vec<Piece>, data_bytes: u64) -> Self {
        Chunks {
            r,
            header,
            pieces,
            next: 0,
            sub: 0,
            carry: Vec::new(),
            carry_start: 0,
            spare: Vec::new(),
            data_bytes,
            deferred: None,
            done: false,
        }
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Size of the virtual disk in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.header.size
    }

    /// Guest bytes the iterator will yield in all: the total for a
    /// progress bar.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Guest clusters (standard or compressed) with data to yield.
    pub fn data_clusters(&self) -> usize {
        self.pieces.len()
    }

    /// Bytes of the stream consumed so far.
    pub fn position(&self) -> u64 {
        self.r.pos
    }

    /// Gives back the buffer of a chunk the caller is done with, to be
    /// reused for a later chunk.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() > self.spare.capacity() {
            self.spare = buf;
        }
    }

    /// The underlying reader, positioned after the last byte consumed.
    pub fn into_inner(self) -> R {
        self.r.inner
    }

    /// Finds what comes next from the cursor, stepping over pieces with
    /// nothing left inside the disk.
    fn peek(&mut self) -> Next {
        let cs = self.header.cluster_size();
        let sc = self.header.subcluster_size();
        let nsub = self.header.subclusters() as u32;
        while let Some(&p) = self.pieces.get(self.next) {
            let mask = match p.payload {
                Payload::Compressed(size) => {
                    return Next::Compressed {
                        piece: p,
                        size: size.into(),
                    };
                }
                Payload::Data(mask) => mask,
                Payload::Reserved => 0,
            };
            let rest = if self.sub >= 32 {
                0
            } else {
                mask >> self.sub << self.sub
            };
            if rest != 0 {
                let a = rest.trailing_zeros();
                let b = (a + (rest >> a).trailing_ones()).min(nsub);
                let guest = p.guest.0 + u64::from(a) * sc;
                if guest < self.header.size {
                    let len = (u64::from(b - a) * sc).min(self.header.size - guest);
                    return Next::Run(Run {
                        piece: self.next,
                        sub_end: b,
                        host: p.host.0 + u64::from(a) * sc,
                        guest,
                        len: len.min(cs),
                    });
                }
            }
            self.next += 1;
            self.sub = 0;
        }
        Next::End
    }

    /// Moves the cursor past a run.
    fn consume(&mut self, run: &Run) {
        self.next = run.piece;
        self.sub = run.sub_end;
    }

    fn beyond_end(&self, piece: usize) -> StreamError {
        let p = self.pieces[piece];
        StreamError::BeyondEnd {
            count: (self.pieces.len() - piece) as u64,
            guest: p.guest.0,
            host: p.host.0,
            end: self.r.pos,
        }
    }

    /// Reads one run at the end of `buf`.
    fn read_run(&mut self, run: &Run, buf: &mut Vec<u8>) -> Result<()> {
        self.r.skip_to(run.host)?;
        if self.r.pos < run.host {
            return Err(self.beyond_end(run.piece));
        }
        let at = buf.len();
        buf.resize(at + run.len as usize, 0);
        let n = self.r.fill(&mut buf[at..])?;
        if n < run.len as usize {
            return Err(if n == 0 && run.host == self.pieces[run.piece].host.0 {
                self.beyond_end(run.piece)
            } else {
                StreamError::Truncated {
                    what: "data cluster",
                    offset: run.host,
                    region_end: run.host + run.len,
                    end: self.r.pos,
                }
            });
        }
        Ok(())
    }

    fn step(&mut self) -> Result<Option<Chunk>> {
        let max = MAX_CHUNK_BYTES.max(self.header.cluster_size());
        match self.peek() {
            Next::End => Ok(None),
            Next::Compressed { piece, size } => {
                self.next += 1;
                self.sub = 0;
                self.compressed(piece, size).map(Some)
            }
            Next::Run(first) => {
                let mut data = std::mem::take(&mut self.spare);
                data.clear();
                self.read_run(&first, &mut data)?;
                self.consume(&first);
                let (host0, guest0) = (first.host, first.guest);
                // Merge what follows on both sides, clusters or subclusters.
                while let Next::Run(run) = self.peek() {
                    let len = data.len() as u64;
                    if run.host != host0 + len || run.guest != guest0 + len || len + run.len > max {
                        break;
                    }
                    let before = data.len();
                    if let Err(e) = self.read_run(&run, &mut data) {
                        // Hand over what was read; the error comes next.
                        data.truncate(before);
                        self.deferred = Some(e);
                        break;
                    }
                    self.consume(&run);
                }
                Ok(Some(Chunk {
                    guest_offset: GuestOffset(guest0),
                    data,
                }))
            }
        }
    }

    /// Reads and decompresses one compressed cluster.
    fn compressed(&mut self, p: Piece, size: u64) -> Result<Chunk> {
        let (host, guest) = (p.host.0, p.guest.0);
        let end = host + size;
        if host >= self.r.pos {
            self.r.skip_to(host)?;
            self.carry.clear();
            self.carry_start = self.r.pos;
        } else if host >= self.carry_start {
            // Packed after the previous compressed cluster: its bytes are
            // kept (check_pieces allows no other overlap).
            let drop = (host - self.carry_start) as usize;
            self.carry.drain(..drop.min(self.carry.len()));
            self.carry_start = host;
        } else {
            return Err(StreamError::DuplicateReference {
                host,
                guest,
                other_guest: guest,
            });
        }
        if self.carry_start < host {
            return Err(self.beyond_end(self.next - 1));
        }
        if end > self.r.pos {
            let want = end - self.r.pos;
            self.r.append(&mut self.carry, want)?;
        }
        let avail = self.carry.len().min(size as usize);
        if avail == 0 {
            return Err(self.beyond_end(self.next - 1));
        }
        // The last compressed cluster's sector count may reach past the
        // end of the file (qemu reads zeros there); a short input is only
        // an error if it does not decompress to a full cluster.
        let cs = self.header.cluster_size();
        let mut out = decompress(
            self.header.compression_type,
            &self.carry[..avail],
            cs as usize,
        )
        .map_err(|problem| StreamError::Decompress {
            guest,
            source: Error::Decompress {
                host_offset: host,
                size,
                problem,
            },
        })?;
        out.truncate(cs.min(self.header.size - guest) as usize);
        Ok(Chunk {
            guest_offset: p.guest,
            data: out,
        })
    }
}

impl<R: Read> Iterator for Chunks<R> {
    type Item = Result<Chunk>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if let Some(e) = self.deferred.take() {
            self.done = true;
            return Some(Err(e));
        }
        match self.step() {
            Ok(Some(c)) => Some(Ok(c)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

impl<R: Read> std::iter::FusedIterator for Chunks<R> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::StreamDecoder;
    use crate::stream::tests::{chunks, stream};

    #[test]
    fn contiguous_clusters_merge_up_to_the_chunk_cap() {
        // 512-byte clusters, 3 MiB of data then a gap then one cluster.
        let s = stream(8 << 20, 9, &[(0, 3 << 20), (5 << 20, (5 << 20) + 1)]);
        assert_eq!(
            chunks(&s),
            [
                (0, 1 << 20),
                (1 << 20, 1 << 20),
                (2 << 20, 1 << 20),
                (5 << 20, 512)
            ]
        );
        // 2 MiB clusters are never merged past one cluster.
        let s = stream(8 << 20, 21, &[(0, 4 << 20)]);
        assert_eq!(chunks(&s), [(0, 2 << 20), (2 << 20, 2 << 20)]);
    }

    #[test]
    fn virtual_size_not_a_multiple_of_512_clips_the_last_chunk() {
        let mut s = stream(1 << 20, 16, &[((1 << 20) - 1, 1 << 20)]);
        let size = (1u64 << 20) - 100;
        s[24..32].copy_from_slice(&size.to_be_bytes()); // header: size
        let d = StreamDecoder::new(&s[..]).unwrap();
        assert_eq!(d.virtual_size(), size);
        let c = d.read_tables().unwrap();
        assert_eq!(c.data_bytes(), 65536 - 100);
        let all: Vec<Chunk> = c.collect::<Result<_>>().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].guest_offset, GuestOffset(15 << 16));
        assert_eq!(all[0].data, vec![16u8; 65536 - 100]);
    }
}
