//! Running a map producer on its own thread, so that the kernel's mapping
//! work (FIEMAP, reading tables) overlaps the formatting of what it found.

use std::sync::mpsc;

/// Items per batch sent from the producer.
pub const BATCH: usize = 4096;
/// Batches in flight: memory is bounded by `DEPTH × BATCH` items.
pub const DEPTH: usize = 4;

/// Calls `consume` with an iterator over the items of `producer`, which
/// runs on another thread, at most [`DEPTH`] batches ahead. The producer
/// stops after its first error, and as soon as `consume` returns (it
/// notices at its next send).
pub fn prefetch<T, E, I, R>(
    producer: I,
    consume: impl FnOnce(&mut dyn Iterator<Item = Result<T, E>>) -> R,
) -> R
where
    I: Iterator<Item = Result<T, E>> + Send,
    T: Send,
    E: Send,
{
    let (tx, rx) = mpsc::sync_channel::<Vec<Result<T, E>>>(DEPTH);
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            for item in producer {
                let failed = item.is_err();
                batch.push(item);
                if batch.len() < BATCH && !failed {
                    continue;
                }
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                if tx.send(full).is_err() || failed {
                    return;
                }
            }
            if !batch.is_empty() {
                let _ = tx.send(batch);
            }
        });
        let mut items = rx.into_iter().flatten();
        consume(&mut items)
        // `items` (the receiver) is dropped here, before the scope joins
        // the producer, so a producer blocked on a full channel wakes up.
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yields_everything_in_order() {
        let n = BATCH * 3 + 17;
        let out = prefetch((0..n).map(Ok::<_, ()>), |it| {
            it.map(Result::unwrap).collect::<Vec<_>>()
        });
        assert_eq!(out, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn stops_after_the_first_error() {
        let src = (0..10).map(|i| if i == 5 { Err(i) } else { Ok(i) });
        let out: Vec<_> = prefetch(src, |it| it.collect());
        assert_eq!(out, [Ok(0), Ok(1), Ok(2), Ok(3), Ok(4), Err(5)]);
    }

    #[test]
    fn consumer_may_stop_early_without_deadlock() {
        // An endless producer; the consumer takes a few and returns.
        let out: Vec<_> = prefetch((0u64..).map(Ok::<_, ()>), |it| it.take(3).collect());
        assert_eq!(out, [Ok(0), Ok(1), Ok(2)]);
    }
}
