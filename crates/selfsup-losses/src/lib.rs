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

pub use barlow_twins::BarlowTwins;
pub use cosine::{CosineSimilarity, NegativeCosine};
pub use error::{Error, Result};
pub use info_nce::InfoNce;
pub use margin::ContrastiveMargin;
pub use nt_xent::NtXent;
pub use supcon::SupCon;
pub use triplet::TripletMargin;
pub use vicreg::Vicreg;

use candle_core::Tensor;

/// A loss comparing two batches of embeddings, `(N, D)` each, giving a scalar tensor.
pub trait PairLoss {
    /// The loss of `a` against `b`.
    fn loss(&self, a: &Tensor, b: &Tensor) -> Result<Tensor>;
}
