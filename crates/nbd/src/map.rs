//! Block status extents and the views other tools print of them.
//!
//! - [`allocation_kind`]: `base:allocation` flags to the shared
//!   [`Kind`] vocabulary.
//! - [`nbdinfo_map`]: what `nbdinfo --map=CTX --json` prints (libnbd 1.14:
//!   `offset`, `length`, `type`, `description`).
//! - [`qemu_img_map`]: what `qemu-img map --output=json` prints for an NBD
//!   export (`start`, `length`, `depth`, `present`, `zero`, `data`,
//!   `compressed`, `offset`).

use serde::Serialize;
pub use sparsekit_extent::qemu::MapEntry as QemuImgMapEntry;
use sparsekit_extent::qemu::merge_entries;
use sparsekit_extent::{Extent, Kind};

/// `base:allocation` bit 0: the extent is a hole (not allocated).
pub const NBD_STATE_HOLE: u64 = 1 << 0;
/// `base:allocation` bit 1: the extent reads as zeros.
pub const NBD_STATE_ZERO: u64 = 1 << 1;
/// `qemu:dirty-bitmap:*` bit 0: the extent is dirty.
pub const NBD_STATE_DIRTY: u64 = 1 << 0;

/// The allocation context every server should offer.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// qemu's context giving how deep in the backing chain each extent lives.
pub const QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
/// Prefix of qemu's dirty-bitmap contexts; the bitmap name follows.
pub const QEMU_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:";

/// One extent of one metadata context, with the context's raw flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StatusExtent {
    /// First byte.
    pub offset: u64,
    /// Number of bytes, never 0.
    pub length: u64,
    /// Status flags as the server sent them; their meaning depends on the
    /// context.
    pub flags: u64,
}

impl StatusExtent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    /// For a `base:allocation` extent: the shared extent with its [`Kind`]
    /// (see [`allocation_kind`]).
    pub fn to_extent(&self) -> Extent {
        Extent {
            offset: self.offset,
            length: self.length,
            kind: allocation_kind(self.flags),
        }
    }
}

/// The [`Kind`] of a `base:allocation` extent.
///
/// | flags            | kind          | why |
/// |------------------|---------------|-----|
/// | `HOLE \| ZERO`   | [`Kind::Hole`] | unallocated and reads as zeros |
/// | `ZERO`           | [`Kind::Zero`] | allocated (or unknown), reads as zeros |
/// | `0`              | [`Kind::Data`] | allocated, contents unknown |
/// | `HOLE`           | [`Kind::Data`] | unallocated but *not* known to read as zeros |
///
/// The last row is the subtle one: the spec says a region with
/// `NBD_STATE_HOLE` set and `NBD_STATE_ZERO` clear has undefined contents,
/// so a copy must read it; calling it a hole would let a copier skip bytes
/// that may not be zero. (qemu-img map shows it as `present: false,
/// data: false, zero: false`; use the raw flags, not the kind, for that
/// view.) Bits other than 0 and 1 are reserved and ignored.
pub fn allocation_kind(flags: u64) -> Kind {
    match flags & (NBD_STATE_HOLE | NBD_STATE_ZERO) {
        3 => Kind::Hole,
        2 => Kind::Zero,
        _ => Kind::Data,
    }
}

/// The description `nbdinfo --map=CONTEXT` prints for a status value, or
/// `None` where it prints none (libnbd 1.14's rules).
pub fn nbdinfo_description(context: &str, flags: u64) -> Option<String> {
    if context == BASE_ALLOCATION {
        return match flags {
            0 => Some("data".into()),
            1 => Some("hole".into()),
            2 => Some("zero".into()),
            3 => Some("hole,zero".into()),
            _ => None,
        };
    }
    if context.starts_with(QEMU_DIRTY_BITMAP) {
        return match flags {
            0 => Some("clean".into()),
            1 => Some("dirty".into()),
            _ => None,
        };
    }
    if context == QEMU_ALLOCATION_DEPTH {
        return Some(match flags {
            0 => "absent".into(),
            1 => "local".into(),
            n => format!("backing depth {n}"),
        });
    }
    None
}

/// One entry of `nbdinfo --map=CTX --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NbdinfoMapEntry {
    /// First byte.
    pub offset: u64,
    /// Number of bytes.
    pub length: u64,
    /// The raw status value.
    #[serde(rename = "type")]
    pub kind: u64,
    /// The human description; absent for values nbdinfo does not know.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The `nbdinfo --map=CONTEXT --json` view of a map, neighbours with equal
/// type merged.
pub fn nbdinfo_map(
    context: &str,
    extents: impl IntoIterator<Item = StatusExtent>,
) -> Vec<NbdinfoMapEntry> {
    let mut out: Vec<NbdinfoMapEntry> = Vec::new();
    for e in extents {
        if let Some(last) = out.last_mut()
            && last.kind == e.flags
            && last.offset + last.length == e.offset
        {
            last.length += e.length;
            continue;
        }
        out.push(NbdinfoMapEntry {
            offset: e.offset,
            length: e.length,
            kind: e.flags,
            description: nbdinfo_description(context, e.flags),
        });
    }
    out
}

/// What `qemu-img map --output=json` prints for one `base:allocation`
/// extent of an NBD export (learned from qemu 10 against qemu-nbd and
/// nbdkit): `data` is `!HOLE`, `zero` is `ZERO`, `present` is
/// `data || zero`, `depth` 0, and `offset` equals `start` when present.
pub fn qemu_img_map_entry(e: &StatusExtent) -> QemuImgMapEntry {
    let data = e.flags & NBD_STATE_HOLE == 0;
    let zero = e.flags & NBD_STATE_ZERO != 0;
    let present = data || zero;
    QemuImgMapEntry {
        start: e.offset,
        length: e.length,
        depth: 0,
        present,
        zero,
        data,
        compressed: false,
        offset: present.then_some(e.offset),
    }
}

/// The `qemu-img map --output=json` view of a `base:allocation` map,
/// merging neighbours the way qemu-img does: equal flags and, where an
/// offset is printed, contiguous offsets.
pub fn qemu_img_map(extents: impl IntoIterator<Item = StatusExtent>) -> Vec<QemuImgMapEntry> {
    merge_entries(extents.into_iter().map(|e| qemu_img_map_entry(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn se(offset: u64, length: u64, flags: u64) -> StatusExtent {
        StatusExtent {
            offset,
            length,
            flags,
        }
    }

    #[test]
    fn kinds_of_allocation_flags() {
        assert_eq!(allocation_kind(0), Kind::Data);
        assert_eq!(allocation_kind(NBD_STATE_HOLE), Kind::Data);
        assert_eq!(allocation_kind(NBD_STATE_ZERO), Kind::Zero);
        assert_eq!(allocation_kind(NBD_STATE_HOLE | NBD_STATE_ZERO), Kind::Hole);
        // Reserved bits are ignored.
        assert_eq!(allocation_kind(0x7), Kind::Hole);
    }

    #[test]
    fn nbdinfo_descriptions() {
        assert_eq!(
            nbdinfo_description("base:allocation", 3).unwrap(),
            "hole,zero"
        );
        assert_eq!(nbdinfo_description("base:allocation", 0).unwrap(), "data");
        assert_eq!(nbdinfo_description("base:allocation", 4), None);
        assert_eq!(
            nbdinfo_description("qemu:dirty-bitmap:b", 1).unwrap(),
            "dirty"
        );
        assert_eq!(
            nbdinfo_description("qemu:dirty-bitmap:b", 0).unwrap(),
            "clean"
        );
        assert_eq!(
            nbdinfo_description("qemu:allocation-depth", 0).unwrap(),
            "absent"
        );
        assert_eq!(
            nbdinfo_description("qemu:allocation-depth", 1).unwrap(),
            "local"
        );
        assert_eq!(
            nbdinfo_description("qemu:allocation-depth", 3).unwrap(),
            "backing depth 3"
        );
        assert_eq!(nbdinfo_description("x-foo:bar", 0), None);
    }

    #[test]
    fn nbdinfo_json_shape() {
        let m = nbdinfo_map(
            "base:allocation",
            [se(0, 10, 0), se(10, 5, 0), se(15, 5, 3), se(20, 1, 9)],
        );
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(
            j,
            r#"[{"offset":0,"length":15,"type":0,"description":"data"},{"offset":15,"length":5,"type":3,"description":"hole,zero"},{"offset":20,"length":1,"type":9}]"#
        );
    }

    #[test]
    fn qemu_img_view_of_each_flag_value() {
        // Values observed from qemu-img 10 against nbdkit eval extents.
        let m = qemu_img_map([se(0, 4, 1), se(4, 4, 2), se(8, 4, 3), se(12, 4, 0)]);
        let j = serde_json::to_value(&m).unwrap();
        assert_eq!(
            j,
            serde_json::json!([
                {"start": 0, "length": 4, "depth": 0, "present": false, "zero": false, "data": false, "compressed": false},
                {"start": 4, "length": 4, "depth": 0, "present": true, "zero": true, "data": true, "compressed": false, "offset": 4},
                {"start": 8, "length": 4, "depth": 0, "present": true, "zero": true, "data": false, "compressed": false, "offset": 8},
                {"start": 12, "length": 4, "depth": 0, "present": true, "zero": false, "data": true, "compressed": false, "offset": 12},
            ])
        );
        // Neighbours agreeing on every field merge.
        let m = qemu_img_map([se(0, 4, 0), se(4, 4, 0), se(8, 4, 1), se(12, 4, 1)]);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].length, m[1].length), (8, 8));
    }
}
