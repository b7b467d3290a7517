//! Fitting a run's length to a wall-clock budget.
//!
//! A run with `time_budget_s > 0` trains its first epoch under the configured (provisional)
//! length, measures what an epoch and a kNN evaluation cost on this machine, and then fixes
//! the number of epochs once: the most that end, the kNN evaluations due and the final one
//! included, inside the budget less a safety margin ([`BUDGET_MARGIN`]). The cosine schedule
//! and everything after the first epoch use that length; the learning-rate warmup does not
//! depend on it, so when the warmup covers the first epoch (and the method has no
//! length-dependent momentum schedule) the run is step for step the run with `--epochs N`.
//! The fitted length is written to the run's config.toml, so a resumed run keeps it; a
//! resumed run never refits.

/// The share of the budget kept free for a machine that slows down during the run.
pub const BUDGET_MARGIN: f64 = 0.05;

/// What the first epoch measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochCosts {
    /// Seconds of training since the run started, the first epoch, its kNN evaluation and its
    /// checkpoint included.
    pub elapsed_s: f64,
    /// Seconds of one training epoch with its checkpoint.
    pub epoch_s: f64,
    /// Seconds of one kNN evaluation (0 without a kNN monitor).
    pub knn_s: f64,
}

/// The number of epochs (at least `done`, at most `max_epochs`) whose remaining epochs and kNN
/// evaluations (every `knn_every` epochs and after the last one; `knn_every` 0: none) fit in
/// `budget_s` less [`BUDGET_MARGIN`], after `done` epochs that cost `c.elapsed_s`.
pub fn fit_epochs(
    budget_s: f64,
    c: EpochCosts,
    done: usize,
    max_epochs: usize,
    knn_every: usize,
) -> usize {
    let avail = budget_s * (1.0 - BUDGET_MARGIN) - c.elapsed_s;
    let cost = |n: usize| -> f64 {
        // Epochs done+1 ..= n, each with its kNN evaluation where one is due.
        let knns = if knn_every == 0 || n == done {
            0
        } else {
            (done + 1..=n)
                .filter(|e| e % knn_every == 0 || *e == n)
                .count()
        };
        (n - done) as f64 * c.epoch_s + knns as f64 * c.knn_s
    };
    let mut n = done;
    while n < max_epochs && cost(n + 1) <= avail {
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fits_the_epochs_and_their_knn_evaluations_inside_the_budget() {
        let c = EpochCosts {
            elapsed_s: 110.0,
            epoch_s: 100.0,
            knn_s: 30.0,
        };
        // 1000 s less 5% = 950; 840 s left. kNN every 5: epochs 2-8 cost 700 s and two kNN
        // evaluations (after epoch 5 and the last) 60 s: 760 s; nine epochs would cost 860 s.
        assert_eq!(fit_epochs(1000.0, c, 1, 100, 5), 8);
        // No monitor: 8 more epochs fit in 840 s.
        assert_eq!(fit_epochs(1000.0, c, 1, 100, 0), 9);
        // The configured epochs cap the fit; a budget already spent leaves the epoch done.
        assert_eq!(fit_epochs(1000.0, c, 1, 4, 5), 4);
        assert_eq!(fit_epochs(100.0, c, 1, 100, 5), 1);
    }
}
