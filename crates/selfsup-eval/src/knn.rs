//! Weighted kNN on cosine similarity (Wu et al. 2018, InstDisc; the MoCo/lightly monitor).
//!
//! For each query: the `k` most similar training features by cosine similarity `s`; class score
//! `sum exp(s / T)` over the neighbours of that class; prediction = the best score. Defaults
//! `k = 200`, `T = 0.1`. Checked against lightly's `knn_predict` (tests/reference.rs).
//!
//! Ties: neighbours with equal similarity are taken in bank order, and votes are summed in f64
//! in that order, so equal neighbours give exactly equal class scores. A query whose class ties
//! with another for the best score is **not** a top-1 hit (lightly's `argsort` would pick one of
//! them arbitrarily); it is a top-5 hit when fewer than five other classes score at least as
//! high. The same rule scores the linear probe.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// kNN parameters.
#[derive(Clone, Copy, Debug)]
pub struct KnnConfig {
    /// Neighbours.
    pub k: usize,
    /// Temperature of the vote weights.
    pub temperature: f64,
}

impl KnnConfig {
    /// `k > 0` and a finite `temperature > 0`; callers check this before spending time on
    /// features.
    pub fn validate(&self) -> Result<()> {
        if self.k == 0 || !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::Input(format!(
                "kNN needs k > 0 and a temperature > 0, got k = {} and temperature = {}",
                self.k, self.temperature
            )));
        }
        Ok(())
    }
}

impl Default for KnnConfig {
    fn default() -> Self {
        Self {
            k: 200,
            temperature: 0.1,
        }
    }
}

/// Class scores `(Q, classes)` for each query (class order, not sorted).
pub fn knn_predict(
    train: &Tensor,
    train_labels: &[usize],
    query: &Tensor,
    classes: usize,
    cfg: KnnConfig,
) -> Result<Vec<Vec<f64>>> {
    let (n, d) = train.dims2()?;
    let (_, dq) = query.dims2()?;
    if d != dq || n != train_labels.len() || n == 0 {
        return Err(Error::Input(format!(
            "kNN: train features {:?} with {} labels and queries {:?} do not fit",
            train.dims(),
            train_labels.len(),
            query.dims()
        )));
    }
    cfg.validate()?;
    crate::check_finite("kNN", "memory bank", train)?;
    crate::check_finite("kNN", "query", query)?;
    let k = cfg.k.min(n);
    let train = crate::l2_normalize(&train.to_device(&Device::Cpu)?)?;
    let query = crate::l2_normalize(&query.to_device(&Device::Cpu)?)?;
    let tt = train.t()?.contiguous()?;
    let mut out = Vec::with_capacity(query.dim(0)?);
    let chunk = 256;
    let q = query.dim(0)?;
    for start in (0..q).step_by(chunk) {
        let len = chunk.min(q - start);
        let sim: Vec<Vec<f32>> = query.narrow(0, start, len)?.matmul(&tt)?.to_vec2()?;
        let scores: Vec<Vec<f64>> = sim
            .into_par_iter()
            .map(|row| {
                // Most similar first; equal similarities in bank order.
                let order =
                    |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
                let mut idx: Vec<u32> = (0..n as u32).collect();
                if k < n {
                    idx.select_nth_unstable_by(k - 1, order);
                }
                let top = &mut idx[..k];
                top.sort_unstable_by(order);
                let mut s = vec![0f64; classes];
                for &i in top.iter() {
                    let l = train_labels[i as usize];
                    if l < classes {
                        s[l] += (f64::from(row[i as usize]) / cfg.temperature).exp();
                    }
                }
                s
            })
            .collect();
        out.extend(scores);
    }
    Ok(out)
}

/// Top-1 and top-5 accuracy (fractions) of kNN classification of `query` against `train`.
pub fn knn(
    train: &Tensor,
    train_labels: &[usize],
    query: &Tensor,
    query_labels: &[usize],
    classes: usize,
    cfg: KnnConfig,
) -> Result<(f64, f64)> {
    let scores = knn_predict(train, train_labels, query, classes, cfg)?;
    if scores.len() != query_labels.len() {
        return Err(Error::Input(format!(
            "{} queries but {} labels",
            scores.len(),
            query_labels.len()
        )));
    }
    Ok(topk_accuracy(&scores, query_labels))
}

/// Top-1 and top-5 accuracy from per-class scores; a tie is not a hit (see the module docs).
pub fn topk_accuracy<T: PartialOrd + Copy>(scores: &[Vec<T>], labels: &[usize]) -> (f64, f64) {
    let (mut t1, mut t5) = (0usize, 0usize);
    for (s, &l) in scores.iter().zip(labels) {
        // A NaN score (a diverged probe) is never a hit.
        let Some(&target) = s.get(l).filter(|t| t.partial_cmp(t).is_some()) else {
            continue;
        };
        // Rank = other classes scoring at least as high as the true class.
        let rank = s
            .iter()
            .enumerate()
            .filter(|&(c, &v)| c != l && v >= target)
            .count();
        t1 += (rank == 0) as usize;
        t5 += (rank < 5) as usize;
    }
    let n = labels.len().max(1) as f64;
    (t1 as f64 / n, t5 as f64 / n)
}
