//! A qcow2 image with its backing chain: the virtual disk a guest sees.

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;

use crate::entry::Subcluster;
use crate::error::{Error, Result};
use crate::image::{HostFile, LayerStatus, Qcow2, Within, pread_zero_fill, resolve};
use crate::map::MapIter;
use crate::open::{FileRole, Format, OpenOptions, OpenedFile, read_format};
use crate::seek::{self, Region};
use crate::types::{GuestOffset, HostOffset};

/// A raw image used as a backing file.
#[derive(Debug)]
pub struct RawImage {
    host: HostFile,
}

impl RawImage {
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.host.path
    }

    /// Its length in bytes.
    pub fn file_size(&self) -> u64 {
        self.host.size
    }

    pub(crate) fn file(&self) -> &std::fs::File {
        &self.host.file
    }

    /// Its size as the block layer sees it: rounded up to 512 bytes.
    pub fn virtual_size(&self) -> u64 {
        self.host.size.next_multiple_of(512)
    }

    fn status(&self, offset: u64, max: u64) -> Result<LayerStatus> {
        let end = (offset + max).min(self.virtual_size());
        let r =
            seek::region_at(&self.host.file, offset, end).map_err(|source| Error::SeekData {
                path: self.host.path.clone(),
                offset,
                source,
            })?;
        let (data, to) = match r {
            Region::Data(to) => (true, to),
            Region::Hole(to) => (false, to),
        };
        Ok(LayerStatus {
            len: to - offset,
            data,
            zero: !data,
            allocated: true,
            compressed: false,
            offset: Some(HostOffset(offset)),
        })
    }
}

/// One image of a backing chain.
#[derive(Debug)]
pub enum Layer {
    /// A qcow2 image.
    Qcow2(Box<Qcow2>),
    /// A raw image (only as a backing file).
    Raw(RawImage),
}

impl Layer {
    /// The layer's virtual size as the block layer sees it (rounded up to
    /// 512 bytes).
    pub fn virtual_size(&self) -> u64 {
        match self {
            Layer::Qcow2(q) => q.virtual_size().next_multiple_of(512),
            Layer::Raw(r) => r.virtual_size(),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        match self {
            Layer::Qcow2(q) => q.path(),
            Layer::Raw(r) => r.path(),
        }
    }

    /// The layer's format.
    pub fn format(&self) -> Format {
        match self {
            Layer::Qcow2(_) => Format::Qcow2,
            Layer::Raw(_) => Format::Raw,
        }
    }
}

/// A qcow2 image opened read-only with its whole backing chain.
///
/// Layer 0 is the image itself; layer `i + 1` is the backing file of
/// layer `i`. [`Image::map`] and [`Image::read_at`] present the virtual
/// disk the way qemu does.
#[derive(Debug)]
pub struct Image {
    layers: Vec<Layer>,
}

impl Image {
    /// Opens the qcow2 image at `path` and its backing chain.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// Opens with explicit options; `on_open` sees every file, the image
    /// itself as [`FileRole::Top`].
    pub fn open_with(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let mut seen = HashSet::new();
        let host = opts
            .open(path, FileRole::Top, Some(&mut seen))
            .map_err(|e| e.in_file(path))?;
        Self::open_chain(host, seen, opts)
    }

    /// Opens the qcow2 image the caller has open as `file`, and its
    /// backing chain: one path, opened once (after the caller has probed
    /// it with [`crate::probe`], say). `path` names the file in messages
    /// and locates its backing and data files. `on_open` sees every other
    /// file of the chain, not `file`. `file` is advised
    /// `POSIX_FADV_RANDOM`, as every file the image reads tables from.
    pub fn open_file(file: File, path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        let host = HostFile::adopt(file, path).map_err(|e| e.in_file(path))?;
        let seen = HashSet::from([host.id]);
        Self::open_chain(host, seen, opts)
    }

    fn open_chain(
        host: HostFile,
        mut seen: HashSet<(u64, u64)>,
        opts: &OpenOptions,
    ) -> Result<Self> {
        let path = host.path.clone();
        let top = Qcow2::from_host(host, opts, 0, Within::File).map_err(|e| e.in_file(&path))?;
        let mut layers = vec![Layer::Qcow2(Box::new(top))];
        while let Some(Layer::Qcow2(q)) = layers.last() {
            let h = q.header();
            let Some(name) = h.backing_file.clone() else {
                break;
            };
            if opts.no_backing {
                break;
            }
            let image_path = q.path().to_path_buf();
            let wrap = |e: Error| e.in_file(&image_path);
            if q.header().data_file_raw() {
                return Err(wrap(Error::UnsupportedFile {
                    what: "backing file",
                    name,
                    problem: "backing files conflict with a raw external data file",
                }));
            }
            if layers.len() >= opts.max_depth {
                return Err(Error::ChainTooDeep {
                    max: opts.max_depth,
                });
            }
            if opts.untrusted {
                crate::image::check_untrusted(&image_path, &name, "backing file").map_err(wrap)?;
            }
            let bpath = resolve(&image_path, &name, "backing file").map_err(wrap)?;
            let named = match h.backing_format.as_deref() {
                Some("qcow2") => Some(Format::Qcow2),
                Some("raw") => Some(Format::Raw),
                Some(other) => {
                    return Err(wrap(Error::UnsupportedBackingFormat {
                        format: other.into(),
                    }));
                }
                None => None,
            };
            let depth = layers.len();
            let host = opts
                .open(&bpath, FileRole::Backing(depth), Some(&mut seen))
                .map_err(wrap)?;
            let in_file = |e: Error| e.in_file(&bpath);
            let format = match named {
                Some(f) => f,
                None => read_format(&host.file).map_err(in_file)?,
            };
            layers.push(match format {
                Format::Qcow2 => Layer::Qcow2(Box::new(
                    Qcow2::from_host(host, opts, depth, Within::File).map_err(in_file)?,
                )),
                Format::Raw => Layer::Raw(RawImage { host }),
            });
        }
        Ok(Image { layers })
    }

    /// Every file the image holds open, top first: each layer, and the
    /// data file of each qcow2 layer that has one. Their (device, inode)
    /// identities are [`Image::file_ids`].
    pub fn files(&self) -> impl Iterator<Item = OpenedFile<'_>> {
        self.layers.iter().enumerate().flat_map(
            |(depth, l)| -> Box<dyn Iterator<Item = OpenedFile<'_>>> {
                match l {
                    Layer::Qcow2(q) => Box::new(q.files_at(depth)),
                    Layer::Raw(r) => Box::new(std::iter::once(OpenedFile::of(
                        &r.host,
                        FileRole::Backing(depth),
                    ))),
                }
            },
        )
    }

    /// The (device, inode) of every file the image holds open: a copy
    /// must not write to any of them.
    pub fn file_ids(&self) -> Vec<(u64, u64)> {
        self.files().map(|f| f.id).collect()
    }

    /// The image itself (layer 0).
    pub fn top(&self) -> &Qcow2 {
        match &self.layers[0] {
            Layer::Qcow2(q) => q,
            Layer::Raw(_) => unreachable!("layer 0 is always qcow2"),
        }
    }

    /// Every layer, top first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Number of backing files below the image (0 without backing).
    pub fn backing_depth(&self) -> usize {
        self.layers.len() - 1
    }

    /// The virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.top().virtual_size()
    }

    /// Block status of one layer at `offset`, including the zeros qemu's
    /// block layer adds for unallocated ranges without backing data
    /// (block/io.c, `bdrv_co_do_block_status`).
    pub(crate) fn layer_status(
        &self,
        depth: usize,
        guest: GuestOffset,
        max: u64,
    ) -> Result<LayerStatus> {
        let offset = guest.0;
        let layer = &self.layers[depth];
        // The block layer clamps every request to the node's length.
        let max = max.min(layer.virtual_size().saturating_sub(offset));
        let mut st = match layer {
            Layer::Qcow2(q) => q
                .layer_status(guest, max)
                .map_err(|e| e.in_file(q.path()))?,
            Layer::Raw(r) => r.status(offset, max).map_err(|e| e.in_file(r.path()))?,
        };
        if !st.allocated {
            match self.layers.get(depth + 1) {
                None => st.zero = true,
                Some(b) if offset >= b.virtual_size() => st.zero = true,
                Some(_) => {}
            }
        }
        Ok(st)
    }

    /// A map of `range` of the virtual disk with `qemu-img map
    /// --output=json` semantics, streamed: memory stays bounded whatever
    /// the range. Neighbours that agree on every field are merged.
    pub fn map(&self, range: std::ops::Range<u64>) -> Result<MapIter<'_>> {
        let size = self.virtual_size();
        if range.start > range.end || range.end > size {
            return Err(Error::OutOfRange {
                offset: range.start,
                length: range.end.saturating_sub(range.start),
                size,
            });
        }
        Ok(MapIter::new(self, range))
    }

    /// A map of the whole virtual disk.
    pub fn map_all(&self) -> MapIter<'_> {
        MapIter::new(self, 0..self.virtual_size())
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`:
    /// decompresses compressed clusters, falls through to backing files,
    /// reads zeros for holes and past the end of short backing files.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.virtual_size();
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > size)
        {
            return Err(Error::OutOfRange {
                offset,
                length: buf.len() as u64,
                size,
            });
        }
        self.read_layer(0, buf, offset)
    }

    fn read_layer(&self, depth: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.layers[depth] {
            Layer::Raw(r) => pread_zero_fill(&r.host.file, buf, offset, "raw backing file")
                .map_err(|e| e.in_file(r.path())),
            Layer::Qcow2(q) => self
                .read_qcow2(q, depth, buf, offset)
                .map_err(|e| e.in_file(q.path())),
        }
    }

    fn read_qcow2(&self, q: &Qcow2, depth: usize, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let want = (buf.len() - done) as u64;
            let (sc, len) = q.subcluster_run(GuestOffset(pos), want)?;
            let len = len.min(want) as usize;
            let chunk = &mut buf[done..done + len];
            match sc {
                Subcluster::Normal(h) => q.read_host(chunk, h)?,
                Subcluster::ZeroPlain | Subcluster::ZeroAlloc(_) => chunk.fill(0),
                Subcluster::UnallocatedPlain | Subcluster::UnallocatedAlloc(_) => {
                    match self.layers.get(depth + 1) {
                        None => chunk.fill(0),
                        Some(b) => {
                            let blen = b.virtual_size();
                            let inside = blen.saturating_sub(pos).min(len as u64) as usize;
                            self.read_layer(depth + 1, &mut chunk[..inside], pos)?;
                            chunk[inside..].fill(0);
                        }
                    }
                }
                Subcluster::Compressed { host, size } => {
                    let within = (pos % q.cluster_size()) as usize;
                    q.read_compressed(host, size, within, chunk)?;
                }
            }
            done += len;
        }
        Ok(())
    }
}
