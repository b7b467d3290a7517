//! Barlow Twins (Zbontar et al. 2021): the cross-correlation matrix of the two views'
//! batch-normalised projections is pushed to the identity (`selfsup_losses::BarlowTwins`).
//! Projector: three linear layers, BN + ReLU between (lightly's `BarlowTwinsProjectionHead`,
//! 2048-2048-2048 in its CIFAR-10 benchmark).

use candle_core::Tensor;
use selfsup_losses::BarlowTwins;
use selfsup_models::heads::expander;
use selfsup_models::EncoderKind;

use crate::common::{encoder_head_accessors, EncoderHead};
use crate::{Method, Placement, Result, StepOutput};

/// Barlow Twins hyper-parameters.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BarlowConfig {
    /// Projector hidden width (2048).
    pub hidden_dim: usize,
    /// Projector output width (2048).
    pub out_dim: usize,
    /// Weight of the off-diagonal (redundancy reduction) term (5e-3, lightly's default).
    pub lambda: f64,
}

impl Default for BarlowConfig {
    fn default() -> Self {
        Self {
            hidden_dim: 2048,
            out_dim: 2048,
            lambda: 5e-3,
        }
    }
}

/// Barlow Twins.
pub struct Barlow {
    inner: EncoderHead,
    loss: BarlowTwins,
}

impl Barlow {
    /// Build with fresh weights drawn from `seed`.
    pub fn new(kind: &EncoderKind, cfg: &BarlowConfig, seed: u64, at: &Placement) -> Result<Self> {
        let (h, o) = (cfg.hidden_dim, cfg.out_dim);
        Ok(Self {
            inner: EncoderHead::new(kind, |d| expander(d, h, o, 3), seed, at)?,
            loss: BarlowTwins::new(cfg.lambda)?,
        })
    }
}

impl Method for Barlow {
    fn name(&self) -> &str {
        "barlow"
    }

    fn forward_loss(&self, views: &[Tensor], _labels: Option<&Tensor>) -> Result<StepOutput> {
        self.inner.pair_loss_step(views, "Barlow Twins", &self.loss)
    }

    encoder_head_accessors!();
}
