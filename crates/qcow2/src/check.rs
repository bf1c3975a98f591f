//! A consistency check like `qemu-img check` (qemu's
//! block/qcow2-refcount.c, `qcow2_check_refcounts`): rebuild reference
//! counts from every structure, then compare them with the refcounts
//! stored in the image.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use serde::Serialize;

use crate::bitmap::{BitmapTableEntry, parse_directory};
use crate::entry::{L1Entry, L2Entry, RefcountTableEntry};
use crate::error::{Error, Result};
use crate::image::{HostFile, Qcow2, Within, pread_zero_fill};
use crate::open::{FileRole, OpenOptions};
use crate::snapshot::Snapshot;
use crate::types::HostCluster;
use crate::types::be64;

/// Most messages a [`CheckResult`] keeps; past it they are counted in
/// one last message. A hostile image can make billions of findings.
pub const MAX_MESSAGES: usize = 10_000;

/// Table entries a check walks at most: 2^20, plus one per two bytes of
/// the file. Every walk of a real image fits: the active tables, the
/// distinct snapshot L1 tables and each distinct L2 table (walked once
/// for the active table and once for all snapshots) are inside the file,
/// 8 bytes an entry. Only tables referenced over and over, which qemu-img
/// would walk again for each reference, go past it.
fn max_check_entries(file_size: u64) -> u64 {
    (1 << 20) + file_size / 2
}

/// What `qemu-img check --output=json` prints; counters that are zero
/// are left out, as qemu-img does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckResult {
    /// One past the last cluster with a refcount or a reference.
    #[serde(skip_serializing_if = "is_zero")]
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk.
    #[serde(skip_serializing_if = "is_zero")]
    pub total_clusters: u64,
    /// Errors that kept the check from looking at something.
    pub check_errors: u64,
    /// Guest clusters with a host cluster (standard, preallocated zero,
    /// compressed) in the active L1 table.
    #[serde(skip_serializing_if = "is_zero")]
    pub allocated_clusters: u64,
    /// The image file name as given.
    pub filename: String,
    /// `qcow2`.
    pub format: &'static str,
    /// Allocated clusters not contiguous with their predecessor in the
    /// same L2 table, plus every compressed cluster.
    #[serde(skip_serializing_if = "is_zero")]
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    #[serde(skip_serializing_if = "is_zero")]
    pub compressed_clusters: u64,
    /// Clusters whose refcount is above their references.
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    /// Corruptions: references outside the file, refcounts below
    /// references, invalid entries.
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    /// One line per finding, in the words of qemu-img's messages.
    #[serde(skip)]
    pub messages: Vec<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl CheckResult {
    /// `qemu-img check`'s exit status: 0 clean, 2 corruptions, 3 leaks
    /// only, 1 when the check could not look at everything.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

/// Reference counts rebuilt from the metadata: two bytes per cluster of
/// the file, with the rare counts above 65534 kept aside.
#[derive(Debug)]
struct Counts {
    small: Vec<u16>,
    big: HashMap<u64, u64>,
}

impl Counts {
    fn get(&self, i: u64) -> u64 {
        match self.small.get(i as usize) {
            Some(&u16::MAX) => self.big[&i],
            Some(&v) => v.into(),
            None => 0,
        }
    }

    fn set(&mut self, i: u64, v: u64) {
        if i as usize >= self.small.len() {
            self.small.resize(i as usize + 1, 0);
        }
        if v >= u64::from(u16::MAX) {
            self.small[i as usize] = u16::MAX;
            self.big.insert(i, v);
        } else {
            self.small[i as usize] = v as u16;
            self.big.remove(&i);
        }
    }
}

struct Checker<'a> {
    q: &'a Qcow2,
    res: CheckResult,
    counts: Counts,
    file_len: u64,
    cluster_size: u64,
    refcount_max: u64,
    /// How many references the table being walked stands for: snapshot
    /// tables referenced more than once are walked once.
    times: u64,
    /// Table entries left to walk (see [`max_check_entries`]).
    budget: u64,
    /// The budget ran out.
    gave_up: bool,
    /// Messages past [`MAX_MESSAGES`].
    dropped: u64,
}

impl Checker<'_> {
    /// A corruption; the message is made only while there is room for
    /// it (a hostile image makes millions).
    fn corrupt(&mut self, msg: impl FnOnce() -> String) {
        self.res.corruptions += self.times;
        self.message(msg);
    }

    fn message(&mut self, msg: impl FnOnce() -> String) {
        if self.res.messages.len() < MAX_MESSAGES {
            self.res.messages.push(msg());
        } else {
            self.dropped += 1;
        }
    }

    /// Takes `n` entries from the walk budget; false when it is spent,
    /// which is a check error (reported once, past the message cap).
    fn spend(&mut self, n: u64) -> bool {
        if n <= self.budget {
            self.budget -= n;
            return true;
        }
        if !self.gave_up {
            self.gave_up = true;
            self.res.check_errors += 1;
            self.res.messages.push(format!(
                "ERROR: stopped counting references after {} table entries: \
                 tables are referenced over and over",
                max_check_entries(self.q.file_size())
            ));
        }
        false
    }

    /// qemu's `qcow2_inc_refcounts_imrt`.
    fn inc(&mut self, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        // The last cluster may be partly allocated; a reference a whole
        // cluster or more past the end is a corruption.
        if (offset as i128) + (size as i128) - (self.file_len as i128) >= self.cluster_size as i128
        {
            self.corrupt(|| {
                format!(
                    "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {size:#x}"
                )
            });
            return;
        }
        let first = offset / self.cluster_size;
        let last = (offset + size - 1) / self.cluster_size;
        for k in first..=last {
            let c = self.counts.get(k);
            // `times` references at once: qemu reports each one that
            // finds the count at its maximum.
            let room = self.refcount_max - c;
            if self.times > room {
                self.counts.set(k, self.refcount_max);
                self.res.corruptions += self.times - room;
                let at = k * self.cluster_size;
                self.message(|| format!("ERROR: overflow cluster offset={:#x}", at));
                continue;
            }
            self.counts.set(k, c + self.times);
        }
    }

    fn read(&mut self, offset: u64, len: u64, what: &'static str) -> Option<Vec<u8>> {
        let mut buf = vec![0; len as usize];
        match pread_zero_fill(self.q.file(), &mut buf, offset, what) {
            Ok(()) => Some(buf),
            Err(e) => {
                self.res.check_errors += 1;
                self.message(|| format!("ERROR: {e}"));
                None
            }
        }
    }

    /// qemu's `check_refcounts_l1`. `l1_bytes` is bounded by 32 MiB.
    /// The L2 tables of a snapshot table are not walked here but counted
    /// in `snapshot_l2`, to be walked once each.
    fn l1(&mut self, offset: u64, entries: u64, mut snapshot_l2: Option<&mut BTreeMap<u64, u64>>) {
        let bytes = entries * 8;
        self.inc(offset, bytes);
        if bytes == 0 || !self.spend(entries) {
            return;
        }
        let Some(table) = self.read(offset, bytes, "L1 table") else {
            return;
        };
        for c in table.chunks_exact(8) {
            let e = be64(c, 0);
            if e == 0 {
                continue;
            }
            if e & L1Entry::RESERVED_MASK != 0 {
                self.corrupt(|| format!("ERROR found L1 entry with reserved bits set: {e:x}"));
            }
            let l2 = e & L1Entry::OFFSET_MASK;
            self.inc(l2, self.cluster_size);
            if !l2.is_multiple_of(self.cluster_size) {
                self.corrupt(|| {
                    format!(
                        "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                    )
                });
            }
            match snapshot_l2.as_deref_mut() {
                Some(m) => *m.entry(l2).or_default() += self.times,
                None => self.l2(l2, true),
            }
        }
    }

    /// qemu's `check_refcounts_l2`.
    fn l2(&mut self, offset: u64, active: bool) {
        let q = self.q;
        let h = q.header();
        if !self.spend(h.l2_entries()) {
            return;
        }
        let Some(table) = self.read(offset, self.cluster_size, "L2 table") else {
            return;
        };
        let es = h.l2_entry_size() as usize;
        let extended = h.extended_l2();
        let data_file = h.has_data_file();
        let x = L2Entry::compressed_shift(h.cluster_bits);
        let mut next_contiguous = 0u64;
        for (i, c) in table.chunks_exact(es).enumerate() {
            let mut e = be64(c, 0);
            let bitmap = if extended { be64(c, 8) } else { 0 };
            let compressed = e & L2Entry::COMPRESSED != 0;
            if !compressed && e & L2Entry::RESERVED_MASK != 0 {
                self.corrupt(|| format!("ERROR found l2 entry with reserved bits set: {e:x}"));
            }
            let off = e & L2Entry::OFFSET_MASK;
            if compressed {
                if e & L2Entry::COPIED != 0 {
                    self.corrupt(|| format!(
                        "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                        e & ((1 << x) - 1)
                    ));
                    e &= !L2Entry::COPIED;
                }
                if data_file {
                    self.corrupt(|| {
                        format!("ERROR compressed cluster {i} with data file, entry={e:#x}")
                    });
                    continue;
                }
                if bitmap != 0 {
                    self.corrupt(|| format!(
                        "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry={e:#x}"
                    ));
                    continue;
                }
                let coffset = e & ((1 << x) - 1);
                let sectors = ((e >> x) & ((1 << (h.cluster_bits - 8)) - 1)) + 1;
                self.inc(coffset, sectors * 512 - (coffset & 511));
                if active {
                    self.res.allocated_clusters += 1;
                    self.res.compressed_clusters += 1;
                    self.res.fragmented_clusters += 1;
                }
                continue;
            }
            // qemu's qcow2_get_cluster_type.
            let zero = e & L2Entry::ZERO != 0 && !extended;
            let allocated = off != 0 || (data_file && e & L2Entry::COPIED != 0);
            if zero && !allocated {
                continue; // ZERO_PLAIN
            }
            if !allocated {
                if bitmap & 0xffff_ffff != 0 {
                    self.corrupt(|| {
                        "ERROR: Unallocated cluster has non-zero subcluster allocation bitmap"
                            .into()
                    });
                }
                continue;
            }
            // NORMAL or ZERO_ALLOC.
            if (bitmap >> 32) & bitmap != 0 {
                self.corrupt(|| format!(
                    "ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                ));
            }
            if !off.is_multiple_of(self.cluster_size) {
                self.corrupt(|| {
                    format!(
                        "ERROR offset={off:x}: cluster is not properly aligned; L2 entry corrupted."
                    )
                });
            }
            if active {
                self.res.allocated_clusters += 1;
                if next_contiguous != 0 && off != next_contiguous {
                    self.res.fragmented_clusters += 1;
                }
                next_contiguous = off + self.cluster_size;
            }
            if !data_file {
                self.inc(off, self.cluster_size);
            }
        }
    }

    /// The bitmap directory, tables and data clusters
    /// (`qcow2_check_bitmaps_refcounts`). A directory or bitmap table
    /// that does not load stops the check, as it stops qemu's ("Check
    /// failed"); a table past the end of the file reads as zeros.
    fn bitmaps(&mut self) -> Result<()> {
        let q = self.q;
        let h = q.header();
        let Some(ext) = h.bitmaps.filter(|b| b.consistent) else {
            return Ok(());
        };
        self.inc(ext.directory_offset.0, ext.directory_size);
        // At most 64 MiB (Header::parse).
        let mut dir = vec![0; ext.directory_size as usize];
        pread_zero_fill(
            q.file(),
            &mut dir,
            ext.directory_offset.0,
            "bitmap directory",
        )?;
        let list = parse_directory(&dir, ext.nb_bitmaps, h.cluster_bits, h.size)?;
        for b in list {
            // At most 64 MiB (parse_directory).
            let bytes = u64::from(b.table_size) * 8;
            self.inc(b.table_offset.0, bytes);
            let mut table = vec![0; bytes as usize];
            pread_zero_fill(q.file(), &mut table, b.table_offset.0, "bitmap table")?;
            for c in table.chunks_exact(8) {
                let e = BitmapTableEntry(be64(c, 0));
                let cluster = e
                    .decode(h.cluster_bits)
                    .map_err(|problem| Error::BadBitmap {
                        name: b.name.clone(),
                        problem,
                        value: e.0,
                    })?;
                if let crate::bitmap::BitmapCluster::Stored(o) = cluster {
                    self.inc(o.0, self.cluster_size);
                }
            }
        }
        Ok(())
    }

    /// The snapshots' L1 tables, walked once per distinct table (see
    /// `check`), and the snapshot table itself (qemu's
    /// `calculate_refcounts` and `qcow2_check_read_snapshot_table`).
    fn snapshots(&mut self, snapshots: &[Snapshot]) {
        let h = self.q.header();
        if h.has_data_file() && !snapshots.is_empty() {
            self.corrupt(|| {
                format!(
                    "ERROR {} snapshots in image with data file",
                    snapshots.len()
                )
            });
        }
        // Version 3 entries carry at least the 64-bit VM state size and
        // the disk size.
        if h.version >= 3 {
            for (i, s) in snapshots.iter().enumerate() {
                if s.extra_data_size < 16 {
                    self.corrupt(|| format!("ERROR snapshot table entry {i} is incomplete"));
                }
            }
        }
        // qemu walks each snapshot's tables anew; a table shared by many is
        // walked once here, its references counted as often (same counts).
        let mut l1s: BTreeMap<(u64, u64), u64> = BTreeMap::new();
        for s in snapshots {
            if let Some(problem) = s.l1_problem(h.cluster_bits) {
                self.corrupt(|| format!("ERROR {problem}"));
                continue;
            }
            *l1s.entry((s.l1_table_offset.0, s.l1_size.into()))
                .or_default() += 1;
        }
        let mut l2s = BTreeMap::new();
        for ((offset, entries), times) in l1s {
            self.times = times;
            self.l1(offset, entries, Some(&mut l2s));
        }
        for (offset, times) in l2s {
            self.times = times;
            self.l2(offset, false);
        }
        self.times = 1;
        // Entries are padded to 8 bytes between them, not after the last.
        let table_len = snapshots
            .last()
            .map_or(0, |s| s.entry_offset.0 + s.entry_len - h.snapshots_offset.0);
        self.inc(h.snapshots_offset.0, table_len);
    }

    /// qemu's `check_refblocks`.
    fn refblocks(&mut self, nb_clusters: u64) {
        let h = self.q.header();
        let table_offset = h.refcount_table_offset.0;
        for (i, e) in self.q.refcount_table().iter().enumerate() {
            match e.validate(h.cluster_bits) {
                Ok(()) => {}
                Err(RefcountTableEntry::RESERVED_BITS_SET) => {
                    self.corrupt(|| {
                        format!("ERROR refcount table entry {i} has reserved bits set")
                    });
                    continue;
                }
                Err(_) => {
                    self.corrupt(|| format!(
                        "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                    ));
                    continue;
                }
            }
            let Some(block) = e.block_offset() else {
                continue;
            };
            let cluster = HostCluster::containing(block, h.cluster_bits);
            if cluster.0 >= nb_clusters {
                self.corrupt(|| {
                    format!(
                        "ERROR refcount block {i} is outside image (table at {table_offset:#x})"
                    )
                });
                continue;
            }
            self.inc(block.0, self.cluster_size);
            let c = self.counts.get(cluster.0);
            if c != 1 {
                self.corrupt(|| format!("ERROR refcount block {i} refcount={c}"));
            }
        }
    }

    /// The refcount stored in the image for every cluster of the file,
    /// as qemu's `qcow2_get_refcount` reads it, against the count.
    fn compare(&mut self, nb_clusters: u64) -> u64 {
        let mut highest = 0;
        for i in 0..nb_clusters {
            let Ok(stored) = self.stored_refcount(i) else {
                self.res.check_errors += 1;
                self.message(|| format!("Can't get refcount for cluster {i}: Input/output error"));
                continue;
            };
            let counted = self.counts.get(i);
            if stored > 0 || counted > 0 {
                highest = i;
            }
            if stored != counted {
                let word = if stored < counted { "ERROR" } else { "Leaked" };
                self.message(|| {
                    format!("{word} cluster {i} refcount={stored} reference={counted}")
                });
                if stored < counted {
                    self.res.corruptions += 1;
                } else {
                    self.res.leaks += 1;
                }
            }
        }
        highest
    }

    /// qemu's `check_oflag_copied` on the active tables.
    fn oflag_copied(&mut self) {
        let q = self.q;
        let h = q.header();
        if !self.spend(h.l1_size.into()) {
            return;
        }
        let Some(l1) = self.read(h.l1_table_offset.0, u64::from(h.l1_size) * 8, "L1 table") else {
            return;
        };
        let es = h.l2_entry_size() as usize;
        for (i, c) in l1.chunks_exact(8).enumerate() {
            let e = be64(c, 0);
            let l2 = e & L1Entry::OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let Ok(rc) = self.stored_refcount(l2 / self.cluster_size) else {
                continue;
            };
            if (rc == 1) != (e & L1Entry::COPIED != 0) {
                self.corrupt(|| {
                    format!(
                        "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                    )
                });
            }
            if !self.spend(h.l2_entries()) {
                return;
            }
            let Some(t) = self.read(l2, self.cluster_size, "L2 table") else {
                return;
            };
            for c in t.chunks_exact(es) {
                let e = be64(c, 0);
                if e & L2Entry::COMPRESSED != 0 {
                    continue;
                }
                let off = e & L2Entry::OFFSET_MASK;
                let allocated = off != 0 || (h.has_data_file() && e & L2Entry::COPIED != 0);
                if !allocated {
                    continue;
                }
                let rc = if h.has_data_file() {
                    1
                } else {
                    match self.stored_refcount(off / self.cluster_size) {
                        Ok(rc) => rc,
                        Err(_) => continue,
                    }
                };
                if (rc == 1) != (e & L2Entry::COPIED != 0) {
                    self.corrupt(|| {
                        format!("ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}")
                    });
                }
            }
        }
    }

    /// The refcount of host cluster `cluster`; refcount blocks past the
    /// end of the file read as zeros, as qemu reads them.
    fn stored_refcount(&self, cluster: u64) -> Result<u64> {
        self.q.refcount_read(HostCluster(cluster), Within::ZeroFill)
    }
}

impl Qcow2 {
    /// Opens the image at `path` and checks it like `qemu-img check`: the
    /// entry point for damaged images. The active L1 table, the refcount
    /// table, the snapshot table and bitmap tables may lie beyond the end
    /// of the file (they read as zeros, as qemu reads them) and are
    /// reported as corruptions, their clusters as leaks; [`Qcow2::open`]
    /// would refuse such an image. Only a header that does not parse, a
    /// data file that does not open, or a table that stops qemu's check
    /// too is an error. `opts.untrusted` applies to the data file name;
    /// the backing chain is not opened.
    pub fn check_path(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<CheckResult> {
        let path = path.as_ref();
        let check = || {
            let host = opts.open(path, FileRole::Top, None)?;
            Self::from_host(host, opts, 0, Within::ZeroFill)?.check()
        };
        check().map_err(|e| e.in_file(path))
    }

    /// [`Qcow2::check_path`] of the image the caller has open as `file`
    /// (`path` names it and locates its data file; `on_open` is not
    /// called for `file`).
    pub fn check_file(
        file: File,
        path: impl AsRef<Path>,
        opts: &OpenOptions,
    ) -> Result<CheckResult> {
        let path = path.as_ref();
        let check = || {
            let host = HostFile::adopt(file, path)?;
            Self::from_host(host, opts, 0, Within::ZeroFill)?.check()
        };
        check().map_err(|e| e.in_file(path))
    }

    /// Checks the image like `qemu-img check` (without repairing): every
    /// reference from the header, active and snapshot L1/L2 tables,
    /// refcount table and blocks, snapshot table and bitmaps is counted,
    /// then compared with the stored refcounts.
    ///
    /// Memory: two bytes per cluster of the file, plus one table at a
    /// time, plus at most [`MAX_MESSAGES`] messages. Time: at most 2^20
    /// table entries plus one per two bytes of the file; an image whose
    /// tables are referenced over and over (which `qemu-img check` walks
    /// again for each reference) stops there with a check error. The
    /// result's counters match `qemu-img check --output=json`.
    ///
    /// An error is a check that could not run (qemu-img's "Check failed",
    /// exit status 1, no result printed): a snapshot table or bitmap
    /// directory that does not load.
    pub fn check(&self) -> Result<CheckResult> {
        // Read first: a table that does not load stops the check before
        // anything is counted, as qemu reads it before counting.
        let snapshots = self.snapshots_for_check()?;
        let h = self.header();
        let cluster_size = h.cluster_size();
        let file_len = self.file_size().next_multiple_of(512);
        let nb_clusters = file_len.div_ceil(cluster_size);
        let bits = h.refcount_bits();
        let mut c = Checker {
            q: self,
            res: CheckResult {
                filename: self.path().to_string_lossy().into_owned(),
                format: "qcow2",
                total_clusters: h.size.next_multiple_of(512).div_ceil(cluster_size),
                ..CheckResult::default()
            },
            counts: Counts {
                small: vec![0; nb_clusters as usize],
                big: HashMap::new(),
            },
            file_len,
            cluster_size,
            refcount_max: if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            },
            times: 1,
            budget: max_check_entries(self.file_size()),
            gave_up: false,
            dropped: 0,
        };
        // The header cluster.
        c.inc(0, cluster_size);
        c.l1(h.l1_table_offset.0, h.l1_size.into(), None);
        c.snapshots(&snapshots);
        c.inc(h.refcount_table_offset.0, h.refcount_table_bytes());
        c.bitmaps()?;
        let nb = nb_clusters.max(c.counts.small.len() as u64);
        c.refblocks(nb);
        let nb = nb.max(c.counts.small.len() as u64);
        let highest = c.compare(nb);
        c.oflag_copied();
        c.res.image_end_offset = (highest + 1) * cluster_size;
        if c.dropped > 0 {
            let n = c.dropped;
            c.res.messages.push(format!("... and {n} more messages"));
        }
        Ok(c.res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_spill_over_two_bytes() {
        let mut c = Counts {
            small: vec![0; 4],
            big: HashMap::new(),
        };
        c.set(1, 65534);
        assert_eq!(c.get(1), 65534);
        c.set(1, 70000);
        assert_eq!(c.get(1), 70000);
        c.set(1, 3);
        assert_eq!(c.get(1), 3);
        assert_eq!(c.get(100), 0);
        c.set(6, 1);
        assert_eq!(c.get(6), 1);
    }

    #[test]
    fn json_leaves_zero_counters_out() {
        let r = CheckResult {
            filename: "a.qcow2".into(),
            format: "qcow2",
            total_clusters: 16,
            image_end_offset: 0x50000,
            ..CheckResult::default()
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"image-end-offset": 0x50000, "total-clusters": 16,
                "check-errors": 0, "filename": "a.qcow2", "format": "qcow2"})
        );
        assert_eq!(r.exit_code(), 0);
    }
}
