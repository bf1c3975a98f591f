//! The compact map of a stream's data: one [`Piece`] per guest cluster
//! with host data, 24 bytes each, checked and sorted in host order.

use super::error::{Result, StreamError};
use super::tables::{Region, check_cap};
use crate::entry::{Geometry, L2Mapping, SubclusterBitmap};
use crate::error::Error;
use crate::header::Header;
use crate::types::{GuestOffset, HostOffset, be64};

/// What a guest cluster with host data holds (not an extent kind: the
/// host cluster's content, as the stream reader needs it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Payload {
    /// Standard cluster; bit `i` set when subcluster `i` holds data (bit
    /// 0 alone without extended L2 entries).
    Data(u32),
    /// Compressed data of this many bytes.
    Compressed(u32),
    /// A host cluster with nothing to read: a preallocated zero cluster,
    /// or one whose subclusters are all zero or unallocated. Only checked
    /// for duplicate references.
    Reserved,
}

/// One guest cluster with host data: the compact map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Piece {
    pub(super) host: HostOffset,
    pub(super) guest: GuestOffset,
    pub(super) payload: Payload,
}

const _: () = assert!(size_of::<Piece>() == 24);

impl Piece {
    /// Host bytes the piece takes.
    fn host_end(&self, cs: u64) -> u64 {
        match self.payload {
            Payload::Compressed(size) => self.host.0 + u64::from(size),
            _ => self.host.0 + cs,
        }
    }
}

/// Adds the clusters with host data of one L2 table to `pieces`.
pub(super) fn map_l2(
    header: &Header,
    geometry: Geometry,
    table: &[u8],
    table_offset: u64,
    l1_index: u64,
    pieces: &mut Vec<Piece>,
    cap: u64,
) -> Result<()> {
    let cs = header.cluster_size();
    let entry_size = header.l2_entry_size() as usize;
    let first_guest = l1_index * header.l1_span();
    for (index, e) in table.chunks_exact(entry_size).enumerate() {
        let guest = first_guest + index as u64 * cs;
        if guest >= header.size {
            // Entries past the end of the disk are never read by qemu.
            break;
        }
        let entry = be64(e, 0);
        let bitmap = if geometry.extended_l2 { be64(e, 8) } else { 0 };
        let mapping =
            L2Mapping::decode(entry, bitmap, geometry).map_err(|problem| StreamError::Entry {
                source: Error::BadL2Entry {
                    table_offset,
                    index: index as u64,
                    entry,
                    problem,
                },
            })?;
        let (host, payload) = match mapping {
            L2Mapping::Unallocated
            | L2Mapping::UnallocatedSubclusters { .. }
            | L2Mapping::Zero { host: None } => continue,
            L2Mapping::Zero { host: Some(h) } => (h, Payload::Reserved),
            L2Mapping::Standard {
                host,
                subclusters: None,
            } => (host, Payload::Data(1)),
            L2Mapping::Standard {
                host,
                subclusters: Some(bm),
            } => {
                // decode() refuses a subcluster both allocated and zero.
                let alloc = (bm.0 & SubclusterBitmap::ALLOC_MASK) as u32;
                (
                    host,
                    if alloc == 0 {
                        Payload::Reserved
                    } else {
                        Payload::Data(alloc)
                    },
                )
            }
            L2Mapping::Compressed { host, size } => {
                // At most 2^(cluster_bits - 8) sectors: 2 * cluster size.
                let size = u32::try_from(size).unwrap_or(u32::MAX);
                (host, Payload::Compressed(size))
            }
        };
        let bytes = (pieces.len() as u64 + 1) * size_of::<Piece>() as u64;
        check_cap("cluster map", bytes, cap)?;
        pieces.push(Piece {
            host,
            guest: GuestOffset(guest),
            payload,
        });
    }
    Ok(())
}

/// Checks the host-sorted map: no host bytes referenced twice, nothing
/// to read before the end of the tables.
fn check_pieces(pieces: &[Piece], tables: &[Region], cs: u64) -> Result<()> {
    let meta_end = tables.last().map_or(0, |r| r.end);
    // The piece reaching furthest so far.
    let mut reach: Option<(u64, &Piece)> = None;
    for p in pieces {
        let (host, guest) = (p.host.0, p.guest.0);
        let end = p.host_end(cs);
        if let Some((q_end, q)) = reach
            && q_end > host
        {
            // qemu packs compressed clusters byte after byte while their
            // descriptors round up to whole sectors: such ranges overlap.
            let packed = matches!(q.payload, Payload::Compressed(_))
                && matches!(p.payload, Payload::Compressed(_))
                && q.host != p.host;
            if !packed {
                return Err(StreamError::DuplicateReference {
                    host,
                    guest,
                    other_guest: q.guest.0,
                });
            }
        }
        if reach.is_none_or(|(q_end, _)| end > q_end) {
            reach = Some((end, p));
        }
        if host < meta_end {
            let i = tables.partition_point(|r| r.end <= host);
            if let Some(t) = tables.get(i) {
                if t.start < end {
                    return Err(StreamError::Overlap {
                        what: "data cluster",
                        offset: host,
                        other: t.what,
                        other_offset: t.start,
                    });
                }
                if !matches!(p.payload, Payload::Reserved) {
                    return Err(StreamError::NotForward {
                        what: t.what,
                        offset: t.start,
                        data: host,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Guest bytes a piece yields.
fn guest_bytes(header: &Header, p: &Piece) -> u64 {
    let cs = header.cluster_size();
    let in_disk = header.size.saturating_sub(p.guest.0);
    match p.payload {
        Payload::Reserved => 0,
        Payload::Compressed(_) => cs.min(in_disk),
        Payload::Data(mask) => {
            let sc = header.subcluster_size();
            (0..header.subclusters())
                .filter(|&i| mask >> i & 1 != 0)
                .map(|i| sc.min(in_disk.saturating_sub(i * sc)))
                .sum()
        }
    }
}

/// Sorts `pieces` in host order, checks them against each other and the
/// tables `read`, and keeps those with data to read; returns them with
/// the guest bytes they yield in all.
pub(super) fn arrange(
    mut pieces: Vec<Piece>,
    read: &[Region],
    header: &Header,
) -> Result<(Vec<Piece>, u64)> {
    pieces.sort_unstable_by_key(|p| (p.host, p.guest));
    check_pieces(&pieces, read, header.cluster_size())?;
    pieces.retain(|p| !matches!(p.payload, Payload::Reserved));
    let data_bytes = pieces.iter().map(|p| guest_bytes(header, p)).sum();
    Ok((pieces, data_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(host: u64, guest: u64, payload: Payload) -> Piece {
        Piece {
            host: HostOffset(host),
            guest: GuestOffset(guest),
            payload,
        }
    }

    #[test]
    fn only_packed_compressed_clusters_may_share_host_bytes() {
        let header = [Region {
            start: 0,
            end: 0x10000,
            what: "header",
        }];
        let cs = 0x10000;
        // Two compressed clusters packed byte after byte: their sector
        // rounded descriptors overlap, which qemu writes.
        let packed = [
            piece(0x20000, 0, Payload::Compressed(1024)),
            piece(0x20300, cs, Payload::Compressed(1024)),
        ];
        assert!(check_pieces(&packed, &header, cs).is_ok());
        let twice = [
            piece(0x20000, 0, Payload::Data(1)),
            piece(0x20000, cs, Payload::Data(1)),
        ];
        assert!(matches!(
            check_pieces(&twice, &header, cs),
            Err(StreamError::DuplicateReference { host: 0x20000, .. })
        ));
        let in_header = [piece(0x8000, 0, Payload::Data(1))];
        assert!(matches!(
            check_pieces(&in_header, &header, cs),
            Err(StreamError::Overlap { .. })
        ));
    }
}
