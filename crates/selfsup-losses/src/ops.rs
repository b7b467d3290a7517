//! Differentiable helpers that candle 0.11 lacks, written once and shared by every loss.
//!
//! (`candle_nn::ops::softmax_last_dim` has no gradient, and there is no `normalize`,
//! `cosine_similarity` or `masked_fill`.)

use candle_core::{DType, Tensor, D};

use crate::{Error, Result};

/// `x / max(||x||_2, 1e-12)` along the last dimension (`F.normalize(x, dim=-1)`).
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    Ok(x.broadcast_div(&norm)?)
}

/// Row-wise cosine similarity of two `(N, D)` tensors, `(N,)`
/// (`F.cosine_similarity(a, b, dim=1, eps=1e-8)`).
pub fn cosine_similarity(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let na = a.sqr()?.sum(D::Minus1)?;
    let nb = b.sqr()?.sum(D::Minus1)?;
    let denom = (na * nb)?.clamp(1e-16, f64::INFINITY)?.sqrt()?;
    Ok((dot / denom)?)
}

/// `x` where `mask` is 0, `value` where `mask` is non-zero (`masked_fill`). `mask` is `u8`/`u32`
/// and broadcastable to `x`.
pub fn masked_fill(x: &Tensor, mask: &Tensor, value: f64) -> Result<Tensor> {
    let fill = Tensor::full(value, x.shape(), x.device())?.to_dtype(x.dtype())?;
    let mask = mask.broadcast_as(x.shape())?;
    Ok(mask.where_cond(&fill, x)?)
}

/// `(N, N)` matrix with `value` on the diagonal and 0 elsewhere, in `dtype`: adding it to a
/// similarity matrix masks the diagonal in one cheap op (gradients pass through unchanged).
pub fn diagonal_bias(
    n: usize,
    value: f64,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    Ok((Tensor::eye(n, dtype, device)? * value)?)
}

/// `(N, N)` `u8` identity mask.
pub fn eye_mask(n: usize, device: &candle_core::Device) -> Result<Tensor> {
    let idx = Tensor::arange(0u32, n as u32, device)?;
    Ok(idx.unsqueeze(1)?.broadcast_eq(&idx.unsqueeze(0)?)?)
}

/// Stable `log(sum(exp(x)))` over the last dimension, `(N, M) -> (N,)`; the max is detached
/// (the result does not depend on it), so the gradient is exactly `softmax(x)`.
pub fn logsumexp(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    Ok((x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?.squeeze(D::Minus1)?)
}

/// `logsumexp(x) - picked` per row, `(N, M), (N,) -> (N,)`, computed as
/// `log sum exp(x - m) + (m - picked)` with the row max `m`, so that no precision is lost when
/// `picked` is (nearly) the max and the loss is close to zero.
pub fn logsumexp_minus(x: &Tensor, picked: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let log_sum = x
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .squeeze(D::Minus1)?;
    Ok((log_sum + (m.squeeze(D::Minus1)? - picked)?)?)
}

/// Mean cross-entropy of `(N, C)` logits against `(N,)` `u32` class indices.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let picked = logits.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok(logsumexp_minus(logits, &picked)?.mean_all()?)
}

pub(crate) fn check_temperature(t: f64) -> Result<f64> {
    if t.is_nan() || t <= 0.0 || t.is_infinite() {
        return Err(Error::Param(format!(
            "temperature must be a positive finite number, got {t}"
        )));
    }
    Ok(t)
}

pub(crate) fn check_pair(a: &Tensor, b: &Tensor, what: &str) -> Result<(usize, usize)> {
    if a.rank() != 2 || a.shape() != b.shape() {
        return Err(Error::Input(format!(
            "{what} takes two (N, D) tensors of the same shape, got {:?} and {:?}",
            a.dims(),
            b.dims()
        )));
    }
    check_float(a, what)?;
    if a.dtype() != b.dtype() {
        return Err(Error::Input(format!(
            "{what}: dtypes differ ({:?} and {:?})",
            a.dtype(),
            b.dtype()
        )));
    }
    Ok(a.dims2()?)
}

pub(crate) fn check_float(a: &Tensor, what: &str) -> Result<()> {
    if !matches!(
        a.dtype(),
        DType::F32 | DType::F64 | DType::F16 | DType::BF16
    ) {
        return Err(Error::Input(format!(
            "{what} needs floating-point inputs, got {:?}",
            a.dtype()
        )));
    }
    Ok(())
}
