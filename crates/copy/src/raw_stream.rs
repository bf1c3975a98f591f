//! Raw images through pipes: [`import`] writes a raw image read forward
//! (raw bytes on standard input, or a compressed image decompressed as it
//! is read) into a destination; [`write_out`] and [`pipe_out`] write a raw
//! image to standard output, holes as zeros.
//!
//! Reading (and decompressing) runs on a thread of its own, so that writing
//! overlaps it; memory is a few chunks per writer.

use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use crate::compressed::read_full;
use crate::endpoint::RawStream;
use crate::error::{Error, Failed, StreamError};
use crate::executor::{Item, Planner};
use crate::plan::{CopyStats, Settings};
use crate::progress::Progress;
use crate::sink::{Sink, WriteCounts, ZEROS};
use crate::source::Source;

/// Bytes read from a stream at a time.
pub(crate) const STREAM_CHUNK: usize = 1 << 20;

/// How long a raw stream may or must be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Length {
    /// It must end exactly here (`--size`, or a bmap's image size): a
    /// stream that ends before is cut short, not a smaller image.
    pub(crate) exact: Option<u64>,
    /// It must not go past this (the room in the destination).
    pub(crate) room: Option<u64>,
}

/// Buffers handed back by writers once written, so that reading does not
/// fault in fresh memory for every chunk.
#[derive(Default)]
struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    fn take(&self, len: usize) -> Vec<u8> {
        let mut v = (self.0.lock().unwrap_or_else(|p| p.into_inner()).pop()).unwrap_or_default();
        v.resize(len, 0);
        v
    }

    fn give(&self, buf: Arc<Vec<u8>>) {
        if let Ok(v) = Arc::try_unwrap(buf) {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).push(v);
        }
    }
}

/// A chunk of the stream: its offset in the image and its bytes.
type Chunk = (u64, Vec<u8>);

/// Reads `stream` into chunks of [`STREAM_CHUNK`] bytes sent to `tx` in
/// order, until its end, an error (sent too), `stop`, or a receiver that
/// is gone.
fn read_ahead(
    stream: RawStream,
    tx: SyncSender<Result<Chunk, Error>>,
    pool: &Pool,
    stop: &AtomicBool,
) {
    let RawStream {
        mut reader,
        name,
        compression,
        ..
    } = stream;
    let mut offset = 0u64;
    loop {
        if stop.load(Relaxed) {
            let _ = tx.send(Err(Error::Interrupted));
            return;
        }
        let mut buf = pool.take(STREAM_CHUNK);
        let n = match read_full(&mut reader, &mut buf) {
            Ok(n) => n,
            Err(source) => {
                let _ = tx.send(Err(Error::Stream(StreamError::Read {
                    name,
                    compression,
                    offset,
                    source,
                })));
                return;
            }
        };
        if n == 0 {
            return;
        }
        buf.truncate(n);
        if tx.send(Ok((offset, buf))).is_err() {
            return;
        }
        offset += n as u64;
    }
}

/// The first error of a pipeline, by stream offset.
#[derive(Default)]
struct FirstError {
    error: Mutex<Option<(u64, Error)>>,
    abort: AtomicBool,
}

impl FirstError {
    fn record(&self, at: u64, e: Error) {
        let mut g = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_ref().is_none_or(|(o, _)| at < *o) {
            *g = Some((at, e));
        }
        self.abort.store(true, Relaxed);
    }

    fn aborted(&self) -> bool {
        self.abort.load(Relaxed)
    }

    fn take(self) -> Option<(u64, Error)> {
        self.error.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

/// Checks a chunk ending at `end` against `length`.
fn check_room(name: &str, end: u64, length: Length) -> Result<(), Error> {
    let limit = match (length.exact, length.room) {
        (Some(e), Some(r)) => e.min(r),
        (e, r) => match e.or(r) {
            Some(l) => l,
            None => return Ok(()),
        },
    };
    if end > limit {
        return Err(Error::Stream(StreamError::TooLong {
            name: name.into(),
            limit,
            exact: length.exact == Some(limit),
        }));
    }
    Ok(())
}

/// Checks the length of a stream that ended after `total` bytes.
fn check_end(name: &str, total: u64, length: Length) -> Result<(), Error> {
    match length.exact {
        Some(want) if total != want => Err(Error::Stream(StreamError::Short {
            name: name.into(),
            got: total,
            want,
        })),
        _ => Ok(()),
    }
}

/// One piece for a writer: bytes `range` of a chunk, to land at `dst`.
type Piece = (Arc<Vec<u8>>, Range<usize>, u64);

/// Writes the raw image `stream` into `sink` from `dest_offset` on, as it
/// arrives: `settings.jobs` writer threads take its chunks while one
/// thread reads (and decompresses) ahead. All-zero 4 KiB blocks are left
/// out where that leaves zeros (a new file, a destination known to be
/// zero) and zeroed elsewhere, an NBD export included (WRITE_ZEROES sends
/// no bytes). `select` picks the pieces of a chunk to write (all of it
/// when `None`); it sees every chunk in order.
pub(crate) fn import(
    stream: RawStream,
    sink: &Sink,
    settings: &Settings,
    length: Length,
    select: Option<&mut dyn Select>,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<CopyStats, Failed> {
    let name = stream.name.clone();
    let sparse = match sink {
        Sink::Nbd(_) => settings.sparse_block,
        _ => sink.sparse_block(settings.sparse_block),
    };
    progress.start(length.exact.or(length.room).unwrap_or(0));
    let counts = WriteCounts::default();
    let pool = Pool::default();
    let errors = FirstError::default();
    let jobs = settings.jobs.max(1);
    let shift = settings.dest_offset;
    let mut total = 0u64;
    // Bytes handed to the writers: all of them, or what `select` picks.
    let mut picked = 0u64;
    let mut select = select;
    let (wtx, wrx) = mpsc::sync_channel::<Piece>(jobs * 2);
    let wrx = Mutex::new(wrx);
    std::thread::scope(|s| {
        let (ctx, crx) = mpsc::sync_channel::<Result<Chunk, Error>>(2);
        let (pool, errors, counts) = (&pool, &errors, &counts);
        s.spawn(move || read_ahead(stream, ctx, pool, stop));
        for _ in 0..jobs {
            let wrx = &wrx;
            s.spawn(move || {
                loop {
                    let next = wrx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((buf, range, dst)) = next else { return };
                    if !errors.aborted() {
                        let data = &buf[range];
                        match sink.write_data(data, dst, sparse, counts) {
                            Ok(()) => progress.advance(data.len() as u64),
                            Err(e) => errors.record(dst - shift, e),
                        }
                    }
                    pool.give(buf);
                }
            });
        }
        for msg in crx.iter() {
            if errors.aborted() {
                break;
            }
            let (offset, buf) = match msg {
                Ok(c) => c,
                Err(e) => {
                    errors.record(total, e);
                    break;
                }
            };
            let end = offset + buf.len() as u64;
            if let Err(e) = check_room(&name, end, length) {
                errors.record(offset, e);
                break;
            }
            total = end;
            let buf = Arc::new(buf);
            let pieces = match select.as_deref_mut() {
                None => Ok(std::iter::once(0..buf.len()).collect()),
                Some(sel) => sel.pieces(offset, &buf),
            };
            match pieces {
                Ok(pieces) => {
                    for r in pieces {
                        picked += r.len() as u64;
                        let dst = shift + offset + r.start as u64;
                        if wtx.send((buf.clone(), r, dst)).is_err() {
                            break;
                        }
                    }
                }
                Err(e) => {
                    errors.record(offset, e);
                    break;
                }
            }
            pool.give(buf);
        }
        // Dropping the receiver stops the reader where it is.
        drop(crx);
        drop(wtx);
    });
    let written = || counts.written.load(Relaxed);
    if let Some((at, error)) = errors.take() {
        return Err(Failed::new(at, written(), error));
    }
    let finish = check_end(&name, total, length)
        .and_then(|()| select.map_or(Ok(()), |s| s.finish(total)))
        .and_then(|()| sink.fit(shift + total))
        .and_then(|()| sink.finish(settings.flush));
    finish.map_err(|e| Failed::new(total, written(), e))?;
    Ok(CopyStats {
        total,
        data_read: total,
        data_written: written(),
        zero_detected: counts.zero_detected.load(Relaxed),
        // What a selection left out was not written, as a hole is not.
        unallocated: total - picked,
        zeroed: 0,
    })
}

/// Which parts of a raw stream a copy writes, and the checks they pass as
/// they go by (a bmap's ranges and their checksums).
pub(crate) trait Select {
    /// The ranges of `chunk` (at image offset `offset`; chunks come in
    /// order and without gaps) to write, or why the copy must stop.
    fn pieces(&mut self, offset: u64, chunk: &[u8]) -> Result<Vec<Range<usize>>, Error>;

    /// The stream ended after `total` bytes: whatever was still expected
    /// is an error.
    fn finish(&mut self, total: u64) -> Result<(), Error>;
}

/// Writes `bytes` to standard output (`out`), counting what went out.
fn emit(out: &mut File, bytes: &[u8], at: u64) -> Result<(), Error> {
    out.write_all(bytes).map_err(|source| Error::Write {
        path: "standard output".into(),
        offset: at,
        len: bytes.len() as u64,
        source,
    })
}

/// Writes `len` zeros to `out`, the image's bytes from `at` on.
fn emit_zeros(out: &mut File, mut at: u64, len: u64) -> Result<(), Error> {
    let end = at + len;
    while at < end {
        let n = (end - at).min(ZEROS.len() as u64) as usize;
        emit(out, &ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Data read ahead by a worker, or the zeros of a hole.
enum Ahead {
    Data(Item, Vec<u8>),
    Zeros(Item),
}

/// Writes `settings.range` of `source` to `out` as raw bytes in order,
/// holes and zero ranges as zeros. Up to `settings.jobs` workers (at most
/// 8) read items ahead, item `i` by worker `i mod k`, so that the output
/// is put back in order by taking each worker's results in turn; memory is
/// two items per worker.
pub(crate) fn write_out(
    source: &dyn Source,
    mut out: File,
    settings: &Settings,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<CopyStats, Failed> {
    let range = settings.range.clone();
    let chunk = settings.chunk_size as u64;
    let mut planner = Planner::new(source, range.clone(), 0, chunk, None);
    let k = settings.jobs.clamp(1, 8);
    progress.start(range.end - range.start);
    let pool = Pool::default();
    let data_read = AtomicU64::new(0);
    let mut done = range.start;
    let result = std::thread::scope(|s| {
        let mut inputs = Vec::with_capacity(k);
        let mut outputs = Vec::with_capacity(k);
        for _ in 0..k {
            let (itx, irx) = mpsc::sync_channel::<Result<Item, Error>>(1);
            let (otx, orx) = mpsc::sync_channel::<Result<Ahead, Error>>(1);
            inputs.push(itx);
            outputs.push(orx);
            let (pool, data_read) = (&pool, &data_read);
            s.spawn(move || {
                for msg in irx {
                    let ahead = msg.and_then(|item| {
                        if item.kind.reads_as_zero() {
                            return Ok(Ahead::Zeros(item));
                        }
                        let mut buf = pool.take(item.len as usize);
                        source.read_at(&mut buf, item.src).map_err(Error::Source)?;
                        data_read.fetch_add(item.len, Relaxed);
                        Ok(Ahead::Data(item, buf))
                    });
                    if otx.send(ahead).is_err() {
                        return;
                    }
                }
            });
        }
        s.spawn(move || {
            let mut i = 0;
            loop {
                let next = if stop.load(Relaxed) {
                    Some(Err(Error::Interrupted))
                } else {
                    planner.next()
                };
                let Some(next) = next else { return };
                let failed = next.is_err();
                if inputs[i % k].send(next).is_err() || failed {
                    return;
                }
                i += 1;
            }
        });
        take_in_order(&outputs, |ahead| {
            let item = match ahead {
                Ahead::Zeros(item) => {
                    emit_zeros(&mut out, item.src, item.len)?;
                    item
                }
                Ahead::Data(item, buf) => {
                    emit(&mut out, &buf, item.src)?;
                    pool.give(Arc::new(buf));
                    item
                }
            };
            done = item.src + item.len;
            progress.advance(item.len);
            Ok(())
        })
    });
    let total = range.end - range.start;
    let written = done - range.start;
    result
        .and_then(|()| flush_out(&out, settings.flush))
        .map_err(|e| Failed::new(done, written, e))?;
    let data_read = data_read.load(Relaxed);
    Ok(CopyStats {
        total,
        data_read,
        data_written: total,
        zero_detected: 0,
        unallocated: total - data_read,
        zeroed: 0,
    })
}

/// Takes the results of `outputs` in turn (result `i` from receiver
/// `i mod k`) until one is closed, giving each to `each`.
fn take_in_order<T>(
    outputs: &[Receiver<Result<T, Error>>],
    mut each: impl FnMut(T) -> Result<(), Error>,
) -> Result<(), Error> {
    for i in 0.. {
        match outputs[i % outputs.len()].recv() {
            Err(_) => break,
            Ok(r) => each(r?)?,
        }
    }
    Ok(())
}

/// Writes the raw image `stream` to standard output (`out`) as it is read
/// (and decompressed) on another thread.
pub(crate) fn pipe_out(
    stream: RawStream,
    mut out: File,
    settings: &Settings,
    length: Length,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<CopyStats, Failed> {
    let name = stream.name.clone();
    let pool = Pool::default();
    progress.start(length.exact.unwrap_or(0));
    let mut total = 0u64;
    let result = std::thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel::<Result<Chunk, Error>>(2);
        let pool = &pool;
        s.spawn(move || read_ahead(stream, tx, pool, stop));
        for msg in rx {
            let (offset, buf) = msg?;
            let end = offset + buf.len() as u64;
            check_room(&name, end, length)?;
            emit(&mut out, &buf, offset)?;
            total = end;
            progress.advance(buf.len() as u64);
            pool.give(Arc::new(buf));
        }
        Ok(())
    });
    result
        .and_then(|()| check_end(&name, total, length))
        .and_then(|()| flush_out(&out, settings.flush))
        .map_err(|e| Failed::new(total, total, e))?;
    Ok(CopyStats {
        total,
        data_read: total,
        data_written: total,
        zero_detected: 0,
        unallocated: 0,
        zeroed: 0,
    })
}

/// `--flush` to standard output: where it is a file, to stable storage.
fn flush_out(out: &File, flush: bool) -> Result<(), Error> {
    let regular = out.metadata().is_ok_and(|m| m.is_file());
    if flush && regular {
        out.sync_data().map_err(|source| Error::Flush {
            path: "standard output".into(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_bound_a_stream() {
        let free = Length::default();
        assert!(check_room("s", u64::MAX, free).is_ok());
        assert!(check_end("s", 7, free).is_ok());
        let room = Length {
            exact: None,
            room: Some(100),
        };
        assert!(check_room("s", 100, room).is_ok());
        assert!(check_room("s", 101, room).is_err());
        assert!(
            check_end("s", 3, room).is_ok(),
            "a device need not be filled"
        );
        let exact = Length {
            exact: Some(50),
            room: Some(100),
        };
        assert!(check_room("s", 51, exact).is_err());
        let short = check_end("s", 49, exact).unwrap_err().to_string();
        assert!(short.contains("49") && short.contains("50"), "{short}");
        assert!(check_end("s", 50, exact).is_ok());
    }

    #[test]
    fn results_are_taken_in_turn() {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..3).map(|_| mpsc::sync_channel(10)).unzip();
        for i in 0..7 {
            txs[i % 3].send(Ok(i)).unwrap();
        }
        drop(txs);
        let mut seen = Vec::new();
        take_in_order(&rxs, |i| {
            seen.push(i);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, (0..7).collect::<Vec<_>>());
    }
}
