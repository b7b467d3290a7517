//! # selfsup-losses
//!
//! Losses for self-supervised and contrastive learning on candle, one file per loss, each
//! documented with its formula, shapes and paper, and each checked (value and gradient) against
//! PyTorch/lightly on fixtures made by `tests/fixtures/make_loss_fixtures.py`.
//!
//! Design choice: one narrow trait, [`PairLoss`] (`loss(a, b) -> scalar`), for every loss that
//! compares two batches of embeddings; losses that need more ([`SupCon`]'s labels, [`InfoNce`]'s
//! queue) add an inherent method. Inputs are un-normalised `(N, D)` embeddings; each loss
//! normalises where its method says so. Shared differentiable helpers (`normalize`,
//! `cosine_similarity`, `masked_fill`, `logsumexp`, `cross_entropy`) live in [`ops`].
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use selfsup_losses::{NtXent, PairLoss};
//! let a = Tensor::randn(0f32, 1., (8, 16), &Device::Cpu)?;
//! let b = Tensor::randn(0f32, 1., (8, 16), &Device::Cpu)?;
//! let loss = NtXent::new(0.5)?.loss(&a, &b)?; // scalar
//! assert!(loss.to_scalar::<f32>()? > 0.0);
//! # Ok::<(), selfsup_losses::Error>(())
//! ```
#![warn(missing_docs)]

mod barlow_twins;
mod cosine;
mod error;
mod info_nce;
mod margin;
mod nt_xent;
pub mod ops;
mod supcon;
mod triplet;
mod vicreg;
mod vicreg_sharded;

pub use barlow_twins::BarlowTwins;
pub use cosine::{CosineSimilarity, NegativeCosine};
pub use error::{Error, Result};
pub use info_nce::InfoNce;
pub use margin::ContrastiveMargin;
pub use nt_xent::NtXent;
pub use supcon::SupCon;
pub use triplet::TripletMargin;
pub use vicreg::Vicreg;
pub use vicreg_sharded::{Ranks, SumAcrossRanks};

use candle_core::Tensor;

/// A loss comparing two batches of embeddings, `(N, D)` each, giving a scalar tensor.
pub trait PairLoss {
    /// The loss of `a` against `b`.
    fn loss(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;

    /// The multi-crop loss of two global views `g0`, `g1` and `locals` (SwAV, DINO): every
    /// global view against every other view, averaged over these ordered pairs. The loss is
    /// symmetric, so the global pair counts twice:
    /// `(2 L(g0, g1) + sum over g in {g0, g1}, l in locals of L(g, l)) / (2 + 2 k)`; with no
    /// local views, `L(g0, g1)`. The default computes every pair
    /// ([`pairwise_multi_crop_loss`]); a loss with per-view terms may compute them once.
    fn multi_crop_loss(&self, g0: &Tensor, g1: &Tensor, locals: &[Tensor]) -> Result<Tensor> {
        pairwise_multi_crop_loss(self, g0, g1, locals)
    }
}

/// [`PairLoss::multi_crop_loss`] computed pair by pair.
pub fn pairwise_multi_crop_loss<L: PairLoss + ?Sized>(
    loss: &L,
    g0: &Tensor,
    g1: &Tensor,
    locals: &[Tensor],
) -> Result<Tensor> {
    let global = loss.loss(g0, g1)?;
    if locals.is_empty() {
        return Ok(global);
    }
    let mut total = (global * 2.0)?;
    for l in locals {
        for g in [g0, g1] {
            total = (total + loss.loss(g, l)?)?;
        }
    }
    Ok((total / (2.0 + 2.0 * locals.len() as f64))?)
}
