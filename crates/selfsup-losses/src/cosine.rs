//! Cosine losses.
//!
//! - [`CosineSimilarity`]: `mean_i (1 - cos(a_i, b_i))`, the seed article's cosine loss
//!   (`2 - 2 cos` in BYOL is twice this).
//! - [`NegativeCosine`]: `-mean_i cos(p_i, z_i)`, as SimSiam (Chen & He 2021) and lightly's
//!   `NegativeCosineSimilarity`. Stop-gradient on `z` is the method's job (`z.detach()`).
//!
//! `cos(a, b) = a . b / max(||a|| ||b||, 1e-8)`. Inputs `(N, D)`; output: scalar.

use candle_core::Tensor;

use crate::ops::{check_pair, cosine_similarity};
use crate::{PairLoss, Result};

/// `mean(1 - cos(a, b))`.
#[derive(Clone, Copy, Debug, Default)]
pub struct CosineSimilarity;

impl PairLoss for CosineSimilarity {
    fn loss(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        check_pair(a, b, "cosine loss")?;
        Ok(cosine_similarity(a, b)?.mean_all()?.affine(-1.0, 1.0)?)
    }
}

/// `-mean(cos(p, z))`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NegativeCosine;

impl PairLoss for NegativeCosine {
    fn loss(&self, p: &Tensor, z: &Tensor) -> Result<Tensor> {
        check_pair(p, z, "negative cosine loss")?;
        Ok(cosine_similarity(p, z)?.mean_all()?.neg()?)
    }
}
