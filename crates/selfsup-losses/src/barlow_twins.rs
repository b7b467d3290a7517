//! Barlow Twins (Zbontar et al. 2021, "Barlow Twins: Self-Supervised Learning via Redundancy
//! Reduction"); same value as lightly's `BarlowTwinsLoss`.
//!
//! Inputs `a`, `b`: `(N, D)` projector outputs. Each is standardised along the batch
//! (`(z - mean) / sqrt(var + 1e-5)`, biased variance, as `F.batch_norm` in training mode), then
//! `C = a_n^T b_n / N` `(D, D)` and
//!
//! `loss = sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2`. Output: scalar.

use candle_core::Tensor;

use crate::ops::check_pair;
use crate::{Error, PairLoss, Result};

/// Barlow Twins with redundancy weight `lambda` (paper and lightly: 5e-3).
#[derive(Clone, Copy, Debug)]
pub struct BarlowTwins {
    lambda: f64,
}

impl BarlowTwins {
    /// `lambda` >= 0.
    pub fn new(lambda: f64) -> Result<Self> {
        if !(lambda.is_finite() && lambda >= 0.0) {
            return Err(Error::Param(format!(
                "Barlow Twins lambda must be finite and >= 0, got {lambda}"
            )));
        }
        Ok(Self { lambda })
    }
}

/// Standardise each column over the batch (biased variance, eps 1e-5).
pub(crate) fn standardize(z: &Tensor) -> Result<Tensor> {
    let mean = z.mean_keepdim(0)?;
    let zc = z.broadcast_sub(&mean)?;
    let var = zc.sqr()?.mean_keepdim(0)?;
    Ok(zc.broadcast_div(&(var + 1e-5)?.sqrt()?)?)
}

impl PairLoss for BarlowTwins {
    fn loss(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (n, _) = check_pair(a, b, "Barlow Twins")?;
        if n < 2 {
            return Err(Error::Input(format!(
                "Barlow Twins needs a batch of at least 2, got {n}"
            )));
        }
        let an = standardize(a)?;
        let bn = standardize(b)?;
        let inv_n = 1.0 / n as f64;
        let c = (an.t()?.matmul(&bn)? * inv_n)?;
        let diag = ((&an * &bn)?.sum(0)? * inv_n)?;
        let on = diag.affine(1.0, -1.0)?.sqr()?.sum_all()?;
        let off = (c.sqr()?.sum_all()? - diag.sqr()?.sum_all()?)?;
        Ok((on + (off * self.lambda)?)?)
    }
}
