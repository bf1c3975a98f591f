//! The allocation bitmap: one bit per guest cluster with host data in
//! this image, what `qemu-img check` counts as allocated.

use crate::error::{Error, Result};
use crate::image::{Qcow2, Within};

impl Qcow2 {
    /// Streams the allocation bitmap of this image to `out`: one bit per
    /// guest cluster, bit `i % 8` of byte `i / 8` set when cluster `i` has
    /// a host cluster here (standard, compressed or preallocated zero; see
    /// [`crate::L2Mapping::has_host_data`]). Returns the number of such clusters,
    /// which equals `qemu-img check`'s allocated clusters. Memory is one
    /// L2 table, however big the disk.
    pub fn write_allocation_bitmap(&self, out: &mut dyn std::io::Write) -> Result<u64> {
        let h = &self.header;
        let clusters = h.size.div_ceil(h.cluster_size());
        // A power of two, at least 32: each L2 table covers whole bytes
        // of the bitmap.
        let per_l2 = h.l2_entries();
        let es = h.l2_entry_size() as usize;
        let mut count = 0;
        // Each table is read once, in order: the shared L2 cache would
        // only evict what other readers use.
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
                self.host.pread(Within::File, &mut table, o.0, "L2 table")?;
                // An all-zero entry is unallocated and breaks no rule: a
                // sparse table's all-zero groups of eight are not decoded.
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
            out.write_all(&bytes).map_err(|source| Error::Write {
                what: "allocation bitmap",
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
