//! NBD exports as a [`Source`].

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use sparsekit_extent::Extent;
use sparsekit_nbd::map::{BASE_ALLOCATION, QEMU_DIRTY_BITMAP, allocation_kind};
use sparsekit_nbd::{Client, ClientConfig, NbdUri, StatusPager};

use crate::source::{ExtentStream, RangeStream, Source, SourceError};

/// An NBD export: block status for the map (`base:allocation`, see
/// [`allocation_kind`]), reads spread over a pool of connections (as many
/// as the workers when the server advertises multi-conn, else one).
#[derive(Debug)]
pub struct NbdSource {
    uri: String,
    size: u64,
    status: Mutex<Client>,
    readers: Vec<Mutex<Client>>,
    next: AtomicUsize,
}

fn lock(m: &Mutex<Client>) -> std::sync::MutexGuard<'_, Client> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NbdSource {
    /// Connects to `uri` negotiating `base:allocation` and `contexts`, with
    /// up to `connections` connections for reading besides the one that
    /// asks for block status (0: that one reads too, as when the server
    /// does not allow several). Every connect, read and write gives up after
    /// `timeout` (`None`: waits forever).
    pub fn connect(
        uri: &NbdUri,
        contexts: &[String],
        connections: usize,
        timeout: Option<std::time::Duration>,
    ) -> Result<Self, sparsekit_nbd::Error> {
        let mut config = ClientConfig {
            timeout,
            ..ClientConfig::default()
        };
        for c in contexts {
            if !config.contexts.contains(c) {
                config.contexts.push(c.clone());
            }
        }
        let mut clients = Client::connect_multi(uri, &config, connections + 1)?;
        let status = clients.remove(0);
        // No multi-conn: the one connection serves status and reads.
        let readers = if clients.is_empty() {
            Vec::new()
        } else {
            clients.into_iter().map(Mutex::new).collect()
        };
        Ok(Self {
            uri: uri.to_string(),
            size: status.size(),
            status: Mutex::new(status),
            readers,
            next: AtomicUsize::new(0),
        })
    }

    /// Connections used for reading.
    pub fn connections(&self) -> usize {
        self.readers.len().max(1)
    }

    /// Streams the status extents of `context` over `range`, one
    /// `NBD_CMD_BLOCK_STATUS` round trip at a time, locking the status
    /// connection only for each round trip.
    pub fn status(&self, context: &str, range: Range<u64>) -> StatusStream<'_> {
        let end = range.end.min(self.size);
        StatusPager::new(&self.status, context, range.start.min(end)..end)
    }
}

/// Iterator returned by [`NbdSource::status`]; stops after an error.
pub type StatusStream<'a> = StatusPager<&'a Mutex<Client>>;

impl Source for NbdSource {
    fn name(&self) -> &str {
        &self.uri
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn extents(&self, range: Range<u64>) -> ExtentStream<'_> {
        Box::new(self.status(BASE_ALLOCATION, range).map(|r| {
            r.map(|e| Extent::new(e.offset, e.length, allocation_kind(e.flags)))
                .map_err(SourceError::from)
        }))
    }

    /// Unknown: counting would walk the export's map over the network
    /// before the copy starts.
    fn data_bytes(&self, _range: Range<u64>, _limit: u64) -> Option<u64> {
        None
    }

    fn max_reads(&self) -> Option<usize> {
        // One read per connection: more workers than connections only
        // queue on the locks (figures in BENCHMARKS.md).
        Some(self.connections())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), SourceError> {
        if self.readers.is_empty() {
            return lock(&self.status)
                .read(offset, buf)
                .map_err(SourceError::from);
        }
        // A free connection if there is one: waiting on a busy one while
        // another idles halves the throughput.
        let n = self.readers.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let free = (0..n).find_map(|i| match self.readers[(first + i) % n].try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        });
        let mut client = match free {
            Some(g) => g,
            None => lock(&self.readers[first]),
        };
        client.read(offset, buf).map_err(SourceError::from)
    }

    fn dirty(&self, bitmap: &str, range: Range<u64>) -> Result<RangeStream<'_>, SourceError> {
        let context = format!("{QEMU_DIRTY_BITMAP}{bitmap}");
        Ok(Box::new(
            self.status(&context, range)
                .filter(|r| r.as_ref().map_or(true, |e| e.flags & 1 != 0))
                .map(|r| r.map(|e| e.offset..e.end()).map_err(SourceError::from)),
        ))
    }
}
