//! qcow2 streams through pipes: [`import`] turns a forward-only qcow2
//! stream (the layout of qemu's qcow2-to-stdout script) into a raw
//! destination while reading strictly forward; [`export`] writes any
//! source as such a stream.

use std::io::{Read, Write};
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;

use sparsekit_extent::{ExtentIterExt, Kind};
use sparsekit_qcow2::{GuestOffset, StreamDecoder, StreamLayout, StreamWriter};

use crate::error::{Error, Failed, StreamError};
use crate::plan::{CopyStats, ExportStats, Settings};
use crate::progress::Progress;
use crate::sink::{Sink, WriteCounts};
use crate::source::Source;

fn failed(done_before: u64, bytes_written: u64, error: Error) -> Failed {
    Failed::new(done_before, bytes_written, error)
}

/// Decodes the stream read by `decoder` (its header already read) into
/// `sink`, which must hold the virtual size. Data chunks go to
/// `settings.jobs` writer threads as they arrive, so writing overlaps reading;
/// memory is bounded by a few chunks per worker (chunks are at most 1 MiB
/// or one cluster). Zero and unallocated clusters are not in the stream:
/// on a regular file they stay holes; all-zero 4 KiB blocks of data are
/// left as holes too with `settings.sparse`.
pub(crate) fn import<R: Read>(
    decoder: StreamDecoder<R>,
    name: &str,
    sink: &Sink,
    settings: &Settings,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<CopyStats, Failed> {
    let decode_err = |source| {
        Error::Stream(StreamError::Decode {
            name: name.into(),
            source,
        })
    };
    let size = decoder.virtual_size();
    let mut chunks = decoder
        .read_tables()
        .map_err(|e| failed(0, 0, decode_err(e)))?;
    progress.start(chunks.data_bytes());
    let counts = WriteCounts::default();
    let read = AtomicU64::new(0);
    let first_error: Mutex<Option<(u64, Error)>> = Mutex::new(None);
    let abort = AtomicBool::new(false);
    let record = |at: u64, e: Error| {
        let mut g = first_error.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_ref().is_none_or(|(o, _)| at < *o) {
            *g = Some((at, e));
        }
        abort.store(true, Relaxed);
    };
    let sparse = sink.sparse_block(settings.sparse_block);
    let jobs = settings.jobs.max(1);
    let (tx, rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(jobs * 2);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((guest, data)) = next else { return };
                    if abort.load(Relaxed) {
                        continue;
                    }
                    let r = sink.write_data(&data, guest, sparse, &counts);
                    match r {
                        Ok(()) => progress.advance(data.len() as u64),
                        Err(e) => record(guest, e),
                    }
                }
            });
        }
        loop {
            if stop.load(Relaxed) {
                record(u64::MAX, Error::Interrupted);
                break;
            }
            if abort.load(Relaxed) {
                break;
            }
            match chunks.next() {
                None => break,
                Some(Err(e)) => {
                    record(u64::MAX, decode_err(e));
                    break;
                }
                Some(Ok(c)) => {
                    read.fetch_add(c.data.len() as u64, Relaxed);
                    if tx.send((c.guest_offset.0, c.data)).is_err() {
                        break;
                    }
                }
            }
        }
        drop(tx);
    });
    if let Some((at, error)) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        // Chunks arrive in host order, which a forward stream keeps close
        // to guest order; what is certain is the bytes written.
        return Err(failed(at.min(size), counts.written.load(Relaxed), error));
    }
    sink.finish(settings.flush)
        .map_err(|e| failed(size, counts.written.load(Relaxed), e))?;
    Ok(CopyStats {
        total: size,
        data_read: read.load(Relaxed),
        data_written: counts.written.load(Relaxed),
        zero_detected: counts.zero_detected.load(Relaxed),
        unallocated: size - read.load(Relaxed).min(size),
        zeroed: 0,
    })
}

/// Writes `source` to `out` as a qcow2 v3 stream in the forward layout:
/// header, refcount table and blocks, L1, L2 tables, then the data
/// clusters in guest order; ranges the source maps as zero or hole are
/// left unallocated. A reader thread fetches runs of clusters (up to
/// `settings.chunk_size`) ahead while this thread writes.
pub(crate) fn export<W: Write>(
    source: &dyn Source,
    out: W,
    name: &str,
    cluster_bits: u32,
    settings: &Settings,
    progress: &dyn Progress,
    stop: &AtomicBool,
) -> Result<ExportStats, Failed> {
    let encode_err = |source| {
        Error::Stream(StreamError::Encode {
            name: name.into(),
            source,
        })
    };
    // The data ranges, checked whole: tables go out before any data, so
    // the map is needed first.
    let size = source.size();
    let mut checker = sparsekit_extent::MapChecker::new(0..size);
    let mut data: Vec<Range<u64>> = Vec::new();
    for e in source.extents(0..size).coalesce() {
        let e = e.map_err(|e| failed(0, 0, Error::Source(e)))?;
        checker.push(&e).map_err(|err| {
            failed(
                0,
                0,
                Error::MapNotWhole {
                    source_name: source.name().into(),
                    source: err,
                },
            )
        })?;
        if e.kind == Kind::Data {
            data.push(e.range());
        }
    }
    checker.finish().map_err(|err| {
        failed(
            0,
            0,
            Error::MapNotWhole {
                source_name: source.name().into(),
                source: err,
            },
        )
    })?;
    let layout =
        StreamLayout::new(size, cluster_bits, data).map_err(|e| failed(0, 0, encode_err(e)))?;
    progress.start(layout.data_clusters() * layout.cluster_size());
    let mut w = StreamWriter::new(out, &layout).map_err(|e| failed(0, 0, encode_err(e)))?;

    // Runs of contiguous clusters, read ahead by one thread.
    let cs = layout.cluster_size();
    let max_run = (settings.chunk_size as u64 / cs).max(1);
    let mut runs: Vec<(u64, u64)> = Vec::new(); // (first guest offset, clusters)
    for g in layout.clusters() {
        match runs.last_mut() {
            Some((start, n)) if *start + *n * cs == g.0 && *n < max_run => *n += 1,
            _ => runs.push((g.0, 1)),
        }
    }
    let (tx, rx) = mpsc::sync_channel::<Result<(u64, Vec<u8>), (u64, Error)>>(4);
    let mut done_before = 0;
    let result = std::thread::scope(|s| {
        let layout = &layout;
        s.spawn(move || {
            for (start, n) in runs {
                if stop.load(Relaxed) {
                    let _ = tx.send(Err((start, Error::Interrupted)));
                    return;
                }
                let len = (n - 1) * cs + layout.cluster_len(GuestOffset(start + (n - 1) * cs));
                let mut buf = vec![0u8; len as usize];
                // The stream's disk is the source rounded up to 512 bytes
                // (qemu counts sectors): the padding reads as zeros.
                let have = source.size().saturating_sub(start).min(len) as usize;
                let r = source
                    .read_at(&mut buf[..have], start)
                    .map_err(|e| (start, Error::Source(e)));
                let failed = r.is_err();
                if tx.send(r.map(|()| (start, buf))).is_err() || failed {
                    return;
                }
            }
        });
        for msg in rx {
            let (start, buf) = msg?;
            for (i, cluster) in buf.chunks(cs as usize).enumerate() {
                let g = GuestOffset(start + i as u64 * cs);
                w.write_cluster(g, cluster)
                    .map_err(|e| (g.0, encode_err(e)))?;
            }
            progress.advance(buf.len() as u64);
            done_before = start + buf.len() as u64;
        }
        Ok::<(), (u64, Error)>(())
    });
    if let Err((at, e)) = result {
        return Err(failed(at.min(done_before), 0, e));
    }
    let stream_bytes = layout.stream_len();
    let mut out = w.finish().map_err(|e| failed(size, 0, encode_err(e)))?;
    out.flush().map_err(|e| {
        failed(
            size,
            0,
            Error::Write {
                path: name.into(),
                offset: stream_bytes,
                len: 0,
                source: e,
            },
        )
    })?;
    Ok(ExportStats {
        stream_bytes,
        data_clusters: layout.data_clusters(),
    })
}
