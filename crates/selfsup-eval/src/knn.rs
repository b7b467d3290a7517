//! Weighted kNN on cosine similarity (Wu et al. 2018, InstDisc; the MoCo/lightly monitor).
//!
//! For each query: the `k` most similar training features by cosine similarity `s`; class score
//! `sum exp(s / T)` over the neighbours of that class; prediction = the best score. Defaults
//! `k = 200`, `T = 0.1`.

use candle_core::{Device, Tensor, D};
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

impl Default for KnnConfig {
    fn default() -> Self {
        Self {
            k: 200,
            temperature: 0.1,
        }
    }
}

fn l2norm(x: &Tensor) -> Result<Tensor> {
    let n = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&n)?)
}

/// Class scores `(Q, classes)` for each query, best first order not implied.
pub fn knn_predict(
    train: &Tensor,
    train_labels: &[usize],
    query: &Tensor,
    classes: usize,
    cfg: KnnConfig,
) -> Result<Vec<Vec<f32>>> {
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
    if cfg.k == 0 || cfg.temperature.is_nan() || cfg.temperature <= 0.0 {
        return Err(Error::Input(format!(
            "kNN needs k > 0 and temperature > 0, got {cfg:?}"
        )));
    }
    crate::check_finite("kNN", "memory bank", train)?;
    crate::check_finite("kNN", "query", query)?;
    let k = cfg.k.min(n);
    let train = l2norm(&train.to_device(&Device::Cpu)?)?;
    let query = l2norm(&query.to_device(&Device::Cpu)?)?;
    let tt = train.t()?.contiguous()?;
    let mut out = Vec::with_capacity(query.dim(0)?);
    let chunk = 256;
    let q = query.dim(0)?;
    for start in (0..q).step_by(chunk) {
        let len = chunk.min(q - start);
        let sim: Vec<Vec<f32>> = query.narrow(0, start, len)?.matmul(&tt)?.to_vec2()?;
        let scores: Vec<Vec<f32>> = sim
            .into_par_iter()
            .map(|row| {
                let mut idx: Vec<u32> = (0..n as u32).collect();
                if k < n {
                    idx.select_nth_unstable_by(k - 1, |&a, &b| {
                        row[b as usize].total_cmp(&row[a as usize])
                    });
                }
                let mut s = vec![0f32; classes];
                for &i in &idx[..k] {
                    let l = train_labels[i as usize];
                    if l < classes {
                        s[l] += ((row[i as usize] as f64) / cfg.temperature).exp() as f32;
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

/// Top-1 and top-5 accuracy from per-class scores.
pub(crate) fn topk_accuracy(scores: &[Vec<f32>], labels: &[usize]) -> (f64, f64) {
    let (mut t1, mut t5) = (0usize, 0usize);
    for (s, &l) in scores.iter().zip(labels) {
        let target = s.get(l).copied().unwrap_or(f32::NEG_INFINITY);
        // Rank = number of classes with a strictly higher score (ties favour the true class).
        let rank = s.iter().filter(|&&v| v > target).count();
        t1 += (rank == 0) as usize;
        t5 += (rank < 5) as usize;
    }
    let n = labels.len().max(1) as f64;
    (t1 as f64 / n, t5 as f64 / n)
}
