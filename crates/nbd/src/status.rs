//! Block status, paged: [`StatusPager`] walks a range one
//! `NBD_CMD_BLOCK_STATUS` round trip at a time, merging neighbours with
//! equal flags.
//!
//! The pager holds a connection only for the length of one round trip
//! ([`StatusRoundTrip`]), so a connection behind a `Mutex` can serve reads
//! between two pages: `&Mutex<Client>` pages as well as `&mut Client`.

use std::ops::Range;
use std::sync::Mutex;

use crate::client::Client;
use crate::error::Error;
use crate::map::StatusExtent;
use crate::wire::Descriptor;

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::client::Client {}
    impl<T: Sealed + ?Sized> Sealed for &mut T {}
    impl Sealed for &std::sync::Mutex<crate::client::Client> {}
}

/// One `NBD_CMD_BLOCK_STATUS` round trip: what [`StatusPager`] needs of a
/// connection. Implemented by [`Client`], `&mut Client` and
/// `&Mutex<Client>` (locked for the round trip only).
pub trait StatusRoundTrip: sealed::Sealed {
    /// The extents of `context` from `range.start`, clipped to `range`:
    /// sorted, contiguous, at least one byte (see
    /// [`Client::block_status_once`]).
    fn status_once(&mut self, context: &str, range: Range<u64>)
    -> Result<Vec<StatusExtent>, Error>;
}

impl StatusRoundTrip for Client {
    fn status_once(
        &mut self,
        context: &str,
        range: Range<u64>,
    ) -> Result<Vec<StatusExtent>, Error> {
        self.block_status_once(context, range)
    }
}

impl<T: StatusRoundTrip + ?Sized> StatusRoundTrip for &mut T {
    fn status_once(
        &mut self,
        context: &str,
        range: Range<u64>,
    ) -> Result<Vec<StatusExtent>, Error> {
        (**self).status_once(context, range)
    }
}

impl StatusRoundTrip for &Mutex<Client> {
    fn status_once(
        &mut self,
        context: &str,
        range: Range<u64>,
    ) -> Result<Vec<StatusExtent>, Error> {
        // A panic elsewhere does not make the connection unusable: the
        // client poisons itself when a failure leaves it out of step.
        let mut c = self.lock().unwrap_or_else(|e| e.into_inner());
        c.block_status_once(context, range)
    }
}

/// The extents that `descriptors`, laid end to end from `start`, give
/// inside `range`.
pub fn clip(start: u64, descriptors: &[Descriptor], range: &Range<u64>) -> Vec<StatusExtent> {
    let mut at = start;
    let mut out = Vec::new();
    for d in descriptors {
        let (s, e) = (at, at.saturating_add(d.length));
        at = e;
        let (s, e) = (s.max(range.start), e.min(range.end));
        if s < e {
            out.push(StatusExtent {
                offset: s,
                length: e - s,
                flags: d.flags,
            });
        }
    }
    out
}

/// The extents of one metadata context over a range, neighbours with equal
/// flags merged, fetched one round trip at a time as they are consumed.
/// Stops after the first error.
///
/// Built by [`Client::block_status`], or by [`StatusPager::new`] over any
/// [`StatusRoundTrip`].
#[derive(Debug)]
pub struct StatusPager<C> {
    conn: C,
    context: String,
    pos: u64,
    end: u64,
    queue: std::vec::IntoIter<StatusExtent>,
    held: Option<StatusExtent>,
    pending_error: Option<Error>,
    done: bool,
}

impl<C: StatusRoundTrip> StatusPager<C> {
    /// Pages `context` over `range` through `conn`. The range is not
    /// checked here: the first round trip reports a bad one.
    pub fn new(conn: C, context: &str, range: Range<u64>) -> Self {
        StatusPager {
            conn,
            context: context.to_owned(),
            pos: range.start,
            end: range.end,
            queue: Vec::new().into_iter(),
            held: None,
            pending_error: None,
            done: false,
        }
    }
}

impl<C: StatusRoundTrip> Iterator for StatusPager<C> {
    type Item = Result<StatusExtent, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.pending_error.take() {
            return Some(Err(e));
        }
        loop {
            if let Some(e) = self.queue.next() {
                match &mut self.held {
                    Some(h) if h.flags == e.flags && h.end() == e.offset => {
                        h.length += e.length;
                        continue;
                    }
                    Some(_) => return self.held.replace(e).map(Ok),
                    None => {
                        self.held = Some(e);
                        continue;
                    }
                }
            }
            if self.done || self.pos >= self.end {
                self.done = true;
                return self.held.take().map(Ok);
            }
            match self.conn.status_once(&self.context, self.pos..self.end) {
                Ok(v) => {
                    // Every implementation answers at least one byte from
                    // `pos`; stop rather than loop if one ever did not.
                    let next = v.last().map_or(self.pos, |e| e.end());
                    debug_assert!(next > self.pos, "a round trip made no progress");
                    self.done = next <= self.pos;
                    self.pos = next;
                    self.queue = v.into_iter();
                }
                Err(e) => {
                    self.done = true;
                    // The extent held back is complete up to here; the
                    // error follows it on the next call.
                    self.queue = Vec::new().into_iter();
                    if let Some(h) = self.held.take() {
                        self.pending_error = Some(e);
                        return Some(Ok(h));
                    }
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(length: u64, flags: u64) -> Descriptor {
        Descriptor { length, flags }
    }

    #[test]
    fn clip_keeps_what_lies_inside() {
        // Request aligned out to 0..4096 for a caller range 100..3000.
        let got = clip(0, &[d(512, 0), d(2048, 3), d(8192, 0)], &(100..3000));
        let want = [(100, 412, 0), (512, 2048, 3), (2560, 440, 0)];
        let got: Vec<_> = got.iter().map(|e| (e.offset, e.length, e.flags)).collect();
        assert_eq!(got, want);
        assert!(clip(0, &[d(100, 0)], &(100..200)).is_empty());
    }
}
