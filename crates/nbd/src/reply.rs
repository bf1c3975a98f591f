//! Validation of the chunks of one structured reply against its request,
//! with no I/O: [`ReadReply`] for `NBD_CMD_READ`, [`StatusReply`] for
//! `NBD_CMD_BLOCK_STATUS`, [`AckReply`] for the commands whose reply
//! carries no payload (`NBD_CMD_WRITE`, `WRITE_ZEROES`, `TRIM`, `FLUSH`).
//!
//! The client feeds each chunk of a cookie's reply to its tracker; the
//! tracker checks the spec's rules (content inside the request, no overlap,
//! every byte accounted for, one status chunk per context, descriptor sums)
//! and finally says whether the reply was a success, a server error, or a
//! protocol violation.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::error::ProtocolError;
use crate::wire::{Chunk, ChunkType, Command, ContextId, Descriptor, Errno};

/// Most disjoint pieces a read reply may arrive in before we call it hostile.
/// Pieces that touch are merged, so an in-order reply uses one entry.
pub const MAX_READ_FRAGMENTS: usize = 1 << 16;

/// An error the server reported for a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    /// Error value.
    pub errno: Errno,
    /// Human-readable message, possibly empty.
    pub message: String,
    /// Where it happened, for `NBD_REPLY_TYPE_ERROR_OFFSET`.
    pub offset: Option<u64>,
}

fn inside(offset: u64, len: u64, req: &Range<u64>) -> Result<(), ProtocolError> {
    let end = offset.checked_add(len);
    match end {
        Some(end) if offset >= req.start && end <= req.end => Ok(()),
        _ => Err(ProtocolError::ChunkOutsideRequest {
            offset,
            length: len,
            request_offset: req.start,
            request_length: req.end - req.start,
        }),
    }
}

/// Turns an error chunk into a [`ServerError`], checking that an error
/// offset lies inside the request.
fn server_error(chunk: Chunk, req: &Range<u64>) -> Result<ServerError, ProtocolError> {
    match chunk {
        Chunk::Error { errno, message } => Ok(ServerError {
            errno,
            message,
            offset: None,
        }),
        Chunk::ErrorOffset {
            errno,
            message,
            offset,
        } => {
            if offset < req.start || offset >= req.end {
                return Err(ProtocolError::ChunkOutsideRequest {
                    offset,
                    length: 0,
                    request_offset: req.start,
                    request_length: req.end - req.start,
                });
            }
            Ok(ServerError {
                errno,
                message,
                offset: Some(offset),
            })
        }
        _ => unreachable!("server_error called with a non-error chunk"),
    }
}

/// Tracks the chunks of one structured reply to `NBD_CMD_READ`.
///
/// ```
/// use sparsekit_nbd::reply::ReadReply;
/// let mut r = ReadReply::new(4096, 8192);
/// assert_eq!(r.data(8192, 4096).unwrap(), 4096..8192); // second half
/// assert_eq!(r.hole(4096, 4096).unwrap(), 0..4096);    // first half
/// assert_eq!(r.finish(), Ok(Ok(())));
/// ```
#[derive(Debug)]
pub struct ReadReply {
    req: Range<u64>,
    /// Covered ranges, start -> end, merged when they touch.
    covered: BTreeMap<u64, u64>,
    error: Option<ServerError>,
}

impl ReadReply {
    /// A tracker for a read of `length` bytes at `offset`.
    pub fn new(offset: u64, length: u64) -> ReadReply {
        ReadReply {
            req: offset..offset.saturating_add(length),
            covered: BTreeMap::new(),
            error: None,
        }
    }

    fn cover(&mut self, offset: u64, len: u64) -> Result<Range<usize>, ProtocolError> {
        inside(offset, len, &self.req)?;
        let end = offset + len;
        let overlap = ProtocolError::ChunkOverlap {
            offset,
            length: len,
        };
        let mut start = offset;
        let mut stop = end;
        if let Some((&s, &e)) = self.covered.range(..=offset).next_back() {
            if e > offset {
                return Err(overlap);
            }
            if e == offset {
                start = s;
            }
        }
        if let Some((&s, &e)) = self.covered.range(offset..).next() {
            if s < end {
                return Err(overlap);
            }
            if s == end {
                self.covered.remove(&s);
                stop = e;
            }
        }
        self.covered.insert(start, stop);
        if self.covered.len() > MAX_READ_FRAGMENTS {
            return Err(ProtocolError::TooFragmented {
                max: MAX_READ_FRAGMENTS,
            });
        }
        let rel = (offset - self.req.start) as usize;
        Ok(rel..rel + len as usize)
    }

    /// An `OFFSET_DATA` chunk carrying `len` bytes for `offset`: returns
    /// where they go, relative to the start of the request's buffer.
    pub fn data(&mut self, offset: u64, len: u64) -> Result<Range<usize>, ProtocolError> {
        self.cover(offset, len)
    }

    /// An `OFFSET_HOLE` chunk: returns the part of the request's buffer to
    /// fill with zeros.
    pub fn hole(&mut self, offset: u64, len: u32) -> Result<Range<usize>, ProtocolError> {
        self.cover(offset, len.into())
    }

    /// Any parsed chunk other than `OFFSET_DATA`. Returns the buffer range
    /// to zero for a hole.
    pub fn chunk(&mut self, chunk: Chunk) -> Result<Option<Range<usize>>, ProtocolError> {
        match chunk {
            Chunk::None => Ok(None),
            Chunk::OffsetHole { offset, length } => self.hole(offset, length).map(Some),
            Chunk::Error { .. } | Chunk::ErrorOffset { .. } => {
                let e = server_error(chunk, &self.req)?;
                // Keep the first error; the spec lets a server send more.
                self.error.get_or_insert(e);
                Ok(None)
            }
            Chunk::BlockStatus { .. } => Err(ProtocolError::ChunkForWrongCommand {
                chunk_type: ChunkType::BLOCK_STATUS,
                command: Command::READ,
            }),
        }
    }

    /// After the chunk flagged `NBD_REPLY_FLAG_DONE`: the server's error if
    /// it sent one, else a check that every byte was described.
    pub fn finish(self) -> Result<Result<(), ServerError>, ProtocolError> {
        if let Some(e) = self.error {
            return Ok(Err(e));
        }
        let len = self.req.end - self.req.start;
        if len == 0 {
            return Ok(Ok(()));
        }
        let whole =
            self.covered.len() == 1 && self.covered.get(&self.req.start) == Some(&self.req.end);
        if whole {
            return Ok(Ok(()));
        }
        let mut missing = 0;
        let mut first = None;
        let mut at = self.req.start;
        for (&s, &e) in &self.covered {
            if s > at {
                missing += s - at;
                first.get_or_insert(at);
            }
            at = e;
        }
        if at < self.req.end {
            missing += self.req.end - at;
            first.get_or_insert(at);
        }
        Err(ProtocolError::ReadIncomplete {
            first: first.unwrap_or(self.req.start),
            missing,
            length: len,
        })
    }
}

/// Tracks the chunks of one reply to `NBD_CMD_BLOCK_STATUS`.
///
/// ```
/// use sparsekit_nbd::reply::StatusReply;
/// use sparsekit_nbd::{Chunk, ContextId, Descriptor};
/// let mut r = StatusReply::new(0, 65536, false, vec![ContextId(1)]);
/// r.chunk(Chunk::BlockStatus {
///     context: ContextId(1),
///     descriptors: vec![Descriptor { length: 65536, flags: 3 }],
/// }).unwrap();
/// let done = r.finish().unwrap().unwrap();
/// assert_eq!(done[0].1[0].flags, 3);
/// ```
#[derive(Debug)]
pub struct StatusReply {
    req: Range<u64>,
    req_one: bool,
    contexts: Vec<ContextId>,
    results: Vec<(ContextId, Vec<Descriptor>)>,
    error: Option<ServerError>,
}

impl StatusReply {
    /// A tracker for a block status request of `length` bytes at
    /// `offset`, with `NBD_CMD_FLAG_REQ_ONE` if `req_one`, on a connection
    /// that negotiated `contexts`.
    pub fn new(offset: u64, length: u64, req_one: bool, contexts: Vec<ContextId>) -> StatusReply {
        StatusReply {
            req: offset..offset.saturating_add(length),
            req_one,
            contexts,
            results: Vec::new(),
            error: None,
        }
    }

    /// One parsed chunk of the reply.
    pub fn chunk(&mut self, chunk: Chunk) -> Result<(), ProtocolError> {
        match chunk {
            Chunk::None => Ok(()),
            Chunk::BlockStatus {
                context,
                descriptors,
            } => self.status(context, descriptors),
            Chunk::Error { .. } | Chunk::ErrorOffset { .. } => {
                let e = server_error(chunk, &self.req)?;
                self.error.get_or_insert(e);
                Ok(())
            }
            Chunk::OffsetHole { .. } => Err(ProtocolError::ChunkForWrongCommand {
                chunk_type: ChunkType::OFFSET_HOLE,
                command: Command::BLOCK_STATUS,
            }),
        }
    }

    fn status(&mut self, id: ContextId, d: Vec<Descriptor>) -> Result<(), ProtocolError> {
        if !self.contexts.contains(&id) {
            return Err(ProtocolError::UnknownContext { id });
        }
        if self.results.iter().any(|(c, _)| *c == id) {
            return Err(ProtocolError::DuplicateContext { id });
        }
        let length = self.req.end - self.req.start;
        if self.req_one && (d.len() != 1 || d[0].length > length) {
            return Err(ProtocolError::ReqOneViolated {
                count: d.len(),
                length: d.first().map_or(0, |x| x.length),
            });
        }
        let mut at = self.req.start;
        for (index, x) in d.iter().enumerate() {
            if x.length == 0 {
                return Err(ProtocolError::ZeroLengthExtent { index });
            }
            // "the sum of the length fields within the first N-1 extents
            // MUST be less than the requested length"
            if at >= self.req.end {
                return Err(ProtocolError::ExtentPastRequest {
                    index,
                    at,
                    end: self.req.end,
                });
            }
            at = at.saturating_add(x.length);
        }
        if d.is_empty() {
            return Err(ProtocolError::NoProgress);
        }
        self.results.push((id, d));
        Ok(())
    }

    /// After the final chunk: the descriptors per context, or the server's
    /// error.
    #[allow(clippy::type_complexity)]
    pub fn finish(
        self,
    ) -> Result<Result<Vec<(ContextId, Vec<Descriptor>)>, ServerError>, ProtocolError> {
        if let Some(e) = self.error {
            return Ok(Err(e));
        }
        for id in &self.contexts {
            if !self.results.iter().any(|(c, _)| c == id) {
                return Err(ProtocolError::MissingContext { id: *id });
            }
        }
        Ok(Ok(self.results))
    }
}

/// Tracks the chunks of one structured reply to a command whose reply has
/// no payload (`NBD_CMD_WRITE`, `NBD_CMD_WRITE_ZEROES`, `NBD_CMD_TRIM`,
/// `NBD_CMD_FLUSH`): only `NBD_REPLY_TYPE_NONE` and error chunks belong.
///
/// ```
/// use sparsekit_nbd::reply::AckReply;
/// use sparsekit_nbd::{Chunk, Command, Errno};
/// let mut r = AckReply::new(Command::WRITE, 4096, 4096);
/// r.chunk(Chunk::ErrorOffset { errno: Errno::EIO, message: String::new(), offset: 5000 })
///     .unwrap();
/// assert_eq!(r.finish().unwrap_err().offset, Some(5000));
/// ```
#[derive(Debug)]
pub struct AckReply {
    command: Command,
    req: Range<u64>,
    error: Option<ServerError>,
}

impl AckReply {
    /// A tracker for `command` on `length` bytes at `offset`.
    pub fn new(command: Command, offset: u64, length: u64) -> AckReply {
        AckReply {
            command,
            req: offset..offset.saturating_add(length),
            error: None,
        }
    }

    /// One parsed chunk of the reply.
    pub fn chunk(&mut self, chunk: Chunk) -> Result<(), ProtocolError> {
        let wrong = |chunk_type| ProtocolError::ChunkForWrongCommand {
            chunk_type,
            command: self.command,
        };
        match chunk {
            Chunk::None => Ok(()),
            Chunk::Error { .. } | Chunk::ErrorOffset { .. } => {
                let e = server_error(chunk, &self.req)?;
                self.error.get_or_insert(e);
                Ok(())
            }
            Chunk::OffsetHole { .. } => Err(wrong(ChunkType::OFFSET_HOLE)),
            Chunk::BlockStatus { .. } => Err(wrong(ChunkType::BLOCK_STATUS)),
        }
    }

    /// After the final chunk: success, or the server's first error.
    pub fn finish(self) -> Result<(), ServerError> {
        self.error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_in_any_order_and_with_holes() {
        let mut r = ReadReply::new(1000, 300);
        assert_eq!(r.data(1200, 100).unwrap(), 200..300);
        assert_eq!(r.hole(1000, 100).unwrap(), 0..100);
        assert_eq!(r.data(1100, 100).unwrap(), 100..200);
        assert_eq!(r.covered.len(), 1, "touching pieces merge");
        assert_eq!(r.finish(), Ok(Ok(())));
    }

    #[test]
    fn read_refuses_outside_and_overlap() {
        let mut r = ReadReply::new(1000, 300);
        assert!(matches!(
            r.data(900, 200),
            Err(ProtocolError::ChunkOutsideRequest { .. })
        ));
        assert!(matches!(
            r.data(1250, 100),
            Err(ProtocolError::ChunkOutsideRequest { .. })
        ));
        assert!(matches!(
            r.data(u64::MAX, 2),
            Err(ProtocolError::ChunkOutsideRequest { .. })
        ));
        r.data(1100, 100).unwrap();
        assert!(matches!(
            r.hole(1150, 10),
            Err(ProtocolError::ChunkOverlap { .. })
        ));
        assert!(matches!(
            r.data(1050, 60),
            Err(ProtocolError::ChunkOverlap { .. })
        ));
        assert!(matches!(
            r.data(1190, 20),
            Err(ProtocolError::ChunkOverlap { .. })
        ));
    }

    #[test]
    fn read_missing_bytes_reported() {
        let mut r = ReadReply::new(0, 100);
        r.data(10, 20).unwrap();
        r.data(50, 10).unwrap();
        assert_eq!(
            r.finish(),
            Err(ProtocolError::ReadIncomplete {
                first: 0,
                missing: 70,
                length: 100
            })
        );
    }

    #[test]
    fn read_error_offset_inside_request() {
        let mut r = ReadReply::new(4096, 4096);
        let e = Chunk::ErrorOffset {
            errno: Errno::EIO,
            message: "bad sector".into(),
            offset: 4096 + 512,
        };
        r.chunk(e).unwrap();
        assert_eq!(
            r.finish(),
            Ok(Err(ServerError {
                errno: Errno::EIO,
                message: "bad sector".into(),
                offset: Some(4608)
            }))
        );
        let mut r = ReadReply::new(4096, 4096);
        let outside = Chunk::ErrorOffset {
            errno: Errno::EIO,
            message: String::new(),
            offset: 0,
        };
        assert!(r.chunk(outside).is_err());
    }

    fn d(length: u64, flags: u64) -> Descriptor {
        Descriptor { length, flags }
    }

    #[test]
    fn status_rules() {
        let ctx = vec![ContextId(1), ContextId(2)];
        let mut r = StatusReply::new(0, 1000, false, ctx.clone());
        // Last descriptor may run past the request.
        r.chunk(Chunk::BlockStatus {
            context: ContextId(1),
            descriptors: vec![d(500, 0), d(4096, 3)],
        })
        .unwrap();
        assert!(matches!(
            r.chunk(Chunk::BlockStatus {
                context: ContextId(1),
                descriptors: vec![d(1, 0)]
            }),
            Err(ProtocolError::DuplicateContext { .. })
        ));
        assert!(matches!(
            r.chunk(Chunk::BlockStatus {
                context: ContextId(9),
                descriptors: vec![d(1, 0)]
            }),
            Err(ProtocolError::UnknownContext { .. })
        ));
        assert!(matches!(
            r.chunk(Chunk::BlockStatus {
                context: ContextId(2),
                descriptors: vec![d(1000, 0), d(1, 0)]
            }),
            Err(ProtocolError::ExtentPastRequest { index: 1, .. })
        ));
        assert!(matches!(
            r.chunk(Chunk::BlockStatus {
                context: ContextId(2),
                descriptors: vec![d(0, 0)]
            }),
            Err(ProtocolError::ZeroLengthExtent { index: 0 })
        ));
        // Context 2 never answered.
        assert_eq!(
            r.finish(),
            Err(ProtocolError::MissingContext { id: ContextId(2) })
        );

        let mut r = StatusReply::new(0, 1000, true, vec![ContextId(1)]);
        assert!(matches!(
            r.chunk(Chunk::BlockStatus {
                context: ContextId(1),
                descriptors: vec![d(1001, 0)]
            }),
            Err(ProtocolError::ReqOneViolated { .. })
        ));
    }

    #[test]
    fn ack_takes_only_none_and_errors() {
        let mut r = AckReply::new(Command::TRIM, 0, 512);
        r.chunk(Chunk::None).unwrap();
        assert!(matches!(
            r.chunk(Chunk::OffsetHole {
                offset: 0,
                length: 512
            }),
            Err(ProtocolError::ChunkForWrongCommand {
                command: Command::TRIM,
                ..
            })
        ));
        assert_eq!(r.finish(), Ok(()));

        // FLUSH covers no bytes: an error offset can not lie inside it.
        let mut r = AckReply::new(Command::FLUSH, 0, 0);
        assert!(matches!(
            r.chunk(Chunk::ErrorOffset {
                errno: Errno::EIO,
                message: String::new(),
                offset: 0
            }),
            Err(ProtocolError::ChunkOutsideRequest { .. })
        ));
        r.chunk(Chunk::Error {
            errno: Errno::ENOSPC,
            message: "full".into(),
        })
        .unwrap();
        assert_eq!(r.finish().unwrap_err().errno, Errno::ENOSPC);
    }
}
