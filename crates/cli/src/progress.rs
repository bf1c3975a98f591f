//! The copy engine's progress, drawn with indicatif on standard error.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sparsekit_copy::Progress;

/// A progress bar in bytes; hidden when not wanted.
#[derive(Debug)]
pub struct Bar(ProgressBar);

impl Bar {
    /// A bar on standard error if `show`, otherwise one that draws nothing.
    pub fn new(show: bool, what: &str) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some(0),
            if show {
                ProgressDrawTarget::stderr()
            } else {
                ProgressDrawTarget::hidden()
            },
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_message(what.to_owned());
        Self(bar)
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
        self.0.set_position(0);
    }

    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}
