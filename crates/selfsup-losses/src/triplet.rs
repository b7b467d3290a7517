//! Triplet margin loss (Schroff et al. 2015, "FaceNet"; `torch.nn.TripletMarginLoss`).
//!
//! Anchors `a`, positives `p` and negatives `n`, each `(N, D)`; with
//! `d(x, y) = ||x - y + eps||_2` (`eps = 1e-6`):
//!
//! `loss = mean_i max(0, d(a_i, p_i) - d(a_i, n_i) + m)`
//!
//! Output: scalar. Inputs are used as given (the `pairs` method normalises them first).

use candle_core::Tensor;

use crate::margin::{check_margin, pairwise_distance};
use crate::ops::{check_float, check_pair};
use crate::Result;

/// The triplet margin loss.
#[derive(Clone, Copy, Debug)]
pub struct TripletMargin {
    margin: f64,
}

impl TripletMargin {
    /// `margin` > 0 (PyTorch's default: 1.0).
    pub fn new(margin: f64) -> Result<Self> {
        Ok(Self {
            margin: check_margin(margin)?,
        })
    }

    /// The loss of triplets `(anchor, positive, negative)`.
    pub fn loss(&self, anchor: &Tensor, positive: &Tensor, negative: &Tensor) -> Result<Tensor> {
        check_pair(anchor, positive, "triplet loss")?;
        check_pair(anchor, negative, "triplet loss")?;
        check_float(anchor, "triplet loss")?;
        let dp = pairwise_distance(anchor, positive)?;
        let dn = pairwise_distance(anchor, negative)?;
        Ok(((dp - dn)? + self.margin)?.relu()?.mean_all()?)
    }
}
