//! Every `unsafe` block of the binaries: signal handlers.

use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn raise_stop(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::Relaxed);
}

/// Installs handlers so that SIGINT and SIGTERM raise the returned flag
/// instead of killing the process: the copy engine then stops its workers
/// cleanly and says how far it got.
pub fn stop_on_signals() -> std::io::Result<&'static AtomicBool> {
    let action = SigAction::new(
        SigHandler::Handler(raise_stop),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; no other code of this program installs a
        // handler for these signals.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(&STOP)
}
