//! One qcow2 file: its header, active L1 table, L2 tables read on demand
//! through a bounded cache, refcounts, and its external data file.
//!
//! Host file I/O is in `host`, refcount lookups in `refcount`, the
//! allocation bitmap in `allocation`, and the rules for backing and data
//! file names in `paths`.

mod allocation;
mod host;
mod paths;
mod refcount;

pub(crate) use host::{HostFile, Within, actual_size, pread_zero_fill};
pub use paths::check_untrusted;
pub(crate) use paths::resolve;

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use crate::compress;
use crate::entry::{Geometry, L1Entry, L2Mapping, RefcountTableEntry, Subcluster};
use crate::error::{Error, Result};
use crate::header::{Header, RawHeader};
use crate::open::{FileRole, OpenOptions, OpenedFile};
use crate::seek::{self, Region};
use crate::types::{GuestOffset, HostOffset, be64};

/// L2 tables kept in memory at once, whatever the image size.
pub const L2_CACHE_TABLES: usize = 32;

/// A bounded most-recently-used cache of L2 tables, keyed by offset.
#[derive(Debug, Default)]
struct L2Cache {
    tables: Vec<(u64, Arc<[u8]>)>,
}

/// Block status of one range in one layer, as qemu's `bdrv_block_status`
/// reports it (`BDRV_BLOCK_*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerStatus {
    /// Bytes from the queried offset that share this status.
    pub len: u64,
    /// `BDRV_BLOCK_DATA`.
    pub data: bool,
    /// `BDRV_BLOCK_ZERO`.
    pub zero: bool,
    /// `BDRV_BLOCK_ALLOCATED`: this layer decides the content.
    pub allocated: bool,
    /// `BDRV_BLOCK_COMPRESSED`.
    pub compressed: bool,
    /// Host offset (`BDRV_BLOCK_OFFSET_VALID`).
    pub offset: Option<HostOffset>,
}

/// One qcow2 image file, without its backing chain.
#[derive(Debug)]
pub struct Qcow2 {
    host: HostFile,
    header: Header,
    l1: Vec<L1Entry>,
    refcount_table: Vec<RefcountTableEntry>,
    data_file: Option<HostFile>,
    geometry: Geometry,
    l2_cache: Mutex<L2Cache>,
    refblock_cache: Mutex<Option<(HostOffset, Arc<[u8]>)>>,
    compressed_cache: Mutex<Option<(u64, Arc<[u8]>)>>,
    metadata_prealloc: OnceLock<bool>,
    /// How tables are read: inside the file, or zero-filled for the check.
    tables: Within,
}

impl Qcow2 {
    /// Opens a qcow2 file read-only: header, L1 table, refcount table and
    /// the external data file, if any. The backing file is not opened.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// [`Qcow2::open`] for an image from an untrusted place: an external
    /// data file name that is absolute or leads out of the image's folder
    /// is refused (see [`check_untrusted`]).
    pub fn open_untrusted(path: impl AsRef<Path>) -> Result<Self> {
        let opts = OpenOptions {
            untrusted: true,
            ..OpenOptions::default()
        };
        Self::open_with(path, &opts)
    }

    /// [`Qcow2::open`] with options: `untrusted` and `on_open` apply (the
    /// hook sees the image as [`FileRole::Top`] and its data file); the
    /// backing file is never opened here.
    pub fn open_with(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let open = || {
            let host = opts.open(path, FileRole::Top, None)?;
            Self::from_host(host, opts, 0, Within::File)
        };
        open().map_err(|e| e.in_file(path))
    }

    /// Opens the qcow2 image the caller has open as `file` (read from
    /// offset 0 on; `path` names it in messages and locates its data
    /// file). `on_open` is not called for `file` itself, which is advised
    /// `POSIX_FADV_RANDOM`.
    pub fn open_file(file: File, path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let open = || Self::from_host(HostFile::adopt(file, path)?, opts, 0, Within::File);
        open().map_err(|e| e.in_file(path))
    }

    /// Reads the header and tables of the qcow2 image in `host`, the
    /// layer at `depth` of a chain, and opens its data file.
    pub(crate) fn from_host(
        host: HostFile,
        opts: &OpenOptions,
        depth: usize,
        tables: Within,
    ) -> Result<Self> {
        // The header lives in the first cluster; read the largest possible
        // (2 MiB) or the whole file if shorter, then parse.
        let first = host.size.min(1 << crate::header::MAX_CLUSTER_BITS) as usize;
        let mut buf = vec![0; first.min(4096)];
        pread_zero_fill(&host.file, &mut buf, 0, "header")?;
        if let Ok(raw) = RawHeader::decode(&buf) {
            let bits = raw.cluster_bits.get();
            if (9..=21).contains(&bits) && (1usize << bits) > buf.len() && first > buf.len() {
                buf = vec![0; first.min(1 << bits)];
                pread_zero_fill(&host.file, &mut buf, 0, "header")?;
            }
        }
        let header = Header::parse(&buf)?;
        if tables == Within::File {
            header.check_file_size(host.size)?;
        }
        // Both sizes are capped by Header::parse (32 MiB, 8 MiB).
        let mut l1_bytes = vec![0; header.l1_size as usize * 8];
        host.pread(tables, &mut l1_bytes, header.l1_table_offset.0, "L1 table")?;
        let l1: Vec<L1Entry> = l1_bytes
            .chunks_exact(8)
            .map(|c| L1Entry(be64(c, 0)))
            .collect();
        if tables == Within::File {
            check_l1(&l1, &header, host.size)?;
        }
        let mut rt = vec![0; header.refcount_table_bytes() as usize];
        host.pread(
            tables,
            &mut rt,
            header.refcount_table_offset.0,
            "refcount table",
        )?;
        let refcount_table = rt
            .chunks_exact(8)
            .map(|c| RefcountTableEntry(be64(c, 0)))
            .collect();
        let data_file = if header.has_data_file() {
            let Some(name) = &header.data_file else {
                return Err(Error::UnsupportedFile {
                    what: "data file",
                    name: String::new(),
                    problem: "the external data file bit is set but no name is stored",
                });
            };
            if opts.untrusted {
                check_untrusted(&host.path, name, "data file")?;
            }
            let path = resolve(&host.path, name, "data file")?;
            Some(opts.open(&path, FileRole::DataFile(depth), None)?)
        } else {
            None
        };
        let geometry = header.geometry();
        Ok(Qcow2 {
            host,
            header,
            l1,
            refcount_table,
            data_file,
            geometry,
            l2_cache: Mutex::default(),
            refblock_cache: Mutex::default(),
            compressed_cache: Mutex::default(),
            metadata_prealloc: OnceLock::new(),
            tables,
        })
    }

    /// The files this image holds open: the image, its data file.
    pub fn files(&self) -> impl Iterator<Item = OpenedFile<'_>> {
        self.files_at(0)
    }

    /// [`Qcow2::files`] for the layer at `depth` of a chain.
    pub(crate) fn files_at(&self, depth: usize) -> impl Iterator<Item = OpenedFile<'_>> {
        let role = if depth == 0 {
            FileRole::Top
        } else {
            FileRole::Backing(depth)
        };
        let data = self.data_file.as_ref();
        std::iter::once(OpenedFile::of(&self.host, role))
            .chain(data.map(|d| OpenedFile::of(d, FileRole::DataFile(depth))))
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The image file's path.
    pub fn path(&self) -> &Path {
        &self.host.path
    }

    /// The image file's size in bytes.
    pub fn file_size(&self) -> u64 {
        self.host.size
    }

    /// The external data file's path, if any.
    pub fn data_file_path(&self) -> Option<&Path> {
        self.data_file.as_ref().map(|d| d.path.as_path())
    }

    pub(crate) fn file(&self) -> &File {
        &self.host.file
    }

    pub(crate) fn host(&self) -> &HostFile {
        &self.host
    }

    /// The open file guest data clusters live in: the external data file
    /// where there is one, else the image file. A
    /// [`Subcluster::Normal`] host offset is an offset into it.
    pub fn data_file(&self) -> &File {
        &self.data_host().file
    }

    /// The virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.header.size
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// The active L1 table, raw.
    pub fn l1_table(&self) -> &[L1Entry] {
        &self.l1
    }

    /// The refcount table, raw.
    pub fn refcount_table(&self) -> &[RefcountTableEntry] {
        &self.refcount_table
    }

    /// The host file guest data clusters are in.
    fn data_host(&self) -> &HostFile {
        self.data_file.as_ref().unwrap_or(&self.host)
    }

    /// Validated L2 table offset of L1 entry `index` of the active table.
    pub(crate) fn l2_offset(&self, index: u64) -> Result<Option<HostOffset>> {
        let Some(&e) = self.l1.get(index as usize) else {
            return Ok(None);
        };
        validate_l1(
            e,
            index,
            self.header.l1_table_offset.0,
            self.header.cluster_bits,
        )
    }

    /// The L2 table at `offset`, from the cache or the file.
    pub(crate) fn l2_table(&self, offset: HostOffset) -> Result<Arc<[u8]>> {
        let mut cache = self.l2_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = cache.tables.iter().position(|(o, _)| *o == offset.0) {
            let t = cache.tables.remove(i);
            cache.tables.insert(0, t.clone());
            return Ok(t.1);
        }
        let mut buf = vec![0; self.cluster_size() as usize];
        self.host
            .pread(Within::File, &mut buf, offset.0, "L2 table")?;
        let t: Arc<[u8]> = buf.into();
        cache.tables.insert(0, (offset.0, t.clone()));
        cache.tables.truncate(L2_CACHE_TABLES);
        Ok(t)
    }

    /// Decodes entry `index` of the L2 table `table` at `table_offset`.
    pub(crate) fn decode_l2(
        &self,
        table: &[u8],
        table_offset: u64,
        index: u64,
    ) -> Result<L2Mapping> {
        let es = self.header.l2_entry_size() as usize;
        let at = index as usize * es;
        let entry = be64(table, at);
        let bitmap = if es == 16 { be64(table, at + 8) } else { 0 };
        L2Mapping::decode(entry, bitmap, self.geometry).map_err(|problem| Error::BadL2Entry {
            table_offset,
            index,
            entry,
            problem,
        })
    }

    /// The L2 mapping of the guest cluster containing `guest`
    /// ([`L2Mapping::Unallocated`] when its L2 table is missing).
    pub fn mapping(&self, guest: GuestOffset) -> Result<L2Mapping> {
        Ok(self.lookup(guest)?.0)
    }

    /// `(mapping, bytes from the start of the cluster that the answer
    /// covers)`: one cluster, or a whole L1 span when no L2 table exists.
    fn lookup(&self, GuestOffset(guest): GuestOffset) -> Result<(L2Mapping, u64)> {
        let h = &self.header;
        let l1_index = guest / h.l1_span();
        let Some(l2) = self.l2_offset(l1_index)? else {
            let span_end = (l1_index + 1) * h.l1_span();
            let cluster_start = guest & !(h.cluster_size() - 1);
            return Ok((L2Mapping::Unallocated, span_end - cluster_start));
        };
        let table = self.l2_table(l2)?;
        let index = (guest >> h.cluster_bits) % h.l2_entries();
        Ok((self.decode_l2(&table, l2.0, index)?, h.cluster_size()))
    }

    /// What the (sub)cluster at `guest` reads as, with the host offset
    /// adjusted to `guest`, and how many bytes from `guest` on share it
    /// (same kind, contiguous host offsets), up to `max` bytes.
    pub fn subcluster_run(&self, guest: GuestOffset, max: u64) -> Result<(Subcluster, u64)> {
        let first = self.subcluster_at(guest)?;
        let mut len = first.1.min(max);
        let kind = first.0;
        // A compressed cluster stands alone: its data is one unit.
        while len < max && !matches!(kind, Subcluster::Compressed { .. }) {
            let (next, next_len) = self.subcluster_at(GuestOffset(guest.0 + len))?;
            if next != advance(kind, len) {
                break;
            }
            len = (len + next_len).min(max);
        }
        Ok((kind, len))
    }

    /// The subcluster at `guest` and the bytes to the end of the range it
    /// stands for (a subcluster, or a whole unallocated L1 span).
    fn subcluster_at(&self, at: GuestOffset) -> Result<(Subcluster, u64)> {
        let h = &self.header;
        let (m, covered) = self.lookup(at)?;
        let guest = at.0;
        let cluster_start = guest & !(h.cluster_size() - 1);
        let sc_size = h.subcluster_size();
        let sc = ((guest - cluster_start) / sc_size) as u32;
        let s = m.subcluster(sc, sc_size, self.geometry, GuestOffset(cluster_start));
        let within = guest - cluster_start - u64::from(sc) * sc_size;
        let span = if covered > h.cluster_size() {
            covered - (guest - cluster_start)
        } else {
            sc_size - within
        };
        Ok((advance(s, within), span))
    }

    /// Block status of `[guest, guest + max)` in this layer alone, before
    /// the chain adds zeros for unallocated ranges (qemu's
    /// `qcow2_co_block_status` plus its recursion into the data file).
    pub fn layer_status(&self, guest: GuestOffset, max: u64) -> Result<LayerStatus> {
        let (sc, mut len) = self.subcluster_run(guest, max)?;
        let mut st = LayerStatus {
            len,
            data: false,
            zero: false,
            allocated: false,
            compressed: false,
            offset: None,
        };
        match sc {
            Subcluster::Normal(h) => {
                st.data = true;
                st.offset = Some(h);
            }
            Subcluster::ZeroAlloc(h) => {
                st.zero = true;
                st.offset = Some(h);
            }
            Subcluster::ZeroPlain => st.zero = true,
            Subcluster::UnallocatedAlloc(h) => st.offset = Some(h),
            Subcluster::UnallocatedPlain => {}
            Subcluster::Compressed { .. } => {
                st.data = true;
                st.compressed = true;
            }
        }
        st.allocated = st.data || st.zero;
        // BDRV_BLOCK_RECURSE: with metadata preallocation qemu asks the
        // data file whether a data range is a hole (block/io.c).
        if let Subcluster::Normal(HostOffset(host)) = sc
            && self.metadata_preallocated()?
        {
            let file = self.data_host();
            let file_len = file.size.next_multiple_of(512);
            if host >= file_len {
                st.zero = true;
            } else {
                let limit = host + len.min(file_len - host);
                match seek::region_at(&file.file, host, limit).map_err(|source| {
                    Error::SeekData {
                        path: file.path.clone(),
                        offset: host,
                        source,
                    }
                })? {
                    Region::Hole(end) if end >= file_len => st.zero = true,
                    Region::Hole(end) => {
                        st.zero = true;
                        len = end - host;
                    }
                    Region::Data(end) => len = end - host,
                }
                st.len = len;
            }
        }
        Ok(st)
    }

    /// Reads `buf.len()` bytes of guest data from a standard cluster at
    /// host offset `host` (in the data file when there is one).
    pub(crate) fn read_host(&self, buf: &mut [u8], HostOffset(host): HostOffset) -> Result<()> {
        // A data cluster inside the image file must start inside it; past
        // its end is a corrupt L2 entry, not a hole.
        if self.data_file.is_none() && host >= self.host.size {
            return Err(Error::OutsideFile {
                what: "data cluster",
                offset: host,
                end: host + buf.len() as u64,
                file_size: self.host.size,
            });
        }
        pread_zero_fill(&self.data_host().file, buf, host, "guest data")
    }

    /// Reads `out.len()` bytes of the guest cluster whose compressed data
    /// starts at `host` and is `size` bytes long, from `within` bytes into
    /// it. A whole cluster is decompressed straight into `out`; parts of
    /// one go through a cache of the last cluster, so that small reads
    /// walking a cluster decompress it once. No lock is held while
    /// decompressing: readers on several threads decompress in parallel.
    pub(crate) fn read_compressed(
        &self,
        host: HostOffset,
        size: u64,
        within: usize,
        out: &mut [u8],
    ) -> Result<()> {
        let cluster_size = self.cluster_size() as usize;
        if within == 0 && out.len() == cluster_size {
            return self.decompress_into(host, size, out);
        }
        let cached = {
            let c = self
                .compressed_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            c.as_ref()
                .filter(|(o, _)| *o == host.0)
                .map(|(_, d)| d.clone())
        };
        let cluster = match cached {
            Some(d) => d,
            None => {
                let mut d = vec![0; cluster_size];
                self.decompress_into(host, size, &mut d)?;
                let d: Arc<[u8]> = d.into();
                *self
                    .compressed_cache
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some((host.0, d.clone()));
                d
            }
        };
        out.copy_from_slice(&cluster[within..within + out.len()]);
        Ok(())
    }

    /// Decompresses the cluster at `host` (`size` bytes) into `out`, one
    /// cluster long.
    fn decompress_into(&self, host: HostOffset, size: u64, out: &mut [u8]) -> Result<()> {
        if host.0 >= self.host.size {
            return Err(Error::OutsideFile {
                what: "compressed cluster",
                offset: host.0,
                end: host.0 + size,
                file_size: self.host.size,
            });
        }
        // `size` is at most a cluster plus a sector by construction.
        let mut input = vec![0; size as usize];
        pread_zero_fill(&self.host.file, &mut input, host.0, "compressed cluster")?;
        compress::decompress_into(self.header.compression_type, &input, out).map_err(|problem| {
            Error::Decompress {
                host_offset: host.0,
                size,
                problem,
            }
        })
    }

    /// Bytes of the file actually allocated on disk (`st_blocks * 512`).
    pub fn actual_size(&self) -> Result<u64> {
        actual_size(&self.host.file)
    }
}

/// Checks every entry of the active L1 table when the image is opened, so
/// that a damaged one refuses the image before anything is read from it (a
/// copy's destination is not touched): reserved bits, alignment, and the
/// L2 table inside the file, as a lookup would find them one by one.
fn check_l1(l1: &[L1Entry], header: &Header, file_size: u64) -> Result<()> {
    let table = header.l1_table_offset.0;
    let cluster = 1u64 << header.cluster_bits;
    for (index, &e) in l1.iter().enumerate() {
        if let Some(l2) = validate_l1(e, index as u64, table, header.cluster_bits)? {
            let end = l2.0.saturating_add(cluster);
            if end > file_size {
                return Err(Error::OutsideFile {
                    what: "L2 table",
                    offset: l2.0,
                    end,
                    file_size,
                });
            }
        }
    }
    Ok(())
}

/// Checks an L1 entry; `Ok(None)` when its L2 table is unallocated.
pub(crate) fn validate_l1(
    e: L1Entry,
    index: u64,
    table_offset: u64,
    cluster_bits: u32,
) -> Result<Option<HostOffset>> {
    e.validate(cluster_bits)
        .map_err(|problem| Error::BadL1Entry {
            table_offset,
            index,
            entry: e.0,
            problem,
        })?;
    Ok(e.l2_offset())
}

/// Moves a subcluster's host offset forward by `delta` bytes, as the
/// status of a byte `delta` further on would say.
fn advance(s: Subcluster, delta: u64) -> Subcluster {
    let a = |h: HostOffset| HostOffset(h.0 + delta);
    match s {
        Subcluster::UnallocatedAlloc(h) => Subcluster::UnallocatedAlloc(a(h)),
        Subcluster::ZeroAlloc(h) => Subcluster::ZeroAlloc(a(h)),
        Subcluster::Normal(h) => Subcluster::Normal(a(h)),
        s => s,
    }
}
