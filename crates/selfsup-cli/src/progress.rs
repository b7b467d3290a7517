//! The training progress bar: the CLI owns the terminal, the trainer reports through
//! [`selfsup_train::Progress`].

use std::io::IsTerminal;

/// An indicatif bar over the run's steps: epoch, position, ETA, last loss.
pub(crate) struct Bar(indicatif::ProgressBar);

impl Bar {
    /// A bar when stderr is a terminal; `None` otherwise (the trainer then logs step lines).
    pub(crate) fn on_terminal() -> Option<Box<dyn selfsup_train::Progress>> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} steps, ETA {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        Some(Box::new(Bar(pb)))
    }
}

impl selfsup_train::Progress for Bar {
    fn start(&mut self, total: u64, done: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
        self.0.reset_eta();
    }
    fn epoch(&mut self, epoch: usize, epochs: usize) {
        self.0.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
    }
    fn step(&mut self, step: u64, loss: f64) {
        self.0.set_position(step);
        self.0.set_message(format!("loss {loss:.4}"));
    }
    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}
