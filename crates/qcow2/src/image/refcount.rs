//! Refcounts as qemu's `qcow2_get_refcount` reads them, and what they
//! tell about metadata preallocation.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image::{Qcow2, Within, actual_size};
use crate::types::HostCluster;

impl Qcow2 {
    /// qemu's `qcow2_detect_metadata_preallocation`: more clusters have a
    /// refcount than the file has allocated (by 10%, or 2 clusters).
    pub fn metadata_preallocated(&self) -> Result<bool> {
        if let Some(&v) = self.metadata_prealloc.get() {
            return Ok(v);
        }
        let real_clusters = actual_size(&self.host.file)? / self.cluster_size();
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = self.host.size.div_ceil(self.cluster_size());
        let mut count = 0;
        let mut i = 0;
        while i < end_cluster && count < threshold {
            if self.refcount(HostCluster(i))? != 0 {
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

    /// The refcount of host cluster `cluster`, as qemu reads it: 0 when
    /// its refcount block is unallocated or beyond the refcount table; an
    /// error when the block's offset is misaligned or the block lies past
    /// the end of the file. Reserved bits of the table entry are not
    /// looked at (`qemu-img check` reports them).
    pub fn refcount(&self, cluster: HostCluster) -> Result<u64> {
        self.refcount_read(cluster, self.tables)
    }

    /// [`Qcow2::refcount`], reading the refcount block as `within` says:
    /// the check reads blocks past the end of the file as zeros, as qemu.
    pub(crate) fn refcount_read(&self, cluster: HostCluster, within: Within) -> Result<u64> {
        let per_block = self.refcount_block_entries();
        let index = cluster.0 / per_block;
        let Some(&e) = self.refcount_table.get(index as usize) else {
            return Ok(0);
        };
        let block =
            e.block(self.header.cluster_bits)
                .map_err(|problem| Error::BadRefcountEntry {
                    table_offset: self.header.refcount_table_offset.0,
                    index,
                    entry: e.0,
                    problem,
                })?;
        let Some(block) = block else {
            return Ok(0);
        };
        let data = {
            let mut c = self
                .refblock_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match &*c {
                Some((o, d)) if *o == block => d.clone(),
                _ => {
                    let mut buf = vec![0; self.cluster_size() as usize];
                    self.host
                        .pread(within, &mut buf, block.0, "refcount block")?;
                    let d: Arc<[u8]> = buf.into();
                    *c = Some((block, d.clone()));
                    d
                }
            }
        };
        Ok(refcount_in_block(
            &data,
            cluster.0 % per_block,
            self.header.refcount_order,
        ))
    }
}

/// Entry `i` of a refcount block of `1 << order`-bit entries (sub-byte
/// widths count from the least significant bit, qcow2.rst).
fn refcount_in_block(block: &[u8], i: u64, order: u32) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
