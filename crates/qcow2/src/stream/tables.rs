//! Reading the tables of a stream forward: the refcount table and
//! blocks, the L1 table, the L2 tables, each where its referrer says, in
//! host order as they become known.

use std::collections::BTreeMap;
use std::io::Read;

use super::Forward;
use super::error::{Result, StreamError};
use super::pieces::{Piece, map_l2};
use crate::entry::{L1Entry, RefcountTableEntry};
use crate::error::Error;
use crate::header::Header;
use crate::types::be64;

/// Reads every table of the stream in `r`, whose header is read; returns
/// the clusters with host data the L2 tables map, and the host bytes of
/// every structure read, in host order. `cap` bounds the tables and the
/// cluster map ([`super::StreamLimits::max_metadata_bytes`]).
pub(super) fn read<R: Read>(
    r: &mut Forward<R>,
    header: &Header,
    cap: u64,
) -> Result<(Vec<Piece>, Vec<Region>)> {
    let cs = header.cluster_size();
    // No data file: refused in `new`.
    let geometry = header.geometry();
    let mut tables = Tables {
        pending: BTreeMap::new(),
        read: vec![Region {
            start: 0,
            end: cs,
            what: "header",
        }],
    };
    let l1_bytes = u64::from(header.l1_size) * 8;
    let mut announced = header.refcount_table_bytes() + l1_bytes;
    check_cap("tables", announced, cap)?;
    tables.schedule(
        r,
        header.refcount_table_offset.0,
        header.refcount_table_bytes(),
        Meta::RefcountTable,
        ("header", 0),
    )?;
    if header.l1_size > 0 {
        tables.schedule(
            r,
            header.l1_table_offset.0,
            l1_bytes,
            Meta::L1,
            ("header", 0),
        )?;
    }

    let mut pieces: Vec<Piece> = Vec::new();
    let mut buf = Vec::new();
    while let Some((start, p)) = tables.pending.pop_first() {
        if start < r.pos {
            return Err(tables.behind(start, p.end, p.table.name(), p.referrer));
        }
        buf.clear();
        r.skip_to(start)?;
        if r.pos == start {
            r.append(&mut buf, p.end - start)?;
        }
        if r.pos < p.end {
            return Err(StreamError::Truncated {
                what: p.table.name(),
                offset: start,
                region_end: p.end,
                end: r.pos,
            });
        }
        tables.read.push(Region {
            start,
            end: p.end,
            what: p.table.name(),
        });
        match p.table {
            Meta::RefcountTable => {
                for (index, e) in buf.chunks_exact(8).enumerate() {
                    let e = RefcountTableEntry(be64(e, 0));
                    e.validate(header.cluster_bits)
                        .map_err(|problem| StreamError::Entry {
                            source: Error::BadRefcountEntry {
                                table_offset: start,
                                index: index as u64,
                                entry: e.0,
                                problem,
                            },
                        })?;
                    if let Some(block) = e.block_offset() {
                        tables.schedule(
                            r,
                            block.0,
                            cs,
                            Meta::RefcountBlock,
                            ("refcount table", start),
                        )?;
                    }
                }
            }
            Meta::RefcountBlock => {}
            Meta::L1 => {
                for (index, e) in buf.chunks_exact(8).enumerate() {
                    let e = L1Entry(be64(e, 0));
                    e.validate(header.cluster_bits)
                        .map_err(|problem| StreamError::Entry {
                            source: Error::BadL1Entry {
                                table_offset: start,
                                index: index as u64,
                                entry: e.0,
                                problem,
                            },
                        })?;
                    if let Some(l2) = e.l2_offset() {
                        announced += cs;
                        check_cap("tables", announced, cap)?;
                        tables.schedule(
                            r,
                            l2.0,
                            cs,
                            Meta::L2 {
                                l1_index: index as u64,
                            },
                            ("L1 table", start),
                        )?;
                    }
                }
            }
            Meta::L2 { l1_index } => {
                map_l2(header, geometry, &buf, start, l1_index, &mut pieces, cap)?;
            }
        }
    }

    Ok((pieces, tables.read))
}

pub(super) fn check_cap(what: &'static str, bytes: u64, cap: u64) -> Result<()> {
    if bytes > cap {
        return Err(StreamError::TooMuchMetadata { what, bytes, cap });
    }
    Ok(())
}

/// The tables the decoder reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Meta {
    RefcountTable,
    RefcountBlock,
    L1,
    L2 { l1_index: u64 },
}

impl Meta {
    fn name(self) -> &'static str {
        match self {
            Meta::RefcountTable => "refcount table",
            Meta::RefcountBlock => "refcount block",
            Meta::L1 => "L1 table",
            Meta::L2 { .. } => "L2 table",
        }
    }
}

/// A table known but not read yet.
#[derive(Debug)]
struct PendingTable {
    end: u64,
    table: Meta,
    referrer: (&'static str, u64),
}

/// Host bytes of a structure already read.
#[derive(Debug, Clone, Copy)]
pub(super) struct Region {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) what: &'static str,
}

#[derive(Debug)]
struct Tables {
    /// Tables to read, by host offset.
    pending: BTreeMap<u64, PendingTable>,
    /// Structures read, in host order (each starts at or after the end of
    /// the one before).
    read: Vec<Region>,
}

impl Tables {
    /// Adds a table to read; refuses one the stream has already passed
    /// or one that starts where another does.
    fn schedule<R>(
        &mut self,
        r: &Forward<R>,
        start: u64,
        len: u64,
        table: Meta,
        referrer: (&'static str, u64),
    ) -> Result<()> {
        let end = start.saturating_add(len);
        if start < r.pos {
            return Err(self.behind(start, end, table.name(), referrer));
        }
        if let Some(other) = self.pending.get(&start) {
            return Err(StreamError::Overlap {
                what: table.name(),
                offset: start,
                other: other.table.name(),
                other_offset: start,
            });
        }
        self.pending.insert(
            start,
            PendingTable {
                end,
                table,
                referrer,
            },
        );
        Ok(())
    }

    /// The error for a table at `start..end` the stream has passed: it
    /// overlaps a structure read, or lies behind its referrer.
    fn behind(
        &self,
        start: u64,
        end: u64,
        what: &'static str,
        (referrer, referrer_offset): (&'static str, u64),
    ) -> StreamError {
        if let Some(other) = self.overlapping(start, end) {
            return StreamError::Overlap {
                what,
                offset: start,
                other: other.what,
                other_offset: other.start,
            };
        }
        StreamError::TableBehind {
            what,
            offset: start,
            referrer,
            referrer_offset,
        }
    }

    /// A structure read that shares bytes with `start..end`.
    fn overlapping(&self, start: u64, end: u64) -> Option<&Region> {
        let i = self.read.partition_point(|r| r.end <= start);
        self.read.get(i).filter(|r| r.start < end)
    }
}

#[cfg(test)]
mod tests {
    use crate::stream::StreamDecoder;
    use crate::stream::tests::stream;

    #[test]
    fn refuses_a_table_inside_the_header_cluster() {
        let mut s = stream(1 << 20, 16, &[(0, 1)]);
        s[48..56].copy_from_slice(&0u64.to_be_bytes()); // refcount table at 0
        let e = StreamDecoder::new(&s[..])
            .unwrap()
            .read_tables()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the refcount table at 0x0 overlaps the header at 0x0"
        );
    }
}
