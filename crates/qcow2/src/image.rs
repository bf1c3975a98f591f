//! One qcow2 file: its header, active L1 table, L2 tables read on demand
//! through a bounded cache, refcounts, and its external data file.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
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

/// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the
/// file read as zeros.
pub(crate) fn pread_zero_fill(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    what: &'static str,
) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(Error::Read {
                    what,
                    offset: offset + done as u64,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Reads `buf.len()` bytes that must lie inside a file of `file_size`.
pub(crate) fn pread_within(
    file: &File,
    file_size: u64,
    buf: &mut [u8],
    offset: u64,
    what: &'static str,
) -> Result<()> {
    let end = offset.saturating_add(buf.len() as u64);
    if end > file_size {
        return Err(Error::OutsideFile {
            what,
            offset,
            end,
            file_size,
        });
    }
    pread_zero_fill(file, buf, offset, what)
}

/// How the tables a header points to are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Within {
    /// Only inside the file: a table past its end is an error.
    File,
    /// As qemu reads them, with zeros past the end of the file: how
    /// `qemu-img check` gets to report such a table instead of refusing.
    ZeroFill,
}

impl Within {
    pub(crate) fn pread(
        self,
        file: &File,
        file_size: u64,
        buf: &mut [u8],
        offset: u64,
        what: &'static str,
    ) -> Result<()> {
        match self {
            Within::File => pread_within(file, file_size, buf, offset, what),
            Within::ZeroFill => pread_zero_fill(file, buf, offset, what),
        }
    }
}

/// An open host file: an image, a backing file, a data file.
#[derive(Debug)]
pub(crate) struct HostFile {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) size: u64,
    /// (device, inode).
    pub(crate) id: (u64, u64),
}

impl HostFile {
    /// Takes an open file: its size and identity (fstat), nothing read.
    pub(crate) fn new(file: File, path: &Path) -> Result<Self> {
        let m = file.metadata().map_err(|source| Error::Read {
            what: "file size",
            offset: 0,
            source,
        })?;
        Ok(HostFile {
            path: path.to_path_buf(),
            file,
            size: m.len(),
            id: (m.dev(), m.ino()),
        })
    }

    /// Takes a file the caller opened and has done with what it needs.
    pub(crate) fn adopt(file: File, path: &Path) -> Result<Self> {
        let host = HostFile::new(file, path)?;
        host.advise_random();
        Ok(host)
    }

    /// No readahead: reading tables must not pull the data clusters
    /// around them into the page cache, where SEEK_DATA (which the map
    /// asks for preallocated images, as qemu does) would see cached pages
    /// of unwritten extents as data.
    pub(crate) fn advise_random(&self) {
        crate::open::advise(
            &self.file,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_RANDOM,
        );
    }
}

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
    pub offset: Option<u64>,
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
    refblock_cache: Mutex<Option<(u64, Arc<[u8]>)>>,
    compressed_cache: Mutex<Option<(u64, Arc<[u8]>)>>,
    metadata_prealloc: OnceLock<bool>,
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
    /// file). `on_open` is not called for `file` itself.
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
        tables.pread(
            &host.file,
            host.size,
            &mut l1_bytes,
            header.l1_table_offset.0,
            "L1 table",
        )?;
        let l1 = l1_bytes
            .chunks_exact(8)
            .map(|c| L1Entry(be64(c, 0)))
            .collect();
        let mut rt = vec![0; header.refcount_table_bytes() as usize];
        tables.pread(
            &host.file,
            host.size,
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
        pread_within(
            &self.host.file,
            self.host.size,
            &mut buf,
            offset.0,
            "L2 table",
        )?;
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
        Ok(self.lookup(guest.0)?.0)
    }

    /// `(mapping, bytes from the start of the cluster that the answer
    /// covers)`: one cluster, or a whole L1 span when no L2 table exists.
    fn lookup(&self, guest: u64) -> Result<(L2Mapping, u64)> {
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
    pub fn subcluster_run(&self, guest: u64, max: u64) -> Result<(Subcluster, u64)> {
        let first = self.subcluster_at(guest)?;
        let mut len = first.1.min(max);
        let kind = first.0;
        // A compressed cluster stands alone: its data is one unit.
        while len < max && !matches!(kind, Subcluster::Compressed { .. }) {
            let (next, next_len) = self.subcluster_at(guest + len)?;
            if next != advance(kind, len) {
                break;
            }
            len = (len + next_len).min(max);
        }
        Ok((kind, len))
    }

    /// The subcluster at `guest` and the bytes to the end of the range it
    /// stands for (a subcluster, or a whole unallocated L1 span).
    fn subcluster_at(&self, guest: u64) -> Result<(Subcluster, u64)> {
        let h = &self.header;
        let (m, covered) = self.lookup(guest)?;
        let cluster_start = guest & !(h.cluster_size() - 1);
        let sc_size = h.subcluster_size();
        let sc = ((guest - cluster_start) / sc_size) as u32;
        let s = m.subcluster(sc, sc_size, self.geometry, cluster_start);
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
    pub fn layer_status(&self, guest: u64, max: u64) -> Result<LayerStatus> {
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
                st.offset = Some(h.0);
            }
            Subcluster::ZeroAlloc(h) => {
                st.zero = true;
                st.offset = Some(h.0);
            }
            Subcluster::ZeroPlain => st.zero = true,
            Subcluster::UnallocatedAlloc(h) => st.offset = Some(h.0),
            Subcluster::UnallocatedPlain => {}
            Subcluster::Compressed { .. } => {
                st.data = true;
                st.compressed = true;
            }
        }
        st.allocated = st.data || st.zero;
        // BDRV_BLOCK_RECURSE: with metadata preallocation qemu asks the
        // data file whether a data range is a hole (block/io.c).
        if st.data && !st.compressed && self.metadata_preallocated()? {
            let host = st.offset.expect("normal clusters have an offset");
            let file = self.data_host();
            let file_len = file.size.next_multiple_of(512);
            if host >= file_len {
                st.zero = true;
            } else {
                let limit = host + len.min(file_len - host);
                match seek::region_at(&file.file, host, limit).map_err(|source| Error::Read {
                    what: "allocation status (SEEK_DATA)",
                    offset: host,
                    source,
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

    /// qemu's `qcow2_detect_metadata_preallocation`: more clusters have a
    /// refcount than the file has allocated (by 10%, or 2 clusters).
    pub fn metadata_preallocated(&self) -> Result<bool> {
        if let Some(&v) = self.metadata_prealloc.get() {
            return Ok(v);
        }
        let meta = self.host.file.metadata().map_err(|source| Error::Read {
            what: "file allocation (fstat)",
            offset: 0,
            source,
        })?;
        let real_clusters = meta.blocks() * 512 / self.cluster_size();
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = self.host.size.div_ceil(self.cluster_size());
        let mut count = 0;
        let mut i = 0;
        while i < end_cluster && count < threshold {
            if self.refcount(i)? != 0 {
                count += 1;
            }
            i += 1;
        }
        let v = count >= threshold;
        let _ = self.metadata_prealloc.set(v);
        Ok(v)
    }

    /// Refcount entries per refcount block.
    pub fn refcount_block_entries(&self) -> u64 {
        self.cluster_size() * 8 / u64::from(self.header.refcount_bits())
    }

    /// The refcount of host cluster `cluster` (0 when its block is
    /// missing or beyond the refcount table).
    pub fn refcount(&self, cluster: u64) -> Result<u64> {
        let per_block = self.refcount_block_entries();
        let ti = cluster / per_block;
        let Some(&e) = self.refcount_table.get(ti as usize) else {
            return Ok(0);
        };
        if e.0 & RefcountTableEntry::RESERVED_MASK != 0 {
            return Err(Error::BadRefcountEntry {
                table_offset: self.header.refcount_table_offset.0,
                index: ti,
                entry: e.0,
                problem: "reserved bits set",
            });
        }
        let Some(block) = e.block_offset() else {
            return Ok(0);
        };
        if block.0 % self.cluster_size() != 0 {
            return Err(Error::BadRefcountEntry {
                table_offset: self.header.refcount_table_offset.0,
                index: ti,
                entry: e.0,
                problem: "refcount block not cluster aligned",
            });
        }
        let data = {
            let mut c = self
                .refblock_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match &*c {
                Some((o, d)) if *o == block.0 => d.clone(),
                _ => {
                    let mut buf = vec![0; self.cluster_size() as usize];
                    pread_within(
                        &self.host.file,
                        self.host.size,
                        &mut buf,
                        block.0,
                        "refcount block",
                    )?;
                    let d: Arc<[u8]> = buf.into();
                    *c = Some((block.0, d.clone()));
                    d
                }
            }
        };
        Ok(refcount_in_block(
            &data,
            cluster % per_block,
            self.header.refcount_order,
        ))
    }

    /// Reads `buf.len()` bytes of guest data from a standard cluster at
    /// host offset `host` (in the data file when there is one).
    pub(crate) fn read_host(&self, buf: &mut [u8], host: u64) -> Result<()> {
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

    /// Streams the allocation bitmap of this image to `out`: one bit per
    /// guest cluster, bit `i % 8` of byte `i / 8` set when cluster `i` has
    /// a host cluster here (standard, compressed or preallocated zero; see
    /// [`L2Mapping::has_host_data`]). Returns the number of such clusters,
    /// which equals `qemu-img check`'s allocated clusters. Memory is one
    /// L2 table, however big the disk.
    pub fn write_allocation_bitmap(&self, out: &mut dyn std::io::Write) -> Result<u64> {
        let h = &self.header;
        let clusters = h.size.div_ceil(h.cluster_size());
        // A power of two of at least 32 (512-byte clusters of 16-byte
        // entries): every L2 table covers whole bytes of the bitmap, and
        // each starts at bit 0 of a byte.
        let per_l2 = h.l2_entries();
        let es = h.l2_entry_size() as usize;
        let mut count = 0;
        // One table buffer for the whole walk: tables are read once each,
        // in order, so the shared L2 cache would only cost allocations and
        // evict what other readers use.
        let mut table = vec![0u8; self.cluster_size() as usize];
        let mut bytes: Vec<u8> = Vec::with_capacity(per_l2.div_ceil(8) as usize);
        let mut i = 0;
        while i < clusters {
            let l1_index = i / per_l2;
            let end = ((l1_index + 1) * per_l2).min(clusters);
            let n = (end - i) as usize;
            bytes.clear();
            bytes.resize(n.div_ceil(8), 0);
            if let Some(o) = self.l2_offset(l1_index)? {
                pread_within(&self.host.file, self.host.size, &mut table, o.0, "L2 table")?;
                // Eight entries (one output byte) at a time; an all-zero
                // entry is unallocated and breaks no rule, so the groups
                // of a sparse disk's tables that are all zero are passed
                // over without decoding (this loop vectorises).
                for (g, group) in table[..n * es].chunks(8 * es).enumerate() {
                    if group.iter().fold(0u8, |a, &b| a | b) == 0 {
                        continue;
                    }
                    for (k, e) in group.chunks_exact(es).enumerate() {
                        if e.iter().all(|&b| b == 0) {
                            continue;
                        }
                        let index = (g * 8 + k) as u64;
                        if self.decode_l2(&table, o.0, index)?.has_host_data() {
                            bytes[g] |= 1 << k;
                            count += 1;
                        }
                    }
                }
            }
            out.write_all(&bytes).map_err(|source| Error::Read {
                what: "allocation bitmap output",
                offset: 0,
                source,
            })?;
            i = end;
        }
        Ok(count)
    }

    /// Allocated clusters (see [`Qcow2::write_allocation_bitmap`]) times
    /// the cluster size.
    pub fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.write_allocation_bitmap(&mut std::io::sink())? * self.cluster_size())
    }
}

pub(crate) fn actual_size(file: &File) -> Result<u64> {
    Ok(file
        .metadata()
        .map_err(|source| Error::Read {
            what: "file allocation (fstat)",
            offset: 0,
            source,
        })?
        .blocks()
        * 512)
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

/// Entry `i` of a refcount block of `1 << order`-bit entries (sub-byte
/// widths count from the least significant bit, qcow2.rst).
pub(crate) fn refcount_in_block(block: &[u8], i: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits < 8 {
        let bit = i * bits;
        let byte = block[(bit / 8) as usize];
        u64::from(byte >> (bit % 8)) & ((1 << bits) - 1)
    } else {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        block[at..at + n]
            .iter()
            .fold(0u64, |acc, &b| acc << 8 | u64::from(b))
    }
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

/// Resolves a backing or data file name stored in the image at `image`:
/// relative names are relative to the image's folder.
/// Refuses a backing or data file `name` stored in `image` that is
/// absolute or leads out of the image's folder, by its components (`..`)
/// or, once resolved, through a symbolic link. For images from untrusted
/// places: such a name could make a tool read any file on the machine.
pub fn check_untrusted(image: &Path, name: &str, what: &'static str) -> Result<()> {
    let refuse = |problem| {
        Err(Error::Untrusted {
            what,
            name: name.into(),
            problem,
        })
    };
    let p = Path::new(name);
    if p.is_absolute() {
        return refuse("the name is absolute");
    }
    let mut depth = 0i64;
    for c in p.components() {
        match c {
            std::path::Component::Normal(_) => depth += 1,
            std::path::Component::ParentDir => depth -= 1,
            std::path::Component::CurDir => {}
            _ => return refuse("the name is absolute"),
        }
        if depth < 0 {
            return refuse("the name climbs out of the image's folder");
        }
    }
    let dir = image
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let (Ok(dir), Ok(target)) = (dir.canonicalize(), dir.join(p).canonicalize())
        && !target.starts_with(&dir)
    {
        return refuse("the name leads out of the image's folder through a symbolic link");
    }
    Ok(())
}

pub(crate) fn resolve(image: &Path, name: &str, what: &'static str) -> Result<PathBuf> {
    if name.is_empty() {
        return Err(Error::UnsupportedFile {
            what,
            name: name.into(),
            problem: "empty name",
        });
    }
    if name.starts_with("json:") || name.contains("://") {
        return Err(Error::UnsupportedFile {
            what,
            name: name.into(),
            problem: "only plain file names are supported",
        });
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(image.parent().unwrap_or(Path::new(".")).join(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_names() {
        let img = Path::new("/images/vm.qcow2");
        let why = |name: &str| match check_untrusted(img, name, "backing file") {
            Ok(()) => None,
            Err(Error::Untrusted { problem, .. }) => Some(problem),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(why("base.qcow2"), None);
        assert_eq!(why("sub/../base.qcow2"), None);
        assert_eq!(why("./sub/base.qcow2"), None);
        assert_eq!(why("/etc/shadow"), Some("the name is absolute"));
        assert_eq!(
            why("../base.qcow2"),
            Some("the name climbs out of the image's folder")
        );
        assert_eq!(
            why("sub/../../x"),
            Some("the name climbs out of the image's folder")
        );
    }

    #[test]
    fn refcount_widths() {
        // 1-bit refcounts: bit 0 is the least significant bit of byte 0.
        let b = [0b1000_0101u8, 0, 0, 0];
        assert_eq!(refcount_in_block(&b, 0, 0), 1);
        assert_eq!(refcount_in_block(&b, 1, 0), 0);
        assert_eq!(refcount_in_block(&b, 7, 0), 1);
        // 4-bit: entry 1 is the high nibble of byte 0.
        assert_eq!(refcount_in_block(&[0x3a], 1, 2), 3);
        // 16-bit big-endian.
        assert_eq!(refcount_in_block(&[0, 1, 0x12, 0x34], 1, 4), 0x1234);
        // 64-bit.
        let mut b = [0u8; 16];
        b[15] = 9;
        assert_eq!(refcount_in_block(&b, 1, 6), 9);
    }

    #[test]
    fn names_resolve_against_the_image_folder() {
        let img = Path::new("/images/top.qcow2");
        assert_eq!(
            resolve(img, "base.raw", "backing file").unwrap(),
            Path::new("/images/base.raw")
        );
        assert_eq!(
            resolve(img, "/abs/b.qcow2", "backing file").unwrap(),
            Path::new("/abs/b.qcow2")
        );
        assert!(resolve(img, "json:{}", "backing file").is_err());
        assert!(resolve(img, "nbd://h/x", "backing file").is_err());
    }
}
