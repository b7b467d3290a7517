//! Fitting a run's length to a wall-clock budget.
//!
//! A run with `time_budget_s > 0` trains its first epoch under the configured (provisional)
//! length, measures what an epoch and a kNN evaluation cost on this machine, and fixes the
//! number of epochs: the most that end, the kNN evaluations due and the final one included,
//! inside the budget less a safety margin ([`BUDGET_MARGIN`]). After every later epoch it
//! refits from the costs so far ([`refit_epochs`]; an epoch's cost is the larger of the mean
//! over all epochs and over the last few, [`epoch_cost`]): the run is shortened as soon as the
//! machine got slower than the length allows, and lengthened (never past the configured
//! epochs) as soon as it got faster (at kNN epochs only before `620a92d`, which left a run
//! whose last stretch sped up 3 minutes of its hour), so that a calibration epoch slower or
//! faster than the run's mean neither wastes the budget nor overruns it. The cosine schedule follows the
//! current length; the learning-rate warmup does not depend on it, so when the warmup covers
//! the first epoch, the method has no length-dependent momentum schedule and no refit changed
//! the length, the run is step for step the run with `--epochs N`. Every length is written to
//! the run's config.toml and metrics.jsonl (`"kind":"budget"`), so a resumed run keeps the
//! last one; a resumed run never refits.

/// The share of the budget kept free for a machine that slows down during the run: 72 s of
/// an hour. The refits after every epoch absorb slow stretches (the recent epochs' cost counts
/// as soon as it exceeds the mean, [`epoch_cost`]), so the margin only has to cover the epochs
/// after the last refit: replayed over the epoch times of the preset's hour runs, and of the
/// quiet one with its epochs 1.2-1.5 times slower from epoch 20, 27 or 33 on, every run ends
/// at least 31 s inside the hour (`tests/budget_replay.rs`). Until `5d41785` it was 5%, and
/// the hour runs left about 2.8 minutes of it unused.
pub const BUDGET_MARGIN: f64 = 0.02;

/// How many of the last epochs [`epoch_cost`] weighs against the mean.
pub const RECENT_EPOCHS: usize = 3;

/// The cost of one more epoch from the training seconds spent by the end of each epoch so far
/// (`ends[k]`: after epoch `k + 1`, cumulative, kNN evaluations excluded): the mean epoch, or
/// the mean of the last [`RECENT_EPOCHS`] where that is larger, so that a machine that slowed
/// down is budgeted at its new speed at once while a faster stretch is not trusted early.
pub fn epoch_cost(ends: &[f64]) -> f64 {
    let Some(&last) = ends.last() else {
        return 0.0;
    };
    let mean = last / ends.len() as f64;
    if ends.len() <= RECENT_EPOCHS {
        return mean;
    }
    let recent = (last - ends[ends.len() - 1 - RECENT_EPOCHS]) / RECENT_EPOCHS as f64;
    mean.max(recent)
}

/// Whether the kNN monitor (every `every` epochs, 0: never) evaluates after `epoch` of a run
/// of `epochs`: after every `every`-th epoch and after the last one, except a periodic
/// evaluation less than half an interval before the last one, which would report nearly the
/// encoder the final evaluation reports and cost as much (a 31-epoch run monitored every 10
/// epochs evaluates after epochs 10, 20 and 31, not 30).
pub fn knn_due(epoch: usize, epochs: usize, every: usize) -> bool {
    every > 0
        && (epoch == epochs || (epoch % every == 0 && 2 * epochs.saturating_sub(epoch) >= every))
}

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
    /// Seconds spent once after the last epoch besides its kNN evaluation: the BatchNorm
    /// recalibration of `bn_recalibrate` (0 without).
    pub final_s: f64,
}

/// The number of epochs (at least `done`, at most `max_epochs`) whose remaining epochs and kNN
/// evaluations (those [`knn_due`]; `knn_every` 0: none) fit in
/// `budget_s` less [`BUDGET_MARGIN`], after `done` epochs that cost `c.elapsed_s`.
pub fn fit_epochs(
    budget_s: f64,
    c: EpochCosts,
    done: usize,
    max_epochs: usize,
    knn_every: usize,
) -> usize {
    fit_with_margin(budget_s, BUDGET_MARGIN, c, done, max_epochs, knn_every)
}

/// The length after epoch `done` of a run fitted to `current` epochs, from the costs so far
/// (`c.epoch_s`: [`epoch_cost`]): shortened as soon as `current` no longer fits the budget less
/// half the margin (to the most that do), lengthened to [`fit_epochs`] where `grow` (the
/// trainer: after every epoch), otherwise `current`. The two thresholds keep noise in the costs from moving the schedule
/// back and forth.
pub fn refit_epochs(
    current: usize,
    budget_s: f64,
    c: EpochCosts,
    done: usize,
    max_epochs: usize,
    knn_every: usize,
    grow: bool,
) -> usize {
    let keep = fit_with_margin(
        budget_s,
        BUDGET_MARGIN / 2.0,
        c,
        done,
        max_epochs,
        knn_every,
    );
    if keep < current {
        return keep;
    }
    let fit = fit_epochs(budget_s, c, done, max_epochs, knn_every);
    if grow && fit > current {
        fit
    } else {
        current
    }
}

fn fit_with_margin(
    budget_s: f64,
    margin: f64,
    c: EpochCosts,
    done: usize,
    max_epochs: usize,
    knn_every: usize,
) -> usize {
    let avail = budget_s * (1.0 - margin) - c.elapsed_s;
    let cost = |n: usize| -> f64 {
        // Epochs done+1 ..= n, each with its kNN evaluation where one is due.
        let knns = (done + 1..=n).filter(|&e| knn_due(e, n, knn_every)).count();
        (n - done) as f64 * c.epoch_s + knns as f64 * c.knn_s + c.final_s
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
            final_s: 0.0,
        };
        // 1000 s less 2% = 980; 870 s left. kNN every 5: epochs 2-8 cost 700 s and two kNN
        // evaluations (after epoch 5 and the last) 60 s: 760 s; nine epochs would cost 860 s,
        // ten 990 s.
        assert_eq!(fit_epochs(1000.0, c, 1, 100, 5), 9);
        // No monitor: 8 more epochs (800 s) fit in 870 s, 9 do not.
        assert_eq!(fit_epochs(1000.0, c, 1, 100, 0), 9);
        // The configured epochs cap the fit; a budget already spent leaves the epoch done.
        assert_eq!(fit_epochs(1000.0, c, 1, 4, 5), 4);
        assert_eq!(fit_epochs(100.0, c, 1, 100, 5), 1);
        // A recalibration after the last epoch: 9 epochs (860 s) and 9 s of it (869 s) fit
        // in 870 s; with 11 s they do not, and the run trains 8.
        let r = |final_s| EpochCosts { final_s, ..c };
        assert_eq!(fit_epochs(1000.0, r(9.0), 1, 100, 5), 9);
        assert_eq!(fit_epochs(1000.0, r(11.0), 1, 100, 5), 8);
    }

    #[test]
    fn the_monitor_skips_a_periodic_evaluation_just_before_the_final_one() {
        let due = |epochs, every| {
            (1..=epochs)
                .filter(|&e| knn_due(e, epochs, every))
                .collect::<Vec<_>>()
        };
        assert_eq!(due(31, 10), [10, 20, 31]);
        assert_eq!(due(35, 10), [10, 20, 30, 35]);
        assert_eq!(due(34, 10), [10, 20, 34]);
        assert_eq!(due(4, 1), [1, 2, 3, 4]);
        assert_eq!(due(5, 2), [2, 4, 5]);
        assert_eq!(due(5, 0), Vec::<usize>::new());
    }

    #[test]
    fn refits_shorten_at_once_and_lengthen_only_when_allowed() {
        // After 10 epochs and 2 kNN evaluations: 1080 s spent, 100 s an epoch, 40 s a kNN.
        let c = EpochCosts {
            elapsed_s: 1080.0,
            epoch_s: 100.0,
            knn_s: 40.0,
            final_s: 0.0,
        };
        // Budget 2900 s: less 2%, 1762 s left: epochs 11-26 (1600 s) and kNN after 15, 20
        // and 26 (120 s; not after 25, half an interval before the last) = 1720 s; 27 epochs
        // would cost 1820 s.
        assert_eq!(fit_epochs(2900.0, c, 10, 100, 5), 26);
        // Less 1%, 1791 s: 27 epochs (1820 s) do not fit either; budget 2940 s less 1% leaves
        // 1830.6 s, so a run fitted to 27 keeps them there but would not be fitted to 27.
        assert_eq!(fit_epochs(2940.0, c, 10, 100, 5), 26);
        assert_eq!(refit_epochs(27, 2940.0, c, 10, 100, 5, false), 27);
        assert_eq!(refit_epochs(27, 2940.0, c, 10, 100, 5, true), 27);
        // 30 epochs no longer fit: shortened to the most that fit less half the margin.
        assert_eq!(refit_epochs(30, 2940.0, c, 10, 100, 5, false), 27);
        // A run fitted to 20 grows to 26 only where allowed, and never past the cap.
        assert_eq!(refit_epochs(20, 2940.0, c, 10, 100, 5, false), 20);
        assert_eq!(refit_epochs(20, 2940.0, c, 10, 100, 5, true), 26);
        assert_eq!(refit_epochs(20, 2940.0, c, 10, 24, 5, true), 24);
        // A spent budget ends the run now.
        assert_eq!(refit_epochs(20, 1000.0, c, 10, 100, 5, false), 10);
    }

    #[test]
    fn an_epoch_costs_the_mean_or_the_recent_mean_when_larger() {
        assert_eq!(epoch_cost(&[]), 0.0);
        // Up to RECENT_EPOCHS epochs: the mean.
        assert_eq!(epoch_cost(&[100.0, 190.0, 300.0]), 100.0);
        // Epochs of 100, 90, 110, 90, 90 s: mean 96, last three 96.67.
        let ends = [100.0, 190.0, 300.0, 390.0, 480.0];
        assert!((epoch_cost(&ends) - 290.0 / 3.0).abs() < 1e-9);
        // A faster recent stretch does not lower the cost below the mean.
        let ends = [100.0, 200.0, 300.0, 380.0, 460.0, 540.0];
        assert_eq!(epoch_cost(&ends), 90.0);
        // A slower one counts at once: 100 s epochs, then 3 of 130 s.
        let ends = [100.0, 200.0, 300.0, 430.0, 560.0, 690.0];
        assert_eq!(epoch_cost(&ends), 130.0);
    }
}
