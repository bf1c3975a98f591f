//! The internal snapshot table (qcow2.rst, "Snapshots").

use crate::error::{Error, Result};
use crate::header::MAX_L1_BYTES;
use crate::image::{Qcow2, Within};
use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::types::HostOffset;

/// qemu's cap on the extra data of one snapshot table entry.
pub const MAX_EXTRA_DATA: u32 = 1024;
/// qemu's cap on the whole snapshot table.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;

/// The fixed 40 bytes of a snapshot table entry, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RawSnapshotHeader {
    /// Bytes 0-7: offset of the snapshot's L1 table.
    pub l1_table_offset: U64,
    /// Bytes 8-11: entries in that L1 table.
    pub l1_size: U32,
    /// Bytes 12-13: length of the unique ID string.
    pub id_str_size: U16,
    /// Bytes 14-15: length of the name.
    pub name_size: U16,
    /// Bytes 16-19: seconds since the Epoch.
    pub date_sec: U32,
    /// Bytes 20-23: subsecond nanoseconds.
    pub date_nsec: U32,
    /// Bytes 24-31: guest run time in nanoseconds.
    pub vm_clock_nsec: U64,
    /// Bytes 32-35: VM state size (superseded by extra data bytes 0-7).
    pub vm_state_size: U32,
    /// Bytes 36-39: size of the extra data.
    pub extra_data_size: U32,
}

// qcow2.rst, "Snapshot table entry": extra data starts at byte 40.
const _: () = assert!(size_of::<RawSnapshotHeader>() == 40);

/// The extra data qemu knows, as stored: the first 24 bytes at most.
#[derive(Debug, Clone, Copy, FromBytes, Immutable, KnownLayout)]
#[repr(C)]
struct RawSnapshotExtra {
    /// Bytes 0-7: VM state size.
    vm_state_size_large: U64,
    /// Bytes 8-15: virtual disk size at the snapshot.
    disk_size: U64,
    /// Bytes 16-23: record/replay instruction count, -1 for none.
    icount: U64,
}

const _: () = assert!(size_of::<RawSnapshotExtra>() == 24);

impl RawSnapshotHeader {
    /// Size of the fixed part.
    pub const LEN: usize = size_of::<Self>();

    /// Decodes the fixed part from the start of `b`; `None` when `b` is
    /// shorter than 40 bytes.
    pub fn decode(b: &[u8]) -> Option<Self> {
        Self::read_from_prefix(b).ok().map(|(h, _)| h)
    }
}

/// A validated snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table (cluster aligned, inside the file).
    pub l1_table_offset: HostOffset,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Seconds since the Epoch.
    pub date_sec: u32,
    /// Nanoseconds.
    pub date_nsec: u32,
    /// Guest run time in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Virtual disk size at the snapshot, when recorded.
    pub disk_size: Option<u64>,
    /// Record/replay instruction count, when recorded (and not -1).
    pub icount: Option<u64>,
    /// Bytes of extra data.
    pub extra_data_size: u32,
    /// Offset of this entry in the file.
    pub entry_offset: HostOffset,
    /// Length of this entry in bytes; the next one starts at the next
    /// multiple of 8.
    pub entry_len: u64,
}

fn bad(index: u32, offset: u64, problem: &'static str) -> Error {
    Error::BadSnapshot {
        index,
        offset,
        problem,
    }
}

impl Snapshot {
    /// Parses one entry from `b` (its whole bytes, or more). No I/O.
    ///
    /// Where the snapshot's L1 table lies is not checked here: qemu checks
    /// it only where it uses the table (`qemu-img check` reports a
    /// misplaced one as a corruption; see [`Snapshot::l1_problem`]).
    pub fn parse(b: &[u8], index: u32, offset: u64) -> Result<Self> {
        let Some(raw) = RawSnapshotHeader::decode(b) else {
            return Err(bad(index, offset, "truncated entry"));
        };
        let extra_data_size = raw.extra_data_size.get();
        if extra_data_size > MAX_EXTRA_DATA {
            return Err(bad(index, offset, "extra data larger than 1024 bytes"));
        }
        let extra_at = RawSnapshotHeader::LEN;
        let id_at = extra_at + extra_data_size as usize;
        let name_at = id_at + usize::from(raw.id_str_size.get());
        let end = name_at + usize::from(raw.name_size.get());
        if end > b.len() {
            return Err(bad(index, offset, "truncated entry"));
        }
        // The known fields of a shorter extra data read as absent.
        let known = (extra_data_size as usize).min(size_of::<RawSnapshotExtra>());
        let mut extra = [0u8; size_of::<RawSnapshotExtra>()];
        extra[..known].copy_from_slice(&b[extra_at..extra_at + known]);
        let extra: RawSnapshotExtra = zerocopy::transmute!(extra);
        let vm_state_size = if known >= 8 {
            extra.vm_state_size_large.get()
        } else {
            raw.vm_state_size.get().into()
        };
        let disk_size = (known >= 16).then(|| extra.disk_size.get());
        let icount = (known >= 24)
            .then(|| extra.icount.get())
            .filter(|&v| v != u64::MAX);
        let text = |s: &[u8]| String::from_utf8_lossy(s).into_owned();
        Ok(Snapshot {
            l1_table_offset: HostOffset(raw.l1_table_offset.get()),
            l1_size: raw.l1_size.get(),
            id: text(&b[id_at..name_at]),
            name: text(&b[name_at..end]),
            date_sec: raw.date_sec.get(),
            date_nsec: raw.date_nsec.get(),
            vm_clock_nsec: raw.vm_clock_nsec.get(),
            vm_state_size,
            disk_size,
            icount,
            extra_data_size,
            entry_offset: HostOffset(offset),
            entry_len: end as u64,
        })
    }

    /// What is wrong with where the snapshot's L1 table lies, in the words
    /// of `qemu-img check` (qemu's `calculate_refcounts`), if anything.
    pub fn l1_problem(&self, cluster_bits: u32) -> Option<String> {
        let (id, name) = (&self.id, &self.name);
        if !self.l1_table_offset.0.is_multiple_of(1 << cluster_bits) {
            Some(format!(
                "snapshot {id} ({name}) l1_offset={:#x}: L1 table is not cluster aligned; \
                 snapshot table entry corrupted",
                self.l1_table_offset.0
            ))
        } else if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            Some(format!(
                "snapshot {id} ({name}) l1_size={:#x}: L1 table is too large; \
                 snapshot table entry corrupted",
                self.l1_size
            ))
        } else {
            None
        }
    }
}

impl Qcow2 {
    /// The internal snapshots, read entry by entry from the snapshot table.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        self.read_snapshots(Within::File)
    }

    /// The snapshot table as `qemu-img check` reads it: bytes past the end
    /// of the file read as zeros.
    pub(crate) fn snapshots_for_check(&self) -> Result<Vec<Snapshot>> {
        self.read_snapshots(Within::ZeroFill)
    }

    fn read_snapshots(&self, within: Within) -> Result<Vec<Snapshot>> {
        let h = self.header();
        let mut out = Vec::new();
        let mut off = h.snapshots_offset.0;
        // Longest possible entry: fixed part, extra data, two u16 strings.
        let max_entry = RawSnapshotHeader::LEN + MAX_EXTRA_DATA as usize + 2 * 65535 + 8;
        let mut buf = Vec::new();
        let read = |buf: &mut [u8], at: u64| self.host().pread(within, buf, at, "snapshot table");
        for i in 0..h.nb_snapshots {
            if off - h.snapshots_offset.0 > MAX_TABLE_BYTES {
                return Err(bad(i, off, "snapshot table larger than 64 MiB"));
            }
            let mut fixed = [0u8; RawSnapshotHeader::LEN];
            read(&mut fixed, off)?;
            let raw: RawSnapshotHeader = zerocopy::transmute!(fixed);
            let len = (RawSnapshotHeader::LEN
                + raw.extra_data_size.get().min(MAX_EXTRA_DATA + 1) as usize
                + usize::from(raw.id_str_size.get())
                + usize::from(raw.name_size.get()))
            .min(max_entry);
            buf.resize(len, 0);
            read(&mut buf, off)?;
            let s = Snapshot::parse(&buf, i, off)?;
            off = (off + s.entry_len).next_multiple_of(8);
            out.push(s);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misplaced_l1_table_is_the_checks_business() {
        let mut b = [0u8; 40];
        b[..8].copy_from_slice(&0x6_0200u64.to_be_bytes()); // l1_table_offset
        let s = Snapshot::parse(&b, 0, 0).unwrap();
        assert_eq!(
            s.l1_problem(16).unwrap(),
            "snapshot  () l1_offset=0x60200: L1 table is not cluster aligned; \
             snapshot table entry corrupted"
        );
        b[..8].copy_from_slice(&0x6_0000u64.to_be_bytes());
        b[8..12].copy_from_slice(&(4u32 << 20 | 1).to_be_bytes()); // l1_size
        let s = Snapshot::parse(&b, 0, 0).unwrap();
        assert_eq!(
            s.l1_problem(16).unwrap(),
            "snapshot  () l1_size=0x400001: L1 table is too large; snapshot table entry corrupted"
        );
    }

    #[test]
    fn parses_an_entry_with_extra_data() {
        let mut b = vec![
            0, 0, 0, 0, 0, 6, 0, 0, // l1_table_offset 0x60000
            0, 0, 0, 1, // l1_size 1
            0, 1, // id_str_size
            0, 2, // name_size
            0x6a, 0, 0, 0, // date_sec
            0, 0, 0, 5, // date_nsec
            0, 0, 0, 0, 0, 0, 0, 9, // vm_clock_nsec
            0, 0, 0, 0, // vm_state_size (32-bit)
            0, 0, 0, 24, // extra_data_size
            0, 0, 0, 0, 0, 0, 0, 0, // extra: vm_state_size (64-bit)
            0, 0, 0, 0, 0, 0x10, 0, 0, // extra: disk size 1 MiB
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // extra: icount -1
            b'1', b's', b'n', // id "1", name "sn"
        ];
        b.resize(72, 0);
        let s = Snapshot::parse(&b, 0, 0x1000).unwrap();
        assert_eq!(s.id, "1");
        assert_eq!(s.name, "sn");
        assert_eq!(s.disk_size, Some(1 << 20));
        assert_eq!(s.icount, None);
        assert_eq!(s.entry_len, 67);
        assert_eq!(s.l1_problem(16), None);
        assert!(Snapshot::parse(&b[..60], 0, 0x1000).is_err());
    }
}
