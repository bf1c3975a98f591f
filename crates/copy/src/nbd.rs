//! NBD exports as a [`Source`], and the connections a destination export
//! is written through.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use sparsekit_extent::Extent;
use sparsekit_nbd::map::{BASE_ALLOCATION, QEMU_DIRTY_BITMAP, allocation_kind};
use sparsekit_nbd::{Client, ClientConfig, NbdUri, StatusPager};

use crate::source::{ExtentStream, RangeStream, Source, SourceError};

/// An NBD export: block status for the map (`base:allocation`, see
/// [`allocation_kind`]), reads (or, for a destination, writes) spread over
/// a pool of connections (as many as the workers when the server
/// advertises multi-conn, else one).
#[derive(Debug)]
pub struct NbdSource {
    uri: String,
    size: u64,
    flags: sparsekit_nbd::TransmissionFlags,
    alignment: u64,
    /// The first asks for block status; `clients[pool..]` read and write.
    clients: Vec<Mutex<Client>>,
    pool: usize,
    next: AtomicUsize,
}

fn lock(m: &Mutex<Client>) -> std::sync::MutexGuard<'_, Client> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NbdSource {
    /// Connects to `uri` negotiating `base:allocation` and `contexts`, with
    /// up to `connections` connections for reading besides the one that
    /// asks for block status (0: that one reads too, as when the server
    /// does not allow several), each as `config` says (its timeout, its
    /// TLS certificates).
    pub fn connect(
        uri: &NbdUri,
        contexts: &[String],
        connections: usize,
        mut config: ClientConfig,
    ) -> Result<Self, sparsekit_nbd::Error> {
        for c in contexts {
            if !config.contexts.contains(c) {
                config.contexts.push(c.clone());
            }
        }
        let clients = Client::connect_multi(uri, &config, connections + 1)?;
        // No multi-conn: the one connection serves status and reads.
        let pool = usize::from(clients.len() > 1);
        Ok(Self::from_clients(uri, clients, pool))
    }

    /// Connects to `uri` as a destination: up to `connections` connections
    /// (one where the server does not advertise multi-conn), every one of
    /// them writing.
    pub(crate) fn connect_for_writing(
        uri: &NbdUri,
        connections: usize,
        config: &ClientConfig,
    ) -> Result<Self, sparsekit_nbd::Error> {
        let clients = Client::connect_multi(uri, config, connections.max(1))?;
        Ok(Self::from_clients(uri, clients, 0))
    }

    fn from_clients(uri: &NbdUri, clients: Vec<Client>, pool: usize) -> Self {
        let first = &clients[0];
        Self {
            uri: uri.to_string(),
            size: first.size(),
            flags: first.flags(),
            alignment: first.limits().alignment.max(1),
            clients: clients.into_iter().map(Mutex::new).collect(),
            pool,
            next: AtomicUsize::new(0),
        }
    }

    /// Connections used for reading (and writing).
    pub fn connections(&self) -> usize {
        self.clients.len() - self.pool
    }

    /// The export's transmission flags (read-only, write zeroes, ...).
    pub fn flags(&self) -> sparsekit_nbd::TransmissionFlags {
        self.flags
    }

    /// What every request's offset and length must be a multiple of.
    pub(crate) fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Runs `f` on a free connection of the pool if there is one: waiting
    /// on a busy connection while another idles halves the throughput.
    pub(crate) fn with_client<R>(&self, f: impl FnOnce(&mut Client) -> R) -> R {
        let pool = &self.clients[self.pool..];
        let n = pool.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let free = (0..n).find_map(|i| match pool[(first + i) % n].try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        });
        let mut client = match free {
            Some(g) => g,
            None => lock(&pool[first]),
        };
        f(&mut client)
    }

    /// Streams the status extents of `context` over `range`, one
    /// `NBD_CMD_BLOCK_STATUS` round trip at a time, locking the status
    /// connection only for each round trip.
    pub fn status(&self, context: &str, range: Range<u64>) -> StatusStream<'_> {
        let end = range.end.min(self.size);
        StatusPager::new(&self.clients[0], context, range.start.min(end)..end)
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
        self.with_client(|c| c.read(offset, buf))
            .map_err(SourceError::from)
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
