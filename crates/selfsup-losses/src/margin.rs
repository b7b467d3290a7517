//! Margin contrastive loss on explicit pairs (Hadsell, Chopra & LeCun 2006, "Dimensionality
//! Reduction by Learning an Invariant Mapping").
//!
//! Pairs `(a_i, b_i)` `(N, D)` with `same_i` in {0, 1} `(N,)` (1: a positive pair). With the
//! Euclidean distance `d_i = ||a_i - b_i + eps||` (`eps = 1e-6`, as `F.pairwise_distance`, so
//! the gradient stays finite for identical inputs):
//!
//! `loss = mean_i [ same_i d_i^2 + (1 - same_i) max(0, m - d_i)^2 ] / 2`
//!
//! Positives are pulled together, negatives pushed at least the margin `m` apart. Inputs are
//! used as given (the `pairs` method normalises its embeddings first, so `d` lies in [0, 2]).
//! Output: scalar.

use candle_core::{Tensor, D};

use crate::ops::{check_float, check_pair};
use crate::{Error, Result};

/// The margin contrastive loss.
#[derive(Clone, Copy, Debug)]
pub struct ContrastiveMargin {
    margin: f64,
}

/// `||a - b + eps||_2` per row, `(N, D), (N, D) -> (N,)`.
pub(crate) fn pairwise_distance(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(((a - b)? + 1e-6)?.sqr()?.sum(D::Minus1)?.sqrt()?)
}

pub(crate) fn check_margin(m: f64) -> Result<f64> {
    if m.is_finite() && m > 0.0 {
        Ok(m)
    } else {
        Err(Error::Param(format!("margin must be positive, got {m}")))
    }
}

impl ContrastiveMargin {
    /// `margin` > 0 (1.0 for unit-norm embeddings).
    pub fn new(margin: f64) -> Result<Self> {
        Ok(Self {
            margin: check_margin(margin)?,
        })
    }

    /// The loss of pairs `(a, b)` labelled by `same` (`(N,)`, 1 for positive pairs, 0 for
    /// negative ones, in the dtype of `a` or `u8`/`u32`).
    pub fn loss(&self, a: &Tensor, b: &Tensor, same: &Tensor) -> Result<Tensor> {
        let (n, _) = check_pair(a, b, "margin contrastive loss")?;
        check_float(a, "margin contrastive loss")?;
        if same.dims() != [n] {
            return Err(Error::Input(format!(
                "margin contrastive loss: `same` must be ({n},), got {:?}",
                same.dims()
            )));
        }
        let same = same.to_dtype(a.dtype())?;
        let d = pairwise_distance(a, b)?;
        let pos = d.sqr()?;
        let neg = d.affine(-1.0, self.margin)?.relu()?.sqr()?;
        let per = ((&same * pos)? + (same.affine(-1.0, 1.0)? * neg)?)?;
        Ok((per.mean_all()? * 0.5)?)
    }
}
