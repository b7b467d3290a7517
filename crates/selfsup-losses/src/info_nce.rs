//! InfoNCE (van den Oord et al. 2018; MoCo, He et al. 2020).
//!
//! Queries `q` and keys `k`: `(N, D)`, normalised here. As a [`PairLoss`], `q_i`'s positive is
//! `k_i` and the other keys of the batch are its negatives:
//! `loss = mean_i [ log sum_j exp(q_i . k_j / t) - q_i . k_i / t ]`.
//!
//! With a queue of negatives `(K, D)` (MoCo), logits are `[q_i . k_i, q_i . queue^T] / t` and
//! the target is index 0: `loss = mean_i [ logsumexp(logits_i) - logits_i0 ]`. Queue rows are
//! normalised here too (a no-op for the normalised keys MoCo stores). Output: scalar.

use candle_core::{Tensor, D};

use crate::ops::{check_pair, check_temperature, logsumexp_minus, normalize};
use crate::{Error, PairLoss, Result};

/// InfoNCE with a temperature.
#[derive(Clone, Copy, Debug)]
pub struct InfoNce {
    temperature: f64,
}

impl InfoNce {
    /// `temperature` > 0 (MoCo v2: 0.2 on ImageNet, 0.1 in lightly's CIFAR-10 benchmark).
    pub fn new(temperature: f64) -> Result<Self> {
        Ok(Self {
            temperature: check_temperature(temperature)?,
        })
    }

    /// The loss with `queue` `(K, D)` as the negatives, or in-batch negatives when `None`.
    pub fn loss_with_negatives(
        &self,
        q: &Tensor,
        k: &Tensor,
        queue: Option<&Tensor>,
    ) -> Result<Tensor> {
        let Some(queue) = queue else {
            return self.loss(q, k);
        };
        let (_, d) = check_pair(q, k, "InfoNCE")?;
        if queue.rank() != 2 || queue.dim(1)? != d || queue.dim(0)? == 0 {
            return Err(Error::Input(format!(
                "InfoNCE queue must be (K, {d}) with K > 0, got {:?}",
                queue.dims()
            )));
        }
        if queue.dtype() != q.dtype() {
            return Err(Error::Input(format!(
                "InfoNCE queue dtype {:?} differs from {:?}",
                queue.dtype(),
                q.dtype()
            )));
        }
        let inv_t = 1.0 / self.temperature;
        let q = normalize(q)?;
        let k = normalize(k)?;
        let queue = normalize(queue)?;
        let pos = ((&q * &k)?.sum_keepdim(D::Minus1)? * inv_t)?;
        let neg = (q.matmul(&queue.t()?)? * inv_t)?;
        let logits = Tensor::cat(&[&pos, &neg], 1)?;
        Ok(logsumexp_minus(&logits, &pos.squeeze(1)?)?.mean_all()?)
    }
}

impl PairLoss for InfoNce {
    fn loss(&self, q: &Tensor, k: &Tensor) -> Result<Tensor> {
        let (n, _) = check_pair(q, k, "InfoNCE")?;
        if n < 2 {
            return Err(Error::Input(format!(
                "InfoNCE with in-batch negatives needs N >= 2, got N = {n} (pass a queue of negatives instead)"
            )));
        }
        let inv_t = 1.0 / self.temperature;
        let q = normalize(q)?;
        let k = normalize(k)?;
        let logits = (q.matmul(&k.t()?)? * inv_t)?;
        let pos = ((&q * &k)?.sum(D::Minus1)? * inv_t)?;
        Ok(logsumexp_minus(&logits, &pos)?.mean_all()?)
    }
}
