//! Supervised contrastive loss, `L_out` of Khosla et al. 2020 ("Supervised Contrastive
//! Learning").
//!
//! Features `(N, V, D)` (V views per image), labels `(N,)` `u32`. The `N V` normalised
//! embeddings are anchors and contrasts at once (view-major order, as the reference code);
//! with `s_ij = z_i . z_j / t`, `A(i)` all `j != i` and `P(i)` those with `i`'s label:
//!
//! `loss = mean_{i : |P(i)| > 0} -1/|P(i)| sum_{p in P(i)} [ s_ip - log sum_{a in A(i)} exp(s_ia) ]`
//!
//! (the reference's extra factor `t / base_t` is 1 here). Anchors without any positive are
//! left out of the mean. Output: scalar.

use candle_core::{DType, Tensor};

use crate::ops::{check_float, check_temperature, diagonal_bias, logsumexp, normalize};
use crate::{Error, Result};

/// SupCon with a temperature.
#[derive(Clone, Copy, Debug)]
pub struct SupCon {
    temperature: f64,
}

impl SupCon {
    /// `temperature` > 0 (paper: 0.1).
    pub fn new(temperature: f64) -> Result<Self> {
        Ok(Self {
            temperature: check_temperature(temperature)?,
        })
    }

    /// The loss of `features` `(N, V, D)` with `labels` `(N,)`.
    pub fn loss(&self, features: &Tensor, labels: &Tensor) -> Result<Tensor> {
        check_float(features, "SupCon")?;
        if features.rank() != 3 {
            return Err(Error::Input(format!(
                "SupCon features must be (N, V, D), got {:?}",
                features.dims()
            )));
        }
        let (n, v, d) = features.dims3()?;
        if labels.dims() != [n] {
            return Err(Error::Input(format!(
                "SupCon labels must be ({n},) for features {:?}, got {:?}",
                features.dims(),
                labels.dims()
            )));
        }
        if n * v < 2 {
            return Err(Error::Input(format!(
                "SupCon needs at least 2 embeddings, got {n}x{v}"
            )));
        }
        let m = n * v;
        // View-major: row k = view k / N of image k % N.
        let z = normalize(&features.transpose(0, 1)?.contiguous()?.reshape((m, d))?)?;
        let labels = labels.to_dtype(DType::U32)?;
        let lab = Tensor::cat(&vec![&labels; v], 0)?;
        let idx = Tensor::arange(0u32, m as u32, z.device())?;
        let not_eye = idx
            .unsqueeze(1)?
            .broadcast_ne(&idx.unsqueeze(0)?)?
            .to_dtype(z.dtype())?;
        let same = lab
            .unsqueeze(1)?
            .broadcast_eq(&lab.unsqueeze(0)?)?
            .to_dtype(z.dtype())?;
        let pos = (same * not_eye)?;
        let sim = (z.matmul(&z.t()?)? * (1.0 / self.temperature))?;
        let sim = sim.broadcast_add(&diagonal_bias(m, -1e9, sim.dtype(), sim.device())?)?;
        let log_prob = sim.broadcast_sub(&logsumexp(&sim)?.unsqueeze(1)?)?;
        let count = pos.sum(1)?;
        let has = count.gt(0.0)?.to_dtype(z.dtype())?;
        let n_has = has.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if n_has == 0.0 {
            return Err(Error::Input(
                "SupCon: no anchor has a positive (every label is unique and V = 1)".into(),
            ));
        }
        let mean_pos = ((pos * log_prob)?.sum(1)? / count.clamp(1.0, f64::INFINITY)?)?;
        Ok(((mean_pos * has)?.sum_all()? * (-1.0 / n_has))?)
    }
}
