//! How the engine reports progress: a small trait the binaries adapt.

/// Receives progress from the workers (from several threads at once).
pub trait Progress: Sync {
    /// The copy is about to start; `total` bytes of the source will be
    /// handled.
    fn start(&self, total: u64) {
        let _ = total;
    }
    /// `bytes` more of the source were handled.
    fn advance(&self, bytes: u64);
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn advance(&self, _: u64) {}
}
