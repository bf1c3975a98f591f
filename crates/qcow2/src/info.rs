//! What `qemu-img info --output=json` prints for a qcow2 image, as plain
//! serializable structs.

use serde::Serialize;

use crate::chain::{Image, Layer};
use crate::error::Result;
use crate::image::{Qcow2, actual_size, resolve};

/// `qemu-img info --output=json` of one qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The protocol node below the image: the file itself.
    pub children: Vec<ChildInfo>,
    /// The backing file format, when the image names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// Internal snapshots, when there are any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    /// Virtual disk size.
    pub virtual_size: u64,
    /// The image's file name as given.
    pub filename: String,
    /// Cluster size.
    pub cluster_size: u64,
    /// Always `qcow2`.
    pub format: &'static str,
    /// Bytes allocated on disk (`st_blocks * 512`).
    pub actual_size: u64,
    /// qcow2-specific data.
    pub format_specific: FormatSpecific,
    /// The backing file name resolved against the image's folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// The backing file name as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// The header's dirty bit.
    pub dirty_flag: bool,
}

/// One child node of `qemu-img info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChildInfo {
    /// `file`.
    pub name: &'static str,
    /// The node.
    pub info: FileInfo,
}

/// The `file` protocol node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileInfo {
    /// Always empty.
    pub children: Vec<ChildInfo>,
    /// The file length.
    pub virtual_size: u64,
    /// The file name as given.
    pub filename: String,
    /// `file`.
    pub format: &'static str,
    /// Bytes allocated on disk.
    pub actual_size: u64,
    /// `{"type": "file", "data": {}}`.
    pub format_specific: FileSpecific,
    /// Always false.
    pub dirty_flag: bool,
}

/// `format-specific` of the file node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileSpecific {
    /// `file`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Empty.
    pub data: Empty,
}

/// An empty JSON object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Empty {}

/// `format-specific` of a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FormatSpecific {
    /// `qcow2`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The fields.
    pub data: Qcow2Specific,
}

/// The qcow2 fields of `format-specific.data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    /// `0.10` for version 2, `1.1` for version 3.
    pub compat: &'static str,
    /// `zlib` or `zstd`.
    pub compression_type: &'static str,
    /// Lazy refcounts (version 3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// Persistent bitmaps, when there are any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapInfo>>,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// External data file name (version 3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    /// Raw external data file (with a data file only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    /// Corrupt bit (version 3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    /// Extended L2 entries (version 3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

/// One persistent bitmap as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BitmapInfo {
    /// `in-use`, `auto`.
    pub flags: Vec<&'static str>,
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
}

/// One internal snapshot as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// Record/replay instruction count, when recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
    /// Guest run time, nanosecond part.
    pub vm_clock_nsec: u64,
    /// Name.
    pub name: String,
    /// Date, seconds.
    pub date_sec: u64,
    /// Date, nanoseconds.
    pub date_nsec: u64,
    /// Guest run time, seconds.
    pub vm_clock_sec: u64,
    /// Unique ID.
    pub id: String,
    /// VM state size.
    pub vm_state_size: u64,
}

impl Qcow2 {
    /// The data of `qemu-img info --output=json` for this image (no
    /// `backing-image`; see [`Image::info_chain`] for every layer).
    pub fn info(&self) -> Result<ImageInfo> {
        let h = self.header();
        let v3 = h.version >= 3;
        let filename = self.path().to_string_lossy().into_owned();
        let actual = actual_size(self.file())?;
        let bitmaps: Vec<BitmapInfo> = if h.bitmaps.is_some_and(|b| b.consistent) {
            self.bitmaps()?
                .into_iter()
                .map(|b| BitmapInfo {
                    flags: b.flag_names(),
                    granularity: b.granularity,
                    name: b.name,
                })
                .collect()
        } else {
            Vec::new()
        };
        let snapshots = self
            .snapshots()?
            .into_iter()
            .map(|s| SnapshotInfo {
                icount: s.icount,
                vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
                vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
                name: s.name,
                date_sec: s.date_sec.into(),
                date_nsec: s.date_nsec.into(),
                id: s.id,
                vm_state_size: s.vm_state_size,
            })
            .collect();
        let full_backing = match &h.backing_file {
            Some(name) => Some(
                resolve(self.path(), name, "backing file")?
                    .to_string_lossy()
                    .into_owned(),
            ),
            None => None,
        };
        Ok(ImageInfo {
            children: vec![file_child(&filename, self.file_size(), actual)],
            backing_filename_format: h.backing_format.clone(),
            snapshots,
            virtual_size: h.size,
            filename,
            cluster_size: h.cluster_size(),
            format: "qcow2",
            actual_size: actual,
            format_specific: FormatSpecific {
                kind: "qcow2",
                data: Qcow2Specific {
                    compat: if v3 { "1.1" } else { "0.10" },
                    compression_type: h.compression_type.as_str(),
                    lazy_refcounts: v3.then(|| h.lazy_refcounts()),
                    bitmaps: (!bitmaps.is_empty()).then_some(bitmaps),
                    refcount_bits: h.refcount_bits(),
                    data_file: if v3 { h.data_file.clone() } else { None },
                    data_file_raw: (v3 && h.has_data_file()).then(|| h.data_file_raw()),
                    corrupt: v3.then(|| h.corrupt()),
                    extended_l2: v3.then(|| h.extended_l2()),
                },
            },
            full_backing_filename: full_backing,
            backing_filename: h.backing_file.clone(),
            dirty_flag: h.dirty(),
        })
    }
}

/// `qemu-img info` of a raw backing file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RawInfo {
    /// The file node.
    pub children: Vec<ChildInfo>,
    /// Size, rounded up to 512 bytes.
    pub virtual_size: u64,
    /// The file name, resolved against the image above.
    pub filename: String,
    /// `raw`.
    pub format: &'static str,
    /// Bytes allocated on disk.
    pub actual_size: u64,
    /// Always false.
    pub dirty_flag: bool,
}

/// One element of `qemu-img info --backing-chain --output=json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ChainInfo {
    /// A qcow2 layer.
    Qcow2(Box<ImageInfo>),
    /// A raw layer.
    Raw(RawInfo),
}

fn file_child(filename: &str, size: u64, actual: u64) -> ChildInfo {
    ChildInfo {
        name: "file",
        info: FileInfo {
            children: Vec::new(),
            // The block layer counts whole 512-byte sectors.
            virtual_size: size.next_multiple_of(512),
            filename: filename.to_owned(),
            format: "file",
            actual_size: actual,
            format_specific: FileSpecific {
                kind: "file",
                data: Empty {},
            },
            dirty_flag: false,
        },
    }
}

impl Image {
    /// `qemu-img info --backing-chain --output=json`: every layer, top
    /// first.
    pub fn info_chain(&self) -> Result<Vec<ChainInfo>> {
        self.layers()
            .iter()
            .map(|l| match l {
                Layer::Qcow2(q) => Ok(ChainInfo::Qcow2(Box::new(q.info()?))),
                Layer::Raw(r) => {
                    let filename = r.path().to_string_lossy().into_owned();
                    let actual = actual_size(r.file())?;
                    Ok(ChainInfo::Raw(RawInfo {
                        children: vec![file_child(&filename, r.file_size(), actual)],
                        virtual_size: r.virtual_size(),
                        filename,
                        format: "raw",
                        actual_size: actual,
                        dirty_flag: false,
                    }))
                }
            })
            .collect()
    }
}
