//! VICReg (Bardes et al. 2022, "VICReg: Variance-Invariance-Covariance Regularization");
//! same value as lightly's `VICRegLoss`.
//!
//! Inputs `a`, `b`: `(N, D)`, `N >= 2`.
//! - invariance: `mean((a - b)^2)`
//! - variance: `0.5 (v(a) + v(b))`, `v(x) = mean_j relu(1 - sqrt(var_j(x) + 1e-4))` (unbiased var)
//! - covariance: `c(a) + c(b)`, `c(x) = sum_{i != j} Cov(x)_ij^2 / D`, `Cov = x_c^T x_c / (N - 1)`
//!
//! `loss = sim_weight inv + var_weight var + cov_weight cov` (paper: 25, 25, 1). Output: scalar.

use candle_core::Tensor;

use crate::ops::check_pair;
use crate::{Error, PairLoss, Result};

/// VICReg with its three weights.
#[derive(Clone, Copy, Debug)]
pub struct Vicreg {
    sim: f64,
    var: f64,
    cov: f64,
}

impl Vicreg {
    /// Weights of the invariance, variance and covariance terms (each finite and >= 0).
    pub fn new(sim_weight: f64, var_weight: f64, cov_weight: f64) -> Result<Self> {
        for (n, v) in [
            ("sim_weight", sim_weight),
            ("var_weight", var_weight),
            ("cov_weight", cov_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::Param(format!(
                    "VICReg {n} must be finite and >= 0, got {v}"
                )));
            }
        }
        Ok(Self {
            sim: sim_weight,
            var: var_weight,
            cov: cov_weight,
        })
    }

    /// The invariance, variance and covariance weights.
    pub fn weights(&self) -> (f64, f64, f64) {
        (self.sim, self.var, self.cov)
    }
}

fn variance_term(x: &Tensor, n: usize) -> Result<Tensor> {
    let xc = x.broadcast_sub(&x.mean_keepdim(0)?)?;
    let var = (xc.sqr()?.sum(0)? / (n as f64 - 1.0))?;
    let std = (var + 1e-4)?.sqrt()?;
    Ok(std.affine(-1.0, 1.0)?.relu()?.mean_all()?)
}

fn covariance_term(x: &Tensor, n: usize, d: usize) -> Result<Tensor> {
    let xc = x.broadcast_sub(&x.mean_keepdim(0)?)?;
    let scale = 1.0 / (n as f64 - 1.0);
    let cov = (xc.t()?.matmul(&xc)? * scale)?;
    let diag = (xc.sqr()?.sum(0)? * scale)?;
    Ok(((cov.sqr()?.sum_all()? - diag.sqr()?.sum_all()?)? / d as f64)?)
}

impl PairLoss for Vicreg {
    /// Equal to the pairwise definition, with each view's variance and covariance terms
    /// computed once and weighted by the number of pairs holding the view (`2 + k` for a global
    /// view, 2 for a local one): `k + 2` covariance matrices instead of `4 k + 2`.
    fn multi_crop_loss(&self, g0: &Tensor, g1: &Tensor, locals: &[Tensor]) -> Result<Tensor> {
        if locals.is_empty() {
            return self.loss(g0, g1);
        }
        let (n, d) = check_pair(g0, g1, "VICReg")?;
        if n < 2 {
            return Err(Error::Input(format!(
                "VICReg needs a batch of at least 2, got {n}"
            )));
        }
        for l in locals {
            check_pair(g0, l, "VICReg")?;
        }
        let k = locals.len() as f64;
        let mut inv = ((g0 - g1)?.sqr()?.mean_all()? * 2.0)?;
        for l in locals {
            for g in [g0, g1] {
                inv = (inv + (g - l)?.sqr()?.mean_all()?)?;
            }
        }
        let wg = 2.0 + k;
        let mut var = ((variance_term(g0, n)? + variance_term(g1, n)?)? * wg)?;
        let mut cov = ((covariance_term(g0, n, d)? + covariance_term(g1, n, d)?)? * wg)?;
        for l in locals {
            var = (var + (variance_term(l, n)? * 2.0)?)?;
            cov = (cov + (covariance_term(l, n, d)? * 2.0)?)?;
        }
        let total = ((inv * self.sim)? + (var * (0.5 * self.var))? + (cov * self.cov)?)?;
        Ok((total / (2.0 + 2.0 * k))?)
    }

    fn loss(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (n, d) = check_pair(a, b, "VICReg")?;
        if n < 2 {
            return Err(Error::Input(format!(
                "VICReg needs a batch of at least 2, got {n}"
            )));
        }
        let inv = (a - b)?.sqr()?.mean_all()?;
        let var = ((variance_term(a, n)? + variance_term(b, n)?)? * 0.5)?;
        let cov = (covariance_term(a, n, d)? + covariance_term(b, n, d)?)?;
        Ok(((inv * self.sim)? + (var * self.var)? + (cov * self.cov)?)?)
    }
}
