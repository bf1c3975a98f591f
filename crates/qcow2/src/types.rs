//! Newtypes for the two kinds of byte offsets a qcow2 image deals with.

use std::fmt;

/// A byte offset into the virtual disk the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte offset into a host file: the qcow2 image file itself, or its
/// external data file for guest data clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

/// A host cluster by its index: a host offset divided by the cluster
/// size. Refcounts are kept per host cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostCluster(pub u64);

impl HostCluster {
    /// The cluster `offset` lies in, with `1 << cluster_bits`-byte clusters.
    pub fn containing(offset: HostOffset, cluster_bits: u32) -> Self {
        HostCluster(offset.0 >> cluster_bits)
    }

    /// Where the cluster starts.
    pub fn offset(self, cluster_bits: u32) -> HostOffset {
        HostOffset(self.0 << cluster_bits)
    }
}

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest {:#x}", self.0)
    }
}

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host {:#x}", self.0)
    }
}

impl fmt::LowerHex for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl fmt::LowerHex for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// Reads a big-endian `u64` at `at`; the caller has checked the length.
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_and_offsets() {
        let c = HostCluster::containing(HostOffset(0x3_0123), 16);
        assert_eq!(c, HostCluster(3));
        assert_eq!(c.offset(16), HostOffset(0x30000));
    }

    #[test]
    fn offsets_print_in_hex() {
        assert_eq!(GuestOffset(0x10000).to_string(), "guest 0x10000");
        assert_eq!(format!("{:#x}", HostOffset(4096)), "0x1000");
    }

    #[test]
    fn big_endian_table_entries() {
        let b = [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3];
        assert_eq!(be64(&b, 0), 0x5146_49fb_0000_0003);
    }
}
